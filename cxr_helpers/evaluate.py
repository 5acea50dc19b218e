"""The evaluation stage: FID, KID and IS from one feature pass, a memorisation audit with a
real baseline, and prompt adherence (`cxr_helpers.adherence`).

Real images are the test split, prepared to 128 px exactly as for training (same resize, same
cache); generated images come from sample directories (metadata.csv). Every image goes through
the feature network once; its pool features feed FID, KID, precision/recall/density/coverage
and the memorisation audit, and its logits feed IS. torchmetrics computes FID, KID and IS from
those shared features (a pass-through module stands where its network would be). Real-image
features are cached on disk, keyed by the image list and the network, so re-evaluating embeds
only the generated images.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
import sys
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn
from tqdm.auto import tqdm

from . import adherence as adh
from .config import EvalConfig, config_to_dict
from .errors import CxrError, library_reason
from .environment import cache_root, can_reach, library_versions
from .io import atomic_path, write_csv, write_json

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's name (URL_INCEPTION_V3)
INCEPTION_WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_FILE)
XRV_WEIGHTS_NAME = "densenet121-res224-all"
XRV_WEIGHTS_FILE = "nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt"
XRV_WEIGHTS_URL = "https://github.com/mlmed/torchxrayvision/releases/download/v1/" + XRV_WEIGHTS_FILE
STANDIN_NAME = "STAND-IN feature network (small random conv net, not Inception: not comparable to published FID/IS)"
FID_BIAS_N = 2048
AUDIT_BASELINE_SET = "audit baseline (real test vs train)"
REAL_TEST_SET = "real test"
METRICS = ("fid", "kid", "is", "prdc", "diversity", "audit", "xrv", "adherence")


# ---------------------------------------------------------------- feature networks -----------

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


def random_inception_weights(path: str | Path, seed: int = 0) -> Path:
    """Write a state dict of torch-fidelity's Inception-v3 with random weights (He-normal convs,
    so activations keep their scale through the ReLUs and the features are not all ~0): same
    architecture and compute as the real network, meaningless values. For offline tests and
    benchmarks only; nothing here is downloaded."""
    from unittest import mock

    extractor = _inception_class()
    torch.manual_seed(seed)
    # The constructor always loads weights; let it load nothing so the fresh init stays.
    with mock.patch(f"{extractor.__module__}.load_state_dict_from_url", return_value={}), \
            mock.patch.object(extractor, "load_state_dict", return_value=None):
        net = extractor("inception-v3-compat", ["2048"])
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    # The features vary little between images: wider logits give an IS above 1, yet not so wide
    # that float32 softmax underflows to 0 for a whole class (torchmetrics' IS is NaN then).
    nn.init.normal_(net.fc.weight, std=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(net.state_dict(), tmp)
    return path


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
    """torchxrayvision's DenseNet-121 (all datasets, 224 px): 1024-d features, as RoentGen's
    domain FID. Grayscale in [-1024, 1024].

    weights: "" = torchxrayvision's release file (its cache, else downloaded); a directory = a
    folder holding that release file; a file = the release file itself or a .safetensors state
    dict. Nothing is unpickled: the project builds the DenseNet and reads only tensors into it
    (torchxrayvision's own loader would unpickle the release file with weights_only=False)."""

    name = f"torchxrayvision {XRV_WEIGHTS_NAME}"
    key = "xrv-densenet121-res224-all"

    def __init__(self, weights: str | Path | None = None):
        super().__init__()
        with warnings.catch_warnings():  # its import silences every warning process-wide; keep that local
            import torchxrayvision as xrv  # raises ImportError when absent: the caller skips the metric

        self.net = xrv.models.DenseNet(weights=None, op_threshs=None)
        path = Path(weights).expanduser() if weights else None
        if path is not None and not path.exists():
            raise CxrError(f"--xrv-weights {path} does not exist; pass the folder that holds {XRV_WEIGHTS_FILE} "
                           f"(download {XRV_WEIGHTS_URL}) or a .safetensors state dict")
        if path is not None and path.is_file():
            local = path
        else:
            cache = path if path is not None else Path(xrv.utils.get_cache_dir()).expanduser()
            local = cache / XRV_WEIGHTS_FILE
            if not local.is_file():
                if path is not None or not _github_reachable():
                    raise CxrError(f"the torchxrayvision weights {XRV_WEIGHTS_FILE} are not in {cache} and "
                                   f"there is no internet: download {XRV_WEIGHTS_URL} into that folder")
                with contextlib.redirect_stdout(sys.stderr):  # its download messages are prints
                    local = Path(xrv.models.get_weights(XRV_WEIGHTS_NAME, str(cache)))
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
            raise CxrError(f"--xrv-weights {path} holds no state dict of tensors; use {XRV_WEIGHTS_URL}")
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
                           f"({detail}); use {XRV_WEIGHTS_URL}")
        return state

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images[:, :1].float() / 255.0 * 2048.0 - 1024.0
        x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
        pool = self.net.features2(x)
        return pool, pool[:, :0]


def load_feature_net(cfg: EvalConfig) -> nn.Module:
    if cfg.feature_net == "standin":
        return StandInFeatures(cfg.seed)
    if cfg.feature_net == "inception":
        return InceptionFeatures(cfg.feature_weights or None)
    raise CxrError(f"--feature-net {cfg.feature_net!r} is not known; use inception (or standin for offline tests)")


class Precomputed(nn.Module):
    """Stands where torchmetrics' network would be: the features are already computed."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


# ---------------------------------------------------------------- images and features --------

@dataclass
class ImageSet:
    name: str
    images: torch.Tensor  # (N, 3, H, W) uint8
    prompts: list[str]
    files: list[str]
    unreadable: int = 0


def gray_to_rgb_tensor(images: list[np.ndarray], resolution: int) -> torch.Tensor:
    """(N, 3, H, W) uint8 from N grayscale arrays: the channel repeated, as FID networks want RGB."""
    if not images:
        return torch.zeros(0, 3, resolution, resolution, dtype=torch.uint8)
    return torch.from_numpy(np.stack(images)).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def real_set(cfg: EvalConfig, split: str, data_dir: Path, cache_dir: Path, name: str) -> ImageSet:
    """The split's images, resized and cached exactly as for training, as uint8 3-channel."""
    from .data import load_pairs
    from .dataset import ChestXrayDataset

    pairs = load_pairs(cfg.pairs, split)
    dataset = ChestXrayDataset(pairs, data_dir, cfg.resolution, cache_dir=cache_dir / "images", fit=cfg.fit)
    dataset.warm_cache(progress=False)
    images = [np.asarray(dataset.load_image(i), dtype=np.uint8) for i in range(len(dataset))]
    return ImageSet(name, gray_to_rgb_tensor(images, cfg.resolution), pairs["prompt"].tolist(),
                    pairs["filename"].tolist())


def generated_set(name: str, folder: Path, resolution: int) -> ImageSet:
    """A sample directory's images (metadata.csv lists them); unreadable files are skipped and counted."""
    meta_path = folder / "metadata.csv"
    if not folder.is_dir():
        raise CxrError(f"generated dir {folder} does not exist; make it with `python -m cxr_helpers sample`")
    if not meta_path.is_file():
        raise CxrError(f"generated dir {folder} has no metadata.csv; pass a folder written by `python -m cxr_helpers sample`")
    from .layout import inside

    try:
        meta = pd.read_csv(meta_path, keep_default_na=False, dtype={"file": str, "prompt": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise CxrError(f"{meta_path} is not a readable CSV ({exc.__class__.__name__}); re-run sample into {folder}") from None
    missing = [c for c in ("file", "prompt") if c not in meta.columns]
    if missing:
        raise CxrError(f"{meta_path} lacks the column(s) {', '.join(missing)}; pass a folder written by "
                       "`python -m cxr_helpers sample`")
    outside = [f for f in meta["file"] if inside(folder, f) is None]
    if outside:  # a listed file must be one of the folder's own images, never something elsewhere
        raise CxrError(f"{meta_path} names {outside[0]!r}, which lies outside {folder} "
                       f"({len(outside)} such row(s)); list only files inside the folder")
    images, prompts, files, bad = [], [], [], 0
    for row in meta.itertuples():
        try:
            with Image.open(folder / row.file) as im:
                im = im.convert("L")
                if im.size != (resolution, resolution):
                    im = im.resize((resolution, resolution), Image.Resampling.LANCZOS)
                images.append(np.asarray(im, dtype=np.uint8))
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError):
            bad += 1
            continue
        prompts.append(row.prompt)
        files.append(row.file)
    return ImageSet(name, gray_to_rgb_tensor(images, resolution), prompts, files, bad)


@contextlib.contextmanager
def full_float32():
    """No TF32 on a GPU while features are made: cuDNN convolutions use TF32 by default, whose
    10-bit mantissa moves the features (benchmarks/RESULTS.md, GPU figures) where the reference
    FID is float32. At ~6 GMAC per image the cost is negligible."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def embed(net: nn.Module, images: torch.Tensor, batch_size: int = 32, desc: str = "features",
          progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass of the network over the images: (pool features, logits) on the CPU, in the
    network's dtype (what torchmetrics would see from its own pass; FID works in float64)."""
    device = next(net.parameters()).device
    pools, logits = [], []
    with full_float32():
        for start in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress):
            pool, logit = net(images[start:start + batch_size].to(device))
            pools.append(pool.float().cpu())
            logits.append(logit.float().cpu())
    if not pools:
        return torch.zeros(0, net.num_features), torch.zeros(0, 0)
    return torch.cat(pools), torch.cat(logits)


def cached_embed(net, image_set: ImageSet, cache_dir: Path, batch_size: int, progress: bool,
                 hit_counter: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of a real image set, cached on disk keyed by its image list and the network."""
    from safetensors.torch import load_file, save_file

    digest = hashlib.sha256(net.key.encode())
    for tensor in net.state_dict().values():  # the weights too: another weights file, other features
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest.update(image_set.images.shape.__repr__().encode())
    for name in image_set.files:
        digest.update(name.encode() + b"\n")
    digest.update(hashlib.sha256(image_set.images.numpy().tobytes()).digest())  # the pixels themselves
    path = cache_dir / f"features-{net.key}-{digest.hexdigest()[:20]}.safetensors"
    if path.is_file():
        if hit_counter is not None:
            hit_counter.append(path.name)
        cached = load_file(str(path))
        return cached["pool"], cached["logits"]
    pool, logits = embed(net, image_set.images, batch_size, f"features: {image_set.name}", progress)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({"pool": pool.contiguous(), "logits": logits.contiguous()}, str(tmp))
    return pool, logits


# ---------------------------------------------------------------- metrics --------------------

def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """FID between feature sets a (n, d) and b (m, d), in float64.

    trace(sqrtm(S_a S_b)) is the sum of the singular values of Ac Bc^T / sqrt((n-1)(m-1)) (Ac, Bc
    centred): exact, and an (n x m) problem instead of (d x d), so the jackknife and FID-infinity,
    which recompute it dozens of times, stay cheap.
    """
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    ac, bc = a - mu_a, b - mu_b
    n, m = len(a), len(b)
    trace_a = ac.square().sum() / (n - 1)
    trace_b = bc.square().sum() / (m - 1)
    if min(n, m) <= a.shape[1]:
        cross = torch.linalg.svdvals(ac @ bc.T).sum() / math.sqrt((n - 1) * (m - 1))
    else:
        sa, sb = ac.T @ ac / (n - 1), bc.T @ bc / (m - 1)
        cross = torch.linalg.eigvals(sa @ sb).sqrt().real.sum()
    return float((mu_a - mu_b).square().sum() + trace_a + trace_b - 2 * cross)


def torchmetrics_fid(real: torch.Tensor, fake: torch.Tensor, device: str = "cpu") -> float:
    """device: where torchmetrics does the arithmetic (on a GPU its float64 matrix square root
    takes a fraction of the CPU's time, which dominates once the network pass is fast)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=Precomputed(real.shape[1]), normalize=False).to(device)
    fid.update(real.to(device), real=True)
    fid.update(fake.to(device), real=False)
    return float(fid.compute())


def torchmetrics_kid(real: torch.Tensor, fake: torch.Tensor, subset: int, seed: int,
                     device: str = "cpu") -> tuple[float, float]:
    from torchmetrics.image.kid import KernelInceptionDistance

    with warnings.catch_warnings():  # "will save all extracted features": they are already in memory
        warnings.simplefilter("ignore")
        kid = KernelInceptionDistance(feature=Precomputed(real.shape[1]), subset_size=subset, normalize=False).to(device)
    kid.update(real.to(device), real=True)
    kid.update(fake.to(device), real=False)
    torch.manual_seed(seed)  # KID draws its subsets from torch's global generator
    mean, std = kid.compute()
    return float(mean), float(std)


def torchmetrics_is(logits: torch.Tensor, splits: int, seed: int, device: str = "cpu") -> tuple[float, float]:
    from torchmetrics.image.inception import InceptionScore

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        score = InceptionScore(feature=Precomputed(logits.shape[1]), splits=splits, normalize=False).to(device)
    score.update(logits.to(device))
    torch.manual_seed(seed)  # IS shuffles before splitting
    mean, std = score.compute()
    return float(mean), float(std)


def fid_interval(real: torch.Tensor, fake: torch.Tensor, groups: int = 20, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """A `level` interval for FID at this N: estimate ± t * jackknife standard error.

    Why not the bootstrap: resampling with replacement repeats points, which lowers the
    covariance's rank and adds to FID's small-sample bias, so every resampled FID lands above
    the estimate (2048-d, N = 1000: FID 106.8, percentile interval [150.1, 155.6]). The
    delete-a-group jackknife only ever leaves points out: each set is cut into `groups` random
    groups, FID is recomputed without each group in turn (the other set whole), and the two
    sets' jackknife variances add (they are independent samples). The jackknife variance is
    conservative in expectation (Efron & Stein 1981), the interval is centred on the estimate so
    it always contains it, and with G groups the t quantile has G - 1 degrees of freedom. It
    covers the mean FID of fresh samples of this N (tests/test_evaluate.py checks the coverage by
    simulation); FID at infinite N is `fid_infinity`'s job, not this interval's.
    """
    from scipy.stats import t as student_t

    estimate = frechet_distance(real, fake)
    groups = min(groups, len(real) // 2, len(fake) // 2)  # each leave-out keeps at least half a set
    if groups < 2:
        return estimate, estimate
    rng = np.random.default_rng(seed)
    variance = 0.0
    for which in ("real", "fake"):
        values = []
        own = real if which == "real" else fake
        for group in np.array_split(rng.permutation(len(own)), groups):
            keep = torch.ones(len(own), dtype=torch.bool, device=own.device)
            keep[torch.from_numpy(group).to(own.device)] = False
            values.append(frechet_distance(own[keep], fake) if which == "real" else frechet_distance(real, own[keep]))
        values = np.asarray(values)
        variance += (groups - 1) / groups * np.square(values - values.mean()).sum()
    half = float(student_t.ppf(0.5 + level / 2, groups - 1) * math.sqrt(variance))
    return estimate - half, estimate + half


def fid_infinity(real: torch.Tensor, fake: torch.Tensor, points: int = 10, smallest: float = 0.2,
                 seed: int = 0) -> float:
    """FID extrapolated to infinitely many images (Chong & Forsyth, "Effectively Unbiased FID and
    Inception Score and where to find them", CVPR 2020): FID's bias is linear in 1/N, so FID is
    computed on random subsets of k images per set for `points` values of k from `smallest` x N
    to N, a line is fitted to FID against 1/k, and its value at 1/k = 0 is returned. Results of
    different N can be compared on it (plain FID only at equal N). Their code varies only the
    generated set against fixed training statistics; here both sets are finite, so both are
    subsampled to k together."""
    n = min(len(real), len(fake))
    ks = np.unique(np.linspace(max(2, round(smallest * n)), n, points).round().astype(int))
    if len(ks) < 2:
        return frechet_distance(real, fake)
    rng = np.random.default_rng(seed)
    values = []
    for k in ks:
        r = real[torch.from_numpy(rng.choice(len(real), k, replace=False)).to(real.device)]
        f = fake[torch.from_numpy(rng.choice(len(fake), k, replace=False)).to(fake.device)]
        values.append(frechet_distance(r, f))
    slope, intercept = np.polyfit(1.0 / ks, values, 1)
    return float(intercept)


def prdc(real: torch.Tensor, fake: torch.Tensor, k: int = 5) -> dict[str, float]:
    """Precision, recall (Kynkäänniemi et al. 2019), density and coverage (Naeem et al. 2020)
    with k-nearest-neighbour balls."""
    real, fake = real.double(), fake.double()
    k_real = min(k, len(real) - 1)
    k_fake = min(k, len(fake) - 1)
    d_rr = torch.cdist(real, real)
    d_ff = torch.cdist(fake, fake)
    d_rf = torch.cdist(real, fake)
    radius_real = d_rr.kthvalue(k_real + 1, dim=1).values  # +1: the point itself is at 0
    radius_fake = d_ff.kthvalue(k_fake + 1, dim=1).values
    inside_real = d_rf <= radius_real[:, None]  # fake j within real i's ball
    return {
        "precision": float(inside_real.any(dim=0).double().mean()),
        "recall": float((d_rf <= radius_fake[None, :]).any(dim=1).double().mean()),
        "density": float(inside_real.double().sum() / (k_real * len(fake))),
        "coverage": float((d_rf.min(dim=1).values <= radius_real).double().mean()),
    }


def diversity(image_set: ImageSet) -> pd.DataFrame:
    """Mean pairwise MS-SSIM among the images of each prompt (lower = more diverse). The window
    (7 px, 5 scales) fits 128 px images."""
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as ms_ssim

    rows = []
    by_prompt: dict[str, list[int]] = {}
    for i, prompt in enumerate(image_set.prompts):
        by_prompt.setdefault(prompt, []).append(i)
    size = image_set.images.shape[-1]
    kernel = 7 if size > 6 * 16 else 3
    for prompt, idx in by_prompt.items():
        if len(idx) < 2:
            continue
        imgs = image_set.images[idx, :1].float() / 255.0
        scores = []
        for a in range(len(idx)):
            for b in range(a + 1, len(idx)):
                scores.append(float(ms_ssim(imgs[a:a + 1], imgs[b:b + 1], data_range=1.0, kernel_size=kernel)))
        rows.append({"prompt": prompt, "images": len(idx), "ms_ssim": float(np.mean(scores))})
    return pd.DataFrame(rows, columns=["prompt", "images", "ms_ssim"])


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.double(), dim=1)


def _centred_pixels(images: torch.Tensor) -> torch.Tensor:
    """Unit-length, mean-centred pixels: their dot product is the Pearson correlation. float32:
    7,000 real films at 128 px stay under 0.5 GB."""
    flat = images[:, 0].reshape(len(images), -1).float()
    return torch.nn.functional.normalize(flat - flat.mean(1, keepdim=True), dim=1)


def nearest(images: torch.Tensor, features: torch.Tensor, ref_images: torch.Tensor,
            ref_features: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each image's nearest reference image by pixel correlation and by feature cosine."""
    px, ref_px = _centred_pixels(images), _centred_pixels(ref_images)
    corr_value, corr_index = [], []
    for start in range(0, len(px), 256):  # chunked: n x n_ref correlations
        value, index = (px[start:start + 256] @ ref_px.T).max(dim=1)
        corr_value.append(value)
        corr_index.append(index)
    cos_value, cos_index = (_unit(features) @ _unit(ref_features).T).max(dim=1)
    return {"pixel_correlation": torch.cat(corr_value), "pixel_index": torch.cat(corr_index),
            "feature_cosine": cos_value, "feature_index": cos_index}


@dataclass
class AuditBaseline:
    """How close real images of other patients come to the training images: each real test
    image's nearest training image. A generated image is flagged only when it is closer to a
    training image than `percentile` of these, and above the fixed thresholds too."""

    percentile: float
    pixel_correlation: float  # the percentile of the test images' nearest-train correlations
    feature_cosine: float
    n_test: int
    n_train: int
    closest_test: int  # the real test image closest to a training image (by pixels), for the figure
    closest_train: int
    closest_correlation: float
    pixel_threshold: float  # a similarity above max(the fixed threshold, the baseline's percentile) flags
    cosine_threshold: float


def audit_baseline(test: ImageSet, test_features: torch.Tensor, train: ImageSet, train_features: torch.Tensor,
                   pixel_threshold: float, cosine_threshold: float, percentile: float = 99.9) -> AuditBaseline:
    near = nearest(test.images, test_features, train.images, train_features)
    # "higher": an observed value, never interpolated below the largest; with fewer than 1,000 test
    # films the 99.9th percentile is their maximum, and a film only as close as that is not flagged.
    pixel = float(np.percentile(near["pixel_correlation"].numpy(), percentile, method="higher"))
    cosine = float(np.percentile(near["feature_cosine"].numpy(), percentile, method="higher"))
    top = int(near["pixel_correlation"].argmax())
    return AuditBaseline(percentile, pixel, cosine, len(test.images), len(train.images), top,
                         int(near["pixel_index"][top]), float(near["pixel_correlation"][top]),
                         max(pixel_threshold, pixel), max(cosine_threshold, cosine))


def audit(generated: ImageSet, gen_features: torch.Tensor, train: ImageSet, train_features: torch.Tensor,
          test: ImageSet, test_features: torch.Tensor, baseline: AuditBaseline) -> pd.DataFrame:
    """Each generated image's nearest training image and nearest test image, by pixel correlation
    and by feature cosine. A training-image match above the thresholds is possible memorisation
    (the model saw that film); a test-image match is reported apart: the model never saw it, so a
    near-copy there is chance or a duplicate film, not memorisation. The real images are patient data."""
    table = pd.DataFrame({"generated_file": generated.files, "prompt": generated.prompts})
    for split, image_set, features in (("train", train, train_features), ("test", test, test_features)):
        near = nearest(generated.images, gen_features, image_set.images, features)
        table[f"nearest_{split}_by_pixels"] = [image_set.files[i] for i in near["pixel_index"].tolist()]
        table[f"{split}_pixel_correlation"] = near["pixel_correlation"].numpy()
        table[f"nearest_{split}_by_features"] = [image_set.files[i] for i in near["feature_index"].tolist()]
        table[f"{split}_feature_cosine"] = near["feature_cosine"].numpy()
        table[f"flagged_{split}"] = ((table[f"{split}_pixel_correlation"] > baseline.pixel_threshold)
                                     | (table[f"{split}_feature_cosine"] > baseline.cosine_threshold))
        table[f"{split}_index"] = near["pixel_index"].numpy()
    return table


# ---------------------------------------------------------------- the stage ------------------

def load_xrv(cfg: EvalConfig, device: str, notes: list[str], purpose: str) -> "XRVFeatures | None":
    """The XRV DenseNet, or None with a note when it cannot be had (it is optional)."""
    try:
        return XRVFeatures(cfg.xrv_weights or None).to(device)
    except ImportError as exc:  # optional: skipped with a note, not fatal
        notes.append(f"XRV DenseNet {purpose} skipped: torchxrayvision is not installed ({exc}); "
                     "pip install torchxrayvision")
    except CxrError as exc:
        if cfg.xrv_weights:  # weights the user named must load
            raise
        notes.append(f"XRV DenseNet {purpose} skipped: {exc}")
    except Exception as exc:  # its download failing
        if cfg.xrv_weights:  # weights the user named must load
            raise CxrError(f"--xrv-weights {cfg.xrv_weights} could not be loaded ({exc.__class__.__name__}); "
                           f"download {XRV_WEIGHTS_URL}") from None
        notes.append(f"XRV DenseNet {purpose} skipped: {exc.__class__.__name__}: {str(exc).splitlines()[0][:120]} "
                     f"(download {XRV_WEIGHTS_URL} and pass --xrv-weights FOLDER)")
    return None


def prompt_adherence(cfg: EvalConfig, scorer, generated: list[tuple[str, ImageSet]], real: ImageSet, data_dir: Path,
                     notes: list[str], progress: bool) -> pd.DataFrame:
    """Per finding, the AUROC of the scorer's score against the label of the report each prompt
    came from, for every generated set and for the real test films (the ceiling)."""
    from .data import load_pairs, read_tables
    from .layout import REPORTS_CSV

    reports, _ = read_tables(data_dir)
    if "MeSH" not in reports.columns and "Problems" not in reports.columns:
        notes.append(f"adherence skipped: {data_dir / REPORTS_CSV} has neither a MeSH nor a Problems column, so "
                     "no report has a label; use the Kaggle dataset's original file")
        return pd.DataFrame(columns=adh.ADHERENCE_COLUMNS)
    labels = adh.report_labels(reports)
    pairs = load_pairs(cfg.pairs)
    by_prompt = adh.prompt_labels(pairs, labels)
    parts = []
    for name, image_set in generated:
        known = [i for i, prompt in enumerate(image_set.prompts) if prompt in by_prompt.index]
        if not known:
            notes.append(f"adherence skipped for {name}: none of its {len(set(image_set.prompts))} prompt(s) is the "
                         f"impression of a report in {cfg.pairs}, so no image has a label; sample from that pairs.csv")
            continue
        if len(known) < len(image_set.prompts):
            notes.append(f"adherence: {name}: {len(image_set.prompts) - len(known)} image(s) whose prompt is no "
                         "report's impression are left out")
        scores = scorer.score(image_set.images[known], cfg.batch_size, progress)
        truth = by_prompt.loc[[image_set.prompts[i] for i in known]].reset_index(drop=True)
        parts.append(adh.adherence(name, scores, truth, scorer.name, cfg.adherence_min_cases, notes))
    uid_of = dict(zip(pairs["filename"], pairs["uid"].astype(int)))
    truth = labels.reindex([uid_of[f] for f in real.files]).fillna(False).reset_index(drop=True)
    scores = scorer.score(real.images, cfg.batch_size, progress)
    parts.append(adh.adherence(REAL_TEST_SET, scores, truth, scorer.name, cfg.adherence_min_cases, notes))
    table = pd.concat(parts, ignore_index=True)
    if not len(table):
        notes.append(f"adherence: no finding of {scorer.name} has enough positive and negative images in any set")
    return table


def parse_generated(items) -> list[tuple[str, Path]]:
    sets = []
    for item in items:
        name, sep, path = str(item).partition("=")
        if not sep:
            name, path = Path(item).name, item
        sets.append((name, Path(path)))
    if not sets:
        raise CxrError("no generated images: pass --generated DIR (or NAME=DIR ...), folders written by `sample`")
    names = [n for n, _ in sets]
    if len(set(names)) != len(names):
        raise CxrError(f"--generated names repeat ({', '.join(names)}); name them NAME=DIR")
    return sets


@dataclass
class EvalResult:
    out: Path
    table: pd.DataFrame
    audit: pd.DataFrame
    adherence: pd.DataFrame
    diversity: pd.DataFrame
    feature_network: str
    notes: list[str]
    cache_hits: list[str]
    figures: dict


def _pick(size: int, n: int, seed: int) -> list[int]:
    """n of range(size), seeded (all of them when size <= n)."""
    if size <= n:
        return list(range(size))
    return sorted(np.random.default_rng(seed).choice(size, n, replace=False).tolist())


def _take(image_set: ImageSet, idx: list[int], name: str | None = None) -> ImageSet:
    return ImageSet(name or image_set.name, image_set.images[idx], [image_set.prompts[i] for i in idx],
                    [image_set.files[i] for i in idx], image_set.unreadable)


def evaluate(cfg: EvalConfig, progress: bool = True, feature_net: nn.Module | None = None) -> EvalResult:
    """Score every generated set (and the real-vs-real floor) against the real test images."""
    from . import plots
    from .data import resolve_data_dir

    # "fid,kid" and "fid kid" alike (the CLI takes a list; users also write it comma-separated).
    cfg = replace(cfg, metrics=tuple(m.strip() for item in cfg.metrics for m in item.split(",") if m.strip()))
    unknown = sorted(set(cfg.metrics) - set(METRICS))
    if unknown:
        raise CxrError(f"--metrics {', '.join(unknown)} not known; choose from {', '.join(METRICS)}")
    if "adherence" in cfg.metrics and cfg.adherence_scorer not in adh.SCORERS:
        raise CxrError(f"--adherence-scorer {cfg.adherence_scorer!r} is not known; use "
                       f"{' or '.join(adh.SCORERS)} (geometry: the synthetic films' oracle, for offline runs)")
    if cfg.n is not None and cfg.n < 2:
        raise CxrError(f"--n must be at least 2 (FID needs two images per set to estimate a covariance), got {cfg.n}")
    sets = parse_generated(cfg.generated)
    data_dir = resolve_data_dir(cfg.data_dir)
    out = Path(cfg.out)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else cache_root(out)  # on Kaggle: outside the output
    notes: list[str] = []
    generated = [generated_set(name, path, cfg.resolution) for name, path in sets]
    for g in generated:
        if g.unreadable:
            notes.append(f"{g.name}: {g.unreadable} unreadable image(s) skipped")
        if len(g.images) < 2:
            raise CxrError(f"generated set {g.name} has {len(g.images)} readable image(s); at least 2 are needed "
                           "(FID estimates a covariance), and about 2,048 for an unbiased FID")
    real = real_set(cfg, "test", data_dir, cache_dir, "real test")
    if len(real.images) < 2:
        raise CxrError(f"the test split of {cfg.pairs} has {len(real.images)} image(s); at least 2 are needed; "
                       "re-run prepare with a larger --test-fraction")
    train = real_set(cfg, "train", data_dir, cache_dir, "real train") if (cfg.real_floor or "audit" in cfg.metrics) else None

    # One N for every set compared (FID's bias depends on N).
    n = min([len(real.images)] + [len(g.images) for g in generated] + ([cfg.n] if cfg.n else []))
    if cfg.real_floor and train is not None:
        n = min(n, len(train.images))
    generated = [_take(g, _pick(len(g.images), n, cfg.seed)) for g in generated]
    real_idx = _pick(len(real.images), n, cfg.seed)
    real_n = _take(real, real_idx)
    if n < FID_BIAS_N:
        notes.append(f"FID with N = {n} < {FID_BIAS_N} images is biased upwards: compare FIDs only at the same N, "
                     "and read KID (unbiased) beside it")
    kid_subset = min(cfg.kid_subset, n)
    if kid_subset < cfg.kid_subset and "kid" in cfg.metrics:
        notes.append(f"KID subset size lowered from {cfg.kid_subset} to {kid_subset} (the number of images per set)")
    # KID's std is the spread over random subsets: it says something only when the subsets differ.
    # Two subsets of S from N images share S^2/N images on average (all of them when S = N, where
    # the std is ~0 whatever the data), so it is reported only when S <= N / 2.
    kid_std_meaningful = 2 * kid_subset <= n
    if "kid" in cfg.metrics and not kid_std_meaningful:
        notes.append(f"KID has no std: its {kid_subset}-image subsets of {n} images overlap by "
                     f"{kid_subset ** 2 / n:.0f} images on average (the same set when equal), so their spread "
                     f"would not measure the estimate's uncertainty; a std needs --kid-subset at most N/2 = {n // 2}")
    is_splits = max(1, min(cfg.is_splits, n // 2))

    net = feature_net or load_feature_net(cfg)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        from .gpu import check_cuda

        check_cuda("the evaluation")
    net.to(device)
    if isinstance(net, StandInFeatures):
        notes.append(f"features: {STANDIN_NAME}")
    hits: list[str] = []
    # Each real image is embedded once: the whole test split (and the whole train split when the
    # audit needs it); the compared subsets are rows of those features.
    real_all, _ = cached_embed(net, real, cache_dir, cfg.batch_size, progress, hits)
    real_pool = real_all[real_idx]
    train_all = cached_embed(net, train, cache_dir, cfg.batch_size, progress, hits) if "audit" in cfg.metrics else None
    compared = [(g.name, g, *embed(net, g.images, cfg.batch_size, f"features: {g.name}", progress)) for g in generated]
    if cfg.real_floor and train is not None:
        floor_idx = _pick(len(train.images), n, cfg.seed + 1)
        floor = _take(train, floor_idx, "real train (floor)")
        f_pool, f_logits = ((train_all[0][floor_idx], train_all[1][floor_idx]) if train_all is not None
                            else cached_embed(net, floor, cache_dir, cfg.batch_size, progress, hits))
        compared.append((floor.name, floor, f_pool, f_logits))

    rows = []
    for name, image_set, pool, logits in compared:
        base = {"set": name, "n_real": len(real_pool), "n_generated": len(pool), "feature_network": net.name}
        if "fid" in cfg.metrics:
            value = torchmetrics_fid(real_pool, pool, device)
            # The jackknife's and FID-infinity's dozens of FIDs run where the metric arithmetic does.
            on_device = real_pool.to(device), pool.to(device)
            low, high = (fid_interval(*on_device, cfg.interval_groups, cfg.seed) if cfg.interval_groups
                         else (None, None))
            if low is not None:  # centred on our own FID, equal to torchmetrics' to ~1e-6: re-centred on this one
                half = (high - low) / 2
                low, high = value - half, value + half
            rows.append({**base, "metric": "fid", "value": value, "ci_low": low, "ci_high": high})
            rows.append({**base, "metric": "fid_infinity", "value": fid_infinity(*on_device, seed=cfg.seed)})
        if "kid" in cfg.metrics:
            mean, std = torchmetrics_kid(real_pool, pool, kid_subset, cfg.seed, device)
            rows.append({**base, "metric": "kid", "value": mean, "std": std if kid_std_meaningful else None})
        if "is" in cfg.metrics and logits.shape[1] > 0:
            mean, std = torchmetrics_is(logits, is_splits, cfg.seed, device)
            rows.append({**base, "metric": "is", "value": mean, "std": std})
        if "prdc" in cfg.metrics:
            for metric, value in prdc(real_pool, pool, cfg.prdc_k).items():
                rows.append({**base, "metric": metric, "value": value})
    diversity_table = pd.DataFrame(columns=["set", "prompt", "images", "ms_ssim"])
    if "diversity" in cfg.metrics:
        parts = []
        for name, image_set, *_ in compared[: len(generated)]:
            table = diversity(image_set)
            table.insert(0, "set", name)
            parts.append(table)
            if len(table):
                rows.append({"set": name, "metric": "ms_ssim_within_prompt", "value": float(table["ms_ssim"].mean()),
                             "std": float(table["ms_ssim"].std()) if len(table) > 1 else None,
                             "n_generated": int(table["images"].sum()),
                             "feature_network": "pixels (MS-SSIM, 7 px window, 5 scales)"})
            else:
                notes.append(f"{name}: no prompt has 2+ images; sample with --n-per-prompt 2 or more for diversity")
        diversity_table = pd.concat(parts, ignore_index=True) if parts else diversity_table
    audit_table = pd.DataFrame()
    baseline = None
    if "audit" in cfg.metrics and train is not None:
        baseline = audit_baseline(real, real_all, train, train_all[0], cfg.audit_pixel_threshold,
                                  cfg.audit_cosine_threshold, cfg.audit_percentile)
        base_row = {"set": AUDIT_BASELINE_SET, "n_real": baseline.n_train, "n_generated": baseline.n_test,
                    "feature_network": net.name}
        rows.append({**base_row, "metric": "audit_baseline_pixel_correlation", "value": baseline.pixel_correlation,
                     "feature_network": "pixels (Pearson correlation, 128 px)"})
        rows.append({**base_row, "metric": "audit_baseline_feature_cosine", "value": baseline.feature_cosine})
        parts = []
        for name, image_set, pool, _ in compared[: len(generated)]:
            table = audit(image_set, pool, train, train_all[0], real, real_all, baseline)
            table.insert(0, "set", name)
            parts.append(table)
            counts = {"n_generated": len(table), "feature_network": net.name}
            rows.append({"set": name, "metric": "audit_train_matches", "value": int(table["flagged_train"].sum()),
                         "n_real": baseline.n_train, **counts})
            rows.append({"set": name, "metric": "audit_test_matches", "value": int(table["flagged_test"].sum()),
                         "n_real": baseline.n_test, **counts})
        audit_table = pd.concat(parts, ignore_index=True)
        if baseline.n_test * (1 - baseline.percentile / 100) < 1:
            notes.append(f"audit baseline: with {baseline.n_test} real test images the {baseline.percentile:g}th "
                         "percentile of their nearest-train similarities is their maximum (a finer percentile needs "
                         f"{math.ceil(100 / (100 - baseline.percentile))} or more)")
    xrv_purposes = [what for what, wanted in (("FID", "xrv" in cfg.metrics), ("prompt adherence", (
        "adherence" in cfg.metrics and cfg.adherence_scorer == "xrv"))) if wanted]
    xrv_net = load_xrv(cfg, device, notes, " and ".join(xrv_purposes)) if xrv_purposes else None
    if "xrv" in cfg.metrics and xrv_net is not None:
        x_real, _ = cached_embed(xrv_net, real_n, cache_dir, cfg.batch_size, progress, hits)
        for name, image_set, *_ in compared:
            x_pool, _ = embed(xrv_net, image_set.images, cfg.batch_size, f"xrv: {name}", progress)
            rows.append({"set": name, "metric": "fid_xrv", "value": torchmetrics_fid(x_real, x_pool, device),
                         "n_real": len(x_real), "n_generated": len(x_pool), "feature_network": xrv_net.name})
    adherence_table = pd.DataFrame(columns=adh.ADHERENCE_COLUMNS)
    if "adherence" in cfg.metrics and (cfg.adherence_scorer != "xrv" or xrv_net is not None):
        scorer = (adh.XRVClassifier(features=xrv_net) if cfg.adherence_scorer == "xrv"
                  else adh.SCORERS[cfg.adherence_scorer]())
        adherence_table = prompt_adherence(cfg, scorer, [(name, s) for name, s, *_ in compared[: len(generated)]],
                                           real, data_dir, notes, progress)
        for row in adherence_table.itertuples():
            rows.append({"set": row.set, "metric": f"auroc_{row.finding.lower().replace(' ', '_')}",
                         "value": row.auroc, "ci_low": row.ci_low, "ci_high": row.ci_high,
                         "n_generated": row.images, "feature_network": row.scorer})

    # Keys a row leaves out (std, interval, n_real) are blank in the table.
    table = pd.DataFrame(rows, columns=["set", "metric", "value", "std", "ci_low", "ci_high", "n_real", "n_generated",
                                        "feature_network"])
    table["n_real"] = table["n_real"].astype("Int64")  # blank where no real set, never "24.0"
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "metrics.csv", table)
    write_json(out / "metrics.json", {
        "metrics": table.astype(object).where(table.notna(), None).to_dict("records"), "n_per_set": n, "notes": notes,
        "feature_network": net.name, "kid_subset": kid_subset, "is_splits": is_splits,
        "unreadable": {g.name: g.unreadable for g in generated},
        "audit_baseline": asdict(baseline) if baseline else None,
        "config": config_to_dict(cfg), "versions": library_versions()})
    if len(audit_table):
        write_csv(out / "audit.csv", audit_table.drop(columns=["train_index", "test_index"]))
    write_csv(out / "diversity.csv", diversity_table)
    if "adherence" in cfg.metrics:
        write_csv(out / "adherence.csv", adherence_table)
    folder = out / "figures"
    figures = {"metrics": plots.metric_intervals(table, save_to=folder / "metrics.png")}
    if len(audit_table):
        figures["nearest_pairs"] = plots.nearest_pairs(audit_table, {g.name: g for g in generated}, train, real, baseline,
                                                       save_to=folder / "nearest_pairs.png")
    if len(adherence_table):
        figures["adherence"] = plots.adherence_bars(adherence_table, save_to=folder / "adherence.png")
    if len(diversity_table):
        figures["diversity"] = plots.diversity_per_prompt(diversity_table, save_to=folder / "diversity.png")
    return EvalResult(out, table, audit_table, adherence_table, diversity_table, net.name, notes, hits, figures)


def results_table(table: pd.DataFrame) -> pd.DataFrame:
    """One row per set, one column per metric in reading order (FID first, the audit last), each
    headed with its name and which way is better ("FID ↓"); cells are "value [low, high]",
    "value ± std" or "value", and "–" where a set has no value (the real floor has no diversity)."""
    from .style import MISSING, metric_label, metric_order

    def cell(row):
        if pd.notna(row["ci_low"]):
            return f"{row['value']:.4g} [{row['ci_low']:.4g}, {row['ci_high']:.4g}]"
        if pd.notna(row["std"]):
            return f"{row['value']:.4g} ± {row['std']:.2g}"
        return f"{row['value']:.4g}"
    table = table[~table["metric"].str.startswith("auroc_")]  # per finding: adherence_table
    wide = table.assign(cell=table.apply(cell, axis=1)).pivot(index="set", columns="metric", values="cell")
    wide = wide[metric_order(table["metric"])]
    counts = table.groupby("set")["n_generated"].max().rename("N").astype("Int64").astype(str).replace("<NA>", MISSING)
    wide = wide.join(counts).reindex(list(dict.fromkeys(table["set"])))
    wide = wide.rename(columns={m: metric_label(m) for m in wide.columns if m != "N"})
    wide.columns.name = None
    return wide.fillna(MISSING)


def adherence_table(adherence: pd.DataFrame) -> pd.DataFrame:
    """One row per finding, one column per set: "AUROC [low, high] (positives+/negatives-)"."""
    if not len(adherence):
        return pd.DataFrame()
    cell = adherence.apply(lambda r: f"{r['auroc']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}] "
                                     f"({r['positives']}+/{r['negatives']}-)", axis=1)
    wide = adherence.assign(cell=cell).pivot(index="finding", columns="set", values="cell")
    return wide[list(dict.fromkeys(adherence["set"]))]
