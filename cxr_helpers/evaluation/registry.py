"""The evaluation's metrics by name: METRICS maps each name EvalConfig.metrics may hold to what
computes it, and the rows it adds to the results table.

A metric reads an `EvalRun`: the real test images and their features, the compared sets (the
generated ones, then the real floor) with theirs, and the stage's settings. A per-set metric
adds rows for one compared set at a time (FID, KID, IS, PRDC: the table lists a set's metrics
together); the others run once over all sets and may keep a per-image table beside their rows
(diversity, audit, adherence).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
from torch import nn

from . import adherence as adh
from . import image_sets
from ..config.stages import EvalConfig
from .features import load_xrv
from .image_sets import ImageSet
from .memorisation import AUDIT_BASELINE_SET, AuditBaseline, audit, audit_baseline
from .metrics import (diversity, fid_infinity, fid_interval, ms_ssim_scales, ms_ssim_window, prdc, torchmetrics_fid,
                      torchmetrics_is, torchmetrics_kid)

DIVERSITY_COLUMNS = ["set", "prompt", "images", "ms_ssim"]


@dataclass
class Embedded:
    """A compared set with its features from the evaluation's network."""

    images: ImageSet
    pool: torch.Tensor
    logits: torch.Tensor


@dataclass
class EvalRun:
    """What the metrics read, and the per-image tables and notes they leave."""

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
    n_generated: int
    kid_subset: int
    kid_std_meaningful: bool
    is_splits: int
    data_dir: Path
    cache_dir: Path
    notes: list[str]
    cache_hits: list[str]
    progress: bool
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    audit_baseline: AuditBaseline | None = None

    @property
    def generated(self) -> list[Embedded]:
        return self.compared[: self.n_generated]

    @functools.cached_property
    def xrv_net(self):
        """The XRV DenseNet, loaded by the first metric that needs it; None (with a note) when it cannot be had."""
        wants = self.cfg.metrics
        purposes = [what for what, wanted in (("FID", "xrv" in wants), ("prompt adherence", (
            "adherence" in wants and self.cfg.adherence_scorer == "xrv"))) if wanted]
        return load_xrv(self.cfg, self.device, self.notes, " and ".join(purposes))

    def row(self, one: Embedded, metric: str, value, **extra) -> dict:
        """A results-table row for a compared set against the N real test films."""
        return {"set": one.images.name, "n_real": len(self.real_pool), "n_generated": len(one.pool),
                "feature_network": self.net.name, "metric": metric, "value": value, **extra}


def fid_rows(run: EvalRun, one: Embedded) -> list[dict]:
    value = torchmetrics_fid(run.real_pool, one.pool, run.device)
    # The jackknife's and FID-infinity's dozens of FIDs run where the metric arithmetic does.
    on_device = run.real_pool.to(run.device), one.pool.to(run.device)
    low, high = (fid_interval(*on_device, run.cfg.interval_groups, run.cfg.seed) if run.cfg.interval_groups
                 else (None, None))
    if low is not None:  # centred on our own FID, equal to torchmetrics' to ~1e-6: re-centred on this one
        half = (high - low) / 2
        low, high = value - half, value + half
    return [run.row(one, "fid", value, ci_low=low, ci_high=high),
            run.row(one, "fid_infinity", fid_infinity(*on_device, seed=run.cfg.seed))]


def kid_rows(run: EvalRun, one: Embedded) -> list[dict]:
    mean, std = torchmetrics_kid(run.real_pool, one.pool, run.kid_subset, run.cfg.seed, run.device)
    return [run.row(one, "kid", mean, std=std if run.kid_std_meaningful else None)]


def is_rows(run: EvalRun, one: Embedded) -> list[dict]:
    if one.logits.shape[1] == 0:  # a network without logits (XRV) has no IS
        return []
    mean, std = torchmetrics_is(one.logits, run.is_splits, run.cfg.seed, run.device)
    return [run.row(one, "is", mean, std=std)]


def prdc_rows(run: EvalRun, one: Embedded) -> list[dict]:
    return [run.row(one, metric, value) for metric, value in prdc(run.real_pool, one.pool, run.cfg.prdc_k).items()]


def diversity_rows(run: EvalRun) -> list[dict]:
    rows, parts = [], []
    for one in run.generated:
        name = one.images.name
        table, size = diversity(one.images), one.images.images.shape[-1]
        table.insert(0, "set", name)
        parts.append(table)
        if len(table):
            rows.append({"set": name, "metric": "ms_ssim_within_prompt", "value": float(table["ms_ssim"].mean()),
                         "std": float(table["ms_ssim"].std()) if len(table) > 1 else None,
                         "n_generated": int(table["images"].sum()),
                         "feature_network": f"pixels (MS-SSIM, {ms_ssim_window(size)} px window, "
                                            f"{ms_ssim_scales(size)} scales)"})
        else:
            run.notes.append(f"{name}: no prompt has 2+ images; sample with --n-per-prompt 2 or more for diversity")
    if parts:
        run.tables["diversity"] = pd.concat(parts, ignore_index=True)
    return rows


def audit_rows(run: EvalRun) -> list[dict]:
    if run.train is None:
        return []
    cfg = run.cfg
    baseline = run.audit_baseline = audit_baseline(run.real, run.real_features, run.train, run.train_features,
                                                   cfg.audit_pixel_threshold, cfg.audit_cosine_threshold,
                                                   cfg.audit_percentile)
    base_row = {"set": AUDIT_BASELINE_SET, "n_real": baseline.n_train, "n_generated": baseline.n_test,
                "feature_network": run.net.name}
    rows = [{**base_row, "metric": "audit_baseline_pixel_correlation", "value": baseline.pixel_correlation,
             "feature_network": f"pixels (Pearson correlation, {cfg.resolution} px)"},
            {**base_row, "metric": "audit_baseline_feature_cosine", "value": baseline.feature_cosine}]
    parts = []
    for one in run.generated:
        name = one.images.name
        table = audit(one.images, one.pool, run.train, run.train_features, run.real, run.real_features, baseline)
        table.insert(0, "set", name)
        parts.append(table)
        counts = {"n_generated": len(table), "feature_network": run.net.name}
        rows.append({"set": name, "metric": "audit_train_matches", "value": int(table["flagged_train"].sum()),
                     "n_real": baseline.n_train, **counts})
        rows.append({"set": name, "metric": "audit_test_matches", "value": int(table["flagged_test"].sum()),
                     "n_real": baseline.n_test, **counts})
    run.tables["audit"] = pd.concat(parts, ignore_index=True)
    if baseline.n_test * (1 - baseline.percentile / 100) < 1:
        run.notes.append(f"audit baseline: with {baseline.n_test} real test images the {baseline.percentile:g}th "
                         "percentile of their nearest-train similarities is their maximum (a finer percentile needs "
                         f"{math.ceil(100 / (100 - baseline.percentile))} or more)")
    return rows


def xrv_rows(run: EvalRun) -> list[dict]:
    """FID on the XRV DenseNet's features (RoentGen's domain FID), skipped with a note when it is not to be had."""
    xrv_net = run.xrv_net
    if xrv_net is None:
        return []
    cfg = run.cfg
    x_real, _ = image_sets.cached_embed(xrv_net, run.real_n, run.cache_dir, cfg.batch_size, run.progress,
                                        run.cache_hits)
    rows = []
    for one in run.compared:
        name = one.images.name
        x_pool, _ = image_sets.embed(xrv_net, one.images.images, cfg.batch_size, f"xrv: {name}", run.progress)
        rows.append({"set": name, "metric": "fid_xrv", "value": torchmetrics_fid(x_real, x_pool, run.device),
                     "n_real": len(x_real), "n_generated": len(x_pool), "feature_network": xrv_net.name})
    return rows


def adherence_rows(run: EvalRun) -> list[dict]:
    cfg = run.cfg
    if cfg.adherence_scorer == "xrv":
        if run.xrv_net is None:
            return []
        scorer = adh.XRVClassifier(features=run.xrv_net)
    else:
        scorer = adh.SCORERS[cfg.adherence_scorer]()
    table = run.tables["adherence"] = adh.prompt_adherence(
        cfg, scorer, [(one.name, one) for one in run.generated_all], run.real, run.data_dir, run.notes,
        run.progress)
    return [{"set": row.set, "metric": f"auroc_{row.finding.lower().replace(' ', '_')}", "value": row.auroc,
             "ci_low": row.ci_low, "ci_high": row.ci_high, "n_generated": row.images, "feature_network": row.scorer}
            for row in table.itertuples()]


@dataclass(frozen=True)
class Metric:
    """What computes a metric: rows for one compared set at a time (per_set), or rows over all sets at once."""

    rows: Callable
    per_set: bool


# The results table lists the per-set metrics of each set together, then the others, in this order.
METRICS = {
    "fid": Metric(fid_rows, per_set=True),  # with its jackknife interval and FID at infinite N
    "kid": Metric(kid_rows, per_set=True),
    "is": Metric(is_rows, per_set=True),
    "prdc": Metric(prdc_rows, per_set=True),  # precision, recall, density, coverage
    "diversity": Metric(diversity_rows, per_set=False),  # within-prompt MS-SSIM of each generated set
    "audit": Metric(audit_rows, per_set=False),  # memorisation: nearest training film, with a real baseline
    "xrv": Metric(xrv_rows, per_set=False),  # FID on torchxrayvision's DenseNet features
    "adherence": Metric(adherence_rows, per_set=False),  # AUROC per finding, by the adherence scorer
}


def metric_rows(run: EvalRun) -> list[dict]:
    """The rows of every metric the config names: each set's per-set metrics, then the others."""
    wanted = [metric for name, metric in METRICS.items() if name in run.cfg.metrics]
    rows = [row for one in run.compared for metric in wanted if metric.per_set for row in metric.rows(run, one)]
    for metric in wanted:
        if not metric.per_set:
            rows += metric.rows(run)
    return rows
