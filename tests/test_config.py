import json

import pytest

from cxr_helpers.config import PRESETS, PrepareConfig, SynthConfig, load_config, save_config, stage_config
from cxr_helpers.errors import CxrError


def test_stage_config_layers_defaults_preset_and_overrides():
    assert stage_config(SynthConfig).reports == SynthConfig().reports
    smoke = stage_config(SynthConfig, "smoke")
    assert smoke.reports == PRESETS["smoke"].stages["synth"]["reports"]
    assert stage_config(SynthConfig, "smoke", reports=5, seed=None).reports == 5  # None keeps


def test_unknown_preset_and_setting_are_one_sentence_errors():
    with pytest.raises(CxrError, match="unknown preset 'nope'; choose one of"):
        stage_config(SynthConfig, "nope")
    with pytest.raises(CxrError, match="has no setting colour"):
        stage_config(PrepareConfig, colour="red")


def test_config_round_trip_with_versions(tmp_path):
    cfg = stage_config(PrepareConfig, data_dir="/d", out="/o", split="image", limit=10)
    path = save_config(cfg, tmp_path / "c.json")
    payload = json.loads(path.read_text())
    assert payload["stage"] == "prepare" and "torch" in payload["versions"]
    assert load_config(PrepareConfig, path) == cfg
    with pytest.raises(CxrError, match="holds a 'prepare' config"):
        load_config(SynthConfig, path)


def test_auto_resolves_to_a_real_preset_everywhere(monkeypatch):
    import torch

    from cxr_helpers.config import get_preset, preset_name

    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    assert preset_name("auto") == "smoke"  # off Kaggle: the offline demo
    assert stage_config(SynthConfig, "auto").reports == PRESETS["smoke"].stages["synth"]["reports"]
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    for count, expected in ((2, "gpu-2x16gb"), (1, "gpu-1x16gb"), (0, "sd15")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda c=count: c > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda c=count: c)
        assert preset_name("auto") == expected and get_preset("auto").name == expected
    # names from before still work; they map to the presets named for the hardware
    assert preset_name("kaggle-t4x2") == "gpu-2x16gb" and preset_name("kaggle-p100") == "gpu-1x16gb"
