"""Shared file plumbing: atomic writes, JSON with library versions, Kaggle detection."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any, Iterator

KAGGLE_DATASET = "raddar/chest-xrays-indiana-university"
KAGGLE_DATASET_SLUG = KAGGLE_DATASET.split("/")[1]
# Kaggle's file system lives under /kaggle; CXR_KAGGLE_ROOT moves it (the offline rehearsal of a
# Kaggle session in the tests lays one out in a temporary folder).
KAGGLE_ROOT_ENV = "CXR_KAGGLE_ROOT"

# Libraries whose versions are written beside every artifact.
TRACKED_PACKAGES = (
    "torch", "diffusers", "transformers", "peft", "accelerate", "torchmetrics",
    "pandas", "numpy", "pillow", "cxr-lora",
)


def on_kaggle() -> bool:
    """True inside a Kaggle notebook session (Kaggle sets this variable in every kernel)."""
    return bool(os.environ.get("KAGGLE_KERNEL_RUN_TYPE"))


def kaggle_root() -> Path:
    return Path(os.environ.get(KAGGLE_ROOT_ENV) or "/kaggle")


def kaggle_input() -> Path:
    """Where Kaggle mounts the attached datasets and earlier notebooks' outputs (read-only)."""
    return kaggle_root() / "input"


def kaggle_working() -> Path:
    """The session's output folder: what Kaggle saves as the notebook's output."""
    return kaggle_root() / "working"


def offline() -> bool:
    """CXR_OFFLINE=1 (or HF_HUB_OFFLINE=1): never open a connection, treat every host as unreachable."""
    return any(os.environ.get(name, "0").lower() in ("1", "true", "yes") for name in ("CXR_OFFLINE", "HF_HUB_OFFLINE"))


def cache_root(out: str | os.PathLike) -> Path:
    """The one cache of resized images, latents and features for an output folder.

    On Kaggle it sits outside /kaggle/working, so the published output holds results only
    (thousands of cache PNGs would otherwise land there); elsewhere it is OUT/cache.
    """
    if os.environ.get("CXR_CACHE_DIR"):
        return Path(os.environ["CXR_CACHE_DIR"])
    if on_kaggle():
        return Path(tempfile.gettempdir()) / "cxr-lora-cache"
    return Path(out) / "cache"


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

    path = Path(path)
    if not path.is_file():
        raise CxrError(f"{what} {path} does not exist; {missing_hint}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CxrError(f"{what} {path} is not valid JSON (line {exc.lineno}: {exc.msg}); fix it") from None


def can_reach(host: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to host:443 opens (offline it fails fast, unlike client retries)."""
    import socket

    if offline():
        return False

    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def write_csv(path: str | os.PathLike, frame) -> Path:
    """Write a pandas DataFrame atomically, without its index."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return Path(path)


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG atomically (the figure stays open for inline display)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return Path(path)


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions
