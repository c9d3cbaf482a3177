"""Log sinks of a training run: a CSV file rewritten atomically, TensorBoard through tensorboardX."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gmrl.io import atomic_write_csv, read_csv


class CsvLog:
    """Rows of a log; `extend` appends and rewrites the file atomically, so an interrupted run
    leaves a complete CSV behind. `keep(predicate)` drops rows (e.g. past a checkpoint)."""

    def __init__(self, path: Path, fields: Sequence[str]):
        self.path, self.fields = Path(path), tuple(fields)
        self.rows: list[dict[str, Any]] = []

    def load(self) -> list[dict[str, Any]]:
        """Read the rows already on disk (values as strings)."""
        self.rows = read_csv(self.path)
        return self.rows

    def keep(self, predicate) -> None:
        self.rows = [r for r in self.rows if predicate(r)]

    def extend(self, rows: Iterable[Mapping[str, Any]]) -> None:
        self.rows.extend({f: r[f] for f in self.fields} for r in rows)
        atomic_write_csv(self.path, self.rows)


class TensorBoardLog:
    """Scalars `tag = PREFIX{seed}/NAME` at step `frames` through tensorboardX's SummaryWriter.

    `purge_step` (the frames of a checkpoint being resumed) tells TensorBoard to drop events the
    interrupted run wrote after it.
    """

    def __init__(self, folder: Path, names: Sequence[str], purge_step: int | None = None):
        from tensorboardX import SummaryWriter

        self.names = tuple(names)
        self._writer = SummaryWriter(logdir=str(folder), purge_step=purge_step or None)

    def add(self, step: int, rows: Iterable[Mapping[str, Any]]) -> None:
        for row in rows:
            for name in self.names:
                value = float(row[name])
                if math.isfinite(value):
                    self._writer.add_scalar(f"seed{row['seed']}/{name}", value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
