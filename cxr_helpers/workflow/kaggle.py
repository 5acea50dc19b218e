"""Kaggle: one manifest (kaggle-metadata.json) -> one kernel folder per notebook plus one
dataset folder carrying the helper package as a wheel; and the push through the official CLI.

    python -m cxr_helpers kaggle build --out DIR [--owner USER] [--accelerator t4x2]
    python -m cxr_helpers kaggle push --dir DIR [--dry-run] [--no-wait] [--only 03 04]
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..core.errors import CxrError
from ..core.files import read_user_json, write_json
from ..core.layout import KAGGLE_BUILD_JSON

REPO_ROOT = Path(__file__).resolve().parents[2]
MANIFEST = "kaggle-metadata.json"
OWNER_PLACEHOLDER = "YOUR_KAGGLE_USERNAME"
MACHINE_SHAPES = {"t4x2": "NvidiaTeslaT4"}  # Kaggle's "GPU T4 x2"
# Shapes Kaggle retired, with its own words (the official CLI's _RETIRED_ACCELERATORS): a push that
# asks for one still runs, on another card, so it is refused here rather than mislabelled.
RETIRED_SHAPES = {"p100": ("NvidiaTeslaP100", "Sessions run on the default GPU (NvidiaTeslaT4) instead.")}
KERNEL_FIELDS = ("id", "title", "code_file", "language", "kernel_type", "is_private", "enable_gpu", "enable_tpu",
                 "enable_internet", "dataset_sources", "competition_sources", "kernel_sources", "model_sources")
HELPERS_DIR = "helpers-dataset"

# The first code cell of every published notebook: installs the helpers (no sys.path hacks).
INSTALL_CELL = '''\
# Install the cxr-lora helpers once: on Kaggle from the attached helpers dataset's wheel, elsewhere from this
# checkout. Then, before torch is imported, check that it can drive this GPU (an older card gets the CUDA 12.6
# build of torch).
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

if importlib.util.find_spec("cxr_helpers") is None:
    wheels = sorted((Path(os.environ.get("CXR_KAGGLE_ROOT") or "/kaggle") / "input").glob("**/cxr_lora-*.whl"))
    checkout = next((p for p in [Path.cwd(), *Path.cwd().parents]
                     if (p / "cxr_helpers").is_dir() and (p / "pyproject.toml").is_file()), None)
    if not wheels and checkout is None:
        raise RuntimeError("cxr_helpers is not installed: attach the cxr-lora helpers dataset (Kaggle) "
                           "or run from the repository")
    target = f"{wheels[-1]}[kaggle]" if wheels else str(checkout)  # [kaggle]: torch-fidelity, torchxrayvision
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", target], check=True)
subprocess.run([sys.executable, "-m", "cxr_helpers", "check-gpu", "--fix"], check=True)'''


def slugify(title: str) -> str:
    """Kaggle's slug for a title: lower case, runs of other characters -> one hyphen."""
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def find_root() -> Path:
    """The checkout: the current folder when it holds the manifest, else this package's parent."""
    return Path.cwd() if (Path.cwd() / MANIFEST).is_file() else REPO_ROOT


def load_manifest(path: str | Path | None = None) -> dict:
    path = Path(path) if path else find_root() / MANIFEST
    manifest = read_user_json(path, "manifest", f"run from the repository root (it holds {MANIFEST})")
    for key in ("owner", "dataset_sources", "helpers_dataset", "notebooks"):
        if key not in manifest:
            raise CxrError(f"{path} lacks {key!r}; see the README's Kaggle section for the fields")
    return manifest


def check_manifest(manifest: dict, notebooks_dir: Path) -> None:
    """Every notebook in notebooks/ is in the manifest and every entry is a notebook."""
    listed = [entry["notebook"] for entry in manifest["notebooks"]]
    present = sorted(p.name for p in notebooks_dir.glob("[0-9][0-9]_*.ipynb"))
    missing, extra = sorted(set(present) - set(listed)), sorted(set(listed) - set(present))
    if missing or extra:
        raise CxrError("kaggle-metadata.json and notebooks/ disagree: "
                       + (f"not in the manifest: {', '.join(missing)}; " if missing else "")
                       + (f"listed but not in notebooks/: {', '.join(extra)}; " if extra else "")
                       + "add or remove the entries")
    slugs = {e["notebook"]: slugify(e["title"]) for e in manifest["notebooks"]}
    for entry in manifest["notebooks"]:
        for source in entry.get("reads_outputs_of", []):
            if source not in slugs:
                raise CxrError(f"{entry['notebook']} reads the outputs of {source}, which is not in the manifest")


def build_wheel(out_dir: Path, root: Path | None = None) -> Path:
    """The helper package as a wheel (pip wheel of the checkout, no dependencies)."""
    root = root or find_root()
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("cxr_lora-*.whl"):
        old.unlink()
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp, str(root)]
        done = subprocess.run(command + ["--no-build-isolation"], capture_output=True, text=True)
        if done.returncode:  # no setuptools here: let pip fetch the build backend
            done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise CxrError(f"could not build the helpers wheel (pip wheel exit {done.returncode}: "
                           f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'no message'})")
        wheel = next(Path(tmp).glob("cxr_lora-*.whl"))
        return Path(shutil.copy2(wheel, out_dir / wheel.name))


def publishable(notebook_path: Path) -> dict:
    """The notebook as published: outputs cleared, its first code cell the install cell (the
    repository's notebooks carry it, so they run the same everywhere)."""
    nb = json.loads(notebook_path.read_text(encoding="utf-8"))
    code = [cell for cell in nb["cells"] if cell["cell_type"] == "code"]
    if not code or "".join(code[0]["source"]) != INSTALL_CELL:
        raise CxrError(f"{notebook_path.name} does not start with the helpers' install cell; copy "
                       "cxr_helpers.workflow.kaggle.INSTALL_CELL into its first code cell")
    for cell in code:
        cell["outputs"], cell["execution_count"] = [], None
    return nb


def kernel_metadata(entry: dict, manifest: dict, owner: str, accelerator: str) -> dict:
    title = entry["title"]
    slugs = {e["notebook"]: slugify(e["title"]) for e in manifest["notebooks"]}
    helpers = f"{owner}/{slugify(manifest['helpers_dataset']['title'])}"
    meta = {
        "id": f"{owner}/{slugify(title)}",
        "title": title,
        "code_file": entry["notebook"],
        "language": "python",
        "kernel_type": "notebook",
        "is_private": bool(manifest.get("private", True)),
        "enable_gpu": bool(entry.get("gpu", False)),
        "enable_tpu": False,
        "enable_internet": bool(entry.get("internet", True)),
        "dataset_sources": list(manifest["dataset_sources"]) + [helpers],
        "competition_sources": [],
        "kernel_sources": [f"{owner}/{slugs[name]}" for name in entry.get("reads_outputs_of", [])],
        "model_sources": [],
    }
    if meta["enable_gpu"]:
        meta["machine_shape"] = MACHINE_SHAPES[accelerator]
    return meta


def build(out: str | Path, owner: str | None = None, accelerator: str | None = None,
          manifest_path: str | Path | None = None, notebooks_dir: str | Path | None = None) -> list[Path]:
    """Render DIR/<kernel-slug>/ (kernel-metadata.json + notebook) per notebook, in order, and
    DIR/helpers-dataset/ (dataset-metadata.json + the wheel). Returns the folders, dataset first."""
    manifest = load_manifest(manifest_path)
    root = Path(manifest_path).parent if manifest_path else find_root()
    notebooks_dir = Path(notebooks_dir) if notebooks_dir else root / "notebooks"
    check_manifest(manifest, notebooks_dir)
    owner = owner or manifest["owner"]
    if not re.fullmatch(r"[A-Za-z0-9_-]+", owner or ""):
        raise CxrError(f"--owner {owner!r} is not a Kaggle user name (letters, digits, - and _)")
    accelerator = accelerator or manifest.get("accelerator", "t4x2")
    if accelerator in RETIRED_SHAPES:
        shape, instead = RETIRED_SHAPES[accelerator]
        raise CxrError(f"accelerator {accelerator!r} asks for {shape}, which Kaggle has retired ({instead}); "
                       f"use t4x2 (\"accelerator\" in {MANIFEST}, or --accelerator t4x2)")
    if accelerator not in MACHINE_SHAPES:
        raise CxrError(f"--accelerator {accelerator!r} is not known; use {', '.join(MACHINE_SHAPES)}")
    out = Path(out)
    folders = []
    helpers = out / HELPERS_DIR
    wheel = build_wheel(helpers, root)
    write_json(helpers / "dataset-metadata.json", {
        "title": manifest["helpers_dataset"]["title"],
        "id": f"{owner}/{slugify(manifest['helpers_dataset']['title'])}",
        "subtitle": manifest["helpers_dataset"].get("subtitle", ""),
        "description": f"The cxr_helpers package ({wheel.name}) for the cxr-lora notebooks; "
                       "each notebook's first cell installs it from here.",
        "licenses": [{"name": manifest["helpers_dataset"].get("license", "MIT")}],
    })
    folders.append(helpers)
    for entry in manifest["notebooks"]:
        folder = out / slugify(entry["title"])
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / entry["notebook"], publishable(notebooks_dir / entry["notebook"]))
        write_json(folder / "kernel-metadata.json", kernel_metadata(entry, manifest, owner, accelerator))
        folders.append(folder)
    write_json(out / KAGGLE_BUILD_JSON, {"owner": owner, "accelerator": accelerator,
                                    "order": [f.name for f in folders], "wheel": wheel.name})
    return folders


def credentials_present() -> bool:
    """Whether the kaggle CLI will find credentials (never reads or prints the token itself)."""
    if os.environ.get("KAGGLE_API_TOKEN") or (os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY")):
        return True
    folders = [Path(os.environ["KAGGLE_CONFIG_DIR"])] if os.environ.get("KAGGLE_CONFIG_DIR") else []
    folders += [Path.home() / ".kaggle", Path.home() / ".config" / "kaggle"]
    return any((f / name).is_file() for f in folders for name in ("kaggle.json", "access_token"))


def read_build(build_dir: str | Path) -> dict:
    build_dir = Path(build_dir)
    info_path = build_dir / KAGGLE_BUILD_JSON
    if not info_path.is_file():
        raise CxrError(f"{build_dir} is not a build folder (no {KAGGLE_BUILD_JSON}); "
                       f"run `python -m cxr_helpers kaggle build --out {build_dir}` first")
    info = json.loads(info_path.read_text())
    if info["owner"] == OWNER_PLACEHOLDER:
        raise CxrError(f"the build in {build_dir} has the placeholder owner; rebuild with --owner YOUR_KAGGLE_USERNAME")
    return info


def kernel_folders(build_dir: Path, info: dict, only: list[str] | None = None) -> list[tuple[Path, dict]]:
    """(folder, kernel-metadata) per notebook, in notebook order; `only`: notebook prefixes."""
    folders = []
    for name in info["order"]:
        if name == HELPERS_DIR:
            continue
        meta = json.loads((build_dir / name / "kernel-metadata.json").read_text())
        if not only or any(meta["code_file"].startswith(prefix) for prefix in only):
            folders.append((build_dir / name, meta))
    return folders


def push_commands(build_dir: str | Path, only: list[str] | None = None) -> list[list[str]]:
    """The kaggle CLI calls, in order: the helpers dataset (version, or create when new), then
    every kernel in notebook order."""
    build_dir = Path(build_dir)
    info = read_build(build_dir)
    helpers = build_dir / HELPERS_DIR
    commands = [["kaggle", "datasets", "version", "-p", str(helpers), "-m", f"helpers {info['wheel']}",
                 "--dir-mode", "zip"]]
    commands += [["kaggle", "kernels", "push", "-p", str(folder)]
                 for folder, _ in kernel_folders(build_dir, info, only)]
    return commands


def parse_status(output: str) -> str:
    """'owner/slug has status "KernelWorkerStatus.COMPLETE"' (or "complete", or a dataset's
    plain "ready") -> "complete" / "ready" / ..."""
    found = re.search(r'has status "([^"]+)"', output)
    text = found.group(1) if found else (output.strip().splitlines() or [""])[-1]
    return text.strip().rsplit(".", 1)[-1].lower()


FINISHED = {"complete"}
FAILED = {"error", "cancelrequested", "cancelacknowledged", "cancelled", "canceled"}


def wait_for(what: str, status_command: list[str], done: set[str], runner, timeout_s: float, poll_s: float,
             sleep=time.sleep, clock=time.monotonic) -> str:
    """Poll a `kaggle ... status` command until its status is in `done`; one progress line."""
    start = clock()
    while True:
        result = runner(status_command, capture_output=True, text=True)
        status = parse_status(result.stdout or "") if result.returncode == 0 else "unknown"
        waited = clock() - start
        print(f"\rwaiting for {what}: {status} ({waited / 60:.0f} min)", end="", flush=True)
        if status in done:
            print(flush=True)
            return status
        if status in FAILED:
            print(flush=True)
            raise CxrError(f"{what} ended with status {status!r}; see its log on Kaggle (or `kaggle kernels output "
                           f"{status_command[-1]} -p LOGS`), fix it, and push the rest with --only")
        if waited + poll_s > timeout_s:
            print(flush=True)
            raise CxrError(f"gave up waiting for {what} after {waited / 60:.0f} min (status {status!r}); when it has "
                           "finished, push the rest with --only (e.g. --only 03 04)")
        sleep(poll_s)


def check_cli(runner=subprocess.run) -> None:
    """The official CLI is installed and starts (kaggle 2.2.5 imports six without declaring it)."""
    if shutil.which("kaggle") is None:
        raise CxrError("the kaggle command is not installed; `pip install -e \".[publish]\"` (the official CLI and "
                       "six, which it needs), then push again")
    done = runner(["kaggle", "--version"], capture_output=True, text=True)
    if done.returncode:
        message = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no message"]
        missing = re.search(r"No module named '([^']+)'", message[0])
        if missing:
            raise CxrError(f"the kaggle command fails to start: it needs the Python module {missing.group(1)!r}, "
                           f"which it does not declare; `pip install {missing.group(1)}` "
                           "(or `pip install -e \".[publish]\"`)")
        raise CxrError(f"the kaggle command fails to start ({message[0][:200]}); "
                       "reinstall it with `pip install -e \".[publish]\"`")


def push(build_dir: str | Path, dry_run: bool = False, runner=subprocess.run, wait: bool = True,
         only: list[str] | None = None, timeout_s: float = 12 * 3600, poll_s: float = 60, sleep=time.sleep,
         clock=time.monotonic) -> list[list[str]]:
    """Push the helpers dataset, then each kernel in order. With `wait`, a kernel whose inputs
    include another kernel's output (03 and 04 read 02's LoRA) is pushed only once that kernel
    has completed, and the kernels only once the dataset is ready."""
    build_dir = Path(build_dir)
    info = read_build(build_dir)
    commands = push_commands(build_dir, only)
    helpers_meta = json.loads((build_dir / HELPERS_DIR / "dataset-metadata.json").read_text())
    create = ["kaggle", "datasets", "create", "-p", commands[0][4], "--dir-mode", "zip"]
    if dry_run:
        print(shlex.join(commands[0]))
        print(f"  (if the dataset does not exist yet: {shlex.join(create)})")
        if wait:
            print(f"  (then wait until `kaggle datasets status {helpers_meta['id']}` says ready)")
        for folder, meta in kernel_folders(build_dir, info, only):
            for source in meta["kernel_sources"] if wait else []:
                print(f"  (wait until `kaggle kernels status {source}` says complete)")
            print(shlex.join(["kaggle", "kernels", "push", "-p", str(folder)]))
        return commands
    if not credentials_present():
        raise CxrError("no Kaggle credentials: create an API token (kaggle.com > Settings > API > Create New Token) "
                       "and put kaggle.json in ~/.kaggle/ (chmod 600), or set KAGGLE_USERNAME and KAGGLE_KEY")
    check_cli(runner)
    done = runner(commands[0], capture_output=True, text=True)
    if done.returncode and "not found" in (done.stdout + done.stderr).lower():
        done = runner(create, capture_output=True, text=True)
    if done.returncode:
        raise CxrError(f"`{' '.join(commands[0][:3])}` failed: {(done.stderr or done.stdout).strip()[-300:]}")
    if wait:
        wait_for(f"the helpers dataset {helpers_meta['id']}", ["kaggle", "datasets", "status", helpers_meta["id"]],
                 {"ready"}, runner, timeout_s, poll_s, sleep, clock)
    for folder, meta in kernel_folders(build_dir, info, only):
        for source in meta["kernel_sources"] if wait else []:
            wait_for(f"notebook {source}", ["kaggle", "kernels", "status", source], FINISHED, runner, timeout_s,
                     poll_s, sleep, clock)
        command = ["kaggle", "kernels", "push", "-p", str(folder)]
        done = runner(command, capture_output=True, text=True)
        if done.returncode:
            raise CxrError(f"`{' '.join(command)}` failed: {(done.stderr or done.stdout).strip()[-300:]}; "
                           "the kernels before it were pushed")
        print((done.stdout or "").strip())
    return commands
