"""Progress bars that read in every viewer: tqdm.auto's bar (text in a terminal, a widget in a
notebook), except that in a notebook the saved output ends as the bar's final text. A widget
bar is stored with the text it had when first shown ("0%|"), which plain viewers of a saved
notebook (papermill's executed copies, GitHub, Kaggle without widget state) show forever; this
one updates its display when it closes, so the saved copy reads "100%|...| 40/40 [00:01<00:00]"
while a live notebook still shows the widget."""

from __future__ import annotations

from tqdm.auto import tqdm as _auto_tqdm


def _saved_text_bar(notebook_tqdm):
    class SavedTextBar(notebook_tqdm):
        def __init__(self, *args, **kwargs):
            show = kwargs.pop("display", True)
            super().__init__(*args, display=False, **kwargs)
            self._shown = None
            if show and not self.disable:
                from IPython.display import display

                self._shown = display(self.container, display_id=True)  # a handle to update on close

        def close(self):
            super().close()
            shown, self._shown = getattr(self, "_shown", None), None
            if shown is not None:  # the same widget, re-sent: its text is now the final bar
                shown.update(self.container)

    return SavedTextBar


def _bar_class():
    try:
        from tqdm.notebook import tqdm as notebook_tqdm
    except ImportError:  # no ipywidgets: tqdm.auto's bar is the text one anyway
        return _auto_tqdm
    return _saved_text_bar(notebook_tqdm) if issubclass(_auto_tqdm, notebook_tqdm) else _auto_tqdm


tqdm = _bar_class()
