import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from cxr_helpers.training import encodings
from cxr_helpers.training import setup as training_setup
from cxr_helpers.training import step as training_step
from cxr_helpers.training import stage as train_mod
from cxr_helpers.training.checkpoints import checkpoint_dirs
from cxr_helpers.config.stages import TrainConfig, stage_config
from cxr_helpers.core.errors import CxrError
from cxr_helpers.training.stage import train


def config(pairs_csv, synth_dir, tiny_model_dir, out, **kw):
    base = dict(pairs=str(pairs_csv), data_dir=str(synth_dir), model=str(tiny_model_dir), out=str(out),
                batch_size=2, max_steps=4, learning_rate=1e-3, checkpoint_every=0, validation_steps=2,
                validation_seeds=(0,), validation_prompts=("Cardiomegaly.",))
    base.update(kw)
    return stage_config(TrainConfig, **base)


def fixed_batch_loss(unet, noise_scheduler, latents, embeddings):
    cfg = TrainConfig()
    with torch.no_grad():
        return float(sum(training_step.diffusion_loss(unet, noise_scheduler, latents, embeddings,
                                                      torch.Generator().manual_seed(k), cfg, "epsilon")
                         for k in range(8)) / 8)


def test_a_few_steps_change_the_lora_and_lower_the_loss(pairs_csv, synth_dir, tiny_model_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    two = pd.read_csv(pairs_csv).query("split == 'train'").head(2)
    two.to_csv(tmp_path / "two.csv", index=False)
    cfg = config(tmp_path / "two.csv", synth_dir, tiny_model_dir, tmp_path / "run", batch_size=2, max_steps=30,
                 learning_rate=3e-3)
    result = train(cfg, progress=False)
    weights = load_file(str(result.lora_dir / "pytorch_lora_weights.safetensors"))
    assert any("lora" in k for k in weights) and all(torch.isfinite(v).all() for v in weights.values())
    ups = [v for k, v in weights.items() if "lora.up" in k or "lora_B" in k]
    assert ups and any(v.abs().sum() > 0 for v in ups)  # B starts at 0: training moved it

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir))
    enc = load_file(str(next((tmp_path / "run" / "cache").glob("encodings-*.safetensors"))))
    mean = enc["moments"][:2].chunk(2, dim=1)[0] * pipe.vae.config.scaling_factor
    prompts = sorted(set(two["prompt"]))
    emb = enc["embeddings"][[prompts.index(p) for p in two["prompt"]]]
    before = fixed_batch_loss(pipe.unet, result_scheduler(tiny_model_dir), mean, emb)
    pipe.load_lora_weights(str(result.lora_dir), weight_name="pytorch_lora_weights.safetensors")
    after = fixed_batch_loss(pipe.unet, result_scheduler(tiny_model_dir), mean, emb)
    assert after < before * 0.95, (before, after)


def result_scheduler(model_dir):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_pretrained(str(model_dir), subfolder="scheduler")


def test_outputs_load_in_plain_diffusers_and_change_the_images(pairs_csv, synth_dir, tiny_model_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    result = train(config(pairs_csv, synth_dir, tiny_model_dir, tmp_path / "run", max_steps=3, learning_rate=1e-2),
                   progress=False)
    lora = result.lora_dir
    card = (lora / "README.md").read_text()
    assert "not for diagnosis" in card and str(tiny_model_dir) in card
    # The card's loading line works offline on every supported diffusers (0.32 needs weight_name).
    assert 'load_lora_weights("path/to/this/folder", weight_name="pytorch_lora_weights.safetensors")' in card
    saved = json.loads((lora / "config.json").read_text())
    assert saved["config"]["rank"] == 4 and "diffusers" in saved["versions"] and saved["steps_done"] == 3
    loss = pd.read_csv(tmp_path / "run" / "loss.csv")
    assert list(loss.columns) == ["step", "loss", "lr", "epoch", "images_per_s"] and loss["step"].tolist() == [1, 2, 3]
    assert (tmp_path / "run" / "figures" / "loss_curve.png").is_file()
    assert (tmp_path / "run" / "figures" / "validation-step-0000003.png").is_file()

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    def image():
        return pipe("Cardiomegaly.", num_inference_steps=2, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images
    base = image()
    pipe.load_lora_weights(str(lora), weight_name="pytorch_lora_weights.safetensors")
    assert abs(image() - base).max() > 1e-4


def test_the_encodings_cache_is_reused(pairs_csv, synth_dir, tiny_model_dir, tmp_path, monkeypatch):
    first = train(config(pairs_csv, synth_dir, tiny_model_dir, tmp_path / "a", max_steps=1,
                         cache_dir=str(tmp_path / "cache"), random_flip=True), progress=False)
    assert not first.encodings_hit and first.encoded_images > 0
    def no_encoding(*args, **kwargs):
        raise AssertionError("encoded again")
    monkeypatch.setattr(encodings, "encode_images", no_encoding)
    monkeypatch.setattr(encodings, "encode_prompts", no_encoding)
    second = train(config(pairs_csv, synth_dir, tiny_model_dir, tmp_path / "b", max_steps=1,
                          cache_dir=str(tmp_path / "cache"), random_flip=True, validation_every=0,
                          validation_prompts=()), progress=False)
    assert second.encodings_hit and second.encoded_images == 0


def _cli_train(args, **popen):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "cxr_helpers", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def test_killed_run_resumes_to_the_same_weights(pairs_csv, synth_dir, tiny_model_dir, tmp_path):
    common = ["--pairs", str(pairs_csv), "--data-dir", str(synth_dir), "--model", str(tiny_model_dir),
              "--batch-size", "2", "--max-steps", "40", "--checkpoint-every", "5", "--learning-rate", "1e-3",
              "--validation-steps", "2", "--validation-prompts", "Cardiomegaly.", "--validation-seeds", "0",
              "--cache-dir", str(tmp_path / "cache"), "--random-flip", "--lora-dropout", "0.1"]
    whole = _cli_train(common + ["--out", str(tmp_path / "whole")])
    assert whole.wait(timeout=300) == 0, whole.stderr.read()

    killed = _cli_train(common + ["--out", str(tmp_path / "killed")])
    deadline = time.time() + 240
    while time.time() < deadline and not list((tmp_path / "killed" / "checkpoints").glob("step-000001[05]")):
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)  # no clean-up, mid-step or mid-write
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    resumed = _cli_train(common + ["--out", str(tmp_path / "killed"), "--resume", "latest"])
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    summary = resumed.stderr.read()  # the run's summary is a log line: the CLI writes those to stderr
    assert ("steps 10->40" in summary or "steps 15->40" in summary) and "cache hit" in summary, summary

    a = load_file(str(tmp_path / "whole" / "lora" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "killed" / "lora" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    la, lb = pd.read_csv(tmp_path / "whole" / "loss.csv"), pd.read_csv(tmp_path / "killed" / "loss.csv")
    assert lb["step"].tolist() == list(range(1, 41))  # each step once
    assert (la["loss"] == lb["loss"]).all()


def test_resume_needs_a_checkpoint_and_the_same_settings(pairs_csv, synth_dir, tiny_model_dir, tmp_path):
    with pytest.raises(CxrError, match="holds no checkpoint; start without --resume"):
        train(config(pairs_csv, synth_dir, tiny_model_dir, tmp_path / "r", resume="latest"), progress=False)
    train(config(pairs_csv, synth_dir, tiny_model_dir, tmp_path / "r", max_steps=2, validation_prompts=()),
          progress=False)
    with pytest.raises(CxrError, match="different learning_rate"):
        train(config(pairs_csv, synth_dir, tiny_model_dir, tmp_path / "r", max_steps=4, learning_rate=5e-4,
                     resume="latest"),
              progress=False)
    with pytest.raises(CxrError, match="not a checkpoint folder"):
        train(config(pairs_csv, synth_dir, tiny_model_dir, tmp_path / "r", resume=str(tmp_path)), progress=False)


def test_a_nan_loss_stops_and_keeps_the_last_good_checkpoint(pairs_csv, synth_dir, tiny_model_dir, tmp_path,
                                                             monkeypatch):
    real = train_mod.diffusion_loss
    calls = []
    def flaky(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 5 else loss
    monkeypatch.setattr(train_mod, "diffusion_loss", flaky)
    with pytest.raises(CxrError, match=r"the loss became nan at step 5; .*step-0000004.*lower --learning-rate"):
        train(config(pairs_csv, synth_dir, tiny_model_dir, tmp_path / "n", max_steps=8, checkpoint_every=2),
              progress=False)
    kept = checkpoint_dirs(tmp_path / "n")
    assert kept[-1].name == "step-0000004"
    assert all(torch.isfinite(v).all() for v in load_file(str(kept[-1] / "lora.safetensors")).values())


def test_a_failed_checkpoint_write_leaves_the_previous_one(pairs_csv, synth_dir, tiny_model_dir, tmp_path, monkeypatch):
    import safetensors.torch

    real = safetensors.torch.save_file
    calls = []
    def full_disk(tensors, path, *args, **kwargs):
        calls.append(path)
        if "tmp-step-0000004" in str(path) and "optimizer" in str(path):  # mid-way through the 2nd checkpoint
            raise OSError(28, "No space left on device")
        return real(tensors, path, *args, **kwargs)
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(CxrError, match="step 4 .*No space left.*step-0000002 is intact.*--resume latest"):
        train(config(pairs_csv, synth_dir, tiny_model_dir, tmp_path / "w", max_steps=6, checkpoint_every=2),
              progress=False)
    folder = tmp_path / "w" / "checkpoints"
    assert [p.name for p in folder.iterdir()] == ["step-0000002"]
    assert load_file(str(folder / "step-0000002" / "lora.safetensors"))


@pytest.mark.parametrize("change, message", [
    ({"resolution": 100}, "multiple of 8"),
    ({"batch_size": 0}, "--batch-size must be at least 1"),
    ({"pairs": "/no/pairs.csv"}, "does not exist; run `python -m cxr_helpers prepare`"),
    ({"model": "/no/model"}, "has no model_index.json"),
    ({"model": "stable-diffusion-v1-5/stable-diffusion-v1-5"}, "needs internet"),
    ({"model": "runwayml/stable-diffusion-v1-5"},
     "was deleted from the Hugging Face hub in 2024; use its maintained copy"),
    ({"mixed_precision": "fp16"}, "needs a GPU"),
    ({"lr_scheduler": "sideways"}, "is not known"),
])
def test_bad_input_is_one_sentence(pairs_csv, synth_dir, tiny_model_dir, tmp_path, change, message):
    with pytest.raises(CxrError, match=message):
        train(config(pairs_csv, synth_dir, tiny_model_dir, tmp_path / "x", **change), progress=False)


def test_wrong_columns_in_pairs(tmp_path, synth_dir, tiny_model_dir):
    pd.DataFrame({"image": ["a.png"], "text": ["x"]}).to_csv(tmp_path / "p.csv", index=False)
    with pytest.raises(CxrError, match="lacks the column"):
        train(config(tmp_path / "p.csv", synth_dir, tiny_model_dir, tmp_path / "x"), progress=False)


def test_gpu_without_kernels_for_the_card_is_explained(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (6, 0))
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_70", "sm_75", "sm_80", "sm_90"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla P100-PCIE-16GB")
    with pytest.raises(CxrError, match="no kernels for the Tesla P100.*sm_60.*T4 x2"):
        training_setup.check_device("fp16")
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_60", "sm_70"])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert training_setup.check_device("fp16") == "cuda"
    with pytest.raises(CxrError, match="has no bf16"):
        training_setup.check_device("bf16")


def test_batches_cover_each_epoch_once():
    seen = training_step.batch_indices(10, 0, 0, 10)
    assert sorted(seen) == list(range(10))
    assert training_step.batch_indices(10, 0, 7, 6) == seen[7:] + training_step.batch_indices(10, 0, 10, 3)


def test_two_processes_train_with_no_code_change(pairs_csv, synth_dir, tiny_model_dir, tmp_path):
    """The multi-GPU path (Kaggle T4 x2) on two CPU processes: torchrun + gloo, as accelerate
    launch would start them; batches are sharded, losses gathered, one process writes."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "cxr_helpers", "train"]
    args = ["--pairs", str(pairs_csv), "--data-dir", str(synth_dir), "--model", str(tiny_model_dir),
            "--out", str(tmp_path / "ddp"), "--batch-size", "2", "--max-steps", "4", "--checkpoint-every", "2",
            "--validation-steps", "2", "--validation-prompts", "Cardiomegaly.", "--validation-seeds", "0"]
    done = subprocess.run(torchrun + args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # the summary (a log line, on stderr) from the main process; the result once, on stdout
    assert done.stderr.count("x 2 process(es)") == 1 and done.stdout.count("trained 4 steps") == 1
    loss = pd.read_csv(tmp_path / "ddp" / "loss.csv")
    n_train = (pd.read_csv(pairs_csv)["split"] == "train").sum()
    assert loss["step"].tolist() == [1, 2, 3, 4] and loss["epoch"].iloc[-1] == pytest.approx(4 * 2 * 2 / n_train)
    assert load_file(str(tmp_path / "ddp" / "lora" / "pytorch_lora_weights.safetensors"))


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".cxr.lock"}


def test_a_finished_run_is_not_overwritten_or_mixed(pairs_csv, synth_dir, tiny_model_dir, tmp_path):
    from cxr_helpers.core.ownership import folder_lock

    out = tmp_path / "run"
    train(config(pairs_csv, synth_dir, tiny_model_dir, out, max_steps=2, validation_prompts=()), progress=False)
    before = _snapshot(out)
    # The same run again (a notebook rerun): reused as it is, nothing trained or written.
    again = train(config(pairs_csv, synth_dir, tiny_model_dir, out, max_steps=2, validation_prompts=()), progress=False)
    assert again.steps_done == 2 and again.lora_dir == out / "lora" and _snapshot(out) == before
    # A fresh run with other settings: refused, every file as it was.
    for kw in ({"learning_rate": 5e-4}, {"max_steps": 3}):
        with pytest.raises(CxrError, match="holds a training run \\(checkpoints up to step 2 \\(finished\\)\\); "
                                           "continue it with --resume latest"):
            train(config(pairs_csv, synth_dir, tiny_model_dir, out, **{"max_steps": 2, "validation_prompts": (), **kw}),
                  progress=False)
        assert _snapshot(out) == before
    # A second run while one holds the folder: refused at once.
    with folder_lock(out, "train run"):
        with pytest.raises(CxrError, match="another train run is writing to .*pid"):
            train(config(pairs_csv, synth_dir, tiny_model_dir, out, resume="latest"), progress=False)
    # --overwrite: the old run is moved aside whole, the cache stays, the new run starts at step 0.
    result = train(config(pairs_csv, synth_dir, tiny_model_dir, out, max_steps=3, validation_prompts=(),
                          overwrite=True), progress=False)
    assert result.loss["step"].tolist() == [1, 2, 3] and result.encodings_hit
    aside = next(tmp_path.glob("run.replaced-*"))
    assert _snapshot(aside) == {k: v for k, v in before.items() if not k.startswith("cache/")}


def test_resume_checks_the_checkpoint_and_the_inputs(pairs_csv, synth_dir, tiny_model_dir, tmp_path):
    import shutil

    out = tmp_path / "r"
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    train(config(pairs_csv, synth_dir, model, out, max_steps=2, checkpoint_every=1, keep_checkpoints=3,
                 validation_prompts=()), progress=False)
    state = json.loads((out / "checkpoints" / "step-0000002" / "state.json").read_text())
    assert state["processes"] == 1 and state["prediction_type"] == "epsilon" and "grad_scaler" in state
    def resume(**kw):
        return train(config(pairs_csv, synth_dir, model, out, max_steps=3, checkpoint_every=1, keep_checkpoints=3,
                            validation_prompts=(), **kw), progress=False)

    def edited(make_change, message):
        copy = tmp_path / "edited" / "step-0000002"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(out / "checkpoints" / "step-0000002", copy)
        make_change(copy)
        with pytest.raises(CxrError, match=message):
            resume(resume=str(copy))

    def set_state(copy, **values):
        saved = json.loads((copy / "state.json").read_text())
        saved.update(values)
        (copy / "state.json").write_text(json.dumps(saved))

    edited(lambda c: set_state(c, step=7), "the folder says step 2 and state.json says step 7")
    edited(lambda c: set_state(c, step="2"), "holds step '2', not a positive step number")
    edited(lambda c: set_state(c, processes=2), "other number of processes \\(processes: 2 then, 1 now\\)")
    edited(lambda c: set_state(c, prediction_type="v_prediction"), "other prediction type")
    edited(lambda c: (c / "lora.safetensors").write_bytes((c / "lora.safetensors").read_bytes()[:100]),
           "lora.safetensors is not the file the run saved \\(truncated or edited\\)")
    edited(lambda c: (c / "optimizer.json").unlink(), "lacks optimizer.json")
    edited(lambda c: (c / "state.json").write_text("{not json"), "state.json is damaged")
    # Other train pairs than the checkpoint's: refused.
    pairs = pd.read_csv(pairs_csv)
    pairs = pairs.drop(index=pairs.index[pairs["split"] == "train"][0])
    pairs.to_csv(tmp_path / "fewer.csv", index=False)
    with pytest.raises(CxrError, match="other train pairs"):
        train(config(tmp_path / "fewer.csv", synth_dir, model, out, max_steps=3, checkpoint_every=1,
                     keep_checkpoints=3, validation_prompts=(), resume="latest"), progress=False)
    # The intact checkpoint resumes.
    assert resume(resume="latest").loss["step"].tolist() == [1, 2, 3]
    # A base model regenerated at the same path (other weights, the same file names): refused.
    from safetensors.torch import load_file, save_file

    unet_file = next((model / "unet").glob("*.safetensors"))
    save_file({k: v + 1e-3 for k, v in load_file(str(unet_file)).items()}, str(unet_file))
    with pytest.raises(CxrError, match="other base model files"):
        resume(resume="latest")


def test_the_prediction_type_travels_with_the_lora(pairs_csv, synth_dir, tiny_model_dir, tmp_path):
    from cxr_helpers.models.generation import load_sampling_pipeline

    result = train(config(pairs_csv, synth_dir, tiny_model_dir, tmp_path / "v", max_steps=1,
                          prediction_type="v_prediction", validation_prompts=()), progress=False)
    assert json.loads((result.lora_dir / "config.json").read_text())["prediction_type"] == "v_prediction"
    pipe = load_sampling_pipeline(str(tiny_model_dir), result.lora_dir)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert load_sampling_pipeline(str(tiny_model_dir)).scheduler.config.prediction_type == "epsilon"


def test_random_flip_warns_about_laterality(pairs_csv, synth_dir, tiny_model_dir, tmp_path, caplog):
    pairs = pd.read_csv(pairs_csv)
    pairs.loc[pairs["split"] == "train", "prompt"] = "Small left pleural effusion."
    pairs.to_csv(tmp_path / "sided.csv", index=False)
    train(config(tmp_path / "sided.csv", synth_dir, tiny_model_dir, tmp_path / "f", max_steps=1, random_flip=True,
                 validation_prompts=()), progress=False)
    assert [r.levelname for r in caplog.records if "--random-flip mirrors films" in r.message] == ["WARNING"]
