
import numpy as np
import pandas as pd
from PIL import Image

from cxr_helpers.config.stages import SynthConfig
from cxr_helpers.evaluation.geometry_oracle import heart_width_fraction
from cxr_helpers.demo.synthetic_dataset import make_synthetic_dataset
from cxr_helpers.demo.films import Finding, draw_patient, render


def test_exact_kaggle_layout(synth_dir):
    reports = pd.read_csv(synth_dir / "indiana_reports.csv", keep_default_na=False)
    projections = pd.read_csv(synth_dir / "indiana_projections.csv")
    assert list(reports.columns) == ["uid", "MeSH", "Problems", "image", "indication", "comparison", "findings",
                                     "impression"]
    assert list(projections.columns) == ["uid", "filename", "projection"]
    assert set(projections["projection"]) == {"Frontal", "Lateral"}
    assert projections["filename"].str.fullmatch(r"\d+_IM-\d{4}-\d{4}\.dcm\.png").all()
    assert (reports["MeSH"] != "").all() and (reports["Problems"] != "").all()
    images = synth_dir / "images" / "images_normalized"
    present = [f for f in projections["filename"] if (images / f).is_file()]
    assert len(present) == len(projections) - 1  # broken_images=3: one of them is absent
    with Image.open(images / present[0]) as im:
        assert im.mode == "L" and min(im.size) > 100


def test_impressions_have_the_real_datas_quirks(tmp_path):
    out = make_synthetic_dataset(SynthConfig(out=str(tmp_path / "d"), reports=300, image_size=64, broken_images=0),
                                 progress=False)
    text = pd.read_csv(out / "indiana_reports.csv", keep_default_na=False)["impression"]
    assert (text == "").sum() > 0  # some empty
    assert text.str.contains("XXXX").mean() > 0.05  # de-identification marks
    assert text.str.contains(r"^1\. .* 2\. ", regex=True).sum() > 0  # numbered lists
    assert text.str.len().max() > 400  # some far over 77 CLIP tokens
    assert text.value_counts().iloc[0] > 5  # stock "no acute disease" phrasings repeat
    uids = pd.read_csv(out / "indiana_reports.csv")["uid"]
    listed = pd.read_csv(out / "indiana_projections.csv")["uid"]
    assert (~uids.isin(listed)).sum() > 0  # some reports without images, as in the real data


def test_same_seed_same_dataset(tmp_path):
    a = make_synthetic_dataset(SynthConfig(out=str(tmp_path / "a"), reports=4, image_size=64), progress=False)
    b = make_synthetic_dataset(SynthConfig(out=str(tmp_path / "b"), reports=4, image_size=64), progress=False)
    assert (a / "indiana_reports.csv").read_text() == (b / "indiana_reports.csv").read_text()
    name = pd.read_csv(a / "indiana_projections.csv")["filename"][0]
    sub = "images/images_normalized/" + name
    assert (a / sub).read_bytes() == (b / sub).read_bytes()


def _films(findings, view="Frontal", n=12, size=128):
    out = []
    for i in range(n):
        rng = np.random.default_rng(i)
        out.append(render(findings, view, draw_patient(rng), size, size, rng).astype(np.float32))
    return out


def test_prompts_control_the_pictures():
    # Cardiomegaly: a wider heart at 128 px (cardiothoracic ratio), across patients.
    normal = np.array([heart_width_fraction(f) for f in _films([], n=20)])
    enlarged = np.array([heart_width_fraction(f) for f in _films([Finding("cardiomegaly", severity="mild")], n=20)])
    auc = (enlarged[:, None] > normal[None, :]).mean()
    assert auc > 0.9 and normal.mean() < 0.5 < enlarged.mean() + 0.05
    # Effusion: the named side's base gets brighter than in the same patients without it
    # (PA view: the patient's right is on the image's left).
    def base_asymmetry(film):
        lower = film[64:100]  # the lung bases, outer thirds
        return lower[:, 8:52].mean() - lower[:, 76:120].mean()
    right = [base_asymmetry(f) for f in _films([Finding("effusion", side="right", severity="small")])]
    left = [base_asymmetry(f) for f in _films([Finding("effusion", side="left", severity="small")])]
    clear = [base_asymmetry(f) for f in _films([])]
    assert all(r - c > 4 for r, c in zip(right, clear, strict=True))
    assert all(c - lf > 4 for lf, c in zip(left, clear, strict=True))
    # Opacity: the named lobe is brighter than in the same patients without it.
    def zone(film):
        return film[34:50, 24:56].mean()
    assert (np.mean([zone(f) for f in _films([Finding("opacity", side="right", zone="upper")])])
            > np.mean([zone(f) for f in _films([])]) + 5)
