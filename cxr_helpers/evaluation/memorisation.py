"""The memorisation audit: is a generated film a near-copy of a training film?

Each generated image's nearest training and test image, by pixel correlation and by feature
cosine, is compared with a real baseline: how close real test films of other patients come to
the training films. A match closer than that baseline (and above the fixed thresholds) is
flagged; a test-image match is reported apart, since the model never saw those films.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .image_sets import ImageSet

AUDIT_BASELINE_SET = "audit baseline (real test vs train)"


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.double(), dim=1)


def _centred_pixels(images: torch.Tensor) -> torch.Tensor:
    """Unit-length, mean-centred pixels: their dot product is the Pearson correlation. float32:
    7,000 real films at 128 px stay under 0.5 GB."""
    flat = images[:, 0].reshape(len(images), -1).float()
    return torch.nn.functional.normalize(flat - flat.mean(1, keepdim=True), dim=1)


def nearest(images: torch.Tensor, features: torch.Tensor, ref_images: torch.Tensor,
            ref_features: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each image's nearest reference image by pixel correlation and by feature cosine."""
    px, ref_px = _centred_pixels(images), _centred_pixels(ref_images)
    corr_value, corr_index = [], []
    for start in range(0, len(px), 256):  # chunked: n x n_ref correlations
        value, index = (px[start:start + 256] @ ref_px.T).max(dim=1)
        corr_value.append(value)
        corr_index.append(index)
    cos_value, cos_index = (_unit(features) @ _unit(ref_features).T).max(dim=1)
    return {"pixel_correlation": torch.cat(corr_value), "pixel_index": torch.cat(corr_index),
            "feature_cosine": cos_value, "feature_index": cos_index}


@dataclass
class AuditBaseline:
    """How close real images of other patients come to the training images: each real test
    image's nearest training image. A generated image is flagged only when it is closer to a
    training image than `percentile` of these, and above the fixed thresholds too."""

    percentile: float
    pixel_correlation: float  # the percentile of the test images' nearest-train correlations
    feature_cosine: float
    n_test: int
    n_train: int
    closest_test: int  # the real test image closest to a training image (by pixels), for the figure
    closest_train: int
    closest_correlation: float
    pixel_threshold: float  # a similarity above max(the fixed threshold, the baseline's percentile) flags
    cosine_threshold: float


def audit_baseline(test: ImageSet, test_features: torch.Tensor, train: ImageSet, train_features: torch.Tensor,
                   pixel_threshold: float, cosine_threshold: float, percentile: float = 99.9) -> AuditBaseline:
    near = nearest(test.images, test_features, train.images, train_features)
    # "higher": an observed value, never interpolated below the largest; with fewer than 1,000 test
    # films the 99.9th percentile is their maximum, and a film only as close as that is not flagged.
    pixel = float(np.percentile(near["pixel_correlation"].numpy(), percentile, method="higher"))
    cosine = float(np.percentile(near["feature_cosine"].numpy(), percentile, method="higher"))
    top = int(near["pixel_correlation"].argmax())
    return AuditBaseline(percentile, pixel, cosine, len(test.images), len(train.images), top,
                         int(near["pixel_index"][top]), float(near["pixel_correlation"][top]),
                         max(pixel_threshold, pixel), max(cosine_threshold, cosine))


def audit(generated: ImageSet, gen_features: torch.Tensor, train: ImageSet, train_features: torch.Tensor,
          test: ImageSet, test_features: torch.Tensor, baseline: AuditBaseline) -> pd.DataFrame:
    """Each generated image's nearest training image and nearest test image, by pixel correlation
    and by feature cosine. A training-image match above the thresholds is possible memorisation
    (the model saw that film); a test-image match is reported apart: the model never saw it, so a
    near-copy there is chance or a duplicate film, not memorisation. The real images are patient data."""
    table = pd.DataFrame({"generated_file": generated.files, "prompt": generated.prompts})
    for split, image_set, features in (("train", train, train_features), ("test", test, test_features)):
        near = nearest(generated.images, gen_features, image_set.images, features)
        table[f"nearest_{split}_by_pixels"] = [image_set.files[i] for i in near["pixel_index"].tolist()]
        table[f"{split}_pixel_correlation"] = near["pixel_correlation"].numpy()
        table[f"nearest_{split}_by_features"] = [image_set.files[i] for i in near["feature_index"].tolist()]
        table[f"{split}_feature_cosine"] = near["feature_cosine"].numpy()
        table[f"flagged_{split}"] = ((table[f"{split}_pixel_correlation"] > baseline.pixel_threshold)
                                     | (table[f"{split}_feature_cosine"] > baseline.cosine_threshold))
        table[f"{split}_index"] = near["pixel_index"].numpy()
    return table
