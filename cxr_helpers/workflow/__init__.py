"""Running the suite: the notebooks through papermill, and Kaggle build and push."""

from ..core.lazy import lazy_exports

_WHERE = {
    **dict.fromkeys(['resolve_inputs', 'prepared_pairs', 'trained_lora', 'record', 'output_dir', 'run_notebooks',
                     'list_notebooks'], 'notebooks'),
    **dict.fromkeys(['build', 'push'], 'kaggle'),
}
__all__ = list(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
