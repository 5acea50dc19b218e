"""Loading Stable Diffusion parts from a hub id or a local diffusers directory (hub access is in
hub.py, the tokenizer in tokenizer.py).

The same loader serves SD1.5 on Kaggle and the demo's tiny model offline, so the code under test
is the code users run.
"""

from __future__ import annotations

from pathlib import Path

from ..core.errors import CxrError
from ..core.layout import MODEL_INDEX_JSON
from .hub import from_hub, is_local
from .tokenizer import load_tokenizer


# ---------------------------------------------------------------- local folders --------------

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
WEIGHT_PARTS = ("unet", "vae", "text_encoder")


def check_model_dir(model: str) -> Path:
    """A local diffusers folder this project will load: a model_index.json, safetensors weights in
    each part (never pickle: loading a .bin unpickles it), and no code of its own. One sentence
    per problem, before diffusers is asked (whose errors would suggest weights_only=False)."""
    from ..core.files import read_json

    path = Path(model).expanduser()
    hint = "pass a diffusers pipeline folder (e.g. made by `python -m cxr_helpers tiny-model`) or a hub id"
    if not (path / MODEL_INDEX_JSON).is_file():
        raise CxrError(f"model dir {model!r} has no {MODEL_INDEX_JSON}; {hint}")
    try:
        index = read_json(path / MODEL_INDEX_JSON)
    except (OSError, ValueError) as exc:
        raise CxrError(f"{path / MODEL_INDEX_JSON} is not readable JSON ({exc.__class__.__name__}); {hint}") from None
    # Code of its own: a module file (a custom pipeline or component), or a pipeline class named as
    # [module, class] (diffusers' form for a custom pipeline) instead of a diffusers class name.
    own_code = sorted(p.relative_to(path).as_posix() for p in path.rglob("*.py"))
    class_name = index.get("_class_name") if isinstance(index, dict) else index
    if not isinstance(class_name, str):
        own_code.append(f"{MODEL_INDEX_JSON} _class_name {class_name!r}")
    if own_code:
        raise CxrError(f"model dir {model!r} brings code of its own ({', '.join(own_code[:3])}), which this "
                       "project never runs; use a plain diffusers folder or the hub id")
    for part in WEIGHT_PARTS:
        files = [f for f in (path / part).glob("*") if f.is_file()]
        pickled = [f.name for f in files if f.suffix in PICKLE_SUFFIXES]
        if pickled and not any(f.suffix == ".safetensors" for f in files):
            raise CxrError(f"{path / part} holds only pickle weights ({pickled[0]}), which this project never loads "
                           "(unpickling runs code); save the model with safetensors (diffusers: "
                           "pipe.save_pretrained(DIR, safe_serialization=True)) or use the hub id")
    return path


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
    kwargs = dict(safety_checker=None, requires_safety_checker=False, use_safetensors=True)  # never pickle
    if torch_dtype is not None:
        kwargs[_dtype_argument()] = torch_dtype
    if is_local(model):
        return StableDiffusionPipeline.from_pretrained(str(check_model_dir(model)), **kwargs)
    return from_hub(StableDiffusionPipeline.from_pretrained, model, "model", **kwargs)


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
    if is_local(model):
        check_model_dir(model)
    tokenizer = load_tokenizer(model)
    kwargs = {"use_safetensors": True}  # never a pickle file
    if weight_dtype is not None:
        kwargs["torch_dtype"] = weight_dtype

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
