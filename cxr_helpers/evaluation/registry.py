"""The evaluation's metrics by name: METRICS maps each name EvalConfig.metrics may hold to what
computes it, the rows it adds to the results table, and how each row's metric reads (its label
and which way is better; the tables and figures show them in METRICS' order, the audit last).

A metric reads `EvalInputs` and returns its rows. A per-set metric returns rows for one compared
set at a time (FID, KID, IS, PRDC: the table lists a set's metrics together); the others run once
over all sets and return `Measured`: rows, and a per-image table and notes where they have them
(diversity, audit, adherence).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from collections.abc import Callable

import pandas as pd

from . import adherence as adh
from . import embeddings
from .inputs import Embedded, EvalInputs, Measured
from .memorisation import AUDIT_BASELINE_SET, AuditBaseline, audit, audit_baseline
from .metrics import (diversity, fid_infinity, fid_interval, ms_ssim_scales, ms_ssim_window, prdc, torchmetrics_fid,
                      torchmetrics_is, torchmetrics_kid)

DIVERSITY_COLUMNS = ["set", "prompt", "images", "ms_ssim"]


def fid_rows(run: EvalInputs, one: Embedded) -> list[dict]:
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


def kid_rows(run: EvalInputs, one: Embedded) -> list[dict]:
    mean, std = torchmetrics_kid(run.real_pool, one.pool, run.kid_subset, run.cfg.seed, run.device)
    return [run.row(one, "kid", mean, std=std if run.kid_std_meaningful else None)]


def is_rows(run: EvalInputs, one: Embedded) -> list[dict]:
    if one.logits.shape[1] == 0:  # a network without logits (XRV) has no IS
        return []
    mean, std = torchmetrics_is(one.logits, run.is_splits, run.cfg.seed, run.device)
    return [run.row(one, "is", mean, std=std)]


def prdc_rows(run: EvalInputs, one: Embedded) -> list[dict]:
    return [run.row(one, metric, value) for metric, value in prdc(run.real_pool, one.pool, run.cfg.prdc_k).items()]


def diversity_rows(run: EvalInputs) -> Measured:
    rows, parts, notes = [], [], []
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
            notes.append(f"{name}: no prompt has 2+ images; sample with --n-per-prompt 2 or more for diversity")
    return Measured(rows, pd.concat(parts, ignore_index=True) if parts else None, notes)


def audit_rows(run: EvalInputs) -> Measured:
    if run.train is None:
        return Measured([])
    cfg = run.cfg
    baseline = audit_baseline(run.real, run.real_features, run.train, run.train_features,
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
    notes = [f"audit baseline: with {baseline.n_test} real test images the {baseline.percentile:g}th "
             "percentile of their nearest-train similarities is their maximum (a finer percentile needs "
             f"{math.ceil(100 / (100 - baseline.percentile))} or more)"
             ] if baseline.n_test * (1 - baseline.percentile / 100) < 1 else []
    return Measured(rows, pd.concat(parts, ignore_index=True), notes, audit_baseline=baseline)


def xrv_rows(run: EvalInputs) -> Measured:
    """FID on the XRV DenseNet's features (RoentGen's domain FID); none when the network is not to
    be had (the stage notes why)."""
    xrv_net = run.xrv_net
    if xrv_net is None:
        return Measured([])
    cfg = run.cfg
    x_real, _, hit = embeddings.cached_embed(xrv_net, run.real_n, run.cache_dir, cfg.batch_size, run.progress)
    rows = []
    for one in run.compared:
        name = one.images.name
        x_pool, _ = embeddings.embed(xrv_net, one.images.images, cfg.batch_size, f"xrv: {name}", run.progress)
        rows.append({"set": name, "metric": "fid_xrv", "value": torchmetrics_fid(x_real, x_pool, run.device),
                     "n_real": len(x_real), "n_generated": len(x_pool), "feature_network": xrv_net.name})
    return Measured(rows, cache_hits=[hit] if hit else [])


def adherence_rows(run: EvalInputs) -> Measured:
    cfg = run.cfg
    if cfg.adherence_scorer == "xrv":
        if run.xrv_net is None:
            return Measured([])
        scorer = adh.XRVClassifier(features=run.xrv_net)
    else:
        scorer = adh.SCORERS[cfg.adherence_scorer]()
    table, notes = adh.prompt_adherence(cfg, scorer, [(one.name, one) for one in run.generated_all], run.real,
                                        run.data_dir, run.progress)
    # metrics.csv holds every image's AUROC; adherence.csv the seen and unseen prompts' apart too.
    return Measured([{"set": row.set, "metric": f"auroc_{row.finding.lower().replace(' ', '_')}", "value": row.auroc,
             "ci_low": row.ci_low, "ci_high": row.ci_high, "n_generated": row.images, "feature_network": row.scorer}
            for row in table.itertuples() if row.prompts == "all"], table, notes)


@dataclass(frozen=True)
class Shown:
    """How a row's metric reads: its name for readers, and which way is better (None: neither)."""

    key: str
    label: str
    better: str | None = None  # "lower" or "higher"


@dataclass(frozen=True)
class Metric:
    """What computes a metric: rows for one compared set at a time (per_set), or rows over all
    sets at once; and how the rows it makes read."""

    rows: Callable
    per_set: bool
    shows: tuple[Shown, ...] = ()


# The results table lists the per-set metrics of each set together, then the others, in this order.
METRICS = {
    "fid": Metric(fid_rows, per_set=True, shows=(  # with its jackknife interval and FID at infinite N
        Shown("fid", "FID", "lower"), Shown("fid_infinity", "FID∞", "lower"))),
    "kid": Metric(kid_rows, per_set=True, shows=(Shown("kid", "KID", "lower"),)),
    "is": Metric(is_rows, per_set=True, shows=(Shown("is", "Inception Score", "higher"),)),
    "prdc": Metric(prdc_rows, per_set=True, shows=tuple(  # precision, recall, density, coverage
        Shown(key, key, "higher") for key in ("precision", "recall", "density", "coverage"))),
    "diversity": Metric(diversity_rows, per_set=False, shows=(  # within-prompt MS-SSIM of each generated set
        Shown("ms_ssim_within_prompt", "within-prompt MS-SSIM", "lower"),)),
    # memorisation: nearest training film, with a real baseline; counts, shown after the distances
    "audit": Metric(audit_rows, per_set=False, shows=(
        Shown("audit_train_matches", "memorisation flags (train matches)", "lower"),
        Shown("audit_test_matches", "test-image matches (not memorisation)"),
        Shown("audit_baseline_pixel_correlation", "baseline pixel correlation"),
        Shown("audit_baseline_feature_cosine", "baseline feature cosine"))),
    "xrv": Metric(xrv_rows, per_set=False, shows=(  # FID on torchxrayvision's DenseNet features
        Shown("fid_xrv", "FID (XRV DenseNet)", "lower"),)),
    "adherence": Metric(adherence_rows, per_set=False),  # auroc_<finding> per finding, by the adherence scorer
}
SHOWN = {shown.key: shown for metric in METRICS.values() for shown in metric.shows}
ARROWS = {"lower": "↓", "higher": "↑"}


@dataclass
class Measurements:
    """Every metric's rows, in the results table's order, and what the metrics returned beside them."""

    rows: list[dict] = field(default_factory=list)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)  # per-image tables by metric name
    notes: list[str] = field(default_factory=list)
    cache_hits: list[str] = field(default_factory=list)
    audit_baseline: AuditBaseline | None = None


def measure(run: EvalInputs) -> Measurements:
    """The rows of every metric the config names (each set's per-set metrics, then the others),
    with the tables, notes and cache hits they returned."""
    wanted = {name: metric for name, metric in METRICS.items() if name in run.cfg.metrics}
    out = Measurements([row for one in run.compared for metric in wanted.values() if metric.per_set
                        for row in metric.rows(run, one)])
    for name, metric in wanted.items():
        if metric.per_set:
            continue
        measured = metric.rows(run)
        out.rows += measured.rows
        out.notes += measured.notes
        out.cache_hits += measured.cache_hits
        if measured.table is not None:
            out.tables[name] = measured.table
        out.audit_baseline = measured.audit_baseline or out.audit_baseline
    return out


def is_audit(key: str) -> bool:
    """The memorisation audit's rows: counts and its baseline, not distances between sets."""
    return key.startswith("audit_")


def metric_order(keys) -> list[str]:
    """The keys present, in reading order (METRICS'); unknown ones after the known ones, before the audit."""
    keys = list(dict.fromkeys(keys))
    known = [k for k in SHOWN if k in keys]
    unknown = [k for k in keys if k not in SHOWN]
    return [k for k in known if not is_audit(k)] + unknown + [k for k in known if is_audit(k)]


def metric_label(key: str, arrow: bool = True) -> str:
    """'FID ↓', 'Inception Score ↑', ...: the reader's name and which way is better."""
    shown = SHOWN.get(key, Shown(key, key))
    return f"{shown.label} {ARROWS[shown.better]}" if arrow and shown.better else shown.label
