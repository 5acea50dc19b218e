"""The prompt panel driven headless: what its buttons do (tests/test_browser.py clicks them in a
real browser)."""

import numpy as np
import pandas as pd
import pytest

from cxr_helpers.core.layout import METADATA_COLUMNS
from cxr_helpers.models.generation import generate, load_sampling_pipeline
from cxr_helpers.sampling.widgets import OWN_PROMPT, PromptPanel

COMMON = ["Cardiomegaly.", "No acute disease."]


@pytest.fixture(scope="module")
def pipe(tiny_model_dir, lora_dir):
    return load_sampling_pipeline(str(tiny_model_dir), lora_dir)


@pytest.fixture()
def panel(pipe, tmp_path, lora_dir):
    return PromptPanel(pipe, COMMON, resolution=64, steps=2, save_dir=tmp_path / "saved", lora=str(lora_dir))


def test_dropdown_and_prompt_box_agree(panel, pipe):
    n = len(pipe.tokenizer("Cardiomegaly.").input_ids)
    assert panel.common.value == panel.prompt.value == "Cardiomegaly."
    assert f">{n} / 77 CLIP tokens<" in panel.tokens.value
    panel.common.value = "No acute disease."
    assert panel.prompt.value == "No acute disease."
    panel.prompt.value = "Small left pleural effusion."  # typed: the dropdown lets go
    assert panel.common.value == OWN_PROMPT and panel.prompt.value == "Small left pleural effusion."
    panel.prompt.value = "Cardiomegaly."  # typed a common one: the dropdown shows it
    assert panel.common.value == "Cardiomegaly."
    panel.prompt.value = " ".join(["lung"] * 80)
    assert "over 77" in panel.tokens.value


def test_generate_is_seeded_busy_while_running_and_reports_steps(panel, pipe):
    seen = []  # the button's state and the bar, as the pipeline sees them at each step
    original = panel._step
    panel._step = lambda k: (seen.append((k, panel.button.disabled, panel.button.description)), original(k))
    panel.n_images.value, panel.seed.value, panel.lora_scale.value, panel.steps.value = 3, 5, 0.5, 3
    images = panel.generate()
    assert [s[0] for s in seen] == [1, 2, 3] and all(s[1] and s[2].startswith("Generating") for s in seen)
    assert not panel.button.disabled and panel.button.description == "Generate" and not panel.save_button.disabled
    assert panel.progress.value == panel.progress.max == 3
    assert len(images) == 3 and images[0].size == (64, 64) and panel.figure is not None
    direct = generate(pipe, ["Cardiomegaly."], [6], 64, 3, lora_scale=0.5)[0]  # image k has seed 5 + k
    assert np.abs(np.asarray(images[1], dtype=int) - np.asarray(direct, dtype=int)).max() <= 1


def test_mistakes_show_in_the_panel_and_keep_the_last_images(panel):
    first = panel.generate()
    assert len(first) == 4 and panel.status.value == ""
    panel.prompt.value = "  "
    assert panel.generate() is first and "Type a prompt" in panel.status.value
    panel.prompt.value = " ".join(["lung"] * 80)
    panel.strict.value = True
    assert (panel.generate() is first and "over the 77 limit" in panel.status.value
            and "cxr-status-error" in panel.status.value)
    panel.prompt.value = "Cardiomegaly. " * 1000  # a file pasted in: said, never tokenized or generated
    assert panel.generate() is first and "14,000 bytes, over the 4,096-byte bound" in panel.status.value
    assert "over the 4,096-byte bound" in panel.tokens.value
    assert panel.images is first and not panel.button.disabled


def test_an_error_inside_generation_is_a_sentence_not_a_traceback(panel, monkeypatch):
    from cxr_helpers.models import generation

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory.\nlong details")

    monkeypatch.setattr(generation, "generate", broken)
    assert panel.generate() == [] and "Generation failed: RuntimeError: CUDA out of memory." in panel.status.value
    assert not panel.button.disabled and panel.button.description == "Generate"


def test_no_lora_is_said_and_its_scale_is_off(tiny_model_dir):
    base = load_sampling_pipeline(str(tiny_model_dir))
    panel = PromptPanel(base, COMMON, resolution=64, steps=2)
    assert not panel.has_lora and panel.lora_scale.disabled and "No LoRA loaded" in panel.status.value


def test_save_writes_the_shown_images_with_sample_metadata(panel, tmp_path, lora_dir):
    assert panel.save() is None and "press Generate" in panel.status.value
    panel.seed.value, panel.n_images.value = 3, 2
    shown = panel.generate()
    panel.seed.value, panel.steps.value = 99, 7  # changed after generating: Save records what is shown
    out = panel.save()
    panel.prompt.value = "No acute disease."
    panel.generate()
    panel.save()
    meta = pd.read_csv(out / "metadata.csv")
    assert list(meta.columns) == METADATA_COLUMNS and len(meta) == 4
    assert meta["prompt"].tolist() == ["Cardiomegaly."] * 2 + ["No acute disease."] * 2
    assert meta["seed"].tolist() == [3, 4, 99, 100] and meta["steps"].tolist() == [2, 2, 7, 7]
    assert meta["prompt_index"].tolist() == [0, 0, 1, 1] and (meta["lora"] == str(lora_dir)).all()
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(out / meta["file"][1])), np.asarray(shown[1]))
    (tmp_path / "sampled").mkdir()
    (tmp_path / "sampled" / "sample_config.json").write_text("{}")
    panel.save_dir = tmp_path / "sampled"
    assert panel.save() is None and "sample run" in panel.status.value
