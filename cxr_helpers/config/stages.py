"""One dataclass per stage, and a JSON round trip.

Each field is declared once with `setting`: its type (the annotation), default, help, allowed
values and what it is to the stage's output (output_identity); the CLI's flags (flags.py) and the
notebooks' configs come from it. A stage's config is built from its defaults, then the preset's
values for that stage (presets.py), then what the user passed. It is saved as JSON beside every
artifact the stage writes, with the library versions, so that any output says how it was made.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from ..core.environment import library_versions
from ..core.errors import CxrError
from ..core.files import read_user_json, write_json
from ..core.layout import PAIRS_SPLITS
from .presets import SD15_MODEL_ID, preset_values
from .settings import RUN, SHAPES, VOLATILE, Checked, field_type, setting

# Allowed values whose home is here rather than beside the code that uses them: config imports
# no numpy or torch (the install cell's `check-gpu` runs before torch is fixed), and a setting's
# declaration is its only check.
VAE_FACTOR = 8  # SD1.5's VAE downsamples by 8: an image size must be a multiple of it
VAE_WHY = "the VAE downsamples by 8"
FITS = ("stretch", "pad", "crop")  # stretch = the seed's plain resize; pad and crop keep the aspect
# The samplers --scheduler offers, each with the diffusers class it stands for (generation.set_scheduler).
SCHEDULERS = {"dpm++": "DPMSolverMultistepScheduler", "ddim": "DDIMScheduler", "pndm": "PNDMScheduler",
              "euler": "EulerDiscreteScheduler"}
# The metrics evaluate computes, by name (evaluation/registry.METRICS holds what computes each).
# torchxrayvision's DenseNet-121 weights (evaluation.features.XRV_MODELS holds their files); only
# "-all" was trained on data that include OpenI, the collection evaluated here.
XRV_MODELS = ("densenet121-res224-mimic_ch", "densenet121-res224-chex", "densenet121-res224-nih",
              "densenet121-res224-pc", "densenet121-res224-all")
EVAL_METRICS = ("fid", "kid", "is", "prdc", "diversity", "audit", "xrv", "adherence")
CLIP_MAX_TOKENS = 77  # SD1.5's text encoder has 77 positions, start and end tokens included
OVERWRITE_HELP = "the folder holds another run's output: move it aside first (else refused)"
CACHE_HELP = "where cached files go; \"\" = OUT/cache (on Kaggle: /tmp, outside the output)"
MODEL_HELP = "hub id or local diffusers dir"
DATA_DIR_HELP = "the dataset folder the pairs point into; \"\" = the Kaggle mount on Kaggle"


@dataclass
class SynthConfig(Checked):
    """`synth`: a procedural dataset in the exact Kaggle layout (offline demo data)."""

    STAGE: ClassVar[str] = "synth"
    out: str = setting("synthetic_data", role=VOLATILE, help="output folder")
    reports: int = setting(400, min=1, help="number of reports (the real data has 3,955)")
    seed: int = setting(0, min=0, help="random seed")
    image_size: int = setting(512, min=64, help="typical long side of the PNGs in px (the real ones are ~2,000)")
    broken_images: int = setting(2, min=0, help="listed images made absent / truncated, to exercise prepare's checks")
    overwrite: bool = setting(False, role=VOLATILE, help=OVERWRITE_HELP)


@dataclass
class TinyModelConfig(Checked):
    """`tiny-model`: a tiny SD-shaped diffusers pipeline, random or pretrained on synthetic films."""

    STAGE: ClassVar[str] = "tiny_model"
    out: str = setting("tiny_model", role=VOLATILE, help="output folder")
    seed: int = setting(0, min=0, help="random seed of the weights (and of the pretraining)")
    pretrain: bool = setting(False, help="train the VAE and the UNet on synthetic films under captions unrelated "
                             "to them (a base that draws films but knows no findings); off: random weights")
    resolution: int = setting(64, multiple_of=2 * VAE_FACTOR, when="pretrain",
                              why="the VAE trains on windows of half the film, and the VAE downsamples by 8",
                              help="film size in px for the pretraining")
    films: int = setting(800, min=16, when="pretrain",
                         help="synthetic films the pretraining draws (its own, never the demo's)")
    vae_steps: int = setting(400, min=1, when="pretrain",
                             help="VAE autoencoder steps (batch 32 windows of half the film size)")
    unet_steps: int = setting(1200, min=1, when="pretrain",
                              help="UNet steps (batch 32, epsilon prediction, SD1.5's noise schedule)")
    overwrite: bool = setting(False, role=VOLATILE, help=OVERWRITE_HELP)


@dataclass
class PrepareConfig(Checked):
    """`prepare`: Kaggle CSVs + PNGs -> pairs.csv, excluded.csv, summary.json."""

    STAGE: ClassVar[str] = "prepare"
    data_dir: str = setting("", path=True,
                            help="dataset folder in the Kaggle layout; \"\" = the Kaggle mount when on Kaggle")
    out: str = setting("data", role=VOLATILE, help="output folder")
    tokenizer: str = setting(SD15_MODEL_ID, path=True,
                             help="hub id or local dir of a diffusers model (or a tokenizer dir)")
    split: str = setting("patient", choices=("patient", "image"), why="patient: no leak; image: the seed's",
                         help="patient: grouped by uid (no leak); image: the seed's random split")
    test_fraction: float = setting(0.2, above=0.0, below=1.0, help="share of pairs in the test split")
    seed: int = setting(0, min=0, help="random seed of the split")
    projection: str = setting("both", choices=("both", "frontal", "lateral"), help="which films to keep")
    limit: int | None = setting(None, min=1, help="only the first N images (sorted by uid), for quick runs")
    clean_prompts: bool = setting(False, help="strip XXXX marks, list numbers, stray punctuation")
    max_tokens: int = setting(CLIP_MAX_TOKENS, min=3, why="start, one word, end",
                              help="keep prompts of at most this many CLIP tokens, start and end included")
    workers: int = setting(8, min=1, role=RUN, help="threads for the image header checks (I/O bound)")
    overwrite: bool = setting(False, role=VOLATILE, help=OVERWRITE_HELP)


LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")  # the UNet's attention projections


@dataclass
class TrainConfig(Checked):
    """`train`: LoRA on the UNet, VAE and text encoder frozen, on cached latents and embeddings."""

    STAGE: ClassVar[str] = "train"
    pairs: str = setting("", role=RUN, path=True, help="pairs.csv from prepare (its train split is used)")
    data_dir: str = setting("", role=RUN, path=True, help=DATA_DIR_HELP)
    model: str = setting(SD15_MODEL_ID, path=True, help=MODEL_HELP)
    out: str = setting("train", role=VOLATILE, help="output folder: lora/, loss.csv, checkpoints/, figures/")
    cache_dir: str = setting("", role=VOLATILE, help=CACHE_HELP + ": latents, text embeddings, resized images")
    resolution: int = setting(128, multiple_of=VAE_FACTOR, why=VAE_WHY, help="training image size in px")
    fit: str = setting("stretch", choices=FITS,
                       help="how a film becomes a square (stretch: the seed's)")
    batch_size: int = setting(4, min=1, help="images per step per process (per GPU)")
    grad_accum: int = setting(1, min=1, help="gradient accumulation steps")
    max_steps: int = setting(1000, min=1, role=RUN, help="optimizer steps")
    epochs: float | None = setting(None, above=0, role=RUN,
                                   help="train this many passes over the pairs (overrides --max-steps)")
    learning_rate: float = setting(1e-4, above=0, help="AdamW learning rate")
    lr_scheduler: str = setting("constant", help="any diffusers.optimization name: constant, constant_with_warmup, "
                                "cosine, linear, polynomial...")
    lr_warmup_steps: int = setting(0, min=0, help="learning-rate warmup steps")
    rank: int = setting(4, min=1, help="LoRA rank")
    alpha: float | None = setting(None, above=0, help="LoRA alpha; none = the rank (scale 1)")
    target_modules: tuple[str, ...] = setting(LORA_TARGETS, help="the UNet modules that get LoRA layers")
    lora_dropout: float = setting(0.0, min=0.0, below=1.0, help="dropout on the LoRA layers")
    mixed_precision: str = setting("no", choices=("no", "fp16", "bf16"),
                                   help="fp16 needs a GPU, bf16 a card that has it")
    snr_gamma: float | None = setting(None, above=0, help="min-SNR loss weighting gamma (5.0 is the usual value)")
    noise_offset: float = setting(0.0, min=0.0, help="offset noise strength")
    # RUN: the run's state records the prediction type this resolves to.
    prediction_type: str = setting("", choices=("", "epsilon", "v_prediction"), role=RUN,
                                   help="\"\" = the scheduler's (SD1.5: epsilon)")
    gradient_checkpointing: bool = setting(False, role=RUN,
                                           help="recompute activations in the backward pass (less memory)")
    random_flip: bool = setting(False, help="mirror images at random (both flips are cached: free per step)")
    seed: int = setting(0, min=0, help="random seed")
    # RUN although they act on the weights: a resume has always been free to change these two.
    max_grad_norm: float = setting(1.0, above=0, role=RUN, help="gradient clipping norm")
    weight_decay: float = setting(1e-2, min=0, role=RUN, help="AdamW weight decay")
    checkpoint_every: int = setting(500, min=0, role=RUN, help="write a checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = setting(2, min=1, role=RUN, help="keep the last K checkpoints")
    resume: str = setting("", role=VOLATILE, help="latest, or a checkpoint folder; \"\" = start afresh")
    validation_every: int = setting(0, min=0, role=RUN, help="validation images every N steps "
                                    "(0: with every checkpoint, and at the end)")
    validation_prompts: tuple[str, ...] = setting((), role=RUN, help="prompts for validation images; "
                                                  "none = the most common test prompts")
    validation_seeds: tuple[int, ...] = setting((0, 1), role=RUN, help="one validation image per prompt and seed")
    validation_steps: int = setting(20, min=1, role=RUN, help="sampler steps for validation images")
    overwrite: bool = setting(False, role=VOLATILE, help=OVERWRITE_HELP)


@dataclass
class SampleConfig(Checked):
    """`sample`: prompts -> PNGs + metadata.csv, seeded and batched, base model + LoRA."""

    STAGE: ClassVar[str] = "sample"
    model: str = setting(SD15_MODEL_ID, path=True, help=MODEL_HELP)
    lora: str = setting("", path=True, help="a LoRA folder (train's OUT/lora); \"\" = the base model alone")
    out: str = setting("samples", role=VOLATILE, help="output folder")
    # The flag kept its older name: --prompts is the file; the prompts themselves are --prompt.
    prompts_file: str = setting("", flag="prompts", role=RUN, help="text file, one prompt per line")
    pairs: str = setting("", role=RUN, path=True, help="or: pairs.csv, the prompts of --split (one per pair)")
    split: str = setting("test", choices=PAIRS_SPLITS, role=RUN, help="which split of --pairs")
    n_per_prompt: int = setting(1, min=1, role=RUN, help="images per prompt (seeds SEED, SEED+1, ...)")
    steps: int = setting(20, min=1, help="sampler steps")
    scheduler: str = setting("dpm++", choices=tuple(SCHEDULERS), help="sampler")
    guidance: float = setting(7.5, min=0, help="classifier-free guidance scale")
    negative_prompt: str = setting("", help="what the images should not show")
    lora_scale: float = setting(1.0, help="any finite value: 0 = the base model, 1 = the full LoRA")
    batch_size: int = setting(8, min=1, role=RUN, help="images per pipeline call")
    seed: int = setting(0, min=0, help="random seed of the first image of each prompt")
    resolution: int = setting(128, multiple_of=VAE_FACTOR, why=VAE_WHY, help="image size in px")
    upscale: int = setting(0, min=0, help="also write a copy upscaled to this size, e.g. 512 (0 = none)")
    strict: bool = setting(False, role=RUN, help="refuse prompts over 77 CLIP tokens instead of truncating them")
    limit: int | None = setting(None, min=1, role=RUN, help="only the first N prompts")
    prompts: list[str] = setting(flag="prompt", default_factory=list, role=RUN,
                                 help="prompts given directly (the notebooks, synthesize)")
    overwrite: bool = setting(False, role=VOLATILE, help=OVERWRITE_HELP)


@dataclass
class SynthesizeConfig(Checked):
    """`synthesize`: a synthetic dataset from a spec of prompts, in the Kaggle layout."""

    STAGE: ClassVar[str] = "synthesize"
    spec: str = setting("", role=RUN, help="JSON: items of {prompt, count} or {label, templates, count}")
    model: str | None = setting(None, path=True, help=MODEL_HELP + "; none = the spec's (else SD1.5)")
    lora: str | None = setting(None, path=True, help="a LoRA folder; none = the spec's, \"\" = the base model alone")
    batch_size: int = setting(8, min=1, role=RUN, help="images per pipeline call")
    out: str = setting("synthesized", role=VOLATILE, help="output folder")
    overwrite: bool = setting(False, role=VOLATILE, help=OVERWRITE_HELP)


@dataclass
class EvalConfig(Checked):
    """`evaluate`: real test images vs generated sets -> metrics.json / metrics.csv, audit, figures."""

    STAGE: ClassVar[str] = "evaluate"
    pairs: str = setting("", path=True, help="pairs.csv: its test split is the real set, its train split the floor and "
                         "the audit's reference")
    data_dir: str = setting("", path=True, help=DATA_DIR_HELP)
    generated: tuple[str, ...] = setting((), path=True, help="sample folders (with metadata.csv): DIR or NAME=DIR, "
                                         "e.g. base=OUT/base fine-tuned=OUT/tuned")
    out: str = setting("eval", role=VOLATILE,
                       help="output folder: metrics.json, metrics.csv, audit.csv, diversity.csv, figures/")
    metrics: tuple[str, ...] = setting(EVAL_METRICS, choices=EVAL_METRICS,
                                       help="which metrics: any of the default's, space- or comma-separated")
    feature_net: str = setting("inception", choices=("inception", "standin"),
                               help="inception: torch-fidelity's FID network; "
                               "standin: a labelled offline stand-in, for tests")
    feature_weights: str = setting("", path=True, help="local file of the Inception FID weights "
                                   "(weights-inception-2015-12-05-6726825d.pth), when offline")
    xrv_model: str = setting("densenet121-res224-mimic_ch", choices=XRV_MODELS, help="torchxrayvision's "
                             "DenseNet weights for the domain FID and adherence: mimic_ch, chex, nih, pc never saw "
                             "this collection; all includes it (OpenI), named so in every output")
    xrv_weights: str = setting("", path=True, help="the --xrv-model weights: a .safetensors file, or a folder "
                               "holding its release file; \"\" = its cache, else its download")
    n: int | None = setting(None, min=2, help="at most N images per set (the same N for every set compared)")
    real_floor: bool = setting(True, help="also score real train images against the real test images (the floor)")
    interval_groups: int = setting(20, min=0, help="jackknife groups per set for FID's 95% interval (0 = none)")
    kid_subset: int = setting(1000, min=2, why="KID compares pairs within a subset",
                              help="KID subset size; lowered to the smallest set's size, with a note")
    is_splits: int = setting(10, min=1, help="splits for the Inception Score")
    prdc_k: int = setting(5, min=1, help="nearest neighbours for precision, recall, density, coverage")
    audit_pixel_threshold: float = setting(0.95, min=-1.0, max=1.0, help="flag a generated image whose Pearson "
                                           "correlation with a train image's pixels (at --resolution) is above this")
    audit_cosine_threshold: float = setting(0.99, min=-1.0, max=1.0, help="flag a generated image whose feature "
                                            "cosine with a train image is above this")
    adherence_scorer: str = setting("xrv", choices=("xrv", "geometry"), help="who scores the findings for prompt "
                                    "adherence: xrv (torchxrayvision's classifier) or geometry "
                                    "(the synthetic films' oracle, offline)")
    adherence_labels: str = setting("impression", choices=("impression", "mesh"), help="labels for prompt adherence:"
                                    " impression (the prompt's own words, for real and generated images alike) or "
                                    "mesh (the MeSH/Problems coding of the reports with that impression)")
    adherence_min_cases: int = setting(5, min=1, help="a finding needs this many positive and negative images, "
                                       "else it is skipped")
    audit_percentile: float = setting(99.9, above=0.0, below=100.0, help="flag only above this percentile of "
                                      "real test images' nearest-train similarities too")
    resolution: int = setting(128, multiple_of=VAE_FACTOR, why=VAE_WHY,
                              help="image size in px the features are computed at")
    fit: str = setting("stretch", choices=FITS, help="how a film becomes a square")
    cache_dir: str = setting("", role=VOLATILE, help=CACHE_HELP + ": real-image features, resized images")
    seed: int = setting(0, min=0, help="random seed of subsets and jackknife groups")
    batch_size: int = setting(32, min=1, role=RUN, help="images per feature-network call")
    overwrite: bool = setting(False, role=VOLATILE, help=OVERWRITE_HELP)

    def __post_init__(self) -> None:
        if isinstance(self.metrics, (tuple, list)):  # "fid,kid" and "fid kid" alike: users write either
            self.metrics = tuple(m.strip() for item in self.metrics for m in str(item).split(",") if m.strip())
        super().__post_init__()


STAGE_CONFIGS = {cls.STAGE: cls for cls in (SynthConfig, TinyModelConfig, PrepareConfig, TrainConfig, SampleConfig,
                                            SynthesizeConfig, EvalConfig)}
C = TypeVar("C")


def stage_config(cls: type[C], preset: str | None = None, **overrides: Any) -> C:
    """Defaults, then the preset's values for this stage, then `overrides` (None = keep)."""
    values = preset_values(preset, cls.STAGE)
    values.update({k: v for k, v in overrides.items() if v is not None})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise CxrError(f"{cls.__name__} has no setting {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    tuples = {name for name in fields if typing.get_origin(field_type(hints[name])[0]) is tuple}
    # JSON gives lists where the dataclass has tuples
    return cls(**{k: tuple(v) if k in tuples and isinstance(v, list) else v for k, v in values.items()})


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def output_identity(cfg: Any, finished: bool = False, paths: bool = True) -> dict[str, Any]:
    """The settings that shape a stage's output, as each one's declaration says (its role and
    `when`): what an ownership record and a resume compare. A path by its content (the same files
    by a relative or an absolute path are the same); paths=False leaves the paths out, for a
    caller that compares their contents itself (train: the pairs' and the model files' digests).
    finished: also the RUN settings, which a rerun may change as it continues the output, but a
    finished output is reused only when asked for as it was made."""
    from ..core.ownership import path_identity

    roles = (SHAPES, RUN) if finished else (SHAPES,)
    values = config_to_dict(cfg)
    return {f.name: path_identity(values[f.name]) if f.metadata.get("path") else values[f.name]
            for f in dataclasses.fields(cfg)
            if f.metadata.get("role", SHAPES) in roles and (not f.metadata.get("when") or values[f.metadata["when"]])
            and (paths or not f.metadata.get("path"))}


def save_config(cfg: Any, path: str | Path, **extra: Any) -> Path:
    """Write `cfg` as JSON (atomically) with its stage name and the library versions."""
    payload = {"stage": cfg.STAGE, "config": config_to_dict(cfg), "versions": library_versions()}
    payload.update(extra)
    return write_json(path, payload)


def load_config(cls: type[C], path: str | Path) -> C:
    payload = read_user_json(path, "config file", f"pass a {cls.STAGE}_config.json written by the stage")
    if (not isinstance(payload, dict) or payload.get("stage") != cls.STAGE
            or not isinstance(payload.get("config"), dict)):
        stage = payload.get("stage") if isinstance(payload, dict) else None
        raise CxrError(f"{path} holds a {stage!r} config, not a {cls.STAGE!r} one; pass a {cls.STAGE}_config.json")
    return stage_config(cls, **payload["config"])
