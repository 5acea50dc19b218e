"""The offline demo: synthetic films in the Kaggle layout, the tiny SD-shaped model and its pretraining."""

from ..core.lazy import lazy_exports

_WHERE = {
    **dict.fromkeys(['make_synthetic_dataset', 'dataset_is_built'], 'synthetic_dataset'),
    **dict.fromkeys(['make_tiny_model', 'tiny_model_is_built', 'build_tiny_pipeline'], 'tiny_model'),
}
__all__ = list(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
