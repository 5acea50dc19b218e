"""The training stage: LoRA on SD1.5's UNet, on accelerate.

The VAE and the text encoder are frozen, so their outputs never change: every training image's
latent distribution (both flips when flipping is on) and every distinct prompt's embedding are
computed once, cached on disk, and reused by every step and every later run. The loop then
runs the UNet only, which is most of the per-step cost of the diffusers reference loop but not
all of it (facts.md: the VAE encode alone is a third of it).

Every step draws its randomness from generators seeded by (seed, step), and checkpoints hold
the LoRA, the optimizer and the LR schedule as safetensors + JSON: a run killed at any moment
resumes with `--resume latest` and ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import TrainConfig, config_to_dict, save_config
from .errors import CxrError
from .environment import cache_root, kaggle_input, library_versions, on_kaggle
from .io import atomic_path, give_umask_modes, read_json, write_csv, write_json, write_text
from .ownership import file_digest, model_fingerprint, record_owner, text_digest
from .sample import LORA_WEIGHTS

LOSS_COLUMNS = ["step", "loss", "lr", "epoch", "images_per_s"]
# Settings a resumed run must share with the checkpoint it resumes (or its weights mean nothing).
ENCODER_PARTS = ("vae", "text_encoder", "tokenizer")  # what the cached encodings depend on
# Children of `accelerate launch` report progress as lines with this prefix; the notebook's process
# turns them into one updating bar (relayed tqdm redraws would be thousands of lines in a cell).
PROGRESS_PREFIX = "cxr-progress "
PROGRESS_LINES_ENV = "CXR_PROGRESS_LINES"

RESUME_MUST_MATCH = ("model", "resolution", "fit", "batch_size", "grad_accum", "learning_rate",
                     "lr_scheduler", "lr_warmup_steps", "rank", "alpha", "target_modules", "seed",
                     "mixed_precision", "snr_gamma", "noise_offset", "random_flip", "lora_dropout")


# ---------------------------------------------------------------- checks ---------------------

def validate(cfg: TrainConfig) -> None:
    """Refuse bad settings before anything is loaded (ranges and types were checked when the
    config was built: config.check_settings)."""
    if not cfg.target_modules:
        raise CxrError("--target-modules is empty; name the UNet modules to adapt, e.g. to_k to_q to_v to_out.0")


def check_device(mixed_precision: str) -> str:
    """The device to train on; stops with a sentence when the card or precision cannot work."""
    if not torch.cuda.is_available():
        if mixed_precision == "fp16":
            raise CxrError("--mixed-precision fp16 needs a GPU and none is visible; use --mixed-precision no "
                           "on a CPU (or turn the GPU accelerator on in Kaggle's notebook settings)")
        return "cpu"
    from .gpu import check_cuda

    check_cuda("training")
    name = torch.cuda.get_device_name()
    if mixed_precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise CxrError(f"the {name} has no bf16; use --mixed-precision fp16")
    return "cuda"


# ---------------------------------------------------------------- encodings cache ------------

@dataclass
class Encodings:
    """Frozen-encoder outputs for every training pair, on the CPU."""

    moments: torch.Tensor  # (N, 2 * latent_channels, h, w): the VAE's mean and log-variance
    moments_flipped: torch.Tensor | None  # the same for the mirrored images
    prompt_index: torch.Tensor  # (N,) row of `embeddings` for each pair
    embeddings: torch.Tensor  # (P, 77, D): one per distinct prompt
    key: str
    hit: bool  # True when read from the cache, nothing encoded
    encoded_images: int
    encoded_prompts: int


def cache_key(cfg: TrainConfig, pairs: pd.DataFrame, data_dir: Path, weight_dtype: torch.dtype) -> str:
    h = hashlib.sha256()
    h.update(model_fingerprint(cfg.model, parts=ENCODER_PARTS).encode())  # the frozen encoders only
    h.update(f"|{cfg.resolution}|{cfg.fit}|{cfg.random_flip}|{weight_dtype}|".encode())
    for filename, prompt in zip(pairs["filename"], pairs["prompt"]):
        source = data_dir / "images" / "images_normalized" / filename
        stat = source.stat() if source.exists() else None
        h.update(f"{filename}:{stat.st_size if stat else -1}:{stat.st_mtime_ns if stat else -1}:{prompt}\n".encode())
    return h.hexdigest()[:20]


def encode_prompts(prompts: list[str], tokenizer, text_encoder, device, batch_size: int = 64) -> torch.Tensor:
    """CLIP last hidden states (P, 77, D), padded to 77 like SD1.5's pipeline does."""
    out = []
    for i in range(0, len(prompts), batch_size):
        ids = tokenizer(prompts[i:i + batch_size], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            out.append(text_encoder(ids.to(device), return_dict=False)[0].cpu())
    return torch.cat(out)


def encode_images(pixels: torch.Tensor, vae, device, dtype) -> torch.Tensor:
    """The VAE posterior's parameters (mean and log-variance), not a sample: each step samples."""
    with torch.no_grad():
        return vae.encode(pixels.to(device, dtype)).latent_dist.parameters.cpu()


def load_or_build_encodings(cfg: TrainConfig, pairs: pd.DataFrame, data_dir: Path, cache_dir: Path,
                            tokenizer, text_encoder, vae, device, weight_dtype, progress: bool = True) -> Encodings:
    from safetensors.torch import load_file, save_file

    from .dataset import ChestXrayDataset

    key = cache_key(cfg, pairs, data_dir, weight_dtype)
    path = cache_dir / f"encodings-{key}.safetensors"
    prompts = sorted(set(pairs["prompt"]))
    index = {p: i for i, p in enumerate(prompts)}
    prompt_index = torch.tensor([index[p] for p in pairs["prompt"]], dtype=torch.long)
    if path.is_file():
        cached = load_file(str(path))
        return Encodings(cached["moments"], cached.get("moments_flipped"), prompt_index, cached["embeddings"],
                         key, True, 0, 0)
    dataset = ChestXrayDataset(pairs, data_dir, cfg.resolution, cache_dir=cache_dir / "images", fit=cfg.fit)
    dataset.warm_cache(progress=progress)
    moments, flipped = [], []
    step = 16
    for start in tqdm(range(0, len(dataset), step), desc="encoding images (once)", disable=not progress):
        pixels = torch.stack([dataset[i]["pixel_values"] for i in range(start, min(start + step, len(dataset)))])
        moments.append(encode_images(pixels, vae, device, weight_dtype))
        if cfg.random_flip:
            flipped.append(encode_images(pixels.flip(-1), vae, device, weight_dtype))
    embeddings = encode_prompts(prompts, tokenizer, text_encoder, device)
    tensors = {"moments": torch.cat(moments).contiguous(), "embeddings": embeddings.contiguous()}
    if flipped:
        tensors["moments_flipped"] = torch.cat(flipped).contiguous()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"key": key, "model": cfg.model, "resolution": str(cfg.resolution)})
    return Encodings(tensors["moments"], tensors.get("moments_flipped"), prompt_index, embeddings, key, False,
                     len(dataset), len(prompts))


# ---------------------------------------------------------------- the step -------------------

def step_generator(seed: int, step: int, micro: int = 0, process: int = 0) -> torch.Generator:
    """All randomness of one micro-batch comes from here: resuming replays it exactly."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1_009 + micro) * 101 + process)


def batch_indices(n: int, seed: int, position: int, size: int) -> list[int]:
    """`size` indices from an endless stream of seeded per-epoch permutations of range(n)."""
    out = []
    while len(out) < size:
        epoch, offset = divmod(position, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7_919 + epoch))
        take = perm[offset: offset + size - len(out)].tolist()
        out += take
        position += len(take)
    return out


def diffusion_loss(unet, noise_scheduler, latents, embeddings, generator, cfg: TrainConfig,
                   prediction_type: str) -> torch.Tensor:
    """Noise-prediction MSE (optionally min-SNR weighted), as in diffusers' LoRA example."""
    from diffusers.training_utils import compute_snr

    device = latents.device
    noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
    if cfg.noise_offset:
        noise += cfg.noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator).to(device, latents.dtype)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator).to(device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    target = noise if prediction_type == "epsilon" else noise_scheduler.get_velocity(latents, noise, timesteps)
    pred = unet(noisy, timesteps, embeddings, return_dict=False)[0]
    if cfg.snr_gamma is None:
        return F.mse_loss(pred.float(), target.float(), reduction="mean")
    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.clamp(snr, max=cfg.snr_gamma)
    weights = weights / snr if prediction_type == "epsilon" else weights / (snr + 1)
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=[1, 2, 3])
    return (loss * weights).mean()


def sample_latents(enc: Encodings, rows: list[int], generator, flips: torch.Tensor | None, scale: float) -> torch.Tensor:
    """A latent sample from each row's cached posterior (mirrored rows from the flipped cache)."""
    moments = enc.moments[rows]
    if flips is not None and enc.moments_flipped is not None:
        moments = torch.where(flips[:, None, None, None], enc.moments_flipped[rows], moments)
    mean, logvar = moments.float().chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    return (mean + std * torch.randn(mean.shape, generator=generator)) * scale


# ---------------------------------------------------------------- checkpoints ----------------

def _lora_state(unet) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in get_peft_model_state_dict(unet).items()}


def _optimizer_tensors(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, slots in state["state"].items():
        for name, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _restore_optimizer(optimizer, tensors: dict[str, torch.Tensor], meta: dict, device) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value if name == "step" else value.to(device)
    for key, value in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def checkpoint_dirs(out: Path) -> list[Path]:
    folder = out / "checkpoints"
    return sorted(folder.glob("step-[0-9]*"), key=lambda p: int(p.name.split("-")[1])) if folder.is_dir() else []


def save_checkpoint(out: Path, step: int, unet, optimizer, lr_scheduler, cfg: TrainConfig, loss_rows: list[dict],
                    extra: dict | None = None) -> Path:
    """Write checkpoints/step-N atomically (a temp dir renamed into place), then prune old ones.

    If anything fails while writing, the temp dir is removed and the previous checkpoint stays.
    """
    from safetensors.torch import save_file

    folder = out / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:07d}"
    tmp = folder / f".tmp-step-{step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    previous = checkpoint_dirs(out)
    try:
        tmp.mkdir()
        save_file(_lora_state(unet), str(tmp / "lora.safetensors"))
        tensors, meta = _optimizer_tensors(optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        write_json(tmp / "optimizer.json", meta)
        write_csv(tmp / "loss.csv", pd.DataFrame(loss_rows, columns=LOSS_COLUMNS))
        # state.json last, with a digest of every other part: a truncated or edited file is caught on resume.
        files = {name: file_digest(tmp / name) for name in CHECKPOINT_PARTS}
        write_json(tmp / "state.json", {"step": step, "lr_scheduler": _jsonable(lr_scheduler.state_dict()),
                                        "config": config_to_dict(cfg), **(extra or {}), "files": files})
        give_umask_modes(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = previous[-1] if previous else None
        raise CxrError(f"could not write the checkpoint at step {step} ({exc.__class__.__name__}: {exc}); "
                       + (f"the previous checkpoint {kept} is intact: free disk space and run again with --resume latest"
                          if kept else "no earlier checkpoint exists: free disk space and start again")) from None
    for old in checkpoint_dirs(out)[:-cfg.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=lambda o: None))


def attached_checkpoints() -> list[Path]:
    """Checkpoints in earlier sessions' outputs attached as Kaggle inputs, newest step last.

    A Kaggle session starts with an empty /kaggle/working: a run cut off by the session limit is
    only found in that earlier output, mounted read-only under /kaggle/input.
    """
    root = kaggle_input()
    if not on_kaggle() or not root.is_dir():
        return []
    found = [p for p in root.glob("**/train/checkpoints/step-[0-9]*")
             if (p / "state.json").is_file() and (p / "lora.safetensors").is_file()]
    return sorted(found, key=lambda p: (int(p.name.split("-")[1]), str(p)))


def adopt_checkpoint(out: Path, source: Path) -> Path:
    """Copy an attached checkpoint into OUT/checkpoints (atomically: temp dir, then rename)."""
    target = out / "checkpoints" / source.name
    tmp = target.with_name(f".tmp-adopt-{source.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    os.replace(tmp, target)
    return target
CHECKPOINT_PARTS = ("lora.safetensors", "optimizer.safetensors", "optimizer.json", "loss.csv")
# What a resumed run must share with its checkpoint beyond the settings: the same pairs, the
# same base model files, the same number of processes (the LR schedule counts per-process
# steps) and the same prediction type.
RESUME_STATE_MUST_MATCH = ("pairs", "model_files", "processes", "prediction_type")


def check_resume(checkpoint: Path, cfg: TrainConfig, run_state: dict) -> dict:
    """The checkpoint's saved state, after checking it is whole and was made by a run like this
    one (`run_state`: RESUME_STATE_MUST_MATCH values of the run about to start). Works on any
    checkpoint folder, wherever it was found. One sentence per problem."""
    name = f"--resume {checkpoint}"
    missing = [part for part in ("state.json", *CHECKPOINT_PARTS) if not (checkpoint / part).is_file()]
    if missing:
        raise CxrError(f"{name}: the checkpoint lacks {', '.join(missing)} (incomplete or damaged); "
                       "resume from an earlier checkpoint or start again with --overwrite")
    try:
        state = read_json(checkpoint / "state.json")
        step = state["step"]
        saved = state["config"]
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise CxrError(f"{name}: state.json is damaged ({exc.__class__.__name__}); resume from an earlier "
                       "checkpoint or start again with --overwrite") from None
    if not isinstance(step, int) or isinstance(step, bool) or step < 1 or not isinstance(saved, dict):
        raise CxrError(f"{name}: state.json holds step {step!r}, not a positive step number; the file was edited")
    if checkpoint.name.startswith("step-") and checkpoint.name != f"step-{step:07d}":
        raise CxrError(f"{name}: the folder says step {checkpoint.name[5:].lstrip('0') or 0} and state.json "
                       f"says step {step}; the checkpoint was edited or renamed: resume from another one")
    for part, digest in (state.get("files") or {}).items():
        if file_digest(checkpoint / part) != digest:
            raise CxrError(f"{name}: {part} is not the file the run saved (truncated or edited); resume from "
                           "an earlier checkpoint or start again with --overwrite")
    mine = config_to_dict(cfg)
    differ = [k for k in RESUME_MUST_MATCH if json.dumps(saved.get(k)) != json.dumps(mine.get(k))]
    if differ:
        raise CxrError(f"{name}: the checkpoint was trained with different "
                       f"{', '.join(differ)} ({', '.join(f'{k}={saved.get(k)!r}' for k in differ)}); "
                       "resume with the same settings or start a new --out")
    differ = [k for k in RESUME_STATE_MUST_MATCH if k in state and state[k] != run_state.get(k)]
    if differ:
        what = {"pairs": "train pairs", "model_files": "base model files", "processes": "number of processes",
                "prediction_type": "prediction type"}
        raise CxrError(f"{name}: the checkpoint was made with other {', '.join(what[k] for k in differ)} ("
                       + "; ".join(f"{k}: {state[k]!r} then, {run_state.get(k)!r} now" for k in differ)
                       + "); resume it with the same inputs, or start a new --out")
    unchecked = [k for k in RESUME_STATE_MUST_MATCH if k not in state]
    if unchecked:
        print(f"warning: {checkpoint} predates the resume checks of {', '.join(unchecked)}; make sure they are "
              "the same as when it was written", flush=True)
    return state


def check_fresh_start(out: Path, identity: dict, overwrite: bool) -> None:
    """A run without --resume: never into a folder holding another run's checkpoints or LoRA
    (it would prune its own checkpoints in favour of the old ones); with --overwrite the old
    run is moved aside first (the content-keyed cache stays)."""
    from .ownership import claim, move_aside

    found = checkpoint_dirs(out)
    if found or (out / "lora").exists():
        where = f"checkpoints up to step {int(found[-1].name.split('-')[1])}" if found else "a trained LoRA"
        finished = " (finished)" if (out / "lora").exists() else ""
        if not overwrite:
            raise CxrError(f"{out} holds a training run ({where}{finished}); continue it with --resume latest, "
                           "start over with --overwrite (the old run is moved aside), or use another --out")
        moved = move_aside(out, keep=TRAIN_KEEP)
        print(f"--overwrite: moved the earlier run in {out} to {moved}", flush=True)
    claim(out, "train", identity, overwrite, ignore=TRAIN_KEEP, keep=TRAIN_KEEP)


TRAIN_KEEP = ("cache", "train_request.json")  # content-keyed cache; run_training's request for its children


def find_checkpoint(out: Path, resume: str) -> Path:
    if resume == "latest":
        found = checkpoint_dirs(out)
        # One process adopts (run_training does it before starting several).
        if not found and int(os.environ.get("RANK", "0")) == 0 and (attached := attached_checkpoints()):
            found = [adopt_checkpoint(out, attached[-1])]
            print(f"resume latest: continuing an earlier session's run from {attached[-1]} (copied to {found[0]})",
                  flush=True)
        if not found:
            raise CxrError(f"--resume latest: {out / 'checkpoints'} holds no checkpoint"
                           + (" and no attached input holds one" if on_kaggle() else "")
                           + "; start without --resume" + (", or attach the earlier session's output of this notebook "
                                                            "(Add Input > Your Work)" if on_kaggle() else ""))
        return found[-1]
    path = Path(resume).expanduser()
    if not (path / "state.json").is_file() or not (path / "lora.safetensors").is_file():
        raise CxrError(f"--resume {resume}: not a checkpoint folder (it needs state.json and lora.safetensors); "
                       f"use --resume latest or a folder under {out / 'checkpoints'}")
    return path


# ---------------------------------------------------------------- saving the LoRA ------------

def save_lora(out: Path, unet, cfg: TrainConfig, info: dict) -> Path:
    """OUT/lora/: the diffusers-format LoRA, config.json and the model card, swapped in whole."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    target = out / "lora"
    tmp = out / f".tmp-lora-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    layers = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in layers.items()}
    StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=layers, safe_serialization=True, weight_name=LORA_WEIGHTS)
    write_json(tmp / "config.json", {"base_model": cfg.model, "config": config_to_dict(cfg), **info,
                                     "versions": library_versions()})
    write_text(tmp / "README.md", model_card(cfg, info))
    give_umask_modes(tmp)
    old = out / f".old-lora-{os.getpid()}"
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def model_card(cfg: TrainConfig, info: dict) -> str:
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
pipe.load_lora_weights("path/to/this/folder", weight_name="pytorch_lora_weights.safetensors")
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

{info.get('steps_done')} steps, batch {cfg.batch_size} x accumulation {cfg.grad_accum} x {info.get('processes', 1)} process(es),
learning rate {cfg.learning_rate} ({cfg.lr_scheduler}), precision {cfg.mixed_precision}, seed {cfg.seed};
final loss {info.get('final_loss')}. Full settings and library versions: `config.json`.

## Limits

Research use only. These images are not for diagnosis, for clinical decisions, or as evidence of
any finding. The model learned from a few thousand films of one US institution; it reproduces
that data's biases and may reproduce training images (check with the project's memorisation
audit before sharing outputs). Fine detail is limited by the {cfg.resolution} px resolution.
"""


# ---------------------------------------------------------------- validation -----------------

def default_validation_prompts(pairs: str | Path | pd.DataFrame, n: int = 4) -> list[str]:
    """The most common test-split prompts (else train-split ones) of pairs.csv or its frame."""
    from .data import load_pairs

    if not isinstance(pairs, pd.DataFrame):
        pairs = load_pairs(pairs)
    pool = pairs[pairs["split"] == "test"] if (pairs["split"] == "test").any() else pairs
    return pool["prompt"].value_counts().head(n).index.tolist()


def validation_grid(pipe, cfg: TrainConfig, prompts, out_path: Path, title: str, lora_scale: float | None = None) -> Path:
    from . import plots
    from .sample import generate

    seeds = list(cfg.validation_seeds)
    images = generate(pipe, [p for p in prompts for _ in seeds], seeds * len(prompts), cfg.resolution,
                      cfg.validation_steps, lora_scale)
    captions = [f"seed {s} | {p}" for p in prompts for s in cfg.validation_seeds]
    plots.image_grid(images, captions, columns=len(cfg.validation_seeds),
                     save_to=out_path, title=title)
    return out_path


# ---------------------------------------------------------------- the stage ------------------

@dataclass
class TrainResult:
    out: Path
    lora_dir: Path
    steps_done: int
    loss: pd.DataFrame
    encodings_hit: bool
    encoded_images: int
    figures: list[Path]


def train(cfg: TrainConfig, progress: bool = True) -> TrainResult:
    """Train (or resume) and write OUT/lora, OUT/loss.csv, OUT/checkpoints, OUT/figures.

    The main process holds a lock on OUT for the whole run: a second run into it is refused."""
    import contextlib

    from .ownership import folder_lock

    validate(cfg)
    main_process = int(os.environ.get("RANK", "0")) == 0  # under accelerate launch, one lock per run
    with folder_lock(cfg.out, "train run") if main_process else contextlib.nullcontext():
        finished = finished_run(cfg)
        if finished is not None:
            if main_process:
                print(f"train: {cfg.out} already holds this run, finished at step {finished.steps_done} with the same "
                      "settings, pairs and base model; reusing its LoRA (--overwrite trains it again)", flush=True)
            return finished
        return _train(cfg, progress)


def finished_run(cfg: TrainConfig) -> TrainResult | None:
    """The run in cfg.out when it is finished and was made exactly as `cfg` would make it (same
    settings, train pairs and base model files): rerunning a notebook or a command then reuses
    it, as every other stage does with its own output. Anything else: None."""
    from .data import load_pairs
    from .ownership import read_owner

    out = Path(cfg.out)
    record = read_owner(out) if out.is_dir() else None
    if cfg.resume or cfg.overwrite or record is None or record.get("stage") != "train":
        return None
    try:
        info = read_json(out / "lora" / "config.json")
    except (OSError, ValueError):
        return None
    volatile = ("resume", "overwrite")
    same_settings = json.dumps({k: v for k, v in info.get("config", {}).items() if k not in volatile}, sort_keys=True) \
        == json.dumps({k: v for k, v in config_to_dict(cfg).items() if k not in volatile}, sort_keys=True, default=str)
    if not same_settings or not (out / "loss.csv").is_file():
        return None
    pairs = load_pairs(cfg.pairs)
    pairs = pairs[pairs["split"] == "train"]
    identity = record["identity"]
    if identity.get("pairs") != text_digest(f"{f}\t{p}" for f, p in zip(pairs["filename"], pairs["prompt"])) \
            or identity.get("model_files") != model_fingerprint(cfg.model):
        return None
    return result_from_disk(out)


def _train(cfg: TrainConfig, progress: bool = True) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers import StableDiffusionPipeline
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    from . import plots
    from .data import load_pairs, resolve_data_dir
    from .models import load_training_parts

    validate(cfg)
    pairs_all = load_pairs(cfg.pairs)
    pairs = pairs_all[pairs_all["split"] == "train"].reset_index(drop=True)
    if pairs.empty:
        raise CxrError(f"{cfg.pairs} has no train-split pairs; re-run prepare (its --test-fraction leaves none for training?)")
    data_dir = resolve_data_dir(cfg.data_dir)
    out = Path(cfg.out)
    resume_from = find_checkpoint(out, cfg.resume) if cfg.resume else None

    device_kind = check_device(cfg.mixed_precision)
    # check_device has refused fp16 without a GPU, so the precision passes through.
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                              cpu=device_kind == "cpu")
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    set_seed(cfg.seed)

    tokenizer, text_encoder, vae, unet, noise_scheduler = load_training_parts(cfg.model)
    for part in (text_encoder, vae, unet):
        part.requires_grad_(False)
        part.to(device, dtype=weight_dtype)
    prediction_type = cfg.prediction_type or noise_scheduler.config.prediction_type
    # Validation images (and the LoRA's config.json, which sample reads) use the trained target.
    noise_scheduler.register_to_config(prediction_type=prediction_type)

    processes = accelerator.num_processes
    run_state = {"pairs": text_digest(f"{f}\t{p}" for f, p in zip(pairs["filename"], pairs["prompt"])),
                 "model_files": model_fingerprint(cfg.model), "processes": processes,
                 "prediction_type": prediction_type}
    identity = {**{k: config_to_dict(cfg)[k] for k in RESUME_MUST_MATCH}, **run_state}
    state = None
    if accelerator.is_main_process:  # before anything is written into OUT
        if resume_from is not None:
            state = check_resume(resume_from, cfg, run_state)
            record_owner(out, "train", identity)
        else:
            check_fresh_start(out, identity, cfg.overwrite)
    accelerator.wait_for_everyone()
    if cfg.random_flip and accelerator.is_main_process:
        sided = int(pairs["prompt"].str.contains(r"\b(?:left|right)\b", case=False).sum())
        if sided:
            print(f"warning: --random-flip mirrors films whose prompts name a side ({sided} of {len(pairs)} train "
                  "pairs say left or right): the LoRA learns laterality at chance; leave it off to keep it",
                  flush=True)

    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else cache_root(out)  # on Kaggle: outside the output
    with accelerator.main_process_first():
        enc = load_or_build_encodings(cfg, pairs, data_dir, cache_dir, tokenizer, text_encoder, vae, device,
                                      weight_dtype, progress and accelerator.is_local_main_process
                                      and os.environ.get(PROGRESS_LINES_ENV) != "1")

    try:
        unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha or cfg.rank, init_lora_weights="gaussian",
                                    target_modules=list(cfg.target_modules), lora_dropout=cfg.lora_dropout))
    except ValueError:  # peft: "Target modules {...} not found in the base model"
        raise CxrError(f"--target-modules {', '.join(cfg.target_modules)} matched nothing in the UNet; "
                       "use the attention projections to_k, to_q, to_v, to_out.0") from None
    if weight_dtype != torch.float32:
        cast_training_params(unet, dtype=torch.float32)  # fp32 LoRA under fp16 autocast
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    lora_params = [p for p in unet.parameters() if p.requires_grad]
    if not lora_params:
        raise CxrError(f"--target-modules {', '.join(cfg.target_modules)} matched nothing in the UNet; "
                       "use the attention projections to_k, to_q, to_v, to_out.0")
    optimizer = torch.optim.AdamW(lora_params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)

    per_step = cfg.batch_size * cfg.grad_accum * processes
    max_steps = math.ceil(cfg.epochs * len(pairs) / per_step) if cfg.epochs is not None else cfg.max_steps
    try:
        # accelerate steps a prepared scheduler once per process per step: count in those units.
        lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps * processes,
                                     num_training_steps=max_steps * processes)
    except ValueError:
        raise CxrError(f"--lr-scheduler {cfg.lr_scheduler!r} is not known; use constant, "
                       "constant_with_warmup, cosine, linear or polynomial") from None

    start_step, loss_rows = 0, []
    if resume_from is not None:
        state = state or read_json(resume_from / "state.json")  # the other processes read it after the check
        try:
            set_peft_model_state_dict(unet, load_file(str(resume_from / "lora.safetensors")))
            cast_training_params(unet, dtype=torch.float32)
            _restore_optimizer(optimizer, load_file(str(resume_from / "optimizer.safetensors")),
                               read_json(resume_from / "optimizer.json"), device)
            lr_scheduler.load_state_dict(state["lr_scheduler"])
            loss_rows = pd.read_csv(resume_from / "loss.csv").to_dict("records")
        except Exception as exc:  # a checkpoint from before the digests, damaged: one sentence
            raise CxrError(f"--resume {resume_from}: the checkpoint does not load ({exc.__class__.__name__}: "
                           f"{str(exc).splitlines()[0][:120] if str(exc) else ''}); resume from an earlier one "
                           "or start again with --overwrite") from None
        start_step = int(state["step"])
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    if state is not None and state.get("grad_scaler") and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(state["grad_scaler"])  # fp16 loss scale: resume where it was

    def checkpoint_state() -> dict:
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
        return {**run_state, "grad_scaler": _jsonable(scaler)}

    figures_dir = out / "figures"
    prompts_val = list(cfg.validation_prompts) or default_validation_prompts(pairs_all)
    n_trainable = sum(p.numel() for p in lora_params)
    main = accelerator.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "train_config.json", max_steps=max_steps, processes=processes)
        # loss.csv restarts from the checkpoint's copy: steps after it (from a killed run) go.
        write_csv(out / "loss.csv", pd.DataFrame(loss_rows, columns=LOSS_COLUMNS))
        where = f"{device}" + (f" ({torch.cuda.get_device_name()})" if device_kind == "cuda" else "")
        cache_note = ("cache hit (nothing encoded)" if enc.hit
                      else f"cache miss (encoded {enc.encoded_images} images, {enc.encoded_prompts} prompts)")
        print(f"train: device {where}, precision {accelerator.mixed_precision}, trainable {n_trainable:,} LoRA "
              f"parameters (rank {cfg.rank}), steps {start_step}->{max_steps}, {len(pairs)} train pairs "
              f"({len(enc.embeddings)} prompts), batch {cfg.batch_size} x accum {cfg.grad_accum} x {processes} "
              f"process(es), {cache_note}", flush=True)

    def pipeline():
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                       unet=accelerator.unwrap_model(unet), scheduler=noise_scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def validate_now(step: int) -> None:
        if main and prompts_val:
            unet.eval()
            with accelerator.autocast():
                validation_grid(pipeline(), cfg, prompts_val, figures_dir / f"validation-step-{step:07d}.png",
                                f"validation at step {step}")
            unet.train()

    scale = vae.config.scaling_factor
    relayed = os.environ.get(PROGRESS_LINES_ENV) == "1"  # run_training turns these lines into its own bar
    bar = tqdm(total=max_steps, initial=start_step, desc="training",
               disable=relayed or not (progress and accelerator.is_local_main_process))
    unet.train()
    step = start_step
    while step < max_steps:
        tic = time.perf_counter()
        # LoRA dropout, if any, replays on resume; each process draws its own masks.
        torch.manual_seed(cfg.seed * 1_000_003 + step + accelerator.process_index * 7_919 * 1_000_003)
        losses = []
        for micro in range(cfg.grad_accum):
            gen = step_generator(cfg.seed, step, micro, accelerator.process_index)
            position = (step * cfg.grad_accum + micro) * cfg.batch_size * processes + cfg.batch_size * accelerator.process_index
            rows = batch_indices(len(pairs), cfg.seed, position, cfg.batch_size)
            flips = torch.rand(len(rows), generator=gen) < 0.5 if cfg.random_flip else None
            latents = sample_latents(enc, rows, gen, flips, scale).to(device, weight_dtype)
            embeddings = enc.embeddings[enc.prompt_index[rows]].to(device, weight_dtype)
            with accelerator.accumulate(unet), accelerator.autocast():
                loss = diffusion_loss(unet, noise_scheduler, latents, embeddings, gen, cfg, prediction_type)
                if not torch.isfinite(loss):
                    kept = checkpoint_dirs(out)
                    raise CxrError(
                        f"the loss became {loss.item()} at step {step + 1}; stopped without saving "
                        + (f"(the last good checkpoint is {kept[-1]}); " if kept else "(no checkpoint yet); ")
                        + "lower --learning-rate or use --mixed-precision no, then --resume latest")
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(lora_params, cfg.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append(accelerator.gather(loss.detach().reshape(1)).mean().item())
        step += 1
        elapsed = time.perf_counter() - tic
        row = {"step": step, "loss": float(np.mean(losses)), "lr": lr_scheduler.get_last_lr()[0],
               "epoch": step * per_step / len(pairs), "images_per_s": per_step / elapsed}
        loss_rows.append(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_s']:.1f}")
        if relayed and main:
            print(f"{PROGRESS_PREFIX}{step} {max_steps} {row['loss']:.5f} {row['images_per_s']:.2f}", flush=True)
        if main:
            with open(out / "loss.csv", "a") as handle:  # one line per step, readable while training
                handle.write(",".join(repr(row[c]) for c in LOSS_COLUMNS) + "\n")
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < max_steps:
            accelerator.wait_for_everyone()
            if main:
                save_checkpoint(out, step, accelerator.unwrap_model(unet), optimizer, lr_scheduler, cfg, loss_rows,
                                checkpoint_state())
        every = cfg.validation_every or cfg.checkpoint_every  # 0: a grid per checkpoint
        if every and step % every == 0 and step < max_steps:
            validate_now(step)
    bar.close()

    accelerator.wait_for_everyone()
    loss = pd.DataFrame(loss_rows, columns=LOSS_COLUMNS)
    figures: list[Path] = []
    lora_dir = out / "lora"
    if main:
        write_csv(out / "loss.csv", loss)  # the whole history, each step once
        save_checkpoint(out, step, accelerator.unwrap_model(unet), optimizer, lr_scheduler, cfg, loss_rows,
                        checkpoint_state())
        summary_path = Path(cfg.pairs).parent / "summary.json"
        info = {
            "steps_done": step, "processes": processes, "train_pairs": len(pairs),
            "train_prompts": len(enc.embeddings), "final_loss": round(float(loss["loss"].tail(20).mean()), 5) if len(loss) else None,
            "prediction_type": prediction_type, "encodings_cache": enc.key,
            "data_summary": read_json(summary_path) if summary_path.is_file() else None,
        }
        lora_dir = save_lora(out, accelerator.unwrap_model(unet), cfg, info)
        plots.loss_curve(loss, save_to=figures_dir / "loss_curve.png")
        validate_now(step)
        figures += [figures_dir / "loss_curve.png", figures_dir / f"validation-step-{step:07d}.png"]
    accelerator.end_training()
    return TrainResult(out, lora_dir, step, loss, enc.hit, enc.encoded_images, figures)


def base_vs_lora_grid(model: str, lora_dir: str | Path, prompts, seeds, resolution: int = 128, steps: int = 20,
                      save_to: str | Path | None = None):
    """For each prompt and seed: the base model (LoRA scale 0) beside the fine-tuned one, loaded
    the way any diffusers user would (`load_lora_weights`)."""
    from . import plots
    from .sample import generate, load_sampling_pipeline

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


def result_from_disk(out: str | Path) -> TrainResult:
    """A finished run's result, read back from its files."""
    out = Path(out)
    info = read_json(out / "lora" / "config.json")
    loss = pd.read_csv(out / "loss.csv")
    figures = sorted((out / "figures").glob("*.png"))
    return TrainResult(out, out / "lora", int(info["steps_done"]), loss, False, -1, figures)


def relay_output(lines, progress: bool = True, echo=print) -> int:
    """Show the children's output in the notebook cell: their progress lines drive one bar here
    (a relayed tqdm would redraw into thousands of lines), everything else is printed as is.
    Returns the last step reported."""
    bar, step = None, 0
    for line in lines:
        if not line.startswith(PROGRESS_PREFIX):
            echo(line, end="", flush=True)
            continue
        step_text, total, loss, images_per_s = line[len(PROGRESS_PREFIX):].split()
        step = int(step_text)
        if bar is None:
            bar = tqdm(total=int(total), initial=step - 1, desc="training", disable=not progress)
        bar.update(step - bar.n)
        bar.set_postfix(loss=loss, img_s=images_per_s)
    if bar is not None:
        bar.close()
    return step


def run_training(cfg: TrainConfig, processes: int | None = None, progress: bool = True) -> TrainResult:
    """Train here, or over several GPUs with `accelerate launch` (one notebook process cannot
    drive two cards; Kaggle's T4 x2 needs this). processes=None: one per visible GPU."""
    if processes is None:
        processes = torch.cuda.device_count() if torch.cuda.is_available() else 1
    if processes <= 1:
        return train(cfg, progress=progress)
    validate(cfg)
    if cfg.resume == "latest":
        find_checkpoint(Path(cfg.out), "latest")  # copy an attached earlier session's checkpoint here, once
    request = Path(cfg.out) / "train_request.json"
    save_config(cfg, request)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
               "--mixed_precision", cfg.mixed_precision, "-m", "cxr_helpers", "train", "--config-file", str(request)]
    print(" ".join(command), flush=True)
    env = {**os.environ, PROGRESS_LINES_ENV: "1"}
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        relay_output(proc.stdout, progress)
    if proc.returncode:
        raise CxrError(f"training on {processes} processes failed (exit {proc.returncode}); the lines above say why; "
                       "fix that and rerun with resume latest, or train on one GPU with processes=1")
    return result_from_disk(cfg.out)
