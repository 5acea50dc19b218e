"""Shared file plumbing: atomic writes, and the JSON, CSV and figure files written through them."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any
from collections.abc import Iterator


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


# mkstemp creates files 0600 whatever the umask; outputs get the mode any other file would get.
FILE_MODE = 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds.

    A run killed mid-write leaves at most a stray temp file, never a half-written `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, FILE_MODE)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, FILE_MODE)  # a writer that replaced the temp file (safetensors does) made it 0600
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def staged_outputs(folder: str | os.PathLike, names: tuple[str, ...]) -> Iterator[Path]:
    """A folder beside `folder`'s outputs to write a run's `names` into; when the block ends well
    they replace the earlier run's together (any named one this run did not make is removed, so
    no file of an earlier run is left beside the new ones); when it fails, the earlier outputs
    stay whole and the partial ones are removed. The caller holds the folder's lock."""
    from .layout import STAGING_DIR

    folder = Path(folder)
    staging = folder / STAGING_DIR
    if staging.exists():
        shutil.rmtree(staging)  # what a run killed mid-write left
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for name in names:
        target = folder / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        if (staging / name).exists():
            os.replace(staging / name, target)
    shutil.rmtree(staging)


def give_umask_modes(folder: str | os.PathLike) -> None:
    """Files a library wrote into `folder` get the umask's mode (safetensors writes 0600)."""
    for file in Path(folder).rglob("*"):
        if file.is_file():
            os.chmod(file, FILE_MODE)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_user_json(path: str | os.PathLike, what: str, missing_hint: str) -> Any:
    """A JSON file the user wrote, or one sentence saying what is wrong with it."""
    from .errors import CxrError

    from .bounds import MAX_JSON_BYTES, MAX_JSON_DEPTH, check_file_size, json_depth

    path = Path(path)
    if not path.is_file():
        raise CxrError(f"{what} {path} does not exist; {missing_hint}")
    check_file_size(path, MAX_JSON_BYTES, what)
    too_deep = (f"{what} {path} nests lists or objects more than {MAX_JSON_DEPTH} deep; "
                "write it flat, as its documentation shows")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CxrError(f"{what} {path} is not valid JSON (line {exc.lineno}: {exc.msg}); fix it") from None
    except UnicodeDecodeError as exc:
        raise CxrError(f"{what} {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except RecursionError:  # nested past the parser's own limit: deeper than MAX_JSON_DEPTH
        raise CxrError(too_deep) from None
    if json_depth(value) > MAX_JSON_DEPTH:
        raise CxrError(too_deep)
    return value


# A spreadsheet runs a cell that starts with one of these as a formula (CSV injection: a prompt
# "=HYPERLINK(...)" in metadata.csv). write_csv gives such a text cell a leading apostrophe (the
# usual rule), and one that starts with an apostrophe too, so read_csv gives back exactly what was
# written. The Kaggle-layout exports are written raw (formula_safe=False): they stand for the
# dataset's own files, which prepare reads as they are.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "'")


def _formula_safe(value: Any) -> Any:
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value


def _as_written(value: Any) -> Any:
    return value[1:] if isinstance(value, str) and value.startswith("'") else value


def _text_columns(frame) -> list:
    return list(frame.select_dtypes(include=["object", "string"]).columns)


def write_csv(path: str | os.PathLike, frame, formula_safe: bool = True) -> Path:
    """Write a pandas DataFrame atomically, without its index; text cells a spreadsheet would run
    as formulas are escaped (read them back with read_csv)."""
    if formula_safe:
        frame = frame.copy()
        for column in _text_columns(frame):
            frame[column] = frame[column].map(_formula_safe)
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return Path(path)


def unescape_cells(frame):
    """The text cells of a frame read from a write_csv file, as they were before escaping."""
    for column in _text_columns(frame):
        frame[column] = frame[column].map(_as_written)
    return frame


def read_csv(path: str | os.PathLike, **kwargs):
    """A CSV written by write_csv, its text cells as they were written (pandas.read_csv's arguments)."""
    import pandas as pd

    return unescape_cells(pd.read_csv(path, **kwargs))


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG atomically (the figure stays open for inline display)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return Path(path)
