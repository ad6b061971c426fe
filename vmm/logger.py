"""Logging set-up for the monitor and a rate-limited helper for guest-triggered messages.

Every record goes to the "vmm" logger hierarchy. A line reads

    2025-01-31T12:00:00.123456 [instance-id:thread:LEVEL:vmm/api/server.py:42] message

where the level and the origin appear only when --show-level and --show-log-origin (or
the PUT /logger fields of the same name) ask for them. Output goes to stderr, or to a file
or named pipe. A pipe with no reader, or a full one, drops lines instead of blocking the
monitor; dropped lines are counted in LogOutput.dropped_lines.
"""

from __future__ import annotations

import datetime
import errno
import logging
import os
import sys
import threading
import time
from typing import Any

LOGGER_NAME = "vmm"
TRACE = 5
# The Off level lies above every level the monitor logs at.
OFF = logging.CRITICAL + 10

LEVELS: dict[str, int] = {
    "error": logging.ERROR,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": TRACE,
    "off": OFF,
}
DEFAULT_LEVEL = "Info"

logging.addLevelName(TRACE, "TRACE")

# Lines dropped by every LogOutput of this process, for the logger.missed_log_count metric.
_dropped_lines = 0
_dropped_lock = threading.Lock()


def dropped_line_count() -> int:
    """Return how many log lines were dropped because the output pipe was full or closed."""
    return _dropped_lines


def _count_dropped_line() -> None:
    global _dropped_lines
    with _dropped_lock:
        _dropped_lines += 1


def parse_level(name: str) -> int:
    """Return the logging level for a Firecracker level name, matched without case."""
    try:
        return LEVELS[name.lower()]
    except KeyError:
        raise ValueError(
            f"level: {name!r} is not one of Error, Warning, Info, Debug, Trace, Off"
        ) from None


class LogFormatter(logging.Formatter):
    """Formats records as `timestamp [id:thread(:LEVEL)(:file:line)] message`."""

    def __init__(self, instance_id: str, show_level: bool, show_log_origin: bool) -> None:
        super().__init__()
        self.instance_id = instance_id
        self.show_level = show_level
        self.show_log_origin = show_log_origin

    def format(self, record: logging.LogRecord) -> str:
        timestamp = datetime.datetime.fromtimestamp(record.created).isoformat(
            timespec="microseconds"
        )
        fields = [self.instance_id, record.threadName or "?"]
        if self.show_level:
            fields.append(record.levelname)
        if self.show_log_origin:
            fields.append(f"{_origin_path(record.pathname)}:{record.lineno}")
        line = f"{timestamp} [{':'.join(fields)}] {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _origin_path(pathname: str) -> str:
    """Shorten an absolute source path to its part from the `vmm/` package on."""
    marker = os.sep + "vmm" + os.sep
    index = pathname.rfind(marker)
    return pathname[index + 1:] if index >= 0 else os.path.basename(pathname)


class LogOutput(logging.Handler):
    """Writes each formatted record as one line to a file descriptor without blocking."""

    def __init__(self, fd: int, owns_fd: bool) -> None:
        super().__init__()
        self.fd = fd
        self.owns_fd = owns_fd
        self.dropped_lines = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = (self.format(record) + "\n").encode(errors="replace")
        except Exception:
            self.handleError(record)
            return
        if self.fd < 0:
            # sys.stderr without a file descriptor (replaced by a test harness or an IDE).
            sys.stderr.write(line.decode())
            return
        try:
            os.write(self.fd, line)
        except BlockingIOError:
            self._drop_line()
        except OSError as error:
            if error.errno not in (errno.EPIPE, errno.EAGAIN):
                raise
            self._drop_line()

    def _drop_line(self) -> None:
        self.dropped_lines += 1
        _count_dropped_line()

    def close(self) -> None:
        if self.owns_fd:
            os.close(self.fd)
            self.owns_fd = False
        super().close()


class _ModuleFilter(logging.Filter):
    """Passes records whose logger name is `module` or lies below it."""

    def __init__(self, module: str) -> None:
        super().__init__()
        self.module = module

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        return name == self.module or name.startswith(self.module + ".")


def open_log_path(path: str) -> int:
    """Open a log file (created if missing, appended to) or named pipe for writing.

    A named pipe is opened read-write and non-blocking. On Linux that open does not wait
    for a reader, and a full pipe drops lines instead of stalling the monitor.
    """
    flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        return os.open(path, flags, 0o600)
    except OSError as error:
        raise ValueError(f"log_path: cannot open {path!r}: {error.strerror}") from None
    except ValueError:
        raise ValueError(f"log_path: {path!r} contains a NUL byte; host paths cannot") from None


def _stderr_fd() -> int:
    """Return the file descriptor of sys.stderr, or -1 if it has none."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, ValueError, OSError):
        return -1


def configure(
    instance_id: str,
    level: str = DEFAULT_LEVEL,
    log_path: str | None = None,
    show_level: bool = False,
    show_log_origin: bool = False,
    module: str | None = None,
) -> LogOutput:
    """Route the "vmm" loggers to stderr or `log_path`, replacing any earlier output.

    Raises ValueError naming the bad level or the path that cannot be opened; the earlier
    output stays in place then.
    """
    numeric_level = parse_level(level)
    if log_path is None:
        handler = LogOutput(_stderr_fd(), owns_fd=False)
    else:
        handler = LogOutput(open_log_path(log_path), owns_fd=True)
    handler.setFormatter(LogFormatter(instance_id, show_level, show_log_origin))
    if module:
        handler.addFilter(_ModuleFilter(module))
    logger = logging.getLogger(LOGGER_NAME)
    for old in list(logger.handlers):
        logger.removeHandler(old)
        old.close()
    logger.addHandler(handler)
    logger.setLevel(numeric_level)
    logger.propagate = False
    return handler


class RateLimitedLogger:
    """Logs at most `burst` messages per `interval_s` from each call site.

    For messages a guest can trigger at will (a bad descriptor, an unknown register): the
    first `burst` in each interval are logged, the rest counted, and the next message that
    gets through reports how many were suppressed. A call site is the caller's file and line.
    """

    def __init__(self, logger: logging.Logger, burst: int = 10, interval_s: float = 5.0) -> None:
        self.logger = logger
        self.burst = burst
        self.interval_s = interval_s
        self._lock = threading.Lock()
        # call site -> [interval start (monotonic seconds), messages logged, suppressed]
        self._sites: dict[tuple[str, int], list[Any]] = {}

    def log(self, level: int, message: str, *args: object) -> bool:
        """Log `message % args` unless this call site is over its budget; return if logged."""
        if not self.logger.isEnabledFor(level):
            return False
        frame = sys._getframe(1)
        depth = 1
        while frame.f_code.co_filename == __file__ and frame.f_back is not None:
            frame = frame.f_back
            depth += 1
        site = (frame.f_code.co_filename, frame.f_lineno)
        suppressed = self._take(site)
        if suppressed is None:
            return False
        if suppressed:
            message = f"{message} ({suppressed} similar messages suppressed)"
        self.logger.log(level, message, *args, stacklevel=depth + 1)
        return True

    def warning(self, message: str, *args: object) -> bool:
        return self.log(logging.WARNING, message, *args)

    def error(self, message: str, *args: object) -> bool:
        return self.log(logging.ERROR, message, *args)

    def _take(self, site: tuple[str, int]) -> int | None:
        """Return the suppressed count to report, or None if this message is suppressed."""
        now = time.monotonic()
        with self._lock:
            state = self._sites.setdefault(site, [now, 0, 0])
            if now - state[0] >= self.interval_s:
                state[0] = now
                state[1] = 0
            if state[1] >= self.burst:
                state[2] += 1
                return None
            state[1] += 1
            suppressed, state[2] = state[2], 0
            return suppressed
