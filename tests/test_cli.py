import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from cxr_helpers.__main__ import main


def cli(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "cxr_helpers", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def test_the_stages_chain_on_the_command_line(tmp_path, tiny_model_dir):
    assert main(["synth", "--out", str(tmp_path / "d"), "--reports", "8", "--image-size", "96"]) == 0
    assert main(["prepare", "--data-dir", str(tmp_path / "d"), "--out", str(tmp_path / "o"),
                 "--tokenizer", str(tiny_model_dir), "--split", "image", "--seed", "2"]) == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["split"] == "image"
    assert json.loads((tmp_path / "o" / "prepare_config.json").read_text())["config"]["seed"] == 2
    assert len(pd.read_csv(tmp_path / "o" / "pairs.csv")) == summary["pairs"]


@pytest.mark.parametrize("args, message", [
    (["prepare", "--data-dir", "/no/such/dir", "--out", "OUT", "--tokenizer", "TOK"], "data dir /no/such/dir does not exist"),
    (["prepare", "--data-dir", "EMPTY", "--out", "OUT", "--tokenizer", "TOK"], "has no indiana_reports.csv"),
    (["prepare", "--data-dir", "DATA", "--out", "OUT", "--tokenizer", "/no/tokenizer"], "is not a directory"),
    (["prepare", "--data-dir", "DATA", "--out", "OUT", "--tokenizer", "stable-diffusion-v1-5/stable-diffusion-v1-5"], "needs internet"),
    (["prepare", "--data-dir", "DATA", "--out", "OUT", "--tokenizer", "runwayml/stable-diffusion-v1-5"],
     "was deleted from the Hugging Face hub in 2024; use its maintained copy 'stable-diffusion-v1-5/stable-diffusion-v1-5'"),
    (["synth", "--out", "OUT", "--reports", "0"], "--reports must be at least 1"),
    (["run-notebooks", "--out", "OUT", "--notebooks", "EMPTY"], "no numbered notebooks"),
])
def test_bad_input_is_one_sentence_and_exit_2(tmp_path, tiny_model_dir, synth_dir, args, message):
    (tmp_path / "empty").mkdir()
    swap = {"OUT": str(tmp_path / "out"), "EMPTY": str(tmp_path / "empty"), "DATA": str(synth_dir),
            "TOK": str(tiny_model_dir)}
    result = cli(*[swap.get(a, a) for a in args])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0]
    assert not (tmp_path / "out" / "pairs.csv").exists()
