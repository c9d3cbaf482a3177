"""`gmrl tabular --problem mgrl`: exact vs decomposed online meta-gradients in (γ, λ).

docs/mgrl_tabular.md.
"""

from __future__ import annotations

import dataclasses
import time

import click
import numpy as np

import gmrl
from gmrl import io
from gmrl import mgrl_tabular as mt
from gmrl.core import Source
from gmrl.envs import tabular
from gmrl.errors import require
from gmrl.evaluate import evaluate, problem_set


def run_mgrl(*, steps, lr, gamma, horizon, noise, mdps, states, actions, repeats, seed, mdp_file, inner,
             hessian, outer, oracle, loaded_lambda, theta0, gamma0, lambda0, critic_lr, out) -> None:
    """The mgrl branch of `gmrl tabular` (same table and JSON; the meta-gradient is a 2-vector in η)."""
    from gmrl.commands.table import format_table

    require(theta0 == "zeros", "--theta0 applies to maml only; mgrl's learner starts at x = 0, v = 0")
    require(loaded_lambda == 1.0, "--loaded-lambda applies to maml/lirpg only; mgrl's loaded box is causal")
    cfg = mt.MGRLConfig(
        steps=steps, lr=lr, critic_lr=0.5 if critic_lr is None else critic_lr, gamma0=gamma0,
        lambda0=0.9 if lambda0 is None else lambda0, horizon=horizon, noise=noise,
        inner=Source.parse(inner), hessian=Source.parse(hessian, jacobian=True), outer=Source.parse(outer),
        oracle=oracle)
    require(repeats >= 3, f"--repeats must be >= 3 (bias2 needs 3), got {repeats}")
    require(out is None or out.suffix == ".json", f"--out must name a .json file, got {out}")
    if out is not None:
        require(not out.is_dir(), f"--out {out} is a folder; give a FILE.json path")
        io.prepare_output_dir(out.parent, "--out's folder")
    user_mdp = tabular.load_mdp(mdp_file) if mdp_file is not None else None
    if user_mdp is None:
        require(mdps >= 1, f"--mdps must be >= 1, got {mdps}")
        require(states >= 1 and actions >= 1, f"--states and --actions must be >= 1, got {states}, {actions}")
    import jax

    mdp_set, _ = problem_set(seed, cfg.outer_config(), mdps, states, actions, gamma, user_mdp)
    with jax.enable_x64(True):
        etas = mt.initial_etas(cfg, mdp_set)
    started = time.perf_counter()
    result = evaluate(cfg, mdp_set, etas, seed + 1, repeats)
    total = time.perf_counter() - started
    summary = result["summary"]
    gamma0_text = "the MDP's γ" if gamma0 is None else gamma0
    click.echo(f"gmrl tabular: mgrl, K={steps}, α={lr}, β={cfg.critic_lr}, γ0={gamma0_text}, "
               f"λ0={cfg.lambda0}, T={horizon}, inner={cfg.inner}, hessian={cfg.hessian}, "
               f"outer={cfg.outer}, oracle={oracle}")
    click.echo(f"{summary['num_mdps']} MDP(s) × {repeats} repeats; {total:.1f} s including compilation")
    click.echo(format_table(summary))
    if out is not None:
        config = dataclasses.asdict(cfg) | {
            "gamma": float(np.asarray(mdp_set.gamma)[0]), "repeats": repeats, "seed": seed,
            "num_mdps": summary["num_mdps"], "mdp_file": None if mdp_file is None else str(mdp_file),
            "eta": np.asarray(etas).tolist()}
        io.atomic_write_json(out, {
            "gmrl_version": gmrl.__version__, "config": config,
            "summary": {k: v for k, v in summary.items() if k != "per_mdp"},
            "per_mdp": summary["per_mdp"], "exact_meta_gradient": result["exact"],
            "mean_estimate": result["estimates"].mean(axis=1), "seconds": total})
        click.echo(f"wrote {out}")
