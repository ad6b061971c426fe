"""Text of the configuration files in the guest root filesystem, and SHA-512 crypt.

Pure functions: the rootfs builder writes what they return. The guest runs busybox init.
Its sysinit script mounts /proc, /sys, /dev, /dev/pts, /run and /tmp, writes the boot timer,
brings up `lo` and starts dropbear. Then a getty on ttyS0 offers `login` (root/root).
"""

import hashlib
from typing import Final

from vmm.arch.x86_64.layout import BOOT_TIMER_ADDRESS

HOSTNAME: Final = "microvm"
ROOT_PASSWORD: Final = "root"
SERIAL_CONSOLE: Final = "ttyS0"
SERIAL_BAUD: Final = 115200
# The value the guest writes to the boot-timer device: the monitor logs the boot time
# when the guest writes this byte. Written with `devmem ADDRESS WIDTH VALUE` (width in bits).
BOOT_TIMER_MAGIC: Final = 123
BOOT_TIMER_WIDTH_BITS: Final = 8
DROPBEAR_HOST_KEY: Final = "/etc/dropbear/dropbear_ed25519_host_key"
SYSINIT_SCRIPT: Final = "/etc/init.d/rcS"

# SHA-crypt ("Unix crypt using SHA-256 and SHA-512", U. Drepper, 2008): default rounds,
# maximum salt length, and the alphabet of its base-64 encoding.
SHA_CRYPT_ROUNDS: Final = 5000
SHA_CRYPT_SALT_MAX: Final = 16
CRYPT_BASE64: Final = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_SHA512_SIZE: Final = 64


def sha512_crypt(password: str, salt: str) -> str:
    """Return the `$6$salt$hash` crypt string of `password`, as /etc/shadow stores it.

    Implements the SHA-512 variant of SHA-crypt with the default 5000 rounds. The salt is
    cut to 16 characters and must not contain `$`, `:` or a newline.
    """
    if any(character in salt for character in "$:\n"):
        raise ValueError(f"crypt salt {salt!r} contains '$', ':' or a newline")
    salt_bytes = salt.encode()[:SHA_CRYPT_SALT_MAX]
    digest = _sha512_crypt_digest(password.encode(), salt_bytes)
    return f"$6${salt_bytes.decode()}${_crypt_base64(digest)}"


def _repeat_to(block: bytes, length: int) -> bytes:
    return (block * (length // len(block) + 1))[:length]


def _sha512_crypt_digest(password: bytes, salt: bytes) -> bytes:
    # Steps 1-8: digest B of password, salt, password.
    alternate = hashlib.sha512(password + salt + password).digest()
    # Steps 9-12: digest A of password, salt, B stretched to len(password), then one block
    # per bit of len(password), least significant first: B for a 1 bit, password for a 0.
    first = hashlib.sha512(password + salt + _repeat_to(alternate, len(password)))
    length = len(password)
    while length:
        first.update(alternate if length & 1 else password)
        length >>= 1
    current = first.digest()
    # Steps 13-20: byte sequences P and S derived from repeated password and salt.
    password_digest = hashlib.sha512(password * len(password)).digest()
    password_sequence = _repeat_to(password_digest, len(password))
    salt_digest = hashlib.sha512(salt * (16 + current[0])).digest()
    salt_sequence = _repeat_to(salt_digest, len(salt))
    # Step 21: the rounds.
    for round_number in range(SHA_CRYPT_ROUNDS):
        step = hashlib.sha512(password_sequence if round_number & 1 else current)
        if round_number % 3:
            step.update(salt_sequence)
        if round_number % 7:
            step.update(password_sequence)
        step.update(current if round_number & 1 else password_sequence)
        current = step.digest()
    return current


def _crypt_base64(digest: bytes) -> str:
    # Step 22: bytes are taken in groups of three (i, i+21, i+42), rotated left by i % 3,
    # and each group becomes four characters, least significant six bits first.
    output: list[str] = []
    for index in range(21):
        group = [index, index + 21, index + 42]
        rotation = index % 3
        high, middle, low = group[rotation:] + group[:rotation]
        output.append(_encode_24(digest[high], digest[middle], digest[low], 4))
    output.append(_encode_24(0, 0, digest[_SHA512_SIZE - 1], 2))
    return "".join(output)


def _encode_24(high: int, middle: int, low: int, characters: int) -> str:
    word = (high << 16) | (middle << 8) | low
    encoded: list[str] = []
    for _ in range(characters):
        encoded.append(CRYPT_BASE64[word & 0x3F])
        word >>= 6
    return "".join(encoded)


def inittab() -> str:
    """Return /etc/inittab for busybox init (fields: id:runlevels:action:process)."""
    return (
        f"::sysinit:{SYSINIT_SCRIPT}\n"
        f"{SERIAL_CONSOLE}::respawn:/sbin/getty -L {SERIAL_BAUD} {SERIAL_CONSOLE} vt100\n"
        "::ctrlaltdel:/sbin/reboot\n"
        "::shutdown:/bin/umount -a -r\n"
    )


def sysinit_script() -> str:
    """Return the sysinit shell script: mounts, boot timer, hostname, lo, dropbear.

    The root file system stays as the kernel mounted it, which is read-only unless the
    command line contains `rw`. Files written at run time go to tmpfs on /run and /tmp.
    """
    return f"""#!/bin/sh
# Guest start-up, run once by busybox init before the getty.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
grep -q '^devtmpfs /dev ' /proc/mounts || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts
mount -t devpts -o gid=5,mode=620 devpts /dev/pts
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp

# Tell the monitor that user space is up: it logs the boot time on this write.
devmem {BOOT_TIMER_ADDRESS:#x} {BOOT_TIMER_WIDTH_BITS} {BOOT_TIMER_MAGIC}

hostname -F /etc/hostname
ip link set lo up
dropbear -r {DROPBEAR_HOST_KEY} -P /run/dropbear.pid
"""


def passwd() -> str:
    """Return /etc/passwd: root with /bin/sh."""
    return "root:x:0:0:root:/root:/bin/sh\n"


def shadow(root_password_hash: str) -> str:
    """Return /etc/shadow with root's crypt hash and no password expiry."""
    # Fields: name:hash:last change (days since 1970):min:max:warn:inactive:expire:reserved.
    return f"root:{root_password_hash}:19000:0:99999:7:::\n"


def group() -> str:
    """Return /etc/group with root and tty (the group that owns /dev/pts devices)."""
    return "root:x:0:\ntty:x:5:\n"


def shells() -> str:
    """Return /etc/shells: dropbear accepts a login only for a shell listed here."""
    return "/bin/sh\n/bin/ash\n"


def profile() -> str:
    """Return /etc/profile for login shells: PATH and a `microvm:~# ` style prompt."""
    return (
        "export PATH=/usr/sbin:/usr/bin:/sbin:/bin\n"
        "export PS1='\\h:\\w\\$ '\n"
    )


def hosts() -> str:
    """Return /etc/hosts with localhost and the guest's hostname."""
    return f"127.0.0.1\tlocalhost\n127.0.1.1\t{HOSTNAME}\n"
