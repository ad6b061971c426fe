"""A small encoder for ACPI Machine Language (AML), enough for a microVM's DSDT.

Every function returns the encoded bytes of one term. Sources: ACPI 6.3,
section 20.2 "AML Grammar Definition" for names, data objects, package lengths
and named objects, and section 6.4 "Resource Data Types for ACPI" for the
resource descriptors that make up a ResourceTemplate buffer.
"""

from __future__ import annotations

import string
import struct
from collections.abc import Sequence
from typing import Final

# 20.2.3 Data Objects Encoding.
ZERO_OP: Final = 0x00
ONE_OP: Final = 0x01
BYTE_PREFIX: Final = 0x0A
WORD_PREFIX: Final = 0x0B
DWORD_PREFIX: Final = 0x0C
STRING_PREFIX: Final = 0x0D
QWORD_PREFIX: Final = 0x0E
# 20.2.5 Term Objects Encoding.
NAME_OP: Final = 0x08
SCOPE_OP: Final = 0x10
BUFFER_OP: Final = 0x11
PACKAGE_OP: Final = 0x12
METHOD_OP: Final = 0x14
RETURN_OP: Final = 0xA4
EXT_OP_PREFIX: Final = 0x5B
DEVICE_OP: Final = 0x82  # after EXT_OP_PREFIX
# 20.2.2 Name Objects Encoding.
DUAL_NAME_PREFIX: Final = 0x2E
MULTI_NAME_PREFIX: Final = 0x2F
NAME_SEG_SIZE: Final = 4

# 20.2.4 Package Length Encoding: the lead byte alone is used only for lengths
# below 63. With 1-3 follow bytes the lead byte keeps 4 bits, so the limits are
# 2^12, 2^20 and 2^28.
_PKG_LENGTH_ONE_BYTE_LIMIT: Final = 63
_PKG_LENGTH_MAX: Final = (1 << 28) - 1

# 6.4.2 Small Resource Data Type: tag byte = item name << 3 | length.
_IRQ_NO_FLAGS_TAG: Final = 0x04 << 3 | 2
_IO_PORT_TAG: Final = 0x08 << 3 | 7
_END_TAG: Final = 0x0F << 3 | 1
_IO_DECODE_16: Final = 1 << 0
# 6.4.3 Large Resource Data Type: tag byte = 0x80 | item name, then a u16 length.
_MEMORY32_FIXED_TAG: Final = 0x80 | 0x06
_EXTENDED_INTERRUPT_TAG: Final = 0x80 | 0x09
_MEMORY_READ_WRITE: Final = 1 << 0
_MAX_ISA_IRQ: Final = 15

# 6.4.3.6 Extended Interrupt Descriptor, interrupt vector flags.
INTERRUPT_CONSUMER: Final = 1 << 0
INTERRUPT_EDGE: Final = 1 << 1
INTERRUPT_ACTIVE_LOW: Final = 1 << 2
INTERRUPT_SHARED: Final = 1 << 3

_NAME_LEAD_CHARS: Final = frozenset(string.ascii_uppercase + "_")
_NAME_CHARS: Final = _NAME_LEAD_CHARS | frozenset(string.digits)
_U64_MAX: Final = (1 << 64) - 1


class AmlError(ValueError):
    """A value that has no AML encoding (bad name, integer too large, ...).

    Raised while building tables from monitor-chosen values, so it marks a bug
    or an impossible configuration; the caller fails the VM start.
    """


# names ---------------------------------------------------------------------------


def name_seg(segment: str) -> bytes:
    """Encode one NameSeg, padding names shorter than 4 characters with '_'."""
    if not 1 <= len(segment) <= NAME_SEG_SIZE:
        raise AmlError(f"AML NameSeg {segment!r} must have 1 to 4 characters")
    if segment[0] not in _NAME_LEAD_CHARS or not set(segment) <= _NAME_CHARS:
        raise AmlError(
            f"AML NameSeg {segment!r} must be A-Z or '_' followed by A-Z, 0-9 or '_'"
        )
    return segment.ljust(NAME_SEG_SIZE, "_").encode("ascii")


def name_string(path: str) -> bytes:
    """Encode a NameString such as "_HID", "\\_SB_.COM1" or "^PCI0"."""
    # A name starts with one root prefix or any number of parent prefixes.
    if path.startswith("\\"):
        prefix, path = b"\\", path[1:]
    else:
        stripped = path.lstrip("^")
        prefix, path = b"^" * (len(path) - len(stripped)), stripped
    segments = [name_seg(part) for part in path.split(".")] if path else []
    if not segments:
        return prefix + bytes([ZERO_OP])  # NullName
    if len(segments) == 1:
        return prefix + segments[0]
    if len(segments) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + b"".join(segments)
    if len(segments) > 0xFF:
        raise AmlError(f"AML name has {len(segments)} segments; at most 255 fit")
    return prefix + bytes([MULTI_NAME_PREFIX, len(segments)]) + b"".join(segments)


# data objects --------------------------------------------------------------------


def integer(value: int) -> bytes:
    """Encode an integer with the shortest form: ZeroOp, OneOp, or a sized prefix."""
    if not 0 <= value <= _U64_MAX:
        raise AmlError(f"AML integer {value} is outside 0..2^64-1")
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    if value <= 0xFF:
        return bytes([BYTE_PREFIX, value])
    if value <= 0xFFFF:
        return bytes([WORD_PREFIX]) + struct.pack("<H", value)
    if value <= 0xFFFF_FFFF:
        return bytes([DWORD_PREFIX]) + struct.pack("<I", value)
    return bytes([QWORD_PREFIX]) + struct.pack("<Q", value)


def string_literal(text: str) -> bytes:
    """Encode a String: ASCII characters 0x01-0x7F followed by a NUL."""
    if not text.isascii() or "\x00" in text:
        raise AmlError(f"AML string {text!r} must be ASCII without NUL")
    encoded = text.encode("ascii")
    return bytes([STRING_PREFIX]) + encoded + b"\x00"


def eisa_id(text: str) -> bytes:
    """Encode a compressed EISA ID such as "PNP0501" as a DWORD integer.

    The three letters take 5 bits each (letter - 0x40) and the four hex digits
    follow. The 32-bit result is stored big-endian in the DWORD bytes, as the ASL
    EisaId() macro does.
    """
    if (len(text) != 7 or not all(c in string.ascii_uppercase for c in text[:3])
            or not all(c in string.hexdigits for c in text[3:])):
        raise AmlError(f"EISA ID {text!r} must be three letters A-Z and four hex digits")
    letters = [ord(c) - 0x40 for c in text[:3]]
    value = letters[0] << 26 | letters[1] << 21 | letters[2] << 16 | int(text[3:], 16)
    return bytes([DWORD_PREFIX]) + struct.pack(">I", value)


def pkg_length(body_length: int) -> bytes:
    """Encode the PkgLength for `body_length` bytes that follow it; it counts itself."""
    if body_length + 1 < _PKG_LENGTH_ONE_BYTE_LIMIT:
        return bytes([body_length + 1])
    for follow_bytes in (1, 2, 3):
        total = body_length + 1 + follow_bytes
        if total < 1 << (4 + 8 * follow_bytes):
            lead = follow_bytes << 6 | (total & 0x0F)
            return bytes([lead]) + (total >> 4).to_bytes(follow_bytes, "little")
    raise AmlError(f"AML package of {body_length} bytes passes the PkgLength limit "
                   f"{_PKG_LENGTH_MAX}")


def buffer(data: bytes) -> bytes:
    """Encode a Buffer whose size is the length of `data`."""
    body = integer(len(data)) + data
    return bytes([BUFFER_OP]) + pkg_length(len(body)) + body


def package(elements: Sequence[bytes]) -> bytes:
    """Encode a Package of already-encoded elements (at most 255)."""
    if len(elements) > 0xFF:
        raise AmlError(f"AML Package has {len(elements)} elements; at most 255 fit")
    body = bytes([len(elements)]) + b"".join(elements)
    return bytes([PACKAGE_OP]) + pkg_length(len(body)) + body


# named objects and statements ----------------------------------------------------


def name(path: str, value: bytes) -> bytes:
    """Encode Name(path, value) for an already-encoded data object."""
    return bytes([NAME_OP]) + name_string(path) + value


def scope(path: str, terms: Sequence[bytes]) -> bytes:
    body = name_string(path) + b"".join(terms)
    return bytes([SCOPE_OP]) + pkg_length(len(body)) + body


def device(path: str, terms: Sequence[bytes]) -> bytes:
    body = name_string(path) + b"".join(terms)
    return bytes([EXT_OP_PREFIX, DEVICE_OP]) + pkg_length(len(body)) + body


def method(path: str, arg_count: int, terms: Sequence[bytes], serialized: bool = False) -> bytes:
    """Encode a Method; MethodFlags holds ArgCount in bits 0-2 and SerializeFlag in bit 3."""
    if not 0 <= arg_count <= 7:
        raise AmlError(f"AML method {path!r} has {arg_count} arguments; 0..7 allowed")
    flags = arg_count | (1 << 3 if serialized else 0)
    body = name_string(path) + bytes([flags]) + b"".join(terms)
    return bytes([METHOD_OP]) + pkg_length(len(body)) + body


def return_value(value: bytes) -> bytes:
    """Encode Return(value) for an already-encoded term."""
    return bytes([RETURN_OP]) + value


# resource descriptors (section 6.4) ----------------------------------------------


def io_port(minimum: int, maximum: int, alignment: int, length: int) -> bytes:
    """Encode IO(Decode16, minimum, maximum, alignment, length) (6.4.2.5)."""
    for label, value in (("minimum", minimum), ("maximum", maximum)):
        if not 0 <= value <= 0xFFFF:
            raise AmlError(f"IO descriptor {label} {value:#x} is outside 0..0xffff")
    if not 0 <= alignment <= 0xFF or not 0 <= length <= 0xFF:
        raise AmlError(
            f"IO descriptor alignment {alignment} and length {length} must fit a byte"
        )
    return struct.pack("<BBHHBB", _IO_PORT_TAG, _IO_DECODE_16, minimum, maximum,
                       alignment, length)


def irq_no_flags(irqs: Sequence[int]) -> bytes:
    """Encode IRQNoFlags() {irqs}: edge-triggered, active-high ISA IRQs (6.4.2.1)."""
    mask = 0
    for irq in irqs:
        if not 0 <= irq <= _MAX_ISA_IRQ:
            raise AmlError(f"IRQ descriptor IRQ {irq} is outside ISA IRQs 0..15")
        mask |= 1 << irq
    return struct.pack("<BH", _IRQ_NO_FLAGS_TAG, mask)


def memory32_fixed(base: int, length: int, writable: bool = True) -> bytes:
    """Encode Memory32Fixed(ReadWrite or ReadOnly, base, length) (6.4.3.4)."""
    if not 0 <= base <= 0xFFFF_FFFF or not 0 <= length <= 0xFFFF_FFFF:
        raise AmlError(f"Memory32Fixed base {base:#x} length {length:#x} must fit 32 bits")
    info = _MEMORY_READ_WRITE if writable else 0
    return struct.pack("<BHBII", _MEMORY32_FIXED_TAG, 9, info, base, length)


def extended_interrupt(interrupts: Sequence[int], flags: int) -> bytes:
    """Encode Interrupt(...) {interrupts} with INTERRUPT_* `flags` (6.4.3.6)."""
    if not 1 <= len(interrupts) <= 0xFF:
        raise AmlError(f"Interrupt descriptor needs 1..255 interrupts, got {len(interrupts)}")
    if any(not 0 <= gsi <= 0xFFFF_FFFF for gsi in interrupts):
        raise AmlError(f"Interrupt descriptor numbers {list(interrupts)} must fit 32 bits")
    body = struct.pack("<BB", flags, len(interrupts))
    body += b"".join(struct.pack("<I", gsi) for gsi in interrupts)
    return struct.pack("<BH", _EXTENDED_INTERRUPT_TAG, len(body)) + body


def resource_template(descriptors: Sequence[bytes]) -> bytes:
    """Encode a ResourceTemplate: a Buffer of `descriptors` and an End Tag.

    The End Tag checksum (6.4.2.9) makes all bytes of the template sum to zero.
    """
    data = b"".join(descriptors) + bytes([_END_TAG])
    checksum = (-sum(data)) & 0xFF
    return buffer(data + bytes([checksum]))
