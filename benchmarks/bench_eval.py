"""FID + KID + IS over 2 x 512 images: the project's one shared feature pass against three
separate torchmetrics objects (each runs its own network pass), same process, same images.

The network is torch-fidelity's Inception-v3 when it can be loaded (`--feature-net inception`;
it needs torch-fidelity, torchvision and the weights). Otherwise it is a conv net built to cost
about what Inception-v3 costs per image (FLOPs printed, measured with torch's FLOP counter) and
to give the same outputs (2048-d pool features, 1008 logits), with random weights: the metric
values are meaningless, the timing is what is measured.

    python benchmarks/bench_eval.py [--images 512] [--feature-net costmatched|inception]

The last line is the speedup of the shared pass as N.NNx (goal: >= 2.5x).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from torch import nn

from cxr_helpers import evaluate as ev
from cxr_helpers.synthetic import draw_patient, draw_report, render


class CostMatchedNet(nn.Module):
    """Random-weight conv net: 299 px input like Inception, 2048-d pool + 1008 logits."""

    name = "cost-matched random conv net (Inception-v3-sized compute)"
    key = "costmatched"

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        widths = [3, 64, 128, 256, 256, 512, 1024, 2048]
        strides = [2, 2, 2, 1, 2, 2, 2]
        self.convs = nn.ModuleList(nn.Conv2d(i, o, 3, s, 1) for i, o, s in zip(widths, widths[1:], strides))
        self.head = nn.Linear(2048, 1008)
        self.num_features = 2048
        self.eval()

    @torch.no_grad()
    def forward(self, images):
        x = nn.functional.interpolate(images.float() / 127.5 - 1, size=(299, 299), mode="bilinear", align_corners=False)
        for conv in self.convs:
            x = torch.relu(conv(x))
        pool = x.mean(dim=(2, 3))
        return pool, self.head(pool)


def films(n: int, seed: int) -> torch.Tensor:
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        report = draw_report(i, rng)
        out.append(render(report.findings, "Frontal" if i % 2 else "Lateral", draw_patient(rng), 128, 128, rng))
    return torch.from_numpy(np.stack(out)).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512, help="per set")
    parser.add_argument("--feature-net", default="costmatched", choices=["costmatched", "inception"])
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    from torch.utils.flop_counter import FlopCounterMode
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.inception import InceptionScore
    from torchmetrics.image.kid import KernelInceptionDistance

    net = CostMatchedNet() if args.feature_net == "costmatched" else ev.InceptionFeatures(None)
    probe = torch.zeros(1, 3, 128, 128, dtype=torch.uint8)
    with FlopCounterMode(display=False) as counter:
        net(probe)
    print(f"network: {net.name}, {counter.get_total_flops() / 1e9:.1f} GFLOP per image (Inception-v3: ~5.7); "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, cores {os.cpu_count()}")
    real, fake = films(args.images, 1), films(args.images, 2)
    subset = min(1000, args.images)

    class Pool(nn.Module):
        num_features = 2048

        def forward(self, x):
            return torch.cat([net(x[i:i + args.batch_size])[0] for i in range(0, len(x), args.batch_size)])

    class Logits(nn.Module):
        def forward(self, x):
            return torch.cat([net(x[i:i + args.batch_size])[1] for i in range(0, len(x), args.batch_size)])

    def separate():
        fid, kid = FrechetInceptionDistance(feature=Pool()), KernelInceptionDistance(feature=Pool(), subset_size=subset)
        score = InceptionScore(feature=Logits())
        for metric in (fid, kid):
            metric.update(real, real=True)
            metric.update(fake, real=False)
        score.update(fake)
        torch.manual_seed(0)
        kid_value = kid.compute()
        torch.manual_seed(0)
        return float(fid.compute()), float(kid_value[0]), float(score.compute()[0])

    def shared():
        real_pool, _ = ev.embed(net, real, args.batch_size, progress=False)
        fake_pool, fake_logits = ev.embed(net, fake, args.batch_size, progress=False)
        return (ev.torchmetrics_fid(real_pool, fake_pool), ev.torchmetrics_kid(real_pool, fake_pool, subset, 0)[0],
                ev.torchmetrics_is(fake_logits, 10, 0)[0])

    times = {}
    results = {}
    for name, fn in (("separate", separate), ("shared", shared), ("separate", separate), ("shared", shared)):
        tic = time.perf_counter()
        results[name] = fn()
        times.setdefault(name, []).append(time.perf_counter() - tic)
    for name in ("separate", "shared"):
        fid, kid, score = results[name]
        print(f"{name:8s}: {np.mean(times[name]):.1f} s (runs: {', '.join(f'{t:.1f}' for t in times[name])}); "
              f"FID {fid:.6g}, KID {kid:.6g}, IS {score:.6g}")
    same = np.allclose(results["separate"], results["shared"], rtol=1e-5)
    print(f"same values both ways: {same}")
    print(f"{np.mean(times['separate']) / np.mean(times['shared']):.2f}x")


if __name__ == "__main__":
    main()
