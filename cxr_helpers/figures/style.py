"""How results look to a reader, in one place: a colour per image set (the same in every figure)
and, per metric, its place in tables, its name and which direction is better."""

from __future__ import annotations

# Real / base / fine-tuned keep their colour in every figure (bars, histograms, gallery captions).
SET_COLOURS = {"real": "#55a868", "base": "#4c72b0", "fine-tuned": "#dd8452"}
OTHER_COLOURS = ("#8172b2", "#937860", "#da8bc3", "#8c8c8c", "#ccb974", "#64b5cd")
MISSING = "–"  # a table cell for a metric a set has no value for (e.g. diversity of the real floor)


def set_kind(name: str) -> str | None:
    """'real', 'base' or 'fine-tuned' for a set name as the stages write them, else None."""
    low = name.lower()
    if low.startswith("real"):
        return "real"
    if low.startswith("base"):
        return "base"
    if low.startswith(("fine-tuned", "finetuned", "lora", "tuned")):
        return "fine-tuned"
    return None


def set_colours(names) -> list[str]:
    """A colour per set name: the fixed one for real/base/fine-tuned, others in turn."""
    others = iter(OTHER_COLOURS * 4)
    return [SET_COLOURS[set_kind(n)] if set_kind(n) else next(others) for n in names]


# (key, label, better): the order readers look at first: FID, FID-infinity, KID, IS, precision/
# recall, density/coverage, diversity, audit. better: "lower" or "higher".
METRICS_SHOWN = [
    # Grouped by family.
    ("fid", "FID", "lower"), ("fid_infinity", "FID∞", "lower"), ("fid_inf", "FID∞", "lower"),
    ("fid_xrv", "FID (XRV DenseNet)", "lower"), ("kid", "KID", "lower"),
    ("is", "Inception Score", "higher"),
    ("precision", "precision", "higher"), ("recall", "recall", "higher"),
    ("density", "density", "higher"), ("coverage", "coverage", "higher"),
    ("ms_ssim_within_prompt", "within-prompt MS-SSIM", "lower"),
    # The audit: counts and the real-vs-real baseline, last (a count, not a distribution distance).
    ("audit_train_matches", "memorisation flags (train matches)", "lower"),
    ("audit_test_matches", "test-image matches (not memorisation)", None),
    ("audit_baseline_pixel_correlation", "baseline pixel correlation", None),
    ("audit_baseline_feature_cosine", "baseline feature cosine", None),
    ("audit_flagged", "memorisation flags", "lower"),
]
ARROWS = {"lower": "↓", "higher": "↑"}
_INFO = {key: (label, better) for key, label, better in METRICS_SHOWN}


def metric_order(keys) -> list[str]:
    """The keys present, in reading order; unknown ones after the known ones, before the audit."""
    keys = list(dict.fromkeys(keys))
    known = [k for k, _, _ in METRICS_SHOWN if k in keys]
    unknown = [k for k in keys if k not in _INFO]
    audit = [k for k in known if is_audit(k)]
    return [k for k in known if not is_audit(k)] + unknown + audit


def is_audit(key: str) -> bool:
    """The memorisation audit's rows: counts and its baseline, not distances between sets."""
    return key.startswith("audit_")


def metric_label(key: str, arrow: bool = True) -> str:
    """'FID ↓', 'Inception Score ↑', ...: the reader's name and which way is better."""
    label, better = _INFO.get(key, (key, None))
    return f"{label} {ARROWS[better]}" if arrow and better else label


def better_note(key: str) -> str:
    better = _INFO.get(key, (key, None))[1]
    return f"{better} is better" if better else ""
