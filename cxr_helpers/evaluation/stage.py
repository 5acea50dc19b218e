"""The evaluation stage: FID, KID and IS from one feature pass, a memorisation audit with a
real baseline, and prompt adherence.

Real images are the test split, prepared as for training; generated images come from sample
directories (`image_sets`). Every image goes through the feature network once (`features`); its
pool features feed FID, KID, precision/recall/density/coverage and the memorisation audit, and
its logits feed IS. Each metric the config names is computed by the entry of that name in
`metric_table.METRICS` (the arithmetic is in `metrics`, the audit in `memorisation`, prompt
adherence in `adherence`). Real-image features are cached on disk, keyed by the image list and
the network, so re-evaluating embeds only the generated images.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from . import adherence as adh
from . import image_sets
from ..config.stages import EvalConfig, config_to_dict
from ..core.environment import cache_root, library_versions
from ..core.errors import CxrError
from .features import STANDIN_NAME, StandInFeatures, load_feature_net
from .image_sets import REAL_TEST_SET, ImageSet, generated_set, parse_generated, pick, real_set, take
from ..core.files import write_csv, write_json
from .metric_table import DIVERSITY_COLUMNS, METRICS, Embedded, EvalRun, metric_rows

FID_BIAS_N = 2048
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

    cfg = checked_config(cfg)
    folders = parse_generated(cfg.generated)
    data_dir = resolve_data_dir(cfg.data_dir)
    out = Path(cfg.out)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else cache_root(out)  # on Kaggle: outside the output
    notes: list[str] = []
    generated = read_generated_sets(cfg, folders, notes)
    real, train = read_real_sets(cfg, data_dir, cache_dir)
    n = images_per_set(cfg, real, train, generated, notes)
    kid_subset, kid_std_meaningful, is_splits = subset_sizes(cfg, n, notes)
    net, device = feature_network(cfg, feature_net, notes)
    hits: list[str] = []
    real_idx = pick(len(real.images), n, cfg.seed)
    real_features, train_features, compared = embed_sets(cfg, net, real, train, generated, n, cache_dir, progress, hits)
    run = EvalRun(cfg=cfg, net=net, device=device, real=real, real_features=real_features,
                  real_n=take(real, real_idx), real_pool=real_features[real_idx], train=train,
                  train_features=train_features, compared=compared, n_generated=len(generated), generated_all=generated,
                  kid_subset=kid_subset, kid_std_meaningful=kid_std_meaningful, is_splits=is_splits,
                  data_dir=data_dir, cache_dir=cache_dir, notes=notes, cache_hits=hits, progress=progress)
    table = results_frame(metric_rows(run))
    write_outputs(run, table, out, n)
    return EvalResult(out, table, run.tables.get("audit", pd.DataFrame()), adherence_of(run),
                      run.tables.get("diversity", pd.DataFrame(columns=DIVERSITY_COLUMNS)), net.name, notes, hits,
                      draw_figures(run, table, out / "figures"))


def checked_config(cfg: EvalConfig) -> EvalConfig:
    """The config with its metrics split ("fid,kid" and "fid kid" alike: the CLI takes a list; users
    also write it comma-separated), refused in one sentence when a name or number cannot work."""
    cfg = replace(cfg, metrics=tuple(m.strip() for item in cfg.metrics for m in item.split(",") if m.strip()))
    unknown = sorted(set(cfg.metrics) - set(METRICS))
    if unknown:
        raise CxrError(f"--metrics {', '.join(unknown)} not known; choose from {', '.join(METRICS)}")
    if "adherence" in cfg.metrics and cfg.adherence_scorer not in adh.SCORERS:
        raise CxrError(f"--adherence-scorer {cfg.adherence_scorer!r} is not known; use "
                       f"{' or '.join(adh.SCORERS)} (geometry: the synthetic films' oracle, for offline runs)")
    if cfg.n is not None and cfg.n < 2:
        raise CxrError(f"--n must be at least 2 (FID needs two images per set to estimate a covariance), got {cfg.n}")
    return cfg


def read_generated_sets(cfg: EvalConfig, folders: list[tuple[str, Path]], notes: list[str]) -> list[ImageSet]:
    """Each sample folder's readable images; a note counts the unreadable ones."""
    generated = [generated_set(name, path, cfg.resolution) for name, path in folders]
    for g in generated:
        if g.unreadable:
            notes.append(f"{g.name}: {g.unreadable} unreadable image(s) skipped")
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
    train = real_set(cfg, "train", data_dir, cache_dir, "real train") if (cfg.real_floor or "audit" in cfg.metrics) else None
    return real, train


def images_per_set(cfg: EvalConfig, real: ImageSet, train: ImageSet | None, generated: list[ImageSet],
                   notes: list[str]) -> int:
    """One N for every set compared (FID's bias depends on N)."""
    n = min([len(real.images)] + [len(g.images) for g in generated] + ([cfg.n] if cfg.n else []))
    if cfg.real_floor and train is not None:
        n = min(n, len(train.images))
    if n < FID_BIAS_N:
        notes.append(f"FID with N = {n} < {FID_BIAS_N} images is biased upwards: compare FIDs only at the same N, "
                     "and read KID (unbiased) beside it")
    return n


def subset_sizes(cfg: EvalConfig, n: int, notes: list[str]) -> tuple[int, bool, int]:
    """KID's subset size, whether KID's std means anything, and IS's number of splits, for N images per set."""
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
    return kid_subset, kid_std_meaningful, max(1, min(cfg.is_splits, n // 2))


def feature_network(cfg: EvalConfig, feature_net: nn.Module | None, notes: list[str]) -> tuple[nn.Module, str]:
    """The network (the given one, else the config's) on the device the evaluation runs on."""
    net = feature_net or load_feature_net(cfg)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        from ..core.gpu import check_cuda

        check_cuda("the evaluation")
    net.to(device)
    if isinstance(net, StandInFeatures):
        notes.append(f"features: {STANDIN_NAME}")
    return net, device


def embed_sets(cfg: EvalConfig, net: nn.Module, real: ImageSet, train: ImageSet | None, generated: list[ImageSet],
               n: int, cache_dir: Path, progress: bool, hits: list[str]):
    """(test split's pool features, train split's when the audit needs them, the compared sets:
    N of each generated set, then N real train films as the floor, with their features)."""
    # Each real image is embedded once: the whole test split (and the whole train split when the
    # audit needs it); the compared subsets are rows of those features.
    real_features, _ = image_sets.cached_embed(net, real, cache_dir, cfg.batch_size, progress, hits)
    train_all = (image_sets.cached_embed(net, train, cache_dir, cfg.batch_size, progress, hits)
                 if "audit" in cfg.metrics else None)
    compared = []
    for g in generated:
        subset = take(g, pick(len(g.images), n, cfg.seed))
        compared.append(Embedded(subset, *image_sets.embed(net, subset.images, cfg.batch_size,
                                                           f"features: {subset.name}", progress)))
    if cfg.real_floor and train is not None:
        floor_idx = pick(len(train.images), n, cfg.seed + 1)
        floor = take(train, floor_idx, "real train (floor)")
        f_pool, f_logits = ((train_all[0][floor_idx], train_all[1][floor_idx]) if train_all is not None
                            else image_sets.cached_embed(net, floor, cache_dir, cfg.batch_size, progress, hits))
        compared.append(Embedded(floor, f_pool, f_logits))
    return real_features, (train_all[0] if train_all is not None else None), compared


def results_frame(rows: list[dict]) -> pd.DataFrame:
    """The metrics' rows as the results table; keys a row leaves out (std, interval, n_real) are blank."""
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    table["n_real"] = table["n_real"].astype("Int64")  # blank where no real set, never "24.0"
    return table


def adherence_of(run: EvalRun) -> pd.DataFrame:
    """The adherence table; with its columns and no rows when adherence was not measured."""
    return run.tables.get("adherence", pd.DataFrame(columns=adh.ADHERENCE_COLUMNS))


def write_outputs(run: EvalRun, table: pd.DataFrame, out: Path, n: int) -> None:
    """metrics.csv and metrics.json (with the notes, the config and the library versions), and the per-image tables."""
    generated = [one.images for one in run.generated]
    baseline = run.audit_baseline
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "metrics.csv", table)
    write_json(out / "metrics.json", {
        "metrics": table.astype(object).where(table.notna(), None).to_dict("records"), "n_per_set": n,
        "notes": run.notes, "feature_network": run.net.name, "kid_subset": run.kid_subset,
        "is_splits": run.is_splits, "unreadable": {g.name: g.unreadable for g in generated},
        "audit_baseline": asdict(baseline) if baseline else None,
        "config": config_to_dict(run.cfg), "versions": library_versions()})
    audit = run.tables.get("audit", pd.DataFrame())
    if len(audit):
        write_csv(out / "audit.csv", audit.drop(columns=["train_index", "test_index"]))
    write_csv(out / "diversity.csv", run.tables.get("diversity", pd.DataFrame(columns=DIVERSITY_COLUMNS)))
    if "adherence" in run.cfg.metrics:
        write_csv(out / "adherence.csv", adherence_of(run))


def draw_figures(run: EvalRun, table: pd.DataFrame, folder: Path) -> dict:
    """The metrics with their intervals, and the audit's, adherence's and diversity's figures when they have rows."""
    from ..figures import plots

    figures = {"metrics": plots.metric_intervals(table, save_to=folder / "metrics.png")}
    audit = run.tables.get("audit", pd.DataFrame())
    if len(audit):
        figures["nearest_pairs"] = plots.nearest_pairs(audit, {one.images.name: one.images for one in run.generated},
                                                       run.train, run.real, run.audit_baseline,
                                                       save_to=folder / "nearest_pairs.png")
    if len(adherence_of(run)):
        figures["adherence"] = plots.adherence_bars(adherence_of(run), save_to=folder / "adherence.png")
    diversity = run.tables.get("diversity", pd.DataFrame())
    if len(diversity):
        figures["diversity"] = plots.diversity_per_prompt(diversity, save_to=folder / "diversity.png")
    return figures


def results_table(table: pd.DataFrame) -> pd.DataFrame:
    """One row per set, one column per metric in reading order (FID first, the audit last), each
    headed with its name and which way is better ("FID ↓"); cells are "value [low, high]",
    "value ± std" or "value", and "–" where a set has no value (the real floor has no diversity)."""
    from ..figures.style import MISSING, metric_label, metric_order

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
    """One row per finding, one column per set: "AUROC [low, high] (positives+/negatives-)"."""
    if not len(adherence):
        return pd.DataFrame()
    cell = adherence.apply(lambda r: f"{r['auroc']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}] "
                                     f"({r['positives']}+/{r['negatives']}-)", axis=1)
    wide = adherence.assign(cell=cell).pivot(index="finding", columns="set", values="cell")
    return wide[list(dict.fromkeys(adherence["set"]))]
