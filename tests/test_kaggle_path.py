"""The pieces of the Kaggle user's path that the rehearsal cannot reach on a CPU machine: the
card check and its fix command, progress under `accelerate launch`, file modes, every --help."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from cxr_helpers.core import gpu
from cxr_helpers.core.errors import CxrError


@pytest.mark.parametrize("card, built, ok", [
    ((6, 0), ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"], False),  # P100 on Kaggle's cu128 torch
    ((6, 1), ["sm_75", "sm_80"], False),  # GTX 10xx, P40
    ((6, 0), ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80"], True),  # the cu126 build
    ((7, 5), ["sm_75", "sm_80"], True),  # T4
    ((8, 9), ["sm_80", "sm_86", "sm_90"], True),  # L4: sm_86 kernels run on 8.9 (same major, lower minor)
    ((9, 0), ["sm_80", "compute_80"], True),  # PTX of a lower arch is compiled for the card
    ((7, 0), ["sm_75", "sm_80"], False),  # V100 on a build without sm_70
])
def test_has_kernels(card, built, ok):
    assert gpu.has_kernels(*card, built) is ok


def test_old_card_command_pins_the_cu126_build_of_the_installed_versions(monkeypatch):
    versions = {"torch": "2.8.0+cu128", "torchvision": "0.23.0+cu128", "torchaudio": "2.8.0+cu128"}
    monkeypatch.setattr(gpu.importlib.metadata, "version", lambda dist: versions[dist])
    command = gpu.old_card_install_command()
    assert command[1:] == ["-m", "pip", "install", "torch==2.8.0+cu126", "torchvision==0.23.0+cu126",
                           "torchaudio==2.8.0+cu126", "--index-url", "https://download.pytorch.org/whl/cu126"]


@pytest.fixture
def fake_nvidia_smi(tmp_path, monkeypatch):
    """nvidia-smi on PATH answering for a P100 (what `check-gpu` reads before torch is imported)."""
    tool = tmp_path / "bin" / "nvidia-smi"
    tool.parent.mkdir()
    tool.write_text("#!/bin/sh\necho 'Tesla P100-PCIE-16GB, 6.0'\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tool.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(gpu, "torch_arch_list", lambda: ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"])
    return tool


def test_check_gpu_on_a_p100_names_the_fix_or_installs_it(fake_nvidia_smi, monkeypatch, capsys):
    assert gpu.visible_cards() == [("Tesla P100-PCIE-16GB", 6, 0)]
    with pytest.raises(CxrError, match=r"no kernels for the Tesla P100-PCIE-16GB \(sm_60\); "
                                       r"run `pip install torch==.*\+cu126"):
        gpu.check_gpu(fix=False)
    ran, real_run = [], subprocess.run

    def pip(returncode, stderr=""):  # nvidia-smi still answers; pip is not really run
        def run(command, **kw):
            if command[0] == "nvidia-smi":
                return real_run(command, **kw)
            ran.append(command)
            return subprocess.CompletedProcess(command, returncode, "", stderr)
        return run

    monkeypatch.setattr(gpu.subprocess, "run", pip(0))
    assert "installed the CUDA 12.6 build of torch" in gpu.check_gpu(fix=True)
    assert ran == [gpu.old_card_install_command()]
    assert "needs a torch built for CUDA 12.6: installing it" in capsys.readouterr().out  # one line says so
    monkeypatch.setattr(gpu.subprocess, "run", pip(1, "ERROR: Could not find a version that satisfies the requirement"))
    with pytest.raises(CxrError, match="installing the CUDA 12.6 torch failed .*turn Internet on"):
        gpu.check_gpu(fix=True)


def test_check_gpu_without_a_gpu_is_quiet_and_cheap(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    assert gpu.check_gpu(fix=True) == "no NVIDIA GPU visible: the stages run on the CPU"


def test_stages_refuse_a_card_torch_cannot_drive_in_one_sentence(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (6, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Tesla P100-PCIE-16GB")
    monkeypatch.setattr(gpu, "torch_arch_list", lambda: ["sm_75", "sm_80"])
    for what, call in (("training",
                        lambda: __import__("cxr_helpers.training.setup", fromlist=["x"]).check_device("fp16")),
                       ("image generation", gpu.generation_device)):
        with pytest.raises(CxrError, match=rf"no kernels for the Tesla P100-PCIE-16GB \(sm_60\), so {what} cannot run "
                                           r"on it: install the same torch built for CUDA 12.6.*`pip install torch=="):
            call()


def test_output_files_get_the_umask_mode(tmp_path):
    from cxr_helpers.core.files import FILE_MODE, write_json

    path = write_json(tmp_path / "x.json", {"a": 1})
    assert stat.S_IMODE(path.stat().st_mode) == FILE_MODE == 0o666 & ~_umask() != 0o600


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


@pytest.mark.parametrize("stage", ["prepare", "synth", "tiny-model", "train", "sample", "synthesize", "evaluate",
                                   "kaggle build", "kaggle push", "run-notebooks", "check-gpu"])
def test_every_help_works(stage):
    done = subprocess.run([sys.executable, "-m", "cxr_helpers", *stage.split(), "--help"], capture_output=True,
                          text=True)
    assert done.returncode == 0 and done.stdout.startswith("usage:") and not done.stderr, done.stderr


def test_relayed_training_shows_one_bar_not_a_flood(pairs_csv, synth_dir, tiny_model_dir, tmp_path, monkeypatch,
                                                    capsys):
    """Under `accelerate launch` the children print progress lines; the notebook's process turns
    them into one bar and prints only the other lines."""
    from cxr_helpers.config.stages import TrainConfig
    from cxr_helpers.training.progress import PROGRESS_PREFIX, relay_output
    from cxr_helpers.training.stage import train

    monkeypatch.setenv("CXR_PROGRESS_LINES", "1")
    train(TrainConfig(pairs=str(pairs_csv), data_dir=str(synth_dir), model=str(tiny_model_dir), out=str(tmp_path / "t"),
                      batch_size=2, max_steps=3, checkpoint_every=0, validation_prompts=("x",), validation_seeds=(0,),
                      validation_steps=1), progress=True)
    child = capsys.readouterr().out.splitlines(keepends=True)
    progress = [line for line in child if line.startswith(PROGRESS_PREFIX)]
    assert [line.split()[1:3] for line in progress] == [["1", "3"], ["2", "3"], ["3", "3"]]
    echoed = []
    assert relay_output(child, progress=False, echo=lambda line, **kw: echoed.append(line)) == 3
    assert echoed == [line for line in child if not line.startswith(PROGRESS_PREFIX)] and len(echoed) < len(child)


def test_resume_latest_adopts_an_attached_earlier_output(tmp_path, monkeypatch, caplog):
    from cxr_helpers.training.checkpoints import find_checkpoint

    earlier = tmp_path / "kaggle" / "input" / "notebooks" / "me" / "cxr-lora-02" / "cxr-lora" / "train" / "checkpoints"
    for step in (250, 500):
        folder = earlier / f"step-{step:07d}"
        folder.mkdir(parents=True)
        (folder / "state.json").write_text("{}")
        (folder / "lora.safetensors").write_bytes(b"x")
    out = tmp_path / "kaggle" / "working" / "cxr-lora" / "train"
    monkeypatch.setenv("CXR_KAGGLE_ROOT", str(tmp_path / "kaggle"))
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    with pytest.raises(CxrError, match="holds no checkpoint; start without --resume"):
        find_checkpoint(out, "latest")  # off Kaggle, inputs are not searched
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    with caplog.at_level("INFO", logger="cxr_helpers"):
        found = find_checkpoint(out, "latest")
    assert found == out / "checkpoints" / "step-0000500" and (found / "state.json").is_file()
    assert (earlier / "step-0000500").is_dir()  # the read-only input is copied, not moved
    assert "continuing an earlier session's run" in caplog.text
    assert find_checkpoint(out, "latest") == found  # now local: nothing copied again
