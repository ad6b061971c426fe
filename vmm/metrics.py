"""Metrics: counters grouped as Firecracker groups them, written as one JSON object per line.

Devices and threads keep their own cumulative counters. A `Metrics` object collects them
through registered providers when it writes a line, so the hot paths only increment
integers. Lines go to the file or named pipe given by ``--metrics-path`` or
``PUT /metrics``: at InstanceStart, every 60 s, on the FlushMetrics action and at exit.

Line format
-----------
Each line is one JSON object: ``utc_timestamp_ms`` and one object per group, with the
group and field names of Firecracker v1.12's metrics (docs/metrics.md and its
``FirecrackerMetrics`` structure). As in Firecracker, a *counter* field holds the increase
since the previous line, and a *gauge* field (a duration, a start-up time, a signal flag)
holds its current value. Per-device groups (``block_<drive_id>``, ``net_<iface_id>``)
repeat the fields of their aggregate group (``block``, ``net``). Fields of a group that
no schema lists, and the groups of our own (``emulation``: instructions completed in user
space on hosts whose KVM emulates guest supervisor code), are cumulative totals.

Not measured
------------
These fields are present and always 0 because nothing in the monitor counts them yet:
``signals`` (every field), ``seccomp.num_faults`` (no filters are installed),
``vmm.panic_count``, ``deprecated_api``, ``interrupts``, ``latencies_us`` snapshot fields
(no snapshots), the latency aggregates (``*_agg``) of ``vcpu``, ``block`` and ``net``,
``vcpu.kvmclock_ctrl_fails``, and every field that a device's own counters do not supply
(for example ``block.activate_fails`` or ``net.tx_spoofed_mac_count``). ``uart`` and
``i8042`` come from the console and keyboard controller where they count, else 0.
"""

from __future__ import annotations

import copy
import errno
import json
import logging
import os
import threading
import time
from typing import Callable, Mapping

log = logging.getLogger(__name__)

Provider = Callable[[], Mapping[str, int | float]]

FLUSH_INTERVAL_S = 60.0

# One latency aggregate: minimum, maximum and sum of the durations in microseconds.
_LATENCY_AGGREGATE: dict[str, int] = {"min_us": 0, "max_us": 0, "sum_us": 0}


def _fields(*names: str) -> dict[str, object]:
    return {name: 0 for name in names}


def _with_aggregates(counters: dict[str, object], *aggregates: str) -> dict[str, object]:
    for name in aggregates:
        counters[name] = dict(_LATENCY_AGGREGATE)
    return counters


# The groups and fields of a Firecracker v1.12 metrics line, with their zero values.
FIRECRACKER_GROUPS: dict[str, dict[str, object]] = {
    "api_server": _fields("process_startup_time_us", "process_startup_time_cpu_us"),
    "balloon": _fields(
        "activate_fails", "inflate_count", "stats_updates_count", "stats_update_fails",
        "deflate_count", "event_fails", "free_page_report_count", "free_page_report_freed",
        "free_page_report_fails", "free_page_hint_count", "free_page_hint_freed",
        "free_page_hint_fails",
    ),
    "block": _with_aggregates(_fields(
        "activate_fails", "cfg_fails", "no_avail_buffer", "event_fails", "execute_fails",
        "invalid_reqs_count", "flush_count", "queue_event_count", "rate_limiter_event_count",
        "update_count", "update_fails", "read_bytes", "write_bytes", "read_count",
        "write_count", "rate_limiter_throttled_events", "io_engine_throttled_events",
        "remaining_reqs_count",
    ), "read_agg", "write_agg"),
    "deprecated_api": _fields("deprecated_http_api_calls"),
    "entropy": _fields(
        "activate_fails", "entropy_event_fails", "entropy_event_count", "entropy_bytes",
        "host_rng_fails", "entropy_rate_limiter_throttled", "rate_limiter_event_count",
    ),
    "get_api_requests": _fields(
        "instance_info_count", "machine_cfg_count", "mmds_count", "vmm_version_count",
        "hotplug_memory_count",
    ),
    "i8042": _fields(
        "error_count", "missed_read_count", "missed_write_count", "read_count",
        "reset_count", "write_count",
    ),
    "interrupts": _fields("triggers", "config_updates"),
    "latencies_us": _fields(
        "full_create_snapshot", "diff_create_snapshot", "load_snapshot", "pause_vm",
        "resume_vm", "vmm_full_create_snapshot", "vmm_diff_create_snapshot",
        "vmm_load_snapshot", "vmm_pause_vm", "vmm_resume_vm",
    ),
    "logger": _fields("missed_metrics_count", "metrics_fails", "missed_log_count"),
    "mmds": _fields(
        "rx_accepted", "rx_accepted_err", "rx_accepted_unusual", "rx_bad_eth",
        "rx_invalid_token", "rx_no_token", "rx_count", "tx_bytes", "tx_count", "tx_errors",
        "tx_frames", "connections_created", "connections_destroyed",
    ),
    "net": _with_aggregates(_fields(
        "activate_fails", "cfg_fails", "mac_address_updates", "no_rx_avail_buffer",
        "no_tx_avail_buffer", "event_fails", "rx_queue_event_count",
        "rx_event_rate_limiter_count", "rx_partial_writes", "rx_rate_limiter_throttled",
        "rx_tap_event_count", "rx_bytes_count", "rx_packets_count", "rx_fails", "rx_count",
        "tap_read_fails", "tap_write_fails", "tx_bytes_count", "tx_malformed_frames",
        "tx_fails", "tx_count", "tx_packets_count", "tx_partial_reads",
        "tx_queue_event_count", "tx_rate_limiter_event_count", "tx_rate_limiter_throttled",
        "tx_spoofed_mac_count", "tx_remaining_reqs_count",
    ), "tap_write_agg"),
    "patch_api_requests": _fields(
        "drive_count", "drive_fails", "network_count", "network_fails", "machine_cfg_count",
        "machine_cfg_fails", "mmds_count", "mmds_fails", "hotplug_memory_count",
        "hotplug_memory_fails",
    ),
    "put_api_requests": _fields(
        "actions_count", "actions_fails", "boot_source_count", "boot_source_fails",
        "drive_count", "drive_fails", "logger_count", "logger_fails", "machine_cfg_count",
        "machine_cfg_fails", "cpu_cfg_count", "cpu_cfg_fails", "metrics_count",
        "metrics_fails", "network_count", "network_fails", "mmds_count", "mmds_fails",
        "vsock_count", "vsock_fails", "pmem_count", "pmem_fails", "serial_count",
        "serial_fails", "hotplug_memory_count", "hotplug_memory_fails",
    ),
    "seccomp": _fields("num_faults"),
    "signals": _fields("sigbus", "sigsegv", "sigxfsz", "sigxcpu", "sigpipe", "sighup",
                       "sigill"),
    "uart": _fields(
        "error_count", "flush_count", "missed_read_count", "missed_write_count",
        "read_count", "write_count",
    ),
    "vcpu": _with_aggregates(_fields(
        "exit_io_in", "exit_io_out", "exit_mmio_read", "exit_mmio_write", "failures",
        "kvmclock_ctrl_fails",
    ), "exit_io_in_agg", "exit_io_out_agg", "exit_mmio_read_agg", "exit_mmio_write_agg"),
    "vmm": _fields("panic_count"),
    "vsock": _fields(
        "activate_fails", "cfg_fails", "rx_queue_event_fails", "tx_queue_event_fails",
        "ev_queue_event_fails", "muxer_event_fails", "conn_event_fails",
        "rx_queue_event_count", "tx_queue_event_count", "rx_bytes_count", "tx_bytes_count",
        "rx_packets_count", "tx_packets_count", "conns_added", "conns_killed",
        "conns_removed", "killq_resync", "tx_flush_fails", "tx_write_fails",
        "rx_read_fails",
    ),
}

# Fields written as their current value; every other schema field is a counter.
GAUGE_FIELDS: frozenset[tuple[str, str]] = frozenset(
    [("api_server", name) for name in FIRECRACKER_GROUPS["api_server"]]
    + [("latencies_us", name) for name in FIRECRACKER_GROUPS["latencies_us"]]
    + [("signals", name) for name in FIRECRACKER_GROUPS["signals"] if name != "sigpipe"]
    + [("seccomp", "num_faults"), ("vmm", "panic_count")]
)

# Per-device groups take the schema of the aggregate group their name starts with.
_PER_DEVICE_PREFIXES = ("block_", "net_")


def schema_of(group: str) -> dict[str, object] | None:
    """Return the zero-valued fields of `group`, or None for a group of our own."""
    schema = FIRECRACKER_GROUPS.get(group)
    if schema is not None:
        return schema
    for prefix in _PER_DEVICE_PREFIXES:
        if group.startswith(prefix):
            return FIRECRACKER_GROUPS[prefix[:-1]]
    return None


def is_counter(group: str, name: str) -> bool:
    """Return True if `group.name` is a Firecracker counter, written as a per-line increase."""
    schema = schema_of(group)
    if schema is None or not isinstance(schema.get(name), int):
        return False
    base = group if group in FIRECRACKER_GROUPS else group.split("_", 1)[0]
    return (base, name) not in GAUGE_FIELDS


def open_metrics_path(path: str) -> int:
    """Open a metrics file (created if missing, appended to) or named pipe for writing.

    The open is read-write and non-blocking, so a named pipe without a reader neither
    blocks the open nor fails it. Raises ValueError naming the path and the reason.
    """
    flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        return os.open(path, flags, 0o600)
    except OSError as error:
        raise ValueError(f"metrics_path: cannot open {path!r}: {error.strerror}") from None
    except ValueError:
        raise ValueError(f"metrics_path: {path!r} contains a NUL byte; host paths cannot"
                         ) from None


class Metrics:
    """Collects counters from providers and writes them as JSON lines.

    Thread-safe: providers register from any thread, and `flush()` may run on the API
    thread (FlushMetrics) and on the event-loop thread (the 60 s timer) at once.
    """

    def __init__(self) -> None:
        self._providers: dict[str, list[Provider]] = {}
        self._lock = threading.Lock()
        self._path: str | None = None
        self._fd: int | None = None
        # Counter values written in the previous line, to write increases.
        self._previous: dict[tuple[str, str], int | float] = {}
        self.missed_lines = 0
        self.write_failures = 0

    @property
    def path(self) -> str | None:
        """The destination set by open(), or None."""
        return self._path

    def register(self, group: str, provider: Provider) -> None:
        """Add a provider whose values are summed into `group` on every line."""
        with self._lock:
            self._providers.setdefault(group, []).append(provider)

    def snapshot(self) -> dict[str, object]:
        """Return the cumulative values of every group, schema fields included."""
        with self._lock:
            providers = {group: list(items) for group, items in self._providers.items()}
        line: dict[str, object] = {"utc_timestamp_ms": int(time.time() * 1000)}
        for group, schema in FIRECRACKER_GROUPS.items():
            line[group] = copy.deepcopy(schema)
        line["logger"] = self._logger_counters()
        for group, items in providers.items():
            totals = line.setdefault(group, copy.deepcopy(schema_of(group) or {}))
            assert isinstance(totals, dict)
            for provider in items:
                _add_values(totals, provider())
        return line

    def _logger_counters(self) -> dict[str, object]:
        from vmm import logger as vmm_logger

        return {
            "missed_metrics_count": self.missed_lines,
            "metrics_fails": self.write_failures,
            "missed_log_count": vmm_logger.dropped_line_count(),
        }

    def render_line(self) -> str:
        """Return the next line (without newline), with counters as increases.

        Each call advances the counters' baseline, as writing a line does in Firecracker.
        """
        line = self.snapshot()
        with self._lock:
            for group, values in line.items():
                if isinstance(values, dict):
                    self._to_increases(group, values)
        return json.dumps(line, separators=(",", ":"))

    def _to_increases(self, group: str, values: dict[str, object]) -> None:
        for name, value in values.items():
            if isinstance(value, (int, float)) and is_counter(group, name):
                key = (group, name)
                values[name] = value - self._previous.get(key, 0)
                self._previous[key] = value

    def open(self, path: str) -> None:
        """Direct metrics to `path`; raise ValueError if it cannot be opened."""
        fd = open_metrics_path(path)
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
            self._fd = fd
            self._path = path

    def flush(self) -> bool:
        """Write one line if a destination is open; return whether a line was written.

        A full named pipe drops the line (counted in logger.missed_metrics_count); any
        other write error is logged and counted in logger.metrics_fails.
        """
        if self._fd is None:
            return False
        line = (self.render_line() + "\n").encode()
        with self._lock:
            if self._fd is None:
                return False
            try:
                os.write(self._fd, line)
            except BlockingIOError:
                self.missed_lines += 1
                return False
            except OSError as error:
                self.write_failures += 1
                if error.errno != errno.EPIPE:
                    log.error("cannot write metrics to %s: %s", self._path, error)
                return False
        return True

    def close(self) -> None:
        """Close the destination; later flushes write nothing."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def _add_values(totals: dict[str, object], values: Mapping[str, object]) -> None:
    """Add `values` into `totals`, field by field; nested objects are added recursively."""
    for name, value in values.items():
        current = totals.get(name)
        if isinstance(value, Mapping):
            nested = current if isinstance(current, dict) else {}
            _add_values(nested, value)
            totals[name] = nested
        elif isinstance(current, (int, float)) and not isinstance(current, bool):
            totals[name] = current + value  # type: ignore[operator]
        else:
            totals[name] = value
