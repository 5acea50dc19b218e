"""The figures made by sampling: real vs base vs fine-tuned, LoRA-scale sweeps, seed grids,
base-vs-LoRA grids and the validation grids that training draws at its checkpoints.

Every image comes from `sample.generate` with explicit seeds, so a figure is the same on every
device and batch size. matplotlib is imported by the figure functions only, as everywhere in
the package: importing the training stage does not load it.
"""

from __future__ import annotations

from pathlib import Path


from ..models.generation import generate, image_seed, load_sampling_pipeline
from ..data.labels import GALLERY_FINDINGS, findings_first
from .stage import upscale_image


# ---------------------------------------------------------------- sampling galleries ---------

def real_images(pairs_csv, data_dir, n: int, split: str = "test", resolution: int = 128, seed: int = 0,
                cache_dir=None, frontal_only: bool = True, findings=GALLERY_FINDINGS):
    """n (image, prompt) pairs of the split, one per report (frontal films when asked), the
    reports naming `findings` first (findings_first)."""
    from ..data.tables import load_pairs
    from ..data.dataset import ChestXrayDataset

    pairs = load_pairs(pairs_csv, split)
    if frontal_only and "projection" in pairs and (pairs["projection"] == "Frontal").any():
        pairs = pairs[pairs["projection"] == "Frontal"]
    pairs = pairs.drop_duplicates("uid").sample(frac=1.0, random_state=seed)
    pairs = findings_first(pairs, data_dir, findings).head(n).reset_index(drop=True)
    dataset = ChestXrayDataset(pairs, data_dir, resolution, cache_dir=cache_dir)
    return [dataset.load_image(i) for i in range(len(dataset))], pairs["prompt"].tolist()


def comparison_gallery(pipe, real, prompts, seed: int = 0, resolution: int = 128, steps: int = 20,
                       upscale: int = 512, save_to=None, save_upscaled_to=None):
    """Rows of (real, base, fine-tuned) for the same prompt and seed, at 128 px and upscaled."""
    from ..figures import plots

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
    from ..figures import plots

    images = [generate(pipe, [prompt], [seed], resolution, steps, lora_scale=s)[0] for s in scales]
    return plots.image_grid(images, [f"LoRA scale {s}" for s in scales], columns=len(scales), save_to=save_to,
                            title=prompt)


def seed_grid(pipe, prompt: str, seeds=range(8), resolution: int = 128, steps: int = 20, lora_scale: float | None = 1.0,
              save_to=None):
    from ..figures import plots

    seeds = list(seeds)
    images = generate(pipe, [prompt] * len(seeds), seeds, resolution, steps, lora_scale=lora_scale)
    return plots.image_grid(images, [f"seed {s}" for s in seeds], columns=min(4, len(seeds)), save_to=save_to,
                            title=prompt)


# ---------------------------------------------------------------- training figures -----------

def base_vs_lora_grid(model: str, lora_dir: str | Path, prompts, seeds, resolution: int = 128, steps: int = 20,
                      save_to: str | Path | None = None):
    """For each prompt and seed: the base model (LoRA scale 0) beside the fine-tuned one, loaded
    the way any diffusers user would (`load_lora_weights`)."""
    from ..figures import plots

    pipe = load_sampling_pipeline(model, lora_dir)
    seeds = list(seeds)
    every_prompt = [p for p in prompts for _ in seeds]
    base = generate(pipe, every_prompt, seeds * len(prompts), resolution, steps, lora_scale=0.0)
    tuned = generate(pipe, every_prompt, seeds * len(prompts), resolution, steps, lora_scale=1.0)
    images, captions = [], []
    for i, prompt in enumerate(prompts):
        for j, seed in enumerate(seeds):
            k = i * len(seeds) + j
            images += [base[k], tuned[k]]
            captions += [f"base, seed {seed} | {prompt}", f"LoRA, seed {seed} | {prompt}"]
    return plots.image_grid(images, captions, columns=2 * len(seeds), save_to=save_to,
                            title="base model (LoRA scale 0) vs fine-tuned, same seeds")
