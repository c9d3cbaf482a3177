"""Tabular Meta-Gradient RL (Xu et al. 2018): online meta-gradients in (γ, λ), an instance of `gmrl.core`.

Learner state θ = (x [S, A] policy logits, v [S] critic), both 0 at the start; meta-parameters
η = (logit γ, logit λ) [2]. With π = softmax(x), P_π = Σ_a π P, r_π = Σ_a π R, one expected step is

    V_λ = (I − γλ P_π)⁻¹ (r_π + γ(1 − λ) P_π v)                     expected λ-return on v
    Q_λ(s, a) = R(s, a) + γ Σ_s' P(s, a, s') [(1 − λ) v(s') + λ V_λ(s')]
    d = e_s0ᵀ (I − γ P_π)⁻¹                                          discounted occupancy
    Δx(s, b) = α d(s) π(b|s) (Q_λ(s, b) − Σ_a π(a|s) Q_λ(s, a))
    Δv(s)    = β (1 − γ) d(s) (V_λ(s) − v(s)).

The finite oracle (horizon T, bootstrap v(s_T)) replaces d by d_t = e_s0ᵀ P_π^t weighted by γ^t for
t < T and V_λ, Q_λ by their n = T − t step versions V⁽⁰⁾ = v, V⁽ⁿ⁾ = r_π + γ P_π[(1 − λ)v + λV⁽ⁿ⁻¹⁾],
Q⁽ⁿ⁾ = R + γ P[(1 − λ)v + λV⁽ⁿ⁻¹⁾]: exactly the expectation of the sampled step below.

A sampled step averages over N episodes of horizon T from s0 under π. With the TD errors
δ_u = r_u + γ v(s_{u+1}) − v(s_u) and c_{t,u} = γ^t (γλ)^{u−t} (u ≥ t), the GAE advantage is
γ^t A_t = Σ_{u≥t} c_{t,u} δ_u, and

    Δx = α Σ_t Σ_{u≥t} c_{t,u} δ_u □^π_{t,u} ∇_x log π(a_t|s_t)
    Δv = β (1 − γ) Σ_t Σ_{u≥t} c_{t,u} δ_u □^v_{t,u} e_{s_t}

where □(W) = exp(W − sg W) is a magic box (value 1; derivative ∇W) over W, a sum of
ℓ_i = log π(a_i|s_i). Every estimator has the same step value; they differ in the boxes, i.e. in
which dependencies of the episodes' distribution on x their Jacobian keeps:

    maml    □^π = □^v = 1           none (autodiff of Σ γ^t A_t log π and of the critic loss
                                     with the episodes held fixed, as MGRL is written)
    lvc     □^π = □(ℓ_t), □^v = 1    the policy term's own action (π/sg π in place of log π)
    loaded  □^π = □^v = □(Σ_{i≤u} ℓ_i)   every action term (t, u) depends on: a_{<t} (through s_t)
                                     and a_t..a_u (through δ_u) — unbiased, causal
    dice    □^π = □^v = □(Σ_{i<T} ℓ_i)   every action of the episode — unbiased, more variance

Unbiasedness of loaded/dice: a term f_{t,u}(τ; x, v, η) is a function of the prefix of the
episode up to s_{u+1}, whose probability depends on x only through π(a_i|s_i), i ≤ u, so
∂/∂x E[f] = E[∂f/∂x + f Σ_{i≤u} ∇ log π(a_i|s_i)] = E[∂(□ f)/∂x] (score-function identity); in v and
η the distribution does not move, so ∂/∂(v, η) commutes with E for every estimator. Adding the
scores of later actions (dice) leaves the expectation unchanged (they have mean 0 given the prefix).
maml misses the whole score term; lvc keeps only the term t's own action in the policy part and none
in the critic part, so both are biased in ∂Δ/∂x (policy block and critic block) and unbiased in
∂Δ/∂(v, η).

At K = 1 every sampled estimator gives the same meta-gradient draw by draw: θ_0 = 0 does not depend
on η, so only ∂Δ/∂η enters, and a box has value 1 and no derivative in η.

The meta-objective is J_out(x_K) = [(I − γ_out P_π)⁻¹ r_π](s0) with the MDP's own γ_out, from any
`core.Source` as for MAML (`metagrad.ingredient_objective` on x with reward R).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from gmrl import core
from gmrl import metagrad as mg
from gmrl.core import Hyper, Source
from gmrl.envs import tabular
from gmrl.errors import require

Array = jax.Array

ESTIMATORS = ("maml", "lvc", "loaded", "dice")
"""The sampled step estimators of this problem (see the module docstring)."""
UNBIASED = ("loaded", "dice")


class Learner(NamedTuple):
    """The learner state θ: policy logits x [S, A] and critic v [S] (a pytree)."""

    x: Array
    v: Array


@dataclasses.dataclass(frozen=True)
class MGRLConfig:
    """A tabular MGRL meta-gradient (jit-static, hashable).

    steps K; lr α (policy step); critic_lr β; gamma0 / lambda0: the initial γ, λ (gamma0 None: the
    MDP's own γ); horizon T of episodes and of the finite oracle; noise: the critic noise of a
    sampled outer source (as for MAML); inner / hessian / outer: the sources (`core.Source`).
    """

    steps: int = 1
    lr: float = 10.0
    critic_lr: float = 0.5
    gamma0: float | None = None
    lambda0: float = 0.9
    horizon: int = 20
    noise: float = 1.0
    inner: Source = Source()
    hessian: Source = Source()
    outer: Source = Source()
    oracle: str = "infinite"
    problem: str = "mgrl"

    def __post_init__(self):
        require(self.problem == "mgrl", f"MGRLConfig is the 'mgrl' problem, got {self.problem!r}")
        require(self.oracle in mg.ORACLES,
                f"unknown oracle {self.oracle!r}; allowed: {', '.join(mg.ORACLES)}")
        mg._require_int(self.steps, "the number of inner steps K", 1, mg.MAX_STEPS)
        mg._require_int(self.horizon, "the horizon T", 1, mg.MAX_HORIZON)
        require(mg._finite(self.lr) and self.lr > 0, f"the inner learning rate must be > 0, got {self.lr}")
        require(mg._finite(self.critic_lr) and self.critic_lr >= 0,
                f"the critic learning rate β must be >= 0, got {self.critic_lr}")
        require(mg._finite(self.noise) and self.noise >= 0,
                f"the critic noise must be >= 0, got {self.noise}")
        require(self.gamma0 is None or (mg._finite(self.gamma0) and 0 < self.gamma0 < 1),
                f"--gamma0 must be in (0, 1), got {self.gamma0}")
        require(mg._finite(self.lambda0) and 0 < self.lambda0 < 1,
                f"--lambda0 must be in (0, 1), got {self.lambda0}")
        for part in (self.inner, self.hessian):
            require(part.estimator in ("exact", "same", "none") + ESTIMATORS,
                    f"the mgrl step estimators are {', '.join(ESTIMATORS)}; got {part.estimator!r}")

    @property
    def parts(self) -> core.Decomposition:
        return core.Decomposition(self.inner, self.hessian, self.outer)

    def outer_config(self) -> mg.MetaGradConfig:
        """The MAML configuration whose ingredient objective is J_out on x (reward R, γ_out)."""
        return mg.MetaGradConfig(problem="maml", steps=self.steps, lr=self.lr, horizon=self.horizon,
                                 noise=self.noise, oracle=self.oracle)


def logit(p) -> float:
    return float(np.log(p) - np.log1p(-p))


def initial_eta(cfg: MGRLConfig, mdp: tabular.TabularMDP) -> Array:
    """η = (logit γ0, logit λ0) [2]; γ0 = the MDP's γ when cfg.gamma0 is None."""
    gamma0 = jnp.asarray(mdp.gamma) if cfg.gamma0 is None else jnp.asarray(cfg.gamma0)
    dtype = jnp.zeros(()).dtype
    return jnp.stack([jnp.log(gamma0) - jnp.log1p(-gamma0), jnp.asarray(logit(cfg.lambda0))]).astype(dtype)


def initial_learner(mdp: tabular.TabularMDP) -> Learner:
    return Learner(jnp.zeros(mdp.R.shape, mdp.R.dtype), jnp.zeros(mdp.R.shape[:-1], mdp.R.dtype))


def _dynamics(mdp: tabular.TabularMDP, x: Array):
    pi = tabular.policy(x)
    return pi, jnp.einsum("sa,sat->st", pi, mdp.P), jnp.sum(pi * mdp.R, -1)


def expected_step(mdp: tabular.TabularMDP, theta: Learner, gamma, lam, alpha, beta,
                  horizon: int | None = None) -> Learner:
    """The expected step Δ = (Δx [S, A], Δv [S]) of the module docstring; horizon None: the infinite
    formulas, else the finite oracle's (the exact expectation of the sampled step)."""
    x, v = theta
    pi, P_pi, r_pi = _dynamics(mdp, x)
    S = mdp.num_states
    eye = jnp.eye(S, dtype=P_pi.dtype)
    start = jax.nn.one_hot(mdp.init_state, S, dtype=P_pi.dtype)
    if horizon is None:
        V = jnp.linalg.solve(eye - gamma * lam * P_pi, r_pi + gamma * (1 - lam) * P_pi @ v)
        Q = mdp.R + gamma * mdp.P @ ((1 - lam) * v + lam * V)
        d = jnp.linalg.solve((eye - gamma * P_pi).T, start)
        return Learner(alpha * d[:, None] * pi * (Q - jnp.sum(pi * Q, -1, keepdims=True)),
                       beta * (1 - gamma) * d * (V - v))

    def backward(V_prev, _):  # n steps to go: V⁽ⁿ⁾, Q⁽ⁿ⁾ from V⁽ⁿ⁻¹⁾
        target = (1 - lam) * v + lam * V_prev
        return r_pi + gamma * P_pi @ target, (mdp.R + gamma * mdp.P @ target, r_pi + gamma * P_pi @ target)

    _, (Qs, Vs) = lax.scan(backward, v, None, length=horizon)  # index n − 1, n = 1..T
    Qs, Vs = Qs[::-1], Vs[::-1]  # index t: n = T − t

    def forward(carry, _):
        dist, discount = carry
        return (dist @ P_pi, discount * gamma), discount * dist

    _, weights = lax.scan(forward, (start, jnp.ones((), P_pi.dtype)), None, length=horizon)  # γ^t d_t [T, S]
    adv = Qs - jnp.sum(pi * Qs, -1, keepdims=True)
    dx = alpha * jnp.sum(weights[:, :, None] * pi * adv, 0)
    dv = beta * (1 - gamma) * jnp.sum(weights * (Vs - v), 0)
    return Learner(dx, dv)


def _box(w: Array) -> Array:
    """The magic box □(w) = exp(w − sg w): value 1, derivative ∇w."""
    return jnp.exp(w - lax.stop_gradient(w))


def _boxes(ell: Array, estimator: str) -> tuple[Array, Array]:
    """(□^π, □^v) [T (t), T (u)] of `estimator` from ℓ_t = log π(a_t|s_t) [T] (module docstring)."""
    T = ell.shape[0]
    ones = jnp.ones((T, T), ell.dtype)
    if estimator == "maml":
        return ones, ones
    if estimator == "lvc":
        return _box(ell)[:, None] * ones, ones
    if estimator == "loaded":
        causal = jnp.broadcast_to(_box(jnp.cumsum(ell))[None, :], (T, T))
        return causal, causal
    whole = _box(jnp.sum(ell)) * ones  # dice
    return whole, whole


def episode_step(mdp: tabular.TabularMDP, theta: Learner, gamma, lam, alpha, beta, states: Array,
                 actions: Array, final_state: Array, estimator: str) -> Learner:
    """The sampled step of ONE episode (states, actions [T], final_state []) for `estimator` (a name,
    or a traced int index into ESTIMATORS)."""
    x, v = theta
    T = states.shape[0]
    log_pi = jax.nn.log_softmax(x, -1)
    ell = log_pi[states, actions]  # [T], differentiable in x
    rewards = mdp.R[states, actions]
    next_values = jnp.concatenate([v[states[1:]], v[final_state][None]])
    delta = rewards + gamma * next_values - v[states]  # [T] (u)
    t = jnp.arange(T)
    lag = t[None, :] - t[:, None]  # u − t
    c = jnp.where(lag >= 0, gamma ** t[:, None] * (gamma * lam) ** jnp.maximum(lag, 0), 0.0)  # [t, u]
    if isinstance(estimator, str):
        require(estimator in ESTIMATORS,
                f"unknown mgrl estimator {estimator!r}; allowed: {', '.join(ESTIMATORS)}")
        box_pi, box_v = _boxes(ell, estimator)
    else:  # a traced index into ESTIMATORS: one compiled program serves every estimator
        boxes = [_boxes(ell, name) for name in ESTIMATORS]
        box_pi = jnp.stack([b[0] for b in boxes])[estimator]
        box_v = jnp.stack([b[1] for b in boxes])[estimator]
    coef_pi = jnp.sum(c * delta[None, :] * box_pi, 1)  # [T]
    coef_v = jnp.sum(c * delta[None, :] * box_v, 1)
    pi = jnp.exp(log_pi)
    score = jax.nn.one_hot(actions, x.shape[-1], dtype=x.dtype) - pi[states]  # ∇ log π(a_t|s_t) rows [T, A]
    dx = jnp.zeros_like(x).at[states].add(alpha * coef_pi[:, None] * score)
    dv = jnp.zeros_like(v).at[states].add(beta * (1 - gamma) * coef_v)
    return Learner(dx, dv)


def sampled_step(key: Array, mdp: tabular.TabularMDP, theta: Learner, gamma, lam, alpha, beta,
                 estimator: str, samples: int, horizon: int, count: Array | None = None) -> Learner:
    """The mean sampled step over `samples` episodes drawn at sg(x) (the first `count` if given)."""
    traj = tabular.sample_trajectories(key, mdp, theta.x, samples, horizon)
    steps = jax.vmap(lambda s, a, f: episode_step(mdp, theta, gamma, lam, alpha, beta, s, a, f, estimator))(
        traj.states, traj.actions, traj.final_states)
    if count is None:
        weights = jnp.full((samples,), 1.0 / samples, theta.v.dtype)
    else:
        weights = jnp.where(jnp.arange(samples) < count, 1.0, 0.0).astype(theta.v.dtype) / count
    return jax.tree.map(lambda leaf: jnp.tensordot(weights, leaf, 1), steps)


def problem(cfg: MGRLConfig, mdp: tabular.TabularMDP,
            estimator_index: Array | None = None) -> core.MetaProblem:
    """Tabular MGRL on `mdp` as a `core.MetaProblem` (θ: `Learner`, φ = η [2]).

    init: θ_0 = (0, 0); increment: the expected step (exact sources, the finite oracle's with
    oracle='finite') or the sampled step of the source's estimator, α = the `lr` passed in and
    β = cfg.critic_lr; outer: J_out(x) from the source (`metagrad.ingredient_objective`, reward R).
    `estimator_index` (optional, traced int into ESTIMATORS) replaces the sampled step sources'
    estimator, so that one compiled program serves every estimator.
    """
    horizon = None if cfg.oracle == "infinite" else cfg.horizon
    outer_cfg = cfg.outer_config()

    def increment(key, source, theta, eta, lr, count=None, extra=None):
        require(extra is None, "the injected Hessian error is not defined for the mgrl problem")
        gamma, lam = jax.nn.sigmoid(eta[0]), jax.nn.sigmoid(eta[1])

        def exact():
            return expected_step(mdp, theta, gamma, lam, lr, cfg.critic_lr, horizon)

        if source.is_exact:
            return exact()

        def sampled(n=None):
            name = source.estimator if estimator_index is None else estimator_index
            return sampled_step(key, mdp, theta, gamma, lam, lr, cfg.critic_lr, name, source.samples,
                                cfg.horizon, n)

        if count is None:
            return sampled()
        return lax.cond(count > 0, lambda: sampled(jnp.maximum(count, 1)), exact)

    def outer(key, source, theta, eta, count=None):
        return mg.ingredient_objective(key, outer_cfg, source, mdp, theta.x, mdp.R, count)

    return core.MetaProblem(lambda eta: initial_learner(mdp), increment, outer)


def config_hyper(cfg: MGRLConfig) -> Hyper:
    return Hyper(cfg.lr, cfg.steps, 0.0)


def exact_meta_gradient(cfg: MGRLConfig, mdp: tabular.TabularMDP, eta: Array, estimator: str = "exact",
                        hyper: Hyper | None = None) -> Array:
    """dJ_out/dη through K exact expected steps [2] (`core.exact_meta_gradient`)."""
    hyper = config_hyper(cfg) if hyper is None else hyper
    return core.exact_meta_gradient(problem(cfg, mdp), eta, hyper, cfg.steps, estimator)


def estimate_meta_gradient(key: Array, cfg: MGRLConfig, mdp: tabular.TabularMDP, eta: Array,
                           counts: Array | None = None, hyper: Hyper | None = None,
                           estimator_index: Array | None = None) -> Array:
    """One decomposed estimate with the sources (cfg.inner, cfg.hessian, cfg.outer) [2];
    `estimator_index` (traced) replaces the step sources' estimator (see `problem`)."""
    hyper = config_hyper(cfg) if hyper is None else hyper
    return core.meta_gradient(problem(cfg, mdp, estimator_index), cfg.parts, key, eta, hyper, cfg.steps,
                              counts)


def batched_estimates(cfg: MGRLConfig):
    """A jitted f(keys [M, R], mdps (stacked M), etas [M, 2], counts=None, hyper=None,
    estimator_index=None) -> [M, R, 2]."""
    per_mdp = jax.vmap(lambda key, mdp, eta, counts, h, e: estimate_meta_gradient(key, cfg, mdp, eta, counts,
                                                                                   h, e),
                       in_axes=(0, None, None, None, None, None))
    batched = jax.jit(jax.vmap(per_mdp, in_axes=(0, 0, 0, None, None, None)))
    return lambda keys, mdps, etas, counts=None, hyper=None, estimator_index=None: batched(
        keys, mdps, etas, counts, hyper, estimator_index)


def batched_exact(cfg: MGRLConfig, estimator: str = "exact"):
    """A jitted f(mdps (stacked M), etas [M, 2], hyper=None) -> exact meta-gradients [M, 2]."""
    batched = jax.jit(jax.vmap(lambda mdp, eta, h: exact_meta_gradient(cfg, mdp, eta, estimator, h),
                               in_axes=(0, 0, None)))
    return lambda mdps, etas, hyper=None: batched(mdps, etas, hyper)


def estimate_bytes(cfg: MGRLConfig, estimates: int) -> int:
    """A rough upper estimate of the memory of `estimates` vmapped estimates: per sampled (episode,
    step) the T×T box and coefficient matrices and their cotangents (~40 T bytes), plus S·A for
    the per-step score rows."""
    per_step = sum(i.samples or 0 for i in (cfg.inner, cfg.hessian) if not i.is_exact)
    episodes = cfg.steps * per_step + (0 if cfg.outer.is_exact else cfg.outer.samples or 0)
    return (200 + 40 * cfg.horizon) * estimates * episodes * cfg.horizon


def initial_etas(cfg: MGRLConfig, mdps: tabular.TabularMDP) -> Array:
    """η per MDP [M, 2] (float64 under x64) for stacked `mdps`."""
    return jax.vmap(lambda m: initial_eta(cfg, m))(mdps)
