"""A differentiable Adam and gradient clipping for inner loops that meta-gradients pass through.

Adam (Kingma & Ba 2015, Algorithm 1) with its state (count t, first moment m, second moment v)
as explicit arrays, so that `jax.grad` / `jax.vjp` of θ' = θ + Adam(g, state) sees how θ' depends
on g *and* on the state, as the reference MGRL implementation's differentiable Adam does
(Liu et al. 2022, code `mgrl/a2c_ppo_acktr/algo/meta_optim`):

    m_t = β₁ m_{t−1} + (1 − β₁) g,   v_t = β₂ v_{t−1} + (1 − β₂) g²
    θ_t = θ_{t−1} − α(t − 1) · (m_t / (1 − β₁ᵗ)) / (√(v_t / (1 − β₂ᵗ)) + ε)

with α(n) the learning rate of the n-th update (n = 0, 1, ...): constant, or decayed linearly to 0
over N updates, α(n) = α₀ (1 − n/N) (the reference's `--use-linear-lr-decay`). The values are
those of `optax.adam(schedule, eps=ε)` (tested); the only change is the square root, whose
derivative is taken as 0 where v = 0 (there g = 0 too, and the exact derivative of
m/(√v + ε) in g is finite, (1 − β₁)/ε over the bias correction; a plain √ gives 0·∞ = NaN).

`clip_by_global_norm` scales g by min(1, c / (‖g‖ + δ)) (δ = 1e-6 is PyTorch's
`clip_grad_norm_`, which the reference uses); with `hold_norm` the norm ‖g‖ is a constant
(stop-gradient) inside derivatives, as in the reference's clipping (it takes the norm of detached
gradients), so the meta-gradient flows through g but not through the clipping factor's norm.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

Array = jax.Array


class AdamState(NamedTuple):
    count: Array  # [] int32: updates made so far
    mu: Any       # first moment m, like the parameters
    nu: Any       # second moment v, like the parameters


def linear_decay(learning_rate: float, decay_updates: int):
    """α(n) = α₀ max(0, 1 − n/N) for N = decay_updates > 0, else the constant α₀ (an optax schedule)."""
    if decay_updates > 0:
        return optax.linear_schedule(learning_rate, 0.0, int(decay_updates))
    return optax.constant_schedule(learning_rate)


def _sqrt_zero_safe(v: Array) -> Array:
    """√v with derivative 0 at v = 0 (value unchanged)."""
    positive = v > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, v, 1.0)), 0.0)


def adam(learning_rate, b1: float = 0.9, b2: float = 0.999,
         eps: float = 1e-8) -> optax.GradientTransformation:
    """Adam whose update is differentiable in the gradients and in the state (m, v).

    `learning_rate`: a float or an optax schedule of the update index n = count (0 first).
    `update(g, state) -> (Δθ, state')` with Δθ = −α(n) m̂/(√v̂ + ε), leaves shaped like θ.
    """
    schedule = learning_rate if callable(learning_rate) else optax.constant_schedule(learning_rate)

    def init(params) -> AdamState:
        zeros = jax.tree.map(jnp.zeros_like, params)
        return AdamState(jnp.zeros([], jnp.int32), zeros, zeros)

    def update(grads, state: AdamState, params=None):
        del params
        count = state.count + 1
        mu = jax.tree.map(lambda g, m: (1 - b1) * g + b1 * m, grads, state.mu)
        nu = jax.tree.map(lambda g, v: (1 - b2) * (g * g) + b2 * v, grads, state.nu)
        step = schedule(state.count)

        def direction(m, v):
            m_hat = m / (1 - b1 ** count).astype(m.dtype)
            v_hat = v / (1 - b2 ** count).astype(v.dtype)
            return -(step * (m_hat / (_sqrt_zero_safe(v_hat) + eps))).astype(m.dtype)

        return jax.tree.map(direction, mu, nu), AdamState(count, mu, nu)

    return optax.GradientTransformation(init, update)


def clip_scale(norm: Array, max_norm: float, delta: float) -> Array:
    """The clipping factor min(1, c / (‖g‖ + δ)) for a global norm ‖g‖ ([] -> [])."""
    return jnp.minimum(1.0, max_norm / (norm + delta))


def clip(grads, max_norm: float, norm: Array, delta: float):
    """g · min(1, c / (norm + δ)) for a given (possibly held) global norm."""
    scale = clip_scale(norm, max_norm, delta)
    return jax.tree.map(lambda g: (g * scale).astype(g.dtype), grads)


def clip_by_global_norm(max_norm: float, delta: float = 1e-6,
                        hold_norm: bool = False) -> optax.GradientTransformation:
    """Stateless transformation g -> g · min(1, c/(‖g‖ + δ)); `hold_norm`: ‖g‖ under stop-gradient."""

    def update(grads, state, params=None):
        del params
        norm = optax.tree.norm(grads)
        return clip(grads, max_norm, lax.stop_gradient(norm) if hold_norm else norm, delta), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)
