"""`gmrl lola` (one LOLA-DiCE variant on the IPD) and `gmrl study lola` (the reference variants and controls).

Thin CLI code over `gmrl.runs.lola` (runs as points of the sweep engine and result store) and
`gmrl.algos.lola` (the algorithm). Library imports happen inside the commands, so that loading
this module (for `gmrl --help`) costs nothing.
"""

from __future__ import annotations

from pathlib import Path

import click

from gmrl.devices import CPU_DEVICES_HELP, use_cpu_devices
from gmrl.errors import require

BASELINES = ("return", "reference")  # gmrl.algos.lola.BASELINES (tested equal), without JAX
BASELINE_HELP = ("return: V fitted to the return-to-go, used in every sampled part; reference: "
                 "V fitted to r_t and no baseline in the on-policy inner parts of off-policy "
                 "variants, as the reference code.")
BACKEND_HELP = "local: in-process; ray: one Ray task per run (see --address)."


@click.command("lola")
@click.option("--inner", default="128", show_default=True,
              help="Opponent-lookahead gradient source for both parts: exact | N episodes.")
@click.option("--comp", default=None, help="Compositional part (step value): exact | N "
              "(overrides --inner).")
@click.option("--hessian", default=None, help="Hessian part (step Jacobian): exact | N "
              "(overrides --inner).")
@click.option("--outer", default="128", show_default=True,
              help="Own objective at the lookahead: exact | N episodes.")
@click.option("--off-policy", is_flag=True, help="Both parts from the importance-weighted replay.")
@click.option("--off-policy-comp", is_flag=True, help="Compositional part from the replay.")
@click.option("--off-policy-hessian", is_flag=True, help="Hessian part from the replay.")
@click.option("--replay-size", type=int, default=1024, show_default=True,
              help="Episodes in the persistent FIFO replay of the off-policy parts.")
@click.option("--clip-rho", type=float, default=None,
              help="Truncate each per-decision importance ratio at this value (less variance, "
                   "some bias); default: no truncation.")
@click.option("--replay-weights/--no-replay-weights", default=True, show_default=True,
              help="--no-replay-weights: the replay without importance weights (uncorrected "
                   "control).")
@click.option("--independent-inner", is_flag=True,
              help="Step value and Jacobian from independent batches even at equal sizes.")
@click.option("--lookaheads", "-K", type=int, default=1, show_default=True,
              help="Opponent lookahead steps K.")
@click.option("--inner-lr", type=float, default=0.3, show_default=True)
@click.option("--outer-lr", type=float, default=0.1, show_default=True, help="Adam lr of θ.")
@click.option("--value-lr", type=float, default=0.1, show_default=True, help="Adam lr of V.")
@click.option("--baseline", type=click.Choice(BASELINES), default="return", show_default=True,
              help=BASELINE_HELP)
@click.option("--gamma", type=float, default=0.96, show_default=True)
@click.option("--horizon", "-T", type=int, default=100, show_default=True,
              help="Episode length.")
@click.option("--seeds", type=int, default=10, show_default=True)
@click.option("--updates", type=int, default=500, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--chunk", type=int, default=50, show_default=True,
              help="Updates per compiled block (progress and CSV granularity; same numbers).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Folder for config.json, results.sqlite, per_seed.csv, curves.csv and "
                   "summary.json (one run configuration per folder; re-running resumes).")
@click.option("--cpu-devices", type=int, default=None, help=CPU_DEVICES_HELP)
@click.option("--progress/--no-progress", default=True, show_default=True)
def lola_command(inner, comp, hessian, outer, off_policy, off_policy_comp, off_policy_hessian,
                 replay_size, clip_rho, replay_weights, independent_inner, lookaheads, inner_lr,
                 outer_lr, value_lr, baseline, gamma, horizon, seeds, updates, seed, chunk, out, cpu_devices,
                 progress):
    """LOLA-DiCE on the iterated prisoner's dilemma, with the exact LOLA gradient beside it."""
    use_cpu_devices(cpu_devices)  # before JAX starts
    from gmrl import runs
    from gmrl.algos import lola
    from gmrl.runs import lola as lola_runs

    lola_runs.check_run_size(seeds, updates, chunk)
    inner_size = lola_runs.parse_source(inner, "--inner")
    cfg = lola.LolaConfig(
        comp=inner_size if comp is None else lola_runs.parse_source(comp, "--comp"),
        hessian=inner_size if hessian is None else lola_runs.parse_source(hessian, "--hessian"),
        outer=lola_runs.parse_source(outer, "--outer"),
        comp_off_policy=off_policy or off_policy_comp,
        hessian_off_policy=off_policy or off_policy_hessian,
        replay_size=replay_size, clip_rho=clip_rho, replay_weights=replay_weights,
        independent_inner=independent_inner, lookaheads=lookaheads,
        inner_lr=inner_lr, outer_lr=outer_lr, value_lr=value_lr, baseline=baseline,
        gamma=gamma, horizon=horizon).validate()
    point = lola_runs.run_config(cfg, seeds, updates, seed, "lola")
    if out is not None:
        runs.claim_folder(out, point, "LOLA run")
    (result,) = lola_runs.run([point], out, chunk=chunk, progress=progress,
                              per_seed_csv=None if out is None else out / "per_seed.csv")
    if out is not None:
        lola_runs.write_run_files(out, "lola", result)
    click.echo(lola_runs.describe(result))


@click.command("lola")
@click.option("--seeds", type=int, default=40, show_default=True,
              help="Seeds per variant: 40 detect a final-return difference of about 0.3 with "
                   "80% power (report.md gives the figure); --seeds 10 is the quick study.")
@click.option("--updates", type=int, default=500, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--variants", default="all", show_default=True,
              help="Comma-separated subset of the study variants (see docs/lola.md), or all.")
@click.option("--baseline", type=click.Choice(BASELINES), default="return", show_default=True,
              help=BASELINE_HELP)
@click.option("--chunk", type=int, default=50, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("results/lola"),
              show_default=True, help="Result folder (results.sqlite: finished variants are reused "
                                      "on rerun).")
@click.option("--backend", type=click.Choice(["local", "ray"]), default="local",
              show_default=True, help=BACKEND_HELP)
@click.option("--address", default=None, help="Ray cluster address (with --backend ray).")
@click.option("--error-draws", type=int, default=16, show_default=True,
              help="Draws of each variant's LOLA gradient at fixed points of the exact run, for "
                   "its bias² and variance against the exact gradient (0: skip).")
@click.option("--cpu-devices", type=int, default=None, help=CPU_DEVICES_HELP)
@click.option("--progress/--no-progress", default=True, show_default=True)
def study_lola_command(seeds, updates, seed, variants, baseline, chunk, out, backend, address,
                       error_draws, cpu_devices, progress):
    """The LOLA-DiCE study: 11 reference variants and 5 controls, figures, curves.csv, report.md."""
    require(address is None or backend == "ray", "--address applies only to --backend ray")
    use_cpu_devices(cpu_devices)  # before JAX starts
    from gmrl.algos import lola
    from gmrl.io import prepare_output_dir
    from gmrl.runs import lola as lola_runs

    lola_runs.check_run_size(seeds, updates, chunk, min_seeds=2)
    names = list(lola.STUDY_VARIANTS) if variants.strip() == "all" else [
        v.strip() for v in variants.split(",") if v.strip()]
    points = lola_runs.study_points(names, seeds, updates, seed, baseline)
    error_points = (lola_runs.error_points(names, error_draws, seed, baseline) if error_draws
                    else [])
    prepare_output_dir(out)
    results = lola_runs.run(points, out, chunk=chunk, backend=backend, address=address,
                            progress=progress)
    for point, result in zip(points, results, strict=True):
        click.echo(f"{point['variant']}: {lola_runs.describe(result)}")
    errors = lola_runs.run_errors(error_points, out, backend=backend, address=address,
                                  progress=progress) if error_points else []
    lola_runs.write_study(out, points, results,
                          {p["variant"]: e for p, e in zip(error_points, errors, strict=True)})
    click.echo(f"wrote {out / 'report.md'}, curves.csv, joint_score.png, correlation.png, "
               "final_joint_score.png")


def register(cli: click.Group, study: click.Group) -> None:
    """Add `gmrl lola` and `gmrl study lola`."""
    cli.add_command(lola_command)
    study.add_command(study_lola_command)
