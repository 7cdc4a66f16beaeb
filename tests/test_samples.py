"""The sample store and its Parquet file: round trip, batches between processes, bad files."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from harness.errors import SamplesError
from harness.outcomes import Outcome
from harness.rundir import samples_file
from harness.samples import COLUMNS, FORMAT_KEY, SampleStore, read_samples, write_samples


def _row(i: int, **over: object) -> dict[str, object]:
    row: dict[str, object] = {
        "ts": 1_700_000_000.0 + i * 0.001,
        "phase": "pre",
        "operation": "create_booking" if i % 2 else "place_hold",
        "outcome": str(Outcome.OK),
        "sqlstate": None,
        "constraint": None,
        "latency_ms": 0.123456789 + i,
        "user": i % 7,
        "worker": "w1",
    }
    row.update(over)
    return row


def _rows() -> list[dict[str, object]]:
    rows = [_row(i) for i in range(10)]
    rows.append(
        _row(
            10,
            outcome=str(Outcome.EXCLUSION_VIOLATION),
            sqlstate="23P01",
            constraint="allocations_no_overlap",
        )
    )
    rows.append(_row(11, outcome=str(Outcome.CONNECTION_ERROR), sqlstate=None, worker="w2"))
    return rows


def test_round_trip_keeps_every_value_exactly(tmp_path: Path) -> None:
    store = SampleStore()
    rows = _rows()
    store.extend(rows)
    path = write_samples(tmp_path / samples_file("pre"), store)
    assert path.name == "samples-pre.parquet"

    df = read_samples(path)
    assert list(df.columns) == list(COLUMNS)
    assert len(df) == len(rows)
    for i, row in enumerate(rows):
        got = df.iloc[i]
        for name in COLUMNS:
            want = row[name]
            value = got[name]
            if want is None:
                assert value is None or value != value, (i, name, value)  # None or NaN
            else:
                assert value == want, (i, name, value, want)
    assert str(df["user"].dtype) == "int32"
    assert str(df["latency_ms"].dtype) == "float64"


def test_file_schema_is_the_contract(tmp_path: Path) -> None:
    store = SampleStore()
    store.extend(_rows())
    path = write_samples(tmp_path / "s.parquet", store)
    schema = pq.read_schema(path)
    assert schema.metadata[FORMAT_KEY.encode()] == b"1"
    assert schema.field("ts").type == pa.float64()
    assert schema.field("sqlstate").type == pa.string()
    assert schema.field("user").type == pa.int32()
    for name in ("phase", "operation", "outcome", "constraint", "worker"):
        assert pa.types.is_dictionary(schema.field(name).type), name
    table = pq.read_table(path)
    assert table.column("constraint").null_count == 11
    assert table.column("sqlstate").null_count == 11


def test_empty_store_writes_a_readable_empty_file(tmp_path: Path) -> None:
    path = write_samples(tmp_path / "s.parquet", SampleStore())
    df = read_samples(path)
    assert len(df) == 0
    assert list(df.columns) == list(COLUMNS)


def test_batches_from_two_workers_merge_with_their_own_codes() -> None:
    # Each worker numbers its strings in the order it met them; the master
    # must re-code, not trust the numbers.
    w1, w2 = SampleStore(), SampleStore()
    w1.extend([_row(0, operation="place_hold", worker="w1"), _row(1, worker="w1")])
    w2.extend(
        [
            _row(2, operation="cancel_booking", worker="w2"),
            _row(3, operation="place_hold", worker="w2", outcome="deadlock_detected"),
        ]
    )
    master = SampleStore()
    for worker in (w1, w2):
        # Through msgpack exactly as Locust's messages carry it.
        batch = msgpack.loads(msgpack.dumps(worker.take_batch()), raw=False)
        master.add_batch(batch)
    assert len(w1) == 0 and len(w2) == 0
    df = master.to_arrow().to_pandas()
    assert list(df["operation"]) == ["place_hold", "create_booking", "cancel_booking", "place_hold"]
    assert list(df["worker"]) == ["w1", "w1", "w2", "w2"]
    assert master.outcome_counts() == {"ok": 3, "deadlock_detected": 1}


def test_take_batch_keeps_dictionaries_so_later_batches_still_decode() -> None:
    worker, master = SampleStore(), SampleStore()
    worker.add(**_row(0, operation="release_hold"))
    master.add_batch(worker.take_batch())
    worker.add(**_row(1, operation="release_hold"))
    worker.add(**_row(2, operation="confirm_hold"))
    master.add_batch(worker.take_batch())
    assert master.operation_counts() == {"release_hold": 2, "confirm_hold": 1}


class _InterruptedHere(str):
    """A value whose lookup raises KeyboardInterrupt, as a Ctrl-C landing
    between the appends of one add() would."""

    def __hash__(self) -> int:
        raise KeyboardInterrupt


def test_a_sample_cut_short_by_ctrl_c_costs_only_itself(tmp_path: Path) -> None:
    store = SampleStore()
    store.extend(_rows())
    with pytest.raises(KeyboardInterrupt):
        store.add(**_row(99, operation=_InterruptedHere("cancel_booking")))  # ts..phase appended
    path = write_samples(tmp_path / samples_file("pre"), store)
    df = read_samples(path)
    assert len(df) == len(_rows()) == len(store)
    assert list(df["ts"]) == [row["ts"] for row in _rows()]
    # The store goes on whole: the next sample lines up in every column.
    store.add(**_row(12, operation="release_hold"))
    batch = msgpack.loads(msgpack.dumps(store.take_batch()), raw=False)
    master = SampleStore()
    assert master.add_batch(batch) == len(_rows()) + 1
    assert master.to_arrow().to_pandas()["operation"].iloc[-1] == "release_hold"


def test_a_table_still_held_does_not_stop_the_next_one() -> None:
    # The Arrow table shares the store's buffers: a second write (test_stop,
    # then quitting) must not need the first table to be gone.
    store = SampleStore()
    store.extend(_rows())
    first = store.to_arrow()
    assert store.to_arrow().num_rows == first.num_rows == store.to_batch()["n"]


def test_batch_of_another_format_is_refused() -> None:
    batch = SampleStore().to_batch()
    batch["format"] = "0"
    with pytest.raises(SamplesError, match="format"):
        SampleStore().add_batch(batch)


def test_a_million_samples_stay_compact() -> None:
    store = SampleStore()
    row = _row(1)
    for i in range(1_000_000):
        row["ts"] = float(i)
        store.add(**row)
    # 10M within 1 GB means at most ~100 bytes a sample, with room to spare.
    assert store.nbytes / len(store) <= 40


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "samples-post.parquet"
    with pytest.raises(SamplesError, match="samples-post.parquet"):
        read_samples(path)


def test_corrupt_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "samples-pre.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(SamplesError, match="samples-pre.parquet.*corrupt"):
        read_samples(path)


def test_truncated_file_names_the_file(tmp_path: Path) -> None:
    store = SampleStore()
    store.extend(_rows() * 100)
    path = write_samples(tmp_path / "samples-pre.parquet", store)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SamplesError, match="samples-pre.parquet"):
        read_samples(path)


def test_other_format_version_is_refused(tmp_path: Path) -> None:
    store = SampleStore()
    store.extend(_rows())
    table = store.to_arrow()
    path = tmp_path / "samples-pre.parquet"
    pq.write_table(table.replace_schema_metadata({FORMAT_KEY: "2"}), path)
    with pytest.raises(SamplesError, match="format '2'"):
        read_samples(path)


def test_parquet_without_harness_metadata_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.parquet"
    pq.write_table(pa.table({"ts": [1.0]}), path)
    with pytest.raises(SamplesError, match="not a harness samples file"):
        read_samples(path)
