"""Training on several GPUs: one notebook process cannot drive two cards (Kaggle's T4 x2 needs
this), so run_training starts the train stage under `accelerate launch` and relays its output."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import torch

from .checkpoints import find_checkpoint
from ..config.stages import TrainConfig, save_config
from ..core.errors import CxrError
from ..core.layout import TRAIN_REQUEST_JSON
from .progress import PROGRESS_LINES_ENV, relay_output
from .stage import TrainResult, result_from_disk, train, validate

log = logging.getLogger(__name__)


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
    request = Path(cfg.out) / TRAIN_REQUEST_JSON
    save_config(cfg, request)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
               "--mixed_precision", cfg.mixed_precision, "-m", "cxr_helpers", "train", "--config-file", str(request)]
    log.info(" ".join(command))
    env = {**os.environ, PROGRESS_LINES_ENV: "1"}
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        relay_output(proc.stdout, progress)
    if proc.returncode:
        raise CxrError(f"training on {processes} processes failed (exit {proc.returncode}); the lines above say why; "
                       "fix that and rerun with resume latest, or train on one GPU with processes=1")
    return result_from_disk(cfg.out)
