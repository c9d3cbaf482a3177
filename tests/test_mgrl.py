"""A2C / MGRL / MGRL-LVC on gymnax (issue 5): exact meta-gradient, LVC curvature, learning."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from gmrl.algos import a2c, mgrl
from gmrl.algos.networks import Network, conv3x3_valid
from gmrl.errors import InputError


def _to64(tree):
    return jax.tree.map(lambda v: v.astype(jnp.float64) if jnp.issubdtype(v.dtype, jnp.floating)
                        else v, tree)


@functools.cache
def _tiny_problem(lvc: bool, inner_steps: int, seed: int = 0):
    """CartPole, 4 envs × 3 steps, K inner steps; the RMSProp state is set to random positive
    values so that its path through the meta-gradient is exercised."""
    config = mgrl.MGRLConfig(env_name="CartPole-v1", num_envs=4, num_steps=3,
                             inner_steps=inner_steps, lvc=lvc, outer_value_coef=0.3,
                             outer_entropy_coef=0.02, outer_kl_coef=0.5, learning_rate=1e-2)
    state = jax.jit(mgrl.make_mgrl(config).init)(jax.random.key(seed))
    leaves, treedef = jax.tree.flatten(state.opt_state)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    leaves = [jax.random.uniform(k, v.shape, v.dtype, 1e-4, 1e-2) for k, v in zip(keys, leaves,
                                                                                 strict=True)]
    state = state._replace(opt_state=jax.tree.unflatten(treedef, leaves))
    env, env_params, network = a2c.make_env_and_network(config.env_name)
    return config, env, env_params, network, state


def _fd_gradient(objective, x: jax.Array, step: float) -> np.ndarray:
    """Central finite differences of a scalar function along each coordinate of x."""
    grads = []
    for i in range(x.shape[0]):
        e = jnp.zeros_like(x).at[i].set(step)
        grads.append((objective(x + e) - objective(x - e)) / (2 * step))
    return np.asarray(grads)


def test_meta_gradient_matches_float64_finite_differences():
    """∇_x L_out of the compiled step equals central differences of L_out (K = 2, float64, with
    value, entropy and KL outer terms on), the outer advantages held fixed (they are constants
    under stop-gradient)."""
    config, env, env_params, network, state = _tiny_problem(lvc=False, inner_steps=2)
    with jax.enable_x64(True):
        args = _to64((state.meta_logits, state.params, state.opt_state, state.runner,
                      state.batch))
        meta_grad = jax.jit(mgrl.make_meta_gradient(config, env, env_params, network))
        objective = jax.jit(mgrl.make_meta_objective(config, env, env_params, network))
        loss, grad, result = meta_grad(*args, state.key)

        def outer_loss(x):  # stop-gradient outer advantages held at their values at x
            return objective(x, *args[1:], state.key, result.params)[0]

        fd = _fd_gradient(outer_loss, args[0], 1e-6)
        np.testing.assert_allclose(outer_loss(args[0]), loss, rtol=1e-12)
    assert grad.dtype == jnp.float64
    # every meta-parameter has a non-trivial meta-gradient, and it matches the FD derivative
    # (tolerance: central differences in float64 with h = 1e-6 agree to ~1e-9 of the norm)
    scale = np.abs(fd).max()
    assert np.all(np.abs(fd) > 1e-5 * scale), fd
    np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-7 * scale)


def _fd_atol(value: float, step: float) -> float:
    """Round-off bound of a float64 central difference: ~ε|L|/h (with a safety factor of 100)."""
    return 100 * np.finfo(np.float64).eps * abs(float(value)) / step


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _replay_loss(x, config, inner_steps, surrogate, exact, params, opt_state, batch):
    """K inner updates on one fixed batch, then the policy-gradient loss of θ_K (fixed baseline)."""
    network = a2c.make_env_and_network(config.env_name)[2]
    optimizer = a2c.make_optimizer(config)
    p, s = params, opt_state
    for _ in range(inner_steps):
        p, s, _ = a2c.inner_update(network, optimizer, p, s, batch, mgrl.coefs_from_logits(x),
                                   surrogate, exact)
    return a2c.actor_critic_loss(network, p, batch, a2c.fixed_coefs(config),
                                 baseline_params=params)[1]["pg_loss"]


def test_exact_jacobian_matters_for_the_finite_difference_check():
    """With a stop-gradient baseline inside the update the K = 2 meta-gradient is not the
    derivative of the computation: the finite-difference test above can fail."""
    config, _, _, _, state = _tiny_problem(lvc=False, inner_steps=2)
    with jax.enable_x64(True):
        x, params, opt_state, batch = _to64((state.meta_logits, state.params, state.opt_state,
                                             state.batch))
        rest = (params, opt_state, batch)
        exact = jax.grad(_replay_loss)(x, config, 2, "maml", True, *rest)
        stopped = jax.grad(_replay_loss)(x, config, 2, "maml", False, *rest)
        fd = _fd_gradient(lambda x: _replay_loss(x, config, 2, "maml", True, *rest), x, 1e-6)
        atol = _fd_atol(_replay_loss(x, config, 2, "maml", True, *rest), 1e-6)
    np.testing.assert_allclose(exact, fd, rtol=1e-5, atol=atol)
    assert not np.allclose(stopped, fd, rtol=1e-5, atol=atol)


def test_lvc_changes_the_meta_gradient_only_beyond_one_inner_step():
    """With K = 1 θ_0 does not depend on η, so the Hessians never enter: LVC = vanilla. K = 2
    multiplies by the Jacobian of the first update, where the two Hessians differ."""
    config, _, _, _, state = _tiny_problem(lvc=False, inner_steps=2)
    with jax.enable_x64(True):
        x, *rest = _to64((state.meta_logits, state.params, state.opt_state, state.batch))
        grads = {(k, s): np.asarray(jax.grad(_replay_loss)(x, config, k, s, True, *rest))
                 for k in (1, 2) for s in ("maml", "lvc")}
    scale = np.abs(grads[2, "maml"]).max()
    np.testing.assert_allclose(grads[1, "lvc"], grads[1, "maml"], rtol=1e-9, atol=1e-12 * scale)
    assert np.max(np.abs(grads[2, "lvc"] - grads[2, "maml"])) > 1e-3 * scale


def _batch_and_params(lvc_seed=0):
    config = a2c.A2CConfig(env_name="CartPole-v1", num_envs=8, num_steps=5)
    env, env_params, network = a2c.make_env_and_network(config.env_name)
    key = jax.random.key(lvc_seed)
    params = network.init(key)
    runner = a2c.reset_runner(env, env_params, key, config.num_envs)
    _, batch, _ = a2c.rollout(env, env_params, network, params, runner, key, config.num_steps)
    return config, network, params, batch


def test_lvc_keeps_the_update_value_and_changes_its_second_derivative():
    config, network, params, batch = _batch_and_params()
    coefs = a2c.fixed_coefs(config)
    optimizer = a2c.make_optimizer(config)
    state = optimizer.init(params)
    new = {s: a2c.inner_update(network, optimizer, params, state, batch, coefs, s)[0]
           for s in ("maml", "lvc")}
    for a, b in zip(jax.tree.leaves(new["maml"]), jax.tree.leaves(new["lvc"]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)

    # Hessian-vector products of the policy loss differ by exactly the score outer-product term:
    # (H_lvc − H_maml) v = −mean_{t,n} A_t (∇log π_t · v) ∇log π_t (Rothfuss et al. 2019).
    with jax.enable_x64(True):
        params, obs, actions = _to64(params), batch.obs.astype(jnp.float64), batch.actions
        advantages = jax.random.normal(jax.random.key(3), actions.shape, jnp.float64)
        direction, unravel = ravel_pytree(params)
        direction = unravel(jax.random.normal(jax.random.key(4), direction.shape, jnp.float64))

        def log_prob(p):
            logits = network.policy(p, obs)
            return jnp.take_along_axis(jax.nn.log_softmax(logits), actions[..., None], -1)[..., 0]

        @functools.partial(jax.jit, static_argnums=0)
        def hvp(name):
            grad = jax.grad(lambda p: -a2c.policy_surrogate(name, log_prob(p), advantages))
            return ravel_pytree(jax.jvp(grad, (params,), (direction,))[1])[0]

        @jax.jit
        def score_term():
            scores = jax.jacrev(lambda p: log_prob(p).ravel())(params)
            scores = jnp.concatenate([s.reshape(actions.size, -1)
                                      for s in jax.tree.leaves(scores)], axis=1)
            flat_v = jnp.concatenate([v.ravel() for v in jax.tree.leaves(direction)])
            return -jnp.mean((advantages.ravel() * (scores @ flat_v))[:, None] * scores, 0)

        diff, expected, maml_hvp = hvp("lvc") - hvp("maml"), score_term(), hvp("maml")
        # leaves of ravel_pytree and of jax.tree.leaves come in the same order
    assert np.linalg.norm(expected) > 1e-3 * np.linalg.norm(maml_hvp)
    np.testing.assert_allclose(diff, expected, rtol=1e-8, atol=1e-10 * np.abs(expected).max())


def test_conv_as_patches_matches_lax_conv():
    x = jax.random.normal(jax.random.key(0), (2, 10, 10, 4))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 4, 16))
    layer = {"w": kernel.reshape(36, 16), "b": jnp.zeros(16)}
    reference = jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(conv3x3_valid(x, layer), reference, rtol=1e-5, atol=1e-5)


def test_bad_settings_raise_input_error():
    with pytest.raises(InputError, match="unknown algorithm"):
        mgrl.make_algorithm("ppo", "CartPole-v1")
    with pytest.raises(InputError, match="unknown environment"):
        mgrl.make_algorithm("a2c", "Pong-v0")
    with pytest.raises(InputError, match="unknown meta-parameters"):
        mgrl.make_algorithm("mgrl", "CartPole-v1", meta_params=("gamma", "alpha"))
    with pytest.raises(InputError, match="must lie in"):
        mgrl.make_algorithm("mgrl", "CartPole-v1", gamma=1.0)


def _final_returns(algo: str, frames: int, seeds: int, **overrides) -> np.ndarray:
    """Per-seed mean return of the episodes completed in the last 20% of training ([S]), and the
    metrics ([S, steps] each)."""
    algorithm = mgrl.make_algorithm(algo, "CartPole-v1", **overrides)
    steps = frames // algorithm.frames_per_step
    _, metrics = a2c.train(algorithm, jax.random.key(7), seeds, steps)
    window = max(1, steps // 5)
    sums = np.asarray(metrics["return_sum"])[:, -window:].sum(1)
    counts = np.asarray(metrics["return_count"])[:, -window:].sum(1)
    assert np.all(counts > 0)
    return sums / counts, jax.tree.map(np.asarray, metrics)


@pytest.fixture(scope="module")
def random_policy_returns() -> np.ndarray:
    """Per-seed mean CartPole return of the uniform random policy (6 seeds × 64 envs × 200 steps),
    through the same rollout code as training."""
    env, env_params, _ = a2c.make_env_and_network("CartPole-v1")
    uniform = Network(None, lambda params, obs: jnp.zeros(obs.shape[:-1] + (2,)), None)

    @jax.jit
    @jax.vmap
    def returns(key):
        runner = a2c.reset_runner(env, env_params, key, 64)
        _, _, stats = a2c.rollout(env, env_params, uniform, None, runner, key, 200)
        return stats.return_sum / stats.return_count

    return np.asarray(returns(jax.random.split(jax.random.key(11), 6)))


def _assert_beats_random(trained: np.ndarray, random: np.ndarray) -> None:
    """At least three times the random return on average, and Welch z > 4 over seeds for the
    log-returns (returns are positive and their spread across seeds is multiplicative)."""
    trained_log, random_log = np.log(trained), np.log(random)
    se = np.sqrt(trained_log.var(ddof=1) / trained.size + random_log.var(ddof=1) / random.size)
    z = (trained_log.mean() - random_log.mean()) / se
    assert trained.mean() > 3 * random.mean(), (trained, random)
    assert z > 4, (trained, random, z)


def test_short_cartpole_a2c_beats_a_random_policy(random_policy_returns):
    trained, _ = _final_returns("a2c", 60_000, 6, learning_rate=1e-2)
    _assert_beats_random(trained, random_policy_returns)


def test_short_cartpole_mgrl_lvc_beats_a_random_policy_and_learns_only_chosen_meta_params(
        random_policy_returns):
    """The MGRL path with K = 2 (where LVC's curvature differs), γ and λ meta-learned."""
    trained, metrics = _final_returns("mgrl-lvc", 60_000, 6, learning_rate=1e-2, inner_steps=2,
                                      meta_params=("gamma", "lam"))
    _assert_beats_random(trained, random_policy_returns)
    assert set(metrics) == set(a2c.METRIC_NAMES)
    np.testing.assert_allclose(metrics["entropy_coef"], 0.01, rtol=1e-5)
    np.testing.assert_allclose(metrics["value_coef"], 0.5, rtol=1e-5)
    # γ and λ move away from their initial values (float32 spacing there: 6e-8)
    assert np.all(np.abs(metrics["gamma"] - 0.99).max(1) > 1e-5)
    assert np.all(np.abs(metrics["lam"] - 0.95).max(1) > 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("algo", mgrl.ALGOS)
def test_cartpole_training_at_reference_settings(algo, random_policy_returns):
    """Reference hyper-parameters (K = 3, lr 7e-4), 300k frames, 6 seeds (the fast test above
    covers the same property with a larger learning rate)."""
    _assert_beats_random(_final_returns(algo, 300_000, 6)[0], random_policy_returns)


def test_frame_accounting():
    algorithm = mgrl.make_algorithm("mgrl", "CartPole-v1", num_envs=4, num_steps=3,
                                    inner_steps=2)
    assert algorithm.frames_per_step == 2 * 4 * 3 and algorithm.init_frames == 4 * 3
    assert mgrl.make_algorithm("a2c", "CartPole-v1", num_envs=4, num_steps=3).frames_per_step == 12
    assert mgrl.make_algorithm("mgrl", "CartPole-v1", num_envs=4, num_steps=3,
                               inner_steps=2) is algorithm


def test_interrupted_run_leaves_complete_logs_and_resumes_to_the_same_numbers(tmp_path,
                                                                              monkeypatch):
    from gmrl.io import read_csv
    from gmrl.runs import mgrl as runs

    real = a2c.compiled_run_steps
    calls = {"n": 0}

    def interrupt_on_third_chunk(algorithm, steps):
        run = real(algorithm, steps)

        def wrapped(states):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt
            return run(states)

        return wrapped

    config = runs.run_config("a2c", "CartPole-v1", 4 * 5 * 12, 2, 0, 6,
                             {"num_envs": 4, "num_steps": 5})
    uninterrupted = runs.train(config, tmp_path / "whole", progress=False)
    out = tmp_path / "run"
    monkeypatch.setattr(a2c, "compiled_run_steps", interrupt_on_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        runs.train(config, out, progress=False)
    rows = read_csv(out / "progress.csv")
    assert [int(r["frames"]) for r in rows] == [40, 40, 80, 80]
    assert all(set(r) == set(runs.CSV_FIELDS) and all(v != "" for v in r.values())
               for r in rows)
    assert runs.has_run(out, config)
    assert not runs.has_run(out, {**config, "seed": 1})
    monkeypatch.setattr(a2c, "compiled_run_steps", real)
    resumed = runs.train(config, out, progress=False)
    rows = read_csv(out / "progress.csv")
    assert [int(r["frames"]) for r in rows][::2] == [40, 80, 120, 160, 200, 240]
    summary = resumed["summary"]
    assert summary["frames_done"] == 240 and len(summary["final_return_per_seed"]) == 2
    def numbers(rows):  # everything but the timings; NaN (no episode finished) compares equal
        return json.dumps([{k: v for k, v in r.items() if k not in ("fps", "wall_s")}
                           for r in rows])

    assert numbers(resumed["rows"]) == numbers(uninterrupted["rows"])


def test_checkpoint_round_trip_and_mismatch(tmp_path):
    from gmrl.runs import checkpoint

    algorithm = mgrl.make_algorithm("mgrl", "CartPole-v1", num_envs=4, num_steps=3,
                                    inner_steps=2)
    states = a2c.init_seeds(algorithm, jax.random.key(0), 2)
    checkpoint.save(tmp_path / "c.msgpack", states, 7)
    restored, steps = checkpoint.restore(tmp_path / "c.msgpack", states)
    assert steps == 7
    for x, y in zip(jax.tree.leaves(states), jax.tree.leaves(restored), strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)
    other = a2c.init_seeds(algorithm, jax.random.key(0), 3)
    with pytest.raises(InputError, match="does not match this configuration"):
        checkpoint.restore(tmp_path / "c.msgpack", other)


def test_cli_constants_match_the_library():
    from gmrl.commands import mgrl as command
    from gmrl.runs import mgrl as runs

    assert command.ALGOS == runs.ALGOS == mgrl.ALGOS
    assert command.META_PARAMS == mgrl.META_PARAMS
    assert command.ENVS == a2c.SUPPORTED_ENVS and runs.STUDY_GAMES == a2c.MINATAR_GAMES


def test_study_report_and_figures_from_run_logs(tmp_path):
    from gmrl.runs import mgrl as runs

    rng = np.random.default_rng(0)
    results = {}
    for algo in mgrl.ALGOS:
        rows = [{"frames": f, "seed": s, "episode_return": f / 100 + rng.normal(),
                 "episodes": 3, "fps": 1e4, "wall_s": f / 1e4, "gamma": 0.99 - f * 1e-6,
                 "lam": 0.95, "entropy_coef": 0.01, "value_coef": 0.5, "loss": 0.0,
                 "meta_grad_norm": 0.0} for f in (100, 200, 300) for s in range(3)]
        config = runs.run_config(algo, "Breakout-MinAtar", 300, 3, overrides={"num_envs": 8})
        summary = runs.summarize(rows, config, a2c.Algorithm(None, None, 320, 0),
                                 mgrl.make_config(algo, "Breakout-MinAtar", num_envs=8))
        results[("Breakout-MinAtar", algo)] = {"summary": summary, "rows": rows}
    figures = runs.plot_study(tmp_path, results, ["Breakout-MinAtar"])
    report = runs.report(results, ["Breakout-MinAtar", "Asterix-MinAtar"], tmp_path)
    assert figures[0].exists() and figures[0].stat().st_size > 10_000
    assert report.count("| Breakout-MinAtar |") == 3 and "(not run)" in report
    assert "±" in report and "0.9897" in report and "Asterix-MinAtar.png" not in report
    assert "8 envs × 5 steps" in report and "K = 3 inner steps" in report  # as configured
