"""Build the guest kernel from Debian's linux-source-6.1 with the project's microVM config.

Steps: unpack /usr/src/linux-source-6.1.tar.xz into a work directory, `make tinyconfig`,
merge images/kernel/microvm.config, `make olddefconfig`, check that every fragment setting
took effect, then `make -j$(nproc) vmlinux bzImage`. The output directory keeps `vmlinux`
(ELF), `bzImage` and the final `config`; the work directory (about 1.5 GiB) is deleted.
"""

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from images import cache, host, kconfig

SOURCE_PACKAGE: Final = "linux-source-6.1"
SOURCE_TARBALL: Final = Path("/usr/src/linux-source-6.1.tar.xz")
FRAGMENT_PATH: Final = Path(__file__).parent / "kernel" / "microvm.config"
# Packages whose versions change the kernel: the sources and the toolchain.
KERNEL_PACKAGES: Final = (
    SOURCE_PACKAGE,
    "gcc",
    "binutils",
    "make",
    "flex",
    "bison",
    "bc",
    "libelf-dev",
    "libssl-dev",
)
KERNEL_TOOLS: Final = ("tar", "xz", "make", "gcc", "ld", "flex", "bison", "bc", "gzip")
ARCH: Final = "x86_64"
BZIMAGE_IN_TREE: Final = Path("arch/x86/boot/bzImage")


@dataclass(frozen=True)
class KernelImages:
    """Paths of one finished kernel build."""

    vmlinux: Path
    bzimage: Path
    config: Path


def kernel_inputs() -> tuple[list[Path], dict[str, str]]:
    """Return the files and the package versions the kernel build depends on.

    The files are those that decide what is built; the helpers that run commands and
    manage the cache (images.host, images.cache) do not change the output and are left
    out, so that editing them does not cost a kernel rebuild.
    """
    host.require_tools(KERNEL_TOOLS)
    files = [FRAGMENT_PATH, Path(kconfig.__file__), Path(__file__)]
    versions = host.package_versions(KERNEL_PACKAGES)
    return files, {f"package {name}": version for name, version in versions.items()}


def build_kernel() -> KernelImages:
    """Return the cached kernel for the current inputs, building it first if it is missing."""
    files, settings = kernel_inputs()
    output = cache.cached_build("kernel", cache.input_key(files, settings), _build_into)
    return KernelImages(output / "vmlinux", output / "bzImage", output / "config")


def _build_into(output: Path) -> None:
    if not SOURCE_TARBALL.is_file():
        raise host.ImageError(
            f"kernel sources {SOURCE_TARBALL} not found; "
            f"install them with `apt-get install {SOURCE_PACKAGE}`"
        )
    fragment = kconfig.parse_config(FRAGMENT_PATH.read_text())
    # The source tree goes inside the partial output, not in /tmp, which may be a small
    # tmpfs. A build killed half-way leaves it there, and the cache removes it later.
    with tempfile.TemporaryDirectory(prefix="work-", dir=output) as work:
        tree = Path(work)
        host.progress(f"kernel: unpacking {SOURCE_TARBALL}")
        host.run(["tar", "-xf", str(SOURCE_TARBALL), "-C", str(tree), "--strip-components=1"])
        _configure(tree, fragment)
        jobs = os.cpu_count() or 1
        host.progress(f"kernel: make -j{jobs} vmlinux bzImage (minutes)")
        host.run_streamed(_make(tree, f"-j{jobs}", "vmlinux", "bzImage"), cwd=tree)
        shutil.copy2(tree / "vmlinux", output / "vmlinux")
        shutil.copy2(tree / BZIMAGE_IN_TREE, output / "bzImage")
        shutil.copy2(tree / ".config", output / "config")


def _configure(tree: Path, fragment: kconfig.Settings) -> None:
    host.progress(f"kernel: make tinyconfig, then merge {FRAGMENT_PATH.name}")
    host.run(_make(tree, "tinyconfig"), cwd=tree)
    config_path = tree / ".config"
    config_path.write_text(kconfig.merge_config(config_path.read_text(), fragment))
    host.run(_make(tree, "olddefconfig"), cwd=tree)

    unmet = kconfig.unmet_settings(fragment, config_path.read_text())
    if unmet:
        raise host.ImageError(
            f"{len(unmet)} settings of {FRAGMENT_PATH} did not take effect after "
            "`make olddefconfig` (check their dependencies):\n  " + "\n  ".join(unmet)
        )


def _make(tree: Path, *targets: str) -> list[str]:
    return ["make", "-C", str(tree), f"ARCH={ARCH}", *targets]
