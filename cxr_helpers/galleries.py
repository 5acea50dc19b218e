"""The figures made by sampling: real vs base vs fine-tuned, LoRA-scale sweeps, seed grids,
base-vs-LoRA grids and the validation grids that training draws at its checkpoints.

Every image comes from `sample.generate` with explicit seeds, so a figure is the same on every
device and batch size. matplotlib is imported by the figure functions only, as everywhere in
the package: importing the training stage does not load it.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .config import TrainConfig
from .sample import generate, image_seed, load_sampling_pipeline, upscale_image


# ---------------------------------------------------------------- sampling galleries ---------

# Findings a gallery shows first, when the reports carry labels: the ones the demo's films draw
# and its geometry oracle measures, and two of the commonest in the real collection.
GALLERY_FINDINGS = ("Cardiomegaly", "Effusion")


def findings_first(pairs: pd.DataFrame, data_dir, findings=GALLERY_FINDINGS) -> pd.DataFrame:
    """The pairs with, first, one report per finding (the first in their order whose report's
    MeSH / Problems name it) and one normal report, then the rest: so that a short gallery shows
    what the fine-tune should change. Unchanged when the reports carry no labels."""
    from .adherence import report_labels
    from .data import read_tables

    reports = read_tables(data_dir)[0] if data_dir is not None else pd.DataFrame()
    if not ({"MeSH", "Problems"} & set(reports.columns)):
        return pairs
    labels = report_labels(reports).reindex(pairs["uid"].astype(int).to_numpy()).fillna(False)
    labels.index = pairs.index
    picks = []
    for finding in findings:
        having = labels.index[labels[finding]] if finding in labels else []
        picks += [i for i in having if i not in picks][:1]
    normal = labels.index[~labels.any(axis=1)]
    picks += [i for i in normal if i not in picks][:1]
    return pd.concat([pairs.loc[picks], pairs.drop(index=picks)])


def real_images(pairs_csv, data_dir, n: int, split: str = "test", resolution: int = 128, seed: int = 0,
                cache_dir=None, frontal_only: bool = True, findings=GALLERY_FINDINGS):
    """n (image, prompt) pairs of the split, one per report (frontal films when asked), the
    reports naming `findings` first (findings_first)."""
    from .data import load_pairs
    from .dataset import ChestXrayDataset

    pairs = load_pairs(pairs_csv, split)
    if frontal_only and "projection" in pairs and (pairs["projection"] == "Frontal").any():
        pairs = pairs[pairs["projection"] == "Frontal"]
    pairs = pairs.drop_duplicates("uid").sample(frac=1.0, random_state=seed)
    pairs = findings_first(pairs, data_dir, findings).head(n).reset_index(drop=True)
    dataset = ChestXrayDataset(pairs, data_dir, resolution, cache_dir=cache_dir)
    return [dataset.load_image(i) for i in range(len(dataset))], pairs["prompt"].tolist()


def comparison_gallery(pipe, real, prompts, seed: int = 0, resolution: int = 128, steps: int = 20,
                       upscale: int = 512, save_to=None, save_upscaled_to=None):
    """Rows of (real, base, fine-tuned) for the same prompt and seed, at 128 px and upscaled."""
    from . import plots

    seeds = [image_seed(seed, i, 0) for i in range(len(prompts))]
    base = generate(pipe, prompts, seeds, resolution, steps, lora_scale=0.0)
    tuned = generate(pipe, prompts, seeds, resolution, steps, lora_scale=1.0)
    images, captions = [], []
    for i, prompt in enumerate(prompts):
        images += [real[i], base[i], tuned[i]]
        captions += [f"real | {prompt}", f"base, seed {seeds[i]}", f"fine-tuned, seed {seeds[i]}"]
    small = plots.image_grid(images, captions, columns=3, save_to=save_to,
                             title=f"real vs base vs fine-tuned at {resolution} px")
    big = None
    if upscale:
        up = [upscale_image(im, upscale) for im in images]
        big = plots.image_grid(up, captions, columns=3, save_to=save_upscaled_to,
                               title=f"the same, upscaled to {upscale} px (Lanczos)", panel_inches=4)
    return small, big


def lora_scale_sweep(pipe, prompt: str, seed: int = 0, scales=(0.0, 0.25, 0.5, 0.75, 1.0), resolution: int = 128,
                     steps: int = 20, save_to=None):
    from . import plots

    images = [generate(pipe, [prompt], [seed], resolution, steps, lora_scale=s)[0] for s in scales]
    return plots.image_grid(images, [f"LoRA scale {s}" for s in scales], columns=len(scales), save_to=save_to,
                            title=prompt)


def seed_grid(pipe, prompt: str, seeds=range(8), resolution: int = 128, steps: int = 20, lora_scale: float | None = 1.0,
              save_to=None):
    from . import plots

    seeds = list(seeds)
    images = generate(pipe, [prompt] * len(seeds), seeds, resolution, steps, lora_scale=lora_scale)
    return plots.image_grid(images, [f"seed {s}" for s in seeds], columns=min(4, len(seeds)), save_to=save_to,
                            title=prompt)


# ---------------------------------------------------------------- training figures -----------

def base_vs_lora_grid(model: str, lora_dir: str | Path, prompts, seeds, resolution: int = 128, steps: int = 20,
                      save_to: str | Path | None = None):
    """For each prompt and seed: the base model (LoRA scale 0) beside the fine-tuned one, loaded
    the way any diffusers user would (`load_lora_weights`)."""
    from . import plots

    pipe = load_sampling_pipeline(model, lora_dir)
    seeds = list(seeds)
    every_prompt = [p for p in prompts for _ in seeds]
    base = generate(pipe, every_prompt, seeds * len(prompts), resolution, steps, lora_scale=0.0)
    tuned = generate(pipe, every_prompt, seeds * len(prompts), resolution, steps, lora_scale=1.0)
    images, captions = [], []
    for i, prompt in enumerate(prompts):
        for j, seed in enumerate(seeds):
            k = i * len(seeds) + j
            images += [base[k], tuned[k]]
            captions += [f"base, seed {seed} | {prompt}", f"LoRA, seed {seed} | {prompt}"]
    return plots.image_grid(images, captions, columns=2 * len(seeds), save_to=save_to,
                            title="base model (LoRA scale 0) vs fine-tuned, same seeds")


def default_validation_prompts(pairs: str | Path | pd.DataFrame, n: int = 4, data_dir=None) -> list[str]:
    """The most common test-split prompts (else train-split ones) of pairs.csv or its frame; with
    `data_dir`, the commonest prompt of a report naming each of GALLERY_FINDINGS and of a normal
    one come first."""
    from .data import load_pairs

    if not isinstance(pairs, pd.DataFrame):
        pairs = load_pairs(pairs)
    pool = pairs[pairs["split"] == "test"] if (pairs["split"] == "test").any() else pairs
    common = pool["prompt"].value_counts()
    pool = pool.drop_duplicates("prompt").set_index("prompt").loc[common.index].reset_index()
    if data_dir is not None:
        pool = findings_first(pool, data_dir)
    return pool["prompt"].head(n).tolist()


def validation_grid(pipe, cfg: TrainConfig, prompts, out_path: Path, title: str, lora_scale: float | None = None) -> Path:
    from . import plots

    seeds = list(cfg.validation_seeds)
    images = generate(pipe, [p for p in prompts for _ in seeds], seeds * len(prompts), cfg.resolution,
                      cfg.validation_steps, lora_scale)
    captions = [f"seed {s} | {p}" for p in prompts for s in cfg.validation_seeds]
    plots.image_grid(images, captions, columns=len(cfg.validation_seeds),
                     save_to=out_path, title=title)
    return out_path
