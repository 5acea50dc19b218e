"""Setting up a training run: its pairs, accelerate, the frozen SD1.5 parts, the output folder
(a finished run there to reuse, else its claim), the LoRA adapter and the LR schedule. The stage
(stage.py) calls these in order."""

from __future__ import annotations

import logging
import json
from pathlib import Path

import pandas as pd
import torch

from .checkpoints import check_fresh_start, check_resume
from ..config.stages import TrainConfig, output_identity
from ..core.errors import CxrError
from ..core.files import read_json
from ..core.layout import LORA_CONFIG_JSON, LORA_SUBDIR, LOSS_CSV
from ..core.ownership import model_fingerprint, record_owner, text_digest

log = logging.getLogger(__name__)


def train_pairs(cfg: TrainConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """pairs.csv whole (validation prompts come from its test split) and its train split."""
    from ..data.tables import load_pairs

    pairs_all = load_pairs(cfg.pairs)
    pairs = pairs_all[pairs_all["split"] == "train"].reset_index(drop=True)
    if pairs.empty:
        raise CxrError(f"{cfg.pairs} has no train-split pairs; re-run prepare (its --test-fraction leaves none for "
                       "training?)")
    return pairs_all, pairs


def pairs_digest(pairs: pd.DataFrame) -> str:
    """What a run's identity records of its train pairs: file names and prompts."""
    return text_digest(f"{f}\t{p}" for f, p in zip(pairs["filename"], pairs["prompt"], strict=True))


def holds_finished_run(cfg: TrainConfig) -> bool:
    """Whether cfg.out holds a finished run made exactly as `cfg` would make it (same settings,
    train pairs and base model files): rerunning a notebook or a command then reuses it, as
    every other stage does with its own output."""
    from ..data.tables import load_pairs
    from ..core.ownership import read_owner

    out = Path(cfg.out)
    record = read_owner(out) if out.is_dir() else None
    if cfg.resume or cfg.overwrite or record is None or record.get("stage") != "train":
        return False
    try:
        info = read_json(out / LORA_SUBDIR / LORA_CONFIG_JSON)
    except (OSError, ValueError):
        return False
    wanted, made = output_identity(cfg, finished=True, paths=False), info.get("config", {})
    same_settings = json.dumps({k: made.get(k) for k in wanted}, sort_keys=True) \
        == json.dumps(wanted, sort_keys=True, default=str)
    if not same_settings or not (out / LOSS_CSV).is_file():
        return False
    pairs = load_pairs(cfg.pairs)
    pairs = pairs[pairs["split"] == "train"]
    identity = record["identity"]
    return identity.get("pairs") == pairs_digest(pairs) and identity.get("model_files") == model_fingerprint(cfg.model)


def check_device(mixed_precision: str) -> str:
    """The device to train on; stops with a sentence when the card or precision cannot work."""
    if not torch.cuda.is_available():
        if mixed_precision == "fp16":
            raise CxrError("--mixed-precision fp16 needs a GPU and none is visible; use --mixed-precision no "
                           "on a CPU (or turn the GPU accelerator on in Kaggle's notebook settings)")
        return "cpu"
    from ..core.gpu import check_cuda

    check_cuda("training")
    name = torch.cuda.get_device_name()
    if mixed_precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise CxrError(f"the {name} has no bf16; use --mixed-precision fp16")
    return "cuda"


def make_accelerator(cfg: TrainConfig):
    """The Accelerator on the checked device, the frozen parts' dtype; the seed set."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    device_kind = check_device(cfg.mixed_precision)
    # check_device has refused fp16 without a GPU, so the precision passes through.
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                              cpu=device_kind == "cpu")
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    set_seed(cfg.seed)
    return accelerator, weight_dtype


def frozen_parts(model: str, device, weight_dtype):
    """SD1.5's parts with gradients off, on the device in the run's precision."""
    from ..models.loading import load_training_parts

    tokenizer, text_encoder, vae, unet, noise_scheduler = load_training_parts(model)
    for part in (text_encoder, vae, unet):
        part.requires_grad_(False)
        part.to(device, dtype=weight_dtype)
    return tokenizer, text_encoder, vae, unet, noise_scheduler


def claim_output(cfg: TrainConfig, out: Path, accelerator, resume_from: Path | None, run_state: dict) -> dict | None:
    """Before anything is written into OUT (main process): resume only a checkpoint of a run like
    this one; start fresh only where no other run is. Returns the checked checkpoint's state."""
    identity = {**output_identity(cfg, paths=False), **run_state}
    state = None
    if accelerator.is_main_process:
        if resume_from is not None:
            state = check_resume(resume_from, cfg, run_state)
            record_owner(out, "train", identity)
        else:
            check_fresh_start(out, identity, cfg.overwrite)
    accelerator.wait_for_everyone()
    return state


def warn_mirrored_sides(cfg: TrainConfig, pairs: pd.DataFrame, accelerator) -> None:
    """Flipping mirrors left and right: say so when the prompts name a side."""
    if cfg.random_flip and accelerator.is_main_process:
        sided = int(pairs["prompt"].str.contains(r"\b(?:left|right)\b", case=False).sum())
        if sided:
            log.warning("--random-flip mirrors films whose prompts name a side (%d of %d train pairs say left or "
                        "right): the LoRA learns laterality at chance; leave it off to keep it", sided, len(pairs))


def add_lora(unet, cfg: TrainConfig, weight_dtype) -> list[torch.nn.Parameter]:
    """The LoRA adapter on the UNet's target modules; returns its (fp32) trainable parameters."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    matched_nothing = (f"--target-modules {', '.join(cfg.target_modules)} matched nothing in the UNet; "
                       "use the attention projections to_k, to_q, to_v, to_out.0")
    try:
        unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha or cfg.rank, init_lora_weights="gaussian",
                                    target_modules=list(cfg.target_modules), lora_dropout=cfg.lora_dropout))
    except ValueError:  # peft: "Target modules {...} not found in the base model"
        raise CxrError(matched_nothing) from None
    if weight_dtype != torch.float32:
        cast_training_params(unet, dtype=torch.float32)  # fp32 LoRA under fp16 autocast
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    lora_params = [p for p in unet.parameters() if p.requires_grad]
    if not lora_params:
        raise CxrError(matched_nothing)
    return lora_params


def make_lr_scheduler(cfg: TrainConfig, optimizer, max_steps: int, processes: int):
    """diffusers' LR schedule by name; an unknown name is refused in one sentence."""
    from diffusers.optimization import get_scheduler

    try:
        # accelerate steps a prepared scheduler once per process per step: count in those units.
        return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps * processes,
                             num_training_steps=max_steps * processes)
    except ValueError:
        raise CxrError(f"--lr-scheduler {cfg.lr_scheduler!r} is not known; use constant, "
                       "constant_with_warmup, cosine, linear or polynomial") from None
