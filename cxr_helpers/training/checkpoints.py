"""Training checkpoints: save, find, prune, check and restore.

A checkpoint (OUT/checkpoints/step-N) holds the LoRA, the optimizer and the LR schedule as
safetensors + JSON, never a pickle, with the GradScaler and the run's identity in state.json:
a run killed at any moment resumes with `--resume latest` and ends with the same weights as an
uninterrupted run. On Kaggle, a checkpoint in an earlier session's attached output is adopted.
"""

from __future__ import annotations

import logging
import json
import os
import shutil
from pathlib import Path

import pandas as pd
import torch

from ..config.stages import TrainConfig, config_to_dict, output_identity
from ..core.environment import is_main_process, kaggle_input, on_kaggle
from ..core.errors import CxrError
from ..core.files import give_umask_modes, read_json, write_csv, write_json
from ..core.layout import (CACHE_DIR, CHECKPOINT_GLOB, CHECKPOINT_LORA, CHECKPOINT_OPTIMIZER, CHECKPOINT_OPTIMIZER_JSON,
                           CHECKPOINT_PREFIX, CHECKPOINT_STATE_JSON, CHECKPOINTS_DIR, LORA_SUBDIR, LOSS_CSV,
                           TRAIN_REQUEST_JSON, TRAIN_STAGE_DIR, checkpoint_name, checkpoint_step)
from ..core.ownership import file_digest

log = logging.getLogger(__name__)

LOSS_COLUMNS = ["step", "loss", "lr", "epoch", "images_per_s"]  # loss.csv, in the run and in each checkpoint
CHECKPOINT_PARTS = (CHECKPOINT_LORA, CHECKPOINT_OPTIMIZER, CHECKPOINT_OPTIMIZER_JSON, LOSS_CSV)
# A resumed run must share with its checkpoint the settings that shape the weights (the config's
# output_identity), or its weights mean nothing; and beyond the settings: the same pairs, the
# same base model files, the same number of processes (the LR schedule counts per-process
# steps) and the same prediction type.
RESUME_STATE_MUST_MATCH = ("pairs", "model_files", "processes", "prediction_type")
TRAIN_KEEP = (CACHE_DIR, TRAIN_REQUEST_JSON)  # content-keyed cache; run_training's request for its children


# ---------------------------------------------------------------- saving ---------------------

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


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=lambda o: None))


def checkpoint_dirs(out: Path) -> list[Path]:
    folder = out / CHECKPOINTS_DIR
    return sorted(folder.glob(CHECKPOINT_GLOB), key=checkpoint_step) if folder.is_dir() else []


def save_checkpoint(out: Path, step: int, unet, optimizer, lr_scheduler, cfg: TrainConfig, loss_rows: list[dict],
                    extra: dict | None = None) -> Path:
    """Write checkpoints/step-N atomically (a temp dir renamed into place), then prune old ones.

    If anything fails while writing, the temp dir is removed and the previous checkpoint stays.
    """
    from safetensors.torch import save_file

    folder = out / CHECKPOINTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / checkpoint_name(step)
    tmp = folder / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    previous = checkpoint_dirs(out)
    try:
        tmp.mkdir()
        save_file(_lora_state(unet), str(tmp / CHECKPOINT_LORA))
        tensors, meta = _optimizer_tensors(optimizer)
        save_file(tensors, str(tmp / CHECKPOINT_OPTIMIZER))
        write_json(tmp / CHECKPOINT_OPTIMIZER_JSON, meta)
        write_csv(tmp / LOSS_CSV, pd.DataFrame(loss_rows, columns=LOSS_COLUMNS))
        # state.json last, with a digest of every other part: a truncated or edited file is caught on resume.
        files = {name: file_digest(tmp / name) for name in CHECKPOINT_PARTS}
        write_json(tmp / CHECKPOINT_STATE_JSON, {"step": step, "lr_scheduler": _jsonable(lr_scheduler.state_dict()),
                                        "config": config_to_dict(cfg), **(extra or {}), "files": files})
        give_umask_modes(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = previous[-1] if previous else None
        raise CxrError(f"could not write the checkpoint at step {step} ({exc.__class__.__name__}: {exc}); "
                       + (f"the previous checkpoint {kept} is intact: free disk space and run again with "
                          "--resume latest"
                          if kept else "no earlier checkpoint exists: free disk space and start again")) from None
    for old in checkpoint_dirs(out)[:-cfg.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ---------------------------------------------------------------- finding --------------------

def attached_checkpoints() -> list[Path]:
    """Checkpoints in earlier sessions' outputs attached as Kaggle inputs, newest step last.

    A Kaggle session starts with an empty /kaggle/working: a run cut off by the session limit is
    only found in that earlier output, mounted read-only under /kaggle/input.
    """
    root = kaggle_input()
    if not on_kaggle() or not root.is_dir():
        return []
    found = [p for p in root.glob(f"**/{TRAIN_STAGE_DIR}/{CHECKPOINTS_DIR}/{CHECKPOINT_GLOB}")
             if (p / CHECKPOINT_STATE_JSON).is_file() and (p / CHECKPOINT_LORA).is_file()]
    return sorted(found, key=lambda p: (checkpoint_step(p), str(p)))


def adopt_checkpoint(out: Path, source: Path) -> Path:
    """Copy an attached checkpoint into OUT/checkpoints (atomically: temp dir, then rename)."""
    target = out / CHECKPOINTS_DIR / source.name
    tmp = target.with_name(f".tmp-adopt-{source.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    os.replace(tmp, target)
    return target


def find_checkpoint(out: Path, resume: str) -> Path:
    """The checkpoint `--resume` names: `latest` (here, else adopted from an attached earlier
    session on Kaggle) or a checkpoint folder."""
    if resume == "latest":
        found = checkpoint_dirs(out)
        # One process adopts (run_training does it before starting several).
        if not found and is_main_process() and (attached := attached_checkpoints()):
            found = [adopt_checkpoint(out, attached[-1])]
            log.info("resume latest: continuing an earlier session's run from %s (copied to %s)",
                     attached[-1], found[0])
        if not found:
            raise CxrError(f"--resume latest: {out / CHECKPOINTS_DIR} holds no checkpoint"
                           + (" and no attached input holds one" if on_kaggle() else "")
                           + "; start without --resume" + (", or attach the earlier session's output of this notebook "
                                                            "(Add Input > Your Work)" if on_kaggle() else ""))
        return found[-1]
    path = Path(resume).expanduser()
    if not (path / CHECKPOINT_STATE_JSON).is_file() or not (path / CHECKPOINT_LORA).is_file():
        raise CxrError(f"--resume {resume}: not a checkpoint folder (it needs {CHECKPOINT_STATE_JSON} and "
                       f"{CHECKPOINT_LORA}); use --resume latest or a folder under {out / CHECKPOINTS_DIR}")
    return path


# ---------------------------------------------------------------- checking -------------------

def check_resume(checkpoint: Path, cfg: TrainConfig, run_state: dict) -> dict:
    """The checkpoint's saved state, after checking it is whole and was made by a run like this
    one (the same output_identity; `run_state`: RESUME_STATE_MUST_MATCH values of the run about to
    start). Works on any checkpoint folder, wherever it was found. One sentence per problem."""
    name = f"--resume {checkpoint}"
    missing = [part for part in (CHECKPOINT_STATE_JSON, *CHECKPOINT_PARTS) if not (checkpoint / part).is_file()]
    if missing:
        raise CxrError(f"{name}: the checkpoint lacks {', '.join(missing)} (incomplete or damaged); "
                       "resume from an earlier checkpoint or start again with --overwrite")
    try:
        state = read_json(checkpoint / CHECKPOINT_STATE_JSON)
        step = state["step"]
        saved = state["config"]
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise CxrError(f"{name}: state.json is damaged ({exc.__class__.__name__}); resume from an earlier "
                       "checkpoint or start again with --overwrite") from None
    if not isinstance(step, int) or isinstance(step, bool) or step < 1 or not isinstance(saved, dict):
        raise CxrError(f"{name}: state.json holds step {step!r}, not a positive step number; the file was edited")
    if checkpoint.name.startswith(CHECKPOINT_PREFIX) and checkpoint.name != checkpoint_name(step):
        raise CxrError(f"{name}: the folder says step {checkpoint.name[len(CHECKPOINT_PREFIX):].lstrip('0') or 0} "
                       f"and state.json "
                       f"says step {step}; the checkpoint was edited or renamed: resume from another one")
    for part, digest in (state.get("files") or {}).items():
        if file_digest(checkpoint / part) != digest:
            raise CxrError(f"{name}: {part} is not the file the run saved (truncated or edited); resume from "
                           "an earlier checkpoint or start again with --overwrite")
    mine = output_identity(cfg, paths=False)  # the paths: by content, in run_state
    differ = [k for k in mine if json.dumps(saved.get(k)) != json.dumps(mine[k])]
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
        log.warning("%s predates the resume checks of %s; make sure they are the same as when it was written",
                    checkpoint, ", ".join(unchecked))
    return state


def check_fresh_start(out: Path, identity: dict, overwrite: bool) -> None:
    """A run without --resume: never into a folder holding another run's checkpoints or LoRA
    (it would prune its own checkpoints in favour of the old ones); with --overwrite the old
    run is moved aside first (the content-keyed cache stays)."""
    from ..core.ownership import claim, move_aside

    found = checkpoint_dirs(out)
    if found or (out / LORA_SUBDIR).exists():
        where = f"checkpoints up to step {checkpoint_step(found[-1])}" if found else "a trained LoRA"
        finished = " (finished)" if (out / LORA_SUBDIR).exists() else ""
        if not overwrite:
            raise CxrError(f"{out} holds a training run ({where}{finished}); continue it with --resume latest, "
                           "start over with --overwrite (the old run is moved aside), or use another --out")
        moved = move_aside(out, keep=TRAIN_KEEP)
        log.info("--overwrite: moved the earlier run in %s to %s", out, moved)
    claim(out, "train", identity, overwrite, ignore=TRAIN_KEEP, keep=TRAIN_KEEP)


# ---------------------------------------------------------------- restoring ------------------

def restore_checkpoint(checkpoint: Path, state: dict, unet, optimizer, lr_scheduler, device) -> tuple[int, list[dict]]:
    """Load the checkpoint's LoRA, optimizer and LR schedule into the run; returns its step and
    loss rows. A checkpoint that does not load (damaged, or from before the digests) stops the
    run with one sentence."""
    from diffusers.training_utils import cast_training_params
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    try:
        set_peft_model_state_dict(unet, load_file(str(checkpoint / CHECKPOINT_LORA)))
        cast_training_params(unet, dtype=torch.float32)
        _restore_optimizer(optimizer, load_file(str(checkpoint / CHECKPOINT_OPTIMIZER)),
                           read_json(checkpoint / CHECKPOINT_OPTIMIZER_JSON), device)
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        loss_rows = pd.read_csv(checkpoint / LOSS_CSV).to_dict("records")
    except Exception as exc:  # a checkpoint from before the digests, damaged: one sentence
        raise CxrError(f"--resume {checkpoint}: the checkpoint does not load ({exc.__class__.__name__}: "
                       f"{str(exc).splitlines()[0][:120] if str(exc) else ''}); resume from an earlier one "
                       "or start again with --overwrite") from None
    return int(state["step"]), loss_rows


def grad_scaler_state(accelerator) -> dict | None:
    """The fp16 loss scale as JSON (None without a GradScaler), for state.json."""
    scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
    return _jsonable(scaler)


def restore_grad_scaler(accelerator, state: dict | None) -> None:
    """The fp16 loss scale where the checkpoint left it (after accelerator.prepare made the scaler)."""
    if state is not None and state.get("grad_scaler") and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(state["grad_scaler"])
