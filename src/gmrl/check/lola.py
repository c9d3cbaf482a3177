"""`gmrl.check_lola`: a user's LOLA gradient on the iterated prisoner's dilemma under the exact oracle.

Protocol (`docs/check.md`, "LOLA"): `fn(game, rng)` returns one estimate of both players' LOLA
gradients, an array [2, 5] (or a pair of [5] arrays): row i is

    g_i = d/dθ_i J_i(θ_i, θ_j + α ∇_j J_j(θ_i, θ_j)),      j = 1 − i,                         (1)

the gradient of player i's return after the opponent's anticipated look-ahead step of size α
(Foerster et al. 2018, LOLA; the DiCE form of §5 of the DiCE paper), with J_i the discounted T-step
return (episodes carry no bootstrap value). `game` carries `theta1`, `theta2` [5] (memory-one
logits: σ(θ[s]) is the probability of cooperating in own state s = start, CC, CD, DC, DD — own
action first), `gamma`, `lr` (α), `horizon` (T) and `game.sample(theta1, theta2, n, rng)`, which
returns `GameEpisodes(states [n, T, 2], actions [n, T, 2], rewards [n, T, 2])`: per step and
player its own state (0 at t = 0, then 1 + 2·own + other of the previous actions), its action (0
cooperate, 1 defect) and its reward (payoffs CC −1, CD −3, DC 0, DD −2 of `gmrl.envs.ipd`).

The truth is the exact float64 gradient (1) of the T-step objective (`ipd.finite_horizon_values`).
The explanations, whose expectations gmrl computes on the same parameters with the user's
recorded look-ahead batch sizes n_i (the tower rule as in `candidates`: player i's outer batch is
replaced by its conditional expectation, which changes no expectation), with ĝ_j(θ_i; τ) the DiCE
estimate of ∇_j J_j from a batch τ of n_i joint episodes at (θ1, θ2) (both players' log-probs in
the magic box, so that its derivative in θ_i estimates the mixed Hessian without bias) and
θ̂_j = θ_j + α ĝ_j:

  second-order-unbiased  E_τ[d/dθ_i J_i(θ_i, θ̂_j(θ_i; τ))]: DiCE LOLA, consistent with exact LOLA
                         up to the compositional bias its batch size implies (Liu, Feng et al.
                         2022, §3); ĝ_j plain DiCE, or DiCE with the baseline term
                         Σ_t γ^t (1 − ρ_t) V_j(s_t) (V_j the exact value, no gradient)
  first-order            E_τ[∂_1 J_i(θ_i, sg(θ̂_j))]: the look-ahead step is taken but not
                         differentiated through (`detach()` / `create_graph=False`), the shaping
                         term α (∇_i ∇_j J_j)ᵀ ∇_j J_i missing; both advantages again
  naive                  ∂_1 J_i(θ_i, θ_j): no look-ahead at all (the naive learner)

and `scaled` (c times one of them) and `unexplained`, tested by `gmrl.check.diagnosis.diagnose`
(Holm's rule), pooled over parameter points as the tabular check pools over MDPs.

Sampling structure: calls of `game.sample` at the game's own (θ1, θ2) are the look-ahead batches
(one call: one batch shared by both players; two: player 1's look-ahead — the batch of player 2's
anticipated gradient — first, then player 2's); calls elsewhere are outer batches, whose sizes do
not enter any expectation.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from gmrl import stats
from gmrl.algos import lola as lola_algo
from gmrl.check import run as check_run
from gmrl.check.diagnosis import diagnose
from gmrl.check.run import CheckResult
from gmrl.check.task import Recorder, SampleError, _as_numpy, _check_size
from gmrl.envs import ipd
from gmrl.errors import require
from gmrl.problems import lola as lola_problem

SHAPE = (2, ipd.NUM_STATES)
EXPECTED = "[2, 5] (both players' gradients)"
PAYOFF = np.asarray(ipd.PAYOFF)
SIGNATURE = "game.sample(theta1, theta2, n, rng)"


class GameEpisodes(NamedTuple):
    """n joint episodes of T steps: per step and player (last axis: player 1, player 2) its own
    state [n, T, 2] (0 start, 1..4 = CC, CD, DC, DD of the previous step, own action first), its
    action [n, T, 2] (0 cooperate, 1 defect) and its reward [n, T, 2]."""

    states: Any
    actions: Any
    rewards: Any


def _check_theta(value: Any, which: str, jax_path: bool) -> Any:
    if jax_path:
        theta = jnp.asarray(value)
    else:
        try:
            theta = _as_numpy(value)
        except SampleError:
            raise SampleError(f"{SIGNATURE}: {which} must be a [5] array of numbers, got "
                              f"{type(value).__name__}") from None
    if tuple(theta.shape) != (ipd.NUM_STATES,):
        raise SampleError(f"{SIGNATURE}: {which} must have shape (5,) (one logit per own state), "
                          f"got {tuple(theta.shape)}")
    if not jax_path and not np.all(np.isfinite(theta)):
        raise SampleError(f"{SIGNATURE}: {which} contains NaN or infinity")
    return theta


def _size(n: Any) -> int:
    try:
        return _check_size(n)
    except SampleError as err:
        raise SampleError(str(err).replace("task.sample(theta, n, rng)", SIGNATURE)) from None


def sample_numpy(rng: np.random.Generator, theta1: np.ndarray, theta2: np.ndarray, n: int,
                 horizon: int) -> GameEpisodes:
    """n joint episodes of the memory-one policies σ(θ1), σ(θ2): a loop over the T steps."""
    coop = [1 / (1 + np.exp(-theta1)), 1 / (1 + np.exp(-theta2))]
    states = np.empty((n, horizon, 2), np.int64)
    actions = np.empty((n, horizon, 2), np.int64)
    rewards = np.empty((n, horizon, 2))
    own = np.zeros((n, 2), np.int64)
    for t in range(horizon):
        states[:, t] = own
        u = rng.random((n, 2))
        a = np.stack([(u[:, p] >= coop[p][own[:, p]]) for p in (0, 1)], -1).astype(np.int64)
        actions[:, t] = a
        outcome = np.stack([2 * a[:, 0] + a[:, 1], 2 * a[:, 1] + a[:, 0]], -1)
        rewards[:, t] = PAYOFF[outcome]
        own = outcome + 1
    return GameEpisodes(states, actions, rewards)


def _record(recorder: Recorder, n: int, theta1, theta2, jax_path: bool) -> None:
    index = len(recorder.sizes)
    recorder.sizes.append(n)
    if not jax_path:
        recorder.thetas.append(np.concatenate([theta1, theta2]))
        return
    recorder.thetas.append(None)
    if recorder.probe:
        def store(value, i=index):
            recorder.thetas[i] = np.asarray(value, np.float64)
        jax.debug.callback(store, lax.stop_gradient(jnp.concatenate([theta1, theta2])))


@dataclasses.dataclass(frozen=True)
class Game:
    """The iterated prisoner's dilemma at one parameter point, for the Python path (NumPy).

    theta1, theta2 [5]: both players' memory-one logits; gamma; lr: the look-ahead step size α;
    horizon: T; `sample(theta1, theta2, n, rng)` (see `GameEpisodes`).
    """

    theta1: np.ndarray
    theta2: np.ndarray
    gamma: float
    lr: float
    horizon: int
    recorder: Recorder = dataclasses.field(default_factory=Recorder, repr=False, compare=False)

    @property
    def thetas(self) -> np.ndarray:
        """[2, 5]: θ1 and θ2."""
        return np.stack([self.theta1, self.theta2])

    def sample(self, theta1, theta2, n, rng) -> GameEpisodes:
        """n joint episodes at (θ1, θ2): states, actions, rewards [n, T, 2] (player last)."""
        n = _size(n)
        theta1 = _check_theta(theta1, "theta1", False)
        theta2 = _check_theta(theta2, "theta2", False)
        if not isinstance(rng, np.random.Generator):
            raise SampleError(f"{SIGNATURE}: rng must be the numpy.random.Generator gmrl passed to "
                              f"your function, got {type(rng).__name__}")
        _record(self.recorder, n, theta1, theta2, False)
        return sample_numpy(rng, theta1, theta2, n, self.horizon)


class JaxGame(NamedTuple):
    """The JAX path's game: fields as in `Game` (JAX arrays); `sample` is traceable (rng a key)."""

    theta1: jax.Array
    theta2: jax.Array
    gamma: jax.Array
    lr: float
    horizon: int
    recorder: Recorder

    @property
    def thetas(self) -> jax.Array:
        return jnp.stack([self.theta1, self.theta2])

    def sample(self, theta1, theta2, n, rng) -> GameEpisodes:
        """n joint episodes at (θ1, θ2) (no gradient through sampling)."""
        n = _size(n)
        theta1 = _check_theta(theta1, "theta1", True)
        theta2 = _check_theta(theta2, "theta2", True)
        if not (isinstance(rng, jax.Array) and (jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
                                                or rng.shape == (2,))):
            raise SampleError(f"{SIGNATURE}: rng must be a JAX PRNG key (split the one gmrl "
                              f"passed), got {type(rng).__name__}")
        _record(self.recorder, n, theta1, theta2, True)
        return _jax_episodes(ipd.sample(rng, theta1, theta2, n, self.horizon))


def _jax_episodes(episodes: ipd.Episodes) -> GameEpisodes:
    """The time-major sampler's episodes as [n, T, 2] arrays, player last."""
    def both(x0, x1):
        return jnp.stack([x0, x1], -1).swapaxes(0, 1)

    return GameEpisodes(both(episodes.states, ipd.own_states(episodes.states, 1)),
                        both(episodes.actions(0), episodes.actions(1)),
                        both(episodes.rewards(0), episodes.rewards(1)))


# ----------------------------------------------------------------------------------------------
# The exact gradient and the explanations' expectations (float64)


def _ordered(player: int, own, other):
    return (own, other) if player == 0 else (other, own)


def _values(theta1, theta2, gamma, horizon):
    return ipd.finite_horizon_values(theta1, theta2, gamma, horizon)


def exact_lola(thetas: jax.Array, gamma, lr: float, horizon: int) -> jax.Array:
    """Both players' exact LOLA gradients (1) of the T-step returns at thetas [2, 5]. [2, 5]
    (`gmrl.problems.lola.exact_gradients` with one look-ahead step)."""
    return lola_problem.exact_gradients(thetas, lr, 1, gamma, horizon)


@functools.lru_cache(maxsize=4)
def _exact_program(gamma: float, lr: float, horizon: int):
    """jit(vmap(exact_lola)) over points [M, 2, 5] (compiled once per setting)."""
    return jax.jit(jax.vmap(lambda th: exact_lola(th, jnp.asarray(gamma, th.dtype), lr, horizon)))


def naive_gradients(thetas: jax.Array, gamma, horizon: int) -> jax.Array:
    """∂_i J_i(θ1, θ2) for both players (the naive learner). [2, 5]."""
    return jnp.stack([jax.grad(lambda t, i=i: _values(*_ordered(i, t, thetas[1 - i]), gamma,
                                                       horizon)[i])(thetas[i]) for i in (0, 1)])


def _state_values(thetas: jax.Array, gamma, player: int) -> jax.Array:
    """Exact discounted value of `player` from each of its own states (infinite game), [5]:
    the baseline V_j(s) of the DiCE baseline term (held constant)."""
    d0, transition, rewards = ipd.outcome_chain(thetas[0], thetas[1])
    v = jnp.linalg.solve(jnp.eye(4, dtype=d0.dtype) - gamma * transition, rewards[:, player])
    side1 = jnp.concatenate([(d0 @ v)[None], transition @ v])  # by player 1's state index
    return lax.stop_gradient(side1 if player == 0 else side1[jnp.asarray(ipd.SWAP)])


@dataclasses.dataclass(frozen=True)
class LolaVariant:
    """One representative of an explanation: `kind` second-order | first-order | naive; `baseline`:
    the look-ahead DiCE estimate carries the exact-value baseline term."""

    label: str
    kind: str
    baseline: bool = False

    @property
    def name(self) -> str:
        if self.kind == "naive":
            return "naive[no look-ahead]"
        return f"{self.label}[dice, {'V-baseline' if self.baseline else 'no baseline'}]"


VARIANTS = (LolaVariant("second-order-unbiased", "second-order"),
            LolaVariant("second-order-unbiased", "second-order", True),
            LolaVariant("first-order", "first-order"),
            LolaVariant("first-order", "first-order", True),
            LolaVariant("naive", "naive"))


def _swap(thetas: jax.Array, player: int) -> jax.Array:
    """The point seen from `player`'s side: the game is symmetric and states are own-side, so
    player 2's gradients at (θ1, θ2) are player 1's at (θ2, θ1) (`test_check_lola`)."""
    return thetas if player == 0 else thetas[::-1]


def _player_one(key, thetas: jax.Array, gamma, lr: float, horizon: int, size: int,
                flags: jax.Array) -> jax.Array:
    """Player 1's sampled gradient for each row (baseline, first_order) of `flags` [V', 2] from
    one batch of `size` episodes (common random numbers), the outer objective exact. [V', 5]."""
    batch = ipd.sample(key, thetas[0], thetas[1], size, horizon)

    def one(flag):
        values = jnp.where(flag[0], _state_values(thetas, gamma, 1), 0.0)

        def objective(theta1):
            step = jax.grad(lambda t: lola_algo.dice_return(theta1, t, values, batch, 1, gamma))(thetas[1])
            step = jnp.where(flag[1], lax.stop_gradient(step), step)
            return _values(theta1, thetas[1] + lr * step, gamma, horizon)[0]

        return jax.grad(objective)(thetas[0])

    return jax.vmap(one)(flags)


def sampled_lola(key, thetas: jax.Array, gamma, lr: float, horizon: int, sizes: tuple[int, int],
                 variants=VARIANTS) -> jax.Array:
    """One draw of each variant's player gradients with the outer objective exact. [V, 2, 5].

    Each player's look-ahead batch is drawn on its own: whether the user shares one batch between
    the players changes neither player's expectation nor the per-coordinate Monte-Carlo variance
    (the only quantities the tests use), so shared and separate batches of equal size give one
    computation. Every variant uses the same batches (common random numbers)."""
    sampled = [v for v in variants if v.kind != "naive"]
    flags = jnp.asarray([[v.baseline, v.kind == "first-order"] for v in sampled])
    keys = jax.random.split(key, 2)
    players = [_player_one(keys[i], _swap(thetas, i), gamma, lr, horizon, sizes[i], flags)
               for i in (0, 1)]
    by_variant = dict(zip(sampled, jnp.stack(players, 1), strict=True))  # each [2, 5]
    naive = naive_gradients(thetas, gamma, horizon)
    return jnp.stack([naive if v.kind == "naive" else by_variant[v] for v in variants])


def expectations(points: jax.Array, gamma: float, lr: float, horizon: int, sizes: tuple[int, int],
                 repeats: int, seed: int, chunk: int = 250,
                 variants=VARIANTS) -> tuple[np.ndarray, np.ndarray]:
    """Monte-Carlo mean [M, V, 10] of each variant per point (points [M, 2, 5]) and the variance
    of that mean [M, V, 10], from `repeats` draws per point (vmapped, jitted, float64)."""
    with jax.enable_x64(True):
        f = jax.jit(jax.vmap(jax.vmap(
            lambda k, th: sampled_lola(k, th, jnp.asarray(gamma, jnp.float64), lr, horizon, sizes,
                                       variants), in_axes=(0, None)), in_axes=(0, 0)))
        count = points.shape[0]
        total = np.zeros((count, len(variants), 10))
        total_sq = np.zeros_like(total)
        base = jax.random.key(seed)
        done = 0
        while done < repeats:
            size = min(chunk, repeats - done)
            keys = jax.vmap(lambda m, d=done, n=size: jax.vmap(lambda r: jax.random.fold_in(
                jax.random.fold_in(base, m), r))(d + jnp.arange(n)))(jnp.arange(count))
            draws = np.asarray(f(keys, points)).reshape(count, size, len(variants), -1)
            total += draws.sum(1)
            total_sq += (draws**2).sum(1)
            done += size
        mean = total / repeats
        var = np.maximum(total_sq / repeats - mean**2, 0.0) * repeats / (repeats - 1)
    return mean, var / repeats


def structure_from_calls(recorder: Recorder, point: np.ndarray) -> tuple[tuple[int, int], bool, list[str]]:
    """Look-ahead batch sizes (player 1's, player 2's) and whether they are one shared batch,
    from the calls of one estimate made at the game's own point [10] (see the module docstring)."""
    at_point = [n for n, theta in zip(recorder.sizes, recorder.thetas, strict=True)
                if theta is not None and np.allclose(theta, point, rtol=1e-6, atol=1e-9)]
    notes: list[str] = []
    if not at_point:
        first = recorder.sizes[0]
        notes.append(f"no sample call was made at the game's own (θ1, θ2); the candidates assume "
                     f"one shared look-ahead batch of the first call's size {first}")
        return (first, first), True, notes
    if len(at_point) == 1:
        return (at_point[0], at_point[0]), True, notes
    if len(at_point) == 2:
        return (at_point[0], at_point[1]), False, notes
    notes.append(f"{len(at_point)} sample calls at the game's own (θ1, θ2) ({at_point}); the "
                 f"candidates treat them as one shared look-ahead batch of {sum(at_point)} episodes")
    return (sum(at_point),) * 2, True, notes


# ----------------------------------------------------------------------------------------------
# check_lola


class LolaCheckResult(CheckResult):
    """`CheckResult` of `check_lola`: exact [M, 2, 5], estimates [M, R, 2, 5], candidates
    name -> [M, 2, 5] over M parameter points; `calls`: the first estimate's sample-call sizes
    grouped by the (θ1, θ2) they were drawn at; config["thetas"] the points [M, 2, 5]."""

    unit = "point"


def _points(thetas: Any, points: int, seed: int) -> np.ndarray:
    if isinstance(thetas, str):
        require(thetas in ("normal", "zeros"),
                f"thetas must be 'normal', 'zeros' or a [2, 5] / [M, 2, 5] array, got {thetas!r}")
        if thetas == "zeros":
            return np.zeros((1,) + SHAPE)
        return np.random.default_rng([seed, 2022]).standard_normal((points,) + SHAPE)
    table = np.asarray(thetas, np.float64)
    if table.shape == SHAPE:
        table = table[None]
    require(table.ndim == 3 and table.shape[1:] == SHAPE,
            f"thetas must have shape [2, 5] or [M, 2, 5], got {table.shape}")
    require(bool(np.all(np.isfinite(table))), "thetas contains NaN or infinity")
    return table


_CACHE: dict = {}


HORIZON = 20
"""check_lola's default T: DiCE's variance grows with T, and at the game's usual T = 100 (with
α = 0.3) the look-ahead terms under test are too small against it to tell the explanations apart
in a run of a minute or two (docs/check.md); pass horizon=100 (and more repeats) to check there."""
LR = 1.0
"""check_lola's default look-ahead step α (a larger step makes the shaping term under test larger)."""


def check_lola(fn: Callable, thetas: Any = "normal", points: int = 8, repeats: int = 50,
               lr: float = LR, gamma: float = ipd.GAMMA, horizon: int = HORIZON, seed: int = 0,
               jax: bool | None = None, candidate_repeats: int | None = None, alpha: float = 0.05,
               progress: bool = True) -> LolaCheckResult:
    """Run `fn(game, rng)` `repeats` times at each parameter point and diagnose its LOLA gradients.

    thetas: "normal" (`points` points, θ1 and θ2 N(0, 1) per state), "zeros" (the LOLA start,
    one point) or an array [2, 5] / [M, 2, 5]. lr: the look-ahead step α; gamma, horizon: the
    discounted T-step return. `jax`: True for a JAX function (vmapped and jitted, rng a key),
    False for a Python one, None reads the `jax_function` mark. `candidate_repeats`: Monte-Carlo
    draws per point for each explanation (default max(1000, 20·repeats)). Raises InputError for
    bad arguments or a user function that raises, returns a wrong shape or NaN, or misuses
    `game.sample`.
    """
    use_jax = getattr(fn, check_run.JAX_ATTRIBUTE, False) if jax is None else bool(jax)
    require(callable(fn), f"fn must be callable, got {type(fn).__name__}")
    require(isinstance(repeats, int) and repeats >= 3,
            f"repeats must be an integer >= 3 (bias2 needs 3), got {repeats!r}")
    require(isinstance(points, int) and points >= 1, f"points must be an integer >= 1, got {points!r}")
    require(0 < gamma < 1, f"gamma must be in (0, 1), got {gamma}")
    require(isinstance(horizon, int) and horizon >= 1, f"horizon must be an integer >= 1, got {horizon!r}")
    require(lr > 0, f"lr must be > 0, got {lr}")
    require(0 < alpha < 1, f"alpha must be in (0, 1), got {alpha}")
    candidate_repeats = max(1000, 20 * repeats) if candidate_repeats is None else candidate_repeats
    require(isinstance(candidate_repeats, int) and candidate_repeats >= 10,
            f"candidate_repeats must be an integer >= 10, got {candidate_repeats!r}")
    started = time.perf_counter()
    table = _points(thetas, points, seed)
    count = table.shape[0]
    lr, gamma = float(lr), float(gamma)
    with jax_x64():
        pts = jnp.asarray(table)
        exact = np.asarray(_exact_program(gamma, lr, horizon)(pts))
    user_started = time.perf_counter()
    if use_jax:
        def game_of(point, recorder):
            return JaxGame(point[0], point[1], jnp.asarray(gamma), lr, horizon, recorder)
        with jax_x64():
            estimates, probe, notes, first, steady = check_run.jax_estimates(
                fn, game_of, pts, count, SHAPE, repeats, seed, EXPECTED)
        recorder, groups = probe, probe.groups()
        user_seconds, per_estimate = first, steady / (count * repeats)
    else:
        games = [Game(table[m, 0].copy(), table[m, 1].copy(), gamma, lr, horizon)
                 for m in range(count)]
        estimates, groups, notes = check_run._python_estimates(
            fn, games, repeats, seed, progress, SHAPE, EXPECTED, "point")
        user_seconds = time.perf_counter() - user_started
        per_estimate = user_seconds / (count * repeats)
        recorder = games[0].recorder  # point 0's calls (its last repeat), with their (θ1, θ2)
    sizes, shared, structure_notes = structure_from_calls(recorder, table[0].reshape(-1))
    cand_started = time.perf_counter()
    key = (table.tobytes(), gamma, lr, horizon, sizes, candidate_repeats, seed)
    if key not in _CACHE:
        while len(_CACHE) >= 4:
            _CACHE.pop(next(iter(_CACHE)))
        with jax_x64():
            _CACHE[key] = expectations(pts, gamma, lr, horizon, sizes, candidate_repeats, seed + 7919)
    means, mean_vars = _CACHE[key]
    cand_seconds = time.perf_counter() - cand_started
    flat = estimates.reshape(count, repeats, -1)
    summary = stats.summarize(flat, exact.reshape(count, -1))
    diagnosis = diagnose(flat, means, mean_vars, [v.name for v in VARIANTS],
                         [v.label for v in VARIANTS], alpha, list(notes) + structure_notes, "point")
    config = {"function": getattr(fn, "__name__", "function"), "game": "ipd",
              "path": "jax" if use_jax else "python", "points": count, "repeats": repeats,
              "thetas": table.tolist(), "lr": lr, "gamma": gamma, "horizon": horizon, "seed": seed,
              "candidate_repeats": candidate_repeats, "alpha": alpha,
              "structure": {"lookahead_sizes": list(sizes), "shared": shared},
              "truth": "exact float64 LOLA gradients of the discounted T-step returns "
                       "(one look-ahead step, no bootstrap)"}
    return LolaCheckResult(
        config=config, summary=summary, exact=exact, estimates=estimates,
        candidates={v.name: means[:, i].reshape((count,) + SHAPE) for i, v in enumerate(VARIANTS)},
        calls=groups, diagnosis=diagnosis,
        seconds={"user": user_seconds, "per_estimate": per_estimate, "candidates": cand_seconds,
                 "total": time.perf_counter() - started})


def jax_x64():
    """`jax.enable_x64(True)` (check_lola's argument `jax` hides the module's name)."""
    return jax_module.enable_x64(True)


jax_module = jax
