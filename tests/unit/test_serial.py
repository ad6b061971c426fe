"""16550A UART: registers, DLAB, FIFO, loopback and interrupt edges."""

from __future__ import annotations

import pytest

from vmm.devices.legacy import serial
from vmm.devices.legacy.serial import Serial


class Uart:
    """A Serial device with a recording output and a counting interrupt line."""

    def __init__(self) -> None:
        self.output = bytearray()
        self.irq_count = 0
        self.device = Serial(self.raise_irq, self.output.extend)

    def raise_irq(self) -> None:
        self.irq_count += 1

    def read(self, offset: int) -> int:
        data = bytearray(1)
        self.device.read(offset, data)
        return data[0]

    def write(self, offset: int, value: int) -> None:
        self.device.write(offset, bytes([value]))


@pytest.fixture
def uart() -> Uart:
    return Uart()


def test_transmit_goes_to_output(uart: Uart) -> None:
    for byte in b"hi\n":
        uart.write(serial.DATA_OFFSET, byte)
    assert uart.output == bytearray(b"hi\n")
    assert uart.device.bytes_out == 3
    assert uart.irq_count == 0


def test_line_status_after_reset(uart: Uart) -> None:
    lsr = uart.read(serial.LSR_OFFSET)
    assert lsr & serial.LSR_THR_EMPTY
    assert lsr & serial.LSR_TRANSMITTER_EMPTY
    assert not lsr & serial.LSR_DATA_READY
    assert uart.read(serial.IIR_FCR_OFFSET) == serial.IIR_NO_INTERRUPT


def test_input_is_read_in_order(uart: Uart) -> None:
    assert uart.device.enqueue_input(b"ab") == 2
    assert uart.read(serial.LSR_OFFSET) & serial.LSR_DATA_READY
    assert uart.read(serial.DATA_OFFSET) == ord("a")
    assert uart.read(serial.DATA_OFFSET) == ord("b")
    assert not uart.read(serial.LSR_OFFSET) & serial.LSR_DATA_READY
    assert uart.device.bytes_in == 2


def test_input_fifo_limit_counts_missed(uart: Uart) -> None:
    assert uart.device.input_space() == serial.INPUT_FIFO_SIZE
    accepted = uart.device.enqueue_input(bytes(serial.INPUT_FIFO_SIZE + 10))
    assert accepted == serial.INPUT_FIFO_SIZE
    assert uart.device.input_space() == 0
    assert uart.device.missed_input_bytes == 10
    assert uart.device.enqueue_input(b"x") == 0


def test_received_data_interrupt(uart: Uart) -> None:
    uart.device.enqueue_input(b"a")
    assert uart.irq_count == 0
    uart.write(serial.IER_OFFSET, serial.IER_RDA)
    # Enabling the interrupt with data waiting raises it.
    assert uart.irq_count == 1
    assert uart.read(serial.IIR_FCR_OFFSET) & 0x0F == serial.IIR_RDA
    uart.device.enqueue_input(b"b")
    assert uart.irq_count == 2
    uart.read(serial.DATA_OFFSET)
    uart.read(serial.DATA_OFFSET)
    assert uart.read(serial.IIR_FCR_OFFSET) == serial.IIR_NO_INTERRUPT


def test_thr_empty_interrupt_reasserts(uart: Uart) -> None:
    # The Linux 8250 driver checks this sequence at start-up (UART_BUG_THRE).
    uart.write(serial.IER_OFFSET, serial.IER_THRE)
    assert uart.irq_count == 1
    assert uart.read(serial.IIR_FCR_OFFSET) == serial.IIR_THRE
    assert uart.read(serial.IIR_FCR_OFFSET) == serial.IIR_NO_INTERRUPT
    uart.write(serial.IER_OFFSET, 0)
    uart.write(serial.IER_OFFSET, serial.IER_THRE)
    assert uart.read(serial.IIR_FCR_OFFSET) == serial.IIR_THRE
    uart.write(serial.DATA_OFFSET, ord("x"))
    assert uart.irq_count == 3


def test_divisor_latch(uart: Uart) -> None:
    uart.write(serial.LCR_OFFSET, serial.LCR_DLAB | serial.LCR_DEFAULT)
    uart.write(serial.DATA_OFFSET, 0x01)
    uart.write(serial.IER_OFFSET, 0x02)
    assert uart.read(serial.DATA_OFFSET) == 0x01
    assert uart.read(serial.IER_OFFSET) == 0x02
    assert uart.device.divisor == 0x0201
    uart.write(serial.LCR_OFFSET, serial.LCR_DEFAULT)
    assert uart.read(serial.IER_OFFSET) == 0
    assert uart.output == bytearray()


def test_scratch_register(uart: Uart) -> None:
    uart.write(serial.SCR_OFFSET, 0xA5)
    assert uart.read(serial.SCR_OFFSET) == 0xA5


def test_fifo_enable_shows_in_iir(uart: Uart) -> None:
    uart.write(serial.IIR_FCR_OFFSET, serial.FCR_FIFO_ENABLE)
    assert uart.read(serial.IIR_FCR_OFFSET) >> 6 == 3


def test_fifo_clear_drops_input(uart: Uart) -> None:
    uart.device.enqueue_input(b"abc")
    uart.write(serial.IIR_FCR_OFFSET, serial.FCR_FIFO_ENABLE | serial.FCR_CLEAR_RX)
    assert not uart.read(serial.LSR_OFFSET) & serial.LSR_DATA_READY


def test_loopback_returns_transmitted_byte(uart: Uart) -> None:
    uart.write(serial.MCR_OFFSET, serial.MCR_LOOP)
    uart.write(serial.DATA_OFFSET, 0x42)
    assert uart.output == bytearray()
    assert uart.read(serial.DATA_OFFSET) == 0x42


def test_loopback_modem_lines(uart: Uart) -> None:
    # Linux's 8250 probe sets LOOP | OUT2 | RTS and expects CTS | DCD in MSR.
    uart.write(serial.MCR_OFFSET, serial.MCR_LOOP | serial.MCR_OUT2 | serial.MCR_RTS)
    assert uart.read(serial.MSR_OFFSET) & 0xF0 == serial.MSR_DCD | serial.MSR_CTS
    uart.write(serial.MCR_OFFSET, serial.MCR_LOOP | serial.MCR_DTR | serial.MCR_OUT1)
    assert uart.read(serial.MSR_OFFSET) & 0xF0 == serial.MSR_DSR | serial.MSR_RI


def test_modem_lines_without_loopback(uart: Uart) -> None:
    assert uart.read(serial.MSR_OFFSET) == serial.MSR_DEFAULT


def test_loopback_overrun_sets_lsr(uart: Uart) -> None:
    uart.device.enqueue_input(bytes(serial.INPUT_FIFO_SIZE))
    uart.write(serial.MCR_OFFSET, serial.MCR_LOOP)
    uart.write(serial.DATA_OFFSET, 1)
    assert uart.read(serial.LSR_OFFSET) & serial.LSR_OVERRUN
    assert not uart.read(serial.LSR_OFFSET) & serial.LSR_OVERRUN
    assert uart.device.missed_input_bytes == 1


def test_output_failure_counted(uart: Uart) -> None:
    def broken(data: bytes) -> None:
        raise BrokenPipeError("console closed")

    device = Serial(lambda: None, broken)
    device.write(serial.DATA_OFFSET, b"x")
    assert device.missed_output_bytes == 1
    assert device.bytes_out == 0
