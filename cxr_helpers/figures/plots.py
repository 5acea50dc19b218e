"""Figures: each function draws one figure, saves it as PNG (atomically) when given a path, and
returns it, so a notebook cell that ends with the call shows it inline.

Figures are closed in pyplot right after drawing: the notebook shows the returned figure once
(not twice), and long runs do not pile figures up in memory.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import matplotlib

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..core.files import save_figure
from .style import SET_COLOURS, set_kind

matplotlib.rcParams.update({"figure.dpi": 100, "axes.spines.top": False, "axes.spines.right": False})


def finish(fig, save_to: str | Path | None):
    """The figure laid out, saved when given a path, and closed in pyplot (the caller shows it)."""
    if fig.get_layout_engine() is None:  # figures made with layout="constrained" place their suptitle themselves
        fig.tight_layout()
    if save_to:
        save_figure(fig, save_to)
    plt.close(fig)
    return fig


def exclusion_reasons(summary: dict, save_to=None):
    """Kept pairs and each exclusion reason, as counts of images."""
    counts = {"kept (pairs)": summary["pairs"], **summary["excluded_by_reason"]}
    fig, ax = plt.subplots(figsize=(7, 3))
    names = list(counts)
    values = [counts[n] for n in names]
    bars = ax.barh(names[::-1], values[::-1], color=["#4c72b0"] * (len(names) - 1) + ["#55a868"])
    ax.bar_label(bars, padding=3)
    ax.set_xlabel("images")
    ax.set_title(f"{summary['images_listed']} listed images: kept and excluded")
    return finish(fig, save_to)


def projection_mix(pairs: pd.DataFrame, save_to=None):
    counts = pairs.groupby(["split", "projection"]).size().unstack(fill_value=0)
    fig, ax = plt.subplots(figsize=(5, 3))
    counts.plot.bar(ax=ax, rot=0)
    ax.set_ylabel("pairs")
    ax.set_title("Projection mix per split")
    return finish(fig, save_to)


def token_lengths(n_tokens: pd.Series, limit: int = 77, save_to=None):
    """Histogram of prompt lengths in CLIP ids (start and end included), with the limit drawn."""
    n_tokens = n_tokens[n_tokens > 0]
    fig, ax = plt.subplots(figsize=(7, 3))
    top = max(int(n_tokens.max()) if len(n_tokens) else limit, limit) + 2
    ax.hist(n_tokens, bins=np.arange(0, top + 2, 2), color="#4c72b0")
    ax.axvline(limit, color="#c44e52", linestyle="--", label=f"CLIP limit: {limit} ids")
    over = int((n_tokens > limit).sum())
    ax.set_xlabel("prompt length (CLIP token ids, start and end included)")
    ax.set_ylabel("images")
    ax.set_title(f"Prompt lengths: median {n_tokens.median():.0f}, {over} over the limit (excluded)")
    ax.legend()
    return finish(fig, save_to)


def top_impressions(pairs: pd.DataFrame, n: int = 15, save_to=None):
    counts = pairs["prompt"].value_counts().head(n)
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(counts) + 1.2), layout="constrained")
    labels = [textwrap.shorten(p, 60, placeholder=" …") for p in counts.index[::-1]]
    ax.barh(labels, counts.values[::-1], color="#4c72b0")
    ax.set_xlabel("pairs")
    # A figure title: centred on the figure, it fits beside the long labels (an axes title ran off).
    fig.suptitle(f"The {len(counts)} most common impressions ({pairs['prompt'].nunique()} distinct)")
    return finish(fig, save_to)


def label_frequencies(counts: pd.Series, n: int = 15, save_to=None):
    counts = counts.head(n)
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(counts) + 1))
    ax.barh(counts.index[::-1], counts.values[::-1], color="#8172b2")
    ax.set_xlabel("reports")
    ax.set_title("MeSH major terms (a report can have several)")
    return finish(fig, save_to)


CAPTION_LINES = 4
_SET_PREFIX = re.compile(r"^\s*(real|base|fine-tuned|lora)\s*[,|:]", re.IGNORECASE)


def caption(text: str, width: int = 34, lines: int = CAPTION_LINES) -> str:
    """Wrapped to `lines` lines; a longer text ends in an ellipsis, not mid-word."""
    return textwrap.fill(text, width, max_lines=lines, placeholder=" …")


def caption_colour(text: str) -> str:
    """A caption naming its set first ("real | ...", "base, seed 3", "LoRA, ...") takes the set's colour."""
    match = _SET_PREFIX.match(text)
    return SET_COLOURS[set_kind(match.group(1))] if match else "black"


def image_grid(images, captions, columns: int = 4, save_to=None, title: str | None = None,
               panel_inches: float = 3.0, colours=None):
    """Grayscale images with their (wrapped, ellipsised) captions above them; captions that name
    a set (real / base / fine-tuned) are drawn in its colour, or in `colours` when given."""
    rows = max(1, int(np.ceil(len(images) / columns)))
    # Constrained layout keeps the suptitle clear of the first row's captions.
    fig, axes = plt.subplots(rows, columns, figsize=(panel_inches * columns, (panel_inches + 0.7) * rows + 0.4),
                             squeeze=False, layout="constrained")
    width = max(20, int(panel_inches * 11.5))  # characters per caption line at 8 pt
    for ax in axes.flat:
        ax.axis("off")
    colours = list(colours) if colours is not None else [caption_colour(c) for c in captions]
    for ax, im, text, colour in zip(axes.flat, images, captions, colours, strict=False):
        ax.imshow(np.asarray(im.convert("L") if hasattr(im, "convert") else im), cmap="gray", vmin=0, vmax=255)
        ax.set_title(caption(text, width), fontsize=8, color=colour)
    if title:
        fig.suptitle(caption(title, int(panel_inches * columns * 8), lines=2))
    return finish(fig, save_to)


def split_sizes(summary: dict, save_to=None):
    fig, axes = plt.subplots(1, 2, figsize=(7, 3))
    for ax, key, label in zip(axes, ("pairs_by_split", "patients_by_split"), ("pairs", "patients (uids)"), strict=True):
        values = summary[key]
        bars = ax.bar(list(values), list(values.values()), color=["#4c72b0", "#dd8452"])
        ax.bar_label(bars, padding=2)
        ax.margins(y=0.18)  # room for the bar labels under the panel title
        ax.set_title(label)
    fig.suptitle(f"{summary['split']} split: {summary['patients_on_both_sides']} patients on both sides")
    return finish(fig, save_to)


def loss_curve(loss: pd.DataFrame, save_to=None, smoothing: float = 0.9, snr_gamma: float | None = None):
    """Training loss per step, raw and smoothed (exponential moving average, bias-corrected).
    `snr_gamma`: the run's min-SNR gamma, so the axis names the loss that was logged."""
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(loss["step"], loss["loss"], color="#4c72b0", alpha=0.35, linewidth=1, label="loss")
    if len(loss):
        smooth = loss["loss"].ewm(alpha=1 - smoothing, adjust=True).mean()
        ax.plot(loss["step"], smooth, color="#4c72b0", linewidth=2, label=f"EMA ({smoothing})")
    ax.set_xlabel("step")
    ax.set_ylabel(f"min-SNR-weighted MSE (γ = {snr_gamma:g})" if snr_gamma else "noise-prediction MSE")
    ax.set_title(f"Training loss ({len(loss)} steps)")
    ax.legend()
    return finish(fig, save_to)
