"""Iterated prisoner's dilemma with memory-one policies: exact values and a batched sampler.

Two players each hold 5 logits θ[s]; σ(θ[s]) is the probability of cooperating in state s, where
s = 0 is the first move and s = 1, 2, 3, 4 follow the previous joint outcome CC, CD, DC, DD seen from
that player's own side (own action first). Actions: 0 = cooperate, 1 = defect. Per-step payoffs of
the row player: CC −1, CD −3, DC 0, DD −2 (Foerster et al. 2018, "Learning with Opponent-Learning
Awareness", appendix; γ = 0.96, episodes of 100 steps as in Foerster et al. 2018, DiCE §5).

States are stored from player 1's side; player 2 sees CD and DC swapped (`SWAP`).

Exact value: with q_i[o] = player i's cooperation probability after outcome o, the outcome process
is a Markov chain on {CC, CD, DC, DD}: d_0 = φ(σ(θ1[0]), σ(θ2[0])), P[o, :] = φ(q_1[o], q_2[o]) with
φ(x, y) = (xy, x(1−y), (1−x)y, (1−x)(1−y)), so

    V_i = Σ_t γ^t d_0 P^t r_i = d_0 (I − γ P)^{-1} r_i,        r_1 = (−1, −3, 0, −2), r_2 = (−1, 0, −3, −2).
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
from jax import lax

from gmrl import sampling

Array = jax.Array

GAMMA = 0.96
HORIZON = 100
NUM_STATES = 5
START = 0
OUTCOMES = ("CC", "CD", "DC", "DD")
PAYOFF = (-1.0, -3.0, 0.0, -2.0)
"""Row player's payoff after outcome CC, CD, DC, DD (own action first)."""

SWAP = (0, 1, 3, 2, 4)
"""Player 2's state index for each state index of player 1 (CD and DC swapped)."""


class Episodes(NamedTuple):
    """A batch of N joint episodes of T steps, time-major (the sampler's natural layout: no
    transposes on CPU, and sums over time vectorise across episodes).

    states [T, N] int32    s_t from player 1's side (0 at t = 0)
    outcomes [T, N] int32  o_t = 2 a¹_t + a²_t (0 cooperate, 1 defect), so s_{t+1} = o_t + 1

    Actions and rewards are derived on demand (`actions`, `rewards`): elementwise, they fuse into
    their consumers, where stacked [T, N, 2] arrays cost more than the sampling on CPU. The
    behaviour log-probabilities are not stored: on-policy estimators use the current ones, and
    the replay of `gmrl.algos.lola` records `joint_log_probs` at the sampling policies.
    """

    states: Array
    outcomes: Array

    def actions(self, player: int) -> Array:
        """a_t of `player` (0 or 1). [T, N] int32."""
        return self.outcomes >> 1 if player == 0 else self.outcomes & 1

    def rewards(self, player: int, dtype=jnp.float32) -> Array:
        """r_t of `player` (0 or 1). [T, N]."""
        return outcome_rewards(self.actions(player), self.actions(1 - player), dtype)


def own_states(states: Array, player: int) -> Array:
    """The states seen by `player` (0 or 1) for states stored from player 1's side. Same shape."""
    if player == 0:
        return states
    return jnp.where(states == 2, 3, jnp.where(states == 3, 2, states)).astype(states.dtype)


def log_prob_table(theta: Array) -> Array:
    """log π_θ(a|s) of a memory-one player as a table [5, 2] (own state, action)."""
    chex.assert_shape(theta, (NUM_STATES,))
    return jnp.stack([jax.nn.log_sigmoid(theta), jax.nn.log_sigmoid(-theta)], -1)


def action_log_probs(theta: Array, states: Array, actions: Array) -> Array:
    """log π_θ(a|s) for one player: θ [5], own states and actions of equal shape -> that shape."""
    return log_prob_table(theta).reshape(-1)[2 * states + actions]


def player_log_prob_tables(theta1: Array, theta2: Array) -> Array:
    """Each player's log-prob of its own action for every (s, a¹, a²), s from player 1's side.

    Returns [20, 2], row 4 s + 2 a¹ + a² (`joint_index`). One gather from a table indexed by the
    joint outcome replaces per-player look-ups: on CPU these gathers (and their scatter-add
    transposes) dominated the cost of an update, and this form was 3-4x faster than indexing by
    2 s + a.
    """
    swap = jnp.asarray(SWAP)
    own = jnp.broadcast_to(log_prob_table(theta1)[:, :, None], (NUM_STATES, 2, 2))
    other = jnp.broadcast_to(log_prob_table(theta2)[swap][:, None, :], (NUM_STATES, 2, 2))
    return jnp.stack([own.reshape(-1), other.reshape(-1)], -1)


def joint_log_prob_table(theta1: Array, theta2: Array) -> Array:
    """log π_1(a¹|s) + log π_2(a²|s̄) for every row 4 s + 2 a¹ + a² (`joint_index`). [20]."""
    return player_log_prob_tables(theta1, theta2).sum(-1)


def joint_index(episodes: Episodes) -> Array:
    """4 s_t + 2 a¹_t + a²_t, the row of `joint_log_prob_table` for every step. [T, N] int32."""
    return 4 * episodes.states + episodes.outcomes


def joint_log_probs(theta1: Array, theta2: Array, episodes: Episodes) -> Array:
    """log π_1(a¹_t|s¹_t) + log π_2(a²_t|s²_t) at (θ1, θ2) for every step. Returns [T, N]."""
    return joint_log_prob_table(theta1, theta2)[joint_index(episodes)]


def sample(key: Array, theta1: Array, theta2: Array, num_episodes: int,
           horizon: int = HORIZON) -> Episodes:
    """Sample `num_episodes` joint episodes of `horizon` steps at (θ1, θ2) [5] each (time-major).

    Player i defects at step t iff u_t^i ≥ σ(θ^i[s_t]), u from `sampling.hashed_uniform`
    [T, N, 2]. Every step's joint outcome o = 2 a¹ + a² is first computed for all 5 possible
    states at once and packed 2 bits per state into one int32; the `lax.scan` over time then only
    unpacks the current state's outcome, o_t = (packed_t >> 2 s_t) & 3, s_{t+1} = o_t + 1, with no
    gathers. The parameters are treated as constants (stop_gradient). Equal, draw for draw, to a
    direct per-step sampler (tests/test_ipd.py).
    """
    theta1, theta2 = lax.stop_gradient(theta1), lax.stop_gradient(theta2)
    swap = jnp.asarray(SWAP, jnp.int32)
    # per state of player 1's side: both cooperation probabilities, [5, 2]
    coop = jnp.stack([jax.nn.sigmoid(theta1), jax.nn.sigmoid(theta2)[swap]], -1)
    uniforms = sampling.hashed_uniform(key, (horizon, num_episodes, 2)).astype(coop.dtype)
    u1, u2 = uniforms[..., 0], uniforms[..., 1]
    packed = jnp.zeros(uniforms.shape[:2], jnp.int32)
    for s in range(NUM_STATES):  # five fused elementwise passes, no [T, N, 5] intermediate
        outcome = 2 * (u1 >= coop[s, 0]).astype(jnp.int32) + (u2 >= coop[s, 1]).astype(jnp.int32)
        packed = packed | (outcome << (2 * s))

    def step(state, packed_t):
        outcome = (packed_t >> (2 * state)) & 3
        return outcome + 1, outcome

    init = jnp.full((num_episodes,), START, jnp.int32)
    _, outcomes = lax.scan(step, init, packed)  # [T, N]
    return Episodes(jnp.pad(outcomes[:-1] + 1, ((1, 0), (0, 0)), constant_values=START), outcomes)


def outcome_rewards(own: Array, other: Array, dtype=jnp.float32) -> Array:
    """The row player's payoff for its action `own` against `other` (0/1 arrays): the bilinear
    form P[CC] + (P[DC] − P[CC]) a + (P[CD] − P[CC]) b + (P[DD] − P[DC] − P[CD] + P[CC]) a b."""
    cc, cd, dc, dd = PAYOFF
    own, other = own.astype(dtype), other.astype(dtype)
    return cc + (dc - cc) * own + (cd - cc) * other + (dd - dc - cd + cc) * own * other


def _phi(x: Array, y: Array) -> Array:
    return jnp.stack([x * y, x * (1 - y), (1 - x) * y, (1 - x) * (1 - y)], -1)


def outcome_chain(theta1: Array, theta2: Array) -> tuple[Array, Array, Array]:
    """Initial outcome law d_0 [4], transition matrix P [4, 4] and rewards [4, 2] of both players."""
    chex.assert_shape([theta1, theta2], (NUM_STATES,))
    p1 = jax.nn.sigmoid(theta1)
    p2 = jax.nn.sigmoid(theta2)[jnp.asarray(SWAP)]  # indexed by player 1's state
    payoff = jnp.asarray(PAYOFF, p1.dtype)
    rewards = jnp.stack([payoff, payoff[jnp.asarray([0, 2, 1, 3])]], -1)
    return _phi(p1[0], p2[0]), _phi(p1[1:], p2[1:]), rewards


def exact_values(theta1: Array, theta2: Array, gamma: float = GAMMA) -> Array:
    """Discounted values (V_1, V_2) = d_0 (I − γP)^{-1} r of the infinite game. Returns [2].

    Call under `jax.enable_x64(True)` with float64 parameters for oracle accuracy.
    """
    d0, transition, rewards = outcome_chain(theta1, theta2)
    occupancy = jnp.linalg.solve((jnp.eye(4, dtype=d0.dtype) - gamma * transition).T, d0)
    return occupancy @ rewards


def finite_horizon_values(theta1: Array, theta2: Array, gamma: float = GAMMA,
                          horizon: int = HORIZON) -> Array:
    """E Σ_{t<T} γ^t r_t of both players, propagating the outcome law T steps. Returns [2]."""
    d0, transition, rewards = outcome_chain(theta1, theta2)

    def step(carry, _):
        law, discount = carry
        return (law @ transition, discount * gamma), discount * (law @ rewards)

    _, per_step = lax.scan(step, (d0, jnp.ones((), d0.dtype)), None, length=horizon)
    return per_step.sum(0)


def average_rewards(theta1: Array, theta2: Array, horizon: int = HORIZON) -> Array:
    """Expected per-step reward (1/T) E Σ_{t<T} r_t of both players over a T-step episode. [2]."""
    return finite_horizon_values(theta1, theta2, 1.0, horizon) / horizon
