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


LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")  # the UNet's attention projections


@dataclass
class TrainConfig:
    """`train`: LoRA on the UNet, VAE and text encoder frozen, on cached latents and embeddings."""

    STAGE: ClassVar[str] = "train"
    pairs: str = ""  # pairs.csv from prepare (its train split is used)
    data_dir: str = ""  # the dataset folder the pairs point into ("" = the Kaggle mount on Kaggle)
    model: str = SD15_MODEL_ID  # hub id or local diffusers dir
    out: str = "train"
    cache_dir: str = ""  # "" = OUT/cache; latents and text embeddings, reused across runs
    resolution: int = 128
    fit: str = "stretch"  # stretch (the seed) | pad | crop
    batch_size: int = 4  # per process (per GPU)
    grad_accum: int = 1
    max_steps: int = 1000  # optimizer steps
    epochs: float | None = None  # if set, overrides max_steps
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"  # any diffusers.optimization name: constant, cosine, linear...
    lr_warmup_steps: int = 0
    rank: int = 4
    alpha: float | None = None  # None = rank (scale 1)
    target_modules: tuple[str, ...] = LORA_TARGETS
    lora_dropout: float = 0.0
    mixed_precision: str = "no"  # no | fp16 | bf16
    snr_gamma: float | None = None  # min-SNR weighting (5.0 is the usual value)
    noise_offset: float = 0.0
    prediction_type: str = ""  # "" = the scheduler's (SD1.5: epsilon) | epsilon | v_prediction
    gradient_checkpointing: bool = False
    random_flip: bool = False  # both flips are cached, so flipping costs nothing per step
    seed: int = 0
    max_grad_norm: float = 1.0
    weight_decay: float = 1e-2
    checkpoint_every: int = 500  # steps; 0 = only at the end
    keep_checkpoints: int = 2
    resume: str = ""  # "" | latest | a checkpoint dir
    validation_every: int = 0  # steps; 0 = with every checkpoint (and at the end)
    validation_prompts: tuple[str, ...] = ()  # () = the most common test-split prompts
    validation_seeds: tuple[int, ...] = (0, 1)
    validation_steps: int = 20  # sampler steps for validation images


@dataclass
class SampleConfig:
    """`sample`: prompts -> PNGs + metadata.csv."""

    STAGE: ClassVar[str] = "sample"
    model: str = SD15_MODEL_ID
    lora: str = ""  # a LoRA folder (train's OUT/lora); "" = the base model alone
    out: str = "samples"
    prompts_file: str = ""  # one prompt per line
    pairs: str = ""  # or: the prompts of a pairs.csv split
    split: str = "test"
    n_per_prompt: int = 1
    steps: int = 20
    scheduler: str = "dpm++"
    guidance: float = 7.5
    negative_prompt: str = ""
    lora_scale: float = 1.0
    batch_size: int = 8
    seed: int = 0
    resolution: int = 128
    upscale: int = 0  # also write a copy upscaled to this size (0 = none)
    strict: bool = False  # refuse prompts over 77 CLIP tokens instead of truncating them
    limit: int | None = None  # only the first N prompts
    prompts: list[str] = field(default_factory=list)  # prompts given directly (the notebooks, synthesize)



@dataclass
class EvalConfig:
    """`evaluate`: real test images vs generated sets -> metrics.json / metrics.csv, audit, figures."""

    STAGE: ClassVar[str] = "evaluate"
    pairs: str = ""  # pairs.csv: its test split is the real set, its train split the audit's reference
    data_dir: str = ""
    generated: tuple[str, ...] = ()  # sample dirs (with metadata.csv), each DIR or NAME=DIR
    out: str = "eval"
    metrics: tuple[str, ...] = ("fid", "kid", "is", "prdc", "diversity", "audit", "xrv", "adherence")
    feature_net: str = "inception"  # inception (torch-fidelity's FID network) | standin (offline tests only)
    feature_weights: str = ""  # local file of the Inception FID weights (weights-inception-2015-12-05-6726825d.pth)
    xrv_weights: str = ""  # XRV densenet121-res224-all: a .safetensors file, or a folder holding its release file
    n: int | None = None  # at most N images per set (same N for every set compared)
    real_floor: bool = True  # also score real train images against the real test images
    interval_groups: int = 20  # jackknife groups per set for FID's 95% interval (0 = none)
    kid_subset: int = 1000  # lowered to the smallest set's size, with a note
    is_splits: int = 10
    prdc_k: int = 5
    audit_pixel_threshold: float = 0.95  # Pearson correlation of 128 px pixels
    audit_cosine_threshold: float = 0.99  # cosine of feature vectors
    adherence_scorer: str = "xrv"  # xrv (torchxrayvision's classifier) | geometry (synthetic films' oracle, offline)
    adherence_min_cases: int = 5  # a finding needs this many positive and negative images, else it is skipped
    audit_percentile: float = 99.9  # flag only above this percentile of real test images' nearest-train similarities too
    resolution: int = 128
    fit: str = "stretch"
    cache_dir: str = ""  # "" = OUT/cache: real-image features, reused across evaluations
    seed: int = 0
    batch_size: int = 32


STAGE_CONFIGS = {cls.STAGE: cls for cls in (SynthConfig, TinyModelConfig, PrepareConfig, TrainConfig, SampleConfig,
                                            EvalConfig)}


@dataclass
class Preset:
    """A named bundle of stage settings."""

    name: str
    description: str
    offline: bool  # True: synthetic data + tiny model are built under the output dir
    model: str  # hub id or local dir; "" = the tiny model built offline
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)


_CPU_SMOKE_TRAIN = dict(
    batch_size=2, max_steps=6, learning_rate=1e-3, checkpoint_every=3, validation_every=3,
    validation_steps=4, validation_seeds=(0, 1), rank=4,
)
_SMOKE_STAGES = {
    "synth": {"reports": 80, "image_size": 320}, "train": _CPU_SMOKE_TRAIN, "sample": {"steps": 4},
    # Offline demo: the stand-in network, no XRV DenseNet (its weights are a download), and the
    # synthetic films' geometry oracle for prompt adherence.
    "evaluate": {"feature_net": "standin", "metrics": ("fid", "kid", "is", "prdc", "diversity", "audit", "adherence"),
                 "adherence_scorer": "geometry"},
}
# 128 px with cached latents: SD1.5's UNet in fp16 at batch 16 fits a 16 GB card with room.
_KAGGLE_TRAIN = dict(
    batch_size=16, max_steps=3000, learning_rate=1e-4, lr_scheduler="cosine", lr_warmup_steps=100,
    mixed_precision="fp16", checkpoint_every=250, keep_checkpoints=2, validation_every=500,
    snr_gamma=5.0, random_flip=False, rank=8,
)

PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        name="smoke",
        description="offline demo: synthetic data in the Kaggle layout and a tiny SD-shaped "
        "model, seconds on a CPU",
        offline=True,
        model="",
        stages=_SMOKE_STAGES,
    ),
    "cpu-smoke": Preset(
        name="cpu-smoke",
        description="the smoke preset's offline inputs with a few CPU training steps",
        offline=True,
        model="",
        stages=_SMOKE_STAGES,
    ),
    # Kaggle's two GPU offers share the training settings; only how they are launched differs.
    "kaggle-t4x2": Preset(
        name="kaggle-t4x2",
        description="Kaggle's T4 x2 (fp16, no bf16): `accelerate launch --num_processes 2`, batch 16 per GPU",
        offline=False, model=SD15_MODEL_ID, stages={"train": _KAGGLE_TRAIN},
    ),
    "kaggle-p100": Preset(
        name="kaggle-p100",
        description="Kaggle's P100 (fp16, no bf16, no tensor cores); needs a torch built with sm_60",
        offline=False, model=SD15_MODEL_ID, stages={"train": _KAGGLE_TRAIN},
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
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = set(fields)
    for key, value in list(values.items()):  # JSON gives lists where the dataclass has tuples
        if isinstance(value, list) and key in fields and "tuple" in str(fields[key].type):
            values[key] = tuple(value)
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
