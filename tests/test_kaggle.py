import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cxr_helpers.workflow import kaggle
from cxr_helpers.core.errors import CxrError

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
        assert ((folder / meta["code_file"]).is_file() and meta["language"] == "python"
                and meta["kernel_type"] == "notebook")
        assert meta["dataset_sources"] == ["raddar/chest-xrays-indiana-university", dataset["id"]]
        assert all(source in ids for source in meta["kernel_sources"])  # built (and pushed) after its sources
        assert meta["enable_internet"] is True and meta["is_private"] is True
        if meta["enable_gpu"]:
            assert meta["machine_shape"] == "NvidiaTeslaT4"  # Kaggle's GPU T4 x2, the manifest's default
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


def test_retired_accelerator_and_bad_owner_are_refused(tmp_path):
    with pytest.raises(CxrError, match=r"asks for NvidiaTeslaP100, which Kaggle has retired \(Sessions run on the "
                                       r"default GPU \(NvidiaTeslaT4\) instead.\); use t4x2"):
        kaggle.build(tmp_path / "b", owner="jdoe", accelerator="p100", manifest_path=ROOT / "kaggle-metadata.json")
    assert not (tmp_path / "b").exists()
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
           "CXR_KAGGLE_ROOT": str(tmp_path), "PIP_NO_DEPS": "1", "PIP_NO_INDEX": "1"}
    done = subprocess.run([str(python), "-c", kaggle.INSTALL_CELL], cwd=tmp_path, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    check = subprocess.run([str(python), "-c", "import cxr_helpers, importlib.resources as r; "
                            "print(cxr_helpers.__file__); "
                            "print(r.files('cxr_helpers').joinpath('assets/clip_bpe_merges.txt.gz').is_file())"],
                           cwd=tmp_path, env=env, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    where, asset = check.stdout.split()
    assert where.startswith(str(venv)) and asset == "True"
    again = subprocess.run([str(python), "-c", kaggle.INSTALL_CELL], cwd=tmp_path, env=env, capture_output=True,
                           text=True)
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
    kaggle.push(built, runner=runner, wait=False)
    assert [c[:3] for c in calls] == [["kaggle", "--version"], ["kaggle", "datasets", "version"],
                                     ["kaggle", "datasets", "create"]] + [["kaggle", "kernels", "push"]] * 4
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
    from cxr_helpers.data import tables
    from cxr_helpers.workflow import notebooks as notebook
    from cxr_helpers.core import environment

    kaggle_input = tmp_path / "input"
    iu = kaggle_input / "datasets" / "raddar" / "chest-xrays-indiana-university"
    iu.mkdir(parents=True)
    (iu / "indiana_reports.csv").write_text("uid,impression\n")
    lora = kaggle_input / "cxr-lora-02-lora-fine-tuning" / "cxr-lora" / "train" / "lora"
    lora.mkdir(parents=True)
    (lora / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    # An attached notebook output can hold a synthetic export in the same layout: not the dataset.
    export = kaggle_input / "cxr-lora-03-sampling-gallery" / "cxr-lora" / "export" / "dataset"
    (export / "images").mkdir(parents=True)
    (export / "indiana_reports.csv").write_text("uid,impression\n")
    (export / "synthetic_manifest.json").write_text("{}")
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    monkeypatch.setenv("CXR_KAGGLE_ROOT", str(tmp_path))
    assert tables.default_data_dir() == iu  # wherever Kaggle mounted the dataset
    assert notebook.output_dir() == tmp_path / "working" / "cxr-lora"
    inputs = notebook.Inputs(preset=None, data_dir=iu, model="m", out=tmp_path / "working", cache=tmp_path / "c")
    assert notebook.trained_lora(inputs) == lora  # notebook 02's output, attached as a kernel source
    assert environment.cache_root(inputs.out) != inputs.out / "cache"  # on Kaggle the cache stays out of the output


class FakeKaggle:
    """The kaggle CLI as a runner: statuses advance one poll at a time."""

    def __init__(self, dataset=("pending", "ready"), kernel02=("queued", "running", "complete")):
        self.dataset, self.kernel02, self.calls = list(dataset), list(kernel02), []

    def __call__(self, command, **kwargs):
        self.calls.append(command)
        out = ""
        if command[1:3] == ["datasets", "status"]:
            out = self.dataset.pop(0) if len(self.dataset) > 1 else self.dataset[0]
        elif command[1:3] == ["kernels", "status"]:
            state = self.kernel02.pop(0) if len(self.kernel02) > 1 else self.kernel02[0]
            out = f'{command[3]} has status "KernelWorkerStatus.{state.upper()}"'
        return subprocess.CompletedProcess(command, 0, out, "")


@pytest.fixture
def credentials(monkeypatch):
    monkeypatch.setenv("KAGGLE_USERNAME", "jdoe")
    monkeypatch.setenv("KAGGLE_KEY", "placeholder")
    monkeypatch.setattr(kaggle.shutil, "which", lambda name: "/usr/bin/kaggle")


def test_push_waits_for_the_dataset_and_for_02_before_03_and_04(built, credentials, capsys):
    fake = FakeKaggle()
    kaggle.push(built, runner=fake, sleep=lambda s: None)
    steps = [" ".join(c[1:3]) + (" " + c[-1].rsplit("/", 1)[-1] if c[1:3] != ["datasets", "version"] else "")
             for c in fake.calls[1:]]
    assert steps == ["datasets version", "datasets status cxr-lora-helpers", "datasets status cxr-lora-helpers",
                     "kernels push cxr-lora-01-data-exploration", "kernels push cxr-lora-02-lora-fine-tuning",
                     "kernels status cxr-lora-02-lora-fine-tuning", "kernels status cxr-lora-02-lora-fine-tuning",
                     "kernels status cxr-lora-02-lora-fine-tuning", "kernels push cxr-lora-03-sampling-gallery",
                     "kernels status cxr-lora-02-lora-fine-tuning", "kernels push cxr-lora-04-evaluation"]
    assert "waiting for notebook jdoe/cxr-lora-02-lora-fine-tuning: complete" in capsys.readouterr().out


def test_push_stops_when_02_fails_or_takes_too_long(built, credentials):
    failed = FakeKaggle(kernel02=("running", "error"))
    with pytest.raises(CxrError, match="cxr-lora-02-lora-fine-tuning ended with status 'error'"
                                       ".*push the rest with --only"):
        kaggle.push(built, runner=failed, sleep=lambda s: None)
    assert not any("cxr-lora-03" in c[-1] for c in failed.calls if c[1:3] == ["kernels", "push"])
    slow, now = FakeKaggle(kernel02=("running",)), [0.0]
    with pytest.raises(CxrError, match="gave up waiting for notebook .*02.* after 3 min"):  # a clock the sleeps move
        kaggle.push(built, runner=slow, sleep=lambda s: now.__setitem__(0, now[0] + s), clock=lambda: now[0],
                    timeout_s=180, poll_s=60)
    only = FakeKaggle()
    kaggle.push(built, runner=only, sleep=lambda s: None, only=["03", "04"])
    pushed = [c[-1].rsplit("/", 1)[-1] for c in only.calls if c[1:3] == ["kernels", "push"]]
    assert pushed == ["cxr-lora-03-sampling-gallery", "cxr-lora-04-evaluation"]


def test_push_says_what_the_kaggle_cli_lacks(built, credentials):
    def no_six(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "Traceback ...\nModuleNotFoundError: No module named 'six'")
    with pytest.raises(CxrError, match=r"needs the Python module 'six', which it does not declare; `pip install six`"):
        kaggle.push(built, runner=no_six)


def test_our_retired_shapes_are_the_official_clis(built):
    api = pytest.importorskip("kaggle.api.kaggle_api_extended",
                              reason="the official kaggle CLI (test extra) is not installed")
    for _, (shape, instead) in kaggle.RETIRED_SHAPES.items():
        assert api._RETIRED_ACCELERATORS[shape.lower()] == instead
    assert kaggle.MACHINE_SHAPES["t4x2"].lower() not in api._RETIRED_ACCELERATORS


@pytest.fixture
def fake_kaggle_endpoint():
    """A stand-in for api.kaggle.com on localhost (the CLI's KAGGLE_API_ENVIRONMENT=LOCALHOST):
    it records what the CLI sends and answers 503, so nothing leaves this machine."""
    import http.server
    import threading

    received = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            received.append((self.path, json.loads(body or b"{}")))
            self.send_response(503)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"message": "offline rehearsal"}')

        def log_message(self, *args):
            pass

    try:
        server = http.server.HTTPServer(("127.0.0.1", 80), Handler)
    except OSError as exc:
        pytest.skip(f"cannot listen on localhost:80 for the kaggle CLI's LOCALHOST endpoint ({exc})")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield received
    server.shutdown()
    server.server_close()


def _official_cli(args, cwd, tmp_path):
    if not Path(sys.executable).with_name("kaggle").is_file():
        pytest.skip("the official kaggle CLI (test extra) is not installed")
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "KAGGLE_USERNAME": "jdoe", "KAGGLE_KEY": "placeholder",
           "KAGGLE_API_ENVIRONMENT": "LOCALHOST"}
    return subprocess.run([str(Path(sys.executable).with_name("kaggle")), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_official_cli_accepts_what_build_renders(built, fake_kaggle_endpoint, tmp_path):
    """The kaggle CLI's own checks run on every rendered folder; it gets as far as the network
    call, with no warning about the metadata, and sends what the manifest says."""
    for name in json.loads((built / "build.json").read_text())["order"][1:]:
        done = _official_cli(["kernels", "push", "-p", name], built, tmp_path)
        said = done.stdout + done.stderr
        assert "503 Server Error" in said, said  # the request reached the (stand-in) server
        for warning in ("retired", "does not resolve", "Invalid", "must be specified", "not found"):
            assert warning not in said, said
    requests = [body for path, body in fake_kaggle_endpoint if path.endswith("KernelsApiService/SaveKernel")]
    assert ([r["slug"] for r in requests]
            == [f"jdoe/{n}" for n in json.loads((built / "build.json").read_text())["order"][1:]])
    gpu = [r for r in requests if r.get("enableGpu")]
    assert len(gpu) == 3 and all(r["machineShape"] == "NvidiaTeslaT4" for r in gpu)
    assert all("jdoe/cxr-lora-helpers" in r["datasetDataSources"] for r in requests)
    done = _official_cli(["datasets", "version", "-p", "helpers-dataset", "-m", "test", "--dir-mode", "zip"], built,
                         tmp_path)
    assert "503 Server Error" in done.stdout + done.stderr and "Traceback" not in done.stderr
    assert any(path.endswith("StartBlobUpload") for path, _ in fake_kaggle_endpoint)


def test_the_official_cli_would_warn_about_a_retired_card(built, fake_kaggle_endpoint, tmp_path):
    """The check above can fail: the same CLI on a folder asking for the P100 warns."""
    folder = tmp_path / "p100"
    shutil.copytree(built / "cxr-lora-02-lora-fine-tuning", folder)
    meta = json.loads((folder / "kernel-metadata.json").read_text())
    (folder / "kernel-metadata.json").write_text(json.dumps({**meta, "machine_shape": "NvidiaTeslaP100"}))
    done = _official_cli(["kernels", "push", "-p", str(folder)], built, tmp_path)
    assert "'NvidiaTeslaP100' is retired" in done.stdout + done.stderr
