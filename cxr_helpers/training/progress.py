"""Training progress across `accelerate launch`: its children report each step as one line with
a prefix, and the notebook's process turns those lines into one updating bar (relayed tqdm
redraws would be thousands of lines in a cell)."""

from __future__ import annotations

import os

from ..core.bars import tqdm

PROGRESS_PREFIX = "cxr-progress "
PROGRESS_LINES_ENV = "CXR_PROGRESS_LINES"  # set to "1" in the children's environment by run_training


def relayed() -> bool:
    """True in a child of run_training's `accelerate launch`: report lines, draw no bar."""
    return os.environ.get(PROGRESS_LINES_ENV) == "1"


def progress_line(step: int, max_steps: int, loss: float, images_per_s: float) -> str:
    return f"{PROGRESS_PREFIX}{step} {max_steps} {loss:.5f} {images_per_s:.2f}"


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
