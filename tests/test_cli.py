import json
import os
import re
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
    (["prepare", "--data-dir", "/no/such/dir", "--out", "OUT", "--tokenizer", "TOK"],
     "data dir /no/such/dir does not exist"),
    (["prepare", "--data-dir", "EMPTY", "--out", "OUT", "--tokenizer", "TOK"], "has no indiana_reports.csv"),
    (["prepare", "--data-dir", "DATA", "--out", "OUT", "--tokenizer", "/no/tokenizer"], "is not a directory"),
    (["prepare", "--data-dir", "DATA", "--out", "OUT", "--tokenizer", "stable-diffusion-v1-5/stable-diffusion-v1-5"],
     "needs internet"),
    (["prepare", "--data-dir", "DATA", "--out", "OUT", "--tokenizer", "runwayml/stable-diffusion-v1-5"],
     "was deleted from the Hugging Face hub in 2024; use its maintained copy "
     "'stable-diffusion-v1-5/stable-diffusion-v1-5'"),
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


def test_run_notebooks_says_which_runs_and_hides_the_kernels_tcp_warning(tmp_path):
    import nbformat

    for name in ("01_first.ipynb", "02_second.ipynb"):  # stand-ins that run in a second
        parameters = nbformat.v4.new_code_cell('PRESET = ""\nOUTPUT_DIR = ""', metadata={"tags": ["parameters"]})
        nb = nbformat.v4.new_notebook(cells=[parameters, nbformat.v4.new_code_cell("print(PRESET)")], metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
        nbformat.write(nb, str(tmp_path / name))
    result = cli("run-notebooks", "--out", str(tmp_path / "out"), "--notebooks", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "without encryption" not in result.stderr
    lines = result.stderr.splitlines()
    assert [line.split(":")[0] for line in lines] == (["notebook 1/2 01_first.ipynb"] * 2
                                                      + ["notebook 2/2 02_second.ipynb"] * 2)
    assert lines[0].endswith(": running") and re.fullmatch(r".*: done in \d+ s", lines[1])
    assert "executed " + str(tmp_path / "out" / "notebooks" / "01_first.ipynb") in result.stdout


# ---------------------------------------------------------------- the bad-input table ---------
# Every stage, fed what a careless user feeds it: exit 2, one "error:" sentence, no traceback,
# and every good output made before (data, pairs, a trained run, samples, a synthesized set)
# byte-identical afterwards.

class _Payload:
    """Pickles as a call of os.system: plain torch.load would run it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".cxr.lock"}


@pytest.fixture(scope="module")
def good(tmp_path_factory, synth_dir, pairs_csv, lora_dir, tiny_model_dir):
    """Good outputs of every stage, copied to one root, and a folder of bad input files."""
    import shutil

    import torch

    root = tmp_path_factory.mktemp("good")
    shutil.copytree(synth_dir, root / "data")
    shutil.copytree(pairs_csv.parent, root / "prepared")
    shutil.copytree(lora_dir.parent, root / "train")
    (root / "prompts.txt").write_text("Cardiomegaly.\nSmall left pleural effusion.\n")
    common = ["--model", str(tiny_model_dir), "--lora", str(root / "train" / "lora")]
    assert main(["sample", *common, "--out", str(root / "samples"), "--prompts", str(root / "prompts.txt"),
                 "--steps", "2", "--resolution", "64"]) == 0
    (root / "spec.json").write_text(json.dumps({"steps": 2, "resolution": 64,
                                                "items": [{"prompt": "Cardiomegaly.", "count": 2}]}))
    assert main(["synthesize", *common[:2], "--spec", str(root / "spec.json"), "--out", str(root / "synthesized")]) == 0

    bad = tmp_path_factory.mktemp("bad")
    (bad / "empty").mkdir()
    (bad / "latin1.txt").write_bytes("Épanchement pleural gauche.\n".encode("latin-1"))
    (bad / "empty.csv").write_text("")
    (bad / "binary.csv").write_bytes(bytes(range(256)) * 8)
    pairs = pd.read_csv(root / "prepared" / "pairs.csv", dtype=str, keep_default_na=False)
    pairs.assign(uid=["1.5"] + pairs["uid"].tolist()[1:]).to_csv(bad / "uid15.csv", index=False)
    pairs.assign(split=["validation"] + pairs["split"].tolist()[1:]).to_csv(bad / "labels.csv", index=False)
    (bad / "config.json").write_text("{this is not json")
    (bad / "a_file").write_text("x")
    (bad / "loop").symlink_to(bad / "loop")
    for name, spec in {"string_templates": {"items": [{"label": "E", "templates": "Small effusion.", "count": 2}]},
                       "unknown_key": {"items": [{"prompt": "x", "count": 1}], "stpes": 4},
                       "nan_scale": {"items": [{"prompt": "x", "count": 1}], "lora_scale": float("nan")}}.items():
        (bad / f"{name}.json").write_text(json.dumps(spec))
    (bad / "notjson.json").write_text("items: [x]")
    shutil.copytree(root / "data", bad / "uid15_data")
    frame = pd.read_csv(bad / "uid15_data" / "indiana_projections.csv", dtype=str)
    frame.loc[0, "uid"] = "1.5"
    frame.to_csv(bad / "uid15_data" / "indiana_projections.csv", index=False)
    shutil.copytree(root / "data", bad / "binary_data")
    (bad / "binary_data" / "indiana_reports.csv").write_bytes(bytes(range(256)) * 8)
    shutil.copytree(root / "data", bad / "real_data")
    (bad / "real_data" / "cxr_owner.json").unlink()  # like the Kaggle dataset: nobody's output
    shutil.copytree(root / "samples", bad / "nofile_samples")
    meta = pd.read_csv(bad / "nofile_samples" / "metadata.csv")
    meta.drop(columns=["file"]).to_csv(bad / "nofile_samples" / "metadata.csv", index=False)
    shutil.copytree(root / "samples", bad / "escaping_samples")
    meta.assign(file=["../../../secret.png"] + meta["file"].tolist()[1:]).to_csv(
        bad / "escaping_samples" / "metadata.csv", index=False)
    step = next((root / "train" / "checkpoints").iterdir())
    shutil.copytree(step, bad / "edited" / step.name)
    state = json.loads((bad / "edited" / step.name / "state.json").read_text())
    (bad / "edited" / step.name / "state.json").write_text(json.dumps({**state, "step": state["step"] + 5}))
    shutil.copytree(step, bad / "truncated" / step.name)
    lora = bad / "truncated" / step.name / "lora.safetensors"
    lora.write_bytes(lora.read_bytes()[:200])
    torch.save(_Payload(bad / "payload-ran"), bad / "evil.pt")
    return root, bad


def _train(*extra):
    return ["train", "--pairs", "GOOD/prepared/pairs.csv", "--data-dir", "GOOD/data", "--model", "TINY",
            "--max-steps", "2", "--batch-size", "2", "--validation-prompts", "x", *extra]


def _sample(*extra):
    return ["sample", "--model", "TINY", "--lora", "GOOD/train/lora", "--steps", "2", "--resolution", "64", *extra]


def _eval(*extra):
    return ["evaluate", "--pairs", "GOOD/prepared/pairs.csv", "--data-dir", "GOOD/data", "--feature-net", "standin",
            "--metrics", "fid", "--out", "NEW", *extra]


def _prepare(*extra):
    return ["prepare", "--data-dir", "GOOD/data", "--tokenizer", "TINY", "--out", "NEW", *extra]


BAD_INPUTS = [
    # prepare
    (_prepare("--test-fraction", "0.99"), "leaves no train pairs; lower --test-fraction"),
    (_prepare("--test-fraction", "1.5"), "--test-fraction must be more than 0.0 and less than 1.0"),
    (_prepare("--limit", "0"), "--limit must be at least 1"),
    (_prepare("--workers", "0"), "--workers must be at least 1"),
    (["prepare", "--data-dir", "BAD/uid15_data", "--tokenizer", "TINY", "--out", "NEW"], "non-integer uid '1.5'"),
    (["prepare", "--data-dir", "BAD/binary_data", "--tokenizer", "TINY", "--out", "NEW"], "indiana_reports.csv"),
    (["prepare", "--data-dir", "BAD/empty", "--tokenizer", "TINY", "--out", "NEW"], "has no indiana_reports.csv"),
    (_prepare()[:-1] + ["BAD/a_file/out"], "cannot write to"),
    # synth
    (["synth", "--out", "NEW", "--image-size", "10"], "--image-size must be at least 64"),
    (["synth", "--out", "NEW", "--broken-images", "-1"], "--broken-images must be at least 0"),
    (["synth", "--out", "BAD/real_data", "--reports", "3"], "no cxr-lora synth run made"),
    (["synth", "--out", "GOOD/data", "--reports", "3"], "holds synth output made with other"),
    (["synth", "--out", "GOOD/samples"], "holds the output of a sample run, not of synth"),
    (["synth", "--out", "BAD/a_file"], "is a file, not a folder"),
    # train
    (_train("--out", "NEW", "--snr-gamma", "-5"), "--snr-gamma must be more than 0, got -5.0"),
    (_train("--out", "NEW", "--alpha", "-4"), "--alpha must be more than 0"),
    (_train("--out", "NEW", "--lora-dropout", "2"), "--lora-dropout must be at least 0.0 and less than 1.0"),
    (_train("--out", "NEW", "--learning-rate", "nan"), "--learning-rate must be a finite number"),
    (_train("--out", "NEW", "--target-modules", "bogus"), "--target-modules bogus matched nothing"),
    (_train("--out", "NEW", "--resolution", "100"), "multiple of 8"),
    (_train("--out", "NEW", "--batch-size", "0"), "--batch-size must be at least 1"),
    (_train("--out", "NEW", "--mixed-precision", "fp16"), "needs a GPU"),
    (_train("--out", "NEW", "--lr-scheduler", "sideways"), "is not known"),
    (_train("--out", "NEW", "--prediction-type", "sample"), "--prediction-type 'sample' is not known"),
    (["train", "--config-file", "BAD/config.json"], "is not valid JSON"),
    (_train("--out", "NEW", "--pairs", "BAD/empty.csv"), "not a readable CSV"),
    (_train("--out", "NEW", "--pairs", "BAD/binary.csv"), "pairs.csv"),
    (_train("--out", "NEW", "--pairs", "BAD/uid15.csv"), "non-integer uid '1.5'"),
    (_train("--out", "NEW", "--pairs", "BAD/labels.csv"), "split label(s) 'validation'"),
    (_train("--out", "GOOD/train", "--rank", "8"), "holds a training run"),
    (_train("--out", "GOOD/train", "--resume", "latest", "--learning-rate", "0.5"), "different learning_rate"),
    (_train("--out", "GOOD/train", "--resume", "EDITED"), "state.json says step"),
    (_train("--out", "GOOD/train", "--resume", "TRUNCATED"), "lora.safetensors is not the file the run saved"),
    (_train("--out", "BAD/a_file"), "is a file, not a folder"),
    # sample
    (_sample("--out", "NEW", "--prompts", "GOOD/prompts.txt", "--lora-scale", "nan"),
     "--lora-scale must be a finite number"),
    (_sample("--out", "NEW", "--prompts", "GOOD/prompts.txt", "--steps", "0"), "--steps must be at least 1"),
    (_sample("--out", "NEW", "--prompts", "GOOD/prompts.txt", "--scheduler", "heun"),
     "--scheduler 'heun' is not known"),
    (_sample("--out", "NEW", "--prompts", "BAD/latin1.txt"), "is not UTF-8 text"),
    (_sample("--out", "NEW", "--prompts", "BAD/loop"), "does not exist"),
    (_sample("--out", "NEW", "--prompts", "GOOD/prompts.txt", "--upscale", "32"), "smaller than --resolution"),
    (_sample("--out", "GOOD/samples", "--pairs", "GOOD/prepared/pairs.csv"),
     "holds sample output made with other prompts"),
    (_sample("--out", "GOOD/samples", "--prompts", "GOOD/prompts.txt", "--guidance", "3"), "other guidance"),
    (["sample", "--model", "TINY", "--lora", "BAD/missing", "--out", "NEW", "--prompts", "GOOD/prompts.txt"],
     "does not exist; pass the lora/ folder"),
    (_sample("--out", "GOOD/data", "--prompts", "GOOD/prompts.txt"), "holds the output of a synth run"),
    # synthesize
    (["synthesize", "--spec", "BAD/string_templates.json", "--out", "NEW", "--model", "TINY"],
     '"templates" must be a list'),
    (["synthesize", "--spec", "BAD/unknown_key.json", "--out", "NEW", "--model", "TINY"],
     "unknown key(s) stpes; known:"),
    (["synthesize", "--spec", "BAD/nan_scale.json", "--out", "NEW", "--model", "TINY"],
     '"lora_scale" must be a finite number'),
    (["synthesize", "--spec", "BAD/notjson.json", "--out", "NEW", "--model", "TINY"], "is not valid JSON"),
    (["synthesize", "--spec", "GOOD/spec.json", "--out", "BAD/real_data", "--model", "TINY"],
     "no cxr-lora synthesize run made"),
    (["synthesize", "--spec", "GOOD/spec.json", "--out", "GOOD/synthesized", "--model", "TINY", "--lora",
      "GOOD/train/lora"], "other lora"),
    # evaluate
    (_eval("--generated", "GOOD/samples", "--kid-subset", "1"), "--kid-subset must be at least 2"),
    (_eval("--generated", "GOOD/samples", "--kid-subset", "0"), "--kid-subset must be at least 2"),
    (_eval("--generated", "GOOD/samples", "--prdc-k", "0"), "--prdc-k must be at least 1"),
    (_eval("--generated", "GOOD/samples", "--interval-groups", "-1"), "--interval-groups must be at least 0"),
    (_eval("--generated", "BAD/nofile_samples"), "lacks the column(s) file"),
    (_eval("--generated", "BAD/escaping_samples"), "lies outside"),
    (_eval("--generated", "GOOD/samples", "--metrics", "xrv", "--xrv-weights", "BAD/evil.pt"), "is not plain tensors"),
    (_eval("--generated", "GOOD/samples", "--metrics", "xrv", "--xrv-weights", "BAD/nothing"), "does not exist"),
]


@pytest.mark.parametrize("args, message", BAD_INPUTS, ids=[f"{a[0]}-{i}" for i, (a, _) in enumerate(BAD_INPUTS)])
def test_bad_input_table(good, tmp_path, tiny_model_dir, capsys, args, message):
    root, bad = good
    step = next((bad / "edited").iterdir()).name
    swap = {"TINY": str(tiny_model_dir), "NEW": str(tmp_path / "new"), "EDITED": str(bad / "edited" / step),
            "TRUNCATED": str(bad / "truncated" / step)}
    argv = [swap.get(a, a.replace("GOOD/", f"{root}/").replace("BAD/", f"{bad}/")) for a in args]
    before = _snapshot(root)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], err
    assert _snapshot(root) == before
    assert not (bad / "payload-ran").exists()


def test_log_lines_show_under_the_notebook_cell_once(tmp_path):
    """The stages log their diagnostics; in a notebook they print under the cell (INFO too, which
    logging alone would drop), once however often the setup runs; outside a kernel nothing is added."""
    import logging

    from conftest import run_code_cell

    from cxr_helpers.core.logs import show_in_notebook

    import ipykernel  # noqa: F401  (papermill's process imports it too: importing it is not being a kernel)

    before = list(logging.getLogger("cxr_helpers").handlers)
    show_in_notebook()  # not in a kernel here
    assert logging.getLogger("cxr_helpers").handlers == before
    code = ("import logging\nfrom cxr_helpers.core.logs import show_in_notebook\nshow_in_notebook()\n"
            "show_in_notebook()\nlogging.getLogger('cxr_helpers.training.stage').info('train: a diagnostic')\n"
            "logging.getLogger('cxr_helpers.data').warning('a warning')")
    outputs = run_code_cell(tmp_path, code)
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert text == "train: a diagnostic\nwarning: a warning\n"


def test_the_kernel_relay_drops_only_the_kernels_noise(capsys):
    """What a kernel writes to stderr reaches ours, but for its transport warning and the line
    jupyter_client's pre-shutdown interrupt can cause."""
    import os

    from cxr_helpers.workflow.notebooks import _relay_stderr

    read_end, write_end = os.pipe()
    os.write(write_end, b"[IPKernelApp] WARNING | Kernel is running over TCP without encryption. ...\n"
                        b"[IPKernelApp] ERROR | KeyboardInterrupt caught in kernel.\n"
                        b"Traceback: something the notebook did\n")
    os.close(write_end)
    _relay_stderr(read_end)
    assert capsys.readouterr().err == "Traceback: something the notebook did\n"


@pytest.mark.parametrize("code", ["EPERM", "EACCES", "EROFS", "ENOSPC"])
def test_an_output_the_system_refuses_is_one_sentence_and_exit_2(code, monkeypatch, capsys):
    """A folder the user may not write (EPERM on some mounts, EACCES, read-only), or a full disk."""
    import errno

    import cxr_helpers.data.stage as prepare_stage

    def refused(*args, **kwargs):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)), "/mnt/out/pairs.csv")

    monkeypatch.setattr(prepare_stage, "prepare", refused)
    assert main(["prepare", "--data-dir", "x", "--out", "/mnt/out"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: could not write /mnt/out/pairs.csv ({os.strerror(getattr(errno, code))}); free space or "
                   "pass a writable --out\n")
