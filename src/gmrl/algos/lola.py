"""LOLA-DiCE on the iterated prisoner's dilemma, with exact LOLA meta-gradients beside it.

Foerster et al. 2018 (LOLA; DiCE §5) as studied by Liu et al. 2022 (§6, "A Theoretical
Understanding of Gradient Bias in Meta-Reinforcement Learning"). Agent i's meta-parameter is its own
policy θ^i; its inner loop is the opponent's K anticipated gradient-ascent steps on the opponent's
return, θ^j_{k+1} = θ^j_k + α ∇_j J_j(θ^i, θ^j_k); its outer objective is J_i(θ^i, θ^j_K), and the
meta-gradient d/dθ^i J_i(θ^i, θ^j_K(θ^i)) moves θ^i by Adam.

Each inner step is composed as in the decomposed estimate (docs/design.md, "The decomposed
estimate"; Liu, Feng et al. 2022, §4) with `metagrad.straight_through`: the compositional
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
from gmrl.envs import ipd
from gmrl.errors import require
from gmrl.metagrad import straight_through

Array = jax.Array
REPLAY_MODES = ("update", "persistent")


@dataclasses.dataclass(frozen=True)
class LolaConfig:
    """One LOLA-DiCE variant. A batch size of None means `exact` (closed-form value).

    comp, hessian: sources of the lookahead step's value and Jacobian (episodes or None).
    outer: source of the agent's own objective at the opponent's lookahead parameters.
    comp_off_policy / hessian_off_policy: that part uses the importance-weighted replay of
    `replay_size` episodes; each inner step first adds a fresh batch (that part's batch size).
    replay_mode: "update" refills the replay from the current policies at the start of every
    update; "persistent" fills it once and carries it across updates (stale, genuinely off-policy).
    value_target: "return" fits V(s_t) to the discounted return-to-go, "reward" to r_t.
    """

    comp: int | None = 128
    hessian: int | None = 128
    outer: int | None = 128
    comp_off_policy: bool = False
    hessian_off_policy: bool = False
    replay_size: int = 1024
    replay_mode: str = "update"
    lookaheads: int = 1
    inner_lr: float = 0.3
    outer_lr: float = 0.1
    value_lr: float = 0.1
    value_target: str = "return"
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
        require(self.replay_mode in REPLAY_MODES,
                f"replay mode must be one of {', '.join(REPLAY_MODES)}, got {self.replay_mode!r}")
        require(self.value_target in ("return", "reward"),
                f"value target must be 'return' or 'reward', got {self.value_target!r}")
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
    def fresh_size(self) -> int:
        """Episodes added to the replay per inner step."""
        return self.comp if self.comp_off_policy else self.hessian

    @property
    def shared_inner(self) -> bool:
        """Whether the value and Jacobian of a step come from one and the same estimate."""
        return self.comp == self.hessian and self.comp_off_policy == self.hessian_off_policy


def _ordered(player: int, own: Any, other: Any) -> tuple[Any, Any]:
    """(player 1's, player 2's) from `player`'s own and its opponent's."""
    return (own, other) if player == 0 else (other, own)


# ----------------------------------------------------------------------------------------------
# Objectives: exact (float64) and sampled (DiCE + value baseline)


def exact_return(theta1: Array, theta2: Array, player: int, gamma: float) -> Array:
    """Exact discounted value of `player` at (θ1, θ2), computed in float64. Returns [] (input dtype)."""
    dtype = theta1.dtype
    with jax.enable_x64(True):
        value = ipd.exact_values(theta1.astype(jnp.float64), theta2.astype(jnp.float64), gamma)
        return value[player].astype(dtype)


def dice_return(theta1: Array, theta2: Array, values: Array, episodes: ipd.Episodes, player: int,
                gamma: float, off_policy: bool) -> Array:
    """Mean over episodes of DiCE(joint) + Σ_t γ^t (1 − ρ_t) V(s_t) for `player`'s rewards.

    ρ_t is the joint ratio of both players' current over behaviour probabilities (behaviour =
    stop_gradient(current) on-policy, the recorded log-probs off-policy); `values` [5] is the
    player's value table, held constant. Returns [].
    """
    log_prob = ipd.joint_log_probs(theta1, theta2, episodes)
    behaviour = episodes.log_probs.sum(-1) if off_policy else None
    rewards = episodes.rewards[..., player]
    discounts = jnp.full(rewards.shape[-1], gamma, rewards.dtype)
    baseline = lax.stop_gradient(values)[ipd.own_states(episodes.states, player)]
    dice = jax.vmap(estimators.dice, (0, 0 if off_policy else None, 0, None))(
        log_prob, behaviour, rewards, discounts)
    baseline_term = -jax.vmap(estimators.lvc, (0, 0 if off_policy else None, 0, None))(
        log_prob, behaviour, baseline, discounts)
    return jnp.mean(dice + baseline_term)


def value_loss(values: Array, episodes: ipd.Episodes, player: int, gamma: float,
               target: str) -> Array:
    """Mean squared error of the tabular value V [5] against returns-to-go (or rewards). []."""
    rewards = episodes.rewards[..., player]
    if target == "return":
        discounts = jnp.full(rewards.shape[-1], gamma, rewards.dtype)
        rewards = jax.vmap(estimators.discounted_returns, (0, None, None))(rewards, discounts, 0.0)
    predicted = values[ipd.own_states(episodes.states, player)]
    return jnp.mean((rewards - predicted) ** 2)


# ----------------------------------------------------------------------------------------------
# Replay buffer (off-policy correction)


class Replay(NamedTuple):
    """A ring buffer of episodes with recorded behaviour log-probs; `next` is the oldest slot."""

    episodes: ipd.Episodes
    next: Array


def replay_add(replay: Replay, fresh: ipd.Episodes) -> Replay:
    """Overwrite the oldest len(fresh) episodes with `fresh`."""
    episodes = jax.tree.map(
        lambda buf, new: lax.dynamic_update_slice_in_dim(buf, new, replay.next, 0),
        replay.episodes, fresh)
    size = replay.episodes.states.shape[0]
    return Replay(episodes, (replay.next + fresh.states.shape[0]) % size)


def replay_fill(key: Array, theta1: Array, theta2: Array, cfg: LolaConfig) -> Replay:
    """A full replay sampled at (θ1, θ2)."""
    episodes = ipd.sample(key, theta1, theta2, cfg.replay_size, cfg.horizon)
    return Replay(episodes, jnp.zeros((), jnp.int32))


# ----------------------------------------------------------------------------------------------
# The lookahead (inner loop) and the meta-objective


def _opponent_gradient(source: int | None, off_policy: bool, player: int, theta_own: Array,
                       theta_opp: Array, values_opp: Array, key: Array, replay: Replay | None,
                       cfg: LolaConfig) -> tuple[Array, Replay | None]:
    """∇_opp J_opp(θ_own, θ_opp) from `source`, differentiable in θ_own. Returns ([5], replay)."""
    opponent = 1 - player
    if source is None:
        def objective(theta):
            return exact_return(*_ordered(player, theta_own, theta), opponent, cfg.gamma)
        return jax.grad(objective)(theta_opp), replay
    fresh = ipd.sample(key, *_ordered(player, theta_own, theta_opp), source, cfg.horizon)
    if off_policy:
        replay = replay_add(replay, fresh)
        fresh = replay.episodes

    def surrogate(theta):
        return dice_return(*_ordered(player, theta_own, theta), values_opp, fresh, opponent,
                           cfg.gamma, off_policy)

    return jax.grad(surrogate)(theta_opp), replay


def lookahead(player: int, theta_own: Array, theta_opp: Array, values_opp: Array, key: Array,
              replay: Replay | None, cfg: LolaConfig) -> tuple[Array, Replay | None]:
    """The opponent's K anticipated steps θ_{k+1} = θ_k + α ĝ_k, composed as in docs/design.md
    (the straight-through step).

    Value of each step from the compositional source, Jacobian (in θ_own) from the Hessian source.
    Returns (θ_opp after K steps [5], replay after the fresh batches were added).
    """
    for step_key in jax.random.split(key, cfg.lookaheads):
        key_comp, key_hess = jax.random.split(step_key)
        comp_grad, replay = _opponent_gradient(cfg.comp, cfg.comp_off_policy, player, theta_own,
                                               theta_opp, values_opp, key_comp, replay, cfg)
        if cfg.shared_inner:
            theta_opp = theta_opp + cfg.inner_lr * comp_grad
            continue
        hess_grad, replay = _opponent_gradient(cfg.hessian, cfg.hessian_off_policy, player,
                                               theta_own, theta_opp, values_opp, key_hess,
                                               replay, cfg)
        theta_opp = straight_through(theta_opp + cfg.inner_lr * comp_grad,
                                     theta_opp + cfg.inner_lr * hess_grad)
    return theta_opp, replay


def meta_objective(theta_own: Array, player: int, theta_opp: Array, values: Array, key: Array,
                   replay: Replay | None, cfg: LolaConfig):
    """Agent `player`'s outer objective at the opponent's lookahead parameters.

    values [2, 5] are both players' value tables. Returns (objective [], (outer episodes or None,
    replay)); its gradient in θ_own is the LOLA meta-gradient estimate.
    """
    key_inner, key_outer = jax.random.split(key)
    theta_look, replay = lookahead(player, theta_own, theta_opp, values[1 - player], key_inner,
                                   replay, cfg)
    thetas = _ordered(player, theta_own, theta_look)
    if cfg.outer is None:
        return exact_return(*thetas, player, cfg.gamma), (None, replay)
    episodes = ipd.sample(key_outer, *thetas, cfg.outer, cfg.horizon)
    objective = dice_return(*thetas, values[player], episodes, player, cfg.gamma, False)
    return objective, (episodes, replay)


def exact_lola_gradients(thetas: Array, cfg: LolaConfig) -> Array:
    """Both players' exact LOLA meta-gradients at thetas [2, 5], in float64. Returns [2, 5]."""
    exact = dataclasses.replace(cfg, comp=None, hessian=None, outer=None, comp_off_policy=False,
                                hessian_off_policy=False)
    dummy_values = jnp.zeros_like(thetas)
    with jax.enable_x64(True):
        thetas64 = thetas.astype(jnp.float64)
        grads = [jax.grad(lambda t, p=p: meta_objective(
            t, p, thetas64[1 - p], dummy_values, jax.random.key(0), None, exact)[0])(thetas64[p])
            for p in (0, 1)]
        return jnp.stack(grads).astype(thetas.dtype)


# ----------------------------------------------------------------------------------------------
# Training


class TrainState(NamedTuple):
    """Per-seed state: thetas [2, 5], values [2, 5], their Adam states and the replay."""

    thetas: Array
    values: Array
    theta_opt: Any
    value_opt: Any
    replay: Replay | None


class UpdateMetrics(NamedTuple):
    """Per update, at the parameters before the update (player axis first where present).

    score [2]            expected average per-step reward of each player over a T-step episode
    cooperation [2, 5]   σ(θ^i), cooperation probability per own state (start, CC, CD, DC, DD)
    grad [2, 5]          the estimated meta-gradient of each player
    exact_grad [2, 5]    the exact LOLA meta-gradient of each player (float64 oracle)
    """

    score: Array
    cooperation: Array
    grad: Array
    exact_grad: Array


def _optimizers(cfg: LolaConfig):
    return optax.adam(cfg.outer_lr), optax.adam(cfg.value_lr)


def init_state(key: Array, cfg: LolaConfig) -> TrainState:
    """Zero logits (cooperation 0.5) and zero values, as in the reference experiments."""
    theta_opt, value_opt = _optimizers(cfg)
    thetas = jnp.zeros((2, ipd.NUM_STATES), jnp.float32)
    values = jnp.zeros((2, ipd.NUM_STATES), jnp.float32)
    replay = replay_fill(key, thetas[0], thetas[1], cfg) if cfg.off_policy else None
    return TrainState(thetas, values, theta_opt.init(thetas), value_opt.init(values), replay)


def update(state: TrainState, key: Array, cfg: LolaConfig) -> tuple[TrainState, UpdateMetrics]:
    """One simultaneous LOLA update of both players (Adam ascent on each meta-gradient)."""
    theta_opt, value_opt = _optimizers(cfg)
    key_fill, key_1, key_2 = jax.random.split(key, 3)
    thetas, values, replay = state.thetas, state.values, state.replay
    if cfg.off_policy and cfg.replay_mode == "update":
        replay = replay_fill(key_fill, thetas[0], thetas[1], cfg)
    grads, batches = [], []
    for player, player_key in ((0, key_1), (1, key_2)):
        grad, (episodes, replay) = jax.grad(meta_objective, has_aux=True)(
            thetas[player], player, thetas[1 - player], values, player_key, replay, cfg)
        grads.append(grad)
        batches.append(episodes)
    grads = jnp.stack(grads)
    metrics = UpdateMetrics(
        score=exact_average_rewards(thetas, cfg.horizon),
        cooperation=jax.nn.sigmoid(thetas),
        grad=grads,
        exact_grad=exact_lola_gradients(thetas, cfg),
    )
    updates, theta_state = theta_opt.update(-grads, state.theta_opt, thetas)
    thetas = optax.apply_updates(thetas, updates)
    value_state = state.value_opt
    if cfg.outer is not None:
        value_grads = jnp.stack([jax.grad(value_loss)(values[p], batches[p], p, cfg.gamma,
                                                      cfg.value_target) for p in (0, 1)])
        updates, value_state = value_opt.update(value_grads, value_state, values)
        values = optax.apply_updates(values, updates)
    return TrainState(thetas, values, theta_state, value_state, replay), metrics


def exact_average_rewards(thetas: Array, horizon: int) -> Array:
    """Expected per-step reward of both players over a `horizon`-step episode (float64). [2]."""
    with jax.enable_x64(True):
        t = thetas.astype(jnp.float64)
        return ipd.average_rewards(t[0], t[1], horizon).astype(thetas.dtype)


def seed_keys(seed: int, num_seeds: int) -> Array:
    """One key per seed index; seed s's key does not depend on how many seeds run. [S] keys."""
    base = jax.random.key(seed)
    return jax.vmap(lambda s: jax.random.fold_in(base, s))(jnp.arange(num_seeds))


def init_states(keys: Array, cfg: LolaConfig) -> TrainState:
    """Vmapped `init_state` over seed keys [S]."""
    return jax.vmap(lambda k: init_state(jax.random.split(k)[0], cfg))(keys)


def _chunk(states: TrainState, keys: Array, first_update: Array, cfg: LolaConfig,
           length: int) -> tuple[TrainState, UpdateMetrics]:
    def one_seed(state, key):
        def body(carry, index):
            return update(carry, jax.random.fold_in(jax.random.split(key)[1], index), cfg)
        return lax.scan(body, state, first_update + jnp.arange(length))
    return jax.vmap(one_seed)(states, keys)


_train_chunk = jax.jit(_chunk, static_argnames=("cfg", "length"))


def train_chunk(states: TrainState, keys: Array, first_update: Array, cfg: LolaConfig,
                length: int) -> tuple[TrainState, UpdateMetrics]:
    """`length` updates from update index `first_update`, vmapped over seeds.

    states and keys have a leading seed axis [S]; returns (states, metrics [S, length, ...]). One
    compiled program per (variant, length, number of seeds). Traced with float64 enabled so that
    the exact oracle (and its derivatives inside the meta-gradient) runs in float64; the sampled
    estimators stay float32 (explicit dtypes).
    """
    with jax.enable_x64(True):
        return _train_chunk(states, keys, first_update, cfg, length)


@functools.lru_cache(maxsize=4)
def _compiled_chunk(cfg: LolaConfig, chunk: int, num_seeds: int, sharding: Any):
    """The ahead-of-time compiled `_train_chunk` for (cfg, chunk, number of seeds, placement of
    the seeds); the few most recent programs are kept, so repeating a run in one process does
    not compile again (the same `functools.lru_cache` idiom as `gmrl.algos.a2c`)."""
    keys = seed_keys(0, num_seeds)
    states = init_states(keys, cfg)
    if sharding is not None:
        keys, states = jax.device_put((keys, states), sharding)
    first = jnp.zeros((), jnp.int32)
    return _train_chunk.lower(states, keys, first, cfg, chunk).compile()


class TrainResult(NamedTuple):
    """Metrics as numpy arrays [S, U, ...] and wall-clock seconds (compile separate)."""

    metrics: UpdateMetrics
    compile_seconds: float
    run_seconds: float


def train(cfg: LolaConfig, seed: int = 0, num_seeds: int = 10, num_updates: int = 500,
          chunk: int = 50, progress=None) -> TrainResult:
    """Run `num_updates` LOLA updates for `num_seeds` seeds (vectorised); see `UpdateMetrics`.

    The updates run in blocks of `chunk` through one ahead-of-time compiled program (a last
    partial block is computed in full and cut). `progress(done_updates, metrics_so_far)` is called
    after each block, e.g. to write logs that survive an interrupt.
    """
    cfg.validate()
    require(num_seeds >= 1, f"number of seeds must be >= 1, got {num_seeds}")
    require(num_updates >= 1, f"number of updates must be >= 1, got {num_updates}")
    require(chunk >= 1, f"chunk must be >= 1, got {chunk}")
    chunk = min(chunk, num_updates)
    keys = seed_keys(seed, num_seeds)
    started = time.perf_counter()
    with jax.enable_x64(True):
        states = init_states(keys, cfg)
        devices = jax.devices()
        seeds_axis = None
        if len(devices) > 1 and num_seeds % len(devices) == 0:
            # e.g. JAX_NUM_CPU_DEVICES=2: seeds split across devices (cores), one program
            seeds_axis = NamedSharding(Mesh(np.array(devices), ("seeds",)), PartitionSpec("seeds"))
            keys, states = jax.device_put((keys, states), seeds_axis)
        compiled = _compiled_chunk(cfg, chunk, num_seeds, seeds_axis)
    compile_seconds = time.perf_counter() - started
    started = time.perf_counter()
    parts: list[UpdateMetrics] = []
    done = 0
    while done < num_updates:
        states, metrics = compiled(states, keys, jnp.asarray(done, jnp.int32))
        parts.append(jax.tree.map(np.asarray, metrics))
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
