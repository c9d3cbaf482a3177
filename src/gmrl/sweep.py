"""Grid sweeps: expand a grid, run the points not yet stored (locally or on Ray), store each result.

Generic: a point is a plain JSON config dict and a point function maps it to a dict of statistics.
Resuming is re-running the same sweep: a point whose key (config_key, the sha256 of its canonical
JSON) is already in the ResultStore is skipped. Results are written from the driver process only,
one transaction per finished point (or per finished group when a batch function computes several
points in one vectorised call), so an interrupted sweep loses at most the points in flight.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from tqdm.auto import tqdm

from gmrl.errors import InputError, require
from gmrl.store import PendingRow, ResultStore, canonical_json, config_key

__all__ = ["Grid", "SweepInterrupted", "SweepSummary", "config_key", "expand", "group_points",
           "run_sweep"]

BACKENDS = ("local", "ray")
RESUME_HINT = "re-run the same command to resume"

PointFn = Callable[[dict[str, Any]], Mapping[str, Any]]
BatchFn = Callable[[list[dict[str, Any]]], Sequence[Mapping[str, Any]]]


class Grid(NamedTuple):
    """A base config plus axes (name -> list of values); every combination is one point."""

    base: Mapping[str, Any]
    axes: Mapping[str, Sequence[Any]]


def expand(grid: Grid | Mapping[str, Any]) -> list[dict[str, Any]]:
    """All points of `grid` (a Grid, or a dict with keys 'base' and 'axes'), in a stable order.

    Order: the Cartesian product of the axes in their given order, the last axis varying fastest
    (like nested for-loops). An axis value replaces the base field of the same name. No axes gives
    the single point `base`.
    """
    if not isinstance(grid, Grid):
        require(isinstance(grid, Mapping) and set(grid) <= {"base", "axes"},
                "a grid is Grid(base, axes) or a dict with keys 'base' and 'axes'")
        grid = Grid(grid.get("base", {}), grid.get("axes", {}))
    require(isinstance(grid.base, Mapping), "a grid's base must be a dict of config fields")
    require(isinstance(grid.axes, Mapping), "a grid's axes must be a dict: name -> list of values")
    for name, values in grid.axes.items():
        require(isinstance(values, Sequence) and not isinstance(values, str | bytes),
                f"axis {name!r} must be a list of values, got {type(values).__name__}")
        require(len(values) > 0, f"axis {name!r} is empty; give it at least one value")
    canonical_json(grid.base)
    names = list(grid.axes)
    points = [{**grid.base, **dict(zip(names, combo, strict=True))}
              for combo in itertools.product(*(list(grid.axes[n]) for n in names))]
    keys = [config_key(p) for p in points]
    require(len(set(keys)) == len(keys), "the grid repeats a point (an axis lists a value twice)")
    return points


@dataclass
class SweepSummary:
    """What a run_sweep call did: points in the sweep, already stored, computed now, wall time."""

    total: int
    skipped: int
    computed: int = 0
    seconds: float = 0.0
    computed_keys: list[str] = field(default_factory=list)


class SweepInterrupted(KeyboardInterrupt):
    """SIGINT during a sweep: finished rows are stored; re-running the same sweep resumes it."""

    def __init__(self, summary: SweepSummary, store_path: os.PathLike | str):
        self.summary = summary
        remaining = summary.total - summary.skipped - summary.computed
        super().__init__(f"sweep interrupted: {summary.skipped + summary.computed} of "
                         f"{summary.total} points are stored in {store_path}, {remaining} remain; "
                         f"{RESUME_HINT}")


def group_points(points: Sequence[dict[str, Any]],
                 group_key: Callable[[dict[str, Any]], Hashable] | None = None,
                 max_group_size: int | None = None) -> list[list[dict[str, Any]]]:
    """Split `points` into groups sharing group_key(point) (first-appearance order), each cut into
    chunks of at most `max_group_size`. Without group_key every point is its own group."""
    require(max_group_size is None or max_group_size >= 1, "max_group_size must be at least 1")
    if group_key is None:
        return [[p] for p in points]
    groups: dict[Hashable, list[dict[str, Any]]] = {}
    for point in points:
        groups.setdefault(group_key(point), []).append(point)
    size = max_group_size or max(len(points), 1)
    return [g[i:i + size] for g in groups.values() for i in range(0, len(g), size)]


def compute_group(points: list[dict[str, Any]], point_fn: PointFn | None,
                  batch_fn: BatchFn | None) -> tuple[list[Mapping[str, Any]], float]:
    """Results of one group (batch_fn when given and the group has several points, else point_fn
    per point) and the group's wall time in seconds. Runs in the driver or in a Ray worker."""
    start = time.perf_counter()
    if batch_fn is not None and (point_fn is None or len(points) > 1):
        results = list(batch_fn(list(points)))
        if len(results) != len(points):
            raise RuntimeError(f"batch_fn returned {len(results)} results for {len(points)} points")
    else:
        results = [point_fn(dict(p)) for p in points]
    return results, time.perf_counter() - start


def run_sweep(points: Sequence[dict[str, Any]], point_fn: PointFn | None, store: ResultStore, *,
              backend: str = "local", address: str | None = None, batch_fn: BatchFn | None = None,
              group_key: Callable[[dict[str, Any]], Hashable] | None = None,
              max_group_size: int | None = None, progress: bool = True,
              ray_init_kwargs: Mapping[str, Any] | None = None,
              description: str = "sweep") -> SweepSummary:
    """Compute every point of `points` whose key is not in `store`, storing each as it finishes.

    point_fn(config) -> dict of statistics, for one point. batch_fn(configs) -> list of such dicts
    (same order), for a group of points sharing group_key(config) — e.g. one compiled, vmapped
    call; every point of a group is stored in one transaction when the group finishes. Give
    point_fn, batch_fn or both (then a group of one uses point_fn). backend "local" runs groups
    one after another in this process; "ray" makes each group a Ray task (ray.init(address) when an
    address is given, else a local Ray with os.cpu_count() CPUs; ray_init_kwargs are passed on,
    e.g. _temp_dir) and stores results here, in the driver, as tasks finish.
    On SIGINT, stored rows are kept and SweepInterrupted (a KeyboardInterrupt) is raised; its
    message says how to resume (`gmrl` prints it as one line). Returns a SweepSummary.
    """
    require(backend in BACKENDS, f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    require(address is None or backend == "ray", "an address applies only to backend 'ray'")
    require(point_fn is not None or batch_fn is not None, "give point_fn, batch_fn or both")
    require(group_key is None or batch_fn is not None, "group_key needs a batch_fn")
    unique = {config_key(p): dict(p) for p in points}
    done = store.done_keys()
    pending = [p for k, p in unique.items() if k not in done]
    if batch_fn is not None and group_key is None:
        group_key = _one_group
    groups = group_points(pending, group_key, max_group_size)
    summary = SweepSummary(total=len(unique), skipped=len(unique) - len(pending))
    start = time.perf_counter()
    bar = tqdm(total=summary.total, initial=summary.skipped, desc=description, unit="pt",
               disable=not progress or not groups, dynamic_ncols=True, smoothing=0.1)
    run_groups = _run_local if backend == "local" else _run_ray
    finished = run_groups(groups, point_fn, batch_fn, address, ray_init_kwargs)
    try:
        with contextlib.closing(finished):
            for group, results, seconds in finished:
                _store_group(store, group, results, seconds, summary)
                bar.update(len(group))
    except KeyboardInterrupt:
        bar.close()
        summary.seconds = time.perf_counter() - start
        raise SweepInterrupted(summary, store.path) from None  # the CLI prints its one line
    bar.close()
    summary.seconds = time.perf_counter() - start
    return summary


def _one_group(point: dict[str, Any]) -> int:
    return 0


def _store_group(store: ResultStore, group: list[dict[str, Any]],
                 results: Sequence[Mapping[str, Any]], seconds: float,
                 summary: SweepSummary) -> None:
    """One transaction for the whole group, with SIGINT held back until it has committed."""
    per_point = seconds / len(group)
    rows = [PendingRow(p, r, per_point, len(group)) for p, r in zip(group, results, strict=True)]
    with _sigint_deferred():
        store.put_many(rows)
        summary.computed += len(group)
        summary.computed_keys.extend(config_key(p) for p in group)


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold SIGINT while the block runs (main thread only), then deliver it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


GroupResult = tuple[list[dict[str, Any]], list[Mapping[str, Any]], float]


def _run_local(groups, point_fn, batch_fn, address, ray_init_kwargs) -> Iterator[GroupResult]:
    for group in groups:
        results, seconds = compute_group(group, point_fn, batch_fn)
        yield group, results, seconds


def _run_ray(groups, point_fn, batch_fn, address, ray_init_kwargs) -> Iterator[GroupResult]:
    if not groups:
        return
    try:
        import ray
    except ImportError as err:  # ray is the optional extra gmrl[ray]
        raise InputError(f"backend 'ray' needs the ray package ({err}); install it with: "
                         "pip install 'gmrl[ray]'") from None
    started_here = not ray.is_initialized()
    if started_here:
        _init_ray(ray, address, ray_init_kwargs)
    remote = ray.remote(num_cpus=1, max_retries=0)(compute_group)
    fns = (ray.put(point_fn), ray.put(batch_fn))
    futures = {remote.remote(group, *fns): group for group in groups}
    try:
        while futures:
            ready, _ = ray.wait(list(futures), num_returns=1)
            group = futures.pop(ready[0])
            results, seconds = ray.get(ready[0])
            yield group, results, seconds
    finally:
        for future in futures:
            ray.cancel(future, force=True)
        if started_here:
            ray.shutdown()


def _require_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail at once, in one line, when nothing listens at a Ray address HOST:PORT (ray.init would
    retry for minutes)."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    require(bool(host) and port.isdigit(),
            f"a Ray address is HOST:PORT (e.g. 127.0.0.1:6379), 'auto' or 'local'; got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise InputError(f"no Ray cluster answers at {address} ({err.strerror or err}); start one "
                         "with `ray start --head` or leave out --address for a local Ray") from None


def _init_ray(ray, address: str | None, ray_init_kwargs: Mapping[str, Any] | None) -> None:
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if address is None:
        kwargs["num_cpus"] = os.cpu_count()
    kwargs.update(ray_init_kwargs or {})
    if address not in (None, "auto", "local"):
        _require_reachable(address)
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, ValueError, RuntimeError) as err:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise InputError(f"cannot start or reach {where}: {err}") from None
