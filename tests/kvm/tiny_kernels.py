"""Tiny 64-bit "kernels" that the monitor boots like a vmlinux, for end-to-end KVM tests.

Each is an ELF64 executable with one PT_LOAD segment at 1 GiB-aligned physical
address 16 MiB (where a Linux vmlinux loads), entered in long mode with the
monitor's identity page tables, exactly as a Linux kernel is.
"""

from __future__ import annotations

import struct
from pathlib import Path

LOAD_ADDRESS = 0x100_0000
_ELF_HEADER_SIZE = 64
_PROGRAM_HEADER_SIZE = 56
_CODE_OFFSET = 0x1000
_ET_EXEC = 2
_EM_X86_64 = 62
_PT_LOAD = 1
_PF_RWX = 7


def write_elf(path: Path, code: bytes, entry: int = LOAD_ADDRESS) -> Path:
    """Write `code` as a loadable ELF64 x86-64 image at LOAD_ADDRESS."""
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header = ident + struct.pack(
        "<HHIQQQIHHHHHH",
        _ET_EXEC, _EM_X86_64, 1, entry, _ELF_HEADER_SIZE, 0, 0,
        _ELF_HEADER_SIZE, _PROGRAM_HEADER_SIZE, 1, 64, 0, 0,
    )
    program_header = struct.pack(
        "<IIQQQQQQ",
        _PT_LOAD, _PF_RWX, _CODE_OFFSET, LOAD_ADDRESS, LOAD_ADDRESS,
        len(code), len(code) + 0x1000, 0x1000,
    )
    image = (header + program_header).ljust(_CODE_OFFSET, b"\0") + code
    path.write_bytes(image)
    return path


def serial_message_then_reset(message: bytes) -> bytes:
    """Code that writes `message` to COM1, then pulses the i8042 reset line."""
    body = (
        b"\x66\xba\xf8\x03"                                  # mov dx, 0x3f8
        + b"\x48\x8d\x35" + b"\0\0\0\0"                      # lea rsi, [rip + message]
        + b"\x48\xc7\xc1" + struct.pack("<I", len(message))  # mov rcx, len
        + b"\xac\xee\xe2\xfc"                                # 1: lodsb; out dx, al; loop 1b
        + b"\xb0\xfe\xe6\x64"                                # mov al, 0xfe; out 0x64, al
        + b"\xf4\xeb\xfd"                                    # hlt; jmp hlt
    )
    lea_end = 4 + 7
    displacement = len(body) - lea_end
    body = body[:7] + struct.pack("<i", displacement) + body[11:]
    return body + message
