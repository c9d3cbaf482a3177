"""What a user's meta-gradient function receives: the task, its sampler, and the call record.

Protocol (`docs/check.md`): `fn(task, rng)` returns one estimate of d/dφ J_out(θ_K(φ)) as an
[S, A] array. `task.sample(theta, n, rng)` draws n episodes of T steps of the softmax policy
π_θ(a|s) = softmax(θ[s, :]) from `init_state` and returns `Episodes(states [n, T+1] int,
actions [n, T] int, rewards [n, T] = R[s_t, a_t])`. On the Python path (NumPy, PyTorch) `rng` is a
`numpy.random.Generator` and every array is NumPy; on the JAX path `rng` is a JAX key, the task
holds JAX arrays and `sample` is traceable (n must be a Python int). Every call is recorded (n and
θ), so that gmrl can mirror the user's sampling structure in its candidate explanations.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from gmrl.envs import tabular
from gmrl.errors import InputError

MAX_EPISODES = 1_000_000


class Episodes(NamedTuple):
    """n sampled episodes: states [n, T+1] (s_0..s_T), actions [n, T], rewards [n, T] (R[s_t, a_t])."""

    states: Any
    actions: Any
    rewards: Any


class SampleError(InputError):
    """A bad call of `task.sample` (raised through the user's code; reported as is)."""


@dataclasses.dataclass
class Recorder:
    """The sample calls of one call of the user's function: sizes, and θ where it is concrete."""

    sizes: list[int] = dataclasses.field(default_factory=list)
    thetas: list[np.ndarray | None] = dataclasses.field(default_factory=list)
    probe: bool = False
    """JAX path: record θ of an eager run through `jax.debug.callback` (θ may be a JVP tracer)."""

    def groups(self) -> list[list[int]]:
        """Sizes of consecutive calls grouped by equal θ (one group per point θ̂_k)."""
        out: list[list[int]] = []
        previous = None
        for size, theta in zip(self.sizes, self.thetas, strict=True):
            same = (previous is not None and theta is not None and theta.shape == previous.shape
                    and np.array_equal(theta, previous))
            if same:
                out[-1].append(size)
            else:
                out.append([size])
            previous = theta
        return out


def _check_size(n: Any) -> int:
    if isinstance(n, jax.core.Tracer):
        raise SampleError("task.sample(theta, n, rng): n must be a Python int (the number of "
                          "episodes is static), got a traced value")
    if isinstance(n, bool) or not isinstance(n, int | np.integer):
        raise SampleError(f"task.sample(theta, n, rng): n must be an integer >= 1, got "
                          f"{type(n).__name__} {n!r}")
    if not 1 <= int(n) <= MAX_EPISODES:
        raise SampleError(f"task.sample(theta, n, rng): n must be in [1, {MAX_EPISODES}], got {n}")
    return int(n)


def _as_numpy(theta: Any) -> np.ndarray:
    if hasattr(theta, "detach"):  # a torch tensor, possibly requiring grad
        theta = theta.detach().cpu().numpy()
    try:
        return np.asarray(theta, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise SampleError(f"task.sample(theta, n, rng): theta must be an [S, A] array of numbers, "
                          f"got {type(theta).__name__} ({err})") from None


@dataclasses.dataclass(frozen=True)
class Task:
    """A tabular meta-learning task for the Python path (NumPy arrays and numbers).

    P [S, A, S'], R [S, A], gamma, init_state, horizon T, steps K, lr α, problem ("maml": φ = θ_0;
    "lirpg": φ = intrinsic reward added to R in the inner objective, θ_0 = 0), phi [S, A].
    """

    P: np.ndarray
    R: np.ndarray
    gamma: float
    init_state: int
    horizon: int
    steps: int
    lr: float
    problem: str
    phi: np.ndarray
    recorder: Recorder = dataclasses.field(default_factory=Recorder, repr=False, compare=False)

    @property
    def num_states(self) -> int:
        return self.R.shape[0]

    @property
    def num_actions(self) -> int:
        return self.R.shape[1]

    def sample(self, theta, n, rng) -> Episodes:
        """n episodes of softmax(θ) from init_state: states [n, T+1], actions [n, T], rewards [n, T]."""
        n = _check_size(n)
        theta = _as_numpy(theta)
        if theta.shape != self.R.shape:
            raise SampleError(f"task.sample(theta, n, rng): theta must have shape "
                              f"{self.R.shape} [S, A], got {theta.shape}")
        if not np.all(np.isfinite(theta)):
            raise SampleError("task.sample(theta, n, rng): theta contains NaN or infinity")
        if not isinstance(rng, np.random.Generator):
            raise SampleError(f"task.sample(theta, n, rng): rng must be the numpy.random.Generator "
                              f"gmrl passed to your function, got {type(rng).__name__}")
        self.recorder.sizes.append(n)
        self.recorder.thetas.append(theta.copy())
        return sample_numpy(rng, self.P, self.R, self.init_state, theta, n, self.horizon)


def sample_numpy(rng: np.random.Generator, P: np.ndarray, R: np.ndarray, init_state: int,
                 theta: np.ndarray, n: int, horizon: int) -> Episodes:
    """Inverse-CDF rollouts of softmax(θ), vectorised over episodes, a loop over the T steps."""
    logits = theta - theta.max(-1, keepdims=True)
    pi = np.exp(logits)
    pi /= pi.sum(-1, keepdims=True)
    cum_pi = np.cumsum(pi, -1)[:, :-1]
    cum_P = np.cumsum(P, -1)[:, :, :-1]
    states = np.empty((n, horizon + 1), np.int64)
    actions = np.empty((n, horizon), np.int64)
    states[:, 0] = init_state
    for t in range(horizon):
        s = states[:, t]
        a = (cum_pi[s] < rng.random((n, 1))).sum(-1)
        actions[:, t] = a
        states[:, t + 1] = (cum_P[s, a] < rng.random((n, 1))).sum(-1)
    return Episodes(states, actions, R[states[:, :-1], actions])


class JaxTask(NamedTuple):
    """The JAX path's task: fields as in `Task`, JAX arrays; `sample` is traceable."""

    P: jax.Array
    R: jax.Array
    gamma: jax.Array
    init_state: jax.Array
    horizon: int
    steps: int
    lr: float
    problem: str
    phi: jax.Array
    recorder: Recorder

    @property
    def num_states(self) -> int:
        return self.R.shape[-2]

    @property
    def num_actions(self) -> int:
        return self.R.shape[-1]

    def sample(self, theta, n, rng) -> Episodes:
        """n episodes of softmax(θ) (no gradient through sampling); rng a JAX key."""
        n = _check_size(n)
        theta = jnp.asarray(theta)
        if theta.shape != self.R.shape:
            raise SampleError(f"task.sample(theta, n, rng): theta must have shape "
                              f"{tuple(self.R.shape)} [S, A], got {tuple(theta.shape)}")
        if not (isinstance(rng, jax.Array) and (jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
                                                or rng.shape == (2,))):
            raise SampleError("task.sample(theta, n, rng): rng must be a JAX PRNG key (split the "
                              f"one gmrl passed), got {type(rng).__name__}")
        recorder = self.recorder
        index = len(recorder.sizes)
        recorder.sizes.append(n)
        recorder.thetas.append(None)
        if recorder.probe:
            def store(value, i=index):
                recorder.thetas[i] = np.asarray(value, np.float64)
            jax.debug.callback(store, lax.stop_gradient(theta))
        mdp = tabular.TabularMDP(self.P, self.R, self.gamma, self.init_state)
        traj = tabular.sample_trajectories(rng, mdp, theta, n, self.horizon)
        states = jnp.concatenate([traj.states, traj.final_states[:, None]], axis=1)
        return Episodes(states, traj.actions, self.R[traj.states, traj.actions])
