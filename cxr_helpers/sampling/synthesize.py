"""Spec-driven synthetic export: images for a JSON spec of findings, written as a dataset in the
Kaggle layout (one report + one frontal film per image, marked synthetic), so that prepare and
any IU X-ray loader read it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ..config.stages import SampleConfig, SynthesizeConfig, output_identity
from ..core.bounds import check_image_count, check_prompt_sizes
from ..core.environment import library_versions
from ..core.errors import CxrError
from ..core.files import atomic_path, read_user_json, write_csv, write_json
from ..core.ownership import owned
from ..config.presets import SD15_MODEL_ID
from ..core.layout import SYNTHETIC_MANIFEST
from ..models.generation import check_lora_dir
from .stage import SampleResult, sample

# The spec's schema: what synthesize reads, nothing else (a misspelt key would be ignored silently).
SPEC_SAMPLER_KEYS = ("model", "lora", "seed", "steps", "guidance", "resolution", "scheduler", "lora_scale")
SPEC_KEYS = ("items", "uid_start", *SPEC_SAMPLER_KEYS)
SPEC_ITEM_KEYS = ("prompt", "label", "templates", "count")

# Rare findings first: what a synthetic set is most often wanted for.
EXAMPLE_SPEC_ITEMS = [
    {"label": "Pleural Effusion", "templates": ["Small left pleural effusion.", "Small right pleural effusion.",
                                                "Bilateral pleural effusions."]},
    {"label": "Cardiomegaly", "templates": ["Cardiomegaly without acute pulmonary disease.", "Moderate cardiomegaly."]},
    {"label": "Opacity", "templates": ["Right lower lobe opacity concerning for pneumonia."]},
]


# ---------------------------------------------------------------- the spec -------------------

def read_spec(path: str | Path) -> dict:
    """A synthesize spec (JSON): {"items": [{"prompt": ..., "count": N} |
    {"label": ..., "templates": [...], "count": N}], optional model, lora, seed, steps, guidance,
    resolution, scheduler, lora_scale, uid_start}, checked against that schema."""
    spec = read_user_json(path, "spec", "write a JSON file with an \"items\" list")
    return check_spec(spec, path)


def check_spec(spec, path: str | Path = "spec") -> dict:
    if not isinstance(spec, dict):
        raise CxrError(f"spec {path} must be a JSON object with an \"items\" list, not a {type(spec).__name__}")
    _refuse_unknown_keys(spec, SPEC_KEYS, f"spec {path}")
    items = spec.get("items")
    if not isinstance(items, list) or not items:
        raise CxrError(f"spec {path} has no \"items\" list; list {{\"prompt\": TEXT, \"count\": N}} or "
                       "{\"label\": NAME, \"templates\": [TEXT, ...], \"count\": N}")
    for i, item in enumerate(items, 1):
        _check_item(item, i)
    check_image_count(sum(item["count"] for item in items), f"spec {path}")
    check_prompt_sizes([text for item in items for text in ([item["prompt"]] if "prompt" in item
                                                             else item["templates"])], f"spec {path}")
    uid_start = spec.get("uid_start", 100000)
    if not isinstance(uid_start, int) or isinstance(uid_start, bool) or uid_start < 1:
        raise CxrError(f"spec {path}: \"uid_start\" must be a positive integer, got {uid_start!r}")
    _check_sampler_settings(spec, path)
    return spec


def _refuse_unknown_keys(obj: dict, known: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(obj) - set(known))
    if unknown:
        raise CxrError(f"{where} has unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}")


def _check_item(item, i: int) -> None:
    if not isinstance(item, dict):
        raise CxrError(f"spec item {i} must be an object like {{\"prompt\": TEXT, \"count\": N}}")
    _refuse_unknown_keys(item, SPEC_ITEM_KEYS, f"spec item {i}")
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


def _check_sampler_settings(spec: dict, path: str | Path) -> None:
    """The sampler settings get the same check as `sample`'s own (types, ranges, finiteness)."""
    try:
        SampleConfig(**{k: spec[k] for k in SPEC_SAMPLER_KEYS if k in spec})
    except CxrError as exc:  # name the spec's key, not the command-line flag
        message = str(exc)
        for key in SPEC_SAMPLER_KEYS:
            flag = "--" + key.replace("_", "-")
            if message.startswith(flag + " "):
                message = f'"{key}"' + message[len(flag):]
        raise CxrError(f"spec {path}: {message}") from None


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


# ---------------------------------------------------------------- the export -----------------

def synthesize(spec_path: str | Path, out: str | Path, model: str | None = None, lora: str | None = None,
               pipe=None, batch_size: int = 8, progress: bool = True, overwrite: bool = False) -> Path:
    """Images for a spec, written as a dataset in the Kaggle layout (one report + one frontal
    film per image), marked synthetic, so that prepare (and any IU X-ray loader) reads it.

    It writes only into a folder it made from the same spec, model and LoRA (a rerun continues);
    any other dataset there is refused, or moved aside first with overwrite=True."""
    spec = read_spec(spec_path)
    model = model or spec.get("model") or SD15_MODEL_ID
    lora = lora if lora is not None else spec.get("lora", "")
    jobs = expand_spec(spec)
    out = Path(out)
    if lora:
        check_lora_dir(lora)  # before the folder is claimed: a bad LoRA writes nothing
    identity = {"spec": spec, **output_identity(SynthesizeConfig(model=model, lora=lora or ""))}
    with owned(out, "synthesize", identity, overwrite):
        cfg = SampleConfig(model=model, lora=lora or "", out=str(out / "generated"), prompts=[p for p, _ in jobs],
                           seed=int(spec.get("seed", 0)), steps=int(spec.get("steps", 20)),
                           guidance=float(spec.get("guidance", 7.5)), resolution=int(spec.get("resolution", 128)),
                           scheduler=spec.get("scheduler", "dpm++"), lora_scale=float(spec.get("lora_scale", 1.0)),
                           batch_size=batch_size)
        result = sample(cfg, pipe=pipe, progress=progress)
        images = _write_dataset(out, result, jobs, int(spec.get("uid_start", 100000)),
                                f"SYNTHETIC: generated by cxr-lora from {model}" + (f" + LoRA {lora}" if lora else ""))
        write_json(out / SYNTHETIC_MANIFEST, {
            "synthetic": True, "note": "generated images, not patient data; research use only",
            "model": model, "lora": lora, "spec": spec, "images": images, "versions": library_versions()})
    return out


def _write_dataset(out: Path, result: SampleResult, jobs: list[tuple[str, str]], uid_start: int, marker: str) -> int:
    """The sampled images as the Kaggle dataset's files: PNGs, reports and projections CSVs.
    uid_start is far from the real uids, so the two sets can be merged. Returns the image count."""
    from ..core.layout import IMAGES_SUBDIR, PROJECTION_COLUMNS, PROJECTIONS_CSV, REPORT_COLUMNS, REPORTS_CSV

    images_dir = out / IMAGES_SUBDIR
    images_dir.mkdir(parents=True, exist_ok=True)
    reports, projections = [], []
    for row, (prompt, label) in zip(result.metadata.itertuples(), jobs, strict=True):
        uid = uid_start + row.prompt_index
        name = f"{uid}_IM-{uid % 10000:04d}-4001.dcm.png"
        with atomic_path(images_dir / name) as tmp:
            tmp.write_bytes((result.out / row.file).read_bytes())
        reports.append({"uid": uid, "MeSH": label or "synthetic", "Problems": label or "synthetic",
                        "image": marker, "indication": "synthetic", "comparison": "None.",
                        "findings": "", "impression": prompt})
        projections.append({"uid": uid, "filename": name, "projection": "Frontal"})
    write_csv(out / REPORTS_CSV, pd.DataFrame(reports, columns=REPORT_COLUMNS), formula_safe=False)
    write_csv(out / PROJECTIONS_CSV, pd.DataFrame(projections, columns=PROJECTION_COLUMNS), formula_safe=False)
    return len(projections)
