import json
import re

import pytest

from cxr_helpers.config.stages import (STAGE_CONFIGS, EvalConfig, PrepareConfig, SampleConfig, SynthConfig,
                                       TrainConfig, load_config, save_config, stage_config)
from cxr_helpers.core.errors import CxrError
from cxr_helpers.config.presets import PRESETS


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

    from cxr_helpers.config.presets import get_preset, preset_name

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
@pytest.mark.parametrize("cls, values, message", [
    (TrainConfig, {"snr_gamma": -5.0}, "--snr-gamma must be more than 0, got -5.0"),
    (TrainConfig, {"alpha": -4.0}, "--alpha must be more than 0"),
    (TrainConfig, {"lora_dropout": 2.0}, "--lora-dropout must be at least 0.0 and less than 1.0"),
    (TrainConfig, {"learning_rate": float("inf")}, "--learning-rate must be a finite number"),
    (TrainConfig, {"batch_size": "4"}, "--batch-size must be a whole number, got '4'"),
    (TrainConfig, {"batch_size": True}, "--batch-size must be a whole number"),
    (TrainConfig, {"prediction_type": "sample"}, "--prediction-type 'sample' is not known"),
    (SampleConfig, {"lora_scale": float("nan")}, "--lora-scale must be a finite number, got nan"),
    (SampleConfig, {"resolution": 100}, "multiple of 8"),
    (EvalConfig, {"kid_subset": 1}, "--kid-subset must be at least 2"),
    (EvalConfig, {"metrics": ("fid", "lpips", "clip")}, "--metrics lpips, clip are not known; use fid, kid,"),
    (EvalConfig, {"adherence_scorer": "oracle"}, "--adherence-scorer 'oracle' is not known; use xrv or geometry"),
    (EvalConfig, {"prdc_k": 0}, "--prdc-k must be at least 1"),
    (EvalConfig, {"interval_groups": -1}, "--interval-groups must be at least 0"),
    (PrepareConfig, {"test_fraction": 1.0}, "--test-fraction must be more than 0.0 and less than 1.0"),
    (PrepareConfig, {"split": "random"}, "use patient or image"),
    (SynthConfig, {"reports": 0}, "--reports must be at least 1"),
])
def test_settings_are_checked_where_they_are_defined(cls, values, message):
    with pytest.raises(CxrError, match=re.escape(message)):
        cls(**values)  # built directly
    with pytest.raises(CxrError, match=re.escape(message)):
        stage_config(cls, **values)  # as the CLI and the notebooks build it


def test_every_preset_passes_the_checks():
    for name in PRESETS:
        for cls in STAGE_CONFIGS.values():
            stage_config(cls, name)


def test_a_saved_config_is_checked_when_read(tmp_path):
    path = save_config(TrainConfig(), tmp_path / "train_config.json")
    payload = json.loads(path.read_text())
    payload["config"]["rank"] = 0
    path.write_text(json.dumps(payload))
    with pytest.raises(CxrError, match="--rank must be at least 1"):
        load_config(TrainConfig, path)


def test_a_list_setting_reads_comma_separated_items_too():
    assert EvalConfig(metrics=("fid,kid", " is ")).metrics == ("fid", "kid", "is")
    assert stage_config(EvalConfig, metrics=["fid, prdc"]).metrics == ("fid", "prdc")


def test_each_declared_choice_has_exactly_one_implementation():
    """A setting's choices are its only check, so the code that acts on the value must know every
    choice and no other (else a declared choice would fail at the use site, or a dead one linger)."""
    import dataclasses

    from cxr_helpers.evaluation.adherence import LABEL_DEFINITIONS, SCORERS
    from cxr_helpers.evaluation.features import FEATURE_NETS, XRV_MODELS
    from cxr_helpers.evaluation.registry import METRICS

    choices = {f.name: f.metadata["rules"]["choices"] for f in dataclasses.fields(EvalConfig)
               if "choices" in f.metadata.get("rules", {})}
    assert tuple(METRICS) == choices["metrics"]  # the order too: it is the results table's
    assert set(FEATURE_NETS) == set(choices["feature_net"])
    assert set(SCORERS) == set(choices["adherence_scorer"])
    assert set(LABEL_DEFINITIONS) == set(choices["adherence_labels"])
    assert set(XRV_MODELS) == set(choices["xrv_model"])
