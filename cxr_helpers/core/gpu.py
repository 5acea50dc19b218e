"""Which device a stage runs on, and whether the installed torch can drive the card at all.

Kaggle's current image ships a torch built for CUDA 12.8, which has no kernels for Pascal cards
(sm_60/61: the seed's P100, GTX 10xx, P40): `torch.cuda.is_available()` is True there and the
first CUDA op fails with "no kernel image is available". The same torch version built for CUDA
12.6 still has them, so the fix is one pip command, run before torch is imported.

    python -m cxr_helpers check-gpu [--fix]    # what the notebooks' first cell runs
"""

from __future__ import annotations

import importlib.metadata
import shlex
import shutil
import subprocess
import sys

from .errors import CxrError

# torch's own advice for cards its default build dropped: the CUDA 12.6 wheels still carry sm_60.
OLD_CARD_INDEX = "https://download.pytorch.org/whl/cu126"


def visible_cards() -> list[tuple[str, int, int]]:
    """(name, major, minor) of each NVIDIA card, from nvidia-smi: no torch import needed, so
    the notebooks can ask before torch is loaded into the kernel."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    cards = []
    for line in done.stdout.splitlines() if done.returncode == 0 else []:
        name, _, cap = line.rpartition(",")
        major, _, minor = cap.strip().partition(".")
        if major.isdigit() and minor.isdigit():
            cards.append((name.strip(), int(major), int(minor)))
    return cards


def torch_arch_list() -> list[str]:
    """The compute capabilities the installed torch was built for (sm_XY and compute_XY)."""
    import torch

    if torch.cuda.is_available():
        return list(torch.cuda.get_arch_list())
    flags = getattr(torch._C, "_cuda_getArchFlags", lambda: "")() or ""  # the build's list, card or not
    return flags.split()


def has_kernels(major: int, minor: int, built: list[str]) -> bool:
    """A build runs on a card when it has its sm_XY (or sm_X0 of the same major: binary
    compatible), or PTX (compute_XY) of a lower arch to JIT from."""
    arch = major * 10 + minor
    for entry in built:
        kind, _, number = entry.partition("_")
        if not number.isdigit():
            continue
        value = int(number)
        if kind == "sm" and (value == arch or (value // 10 == major and value % 10 <= minor)):
            return True
        if kind == "compute" and value <= arch:
            return True
    return False


def _base_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist).split("+")[0]
    except importlib.metadata.PackageNotFoundError:
        return None


def old_card_install_command() -> list[str]:
    """pip command that swaps in the same torch (and torchvision/torchaudio) built for CUDA 12.6.

    The local label (+cu126) is pinned: plain `torch==2.8.0` is already satisfied by 2.8.0+cu128.
    """
    packages = [f"{dist}=={version}+cu126" for dist in ("torch", "torchvision", "torchaudio")
                if (version := _base_version(dist))]
    return [sys.executable, "-m", "pip", "install", *packages, "--index-url", OLD_CARD_INDEX]


def unsupported_card() -> tuple[str, str] | None:
    """(card name, sm_XY) of the first visible card the installed torch has no kernels for."""
    import torch

    if not torch.cuda.is_available():
        return None
    built = torch_arch_list()
    for index in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(index)
        if built and not has_kernels(major, minor, built):
            return torch.cuda.get_device_name(index), f"sm_{major}{minor}"
    return None


def check_cuda(what: str = "this stage") -> None:
    """Stop with one sentence (and the exact fix) when torch cannot run on the visible card."""
    found = unsupported_card()
    if found:
        import torch

        name, arch = found
        raise CxrError(
            f"the installed torch {torch.__version__} has no kernels for the {name} ({arch}), so {what} cannot run "
            "on it: install the same torch built for CUDA 12.6, which has them "
            f"(`{shlex.join(old_card_install_command()[2:])}`, Internet on; the notebooks' first cell does this for "
            "you), then restart; or pick a T4 (on Kaggle: GPU T4 x2)")


def generation_device():
    """(device, dtype) for generating images: the GPU in fp16 when there is one, else the CPU in fp32."""
    import torch

    if torch.cuda.is_available():
        check_cuda("image generation")
        return "cuda", torch.float16
    return "cpu", torch.float32


def check_gpu(fix: bool = False) -> str:
    """What the notebooks' first cell runs in a fresh process, before the kernel imports torch:
    on a card the installed torch cannot drive, install the build that can (with `fix`)."""
    cards = visible_cards()
    if not cards:
        return "no NVIDIA GPU visible: the stages run on the CPU"
    built = torch_arch_list()
    missing = [(name, major, minor) for name, major, minor in cards if built and not has_kernels(major, minor, built)]
    if not missing:
        return f"GPU: {', '.join(name for name, _, _ in cards)}; the installed torch has kernels for it"
    name, major, minor = missing[0]
    command = old_card_install_command()
    if not fix:
        raise CxrError(f"the installed torch has no kernels for the {name} (sm_{major}{minor}); run "
                       f"`{shlex.join(command[2:])}` (Internet on), then restart")
    print(f"The {name} (sm_{major}{minor}) needs a torch built for CUDA 12.6: installing it "
          f"({' '.join(command[4:-2])}) ...", flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no message"]
        raise CxrError(f"installing the CUDA 12.6 torch failed ({tail[0][:200]}); turn Internet on in the notebook's "
                       "settings and run this cell again, or pick a T4 (on Kaggle: GPU T4 x2)")
    return f"installed the CUDA 12.6 build of torch for the {name}"
