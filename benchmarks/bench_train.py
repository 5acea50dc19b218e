"""Steps/s of the project's training loop against a reference loop written the way diffusers'
examples/text_to_image/train_text_to_image_lora.py is, on SD1.5-shaped parts.

SD1.5's real weights cannot be downloaded here, so the parts are built from SD1.5's configs
with random weights: the same shapes, so the same compute and memory (facts.md).

- reference: every step runs the VAE encoder on the batch's images (and samples the latent),
  the tokenizer and the text encoder on its prompts, then the UNet forward/backward;
- project: the frozen encoders' outputs are cached once (the cache build is timed and printed
  separately: it is paid once per dataset and model, and reused by later runs); every step
  samples latents from the cached posteriors and runs the UNet forward/backward.

Both loops share one process, one UNet with one rank-4 LoRA, the same images and prompts, and
alternate in rounds so that machine noise hits both. Peak memory is sampled per loop (RSS on a
CPU; torch.cuda.max_memory_allocated on a GPU).

    python benchmarks/bench_train.py [--device cpu|cuda] [--precision no|fp16] [--batch-size 4]
                                     [--steps 3] [--rounds 2] [--resolution 128]

The last line is the project loop's speedup over the reference as N.NNx (goal: >= 1.4x on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import numpy as np
import torch

from cxr_helpers.config.stages import TrainConfig
from cxr_helpers.training.encodings import Encodings, encode_images, encode_prompts
from cxr_helpers.demo.synthetic_dataset import draw_report, write_impression
from cxr_helpers.demo.films import draw_patient, render
from cxr_helpers.training.step import diffusion_loss, sample_latents
from sd15_shapes import sd15_shaped_parts

# Dense fp16 tensor peak (TFLOP/s) by card, for the fraction-of-peak line on a GPU.
PEAK_FP16_TFLOPS = {"P100": 18.7, "T4": 65.0, "V100": 125.0, "A100": 312.0, "L4": 121.0, "H100": 989.0, "H200": 989.0}
UNET_FORWARD_GFLOP_128 = 45.0  # facts.md, per 128 px image; training ~ 3 forwards
VAE_ENCODE_GFLOP_128 = 68.0


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled from /proc)."""

    def __enter__(self):
        self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def make_batch(n: int, resolution: int):
    pixels, prompts = [], []
    for i in range(n):
        rng = np.random.default_rng(i)
        report = draw_report(i, rng)
        film = render(report.findings, "Frontal", draw_patient(rng), resolution, resolution, rng)
        pixels.append(torch.from_numpy(film.astype(np.float32) / 127.5 - 1).expand(3, -1, -1))
        prompts.append(write_impression(report, rng))
    return torch.stack(pixels), prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per loop per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--images", type=int, default=16, help="distinct training images")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.precision, torch.float32)
    cfg = TrainConfig(batch_size=args.batch_size, rank=4, resolution=args.resolution, mixed_precision=args.precision)
    print(f"device {device}{' (' + torch.cuda.get_device_name() + ')' if device.type == 'cuda' else ''}, "
          f"precision {args.precision}, batch {args.batch_size}, {args.resolution} px, rank 4, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, cores {os.cpu_count()}")

    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    tic = time.perf_counter()
    tokenizer, text_encoder, vae, unet, scheduler = sd15_shaped_parts(seed=0)
    for part in (text_encoder, vae, unet):
        part.requires_grad_(False)
        part.to(device, dtype)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    cast_training_params(unet, torch.float32)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    print(f"built SD1.5-shaped parts (random weights): unet {sum(p.numel() for p in unet.parameters()) / 1e6:.0f} M, "
          f"vae {sum(p.numel() for p in vae.parameters()) / 1e6:.0f} M, text encoder "
          f"{sum(p.numel() for p in text_encoder.parameters()) / 1e6:.0f} M params in "
          f"{time.perf_counter() - tic:.0f} s")

    pixels, prompts = make_batch(args.images, args.resolution)
    scale = vae.config.scaling_factor
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    # The project's one-off cost: encode every image and distinct prompt once.
    sync()
    tic = time.perf_counter()
    with torch.no_grad():
        moments = torch.cat([encode_images(pixels[i:i + 8], vae, device, dtype) for i in range(0, len(pixels), 8)])
        distinct = sorted(set(prompts))
        embeddings = encode_prompts(distinct, tokenizer, text_encoder, device)
    sync()
    cache_seconds = time.perf_counter() - tic
    enc = Encodings(moments, None, torch.tensor([distinct.index(p) for p in prompts]), embeddings, "bench", False,
                    len(pixels), len(distinct))

    def update(loss):
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def project_step(step: int):
        gen = torch.Generator().manual_seed(step)
        rows = [(step * args.batch_size + k) % len(pixels) for k in range(args.batch_size)]
        latents = sample_latents(enc, rows, gen, None, scale).to(device, dtype)
        emb = enc.embeddings[enc.prompt_index[rows]].to(device, dtype)
        with autocast:
            loss = diffusion_loss(unet, scheduler, latents, emb, gen, cfg, "epsilon")
        update(loss)

    def reference_step(step: int):
        # As in train_text_to_image_lora.py: encode the batch's images and prompts every step.
        gen = torch.Generator().manual_seed(step)
        rows = [(step * args.batch_size + k) % len(pixels) for k in range(args.batch_size)]
        with torch.no_grad():
            latents = vae.encode(pixels[rows].to(device, dtype)).latent_dist.sample() * scale
            ids = tokenizer([prompts[r] for r in rows], max_length=tokenizer.model_max_length, padding="max_length",
                            truncation=True, return_tensors="pt").input_ids.to(device)
            emb = text_encoder(ids, return_dict=False)[0]
        with autocast:
            loss = diffusion_loss(unet, scheduler, latents.to(dtype), emb, gen, cfg, "epsilon")
        update(loss)

    loops = {"reference": reference_step, "project": project_step}
    for step_fn in loops.values():  # warm-up: allocator, kernels, lazy inits
        step_fn(0)
    seconds = {name: 0.0 for name in loops}
    peaks = {name: 0 for name in loops}
    for r in range(args.rounds):
        for name, step_fn in loops.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync()
            with PeakRSS() as rss:
                tic = time.perf_counter()
                for s in range(args.steps):
                    step_fn(1 + r * args.steps + s)
                sync()
                seconds[name] += time.perf_counter() - tic
            peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated() if device.type == "cuda" else rss.peak)

    n_steps = args.rounds * args.steps
    memory_kind = "peak GPU memory allocated" if device.type == "cuda" else "peak RSS"
    card_peak = None
    if device.type == "cuda":
        card_peak = next((v for k, v in PEAK_FP16_TFLOPS.items() if k in torch.cuda.get_device_name()), None)
    for name in loops:
        per_step = seconds[name] / n_steps
        images_s = args.batch_size / per_step
        line = (f"{name:9s}: {per_step:.3f} s/step, {1 / per_step:.3f} steps/s, {images_s:.2f} images/s, "
                f"{memory_kind} {peaks[name] / 2**30:.2f} GiB")
        if card_peak:
            gflop = 3 * UNET_FORWARD_GFLOP_128 + (VAE_ENCODE_GFLOP_128 if name == "reference" else 0)
            scale_px = (args.resolution / 128) ** 2
            line += f", {images_s * gflop * scale_px / 1000 / card_peak:.1%} of the card's fp16 peak"
        print(line)
    print(f"project's one-off encoding of {len(pixels)} images + {len(distinct)} prompts: {cache_seconds:.2f} s "
          f"(= {cache_seconds / (seconds['project'] / n_steps):.1f} project steps; reused by later runs)")
    print(f"{(seconds['reference'] / n_steps) / (seconds['project'] / n_steps):.2f}x")


if __name__ == "__main__":
    main()
