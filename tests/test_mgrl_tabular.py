"""Tabular MGRL (gmrl.mgrl_tabular): the exact oracle and the step estimators, against the formulas.

Each test names the mutation of src/gmrl/mgrl_tabular.py it was seen to catch (docs/mgrl_tabular.md).
"""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmrl import core
from gmrl import mgrl_tabular as mt
from gmrl.core import Source
from gmrl.envs import tabular

from . import reference_mgrl_numpy as ref

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def reference_mdps():
    """The reference code's seed-42 MDP and a second reference-like one (S = 20, A = 5, γ_out = 0.8)."""
    fixture = np.load(FIXTURES / "reference_seed42.npz")
    second = tabular.random_mdp(jax.random.key(7), 20, 5, 0.8)
    return [_jax(tabular.make_mdp(fixture["P"], fixture["R"], 0.8)),
            _jax(tabular.make_mdp(np.asarray(second.P), np.asarray(second.R), 0.8))]


def _jax(mdp):
    return jax.tree.map(jnp.asarray, mdp)


def small_mdp():
    """S = 3, A = 2, Dirichlet(1) transitions: every (state, action) is reached within T = 3 steps,
    so every Jacobian entry of a sampled step has a nonzero variance (a finite z)."""
    mdp = tabular.random_mdp(jax.random.key(3), 3, 2, 0.8, concentration=1.0)
    return _jax(tabular.make_mdp(np.asarray(mdp.P), np.asarray(mdp.R), 0.8))


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_exact_meta_gradient_equals_central_differences_and_the_numpy_reference(steps):
    """Autodiff through K expected steps = central differences of the same K-step map (1e-6 relative)
    and = the independent complex-step NumPy implementation of the formulas (1e-8 relative).
    Mutations caught: `lax.stop_gradient(V)` inside Q_λ (differences, 1e-2 relative off); Q_λ bootstrapping on
    v alone, dropping λ·V_λ (reference)."""
    for mdp in reference_mdps():
        _check_meta_gradient(mdp, steps)


def _check_meta_gradient(mdp, steps):
    cfg = mt.MGRLConfig(steps=steps, lr=10.0, critic_lr=0.5, gamma0=0.7, lambda0=0.6)
    problem = mt.problem(cfg, mdp)
    eta = mt.initial_eta(cfg, mdp)
    exact = np.asarray(jax.jit(lambda e: mt.exact_meta_gradient(cfg, mdp, e))(eta))
    unroll = jax.jit(lambda e: core.unroll(problem, core.EXACT_PARTS, jax.random.key(0), e,
                                           mt.config_hyper(cfg), steps))
    h, eye = 1e-5, jnp.eye(2)
    central = np.array([(float(unroll(eta + h * eye[j])) - float(unroll(eta - h * eye[j]))) / (2 * h)
                        for j in range(2)])
    assert np.abs(central - exact).max() <= 1e-6 * np.abs(exact).max(), (central, exact)
    numpy = ref.meta_gradient(np.asarray(mdp.P), np.asarray(mdp.R), 0.8, 0, np.asarray(eta), 10.0, 0.5, steps)
    assert np.abs(numpy - exact).max() <= 1e-8 * np.abs(numpy).max(), (numpy, exact)


def _flat(delta: mt.Learner) -> jax.Array:
    return jnp.concatenate([delta.x.ravel(), delta.v])


def _point(mdp):
    S, A = mdp.R.shape
    x = jax.random.normal(jax.random.key(11), (S, A))
    v = jax.random.normal(jax.random.key(12), (S,))
    return x, v, jnp.array([mt.logit(0.7), mt.logit(0.6)])


def _step_map(mdp, source: Source, key, horizon=3, alpha=1.0, beta=0.5):
    """z = (x, v, η) flattened -> the step Δ flattened, from `source` (the finite oracle if exact)."""
    S, A = mdp.R.shape
    cfg = mt.MGRLConfig(lr=alpha, critic_lr=beta, horizon=horizon, oracle="finite")
    problem = mt.problem(cfg, mdp)

    def step(z):
        theta = mt.Learner(z[:S * A].reshape(S, A), z[S * A:S * A + S])
        return _flat(problem.increment(key, source, theta, z[S * A + S:], alpha))

    return step


def test_finite_oracle_step_and_its_jacobian_equal_the_numpy_reference():
    """The finite-horizon expected step and its Jacobian in (x, v, η) = the NumPy reference (1e-8);
    with T = 400 the finite step equals the infinite one. Mutation caught: d_t weighted by γ^{t+1}."""
    mdp = small_mdp()
    x, v, eta = _point(mdp)
    z = jnp.concatenate([x.ravel(), v, eta])
    step = _step_map(mdp, Source(), None)
    P, R = np.asarray(mdp.P), np.asarray(mdp.R)
    dx, dv = ref.finite_expected_step(P, R, 0, np.asarray(x), np.asarray(v), 0.7, 0.6, 1.0, 0.5, 3)
    want = np.concatenate([dx.ravel(), dv])
    assert np.abs(np.asarray(step(z)) - want).max() <= 1e-8 * np.abs(want).max()
    jac = np.asarray(jax.jacfwd(step)(z))
    want_jac = ref.step_jacobian(P, R, 0, np.asarray(x), np.asarray(v), np.asarray(eta), 1.0, 0.5, 3)
    assert np.abs(jac - want_jac).max() <= 1e-8 * np.abs(want_jac).max()
    long = mt.expected_step(mdp, mt.Learner(x, v), 0.7, 0.6, 1.0, 0.5, 400)
    infinite = mt.expected_step(mdp, mt.Learner(x, v), 0.7, 0.6, 1.0, 0.5)
    assert np.abs(_flat(long) - _flat(infinite)).max() <= 1e-12


DRAWS, EPISODES = 4000, 8


def _draws(mdp, estimator, jacobian: bool):
    """DRAWS independent sampled steps (or their Jacobians in (x, v, η)), EPISODES episodes each."""
    x, v, eta = _point(mdp)
    z = jnp.concatenate([x.ravel(), v, eta])

    def one(key):
        step = _step_map(mdp, Source(estimator, EPISODES), key)
        return jax.jacfwd(step)(z) if jacobian else step(z)

    keys = jax.random.split(jax.random.key(2026), DRAWS)
    return np.asarray(jax.jit(jax.vmap(one))(keys)), z


def _z_scores(samples, truth):
    mean = samples.mean(0)
    se = samples.std(0, ddof=1) / np.sqrt(samples.shape[0])
    return (mean - truth) / np.where(se > 0, se, np.nan), se


Z_BONFERRONI = 4.5  # two-sided, family-wise level ≈ 6e-4 over 99 entries


def test_sampled_step_is_unbiased_for_the_expected_step_and_the_same_for_every_estimator():
    """E[sampled step] = the finite oracle's expected step: every entry |z| < 4.5 (Bonferroni), every
    se > 0; all four estimators give the same value draw by draw (the boxes have value 1).
    Mutation caught: TD error bootstrapping on v(s_t) instead of v(s_{t+1}) (max |z| = 650)."""
    mdp = small_mdp()
    values, z = _draws(mdp, "maml", jacobian=False)
    truth = np.asarray(_step_map(mdp, Source(), None)(z))
    scores, se = _z_scores(values, truth)
    assert np.all(se > 0)
    assert np.abs(scores).max() < Z_BONFERRONI, scores
    for estimator in ("lvc", "loaded", "dice"):
        other, _ = _draws(mdp, estimator, jacobian=False)
        np.testing.assert_allclose(other, values, rtol=0, atol=1e-12)


def _blocks(mdp):
    """Row / column slices of the step Jacobian: Δx, Δv rows; x, v, η columns."""
    S, A = mdp.R.shape
    return (slice(0, S * A), slice(S * A, S * A + S)), (slice(0, S * A), slice(S * A, S * A + S),
                                                        slice(S * A + S, S * A + S + 2))


@pytest.fixture(scope="module")
def jacobian_draws():
    with jax.enable_x64(True):
        mdp = small_mdp()
        x, v, eta = _point(mdp)
        truth = ref.step_jacobian(np.asarray(mdp.P), np.asarray(mdp.R), 0, np.asarray(x), np.asarray(v),
                                  np.asarray(eta), 1.0, 0.5, 3)
        return mdp, truth, {e: _draws(mdp, e, jacobian=True)[0] for e in mt.ESTIMATORS}


@pytest.mark.parametrize("estimator", mt.UNBIASED)
def test_unbiased_estimators_step_jacobian(jacobian_draws, estimator):
    """loaded and dice: every one of the 9 × 11 entries of the step Jacobian in (x, v, η) has a finite
    z against the oracle (complex-step NumPy Jacobian of the finite expected step), all |z| < 4.5.
    Mutations caught: loaded's box over a_{<u} only (W_{u−1}: max |z| = 154);
    dice without the box in the critic part (the 18 entries of ∂Δv/∂x have se = 0)."""
    _, truth, draws = jacobian_draws
    scores, se = _z_scores(draws[estimator], truth)
    assert np.all(se > 0), f"{np.sum(se == 0)} entries without variance"
    assert np.abs(scores).max() < Z_BONFERRONI, np.abs(scores).max()


@pytest.mark.parametrize("estimator", ["maml", "lvc"])
def test_vanilla_and_lvc_step_jacobians_are_biased_in_x_only(jacobian_draws, estimator):
    """maml and lvc: biased in the policy block ∂Δx/∂x (some |z| > 10) and the critic block ∂Δv/∂x
    (identically 0, where the oracle is not: the episodes' distribution moves with x); unbiased in
    ∂Δ/∂v and ∂Δ/∂η (|z| < 4.5, finite). Mutation caught: maml with the causal loaded box
    (the 'biased' assertion fails)."""
    mdp, truth, draws = jacobian_draws
    (rows_x, rows_v), (cols_x, cols_v, cols_eta) = _blocks(mdp)
    scores, se = _z_scores(draws[estimator], truth)
    assert np.nanmax(np.abs(scores[rows_x, cols_x])) > 10
    critic = draws[estimator][:, rows_v, cols_x]
    assert np.all(critic == 0) and np.abs(truth[rows_v, cols_x]).max() > 1e-3
    for cols in (cols_v, cols_eta):
        block = scores[:, cols]
        assert np.all(se[:, cols] > 0) and np.abs(block).max() < Z_BONFERRONI, np.abs(block).max()


def test_k1_meta_gradients_of_all_sampled_estimators_are_equal_draw_by_draw():
    """At K = 1 θ_0 = 0 does not depend on η, so only ∂Δ/∂η enters, where a box (value 1, no η
    derivative) changes nothing: maml, lvc, loaded and dice give the same estimate draw by draw; at
    K = 2 maml and lvc differ. Mutation caught: lvc's advantage under stop_gradient (ρ_t·sg A_t),
    at the check that the indexed and the named lvc agree at K = 2."""
    mdp = reference_mdps()[0]
    mdps = jax.tree.map(lambda leaf: leaf[None], mdp)
    keys = jax.random.split(jax.random.key(5), (1, 4))
    got = {}
    for steps in (1, 2):
        cfg = mt.MGRLConfig(steps=steps, lr=10.0, gamma0=0.7, lambda0=0.6, inner=Source("maml", 4),
                            hessian=Source("same"))
        estimate = mt.batched_estimates(cfg)  # the estimator is a traced index: one program per K
        etas = mt.initial_etas(cfg, mdps)
        for index, estimator in enumerate(mt.ESTIMATORS):
            got[steps, estimator] = np.asarray(estimate(keys, mdps, etas, estimator_index=jnp.asarray(index)))
    lvc_cfg = dataclasses.replace(cfg, inner=Source("lvc", 4))  # the estimator by name, K = 2
    named = jax.jit(lambda key, eta: mt.estimate_meta_gradient(key, lvc_cfg, mdp, eta))(keys[0, 0], etas[0])
    np.testing.assert_allclose(np.asarray(named), got[2, "lvc"][0, 0], rtol=1e-12)
    for estimator in ("lvc", "loaded", "dice"):
        np.testing.assert_allclose(got[1, estimator], got[1, "maml"], rtol=1e-12, atol=1e-14)
    assert np.abs(got[2, "lvc"] - got[2, "maml"]).max() > 1e-6


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_cli_exact_meta_gradient_on_the_reference_mdps_equals_the_numpy_reference(tmp_path, capsys, steps):
    """Acceptance: `gmrl tabular --problem mgrl --inner exact --hessian exact --outer exact --gamma0 0.7
    --lambda0 0.6 --critic-lr 0.5 --lr 10 --mdp FILE` on the seed-42 MDP and a second one = the
    independent float64 implementation to 1e-8 relative (JSON `exact_meta_gradient`, a 2-vector)."""
    import json

    from gmrl.cli import main

    for index, mdp in enumerate(reference_mdps()):
        path, out = tmp_path / f"mdp{index}.npz", tmp_path / f"r{index}.json"
        np.savez(path, P=np.asarray(mdp.P), R=np.asarray(mdp.R), gamma=0.8)
        try:
            main(["tabular", "--problem", "mgrl", "--mdp", str(path), "--steps", str(steps), "--repeats", "3",
                  "--inner", "exact", "--hessian", "exact", "--outer", "exact", "--gamma0", "0.7",
                  "--lambda0", "0.6", "--critic-lr", "0.5", "--lr", "10", "--out", str(out)])
        except SystemExit as exit_:
            assert exit_.code == 0, capsys.readouterr().err
        exact = np.asarray(json.loads(out.read_text())["exact_meta_gradient"])[0]
        want = ref.meta_gradient(np.asarray(mdp.P), np.asarray(mdp.R), 0.8, 0,
                                 np.array([mt.logit(0.7), mt.logit(0.6)]), 10.0, 0.5, steps)
        assert exact.shape == (2,)
        assert np.abs(exact - want).max() <= 1e-8 * np.abs(want).max(), (exact, want)
    assert "mgrl, K=" in capsys.readouterr().out


def test_study_report_has_every_verdict_line():
    """report.md of `gmrl study mgrl-tabular` (on synthetic stored results, no computation): one
    verdict line per K for 'LVC below vanilla', the Hessian-bias and LVC-advantage growth lines, the
    dominant source at the reference K, and the closed-loop verdict with Holm p and the gap fraction."""
    from gmrl.studies import mgrl_tabular as study
    from gmrl.studies import mgrl_tabular_report as report

    s = study.settings(True, 0)
    rng = np.random.default_rng(0)
    rows = [p | {"estimator": e, "code": c, "bias2": float(rng.uniform(1e-4, 1e-3)), "bias2_se": 1e-5,
                 "variance": 1.0, "truth_sq": 1.0}
            for p in study._bias_points(s) for e in study.ESTIMATORS for c in study.CODES]
    bias = {"rows": rows, "step_norm": [0.05, 0.07]}
    n, seeds, updates = s["b"]["mdps"], s["b"]["seeds"], s["b"]["updates"]
    loop = {arm: {"returns": (rng.normal(size=(n, seeds, updates + 1)) + i).tolist(),
                  "etas": rng.normal(size=(n, seeds, updates + 1, 2)).tolist()}
            for i, arm in enumerate(study.ARMS)} | {"seconds": 1.0}
    text = report.report(bias, loop, s, 12.0)
    for k in s["a"]["steps"]:
        assert f"LVC's meta-gradient bias is below vanilla's (lll), K = {k}: **" in text
    assert text.count("grows with K: **") == 3
    assert "Dominant bias source at K = " in text and "α‖∂step/∂x‖ > 1 for α in [30.0]" in text
    assert "**Verdict (the paper's claim" in text and "Holm p" in text and "of the gap from vanilla" in text
