"""docs/design.md: exact K-step meta-gradients and the decomposed stochastic estimate."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmrl import metagrad as mg
from gmrl.envs import tabular
from gmrl.errors import InputError

from .reference_numpy import lirpg_meta_gradient, maml_meta_gradient

pytestmark = pytest.mark.usefixtures("x64")


def problem(seed=0, S=5, A=3, problem="maml"):
    mdp = tabular.random_mdp(jax.random.key(seed), S, A, 0.8, concentration=0.5)
    theta0 = "normal" if problem == "maml" else "zeros"  # a non-uniform θ0 exercises more of the code
    phi = mg.initial_meta_params(jax.random.key(seed + 100), mdp, problem, theta0)
    return mdp, phi


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_maml_meta_gradient_is_the_product_formula(steps):
    """d/dθ0 J(θ_K) = Π_k (I + α ∇²J(θ_k)) ∇J(θ_K), k = 0 on the left, with autodiff Hessians."""
    mdp, phi = problem()
    cfg = mg.MetaGradConfig(steps=steps, lr=2.0)
    J = lambda th: tabular.exact_return(mdp, th)  # noqa: E731
    path = [phi]
    for _ in range(steps):
        path.append(path[-1] + 2.0 * jax.grad(J)(path[-1]))
    g = jax.grad(J)(path[-1]).reshape(-1)
    for theta in reversed(path[:-1]):
        g = (jnp.eye(15) + 2.0 * jax.hessian(J)(theta).reshape(15, 15)) @ g
    np.testing.assert_allclose(mg.exact_meta_gradient(cfg, mdp, phi), g.reshape(5, 3), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("kind", ["maml", "lirpg"])
@pytest.mark.parametrize("steps", [1, 2, 3])
def test_exact_meta_gradient_matches_independent_numpy_implementation(kind, steps):
    mdp, phi = problem(seed=steps, problem=kind)
    cfg = mg.MetaGradConfig(problem=kind, steps=steps, lr=10.0)
    ref = (maml_meta_gradient if kind == "maml" else lirpg_meta_gradient)(
        np.asarray(mdp.P), np.asarray(mdp.R), 0.8, 0, np.asarray(phi), 10.0, steps)
    ours = np.asarray(mg.exact_meta_gradient(cfg, mdp, phi))
    assert np.linalg.norm(ours - ref) <= 1e-8 * np.linalg.norm(ref)


def test_straight_through_has_inner_value_and_hessian_jacobian():
    value_fn = lambda x: x + 3.0  # noqa: E731
    jac_fn = lambda x: x**3  # noqa: E731
    f = lambda x: mg.straight_through(value_fn(x), jac_fn(x))  # noqa: E731
    x = jnp.array([0.5, -2.0])
    np.testing.assert_allclose(f(x), value_fn(x))
    np.testing.assert_allclose(jax.jacfwd(f)(x), jax.jacfwd(jac_fn)(x))
    np.testing.assert_allclose(jax.jacrev(f)(x), jax.jacrev(jac_fn)(x))


@pytest.mark.parametrize("kind", ["maml", "lirpg"])
@pytest.mark.parametrize("oracle", ["infinite", "finite"])
@pytest.mark.parametrize("steps", [1, 3])
def test_code_eee_equals_the_exact_meta_gradient(kind, oracle, steps):
    mdp, phi = problem(problem=kind)
    e = mg.Source("loaded")
    cfg = mg.MetaGradConfig(problem=kind, steps=steps, lr=10.0, horizon=8, oracle=oracle,
                            inner=e, hessian=e, outer=e)
    estimate = mg.estimate_meta_gradient(jax.random.key(0), cfg, mdp, phi)
    exact = mg.exact_meta_gradient(cfg, mdp, phi, "loaded")
    np.testing.assert_allclose(estimate, exact, rtol=0, atol=1e-10)


def test_step_value_follows_inner_and_jacobian_follows_hessian_ingredient():
    """One step with inner = exact and hessian = dice:N has exactly the exact step's value."""
    mdp, phi = problem()
    cfg = mg.MetaGradConfig(steps=1, lr=1.0, inner=mg.Source(), hessian=mg.Source("dice", 64))
    reward = mdp.R

    def step(theta, key):
        g_in = jax.grad(lambda th: mg.ingredient_objective(key, cfg, cfg.inner, mdp, th, reward))(theta)
        g_h = jax.grad(lambda th: mg.ingredient_objective(key, cfg, cfg.hessian, mdp, th, reward))
        return mg.straight_through(theta + g_in, theta + g_h(theta)), theta + g_h(theta)

    key = jax.random.key(3)
    combined, hessian_step = step(phi, key)
    np.testing.assert_allclose(combined, phi + jax.grad(lambda th: tabular.exact_return(mdp, th))(phi))
    jac = jax.jacrev(lambda th: step(th, key)[0])(phi)
    np.testing.assert_allclose(jac, jax.jacrev(lambda th: step(th, key)[1])(phi), atol=1e-12)


def test_lee_approaches_the_exact_meta_gradient_as_inner_samples_grow():
    """Only the inner (compositional) ingredient is sampled: its error shrinks with B_in."""
    mdp, phi = problem()
    cfg = mg.MetaGradConfig(steps=2, lr=3.0, horizon=10)
    exact = mg.exact_meta_gradient(cfg, mdp, phi)

    def sq_errors(samples):
        c = dataclasses.replace(cfg, inner=mg.Source("dice", samples))
        keys = jax.random.split(jax.random.key(samples), 256)
        est = jax.jit(jax.vmap(lambda k: mg.estimate_meta_gradient(k, c, mdp, phi)))(keys)
        return np.asarray(((est - exact) ** 2).sum((1, 2)))

    errors = [sq_errors(n) for n in (4, 64, 1024)]
    means = [e.mean() for e in errors]
    ses = [e.std(ddof=1) / np.sqrt(len(e)) for e in errors]
    for (m_small, s_small), (m_big, s_big) in zip(zip(means, ses, strict=True),
                                                  zip(means[1:], ses[1:], strict=True), strict=False):
        assert m_big + 4 * s_big < m_small - 4 * s_small, (means, ses)


def test_same_seed_gives_identical_estimates():
    mdp, phi = problem()
    cfg = mg.MetaGradConfig(steps=2, inner=mg.Source("lvc", 8), hessian=mg.Source("maml", 8),
                            outer=mg.Source("loaded", 8))
    f = mg.batched_estimates(cfg)
    stack = lambda x: jnp.asarray(x)[None]  # noqa: E731
    mdps, phis = jax.tree.map(stack, mdp), phi[None]
    a = f(jax.random.split(jax.random.key(4), (1, 5)), mdps, phis)
    b = f(jax.random.split(jax.random.key(4), (1, 5)), mdps, phis)
    c = f(jax.random.split(jax.random.key(5), (1, 5)), mdps, phis)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_injected_hessian_error_changes_only_the_jacobian():
    mdp, phi = problem()
    base = mg.MetaGradConfig(steps=2, lr=3.0)
    with_error = dataclasses.replace(base, hessian_error=2.0)
    key = jax.random.key(0)
    a = mg.estimate_meta_gradient(key, base, mdp, phi)
    b = mg.estimate_meta_gradient(key, with_error, mdp, phi)
    np.testing.assert_allclose(a, mg.exact_meta_gradient(base, mdp, phi), atol=1e-12)
    assert float(jnp.abs(a - b).max()) > 1e-3


@pytest.mark.parametrize("kwargs, message", [
    (dict(steps=0), "number of inner steps K must be an integer >= 1"),
    (dict(lr=-1.0), "inner learning rate must be > 0"),
    (dict(horizon=0), "horizon T must be an integer >= 1"),
    (dict(noise=-0.5), "critic noise must be >= 0"),
    (dict(problem="foo"), "unknown problem 'foo'"),
    (dict(oracle="bar"), "unknown oracle 'bar'"),
    (dict(loaded_lambda=1.5), "loaded_lambda must be in [0, 1]"),
])
def test_bad_configurations_are_clear_errors(kwargs, message):
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        mg.MetaGradConfig(**kwargs)


@pytest.mark.parametrize("text, message", [
    ("dice:0", "sample size in 'dice:0' must be an integer >= 1"),
    ("dice:-3", "must be an integer >= 1"),
    ("dice:x", "must be an integer >= 1"),
    ("foo:3", "unknown estimator 'foo'"),
    ("exact:3", "'exact' takes no sample size"),
])
def test_bad_ingredient_strings_are_clear_errors(text, message):
    with pytest.raises(InputError, match=message):
        mg.Source.parse(text)


def test_ingredient_parse():
    assert mg.Source.parse("dice:32") == mg.Source("dice", 32)
    assert mg.Source.parse("lvc") == mg.Source("lvc", 32)
    assert mg.Source.parse("exact") == mg.Source("exact", None)


def test_padded_sample_count_equals_the_unpadded_estimate():
    """counts = samples reproduces the plain estimate; a smaller count changes it and stays finite."""
    mdp, phi = problem()
    d = mg.Source("dice", 16)
    cfg = mg.MetaGradConfig(steps=2, lr=3.0, horizon=6, inner=d, hessian=d, outer=d)
    key = jax.random.key(9)
    plain = mg.estimate_meta_gradient(key, cfg, mdp, phi)
    full = mg.estimate_meta_gradient(key, cfg, mdp, phi, jnp.array([16, 16, 16]))
    fewer = mg.estimate_meta_gradient(key, cfg, mdp, phi, jnp.array([4, 16, 2]))
    np.testing.assert_allclose(full, plain, rtol=1e-12, atol=1e-14)
    assert bool(jnp.all(jnp.isfinite(fewer))) and not np.allclose(fewer, plain)


def test_zero_count_means_exact_ingredient():
    """counts [n, 0, 0] in an all-sampled program equals the lee code's own program."""
    mdp, phi = problem()
    d = mg.Source("loaded", 16)
    all_sampled = mg.MetaGradConfig(steps=2, lr=3.0, horizon=6, inner=d, hessian=d, outer=d)
    lee = dataclasses.replace(all_sampled, hessian=mg.Source("loaded"), outer=mg.Source("loaded"))
    key = jax.random.key(2)
    np.testing.assert_allclose(
        mg.estimate_meta_gradient(key, all_sampled, mdp, phi, jnp.array([16, 0, 0])),
        mg.estimate_meta_gradient(key, lee, mdp, phi), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(
        mg.estimate_meta_gradient(key, all_sampled, mdp, phi, jnp.array([0, 0, 0])),
        mg.exact_meta_gradient(all_sampled, mdp, phi, "loaded"), atol=1e-10)
