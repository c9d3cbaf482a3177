"""Frames per second of a2c, mgrl and mgrl-lvc under both presets, measured side by side
(issue 10, item 3; docs/mgrl.md).

Usage: python benchmarks/mgrl.py [--env Breakout-MinAtar] [--frames-per-round 19200]
                                 [--rounds 5] [--seeds 1] [--presets reference,full] [--out results.json]

Each (preset, algorithm) runs its compiled, seed-vmapped training chunk (64 envs × 5 steps per
rollout, the reference's setting); rounds are interleaved (reference a2c, mgrl, mgrl-lvc, full
a2c, ...) so that load from other processes hits all alike. Reported: median and best frames/s
over rounds (after compilation), and each algorithm's cost per frame relative to the a2c of the
same preset (median a2c frames/s over median frames/s). The load average (`os.getloadavg`)
before and after is printed beside the numbers: the machine may be shared.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax

from gmrl.algos import a2c, mgrl
from gmrl.io import atomic_write_json


def measure(env: str, frames_per_round: int, rounds: int, seeds: int,
            presets: tuple[str, ...] = ("reference", "full")) -> dict:
    """Median and best frames/s (summed over seeds) per preset and algorithm; ratios to a2c."""
    runners = {}
    for preset in presets:
        for algo in mgrl.ALGOS:
            algorithm = mgrl.make_algorithm(algo, env, preset=preset, total_updates=10 ** 6)
            steps = max(1, frames_per_round // algorithm.frames_per_step)
            states = a2c.init_seeds(algorithm, jax.random.key(0), seeds)
            run = a2c.compiled_run_steps(algorithm, steps)
            start = time.perf_counter()
            states, metrics = run(states)
            jax.block_until_ready(metrics)
            runners[preset, algo] = {"run": run, "states": states, "compile_s":
                                     time.perf_counter() - start, "fps": [],
                                     "frames": steps * algorithm.frames_per_step * seeds}
    load_before = os.getloadavg()
    for _ in range(rounds):
        for entry in runners.values():
            start = time.perf_counter()
            entry["states"], metrics = entry["run"](entry["states"])
            jax.block_until_ready(metrics)
            entry["fps"].append(entry["frames"] / (time.perf_counter() - start))
    result = {"env": env, "num_envs": 64, "num_steps": 5, "seeds": seeds, "rounds": rounds,
              "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "cpu_count": os.cpu_count(), "rows": []}
    for (preset, algo), entry in runners.items():
        median = statistics.median(entry["fps"])
        base = statistics.median(runners[preset, "a2c"]["fps"])
        result["rows"].append({"preset": preset, "algo": algo, "fps_median": median,
                               "fps_best": max(entry["fps"]), "cost_per_frame_vs_a2c": base / median,
                               "frames_per_round": entry["frames"],
                               "compile_and_first_round_s": entry["compile_s"]})
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="Breakout-MinAtar")
    parser.add_argument("--frames-per-round", type=int, default=19200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--presets", default="reference,full")
    parser.add_argument("--out", default=None, help="also write the result as JSON here")
    args = parser.parse_args()
    result = measure(args.env, args.frames_per_round, args.rounds, args.seeds,
                     tuple(args.presets.split(",")))
    print(f"{args.env}, 64 envs x 5 steps, {args.seeds} seed(s), {args.rounds} interleaved rounds; "
          f"load average {result['load_average_before'][0]:.2f} before, "
          f"{result['load_average_after'][0]:.2f} after ({result['cpu_count']} CPUs)")
    print(f"{'preset':10s} {'algo':10s} {'median fps':>11s} {'best fps':>10s} {'cost/frame vs a2c':>18s}")
    for row in result["rows"]:
        print(f"{row['preset']:10s} {row['algo']:10s} {row['fps_median']:11.0f} "
              f"{row['fps_best']:10.0f} {row['cost_per_frame_vs_a2c']:17.2f}x")
    if args.out:
        atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
