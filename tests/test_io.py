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


RISKY = ["=1+2", '=HYPERLINK("http://x","click")', "+A1", "-3 cm nodule", "@SUM(A1)", "\tTab first",
         "'quoted", "''"]
HARMLESS = ["Normal chest.", "", "a=b", "No acute disease - stable."]


def test_csv_cells_a_spreadsheet_would_run_are_escaped_and_read_back_intact(tmp_path):
    import csv

    import pandas as pd

    from cxr_helpers.core.files import read_csv, write_csv

    frame = pd.DataFrame({"prompt": RISKY + HARMLESS, "seed": range(len(RISKY + HARMLESS))})
    write_csv(tmp_path / "safe.csv", frame)
    with open(tmp_path / "safe.csv", newline="") as handle:
        cells = [row[0] for row in csv.reader(handle)][1:]
    assert all(cell.startswith("'") for cell in cells[: len(RISKY)])  # never a formula in a spreadsheet
    assert cells[len(RISKY):] == HARMLESS  # the others as they are
    back = read_csv(tmp_path / "safe.csv", keep_default_na=False)
    assert back["prompt"].tolist() == RISKY + HARMLESS and back["seed"].tolist() == list(frame["seed"])
    # the control: pandas alone leaves a formula at the start of a cell
    frame.to_csv(tmp_path / "raw.csv", index=False)
    with open(tmp_path / "raw.csv", newline="") as handle:
        assert [row[0] for row in csv.reader(handle)][1] == "=1+2"


def test_a_formula_impression_stays_text_in_pairs_and_metadata_and_reads_back_as_written(tmp_path, tokenizer):
    import pandas as pd
    from PIL import Image

    from cxr_helpers.config.stages import PrepareConfig
    from cxr_helpers.core.files import write_csv
    from cxr_helpers.data.stage import prepare
    from cxr_helpers.data.tables import load_pairs
    from cxr_helpers.evaluation.image_sets import generated_set
    impressions = ['=HYPERLINK("http://x","Normal chest.")', "+Cardiomegaly.", "-Small effusion.", "Normal chest."]
    root = tmp_path / "d"
    (root / "images" / "images_normalized").mkdir(parents=True)
    for uid in range(1, 5):
        Image.new("L", (64, 64), 50 * uid).save(root / "images" / "images_normalized"
                                                / f"{uid}_IM-{uid:04d}-1001.dcm.png")
    pd.DataFrame({"uid": range(1, 5), "MeSH": "normal", "Problems": "normal", "image": "x", "indication": "",
                  "comparison": "", "findings": "", "impression": impressions}).to_csv(root / "indiana_reports.csv",
                                                                                        index=False)
    pd.DataFrame({"uid": range(1, 5), "filename": [f"{u}_IM-{u:04d}-1001.dcm.png" for u in range(1, 5)],
                  "projection": "Frontal"}).to_csv(root / "indiana_projections.csv", index=False)
    prepare(PrepareConfig(data_dir=str(root), out=str(tmp_path / "out"), test_fraction=0.5), tokenizer=tokenizer,
            progress=False)
    raw = (tmp_path / "out" / "pairs.csv").read_text()
    assert ",'=HYPERLINK" in raw.replace('"', "") and ",=" not in raw.replace('"', "")
    assert set(load_pairs(tmp_path / "out" / "pairs.csv")["prompt"]) == set(impressions)
    folder = tmp_path / "samples"
    folder.mkdir()
    for i in range(len(impressions)):
        Image.new("L", (16, 16), 40 * i).save(folder / f"{i}.png")
    write_csv(folder / "metadata.csv", pd.DataFrame({"file": [f"{i}.png" for i in range(4)], "prompt": impressions}))
    assert generated_set("g", folder, 16).prompts == impressions
