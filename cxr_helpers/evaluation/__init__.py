"""The evaluation stage: feature networks, image sets, metrics, the memorisation audit,
prompt adherence and its scorers."""

from ..core.lazy import lazy_exports

_WHERE = {
    **dict.fromkeys(['evaluate', 'EvalResult', 'results_table', 'adherence_table'], 'stage'),
    **dict.fromkeys(['load_feature_net', 'StandInFeatures'], 'features'),
    **dict.fromkeys(['GeometryOracle'], 'geometry_oracle'),
}
__all__ = list(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
