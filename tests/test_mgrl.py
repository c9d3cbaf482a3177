"""A2C / MGRL / MGRL-LVC on gymnax (issues 5, 10): meta-gradients of both presets, the
differentiable Adam, held paths, LVC curvature, networks, learning, interrupted runs."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from gmrl.algos import a2c, meta_adam, mgrl, networks, presets
from gmrl.algos.networks import Network, conv3x3_valid
from gmrl.errors import InputError


def _to64(tree):
    return jax.tree.map(lambda v: v.astype(jnp.float64) if jnp.issubdtype(v.dtype, jnp.floating)
                        else v, tree)


@functools.cache
def _tiny_problem(lvc: bool, inner_steps: int, seed: int = 0, preset: str = "full",
                  hold: tuple[str, ...] | None = None):
    """CartPole, 4 envs × 3 steps, K inner steps; the optimiser state (RMSProp's ν, or Adam's
    m, v and a step count of 5 with decay over 20 updates) is set to random positive values so
    that its path through the meta-gradient is exercised, and the policy head is scaled up
    (×100) so that the policy is far from uniform (where ∇H ≈ 0 would hide c_ent's path)."""
    config = mgrl.MGRLConfig(env_name="CartPole-v1", num_envs=4, num_steps=3,
                             inner_steps=inner_steps, lvc=lvc, outer_value_coef=0.3,
                             outer_entropy_coef=0.02, outer_kl_coef=0.5, learning_rate=1e-2,
                             preset=preset, hold=hold, total_updates=20)
    state = jax.jit(mgrl.make_mgrl(config).init)(jax.random.key(seed))
    leaves, treedef = jax.tree.flatten(state.opt_state)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    leaves = [jax.random.uniform(k, v.shape, v.dtype, 1e-4, 1e-2)
              if jnp.issubdtype(v.dtype, jnp.floating) else jnp.full_like(v, 5)
              for k, v in zip(keys, leaves, strict=True)]
    head = {"w": 100 * state.params["policy_head"]["w"], "b": state.params["policy_head"]["b"]}
    state = state._replace(opt_state=jax.tree.unflatten(treedef, leaves),
                           params={**state.params, "policy_head": head})
    env, env_params, network = mgrl.env_and_network(config)
    return config, env, env_params, network, state


def _fd_gradient(objective, x: jax.Array, step: float) -> np.ndarray:
    """Central finite differences of a scalar function along each coordinate of x."""
    grads = []
    for i in range(x.shape[0]):
        e = jnp.zeros_like(x).at[i].set(step)
        grads.append((objective(x + e) - objective(x - e)) / (2 * step))
    return np.asarray(grads)


@pytest.mark.parametrize("preset", presets.PRESETS)
def test_meta_gradient_matches_float64_finite_differences(preset):
    """∇_x L_out of the compiled step equals central differences of L_out (K = 2, float64, with
    value, entropy and KL outer terms on), the outer advantages held fixed (they are constants
    under stop-gradient), and for the reference preset the held baseline, critic γ input and
    clipping norm of each inner update fixed at their values at x."""
    config, env, env_params, network, state = _tiny_problem(lvc=False, inner_steps=2,
                                                            preset=preset)
    with jax.enable_x64(True):
        args = _to64((state.meta_logits, state.params, state.opt_state, state.runner,
                      state.batch))
        meta_grad = jax.jit(mgrl.make_meta_gradient(config, env, env_params, network))
        objective = jax.jit(mgrl.make_meta_objective(config, env, env_params, network))
        loss, grad, result = meta_grad(*args, state.key)
        held = result.held if preset == "reference" else None
        # the clipping is active, so its norm's path exists
        assert all(float(h["clip_norm"]) > config.max_grad_norm for h in result.held)

        def outer_loss(x):  # stop-gradient outer advantages held at their values at x
            return objective(x, *args[1:], state.key, result.params, held)[0]

        fd = _fd_gradient(outer_loss, args[0], 1e-6)
        np.testing.assert_allclose(outer_loss(args[0]), loss, rtol=1e-12)
    assert grad.dtype == jnp.float64
    # every meta-parameter has a non-trivial meta-gradient, and it matches the FD derivative
    # (tolerance: central differences in float64 with h = 1e-6 agree to ~1e-9 of the norm)
    scale = np.abs(fd).max()
    assert np.all(np.abs(fd) > 1e-5 * scale), fd
    np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-7 * scale)


@pytest.mark.slow
def test_holding_a_path_in_an_inner_update_removes_that_path_only(x64):
    """One inner update (Adam, reference network), the derivative of its step θ' − θ along a
    random direction of (x, θ): with one path held (stop-gradient) it equals the derivative of
    the fully differentiated update in which only that quantity is a constant (its value), to
    float64 round-off, and it differs from the full derivative by far more than round-off (the
    path matters). One compile. Slow: in the fast suite the reference preset's
    finite-difference test covers the held paths (with a hold removed, the meta-gradient no
    longer matches its frozen objective)."""
    import dataclasses

    config, _, _, network, state = _tiny_problem(False, 2, preset="reference")
    updates = {hold: mgrl._make_update(dataclasses.replace(config, hold=hold), network)
               for hold in [()] + [(p,) for p in presets.HOLDABLE]}
    x, params, opt_state, batch = _to64((state.meta_logits, state.params, state.opt_state,
                                         state.batch))
    primal = (x, params, opt_state)
    keys = iter(jax.random.split(jax.random.key(9), 64))
    tangent = jax.tree.map(lambda v: jax.random.normal(next(keys), v.shape, v.dtype), primal[:2])
    tangent += (jax.tree.map(lambda v: jnp.zeros_like(v) if jnp.issubdtype(v.dtype, jnp.floating)
                             else np.zeros(v.shape, jax.dtypes.float0), opt_state),)

    @jax.jit
    def tangents(primal, tangent):
        used = updates[()](*primal, batch)[1]

        def along(update, frozen=None):
            step = jax.jvp(lambda *a: update(*a, batch, frozen)[0][0], primal, tangent)[1]
            return ravel_pytree(step)[0] - ravel_pytree(tangent[1])[0]  # d(θ' − θ)

        return along(updates[()]), {p: (along(updates[(p,)]), along(updates[()], {p: used[p]}))
                                    for p in presets.HOLDABLE}

    full_t, by_path = tangents(primal, tangent)
    scale = np.abs(full_t).max()
    for path, (held_t, constant_t) in by_path.items():
        np.testing.assert_allclose(held_t, constant_t, rtol=1e-9, atol=1e-12 * scale,
                                   err_msg=path)
        assert np.abs(held_t - full_t).max() > 1e-6 * scale, path


@pytest.mark.slow
@pytest.mark.parametrize("path", presets.HOLDABLE)
def test_holding_a_path_changes_the_meta_gradient_only_through_that_path(path):
    """With one path held (stop-gradient), the hand-written meta-gradient equals `jax.grad` of the
    fully differentiated objective in which only that quantity is replaced by a constant (its
    value), and differs from the full derivative (the path matters). Adam, K = 2, float64.
    (Slow: covered by the single-update test above and the finite-difference test of the
    reference preset, which holds all three.)"""
    problems = {hold: _tiny_problem(False, 2, preset="reference", hold=hold)
                for hold in ((), (path,))}
    config, env, env_params, network, state = problems[(path,)]
    full_config = problems[()][0]
    with jax.enable_x64(True):
        args = _to64((state.meta_logits, state.params, state.opt_state, state.runner,
                      state.batch))
        held_grad = jax.jit(mgrl.make_meta_gradient(config, env, env_params, network))(
            *args, state.key)[1]
        full_grad = jax.jit(mgrl.make_meta_gradient(full_config, env, env_params, network))(
            *args, state.key)[1]
        objective = mgrl.make_meta_objective(full_config, env, env_params, network)
        values = jax.jit(objective)(*args, state.key)[1].held
        frozen = tuple({path: h[path]} for h in values)
        constant_grad = jax.jit(jax.grad(lambda x: objective(x, *args[1:], state.key,
                                                              frozen=frozen)[0]))(args[0])
    scale = np.abs(full_grad).max()
    np.testing.assert_allclose(held_grad, constant_grad, rtol=1e-9, atol=1e-12 * scale)
    assert np.abs(held_grad - full_grad).max() > 1e-4 * scale, (held_grad, full_grad)


def test_reference_preset_holds_the_three_paths_and_uses_adam():
    config = _tiny_problem(False, 2, preset="reference")[0]
    assert mgrl.held_paths(config) == presets.HOLDABLE
    assert mgrl.held_paths(_tiny_problem(False, 2, preset="full")[0]) == ()
    state = _tiny_problem(False, 2, preset="reference")[4]
    assert isinstance(state.opt_state, meta_adam.AdamState)
    params = state.params
    assert params["mix"]["w"].shape == (64 + 16, 64) and params["gamma_embedding"]["w"].shape == (1, 16)
    a2c_params = a2c.init_seeds(mgrl.make_algorithm("a2c", "CartPole-v1", num_envs=4), jax.random.key(0),
                                1).params
    assert set(a2c_params) == {"actor", "policy_head", "critic", "value_head"}
    assert a2c_params["value_head"]["w"].shape == (1, 64, 1)  # [seeds, 64, 1]: no γ input


def _adam_problem(dtype):
    keys = jax.random.split(jax.random.key(0), 4)
    params = {"w": jax.random.normal(keys[0], (3, 4), dtype), "b": jax.random.normal(keys[1], (4,), dtype)}
    grads = [jax.tree.map(lambda p, k=k: jax.random.normal(k, p.shape, dtype), params)
             for k in jax.random.split(keys[2], 6)]
    return params, grads


def test_adam_equals_optax_adam_with_the_same_linear_decay(x64):
    """Six steps in float64 (agreement to round-off: the two differ only in the order of a few
    multiplications)."""
    params, grads = _adam_problem(jnp.float64)
    schedule = meta_adam.linear_decay(7e-2, 4)  # reaches 0 after 4 updates, then stays there
    ours, theirs = meta_adam.adam(schedule, eps=1e-8), optax.adam(schedule, eps=1e-8)
    p1, s1, p2, s2 = params, ours.init(params), params, theirs.init(params)
    moved = []
    for g in grads:
        u1, s1 = ours.update(g, s1, p1)
        u2, s2 = theirs.update(g, s2, p2)
        p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
        for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)
        moved.append(float(jnp.abs(u1["w"]).max()))
    assert moved[0] > 1e-2 and moved[4] == 0.0 and moved[5] == 0.0  # the schedule acts
    assert float(schedule(1)) == pytest.approx(7e-2 * 0.75)


def test_adam_derivative_through_its_state_matches_float64_finite_differences():
    """d/d(g, m, v) of a random linear function of Adam's step (count 3, linear decay): the
    forward-mode derivative equals central differences along random directions."""
    with jax.enable_x64(True):
        params, grads = _adam_problem(jnp.float64)
        opt = meta_adam.adam(meta_adam.linear_decay(1e-2, 10), eps=1e-8)
        state = opt.init(params)
        for g in grads[:3]:
            state = opt.update(g, state)[1]
        weights = jax.random.normal(jax.random.key(5), (16,), jnp.float64)

        def f(inputs):
            g, m, v = inputs
            update, new = opt.update(g, meta_adam.AdamState(state.count, m, v))
            del new
            return jnp.dot(weights, jnp.concatenate([jnp.ravel(update["w"]), update["b"]]))

        point = (grads[3], state.mu, state.nu)
        for i, k in enumerate(jax.random.split(jax.random.key(6), 3)):
            direction = jax.tree.map(lambda x, k=k: jax.random.normal(k, x.shape, x.dtype), point)
            only = tuple(d if j == i else jax.tree.map(jnp.zeros_like, d)  # g, then m, then v
                         for j, d in enumerate(direction))
            exact = jax.jvp(f, (point,), (only,))[1]
            shifted = [jax.tree.map(lambda x, d, s=s: x + s * 1e-6 * d, point, only)
                       for s in (1, -1)]
            fd = (f(shifted[0]) - f(shifted[1])) / 2e-6
            assert abs(float(exact)) > 1e-4
            np.testing.assert_allclose(exact, fd, rtol=1e-6)


def test_adam_derivative_is_finite_where_the_second_moment_is_zero():
    """A coordinate whose gradients are all 0 has v = 0: √ there must not give 0·∞ = NaN."""
    opt = meta_adam.adam(1e-3)
    params = {"w": jnp.zeros(3)}
    grad = jax.grad(lambda g: jnp.sum(opt.update({"w": g}, opt.init(params))[0]["w"]))(
        jnp.array([0.0, 1.0, -2.0]))
    assert np.all(np.isfinite(grad)), grad


def test_clip_holds_its_norm_constant_on_request():
    g = jnp.array([3.0, 4.0])  # norm 5, clipped to 0.5
    clipped = meta_adam.clip_by_global_norm(0.5, 1e-6, hold_norm=True)
    free = meta_adam.clip_by_global_norm(0.5, 1e-6, hold_norm=False)
    value = clipped.update(g, optax.EmptyState())[0]
    np.testing.assert_allclose(value, g * 0.5 / (5 + 1e-6), rtol=1e-6)
    jac_held = jax.jacobian(lambda g: clipped.update(g, optax.EmptyState())[0])(g)
    jac_free = jax.jacobian(lambda g: free.update(g, optax.EmptyState())[0])(g)
    np.testing.assert_allclose(jac_held, np.eye(2) * 0.5 / (5 + 1e-6), rtol=1e-6)
    assert np.abs(jac_free - jac_held).max() > 1e-2


def _fd_atol(value: float, step: float) -> float:
    """Round-off bound of a float64 central difference: ~ε|L|/h (with a safety factor of 100)."""
    return 100 * np.finfo(np.float64).eps * abs(float(value)) / step


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _replay_loss(x, config, inner_steps, surrogate, exact, params, opt_state, batch):
    """K inner updates on one fixed batch, then the policy-gradient loss of θ_K (fixed baseline)."""
    network = a2c.make_env_and_network(config.env_name)[2]
    optimizer = optax.chain(meta_adam.clip_by_global_norm(config.max_grad_norm, 0.0),
                            presets.base_optimizer(config))
    p, s = params, (optax.EmptyState(), opt_state)
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


def _random_like(shapes):
    """N(0, 0.05²) arrays of the given shapes (the orthogonal init of the 3136 × 512 layer takes
    ~10 s on this CPU; these tests need shapes and the γ path, not the init)."""
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda leaf: jnp.asarray(0.05 * rng.standard_normal(leaf.shape),
                                                 leaf.dtype), shapes)


@pytest.mark.parametrize("critic", networks.CRITIC_INPUTS)
def test_nature_torso_shapes_and_critic_gamma_inputs(critic):
    """Atari frames [84, 84, 4] take the Nature torso (conv 8×8/4 → 32, 4×4/2 → 64, 3×3/1 → 64,
    7·7·64 = 3136 → 512); the embedding critic mixes 512 + 16 = 528 → 512 as the reference's
    CNNBase_condition; γ changes the value unless the critic has no γ input."""
    network = networks.make_network((84, 84, 4), 6, critic)
    params = _random_like(jax.eval_shape(network.init, jax.random.key(0)))
    assert [layer["w"].shape for layer in params["convs"]] == [(8, 8, 4, 32), (4, 4, 32, 64),
                                                               (3, 3, 64, 64)]
    assert params["hidden"]["w"].shape == (3136, 512) and params["policy_head"]["w"].shape == (512, 6)
    head = {"embedding": (512, 1), "column": (513, 1), "none": (512, 1)}[critic]
    assert params["value_head"]["w"].shape == head
    if critic == "embedding":
        assert params["mix"]["w"].shape == (528, 512) and params["gamma_embedding"]["w"].shape == (1, 16)
    obs = jax.random.uniform(jax.random.key(1), (2, 3, 84, 84, 4), jnp.float32, 0, 255)
    apply = jax.jit(network.apply)  # one compiled program (op by op took 6-19 s here)
    logits, values = apply(params, obs, jnp.float32(0.99))
    assert logits.shape == (2, 3, 6) and values.shape == (2, 3)
    np.testing.assert_allclose(jax.jit(network.policy)(params, obs), logits, rtol=1e-6)
    other = apply(params, obs, jnp.float32(0.5))[1]
    assert np.allclose(other, values) == (critic == "none")
    small = jax.eval_shape(networks.make_network((10, 10, 4), 3, critic).init, jax.random.key(0))
    assert "convs" not in small and "conv" in small  # MinAtar keeps its own torso
    if critic == "embedding":
        assert small["mix"]["w"].shape == (128 + 16, 128)


def test_ale_names_reach_the_atari_adapter(monkeypatch):
    import sys
    import types

    seen = []
    fake = types.ModuleType("gmrl.envs.ale")
    fake.make_env = lambda name: seen.append(name) or ("env", "params")
    monkeypatch.setitem(sys.modules, "gmrl.envs.ale", fake)
    import gmrl.envs  # the real adapter may already be an attribute of the package (tests/test_ale.py)

    monkeypatch.setattr(gmrl.envs, "ale", fake, raising=False)
    assert a2c.make_env("ALE/Breakout-v5") == ("env", "params") and seen == ["ALE/Breakout-v5"]


def test_bad_settings_raise_input_error():
    with pytest.raises(InputError, match="unknown algorithm"):
        mgrl.make_algorithm("ppo", "CartPole-v1")
    with pytest.raises(InputError, match="unknown environment"):
        mgrl.make_algorithm("a2c", "Pong-v0")
    with pytest.raises(InputError, match="unknown meta-parameters"):
        mgrl.make_algorithm("mgrl", "CartPole-v1", meta_params=("gamma", "alpha"))
    with pytest.raises(InputError, match="must lie in"):
        mgrl.make_algorithm("mgrl", "CartPole-v1", gamma=1.0)
    with pytest.raises(InputError, match="unknown preset 'paper'; allowed: reference, full"):
        mgrl.make_algorithm("mgrl", "CartPole-v1", preset="paper")
    with pytest.raises(InputError, match="unknown held paths"):
        mgrl.make_algorithm("mgrl", "CartPole-v1", hold=("baseline", "entropy"))
    from gmrl.commands import mgrl as command

    with pytest.raises(InputError, match=r"allowed: CartPole-v1, .*ALE/<game>"):
        command.check_env("Pong-v0")
    assert command.check_env("ALE/Pong-v5") == "ALE/Pong-v5"


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
    """The MGRL path with K = 2 (where LVC's curvature differs), γ and λ meta-learned, default
    (reference) preset. Adam's step does not scale with the gradient, so it gets a smaller
    learning rate than the a2c test's 1e-2 (at 1e-2 one of the 6 seeds collapses to return 9)."""
    trained, metrics = _final_returns("mgrl-lvc", 60_000, 6, learning_rate=3e-3, inner_steps=2,
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
def test_cartpole_training_at_default_settings(algo, random_policy_returns):
    """Default settings (reference preset, K = 3, lr 7e-4, no decay), 300k frames, 6 seeds (the
    fast test above covers the same property with a larger learning rate)."""
    _assert_beats_random(_final_returns(algo, 300_000, 6)[0], random_policy_returns)


def test_frame_accounting():
    algorithm = mgrl.make_algorithm("mgrl", "CartPole-v1", num_envs=4, num_steps=3,
                                    inner_steps=2)
    assert algorithm.frames_per_step == 2 * 4 * 3 and algorithm.init_frames == 4 * 3
    assert mgrl.make_algorithm("a2c", "CartPole-v1", num_envs=4, num_steps=3).frames_per_step == 12
    assert mgrl.make_algorithm("mgrl", "CartPole-v1", num_envs=4, num_steps=3,
                               inner_steps=2) is algorithm


@pytest.mark.slow
def test_interrupted_run_leaves_complete_logs_and_resumes_to_the_same_numbers(tmp_path,
                                                                              monkeypatch):
    # slow: the SIGINT test through the real command covers resuming to the same rows
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
    assert command.PRESETS == presets.PRESETS
    assert command.ENVS == a2c.SUPPORTED_ENVS and runs.STUDY_GAMES == a2c.MINATAR_GAMES
    assert command.DEFAULT_STUDY_GAMES == runs.DEFAULT_STUDY_GAMES == tuple(runs.STUDY_FRAMES)


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
    # the claim's verdict: same data for all three algorithms -> no significant change, with
    # the detectable difference; a real shift of mgrl-lvc is found
    assert "mgrl-lvc no significant change in the final return" in report
    assert "could not have detected a difference under ±" in report
    shifted = dict(results)
    lvc = results[("Breakout-MinAtar", "mgrl-lvc")]["summary"]
    shifted[("Breakout-MinAtar", "mgrl-lvc")] = {"summary": dict(lvc, final_return_per_seed=[
        r + 50.0 + 0.1 * i for i, r in enumerate(lvc["final_return_per_seed"])])}
    assert "mgrl-lvc raises the final return" in runs.report(shifted, ["Breakout-MinAtar"])
    # wall time at median frames/s comes from frames, seeds and median frames/s alone (summaries
    # stored before carry a seconds_at_median_fps field; the report must not depend on it)
    older = {k: {"summary": dict(r["summary"], seconds_at_median_fps=-1.0)}
             for k, r in results.items()}
    assert runs.report(older, ["Breakout-MinAtar"]) == runs.report(results, ["Breakout-MinAtar"])


@pytest.mark.parametrize("algo, inner_steps", [("mgrl", 1),
                                               pytest.param("mgrl-lvc", 2, marks=pytest.mark.slow)])
def test_sigint_through_the_command_then_resume_ends_with_the_same_numbers(tmp_path, algo,
                                                                           inner_steps):
    """`gmrl mgrl ... --out DIR` interrupted by SIGINT after its first checkpoint, then
    `--resume`: the same rows (all but timings) as an uninterrupted run of the stored
    configuration. `--resume` on a folder that holds no run is refused first (one line, exit 2,
    nothing written). (mgrl-lvc, where LVC differs at K = 2, is slow: the mgrl case covers the
    same resume path; each case is compile-bound, four compilations.)"""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from gmrl.io import read_csv
    from gmrl.runs import mgrl as runs

    gmrl = Path(sys.executable).parent / "gmrl"
    argv = [str(gmrl), "mgrl", "--env", "CartPole-v1", "--algo", algo, "--frames", "192000",
            "--inner-steps", str(inner_steps), "--seeds", "1", "--log-points", "200",
            "--no-progress", "--out", str(tmp_path / "run")]
    (tmp_path / "run").mkdir()
    refused = subprocess.run(argv + ["--resume"], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "holds no run" in refused.stderr and not any((tmp_path / "run").iterdir())

    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (tmp_path / "run" / runs.CHECKPOINT).exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "interrupted after" in err, (process.returncode, err)
    logged = len(read_csv(tmp_path / "run" / runs.PROGRESS))
    assert logged >= 1, logged

    done = subprocess.run(argv + ["--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    config = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert config["overrides"]["preset"] == "reference"
    whole = runs.train(config, tmp_path / "whole", progress=False)["rows"]
    resumed = [runs._typed(r) for r in read_csv(tmp_path / "run" / runs.PROGRESS)]

    def numbers(rows):  # everything but the timings; NaN (no episode finished) compares equal
        return json.dumps([{k: v for k, v in r.items() if k not in ("fps", "wall_s")}
                           for r in rows])

    # stopped part-way (200 log points at K = 1; at K = 2 the 300 steps give 150 chunks of 2)
    assert logged < len(whole) == (200 if inner_steps == 1 else 150), (logged, len(whole))
    assert numbers(resumed) == numbers(whole)


def test_rollout_logs_the_acting_policy_entropy():
    """Uniform over CartPole's 2 actions: log 2 per step; a policy that always pushes left: 0."""
    env, env_params, _ = a2c.make_env_and_network("CartPole-v1")
    for logits, expected in (((0.0, 0.0), np.log(2.0)), ((0.0, -1e4), 0.0)):
        network = Network(None, lambda params, obs, lg=logits: jnp.broadcast_to(
            jnp.asarray(lg), obs.shape[:-1] + (2,)), None)
        runner = a2c.reset_runner(env, env_params, jax.random.key(0), 8)
        _, _, stats = a2c.rollout(env, env_params, network, None, runner, jax.random.key(1), 5)
        np.testing.assert_allclose(stats.entropy_sum / 5, expected, rtol=1e-6, atol=1e-6)


def test_study_keeps_snapshots_diagnoses_the_mgrl_runs_and_resumes(tmp_path, monkeypatch):
    """`run_study` on a tiny CartPole study: each run keeps the checkpoints at 25/50/75% of its
    log points, the bias diagnostic runs at every snapshot of the mgrl and mgrl-lvc runs (never
    a2c's) on the state kept there, its results are kept and not recomputed on a second call,
    and the report has the bias table and a verdict line per game. (The diagnostic itself is
    replaced by a stand-in that checks its input; tests/test_mgrl_bias.py tests the real one.)"""
    from gmrl.algos import mgrl_bias
    from gmrl.runs import checkpoint
    from gmrl.runs import mgrl as runs

    calls = []
    rng = np.random.default_rng(0)

    def fake_diagnose(config, state, key, settings=None):
        calls.append((config.lvc, int(np.asarray(state.opt_state.count))))
        draws = {e: rng.normal(1.0, 0.1, (8, 4)) for e in ("mgrl", "mgrl-lvc")}
        dice = rng.normal(1.0, 0.01, (4, 4))
        comparisons = [{"estimator": e, "reference": "dice", **mgrl_bias.compare(d, dice,
                                                                                 bootstrap=50)}
                       for e, d in [*draws.items(), *((f"large-batch {e}", d[:4] * 3)
                                                     for e, d in draws.items())]]
        return {"settings": {"env": config.env_name, "inner_steps": 1, "inner_lr": 7e-4,
                             "num_envs": 4, "num_steps": 5, "meta_params": list(mgrl.META_PARAMS),
                             "eta": [0.99, 0.95, 0.01, 0.5], "repeats": 8, "ref_parts": 4,
                             "ref_multiplier": 3, "dice_multiplier": 1},
                "comparisons": comparisons}

    monkeypatch.setattr(mgrl_bias, "diagnose", fake_diagnose)
    overrides = {"num_envs": 4, "inner_steps": 1, "preset": "reference"}  # K = 1: compiles fast
    args = (tmp_path, ["CartPole-v1"], 4 * 5 * 32, 2, 4, overrides)
    report = runs.run_study(*args, progress=False).read_text()

    points = runs.study_points(["CartPole-v1"], 4 * 5 * 32, 2, 4, overrides=overrides)
    expected_calls = []
    for point in points:
        run_dir = tmp_path / runs.study_run_dir(point)
        rows = runs.train(point, run_dir, progress=False)["rows"]  # finished: read back
        logged = sorted({r["frames"] for r in rows})
        assert len(logged) == 4 and runs.snapshot_frames(run_dir) == logged[:3]
        assert all(np.isfinite(r["entropy"]) and 0 < r["entropy"] <= np.log(2) for r in rows)
        assert (run_dir / "bias").is_dir() == (point["algo"] != "a2c")
        if point["algo"] == "a2c":
            continue
        algorithm, _ = runs.algorithm_of(point)
        for frames in logged[:3]:  # each snapshot holds its log point's state
            states, steps = checkpoint.restore(run_dir / runs.SNAPSHOTS / f"{frames}.msgpack",
                                               runs.state_template(algorithm, 2))
            assert algorithm.init_frames + steps * algorithm.frames_per_step == frames
            assert np.all(np.asarray(states.opt_state.count) == steps)
            expected_calls.append((point["algo"] == "mgrl-lvc", steps))
            title = (run_dir / "bias" / str(frames) / "bias.md").read_text().splitlines()[0]
            assert title == (f"# MGRL meta-gradient bias: {point['algo']} run on CartPole-v1 "
                             f"(snapshot at {frames} frames, seed 0)")
    assert sorted(calls) == sorted(expected_calls) and len(calls) == 6
    assert "## Meta-gradient bias at the runs' snapshots" in report
    section = report.split("## Meta-gradient bias")[1]
    assert section.count("| CartPole-v1 | mgrl") == 6 and "of 6 states" in section
    assert all(row.count("|") == 12 for row in section.splitlines() if row.startswith("| "))
    again = runs.run_study(*args, progress=False).read_text()
    assert len(calls) == 6 and again == report
