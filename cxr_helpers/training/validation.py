"""Training's validation images: the prompts they show (reports naming a finding first) and the
grid of them drawn at the run's start and at every validation step."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..config.stages import TrainConfig
from ..models.generation import generate
from ..data.labels import findings_first
from ..data.tables import load_pairs


def default_validation_prompts(pairs: str | Path | pd.DataFrame, n: int = 4, data_dir=None) -> list[str]:
    """The most common test-split prompts (else train-split ones) of pairs.csv or its frame; with
    `data_dir`, the commonest prompt of a report naming each of GALLERY_FINDINGS and of a normal
    one come first."""
    if not isinstance(pairs, pd.DataFrame):
        pairs = load_pairs(pairs)
    pool = pairs[pairs["split"] == "test"] if (pairs["split"] == "test").any() else pairs
    common = pool["prompt"].value_counts()
    pool = pool.drop_duplicates("prompt").set_index("prompt").loc[common.index].reset_index()
    if data_dir is not None:
        pool = findings_first(pool, data_dir)
    return pool["prompt"].head(n).tolist()


def validation_grid(pipe, cfg: TrainConfig, prompts, out_path: Path, title: str,
                    lora_scale: float | None = None) -> Path:
    from ..figures import plots

    seeds = list(cfg.validation_seeds)
    images = generate(pipe, [p for p in prompts for _ in seeds], seeds * len(prompts), cfg.resolution,
                      cfg.validation_steps, lora_scale)
    captions = [f"seed {s} | {p}" for p in prompts for s in cfg.validation_seeds]
    plots.image_grid(images, captions, columns=len(cfg.validation_seeds),
                     save_to=out_path, title=title)
    return out_path
