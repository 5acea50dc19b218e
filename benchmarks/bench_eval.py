"""FID + KID + IS over 2 x 512 images: the project's one shared feature pass against three
separate torchmetrics objects, each running its own Inception-v3 (torchmetrics'
NoTrainInceptionV3), same process, same images, same weights file.

The network is torch-fidelity's Inception-v3 with random weights written here (same architecture
and compute as the FID weights, which are a download): the metric values are meaningless, the
timing is what is measured, and both ways must give the same values.

    python benchmarks/bench_eval.py [--images 512] [--batch-size 32] [--repeats 2] [--device cuda]

The speedup has two factors, both printed: passes (5 per image pair for the three objects - FID
and KID each embed both sets, IS the generated one - against 2) and the cost of one pass (the
project's pass runs the convolutions channels-last on CPU). The last line is the speedup as
N.NNx (goal: >= 2.5x).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from cxr_helpers.evaluation.features import InceptionFeatures
from cxr_helpers.evaluation.embeddings import embed, full_float32
from cxr_helpers.evaluation.image_sets import gray_to_rgb_tensor
from cxr_helpers.evaluation.metrics import torchmetrics_fid, torchmetrics_is, torchmetrics_kid
from cxr_helpers.demo.synthetic_dataset import draw_report
from cxr_helpers.demo.films import draw_patient, render

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the test stand-ins, not the package's
from stand_ins import random_inception_weights  # noqa: E402


def films(n: int, seed: int) -> torch.Tensor:
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        report = draw_report(i, rng)
        out.append(render(report.findings, "Frontal" if i % 2 else "Lateral", draw_patient(rng), 128, 128, rng))
    return gray_to_rgb_tensor(out, 128)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512, help="per set")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each way, alternating")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    from torch.utils.flop_counter import FlopCounterMode
    from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
    from torchmetrics.image.inception import InceptionScore
    from torchmetrics.image.kid import KernelInceptionDistance

    warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
    weights = str(random_inception_weights(Path(tempfile.mkdtemp()) / "inception-random.pth"))
    net = InceptionFeatures(weights)
    with FlopCounterMode(display=False) as counter:
        net(torch.zeros(1, 3, 128, 128, dtype=torch.uint8))
    print(f"network: torch-fidelity Inception-v3, random weights, {counter.get_total_flops() / 1e9:.1f} GFLOP per "
          f"image (2 per multiply-add); torch {torch.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else
             f", threads {torch.get_num_threads()}, cores {os.cpu_count()}"))
    real, fake = films(args.images, 1), films(args.images, 2)
    subset = min(1000, args.images)
    batches = range(0, args.images, args.batch_size)

    def separate():
        # As a torchmetrics user writes it: three metric objects, each with its own network, with
        # the original FID resize (antialias=False) that the project's pass uses too.
        fid = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=weights, antialias=False)
        kid = KernelInceptionDistance(feature=NoTrainInceptionV3("inception-v3-compat", ["2048"], weights,
                                                                 antialias=False), subset_size=subset)
        score = InceptionScore(feature=NoTrainInceptionV3("inception-v3-compat", ["logits_unbiased"], weights,
                                                          antialias=False))
        for metric in (fid, kid, score):
            metric.to(args.device)
        # float32 convolutions, as the project's pass (on a GPU cuDNN would use TF32 otherwise:
        # benchmarks/gpu_feature_precision.py measures that apart).
        with full_float32():
            for start in batches:
                real_batch = real[start:start + args.batch_size].to(args.device)
                fake_batch = fake[start:start + args.batch_size].to(args.device)
                for metric in (fid, kid):
                    metric.update(real_batch, real=True)
                    metric.update(fake_batch, real=False)
                score.update(fake_batch)
        torch.manual_seed(0)
        kid_value = kid.compute()
        torch.manual_seed(0)
        return float(fid.compute()), float(kid_value[0]), float(score.compute()[0])

    def shared():
        shared_net = InceptionFeatures(weights).to(args.device)
        real_pool, _ = embed(shared_net, real, args.batch_size, progress=False)
        fake_pool, fake_logits = embed(shared_net, fake, args.batch_size, progress=False)
        return (torchmetrics_fid(real_pool, fake_pool, args.device),
                torchmetrics_kid(real_pool, fake_pool, subset, 0, args.device)[0],
                torchmetrics_is(fake_logits, 10, 0, args.device)[0])

    times: dict[str, list[float]] = {}
    results = {}
    for _ in range(args.repeats):
        for name, fn in (("separate", separate), ("shared", shared)):
            tic = time.perf_counter()
            results[name] = fn()
            times.setdefault(name, []).append(time.perf_counter() - tic)
    for name in ("separate", "shared"):
        fid, kid, score = results[name]
        print(f"{name:8s}: {np.mean(times[name]):.1f} s (runs: {', '.join(f'{t:.1f}' for t in times[name])}); "
              f"FID {fid:.6g}, KID {kid:.6g}, IS {score:.6g}")
    rel = np.abs(np.subtract(results["separate"], results["shared"])) / np.abs(results["separate"])
    print(f"same values both ways: largest relative difference {rel.max():.1e} (FID, KID, IS)")
    per_image_separate = np.mean(times["separate"]) / (5 * args.images)
    per_image_shared = np.mean(times["shared"]) / (2 * args.images)
    print(f"factors: passes 5/2 = 2.50x; time per image pass {per_image_separate * 1e3:.1f} ms vs "
          f"{per_image_shared * 1e3:.1f} ms = {per_image_separate / per_image_shared:.2f}x")
    print(f"{np.mean(times['separate']) / np.mean(times['shared']):.2f}x")


if __name__ == "__main__":
    main()
