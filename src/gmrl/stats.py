"""Statistics of repeated meta-gradient estimates against the exact one (docs/design.md, statistics).

Shapes: `estimates` is [R, d] (R repeated estimates of a d-dimensional gradient) or [M, R, d] for M
MDPs; `truth` is [d] or [M, d]. All figures are computed in float64 with numpy.
The first three are the reference study's (Liu, Feng et al. 2022, "A Theoretical Understanding of
Gradient Bias in Meta-Reinforcement Learning", §5): corr ("angular accuracy"),
std_sum ("variance") and mse_of_mean ("bias", which still contains Var/R). bias2 is the unbiased
estimate of the squared bias per coordinate, ‖E ĝ − g*‖²/d, from cross-fitted batch means with a
t interval; relative_bias its square root over ‖g*‖. Tests and intervals (welch, paired, mean_ci,
detectable_difference, equivalence) share one vocabulary: Z95 and t_quantile(df) (df = inf: normal).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from gmrl.errors import require


def _scipy():
    """scipy.stats, imported on first use (it costs half a second: `gmrl --help` never needs it)."""
    from scipy import stats

    return stats

Z95 = 1.959963984540054
"""The 0.975 quantile of the standard normal: the one z of gmrl's 95% intervals."""

BATCHES = 5
"""Batches of repeats behind bias2's interval (see `bias2`)."""


def t_quantile(df, level: float = 0.95):
    """Two-sided `level` quantile of Student's t with `df` degrees of freedom (Z95 at df = inf)."""
    df = np.asarray(df, np.float64)
    return np.where(np.isinf(df), _scipy().norm.ppf(0.5 + level / 2),
                    _scipy().t.ppf(0.5 + level / 2, np.where(np.isinf(df), 1.0, df)))


def _validated(estimates, truth) -> tuple[np.ndarray, np.ndarray]:
    estimates = np.asarray(estimates, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    require(estimates.ndim >= 2, f"estimates must be [R, d] or [M, R, d], got shape {estimates.shape}")
    require(truth.shape == estimates.shape[:-2] + estimates.shape[-1:],
            f"truth shape {truth.shape} does not match estimates shape {estimates.shape} "
            "(expected [d] for [R, d], or [M, d] for [M, R, d])")
    require(bool(np.all(np.isfinite(estimates))), "estimates contain NaN or infinity")
    require(bool(np.all(np.isfinite(truth))), "the exact meta-gradient contains NaN or infinity")
    return estimates, truth


def corr(estimates, truth) -> np.ndarray:
    """Mean over repeats of the Pearson correlation across coordinates between ĝ_r and g*. [...]"""
    estimates, truth = _validated(estimates, truth)
    e = estimates - estimates.mean(-1, keepdims=True)
    t = (truth - truth.mean(-1, keepdims=True))[..., None, :]
    denom = np.linalg.norm(e, axis=-1) * np.linalg.norm(t, axis=-1)
    return np.mean(np.sum(e * t, -1) / np.where(denom > 0, denom, np.nan), axis=-1)


def std_sum(estimates, truth=None) -> np.ndarray:
    """Σ_coords std_r(ĝ) with the ddof = 1 standard deviation (the reference code's `torch.std`). [...]"""
    return np.asarray(estimates, np.float64).std(axis=-2, ddof=1).sum(-1)


def mse_of_mean(estimates, truth) -> np.ndarray:
    """mean_coords (ḡ − g*)², ḡ the mean over repeats. Contains tr(Cov)/(R d). [...]"""
    estimates, truth = _validated(estimates, truth)
    return np.mean((estimates.mean(-2) - truth) ** 2, axis=-1)


def variance(estimates, truth=None) -> np.ndarray:
    """tr(Cov)/d with the unbiased (ddof = 1) covariance over repeats. [...]"""
    return np.asarray(estimates, np.float64).var(axis=-2, ddof=1).mean(-1)


class Bias2(NamedTuple):
    """Unbiased squared-bias estimate per coordinate, its standard error and the t degrees of freedom."""

    value: np.ndarray
    se: np.ndarray
    df: np.ndarray | float = float("inf")

    @property
    def ci(self) -> tuple[np.ndarray, np.ndarray]:
        """95% confidence interval value ∓ t_{0.975, df} · se."""
        half = t_quantile(self.df) * self.se
        return self.value - half, self.value + half


def _pair_u(x: np.ndarray) -> np.ndarray:
    """Σ_{r≠s} ⟨x_r, x_s⟩ / (n(n−1)d) over axis −2 of x [..., n, d]: unbiased for ‖E x‖²/d."""
    n, dim = x.shape[-2], x.shape[-1]
    s1 = x.sum(-2)
    return ((s1**2).sum(-1) - (x**2).sum((-2, -1))) / (n * (n - 1) * dim)


def bias2(estimates, truth, batches: int = BATCHES) -> Bias2:
    """Unbiased estimate of ‖E ĝ − g*‖²/d from cross-fitted batch means, with a t interval.

    The R repeats are cut into B = min(`batches`, R) consecutive batches with means m_b of
    x_r = ĝ_r − g*; the estimate is the U-statistic over pairs of different batches,
    Σ_{b≠c} ⟨m_b, m_c⟩ / (B(B−1)d) (no product of a batch with itself, so no noise term to
    subtract), its standard error the delete-a-batch jackknife, and the interval Student's t with
    B − 1 degrees of freedom (batch means; e.g. Schmeiser 1982). Why not the delete-one jackknife
    of the all-pairs U-statistic: gmrl's estimates vary along few directions, so that se moves with
    the estimate itself (correlation ≈ 0.9) and its normal interval covered 82% pooled, 88% per MDP
    on `maml` `lee` (benchmarks/coverage.py); B = 5 batches cover 97% there (worst MDP 94%) and stay
    conservative on Gaussian noise, at about 1.6× the old width.
    Shapes: [R, d] / [d] or [M, R, d] / [M, d]. Needs R ≥ 3.
    """
    estimates, truth = _validated(estimates, truth)
    value, loo = _batch_u(estimates, truth, batches)
    return Bias2(value, _jackknife_se(loo), float(loo.shape[-1] - 1))


def _batch_u(estimates: np.ndarray, truth: np.ndarray, batches: int) -> tuple[np.ndarray, np.ndarray]:
    """bias2's batch-pair U-statistic [...] and its delete-a-batch values [..., B] (see `bias2`)."""
    num_repeats, dim = estimates.shape[-2], estimates.shape[-1]
    require(num_repeats >= 3, f"bias2 needs at least 3 repeats, got {num_repeats}")
    require(isinstance(batches, int) and batches >= 3, f"bias2 needs at least 3 batches, got {batches}")
    count = min(batches, num_repeats)
    x = estimates - truth[..., None, :]
    means = np.stack([part.mean(-2) for part in np.array_split(x, count, axis=-2)], -2)  # [..., B, d]
    total = means.sum(-2, keepdims=True)
    squares = (means**2).sum(-1)
    loo = (((total - means) ** 2).sum(-1) - (squares.sum(-1, keepdims=True) - squares)) / (
        (count - 1) * (count - 2) * dim)
    return _pair_u(means), loo


def _jackknife_se(loo: np.ndarray) -> np.ndarray:
    count = loo.shape[-1]
    return np.sqrt((count - 1) / count * ((loo - loo.mean(-1, keepdims=True)) ** 2).sum(-1))


def bias2_difference(estimates_a, truth_a, estimates_b, truth_b, batches: int = BATCHES) -> Bias2:
    """bias2(a) − bias2(b) for two points whose repeats share PRNG keys (repeat r of a and of b
    from the same key: common random numbers), with the delete-a-batch jackknife of the difference
    itself, so what the pair shares cancels (never larger than hypot(se_a, se_b) in expectation
    when the two are positively correlated). Same shapes as `bias2`, a and b alike."""
    estimates_a, truth_a = _validated(estimates_a, truth_a)
    estimates_b, truth_b = _validated(estimates_b, truth_b)
    require(estimates_a.shape[:-1] == estimates_b.shape[:-1],
            f"paired points need the same MDPs and repeats, got {estimates_a.shape} and {estimates_b.shape}")
    value_a, loo_a = _batch_u(estimates_a, truth_a, batches)
    value_b, loo_b = _batch_u(estimates_b, truth_b, batches)
    return Bias2(value_a - value_b, _jackknife_se(loo_a - loo_b), float(loo_a.shape[-1] - 1))


def relative_bias(b2_value, b2_low, b2_high, truth) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """‖E ĝ − g*‖/‖g*‖ = sqrt(d · bias2 / ‖g*‖²) and its CI, the bias2 CI mapped through the same
    monotone map (negative ends clipped to 0). truth [..., d]. Returns (value, low, high)."""
    scale = np.mean(np.asarray(truth, np.float64) ** 2, -1)
    scale = np.where(scale > 0, scale, np.nan)
    return tuple(np.sqrt(np.maximum(np.asarray(v, np.float64), 0.0) / scale)
                 for v in (b2_value, b2_low, b2_high))


def summarize(estimates, truth) -> dict[str, np.ndarray | float | int]:
    """All figures for [M, R, d] estimates: per-MDP arrays and their means over MDPs.

    Per MDP: corr, std_sum, mse_of_mean, variance, bias2 with se, df and 95% CI, relative bias
    ‖E ĝ − g*‖/‖g*‖ with its CI. Pooled: means over MDPs; the pooled bias2's se is sqrt(Σ se_m²)/M
    (conditional on these M MDPs) with Welch–Satterthwaite degrees of freedom; the pooled relative
    bias is sqrt(mean bias2 / mean g*²) with the pooled CI mapped likewise; `significant_mdps`
    counts the MDPs whose own bias2 CI lies above 0.
    """
    estimates, truth = _validated(estimates, truth)
    if estimates.ndim == 2:
        estimates, truth = estimates[None], truth[None]
    b = bias2(estimates, truth)
    low, high = b.ci
    rel, rel_low, rel_high = relative_bias(b.value, low, high, truth)
    per_mdp = {
        "corr": corr(estimates, truth),
        "std_sum": std_sum(estimates),
        "mse_of_mean": mse_of_mean(estimates, truth),
        "bias2": b.value,
        "bias2_se": b.se,
        "bias2_ci_low": low,
        "bias2_ci_high": high,
        "rel_bias": rel,
        "rel_bias_ci_low": rel_low,
        "rel_bias_ci_high": rel_high,
        "variance": variance(estimates),
    }
    num_mdps = estimates.shape[0]
    out: dict[str, np.ndarray | float | int] = {
        k: float(np.mean(per_mdp[k])) for k in ("corr", "std_sum", "mse_of_mean", "bias2", "variance")}
    pooled = Bias2(out["bias2"], float(np.sqrt(np.sum(b.se**2)) / num_mdps),
                   welch_satterthwaite(b.se, b.df))
    pooled_low, pooled_high = (float(v) for v in pooled.ci)
    rel_pooled = relative_bias(pooled.value, pooled_low, pooled_high, truth.reshape(-1))
    out.update(
        bias2_se=pooled.se,
        bias2_df=pooled.df,
        bias2_ci_low=pooled_low,
        bias2_ci_high=pooled_high,
        rel_bias=float(rel_pooled[0]),
        rel_bias_ci_low=float(rel_pooled[1]),
        rel_bias_ci_high=float(rel_pooled[2]),
        significant_mdps=int(np.sum(low > 0)),
        num_mdps=num_mdps,
        num_repeats=int(estimates.shape[1]),
        per_mdp=per_mdp,
    )
    return out


def welch_satterthwaite(se, df) -> float:
    """Degrees of freedom of Σ_i se_i² with se_i² on df_i degrees of freedom (Satterthwaite 1946):
    (Σ se_i²)² / Σ (se_i⁴ / df_i). inf when every se is 0."""
    se = np.asarray(se, np.float64).reshape(-1)
    df = np.broadcast_to(np.asarray(df, np.float64), se.shape)
    total, spread = float(np.sum(se**2)), float(np.sum(se**4 / df))
    return float("inf") if spread == 0.0 else total**2 / spread


def mean_ci(samples, axis: int = 0, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Mean and Student-t confidence half-width along `axis` (e.g. over seeds). Returns (mean, hw)."""
    samples = np.asarray(samples, np.float64)
    n = samples.shape[axis]
    require(n >= 2, f"a confidence interval needs at least 2 samples along axis {axis}, got {n}")
    sem = samples.std(axis=axis, ddof=1) / np.sqrt(n)
    return samples.mean(axis=axis), t_quantile(n - 1, level) * sem


def fit_power_law(x, y, y_se) -> tuple[float, float]:
    """Slope a of y ≈ c·x^a by weighted least squares on logs; returns (a, se of a).

    Weights 1/se(log y)², se(log y) = y_se / y (delta method); needs y > 0 and ≥ 2 distinct x
    (with 2 points the se is from the weights alone).
    """
    x, y, y_se = (np.asarray(v, np.float64) for v in (x, y, y_se))
    require(x.shape == y.shape == y_se.shape and x.ndim == 1, "x, y, y_se must be 1-D, same length")
    require(bool(np.all(x > 0) and np.all(y > 0) and np.all(y_se > 0)),
            "a power-law fit needs x > 0, y > 0 and y_se > 0")
    require(len(np.unique(x)) >= 2, "a power-law fit needs at least 2 distinct x")
    lx, ly, w = np.log(x), np.log(y), (y / y_se) ** 2
    design = np.stack([np.ones_like(lx), lx], axis=1)
    cov = np.linalg.inv(design.T @ (design * w[:, None]))
    coef = cov @ design.T @ (w * ly)
    return float(coef[1]), float(np.sqrt(cov[1, 1]))


def welch(a, b, level: float = 0.95) -> dict[str, float]:
    """Difference of means a − b with Welch's t-test (unequal variances; Welch 1947).

    a, b: 1-D samples (e.g. one value per seed), at least 2 each. Returns {"diff", "hw" (the
    `level` half-width of the difference), "se", "df", "p" (two-sided)}.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    require(a.ndim == b.ndim == 1 and len(a) >= 2 and len(b) >= 2,
            "Welch's test needs two 1-D samples of at least 2 values")
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = float(np.sqrt(va + vb))
    diff = float(a.mean() - b.mean())
    if se == 0.0:
        return {"diff": diff, "hw": 0.0, "se": 0.0, "df": float("inf"),
                "p": 1.0 if diff == 0.0 else 0.0}
    df = float((va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)))
    t = diff / se
    return {"diff": diff, "hw": float(t_quantile(df, level) * se), "se": se,
            "df": df, "p": float(2 * _scipy().t.sf(abs(t), df))}


def holm_adjust(p_values) -> np.ndarray:
    """Holm's step-down adjusted p-values (Holm 1979): p̃_(i) = max_{j≤i} min(1, (m − j) p_(j)),
    p sorted ascending (j from 0); reject where p̃ ≤ α. [m] -> [m]."""
    p = np.asarray(p_values, np.float64)
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, (len(p) - np.arange(len(p))) * p[order])
    adjusted = np.empty_like(p)
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted


def verdict(diff: float, p: float, alpha: float = 0.05, what: str = "the final return") -> str:
    """A two-sided test's verdict on a difference (p e.g. Holm-adjusted): "raises WHAT" or
    "lowers WHAT" where p ≤ α, else "no significant change in WHAT"."""
    if p <= alpha:
        return f"{'raises' if diff > 0 else 'lowers'} {what}"
    return f"no significant change in {what}"


def detectable_difference(se: float, tests: int = 1, alpha: float = 0.05, power: float = 0.8,
                          df: float = float("inf")) -> float:
    """Smallest true difference δ a two-sided t-test at level α/`tests` (Bonferroni, the strictest
    step of Holm's rule) with `df` degrees of freedom (e.g. Welch's) detects with probability
    `power`, given the standard error of the difference: the δ/se at which the noncentral t with
    noncentrality δ/se exceeds the critical t_{1−α/(2m), df} in absolute value with that probability
    (Cohen 1988). df = inf gives the normal (z_{1−α/(2m)} + z_power)·se up to the far tail."""
    require(se >= 0 and df > 0 and 0 < power < 1,
            "detectable_difference needs se >= 0, df > 0 and 0 < power < 1")
    if se == 0:
        return 0.0
    st = _scipy()
    crit = float(t_quantile(df, 1 - alpha / tests))
    if np.isinf(df):
        def reach(ncp):
            return st.norm.sf(crit - ncp) + st.norm.cdf(-crit - ncp) - power
    else:
        def reach(ncp):  # the far tail P(T < −crit) = P(T > crit | −ncp); scipy's nct.cdf can be NaN there
            far = float(st.nct.sf(crit, df, -ncp))
            return st.nct.sf(crit, df, ncp) + (far if np.isfinite(far) else 0.0) - power
    high = crit + 1.0
    while reach(high) < 0:
        high *= 2
    from scipy.optimize import brentq

    return float(brentq(reach, 0.0, high, xtol=1e-12) * se)


def paired(a, b, level: float = 0.95) -> dict[str, float]:
    """Mean difference of paired samples a − b (points sharing keys or seeds) with a t interval.

    a, b: 1-D, same length n ≥ 2, element i of both from the same seed. The differences
    d_i = a_i − b_i cancel what the pair shares (common random numbers). Returns {"diff", "hw"
    (the `level` half-width), "se", "df" (n − 1), "p" (two-sided)}, as `welch`.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    require(a.ndim == b.ndim == 1 and a.shape == b.shape and len(a) >= 2,
            "a paired test needs two 1-D samples of the same length, at least 2")
    d = a - b
    diff, se, df = float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d))), float(len(d) - 1)
    if se == 0.0:
        return {"diff": diff, "hw": 0.0, "se": 0.0, "df": df, "p": 1.0 if diff == 0.0 else 0.0}
    return {"diff": diff, "hw": float(t_quantile(df, level) * se), "se": se, "df": df,
            "p": float(2 * _scipy().t.sf(abs(diff / se), df))}


def equivalence(estimate, se, df, margin, alpha: float = 0.05) -> dict:
    """Two one-sided tests (TOST; Schuirmann 1987) of |true value| < `margin`.

    Equivalence is declared when both one-sided t-tests at level α reject, i.e. when the (1 − 2α)
    t interval estimate ∓ t_{1−α, df}·se lies inside (−margin, margin). Scalars or arrays that
    broadcast. Returns {"equivalent", "p" (the larger one-sided p), "low", "high" (that interval),
    "margin"}; floats for scalar input.
    """
    estimate, se, df, margin = (np.asarray(v, np.float64) for v in (estimate, se, df, margin))
    require(bool(np.all(margin > 0)), f"an equivalence margin must be > 0, got {margin}")
    require(bool(np.all(se >= 0) and np.all(df > 0)), "equivalence needs se >= 0 and df > 0")
    st = _scipy()
    safe = np.where(se > 0, se, 1.0)
    finite_df = np.where(np.isinf(df), 1.0, df)

    def sf(t):  # Student's t upper tail, the normal one at df = inf
        return np.where(np.isinf(df), st.norm.sf(t), st.t.sf(t, finite_df))

    p = np.maximum(sf((estimate + margin) / safe), sf((margin - estimate) / safe))
    p = np.where(se > 0, p, np.where(np.abs(estimate) < margin, 0.0, 1.0))
    half = t_quantile(df, 1 - 2 * alpha) * se
    out = {"equivalent": p <= alpha, "p": p, "low": estimate - half, "high": estimate + half,
           "margin": margin}
    return {k: (v.item() if np.ndim(v) == 0 else v) for k, v in out.items()}
