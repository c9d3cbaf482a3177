"""`gmrl lola` (one LOLA-DiCE variant on the IPD) and `gmrl study lola` (the reference variants and controls).

Thin CLI code over `gmrl.runs.lola` (runs as points of the sweep engine and result store) and
`gmrl.algos.lola` (the algorithm). Library imports happen inside the commands, so that loading
this module (for `gmrl --help`) costs nothing.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import click

from gmrl.devices import CPU_DEVICES_HELP, use_cpu_devices
from gmrl.errors import require
from gmrl.limits import require_finite, require_seed

BASELINES = ("return", "reference")  # gmrl.algos.lola.BASELINES (tested equal), without JAX
BASELINE_HELP = ("return: V fitted to the return-to-go, used in every sampled part; reference: "
                 "V fitted to r_t and no baseline in the on-policy inner parts of off-policy "
                 "variants, as the reference code.")
BACKEND_HELP = "local: in-process; ray: one Ray task per run (see --address)."


def run_bytes(sizes: dict[str, int]) -> float:
    """Estimated bytes a LOLA-DiCE run allocates, from its sizes (seeds, updates, horizon, comp,
    hessian, outer, lookaheads, replay; 0 for an exact part or no replay): per seed and update
    block, the sampled episodes of both players (comp + hessian per lookahead step, outer) ×
    horizon × ~64 float32 values a step (states, actions, log-probabilities, returns and their
    derivatives), the replay, and the per-update curves (updates × ~10 float64)."""
    episodes = 2 * (sizes["comp"] + sizes["hessian"]) * sizes["lookaheads"] + 2 * sizes["outer"]
    return float(sizes["seeds"]) * (4.0 * sizes["horizon"] * (64 * episodes + 16 * sizes["replay"])
                                    + 80.0 * sizes["updates"])


def require_run_memory(sizes: dict[str, int], options: dict[str, tuple[str, ...]]) -> None:
    """InputError naming the size option (--seeds, --horizon, --inner, ...) that does not fit.

    options: option -> the size fields it sets (--inner sets comp and hessian)."""
    from gmrl.limits import require_sizes

    defaults = {"seeds": 10, "updates": 500, "horizon": 100, "replay": 1024, "comp": 128,
                "hessian": 128, "outer": 128, "lookaheads": 1}

    def bytes_of(values):
        changed = dict(sizes)
        for option, value in values.items():
            changed |= {field: value for field in options[option]}
        return run_bytes(changed)

    require_sizes({o: (sizes[f[0]], defaults[f[0]]) for o, f in options.items()}, bytes_of)


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
    from gmrl.runs import lola as lola_runs  # JAX is imported only once the options passed

    lola_runs.check_run_size(seeds, updates, chunk)
    require_seed(seed)
    for option, value in (("--inner-lr", inner_lr), ("--outer-lr", outer_lr),
                          ("--value-lr", value_lr), ("--gamma", gamma), ("--clip-rho", clip_rho)):
        require_finite(value, option, positive=True)
    inner_size = lola_runs.parse_source(inner, "--inner")
    parts = {"comp": inner_size if comp is None else lola_runs.parse_source(comp, "--comp"),
             "hessian": inner_size if hessian is None else lola_runs.parse_source(hessian, "--hessian"),
             "outer": lola_runs.parse_source(outer, "--outer")}
    for option, value in (("--lookaheads", lookaheads), ("--horizon", horizon),
                          ("--replay-size", replay_size)):
        require(value >= 1, f"{option} must be >= 1, got {value}")
    off = off_policy or off_policy_comp or off_policy_hessian
    sizes = {"seeds": seeds, "updates": updates, "horizon": horizon, "lookaheads": lookaheads,
             "replay": replay_size if off else 0, **{k: v or 0 for k, v in parts.items()}}
    options = {"--seeds": ("seeds",), "--updates": ("updates",), "--horizon": ("horizon",),
               "--lookaheads": ("lookaheads",), "--outer": ("outer",)}
    if off:
        options["--replay-size"] = ("replay",)
    if comp is None and hessian is None:
        options["--inner"] = ("comp", "hessian")
    else:
        options |= {"--comp": ("comp",), "--hessian": ("hessian",)}
    require_run_memory(sizes, options)
    use_cpu_devices(cpu_devices)  # before JAX starts
    from gmrl import runs
    from gmrl.algos import lola

    cfg = lola.LolaConfig(
        **parts,
        comp_off_policy=off_policy or off_policy_comp,
        hessian_off_policy=off_policy or off_policy_hessian,
        replay_size=replay_size, clip_rho=clip_rho, replay_weights=replay_weights,
        independent_inner=independent_inner, lookaheads=lookaheads,
        inner_lr=inner_lr, outer_lr=outer_lr, value_lr=value_lr, baseline=baseline,
        gamma=gamma, horizon=horizon).validate()
    point = lola_runs.run_config(cfg, seeds, updates, seed, "lola")
    with contextlib.nullcontext() if out is None else runs.folder_run(out):
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
    from gmrl.runs import lola as lola_runs

    lola_runs.check_run_size(seeds, updates, chunk, min_seeds=2)
    require_seed(seed)
    require(error_draws >= 0, f"--error-draws must be >= 0, got {error_draws}")
    require_run_memory({"seeds": seeds, "updates": updates, "horizon": 100, "lookaheads": 1,
                        "replay": 1024, "comp": 128, "hessian": 128, "outer": 128},
                       {"--seeds": ("seeds",), "--updates": ("updates",)})
    use_cpu_devices(cpu_devices)  # before JAX starts
    from gmrl import runs
    from gmrl.algos import lola
    names = list(lola.STUDY_VARIANTS) if variants.strip() == "all" else [
        v.strip() for v in variants.split(",") if v.strip()]
    points = lola_runs.study_points(names, seeds, updates, seed, baseline)
    error_points = (lola_runs.error_points(names, error_draws, seed, baseline) if error_draws
                    else [])
    settings = {"command": "study lola", "seeds": seeds, "updates": updates, "seed": seed,
                "baseline": baseline}  # --variants may grow: finished variants are reused
    with runs.folder_run(out):
        runs.claim_folder(out, settings, "LOLA study")
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
