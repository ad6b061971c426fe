"""The host side of a virtio-net device: a tap interface opened through /dev/net/tun.

Linux's TUN/TAP driver (Documentation/networking/tuntap.rst, linux/if_tun.h):
opening /dev/net/tun and calling TUNSETIFF with IFF_TAP attaches the file to
the named tap interface (creating it when it does not exist and the caller has
CAP_NET_ADMIN). Every read returns one Ethernet frame and every write sends
one. With IFF_VNET_HDR each frame is preceded by a virtio_net_hdr. After
TUNSETVNETHDRSZ 12 that header is the 12-byte virtio-net header of virtio 1.2
section 5.1.6, the layout the guest uses, so frames pass between the guest's
buffers and the tap without conversion. (The kernel fills the first 10
bytes on read and leaves num_buffers alone; it skips num_buffers on write.)
TUNSETOFFLOAD tells the kernel which offloads the reader handles: partial
checksums (TUN_F_CSUM) and the segmentation kinds (TUN_F_TSO4, ...). Without
them the kernel completes checksums and segments before a read returns.

The file is non-blocking: a read with no frame waiting raises BlockingIOError,
and so does a write when the interface's queue is full.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
from typing import Final, Sequence

from vmm.errors import StartError

TUN_DEVICE_PATH: Final = "/dev/net/tun"
# linux/if.h: interface names are at most IFNAMSIZ - 1 bytes plus a NUL.
IFNAMSIZ: Final = 16

# linux/if_tun.h: TUNSETIFF flags.
IFF_TAP: Final = 0x0002
IFF_NO_PI: Final = 0x1000
IFF_VNET_HDR: Final = 0x4000

# linux/if_tun.h: TUNSETOFFLOAD flags.
TUN_F_CSUM: Final = 0x01
TUN_F_TSO4: Final = 0x02
TUN_F_TSO6: Final = 0x04
TUN_F_TSO_ECN: Final = 0x08
TUN_F_UFO: Final = 0x10

# virtio 1.2 section 5.1.6: struct virtio_net_hdr with num_buffers is 12 bytes.
VNET_HEADER_SIZE: Final = 12

# include/uapi/asm-generic/ioctl.h: direction, size, type and number fields.
_IOC_WRITE: Final = 1
_IOC_READ: Final = 2
_IOC_NRSHIFT: Final = 0
_IOC_TYPESHIFT: Final = 8
_IOC_SIZESHIFT: Final = 16
_IOC_DIRSHIFT: Final = 30
_TUN_IOCTL_TYPE: Final = ord("T")


def _ioc(direction: int, number: int, size: int) -> int:
    return (
        (direction << _IOC_DIRSHIFT)
        | (_TUN_IOCTL_TYPE << _IOC_TYPESHIFT)
        | (number << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


# linux/if_tun.h request numbers, from the _IOW/_IOR encoding.
TUNSETIFF: Final = _ioc(_IOC_WRITE, 202, ctypes.sizeof(ctypes.c_int))
TUNSETOFFLOAD: Final = _ioc(_IOC_WRITE, 208, ctypes.sizeof(ctypes.c_uint))
TUNGETIFF: Final = _ioc(_IOC_READ, 210, ctypes.sizeof(ctypes.c_uint))
TUNSETVNETHDRSZ: Final = _ioc(_IOC_WRITE, 216, ctypes.sizeof(ctypes.c_int))


class ifreq(ctypes.Structure):
    """struct ifreq of linux/if.h, with only ifr_flags of its 24-byte union named."""

    _fields_ = [
        ("ifr_name", ctypes.c_char * IFNAMSIZ),
        ("ifr_flags", ctypes.c_short),
        ("ifr_pad", ctypes.c_ubyte * 22),
    ]


class TapError(StartError):
    """A tap interface could not be opened or configured; the message names it and the errno."""


def _describe(error: OSError) -> str:
    name = errno.errorcode.get(error.errno or 0, str(error.errno))
    return f"{name} ({error.strerror})"


class Tap:
    """One open, non-blocking tap interface with 12-byte virtio-net headers.

    `name` is the host interface name (the API's host_dev_name). The caller
    closes the tap with `close`.
    """

    def __init__(self, name: str) -> None:
        encoded = name.encode()
        if not encoded or len(encoded) >= IFNAMSIZ or b"\0" in encoded:
            raise TapError(
                f"tap device name {name!r} is invalid: it must be 1 to {IFNAMSIZ - 1} bytes "
                "without NUL"
            )
        self.name = name
        try:
            self.fd = os.open(TUN_DEVICE_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as error:
            raise TapError(
                f"cannot open tap device {name!r}: opening {TUN_DEVICE_PATH} failed: "
                f"{_describe(error)}"
            ) from error
        try:
            self._attach(encoded)
            self._ioctl_pointer("TUNSETVNETHDRSZ", TUNSETVNETHDRSZ, ctypes.c_int(VNET_HEADER_SIZE))
        except TapError:
            os.close(self.fd)
            raise

    def __repr__(self) -> str:
        return f"Tap({self.name!r}, fd={self.fd})"

    def _attach(self, encoded_name: bytes) -> None:
        request = ifreq(ifr_name=encoded_name, ifr_flags=IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        self._ioctl_pointer("TUNSETIFF", TUNSETIFF, request)

    def _ioctl_pointer(self, name: str, request: int, argument: ctypes.Structure | ctypes.c_int
                       ) -> None:
        buffer = bytearray(bytes(argument))
        try:
            fcntl.ioctl(self.fd, request, buffer)
        except OSError as error:
            raise TapError(f"tap device {self.name!r}: {name} failed: {_describe(error)}"
                           ) from error

    def fileno(self) -> int:
        return self.fd

    def set_offload(self, flags: int) -> None:
        """Tell the kernel which offloads (TUN_F_* bits) the reader handles."""
        try:
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)
        except OSError as error:
            raise TapError(
                f"tap device {self.name!r}: TUNSETOFFLOAD {flags:#x} failed: {_describe(error)}"
            ) from error

    def read_frame(self, buffer: memoryview) -> int:
        """Read one header and frame into `buffer`; return its length.

        Raises BlockingIOError when no frame waits, OSError on other failures.
        A frame longer than `buffer` is truncated by the kernel.
        """
        return os.readv(self.fd, [buffer])

    def write_frame(self, parts: Sequence[bytes | memoryview]) -> int:
        """Send one header and frame gathered from `parts`; return the bytes written.

        Raises BlockingIOError when the interface's queue is full.
        """
        return os.writev(self.fd, parts)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
