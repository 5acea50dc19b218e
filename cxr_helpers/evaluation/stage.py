"""The evaluation stage: FID, KID and IS from one feature pass, a memorisation audit with a
real baseline, and prompt adherence.

Real images are the test split, prepared as for training; generated images come from sample
directories (`image_sets`). Every image goes through the feature network once (`features`); its
pool features feed FID, KID, precision/recall/density/coverage and the memorisation audit, and
its logits feed IS. Each metric the config names is computed by the entry of that name in
`registry.METRICS`, which returns its rows, tables and notes (the arithmetic is in `metrics`, the
audit in `memorisation`, prompt adherence in `adherence`); the figures are drawn from what they
returned (`result_figures`). Real-image features are cached on disk, keyed by the image list and
the network, so re-evaluating embeds only the generated images (`embeddings`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from . import adherence as adh
from . import embeddings
from ..config.stages import EvalConfig, config_to_dict, output_identity
from ..core.environment import cache_root, library_versions
from ..core.errors import CxrError
from ..core.files import staged_outputs, write_csv, write_json
from ..core.ownership import owned, path_identity
from ..core.layout import (ADHERENCE_CSV, AUDIT_CSV, DIVERSITY_CSV, FIGURES_DIR, METRICS_CSV, METRICS_JSON,
                           STAGING_DIR)
from .features import STANDIN_NAME, StandInFeatures, load_feature_net, load_xrv
from .image_sets import REAL_TEST_SET, ImageSet, generated_set, parse_generated, pick, real_set, take
from .inputs import Embedded, EvalInputs
from .registry import DIVERSITY_COLUMNS, Measurements, measure

FID_BIAS_N = 2048
# What an evaluation writes into OUT (staged: they replace an earlier run's together).
EVAL_OUTPUTS = (METRICS_CSV, METRICS_JSON, AUDIT_CSV, DIVERSITY_CSV, ADHERENCE_CSV, FIGURES_DIR)
TABLE_COLUMNS = ["set", "metric", "value", "std", "ci_low", "ci_high", "n_real", "n_generated", "feature_network"]


@dataclass
class EvalResult:
    """What `evaluate` wrote to `out`, as tables, and its notes and figures."""

    out: Path
    table: pd.DataFrame
    audit: pd.DataFrame
    adherence: pd.DataFrame
    diversity: pd.DataFrame
    feature_network: str
    notes: list[str]
    cache_hits: list[str]
    figures: dict


def evaluate(cfg: EvalConfig, progress: bool = True, feature_net: nn.Module | None = None) -> EvalResult:
    """Score every generated set (and the real-vs-real floor) against the real test images."""
    from ..data.tables import resolve_data_dir

    folders = parse_generated(cfg.generated)
    data_dir = resolve_data_dir(cfg.data_dir)
    out = Path(cfg.out)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else cache_root(out)  # on Kaggle: outside the output
    # OUT is this run's while it runs (one evaluation at a time; another one's output is refused or,
    # with --overwrite, moved aside), but for its inputs inside it (notebook 04's samples/, the cache).
    inside = (STAGING_DIR, *top_names_inside(out, [cache_dir, data_dir, *(path for _, path in folders)]))
    # Every input by its content; each generated set by its name and its folder's files.
    identity = {**output_identity(replace(cfg, data_dir=str(data_dir), generated=())),
                "generated": [f"{name}={path_identity(str(path))}" for name, path in folders]}
    with owned(out, "evaluate", identity, cfg.overwrite, ignore=inside, keep=inside):
        return _evaluate(cfg, folders, data_dir, out, cache_dir, progress, feature_net)


def top_names_inside(folder: Path, paths: list[Path]) -> list[str]:
    """The names of `folder`'s entries that hold one of `paths` (an input kept inside an output)."""
    names = []
    for path in paths:
        try:
            names.append(Path(path).resolve().relative_to(folder.resolve()).parts[0])
        except (ValueError, IndexError):  # outside the folder, or the folder itself
            continue
    return sorted(set(names))


def _evaluate(cfg: EvalConfig, folders: list[tuple[str, Path]], data_dir: Path, out: Path, cache_dir: Path,
              progress: bool, feature_net: nn.Module | None) -> EvalResult:
    generated = read_generated_sets(cfg, folders)
    real, train = read_real_sets(cfg, data_dir, cache_dir)
    notes = [f"{g.name}: {g.unreadable} unreadable image(s) skipped" for g in generated if g.unreadable]
    n, n_notes = images_per_set(cfg, real, train, generated)
    kid_subset, kid_std_meaningful, is_splits, subset_notes = subset_sizes(cfg, n)
    net, device = feature_network(cfg, feature_net)
    xrv_net, xrv_notes = xrv_network(cfg, device)
    notes += n_notes + subset_notes + ([f"features: {STANDIN_NAME}"] if isinstance(net, StandInFeatures) else [])
    notes += xrv_notes
    real_idx = pick(len(real.images), n, cfg.seed)
    real_features, train_features, compared, hits = embed_sets(cfg, net, real, train, generated, n, cache_dir,
                                                               progress)
    inputs = EvalInputs(cfg=cfg, net=net, device=device, real=real, real_features=real_features,
                        real_n=take(real, real_idx), real_pool=real_features[real_idx], train=train,
                        train_features=train_features, compared=compared, generated_all=generated,
                        kid_subset=kid_subset, kid_std_meaningful=kid_std_meaningful, is_splits=is_splits,
                        xrv_net=xrv_net, data_dir=data_dir, cache_dir=cache_dir, progress=progress)
    measured = measure(inputs)
    measured.notes = notes + measured.notes  # the stage's own first
    measured.cache_hits = hits + measured.cache_hits
    table = results_frame(measured.rows)
    # Written beside OUT's files first, then moved in together: an earlier run's outputs are
    # replaced, never left beside these (an audit.csv this run did not make is removed).
    with staged_outputs(out, EVAL_OUTPUTS) as staging:
        write_outputs(inputs, measured, table, staging, n)
        figures = draw_figures(inputs, measured, table, staging / FIGURES_DIR)
    return EvalResult(out, table, measured.tables.get("audit", pd.DataFrame()), adherence_of(measured),
                      diversity_of(measured), net.name, measured.notes, measured.cache_hits, figures)


def read_generated_sets(cfg: EvalConfig, folders: list[tuple[str, Path]]) -> list[ImageSet]:
    """Each sample folder's readable images (each set counts its unreadable ones)."""
    generated = [generated_set(name, path, cfg.resolution) for name, path in folders]
    for g in generated:
        if len(g.images) < 2:
            raise CxrError(f"generated set {g.name} has {len(g.images)} readable image(s); at least 2 are needed "
                           "(FID estimates a covariance), and about 2,048 for an unbiased FID")
    return generated


def read_real_sets(cfg: EvalConfig, data_dir: Path, cache_dir: Path) -> tuple[ImageSet, ImageSet | None]:
    """The test split, and the train split when the real floor or the audit needs it."""
    real = real_set(cfg, "test", data_dir, cache_dir, REAL_TEST_SET)
    if len(real.images) < 2:
        raise CxrError(f"the test split of {cfg.pairs} has {len(real.images)} image(s); at least 2 are needed; "
                       "re-run prepare with a larger --test-fraction")
    train = (real_set(cfg, "train", data_dir, cache_dir, "real train")
             if (cfg.real_floor or "audit" in cfg.metrics) else None)
    return real, train


def images_per_set(cfg: EvalConfig, real: ImageSet, train: ImageSet | None,
                   generated: list[ImageSet]) -> tuple[int, list[str]]:
    """One N for every set compared (FID's bias depends on N), and a note when FID is biased at it."""
    n = min([len(real.images)] + [len(g.images) for g in generated] + ([cfg.n] if cfg.n else []))
    if cfg.real_floor and train is not None:
        n = min(n, len(train.images))
    return n, [f"FID with N = {n} < {FID_BIAS_N} images is biased upwards: compare FIDs only at the same N, "
               "and read KID (unbiased) beside it"] if n < FID_BIAS_N else []


def subset_sizes(cfg: EvalConfig, n: int) -> tuple[int, bool, int, list[str]]:
    """KID's subset size, whether KID's std means anything, and IS's number of splits, for N
    images per set; and the notes on what was lowered."""
    notes = []
    kid_subset = min(cfg.kid_subset, n)
    if kid_subset < cfg.kid_subset and "kid" in cfg.metrics:
        notes.append(f"KID subset size lowered from {cfg.kid_subset} to {kid_subset} (the number of images per set)")
    # KID's std is the spread over random subsets: it says something only when the subsets differ.
    # Two subsets of S from N images share S^2/N images on average (all of them when S = N, where
    # the std is ~0 whatever the data), so it is reported only when S <= N / 2.
    kid_std_meaningful = 2 * kid_subset <= n
    if "kid" in cfg.metrics and not kid_std_meaningful:
        notes.append(f"KID has no std: its {kid_subset}-image subsets of {n} images overlap by "
                     f"{kid_subset ** 2 / n:.0f} images on average (the same set when equal), so their spread "
                     f"would not measure the estimate's uncertainty; a std needs --kid-subset at most N/2 = {n // 2}")
    return kid_subset, kid_std_meaningful, max(1, min(cfg.is_splits, n // 2)), notes


def feature_network(cfg: EvalConfig, feature_net: nn.Module | None) -> tuple[nn.Module, str]:
    """The network (the given one, else the config's) on the device the evaluation runs on."""
    net = feature_net or load_feature_net(cfg)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        from ..core.gpu import check_cuda

        check_cuda("the evaluation")
    net.to(device)
    return net, device


def xrv_network(cfg: EvalConfig, device: str) -> tuple[nn.Module | None, list[str]]:
    """The XRV DenseNet when a metric the config names uses it (the domain FID; adherence with the
    xrv scorer), with a note when it cannot be had."""
    purposes = [what for what, wanted in (("FID", "xrv" in cfg.metrics), ("prompt adherence", (
        "adherence" in cfg.metrics and cfg.adherence_scorer == "xrv"))) if wanted]
    return load_xrv(cfg, device, " and ".join(purposes)) if purposes else (None, [])


def embed_sets(cfg: EvalConfig, net: nn.Module, real: ImageSet, train: ImageSet | None, generated: list[ImageSet],
               n: int, cache_dir: Path, progress: bool):
    """(test split's pool features, train split's when the audit needs them, the compared sets:
    N of each generated set, then N real train films as the floor, with their features; the
    feature caches read)."""
    # Each real image is embedded once: the whole test split (and the whole train split when the
    # audit needs it); the compared subsets are rows of those features.
    real_features, _, hit = embeddings.cached_embed(net, real, cache_dir, cfg.batch_size, progress)
    hits, train_all = [hit], None
    if "audit" in cfg.metrics:
        train_all = embeddings.cached_embed(net, train, cache_dir, cfg.batch_size, progress)
        hits.append(train_all[2])
    compared = []
    for g in generated:
        subset = take(g, pick(len(g.images), n, cfg.seed))
        compared.append(Embedded(subset, *embeddings.embed(net, subset.images, cfg.batch_size,
                                                           f"features: {subset.name}", progress)))
    if cfg.real_floor and train is not None:
        floor_idx = pick(len(train.images), n, cfg.seed + 1)
        floor = take(train, floor_idx, "real train (floor)")
        if train_all is not None:
            f_pool, f_logits = train_all[0][floor_idx], train_all[1][floor_idx]
        else:
            f_pool, f_logits, hit = embeddings.cached_embed(net, floor, cache_dir, cfg.batch_size, progress)
            hits.append(hit)
        compared.append(Embedded(floor, f_pool, f_logits))
    return real_features, (train_all[0] if train_all is not None else None), compared, [h for h in hits if h]


def results_frame(rows: list[dict]) -> pd.DataFrame:
    """The metrics' rows as the results table; keys a row leaves out (std, interval, n_real) are blank."""
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    table["n_real"] = table["n_real"].astype("Int64")  # blank where no real set, never "24.0"
    return table


def adherence_of(measured: Measurements) -> pd.DataFrame:
    """The adherence table; with its columns and no rows when adherence was not measured."""
    return measured.tables.get("adherence", pd.DataFrame(columns=adh.ADHERENCE_COLUMNS))


def diversity_of(measured: Measurements) -> pd.DataFrame:
    """The diversity table; with its columns and no rows when no set had a prompt twice."""
    return measured.tables.get("diversity", pd.DataFrame(columns=DIVERSITY_COLUMNS))


def write_outputs(inputs: EvalInputs, measured: Measurements, table: pd.DataFrame, out: Path, n: int) -> None:
    """metrics.csv and metrics.json (with the notes, the config and the library versions), and the per-image tables."""
    baseline = measured.audit_baseline
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / METRICS_CSV, table)
    write_json(out / METRICS_JSON, {
        "metrics": table.astype(object).where(table.notna(), None).to_dict("records"), "n_per_set": n,
        "notes": measured.notes, "feature_network": inputs.net.name, "kid_subset": inputs.kid_subset,
        "is_splits": inputs.is_splits,
        "unreadable": {one.images.name: one.images.unreadable for one in inputs.generated},
        "audit_baseline": asdict(baseline) if baseline else None,
        "config": config_to_dict(inputs.cfg), "versions": library_versions()})
    audit = measured.tables.get("audit", pd.DataFrame())
    if len(audit):
        write_csv(out / AUDIT_CSV, audit.drop(columns=["train_index", "test_index"]))
    write_csv(out / DIVERSITY_CSV, diversity_of(measured))
    if "adherence" in inputs.cfg.metrics:
        write_csv(out / ADHERENCE_CSV, adherence_of(measured))


def draw_figures(inputs: EvalInputs, measured: Measurements, table: pd.DataFrame, folder: Path) -> dict:
    """The metrics with their intervals, and the audit's, adherence's and diversity's figures when they have rows."""
    from . import result_figures as draw

    figures = {"metrics": draw.metric_intervals(table, save_to=folder / "metrics.png")}
    audit = measured.tables.get("audit", pd.DataFrame())
    if len(audit):
        figures["nearest_pairs"] = draw.nearest_pairs(
            audit, {one.images.name: one.images for one in inputs.generated}, inputs.train, inputs.real,
            measured.audit_baseline, save_to=folder / "nearest_pairs.png")
    if len(adherence_of(measured)):
        figures["adherence"] = draw.adherence_bars(adherence_of(measured), save_to=folder / "adherence.png")
    if len(diversity_of(measured)):
        figures["diversity"] = draw.diversity_per_prompt(diversity_of(measured), save_to=folder / "diversity.png")
    return figures


def results_table(table: pd.DataFrame) -> pd.DataFrame:
    """One row per set, one column per metric in reading order (FID first, the audit last), each
    headed with its name and which way is better ("FID ↓"); cells are "value [low, high]",
    "value ± std" or "value", and "–" where a set has no value (the real floor has no diversity)."""
    from ..figures.style import MISSING
    from .registry import metric_label, metric_order

    def cell(row):
        if pd.notna(row["ci_low"]):
            return f"{row['value']:.4g} [{row['ci_low']:.4g}, {row['ci_high']:.4g}]"
        if pd.notna(row["std"]):
            return f"{row['value']:.4g} ± {row['std']:.2g}"
        return f"{row['value']:.4g}"
    table = table[~table["metric"].str.startswith("auroc_")]  # per finding: adherence_table
    wide = table.assign(cell=table.apply(cell, axis=1)).pivot(index="set", columns="metric", values="cell")
    wide = wide[metric_order(table["metric"])]
    counts = table.groupby("set")["n_generated"].max().rename("N").astype("Int64").astype(str).replace("<NA>", MISSING)
    wide = wide.join(counts).reindex(list(dict.fromkeys(table["set"])))
    wide = wide.rename(columns={m: metric_label(m) for m in wide.columns if m != "N"})
    wide.columns.name = None
    return wide.fillna(MISSING)


def adherence_table(adherence: pd.DataFrame) -> pd.DataFrame:
    """One row per finding and prompt group (all, seen, unseen), one column per set:
    "AUROC [low, high] (positives+/negatives-)"."""
    from ..figures.style import MISSING

    if not len(adherence):
        return pd.DataFrame()
    cell = adherence.apply(lambda r: f"{r['auroc']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}] "
                                     f"({r['positives']}+/{r['negatives']}-)", axis=1)
    wide = adherence.assign(cell=cell).pivot(index=["finding", "prompts"], columns="set", values="cell")
    order = [group for group in adh.PROMPT_GROUPS if group in set(adherence["prompts"])]
    wide = wide.reindex(pd.MultiIndex.from_product([list(dict.fromkeys(adherence["finding"])), order],
                                                   names=["finding", "prompts"]))
    return wide[list(dict.fromkeys(adherence["set"]))].dropna(how="all").fillna(MISSING)
