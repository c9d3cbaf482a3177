"""Seconds per decomposed meta-gradient estimate (docs/design.md) on the reference tabular problem.

Code lll with DiCE and 32 trajectories per ingredient, S=20, A=5, T=20, float64, vmapped over
20 repeats × 10 MDPs; K = 1 and 3. Prints compile time, seconds per batch and per estimate, and the
ratio of one estimate's cost to merely sampling the same (2K+1)·32 trajectories.
Run: python benchmarks/tabular.py [--rounds 20]
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import time

import jax

from gmrl import metagrad as mg
from gmrl.envs import tabular
from gmrl.evaluate import problem_set

MDPS, REPEATS, SAMPLES = 10, 20, 32


def sample_only(key, mdp, theta, count, horizon):
    return tabular.sample_trajectories(key, mdp, theta, count, horizon)


def timed(fn, *args, rounds):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_and_first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(rounds):
        jax.block_until_ready(fn(*args))
    return compile_and_first, (time.perf_counter() - start) / rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    rounds = parser.parse_args().rounds
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU(s), jax {jax.__version__}, "
          f"backend {jax.default_backend()}")
    print(f"{'K':>2} {'compile+1st (s)':>16} {'batch (s)':>10} {'per estimate (ms)':>18} "
          f"{'sampling only (ms)':>19} {'ratio':>6}")
    for steps in (1, 3):
        ingredient = mg.Source("dice", SAMPLES)
        cfg = mg.MetaGradConfig(steps=steps, lr=10.0, inner=ingredient, hessian=ingredient,
                                outer=ingredient)
        mdps, phis = problem_set(0, cfg, MDPS)
        with jax.enable_x64(True):
            keys = jax.random.split(jax.random.key(1), (MDPS, REPEATS))
            first, per_batch = timed(mg.batched_estimates(cfg), keys, mdps, phis, rounds=rounds)
            count = (2 * steps + 1) * SAMPLES
            sample = jax.jit(jax.vmap(jax.vmap(
                functools.partial(sample_only, count=count, horizon=cfg.horizon),
                in_axes=(0, None, None))))
            _, sampling = timed(sample, keys, mdps, phis, rounds=rounds)
        n = MDPS * REPEATS
        print(f"{steps:>2} {first:>16.2f} {per_batch:>10.4f} {1e3 * per_batch / n:>18.3f} "
              f"{1e3 * sampling / n:>19.4f} {per_batch / sampling:>6.1f}")


if __name__ == "__main__":
    main()
