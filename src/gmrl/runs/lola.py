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
from gmrl.stats import verdict as stats_verdict

PLAYERS = (1, 2)
STATE_NAMES = ("start", "CC", "CD", "DC", "DD")
EARLY_UPDATES = 50
"""Updates averaged for the early-correlation figure (all variants start from the same policies)."""


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


SOURCES = ("comp", "hessian", "outer")


CONTROL_DEFAULTS = {"replay_weights": True, "independent_inner": False}
"""The control switches, left out of a point's config at these defaults: the points (and store
keys) of the reference variants are those they had before the switches existed."""


def config_dict(cfg) -> dict[str, Any]:
    """LolaConfig as JSON data: a batch size (comp, hessian, outer) of None is written 'exact';
    the control switches at their defaults are left out (`CONTROL_DEFAULTS`)."""
    return {k: ("exact" if k in SOURCES and v is None else v)
            for k, v in dataclasses.asdict(cfg).items()
            if not (k in CONTROL_DEFAULTS and v == CONTROL_DEFAULTS[k])}


def lola_config(fields: Mapping[str, Any]):
    """The LolaConfig of a point's 'config' field (inverse of `config_dict`), validated."""
    from gmrl.algos import lola

    return lola.LolaConfig(**{k: (None if k in SOURCES and v == "exact" else v)
                              for k, v in fields.items()}).validate()


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


def study_points(names: Sequence[str], seeds: int, updates: int, seed: int,
                 baseline: str = "return") -> list[dict[str, Any]]:
    """Points of the study variants `names` (keys of `gmrl.algos.lola.STUDY_VARIANTS`)."""
    from gmrl.algos import lola

    unknown = [n for n in names if n not in lola.STUDY_VARIANTS]
    require(not unknown and bool(names), f"unknown variant(s) {', '.join(unknown) or '(none given)'}"
            f"; allowed: {', '.join(lola.STUDY_VARIANTS)}")
    return [run_config(lola.LolaConfig(**lola.STUDY_VARIANTS[n], baseline=baseline), seeds,
                       updates, seed, n) for n in names]


# ----------------------------------------------------------------------------------------------
# Computing a point

FINAL_FRACTION = 0.1
"""The final joint score averages the last 10% of updates of each seed."""
MUTUAL_COOPERATION = -1.1
"""A seed ends in mutual cooperation when its final joint score is ≥ −1.1: within a tenth of the
way from mutual cooperation (−1) to mutual defection (−2)."""


def final_window(updates: int) -> int:
    """Number of last updates the final joint score averages (at least 1)."""
    return max(1, math.ceil(FINAL_FRACTION * updates))


def _mean_hw(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and 95% half-width over axis 0 (seeds); NaN half-width with a single seed."""
    samples = np.asarray(samples, np.float64)
    if samples.shape[0] < 2:
        return samples.mean(0), np.full(samples.shape[1:], np.nan)
    return mean_ci(samples, axis=0)


def _nanmean(x: np.ndarray, axis=None) -> np.ndarray:
    """Mean ignoring NaN, NaN (without a warning) where everything is NaN."""
    x = np.asarray(x, np.float64)
    count = np.sum(~np.isnan(x), axis=axis)
    total = np.nansum(x, axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def summarize(metrics, corr: np.ndarray) -> dict[str, Any]:
    """Final and mean figures with 95% CIs over seeds, and raw per-update curves.

    metrics: `gmrl.algos.lola.UpdateMetrics` with leaves [S, U, ...]; corr [S, U, 2].
    """
    joint = np.asarray(metrics.score, np.float64).mean(-1)  # [S, U]
    num_seeds, num_updates = joint.shape
    window = final_window(num_updates)
    final = joint[:, -window:].mean(1)  # [S]
    corr_seed_update = _nanmean(corr, -1)  # both players, [S, U]
    per_seed_corr = _nanmean(corr_seed_update, 1)
    final_mean, final_hw = _mean_hw(final)
    corr_mean, corr_hw = _mean_hw(per_seed_corr)
    ess = _nanmean(np.asarray(metrics.ess), -1)  # [S, U]
    log_w = np.max(np.asarray(metrics.max_log_weight, np.float64), -1)  # NaN on-policy  [S, U]
    after_first = slice(window, None) if num_updates > window else slice(None)
    final_coop = np.asarray(metrics.cooperation)[:, -1].mean(0)  # [2, 5]
    joint_mean, joint_hw = _mean_hw(joint)
    curve_mean, curve_hw = _mean_hw(corr_seed_update)
    return {
        "seeds": int(num_seeds),
        "updates": int(num_updates),
        "final_window": int(window),
        "final_joint_score": float(final_mean), "final_joint_score_hw": float(final_hw),
        "mutual_cooperation": float(np.mean(final >= MUTUAL_COOPERATION)),
        "mean_corr": float(corr_mean), "mean_corr_hw": float(corr_hw),
        "mean_corr_per_player": [float(x) for x in _nanmean(_nanmean(corr, 1), 0)],
        "replay_ess": float(_nanmean(ess[:, after_first])),
        "replay_ess_first_update": float(_nanmean(ess[:, 0])),
        "replay_max_log_weight": float(_nanmean(log_w[:, after_first])),
        "final_cooperation": {f"player_{p}": dict(zip(STATE_NAMES, map(float, final_coop[i]),
                                                      strict=True))
                              for i, p in enumerate(PLAYERS)},
        "curves": {"joint_score": joint_mean.tolist(), "joint_score_hw": joint_hw.tolist(),
                   "corr": curve_mean.tolist(), "corr_hw": curve_hw.tolist(),
                   "replay_ess": _nanmean(ess, 0).tolist()},
        "per_seed_final_joint_score": final.tolist(),
        "per_seed_mean_corr": per_seed_corr.tolist(),
        "per_seed_early_corr": _nanmean(corr_seed_update[:, :EARLY_UPDATES], 1).tolist(),
    }


def per_seed_rows(per_seed: Mapping[str, Any]) -> list[dict]:
    """One row per (seed, update) from the per-seed arrays of a result: scores [S, U, 2],
    gradient correlations [S, U, 2], replay ESS and max log-weight [S, U, 2] (NaN on-policy)
    and cooperation probabilities [S, U, 2, 5]."""
    score = np.asarray(per_seed["score"], np.float32)  # float32 as trained (exact through JSON)
    cooperation, corr = np.asarray(per_seed["cooperation"]), np.asarray(per_seed["corr"])
    ess = np.asarray(per_seed.get("ess", np.full(score.shape, np.nan)), np.float64)
    log_w = np.asarray(per_seed.get("max_log_weight", np.full(score.shape, np.nan)), np.float64)
    rows = []
    num_seeds, num_updates = score.shape[:2]
    for s in range(num_seeds):
        for u in range(num_updates):
            row: dict[str, Any] = {"seed": s, "update": u,
                                   "joint_score": float(score[s, u].mean())}
            for name, values in (("score", score), ("corr", corr), ("ess", ess),
                                 ("max_log_weight", log_w)):
                for i, p in enumerate(PLAYERS):
                    row[f"{name}_{p}"] = float(values[s, u, i])
            for i, p in enumerate(PLAYERS):
                for k, name in enumerate(STATE_NAMES):
                    row[f"coop_{p}_{name}"] = float(cooperation[s, u, i, k])
            rows.append(row)
    return rows


def _per_seed(metrics, corr: np.ndarray) -> dict[str, Any]:
    return {"score": metrics.score, "cooperation": metrics.cooperation, "corr": corr,
            "ess": metrics.ess, "max_log_weight": metrics.max_log_weight}


def run_point(config: Mapping[str, Any], chunk: int = 50, progress: bool = False,
              per_seed_csv: str | None = None) -> dict[str, Any]:
    """Train the run `config` (a point of this module) and return its result.

    progress: a bar over updates (local runs); per_seed_csv: rewritten after each block, so an
    interrupted run leaves its metrics so far. The result holds the summary (`summarize`), the
    timings and "per_seed" (`per_seed_rows`' arrays as nested lists [S, U, ...]).
    """
    from tqdm.auto import tqdm

    from gmrl.algos import lola

    cfg = lola_config(config["config"])
    bar = tqdm(total=config["updates"], desc=config.get("variant", "lola"), unit="upd",
               leave=False, disable=not progress)

    def on_block(done, metrics):
        bar.update(done - bar.n)
        if per_seed_csv is not None:
            io.atomic_write_csv(per_seed_csv, per_seed_rows(
                _per_seed(metrics, lola.correlations(metrics))))

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
                   per_seed=_per_seed(result.metrics, corr))
    return io.to_jsonable(summary)


def run(points: Sequence[Mapping[str, Any]], out: Path | None, *, chunk: int = 50,
        backend: str = "local", address: str | None = None, progress: bool = True,
        per_seed_csv: Path | None = None, ray_init_kwargs=None) -> list[dict[str, Any]]:
    """Results of `points` from OUT/results.sqlite, computing the missing ones (`gmrl.runs`).

    Locally, the missing points' programs are compiled first, two at a time (one per core),
    before any of them trains (`gmrl.algos.lola.compile_programs`).
    """
    from gmrl.runs import run_points

    if backend == "local":
        _precompile(points, out, chunk)
    point_fn = functools.partial(run_point, chunk=chunk, progress=progress and backend == "local",
                                 per_seed_csv=None if per_seed_csv is None else str(per_seed_csv))
    return run_points(points, point_fn, out, backend=backend, address=address, progress=progress,
                      description="lola", ray_init_kwargs=ray_init_kwargs)


def _precompile(points: Sequence[Mapping[str, Any]], out: Path | None, chunk: int) -> None:
    """Compile the programs of the points not yet in OUT/results.sqlite, in parallel."""
    from gmrl.algos import lola
    from gmrl.runs import STORE_NAME
    from gmrl.store import ResultStore, config_key

    done: set[str] = set()
    if out is not None and (out / STORE_NAME).exists():
        with ResultStore(out / STORE_NAME) as store:
            done = store.done_keys()
    by_size: dict[tuple[int, int], list] = {}
    for p in points:
        if config_key(p) not in done:
            by_size.setdefault((min(chunk, p["updates"]), p["seeds"]), []).append(
                lola_config(p["config"]))
    for (length, seeds), cfgs in by_size.items():
        lola.compile_programs(cfgs, length, seeds)


def describe(summary: Mapping[str, Any]) -> str:
    """One line: final joint score and mean correlation with CIs, timings."""
    ess = summary.get("replay_ess", float("nan"))
    replay = "" if not np.isfinite(ess) else f", replay ESS {ess:.0f} episodes"
    return (f"final joint score {summary['final_joint_score']:.3f} ± "
            f"{summary['final_joint_score_hw']:.3f} (last {summary['final_window']} updates), "
            f"mean gradient correlation {summary['mean_corr']:.3f} ± "
            f"{summary['mean_corr_hw']:.3f} (95% CI over {summary['seeds']} seeds){replay}; "
            f"{summary['run_seconds']:.1f} s + {summary['compile_seconds']:.1f} s compile")


ERROR_AT = (0, 25, 100)
"""The fixed points of the gradient-error measurement: updates of the exact LOLA run."""


def error_points(names: Sequence[str], draws: int, seed: int, baseline: str = "return",
                 at: Sequence[int] = ERROR_AT) -> list[dict[str, Any]]:
    """Points of the gradient-error measurement (`gmrl.algos.lola.gradient_error`) of the study
    variants `names`."""
    require(draws >= 3, f"--error-draws must be >= 3 (bias² needs 3) or 0 (none), got {draws}")
    return [{**p, "study": "lola-gradient-error", "draws": int(draws), "at": [int(a) for a in at],
             "seeds": None, "updates": None}
            for p in study_points(names, 2, 1, seed, baseline)]


def gradient_error_point(config: Mapping[str, Any]) -> dict[str, Any]:
    """Compute a gradient-error point: `gmrl.algos.lola.error_summary` with draws and seconds."""
    import time

    from gmrl.algos import lola

    started = time.perf_counter()
    error = lola.gradient_error(lola_config(config["config"]), config["at"], config["draws"],
                                config["seed"])
    summary = lola.error_summary(error)
    summary.update(draws=config["draws"], seconds=round(time.perf_counter() - started, 2))
    return io.to_jsonable(summary)


def run_errors(points: Sequence[Mapping[str, Any]], out: Path | None, *, backend: str = "local",
               address: str | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Results of the gradient-error `points` from OUT/results.sqlite, computing the missing."""
    from gmrl.runs import run_points

    return run_points(points, gradient_error_point, out, backend=backend, address=address,
                      progress=progress, description="lola gradient error")


# ----------------------------------------------------------------------------------------------
# Outputs written from stored results

BASELINE = "inner128-outer128"
EXACT = "inner-exact-outer-exact"
MITIGATIONS = (("off-policy correction (both parts from the persistent replay)", "off-policy"),
               ("the Hessian part with 1024 episodes", "comp128-hess1024"),
               ("the compositional part with 1024 episodes", "comp1024-hess128"),
               ("both parts with 1024 episodes", "inner1024"))
"""The paper's mitigations (Liu, Feng et al. 2022, §6): the variant that applies each one to the
128/128 baseline."""
ON_POLICY_TWIN = "inner1024"
"""The on-policy variant with as many episodes per inner estimate as the replay holds."""


def curve_rows(variant: str, summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows (variant, update, joint score mean/hw, correlation mean/hw, replay ESS) of a summary."""
    curves = summary["curves"]
    ess = curves.get("replay_ess", [float("nan")] * len(curves["joint_score"]))
    return [{"variant": variant, "update": u, "joint_score": curves["joint_score"][u],
             "joint_score_hw": curves["joint_score_hw"][u], "corr": curves["corr"][u],
             "corr_hw": curves["corr_hw"][u], "replay_ess": ess[u]}
            for u in range(len(curves["joint_score"]))]


NULL_REASONS = {
    "replay_ess": "no replay: every part of this variant is on-policy or exact",
    "replay_ess_first_update": "no replay: every part of this variant is on-policy or exact",
    "replay_max_log_weight": "no replay: every part of this variant is on-policy or exact",
    "mean_corr_hw": "one seed: no confidence interval",
    "final_joint_score_hw": "one seed: no confidence interval",
}
"""Why a summary.json field of a LOLA run can be null (NaN in the numbers)."""


def write_run_files(out: Path, variant: str, result: Mapping[str, Any]) -> list[Path]:
    """OUT/per_seed.csv, curves.csv and summary.json (without the per-seed arrays) of one run."""
    summary = {k: v for k, v in result.items() if k != "per_seed"}
    return [io.atomic_write_csv(out / "per_seed.csv", per_seed_rows(result["per_seed"])),
            io.atomic_write_csv(out / "curves.csv", curve_rows(variant, summary)),
            io.atomic_write_json(out / "summary.json", summary, NULL_REASONS)]


def _welch(a: Mapping[str, Any], b: Mapping[str, Any], field: str) -> dict[str, float]:
    from gmrl.stats import welch

    return welch(a[field], b[field])


def final_return_tests(summaries: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Each variant's final joint score against the 128/128 baseline: Welch difference, 95% CI,
    p-value, Holm-adjusted within its family (the reference variants; the controls of
    `gmrl.algos.lola.CONTROL_VARIANTS` are their own family, so adding them leaves the reference
    p-values as they were), and the smallest difference detectable with 80% power at the
    strictest Holm level. {variant: {...}}; empty without the baseline."""
    from gmrl.algos.lola import CONTROL_VARIANTS
    from gmrl.stats import detectable_difference, holm_adjust

    base = summaries.get(BASELINE)
    if base is None:
        return {}
    tests = {}
    for controls in (False, True):
        names = [n for n in summaries if n != BASELINE and (n in CONTROL_VARIANTS) == controls]
        family = {n: _welch(summaries[n], base, "per_seed_final_joint_score") for n in names}
        adjusted = holm_adjust([family[n]["p"] for n in names]) if names else []
        for name, p_holm in zip(names, adjusted, strict=True):
            family[name]["p_holm"] = float(p_holm)
            family[name]["detectable"] = detectable_difference(family[name]["se"], len(names))
        tests.update(family)
    return {n: tests[n] for n in summaries if n in tests}


PERMUTATIONS = 20000
"""Random relabellings of a permutation test (its p-value's Monte Carlo se ≤ 0.0035)."""


def permutation_p(a, b, permutations: int = PERMUTATIONS, seed: int = 0) -> float:
    """Two-sided permutation test of equal means (Fisher 1935; Pitman 1937): the share of
    relabellings of the pooled samples whose |mean difference| is at least the observed one.
    Exact (every relabelling) when there are at most `permutations` of them; otherwise
    `permutations` random ones, p = (1 + count) / (1 + permutations) (Phipson & Smyth 2010)."""
    from itertools import combinations

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    require(a.ndim == b.ndim == 1 and len(a) >= 1 and len(b) >= 1,
            "a permutation test needs two 1-D samples")
    pooled = np.concatenate([a, b])
    n, total = len(a), len(pooled)
    observed = abs(a.mean() - b.mean())
    tolerance = 1e-12 * max(1.0, observed)
    if math.comb(total, n) <= permutations:
        masks = np.zeros((math.comb(total, n), total), bool)
        for row, chosen in enumerate(combinations(range(total), n)):
            masks[row, list(chosen)] = True
        exact = True
    else:
        order = np.argsort(np.random.default_rng(seed).random((permutations, total)), axis=1)
        masks = order < n
        exact = False
    diffs = np.abs((masks * pooled).sum(1) / n - (~masks * pooled).sum(1) / (total - n))
    count = int(np.sum(diffs >= observed - tolerance))
    return count / len(masks) if exact else (1 + count) / (1 + permutations)


CONTRASTS = (
    ("importance weights on the reference replay (128 fresh of 1024)", "off-policy",
     "off-policy-unweighted"),
    ("the reference replay uncorrected against 1024 fresh episodes", "off-policy-unweighted",
     "inner1024"),
    ("importance weights at high staleness (32 fresh of 1024)", "stale32-off-policy",
     "stale32-unweighted"),
    ("the stale replay, corrected, against its 32 fresh episodes alone", "stale32-off-policy",
     "inner32"),
    ("the stale replay, uncorrected, against its 32 fresh episodes alone", "stale32-unweighted",
     "inner32"),
    ("the stale replay, corrected, against 1024 fresh episodes", "stale32-off-policy", "inner1024"),
    ("independent batches for the step's value and Jacobian at 128/128", "inner128-independent",
     BASELINE),
    ("the Hessian part with 1024 episodes, both arms with independent batches",
     "comp128-hess1024", "inner128-independent"),
    ("the compositional part with 1024 episodes, both arms with independent batches",
     "comp1024-hess128", "inner128-independent"),
)
"""The controlled comparisons (claim, variant, control): each isolates one claim of the study."""


def contrast_tests(summaries: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The `CONTRASTS` whose two variants are both present: the final joint score's Welch
    difference (variant − control) and a permutation test, each Holm-adjusted over these
    contrasts, and both arms' mutual-cooperation fractions."""
    from gmrl.stats import detectable_difference, holm_adjust

    rows = []
    for what, name, control in CONTRASTS:
        if name in summaries and control in summaries:
            a, b = summaries[name], summaries[control]
            row = _welch(a, b, "per_seed_final_joint_score")
            row.update(what=what, variant=name, control=control,
                       p_perm=permutation_p(a["per_seed_final_joint_score"],
                                            b["per_seed_final_joint_score"]),
                       coop=a["mutual_cooperation"], coop_control=b["mutual_cooperation"])
            rows.append(row)
    for key in ("p", "p_perm"):
        for row, adjusted in zip(rows, holm_adjust([r[key] for r in rows]) if rows else [],
                                 strict=True):
            row[f"{key}_holm"] = float(adjusted)
    for row in rows:
        row["detectable"] = detectable_difference(row["se"], len(rows))
    return rows


def seeds_to_detect(seeds: int, test: Mapping[str, float]) -> float:
    """Seeds per variant at which `test`'s observed difference equals the detectable one
    (the standard error shrinks as 1/√seeds): seeds · (detectable / |Δ|)²."""
    return seeds * (test["detectable"] / abs(test["diff"])) ** 2


def _verdict(test: Mapping[str, float], alpha: float = 0.05) -> str:
    if test["p_holm"] > alpha:
        return "no significant change"
    return stats_verdict(test["diff"], test["p_holm"], alpha)


def _fmt(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def write_report(path: Path, summaries: Mapping[str, Mapping[str, Any]], seeds: int,
                 updates: int, errors: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """report.md: the final-return table and verdicts, the controlled comparisons, the gradient
    correlations and (with `errors`, {variant: `gradient_error_point` result}) the LOLA
    gradient's bias² and variance at fixed points."""
    first = next(iter(summaries.values()), {})
    horizon = first.get("config", {}).get("horizon", "T")
    window = first.get("final_window", final_window(updates))
    tests = final_return_tests(summaries)
    lines = [
        "# LOLA-DiCE on the iterated prisoner's dilemma",
        "",
        f"{seeds} seeds × {updates} updates per variant; means ± 95% CI (Student t) over seeds.",
        *_config_line(summaries),
        "",
        "## Final return",
        "",
        f"Final joint score: per seed, the mean over its last {window} updates (10%) of both "
        f"players' expected per-step reward over a {horizon}-step episode, computed exactly "
        "from the policies (−1 mutual cooperation, −2 mutual defection). Δ: difference from "
        f"{BASELINE} (Welch), p Holm-corrected over the reference variants compared (the "
        "controls, below the reference variants, are their own Holm family). "
        f"Mutual cooperation: fraction of seeds whose final joint score is ≥ {MUTUAL_COOPERATION}"
        " (within a tenth of the way from mutual cooperation to mutual defection). "
        f"{EXACT} is exact LOLA. Seconds: the run's, and its program's compilation (a study "
        "compiles two programs at a time).",
        "",
        "| variant | final joint score | Δ vs 128/128 | p (Holm) | mutual cooperation "
        "| gradient correlation | replay ESS (of replay size) | seconds (+compile) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summaries.items():
        t = tests.get(name)
        delta = "—" if t is None else f"{t['diff']:+.3f} ± {t['hw']:.3f}"
        p = "—" if t is None else f"{t['p_holm']:.3g}"
        ess = s.get("replay_ess", float("nan"))
        replay = ("—" if not np.isfinite(ess) else
                  f"{ess:.0f} ({s['config'].get('replay_size', '?')})")
        lines.append(
            f"| {name} | {s['final_joint_score']:.3f} ± {_fmt(s['final_joint_score_hw'])} | "
            f"{delta} | {p} | {s['mutual_cooperation']:.0%} | {s['mean_corr']:.3f} ± "
            f"{_fmt(s['mean_corr_hw'])} | {replay} | {s['run_seconds']:.1f} "
            f"(+{s['compile_seconds']:.1f}) |")
    if tests:
        lines += ["", "## Does each mitigation improve the final return?", ""]
        for what, name in MITIGATIONS:
            if name in tests:
                t = tests[name]
                lines.append(
                    f"- {what} ({name}): **{_verdict(t)}** — "
                    f"{summaries[name]['final_joint_score']:.3f} vs "
                    f"{summaries[BASELINE]['final_joint_score']:.3f}, Δ {t['diff']:+.3f} ± "
                    f"{t['hw']:.3f}, p = {t['p_holm']:.3g} (Holm); the smallest difference "
                    f"this study detects with 80% power is ±{t['detectable']:.3f}.")
        undecided = [n for _, n in MITIGATIONS if n in tests and tests[n]["p_holm"] > 0.05]
        if undecided:
            needs = ", ".join(
                f"{n} ≈ {seeds_to_detect(seeds, tests[n]):.0f}" for n in undecided
                if tests[n]["diff"] != 0)
            lines += ["", f"With {seeds} seeds a difference smaller than the detectable one above "
                      "cannot be told from noise: `--seeds` is the lever (the detectable "
                      "difference shrinks as 1/√seeds). Seeds at which the observed difference "
                      f"would be detected with 80% power: {needs}."]
    lines += _contrast_section(summaries)
    lines += _correlation_section(summaries)
    if errors:
        lines += _error_section(errors)
    return io.atomic_write_text(path, "\n".join(lines) + "\n")


def _contrast_section(summaries: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One verdict line per controlled comparison (`contrast_tests`)."""
    rows = contrast_tests(summaries)
    if not rows:
        return []
    lines = ["", "## Controls: what each claim is due to", "",
             "Each line compares a variant with the control that differs from it in one thing "
             "only: final joint score difference (variant − control, Welch) with Holm over the "
             f"{len(rows)} comparisons; the permutation test's p (Holm) and the share of seeds "
             "ending in mutual cooperation beside it.", ""]
    for r in rows:
        verdict = _verdict({"p_holm": r["p_holm"], "diff": r["diff"]})
        lines.append(
            f"- {r['what']} ({r['variant']} vs {r['control']}): **{verdict}** — Δ "
            f"{r['diff']:+.3f} ± {r['hw']:.3f}, p = {r['p_holm']:.3g} (Welch, Holm), "
            f"permutation p = {r['p_perm_holm']:.3g} (Holm); mutual cooperation "
            f"{r['coop']:.0%} vs {r['coop_control']:.0%}; detectable with 80% power: "
            f"±{r['detectable']:.3f}.")
    return lines


def _error_section(errors: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The table of bias² and variance per coordinate at the fixed points."""
    first = next(iter(errors.values()))
    at = first["at"]
    lines = ["", "## Gradient error at fixed points", "",
             f"Both players' LOLA gradient estimates ({first['draws']} independent draws per "
             "variant) at the exact LOLA run's parameters before updates "
             f"{', '.join(map(str, at))} (0: the initial policies); every draw replays the "
             "updates up to the point with the logits forced to the exact run's, so the value "
             "baseline and the replay's staleness are those of a run at that pace. Per "
             "coordinate (10: both players): bias² (unbiased, ± jackknife se) against the "
             "exact LOLA gradient of the infinite game (the correlation's oracle), variance, "
             "and the replay's ESS. The exact gradient's mean square per coordinate: "
             + ", ".join(f"{_fmt(x, 4)} (update {u})" for u, x in zip(at, first["exact_sq"],
                                                                     strict=True)) + ".", "",
             "| variant | " + " | ".join(f"bias² @{u} | variance @{u}" for u in at)
             + " | replay ESS @" + "/".join(map(str, at)) + " |",
             "|---|" + "---|---|" * len(at) + "---|"]
    for name, e in errors.items():
        cells = [f"{e['bias2'][i]:.3g} ± {e['bias2_se'][i]:.2g} | {e['variance'][i]:.3g}"
                 for i in range(len(at))]
        ess = ("—" if not np.any(np.isfinite(e["replay_ess"])) else
               "/".join(f"{x:.0f}" for x in e["replay_ess"]))
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {ess} |")
    return lines


def _correlation_section(summaries: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Gradient correlations against the baseline and, for the off-policy variants, against
    the on-policy variant with as many episodes (`ON_POLICY_TWIN`)."""
    base = summaries.get(BASELINE)
    lines = ["", "## Gradient correlation", "",
             "Pearson correlation over the 5 coordinates between each player's estimated and exact "
             "LOLA meta-gradient, averaged over players and updates along each variant's own "
             f"trajectory; the early figure averages the first {EARLY_UPDATES} updates, where "
             "every variant is near the same policies.", ""]
    if base is not None:
        for name, s in summaries.items():
            if name == BASELINE:
                continue
            t = _welch(s, base, "per_seed_mean_corr")
            e = _welch(s, base, "per_seed_early_corr")
            lines.append(f"- {name}: {s['mean_corr']:.3f} vs {base['mean_corr']:.3f}, Δ "
                         f"{t['diff']:+.3f} ± {t['hw']:.3f} (first {EARLY_UPDATES} updates: "
                         f"{e['diff']:+.3f} ± {e['hw']:.3f}).")
    twin = summaries.get(ON_POLICY_TWIN)
    off = [n for n, s in summaries.items()
           if s["config"].get("comp_off_policy") or s["config"].get("hessian_off_policy")]
    if twin is not None and off:
        lines += ["", f"Off-policy variants against {ON_POLICY_TWIN} (as many episodes per inner "
                  "estimate, all fresh): the replay's effective sample size says how much of it "
                  "the stale episodes are worth.", ""]
        for name in off:
            s = summaries[name]
            t = _welch(s, twin, "per_seed_mean_corr")
            lines.append(f"- {name}: correlation {s['mean_corr']:.3f} vs {twin['mean_corr']:.3f}, "
                         f"Δ {t['diff']:+.3f} ± {t['hw']:.3f}; replay ESS "
                         f"{_fmt(s.get('replay_ess'), 0)} of {s['config'].get('replay_size')} "
                         f"episodes after the first {s['final_window']} updates "
                         f"({_fmt(s.get('replay_ess_first_update'), 0)} at the first), largest "
                         f"per-decision log-weight {_fmt(s.get('replay_max_log_weight'), 2)}.")
    return lines


def _config_line(summaries: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The settings every variant shares, as stored (what was actually run)."""
    configs = [s.get("config", {}) for s in summaries.values()]
    shared = {k: v for k, v in configs[0].items()
              if k not in ("comp", "hessian", "outer", "comp_off_policy", "hessian_off_policy")
              and all(c.get(k) == v for c in configs)} if configs else {}
    return [f"Settings shared by the variants: {', '.join(f'{k}={v}' for k, v in shared.items())}."]


def _smooth(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average along the last axis (shorter windows at the start). Same shape."""
    x = np.asarray(x, np.float64)
    sums = np.cumsum(np.concatenate([np.zeros(x.shape[:-1] + (1,)), x], -1), -1)
    n = x.shape[-1]
    counts = np.minimum(np.arange(1, n + 1), window)
    return (sums[..., 1:] - sums[..., np.arange(1, n + 1) - counts]) / counts


def _seed_curves(result: Mapping[str, Any], key: str) -> np.ndarray:
    """Per-seed curves [S, U]: joint score or correlation (mean over players)."""
    values = np.asarray(result["per_seed"]["score" if key == "joint_score" else key], np.float64)
    return _nanmean(values, -1)


def plot_study(folder: Path, results: Mapping[str, Mapping[str, Any]]) -> list[Path]:
    """joint_score.png, correlation.png (small multiples: the 128/128 baseline against each
    variant), final_joint_score.png (dot and 95% CI per variant) and, with off-policy variants,
    replay_ess.png.

    Each seed's curve is smoothed by a trailing moving average over updates/20 updates first,
    then mean and 95% CI are taken over seeds of the smoothed curves (so the band is the CI of
    the plotted mean). Drawn on `matplotlib.figure.Figure` objects, written atomically.
    """
    names = list(results)
    others = [n for n in names if n != BASELINE] if BASELINE in results else names
    written = [_plot_multiples(folder, results, others, "joint_score",
                               "joint score (avg reward per step)", "joint_score.png"),
               _plot_multiples(folder, results, others, "corr",
                               "corr(estimated, exact LOLA gradient)", "correlation.png"),
               _plot_final(folder, results)]
    off = [n for n in names if np.isfinite(results[n].get("replay_ess", np.nan))]
    if off:
        written.append(_plot_ess(folder, results, off))
    return written


def _band(ax, curves: np.ndarray, colour, label: str) -> int:
    window = max(1, curves.shape[-1] // 20)
    smooth = _smooth(curves, window)
    mean, hw = _mean_hw(smooth)
    x = np.arange(len(mean))
    ax.plot(x, mean, color=colour, lw=1.3, label=label)
    ax.fill_between(x, mean - np.nan_to_num(hw), mean + np.nan_to_num(hw), color=colour,
                    alpha=0.2, lw=0)
    return window


def _plot_multiples(folder: Path, results, others, key: str, ylabel: str, filename: str) -> Path:
    from matplotlib.figure import Figure

    cols = min(5, max(1, len(others)))
    rows = math.ceil(len(others) / cols)
    fig = Figure(figsize=(3.1 * cols, 2.5 * rows + 0.6))
    axes = np.atleast_1d(fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False)).ravel()
    window = 1
    for ax, name in zip(axes, others, strict=False):
        if BASELINE in results:
            _band(ax, _seed_curves(results[BASELINE], key), "0.45", BASELINE)
        window = _band(ax, _seed_curves(results[name], key), "tab:blue", name)
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes[len(others):]:
        ax.set_visible(False)
    for ax in axes[::cols]:
        ax.set_ylabel(ylabel, fontsize=8)
    for ax in axes[-cols:]:
        ax.set_xlabel("update", fontsize=8)
    fig.suptitle(f"grey: {BASELINE}; blue: the variant. Mean ± 95% CI over seeds of per-seed "
                 f"curves smoothed over {window} updates", fontsize=9)
    fig.tight_layout()
    return io.atomic_savefig(fig, folder / filename, dpi=110)


def _plot_final(folder: Path, results) -> Path:
    from matplotlib.figure import Figure

    names = list(results)
    fig = Figure(figsize=(7, 0.38 * len(names) + 1.4))
    ax = fig.subplots()
    y = np.arange(len(names))[::-1]
    if BASELINE in results:
        s = results[BASELINE]
        lo = s["final_joint_score"] - np.nan_to_num(s["final_joint_score_hw"])
        hi = s["final_joint_score"] + np.nan_to_num(s["final_joint_score_hw"])
        ax.axvspan(lo, hi, color="0.85", label=f"{BASELINE} 95% CI")
    for yi, name in zip(y, names, strict=True):
        s = results[name]
        ax.errorbar(s["final_joint_score"], yi, xerr=np.nan_to_num(s["final_joint_score_hw"]),
                    fmt="o", color="tab:blue", capsize=3)
        finals = np.asarray(s["per_seed_final_joint_score"])
        ax.plot(finals, np.full(len(finals), yi) - 0.18, "|", color="tab:blue", alpha=0.5, ms=6)
    ax.axvline(-1.0, color="tab:green", lw=0.8, ls="--", label="mutual cooperation (−1)")
    ax.set_yticks(y, names, fontsize=8)
    window = next(iter(results.values()))["final_window"]
    ax.set_xlabel(f"final joint score (mean of the last {window} updates)")
    ax.set_title("dots: mean ± 95% CI over seeds; ticks: seeds", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return io.atomic_savefig(fig, folder / "final_joint_score.png", dpi=120)


def _plot_ess(folder: Path, results, names) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 3.6))
    ax = fig.subplots()
    for name, colour in zip(names, ("tab:blue", "tab:orange", "tab:red", "tab:purple"),
                            strict=False):
        ess = np.asarray(results[name]["curves"]["replay_ess"], np.float64)
        ax.plot(np.arange(len(ess)), ess, color=colour, lw=1.2, label=name)
    size = results[names[0]]["config"].get("replay_size")
    if size:
        ax.axhline(size, color="0.5", ls="--", lw=0.8, label=f"replay size {size}")
    ax.set_yscale("log")
    ax.set_xlabel("update")
    ax.set_ylabel("effective sample size (episodes)")
    ax.set_title("replay staleness: ESS of the per-decision weights, mean over seeds", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return io.atomic_savefig(fig, folder / "replay_ess.png", dpi=120)


def write_study(out: Path, points: Sequence[Mapping[str, Any]],
                results: Sequence[Mapping[str, Any]],
                errors: Mapping[str, Mapping[str, Any]] | None = None) -> list[Path]:
    """Per-variant CSVs (runs/NAME.csv), curves.csv, the figures and report.md of a study
    (with `errors`, {variant: gradient-error result}, its section and gradient_error.json)."""
    by_name = {p["variant"]: r for p, r in zip(points, results, strict=True)}
    summaries = {n: {k: v for k, v in r.items() if k != "per_seed"} for n, r in by_name.items()}
    written = [io.atomic_write_csv(out / "runs" / f"{name}.csv", per_seed_rows(r["per_seed"]))
               for name, r in by_name.items()]
    rows = [row for name, s in summaries.items() for row in curve_rows(name, s)]
    written.append(io.atomic_write_csv(out / "curves.csv", rows))
    written += plot_study(out, by_name)
    first = points[0]
    if errors:
        written.append(io.atomic_write_json(out / "gradient_error.json", dict(errors)))
    written.append(write_report(out / "report.md", summaries, first["seeds"], first["updates"],
                                errors))
    return written
