"""The frozen encoders' outputs, computed once and cached on disk.

The VAE and the text encoder never change during training, so every training image's latent
distribution (both flips when flipping is on) and every distinct prompt's embedding are computed
once, saved as safetensors under a key of everything they depend on, and reused by every step
and every later run (in a loop that encodes every step, the VAE encode alone is a third of
the step's time).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from ..core.bars import tqdm

from ..config.stages import TrainConfig
from ..core.cache_entries import read_entry, write_entry
from ..core.layout import CACHE_IMAGES_SUBDIR, encodings_name, image_path
from ..core.ownership import model_fingerprint

ENCODER_PARTS = ("vae", "text_encoder", "tokenizer")  # what the cached encodings depend on


@dataclass
class Encodings:
    """Frozen-encoder outputs for every training pair, on the CPU."""

    moments: torch.Tensor  # (N, 2 * latent_channels, h, w): the VAE's mean and log-variance
    moments_flipped: torch.Tensor | None  # the same for the mirrored images
    prompt_index: torch.Tensor  # (N,) row of `embeddings` for each pair
    embeddings: torch.Tensor  # (P, 77, D): one per distinct prompt
    key: str
    hit: bool  # True when read from the cache, nothing encoded
    encoded_images: int
    encoded_prompts: int

    def __len__(self) -> int:
        """The number of pairs."""
        return len(self.prompt_index)


def cache_key(cfg: TrainConfig, pairs: pd.DataFrame, data_dir: Path, weight_dtype: torch.dtype) -> str:
    h = hashlib.sha256()
    h.update(model_fingerprint(cfg.model, parts=ENCODER_PARTS).encode())  # the frozen encoders only
    h.update(f"|{cfg.resolution}|{cfg.fit}|{cfg.random_flip}|{weight_dtype}|".encode())
    for filename, prompt in zip(pairs["filename"], pairs["prompt"], strict=True):
        source = image_path(data_dir, filename)
        stat = source.stat() if source.exists() else None
        h.update(f"{filename}:{stat.st_size if stat else -1}:{stat.st_mtime_ns if stat else -1}:{prompt}\n".encode())
    return h.hexdigest()[:20]


def encode_prompts(prompts: list[str], tokenizer, text_encoder, device, batch_size: int = 64) -> torch.Tensor:
    """CLIP last hidden states (P, 77, D), padded to 77 like SD1.5's pipeline does."""
    out = []
    for i in range(0, len(prompts), batch_size):
        ids = tokenizer(prompts[i:i + batch_size], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            out.append(text_encoder(ids.to(device), return_dict=False)[0].cpu())
    return torch.cat(out)


def encode_images(pixels: torch.Tensor, vae, device, dtype) -> torch.Tensor:
    """The VAE posterior's parameters (mean and log-variance), not a sample: each step samples."""
    with torch.no_grad():
        return vae.encode(pixels.to(device, dtype)).latent_dist.parameters.cpu()


def load_or_build_encodings(cfg: TrainConfig, pairs: pd.DataFrame, data_dir: Path, cache_dir: Path,
                            tokenizer, text_encoder, vae, device, weight_dtype, progress: bool = True) -> Encodings:
    key = cache_key(cfg, pairs, data_dir, weight_dtype)
    path = cache_dir / encodings_name(key)
    prompts = sorted(set(pairs["prompt"]))
    index = {p: i for i, p in enumerate(prompts)}
    prompt_index = torch.tensor([index[p] for p in pairs["prompt"]], dtype=torch.long)
    rows = {"moments": len(pairs), "embeddings": len(prompts)}
    if cfg.random_flip:
        rows["moments_flipped"] = len(pairs)
    cached = read_entry(path, key, rows)  # None when absent, or damaged or foreign (then recomputed)
    if cached is not None:
        return Encodings(cached["moments"], cached.get("moments_flipped"), prompt_index, cached["embeddings"],
                         key, True, 0, 0)
    moments, flipped = _encode_pair_images(cfg, pairs, data_dir, cache_dir, vae, device, weight_dtype, progress)
    embeddings = encode_prompts(prompts, tokenizer, text_encoder, device)
    tensors = {"moments": moments, "embeddings": embeddings.contiguous()}
    if flipped is not None:
        tensors["moments_flipped"] = flipped
    write_entry(path, tensors, key, model=cfg.model, resolution=str(cfg.resolution))
    return Encodings(tensors["moments"], tensors.get("moments_flipped"), prompt_index, embeddings, key, False,
                     len(moments), len(prompts))


def _encode_pair_images(cfg: TrainConfig, pairs: pd.DataFrame, data_dir: Path, cache_dir: Path, vae, device,
                        weight_dtype, progress: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every pair's image through the VAE, and its mirror image when flipping is on."""
    from ..data.dataset import ChestXrayDataset

    dataset = ChestXrayDataset(pairs, data_dir, cfg.resolution, cache_dir=cache_dir / CACHE_IMAGES_SUBDIR, fit=cfg.fit)
    dataset.warm_cache(progress=progress)
    moments, flipped = [], []
    step = 16
    for start in tqdm(range(0, len(dataset), step), desc="encoding images (once)", disable=not progress):
        pixels = torch.stack([dataset[i]["pixel_values"] for i in range(start, min(start + step, len(dataset)))])
        moments.append(encode_images(pixels, vae, device, weight_dtype))
        if cfg.random_flip:
            flipped.append(encode_images(pixels.flip(-1), vae, device, weight_dtype))
    return torch.cat(moments).contiguous(), torch.cat(flipped).contiguous() if flipped else None
