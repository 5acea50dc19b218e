"""Stable Diffusion parts: loading from a hub id or a local folder, the sampling pipeline and
seeded generation, the tokenizer, the hub."""

from ..core.lazy import lazy_exports

_WHERE = {
    **dict.fromkeys(['load_pipeline', 'load_training_parts'], 'loading'),
    **dict.fromkeys(['load_sampling_pipeline', 'generate', 'image_seed', 'set_scheduler',
                     'check_lora_dir'], 'generation'),
    **dict.fromkeys(['load_tokenizer'], 'tokenizer'),
}
__all__ = list(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
