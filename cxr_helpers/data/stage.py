"""The data stage: the Kaggle CSVs and PNGs -> clean (image, prompt) pairs and a split
(dataset.ChestXrayDataset serves them to the other stages).

Rule (the seed experiment's): prompt = the report's impression with whitespace collapsed; a
pair is kept when the prompt is non-empty and SD1.5's CLIP tokenizer gives at most 77 ids,
start and end tokens included, so nothing is truncated. Every listed image ends up in exactly
one of pairs.csv (kept) or excluded.csv (with its reason).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from ..config.stages import PrepareConfig, output_identity, save_config
from ..core.errors import CxrError
from .image_cache import inspect_images
from ..core.files import write_csv, write_json
from ..core.ownership import owned
from ..core.layout import (EXCLUDED_COLUMNS, EXCLUDED_CSV, PAIRS_COLUMNS, PAIRS_CSV, PAIRS_SPLITS, PREPARE_CONFIG_JSON,
                           PROJECTION_COLUMNS_NEEDED, SUMMARY_JSON, contained_image_path)
from .impression_labels import impression_label_table
from .labels import agreement_with_mesh
from .prompts import clean_prompt, collapse_whitespace, count_tokens
from .tables import read_tables, resolve_data_dir
from ..models.tokenizer import load_tokenizer

IMAGE_PROBLEMS = ("missing_image", "unreadable_image", "oversized_image")  # image_cache.inspect_image's
EXCLUSION_REASONS = ("duplicate_row", "no_report", "other_projection", "empty_impression", "too_long",
                     "outside_data_dir", *IMAGE_PROBLEMS)
PROJECTIONS = {"both": ("Frontal", "Lateral"), "frontal": ("Frontal",), "lateral": ("Lateral",)}


# ---------------------------------------------------------------- split ----------------------

def split_pairs(pairs: pd.DataFrame, mode: str, test_fraction: float, seed: int) -> pd.Series:
    """'train'/'test' per row.

    image: the seed's split, test = int(fraction x n) pairs drawn at random (the frontal and
    lateral images of one report can land on both sides: a leak).
    patient: whole uids go to one side; uids are shuffled and taken into test until it holds
    about the fraction of pairs.
    """
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


def prepare(cfg: PrepareConfig, tokenizer=None, progress: bool = True) -> PrepareResult:
    """Run the data stage and write pairs.csv, excluded.csv, summary.json and the config."""
    data_dir = resolve_data_dir(cfg.data_dir)
    out = Path(cfg.out)
    # Checked before any work: OUT holds this prepare's output or nothing (a second prepare into
    # it at the same time is refused; other settings' pairs.csv is refused or, --overwrite, moved aside).
    with owned(out, "prepare", prepare_identity(cfg, data_dir), cfg.overwrite):
        reports, projections = read_tables(data_dir)
        if tokenizer is None:
            tokenizer = load_tokenizer(cfg.tokenizer)
        images = _listed_images(projections, cfg.limit)
        # A uid with several report rows: the first row in the file is the report (counted in the summary).
        duplicate_reports = int(reports.duplicated("uid").sum())
        reports = reports.drop_duplicates("uid", keep="first")
        table = _with_prompts(images, reports, cfg, tokenizer)
        problem = _exclude(table, data_dir, cfg, progress)
        pairs = _split_kept(table, cfg)
        excluded = table[table["reason"] != ""][list(EXCLUDED_COLUMNS)].reset_index(drop=True)

        summary = summarize(pairs, excluded, table, reports, problem, cfg)
        summary["duplicate_report_rows"] = duplicate_reports
        write_csv(out / PAIRS_CSV, pairs)
        write_csv(out / EXCLUDED_CSV, excluded)
        write_json(out / SUMMARY_JSON, summary)
        save_config(cfg, out / PREPARE_CONFIG_JSON, data_dir=str(data_dir))
    return PrepareResult(pairs, excluded, summary, out)


def prepare_identity(cfg: PrepareConfig, data_dir: Path) -> dict:
    """What pairs.csv is made from: the settings, the dataset's tables and the tokenizer by content."""
    return output_identity(replace(cfg, data_dir=str(data_dir)))


def _listed_images(projections: pd.DataFrame, limit: int | None) -> pd.DataFrame:
    """The listed images by uid, then file; the first `limit` of them when given."""
    images = projections[list(PROJECTION_COLUMNS_NEEDED)].sort_values(["uid", "filename"], kind="stable")
    if limit is not None:
        images = images.head(limit)
    return images.reset_index(drop=True)


def _with_prompts(images: pd.DataFrame, reports: pd.DataFrame, cfg: PrepareConfig, tokenizer) -> pd.DataFrame:
    """One row per listed image with its report's prompt and token count; `reason` starts as
    duplicate_row for a file listed again (one film is one pair: it would train twice; the
    first listing, by uid then file order, is kept) and empty for the others."""
    duplicate = images.duplicated("filename", keep="first")
    table = images.merge(reports[["uid", "impression"]], on="uid", how="left", indicator=True)
    table["prompt"] = table["impression"].fillna("").map(collapse_whitespace)
    if cfg.clean_prompts:
        table["prompt"] = table["prompt"].map(clean_prompt)
    n_tokens = count_tokens(table["prompt"], tokenizer)
    table["n_tokens"] = table["prompt"].map(lambda p: n_tokens.get(p, 0)).astype(int)
    table["reason"] = pd.Series("", index=table.index, dtype=object)
    table.loc[duplicate.to_numpy(), "reason"] = "duplicate_row"
    return table


def _exclude(table: pd.DataFrame, data_dir: Path, cfg: PrepareConfig, progress: bool) -> pd.Series:
    """Fill table's `reason` (the first that applies, in the order of EXCLUSION_REASONS) and its
    width and height; returns every listed file's image problem ("" when none)."""
    reason = table["reason"].copy()
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
    return problem


def _split_kept(table: pd.DataFrame, cfg: PrepareConfig) -> pd.DataFrame:
    """The kept rows with their split, in pairs.csv's columns; refused when a side is empty
    (nothing is written: an empty side would fail later, in train or evaluate)."""
    pairs = table[table["reason"] == ""].drop(columns=["reason", "impression", "_merge"]).reset_index(drop=True)
    pairs["split"] = split_pairs(pairs, cfg.split, cfg.test_fraction, cfg.seed)
    # One column per finding, from the impression (the text the model sees): 1, 0, -1 or empty.
    pairs = pd.concat([pairs[list(PAIRS_COLUMNS)], impression_label_table(pairs["prompt"])], axis=1)
    sides = {s: int((pairs["split"] == s).sum()) for s in PAIRS_SPLITS}
    empty = [s for s, n in sides.items() if n == 0]
    if empty:
        raise CxrError(f"the {cfg.split} split of {len(pairs)} pairs with --test-fraction {cfg.test_fraction} leaves "
                       f"no {empty[0]} pairs; {'lower' if empty[0] == 'train' else 'raise'} --test-fraction"
                       + (" or use more data (--limit, more reports)" if len(pairs) < 10 else ""))
    return pairs


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
        "image_problems_all_listed": {r: int((problem == r).sum()) for r in IMAGE_PROBLEMS},
        "split": cfg.split,
        "test_fraction": cfg.test_fraction,
        "pairs_by_split": {s: int((pairs["split"] == s).sum()) for s in PAIRS_SPLITS},
        "patients_by_split": {s: int(pairs.loc[pairs["split"] == s, "uid"].nunique()) for s in PAIRS_SPLITS},
        "patients_on_both_sides": patients_on_both_sides(pairs),
        "pairs_by_projection": {k: int(v) for k, v in pairs["projection"].value_counts().sort_index().items()},
        "distinct_prompts": int(pairs["prompt"].nunique()),
        "distinct_prompts_by_split": {s: int(pairs.loc[pairs["split"] == s, "prompt"].nunique()) for s in PAIRS_SPLITS},
        "max_tokens": cfg.max_tokens,
        "prompt_tokens": {
            "median": float(pairs["n_tokens"].median()) if len(pairs) else None,
            "max": int(pairs["n_tokens"].max()) if len(pairs) else None,
        },
        # The impression labeller against the collection's own MeSH/Problems coding, per finding.
        "label_agreement_with_mesh": agreement_with_mesh(pairs, reports),
        "clean_prompts": cfg.clean_prompts,
        "projection": cfg.projection,
        "limit": cfg.limit,
    }
