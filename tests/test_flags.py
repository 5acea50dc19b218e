import dataclasses
import re

import pytest

from cxr_helpers.__main__ import STAGES, build_parser, main
from cxr_helpers.config.stages import SampleConfig, SynthConfig
from cxr_helpers.config.flags import field_default, show_default
from cxr_helpers.config.presets import PRESETS
from cxr_helpers.config.settings import field_flag


def _help_entries(stage, capsys):
    """--help of a subcommand, as {flag: its help entry without whitespace} (help wraps at spaces and dashes)."""
    with pytest.raises(SystemExit):
        main([stage, "--help"])
    text = capsys.readouterr().out.split("options:", 1)[1]
    entries = re.split(r"\n  (?=-)", text)
    return {entry.split()[0].rstrip(","): "".join(entry.split()) for entry in entries if entry.strip()}


@pytest.mark.parametrize("stage", list(STAGES))
def test_help_lists_every_setting_with_its_default(stage, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    entries = _help_entries(stage, capsys)
    spec = STAGES[stage]
    for f in dataclasses.fields(spec.config):
        entry = entries[field_flag(f)]
        expected = "required" if f.name in spec.required else f"default: {show_default(field_default(f))})"
        assert expected.replace(" ", "") in entry, entry
    assert "--preset" in entries


def test_flags_follow_the_annotations():
    args = build_parser().parse_args(["train", "--validation-seeds", "3", "4", "--epochs", "1.5", "--random-flip",
                                      "--no-overwrite"])
    assert args.validation_seeds == [3, 4] and args.epochs == 1.5 and args.random_flip is True
    assert args.overwrite is False and args.rank is None  # not given: the preset's value or the default applies


def test_presets_apply_under_the_flags_on_every_stage():
    from cxr_helpers.__main__ import _config

    smoke = PRESETS["smoke"].stages
    args = build_parser().parse_args(["sample", "--out", "o", "--preset", "smoke", "--prompts", "p.txt"])
    assert _config(SampleConfig, args).resolution == smoke["sample"]["resolution"] != SampleConfig().resolution
    args = build_parser().parse_args(["sample", "--out", "o", "--preset", "smoke", "--resolution", "96"])
    assert _config(SampleConfig, args).resolution == 96
    args = build_parser().parse_args(["synth", "--out", "o"])
    assert _config(SynthConfig, args) == SynthConfig(out="o")


def test_sample_takes_one_prompt_source(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["sample", "--out", "o", "--prompts", "p.txt", "--pairs", "pairs.csv"])
    assert "not allowed with argument" in capsys.readouterr().err
