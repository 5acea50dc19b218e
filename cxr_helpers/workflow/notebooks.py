"""Notebook plumbing: where inputs and outputs are (Kaggle or not, demo or real), recording
values for tests, and running the notebooks headless through papermill."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..config.stages import SynthConfig, TinyModelConfig, stage_config
from ..core.environment import cache_root, kaggle_input, kaggle_working, on_kaggle
from ..core.errors import CxrError
from ..core.logs import show_in_notebook
from ..core.files import read_json, write_json
from ..core.layout import (DATA_STAGE_DIR, DEMO_INPUTS_DIR, FIGURES_DIR, LORA_SUBDIR, PAIRS_CSV, RECORDS_DIR,
                           TRAIN_STAGE_DIR)
from ..config.presets import Preset, get_preset, preset_name

NOTEBOOKS_DIR = Path(__file__).resolve().parents[2] / "notebooks"
# What a kernel logs to the stderr it inherits that says nothing about the notebook, so it is not
# passed on: ipykernel's start-up warning (papermill's kernels are local and short-lived), and the
# line it logs when the interrupt that jupyter_client sends before every shutdown lands while the
# kernel is busy finishing (timing: seen under load only).
KERNEL_NOISE = (b"Kernel is running over TCP without encryption", b"KeyboardInterrupt caught in kernel")
# ipykernel 6.25 (the oldest environment's) imports debugpy, in each kernel and once in papermill's
# process, and debugpy warns about Python 3.11's frozen modules each time; its own switch turns
# the check off (nothing here is debugged), set in this process so the kernels inherit it.
QUIET_DEBUGGER = ("PYDEVD_DISABLE_FILE_VALIDATION", "1")
log = logging.getLogger(__name__)


def output_dir(path: str | os.PathLike = "") -> Path:
    """The given folder, else /kaggle/working/cxr-lora on Kaggle, else ./outputs."""
    if path:
        return Path(path).expanduser()
    return kaggle_working() / "cxr-lora" if on_kaggle() else Path("outputs")


@dataclass
class Inputs:
    preset: Preset  # resolved: never "auto"
    data_dir: Path
    model: str
    out: Path
    cache: Path  # resized images, latents, features: shared by every stage, outside Kaggle's output

    def figures(self, notebook: str) -> Path:
        folder = self.out / FIGURES_DIR / notebook
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def __repr__(self) -> str:  # what the notebooks display: one line per field
        return "\n".join([f"preset   {self.preset.name}: {self.preset.description}", f"data     {self.data_dir}",
                          f"model    {self.model}", f"output   {self.out}", f"cache    {self.cache}"])


def resolve_inputs(preset: str = "auto", data_dir: str = "", model: str = "",
                   out: str | os.PathLike = "", progress: bool = True) -> Inputs:
    """Where this run reads its data and model from.

    Offline presets build the synthetic dataset and the tiny model under OUT/demo_inputs (once;
    later runs reuse them). Otherwise the data is the Kaggle mount (or `data_dir`) and the model
    is the preset's hub id (or `model`).
    """
    from ..data.tables import resolve_data_dir
    from ..demo.synthetic_dataset import dataset_is_built, make_synthetic_dataset
    from ..demo.tiny_model import make_tiny_model, tiny_model_is_built

    show_in_notebook()  # the stages' log lines under the cell that runs them

    chosen = get_preset(preset)
    preset = chosen.name
    out = output_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    if chosen.offline:
        demo = out / DEMO_INPUTS_DIR
        if not data_dir:
            synth = stage_config(SynthConfig, preset, out=str(demo / "synthetic_data"))
            if not dataset_is_built(synth.out, synth):
                make_synthetic_dataset(synth, progress=progress)
            data_dir = synth.out
        if not model:
            tiny = stage_config(TinyModelConfig, preset, out=str(demo / "tiny_model"))
            if not tiny_model_is_built(tiny.out, tiny):
                make_tiny_model(tiny, progress=progress)
            model = tiny.out
    return Inputs(chosen, resolve_data_dir(data_dir), model or chosen.model, out, cache_root(out))


def prepared_pairs(inputs: Inputs, lora_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """The pairs to work on: those the LoRA was trained on (its run's data/pairs.csv, also when
    that run is an attached Kaggle output), so the test split is the one it never saw; else
    OUT/data/pairs.csv (notebook 01's); else made now with the preset's settings."""
    from ..config.stages import PrepareConfig
    from ..data.stage import prepare

    if lora_dir is not None:
        trained_on = Path(lora_dir).parent.parent / DATA_STAGE_DIR / PAIRS_CSV
        if trained_on.is_file():
            return trained_on
    pairs = inputs.out / DATA_STAGE_DIR / PAIRS_CSV
    if pairs.is_file():
        return pairs
    cfg = stage_config(PrepareConfig, inputs.preset.name, data_dir=str(inputs.data_dir),
                       out=str(pairs.parent), tokenizer=inputs.model)
    prepare(cfg, progress=progress)
    return pairs


def record(out: str | os.PathLike, notebook: str, **values) -> dict:
    """Merge `values` into OUT/records/NOTEBOOK.json (what tests read back) and return them."""
    path = Path(out) / RECORDS_DIR / f"{notebook}.json"
    current = read_json(path) if path.is_file() else {}
    current.update(json.loads(json.dumps(values, default=str)))
    write_json(path, current)
    return values


def list_notebooks(folder: str | os.PathLike = NOTEBOOKS_DIR) -> list[Path]:
    found = sorted(Path(folder).glob("[0-9][0-9]_*.ipynb"))
    if not found:
        raise CxrError(f"no numbered notebooks (NN_name.ipynb) in {folder}; run from the repository root "
                       "or pass --notebooks DIR")
    return found


def run_notebooks(out: str | os.PathLike, preset: str = "smoke", notebooks: str | os.PathLike = NOTEBOOKS_DIR,
                  parameters: dict | None = None, timeout: int = 1800, only: list[str] | None = None) -> list[Path]:
    """Execute every notebook in order through papermill; executed copies go to OUT/notebooks.

    Each notebook gets PRESET and OUTPUT_DIR (plus `parameters`), so all of them share one
    output folder and each reads what the one before it wrote.
    """
    os.environ.setdefault(*QUIET_DEBUGGER)
    import papermill

    preset_name(preset)  # an unknown name fails before any notebook starts
    out = Path(out).resolve()
    executed_dir = out / "notebooks"
    executed_dir.mkdir(parents=True, exist_ok=True)
    chosen = [source for source in list_notebooks(notebooks)
              if not only or any(source.name.startswith(o) for o in only)]
    done = []
    for k, source in enumerate(chosen, 1):
        target = executed_dir / source.name
        params = {"PRESET": preset, "OUTPUT_DIR": str(out), **(parameters or {})}
        log.info("notebook %d/%d %s: running", k, len(chosen), source.name)
        start = time.monotonic()
        try:
            papermill.execute_notebook(
                str(source), str(target), parameters=params, kernel_name="python3",
                execution_timeout=timeout, progress_bar=False, cwd=str(out),
                kernel_manager_class=_kernel_manager_class(),
            )
        except papermill.PapermillExecutionError as exc:
            raise CxrError(f"notebook {source.name} failed in cell {exc.exec_count}: {exc.ename}: "
                           f"{exc.evalue} (the executed copy with the traceback is {target})") from None
        log.info("notebook %d/%d %s: done in %.0f s", k, len(chosen), source.name, time.monotonic() - start)
        done.append(target)
    return done


def _kernel_manager_class():
    """jupyter_client's kernel manager, with the kernel's stderr relayed to ours less KERNEL_NOISE."""
    from jupyter_client.manager import AsyncKernelManager

    class RelayingKernelManager(AsyncKernelManager):
        async def _async_launch_kernel(self, kernel_cmd, **kw):  # jupyter_client's hook for launching
            read_end, write_end = os.pipe()
            try:
                await super()._async_launch_kernel(kernel_cmd, **{**kw, "stderr": write_end})
            finally:
                os.close(write_end)  # the kernel holds its own copy: the relay ends when it exits
            threading.Thread(target=_relay_stderr, args=(read_end,), daemon=True).start()

    return RelayingKernelManager


def _relay_stderr(fd: int) -> None:
    with open(fd, "rb") as pipe:
        for line in pipe:
            if not any(noise in line for noise in KERNEL_NOISE):
                sys.stderr.write(line.decode(errors="replace"))
                sys.stderr.flush()


def trained_lora(inputs: Inputs, lora_dir: str = "") -> Path:
    """The LoRA to sample from: `lora_dir`, else notebook 02's OUT/train/lora (on Kaggle also a
    previous run's output attached as input)."""
    from ..core.layout import LORA_WEIGHTS

    candidates = [Path(lora_dir)] if lora_dir else [inputs.out / TRAIN_STAGE_DIR / LORA_SUBDIR]
    if not lora_dir and on_kaggle():
        candidates += sorted(kaggle_input().glob(f"**/{TRAIN_STAGE_DIR}/{LORA_SUBDIR}"))
    for path in candidates:
        if (path / LORA_WEIGHTS).is_file():
            return path
    raise CxrError(f"no trained LoRA at {candidates[0]}; run notebook 02 into this OUTPUT_DIR first "
                   "(or attach its output on Kaggle), or set LORA_DIR to a lora/ folder")
