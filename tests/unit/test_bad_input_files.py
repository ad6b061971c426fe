"""Regressions: input files and host paths that once hung the monitor or raised a bare error."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmm.cli import MAX_JSON_FILE_BYTES, UsageError, load_json_file
from vmm.errors import ConfigError
from vmm.resources import VmResources


def test_config_file_that_never_ends_is_refused_by_size() -> None:
    with pytest.raises(UsageError) as caught:
        load_json_file("--config-file", "/dev/zero")
    message = str(caught.value)
    assert "--config-file" in message and "'/dev/zero'" in message
    assert f"larger than {MAX_JSON_FILE_BYTES} bytes" in message


def test_config_file_at_the_size_limit_is_read(tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    body = b'{"a": "' + b"x" * (MAX_JSON_FILE_BYTES - 10) + b'"}'
    path.write_bytes(body.ljust(MAX_JSON_FILE_BYTES, b" "))
    assert len(load_json_file("--config-file", str(path))["a"]) == MAX_JSON_FILE_BYTES - 10


def test_nul_in_kernel_path_is_a_config_error_naming_the_field() -> None:
    with pytest.raises(ConfigError) as caught:
        VmResources().set_boot_source({"kernel_image_path": "vmlinux\0"})
    assert "kernel_image_path" in str(caught.value)
    assert "NUL byte" in str(caught.value)


def test_nul_in_drive_path_is_a_config_error_naming_the_drive() -> None:
    with pytest.raises(ConfigError) as caught:
        VmResources().put_drive(
            {"drive_id": "rootfs", "path_on_host": "\0", "is_root_device": True}
        )
    assert "drives: rootfs: path_on_host" in str(caught.value)
