"""The image sets the evaluation compares, and their features.

Real images are a split of pairs.csv, prepared to the training resolution exactly as for
training (same resize, same cache); generated images come from sample directories
(metadata.csv). Features come from one pass of a network over a set; a real set's features are
cached on disk, keyed by the network, its weights and the images, so re-evaluating embeds only
the generated images.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn
from tqdm.auto import tqdm

from ..config.stages import EvalConfig
from ..core.errors import CxrError
from ..core.files import atomic_path

REAL_TEST_SET = "real test"  # the test split, the real side of every comparison


@dataclass
class ImageSet:
    name: str
    images: torch.Tensor  # (N, 3, H, W) uint8
    prompts: list[str]
    files: list[str]
    unreadable: int = 0


def gray_to_rgb_tensor(images: list[np.ndarray], resolution: int) -> torch.Tensor:
    """(N, 3, H, W) uint8 from N grayscale arrays: the channel repeated, as FID networks want RGB."""
    if not images:
        return torch.zeros(0, 3, resolution, resolution, dtype=torch.uint8)
    return torch.from_numpy(np.stack(images)).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def real_set(cfg: EvalConfig, split: str, data_dir: Path, cache_dir: Path, name: str) -> ImageSet:
    """The split's images, resized and cached exactly as for training, as uint8 3-channel."""
    from ..data.tables import load_pairs
    from ..data.dataset import ChestXrayDataset
    from ..core.layout import CACHE_IMAGES_SUBDIR

    pairs = load_pairs(cfg.pairs, split)
    dataset = ChestXrayDataset(pairs, data_dir, cfg.resolution, cache_dir=cache_dir / CACHE_IMAGES_SUBDIR, fit=cfg.fit)
    dataset.warm_cache(progress=False)
    images = [np.asarray(dataset.load_image(i), dtype=np.uint8) for i in range(len(dataset))]
    return ImageSet(name, gray_to_rgb_tensor(images, cfg.resolution), pairs["prompt"].tolist(),
                    pairs["filename"].tolist())


def generated_set(name: str, folder: Path, resolution: int) -> ImageSet:
    """A sample directory's images (metadata.csv lists them); unreadable files are skipped and counted."""
    meta_path = folder / "metadata.csv"
    if not folder.is_dir():
        raise CxrError(f"generated dir {folder} does not exist; make it with `python -m cxr_helpers sample`")
    if not meta_path.is_file():
        raise CxrError(f"generated dir {folder} has no metadata.csv; pass a folder written by `python -m cxr_helpers sample`")
    from ..core.layout import inside

    try:
        meta = pd.read_csv(meta_path, keep_default_na=False, dtype={"file": str, "prompt": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise CxrError(f"{meta_path} is not a readable CSV ({exc.__class__.__name__}); re-run sample into {folder}") from None
    missing = [c for c in ("file", "prompt") if c not in meta.columns]
    if missing:
        raise CxrError(f"{meta_path} lacks the column(s) {', '.join(missing)}; pass a folder written by "
                       "`python -m cxr_helpers sample`")
    outside = [f for f in meta["file"] if inside(folder, f) is None]
    if outside:  # a listed file must be one of the folder's own images, never something elsewhere
        raise CxrError(f"{meta_path} names {outside[0]!r}, which lies outside {folder} "
                       f"({len(outside)} such row(s)); list only files inside the folder")
    images, prompts, files, bad = [], [], [], 0
    for row in meta.itertuples():
        try:
            with Image.open(folder / row.file) as im:
                im = im.convert("L")
                if im.size != (resolution, resolution):
                    im = im.resize((resolution, resolution), Image.Resampling.LANCZOS)
                images.append(np.asarray(im, dtype=np.uint8))
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError):
            bad += 1
            continue
        prompts.append(row.prompt)
        files.append(row.file)
    return ImageSet(name, gray_to_rgb_tensor(images, resolution), prompts, files, bad)


def parse_generated(items) -> list[tuple[str, Path]]:
    """--generated items, "DIR" or "NAME=DIR", as (name, folder) pairs with distinct names."""
    sets = []
    for item in items:
        name, sep, path = str(item).partition("=")
        if not sep:
            name, path = Path(item).name, item
        sets.append((name, Path(path)))
    if not sets:
        raise CxrError("no generated images: pass --generated DIR (or NAME=DIR ...), folders written by `sample`")
    names = [n for n, _ in sets]
    if len(set(names)) != len(names):
        raise CxrError(f"--generated names repeat ({', '.join(names)}); name them NAME=DIR")
    return sets


def pick(size: int, n: int, seed: int) -> list[int]:
    """n of range(size), seeded (all of them when size <= n)."""
    if size <= n:
        return list(range(size))
    return sorted(np.random.default_rng(seed).choice(size, n, replace=False).tolist())


def take(image_set: ImageSet, idx: list[int], name: str | None = None) -> ImageSet:
    """The images at idx, as a set of their own (renamed when name is given)."""
    return ImageSet(name or image_set.name, image_set.images[idx], [image_set.prompts[i] for i in idx],
                    [image_set.files[i] for i in idx], image_set.unreadable)


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


def cached_embed(net, image_set: ImageSet, cache_dir: Path, batch_size: int, progress: bool,
                 hit_counter: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of a real image set, cached on disk keyed by its image list and the network."""
    from safetensors.torch import load_file, save_file

    digest = hashlib.sha256(net.key.encode())
    for tensor in net.state_dict().values():  # the weights too: another weights file, other features
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest.update(image_set.images.shape.__repr__().encode())
    for name in image_set.files:
        digest.update(name.encode() + b"\n")
    digest.update(hashlib.sha256(image_set.images.numpy().tobytes()).digest())  # the pixels themselves
    path = cache_dir / f"features-{net.key}-{digest.hexdigest()[:20]}.safetensors"
    if path.is_file():
        if hit_counter is not None:
            hit_counter.append(path.name)
        cached = load_file(str(path))
        return cached["pool"], cached["logits"]
    pool, logits = embed(net, image_set.images, batch_size, f"features: {image_set.name}", progress)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({"pool": pool.contiguous(), "logits": logits.contiguous()}, str(tmp))
    return pool, logits
