"""The sampling stage: sample folders, galleries, the synthesize export, the prompt panel."""

from ..core.lazy import lazy_exports

_WHERE = {
    **dict.fromkeys(['sample', 'SampleResult', 'upscale_image'], 'stage'),
    **dict.fromkeys(['base_vs_lora_grid', 'comparison_gallery', 'lora_scale_sweep', 'real_images',
                     'seed_grid'], 'galleries'),
    **dict.fromkeys(['example_spec', 'write_spec', 'read_spec'], 'synthesize'),
    **dict.fromkeys(['PromptPanel'], 'widgets'),
}
__all__ = list(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
