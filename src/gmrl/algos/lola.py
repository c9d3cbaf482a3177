"""LOLA-DiCE on the iterated prisoner's dilemma, with exact LOLA meta-gradients beside it.

Foerster et al. 2018 (LOLA; DiCE §5) as studied by Liu et al. 2022 (§6, "A Theoretical
Understanding of Gradient Bias in Meta-Reinforcement Learning"). Agent i's meta-parameter is its own
policy θ^i; its inner loop is the opponent's K anticipated gradient-ascent steps on the opponent's
return, θ^j_{k+1} = θ^j_k + α ∇_j J_j(θ^i, θ^j_k); its outer objective is J_i(θ^i, θ^j_K), and the
meta-gradient d/dθ^i J_i(θ^i, θ^j_K(θ^i)) moves θ^i by Adam.

Each inner step is composed as in the decomposed estimate (docs/design.md, "The decomposed
estimate"; Liu, Feng et al. 2022, §4) with `core.straight_through`: the compositional
part (the step's value) and the Hessian part (its Jacobian in θ^i) each come from the exact value or
from a DiCE estimate on their own batch (on-policy, or an importance-weighted replay). Sampled
returns use the DiCE surrogate over the joint trajectory (both players' log-probs are stochastic
nodes) plus the baseline term Σ_t γ^t (1 − ρ_t) V(s_t) with a learned tabular value V.

Everything is a pure function of explicit PRNG keys; `train_chunk` runs a block of updates under
one `jax.jit`, vmapped over seeds. Exact quantities are computed in float64.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gmrl import estimators, stats
from gmrl.core import straight_through
from gmrl.envs import ipd
from gmrl.errors import require
from gmrl.problems import lola as lola_problem

Array = jax.Array
BASELINES = ("return", "reference")


@dataclasses.dataclass(frozen=True)
class LolaConfig:
    """One LOLA-DiCE variant. A batch size of None means `exact` (closed-form value).

    comp, hessian: sources of the lookahead step's value and Jacobian (episodes or None).
    outer: source of the agent's own objective at the opponent's lookahead parameters.
    comp_off_policy / hessian_off_policy: that part is the importance-weighted DiCE over a
    persistent FIFO replay of `replay_size` episodes, filled once from the initial policies; every
    inner step first adds its fresh batch (that part's batch size), overwriting the oldest
    episodes, as in the reference code (Liu, Feng et al. 2022, lola_dice_off_policy*.py).
    clip_rho: truncate each per-decision ratio at c, ρ̄_t = min(ρ_t, c) (None: no truncation);
    lowers the variance of stale-replay estimates at the price of a bias.
    replay_weights: False drops the importance weights over the replay (the uncorrected
    off-policy control: the stale episodes are read as if drawn at the current policies).
    independent_inner: the value and the Jacobian of a step come from independent batches even
    when both parts have the same size and policy (the control for the unequal variants, which
    always decouple them); False shares one batch, as the reference code does.
    baseline: "return" fits the value table V(s_t) to the discounted return-to-go and uses it in
    every sampled part; "reference" fits it to r_t and leaves the on-policy inner parts of the
    off-policy variants without a baseline, as the reference code does.
    """

    comp: int | None = 128
    hessian: int | None = 128
    outer: int | None = 128
    comp_off_policy: bool = False
    hessian_off_policy: bool = False
    replay_size: int = 1024
    clip_rho: float | None = None
    replay_weights: bool = True
    independent_inner: bool = False
    lookaheads: int = 1
    inner_lr: float = 0.3
    outer_lr: float = 0.1
    value_lr: float = 0.1
    baseline: str = "return"
    gamma: float = ipd.GAMMA
    horizon: int = ipd.HORIZON

    def validate(self) -> LolaConfig:
        """Raise InputError on an inconsistent variant; return self."""
        for name in ("comp", "hessian", "outer"):
            size = getattr(self, name)
            require(size is None or size >= 1, f"{name} batch size must be >= 1 or exact, got {size}")
        for part in ("comp", "hessian"):
            if getattr(self, f"{part}_off_policy"):
                size = getattr(self, part)
                require(size is not None, f"off-policy {part} needs a batch size, not exact")
                require(self.replay_size % size == 0 and self.replay_size >= size,
                        f"replay size {self.replay_size} must be a multiple of the {part} "
                        f"batch size {size}")
        if self.comp_off_policy and self.hessian_off_policy:
            require(self.comp == self.hessian, "off-policy comp and hessian share the replay's "
                    f"fresh batch: sizes must agree, got {self.comp} and {self.hessian}")
        require(self.clip_rho is None or self.clip_rho > 0,
                f"clip-rho must be > 0 (or none), got {self.clip_rho}")
        require(self.clip_rho is None or self.off_policy,
                "clip-rho applies only to an off-policy part (--off-policy*)")
        require(self.replay_weights or self.off_policy,
                "dropping the replay weights applies only to an off-policy part (--off-policy*)")
        require(self.replay_weights or self.clip_rho is None,
                "clip-rho truncates the replay weights: not with the weights dropped")
        require(self.baseline in BASELINES,
                f"baseline must be one of {', '.join(BASELINES)}, got {self.baseline!r}")
        require(self.lookaheads >= 1, f"lookaheads must be >= 1, got {self.lookaheads}")
        require(0.0 < self.gamma < 1.0, f"gamma must be in (0, 1), got {self.gamma}")
        require(self.horizon >= 1, f"horizon must be >= 1, got {self.horizon}")
        for name in ("inner_lr", "outer_lr", "value_lr"):
            require(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        return self

    @property
    def off_policy(self) -> bool:
        return self.comp_off_policy or self.hessian_off_policy

    @property
    def shared_inner(self) -> bool:
        """Whether the value and Jacobian of a step come from one and the same estimate."""
        return (self.comp == self.hessian and self.comp_off_policy == self.hessian_off_policy
                and not self.independent_inner)

    def inner_baseline(self, off_policy_part: bool) -> bool:
        """Whether an inner (lookahead) part uses the value baseline."""
        return self.baseline == "return" or off_policy_part or not self.off_policy

    @property
    def has_exact_part(self) -> bool:
        """Whether a part is the closed-form value: its program is traced with float64 enabled
        (the exact part in float64); a fully sampled variant's program is all float32."""
        return None in (self.comp, self.hessian, self.outer)

    @property
    def exact_part(self) -> LolaConfig:
        """The settings the exact LOLA gradient depends on (every source exact): one oracle
        program serves all variants that share them."""
        return LolaConfig(comp=None, hessian=None, outer=None, lookaheads=self.lookaheads,
                          inner_lr=self.inner_lr, gamma=self.gamma, horizon=self.horizon)


def _ordered(player: int, own: Any, other: Any) -> tuple[Any, Any]:
    """(player 1's, player 2's) from `player`'s own and its opponent's."""
    return (own, other) if player == 0 else (other, own)


# ----------------------------------------------------------------------------------------------
# Objectives: exact (float64) and sampled (DiCE + value baseline)


def exact_return(theta1: Array, theta2: Array, player: int, gamma: float,
                 horizon: int | None = None) -> Array:
    """Exact discounted value of `player` at (θ1, θ2) in float64: of the infinite game (the
    reference's oracle) or, with `horizon`, of the first `horizon` steps. Returns [] (input dtype)."""
    dtype = theta1.dtype
    with jax.enable_x64(True):
        t1, t2 = theta1.astype(jnp.float64), theta2.astype(jnp.float64)
        value = (ipd.exact_values(t1, t2, gamma) if horizon is None
                 else ipd.finite_horizon_values(t1, t2, gamma, horizon))
        return value[player].astype(dtype)


def truncated_behaviour(log_prob: Array, behaviour: Array, clip_rho: float | None) -> Array:
    """Behaviour log-probs raised so that every per-decision ratio is min(ρ_t, c) in value.

    log ρ̄_t = log ρ_t − sg(max(0, log ρ_t − log c)): the truncation is a constant, so every
    derivative of the (DiCE) weights is that of the truncated weight, as in V-trace (Espeholt et
    al. 2018). log_prob, behaviour [T, N] -> [T, N].
    """
    if clip_rho is None:
        return behaviour
    excess = jax.nn.relu(log_prob - behaviour - jnp.log(jnp.asarray(clip_rho, log_prob.dtype)))
    return behaviour + lax.stop_gradient(excess)


class WeightStats(NamedTuple):
    """Staleness of a replay at the current parameters (per-decision weights w_{t,n} =
    Π_{t'≤t} ρ̄_{t',n}, joint ratios of both players).

    ess []             effective sample size (Σ_n w)² / Σ_n w² (Kong 1992), averaged over t
    max_log_weight []  max_{t,n} log w_{t,n}
    """

    ess: Array
    max_log_weight: Array


def weight_stats(log_prob: Array, behaviour: Array) -> WeightStats:
    """`WeightStats` of per-decision weights from log-probs [T, N] (in log space, no gradient)."""
    log_w = estimators.cumsum(lax.stop_gradient(log_prob - behaviour))  # [T, N]
    log_ess = 2 * jax.nn.logsumexp(log_w, axis=1) - jax.nn.logsumexp(2 * log_w, axis=1)
    return WeightStats(jnp.mean(jnp.exp(log_ess)), jnp.max(log_w))


def dice_return(theta1: Array, theta2: Array, values: Array, episodes: ipd.Episodes, player: int,
                gamma: float, behaviour: Array | None = None, clip_rho: float | None = None,
                baseline: bool = True) -> Array:
    """Mean over episodes of DiCE(joint) + Σ_t γ^t (1 − ρ_t) V(s_t) for `player`'s rewards.

    Foerster et al. 2018 (DiCE, eq. 3 and its baseline, §4). ρ_t is the joint ratio of both
    players' current over behaviour probabilities: on-policy (`behaviour` None) the behaviour is
    stop_gradient(current); off-policy `behaviour` [T, N] holds the joint log-probs recorded
    when sampling, so every DiCE dependency is importance-weighted, with per-decision ratios
    truncated at `clip_rho` (`truncated_behaviour`). `values` [5] is the player's value table,
    held constant; `baseline=False` drops the baseline term. Returns [].
    """
    log_prob = ipd.joint_log_probs(theta1, theta2, episodes)  # [T, N]
    if behaviour is not None:
        behaviour = truncated_behaviour(log_prob, behaviour, clip_rho)
    rewards = episodes.rewards(player, log_prob.dtype)
    discounts = jnp.full(rewards.shape[0], gamma, rewards.dtype)
    axes = (1, None if behaviour is None else 1, 1, None)
    objective = jax.vmap(estimators.dice, axes)(log_prob, behaviour, rewards, discounts)
    if baseline:
        v = lax.stop_gradient(values)[ipd.own_states(episodes.states, player)]
        objective = objective - jax.vmap(estimators.lvc, axes)(log_prob, behaviour, v, discounts)
    return jnp.mean(objective)


def value_loss(values: Array, episodes: ipd.Episodes, player: int, gamma: float,
               baseline: str) -> Array:
    """Mean squared error of the tabular value V [5] against the discounted returns-to-go
    (baseline "return") or the rewards r_t ("reference"). []."""
    rewards = episodes.rewards(player, values.dtype)
    if baseline == "return":
        discounts = jnp.full(rewards.shape[0], gamma, rewards.dtype)
        rewards = jax.vmap(estimators.discounted_returns, (1, None, None), 1)(rewards, discounts, 0.0)
    predicted = values[ipd.own_states(episodes.states, player)]
    return jnp.mean((rewards - predicted) ** 2)


# ----------------------------------------------------------------------------------------------
# Replay buffer (off-policy correction)


class Replay(NamedTuple):
    """A FIFO of episodes (time-major, [T, capacity]) with their joint behaviour log-probs
    [T, capacity] recorded at sampling; `next` is the oldest slot."""

    episodes: ipd.Episodes
    behaviour: Array
    next: Array


def replay_add(replay: Replay, fresh: ipd.Episodes, behaviour: Array) -> Replay:
    """Overwrite the oldest N episodes with `fresh` (and their behaviour log-probs [T, N])."""
    def put(buf, new):
        return lax.dynamic_update_slice_in_dim(buf, new, replay.next, 1)

    capacity = replay.behaviour.shape[1]
    return Replay(jax.tree.map(put, replay.episodes, fresh), put(replay.behaviour, behaviour),
                  (replay.next + behaviour.shape[1]) % capacity)


def sample_with_behaviour(key: Array, theta1: Array, theta2: Array, size: int,
                          horizon: int) -> tuple[ipd.Episodes, Array]:
    """`size` episodes at (θ1, θ2) and their joint log-probs there (constants), [T, N]."""
    episodes = ipd.sample(key, theta1, theta2, size, horizon)
    return episodes, lax.stop_gradient(ipd.joint_log_probs(theta1, theta2, episodes))


def replay_fill(key: Array, theta1: Array, theta2: Array, cfg: LolaConfig) -> Replay:
    """A full replay sampled at (θ1, θ2)."""
    episodes, behaviour = sample_with_behaviour(key, theta1, theta2, cfg.replay_size, cfg.horizon)
    return Replay(episodes, behaviour, jnp.zeros((), jnp.int32))


# ----------------------------------------------------------------------------------------------
# The lookahead (inner loop) and the meta-objective


NO_WEIGHTS = WeightStats(jnp.float32(jnp.nan), jnp.float32(jnp.nan))


def _opponent_gradient(source: int | None, off_policy: bool, player: int, theta_own: Array,
                       theta_opp: Array, values_opp: Array, key: Array, replay: Replay | None,
                       cfg: LolaConfig) -> tuple[Array, Replay | None, WeightStats]:
    """∇_opp J_opp(θ_own, θ_opp) from `source`, differentiable in θ_own.

    Off-policy: the fresh batch joins the replay first, then the importance-weighted DiCE runs
    over the whole replay. Returns ([5], replay, weight statistics (NaN on-policy)).
    """
    opponent = 1 - player
    thetas = _ordered(player, theta_own, theta_opp)
    if source is None:
        def objective(theta):
            return exact_return(*_ordered(player, theta_own, theta), opponent, cfg.gamma)
        return jax.grad(objective)(theta_opp), replay, NO_WEIGHTS
    fresh, behaviour = sample_with_behaviour(key, *thetas, source, cfg.horizon)
    stats = NO_WEIGHTS
    if off_policy:
        replay = replay_add(replay, fresh, behaviour)
        fresh, behaviour = replay.episodes, replay.behaviour
        current = ipd.joint_log_probs(*thetas, fresh)
        stats = weight_stats(current, truncated_behaviour(current, behaviour, cfg.clip_rho))
        if not cfg.replay_weights:  # uncorrected: every ratio 1, the replay read as on-policy
            behaviour = None
    else:
        behaviour = None
    baseline = cfg.inner_baseline(off_policy)

    def surrogate(theta):
        return dice_return(*_ordered(player, theta_own, theta), values_opp, fresh, opponent,
                           cfg.gamma, behaviour, cfg.clip_rho, baseline)

    return jax.grad(surrogate)(theta_opp), replay, stats


def lookahead(player: int, theta_own: Array, theta_opp: Array, values_opp: Array, key: Array,
              replay: Replay | None, cfg: LolaConfig) -> tuple[Array, Replay | None, WeightStats]:
    """The opponent's K anticipated steps θ_{k+1} = θ_k + α ĝ_k, composed as in docs/design.md
    (the straight-through step).

    Value of each step from the compositional source, Jacobian (in θ_own) from the Hessian source.
    Returns (θ_opp after K steps [5], replay after the fresh batches were added, the replay's
    weight statistics at the first step).
    """
    first = None
    for step_key in jax.random.split(key, cfg.lookaheads):
        key_comp, key_hess = jax.random.split(step_key)
        comp_grad, replay, comp_stats = _opponent_gradient(
            cfg.comp, cfg.comp_off_policy, player, theta_own, theta_opp, values_opp, key_comp,
            replay, cfg)
        if cfg.shared_inner:
            theta_opp = theta_opp + cfg.inner_lr * comp_grad
            first = comp_stats if first is None else first
            continue
        hess_grad, replay, hess_stats = _opponent_gradient(
            cfg.hessian, cfg.hessian_off_policy, player, theta_own, theta_opp, values_opp,
            key_hess, replay, cfg)
        if first is None:
            first = comp_stats if cfg.comp_off_policy else hess_stats
        theta_opp = straight_through(theta_opp + cfg.inner_lr * comp_grad,
                                     theta_opp + cfg.inner_lr * hess_grad)
    return theta_opp, replay, first


def meta_objective(theta_own: Array, player: int, theta_opp: Array, values: Array, key: Array,
                   replay: Replay | None, cfg: LolaConfig):
    """Agent `player`'s outer objective at the opponent's lookahead parameters.

    values [2, 5] are both players' value tables. Returns (objective [], (outer episodes or None,
    replay, weight statistics)); its gradient in θ_own is the LOLA meta-gradient estimate.
    """
    key_inner, key_outer = jax.random.split(key)
    theta_look, replay, stats = lookahead(player, theta_own, theta_opp, values[1 - player],
                                          key_inner, replay, cfg)
    thetas = _ordered(player, theta_own, theta_look)
    if cfg.outer is None:
        return exact_return(*thetas, player, cfg.gamma), (None, replay, stats)
    episodes = ipd.sample(key_outer, *thetas, cfg.outer, cfg.horizon)
    objective = dice_return(*thetas, values[player], episodes, player, cfg.gamma)
    return objective, (episodes, replay, stats)


def exact_lola_gradients(thetas: Array, cfg: LolaConfig, horizon: int | None = None) -> Array:
    """Both players' exact LOLA meta-gradients at thetas [2, 5], in float64. Returns [2, 5].

    The oracle of the infinite game (the reference's) or, with `horizon`, of the first `horizon`
    steps (what a sampled estimate from `horizon`-step episodes is unbiased for): the core's exact
    meta-gradient of the LOLA problem (`gmrl.problems.lola`).
    """
    return lola_problem.exact_gradients(thetas, cfg.inner_lr, cfg.lookaheads, cfg.gamma,
                                        horizon).astype(thetas.dtype)


# ----------------------------------------------------------------------------------------------
# Training


class TrainState(NamedTuple):
    """Per-seed state: thetas [2, 5], values [2, 5], their Adam states and the replay."""

    thetas: Array
    values: Array
    theta_opt: Any
    value_opt: Any
    replay: Replay | None


class StepMetrics(NamedTuple):
    """What the training program records per update (player axis first), at the parameters
    before the update.

    thetas [2, 5]          both players' logits
    grad [2, 5]            the estimated meta-gradient of each player
    ess [2]                each player's lookahead replay: effective sample size (NaN on-policy)
    max_log_weight [2]     ... and its largest per-decision log-weight (NaN on-policy)
    """

    thetas: Array
    grad: Array
    ess: Array
    max_log_weight: Array


class UpdateMetrics(NamedTuple):
    """Per update, at the parameters before the update (player axis first where present).

    score [2]            expected average per-step reward of each player over a T-step episode
    cooperation [2, 5]   σ(θ^i), cooperation probability per own state (start, CC, CD, DC, DD)
    grad [2, 5]          the estimated meta-gradient of each player
    exact_grad [2, 5]    the exact LOLA meta-gradient of each player (float64 oracle)
    ess, max_log_weight [2]  replay staleness (`StepMetrics`; NaN for on-policy variants)
    """

    score: Array
    cooperation: Array
    grad: Array
    exact_grad: Array
    ess: Array
    max_log_weight: Array


def _optimizers(cfg: LolaConfig):
    return optax.adam(cfg.outer_lr), optax.adam(cfg.value_lr)


def init_state(key: Array, cfg: LolaConfig) -> TrainState:
    """Zero logits (cooperation 0.5) and zero values, as in the reference experiments; the
    off-policy replay is filled once from these initial policies."""
    theta_opt, value_opt = _optimizers(cfg)
    thetas = jnp.zeros((2, ipd.NUM_STATES), jnp.float32)
    values = jnp.zeros((2, ipd.NUM_STATES), jnp.float32)
    replay = replay_fill(key, thetas[0], thetas[1], cfg) if cfg.off_policy else None
    return TrainState(thetas, values, theta_opt.init(thetas), value_opt.init(values), replay)


def update(state: TrainState, key: Array, cfg: LolaConfig) -> tuple[TrainState, StepMetrics]:
    """One simultaneous LOLA update of both players (Adam ascent on each meta-gradient).

    Off-policy, player 1's lookahead adds its fresh batches to the shared replay before player
    2's, as in the reference code. On-policy the players are independent given the state, and
    the game is symmetric (player 2 at (θ1, θ2) is player 1 at (θ2, θ1), states being own-side),
    so both meta-gradients are one `jax.vmap` of player 1's: half the program, twice the width.
    """
    theta_opt, value_opt = _optimizers(cfg)
    thetas, values, replay = state.thetas, state.values, state.replay
    player_keys = jax.random.split(key)
    if cfg.off_policy:
        grads, batches, stats = [], [], []
        for player in (0, 1):
            grad, (episodes, replay, weights) = jax.grad(meta_objective, has_aux=True)(
                thetas[player], player, thetas[1 - player], values, player_keys[player], replay,
                cfg)
            grads.append(grad)
            batches.append(episodes)
            stats.append(weights)
        grads = jnp.stack(grads)
        ess = jnp.stack([w.ess for w in stats])
        max_log_weight = jnp.stack([w.max_log_weight for w in stats])
    else:
        def as_player_one(own_and_opp, own_and_opp_values, player_key):
            grad, (episodes, _, _) = jax.grad(meta_objective, has_aux=True)(
                own_and_opp[0], 0, own_and_opp[1], own_and_opp_values, player_key, None, cfg)
            value_grad = (jnp.zeros_like(own_and_opp_values[0]) if episodes is None else
                          jax.grad(value_loss)(own_and_opp_values[0], episodes, 0, cfg.gamma,
                                               cfg.baseline))
            return grad, value_grad

        swapped = jnp.stack([thetas, thetas[::-1]]), jnp.stack([values, values[::-1]])
        grads, value_grads = jax.vmap(as_player_one)(*swapped, player_keys)
        ess = max_log_weight = jnp.full((2,), jnp.nan, jnp.float32)
    metrics = StepMetrics(thetas, grads, ess, max_log_weight)
    updates, theta_state = theta_opt.update(-grads, state.theta_opt, thetas)
    thetas = optax.apply_updates(thetas, updates)
    value_state = state.value_opt
    if cfg.outer is not None:
        if cfg.off_policy:
            value_grads = jnp.stack([jax.grad(value_loss)(values[p], batches[p], p, cfg.gamma,
                                                          cfg.baseline) for p in (0, 1)])
        updates, value_state = value_opt.update(value_grads, value_state, values)
        values = optax.apply_updates(values, updates)
    return TrainState(thetas, values, theta_state, value_state, replay), metrics


def exact_average_rewards(thetas: Array, horizon: int) -> Array:
    """Expected per-step reward of both players over a `horizon`-step episode (float64). [2]."""
    with jax.enable_x64(True):
        t = thetas.astype(jnp.float64)
        return ipd.average_rewards(t[0], t[1], horizon).astype(thetas.dtype)


def _diagnose(thetas: Array, cfg: LolaConfig) -> tuple[Array, Array]:
    """Exact LOLA gradients [..., 2, 5] and scores [..., 2] at thetas [..., 2, 5] (float64)."""
    flat = thetas.reshape(-1, 2, ipd.NUM_STATES)
    grads = jax.vmap(lambda t: exact_lola_gradients(t, cfg))(flat)
    scores = jax.vmap(lambda t: exact_average_rewards(t, cfg.horizon))(flat)
    return grads.reshape(thetas.shape), scores.reshape(thetas.shape[:-1])


_diagnose_jit = jax.jit(_diagnose, static_argnames="cfg")


def diagnose(step: StepMetrics, cfg: LolaConfig) -> UpdateMetrics:
    """The exact oracle at every recorded update, as its own float64 program (one per
    `cfg.exact_part`, shared by all variants), outside the training program. Leaves [S, U, ...]."""
    with jax.enable_x64(True):
        exact, score = _diagnose_jit(jnp.asarray(step.thetas), cfg.exact_part)
    return UpdateMetrics(score, jax.nn.sigmoid(step.thetas), step.grad, exact, step.ess,
                         step.max_log_weight)


def seed_keys(seed: int, num_seeds: int) -> Array:
    """One key per seed index; seed s's key does not depend on how many seeds run. [S] keys."""
    base = jax.random.key(seed)
    return jax.vmap(lambda s: jax.random.fold_in(base, s))(jnp.arange(num_seeds))


def init_states(keys: Array, cfg: LolaConfig) -> TrainState:
    """Vmapped `init_state` over seed keys [S]."""
    return jax.vmap(lambda k: init_state(jax.random.split(k)[0], cfg))(keys)


def _chunk(states: TrainState, keys: Array, first_update: Array, cfg: LolaConfig,
           length: int) -> tuple[TrainState, StepMetrics]:
    def one_seed(state, key):
        def body(carry, index):
            return update(carry, jax.random.fold_in(jax.random.split(key)[1], index), cfg)
        return lax.scan(body, state, first_update + jnp.arange(length))
    return jax.vmap(one_seed)(states, keys)


_train_chunk = jax.jit(_chunk, static_argnames=("cfg", "length"))


def train_chunk(states: TrainState, keys: Array, first_update: Array, cfg: LolaConfig,
                length: int) -> tuple[TrainState, StepMetrics]:
    """`length` updates from update index `first_update`, vmapped over seeds.

    states and keys have a leading seed axis [S]; returns (states, metrics [S, length, ...]). One
    compiled program per (variant, length, number of seeds). The variants with an exact part are
    traced with float64 enabled (`LolaConfig.has_exact_part`); the sampled estimators stay
    float32 (explicit dtypes).
    """
    with jax.enable_x64(cfg.has_exact_part):
        return _train_chunk(states, keys, first_update, cfg, length)


COMPILE_SECONDS: dict[tuple, float] = {}
"""Wall seconds each cached program took to compile, by `_compiled_chunk`'s arguments."""


@functools.lru_cache(maxsize=16)
def _compiled_chunk(cfg: LolaConfig, chunk: int, num_seeds: int, sharding: Any):
    """The ahead-of-time compiled `_train_chunk` for (cfg, chunk, number of seeds, placement of
    the seeds); the most recent programs are kept, so repeating a run in one process does
    not compile again (the same `functools.lru_cache` idiom as `gmrl.algos.a2c`)."""
    started = time.perf_counter()
    with jax.enable_x64(cfg.has_exact_part):
        keys = seed_keys(0, num_seeds)
        states = init_states(keys, cfg)
        if sharding is not None:
            keys, states = jax.device_put((keys, states), sharding)
        first = jnp.zeros((), jnp.int32)
        compiled = _train_chunk.lower(states, keys, first, cfg, chunk).compile()
    COMPILE_SECONDS[(cfg, chunk, num_seeds, sharding)] = time.perf_counter() - started
    return compiled


def _seed_sharding(num_seeds: int):
    """Seeds split across the JAX devices (e.g. JAX_NUM_CPU_DEVICES=2: one per core) when their
    number divides the seeds; None: one device."""
    devices = jax.devices()
    if len(devices) > 1 and num_seeds % len(devices) == 0:
        return NamedSharding(Mesh(np.array(devices), ("seeds",)), PartitionSpec("seeds"))
    return None


def compile_programs(cfgs, chunk: int, num_seeds: int, workers: int = 2) -> float:
    """Compile the training programs of `cfgs` ahead of time, `workers` at a time (XLA compiles
    outside the GIL, so a study's programs compile in parallel). Returns wall seconds."""
    from concurrent.futures import ThreadPoolExecutor

    started = time.perf_counter()
    sharding = _seed_sharding(num_seeds)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        list(pool.map(lambda c: _compiled_chunk(c.validate(), chunk, num_seeds, sharding), cfgs))
    return time.perf_counter() - started


class TrainResult(NamedTuple):
    """Metrics as numpy arrays [S, U, ...] and wall-clock seconds: the run, and the compilation
    of its program (when compiled ahead beside others, its own time in the parallel pool)."""

    metrics: UpdateMetrics
    compile_seconds: float
    run_seconds: float


def train(cfg: LolaConfig, seed: int = 0, num_seeds: int = 10, num_updates: int = 500,
          chunk: int = 50, progress=None) -> TrainResult:
    """Run `num_updates` LOLA updates for `num_seeds` seeds (vectorised); see `UpdateMetrics`.

    The updates run in blocks of `chunk` through one ahead-of-time compiled program (a last
    partial block is computed in full and cut); after each block the exact oracle runs on the
    block's parameters (`diagnose`). `progress(done_updates, metrics_so_far)` is called after
    each block, e.g. to write logs that survive an interrupt.
    """
    cfg.validate()
    require(num_seeds >= 1, f"number of seeds must be >= 1, got {num_seeds}")
    require(num_updates >= 1, f"number of updates must be >= 1, got {num_updates}")
    require(chunk >= 1, f"chunk must be >= 1, got {chunk}")
    chunk = min(chunk, num_updates)
    keys = seed_keys(seed, num_seeds)
    started = time.perf_counter()
    with jax.enable_x64(cfg.has_exact_part):
        states = init_states(keys, cfg)
        sharding = _seed_sharding(num_seeds)
        if sharding is not None:
            keys, states = jax.device_put((keys, states), sharding)
        compiled = _compiled_chunk(cfg, chunk, num_seeds, sharding)
    # the program's own compile time, also when it was compiled ahead (`compile_programs`)
    compile_seconds = max(time.perf_counter() - started,
                          COMPILE_SECONDS.get((cfg, chunk, num_seeds, sharding), 0.0))
    started = time.perf_counter()
    parts: list[UpdateMetrics] = []
    done = 0
    while done < num_updates:
        with jax.enable_x64(cfg.has_exact_part):
            states, step = compiled(states, keys, jnp.asarray(done, jnp.int32))
        parts.append(jax.tree.map(np.asarray, diagnose(step, cfg)))
        done += chunk
        so_far = jax.tree.map(lambda *xs: np.concatenate(xs, 1)[:, :num_updates], *parts)
        if progress is not None:
            progress(min(done, num_updates), so_far)
    return TrainResult(so_far, compile_seconds, time.perf_counter() - started)


def correlations(metrics: UpdateMetrics) -> np.ndarray:
    """Pearson correlation over the 5 coordinates between estimated and exact meta-gradients.

    Uses `gmrl.stats.corr` (one repeat per seed, update and player). Returns [S, U, 2]; NaN
    where either gradient is constant across coordinates.
    """
    return stats.corr(metrics.grad[..., None, :], metrics.exact_grad)


REFERENCE_VARIANTS: dict[str, dict[str, Any]] = {
    "inner128-outer128": {},
    "inner-exact": dict(comp=None, hessian=None),
    "inner1024": dict(comp=1024, hessian=1024),
    "inner-exact-outer-exact": dict(comp=None, hessian=None, outer=None),
    "comp128-hess1024": dict(hessian=1024),
    "comp128-hess-exact": dict(hessian=None),
    "comp-exact-hess128": dict(comp=None),
    "comp1024-hess128": dict(comp=1024),
    "off-policy": dict(comp_off_policy=True, hessian_off_policy=True),
    "off-comp-on-hess": dict(comp_off_policy=True),
    "on-comp-off-hess": dict(hessian_off_policy=True),
}
"""The reference study's 11 variants (Liu et al. 2022, LOLA-DiCE): LolaConfig overrides."""

CONTROL_VARIANTS: dict[str, dict[str, Any]] = {
    "off-policy-unweighted": dict(comp_off_policy=True, hessian_off_policy=True,
                                  replay_weights=False),
    "stale32-off-policy": dict(comp=32, hessian=32, comp_off_policy=True, hessian_off_policy=True),
    "stale32-unweighted": dict(comp=32, hessian=32, comp_off_policy=True, hessian_off_policy=True,
                               replay_weights=False),
    "inner32": dict(comp=32, hessian=32),
    "inner128-independent": dict(independent_inner=True),
}
"""The controls that identify the study's claims (LolaConfig overrides): the replay without its
importance weights; a high-staleness design (32 fresh episodes per lookahead into the 1024-episode
replay: an episode survives 16 updates) corrected and uncorrected, with its fresh-32 twin (the
fresh-1024 twin is `inner1024`); and 128/128 with independent batches for the step's value and
Jacobian (every unequal variant decouples them)."""

STUDY_VARIANTS: dict[str, dict[str, Any]] = {**REFERENCE_VARIANTS, **CONTROL_VARIANTS}
"""`gmrl study lola`'s variants: the reference study's, then the controls."""


# ----------------------------------------------------------------------------------------------
# The LOLA gradient's error at fixed parameter points (bias² and variance against the oracle)


def _exact_run_config(cfg: LolaConfig) -> LolaConfig:
    return LolaConfig(comp=None, hessian=None, outer=None, lookaheads=cfg.lookaheads,
                      inner_lr=cfg.inner_lr, outer_lr=cfg.outer_lr, gamma=cfg.gamma,
                      horizon=cfg.horizon)


@functools.partial(jax.jit, static_argnames=("cfg", "num_updates"))
def _exact_trajectory(cfg: LolaConfig, num_updates: int) -> Array:
    state = init_state(jax.random.key(0), cfg)

    def body(state, index):
        return update(state, jax.random.key(0), cfg)[0], state.thetas

    return lax.scan(body, state, jnp.arange(num_updates))[1]


def exact_trajectory(cfg: LolaConfig, num_updates: int) -> Array:
    """Both players' logits before each of `num_updates` exact LOLA updates from the initial
    policies (every part exact, Adam at cfg.outer_lr): the fixed points. [U, 2, 5] float32."""
    with jax.enable_x64(True):
        return _exact_trajectory(_exact_run_config(cfg), num_updates)


def _forced_draw(key: Array, trajectory: Array, cfg: LolaConfig) -> tuple[Array, Array]:
    """One draw of the meta-gradients along `trajectory` [U, 2, 5]: every update of `update` runs
    with both players' logits forced to the trajectory's, so the learned values and (off-policy)
    the replay evolve as in training, at the trajectory's pace. Returns grads [U, 2, 5] and the
    replay ESS [U, 2] (NaN on-policy)."""
    key_init, key_run = jax.random.split(key)
    state = init_state(key_init, cfg)

    def body(state, inputs):
        thetas, index = inputs
        state, metrics = update(state._replace(thetas=thetas), jax.random.fold_in(key_run, index),
                                cfg)
        return state, (metrics.grad, metrics.ess)

    return lax.scan(body, state, (trajectory, jnp.arange(trajectory.shape[0])))[1]


_forced_draws = jax.jit(jax.vmap(_forced_draw, (0, None, None)), static_argnames="cfg")


class GradientError(NamedTuple):
    """The LOLA gradient estimate at fixed points along the exact run (`gradient_error`).

    at [P]                 update index of each point on the exact run
    estimates [P, D, 2, 5] the draws (both players)
    exact [P, 2, 5]        the exact LOLA gradient of the infinite game (the study's oracle)
    exact_horizon [P, 2, 5] ... of the first T steps (what T-step episodes estimate)
    ess [P]                mean replay ESS at each point (NaN on-policy)
    """

    at: np.ndarray
    estimates: np.ndarray
    exact: np.ndarray
    exact_horizon: np.ndarray
    ess: np.ndarray


def gradient_error(cfg: LolaConfig, at=(0, 25, 100), draws: int = 32, seed: int = 0) -> GradientError:
    """`draws` independent estimates of both players' LOLA gradients at the exact run's
    parameters before the updates `at` (0: the initial policies), with the exact oracles.

    Each draw replays updates 0..max(at) with the logits forced to the exact run's
    (`_forced_draw`), so the replay's staleness and the learned value baseline are those of a
    run moving at exact LOLA's pace; the draws are vmapped in one program.
    """
    cfg.validate()
    at = np.asarray(sorted(set(int(a) for a in at)))
    require(len(at) >= 1 and at[0] >= 0, f"points must be update indices >= 0, got {at.tolist()}")
    require(draws >= 3, f"draws must be >= 3 (bias² needs 3), got {draws}")
    trajectory = exact_trajectory(cfg, int(at[-1]) + 1)
    keys = jax.random.split(jax.random.key(seed), draws)
    with jax.enable_x64(cfg.has_exact_part):
        grads, ess = _forced_draws(keys, trajectory, cfg)
    points = trajectory[at]
    with jax.enable_x64(True):
        exact = np.stack([np.asarray(exact_lola_gradients(t, cfg), np.float64) for t in points])
        finite = np.stack([np.asarray(exact_lola_gradients(t, cfg, cfg.horizon), np.float64)
                           for t in points])
    grads = np.asarray(grads, np.float64)[:, at].transpose(1, 0, 2, 3)
    return GradientError(at, grads, exact, finite, _nanmean_np(np.asarray(ess)[:, at]))


def _nanmean_np(x: np.ndarray) -> np.ndarray:
    """Mean over draws and players, NaN (no warning) where all are NaN. [D, P, 2] -> [P]."""
    x = np.asarray(x, np.float64).transpose(1, 0, 2).reshape(x.shape[1], -1)
    count = np.sum(~np.isnan(x), -1)
    return np.where(count > 0, np.nansum(x, -1) / np.maximum(count, 1), np.nan)


def error_summary(error: GradientError) -> dict[str, list[float]]:
    """Per point (players pooled: 10 coordinates): bias² per coordinate (unbiased, `stats.bias2`)
    and its jackknife se against the infinite-game oracle and against the T-step oracle, the
    variance per coordinate (`stats.variance`), the exact gradient's mean square per coordinate
    (its scale) and the replay ESS. {name: [P]}."""
    est = error.estimates.reshape(*error.estimates.shape[:2], -1)  # [P, D, 10]
    out: dict[str, list[float]] = {"at": error.at.tolist()}
    for name, truth in (("", error.exact), ("_horizon", error.exact_horizon)):
        b = stats.bias2(est, truth.reshape(truth.shape[0], -1))
        out[f"bias2{name}"] = b.value.tolist()
        out[f"bias2{name}_se"] = b.se.tolist()
    out["variance"] = stats.variance(est).tolist()
    out["exact_sq"] = np.mean(error.exact.reshape(error.exact.shape[0], -1) ** 2, -1).tolist()
    out["replay_ess"] = error.ess.tolist()
    return out
