"""Shared fixtures: built once per test session, all offline."""

from __future__ import annotations

import os

import pandas as pd
import pytest

# Nothing in a test downloads anything: make any accidental hub access fail fast.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from cxr_helpers.config.stages import TinyModelConfig
    from cxr_helpers.demo.tiny_model import make_tiny_model

    return make_tiny_model(TinyModelConfig(out=str(tmp_path_factory.mktemp("models") / "tiny"), seed=0))


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from cxr_helpers.models.tokenizer import load_tokenizer

    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """A small synthetic dataset: 30 reports, one missing, one truncated, one non-image file."""
    from cxr_helpers.config.stages import SynthConfig
    from cxr_helpers.demo.synthetic_dataset import make_synthetic_dataset

    out = tmp_path_factory.mktemp("synth") / "iu"
    return make_synthetic_dataset(SynthConfig(out=str(out), reports=30, image_size=160, broken_images=3),
                                  progress=False)


@pytest.fixture(scope="session")
def pairs_csv(synth_dir, tokenizer, tmp_path_factory):
    from cxr_helpers.config.stages import PrepareConfig
    from cxr_helpers.data.stage import prepare

    out = tmp_path_factory.mktemp("prepared")
    prepare(PrepareConfig(data_dir=str(synth_dir), out=str(out)), tokenizer=tokenizer, progress=False)
    return out / "pairs.csv"


@pytest.fixture(scope="session")
def lora_dir(pairs_csv, synth_dir, tiny_model_dir, tmp_path_factory):
    """A LoRA trained a few steps with a high learning rate, so that it visibly changes images."""
    from cxr_helpers.config.stages import TrainConfig
    from cxr_helpers.training.stage import train

    out = tmp_path_factory.mktemp("trained")
    cfg = TrainConfig(pairs=str(pairs_csv), data_dir=str(synth_dir), model=str(tiny_model_dir), out=str(out),
                      batch_size=2, max_steps=4, learning_rate=1e-2, checkpoint_every=0, validation_prompts=("x",),
                      validation_seeds=(0,), validation_steps=1)
    return train(cfg, progress=False).lora_dir


@pytest.fixture(autouse=True)
def _no_weight_downloads(monkeypatch):
    """The Inception and XRV weights come from GitHub: tests see it as unreachable, so nothing
    downloads even on a machine with internet (the offline messages are what is tested)."""
    from cxr_helpers.evaluation import features

    monkeypatch.setattr(features, "_github_reachable", lambda: False)


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    """torch-fidelity's Inception-v3 with random weights, as a state dict file (no download)."""
    from stand_ins import random_inception_weights

    return random_inception_weights(tmp_path_factory.mktemp("inception") / "inception-random.pth", seed=0)


def write_set(folder, images, prompts):
    """A folder shaped like the sampling stage's output."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
        name = f"{i:05d}_00_seed{i}.png"
        image.save(folder / name)
        rows.append({"file": name, "prompt": prompt})
    pd.DataFrame(rows).to_csv(folder / "metadata.csv", index=False)
    return folder


def run_code_cell(folder, code):
    """Execute `code` as a one-cell notebook through papermill (a real kernel) in `folder`;
    the executed cell's outputs, as a saved notebook holds them."""
    import nbformat
    import papermill

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)], metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    nbformat.write(nb, str(folder / "in.ipynb"))
    papermill.execute_notebook(str(folder / "in.ipynb"), str(folder / "out.ipynb"), kernel_name="python3",
                               progress_bar=False, cwd=str(folder))
    return nbformat.read(str(folder / "out.ipynb"), as_version=4).cells[0].outputs
