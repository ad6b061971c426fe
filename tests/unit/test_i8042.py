"""i8042 controller and AT keyboard: the commands Linux's i8042 and atkbd drivers send."""

from __future__ import annotations

import pytest

from vmm.devices.legacy import i8042
from vmm.devices.legacy.i8042 import I8042


class Controller:
    """An I8042 with counting interrupt and reset lines."""

    def __init__(self) -> None:
        self.irq_count = 0
        self.resets = 0
        self.device = I8042(self.raise_irq, self.reset)

    def raise_irq(self) -> None:
        self.irq_count += 1

    def reset(self) -> None:
        self.resets += 1

    def command(self, value: int) -> None:
        self.device.write(i8042.COMMAND_OFFSET, bytes([value]))

    def send(self, value: int) -> None:
        self.device.write(i8042.DATA_OFFSET, bytes([value]))

    def status(self) -> int:
        data = bytearray(1)
        self.device.read(i8042.COMMAND_OFFSET, data)
        return data[0]

    def receive_all(self) -> list[int]:
        values = []
        while self.status() & i8042.STATUS_OUTPUT_FULL:
            data = bytearray(1)
            self.device.read(i8042.DATA_OFFSET, data)
            values.append(data[0])
        return values


@pytest.fixture
def ctl() -> Controller:
    return Controller()


def test_port_layout_matches_layout_module() -> None:
    assert i8042.COMMAND_OFFSET == 4
    assert i8042.PORT_COUNT == 5


def test_self_test_replies_0x55(ctl: Controller) -> None:
    ctl.command(i8042.CMD_SELF_TEST)
    assert ctl.receive_all() == [i8042.SELF_TEST_PASSED]
    assert ctl.status() & i8042.STATUS_SYSTEM_FLAG


def test_interface_test_replies_0(ctl: Controller) -> None:
    ctl.command(i8042.CMD_KEYBOARD_TEST)
    assert ctl.receive_all() == [0x00]


def test_config_byte_round_trip(ctl: Controller) -> None:
    ctl.command(i8042.CMD_READ_CONFIG)
    assert ctl.receive_all() == [i8042.CONFIG_DEFAULT]
    ctl.command(i8042.CMD_WRITE_CONFIG)
    assert ctl.status() & i8042.STATUS_LAST_WAS_COMMAND
    ctl.send(0x44)
    assert not ctl.status() & i8042.STATUS_LAST_WAS_COMMAND
    ctl.command(i8042.CMD_READ_CONFIG)
    assert ctl.receive_all() == [0x44]


def test_controller_replies_raise_no_interrupt(ctl: Controller) -> None:
    ctl.command(i8042.CMD_READ_CONFIG)
    ctl.command(i8042.CMD_SELF_TEST)
    assert ctl.irq_count == 0


def test_disable_enable_keyboard(ctl: Controller) -> None:
    ctl.command(i8042.CMD_DISABLE_KEYBOARD)
    assert ctl.device.config & i8042.CONFIG_KEYBOARD_DISABLED
    ctl.command(i8042.CMD_ENABLE_KEYBOARD)
    assert not ctl.device.config & i8042.CONFIG_KEYBOARD_DISABLED


def test_output_port_read_and_write(ctl: Controller) -> None:
    ctl.command(i8042.CMD_READ_OUTPUT_PORT)
    assert ctl.receive_all() == [i8042.OUTPUT_PORT_DEFAULT]
    ctl.command(i8042.CMD_WRITE_OUTPUT_PORT)
    ctl.send(0x01)
    ctl.command(i8042.CMD_READ_OUTPUT_PORT)
    assert ctl.receive_all() == [0x01]


def test_pulse_reset_line_calls_reset(ctl: Controller) -> None:
    ctl.command(0xFE)
    assert ctl.resets == 1
    assert ctl.device.reset_count == 1


def test_pulse_other_lines_does_not_reset(ctl: Controller) -> None:
    ctl.command(0xFF)
    ctl.command(0xFD)
    assert ctl.resets == 0


def test_keyboard_reset_replies_ack_and_bat(ctl: Controller) -> None:
    ctl.send(i8042.KBD_RESET)
    assert ctl.irq_count == 1
    assert ctl.receive_all() == [i8042.KBD_ACK, i8042.KBD_SELF_TEST_PASSED]
    assert ctl.irq_count == 2


def test_keyboard_id_translated(ctl: Controller) -> None:
    ctl.send(i8042.KBD_GET_ID)
    assert ctl.receive_all() == [i8042.KBD_ACK, 0xAB, 0x41]


def test_keyboard_id_untranslated(ctl: Controller) -> None:
    ctl.command(i8042.CMD_WRITE_CONFIG)
    ctl.send(i8042.CONFIG_DEFAULT & ~i8042.CONFIG_TRANSLATE)
    ctl.send(i8042.KBD_GET_ID)
    assert ctl.receive_all() == [i8042.KBD_ACK, 0xAB, 0x83]


def test_set_leds_acks_command_and_argument(ctl: Controller) -> None:
    ctl.send(i8042.KBD_SET_LEDS)
    assert ctl.receive_all() == [i8042.KBD_ACK]
    ctl.send(0x07)
    assert ctl.receive_all() == [i8042.KBD_ACK]


def test_scan_code_set_query(ctl: Controller) -> None:
    ctl.send(i8042.KBD_SCAN_CODE_SET)
    ctl.send(0)
    assert ctl.receive_all() == [i8042.KBD_ACK, i8042.KBD_ACK, i8042.KBD_SCAN_CODE_SET_2]


@pytest.mark.parametrize(
    "command", [i8042.KBD_ENABLE, i8042.KBD_RESET_DISABLE, i8042.KBD_RESET_ENABLE, 0xF8]
)
def test_mode_commands_acknowledged(ctl: Controller, command: int) -> None:
    ctl.send(command)
    assert ctl.receive_all() == [i8042.KBD_ACK]


def test_echo_and_unknown_command(ctl: Controller) -> None:
    ctl.send(i8042.KBD_ECHO)
    assert ctl.receive_all() == [i8042.KBD_ECHO]
    ctl.send(0x12)
    assert ctl.receive_all() == [i8042.KBD_RESEND]


def test_ctrl_alt_del_in_set_1(ctl: Controller) -> None:
    ctl.device.trigger_ctrl_alt_del()
    assert ctl.irq_count == 1
    codes = ctl.receive_all()
    assert codes == [0x1D, 0x38, 0xE0, 0x53, 0xE0, 0xD3, 0xB8, 0x9D]
    assert ctl.irq_count == len(codes)


def test_ctrl_alt_del_in_set_2(ctl: Controller) -> None:
    ctl.command(i8042.CMD_WRITE_CONFIG)
    ctl.send(i8042.CONFIG_KEYBOARD_INTERRUPT)
    ctl.device.trigger_ctrl_alt_del()
    assert ctl.receive_all() == list(i8042.CTRL_ALT_DEL_SET2)


def test_no_interrupt_when_disabled_in_config(ctl: Controller) -> None:
    ctl.command(i8042.CMD_WRITE_CONFIG)
    ctl.send(i8042.CONFIG_TRANSLATE)
    ctl.device.trigger_ctrl_alt_del()
    assert ctl.irq_count == 0
    assert len(ctl.receive_all()) == len(i8042.CTRL_ALT_DEL_SET1)


def test_output_buffer_is_bounded(ctl: Controller) -> None:
    for _ in range(3):
        ctl.device.trigger_ctrl_alt_del()
    assert len(ctl.receive_all()) == i8042.OUTPUT_BUFFER_LIMIT
    assert ctl.device.dropped_output_bytes == 3 * len(i8042.CTRL_ALT_DEL_SET1) - 16


def test_write_keyboard_output(ctl: Controller) -> None:
    ctl.command(i8042.CMD_WRITE_KEYBOARD_OUTPUT)
    ctl.send(0x2A)
    assert ctl.irq_count == 1
    assert ctl.receive_all() == [0x2A]


def test_empty_data_port_reads_zero(ctl: Controller) -> None:
    data = bytearray(b"\xff")
    ctl.device.read(i8042.DATA_OFFSET, data)
    assert data == bytearray(1)
