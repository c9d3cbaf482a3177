"""`gmrl check FILE.py:FUNCTION`: a user's meta-gradient function under the exact oracle."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import click

import gmrl
from gmrl import io
from gmrl.errors import InputError, require
from gmrl.limits import require_finite, require_seed, require_sizes


def load_function(target: str):
    """Import FILE.py and return its attribute FUNCTION (`FILE.py:FUNCTION`)."""
    path, sep, name = target.rpartition(":")
    require(sep and path and name, f"expected FILE.py:FUNCTION, got {target!r}")
    require(os.path.isfile(path), f"file {path!r} does not exist")
    module_name = f"gmrl_user_{Path(path).stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    require(spec is not None and spec.loader is not None, f"cannot import {path!r} as Python")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    try:
        from gmrl.check.run import call_user

        call_user(lambda: spec.loader.exec_module(module), f"importing {path!r}")
    except InputError:
        raise
    except Exception as err:
        raise InputError(f"importing {path!r} failed: {type(err).__name__}: {err}") from None
    finally:
        sys.path.pop(0)
    require(hasattr(module, name), f"{path!r} has no function {name!r}")
    fn = getattr(module, name)
    require(callable(fn), f"{path}:{name} is not callable")
    return fn


def parse_theta0(text: str):
    """zeros | normal | FILE.npy holding an [S, A] table."""
    if text in ("zeros", "normal"):
        return text
    require(text.endswith(".npy") and os.path.isfile(text),
            f"--theta0 must be zeros, normal or an existing .npy file with an [S, A] table, got {text!r}")
    return io.load_npy(text, "theta0", "--theta0")


def parse_thetas(text: str):
    """normal | zeros | FILE.npy holding a [2, 5] or [M, 2, 5] array of (θ1, θ2)."""
    if text in ("zeros", "normal"):
        return text
    require(text.endswith(".npy") and os.path.isfile(text),
            f"--thetas must be normal, zeros or an existing .npy file with a [2, 5] or [M, 2, 5] "
            f"array, got {text!r}")
    return io.load_npy(text, "thetas", "--thetas")


def check_bytes(items: int, repeats: int, size: int, tables: int) -> float:
    """Estimated bytes of a check: the float64 estimates [items, repeats, size] with their
    statistics and the candidates' draws (~8 copies, candidate repeats max(1000, 20 R)), and per
    item its tables (`tables` float64 values, ~10 copies for the exact oracle)."""
    draws = repeats + max(1000, 20 * repeats)
    return 8.0 * items * (8 * draws * size + 10 * tables)


TABULAR_ONLY = ("problem", "steps", "mdps", "theta0", "budget")
IPD_ONLY = ("points", "thetas", "gamma")


@click.command()
@click.argument("target", metavar="FILE.py:FUNCTION")
@click.option("--game", type=click.Choice(["mdp", "ipd"]), default="mdp", show_default=True,
              help="mdp: a tabular meta-gradient fn(task, rng) -> [S, A]; ipd: both players' LOLA "
                   "gradients on the iterated prisoner's dilemma, fn(game, rng) -> [2, 5].")
@click.option("--problem", type=click.Choice(["maml", "lirpg"]), default=None,
              help="mdp: maml (φ = θ0, the default) or lirpg (φ = intrinsic reward table, θ0 = 0).")
@click.option("--steps", "-K", type=int, default=None, help="mdp: inner steps K [default: 1].")
@click.option("--lr", type=float, default=None,
              help="Inner (mdp) or look-ahead (ipd) learning rate α [default: 10 mdp, 1 ipd].")
@click.option("--mdps", type=int, default=None, help="mdp: random reference MDPs [default: 10].")
@click.option("--points", type=int, default=None,
              help="ipd: random parameter points (θ1, θ2) ~ N(0, 1) [default: 8].")
@click.option("--repeats", type=int, default=50, show_default=True,
              help="Calls of your function per MDP or point (>= 3).")
@click.option("--theta0", default=None,
              help="mdp, maml's θ0: zeros (uniform policy, the default), normal (N(0,1) per MDP) or "
                   "FILE.npy [S, A].")
@click.option("--thetas", default=None,
              help="ipd: normal (the default: --points random points), zeros (the LOLA start) or "
                   "FILE.npy [2, 5] / [M, 2, 5].")
@click.option("--gamma", type=float, default=None, help="ipd: discount γ [default: 0.96].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--horizon", "-T", type=int, default=20, show_default=True, help="Episode length T.")
@click.option("--jax/--python", "use_jax", default=None,
              help="Your function is JAX (vmapped and jitted; rng a key) or plain Python (rng a "
                   "numpy Generator). Default: JAX if marked with @gmrl.check.jax_function.")
@click.option("--alpha", type=float, default=0.05, show_default=True,
              help="Bound on the probability of a wrong (decisive) label.")
@click.option("--budget", type=float, default=None,
              help="mdp: seconds to keep drawing (doubling the repeats, each look at a smaller "
                   "level) while more than one label is consistent; 0: one look at --alpha "
                   "[default: 120].")
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Write configuration, statistics and diagnosis (JSON).")
@click.option("--timeout", type=float, default=60.0, show_default=True,
              help="Seconds one call of your function may take before the check stops with an "
                   "error (the compiled JAX call over all repeats gets this times their number).")
def check_command(target, game, problem, steps, lr, mdps, points, repeats, theta0, thetas, gamma,
                  seed, horizon, use_jax, alpha, budget, progress, out, timeout):
    """Check FILE.py:FUNCTION, a meta-gradient fn(task, rng) -> [S, A] (or, with --game ipd, a LOLA
    gradient fn(game, rng) -> [2, 5]), against the exact one.

    Prints bias2 ± 95% CI, variance and corr per MDP (point) and pooled, then the diagnosis:
    second-order-unbiased, first-order, vanilla-logprob-hessian, lvc-hessian, scaled, unexplained
    or undetermined with the labels it cannot tell apart (ipd: second-order-unbiased, first-order,
    naive, scaled, unexplained or undetermined). mdp: while several labels are consistent it keeps
    drawing until one is decisive or --budget is spent; a decisive label is wrong with probability
    at most --alpha.
    """
    given = dict(problem=problem, steps=steps, mdps=mdps, theta0=theta0, points=points,
                 thetas=thetas, gamma=gamma, budget=budget)
    other = IPD_ONLY if game == "mdp" else TABULAR_ONLY
    wrong = [f"--{name}" for name in other if given[name] is not None]
    require(not wrong, f"{', '.join(wrong)} {'does' if len(wrong) == 1 else 'do'} not apply to "
            f"--game {game}")
    io.check_output_file(out, ".json")  # before the computation; nothing is created until the end
    require_seed(seed)
    for option, value in (("--lr", lr), ("--gamma", gamma), ("--alpha", alpha)):
        require_finite(value, option)
    require_finite(timeout, "--timeout", positive=True)
    require(budget is None or (budget >= 0 and budget == budget and budget != float("inf")),
            f"--budget must be a number of seconds >= 0, got {budget}")
    require(repeats >= 3, f"--repeats must be >= 3 (bias2 needs 3), got {repeats}")
    require(horizon >= 1, f"--horizon must be >= 1, got {horizon}")
    if game == "ipd":
        count = 8 if points is None else points
        require(count >= 1, f"--points must be >= 1, got {count}")
        require_sizes({"--points": (count, 8), "--repeats": (repeats, 50)},
                      lambda v: check_bytes(v["--points"], v["--repeats"], 10, 10 * horizon))
    else:
        count = 10 if mdps is None else mdps
        require(count >= 1, f"--mdps must be >= 1, got {count}")
        require_sizes({"--mdps": (count, 10), "--repeats": (repeats, 50)},
                      lambda v: check_bytes(v["--mdps"], v["--repeats"], 100, 20 * 5 * 21))
    from gmrl.check.run import user_code  # JAX starts here, after the options passed

    with user_code(timeout):
        result, head = _run(target, game, problem, steps, lr, mdps, points, repeats, theta0,
                            thetas, gamma, seed, horizon, use_jax, alpha, progress, budget)
    seconds = result.seconds
    click.echo(head)
    click.echo(f"{seconds['per_estimate'] * 1e3:.2f} ms per estimate; candidates "
               f"{seconds['candidates']:.1f} s; total {seconds['total']:.1f} s")
    click.echo(result.report())
    if out is not None:
        io.atomic_write_json(out, {"gmrl_version": gmrl.__version__, **result.to_json()}, {})
        click.echo(f"wrote {out}")


def _run(target, game, problem, steps, lr, mdps, points, repeats, theta0, thetas, gamma, seed,
         horizon, use_jax, alpha, progress, budget):
    """(CheckResult, its heading line) of `gmrl check` after the options passed."""
    import gmrl.check

    if game == "ipd":
        from gmrl.check import lola

        thetas = parse_thetas("normal" if thetas is None else thetas)
        fn = load_function(target)
        result = lola.check_lola(fn, thetas=thetas, points=8 if points is None else points,
                                 repeats=repeats, lr=lola.LR if lr is None else lr,
                                 gamma=lola.ipd.GAMMA if gamma is None else gamma, horizon=horizon,
                                 seed=seed, jax=use_jax, alpha=alpha, progress=progress)
        c = result.config
        head = (f"gmrl check {target}: ipd LOLA, α={c['lr']}, γ={c['gamma']}, T={horizon}, "
                f"{c['points']} points × {repeats} repeats ({c['path']} path); "
                f"sample calls {result.calls}")
    else:
        problem, steps = problem or "maml", 1 if steps is None else steps
        lr = 10.0 if lr is None else lr
        theta0 = parse_theta0("zeros" if theta0 is None else theta0)
        fn = load_function(target)
        result = gmrl.check.check(fn, problem=problem, steps=steps, lr=lr,
                                  mdps=10 if mdps is None else mdps, repeats=repeats, theta0=theta0,
                                  seed=seed, jax=use_jax, horizon=horizon, alpha=alpha,
                                  progress=progress,
                                  budget=gmrl.check.run.BUDGET if budget is None else budget)
        head = (f"gmrl check {target}: {problem}, K={steps}, α={lr}, T={horizon}, "
                f"{result.config['mdps']} MDPs × {result.config['repeats']} repeats "
                f"({result.config['path']} path); "
                f"sample calls {result.calls}")
    return result, head


def register(cli, study) -> None:
    cli.add_command(check_command, name="check")
