"""Statistics of repeated meta-gradient estimates against the exact one (docs/design.md, statistics).

Shapes: `estimates` is [R, d] (R repeated estimates of a d-dimensional gradient) or [M, R, d] for M
MDPs; `truth` is [d] or [M, d]. All figures are computed in float64 with numpy.
The first three are the reference study's (Liu, Feng et al. 2022, "A Theoretical Understanding of
Gradient Bias in Meta-Reinforcement Learning", §5): corr ("angular accuracy"),
std_sum ("variance") and mse_of_mean ("bias", which still contains Var/R). bias2 is the unbiased
estimate of the squared bias per coordinate, ‖E ĝ − g*‖²/d, with a jackknife standard error.
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
    """Unbiased squared-bias estimate per coordinate and its jackknife standard error."""

    value: np.ndarray
    se: np.ndarray

    @property
    def ci(self) -> tuple[np.ndarray, np.ndarray]:
        """Normal 95% confidence interval (value ∓ 1.96 se)."""
        return self.value - Z95 * self.se, self.value + Z95 * self.se


def bias2(estimates, truth) -> Bias2:
    """‖ḡ − g*‖²/d − tr(Cov)/(R d), an unbiased estimate of ‖E ĝ − g*‖²/d, with jackknife se.

    With x_r = ĝ_r − g*, S1 = Σ_r x_r and S2 = Σ_r ‖x_r‖², the estimate equals the U-statistic
    (‖S1‖² − S2)/(R(R−1)d); its leave-one-out values give the jackknife standard error, which is
    conservative (Efron–Stein: never too small in expectation; up to ~1.4x when noise dominates).
    Needs R ≥ 3.
    """
    estimates, truth = _validated(estimates, truth)
    num_repeats, dim = estimates.shape[-2], estimates.shape[-1]
    require(num_repeats >= 3, f"bias2 needs at least 3 repeats, got {num_repeats}")
    x = estimates - truth[..., None, :]
    s1 = x.sum(-2)
    s2 = (x**2).sum((-2, -1))
    value = ((s1**2).sum(-1) - s2) / (num_repeats * (num_repeats - 1) * dim)
    s1_loo = s1[..., None, :] - x
    s2_loo = s2[..., None] - (x**2).sum(-1)
    loo = ((s1_loo**2).sum(-1) - s2_loo) / ((num_repeats - 1) * (num_repeats - 2) * dim)
    se = np.sqrt((num_repeats - 1) / num_repeats * ((loo - loo.mean(-1, keepdims=True)) ** 2).sum(-1))
    return Bias2(value, se)


def summarize(estimates, truth) -> dict[str, np.ndarray | float | int]:
    """All figures for [M, R, d] estimates: per-MDP arrays and their means over MDPs.

    The pooled bias2 is the mean over MDPs; its se combines the per-MDP jackknife errors,
    sqrt(Σ se_m²)/M, i.e. it is conditional on these M MDPs.
    """
    estimates, truth = _validated(estimates, truth)
    if estimates.ndim == 2:
        estimates, truth = estimates[None], truth[None]
    b = bias2(estimates, truth)
    per_mdp = {
        "corr": corr(estimates, truth),
        "std_sum": std_sum(estimates),
        "mse_of_mean": mse_of_mean(estimates, truth),
        "bias2": b.value,
        "bias2_se": b.se,
        "variance": variance(estimates),
    }
    num_mdps = estimates.shape[0]
    pooled_se = float(np.sqrt(np.sum(b.se**2)) / num_mdps)
    pooled = float(np.mean(b.value))
    out: dict[str, np.ndarray | float | int] = {k: float(np.mean(v)) for k, v in per_mdp.items()}
    out.update(
        bias2_se=pooled_se,
        bias2_ci_low=pooled - Z95 * pooled_se,
        bias2_ci_high=pooled + Z95 * pooled_se,
        num_mdps=num_mdps,
        num_repeats=int(estimates.shape[1]),
        per_mdp=per_mdp,
    )
    return out


def mean_ci(samples, axis: int = 0, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Mean and Student-t confidence half-width along `axis` (e.g. over seeds). Returns (mean, hw)."""
    samples = np.asarray(samples, np.float64)
    n = samples.shape[axis]
    require(n >= 2, f"a confidence interval needs at least 2 samples along axis {axis}, got {n}")
    sem = samples.std(axis=axis, ddof=1) / np.sqrt(n)
    return samples.mean(axis=axis), _scipy().t.ppf(0.5 + level / 2, n - 1) * sem


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
    return {"diff": diff, "hw": float(_scipy().t.ppf(0.5 + level / 2, df) * se), "se": se,
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


def detectable_difference(se: float, tests: int = 1, alpha: float = 0.05,
                          power: float = 0.8) -> float:
    """Smallest true difference a two-sided z-test at level α/`tests` (Bonferroni, the strictest
    step of Holm's rule) detects with probability `power`, given the standard error of the
    difference: (z_{1−α/(2m)} + z_{power}) · se."""
    return float((_scipy().norm.ppf(1 - alpha / (2 * tests)) + _scipy().norm.ppf(power))
                 * se)
