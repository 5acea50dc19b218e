"""The pairs as a torch-style dataset: 3-channel tensors in [-1, 1] with their prompts, each
image read through the resized-image cache that every stage shares."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from ..core.bars import tqdm

from .tables import load_pairs
from ..core.errors import CxrError
from .image_cache import ResizedImageCache
from ..core.layout import IMAGES_SUBDIR, contained_image_path


class ChestXrayDataset:
    """(image, prompt) pairs as 3-channel tensors in [-1, 1] at resolution x resolution.

    Images come through the resized-image cache (image_cache.ResizedImageCache) when
    `cache_dir` is given, so each full-size PNG is decoded once across runs.
    """

    def __init__(self, pairs: pd.DataFrame | str | os.PathLike, data_dir: str | os.PathLike,
                 resolution: int = 128, cache_dir: str | os.PathLike | None = None,
                 split: str | None = None, fit: str = "stretch"):
        if isinstance(pairs, (str, os.PathLike)):
            pairs = load_pairs(pairs, split)
        elif split is not None:
            pairs = pairs[pairs["split"] == split].reset_index(drop=True)
        self.cache = ResizedImageCache(cache_dir, resolution, fit)
        self.pairs = pairs.reset_index(drop=True)
        self.data_dir = Path(data_dir)

    @property
    def resolution(self) -> int:
        return self.cache.resolution

    @property
    def fit(self) -> str:
        return self.cache.fit

    def __len__(self) -> int:
        return len(self.pairs)

    def is_cached(self, index: int) -> bool:
        source = contained_image_path(self.data_dir, self.pairs.at[index, "filename"])
        return source is not None and self.cache.holds(source)

    def load_image(self, index: int) -> Image.Image:
        """The resized 8-bit grayscale image of pair `index` (from the cache when there)."""
        filename = self.pairs.at[index, "filename"]
        source = contained_image_path(self.data_dir, filename)
        if source is None:
            raise CxrError(f"pairs.csv names {filename!r}, which lies outside {self.data_dir / IMAGES_SUBDIR}; "
                           "re-run prepare (it excludes such rows as outside_data_dir)")
        if not source.is_file():
            raise CxrError(f"image {source} is missing; re-run prepare so it goes to excluded.csv")
        return self.cache.load(source)

    def __getitem__(self, index: int) -> dict:
        import torch

        pixels = np.asarray(self.load_image(index), dtype=np.float32) / 127.5 - 1.0
        tensor = torch.from_numpy(pixels).unsqueeze(0).expand(3, -1, -1).contiguous()
        row = self.pairs.iloc[index]
        return {"pixel_values": tensor, "prompt": row["prompt"], "uid": int(row["uid"]),
                "filename": row["filename"]}

    def warm_cache(self, workers: int | None = None, progress: bool = True) -> int:
        """Resize every image into the cache (threads: Pillow decodes without the GIL).
        Returns how many were decoded now (0 when all were cached)."""
        if self.cache.folder is None:
            return 0
        todo = [i for i in range(len(self)) if not self.is_cached(i)]
        with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
            list(tqdm(pool.map(self.load_image, todo), total=len(todo), desc="resizing images",
                      disable=not progress or not todo))
        return len(todo)


def sample_images(dataset: ChestXrayDataset, n: int, seed: int = 0) -> tuple[list, list[str]]:
    """n random (resized image, caption) pairs from a dataset, for a grid."""
    rng = np.random.default_rng(seed)
    picks = sorted(rng.choice(len(dataset), size=min(n, len(dataset)), replace=False).tolist())
    images = [dataset.load_image(i) for i in picks]
    captions = [f"{dataset.pairs.at[i, 'projection']} | {dataset.pairs.at[i, 'prompt']}" for i in picks]
    return images, captions
