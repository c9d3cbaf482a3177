"""The reference tabular studies (Liu, Feng et al. 2022, §5) as data, and the functions that compute them.

A study is a list of grids (`study_grids(name, quick, oracle, seed)`); a point is a plain JSON config:

  estimator  the surrogate every ingredient uses (dice, loaded, lvc, maml; `exact` for hessian-bias)
  code       inner-hessian-outer letters (docs/design.md): e = exact expectation of that
             estimator, l = `samples` sampled trajectories
  samples    trajectories per sampled ingredient; capacity: the padded size compiled for it
  steps K ≤ max_steps (the compiled loop length), lr α, problem (maml | lirpg), oracle (infinite |
  finite), hessian_error c, gae_lambda λ, theta0 (zeros | normal | an [S, A] table as nested lists),
  mdps M, repeats R, states S, actions A, gamma γ, horizon T, noise, seed

`batch_points(configs)` computes a group of points that share one compiled program (all fields but
`samples`, `code`, `lr`, `steps` and the value of `hessian_error`, which are traced),
`compute_point(config)` one point; both are module-level so Ray workers can import them. Every
point's random numbers depend only on its own config (the sample size selects the first `samples`
of `capacity` trajectories; step k's key does not depend on max_steps), so the numbers do not
depend on grouping or backend.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gmrl import core, stats
from gmrl import metagrad as mg
from gmrl.errors import require
from gmrl.evaluate import oracle_estimator, problem_set
from gmrl.sweep import Grid

CODES = ("lee", "ele", "eel", "lle", "lel", "ell", "lll")
ESTIMATORS = ("dice", "loaded", "lvc", "maml")
SAMPLE_SIZES = (2, 4, 8, 16, 32, 64, 128, 256)
LRS = (1.0, 3.0, 5.0, 7.0, 9.0, 11.0, 13.0)
STEPS = (1, 2, 3, 4, 5, 6)
STUDIES = ("decompose", "lr", "steps", "comp-lr", "comp-samples", "comp-steps", "hessian-bias",
           "lirpg")
# Which config field each study sweeps along its figure's x axis, and which one names its lines.
X_AXIS = {"decompose": "samples", "lr": "lr", "steps": "steps", "comp-lr": "lr",
          "comp-samples": "samples", "comp-steps": "steps", "hessian-bias": "steps",
          "lirpg": "samples"}
LINES = {"decompose": "code", "lr": "code", "steps": "code", "comp-lr": "estimator",
         "comp-samples": "estimator", "comp-steps": "estimator", "hessian-bias": "hessian_error",
         "lirpg": "estimator"}
PANELS = {"decompose": "estimator", "hessian-bias": "lr", "lirpg": "steps"}
COMP_STUDIES = ("comp-lr", "comp-samples", "comp-steps")


def base_config(name: str, quick: bool, oracle: str, seed: int) -> dict[str, Any]:
    """Reference defaults (10 MDPs, S=20, A=5, γ=0.8, T=20, α=10, K=1, noise 1); REPEATS per MDP.

    --quick keeps 10 MDPs but takes 50 repeats (cheap once compiled) and trims the axes instead,
    so that its findings are statistically significant while compiling few programs.
    """
    return {"study": name, "problem": "maml", "estimator": "maml", "code": "lee", "samples": 32,
            "capacity": 32, "steps": 1, "lr": 10.0, "oracle": oracle, "hessian_error": 0.0,
            "gae_lambda": 1.0, "mdps": 10, "repeats": 50 if quick else REPEATS[name], "states": 20,
            "actions": 5, "gamma": 0.8, "horizon": 20, "noise": 1.0, "seed": seed,
            "theta0": "zeros", "max_steps": 1, "critic_gradient": True}


# The compiled loop length K_max of each study: studies that share (estimator, capacity, K_max) and
# the other program fields share compiled programs (numbers do not depend on K_max).
MAX_STEPS = {"decompose": 2, "comp-samples": 2, "lr": 6, "steps": 6, "comp-lr": 6, "comp-steps": 6,
             "hessian-bias": 3, "lirpg": 5}
# Repeats per MDP at full scale: the reference's 20 where that decides the study's findings, more
# where the bias is small against its noise (see docs/studies.md, "Repeats").
REPEATS = {"decompose": 20, "lr": 20, "steps": 20, "comp-lr": 60, "comp-samples": 60,
           "comp-steps": 400, "hessian-bias": 20, "lirpg": 40}


def study_grids(name: str, quick: bool = False, oracle: str = "infinite", seed: int = 0,
                theta0: str | list = "zeros", estimators: Sequence[str] | None = None) -> list[Grid]:
    """The grids of study `name` (the reference study's grids). --quick trims axes.

    `estimators` replaces the estimator axis of the studies that sweep one (any name of
    `gmrl.estimators.SAMPLED_ESTIMATORS`, registered surrogates included). `max_steps`
    (MAX_STEPS) is at least the largest K a grid sweeps, so that one program per estimator serves it.
    """
    from gmrl import estimators as est

    require(name in STUDIES, f"unknown study {name!r}; allowed: {', '.join(STUDIES)}")
    base = {**base_config(name, quick, oracle, seed), "theta0": theta0}
    grids = _grids(name, quick, base)
    if estimators:
        allowed = est.SAMPLED_ESTIMATORS
        unknown = [e for e in estimators if e not in allowed]
        require(not unknown, f"unknown estimator(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
        grids = [Grid(g.base, {**g.axes, "estimator": list(estimators)}) if "estimator" in g.axes else g
                 for g in grids]
    for g in grids:
        largest = max(g.axes.get("steps", [g.base["steps"]]))
        g.base["max_steps"] = max(largest, MAX_STEPS[name])
    return grids


def _grids(name: str, quick: bool, base: dict[str, Any]) -> list[Grid]:
    if name == "decompose":
        sizes = (2, 8, 32, 128) if quick else SAMPLE_SIZES
        codes = ("lee", "ele") if quick else CODES + ("eee",)
        return [Grid({**base, "capacity": max(sizes)},
                     {"estimator": list(ESTIMATORS), "code": list(codes),
                      "samples": list(sizes)})]
    if name in ("lr", "steps"):
        axis = {"lr": list((1.0, 13.0) if quick else LRS),
                "steps": list((1, 6) if quick else STEPS)}[name]
        fixed = {"steps": 5} if name == "lr" else {}
        if quick:  # the ends of the axis only, with 200 repeats: heavy tails at large α^K
            fixed["repeats"] = 200
        codes = ("lee", "ele") if quick else CODES
        return [Grid({**base, **fixed}, {"code": list(codes), name: axis})]
    comp = {**base, "code": "lee"}
    if name == "comp-lr":
        return [Grid({**comp, "steps": 6},
                     {"estimator": list(ESTIMATORS), "lr": list((1.0, 7.0, 13.0) if quick else LRS)})]
    if name == "comp-samples":
        sizes = (2, 16, 128) if quick else SAMPLE_SIZES
        return [Grid({**comp, "steps": 2, "lr": 3.0, "capacity": max(sizes)},
                     {"estimator": list(ESTIMATORS), "samples": list(sizes)})]
    if name == "comp-steps":
        return [Grid({**comp, "lr": 3.0},
                     {"estimator": list(ESTIMATORS), "steps": list((1, 3, 6) if quick else STEPS)})]
    if name == "hessian-bias":
        errors = (0.5, 4.0) if quick else tuple(0.5 * i for i in range(1, 9))
        return [Grid({**base, "estimator": "exact", "code": "eee", "steps": 2},
                     {"lr": list((3.0, 4.5) if quick else (3.0, 3.5, 4.0, 4.5)),
                      "hessian_error": list(errors), "steps": [1, 2, 3]})]
    sizes = (16, 64, 256) if quick else (16, 32, 64, 128, 256)
    return [Grid({**base, "problem": "lirpg", "code": "ele", "gae_lambda": 0.9,
                  "capacity": max(sizes)},
                 {"estimator": ["maml", "lvc"], "steps": list((1, 3, 5) if quick else range(1, 6)),
                  "samples": list(sizes)})]


def study_points(name: str, quick: bool = False, oracle: str = "infinite", seed: int = 0,
                 overrides: Mapping[str, Any] | None = None, max_groups: int | None = None,
                 theta0: str | list = "zeros",
                 estimators: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Every point of study `name`, in a stable order.

    For tests and smoke runs: `overrides` replaces config fields (e.g. mdps, repeats) in every
    point, and `max_groups` keeps only the points of the first N compiled programs (`group_key`).
    """
    from gmrl.sweep import expand

    require(max_groups is None or max_groups >= 1, f"max_groups must be ≥ 1, got {max_groups}")
    points = [{**p, **(overrides or {})}
              for grid in study_grids(name, quick, oracle, seed, theta0, estimators)
              for p in expand(grid)]
    if max_groups is None:
        return points
    kept = list(dict.fromkeys(group_key(p) for p in points))[:max_groups]
    return [p for p in points if group_key(p) in kept]


TRACED = ("samples", "code", "lr", "steps", "hessian_error")
"""Point fields that are traced inputs of the compiled program rather than part of it."""


def metagrad_config(config: Mapping[str, Any]) -> mg.MetaGradConfig:
    """The MetaGradConfig of a point's compiled program: every ingredient sampled at the padded
    `capacity`, `max_steps` loop steps, placeholder α = 1 and c = 1 when the point injects an error;
    `counts` (0 = exact) and `hyper` turn it into the point's own code, size, α, K and c."""
    letters = config["code"]
    require(len(letters) == 3 and set(letters) <= {"e", "l"},
            f"a code is 3 letters from e, l (inner-hessian-outer), got {letters!r}")
    require(1 <= config["steps"] <= config["max_steps"],
            f"steps must be in 1..max_steps ({config['max_steps']}), got {config['steps']}")
    ingredients = [mg.Source(config["estimator"], config["capacity"])] * 3
    return mg.MetaGradConfig(
        problem=config["problem"], steps=int(config["max_steps"]), lr=1.0,
        horizon=int(config["horizon"]), noise=float(config["noise"]), inner=ingredients[0],
        hessian=ingredients[1], outer=ingredients[2], oracle=config["oracle"],
        gae_lambda=float(config["gae_lambda"]), hessian_error=1.0 if config["hessian_error"] else 0.0,
        critic_gradient=bool(config["critic_gradient"]))


SAME_INNER_GRADIENT = ("loaded", "lvc", "maml")
"""On-policy, these three have the same gradient Σ_t γ^t A_t ∇log π_t and the same critic, so the
code lee (only the inner gradient sampled) computes the same numbers for all three."""


def compute_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The config whose computation gives this point's numbers: lee of loaded/lvc/maml is computed
    once, as maml (identical up to float64 rounding; see SAME_INNER_GRADIENT)."""
    if config["code"] == "lee" and config["estimator"] in SAME_INNER_GRADIENT:
        return {**config, "estimator": "maml"}
    return config


def group_key(config: Mapping[str, Any]) -> str:
    """Points that differ only in traced fields (`TRACED`) share one compiled program."""
    config = compute_config(config)
    return repr(sorted((k, bool(v) if k == "hessian_error" else v) for k, v in config.items()
                       if k not in TRACED or k == "hessian_error"))


def counts(config: Mapping[str, Any]) -> jax.Array:
    """[3] trajectories used by inner, hessian, outer: `samples` where the code says l, 0 (exact) for e."""
    return jnp.array([config["samples"] if c == "l" else 0 for c in config["code"]], jnp.int32)


def point_hyper(config: Mapping[str, Any]) -> mg.Hyper:
    """The point's traced α, K and c."""
    return mg.Hyper(jnp.asarray(float(config["lr"])), jnp.asarray(int(config["steps"]), jnp.int32),
                    jnp.asarray(float(config["hessian_error"])))


@functools.lru_cache(maxsize=8)
def _problems(seed: int, problem: str, mdps: int, states: int, actions: int, gamma: float, theta0):
    theta0 = theta0 if isinstance(theta0, str) else np.asarray(theta0, np.float64)
    return problem_set(seed, mg.MetaGradConfig(problem=problem), mdps, states, actions, gamma,
                       theta0=theta0)


def _hashable(theta0):
    return theta0 if isinstance(theta0, str) else tuple(map(tuple, theta0))


REPEAT_BLOCK = 10
"""Repeats per call of a compiled program: every study calls its programs with the same shapes
(when its repeats are a multiple of this), so studies share compiled programs."""
EXACT_MAX_STEPS = 6


@functools.lru_cache(maxsize=64)
def _estimate_program(cfg: mg.MetaGradConfig):
    return mg.batched_estimates(cfg)


@functools.lru_cache(maxsize=64)
def _exact_program(cfg: mg.MetaGradConfig):
    """Exact meta-gradients; one program per (problem, oracle, bootstrap, T), K ≤ EXACT_MAX_STEPS."""
    estimator = oracle_estimator(cfg)
    exact = mg.Source(estimator if cfg.oracle == "finite" else "exact")
    canonical = dataclasses.replace(cfg, inner=exact, hessian=exact, outer=exact, noise=1.0,
                                    steps=max(cfg.steps, EXACT_MAX_STEPS), gae_lambda=1.0,
                                    hessian_error=0.0)
    return _exact_canonical(canonical, estimator)


@functools.lru_cache(maxsize=16)
def _exact_canonical(cfg: mg.MetaGradConfig, estimator: str):
    return mg.batched_exact(cfg, estimator)


@functools.lru_cache(maxsize=64)
def _path_program(cfg: mg.MetaGradConfig):
    return jax.jit(jax.vmap(jax.vmap(
        lambda key, mdp, phi, count, h: inner_path_error(key, cfg, mdp, phi, count, h),
        in_axes=(0, None, None, None, None)), in_axes=(0, 0, 0, None, None)))


def _in_blocks(program, keys, *args) -> np.ndarray:
    """program(keys[:, block], *args) over blocks of REPEAT_BLOCK repeats, concatenated on axis 1."""
    repeats = keys.shape[1]
    block = REPEAT_BLOCK if repeats % REPEAT_BLOCK == 0 else repeats
    return np.concatenate([np.asarray(program(keys[:, i:i + block], *args))
                           for i in range(0, repeats, block)], axis=1)


def inner_path_error(key: jax.Array, cfg: mg.MetaGradConfig, mdp, phi: jax.Array,
                     count: jax.Array, hyper: mg.Hyper | None = None) -> jax.Array:
    """‖θ̂_k − θ_k‖² for k = 1..K_max: sampled inner steps (cfg.inner, first `count` trajectories)
    against the exact inner path, both from θ_0 (`core.inner_path`); entries k > K (hyper.steps)
    repeat the K-th. Returns [cfg.steps].

    Uses the same step keys as `core.unroll`, so θ̂_k is the inner path of the estimate computed
    with the same key.
    """
    hyper = mg.config_hyper(cfg) if hyper is None else hyper
    problem = mg.problem(cfg, mdp)
    sampled = core.inner_path(problem, cfg.inner, key, phi, hyper, cfg.steps, count)
    exact = core.inner_path(problem, dataclasses.replace(cfg.inner, samples=None), key, phi, hyper, cfg.steps)
    return jnp.sum((sampled - exact) ** 2, axis=(1, 2))


def batch_points(configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Statistics of a group of points sharing one compiled program (they differ in `TRACED` only).

    Per point: corr, std_sum, mse_of_mean, bias2 (+ se, CI), variance (stats.summarize over
    M MDPs × R repeats), per-MDP bias2, and for the comp-* studies `param_error` [K] (mean over
    MDPs and repeats of ‖θ̂_k − θ_k‖²) with its standard error. Points with the same
    `compute_config` are computed once.
    """
    first = compute_config(configs[0])
    require(all(group_key(c) == group_key(first) for c in configs),
            "batch_points needs points that differ only in " + ", ".join(TRACED))
    cfg = metagrad_config(first)
    with_path = first["study"] in COMP_STUDIES
    done: dict[str, dict[str, Any]] = {}
    results = []
    with jax.enable_x64(True):
        mdps, phis = _problems(first["seed"], first["problem"], first["mdps"], first["states"],
                               first["actions"], float(first["gamma"]), _hashable(first["theta0"]))
        estimate, exact_fn = _estimate_program(cfg), _exact_program(cfg)
        keys = jax.random.split(jax.random.key(first["seed"] + 1), (first["mdps"], first["repeats"]))
        for original in configs:
            config = compute_config(original)
            require(1 <= config["samples"] <= config["capacity"],
                    f"samples must be in 1..capacity ({config['capacity']}), got {config['samples']}")
            metagrad_config(config)  # validates steps <= max_steps and the code
            key = repr(sorted(config.items()))
            if key in done:
                results.append({**done[key], "compute_seconds": 0.0})
                continue
            point_counts, hyper = counts(config), point_hyper(config)
            started = time.perf_counter()
            exact = np.asarray(exact_fn(mdps, phis, hyper)).reshape(first["mdps"], -1)
            estimates = _in_blocks(estimate, keys, mdps, phis, point_counts, hyper)
            summary = stats.summarize(estimates.reshape(first["mdps"], first["repeats"], -1), exact)
            per_mdp = summary.pop("per_mdp")
            result = {**summary, "bias2_per_mdp": np.asarray(per_mdp["bias2"]).tolist(),
                      "bias2_se_per_mdp": np.asarray(per_mdp["bias2_se"]).tolist()}
            if with_path:
                errors = _in_blocks(_path_program(cfg), keys, mdps, phis, point_counts[0], hyper)
                errors = errors.reshape(-1, cfg.steps)[:, :config["steps"]]
                result["param_error"] = errors.mean(0).tolist()
                result["param_error_se"] = (errors.std(0, ddof=1) / np.sqrt(len(errors))).tolist()
            result["finite"] = bool(np.all(np.isfinite(estimates)))
            result["compute_seconds"] = time.perf_counter() - started
            done[key] = result
            results.append(result)
    return results


def compute_point(config: dict[str, Any]) -> dict[str, Any]:
    """One point's statistics (identical to its row from `batch_points`)."""
    return batch_points([config])[0]
