"""The training stage: setup, the step, the encodings cache, checkpoints, the LoRA export, the accelerate launch, progress, validation grids."""
