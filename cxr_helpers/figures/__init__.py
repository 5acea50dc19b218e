"""Figures: how every stage draws (one figure per function, saved atomically), the data and
training plots, and the sets' colours."""

__all__ = ["plots", "style"]  # submodules: `from cxr_helpers.figures import plots`
