"""Metrics: counters grouped as Firecracker groups them, written as one JSON object per line.

Devices and threads keep their own counters; a `Metrics` object collects them
through registered providers when it writes a line, so the hot paths only
increment integers. Lines go to the file or named pipe given by
``--metrics-path`` or ``PUT /metrics``: at start, every 60 s, on FlushMetrics
and at exit.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)

Provider = Callable[[], dict[str, int | float]]

FLUSH_INTERVAL_S = 60.0


class Metrics:
    def __init__(self) -> None:
        self._providers: dict[str, list[Provider]] = {}
        self._lock = threading.Lock()
        self._path: str | None = None
        self._file = None

    def register(self, group: str, provider: Provider) -> None:
        """Add a provider whose counters are summed into `group` on every snapshot."""
        with self._lock:
            self._providers.setdefault(group, []).append(provider)

    def snapshot(self) -> dict[str, object]:
        """Return the current counters as a JSON-ready dict with a UTC timestamp."""
        with self._lock:
            providers = {group: list(items) for group, items in self._providers.items()}
        line: dict[str, object] = {"utc_timestamp_ms": int(time.time() * 1000)}
        for group, items in providers.items():
            totals: dict[str, int | float] = {}
            for provider in items:
                for name, value in provider().items():
                    totals[name] = totals.get(name, 0) + value
            line[group] = totals
        return line

    def open(self, path: str) -> None:
        """Direct metrics to `path` (a file is appended to; a FIFO is opened for writing)."""
        with self._lock:
            if self._file is not None:
                self._file.close()
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - kept open
            self._path = path

    def flush(self) -> None:
        """Write one line of counters, if a metrics destination was configured."""
        if self._file is None:
            return
        line = json.dumps(self.snapshot(), separators=(",", ":"))
        with self._lock:
            try:
                self._file.write(line + "\n")
                self._file.flush()
            except OSError as error:
                log.error("cannot write metrics to %s: %s", self._path, error)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
