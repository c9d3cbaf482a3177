"""`gmrl study mgrl-tabular`: the bias of online meta-gradients in (γ, λ) and the LVC claim, decided.

Part a (bias): for maml (vanilla), lvc and loaded (unbiased), bias2 = ‖E ĝ − g*‖²/2 of the
decomposed estimates ele (only the step Jacobian sampled: Hessian bias), lee (only the step value
sampled: compositional bias) and lll (all sampled) against K, α and the sample size, against the
exact meta-gradient of the finite oracle (horizon T, bootstrap v(s_T)), so that bias means estimator
bias. One compiled program per (estimator, code); K, α and the sample size are traced.

Part b (closed loop): single-lifetime MGRL (Xu et al. 2018) — a window of K sampled inner steps
from where the learner is, one Adam update of η on the window's meta-gradient (outer J_out exact),
then the next window; N meta-updates per run, runs = MDPs × seeds vmapped, arms fixed η / exact /
maml / lvc / loaded. Every arm's learner takes the same sampled steps given its η (same keys); the
arms differ only in the meta-gradient. Paired differences are averaged over seeds per MDP and tested
over MDPs (paired t), Holm-corrected.

Resumable per part: out/part_a.json and out/part_b.json are reused when their settings match.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gmrl import core, stats
from gmrl import mgrl_tabular as mt
from gmrl.core import Decomposition, Hyper, Source
from gmrl.envs import tabular
from gmrl.io import atomic_write_json, atomic_write_text, prepare_output_dir

ESTIMATORS = ("maml", "lvc", "loaded")
CODES = ("ele", "lee", "lll")
ARMS = ("fixed", "exact", "maml", "lvc", "loaded")


def settings(quick: bool, seed: int) -> dict[str, Any]:
    """The study's scale: reference MDPs (S = 20, A = 5, γ_out = 0.8, Dirichlet(0.001), T = 20)."""
    common = {
        "seed": seed,
        "states": 20,
        "actions": 5,
        "gamma": 0.8,
        "horizon": 20,
        "critic_lr": 0.5,
        "lambda0": 0.9,
        "quick": quick,
    }
    if quick:
        return common | {
            "a": {
                "mdps": 4,
                "repeats": 24,
                "steps": [1, 2, 3],
                "lrs": [1.0, 10.0, 30.0],
                "samples": [4, 16],
                "lr": 10.0,
                "k_ref": 2,
                "n_ref": 4,
            },
            "b": {"mdps": 8, "seeds": 2, "updates": 5, "steps": 3, "samples": 8, "lr": 10.0, "meta_lr": 0.1},
        }
    return common | {
        "a": {
            "mdps": 10,
            "repeats": 50,
            "steps": [1, 2, 3, 4, 5, 6],
            "lrs": [1.0, 3.0, 10.0, 30.0],
            "samples": [4, 8, 16],
            "lr": 10.0,
            "k_ref": 3,
            "n_ref": 16,
        },
        "b": {"mdps": 50, "seeds": 4, "updates": 40, "steps": 3, "samples": 16, "lr": 10.0, "meta_lr": 0.1},
    }


def _mdps(seed: int, count: int, s: dict) -> tabular.TabularMDP:
    return tabular.random_mdps(
        jax.random.key(seed), count, num_states=s["states"], num_actions=s["actions"], gamma=s["gamma"]
    )


def _config(s: dict, estimator: str, code: str, capacity: int, max_steps: int) -> mt.MGRLConfig:
    def source(letter):
        return Source(estimator, capacity) if letter == "l" else Source(estimator)

    return mt.MGRLConfig(
        steps=max_steps,
        lr=s["a"]["lr"],
        critic_lr=s["critic_lr"],
        lambda0=s["lambda0"],
        horizon=s["horizon"],
        inner=source(code[0]),
        hessian=source(code[1]),
        outer=source(code[2]),
        oracle="finite",
    )


def _bias_points(s: dict) -> list[dict]:
    """(K, α, n) points of part a: K sweep at (α, n_ref), α sweep at (k_ref, n_ref), n sweep at k_ref."""
    a = s["a"]
    points = [{"sweep": "steps", "steps": k, "lr": a["lr"], "samples": a["n_ref"]} for k in a["steps"]]
    points += [{"sweep": "lr", "steps": a["k_ref"], "lr": lr, "samples": a["n_ref"]} for lr in a["lrs"]]
    points += [{"sweep": "samples", "steps": a["k_ref"], "lr": a["lr"], "samples": n} for n in a["samples"]]
    return points


def run_bias(s: dict, progress=print) -> dict:
    """Part a: bias2 (and its jackknife se) per (estimator, code, point); exact meta-gradients per point."""
    a = s["a"]
    with jax.enable_x64(True):
        mdps = _mdps(s["seed"], a["mdps"], s)
        max_steps, capacity = max(a["steps"]), max(a["samples"])
        base = _config(s, "maml", "eee", capacity, max_steps)
        etas = mt.initial_etas(base, mdps)
        points = _bias_points(s)
        exact_fn = mt.batched_exact(base, "maml")
        exact = [np.asarray(exact_fn(mdps, etas, Hyper(p["lr"], p["steps"], 0.0))) for p in points]
        norms = _step_norms(mdps, base)
        rows = []
        for code in CODES:  # one compiled program per code: the estimator, K, α, n are traced
            fn = mt.batched_estimates(_config(s, "maml", code, capacity, max_steps))
            for estimator in ESTIMATORS:
                started = time.perf_counter()
                index = jnp.asarray(mt.ESTIMATORS.index(estimator))
                keys = jax.random.split(
                    jax.random.fold_in(jax.random.key(s["seed"] + 1), index), (a["mdps"], a["repeats"])
                )
                for point, truth in zip(points, exact, strict=True):
                    counts = jnp.array([point["samples"] if c == "l" else 0 for c in code])
                    hyper = Hyper(point["lr"], point["steps"], 0.0)
                    est = np.asarray(fn(keys, mdps, etas, counts, hyper, index))
                    summary = stats.summarize(est, truth)
                    rows.append(
                        point
                        | {
                            "estimator": estimator,
                            "code": code,
                            "bias2": summary["bias2"],
                            "bias2_se": summary["bias2_se"],
                            "variance": summary["variance"],
                            "truth_sq": float(np.mean(truth**2)),
                        }
                    )
                progress(f"part a: {code} {estimator} {time.perf_counter() - started:.1f} s")
    return {"rows": rows, "step_norm": norms}


def _step_norms(mdps, cfg: mt.MGRLConfig) -> list[float]:
    """‖∂Δx/∂x‖₂ / α at x = 0, v = 0 (the expected policy step per unit α), per MDP."""

    def norm(mdp, eta):
        gamma, lam = jax.nn.sigmoid(eta[0]), jax.nn.sigmoid(eta[1])

        def step(x):
            theta = mt.Learner(x, jnp.zeros(mdp.R.shape[0]))
            return mt.expected_step(mdp, theta, gamma, lam, 1.0, cfg.critic_lr, cfg.horizon).x.ravel()

        jac = jax.jacfwd(step)(jnp.zeros(mdp.R.shape))
        return jnp.linalg.norm(jac.reshape(step(jnp.zeros(mdp.R.shape)).size, -1), 2)

    return np.asarray(jax.vmap(norm)(mdps, mt.initial_etas(cfg, mdps))).tolist()


def closed_loop_program(s: dict):
    """A jitted f(mdps [M], keys [M, seeds], arms [5]) -> (J_out [5, M, seeds, N + 1], η [..., N + 1, 2]).

    The arm (an index into ARMS) is traced: every arm computes the exact and one sampled meta-gradient
    and keeps its own (fixed: none), so one compiled program runs them all.
    """
    import optax

    b = s["b"]
    cfg = mt.MGRLConfig(
        steps=b["steps"], lr=b["lr"], critic_lr=s["critic_lr"], lambda0=s["lambda0"], horizon=s["horizon"]
    )
    hyper = Hyper(b["lr"], b["steps"], 0.0)
    optimizer = optax.adam(b["meta_lr"])
    parts = Decomposition(Source("maml", b["samples"]), Source(core.SAME), Source())
    value = Source("maml", b["samples"])

    def run(mdp, key, arm):
        estimator = jnp.clip(arm - 2, 0, 2)  # maml, lvc, loaded = mt.ESTIMATORS[0..2]
        base = mt.problem(cfg, mdp, estimator)
        eta0 = mt.initial_eta(cfg, mdp)

        def update(carry, step_key):
            theta, eta, opt_state = carry
            problem = base._replace(init=lambda _, th=theta: th)
            exact = core.exact_meta_gradient(problem, eta, hyper, b["steps"])
            sampled = core.meta_gradient(problem, parts, step_key, eta, hyper, b["steps"])
            grad = jnp.where(arm == 0, 0.0, jnp.where(arm == 1, exact, sampled))
            path = core.inner_path(problem, value, step_key, eta, hyper, b["steps"])
            theta = jax.tree.map(lambda leaf: leaf[-1], path)
            updates, opt_state = optimizer.update(-grad, opt_state, eta)
            eta = optax.apply_updates(eta, updates)
            return (theta, eta, opt_state), (tabular.exact_return(mdp, theta.x), eta)

        keys = jax.random.split(key, b["updates"])
        start = (mt.initial_learner(mdp), eta0, optimizer.init(eta0))
        _, (returns, etas) = jax.lax.scan(update, start, keys)
        first = tabular.exact_return(mdp, start[0].x)
        return jnp.concatenate([first[None], returns]), jnp.concatenate([eta0[None], etas])

    per_arm = jax.vmap(jax.vmap(run, in_axes=(None, 0, None)), in_axes=(0, 0, None))
    return jax.jit(jax.vmap(per_arm, in_axes=(None, None, 0)))


def run_closed_loop(s: dict, progress=print) -> dict:
    """Part b: per arm, J_out and η along N meta-updates for every (MDP, seed)."""
    b = s["b"]
    with jax.enable_x64(True):
        mdps = _mdps(s["seed"] + 100, b["mdps"], s)
        keys = jax.random.split(jax.random.key(s["seed"] + 101), (b["mdps"], b["seeds"]))
        started = time.perf_counter()
        returns, etas = closed_loop_program(s)(mdps, keys, jnp.arange(len(ARMS)))
        returns, etas = np.asarray(returns), np.asarray(etas)
        seconds = time.perf_counter() - started
    progress(f"part b: {seconds:.1f} s")
    return {arm: {"returns": returns[i].tolist(), "etas": etas[i].tolist()} for i, arm in enumerate(ARMS)} | {
        "seconds": seconds
    }


def _cached(path: Path, s: dict, compute) -> dict:
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("settings") == json.loads(json.dumps(s)):
            return saved["result"]
    result = compute()
    atomic_write_json(path, {"settings": s, "result": result})
    return result


def run_study(out: Path, quick: bool = False, seed: int = 0, progress=print) -> tuple[list[Path], float]:
    """Parts a and b into `out` (resumable per part), then figures and report.md. Returns (paths, s)."""
    started = time.perf_counter()
    out = Path(out)
    prepare_output_dir(out, "--out")
    s = settings(quick, seed)
    bias = _cached(out / "part_a.json", s, lambda: run_bias(s, progress))
    loop = _cached(out / "part_b.json", s, lambda: run_closed_loop(s, progress))
    from gmrl.studies import mgrl_tabular_report as report

    seconds = time.perf_counter() - started
    written = [out / "part_a.json", out / "part_b.json"]
    written += report.figures(bias, loop, s, out)
    written.append(atomic_write_text(out / "report.md", report.report(bias, loop, s, seconds)))
    return written, seconds
