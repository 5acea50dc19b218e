"""Figures: the plots every stage draws, and their colours and labels."""

__all__ = ["plots", "style"]  # submodules: `from cxr_helpers.figures import plots`
