import pytest

from cxr_helpers.core.files import atomic_path, write_json


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path):
    target = tmp_path / "summary.json"
    write_json(target, {"good": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half a fi")
            raise RuntimeError("killed mid-write")
    assert target.read_text().strip().startswith("{") and '"good": 1' in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temp file left
