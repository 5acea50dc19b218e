"""The sampling stage: base model + LoRA, seeded batched generation into a folder of PNGs.

Figures made from generated images live in galleries.py; the spec-driven synthetic dataset
export in synthesize.py.

Every image's seed is derived from (seed, prompt index, k) and drawn on its own CPU generator,
so a prompt and seed give the same image whatever the batch size and the device. Images are
written as grayscale PNGs with a metadata.csv row each; a rerun skips what is already there.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from .config import CLIP_MAX_TOKENS, SampleConfig
from .environment import library_versions
from .errors import CxrError, library_reason
from .io import atomic_path, read_json, write_csv, write_json
from .ownership import claim

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
SCHEDULERS = ("dpm++", "ddim", "pndm", "euler")
METADATA_COLUMNS = ["file", "prompt", "prompt_index", "k", "seed", "steps", "scheduler", "guidance",
                    "negative_prompt", "lora_scale", "model", "lora", "resolution", "upscaled_file",
                    "n_tokens", "truncated"]
# Settings that change the pixels: a resumed run must share them with the images already there.
IMAGE_SETTINGS = ("model", "lora", "steps", "scheduler", "guidance", "negative_prompt", "lora_scale",
                  "seed", "resolution", "upscale")


# ---------------------------------------------------------------- loading --------------------

def check_lora_dir(lora: str | Path) -> Path:
    path = Path(lora).expanduser()
    if path.is_file() and path.suffix == ".safetensors":
        path = path.parent
    if not path.is_dir():
        raise CxrError(f"LoRA {lora} does not exist; pass the lora/ folder written by `python -m cxr_helpers train`")
    if not (path / LORA_WEIGHTS).is_file():
        raise CxrError(f"{path} is not a LoRA folder (no {LORA_WEIGHTS}); pass the lora/ folder written by train")
    return path


def load_sampling_pipeline(model: str, lora: str | Path | None = None, torch_dtype=None, device=None):
    """The base pipeline (safety checker off: it blanks X-rays) with the LoRA loaded, if any.

    By default on the GPU in fp16 when there is one (after checking torch has kernels for it),
    else on the CPU in fp32: every generation path (notebooks, widget, galleries, evaluation
    sets, synthesize) loads through here.
    """
    from .gpu import generation_device
    from .models import load_pipeline

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
        info = read_json(lora_dir / "config.json")
    except (ValueError, OSError):
        return {}
    return info if isinstance(info, dict) else {}


def set_scheduler(pipe, name: str):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler

    classes = {"dpm++": DPMSolverMultistepScheduler, "ddim": DDIMScheduler, "pndm": PNDMScheduler,
               "euler": EulerDiscreteScheduler}
    if name not in classes:
        raise CxrError(f"--scheduler {name!r} is not known; use {', '.join(SCHEDULERS)}")
    if not isinstance(pipe.scheduler, classes[name]):
        pipe.scheduler = classes[name].from_config(pipe.scheduler.config)
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


def upscale_image(image: Image.Image, size: int) -> Image.Image:
    """Lanczos upscaling (a proper resampling filter; no upscaler model is assumed offline)."""
    return image.resize((size, size), Image.Resampling.LANCZOS)


def token_counts(tokenizer, prompts: list[str]) -> list[int]:
    return [len(ids) for ids in tokenizer(prompts, truncation=False)["input_ids"]]


def read_prompts(cfg: SampleConfig) -> list[str]:
    from .data import load_pairs

    if cfg.prompts:
        prompts = [str(p) for p in cfg.prompts]
    elif cfg.prompts_file:
        path = Path(cfg.prompts_file)
        if not path.is_file():
            raise CxrError(f"prompt file {path} does not exist; pass a text file with one prompt per line")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise CxrError(f"prompt file {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
        if not prompts:
            raise CxrError(f"prompt file {path} holds no prompts; write one prompt per line")
    elif cfg.pairs:
        pairs = load_pairs(cfg.pairs, cfg.split)
        # One entry per pair (a report's frontal and lateral films share a prompt): the set
        # then has the split's real mix of findings, as the evaluation needs.
        prompts = pairs["prompt"].tolist()
        if not prompts:
            raise CxrError(f"{cfg.pairs} has no {cfg.split}-split pairs; pick another --split")
    else:
        raise CxrError("no prompts: pass --prompts FILE or --pairs PAIRS_CSV [--split test]")
    return prompts[: cfg.limit] if cfg.limit else prompts


def validate(cfg: SampleConfig) -> None:
    """What the config's own check (settings.check_settings) cannot see: settings together."""
    if cfg.upscale and cfg.upscale < cfg.resolution:
        raise CxrError(f"--upscale {cfg.upscale} is smaller than --resolution {cfg.resolution}; use 0 or a larger size")


def _settings(cfg: SampleConfig) -> dict:
    return {k: getattr(cfg, k) for k in IMAGE_SETTINGS}


def sample_identity(cfg: SampleConfig) -> dict:
    """What the images in a sample folder depend on (not n_per_prompt or limit: image k of
    prompt i is the same whatever they are)."""
    from dataclasses import replace

    from .ownership import file_digest, model_fingerprint, text_digest

    identity = _settings(cfg)
    identity["prompts"] = text_digest(read_prompts(replace(cfg, limit=None)))
    identity["model_files"] = model_fingerprint(cfg.model)
    identity["lora_weights"] = file_digest(check_lora_dir(cfg.lora) / LORA_WEIGHTS)[:20] if cfg.lora else ""
    return identity


@dataclass
class SampleResult:
    out: Path
    metadata: pd.DataFrame
    generated: int
    skipped: int


def sample(cfg: SampleConfig, pipe=None, progress: bool = True) -> SampleResult:
    """Generate cfg.n_per_prompt images per prompt into cfg.out (resumable)."""
    validate(cfg)
    prompts = read_prompts(cfg)
    out = Path(cfg.out)
    # The folder's owner: images already there are kept only when made from the same prompts
    # (all of them, before --limit, so a larger --limit continues), model, LoRA and settings.
    claim(out, "sample", sample_identity(cfg), cfg.overwrite)
    if pipe is None:
        pipe = load_sampling_pipeline(cfg.model, cfg.lora or None)
    counts = token_counts(pipe.tokenizer, prompts)
    check_prompt_lengths(counts, cfg.strict)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "sample_config.json", {"stage": "sample", "settings": _settings(cfg),
                                             "config": {k: v for k, v in vars(cfg).items() if k != "prompts"},
                                             "note": "safety checker off: it flags and blanks chest X-rays",
                                             "versions": library_versions()})
    rows = metadata_rows(cfg, prompts, counts)
    todo = [row for row in rows if not _written(out, row, cfg.upscale)]
    bar = tqdm(total=len(rows), initial=len(rows) - len(todo), desc="sampling", disable=not progress)
    for start in range(0, len(todo), cfg.batch_size):
        batch = todo[start:start + cfg.batch_size]
        images = generate(pipe, [r["prompt"] for r in batch], [r["seed"] for r in batch], cfg.resolution, cfg.steps,
                          cfg.lora_scale if cfg.lora else None, cfg.guidance, cfg.negative_prompt, cfg.scheduler)
        _save_images(out, batch, images, cfg.upscale)
        bar.update(len(batch))
    bar.close()
    metadata = pd.DataFrame(rows, columns=METADATA_COLUMNS)
    write_csv(out / "metadata.csv", metadata)
    return SampleResult(out, metadata, len(todo), len(rows) - len(todo))


def check_prompt_lengths(counts: list[int], strict: bool) -> None:
    """Prompts over CLIP's limit: refused with --strict, else truncated with a warning."""
    too_long = [(i, n) for i, n in enumerate(counts) if n > CLIP_MAX_TOKENS]
    if too_long and strict:
        i, n = too_long[0]
        raise CxrError(f"prompt {i + 1} has {n} CLIP tokens, over the {CLIP_MAX_TOKENS} limit (--strict); shorten it "
                       "or drop --strict to truncate")
    if too_long:
        print(f"warning: {len(too_long)} prompt(s) over {CLIP_MAX_TOKENS} CLIP tokens are truncated "
              f"(first: prompt {too_long[0][0] + 1}, {too_long[0][1]} tokens); --strict refuses them instead")


def metadata_rows(cfg: SampleConfig, prompts: list[str], counts: list[int]) -> list[dict]:
    """One metadata.csv row per image: image k of prompt i, its file name and seed."""
    rows = []
    for i, prompt in enumerate(prompts):
        for k in range(cfg.n_per_prompt):
            seed = image_seed(cfg.seed, i, k)
            name = f"{i:05d}_{k:02d}_seed{seed}.png"
            rows.append({"file": name, "prompt": prompt, "prompt_index": i, "k": k, "seed": seed, "steps": cfg.steps,
                         "scheduler": cfg.scheduler, "guidance": cfg.guidance, "negative_prompt": cfg.negative_prompt,
                         "lora_scale": cfg.lora_scale if cfg.lora else 0.0, "model": cfg.model, "lora": cfg.lora,
                         "resolution": cfg.resolution, "upscaled_file": f"upscaled/{name}" if cfg.upscale else "",
                         "n_tokens": counts[i], "truncated": counts[i] > CLIP_MAX_TOKENS})
    return rows


def _written(out: Path, row: dict, upscale: int) -> bool:
    """The row's image (and its upscaled copy, when asked) is already in the folder."""
    return (out / row["file"]).is_file() and (not upscale or (out / row["upscaled_file"]).is_file())


def _save_images(out: Path, rows: list[dict], images: list[Image.Image], upscale: int) -> None:
    for row, image in zip(rows, images):
        with atomic_path(out / row["file"]) as tmp:
            image.save(tmp, format="PNG")
        if upscale:
            with atomic_path(out / row["upscaled_file"]) as tmp:
                upscale_image(image, upscale).save(tmp, format="PNG")
