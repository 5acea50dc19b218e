"""The synthetic dataset's films: a patient's anatomy and, from a report's findings, a frontal
(PA) or lateral chest film drawn in normalised coordinates, then exposed like a real film.

Frontal views are PA: the patient's right is on the image's left, as on real films.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter


@dataclass(frozen=True)
class Finding:
    kind: str
    side: str | None = None  # "right" | "left" | "bilateral" (the patient's side)
    zone: str | None = None  # "upper" | "lower"
    severity: str | None = None  # "mild" | "moderate" | "small" | "large"


@dataclass
class Patient:
    """Per-patient anatomy, so that two reports with the same findings still differ."""

    dx: float
    dy: float
    scale: float
    heart_rx: float
    lung_rx: float
    lung_ry: float
    rib_phase: float
    exposure: float
    contrast: float



def draw_patient(rng) -> Patient:
    return Patient(
        dx=rng.normal(0, 0.02), dy=rng.normal(0, 0.02), scale=rng.uniform(0.92, 1.05),
        heart_rx=rng.uniform(0.115, 0.135), lung_rx=rng.uniform(0.15, 0.17), lung_ry=rng.uniform(0.27, 0.31),
        rib_phase=rng.uniform(-0.015, 0.015), exposure=rng.normal(0, 0.03), contrast=rng.uniform(0.9, 1.15),
    )



# ---------------------------------------------------------------- geometry -------------------

def _smooth_mask(dist: np.ndarray, edge: float) -> np.ndarray:
    """1 inside (dist < 0), 0 outside, with a soft edge `edge` wide: anatomy has no hard edges."""
    return np.clip(0.5 - dist / edge, 0.0, 1.0)


def _ellipse_dist(x, y, cx, cy, rx, ry, power: float = 2.0):
    """Signed-ish distance (in units of the radii) to a superellipse's boundary."""
    return (np.abs((x - cx) / rx) ** power + np.abs((y - cy) / ry) ** power) ** (1 / power) - 1.0


def _gauss(x, y, cx, cy, sx, sy=None):
    sy = sx if sy is None else sy
    return np.exp(-(((x - cx) / sx) ** 2 + ((y - cy) / sy) ** 2) / 2)


def _lung_geometry(p: Patient, emphysema: bool):
    """Centres, radii and diaphragm levels of the right (image left) and left lungs."""
    grow = 1.08 if emphysema else 1.0
    rx, ry = p.lung_rx * grow, p.lung_ry * (1.1 if emphysema else 1.0)
    # Flattened, lower domes are the sign of hyperinflation.
    dome_r = 0.70 + (0.06 if emphysema else 0.0)
    dome_l = 0.73 + (0.06 if emphysema else 0.0)
    dome_height = 0.025 if emphysema else 0.055
    return {"right": (0.31, 0.47, rx, ry, dome_r, dome_height),
            "left": (0.69, 0.47, rx * 0.96, ry, dome_l, dome_height)}


def _zone_y(zone: str | None, dome: float) -> float:
    return 0.33 if zone == "upper" else dome - 0.12


def _film(p: Patient, height: int, width: int, torso_cy: float, torso_rx: float, torso_power: float,
          torso_density: float):
    """(x, y, torso, img): coordinates normalised to the patient's position and size in the film,
    the torso's mask, and the film's background with the torso drawn."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    x = (xs / width - 0.5 - p.dx) / p.scale + 0.5
    y = (ys / height - 0.5 - p.dy) / p.scale + 0.5
    img = np.full((height, width), 0.06, np.float32)
    torso = _smooth_mask(_ellipse_dist(x, y, 0.5, torso_cy, torso_rx, 0.62, torso_power), 0.04)
    img += torso_density * torso
    return x, y, torso, img


def _lung_mask(x, y, cx, cy, rx, ry, dome, dome_h, across_rx):
    """(mask, dome_y): a lung's soft mask, its outline cut by the diaphragm's dome, and the
    dome's height in every column."""
    across = np.clip((x - cx) / across_rx, -1, 1)
    dome_y = dome - dome_h * (1 - across**2)
    outline = _ellipse_dist(x, y, cx, cy, rx, ry, 2.4)
    return _smooth_mask(np.maximum(outline * 8, (y - dome_y) / 0.03), 0.6), dome_y


def _below_dome(y, dome_y):
    """Soft-tissue density under the diaphragm's dome (the abdomen)."""
    return _smooth_mask(-(y - dome_y) / 0.012, 1.0)




# ---------------------------------------------------------------- frontal ---------------------

def render_frontal(findings: list[Finding], p: Patient, height: int, width: int, rng) -> np.ndarray:
    """A PA chest film as floats in [0, 1] (bright = dense), drawn from `findings`."""
    x, y, torso, img = _film(p, height, width, torso_cy=0.62, torso_rx=0.47, torso_power=2.6, torso_density=0.42)
    emphysema = any(f.kind == "emphysema" for f in findings)
    lungs = _lung_geometry(p, emphysema)
    lung_masks, dome_ys = {}, {}
    for side, (cx, cy, rx, ry, dome, dome_h) in lungs.items():
        lung_masks[side], dome_ys[side] = _lung_mask(x, y, cx, cy, rx, ry, dome, dome_h, across_rx=rx)
    lung = np.maximum(lung_masks["right"], lung_masks["left"])
    img -= (0.30 + (0.06 if emphysema else 0.0)) * lung * torso
    # Hilar vessels.
    img += 0.07 * (_gauss(x, y, 0.41, 0.46, 0.05, 0.08) + _gauss(x, y, 0.59, 0.46, 0.05, 0.08)) * lung
    _draw_frontal_bones(img, x, y, p, torso)
    for f in findings:
        for side in (("right", "left") if f.side == "bilateral" else (f.side,)):
            if side is not None:
                _draw_frontal_finding(img, f, side, x, y, lungs[side], lung_masks[side], rng)
    img = _draw_frontal_heart(img, findings, p, x, y)
    # Diaphragm / abdomen below the domes.
    for side in lungs:
        half = (x < 0.5) if side == "right" else (x >= 0.5)
        below = _below_dome(y, dome_ys[side]) * half
        img += 0.16 * below * torso
    return img


def _draw_frontal_bones(img, x, y, p: Patient, torso) -> None:
    """Posterior ribs, clavicles, spine and mediastinum, added to `img` in place."""
    # Posterior ribs: arcs that fall laterally; brighter over the dark lungs.
    for k in range(10):
        base = 0.17 + 0.062 * k + p.rib_phase
        for sign in (-1, 1):
            lateral = np.clip(sign * (x - 0.5), 0, None)
            curve = base + 0.55 * lateral**2 + 0.02 * lateral
            band = _smooth_mask(np.abs(y - curve) - 0.009, 0.008) * (lateral > 0.04) * (y < 0.74)
            img += 0.09 * band * torso
    # Clavicles.
    for sign in (-1, 1):
        t = np.clip(sign * (x - 0.5), 0, 0.3)
        img += (0.16 * _smooth_mask(np.abs(y - (0.16 + 0.12 * t)) - 0.011, 0.01)
                * (np.abs(x - 0.5) < 0.32) * (np.abs(x - 0.5) > 0.04))
    # Spine and mediastinum.
    img += 0.22 * _smooth_mask(np.abs(x - 0.5) - 0.045, 0.02) * torso


def _draw_frontal_finding(img, f: Finding, side: str, x, y, lung_geometry, mask, rng) -> None:
    """One finding in one lung, added to `img` in place (cardiomegaly is the heart's, not here)."""
    cx, cy, rx, ry, dome, dome_h = lung_geometry
    lateral = np.clip((x - cx) / rx * (-1 if side == "right" else 1), 0, 1)
    if f.kind == "effusion":
        # Fluid fills the base and climbs laterally (a meniscus): the angle is blunted.
        level = dome - (0.09 if f.severity == "small" else 0.2)
        fluid = _smooth_mask((level - 0.1 * lateral**2) - y, 0.015) * np.clip(mask * 1.6, 0, 1)
        img += 0.30 * fluid
    elif f.kind == "opacity":
        zy = _zone_y(f.zone, dome)
        zx = cx + (0.02 * rng.standard_normal())
        img += 0.26 * _gauss(x, y, zx, zy, 0.06, 0.055) * mask
    elif f.kind == "granuloma":
        zy = _zone_y(f.zone, dome) + 0.04 * rng.standard_normal()
        zx = cx + 0.05 * rng.standard_normal()
        img += 0.55 * _gauss(x, y, zx, zy, 0.009)
    elif f.kind == "atelectasis":
        band_y = dome - 0.09 + 0.01 * rng.standard_normal()
        curve = band_y - 0.03 * lateral
        img += 0.22 * _smooth_mask(np.abs(y - curve) - 0.012, 0.01) * mask


def _draw_frontal_heart(img, findings: list[Finding], p: Patient, x, y) -> np.ndarray:
    """The heart: left of the midline (image right); cardiomegaly widens it."""
    heart_rx = p.heart_rx
    for f in findings:
        if f.kind == "cardiomegaly":
            heart_rx *= 1.45 if f.severity == "mild" else 1.7
    heart_cx = 0.525 + 0.35 * (heart_rx - p.heart_rx)
    heart = _smooth_mask(_ellipse_dist(x, y, heart_cx, 0.62, heart_rx, 0.13), 0.08)
    return np.maximum(img, (0.58 + 0.04 * heart) * heart + img * (1 - heart))


# ---------------------------------------------------------------- lateral ---------------------

def render_lateral(findings: list[Finding], p: Patient, height: int, width: int, rng) -> np.ndarray:
    """A lateral film (anterior on the image's left), drawn from `findings`."""
    x, y, torso, img = _film(p, height, width, torso_cy=0.6, torso_rx=0.4, torso_power=2.4, torso_density=0.45)
    emph = any(f.kind == "emphysema" for f in findings)
    dome = 0.72 + (0.06 if emph else 0.0)
    lung, dome_y = _lung_mask(x, y, 0.5, 0.47, 0.27 * (1.1 if emph else 1.0), p.lung_ry, dome,
                              0.03 if emph else 0.06, across_rx=0.3)
    img -= (0.28 + (0.06 if emph else 0.0)) * lung * torso
    # Sternum (anterior) and the vertebral column (posterior) with its disc spaces.
    img += 0.15 * _smooth_mask(np.abs(x - 0.19) - 0.015, 0.01) * (y > 0.2) * (y < 0.65)
    column = _smooth_mask(np.abs(x - 0.78) - 0.05, 0.02) * (y > 0.1)
    discs = 0.5 + 0.5 * np.cos(2 * np.pi * (y / 0.055 + p.rib_phase * 10))
    img += (0.2 + 0.08 * discs) * column * torso
    for f in findings:
        if f.kind == "effusion":
            # The posterior costophrenic sulcus fills first.
            level = dome - (0.08 if f.severity == "small" else 0.18)
            post = np.clip((x - 0.5) / 0.25, 0, 1)
            img += 0.28 * _smooth_mask((level - 0.1 * post**2) - y, 0.015) * np.clip(lung * 1.6, 0, 1) * (x > 0.35)
        elif f.kind == "opacity":
            zy = 0.33 if f.zone == "upper" else dome - 0.13
            img += 0.24 * _gauss(x, y, 0.55 + 0.03 * rng.standard_normal(), zy, 0.07, 0.06) * lung
        elif f.kind == "granuloma":
            zy = (0.33 if f.zone == "upper" else dome - 0.13) + 0.04 * rng.standard_normal()
            img += 0.5 * _gauss(x, y, 0.5 + 0.05 * rng.standard_normal(), zy, 0.009)
        elif f.kind == "atelectasis":
            img += 0.2 * _smooth_mask(np.abs(y - (dome - 0.09)) - 0.012, 0.01) * lung
    # Heart: anterior and low; cardiomegaly pushes it back.
    heart_rx = 0.14
    for f in findings:
        if f.kind == "cardiomegaly":
            heart_rx *= 1.35 if f.severity == "mild" else 1.55
    heart = _smooth_mask(_ellipse_dist(x, y, 0.3 + heart_rx * 0.6, 0.6, heart_rx, 0.14), 0.08)
    img = np.maximum(img, 0.6 * heart + img * (1 - heart))
    img += 0.18 * _below_dome(y, dome_y) * torso
    return img


# ---------------------------------------------------------------- film -----------------------

def _to_png_array(img: np.ndarray, p: Patient, rng) -> np.ndarray:
    """Exposure, film grain and a little blur, then 8-bit grayscale like images_normalized."""
    img = (img - 0.3) * p.contrast + 0.3 + p.exposure
    img = img + rng.normal(0, 0.012, img.shape).astype(np.float32)
    out = Image.fromarray(np.clip(img * 255, 0, 255).astype(np.uint8), "L")
    out = out.filter(ImageFilter.GaussianBlur(radius=max(0.6, img.shape[0] / 400)))
    return np.asarray(out)


def render(findings: list[Finding], view: str, patient: Patient, height: int, width: int, rng) -> np.ndarray:
    """An 8-bit grayscale film (H, W) for these findings and this view ("Frontal" or "Lateral")."""
    draw = render_frontal if view == "Frontal" else render_lateral
    return _to_png_array(draw(findings, patient, height, width, rng), patient, rng)
