#!/usr/bin/env bash
# The project's one GPU check, under 10 minutes on one card:
#  1. bench_eval.py on the GPU (shared Inception pass vs torchmetrics' three objects, 2 x 512);
#  2. gpu_feature_precision.py: how far cuDNN's default TF32 moves the features and the FID;
#  3. the real-feature-network tests on the GPU (evaluate moves its networks there);
#  4. bench_train.py (project loop on cached latents vs the diffusers-reference loop that encodes
#     every step) in fp16 at batch 4, 16 and 64: images/s, peak GPU memory, fraction of fp16 peak;
#  5. bench_sample.py (batched DPM-Solver++ 20 steps vs one image per call, PNDM 50 steps) in fp16;
#  6. gpu_kaggle_path.py: notebook 02's training (preset gpu-1x16gb) and notebook 04's generation
#     through the stage code, SD1.5-shaped random weights, fp16, with the default device choice;
#  7. demo_learns.py: the offline demo's chain (pretrained tiny model, LoRA, both evaluation sets,
#     adherence and FID) on the GPU, seed 0: does the demo still learn there (fp16 generation)?
# PARTS picks sections: PARTS="kaggle demo" bash benchmarks/gpu_check.sh runs only 6 and 7
# (default: all).
#
# The GPU image lacks diffusers, torch-fidelity (and may hold an older peft): carry them as
# wheels in .whl/ (see the device tool's README); this script installs whatever .whl/ holds.
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
PARTS=${PARTS:-eval train sample kaggle demo}
if [[ " $PARTS " == *" eval "* ]]; then
echo "== eval: shared pass vs three torchmetrics objects, 2 x 512" | tee -a "$LOG"
timeout 120 python3 benchmarks/bench_eval.py --device cuda --images 512 --batch-size 64 --repeats 3 2>&1 \
  | grep -v Warning | tee -a "$LOG"
echo "== eval: TF32 vs float32 features" | tee -a "$LOG"
timeout 60 python3 benchmarks/gpu_feature_precision.py --images 512 2>&1 | grep -v Warning | tee -a "$LOG"
echo "== tests/test_feature_networks.py on the GPU" | tee -a "$LOG"
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_feature_networks.py 2>&1 | tail -3 | tee -a "$LOG"
fi
if [[ " $PARTS " == *" train "* ]]; then
for batch in 4 16 64; do
  echo "== train loop, fp16, batch $batch" | tee -a "$LOG"
  timeout 90 python3 benchmarks/bench_train.py --device cuda --precision fp16 --batch-size "$batch" \
    --steps 8 --rounds 2 --images 64 2>&1 | grep -v Warning | tee -a "$LOG"
done
fi
if [[ " $PARTS " == *" sample "* ]]; then
echo "== sampling, fp16, batch 16 vs one per call" | tee -a "$LOG"
timeout 90 python3 benchmarks/bench_sample.py --device cuda --precision fp16 --batch-size 16 \
  --reference-images 4 --rounds 2 2>&1 | grep -v Warning | tee -a "$LOG"
fi
if [[ " $PARTS " == *" kaggle "* ]]; then
echo "== notebook 02 training + notebook 04 generation through the stages, fp16, SD1.5-shaped" | tee -a "$LOG"
timeout 420 python3 benchmarks/gpu_kaggle_path.py --work "$(mktemp -d)" --out "${OUT:-.}" --train-steps 30 \
  --images 512 2>&1 | grep -v Warning | tee -a "$LOG"
fi
if [[ " $PARTS " == *" demo "* ]]; then
echo "== the offline demo's chain on the GPU (pretrained tiny model, LoRA, evaluation), seed 0" | tee -a "$LOG"
timeout 300 python3 benchmarks/demo_learns.py --work "$(mktemp -d)" --seeds 0 --out "${OUT:-.}" 2>&1 \
  | grep -v Warning | tee -a "$LOG"
fi
