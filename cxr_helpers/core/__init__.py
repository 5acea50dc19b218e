"""Plumbing every concern shares: errors, atomic file writes, the names of every file and folder,
where this runs, the GPU, output ownership."""

from .lazy import lazy_exports

_WHERE = {
    **dict.fromkeys(['CxrError', 'library_reason'], 'errors'),
    **dict.fromkeys(['atomic_path', 'write_text', 'write_json', 'read_json', 'read_user_json', 'write_csv',
                     'save_figure'], 'files'),
    **dict.fromkeys(['on_kaggle', 'is_main_process', 'offline', 'cache_root', 'library_versions'], 'environment'),
    **dict.fromkeys(['claim', 'owned', 'read_owner', 'folder_lock', 'file_digest'], 'ownership'),
}
__all__ = list(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
