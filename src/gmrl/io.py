"""Atomic result files: a reader sees the old file or the complete new one, never half of one.

Every writer goes through a temporary file in the destination folder, flushed to disk, then
`os.replace`. The file gets the permissions a plain `open(path, "w")` would give it (0666 masked
by the process umask), not the 0600 of the temporary file.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from gmrl.errors import InputError, require


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _atomic(path: str | os.PathLike) -> Iterator[tuple[Path, BinaryIO]]:
    """Yield (path, binary handle of a temporary file); on success it replaces `path`. Folders
    created for it are removed again if the write fails."""
    path = Path(path)
    created = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except BaseException:
        remove_empty_dirs(created)
        raise
    try:
        with os.fdopen(fd, "wb") as handle:
            yield path, handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        remove_empty_dirs(created)
        raise


def remove_empty_dirs(folders: list[Path]) -> None:
    """Remove `folders` (deepest first) that this run created, stopping at one that is not empty."""
    for folder in folders:  # deepest first; stop at one that is not empty
        try:
            folder.rmdir()
        except OSError:
            return


def check_output_file(path: Path | None, suffix: str, option: str = "--out") -> None:
    """Before any computation: `path` (None: no output) names a `suffix` file that can be written,
    creating nothing: not a folder, and its nearest existing ancestor a writable folder."""
    if path is None:
        return
    path = Path(path)
    require(path.suffix == suffix, f"{option} must name a {suffix} file, got {path}")
    require(not path.is_dir(), f"{option} {path} is a folder; give a FILE{suffix} path")
    for parent in path.parents:
        if parent.exists():
            require(parent.is_dir(), f"{option} {path}: {parent} is a file, not a folder; give a "
                                     "path whose parents are folders")
            try:  # a file that vanishes on close: nothing is left behind
                with tempfile.TemporaryFile(dir=parent, prefix=".gmrl-write-test."):
                    pass
            except OSError as err:
                raise InputError(f"{option} {path}: cannot write in {parent} "
                                 f"({err.strerror or err}); give a folder you can write to") from None
            return


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` via a temporary file in the same folder and os.replace."""
    with _atomic(path) as (path, handle):
        handle.write(data)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_with(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """Call write(binary handle) on a temporary file, then move it to `path` (e.g. a figure:
    `atomic_write_with(p, lambda f: fig.savefig(f, format="png"))`)."""
    with _atomic(path) as (path, handle):
        write(handle)
    return path


def atomic_savefig(fig, path: str | os.PathLike, **kwargs) -> Path:
    """`fig.savefig` to `path` atomically (format from the suffix): no truncated figure on a
    full disk or an interrupt."""
    path = Path(path)
    fmt = kwargs.pop("format", path.suffix.lstrip(".") or "png")
    return atomic_write_with(path, lambda handle: fig.savefig(handle, format=fmt, **kwargs))


def to_jsonable(value: Any) -> Any:
    """Arrays become nested lists, numpy scalars Python numbers; dicts, lists, tuples recurse."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if hasattr(value, "__array__"):
        array = np.asarray(value)
        return array.tolist() if array.ndim else array.item()
    return value


def atomic_write_json(path: str | os.PathLike, data: Any,
                      null_reasons: Mapping[str, str] | None = None) -> Path:
    """Write `data` (arrays allowed) as indented JSON, atomically.

    With `null_reasons` (a dict, possibly empty) the file is strict JSON: every NaN or infinity
    becomes null and, if `data` is a dict, its "nulls" entry maps the dotted path of each such
    value to the reason (null_reasons[top-level key], else what the value was).
    """
    data = to_jsonable(data)
    if null_reasons is None:
        return atomic_write_text(path, json.dumps(data, indent=2) + "\n")
    found: dict[str, str] = {}
    data = _nulls(data, "", found, null_reasons)
    if found and isinstance(data, dict):
        data["nulls"] = found
    return atomic_write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def _nulls(value: Any, where: str, found: dict[str, str], reasons: Mapping[str, str]) -> Any:
    if isinstance(value, dict):
        return {k: _nulls(v, f"{where}.{k}" if where else k, found, reasons) for k, v in value.items()}
    if isinstance(value, list):
        return [_nulls(v, f"{where}[{i}]", found, reasons) for i, v in enumerate(value)]
    if isinstance(value, float) and not math.isfinite(value):
        top = where.split(".")[0].split("[")[0]
        found[where] = reasons.get(top, "not a number" if value != value else f"{value} (overflow)")
        return None
    return value


def atomic_write_csv(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write dict rows (same keys, in first-row order) as CSV with a header, atomically."""
    rows = [to_jsonable(dict(r)) for r in rows]
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return atomic_write_text(path, buffer.getvalue())


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of a CSV file written by `atomic_write_csv` (values as strings); [] if missing."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def load_errors() -> tuple[type[BaseException], ...]:
    """What reading a damaged .npy/.npz can raise inside numpy: truncated data (EOFError), a
    broken zip (BadZipFile), a corrupt deflate stream (zlib.error), text or pickles (ValueError,
    UnicodeDecodeError), the file system (OSError)."""
    import zipfile
    import zlib

    return (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, UnicodeDecodeError,
            KeyError, MemoryError)


def load_npy(path: str | os.PathLike, what: str, option: str) -> np.ndarray:
    """The numeric array of the .npy file `path` (float64, finite), or InputError naming `option`,
    the file and what is wrong (missing, empty, truncated, an archive, text, pickled, NaN)."""
    name = os.fspath(path)
    require(name.endswith(".npy"), f"{option} must name a .npy file, got {name!r}")
    require(os.path.isfile(name), f"{option}: {what} file {name!r} does not exist")
    require(os.path.getsize(name) > 0, f"{option}: {what} file {name!r} is empty")
    try:
        value = np.load(name, allow_pickle=False)
        if not isinstance(value, np.ndarray):  # an .npz archive under a .npy name
            value.close()
            raise InputError(f"{option}: {what} file {name!r} is a zip archive (.npz), not one "
                             ".npy array (np.save)")
    except load_errors() as err:
        raise InputError(f"{option}: cannot read {what} file {name!r} as .npy (np.save): "
                         f"{type(err).__name__}: {' '.join(str(err).split())[:200]}") from None
    require(value.dtype.kind in "biuf", f"{option}: {what} file {name!r} must hold real numbers, "
                                        f"got dtype {value.dtype}")
    value = value.astype(np.float64)
    require(bool(np.all(np.isfinite(value))), f"{option}: {what} in {name!r} contains NaN or "
                                              "infinity")
    return value


def prepare_output_dir(path: str | os.PathLike, option: str = "--out") -> Path:
    """Check, before any computation, that `path` is (or can be made) a writable folder; create it.

    Raises InputError naming the problem: an existing file, a parent that is a file, a place
    where folders cannot be created or files written.
    """
    path = Path(path)
    require(not path.exists() or path.is_dir(),
            f"{option} must be a folder, but {path} is an existing file; give a new or existing "
            "folder")
    for parent in path.parents:
        if parent.exists():
            require(parent.is_dir(), f"{option} {path}: {parent} is a file, not a folder; give a "
                    "path whose parents are folders")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".gmrl-write-test."):
            pass
    except OSError as err:
        raise InputError(f"{option} {path} is not a writable folder ({err.strerror or err}); give "
                         "a folder you can write to") from None
    return path


_HELD: dict[tuple[int, str], list] = {}  # (thread, folder) -> [open lock file, depth]
_HELD_GUARD = threading.Lock()
LOCK_NAME = ".gmrl.lock"


def lock_is_held(folder: str | os.PathLike) -> bool:
    """Whether this thread holds `folder_lock(folder)` now."""
    return (threading.get_ident(), os.path.realpath(folder)) in _HELD


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, option: str = "--out") -> Iterator[None]:
    """Hold an exclusive lock on FOLDER/.gmrl.lock for the block; a second gmrl run on the same
    folder gets one line instead of computing the same points twice.

    Re-entrant within one thread (a command holds it around a library call that takes it
    again); another thread or process is refused. The lock file is checked to be the one at
    the path after locking, so a folder that a finished run removed is never locked through a
    stale handle.
    """
    import fcntl

    name = (threading.get_ident(), os.path.realpath(folder))
    with _HELD_GUARD:
        held = _HELD.get(name)
        if held is not None:
            held[1] += 1
        else:
            _HELD[name] = [_acquire(Path(folder), option, fcntl), 1]
    try:
        yield
    finally:
        with _HELD_GUARD:
            held = _HELD[name]
            held[1] -= 1
            if held[1] == 0:
                del _HELD[name]
                fcntl.flock(held[0], fcntl.LOCK_UN)
                held[0].close()


def _acquire(folder: Path, option: str, fcntl) -> BinaryIO:
    path = folder / LOCK_NAME
    busy = InputError(f"{option} {folder} is in use by another gmrl run; wait for it to finish or "
                      "give another folder")
    for _ in range(3):
        try:
            handle = open(path, "ab")
        except FileNotFoundError:  # the folder was removed by the run that held it
            raise busy from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise busy from None
        try:
            same = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return handle
        handle.close()  # locked a lock file that its holder removed on the way out: retry
    raise busy
