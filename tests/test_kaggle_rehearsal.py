"""The acceptance test: the suite run the way a Kaggle user runs it, offline.

A Kaggle file system is laid out in a temporary folder (moved there with CXR_KAGGLE_ROOT): per
kernel a fresh `working/` and an `input/` holding what its kernel-metadata.json attaches (the
IU dataset in the exact Kaggle layout, the helpers dataset with the wheel `kaggle build` made,
earlier kernels' outputs), mounted nested as Kaggle now does. The tiny model sits in a Hugging
Face cache under SD1.5's real hub id (offline mode), so the real `from_pretrained(hub_id)` path
runs. Each notebook, as `kaggle build` rendered it, runs in a fresh Python environment that does
not have the helpers until the notebook's first cell installs them from the wheel, with its
committed default parameters except size knobs (steps and counts). A second session of notebook
02 resumes from the first session's attached output.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OWNER = "rehearsal"
# Size knobs only: everything else is what the notebooks commit.
SIZE = {
    "01_data_exploration.ipynb": {},
    "02_lora_finetune.ipynb": {"MAX_STEPS": 6, "BATCH_SIZE": 2, "CHECKPOINT_EVERY": 3, "VALIDATION_SEEDS": [0]},
    "03_sampling_gallery.ipynb": {"STEPS": 4, "N_GALLERY": 2, "EXPORT_COUNT": 1},
    "04_evaluation.ipynb": {"N_PROMPTS": 6, "FID_INTERVAL_GROUPS": 5},
}


def kaggle_python(where: Path) -> Path:
    """A fresh environment that sees this one's libraries (torch, diffusers, ...) but not the
    helpers, as a Kaggle image has its libraries and not ours."""
    venv.create(where, with_pip=False)
    ours = Path(sysconfig.get_paths()["purelib"])
    libraries = where / "libraries"
    libraries.mkdir()
    for entry in ours.iterdir():
        if entry.name.startswith(("cxr_lora", "__editable__", "cxr_helpers")) or entry.suffix == ".pth":
            continue
        (libraries / entry.name).symlink_to(entry)
    site = Path(next(where.glob("lib/python3*/site-packages")))
    (site / "kaggle-image.pth").write_text(f"{libraries}\n")
    return where / "bin" / "python"


def kernel_spec(jupyter_dir: Path, name: str, python: Path) -> None:
    spec = jupyter_dir / "kernels" / name
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": name, "language": "python"}))


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


class KaggleRehearsal:
    def __init__(self, root: Path, build: Path, dataset: Path, env: dict[str, str]):
        self.root, self.build, self.dataset, self.env = root, build, dataset, env
        self.outputs: dict[str, Path] = {}  # kernel id -> its session's /kaggle/working
        self.sessions = 0

    def kernel(self, notebook: str) -> tuple[Path, dict]:
        info = json.loads((self.build / "build.json").read_text())
        for name in info["order"]:
            meta_path = self.build / name / "kernel-metadata.json"
            if meta_path.is_file() and json.loads(meta_path.read_text())["code_file"] == notebook:
                return self.build / name, json.loads(meta_path.read_text())
        raise AssertionError(f"{notebook} was not built")

    def run(self, notebook: str, attach: dict[str, Path] | None = None, **parameters):
        """One Kaggle session of one kernel; returns (working dir, executed notebook)."""
        import papermill

        folder, meta = self.kernel(notebook)
        self.sessions += 1
        session = self.root / f"session-{self.sessions}-{notebook[:2]}"
        inputs, working, tmp = session / "kaggle" / "input", session / "kaggle" / "working", session / "tmp"
        working.mkdir(parents=True)
        tmp.mkdir()
        for source in meta["dataset_sources"]:
            owner, slug = source.split("/")
            target = inputs / "datasets" / owner / slug
            shutil.copytree(self.dataset if slug == "chest-xrays-indiana-university"
                            else self.build / "helpers-dataset", target)
        for source in meta["kernel_sources"]:
            owner, slug = source.split("/")
            shutil.copytree((attach or {}).get(source) or self.outputs[source], inputs / "notebooks" / owner / slug)
        before = snapshot(inputs)
        python = kaggle_python(session / "env")
        kernel_spec(Path(self.env["JUPYTER_PATH"]), f"kaggle-{self.sessions}", python)
        env = {**self.env, "CXR_KAGGLE_ROOT": str(session / "kaggle"), "TMPDIR": str(tmp)}
        saved = dict(os.environ)
        os.environ.update(env)
        os.environ.pop("PYTHONPATH", None)  # a Kaggle kernel sees only its image's libraries and the wheel
        try:
            executed = session / notebook
            papermill.execute_notebook(str(folder / notebook), str(executed),
                                       parameters={**SIZE[notebook], **parameters},
                                       kernel_name=f"kaggle-{self.sessions}", cwd=str(working), progress_bar=False,
                                       execution_timeout=600)
        finally:
            os.environ.clear()
            os.environ.update(saved)
        assert snapshot(inputs) == before, f"{notebook} changed its read-only inputs"
        self.outputs[meta["id"]] = working
        return working, executed


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory, tiny_model_dir):
    from cxr_helpers.workflow import kaggle
    from cxr_helpers.config.stages import SynthConfig
    from cxr_helpers.config.presets import SD15_MODEL_ID
    from cxr_helpers.evaluation.features import INCEPTION_WEIGHTS_FILE
    from stand_ins import random_inception_weights
    from cxr_helpers.demo.synthetic_dataset import make_synthetic_dataset

    root = tmp_path_factory.mktemp("kaggle")
    build = root / "build"
    kaggle.build(build, owner=OWNER, manifest_path=ROOT / "kaggle-metadata.json")
    dataset = make_synthetic_dataset(SynthConfig(out=str(root / "iu" / "chest-xrays-indiana-university"), reports=60,
                                                 image_size=256, broken_images=2), progress=False)
    # SD1.5 as the hub client leaves it in its cache: the real from_pretrained(hub id) path runs offline.
    repo = root / "hf" / "hub" / ("models--" + SD15_MODEL_ID.replace("/", "--"))
    shutil.copytree(tiny_model_dir, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    # The Inception FID weights where torch-fidelity's download would have put them (random values).
    random_inception_weights(root / "torch" / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILE)
    env = {"KAGGLE_KERNEL_RUN_TYPE": "Batch", "HF_HOME": str(root / "hf"), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "CXR_OFFLINE": "1", "TORCH_HOME": str(root / "torch"),
           "JUPYTER_PATH": str(root / "jupyter"), "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    old_umask = os.umask(0o022)
    try:
        yield KaggleRehearsal(root, build, dataset, env)
    finally:
        os.umask(old_umask)


def _record(working: Path, notebook: str) -> dict:
    return json.loads((working / "cxr-lora" / "records" / f"{notebook}.json").read_text())


def _assert_ran(executed: Path) -> None:
    import nbformat

    nb = nbformat.read(executed, as_version=4)
    assert nb.metadata["papermill"]["exception"] in (None, False)
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "unknown preset" not in text and "Traceback" not in text


def _results_only(working: Path) -> None:
    """What Kaggle publishes as the notebook's output: results, no caches, readable modes."""
    files = [p for p in working.rglob("*") if p.is_file()]
    assert files and not [p for p in files if "cache" in p.relative_to(working).parts], "a cache landed in the output"
    modes = {oct(stat.S_IMODE(p.stat().st_mode)) for p in files
             if p.suffix in (".csv", ".json", ".png", ".safetensors")}
    assert modes == {oct(0o644)}, f"output files are not created with the umask's mode: {modes}"


def test_the_four_notebooks_run_as_kaggle_runs_them(rehearsal):
    from safetensors.torch import load_file

    # 01: CPU kernel, the dataset and the helpers attached.
    working01, executed = rehearsal.run("01_data_exploration.ipynb")
    _assert_ran(executed)
    rec = _record(working01, "01_data_exploration")
    assert rec["pairs"] > 50 and rec["patients_on_both_sides"] == 0
    _results_only(working01)

    # 02, first session: trains 6 steps with a checkpoint at step 3.
    working02, executed = rehearsal.run("02_lora_finetune.ipynb")
    _assert_ran(executed)
    config = json.loads((working02 / "cxr-lora" / "train" / "lora" / "config.json").read_text())
    assert config["config"]["model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"  # the preset's hub id
    train_config = json.loads((working02 / "cxr-lora" / "train" / "train_config.json").read_text())
    # sd15: no GPU
    assert train_config["config"]["max_steps"] == 6 and train_config["config"]["mixed_precision"] == "no"
    uninterrupted = load_file(str(working02 / "cxr-lora" / "train" / "lora" / "pytorch_lora_weights.safetensors"))
    _results_only(working02)

    # 02, second session: the first one "ended" after its step-3 checkpoint (what its output holds
    # when Kaggle's session limit cuts it); attached as an input, RESUME = "latest" continues it.
    cut = rehearsal.root / "cut-session"
    shutil.copytree(working02, cut)
    shutil.rmtree(cut / "cxr-lora" / "train" / "lora")
    for checkpoint in sorted((cut / "cxr-lora" / "train" / "checkpoints").glob("step-*"))[1:]:
        shutil.rmtree(checkpoint)
    assert [p.name for p in (cut / "cxr-lora" / "train" / "checkpoints").iterdir()] == ["step-0000003"]
    nb02 = f"{OWNER}/cxr-lora-02-lora-fine-tuning"

    meta02 = json.loads((rehearsal.build / "cxr-lora-02-lora-fine-tuning" / "kernel-metadata.json").read_text())
    meta02["kernel_sources"] = [nb02]  # the user attaches the earlier output (Add Input > Your Work)
    (rehearsal.build / "cxr-lora-02-lora-fine-tuning" / "kernel-metadata.json").write_text(json.dumps(meta02))
    try:
        resumed_dir, executed = rehearsal.run("02_lora_finetune.ipynb", attach={nb02: cut}, RESUME="latest")
    finally:
        meta02["kernel_sources"] = []
        (rehearsal.build / "cxr-lora-02-lora-fine-tuning" / "kernel-metadata.json").write_text(json.dumps(meta02))
    _assert_ran(executed)
    text = executed.read_text()
    assert "continuing an earlier session's run" in text
    loss = (resumed_dir / "cxr-lora" / "train" / "loss.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in loss[1:]] == ["1", "2", "3", "4", "5", "6"]  # each step once
    resumed = load_file(str(resumed_dir / "cxr-lora" / "train" / "lora" / "pytorch_lora_weights.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    assert all((resumed[k] == uninterrupted[k]).all()
               for k in resumed), "the resumed run did not reach the same weights"
    _results_only(resumed_dir)

    # 03 and 04 read 02's output (its latest version: the resumed session) as an attached input.
    working03, executed = rehearsal.run("03_sampling_gallery.ipynb")
    _assert_ran(executed)
    rec = _record(working03, "03_sampling_gallery")
    assert "/input/" in rec["lora_dir"] and rec["gallery_rows"] == 2 and rec["widget_images"] == 4
    _results_only(working03)

    working04, executed = rehearsal.run("04_evaluation.ipynb")
    _assert_ran(executed)
    rec = _record(working04, "04_evaluation")
    assert rec["feature_network"].startswith("Inception") or "inception" in rec["feature_network"].lower()
    assert set(rec["fid"]) == {"base", "fine-tuned", "real train (floor)"}
    # offline: skipped, said
    assert any("xrv" in note.lower() or "torchxrayvision" in note.lower() for note in rec["notes"])
    samples = working04 / "cxr-lora" / "eval" / "samples" / "fine-tuned"
    import pandas as pd

    assert len(pd.read_csv(samples / "metadata.csv")) == 12  # N_PROMPTS 6 x the default N_PER_PROMPT 2
    # The test split is the one the LoRA never saw: 04 evaluated on 02's own pairs.
    pairs02 = pd.read_csv(resumed_dir / "cxr-lora" / "data" / "pairs.csv")
    test_prompts = set(pairs02.loc[pairs02["split"] == "test", "prompt"])
    assert set(pd.read_csv(samples / "metadata.csv")["prompt"]) <= test_prompts
    _results_only(working04)
