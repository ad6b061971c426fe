"""Guest images for the monitor's tests, built from Debian packages only.

- a kernel from `linux-source-6.1` with the microVM config in `images/kernel/microvm.config`
  (ELF `vmlinux` and `bzImage`), see `images.kernel_build`;
- an ext4 root filesystem of busybox-static and dropbear, with a getty on ttyS0 (root/root)
  and an SSH server that accepts a client key made at build time, see `images.rootfs_build`.
- the probe guest, a freestanding 64-bit test kernel with a serial shell and polled virtio
  drivers, built from `images/probe` with the system gcc, see `images.probe_build`.

Outputs are cached in `${VMM_IMAGES_CACHE:-~/.cache/vmm-images}`, one directory per hash of
the inputs, and rebuilt only when an input changes. The first kernel build takes minutes.

Command line (progress on stderr; the last stdout line of `paths` is one JSON object):

    python -m images paths        # build what is missing, print the paths as JSON
    python -m images kernel       # build or look up the kernel only
    python -m images rootfs       # build or look up the root filesystem only
    python -m images probe        # build or look up the probe guest only (seconds)
    python -m images qemu-check   # boot both under QEMU TCG, log in, reboot

From Python, `images.build_paths()` returns the dictionary of `paths` without "probe",
and `images.build_probe()` returns the probe's path.
"""

from images.host import ImageError
from images.kernel_build import build_kernel
from images.probe_build import build_probe
from images.rootfs_build import build_rootfs

__all__ = ["ImageError", "build_paths", "build_probe"]


def build_paths() -> dict[str, str]:
    """Build whatever is missing and return the paths of the guest images.

    Keys: "kernel" (ELF vmlinux), "bzimage", "rootfs" (ext4 image) and "ssh_key" (the
    client's private key, OpenSSH format, accepted for root). Raise ImageError if a build
    fails or a host tool is missing.
    """
    kernel = build_kernel()
    rootfs = build_rootfs()
    return {
        "kernel": str(kernel.vmlinux),
        "bzimage": str(kernel.bzimage),
        "rootfs": str(rootfs.rootfs),
        "ssh_key": str(rootfs.ssh_key),
    }
