"""Named presets: bundles of stage settings for a machine (the offline demo, 16 GB GPUs, the
real SD1.5 run), the earlier names that still map to them, and `auto`.

A stage's config is its dataclass defaults, then its preset's values, then what the user passed
(config.stage_config).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..core.environment import on_kaggle
from ..core.errors import CxrError

# The maintained copy of SD1.5 (same files and licence), the id diffusers' own docs use.
SD15_MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# Deleted from the hub in 2024; the seed and most tutorials still name it.
RETIRED_MODEL_IDS = {"runwayml/stable-diffusion-v1-5": SD15_MODEL_ID}


@dataclass
class Preset:
    """A named bundle of stage settings."""

    name: str
    description: str
    offline: bool  # True: synthetic data + tiny model are built under the output dir
    model: str  # hub id or local dir; "" = the tiny model built offline
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)

# The offline demo, sized for 2 CPU cores: 64 px films (the tiny model's latents are 8 x 8), a
# base pretrained here on synthetic films (pretrain.py), and a LoRA trained long enough to follow
# the impressions (benchmarks/RESULTS.md, "A demo that learns": adherence and FID by seed).
_DEMO_PX = 64
_CPU_SMOKE_TRAIN = dict(
    resolution=_DEMO_PX, batch_size=32, max_steps=2400, learning_rate=5e-3, rank=16, snr_gamma=5.0,
    checkpoint_every=1200, validation_every=1200, validation_seeds=(0, 1),
)
_SMOKE_STAGES = {
    "synth": {"reports": 600, "image_size": 320}, "tiny_model": {"pretrain": True, "resolution": _DEMO_PX},
    "train": _CPU_SMOKE_TRAIN, "sample": {"resolution": _DEMO_PX},
    # Offline demo: the stand-in network, no XRV DenseNet (its weights are a download), and the
    # synthetic films' geometry oracle for prompt adherence.
    "evaluate": {"resolution": _DEMO_PX, "feature_net": "standin",
                 "metrics": ("fid", "kid", "is", "prdc", "diversity", "audit", "adherence"),
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
        description="offline demo: synthetic data in the Kaggle layout, a tiny SD-shaped model pretrained "
        "here on synthetic films, 64 px; minutes on a CPU",
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


def preset_name(name: str) -> str:
    """The real preset a name stands for: `auto` resolved, old names mapped."""
    name = auto_preset() if name == AUTO else PRESET_ALIASES.get(name, name)
    if name not in PRESETS:
        raise CxrError(f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}, or auto")
    return name


def get_preset(name: str) -> Preset:
    return PRESETS[preset_name(name)]


def preset_values(name: str | None, stage: str) -> dict[str, Any]:
    """The preset's settings for one stage (none without a preset)."""
    return dict(get_preset(name).stages.get(stage, {})) if name else {}
