"""The image cache: one directory per build output, named by a hash of the build's inputs.

Outputs live in `${VMM_IMAGES_CACHE:-~/.cache/vmm-images}/<name>-<key>`, where the key
hashes the builder's source files, its configuration and the versions of the Debian packages
it takes files from. A build runs in a temporary directory beside the output and is renamed
into place only when it has finished, so a directory under its final name is always complete.
A lock file per output keeps two processes from building the same output at once, and
shows whether a temporary directory left behind belongs to a build that is still running.
"""

import fcntl
import hashlib
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Final

from images.host import progress

CACHE_ENVIRONMENT_VARIABLE: Final = "VMM_IMAGES_CACHE"
DEFAULT_CACHE_DIRECTORY: Final = Path("~/.cache/vmm-images")
# Hex digits of the SHA-256 input digest kept in directory names.
KEY_LENGTH: Final = 16
# A build in progress lives in `.<name>-<key>.partial-<pid>` beside its final directory.
PARTIAL_MARK: Final = ".partial-"


def cache_root() -> Path:
    """Return the cache directory from VMM_IMAGES_CACHE, or ~/.cache/vmm-images."""
    configured = os.environ.get(CACHE_ENVIRONMENT_VARIABLE)
    root = Path(configured) if configured else DEFAULT_CACHE_DIRECTORY
    return root.expanduser().resolve()


def input_key(files: Iterable[Path], settings: Mapping[str, str]) -> str:
    """Hash the names and contents of `files` and the `settings` pairs into a short key.

    Settings carry everything else a build depends on, such as package versions. The
    order of `files` and `settings` does not change the key.
    """
    digest = hashlib.sha256()
    for path in sorted(Path(file) for file in files):
        digest.update(f"file {path.name} {path.stat().st_size}\n".encode())
        digest.update(path.read_bytes())
    for name in sorted(settings):
        digest.update(f"setting {name}={settings[name]}\n".encode())
    return digest.hexdigest()[:KEY_LENGTH]


def cached_build(name: str, key: str, build: Callable[[Path], None]) -> Path:
    """Return the output directory `<name>-<key>`, calling build(temporary dir) if absent.

    `build` fills the empty directory it receives; an exception from it removes the
    directory and propagates, so nothing partial is left under the final name.
    """
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{name}-{key}"
    if final.is_dir():
        return final

    with open(_lock_path(root, name, key), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.is_dir():
            return final
        remove_abandoned_builds(root, held=f"{name}-{key}")
        temporary = root / f".{name}-{key}{PARTIAL_MARK}{os.getpid()}"
        temporary.mkdir()
        try:
            build(temporary)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
        temporary.rename(final)
    progress(f"{name} ready in {final}")
    return final


def remove_abandoned_builds(root: Path, held: str) -> None:
    """Delete the temporary directories of builds whose process is gone.

    A build holds its output's lock while it runs, so a partial directory whose lock can
    be taken without waiting was left by a process that died (killed or out of memory).
    `held` names the output (`<name>-<key>`) whose lock the caller holds already: its
    partial directories are abandoned by definition.
    """
    for partial in root.glob(f".*{PARTIAL_MARK}*"):
        output_name = partial.name[1:].split(PARTIAL_MARK)[0]
        if output_name == held:
            _remove_partial(partial)
            continue
        name, _, key = output_name.rpartition("-")
        with open(_lock_path(root, name, key), "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            _remove_partial(partial)


def _remove_partial(partial: Path) -> None:
    progress(f"removing {partial}, left by a build that did not finish")
    shutil.rmtree(partial, ignore_errors=True)


def _lock_path(root: Path, name: str, key: str) -> Path:
    return root / f".{name}-{key}.lock"
