"""The serial console's host side: guest output to stdout, stdin to the guest UART.

The UART model accepts at most its FIFO's worth of input at a time, so bytes
read from stdin wait in a bounded buffer and are fed to the UART as the guest
drains it (the event loop retries on a short timer). When stdin is a terminal
it is put in raw mode for the VM's lifetime, so that keys such as Ctrl-C reach
the guest, as with Firecracker; the terminal is restored on close.
"""

from __future__ import annotations

import logging
import os
import termios
import tty
from typing import BinaryIO, Callable

from vmm.eventloop import EventLoop

log = logging.getLogger(__name__)

# Bytes kept from stdin while the guest is not reading; beyond this stdin is not read.
INPUT_BUFFER_LIMIT = 64 * 1024
INPUT_RETRY_INTERVAL_S = 0.01
# Guest output kept for watchers that look for a message across write boundaries.
OUTPUT_TAIL_BYTES = 256


class Console:
    """Connect a UART model to a host input stream and output stream."""

    def __init__(
        self,
        input_stream: BinaryIO | None,
        output_stream: BinaryIO,
        on_output: Callable[[bytes, bytes], None] | None = None,
    ) -> None:
        self.output_stream = output_stream
        self.on_output = on_output
        self.serial = None  # set by attach(); typed loosely to keep this module model-agnostic
        self._input_fd = _fileno(input_stream)
        self._pending = bytearray()
        self._reading = False
        self._eof = False
        self._saved_terminal: list | None = None
        self._tail = b""
        self.bytes_out = 0
        self.bytes_in = 0
        self.output_errors = 0

    def attach(self, serial: object, loop: EventLoop) -> None:
        """Start moving stdin bytes into `serial` on `loop`."""
        self.serial = serial
        self._loop = loop
        if self._input_fd is None:
            return
        try:
            loop.add_reader(self._input_fd, self._read_input)
        except PermissionError:
            # epoll rejects regular files and /dev/null: such an input has nothing to wait
            # for, so the guest gets no console input.
            log.info("console input is not pollable (a file or /dev/null); not reading it")
            self._input_fd = None
            return
        if os.isatty(self._input_fd):
            self._saved_terminal = termios.tcgetattr(self._input_fd)
            tty.setraw(self._input_fd)
        os.set_blocking(self._input_fd, False)
        self._reading = True
        loop.add_periodic(INPUT_RETRY_INTERVAL_S, self._feed_serial)

    def write_output(self, data: bytes) -> None:
        """Copy guest output to the host; called by the UART on a vCPU thread."""
        self.bytes_out += len(data)
        try:
            self.output_stream.write(data)
            self.output_stream.flush()
        except (OSError, ValueError):
            # A closed or broken stdout must not stop the guest.
            self.output_errors += 1
        if self.on_output is not None:
            self._tail = (self._tail + data)[-OUTPUT_TAIL_BYTES:]
            self.on_output(data, self._tail)

    def metrics(self) -> dict[str, int | float]:
        return {
            "write_count": self.bytes_out,
            "read_count": self.bytes_in,
            "missed_write_count": self.output_errors,
        }

    def close(self) -> None:
        if self._input_fd is not None and self._reading:
            self._loop.remove_reader(self._input_fd)
            self._reading = False
        if self._saved_terminal is not None and self._input_fd is not None:
            termios.tcsetattr(self._input_fd, termios.TCSADRAIN, self._saved_terminal)
            self._saved_terminal = None

    def _read_input(self) -> None:
        try:
            data = os.read(self._input_fd, 4096)
        except BlockingIOError:
            return
        except OSError as error:
            log.warning("stopped reading console input: %s", error)
            data = b""
        if not data:
            self._loop.remove_reader(self._input_fd)
            self._reading = False
            self._eof = True
            return
        self._pending += data
        if len(self._pending) >= INPUT_BUFFER_LIMIT and self._reading:
            self._loop.remove_reader(self._input_fd)
            self._reading = False
        self._feed_serial()

    def _feed_serial(self) -> None:
        if not self._pending or self.serial is None:
            return
        space = self.serial.input_space()
        if space <= 0:
            return
        accepted = self.serial.enqueue_input(bytes(self._pending[:space]))
        self.bytes_in += accepted
        del self._pending[:accepted]
        if (
            not self._reading
            and not self._eof
            and self._input_fd is not None
            and len(self._pending) < 4096
        ):
            try:
                self._loop.add_reader(self._input_fd, self._read_input)
                self._reading = True
            except (OSError, FileExistsError):
                pass


def _fileno(stream: BinaryIO | None) -> int | None:
    if stream is None:
        return None
    try:
        return stream.fileno()
    except (OSError, ValueError, AttributeError):
        return None
