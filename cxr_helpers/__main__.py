"""`python -m cxr_helpers <stage> ...`: every stage, headless.

Each stage's flags are generated from its config dataclass (flags.py); mistakes the user can fix
print one sentence and exit with status 2 (no traceback).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path
from typing import Any, NamedTuple
from collections.abc import Callable

from .config.stages import (EvalConfig, PrepareConfig, SampleConfig, SynthConfig, SynthesizeConfig, TinyModelConfig,
                            TrainConfig, config_to_dict, load_config, stage_config)
from .core.environment import is_main_process
from .core.errors import CxrError
from .core.logs import lines_to
from .config.flags import add_config_flags, given_values
from .core.layout import EXCLUDED_CSV, PAIRS_CSV, SUMMARY_JSON
from .config.presets import PRESET_CHOICES


def _config(cls: type, args: argparse.Namespace, **values: Any):
    """Defaults < the preset < the flags given (< `values`, already merged by the caller)."""
    return stage_config(cls, args.preset, **{**given_values(cls, args), **values})


def _prepare(args) -> None:
    from .data.stage import prepare

    result = prepare(_config(PrepareConfig, args))
    s = result.summary
    print(f"{s['pairs']} pairs ({s['pairs_by_split']['train']} train / {s['pairs_by_split']['test']} test, "
          f"{s['patients_on_both_sides']} patients on both sides), {s['excluded']} excluded: "
          + ", ".join(f"{k} {v}" for k, v in s["excluded_by_reason"].items() if v))
    print(f"wrote {result.out / PAIRS_CSV}, {EXCLUDED_CSV}, {SUMMARY_JSON}")


def _synth(args) -> None:
    from .demo.synthetic_dataset import make_synthetic_dataset

    out = make_synthetic_dataset(_config(SynthConfig, args))
    print(f"wrote a synthetic dataset in the Kaggle layout to {out}")


def _tiny_model(args) -> None:
    from .demo.tiny_model import make_tiny_model

    cfg = _config(TinyModelConfig, args)
    out = make_tiny_model(cfg)
    made = "pretrained on synthetic films" if cfg.pretrain else "with random weights"
    print(f"wrote a tiny SD-shaped pipeline {made} to {out} (StableDiffusionPipeline.from_pretrained loads it)")


def _train(args) -> None:
    from .training.stage import train

    values = given_values(TrainConfig, args)
    if args.config_file:  # a saved TrainConfig (run_training writes one for accelerate launch)
        base = config_to_dict(load_config(TrainConfig, args.config_file))
        values = {**base, **{k: v for k, v in values.items() if v is not None}}
    elif not values["pairs"] or not values["out"]:
        raise CxrError("train needs --pairs PAIRS_CSV and --out DIR (or --config-file FILE)")
    result = train(_config(TrainConfig, args, **values))
    if is_main_process():  # once, not per process under accelerate/torchrun
        print(f"trained {result.steps_done} steps; LoRA in {result.lora_dir} "
              f"(load with pipe.load_lora_weights); loss history {result.out / 'loss.csv'}")


def _sample(args) -> None:
    from .sampling.stage import sample

    result = sample(_config(SampleConfig, args))
    print(f"{result.generated} images generated, {result.skipped} already there; "
          f"{len(result.metadata)} listed in {result.out / 'metadata.csv'}")


def _synthesize(args) -> None:
    from .sampling.synthesize import synthesize

    cfg = _config(SynthesizeConfig, args)
    out = synthesize(cfg.spec, cfg.out, model=cfg.model, lora=cfg.lora, batch_size=cfg.batch_size,
                     overwrite=cfg.overwrite)
    print(f"wrote a synthetic dataset in the Kaggle layout to {out} (prepare reads it: --data-dir {out})")


def _evaluate(args) -> None:
    from .evaluation.stage import adherence_table, evaluate, results_table

    if not args.pairs or not args.out or not args.generated:
        raise CxrError("evaluate needs --pairs PAIRS_CSV, --generated DIR [NAME=DIR ...] and --out DIR")
    result = evaluate(_config(EvalConfig, args))
    print(results_table(result.table).to_string())
    if len(result.adherence):
        print("prompt adherence, AUROC per finding [95% interval] (positives+/negatives-):")
        print(adherence_table(result.adherence).to_string())
    for note in result.notes:
        print(f"note: {note}")
    written = [p.name for p in sorted(result.out.glob("*.csv"))] + [f"figures/{name}.png" for name in result.figures]
    print(f"wrote {result.out / 'metrics.json'}, {', '.join(written)}")


def _kaggle(args) -> None:
    from .workflow import kaggle

    if args.action == "build":
        folders = kaggle.build(args.out, owner=args.owner, accelerator=args.accelerator)
        for folder in folders:
            print(f"wrote {folder}")
        print(f"next: python -m cxr_helpers kaggle push --dir {args.out} [--dry-run]")
    else:
        kaggle.push(args.dir, dry_run=args.dry_run, wait=not args.no_wait, only=args.only,
                    timeout_s=args.timeout_hours * 3600)


def _check_gpu(args) -> None:
    from .core.gpu import check_gpu

    print(check_gpu(fix=args.fix))


def _run_notebooks(args) -> None:
    from .workflow.notebooks import NOTEBOOKS_DIR, run_notebooks

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


class Stage(NamedTuple):
    config: type
    run: Callable[[argparse.Namespace], None]
    help: str
    required: tuple[str, ...] = ("out",)  # flags the command line must give
    exclusive: tuple[str, ...] = ()  # flags of which at most one may be given


STAGES = {
    "prepare": Stage(PrepareConfig, _prepare, "Kaggle CSVs + PNGs -> pairs.csv, excluded.csv, summary.json"),
    "synth": Stage(SynthConfig, _synth, "a synthetic dataset in the exact Kaggle layout (offline demo data)"),
    "tiny-model": Stage(TinyModelConfig, _tiny_model, "a tiny SD-shaped diffusers pipeline: random weights, "
                        "or pretrained on synthetic films (--pretrain)"),
    # --pairs and --out may come from --config-file instead; _train checks.
    "train": Stage(TrainConfig, _train, "LoRA fine-tuning on cached latents "
                   "(accelerate launch -m cxr_helpers train for multi-GPU)", required=()),
    "sample": Stage(SampleConfig, _sample, "seeded, batched generation with the base model + LoRA",
                    exclusive=("prompts_file", "pairs", "prompts")),
    "synthesize": Stage(SynthesizeConfig, _synthesize, "a synthetic dataset from a spec, in the Kaggle layout",
                        required=("spec", "out")),
    "evaluate": Stage(EvalConfig, _evaluate, "FID/KID/IS from one feature pass, PRDC, diversity, memorisation audit",
                      required=()),  # _evaluate names all three it needs in one sentence
}


def _add_stage_parsers(sub) -> None:
    for name, stage in STAGES.items():
        p = sub.add_parser(name, help=stage.help, description=stage.config.__doc__.splitlines()[0])
        add_config_flags(p, stage.config, stage.required, stage.exclusive)
        p.set_defaults(func=stage.run)
    sub.choices["train"].add_argument("--config-file", help="a saved train config (JSON) to start from; "
                                      "the flags given override it (default: none)")


def _add_kaggle_parser(sub) -> None:
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


def _add_tool_parsers(sub) -> None:
    p = sub.add_parser("check-gpu", help="can the installed torch drive this GPU? (--fix installs the build that can)")
    p.add_argument("--fix", action="store_true", help="on an old card (e.g. a P100), install torch built for CUDA 12.6")
    p.set_defaults(func=_check_gpu)

    p = sub.add_parser("run-notebooks", help="execute every notebook in notebooks/ headless (papermill)")
    p.add_argument("--out", required=True, help="one folder for executed notebooks, data, figures")
    p.add_argument("--preset", default="smoke", choices=PRESET_CHOICES, help="(default: smoke)")
    p.add_argument("--notebooks", help="folder of NN_name.ipynb notebooks (default ./notebooks)")
    p.add_argument("-p", "--param", action="append", metavar="NAME=VALUE", help="extra notebook parameter")
    p.add_argument("--only", nargs="+", metavar="PREFIX", help="only the notebooks starting with these, e.g. 01")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per cell (default 1800)")
    p.set_defaults(func=_run_notebooks)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cxr_helpers", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    _add_stage_parsers(sub)
    _add_kaggle_parser(sub)
    _add_tool_parsers(sub)
    return parser


_USER_FIXABLE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.ENOTDIR, errno.EEXIST}


def main(argv: list[str] | None = None) -> int:
    text_streams()
    try:
        argv = utf8_arguments(sys.argv[1:] if argv is None else argv)
    except CxrError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    with lines_to(sys.stderr):  # the package's diagnostics, while the command runs
        return _run(args)


def text_streams() -> None:
    """Under an ASCII locale (LANG=C, UTF-8 mode off) a prompt's or a message's non-ASCII letters
    are printed escaped, not a UnicodeEncodeError."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def utf8_arguments(argv: list[str]) -> list[str]:
    """The arguments as the UTF-8 text they are: under an ASCII locale Python hands non-ASCII
    bytes over as lone surrogates, which no file or tokenizer takes."""
    fixed = []
    for arg in argv:
        try:
            fixed.append(os.fsencode(arg).decode("utf-8"))
        except UnicodeDecodeError:
            raise CxrError(f"the argument {arg.encode('utf-8', 'backslashreplace').decode('ascii')} is not UTF-8 "
                           "text; type it in UTF-8 (or set LANG=C.UTF-8)") from None
    return fixed


def _run(args: argparse.Namespace) -> int:
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
