"""Facts about where this runs: Kaggle or not, its folders, whether the network may be used,
where the cache lives, and the library versions written beside every artifact."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import tempfile
from pathlib import Path

from .layout import CACHE_DIR

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


def is_main_process() -> bool:
    """True outside `accelerate launch` / torchrun, and in its rank-0 process (they set RANK)."""
    return int(os.environ.get("RANK", "0")) == 0


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
    return Path(out) / CACHE_DIR


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


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions
