"""Meta-Gradient RL (Xu et al. 2018) on A2C, with the vanilla or the LVC inner policy surrogate.

Meta-parameters η = sigmoid(x), x ∈ R⁴ the meta-logits, η = (γ, λ, c_ent, c_v) (docs/design.md, "MGRL").
One MGRL step, with K inner steps (default 3, the reference's "3-step MGRL"):

    θ_{k+1}, s_{k+1} = θ_k + Opt_{s_k}(clip(∇_θ L_in(θ_k; D_k, η))),   k = 0..K-1
    D_{k+1} ~ π_{θ_{k+1}} (data: no derivative flows through the sampling)
    L_out(η) = −mean Σ_t sg(A'_t) log π_{θ_K}(a_t|s_t)/T [+ c'_v value + c'_ent entropy + c'_kl KL]

on D_K with fixed γ' = 0.99, λ' = 0.95 (the critic gets γ' as input); x ← Adam(∇_x L_out).
The optimiser state s_k flows through the meta-gradient, and D_K serves as D_0 of the next step,
as in the reference. `config.preset` (`gmrl.algos.presets`) chooses Opt and which paths of the
inner update the meta-gradient holds constant: "reference" — Adam with linear decay, the GAE
baseline, the critic's γ input and the clipping norm held (stop-gradient), as the reference code
does; "full" — RMSProp, nothing held: the inner advantages use θ_k itself and ∇_x L_out is the
exact derivative of the computation as run with its sampled data. Either way ∇_x L_out is the
exact derivative of L_out with the held quantities fixed at their values (tested against float64
finite differences, `make_meta_objective(..., frozen=...)`).

`lvc=True` replaces log π by π/sg(π) in the inner policy loss (`gmrl.estimators.lvc`, Rothfuss
et al. 2019): the same inner update value, a Hessian with the extra score outer-product term, i.e. the
lower-bias curvature studied by Liu et al. 2022 (§6, MGRL experiments).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from gmrl.algos import a2c, meta_adam, presets
from gmrl.algos.a2c import A2CConfig, Algorithm, Batch, Coefs, Runner
from gmrl.errors import require

Array = jax.Array

META_PARAMS = ("gamma", "lam", "entropy", "value")
"""Order of the meta-parameters in the meta-logit vector x."""

ALGOS = ("a2c", "mgrl", "mgrl-lvc")


@dataclasses.dataclass(frozen=True)
class MGRLConfig(A2CConfig):
    """A2C hyper-parameters (initial γ, λ, c_ent, c_v) plus the meta-learning ones."""

    inner_steps: int = 3
    meta_lr: float = 1e-3
    outer_gamma: float = 0.99
    outer_lam: float = 0.95
    outer_value_coef: float = 0.0
    outer_entropy_coef: float = 0.0
    outer_kl_coef: float = 0.0
    lvc: bool = False
    meta: bool = True
    """False: plain A2C (the meta-learning fields are ignored)."""
    meta_params: tuple[str, ...] = META_PARAMS
    """Which of META_PARAMS are meta-learned; the others keep their initial value."""
    hold: tuple[str, ...] | None = None
    """Inner-update paths (`presets.HOLDABLE`) held constant in the meta-gradient; None: the
    preset's (all three for "reference", none for "full")."""


def held_paths(config: MGRLConfig) -> tuple[str, ...]:
    """The paths (`presets.HOLDABLE`) this configuration's meta-gradient holds constant."""
    return presets.held_paths(config.preset) if config.hold is None else tuple(config.hold)


def env_and_network(config: A2CConfig):
    """(env, env_params, network) of `config`: the critic's γ input follows the preset and
    whether the algorithm is MGRL (`config.meta`) or plain A2C."""
    meta = getattr(config, "meta", True)
    return a2c.make_env_and_network(config.env_name, presets.critic_input(config.preset, meta))


def meta_logits_init(config: MGRLConfig) -> Array:
    """x₀ = logit of the initial (γ, λ, c_ent, c_v). Shape [4]."""
    eta = jnp.array([config.gamma, config.lam, config.entropy_coef, config.value_coef],
                    jnp.float32)
    return jnp.log(eta) - jnp.log1p(-eta)


def coefs_from_logits(logits: Array) -> Coefs:
    """η = sigmoid(x): [4] -> Coefs(γ, λ, c_ent, c_v)."""
    return Coefs(*jax.nn.sigmoid(logits))


class MGRLState(NamedTuple):
    params: Any
    opt_state: Any
    runner: Runner
    batch: Batch          # D_0 of the next step (the previous outer rollout)
    meta_logits: Array    # [4]
    meta_opt_state: Any
    key: Array


class InnerResult(NamedTuple):
    """Everything the meta-objective computes besides its value (returned as `aux`)."""

    params: Any
    opt_state: Any
    runner: Runner
    batch: Batch
    return_sum: Array
    return_count: Array
    held: Any = None
    """Per inner step, the values of the holdable quantities as used (no derivative): dicts with
    "baseline" [T+1, N], "critic_gamma" [] and "clip_norm" [] (unused outputs cost nothing
    under jit)."""
    entropy: Array | float = 0.0
    """Mean policy entropy of the acting policies over the K rollouts' steps."""


def _validate(config: MGRLConfig) -> None:
    require(config.inner_steps >= 1, f"inner_steps must be >= 1, got {config.inner_steps}")
    unknown = set(config.meta_params) - set(META_PARAMS)
    require(not unknown, f"unknown meta-parameters {sorted(unknown)}; allowed: "
                         f"{', '.join(META_PARAMS)}")
    for name in ("gamma", "lam", "entropy_coef", "value_coef"):
        value = getattr(config, name)
        require(0.0 < value < 1.0, f"{name} must lie in (0, 1) for MGRL (sigmoid-squashed), "
                                   f"got {value}")


def make_meta_objective(config: MGRLConfig, env, env_params, network):
    """outer_loss(x, params, opt_state, runner, batch, key) -> (L_out, InnerResult).

    The MGRL step's forward computation as one function of the meta-logits x ([4]); `jax.grad`
    of it is the meta-gradient (a reference for `make_meta_gradient`, which computes the same
    numbers faster). The outer advantages are stop-gradient values of θ_K's critic; pass
    `baseline_params` (e.g. the θ_K of an unperturbed run) to hold them fixed, and `frozen`
    (a sequence of K dicts, e.g. `InnerResult.held` of an unperturbed run) to replace the held
    quantities of each inner update by given constants: then L_out is an ordinary function of x
    whose derivative is the meta-gradient, which finite differences can check.
    """
    update = _make_update(config, network)

    def outer_loss(meta_logits: Array, params, opt_state, runner: Runner, batch: Batch,
                   key: Array, baseline_params=None, frozen=None):
        params_before = lax.stop_gradient(params)
        return_sum, return_count = jnp.float32(0.0), jnp.int32(0)
        held = []
        for k, step_key in enumerate(jax.random.split(key, config.inner_steps)):  # K small: unrolled
            (params, opt_state), used = update(meta_logits, params, opt_state, batch,
                                               None if frozen is None else frozen[k])
            held.append(used)
            runner, batch, stats = a2c.rollout(env, env_params, network, params, runner,
                                               step_key, config.num_steps)
            return_sum += stats.return_sum
            return_count += stats.return_count
        loss = _outer_objective(network, params, params_before, batch, config, baseline_params)
        return loss, InnerResult(params, opt_state, runner, batch, return_sum, return_count,
                                 tuple(held))

    return outer_loss


def make_meta_gradient(config: MGRLConfig, env, env_params, network):
    """meta_grad(x, params, opt_state, runner, batch, key) -> (L_out, ∇_x L_out, InnerResult).

    Reverse mode by hand: each inner update keeps its pullback (`jax.vjp`) and the rollouts run
    outside autodiff, then the cotangent of θ_K (and of the optimiser state) is pulled back through
    the K updates, accumulating ∇_x. The first update's pullback is taken w.r.t. x only (θ_0 does
    not depend on x). Same numbers as `jax.grad` of `make_meta_objective`, less work.
    """
    update = _make_update(config, network)

    def meta_grad(meta_logits: Array, params, opt_state, runner: Runner, batch: Batch,
                  key: Array):
        params_before = params
        pullbacks, held = [], []
        return_sum, return_count, entropy_sum = jnp.float32(0.0), jnp.int32(0), jnp.float32(0.0)
        for k, step_key in enumerate(jax.random.split(key, config.inner_steps)):
            if k == 0:
                (params, opt_state), pullback, used = jax.vjp(
                    lambda x, p=params, s=opt_state, b=batch: update(x, p, s, b), meta_logits,
                    has_aux=True)
            else:
                (params, opt_state), pullback, used = jax.vjp(
                    lambda x, p, s, b=batch: update(x, p, s, b), meta_logits, params, opt_state,
                    has_aux=True)
            pullbacks.append(pullback)
            held.append(used)
            runner, batch, stats = a2c.rollout(env, env_params, network, params, runner,
                                               step_key, config.num_steps)
            return_sum += stats.return_sum
            return_count += stats.return_count
            entropy_sum += stats.entropy_sum
        loss, params_bar = jax.value_and_grad(
            lambda p: _outer_objective(network, p, params_before, batch, config))(params)
        opt_state_bar = jax.tree.map(_zero_cotangent, opt_state)
        meta_bar = jnp.zeros_like(meta_logits)
        for k in reversed(range(config.inner_steps)):
            if k == 0:
                (x_bar,) = pullbacks[k]((params_bar, opt_state_bar))
            else:
                x_bar, params_bar, opt_state_bar = pullbacks[k]((params_bar, opt_state_bar))
            meta_bar = meta_bar + x_bar
        entropy = entropy_sum / (config.inner_steps * config.num_steps)
        return loss, meta_bar, InnerResult(params, opt_state, runner, batch, return_sum,
                                           return_count, tuple(held), entropy)

    return meta_grad


def _zero_cotangent(leaf: Array):
    """A zero cotangent for `leaf` (float0 for integer leaves such as Adam's step count)."""
    if jnp.issubdtype(leaf.dtype, jnp.inexact):
        return jnp.zeros_like(leaf)
    return np.zeros(leaf.shape, jax.dtypes.float0)


def _make_update(config: MGRLConfig, network):
    """update(x, θ, s, D, frozen=None) -> ((θ', s'), used): one inner A2C step with η = sigmoid(x),
    differentiable, the held paths (`held_paths`) under stop-gradient.

    θ' = θ + Opt_s(g · min(1, c/(‖g‖ + δ))), g = ∇_θ L_in(θ; D, η) with the critic fed γ and the
    advantages built on the baseline V_θ(s_t). `frozen` (a dict, keys among `presets.HOLDABLE`)
    replaces those quantities by given values; `used` gives the values used (no derivative).
    """
    optimizer = presets.base_optimizer(config)
    surrogate = "lvc" if config.lvc else "maml"
    hold = held_paths(config)
    delta = presets.clip_delta(config.preset)

    def update(meta_logits: Array, params, opt_state, batch: Batch, frozen=None):
        frozen = {} if frozen is None else frozen
        coefs = coefs_from_logits(meta_logits)
        gamma_in = lax.stop_gradient(coefs.gamma) if "critic_gamma" in hold else coefs.gamma
        gamma_in = frozen.get("critic_gamma", gamma_in)
        _, grads = a2c.loss_gradient(network, params, batch, coefs, surrogate,
                                     exact_jacobian="baseline" not in hold, critic_gamma=gamma_in,
                                     baseline=frozen.get("baseline"))
        norm = optax.tree.norm(grads)
        norm = frozen.get("clip_norm", lax.stop_gradient(norm) if "clip_norm" in hold else norm)
        updates, opt_state = optimizer.update(
            meta_adam.clip(grads, config.max_grad_norm, norm, delta), opt_state, params)
        baseline = frozen.get("baseline")
        if baseline is None:
            obs_all = jnp.concatenate([batch.obs, batch.last_obs[None]], axis=0)
            baseline = network.apply(lax.stop_gradient(params), obs_all,
                                     lax.stop_gradient(gamma_in))[1]
        used = {"baseline": lax.stop_gradient(baseline),
                "critic_gamma": lax.stop_gradient(gamma_in), "clip_norm": lax.stop_gradient(norm)}
        return (optax.apply_updates(params, updates), opt_state), used

    return update


def _outer_objective(network, params, params_before, batch: Batch, config: MGRLConfig,
                     baseline_params=None) -> Array:
    """Policy-gradient loss at θ_K with stop-gradient advantages (γ', λ'), plus the optional value,
    entropy and KL(π_θ0 ‖ π_θK) terms on the outer batch D_K."""
    outer_coefs = Coefs(jnp.float32(config.outer_gamma), jnp.float32(config.outer_lam),
                        jnp.float32(0.0), jnp.float32(0.0))
    _, aux = a2c.actor_critic_loss(network, params, batch, outer_coefs,
                                   baseline_params=baseline_params)
    loss = aux["pg_loss"]
    if config.outer_value_coef:
        loss = loss + config.outer_value_coef * aux["value_loss"]
    if config.outer_entropy_coef:
        loss = loss - config.outer_entropy_coef * aux["entropy"]
    if config.outer_kl_coef:
        logp_new = jax.nn.log_softmax(network.policy(params, batch.obs), axis=-1)
        logp_old = jax.nn.log_softmax(network.policy(params_before, batch.obs), axis=-1)
        kl = jnp.mean(jnp.sum(jnp.exp(logp_old) * (logp_old - logp_new), axis=-1))
        loss = loss + config.outer_kl_coef * kl
    return loss


def make_mgrl(config: MGRLConfig) -> Algorithm:
    """MGRL (or MGRL-LVC with config.lvc) as an `Algorithm`; each step uses K rollouts."""
    _validate(config)
    env, env_params, network = env_and_network(config)
    optimizer = presets.base_optimizer(config)  # clipping is part of the update (`_make_update`)
    meta_optimizer = optax.adam(config.meta_lr)
    meta_grad_fn = make_meta_gradient(config, env, env_params, network)
    learned = jnp.array([name in config.meta_params for name in META_PARAMS], jnp.float32)

    def init(key: Array) -> MGRLState:
        net_key, env_key, roll_key, key = jax.random.split(key, 4)
        params = network.init(net_key)
        runner = a2c.reset_runner(env, env_params, env_key, config.num_envs)
        runner, batch, _ = a2c.rollout(env, env_params, network, params, runner, roll_key,
                                       config.num_steps)
        meta_logits = meta_logits_init(config)
        return MGRLState(params, optimizer.init(params), runner, batch, meta_logits,
                         meta_optimizer.init(meta_logits), key)

    def step(state: MGRLState):
        key, inner_key = jax.random.split(state.key)
        loss, meta_grad, result = meta_grad_fn(state.meta_logits, state.params, state.opt_state,
                                               state.runner, state.batch, inner_key)
        meta_grad = meta_grad * learned
        updates, meta_opt_state = meta_optimizer.update(meta_grad, state.meta_opt_state)
        meta_logits = optax.apply_updates(state.meta_logits, updates)
        eta = coefs_from_logits(meta_logits)
        metrics = {"return_sum": result.return_sum, "return_count": result.return_count,
                   "gamma": eta.gamma, "lam": eta.lam, "entropy_coef": eta.entropy,
                   "value_coef": eta.value, "loss": loss,
                   "meta_grad_norm": jnp.linalg.norm(meta_grad), "entropy": result.entropy}
        new_state = MGRLState(result.params, result.opt_state, result.runner, result.batch,
                              meta_logits, meta_opt_state, key)
        return new_state, metrics

    frames = config.num_envs * config.num_steps
    return Algorithm(init, step, config.inner_steps * frames, frames)


def make_algorithm(algo: str, env_name: str, **overrides) -> Algorithm:
    """`algo` ∈ ALGOS on `env_name`; `overrides` are MGRLConfig fields (A2C ignores meta ones).

    The same settings give the same Algorithm object, so compiled chunks are reused (resume, tests).
    """
    require(algo in ALGOS, f"unknown algorithm {algo!r}; allowed: {', '.join(ALGOS)}")
    return _algorithm_for(make_config(algo, env_name, **overrides))


@functools.lru_cache(maxsize=32)
def _algorithm_for(config: MGRLConfig) -> Algorithm:
    return make_mgrl(config) if config.meta else a2c.make_a2c(config)


def make_config(algo: str, env_name: str, **overrides) -> MGRLConfig:
    fields = {f.name for f in dataclasses.fields(MGRLConfig)}
    unknown = set(overrides) - fields
    require(not unknown, f"unknown settings {sorted(unknown)}; allowed: {', '.join(sorted(fields))}")
    config = MGRLConfig(env_name=env_name, lvc=(algo == "mgrl-lvc"), meta=(algo != "a2c"),
                        **overrides)
    presets.check(config.preset)
    unknown = set(config.hold or ()) - set(presets.HOLDABLE)
    require(not unknown, f"unknown held paths {sorted(unknown)}; allowed: "
                         f"{', '.join(presets.HOLDABLE)}")
    require(config.total_updates >= 0, f"total_updates must be >= 0, got {config.total_updates}")
    require(config.num_envs >= 1 and config.num_steps >= 1,
            f"num_envs and num_steps must be >= 1, got {config.num_envs} and {config.num_steps}")
    require(config.learning_rate >= 0 and config.meta_lr >= 0,
            f"learning rates must be >= 0, got {config.learning_rate} and {config.meta_lr}")
    return config
