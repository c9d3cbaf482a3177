"""`gmrl study NAME` and `gmrl study all` for the reference tabular studies, and `gmrl plot DIR`."""

from __future__ import annotations

from pathlib import Path

import click

from gmrl.errors import require
from gmrl.limits import require_seed
from gmrl.studies import tabular as studies


def _theta0(text: str):
    """zeros | normal | FILE.npy holding an [S, A] = [20, 5] table (as nested lists in the config)."""
    from gmrl.commands.tabular import parse_theta0

    value = parse_theta0(text, 20, 5)
    return value if isinstance(value, str) else value.tolist()


def _estimators(text: str | None) -> list[str] | None:
    """The --estimators comma list (None: the study's own axis); an empty list is an error."""
    if text is None:
        return None
    names = [e.strip() for e in text.split(",") if e.strip()]
    require(bool(names), f"--estimators names no estimator (got {text!r}); give a comma list of "
                         "estimator names, or leave it out for the study's own")
    return names


def _study_command(name: str, names: tuple[str, ...], help_text: str) -> click.Command:
    @click.command(name=name, help=help_text)
    @click.option("--quick", is_flag=True, help="Fewer grid values (CI scale, about a minute).")
    @click.option("--backend", type=click.Choice(["local", "ray"]), default="local",
                  show_default=True, help="local: in-process, vectorised; ray: a task per group.")
    @click.option("--address", default=None, help="Ray cluster address (with --backend ray).")
    @click.option("--out", type=click.Path(path_type=Path), default=None,
                  help=f"Folder for results.sqlite, results.csv, PNGs, report.md [default: results/{name}, "
                       "with -quick, -finite, -seedS, -theta0-… for other settings].")
    @click.option("--oracle", type=click.Choice(["infinite", "finite"]), default="infinite",
                  show_default=True, help="finite: exact expectations of the sampled surrogates.")
    @click.option("--theta0", default="zeros", show_default=True,
                  help="MAML's θ0: zeros (as in the reference), normal (N(0,1) per MDP) or FILE.npy [20, 5].")
    @click.option("--estimators", default=None,
                  help="Comma list replacing the estimator axis (registered surrogates allowed; see "
                       "docs/check.md, 'Your own estimator').")
    @click.option("--seed", type=int, default=0, show_default=True)
    @click.option("--progress/--no-progress", default=True, show_default=True)
    @click.option("--mdps", type=click.IntRange(min=1), default=None, hidden=True,
                  help="Testing: MDPs per point instead of the study's.")
    @click.option("--repeats", type=click.IntRange(min=3), default=None, hidden=True,
                  help="Testing: repeats per MDP instead of the study's (>= 3: bias2 needs 3).")
    @click.option("--max-groups", type=click.IntRange(min=1), default=None, hidden=True,
                  help="Testing: only the points of the first N compiled programs per study.")
    def command(quick, backend, address, out, oracle, theta0, estimators, seed, progress, mdps,
                repeats, max_groups):
        from gmrl.runs import folder_run
        from gmrl.studies.run import default_out, run_studies

        require(address is None or backend == "ray", "--address applies only to --backend ray")
        require_seed(seed)
        overrides = {k: v for k, v in (("mdps", mdps), ("repeats", repeats)) if v is not None}
        if out is None:
            out = default_out(name, quick, oracle, seed, theta0)
        theta0 = _theta0(theta0)
        with folder_run(out):  # the lock before anything is written; a failure leaves out as it was
            summary, seconds, written = run_studies(
                names, out, quick=quick, oracle=oracle, seed=seed, theta0=theta0,
                backend=backend, address=address, progress=progress, overrides=overrides,
                max_groups=max_groups, estimators=_estimators(estimators))
        click.echo(f"gmrl study {name}: {summary.computed} points computed, {summary.skipped} "
                   f"already stored, {seconds:.1f} s")
        for path in written:
            click.echo(f"wrote {path}")

    return command


@click.command(name="mgrl-tabular")
@click.option("--quick", is_flag=True, help="CI scale (about a minute).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Folder for part_a.json, part_b.json, PNGs, report.md [default: results/mgrl-tabular"
                   "[-quick]].")
@click.option("--seed", type=int, default=0, show_default=True)
def mgrl_tabular_study(quick, out, seed):
    """Tabular MGRL: meta-gradient bias of vanilla / LVC / unbiased estimators in (γ, λ) and the
    closed-loop final return (docs/mgrl_tabular.md). Resumable per part."""
    from gmrl.studies.mgrl_tabular import run_study

    out = out if out is not None else Path("results") / ("mgrl-tabular" + ("-quick" if quick else ""))
    written, seconds = run_study(out, quick=quick, seed=seed, progress=click.echo)
    click.echo(f"gmrl study mgrl-tabular: {seconds:.1f} s")
    for path in written:
        click.echo(f"wrote {path}")


@click.command(name="plot")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
def plot(directory: Path) -> None:
    """Redraw figures, results.csv and report.md from DIRECTORY/results.sqlite (a tabular or
    LOLA study, a LOLA run; MGRL folders are redrawn by re-running their command)."""
    from gmrl.io import folder_lock
    from gmrl.studies.run import write_outputs

    kind = _stored_kind(directory)
    require(kind != "mgrl", f"{directory} holds MGRL runs: re-run the `gmrl mgrl` or `gmrl study "
                            "mgrl` command that wrote it (finished runs are reused) to redraw its "
                            "report and figures")
    with folder_lock(directory, "DIR"):
        written = _plot_lola(directory) if kind == "lola" else write_outputs(directory)
    for path in written:
        click.echo(f"wrote {path}")


def _stored_kind(directory: Path) -> str:
    """'tabular', 'lola' or 'mgrl': what DIRECTORY/results.sqlite holds (InputError if none)."""
    from gmrl.store import ResultStore

    path = Path(directory) / "results.sqlite"
    require(path.is_file(), f"no result store at {path}; give a folder written by `gmrl study`, "
                            "`gmrl lola --out` or `gmrl mgrl --out`")
    with ResultStore(path) as store:
        kinds = {row.config.get("study") for row in store.rows()}
    for kind in ("lola", "mgrl"):
        if kind in kinds:
            return kind
    return "tabular"


def _plot_lola(directory: Path) -> list[Path]:
    """A LOLA study's (`gmrl study lola`) or run's (`gmrl lola`) files from its store."""
    from gmrl.runs import lola as lola_runs
    from gmrl.store import ResultStore

    with ResultStore(Path(directory) / "results.sqlite") as store:
        rows = [r for r in store.rows() if r.config.get("study") == "lola"]
    single = len(rows) == 1 and rows[0].config.get("variant") == "lola"
    if single:
        return lola_runs.write_run_files(directory, "lola", rows[0].result)
    from gmrl.algos.lola import REFERENCE_VARIANTS

    order = list(REFERENCE_VARIANTS)
    rows.sort(key=lambda r: (order.index(r.config["variant"]) if r.config["variant"] in order
                             else len(order), r.config["variant"]))
    return lola_runs.write_study(directory, [r.config for r in rows], [r.result for r in rows])


def register(cli, study) -> None:
    for name in studies.STUDIES:
        study.add_command(_study_command(
            name, (name,), f"The reference tabular study `{name}` (docs/studies.md). Resumable: "
                           "re-running computes only the missing points."))
    study.add_command(_study_command(
        "all", studies.STUDIES, "All eight reference tabular studies at reference scale in one "
                                "store, with a combined report.md of verdicts (docs/studies.md)."))
    study.add_command(mgrl_tabular_study)
    cli.add_command(plot)
