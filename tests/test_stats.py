"""The statistics of docs/design.md on synthetic estimates with known bias and variance."""

import numpy as np
import pytest

from gmrl import stats
from gmrl.errors import InputError


def synthetic(bias, sigma, repeats, dim=50, mdps=200, seed=0):
    rng = np.random.default_rng(seed)
    truth = rng.normal(size=(mdps, dim))
    estimates = truth[:, None] + bias + sigma * rng.normal(size=(mdps, repeats, dim))
    return estimates, truth


def test_bias2_is_unbiased_and_its_standard_error_is_calibrated():
    estimates, truth = synthetic(bias=0.1, sigma=1.0, repeats=10)
    b = stats.bias2(estimates, truth)
    # Per MDP: E[bias2] = 0.01 whatever the noise; mse_of_mean adds sigma²/R = 0.1.
    z = (b.value.mean() - 0.01) / (b.value.std(ddof=1) / np.sqrt(len(b.value)))
    assert abs(z) < 4
    assert stats.mse_of_mean(estimates, truth).mean() == pytest.approx(0.11, rel=0.05)
    # The jackknife se is conservative (Efron–Stein): never below the true spread of bias2 across
    # independent replications, at most ~1.5x it here; the 95% CI covers the truth at least 95%.
    spread = b.value.std(ddof=1)
    assert 0.95 * spread <= b.se.mean() <= 1.6 * spread
    coverage = np.mean((b.ci[0] <= 0.01) & (0.01 <= b.ci[1]))
    assert coverage >= 0.95


def test_bias2_is_centred_on_zero_for_unbiased_estimates():
    estimates, truth = synthetic(bias=0.0, sigma=2.0, repeats=20)
    s = stats.summarize(estimates, truth)
    assert s["bias2_ci_low"] < 0 < s["bias2_ci_high"]
    assert abs(s["bias2"] / s["bias2_se"]) < 4
    assert s["variance"] == pytest.approx(4.0, rel=0.02)
    assert s["num_mdps"] == 200 and s["num_repeats"] == 20


def test_corr_and_std_sum():
    truth = np.array([1.0, 2.0, 3.0, 4.0])
    same = np.stack([truth * 2 + 1] * 3)
    assert stats.corr(same, truth) == pytest.approx(1.0)
    assert stats.corr(-same, truth) == pytest.approx(-1.0)
    assert stats.std_sum(same) == pytest.approx(0.0)
    assert stats.std_sum(np.array([[0.0, 1.0], [2.0, 1.0]])) == pytest.approx(np.sqrt(2.0))  # ddof 1


def test_mean_ci():
    mean, half = stats.mean_ci(np.array([1.0, 2.0, 3.0]))
    assert mean == 2.0 and half == pytest.approx(4.302652729911275 * 1 / np.sqrt(3))


def test_bad_inputs():
    with pytest.raises(InputError, match="does not match"):
        stats.bias2(np.zeros((5, 3)), np.zeros(4))
    with pytest.raises(InputError, match="at least 3 repeats"):
        stats.bias2(np.zeros((2, 3)), np.zeros(3))
    with pytest.raises(InputError, match="NaN"):
        stats.summarize(np.full((4, 3), np.nan), np.zeros(3))


def test_std_sum_is_the_reference_var_a_sum_of_ddof_one_standard_deviations():
    """The reference's "var" is Σ_coords torch.std(ĝ) (unbiased, ddof 1): at R = 20 a ddof-0 sum
    reads sqrt(19/20), 2.5%, low."""
    x = np.random.default_rng(3).normal(size=(2, 20, 5))
    by_hand = np.sqrt(((x - x.mean(1, keepdims=True)) ** 2).sum(1) / 19).sum(-1)
    np.testing.assert_allclose(stats.std_sum(x), by_hand, rtol=1e-13)


def test_holm_adjusted_p_values_step_down():
    # sorted 0.005, 0.01, 0.03, 0.04 -> ×4, ×3, ×2, ×1 = 0.02, 0.03, 0.06, 0.04 -> running max
    got = stats.holm_adjust([0.01, 0.04, 0.03, 0.005])
    np.testing.assert_allclose(got, [0.03, 0.06, 0.06, 0.02])
    assert np.all(stats.holm_adjust([0.5, 0.9]) <= 1.0)


def test_welch_matches_scipy_and_the_detectable_difference_has_its_power():
    from scipy import stats as scipy_stats

    rng = np.random.default_rng(0)
    a, b = rng.normal(0.3, 1.0, 12), rng.normal(0.0, 2.0, 9)
    got = stats.welch(a, b)
    want = scipy_stats.ttest_ind(a, b, equal_var=False)
    np.testing.assert_allclose(got["p"], want.pvalue, rtol=1e-10)
    np.testing.assert_allclose(got["diff"], a.mean() - b.mean())
    # a true difference equal to the detectable one is found in ≈ 80% of studies (z-test)
    se, tests = 0.1, 4
    delta = stats.detectable_difference(se, tests)
    z = scipy_stats.norm.ppf(1 - 0.05 / (2 * tests))
    assert abs(scipy_stats.norm.sf(z - delta / se) - 0.8) < 1e-9
