"""Tests that pin down what the decomposed estimate computes, beyond "the error shrinks":
padded sample counts, the Jacobian of the straight-through step, the finite-oracle limit of lee,
Loaded DiCE with λ < 1, and LIRPG's sampled Hessian ingredient (Liu, Feng et al. 2022, Table 1)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmrl import estimators as est
from gmrl import metagrad as mg
from gmrl import stats
from gmrl.envs import tabular

from .reference_numpy import gradient as numpy_gradient
from .stat_helpers import assert_biased, assert_unbiased, bonferroni_threshold

pytestmark = pytest.mark.usefixtures("x64")

S, A = 3, 2


def small_mdp(seed=11):
    return tabular.random_mdp(jax.random.key(seed), S, A, 0.8, concentration=0.5)


def estimates(cfg, mdp, phi, repeats, seed=0, counts=None):
    keys = jax.random.split(jax.random.key(seed), repeats)
    f = jax.jit(jax.vmap(lambda k: mg.estimate_meta_gradient(k, cfg, mdp, phi, counts)))
    return np.asarray(f(keys)).reshape(repeats, -1)


def test_padded_count_below_capacity_is_distributed_as_the_unpadded_estimate():
    """4 of 16 padded trajectories ≡ a plain 4-trajectory estimate: same mean and same spread
    (a mean divided by the capacity would shrink both by 4)."""
    mdp = small_mdp()
    phi = jnp.zeros((S, A))
    padded = mg.Source("dice", 16)
    plain = mg.Source("dice", 4)
    cfg = mg.MetaGradConfig(steps=1, lr=3.0, horizon=5, inner=padded, hessian=padded, outer=padded)
    a = estimates(cfg, mdp, phi, 4000, seed=1, counts=jnp.array([4, 4, 4]))
    b = estimates(dataclasses.replace(cfg, inner=plain, hessian=plain, outer=plain), mdp, phi, 4000, seed=2)
    se = np.sqrt(a.var(0, ddof=1) / len(a) + b.var(0, ddof=1) / len(b))
    z = (a.mean(0) - b.mean(0)) / se
    assert np.max(np.abs(z)) < bonferroni_threshold(z.size), z
    # Standard deviations: the log-ratio of sample stds has se ≈ sqrt(1/(2(n-1)) · (kurtosis terms));
    # a bootstrap over repeats gives it without a normality assumption.
    rng = np.random.default_rng(0)
    ratios = []
    for _ in range(200):
        ia, ib = rng.integers(0, len(a), len(a)), rng.integers(0, len(b), len(b))
        ratios.append(np.log(a[ia].std(0) / b[ib].std(0)))
    log_ratio = np.log(a.std(0) / b.std(0))
    z_std = log_ratio / np.std(ratios, axis=0, ddof=1)
    assert np.max(np.abs(z_std)) < bonferroni_threshold(z.size), z_std


def _softmax_score(theta, s, a):
    """∇_θ log π_θ(a|s) for the softmax table: e_s ⊗ (e_a − π(·|s)). [S, A]."""
    pi = np.exp(theta - theta.max(1, keepdims=True))
    pi /= pi.sum(1, keepdims=True)
    g = np.zeros_like(theta)
    g[s] = -pi[s]
    g[s, a] += 1.0
    return g


def _softmax_log_hessian(theta, s):
    """∇²_θ log π_θ(a|s) (the same for every a): −e_s e_sᵀ ⊗ (diag π_s − π_s π_sᵀ). [S·A, S·A]."""
    pi = np.exp(theta - theta.max(1, keepdims=True))
    pi /= pi.sum(1, keepdims=True)
    H = np.zeros((S, A, S, A))
    H[s, :, s, :] = -(np.diag(pi[s]) - np.outer(pi[s], pi[s]))
    return H.reshape(S * A, S * A)


def test_sampled_hessian_ingredient_gives_the_jacobian_I_plus_alpha_H_hat():
    """K = 1, code ele with DiCE: the estimate equals (I + α Ĥ)ᵀ ∇J(θ̂_1), with Ĥ the DiCE Hessian
    Σ_t γ^t r_t [(Σ_{i≤t} ∇log π_i)(Σ_{i≤t} ∇log π_i)ᵀ + Σ_{i≤t} ∇²log π_i] averaged over the very
    trajectories the Hessian ingredient drew, computed here by hand in numpy."""
    mdp = small_mdp()
    theta0 = np.asarray(jax.random.normal(jax.random.key(3), (S, A)))
    n, T, lr = 8, 4, 2.0
    cfg = mg.MetaGradConfig(steps=1, lr=lr, horizon=T, hessian=mg.Source("dice", n))
    key = jax.random.key(7)
    estimate = np.asarray(mg.estimate_meta_gradient(key, cfg, mdp, jnp.asarray(theta0)))

    # The same trajectories: the key path of estimate_meta_gradient's Hessian ingredient.
    (step_key,), _ = mg.step_keys(key, 1)
    _, key_h = jax.random.split(step_key)
    key_ingredient, _ = jax.random.split(key_h)  # hessian_objective: (ingredient, injected error)
    key_traj, _ = jax.random.split(key_ingredient)  # sampled_objective: (trajectories, critic)
    traj = tabular.sample_trajectories(key_traj, mdp, theta0, n, T)
    states, actions = np.asarray(traj.states), np.asarray(traj.actions)
    P, R, gamma = np.asarray(mdp.P), np.asarray(mdp.R), float(mdp.gamma)
    H = np.zeros((S * A, S * A))
    for i in range(n):
        score, curvature = np.zeros(S * A), np.zeros((S * A, S * A))
        for t in range(T):
            s, a = states[i, t], actions[i, t]
            score = score + _softmax_score(theta0, s, a).reshape(-1)
            curvature = curvature + _softmax_log_hessian(theta0, s)
            H += gamma**t * R[s, a] * (np.outer(score, score) + curvature) / n
    theta1 = theta0 + lr * numpy_gradient(P, R, gamma, 0, theta0)
    expected = (np.eye(S * A) + lr * H).T @ numpy_gradient(P, R, gamma, 0, theta1).reshape(-1)
    np.testing.assert_allclose(estimate.reshape(-1), expected, rtol=1e-9, atol=1e-12)


def _bias2(cfg, mdp, phi, repeats, estimator):
    exact = np.asarray(mg.exact_meta_gradient(cfg, mdp, phi, estimator)).reshape(-1)
    return stats.bias2(estimates(cfg, mdp, phi, repeats, seed=cfg.inner.samples), exact)


def test_lee_bias_vanishes_under_the_finite_oracle_and_stalls_under_the_infinite_one():
    """Sampled inner steps only (lee, DiCE): as B_in grows the estimate tends to the meta-gradient
    of J_T, so bias2 → 0 against the finite oracle but not against the closed-form J."""
    mdp = small_mdp(5)
    phi = jnp.zeros((S, A))
    base = mg.MetaGradConfig(steps=2, lr=5.0, horizon=3, oracle="finite",
                             hessian=mg.Source("dice"), outer=mg.Source("dice"))
    small = _bias2(dataclasses.replace(base, inner=mg.Source("dice", 2)), mdp, phi, 2000, "dice")
    large = _bias2(dataclasses.replace(base, inner=mg.Source("dice", 4096)), mdp, phi, 400, "dice")
    assert small.value > 4 * small.se  # compositional bias at 2 samples
    assert abs(large.value) < 3 * large.se, (large.value, large.se)  # consistent with zero
    assert large.value + 3 * large.se < small.value / 20  # and much smaller
    # Against the infinite-horizon oracle the same estimator keeps a truncation bias.
    infinite = dataclasses.replace(base, oracle="infinite", inner=mg.Source("dice", 4096))
    truncated = stats.bias2(estimates(infinite, mdp, phi, 400, seed=4096),
                            np.asarray(mg.exact_meta_gradient(infinite, mdp, phi)).reshape(-1))
    assert truncated.value > 4 * truncated.se, (truncated.value, truncated.se)


def _loaded_dice_loop(log_prob, advantages, discounts, lam):
    """Loaded DiCE with λ written as Farquhar et al. (2019, eq. 8) state it, by explicit loops:
    L = Σ_t γ^t (exp(Σ_{i≤t} λ^{t−i} log ρ_i) − exp(Σ_{i<t} λ^{t−i} log ρ_i)) A_t, on-policy."""
    log_ratio = log_prob - jax.lax.stop_gradient(log_prob)
    total, discount = 0.0, 1.0
    for t in range(log_prob.shape[0]):
        now = sum(lam ** (t - i) * log_ratio[i] for i in range(t + 1))
        before = sum(lam ** (t - i) * log_ratio[i] for i in range(t))
        total = total + discount * (jnp.exp(now) - jnp.exp(before)) * advantages[t]
        discount = discount * discounts[t]
    return total


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.7])
def test_loaded_dice_lambda_matches_an_independent_loop(lam):
    key_lp, key_a = jax.random.split(jax.random.key(1))
    log_prob = jax.nn.log_sigmoid(jax.random.normal(key_lp, (6,)))
    adv, discounts = jax.random.normal(key_a, (6,)), jnp.full((6,), 0.9)
    ours = lambda lp: est.loaded_dice(lp, None, adv, discounts, lam)  # noqa: E731
    loop = lambda lp: _loaded_dice_loop(lp, adv, discounts, lam)  # noqa: E731
    for order in (lambda f: f, jax.grad, jax.hessian, lambda f: jax.jacfwd(jax.hessian(f))):
        np.testing.assert_allclose(order(ours)(log_prob), order(loop)(log_prob), rtol=1e-10, atol=1e-12)


def _hessian_samples(mdp, theta, cfg, estimator, n):
    f = lambda key, th: mg.sampled_objective(key, cfg, mdp, th, mdp.R, estimator, 1)  # noqa: E731
    return jax.jit(jax.vmap(jax.hessian(f, argnums=1), in_axes=(0, None)))(
        jax.random.split(jax.random.key(8), n), theta)


def test_loaded_dice_with_lambda_below_one_has_an_unbiased_gradient_and_a_biased_hessian():
    mdp = small_mdp()
    theta = jax.random.normal(jax.random.key(12), (S, A))
    cfg = mg.MetaGradConfig(horizon=5, oracle="finite", loaded_lambda=0.5)
    exact = lambda th: mg.exact_objective(cfg, mdp, th, mdp.R, "loaded")  # noqa: E731
    grads = jax.jit(jax.vmap(jax.grad(lambda k, th: mg.sampled_objective(
        k, cfg, mdp, th, mdp.R, "loaded", 1), argnums=1), in_axes=(0, None)))(
        jax.random.split(jax.random.key(9), 20_000), theta)
    assert_unbiased(grads, jax.grad(exact)(theta))
    assert_biased(_hessian_samples(mdp, theta, cfg, "loaded", 20_000), jax.hessian(exact)(theta))


@pytest.mark.parametrize("estimator, biased", [("dice", False), ("loaded", False),
                                                ("lvc", True), ("maml", True)])
def test_lirpg_ele_is_unbiased_for_dice_and_loaded_and_biased_for_lvc_and_maml(estimator, biased):
    """LIRPG, K = 2, only the Hessian ingredient sampled, against the finite oracle with the same
    bootstrap: the two Jacobians are ∂²L/∂θ∂φ (unbiased for all four: the reward enters linearly)
    and I + α∇²_θ L (unbiased only for dice and loaded), so lvc and maml are biased at K ≥ 2."""
    mdp = small_mdp(2)
    phi = jnp.zeros((S, A))
    exact = mg.Source(estimator)
    cfg = mg.MetaGradConfig(problem="lirpg", steps=2, lr=5.0, horizon=4, oracle="finite",
                            inner=exact, hessian=mg.Source(estimator, 16), outer=exact)
    samples = estimates(cfg, mdp, phi, 20_000, seed=3)
    truth = np.asarray(mg.exact_meta_gradient(cfg, mdp, phi, estimator)).reshape(-1)
    (assert_biased if biased else assert_unbiased)(samples, truth)


@pytest.mark.parametrize("estimator", ["maml"])  # loaded: the critic-gradient test below
def test_lirpg_ele_at_one_step_is_unbiased_for_every_estimator(estimator):
    """K = 1: the only Jacobian is the mixed ∂²L/∂θ∂φ, which every estimator gets right in
    expectation (GAE λ = 1), so small negative bias2 values at K = 1 are noise. (dice, lvc and maml
    give the same estimate draw by draw here: their reward-to-go sums rearrange into each other.)"""
    mdp = small_mdp(2)
    phi = jnp.zeros((S, A))
    exact = mg.Source(estimator)
    cfg = mg.MetaGradConfig(problem="lirpg", steps=1, lr=5.0, horizon=4, oracle="finite",
                            inner=exact, hessian=mg.Source(estimator, 16), outer=exact)
    samples = estimates(cfg, mdp, phi, 20_000, seed=4)
    assert_unbiased(samples, np.asarray(mg.exact_meta_gradient(cfg, mdp, phi, estimator)).reshape(-1))


@pytest.mark.parametrize("critic_gradient, biased", [(True, False), (False, True)])
def test_lirpg_one_step_bias_with_gae_below_one_comes_from_a_detached_critic(critic_gradient, biased):
    """GAE λ = 0.9 (the reference's LIRPG setting), K = 1, ele: with the critic V_{sg θ}(R + φ)
    differentiated in φ (the reference's default) the Jacobian ∂²L/∂θ∂φ is unbiased; held fixed
    (its --detach_value_gradient), the λ-discounted reward-to-go misses part of it."""
    mdp = small_mdp(2)
    phi = jnp.zeros((S, A))
    exact = mg.Source("loaded")
    cfg = mg.MetaGradConfig(problem="lirpg", steps=1, lr=5.0, horizon=4, oracle="finite", gae_lambda=0.9,
                            critic_gradient=critic_gradient, inner=exact,
                            hessian=mg.Source("loaded", 16), outer=exact)
    samples = estimates(cfg, mdp, phi, 20_000, seed=5)
    truth = np.asarray(mg.exact_meta_gradient(cfg, mdp, phi, "loaded")).reshape(-1)
    (assert_biased if biased else assert_unbiased)(samples, truth)
