"""gmrl.core: the one unroll, its sources and its decomposition (docs/design.md, "One framework")."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmrl import core
from gmrl import metagrad as mg
from gmrl.envs import tabular
from gmrl.errors import InputError

S, A, T, K, LR = 4, 3, 6, 2, 2.0


def _setup(problem="maml"):
    mdp = tabular.random_mdp(jax.random.key(5), num_states=S, num_actions=A, gamma=0.8)
    phi = 0.5 * jax.random.normal(jax.random.key(6), (S, A)) if problem == "maml" else jnp.zeros((S, A))
    cfg = mg.MetaGradConfig(problem=problem, steps=K, lr=LR, horizon=T, oracle="finite", noise=0.0)
    return cfg, mdp, phi


def _by_hand(cfg, mdp, phi, key, jacobian):
    """The K-step loop written out: each step's value from a dice:8 batch (step key's first half);
    its Jacobian from the same batch (autodiff through θ + α∇L, create_graph=True), or none (I)."""
    keys, key_outer = core.step_keys(key, K)
    value_source = core.Source("dice", 8)

    def outer(phi):
        reward = mg.inner_reward(cfg, mdp, phi)
        theta = mg.initial_theta(cfg, phi)
        for k in range(K):
            key_value, _ = jax.random.split(keys[k])
            objective = lambda th, kv=key_value: mg.ingredient_objective(  # noqa: E731
                kv, cfg, value_source, mdp, th, reward)
            step = LR * jax.grad(objective)(theta)
            theta = theta + (step if jacobian == "same" else jax.lax.stop_gradient(step))
        return mg.ingredient_objective(key_outer, cfg, core.Source("dice"), mdp, theta, mdp.R)

    return jax.grad(outer)(phi)


@pytest.mark.parametrize("problem", ["maml", "lirpg"])
def test_same_and_none_jacobians_are_autodiff_through_the_batch_and_first_order(problem):
    """`same`: the step's Jacobian is the derivative of its own batch's step; `none`: the identity
    (lirpg's first-order meta-gradient is then 0). Mutation caught: SAME computed through
    straight_through with a fresh Jacobian batch (differs draw by draw)."""
    with jax.enable_x64(True):
        cfg, mdp, phi = _setup(problem)
        prob, hyper, key = mg.problem(cfg, mdp), core.Hyper(LR, K), jax.random.key(11)
        for jacobian in ("same", "none"):
            parts = core.Decomposition(core.Source("dice", 8), core.Source(jacobian), core.Source("dice"))
            got = np.asarray(core.meta_gradient(prob, parts, key, phi, hyper, K))
            want = np.asarray(_by_hand(cfg, mdp, phi, key, jacobian))
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
            if jacobian == "none" and problem == "lirpg":
                assert np.all(got == 0)
        assert not np.allclose(_by_hand(cfg, mdp, phi, key, "same"), _by_hand(cfg, mdp, phi, key, "none"))


def test_per_step_sources_and_the_masked_loop_agree():
    """A tuple of one source per step (Python loop) equals the masked scan; traced K = 1 of
    K_max = 2 equals a one-step unroll. Mutation caught: masked_scan ignoring `active_steps`."""
    with jax.enable_x64(True):
        cfg, mdp, phi = _setup()
        prob, key = mg.problem(cfg, mdp), jax.random.key(3)
        d, h = core.Source("dice", 8), core.Source("loaded", 8)
        scan = core.Decomposition(d, h, core.Source("exact"))
        per_step = core.Decomposition((d, d), (h, h), core.Source("exact"))
        a = core.meta_gradient(prob, scan, key, phi, core.Hyper(LR, K), K)
        b = core.meta_gradient(prob, per_step, key, phi, core.Hyper(LR, K), K)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-14)
        masked = jax.jit(lambda steps: core.meta_gradient(prob, scan, key, phi, core.Hyper(LR, steps), K))
        one = core.meta_gradient(prob, core.Decomposition((d,), (h,), core.Source("exact")), key, phi,
                                 core.Hyper(LR, 1), 1)
        np.testing.assert_allclose(np.asarray(masked(1)), np.asarray(one), rtol=1e-12, atol=1e-14)
        assert not np.allclose(np.asarray(masked(1)), np.asarray(a))


def test_exact_meta_gradient_is_the_closed_form_product():
    """MAML's exact meta-gradient = Π_k (I + α∇²J(θ_k)) ∇J(θ_K) (Liu, Feng et al. 2022, eq. 2)."""
    with jax.enable_x64(True):
        cfg, mdp, phi = _setup()
        cfg = mg.MetaGradConfig(steps=K, lr=LR, horizon=T)  # infinite oracle
        J = lambda th: tabular.exact_return(mdp, th)  # noqa: E731
        thetas, theta = [], phi
        for _ in range(K):
            thetas.append(theta)
            theta = theta + LR * jax.grad(J)(theta)
        g = jax.grad(J)(theta).ravel()
        for th in reversed(thetas):
            g = g + LR * jax.hessian(J)(th).reshape(S * A, S * A).T @ g
        got = core.exact_meta_gradient(mg.problem(cfg, mdp), phi, core.Hyper(LR, K), K)
        np.testing.assert_allclose(np.asarray(got).ravel(), np.asarray(g), rtol=1e-9)


@pytest.mark.parametrize("text, jacobian, message", [
    ("same", False, "Jacobian source"), ("none:3", True, "takes no sample size"),
    ("bogus", True, "allowed: .*same, none")])
def test_source_strings(text, jacobian, message):
    with pytest.raises(InputError, match=message):
        core.Source.parse(text, jacobian=jacobian)
    assert core.Source.parse("same", jacobian=True).kind == "same"
    assert core.Source.parse("dice:4").kind == "sampled" and core.Source("maml").kind == "exact"
    assert str(core.Source("none")) == "none" and str(core.Source("lvc", 4)) == "lvc:4"
