"""Sweep engine: grid expansion, resume, batching, SIGINT/SIGKILL recovery, Ray == local."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from gmrl.errors import InputError
from gmrl.store import ResultStore, config_key
from gmrl.sweep import RESUME_HINT, Grid, expand, group_points, run_sweep


def seeded_mean(config):
    """A small deterministic JAX point: mean and variance of n seeded normal draws."""
    import jax
    import jax.numpy as jnp

    draws = jax.random.normal(jax.random.key(config["seed"]), (config["n"],)) + config["shift"]
    return {"mean": float(jnp.mean(draws)), "var": float(jnp.var(draws))}


def seeded_mean_batch(configs):
    """The same statistics for several points: one vmapped call per group (same n)."""
    import jax
    import jax.numpy as jnp

    (n,) = {c["n"] for c in configs}
    keys = jax.vmap(jax.random.key)(jnp.array([c["seed"] for c in configs]))
    shifts = jnp.array([c["shift"] for c in configs], dtype=jnp.float32)
    draws = jax.vmap(lambda k: jax.random.normal(k, (n,)))(keys) + shifts[:, None]
    return [{"mean": float(m), "var": float(v)}
            for m, v in zip(jnp.mean(draws, 1), jnp.var(draws, 1), strict=True)]


def stored(store):
    return {row.key: (row.config, row.result) for row in store.rows()}


GRID = Grid({"n": 64, "shift": 0.5}, {"n": [16, 64], "seed": [0, 1, 2]})


def test_expand_is_a_stable_product_with_last_axis_fastest():
    points = expand(GRID)
    assert [(p["n"], p["seed"]) for p in points] == [(16, 0), (16, 1), (16, 2),
                                                     (64, 0), (64, 1), (64, 2)]
    assert all(p["shift"] == 0.5 for p in points)
    assert expand({"base": GRID.base, "axes": GRID.axes}) == points
    assert expand(Grid({"a": 1}, {})) == [{"a": 1}]


@pytest.mark.parametrize("grid, message", [
    (Grid({}, {"seed": []}), "axis 'seed' is empty"),
    (Grid({}, {"code": "lee"}), "axis 'code' must be a list"),
    (Grid({}, {"seed": [1, 1]}), "repeats a point"),
    (Grid({"x": float("nan")}, {"seed": [1]}), "plain JSON"),
    ({"base": {}, "axis": {}}, "keys 'base' and 'axes'"),
])
def test_expand_rejects_bad_grids(grid, message):
    with pytest.raises(InputError, match=message):
        expand(grid)


def test_group_points_keeps_first_appearance_order_and_chunks():
    points = expand(GRID)
    groups = group_points(points, lambda p: p["n"], max_group_size=2)
    assert [[(p["n"], p["seed"]) for p in g] for g in groups] == [
        [(16, 0), (16, 1)], [(16, 2)], [(64, 0), (64, 1)], [(64, 2)]]
    assert group_points(points) == [[p] for p in points]


def test_bad_sweep_arguments_raise_input_error(tmp_path):
    with ResultStore(tmp_path / "r.sqlite") as store:
        with pytest.raises(InputError, match="unknown backend 'slurm'; choose one of local, ray"):
            run_sweep(expand(GRID), seeded_mean, store, backend="slurm")
        with pytest.raises(InputError, match="address applies only to backend 'ray'"):
            run_sweep(expand(GRID), seeded_mean, store, address="10.0.0.1:6379")
        with pytest.raises(InputError, match="point_fn, batch_fn or both"):
            run_sweep(expand(GRID), None, store)
        assert len(store) == 0


def test_local_sweep_stores_every_point_once_and_resumes(tmp_path):
    points = expand(GRID)
    calls = []

    def failing_after_two(config):
        if len(calls) == 2:
            raise RuntimeError("boom")
        calls.append(config_key(config))
        return seeded_mean(config)

    with ResultStore(tmp_path / "r.sqlite") as store:
        with pytest.raises(RuntimeError, match="boom"):
            run_sweep(points, failing_after_two, store, progress=False)
        assert store.done_keys() == set(calls)  # finished points kept, nothing half-written
        summary = run_sweep(points + points[:1], seeded_mean, store, progress=False)
        assert (summary.total, summary.skipped, summary.computed) == (6, 2, 4)
        assert set(summary.computed_keys) == {config_key(p) for p in points} - set(calls)
        again = run_sweep(points, seeded_mean, store, progress=False)
        assert (again.skipped, again.computed) == (6, 0)
        assert len(store) == 6
        for row in store.rows():
            assert row.result == seeded_mean(row.config)


def test_batched_sweep_matches_per_point_results(tmp_path):
    points = expand(GRID)
    with ResultStore(tmp_path / "batch.sqlite") as store:
        summary = run_sweep(points, None, store, batch_fn=seeded_mean_batch,
                            group_key=lambda p: p["n"], progress=False)
        assert summary.computed == 6
        assert [row.batch_size for row in store.rows()] == [3] * 6
        for row in store.rows():
            assert row.result["mean"] == pytest.approx(seeded_mean(row.config)["mean"], abs=1e-6)

    def short_batch(configs):
        return seeded_mean_batch(configs)[:-1]

    with ResultStore(tmp_path / "short.sqlite") as store:
        with pytest.raises(RuntimeError, match="returned 2 results for 3 points"):
            run_sweep(points, None, store, batch_fn=short_batch, group_key=lambda p: p["n"],
                      progress=False)
        assert len(store) == 0


@pytest.mark.xdist_group("ray")  # one local Ray at a time under pytest -n
@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")
def test_ray_backend_gives_the_same_numbers_as_local(tmp_path, monkeypatch):
    pytest.importorskip("ray")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    temp_dir = tempfile.mkdtemp(prefix="gmrlray", dir="/tmp")
    points = expand(GRID)
    with ResultStore(tmp_path / "local.sqlite") as local_store:
        run_sweep(points, seeded_mean, local_store, progress=False)
        run_sweep(points, None, local_store, batch_fn=seeded_mean_batch,  # all stored: no-op
                  group_key=lambda p: p["n"], progress=False)
        local = stored(local_store)
    import ray

    try:
        with ResultStore(tmp_path / "ray.sqlite") as ray_store:
            summary = run_sweep(points, seeded_mean, ray_store, backend="ray", progress=False,
                                ray_init_kwargs={"num_cpus": 2, "_temp_dir": temp_dir})
            assert summary.computed == 6
            assert not ray.is_initialized()  # the sweep shut down the Ray it started
            assert stored(ray_store) == local
        with ResultStore(tmp_path / "local_batch.sqlite") as local_store:
            run_sweep(points, None, local_store, batch_fn=seeded_mean_batch,
                      group_key=lambda p: p["n"], progress=False)
            local_batch = stored(local_store)
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir)
        with ResultStore(tmp_path / "ray_batch.sqlite") as ray_store:
            summary = run_sweep(points, None, ray_store, backend="ray", progress=False,
                                batch_fn=seeded_mean_batch, group_key=lambda p: p["n"])
            assert summary.computed == 6 and ray.is_initialized()  # a running Ray is reused
            assert stored(ray_store) == local_batch
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


SCRIPT = textwrap.dedent('''
    """A slow sweep for the interruption test: python sweep_script.py STORE CALL_LOG DELAY."""
    import signal
    import sys
    import time

    import numpy as np

    from gmrl.store import ResultStore
    from gmrl.sweep import Grid, expand, run_sweep

    POINTS = expand(Grid({"n": 1000}, {"scale": [1.0, 2.0], "seed": [0, 1, 2, 3, 4]}))


    def point(config, delay=0.0, log=None):
        time.sleep(delay)
        if log is not None:
            with open(log, "a") as handle:
                handle.write(f"{config['scale']},{config['seed']}\\n")
        draws = config["scale"] * np.random.default_rng(config["seed"]).normal(size=config["n"])
        return {"mean": float(draws.mean()), "std": float(draws.std(ddof=1))}


    if __name__ == "__main__":
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as at an interactive prompt
        store_path, log, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
        try:
            with ResultStore(store_path) as store:
                summary = run_sweep(POINTS, lambda c: point(c, delay, log), store, progress=True)
        except KeyboardInterrupt as err:  # its message says what is kept (`gmrl` prints it)
            print(err, file=sys.stderr)
            sys.exit(130)
        print("computed", summary.computed)
''')


def _count_rows(path):
    try:
        with sqlite3.connect(path, timeout=5) as conn:
            return conn.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    except sqlite3.Error:
        return 0


def _wait_for_rows(path, process, count, timeout=60.0):
    deadline = time.monotonic() + timeout
    while _count_rows(path) < count:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the sweep stored no rows in time"
        time.sleep(0.02)


def _read_log(path):
    if not path.exists():
        return set()
    return {tuple(float(x) for x in line.split(",")) for line in path.read_text().split()}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_killed_sweep_resumes_to_exactly_the_uninterrupted_rows(tmp_path, sig):
    script = tmp_path / "sweep_script.py"
    script.write_text(SCRIPT)
    spec = importlib.util.spec_from_file_location("sweep_script", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with ResultStore(tmp_path / "reference.sqlite") as reference_store:
        run_sweep(module.POINTS, module.point, reference_store, progress=False)
        reference = stored(reference_store)

    store_path, first_log, second_log = (tmp_path / n for n in ("r.sqlite", "a.log", "b.log"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, str(script), str(store_path)]
    process = subprocess.Popen(command + [str(first_log), "0.15"], env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_rows(store_path, process, 3)
    process.send_signal(sig)
    _, err = process.communicate(timeout=60)
    kept = _count_rows(store_path)
    assert 3 <= kept < len(module.POINTS)
    if sig == signal.SIGINT:
        assert process.returncode == 130
        assert RESUME_HINT in err and f"{kept} of 10 points are stored" in err
    else:
        assert process.returncode == -signal.SIGKILL
    with ResultStore(store_path) as store:
        kept_points = {(r.config["scale"], r.config["seed"]) for r in store.rows()}

    rerun = subprocess.run(command + [str(second_log), "0"], env=env, text=True,
                           capture_output=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    all_points = {(p["scale"], p["seed"]) for p in module.POINTS}
    assert _read_log(second_log) == all_points - kept_points  # only the missing points ran
    assert f"computed {len(module.POINTS) - kept}" in rerun.stdout
    with ResultStore(store_path) as store:
        assert len(store) == len(module.POINTS)
        assert stored(store) == reference  # identical numbers, no row lost or duplicated
    assert json.dumps(sorted(reference)) == json.dumps(sorted(stored(ResultStore(store_path))))
