"""`gmrl check FILE.py:FUNCTION`: a user's meta-gradient function under the exact oracle."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import click
import numpy as np

import gmrl
import gmrl.check
from gmrl import io
from gmrl.errors import InputError, require


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
        spec.loader.exec_module(module)
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
    return np.load(text, allow_pickle=False)


@click.command()
@click.argument("target", metavar="FILE.py:FUNCTION")
@click.option("--problem", type=click.Choice(["maml", "lirpg"]), default="maml", show_default=True,
              help="maml: φ = θ0; lirpg: φ = intrinsic reward table (θ0 = 0).")
@click.option("--steps", "-K", type=int, default=1, show_default=True, help="Inner steps K.")
@click.option("--lr", type=float, default=10.0, show_default=True, help="Inner learning rate α.")
@click.option("--mdps", type=int, default=10, show_default=True, help="Random reference MDPs.")
@click.option("--repeats", type=int, default=50, show_default=True,
              help="Calls of your function per MDP (>= 3).")
@click.option("--theta0", default="zeros", show_default=True,
              help="maml's θ0: zeros (uniform policy), normal (N(0,1) per MDP) or FILE.npy [S, A].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--horizon", "-T", type=int, default=20, show_default=True, help="Episode length T.")
@click.option("--jax/--python", "use_jax", default=None,
              help="Your function is JAX (vmapped and jitted; rng a key) or plain Python (rng a "
                   "numpy Generator). Default: JAX if marked with @gmrl.check.jax_function.")
@click.option("--alpha", type=float, default=0.05, show_default=True,
              help="Family-wise error of Holm's rule.")
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Write configuration, statistics and diagnosis (JSON).")
def check_command(target, problem, steps, lr, mdps, repeats, theta0, seed, horizon, use_jax, alpha,
                  progress, out):
    """Check FILE.py:FUNCTION, a meta-gradient fn(task, rng) -> [S, A], against the exact one.

    Prints bias2 ± 95% CI, variance and corr per MDP and pooled, then the diagnosis:
    second-order-unbiased, first-order, vanilla-logprob-hessian, lvc-hessian, scaled or unexplained.
    """
    require(out is None or out.suffix == ".json", f"--out must name a .json file, got {out}")
    fn = load_function(target)
    result = gmrl.check.check(fn, problem=problem, steps=steps, lr=lr, mdps=mdps, repeats=repeats,
                              theta0=parse_theta0(theta0), seed=seed, jax=use_jax, horizon=horizon,
                              alpha=alpha, progress=progress)
    seconds = result.seconds
    click.echo(f"gmrl check {target}: {problem}, K={steps}, α={lr}, T={horizon}, "
               f"{result.config['mdps']} MDPs × {repeats} repeats ({result.config['path']} path); "
               f"sample calls {result.calls}")
    click.echo(f"{seconds['per_estimate'] * 1e3:.2f} ms per estimate; candidates "
               f"{seconds['candidates']:.1f} s; total {seconds['total']:.1f} s")
    click.echo(result.report())
    if out is not None:
        io.atomic_write_json(out, {"gmrl_version": gmrl.__version__, **result.to_json()})
        click.echo(f"wrote {out}")


def register(cli, study) -> None:
    cli.add_command(check_command, name="check")
