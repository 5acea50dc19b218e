"""One dataclass per stage, named presets, and a JSON round trip.

A stage's config is built from its defaults, then the preset's values for that stage, then
what the user passed. It is saved as JSON beside every artifact the stage writes, with the
library versions, so that any output says how it was made.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from .errors import CxrError
from .environment import library_versions, on_kaggle
from .io import read_json, read_user_json, write_json

# The maintained copy of SD1.5 (same files and licence), the id diffusers' own docs use.
SD15_MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# Deleted from the hub in 2024; the seed and most tutorials still name it.
RETIRED_MODEL_IDS = {"runwayml/stable-diffusion-v1-5": SD15_MODEL_ID}
CLIP_MAX_TOKENS = 77  # SD1.5's text encoder has 77 positions, start and end tokens included
VAE_WHY = "the VAE downsamples by 8"


# ---------------------------------------------------------------- checked settings -----------
# A setting's allowed values are declared with it (field metadata), and every config checks
# itself when built (__post_init__): the CLI, the notebooks, saved configs and the presets all
# pass through the same check.

def setting(default: Any = dataclasses.MISSING, *, min: float | None = None, max: float | None = None,
            above: float | None = None, below: float | None = None, choices: tuple | None = None,
            multiple_of: int | None = None, why: str = "", default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its range: min/max inclusive, above/below exclusive."""
    rules = {k: v for k, v in dict(min=min, max=max, above=above, below=below, choices=choices,
                                   multiple_of=multiple_of).items() if v is not None}
    return field(default=default, default_factory=default_factory, metadata={"rules": rules, "why": why})


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


_KIND = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (tuple, list):  # JSON gives lists for tuples; either is fine
        item = typing.get_args(hint)[0]
        return isinstance(value, (tuple, list)) and all(_type_ok(v, item) for v in value)
    return True


def _describe(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return _describe(args[0]) + " or none"
    if typing.get_origin(hint) in (tuple, list):
        return f"a list of {_KIND.get(args[0], 'values')} values"
    return _KIND.get(hint, str(hint))


def check_settings(cfg: Any) -> None:
    """Types, finiteness and ranges of every field: one sentence naming the setting, else None."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, flag = getattr(cfg, f.name), _flag(f.name)
        if not _type_ok(value, hints[f.name]):
            raise CxrError(f"{flag} must be {_describe(hints[f.name])}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise CxrError(f"{flag} must be a finite number, got {value}")
        rules, why = f.metadata.get("rules", {}), f.metadata.get("why", "")
        why = f" ({why})" if why else ""
        if value is None or not rules:
            continue
        if "choices" in rules and value not in rules["choices"]:
            options = [repr(c) if c == "" else str(c) for c in rules["choices"]]
            raise CxrError(f"{flag} {value!r} is not known; use {', '.join(options[:-1])} or {options[-1]}{why}")
        if "multiple_of" in rules and (value < rules["multiple_of"] or value % rules["multiple_of"]):
            raise CxrError(f"{flag} must be a positive multiple of {rules['multiple_of']}{why}, got {value}")
        low, high = rules.get("min", rules.get("above")), rules.get("max", rules.get("below"))
        too_low = ("min" in rules and value < rules["min"]) or ("above" in rules and value <= rules["above"])
        too_high = ("max" in rules and value > rules["max"]) or ("below" in rules and value >= rules["below"])
        if too_low or too_high:
            lower = f"{'at least' if 'min' in rules else 'more than'} {low}" if low is not None else ""
            upper = f"{'at most' if 'max' in rules else 'less than'} {high}" if high is not None else ""
            raise CxrError(f"{flag} must be {' and '.join(b for b in (lower, upper) if b)}{why}, got {value}")


class Checked:
    """Mixin: a stage config checks its settings when built (and when `replace`d)."""

    def __post_init__(self) -> None:
        check_settings(self)



@dataclass
class SynthConfig(Checked):
    """`synth`: a procedural dataset in the exact Kaggle layout."""

    STAGE: ClassVar[str] = "synth"
    out: str = "synthetic_data"
    reports: int = setting(400, min=1)  # number of reports (the real data has 3,955)
    seed: int = setting(0, min=0)
    image_size: int = setting(512, min=64)  # typical long side of the PNGs in px (the real ones are ~2,000)
    broken_images: int = setting(2, min=0)  # listed images made absent / truncated, to exercise prepare's checks
    overwrite: bool = False  # the folder holds another run's output: move it aside first (else refused)


@dataclass
class TinyModelConfig(Checked):
    """`tiny-model`: a small SD-shaped pipeline in diffusers' on-disk layout."""

    STAGE: ClassVar[str] = "tiny_model"
    out: str = "tiny_model"
    seed: int = 0


@dataclass
class PrepareConfig(Checked):
    """`prepare`: Kaggle CSVs + PNGs -> pairs.csv, excluded.csv, summary.json."""

    STAGE: ClassVar[str] = "prepare"
    data_dir: str = ""  # "" = the Kaggle mount when on Kaggle
    out: str = "data"
    tokenizer: str = SD15_MODEL_ID  # hub id or local dir of a diffusers model (or a tokenizer dir)
    split: str = setting("patient", choices=("patient", "image"), why="patient: no leak; image: the seed's")  # "patient": grouped by uid (no leak); "image": the seed's random split
    test_fraction: float = setting(0.2, above=0.0, below=1.0)
    seed: int = setting(0, min=0)
    projection: str = setting("both", choices=("both", "frontal", "lateral"))  # both | frontal | lateral
    limit: int | None = setting(None, min=1)  # only the first N images (sorted by uid), for quick runs
    clean_prompts: bool = False  # strip XXXX marks, list numbers, stray punctuation
    max_tokens: int = setting(CLIP_MAX_TOKENS, min=3, why="start, one word, end")
    workers: int = setting(8, min=1)  # threads for the image header checks (I/O bound)


LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")  # the UNet's attention projections


@dataclass
class TrainConfig(Checked):
    """`train`: LoRA on the UNet, VAE and text encoder frozen, on cached latents and embeddings."""

    STAGE: ClassVar[str] = "train"
    pairs: str = ""  # pairs.csv from prepare (its train split is used)
    data_dir: str = ""  # the dataset folder the pairs point into ("" = the Kaggle mount on Kaggle)
    model: str = SD15_MODEL_ID  # hub id or local diffusers dir
    out: str = "train"
    cache_dir: str = ""  # "" = OUT/cache (on Kaggle: /tmp, outside the output); latents, embeddings, resized images
    resolution: int = setting(128, multiple_of=8, why=VAE_WHY)
    fit: str = setting("stretch", choices=("stretch", "pad", "crop"))  # stretch (the seed) | pad | crop
    batch_size: int = setting(4, min=1)  # per process (per GPU)
    grad_accum: int = setting(1, min=1)
    max_steps: int = setting(1000, min=1)  # optimizer steps
    epochs: float | None = setting(None, above=0)  # if set, overrides max_steps
    learning_rate: float = setting(1e-4, above=0)
    lr_scheduler: str = "constant"  # any diffusers.optimization name: constant, cosine, linear...
    lr_warmup_steps: int = setting(0, min=0)
    rank: int = setting(4, min=1)
    alpha: float | None = setting(None, above=0)  # None = rank (scale 1)
    target_modules: tuple[str, ...] = LORA_TARGETS
    lora_dropout: float = setting(0.0, min=0.0, below=1.0)
    mixed_precision: str = setting("no", choices=("no", "fp16", "bf16"))  # no | fp16 | bf16
    snr_gamma: float | None = setting(None, above=0)  # min-SNR weighting (5.0 is the usual value)
    noise_offset: float = setting(0.0, min=0.0)
    prediction_type: str = setting("", choices=("", "epsilon", "v_prediction"))  # "" = the scheduler's (SD1.5: epsilon) | epsilon | v_prediction
    gradient_checkpointing: bool = False
    random_flip: bool = False  # both flips are cached, so flipping costs nothing per step
    seed: int = setting(0, min=0)
    max_grad_norm: float = setting(1.0, above=0)
    weight_decay: float = setting(1e-2, min=0)
    checkpoint_every: int = setting(500, min=0)  # steps; 0 = only at the end
    keep_checkpoints: int = setting(2, min=1)
    resume: str = ""  # "" | latest | a checkpoint dir
    validation_every: int = setting(0, min=0)  # steps; 0 = with every checkpoint (and at the end)
    validation_prompts: tuple[str, ...] = ()  # () = the most common test-split prompts
    validation_seeds: tuple[int, ...] = (0, 1)
    validation_steps: int = setting(20, min=1)  # sampler steps for validation images
    overwrite: bool = False  # the folder holds another run's output: move it aside first (else refused)


@dataclass
class SampleConfig(Checked):
    """`sample`: prompts -> PNGs + metadata.csv."""

    STAGE: ClassVar[str] = "sample"
    model: str = SD15_MODEL_ID
    lora: str = ""  # a LoRA folder (train's OUT/lora); "" = the base model alone
    out: str = "samples"
    prompts_file: str = ""  # one prompt per line
    pairs: str = ""  # or: the prompts of a pairs.csv split
    split: str = setting("test", choices=("train", "test"))
    n_per_prompt: int = setting(1, min=1)
    steps: int = setting(20, min=1)
    scheduler: str = setting("dpm++", choices=("dpm++", "ddim", "pndm", "euler"))
    guidance: float = setting(7.5, min=0)
    negative_prompt: str = ""
    lora_scale: float = 1.0  # any finite value (0 = the base model)
    batch_size: int = setting(8, min=1)
    seed: int = setting(0, min=0)
    resolution: int = setting(128, multiple_of=8, why=VAE_WHY)
    upscale: int = setting(0, min=0)  # also write a copy upscaled to this size (0 = none)
    strict: bool = False  # refuse prompts over 77 CLIP tokens instead of truncating them
    limit: int | None = setting(None, min=1)  # only the first N prompts
    prompts: list[str] = field(default_factory=list)  # prompts given directly (the notebooks, synthesize)
    overwrite: bool = False  # the folder holds another run's output: move it aside first (else refused)



@dataclass
class EvalConfig(Checked):
    """`evaluate`: real test images vs generated sets -> metrics.json / metrics.csv, audit, figures."""

    STAGE: ClassVar[str] = "evaluate"
    pairs: str = ""  # pairs.csv: its test split is the real set, its train split the audit's reference
    data_dir: str = ""
    generated: tuple[str, ...] = ()  # sample dirs (with metadata.csv), each DIR or NAME=DIR
    out: str = "eval"
    metrics: tuple[str, ...] = ("fid", "kid", "is", "prdc", "diversity", "audit", "xrv", "adherence")
    feature_net: str = setting("inception", choices=("inception", "standin"))  # inception (torch-fidelity's FID network) | standin (offline tests only)
    feature_weights: str = ""  # local file of the Inception FID weights (weights-inception-2015-12-05-6726825d.pth)
    xrv_weights: str = ""  # XRV densenet121-res224-all: a .safetensors file, or a folder holding its release file
    n: int | None = setting(None, min=2)  # at most N images per set (same N for every set compared)
    real_floor: bool = True  # also score real train images against the real test images
    interval_groups: int = setting(20, min=0)  # jackknife groups per set for FID's 95% interval (0 = none)
    kid_subset: int = setting(1000, min=2, why="KID compares pairs within a subset")  # lowered to the smallest set's size, with a note
    is_splits: int = setting(10, min=1)
    prdc_k: int = setting(5, min=1)
    audit_pixel_threshold: float = setting(0.95, min=-1.0, max=1.0)  # Pearson correlation of 128 px pixels
    audit_cosine_threshold: float = setting(0.99, min=-1.0, max=1.0)  # cosine of feature vectors
    adherence_scorer: str = setting("xrv", choices=("xrv", "geometry"))  # xrv (torchxrayvision's classifier) | geometry (synthetic films' oracle, offline)
    adherence_min_cases: int = setting(5, min=1)  # a finding needs this many positive and negative images, else it is skipped
    audit_percentile: float = setting(99.9, above=0.0, below=100.0)  # flag only above this percentile of real test images' nearest-train similarities too
    resolution: int = setting(128, min=8)
    fit: str = setting("stretch", choices=("stretch", "pad", "crop"))
    cache_dir: str = ""  # "" = OUT/cache (on Kaggle: /tmp, outside the output); real-image features, resized images
    seed: int = setting(0, min=0)
    batch_size: int = setting(32, min=1)


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
# fp16 because neither Kaggle's T4 nor older 16 GB cards (P100, V100) have bf16.
_GPU16_TRAIN = dict(
    batch_size=16, max_steps=3000, learning_rate=1e-4, lr_scheduler="cosine", lr_warmup_steps=100,
    mixed_precision="fp16", checkpoint_every=250, keep_checkpoints=2, validation_every=500,
    snr_gamma=5.0, random_flip=False, rank=8,
)
# At 128 px a GPU is bound by kernel launches, not arithmetic: batch 8 gave 7.2 images/s on an
# H100 (benchmarks/RESULTS.md); 32 prompts per call (64 with guidance) still fit a 16 GB card.
_GPU16_STAGES = {"train": _GPU16_TRAIN, "sample": {"batch_size": 32}}

PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        name="smoke",
        description="offline demo: synthetic data in the Kaggle layout and a tiny SD-shaped "
        "model, seconds on a CPU",
        offline=True,
        model="",
        stages=_SMOKE_STAGES,
    ),
    # The two GPU profiles share the training settings; only how they are launched differs.
    "gpu-2x16gb": Preset(
        name="gpu-2x16gb",
        description="two 16 GB GPUs (Kaggle's T4 x2): `accelerate launch --num_processes 2`, fp16, batch 16 per GPU",
        offline=False, model=SD15_MODEL_ID, stages=_GPU16_STAGES,
    ),
    "gpu-1x16gb": Preset(
        name="gpu-1x16gb",
        description="one 16 GB GPU (a T4, V100, P100...): fp16, batch 16",
        offline=False, model=SD15_MODEL_ID, stages=_GPU16_STAGES,
    ),
    "sd15": Preset(
        name="sd15",
        description="the real thing: the Kaggle IU X-ray data and Stable Diffusion v1.5, default settings",
        offline=False,
        model=SD15_MODEL_ID,
        stages={},
    ),
}
# Earlier names, still accepted: the presets were once named after Kaggle's cards.
PRESET_ALIASES = {"kaggle-t4x2": "gpu-2x16gb", "kaggle-p100": "gpu-1x16gb", "cpu-smoke": "smoke"}
AUTO = "auto"  # the notebooks' default: see auto_preset()
PRESET_CHOICES = sorted(PRESETS) + sorted(PRESET_ALIASES) + [AUTO]


def auto_preset() -> str:
    """On Kaggle the profile for the GPUs present (two cards, one card, none: sd15 with its
    defaults); anywhere else the offline demo."""
    if not on_kaggle():
        return "smoke"
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return "gpu-2x16gb" if count >= 2 else "gpu-1x16gb" if count == 1 else "sd15"


C = TypeVar("C")


def preset_name(name: str) -> str:
    """The real preset a name stands for: `auto` resolved, old names mapped."""
    name = auto_preset() if name == AUTO else PRESET_ALIASES.get(name, name)
    if name not in PRESETS:
        raise CxrError(f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}, or auto")
    return name


def get_preset(name: str) -> Preset:
    return PRESETS[preset_name(name)]


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
    payload = read_user_json(path, "config file", f"pass a {cls.STAGE}_config.json written by the stage")
    if not isinstance(payload, dict) or payload.get("stage") != cls.STAGE or not isinstance(payload.get("config"), dict):
        stage = payload.get("stage") if isinstance(payload, dict) else None
        raise CxrError(f"{path} holds a {stage!r} config, not a {cls.STAGE!r} one; pass a {cls.STAGE}_config.json")
    return stage_config(cls, **payload["config"])
