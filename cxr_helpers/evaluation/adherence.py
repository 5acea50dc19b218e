"""Prompt adherence: does a film generated for a report's impression show that report's findings?

A chest X-ray classifier scores each image for the findings it knows; the labels come from the
words of the prompt itself (`data.impression_labels`: present, absent or uncertain), for a
generated image and for a real film (its impression) alike; the reports' MeSH coding is the
second definition, asked for by name. Per finding, the AUROC of the score against the label says
how well the images separate the prompts that name the finding from those that do not: 0.5 is
chance, 1 is perfect. Real test films, scored the same way, are the ceiling of what the classifier
can see.

Scorers are looked up by name in SCORERS:
- "xrv": torchxrayvision's DenseNet-121 (`--xrv-model`, by default `densenet121-res224-mimic_ch`,
  trained without this collection), the network of the domain FID;
- "geometry": an oracle for the procedural films of `cxr_helpers.synthetic` only, which measures
  the heart's size and pleural effusion from the renderer's known geometry (geometry_oracle.py;
  no weights, no download): for offline tests and the smoke demo.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from .geometry_oracle import GeometryOracle

if TYPE_CHECKING:  # annotations only: image_sets imports the package's heavy parts
    from ..config.stages import EvalConfig
    from .image_sets import ImageSet

def auroc_with_interval(scores, labels, level: float = 0.95) -> tuple[float, float, float]:
    """AUROC (the Mann-Whitney statistic) and DeLong's interval (DeLong et al. 1988, midrank form
    of Sun & Xu 2014), clipped to [0, 1]."""
    from scipy.stats import norm, rankdata

    scores, labels = np.asarray(scores, dtype=float), np.asarray(labels, dtype=bool)
    pos, neg = scores[labels], scores[~labels]
    m, n = len(pos), len(neg)
    both = rankdata(np.concatenate([pos, neg]))
    auc = (both[:m].sum() - m * (m + 1) / 2) / (m * n)
    v10 = (both[:m] - rankdata(pos)) / n  # per positive: share of negatives it outranks
    v01 = 1.0 - (both[m:] - rankdata(neg)) / m  # per negative: share of positives that outrank it
    var = (np.var(v10, ddof=1) / m if m > 1 else 0.0) + (np.var(v01, ddof=1) / n if n > 1 else 0.0)
    half = float(norm.ppf(0.5 + level / 2) * math.sqrt(var))
    return float(auc), max(0.0, auc - half), min(1.0, auc + half)


# ---------------------------------------------------------------- scorers --------------------

class XRVClassifier:
    """torchxrayvision's DenseNet-121 (by default its MIMIC-CXR weights, which never saw this
    collection): a score per pathology its weights were trained on; its weights are handled as
    for the domain FID (`features.XRVFeatures`)."""

    def __init__(self, weights: str | None = None, features=None, model: str | None = None):
        from .features import XRV_DEFAULT_MODEL, XRVFeatures

        self.features = features or XRVFeatures(weights or None, model or XRV_DEFAULT_MODEL)
        import torchxrayvision as xrv

        self.net = self.features.net
        self.name = f"{self.features.name}, classifier"
        # The release's list per output ("" marks an output these weights never trained: not a
        # finding they know); the DenseNet built here carries the 18 names of every output.
        self.outputs = list(xrv.models.model_urls[self.features.model]["labels"])
        self.findings = tuple(p for p in self.outputs if p)

    @torch.no_grad()
    def score(self, images: torch.Tensor, batch_size: int = 32, progress: bool = False) -> pd.DataFrame:
        from ..core.bars import tqdm

        device = next(self.net.parameters()).device
        outputs = []
        for start in tqdm(range(0, len(images), batch_size), desc="adherence: classifier", disable=not progress):
            x = self.features.network_input(images[start:start + batch_size].to(device))
            outputs.append(self.net(x).float().cpu())
        table = torch.cat(outputs).numpy() if outputs else np.zeros((0, len(self.outputs)))
        frame = pd.DataFrame(table, columns=self.outputs)
        return frame[list(self.findings)]


SCORERS = {"xrv": XRVClassifier, "geometry": GeometryOracle}


# ---------------------------------------------------------------- the measure ----------------

ADHERENCE_COLUMNS = ["set", "finding", "prompts", "auroc", "ci_low", "ci_high", "positives", "negatives", "images",
                     "uncertain", "scorer", "labels"]
# Which prompts a row covers: every image, or the images whose prompt is (seen) or is not (unseen)
# word for word a training prompt, so recall of a training caption is told apart from following a new one.
PROMPT_GROUPS = ("all", "seen", "unseen")
LABEL_DEFINITIONS = {
    "impression": "impression labeller (the prompt's own words)",
    "mesh": "MeSH/Problems of the reports with that impression (majority)",
}


def adherence(name: str, scores: pd.DataFrame, labels: pd.DataFrame, scorer_name: str, min_cases: int,
              prompts: str = "all", definition: str = "impression") -> tuple[pd.DataFrame, list[str]]:
    """Per finding both know, the AUROC of the scores against the labels (rows aligned; a label
    of <NA>, uncertain, leaves that image out of that finding); a finding with fewer than
    `min_cases` positives or negatives is skipped, with a note naming the counts."""
    rows, skipped = [], []
    for finding in [f for f in scores.columns if f in labels.columns]:
        column = labels[finding].astype("boolean")
        known = column.notna().to_numpy()
        truth = column[known].to_numpy(dtype=bool)
        positives, negatives = int(truth.sum()), int((~truth).sum())
        row = {"set": name, "finding": finding, "prompts": prompts, "positives": positives, "negatives": negatives,
               "images": len(truth), "uncertain": int((~known).sum()), "scorer": scorer_name,
               "labels": LABEL_DEFINITIONS[definition]}
        if min(positives, negatives) < min_cases:
            skipped.append(f"{finding} {positives}+/{negatives}-")
            continue
        auc, low, high = auroc_with_interval(scores[finding].to_numpy()[known], truth)
        rows.append({**row, "auroc": auc, "ci_low": low, "ci_high": high})
    notes = [f"adherence: {name} ({prompts} prompts): skipped for fewer than {min_cases} positive or negative "
             f"images (positives+/negatives-): {', '.join(skipped)}"] if skipped else []  # one per set and group
    return pd.DataFrame(rows, columns=ADHERENCE_COLUMNS), notes


def by_prompt_group(name: str, scores: pd.DataFrame, labels: pd.DataFrame, seen: np.ndarray, scorer_name: str,
                    min_cases: int, definition: str) -> tuple[list[pd.DataFrame], list[str]]:
    """adherence() over every image, then over the seen and the unseen prompts' images apart."""
    parts, notes = [], []
    for group, keep in zip(PROMPT_GROUPS, (np.ones(len(seen), bool), seen, ~seen), strict=True):
        if group != "all" and not keep.any():
            notes.append(f"adherence: {name}: no {group} prompts")
            continue
        table, skipped = adherence(name, scores[keep].reset_index(drop=True), labels[keep].reset_index(drop=True),
                                   scorer_name, min_cases, group, definition)
        parts.append(table)
        notes += skipped if group == "all" else []  # the groups' skips follow from the counts in their rows
    return parts, notes


def prompt_adherence(cfg: EvalConfig, scorer, generated: list[tuple[str, ImageSet]], real: ImageSet,
                     data_dir: Path, progress: bool) -> tuple[pd.DataFrame, list[str]]:
    """Per finding, the AUROC of the scorer's score against each image's label, for every
    generated set and for the real test films (the ceiling), over all prompts and over the seen
    and unseen ones apart; and the notes on what was left out. A generated image is labelled by
    its prompt, a real film by its impression, through the same labeller (cfg.adherence_labels)."""
    from ..data.tables import load_pairs
    from .image_sets import REAL_TEST_SET

    pairs = load_pairs(cfg.pairs)
    labeller, notes = make_labeller(cfg.adherence_labels, pairs, data_dir)
    if labeller is None:
        return pd.DataFrame(columns=ADHERENCE_COLUMNS), notes
    seen_prompts = set(pairs.loc[pairs["split"] == "train", "prompt"])
    prompt_of = dict(zip(pairs["filename"], pairs["prompt"], strict=True))
    sets = [*generated, (REAL_TEST_SET, real)]
    parts = []
    for name, image_set in sets:
        prompts = image_set.prompts if name != REAL_TEST_SET else [prompt_of[f] for f in real.files]
        labels, known = labeller(prompts)
        if not known.any():
            notes.append(f"adherence skipped for {name}: none of its {len(set(prompts))} prompt(s) is the impression "
                         f"of a report in {cfg.pairs}, so no image has a MeSH label; sample from that pairs.csv")
            continue
        if not known.all():
            notes.append(f"adherence: {name}: {int((~known).sum())} image(s) whose prompt is no report's impression "
                         "are left out")
        scores = scorer.score(image_set.images[np.flatnonzero(known)], cfg.batch_size, progress)
        seen = np.array([p in seen_prompts for p in prompts])[known]
        tables, skipped = by_prompt_group(name, scores, labels[known].reset_index(drop=True), seen, scorer.name,
                                          cfg.adherence_min_cases, cfg.adherence_labels)
        parts += tables
        notes += skipped
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=ADHERENCE_COLUMNS)
    if not len(table):
        notes.append(f"adherence: no finding of {scorer.name} has enough positive and negative images in any set")
    return table, notes


def make_labeller(definition: str, pairs: pd.DataFrame, data_dir: Path):
    """(labeller, notes): labeller(prompts) -> (labels per finding: True, False or <NA>; which
    prompts have labels). None with a note when the definition cannot label anything here."""
    if definition == "impression":
        from ..data.impression_labels import finding_truth

        return (lambda prompts: (finding_truth(prompts), np.ones(len(prompts), bool))), []
    from ..core.layout import REPORTS_CSV
    from ..data.labels import prompt_labels, report_labels
    from ..data.tables import read_tables

    reports, _ = read_tables(data_dir)
    if "MeSH" not in reports.columns and "Problems" not in reports.columns:
        return None, [f"adherence skipped: {data_dir / REPORTS_CSV} has neither a MeSH nor a Problems column, so no "
                      "report has a MeSH label; use the Kaggle dataset's original file, or --adherence-labels "
                      "impression"]
    by_prompt = prompt_labels(pairs, report_labels(reports))

    def labeller(prompts):
        known = np.array([p in by_prompt.index for p in prompts])
        labels = by_prompt.reindex(prompts).reset_index(drop=True)
        return labels, known

    return labeller, []
