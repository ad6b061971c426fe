"""Regressions: input files and host paths that once hung the monitor or raised a bare error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from vmm.api.server import ApiServer, ApiServerError
from tests.unit.test_api_support import FakeRuntime
from vmm.cli import MAX_JSON_FILE_BYTES, UsageError, load_json_file
from vmm.controller import MAX_JSON_DEPTH, Controller
from vmm.errors import ConfigError
from vmm.logger import open_log_path
from vmm.metrics import open_metrics_path
from vmm.resources import VmResources

REPO_ROOT = Path(__file__).resolve().parents[2]


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


def test_nul_in_vsock_uds_path_is_a_config_error() -> None:
    """A NUL once reached bind(), which silently created the socket at the prefix."""
    with pytest.raises(ConfigError) as caught:
        VmResources().set_vsock({"guest_cid": 3, "uds_path": "v.sock\0x"})
    assert "vsock: uds_path" in str(caught.value)
    assert "NUL byte" in str(caught.value)


@pytest.mark.parametrize("open_path", [open_log_path, open_metrics_path])
def test_nul_in_log_or_metrics_path_names_the_field(open_path: Callable[[str], int]) -> None:
    with pytest.raises(ValueError) as caught:
        open_path("out\0.log")
    assert "_path: 'out\\x00.log' contains a NUL byte" in str(caught.value)


def test_api_socket_path_too_long_names_the_reason(tmp_path: Path) -> None:
    path = str(tmp_path / ("a" * 120))
    server = ApiServer(path, lambda *_: (204, None), 1024)
    with pytest.raises(ApiServerError) as caught:
        server.bind()
    assert path in str(caught.value)
    assert str(caught.value).endswith("AF_UNIX path too long")


def test_metrics_path_in_missing_directory_exits_1_naming_it(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-dir" / "metrics.json")
    result = subprocess.run(
        [sys.executable, "-m", "vmm", "--metrics-path", missing, "--api-sock",
         str(tmp_path / "api.sock")],
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"--metrics-path: metrics_path: cannot open {missing!r}" in result.stderr


@pytest.mark.parametrize("depth", [700, 5000])
def test_deeply_nested_api_body_is_400(depth: int) -> None:
    """A body nested 700 deep once overflowed deepcopy in PUT /mmds, 5000 deep the parser."""
    controller = Controller(VmResources(), FakeRuntime())
    body = ('{"a":' * depth + "1" + "}" * depth).encode()
    status, response = controller.handle("PUT", "/mmds", body)
    assert status == 400, response
    assert response is not None
    assert response["fault_message"].startswith("mmds: the request body nests JSON")


def test_api_body_at_the_depth_limit_is_accepted() -> None:
    controller = Controller(VmResources(), FakeRuntime())
    body = ('{"a":' * MAX_JSON_DEPTH + "1" + "}" * MAX_JSON_DEPTH).encode()
    assert controller.handle("PUT", "/mmds", body)[0] == 204


def test_deeply_nested_config_file_exits_with_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(UsageError) as caught:
        load_json_file("--config-file", str(path))
    assert "nests JSON arrays or objects deeper" in str(caught.value)
