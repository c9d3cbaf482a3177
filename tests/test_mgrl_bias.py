"""MGRL meta-gradient bias diagnostic (issue 10, item 3): validated where the answer is known.

A two-step episodic MDP small enough to enumerate every batch gives exact expectations: the DiCE
inner step's Jacobian is unbiased for the Jacobian of the expected inner gradient (vanilla and LVC
are not), and the DiCE meta-gradient at a large batch matches the exact meta-gradient of the
expected K-step computation (checked against float64 finite differences). At K = 1 mgrl and
mgrl-lvc coincide draw by draw, and the diagnostic reports zero difference.
"""

from __future__ import annotations

import functools
import itertools
import json
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from click.testing import CliRunner

from gmrl.algos import a2c, mgrl, mgrl_bias, presets
from gmrl.algos.a2c import Batch
from gmrl.algos.networks import Network
from gmrl.errors import InputError
from gmrl.runs import mgrl as mgrl_runs

# --------------------------------------------------------------------------- a tiny MDP

REWARDS = np.array([[0.3, 1.0], [2.0, -1.0]])  # R[s, a]; the next state is the action
EPISODE = 2  # every episode lasts 2 steps, then the env resets to state 0


class _EnvState(NamedTuple):
    pos: jax.Array
    time: jax.Array


class TwoStep:
    """Two states, two actions, s' = a, reward R[s, a], episodes of 2 steps from state 0; the
    gymnax interface used by `a2c.rollout` (step returns obs, state, r, terminated, truncated,
    info; auto-reset)."""

    def reset(self, key, params=None):
        return self._obs(jnp.int32(0)), _EnvState(jnp.int32(0), jnp.int32(0))

    def step(self, key, state, action, params=None):
        reward = jnp.asarray(REWARDS, jnp.float32)[state.pos, action]
        time = state.time + 1
        done = time >= EPISODE
        pos = jnp.where(done, 0, action).astype(jnp.int32)
        new = _EnvState(pos, jnp.where(done, 0, time).astype(jnp.int32))
        return self._obs(pos), new, reward, done, jnp.bool_(False), {}

    @staticmethod
    def _obs(pos):
        return jax.nn.one_hot(pos, 2, dtype=jnp.zeros(()).dtype)  # float64 under x64


def linear_network() -> Network:
    """Linear policy logits and a linear critic on [obs, γ] (small: fast to compile)."""
    def init(key):
        k1, k2 = jax.random.split(key)
        return {"pi": jax.random.normal(k1, (2, 2)) * 0.5, "pi_b": jnp.zeros(2),
                "v": jax.random.normal(k2, (3,)) * 0.5}

    def policy(params, obs):
        return obs @ params["pi"] + params["pi_b"]

    def apply(params, obs, gamma):
        gamma = jnp.broadcast_to(jnp.asarray(gamma, obs.dtype), obs.shape[:-1] + (1,))
        return policy(params, obs), jnp.concatenate([obs, gamma], -1) @ params["v"]

    return Network(init, policy, apply)


def _to64(tree):
    return jax.tree.map(lambda v: v.astype(jnp.float64) if jnp.issubdtype(v.dtype, jnp.floating)
                        else v, tree)


def _config(inner_steps=2, num_envs=2, **kw):
    fields = {"env_name": "CartPole-v1", "num_envs": num_envs, "num_steps": EPISODE,
              "inner_steps": inner_steps, "learning_rate": 0.05, "max_grad_norm": 10.0,
              "outer_value_coef": 0.2, "entropy_coef": 0.05, "value_coef": 0.5, **kw}
    fields.setdefault("preset", "full")  # RMSProp, no path held: exact derivatives everywhere
    return mgrl.MGRLConfig(**fields)


def _tiny_state(config, seed=0):
    """An MGRLState on TwoStep with a random RMSProp state and a D_0 from the initial policy."""
    env, network = TwoStep(), linear_network()
    key = jax.random.key(seed)
    params = network.init(key)
    opt_state = presets.base_optimizer(config).init(params)
    leaves, treedef = jax.tree.flatten(opt_state)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [jax.random.uniform(k, v.shape, v.dtype, 1e-3, 1e-1)
              if jnp.issubdtype(v.dtype, jnp.floating) else v
              for k, v in zip(keys, leaves, strict=True)]
    opt_state = jax.tree.unflatten(treedef, leaves)
    runner = a2c.reset_runner(env, None, key, config.num_envs)
    runner, batch, _ = a2c.rollout(env, None, network, params, runner, jax.random.key(seed + 2),
                                   config.num_steps)
    x = mgrl.meta_logits_init(config)
    state = mgrl.MGRLState(params, opt_state, runner, batch, x, None, key)
    return env, network, state


def _all_batches(env, num_envs):
    """Every batch of `num_envs` episodes from state 0: (Batch with a leading [B] axis, actions
    [B, T, N])."""
    rows = []
    for seq in itertools.product(range(2), repeat=EPISODE * num_envs):
        acts = np.array(seq).reshape(num_envs, EPISODE).T  # [T, N]
        obs, rew, done = [], [], []
        for n in range(num_envs):
            s = env.reset(None)[1]
            o = env._obs(s.pos)
            per = []
            for t in range(EPISODE):
                new_o, s, r, d, _, _ = env.step(None, s, jnp.int32(acts[t, n]))
                per.append((o, r, d))
                o = new_o
            obs.append([p[0] for p in per])
            rew.append([p[1] for p in per])
            done.append([p[2] for p in per])
            last = o
        obs = jnp.stack([jnp.stack(o) for o in obs], 1)  # [T, N, 2]
        rows.append(Batch(obs, jnp.asarray(acts, jnp.int32), jnp.asarray(rew, jnp.float32).T,
                          jnp.asarray(done, jnp.float32).T,
                          jnp.stack([last] * num_envs)))
    return jax.tree.map(lambda *v: jnp.stack(v), *rows)


def _batch_prob(network, params, batch):
    """p(batch | θ) for one enumerated batch (transitions are deterministic)."""
    return jnp.exp(jnp.sum(mgrl_bias.trajectory_log_probs(network, params, batch)))


# --------------------------------------------------------------------------- exact tests

def _flat(tree):
    return jnp.concatenate([jnp.ravel(v) for v in jax.tree.leaves(tree)])


def test_dice_step_jacobian_is_unbiased_and_the_surrogates_are_not():
    """Σ_D p(D|θ) ∂ĝ_dice(θ, D)/∂θ · v equals ∂/∂θ [Σ_D p(D|θ) ĝ(θ, D)] · v exactly (every batch of
    2 episodes enumerated, float64); vanilla and LVC inner gradients miss score terms."""
    config = _config()
    with jax.enable_x64(True):
        env, network, state = _tiny_state(config)
        params = _to64(state.params)
        batches = _to64(_all_batches(env, config.num_envs))
        coefs = _to64(mgrl.coefs_from_logits(state.meta_logits))
        direction = jax.tree.map(lambda v: jax.random.normal(jax.random.key(5), v.shape,
                                                             jnp.float64), params)

        def grad_of(surrogate, p, b):
            if surrogate == "dice":
                return mgrl_bias.dice_gradient(network, p, b, coefs)
            return a2c.loss_gradient(network, p, b, coefs, surrogate, exact_jacobian=True)[1]

        @jax.jit
        def everything(params):
            probs = jax.vmap(lambda b: _batch_prob(network, params, b))(batches)

            def expected_gradient(p):
                grads = jax.vmap(lambda b: _flat(grad_of("maml", p, b)))(batches)
                weights = jax.vmap(lambda b: _batch_prob(network, p, b))(batches)
                return weights @ grads

            exact = jax.jvp(expected_gradient, (params,), (direction,))[1]
            estimates = {s: probs @ jax.vmap(lambda b, s=s: _flat(jax.jvp(
                lambda p: grad_of(s, p, b), (params,), (direction,))[1]))(batches)
                for s in ("dice", "maml", "lvc")}
            values = {s: jax.vmap(lambda b, s=s: _flat(grad_of(s, params, b)))(batches)
                      for s in ("dice", "maml")}
            return exact, estimates, values

        exact, estimates, values = everything(params)
    scale = float(np.abs(np.asarray(exact)).max())  # outside x64: numpy, not a truncating jnp
    np.testing.assert_allclose(estimates["dice"], exact, rtol=1e-10, atol=1e-12 * scale)
    np.testing.assert_allclose(values["dice"], values["maml"], rtol=1e-12, atol=1e-14)
    for name in ("maml", "lvc"):
        assert float(np.abs(np.asarray(estimates[name]) - np.asarray(exact)).max()) > 1e-2 * scale, name


def _exact_meta_gradient(config, network, state, batches):
    """The meta-gradient of the expected computation on TwoStep (float64): θ_1 from D_0, then
    θ_{k+1} = U(θ_k, E_D ĝ(θ_k, D)), and the expected outer gradient v at θ_K (held fixed):
    d/dx [v · θ_K(x)]. Returns (its autodiff value, the central finite difference)."""
    def expect(fn, p):
        values = jax.vmap(lambda b: fn(p, b))(batches)
        probs = jax.vmap(lambda b: _batch_prob(network, p, b))(batches)
        return jax.tree.map(lambda v: jnp.tensordot(probs, v, 1), values)

    def theta_k(x):
        coefs = mgrl.coefs_from_logits(x)
        params, opt_state = state.params, state.opt_state
        for k in range(config.inner_steps):
            if k == 0:
                grads = a2c.loss_gradient(network, params, state.batch, coefs, "maml", True)[1]
            else:
                grads = expect(lambda p, b, c=coefs: a2c.loss_gradient(network, p, b, c, "maml",
                                                                       True)[1], params)
            params, opt_state = mgrl_bias.inner_step(config, grads, opt_state, params)
        return params

    x = state.meta_logits
    outer_grad = jax.jit(lambda p: expect(lambda p, b: jax.grad(lambda q: mgrl._outer_objective(
        network, q, state.params, b, config))(p), p))
    v = outer_grad(jax.jit(theta_k)(x))

    def potential(x):
        return sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(v),
                                                  jax.tree.leaves(theta_k(x)), strict=True))

    grad = jax.jit(jax.grad(potential))(x)
    step = 1e-6
    steps = step * jnp.eye(x.shape[0], dtype=x.dtype)
    values = jax.jit(jax.vmap(potential))(jnp.concatenate([x + steps, x - steps]))
    fd = (values[:x.shape[0]] - values[x.shape[0]:]) / (2 * step)
    return np.asarray(grad), np.asarray(fd)


@functools.cache
def _pipeline_draws():
    """K = 2 on TwoStep with 2 envs: exact meta-gradient, and 2 × 12 draws of the DiCE and
    vanilla meta-gradients with 512× the envs (saved env states tiled), float64."""
    config = _config()
    with jax.enable_x64(True):
        env, network, state = _tiny_state(config)
        state = _to64(state)
        exact, fd = _exact_meta_gradient(config, network, state,
                                         _to64(_all_batches(env, 1)))
        keys = jax.random.split(jax.random.key(11), 12)
        runner = mgrl_bias.tile_runner(state.runner, 512)
        draws = {}
        for name, make in (("dice", mgrl_bias.make_dice_meta_gradient),
                           ("mgrl", mgrl.make_meta_gradient)):
            fn = make(config, env, None, network)
            draws[name] = np.asarray(jax.jit(lambda s, k, fn=fn: mgrl_bias.draw_meta_gradients(
                fn, s, k, runner, batch_size=12))(state, keys))
    return exact, fd, draws


@pytest.mark.slow
def test_exact_meta_gradient_of_the_expected_computation_matches_finite_differences():
    exact, fd, _ = _pipeline_draws()
    np.testing.assert_allclose(exact, fd, rtol=1e-6, atol=1e-9 * np.abs(exact).max())
    assert np.all(np.abs(exact) > 1e-4 * np.abs(exact).max())


@pytest.mark.slow
def test_large_batch_dice_meta_gradient_matches_the_exact_one_and_vanilla_does_not():
    """Per coordinate z = (mean − exact)/se over 12 draws at 1024 envs: |z| < 4 for DiCE (its
    remaining compositional bias is O(1/N), below the noise here); the vanilla surrogate's
    Hessian bias stays at any batch size and shows as |z| > 4."""
    exact, _, draws = _pipeline_draws()

    def z(d):
        return (d.mean(0) - exact) / (d.std(0, ddof=1) / np.sqrt(d.shape[0]))

    assert np.all(np.abs(z(draws["dice"])) < 4), z(draws["dice"])
    assert np.max(np.abs(z(draws["mgrl"]))) > 4, z(draws["mgrl"])


# --------------------------------------------------------------------------- K = 1, statistics

def test_k1_mgrl_and_lvc_coincide_draw_by_draw_and_the_report_says_so():
    """K = 1: θ_0 does not depend on x, so no Hessian enters and both surrogates give the same
    meta-gradient for every key; the diagnosis reports a zero paired difference."""
    config = _config(inner_steps=1)
    env, network, state = _tiny_state(config)
    settings = mgrl_bias.BiasSettings(repeats=6, ref_multiplier=1, ref_parts=6, dice_multiplier=0,
                                      bootstrap=50)
    result = mgrl_bias.diagnose(config, state, jax.random.key(3), settings,
                                env_model=(env, None, network))
    mg = np.array(result["singles"]["mgrl"]["draws"])
    lvc = np.array(result["singles"]["mgrl-lvc"]["draws"])
    assert mg.shape == (6, 4) and np.all(np.abs(mg).max(0) > 0)
    assert len({tuple(r) for r in mg.round(6)}) > 1  # independent keys: different draws
    np.testing.assert_allclose(lvc, mg, rtol=1e-6, atol=1e-7 * np.abs(mg).max())
    assert result["paired"]["max_rel_diff"] < 1e-6
    names = {(c["estimator"], c["reference"]) for c in result["comparisons"]}
    assert names == {("mgrl", "large-batch mgrl"), ("mgrl-lvc", "large-batch mgrl-lvc")}
    text = mgrl_bias.report_markdown(result)
    assert "| mgrl | large-batch mgrl |" in text and "K = 1" in text


def test_compare_z_scores_and_noise_floor_follow_the_standard_errors():
    """Unbiased Gaussian draws: |z| small, the plug-in relative bias near its noise floor and the
    debiased one near 0; a shift of 6 standard errors in one coordinate shows as z ≈ 6."""
    rng = np.random.default_rng(0)
    g = np.array([1.0, -2.0, 0.5, 3.0])
    sd = np.array([1.0, 2.0, 0.5, 1.5])
    est = g + sd * rng.standard_normal((400, 4))
    ref = g + 0.2 * sd * rng.standard_normal((8, 4))
    c = mgrl_bias.compare(est, ref, bootstrap=300)
    se = np.sqrt(sd**2 / 400 + (0.2 * sd) ** 2 / 8)
    assert np.all(np.abs(c["z"]) < 4), c["z"]
    assert c["rel_bias"] < 3 * c["noise_floor"]
    assert c["rel_bias_ci"][0] <= c["rel_bias"] <= c["rel_bias_ci"][1]
    np.testing.assert_allclose(c["snr"], np.abs(g) / sd, rtol=0.2)
    shifted = mgrl_bias.compare(est + np.array([6 * se[0], 0, 0, 0]), ref, bootstrap=300)
    assert 6 - 4 < shifted["z"][0] < 6 + 4 and shifted["z"][0] - c["z"][0] == pytest.approx(
        6 * se[0] / np.sqrt(est[:, 0].var(ddof=1) / 400 + ref[:, 0].var(ddof=1) / 8), rel=1e-9)
    with pytest.raises(InputError, match="at least 2"):
        mgrl_bias.compare(est[:1], ref)


# --------------------------------------------------------------------------- run folders, CLI

def _write_run(folder, with_checkpoint=True, initial=False):
    """A run folder as `gmrl mgrl --out` leaves it (run.json, config.json, checkpoint.msgpack);
    the checkpoint holds 2 seeds, zeros (or with `initial` their initial states), the meta-logits
    differing per seed."""
    from gmrl.io import atomic_write_json
    from gmrl.runs import checkpoint
    from gmrl.store import config_key

    point = mgrl_runs.run_config("mgrl", "CartPole-v1", 1000, 2, 7, 1,
                                 {"num_envs": 2, "num_steps": 2, "inner_steps": 1})
    folder.mkdir()
    for name in ("run.json", "config.json"):
        atomic_write_json(folder / name, {"key": config_key(point), "config": point})
    if not with_checkpoint:
        return point, None
    algorithm, _ = mgrl_runs.algorithm_of(point)
    states = (a2c.init_seeds(algorithm, jax.random.key(7), 2) if initial
              else mgrl_runs.state_template(algorithm, 2))
    states = states._replace(meta_logits=states.meta_logits + jnp.array([[0.0], [1.0]]))
    checkpoint.save(folder / "checkpoint.msgpack", states, 3)
    return point, states


def test_load_run_state_reads_the_checkpoint_of_one_seed(tmp_path):
    folder = tmp_path / "run"
    point, states = _write_run(folder)
    loaded_point, config, state = mgrl_runs.load_run_state(folder, seed_index=1)
    assert loaded_point == point and config.num_envs == 2 and config.inner_steps == 1
    np.testing.assert_array_equal(state.meta_logits, states.meta_logits[1])
    with pytest.raises(InputError, match="seed-index"):
        mgrl_runs.load_run_state(folder, seed_index=2)


def _invoke(args):
    from gmrl.commands.mgrl_bias import mgrl_bias_command

    return CliRunner().invoke(mgrl_bias_command, [str(a) for a in args])


@pytest.mark.parametrize("args, message", [
    (["{missing}"], "is not a folder"),
    (["{empty}"], "holds no MGRL run"),
    (["{run}", "--repeats", "1"], "--repeats must be >= 2"),
    (["{run}", "--ref-parts", "1"], "--ref-parts must be >= 2"),
    (["{run}", "--inner-steps", "0"], "--inner-steps must be >= 1"),
    (["{run}", "--inner-lr", "-1"], "--inner-lr must be > 0"),
    (["{run}", "--estimators", "maml"], "unknown estimators maml; allowed: mgrl, mgrl-lvc"),
    (["{run}", "--seed-index", "5"], "--seed-index must lie in [0, 2)"),
    (["{a2c}"], "holds a run of 'a2c'; allowed: mgrl, mgrl-lvc"),
])
def test_bad_input_is_one_line(tmp_path, args, message):
    """Bad input raises InputError (one line; `gmrl` prints it and exits with status 2)."""
    (tmp_path / "empty").mkdir()
    _write_run(tmp_path / "run", with_checkpoint=False)  # every error comes before loading it
    from gmrl.io import atomic_write_json

    (tmp_path / "a2c").mkdir()
    atomic_write_json(tmp_path / "a2c" / "run.json", {"config": {"study": "mgrl", "algo": "a2c"}})
    result = _invoke([a.format(missing=tmp_path / "missing", empty=tmp_path / "empty",
                               run=tmp_path / "run", a2c=tmp_path / "a2c") for a in args])
    assert isinstance(result.exception, InputError), result.output
    assert message in str(result.exception) and "\n" not in str(result.exception)


@pytest.mark.slow
def test_command_writes_bias_json_and_md(tmp_path):
    """The whole command on a CartPole run folder (K = 1: mgrl and mgrl-lvc coincide)."""
    _write_run(tmp_path / "run", initial=True)
    result = _invoke([tmp_path / "run", "--repeats", "3", "--ref-multiplier", "2", "--ref-parts",
                      "2", "--dice-multiplier", "2", "--bootstrap", "20", "--out", tmp_path / "o"])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "o" / "bias.json").read_text())
    assert data["run"]["algo"] == "mgrl" and data["settings"]["inner_steps"] == 1
    assert data["paired"]["max_rel_diff"] < 1e-5
    assert {c["reference"] for c in data["comparisons"]} == {"large-batch mgrl",
                                                             "large-batch mgrl-lvc", "dice"}
    assert "| mgrl | dice |" in (tmp_path / "o" / "bias.md").read_text()


def test_decayed_inner_learning_rate_is_refused_and_inner_lr_replaces_the_schedule():
    """Under the reference preset's linear decay the inner rate reaches 0 at the end of a run (the
    meta-gradient is then 0): the diagnosis says so in one line; --inner-lr gives a constant rate."""
    config = _config(preset="reference", total_updates=10)
    env, network, state = _tiny_state(config)
    state = state._replace(opt_state=state.opt_state._replace(count=jnp.int32(12)))
    assert mgrl_bias.inner_lr_at(config, state.opt_state) == 0.0
    with pytest.raises(InputError, match="inner learning rate is 0 at this state"):
        mgrl_bias.diagnose(config, state, jax.random.key(0), env_model=(env, None, network))
    lever = mgrl_bias.estimator_config(config, "mgrl-lvc", inner_steps=4, learning_rate=0.01)
    assert (lever.lvc, lever.inner_steps, lever.total_updates) == (True, 4, 0)
    assert mgrl_bias.inner_lr_at(lever, state.opt_state) == 0.01
    half = state.opt_state._replace(count=jnp.int32(5))
    assert mgrl_bias.inner_lr_at(config, half) == pytest.approx(0.5 * config.learning_rate)
