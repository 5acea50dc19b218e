import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cxr_helpers.evaluation import stage as ev
from cxr_helpers.evaluation import features
from cxr_helpers.evaluation import embeddings, image_sets
from cxr_helpers.evaluation import memorisation
from cxr_helpers.evaluation import metrics
from cxr_helpers.config.stages import EvalConfig, SampleConfig, stage_config
from cxr_helpers.data.tables import load_pairs
from cxr_helpers.data.dataset import ChestXrayDataset
from cxr_helpers.core.errors import CxrError
from cxr_helpers.sampling.stage import sample
from conftest import write_set


def split_images(pairs_csv, data_dir, split):
    ds = ChestXrayDataset(load_pairs(pairs_csv, split), data_dir, 128)
    return [ds.load_image(i) for i in range(len(ds))], ds.pairs["prompt"].tolist()


@pytest.fixture(scope="module")
def generated(tmp_path_factory, tiny_model_dir, lora_dir, pairs_csv):
    out = tmp_path_factory.mktemp("gen")
    sample(stage_config(SampleConfig, model=str(tiny_model_dir), lora=str(lora_dir), out=str(out / "tuned"),
                        pairs=str(pairs_csv), n_per_prompt=2, steps=2, limit=6), progress=False)
    return out / "tuned"


def config(pairs_csv, synth_dir, out, generated, **kw):
    base = dict(pairs=str(pairs_csv), data_dir=str(synth_dir), out=str(out), generated=tuple(generated),
                feature_net="standin", interval_groups=10)
    base.update(kw)
    return stage_config(EvalConfig, **base)


def test_fid_matches_torchmetrics_on_the_same_features():
    g = torch.Generator().manual_seed(0)
    for n, m, d in [(40, 50, 64), (300, 260, 16)]:  # fewer and more samples than dimensions
        a = torch.randn(n, d, generator=g, dtype=torch.float64)
        b = torch.randn(m, d, generator=g, dtype=torch.float64) * 1.3 + 0.2
        ours, theirs = metrics.frechet_distance(a, b), metrics.torchmetrics_fid(a, b)
        assert abs(ours - theirs) <= 1e-6 * abs(theirs)


def test_fid_of_two_known_gaussians_matches_the_closed_form():
    g = torch.Generator().manual_seed(1)
    n = 40000
    a = torch.randn(n, 4, generator=g, dtype=torch.float64)  # N(0, I)
    b = torch.randn(n, 4, generator=g, dtype=torch.float64) * torch.tensor([2.0, 1, 1, 1], dtype=torch.float64)
    b[:, 0] += 1.0  # N((1,0,0,0), diag(4,1,1,1))
    # ||mu||^2 + tr(I + S - 2 S^1/2) = 1 + (1 + 4 - 4) = 2
    assert metrics.frechet_distance(a, b) == pytest.approx(2.0, abs=0.08)
    assert metrics.torchmetrics_fid(a, b) == pytest.approx(2.0, abs=0.08)


def _gaussian_pair(g, n, d, shift, scale):
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    return a, torch.randn(n, d, generator=g, dtype=torch.float64) * scale + shift


def test_fid_interval_covers_the_mean_fid_at_that_n_in_about_95_percent_of_draws():
    # Two known Gaussians: N(0, I) and N(0.4, 1.2^2 I) in 8-d, N = 80 per set. The mean FID of
    # fresh samples of that N is what the interval is for (FID-infinity handles N -> infinity).
    g = torch.Generator().manual_seed(0)
    n, d, shift, scale = 80, 8, 0.4, 1.2
    mean_fid = np.mean([metrics.frechet_distance(*_gaussian_pair(g, n, d, shift, scale)) for _ in range(600)])
    covered = []
    for i in range(200):
        a, b = _gaussian_pair(g, n, d, shift, scale)
        low, high = metrics.fid_interval(a, b, groups=10, seed=i)
        assert low <= metrics.frechet_distance(a, b) <= high
        covered.append(low <= mean_fid <= high)
    assert 0.90 <= np.mean(covered) <= 0.99


def test_fid_interval_of_two_samples_of_one_distribution_contains_the_estimate():
    # Fewer samples than dimensions, as with 2048-d Inception features and N < 2048: the old
    # bootstrap's interval lay wholly above the estimate here.
    g = torch.Generator().manual_seed(2)
    a, b = _gaussian_pair(g, 60, 96, 0.0, 1.0)
    estimate = metrics.frechet_distance(a, b)
    low, high = metrics.fid_interval(a, b, groups=10, seed=0)
    assert low < estimate < high and high - low < estimate
    # too few to cut
    assert metrics.fid_interval(a[:3], b[:3], groups=10) == (metrics.frechet_distance(a[:3], b[:3]),) * 2


def test_fid_infinity_removes_the_small_sample_bias():
    g = torch.Generator().manual_seed(3)
    n, d, shift, scale = 200, 16, 0.3, 1.2
    true_fid = d * shift ** 2 + d * (1 - scale) ** 2  # closed form for these two Gaussians: 2.08
    plain, infinite = [], []
    for i in range(20):
        a, b = _gaussian_pair(g, n, d, shift, scale)
        plain.append(metrics.frechet_distance(a, b))
        infinite.append(metrics.fid_infinity(a, b, seed=i))
    assert np.mean(plain) - true_fid > 0.8  # plain FID at N = 200 is ~1 above the truth here
    assert abs(np.mean(infinite) - true_fid) < 0.3


def test_one_shared_pass_equals_three_separate_torchmetrics_passes(pairs_csv, synth_dir):
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.inception import InceptionScore
    from torchmetrics.image.kid import KernelInceptionDistance

    net = features.StandInFeatures(0)
    real = torch.stack([torch.from_numpy(np.array(im)).expand(3, -1, -1)
                        for im in split_images(pairs_csv, synth_dir, "test")[0]])
    fake = torch.stack([torch.from_numpy(np.array(im)).expand(3, -1, -1)
                        for im in split_images(pairs_csv, synth_dir, "train")[0][:len(real)]])

    class Pool(torch.nn.Module):
        num_features = net.num_features
        def forward(self, x):
            return net(x)[0]

    class Logits(torch.nn.Module):
        def forward(self, x):
            return net(x)[1]

    fid = FrechetInceptionDistance(feature=Pool())
    kid = KernelInceptionDistance(feature=Pool(), subset_size=10)
    score = InceptionScore(feature=Logits(), splits=2)
    for metric in (fid, kid):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    score.update(fake)
    torch.manual_seed(0)
    kid_sep = kid.compute()
    torch.manual_seed(0)
    is_sep = score.compute()

    real_pool, _ = embeddings.embed(net, real, progress=False)
    fake_pool, fake_logits = embeddings.embed(net, fake, progress=False)
    assert metrics.torchmetrics_fid(real_pool, fake_pool) == pytest.approx(float(fid.compute()), rel=1e-6)
    assert (metrics.torchmetrics_kid(real_pool, fake_pool, 10, 0)
            == pytest.approx(tuple(float(v) for v in kid_sep), rel=1e-6))
    assert metrics.torchmetrics_is(fake_logits, 2, 0) == pytest.approx(tuple(float(v) for v in is_sep), rel=1e-6)


def test_copies_of_the_real_test_images_score_zero_and_are_all_flagged(pairs_csv, synth_dir, tmp_path):
    images, prompts = split_images(pairs_csv, synth_dir, "test")
    copies = write_set(tmp_path / "copies", images, prompts)
    result = ev.evaluate(config(pairs_csv, synth_dir, tmp_path / "eval", [f"copies={copies}"], real_floor=False),
                         progress=False)
    value = result.table.set_index(["set", "metric"])["value"]
    assert abs(value["copies", "fid"]) < 1e-6
    # KID's unbiased estimator is not exactly 0 for identical sets (its cross term pairs each image
    # with itself); at this N it stays within a few 1e-3 (tiny-model noise images score ~3e-2).
    assert abs(value["copies", "kid"]) < 5e-3
    assert value["copies", "precision"] == value["copies", "recall"] == value["copies", "coverage"] == 1.0
    # Copies of test films match test films, which the model never saw: not memorisation.
    assert bool(result.audit["flagged_test"].all()) and (result.audit["test_pixel_correlation"] > 0.999).all()
    # Against the training films the copies are exactly the baseline's real test films: none lies
    # above the baseline (fewer than 1,000 films: its 99.9th percentile is their maximum).
    assert not result.audit["flagged_train"].any()
    assert value["copies", "audit_test_matches"] == len(images) and value["copies", "audit_train_matches"] == 0


def test_a_planted_training_image_is_flagged(pairs_csv, synth_dir, generated, tmp_path):
    meta = pd.read_csv(generated / "metadata.csv", keep_default_na=False)
    images = [Image.open(generated / f) for f in meta["file"]]
    train_images, train_prompts = split_images(pairs_csv, synth_dir, "train")
    planted = write_set(tmp_path / "planted", images + [train_images[3]], meta["prompt"].tolist() + [train_prompts[3]])
    result = ev.evaluate(config(pairs_csv, synth_dir, tmp_path / "eval", [f"gen={planted}"], metrics=("fid", "audit")),
                         progress=False)
    planted_file = f"{len(images):05d}_00_seed{len(images)}.png"
    assert result.audit.loc[result.audit["flagged_train"], "generated_file"].tolist() == [planted_file]
    assert not result.audit["flagged_test"].any()
    # The baseline: real test films of other patients come less close to a training film than the copy.
    baseline = json.loads((tmp_path / "eval" / "metrics.json").read_text())["audit_baseline"]
    value = result.table.set_index(["set", "metric"])["value"]
    assert (value[memorisation.AUDIT_BASELINE_SET, "audit_baseline_pixel_correlation"]
            == baseline["pixel_correlation"] < 0.999)
    assert baseline["pixel_threshold"] == max(0.95, baseline["pixel_correlation"]) and baseline["n_test"] > 0
    assert value["gen", "audit_train_matches"] == 1 and value["gen", "audit_test_matches"] == 0
    assert ((tmp_path / "eval" / "audit.csv").is_file()
            and (tmp_path / "eval" / "figures" / "nearest_pairs.png").is_file())


def test_outputs_name_n_the_network_and_the_baselines(pairs_csv, synth_dir, generated, tmp_path):
    result = ev.evaluate(config(pairs_csv, synth_dir, tmp_path / "eval", [f"fine-tuned={generated}"]), progress=False)
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    csv = pd.read_csv(tmp_path / "eval" / "metrics.csv")
    assert set(csv["set"]) == {"fine-tuned", "real train (floor)", memorisation.AUDIT_BASELINE_SET}
    assert {"fid", "fid_infinity", "kid", "is", "precision", "recall", "density", "coverage", "ms_ssim_within_prompt",
            "audit_train_matches", "audit_test_matches", "audit_baseline_pixel_correlation",
            "audit_baseline_feature_cosine"} <= set(csv["metric"])
    assert csv.loc[csv["metric"] == "fid", "feature_network"].str.startswith("STAND-IN").all()
    fid = csv[(csv["metric"] == "fid") & (csv["set"] == "fine-tuned")].iloc[0]
    assert fid["ci_low"] <= fid["value"] <= fid["ci_high"] and fid["n_real"] == fid["n_generated"] == saved["n_per_set"]
    # Counts are whole numbers in both files; blank / null where a metric has no real set.
    as_text = pd.read_csv(tmp_path / "eval" / "metrics.csv", dtype=str)
    assert as_text["n_real"].dropna().str.isdigit().all() and as_text["n_real"].isna().any()
    assert {row["n_real"] for row in saved["metrics"] if row["metric"] == "ms_ssim_within_prompt"} == {None}
    notes = " ".join(saved["notes"])
    assert "biased" in notes and "KID subset size lowered" in notes and "STAND-IN" in notes and "XRV" in notes
    # Subsets as large as the set are all the same set: no std, and a note that says why.
    assert "KID has no std" in notes and csv.loc[csv["metric"] == "kid", "std"].isna().all()
    assert saved["versions"]["torchmetrics"]
    diversity = pd.read_csv(tmp_path / "eval" / "diversity.csv")
    distinct = pd.read_csv(generated / "metadata.csv")["prompt"].nunique()  # grouped by prompt text
    assert len(diversity) == distinct and diversity["ms_ssim"].between(-1, 1).all()
    for name in ("metrics.png", "diversity.png", "nearest_pairs.png"):
        assert (tmp_path / "eval" / "figures" / name).is_file()
    table = ev.results_table(result.table)
    assert list(table.index)[:2] == ["fine-tuned", "real train (floor)"] and "[" in table.loc["fine-tuned", "FID ↓"]
    assert list(table.columns[:4]) == ["FID ↓", "FID∞ ↓", "KID ↓", "Inception Score ↑"] and table.columns[-1] == "N"
    assert not table.isna().any().any() and table.loc["real train (floor)", "within-prompt MS-SSIM ↓"] == "–"


def test_real_features_are_cached(pairs_csv, synth_dir, generated, tmp_path, monkeypatch):
    cfg = config(pairs_csv, synth_dir, tmp_path / "eval", [f"gen={generated}"], metrics=("fid",),
                 cache_dir=str(tmp_path / "cache"))
    first = ev.evaluate(cfg, progress=False)
    assert first.cache_hits == []
    embedded = []
    real_embed = embeddings.embed
    monkeypatch.setattr(embeddings, "embed",
                        lambda net, images, *a, **k: embedded.append(len(images)) or real_embed(net, images, *a, **k))
    second = ev.evaluate(cfg, progress=False)
    assert len(second.cache_hits) == 2  # the test images and the floor's train images
    assert embedded == [first.table.iloc[0]["n_generated"]]  # only the generated set was embedded
    assert second.table["value"].tolist() == first.table["value"].tolist()


def test_bad_input(pairs_csv, synth_dir, generated, tmp_path):
    (tmp_path / "nometa").mkdir()
    one = write_set(tmp_path / "one", [Image.new("L", (128, 128))], ["x"])
    broken = write_set(tmp_path / "broken", [Image.new("L", (128, 128), 40 * i) for i in range(4)], ["x"] * 4)
    (broken / "00002_00_seed2.png").write_bytes(b"not a png")
    for generated_dirs, kw, message in [
        ([str(tmp_path / "nometa")], {}, "has no metadata.csv"),
        ([str(tmp_path / "nowhere")], {}, "does not exist"),
        ([str(one)], {}, "has 1 readable image\\(s\\); at least 2 are needed"),
        ([str(generated)], {"metrics": ("fid", "lpips")}, "--metrics lpips is not known"),
        ([str(generated)], {"n": 1}, "--n must be at least 2"),
        ([str(generated)], {"feature_net": "clip"}, "is not known"),
        ([], {}, "no generated images"),
    ]:
        with pytest.raises(CxrError, match=message):
            ev.evaluate(config(pairs_csv, synth_dir, tmp_path / "e", generated_dirs, **kw), progress=False)
    result = ev.evaluate(config(pairs_csv, synth_dir, tmp_path / "e", [str(broken)], metrics=("fid", "kid")),
                         progress=False)
    assert "broken: 1 unreadable image(s) skipped" in result.notes
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["unreadable"] == {"broken": 1}


def test_metrics_may_be_written_comma_separated(pairs_csv, synth_dir, generated, tmp_path):
    result = ev.evaluate(config(pairs_csv, synth_dir, tmp_path / "eval", [f"gen={generated}"], metrics=("fid,kid",),
                                real_floor=False), progress=False)
    assert set(result.table["metric"]) == {"fid", "fid_infinity", "kid"}
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["config"]["metrics"] == ["fid", "kid"]


def test_a_sample_folders_metadata_may_not_name_files_outside_it(pairs_csv, synth_dir, generated, tmp_path):
    import shutil

    folder = tmp_path / "gen"
    shutil.copytree(generated, folder)
    meta = pd.read_csv(folder / "metadata.csv")
    meta.loc[0, "file"] = "../../elsewhere.png"
    meta.to_csv(folder / "metadata.csv", index=False)
    with pytest.raises(CxrError, match="lies outside"):
        image_sets.generated_set("g", folder, 128)
    meta.drop(columns=["file"]).to_csv(folder / "metadata.csv", index=False)
    with pytest.raises(CxrError, match="lacks the column"):
        image_sets.generated_set("g", folder, 128)


def test_diversity_fits_the_demos_64_px_and_smaller():
    # MS-SSIM's coarsest of 5 scales would be 4 px at 64 px, under torchmetrics' 5 px padding:
    # fewer scales there, the same 5 at 128 px.
    from cxr_helpers.evaluation.image_sets import ImageSet
    from cxr_helpers.evaluation.metrics import diversity, ms_ssim_scales

    assert [ms_ssim_scales(s) for s in (32, 64, 128, 512)] == [3, 4, 5, 5]
    for size in (32, 64, 128):
        film = torch.linspace(0, 255, size * size).reshape(1, 1, size, size).expand(1, 3, -1, -1)
        squares = (torch.arange(size) // 4) % 2
        other = (squares[:, None] ^ squares[None, :]).float().mul(255).expand(1, 3, -1, -1)  # a checkerboard
        images = torch.cat([film, film, film, other]).to(torch.uint8)
        table = diversity(ImageSet("x", images, ["same", "same", "differ", "differ"], list("abcd"))).set_index("prompt")
        assert table.loc["same", "ms_ssim"] == pytest.approx(1.0, abs=1e-4)
        assert table.loc["differ", "ms_ssim"] < 0.9


def test_evaluate_never_writes_through_a_link_in_its_folder(pairs_csv, synth_dir, generated, tmp_path):
    out = tmp_path / "eval"
    (tmp_path / "elsewhere").mkdir()
    out.mkdir()
    (out / "figures").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(CxrError, match=r"figures is a symbolic link .*remove the link"):
        ev.evaluate(config(pairs_csv, synth_dir, out, [f"gen={generated}"], metrics=("fid",)), progress=False)
    assert list((tmp_path / "elsewhere").iterdir()) == [] and not (out / "metrics.csv").exists()
