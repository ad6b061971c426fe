"""The metrics line format: Firecracker's groups, counters as increases, gauges as values."""

from __future__ import annotations

import json
import os
from pathlib import Path

from vmm.metrics import FIRECRACKER_GROUPS, Metrics, is_counter, open_metrics_path


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_line_has_every_firecracker_group(tmp_path: Path) -> None:
    metrics = Metrics()
    metrics.open(str(tmp_path / "metrics.json"))
    assert metrics.flush()
    (line,) = read_lines(tmp_path / "metrics.json")
    assert isinstance(line["utc_timestamp_ms"], int)
    for group, fields in FIRECRACKER_GROUPS.items():
        assert set(line[group]) == set(fields), group
    assert line["vcpu"]["exit_io_in_agg"] == {"min_us": 0, "max_us": 0, "sum_us": 0}


def test_counters_are_increases_since_previous_line(tmp_path: Path) -> None:
    reads = {"read_count": 5}
    metrics = Metrics()
    metrics.register("uart", lambda: dict(reads))
    metrics.open(str(tmp_path / "m.json"))
    metrics.flush()
    reads["read_count"] = 12
    metrics.flush()
    metrics.flush()
    counts = [line["uart"]["read_count"] for line in read_lines(tmp_path / "m.json")]
    assert counts == [5, 7, 0]


def test_gauges_and_own_groups_are_current_values(tmp_path: Path) -> None:
    metrics = Metrics()
    metrics.register("latencies_us", lambda: {"pause_vm": 40})
    metrics.register("emulation", lambda: {"int3_delivered": 3})
    metrics.open(str(tmp_path / "m.json"))
    metrics.flush()
    metrics.flush()
    second = read_lines(tmp_path / "m.json")[1]
    assert second["latencies_us"]["pause_vm"] == 40
    assert second["emulation"]["int3_delivered"] == 3


def test_per_device_groups_use_aggregate_schema(tmp_path: Path) -> None:
    metrics = Metrics()
    metrics.register("block", lambda: {"read_count": 2})
    metrics.register("block_rootfs", lambda: {"read_count": 2})
    metrics.open(str(tmp_path / "m.json"))
    metrics.flush()
    (line,) = read_lines(tmp_path / "m.json")
    assert set(line["block_rootfs"]) == set(FIRECRACKER_GROUPS["block"])
    assert line["block_rootfs"]["read_count"] == 2
    assert is_counter("block_rootfs", "read_count")
    assert not is_counter("api_server", "process_startup_time_us")
    assert not is_counter("emulation", "int3_delivered")


def test_providers_of_one_group_are_summed() -> None:
    metrics = Metrics()
    metrics.register("net", lambda: {"rx_count": 1})
    metrics.register("net", lambda: {"rx_count": 2})
    assert metrics.snapshot()["net"]["rx_count"] == 3  # type: ignore[index]


def test_flush_without_destination_writes_nothing() -> None:
    assert Metrics().flush() is False


def test_full_fifo_drops_line_and_counts_it(tmp_path: Path) -> None:
    fifo = tmp_path / "metrics.fifo"
    os.mkfifo(fifo)
    metrics = Metrics()
    metrics.open(str(fifo))  # no reader: must neither block nor fail
    written = 0
    while metrics.flush():
        written += 1
        assert written < 100_000
    assert metrics.missed_lines == 1
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        os.read(reader, 1 << 20)
    finally:
        os.close(reader)
    metrics.flush()
    assert metrics.snapshot()["logger"]["missed_metrics_count"] == 1  # type: ignore[index]
    metrics.close()


def test_open_failure_names_path(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-dir" / "m.json")
    try:
        open_metrics_path(missing)
    except ValueError as error:
        assert missing in str(error)
    else:
        raise AssertionError("opening a path in a missing directory succeeded")
