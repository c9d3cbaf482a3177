"""A2C's RMSProp (issue 10, item 2): the step of torch.optim.RMSprop, differentiable at ν = 0.

The Breakout-MinAtar plateau at a return of 5.5 came from ε = 1e-5 sitting inside the square root:
g/√(ν + ε) is ≈ g/√ε for the small per-weight gradients of the MinAtar network (median RMS 7e-5 at
the plateau), a step ~40× smaller for the median weight than RMSProp's g/(√ν + ε). These tests pin
the `full` preset's step (the `reference` preset uses Adam, tests/test_mgrl.py) to the
recursion of Tieleman & Hinton (2012) with ε outside the root, as
`torch.optim.RMSprop` computes it (the A2C of a2c_ppo_acktr, which the reference code builds on).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("optax")
pytest.importorskip("gymnax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from gmrl.algos import a2c  # noqa: E402


def _torch_rmsprop_steps(grads: np.ndarray, lr: float, decay: float, eps: float) -> np.ndarray:
    """θ_{t+1} − θ_t of torch.optim.RMSprop (alpha=decay, no momentum), written out in float64."""
    nu = np.zeros_like(grads[0])
    steps = []
    for g in grads:
        nu = decay * nu + (1.0 - decay) * g * g
        steps.append(-lr * g / (np.sqrt(nu) + eps))
    return np.stack(steps)


def _run_optimizer(config: a2c.A2CConfig, grads: np.ndarray) -> np.ndarray:
    optimizer = a2c.make_optimizer(config)
    params = {"w": jnp.zeros(grads.shape[1:], jnp.float32)}
    state = optimizer.init(params)
    steps = []
    for g in grads:
        updates, state = optimizer.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
        steps.append(np.asarray(updates["w"]))
    return np.stack(steps)


def test_rmsprop_step_is_torch_rmsprop_for_small_gradients():
    """Per-weight gradients of 1e-5 .. 1e-3 (most of the MinAtar network's range): the step
    is lr·g/(√ν + ε) to 0.1 %, not lr·g/√(ν + ε) (which is up to ~30× smaller there)."""
    # clipping off: only the RMSProp scaling is tested
    config = a2c.A2CConfig(max_grad_norm=1e9, preset="full")
    rng = np.random.default_rng(0)
    scales = np.logspace(-5, -3, 16)
    grads = rng.normal(size=(20, 16)) * scales
    expected = _torch_rmsprop_steps(grads, config.learning_rate, config.rms_decay, config.rms_eps)
    got = _run_optimizer(config, grads)
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=0)
    # the old scaling (ε inside the root) is far from it at these gradient sizes
    nu = np.zeros(16)
    for g in grads:
        nu = config.rms_decay * nu + (1 - config.rms_decay) * g * g
    inside = config.learning_rate * np.abs(grads[-1]) / np.sqrt(nu + config.rms_eps)
    assert np.median(np.abs(expected[-1]) / inside) > 10


def test_rmsprop_update_is_differentiable_where_a_gradient_is_exactly_zero():
    """MGRL differentiates the update through ν; a weight with zero gradient has ν = 0, where √ has
    an infinite derivative. The derivative must stay finite (and equal the ν = δ value)."""
    optimizer = a2c.make_optimizer(a2c.A2CConfig(max_grad_norm=1e9, preset="full"))
    mask = jnp.array([1.0, 0.0, 1.0, 0.0])

    def total_update(x):
        params = {"w": jnp.zeros(4)}
        state = optimizer.init(params)
        updates, state = optimizer.update({"w": x * mask}, state, params)
        updates, _ = optimizer.update({"w": 0.5 * x * mask}, state, params)
        return jnp.sum(updates["w"] ** 2)

    grad = jax.grad(total_update)(jnp.array([1e-4, 2e-4, -3e-4, 5e-4]))
    assert np.all(np.isfinite(np.asarray(grad))), grad
    assert np.all(np.asarray(grad)[[1, 3]] == 0.0) and np.all(np.asarray(grad)[[0, 2]] != 0.0)
