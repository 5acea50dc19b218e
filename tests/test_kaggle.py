import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cxr_helpers import kaggle
from cxr_helpers.errors import CxrError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("kaggle") / "build"
    kaggle.build(out, owner="jdoe", manifest_path=ROOT / "kaggle-metadata.json")
    return out


def test_manifest_and_notebooks_agree():
    manifest = kaggle.load_manifest(ROOT / "kaggle-metadata.json")
    kaggle.check_manifest(manifest, ROOT / "notebooks")  # raises when they disagree
    assert manifest["dataset_sources"] == ["raddar/chest-xrays-indiana-university"]
    gpu = {e["notebook"][:2]: e["gpu"] for e in manifest["notebooks"]}
    assert gpu["01"] is False and all(v for k, v in gpu.items() if k != "01")
    broken = {**manifest, "notebooks": manifest["notebooks"][:-1]}
    with pytest.raises(CxrError, match="not in the manifest: 0"):
        kaggle.check_manifest(broken, ROOT / "notebooks")


def test_built_folders_follow_kaggles_schema(built):
    info = json.loads((built / "build.json").read_text())
    dataset = json.loads((built / "helpers-dataset" / "dataset-metadata.json").read_text())
    assert dataset["id"] == "jdoe/cxr-lora-helpers" and dataset["licenses"]
    wheels = list((built / "helpers-dataset").glob("cxr_lora-*.whl"))
    assert len(wheels) == 1
    ids = []
    for name in info["order"][1:]:
        folder = built / name
        meta = json.loads((folder / "kernel-metadata.json").read_text())
        assert set(kaggle.KERNEL_FIELDS) <= set(meta)
        owner, slug = meta["id"].split("/")
        assert owner == "jdoe" and slug == kaggle.slugify(meta["title"]) == name
        assert (folder / meta["code_file"]).is_file() and meta["language"] == "python" and meta["kernel_type"] == "notebook"
        assert meta["dataset_sources"] == ["raddar/chest-xrays-indiana-university", dataset["id"]]
        assert all(source in ids for source in meta["kernel_sources"])  # built (and pushed) after its sources
        assert meta["enable_internet"] is True and meta["is_private"] is True
        if meta["enable_gpu"]:
            assert meta["machine_shape"] == "NvidiaTeslaP100"
        else:
            assert "machine_shape" not in meta
        nb = json.loads((folder / meta["code_file"]).read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert "".join(code[0]["source"]) == kaggle.INSTALL_CELL and "parameters" in code[1]["metadata"]["tags"]
        assert all(not c["outputs"] for c in code)
        ids.append(meta["id"])
    gallery = json.loads((built / "cxr-lora-03-sampling-gallery" / "kernel-metadata.json").read_text())
    assert gallery["kernel_sources"] == ["jdoe/cxr-lora-02-lora-fine-tuning"]  # 03 reads 02's LoRA
    scores = json.loads((built / "cxr-lora-04-evaluation" / "kernel-metadata.json").read_text())
    assert scores["kernel_sources"] == ["jdoe/cxr-lora-02-lora-fine-tuning"] and scores["enable_gpu"]


def test_t4x2_and_bad_owner(tmp_path):
    kaggle.build(tmp_path / "b", owner="jdoe", accelerator="t4x2", manifest_path=ROOT / "kaggle-metadata.json")
    meta = json.loads((tmp_path / "b" / "cxr-lora-02-lora-fine-tuning" / "kernel-metadata.json").read_text())
    assert meta["machine_shape"] == "NvidiaTeslaT4"
    with pytest.raises(CxrError, match="is not a Kaggle user name"):
        kaggle.build(tmp_path / "c", owner="j doe", manifest_path=ROOT / "kaggle-metadata.json")


def test_repository_notebooks_carry_the_same_install_cell():
    for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        nb = json.loads(path.read_text())
        first = next(c for c in nb["cells"] if c["cell_type"] == "code")
        assert "".join(first["source"]) == kaggle.INSTALL_CELL, path.name


def test_install_cell_installs_the_wheel_in_a_fresh_venv(built, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    kaggle_input = tmp_path / "input"
    (kaggle_input / "cxr-lora-helpers").mkdir(parents=True)
    wheel = next((built / "helpers-dataset").glob("cxr_lora-*.whl"))
    (kaggle_input / "cxr-lora-helpers" / wheel.name).write_bytes(wheel.read_bytes())
    # As on Kaggle: no checkout in sight; dependencies are Kaggle's own (not installed here).
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "KAGGLE_KERNEL_RUN_TYPE": "Batch",
           "CXR_KAGGLE_INPUT": str(kaggle_input), "PIP_NO_DEPS": "1", "PIP_NO_INDEX": "1"}
    done = subprocess.run([str(python), "-c", kaggle.INSTALL_CELL], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    check = subprocess.run([str(python), "-c", "import cxr_helpers, importlib.resources as r; print(cxr_helpers.__file__); "
                            "print(r.files('cxr_helpers').joinpath('assets/clip_bpe_merges.txt.gz').is_file())"],
                           cwd=tmp_path, env=env, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    where, asset = check.stdout.split()
    assert where.startswith(str(venv)) and asset == "True"
    again = subprocess.run([str(python), "-c", kaggle.INSTALL_CELL], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert again.returncode == 0  # a second run finds the package and does nothing


def test_push_dry_run_prints_the_commands_in_order(built, capsys):
    kaggle.push(built, dry_run=True)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("kaggle ")]
    assert lines[0].startswith("kaggle datasets version -p ") and lines[0].endswith("--dir-mode zip")
    assert [line.split()[-1].rsplit("/", 1)[-1] for line in lines[1:]] == [
        "cxr-lora-01-data-exploration", "cxr-lora-02-lora-fine-tuning", "cxr-lora-03-sampling-gallery",
        "cxr-lora-04-evaluation"]
    assert all(line.startswith("kaggle kernels push -p ") for line in lines[1:])


def test_push_creates_the_dataset_when_new_and_never_shows_the_token(built, monkeypatch, capsys):
    monkeypatch.setenv("KAGGLE_USERNAME", "jdoe")
    monkeypatch.setenv("KAGGLE_KEY", "s3cr3t-token")
    monkeypatch.setattr(kaggle.shutil, "which", lambda name: "/usr/bin/kaggle")
    calls = []
    def runner(command, **kwargs):
        calls.append(command)
        missing = command[:3] == ["kaggle", "datasets", "version"]
        return subprocess.CompletedProcess(command, 1 if missing else 0, "", "404 - Not Found" if missing else "")
    kaggle.push(built, runner=runner)
    assert [c[:3] for c in calls] == [["kaggle", "datasets", "version"], ["kaggle", "datasets", "create"]] + \
        [["kaggle", "kernels", "push"]] * 4
    assert "s3cr3t" not in capsys.readouterr().out and all("s3cr3t" not in " ".join(c) for c in calls)


def test_push_without_credentials_says_where_kaggle_json_goes(built, monkeypatch, tmp_path):
    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN", "KAGGLE_CONFIG_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(kaggle.shutil, "which", lambda name: "/usr/bin/kaggle")
    with pytest.raises(CxrError, match="no Kaggle credentials: .*kaggle.json in ~/.kaggle/"):
        kaggle.push(built, runner=lambda *a, **k: pytest.fail("ran without credentials"))


def test_push_refuses_the_placeholder_owner(tmp_path):
    kaggle.build(tmp_path / "b", manifest_path=ROOT / "kaggle-metadata.json")
    with pytest.raises(CxrError, match="placeholder owner; rebuild with --owner"):
        kaggle.push(tmp_path / "b", dry_run=True)


def test_on_kaggle_defaults_resolve_to_inputs_and_working(monkeypatch, tmp_path):
    from cxr_helpers import data, io, notebook

    kaggle_input = tmp_path / "input"
    iu = kaggle_input / "datasets" / "raddar" / "chest-xrays-indiana-university"
    iu.mkdir(parents=True)
    (iu / "indiana_reports.csv").write_text("uid,impression\n")
    lora = kaggle_input / "cxr-lora-02-lora-fine-tuning" / "cxr-lora" / "train" / "lora"
    lora.mkdir(parents=True)
    (lora / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    monkeypatch.setattr(io, "KAGGLE_INPUT", kaggle_input)
    monkeypatch.setattr(data, "KAGGLE_INPUT", kaggle_input)
    monkeypatch.setattr(data, "KAGGLE_DATA_DIR", tmp_path / "not-mounted-here")
    assert data.default_data_dir() == iu  # wherever Kaggle mounted the dataset
    assert notebook.output_dir() == Path("/kaggle/working/cxr-lora")
    inputs = notebook.Inputs(preset=None, data_dir=iu, model="m", out=tmp_path / "working")
    assert notebook.trained_lora(inputs) == lora  # notebook 02's output, attached as a kernel source
