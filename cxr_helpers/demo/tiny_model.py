"""The offline stand-in for SD1.5: a tiny SD-shaped pipeline built here, in diffusers' own on-disk
layout (its tokenizer is SD1.5's, from tokenizer.py), with random weights or pretrained on the
demo's synthetic films (pretrain.py); and the configs of SD1.5-shaped parts the benchmarks build.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..config.stages import CLIP_MAX_TOKENS, TinyModelConfig, output_identity, save_config
from ..core.layout import MODEL_INDEX_JSON, TINY_MODEL_CONFIG_JSON
from ..models.tokenizer import CLIP_VOCAB_SIZE, load_tokenizer, write_clip_tokenizer

# SD1.5's scheduler config (scheduler/scheduler_config.json of the hub repo).
SD15_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
)
SD15_LATENT_SCALE = 0.18215


def tiny_unet_config() -> dict:
    """SD1.5's UNet layout (cross-attention down blocks, then a plain one; mirrored up), small."""
    return dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=32,
    )


def vae_config(widths: tuple[int, ...], layers_per_block: int, sample_size: int, **extra) -> dict:
    """SD1.5's VAE layout: four resolution levels, so the scale factor is 8 (128 px -> 16 x 16)."""
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=layers_per_block,
        block_out_channels=widths, **extra,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=sample_size, scaling_factor=SD15_LATENT_SCALE,
    )


def clip_text_config(width: int, intermediate: int, heads: int, layers: int) -> dict:
    """SD1.5's CLIP text tower: its vocabulary, 77 positions and special token ids, any size."""
    return dict(
        vocab_size=CLIP_VOCAB_SIZE, max_position_embeddings=CLIP_MAX_TOKENS, hidden_size=width,
        intermediate_size=intermediate, num_attention_heads=heads, num_hidden_layers=layers, hidden_act="quick_gelu",
        projection_dim=width, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )


def tiny_vae_config() -> dict:
    return vae_config((16, 16, 32, 32), layers_per_block=1, sample_size=128, norm_num_groups=8)


def tiny_text_config() -> dict:
    """32 wide and 2 layers deep."""
    return clip_text_config(32, 37, heads=4, layers=2)


def build_tiny_pipeline(seed: int = 0):
    """A tiny StableDiffusionPipeline with random weights, the same for the same seed."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = load_tokenizer(write_clip_tokenizer(tmp))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config())
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**tiny_vae_config())
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**tiny_text_config()))
    scheduler = PNDMScheduler(**SD15_SCHEDULER)
    # SD1.5's scheduler_config.json carries clip_sample=false (read by DDPM/DDIM in training).
    scheduler.register_to_config(clip_sample=False)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def make_tiny_model(cfg: TinyModelConfig, progress: bool = True) -> Path:
    """Write the tiny pipeline to `cfg.out` so that StableDiffusionPipeline.from_pretrained loads it:
    random weights, or with `cfg.pretrain` a base trained on synthetic films (pretrain.py)."""
    from diffusers.utils import logging as df_logging

    from ..core.ownership import owned

    df_logging.set_verbosity_error()
    out = Path(cfg.out)
    # Never into a folder it did not make, and one run at a time (pretraining takes minutes).
    with owned(out, "tiny_model", output_identity(cfg), cfg.overwrite):
        return _write_tiny_model(cfg, out, progress)


def _write_tiny_model(cfg: TinyModelConfig, out: Path, progress: bool) -> Path:
    pipe = build_tiny_pipeline(cfg.seed)
    pretraining = {}
    if cfg.pretrain:
        from .pretrain import pretrain_pipeline

        pretraining = pretrain_pipeline(pipe, cfg, progress)
    pipe.save_pretrained(out, safe_serialization=True)
    # Replace the tokenizer folder with the full SD1.5 layout (vocab.json + merges.txt too).
    write_clip_tokenizer(out / "tokenizer")
    note = ("pretrained here on synthetic films under captions unrelated to them (it draws films, it knows no "
            "findings): the offline demo's stand-in for SD1.5, not a model" if cfg.pretrain
            else "random weights: a stand-in for SD1.5 for offline runs, not a model")
    save_config(cfg, out / TINY_MODEL_CONFIG_JSON, note=note, **({"pretraining": pretraining} if pretraining else {}))
    logging.getLogger(__name__).info("tiny model written to %s", out)
    return out


def tiny_model_is_built(out: str | Path, cfg: TinyModelConfig) -> bool:
    """True when `out` holds a complete tiny model made with `cfg`'s settings (so it can be reused)."""
    from ..core.ownership import read_owner

    out = Path(out)
    if not ((out / TINY_MODEL_CONFIG_JSON).is_file() and (out / MODEL_INDEX_JSON).is_file()):
        return False  # the config is written last: without it the model is not complete
    record = read_owner(out)
    return record is not None and record["stage"] == "tiny_model" and record["identity"] == output_identity(cfg)
