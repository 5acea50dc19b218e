"""How image sets look to a reader, in one place: a colour per set (the same in every figure and
caption), and the mark of a table cell a set has no value for. How each metric reads (its name,
its place, which way is better) is declared with the metric, in evaluation/registry.py."""

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
