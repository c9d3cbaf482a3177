"""One run layer for training runs and studies: every run is a point of `gmrl.sweep`.

A run (one LOLA-DiCE variant over S seeds, one MGRL training run) is a plain JSON config; its
identity is `gmrl.store.config_key(config)`, the sha256 of the canonical JSON of the *full*
configuration (every setting that changes a number, seeds included; not execution details such
as the compiled block length or the number of CPU devices, which leave the numbers unchanged).
`run_points` runs the missing points through `gmrl.sweep.run_sweep` into a folder's
`results.sqlite` (`gmrl.store.ResultStore`), locally or on Ray, and returns the stored results:

- resuming is re-running the same command (a stored point is not computed again; a long run that
  was interrupted continues from its last checkpoint, found by the same key);
- one progress display (the sweep's bar over runs; a run may show its own bar inside it);
- Ctrl-C stores what has finished and says how to resume (`gmrl.sweep.SweepInterrupted`).

Modules: `gmrl.runs.lola` (LOLA-DiCE runs, study report and figures), `gmrl.runs.mgrl` (the MGRL
training driver with checkpoints, CSV and TensorBoard logs; its study), `gmrl.runs.sinks` (log
sinks), `gmrl.runs.checkpoint` (checkpoints through flax.serialization).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gmrl.errors import require
from gmrl.io import atomic_write_json, prepare_output_dir
from gmrl.store import ResultStore, canonical_json, config_key

STORE_NAME = "results.sqlite"
CONFIG_NAME = "config.json"


def run_points(points: Sequence[Mapping[str, Any]],
               point_fn: Callable[[dict[str, Any]], Mapping] | None, out: Path | None, *,
               backend: str = "local", address: str | None = None, progress: bool = True,
               description: str = "runs", ray_init_kwargs: Mapping[str, Any] | None = None,
               batch_fn=None, group_key=None, max_group_size: int | None = None
               ) -> list[dict[str, Any]]:
    """Compute the points of `points` not yet in OUT/results.sqlite and return every point's
    stored result, in the order of `points`.

    out=None keeps the store in a temporary folder (nothing is left behind). `point_fn(config)`
    must be picklable for backend 'ray' (a module-level function or a functools.partial of one).
    `batch_fn`/`group_key`/`max_group_size` are passed to `gmrl.sweep.run_sweep`, e.g. to train
    several runs that share a compiled shape in one vmapped call.
    """
    from gmrl.sweep import run_sweep

    def compute(folder: Path) -> list[dict[str, Any]]:
        with ResultStore(folder / STORE_NAME) as store:
            run_sweep([dict(p) for p in points], point_fn, store, backend=backend,
                      address=address, progress=progress, description=description,
                      ray_init_kwargs=ray_init_kwargs, batch_fn=batch_fn, group_key=group_key,
                      max_group_size=max_group_size)
            results = [store.get(config_key(p)) for p in points]
        return [row.result for row in results]

    if out is None:
        with tempfile.TemporaryDirectory(prefix="gmrl-run-") as folder:
            return compute(Path(folder))
    return compute(out)


def claim_folder(out: Path, config: Mapping[str, Any], what: str, option: str = "--out") -> Path:
    """Make `out` the folder of the single run `config` (for `gmrl lola`/`gmrl mgrl`).

    Checks that `out` is a writable folder (before any computation), refuses a folder that holds
    a run with another configuration (one folder, one configuration), and writes OUT/config.json
    (the configuration and its key). Returns `out`.
    """
    import json

    prepare_output_dir(out, option)
    key = config_key(config)
    previous = out / CONFIG_NAME
    if previous.is_file():
        try:
            saved = json.loads(previous.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            saved = None
        saved = saved if isinstance(saved, dict) else {}
        if saved.get("key") != key:
            other = saved.get("config")
            changed = (_differences(other, config) if isinstance(other, Mapping)
                       else f"a {CONFIG_NAME} this gmrl does not recognise")
            require(False, f"{option} {out} holds a {what} with other settings ({changed}); "
                           f"give another {option}, or the same settings to resume it")
    atomic_write_json(previous, {"key": key, "config": config})
    return out


def _differences(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> str:
    """'name: old -> new' for the fields that differ (nested dicts by dots), at most 4."""
    changed = []
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name), new.get(name)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            inner = _differences(a, b, f"{prefix}{name}.")
            if inner:
                changed.append(inner)
        elif canonical_json({"v": a}) != canonical_json({"v": b}):
            changed.append(f"{prefix}{name}: {a!r} -> {b!r}")
    return ", ".join(changed[:4]) + (", …" if len(changed) > 4 else "")
