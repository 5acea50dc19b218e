"""The data stage: the Kaggle CSVs and PNGs -> clean (image, prompt) pairs, a split, and a
torch Dataset that serves them.

Rule (the seed experiment's): prompt = the report's impression with whitespace collapsed; a
pair is kept when the prompt is non-empty and SD1.5's CLIP tokenizer gives at most 77 ids,
start and end tokens included, so nothing is truncated. Every listed image ends up in exactly
one of pairs.csv (kept) or excluded.csv (with its reason).
"""

from __future__ import annotations

import hashlib
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from .config import PrepareConfig, save_config
from .errors import CxrError
from .io import KAGGLE_DATASET_SLUG, atomic_path, kaggle_input, on_kaggle, write_csv, write_json

REPORTS_CSV = "indiana_reports.csv"
PROJECTIONS_CSV = "indiana_projections.csv"
IMAGES_SUBDIR = Path("images") / "images_normalized"
REPORT_COLUMNS_NEEDED = ("uid", "impression")
PROJECTION_COLUMNS_NEEDED = ("uid", "filename", "projection")
PAIRS_COLUMNS = ("uid", "filename", "projection", "prompt", "n_tokens", "split", "width", "height")
EXCLUSION_REASONS = ("duplicate_row", "no_report", "other_projection", "empty_impression", "too_long",
                     "outside_data_dir", "missing_image", "unreadable_image")
SPLITS = ("patient", "image")
PROJECTIONS = {"both": ("Frontal", "Lateral"), "frontal": ("Frontal",), "lateral": ("Lateral",)}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_TRAILER = b"IEND\xaeB`\x82"  # the last chunk of every complete PNG


# ---------------------------------------------------------------- reading --------------------

def default_data_dir() -> Path | None:
    """The Kaggle mount of the dataset when running on Kaggle, wherever it was attached.

    Kaggle has changed how deep it mounts inputs, so the dataset is searched for: first a folder
    named after the dataset, then any folder in its layout that is not a synthetic export (an
    attached notebook output can hold one).
    """
    root = kaggle_input()
    if not root.is_dir():
        return None
    named = sorted(root.glob(f"**/{KAGGLE_DATASET_SLUG}/{REPORTS_CSV}"))
    if named:
        return named[0].parent
    if on_kaggle():
        for found in sorted(root.glob("**/" + REPORTS_CSV), key=lambda p: (len(p.parts), str(p))):
            if (found.parent / "images").is_dir() and not (found.parent / "synthetic_manifest.json").is_file():
                return found.parent
    return None


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    if data_dir:
        return Path(data_dir).expanduser()
    found = default_data_dir()
    if found is None:
        raise CxrError("no data dir given and not on Kaggle; pass --data-dir DIR (a folder holding "
                       f"{REPORTS_CSV}, {PROJECTIONS_CSV} and images/images_normalized/), or make one "
                       "with `python -m cxr_helpers synth --out DIR`")
    return found


def _read_csv(path: Path, needed: tuple[str, ...]) -> pd.DataFrame:
    if not path.is_file():
        raise CxrError(f"data dir {path.parent} has no {path.name}; attach the Kaggle dataset "
                       "raddar/chest-xrays-indiana-university or pass --data-dir")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise CxrError(f"{path} is not a readable CSV ({exc.__class__.__name__}); re-download it "
                       "from the Kaggle dataset") from None
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise CxrError(f"{path} lacks the column(s) {', '.join(missing)} (it has: "
                       f"{', '.join(frame.columns)}); use the Kaggle dataset's original file")
    bad_uid = ~frame["uid"].str.fullmatch(r"\s*\d+\s*")  # "1.5", "", "abc": not a report number
    if bad_uid.any():
        raise CxrError(f"{path} has a non-integer uid {frame.loc[bad_uid, 'uid'].iloc[0]!r} on row "
                       f"{int(np.flatnonzero(bad_uid)[0]) + 2}; fix or remove that row")
    frame["uid"] = frame["uid"].astype(int)
    return frame


def read_tables(data_dir: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(reports, projections) from a dataset folder in the Kaggle layout, validated."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise CxrError(f"data dir {data_dir} does not exist; attach the Kaggle dataset "
                       "raddar/chest-xrays-indiana-university or pass --data-dir")
    reports = _read_csv(data_dir / REPORTS_CSV, REPORT_COLUMNS_NEEDED)
    projections = _read_csv(data_dir / PROJECTIONS_CSV, PROJECTION_COLUMNS_NEEDED)
    return reports, projections


def image_path(data_dir: str | os.PathLike, filename: str) -> Path:
    return Path(data_dir) / IMAGES_SUBDIR / filename


def inside(folder: str | os.PathLike, name: str) -> Path | None:
    """folder/name when it resolves (symlinks and `..` followed) to a place under folder, else
    None: a file named in a CSV ("../../x.png", "/etc/x.png") must not reach outside its folder."""
    root = Path(folder).resolve()
    try:
        path = (root / str(name)).resolve()
    except (OSError, RuntimeError):  # a symlink loop
        return None
    return path if path != root and path.is_relative_to(root) else None


def contained_image_path(data_dir: str | os.PathLike, filename: str) -> Path | None:
    """image_path, or None when the filename points outside the dataset's image folder."""
    return image_path(data_dir, filename) if inside(Path(data_dir) / IMAGES_SUBDIR, filename) else None


# ---------------------------------------------------------------- prompts --------------------

def collapse_whitespace(text: str) -> str:
    return " ".join(str(text).split())


_XXXX = re.compile(r"\b[xX]*XXXX[xX]*\b(?:[-,]\s*)?")
_LIST_NUMBER = re.compile(r"(?:(?<=\s)|^)\d{1,2}[.)]\s+(?=\S)")


def clean_prompt(text: str) -> str:
    """Optional cleaning: drop XXXX de-identification marks, list numbering and the stray
    punctuation they leave. "x-XXXX" becomes "x-ray": the de-identifier masked the word "ray"."""
    text = collapse_whitespace(text)
    text = re.sub(r"\b([xX])-XXXX\b", r"\1-ray", text)
    text = _XXXX.sub("", text)
    text = _LIST_NUMBER.sub("", text)
    text = re.sub(r"\s+([.,;:])", r"\1", text)  # space before punctuation
    text = re.sub(r"([.,;:])(?:\s*[.,;:])+", r"\1", text)  # runs of punctuation
    text = re.sub(r"-(?=[\s.,;:]|$)", "", text)  # a hyphen left dangling by a removed XXXX
    text = re.sub(r"^[\s.,;:]+", "", text)
    return collapse_whitespace(text)


def count_tokens(prompts, tokenizer) -> dict[str, int]:
    """Number of CLIP ids per distinct prompt, start and end tokens included, not truncated."""
    distinct = sorted({p for p in prompts if p})
    if not distinct:
        return {}
    ids = tokenizer(distinct, truncation=False, add_special_tokens=True)["input_ids"]
    return {p: len(i) for p, i in zip(distinct, ids)}


# ---------------------------------------------------------------- images ---------------------

def inspect_image(path: Path) -> tuple[str | None, int, int]:
    """(problem, width, height) from the file's header and trailer, without decoding pixels.

    problem is None, "missing_image" or "unreadable_image". A truncated PNG lacks its IEND
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
    return None, width, height


def inspect_images(paths: list[Path], workers: int = 8, progress: bool = True) -> list[tuple[str | None, int, int]]:
    # Threads: the work is file I/O (slow on Kaggle's mounted inputs), not Python.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(tqdm(pool.map(inspect_image, paths, chunksize=64), total=len(paths),
                         desc="checking images", disable=not progress))


# ---------------------------------------------------------------- split ----------------------

def check_split(mode: str, test_fraction: float) -> None:
    if mode not in SPLITS:
        raise CxrError(f"--split {mode!r} is not known; use 'patient' (no leak) or 'image' (the seed's)")
    if not 0.0 < test_fraction < 1.0:
        raise CxrError(f"--test-fraction must be between 0 and 1, got {test_fraction}")


def split_pairs(pairs: pd.DataFrame, mode: str, test_fraction: float, seed: int) -> pd.Series:
    """'train'/'test' per row.

    image: the seed's split, test = int(fraction x n) pairs drawn at random (the frontal and
    lateral images of one report can land on both sides: a leak).
    patient: whole uids go to one side; uids are shuffled and taken into test until it holds
    about the fraction of pairs.
    """
    check_split(mode, test_fraction)
    n = len(pairs)
    split = pd.Series("train", index=pairs.index)
    if n == 0:
        return split
    rng = np.random.default_rng(seed)
    if mode == "image":
        test_rows = rng.permutation(n)[: int(test_fraction * n)]
        split.iloc[test_rows] = "test"
        return split
    sizes = pairs.groupby("uid").size()
    uids = sizes.index.to_numpy()[rng.permutation(len(sizes))]
    target = test_fraction * n
    taken, test_uids = 0, []
    for uid in uids:
        size = int(sizes[uid])
        # Take a uid when it brings the count closer to the target.
        if abs(taken + size - target) < abs(taken - target):
            test_uids.append(uid)
            taken += size
    split[pairs["uid"].isin(test_uids)] = "test"
    return split


def patients_on_both_sides(pairs: pd.DataFrame) -> int:
    sides = pairs.groupby("uid")["split"].nunique()
    return int((sides > 1).sum())


# ---------------------------------------------------------------- prepare --------------------

@dataclass
class PrepareResult:
    pairs: pd.DataFrame
    excluded: pd.DataFrame
    summary: dict
    out: Path

    @property
    def token_counts(self) -> pd.Series:
        """CLIP ids per listed image with a non-empty prompt, kept or excluded."""
        counts = pd.concat([self.pairs["n_tokens"], self.excluded["n_tokens"]], ignore_index=True)
        return counts[counts > 0]


def sample_images(dataset: "ChestXrayDataset", n: int, seed: int = 0) -> tuple[list, list[str]]:
    """n random (resized image, caption) pairs from a dataset, for a grid."""
    rng = np.random.default_rng(seed)
    picks = sorted(rng.choice(len(dataset), size=min(n, len(dataset)), replace=False).tolist())
    images = [dataset.load_image(i) for i in picks]
    captions = [f"{dataset.pairs.at[i, 'projection']} | {dataset.pairs.at[i, 'prompt']}" for i in picks]
    return images, captions


def prepare(cfg: PrepareConfig, tokenizer=None, progress: bool = True) -> PrepareResult:
    """Run the data stage and write pairs.csv, excluded.csv, summary.json and the config."""
    from .models import load_tokenizer

    data_dir = resolve_data_dir(cfg.data_dir)
    reports, projections = read_tables(data_dir)
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.tokenizer)

    images = projections[list(PROJECTION_COLUMNS_NEEDED)].sort_values(["uid", "filename"], kind="stable")
    if cfg.limit is not None:
        images = images.head(cfg.limit)
    images = images.reset_index(drop=True)
    # One film is one pair: a file listed twice would train twice. The first listing (by uid,
    # then file order) is kept, the others are excluded as duplicate_row.
    duplicate = images.duplicated("filename", keep="first")
    # A uid with several report rows: the first row in the file is the report (counted in the summary).
    duplicate_reports = int(reports.duplicated("uid").sum())
    reports = reports.drop_duplicates("uid", keep="first")
    table = images.merge(reports[["uid", "impression"]], on="uid", how="left", indicator=True)
    table["prompt"] = table["impression"].fillna("").map(collapse_whitespace)
    if cfg.clean_prompts:
        table["prompt"] = table["prompt"].map(clean_prompt)
    n_tokens = count_tokens(table["prompt"], tokenizer)
    table["n_tokens"] = table["prompt"].map(lambda p: n_tokens.get(p, 0)).astype(int)

    # The first reason that applies, in the order of EXCLUSION_REASONS.
    reason = pd.Series("", index=table.index, dtype=object)
    reason[duplicate.to_numpy()] = "duplicate_row"
    wanted = table["projection"].isin(PROJECTIONS[cfg.projection])
    reason[(reason == "") & (table["_merge"] == "left_only")] = "no_report"
    reason[(reason == "") & ~wanted] = "other_projection"
    reason[(reason == "") & (table["prompt"] == "")] = "empty_impression"
    reason[(reason == "") & (table["n_tokens"] > cfg.max_tokens)] = "too_long"
    # A filename that leads outside the image folder is never opened.
    paths = [contained_image_path(data_dir, f) for f in table["filename"]]
    outside = pd.Series([p is None for p in paths], index=table.index)
    reason[(reason == "") & outside] = "outside_data_dir"
    # Images are checked for every listed file (headers only), so the summary counts them all.
    checks = inspect_images([p for p in paths if p is not None], cfg.workers, progress)
    checks_iter = iter(checks)
    checks = [("", 0, 0) if p is None else next(checks_iter) for p in paths]
    problem = pd.Series([c[0] or "" for c in checks], index=table.index, dtype=object)
    table["width"] = [c[1] for c in checks]
    table["height"] = [c[2] for c in checks]
    reason[(reason == "") & (problem != "")] = problem[(reason == "") & (problem != "")]
    table["reason"] = reason

    pairs = table[table["reason"] == ""].drop(columns=["reason", "impression", "_merge"]).reset_index(drop=True)
    pairs["split"] = split_pairs(pairs, cfg.split, cfg.test_fraction, cfg.seed)
    pairs = pairs[list(PAIRS_COLUMNS)]
    sides = {s: int((pairs["split"] == s).sum()) for s in ("train", "test")}
    empty = [s for s, n in sides.items() if n == 0]
    if empty:  # nothing is written: an empty side would fail later, in train or evaluate
        raise CxrError(f"the {cfg.split} split of {len(pairs)} pairs with --test-fraction {cfg.test_fraction} leaves "
                       f"no {empty[0]} pairs; {'lower' if empty[0] == 'train' else 'raise'} --test-fraction"
                       + (" or use more data (--limit, more reports)" if len(pairs) < 10 else ""))
    excluded = table[table["reason"] != ""][["uid", "filename", "projection", "reason", "n_tokens"]].reset_index(drop=True)

    summary = summarize(pairs, excluded, table, reports, problem, cfg)
    summary["duplicate_report_rows"] = duplicate_reports
    out = Path(cfg.out)
    write_csv(out / "pairs.csv", pairs)
    write_csv(out / "excluded.csv", excluded)
    write_json(out / "summary.json", summary)
    save_config(cfg, out / "prepare_config.json", data_dir=str(data_dir))
    return PrepareResult(pairs, excluded, summary, out)


def summarize(pairs, excluded, table, reports, problem, cfg: PrepareConfig) -> dict:
    reasons = excluded["reason"].value_counts()
    return {
        "images_listed": int(len(table)),
        "reports": int(len(reports)),
        "reports_without_images": int((~reports["uid"].isin(table["uid"])).sum()) if cfg.limit is None else None,
        "pairs": int(len(pairs)),
        "excluded": int(len(excluded)),
        "excluded_by_reason": {r: int(reasons.get(r, 0)) for r in EXCLUSION_REASONS},
        # Image problems among all listed files, including those excluded for their text first.
        "image_problems_all_listed": {r: int((problem == r).sum()) for r in ("missing_image", "unreadable_image")},
        "split": cfg.split,
        "test_fraction": cfg.test_fraction,
        "pairs_by_split": {s: int((pairs["split"] == s).sum()) for s in ("train", "test")},
        "patients_by_split": {s: int(pairs.loc[pairs["split"] == s, "uid"].nunique()) for s in ("train", "test")},
        "patients_on_both_sides": patients_on_both_sides(pairs),
        "pairs_by_projection": {k: int(v) for k, v in pairs["projection"].value_counts().sort_index().items()},
        "distinct_prompts": int(pairs["prompt"].nunique()),
        "distinct_prompts_by_split": {s: int(pairs.loc[pairs["split"] == s, "prompt"].nunique()) for s in ("train", "test")},
        "max_tokens": cfg.max_tokens,
        "prompt_tokens": {
            "median": float(pairs["n_tokens"].median()) if len(pairs) else None,
            "max": int(pairs["n_tokens"].max()) if len(pairs) else None,
        },
        "clean_prompts": cfg.clean_prompts,
        "projection": cfg.projection,
        "limit": cfg.limit,
    }


PAIRS_REQUIRED = ("uid", "filename", "prompt", "split")


def load_pairs(path: str | os.PathLike, split: str | None = None) -> pd.DataFrame:
    """pairs.csv as written by prepare, checked; optionally one split only."""
    path = Path(path)
    if not path.is_file():
        raise CxrError(f"pairs file {path} does not exist; run `python -m cxr_helpers prepare` first")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise CxrError(f"{path} is not a readable CSV ({exc.__class__.__name__}); it must be a pairs.csv "
                       "written by `python -m cxr_helpers prepare`") from None
    missing = [c for c in PAIRS_REQUIRED if c not in frame.columns]
    if missing:
        raise CxrError(f"{path} lacks the column(s) {', '.join(missing)}; it must be a pairs.csv "
                       "written by `python -m cxr_helpers prepare`")
    bad_uid = ~frame["uid"].str.fullmatch(r"\s*\d+\s*")
    if bad_uid.any():
        raise CxrError(f"{path} has a non-integer uid {frame.loc[bad_uid, 'uid'].iloc[0]!r} on row "
                       f"{int(np.flatnonzero(bad_uid)[0]) + 2}; re-run prepare")
    frame["uid"] = frame["uid"].astype(int)
    for column in ("n_tokens", "width", "height"):  # numbers in pairs.csv, when present
        if column in frame.columns:
            frame[column] = pd.to_numeric(frame[column], errors="coerce")
    labels = sorted(set(frame["split"]) - {"train", "test"})
    if labels:  # silently dropping them would shrink both sides
        raise CxrError(f"{path} has split label(s) {', '.join(map(repr, labels))}; only train and test are "
                       "known: fix those rows or re-run prepare")
    if split is not None:
        if split not in ("train", "test"):
            raise CxrError(f"split {split!r} is not known; use train or test")
        frame = frame[frame["split"] == split].reset_index(drop=True)
    return frame


# ---------------------------------------------------------------- dataset --------------------

FITS = ("stretch", "pad", "crop")


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


def _decode_full_image(path: Path) -> Image.Image:
    """Decode one full-size film (the slow step the cache exists to avoid)."""
    with Image.open(path) as im:
        im.load()
        return im.copy()


class ChestXrayDataset:
    """(image, prompt) pairs as 3-channel tensors in [-1, 1] at resolution x resolution.

    Resized images are cached on disk as small PNGs keyed on the source file (name, size,
    mtime), the resolution and the fit, so each full-size PNG is decoded once across runs.
    """

    def __init__(self, pairs: pd.DataFrame | str | os.PathLike, data_dir: str | os.PathLike,
                 resolution: int = 128, cache_dir: str | os.PathLike | None = None,
                 split: str | None = None, fit: str = "stretch"):
        if isinstance(pairs, (str, os.PathLike)):
            pairs = load_pairs(pairs, split)
        elif split is not None:
            pairs = pairs[pairs["split"] == split].reset_index(drop=True)
        if resolution < 8 or resolution % 8:
            raise CxrError(f"resolution must be a positive multiple of 8 (the VAE downsamples by 8), got {resolution}")
        if fit not in FITS:
            raise CxrError(f"fit {fit!r} is not known; use stretch, pad or crop")
        self.pairs = pairs.reset_index(drop=True)
        self.data_dir = Path(data_dir)
        self.resolution = resolution
        self.fit = fit
        self.cache_dir = Path(cache_dir) / f"{resolution}px-{fit}" if cache_dir else None

    def __len__(self) -> int:
        return len(self.pairs)

    def _cache_path(self, source: Path) -> Path | None:
        if self.cache_dir is None:
            return None
        stat = source.stat()
        key = f"{source.name}|{stat.st_size}|{stat.st_mtime_ns}|{self.resolution}|{self.fit}|lanczos"
        digest = hashlib.sha1(key.encode()).hexdigest()[:16]
        return self.cache_dir / f"{source.name.split('.')[0]}-{digest}.png"

    def is_cached(self, index: int) -> bool:
        source = contained_image_path(self.data_dir, self.pairs.at[index, "filename"])
        if self.cache_dir is None or source is None or not source.is_file():
            return False
        return self._cache_path(source).is_file()

    def load_image(self, index: int) -> Image.Image:
        """The resized 8-bit grayscale image of pair `index` (from the cache when there)."""
        filename = self.pairs.at[index, "filename"]
        source = contained_image_path(self.data_dir, filename)
        if source is None:
            raise CxrError(f"pairs.csv names {filename!r}, which lies outside {self.data_dir / IMAGES_SUBDIR}; "
                           "re-run prepare (it excludes such rows as outside_data_dir)")
        if not source.is_file():
            raise CxrError(f"image {source} is missing; re-run prepare so it goes to excluded.csv")
        cached = self._cache_path(source)
        if cached is not None and cached.is_file():
            with Image.open(cached) as im:
                return im.convert("L")
        try:
            small = resize_xray(_decode_full_image(source), self.resolution, self.fit)
        except (OSError, UnidentifiedImageError, SyntaxError, Image.DecompressionBombError) as exc:
            raise CxrError(f"image {source} could not be decoded ({exc}); remove it from pairs.csv "
                           "or replace the file") from None
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(cached) as tmp:
                small.save(tmp, format="PNG")
        return small

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
        if self.cache_dir is None:
            return 0
        todo = [i for i in range(len(self)) if not self.is_cached(i)]
        with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
            list(tqdm(pool.map(self.load_image, todo), total=len(todo), desc="resizing images",
                      disable=not progress or not todo))
        return len(todo)


def mesh_major_terms(reports: pd.DataFrame) -> pd.Series:
    """Reports per MeSH major term ("Cardiomegaly/mild;Opacity/lung/base" -> Cardiomegaly,
    Opacity), most common first. Empty when the CSV has no MeSH column."""
    if "MeSH" not in reports.columns:
        return pd.Series(dtype=int)
    terms = reports["MeSH"].fillna("").map(
        lambda s: sorted({t.split("/")[0].strip() for t in s.split(";") if t.strip()}))
    return terms.explode().dropna().value_counts()
