"""The evaluation's figures: the metrics with their intervals, the memorisation audit's closest
pairs, within-prompt diversity and prompt adherence (each drawn as `figures.plots` draws, one
figure per function, saved when given a path)."""

from __future__ import annotations

import textwrap

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..figures.plots import finish, image_grid
from ..figures.style import SET_COLOURS, set_colours
from .registry import is_audit, metric_label, metric_order


def metric_intervals(table: pd.DataFrame, save_to=None):
    """One panel per metric, in reading order, titled with which way is better: a bar per set
    (each set in its colour in every panel) with its 95% interval (FID) or ± std (KID, IS)."""
    metrics = [m for m in metric_order(table["metric"]) if not is_audit(m)]  # counts: the audit's table and figure
    sets = list(dict.fromkeys(table["set"]))
    colour = dict(zip(sets, set_colours(sets), strict=True))
    cols = min(4, max(1, len(metrics)))
    rows = max(1, int(np.ceil(len(metrics) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.2 * rows + 0.8), squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, metric in zip(axes.flat, metrics, strict=False):
        ax.axis("on")
        part = table[table["metric"] == metric]
        values = part["value"].astype(float).to_numpy()
        low = np.where(part["ci_low"].notna(), values - part["ci_low"].astype(float),
                       part["std"].astype(float).fillna(0))
        high = np.where(part["ci_high"].notna(), part["ci_high"].astype(float) - values,
                        part["std"].astype(float).fillna(0))
        # FID's interval is centred on the estimate (jackknife), so the error bars are never negative.
        bars = ax.bar(range(len(part)), values,
                      yerr=[np.clip(np.nan_to_num(low), 0, None), np.clip(np.nan_to_num(high), 0, None)],
                      capsize=4, color=[colour[s] for s in part["set"]])
        ax.bar_label(bars, fmt="%.3g", fontsize=7, label_type="center")  # a zero bar still reads as 0
        ax.set_xticks(range(len(part)), [textwrap.shorten(s, 18, placeholder="…") for s in part["set"]],
                      rotation=20, ha="right")
        n = part["n_generated"].dropna()
        ax.set_title(metric_label(metric) + (f"  (N={int(n.max())})" if len(n) else ""))
    networks = sorted(set(table["feature_network"].dropna()))
    fig.suptitle("\n".join(textwrap.wrap("features: " + "; ".join(networks), 150)), fontsize=9)
    return finish(fig, save_to)


def nearest_pairs(audit: pd.DataFrame, sets: dict, train, test, baseline, top: int = 5, save_to=None):
    """The audit's baseline pair (the real test image closest to a training image) first, then the
    generated images closest to a real (patient) image, each beside that image."""
    images = [test.images[baseline.closest_test, 0].numpy(), train.images[baseline.closest_train, 0].numpy()]
    captions = [f"BASELINE real test (other patient): {test.files[baseline.closest_test]}",
                f"its nearest train image, r={baseline.closest_correlation:.3f}"]
    colours = [SET_COLOURS["real"]] * 2
    closest = audit.assign(best=audit[["train_pixel_correlation", "test_pixel_correlation"]].max(axis=1))
    for row in closest.sort_values("best", ascending=False).head(top).itertuples():
        image_set = sets[row.set]
        split = "train" if row.train_pixel_correlation >= row.test_pixel_correlation else "test"
        reference = train if split == "train" else test
        flag = getattr(row, f"flagged_{split}")
        images.append(image_set.images[image_set.files.index(row.generated_file), 0].numpy())
        images.append(reference.images[getattr(row, f"{split}_index"), 0].numpy())
        what = {"train": "MEMORISED? ", "test": "MATCHES A TEST FILM "}[split] if flag else ""
        captions += [f"{what}{row.set}: {row.generated_file}",
                     f"nearest real ({split}), r={getattr(row, f'{split}_pixel_correlation'):.3f}"]
        colours += [set_colours([row.set])[0], SET_COLOURS["real"]]
    title = (f"memorisation audit: {int(audit['flagged_train'].sum())} training-image matches (memorisation), "
             f"{int(audit['flagged_test'].sum())} test-image matches (not memorisation); flagged above "
             f"r {baseline.pixel_threshold:.3f} or cosine {baseline.cosine_threshold:.4f}\n(baseline: "
             f"{baseline.percentile:g}th percentile of {baseline.n_test} real test films vs {baseline.n_train} train "
             f"films: r {baseline.pixel_correlation:.3f}, cosine {baseline.feature_cosine:.4f}; "
             "real images are patient data)")
    return image_grid(images, captions, columns=4, save_to=save_to, title=title, colours=colours)


def diversity_per_prompt(diversity: pd.DataFrame, save_to=None):
    """Per set, how alike the images of one prompt are (mean pairwise MS-SSIM): bars side by
    side, each set in its colour, so no set hides another."""
    sets = list(dict.fromkeys(diversity["set"]))
    values = [diversity.loc[diversity["set"] == s, "ms_ssim"].to_numpy() for s in sets]
    every = np.concatenate(values) if values else np.array([0.0])
    low, high = float(every.min()), float(every.max())
    pad = max(0.02, 0.05 * (high - low))
    bins = np.linspace(max(0.0, low - pad), min(1.0, high + pad), 13)
    fig, ax = plt.subplots(figsize=(7, 3.4), layout="constrained")
    ax.hist(values, bins=bins, color=set_colours(sets),
            label=[f"{s} (mean {v.mean():.3f})" for s, v in zip(sets, values, strict=True)])
    ax.set_xlabel("mean pairwise MS-SSIM among the images of one prompt (lower = more diverse)")
    ax.set_ylabel("prompts")
    ax.yaxis.get_major_locator().set_params(integer=True)
    first = diversity[diversity["set"] == sets[0]] if sets else diversity
    # Sampled test pairs that share an impression are one prompt here: say so, or "5 prompts" of
    # 12 requested looks like a loss.
    ax.set_title(f"Within-prompt diversity: {len(first)} distinct prompts, "
                 f"{int(first['images'].sum())} images per set\n"
                 "(test pairs that share an impression are pooled into one prompt)", fontsize=10)
    ax.legend(frameon=False)
    return finish(fig, save_to)


def adherence_bars(adherence: pd.DataFrame, save_to=None):
    """Prompt adherence: per finding, the AUROC of each set (base / fine-tuned / real test) with
    its 95% interval, one panel per prompt group (all prompts; those seen word for word in
    training; the unseen ones); 0.5 (chance) drawn, 1 is perfect. Counts under each bar group."""
    findings = list(dict.fromkeys(adherence["finding"]))
    sets = list(dict.fromkeys(adherence["set"]))
    groups = [g for g in ("all", "seen", "unseen") if g in set(adherence["prompts"])]
    width = 0.8 / max(1, len(sets))
    fig, axes = plt.subplots(1, len(groups), figsize=(len(groups) * max(5.0, 0.6 * len(findings) * len(sets) + 1.5),
                                                      4.0), sharey=True, squeeze=False)
    colours = ["#4c72b0", "#dd8452", "#55a868", "#8172b2", "#c44e52"]
    for ax, group in zip(axes[0], groups, strict=True):
        rows = adherence[adherence["prompts"] == group]
        for k, name in enumerate(sets):
            part = rows[rows["set"] == name].set_index("finding").reindex(findings)
            x = np.arange(len(findings)) + (k - (len(sets) - 1) / 2) * width
            values = part["auroc"].astype(float).to_numpy()
            err = [np.nan_to_num(values - part["ci_low"].astype(float).to_numpy()),
                   np.nan_to_num(part["ci_high"].astype(float).to_numpy() - values)]
            ax.bar(x, np.nan_to_num(values), width, yerr=err, capsize=3, color=colours[k % len(colours)], label=name)
        ax.axhline(0.5, color="gray", linestyle="--", linewidth=1, label="chance (0.5)")
        labels = [finding + "\n" + " ".join(f"{int(r.positives)}+/{int(r.negatives)}-"
                                             for r in rows[rows["finding"] == finding].itertuples())
                  for finding in findings]
        ax.set_xticks(range(len(findings)), labels, fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{group} prompts" + {"seen": " (in the training captions)", "unseen": " (new to the LoRA)"}
                     .get(group, ""), fontsize=9)
    axes[0][0].set_ylabel("AUROC of the score vs the prompt's label")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    scorers = sorted(set(adherence["scorer"]))
    fig.suptitle(textwrap.fill("Prompt adherence per finding (higher = the films show what the prompt says); "
                               "scorer: " + "; ".join(scorers), 120), fontsize=9)
    return finish(fig, save_to)
