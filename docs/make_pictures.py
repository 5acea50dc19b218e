"""Regenerate the README's pictures (docs/pictures/*.png) from the offline demo.

    python docs/make_pictures.py [--out DEMO_DIR] [--no-browser]

Runs every notebook on the smoke preset (as the Quick start does), copies the figures a user
sees into docs/pictures/ as small PNGs, and takes the prompt panel's picture in a real
JupyterLab in headless Chromium by running tests/test_browser.py on the demo's pretrained base
and LoRA (needs the [browser] extra and a Chromium; --no-browser keeps the picture that is there).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
PICTURES = ROOT / "docs" / "pictures"
MAX_WIDTH = 800  # px: small files, still readable in the README
# picture name -> the demo's figure, relative to its output folder
FIGURES = {
    "gallery_128.png": "figures/03_sampling_gallery/gallery_128.png",
    "seed_grid.png": "figures/03_sampling_gallery/seed_grid.png",
    "loss_curve.png": "figures/02_lora_finetune/loss_curve.png",
    "base_vs_lora.png": "figures/02_lora_finetune/base_vs_lora.png",
    "adherence.png": "eval/figures/adherence.png",
    "metrics.png": "eval/figures/metrics.png",
    "diversity.png": "eval/figures/diversity.png",
    "top_impressions.png": "figures/01_data_exploration/top_impressions.png",
}


def shrink(source: Path, target: Path) -> None:
    from cxr_helpers.core.files import atomic_path

    image = Image.open(source).convert("RGB")
    if image.width > MAX_WIDTH:
        image = image.resize((MAX_WIDTH, round(image.height * MAX_WIDTH / image.width)), Image.Resampling.LANCZOS)
    with atomic_path(target) as tmp:
        # octree keeps the set colours
        image.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(tmp, format="PNG", optimize=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="demo output folder (default: a temporary one)")
    parser.add_argument("--no-browser", action="store_true", help="keep the prompt panel picture that is there")
    args = parser.parse_args(argv)
    from cxr_helpers.workflow.notebooks import run_notebooks

    out = Path(args.out or tempfile.mkdtemp(prefix="cxr-pictures-"))
    run_notebooks(out, "smoke")
    PICTURES.mkdir(parents=True, exist_ok=True)
    for name, figure in FIGURES.items():
        shrink(out / figure, PICTURES / name)
        print(f"{PICTURES / name} <- {out / figure}")
    if not args.no_browser:
        shot = out / "prompt_panel.png"
        env = {**os.environ, "CXR_WIDGET_SCREENSHOT": str(shot), "CXR_WIDGET_DEMO_OUT": str(out)}  # the demo's films
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", str(ROOT / "tests" / "test_browser.py")],
                       cwd=ROOT, env=env, check=True)
        if not shot.is_file():
            print("the browser test was skipped: no prompt panel picture (see its reason above)", file=sys.stderr)
            return 1
        shrink(shot, PICTURES / "prompt_panel.png")
        print(f"{PICTURES / 'prompt_panel.png'} <- the browser test")
    return 0


if __name__ == "__main__":
    sys.exit(main())
