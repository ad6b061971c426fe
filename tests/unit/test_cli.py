"""The vmm command line, config-file start-up, start-up time, and the logger."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import vmm
from tests.unit.test_api_support import FakeRuntime, request
from vmm import logger as vmm_logger
from vmm.cli import UsageError, main, parse_args

pytestmark = pytest.mark.usefixtures("restore_vmm_logger")

ROOT = Path(__file__).resolve().parents[2]


def run_vmm(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmm", *argv], capture_output=True,
                          text=True, timeout=60, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_version_flag() -> None:
    result = run_vmm("--version")
    assert result.returncode == 0
    assert result.stdout == f"vmm v{vmm.__version__}\n"


@pytest.mark.parametrize("argv, fragment", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--no-api"], "--no-api needs --config-file"),
    (["--id", "bad id"], "invalid character ' ' at position 3"),
    (["--id", "x" * 65], "length 65"),
    (["--level", "loud"], "'loud' is not one of"),
    (["--http-api-max-payload-size", "0"], "--http-api-max-payload-size"),
    (["--no-seccomp", "--seccomp-filter", "/f"], "cannot be used together"),
])
def test_bad_flags_exit_1(argv: list[str], fragment: str) -> None:
    result = run_vmm(*argv)
    assert result.returncode == 1
    assert fragment in result.stderr
    assert result.stdout == ""


def test_parse_args_defaults() -> None:
    args = parse_args([])
    assert args.api_sock == "/run/firecracker.socket"
    assert args.id == "anonymous-instance"
    assert args.http_api_max_payload_size == 51200
    assert args.mmds_size_limit == 51200
    with pytest.raises(UsageError, match="--id"):
        parse_args(["--id", ""])


def run_main(argv: list[str], runtime: FakeRuntime) -> int:
    def factory(**kwargs: object) -> FakeRuntime:
        runtime.calls.append(("construct", tuple(sorted(kwargs))))
        return runtime

    with pytest.raises(SystemExit) as caught:
        main(argv, runtime_factory=factory)
    assert isinstance(caught.value.code, int)
    return caught.value.code


def test_bad_config_file_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.json"
    config.write_text('{"machine-config": ')
    code = run_main(["--no-api", "--config-file", str(config)], FakeRuntime())
    assert code == 1
    assert "not valid JSON" in capsys.readouterr().err
    missing = tmp_path / "missing.json"
    assert run_main(["--no-api", "--config-file", str(missing)], FakeRuntime()) == 1
    assert "missing.json" in capsys.readouterr().err


def test_config_file_error_names_key(tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"boot-source": {"kernel_image_path": "/no/such/kernel"}}))
    assert run_main(["--no-api", "--config-file", str(config)], FakeRuntime()) == 1
    assert "boot-source" in capsys.readouterr().err


def test_no_api_config_file_starts_vm(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "boot-source": {"kernel_image_path": str(kernel)},
        "machine-config": {"vcpu_count": 2, "mem_size_mib": 64},
    }))
    runtime = FakeRuntime(exit_code=7)
    runtime.ended.set()
    assert run_main(["--no-api", "--config-file", str(config), "--id", "cfg-vm"], runtime) == 7
    assert runtime.calls[0] == ("construct", ("boot_timer", "instance_id", "metrics_path"))
    assert runtime.started_with is not None
    assert runtime.started_with.machine_config.vcpu_count == 2


def test_api_server_serves_until_vm_ends(tmp_path: Path) -> None:
    sock = tmp_path / "api.sock"
    runtime = FakeRuntime()
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(run_main(
        ["--api-sock", str(sock), "--level", "Off"], runtime)))
    thread.start()
    deadline = time.monotonic() + 20
    while not sock.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert request(sock, "GET", "/")[0] == 200
    runtime.shutdown(3)
    thread.join(timeout=20)
    assert codes == [3]
    assert not sock.exists()


STARTUP_SCRIPT = """
import sys
from tests.unit.test_api_support import FakeRuntime
from vmm.cli import main
main(sys.argv[1:], runtime_factory=lambda **kwargs: FakeRuntime())
"""


def test_startup_to_first_accept(tmp_path: Path, figures: dict[str, object]) -> None:
    """Measure exec-to-accept wall time; assert only a loose bound that shared CI meets."""
    sock = tmp_path / "api.sock"
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-c", STARTUP_SCRIPT, "--api-sock", str(sock), "--level", "Off"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        while True:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(str(sock))
                    break
                except OSError:
                    pass
            assert process.poll() is None, "vmm exited before accepting"
            assert time.monotonic() - started < 30, "API socket not accepting after 30 s"
            time.sleep(0.002)
        elapsed_ms = (time.monotonic() - started) * 1000
        assert request(sock, "GET", "/")[0] == 200
    finally:
        process.terminate()
        process.wait(timeout=20)
    figures["api_ready_wall_ms"] = round(elapsed_ms, 1)
    assert elapsed_ms < 5000


def test_startup_does_not_import_jsonschema_or_yaml() -> None:
    code = ("import sys; import vmm.cli, vmm.api.server; "
            "print(sorted(m for m in ('jsonschema', 'yaml') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.stdout.strip() == "[]"


# Logger ---------------------------------------------------------------------------------


def test_log_line_format(tmp_path: Path) -> None:
    path = tmp_path / "log"
    vmm_logger.configure("vm-1", level="debug", log_path=str(path), show_level=True,
                         show_log_origin=True)
    logging.getLogger("vmm.test").info("hello %s", "world")
    line = path.read_text().strip()
    assert "[vm-1:MainThread:INFO:test_cli.py:" in line
    assert line.endswith("] hello world")


def test_log_level_filters(tmp_path: Path) -> None:
    path = tmp_path / "log"
    vmm_logger.configure("vm-1", level="Warning", log_path=str(path))
    logging.getLogger("vmm.test").info("hidden")
    logging.getLogger("vmm.test").warning("shown")
    text = path.read_text()
    assert "hidden" not in text
    assert "[vm-1:MainThread] shown" in text


def test_log_to_fifo_without_reader(tmp_path: Path) -> None:
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    handler = vmm_logger.configure("vm-1", log_path=str(fifo))
    for _ in range(5000):
        logging.getLogger("vmm.test").info("x" * 100)
    assert handler.dropped_lines > 0


def test_bad_log_path_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="log_path"):
        vmm_logger.configure("vm-1", log_path=str(tmp_path / "no-dir" / "log"))


def test_rate_limited_logger_suppresses_and_reports(tmp_path: Path) -> None:
    path = tmp_path / "log"
    vmm_logger.configure("vm-1", log_path=str(path), show_log_origin=True)
    limited = vmm_logger.RateLimitedLogger(logging.getLogger("vmm.test"), burst=3,
                                           interval_s=0.3)

    def report(index: int) -> bool:
        return limited.warning("bad descriptor %d", index)

    logged = [report(index) for index in range(10)]
    assert logged == [True] * 3 + [False] * 7
    time.sleep(0.35)
    assert report(10)
    lines = path.read_text().splitlines()
    assert len(lines) == 4
    assert "test_cli.py" in lines[0]
    assert lines[-1].endswith("bad descriptor 10 (7 similar messages suppressed)")
