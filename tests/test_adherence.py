import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cxr_helpers.data import labels as report_labelling
from cxr_helpers.data.impression_labels import finding_truth
from cxr_helpers.evaluation import adherence as adh
from cxr_helpers.evaluation import stage as ev
from cxr_helpers.evaluation import image_sets
from cxr_helpers.config.stages import EvalConfig, PrepareConfig, SynthConfig, stage_config
from cxr_helpers.data.tables import load_pairs
from cxr_helpers.data.stage import prepare
from cxr_helpers.data.dataset import ChestXrayDataset
from cxr_helpers.core.errors import CxrError
from cxr_helpers.evaluation.geometry_oracle import GeometryOracle
from cxr_helpers.demo.synthetic_dataset import make_synthetic_dataset
from conftest import write_set


@pytest.fixture(scope="module")
def larger(tmp_path_factory, tokenizer):
    """160 synthetic reports, half of them in the test split: enough films with and without
    cardiomegaly for an AUROC with a usable interval."""
    root = tmp_path_factory.mktemp("adherence")
    synth = make_synthetic_dataset(SynthConfig(out=str(root / "iu"), reports=160, image_size=128, broken_images=0),
                                   progress=False)
    prepare(PrepareConfig(data_dir=str(synth), out=str(root / "data"), test_fraction=0.5), tokenizer=tokenizer,
            progress=False)
    pairs_csv = root / "data" / "pairs.csv"
    ds = ChestXrayDataset(load_pairs(pairs_csv, "test"), synth, 128)
    images = [ds.load_image(i) for i in range(len(ds))]
    return synth, pairs_csv, images, ds.pairs["prompt"].tolist()


def test_report_terms_map_to_the_classifiers_findings():
    reports = pd.DataFrame({"uid": [1, 2, 3, 4],
                            "MeSH": ["Cardiomegaly/mild;Opacity/lung/base/left", "normal",
                                     "Calcified Granuloma/lung/upper lobe/right", "Hernia, Hiatal"],
                            "Problems": ["Cardiomegaly;Opacity", "normal", "Calcified Granuloma", "Hernia, Hiatal"]})
    labels = report_labelling.report_labels(reports)
    assert set(labels.columns) == set(report_labelling.REPORT_TERM_TO_FINDING.values())
    assert labels.loc[1][labels.loc[1]].index.tolist() == ["Cardiomegaly", "Lung Opacity"]
    assert not labels.loc[2].any() and labels.loc[3, "Nodule"] and labels.loc[4, "Hernia"]
    assert not report_labelling.report_labels(pd.DataFrame({"uid": [1]})).any().any()  # no MeSH / Problems: no labels
    # An impression shared by several reports is positive when most of them carry the finding.
    pairs = pd.DataFrame({"uid": [1, 1, 2, 3, 4], "prompt": ["A", "A", "B", "B", "C"]})
    by_prompt = report_labelling.prompt_labels(pairs, labels)
    assert by_prompt.loc["A", "Cardiomegaly"] and by_prompt.loc["B", "Nodule"] and not by_prompt.loc["C", "Nodule"]


def test_auroc_equals_torchmetrics_and_delong_interval_brackets_it():
    from torchmetrics.functional.classification import binary_auroc

    rng = np.random.default_rng(0)
    labels = rng.random(120) < 0.3
    scores = rng.normal(size=120) + 1.0 * labels
    scores[:10] = np.round(scores[:10])  # ties: midranks
    auc, low, high = adh.auroc_with_interval(scores, labels)
    assert auc == pytest.approx(float(binary_auroc(torch.tensor(scores), torch.tensor(labels.astype(int)))), abs=1e-6)
    assert low < auc < high and 0.1 < high - low < 0.4
    assert adh.auroc_with_interval([0.1, 0.2, 0.8, 0.9], [False, False, True, True])[0] == 1.0


def test_geometry_oracle_sees_cardiomegaly_on_real_films_and_nothing_in_noise(larger, tmp_path):
    synth, pairs_csv, images, prompts = larger
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 256, (128, 128), dtype=np.uint8)) for _ in images]
    copies = write_set(tmp_path / "copies", images, prompts)
    noisy = write_set(tmp_path / "noise", noise, prompts)
    cfg = stage_config(EvalConfig, pairs=str(pairs_csv), data_dir=str(synth), out=str(tmp_path / "eval"),
                       generated=(f"copies={copies}", f"noise={noisy}"), feature_net="standin",
                       metrics=("adherence",), adherence_scorer="geometry", real_floor=False)
    result = ev.evaluate(cfg, progress=False)
    table = result.adherence[result.adherence["prompts"] == "all"].set_index(["set", "finding"])
    real = table.loc[(image_sets.REAL_TEST_SET, "Cardiomegaly")]
    assert real["positives"] >= 10 and real["negatives"] >= 10 and real["images"] + real["uncertain"] == len(images)
    assert (result.adherence["labels"] == adh.LABEL_DEFINITIONS["impression"]).all()
    assert {"all", "unseen"} <= set(result.adherence["prompts"])  # seen/unseen: test_seen_and_unseen_prompts_apart
    assert real["auroc"] > 0.85 and real["ci_low"] > 0.7
    effusion = table.loc[(image_sets.REAL_TEST_SET, "Effusion")]
    assert effusion["positives"] >= 5 and effusion["auroc"] > 0.85
    # Copies of the real films under their own prompts: the same as the real films.
    assert table.loc[("copies", "Cardiomegaly"), "auroc"] == pytest.approx(real["auroc"])
    # Noise shows nothing: about chance, and its interval contains 0.5.
    noise_row = table.loc[("noise", "Cardiomegaly")]
    assert 0.3 < noise_row["auroc"] < 0.7 and noise_row["ci_low"] < 0.5 < noise_row["ci_high"]
    # The files: adherence.csv, rows in metrics.csv with counts and intervals, the bar chart.
    saved = pd.read_csv(tmp_path / "eval" / "adherence.csv")
    assert (set(saved["set"]) == {"copies", "noise", image_sets.REAL_TEST_SET}
            and (saved["scorer"] == GeometryOracle.name).all())
    metrics = pd.read_csv(tmp_path / "eval" / "metrics.csv").set_index(["set", "metric"])
    assert metrics.loc[("noise", "auroc_cardiomegaly"), "value"] == pytest.approx(noise_row["auroc"])
    assert metrics.loc[("noise", "auroc_cardiomegaly"), "n_generated"] == len(images)
    assert (tmp_path / "eval" / "figures" / "adherence.png").stat().st_size > 1000
    assert "Cardiomegaly" in ev.adherence_table(result.adherence).index.get_level_values("finding")


def test_seen_and_unseen_prompts_apart():
    """Rows over all images, then over the images of prompts seen word for word in training and
    of the others: their counts add up, and each AUROC is its own subset's."""
    rng = np.random.default_rng(0)
    truth = pd.DataFrame({"Cardiomegaly": rng.random(200) < 0.3})
    seen = rng.random(200) < 0.4
    # Seen prompts' images follow their label (recall), unseen ones do not (chance).
    scores = pd.DataFrame({"Cardiomegaly": rng.normal(size=200) + 3.0 * (truth["Cardiomegaly"] & seen)})
    parts, _ = adh.by_prompt_group("tuned", scores, truth, seen, "oracle", 5, "impression")
    table = pd.concat(parts).set_index("prompts")
    assert list(table.index) == ["all", "seen", "unseen"]
    assert table.loc["seen", "positives"] + table.loc["unseen", "positives"] == table.loc["all", "positives"]
    assert table.loc["seen", "images"] + table.loc["unseen", "images"] == 200
    assert table.loc["seen", "auroc"] > 0.9 and abs(table.loc["unseen", "auroc"] - 0.5) < 0.15
    assert table.loc["seen", "auroc"] > table.loc["all", "auroc"] > table.loc["unseen", "auroc"]
    # Uncertain labels leave their images out of that finding only.
    truth_unsure = truth.astype("boolean")
    truth_unsure.loc[:9, "Cardiomegaly"] = pd.NA
    row = adh.adherence("tuned", scores, truth_unsure, "oracle", 5)[0].iloc[0]
    assert row["images"] == 190 and row["uncertain"] == 10


def test_adherence_skips_with_notes_naming_the_counts(larger, tmp_path):
    synth, pairs_csv, images, prompts = larger
    few = write_set(tmp_path / "few", images[:6], prompts[:6])
    unknown = write_set(tmp_path / "unknown", images[:4], ["a prompt from no report"] * 4)
    cfg = stage_config(EvalConfig, pairs=str(pairs_csv), data_dir=str(synth), out=str(tmp_path / "eval"),
                       generated=(f"few={few}", f"unknown={unknown}"), feature_net="standin",
                       metrics=("adherence",), adherence_scorer="geometry", real_floor=False,
                       adherence_min_cases=len(images), adherence_labels="mesh")
    result = ev.evaluate(cfg, progress=False)
    notes = " ".join(result.notes)
    # MeSH labels come from reports: a prompt that is no report's impression has none.
    assert "adherence skipped for unknown: none of its 1 prompt(s)" in notes
    labels = report_labelling.prompt_labels(load_pairs(pairs_csv),
                                            report_labelling.report_labels(pd.read_csv(synth / "indiana_reports.csv")))
    positives = int(labels.loc[prompts, "Cardiomegaly"].sum())
    assert (f"adherence: {image_sets.REAL_TEST_SET} (all prompts): skipped for fewer than {len(images)} positive or "
            f"negative images (positives+/negatives-): Cardiomegaly {positives}+/{len(images) - positives}-") in notes
    assert len(result.adherence) == 0 and "adherence" not in result.figures
    # Impression labels come from the prompt's words: a prompt naming nothing is negative for all.
    result = ev.evaluate(stage_config(EvalConfig, **{**cfg.__dict__, "out": str(tmp_path / "e-impression"),
                                                     "adherence_labels": "impression"}), progress=False)
    assert "adherence skipped for unknown" not in " ".join(result.notes)
    truth = finding_truth(prompts)["Cardiomegaly"]
    assert (f"adherence: {image_sets.REAL_TEST_SET} (all prompts): skipped for fewer than {len(images)} positive or "
            f"negative images (positives+/negatives-): Cardiomegaly {int(truth.sum())}+/{int((~truth).sum())}-"
            in " ".join(result.notes))
    with pytest.raises(CxrError, match="--adherence-scorer 'oracle' is not known"):
        ev.evaluate(stage_config(EvalConfig, pairs=str(pairs_csv), data_dir=str(synth), out=str(tmp_path / "e2"),
                                 generated=(str(few),), metrics=("adherence",), adherence_scorer="oracle"),
                    progress=False)

def test_xrv_classifier_scores_its_findings(tmp_path):
    import torchxrayvision as xrv
    from safetensors.torch import save_file

    torch.manual_seed(0)
    path = tmp_path / "densenet-random.safetensors"
    save_file(xrv.models.DenseNet(weights=None, op_threshs=None).state_dict(), str(path))
    scorer = adh.XRVClassifier(str(path))
    scores = scorer.score(torch.randint(0, 256, (3, 3, 128, 128), dtype=torch.uint8), batch_size=2)
    assert scores.shape == (3, len(scorer.findings)) and scores.notna().all().all()
    # The default weights never saw this collection, and score only what they were trained on
    # (MIMIC-CXR's CheXpert labels: no Nodule, Mass, Emphysema, ... outputs).
    assert scorer.features.model == "densenet121-res224-mimic_ch" and "OpenI" not in scorer.name
    assert {"Cardiomegaly", "Effusion", "Atelectasis", "Lung Opacity"} <= set(scorer.findings)
    assert not {"Nodule", "Mass", "Emphysema", "Hernia"} & set(scorer.findings)
    # The weights that include OpenI score every mapped finding, and say what they saw.
    every = adh.XRVClassifier(str(path), model="densenet121-res224-all")
    assert set(every.findings) >= set(report_labelling.REPORT_TERM_TO_FINDING.values())
    assert "INCLUDES OpenI" in every.name
