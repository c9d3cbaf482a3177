"""Figures of a study's result store: a metric against the study's x axis, one line per code or
estimator, error bars from the 95% CIs (bias2: jackknife; docs/design.md, statistics), one panel per
`PANELS` value.

Figures are drawn on `matplotlib.figure.Figure` objects, not through pyplot, so the caller's
matplotlib backend is left as it is; PNGs are written atomically (`gmrl.io.atomic_savefig`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from gmrl.errors import require
from gmrl.stats import Z95
from gmrl.store import ResultStore
from gmrl.studies.tabular import LINES, PANELS, X_AXIS

METRICS = ("bias2", "corr", "std_sum", "mse_of_mean")
LOG_X = {"samples"}


def load_rows(out_dir: Path) -> list[dict[str, Any]]:
    """Every stored point of DIR/results.sqlite as one dict: config fields, then result fields."""
    path = Path(out_dir) / "results.sqlite"
    require(path.is_file(), f"no result store at {path}; run `gmrl study NAME --out {out_dir}` first")
    with ResultStore(path) as store:
        return [{**row.config, **row.result} for row in store.rows()]


def series(rows: list[dict], study: str) -> dict[tuple, list[dict]]:
    """Rows grouped by (panel value, line value), each sorted by the x axis."""
    x, line, panel = X_AXIS[study], LINES[study], PANELS.get(study)
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["study"] == study:
            groups.setdefault((row.get(panel) if panel else None, row[line]), []).append(row)
    return {k: sorted(v, key=lambda r: r[x]) for k, v in sorted(groups.items(), key=str)}


def plot_study(rows: list[dict], study: str, out_dir: Path) -> list[Path]:
    """One PNG per metric (bias2 ± CI, corr, std_sum, mse_of_mean), plus param_error for comp-*."""
    from matplotlib.figure import Figure

    from gmrl.io import atomic_savefig

    groups = series(rows, study)
    require(bool(groups), f"the store holds no rows of study {study!r}")
    panels = sorted({k[0] for k in groups}, key=str)
    x_name = X_AXIS[study]
    metrics = METRICS + (("param_error",) if any("param_error" in r for r in rows
                                                 if r.get("study") == study) else ())
    written = []
    for metric in metrics:
        fig = Figure(figsize=(4.2 * len(panels), 3.6))
        axes = fig.subplots(1, len(panels), squeeze=False)
        for ax, panel in zip(axes[0], panels, strict=True):
            for (p, line), points in groups.items():
                if p != panel:
                    continue
                xs = np.array([r[x_name] for r in points], float)
                if metric == "param_error":
                    ys = np.array([r["param_error"][-1] for r in points])
                    err = Z95 * np.array([r["param_error_se"][-1] for r in points])
                elif metric == "bias2":
                    ys = np.array([r["bias2"] for r in points])
                    err = Z95 * np.array([r["bias2_se"] for r in points])
                else:
                    ys, err = np.array([r[metric] for r in points]), None
                ax.errorbar(xs, ys, yerr=err, marker="o", ms=3, capsize=2, label=str(line))
            if x_name in LOG_X:
                ax.set_xscale("log", base=2)
            if metric in ("bias2", "mse_of_mean", "param_error"):
                ax.set_yscale("symlog", linthresh=_linthresh(rows, study, metric))
            ax.set_xlabel(x_name)
            ax.set_title(f"{PANELS[study]}={panel}" if panel is not None else study, fontsize=9)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel(metric + (" (final step)" if metric == "param_error" else ""))
        axes[0][-1].legend(fontsize=7, title=LINES[study], title_fontsize=7)
        fig.suptitle(f"{study}: {metric} (95% CI)" if metric == "bias2" else f"{study}: {metric}",
                     fontsize=10)
        fig.tight_layout()
        path = Path(out_dir) / f"{study}_{metric}.png"
        atomic_savefig(fig, path, dpi=110)
        written.append(path)
    return written


def _linthresh(rows, study, metric) -> float:
    """Linear range of the symlog axis: the median 95% CI half-width (noise stays near zero)."""
    if metric == "bias2":
        values = [Z95 * r["bias2_se"] for r in rows if r["study"] == study]
    else:
        values = [abs(r[metric][-1] if metric == "param_error" else r[metric])
                  for r in rows if r["study"] == study]
    positive = [v for v in values if v > 0]
    return max(float(np.median(positive)), 1e-12) if positive else 1e-12


def write_csv(out_dir: Path) -> Path:
    """DIR/results.csv from the store: one line per point, config then statistics (atomic)."""
    with ResultStore(Path(out_dir) / "results.sqlite") as store:
        return store.export_csv(Path(out_dir) / "results.csv")
