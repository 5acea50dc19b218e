#!/usr/bin/env bash
# The project's one GPU check, under 8 minutes on one card: the training-loop comparison of
# bench_train.py (project loop on cached latents vs the diffusers-reference loop that encodes
# every step) in fp16 at batch 4, 16 and 64, printing images/s, peak GPU memory and the
# fraction of the card's fp16 peak FLOP rate reached; then bench_sample.py's comparison (batched
# DPM-Solver++ 20 steps vs one image per call, PNDM 50 steps) in fp16.
#
# The GPU image lacks diffusers and friends: carry them as wheels in .whl/ (see the device
# tool's README), e.g. diffusers peft accelerate transformers tokenizers safetensors
# huggingface_hub pandas; this script installs whatever .whl/ holds.
# Usage (repo root): bash benchmarks/gpu_check.sh   -> also writes $OUT/gpu_check.log
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
LOG=${OUT:-.}/gpu_check.log
{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__)"
} 2>&1 | tee "$LOG"
for batch in 4 16 64; do
  echo "== train loop, fp16, batch $batch" | tee -a "$LOG"
  timeout 140 python3 benchmarks/bench_train.py --device cuda --precision fp16 --batch-size "$batch" \
    --steps 8 --rounds 2 --images 64 2>&1 | grep -v Warning | tee -a "$LOG"
done
echo "== sampling, fp16, batch 16 vs one per call" | tee -a "$LOG"
timeout 120 python3 benchmarks/bench_sample.py --device cuda --precision fp16 --batch-size 16 \
  --reference-images 4 --rounds 2 2>&1 | grep -v Warning | tee -a "$LOG"
