import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxr_helpers.data import labels, tables
from cxr_helpers.data import stage as prepare_stage
from cxr_helpers.data import image_cache
from cxr_helpers.config.stages import PrepareConfig
from cxr_helpers.data.stage import prepare
from cxr_helpers.data.dataset import ChestXrayDataset
from cxr_helpers.core.errors import CxrError
from cxr_helpers.data.image_cache import resize_xray
from cxr_helpers.data.prompts import clean_prompt, collapse_whitespace
from cxr_helpers.config.stages import EvalConfig, TrainConfig, stage_config


def make_dataset(root, impressions, views=("Frontal", "Lateral"), size=(200, 240)):
    """A hand-made dataset in the Kaggle layout: one report per impression."""
    images = root / "images" / "images_normalized"
    images.mkdir(parents=True, exist_ok=True)
    reports, projections = [], []
    rng = np.random.default_rng(0)
    for uid, text in enumerate(impressions, 1):
        reports.append({"uid": uid, "MeSH": "normal", "Problems": "normal", "image": "x", "indication": "",
                        "comparison": "", "findings": "", "impression": text})
        for k, view in enumerate(views):
            name = f"{uid}_IM-{uid:04d}-{4001 - 1000 * k}.dcm.png"
            Image.fromarray(rng.integers(0, 255, size[::-1], dtype=np.uint8), "L").save(images / name)
            projections.append({"uid": uid, "filename": name, "projection": view})
    pd.DataFrame(reports).to_csv(root / "indiana_reports.csv", index=False)
    pd.DataFrame(projections).to_csv(root / "indiana_projections.csv", index=False)
    return root


def run(root, out, tokenizer, **kw):
    return prepare(PrepareConfig(data_dir=str(root), out=str(out), **kw), tokenizer=tokenizer, progress=False)


def test_prompt_is_the_impression_with_whitespace_collapsed():
    assert (collapse_whitespace("  No acute\n\tcardiopulmonary   abnormality. ")
            == "No acute cardiopulmonary abnormality.")


def test_the_77_id_rule_counts_start_and_end_tokens(tmp_path, tokenizer):
    exactly_77 = " ".join(["lung"] * 75)  # 75 words of one id each + start + end = 77
    over = " ".join(["lung"] * 76)
    assert len(tokenizer(exactly_77).input_ids) == 77 and len(tokenizer(over).input_ids) == 78
    root = make_dataset(tmp_path / "d", [exactly_77, over, "", "   ", "Cardiomegaly."])
    result = run(root, tmp_path / "out", tokenizer, test_fraction=0.5)  # two uids kept: one per side
    kept = set(result.pairs["uid"])
    assert kept == {1, 5}
    reasons = result.excluded.groupby("uid")["reason"].first().to_dict()
    assert reasons == {2: "too_long", 3: "empty_impression", 4: "empty_impression"}
    assert result.pairs.loc[result.pairs["uid"] == 1, "n_tokens"].iloc[0] == 77
    assert (result.pairs["prompt"] == result.pairs["prompt"].map(collapse_whitespace)).all()


def test_broken_images_are_excluded_not_fatal(tmp_path, tokenizer):
    root = make_dataset(tmp_path / "d", ["Normal chest."] * 5)
    folder = root / "images" / "images_normalized"
    (folder / "1_IM-0001-4001.dcm.png").unlink()  # missing
    good = (folder / "2_IM-0002-4001.dcm.png").read_bytes()
    (folder / "2_IM-0002-4001.dcm.png").write_bytes(good[: len(good) // 2])  # truncated
    (folder / "3_IM-0003-4001.dcm.png").write_text("<html>not an image</html>")  # not a PNG
    (folder / "4_IM-0004-4001.dcm.png").write_bytes(b"")  # empty file
    result = run(root, tmp_path / "out", tokenizer)
    reasons = dict(zip(result.excluded["filename"], result.excluded["reason"], strict=True))
    assert reasons == {"1_IM-0001-4001.dcm.png": "missing_image", "2_IM-0002-4001.dcm.png": "unreadable_image",
                       "3_IM-0003-4001.dcm.png": "unreadable_image", "4_IM-0004-4001.dcm.png": "unreadable_image"}
    assert result.summary["excluded_by_reason"]["unreadable_image"] == 3
    assert result.summary["excluded_by_reason"]["missing_image"] == 1
    written = pd.read_csv(tmp_path / "out" / "excluded.csv")
    assert list(written.columns)[:4] == ["uid", "filename", "projection", "reason"]


def test_every_listed_image_is_accounted_for(synth_dir, tmp_path, tokenizer):
    result = run(synth_dir, tmp_path / "out", tokenizer)
    listed = pd.read_csv(synth_dir / "indiana_projections.csv")
    files = pd.concat([result.pairs["filename"], result.excluded["filename"]])
    assert sorted(files) == sorted(listed["filename"]) and files.is_unique
    s = result.summary
    assert s["pairs"] + s["excluded"] == s["images_listed"] == len(listed)
    assert sum(s["excluded_by_reason"].values()) == s["excluded"]
    assert s["excluded_by_reason"]["missing_image"] == 1 and s["excluded_by_reason"]["unreadable_image"] >= 1
    assert s["distinct_prompts"] == result.pairs["prompt"].nunique()
    for name in ("pairs.csv", "excluded.csv", "summary.json", "prepare_config.json"):
        assert (tmp_path / "out" / name).is_file()
    on_disk = pd.read_csv(tmp_path / "out" / "pairs.csv")
    assert {"uid", "filename", "projection", "prompt", "split"} <= set(on_disk.columns)


def test_patient_split_keeps_each_uid_on_one_side(synth_dir, tmp_path, tokenizer):
    result = run(synth_dir, tmp_path / "p", tokenizer, split="patient", test_fraction=0.25, seed=3)
    pairs = result.pairs
    assert prepare_stage.patients_on_both_sides(pairs) == 0 and result.summary["patients_on_both_sides"] == 0
    share = (pairs["split"] == "test").mean()
    biggest_group = pairs.groupby("uid").size().max()
    assert abs(share - 0.25) <= biggest_group / len(pairs)
    again = run(synth_dir, tmp_path / "p2", tokenizer, split="patient", test_fraction=0.25, seed=3)
    assert (again.pairs["split"] == pairs["split"]).all()
    other = run(synth_dir, tmp_path / "p3", tokenizer, split="patient", test_fraction=0.25, seed=4)
    assert not (other.pairs["split"] == pairs["split"]).all()


def test_image_split_is_the_seeds_and_shows_the_leak():
    pairs = pd.DataFrame({"uid": np.repeat(np.arange(100), 2), "prompt": "p"})
    split = prepare_stage.split_pairs(pairs, "image", 0.2, seed=0)
    assert (split == "test").sum() == int(0.2 * 200)
    pairs["split"] = split
    assert prepare_stage.patients_on_both_sides(pairs) > 0  # frontal and lateral of one report on both sides
    patient = prepare_stage.split_pairs(pairs, "patient", 0.2, seed=0)
    pairs["split"] = patient
    assert prepare_stage.patients_on_both_sides(pairs) == 0 and (patient == "test").sum() == 40


def test_projection_filter_and_limit(synth_dir, tmp_path, tokenizer):
    frontal = run(synth_dir, tmp_path / "f", tokenizer, projection="frontal")
    assert set(frontal.pairs["projection"]) == {"Frontal"}
    assert frontal.summary["excluded_by_reason"]["other_projection"] > 0
    limited = run(synth_dir, tmp_path / "l", tokenizer, limit=7)
    assert limited.summary["images_listed"] == 7


def test_clean_prompts_is_opt_in():
    raw = "1. Negative chest x-XXXX. 2. Stable XXXX sternotomy changes ."
    assert clean_prompt(raw) == "Negative chest x-ray. Stable sternotomy changes."
    assert clean_prompt("No acute disease. Comparison XXXX.") == "No acute disease. Comparison."
    assert PrepareConfig().clean_prompts is False


@pytest.mark.parametrize("breakage, message", [
    ("no_dir", "does not exist"),
    ("no_reports", "has no indiana_reports.csv; attach the Kaggle dataset"),
    ("no_column", "lacks the column\\(s\\) impression"),
    ("bad_uid", "non-integer uid 'abc'"),
])
def test_bad_data_dirs_get_one_sentence(tmp_path, tokenizer, breakage, message):
    root = make_dataset(tmp_path / "d", ["Normal."])
    if breakage == "no_dir":
        root = tmp_path / "nowhere"
    elif breakage == "no_reports":
        (root / "indiana_reports.csv").unlink()
    elif breakage == "no_column":
        (pd.read_csv(root / "indiana_reports.csv").drop(columns="impression")
         .to_csv(root / "indiana_reports.csv", index=False))
    elif breakage == "bad_uid":
        frame = pd.read_csv(root / "indiana_projections.csv", dtype=str)
        frame.loc[0, "uid"] = "abc"
        frame.to_csv(root / "indiana_projections.csv", index=False)
    with pytest.raises(CxrError, match=message):
        run(root, tmp_path / "out", tokenizer)
    assert not (tmp_path / "out" / "pairs.csv").exists()


def test_bad_settings_are_refused_before_any_work(tmp_path, tokenizer):
    root = make_dataset(tmp_path / "d", ["Normal."])
    for kw, message in [({"split": "random"}, "use patient or image"), ({"test_fraction": 1.5}, "less than 1"),
                        ({"projection": "oblique"}, "both, frontal or lateral"), ({"limit": 0}, "at least 1")]:
        with pytest.raises(CxrError, match=message):
            run(root, tmp_path / "out", tokenizer, **kw)


def test_dataset_serves_3_channel_tensors_in_range(synth_dir, tmp_path, tokenizer):
    run(synth_dir, tmp_path / "out", tokenizer)
    ds = ChestXrayDataset(tmp_path / "out" / "pairs.csv", synth_dir, resolution=128, split="train")
    item = ds[0]
    x = item["pixel_values"]
    assert x.shape == (3, 128, 128) and x.dtype.is_floating_point
    assert -1.0 <= float(x.min()) < float(x.max()) <= 1.0
    assert bool((x[0] == x[1]).all() and (x[1] == x[2]).all())
    assert item["prompt"] == ds.pairs.at[0, "prompt"] and len(ds) == (ds.pairs["split"] == "train").sum()
    assert (ChestXrayDataset(tmp_path / "out" / "pairs.csv", synth_dir, resolution=64)[0]["pixel_values"].shape
            == (3, 64, 64))


def test_each_full_size_png_is_decoded_once_across_runs(synth_dir, tmp_path, tokenizer, monkeypatch):
    run(synth_dir, tmp_path / "out", tokenizer)
    pairs = pd.read_csv(tmp_path / "out" / "pairs.csv").head(6)
    decoded = []
    real_decode = image_cache._decode_full_image
    monkeypatch.setattr(image_cache, "_decode_full_image", lambda path: decoded.append(path.name) or real_decode(path))
    first = ChestXrayDataset(pairs, synth_dir, cache_dir=tmp_path / "cache")
    assert first.warm_cache(progress=False) == 6 and len(decoded) == 6
    a = [first[i]["pixel_values"] for i in range(6)]
    second = ChestXrayDataset(pairs, synth_dir, cache_dir=tmp_path / "cache")  # a later run
    b = [second[i]["pixel_values"] for i in range(6)]
    assert len(decoded) == 6 and second.warm_cache(progress=False) == 0
    assert all(bool((x == y).all()) for x, y in zip(a, b, strict=True))
    # A changed source file is a new key: decoded again, not served stale.
    source = synth_dir / "images" / "images_normalized" / pairs.at[0, "filename"]
    Image.open(source).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(tmp_path / "flipped.png")
    source.write_bytes((tmp_path / "flipped.png").read_bytes())
    second[0]
    assert len(decoded) == 7


def test_resize_is_anti_aliased():
    stripes = np.zeros((1024, 1024), np.uint8)
    stripes[:, ::2] = 255  # 1-px stripes: pure aliasing bait
    small = np.asarray(resize_xray(Image.fromarray(stripes), 128), dtype=np.float32)
    naive = np.asarray(Image.fromarray(stripes).resize((128, 128), Image.Resampling.NEAREST), dtype=np.float32)
    def faithful(img):  # the stripes average to mid-gray; aliasing shows as stripes or a wrong level
        return img.std() < 3 and abs(img.mean() - 127.5) < 3
    assert faithful(small) and not faithful(naive)


def test_fits_and_odd_inputs():
    wide = Image.fromarray(np.full((100, 300), 200, np.uint8))
    padded = np.asarray(resize_xray(wide, 64, "pad"))
    assert padded.shape == (64, 64) and padded[0].max() == 0 and padded[32].min() > 150
    assert np.asarray(resize_xray(wide, 64, "crop")).min() > 150
    deep = Image.fromarray(np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16))
    assert np.asarray(resize_xray(deep, 32)).max() > 200  # 16-bit films are scaled, not clipped
    # The configs that feed the datasets declare the sizes and fits, and refuse others when built.
    with pytest.raises(CxrError, match="--resolution must be a positive multiple of 8 .*got 100"):
        stage_config(TrainConfig, resolution=100)
    with pytest.raises(CxrError, match="--fit 'square' is not known; use stretch, pad or crop"):
        stage_config(EvalConfig, fit="square")


def test_load_pairs_checks_its_input(tmp_path):
    with pytest.raises(CxrError, match="does not exist; run `python -m cxr_helpers prepare`"):
        tables.load_pairs(tmp_path / "pairs.csv")
    pd.DataFrame({"uid": [1], "file": ["a.png"]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(CxrError, match="lacks the column"):
        tables.load_pairs(tmp_path / "bad.csv")


def test_mesh_major_terms():
    reports = pd.DataFrame({"MeSH": ["normal", "Cardiomegaly/mild;Opacity/lung/base/left", "Cardiomegaly"]})
    counts = labels.mesh_major_terms(reports)
    assert counts["Cardiomegaly"] == 2 and counts["normal"] == 1 and counts["Opacity"] == 1


def test_filenames_outside_the_data_dir_are_excluded_never_read(tmp_path, tokenizer):
    root = make_dataset(tmp_path / "d", ["Normal chest."] * 3, views=("Frontal",))
    secret = tmp_path / "secret.png"
    Image.fromarray(np.zeros((64, 64), np.uint8), "L").save(secret)
    folder = root / "images" / "images_normalized"
    (folder / "loop.png").symlink_to(folder / "loop.png")  # a symlink loop
    projections = pd.read_csv(root / "indiana_projections.csv")
    extra = pd.DataFrame({"uid": [1, 2, 3], "projection": ["Frontal"] * 3,
                          "filename": ["../../../secret.png", str(secret), "loop.png"]})
    pd.concat([projections, extra]).to_csv(root / "indiana_projections.csv", index=False)
    result = run(root, tmp_path / "out", tokenizer)
    assert len(result.pairs) == 3 and not result.pairs["filename"].str.contains("secret").any()
    reasons = result.excluded.set_index("filename")["reason"].to_dict()
    assert reasons["../../../secret.png"] == reasons[str(secret)] == "outside_data_dir"
    assert reasons["loop.png"] in ("outside_data_dir", "unreadable_image")
    assert result.summary["excluded_by_reason"]["outside_data_dir"] >= 2
    # A pairs.csv edited afterwards to point outside is refused by the dataset, not read.
    edited = result.pairs.copy()
    edited.loc[0, "filename"] = "../../../secret.png"
    with pytest.raises(CxrError, match="lies outside"):
        ChestXrayDataset(edited, root, 32).load_image(0)


def test_a_decompression_bomb_header_is_an_unreadable_image(tmp_path, tokenizer):
    root = make_dataset(tmp_path / "d", ["Normal chest."] * 3, views=("Frontal",))
    bomb = root / "images" / "images_normalized" / "1_IM-0001-4001.dcm.png"
    # A valid PNG header claiming 30000 x 30000 px (900 M pixels): Pillow refuses to open it.
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10))
                     + chunk(b"IEND", b""))
    result = run(root, tmp_path / "out", tokenizer, test_fraction=0.5)
    assert result.excluded.set_index("uid")["reason"][1] == "unreadable_image"


def test_duplicates_are_reported_and_dropped_deterministically(tmp_path, tokenizer):
    root = make_dataset(tmp_path / "d", ["Normal chest.", "Cardiomegaly.", "Effusion."], views=("Frontal",))
    projections = pd.read_csv(root / "indiana_projections.csv")
    pd.concat([projections, projections.iloc[[0]]]).to_csv(root / "indiana_projections.csv", index=False)
    reports = pd.read_csv(root / "indiana_reports.csv", keep_default_na=False)
    second = reports.iloc[[1]].assign(impression="Large right pneumothorax.")
    pd.concat([reports, second]).to_csv(root / "indiana_reports.csv", index=False)
    result = run(root, tmp_path / "out", tokenizer, test_fraction=0.4)
    assert len(result.pairs) == 3 and result.pairs["filename"].is_unique
    assert result.excluded["reason"].tolist() == ["duplicate_row"]
    assert result.summary["excluded_by_reason"]["duplicate_row"] == 1
    assert result.summary["duplicate_report_rows"] == 1
    assert result.pairs.set_index("uid")["prompt"][2] == "Cardiomegaly."  # the first row of uid 2 wins
    again = run(root, tmp_path / "out2", tokenizer, test_fraction=0.4)
    pd.testing.assert_frame_equal(result.pairs, again.pairs)


def test_splits_that_leave_a_side_empty_and_unknown_labels_are_refused(tmp_path, tokenizer):
    root = make_dataset(tmp_path / "d", ["Normal chest."] * 4, views=("Frontal",))
    with pytest.raises(CxrError, match="leaves no train pairs; lower --test-fraction"):
        run(root, tmp_path / "out", tokenizer, test_fraction=0.99)
    assert not (tmp_path / "out" / "pairs.csv").exists()
    run(root, tmp_path / "out", tokenizer, test_fraction=0.5)
    pairs = pd.read_csv(tmp_path / "out" / "pairs.csv", dtype=str)
    pairs.loc[0, "split"] = "validation"
    pairs.to_csv(tmp_path / "out" / "pairs.csv", index=False)
    with pytest.raises(CxrError, match="split label\\(s\\) 'validation'; only train and test"):
        tables.load_pairs(tmp_path / "out" / "pairs.csv", "train")
    pairs.loc[0, ["split", "uid"]] = ["train", "1.5"]
    pairs.to_csv(tmp_path / "out" / "pairs.csv", index=False)
    with pytest.raises(CxrError, match="non-integer uid '1.5'"):
        tables.load_pairs(tmp_path / "out" / "pairs.csv")
    (tmp_path / "out" / "pairs.csv").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CxrError, match="not a readable CSV|lacks the column"):
        tables.load_pairs(tmp_path / "out" / "pairs.csv")
    (tmp_path / "out" / "pairs.csv").write_text("")
    with pytest.raises(CxrError, match="not a readable CSV"):
        tables.load_pairs(tmp_path / "out" / "pairs.csv")


def test_pairs_carry_the_impression_labels_and_their_agreement_with_mesh(synth_dir, tmp_path, tokenizer):
    from cxr_helpers.data.impression_labels import LABEL_COLUMNS, impression_label_table

    result = run(synth_dir, tmp_path / "out", tokenizer)
    on_disk = tables.load_pairs(tmp_path / "out" / "pairs.csv")
    assert set(LABEL_COLUMNS) <= set(on_disk.columns)
    expected = impression_label_table(on_disk["prompt"])
    for column in LABEL_COLUMNS:  # the labeller's own answer for each prompt, 1/0/-1 or empty
        assert pd.to_numeric(on_disk[column]).fillna(9).tolist() == expected[column].fillna(9).astype(int).tolist()
    agreement = result.summary["label_agreement_with_mesh"]
    # The demo's impressions are written from the same findings as its MeSH: they agree (the positive control) ...
    for finding in ("Cardiomegaly", "Effusion"):
        assert agreement[finding]["impression_present"] > 5 and agreement[finding]["cohen_kappa"] > 0.9
    # ... and MeSH shuffled across reports does not (the negative control).
    reports = pd.read_csv(synth_dir / "indiana_reports.csv")
    shuffled = reports.assign(MeSH=reports["MeSH"].sample(frac=1, random_state=0).to_numpy(),
                              Problems=reports["Problems"].sample(frac=1, random_state=0).to_numpy())
    assert labels.agreement_with_mesh(result.pairs, shuffled)["Cardiomegaly"]["cohen_kappa"] < 0.5  # few reports: noisy
