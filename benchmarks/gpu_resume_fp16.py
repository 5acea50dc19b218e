"""fp16 on a GPU: a checkpoint carries the GradScaler's loss scale, and `--resume latest`
continues with it (a CPU cannot run fp16 training, so the tests cannot check this).

Trains the tiny model 6 steps in fp16 with a checkpoint at step 3, then resumes a copy of the
run from that checkpoint; prints the scaler state saved at step 3, the state the resumed run
started from, and how far the resumed LoRA is from the uninterrupted one.

    python benchmarks/gpu_resume_fp16.py --work /tmp/resume16
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch


def main() -> None:
    from safetensors.torch import load_file

    from cxr_helpers.config.stages import PrepareConfig, SynthConfig, TinyModelConfig, TrainConfig
    from cxr_helpers.data.stage import prepare
    from cxr_helpers.demo.tiny_model import make_tiny_model
    from cxr_helpers.demo.synthetic_dataset import make_synthetic_dataset
    from cxr_helpers.training.stage import train

    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="/tmp/resume16")
    work = Path(parser.parse_args().work)
    shutil.rmtree(work, ignore_errors=True)
    model = make_tiny_model(TinyModelConfig(out=str(work / "tiny")))
    data = make_synthetic_dataset(SynthConfig(out=str(work / "iu"), reports=40, image_size=160, broken_images=0),
                                  progress=False)
    prepare(PrepareConfig(data_dir=str(data), out=str(work / "data"), tokenizer=str(model), test_fraction=0.3),
            progress=False)
    settings = dict(pairs=str(work / "data" / "pairs.csv"), data_dir=str(data), model=str(model), batch_size=4,
                    max_steps=6, checkpoint_every=3, keep_checkpoints=3, mixed_precision="fp16", learning_rate=1e-3,
                    validation_prompts=("Cardiomegaly.",), validation_seeds=(0,), validation_steps=2)
    train(TrainConfig(out=str(work / "whole"), **settings), progress=False)
    saved = json.loads((work / "whole" / "checkpoints" / "step-0000003" / "state.json").read_text())
    # The "killed" run: only the step-3 checkpoint, then --resume latest.
    (work / "cut" / "checkpoints").mkdir(parents=True)
    shutil.copytree(work / "whole" / "checkpoints" / "step-0000003", work / "cut" / "checkpoints" / "step-0000003")
    train(TrainConfig(out=str(work / "cut"), resume="latest", **settings), progress=False)
    resumed = json.loads((work / "cut" / "checkpoints" / "step-0000006" / "state.json").read_text())
    whole_end = json.loads((work / "whole" / "checkpoints" / "step-0000006" / "state.json").read_text())
    a = load_file(str(work / "whole" / "lora" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(work / "cut" / "lora" / "pytorch_lora_weights.safetensors"))
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    scale = max(float(a[k].abs().max()) for k in a)
    print(json.dumps({"card": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "scaler_at_step_3": saved.get("grad_scaler"),
                      "scaler_at_step_6_uninterrupted": whole_end.get("grad_scaler"),
                      "scaler_at_step_6_resumed": resumed.get("grad_scaler"),
                      "same_scaler_state_at_6": whole_end.get("grad_scaler") == resumed.get("grad_scaler"),
                      "lora_max_abs_difference": diff, "lora_max_abs_value": scale}, indent=2))


if __name__ == "__main__":
    main()
