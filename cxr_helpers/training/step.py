"""One training step's parts: its seeded randomness, its batch rows, latents sampled from the
cached encodings, and the diffusion loss (as in diffusers' LoRA example)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config.stages import TrainConfig
from .encodings import Encodings


def step_generator(seed: int, step: int, micro: int = 0, process: int = 0) -> torch.Generator:
    """All randomness of one micro-batch comes from here: resuming replays it exactly."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1_009 + micro) * 101 + process)


def batch_indices(n: int, seed: int, position: int, size: int) -> list[int]:
    """`size` indices from an endless stream of seeded per-epoch permutations of range(n)."""
    out = []
    while len(out) < size:
        epoch, offset = divmod(position, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7_919 + epoch))
        take = perm[offset: offset + size - len(out)].tolist()
        out += take
        position += len(take)
    return out


def diffusion_loss(unet, noise_scheduler, latents, embeddings, generator, cfg: TrainConfig,
                   prediction_type: str) -> torch.Tensor:
    """Noise-prediction MSE (optionally min-SNR weighted), as in diffusers' LoRA example."""
    from diffusers.training_utils import compute_snr

    device = latents.device
    noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
    if cfg.noise_offset:
        offset = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator)
        noise += cfg.noise_offset * offset.to(device, latents.dtype)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                              generator=generator).to(device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    target = noise if prediction_type == "epsilon" else noise_scheduler.get_velocity(latents, noise, timesteps)
    pred = unet(noisy, timesteps, embeddings, return_dict=False)[0]
    if cfg.snr_gamma is None:
        return F.mse_loss(pred.float(), target.float(), reduction="mean")
    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.clamp(snr, max=cfg.snr_gamma)
    weights = weights / snr if prediction_type == "epsilon" else weights / (snr + 1)
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=[1, 2, 3])
    return (loss * weights).mean()


def sample_latents(enc: Encodings, rows: list[int], generator, flips: torch.Tensor | None,
                   scale: float) -> torch.Tensor:
    """A latent sample from each row's cached posterior (mirrored rows from the flipped cache)."""
    moments = enc.moments[rows]
    if flips is not None and enc.moments_flipped is not None:
        moments = torch.where(flips[:, None, None, None], enc.moments_flipped[rows], moments)
    mean, logvar = moments.float().chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    return (mean + std * torch.randn(mean.shape, generator=generator)) * scale
