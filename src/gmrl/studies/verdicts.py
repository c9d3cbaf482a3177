"""The combined report of `gmrl study all`: each finding the reference study was designed to show,
its measured number with a 95% CI, and a verdict.

Findings (Liu, Feng et al. 2022, §5; compositional bias O(K α^K σ_in |τ|^-0.5), multi-step Hessian
bias O((K−1) Δ_H^(K−1))):

  1. compositional bias (code lee) falls with the number of samples   (comp-samples, decompose)
  2. compositional bias grows with the inner learning rate α           (comp-lr, lr)
  3. compositional bias grows with the number of inner steps K          (comp-steps, steps)
  4. the Hessian bias (code ele) of lvc and maml persists with samples, dice's and loaded's is
     absent: an equivalence test (TOST) with the margin ‖bias‖ < ½ LVC's    (decompose, largest size)
  5. an injected Hessian error makes the bias grow with K faster than the linear null, under which
     bias2 ∝ c² and the growth at c_large is (c_large/c_small)² times that at c_small (hessian-bias)
  6. LIRPG's Hessian bias grows with K                                   (lirpg, largest sample size)

bias2's interval is Student's t on the row's `bias2_df` (`gmrl.stats.summarize`: batch means,
Welch–Satterthwaite over MDPs). Every comparison is between the two ends of the study's axis: the
difference of bias2 (last − first) with a t interval on the Welch–Satterthwaite df of the two
standard errors, and the ratio last/first with a delta-method CI where both ends are significantly
positive. Verdicts: "holds" (the difference has the predicted sign and excludes 0), "does not hold"
(it excludes 0 with the other sign), "not significant" — then with the smallest difference the
run could detect with 80% power at the two-sided 5% level (noncentral t, `stats.detectable_difference`).
A claim of absent bias is an equivalence test: "holds" only when the 90% interval lies below the
margin; a CI that merely contains 0 is "not significant".
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from gmrl import stats

EQUIVALENCE_FRACTION = 0.5
"""Finding 4's margin: DiCE's (Loaded DiCE's) Hessian bias ‖E ĝ − g*‖ is "absent" when it is shown
below this fraction of LVC's (lower 95% end of LVC's bias2; bias2 margin = fraction² × that)."""


def _rows(rows: list[dict], study: str, **fields) -> list[dict]:
    return [r for r in rows if r.get("study") == study
            and all(r.get(k) == v for k, v in fields.items())]


def _df(row: dict) -> float:
    """Degrees of freedom of a row's bias2 interval (`stats.summarize`'s bias2_df; inf if absent)."""
    return float(row.get("bias2_df", float("inf")))


def _half(se: float, df: float) -> float:
    return float(stats.t_quantile(df) * se)


def _fmt(value: float, se: float, df: float = float("inf")) -> str:
    return f"{value:.3g} ± {_half(se, df):.2g}"


def _rel(row: dict) -> str:
    """", rel. bias 0.12 [0, 0.2]" where the row carries the relative bias ‖E ĝ − g*‖/‖g*‖."""
    if "rel_bias" not in row:
        return ""
    return f", rel. bias {row['rel_bias']:.2g} [{row['rel_bias_ci_low']:.2g}, {row['rel_bias_ci_high']:.2g}]"


def difference(first: dict, last: dict, scale: float = 1.0) -> tuple[float, float, float]:
    """last − scale·first of two independent bias2 values: (difference, se, Welch–Satterthwaite df)."""
    diff = last["bias2"] - scale * first["bias2"]
    se_parts = [scale * first["bias2_se"], last["bias2_se"]]
    se = float(np.hypot(*se_parts))
    df = stats.welch_satterthwaite(se_parts, [_df(first), _df(last)]) if np.isfinite(se) else float("inf")
    return float(diff), se, df


def _sign_verdict(diff: float, se: float, df: float, direction: int, text: str,
                  what: str = "difference") -> tuple[str, str]:
    if not (np.isfinite(diff) and np.isfinite(se)):
        return "not significant", text + "; non-finite estimates (overflow)"
    half = _half(se, df)
    if direction * diff > half:
        return "holds", text
    if direction * diff < -half:
        return "does not hold", text
    return "not significant", text + (f"; smallest detectable {what} "
                                      f"{stats.detectable_difference(se, df=df):.2g}")


def compare_ends(first: dict, last: dict, direction: int) -> tuple[str, str]:
    """(verdict, text) for the claim sign(bias2(last) − bias2(first)) = direction (±1), with a t
    interval on Welch–Satterthwaite degrees of freedom."""
    diff, se, df = difference(first, last)
    if not (np.isfinite(diff) and np.isfinite(se)):
        return "not significant", "non-finite estimates (overflow) at an end of the axis"
    text = f"difference {_fmt(diff, se, df)}"
    if all(r["bias2"] > _half(r["bias2_se"], _df(r)) for r in (first, last)):
        ratio = last["bias2"] / first["bias2"]
        log_se = float(np.hypot(first["bias2_se"] / first["bias2"], last["bias2_se"] / last["bias2"]))
        low, high = ratio * np.exp(-_half(log_se, df)), ratio * np.exp(_half(log_se, df))
        text += f", ratio last/first {ratio:.3g} [{low:.3g}, {high:.3g}]"
    return _sign_verdict(diff, se, df, direction, text)


def zero_claim(row: dict) -> tuple[str, str]:
    """(verdict, text) for the claim bias2 = 0 when no margin is available: "holds" only says the
    95% CI contains 0 (absence of evidence); `equivalence_claim` is the test of absence."""
    half = _half(row["bias2_se"], _df(row))
    low, high = row["bias2"] - half, row["bias2"] + half
    text = f"bias2 {_fmt(row['bias2'], row['bias2_se'], _df(row))} (95% CI [{low:.2g}, {high:.2g}])"
    return ("holds" if low <= 0 <= high else "does not hold"), text


def equivalence_claim(row: dict, margin: float, margin_text: str) -> tuple[str, str]:
    """(verdict, text) for the claim bias2 < `margin` (TOST at 5%, `stats.equivalence`): "holds"
    when the 90% t interval lies below the margin, "does not hold" when bias2 is significantly
    above it, else "not significant" (the run cannot tell)."""
    if not (np.isfinite(row["bias2"]) and np.isfinite(row["bias2_se"])):
        return "not significant", "non-finite estimates (overflow)"
    test = stats.equivalence(row["bias2"], row["bias2_se"], _df(row), margin)
    text = (f"bias2 {_fmt(row['bias2'], row['bias2_se'], _df(row))}{_rel(row)}; equivalence margin "
            f"{margin:.2g} ({margin_text}): 90% CI [{test['low']:.2g}, {test['high']:.2g}], TOST p = "
            f"{test['p']:.2g}")
    if test["equivalent"]:
        return "holds", text
    if row["bias2"] - _half(row["bias2_se"], _df(row)) > margin:
        return "does not hold", text
    return "not significant", text


def positive_claim(row: dict) -> tuple[str, str]:
    """(verdict, text) for the claim bias2 > 0."""
    text = (f"bias2 {_fmt(row['bias2'], row['bias2_se'], _df(row))}{_rel(row)}, "
            f"t = {row['bias2'] / row['bias2_se']:.1f}")
    if "significant_mdps" in row:
        text += f", significant in {row['significant_mdps']} of {row['num_mdps']} MDPs"
    return _sign_verdict(row["bias2"], row["bias2_se"], _df(row), +1, text, "bias2")


def _line(label: str, verdict_text: tuple[str, str]) -> tuple[str, str]:
    verdict, text = verdict_text
    return verdict, f"- {label}: {text} — **{verdict}**"


def _merge_identical(series: dict[str, list[dict]]) -> list[tuple[str, list[dict]]]:
    """Joins lines whose every point has identical statistics (loaded, lvc and maml share their
    inner gradient, so their lee rows are equal) under one label "a = b = c"."""
    groups: dict[tuple, tuple[list[str], list[dict]]] = {}
    for name, points in series.items():
        key = tuple((r["bias2"], r["bias2_se"]) for r in points)
        groups.setdefault(key, ([], points))[0].append(str(name))
    return [(" = ".join(names), points) for names, points in groups.values()]


def _axis_series(rows: list[dict], study: str, x: str, line: str, **fields) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in _rows(rows, study, **fields):
        out.setdefault(r[line], []).append(r)
    return {k: sorted(v, key=lambda r: r[x]) for k, v in out.items()}


def _trend_lines(rows, study, x, line, direction, **fields) -> list[tuple[str, str]]:
    """One line per `line` value of `study`: bias2 at the first vs the last `x`."""
    out = []
    for label, points in _merge_identical(_axis_series(rows, study, x, line, **fields)):
        first, last = points[0], points[-1]
        out.append(_line(f"{study}, {line} {label}: {x} {first[x]:g} → {last[x]:g}: "
                         f"{_fmt(first['bias2'], first['bias2_se'], _df(first))} → "
                         f"{_fmt(last['bias2'], last['bias2_se'], _df(last))}"
                         + (f" (rel. bias {first['rel_bias']:.2g} → {last['rel_bias']:.2g})"
                            if "rel_bias" in first else ""),
                         compare_ends(first, last, direction)))
    return out


def finding_lines(rows: list[dict]) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """[(finding, studies used, [(verdict, markdown line), ...]), ...] for the six findings."""
    findings = [
        ("1. Compositional bias (lee) falls with the number of samples", "comp-samples, decompose",
         _trend_lines(rows, "comp-samples", "samples", "estimator", -1)
         + _trend_lines(rows, "decompose", "samples", "estimator", -1, code="lee")),
        ("2. Compositional bias (lee) grows with the inner learning rate α", "comp-lr, lr",
         _trend_lines(rows, "comp-lr", "lr", "estimator", +1)
         + _trend_lines(rows, "lr", "lr", "code", +1, code="lee")),
        ("3. Compositional bias (lee) grows with the number of inner steps K", "comp-steps, steps",
         _trend_lines(rows, "comp-steps", "steps", "estimator", +1)
         + _trend_lines(rows, "steps", "steps", "code", +1, code="lee")),
    ]
    findings.append(("4. Hessian bias (ele) of lvc and maml persists with samples; dice's and "
                     "loaded's is absent (equivalence with a margin of "
                     f"{EQUIVALENCE_FRACTION:g} × LVC's bias)", "decompose", hessian_lines(rows)))
    findings.append(("5. Injected Hessian error: the bias grows with K faster than linearly in the error "
                     "(against the linear null)",
                     "hessian-bias", _hessian_error_lines(rows)))
    lirpg = []
    points = _rows(rows, "lirpg")
    if points:
        largest = max(r["samples"] for r in points)
        lirpg = _trend_lines(rows, "lirpg", "steps", "estimator", +1, samples=largest)
    findings.append(("6. LIRPG's Hessian bias (ele) grows with K", "lirpg", lirpg))
    return findings


def hessian_lines(rows: list[dict]) -> list[tuple[str, str]]:
    """Finding 4 at the largest sample size of `decompose`: lvc's and maml's ele bias2 > 0; dice's
    and loaded's an equivalence test (TOST) against the margin EQUIVALENCE_FRACTION² × the lower
    95% end of lvc's bias2 (no margin, hence no verdict, when lvc's bias is not significant)."""
    ele = _rows(rows, "decompose", code="ele")
    if not ele:
        return []
    largest = max(r["samples"] for r in ele)
    at = sorted((r for r in ele if r["samples"] == largest), key=lambda r: r["estimator"])
    lvc = next((r for r in at if r["estimator"] == "lvc"), None)
    lvc_low = (lvc["bias2"] - _half(lvc["bias2_se"], _df(lvc))) if lvc is not None else float("nan")
    out = []
    for r in at:
        label = f"decompose ele, {r['estimator']} at {largest} samples"
        if r["estimator"] in ("lvc", "maml"):
            out.append(_line(f"{label} (biased Hessian: bias2 > 0)", positive_claim(r)))
        elif r["estimator"] not in ("dice", "loaded"):  # a registered estimator: no claim, the figure
            out.append(_line(f"{label} (no claim)", ("measured", zero_claim(r)[1])))
        elif np.isfinite(lvc_low) and lvc_low > 0:
            margin = EQUIVALENCE_FRACTION**2 * lvc_low
            out.append(_line(f"{label} (unbiased Hessian: bias < {EQUIVALENCE_FRACTION:g} × LVC's)",
                             equivalence_claim(r, margin, f"{EQUIVALENCE_FRACTION:g}² × LVC's lower "
                                                          f"95% end {lvc_low:.2g}")))
        else:
            verdict, text = zero_claim(r)
            out.append(_line(f"{label} (unbiased Hessian; no margin: LVC's bias not significant)",
                             ("not significant", text)))
    return out


def _hessian_error_lines(rows: list[dict]) -> list[tuple[str, str]]:
    """Finding 5 per α, against the linear null: with no compounding the bias is linear in the
    injected error c, bias2 ∝ c², so the growth of bias2 from K=1 to K_max at the largest c equals
    (c_large/c_small)² times that at the smallest c. The claim is that it grows by more: growth(c_l)
    − (c_l/c_s)²·growth(c_s) > 0 (t interval, Welch–Satterthwaite df)."""
    out = []
    points = _rows(rows, "hessian-bias")
    for lr in sorted({r["lr"] for r in points}):
        at = _rows(rows, "hessian-bias", lr=lr)
        errors, steps = sorted({r["hessian_error"] for r in at}), sorted({r["steps"] for r in at})
        if len(errors) < 2 or len(steps) < 2 or errors[0] <= 0:
            continue
        pick = {(r["hessian_error"], r["steps"]): r for r in at}
        growth = {}
        for c in (errors[0], errors[-1]):
            diff, se, df = difference(pick[(c, steps[0])], pick[(c, steps[-1])])
            growth[c] = {"bias2": diff, "bias2_se": se, "bias2_df": df}
        small, large = growth[errors[0]], growth[errors[-1]]
        null = (errors[-1] / errors[0]) ** 2
        diff, se, df = difference(small, large, scale=null)
        if not (np.isfinite(diff) and np.isfinite(se)):
            out.append(_line(f"hessian-bias α={lr:g}", ("not significant", "non-finite estimates")))
            continue
        text = (f"excess over the linear null {_fmt(diff, se, df)}")
        if small["bias2"] > _half(small["bias2_se"], small["bias2_df"]):
            ratio = large["bias2"] / small["bias2"]
            text += f"; growth ratio {ratio:.3g} against the linear null's {null:.3g} (= ×{ratio / null:.2g})"
        out.append(_line(f"hessian-bias α={lr:g}: growth of bias2 from K={steps[0]} to K={steps[-1]}: "
                         f"{_fmt(small['bias2'], small['bias2_se'], small['bias2_df'])} at c={errors[0]:g}, "
                         f"{_fmt(large['bias2'], large['bias2_se'], large['bias2_df'])} at c={errors[-1]:g}",
                         _sign_verdict(diff, se, df, +1, text, "excess")))
    return out


def verdict_counts(lines: Iterable[tuple[str, str]]) -> str:
    verdicts = [v for v, _ in lines]
    kinds = ("holds", "not significant", "does not hold")
    return ", ".join(f"{verdicts.count(k)} {k}" for k in kinds if verdicts.count(k))


def write_verdict_report(rows: list[dict], path: Path, seconds: float | None = None) -> Path:
    """report.md of `gmrl study all` (atomic)."""
    from gmrl.io import atomic_write_text

    studies = sorted({r["study"] for r in rows if "study" in r})
    settings = sorted({(r["mdps"], r["repeats"], r["oracle"], str(r["theta0"])[:40], r["seed"])
                       for r in rows}, key=str)
    header = ["# gmrl study all: the reference study's findings", "",
              f"Studies in this store: {', '.join(studies)}; {len(rows)} points"
              + (f"; {seconds:.0f} s wall time this run" if seconds is not None else "") + ".",
              "Settings (MDPs, repeats, oracle, θ0, seed): "
              + "; ".join(f"{m} × {r}, {o}, {t}, seed {s}" for m, r, o, t, s in settings) + ".",
              "bias2 is the unbiased squared bias per coordinate ± its 95% CI (5 batch means of repeats, t, "
              "conditional on the MDPs). Ends of each axis are compared; see the per-study reports "
              "`report_NAME.md` and figures `NAME_bias2.png` for every point.",
              "Verdicts: holds / does not hold (95% CI of the difference excludes 0) / not significant "
              "(with the smallest difference detectable at 80% power). A claim of absent bias holds only "
              "as an equivalence test (90% CI below a stated margin); finding 5 is tested against the "
              "linear null (bias2 ∝ c²).", ""]
    body = []
    for title, used, lines in finding_lines(rows):
        body += [f"## {title}", "", f"From: {used}. " + (verdict_counts(lines) + "." if lines
                                                          else "Not run in this store."), ""]
        body += [text for _, text in lines] + [""]
    return atomic_write_text(path, "\n".join(header + body))
