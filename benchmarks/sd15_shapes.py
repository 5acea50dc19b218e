"""SD1.5-shaped parts with random weights, for benchmarks where the real weights cannot be had:
the same layout, compute and memory as Stable Diffusion v1.5 (facts.md), built offline.

Benchmark-only (the package's tests and stages never use them); the scripts here import it as a
sibling module (`python benchmarks/bench_train.py` puts benchmarks/ on sys.path).
"""

from __future__ import annotations

from cxr_helpers.demo.tiny_model import clip_text_config, vae_config
from cxr_helpers.models.tokenizer import load_tokenizer, write_clip_tokenizer


def sd15_unet_config() -> dict:
    """SD1.5's UNet config (facts.md): 860 M parameters."""
    return dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8,
    )


def sd15_vae_config() -> dict:
    return vae_config((128, 256, 512, 512), layers_per_block=2, sample_size=512)


def sd15_text_config() -> dict:
    return clip_text_config(768, 3072, heads=12, layers=12)


def sd15_shaped_parts(seed: int = 0, device: str = "cpu", dtype=None):
    """SD1.5-shaped (tokenizer, text_encoder, vae, unet, noise_scheduler) with random weights:
    the same compute and memory as the real model, for benchmarks where its weights cannot be had."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = load_tokenizer(write_clip_tokenizer(tmp))
    torch.manual_seed(seed)
    with torch.device(device):
        text_encoder = CLIPTextModel(CLIPTextConfig(**sd15_text_config()))
        vae = AutoencoderKL(**sd15_vae_config())
        unet = UNet2DConditionModel(**sd15_unet_config())
    if dtype is not None:
        for part in (text_encoder, vae, unet):
            part.to(dtype)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, steps_offset=1, clip_sample=False)
    return tokenizer, text_encoder, vae, unet, scheduler
