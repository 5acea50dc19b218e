"""A notebook run headless (papermill) saves each progress bar's final text, not the "0%|" a
widget bar is stored with; the control: tqdm.auto's own bar, saved the same way, shows 0%."""

from conftest import run_code_cell


def saved_bar_texts(tmp_path, import_line):
    code = (f"{import_line}\nfor _ in tqdm(range(20), desc='loop'):\n    pass\n"
            "bar = tqdm(total=5, desc='manual')\nbar.update(5)\nbar.close()\n"
            "for _ in tqdm(range(3), desc='hidden', disable=True):\n    pass")
    outputs = run_code_cell(tmp_path, code)
    assert all("application/vnd.jupyter.widget-view+json" in o.data for o in outputs)  # live: still widgets
    return ["".join(o.data["text/plain"]) for o in outputs]


def test_saved_notebooks_show_each_bars_final_text(tmp_path):
    texts = saved_bar_texts(tmp_path, "from cxr_helpers.core.bars import tqdm")
    assert [t.split("|")[0] for t in texts] == ["loop: 100%", "manual: 100%"]  # the disabled bar shows nothing
    assert "20/20" in texts[0] and "5/5" in texts[1]


def test_the_control_tqdm_auto_saves_zero_percent(tmp_path):
    texts = saved_bar_texts(tmp_path, "from tqdm.auto import tqdm")
    assert [t.split("|")[0] for t in texts] == ["loop:   0%", "manual:   0%"]
