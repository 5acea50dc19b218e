"""The data: reading the Kaggle dataset and pairs.csv, the prepare stage, report labels, prompts,
the resized-image cache, the dataset."""

from ..core.lazy import lazy_exports

_WHERE = {
    **dict.fromkeys(['prepare', 'PrepareResult', 'split_pairs', 'patients_on_both_sides'], 'stage'),
    **dict.fromkeys(['load_pairs', 'read_tables', 'resolve_data_dir', 'default_data_dir'], 'tables'),
    **dict.fromkeys(['report_labels', 'prompt_labels', 'mesh_major_terms', 'findings_first',
                     'GALLERY_FINDINGS', 'agreement_with_mesh'], 'labels'),
    **dict.fromkeys(['label_impression', 'impression_label_table', 'finding_truth', 'label_column'],
                    'impression_labels'),
    **dict.fromkeys(['ChestXrayDataset', 'sample_images'], 'dataset'),
    **dict.fromkeys(['clean_prompt', 'count_tokens'], 'prompts'),
    **dict.fromkeys(['ResizedImageCache', 'resize_xray'], 'image_cache'),
}
__all__ = list(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
