"""One owner per output folder, and one writer at a time.

A stage that writes a folder first records what made it (`cxr_owner.json`: the stage, its
settings and fingerprints of its inputs). A rerun with the same record continues; a rerun
with another record, or into a folder holding files no stage of this project made, is refused
in one sentence naming what differs, unless `--overwrite`: then the old content is moved aside
(to FOLDER.replaced-TIME beside it) before anything is written, so two runs' files never mix
and nothing is lost.
"""

from __future__ import annotations

import logging
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any
from collections.abc import Iterator

from .errors import CxrError
from .files import read_json, write_json

log = logging.getLogger(__name__)

OWNER_FILE = "cxr_owner.json"
LOCK_FILE = ".cxr.lock"


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (for small files: LoRA weights, CSVs, checkpoint parts)."""
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_fingerprint(model: str, parts: tuple[str, ...] = ("unet", "vae", "text_encoder", "tokenizer")) -> str:
    """A hub id as is; a local diffusers folder by its weight files' names, sizes and mtimes (a
    model regenerated at the same path gets another fingerprint; hashing GBs would be slow)."""
    path = Path(model).expanduser()
    if not path.is_dir():
        return model
    h = hashlib.sha256(str(path.resolve()).encode())
    for sub in parts:
        for f in sorted((path / sub).glob("*")):
            if f.is_file():
                st = f.stat()
                h.update(f"{sub}/{f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def text_digest(texts) -> str:
    return hashlib.sha256("\n".join(map(str, texts)).encode()).hexdigest()[:20]


def _normal(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def read_owner(folder: Path) -> dict | None:
    """The folder's owner record, or None when there is none (or it is not one of ours)."""
    path = folder / OWNER_FILE
    try:
        record = read_json(path)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and {"stage", "identity"} <= set(record) else None


def claim(folder: str | os.PathLike, stage: str, identity: dict, overwrite: bool = False,
          ignore: tuple[str, ...] = (), keep: tuple[str, ...] = ()) -> str:
    """Make `stage` with `identity` the owner of `folder`: "new" (empty, fresh or overwritten)
    or "same" (already this stage with this identity: continue). Refused otherwise.

    ignore: names that do not make a folder foreign (a lock file, a cache); keep: names left in
    place when the old content is moved aside (a content-keyed cache that stays valid).
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CxrError(f"--out {folder} is a file, not a folder; pass a folder path")
    refuse_links_inside(folder)
    identity = _normal(identity)
    record = read_owner(folder) if folder.is_dir() else None
    entries = sorted(p.name for p in folder.iterdir() if p.name not in (OWNER_FILE, LOCK_FILE, *ignore)) \
        if folder.is_dir() else []
    if record is not None and record["stage"] == stage and record["identity"] == identity:
        return "same"
    if not entries:  # a record alone (a run that failed before writing anything) owns nothing
        _write(folder, stage, identity)
        return "new"
    if record is None:
        problem = (f"{folder} already holds files that no cxr-lora {stage} run made "
                   f"({', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''})")
    elif record["stage"] != stage:
        problem = f"{folder} holds the output of a {record['stage']} run, not of {stage}"
    else:
        old = record["identity"]
        differ = [k for k in sorted(set(old) | set(identity)) if old.get(k) != identity.get(k)]
        problem = (f"{folder} holds {stage} output made with other {', '.join(differ)} ("
                   + "; ".join(f"{k}: {_short(old.get(k))} there, {_short(identity.get(k))} now" for k in differ[:3])
                   + ")")
    if not overwrite:
        raise CxrError(f"{problem}; use another --out, or pass --overwrite to move the old content aside")
    moved = move_aside(folder, keep)
    log.info("--overwrite: moved the old content of %s to %s", folder, moved)
    _write(folder, stage, identity)
    return "new"


def refuse_links_inside(folder: str | os.PathLike) -> None:
    """Refuse, in one sentence, an output folder holding a symbolic link: a stage writing through
    it would write outside the folder (a linked upscaled/ took a rerun's PNGs elsewhere). Links
    are never followed, so one pointing back up cannot loop."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for top, dirs, files in os.walk(folder, followlinks=False):
        for name in sorted(dirs + files):
            if os.path.islink(os.path.join(top, name)):
                link = Path(top) / name
                raise CxrError(f"{link} is a symbolic link (to {os.readlink(link)}); a stage writes only inside "
                               f"{folder}, never where a link points: remove the link, or use another --out")


def record_owner(folder: str | os.PathLike, stage: str, identity: dict) -> None:
    """Record `stage` with `identity` as the folder's owner (after the caller's own checks)."""
    _write(Path(folder), stage, _normal(identity))


def _write(folder: Path, stage: str, identity: dict) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / OWNER_FILE, {"stage": stage, "identity": identity})
    except OSError as exc:
        raise CxrError(f"cannot write to {folder} ({exc.strerror or exc.__class__.__name__}); "
                       "pass a writable --out") from None


def move_aside(folder: Path, keep: tuple[str, ...] = ()) -> Path:
    """Move everything in `folder` (but `keep`) into FOLDER.replaced-TIME beside it."""
    target = folder.parent / f"{folder.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while target.exists():
        n += 1
        target = folder.parent / f"{folder.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
    try:
        target.mkdir(parents=True)
        for entry in sorted(folder.iterdir()):
            if entry.name not in keep and entry.name != LOCK_FILE:
                shutil.move(str(entry), str(target / entry.name))
    except OSError as exc:
        raise CxrError(f"--overwrite could not move the old content of {folder} aside "
                       f"({exc.strerror or exc.__class__.__name__}); pass another --out") from None
    return target


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str) -> Iterator[None]:
    """An exclusive lock on `folder` for this process's lifetime in the block (flock: released
    by the kernel when the process dies, so a killed run leaves no stale lock)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / LOCK_FILE, "a+")
    except OSError as exc:
        raise CxrError(f"cannot write to {folder} ({exc.strerror or exc.__class__.__name__}); "
                       "pass a writable --out") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise CxrError(f"another {what} is writing to {folder} ({holder}); wait for it to end "
                           "or use another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
