"""The feature networks of the evaluation stage and their weights.

Each network maps uint8 images (N, 3, H, W) to (pool features, logits), one pass per image:
- Inception-v3 (torch-fidelity's FID weights): FID, KID, IS, PRDC and the audit;
- torchxrayvision's DenseNet-121: the domain FID ("xrv") and the adherence classifier;
- a stand-in conv net with fixed random weights, for offline tests and the smoke demo.
No weights file is ever unpickled beyond plain tensors: Inception's is checked with torch's
tensors-only loader before torch-fidelity loads it, XRV's is read tensors-only into a DenseNet
built here.
"""

from __future__ import annotations

import contextlib
import math
import re
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from ..config.stages import EvalConfig
from ..core.environment import can_reach
from ..core.errors import CxrError, library_reason

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's name (URL_INCEPTION_V3)
INCEPTION_WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_FILE)
XRV_RELEASES = "https://github.com/mlmed/torchxrayvision/releases/download/v1/"
_XRV_FILE = "{}-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt"  # the release files' pattern
# torchxrayvision's DenseNet-121 weights (EvalConfig.xrv_model's choices): release file, trained on.
# Only `-all` saw OpenI, which is the Indiana University collection itself: its scores and features
# are tuned to the very films they judge, so it is used only when asked for, and named so.
XRV_MODELS = {
    "densenet121-res224-mimic_ch": (_XRV_FILE.format("mimic_ch"), "MIMIC-CXR, CheXpert labels"),
    "densenet121-res224-chex": (_XRV_FILE.format("chex"), "CheXpert"),
    "densenet121-res224-nih": (_XRV_FILE.format("nih"), "NIH ChestX-ray14"),
    "densenet121-res224-pc": (_XRV_FILE.format("pc"), "PadChest"),
    "densenet121-res224-all": (_XRV_FILE.format("nih-pc-chex-mimic_ch-google-openi-kaggle"),
                               "NIH, PadChest, CheXpert, MIMIC-CXR, Google, RSNA and OpenI"),
}
XRV_INCLUDES_THIS_COLLECTION = ("densenet121-res224-all",)
XRV_DEFAULT_MODEL = "densenet121-res224-mimic_ch"


def xrv_weights_file(model: str = XRV_DEFAULT_MODEL) -> str:
    return XRV_MODELS[model][0]


def xrv_weights_url(model: str = XRV_DEFAULT_MODEL) -> str:
    return XRV_RELEASES + xrv_weights_file(model)


def xrv_name(model: str = XRV_DEFAULT_MODEL) -> str:
    """How every output names the network: the weights, what they were trained on, and, for the
    weights that saw this collection, that they are not independent of it."""
    name = f"torchxrayvision {model} (trained on {XRV_MODELS[model][1]})"
    if model in XRV_INCLUDES_THIS_COLLECTION:
        name += "; INCLUDES OpenI, the IU collection evaluated here: not independent of these films"
    return name
STANDIN_NAME = "STAND-IN feature network (small random conv net, not Inception: not comparable to published FID/IS)"


class StandInFeatures(nn.Module):
    """A small conv net with fixed random weights: (pool features, logits) like Inception's,
    for offline tests and the smoke demo only. Every output that uses it says so."""

    name = STANDIN_NAME
    key = "standin-v1"

    def __init__(self, seed: int = 0, dim: int = 64, classes: int = 10):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.convs = nn.ModuleList([nn.Conv2d(3, 16, 3, 2, 1), nn.Conv2d(16, 32, 3, 2, 1), nn.Conv2d(32, dim, 3, 2, 1)])
        self.head = nn.Linear(dim, classes)
        with torch.no_grad():
            for layer in [*self.convs, self.head]:
                fan_in = layer.weight[0].numel()
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * math.sqrt(2.0 / fan_in))
                layer.bias.zero_()
        self.num_features = dim
        self.eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.float() / 127.5 - 1.0
        for conv in self.convs:
            x = torch.relu(conv(x))
        pool = x.mean(dim=(2, 3))
        return pool, self.head(pool)


def _inception_class():
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as exc:
        raise CxrError(f"the Inception network needs torch-fidelity ({exc.__class__.__name__}: {exc}); "
                       "`pip install torch-fidelity` (it needs torchvision), or use --feature-net standin "
                       "for an offline smoke test") from None
    return FeatureExtractorInceptionV3


class InceptionFeatures(nn.Module):
    """torch-fidelity's Inception-v3 FID network: 2048-d pool features and the 1008 logits for
    IS, from one pass (it resizes to 299 px itself, as the FID reference does)."""

    name = "Inception-v3 (torch-fidelity FID weights)"
    key = "inception-v3-compat"

    def __init__(self, weights: str | Path | None):
        super().__init__()
        extractor = _inception_class()
        path = resolve_inception_weights(weights)
        if path is not None:
            check_state_dict_file(path)
        try:
            self.net = extractor("inception-v3-compat", ["2048", "logits_unbiased"],
                                 feature_extractor_weights_path=str(path) if path else None)
        except Exception as exc:
            if path is not None and isinstance(exc, RuntimeError):  # load_state_dict: wrong keys or shapes
                raise CxrError(f"{path} is not torch-fidelity's Inception FID weights "
                               f"({str(exc).splitlines()[0][:100]}); download {INCEPTION_WEIGHTS_URL}") from None
            raise CxrError(f"could not get the Inception weights {INCEPTION_WEIGHTS_FILE} ({library_reason(exc)}); "
                           f"with no internet, download it from {INCEPTION_WEIGHTS_URL} and pass "
                           f"--feature-weights PATH (or put it in {torch.hub.get_dir()}/checkpoints/)") from None
        self.num_features = 2048
        self.channels_last = False
        self.eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.device.type == "cpu":
            # Channels-last convolutions: ~1.2x faster on CPU (oneDNN), the same features to float
            # rounding (tests and benchmarks/bench_eval.py compare with torchmetrics' own network).
            # GPUs keep torch-fidelity's layout.
            if not self.channels_last:
                self.net.to(memory_format=torch.channels_last)
                self.channels_last = True
            images = images.contiguous(memory_format=torch.channels_last)
        pool, logits = self.net(images)
        return pool.reshape(len(images), -1), logits.reshape(len(images), -1)


def check_state_dict_file(path: Path) -> None:
    """Refuse a weights file that is more than tensors: torch-fidelity unpickles it next
    (weights_only=False), so first read it with torch's tensors-only loader."""
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torch's own message is a page about weights_only: not the user's problem
        raise CxrError(f"--feature-weights {path} is not a plain PyTorch state dict (torch's tensors-only loader "
                       f"refused it); not unpickling it: use the file from the official release, "
                       f"{INCEPTION_WEIGHTS_URL}") from None


def resolve_inception_weights(weights: str | Path | None) -> Path | None:
    """A local weights file: the given one, else torch hub's cache; None means download."""
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise CxrError(f"--feature-weights {weights} does not exist; download {INCEPTION_WEIGHTS_URL} there")
        return path
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    if cached.is_file():
        return cached
    if not _github_reachable():
        raise CxrError(f"the Inception weights {INCEPTION_WEIGHTS_FILE} are not here and there is no internet: "
                       f"download {INCEPTION_WEIGHTS_URL} and pass --feature-weights PATH "
                       f"(or put it in {Path(torch.hub.get_dir()) / 'checkpoints'}/)")
    return None


def _github_reachable() -> bool:
    return can_reach("github.com")


def read_tensors_only(path: Path, allowed_classes=(), what: str = "weights file") -> object:
    """torch.load with torch's tensors-only unpickler, the given module classes allowed: their
    state is set without running any constructor or other code, so a crafted file cannot run
    code. A file that needs anything else is refused in one sentence naming what it needs."""
    import pickle

    safe_globals = getattr(torch.serialization, "safe_globals", None)
    context = safe_globals(list(allowed_classes)) if safe_globals and allowed_classes else contextlib.nullcontext()
    try:
        with context:
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # torch's message is a page about weights_only: name the culprit
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        needs = f" (it needs {found.group(1)})" if found else ""
        raise CxrError(f"{what} {path} is not plain tensors{needs}; not unpickling it: use the official "
                       f"release file or a .safetensors state dict") from None
    except Exception as exc:  # truncated, not a torch file at all
        raise CxrError(f"{what} {path} could not be read as tensors ({exc.__class__.__name__}: "
                       f"{str(exc).splitlines()[0][:100] if str(exc) else 'no detail'}); re-download it") from None


class XRVFeatures(nn.Module):
    """torchxrayvision's DenseNet-121 (224 px): 1024-d features, as RoentGen's domain FID; by
    default the MIMIC-CXR weights, which never saw this collection (XRV_MODELS). Grayscale in
    [-1024, 1024].

    weights: "" = torchxrayvision's release file (its cache, else downloaded); a directory = a
    folder holding that release file; a file = the release file itself or a .safetensors state
    dict. Nothing is unpickled: the project builds the DenseNet and reads only tensors into it
    (torchxrayvision's own loader would unpickle the release file with weights_only=False)."""

    def __init__(self, weights: str | Path | None = None, model: str = XRV_DEFAULT_MODEL):
        super().__init__()
        with warnings.catch_warnings():  # its import silences every warning process-wide; keep that local
            import torchxrayvision as xrv  # raises ImportError when absent: the caller skips the metric

        self.model, self.name, self.key = model, xrv_name(model), f"xrv-{model}"
        file, url = xrv_weights_file(model), xrv_weights_url(model)
        self.net = xrv.models.DenseNet(weights=None, op_threshs=None)
        path = Path(weights).expanduser() if weights else None
        if path is not None and not path.exists():
            raise CxrError(f"--xrv-weights {path} does not exist; pass the folder that holds {file} "
                           f"(download {url}) or a .safetensors state dict")
        if path is not None and path.is_file():
            local = path
        else:
            cache = path if path is not None else Path(xrv.utils.get_cache_dir()).expanduser()
            local = cache / file
            if not local.is_file():
                if path is not None or not _github_reachable():
                    raise CxrError(f"the torchxrayvision weights {file} ({model}) are not in {cache} and "
                                   f"there is no internet: download {url} into that folder")
                with contextlib.redirect_stdout(sys.stderr):  # its download messages are prints
                    local = Path(xrv.models.get_weights(model, str(cache)))
        self.net.load_state_dict(self._state_dict(local, xrv))
        self.num_features = 1024
        self.eval()

    def _state_dict(self, path: Path, xrv) -> dict:
        if path.suffix == ".safetensors":
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                state = load_file(str(path))
            except (SafetensorError, OSError) as exc:
                raise CxrError(f"--xrv-weights {path} is not a readable .safetensors file ({exc}); re-download "
                               f"or re-convert it") from None
        else:
            # The release file pickles a whole DenseNet: allow exactly the module classes that
            # DenseNet is built of, so its tensors come out and nothing else can.
            allowed = {type(module) for module in self.net.modules()}
            state = read_tensors_only(path, sorted(allowed, key=str), "--xrv-weights")
            if isinstance(state, nn.Module):
                state = state.state_dict()
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CxrError(f"--xrv-weights {path} holds no state dict of tensors; use {xrv_weights_url(self.model)}")
        state = {k: v for k, v in state.items() if k != "op_threshs"}  # a buffer of thresholds, not weights
        missing, unexpected = [], []
        own = self.net.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or unexpected or wrong:
            detail = (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}" if unexpected
                      else f"shape of {wrong[0]} is {tuple(state[wrong[0]].shape)}")
            raise CxrError(f"--xrv-weights {path} is not a state dict of torchxrayvision's DenseNet-121 "
                           f"({detail}); use {xrv_weights_url(self.model)}")
        return state

    @staticmethod
    def network_input(images: torch.Tensor) -> torch.Tensor:
        """uint8 images (N, 3, H, W) as the DenseNet takes them: one channel in [-1024, 1024], 224 px."""
        x = images[:, :1].float() / 255.0 * 2048.0 - 1024.0
        return torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pool = self.net.features2(self.network_input(images))
        return pool, pool[:, :0]


FEATURE_NETS = {"inception": lambda cfg: InceptionFeatures(cfg.feature_weights or None),
                "standin": lambda cfg: StandInFeatures(cfg.seed)}  # EvalConfig.feature_net's choices


def load_feature_net(cfg: EvalConfig) -> nn.Module:
    return FEATURE_NETS[cfg.feature_net](cfg)


def load_xrv(cfg: EvalConfig, device: str, purpose: str) -> tuple[XRVFeatures | None, list[str]]:
    """(the XRV DenseNet, notes), or (None, a note saying why) when it cannot be had (it is optional)."""
    url = xrv_weights_url(cfg.xrv_model)
    try:
        net = XRVFeatures(cfg.xrv_weights or None, cfg.xrv_model).to(device)
    except ImportError as exc:  # optional: skipped with a note, not fatal
        return None, [f"XRV DenseNet {purpose} skipped: torchxrayvision is not installed ({exc}); "
                      "pip install torchxrayvision"]
    except CxrError as exc:
        if cfg.xrv_weights:  # weights the user named must load
            raise
        return None, [f"XRV DenseNet {purpose} skipped: {exc}"]
    except Exception as exc:  # its download failing
        if cfg.xrv_weights:  # weights the user named must load
            raise CxrError(f"--xrv-weights {cfg.xrv_weights} could not be loaded ({exc.__class__.__name__}); "
                           f"download {url}") from None
        return None, [f"XRV DenseNet {purpose} skipped: {exc.__class__.__name__}: "
                      f"{str(exc).splitlines()[0][:120]} (download {url} and pass --xrv-weights FOLDER)"]
    notes = [f"XRV DenseNet ({purpose}): {cfg.xrv_model} was trained on data that include OpenI, the Indiana "
             "University collection evaluated here: its features and scores are tuned to these very films; "
             f"--xrv-model {XRV_DEFAULT_MODEL} never saw them"] if cfg.xrv_model in XRV_INCLUDES_THIS_COLLECTION else []
    return net, notes
