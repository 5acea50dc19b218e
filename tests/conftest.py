"""Shared fixtures: built once per test session, all offline."""

from __future__ import annotations

import os

import pytest

# Nothing in a test downloads anything: make any accidental hub access fail fast.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from cxr_helpers.config import TinyModelConfig
    from cxr_helpers.models import make_tiny_model

    return make_tiny_model(TinyModelConfig(out=str(tmp_path_factory.mktemp("models") / "tiny"), seed=0))


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from cxr_helpers.models import load_tokenizer

    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """A small synthetic dataset: 30 reports, one missing, one truncated, one non-image file."""
    from cxr_helpers.config import SynthConfig
    from cxr_helpers.synthetic import make_synthetic_dataset

    out = tmp_path_factory.mktemp("synth") / "iu"
    return make_synthetic_dataset(SynthConfig(out=str(out), reports=30, image_size=160, broken_images=3), progress=False)
