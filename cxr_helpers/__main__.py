"""`python -m cxr_helpers <stage> ...`: every stage, headless.

Mistakes the user can fix print one sentence and exit with status 2 (no traceback).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path

import dataclasses

from .config import (PRESET_CHOICES, SD15_MODEL_ID, EvalConfig, PrepareConfig, SampleConfig, SynthConfig,
                     TinyModelConfig, TrainConfig, stage_config)
from .errors import CxrError


def _prepare(args) -> None:
    from .data import prepare

    cfg = stage_config(
        PrepareConfig, args.preset, data_dir=args.data_dir, out=args.out, tokenizer=args.tokenizer,
        split=args.split, test_fraction=args.test_fraction, seed=args.seed, projection=args.projection,
        limit=args.limit, clean_prompts=args.clean_prompts or None, workers=args.workers,
    )
    result = prepare(cfg)
    s = result.summary
    print(f"{s['pairs']} pairs ({s['pairs_by_split']['train']} train / {s['pairs_by_split']['test']} test, "
          f"{s['patients_on_both_sides']} patients on both sides), {s['excluded']} excluded: "
          + ", ".join(f"{k} {v}" for k, v in s["excluded_by_reason"].items() if v))
    print(f"wrote {result.out / 'pairs.csv'}, excluded.csv, summary.json")


def _synth(args) -> None:
    from .synthetic import make_synthetic_dataset

    cfg = stage_config(SynthConfig, args.preset, out=args.out, reports=args.reports, seed=args.seed,
                       image_size=args.image_size, broken_images=args.broken_images, overwrite=args.overwrite or None)
    out = make_synthetic_dataset(cfg)
    print(f"wrote a synthetic dataset in the Kaggle layout to {out}")


def _tiny_model(args) -> None:
    from .models import make_tiny_model

    out = make_tiny_model(stage_config(TinyModelConfig, None, out=args.out, seed=args.seed))
    print(f"wrote a tiny SD-shaped pipeline to {out} (StableDiffusionPipeline.from_pretrained loads it)")


TRAIN_HELP = {
    "pairs": "pairs.csv from prepare (its train split is used)",
    "data_dir": "dataset folder the pairs point into (default on Kaggle: the mount)",
    "model": f"hub id or local diffusers dir (default {SD15_MODEL_ID})",
    "out": "output folder: lora/, loss.csv, checkpoints/, figures/",
    "cache_dir": "where latents and text embeddings are cached (default OUT/cache)",
    "epochs": "train this many passes over the pairs (overrides --max-steps)",
    "lr_scheduler": "constant, constant_with_warmup, cosine, linear, polynomial",
    "alpha": "LoRA alpha (default: the rank)",
    "mixed_precision": "no, fp16 (GPU) or bf16 (cards that have it)",
    "snr_gamma": "min-SNR loss weighting gamma (e.g. 5.0)",
    "prediction_type": "epsilon or v_prediction (default: the scheduler's)",
    "random_flip": "mirror images at random (both flips are cached)",
    "checkpoint_every": "write a checkpoint every N steps (0: only at the end)",
    "keep_checkpoints": "keep the last K checkpoints",
    "resume": "latest, or a checkpoint folder",
    "validation_every": "validation images every N steps (0: with every checkpoint, and at the end)",
    "validation_prompts": "prompts for validation images (default: the most common test prompts)",
}


def _add_config_options(parser, cls, help_text, required=()):
    """One --option per dataclass field; None defaults so the preset's values apply."""
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        extra = {"help": help_text.get(f.name, "").replace("%", "%%")}  # argparse formats help with %
        if f.name in required:
            extra["required"] = True
        if kind.startswith("bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, **extra)
        elif kind.startswith("tuple"):
            item = int if "int" in kind else str
            parser.add_argument(flag, nargs="+", type=item, default=None, **extra)
        else:
            caster = int if kind.startswith("int") else float if kind.startswith("float") else str
            parser.add_argument(flag, type=caster, default=None, **extra)


def _train(args) -> None:
    from .train import train

    from .config import config_to_dict, load_config

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    if args.config_file:  # a saved TrainConfig (run_training writes one for accelerate launch)
        base = config_to_dict(load_config(TrainConfig, args.config_file))
        values = {**base, **{k: v for k, v in values.items() if v is not None}}
    elif not values["pairs"] or not values["out"]:
        raise CxrError("train needs --pairs PAIRS_CSV and --out DIR (or --config-file FILE)")
    cfg = stage_config(TrainConfig, args.preset, **values)
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # once, not per process under accelerate/torchrun
            print(f"trained {result.steps_done} steps; LoRA in {result.lora_dir} "
              f"(load with pipe.load_lora_weights); loss history {result.out / 'loss.csv'}")


def _sample(args) -> None:
    from .sample import sample

    cfg = stage_config(
        SampleConfig, None, model=args.model, lora=args.lora, out=args.out, prompts_file=args.prompts,
        pairs=args.pairs, split=args.split, n_per_prompt=args.n_per_prompt, steps=args.steps,
        scheduler=args.scheduler, guidance=args.guidance, negative_prompt=args.negative_prompt,
        lora_scale=args.lora_scale, batch_size=args.batch_size, seed=args.seed, resolution=args.resolution,
        upscale=args.upscale, strict=args.strict or None, limit=args.limit, overwrite=args.overwrite or None,
    )
    result = sample(cfg)
    print(f"{result.generated} images generated, {result.skipped} already there; "
          f"{len(result.metadata)} listed in {result.out / 'metadata.csv'}")


def _synthesize(args) -> None:
    from .synthesize import synthesize

    out = synthesize(args.spec, args.out, model=args.model, lora=args.lora, batch_size=args.batch_size,
                     overwrite=args.overwrite)
    print(f"wrote a synthetic dataset in the Kaggle layout to {out} (prepare reads it: --data-dir {out})")


EVAL_HELP = {
    "pairs": "pairs.csv: its test split is the real set (its train split: the floor and the audit)",
    "data_dir": "the dataset folder the pairs point into (default on Kaggle: the mount)",
    "generated": "sample folders (with metadata.csv): DIR or NAME=DIR, e.g. base=OUT/base fine-tuned=OUT/tuned",
    "out": "output folder: metrics.json, metrics.csv, audit.csv, diversity.csv, figures/",
    "metrics": "any of fid kid is prdc diversity audit xrv adherence, space- or comma-separated (default: all)",
    "feature_net": "inception (default) or standin (a labelled offline stand-in, for tests)",
    "feature_weights": "local Inception FID weights (weights-inception-2015-12-05-6726825d.pth) when offline",
    "xrv_weights": "torchxrayvision densenet121-res224-all weights: a .safetensors state dict, or a folder "
                   "holding its release file (default: its cache, else its download)",
    "n": "at most N images per set (the same N for every set)",
    "real_floor": "also score real train images vs real test images (the floor)",
    "interval_groups": "jackknife groups per set for FID's 95% interval (0: none)",
    "adherence_scorer": "who scores the findings for prompt adherence: xrv (torchxrayvision's classifier, default) "
                        "or geometry (an oracle for the synthetic films, offline)",
    "adherence_min_cases": "a finding needs this many positive and negative images (default 5), else it is skipped",
    "audit_percentile": "flag only above this percentile of real test films' nearest-train similarity (99.9)",
}


def _evaluate(args) -> None:
    from .evaluate import adherence_table, evaluate, results_table

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(EvalConfig)}
    if not values["pairs"] or not values["out"] or not values["generated"]:
        raise CxrError("evaluate needs --pairs PAIRS_CSV, --generated DIR [NAME=DIR ...] and --out DIR")
    result = evaluate(stage_config(EvalConfig, args.preset, **values))
    print(results_table(result.table).to_string())
    if len(result.adherence):
        print("prompt adherence, AUROC per finding [95% interval] (positives+/negatives-):")
        print(adherence_table(result.adherence).to_string())
    for note in result.notes:
        print(f"note: {note}")
    written = [p.name for p in sorted(result.out.glob("*.csv"))] + [f"figures/{name}.png" for name in result.figures]
    print(f"wrote {result.out / 'metrics.json'}, {', '.join(written)}")


def _kaggle(args) -> None:
    from . import kaggle

    if args.action == "build":
        folders = kaggle.build(args.out, owner=args.owner, accelerator=args.accelerator)
        for folder in folders:
            print(f"wrote {folder}")
        print(f"next: python -m cxr_helpers kaggle push --dir {args.out} [--dry-run]")
    else:
        kaggle.push(args.dir, dry_run=args.dry_run, wait=not args.no_wait, only=args.only,
                    timeout_s=args.timeout_hours * 3600)


def _check_gpu(args) -> None:
    from .gpu import check_gpu

    print(check_gpu(fix=args.fix))


def _run_notebooks(args) -> None:
    from .notebook import NOTEBOOKS_DIR, run_notebooks

    folder = args.notebooks or (Path("notebooks") if Path("notebooks").is_dir() else NOTEBOOKS_DIR)
    params = {}
    for item in args.param or []:
        name, _, value = item.partition("=")
        if not name or not _:
            raise CxrError(f"-p {item!r} is not NAME=VALUE; write e.g. -p SEED=1")
        try:
            params[name] = json.loads(value)
        except json.JSONDecodeError:
            params[name] = value
    done = run_notebooks(args.out, args.preset, folder, params, args.timeout, args.only)
    for path in done:
        print(f"executed {path}")
    print(f"outputs and figures are under {Path(args.out).resolve()}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cxr_helpers", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True)

    p = sub.add_parser("prepare", help="Kaggle CSVs + PNGs -> pairs.csv, excluded.csv, summary.json")
    p.add_argument("--data-dir", help="dataset folder in the Kaggle layout (default on Kaggle: the mount)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--tokenizer", help=f"hub id or local dir of a diffusers model or tokenizer (default {SD15_MODEL_ID})")
    p.add_argument("--split", choices=["patient", "image"], help="patient (default, no leak) or image (the seed's)")
    p.add_argument("--test-fraction", type=float, help="share of pairs in the test split (default 0.2)")
    p.add_argument("--seed", type=int)
    p.add_argument("--projection", choices=["both", "frontal", "lateral"])
    p.add_argument("--limit", type=int, help="only the first N listed images (sorted by uid)")
    p.add_argument("--clean-prompts", action="store_true", help="strip XXXX marks, list numbers, stray punctuation")
    p.add_argument("--workers", type=int, help="threads for the image checks (default 8)")
    p.add_argument("--preset", choices=PRESET_CHOICES)
    p.set_defaults(func=_prepare)

    p = sub.add_parser("synth", help="a synthetic dataset in the exact Kaggle layout (offline demo data)")
    p.add_argument("--out", required=True)
    p.add_argument("--reports", type=int, help="number of reports (default 400)")
    p.add_argument("--seed", type=int)
    p.add_argument("--image-size", type=int, help="typical long side of the PNGs in px (default 512)")
    p.add_argument("--broken-images", type=int, help="listed images made missing/unreadable (default 2)")
    p.add_argument("--overwrite", action="store_true", help="OUT holds another run's output: move it aside first")
    p.add_argument("--preset", choices=PRESET_CHOICES)
    p.set_defaults(func=_synth)

    p = sub.add_parser("tiny-model", help="a tiny SD-shaped diffusers pipeline with random weights")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int)
    p.set_defaults(func=_tiny_model)

    p = sub.add_parser("train", help="LoRA fine-tuning on cached latents (accelerate launch -m cxr_helpers train for multi-GPU)")
    _add_config_options(p, TrainConfig, TRAIN_HELP)
    p.add_argument("--config-file", help="a saved train config (JSON) to start from")
    p.add_argument("--preset", choices=PRESET_CHOICES, help="profile: gpu-2x16gb, gpu-1x16gb, smoke, sd15, or auto")
    p.set_defaults(func=_train)

    p = sub.add_parser("sample", help="seeded, batched generation with the base model + LoRA")
    p.add_argument("--model", help=f"hub id or local diffusers dir (default {SD15_MODEL_ID})")
    p.add_argument("--lora", help="a LoRA folder (train's OUT/lora); none: the base model alone")
    p.add_argument("--out", required=True)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--prompts", help="text file, one prompt per line")
    source.add_argument("--pairs", help="pairs.csv: the prompts of --split (one per pair)")
    p.add_argument("--split", choices=["train", "test"])
    p.add_argument("--n-per-prompt", type=int)
    p.add_argument("--steps", type=int, help="sampler steps (default 20)")
    p.add_argument("--scheduler", help="dpm++ (default), ddim, pndm or euler")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--negative-prompt")
    p.add_argument("--lora-scale", type=float, help="0 = base model, 1 = full LoRA (default)")
    p.add_argument("--batch-size", type=int, help="images per pipeline call (default 8)")
    p.add_argument("--seed", type=int)
    p.add_argument("--resolution", type=int, help="px (default 128)")
    p.add_argument("--upscale", type=int, help="also write upscaled copies of this size, e.g. 512")
    p.add_argument("--strict", action="store_true", help="refuse prompts over 77 CLIP tokens")
    p.add_argument("--limit", type=int, help="only the first N prompts")
    p.add_argument("--overwrite", action="store_true", help="OUT holds another run's output: move it aside first")
    p.set_defaults(func=_sample)

    p = sub.add_parser("synthesize", help="a synthetic dataset from a spec, in the Kaggle layout")
    p.add_argument("--spec", required=True, help="JSON: items of {prompt, count} or {label, templates, count}")
    p.add_argument("--out", required=True)
    p.add_argument("--model", help="overrides the spec's model")
    p.add_argument("--lora", help="overrides the spec's LoRA")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--overwrite", action="store_true", help="OUT holds another run's output: move it aside first")
    p.set_defaults(func=_synthesize)

    p = sub.add_parser("evaluate", help="FID/KID/IS from one feature pass, PRDC, diversity, memorisation audit")
    _add_config_options(p, EvalConfig, EVAL_HELP)
    p.add_argument("--preset", choices=PRESET_CHOICES)
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("kaggle", help="render the Kaggle kernels + helpers dataset, or push them")
    kaggle_sub = p.add_subparsers(dest="action", required=True)
    b = kaggle_sub.add_parser("build", help="one folder per notebook (kernel-metadata.json) + the helpers dataset")
    b.add_argument("--out", required=True)
    b.add_argument("--owner", help="your Kaggle user name (default: the manifest's)")
    b.add_argument("--accelerator", help="GPU of notebooks 02-04: t4x2 (default: the manifest's)")
    b.set_defaults(func=_kaggle)
    q = kaggle_sub.add_parser("push", help="kaggle datasets version/create, then kernels push, in order")
    q.add_argument("--dir", required=True, help="a folder written by kaggle build")
    q.add_argument("--dry-run", action="store_true", help="print the commands only")
    q.add_argument("--no-wait", action="store_true",
                   help="push every kernel at once (default: wait for the dataset, and for 02 before 03 and 04)")
    q.add_argument("--only", nargs="+", metavar="PREFIX", help="push only these notebooks, e.g. --only 03 04")
    q.add_argument("--timeout-hours", type=float, default=12.0, help="give up waiting after this long (default 12)")
    q.set_defaults(func=_kaggle)

    p = sub.add_parser("check-gpu", help="can the installed torch drive this GPU? (--fix installs the build that can)")
    p.add_argument("--fix", action="store_true", help="on an old card (e.g. a P100), install torch built for CUDA 12.6")
    p.set_defaults(func=_check_gpu)

    p = sub.add_parser("run-notebooks", help="execute every notebook in notebooks/ headless (papermill)")
    p.add_argument("--out", required=True, help="one folder for executed notebooks, data, figures")
    p.add_argument("--preset", default="smoke", choices=PRESET_CHOICES)
    p.add_argument("--notebooks", help="folder of NN_name.ipynb notebooks (default ./notebooks)")
    p.add_argument("-p", "--param", action="append", metavar="NAME=VALUE", help="extra notebook parameter")
    p.add_argument("--only", nargs="+", metavar="PREFIX", help="only the notebooks starting with these, e.g. 01")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    p.set_defaults(func=_run_notebooks)
    return parser


_USER_FIXABLE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.ENOTDIR, errno.EEXIST}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except CxrError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # The disk or the folder, not the code: a read-only or full --out, a path that is a file.
        if exc.errno not in _USER_FIXABLE_ERRNOS:
            raise
        print(f"error: could not write {exc.filename or 'an output file'} ({exc.strerror}); free space or pass "
              "a writable --out", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; files already written are complete (writes are atomic)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
