"""The sampling stage: base model + LoRA, seeded batched generation into a folder of PNGs.

Figures made from generated images live in galleries.py; the spec-driven synthetic dataset
export in synthesize.py.

Every image's seed is derived from (seed, prompt index, k) and drawn on its own CPU generator,
so a prompt and seed give the same image whatever the batch size and the device. Images are
written as grayscale PNGs with a metadata.csv row each; a rerun skips what is already there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from PIL import Image
from ..core.bars import tqdm
from ..core.bounds import MAX_PROMPTS_FILE_BYTES, check_file_size, check_image_count, check_prompt_sizes

from ..config.stages import CLIP_MAX_TOKENS, SampleConfig, output_identity
from ..core.environment import library_versions
from ..core.errors import CxrError
from ..models.generation import check_lora_dir, generate, image_seed, load_sampling_pipeline
from ..core.files import atomic_path, write_csv, write_json
from ..core.layout import METADATA_COLUMNS, METADATA_CSV, SAMPLE_CONFIG_JSON
from ..core.ownership import owned


def upscale_image(image: Image.Image, size: int) -> Image.Image:
    """Lanczos upscaling (a proper resampling filter; no upscaler model is assumed offline)."""
    return image.resize((size, size), Image.Resampling.LANCZOS)


def token_counts(tokenizer, prompts: list[str]) -> list[int]:
    return [len(ids) for ids in tokenizer(prompts, truncation=False)["input_ids"]]


def read_prompts(cfg: SampleConfig) -> list[str]:
    from ..data.tables import load_pairs

    if cfg.prompts:
        prompts = [str(p) for p in cfg.prompts]
    elif cfg.prompts_file:
        path = Path(cfg.prompts_file)
        if not path.is_file():
            raise CxrError(f"prompt file {path} does not exist; pass a text file with one prompt per line")
        check_file_size(path, MAX_PROMPTS_FILE_BYTES, "prompt file")
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
    prompts = prompts[: cfg.limit] if cfg.limit else prompts
    check_prompt_sizes(prompts, "sample")
    check_image_count(len(prompts) * cfg.n_per_prompt, "sample")
    return prompts


def validate(cfg: SampleConfig) -> None:
    """What the config's own check (settings.check_settings) cannot see: settings together."""
    if cfg.upscale and cfg.upscale < cfg.resolution:
        raise CxrError(f"--upscale {cfg.upscale} is smaller than --resolution {cfg.resolution}; use 0 or a larger size")


def sample_identity(cfg: SampleConfig) -> dict:
    """What the images in a sample folder depend on (not n_per_prompt or limit: image k of
    prompt i is the same whatever they are); the model and LoRA by their files' contents."""
    from dataclasses import replace

    from ..core.ownership import text_digest

    if cfg.lora:
        check_lora_dir(cfg.lora)  # before the folder is claimed: a bad LoRA writes nothing
    identity = output_identity(cfg)  # the settings that change the pixels
    identity["prompts"] = text_digest(read_prompts(replace(cfg, limit=None)))
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
    # (all of them, before --limit, so a larger --limit continues), model, LoRA and settings;
    # and one run at a time writes there.
    with owned(out, "sample", sample_identity(cfg), cfg.overwrite):
        return _sample_into(out, cfg, prompts, pipe, progress)


def _sample_into(out: Path, cfg: SampleConfig, prompts: list[str], pipe, progress: bool) -> SampleResult:
    if pipe is None:
        pipe = load_sampling_pipeline(cfg.model, cfg.lora or None)
    counts = token_counts(pipe.tokenizer, prompts)
    check_prompt_lengths(counts, cfg.strict)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / SAMPLE_CONFIG_JSON, {"stage": "sample", "settings": output_identity(cfg),
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
    write_csv(out / METADATA_CSV, metadata)
    return SampleResult(out, metadata, len(todo), len(rows) - len(todo))


def check_prompt_lengths(counts: list[int], strict: bool) -> None:
    """Prompts over CLIP's limit: refused with --strict, else truncated with a warning."""
    too_long = [(i, n) for i, n in enumerate(counts) if n > CLIP_MAX_TOKENS]
    if too_long and strict:
        i, n = too_long[0]
        raise CxrError(f"prompt {i + 1} has {n} CLIP tokens, over the {CLIP_MAX_TOKENS} limit (--strict); shorten it "
                       "or drop --strict to truncate")
    if too_long:
        logging.getLogger(__name__).warning(
            "%d prompt(s) over %d CLIP tokens are truncated (first: prompt %d, %d tokens); --strict refuses them "
            "instead", len(too_long), CLIP_MAX_TOKENS, too_long[0][0] + 1, too_long[0][1])


def metadata_rows(cfg: SampleConfig, prompts: list[str], counts: list[int]) -> list[dict]:
    """One metadata.csv row per image: image k of prompt i, its file name and seed."""
    settings = dict(steps=cfg.steps, scheduler=cfg.scheduler, guidance=cfg.guidance,
                    negative_prompt=cfg.negative_prompt,
                    lora_scale=cfg.lora_scale if cfg.lora else 0.0, model=cfg.model, lora=cfg.lora,
                    resolution=cfg.resolution, upscale=cfg.upscale)
    return [metadata_row(prompt, i, k, image_seed(cfg.seed, i, k), counts[i], **settings)
            for i, prompt in enumerate(prompts) for k in range(cfg.n_per_prompt)]


def metadata_row(prompt: str, prompt_index: int, k: int, seed: int, n_tokens: int, *, steps: int, scheduler: str,
                 guidance: float, negative_prompt: str, lora_scale: float, model: str, lora: str, resolution: int,
                 upscale: int = 0) -> dict:
    """The metadata.csv row of image k of a prompt (METADATA_COLUMNS): the sample stage's and the
    prompt panel's saves are described alike."""
    name = f"{prompt_index:05d}_{k:02d}_seed{seed}.png"
    return {"file": name, "prompt": prompt, "prompt_index": prompt_index, "k": k, "seed": seed, "steps": steps,
            "scheduler": scheduler, "guidance": guidance, "negative_prompt": negative_prompt, "lora_scale": lora_scale,
            "model": model, "lora": lora, "resolution": resolution,
            "upscaled_file": f"upscaled/{name}" if upscale else "",
            "n_tokens": n_tokens, "truncated": n_tokens > CLIP_MAX_TOKENS}


def _written(out: Path, row: dict, upscale: int) -> bool:
    """The row's image (and its upscaled copy, when asked) is already in the folder."""
    return (out / row["file"]).is_file() and (not upscale or (out / row["upscaled_file"]).is_file())


def _save_images(out: Path, rows: list[dict], images: list[Image.Image], upscale: int) -> None:
    for row, image in zip(rows, images, strict=True):
        with atomic_path(out / row["file"]) as tmp:
            image.save(tmp, format="PNG")
        if upscale:
            with atomic_path(out / row["upscaled_file"]) as tmp:
                upscale_image(image, upscale).save(tmp, format="PNG")
