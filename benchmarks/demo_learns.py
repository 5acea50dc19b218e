"""Does the offline demo learn? The demo's chain (the code notebooks 01, 02 and 04 call, with the
smoke preset's settings) for several seeds: synthetic data, the tiny model pretrained on
synthetic films, prepare, the LoRA, the base (LoRA scale 0) and fine-tuned evaluation sets for
every test prompt, and the evaluation: prompt adherence by the geometry oracle, FID and KID on
the stand-in network. Each seed changes everything: the dataset, the base's weights and
pretraining films, the split and the LoRA's training.

On a CPU it measures the margins tests/test_notebooks.py asserts (benchmarks/RESULTS.md); on a
GPU (benchmarks/gpu_check.sh) it checks that the pretrained tiny model trains and generates there
(fp16 generation, the default on a GPU) and still follows the prompts.
Usage: python benchmarks/demo_learns.py --work DIR [--seeds 0 1 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

FINDINGS = ("Cardiomegaly", "Effusion")


def run_seed(work: Path, seed: int) -> dict:
    import torch

    from cxr_helpers.evaluation import stage as evaluate
    from cxr_helpers.models.generation import load_sampling_pipeline
    from cxr_helpers.sampling import stage as sample
    from cxr_helpers.config.stages import (EvalConfig, PrepareConfig, SampleConfig, SynthConfig, TinyModelConfig,
                                           TrainConfig, stage_config)
    from cxr_helpers.data.stage import prepare
    from cxr_helpers.demo.tiny_model import make_tiny_model, tiny_model_is_built
    from cxr_helpers.demo.synthetic_dataset import dataset_is_built, make_synthetic_dataset
    from cxr_helpers.training.stage import train

    # The dataset and the pretrained base are reused when WORK/seedN already holds them made with
    # these settings (as the demo reuses OUT/demo_inputs): a recipe change then retrains only the LoRA.
    times, tic = {}, time.perf_counter()
    synth = stage_config(SynthConfig, "smoke", out=str(work / "data"), seed=seed)
    tiny = stage_config(TinyModelConfig, "smoke", out=str(work / "tiny_model"), seed=seed)
    reused = [name for name, built in (("synthetic data", dataset_is_built(synth.out, synth)),
                                       ("pretraining", tiny_model_is_built(tiny.out, tiny))) if built]
    data = Path(synth.out) if "synthetic data" in reused else make_synthetic_dataset(synth, progress=False)
    times["synthetic data"] = time.perf_counter() - tic
    tic = time.perf_counter()
    model = tiny.out if "pretraining" in reused else str(make_tiny_model(tiny, progress=False))
    times["pretraining"] = time.perf_counter() - tic
    tic = time.perf_counter()
    pairs = prepare(stage_config(PrepareConfig, "smoke", data_dir=str(data), out=str(work / "pairs"), tokenizer=model,
                                 seed=seed), progress=False).out / "pairs.csv"
    cfg = stage_config(TrainConfig, "smoke", pairs=str(pairs), data_dir=str(data), model=model, out=str(work / "train"),
                       cache_dir=str(work / "cache"), seed=seed)
    lora = train(cfg, progress=False).lora_dir
    times["LoRA training"] = time.perf_counter() - tic
    tic = time.perf_counter()
    pipe = load_sampling_pipeline(model, lora)
    sets = {}
    for name, scale in (("base", 0.0), ("fine-tuned", 1.0)):
        sets[name] = sample.sample(stage_config(SampleConfig, "smoke", model=model, lora=str(lora), lora_scale=scale,
                                                out=str(work / "samples" / name), pairs=str(pairs), split="test",
                                                n_per_prompt=2), pipe=pipe, progress=False).out
    times["generation"] = time.perf_counter() - tic
    tic = time.perf_counter()
    result = evaluate.evaluate(stage_config(EvalConfig, "smoke", pairs=str(pairs), data_dir=str(data),
                                            out=str(work / "eval"), cache_dir=str(work / "cache"),
                                            generated=tuple(f"{k}={v}" for k, v in sets.items())), progress=False)
    times["evaluation"] = time.perf_counter() - tic
    values = result.table.set_index(["set", "metric"])["value"]
    adherence = result.adherence.set_index(["set", "finding"])
    return {
        "seed": seed, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "generation": f"{pipe.device} {pipe.unet.dtype}", "torch": torch.__version__,
        "times_s": {k: round(v, 1) for k, v in times.items() if k not in reused}, "reused": reused,
        "adherence": {f"{s} {f}": [round(float(adherence.loc[(s, f), c]), 3) for c in ("auroc", "ci_low", "ci_high")]
                      + [int(adherence.loc[(s, f), "positives"]), int(adherence.loc[(s, f), "negatives"])]
                      for s, f in adherence.index if f in FINDINGS},
        "fid": {s: round(float(values[s, "fid"]), 4) for s in result.table["set"].unique() if (s, "fid") in values},
        "kid": {s: round(float(values[s, "kid"]), 5) for s in result.table["set"].unique() if (s, "kid") in values},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    results = []
    for seed in args.seeds:
        results.append(run_seed(Path(args.work) / f"seed{seed}", seed))
        print(json.dumps(results[-1]), flush=True)
    print("seed | " + " | ".join(f"{s} {f} AUROC" for s in ("base", "fine-tuned", "real test") for f in FINDINGS)
          + " | FID base / fine-tuned | minutes")
    for r in results:
        aurocs = [r["adherence"].get(f"{s} {f}", ["-"])[0]
                  for s in ("base", "fine-tuned", "real test") for f in FINDINGS]
        print(f"{r['seed']} | " + " | ".join(map(str, aurocs))
              + f" | {r['fid'].get('base')} / {r['fid'].get('fine-tuned')} | {sum(r['times_s'].values()) / 60:.1f}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "demo_learns.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
