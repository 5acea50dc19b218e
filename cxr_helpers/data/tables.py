"""Reading the data: the Kaggle dataset's CSVs (checked) and the pairs.csv that prepare writes,
which every later stage reads; and where the dataset is (an argument, or Kaggle's mount)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.environment import kaggle_input, on_kaggle
from ..core.errors import CxrError
from ..core.files import unescape_cells
from ..core.layout import (IMAGES_SUBDIR, KAGGLE_DATASET, KAGGLE_DATASET_SLUG, PAIRS_REQUIRED, PAIRS_SPLITS,
                           PROJECTION_COLUMNS_NEEDED, PROJECTIONS_CSV, REPORT_COLUMNS_NEEDED, REPORTS_CSV,
                           SYNTHETIC_MANIFEST)


def default_data_dir() -> Path | None:
    """The Kaggle mount of the dataset when running on Kaggle, wherever it was attached.

    Kaggle has changed how deep it mounts inputs, so the dataset is searched for: first a folder
    named after the dataset, then any folder in its layout that is not a synthetic export (an
    attached notebook output can hold one).
    """
    root = kaggle_input()
    if not root.is_dir():
        return None
    named = sorted(root.glob(f"**/{KAGGLE_DATASET_SLUG}/{REPORTS_CSV}"))
    if named:
        return named[0].parent
    if on_kaggle():
        for found in sorted(root.glob("**/" + REPORTS_CSV), key=lambda p: (len(p.parts), str(p))):
            if (found.parent / IMAGES_SUBDIR.parent).is_dir() and not (found.parent / SYNTHETIC_MANIFEST).is_file():
                return found.parent
    return None


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    if data_dir:
        return Path(data_dir).expanduser()
    found = default_data_dir()
    if found is None:
        raise CxrError("no data dir given and not on Kaggle; pass --data-dir DIR (a folder holding "
                       f"{REPORTS_CSV}, {PROJECTIONS_CSV} and {IMAGES_SUBDIR.as_posix()}/), or make one "
                       "with `python -m cxr_helpers synth --out DIR`")
    return found


def read_uid_csv(path: Path, needed: tuple[str, ...], unreadable_fix: str, columns_fix: str, uid_fix: str,
                 show_columns: bool = False) -> pd.DataFrame:
    """A CSV read as strings whose `uid` column holds report numbers (made ints), or one sentence
    naming what is wrong and the fix the caller gives."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise CxrError(f"{path} is not a readable CSV ({exc.__class__.__name__}); {unreadable_fix}") from None
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        has = f" (it has: {', '.join(frame.columns)})" if show_columns else ""
        raise CxrError(f"{path} lacks the column(s) {', '.join(missing)}{has}; {columns_fix}")
    bad_uid = ~frame["uid"].str.fullmatch(r"\s*\d+\s*")  # "1.5", "", "abc": not a report number
    if bad_uid.any():
        raise CxrError(f"{path} has a non-integer uid {frame.loc[bad_uid, 'uid'].iloc[0]!r} on row "
                       f"{int(np.flatnonzero(bad_uid)[0]) + 2}; {uid_fix}")
    frame["uid"] = frame["uid"].astype(int)
    return frame


def _read_kaggle_csv(path: Path, needed: tuple[str, ...]) -> pd.DataFrame:
    if not path.is_file():
        raise CxrError(f"data dir {path.parent} has no {path.name}; attach the Kaggle dataset "
                       f"{KAGGLE_DATASET} or pass --data-dir")
    return read_uid_csv(path, needed, "re-download it from the Kaggle dataset",
                        "use the Kaggle dataset's original file", "fix or remove that row", show_columns=True)


def read_tables(data_dir: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(reports, projections) from a dataset folder in the Kaggle layout, validated."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise CxrError(f"data dir {data_dir} does not exist; attach the Kaggle dataset "
                       f"{KAGGLE_DATASET} or pass --data-dir")
    reports = _read_kaggle_csv(data_dir / REPORTS_CSV, REPORT_COLUMNS_NEEDED)
    projections = _read_kaggle_csv(data_dir / PROJECTIONS_CSV, PROJECTION_COLUMNS_NEEDED)
    return reports, projections


def load_pairs(path: str | os.PathLike, split: str | None = None) -> pd.DataFrame:
    """pairs.csv as written by prepare, checked; optionally one split only."""
    path = Path(path)
    if not path.is_file():
        raise CxrError(f"pairs file {path} does not exist; run `python -m cxr_helpers prepare` first")
    written_by_prepare = "it must be a pairs.csv written by `python -m cxr_helpers prepare`"
    frame = unescape_cells(read_uid_csv(path, PAIRS_REQUIRED, written_by_prepare, written_by_prepare,
                                        "re-run prepare"))  # written by write_csv: formula-safe cells
    for column in ("n_tokens", "width", "height"):  # numbers in pairs.csv, when present
        if column in frame.columns:
            frame[column] = pd.to_numeric(frame[column], errors="coerce")
    labels = sorted(set(frame["split"]) - set(PAIRS_SPLITS))
    if labels:  # silently dropping them would shrink both sides
        raise CxrError(f"{path} has split label(s) {', '.join(map(repr, labels))}; only train and test are "
                       "known: fix those rows or re-run prepare")
    if split is not None:  # one of PAIRS_SPLITS (the callers' settings declare it)
        frame = frame[frame["split"] == split].reset_index(drop=True)
    return frame
