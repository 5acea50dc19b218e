"""Loading Stable Diffusion parts from a hub id or a local diffusers directory, and the
offline stand-in: a tiny SD-shaped pipeline built here, in diffusers' own on-disk layout.

The same loader serves SD1.5 on Kaggle and the tiny model offline, so the code under test is
the code users run.
"""

from __future__ import annotations

import gzip
import json
import logging
from functools import lru_cache
from importlib import resources
from pathlib import Path

from .config import CLIP_MAX_TOKENS, RETIRED_MODEL_IDS, SD15_MODEL_ID, TinyModelConfig, save_config
from .errors import CxrError
from .io import write_json, write_text

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_VOCAB_SIZE = 49408
# SD1.5's scheduler config (scheduler/scheduler_config.json of the hub repo).
SD15_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
)
SD15_LATENT_SCALE = 0.18215


def _offline_hint(model: str) -> str:
    return (
        f"{model!r} is fetched from the Hugging Face hub, which needs internet (on Kaggle: "
        "Settings > Internet on); or pass a local diffusers directory"
    )


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers at all (fails fast offline, instead of the hub
    client's minutes of retries)."""
    import os
    from urllib.parse import urlparse

    from huggingface_hub import constants

    from .environment import can_reach

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    return can_reach(urlparse(constants.ENDPOINT).hostname or "huggingface.co", timeout)


def _from_hub(loader, model: str, what: str, **kwargs):
    """Load from the local hub cache if there, else from the hub if reachable, else explain."""
    try:
        return loader(model, local_files_only=True, **kwargs)
    except Exception:
        pass
    if model in RETIRED_MODEL_IDS:  # a 404 from the hub would read like a typo or a login problem
        raise CxrError(f"{model!r} was deleted from the Hugging Face hub in 2024; use its maintained copy "
                       f"{RETIRED_MODEL_IDS[model]!r} (same weights and licence)")
    if not hub_reachable():
        raise CxrError(f"could not load the {what}: {_offline_hint(model)}")
    try:
        return loader(model, **kwargs)
    except Exception as exc:
        raise CxrError(f"could not load the {what} ({exc.__class__.__name__}): {_offline_hint(model)}") from None


def _check_tokenizer(tokenizer, source: str):
    # transformers 5 can build a CLIP tokenizer with an empty vocabulary when files are
    # missing; that would silently miscount every prompt.
    if len(tokenizer) < 1000 or tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise CxrError(f"the tokenizer from {source} has {len(tokenizer)} tokens and no start/end "
                       "tokens; point at a diffusers model's folder or its tokenizer folder")
    return tokenizer


def _is_local(model: str | Path) -> bool:
    text = str(model)
    return Path(text).exists() or text.startswith((".", "/", "~")) or text.count("/") != 1


# ---------------------------------------------------------------- tokenizer ------------------

def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable character map (as in OpenAI's CLIP tokenizer)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """SD1.5's CLIP BPE vocabulary, rebuilt from the merges shipped in this package.

    The merges are the first 48,894 of OpenAI CLIP's `bpe_simple_vocab_16e6.txt` (MIT); the
    vocabulary is the 256 byte characters, the same with `</w>`, one token per merge, then the
    start and end tokens: 49,408 ids, exactly SD1.5's tokenizer.
    """
    raw = resources.files("cxr_helpers").joinpath("assets/clip_bpe_merges.txt.gz").read_bytes()
    merges = gzip.decompress(raw).decode("utf-8").split("\n")[1:]
    merges = [m for m in merges if m][: CLIP_VOCAB_SIZE - 512 - 2]
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    tokens += [CLIP_BOS, CLIP_EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_clip_tokenizer(out_dir: str | Path) -> Path:
    """Write SD1.5's CLIP tokenizer (vocab.json, merges.txt and configs) into `out_dir`."""
    from transformers import CLIPTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    # vocab.json + merges.txt: the files SD1.5's own tokenizer folder has, readable by any
    # transformers version; save_pretrained adds tokenizer.json for the fast backend.
    write_text(out_dir / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    write_text(out_dir / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(
        str(out_dir / "vocab.json"), str(out_dir / "merges.txt"),
        model_max_length=CLIP_MAX_TOKENS, pad_token=CLIP_EOS,
    )
    tokenizer.save_pretrained(out_dir)
    write_json(out_dir / "special_tokens_map.json", {
        "bos_token": CLIP_BOS, "eos_token": CLIP_EOS, "pad_token": CLIP_EOS, "unk_token": CLIP_EOS,
    })
    return out_dir


def load_tokenizer(model: str | Path):
    """The CLIP tokenizer of a diffusers model (hub id or local dir), or a tokenizer dir."""
    from transformers import CLIPTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "sequence length is longer than..." is our job to report
    model = str(model)
    if _is_local(model):
        path = Path(model).expanduser()
        if not path.is_dir():
            raise CxrError(f"tokenizer {model!r} is not a directory; pass a diffusers model dir, "
                           f"a tokenizer dir, or a hub id such as {SD15_MODEL_ID}")
        folder = path / "tokenizer" if (path / "tokenizer").is_dir() else path
        if not any((folder / f).is_file() for f in ("vocab.json", "tokenizer.json")):
            raise CxrError(f"{folder} holds no tokenizer (vocab.json or tokenizer.json); pass a "
                           "diffusers model dir (with a tokenizer/ folder) or a tokenizer dir")
        try:
            tokenizer = CLIPTokenizer.from_pretrained(str(folder))
        except Exception as exc:  # transformers raises OSError, ValueError, TypeError...
            raise CxrError(f"could not load a CLIP tokenizer from {folder} ({exc.__class__.__name__}); "
                           "it needs vocab.json and merges.txt or tokenizer.json") from None
        return _check_tokenizer(tokenizer, str(folder))
    def load_checked(name, **kwargs):
        return _check_tokenizer(CLIPTokenizer.from_pretrained(name, **kwargs), name)

    return _from_hub(load_checked, model, "tokenizer", subfolder="tokenizer")


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
    if _is_local(model):
        path = Path(model).expanduser()
        if not (path / "model_index.json").is_file():
            raise CxrError(f"model dir {model!r} has no model_index.json; pass a diffusers pipeline "
                           "folder (e.g. made by `python -m cxr_helpers tiny-model`) or a hub id")
        return StableDiffusionPipeline.from_pretrained(str(path), **kwargs)
    return _from_hub(StableDiffusionPipeline.from_pretrained, model, "model", **kwargs)


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


def make_tiny_model(cfg: TinyModelConfig) -> Path:
    """Write the tiny pipeline to `cfg.out` so that StableDiffusionPipeline.from_pretrained loads it."""
    from diffusers.utils import logging as df_logging

    df_logging.set_verbosity_error()
    out = Path(cfg.out)
    pipe = build_tiny_pipeline(cfg.seed)
    pipe.save_pretrained(out, safe_serialization=True)
    # Replace the tokenizer folder with the full SD1.5 layout (vocab.json + merges.txt too).
    write_clip_tokenizer(out / "tokenizer")
    save_config(cfg, out / "cxr_tiny_model_config.json",
                note="random weights: a stand-in for SD1.5 for offline runs, not a model")
    logging.getLogger(__name__).info("tiny model written to %s", out)
    return out


def tiny_model_is_built(out: str | Path, seed: int) -> bool:
    """True when `out` holds a complete tiny model made with `seed` (so it can be reused)."""
    marker = Path(out) / "cxr_tiny_model_config.json"
    if not (marker.is_file() and (Path(out) / "model_index.json").is_file()):
        return False
    try:
        return json.loads(marker.read_text())["config"]["seed"] == seed
    except (KeyError, ValueError):
        return False


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
    if _is_local(model) and not (Path(model).expanduser() / "model_index.json").is_file():
        raise CxrError(f"model dir {model!r} has no model_index.json; pass a diffusers pipeline "
                       "folder (e.g. made by `python -m cxr_helpers tiny-model`) or a hub id")
    tokenizer = load_tokenizer(model)
    kwargs = {} if weight_dtype is None else {"torch_dtype": weight_dtype}

    def part(cls, subfolder, **extra):
        def loader(name, **kw):
            return cls.from_pretrained(name, subfolder=subfolder, **kw, **extra)
        if _is_local(model):
            try:
                return loader(str(Path(model).expanduser()))
            except Exception as exc:
                raise CxrError(f"could not load {subfolder}/ of {model} ({exc.__class__.__name__}: "
                               f"{str(exc).splitlines()[0][:160]}); is it a complete diffusers model?") from None
        return _from_hub(loader, model, f"model's {subfolder}")

    text_encoder = part(CLIPTextModel, "text_encoder", **kwargs)
    vae = part(AutoencoderKL, "vae", **kwargs)
    unet = part(UNet2DConditionModel, "unet", **kwargs)
    noise_scheduler = part(DDPMScheduler, "scheduler")
    return tokenizer, text_encoder, vae, unet, noise_scheduler


# ---------------------------------------------------------------- SD1.5-shaped parts ---------

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
