"""The trained LoRA as others use it: OUT/lora/ in diffusers' format, with config.json (the
settings, the run's numbers and the library versions) and a model card (README.md)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ..config.stages import TrainConfig, config_to_dict
from ..core.environment import library_versions
from ..core.files import give_umask_modes, write_json, write_text
from ..core.layout import LORA_CARD, LORA_CONFIG_JSON, LORA_SUBDIR, LORA_WEIGHTS


def save_lora(out: Path, unet, cfg: TrainConfig, info: dict) -> Path:
    """OUT/lora/: the diffusers-format LoRA, config.json and the model card, swapped in whole."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    target = out / LORA_SUBDIR
    tmp = out / f".tmp-lora-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    layers = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in layers.items()}
    StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=layers, safe_serialization=True,
                                              weight_name=LORA_WEIGHTS)
    write_json(tmp / LORA_CONFIG_JSON, {"base_model": cfg.model, "config": config_to_dict(cfg), **info,
                                     "versions": library_versions()})
    write_text(tmp / LORA_CARD, model_card(cfg, info))
    give_umask_modes(tmp)
    old = out / f".old-lora-{os.getpid()}"
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def model_card(cfg: TrainConfig, info: dict) -> str:
    """The LoRA's model card (its README.md): use, data, prompt style, training, limits."""
    data = info.get("data_summary") or {}
    return f"""---
base_model: {cfg.model}
library_name: diffusers
tags: [stable-diffusion, lora, text-to-image, chest-x-ray, research-only]
---

# Chest X-ray LoRA for {cfg.model}

A LoRA (rank {cfg.rank}, alpha {cfg.alpha or cfg.rank}, on the UNet's {', '.join(cfg.target_modules)}) that
makes {cfg.resolution} x {cfg.resolution} chest X-rays from radiology impressions.

## Use

```python
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("{cfg.model}", safety_checker=None, requires_safety_checker=False)
# weight_name: older diffusers (0.32 among them) need it to load a folder offline
pipe.load_lora_weights("path/to/this/folder", weight_name="{LORA_WEIGHTS}")
image = pipe("Cardiomegaly without acute pulmonary disease.", height={cfg.resolution}, width={cfg.resolution}).images[0]
```

The safety checker is off: it flags chest X-rays and blanks them.

## Data

Indiana University chest X-ray collection (Kaggle: raddar/chest-xrays-indiana-university), or the
project's synthetic stand-in in the same layout when trained offline (data dir: `{cfg.data_dir}`).
Prompts are the reports' impression sections, kept when at most 77 CLIP tokens.
Training pairs: {info.get('train_pairs')} ({info.get('train_prompts')} distinct prompts);
split: {data.get('split', 'see pairs.csv')}.

## Prompt style

Radiology impressions as written in the reports: "No acute cardiopulmonary abnormality.",
"1. Cardiomegaly. 2. Small left pleural effusion.", with the dataset's `XXXX` de-identification marks.

## Training

{info.get('steps_done')} steps, batch {cfg.batch_size} x accumulation {cfg.grad_accum} x
{info.get('processes', 1)} process(es), learning rate {cfg.learning_rate} ({cfg.lr_scheduler}), precision
{cfg.mixed_precision}, seed {cfg.seed};
final loss {info.get('final_loss')}. Full settings and library versions: `{LORA_CONFIG_JSON}`.

## Limits

Research use only. These images are not for diagnosis, for clinical decisions, or as evidence of
any finding. The model learned from a few thousand films of one US institution; it reproduces
that data's biases and may reproduce training images (check with the project's memorisation
audit before sharing outputs). Fine detail is limited by the {cfg.resolution} px resolution.
"""
