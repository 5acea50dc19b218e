"""Every file and folder name of the Kaggle dataset's layout and of this project's own outputs,
in one place: the stages, the synthetic dataset and the export all read and write these.

The Kaggle dataset raddar/chest-xrays-indiana-university:

    DIR/indiana_reports.csv        one row per report (uid, MeSH, ..., impression)
    DIR/indiana_projections.csv    one row per image (uid, filename, projection)
    DIR/images/images_normalized/  the PNG films named in indiana_projections.csv
"""

from __future__ import annotations

import os
from pathlib import Path

KAGGLE_DATASET = "raddar/chest-xrays-indiana-university"
KAGGLE_DATASET_SLUG = KAGGLE_DATASET.split("/")[1]

# ---------------------------------------------------------------- the Kaggle dataset ---------
REPORTS_CSV = "indiana_reports.csv"
PROJECTIONS_CSV = "indiana_projections.csv"
IMAGES_SUBDIR = Path("images") / "images_normalized"
# All columns of the Kaggle CSVs (the synthetic dataset and the export write them all) ...
REPORT_COLUMNS = ["uid", "MeSH", "Problems", "image", "indication", "comparison", "findings", "impression"]
PROJECTION_COLUMNS = ["uid", "filename", "projection"]
# ... and those the data stage reads.
REPORT_COLUMNS_NEEDED = ("uid", "impression")
PROJECTION_COLUMNS_NEEDED = ("uid", "filename", "projection")

# ---------------------------------------------------------------- datasets this project makes --
SYNTHETIC_LABELS_CSV = "synthetic_labels.csv"  # the synthetic dataset's ground truth
SYNTH_CONFIG_JSON = "synth_config.json"  # marks a finished synthetic dataset
TINY_MODEL_CONFIG_JSON = "cxr_tiny_model_config.json"  # marks a finished tiny model (written last)
SYNTHETIC_MANIFEST = "synthetic_manifest.json"  # marks a dataset exported from generated images

# ---------------------------------------------------------------- the data stage's outputs ----
DATA_STAGE_DIR = "data"  # OUT/data: what prepare writes when a notebook runs it
PAIRS_CSV = "pairs.csv"
EXCLUDED_CSV = "excluded.csv"
SUMMARY_JSON = "summary.json"
PREPARE_CONFIG_JSON = "prepare_config.json"
PAIRS_COLUMNS = ("uid", "filename", "projection", "prompt", "n_tokens", "split", "width", "height")
PAIRS_REQUIRED = ("uid", "filename", "prompt", "split")
PAIRS_SPLITS = ("train", "test")  # the values of its split column
EXCLUDED_COLUMNS = ("uid", "filename", "projection", "reason", "n_tokens")

# ---------------------------------------------------------------- the rest of OUT -------------
TRAIN_STAGE_DIR = "train"
LORA_SUBDIR = "lora"  # OUT/train/lora: the trained LoRA
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # in lora/: diffusers' LoRA file name
LORA_CONFIG_JSON = "config.json"  # in lora/: the base model, the training settings, the steps done
FIGURES_DIR = "figures"
RECORDS_DIR = "records"  # OUT/records/NOTEBOOK.json: values the notebooks record for the tests
DEMO_INPUTS_DIR = "demo_inputs"  # the offline presets' synthetic dataset and tiny model
# ---------------------------------------------------------------- a training run's folder ---
# OUT/train holds lora/ (LORA_* above), loss.csv, train_config.json, checkpoints/, figures/ and
# cache/ (when the cache is not elsewhere).
LOSS_CSV = "loss.csv"  # one row per optimizer step; each checkpoint holds its copy
TRAIN_CONFIG_JSON = "train_config.json"  # the run's settings, its step count and processes
TRAIN_REQUEST_JSON = "train_request.json"  # run_training's config for its accelerate children
LORA_CARD = "README.md"  # in lora/: the model card
CHECKPOINTS_DIR = "checkpoints"  # OUT/train/checkpoints/step-0000500, ...
CHECKPOINT_PREFIX = "step-"
CHECKPOINT_GLOB = CHECKPOINT_PREFIX + "[0-9]*"
CHECKPOINT_LORA = "lora.safetensors"  # in a checkpoint: the LoRA in peft's naming
CHECKPOINT_OPTIMIZER = "optimizer.safetensors"  # the optimizer's tensors ...
CHECKPOINT_OPTIMIZER_JSON = "optimizer.json"  # ... and its param groups and scalars
CHECKPOINT_STATE_JSON = "state.json"  # the step, the LR schedule, the run's checks; written last
LOSS_CURVE_PNG = "loss_curve.png"  # in figures/
STAGING_DIR = ".writing"  # OUT/.writing: a run's outputs until it has made them all (core.files.staged_outputs)
CACHE_DIR = "cache"  # a stage's cache in its OUT, off Kaggle (core.environment.cache_root)


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:07d}"


def checkpoint_step(folder: str | os.PathLike) -> int:
    """The step a checkpoint folder's name says."""
    return int(Path(folder).name[len(CHECKPOINT_PREFIX):])


def validation_grid_name(step: int) -> str:
    return f"validation-step-{step:07d}.png"


def encodings_name(key: str) -> str:
    """The cached encodings of a training set, under their cache key."""
    return f"encodings-{key}.safetensors"


# ---------------------------------------------------------------- a sample folder -----------
METADATA_CSV = "metadata.csv"  # one row per generated image
SAMPLE_CONFIG_JSON = "sample_config.json"  # the settings the images were made with
METADATA_COLUMNS = ["file", "prompt", "prompt_index", "k", "seed", "steps", "scheduler", "guidance",
                    "negative_prompt", "lora_scale", "model", "lora", "resolution", "upscaled_file",
                    "n_tokens", "truncated"]
CACHE_IMAGES_SUBDIR = "images"  # CACHE/images: the resized-image cache every stage shares

# ---------------------------------------------------------------- an evaluation folder -------
METRICS_CSV = "metrics.csv"  # one row per set and metric
METRICS_JSON = "metrics.json"  # the same rows, with the notes, the config and the library versions
AUDIT_CSV = "audit.csv"  # per generated image: its nearest train and test films
DIVERSITY_CSV = "diversity.csv"  # per set and prompt: within-prompt MS-SSIM
ADHERENCE_CSV = "adherence.csv"  # per set and finding: AUROC with its interval

MODEL_INDEX_JSON = "model_index.json"  # diffusers' mark of a pipeline folder
KAGGLE_BUILD_JSON = "build.json"  # in a `kaggle build` folder: what was built, for `kaggle push`


def image_path(data_dir: str | os.PathLike, filename: str) -> Path:
    return Path(data_dir) / IMAGES_SUBDIR / filename


def inside(folder: str | os.PathLike, name: str) -> Path | None:
    """folder/name when it resolves (symlinks and `..` followed) to a place under folder, else
    None: a file named in a CSV ("../../x.png", "/etc/x.png") must not reach outside its folder."""
    root = Path(folder).resolve()
    try:
        path = (root / str(name)).resolve()
    except (OSError, RuntimeError):  # a symlink loop
        return None
    return path if path != root and path.is_relative_to(root) else None


def contained_image_path(data_dir: str | os.PathLike, filename: str) -> Path | None:
    """image_path, or None when the filename points outside the dataset's image folder."""
    return image_path(data_dir, filename) if inside(Path(data_dir) / IMAGES_SUBDIR, filename) else None


# ---------------------------------------------------------------- the notebooks' folders in OUT --
# Besides DATA_STAGE_DIR, TRAIN_STAGE_DIR, FIGURES_DIR and RECORDS_DIR above.
EVAL_STAGE_DIR = "eval"  # OUT/eval: notebook 04's evaluation (metrics, audit, figures)
SAMPLES_DIR = "samples"  # a folder of sample folders: OUT/eval/samples/NAME (04's sets), OUT/samples/widget
WIDGET_SAVES_DIR = "widget"  # OUT/samples/widget: what the prompt panel saves (notebook 03)
EXPORT_DIR = "export"  # OUT/export: notebook 03's synthetic export ...
EXPORT_SPEC_JSON = "spec.json"  # ... its spec,
EXPORT_DATASET_DIR = "dataset"  # ... the dataset written in the Kaggle layout,
EXPORT_PREPARED_DIR = "prepared"  # ... and that dataset read back by prepare
