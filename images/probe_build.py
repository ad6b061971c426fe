"""Build the probe guest: a freestanding 64-bit test kernel from the C and assembly in
images/probe, compiled with the system gcc and linked at physical 16 MiB.

The monitor boots the result like an ELF vmlinux. It stays in supervisor mode, so it runs
on hosts whose KVM cannot run guest user space. The flags keep the compiler to general
registers and baseline x86-64 instructions, which a software instruction emulator implements.
The output is cached by a hash of the sources, the flags and the toolchain versions
(images.cache), and `build_probe()` returns the path of `probe.elf`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from images import cache, host

SOURCE_DIRECTORY: Final = Path(__file__).parent / "probe"
LINKER_SCRIPT: Final = SOURCE_DIRECTORY / "probe.ld"
OUTPUT_NAME: Final = "probe.elf"
# Physical load address of the image, the same as a Linux vmlinux (probe.ld sets it).
LOAD_ADDRESS: Final = 0x100_0000
PROBE_PACKAGES: Final = ("gcc", "binutils")
PROBE_TOOLS: Final = ("gcc", "ld")
COMPILE_FLAGS: Final = (
    "-std=gnu11",
    "-ffreestanding",
    "-nostdlib",
    "-static",
    "-fno-pie",
    "-no-pie",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-march=x86-64",
    "-mtune=generic",
    "-O2",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fcf-protection=none",
    "-Wall",
    "-Wextra",
    "-Werror",
)
LINK_FLAGS: Final = ("-nostdlib", "-static", "-no-pie", "-Wl,--build-id=none")


def probe_sources() -> list[Path]:
    """Return the C, assembly, header and linker-script files the probe is built from."""
    patterns = ("*.c", "*.S", "*.h", "*.ld")
    return sorted(path for pattern in patterns for path in SOURCE_DIRECTORY.glob(pattern))


def probe_key(sources: list[Path] | None = None) -> str:
    """Return the cache key of the probe: its sources, this builder, flags and toolchain."""
    files = list(probe_sources() if sources is None else sources) + [Path(__file__)]
    versions = host.package_versions(PROBE_PACKAGES)
    settings = {f"package {name}": version for name, version in versions.items()}
    settings["compile flags"] = " ".join(COMPILE_FLAGS)
    settings["link flags"] = " ".join(LINK_FLAGS)
    return cache.input_key(files, settings)


def build_probe() -> Path:
    """Return the cached probe ELF, building it first if it is missing.

    Raise ImageError when gcc or ld is missing or the build fails (with the compiler's
    output).
    """
    host.require_tools(PROBE_TOOLS)
    output = cache.cached_build("probe", probe_key(), _build_into)
    return output / OUTPUT_NAME


def _build_into(output: Path) -> None:
    gcc = host.find_tool("gcc")
    objects: list[str] = []
    for source in probe_sources():
        if source.suffix not in (".c", ".S"):
            continue
        target = output / f"{source.stem}{source.suffix.replace('.', '_')}.o"
        host.run([gcc, *COMPILE_FLAGS, "-c", str(source), "-o", str(target)])
        objects.append(str(target))
    elf = output / OUTPUT_NAME
    host.run([gcc, *COMPILE_FLAGS, *LINK_FLAGS, "-T", str(LINKER_SCRIPT), *objects,
              "-o", str(elf)])
    for path in objects:
        Path(path).unlink()
    host.progress(f"probe built: {elf} ({elf.stat().st_size} bytes)")
