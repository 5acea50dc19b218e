"""Every notebook runs headless through papermill on the smoke preset, and records values the
tests check against the files it wrote. Notebooks are committed without outputs."""

import ast
import json
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from cxr_helpers.evaluation.geometry_oracle import GeometryOracle
from cxr_helpers.evaluation.image_sets import REAL_TEST_SET
from cxr_helpers.core.layout import DEMO_INPUTS_DIR, TINY_MODEL_CONFIG_JSON
from cxr_helpers.evaluation.memorisation import AUDIT_BASELINE_SET
from cxr_helpers.workflow.notebooks import list_notebooks, run_notebooks

NOTEBOOKS = list_notebooks(Path(__file__).resolve().parent.parent / "notebooks")
# The demo's adherence margins (AUROC), from benchmarks/demo_learns.py (RESULTS.md, "A demo that
# learns"): over seeds 0-2 and both environments the base scored 0.49-0.57, the fine-tuned model
# 0.67-0.85 and +0.10 to +0.34 above the base; each bound sits below what was measured.
BASE_NEAR_CHANCE = 0.12
TUNED_AT_LEAST = 0.6
TUNED_OVER_BASE = 0.08


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs; clear them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_thin_notebook_conventions(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged parameters"
    for stmt in ast.parse(tagged[0].source).body:  # UPPER_CASE literals, one comment each
        assert isinstance(stmt, ast.Assign) and stmt.targets[0].id.isupper()
        ast.literal_eval(stmt.value)
    assert all("#" in line for line in tagged[0].source.splitlines() if "=" in line)
    for cell in code:
        tree = ast.parse(cell.source)
        assert not any(isinstance(n, (ast.FunctionDef, ast.ClassDef)) for n in ast.walk(tree)), "no defs in notebooks"
        assert "sys.path" not in cell.source
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    executed = run_notebooks(out, "smoke", NOTEBOOKS[0].parent, timeout=600)
    return out, executed


def test_every_notebook_runs_on_the_smoke_preset(demo_run):
    out, executed = demo_run
    assert [p.name for p in executed] == [p.name for p in NOTEBOOKS]
    for path in executed:
        nb = nbformat.read(path, as_version=4)
        assert nb.metadata["papermill"]["exception"] in (None, False)
        images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
        assert images >= 1, f"{path.name} shows no figure inline"


def test_notebook_01_records_what_it_wrote(demo_run):
    out, _ = demo_run
    rec = json.loads((out / "records" / "01_data_exploration.json").read_text())
    pairs = pd.read_csv(rec["pairs_csv"])
    summary = json.loads((Path(rec["pairs_csv"]).parent / "summary.json").read_text())
    assert rec["pairs"] == len(pairs) == summary["pairs"] > 50
    assert rec["patients_on_both_sides"] == 0 == pairs.groupby("uid")["split"].nunique().gt(1).sum()
    assert rec["pairs_by_split"] == {s: int((pairs["split"] == s).sum()) for s in ("train", "test")}
    assert rec["excluded_by_reason"]["missing_image"] >= 1 and rec["excluded_by_reason"]["unreadable_image"] >= 1
    assert rec["tokens_over_limit"] == rec["excluded_by_reason"]["too_long"] > 0
    assert rec["grid_images"] == 8
    figures = out / "figures" / "01_data_exploration"
    expected = {"exclusions.png", "projections.png", "token_lengths.png", "top_impressions.png",
                "mesh_terms.png", "image_grid.png", "split.png"}
    assert set(rec["figures"]) == expected and all((figures / f).stat().st_size > 1000 for f in expected)


def test_notebook_02_trains_and_records_a_loadable_lora(demo_run):
    out, _ = demo_run
    rec = json.loads((out / "records" / "02_lora_finetune.json").read_text())
    loss = pd.read_csv(out / "train" / "loss.csv")
    assert rec["steps_done"] == rec["loss_rows"] == len(loss) == loss["step"].max() > 0
    assert rec["final_loss"] == pytest.approx(float(loss["loss"].iloc[-1]))
    assert (Path(rec["lora_dir"]) / "pytorch_lora_weights.safetensors").is_file()
    assert set(rec["figures"]) == {"loss_curve.png", "base_vs_lora.png"}
    # it reused notebook 01's pairs rather than preparing again
    assert (json.loads((out / "train" / "lora" / "config.json").read_text())["config"]["pairs"]
            == str(out / "data" / "pairs.csv"))


def test_notebook_03_draws_galleries_drives_the_widget_and_exports(demo_run):
    out, _ = demo_run
    rec = json.loads((out / "records" / "03_sampling_gallery.json").read_text())
    assert rec["gallery_rows"] == 4 and rec["widget_images"] == 4
    assert rec["export_images"] == rec["export_pairs"] == 6  # 3 findings x EXPORT_COUNT 2, all read back
    assert set(rec["figures"]) == {"gallery_128.png", "gallery_512.png", "lora_scale_sweep.png", "seed_grid.png"}
    assert rec["lora_dir"] == str(out / "train" / "lora")
    exported = pd.read_csv(out / "export" / "dataset" / "indiana_reports.csv")
    assert exported["image"].str.startswith("SYNTHETIC").all()


def test_notebook_04_scores_base_tuned_and_floor_with_a_named_stand_in(demo_run):
    out, _ = demo_run
    rec = json.loads((out / "records" / "04_evaluation.json").read_text())
    metrics = pd.read_csv(out / "eval" / "metrics.csv")
    assert set(rec["fid"]) == {"base", "fine-tuned", "real train (floor)"} == set(rec["fid_infinity"])
    assert set(metrics["set"]) - set(rec["fid"]) <= {AUDIT_BASELINE_SET, REAL_TEST_SET}
    for name, value in rec["fid"].items():
        fid = metrics.loc[(metrics["set"] == name) & (metrics["metric"] == "fid"), "value"].iloc[0]
        assert value == pytest.approx(fid)
    assert rec["fid"]["real train (floor)"] < min(rec["fid"]["base"], rec["fid"]["fine-tuned"])  # real is the floor
    assert rec["feature_network"].startswith("STAND-IN") and metrics["feature_network"].str.contains("STAND-IN").any()
    assert any("biased" in note for note in rec["notes"])
    assert {"metrics.png", "nearest_pairs.png", "diversity.png"} <= set(rec["figures"])
    # The audit's two counts and its baseline are in metrics.csv.
    value = metrics.set_index(["set", "metric"])["value"]
    assert rec["train_matches"] == value["base", "audit_train_matches"] + value["fine-tuned", "audit_train_matches"]
    assert 0 < value[AUDIT_BASELINE_SET, "audit_baseline_pixel_correlation"] <= 1
    # Prompt adherence on the smoke preset: the geometry oracle, the real synthetic films its ceiling.
    adherence = pd.DataFrame(rec["adherence"])
    assert {"all", "seen", "unseen"} <= set(adherence["prompts"])  # the seen and unseen prompts apart too
    adherence = adherence[adherence["prompts"] == "all"].set_index(["set", "finding"])
    assert (adherence["scorer"] == GeometryOracle.name).all() and "adherence.png" in rec["figures"]
    test_pairs = (pd.read_csv(out / "data" / "pairs.csv")["split"] == "test").sum()
    # every test pair x 2
    assert len(pd.read_csv(out / "eval" / "samples" / "fine-tuned" / "metadata.csv")) == 2 * test_pairs
    # adherence scores them all, not FID's N (an image whose prompt is uncertain of a finding sits that one out)
    assert (adherence.loc["fine-tuned", "images"] + adherence.loc["fine-tuned", "uncertain"] == 2 * test_pairs).all()


def test_the_demo_learns_what_the_impressions_say(demo_run):
    """The README's first command, as a user runs it: the LoRA on the pretrained tiny base must
    follow the prompts. Margins from benchmarks/demo_learns.py over seeds 0-2 (RESULTS.md, "A demo
    that learns"); a wrong latent scale, prediction type, LoRA scale or guidance would fail here."""
    out, _ = demo_run
    rec = json.loads((out / "records" / "04_evaluation.json").read_text())
    adherence = pd.DataFrame(rec["adherence"])
    auroc = adherence[adherence["prompts"] == "all"].set_index(["set", "finding"])["auroc"]
    for finding in ("Cardiomegaly", "Effusion"):
        base, tuned, real = auroc["base", finding], auroc["fine-tuned", finding], auroc[REAL_TEST_SET, finding]
        assert abs(base - 0.5) < BASE_NEAR_CHANCE, (f"{finding}: the base model, which never saw a finding, "
                                                    f"scores {base:.2f}")
        assert (tuned >= TUNED_AT_LEAST
                and tuned - base >= TUNED_OVER_BASE), f"{finding}: fine-tuned {tuned:.2f}, base {base:.2f}"
        assert real > 0.9 and tuned < real + 0.02  # the oracle's ceiling: the real films
    # FID against the real films falls from base to fine-tuned on every seed measured. KID did not
    # (it rose in every run of this recipe, on the stand-in network at N ~ 214), so it is reported,
    # not asserted (RESULTS.md).
    assert rec["fid"]["fine-tuned"] < rec["fid"]["base"]
    # The base's own record: its VAE posterior is narrow beside its latents (train() samples from
    # it; decoding only the mean in pretraining left it ~1 and drowned the findings in noise).
    tiny = json.loads((out / DEMO_INPUTS_DIR / "tiny_model" / TINY_MODEL_CONFIG_JSON).read_text())
    assert tiny["pretraining"]["posterior_std_over_latent_std"] < 0.25
