"""Run tabular studies into one result store and write their tables, figures and reports.

`run_studies(["decompose"], out)` is what `gmrl study decompose` does; `run_studies(STUDIES, out)` is
`gmrl study all`, which adds the combined `report.md` of `gmrl.studies.verdicts`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gmrl.errors import require
from gmrl.studies import tabular as studies


def study_points(names: Sequence[str], quick: bool = False, oracle: str = "infinite", seed: int = 0,
                 theta0: str | list = "zeros", overrides: Mapping[str, Any] | None = None,
                 max_groups: int | None = None,
                 estimators: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The points of every study in `names`, in order."""
    return [p for name in names for p in studies.study_points(
        name, quick, oracle, seed, overrides, max_groups, theta0, estimators)]


def run_studies(names: Sequence[str], out: Path, *, quick: bool = False, oracle: str = "infinite",
                seed: int = 0, theta0: str | list = "zeros", backend: str = "local",
                address: str | None = None, progress: bool = True,
                overrides: Mapping[str, Any] | None = None, max_groups: int | None = None,
                estimators: Sequence[str] | None = None) -> tuple[Any, float, list[Path]]:
    """Compute the missing points of `names` into out/results.sqlite, then write the outputs.

    Returns (sweep summary, wall seconds, written paths).
    """
    from gmrl.io import folder_lock
    from gmrl.runs import claim_folder
    from gmrl.store import ResultStore
    from gmrl.sweep import run_sweep

    out = Path(out)
    points = study_points(names, quick, oracle, seed, theta0, overrides, max_groups, estimators)
    settings = {"studies": list(names), "quick": quick, "oracle": oracle, "seed": seed,
                "theta0": theta0, "overrides": dict(overrides or {}), "max_groups": max_groups,
                "estimators": list(estimators) if estimators else None}
    started = time.perf_counter()
    claim_folder(out, settings, "tabular study")  # one folder, one study configuration
    with folder_lock(out), ResultStore(out / "results.sqlite") as store:
        summary = run_sweep(points, studies.compute_point, store, backend=backend, address=address,
                            batch_fn=studies.batch_points, group_key=studies.group_key,
                            progress=progress, description="study " + "+".join(names))
        seconds = time.perf_counter() - started
        return summary, seconds, write_outputs(out, list(names), seconds, combined=len(names) > 1)


def default_out(name: str, quick: bool, oracle: str, seed: int, theta0: str) -> Path:
    """results/NAME, with -quick, -finite, -seedS, -theta0-normal|file for non-default settings."""
    parts = [name] + (["quick"] if quick else []) + ([oracle] if oracle != "infinite" else [])
    parts += ([f"seed{seed}"] if seed != 0 else []) + (
        [f"theta0-{theta0 if theta0 in ('zeros', 'normal') else 'file'}"] if theta0 != "zeros" else [])
    return Path("results") / "-".join(parts)


def write_outputs(out: Path, names: Sequence[str] | None = None, seconds: float | None = None,
                  combined: bool | None = None) -> list[Path]:
    """results.csv, figures and a report per study in out's store (or only `names`); with several
    studies, `report_NAME.md` each and the combined verdict report `report.md`."""
    from gmrl.studies import plots, report, verdicts

    rows = plots.load_rows(out)
    stored = sorted({r["study"] for r in rows if r.get("study") in studies.STUDIES})
    names = list(names) if names else stored
    require(bool(names), f"the store in {out} holds no tabular study rows")
    combined = len(names) > 1 if combined is None else combined
    written = [plots.write_csv(out)]
    for name in names:
        written += plots.plot_study(rows, name, out)
        written.append(report.write_report(
            rows, name, out / (f"report_{name}.md" if combined else "report.md"), seconds))
    if combined:
        written.append(verdicts.write_verdict_report(rows, out / "report.md", seconds))
    return written
