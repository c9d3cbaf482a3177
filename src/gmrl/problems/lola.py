"""LOLA on the iterated prisoner's dilemma as a `core.MetaProblem`, and its exact gradient.

Foerster et al. 2018 (LOLA); Liu, Feng et al. 2022, §6. Agent i's meta-parameter φ is its own
policy θ^i; the learner state is the opponent's policy θ^j, which takes K anticipated gradient
steps on the opponent's own return, θ^j_{k+1} = θ^j_k + α ∇_j J_j(θ^i, θ^j_k); the outer objective
is J_i(θ^i, θ^j_K). The LOLA gradient of agent i is d/dθ^i J_i(θ^i, θ^j_K(θ^i)) — `core.unroll`'s
gradient with every part exact. One exact LOLA gradient serves training diagnostics
(`gmrl.algos.lola`), the study and `gmrl check --lola` (`gmrl.check.lola`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gmrl import core
from gmrl.envs import ipd
from gmrl.errors import require

Array = jax.Array


def ordered(player: int, own, other):
    """(player 1's, player 2's) from `player`'s own and its opponent's."""
    return (own, other) if player == 0 else (other, own)


def problem(player: int, theta_opp: Array, gamma, horizon: int | None = None) -> core.MetaProblem:
    """Agent `player`'s LOLA meta-problem at the opponent's policy `theta_opp` [5] (exact sources).

    Returns are exact discounted values of the infinite game (the reference's oracle) or, with
    `horizon`, of the first `horizon` steps (what T-step episodes estimate without bias).
    """
    def value(own, other, who):
        thetas = ordered(player, own, other)
        values = (ipd.exact_values(*thetas, gamma) if horizon is None
                  else ipd.finite_horizon_values(*thetas, gamma, horizon))
        return values[who]

    def opponent_return(key, source, theta, phi, count):
        require(source.is_exact, f"the LOLA problem has exact sources only, got {source}")
        return value(phi, theta, 1 - player)

    def outer(key, source, theta, phi, count=None):
        require(source.is_exact, f"the LOLA problem has exact sources only, got {source}")
        return value(phi, theta, player)

    return core.MetaProblem(lambda phi: theta_opp, core.gradient_increment(opponent_return), outer)


def exact_gradients(thetas: Array, lr, steps: int, gamma, horizon: int | None = None) -> Array:
    """Both players' exact LOLA gradients at thetas [2, 5] after `steps` look-ahead steps of size
    `lr`, in float64. Returns [2, 5] (float64)."""
    with jax.enable_x64(True):
        thetas = jnp.asarray(thetas).astype(jnp.float64)
        hyper = core.Hyper(lr, steps)
        return jnp.stack([core.exact_meta_gradient(problem(p, thetas[1 - p], gamma, horizon), thetas[p],
                                                   hyper, steps) for p in (0, 1)])
