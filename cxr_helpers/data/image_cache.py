"""The dataset's films as every stage reads them: header checks without decoding, decoding,
the resize to the model's resolution (three fits), and the on-disk cache of resized copies
that training, sampling and evaluation share (CACHE/images), so each full-size PNG is decoded
once across runs."""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo
from ..core.bars import tqdm
from ..core.bounds import MAX_FILM_PIXELS, film_may_be_decoded

from ..core.errors import CxrError
from ..core.files import atomic_path

RESAMPLING = "lanczos"  # part of the cache key: another filter would be another picture
ENTRY_KEY, ENTRY_DIGEST = "cxr-cache-key", "cxr-pixels-sha256"  # a cached PNG's text: its source and pixels
log = logging.getLogger(__name__)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_TRAILER = b"IEND\xaeB`\x82"  # the last chunk of every complete PNG


# ---------------------------------------------------------------- checking -------------------

def inspect_image(path: Path) -> tuple[str | None, int, int]:
    """(problem, width, height) from the file's header and trailer, without decoding pixels.

    problem is None, "missing_image", "unreadable_image" or "oversized_image" (over
    bounds.MAX_FILM_PIXELS). A truncated PNG lacks its IEND
    trailer; a non-image fails the header. Two small reads per file: fast over 7,466 images.
    """
    try:
        size = path.stat().st_size
    except (FileNotFoundError, NotADirectoryError):
        return "missing_image", 0, 0
    if size == 0:
        return "unreadable_image", 0, 0
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            with Image.open(path) as im:
                width, height = im.size
                fmt = im.format
            if head == _PNG_SIGNATURE or fmt == "PNG":
                handle.seek(max(0, size - 12))
                if not handle.read(12).endswith(_PNG_TRAILER):
                    return "unreadable_image", width, height
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return "unreadable_image", 0, 0  # a decompression bomb (a huge header) is not a film either
    if width <= 0 or height <= 0:
        return "unreadable_image", 0, 0
    if not film_may_be_decoded(width, height):
        return "oversized_image", width, height
    return None, width, height


def inspect_images(paths: list[Path], workers: int = 8, progress: bool = True) -> list[tuple[str | None, int, int]]:
    # Threads: the work is file I/O (slow on Kaggle's mounted inputs), not Python.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(tqdm(pool.map(inspect_image, paths, chunksize=64), total=len(paths),
                         desc="checking images", disable=not progress))


# ---------------------------------------------------------------- decoding and resizing ------

def _decode_full_image(path: Path) -> Image.Image:
    """Decode one full-size film (the slow step the cache exists to avoid)."""
    with Image.open(path) as im:
        if not film_may_be_decoded(*im.size):
            raise CxrError(f"image {path} is {im.size[0]} x {im.size[1]} px, over the {MAX_FILM_PIXELS:,}-pixel bound "
                           "for a film; remove it from pairs.csv (prepare excludes it as oversized_image)")
        im.load()
        return im.copy()


def _to_8bit_gray(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(arr.astype(np.uint8), "L")
    return im.convert("L")


def resize_xray(im: Image.Image, resolution: int, fit: str = "stretch") -> Image.Image:
    """Resize to resolution x resolution with Lanczos (anti-aliased: its support widens with the
    downscale factor). stretch = the seed's plain resize; pad keeps the aspect with black bars;
    crop keeps the aspect and cuts the long side's ends."""
    im = _to_8bit_gray(im)
    # reducing_gap: a fast integer box reduction first, then Lanczos; indistinguishable at >= 3.
    if fit == "stretch":
        return im.resize((resolution, resolution), Image.Resampling.LANCZOS, reducing_gap=3.0)
    w, h = im.size
    scale = resolution / (max(w, h) if fit == "pad" else min(w, h))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    im = im.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    if fit == "crop":
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
        return im.crop((left, top, left + resolution, top + resolution))
    canvas = Image.new("L", (resolution, resolution), 0)
    canvas.paste(im, ((resolution - size[0]) // 2, (resolution - size[1]) // 2))
    return canvas


# ---------------------------------------------------------------- the cache ------------------

class ResizedImageCache:
    """Resized copies of source films as small PNGs under `cache_dir`/RESpx-FIT, keyed on the
    source file (name, size, mtime), the resolution and the fit: a changed source is a new key.
    With cache_dir None nothing is stored and every load decodes. The stage configs declare the
    allowed resolutions and fits (config/stages.py) and check them when built."""

    def __init__(self, cache_dir: str | os.PathLike | None, resolution: int, fit: str = "stretch"):
        self.resolution = resolution
        self.fit = fit
        self.folder = Path(cache_dir) / f"{resolution}px-{fit}" if cache_dir else None

    def key_for(self, source: Path) -> str:
        stat = source.stat()
        return f"{source.name}|{stat.st_size}|{stat.st_mtime_ns}|{self.resolution}|{self.fit}|{RESAMPLING}"

    def path_for(self, source: Path) -> Path | None:
        if self.folder is None:
            return None
        digest = hashlib.sha1(self.key_for(source).encode()).hexdigest()[:16]
        return self.folder / f"{source.name.split('.')[0]}-{digest}.png"

    def holds(self, source: Path) -> bool:
        return self.folder is not None and source.is_file() and self.path_for(source).is_file()

    def load(self, source: Path) -> Image.Image:
        """The resized 8-bit grayscale copy of `source`: read from the cache when the entry checks
        out, else made and stored."""
        cached = self.path_for(source)
        if cached is not None and cached.is_file():
            entry = self._checked_entry(cached, self.key_for(source))
            if entry is not None:
                return entry
        try:
            small = resize_xray(_decode_full_image(source), self.resolution, self.fit)
        except (OSError, UnidentifiedImageError, SyntaxError, Image.DecompressionBombError) as exc:
            raise CxrError(f"image {source} could not be decoded ({exc}); remove it from pairs.csv "
                           "or replace the file") from None
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            text = PngInfo()  # what the entry was made from, and its pixels' digest: read back by _checked_entry
            text.add_text(ENTRY_KEY, self.key_for(source))
            text.add_text(ENTRY_DIGEST, _pixels_digest(small))
            with atomic_path(cached) as tmp:
                small.save(tmp, format="PNG", pnginfo=text)
        return small

    def _checked_entry(self, path: Path, key: str) -> Image.Image | None:
        """The cached image when it is whole, of this size, and made from this source; else None
        with a log line (the caller makes it again)."""
        try:
            with Image.open(path) as im:
                im.load()
                entry, info = im.convert("L"), dict(im.text)
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            why = f"unreadable ({exc.__class__.__name__})"
        else:
            if info.get(ENTRY_KEY) != key:
                why = "made from another film or other settings"
            elif entry.size != (self.resolution, self.resolution):
                why = f"{entry.size[0]}x{entry.size[1]} px, not {self.resolution}"
            elif info.get(ENTRY_DIGEST) != _pixels_digest(entry):
                why = "damaged (its pixels do not match their digest)"
            else:
                return entry
        _report_remade(path, why)
        return None


_remade = [0]  # cached images remade in this process: a cache of thousands gets a few lines, not thousands
REPORTED_REMADE = 3


def _report_remade(path: Path, why: str) -> None:
    _remade[0] += 1
    if _remade[0] <= REPORTED_REMADE:
        log.warning("cached image %s is %s: making it again%s", path, why,
                    " (further ones are remade without a line each)" if _remade[0] == REPORTED_REMADE else "")


def _pixels_digest(image: Image.Image) -> str:
    return hashlib.sha256(image.tobytes()).hexdigest()[:32]
