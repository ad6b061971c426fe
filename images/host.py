"""Host side of the image builds: required tools, Debian package versions, subprocesses.

Every external command of the builders runs through `run` or `run_streamed`, so a failure
raises `ImageError` with the command, its exit status and the tail of its output. Progress
goes to stderr, prefixed with `[images]`, and stdout stays free for the CLI's JSON line.
"""

import collections
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final

# Host tools the builders call, each with the Debian package that provides it.
TOOL_PACKAGES: Final[dict[str, str]] = {
    "tar": "tar",
    "xz": "xz-utils",
    "make": "make",
    "gcc": "gcc",
    "ld": "binutils",
    "flex": "flex",
    "bison": "bison",
    "bc": "bc",
    "gzip": "gzip",
    "cpio": "cpio",
    "openssl": "openssl",
    "busybox": "busybox-static",
    "dropbear": "dropbear-bin",
    "dropbearkey": "dropbear-bin",
    "dropbearconvert": "dropbear-bin",
    "ldd": "libc-bin",
    "mkfs.ext4": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "dpkg-query": "dpkg",
}

# Lines of a failed command's output that its error message repeats.
ERROR_TAIL_LINES: Final = 40
# `run_streamed` prints one progress line per this many output lines.
PROGRESS_EVERY_LINES: Final = 250


class ImageError(Exception):
    """A guest image could not be built: a missing host tool, a failed step or a bad input.

    The message names what failed and, for a missing tool, the apt package to install.
    """


def progress(message: str) -> None:
    """Print one progress line on stderr."""
    print(f"[images] {message}", file=sys.stderr, flush=True)


def find_tool(tool: str) -> str:
    """Return the absolute path of `tool`, looking in PATH and the sbin directories."""
    search_path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    found = shutil.which(tool) or shutil.which(tool, path=search_path)
    if found is None:
        package = TOOL_PACKAGES.get(tool, "the package that provides it")
        raise ImageError(
            f"host tool {tool!r} not found; install it with `apt-get install {package}`"
        )
    return found


def require_tools(tools: Iterable[str]) -> None:
    """Raise ImageError naming every missing tool of `tools` and its apt package."""
    missing: list[str] = []
    for tool in tools:
        try:
            find_tool(tool)
        except ImageError:
            missing.append(tool)
    if missing:
        packages = sorted({TOOL_PACKAGES.get(tool, tool) for tool in missing})
        raise ImageError(
            f"host tools not found: {', '.join(missing)}; "
            f"install them with `apt-get install {' '.join(packages)}`"
        )


def package_versions(packages: Iterable[str]) -> dict[str, str]:
    """Return {package: installed version} from dpkg-query.

    Raise ImageError naming the packages that are not installed.
    """
    names = sorted(set(packages))
    result = subprocess.run(
        [find_tool("dpkg-query"), "-W", "-f", "${Package} ${Version} ${db:Status-Status}\n"]
        + names,
        capture_output=True,
        text=True,
        check=False,
    )
    versions: dict[str, str] = {}
    for line in result.stdout.splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[2] == "installed":
            versions[fields[0].split(":")[0]] = fields[1]
    missing = [name for name in names if name not in versions]
    if missing:
        raise ImageError(
            f"Debian packages not installed: {', '.join(missing)}; "
            f"install them with `apt-get install {' '.join(missing)}`"
        )
    return versions


def package_owning(path: Path) -> str:
    """Return the Debian package that installed `path` (`dpkg-query -S`)."""
    candidates = [path, path.resolve()]
    for candidate in candidates:
        result = subprocess.run(
            [find_tool("dpkg-query"), "-S", str(candidate)],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode == 0:
            # "libc6:amd64: /lib/x86_64-linux-gnu/libc.so.6": the package comes first.
            return result.stdout.split(":")[0].split(",")[0].strip()
    raise ImageError(f"no Debian package owns {path}; the image takes files from packages only")


def run(command: Sequence[str], cwd: Path | None = None) -> str:
    """Run `command` to completion and return its stdout. Raise ImageError if it fails."""
    result = subprocess.run(
        list(command), cwd=cwd, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        output = (result.stdout + result.stderr).splitlines()
        raise _command_error(command, result.returncode, output)
    return result.stdout


def run_streamed(command: Sequence[str], cwd: Path | None = None) -> None:
    """Run a long command, printing a condensed view of its output on stderr.

    Warnings and errors are printed as they come; other lines only as one progress line per
    PROGRESS_EVERY_LINES lines. Raise ImageError with the output's tail if the command fails.
    """
    started = time.monotonic()
    tail: collections.deque[str] = collections.deque(maxlen=ERROR_TAIL_LINES)
    with subprocess.Popen(
        list(command),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    ) as process:
        assert process.stdout is not None
        for count, line in enumerate(process.stdout, start=1):
            line = line.rstrip("\n")
            tail.append(line)
            if "warning:" in line or "error:" in line or "Error " in line:
                progress(f"  {line}")
            elif count % PROGRESS_EVERY_LINES == 0:
                elapsed = time.monotonic() - started
                progress(f"  {count} lines, {elapsed:.0f} s: {line.strip()}")
        status = process.wait()
    if status != 0:
        raise _command_error(command, status, list(tail))


def _command_error(command: Sequence[str], status: int, output: list[str]) -> ImageError:
    tail = "\n".join(output[-ERROR_TAIL_LINES:])
    return ImageError(f"command failed with exit status {status}: {shlex.join(command)}\n{tail}")
