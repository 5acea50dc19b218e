"""Loading Stable Diffusion parts from a hub id or a local diffusers directory, and the
offline stand-in: a tiny SD-shaped pipeline built here, in diffusers' own on-disk layout
(its tokenizer is SD1.5's, from tokenizer.py; hub access is in hub.py).

The same loader serves SD1.5 on Kaggle and the tiny model offline, so the code under test is
the code users run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .config import CLIP_MAX_TOKENS, TinyModelConfig, save_config
from .errors import CxrError
from .hub import from_hub, is_local
from .layout import TINY_MODEL_CONFIG_JSON
from .tokenizer import CLIP_VOCAB_SIZE, load_tokenizer, write_clip_tokenizer

# SD1.5's scheduler config (scheduler/scheduler_config.json of the hub repo).
SD15_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
)
SD15_LATENT_SCALE = 0.18215


# ---------------------------------------------------------------- pipelines ------------------

def _dtype_argument() -> str:
    """The name from_pretrained takes the dtype under: newer diffusers renamed `torch_dtype` to
    `dtype` (the old name prints a deprecation warning into every notebook); 0.32 knows only
    `torch_dtype`. Detected by the helper the newer releases resolve the two names with."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401
    except ImportError:
        return "torch_dtype"
    return "dtype"


def load_pipeline(model: str | Path, torch_dtype=None):
    """A StableDiffusionPipeline from a hub id or a local diffusers dir, safety checker off.

    The safety checker blanks chest X-rays (it flags them), so it is never loaded.
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as df_logging

    df_logging.set_verbosity_error()
    model = str(model)
    kwargs = dict(safety_checker=None, requires_safety_checker=False)
    if torch_dtype is not None:
        kwargs[_dtype_argument()] = torch_dtype
    if is_local(model):
        path = Path(model).expanduser()
        if not (path / "model_index.json").is_file():
            raise CxrError(f"model dir {model!r} has no model_index.json; pass a diffusers pipeline "
                           "folder (e.g. made by `python -m cxr_helpers tiny-model`) or a hub id")
        return StableDiffusionPipeline.from_pretrained(str(path), **kwargs)
    return from_hub(StableDiffusionPipeline.from_pretrained, model, "model", **kwargs)


# ---------------------------------------------------------------- tiny model -----------------

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

    from .ownership import claim

    df_logging.set_verbosity_error()
    out = Path(cfg.out)
    claim(out, "tiny_model", _identity(cfg), cfg.overwrite)  # never into a folder it did not make
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


def _identity(cfg: TinyModelConfig) -> dict:
    """The settings that make the weights (not where they go). Random weights: the seed alone."""
    from .config import output_identity

    if not cfg.pretrain:
        return {"seed": cfg.seed, "pretrain": False}
    return output_identity(cfg)


def tiny_model_is_built(out: str | Path, cfg: TinyModelConfig) -> bool:
    """True when `out` holds a complete tiny model made with `cfg`'s settings (so it can be reused)."""
    from .ownership import read_owner

    out = Path(out)
    if not ((out / TINY_MODEL_CONFIG_JSON).is_file() and (out / "model_index.json").is_file()):
        return False  # the config is written last: without it the model is not complete
    record = read_owner(out)
    return record is not None and record["stage"] == "tiny_model" and record["identity"] == _identity(cfg)


# ---------------------------------------------------------------- training parts -------------

def load_training_parts(model: str | Path, weight_dtype=None):
    """(tokenizer, text_encoder, vae, unet, noise_scheduler) of a diffusers model, hub id or dir.

    The noise scheduler is a DDPMScheduler built from the model's scheduler config (as the
    diffusers training examples do), so its prediction type is the model's.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.utils import logging as df_logging
    from transformers import CLIPTextModel

    df_logging.set_verbosity_error()
    model = str(model)
    if is_local(model) and not (Path(model).expanduser() / "model_index.json").is_file():
        raise CxrError(f"model dir {model!r} has no model_index.json; pass a diffusers pipeline "
                       "folder (e.g. made by `python -m cxr_helpers tiny-model`) or a hub id")
    tokenizer = load_tokenizer(model)
    kwargs = {} if weight_dtype is None else {"torch_dtype": weight_dtype}

    def part(cls, subfolder, **extra):
        def loader(name, **kw):
            return cls.from_pretrained(name, subfolder=subfolder, **kw, **extra)
        if is_local(model):
            try:
                return loader(str(Path(model).expanduser()))
            except Exception as exc:
                raise CxrError(f"could not load {subfolder}/ of {model} ({exc.__class__.__name__}: "
                               f"{str(exc).splitlines()[0][:160]}); is it a complete diffusers model?") from None
        return from_hub(loader, model, f"model's {subfolder}")

    text_encoder = part(CLIPTextModel, "text_encoder", **kwargs)
    vae = part(AutoencoderKL, "vae", **kwargs)
    unet = part(UNet2DConditionModel, "unet", **kwargs)
    noise_scheduler = part(DDPMScheduler, "scheduler")
    return tokenizer, text_encoder, vae, unet, noise_scheduler
