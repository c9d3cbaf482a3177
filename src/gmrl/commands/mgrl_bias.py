"""`gmrl mgrl-bias RUN_DIR`: how biased is the meta-gradient of a saved MGRL / MGRL-LVC run?

Thin CLI code over `gmrl.algos.mgrl_bias`. Reads the run folder of `gmrl mgrl --out RUN_DIR`
(run.json or config.json, checkpoint.msgpack), draws single meta-gradients of mgrl and mgrl-lvc
at the saved state and compares them with the large-batch and DiCE references; writes
RUN_DIR/bias.json (every draw and figure) and RUN_DIR/bias.md (the table), or into --out.
"""

from __future__ import annotations

from pathlib import Path

import click

from gmrl.errors import require
from gmrl.limits import require_finite, require_seed

ESTIMATORS = ("mgrl", "mgrl-lvc")  # gmrl.algos.mgrl_bias.ESTIMATORS, without importing JAX


@click.command("mgrl-bias")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--repeats", type=int, default=32, show_default=True,
              help="Single meta-gradients drawn per estimator (independent rollout keys).")
@click.option("--ref-multiplier", type=int, default=64, show_default=True,
              help="Large-batch reference: this many times the run's envs per part.")
@click.option("--ref-parts", type=int, default=4, show_default=True,
              help="Independent parts of each reference (their spread is its noise).")
@click.option("--dice-multiplier", type=int, default=16, show_default=True,
              help="DiCE reference: this many times the run's envs per part (0: none).")
@click.option("--inner-steps", "-K", type=int, default=None,
              help="K inner steps (default: the run's).")
@click.option("--inner-lr", type=float, default=None, help="Inner learning rate (default: the run's).")
@click.option("--estimators", default=",".join(ESTIMATORS), show_default=True,
              help="Estimators to diagnose.")
@click.option("--seed-index", type=int, default=0, show_default=True,
              help="Which of the run's seeds to diagnose.")
@click.option("--initial", is_flag=True, help="Diagnose the run's initial state, not its checkpoint.")
@click.option("--snapshot", type=int, default=None,
              help="Diagnose the state kept at this many frames per seed (RUN_DIR/snapshots: at "
                   "25, 50 and 75% of the run).")
@click.option("--seed", type=int, default=0, show_default=True, help="PRNG seed of the draws.")
@click.option("--bootstrap", type=int, default=2000, show_default=True, help="Bootstrap resamples.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Folder for bias.json and bias.md (default: RUN_DIR).")
def mgrl_bias_command(run_dir, repeats, ref_multiplier, ref_parts, dice_multiplier, inner_steps,
                      inner_lr, estimators, seed_index, initial, snapshot, seed, bootstrap, out):
    """Bias of MGRL's meta-gradient at a saved run state: cosine, relative bias, z, SNR."""
    names = tuple(n.strip() for n in estimators.split(",") if n.strip())
    unknown = [n for n in names if n not in ESTIMATORS]
    require(bool(names) and not unknown, f"unknown estimators {', '.join(unknown) or '(none given)'}"
                                         f"; allowed: {', '.join(ESTIMATORS)}")
    for option, value, low in (("--repeats", repeats, 2), ("--ref-parts", ref_parts, 2),
                               ("--ref-multiplier", ref_multiplier, 1),
                               ("--dice-multiplier", dice_multiplier, 0),
                               ("--bootstrap", bootstrap, 1)):
        require(value >= low, f"{option} must be >= {low}, got {value}")
    require(inner_steps is None or inner_steps >= 1, f"--inner-steps must be >= 1, got {inner_steps}")
    require_finite(inner_lr, "--inner-lr", positive=True)
    require_seed(seed)
    require(Path(run_dir).is_dir(), f"RUN_DIR {run_dir} is not a folder; give a run folder written "
                                    "by `gmrl mgrl --out RUN_DIR`")
    require(any((Path(run_dir) / name).is_file() for name in ("run.json", "config.json")),
            f"{run_dir} holds no MGRL run (run.json or config.json of `gmrl mgrl --out`)")
    out = Path(run_dir) if out is None else out
    require(not out.exists() or out.is_dir(), f"--out must be a folder, but {out} is an existing "
                                              "file; give a new or existing folder")

    import jax

    from gmrl.algos import mgrl_bias
    from gmrl.runs import folder_run
    from gmrl.runs import mgrl as mgrl_runs

    point, config, state = mgrl_runs.load_run_state(run_dir, seed_index, initial, snapshot)
    settings = mgrl_bias.BiasSettings(repeats, ref_multiplier, ref_parts, dice_multiplier, bootstrap)
    with folder_run(out):  # a run folder in training is refused; a failure leaves out as it was
        result = mgrl_bias.diagnose(config, state, jax.random.key(seed), settings, names,
                                    inner_steps, inner_lr)
        _write(out, point, result, run_dir, seed_index, initial, snapshot, seed)
    click.echo(f"bias.json and bias.md in {out}")


def _write(out, point, result, run_dir, seed_index, initial, snapshot, seed) -> None:
    from gmrl.algos import mgrl_bias
    from gmrl.io import atomic_write_json, atomic_write_text

    where = ("initial state" if initial else "checkpoint" if snapshot is None
             else f"snapshot at {snapshot} frames")
    result["run"] = {"run_dir": str(run_dir), "algo": point["algo"], "env": point["env"],
                     "frames": point["frames"], "seed_index": seed_index,
                     "state": where, "draw_seed": seed}
    title = mgrl_bias.report_title(point["algo"], point["env"], where, seed_index)
    atomic_write_json(out / "bias.json", result, {})
    report = atomic_write_text(out / "bias.md", mgrl_bias.report_markdown(result, title))
    click.echo(report.read_text(encoding="utf-8"))


def register(cli: click.Group, study: click.Group | None = None) -> None:
    cli.add_command(mgrl_bias_command)
