"""What the evaluation's metrics read (`EvalInputs`: the real sets, the compared sets and their
features, the stage's settings) and what each returns (`Measured`: rows for the results table,
a per-image table, notes). Nothing a metric computes is written into the inputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from ..config.stages import EvalConfig
from .image_sets import ImageSet
from .memorisation import AuditBaseline


@dataclass(frozen=True)
class Embedded:
    """A compared set with its features from the evaluation's network."""

    images: ImageSet
    pool: torch.Tensor
    logits: torch.Tensor


@dataclass(frozen=True)
class EvalInputs:
    """What the metrics read."""

    cfg: EvalConfig
    net: nn.Module
    device: str
    real: ImageSet  # the whole test split (the audit and adherence use every film)
    real_features: torch.Tensor  # its pool features
    real_n: ImageSet  # the N test films FID and the rest compare with
    real_pool: torch.Tensor
    train: ImageSet | None  # the whole train split, when the audit or the floor needs it
    train_features: torch.Tensor | None  # its pool features, when the audit needs them
    compared: list[Embedded]  # the generated sets, then the real floor
    generated_all: list[ImageSet]  # every image of each generated set (adherence scores them all)
    kid_subset: int
    kid_std_meaningful: bool
    is_splits: int
    xrv_net: nn.Module | None  # the XRV DenseNet, when a metric the config names needs it and it loaded
    data_dir: Path
    cache_dir: Path
    progress: bool

    @property
    def generated(self) -> list[Embedded]:
        return self.compared[: len(self.generated_all)]

    def row(self, one: Embedded, metric: str, value, **extra) -> dict:
        """A results-table row for a compared set against the N real test films."""
        return {"set": one.images.name, "n_real": len(self.real_pool), "n_generated": len(one.pool),
                "feature_network": self.net.name, "metric": metric, "value": value, **extra}


@dataclass
class Measured:
    """What a metric returns: its rows of the results table, and where it has them a per-image
    table, notes, the real-image feature caches it read, and the audit's baseline."""

    rows: list[dict]
    table: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)
    cache_hits: list[str] = field(default_factory=list)
    audit_baseline: AuditBaseline | None = None
