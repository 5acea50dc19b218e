"""MeSH labels, the second label definition: which findings a report's MeSH and Problems columns
name (the collection's own coding of the whole report, findings section included), mapped to
the chest X-ray classifiers' finding names; per prompt, per report, the MeSH term counts notebook
01 shows, and their agreement with the impression labeller (impression_labels.py, the first
definition: the words the model sees)."""

from __future__ import annotations

import pandas as pd

from .impression_labels import PRESENT, UNCERTAIN, label_column
from .tables import read_tables

# MeSH / Problems major term (lower case, as in indiana_reports.csv) -> the classifier's finding
# (torchxrayvision's pathology names). Terms not listed here give no label.
REPORT_TERM_TO_FINDING = {
    "cardiomegaly": "Cardiomegaly",
    "pleural effusion": "Effusion",
    "pulmonary atelectasis": "Atelectasis",
    "atelectasis": "Atelectasis",
    "pulmonary emphysema": "Emphysema",
    "emphysema": "Emphysema",
    "pulmonary disease, chronic obstructive": "Emphysema",
    "opacity": "Lung Opacity",
    "airspace disease": "Lung Opacity",
    "consolidation": "Consolidation",
    "pneumonia": "Pneumonia",
    "pneumothorax": "Pneumothorax",
    "pulmonary edema": "Edema",
    "edema": "Edema",
    "pulmonary fibrosis": "Fibrosis",
    "nodule": "Nodule",
    "calcified granuloma": "Nodule",  # a calcified granuloma is a small calcified nodule on the film
    "mass": "Mass",
    "hernia, hiatal": "Hernia",
    "fractures, bone": "Fracture",
    "infiltrate": "Infiltration",
}


def mesh_terms(mesh: str) -> set[str]:
    """The major terms of one MeSH cell, as written: "Cardiomegaly/mild;Opacity/lung/base" ->
    {Cardiomegaly, Opacity}."""
    return {t.split("/")[0].strip() for t in str(mesh or "").split(";")} - {""}


def report_terms(mesh: str, problems: str) -> set[str]:
    """Major terms of one report's MeSH and Problems cells, lower case: {cardiomegaly, opacity}."""
    terms = {t.lower() for t in mesh_terms(mesh)}
    terms |= {t.strip().lower() for t in str(problems or "").split(";")}
    return terms - {""}


def report_labels(reports: pd.DataFrame) -> pd.DataFrame:
    """One row per report uid, one boolean column per mapped finding."""
    findings = sorted(set(REPORT_TERM_TO_FINDING.values()))
    rows = []
    blank = pd.Series([""] * len(reports), index=reports.index)
    for uid, mesh, problems in zip(reports["uid"], reports.get("MeSH", blank), reports.get("Problems", blank),
                                   strict=True):
        mapped = {REPORT_TERM_TO_FINDING[t] for t in report_terms(mesh, problems) if t in REPORT_TERM_TO_FINDING}
        rows.append({"uid": int(uid), **{f: f in mapped for f in findings}})
    table = pd.DataFrame(rows, columns=["uid", *findings]).set_index("uid")
    return table.groupby(level=0).max()  # a uid listed twice: the findings of both rows


def prompt_labels(pairs: pd.DataFrame, labels: pd.DataFrame) -> pd.DataFrame:
    """One row per prompt text: a finding is positive when most of the reports with that
    impression carry it (the same impression can come from several reports)."""
    reports = pairs.drop_duplicates("uid")  # a report's frontal and lateral films share its impression
    per_report = labels.reindex(reports["uid"].astype(int).to_numpy())
    per_report.index = reports["prompt"].to_numpy()
    per_report = per_report.dropna()  # a uid that indiana_reports.csv lacks gives no label
    return per_report.astype(float).groupby(level=0).mean() >= 0.5


def mesh_major_terms(reports: pd.DataFrame) -> pd.Series:
    """Reports per MeSH major term (Cardiomegaly, Opacity, ...), most common first. Empty when the
    CSV has no MeSH column."""
    if "MeSH" not in reports.columns:
        return pd.Series(dtype=int)
    return reports["MeSH"].fillna("").map(lambda s: sorted(mesh_terms(s))).explode().dropna().value_counts()


# Findings a gallery shows first, when the reports carry labels: the ones the demo's films draw
# and its geometry oracle measures, and two of the commonest in the real collection.
GALLERY_FINDINGS = ("Cardiomegaly", "Effusion")


def findings_first(pairs: pd.DataFrame, data_dir, findings=GALLERY_FINDINGS) -> pd.DataFrame:
    """The pairs with, first, one report per finding (the first in their order whose report's
    MeSH / Problems name it) and one normal report, then the rest: so that a short gallery shows
    what the fine-tune should change. Unchanged when the reports carry no labels."""
    reports = read_tables(data_dir)[0] if data_dir is not None else pd.DataFrame()
    if not ({"MeSH", "Problems"} & set(reports.columns)):
        return pairs
    labels = report_labels(reports).reindex(pairs["uid"].astype(int).to_numpy()).fillna(False)
    labels.index = pairs.index
    picks = []
    for finding in findings:
        having = labels.index[labels[finding]] if finding in labels else []
        picks += [i for i in having if i not in picks][:1]
    normal = labels.index[~labels.any(axis=1)]
    picks += [i for i in normal if i not in picks][:1]
    return pd.concat([pairs.loc[picks], pairs.drop(index=picks)])


def agreement_with_mesh(pairs: pd.DataFrame, reports: pd.DataFrame) -> dict:
    """Per finding, over the reports in `pairs` (one row each, with its impression labels): how
    many the impression names as present, how many MeSH/Problems code, both, the share that agree
    and Cohen's kappa. Impressions that are uncertain about the finding are counted apart and left
    out of the agreement. Empty when the reports carry no MeSH or Problems column."""
    if not ({"MeSH", "Problems"} & set(reports.columns)) or not len(pairs):
        return {}
    one = pairs.drop_duplicates("uid")
    mesh = report_labels(reports).reindex(one["uid"].astype(int).to_numpy()).fillna(False).astype(bool)
    result = {}
    for finding in mesh.columns:
        column = label_column(finding)
        if column not in one.columns:
            continue
        said = pd.to_numeric(one[column], errors="coerce").fillna(0).to_numpy()  # empty: not mentioned
        uncertain = said == UNCERTAIN
        a, b = said[~uncertain] == PRESENT, mesh[finding].to_numpy()[~uncertain]
        result[finding] = {"reports": int(len(a)), "impression_present": int(a.sum()), "mesh_present": int(b.sum()),
                           "both": int((a & b).sum()), "impression_uncertain": int(uncertain.sum()),
                           "agreement": round(float((a == b).mean()), 4) if len(a) else None,
                           "cohen_kappa": _kappa(a, b)}
    return result


def _kappa(a, b) -> float | None:
    """Cohen's kappa of two boolean ratings (None when chance agreement is total)."""
    import numpy as np

    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if not len(a):
        return None
    observed = float((a == b).mean())
    expected = float(a.mean() * b.mean() + (1 - a.mean()) * (1 - b.mean()))
    return None if expected >= 1 else round((observed - expected) / (1 - expected), 4)
