"""Cache entries that check themselves: a safetensors file carries the key it was made under and a
digest of its tensors' bytes, and is used only when both match (and, where the caller knows
them, its tensors' row counts). A truncated, damaged, foreign or stale entry is reported in one
log line and the caller recomputes it; an entry is never trusted as it is, and a bad one never
ends a run in a traceback. Writes are atomic (a temporary file renamed over the entry), so two
processes sharing a cache each see a whole entry or none."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from .files import atomic_path

log = logging.getLogger(__name__)
KEY_FIELD = "cxr_cache_key"
DIGEST_FIELD = "cxr_tensors_sha256"


def tensors_digest(tensors: dict) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes, in name order."""
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())  # any dtype, bfloat16 too
    return h.hexdigest()


def write_entry(path: str | os.PathLike, tensors: dict, key: str, **metadata: str) -> Path:
    """Save `tensors` as a cache entry made under `key` (atomically)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.contiguous() for name, tensor in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={**metadata, KEY_FIELD: key, DIGEST_FIELD: tensors_digest(tensors)})
    return path


def read_entry(path: str | os.PathLike, key: str, rows: dict[str, int] | None = None) -> dict | None:
    """The entry's tensors when it is whole and was made under `key` (and each tensor named in
    `rows` has that many rows); None when there is no entry, or, with a log line, when it cannot
    be trusted: the caller then recomputes it and writes it again."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    if not path.is_file():
        return None
    try:
        # The bytes are read once, from one open file: safe_open's tensors are read from the path
        # again, so a second process renaming a new entry over it in between gave the old header
        # with the new bytes (seen as a digest mismatch).
        data = path.read_bytes()
        metadata = _metadata(data)
        tensors = load(data)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        return _distrust(path, f"unreadable ({exc.__class__.__name__})")
    if metadata.get(KEY_FIELD) != key:
        return _distrust(path, "made for other inputs (its key differs)" if metadata.get(KEY_FIELD)
                         else "not a checked entry (no key)")
    if metadata.get(DIGEST_FIELD) != tensors_digest(tensors):
        return _distrust(path, "damaged (its bytes do not match their digest)")
    wrong = [name for name, n in (rows or {}).items() if name not in tensors or len(tensors[name]) != n]
    if wrong:
        return _distrust(path, f"the wrong size ({wrong[0]})")
    return tensors


def _metadata(data: bytes) -> dict:
    """The __metadata__ of a safetensors file's bytes: 8 bytes of header length, then the JSON header."""
    import json

    length = int.from_bytes(data[:8], "little")
    if len(data) < 8 or length > len(data) - 8:
        raise ValueError("the header runs past the end of the file")
    header = json.loads(data[8:8 + length])
    return (header.get("__metadata__") or {}) if isinstance(header, dict) else {}


def _distrust(path: Path, why: str) -> None:
    log.warning("cache entry %s is %s: recomputing it", path, why)
    return None
