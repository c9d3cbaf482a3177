"""Atari through ale-py (gmrl.envs.ale): gymnax API under jit/vmap/scan, reproducibility from JAX keys,
the reference's preprocessing invariants, and a2c.rollout on it. Skipped without ale-py."""

from __future__ import annotations

import sys

import numpy as np
import pytest

pytest.importorskip("ale_py")
pytest.importorskip("gymnax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from gmrl.algos import a2c  # noqa: E402
from gmrl.algos.networks import Network  # noqa: E402
from gmrl.envs import ale  # noqa: E402
from gmrl.errors import InputError  # noqa: E402

NUM_ENVS = 4
NUM_STEPS = 300  # long enough for random Breakout play to finish whole games (5 lives)


def _run(env, params, key, num_envs=NUM_ENVS, num_steps=NUM_STEPS):
    """Reset `num_envs` envs, then `num_steps` uniformly random actions in a lax.scan."""
    reset_key, scan_key = jax.random.split(key)
    obs0, state = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(reset_key, num_envs), params)

    def body(state, step_key):
        act_key, env_key = jax.random.split(step_key)
        actions = jax.random.randint(act_key, (num_envs,), 0, env.num_actions)
        obs, state, reward, terminated, truncated, info = jax.vmap(env.step, in_axes=(0, 0, 0, None))(
            jax.random.split(env_key, num_envs), state, actions, params)
        return state, (obs, reward, terminated, truncated, info, state.lives)

    state, traj = jax.lax.scan(body, state, jax.random.split(scan_key, num_steps))
    return obs0, state, traj


@pytest.fixture(scope="module")
def breakout():
    env, params = ale.make_env("ALE/Breakout-v5")
    run = jax.jit(lambda key: _run(env, params, key))
    first = jax.block_until_ready(run(jax.random.key(3)))
    return env, params, run, first


def test_spaces_and_names(breakout):
    env, params, _, _ = breakout
    assert env.observation_space(params).shape == (84, 84, 4)
    assert env.action_space(params).n == 4  # Breakout's minimal set: NOOP, FIRE, RIGHT, LEFT
    assert env.name == "ALE/Breakout-v5"
    assert "ALE/Pong-v5" in ale.game_names()


@pytest.mark.parametrize("name", ["ALE/NoSuchGame-v5", "Breakout-v5", "ALE/Breakout-v4", "ALE/breakout-v5"])
def test_bad_names_are_input_errors(name):
    with pytest.raises(InputError, match="allowed"):
        ale.make_env(name)


def test_bad_options_are_input_errors():
    with pytest.raises(InputError, match="repeat_action_probability"):
        ale.make_env("ALE/Breakout-v5", repeat_action_probability=1.5)
    with pytest.raises(InputError, match="num_threads"):
        ale.make_env("ALE/Breakout-v5", num_threads=0)


def test_missing_ale_py_is_an_input_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ale_py", None)  # makes `import ale_py` fail
    with pytest.raises(InputError, match=r"pip install 'gmrl\[atari\]'"):
        ale.make_env("ALE/Breakout-v5")


def test_shapes_dtypes_and_sane_rewards_and_dones(breakout):
    env, _, _, (obs0, state, (obs, reward, terminated, truncated, info, lives)) = breakout
    assert obs0.shape == (NUM_ENVS, 84, 84, 4) and obs0.dtype == jnp.uint8
    assert obs.shape == (NUM_STEPS, NUM_ENVS, 84, 84, 4) and obs.dtype == jnp.uint8
    assert reward.dtype == jnp.float32 and terminated.dtype == jnp.bool_ and truncated.dtype == jnp.bool_
    # after a reset only the newest frame is filled (the reference's stack is cleared at each episode)
    assert not np.any(np.asarray(obs0[..., :3])) and np.all(np.asarray(obs0[..., 3]).max(axis=(1, 2)) > 0)
    obs, reward, score = np.asarray(obs), np.asarray(reward), np.asarray(info["score"])
    terminated, game_over, lives = np.asarray(terminated), np.asarray(info["game_over"]), np.asarray(lives)
    assert not np.any(np.asarray(truncated))
    # clipped training reward = sign of the game's reward; Breakout scores 1, 4 or 7 points per brick
    np.testing.assert_array_equal(reward, np.sign(score))
    assert set(np.unique(score)) <= {0.0, 1.0, 4.0, 7.0} and score.sum() > 0
    # the stack: frames shift by one each step, and an episode end (a lost life) clears all but the newest
    assert not np.any(obs[terminated][..., :3])
    np.testing.assert_array_equal(obs[1:, ..., :3], np.where(terminated[1:, :, None, None, None], 0,
                                                             obs[:-1, ..., 1:]))
    assert game_over.sum() >= 1, "no game ended in 300 random steps"
    for e in range(NUM_ENVS):
        ends = np.flatnonzero(game_over[:, e])
        for start, end in zip(np.r_[-1, ends][:-1], ends, strict=True):
            game = slice(start + 1, end + 1)
            assert terminated[game, e].sum() == 5  # episodic life: 4 lost lives, then the game over
            # the logged game score is the unclipped sum over the whole game, all lives
            assert info["episode_score"][end, e] == pytest.approx(score[game, e].sum())
            assert lives[end, e] == 5  # the next game starts with all lives
    assert not np.any(np.asarray(info["episode_score"])[~game_over])


def test_same_key_same_trajectory_other_key_differs(breakout):
    env, params, run, first = breakout
    again = jax.block_until_ready(run(jax.random.key(3)))
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    reset = jax.jit(jax.vmap(env.reset, in_axes=(0, None)))
    same, other = (reset(jax.random.split(jax.random.split(jax.random.key(k))[0], NUM_ENVS), params)[0]
                   for k in (3, 4))
    np.testing.assert_array_equal(np.asarray(same), np.asarray(first[0]))
    assert not np.array_equal(np.asarray(same), np.asarray(other))  # other no-op counts, other frames


def test_state_is_pure_and_independent_of_batching(breakout):
    """The state is the whole emulator: stepping one state twice gives the same result, and an env's
    steps do not depend on which worker emulator ran them or on nested vmap over seeds."""
    env, params, _, (_, state, _) = breakout
    threaded, _ = ale.make_env("ALE/Breakout-v5", num_threads=2)
    keys = jax.random.split(jax.random.key(5), NUM_ENVS)
    action = jnp.arange(NUM_ENVS, dtype=jnp.int32) % env.num_actions

    def steps(env, keys, state, action, length=8):  # a few steps from `state` with fixed actions
        step = jax.vmap(env.step, in_axes=(0, 0, 0, None))

        def body(state, t):
            obs, state, reward, terminated, truncated, info = step(
                jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, t), state, action, params)
            return state, (obs, reward, terminated, info["score"])
        return jax.lax.scan(body, state, jnp.arange(length))

    run = jax.jit(steps, static_argnums=0)
    first = run(env, keys, state, action)
    replay = run(env, keys, state, action)
    in_threads = run(threaded, keys, state, action)  # two emulators, each stepping half the batch
    split = lambda x: x.reshape((2, NUM_ENVS // 2) + x.shape[1:])  # noqa: E731
    nested = jax.jit(jax.vmap(lambda *a: steps(env, *a)))(split(keys), jax.tree.map(split, state),
                                                          split(action))
    leaves = [np.asarray(x) for x in jax.tree.leaves(first)]
    for other in (replay, in_threads):
        for a, b in zip(leaves, jax.tree.leaves(other), strict=True):
            np.testing.assert_array_equal(a, np.asarray(b))
    for a, b in zip(jax.tree.leaves(first[0]), jax.tree.leaves(nested[0]), strict=True):  # final states
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b).reshape(np.shape(a)))
    for a, b in zip(jax.tree.leaves(first[1]), jax.tree.leaves(nested[1]), strict=True):  # [S, T, N/S, ...]
        np.testing.assert_array_equal(np.asarray(a), np.moveaxis(np.asarray(b), 0, 1).reshape(np.shape(a)))
    assert np.any(np.asarray(first[1][0][1:] != first[1][0][:-1]))  # the steps did change the screen


def test_area_weights_average_pixels():
    for size_in in (210, 160, 168):
        w = ale._area_weights(size_in, 84)
        np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-6)
        np.testing.assert_allclose(w.sum(axis=0), 84 / size_in, rtol=1e-6)  # every source pixel counted once
    np.testing.assert_allclose(ale._area_weights(168, 84)[5, 10:12], [0.5, 0.5])
    w = ale._area_weights(210, 84)  # ratio 2.5: output row 1 covers [2.5, 5): half of 2, all of 3 and 4
    np.testing.assert_allclose(w[1, 2:5], [0.2, 0.4, 0.4], rtol=1e-6)
    for size_in in (210, 160):  # the block form used in JAX is the same matrix
        g, block = ale._area_block(size_in, 84)
        np.testing.assert_allclose(np.kron(np.eye(g), block), ale._area_weights(size_in, 84), atol=1e-6)


def _stub_network(num_actions: int) -> Network:
    """A linear policy and value on the mean of each stacked frame: enough to drive a rollout."""
    def init(key):
        return {"w": 0.01 * jax.random.normal(key, (4, num_actions + 1))}

    def features(obs):
        return jnp.mean(obs.astype(jnp.float32) / 255.0, axis=(-3, -2))  # [..., 4]

    def apply(params, obs, gamma):
        out = features(obs) @ params["w"]
        return out[..., :-1], out[..., -1] * gamma

    return Network(init, lambda params, obs: apply(params, obs, 1.0)[0], apply)


def test_a2c_rollout_runs_and_differentiates():
    env, params = ale.make_env("ALE/Breakout-v5")
    network = _stub_network(env.action_space(params).n)
    net_params = network.init(jax.random.key(1))

    def loss(p, key):  # a rollout inside the differentiated function, as MGRL's meta-objective has
        runner = a2c.reset_runner(env, params, key, 3)
        runner, batch, stats = a2c.rollout(env, params, network, p, runner, key, 5)
        return jnp.mean(network.apply(p, batch.obs, 0.99)[1]), (batch, stats)

    grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (value, (batch, stats)), grad = grad_fn(net_params, jax.random.key(2))
    assert batch.obs.shape == (5, 3, 84, 84, 4) and batch.last_obs.shape == (3, 84, 84, 4)
    assert batch.actions.shape == (5, 3) and batch.rewards.shape == (5, 3) and batch.dones.shape == (5, 3)
    assert np.isfinite(float(value)) and float(jnp.abs(grad["w"]).sum()) > 0
    assert set(np.unique(np.asarray(batch.rewards))) <= {0.0, 1.0}


def test_clipped_training_reward_and_frame_limit():
    """Space Invaders pays 5–30 points per invader: the training reward is its sign, the score is kept.
    A game reaching max_episode_frames is truncated (not terminated), ends the game and resets."""
    env, params = ale.make_env("ALE/SpaceInvaders-v5", max_episode_frames=200)
    assert env.action_space(params).n == 6
    _, _, (obs, reward, terminated, truncated, info, _) = jax.jit(
        lambda key: _run(env, params, key, 2, 80))(jax.random.key(0))
    reward, score = np.asarray(reward), np.asarray(info["score"])
    assert obs.shape == (80, 2, 84, 84, 4) and score.max() >= 5
    np.testing.assert_array_equal(reward, np.sign(score))
    truncated, terminated = np.asarray(truncated), np.asarray(terminated)
    assert np.all(truncated.sum(axis=0) == 1)  # 200 frames = 50 steps less the reset's frames
    assert np.all(np.flatnonzero(truncated[:, 0]) < 50) and np.all(np.flatnonzero(truncated[:, 1]) < 50)
    assert np.all(np.asarray(info["game_over"])[truncated]) and not np.any(terminated[truncated])
    assert not np.any(np.asarray(obs)[truncated][..., :3])
