"""Samples: one row per load request, held compactly and written as Parquet.

A load run can make tens of millions of requests, so samples are not kept as
Python objects (a dataclass per request costs ~200 bytes). :class:`SampleStore`
keeps one typed ``array`` per numeric column and a small-int code per string
column (the strings themselves live once, in a per-column dictionary): about
32 bytes a sample, so 10M samples fit in ~320 MB.

The same encoding travels between Locust processes: a worker sends
:meth:`SampleStore.take_batch` (plain bytes and string lists, which msgpack
carries as they are) and the master folds it in with
:meth:`SampleStore.add_batch`, re-coding the strings into its own dictionaries.

The file (``samples-<phase>.parquet``, the contract with the report) has the
columns of :data:`COLUMNS`; string columns except ``sqlstate`` are
dictionary-encoded, and the key-value metadata ``harness_format`` says which
version of this layout it is. :func:`read_samples` refuses anything else with
a :class:`~harness.errors.SamplesError` naming the file.
"""

from __future__ import annotations

import logging
from array import array
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from harness.errors import SamplesError
from harness.rundir import atomic_write_with

log = logging.getLogger(__name__)

FORMAT_KEY = "harness_format"
FORMAT_VERSION = "1"

# Column order of the file; the report reads exactly these.
COLUMNS: tuple[str, ...] = (
    "ts",
    "phase",
    "operation",
    "outcome",
    "sqlstate",
    "constraint",
    "latency_ms",
    "user",
    "worker",
)
# String columns kept as codes in the store.
_CODED: tuple[str, ...] = ("phase", "operation", "outcome", "sqlstate", "constraint", "worker")
# Of those, which stay dictionary-encoded in the file (sqlstate is plain string).
_DICTIONARY_IN_FILE = frozenset({"phase", "operation", "outcome", "constraint", "worker"})
_NULLABLE = frozenset({"sqlstate", "constraint"})
# uint16 codes: a column may hold at most this many distinct values.
_MAX_CODES = 65535

SCHEMA = pa.schema(
    [
        pa.field("ts", pa.float64(), nullable=False),
        pa.field("phase", pa.dictionary(pa.int32(), pa.string()), nullable=False),
        pa.field("operation", pa.dictionary(pa.int32(), pa.string()), nullable=False),
        pa.field("outcome", pa.dictionary(pa.int32(), pa.string()), nullable=False),
        pa.field("sqlstate", pa.string(), nullable=True),
        pa.field("constraint", pa.dictionary(pa.int32(), pa.string()), nullable=True),
        pa.field("latency_ms", pa.float64(), nullable=False),
        pa.field("user", pa.int32(), nullable=False),
        pa.field("worker", pa.dictionary(pa.int32(), pa.string()), nullable=False),
    ],
    metadata={FORMAT_KEY: FORMAT_VERSION},
)


class _Codes:
    """A string column's dictionary: value <-> small int (``None`` is a value too)."""

    __slots__ = ("index", "values")

    def __init__(self) -> None:
        self.values: list[str | None] = []
        self.index: dict[str | None, int] = {}

    def code(self, value: str | None) -> int:
        code = self.index.get(value)
        if code is None:
            code = len(self.values)
            if code >= _MAX_CODES:
                raise SamplesError(f"more than {_MAX_CODES} distinct values in one samples column")
            self.values.append(value)
            self.index[value] = code
        return code


class SampleStore:
    """Columnar, append-only samples of one process (or, on a master, of all)."""

    def __init__(self) -> None:
        self._ts = array("d")
        self._latency = array("d")
        self._user = array("i")
        self._codes: dict[str, _Codes] = {name: _Codes() for name in _CODED}
        self._coded: dict[str, array] = {name: array("H") for name in _CODED}

    def __len__(self) -> int:
        return len(self._ts)

    def add(
        self,
        *,
        ts: float,
        phase: str,
        operation: str,
        outcome: str,
        sqlstate: str | None,
        constraint: str | None,
        latency_ms: float,
        user: int,
        worker: str,
    ) -> None:
        """Record one request (the hot path: a few appends, no allocation per string)."""
        codes, coded = self._codes, self._coded
        self._ts.append(ts)
        self._latency.append(latency_ms)
        self._user.append(user)
        coded["phase"].append(codes["phase"].code(phase))
        coded["operation"].append(codes["operation"].code(operation))
        coded["outcome"].append(codes["outcome"].code(str(outcome)))
        coded["sqlstate"].append(codes["sqlstate"].code(sqlstate))
        coded["constraint"].append(codes["constraint"].code(constraint))
        coded["worker"].append(codes["worker"].code(worker))

    @property
    def nbytes(self) -> int:
        """Bytes the columns take (the dictionaries are a few strings, not counted)."""
        arrays = [self._ts, self._latency, self._user, *self._coded.values()]
        return sum(a.buffer_info()[1] * a.itemsize for a in arrays)

    def outcome_counts(self) -> dict[str, int]:
        """Samples per outcome value (only the outcomes that occurred)."""
        return self._counts("outcome")

    def operation_counts(self) -> dict[str, int]:
        return self._counts("operation")

    def _counts(self, column: str) -> dict[str, int]:
        codes = np.frombuffer(self._coded[column], dtype=np.uint16)
        values = self._codes[column].values
        counts = np.bincount(codes, minlength=len(values)) if len(codes) else []
        return {str(values[i]): int(n) for i, n in enumerate(counts) if n}

    # -- moving samples between processes ---------------------------------

    def _drop_partial_row(self) -> None:
        """Cut every column to the shortest: a Ctrl-C (or a killed greenlet)
        between :meth:`add`'s appends leaves its row in some columns only, and
        one half-recorded request must not cost the file all the others."""
        columns = [self._ts, self._latency, self._user, *self._coded.values()]
        complete = min(len(column) for column in columns)
        for column in columns:
            if len(column) > complete:  # (resizing needs no live numpy view of it)
                del column[complete:]

    def to_batch(self) -> dict[str, Any]:
        """The samples as a msgpack-friendly dict (bytes and lists of strings)."""
        self._drop_partial_row()
        return {
            "format": FORMAT_VERSION,
            "n": len(self),
            "ts": self._ts.tobytes(),
            "latency_ms": self._latency.tobytes(),
            "user": self._user.tobytes(),
            "codes": {name: self._coded[name].tobytes() for name in _CODED},
            "values": {name: list(self._codes[name].values) for name in _CODED},
        }

    def take_batch(self) -> dict[str, Any]:
        """:meth:`to_batch`, then forget those samples (the dictionaries stay)."""
        batch = self.to_batch()
        self._ts = array("d")
        self._latency = array("d")
        self._user = array("i")
        self._coded = {name: array("H") for name in _CODED}
        return batch

    def add_batch(self, batch: Mapping[str, Any]) -> int:
        """Append a batch from :meth:`to_batch` (another process's); return its size."""
        if batch.get("format") != FORMAT_VERSION:
            raise SamplesError(
                f"samples batch of format {batch.get('format')!r}, expected {FORMAT_VERSION}",
                hint="run the same harness version on the master and every worker",
            )
        n = int(batch["n"])
        if n == 0:
            return 0
        self._ts.frombytes(batch["ts"])
        self._latency.frombytes(batch["latency_ms"])
        self._user.frombytes(batch["user"])
        for name in _CODED:
            theirs = np.frombuffer(batch["codes"][name], dtype=np.uint16)
            mine = self._codes[name]
            remap = np.fromiter((mine.code(v) for v in batch["values"][name]), dtype=np.uint16)
            self._coded[name].frombytes(remap[theirs].tobytes() if len(remap) else b"")
        if not all(len(self._coded[name]) == len(self._ts) for name in _CODED):
            raise SamplesError("samples batch with columns of different lengths")
        return n

    def extend(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Append rows given as mappings of :data:`COLUMNS` (tests, small imports)."""
        for row in rows:
            self.add(**{name: row[name] for name in COLUMNS})

    # -- the file ----------------------------------------------------------

    def to_arrow(self) -> pa.Table:
        """The samples as an Arrow table of :data:`SCHEMA`."""
        self._drop_partial_row()
        columns: dict[str, pa.Array] = {
            "ts": pa.array(np.frombuffer(self._ts, dtype=np.float64), type=pa.float64()),
            "latency_ms": pa.array(
                np.frombuffer(self._latency, dtype=np.float64), type=pa.float64()
            ),
            "user": pa.array(np.frombuffer(self._user, dtype=np.int32), type=pa.int32()),
        }
        for name in _CODED:
            columns[name] = self._coded_column(name)
        return pa.Table.from_arrays([columns[name] for name in COLUMNS], schema=SCHEMA)

    def _coded_column(self, name: str) -> pa.Array:
        codes = np.frombuffer(self._coded[name], dtype=np.uint16).astype(np.int32)
        values = self._codes[name].values
        null_code = self._codes[name].index.get(None)
        mask = (codes == null_code) if null_code is not None else None
        dictionary = pa.array(["" if v is None else v for v in values], type=pa.string())
        indices = pa.array(codes, type=pa.int32(), mask=mask)
        column = pa.DictionaryArray.from_arrays(indices, dictionary)
        if name not in _DICTIONARY_IN_FILE:
            column = column.cast(pa.string())
        return column


def write_samples(path: Path, store: SampleStore) -> Path:
    """Write ``store`` to ``path`` atomically (a reader sees all of it or nothing)."""
    path = Path(path)
    table = store.to_arrow()
    atomic_write_with(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))
    log.info("wrote %s samples to %s", table.num_rows, path)
    return path


def read_samples(path: Path) -> Any:
    """Read a samples file into a pandas DataFrame with the columns of :data:`COLUMNS`.

    Dictionary-encoded columns come back as pandas categoricals. Raises
    :class:`SamplesError` naming the file when it is missing, corrupt,
    truncated or of another format version.
    """
    path = Path(path)
    if not path.is_file():
        raise SamplesError(
            f"samples file {path} is missing",
            hint="run `harness load` for that phase first",
        )
    try:
        parquet = pq.ParquetFile(path)
        metadata = parquet.schema_arrow.metadata or {}
        found = metadata.get(FORMAT_KEY.encode())
        if found is None:
            raise SamplesError(
                f"{path} is not a harness samples file (no {FORMAT_KEY} metadata)",
                hint="point at a samples-<phase>.parquet written by `harness load`",
            )
        if found.decode() != FORMAT_VERSION:
            raise SamplesError(
                f"{path} has samples format {found.decode()!r}, this harness reads"
                f" {FORMAT_VERSION!r}",
                hint="read it with the harness version that wrote it, or rerun the load",
            )
        missing = [name for name in COLUMNS if name not in parquet.schema_arrow.names]
        if missing:
            raise SamplesError(
                f"{path} lacks samples column(s) {', '.join(missing)}",
                hint="rerun the load that wrote it",
            )
        table = parquet.read(columns=list(COLUMNS))
    except SamplesError:
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise SamplesError(
            f"samples file {path} is corrupt or truncated: {str(exc).splitlines()[0]}",
            hint="the run that wrote it may have been killed; rerun that load",
        ) from None
    return table.to_pandas()
