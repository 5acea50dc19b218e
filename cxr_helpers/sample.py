"""The sampling stage: base model + LoRA, seeded batched generation, galleries, and synthetic
dataset export in the Kaggle layout.

Every image's seed is derived from (seed, prompt index, k) and drawn on its own CPU generator,
so a prompt and seed give the same image whatever the batch size and the device. Images are
written as grayscale PNGs with a metadata.csv row each; a rerun skips what is already there.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from .config import CLIP_MAX_TOKENS, SampleConfig
from .presets import SD15_MODEL_ID
from .errors import CxrError, library_reason
from .environment import library_versions
from .io import atomic_path, read_json, read_user_json, write_csv, write_json
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
    """What the config's own check (config.check_settings) cannot see: settings together."""
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
    settings_file = out / "sample_config.json"
    # The folder's owner: images already there are kept only when made from the same prompts
    # (all of them, before --limit, so a larger --limit continues), model, LoRA and settings.
    claim(out, "sample", sample_identity(cfg), cfg.overwrite)
    if pipe is None:
        pipe = load_sampling_pipeline(cfg.model, cfg.lora or None)
    counts = token_counts(pipe.tokenizer, prompts)
    too_long = [(i, n) for i, n in enumerate(counts) if n > CLIP_MAX_TOKENS]
    if too_long and cfg.strict:
        i, n = too_long[0]
        raise CxrError(f"prompt {i + 1} has {n} CLIP tokens, over the {CLIP_MAX_TOKENS} limit (--strict); shorten it "
                       "or drop --strict to truncate")
    if too_long:
        print(f"warning: {len(too_long)} prompt(s) over {CLIP_MAX_TOKENS} CLIP tokens are truncated "
              f"(first: prompt {too_long[0][0] + 1}, {too_long[0][1]} tokens); --strict refuses them instead")

    out.mkdir(parents=True, exist_ok=True)
    write_json(settings_file, {"stage": "sample", "settings": _settings(cfg),
                               "config": {k: v for k, v in vars(cfg).items() if k != "prompts"},
                               "note": "safety checker off: it flags and blanks chest X-rays",
                               "versions": library_versions()})
    rows, todo = [], []
    for i, prompt in enumerate(prompts):
        for k in range(cfg.n_per_prompt):
            seed = image_seed(cfg.seed, i, k)
            name = f"{i:05d}_{k:02d}_seed{seed}.png"
            row = {"file": name, "prompt": prompt, "prompt_index": i, "k": k, "seed": seed, "steps": cfg.steps,
                   "scheduler": cfg.scheduler, "guidance": cfg.guidance, "negative_prompt": cfg.negative_prompt,
                   "lora_scale": cfg.lora_scale if cfg.lora else 0.0, "model": cfg.model, "lora": cfg.lora,
                   "resolution": cfg.resolution, "upscaled_file": f"upscaled/{name}" if cfg.upscale else "",
                   "n_tokens": counts[i], "truncated": counts[i] > CLIP_MAX_TOKENS}
            rows.append(row)
            done = (out / name).is_file() and (not cfg.upscale or (out / row["upscaled_file"]).is_file())
            if not done:
                todo.append(row)
    bar = tqdm(total=len(rows), initial=len(rows) - len(todo), desc="sampling", disable=not progress)
    for start in range(0, len(todo), cfg.batch_size):
        batch = todo[start:start + cfg.batch_size]
        images = generate(pipe, [r["prompt"] for r in batch], [r["seed"] for r in batch], cfg.resolution, cfg.steps,
                          cfg.lora_scale if cfg.lora else None, cfg.guidance, cfg.negative_prompt, cfg.scheduler)
        for row, image in zip(batch, images):
            with atomic_path(out / row["file"]) as tmp:
                image.save(tmp, format="PNG")
            if cfg.upscale:
                with atomic_path(out / row["upscaled_file"]) as tmp:
                    upscale_image(image, cfg.upscale).save(tmp, format="PNG")
        bar.update(len(batch))
    bar.close()
    metadata = pd.DataFrame(rows, columns=METADATA_COLUMNS)
    write_csv(out / "metadata.csv", metadata)
    return SampleResult(out, metadata, len(todo), len(rows) - len(todo))


# ---------------------------------------------------------------- galleries ------------------

def real_images(pairs_csv, data_dir, n: int, split: str = "test", resolution: int = 128, seed: int = 0,
                cache_dir=None, frontal_only: bool = True):
    """n (image, prompt) pairs of the split, one per report (frontal films when asked)."""
    from .data import load_pairs
    from .dataset import ChestXrayDataset

    pairs = load_pairs(pairs_csv, split)
    if frontal_only and "projection" in pairs and (pairs["projection"] == "Frontal").any():
        pairs = pairs[pairs["projection"] == "Frontal"]
    pairs = pairs.drop_duplicates("uid").sample(frac=1.0, random_state=seed).head(n).reset_index(drop=True)
    dataset = ChestXrayDataset(pairs, data_dir, resolution, cache_dir=cache_dir)
    return [dataset.load_image(i) for i in range(len(dataset))], pairs["prompt"].tolist()


def comparison_gallery(pipe, real, prompts, seed: int = 0, resolution: int = 128, steps: int = 20,
                       upscale: int = 512, save_to=None, save_upscaled_to=None):
    """Rows of (real, base, fine-tuned) for the same prompt and seed, at 128 px and upscaled."""
    from . import plots

    seeds = [image_seed(seed, i, 0) for i in range(len(prompts))]
    base = generate(pipe, prompts, seeds, resolution, steps, lora_scale=0.0)
    tuned = generate(pipe, prompts, seeds, resolution, steps, lora_scale=1.0)
    images, captions = [], []
    for i, prompt in enumerate(prompts):
        images += [real[i], base[i], tuned[i]]
        captions += [f"real | {prompt}", f"base, seed {seeds[i]}", f"fine-tuned, seed {seeds[i]}"]
    small = plots.image_grid(images, captions, columns=3, save_to=save_to,
                             title=f"real vs base vs fine-tuned at {resolution} px")
    big = None
    if upscale:
        up = [upscale_image(im, upscale) for im in images]
        big = plots.image_grid(up, captions, columns=3, save_to=save_upscaled_to,
                               title=f"the same, upscaled to {upscale} px (Lanczos)", panel_inches=4)
    return small, big


def lora_scale_sweep(pipe, prompt: str, seed: int = 0, scales=(0.0, 0.25, 0.5, 0.75, 1.0), resolution: int = 128,
                     steps: int = 20, save_to=None):
    from . import plots

    images = [generate(pipe, [prompt], [seed], resolution, steps, lora_scale=s)[0] for s in scales]
    return plots.image_grid(images, [f"LoRA scale {s}" for s in scales], columns=len(scales), save_to=save_to,
                            title=prompt)


def seed_grid(pipe, prompt: str, seeds=range(8), resolution: int = 128, steps: int = 20, lora_scale: float | None = 1.0,
              save_to=None):
    from . import plots

    seeds = list(seeds)
    images = generate(pipe, [prompt] * len(seeds), seeds, resolution, steps, lora_scale=lora_scale)
    return plots.image_grid(images, [f"seed {s}" for s in seeds], columns=min(4, len(seeds)), save_to=save_to,
                            title=prompt)


# ---------------------------------------------------------------- synthetic export -----------

# The spec's schema: what synthesize reads, nothing else (a misspelt key would be ignored silently).
SPEC_SAMPLER_KEYS = ("model", "lora", "seed", "steps", "guidance", "resolution", "scheduler", "lora_scale")
SPEC_KEYS = ("items", "uid_start", *SPEC_SAMPLER_KEYS)
SPEC_ITEM_KEYS = ("prompt", "label", "templates", "count")


def read_spec(path: str | Path) -> dict:
    """A synthesize spec (JSON): {"items": [{"prompt": ..., "count": N} |
    {"label": ..., "templates": [...], "count": N}], optional model, lora, seed, steps, guidance,
    resolution, scheduler, lora_scale, uid_start}, checked against that schema."""
    spec = read_user_json(path, "spec", "write a JSON file with an \"items\" list")
    return check_spec(spec, path)


def check_spec(spec, path: str | Path = "spec") -> dict:
    if not isinstance(spec, dict):
        raise CxrError(f"spec {path} must be a JSON object with an \"items\" list, not a {type(spec).__name__}")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise CxrError(f"spec {path} has unknown key(s) {', '.join(unknown)}; known: {', '.join(SPEC_KEYS)}")
    items = spec.get("items")
    if not isinstance(items, list) or not items:
        raise CxrError(f"spec {path} has no \"items\" list; list {{\"prompt\": TEXT, \"count\": N}} or "
                       "{\"label\": NAME, \"templates\": [TEXT, ...], \"count\": N}")
    for i, item in enumerate(items, 1):
        if not isinstance(item, dict):
            raise CxrError(f"spec item {i} must be an object like {{\"prompt\": TEXT, \"count\": N}}")
        unknown = sorted(set(item) - set(SPEC_ITEM_KEYS))
        if unknown:
            raise CxrError(f"spec item {i} has unknown key(s) {', '.join(unknown)}; known: {', '.join(SPEC_ITEM_KEYS)}")
        count = item.get("count")
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise CxrError(f"spec item {i} needs a positive integer \"count\"")
        if ("prompt" in item) == ("templates" in item):
            raise CxrError(f"spec item {i} needs a \"prompt\" or a \"label\" with \"templates\" (one of the two)")
        if "prompt" in item and (not isinstance(item["prompt"], str) or not item["prompt"].strip()):
            raise CxrError(f"spec item {i}: \"prompt\" must be non-empty text")
        templates = item.get("templates", ["x"])
        if not isinstance(templates, list) or not templates or not all(isinstance(t, str) and t.strip() for t in templates):
            raise CxrError(f"spec item {i}: \"templates\" must be a list of non-empty texts, e.g. [\"Small left "
                           "pleural effusion.\"]")
        if not isinstance(item.get("label", ""), str):
            raise CxrError(f"spec item {i}: \"label\" must be text")
    uid_start = spec.get("uid_start", 100000)
    if not isinstance(uid_start, int) or isinstance(uid_start, bool) or uid_start < 1:
        raise CxrError(f"spec {path}: \"uid_start\" must be a positive integer, got {uid_start!r}")
    # The sampler settings get the same check as `sample`'s own (types, ranges, finiteness).
    try:
        SampleConfig(**{k: spec[k] for k in SPEC_SAMPLER_KEYS if k in spec})
    except CxrError as exc:  # name the spec's key, not the command-line flag
        message = str(exc)
        for key in SPEC_SAMPLER_KEYS:
            flag = "--" + key.replace("_", "-")
            if message.startswith(flag + " "):
                message = f'"{key}"' + message[len(flag):]
        raise CxrError(f"spec {path}: {message}") from None
    return spec


# Rare findings first: what a synthetic set is most often wanted for.
EXAMPLE_SPEC_ITEMS = [
    {"label": "Pleural Effusion", "templates": ["Small left pleural effusion.", "Small right pleural effusion.",
                                                "Bilateral pleural effusions."]},
    {"label": "Cardiomegaly", "templates": ["Cardiomegaly without acute pulmonary disease.", "Moderate cardiomegaly."]},
    {"label": "Opacity", "templates": ["Right lower lobe opacity concerning for pneumonia."]},
]


def example_spec(count: int = 4, **settings) -> dict:
    """A spec with `count` images of each example finding (and any sampler settings)."""
    return {**settings, "items": [{**item, "count": count} for item in EXAMPLE_SPEC_ITEMS]}


def write_spec(path: str | Path, spec: dict) -> Path:
    """Write a spec as JSON (atomically), checked the way synthesize will read it."""
    check_spec(json.loads(json.dumps(spec)), path)  # as synthesize will read it, before anything is written
    return write_json(path, spec)


def expand_spec(spec: dict) -> list[tuple[str, str]]:
    """(prompt, label) per image: templates are used in turn."""
    jobs = []
    for item in spec["items"]:
        templates = [item["prompt"]] if item.get("prompt") else list(item["templates"])
        label = item.get("label", "")
        jobs += [(templates[j % len(templates)], label) for j in range(item["count"])]
    return jobs


def synthesize(spec_path: str | Path, out: str | Path, model: str | None = None, lora: str | None = None,
               pipe=None, batch_size: int = 8, progress: bool = True, overwrite: bool = False) -> Path:
    """Images for a spec, written as a dataset in the Kaggle layout (one report + one frontal
    film per image), marked synthetic, so that prepare (and any IU X-ray loader) reads it.

    It writes only into a folder it made from the same spec, model and LoRA (a rerun continues);
    any other dataset there is refused, or moved aside first with overwrite=True."""
    from .ownership import file_digest, model_fingerprint

    spec = read_spec(spec_path)
    model = model or spec.get("model") or SD15_MODEL_ID
    lora = lora if lora is not None else spec.get("lora", "")
    jobs = expand_spec(spec)
    out = Path(out)
    claim(out, "synthesize", {"spec": spec, "model": model, "lora": lora or "", "model_files": model_fingerprint(model),
                              "lora_weights": file_digest(check_lora_dir(lora) / LORA_WEIGHTS)[:20] if lora else ""},
          overwrite)
    uid_start = int(spec.get("uid_start", 100000))  # far from the real uids, so the sets can be merged
    cfg = SampleConfig(model=model, lora=lora or "", out=str(out / "generated"), prompts=[p for p, _ in jobs],
                       seed=int(spec.get("seed", 0)), steps=int(spec.get("steps", 20)),
                       guidance=float(spec.get("guidance", 7.5)), resolution=int(spec.get("resolution", 128)),
                       scheduler=spec.get("scheduler", "dpm++"), lora_scale=float(spec.get("lora_scale", 1.0)),
                       batch_size=batch_size)
    result = sample(cfg, pipe=pipe, progress=progress)
    images_dir = out / "images" / "images_normalized"
    images_dir.mkdir(parents=True, exist_ok=True)
    reports, projections = [], []
    marker = f"SYNTHETIC: generated by cxr-lora from {model}" + (f" + LoRA {lora}" if lora else "")
    for row, (prompt, label) in zip(result.metadata.itertuples(), jobs):
        uid = uid_start + row.prompt_index
        name = f"{uid}_IM-{uid % 10000:04d}-4001.dcm.png"
        with atomic_path(images_dir / name) as tmp:
            tmp.write_bytes((Path(cfg.out) / row.file).read_bytes())
        reports.append({"uid": uid, "MeSH": label or "synthetic", "Problems": label or "synthetic",
                        "image": marker, "indication": "synthetic", "comparison": "None.",
                        "findings": "", "impression": prompt})
        projections.append({"uid": uid, "filename": name, "projection": "Frontal"})
    from .layout import PROJECTION_COLUMNS, REPORT_COLUMNS

    write_csv(out / "indiana_reports.csv", pd.DataFrame(reports, columns=REPORT_COLUMNS))
    write_csv(out / "indiana_projections.csv", pd.DataFrame(projections, columns=PROJECTION_COLUMNS))
    write_json(out / "synthetic_manifest.json", {
        "synthetic": True, "note": "generated images, not patient data; research use only",
        "model": model, "lora": lora, "spec": spec, "images": len(projections), "versions": library_versions()})
    return out

