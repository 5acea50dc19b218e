"""A procedural chest X-ray dataset in the exact layout of the Kaggle dataset
raddar/chest-xrays-indiana-university, for offline runs and tests.

Each report draws a set of findings; the picture is rendered from those findings and the
impression is written from the same findings in the real reports' style (XXXX marks, numbered
lists, stock "no acute disease" phrasings, some empty, some longer than CLIP's 77 tokens). So
the prompt really controls the picture: a wider heart for cardiomegaly, a blunted
costophrenic angle on the named side for an effusion, a blob in the named lobe for an opacity,
and so on, and a model trained on it has something measurable to learn.

The films are drawn in synthetic_films.py; this module writes the reports and the dataset.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from ..core.bars import tqdm

from ..config.stages import SynthConfig, save_config
from ..core.files import atomic_path, write_csv
from ..core.layout import (IMAGES_SUBDIR, PROJECTION_COLUMNS, PROJECTIONS_CSV, REPORT_COLUMNS, REPORTS_CSV,
                           SYNTH_CONFIG_JSON, SYNTHETIC_LABELS_CSV)
from .films import Finding, draw_patient, render

FINDING_KINDS = ("cardiomegaly", "effusion", "opacity", "granuloma", "atelectasis", "emphysema")
_FINDING_WEIGHTS = np.array([0.25, 0.15, 0.2, 0.15, 0.15, 0.10])
_P_NORMAL = 0.42
_P_TWO_FINDINGS = 0.3  # among abnormal reports
_P_EMPTY_IMPRESSION = 0.03
_P_LONG_IMPRESSION = 0.03
_P_XXXX = 0.17  # about 1 impression in 6 carries an XXXX mark in the real data


@dataclass
class SynthReport:
    uid: int
    findings: list[Finding] = field(default_factory=list)

    @property
    def normal(self) -> bool:
        return not self.findings


# ---------------------------------------------------------------- text -----------------------

_NORMAL_IMPRESSIONS = [
    "No acute cardiopulmonary abnormality.", "No active disease.", "No acute cardiopulmonary disease.",
    "No acute pulmonary disease.", "No acute cardiopulmonary process.", "Negative chest x-XXXX.",
    "No acute disease.", "Normal chest x-XXXX.", "No acute cardiopulmonary findings.",
    "Normal chest", "No acute cardiopulmonary abnormalities.",
]
_SEVERITY_WORD = {"mild": "Mild", "moderate": "Moderate", "small": "Small", "large": "Large"}


def describe(f: Finding, rng) -> str:
    """One sentence of impression for one finding, in one of the real reports' phrasings."""
    pick = lambda options: options[rng.integers(len(options))]  # noqa: E731
    if f.kind == "cardiomegaly":
        sev = "Mild" if f.severity == "mild" else "Moderate"
        return pick([f"{sev} cardiomegaly.", "Cardiomegaly.", f"{sev} enlargement of the cardiac silhouette.",
                     "Stable cardiomegaly.", "Enlarged heart size."])
    if f.kind == "effusion":
        sev = _SEVERITY_WORD[f.severity]
        if f.side == "bilateral":
            return pick([f"{sev} bilateral pleural effusions.", "Bilateral pleural effusions."])
        return pick([f"{sev} {f.side} pleural effusion.",
                     f"Blunting of the {f.side} costophrenic angle consistent with {sev.lower()} effusion.",
                     f"{sev} {f.side}-sided pleural effusion."])
    if f.kind == "opacity":
        lobe = f"{f.side} {f.zone} lobe"
        return pick([f"{lobe.capitalize()} opacity concerning for pneumonia.", f"{lobe.capitalize()} airspace disease.",
                     f"Focal {lobe} consolidation.", f"Patchy opacity in the {lobe}, may represent pneumonia."])
    if f.kind == "granuloma":
        return pick([f"Calcified granuloma in the {f.side} {f.zone} lobe.",
                     f"{f.side.capitalize()} {f.zone} lobe calcified granuloma.",
                     f"Stable calcified granuloma, {f.side} {f.zone} lobe."])
    if f.kind == "atelectasis":
        base = "bibasilar" if f.side == "bilateral" else f"{f.side} basilar"
        return pick([f"{base.capitalize()} atelectasis.", f"Subsegmental {base} atelectasis.",
                     f"{base.capitalize()} opacity likely atelectasis."])
    if f.kind == "emphysema":
        return pick(["Hyperexpanded lungs consistent with emphysema.", "Changes of COPD.",
                     "Emphysema.", "Hyperinflation suggesting chronic obstructive pulmonary disease."])
    raise ValueError(f.kind)


_LONG_TAILS = [
    "Compared to the prior examination dated XXXX, there has been no significant interval change in the "
    "appearance of the cardiomediastinal silhouette, the pulmonary vasculature is within normal limits, "
    "there is no pneumothorax, and the visualized osseous structures demonstrate mild degenerative changes "
    "of the thoracic spine without acute fracture, recommend clinical correlation and follow-up imaging "
    "in XXXX months if symptoms persist or worsen.",
    "Limited examination due to patient positioning and low lung volumes, which may accentuate the "
    "bronchovascular markings and cardiac silhouette; no definite focal consolidation, large pleural "
    "effusion or pneumothorax is identified on this study, though a small effusion cannot be entirely "
    "excluded, and repeat PA and lateral views are recommended when the patient is able to cooperate.",
]


def write_impression(report: SynthReport, rng) -> str:
    """The impression text for a report's findings, in the real data's style."""
    if report.normal:
        text = _NORMAL_IMPRESSIONS[rng.integers(len(_NORMAL_IMPRESSIONS))]
        if rng.random() < 0.12:
            text += " Stable XXXX sternotomy changes." if rng.random() < 0.5 else " Degenerative changes of the spine."
    else:
        parts = [describe(f, rng) for f in report.findings]
        if rng.random() < 0.5 and not any(f.kind in ("effusion", "opacity") for f in report.findings):
            parts.append(rng.choice(["No acute pulmonary disease.", "No acute disease.", "No focal airspace disease."]))
        if len(parts) > 1 and rng.random() < 0.6:
            text = " ".join(f"{i}. {p}" for i, p in enumerate(parts, 1))  # the numbered-list style
        else:
            text = " ".join(parts)
        if rng.random() < _P_XXXX:
            text += " Comparison XXXX."
    return text


def write_findings(report: SynthReport) -> str:
    kinds = {f.kind for f in report.findings}
    heart = ("The heart is enlarged." if "cardiomegaly" in kinds
             else "The heart size and mediastinal contours are within normal limits.")
    pleura = "There is pleural fluid." if "effusion" in kinds else "There is no pleural effusion or pneumothorax."
    lungs = ("The lungs are hyperexpanded." if "emphysema" in kinds
             else "The lungs are clear." if not kinds - {"cardiomegaly"}
             else "There are focal lung findings as described.")
    return f"{heart} {pleura} {lungs}"


# Per finding kind: its MeSH major term (the Problems column) and the qualifiers after it.
_MESH = {
    "cardiomegaly": ("Cardiomegaly", "{severity}"),
    "effusion": ("Pleural Effusion", "{side}/{severity}"),
    "opacity": ("Opacity", "lung/{zone} lobe/{side}"),
    "granuloma": ("Calcified Granuloma", "lung/{zone} lobe/{side}"),
    "atelectasis": ("Pulmonary Atelectasis", "base/{side}"),
    "emphysema": ("Pulmonary Emphysema", ""),
}


def mesh_terms(report: SynthReport) -> tuple[str, str]:
    """MeSH (with qualifiers, ';'-separated) and Problems (major terms), as in the Kaggle CSV."""
    if report.normal:
        return "normal", "normal"
    mesh, problems = [], []
    for f in report.findings:
        term, qualifiers = _MESH[f.kind]
        mesh.append(f"{term}/{qualifiers.format(**vars(f))}" if qualifiers else term)
        problems.append(term)
    return ";".join(mesh), ";".join(dict.fromkeys(problems))


# ---------------------------------------------------------------- sampling -------------------

def draw_finding(kind: str, rng) -> Finding:
    side = ["right", "left", "bilateral"][rng.choice(3, p=[0.42, 0.42, 0.16])]
    zone = ["upper", "lower"][rng.integers(2)]
    if kind == "cardiomegaly":
        return Finding(kind, severity=["mild", "moderate"][rng.integers(2)])
    if kind == "effusion":
        return Finding(kind, side=side, severity=["small", "large"][rng.choice(2, p=[0.7, 0.3])])
    if kind in ("opacity", "granuloma"):
        return Finding(kind, side=side if side != "bilateral" else "right", zone=zone)
    if kind == "atelectasis":
        return Finding(kind, side=side)
    return Finding(kind)


def draw_report(uid: int, rng) -> SynthReport:
    if rng.random() < _P_NORMAL:
        return SynthReport(uid)
    n = 2 if rng.random() < _P_TWO_FINDINGS else 1
    kinds = rng.choice(len(FINDING_KINDS), size=n, replace=False, p=_FINDING_WEIGHTS)
    return SynthReport(uid, [draw_finding(FINDING_KINDS[k], rng) for k in sorted(kinds)])


def _views(rng) -> list[str]:
    r = rng.random()
    if r < 0.03:
        return []  # some reports have no images, as in the real collection
    if r < 0.13:
        return ["Frontal"]
    if r < 0.16:
        return ["Frontal", "Lateral", "Lateral"]
    return ["Frontal", "Lateral"]


def make_synthetic_dataset(cfg: SynthConfig, progress: bool = True) -> Path:
    """Write the dataset to `cfg.out`: indiana_reports.csv, indiana_projections.csv, the PNGs,
    plus synthetic_labels.csv (ground truth) and synth_config.json."""
    from ..config.stages import output_identity
    from ..core.ownership import owned

    out = Path(cfg.out)
    # Never into a dataset it did not make (the real one, another seed's): its files would be replaced.
    with owned(out, "synth", output_identity(cfg), cfg.overwrite):
        return _write_synthetic_dataset(cfg, out, progress)


def _write_synthetic_dataset(cfg: SynthConfig, out: Path, progress: bool) -> Path:
    image_dir = out / IMAGES_SUBDIR
    image_dir.mkdir(parents=True, exist_ok=True)
    reports, projections, labels = [], [], []
    for uid in tqdm(range(1, cfg.reports + 1), desc="synthetic reports", disable=not progress):
        # One generator per report, so report `uid` is the same whatever --reports is.
        rng = np.random.default_rng([cfg.seed, uid])
        report = draw_report(uid, rng)
        patient = draw_patient(rng)
        roll = rng.random()
        if roll < _P_EMPTY_IMPRESSION:
            impression = ""
        elif roll < _P_EMPTY_IMPRESSION + _P_LONG_IMPRESSION:
            impression = write_impression(report, rng) + " " + _LONG_TAILS[rng.integers(len(_LONG_TAILS))]
        else:
            impression = write_impression(report, rng)
        mesh, problems = mesh_terms(report)
        views = _views(rng)
        reports.append({
            "uid": uid, "MeSH": mesh, "Problems": problems,
            "image": "Xray Chest PA and Lateral" if len(views) > 1 else "XR Chest PA",
            "indication": f"XXXX-year-old {'male' if rng.random() < 0.5 else 'female'} with "
                          f"{rng.choice(['chest pain', 'dyspnea', 'cough', 'preoperative evaluation'])}.",
            "comparison": "None." if rng.random() < 0.6 else "XXXX",
            "findings": write_findings(report), "impression": impression,
        })
        labels.append({"uid": uid, "labels": ";".join(sorted({f.kind for f in report.findings})) or "normal",
                       "findings": "|".join(f"{f.kind}:{f.side or ''}:{f.zone or ''}:{f.severity or ''}"
                                            for f in report.findings)})
        aspect = rng.uniform(0.8, 1.25)  # real films are portrait and landscape
        height = int(cfg.image_size * rng.uniform(0.9, 1.1))
        width = int(height * aspect)
        for i, view in enumerate(views):
            code = 4001 if view == "Frontal" else 3001 - 1000 * (i - 1)
            filename = f"{uid}_IM-{uid % 10000:04d}-{code}.dcm.png"
            pixels = render(report.findings, view, patient, height, width, rng)
            with atomic_path(image_dir / filename) as tmp:
                Image.fromarray(pixels, "L").save(tmp, format="PNG", compress_level=1)
            projections.append({"uid": uid, "filename": filename, "projection": view})
    _break_some_images(image_dir, [p["filename"] for p in projections], cfg)
    write_csv(out / REPORTS_CSV, pd.DataFrame(reports, columns=REPORT_COLUMNS), formula_safe=False)
    write_csv(out / PROJECTIONS_CSV, pd.DataFrame(projections, columns=PROJECTION_COLUMNS), formula_safe=False)
    write_csv(out / SYNTHETIC_LABELS_CSV, pd.DataFrame(labels))
    save_config(cfg, out / SYNTH_CONFIG_JSON,
                note="synthetic data (procedural images, template reports): not patient data")
    return out


def _break_some_images(image_dir: Path, filenames: list[str], cfg: SynthConfig) -> None:
    """Make a few listed images absent, truncated or not an image at all (the last ones listed)."""
    for i, name in enumerate(reversed(filenames[-cfg.broken_images:] if cfg.broken_images else [])):
        path = image_dir / name
        if i % 3 == 0:
            path.unlink()
        elif i % 3 == 1:
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
        else:
            path.write_text("this is not a PNG\n")


def dataset_is_built(out: str | Path, cfg: SynthConfig) -> bool:
    """True when `out` holds a complete synthetic dataset made with exactly `cfg`'s settings."""
    import json

    marker = Path(out) / SYNTH_CONFIG_JSON
    if not (marker.is_file() and (Path(out) / PROJECTIONS_CSV).is_file()):
        return False
    try:
        saved = json.loads(marker.read_text())["config"]
    except (KeyError, ValueError):
        return False
    mine = {k: v for k, v in vars(cfg).items() if k not in ("out", "overwrite")}
    return {k: saved.get(k) for k in mine} == mine
