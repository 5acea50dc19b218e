"""A geometry oracle for the procedural films of `cxr_helpers.synthetic`: it measures findings
from the renderer's known anatomy (no weights, no download), so a model trained on those films
can be scored for prompt adherence offline, against known right answers.

Measured: cardiomegaly (the heart's width on PA views, its posterior edge on laterals) and
pleural effusion (how far the costophrenic angle is filled: the lung base brighter than the
mid lung, at the lateral angles on PA views, the posterior sulcus on laterals). Each measure is
a z-score around the midpoint between the renderer's normal and abnormal films, measured on
synthetic films at 128 px, so that the two views rank on one scale. Meaningful for the
synthetic films only: elsewhere the numbers are nonsense.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch


def heart_width_fraction(pixels: np.ndarray) -> float:
    """Rough cardiothoracic ratio of a frontal film: the width of the heart's shadow in the lower
    chest over the width of the body. Used to check that prompts control the pictures."""
    img = np.asarray(pixels, dtype=np.float32)
    h, w = img.shape
    row = img[int(h * 0.53): int(h * 0.6)].mean(axis=0)
    lung_level = np.percentile(row, 15)
    heart_level = row[int(w * 0.58)]  # just left of the spine: heart in every film
    threshold = (lung_level + heart_level) / 2
    # Walk out from the midline while the row stays heart-dense.
    left = right = w // 2
    while left > 0 and row[left - 1] > threshold:
        left -= 1
    while right < w - 1 and row[right + 1] > threshold:
        right += 1
    body = row > row.min() + 0.3 * (row.max() - row.min())
    return float((right - left) / max(1, int(body.sum())))


def is_lateral(pixels: np.ndarray) -> bool:
    """Synthetic films: a lateral view has the spine bright at ~78% of the width and lung at the
    middle; a PA view has the mediastinum bright at the middle and lung at 78%."""
    img = np.asarray(pixels, dtype=np.float32)
    h, w = img.shape
    band = img[int(h * 0.3): int(h * 0.5)].mean(axis=0)
    return float(band[int(w * 0.72): int(w * 0.84)].mean() - band[int(w * 0.45): int(w * 0.55)].mean()) > 0


def lateral_heart_edge(pixels: np.ndarray) -> float:
    """Synthetic lateral films: the heart's posterior edge (fraction of the width), walking back
    from just behind the sternum along the heart's level while the row stays heart-dense."""
    img = np.asarray(pixels, dtype=np.float32)
    h, w = img.shape
    row = img[int(h * 0.56): int(h * 0.64)].mean(axis=0)
    lung = np.percentile(row[int(w * 0.3): int(w * 0.75)], 10)
    x = int(w * 0.36)
    threshold = (lung + row[x]) / 2
    while x < w - 1 and row[x + 1] > threshold:
        x += 1
    return x / w


def _window(img: np.ndarray, x0: float, x1: float, y0: float, y1: float) -> float:
    h, w = img.shape
    return float(img[int(h * y0): int(h * y1), int(w * x0): int(w * x1)].mean())


# (x0, x1) of each costophrenic angle on a PA film: the outer part of each lung base, lateral to
# the heart even when it is enlarged (the image's left is the patient's right).
PA_ANGLES = {"right": (0.16, 0.24), "left": (0.79, 0.85)}


def costophrenic_fill(pixels: np.ndarray, side: str) -> float:
    """PA films: how much brighter the lung base at `side`'s costophrenic angle is than the mid
    lung above it, over the body's contrast (fluid fills the angle from below: it blunts)."""
    img = np.asarray(pixels, dtype=np.float32)
    x0, x1 = PA_ANGLES[side]
    base = _window(img, x0, x1, 0.55, 0.62)
    mid = _window(img, x0, x1, 0.36, 0.46)
    contrast = np.percentile(img, 95) - np.percentile(img, 5)
    return (base - mid) / max(float(contrast), 1.0)


def posterior_sulcus_fill(pixels: np.ndarray) -> float:
    """Lateral films: the same for the posterior costophrenic sulcus (where fluid collects first)."""
    img = np.asarray(pixels, dtype=np.float32)
    base = _window(img, 0.67, 0.72, 0.6, 0.66)
    mid = _window(img, 0.67, 0.72, 0.36, 0.46)
    contrast = np.percentile(img, 95) - np.percentile(img, 5)
    return (base - mid) / max(float(contrast), 1.0)


class GeometryOracle:
    """Cardiomegaly and pleural effusion measured on `cxr_helpers.synthetic` films, as z-scores
    around the midpoint between the renderer's normal and abnormal films (calibrated on
    synthetic films at 128 px), so PA and lateral views rank on one scale. Meaningful for the
    synthetic films only: it is the offline stand-in for a classifier, with known right answers."""

    name = "geometry oracle (synthetic films only: heart size and costophrenic angles from the renderer's geometry)"
    findings = ("Cardiomegaly", "Effusion")
    # (midpoint, spread): PA heart/chest width normal 0.42, enlarged 0.51; lateral edge 0.52 / 0.62.
    PA = (0.46, 0.05)
    LATERAL = (0.57, 0.025)
    # Angle fill (base minus mid lung, over the contrast; 30 films per case at 128 px): PA, the
    # worse angle, clear 0.05, small effusion 0.23-0.31; lateral sulcus clear 0.05, small 0.39.
    PA_EFFUSION = (0.17, 0.1)
    LATERAL_EFFUSION = (0.2, 0.1)

    def score_film(self, film: np.ndarray) -> dict[str, float]:
        if is_lateral(film):
            heart, fill = lateral_heart_edge(film), posterior_sulcus_fill(film)
            (centre, spread), (fill_centre, fill_spread) = self.LATERAL, self.LATERAL_EFFUSION
        else:
            # The worse angle: a one-sided effusion is as much an effusion as a bilateral one.
            heart = heart_width_fraction(film)
            fill = max(costophrenic_fill(film, side) for side in PA_ANGLES)
            (centre, spread), (fill_centre, fill_spread) = self.PA, self.PA_EFFUSION
        return {"Cardiomegaly": (heart - centre) / spread, "Effusion": (fill - fill_centre) / fill_spread}

    def score(self, images: torch.Tensor, batch_size: int = 32, progress: bool = False) -> pd.DataFrame:
        rows = [self.score_film(film) for film in images[:, 0].numpy()]
        return pd.DataFrame(rows, columns=list(self.findings))
