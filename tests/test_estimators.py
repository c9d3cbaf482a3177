"""docs/design.md, estimators: each unbiasedness claim against the exact finite-horizon oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmrl import estimators as est
from gmrl import metagrad as mg
from gmrl.envs import tabular

from .stat_helpers import assert_biased, assert_unbiased

pytestmark = pytest.mark.usefixtures("x64")

S, A, T, N = 3, 2, 5, 20_000


@pytest.fixture(scope="module")
def setup():
    with jax.enable_x64(True):
        mdp = tabular.random_mdp(jax.random.key(11), S, A, 0.8, concentration=0.5)
        theta = jax.random.normal(jax.random.key(12), (S, A))
        cfg = mg.MetaGradConfig(horizon=T, noise=1.0, oracle="finite")
        return mdp, theta, cfg


def per_trajectory(setup, name, order):
    """[N, ...] gradients (order 1) or Hessians (order 2) of one-trajectory surrogates."""
    mdp, theta, cfg = setup
    f = lambda key, th: mg.sampled_objective(key, cfg, mdp, th, mdp.R, name, 1)  # noqa: E731
    d = jax.grad(f, argnums=1) if order == 1 else jax.hessian(f, argnums=1)
    return jax.jit(jax.vmap(d, in_axes=(0, None)))(jax.random.split(jax.random.key(order), N), theta)


def exact(setup, name, order):
    mdp, theta, cfg = setup
    f = lambda th: mg.exact_objective(cfg, mdp, th, mdp.R, name)  # noqa: E731
    return (jax.grad(f) if order == 1 else jax.hessian(f))(theta)


@pytest.mark.parametrize("name", est.SAMPLED_ESTIMATORS)
def test_gradient_is_unbiased(setup, name):
    assert_unbiased(per_trajectory(setup, name, 1), exact(setup, name, 1))


@pytest.mark.parametrize("name", ["dice", "loaded"])
def test_hessian_is_unbiased(setup, name):
    assert_unbiased(per_trajectory(setup, name, 2), exact(setup, name, 2))


@pytest.mark.parametrize("name", ["lvc", "maml"])
def test_hessian_is_biased(setup, name):
    assert_biased(per_trajectory(setup, name, 2), exact(setup, name, 2))


def test_exact_estimator_is_the_oracle(setup):
    mdp, theta, cfg = setup
    value = mg.ingredient_objective(jax.random.key(0), cfg, mg.Source("exact"), mdp, theta, mdp.R)
    V = tabular.state_values(mdp, theta)
    assert float(value) == pytest.approx(float(tabular.finite_horizon_return(mdp, theta, T, V)), abs=1e-14)


def _off_policy_samples(setup, name, order):
    """Trajectories from a different behaviour policy μ, importance-weighted with recorded log μ."""
    mdp, theta, _ = setup
    theta_mu = jnp.zeros_like(theta)
    critic = jnp.linspace(0.5, 2.0, S)
    traj = tabular.sample_trajectories(jax.random.key(5), mdp, theta_mu, N, T)
    log_mu = jax.nn.log_softmax(theta_mu)[traj.states, traj.actions]
    rewards = mdp.R[traj.states, traj.actions]
    discounts = jnp.full((T,), 0.8)

    def surrogate(th, s, a, lm, r, final):
        lp = jax.nn.log_softmax(th)[s, a]
        if name == "dice":
            return est.dice(lp, lm, r, discounts)
        adv = est.gae(r, critic[s], discounts, critic[final], 1.0)
        return est.loaded_dice(lp, lm, adv, discounts)

    d = jax.grad(surrogate) if order == 1 else jax.hessian(surrogate)
    samples = jax.jit(jax.vmap(d, in_axes=(None, 0, 0, 0, 0, 0)))(
        theta, traj.states, traj.actions, log_mu, rewards, traj.final_states)
    boot = None if name == "dice" else critic
    f = lambda th: tabular.finite_horizon_return(mdp, th, T, boot)  # noqa: E731
    return samples, (jax.grad(f) if order == 1 else jax.hessian(f))(theta)


@pytest.mark.parametrize("name", ["dice", "loaded"])
@pytest.mark.parametrize("order", [1, 2])
def test_off_policy_importance_weighting_is_unbiased(setup, name, order):
    assert_unbiased(*_off_policy_samples(setup, name, order))


def test_on_policy_weights_are_one_in_value_and_match_the_score_function():
    log_prob = jnp.log(jnp.array([0.2, 0.5, 0.7]))
    rewards, discounts = jnp.array([1.0, 2.0, 3.0]), jnp.full((3,), 0.9)
    plain = jnp.sum(jnp.array([1.0, 0.9, 0.81]) * rewards)
    assert float(est.dice(log_prob, None, rewards, discounts)) == pytest.approx(float(plain))
    assert float(est.dice(log_prob, log_prob, rewards, discounts)) == pytest.approx(float(plain))
    adv = jnp.array([0.5, -1.0, 2.0])
    assert float(est.lvc(log_prob, None, adv, discounts)) == 0.0
    assert float(est.loaded_dice(log_prob, None, adv, discounts)) == 0.0
    # First derivatives of lvc and maml surrogates agree (same policy gradient).
    g_lvc = jax.grad(lambda lp: est.lvc(lp, None, adv, discounts))(log_prob)
    g_maml = jax.grad(lambda lp: est.maml(lp, adv, discounts))(log_prob)
    np.testing.assert_allclose(g_lvc, g_maml, atol=1e-15)


def test_returns_and_gae():
    r, v, d = jnp.array([1.0, 0.0, 2.0]), jnp.array([0.3, 0.1, 0.4]), jnp.full((3,), 0.5)
    G = est.discounted_returns(r, d, 4.0)
    np.testing.assert_allclose(G, [1 + 0.5 * (0 + 0.5 * (2 + 0.5 * 4)), 0.5 * (2 + 2), 2 + 2])
    np.testing.assert_allclose(est.gae(r, v, d, 4.0, 1.0), G - v, atol=1e-15)
    delta = r + d * jnp.array([0.1, 0.4, 4.0]) - v
    np.testing.assert_allclose(est.gae(r, v, d, 4.0, 0.0), delta, atol=1e-15)


def test_loaded_dice_lambda_one_is_dice_minus_a_constant():
    """With A_t = G_t (no critic, zero bootstrap), Loaded DiCE = DiCE − Σγ^t r_t in value and derivatives."""
    key = jax.random.key(0)
    log_prob = jax.random.normal(key, (6,))
    rewards, discounts = jnp.arange(6.0), jnp.full((6,), 0.9)
    G = est.discounted_returns(rewards, discounts, 0.0)
    loaded = jax.hessian(lambda lp: est.loaded_dice(lp, None, G, discounts))(log_prob)
    dice = jax.hessian(lambda lp: est.dice(lp, None, rewards, discounts))(log_prob)
    np.testing.assert_allclose(loaded, dice, atol=1e-12)


def test_mask_removes_padded_steps():
    lp, r, d = jnp.log(jnp.array([0.3, 0.6, 0.9])), jnp.array([1.0, 2.0, 5.0]), jnp.full((3,), 0.9)
    mask = jnp.array([1.0, 1.0, 0.0])
    for f in (lambda lp, r, d, m: est.dice(lp, None, r, d, m),
              lambda lp, r, d, m: est.lvc(lp, None, r, d, m)):
        full = jax.grad(f)(lp[:2], r[:2], d[:2], None)
        padded = jax.grad(f)(lp, r, d, mask)
        np.testing.assert_allclose(padded[:2], full, atol=1e-15)
        assert float(padded[2]) == 0.0


def test_unknown_estimator_and_bad_shapes_are_clear_errors():
    x = jnp.zeros(3)
    with pytest.raises(ValueError, match="unknown estimator 'foo'; allowed: dice, loaded, lvc, maml"):
        est.surrogate("foo", log_prob=x, behaviour_log_prob=None, rewards=x, advantages=x, discounts=x)
    with pytest.raises(AssertionError):
        est.dice(x, None, jnp.zeros(4), x)
