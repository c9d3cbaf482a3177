"""Tabular MDPs with softmax policies: generator, validation, exact oracle, batched sampler.

docs/design.md (tabular oracle). A policy is a logit table θ of shape [S, A] with π_θ(a|s) = softmax(θ[s, :]).
Exact quantities are closed forms differentiated by autodiff; call them inside
`jax.enable_x64(True)` when they serve as an oracle (float32 is off by ~1e-6 relative).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from gmrl import sampling
from gmrl.errors import InputError, require

Array = jax.Array


class TabularMDP(NamedTuple):
    """A finite MDP (a pytree: stack MDPs along a leading axis and `jax.vmap` over them).

    P: [S, A, S'] transition probabilities; R: [S, A] mean rewards; gamma: [] discount in [0, 1);
    init_state: [] integer start state s0.
    """

    P: Array
    R: Array
    gamma: Array
    init_state: Array

    @property
    def num_states(self) -> int:
        return self.R.shape[-2]

    @property
    def num_actions(self) -> int:
        return self.R.shape[-1]


class Trajectories(NamedTuple):
    """A batch of N rollouts of horizon T: states/actions [N, T] (int32), final_states [N]."""

    states: Array
    actions: Array
    final_states: Array


def random_mdp(key: Array, num_states: int = 20, num_actions: int = 5, gamma: float = 0.8,
               concentration: float = 0.001) -> TabularMDP:
    """The reference study's random MDP: P[s, a] ~ Dirichlet(concentration·1), R ~ U[0, 1), s0 = 0."""
    require(num_states >= 1 and num_actions >= 1,
            f"need at least one state and one action, got S={num_states}, A={num_actions}")
    require(concentration > 0, f"the Dirichlet concentration must be > 0, got {concentration}")
    _check_gamma(gamma)
    key_p, key_r = jax.random.split(key)
    dtype = jnp.zeros(()).dtype  # float64 under jax.enable_x64, else float32
    alpha = jnp.full((num_states,), concentration, dtype)
    P = jax.random.dirichlet(key_p, alpha, shape=(num_states, num_actions), dtype=dtype)
    R = jax.random.uniform(key_r, (num_states, num_actions), dtype)
    return TabularMDP(P, R, jnp.asarray(gamma, dtype), jnp.asarray(0, jnp.int32))


def random_mdps(key: Array, num_mdps: int, **kwargs) -> TabularMDP:
    """`num_mdps` independent random MDPs stacked along a leading axis (see `random_mdp`)."""
    require(num_mdps >= 1, f"the number of MDPs must be >= 1, got {num_mdps}")
    return jax.vmap(lambda k: random_mdp(k, **kwargs))(jax.random.split(key, num_mdps))


def _check_gamma(gamma) -> None:
    require(isinstance(gamma, int | float | np.integer | np.floating) and not isinstance(gamma, bool),
            f"the discount gamma must be a number in [0, 1), got {gamma!r}")
    require(bool(np.isfinite(gamma)) and 0.0 <= float(gamma) < 1.0,
            f"the discount gamma must be in [0, 1), got {gamma}")


REWARD_LIMIT = 1e150
"""Largest |R| accepted: bias2 and variances square quantities proportional to R, and float64
overflows at about (1.8e308)^½ ≈ 1.3e154."""


def make_mdp(P, R, gamma: float = 0.8, init_state: int = 0) -> TabularMDP:
    """Validate user arrays (P [S, A, S'], R [S, A]) and build a TabularMDP of float64 numpy arrays.

    Raises InputError naming the problem: shapes, NaN/inf, negative or non-normalised rows of P,
    gamma outside [0, 1), start state out of range.
    """
    try:
        P, R = np.asarray(P), np.asarray(R)
    except (TypeError, ValueError):
        raise InputError("P and R must be numeric arrays (P [S, A, S], R [S, A])") from None
    for name, value in (("P", P), ("R", R)):  # complex or object arrays: no silent truncation
        require(value.dtype.kind in "biuf", f"{name} must hold real numbers, got dtype {value.dtype}")
    P, R = P.astype(np.float64), R.astype(np.float64)
    require(P.ndim == 3 and P.shape[0] == P.shape[2],
            f"P must have shape [S, A, S] (states, actions, next states), got {P.shape}")
    require(R.shape == P.shape[:2],
            f"R must have shape [S, A] = {P.shape[:2]} to match P {P.shape}, got {R.shape}")
    require(P.shape[0] >= 1 and P.shape[1] >= 1, f"P must have S >= 1 and A >= 1, got {P.shape}")
    require(bool(np.all(np.isfinite(P))), "P contains NaN or infinity")
    require(bool(np.all(np.isfinite(R))), "R contains NaN or infinity")
    scale = float(np.abs(R).max(initial=0.0))
    require(scale <= REWARD_LIMIT, f"R reaches |R| = {scale:.3g}: the statistics square meta-gradients "
            f"that scale with R, which overflows float64 beyond |R| ≈ {REWARD_LIMIT:.0e}; rescale R")
    require(bool(np.all(P >= 0)), "P has negative entries; transition probabilities must be >= 0")
    row_error = np.abs(P.sum(-1) - 1.0).max()
    require(row_error < 1e-6,
            f"rows of P must sum to 1 over next states (max |sum - 1| = {row_error:.3g})")
    _check_gamma(gamma)
    require(float(init_state).is_integer() and 0 <= int(init_state) < P.shape[0],
            f"init_state must be an integer in [0, {P.shape[0]}), got {init_state}")
    # numpy float64 leaves: JAX converts them at use, so they stay exact under jax.enable_x64.
    return TabularMDP(P / P.sum(-1, keepdims=True), R, np.asarray(float(gamma)),
                      np.asarray(int(init_state), np.int32))


def load_mdp(path: str | os.PathLike) -> TabularMDP:
    """Load an MDP from `.npz` with keys P, R, gamma and optional init_state (default 0)."""
    name = os.fspath(path)
    require(os.path.isfile(path), f"MDP file {name!r} does not exist")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    require(magic == b"PK\x03\x04", f"MDP file {name!r} is not an .npz archive (np.savez of P, R "
                                     "and gamma)" + ("; it is empty" if not magic else ""))
    from gmrl.io import load_errors

    try:
        data = np.load(path, allow_pickle=False)
    except load_errors() as err:
        raise InputError(f"cannot read MDP file {name!r} as .npz: {err}") from None
    require(isinstance(data, np.lib.npyio.NpzFile),
            f"MDP file {name!r} is not an .npz archive (np.savez) of P, R and gamma")
    try:
        with data:
            arrays = {k: data[k] for k in data.files}
    except load_errors() as err:
        raise InputError(f"cannot read MDP file {name!r} as .npz: {err}") from None
    missing = [k for k in ("P", "R", "gamma") if k not in arrays]
    require(not missing, f"MDP file {name!r} lacks key(s) {missing}; "
            "required: P [S, A, S], R [S, A], gamma; optional: init_state")
    for key in ("gamma", "init_state"):
        value = arrays.get(key)
        require(value is None or (value.size == 1 and value.dtype.kind in "biuf"),
                f"{key} in {name!r} must be one number, got {value!r}")
    init_state = arrays["init_state"].item() if "init_state" in arrays else 0
    return make_mdp(arrays["P"], arrays["R"], arrays["gamma"].item(), init_state)


def load_theta(path: str | os.PathLike, num_states: int, num_actions: int) -> np.ndarray:
    """Load a policy-logit table θ0 [S, A] from `.npy` (float64), validated: shape and finite."""
    name = os.fspath(path)
    require(os.path.isfile(path), f"theta0 file {name!r} does not exist")
    from gmrl.io import load_errors

    try:
        theta = np.load(path, allow_pickle=False)
    except load_errors() as err:
        raise InputError(f"cannot read theta0 file {name!r} as .npy: {type(err).__name__}: "
                         f"{' '.join(str(err).split())[:200]}") from None
    require(isinstance(theta, np.ndarray) and theta.dtype.kind in "biuf",
            f"theta0 file {name!r} must hold one numeric .npy array [S, A]")
    require(theta.shape == (num_states, num_actions),
            f"theta0 in {name!r} must have shape [S, A] = ({num_states}, {num_actions}), got {theta.shape}")
    theta = theta.astype(np.float64)
    require(bool(np.all(np.isfinite(theta))), f"theta0 in {name!r} contains NaN or infinity")
    return theta


def save_mdp(path: str | os.PathLike, mdp: TabularMDP) -> None:
    """Save one (unstacked) MDP as `.npz` with keys P, R, gamma, init_state."""
    np.savez(path, P=np.asarray(mdp.P), R=np.asarray(mdp.R), gamma=np.asarray(mdp.gamma),
             init_state=np.asarray(mdp.init_state))


def policy(theta: Array) -> Array:
    """π_θ(a|s) = softmax(θ[s, :]). [S, A] -> [S, A]."""
    return jax.nn.softmax(theta, axis=-1)


def _policy_dynamics(mdp: TabularMDP, theta: Array, reward: Array | None):
    pi = policy(theta)
    P_pi = jnp.einsum("sa,sat->st", pi, mdp.P)
    r_pi = jnp.sum(pi * (mdp.R if reward is None else reward), axis=-1)
    return P_pi, r_pi


def state_values(mdp: TabularMDP, theta: Array, reward: Array | None = None) -> Array:
    """Infinite-horizon values v = (I − γ P_π)^{-1} r_π. [S, A] -> [S].

    `reward` [S, A] replaces mdp.R (e.g. R + φ for LIRPG).
    """
    P_pi, r_pi = _policy_dynamics(mdp, theta, reward)
    eye = jnp.eye(mdp.num_states, dtype=P_pi.dtype)
    return jnp.linalg.solve(eye - mdp.gamma * P_pi, r_pi)


def exact_return(mdp: TabularMDP, theta: Array, reward: Array | None = None) -> Array:
    """J(θ) = v[s0], the discounted return from the start state. Returns []."""
    return state_values(mdp, theta, reward)[mdp.init_state]


def finite_horizon_return(mdp: TabularMDP, theta: Array, horizon: int,
                          bootstrap: Array | None = None, reward: Array | None = None) -> Array:
    """J_T(θ) = E[Σ_{t<T} γ^t r_t + γ^T V_boot(s_T)], exactly, by propagating d_{t+1} = d_t P_π.

    `bootstrap` [S] is held fixed (no gradient flows into θ through it unless the caller wants it);
    None means V_boot ≡ 0. Returns [].
    """
    P_pi, r_pi = _policy_dynamics(mdp, theta, reward)
    d0 = jax.nn.one_hot(mdp.init_state, mdp.num_states, dtype=P_pi.dtype)

    def step(carry, _):
        d, discount = carry
        return (d @ P_pi, discount * mdp.gamma), discount * (d @ r_pi)

    (d_T, gamma_T), rewards = lax.scan(step, (d0, jnp.ones((), P_pi.dtype)), None, length=horizon)
    total = jnp.sum(rewards)
    if bootstrap is not None:
        total = total + gamma_T * (d_T @ bootstrap)
    return total


def noisy_critic(key: Array, mdp: TabularMDP, theta: Array, noise: float,
                 reward: Array | None = None) -> Array:
    """The reference critic: exact V plus N(0, 1)·noise·‖V‖/S per state, without gradient. [S]."""
    values = lax.stop_gradient(state_values(mdp, theta, reward))
    scale = noise * jnp.linalg.norm(values) / mdp.num_states
    return values + scale * jax.random.normal(key, values.shape, values.dtype)


def sample_trajectories(key: Array, mdp: TabularMDP, theta: Array, num_trajectories: int,
                        horizon: int) -> Trajectories:
    """N rollouts of horizon T of π_θ from s0 (`lax.scan` over time, batched over N).

    θ is treated as a constant (sampling carries no gradient). Returns Trajectories with
    states/actions [N, T] and final_states [N] (s_T, for bootstrapping).
    """
    pi = lax.stop_gradient(policy(theta))
    start = jnp.full((num_trajectories,), mdp.init_state, jnp.int32)

    def step(states, step_key):
        key_a, key_s = jax.random.split(step_key)
        actions = sampling.categorical(key_a, pi[states])
        next_states = sampling.categorical(key_s, mdp.P[states, actions])
        return next_states, (states, actions)

    final, (states, actions) = lax.scan(step, start, jax.random.split(key, horizon))
    return Trajectories(states.T, actions.T, final)
