"""The reference implementation and gmrl side by side: one table (issue 8, item 2).

The reference (Liu, Feng et al. 2022, github Benjamin-eecs/Theoretical-GMRL, PyTorch) is run from
a checkout given with --reference by an interpreter that has torch (--torch-python), as outside
programs: its own tabular scripts (tabular/maml/decompose.py, tabular/lirpg/decompose_mg.py) and
its LOLA-DiCE script, each through a small driver in this folder that records what the script
computes (see ref_driver.py, ref_lola_driver.py). gmrl runs as separate processes of this
interpreter (gmrl_side.py, gmrl_lola.py, the `gmrl lola` command) on the MDPs that the reference
built (exported by the driver; the first is the one of its seed 42), with θ0 = 0.

    python benchmarks/official/run.py --reference REF --torch-python TORCH_PY --out DIR
    python benchmarks/official/run.py --out DIR --table-only      # reprint from DIR/results.json

Each finished row is saved to DIR/results.json at once; a rerun skips rows already there (use
--redo NAME,... to measure some again). Rows: see ROWS below; `--rows NAME,...` picks some.
The statistics and the printed table: table.py. Not part of the test suite (the reference and
torch are not gmrl dependencies); tests/test_official_table.py checks table.py on a fixture.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import table  # noqa: E402

MAML_SCRIPT = "tabular/maml/decompose.py"
LIRPG_SCRIPT = "tabular/lirpg/decompose_mg.py"


@dataclasses.dataclass(frozen=True)
class Row:
    """One tabular grid point, in the reference's vocabulary (estimator names are shared:
    dice, loaded, lvc, maml; code letters inner-hessian-outer, e = exact, l = sampled)."""

    name: str
    estimator: str
    code: str
    samples: int
    steps: int = 1
    problem: str = "maml"
    ref_extra: tuple[str, ...] = ()  # further options of the reference script

    def ingredients(self) -> dict[str, str]:
        return {part: (f"{self.estimator}:{self.samples}" if letter == "l" else "exact")
                for part, letter in zip(("inner", "hessian", "outer"), self.code, strict=True)}

    def reference_args(self, mdps: int, repeats: int) -> list[str]:
        args = []
        for part, letter in zip(("inner", "hessian", "outer"), self.code, strict=True):
            args += [f"--{part}_est", self.estimator if letter == "l" else "exact"]
            if letter == "l":
                args += [f"--{part}_traj", str(self.samples)]
        args += ["--step_num", str(self.steps), "--lr", "10", "--gamma", "0.8", "--T", "20",
                 "--independent_trials", str(mdps), "--same_trials", str(repeats), "--seed", "42"]
        if self.problem == "lirpg":
            args += ["--gae_lambda", "0.9"]  # as in its run_step.sh; critic noise 1.0 (default)
        else:
            args += ["--noise", "1.0"]
        return args + list(self.ref_extra)

    def gmrl_config(self) -> dict:
        # gmrl's critic follows the reference's: differentiated in φ unless it is detached there
        return {"problem": self.problem, "steps": self.steps, "lr": 10.0, "horizon": 20, "noise": 1.0,
                "gae_lambda": 0.9 if self.problem == "lirpg" else 1.0,
                "critic_gradient": "--detach_value_gradient" not in self.ref_extra, **self.ingredients()}

    @property
    def script(self) -> str:
        return LIRPG_SCRIPT if self.problem == "lirpg" else MAML_SCRIPT

    def settings(self) -> str:
        text = f"{self.problem}, {self.estimator} {self.code} {self.samples}, K = {self.steps}, α = 10"
        text += ", GAE λ = 0.9" if self.problem == "lirpg" else ""
        return text + "".join(f", reference {o}" for o in self.ref_extra)


ROWS = [
    Row("dice lll 32", "dice", "lll", 32),
    Row("loaded lll 32", "loaded", "lll", 32),
    Row("lvc lll 32", "lvc", "lll", 32),
    Row("maml lll 32", "maml", "lll", 32),
    Row("maml lll 32 K=3", "maml", "lll", 32, steps=3),
    Row("lvc ele 256", "lvc", "ele", 256),
    Row("maml ele 256", "maml", "ele", 256),
    Row("LIRPG maml ele 64 K=2", "maml", "ele", 64, steps=2, problem="lirpg"),
    Row("LIRPG lvc ele 64 K=2", "lvc", "ele", 64, steps=2, problem="lirpg"),
    # The reference's LIRPG critic V(R + φ) keeps its gradient in φ unless told otherwise; gmrl's
    # critic is a constant (stop-gradient). This row runs the reference with its own switch.
    Row("LIRPG maml ele 64 K=2, ref. critic detached", "maml", "ele", 64, steps=2, problem="lirpg",
        ref_extra=("--detach_value_gradient",)),
    Row("LIRPG lvc ele 64 K=2, ref. critic detached", "lvc", "ele", 64, steps=2, problem="lirpg",
        ref_extra=("--detach_value_gradient",)),
]


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """Run a command to completion; (wall seconds, CPU seconds of the child, output tail)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-2000:]}"
                 f"\n{proc.stderr[-4000:]}")
    return wall, cpu, (proc.stdout + proc.stderr)[-2000:]


def torch_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def measure_row(row: Row, args, scratch: str) -> dict:
    ref_npz = os.path.join(scratch, "ref.npz")
    ref_cmd = [args.torch_python, os.path.join(HERE, "ref_driver.py"), "--reference", args.reference,
               "--script", row.script, "--record", ref_npz, "--logdir", os.path.join(scratch, "log"),
               "--", *row.reference_args(args.ref_mdps, args.ref_repeats)]
    print(f"[{row.name}] reference ...", flush=True)
    ref_wall, ref_cpu, _ = timed(ref_cmd, torch_env())
    ref = np.load(ref_npz)
    states = ref["P"].shape[-1]
    actions = ref["P"].shape[1] // states
    mdps_npz = os.path.join(scratch, "mdps.npz")
    np.savez(mdps_npz, P=ref["P"].reshape(-1, states, actions, states),
             R=ref["R"].reshape(-1, states, actions), gamma=0.8)
    config = json.dumps(row.gmrl_config())
    side = os.path.join(HERE, "gmrl_side.py")
    print(f"[{row.name}] reference {ref_wall:.1f} s; gmrl at the same scale ...", flush=True)
    timing_npz = os.path.join(scratch, "gmrl_timing.npz")
    gm_wall, gm_cpu, _ = timed([sys.executable, side, "--mdps", mdps_npz, "--config", config,
                                "--repeats", str(args.ref_repeats), "--mode", "timing",
                                "--out", timing_npz])
    print(f"[{row.name}] gmrl {gm_wall:.1f} s; gmrl statistics, {args.gmrl_repeats} repeats ...",
          flush=True)
    stats_npz = os.path.join(scratch, "gmrl_stats.npz")
    per_repeat = args.ref_mdps * row.samples * row.code.count("l") * row.steps  # trajectories
    batch = max(10, min(args.gmrl_repeats, int(args.budget / per_repeat)))
    timed([sys.executable, side, "--mdps", mdps_npz, "--config", config, "--repeats",
           str(args.gmrl_repeats), "--mode", "stats", "--batch", str(batch),
           "--stat-chunk", str(args.ref_repeats), "--seed", "1", "--out", stats_npz])
    gm = np.load(stats_npz)
    return {
        "name": row.name, "settings": row.settings(),
        "reference_command": " ".join(["OMP_NUM_THREADS=1", "python", "ref_driver.py", "--script",
                                       row.script, "--", *row.reference_args(args.ref_mdps,
                                                                              args.ref_repeats)]),
        "gmrl_config": row.gmrl_config(),
        "reference": {"estimates": ref["estimates"].tolist(), "oracle": ref["oracles"].tolist(),
                      "corr_npy": ref["ref_corr"].tolist(), "var_npy": ref["ref_var"].tolist(),
                      "wall_s": ref_wall, "cpu_s": ref_cpu,
                      "main_s": float(ref["main_seconds"])},
        "gmrl": {"corr": gm["corr"].tolist(), "std_sums": gm["std_sums"].tolist(),
                 "chunk": args.ref_repeats, "exact": gm["exact"].tolist(),
                 "wall_s": gm_wall, "cpu_s": gm_cpu, "stats_s": float(gm["seconds"])},
    }


def measure_lola(args, scratch: str) -> dict:
    print("[LOLA] reference exact ...", flush=True)
    exact_npz = os.path.join(scratch, "lola_exact.npz")
    timed([args.torch_python, os.path.join(HERE, "ref_lola_driver.py"), "--reference", args.reference,
           "--record", exact_npz, "--seeds", "1", "--logdir", os.path.join(scratch, "lola_exact"),
           "--", "--n_update", str(args.lola_updates), "--inner_exact", "--outer_exact"], torch_env())
    ref_theta = np.load(exact_npz)["thetas"][0]
    exact64_npz = os.path.join(scratch, "lola_exact64.npz")
    timed([args.torch_python, os.path.join(HERE, "ref_lola_driver.py"), "--reference", args.reference,
           "--record", exact64_npz, "--seeds", "1", "--logdir", os.path.join(scratch, "lola_exact64"),
           "--float64", "--", "--n_update", str(args.lola_updates), "--inner_exact", "--outer_exact"],
          torch_env())
    ref_theta64 = np.load(exact64_npz)["thetas"][0]
    gm_npz = os.path.join(scratch, "gmrl_lola.npz")
    timed([sys.executable, os.path.join(HERE, "gmrl_lola.py"), "--updates", str(args.lola_updates),
           "--out", gm_npz])
    gm_theta = np.load(gm_npz)["thetas"]
    print("[LOLA] reference 128/128 ...", flush=True)
    sampled_npz = os.path.join(scratch, "lola_128.npz")
    seeds, updates = args.lola_timing_seeds, args.lola_timing_updates
    ref_wall, ref_cpu, _ = timed(
        [args.torch_python, os.path.join(HERE, "ref_lola_driver.py"), "--reference", args.reference,
         "--record", sampled_npz, "--seeds", str(seeds), "--logdir", os.path.join(scratch, "lola_128"),
         "--", "--n_update", str(updates)], torch_env())
    play = np.load(sampled_npz)["play_seconds"]
    gm_seeds, gm_updates = args.gmrl_lola_seeds, args.gmrl_lola_updates
    print(f"[LOLA] gmrl 128/128, {gm_seeds} seeds × {gm_updates} updates ...", flush=True)
    gm_wall, gm_cpu, _ = timed([sys.executable, "-c", "from gmrl.cli import main; main()", "lola",
                                "--inner", "128", "--outer", "128", "--seeds", str(gm_seeds),
                                "--updates", str(gm_updates),
                                "--out", os.path.join(scratch, "gmrl_lola_128")])
    with open(os.path.join(scratch, "gmrl_lola_128", "summary.json")) as f:
        summary = json.load(f)
    return {
        # the reference's σ(θ) is P(defect) and its states are (start, DD, DC, CD, CC)
        "theta_ref": (-ref_theta[..., [0, 4, 3, 2, 1]]).tolist(), "theta_gmrl": gm_theta.tolist(),
        "theta_ref_float64": (-ref_theta64[..., [0, 4, 3, 2, 1]]).tolist(),
        "ref_s_per_update_seed": float(play.sum() / (seeds * updates)),
        "ref_whole_process": {"wall_s": ref_wall, "cpu_s": ref_cpu, "seeds": seeds, "updates": updates},
        "gmrl_s_per_update_seed": gm_wall / (gm_seeds * gm_updates),
        "gmrl_whole_process": {"wall_s": gm_wall, "cpu_s": gm_cpu, "seeds": gm_seeds, "updates": gm_updates,
                               "summary_seconds": {k: v for k, v in summary.items() if "second" in k}},
    }


def machine() -> dict:
    load = os.getloadavg()
    return {"platform": platform.platform(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "loadavg_at_end": [round(x, 2) for x in load]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", help="checkout of github Benjamin-eecs/Theoretical-GMRL")
    parser.add_argument("--torch-python", help="an interpreter with torch, numpy, gym 0.17, matplotlib")
    parser.add_argument("--out", required=True, help="folder for results.json")
    parser.add_argument("--rows", default=None, help="comma-separated row names (default: all)")
    parser.add_argument("--redo", default="", help="comma-separated row names to measure again")
    parser.add_argument("--ref-mdps", type=int, default=10, help="the reference's --independent_trials")
    parser.add_argument("--ref-repeats", type=int, default=20, help="the reference's --same_trials")
    parser.add_argument("--gmrl-repeats", type=int, default=2000, help="gmrl repeats per MDP")
    parser.add_argument("--budget", type=float, default=3e5,
                        help="gmrl statistics: trajectories (all MDPs, repeats, ingredients and steps) "
                             "per compiled call")
    parser.add_argument("--no-lola", action="store_true")
    parser.add_argument("--lola-updates", type=int, default=20)
    parser.add_argument("--lola-timing-seeds", type=int, default=2)
    parser.add_argument("--lola-timing-updates", type=int, default=20)
    parser.add_argument("--gmrl-lola-seeds", type=int, default=10)
    parser.add_argument("--gmrl-lola-updates", type=int, default=500)
    parser.add_argument("--table-only", action="store_true", help="reprint the table from results.json")
    args = parser.parse_args()

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    results = {"rows": {}, "lola": None}
    if os.path.exists(path):
        with open(path) as f:
            results = json.load(f)
    redo = {n for n in args.redo.split(",") if n}
    if not args.table_only:
        if not (args.reference and args.torch_python):
            parser.error("--reference and --torch-python are needed to measure")
        wanted = [r for r in ROWS if args.rows is None or r.name in args.rows.split(",")]
        for row in wanted:
            if row.name in results["rows"] and row.name not in redo:
                continue
            with tempfile.TemporaryDirectory() as scratch:
                results["rows"][row.name] = measure_row(row, args, scratch)
            results["machine"] = machine()
            _save(path, results)
        if not args.no_lola and (results.get("lola") is None or "LOLA" in redo):
            with tempfile.TemporaryDirectory() as scratch:
                results["lola"] = measure_lola(args, scratch)
            results["machine"] = machine()
            _save(path, results)
    order = [r.name for r in ROWS]
    rows = [table.tabular_row(results["rows"][n]) for n in order if n in results["rows"]]
    lola = table.lola_row(results["lola"]) if results.get("lola") else None
    print(table.format_table(rows, lola))
    for line in table.checks(rows, lola):
        print("CHECK:", line)
    for row in ROWS:
        base = row.name.split(", ref. ")[0]
        if row.ref_extra and row.name in results["rows"] and base in results["rows"]:
            p = table.paired_difference(results["rows"][base], results["rows"][row.name])
            print(f"paired, same trajectories: reference corr of '{base}' minus with "
                  f"{' '.join(row.ref_extra)}: {p['diff']:+.4f} ± {p['se']:.4f} (z = {p['z']:+.1f})")
    if "machine" in results:
        print("machine:", json.dumps(results["machine"]))


def _save(path: str, results: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
