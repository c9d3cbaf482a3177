"""Iterated prisoner's dilemma: closed-form values against Monte-Carlo rollouts and limits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmrl import estimators, sampling
from gmrl.envs import ipd


def _random_thetas(seed):
    rng = np.random.default_rng(seed)
    return rng.normal(0.0, 1.5, (2, ipd.NUM_STATES))


def _numpy_values(theta1, theta2, gamma):
    """An independent numpy transcription of the 4-state chain (player 2's CD/DC swapped)."""
    p1 = 1 / (1 + np.exp(-np.asarray(theta1)))
    p2 = 1 / (1 + np.exp(-np.asarray(theta2)))[[0, 1, 3, 2, 4]]

    def phi(x, y):
        return np.stack([x * y, x * (1 - y), (1 - x) * y, (1 - x) * (1 - y)], -1)

    occupancy = np.linalg.solve((np.eye(4) - gamma * phi(p1[1:], p2[1:])).T, phi(p1[0], p2[0]))
    return occupancy @ np.array([[-1, -1], [-3, 0], [0, -3], [-2, -2]], float)


def test_exact_values_match_independent_transcription_and_limits():
    with jax.enable_x64(True):
        for seed in range(3):
            t1, t2 = _random_thetas(seed)
            got = np.asarray(ipd.exact_values(jnp.asarray(t1), jnp.asarray(t2), 0.96))
            np.testing.assert_allclose(got, _numpy_values(t1, t2, 0.96), rtol=1e-12)
            swapped = np.asarray(ipd.exact_values(jnp.asarray(t2), jnp.asarray(t1), 0.96))
            np.testing.assert_allclose(got, swapped[::-1], rtol=1e-12)
            long = np.asarray(ipd.finite_horizon_values(jnp.asarray(t1), jnp.asarray(t2), 0.96,
                                                        2000))
            np.testing.assert_allclose(got, long, rtol=1e-12)
        big = jnp.full(5, 40.0)
        np.testing.assert_allclose(ipd.exact_values(big, big, 0.96), [-25.0, -25.0], rtol=1e-9)
        np.testing.assert_allclose(ipd.exact_values(-big, -big, 0.96), [-50.0, -50.0], rtol=1e-9)
        # always-cooperate against always-defect: −3 and 0 per step
        np.testing.assert_allclose(ipd.exact_values(big, -big, 0.96), [-75.0, 0.0], atol=1e-9)
        np.testing.assert_allclose(ipd.average_rewards(big, -big, 100), [-3.0, 0.0], atol=1e-9)


@pytest.mark.parametrize("seed", [0, 1])
def test_exact_values_match_monte_carlo(seed):
    """Finite-horizon exact value and per-step reward vs 4096 sampled episodes: |z| < 4."""
    t1, t2 = _random_thetas(seed)
    episodes = jax.jit(lambda k: ipd.sample(k, jnp.asarray(t1, jnp.float32),
                                            jnp.asarray(t2, jnp.float32), 4096))(
        jax.random.key(seed))
    rewards = np.stack([episodes.rewards(0), episodes.rewards(1)], -1).astype(np.float64)  # [T, N, 2]
    discounts = 0.96 ** np.arange(ipd.HORIZON)
    returns = np.einsum("tnp,t->np", rewards, discounts)
    per_step = rewards.mean(0)
    with jax.enable_x64(True):
        exact = np.asarray(ipd.finite_horizon_values(jnp.asarray(t1), jnp.asarray(t2)))
        average = np.asarray(ipd.average_rewards(jnp.asarray(t1), jnp.asarray(t2)))
    for sample, truth in ((returns, exact), (per_step, average)):
        z = (sample.mean(0) - truth) / (sample.std(0, ddof=1) / np.sqrt(len(sample)))
        assert np.all(np.abs(z) < 4), z
    # the test has power: the untruncated value (off by γ^100 V ≈ 2%) is rejected
    with jax.enable_x64(True):
        infinite = np.asarray(ipd.exact_values(jnp.asarray(t1), jnp.asarray(t2)))
    z = (returns.mean(0) - infinite) / (returns.std(0, ddof=1) / np.sqrt(len(returns)))
    assert np.all(np.abs(z) > 4), z


def test_sampler_cooperation_frequencies():
    t1, t2 = (jnp.asarray(t, jnp.float32) for t in _random_thetas(3))
    episodes = ipd.sample(jax.random.key(0), t1, t2, 2048)
    assert episodes.states.shape == episodes.outcomes.shape == (ipd.HORIZON, 2048)
    assert np.all(np.asarray(episodes.states[0]) == ipd.START)
    for player, theta in ((0, t1), (1, t2)):
        own = np.asarray(ipd.own_states(episodes.states, player))
        actions = np.asarray(episodes.actions(player))
        for s in range(ipd.NUM_STATES):
            coop = actions[own == s] == 0
            p = float(jax.nn.sigmoid(theta[s]))
            assert abs(coop.mean() - p) < 4 * np.sqrt(p * (1 - p) / coop.size)
    # next state follows the joint outcome
    states, outcomes = np.asarray(episodes.states), np.asarray(episodes.outcomes)
    np.testing.assert_array_equal(states[1:], 1 + outcomes[:-1])
    # the same key gives the same episodes
    again = ipd.sample(jax.random.key(0), t1, t2, 2048)
    np.testing.assert_array_equal(again.outcomes, episodes.outcomes)


def test_packed_sampler_equals_a_direct_per_step_sampler():
    """Same uniforms, a plain loop over t: identical states, actions and rewards."""
    t1, t2 = (jnp.asarray(t, jnp.float32) for t in _random_thetas(9))
    key, n, horizon = jax.random.key(5), 300, 30
    episodes = ipd.sample(key, t1, t2, n, horizon)
    u = np.asarray(sampling.hashed_uniform(key, (horizon, n, 2)))
    p1 = np.asarray(jax.nn.sigmoid(t1))
    p2 = np.asarray(jax.nn.sigmoid(t2))[list(ipd.SWAP)]
    state = np.zeros(n, int)
    payoff = np.array([-1.0, -3.0, 0.0, -2.0])
    for t in range(horizon):
        a1, a2 = (u[t, :, 0] >= p1[state]).astype(int), (u[t, :, 1] >= p2[state]).astype(int)
        np.testing.assert_array_equal(episodes.states[t], state)
        np.testing.assert_array_equal(episodes.actions(0)[t], a1)
        np.testing.assert_array_equal(episodes.actions(1)[t], a2)
        np.testing.assert_array_equal(episodes.rewards(0)[t], payoff[2 * a1 + a2])
        np.testing.assert_array_equal(episodes.rewards(1)[t], payoff[2 * a2 + a1])
        state = 1 + 2 * a1 + a2
    recorded = ipd.joint_log_probs(t1, t2, episodes)
    by_player = sum(ipd.action_log_probs(t, ipd.own_states(episodes.states, p), episodes.actions(p))
                    for p, t in ((0, t1), (1, t2)))
    np.testing.assert_allclose(recorded, by_player, atol=1e-6)


def test_hashed_uniforms_are_uniform_and_independent():
    """2^18 draws: mean, variance, a 64-bin χ², correlations at lag 1 and between two keys
    (every |z| < 4); a 2^-24 grid; a different key gives different draws."""
    k1, k2 = jax.random.split(jax.random.key(11))
    n = 2**18
    a = np.asarray(sampling.hashed_uniform(k1, (n,)), np.float64)
    b = np.asarray(sampling.hashed_uniform(k2, (n,)), np.float64)
    assert a.min() >= 0.0 and a.max() < 1.0
    np.testing.assert_array_equal(a * 2**24, np.round(a * 2**24))
    assert abs(a.mean() - 0.5) / np.sqrt(1 / 12 / n) < 4
    assert abs(a.var() - 1 / 12) / np.sqrt(1 / 180 / n) < 4
    counts, _ = np.histogram(a, 64, (0.0, 1.0))
    expected = n / 64
    chi2 = np.sum((counts - expected) ** 2 / expected)
    assert abs(chi2 - 63) / np.sqrt(2 * 63) < 4
    for x, y in ((a[1:], a[:-1]), (a, b)):
        assert abs(np.corrcoef(x, y)[0, 1]) * np.sqrt(len(x)) < 4
    assert np.mean(a == b) < 1e-3


def test_dice_on_sampled_episodes_estimates_the_exact_policy_gradient():
    """Sanity link to the estimators: mean DiCE gradient of player 1 vs the exact one (|z| < 4)."""
    t1, t2 = (jnp.asarray(t, jnp.float32) for t in _random_thetas(4))
    horizon = 250  # γ^250 ≈ 4e-5: truncation far below the sampling error

    def estimate(key):
        episodes = ipd.sample(key, t1, t2, 256, horizon)

        def surrogate(theta):
            lp = ipd.joint_log_probs(theta, t2, episodes)
            d = jnp.full(horizon, 0.96)
            return jnp.mean(jax.vmap(estimators.dice, (1, None, 1, None))(
                lp, None, episodes.rewards(0), d))
        return jax.grad(surrogate)(t1)

    grads = np.asarray(jax.jit(jax.vmap(estimate))(jax.random.split(jax.random.key(1), 32)))
    with jax.enable_x64(True):
        exact = np.asarray(jax.grad(lambda t: ipd.exact_values(t, jnp.asarray(t2, jnp.float64))[0])(
            jnp.asarray(t1, jnp.float64)))
    z = (grads.mean(0) - exact) / (grads.std(0, ddof=1) / np.sqrt(len(grads)))
    assert np.all(np.abs(z) < 4), z
