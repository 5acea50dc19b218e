"""The training stage: LoRA on SD1.5's UNet, on accelerate.

`train` reads top to bottom as the run's steps: load the pairs, set up accelerate, load the
frozen parts, claim the output folder, read (or build) the cached encodings, add the LoRA,
restore a checkpoint when resuming, loop, save. The frozen VAE and text encoder run once per
image and prompt (encodings.py), so the loop runs the UNet only.

Every step draws its randomness from generators seeded by (seed, step), and checkpoints
(checkpoints.py) hold the LoRA, the optimizer and the LR schedule as safetensors + JSON: a run
killed at any moment resumes with `--resume latest` and ends with the same weights as an
uninterrupted run.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from ..core.bars import tqdm

from .checkpoints import (LOSS_COLUMNS, checkpoint_dirs, find_checkpoint, grad_scaler_state, restore_checkpoint,
                          restore_grad_scaler, save_checkpoint)
from ..config.stages import TrainConfig, save_config
from .encodings import Encodings, load_or_build_encodings
from ..core.environment import cache_root, is_main_process
from ..core.errors import CxrError
from .validation import default_validation_prompts, validation_grid
from ..core.files import read_json, write_csv
from ..core.layout import (CHECKPOINT_STATE_JSON, FIGURES_DIR, LORA_CONFIG_JSON, LORA_SUBDIR, LOSS_CSV, LOSS_CURVE_PNG,
                           SUMMARY_JSON, TRAIN_CONFIG_JSON, validation_grid_name)
from .lora_export import save_lora
from ..core.ownership import model_fingerprint
from .progress import progress_line, relayed
from .setup import (add_lora, claim_output, frozen_parts, holds_finished_run, make_accelerator, make_lr_scheduler,
                    pairs_digest, train_pairs, warn_mirrored_sides)
from .step import batch_indices, diffusion_loss, sample_latents, step_generator

log = logging.getLogger(__name__)


def validate(cfg: TrainConfig) -> None:
    """Refuse bad settings before anything is loaded (settings.check_settings checked ranges and types)."""
    if not cfg.target_modules:
        raise CxrError("--target-modules is empty; name the UNet modules to adapt, e.g. to_k to_q to_v to_out.0")


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

    from ..core.ownership import folder_lock

    validate(cfg)
    main_process = is_main_process()  # under accelerate launch, one lock per run
    with folder_lock(cfg.out, "train run") if main_process else contextlib.nullcontext():
        if holds_finished_run(cfg):
            finished = result_from_disk(cfg.out)
            if main_process:
                log.info("train: %s already holds this run, finished at step %d with the same settings, pairs and "
                         "base model; reusing its LoRA (--overwrite trains it again)", cfg.out, finished.steps_done)
            return finished
        return _train(cfg, progress)


def result_from_disk(out: str | Path) -> TrainResult:
    """A finished run's result, read back from its files."""
    out = Path(out)
    info = read_json(out / LORA_SUBDIR / LORA_CONFIG_JSON)
    loss = pd.read_csv(out / LOSS_CSV)
    figures = sorted((out / FIGURES_DIR).glob("*.png"))
    return TrainResult(out, out / LORA_SUBDIR, int(info["steps_done"]), loss, False, -1, figures)


# ---------------------------------------------------------------- the run, step by step ------

def _train(cfg: TrainConfig, progress: bool = True) -> TrainResult:
    from ..data.tables import resolve_data_dir

    # The inputs (the settings were checked by train): train pairs, the checkpoint to resume (if any).
    pairs_all, pairs = train_pairs(cfg)
    data_dir = resolve_data_dir(cfg.data_dir)
    out = Path(cfg.out)
    resume_from = find_checkpoint(out, cfg.resume) if cfg.resume else None
    # accelerate on a device that can run the precision; SD1.5's parts, frozen, in that precision.
    accelerator, weight_dtype = make_accelerator(cfg)
    device, processes = accelerator.device, accelerator.num_processes
    tokenizer, text_encoder, vae, unet, noise_scheduler = frozen_parts(cfg.model, device, weight_dtype)
    prediction_type = cfg.prediction_type or noise_scheduler.config.prediction_type
    # Validation images (and the LoRA's config.json, which sample reads) use the trained target.
    noise_scheduler.register_to_config(prediction_type=prediction_type)
    # Claim OUT: resume only a checkpoint of a run like this one, start fresh only where no other run is.
    run_state = {"pairs": pairs_digest(pairs), "model_files": model_fingerprint(cfg.model), "processes": processes,
                 "prediction_type": prediction_type}
    state = claim_output(cfg, out, accelerator, resume_from, run_state)
    warn_mirrored_sides(cfg, pairs, accelerator)
    # The frozen encoders' outputs, from the cache (built once, by the main process first).
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else cache_root(out)  # on Kaggle: outside the output
    with accelerator.main_process_first():
        enc = load_or_build_encodings(cfg, pairs, data_dir, cache_dir, tokenizer, text_encoder, vae, device,
                                      weight_dtype, progress and accelerator.is_local_main_process and not relayed())
    # The LoRA, its optimizer and LR schedule; restored from the checkpoint when resuming.
    lora_params = add_lora(unet, cfg, weight_dtype)
    optimizer = torch.optim.AdamW(lora_params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    per_step = cfg.batch_size * cfg.grad_accum * processes
    max_steps = math.ceil(cfg.epochs * len(pairs) / per_step) if cfg.epochs is not None else cfg.max_steps
    lr_scheduler = make_lr_scheduler(cfg, optimizer, max_steps, processes)
    start_step, loss_rows = 0, []
    if resume_from is not None:
        state = state or read_json(resume_from / CHECKPOINT_STATE_JSON)  # the other processes read it after the check
        start_step, loss_rows = restore_checkpoint(resume_from, state, unet, optimizer, lr_scheduler, device)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    restore_grad_scaler(accelerator, state)  # fp16 loss scale: resume where it was
    # Train, then save the LoRA and the figures.
    model = _Model(unet, noise_scheduler, prediction_type, weight_dtype, tokenizer, text_encoder, vae)
    validation_prompts = list(cfg.validation_prompts) or default_validation_prompts(pairs_all, data_dir=data_dir)
    run = _Run(cfg, out, accelerator, model, _Optimizer(lora_params, optimizer, lr_scheduler), enc, max_steps,
               per_step, run_state, validation_prompts)
    _start_log(run, start_step, loss_rows)
    step = _train_loop(run, start_step, loss_rows, progress)
    return _finish(run, step, loss_rows)


@dataclass(frozen=True)
class _Model:
    """What a step runs and a validation grid draws with: the UNet with its LoRA (prepared by
    accelerate), the noise schedule it learns, and the frozen parts in the run's precision."""

    unet: object
    noise_scheduler: object  # with the trained prediction type registered
    prediction_type: str
    weight_dtype: torch.dtype
    tokenizer: object
    text_encoder: object
    vae: object


@dataclass(frozen=True)
class _Optimizer:
    """What moves the LoRA: its fp32 parameters, AdamW and the LR schedule (prepared by accelerate)."""

    params: list
    adamw: object
    lr_schedule: object


@dataclass(frozen=True)
class _Run:
    """What the loop and the end of a run read, fixed once everything is set up (the step and
    the loss rows, which change, are the loop's own)."""

    cfg: TrainConfig
    out: Path
    accelerator: object
    model: _Model
    optim: _Optimizer
    enc: Encodings
    max_steps: int
    per_step: int  # images per optimizer step, over every process
    run_state: dict  # the checks a resumed run must pass, saved in every checkpoint
    validation_prompts: list[str]


def _start_log(run: _Run, start_step: int, loss_rows: list[dict]) -> None:
    """The run's settings and loss.csv (restarted from the checkpoint's copy: steps after it, from
    a killed run, go), and one line saying what is about to run."""
    cfg, accelerator, enc = run.cfg, run.accelerator, run.enc
    if not accelerator.is_main_process:
        return
    processes = accelerator.num_processes
    run.out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run.out / TRAIN_CONFIG_JSON, max_steps=run.max_steps, processes=processes)
    write_csv(run.out / LOSS_CSV, pd.DataFrame(loss_rows, columns=LOSS_COLUMNS))
    device = accelerator.device
    where = f"{device}" + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else "")
    cache_note = ("cache hit (nothing encoded)" if enc.hit
                  else f"cache miss (encoded {enc.encoded_images} images, {enc.encoded_prompts} prompts)")
    log.info(f"train: device {where}, precision {accelerator.mixed_precision}, trainable "
             f"{sum(p.numel() for p in run.optim.params):,} LoRA parameters (rank {cfg.rank}), steps {start_step}->"
             f"{run.max_steps}, {len(enc)} train pairs ({len(enc.embeddings)} prompts), batch {cfg.batch_size} x "
             f"accum {cfg.grad_accum} x {processes} process(es), {cache_note}")


# ---------------------------------------------------------------- the loop -------------------

def _train_loop(run: _Run, step: int, loss_rows: list[dict], progress: bool) -> int:
    """Optimizer steps from `step` to max_steps; returns the last step done."""
    cfg, accelerator = run.cfg, run.accelerator
    bar = tqdm(total=run.max_steps, initial=step, desc="training",
               disable=relayed() or not (progress and accelerator.is_local_main_process))
    run.model.unet.train()
    while step < run.max_steps:
        tic = time.perf_counter()
        # LoRA dropout, if any, replays on resume; each process draws its own masks.
        torch.manual_seed(cfg.seed * 1_000_003 + step + accelerator.process_index * 7_919 * 1_000_003)
        # Forward, loss and backward for each micro-batch; the optimizer steps once they are all in.
        losses = [_micro_batch(run, step, micro) for micro in range(cfg.grad_accum)]
        step += 1
        # Log the step: loss.csv, the bar, and the progress line a relaying parent reads.
        elapsed = time.perf_counter() - tic
        row = {"step": step, "loss": float(np.mean(losses)), "lr": run.optim.lr_schedule.get_last_lr()[0],
               "epoch": step * run.per_step / len(run.enc), "images_per_s": run.per_step / elapsed}
        loss_rows.append(row)
        _log_step(run, row, bar)
        # Checkpoint and validation grid every so many steps (the last step's are written by _finish).
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < run.max_steps:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                _save_checkpoint(run, step, loss_rows)
        every = cfg.validation_every or cfg.checkpoint_every  # 0: a grid per checkpoint
        if every and step % every == 0 and step < run.max_steps:
            _validate_now(run, step)
    bar.close()
    return step


def _micro_batch(run: _Run, step: int, micro: int) -> float:
    """One micro-batch's forward and backward pass; returns its loss averaged over processes."""
    cfg, accelerator, enc, model, optim = run.cfg, run.accelerator, run.enc, run.model, run.optim
    device, process, processes = accelerator.device, accelerator.process_index, accelerator.num_processes
    # This micro-batch's randomness and rows come from (seed, step, micro, process): a resume replays them.
    gen = step_generator(cfg.seed, step, micro, process)
    position = (step * cfg.grad_accum + micro) * cfg.batch_size * processes + cfg.batch_size * process
    rows = batch_indices(len(enc), cfg.seed, position, cfg.batch_size)
    flips = torch.rand(len(rows), generator=gen) < 0.5 if cfg.random_flip else None
    # Latents sampled from the cached VAE posteriors; the prompts' cached embeddings.
    latents = sample_latents(enc, rows, gen, flips, model.vae.config.scaling_factor).to(device, model.weight_dtype)
    embeddings = enc.embeddings[enc.prompt_index[rows]].to(device, model.weight_dtype)
    with accelerator.accumulate(model.unet), accelerator.autocast():
        # Noise at random timesteps, the UNet's prediction, the loss.
        loss = diffusion_loss(model.unet, model.noise_scheduler, latents, embeddings, gen, cfg, model.prediction_type)
        if not torch.isfinite(loss):
            kept = checkpoint_dirs(run.out)
            raise CxrError(
                f"the loss became {loss.item()} at step {step + 1}; stopped without saving "
                + (f"(the last good checkpoint is {kept[-1]}); " if kept else "(no checkpoint yet); ")
                + "lower --learning-rate or use --mixed-precision no, then --resume latest")
        # Backward; clip once gradients are synced; accelerate skips the optimizer steps in between.
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(optim.params, cfg.max_grad_norm)
        optim.adamw.step()
        optim.lr_schedule.step()
        optim.adamw.zero_grad(set_to_none=True)
    return accelerator.gather(loss.detach().reshape(1)).mean().item()


def _log_step(run: _Run, row: dict, bar) -> None:
    bar.update(1)
    bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_s']:.1f}")
    if not run.accelerator.is_main_process:
        return
    if relayed():
        print(progress_line(row["step"], run.max_steps, row["loss"], row["images_per_s"]), flush=True)
    with open(run.out / LOSS_CSV, "a") as handle:  # one line per step, readable while training
        handle.write(",".join(repr(row[c]) for c in LOSS_COLUMNS) + "\n")


def _save_checkpoint(run: _Run, step: int, loss_rows: list[dict]) -> None:
    save_checkpoint(run.out, step, run.accelerator.unwrap_model(run.model.unet), run.optim.adamw, run.optim.lr_schedule,
                    run.cfg, loss_rows, {**run.run_state, "grad_scaler": grad_scaler_state(run.accelerator)})


def _validate_now(run: _Run, step: int) -> None:
    """The validation grid at this step (main process), drawn with the LoRA as it is now."""
    from diffusers import StableDiffusionPipeline

    if not (run.accelerator.is_main_process and run.validation_prompts):
        return
    model = run.model
    model.unet.eval()
    pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                   unet=run.accelerator.unwrap_model(model.unet), scheduler=model.noise_scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    with run.accelerator.autocast():
        validation_grid(pipe, run.cfg, run.validation_prompts, run.out / FIGURES_DIR / validation_grid_name(step),
                        f"validation at step {step}")
    model.unet.train()


# ---------------------------------------------------------------- the end --------------------

def _finish(run: _Run, step: int, loss_rows: list[dict]) -> TrainResult:
    """The whole loss history, the last checkpoint, the LoRA with its model card, the loss curve
    and the last validation grid."""
    from ..figures import plots

    run.accelerator.wait_for_everyone()
    loss = pd.DataFrame(loss_rows, columns=LOSS_COLUMNS)
    figures: list[Path] = []
    lora_dir = run.out / LORA_SUBDIR
    if run.accelerator.is_main_process:
        write_csv(run.out / LOSS_CSV, loss)  # the whole history, each step once
        _save_checkpoint(run, step, loss_rows)
        unet = run.accelerator.unwrap_model(run.model.unet)
        lora_dir = save_lora(run.out, unet, run.cfg, _lora_info(run, step, loss))
        figures_dir = run.out / FIGURES_DIR
        plots.loss_curve(loss, save_to=figures_dir / LOSS_CURVE_PNG)
        _validate_now(run, step)
        figures += [figures_dir / LOSS_CURVE_PNG, figures_dir / validation_grid_name(step)]
    run.accelerator.end_training()
    return TrainResult(run.out, lora_dir, step, loss, run.enc.hit, run.enc.encoded_images, figures)


def _lora_info(run: _Run, step: int, loss: pd.DataFrame) -> dict:
    """What the LoRA's config.json and model card say about the run."""
    summary_path = Path(run.cfg.pairs).parent / SUMMARY_JSON
    return {
        "steps_done": step, "processes": run.accelerator.num_processes, "train_pairs": len(run.enc),
        "train_prompts": len(run.enc.embeddings),
        "final_loss": round(float(loss["loss"].tail(20).mean()), 5) if len(loss) else None,
        "prediction_type": run.model.prediction_type, "encodings_cache": run.enc.key,
        "data_summary": read_json(summary_path) if summary_path.is_file() else None,
    }
