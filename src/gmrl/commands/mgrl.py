"""`gmrl mgrl` (one training run, several seeds) and `gmrl study mgrl` (a2c vs mgrl vs mgrl-lvc).

Thin CLI code over `gmrl.runs.mgrl`, the training driver on the run layer (`gmrl.runs`). A run
folder holds config.json, results.sqlite (the finished run), progress.csv (one row per logging
point and seed), checkpoint.msgpack and, with --tensorboard, TensorBoard events. Every file is
replaced atomically after each logging point, so an interrupted run leaves complete files behind;
re-running the same command continues it from the checkpoint.
"""

from __future__ import annotations

import math
from pathlib import Path

import click

from gmrl.errors import require

ALGOS = ("a2c", "mgrl", "mgrl-lvc")  # gmrl.algos.mgrl.ALGOS (tested equal), without importing JAX
META_PARAMS = ("gamma", "lam", "entropy", "value")  # gmrl.algos.mgrl.META_PARAMS (tested equal)
ENVS = ("CartPole-v1", "Breakout-MinAtar", "Asterix-MinAtar", "Freeway-MinAtar",
        "SpaceInvaders-MinAtar")  # gmrl.algos.a2c.SUPPORTED_ENVS (tested equal)
STUDY_GAMES = ENVS[1:]
DEFAULT_STUDY_GAMES = ("Breakout-MinAtar", "SpaceInvaders-MinAtar")  # gmrl.runs.mgrl (tested equal)
PRESETS = ("reference", "full")  # gmrl.algos.presets.PRESETS (tested equal)
PRESET_HELP = ("reference: the reference code's settings (Adam with linear learning-rate decay, "
               "baseline, critic γ input and clip norm held constant in the meta-gradient, γ "
               "embedding in the critic); full: RMSProp, every path differentiated "
               "(docs/mgrl.md has the table).")


def check_env(name: str) -> str:
    """`name` if it is a supported environment name (InputError otherwise)."""
    require(name in ENVS or (name.startswith("ALE/") and len(name) > 4),
            f"unknown environment {name!r}; allowed: {', '.join(ENVS)}, or ALE/<game> "
            "(Atari through ale-py, e.g. ALE/Breakout-v5)")
    return name


def parse_names(text: str, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    """A comma-separated list of names, each one of `allowed` (InputError otherwise)."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in allowed]
    require(not unknown and bool(names), f"unknown {what} {', '.join(unknown) or '(none given)'}; "
            f"allowed: {', '.join(allowed)}")
    return names


@click.command("mgrl")
@click.option("--env", default="Breakout-MinAtar", show_default=True,
              help=f"Environment: {', '.join(ENVS)} (gymnax), or ALE/<game> (Atari via ale-py).")
@click.option("--algo", type=click.Choice(ALGOS), default="mgrl", show_default=True)
@click.option("--preset", type=click.Choice(PRESETS), default="reference", show_default=True,
              help=PRESET_HELP)
@click.option("--frames", type=int, default=1_000_000, show_default=True,
              help="Environment frames per seed.")
@click.option("--seeds", type=int, default=3, show_default=True, help="Seeds, run vmapped.")
@click.option("--seed", type=int, default=0, show_default=True, help="Base PRNG seed.")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Run folder (one run configuration per folder).")
@click.option("--inner-steps", type=int, default=3, show_default=True, help="K (MGRL only).")
@click.option("--meta-params", default="gamma,lam,entropy,value", show_default=True,
              help="Meta-learned parameters (MGRL only).")
@click.option("--lr", type=float, default=7e-4, show_default=True, help="Inner learning rate.")
@click.option("--meta-lr", type=float, default=1e-3, show_default=True)
@click.option("--outer-kl", type=float, default=0.0, show_default=True,
              help="Weight of KL(π_before ‖ π_after) in the outer loss.")
@click.option("--log-points", type=int, default=100, show_default=True,
              help="How many times to log (and checkpoint) during the run.")
@click.option("--resume", is_flag=True, help="Continue the interrupted run in --out (an error if "
              "there is none). Re-running the same command without it also continues it.")
@click.option("--tensorboard", is_flag=True, help="Also write TensorBoard events (tensorboardX).")
@click.option("--progress/--no-progress", default=True, show_default=True)
def mgrl_command(env, algo, preset, frames, seeds, seed, out, inner_steps, meta_params, lr,
                 meta_lr, outer_kl, log_points, resume, tensorboard, progress):
    """Train A2C, MGRL or MGRL-LVC on a gymnax (or Atari) environment; log returns and η to CSV."""
    from gmrl import runs
    from gmrl.io import atomic_write_json
    from gmrl.runs import mgrl as mgrl_runs
    from gmrl.store import config_key

    check_env(env)
    check_numbers(seeds, seed, frames, {"--lr": lr, "--meta-lr": meta_lr, "--outer-kl": outer_kl})
    overrides = {"learning_rate": lr, "preset": preset}
    if algo != "a2c":
        overrides.update(inner_steps=inner_steps,
                         meta_params=parse_names(meta_params, META_PARAMS, "meta-parameters"),
                         meta_lr=meta_lr, outer_kl_coef=outer_kl)
    point = mgrl_runs.run_config(algo, env, frames, seeds, seed, log_points, overrides)
    if resume:  # before building anything: only files are read
        stored = (out / runs.STORE_NAME).is_file() and _stored(out, config_key(point))
        require(mgrl_runs.has_run(out, point) or stored,
                f"--resume: {out} holds no run with these settings to continue; run without "
                "--resume to start one")
    mgrl_runs.algorithm_of(point)  # an environment that will not build: fail before writing
    with runs.folder_run(out):
        runs.claim_folder(out, point, "MGRL run")
        (result,) = mgrl_runs.run([point], out, run_dir=out, progress=progress,
                                  tensorboard=tensorboard)
        summary = result["summary"]
        atomic_write_json(out / "summary.json", summary, NULL_REASONS)
    returns = summary["final_return_per_seed"]
    finished = [r for r in returns if math.isfinite(r)]
    final = (f"final return {sum(finished) / len(finished):.2f} (per seed "
             f"{', '.join(f'{r:.1f}' for r in returns)})" if finished else
             "no episode finished in the last log points (no final return; train for more "
             "--frames)")
    click.echo(f"{algo} on {env}: {final}, median {summary['median_fps']:.0f} frames/s; logs in "
               f"{out}")


NULL_REASONS = {
    "final_return_per_seed": "no episode of this seed finished in the last log points",
    "final_entropy_per_seed": "no entropy logged",
}
"""Why a summary.json field of an MGRL run can be null (NaN in the numbers)."""


PER_SEED_BYTES = 4 * (32 * 200_000 + 16 * 64 * 5 * 4 * 512)
"""Estimated bytes one seed of a run allocates: ~32 float32 copies of a ~200k-parameter network
(parameters, optimiser and meta-optimiser states, the K inner steps' parameters and their
derivatives) and ~16 float32 values per observation element of the 64 envs × 5 steps rollout
for each of K + 1 = 4 rollouts (MinAtar: 10 × 10 × ≤ 10 channels, padded to 512)."""


def check_numbers(seeds: int, seed: int, frames: int, rates: dict[str, float | None]) -> None:
    """Seed range, frames within int64, seeds that fit in memory, finite non-negative rates."""
    from gmrl.limits import require_finite, require_int64, require_memory, require_seed

    require_seed(seed)
    require_int64(frames, "--frames")
    for option, value in rates.items():
        require_finite(value, option, nonnegative=True)
    if seeds >= 1:
        require_memory("--seeds", seeds, lambda n: n * PER_SEED_BYTES)


def _stored(out: Path, key: str) -> bool:
    from gmrl import runs
    from gmrl.store import ResultStore

    with ResultStore(out / runs.STORE_NAME) as store:
        return store.get(key) is not None


@click.command("mgrl")
@click.option("--out", type=click.Path(path_type=Path), default=Path("results/mgrl"),
              show_default=True)
@click.option("--quick", is_flag=True,
              help="Breakout only, 2 seeds, 100k frames, a small bias diagnostic: a few minutes "
                   "on 2 CPU cores.")
@click.option("--games", default=",".join(DEFAULT_STUDY_GAMES), show_default=True,
              help=f"Comma list among {', '.join(STUDY_GAMES)}.")
@click.option("--frames", type=int, default=None,
              help="Frames per seed for every game [default: Breakout-MinAtar 10M, "
                   "SpaceInvaders-MinAtar 5M, others 5M].")
@click.option("--seeds", type=int, default=5, show_default=True)
@click.option("--lr", type=float, default=None,
              help="Inner (and A2C) learning rate for every run [default: the preset's, 7e-4]; "
                   "the reference preset's α is small for MinAtar (docs/mgrl.md).")
@click.option("--preset", type=click.Choice(PRESETS), default="reference", show_default=True,
              help=PRESET_HELP)
@click.option("--backend", type=click.Choice(["local", "ray"]), default="local",
              show_default=True, help="local: in-process; ray: one Ray task per run.")
@click.option("--address", default=None, help="Ray cluster address (with --backend ray).")
@click.option("--progress/--no-progress", default=True, show_default=True)
def mgrl_study(out, quick, games, frames, seeds, lr, preset, backend, address, progress):
    """a2c vs mgrl vs mgrl-lvc (reference preset, 5 seeds): Breakout-MinAtar 10M and
    SpaceInvaders-MinAtar 5M frames; curves of return, entropy and the four meta-parameters; the
    bias diagnostic at three snapshots of every mgrl run; report.md with the LVC verdict.
    Resumable: re-running continues interrupted runs and skips finished ones."""
    from gmrl import runs
    from gmrl.runs import mgrl as mgrl_runs

    require(address is None or backend == "ray", "--address applies only to --backend ray")
    games = parse_names(games, ENVS, "game(s)")
    check_numbers(seeds, 0, 1 if frames is None else frames, {"--lr": lr})
    bias_settings = None  # gmrl.algos.mgrl_bias.BiasSettings() defaults
    if quick:
        context = click.get_current_context()
        given = [f"--{n}" for n in ("games", "frames", "seeds")
                 if context.get_parameter_source(n) != click.core.ParameterSource.DEFAULT]
        require(not given, f"--quick sets the games, frames and seeds itself; leave out "
                           f"{', '.join(given)} or drop --quick")
        from gmrl.algos.mgrl_bias import BiasSettings

        games, frames, seeds = ("Breakout-MinAtar",), 100_000, 2
        bias_settings = BiasSettings(repeats=8, ref_multiplier=4, ref_parts=2, dice_multiplier=2,
                                     bootstrap=500)
    overrides = {"preset": preset} if lr is None else {"preset": preset, "learning_rate": lr}
    mgrl_runs.study_points(games, frames, seeds, 1, overrides=overrides)  # bad settings: fail early
    settings = {"command": "study mgrl", "quick": quick, "frames": frames, "seeds": seeds,
                "overrides": overrides}  # --games may grow: finished runs are reused
    with runs.folder_run(out):
        runs.claim_folder(out, settings, "MGRL study")
        report = mgrl_runs.run_study(out, games, frames, seeds, log_points=50 if quick else 100,
                                     overrides=overrides, bias_settings=bias_settings,
                                     backend=backend, address=address, progress=progress)
    click.echo(report.read_text(encoding="utf-8"))
    click.echo(f"report: {report}")


def register(cli: click.Group, study: click.Group) -> None:
    cli.add_command(mgrl_command)
    study.add_command(mgrl_study)
