"""The evaluation stage: FID, KID and IS from one feature pass, and a medical-image audit.

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
import sys
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn
from tqdm.auto import tqdm

from .config import EvalConfig, config_to_dict
from .errors import CxrError
from .io import atomic_path, can_reach, library_versions, write_csv, write_json

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's name (URL_INCEPTION_V3)
INCEPTION_WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_FILE)
XRV_WEIGHTS_NAME = "densenet121-res224-all"
XRV_WEIGHTS_FILE = "nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt"
XRV_WEIGHTS_URL = "https://github.com/mlmed/torchxrayvision/releases/download/v1/" + XRV_WEIGHTS_FILE
STANDIN_NAME = "STAND-IN feature network (small random conv net, not Inception: not comparable to published FID/IS)"
FID_BIAS_N = 2048
METRICS = ("fid", "kid", "is", "prdc", "diversity", "audit", "xrv")


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
            raise CxrError(f"could not get the Inception weights {INCEPTION_WEIGHTS_FILE} ({exc.__class__.__name__}); "
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


class XRVFeatures(nn.Module):
    """torchxrayvision's DenseNet-121 (all datasets, 224 px): 1024-d features, as RoentGen's
    domain FID. Grayscale in [-1024, 1024].

    weights: "" = torchxrayvision's own file (its cache, else downloaded); a directory = a cache
    dir holding that release file; a .safetensors file = a state dict of the same network."""

    name = f"torchxrayvision {XRV_WEIGHTS_NAME}"
    key = "xrv-densenet121-res224-all"

    def __init__(self, weights: str | Path | None = None):
        super().__init__()
        with warnings.catch_warnings():  # its import silences every warning process-wide; keep that local
            import torchxrayvision as xrv  # raises ImportError when absent: the caller skips the metric

        path = Path(weights).expanduser() if weights else None
        if path is not None and path.suffix == ".safetensors":
            from safetensors.torch import load_file

            self.net = xrv.models.DenseNet(weights=None, op_threshs=None)
            state = {k: v for k, v in load_file(str(path)).items() if k != "op_threshs"}  # a buffer, not weights
            try:
                self.net.load_state_dict(state)
            except Exception as exc:
                raise CxrError(f"--xrv-weights {path} is not a state dict of torchxrayvision's DenseNet-121 "
                               f"({exc.__class__.__name__}: {str(exc).splitlines()[0][:100]})") from None
        else:
            cache = path if path is not None else Path(xrv.utils.get_cache_dir()).expanduser()
            if path is not None and not path.is_dir():
                raise CxrError(f"--xrv-weights {path} is neither a .safetensors file nor a folder; pass the folder "
                               f"that holds {XRV_WEIGHTS_FILE}")
            local = cache / XRV_WEIGHTS_FILE
            # The release file is a pickled model that torchxrayvision itself loads, as after its own
            # download; only that exact file name is used.
            if not local.is_file() and (path is not None or not _github_reachable()):
                raise CxrError(f"the torchxrayvision weights {XRV_WEIGHTS_FILE} are not in {cache} and "
                               f"there is no internet: download {XRV_WEIGHTS_URL} into that folder")
            with contextlib.redirect_stdout(sys.stderr):  # its download messages are prints
                self.net = xrv.models.DenseNet(weights=XRV_WEIGHTS_NAME, cache_dir=str(cache))
        self.num_features = 1024
        self.eval()

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
    from .data import ChestXrayDataset, load_pairs

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
    meta = pd.read_csv(meta_path, keep_default_na=False)
    images, prompts, files, bad = [], [], [], 0
    for row in meta.itertuples():
        try:
            with Image.open(folder / row.file) as im:
                im = im.convert("L")
                if im.size != (resolution, resolution):
                    im = im.resize((resolution, resolution), Image.Resampling.LANCZOS)
                images.append(np.asarray(im, dtype=np.uint8))
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError):
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
    centred): exact, and an (n x m) problem instead of (d x d), so bootstrapping is cheap.
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


def bootstrap_fid(real: torch.Tensor, fake: torch.Tensor, resamples: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of FID over resamples of both sets."""
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(resamples):
        r = real[torch.randint(len(real), (len(real),), generator=generator)]
        f = fake[torch.randint(len(fake), (len(fake),), generator=generator)]
        values.append(frechet_distance(r, f))
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


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


def audit(generated: ImageSet, gen_features: torch.Tensor, reference: ImageSet, ref_features: torch.Tensor,
          ref_split: list[str], pixel_threshold: float, cosine_threshold: float) -> pd.DataFrame:
    """Each generated image's nearest real image by feature cosine and by pixel correlation;
    flagged when either is above its threshold. The real images are patient data."""
    def unit(x):
        return torch.nn.functional.normalize(x.double(), dim=1)

    cos = unit(gen_features) @ unit(ref_features).T
    def centred(images):  # float32: 7,000 real films at 128 px stay under 0.5 GB
        flat = images[:, 0].reshape(len(images), -1).float()
        flat = flat - flat.mean(1, keepdim=True)
        return torch.nn.functional.normalize(flat, dim=1)

    gen_px = centred(generated.images)
    best_corr, best_corr_idx = [], []
    ref_px = centred(reference.images)
    for start in range(0, len(gen_px), 256):  # chunked: n_gen x n_ref correlations
        corr = gen_px[start:start + 256] @ ref_px.T
        value, index = corr.max(dim=1)
        best_corr.append(value)
        best_corr_idx.append(index)
    corr_value, corr_index = torch.cat(best_corr), torch.cat(best_corr_idx)
    cos_value, cos_index = cos.max(dim=1)
    table = pd.DataFrame({
        "generated_file": generated.files, "prompt": generated.prompts,
        "nearest_by_pixels": [reference.files[i] for i in corr_index.tolist()],
        "nearest_by_pixels_split": [ref_split[i] for i in corr_index.tolist()],
        "pixel_correlation": corr_value.numpy(),
        "nearest_by_features": [reference.files[i] for i in cos_index.tolist()],
        "feature_cosine": cos_value.numpy(),
    })
    table["flagged"] = (table["pixel_correlation"] >= pixel_threshold) | (table["feature_cosine"] >= cosine_threshold)
    table["ref_index"] = corr_index.numpy()
    return table


# ---------------------------------------------------------------- the stage ------------------

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
    if cfg.n is not None and cfg.n < 2:
        raise CxrError(f"--n must be at least 2 (FID needs two images per set to estimate a covariance), got {cfg.n}")
    sets = parse_generated(cfg.generated)
    data_dir = resolve_data_dir(cfg.data_dir)
    out = Path(cfg.out)
    cache_dir = (Path(cfg.cache_dir) if cfg.cache_dir else out / "cache")
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
    is_splits = max(1, min(cfg.is_splits, n // 2))

    net = feature_net or load_feature_net(cfg)
    device = "cuda" if torch.cuda.is_available() else "cpu"
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
            low, high = bootstrap_fid(real_pool, pool, cfg.bootstrap, cfg.seed) if cfg.bootstrap else (None, None)
            rows.append({**base, "metric": "fid", "value": torchmetrics_fid(real_pool, pool, device),
                         "ci_low": low, "ci_high": high})
        if "kid" in cfg.metrics:
            mean, std = torchmetrics_kid(real_pool, pool, kid_subset, cfg.seed, device)
            rows.append({**base, "metric": "kid", "value": mean, "std": std})
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
    if "audit" in cfg.metrics and train is not None:
        reference = ImageSet("real", torch.cat([train.images, real.images]), train.prompts + real.prompts,
                             train.files + real.files)
        ref_split = ["train"] * len(train.images) + ["test"] * len(real.images)
        ref_pool = torch.cat([train_all[0], real_all])
        parts = []
        for name, image_set, pool, _ in compared[: len(generated)]:
            table = audit(image_set, pool, reference, ref_pool, ref_split, cfg.audit_pixel_threshold,
                          cfg.audit_cosine_threshold)
            table.insert(0, "set", name)
            parts.append(table)
            rows.append({"set": name, "metric": "audit_flagged", "value": int(table["flagged"].sum()),
                         "n_real": len(reference.images), "n_generated": len(table), "feature_network": net.name})
        audit_table = pd.concat(parts, ignore_index=True)
    if "xrv" in cfg.metrics:
        try:
            xrv_net = XRVFeatures(cfg.xrv_weights or None).to(device)
        except ImportError as exc:  # optional: skipped with a note, not fatal
            notes.append(f"XRV DenseNet FID skipped: torchxrayvision is not installed ({exc}); "
                         "pip install torchxrayvision")
        except CxrError as exc:
            if cfg.xrv_weights:  # weights the user named must load
                raise
            notes.append(f"XRV DenseNet FID skipped: {exc}")
        except Exception as exc:  # its download failing
            notes.append(f"XRV DenseNet FID skipped: {exc.__class__.__name__}: {str(exc).splitlines()[0][:120]} "
                         f"(download {XRV_WEIGHTS_URL} and pass --xrv-weights FOLDER)")
        else:
            x_real, _ = cached_embed(xrv_net, real_n, cache_dir, cfg.batch_size, progress, hits)
            for name, image_set, *_ in compared:
                x_pool, _ = embed(xrv_net, image_set.images, cfg.batch_size, f"xrv: {name}", progress)
                rows.append({"set": name, "metric": "fid_xrv", "value": torchmetrics_fid(x_real, x_pool, device),
                             "n_real": len(x_real), "n_generated": len(x_pool), "feature_network": xrv_net.name})

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
        "config": config_to_dict(cfg), "versions": library_versions()})
    if len(audit_table):
        write_csv(out / "audit.csv", audit_table.drop(columns="ref_index"))
    write_csv(out / "diversity.csv", diversity_table)
    folder = out / "figures"
    figures = {"metrics": plots.metric_intervals(table, save_to=folder / "metrics.png")}
    if len(audit_table):
        figures["nearest_pairs"] = plots.nearest_pairs(audit_table, {g.name: g for g in generated}, reference,
                                                       save_to=folder / "nearest_pairs.png")
    if len(diversity_table):
        figures["diversity"] = plots.diversity_per_prompt(diversity_table, save_to=folder / "diversity.png")
    return EvalResult(out, table, audit_table, diversity_table, net.name, notes, hits, figures)


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
    wide = table.assign(cell=table.apply(cell, axis=1)).pivot(index="set", columns="metric", values="cell")
    wide = wide[metric_order(table["metric"])]
    counts = table.groupby("set")["n_generated"].max().rename("N").astype("Int64").astype(str).replace("<NA>", MISSING)
    wide = wide.join(counts).reindex(list(dict.fromkeys(table["set"])))
    wide = wide.rename(columns={m: metric_label(m) for m in wide.columns if m != "N"})
    wide.columns.name = None
    return wide.fillna(MISSING)
