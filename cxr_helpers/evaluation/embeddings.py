"""Features of an image set: one pass of a feature network over it, and for the real sets a cache
on disk keyed by the network, its weights and the images, so re-evaluating embeds only the
generated images."""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import torch
from torch import nn
from ..core.bars import tqdm

from ..core.cache_entries import read_entry, write_entry
from .image_sets import ImageSet


@contextlib.contextmanager
def full_float32():
    """No TF32 on a GPU while features are made: cuDNN convolutions use TF32 by default, whose
    10-bit mantissa moves the features (benchmarks/RESULTS.md, GPU figures) where the reference
    FID is float32. At ~6 GMAC per image the cost is negligible."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def embed(net: nn.Module, images: torch.Tensor, batch_size: int = 32, desc: str = "features",
          progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass of the network over the images: (pool features, logits) on the CPU, in the
    network's dtype (what torchmetrics would see from its own pass; FID works in float64)."""
    device = next(net.parameters()).device
    pools, logits = [], []
    with full_float32():
        for start in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress):
            pool, logit = net(images[start:start + batch_size].to(device))
            pools.append(pool.float().cpu())
            logits.append(logit.float().cpu())
    if not pools:
        return torch.zeros(0, net.num_features), torch.zeros(0, 0)
    return torch.cat(pools), torch.cat(logits)


def cached_embed(net, image_set: ImageSet, cache_dir: Path, batch_size: int,
                 progress: bool) -> tuple[torch.Tensor, torch.Tensor, str | None]:
    """Features of a real image set, cached on disk keyed by its image list and the network:
    (pool features, logits, the cache file's name when they were read from it, else None). An
    entry that fails its own check (core/cache_entries.py) is recomputed."""
    digest = hashlib.sha256(net.key.encode())
    for tensor in net.state_dict().values():  # the weights too: another weights file, other features
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest.update(image_set.images.shape.__repr__().encode())
    for name in image_set.files:
        digest.update(name.encode() + b"\n")
    digest.update(hashlib.sha256(image_set.images.numpy().tobytes()).digest())  # the pixels themselves
    key = digest.hexdigest()
    path = cache_dir / f"features-{net.key}-{key[:20]}.safetensors"
    n = len(image_set.images)
    cached = read_entry(path, key, rows={"pool": n, "logits": n})
    if cached is not None:
        return cached["pool"], cached["logits"], path.name
    pool, logits = embed(net, image_set.images, batch_size, f"features: {image_set.name}", progress)
    write_entry(path, {"pool": pool, "logits": logits}, key)
    return pool, logits, None
