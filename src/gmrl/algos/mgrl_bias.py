"""How biased is MGRL's meta-gradient? Single estimates against costlier, less biased references.

MGRL (Xu et al. 2018; `gmrl.algos.mgrl`) has no exact oracle. At one saved state (θ_0, the
RMSProp state, the env states, D_0 and the meta-logits x) this module draws R independent single
meta-gradients ĝ_r = ∇_x L_out (the run's computation, a fresh rollout key each) and compares them
with two references of the same quantity (Liu et al. 2022, §4 and §6; docs/design.md, "The
decomposed estimate"):

- **large-batch**: the same estimator with M × N parallel environments (the saved env states
  tiled M times), averaged over P independent keys. The inner steps θ_{k+1} = U(θ_k, ĝ_k) then
  use nearly noiseless gradients, which removes the *compositional* bias E[f(θ̂_K)] ≠ f(θ_K); it
  keeps the surrogate's *Hessian* bias (vanilla log-prob PG drops the score outer product).
- **dice**: inner steps k ≥ 1 whose gradient carries a magic-box weight per environment
  (Foerster et al. 2018b), ĝ_k = mean_n □(log p(τ_n | θ_k)) ∇_θ L_n(θ_k), so that the step's
  Jacobian in θ_k is the unbiased E[∂ĝ/∂θ] + E[ĝ ∇_θ log p(τ)ᵀ], i.e. the Jacobian of the expected
  inner gradient (every score term: cross-time, value loss and entropy). D_0 needs no weight
  (θ_0 does not depend on x), and neither does the outer batch D_K: the outer loss is only
  differentiated once, and its gradient is already the score-function estimate. Run at a large
  batch it removes both biases, up to what is not differentiated: how the env states at the start
  of D_{k+1} depend on θ_k (each inner step sees its start states as given, as in the paper's
  framework where each inner step samples afresh).

Figures per (estimator, reference): the cosine of single ĝ_r to g_ref, the relative bias
‖mean ĝ − g_ref‖/‖g_ref‖ with a bootstrap CI over repeats *and* reference parts (the reference's
own noise), its noise floor and a debiased value, per-coordinate z-scores of mean ĝ − g_ref
against the combined standard error, and per-coordinate signal-to-noise |mean ĝ|/std ĝ.
Everything is a pure function of explicit PRNG keys; draws are `lax.map`ped under one `jax.jit`.
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

from gmrl.algos import a2c, meta_adam, mgrl, presets
from gmrl.algos.a2c import Batch, Runner
from gmrl.errors import require

Array = jax.Array

ESTIMATORS = ("mgrl", "mgrl-lvc")
"""The estimators compared: vanilla log-prob inner surrogate (mgrl) and LVC (mgrl-lvc)."""


class BiasSettings(NamedTuple):
    """Sizes of one diagnosis. repeats R single draws; reference parts P of ref_multiplier × N
    envs each (large-batch) and dice_multiplier × N envs each (dice; 0 = no dice reference)."""

    repeats: int = 32
    ref_multiplier: int = 64
    ref_parts: int = 4
    dice_multiplier: int = 16
    bootstrap: int = 2000


def estimator_config(config: mgrl.MGRLConfig, estimator: str, inner_steps: int | None = None,
                     learning_rate: float | None = None) -> mgrl.MGRLConfig:
    """The run's config with the estimator's inner surrogate and the levers K and α replaced."""
    require(estimator in ESTIMATORS, f"unknown estimator {estimator!r}; allowed: "
                                     f"{', '.join(ESTIMATORS)}")
    changes: dict[str, Any] = {"lvc": estimator == "mgrl-lvc", "meta": True}
    if inner_steps is not None:
        require(inner_steps >= 1, f"--inner-steps must be >= 1, got {inner_steps}")
        changes["inner_steps"] = int(inner_steps)
    if learning_rate is not None:  # a constant inner learning rate: no decay schedule
        require(learning_rate > 0, f"--inner-lr must be > 0, got {learning_rate}")
        changes["learning_rate"] = float(learning_rate)
        changes["total_updates"] = 0
    return dataclasses.replace(config, **changes)


def inner_lr_at(config: mgrl.MGRLConfig, opt_state) -> float:
    """The inner learning rate the next inner update of `opt_state` uses: the `reference`
    preset's linear decay α₀ max(0, 1 − n/N) at its update count n (else config.learning_rate)."""
    if isinstance(opt_state, meta_adam.AdamState) and config.total_updates > 0:
        count = int(np.asarray(opt_state.count))
        return float(config.learning_rate * max(0.0, 1.0 - count / config.total_updates))
    return float(config.learning_rate)


def tile_runner(runner: Runner, multiplier: int) -> Runner:
    """The N saved env states repeated `multiplier` times: leaves [N, ...] -> [multiplier·N, ...]."""
    return jax.tree.map(lambda v: jnp.concatenate([v] * multiplier, axis=0), runner)


# --------------------------------------------------------------------------- DiCE inner step

def per_env_losses(network, params, batch: Batch, coefs: a2c.Coefs) -> Array:
    """[N] A2C losses of each environment's trajectory alone; their mean is
    `a2c.actor_critic_loss` of the batch (every term is a mean over envs)."""
    def one(obs, actions, rewards, dones, last_obs):
        single = Batch(obs[:, None], actions[:, None], rewards[:, None], dones[:, None],
                       last_obs[None])
        return a2c.actor_critic_loss(network, params, single, coefs)[0]

    return jax.vmap(one, in_axes=(1, 1, 1, 1, 0))(*batch)


def trajectory_log_probs(network, params, batch: Batch) -> Array:
    """log p(τ_n | θ) up to the θ-free transition terms: Σ_t log π_θ(a_tn | s_tn). [N]"""
    log_probs = jax.nn.log_softmax(network.policy(params, batch.obs), axis=-1)  # [T, N, A]
    chosen = jnp.take_along_axis(log_probs, batch.actions[..., None], axis=-1)[..., 0]
    return jnp.sum(chosen, axis=0)


def score_term(network, params, batch: Batch, coefs: a2c.Coefs):
    """Zero in value; its Jacobian in θ is mean_n ∇_θ L_n ⊗ ∇_θ log p(τ_n | θ), the score-function
    part of the Jacobian of the expected inner gradient (DiCE, Foerster et al. 2018b).

    Written as ∇_{θ'} Σ_n L_n(θ') δ_n / N at θ' = sg(θ), δ_n = log p_n − sg(log p_n): no per-env
    gradients are stored; its reverse-mode derivative is one forward-mode pass over the losses.
    """
    log_p = trajectory_log_probs(network, params, batch)
    delta = log_p - lax.stop_gradient(log_p)
    fixed_coefs = jax.tree.map(lax.stop_gradient, coefs)  # its x-derivative is δ·(...) = 0

    def weighted(p):
        return jnp.sum(per_env_losses(network, p, batch, fixed_coefs) * delta) / delta.shape[0]

    return jax.grad(weighted)(lax.stop_gradient(params))


def dice_gradient(network, params, batch: Batch, coefs: a2c.Coefs):
    """∇_θ L of the A2C loss (exact Jacobian, vanilla surrogate) plus `score_term`: the value of
    MGRL's inner gradient, the Jacobian of its expectation. Pytree like params."""
    _, grads = a2c.loss_gradient(network, params, batch, coefs, "maml", exact_jacobian=True)
    return jax.tree.map(jnp.add, grads, score_term(network, params, batch, coefs))


def inner_step(config: mgrl.MGRLConfig, grads, opt_state, params):
    """θ' = θ + Opt_s(g · min(1, c/(‖g‖ + δ))): the value of MGRL's inner step from a gradient g
    (`gmrl.algos.presets`: the preset's optimiser and clipping), every path differentiable.
    Returns (θ', s')."""
    norm = optax.global_norm(grads)
    clipped = meta_adam.clip(grads, config.max_grad_norm, norm, presets.clip_delta(config.preset))
    updates, opt_state = presets.base_optimizer(config).update(clipped, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def make_dice_meta_objective(config: mgrl.MGRLConfig, env, env_params, network):
    """outer_loss(x, params, opt_state, runner, batch, key) -> (L_out, mgrl.InnerResult), the
    MGRL forward computation (same data, same values as `mgrl.make_meta_objective`) with DiCE
    inner steps k ≥ 1 and no path held constant; `jax.grad` of it is the DiCE meta-gradient.
    `outer_loss.update(x, θ, s, D, dice)` is its inner step."""

    def update(meta_logits, params, opt_state, batch, dice):
        coefs = mgrl.coefs_from_logits(meta_logits)
        if dice:
            grads = dice_gradient(network, params, batch, coefs)
        else:
            grads = a2c.loss_gradient(network, params, batch, coefs, "maml",
                                      exact_jacobian=True)[1]
        return inner_step(config, grads, opt_state, params)

    def outer_loss(meta_logits, params, opt_state, runner: Runner, batch: Batch, key: Array):
        params_before = lax.stop_gradient(params)
        return_sum, return_count = jnp.float32(0.0), jnp.int32(0)
        for k, step_key in enumerate(jax.random.split(key, config.inner_steps)):
            params, opt_state = update(meta_logits, params, opt_state, batch, dice=k > 0)
            runner, batch, stats = a2c.rollout(env, env_params, network, params, runner,
                                               step_key, config.num_steps)
            return_sum += stats.return_sum
            return_count += stats.return_count
        loss = mgrl._outer_objective(network, params, params_before, batch, config)
        return loss, mgrl.InnerResult(params, opt_state, runner, batch, return_sum, return_count)

    outer_loss.update = update
    return outer_loss


def make_dice_meta_gradient(config: mgrl.MGRLConfig, env, env_params, network):
    """meta_grad(x, params, opt_state, runner, batch, key) -> (L_out, ∇_x L_out, InnerResult),
    the signature of `mgrl.make_meta_gradient`, with DiCE inner steps."""
    objective = make_dice_meta_objective(config, env, env_params, network)

    def meta_grad(meta_logits, params, opt_state, runner, batch, key):
        (loss, result), grad = jax.value_and_grad(objective, has_aux=True)(
            meta_logits, params, opt_state, runner, batch, key)
        return loss, grad, result

    return meta_grad


def dice_update_matches(config: mgrl.MGRLConfig, env, env_params, network, state,
                        key: Array) -> float:
    """Largest relative difference between θ_1 of the DiCE update and of MGRL's own update
    (`mgrl.make_meta_gradient` with K = 1) at `state`: ~1e-7 when the DiCE reference computes the
    same inner step as the run (a changed MGRL update shows up here)."""
    one = dataclasses.replace(config, inner_steps=1, lvc=False)
    theirs = mgrl.make_meta_gradient(one, env, env_params, network)(
        state.meta_logits, state.params, state.opt_state, state.runner, state.batch, key)[2].params
    mine = make_dice_meta_objective(one, env, env_params, network).update(
        state.meta_logits, state.params, state.opt_state, state.batch, dice=True)[0]
    a, b = (jnp.concatenate([jnp.ravel(v) for v in jax.tree.leaves(t)]) for t in (theirs, mine))
    return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(a)), 1e-30))


# --------------------------------------------------------------------------- draws

def draw_meta_gradients(meta_grad_fn, state, keys: Array, runner: Runner | None = None,
                        batch_size: int = 1) -> Array:
    """∇_x L_out at `state` (an `mgrl.MGRLState` of one seed) for each key: [R] keys -> [R, 4].

    `runner` replaces the state's env states (e.g. `tile_runner` for a large batch); draws run
    `batch_size` at a time (`lax.map`), which bounds memory."""
    runner = state.runner if runner is None else runner

    def one(key):
        return meta_grad_fn(state.meta_logits, state.params, state.opt_state, runner,
                            state.batch, key)[1]

    return lax.map(one, keys, batch_size=batch_size)


@functools.lru_cache(maxsize=16)
def _compiled_draws(config: mgrl.MGRLConfig, dice: bool, multiplier: int, batch_size: int):
    env, env_params, network = mgrl.env_and_network(config)
    make = make_dice_meta_gradient if dice else mgrl.make_meta_gradient
    meta_grad_fn = make(config, env, env_params, network)

    def run(state, keys):
        runner = tile_runner(state.runner, multiplier) if multiplier > 1 else state.runner
        return draw_meta_gradients(meta_grad_fn, state, keys, runner, batch_size)

    return jax.jit(run)


# --------------------------------------------------------------------------- statistics

def compare(estimates, reference_parts, key: int = 0, bootstrap: int = 2000) -> dict[str, Any]:
    """Figures of R single estimates [R, d] against a reference given as P independent parts
    [P, d] (g_ref = their mean). Bootstrap: repeats and parts resampled independently.

    - cosine: mean_r cos(ĝ_r, g_ref), with a bootstrap 95% CI;
    - rel_bias: ‖ḡ − g_ref‖/‖g_ref‖ (plug-in) with a bootstrap 95% CI; noise_floor: what it would
      be on average with no bias, sqrt(tr Cov_ĝ/R + tr Cov_ref/P)/‖g_ref‖; rel_bias_debiased:
      sqrt(max(0, ‖ḡ − g_ref‖² − tr Cov_ĝ/R − tr Cov_ref/P))/‖g_ref‖;
    - z: per coordinate (ḡ_i − g_ref,i)/sqrt(var_ĝ,i/R + var_ref,i/P) (ddof 1; needs R, P ≥ 2);
    - snr: |ḡ_i|/std_ĝ,i, and snr_ref of the reference parts.
    """
    est = np.asarray(estimates, np.float64)
    ref = np.asarray(reference_parts, np.float64)
    require(est.ndim == 2 and ref.ndim == 2 and est.shape[1] == ref.shape[1],
            f"estimates [R, d] and reference parts [P, d] needed, got {est.shape} and {ref.shape}")
    num_repeats, num_parts = est.shape[0], ref.shape[0]
    require(num_repeats >= 2 and num_parts >= 2,
            f"need at least 2 repeats and 2 reference parts, got {num_repeats} and {num_parts}")
    require(bool(np.all(np.isfinite(est)) and np.all(np.isfinite(ref))),
            "meta-gradient estimates contain NaN or infinity")

    def stats_of(e, r):
        g_ref = r.mean(0)
        norm = np.linalg.norm(g_ref)
        cos = (e @ g_ref) / np.maximum(np.linalg.norm(e, axis=1) * norm, 1e-300)
        return float(cos.mean()), float(np.linalg.norm(e.mean(0) - g_ref) / max(norm, 1e-300))

    cosine, rel_bias = stats_of(est, ref)
    rng = np.random.default_rng(key)
    boot = np.array([stats_of(est[rng.integers(0, num_repeats, num_repeats)],
                              ref[rng.integers(0, num_parts, num_parts)])
                     for _ in range(bootstrap)])
    g_ref = ref.mean(0)
    var_e, var_r = est.var(0, ddof=1), ref.var(0, ddof=1)
    noise2 = var_e.sum() / num_repeats + var_r.sum() / num_parts
    gap2 = float(np.sum((est.mean(0) - g_ref) ** 2))
    norm = max(float(np.linalg.norm(g_ref)), 1e-300)
    se = np.sqrt(var_e / num_repeats + var_r / num_parts)
    return {
        "cosine": cosine, "cosine_ci": [float(v) for v in np.percentile(boot[:, 0], [2.5, 97.5])],
        "rel_bias": rel_bias,
        "rel_bias_ci": [float(v) for v in np.percentile(boot[:, 1], [2.5, 97.5])],
        "noise_floor": float(np.sqrt(noise2) / norm),
        "rel_bias_debiased": float(np.sqrt(max(0.0, gap2 - noise2)) / norm),
        "z": [float(v) for v in (est.mean(0) - g_ref) / np.where(se > 0, se, np.nan)],
        "snr": [float(v) for v in np.abs(est.mean(0)) / np.where(var_e > 0, np.sqrt(var_e), np.nan)],
        "snr_ref": [float(v) for v in np.abs(g_ref) / np.where(var_r > 0, np.sqrt(var_r), np.nan)],
        "repeats": int(num_repeats), "parts": int(num_parts),
    }


def paired_difference(a, b) -> dict[str, Any]:
    """Draw-by-draw difference of two estimators on the same keys ([R, d] each): the largest
    |a_r − b_r| relative to max |a|, and per-coordinate z of the mean difference."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    diff = a - b
    sd = diff.std(0, ddof=1) / np.sqrt(diff.shape[0])
    scale = max(float(np.abs(a).max()), 1e-300)
    return {"max_abs_diff": float(np.abs(diff).max()),
            "max_rel_diff": float(np.abs(diff).max() / scale),
            "mean_diff": [float(v) for v in diff.mean(0)],
            "z": [float(v) for v in np.where(sd > 0, diff.mean(0) / np.where(sd > 0, sd, 1), 0.0)]}


# --------------------------------------------------------------------------- diagnosis

def diagnose(config: mgrl.MGRLConfig, state, key: Array, settings: BiasSettings | None = None,
             estimators: tuple[str, ...] = ESTIMATORS, inner_steps: int | None = None,
             learning_rate: float | None = None, env_model=None) -> dict[str, Any]:
    """The bias report at one MGRL state of one seed (see the module docstring). JSON-able dict.

    Every estimator draws its R single meta-gradients from the same R keys (paired). The
    large-batch reference of an estimator and the dice reference use P further keys each.
    `env_model` = (env, env_params, network) overrides `config.env_name` (tests: a tiny env).
    Levers: `inner_steps` (K) and `learning_rate` (the inner α) replace the run's values.
    """
    settings = BiasSettings() if settings is None else settings
    for name, value, low in (("repeats", settings.repeats, 2), ("ref-parts", settings.ref_parts, 2),
                             ("ref-multiplier", settings.ref_multiplier, 1),
                             ("dice-multiplier", settings.dice_multiplier, 0),
                             ("bootstrap", settings.bootstrap, 1)):
        require(value >= low, f"--{name} must be >= {low}, got {value}")
    require(len(estimators) >= 1 and not set(estimators) - set(ESTIMATORS),
            f"estimators must be among {', '.join(ESTIMATORS)}, got {', '.join(estimators)}")
    configs = {e: estimator_config(config, e, inner_steps, learning_rate) for e in estimators}
    base = estimator_config(config, "mgrl", inner_steps, learning_rate)
    require(inner_lr_at(base, state.opt_state) > 0,
            "the inner learning rate is 0 at this state (the preset's linear decay has reached the "
            "end of the run), so the meta-gradient is 0; give --inner-lr A (a constant rate) or "
            "--initial")
    single_key, ref_key, dice_key, check_key = jax.random.split(key, 4)
    keys = jax.random.split(single_key, settings.repeats)
    ref_keys = jax.random.split(ref_key, settings.ref_parts)
    dice_keys = jax.random.split(dice_key, settings.ref_parts)

    compiled = {}

    def draws(cfg, dice, multiplier, ks):
        if env_model is None:
            fn = _compiled_draws(cfg, dice, multiplier, 1)
        elif (cfg, dice, multiplier) in compiled:
            fn = compiled[cfg, dice, multiplier]
        else:
            env, env_params, network = env_model
            make = make_dice_meta_gradient if dice else mgrl.make_meta_gradient
            meta_grad_fn = make(cfg, env, env_params, network)
            fn = compiled[cfg, dice, multiplier] = jax.jit(lambda s, k: draw_meta_gradients(
                meta_grad_fn, s, k, tile_runner(s.runner, multiplier), 1))
        return np.asarray(fn(state, ks), np.float64)

    singles = {e: draws(cfg, False, 1, keys) for e, cfg in configs.items()}
    references = {f"large-batch {e}": draws(cfg, False, settings.ref_multiplier, ref_keys)
                  for e, cfg in configs.items()}
    dice_check = None
    if settings.dice_multiplier:
        env, env_params, network = env_model or mgrl.env_and_network(config)
        dice_check = dice_update_matches(base, env, env_params, network, state, check_key)
        require(dice_check < 1e-4, "the DiCE reference does not reproduce this configuration's "
                f"inner update (relative difference {dice_check:.2g}); run without it "
                "(--dice-multiplier 0)")
        references["dice"] = draws(base, True, settings.dice_multiplier, dice_keys)

    comparisons = []
    for e in estimators:
        for ref_name, parts in references.items():
            if ref_name.startswith("large-batch") and ref_name != f"large-batch {e}":
                continue
            comparisons.append({"estimator": e, "reference": ref_name,
                                **compare(singles[e], parts, bootstrap=settings.bootstrap)})
    if "dice" in references:  # the Hessian bias alone: large batch against large-batch DiCE
        for e in estimators:
            comparisons.append({"estimator": f"large-batch {e}", "reference": "dice",
                                **compare(references[f"large-batch {e}"], references["dice"],
                                          bootstrap=settings.bootstrap)})
    first = configs[estimators[0]]
    eta = mgrl.coefs_from_logits(state.meta_logits)
    return {
        "settings": {"env": first.env_name, "inner_steps": first.inner_steps,
                     "inner_lr": inner_lr_at(first, state.opt_state),
                     "inner_lr_schedule": {"initial": first.learning_rate,
                                           "total_updates": first.total_updates},
                     "num_envs": int(state.runner.obs.shape[0]),
                     "num_steps": first.num_steps, **settings._asdict(),
                     "estimators": list(estimators), "meta_params": list(mgrl.META_PARAMS),
                     "learned": list(config.meta_params),
                     "eta": [float(v) for v in eta], "dice_update_check": dice_check},
        "singles": {e: {"mean": v.mean(0).tolist(), "std": v.std(0, ddof=1).tolist(),
                        "draws": v.tolist()} for e, v in singles.items()},
        "references": {name: {"mean": v.mean(0).tolist(), "parts": v.tolist()}
                       for name, v in references.items()},
        "comparisons": comparisons,
        "paired": (paired_difference(singles["mgrl"], singles["mgrl-lvc"])
                   if {"mgrl", "mgrl-lvc"} <= set(estimators) else None),
    }


def report_title(algo: str, env: str, where: str, seed_index: int) -> str:
    """bias.md's title for the diagnostic of run seed `seed_index` at `where` (e.g. "checkpoint")."""
    return f"MGRL meta-gradient bias: {algo} run on {env} ({where}, seed {seed_index})"


def report_markdown(result: dict[str, Any], title: str = "MGRL meta-gradient bias") -> str:
    """bias.md: one table row per (estimator, reference) comparison, and the paired difference."""
    s = result["settings"]
    names = s["meta_params"]
    lines = [f"# {title}", "",
             f"{s['env']}, K = {s['inner_steps']}, inner lr {s['inner_lr']:.3g} at this state, "
             f"{s['num_envs']} envs × {s['num_steps']} steps; η = "
             + ", ".join(f"{n} {v:.4g}" for n, v in zip(names, s["eta"], strict=True)) + ".",
             f"{s['repeats']} single draws per estimator (same keys); references: "
             f"{s['ref_parts']} parts of {s['ref_multiplier']}× envs (large-batch)"
             + (f", {s['ref_parts']} parts of {s['dice_multiplier']}× envs (dice)"
                if s["dice_multiplier"] else "") + ". CIs: 95% bootstrap over draws and parts.", "",
             "| estimator | reference | cosine [CI] | rel. bias [CI] | noise floor | debiased | "
             "z (" + ", ".join(names) + ") | SNR (" + ", ".join(names) + ") |",
             "|---|---|---|---|---|---|---|---|"]
    for c in result["comparisons"]:
        lines.append(
            f"| {c['estimator']} | {c['reference']} | {c['cosine']:.3f} "
            f"[{c['cosine_ci'][0]:.3f}, {c['cosine_ci'][1]:.3f}] | {c['rel_bias']:.3f} "
            f"[{c['rel_bias_ci'][0]:.3f}, {c['rel_bias_ci'][1]:.3f}] | {c['noise_floor']:.3f} | "
            f"{c['rel_bias_debiased']:.3f} | " + ", ".join(f"{v:.1f}" for v in c["z"]) + " | "
            + ", ".join(f"{v:.2f}" for v in c["snr"]) + " |")
    paired = result.get("paired")
    if paired:
        lines += ["", f"mgrl − mgrl-lvc on the same keys: max |difference| "
                      f"{paired['max_abs_diff']:.3g} ({paired['max_rel_diff']:.2g} of max |ĝ|), "
                      "z of the mean difference " + ", ".join(f"{v:.1f}" for v in paired["z"])
                  + " (zero at K = 1, where both surrogates give the same meta-gradient)."]
    lines.append("")
    return "\n".join(lines)
