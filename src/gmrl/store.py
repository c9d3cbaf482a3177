"""Resumable result store: one SQLite row per grid point, keyed by the hash of its full config.

A row holds the config (JSON), the result (JSON: every statistic the point function returned), the
seeds found in the config, the wall time in seconds, the gmrl version and the UTC creation time.
Every write is one transaction in WAL mode with synchronous=FULL, so a sweep killed at any moment
(SIGINT or SIGKILL) leaves only whole rows behind; the primary key makes a second write of the
same point a no-op, so a resumed sweep never duplicates a row.
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gmrl import __version__
from gmrl.errors import InputError, require
from gmrl.io import atomic_write_csv, to_jsonable

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS gmrl_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS results (
    key TEXT PRIMARY KEY,
    config TEXT NOT NULL,
    result TEXT NOT NULL,
    seeds TEXT NOT NULL,
    seconds REAL NOT NULL,
    batch_size INTEGER NOT NULL,
    version TEXT NOT NULL,
    created TEXT NOT NULL
);
"""


def canonical_json(config: Mapping[str, Any]) -> str:
    """Sorted-key, whitespace-free JSON of `config` (numpy values become Python numbers).

    Raises InputError for values JSON cannot hold exactly (NaN, infinity, arbitrary objects).
    """
    require(isinstance(config, Mapping), f"a config must be a dict, got {type(config).__name__}")
    try:
        return json.dumps(to_jsonable(config), sort_keys=True, separators=(",", ":"),
                          allow_nan=False)
    except (TypeError, ValueError) as err:
        raise InputError(f"config is not plain JSON data (numbers, strings, bools, None, lists, "
                         f"dicts; no NaN or infinity): {err}") from None


def config_key(config: Mapping[str, Any]) -> str:
    """The point's identity: sha256 hex digest of canonical_json(config) — every field, seeds too."""
    return hashlib.sha256(canonical_json(config).encode("utf-8")).hexdigest()


def seeds_of(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config fields whose name contains 'seed' (case-insensitive), e.g. seed, mdp_seeds."""
    return {k: v for k, v in config.items() if "seed" in str(k).lower()}


@dataclass(frozen=True)
class StoredRow:
    """One stored grid point, with config and result decoded from JSON."""

    key: str
    config: dict[str, Any]
    result: dict[str, Any]
    seeds: dict[str, Any]
    seconds: float
    batch_size: int
    version: str
    created: str


@dataclass(frozen=True)
class PendingRow:
    """A finished point on its way into the store (see ResultStore.put_many)."""

    config: Mapping[str, Any]
    result: Mapping[str, Any]
    seconds: float
    batch_size: int = 1


class ResultStore:
    """Embedded SQLite result store at `path` (created, with its folder, if missing).

    Use as a context manager or call close(). Only one process should write at a time (the sweep
    driver); readers may open the same file concurrently.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        require(not self.path.is_dir(), f"result store {self.path} is a folder; give a file path "
                "such as results.sqlite")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.path, timeout=30.0)
            tables = {t for (t,) in self._conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            foreign = bool(tables) and "gmrl_meta" not in tables
            if not foreign:
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.execute("PRAGMA synchronous=FULL")
                with self._conn:
                    self._conn.executescript(_SCHEMA)
                    self._conn.execute("INSERT OR IGNORE INTO gmrl_meta VALUES ('schema', ?)",
                                       (str(SCHEMA_VERSION),))
                (schema,) = self._conn.execute(
                    "SELECT value FROM gmrl_meta WHERE name = 'schema'").fetchone()
        except (sqlite3.Error, OSError) as err:
            if hasattr(self, "_conn"):
                self._conn.close()
            text = str(err).lower()
            if isinstance(err, OSError) or any(w in text for w in ("full", "readonly", "read-only",
                                                                    "unable to open", "disk i/o")):
                raise InputError(f"cannot write the result store {self.path}: {err}; free space or "
                                 "give a folder you can write to") from None
            raise InputError(f"cannot open result store {self.path}: {err} (expected a gmrl "
                             "SQLite result store, or a path where one can be created)") from None
        if foreign:
            self._conn.close()
            raise InputError(f"{self.path} is an SQLite file but not a gmrl result store (it has "
                             f"tables {sorted(tables)}); give a new path or a gmrl store")
        require(schema == str(SCHEMA_VERSION), f"result store {self.path} has schema {schema}; "
                f"this gmrl reads schema {SCHEMA_VERSION}")

    def close(self) -> None:
        """Close the connection (committed rows are already on disk)."""
        self._conn.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return self._conn.execute("SELECT COUNT(*) FROM results").fetchone()[0]

    def done_keys(self) -> set[str]:
        """Keys of every stored point."""
        return {k for (k,) in self._conn.execute("SELECT key FROM results")}

    def put(self, key: str, config: Mapping[str, Any], result: Mapping[str, Any],
            seconds: float, batch_size: int = 1) -> bool:
        """Store one point in its own transaction; `key` must equal config_key(config).

        Returns False (and changes nothing) when the key is already stored.
        """
        require(key == config_key(config), f"key {key[:12]}… is not the hash of its config")
        return self.put_many([PendingRow(config, result, seconds, batch_size)]) == 1

    def put_many(self, rows: Iterable[PendingRow]) -> int:
        """Store several points in ONE transaction (all or none); returns how many were new."""
        created = datetime.now(UTC).isoformat(timespec="milliseconds")
        records = [self._record(row, created) for row in rows]
        with self._conn:
            before = self._conn.total_changes
            self._conn.executemany(
                "INSERT OR IGNORE INTO results VALUES (?, ?, ?, ?, ?, ?, ?, ?)", records)
            return self._conn.total_changes - before

    @staticmethod
    def _record(row: PendingRow, created: str) -> tuple:
        require(isinstance(row.result, Mapping),
                f"a point's result must be a dict of statistics, got {type(row.result).__name__}")
        config_text = canonical_json(row.config)
        result_text = json.dumps(to_jsonable(row.result))
        seeds_text = json.dumps(to_jsonable(seeds_of(row.config)), sort_keys=True)
        key = hashlib.sha256(config_text.encode("utf-8")).hexdigest()
        return (key, config_text, result_text, seeds_text, float(row.seconds),
                int(row.batch_size), __version__, created)

    def get(self, key: str) -> StoredRow | None:
        """The stored row for `key`, or None."""
        found = self._conn.execute("SELECT * FROM results WHERE key = ?", (key,)).fetchone()
        return None if found is None else _decode(found)

    def rows(self) -> list[StoredRow]:
        """Every stored row, in the order they were written."""
        return [_decode(r) for r in self._conn.execute("SELECT * FROM results ORDER BY rowid")]

    def export_csv(self, path: str | Path) -> Path:
        """Write every row as one CSV line (atomically): key, config fields, result fields, meta.

        Nested result dicts are flattened with dots (bias2.mean); lists are written as JSON; a
        result field named like a config field is prefixed with 'result.'. Missing cells are empty.
        """
        flat = [_flatten_row(r) for r in self.rows()]
        columns: dict[str, None] = {}
        for row in flat:
            columns.update(dict.fromkeys(row))
        return atomic_write_csv(path, [{c: row.get(c, "") for c in columns} for row in flat])


def _decode(record: tuple) -> StoredRow:
    key, config, result, seeds, seconds, batch_size, version, created = record
    return StoredRow(key, json.loads(config), json.loads(result), json.loads(seeds), seconds,
                     batch_size, version, created)


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, list):
        out[prefix] = json.dumps(value)
    elif isinstance(value, float) and not math.isfinite(value):
        out[prefix] = str(value)
    else:
        out[prefix] = value


_META_COLUMNS = ("key", "seconds", "batch_size", "version", "created")


def _flatten_row(row: StoredRow) -> dict[str, Any]:
    config: dict[str, Any] = {}
    _flatten("", row.config, config)
    result: dict[str, Any] = {}
    _flatten("", row.result, result)
    out: dict[str, Any] = {"key": row.key}
    for name, value in config.items():
        out[f"config.{name}" if name in _META_COLUMNS else name] = value
    for name, value in result.items():
        out[f"result.{name}" if name in out or name in _META_COLUMNS else name] = value
    out.update(seconds=row.seconds, batch_size=row.batch_size, version=row.version,
               created=row.created)
    return out
