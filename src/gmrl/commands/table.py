"""The table `gmrl tabular` prints for every problem (MAML, LIRPG, tabular MGRL)."""

from __future__ import annotations


def format_table(summary: dict) -> str:
    """One row per MDP and a pooled row: corr, std_sum, mse_of_mean, bias2 ± 95% half-width (t
    interval, `gmrl.stats.bias2`), relative bias ‖E ĝ − g*‖/‖g*‖ [95% CI]; then how many MDPs are
    individually significant."""
    per = summary["per_mdp"]
    header = (f"{'mdp':>6} {'corr':>8} {'std_sum':>10} {'mse_of_mean':>12} {'bias2 ± 95% CI':>26} "
              f"{'rel. bias [95% CI]':>24}")
    lines = [header, "-" * len(header)]

    def row(name, corr, std, mse, b2, low, high, rel, rel_low, rel_high):
        return (f"{name:>6} {corr:>8.4f} {std:>10.4g} {mse:>12.4g} {b2:>13.4g} ± {(high - low) / 2:<10.3g} "
                f"{rel:>7.3g} [{rel_low:.2g}, {rel_high:.2g}]")

    for m in range(len(per["corr"])):
        lines.append(row(m, *(per[k][m] for k in ("corr", "std_sum", "mse_of_mean", "bias2", "bias2_ci_low",
                                                   "bias2_ci_high", "rel_bias", "rel_bias_ci_low",
                                                   "rel_bias_ci_high"))))
    lines.append("-" * len(header))
    lines.append(row("all", *(summary[k] for k in ("corr", "std_sum", "mse_of_mean", "bias2", "bias2_ci_low",
                                                   "bias2_ci_high", "rel_bias", "rel_bias_ci_low",
                                                   "rel_bias_ci_high"))))
    lines.append(f"{summary['significant_mdps']} of {summary['num_mdps']} MDP(s) with bias2 significantly "
                 "above 0 (95% CI)")
    return "\n".join(lines)
