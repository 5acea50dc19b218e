"""How far TF32 convolutions (cuDNN's default on a GPU) move the Inception features and the FID,
against the float32 pass the project uses (embeddings.full_float32), and what each costs.
torch-fidelity's Inception-v3 with random weights (the FID weights are a download): a lead on
the size of the effect, not the figure for the real weights. GPU only.

    python benchmarks/gpu_feature_precision.py [--images 512]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from cxr_helpers.evaluation.features import InceptionFeatures
from cxr_helpers.evaluation.embeddings import embed
from cxr_helpers.evaluation.metrics import torchmetrics_fid
from bench_eval import films

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the test stand-ins, not the package's
from stand_ins import random_inception_weights  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512, help="per set")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_feature_precision.py needs a CUDA GPU; on a CPU there is no TF32 to compare")
    weights = random_inception_weights(Path(tempfile.mkdtemp()) / "inception-random.pth")
    net = InceptionFeatures(weights).cuda()
    real, fake = films(args.images, 1), films(args.images, 2)

    def tf32_pass(images):
        saved = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = True
        try:
            with torch.no_grad():
                return torch.cat([net(images[i:i + args.batch_size].cuda())[0].float().cpu()
                                  for i in range(0, len(images), args.batch_size)])
        finally:
            torch.backends.cudnn.allow_tf32 = saved

    results = {}
    for name, run in (("float32", lambda x: embed(net, x, args.batch_size, progress=False)[0]), ("tf32", tf32_pass)):
        run(real[:args.batch_size])  # warm-up: cuDNN picks its kernels
        torch.cuda.synchronize()
        tic = time.perf_counter()
        pools = run(real), run(fake)
        torch.cuda.synchronize()
        results[name] = (time.perf_counter() - tic, pools, torchmetrics_fid(*pools, "cuda"))
    (t32, (r32, _), fid32), (ttf, (rtf, _), fidtf) = results["float32"], results["tf32"]
    feature_rel = float((rtf - r32).norm() / r32.norm())
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, 2 x {args.images} images")
    print(f"float32 pass: {t32:.2f} s, FID {fid32:.6g}; tf32 pass: {ttf:.2f} s, FID {fidtf:.6g}")
    print(f"features: relative difference {feature_rel:.1e}; FID relative difference {abs(fidtf - fid32) / fid32:.1e}; "
          f"tf32 time / float32 time {ttf / t32:.2f}")


if __name__ == "__main__":
    main()
