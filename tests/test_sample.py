import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

from cxr_helpers.sampling import stage as sample_mod
from cxr_helpers.sampling import synthesize as synthesize_mod
from cxr_helpers.config.stages import PrepareConfig, SampleConfig, stage_config
from cxr_helpers.data.stage import prepare
from cxr_helpers.core.errors import CxrError
from cxr_helpers.core.layout import METADATA_COLUMNS
from cxr_helpers.models.generation import load_sampling_pipeline
from cxr_helpers.sampling.stage import sample


@pytest.fixture(scope="module")
def pipe(tiny_model_dir, lora_dir):
    return load_sampling_pipeline(str(tiny_model_dir), lora_dir)


def cfg(tiny_model_dir, lora_dir, out, **kw):
    base = dict(model=str(tiny_model_dir), lora=str(lora_dir), out=str(out), steps=3, resolution=64,
                prompts=["Cardiomegaly.", "Small left pleural effusion.", "No acute disease."])
    base.update(kw)
    return stage_config(SampleConfig, **base)


def pixels(folder, name):
    return np.asarray(Image.open(folder / name), dtype=np.int16)


def test_same_seed_same_image_whatever_the_batch_size(pipe, tiny_model_dir, lora_dir, tmp_path):
    one = sample(cfg(tiny_model_dir, lora_dir, tmp_path / "b1", n_per_prompt=2, batch_size=1), pipe=pipe,
                 progress=False)
    many = sample(cfg(tiny_model_dir, lora_dir, tmp_path / "b4", n_per_prompt=2, batch_size=4), pipe=pipe,
                  progress=False)
    assert one.metadata["file"].tolist() == many.metadata["file"].tolist()
    for name in one.metadata["file"]:
        a, b = pixels(tmp_path / "b1", name), pixels(tmp_path / "b4", name)
        # batched matmuls may round differently in the last bit: at most 1 grey level apart
        assert np.abs(a - b).max() <= 1, name
    first, second = pixels(tmp_path / "b1", one.metadata["file"][0]), pixels(tmp_path / "b1", one.metadata["file"][1])
    assert np.abs(first - second).mean() > 1  # different k: different seed, different image


def test_resume_skips_what_is_there_and_metadata_is_complete(pipe, tiny_model_dir, lora_dir, tmp_path, monkeypatch):
    first = sample(cfg(tiny_model_dir, lora_dir, tmp_path, n_per_prompt=1, upscale=128), pipe=pipe, progress=False)
    assert (first.generated, first.skipped) == (3, 0)
    calls = []
    real = sample_mod.generate
    monkeypatch.setattr(sample_mod, "generate", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    again = sample(cfg(tiny_model_dir, lora_dir, tmp_path, n_per_prompt=2, upscale=128), pipe=pipe, progress=False)
    assert (again.generated, again.skipped) == (3, 3) and sum(calls) == 3
    meta = pd.read_csv(tmp_path / "metadata.csv", keep_default_na=False)
    assert list(meta.columns) == METADATA_COLUMNS and len(meta) == 6
    for col in ("file", "prompt", "seed", "steps", "scheduler", "guidance", "lora_scale", "model", "lora"):
        assert (meta[col].astype(str) != "").all(), col
    assert meta["seed"].is_unique and (meta["lora"] == str(lora_dir)).all()
    for row in meta.itertuples():
        assert Image.open(tmp_path / row.file).size == (64, 64)
        assert Image.open(tmp_path / row.upscaled_file).size == (128, 128)
    saved = json.loads((tmp_path / "sample_config.json").read_text())
    assert "safety checker off" in saved["note"]
    with pytest.raises(CxrError, match="holds sample output made with other steps"):
        sample(cfg(tiny_model_dir, lora_dir, tmp_path, steps=5, upscale=128), pipe=pipe, progress=False)


def written(folder):
    """A folder's files by name, but the lock file (which stays with the folder)."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != ".cxr.lock"}


def test_a_sample_folder_has_one_owner(pipe, tiny_model_dir, lora_dir, tmp_path):
    out = tmp_path / "s"
    sample(cfg(tiny_model_dir, lora_dir, out, prompts=["Cardiomegaly."]), pipe=pipe, progress=False)
    before = written(out)
    # Other prompts into the same folder: refused, nothing touched (no old image relabelled).
    with pytest.raises(CxrError, match="other prompts.*--overwrite"):
        sample(cfg(tiny_model_dir, lora_dir, out, prompts=["Large right pneumothorax."]), pipe=pipe, progress=False)
    assert written(out) == before
    # A more prompts-limited rerun of the same prompts continues.
    assert sample(cfg(tiny_model_dir, lora_dir, out, prompts=["Cardiomegaly."]), pipe=pipe, progress=False).skipped == 1
    # --overwrite: the old content is moved aside first, never mixed.
    result = sample(cfg(tiny_model_dir, lora_dir, out, prompts=["Large right pneumothorax."], overwrite=True),
                    pipe=pipe, progress=False)
    assert result.generated == 1 and result.metadata["prompt"].tolist() == ["Large right pneumothorax."]
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("s.replaced-")]
    assert len(aside) == 1 and written(aside[0]) == before
    assert sorted(p.name for p in out.glob("*.png")) == result.metadata["file"].tolist()
    # A folder of someone else's files (a foreign metadata.csv) is not written into.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "metadata.csv").write_text("file,prompt\nmine.png,x\n")
    with pytest.raises(CxrError, match="already holds files that no cxr-lora sample run made \\(metadata.csv\\)"):
        sample(cfg(tiny_model_dir, lora_dir, foreign), pipe=pipe, progress=False)
    assert [p.name for p in foreign.iterdir()] == ["metadata.csv"]


def test_synthesize_never_writes_into_a_dataset_it_did_not_make(pipe, tiny_model_dir, lora_dir, synth_dir, tmp_path):
    import shutil

    spec = synthesize_mod.write_spec(tmp_path / "spec.json", {"steps": 2, "resolution": 64,
                                                          "items": [{"prompt": "Cardiomegaly.", "count": 1}]})
    real = tmp_path / "real"
    shutil.copytree(synth_dir, real)
    (real / "cxr_owner.json").unlink()  # as the Kaggle dataset: nobody's output
    reports = (real / "indiana_reports.csv").read_bytes()
    with pytest.raises(CxrError, match="no cxr-lora synthesize run made"):
        synthesize_mod.synthesize(spec, real, model=str(tiny_model_dir), lora=str(lora_dir), pipe=pipe, progress=False)
    assert (real / "indiana_reports.csv").read_bytes() == reports
    out = synthesize_mod.synthesize(spec, tmp_path / "syn", model=str(tiny_model_dir), lora=str(lora_dir), pipe=pipe,
                                progress=False)
    other = synthesize_mod.write_spec(tmp_path / "other.json",
                                      {"steps": 2, "resolution": 64,
                                       "items": [{"prompt": "Large right pneumothorax.", "count": 1}]})
    with pytest.raises(CxrError, match="holds synthesize output made with other spec"):
        synthesize_mod.synthesize(other, out, model=str(tiny_model_dir), lora=str(lora_dir), pipe=pipe, progress=False)
    assert pd.read_csv(out / "indiana_reports.csv")["impression"].tolist() == ["Cardiomegaly."]


def test_lora_scale_zero_is_the_base_model(pipe, tiny_model_dir, lora_dir):
    from cxr_helpers.models.loading import load_pipeline

    base = load_pipeline(str(tiny_model_dir))
    a = sample_mod.generate(pipe, ["Cardiomegaly."], [7], 64, 3, lora_scale=0.0)[0]
    b = sample_mod.generate(base, ["Cardiomegaly."], [7], 64, 3)[0]
    c = sample_mod.generate(pipe, ["Cardiomegaly."], [7], 64, 3, lora_scale=1.0)[0]
    assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 1
    assert np.abs(np.asarray(c, np.int16) - np.asarray(b, np.int16)).mean() > 0.5


@pytest.mark.parametrize("scheduler", ["ddim", "pndm", "euler"])
def test_each_scheduler_runs(pipe, scheduler):
    assert sample_mod.generate(pipe, ["Cardiomegaly."], [0], 64, 3, scheduler=scheduler)[0].size == (64, 64)


def test_long_prompts_warn_or_are_refused(pipe, tiny_model_dir, lora_dir, tmp_path, caplog):
    long = " ".join(["lung"] * 90)  # one id per word: 92 with start and end
    result = sample(cfg(tiny_model_dir, lora_dir, tmp_path / "w", prompts=[long]), pipe=pipe, progress=False)
    assert "over 77 CLIP tokens are truncated" in caplog.text
    assert bool(result.metadata["truncated"].iloc[0])
    with pytest.raises(CxrError, match="prompt 1 has 92 CLIP tokens.*--strict"):
        sample(cfg(tiny_model_dir, lora_dir, tmp_path / "s", prompts=[long], strict=True), pipe=pipe, progress=False)


def test_prompts_from_the_test_split(pipe, tiny_model_dir, lora_dir, pairs_csv, tmp_path):
    result = sample(cfg(tiny_model_dir, lora_dir, tmp_path, prompts=[], pairs=str(pairs_csv), limit=3), pipe=pipe,
                    progress=False)
    test = pd.read_csv(pairs_csv).query("split == 'test'")["prompt"].tolist()[:3]
    assert result.metadata["prompt"].tolist() == test


def test_galleries_show_a_report_per_finding_first(pairs_csv, synth_dir):
    # A short gallery (validation grids, notebook 02's base-vs-LoRA grid, real films) leads with a
    # report naming each finding the demo draws and a normal one, so that the fine-tune shows.
    from cxr_helpers.data.labels import report_labels
    from cxr_helpers.data.tables import read_tables
    from cxr_helpers.data.labels import GALLERY_FINDINGS, findings_first
    from cxr_helpers.training.validation import default_validation_prompts

    pairs = pd.read_csv(pairs_csv)
    labels = report_labels(read_tables(synth_dir)[0])
    ordered = findings_first(pairs, synth_dir)
    assert sorted(ordered.index) == sorted(pairs.index)  # reordered, nothing lost or added
    lead = labels.loc[ordered["uid"].head(len(GALLERY_FINDINGS) + 1)]
    for i, finding in enumerate(GALLERY_FINDINGS):
        assert lead.iloc[i][finding]
    assert not lead.iloc[-1].any()  # then a normal report
    assert findings_first(pairs, None).equals(pairs)  # no reports to read: the order is kept
    prompts = default_validation_prompts(pairs, 3, data_dir=synth_dir)
    test = pairs[pairs["split"] == "test"].drop_duplicates("prompt").set_index("prompt")
    having = [f for f in GALLERY_FINDINGS if labels.loc[test["uid"], f].any()]
    assert having and labels.loc[test.loc[prompts[0], "uid"], having[0]]  # the test split's first finding leads
    assert len(set(prompts)) == 3 and default_validation_prompts(pairs, 3)[0] in set(test.index)


def test_bad_input_is_one_sentence(tiny_model_dir, lora_dir, tmp_path):
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "not_lora").mkdir()
    cases = [
        (dict(prompts_file=str(tmp_path / "empty.txt"), prompts=[]), "holds no prompts"),
        (dict(prompts_file=str(tmp_path / "none.txt"), prompts=[]), "does not exist"),
        (dict(resolution=100), "multiple of 8"),
        (dict(n_per_prompt=0), "--n-per-prompt must be at least 1"),
        (dict(scheduler="heun"), "is not known"),
        (dict(lora=str(tmp_path / "missing")), "does not exist; pass the lora/ folder"),
        (dict(lora=str(tmp_path / "not_lora")), "is not a LoRA folder"),
    ]
    for change, message in cases:
        with pytest.raises(CxrError, match=message):
            sample(cfg(tiny_model_dir, lora_dir, tmp_path / "out", **change), progress=False)


def test_a_lora_for_another_base_is_explained(tiny_model_dir, lora_dir, tmp_path):
    weights = load_file(str(lora_dir / "pytorch_lora_weights.safetensors"))
    # The shapes a LoRA of a wider model would have (e.g. SD2's 1024-wide text states).
    other = {k: (v.repeat(1, 2) if v.shape[-1] == 32 and "attn2.to_k" in k and "down" in k else v)
             for k, v in weights.items()}
    (tmp_path / "other").mkdir()
    save_file(other, str(tmp_path / "other" / "pytorch_lora_weights.safetensors"))
    (tmp_path / "other" / "config.json").write_text(json.dumps({"base_model": "stabilityai/stable-diffusion-2-1"}))
    with pytest.raises(CxrError, match="does not fit the model .*trained on stabilityai/stable-diffusion-2-1"
                                       ".*size mismatch"):
        load_sampling_pipeline(str(tiny_model_dir), tmp_path / "other")


def test_a_lora_that_fails_to_load_says_why_not_that_it_does_not_fit(tiny_model_dir, tmp_path):
    # A damaged file: the shapes are not the problem, so the library's own reason is reported.
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "pytorch_lora_weights.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"{broken}")
    with pytest.raises(CxrError, match=r"the LoRA file .* is damaged \(\w+Error: .*train again") as info:
        load_sampling_pipeline(str(tiny_model_dir), tmp_path / "damaged")
    assert "does not fit" not in str(info.value)


def test_export_reads_back_through_prepare(pipe, tiny_model_dir, lora_dir, tokenizer, tmp_path):
    spec = synthesize_mod.example_spec(2, steps=2, resolution=64)
    spec_path = synthesize_mod.write_spec(tmp_path / "spec.json", spec)
    out = synthesize_mod.synthesize(spec_path, tmp_path / "export", model=str(tiny_model_dir), lora=str(lora_dir),
                                    pipe=pipe, progress=False)
    result = prepare(PrepareConfig(data_dir=str(out), out=str(tmp_path / "prepared")), tokenizer=tokenizer,
                     progress=False)
    total = sum(item["count"] for item in spec["items"])
    assert result.summary["images_listed"] == result.summary["pairs"] == total
    reports = pd.read_csv(out / "indiana_reports.csv")
    assert reports["image"].str.startswith("SYNTHETIC").all() and (reports["uid"] >= 100000).all()
    assert set(reports["MeSH"]) == {"Pleural Effusion", "Cardiomegaly", "Opacity"}
    assert json.loads((out / "synthetic_manifest.json").read_text())["synthetic"] is True
    with pytest.raises(CxrError, match="needs a positive integer"):
        synthesize_mod.write_spec(tmp_path / "bad.json", {"items": [{"prompt": "x", "count": 0}]})


@pytest.mark.parametrize("spec, message", [
    ({"items": [{"label": "E", "templates": "Small effusion.", "count": 2}]}, '"templates" must be a list'),
    ({"items": [{"prompt": "x", "count": 1}], "stpes": 4}, "unknown key\\(s\\) stpes; known: items"),
    ({"items": [{"prompt": "x", "count": 1, "weight": 2}]}, "item 1 has unknown key\\(s\\) weight; known: prompt"),
    ({"items": [{"prompt": "x", "count": 1}], "lora_scale": "nan"}, '"lora_scale" must be a number'),
    ({"items": [{"prompt": "x", "count": 1}], "steps": 0}, '"steps" must be at least 1'),
    ({"items": [{"prompt": "x", "templates": ["y"], "count": 1}]}, "one of the two"),
    ({"items": {"prompt": "x"}}, 'no "items" list'),
    (["x"], "must be a JSON object"),
])
def test_a_spec_is_checked_against_its_schema_before_anything_is_written(tmp_path, spec, message):
    with pytest.raises(CxrError, match=message):
        synthesize_mod.write_spec(tmp_path / "spec.json", spec)
    assert not (tmp_path / "spec.json").exists()
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(CxrError, match=message):
        synthesize_mod.synthesize(tmp_path / "spec.json", tmp_path / "out", model="unused", pipe=object(),
                                  progress=False)
    assert not (tmp_path / "out").exists()


def test_a_rerun_never_writes_through_a_link_inside_its_folder(pipe, tiny_model_dir, lora_dir, tmp_path):
    """A linked upscaled/ (or any link in the folder) is refused before anything is written, and
    the place it points to stays as it was; the control: the same rerun without the link works."""
    out = tmp_path / "s"
    sample(cfg(tiny_model_dir, lora_dir, out, n_per_prompt=1, upscale=128), pipe=pipe, progress=False)
    elsewhere = tmp_path / "elsewhere"
    (out / "upscaled").rename(elsewhere)
    (out / "upscaled").symlink_to(elsewhere, target_is_directory=True)
    for png in elsewhere.glob("*.png"):
        png.unlink()
    with pytest.raises(CxrError, match=r"upscaled is a symbolic link .*writes only inside .*remove the link"):
        sample(cfg(tiny_model_dir, lora_dir, out, n_per_prompt=2, upscale=128), pipe=pipe, progress=False)
    assert list(elsewhere.iterdir()) == []  # nothing written where the link points
    (out / "upscaled").unlink()
    again = sample(cfg(tiny_model_dir, lora_dir, out, n_per_prompt=2, upscale=128), pipe=pipe, progress=False)
    assert again.generated == 6 and (out / "upscaled").is_dir()  # the copies are remade, so all six are
