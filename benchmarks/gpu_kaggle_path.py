"""Notebook 02's training and notebook 04's generation on a GPU, through the project's own stage
code, with SD1.5-shaped random weights (same compute as SD1.5; the real weights are a download):
images/s for the README's time estimates.

It writes an SD1.5-shaped pipeline in diffusers' layout, a synthetic dataset in the Kaggle layout,
prepares pairs, trains with the one-16-GB-card preset (fp16, batch 16) and generates the test
prompts the way notebook 04 does (`sample.sample`, which loads the pipeline on the GPU in fp16 by
itself). Prints a JSON summary and writes it to OUT/gpu_kaggle_path.json.

    python benchmarks/gpu_kaggle_path.py --work /tmp/kp --out "$OUT" [--train-steps 40] [--images 256]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
import torch


def build_sd15_shaped(folder: Path) -> Path:
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    from cxr_helpers.demo.tiny_model import SD15_SCHEDULER
    from sd15_shapes import sd15_shaped_parts

    if (folder / "model_index.json").is_file():
        return folder
    tokenizer, text_encoder, vae, unet, _ = sd15_shaped_parts(seed=0, device="cuda", dtype=torch.float16)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=PNDMScheduler(**SD15_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    del pipe, text_encoder, vae, unet
    torch.cuda.empty_cache()
    return folder


def main() -> None:
    from cxr_helpers.core import gpu
    from cxr_helpers.models.generation import load_sampling_pipeline
    from cxr_helpers.sampling import stage as sample
    from cxr_helpers.config.stages import PrepareConfig, SampleConfig, SynthConfig, TrainConfig, stage_config
    from cxr_helpers.data.tables import load_pairs
    from cxr_helpers.data.stage import prepare
    from cxr_helpers.demo.synthetic_dataset import make_synthetic_dataset
    from cxr_helpers.training.stage import train

    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="/tmp/kaggle_path")
    parser.add_argument("--out", default=".")
    parser.add_argument("--train-steps", type=int, default=40)
    parser.add_argument("--images", type=int, default=256, help="images per generated set")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="tiny model on the CPU: checks this script, measures nothing")
    args = parser.parse_args()
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    dry = args.cpu_dry_run
    summary = {"card": "cpu dry run" if dry else torch.cuda.get_device_name(), "torch": torch.__version__,
               "check_gpu": gpu.check_gpu()}
    preset = "sd15" if dry else "gpu-1x16gb"
    sync = (lambda: None) if dry else torch.cuda.synchronize

    tic = time.perf_counter()
    if dry:
        from cxr_helpers.config.stages import TinyModelConfig
        from cxr_helpers.demo.tiny_model import make_tiny_model

        model = make_tiny_model(TinyModelConfig(out=str(work / "tiny")))
    else:
        model = build_sd15_shaped(work / "sd15-shaped")
    data_dir = make_synthetic_dataset(SynthConfig(out=str(work / "iu"), reports=300, image_size=256, broken_images=0),
                                      progress=False)
    pairs = prepare(PrepareConfig(data_dir=str(data_dir), out=str(work / "data"), tokenizer=str(model)), progress=False)
    summary["setup_s"] = round(time.perf_counter() - tic, 1)

    # Notebook 02: the preset for one 16 GB card (fp16, batch 16, min-SNR, rank 8), fewer steps.
    cfg = stage_config(TrainConfig, preset, pairs=str(pairs.out / "pairs.csv"), data_dir=str(data_dir),
                       model=str(model), out=str(work / "train"), max_steps=args.train_steps, checkpoint_every=0,
                       validation_prompts=("Cardiomegaly.",), validation_seeds=(0,))
    if not dry:
        torch.cuda.reset_peak_memory_stats()
    tic = time.perf_counter()
    result = train(cfg, progress=False)
    loss = pd.read_csv(result.out / "loss.csv")
    steady = loss["images_per_s"].iloc[5:] if len(loss) > 10 else loss["images_per_s"]
    summary["train"] = {"preset": preset, "batch": cfg.batch_size, "precision": cfg.mixed_precision,
                        "steps": int(result.steps_done), "stage_s": round(time.perf_counter() - tic, 1),
                        "images_per_s_median": round(float(steady.median()), 1),
                        "peak_gpu_gib": 0 if dry else round(torch.cuda.max_memory_allocated() / 2**30, 2)}

    # Notebook 04: the test prompts through the sampling stage, base (scale 0) and fine-tuned.
    pipe = load_sampling_pipeline(str(model), result.lora_dir)  # no device given: the default path
    summary["generation_pipeline"] = {"device": str(pipe.device), "dtype": str(pipe.unet.dtype)}
    prompts = load_pairs(pairs.out / "pairs.csv", "test")["prompt"].tolist()
    prompts = (prompts * (args.images // (2 * len(prompts)) + 1))[: args.images // 2]
    sample.sample(SampleConfig(model=str(model), lora=str(result.lora_dir), out=str(work / "warm"),
                               prompts=prompts[:8]),
                  pipe=pipe, progress=False)  # warm-up: kernels, cuDNN autotune
    runs = {}
    for name, scale in (("base", 0.0), ("fine-tuned", 1.0)):
        cfg_s = stage_config(SampleConfig, preset, model=str(model), lora=str(result.lora_dir), lora_scale=scale,
                             out=str(work / "samples" / name), prompts=prompts, n_per_prompt=2)
        sync()
        tic = time.perf_counter()
        made = sample.sample(cfg_s, pipe=pipe, progress=False)
        sync()
        seconds = time.perf_counter() - tic
        runs[name] = {"images": int(made.generated), "seconds": round(seconds, 1),
                      "images_per_s": round(made.generated / seconds, 1), "steps": cfg_s.steps,
                      "scheduler": cfg_s.scheduler, "batch": cfg_s.batch_size}
    summary["generate"] = runs
    summary["peak_gpu_gib_generation"] = 0 if dry else round(torch.cuda.max_memory_allocated() / 2**30, 2)
    text = json.dumps(summary, indent=2)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_kaggle_path.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
