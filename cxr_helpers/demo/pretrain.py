"""A small pretrained base for the offline demo: the tiny SD-shaped pipeline, trained here on
procedural films under captions that say nothing about them, so that it draws chest films and
has read report words but knows no findings.

It stands where SD1.5 stands in the real run. SD1.5 brings a general prior (it draws images and
follows generic words) and the LoRA teaches it what the impressions mean; here the prior is "a
frontal / lateral chest x-ray" and report words seen beside unrelated films, and the LoRA must
teach it what "cardiomegaly" or "left pleural effusion" look like. Two steps, as SD's own parts were made:
1. the VAE as an autoencoder on film windows (fully convolutional, so windows teach it whole
   films at a quarter of the cost), then its latent scale from the latents' spread, as SD's
   0.18215 was chosen;
2. the UNet in full on those latents, each film captioned with its view ("a lateral chest
   x-ray"), "a chest x-ray", no caption (for classifier-free guidance) or the impression of an
   unrelated report (caption_films); the text tower stays as built (random, frozen), as
   SD1.5's CLIP stayed frozen.

The films come from the demo's renderer (films.py) but from their own seed stream, so the
base never sees a demo image. Deterministic for a seed on one machine and torch version.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from ..core.bars import tqdm

from ..config.stages import TinyModelConfig, TrainConfig
from ..data.image_cache import resize_xray
from ..training.step import diffusion_loss
from .synthetic_dataset import draw_report, write_impression
from .films import draw_patient, render

GENERIC_CAPTION = "a chest x-ray"
EMPTY_CAPTION_SHARE = 0.1  # per generic caption and per empty one
DECOY_SHARE = 0.4  # another report's impression; the rest name the view
BATCH = 32
VAE_LR, UNET_LR = 2e-3, 1e-3
# The base's films are drawn from a seed stream no demo dataset uses (synthetic_dataset.py seeds
# report uid with [seed, uid]; these use [seed, _FILM_STREAM, i]).
_FILM_STREAM = 7_777


def render_films(n: int, resolution: int, seed: int, progress: bool = True) -> tuple[torch.Tensor, list[str]]:
    """n films (N, 3, R, R) in [-1, 1], drawn and resized as the demo dataset's are, and their views."""
    films, views = [], []
    for i in tqdm(range(n), desc="pretraining: films", disable=not progress):
        rng = np.random.default_rng([seed, _FILM_STREAM, i])
        report = draw_report(i, rng)
        # Drawn at ~2.5x and resized down, as the demo's films are (320 px -> the training size).
        height = int(2.5 * resolution * rng.uniform(0.9, 1.1))
        width = int(height * rng.uniform(0.8, 1.25))
        view = "Frontal" if rng.random() < 0.5 else "Lateral"
        pixels = render(report.findings, view, draw_patient(rng), height, width, rng)
        small = np.asarray(resize_xray(Image.fromarray(pixels, "L"), resolution), dtype=np.float32)
        films.append(torch.from_numpy(small / 127.5 - 1.0))
        views.append(view)
    return torch.stack(films).unsqueeze(1).expand(-1, 3, -1, -1).contiguous(), views


def caption_films(views: list[str], seed: int) -> list[str]:
    """Each film's caption, drawn without looking at the film: its view ("a frontal chest x-ray"),
    "a chest x-ray", nothing, or the impression of another, independent report. The base reads
    the reports' words but never with the films they describe, so it learns that they say nothing
    about the film: its films do not depend on which finding a prompt names (adherence ~0.5). With
    view captions only, report words were unseen text that moved its films arbitrarily, and by
    chance sometimes towards a finding (a base at 0.71 for effusion on one torch version)."""
    rng = np.random.default_rng([seed, _FILM_STREAM + 1])
    captions = []
    for i, (roll, view) in enumerate(zip(rng.random(len(views)), views, strict=True)):
        if roll < EMPTY_CAPTION_SHARE:
            captions.append("")
        elif roll < 2 * EMPTY_CAPTION_SHARE:
            captions.append(GENERIC_CAPTION)
        elif roll < 2 * EMPTY_CAPTION_SHARE + DECOY_SHARE:
            captions.append(write_impression(draw_report(i, rng), rng))
        else:
            captions.append(f"a {view.lower()} chest x-ray")
    return captions


@torch.no_grad()
def _encode(vae, films: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior's mean and std for every film, 64 at a time."""
    parts = [vae.encode(films[i:i + 64]).latent_dist for i in range(0, len(films), 64)]
    return torch.cat([p.mean for p in parts]), torch.cat([p.std for p in parts])


def train_vae(vae, films: torch.Tensor, cfg: TinyModelConfig, progress: bool = True) -> None:
    """Autoencoder steps on random windows (reconstruction from a posterior sample + SD's tiny KL
    weight)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=VAE_LR, weight_decay=0.0)
    window = cfg.resolution // 2
    vae.train()
    for _ in tqdm(range(cfg.vae_steps), desc="pretraining: VAE", disable=not progress):
        rows = torch.randint(0, len(films), (BATCH,), generator=gen)
        y, x = torch.randint(0, cfg.resolution - window + 1, (2,), generator=gen).tolist()
        batch = films[rows, :, y:y + window, x:x + window]
        posterior = vae.encode(batch).latent_dist
        # Decoded from a sample, as SD's VAE was trained: the posterior's spread then shrinks to
        # what the decoder tolerates. (Decoding the mean leaves it at its initial ~1, and train
        # samples its latents from the posterior: that noise drowned the findings.)
        recon = vae.decode(posterior.sample(generator=gen)).sample
        loss = F.mse_loss(recon, batch) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    vae.eval()


def train_unet(unet, latents: torch.Tensor, captions: torch.Tensor, scheduler, cfg: TinyModelConfig,
               progress: bool = True) -> list[float]:
    """Every UNet weight on (latent, caption embedding) pairs: epsilon prediction, as SD1.5, with
    the train stage's loss at its defaults (no offset noise, no min-SNR weighting)."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    opt = torch.optim.AdamW(unet.parameters(), lr=UNET_LR, weight_decay=0.0)
    loss_settings = TrainConfig()
    unet.train()
    losses = []
    for _ in tqdm(range(cfg.unet_steps), desc="pretraining: UNet", disable=not progress):
        rows = torch.randint(0, len(latents), (BATCH,), generator=gen)
        # The posterior means as they are (not sampled), at noise and timesteps drawn from `gen`.
        loss = diffusion_loss(unet, scheduler, latents[rows], captions[rows], gen, loss_settings, "epsilon")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    unet.eval()
    return losses


def pretrain_pipeline(pipe, cfg: TinyModelConfig, progress: bool = True) -> dict:
    """Train `pipe`'s VAE, then its UNet, in place; returns what was done, for the model's config."""
    from diffusers import DDPMScheduler

    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    films, views = render_films(cfg.films, cfg.resolution, cfg.seed, progress)
    train_vae(pipe.vae, films, cfg, progress)
    means, stds = _encode(pipe.vae, films)
    # The latent scale: 1 / the latents' standard deviation, as SD1.5's 0.18215 was chosen.
    scale = float(1.0 / means.std())
    pipe.vae.register_to_config(scaling_factor=scale)
    latents = means * scale
    # train() draws its latents from the posterior: its spread must be small beside the latents'
    # (an untrained log-variance head leaves it ~1 and buries the films in noise).
    noise_ratio = float(stds[:64].mean() / means[:64].std())
    with torch.no_grad():
        ids = pipe.tokenizer(caption_films(views, cfg.seed), padding="max_length", truncation=True,
                             max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
        captions = torch.cat([pipe.text_encoder(ids[i:i + 64])[0] for i in range(0, len(ids), 64)])
    # The noise schedule the project trains with: a DDPMScheduler from the pipeline's config.
    losses = train_unet(pipe.unet, latents, captions, DDPMScheduler.from_config(pipe.scheduler.config), cfg, progress)
    summary = {"latent_scale": round(scale, 5), "posterior_std_over_latent_std": round(noise_ratio, 4),
               "unet_loss_last_100": round(float(np.mean(losses[-100:])), 5),
               "seconds": round(time.perf_counter() - start, 1)}
    logging.getLogger(__name__).info("pretrained the tiny model: %s", summary)
    return summary
