"""`gmrl tabular`: exact vs decomposed meta-gradient estimates on random or user tabular MDPs."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import click
import numpy as np

import gmrl
from gmrl import io
from gmrl import metagrad as mg
from gmrl.commands.table import format_table
from gmrl.envs import tabular
from gmrl.errors import require
from gmrl.evaluate import evaluate, problem_set
from gmrl.limits import require_finite, require_seed, require_sizes


def parse_theta0(text: str, num_states: int, num_actions: int):
    """`zeros`, `normal`, or the [S, A] table (float64 numpy) of the .npy file `text`."""
    if text in mg.THETA0_CHOICES:
        return text
    require(text.endswith(".npy"),
            f"--theta0 must be one of {', '.join(mg.THETA0_CHOICES)} or a FILE.npy, got {text!r}")
    return tabular.load_theta(text, num_states, num_actions)


def run_bytes(cfg, mdps: int, states: int, actions: int, repeats: int) -> float:
    """Estimated bytes of a `gmrl tabular` run: per MDP the float64 tables P [S, A, S] and the
    exact meta-gradient's S × S solves (~6 copies of P and 4 (K + 1) S × S matrices), the
    [R, S, A] estimates with their statistics (3 copies), and the sampled episodes
    (`gmrl.metagrad.estimate_bytes`)."""
    per_mdp = 8.0 * (6 * states * actions * states + 4 * states * states * (cfg.steps + 1)
                     + 3 * repeats * states * actions)
    return mdps * per_mdp + float(mg.estimate_bytes(cfg, mdps * repeats))




@click.command()
@click.option("--problem", type=click.Choice(mg.PROBLEMS + ("mgrl",)), default="maml", show_default=True,
              help="maml: φ = θ0; lirpg: φ = intrinsic reward table; mgrl: φ = (logit γ, logit λ) "
                   "(docs/mgrl_tabular.md).")
@click.option("--steps", "-K", type=int, default=1, show_default=True, help="Inner steps K.")
@click.option("--lr", type=float, default=10.0, show_default=True, help="Inner learning rate α.")
@click.option("--gamma", type=float, default=0.8, show_default=True,
              help="Discount of random MDPs (an --mdp file carries its own).")
@click.option("--horizon", "-T", type=int, default=20, show_default=True, help="Rollout horizon T.")
@click.option("--noise", type=float, default=1.0, show_default=True,
              help="Critic noise scale (V + noise·‖V‖/S·N(0,1)); 0 = exact critic.")
@click.option("--mdps", type=int, default=10, show_default=True, help="Number of random MDPs.")
@click.option("--states", type=int, default=20, show_default=True, help="S of random MDPs.")
@click.option("--actions", type=int, default=5, show_default=True, help="A of random MDPs.")
@click.option("--repeats", type=int, default=20, show_default=True,
              help="Independent estimates per MDP (>= 3).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--mdp", "mdp_file", type=click.Path(path_type=Path), default=None,
              help="Use this .npz MDP (keys P [S,A,S], R [S,A], gamma, optional init_state).")
@click.option("--inner", default="dice:32", show_default=True,
              help="Inner-step gradient: exact | NAME[:N] with NAME in dice, loaded, lvc, maml.")
@click.option("--hessian", default="dice:32", show_default=True, help="Step Jacobian estimator.")
@click.option("--outer", default="dice:32", show_default=True, help="Outer objective estimator.")
@click.option("--oracle", type=click.Choice(mg.ORACLES), default="infinite", show_default=True,
              help="infinite: closed-form J; finite: J_T with the estimators' bootstrap.")
@click.option("--loaded-lambda", type=float, default=1.0, show_default=True,
              help="Loaded DiCE λ (1 = unbiased).")
@click.option("--critic-gradient/--detach-critic", default=True, show_default=True,
              help="LIRPG: differentiate the critic V(R + φ) in φ (the reference's default) or hold it "
                   "fixed (its --detach_value_gradient). No effect for maml.")
@click.option("--theta0", default="zeros", show_default=True,
              help="MAML's θ0: zeros (uniform policy, as in the reference study), normal (N(0,1) per "
                   "MDP from --seed) or FILE.npy holding an [S, A] table.")
@click.option("--gamma0", type=float, default=None,
              help="mgrl: the initial inner discount γ [default: the MDP's γ].")
@click.option("--lambda0", type=float, default=None, help="mgrl: the initial λ [default: 0.9].")
@click.option("--critic-lr", type=float, default=None, help="mgrl: the critic step size β [default: 0.5].")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Write config, per-MDP figures, exact meta-gradients and mean estimates (JSON).")
def tabular_command(problem, steps, lr, gamma, horizon, noise, mdps, states, actions, repeats,
                    seed, mdp_file, inner, hessian, outer, oracle, loaded_lambda, critic_gradient, theta0,
                    out, gamma0=None, lambda0=None, critic_lr=None):
    """Exact vs decomposed meta-gradient estimates on tabular MDPs (docs/design.md)."""
    for option, value in (("--lr", lr), ("--gamma", gamma), ("--noise", noise),
                          ("--loaded-lambda", loaded_lambda)):
        require_finite(value, option)
    if problem == "mgrl":
        from gmrl.commands.tabular_mgrl import run_mgrl

        return run_mgrl(steps=steps, lr=lr, gamma=gamma, horizon=horizon, noise=noise, mdps=mdps,
                        states=states, actions=actions, repeats=repeats, seed=seed, mdp_file=mdp_file,
                        inner=inner, hessian=hessian, outer=outer, oracle=oracle, loaded_lambda=loaded_lambda,
                        theta0=theta0, gamma0=gamma0, lambda0=lambda0, critic_lr=critic_lr, out=out)
    require(gamma0 is None and lambda0 is None and critic_lr is None,
            "--gamma0, --lambda0 and --critic-lr apply only to --problem mgrl")
    cfg = mg.MetaGradConfig(
        problem=problem, steps=steps, lr=lr, horizon=horizon, noise=noise,
        inner=mg.Source.parse(inner), hessian=mg.Source.parse(hessian, jacobian=True),
        outer=mg.Source.parse(outer), oracle=oracle, loaded_lambda=loaded_lambda,
        critic_gradient=critic_gradient)
    require(repeats >= 3, f"--repeats must be >= 3 (bias2 needs 3), got {repeats}")
    require_seed(seed)
    require_finite(gamma, "--gamma")
    io.check_output_file(out, ".json")  # before any computation; nothing is created until the end
    user_mdp = tabular.load_mdp(mdp_file) if mdp_file is not None else None
    if user_mdp is None:
        require(mdps >= 1, f"--mdps must be >= 1, got {mdps}")
        require(states >= 1 and actions >= 1, f"--states and --actions must be >= 1, got {states}, {actions}")
    shape = (states, actions) if user_mdp is None else user_mdp.R.shape
    sizes = {"--repeats": (repeats, 20)} | ({"--mdps": (mdps, 10), "--states": (states, 20),
                                             "--actions": (actions, 5)} if user_mdp is None else {})
    fixed = {"--mdps": 1 if user_mdp is not None else mdps, "--states": shape[0],
             "--actions": shape[1]}
    require_sizes(sizes, lambda v: run_bytes(cfg, **{k[2:]: n for k, n in (fixed | v).items()}))
    theta0_value = parse_theta0(theta0, *shape)
    mdp_set, phis = problem_set(seed, cfg, mdps, states, actions, gamma, user_mdp, theta0_value)
    started = time.perf_counter()
    result = evaluate(cfg, mdp_set, phis, seed + 1, repeats)
    total = time.perf_counter() - started
    summary = result["summary"]
    click.echo(f"gmrl tabular: {problem}, K={steps}, α={lr}, T={horizon}, inner={cfg.inner}, "
               f"hessian={cfg.hessian}, outer={cfg.outer}, oracle={oracle}, theta0={theta0}")
    click.echo(f"{summary['num_mdps']} MDP(s) × {repeats} repeats; {total:.1f} s including compilation")
    click.echo(format_table(summary))
    if out is not None:
        config = dataclasses.asdict(cfg) | {
            "gamma": float(np.asarray(mdp_set.gamma)[0]), "repeats": repeats, "seed": seed,
            "num_mdps": summary["num_mdps"], "mdp_file": None if mdp_file is None else str(mdp_file),
            "theta0": theta0 if isinstance(theta0_value, str) else {"file": theta0,
                                                                    "table": theta0_value.tolist()}}
        io.atomic_write_json(out, null_reasons={}, data={
            "gmrl_version": gmrl.__version__, "config": config,
            "summary": {k: v for k, v in summary.items() if k != "per_mdp"},
            "per_mdp": summary["per_mdp"], "exact_meta_gradient": result["exact"],
            "mean_estimate": result["estimates"].mean(axis=1), "seconds": total})
        click.echo(f"wrote {out}")


def register(cli, study) -> None:
    cli.add_command(tabular_command, name="tabular")
