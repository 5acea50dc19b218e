"""The image sets the evaluation compares.

Real images are a split of pairs.csv, prepared to the training resolution exactly as for
training (same resize, same cache); generated images come from sample directories
(metadata.csv). Their features are `embeddings`' job.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError

from ..config.stages import EvalConfig
from ..core.bounds import film_may_be_decoded
from ..core.errors import CxrError
from ..core.files import read_csv
from ..core.layout import METADATA_CSV

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
    meta_path = folder / METADATA_CSV
    if not folder.is_dir():
        raise CxrError(f"generated dir {folder} does not exist; make it with `python -m cxr_helpers sample`")
    if not meta_path.is_file():
        raise CxrError(f"generated dir {folder} has no metadata.csv; pass a folder written by "
                       "`python -m cxr_helpers sample`")
    from ..core.layout import inside

    try:
        meta = read_csv(meta_path, keep_default_na=False, dtype={"file": str, "prompt": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise CxrError(f"{meta_path} is not a readable CSV ({exc.__class__.__name__}); "
                       f"re-run sample into {folder}") from None
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
                if not film_may_be_decoded(*im.size):
                    raise ValueError("over the pixel bound")  # counted as unreadable, never decoded
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
