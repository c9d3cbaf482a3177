"""Statistics and the printed table of the side-by-side comparison (numpy only, no torch, no gmrl).

A tabular row record (a dict, as stored in the harness's results JSON) holds per-repeat numbers of
both sides on the same MDPs:

    {"name": str, "settings": str,
     "reference": {"estimates": [M][R][d], "oracle": [M][d], "var_npy": [M], "corr_npy": [M],
                   "wall_s": float, "cpu_s": float},
     "gmrl": {"corr": [M][Rg], "std_sums": [M][C], "chunk": R, "exact": [M][d],
              "wall_s": float, "cpu_s": float}}

- corr: the centred cosine (Pearson correlation over the d coordinates) of one estimate with the
  side's own exact meta-gradient, averaged over all (MDP, repeat) pairs. Its standard error is
  conditional on the MDPs (both sides use the same ones): sqrt(Σ_m s²_m / R_m) / M, s²_m the
  ddof-1 variance of the per-repeat correlations on MDP m.
- var: the reference study's "variance", Σ_coords std_r(ĝ) with the ddof-1 std over the R repeats
  of one MDP, averaged over MDPs. gmrl's is the same statistic over chunks of the same R repeats
  (so that both carry the same small-sample bias of a standard deviation), averaged over chunks
  and MDPs. Standard error: reference, a delete-one jackknife over the repeats of each MDP;
  gmrl, the spread of the chunk values; combined over MDPs like the correlation's.
- z = (reference − gmrl) / sqrt(se_ref² + se_gmrl²).
- seconds: each side's whole-process wall-clock (start-up, imports, compilation included) for the
  same work, the reference's default grid point (its MDPs × repeats); ratio = reference / gmrl.
"""

from __future__ import annotations

import math

import numpy as np


def centred_cosine(estimates, truth) -> np.ndarray:
    """Per-repeat Pearson correlation over coordinates. estimates [..., R, d], truth [..., d] -> [..., R]."""
    e = np.asarray(estimates, np.float64)
    t = np.asarray(truth, np.float64)[..., None, :]
    e = e - e.mean(-1, keepdims=True)
    t = t - t.mean(-1, keepdims=True)
    return np.sum(e * t, -1) / (np.linalg.norm(e, axis=-1) * np.linalg.norm(t, axis=-1))


def std_sum(estimates) -> np.ndarray:
    """Σ_coords of the ddof-1 std over repeats. [..., R, d] -> [...]."""
    return np.asarray(estimates, np.float64).std(axis=-2, ddof=1).sum(-1)


def chunk_std_sums(estimates, chunk: int) -> np.ndarray:
    """std_sum over consecutive chunks of `chunk` repeats. [M, R, d] -> [M, R // chunk]."""
    e = np.asarray(estimates, np.float64)
    count = e.shape[1] // chunk
    return std_sum(e[:, :count * chunk].reshape(e.shape[0], count, chunk, e.shape[-1]))


def mean_se(per_mdp) -> tuple[float, float]:
    """Mean over MDPs of the per-MDP means of values [M][R_m], and its s.e. conditional on the MDPs."""
    groups = [np.asarray(g, np.float64) for g in per_mdp]
    mean = float(np.mean([g.mean() for g in groups]))
    se = math.sqrt(sum(g.var(ddof=1) / len(g) for g in groups)) / len(groups)
    return mean, se


def jackknife_std_sum(estimates) -> tuple[float, float]:
    """std_sum of one MDP's [R, d] estimates and its delete-one jackknife standard error."""
    e = np.asarray(estimates, np.float64)
    r = e.shape[0]
    value = float(std_sum(e))
    leave_one_out = np.array([std_sum(np.delete(e, i, axis=0)) for i in range(r)])
    se = math.sqrt((r - 1) / r * np.sum((leave_one_out - leave_one_out.mean()) ** 2))
    return value, se


def z_score(a: float, se_a: float, b: float, se_b: float) -> float:
    spread = math.hypot(se_a, se_b)
    return (a - b) / spread if spread > 0 else float("nan")


def tabular_row(record: dict) -> dict:
    """The numbers of one printed row from a row record (see the module docstring)."""
    ref, gm = record["reference"], record["gmrl"]
    ref_est = np.asarray(ref["estimates"], np.float64)
    ref_corr = centred_cosine(ref_est, ref["oracle"])
    corr_r, corr_r_se = mean_se(ref_corr)
    corr_g, corr_g_se = mean_se(gm["corr"])
    jack = [jackknife_std_sum(e) for e in ref_est]
    var_r = float(np.mean([v for v, _ in jack]))
    var_r_se = math.sqrt(sum(s**2 for _, s in jack)) / len(jack)
    var_g, var_g_se = mean_se(gm["std_sums"])
    # consistency with the reference's own saved per-MDP averages (float32 there)
    corr_check = float(np.max(np.abs(ref_corr.mean(-1) - np.asarray(ref["corr_npy"]))))
    var_check = float(np.max(np.abs(std_sum(ref_est) / np.asarray(ref["var_npy"]) - 1)))
    exact = np.asarray(gm["exact"], np.float64)
    oracle = np.asarray(ref["oracle"], np.float64)
    oracle_rel = float(np.max(np.abs(oracle - exact)) / np.max(np.abs(exact)))
    return {
        "name": record["name"], "settings": record.get("settings", ""),
        "mdps": ref_est.shape[0], "ref_repeats": ref_est.shape[1],
        "gmrl_repeats": int(sum(len(c) for c in gm["corr"]) // len(gm["corr"])),
        "corr_ref": corr_r, "corr_ref_se": corr_r_se, "corr_gmrl": corr_g, "corr_gmrl_se": corr_g_se,
        "corr_z": z_score(corr_r, corr_r_se, corr_g, corr_g_se),
        "var_ref": var_r, "var_ref_se": var_r_se, "var_gmrl": var_g, "var_gmrl_se": var_g_se,
        "var_z": z_score(var_r, var_r_se, var_g, var_g_se),
        "ref_wall_s": ref.get("wall_s"), "gmrl_wall_s": gm.get("wall_s"),
        "ref_cpu_s": ref.get("cpu_s"), "gmrl_cpu_s": gm.get("cpu_s"),
        "ratio": _ratio(ref.get("wall_s"), gm.get("wall_s")),
        "cpu_ratio": _ratio(ref.get("cpu_s"), gm.get("cpu_s")),
        "oracle_rel": oracle_rel, "corr_npy_diff": corr_check, "var_npy_rel": var_check,
    }


def lola_row(record: dict) -> dict:
    """LOLA: exact θ trajectories of both sides (already in gmrl's convention) and timings.

    record: {"theta_ref": [U][2][5] (after update u), "theta_gmrl": [U][2][5] (before update u+1,
    i.e. after update u), "ref_s_per_update_seed", "gmrl_s_per_update_seed", optionally
    "theta_ref_float64" (the reference re-run in float64) and whole-process timings}.
    """
    a = np.asarray(record["theta_ref"], np.float64)
    b = np.asarray(record["theta_gmrl"], np.float64)
    n = min(len(a), len(b))
    diff = np.abs(a[:n] - b[:n])
    ref_t, gm_t = record.get("ref_s_per_update_seed"), record.get("gmrl_s_per_update_seed")
    ref_cpu, gm_cpu = (_per_update(record.get(k)) for k in ("ref_whole_process", "gmrl_whole_process"))
    ref64 = record.get("theta_ref_float64")
    diff64 = None if ref64 is None else float(np.abs(np.asarray(ref64, np.float64)[:n] - b[:n]).max())
    return {"updates": n, "max_abs_theta_diff": float(diff.max()), "max_abs_theta_diff_float64": diff64,
            "max_abs_theta": float(np.abs(b[:n]).max()),
            "ref_s_per_update_seed": ref_t, "gmrl_s_per_update_seed": gm_t,
            "ratio": _ratio(ref_t, gm_t), "ref_cpu_per_update_seed": ref_cpu,
            "gmrl_cpu_per_update_seed": gm_cpu, "cpu_ratio": _ratio(ref_cpu, gm_cpu)}


def _per_update(whole: dict | None):
    """Whole-process CPU seconds per update per seed (start-up and compilation included)."""
    return None if not whole else whole["cpu_s"] / (whole["seeds"] * whole["updates"])


def paired_difference(record_a: dict, record_b: dict) -> dict:
    """Two reference runs of the same seed that differ in one option only (the same MDPs and, when
    the option draws no random numbers, the same trajectories): the mean per-repeat correlation
    difference a − b, its paired standard error and z."""
    a, b = record_a["reference"], record_b["reference"]
    if not np.array_equal(np.asarray(a["oracle"]), np.asarray(b["oracle"])):
        raise ValueError("the two runs are not on the same MDPs")
    d = (centred_cosine(a["estimates"], a["oracle"]) - centred_cosine(b["estimates"], b["oracle"])).ravel()
    se = float(d.std(ddof=1) / math.sqrt(d.size))
    return {"diff": float(d.mean()), "se": se, "z": float(d.mean()) / se if se > 0 else float("nan")}


def _ratio(a, b):
    return None if a is None or b is None or b <= 0 else a / b


def _f(x, digits=3):
    return "—" if x is None else f"{x:.{digits}f}"


def _sig(x, digits=3):
    return "—" if x is None else f"{x:.{digits}g}"


def format_table(rows: list[dict], lola: dict | None = None) -> str:
    """One markdown table (tabular rows, then the LOLA lines)."""
    lines = [
        "| row | M×R ref / gmrl | corr ref | corr gmrl | z | var ref | var gmrl | z | "
        "wall s ref | wall s gmrl | ratio | CPU s ref | CPU s gmrl | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['mdps']}×{r['ref_repeats']} / {r['mdps']}×{r['gmrl_repeats']} "
            f"| {r['corr_ref']:.4f} ± {r['corr_ref_se']:.4f} "
            f"| {r['corr_gmrl']:.4f} ± {r['corr_gmrl_se']:.4f} "
            f"| {r['corr_z']:+.2f} | {_sig(r['var_ref'], 4)} ± {_sig(r['var_ref_se'], 2)} "
            f"| {_sig(r['var_gmrl'], 4)} ± {_sig(r['var_gmrl_se'], 2)} | {r['var_z']:+.2f} "
            f"| {_f(r['ref_wall_s'], 1)} | {_f(r['gmrl_wall_s'], 1)} | {_f(r['ratio'], 1)}× "
            f"| {_f(r['ref_cpu_s'], 1)} | {_f(r['gmrl_cpu_s'], 1)} | {_f(r['cpu_ratio'], 1)}× |")
    if lola is not None:
        lines += [
            "",
            "| LOLA | updates | max abs θ difference (exact, gmrl convention) | "
            "wall s / update / seed, 128/128: ref | gmrl | ratio | CPU s: ref | gmrl | ratio |",
            "|---|---|---|---|---|---|---|---|---|",
            f"| exact inner and outer, θ = 0 | {lola['updates']} | {lola['max_abs_theta_diff']:.2e} "
            f"(max abs θ {lola['max_abs_theta']:.3f}){_float64_note(lola)} "
            f"| {_sig(lola['ref_s_per_update_seed'], 3)} "
            f"| {_sig(lola['gmrl_s_per_update_seed'], 3)} | {_f(lola['ratio'], 0)}× "
            f"| {_sig(lola['ref_cpu_per_update_seed'], 3)} | {_sig(lola['gmrl_cpu_per_update_seed'], 3)} "
            f"| {_f(lola['cpu_ratio'], 0)}× |",
        ]
    return "\n".join(lines)


def _float64_note(lola: dict) -> str:
    diff = lola.get("max_abs_theta_diff_float64")
    return "" if diff is None else f"; reference re-run in float64: {diff:.2e}"


def checks(rows: list[dict], lola: dict | None = None) -> list[str]:
    """Lines flagging anything that needs an explanation: |z| >= 4 or a failed consistency check."""
    out = []
    for r in rows:
        for key in ("corr_z", "var_z"):
            if not abs(r[key]) < 4:
                out.append(f"{r['name']}: |{key}| = {abs(r[key]):.1f} >= 4")
        if r["corr_npy_diff"] > 1e-4:
            out.append(f"{r['name']}: recorded correlations differ from the reference's corr.npy "
                       f"by {r['corr_npy_diff']:.1e}")
        if r["var_npy_rel"] > 1e-4:
            out.append(f"{r['name']}: recorded std sums differ from the reference's var.npy "
                       f"by {r['var_npy_rel']:.1e} (relative)")
        if r["oracle_rel"] > 1e-4:
            out.append(f"{r['name']}: the reference's oracle differs from gmrl's exact meta-gradient "
                       f"by {r['oracle_rel']:.1e} (relative max)")
    if lola is not None and not lola["max_abs_theta_diff"] < 1e-3:
        out.append(f"LOLA: max abs θ difference {lola['max_abs_theta_diff']:.1e} >= 1e-3")
    return out
