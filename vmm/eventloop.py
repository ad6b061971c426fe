"""The VMM thread's event loop: epoll over device back ends, ioeventfds and timers.

Each registration pairs a file descriptor with a callback that runs on the loop
thread when the descriptor is readable. Callbacks must not block; one that
raises is logged (rate-limited by the caller's logger) and the loop goes on, so
a faulty back end cannot stop the others. `call_soon` hands work to the loop
from any thread through an eventfd.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)

Callback = Callable[[], None]


class EventLoop:
    def __init__(self, name: str = "vmm") -> None:
        self.name = name
        self._epoll = select.epoll()
        self._callbacks: dict[int, Callback] = {}
        self._wakeup = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._pending: collections.deque[Callback] = collections.deque()
        self._timers: list[tuple[float, float, Callback]] = []
        self._lock = threading.Lock()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.add_reader(self._wakeup, self._drain_pending)

    def add_reader(self, fd: int, callback: Callback) -> None:
        """Run `callback` on the loop thread whenever `fd` is readable."""
        with self._lock:
            self._epoll.register(fd, select.EPOLLIN)
            self._callbacks[fd] = callback

    def remove_reader(self, fd: int) -> None:
        with self._lock:
            self._callbacks.pop(fd, None)
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):
            pass

    def add_periodic(self, interval_s: float, callback: Callback) -> None:
        """Run `callback` on the loop thread every `interval_s` seconds."""
        with self._lock:
            self._timers.append((time.monotonic() + interval_s, interval_s, callback))
        self._wake()

    def call_soon(self, callback: Callback) -> None:
        """Run `callback` once on the loop thread; safe from any thread."""
        self._pending.append(callback)
        self._wake()

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def close(self) -> None:
        self.stop()
        self._epoll.close()
        os.close(self._wakeup)

    def run(self) -> None:
        while not self._stopping:
            timeout = self._next_timeout()
            try:
                events = self._epoll.poll(timeout)
            except InterruptedError:
                continue
            for fd, _mask in events:
                callback = self._callbacks.get(fd)
                if callback is not None:
                    self._invoke(callback)
            self._run_due_timers()

    def _invoke(self, callback: Callback) -> None:
        try:
            callback()
        except Exception:
            log.exception("event loop %s: callback %r failed", self.name, callback)

    def _wake(self) -> None:
        os.eventfd_write(self._wakeup, 1)

    def _drain_pending(self) -> None:
        try:
            os.eventfd_read(self._wakeup)
        except BlockingIOError:
            pass
        while self._pending:
            self._invoke(self._pending.popleft())

    def _next_timeout(self) -> float:
        with self._lock:
            if not self._timers:
                return -1
            soonest = min(due for due, _, _ in self._timers)
        return max(0.0, soonest - time.monotonic())

    def _run_due_timers(self) -> None:
        now = time.monotonic()
        due_callbacks = []
        with self._lock:
            for index, (due, interval, callback) in enumerate(self._timers):
                if due <= now:
                    self._timers[index] = (now + interval, interval, callback)
                    due_callbacks.append(callback)
        for callback in due_callbacks:
            self._invoke(callback)
