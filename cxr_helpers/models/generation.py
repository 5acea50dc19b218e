"""Loading the sampling pipeline (base model + LoRA) and seeded generation: every path that
makes images (the sample stage, galleries, the prompt panel, validation grids, evaluation sets)
goes through here.

Every image's seed is derived from (seed, prompt index, k) and drawn on its own CPU generator,
so a prompt and seed give the same image whatever the batch size and the device.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import torch
from PIL import Image

from ..config.stages import SCHEDULERS
from ..core.errors import CxrError, library_reason
from ..core.files import read_json
from ..core.layout import LORA_CONFIG_JSON, LORA_WEIGHTS

# ---------------------------------------------------------------- loading --------------------

def check_lora_dir(lora: str | Path) -> Path:
    path = Path(lora).expanduser()
    if path.is_file() and path.suffix == ".safetensors":
        path = path.parent
    if not path.is_dir():
        raise CxrError(f"LoRA {lora} does not exist; pass the lora/ folder written by `python -m cxr_helpers train`")
    if not (path / LORA_WEIGHTS).is_file():
        raise CxrError(f"{path} is not a LoRA folder (no {LORA_WEIGHTS}); pass the lora/ folder written by train")
    from safetensors import SafetensorError, safe_open

    try:  # its header, which must cover the file exactly: diffusers would call a damaged one "Unable to locate"
        with safe_open(str(path / LORA_WEIGHTS), framework="pt") as weights:
            weights.keys()
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CxrError(f"the LoRA file {path / LORA_WEIGHTS} is damaged ({exc.__class__.__name__}: "
                       f"{str(exc).splitlines()[0][:120]}); copy it whole again from where it was trained, "
                       "or train again") from None
    return path


def load_sampling_pipeline(model: str, lora: str | Path | None = None, torch_dtype=None, device=None):
    """The base pipeline (safety checker off: it blanks X-rays) with the LoRA loaded, if any.

    By default on the GPU in fp16 when there is one (after checking torch has kernels for it),
    else on the CPU in fp32: every generation path (notebooks, widget, galleries, evaluation
    sets, synthesize) loads through here.
    """
    from ..core.gpu import generation_device
    from .loading import load_pipeline

    lora_dir = check_lora_dir(lora) if lora else None
    if device is None:
        device, auto_dtype = generation_device()
        if device != "cpu":  # fp16 on the GPU; on the CPU the saved float32 weights load as they are
            torch_dtype = torch_dtype or auto_dtype
    pipe = load_pipeline(model, torch_dtype=torch_dtype)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if lora_dir is not None:
        info = _lora_info(lora_dir)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # weight_name always: older diffusers (0.32 among them) refuse a folder without it offline.
                pipe.load_lora_weights(str(lora_dir), weight_name=LORA_WEIGHTS)
        except Exception as exc:  # the library's own reason is kept: our guess about it may be wrong
            reason = library_reason(exc)
            if "size mismatch" in reason:
                base = info.get("base_model")
                hint = f" (its config.json says it was trained on {base})" if base else ""
                raise CxrError(f"LoRA {lora_dir} does not fit the model {model}{hint}: {reason}; "
                               "pass the --model it was trained on") from None
            raise CxrError(f"could not load LoRA {lora_dir} into {model}: {reason}; if the file is damaged, "
                           "copy the lora/ folder again from the training run") from None
        if not pipe.get_list_adapters().get("unet"):
            raise CxrError(f"LoRA {lora_dir} holds no weights for this UNet; it is not a LoRA of an SD1.x model")
        # A LoRA trained for another target (v_prediction) is sampled with that target.
        trained_for = info.get("prediction_type")
        if trained_for and trained_for != pipe.scheduler.config.get("prediction_type"):
            pipe.scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config, prediction_type=trained_for)
    return pipe


def _lora_info(lora_dir: Path) -> dict:
    """The LoRA's config.json (written by train), or {} when absent or unreadable."""
    try:
        info = read_json(lora_dir / LORA_CONFIG_JSON)
    except (ValueError, OSError):
        return {}
    return info if isinstance(info, dict) else {}


def set_scheduler(pipe, name: str):
    """Switch the pipeline to the sampler `name` (one of SampleConfig's --scheduler choices)."""
    import diffusers

    scheduler_class = getattr(diffusers, SCHEDULERS[name])
    if not isinstance(pipe.scheduler, scheduler_class):
        pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    return pipe


# ---------------------------------------------------------------- generation -----------------

def image_seed(seed: int, prompt_index: int, k: int) -> int:
    """The seed of image k of prompt `prompt_index`: independent of batching and order."""
    digest = hashlib.sha256(f"{seed}:{prompt_index}:{k}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def generate(pipe, prompts: list[str], seeds: list[int], resolution: int = 128, steps: int = 20,
             lora_scale: float | None = None, guidance: float = 7.5, negative_prompt: str = "",
             scheduler: str | None = "dpm++", on_step=None) -> list[Image.Image]:
    """One image per (prompt, seed) pair, in one batch: each image has its own CPU generator.
    `on_step(k)` is called after step k of `steps` (the prompt panel's progress bar)."""
    if scheduler:
        set_scheduler(pipe, scheduler)
    kwargs = {}
    if lora_scale is not None:
        kwargs["cross_attention_kwargs"] = {"scale": float(lora_scale)}
    if negative_prompt:
        kwargs["negative_prompt"] = [negative_prompt] * len(prompts)
    if on_step is not None:
        def step_end(_pipe, step, _timestep, tensors):
            on_step(step + 1)
            return tensors
        kwargs["callback_on_step_end"] = step_end
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = pipe(list(prompts), num_inference_steps=steps, height=resolution, width=resolution,
                      guidance_scale=guidance, generator=generators, **kwargs)
    return [im.convert("L") for im in result.images]
