"""The metrics of the evaluation stage, computed from features (or pixels) already in memory.

torchmetrics computes FID, KID and IS from the shared features (`Precomputed` stands where its
network would be); `frechet_distance` is the project's own float64 FID, fast enough for the
jackknife interval (`fid_interval`) and FID at infinite N (`fid_infinity`), which recompute it
dozens of times. `prdc` and `diversity` complete the set. Which metric a name in
EvalConfig.metrics reports is `registry.METRICS`.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import torch
from torch import nn

from .image_sets import ImageSet


class Precomputed(nn.Module):
    """Stands where torchmetrics' network would be: the features are already computed."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


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
        kid = KernelInceptionDistance(feature=Precomputed(real.shape[1]), subset_size=subset,
                                      normalize=False).to(device)
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


# MS-SSIM's five scale weights (Wang, Simoncelli & Bovik 2003), finest first.
MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def ms_ssim_window(size: int) -> int:
    """The window in px: 7 fits 128 px images at 5 scales; smaller images take 3."""
    return 7 if size > 6 * 16 else 3


def ms_ssim_scales(size: int) -> int:
    """How many of MS-SSIM's five scales an image of `size` px has room for: torchmetrics pads
    each scale by 5 px (its Gaussian, sigma 1.5), so the coarsest must stay wider than 5 px
    (128 px: all 5; the demo's 64 px: 4)."""
    scales = len(MS_SSIM_BETAS)
    while scales > 1 and size / 2 ** (scales - 1) <= 5:
        scales -= 1
    return scales


def diversity(image_set: ImageSet) -> pd.DataFrame:
    """Mean pairwise MS-SSIM among the images of each prompt (lower = more diverse), with the
    window and scales the image size has room for (fewer scales: their weights renormalised)."""
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as ms_ssim

    rows = []
    by_prompt: dict[str, list[int]] = {}
    for i, prompt in enumerate(image_set.prompts):
        by_prompt.setdefault(prompt, []).append(i)
    size = image_set.images.shape[-1]
    scales, kernel = ms_ssim_scales(size), ms_ssim_window(size)
    betas = MS_SSIM_BETAS if scales == len(MS_SSIM_BETAS) else tuple(
        b / sum(MS_SSIM_BETAS[:scales]) for b in MS_SSIM_BETAS[:scales])
    for prompt, idx in by_prompt.items():
        if len(idx) < 2:
            continue
        imgs = image_set.images[idx, :1].float() / 255.0
        scores = []
        for a in range(len(idx)):
            for b in range(a + 1, len(idx)):
                scores.append(float(ms_ssim(imgs[a:a + 1], imgs[b:b + 1], data_range=1.0, kernel_size=kernel,
                                            betas=betas)))
        rows.append({"prompt": prompt, "images": len(idx), "ms_ssim": float(np.mean(scores))})
    return pd.DataFrame(rows, columns=["prompt", "images", "ms_ssim"])
