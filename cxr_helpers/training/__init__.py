"""The training stage: setup, the step, the encodings cache, checkpoints, the LoRA export,
the accelerate launch, progress, validation grids."""

from ..core.lazy import lazy_exports

_WHERE = {
    **dict.fromkeys(['train', 'TrainResult'], 'stage'),
    **dict.fromkeys(['run_training'], 'launch'),
    **dict.fromkeys(['default_validation_prompts', 'validation_grid'], 'validation'),
}
__all__ = list(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
