"""Which explanation fits a user's mean meta-gradient: tests, the scaled fit, the decision rule.

For an explanation with expectation μ (estimated by Monte Carlo as μ̂ with per-coordinate variance
v of the mean) and the user's R estimates ĝ_r per MDP (d coordinates), the discrepancy

    D = ‖E ĝ − μ‖²/d,   D̂ = bias2(ĝ, μ̂) − Σ_j v_j / d                                        (3)

is estimated without bias (`gmrl.stats.bias2`: the U-statistic Σ_{r≠s} ⟨ĝ_r − μ̂, ĝ_s − μ̂⟩ /
(R(R−1)d), minus the part E‖μ̂ − μ‖²/d that the Monte-Carlo error adds). Pooled over the M MDPs it
is the mean of the per-MDP values, with variance (Σ_m se_m² + c_m)/M², se_m the jackknife standard
error over repeats and c_m = (4 Σ_j s_j² v_j / R + 2 Σ_j v_j²)/d² the Monte-Carlo error's share
(s_j² the user's per-coordinate variance). Under H0: E ĝ = μ, z = D̂/se is approximately standard
normal (a sum over many coordinates and MDPs; the jackknife makes it conservative), and the
one-sided p-value is P(N(0,1) ≥ z).

(3) is an omnibus test: it sees a discrepancy in any direction, but its noise grows with the
dimension. Telling the candidates apart is a question about a few directions only, so each
hypothesis also gets a projected test (Hotelling's T²): with u_1..u_k an orthonormal basis of the
span of all candidate means (concatenated over MDPs, k ≤ V), y_r = (⟨ĝ_r − μ̂, u_i⟩)_i for each
repeat r (the M MDPs of repeat r together) has mean 0 under H0, and

    T² = ȳᵀ (S/R + C)⁻¹ ȳ,   F = (R − k) T² / (k (R − 1)) ~ F(k, R − k),                      (4)

S the sample covariance of y over repeats and C = Σ_j u_ij u_lj v_j the Monte-Carlo error's share.
A hypothesis' p-value is min(1, 2 min(p_omnibus, p_projected)) (Bonferroni over its two tests).

`scaled`: H0: E ĝ = c μ for some c, with ĉ = Σ_m ⟨ḡ_m, μ̂_m⟩ / Σ_m ‖μ̂_m‖² (jackknife se over
repeats): the omnibus test (3) against ĉ μ̂, and the projected test (4) on the components of the
other candidates orthogonal to μ̂, which ĉ μ̂ does not touch (so no parameter is fitted there).

The decision (one look). Every hypothesis is tested at one level α_j. The consistent labels
are those of the hypotheses not rejected (`scaled` only when its ĉ's interval at that level
excludes 1 and 0); the label is decisive when exactly one label is consistent, `unexplained` when none
is, and `undetermined` (with the consistent set) otherwise. At most one explanation is true, so a
decisive label is wrong only if the true explanation's own test rejected it: P(wrong label) ≤ α_j
(up to the normal and F approximations), with no multiplicity correction needed over the false
hypotheses (whose rejection is never an error). (A truth c·μ with c ≠ 1 is labelled `scaled` or
undetermined while ĉ's interval excludes 1 and 0; with c so close to 1 (or 0) that it covers 1
(or 0), the unscaled label (or unexplained) is the answer at that resolution.) The former rule —
the label of the largest p-value among several survivors — named a label that the data did not
single out.

The sequential rule (`gmrl check`'s default). Look j (after R_j repeats per MDP, all data so far)
tests at α_j = α/(j(j+1)); since Σ_j α_j = α, the probability that the true explanation is
rejected at ANY look is ≤ α (a union bound, valid whatever the dependence between looks and
whenever the drawing stops), so stopping at the first decisive look keeps P(wrong label) ≤ α.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from scipy import special

from gmrl import stats
from gmrl.errors import require

Z95 = stats.Z95
POWER_Z = 1.2815515655446004  # 90% power for the "N repeats would" estimate


@dataclasses.dataclass(frozen=True)
class Test:
    """One hypothesis E ĝ = μ (or c μ) against the user's estimates.

    distance: D̂ of eq. (3) (pooled; squared error per coordinate), se its standard error,
    z = distance / se and p_omnibus its one-sided p-value; p_projected the p-value of the projected
    test (4) on `dims` directions; p = min(1, 2 min(p_omnibus, p_projected)); scale: ĉ and its se
    for a scaled test (else None);
    rejected at `threshold` (the level α_j of its look: rejected when p ≤ threshold).
    """

    candidate: str
    label: str
    distance: float
    se: float
    z: float
    p_omnibus: float
    p_projected: float
    dims: int
    p: float
    scale: float | None = None
    scale_se: float | None = None
    rejected: bool = False
    threshold: float = 0.0

    @property
    def scale_ci(self) -> tuple[float, float] | None:
        if self.scale is None:
            return None
        return self.scale - Z95 * self.scale_se, self.scale + Z95 * self.scale_se

    def describe(self) -> str:
        scale = "" if self.scale is None else f", c = {self.scale:.3g} ± {Z95 * self.scale_se:.2g}"
        name = self.candidate if self.scale is None else f"scaled {self.candidate}"
        return (f"{name}: D = {self.distance:.3g} ± {Z95 * self.se:.2g} (z = {self.z:.1f}), "
                f"projected p = {self.p_projected:.2g} on {self.dims} directions, "
                f"p = {self.p:.2g}{scale}")


@dataclasses.dataclass(frozen=True)
class Diagnosis:
    """The best explanation and the evidence.

    label: one of second-order-unbiased, first-order, vanilla-logprob-hessian, lvc-hessian,
    scaled (or a registered surrogate's name) when it is the only consistent label; undetermined
    when several are; unexplained when none is. best: the test with the largest p among the
    consistent ones (for unexplained: the nearest); consistent: the tests not rejected; rejected:
    the rest; labels: the consistent labels, best first; ambiguous: for undetermined, the same
    labels, and repeats_needed, an estimate of the repeats per MDP that would tell the best
    unscaled one apart from the others (None: identical expectations on these tasks); remaining:
    for `unexplained`, the smallest discrepancy (D̂ and its 95% CI); rule: the decision rule;
    level: the level α_j of every test at this look; look: j (None: a single fixed-sample look).
    """

    label: str
    best: Test
    consistent: tuple[Test, ...]
    rejected: tuple[Test, ...]
    ambiguous: tuple[str, ...]
    repeats_needed: int | None
    remaining: tuple[float, float, float] | None
    rule: str
    message: str
    notes: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    level: float = 0.05
    look: int | None = None

    def to_json(self) -> dict:
        def test(t: Test) -> dict:
            return dataclasses.asdict(t) | {"scale_ci": t.scale_ci}
        return {"label": self.label, "message": self.message, "best": test(self.best),
                "consistent": [test(t) for t in self.consistent],
                "rejected": [test(t) for t in self.rejected], "ambiguous": list(self.ambiguous),
                "repeats_needed": self.repeats_needed, "remaining": self.remaining,
                "rule": self.rule, "notes": list(self.notes), "labels": list(self.labels),
                "level": self.level, "look": self.look}


def discrepancy(estimates: np.ndarray, mean: np.ndarray, mean_var: np.ndarray) -> tuple[float, float]:
    """Pooled D̂ of eq. (3) and its standard error. estimates [M, R, d], mean and mean_var [M, d]."""
    num_repeats, dim = estimates.shape[1], estimates.shape[2]
    b = stats.bias2(estimates, mean, batches=num_repeats)  # all pairs of repeats: the test's calibrated D̂
    values = b.value - mean_var.sum(-1) / dim
    user_var = estimates.var(axis=1, ddof=1)
    mc = (4 * (user_var * mean_var).sum(-1) / num_repeats + 2 * (mean_var**2).sum(-1)) / dim**2
    count = estimates.shape[0]
    return float(values.mean()), float(np.sqrt(np.sum(b.se**2 + mc)) / count)


def scale_fit(estimates: np.ndarray, mean: np.ndarray) -> tuple[float, float]:
    """Least-squares ĉ = Σ_m ⟨ḡ_m, μ_m⟩ / Σ_m ‖μ_m‖² and its jackknife se over repeats."""
    norm = float((mean**2).sum())
    num_repeats = estimates.shape[1]
    total = estimates.sum(1)
    c = float((total / num_repeats * mean).sum() / norm)
    dots = np.einsum("mrd,md->r", estimates, mean)
    loo = ((total * mean).sum() - dots) / ((num_repeats - 1) * norm)
    se = float(np.sqrt((num_repeats - 1) / num_repeats * ((loo - loo.mean()) ** 2).sum()))
    return c, se


def orthonormal_basis(vectors: np.ndarray, tol: float = 1e-9) -> np.ndarray:
    """Orthonormal rows spanning `vectors` [V, n] (near-dependent directions dropped). [k, n]."""
    vectors = np.asarray(vectors, np.float64)
    norms = np.linalg.norm(vectors, axis=1)
    vectors = vectors[norms > tol * max(norms.max(initial=0.0), 1e-300)]
    if not len(vectors):
        return np.zeros((0, vectors.shape[1]))
    q, r = np.linalg.qr(vectors.T)
    diag = np.abs(np.diag(r))
    return q[:, diag > tol * diag.max()].T


def projected(estimates: np.ndarray, mean: np.ndarray, mean_var: np.ndarray,
              basis: np.ndarray) -> float:
    """p-value of Hotelling's test (4) of E⟨ĝ − μ, u_i⟩ = 0 on the rows u_i of `basis` [k, M·d]."""
    count, num_repeats, dim = estimates.shape
    k = basis.shape[0]
    if k == 0 or num_repeats <= k:
        return 1.0
    flat = estimates.transpose(1, 0, 2).reshape(num_repeats, count * dim) - mean.reshape(-1)
    y = flat @ basis.T
    y_mean = y.mean(0)
    cov = np.atleast_2d(np.cov(y, rowvar=False)) / num_repeats + (basis * mean_var.reshape(-1)) @ basis.T
    scale = np.sqrt(np.clip(np.diag(cov), 1e-300, None))
    if np.all(np.abs(y_mean) <= 1e-12 * np.abs(flat).max(initial=1e-300)) and np.all(np.diag(cov) <= 1e-300):
        return 1.0
    corr = cov / np.outer(scale, scale)
    t2 = float((y_mean / scale) @ np.linalg.lstsq(corr, y_mean / scale, rcond=1e-12)[0])
    f = (num_repeats - k) * t2 / (k * (num_repeats - 1))
    return float(special.fdtrc(k, num_repeats - k, f))  # the F(k, R − k) survival function


def _test(name: str, label: str, estimates, mean, mean_var, basis, scale=None, scale_se=None) -> Test:
    distance, se = discrepancy(estimates, mean, mean_var)
    if se > 0:
        z = distance / se
        p_omnibus = float(special.ndtr(-z))
    else:  # the user's estimates and the candidate are both constant
        z, p_omnibus = (0.0, 1.0) if abs(distance) <= 1e-300 else (math.inf, 0.0)
    p_projected = projected(estimates, mean, mean_var, basis)
    p = min(1.0, 2 * min(p_omnibus, p_projected))
    return Test(name, label, distance, se, z, p_omnibus, p_projected, basis.shape[0], p, scale,
                scale_se)


def holm(p_values: Sequence[float], alpha: float) -> tuple[list[bool], list[float]]:
    """Holm's step-down rule through `gmrl.stats.holm_adjust` (kept for callers; `diagnose` no
    longer uses it): reject where the adjusted p-value is ≤ α (the same as rejecting p_(i) while
    p_(i) ≤ α/(m − i), sorted ascending).

    Returns (rejected, threshold α/(m − i) per hypothesis)."""
    adjusted = stats.holm_adjust(p_values)
    count = len(p_values)
    thresholds = np.empty(count)
    thresholds[np.argsort(p_values, kind="stable")] = alpha / (count - np.arange(count))
    return [bool(p <= alpha) for p in adjusted], [float(t) for t in thresholds]


def look_level(alpha: float, look: int | None) -> float:
    """The level of every test at look j of the sequential rule: α_j = α/(j(j+1)), so that
    Σ_{j≥1} α_j = α however many looks are taken; look None: α (one fixed-sample look)."""
    if look is None:
        return float(alpha)
    require(isinstance(look, int) and look >= 1, f"look must be an integer >= 1, got {look!r}")
    return float(alpha) / (look * (look + 1))


def _scaled_fit(t: Test, z: float) -> bool:
    """A scaled hypothesis names `scaled` when ĉ ± z·se excludes 1 (else it is the unscaled
    explanation) and 0 (else it is a zero expectation, e.g. LIRPG's first-order)."""
    return abs(t.scale - 1.0) > z * t.scale_se and abs(t.scale) > z * t.scale_se


def consistent_labels(tests: Sequence[Test], level: float) -> tuple[str, ...]:
    """The labels no test rules out, best p first: the label of every unscaled hypothesis not
    rejected, and `scaled` when a scaled hypothesis is not rejected and its c's two-sided interval
    at `level` excludes 1 and 0 (a c indistinguishable from 1 is the unscaled explanation; from 0,
    a zero expectation)."""
    z = float(-special.ndtri(level / 2))
    out: list[str] = []
    for t in sorted(tests, key=lambda t: (-t.p, -t.p_projected, t.z)):
        if t.rejected:
            continue
        if t.scale is None:
            label = t.label
        elif _scaled_fit(t, z):
            label = "scaled"
        else:
            continue
        if label not in out:
            out.append(label)
    return tuple(out)


def diagnose(estimates: np.ndarray, means: np.ndarray, mean_vars: np.ndarray,
             names: Sequence[str], labels: Sequence[str], alpha: float = 0.05,
             notes: Sequence[str] = (), unit: str = "MDP", look: int | None = None) -> Diagnosis:
    """Test the user's estimates [M, R, d] against each candidate mean [M, V, d] (variances of the
    means [M, V, d]; `names`/`labels` per candidate), unscaled and scaled, each at the level
    `look_level(alpha, look)`; the label is decisive only when one label is consistent, else
    `undetermined` (several) or `unexplained` (none). `unit`: what the M items are (MDP; a
    parameter point for `check_lola`)."""
    estimates = np.asarray(estimates, np.float64)
    level = look_level(alpha, look)
    flat_means = means.transpose(1, 0, 2).reshape(means.shape[1], -1)  # [V, M·d]
    span = orthonormal_basis(flat_means)
    tests: list[Test] = []
    for v, (name, label) in enumerate(zip(names, labels, strict=True)):
        tests.append(_test(name, label, estimates, means[:, v], mean_vars[:, v], span))
    for v, (name, label) in enumerate(zip(names, labels, strict=True)):
        mu = flat_means[v]
        norm = float(mu @ mu)
        if norm <= 0:
            continue  # a zero expectation (LIRPG's first-order) has no scaled version
        others = np.delete(flat_means, v, axis=0)
        complement = orthonormal_basis(others - np.outer(others @ mu / norm, mu))
        c, c_se = scale_fit(estimates, means[:, v])
        tests.append(_test(name, label, estimates, c * means[:, v], c**2 * mean_vars[:, v],
                           complement, c, c_se))
    tests = [dataclasses.replace(t, rejected=t.p <= level, threshold=level) for t in tests]
    when = "one fixed-sample look" if look is None else f"look {look}: α/(j(j+1)) with α = {alpha:g}"
    rule = (f"every hypothesis (each candidate unscaled and scaled) tested at level {level:.3g} "
            f"({when}); a label is decisive when it is the only one not rejected, so it is wrong "
            "only if the true explanation's own test rejected it; each hypothesis' p = 2·min of an "
            "omnibus z-test of D = ‖E ĝ − μ‖²/d = 0 and a Hotelling T² test on the candidates' span")
    plain = [t for t in tests if t.scale is None]
    kept = tuple(t for t in tests if not t.rejected)
    dropped = tuple(sorted((t for t in tests if t.rejected), key=lambda t: -t.p))
    consistent = consistent_labels(tests, level)
    extra = {"labels": consistent, "level": level, "look": look}
    z = float(-special.ndtri(level / 2))

    def rank(t: Test):
        return (t.p, t.p_projected, -t.z)

    survivors = [t for t in plain if not t.rejected]
    fits = [t for t in tests if t.scale is not None and not t.rejected and _scaled_fit(t, z)]
    if len(consistent) == 1 and consistent[0] != "scaled":
        best = max(survivors, key=rank)
        message = f"{best.label}: consistent with {best.candidate} ({best.describe()}) and no other label"
        return Diagnosis(best.label, best, kept, dropped, (), None, None, rule, message,
                         tuple(notes), **extra)
    if consistent == ("scaled",):
        best = max(fits, key=rank)
        low, high = best.scale_ci
        bases = sorted({t.label for t in fits} - {best.label})
        message = (f"scaled: {best.scale:.3g} (95% CI {low:.3g} to {high:.3g}) times the "
                   f"{best.label} expectation ({best.candidate}); every unscaled explanation "
                   "is rejected" + (f" (scaled {', '.join(bases)} fits too)" if bases else ""))
        return Diagnosis("scaled", best, kept, dropped, (), None, None, rule, message, tuple(notes),
                         **extra)
    if consistent:
        best = max(survivors, key=rank) if survivors else max(fits, key=rank)
        others = {}
        for t in sorted(survivors, key=lambda t: -t.p):
            if t.label != best.label:
                others.setdefault(t.label, t)
        needed = None
        if others:
            needed = _repeats_needed(best, list(others.values()), estimates, means, mean_vars,
                                     names, level)
        message = (f"undetermined: consistent with {', '.join(consistent)} (best {best.describe()})"
                   + ("" if not others else
                      f" — about {needed} repeats per {unit} would tell them apart" if needed else
                      " — some of their expectations are identical on these tasks"))
        return Diagnosis("undetermined", best, kept, dropped, consistent, needed, None, rule,
                         message, tuple(notes), **extra)
    best = max(plain, key=lambda t: (t.p, -t.z))
    remaining = (best.distance, best.distance - Z95 * best.se, best.distance + Z95 * best.se)
    message = (f"unexplained: every candidate is rejected; the nearest is {best.candidate} with a "
               f"remaining squared bias per coordinate of {remaining[0]:.3g} "
               f"(95% CI {remaining[1]:.3g} to {remaining[2]:.3g}, z = {best.z:.1f})")
    return Diagnosis("unexplained", best, kept, dropped, (), None, remaining, rule, message,
                     tuple(notes), **extra)


def _repeats_needed(best: Test, others: list[Test], estimates, means, mean_vars, names,
                    level: float) -> int | None:
    """Repeats per MDP at which the projection on δ = μ_best − μ_other would tell them apart with
    90% power: ‖δ‖² ≥ (z_{level/2} + z_0.9) sd(⟨ĝ, δ⟩)/√R, sd from the user's repeats. None when the
    expectations are indistinguishable from Monte-Carlo noise."""
    z = -special.ndtri(level / 2) + POWER_Z
    count, num_repeats, _ = estimates.shape
    flat = estimates.transpose(1, 0, 2).reshape(num_repeats, -1)
    a = list(names).index(best.candidate)
    needed = 0
    for other in others:
        b = list(names).index(other.candidate)
        delta = (means[:, a] - means[:, b]).reshape(-1)
        noise = (mean_vars[:, a] + mean_vars[:, b]).reshape(-1)
        separation = float(delta @ delta)
        if separation <= 3 * np.sqrt(float(4 * (delta**2 * noise).sum() + 2 * (noise**2).sum())):
            return None
        sd = float(np.std(flat @ delta, ddof=1))
        needed = max(needed, math.ceil((z * sd / separation) ** 2))
    return max(needed, num_repeats + 1)
