"""How fast `prepare` checks the Kaggle copy's 7,466 images, against decoding them.

Builds a dataset in the Kaggle layout with the real collection's counts (3,955 reports, 7,466
listed images) of full-size (~2,000 px) synthetic films, then times the whole prepare stage
(CSV reading, tokenizing, header + trailer checks of every image, split, writes) and, as the
reference measured in the same run, a full decode of a sample of the same files.
The films are 24 distinct renders hard-linked under 7,466 names (disk space); the page cache
is warm for both measurements, so this measures the work per file, not a cold network disk.

    python benchmarks/bench_prepare.py [--work DIR]

The last line is the speedup of the header checks over full decodes, as N.NNx.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cxr_helpers.config.stages import PrepareConfig
from cxr_helpers.data.stage import prepare
from cxr_helpers.demo.synthetic_dataset import draw_report, write_impression
from cxr_helpers.demo.films import draw_patient, render
from cxr_helpers.models.tokenizer import load_tokenizer, write_clip_tokenizer

N_REPORTS, N_IMAGES, N_DISTINCT, N_DECODE = 3955, 7466, 24, 120


def build(root: Path) -> None:
    images = root / "images" / "images_normalized"
    images.mkdir(parents=True, exist_ok=True)
    masters = []
    for i in range(N_DISTINCT):
        rng = np.random.default_rng(i)
        report = draw_report(i, rng)
        view = "Frontal" if i % 2 == 0 else "Lateral"
        h, w = int(rng.uniform(1900, 2500)), int(rng.uniform(1800, 2400))
        path = images / f"master_{i}.png"
        Image.fromarray(render(report.findings, view, draw_patient(rng), h, w, rng), "L").save(path)
        masters.append(path)
    reports, projections = [], []
    for uid in range(1, N_REPORTS + 1):
        rng = np.random.default_rng(uid)
        reports.append({"uid": uid, "MeSH": "normal", "Problems": "normal", "image": "", "indication": "",
                        "comparison": "", "findings": "", "impression": write_impression(draw_report(uid, rng), rng)})
    uid = 0
    for k in range(N_IMAGES):
        uid = k // 2 + 1 if k // 2 + 1 <= N_REPORTS else uid
        name = f"{uid}_IM-{k:04d}-{4001 if k % 2 == 0 else 3001}.dcm.png"
        os.link(masters[k % N_DISTINCT], images / name)
        projections.append({"uid": uid, "filename": name, "projection": "Frontal" if k % 2 == 0 else "Lateral"})
    pd.DataFrame(reports).to_csv(root / "indiana_reports.csv", index=False)
    pd.DataFrame(projections).to_csv(root / "indiana_projections.csv", index=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", help="folder for the generated dataset (default: a temp dir)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_prepare_"))
    data_dir = work / "iu"
    if not (data_dir / "indiana_projections.csv").is_file():
        print(f"building {N_IMAGES} listed images ({N_DISTINCT} distinct ~2,000 px films) in {data_dir} ...")
        build(data_dir)
    tokenizer = load_tokenizer(write_clip_tokenizer(work / "tokenizer"))

    start = time.perf_counter()
    result = prepare(PrepareConfig(data_dir=str(data_dir), out=str(work / "out"), workers=8), tokenizer=tokenizer,
                     progress=False)
    checked = time.perf_counter() - start

    files = [data_dir / "images" / "images_normalized" / f for f in result.pairs["filename"][:N_DECODE]]
    start = time.perf_counter()
    for path in files:
        with Image.open(path) as im:
            im.load()
    per_decode = (time.perf_counter() - start) / len(files)

    decode_all = per_decode * N_IMAGES
    print(f"cores: {os.cpu_count()}")
    print(f"prepare over {result.summary['images_listed']} images ({result.summary['pairs']} pairs): {checked:.2f} s "
          f"(goal: under 30 s)")
    print(f"reference, full decode: {per_decode * 1000:.1f} ms per image -> {decode_all:.0f} s for {N_IMAGES} "
          f"(from {len(files)} decoded)")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{decode_all / checked:.2f}x")


if __name__ == "__main__":
    main()
