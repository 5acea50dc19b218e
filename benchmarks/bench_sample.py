"""Images/s of the project's batched sampler against diffusers' default way, on SD1.5-shaped
parts with random weights (same compute as the real model) at 128 px.

- reference: one image per pipeline call, the pipeline's default scheduler (SD1.5's PNDM) and
  its default 50 steps, guidance 7.5;
- project: `cxr_helpers.models.generation.generate`: a batch of 16 prompts per call, 20 DPM-Solver++
  steps, guidance 7.5, a seeded generator per image.

Both share one process and the same UNet, VAE and text encoder; the reference runs first and
last around the project's batches so that drift in machine speed hits both.

    python benchmarks/bench_sample.py [--device cpu|cuda] [--precision no|fp16] [--batch-size 16]
                                      [--reference-images 2] [--rounds 1]

The last line is the speedup in images/s as N.NNx (goal: >= 3x on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from cxr_helpers.demo.tiny_model import SD15_SCHEDULER
from cxr_helpers.models.generation import generate, image_seed
from sd15_shapes import sd15_shaped_parts

PROMPTS = ["No acute cardiopulmonary abnormality.", "Cardiomegaly without acute pulmonary disease.",
           "Small left pleural effusion.", "Right lower lobe opacity concerning for pneumonia."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="no", choices=["no", "fp16"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--reference-images", type=int, default=2, help="images made the default way, per turn")
    parser.add_argument("--rounds", type=int, default=1, help="project batches (each between two reference turns)")
    parser.add_argument("--resolution", type=int, default=128)
    args = parser.parse_args()

    from diffusers import PNDMScheduler, StableDiffusionPipeline

    dtype = torch.float16 if args.precision == "fp16" else torch.float32
    device = torch.device(args.device)
    tic = time.perf_counter()
    tokenizer, text_encoder, vae, unet, _ = sd15_shaped_parts(seed=0)
    parts = dict(vae=vae.to(device, dtype), text_encoder=text_encoder.to(device, dtype), tokenizer=tokenizer,
                 unet=unet.to(device, dtype), safety_checker=None, feature_extractor=None,
                 requires_safety_checker=False)
    scheduler = PNDMScheduler(**SD15_SCHEDULER)
    scheduler.register_to_config(clip_sample=False)
    reference = StableDiffusionPipeline(scheduler=scheduler, **parts)
    project = StableDiffusionPipeline(scheduler=PNDMScheduler.from_config(scheduler.config), **parts)
    for pipe in (reference, project):
        pipe.set_progress_bar_config(disable=True)
    print(f"device {device}{' (' + torch.cuda.get_device_name() + ')' if device.type == 'cuda' else ''}, "
          f"precision {args.precision}, {args.resolution} px, torch {torch.__version__}, threads "
          f"{torch.get_num_threads()}, cores {os.cpu_count()}; SD1.5-shaped parts built in "
          f"{time.perf_counter() - tic:.0f} s")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def reference_turn(offset: int) -> tuple[float, int]:
        sync()
        tic = time.perf_counter()
        for i in range(args.reference_images):
            # diffusers' default way: one prompt per call, default scheduler and steps.
            reference(PROMPTS[(offset + i) % len(PROMPTS)], height=args.resolution, width=args.resolution,
                      generator=torch.Generator().manual_seed(offset + i))
        sync()
        return time.perf_counter() - tic, args.reference_images

    def project_turn(r: int) -> tuple[float, int]:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch_size)]
        seeds = [image_seed(0, r, i) for i in range(args.batch_size)]
        sync()
        tic = time.perf_counter()
        generate(project, prompts, seeds, args.resolution, args.steps, scheduler="dpm++")
        sync()
        return time.perf_counter() - tic, args.batch_size

    # Warm-up: one tiny call each (allocator, kernels), not timed.
    reference(PROMPTS[0], height=args.resolution, width=args.resolution, num_inference_steps=2)
    generate(project, PROMPTS[:2], [0, 1], args.resolution, 2)

    ref_s, ref_n, proj_s, proj_n = 0.0, 0, 0.0, 0
    t, n = reference_turn(0)
    ref_s, ref_n = ref_s + t, ref_n + n
    for r in range(args.rounds):
        t, n = project_turn(r)
        proj_s, proj_n = proj_s + t, proj_n + n
        t, n = reference_turn(100 * (r + 1))
        ref_s, ref_n = ref_s + t, ref_n + n
    ref_rate, proj_rate = ref_n / ref_s, proj_n / proj_s
    print(f"reference: {ref_n} images one per call, PNDM 50 steps: {ref_s:.1f} s, {ref_rate:.4f} images/s "
          f"({ref_s / ref_n:.1f} s/image)")
    print(f"project  : {proj_n} images in batches of {args.batch_size}, DPM-Solver++ {args.steps} steps: "
          f"{proj_s:.1f} s, {proj_rate:.4f} images/s ({proj_s / proj_n:.1f} s/image)")
    if device.type == "cuda":
        print(f"peak GPU memory allocated: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    print(f"{proj_rate / ref_rate:.2f}x")


if __name__ == "__main__":
    main()
