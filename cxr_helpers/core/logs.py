"""Where the package's diagnostics go: every module logs to `logging.getLogger(__name__)` (under
"cxr_helpers"), and the entry points decide where the lines appear. The CLI sends them to stderr
while a command runs (`lines_to`); a notebook shows them under the cell that made them
(`show_in_notebook`, called by the notebooks' setup). Results the user asked for are printed by
the command or returned by the function, not logged."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import TextIO

PACKAGE_LOGGER = "cxr_helpers"


class LineFormatter(logging.Formatter):
    """A bare message per line; warnings and errors say so, like the "error:" sentences."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


def _line_handler(stream: TextIO) -> logging.Handler:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(LineFormatter())
    handler.set_name("cxr-lines")
    return handler


@contextlib.contextmanager
def lines_to(stream: TextIO) -> Iterator[None]:
    """While the block runs, the package's log lines (INFO and up) go to `stream`."""
    logger = logging.getLogger(PACKAGE_LOGGER)
    handler, level = _line_handler(stream), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def show_in_notebook() -> None:
    """In a Jupyter kernel, the package's INFO lines print under the running cell, as the
    stages' messages always did (without a handler, logging would show only warnings). Once per
    kernel: a second call adds nothing."""
    if not _in_a_kernel():
        return
    logger = logging.getLogger(PACKAGE_LOGGER)
    if not any(h.get_name() == "cxr-lines" for h in logger.handlers):
        logger.addHandler(_line_handler(sys.stdout))  # ipykernel's stdout writes under the running cell
        logger.setLevel(logging.INFO)


def _in_a_kernel() -> bool:
    """Whether this process is a Jupyter kernel's (not one that merely imported ipykernel, as
    papermill's own process does with ipykernel 6)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return shell is not None and getattr(shell, "kernel", None) is not None
