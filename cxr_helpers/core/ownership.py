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


# Above this size a file is fingerprinted by its size and 16 sampled 1 MiB blocks, not read whole:
# SD1.5's UNet is 3.4 GB, and a rerun should not hash it; any retrained or regenerated weights
# differ in every block, so a sample is enough to tell two models apart.
WHOLE_FILE_BYTES = 64 << 20
SAMPLED_BLOCKS = 16


def content_digest(path: str | os.PathLike) -> str:
    """A file's fingerprint by its bytes, wherever it lies (the same file copied or named by
    another path gets the same digest): sha256 of the whole file, or of its size and sampled
    blocks above WHOLE_FILE_BYTES."""
    size = os.path.getsize(path)
    if size <= WHOLE_FILE_BYTES:
        return file_digest(path)
    h = hashlib.sha256(f"{size}:".encode())
    with open(path, "rb") as handle:
        for k in range(SAMPLED_BLOCKS):
            handle.seek((size - (1 << 20)) * k // (SAMPLED_BLOCKS - 1))
            h.update(handle.read(1 << 20))
    return h.hexdigest()


def folder_digest(folder: str | os.PathLike, parts: tuple[str, ...] = ("",), pattern: str = "*") -> str:
    """A folder's fingerprint by the names and contents of its files in `parts` (subfolders;
    "" = the folder itself), not by where it lies."""
    folder = Path(folder)
    h = hashlib.sha256()
    for sub in parts:
        for f in sorted((folder / sub).glob(pattern)):
            if f.is_file() and f.name not in (OWNER_FILE, LOCK_FILE):
                h.update(f"{sub}/{f.name}:{content_digest(f)}\n".encode())
    return h.hexdigest()[:20]


def model_fingerprint(model: str, parts: tuple[str, ...] = ("", "unet", "vae", "text_encoder", "tokenizer")) -> str:
    """A hub id as is; a local diffusers folder by its files' contents (the same model by a
    relative or an absolute path is the same; a model regenerated at the same path is not)."""
    path = Path(model).expanduser()
    if not path.is_dir():
        return model
    return folder_digest(path, parts)


def path_identity(value: Any) -> Any:
    """A path setting as an output's identity holds it: an existing file or folder by its content
    (a relative and an absolute path to the same files are the same), each item of a list the same
    way, anything else (a hub id, "", None) as it is."""
    if isinstance(value, (list, tuple)):
        return [path_identity(item) for item in value]
    if not isinstance(value, str) or not value:
        return value
    path = Path(value).expanduser()
    if path.is_file():
        return "file:" + content_digest(path)[:20]
    if path.is_dir():
        return "folder:" + model_fingerprint(value)
    return value


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
    identity = _normal(identity)
    verdict = _verdict(folder, stage, identity, ignore)
    if verdict == "same":
        return "same"
    if verdict != "new":
        if not overwrite:
            raise CxrError(f"{verdict}; use another --out, or pass --overwrite to move the old content aside")
        moved = move_aside(folder, keep)
        log.info("--overwrite: moved the old content of %s to %s", folder, moved)
    _write(folder, stage, identity)
    return "new"


@contextlib.contextmanager
def owned(folder: str | os.PathLike, stage: str, identity: dict, overwrite: bool = False,
          ignore: tuple[str, ...] = (), keep: tuple[str, ...] = ()) -> Iterator[str]:
    """The folder is this run's for the block: its lock (a second run is refused at once) and its
    owner record (`claim`). A folder that would be refused is refused before the lock file is
    made, so a foreign folder gets nothing written into it."""
    folder = Path(folder)
    if not overwrite:
        verdict = _verdict(folder, stage, _normal(identity), ignore)
        if verdict not in ("same", "new"):
            raise CxrError(f"{verdict}; use another --out, or pass --overwrite to move the old content aside")
    with folder_lock(folder, f"{stage} run"):
        yield claim(folder, stage, identity, overwrite, ignore, keep)


def _verdict(folder: Path, stage: str, identity: dict, ignore: tuple[str, ...]) -> str:
    """"same", "new", or the sentence saying why `folder` is not this run's (nothing written)."""
    if folder.exists() and not folder.is_dir():
        raise CxrError(f"--out {folder} is a file, not a folder; pass a folder path")
    refuse_links_inside(folder)
    record = read_owner(folder) if folder.is_dir() else None
    entries = sorted(p.name for p in folder.iterdir() if p.name not in (OWNER_FILE, LOCK_FILE, *ignore)) \
        if folder.is_dir() else []
    if record is not None and record["stage"] == stage and record["identity"] == identity:
        return "same"
    if not entries:  # a record alone (a run that failed before writing anything) owns nothing
        return "new"
    if record is None:
        return (f"{folder} already holds files that no cxr-lora {stage} run made "
                f"({', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''})")
    if record["stage"] != stage:
        return f"{folder} holds the output of a {record['stage']} run, not of {stage}"
    old = record["identity"]
    differ = [k for k in sorted(set(old) | set(identity)) if old.get(k) != identity.get(k)]
    return (f"{folder} holds {stage} output made with other {', '.join(differ)} ("
            + "; ".join(f"{k}: {_short(old.get(k))} there, {_short(identity.get(k))} now" for k in differ[:3])
            + ")")


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
    if folder.exists() and not folder.is_dir():
        raise CxrError(f"--out {folder} is a file, not a folder; pass a folder path")
    refuse_links_inside(folder)  # the lock file too: never opened through a link
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
