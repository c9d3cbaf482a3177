"""Statistical assertions with tolerances from standard errors (fixed PRNG keys, so deterministic)."""

import numpy as np
from scipy import stats


def z_scores(samples, truth):
    """Per-coordinate z of the sample mean against `truth`: samples [n, ...], truth [...]."""
    samples = np.asarray(samples, np.float64).reshape(len(samples), -1)
    truth = np.asarray(truth, np.float64).reshape(-1)
    se = samples.std(0, ddof=1) / np.sqrt(len(samples))
    diff = samples.mean(0) - truth
    # Coordinates with zero variance must match exactly (e.g. structurally zero Hessian entries).
    return np.where(se > 0, diff / np.where(se > 0, se, 1.0), np.where(np.abs(diff) < 1e-12, 0.0, np.inf))


def bonferroni_threshold(num_coordinates, family_level=1e-3):
    """|z| bound that all coordinates of an unbiased estimator stay under with prob. 1 − level."""
    return float(stats.norm.ppf(1 - family_level / (2 * num_coordinates)))


def assert_unbiased(samples, truth):
    z = z_scores(samples, truth)
    bound = bonferroni_threshold(z.size)
    assert np.max(np.abs(z)) < bound, f"max |z| = {np.max(np.abs(z)):.2f} >= {bound:.2f}"


def assert_biased(samples, truth, min_z=8.0):
    """Some coordinate with sampling variance has |z| > min_z. Entries with zero variance (|z| = ∞
    when a surrogate structurally zeroes an entry the truth has) are left out: a block-diagonal
    Hessian would pass on those alone."""
    z = z_scores(samples, truth)
    finite = z[np.isfinite(z)]
    assert finite.size > 0, "no coordinate has sampling variance"
    worst = np.max(np.abs(finite))
    assert worst > min_z, f"bias not significant: max finite |z| = {worst:.2f}"
