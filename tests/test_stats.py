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
    # at df = inf: a true difference equal to the detectable one is found in 80% of z-tests
    se, tests = 0.1, 4
    delta = stats.detectable_difference(se, tests)
    z = scipy_stats.norm.ppf(1 - 0.05 / (2 * tests))
    power = scipy_stats.norm.sf(z - delta / se) + scipy_stats.norm.cdf(-z - delta / se)
    assert abs(power - 0.8) < 1e-9


@pytest.mark.parametrize("pairs", [3, 5])
def test_detectable_difference_has_80_percent_power_at_its_degrees_of_freedom(pairs):
    """Simulated studies of `pairs` paired seeds (the MGRL study has 5) with a true difference
    equal to the quoted detectable one: the paired t-test at 5% rejects in 80% of them (binomial
    se 0.3%). The normal-quantile formula quoted a difference detected only 35% (3) / 56% (5)."""
    from scipy import stats as scipy_stats

    sims, sigma = 20000, 0.7
    delta = stats.detectable_difference(sigma / np.sqrt(pairs), df=pairs - 1)
    diffs = np.random.default_rng(pairs).normal(delta, sigma, (sims, pairs))
    p = scipy_stats.ttest_1samp(diffs, 0.0, axis=1).pvalue
    assert abs(np.mean(p <= 0.05) - 0.8) < 4 * np.sqrt(0.16 / sims)
    one = stats.paired(diffs[0] + 1.0, np.ones(pairs))  # the paired helper's p is the same test's
    np.testing.assert_allclose(one["p"], p[0], rtol=1e-10)
    assert one["df"] == pairs - 1 and one["diff"] == pytest.approx(diffs[0].mean())


def test_paired_matches_scipy_and_removes_what_the_pair_shares():
    from scipy import stats as scipy_stats

    rng = np.random.default_rng(1)
    shared = rng.normal(0.0, 5.0, 8)  # e.g. the seed's luck, common to both algorithms
    a, b = shared + 0.3 + rng.normal(0, 0.2, 8), shared + rng.normal(0, 0.2, 8)
    got = stats.paired(a, b)
    np.testing.assert_allclose(got["p"], scipy_stats.ttest_rel(a, b).pvalue, rtol=1e-10)
    assert got["p"] < 0.01 < stats.welch(a, b)["p"]  # unpaired, the shared spread hides it
    assert got["hw"] == pytest.approx(scipy_stats.t.ppf(0.975, 7) * got["se"])
    with pytest.raises(InputError, match="same length"):
        stats.paired(a, b[:-1])


def test_equivalence_is_two_one_sided_t_tests():
    from scipy import stats as scipy_stats

    got = stats.equivalence(0.1, 0.2, 10, margin=0.6)
    p_low, p_high = scipy_stats.t.sf((0.1 + 0.6) / 0.2, 10), scipy_stats.t.cdf((0.1 - 0.6) / 0.2, 10)
    assert got["p"] == pytest.approx(max(p_low, p_high)) and got["equivalent"]
    half = scipy_stats.t.ppf(0.95, 10) * 0.2
    assert (got["low"], got["high"]) == pytest.approx((0.1 - half, 0.1 + half))
    # not equivalent when the 90% interval reaches the margin, though 0 is inside the 95% CI
    wide = stats.equivalence(0.1, 0.2, 10, margin=0.4)
    assert not wide["equivalent"] and wide["high"] > 0.4 and 0.1 - 1.96 * 0.2 < 0
    # size: with the truth on the margin, equivalence is declared in at most 5% of studies
    rng = np.random.default_rng(2)
    draws = rng.normal(0.5, 1.0, (20000, 6))
    verdicts = stats.equivalence(draws.mean(1), draws.std(1, ddof=1) / np.sqrt(6), 5, 0.5)["equivalent"]
    assert np.mean(verdicts) <= 0.05 + 4 * np.sqrt(0.05 * 0.95 / 20000)


def test_bias2_interval_covers_on_heavy_tailed_noise_along_one_direction():
    """gmrl's estimates vary along few directions with heavy tails; there the old delete-one
    jackknife's normal interval covered 85% here (its se grows and shrinks with the estimate).
    Noise t(3) along one direction of d = 10, the bias at 45° to it and one noise standard error of
    the mean long (R = 100): over 2000 independent replications the 95% interval must cover ≥ 93%
    (binomial se 0.5%); the estimate stays unbiased."""
    rng = np.random.default_rng(0)
    reps, repeats, dim = 2000, 100, 10
    direction = rng.normal(size=dim)
    direction /= np.linalg.norm(direction)
    noise = rng.standard_t(3, size=(reps, repeats, 1)) * direction
    other = rng.normal(size=dim)
    other -= other @ direction * direction
    mu = 0.7 * direction + np.sqrt(0.51) * other / np.linalg.norm(other)
    mu *= np.sqrt((noise**2).sum(-1).mean() / repeats)
    b = stats.bias2(mu + noise, np.zeros((reps, dim)))
    low, high = b.ci
    theta = (mu**2).mean()
    coverage = np.mean((low <= theta) & (theta <= high))
    assert coverage >= 0.93, coverage
    assert abs(b.value.mean() - theta) < 4 * b.value.std(ddof=1) / np.sqrt(reps)


def test_bias2_difference_of_points_sharing_keys_cancels_the_shared_noise_and_covers():
    """Two points computed from the same keys (common random numbers): their estimates share most
    of their noise. The paired jackknife of the difference is far tighter than hypot(se_a, se_b),
    still covers the true difference (1000 replications), and equals bias2(a) − bias2(b)."""
    rng = np.random.default_rng(4)
    reps, repeats, dim = 1000, 40, 8
    shared = rng.normal(size=(reps, repeats, dim))
    mu_a, mu_b = np.full(dim, 0.30), np.full(dim, 0.25)
    a = mu_a + shared
    b = mu_b + shared + 0.1 * rng.normal(size=shared.shape)
    zero = np.zeros((reps, dim))
    d = stats.bias2_difference(a, zero, b, zero)
    np.testing.assert_allclose(d.value, stats.bias2(a, zero).value - stats.bias2(b, zero).value, rtol=1e-12)
    truth = (mu_a**2).mean() - (mu_b**2).mean()
    low, high = d.ci
    assert np.mean((low <= truth) & (truth <= high)) >= 0.93
    unpaired = np.hypot(stats.bias2(a, zero).se, stats.bias2(b, zero).se)
    assert np.median(d.se / unpaired) < 0.3
    with pytest.raises(InputError, match="same MDPs and repeats"):
        stats.bias2_difference(a, zero, b[:, :-1], zero)


@pytest.mark.parametrize("df", [1.0, 2.0093339079364454, 4.0, 30.0])
def test_detectable_difference_is_finite_at_few_degrees_of_freedom(df):
    """At df ≈ 2 scipy's noncentral-t cdf of the far tail is NaN (a study report once crashed on
    it); the detectable difference stays finite, at least the normal one, and has its power."""
    from scipy import stats as scipy_stats

    delta = stats.detectable_difference(1.0, df=df)
    assert np.isfinite(delta) and delta >= stats.detectable_difference(1.0)
    crit = scipy_stats.t.ppf(0.975, df)
    assert scipy_stats.nct.sf(crit, df, delta) == pytest.approx(0.8, abs=1e-6)
