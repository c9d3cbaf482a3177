"""report.md of a study: one line per series, bias2 at both ends of the axis with the difference and
ratio (95% CIs) beside the theory's bounds (Liu, Feng et al. 2022: compositional bias
O(K α^K σ_in |τ|^-0.5), multi-step Hessian bias O((K−1) Δ_H^(K−1))).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from gmrl import stats
from gmrl.studies.plots import series
from gmrl.studies.tabular import LINES, PANELS, X_AXIS

Z95 = stats.Z95
THEORY = {
    "samples": "theory: bias ≤ O(|τ|^-0.5), i.e. bias2 slope ≤ -1 in |τ| (compositional codes)",
    "lr": "theory: bias ≤ O(K α^K σ_in |τ|^-0.5): bias2 grows at most like α^(2K)",
    "steps": "theory: bias ≤ O(K α^K ...) (compositional), O((K−1) Δ_H^(K−1)) (Hessian): "
             "grows with K",
}


def _half(row: dict) -> float:
    """95% half-width of a row's bias2: t with the row's bias2_df (normal where absent)."""
    return float(stats.t_quantile(row.get("bias2_df", float("inf"))) * row["bias2_se"])


def significant(row: dict) -> bool:
    """bias2 above zero by more than its 95% CI half-width."""
    return row["bias2"] - _half(row) > 0


def _fmt(row: dict) -> str:
    """bias2 ± 95% half-width, then (where the row has them) the relative bias ‖E ĝ − g*‖/‖g*‖ with
    its CI and the number of individually significant MDPs."""
    text = f"{row['bias2']:.3g} ± {_half(row):.2g}"
    if "rel_bias" in row:
        text += (f" (rel. bias {row['rel_bias']:.2g} [{row['rel_bias_ci_low']:.2g}, "
                 f"{row['rel_bias_ci_high']:.2g}]; {row['significant_mdps']}/{row['num_mdps']} MDPs "
                 "significant)")
    return text


def slope_text(points: list[dict], x_name: str) -> str:
    """Log-log slope of bias2 over the points where bias2 is significantly positive."""
    used = [r for r in points if significant(r)]
    if len({r[x_name] for r in used}) < 2:
        return "slope: fewer than 2 significantly positive points"
    a, se = stats.fit_power_law([r[x_name] for r in used], [r["bias2"] for r in used],
                                [r["bias2_se"] for r in used])
    return f"bias2 ∝ {x_name}^a, a = {a:.2f} ± {Z95 * se:.2f} (over {len(used)} points)"


def series_line(label: str, points: list[dict], x_name: str) -> str:
    """bias2 at the first and the last point of one line, their difference (95% CI) and, where both
    are significantly positive, their ratio (95% CI) — the ends of the axis, no fitted subset."""
    from gmrl.studies.verdicts import compare_ends

    first, last = points[0], points[-1]
    _, text = compare_ends(first, last, +1)
    return (f"- {label}: bias2 at {x_name}={first[x_name]}: {_fmt(first)}; at "
            f"{x_name}={last[x_name]}: {_fmt(last)}; {text.split('; smallest')[0]}"
            + _non_finite_text(points, x_name))


def _non_finite_text(points: list[dict], x_name: str) -> str:
    """Names the points whose estimates overflowed (NaN/inf, e.g. at large α^K); they are kept
    as NaN in the table and skipped by the slope fit."""
    bad = [r[x_name] for r in points if r.get("finite") is False]
    return (f"; NON-FINITE estimates (overflow, stored as NaN) at {x_name} = {bad}" if bad
            else "")


def _bias_vs_steps(points: list[dict]) -> dict | None:
    """Fits of bias = sqrt(bias2) against K over the points (K ≥ 2) with significantly positive
    bias2: the log-log slope b of bias ∝ K^b, and the theory's shape bias ∝ (K−1)·Δ_H^(K−1)
    (Liu, Feng et al. 2022, Hessian bias of K steps), i.e. log(bias/(K−1)) linear in K−1 with slope
    log Δ_H. Both are weighted least squares with delta-method errors; None below 2 steps."""
    used = [r for r in points if r["steps"] >= 2 and significant(r)]
    if len({r["steps"] for r in used}) < 2:
        return None
    steps = np.array([r["steps"] for r in used], np.float64)
    bias = np.sqrt([r["bias2"] for r in used])
    bias_se = np.array([r["bias2_se"] for r in used]) / (2 * bias)
    slope, slope_se = stats.fit_power_law(steps, bias, bias_se)
    log_delta, log_delta_se = stats.fit_power_law(np.exp(steps - 1), bias / (steps - 1),
                                                  bias_se / (steps - 1))
    return {"slope": slope, "slope_se": slope_se, "log_delta": log_delta,
            "log_delta_se": log_delta_se, "steps": sorted({int(k) for k in steps}),
            "growth": bias[np.argmax(steps)] / bias[np.argmin(steps)]}


def _zero_verdict(row: dict) -> str:
    if not np.isfinite(row["bias2"]):
        return "non-finite (overflow)"
    return ("significantly positive" if significant(row) else
            "within its CI of zero" if abs(row["bias2"]) <= _half(row)
            else "significantly negative")


def hessian_bias_findings(rows: list[dict]) -> list[str]:
    """One line per (α, c): bias2 at K=1, the slope of bias against K and the fitted Δ_H of the
    theory's (K−1)·Δ_H^(K−1); then how the growth with K compares between small and large α·c."""
    lines, fits = [], []
    for (lr, error), points in series(rows, "hessian-bias").items():
        text = f"- α={lr:g}, c={error:g} (α·c={lr * error:g}):"
        first = points[0]
        if first["steps"] == 1:
            text += f" bias2 at K=1 {_fmt(first)} ({_zero_verdict(first)});"
        fit = _bias_vs_steps(points)
        if fit is None:
            lines.append(text + " fewer than 2 steps K ≥ 2 with significantly positive bias2, "
                                "no fit")
            continue
        fits.append((lr * error, fit))
        low, high = (np.exp(fit["log_delta"] + s * Z95 * fit["log_delta_se"]) for s in (-1, 1))
        lines.append(
            text + f" bias = sqrt(bias2) ∝ K^b, b = {fit['slope']:.2f} ± "
            f"{Z95 * fit['slope_se']:.2f} over K = {fit['steps']}; bias grows × "
            f"{fit['growth']:.3g} from K={fit['steps'][0]} to K={fit['steps'][-1]}; theory's "
            f"(K−1)·Δ_H^(K−1) fits Δ_H = {np.exp(fit['log_delta']):.3g} "
            f"[{low:.3g}, {high:.3g}]")
    if len(fits) >= 2:
        (small_ac, small), (large_ac, large) = min(fits, key=lambda f: f[0]), max(
            fits, key=lambda f: f[0])
        z_slope = (large["slope"] - small["slope"]) / np.hypot(small["slope_se"],
                                                               large["slope_se"])
        rank = float(spearmanr([f[0] for f in fits], [f[1]["slope"] for f in fits]).statistic)
        lines.append(
            f"- growth with K, small vs large α·c: b = {small['slope']:.2f} ± "
            f"{Z95 * small['slope_se']:.2f} at α·c={small_ac:g}, {large['slope']:.2f} ± "
            f"{Z95 * large['slope_se']:.2f} at α·c={large_ac:g} (difference z = {z_slope:.1f}); "
            f"rank correlation of b with α·c over {len(fits)} (α, c): {rank:.2f} (theory: Δ_H "
            "grows with c, so b should grow with α·c)")
    return lines


def findings(rows: list[dict], study: str) -> list[str]:
    """The study's findings, one markdown bullet each."""
    if study == "hessian-bias":
        return hessian_bias_findings(rows)
    x_name, panel_name = X_AXIS[study], PANELS.get(study)
    lines = []
    for (panel, line), points in series(rows, study).items():
        label = f"{LINES[study]}={line}" + (f", {panel_name}={panel}" if panel_name else "")
        if line == "eee":  # nothing sampled: the estimate is the oracle up to float64 rounding
            worst = max(abs(r["bias2"]) for r in points)
            lines.append(f"- {label}: equals the oracle at every {x_name} (|bias2| ≤ {worst:.1g}, "
                         "float64 rounding)")
            continue
        lines.append(series_line(label, points, x_name))
        if study in ("comp-lr", "comp-samples", "comp-steps") and "param_error" in points[-1]:
            r = points[-1]
            lines.append(f"  - parameter error ‖θ̂_K − θ_K‖² at {x_name}={r[x_name]}: "
                         f"{r['param_error'][-1]:.3g} ± {Z95 * r['param_error_se'][-1]:.2g}")
    if study == "decompose":
        from gmrl.studies.verdicts import hessian_lines

        lines += [text for _, text in hessian_lines([r for r in rows if r["study"] == study])]
    return lines


def _theta0_text(theta0) -> str:
    return theta0 if isinstance(theta0, str) else f"a user table (max |θ0| {np.max(np.abs(theta0)):.3g})"


def write_report(rows: list[dict], study: str, path: Path, seconds: float | None = None) -> Path:
    """Write report.md (atomically) for one study's rows."""
    from gmrl.io import atomic_write_text

    mine = [r for r in rows if r["study"] == study]
    first = mine[0]
    header = [f"# gmrl study {study}", "",
              f"{first['mdps']} MDPs × {first['repeats']} repeats per point, S={first['states']}, "
              f"A={first['actions']}, γ={first['gamma']}, T={first['horizon']}, oracle "
              f"{first['oracle']}, θ0 {_theta0_text(first.get('theta0', 'zeros'))}"
              + (f", critic gradient in φ {'on' if first.get('critic_gradient', False) else 'off'}"
                 if first["problem"] == "lirpg" else "")
              + f", seed {first['seed']}; {len(mine)} points"
              + (f"; {seconds:.0f} s wall time this run" if seconds is not None else "") + ".",
              "bias2 is the unbiased squared bias per coordinate ± its 95% CI (5 batch means, t "
              "interval); each "
              "line compares the two ends of the axis (difference, and ratio where both ends are "
              "significantly positive, with 95% CIs).", ""]
    theory = THEORY.get(X_AXIS[study], "")
    if study == "hessian-bias":
        theory = ("theory: Hessian bias O((K−1) Δ_H^(K−1)): grows with K, faster for larger "
                  "Δ_H (which grows with c); the injected error also enters K=1's one Hessian")
    body = ["## Findings", "", *(f"{theory}" for _ in [0] if theory), "", *findings(rows, study)]
    return atomic_write_text(path, "\n".join(header + body) + "\n")
