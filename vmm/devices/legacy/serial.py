"""A 16550A-compatible UART, as far as the Linux 8250 driver and a console need it.

Register map per the National Semiconductor PC16550D datasheet, table II
(offsets from the base port, DLAB = LCR bit 7):

    0  RBR (read) / THR (write); DLL when DLAB is set
    1  IER; DLM when DLAB is set
    2  IIR (read) / FCR (write)
    3  LCR      4  MCR      5  LSR      6  MSR      7  SCR

Transmission is instantaneous: a THR write hands the byte to `output` at once,
so THR and the transmitter are always empty. Input sits in a receive FIFO of
INPUT_FIFO_SIZE bytes. Line-status and modem-status interrupts are not
generated because nothing here produces their causes (no line errors, fixed
modem lines).

Interrupts are edges: `interrupt()` is called when an enabled condition
arises (received data, THR empty), as an irqfd delivers them.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Callable, Final

# Register offsets (PC16550D table II).
DATA_OFFSET: Final = 0  # RBR, THR, DLL
IER_OFFSET: Final = 1  # IER, DLM
IIR_FCR_OFFSET: Final = 2
LCR_OFFSET: Final = 3
MCR_OFFSET: Final = 4
LSR_OFFSET: Final = 5
MSR_OFFSET: Final = 6
SCR_OFFSET: Final = 7
REGISTER_COUNT: Final = 8

# IER bits.
IER_RDA: Final = 0x01  # received data available
IER_THRE: Final = 0x02  # transmitter holding register empty
IER_RLS: Final = 0x04  # receiver line status
IER_MS: Final = 0x08  # modem status
IER_MASK: Final = IER_RDA | IER_THRE | IER_RLS | IER_MS

# IIR values: bit 0 clear means an interrupt is pending; bits 1-3 name it.
IIR_NO_INTERRUPT: Final = 0x01
IIR_THRE: Final = 0x02
IIR_RDA: Final = 0x04
IIR_FIFO_ENABLED: Final = 0xC0

# FCR bits.
FCR_FIFO_ENABLE: Final = 0x01
FCR_CLEAR_RX: Final = 0x02
FCR_CLEAR_TX: Final = 0x04

# LCR bits.
LCR_DLAB: Final = 0x80
LCR_DEFAULT: Final = 0x03  # 8 data bits, no parity, 1 stop bit

# MCR bits; in loopback mode they drive the MSR inputs.
MCR_DTR: Final = 0x01
MCR_RTS: Final = 0x02
MCR_OUT1: Final = 0x04
MCR_OUT2: Final = 0x08
MCR_LOOP: Final = 0x10
MCR_MASK: Final = 0x1F

# LSR bits.
LSR_DATA_READY: Final = 0x01
LSR_OVERRUN: Final = 0x02
LSR_THR_EMPTY: Final = 0x20
LSR_TRANSMITTER_EMPTY: Final = 0x40

# MSR bits (the upper four are the modem inputs).
MSR_CTS: Final = 0x10
MSR_DSR: Final = 0x20
MSR_RI: Final = 0x40
MSR_DCD: Final = 0x80
# Outside loopback the lines read as carrier present, data set ready, clear to send.
MSR_DEFAULT: Final = MSR_DCD | MSR_DSR | MSR_CTS

# Divisor for 9600 baud from the 1.8432 MHz reference clock: 1843200 / (16 * 9600).
DEFAULT_DIVISOR: Final = 12
# The 16550A has a 16-byte FIFO; a larger one loses less pasted console input.
INPUT_FIFO_SIZE: Final = 64


class Serial:
    """The UART's registers as a BusDevice of REGISTER_COUNT ports.

    `output` receives each transmitted byte; it runs with the device lock
    held, so it must not call back into this device. Counters for metrics:
    `bytes_in`, `bytes_out`, `missed_input_bytes` (input that did not fit)
    and `missed_output_bytes` (bytes `output` failed to take).
    """

    def __init__(self, interrupt: Callable[[], None], output: Callable[[bytes], None]) -> None:
        self._interrupt = interrupt
        self._output = output
        self._lock = threading.Lock()
        self.bytes_in = 0
        self.bytes_out = 0
        self.missed_input_bytes = 0
        self.missed_output_bytes = 0
        self._reset_registers()

    def _reset_registers(self) -> None:
        self.rx_fifo: deque[int] = deque()
        self.ier = 0
        self.lcr = LCR_DEFAULT
        self.mcr = 0
        self.scr = 0
        self.divisor = DEFAULT_DIVISOR
        self.fifo_enabled = False
        self.overrun = False
        self.thr_empty_pending = False

    # Host side -------------------------------------------------------------------

    def input_space(self) -> int:
        """Return how many bytes `enqueue_input` accepts now."""
        with self._lock:
            return INPUT_FIFO_SIZE - len(self.rx_fifo)

    def enqueue_input(self, data: bytes) -> int:
        """Queue console input for the guest; return how many bytes fit.

        Bytes past the free space are counted in `missed_input_bytes`; a caller
        that wants to keep them passes at most `input_space()` bytes.
        """
        with self._lock:
            accepted = self._receive(data)
            self.missed_input_bytes += len(data) - accepted
            raise_irq = accepted > 0 and self.ier & IER_RDA
        if raise_irq:
            self._interrupt()
        return accepted

    def _receive(self, data: bytes) -> int:
        accepted = min(len(data), INPUT_FIFO_SIZE - len(self.rx_fifo))
        self.rx_fifo.extend(data[:accepted])
        self.bytes_in += accepted
        return accepted

    # Bus access ------------------------------------------------------------------

    def read(self, offset: int, data: bytearray) -> None:
        """Fill `data` (one byte; wider accesses read the register in byte 0)."""
        if not data:
            return
        with self._lock:
            value = self._read_register(offset)
        data[:] = bytes([value]) + bytes(len(data) - 1)

    def write(self, offset: int, data: bytes) -> None:
        """Write byte 0 of `data` to the register at `offset`."""
        if not data:
            return
        with self._lock:
            raise_irq = self._write_register(offset, data[0])
        if raise_irq:
            self._interrupt()

    def _read_register(self, offset: int) -> int:
        dlab = bool(self.lcr & LCR_DLAB)
        if offset == DATA_OFFSET:
            return self.divisor & 0xFF if dlab else self._read_rbr()
        if offset == IER_OFFSET:
            return self.divisor >> 8 if dlab else self.ier
        if offset == IIR_FCR_OFFSET:
            return self._read_iir()
        if offset == LCR_OFFSET:
            return self.lcr
        if offset == MCR_OFFSET:
            return self.mcr
        if offset == LSR_OFFSET:
            return self._read_lsr()
        if offset == MSR_OFFSET:
            return self._read_msr()
        if offset == SCR_OFFSET:
            return self.scr
        return 0

    def _read_rbr(self) -> int:
        return self.rx_fifo.popleft() if self.rx_fifo else 0

    def _pending_iir(self) -> int:
        """Return the highest-priority pending interrupt's IIR id (datasheet table IV)."""
        if self.ier & IER_RDA and self.rx_fifo:
            return IIR_RDA
        if self.ier & IER_THRE and self.thr_empty_pending:
            return IIR_THRE
        return IIR_NO_INTERRUPT

    def _read_iir(self) -> int:
        identity = self._pending_iir()
        if identity == IIR_THRE:
            # Reading IIR while THRE is the source clears it (datasheet table IV).
            self.thr_empty_pending = False
        return identity | (IIR_FIFO_ENABLED if self.fifo_enabled else 0)

    def _read_lsr(self) -> int:
        value = LSR_THR_EMPTY | LSR_TRANSMITTER_EMPTY
        if self.rx_fifo:
            value |= LSR_DATA_READY
        if self.overrun:
            value |= LSR_OVERRUN
            self.overrun = False
        return value

    def _read_msr(self) -> int:
        if not self.mcr & MCR_LOOP:
            return MSR_DEFAULT
        value = 0
        for mcr_bit, msr_bit in (
            (MCR_RTS, MSR_CTS), (MCR_DTR, MSR_DSR), (MCR_OUT1, MSR_RI), (MCR_OUT2, MSR_DCD)
        ):
            if self.mcr & mcr_bit:
                value |= msr_bit
        return value

    def _write_register(self, offset: int, value: int) -> bool:
        """Apply a write; return True when it raised an enabled interrupt condition."""
        dlab = bool(self.lcr & LCR_DLAB)
        if offset == DATA_OFFSET:
            if dlab:
                self.divisor = (self.divisor & 0xFF00) | value
                return False
            return self._write_thr(value)
        if offset == IER_OFFSET:
            if dlab:
                self.divisor = (self.divisor & 0x00FF) | (value << 8)
                return False
            return self._write_ier(value)
        if offset == IIR_FCR_OFFSET:
            self._write_fcr(value)
        elif offset == LCR_OFFSET:
            self.lcr = value
        elif offset == MCR_OFFSET:
            self.mcr = value & MCR_MASK
        elif offset == SCR_OFFSET:
            self.scr = value
        return False

    def _write_thr(self, value: int) -> bool:
        if self.mcr & MCR_LOOP:
            accepted = self._receive(bytes([value]))
            if not accepted:
                self.overrun = True
                self.missed_input_bytes += 1
        else:
            self._transmit(value)
        # The byte left THR at once, so THR is empty again.
        self.thr_empty_pending = True
        loop_data = bool(self.mcr & MCR_LOOP and self.ier & IER_RDA)
        return bool(self.ier & IER_THRE) or loop_data

    def _transmit(self, value: int) -> None:
        try:
            self._output(bytes([value]))
        except OSError:
            self.missed_output_bytes += 1
            return
        self.bytes_out += 1

    def _write_ier(self, value: int) -> bool:
        newly_enabled = value & ~self.ier
        self.ier = value & IER_MASK
        if newly_enabled & IER_THRE:
            # Enabling the THRE interrupt while THR is empty raises it (16550 behaviour
            # the Linux 8250 driver tests for at start-up).
            self.thr_empty_pending = True
            return True
        return bool(newly_enabled & IER_RDA and self.rx_fifo)

    def _write_fcr(self, value: int) -> None:
        self.fifo_enabled = bool(value & FCR_FIFO_ENABLE)
        if value & FCR_CLEAR_RX:
            self.rx_fifo.clear()
