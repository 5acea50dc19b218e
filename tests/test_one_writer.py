"""Every stage that writes a folder holds its lock and its owner record: a second run at the same
time is refused at once, a rerun with other settings is refused (or, --overwrite, the old content
moved aside), nothing of an earlier run is left beside a new one, and inputs count by content."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from cxr_helpers.config.stages import EvalConfig, PrepareConfig, SampleConfig, SynthConfig, stage_config
from cxr_helpers.core.errors import CxrError
from cxr_helpers.core.ownership import LOCK_FILE, folder_lock
from cxr_helpers.data.stage import prepare
from cxr_helpers.demo.synthetic_dataset import make_synthetic_dataset
from cxr_helpers.evaluation import stage as ev
from cxr_helpers.models.generation import load_sampling_pipeline
from cxr_helpers.sampling import synthesize as synthesize_mod
from cxr_helpers.sampling.stage import sample


@pytest.fixture(scope="module")
def pipe(tiny_model_dir, lora_dir):
    return load_sampling_pipeline(str(tiny_model_dir), lora_dir)


def written(folder):
    """Every file under `folder` by path, with its bytes, but the lock file (it stays with the folder)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != LOCK_FILE}


def sample_cfg(tiny_model_dir, lora_dir, out, **kw):
    return stage_config(SampleConfig, **{**dict(model=str(tiny_model_dir), lora=str(lora_dir), out=str(out), steps=2,
                                                resolution=64, prompts=["Cardiomegaly.", "No acute disease."]), **kw})


def eval_cfg(pairs_csv, synth_dir, out, generated, **kw):
    return stage_config(EvalConfig, **{**dict(pairs=str(pairs_csv), data_dir=str(synth_dir), out=str(out),
                                              generated=(f"tuned={generated}",), feature_net="standin",
                                              interval_groups=0, metrics=("fid", "audit")), **kw})


@pytest.fixture(scope="module")
def samples(tmp_path_factory, pipe, tiny_model_dir, lora_dir, pairs_csv):
    out = tmp_path_factory.mktemp("samples") / "tuned"
    sample(stage_config(SampleConfig, model=str(tiny_model_dir), lora=str(lora_dir), out=str(out), steps=2,
                        resolution=64, pairs=str(pairs_csv), limit=8), pipe=pipe, progress=False)
    return out


def stage_runs(tmp_path, pipe, tiny_model_dir, lora_dir, tokenizer, synth_dir, pairs_csv, samples):
    spec = synthesize_mod.write_spec(tmp_path / "spec.json", {"steps": 2, "resolution": 64,
                                                          "items": [{"prompt": "Cardiomegaly.", "count": 1}]})
    return {
        "prepare": lambda out: prepare(PrepareConfig(data_dir=str(synth_dir), out=str(out)), tokenizer=tokenizer,
                                       progress=False),
        "sample": lambda out: sample(sample_cfg(tiny_model_dir, lora_dir, out), pipe=pipe, progress=False),
        "synthesize": lambda out: synthesize_mod.synthesize(spec, out, model=str(tiny_model_dir), lora=str(lora_dir),
                                                            pipe=pipe, progress=False),
        "synth": lambda out: make_synthetic_dataset(SynthConfig(out=str(out), reports=4, image_size=64),
                                                    progress=False),
        "evaluate": lambda out: ev.evaluate(eval_cfg(pairs_csv, synth_dir, out, samples), progress=False),
    }


@pytest.mark.parametrize("stage", ["prepare", "sample", "synthesize", "synth", "evaluate"])
def test_a_second_run_into_a_folder_being_written_is_refused_at_once(stage, tmp_path, pipe, tiny_model_dir, lora_dir,
                                                                     tokenizer, synth_dir, pairs_csv, samples):
    run = stage_runs(tmp_path, pipe, tiny_model_dir, lora_dir, tokenizer, synth_dir, pairs_csv, samples)[stage]
    out = tmp_path / "out"
    run(out)  # a finished run: a rerun alone continues (the same owner)
    before = written(out)
    with folder_lock(out, "test"):  # as another process would hold it (flock: one holder per lock file)
        with pytest.raises(CxrError, match=f"another {stage} run is writing to .*wait for it to end or use another"):
            run(out)
    assert written(out) == before
    run(out)  # once the other run has ended, the folder is writable again
    assert written(out).keys() == before.keys()


def test_a_second_run_in_another_process_exits_2_with_one_sentence(tmp_path, synth_dir, tiny_model_dir):
    out = tmp_path / "data"
    holder = subprocess.Popen([sys.executable, "-c", "import sys\nfrom cxr_helpers.core.ownership import folder_lock\n"
                               f"with folder_lock({str(out)!r}, 'prepare run'):\n"
                               "    print('held', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        second = subprocess.run([sys.executable, "-m", "cxr_helpers", "prepare", "--data-dir", str(synth_dir),
                                 "--out", str(out), "--tokenizer", str(tiny_model_dir)],
                                capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    finally:
        holder.communicate("")
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert second.stderr.strip().splitlines()[-1] == (
        f"error: another prepare run is writing to {out} (pid {holder.pid}); wait for it to end or use another --out")
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]


def test_prepare_with_other_settings_is_refused_and_overwrite_moves_the_old_pairs_aside(tmp_path, synth_dir,
                                                                                       tokenizer):
    out = tmp_path / "data"
    prepare(PrepareConfig(data_dir=str(synth_dir), out=str(out), seed=0), tokenizer=tokenizer, progress=False)
    before = written(out)
    with pytest.raises(CxrError, match="holds prepare output made with other seed .*--overwrite"):
        prepare(PrepareConfig(data_dir=str(synth_dir), out=str(out), seed=1), tokenizer=tokenizer, progress=False)
    assert written(out) == before
    prepare(PrepareConfig(data_dir=str(synth_dir), out=str(out), seed=1, overwrite=True), tokenizer=tokenizer,
            progress=False)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("data.replaced-")]
    assert len(aside) == 1 and written(aside[0]) == before
    assert json.loads((out / "prepare_config.json").read_text())["config"]["seed"] == 1


def test_an_evaluation_with_other_settings_never_leaves_the_earlier_ones_files(tmp_path, pairs_csv, synth_dir,
                                                                              samples, monkeypatch):
    import shutil

    out = tmp_path / "eval"
    inside = out / "samples" / "tuned"  # as notebook 04 keeps its sets: inside the evaluation's folder
    shutil.copytree(samples, inside)
    ev.evaluate(eval_cfg(pairs_csv, synth_dir, out, inside), progress=False)
    assert (out / "audit.csv").is_file() and (out / "figures" / "nearest_pairs.png").is_file()
    before = written(out)
    # Other metrics: refused, every file as it was (no metrics.json overwritten, no copy lost).
    with pytest.raises(CxrError, match="holds evaluate output made with other metrics"):
        ev.evaluate(eval_cfg(pairs_csv, synth_dir, out, inside, metrics=("fid",)), progress=False)
    assert written(out) == before
    # A run that fails part-way leaves the earlier outputs whole: they are replaced only at the end.
    monkeypatch.setattr(ev, "draw_figures", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("killed")))
    with pytest.raises(RuntimeError, match="killed"):
        ev.evaluate(eval_cfg(pairs_csv, synth_dir, out, inside), progress=False)
    assert written(out) == before
    monkeypatch.undo()
    # --overwrite: the earlier run's files move aside, its inputs (samples/) stay; no audit.csv of
    # the earlier run is left beside metrics that did not audit.
    ev.evaluate(eval_cfg(pairs_csv, synth_dir, out, inside, metrics=("fid",), overwrite=True), progress=False)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("eval.replaced-")]
    assert len(aside) == 1 and (aside[0] / "audit.csv").is_file() and not (aside[0] / "samples").exists()
    assert not (out / "audit.csv").exists() and not (out / "figures" / "nearest_pairs.png").exists()
    assert {k: v for k, v in written(out).items() if k.startswith("samples/")} == \
        {k: v for k, v in before.items() if k.startswith("samples/")}
    assert set(pd.read_csv(out / "metrics.csv")["metric"]) == {"fid", "fid_infinity"}


def test_an_evaluation_whose_images_changed_is_not_taken_for_the_same_run(tmp_path, pairs_csv, synth_dir, samples):
    import shutil

    generated = tmp_path / "tuned"
    shutil.copytree(samples, generated)
    ev.evaluate(eval_cfg(pairs_csv, synth_dir, tmp_path / "eval", generated), progress=False)
    first = sorted(generated.glob("*.png"))[0]
    first.write_bytes(sorted(generated.glob("*.png"))[1].read_bytes())  # the same folder, other pixels
    with pytest.raises(CxrError, match="holds evaluate output made with other generated"):
        ev.evaluate(eval_cfg(pairs_csv, synth_dir, tmp_path / "eval", generated), progress=False)


def test_the_same_model_and_lora_by_another_path_are_the_same(tmp_path, pipe, tiny_model_dir, lora_dir, monkeypatch):
    import shutil

    out = tmp_path / "s"
    first = sample(sample_cfg(tiny_model_dir, lora_dir, out), pipe=pipe, progress=False)
    # A relative path to the same model, and a copy of the LoRA elsewhere: the same files, so a rerun continues.
    copy = tmp_path / "lora-copy"
    shutil.copytree(lora_dir, copy)
    monkeypatch.chdir(tiny_model_dir.parent)
    again = sample(sample_cfg(os.path.relpath(tiny_model_dir), copy, out), pipe=pipe, progress=False)
    assert again.generated == 0 and again.skipped == first.generated
    # Other weights at the copy's path are another LoRA: refused.
    from safetensors.torch import load_file, save_file

    weights = copy / "pytorch_lora_weights.safetensors"
    save_file({k: v * 2 for k, v in load_file(str(weights)).items()}, str(weights))
    with pytest.raises(CxrError, match="holds sample output made with other lora"):
        sample(sample_cfg(tiny_model_dir, copy, out), pipe=pipe, progress=False)
