"""One dataclass per stage, named presets, and a JSON round trip.

A stage's config is built from its defaults, then the preset's values for that stage, then
what the user passed. It is saved as JSON beside every artifact the stage writes, with the
library versions, so that any output says how it was made.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from .errors import CxrError
from .io import library_versions, read_json, write_json

SD15_MODEL_ID = "runwayml/stable-diffusion-v1-5"
CLIP_MAX_TOKENS = 77  # SD1.5's text encoder has 77 positions, start and end tokens included


@dataclass
class SynthConfig:
    """`synth`: a procedural dataset in the exact Kaggle layout."""

    STAGE: ClassVar[str] = "synth"
    out: str = "synthetic_data"
    reports: int = 400  # number of reports (the real data has 3,955)
    seed: int = 0
    image_size: int = 512  # typical long side of the PNGs in px (the real ones are ~2,000)
    broken_images: int = 2  # listed images made absent / truncated, to exercise prepare's checks


@dataclass
class TinyModelConfig:
    """`tiny-model`: a small SD-shaped pipeline in diffusers' on-disk layout."""

    STAGE: ClassVar[str] = "tiny_model"
    out: str = "tiny_model"
    seed: int = 0


@dataclass
class PrepareConfig:
    """`prepare`: Kaggle CSVs + PNGs -> pairs.csv, excluded.csv, summary.json."""

    STAGE: ClassVar[str] = "prepare"
    data_dir: str = ""  # "" = the Kaggle mount when on Kaggle
    out: str = "data"
    tokenizer: str = SD15_MODEL_ID  # hub id or local dir of a diffusers model (or a tokenizer dir)
    split: str = "patient"  # "patient": grouped by uid (no leak); "image": the seed's random split
    test_fraction: float = 0.2
    seed: int = 0
    projection: str = "both"  # both | frontal | lateral
    limit: int | None = None  # only the first N images (sorted by uid), for quick runs
    clean_prompts: bool = False  # strip XXXX marks, list numbers, stray punctuation
    max_tokens: int = CLIP_MAX_TOKENS
    workers: int = 8  # threads for the image header checks (I/O bound)


STAGE_CONFIGS = {cls.STAGE: cls for cls in (SynthConfig, TinyModelConfig, PrepareConfig)}


@dataclass
class Preset:
    """A named bundle of stage settings."""

    name: str
    description: str
    offline: bool  # True: synthetic data + tiny model are built under the output dir
    model: str  # hub id or local dir; "" = the tiny model built offline
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        name="smoke",
        description="offline demo: synthetic data in the Kaggle layout and a tiny SD-shaped "
        "model, seconds on a CPU",
        offline=True,
        model="",
        stages={"synth": {"reports": 80, "image_size": 320}},
    ),
    "sd15": Preset(
        name="sd15",
        description="the real thing: the Kaggle IU X-ray data and Stable Diffusion v1.5",
        offline=False,
        model=SD15_MODEL_ID,
        stages={},
    ),
}

C = TypeVar("C")


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise CxrError(
            f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}"
        ) from None


def stage_config(cls: type[C], preset: str | None = None, **overrides: Any) -> C:
    """Defaults, then the preset's values for this stage, then `overrides` (None = keep)."""
    values: dict[str, Any] = {}
    if preset:
        values.update(get_preset(preset).stages.get(cls.STAGE, {}))
    values.update({k: v for k, v in overrides.items() if v is not None})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise CxrError(f"{cls.__name__} has no setting {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    return cls(**values)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path, **extra: Any) -> Path:
    """Write `cfg` as JSON (atomically) with its stage name and the library versions."""
    payload = {"stage": cfg.STAGE, "config": config_to_dict(cfg), "versions": library_versions()}
    payload.update(extra)
    return write_json(path, payload)


def load_config(cls: type[C], path: str | Path) -> C:
    payload = read_json(path)
    if payload.get("stage") != cls.STAGE:
        raise CxrError(f"{path} holds a {payload.get('stage')!r} config, not a {cls.STAGE!r} one")
    return stage_config(cls, **payload["config"])
