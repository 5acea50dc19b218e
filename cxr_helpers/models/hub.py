"""Where a model comes from: a local diffusers folder, the local hub cache, or the Hugging Face
hub when it answers; one sentence (never minutes of client retries) when it cannot be had."""

from __future__ import annotations

from pathlib import Path

from ..core.errors import CxrError
from ..config.presets import RETIRED_MODEL_IDS


def _offline_hint(model: str) -> str:
    return (
        f"{model!r} is fetched from the Hugging Face hub, which needs internet (on Kaggle: "
        "Settings > Internet on); or pass a local diffusers directory"
    )


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers at all (fails fast offline, instead of the hub
    client's minutes of retries)."""
    import os
    from urllib.parse import urlparse

    from huggingface_hub import constants

    from ..core.environment import can_reach

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    return can_reach(urlparse(constants.ENDPOINT).hostname or "huggingface.co", timeout)


def from_hub(loader, model: str, what: str, **kwargs):
    """Load from the local hub cache if there, else from the hub if reachable, else explain."""
    try:
        return loader(model, local_files_only=True, **kwargs)
    except Exception:
        pass
    if model in RETIRED_MODEL_IDS:  # a 404 from the hub would read like a typo or a login problem
        raise CxrError(f"{model!r} was deleted from the Hugging Face hub in 2024; use its maintained copy "
                       f"{RETIRED_MODEL_IDS[model]!r} (same weights and licence)")
    if not hub_reachable():
        raise CxrError(f"could not load the {what}: {_offline_hint(model)}")
    try:
        return loader(model, **kwargs)
    except Exception as exc:
        raise CxrError(f"could not load the {what} ({exc.__class__.__name__}): {_offline_hint(model)}") from None


def is_local(model: str | Path) -> bool:
    text = str(model)
    return Path(text).exists() or text.startswith((".", "/", "~")) or text.count("/") != 1
