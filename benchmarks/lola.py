"""LOLA-DiCE speed: the whole reference study, single variants, and the pieces that set the cost.

Usage: python benchmarks/lola.py [--study] [--variants inner128-outer128,inner1024]
                                 [--updates 500] [--seeds 10] [--cpu-devices N] [--pieces]

--study: the 11 reference variants as `gmrl study lola` runs them (programs compiled two at a
time, then trained one after another, seeds over 2 CPU devices), wall and CPU seconds in all,
against the reference's CPU cost. --variants: each variant alone (compile, run, CPU seconds per
update per seed). --pieces: per-update CPU milliseconds of one 128/128 update of 10 seeds with
each prefix-sum implementation, and the cost of the uniforms (`gmrl.sampling.hashed_uniform`
against `jax.random.uniform`).

Reference figures: 0.436 CPU-s per update per seed for its 128/128 variant (its own scripts, run
by benchmarks/official, docs/official.md); the issue's estimate for its whole 11-variant study is
about 5.4 CPU-hours.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

REFERENCE_CPU_PER_UPDATE_PER_SEED = 0.436
REFERENCE_STUDY_CPU_SECONDS = 5.4 * 3600


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def study(seeds: int, updates: int) -> None:
    from gmrl.algos import lola
    from gmrl.runs import lola as lola_runs

    points = lola_runs.study_points(list(lola.REFERENCE_VARIANTS), seeds, updates, 0)
    with tempfile.TemporaryDirectory() as folder:
        wall, cpu = time.perf_counter(), cpu_seconds()
        results = lola_runs.run(points, Path(folder), progress=False)
        wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    print(f"study: {len(points)} variants × {seeds} seeds × {updates} updates: {wall:.1f} s wall, "
          f"{cpu:.1f} s CPU (compile included); the reference's ≈ {REFERENCE_STUDY_CPU_SECONDS:.0f}"
          f" CPU-s are {REFERENCE_STUDY_CPU_SECONDS / wall:.0f}× this wall time")
    for point, result in zip(points, results, strict=True):
        print(f"  {point['variant']:24s} run {result['run_seconds']:6.1f} s  compile (in "
              f"parallel) {result['compile_seconds']:5.1f} s")


def variants(names: list[str], seeds: int, updates: int) -> None:
    from gmrl.algos import lola

    for name in names:
        cfg = lola.LolaConfig(**lola.REFERENCE_VARIANTS[name])
        cpu = cpu_seconds()
        result = lola.train(cfg, 0, seeds, updates)
        cpu = cpu_seconds() - cpu
        per = result.run_seconds / (seeds * updates)
        print(f"{name:24s} {result.run_seconds:6.1f} s run + {result.compile_seconds:5.1f} s "
              f"compile ({cpu:.1f} s CPU); {1e3 * per:.2f} ms wall per update per seed"
              + (f", {REFERENCE_CPU_PER_UPDATE_PER_SEED / per:.0f}× under the reference's "
                 "CPU cost" if name == "inner128-outer128" else ""))


def pieces() -> None:
    import jax
    import jax.numpy as jnp
    from jax import lax

    from gmrl import estimators, sampling
    from gmrl.algos import lola

    def timed(f, *args, repeats=10) -> float:
        jax.block_until_ready(f(*args))
        cpu = cpu_seconds()
        for _ in range(repeats):
            out = f(*args)
        jax.block_until_ready(out)
        return 1e3 * (cpu_seconds() - cpu) / repeats

    cumsums = {"lax.scan (gmrl)": estimators.cumsum,
               "jnp.cumsum": lambda x: jnp.cumsum(x, 0),
               "lax.associative_scan": lambda x: lax.associative_scan(jnp.add, x, axis=0)}
    cfg, seeds = lola.LolaConfig(), 10
    states = lola.init_states(lola.seed_keys(0, seeds), cfg)
    keys = jax.random.split(jax.random.key(0), seeds)
    for name, fn in cumsums.items():
        estimators.cumsum = fn
        update = jax.jit(jax.vmap(lambda s, k: lola.update(s, k, cfg)))
        print(f"one 128/128 update of {seeds} seeds, prefix sum by {name}: "
              f"{timed(update, states, keys):.1f} CPU-ms")
    estimators.cumsum = cumsums["lax.scan (gmrl)"]
    shape = (100, 1024, 2)
    for name, fn in (("hashed_uniform", sampling.hashed_uniform),
                     ("jax.random.uniform", lambda k, s: jax.random.uniform(k, s))):
        f = jax.jit(lambda k, fn=fn: fn(k, shape))
        print(f"{name}: {timed(f, jax.random.key(0)):.2f} CPU-ms per 204,800 uniforms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", action="store_true")
    parser.add_argument("--variants", default="")
    parser.add_argument("--updates", type=int, default=500)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--cpu-devices", type=int, default=None)
    parser.add_argument("--pieces", action="store_true")
    args = parser.parse_args()
    from gmrl.devices import use_cpu_devices

    use_cpu_devices(args.cpu_devices)  # before JAX starts, as `gmrl lola` does
    if args.study:
        study(args.seeds, args.updates)
    if args.variants:
        variants([v for v in args.variants.split(",") if v], args.seeds, args.updates)
    if args.pieces:
        pieces()


if __name__ == "__main__":
    main()
