"""Command line of the image builder: `python -m images paths|kernel|rootfs|probe|qemu-check`.

Progress goes to stderr. `paths` prints, as its last stdout line, one JSON object with the
keys "kernel" (ELF vmlinux), "bzimage", "rootfs", "ssh_key" and "probe" (the probe guest's
ELF). Exit status 1 on failure, with the reason (for a missing host tool, the apt package
to install) on stderr.
"""

import argparse
import json
import sys
import time
from pathlib import Path

from images import ImageError, build_paths
from images.kernel_build import build_kernel
from images.probe_build import build_probe
from images.rootfs_build import build_rootfs


def main(argv: list[str] | None = None) -> int:
    """Run one CLI command and return the process exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m images",
        description="Build the guest kernel, root filesystem and probe guest from Debian "
        "packages.",
    )
    parser.add_argument(
        "command",
        choices=["paths", "kernel", "rootfs", "probe", "qemu-check"],
        help="paths: build what is missing and print the paths as JSON; kernel, rootfs, "
        "probe: build one; qemu-check: boot the images under QEMU TCG, log in and reboot",
    )
    arguments = parser.parse_args(argv)
    started = time.monotonic()
    try:
        _run(arguments.command)
    except ImageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"[images] {arguments.command} done in {time.monotonic() - started:.1f} s",
          file=sys.stderr)
    return 0


def _run(command: str) -> None:
    if command == "paths":
        print(json.dumps({**build_paths(), "probe": str(build_probe())}))
    elif command == "kernel":
        kernel = build_kernel()
        print(json.dumps({"kernel": str(kernel.vmlinux), "bzimage": str(kernel.bzimage)}))
    elif command == "rootfs":
        rootfs = build_rootfs()
        print(json.dumps({"rootfs": str(rootfs.rootfs), "ssh_key": str(rootfs.ssh_key)}))
    elif command == "probe":
        print(json.dumps({"probe": str(build_probe())}))
    else:
        _qemu_check()


def _qemu_check() -> None:
    # Imported here: paramiko and pexpect are test extras, not needed to build images.
    from images.qemu_check import Restart, check_boot

    paths = build_paths()
    # Each kernel format boots once. The two boots find their devices in different ways
    # and end with different restart requests.
    for kernel_key, restart, acpi in (("bzimage", Restart.REBOOT_COMMAND, True),
                                      ("kernel", Restart.CTRL_ALT_DEL, False)):
        result = check_boot(Path(paths[kernel_key]), Path(paths["rootfs"]),
                            Path(paths["ssh_key"]), restart, acpi)
        for mark, seconds in result.marks.items():
            print(f"[images] qemu-check {kernel_key}: {mark} at {seconds:.1f} s",
                  file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
