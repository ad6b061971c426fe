"""A hostile guest: pseudo-random writes and reads over every device the monitor emulates.

The guest (assembled here with GNU as) maps the 32-bit MMIO gap, then runs a
xorshift64 generator and, on each step, writes and reads back one of:
- a random register or configuration-space word of the boot timer or one of
  the virtio-mmio windows (block, entropy, balloon, vsock, and pages with no device);
- a random word of unmapped MMIO at 0xd000_0000;
- a random port below 0x400 (serial, i8042, PIC, PIT, CMOS, unassigned) with a byte
  whose top bit is clear, so it never sends the i8042 reset pulse 0xfe.
It then sets COM1 back to 8N1 without loopback (the storm may have set the divisor
latch or loopback bits, as a driver could), prints a marker and waits for 'R' on the serial line before it pulses the
i8042 reset line. The monitor must keep serving its API throughout, keep the serial
console and i8042 working, and exit 0 on that reset.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.microvm import Monitor
from tests.kvm.tiny_kernels import write_elf
from vmm.arch.x86_64 import layout

pytestmark = pytest.mark.kvm

STEPS = 20000
SEED = 0x9E37_79B9_7F4A_7C15
DONE_MARKER = "MALICIOUS-DONE"
# A free page below the command line, used as the page directory for the MMIO gap.
GAP_PAGE_DIRECTORY = 0xC000
UNMAPPED_MMIO = 0xD000_0000
# Page-directory entry bits: present, writable, 2 MiB page, cache disabled.
PDE_FLAGS = 0x93
PDPT_GAP_INDEX = layout.MMIO_GAP_START >> 30
# Per step: one of 8 pages from the boot timer, offset below 0x200 (registers, config).
MMIO_OFFSET_MASK = 0x71FC
UNMAPPED_OFFSET_MASK = 0x1F_FFFC
PORT_MASK = 0x3FF

_SOURCE = f"""
    .code64
    .text
    movabs ${layout.MMIO_GAP_START | PDE_FLAGS}, %rax
    mov %rax, {GAP_PAGE_DIRECTORY}
    movabs ${UNMAPPED_MMIO | PDE_FLAGS}, %rax
    mov %rax, {GAP_PAGE_DIRECTORY + 8 * ((UNMAPPED_MMIO - layout.MMIO_GAP_START) >> 21)}
    mov ${GAP_PAGE_DIRECTORY | 3}, %rax
    mov %rax, {layout.PDPTE_START + 8 * PDPT_GAP_INDEX}
    mov %cr3, %rax
    mov %rax, %cr3
    movabs ${SEED}, %r8
    mov ${STEPS}, %ecx
step:
    mov %r8, %rax
    shl $13, %rax
    xor %rax, %r8
    mov %r8, %rax
    shr $7, %rax
    xor %rax, %r8
    mov %r8, %rax
    shl $17, %rax
    xor %rax, %r8
    mov %r8, %rax
    mov %r8, %rdx
    shr $32, %rdx
    test $2, %al
    jnz not_device
    shr $8, %rax
    and ${MMIO_OFFSET_MASK}, %eax
    mov ${layout.MMIO_GAP_START}, %ebx
    or %rax, %rbx
    mov %edx, (%rbx)
    mov (%rbx), %edx
    jmp next
not_device:
    test $1, %al
    jnz port
    shr $8, %rax
    and ${UNMAPPED_OFFSET_MASK}, %eax
    mov ${UNMAPPED_MMIO}, %ebx
    or %rax, %rbx
    mov %edx, (%rbx)
    mov (%rbx), %edx
    jmp next
port:
    shr $16, %rax
    and ${PORT_MASK}, %eax
    mov %edx, %esi
    mov %eax, %edx
    mov %esi, %eax
    and $0x7f, %al
    out %al, %dx
    in %dx, %al
next:
    dec %ecx
    jnz step
    # Undo what the storm did to COM1: DLAB off, 8N1, no loopback, no interrupts.
    mov $0x03, %al
    mov ${layout.SERIAL_COM1_PORT + 3}, %dx
    out %al, %dx
    mov ${layout.SERIAL_COM1_PORT + 4}, %dx
    out %al, %dx
    xor %al, %al
    mov ${layout.SERIAL_COM1_PORT + 1}, %dx
    out %al, %dx
    lea message(%rip), %rsi
    mov $message_end - message, %ecx
    mov ${layout.SERIAL_COM1_PORT}, %dx
print:
    lodsb
    out %al, %dx
    loop print
wait_input:
    mov ${layout.SERIAL_COM1_PORT + 5}, %dx
    in %dx, %al
    test $1, %al
    jz wait_input
    mov ${layout.SERIAL_COM1_PORT}, %dx
    in %dx, %al
    cmp $'R', %al
    jne wait_input
    mov $0xfe, %al
    out %al, ${layout.I8042_COMMAND_PORT}
halt:
    hlt
    jmp halt
message:
    .ascii "\\r\\n{DONE_MARKER}\\r\\n"
message_end:
"""


def assemble(workdir: Path) -> bytes:
    """Assemble the hostile guest and return its flat code bytes."""
    source = workdir / "malicious.S"
    source.write_text(_SOURCE)
    obj = workdir / "malicious.o"
    flat = workdir / "malicious.bin"
    subprocess.run(["as", "--64", "-o", str(obj), str(source)], check=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(obj), str(flat)], check=True)
    return flat.read_bytes()


def _configure(monitor: Monitor, workdir: Path) -> None:
    disk = workdir / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    requests = [
        ("/machine-config", {"vcpu_count": 1, "mem_size_mib": 64}),
        ("/drives/rootfs", {"drive_id": "rootfs", "path_on_host": str(disk),
                            "is_root_device": True, "is_read_only": False}),
        ("/entropy", {}),
        ("/balloon", {"amount_mib": 0, "deflate_on_oom": False}),
        ("/vsock", {"guest_cid": 3, "uds_path": str(workdir / "v.sock")}),
    ]
    for path, body in requests:
        status, reply = monitor.api.put(path, body)
        assert status == 204, (path, reply)


def _api_alive(monitor: Monitor) -> None:
    status, info = monitor.api.get("/")
    assert status == 200, info
    status, config = monitor.api.get("/vm/config")
    assert status == 200, config
    assert isinstance(config, dict)
    assert len(config["drives"]) == 1
    assert config["vsock"]["guest_cid"] == 3


def test_monitor_survives_random_device_accesses(tmp_path: Path) -> None:
    """The monitor serves GET / and GET /vm/config during and after the storm, the serial
    console still carries the guest's marker and input, and the i8042 reset still ends the
    monitor with status 0; all within 60 s.
    """
    kernel = write_elf(tmp_path / "malicious.elf", assemble(tmp_path))
    monitor = Monitor(tmp_path)
    began = time.monotonic()
    try:
        monitor.wait_for_api()
        _configure(monitor, tmp_path)
        kernel_path = str(kernel)
        status, body = monitor.api.put("/boot-source", {"kernel_image_path": kernel_path})
        assert status == 204, body
        status, body = monitor.api.put("/actions", {"action_type": "InstanceStart"})
        assert status == 204, body
        _api_alive(monitor)
        monitor.expect(DONE_MARKER, 50)
        _api_alive(monitor)
        monitor.process.send("R")
        assert monitor.wait_exit(20) == 0
        log = monitor.read_log()
        assert "the guest reset the machine" in log
        for device in ("Balloon", "Rng", "Vsock", "Block"):
            assert re.search(rf"MmioTransport\({device}\(.*needs reset", log), device
        exits = re.search(r"vcpu exits: IO=(\d+) MMIO=(\d+)", log)
        assert exits is not None
        assert int(exits[1]) + int(exits[2]) >= STEPS
        assert time.monotonic() - began < 60
    finally:
        monitor.terminate()
