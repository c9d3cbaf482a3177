"""The combined report of `gmrl study all`: each finding the reference study was designed to show,
its measured number with a 95% CI, and a verdict.

Findings (Liu, Feng et al. 2022, §5; compositional bias O(K α^K σ_in |τ|^-0.5), multi-step Hessian
bias O((K−1) Δ_H^(K−1))):

  1. compositional bias (code lee) falls with the number of samples   (comp-samples, decompose)
  2. compositional bias grows with the inner learning rate α           (comp-lr, lr)
  3. compositional bias grows with the number of inner steps K          (comp-steps, steps)
  4. the Hessian bias (code ele) of lvc and maml persists with samples, dice's and loaded's vanishes
                                                                        (decompose, largest sample size)
  5. an injected Hessian error makes the bias grow faster with K at larger error (hessian-bias)
  6. LIRPG's Hessian bias grows with K                                   (lirpg, largest sample size)

Every comparison is between the two ends of the study's axis: the difference of bias2 (last − first)
with the normal 95% CI from the two jackknife standard errors, and the ratio last/first with a
delta-method CI where both ends are significantly positive. Verdicts: "holds" (the difference has
the predicted sign and excludes 0), "does not hold" (it excludes 0 with the other sign), "not
significant" — then with the smallest difference the run could detect, (z_0.975 + z_0.8)·se
(two-sided 5% level, 80% power). A claim of zero bias "holds" when the bias2 CI contains 0, and
the report gives the CI's upper end (the largest bias2 the run cannot exclude).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from gmrl.stats import Z95

Z80 = 0.8416212335729143
"""z of 80% power: a difference of (Z95 + Z80)·se is detected with probability 0.8."""


def _rows(rows: list[dict], study: str, **fields) -> list[dict]:
    return [r for r in rows if r.get("study") == study
            and all(r.get(k) == v for k, v in fields.items())]


def _fmt(value: float, se: float) -> str:
    return f"{value:.3g} ± {Z95 * se:.2g}"


def compare_ends(first: dict, last: dict, direction: int) -> tuple[str, str]:
    """(verdict, text) for the claim sign(bias2(last) − bias2(first)) = direction (±1)."""
    diff = last["bias2"] - first["bias2"]
    se = float(np.hypot(first["bias2_se"], last["bias2_se"]))
    if not (np.isfinite(diff) and np.isfinite(se)):
        return "not significant", "non-finite estimates (overflow) at an end of the axis"
    text = f"difference {_fmt(diff, se)}"
    if all(r["bias2"] > Z95 * r["bias2_se"] for r in (first, last)):
        ratio = last["bias2"] / first["bias2"]
        log_se = float(np.hypot(first["bias2_se"] / first["bias2"], last["bias2_se"] / last["bias2"]))
        low, high = ratio * np.exp(-Z95 * log_se), ratio * np.exp(Z95 * log_se)
        text += f", ratio last/first {ratio:.3g} [{low:.3g}, {high:.3g}]"
    if direction * diff > Z95 * se:
        return "holds", text
    if direction * diff < -Z95 * se:
        return "does not hold", text
    return "not significant", text + f"; smallest detectable difference {(Z95 + Z80) * se:.2g}"


def zero_claim(row: dict) -> tuple[str, str]:
    """(verdict, text) for the claim bias2 = 0."""
    low, high = row["bias2"] - Z95 * row["bias2_se"], row["bias2"] + Z95 * row["bias2_se"]
    text = f"bias2 {_fmt(row['bias2'], row['bias2_se'])} (95% CI [{low:.2g}, {high:.2g}])"
    return ("holds" if low <= 0 <= high else "does not hold"), text


def positive_claim(row: dict) -> tuple[str, str]:
    """(verdict, text) for the claim bias2 > 0."""
    text = f"bias2 {_fmt(row['bias2'], row['bias2_se'])}, z = {row['bias2'] / row['bias2_se']:.1f}"
    if row["bias2"] > Z95 * row["bias2_se"]:
        return "holds", text
    if row["bias2"] < -Z95 * row["bias2_se"]:
        return "does not hold", text
    return "not significant", text + f"; smallest detectable bias2 {(Z95 + Z80) * row['bias2_se']:.2g}"


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
                         f"{_fmt(first['bias2'], first['bias2_se'])} → "
                         f"{_fmt(last['bias2'], last['bias2_se'])}",
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
    hessian = []
    ele = _rows(rows, "decompose", code="ele")
    if ele:
        largest = max(r["samples"] for r in ele)
        for r in sorted((r for r in ele if r["samples"] == largest), key=lambda r: r["estimator"]):
            biased = r["estimator"] in ("lvc", "maml")
            claim = positive_claim(r) if biased else zero_claim(r)
            expected = "biased Hessian: bias2 > 0" if biased else "unbiased Hessian: bias2 = 0"
            hessian.append(_line(f"decompose ele, {r['estimator']} at {largest} samples ({expected})",
                                 claim))
    findings.append(("4. Hessian bias (ele) of lvc and maml persists with samples; dice's and "
                     "loaded's vanishes", "decompose", hessian))
    findings.append(("5. Injected Hessian error: the bias grows faster with K at larger error",
                     "hessian-bias", _hessian_error_lines(rows)))
    lirpg = []
    points = _rows(rows, "lirpg")
    if points:
        largest = max(r["samples"] for r in points)
        lirpg = _trend_lines(rows, "lirpg", "steps", "estimator", +1, samples=largest)
    findings.append(("6. LIRPG's Hessian bias (ele) grows with K", "lirpg", lirpg))
    return findings


def _hessian_error_lines(rows: list[dict]) -> list[tuple[str, str]]:
    """Per α: growth bias2(K_max) − bias2(K=1) at the largest c minus that at the smallest c."""
    out = []
    points = _rows(rows, "hessian-bias")
    for lr in sorted({r["lr"] for r in points}):
        at = _rows(rows, "hessian-bias", lr=lr)
        errors, steps = sorted({r["hessian_error"] for r in at}), sorted({r["steps"] for r in at})
        if len(errors) < 2 or len(steps) < 2:
            continue
        pick = {(r["hessian_error"], r["steps"]): r for r in at}
        growth = {}
        for c in (errors[0], errors[-1]):
            first, last = pick[(c, steps[0])], pick[(c, steps[-1])]
            growth[c] = (last["bias2"] - first["bias2"], float(np.hypot(first["bias2_se"], last["bias2_se"])))
        (g_small, se_small), (g_large, se_large) = growth[errors[0]], growth[errors[-1]]
        fake_first = {"bias2": g_small, "bias2_se": se_small}
        fake_last = {"bias2": g_large, "bias2_se": se_large}
        verdict, text = compare_ends(fake_first, fake_last, +1)
        text = text.replace("ratio last/first", f"growth at c={errors[-1]:g} / growth at c={errors[0]:g}")
        out.append(_line(f"hessian-bias α={lr:g}: growth of bias2 from K={steps[0]} to K={steps[-1]}: "
                         f"{_fmt(g_small, se_small)} at c={errors[0]:g}, {_fmt(g_large, se_large)} at "
                         f"c={errors[-1]:g}",
                         (verdict, "difference of growths " + text[len("difference "):])))
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
              "bias2 is the unbiased squared bias per coordinate ± its 95% CI (jackknife over repeats, "
              "conditional on the MDPs). Ends of each axis are compared; see the per-study reports "
              "`report_NAME.md` and figures `NAME_bias2.png` for every point.",
              "Verdicts: holds / does not hold (95% CI of the difference excludes 0) / not significant "
              "(with the smallest difference detectable at 80% power).", ""]
    body = []
    for title, used, lines in finding_lines(rows):
        body += [f"## {title}", "", f"From: {used}. " + (verdict_counts(lines) + "." if lines
                                                          else "Not run in this store."), ""]
        body += [text for _, text in lines] + [""]
    return atomic_write_text(path, "\n".join(header + body))
