"""LOLA-DiCE runs and the reference study as points of the run layer (`gmrl.runs`).

A point is {"study": "lola", "variant": NAME, "config": LolaConfig fields ("exact" for a batch
size of None), "seeds": S, "updates": U, "seed": s}. Its result is the run's summary (curves,
final and mean figures, per-seed means) plus its per-seed, per-update metrics, so that every CSV,
figure and report is written from the store. The training itself is `gmrl.algos.lola.train`
(compiled blocks of updates, vmapped over seeds); the block length is not part of the point
(the numbers do not depend on it).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gmrl import io
from gmrl.errors import require
from gmrl.stats import mean_ci

PLAYERS = (1, 2)
STATE_NAMES = ("start", "CC", "CD", "DC", "DD")
EARLY_UPDATES = 50
"""Updates averaged for the early-correlation figure (all variants start from the same policies)."""
Z95 = 1.959963984540054


def parse_source(text: str | None, option: str) -> int | None:
    """'exact' -> None (closed form); a positive integer -> that many episodes."""
    if text is None or str(text).strip().lower() == "exact":
        return None
    try:
        size = int(text)
    except ValueError:
        size = 0
    require(size >= 1, f"{option} must be 'exact' or a positive number of episodes, got {text!r}")
    return size


def config_dict(cfg) -> dict[str, Any]:
    """LolaConfig as JSON data: a batch size of None is written 'exact'."""
    return {k: ("exact" if v is None else v) for k, v in dataclasses.asdict(cfg).items()}


def lola_config(fields: Mapping[str, Any]):
    """The LolaConfig of a point's 'config' field (inverse of `config_dict`), validated."""
    from gmrl.algos import lola

    return lola.LolaConfig(**{k: (None if v == "exact" else v) for k, v in fields.items()}).validate()


def check_run_size(seeds: int, updates: int, chunk: int, min_seeds: int = 1) -> None:
    """Raise InputError unless seeds >= min_seeds, updates >= 1 and chunk >= 1."""
    require(seeds >= min_seeds, f"--seeds must be >= {min_seeds}"
            + (" for confidence intervals" if min_seeds > 1 else "") + f", got {seeds}")
    require(updates >= 1, f"--updates must be >= 1, got {updates}")
    require(chunk >= 1, f"--chunk must be >= 1 (updates per compiled block), got {chunk}")


def run_config(cfg, seeds: int, updates: int, seed: int, variant: str = "custom") -> dict[str, Any]:
    """The point of one LOLA-DiCE run (see the module docstring)."""
    return {"study": "lola", "variant": variant, "config": config_dict(cfg.validate()),
            "seeds": int(seeds), "updates": int(updates), "seed": int(seed)}


def study_points(names: Sequence[str], seeds: int, updates: int, seed: int) -> list[dict[str, Any]]:
    """Points of the reference variants `names` (keys of `gmrl.algos.lola.REFERENCE_VARIANTS`)."""
    from gmrl.algos import lola

    unknown = [n for n in names if n not in lola.REFERENCE_VARIANTS]
    require(not unknown and bool(names), f"unknown variant(s) {', '.join(unknown) or '(none given)'}"
            f"; allowed: {', '.join(lola.REFERENCE_VARIANTS)}")
    return [run_config(lola.LolaConfig(**lola.REFERENCE_VARIANTS[n]), seeds, updates, seed, n)
            for n in names]


# ----------------------------------------------------------------------------------------------
# Computing a point


def _mean_hw(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and 95% half-width over axis 0 (seeds); NaN half-width with a single seed."""
    samples = np.asarray(samples, np.float64)
    if samples.shape[0] < 2:
        return samples.mean(0), np.full(samples.shape[1:], np.nan)
    return mean_ci(samples, axis=0)


def summarize(metrics, corr: np.ndarray) -> dict[str, Any]:
    """Curves (mean and 95% half-width over seeds per update) and final/mean figures."""
    joint = metrics.score.mean(-1)  # [S, U]
    corr_seed_update = np.nanmean(corr, -1)  # both players, [S, U]
    joint_mean, joint_hw = _mean_hw(joint)
    corr_mean, corr_hw = _mean_hw(corr_seed_update)
    final_mean, final_hw = _mean_hw(joint[:, -1])
    avg_corr_mean, avg_corr_hw = _mean_hw(np.nanmean(corr_seed_update, 1))
    players_corr = np.nanmean(corr, 1)  # [S, 2]
    final_coop = metrics.cooperation[:, -1].mean(0)  # [2, 5]
    return {
        "seeds": int(joint.shape[0]),
        "updates": int(joint.shape[1]),
        "final_joint_score": float(final_mean), "final_joint_score_hw": float(final_hw),
        "mean_corr": float(avg_corr_mean), "mean_corr_hw": float(avg_corr_hw),
        "mean_corr_per_player": [float(x) for x in players_corr.mean(0)],
        "final_cooperation": {f"player_{p}": dict(zip(STATE_NAMES, map(float, final_coop[i]),
                                                      strict=True))
                              for i, p in enumerate(PLAYERS)},
        "curves": {"joint_score": joint_mean.tolist(), "joint_score_hw": joint_hw.tolist(),
                   "corr": corr_mean.tolist(), "corr_hw": corr_hw.tolist()},
        "per_seed_mean_corr": np.nanmean(corr_seed_update, 1).tolist(),
        "per_seed_early_corr": np.nanmean(corr_seed_update[:, :EARLY_UPDATES], 1).tolist(),
    }


def per_seed_rows(score: np.ndarray, cooperation: np.ndarray, corr: np.ndarray) -> list[dict]:
    """One row per (seed, update): scores [S, U, 2], gradient correlations [S, U, 2] and
    cooperation probabilities [S, U, 2, 5]."""
    score = np.asarray(score, np.float32)  # float32 as trained (exact through JSON)
    cooperation, corr = np.asarray(cooperation), np.asarray(corr)
    rows = []
    num_seeds, num_updates = score.shape[:2]
    for s in range(num_seeds):
        for u in range(num_updates):
            row: dict[str, Any] = {"seed": s, "update": u,
                                   "joint_score": float(score[s, u].mean())}
            for i, p in enumerate(PLAYERS):
                row[f"score_{p}"] = float(score[s, u, i])
            for i, p in enumerate(PLAYERS):
                row[f"corr_{p}"] = float(corr[s, u, i])
            for i, p in enumerate(PLAYERS):
                for k, name in enumerate(STATE_NAMES):
                    row[f"coop_{p}_{name}"] = float(cooperation[s, u, i, k])
            rows.append(row)
    return rows


def run_point(config: Mapping[str, Any], chunk: int = 50, progress: bool = False,
              per_seed_csv: str | None = None) -> dict[str, Any]:
    """Train the run `config` (a point of this module) and return its result.

    progress: a bar over updates (local runs); per_seed_csv: rewritten after each block, so an
    interrupted run leaves its metrics so far. The result holds the summary (`summarize`), the
    timings and "per_seed": {"score", "cooperation", "corr"} as nested lists [S, U, ...].
    """
    from tqdm.auto import tqdm

    from gmrl.algos import lola

    cfg = lola_config(config["config"])
    bar = tqdm(total=config["updates"], desc=config.get("variant", "lola"), unit="upd",
               leave=False, disable=not progress)

    def on_block(done, metrics):
        bar.update(done - bar.n)
        if per_seed_csv is not None:
            io.atomic_write_csv(per_seed_csv, per_seed_rows(metrics.score, metrics.cooperation,
                                                            lola.correlations(metrics)))

    try:
        result = lola.train(cfg, config["seed"], config["seeds"], config["updates"], chunk,
                            on_block)
    finally:
        bar.close()
    corr = lola.correlations(result.metrics)
    summary = summarize(result.metrics, corr)
    summary.update(config=config["config"], seed=config["seed"],
                   compile_seconds=round(result.compile_seconds, 2),
                   run_seconds=round(result.run_seconds, 2),
                   per_seed={"score": result.metrics.score, "cooperation": result.metrics.cooperation,
                             "corr": corr})
    return io.to_jsonable(summary)


def run(points: Sequence[Mapping[str, Any]], out: Path | None, *, chunk: int = 50,
        backend: str = "local", address: str | None = None, progress: bool = True,
        per_seed_csv: Path | None = None, ray_init_kwargs=None) -> list[dict[str, Any]]:
    """Results of `points` from OUT/results.sqlite, computing the missing ones (`gmrl.runs`)."""
    from gmrl.runs import run_points

    point_fn = functools.partial(run_point, chunk=chunk, progress=progress and backend == "local",
                                 per_seed_csv=None if per_seed_csv is None else str(per_seed_csv))
    return run_points(points, point_fn, out, backend=backend, address=address, progress=progress,
                      description="lola", ray_init_kwargs=ray_init_kwargs)


def describe(summary: Mapping[str, Any]) -> str:
    """One line: final joint score and mean correlation with CIs, timings."""
    return (f"final joint score {summary['final_joint_score']:.3f} ± "
            f"{summary['final_joint_score_hw']:.3f}, mean gradient correlation "
            f"{summary['mean_corr']:.3f} ± {summary['mean_corr_hw']:.3f} "
            f"(95% CI over {summary['seeds']} seeds); {summary['run_seconds']:.1f} s "
            f"+ {summary['compile_seconds']:.1f} s compile")


# ----------------------------------------------------------------------------------------------
# Outputs written from stored results


def curve_rows(variant: str, summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows (variant, update, joint score mean/hw, correlation mean/hw) of one summary."""
    curves = summary["curves"]
    return [{"variant": variant, "update": u, "joint_score": curves["joint_score"][u],
             "joint_score_hw": curves["joint_score_hw"][u], "corr": curves["corr"][u],
             "corr_hw": curves["corr_hw"][u]} for u in range(len(curves["joint_score"]))]


def write_run_files(out: Path, variant: str, result: Mapping[str, Any]) -> list[Path]:
    """OUT/per_seed.csv, curves.csv and summary.json (without the per-seed arrays) of one run."""
    per_seed = result["per_seed"]
    summary = {k: v for k, v in result.items() if k != "per_seed"}
    return [io.atomic_write_csv(out / "per_seed.csv", per_seed_rows(
                per_seed["score"], per_seed["cooperation"], per_seed["corr"])),
            io.atomic_write_csv(out / "curves.csv", curve_rows(variant, summary)),
            io.atomic_write_json(out / "summary.json", summary)]


def _difference(a: Mapping[str, Any], b: Mapping[str, Any],
                field: str = "per_seed_mean_corr") -> tuple[float, float]:
    """Difference of mean correlations (a − b) and a 95% half-width (Welch, normal approx.)."""
    xa, xb = np.asarray(a[field], np.float64), np.asarray(b[field], np.float64)
    se = math.sqrt(xa.var(ddof=1) / len(xa) + xb.var(ddof=1) / len(xb)) if min(
        len(xa), len(xb)) > 1 else float("nan")
    return float(xa.mean() - xb.mean()), Z95 * se


def _verdict(diff: float, hw: float) -> str:
    if diff - hw > 0:
        return "raises"
    if diff + hw < 0:
        return "lowers"
    return "does not significantly change"


def _config_line(summaries: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The settings every variant shares, as stored (what was actually run)."""
    configs = [s.get("config", {}) for s in summaries.values()]
    shared = {k: v for k, v in configs[0].items()
              if k not in ("comp", "hessian", "outer", "comp_off_policy", "hessian_off_policy")
              and all(c.get(k) == v for c in configs)} if configs else {}
    return [f"Settings shared by the variants: {', '.join(f'{k}={v}' for k, v in shared.items())}."]


def write_report(path: Path, summaries: Mapping[str, Mapping[str, Any]], seeds: int,
                 updates: int) -> Path:
    """report.md: a table per variant and the comparisons against inner128-outer128."""
    horizon = next(iter(summaries.values()), {}).get("config", {}).get("horizon", "T")
    lines = [
        "# LOLA-DiCE on the iterated prisoner's dilemma",
        "",
        f"{seeds} seeds × {updates} updates per variant; means ± 95% CI (Student t) over seeds.",
        *_config_line(summaries),
        f"Joint score: mean of both players' expected per-step reward over a {horizon}-step "
        "episode at",
        "the final policies (−1 mutual cooperation, −2 mutual defection). Correlation: Pearson",
        "correlation over the 5 coordinates between each player's estimated and exact LOLA",
        "meta-gradient, averaged over players and updates.",
        "",
        f"The early column averages the first {EARLY_UPDATES} updates only: every variant starts",
        "from the same policies, so it compares the estimators on (nearly) the same parameters;",
        "the all-updates mean is measured along each variant's own trajectory and so also",
        "reflects where that variant's learning went.",
        "",
        "| variant | final joint score | mean gradient correlation | early correlation "
        "| seconds (+compile) |",
        "|---|---|---|---|---|",
    ]
    for name, s in summaries.items():
        early, early_hw = _mean_hw(np.asarray(s.get("per_seed_early_corr", [np.nan])))
        lines.append(f"| {name} | {s['final_joint_score']:.3f} ± {s['final_joint_score_hw']:.3f}"
                     f" | {s['mean_corr']:.3f} ± {s['mean_corr_hw']:.3f} | {early:.3f} ± "
                     f"{early_hw:.3f} | {s['run_seconds']:.1f} (+{s['compile_seconds']:.1f}) |")
    base = summaries.get("inner128-outer128")
    comparisons = [("off-policy", "off-policy correction (both parts from the replay)"),
                   ("off-comp-on-hess", "off-policy compositional part only"),
                   ("on-comp-off-hess", "off-policy Hessian part only"),
                   ("comp1024-hess128", "a larger compositional batch (1024)"),
                   ("comp128-hess1024", "a larger Hessian batch (1024)"),
                   ("inner1024", "a larger batch for both parts (1024)")]
    if base is not None:
        lines += ["", "## Against the 128/128 baseline", "",
                  f"Baseline inner128-outer128: mean correlation {base['mean_corr']:.3f} ± "
                  f"{base['mean_corr_hw']:.3f}.", ""]
        for name, what in comparisons:
            if name in summaries:
                diff, hw = _difference(summaries[name], base)
                line = (f"- {what} ({name}) {_verdict(diff, hw)} the gradient correlation: "
                        f"{summaries[name]['mean_corr']:.3f} vs {base['mean_corr']:.3f}, "
                        f"difference {diff:+.3f} ± {hw:.3f}")
                if "per_seed_early_corr" in summaries[name] and "per_seed_early_corr" in base:
                    diff, hw = _difference(summaries[name], base, "per_seed_early_corr")
                    line += (f"; over the first {EARLY_UPDATES} updates it {_verdict(diff, hw)} "
                             f"it ({diff:+.3f} ± {hw:.3f})")
                lines.append(line + ".")
    return io.atomic_write_text(path, "\n".join(lines) + "\n")


def _smooth(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (shorter windows at the start). Same shape."""
    sums = np.cumsum(np.concatenate([[0.0], x]))
    counts = np.minimum(np.arange(1, len(x) + 1), window)
    return (sums[1:] - sums[np.arange(1, len(x) + 1) - counts]) / counts


def plot_curves(folder: Path, summaries: Mapping[str, Mapping[str, Any]]) -> list[Path]:
    """joint_score.png and correlation.png: mean ± 95% CI over seeds, one line per variant.

    Curves are smoothed by a trailing moving average over updates/20 updates (title says so);
    the CSV holds the raw per-update values. Drawn on a `matplotlib.figure.Figure` (the caller's
    backend is untouched) and written atomically.
    """
    import matplotlib
    from matplotlib.figure import Figure

    colours = matplotlib.colormaps["tab20"].colors
    written = []
    for key, ylabel, filename in (("joint_score", "joint score (avg reward per step)",
                                   "joint_score.png"),
                                  ("corr", "corr(estimated, exact LOLA gradient)",
                                   "correlation.png")):
        fig = Figure(figsize=(8, 5))
        ax = fig.subplots()
        window = 1
        for i, (name, s) in enumerate(summaries.items()):
            mean = np.asarray(s["curves"][key], np.float64)
            hw = np.nan_to_num(np.asarray(s["curves"][f"{key}_hw"], np.float64))
            window = max(1, len(mean) // 20)
            mean, hw = _smooth(mean, window), _smooth(hw, window)
            x = np.arange(len(mean))
            colour = colours[(2 * i) % 20 if i < 10 else 2 * (i - 10) + 1]
            ax.plot(x, mean, label=name, lw=1.2, color=colour)
            ax.fill_between(x, mean - hw, mean + hw, alpha=0.12, color=colour)
        ax.set_xlabel("update")
        ax.set_ylabel(ylabel)
        ax.set_title(f"mean ± 95% CI over seeds, moving average over {window} updates",
                     fontsize=9)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        written.append(io.atomic_savefig(fig, folder / filename, dpi=120))
    return written


def write_study(out: Path, points: Sequence[Mapping[str, Any]],
                results: Sequence[Mapping[str, Any]]) -> list[Path]:
    """Per-variant CSVs (runs/NAME.csv), curves.csv, the two figures and report.md of a study."""
    summaries = {p["variant"]: {k: v for k, v in r.items() if k != "per_seed"}
                 for p, r in zip(points, results, strict=True)}
    written = []
    for point, result in zip(points, results, strict=True):
        per_seed = result["per_seed"]
        written.append(io.atomic_write_csv(out / "runs" / f"{point['variant']}.csv", per_seed_rows(
            per_seed["score"], per_seed["cooperation"], per_seed["corr"])))
    rows = [row for name, s in summaries.items() for row in curve_rows(name, s)]
    written.append(io.atomic_write_csv(out / "curves.csv", rows))
    written += plot_curves(out, summaries)
    first = points[0]
    written.append(write_report(out / "report.md", summaries, first["seeds"], first["updates"]))
    return written
