"""The i8042 keyboard controller with one AT keyboard, as far as Linux needs them.

The monitor uses it for two things: the guest reboots by pulsing the CPU
reset line (command 0xFE), and the host requests a clean shutdown by sending
Ctrl-Alt-Del. Linux's i8042 driver also tests the controller and atkbd
probes the keyboard at boot, so the model replies to the commands they send.
There is no auxiliary (mouse) port; boot the guest with `i8042.noaux`.

The device sits at port 0x60 with length 5: offset 0 is the data port (0x60)
and offset 4 the status/command port (0x64). Sources: the IBM PC AT Technical
Reference (8042 commands, status bits, keyboard commands) and Linux's
drivers/input/serio/i8042.h, which names the same values.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Callable, Final

from vmm.arch.x86_64 import layout

DATA_OFFSET: Final = 0
COMMAND_OFFSET: Final = layout.I8042_COMMAND_PORT - layout.I8042_DATA_PORT
PORT_COUNT: Final = COMMAND_OFFSET + 1

# Status register bits (read at 0x64).
STATUS_OUTPUT_FULL: Final = 0x01
STATUS_INPUT_FULL: Final = 0x02
STATUS_SYSTEM_FLAG: Final = 0x04
STATUS_LAST_WAS_COMMAND: Final = 0x08
STATUS_KEYBOARD_UNLOCKED: Final = 0x10

# Controller configuration byte ("command byte") bits.
CONFIG_KEYBOARD_INTERRUPT: Final = 0x01
CONFIG_AUX_INTERRUPT: Final = 0x02
CONFIG_SYSTEM_FLAG: Final = 0x04
CONFIG_KEYBOARD_DISABLED: Final = 0x10
CONFIG_AUX_DISABLED: Final = 0x20
CONFIG_TRANSLATE: Final = 0x40
CONFIG_DEFAULT: Final = (
    CONFIG_KEYBOARD_INTERRUPT | CONFIG_SYSTEM_FLAG | CONFIG_AUX_DISABLED | CONFIG_TRANSLATE
)

# Controller commands (written to 0x64).
CMD_READ_CONFIG: Final = 0x20
CMD_WRITE_CONFIG: Final = 0x60
CMD_DISABLE_AUX: Final = 0xA7
CMD_ENABLE_AUX: Final = 0xA8
CMD_SELF_TEST: Final = 0xAA
CMD_KEYBOARD_TEST: Final = 0xAB
CMD_DISABLE_KEYBOARD: Final = 0xAD
CMD_ENABLE_KEYBOARD: Final = 0xAE
CMD_READ_OUTPUT_PORT: Final = 0xD0
CMD_WRITE_OUTPUT_PORT: Final = 0xD1
CMD_WRITE_KEYBOARD_OUTPUT: Final = 0xD2
# 0xF0-0xFF pulse output-port lines whose bit in the low nibble is 0;
# line 0 is the CPU reset, so 0xFE resets the machine.
CMD_PULSE_OUTPUT_FIRST: Final = 0xF0
PULSE_RESET_LINE: Final = 0x01

SELF_TEST_PASSED: Final = 0x55
INTERFACE_TEST_PASSED: Final = 0x00
# Output port: bit 0 is the CPU reset line (1 = running), bit 1 the A20 gate.
OUTPUT_PORT_DEFAULT: Final = 0x03

# Keyboard commands (written to 0x60) and replies.
KBD_SET_LEDS: Final = 0xED
KBD_ECHO: Final = 0xEE
KBD_SCAN_CODE_SET: Final = 0xF0
KBD_GET_ID: Final = 0xF2
KBD_SET_TYPEMATIC: Final = 0xF3
KBD_ENABLE: Final = 0xF4
KBD_RESET_DISABLE: Final = 0xF5
KBD_RESET_ENABLE: Final = 0xF6
KBD_RESEND: Final = 0xFE
KBD_RESET: Final = 0xFF
KBD_ACK: Final = 0xFA
KBD_SELF_TEST_PASSED: Final = 0xAA
# An MF2 keyboard replies to GET_ID with AB 83; a translating controller turns 83 into 41.
KBD_ID: Final = (0xAB, 0x83)
KBD_ID_TRANSLATED: Final = (0xAB, 0x41)
KBD_SCAN_CODE_SET_2: Final = 0x02
# Commands that take one argument byte; the keyboard acknowledges each byte.
_COMMANDS_WITH_ARGUMENT: Final = (KBD_SET_LEDS, KBD_SCAN_CODE_SET, KBD_SET_TYPEMATIC)
# Other commands in 0xF7-0xFD set key modes in scan code set 3; they are acknowledged.
_ACKNOWLEDGED_COMMANDS: Final = (KBD_ENABLE, KBD_RESET_DISABLE, KBD_RESET_ENABLE, KBD_RESEND,
                                 0xF7, 0xF8, 0xF9, 0xFA, 0xFB, 0xFC, 0xFD)

# Ctrl, Alt, Delete make codes, then break codes in reverse order.
CTRL_ALT_DEL_SET1: Final = bytes((0x1D, 0x38, 0xE0, 0x53, 0xE0, 0xD3, 0xB8, 0x9D))
CTRL_ALT_DEL_SET2: Final = bytes(
    (0x14, 0x11, 0xE0, 0x71, 0xE0, 0xF0, 0x71, 0xF0, 0x11, 0xF0, 0x14)
)

# The output buffer is bounded so that a guest cannot make it grow.
OUTPUT_BUFFER_LIMIT: Final = 16


class I8042:
    """The controller's two ports as a BusDevice of PORT_COUNT bytes.

    `interrupt` raises IRQ 1; it is called when a keyboard byte becomes
    readable and the configuration byte enables keyboard interrupts.
    Controller command replies are polled by Linux and raise no interrupt.
    `reset` is called when the guest pulses the CPU reset line.
    """

    def __init__(self, interrupt: Callable[[], None], reset: Callable[[], None]) -> None:
        self._interrupt = interrupt
        self._reset = reset
        self._lock = threading.Lock()
        self.config = CONFIG_DEFAULT
        self.output_port = OUTPUT_PORT_DEFAULT
        self.status_flags = 0
        self._output: deque[tuple[int, bool]] = deque()
        self._pending_controller_command: int | None = None
        self._pending_keyboard_command: int | None = None
        self.dropped_output_bytes = 0
        self.reset_count = 0

    # Host side -------------------------------------------------------------------

    def trigger_ctrl_alt_del(self) -> None:
        """Queue Ctrl-Alt-Del make and break codes in the guest's scan code set."""
        with self._lock:
            codes = CTRL_ALT_DEL_SET1 if self.config & CONFIG_TRANSLATE else CTRL_ALT_DEL_SET2
            raise_irq = self._queue_keyboard_bytes(codes)
        if raise_irq:
            self._interrupt()

    # Bus access ------------------------------------------------------------------

    def read(self, offset: int, data: bytearray) -> None:
        """Fill `data` from the data port (offset 0) or the status port (offset 4)."""
        if not data:
            return
        raise_irq = False
        with self._lock:
            if offset == DATA_OFFSET:
                value, raise_irq = self._read_data()
            elif offset == COMMAND_OFFSET:
                value = self._read_status()
            else:
                value = 0
        data[:] = bytes([value]) + bytes(len(data) - 1)
        if raise_irq:
            self._interrupt()

    def write(self, offset: int, data: bytes) -> None:
        """Take a controller command (offset 4) or a data byte (offset 0)."""
        if not data:
            return
        do_reset = raise_irq = False
        with self._lock:
            if offset == DATA_OFFSET:
                self.status_flags &= ~STATUS_LAST_WAS_COMMAND
                raise_irq = self._write_data(data[0])
            elif offset == COMMAND_OFFSET:
                self.status_flags |= STATUS_LAST_WAS_COMMAND
                do_reset = self._write_command(data[0])
        if raise_irq:
            self._interrupt()
        if do_reset:
            self.reset_count += 1
            self._reset()

    # Output buffer ---------------------------------------------------------------

    def _read_status(self) -> int:
        value = self.status_flags | STATUS_KEYBOARD_UNLOCKED
        if self.config & CONFIG_SYSTEM_FLAG:
            value |= STATUS_SYSTEM_FLAG
        if self._output:
            value |= STATUS_OUTPUT_FULL
        return value

    def _read_data(self) -> tuple[int, bool]:
        """Pop the output byte; return it and whether the next one needs an interrupt."""
        if not self._output:
            return 0, False
        value, _ = self._output.popleft()
        return value, self._head_wants_interrupt()

    def _head_wants_interrupt(self) -> bool:
        if not self._output or not self.config & CONFIG_KEYBOARD_INTERRUPT:
            return False
        return self._output[0][1]

    def _queue(self, values: bytes, from_keyboard: bool) -> bool:
        """Append bytes; return True when the first of them is now readable and interrupts."""
        was_empty = not self._output
        for value in values:
            if len(self._output) >= OUTPUT_BUFFER_LIMIT:
                self.dropped_output_bytes += 1
                continue
            self._output.append((value, from_keyboard))
        return was_empty and self._head_wants_interrupt()

    def _queue_controller_reply(self, value: int) -> None:
        self._queue(bytes([value]), from_keyboard=False)

    def _queue_keyboard_bytes(self, values: bytes) -> bool:
        return self._queue(values, from_keyboard=True)

    # Controller commands ---------------------------------------------------------

    def _write_command(self, command: int) -> bool:
        """Run a controller command; return True when it pulses the CPU reset line."""
        self._pending_controller_command = None
        if command == CMD_READ_CONFIG:
            self._queue_controller_reply(self.config)
        elif command in (CMD_WRITE_CONFIG, CMD_WRITE_OUTPUT_PORT, CMD_WRITE_KEYBOARD_OUTPUT):
            self._pending_controller_command = command
        elif command == CMD_DISABLE_AUX:
            self.config |= CONFIG_AUX_DISABLED
        elif command == CMD_ENABLE_AUX:
            self.config &= ~CONFIG_AUX_DISABLED
        elif command == CMD_SELF_TEST:
            self.config |= CONFIG_SYSTEM_FLAG
            self._queue_controller_reply(SELF_TEST_PASSED)
        elif command == CMD_KEYBOARD_TEST:
            self._queue_controller_reply(INTERFACE_TEST_PASSED)
        elif command == CMD_DISABLE_KEYBOARD:
            self.config |= CONFIG_KEYBOARD_DISABLED
        elif command == CMD_ENABLE_KEYBOARD:
            self.config &= ~CONFIG_KEYBOARD_DISABLED
        elif command == CMD_READ_OUTPUT_PORT:
            self._queue_controller_reply(self.output_port)
        elif command >= CMD_PULSE_OUTPUT_FIRST:
            return not command & PULSE_RESET_LINE
        return False

    def _write_data(self, value: int) -> bool:
        """Route a data-port byte to a pending controller command or to the keyboard."""
        command = self._pending_controller_command
        if command is None:
            return self._keyboard_write(value)
        self._pending_controller_command = None
        if command == CMD_WRITE_CONFIG:
            self.config = value
        elif command == CMD_WRITE_OUTPUT_PORT:
            self.output_port = value
        elif command == CMD_WRITE_KEYBOARD_OUTPUT:
            return self._queue_keyboard_bytes(bytes([value]))
        return False

    # Keyboard --------------------------------------------------------------------

    def _keyboard_write(self, value: int) -> bool:
        """Reply to a keyboard command as an MF2 keyboard does; return whether to interrupt."""
        pending = self._pending_keyboard_command
        if pending is not None:
            self._pending_keyboard_command = None
            return self._keyboard_argument(pending, value)
        return self._queue_keyboard_bytes(self._keyboard_reply(value))

    def _keyboard_argument(self, command: int, argument: int) -> bool:
        reply = [KBD_ACK]
        if command == KBD_SCAN_CODE_SET and argument == 0:
            reply.append(KBD_SCAN_CODE_SET_2)
        return self._queue_keyboard_bytes(bytes(reply))

    def _keyboard_reply(self, command: int) -> bytes:
        if command in _COMMANDS_WITH_ARGUMENT:
            self._pending_keyboard_command = command
            return bytes([KBD_ACK])
        if command == KBD_RESET:
            return bytes([KBD_ACK, KBD_SELF_TEST_PASSED])
        if command == KBD_GET_ID:
            ident = KBD_ID_TRANSLATED if self.config & CONFIG_TRANSLATE else KBD_ID
            return bytes((KBD_ACK, *ident))
        if command == KBD_ECHO:
            return bytes([KBD_ECHO])
        if command in _ACKNOWLEDGED_COMMANDS:
            return bytes([KBD_ACK])
        return bytes([KBD_RESEND])
