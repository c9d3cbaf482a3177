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

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from gmrl.errors import Interrupted, require
from gmrl.io import LOCK_NAME, atomic_write_json, folder_lock, prepare_output_dir, remove_empty_dirs
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
    """Make `out` the folder of the single configuration `config` (a run, a study's settings).

    Checks that `out` is a writable folder (before any computation), takes its lock
    (`gmrl.io.folder_lock`) *before* anything is written, refuses a folder that holds results of
    another configuration or of another command (one folder, one configuration), and writes
    OUT/config.json (the configuration and its key) under the lock. Call it inside `folder_run(out)`
    to keep the lock for the whole run. Returns `out`.
    """
    prepare_output_dir(out, option)
    with folder_lock(out, option):
        _check_owner(out, config, what, option)
        atomic_write_json(out / CONFIG_NAME, {"key": config_key(config), "config": config})
    return out


def _check_owner(out: Path, config: Mapping[str, Any], what: str, option: str) -> None:
    """InputError unless `out` is new to gmrl or holds results of this very configuration."""
    import json

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
            require(False, f"{option} {out} holds {_owner(other, what)} with other settings "
                           f"({changed}); give another {option}, or the same settings to resume it")
    else:
        require(not (out / STORE_NAME).exists(),
                f"{option} {out} holds a {STORE_NAME} of another gmrl command or version (no "
                f"{CONFIG_NAME} beside it); give another {option}")


def _owner(config: Any, fallback: str) -> str:
    """'a LOLA run', 'an MGRL run', 'a tabular study', 'a `gmrl study lola` folder' ..."""
    if isinstance(config, Mapping):
        if isinstance(config.get("command"), str):
            return f"a `gmrl {config['command']}` folder"
        if "studies" in config:
            return "a tabular study"
        if config.get("study") == "lola":
            return "a LOLA run"
        if config.get("study") == "mgrl":
            return "an MGRL run"
    return f"a {fallback}"


@contextlib.contextmanager
def folder_run(out: Path, option: str = "--out") -> Iterator[Path]:
    """The one folder rule of every command that writes a folder.

    Creates OUT if needed and takes its lock before anything is written, holding it for the
    block. If the block fails or is interrupted, OUT is put back as it was (removed, with the
    parents created for it, if it did not exist) unless it now holds completed, resumable work
    (stored results or a checkpoint); then only that work and its config.json stay.
    """
    out = Path(out)
    created = _missing_ancestors(out)
    before = set(os.listdir(out)) if out.is_dir() else set()
    prepare_output_dir(out, option)
    try:
        lock = folder_lock(out, option)
        lock.__enter__()
    except BaseException:
        remove_empty_dirs(created)
        raise
    try:
        yield out
    except BaseException as err:
        kept = _restore(out, before, created)
        lock.__exit__(None, None, None)
        if isinstance(err, KeyboardInterrupt) and not kept:
            where = "removed" if created else "left as it was"
            raise Interrupted(f"interrupted before any result or checkpoint was complete; {out} was "
                              f"{where} (nothing to resume)", final=True) from err
        raise
    if LOCK_NAME not in before:  # leave no lock file behind (safe: see `gmrl.io.folder_lock`)
        (out / LOCK_NAME).unlink(missing_ok=True)
    lock.__exit__(None, None, None)


def has_work(out: Path, before: set[str] = frozenset()) -> bool:
    """Whether OUT holds completed, resumable work: stored results or a checkpoint. A store that
    was there before (`before`: names in OUT then) counts as work without being opened."""
    import sqlite3

    store = out / STORE_NAME
    if STORE_NAME in before:
        return True
    if store.is_file() and store.stat().st_size > 0:
        try:  # read-write, so that closing the last connection folds and removes -wal and -shm
            with contextlib.closing(sqlite3.connect(store)) as conn:
                if conn.execute("SELECT COUNT(*) FROM results").fetchone()[0] > 0:
                    return True
        except sqlite3.Error:
            return True  # not ours to judge: keep it
    return any(out.rglob("*.msgpack"))


def _restore(out: Path, before: set[str], created: list[Path]) -> bool:
    """Remove what this run added to OUT unless it holds work; True if something was kept."""
    if not out.is_dir():
        return False
    if LOCK_NAME not in before:  # ours: removing it is safe (a waiting run re-checks its inode)
        (out / LOCK_NAME).unlink(missing_ok=True)
    if has_work(out, before):
        return True
    for name in sorted(set(os.listdir(out)) - before):
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    remove_empty_dirs(created)
    return False


def _missing_ancestors(path: Path) -> list[Path]:
    """`path` and its parents that do not exist yet, deepest first."""
    missing = []
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            break
        missing.append(candidate)
    return missing


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
