"""Figures read at a glance: captions end in an ellipsis, sets keep their colour, titles fit,
the results table reads in order with which way is better."""

import numpy as np
import pandas as pd
from matplotlib.colors import to_hex

from cxr_helpers.evaluation import result_figures
from cxr_helpers.evaluation.registry import metric_label, metric_order
from cxr_helpers.evaluation.stage import results_table
from cxr_helpers.figures import plots
from cxr_helpers.figures.style import SET_COLOURS, set_colours

LONG = ("1. Small right pleural effusion. 2. Right upper lobe opacity concerning for pneumonia. 3. Stable "
        "cardiomegaly with calcified granuloma in the left lower lobe and degenerative changes of the spine.")


def test_long_captions_end_in_an_ellipsis_not_mid_word():
    text = plots.caption(LONG, 34)
    lines = text.splitlines()
    assert len(lines) == plots.CAPTION_LINES and lines[-1].endswith("…")
    assert all(word in LONG.split() for line in lines for word in line.replace("…", "").split())
    assert plots.caption("Cardiomegaly.") == "Cardiomegaly."


def test_grid_captions_take_their_set_colour_and_the_title_clears_the_first_row(tmp_path):
    images = [np.zeros((16, 16), np.uint8)] * 4
    fig = plots.image_grid(images, [f"real | {LONG}", "base, seed 1", "fine-tuned, seed 1", "seed 7"], columns=4,
                           title="real vs base vs fine-tuned", save_to=tmp_path / "grid.png")
    titles = [ax.title for ax in fig.axes[:4]]
    assert [to_hex(t.get_color()) for t in titles] == [SET_COLOURS["real"], SET_COLOURS["base"],
                                                       SET_COLOURS["fine-tuned"], "#000000"]
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)  # pyplot closed the figure: lay it out again as the PNG was
    canvas.draw()
    renderer = canvas.get_renderer()
    suptitle = fig._suptitle.get_window_extent(renderer)
    assert all(suptitle.y0 >= t.get_window_extent(renderer).y1 for t in titles)  # no overlap


def test_every_set_keeps_its_colour_across_figures():
    assert set_colours(["base", "fine-tuned", "real train (floor)", "other"])[:3] == [
        SET_COLOURS["base"], SET_COLOURS["fine-tuned"], SET_COLOURS["real"]]
    table = pd.DataFrame({"set": ["fine-tuned", "base"] * 2, "metric": ["fid"] * 2 + ["kid"] * 2,
                          "value": [1.0, 2.0, 0.1, 0.2], "std": [None, None, 0.01, 0.02],
                          "ci_low": [0.5, 1.5, None, None], "ci_high": [1.5, 2.5, None, None],
                          "n_generated": [8] * 4, "feature_network": ["x"] * 4})
    fig = result_figures.metric_intervals(table)
    for ax in fig.axes[:2]:
        assert [to_hex(p.get_facecolor()) for p in ax.patches] == [SET_COLOURS["fine-tuned"], SET_COLOURS["base"]]
    assert fig.axes[0].get_title().startswith("FID ↓")
    diversity = pd.DataFrame({"set": ["fine-tuned", "base"] * 3, "prompt": ["a", "a", "b", "b", "c", "c"],
                              "images": [4] * 6, "ms_ssim": [0.1, 0.2, 0.15, 0.25, 0.12, 0.3]})
    fig = result_figures.diversity_per_prompt(diversity)
    ax = fig.axes[0]
    legend = {t.get_text().split(" (")[0]: to_hex(h.get_facecolor()) for t, h in
              zip(ax.get_legend().get_texts(), ax.get_legend().legend_handles, strict=True)}
    assert legend == {"fine-tuned": SET_COLOURS["fine-tuned"], "base": SET_COLOURS["base"]}
    assert "3 distinct prompts, 12 images per set" in ax.get_title()


def test_loss_axis_names_the_loss_that_was_logged():
    loss = pd.DataFrame({"step": [1, 2, 3], "loss": [0.3, 0.2, 0.1]})
    assert plots.loss_curve(loss).axes[0].get_ylabel() == "noise-prediction MSE"
    assert "min-SNR" in plots.loss_curve(loss, snr_gamma=5.0).axes[0].get_ylabel()


def test_results_table_reads_in_order_with_arrows_and_no_blank_cells():
    rows = []
    for s in ("base", "fine-tuned", "real train (floor)"):
        for m in ("audit_train_matches", "coverage", "fid", "is", "kid", "ms_ssim_within_prompt", "precision"):
            if s.startswith("real") and m in ("audit_train_matches", "ms_ssim_within_prompt"):
                continue
            rows.append({"set": s, "metric": m, "value": 0.5, "std": 0.1 if m in ("kid", "is") else None,
                         "ci_low": 0.4 if m == "fid" else None, "ci_high": 0.6 if m == "fid" else None,
                         "n_generated": 24, "feature_network": "x"})
    table = results_table(pd.DataFrame(rows))
    assert list(table.columns) == ["FID ↓", "KID ↓", "Inception Score ↑", "precision ↑", "coverage ↑",
                                   "within-prompt MS-SSIM ↓", "memorisation flags (train matches) ↓", "N"]
    assert list(table.index) == ["base", "fine-tuned", "real train (floor)"]
    assert (not table.isna().any().any()
            and table.loc["real train (floor)", "memorisation flags (train matches) ↓"] == "–")
    assert metric_order(["new_metric", "audit_train_matches", "fid"]) == ["fid", "new_metric", "audit_train_matches"]
    assert metric_label("new_metric") == "new_metric"
