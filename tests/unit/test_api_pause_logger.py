"""The vCPU pause gate, and PUT /logger switching the log destination at run time."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import pytest

from tests.unit.test_api_support import FakeRuntime
from vmm import logger as vmm_logger
from vmm.controller import Controller
from vmm.resources import VmResources
from vmm.vm import PauseGate

pytestmark = pytest.mark.usefixtures("restore_vmm_logger")


def start_holders(gate: PauseGate, count: int, passed: list[int]) -> list[threading.Thread]:
    def run(index: int) -> None:
        gate.hold()
        passed.append(index)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    return threads


def test_open_gate_does_not_hold() -> None:
    passed: list[int] = []
    for thread in start_holders(PauseGate(), 2, passed):
        thread.join(5)
    assert sorted(passed) == [0, 1]


def test_closed_gate_parks_until_open() -> None:
    gate = PauseGate()
    gate.close()
    passed: list[int] = []
    threads = start_holders(gate, 2, passed)
    assert gate.wait_parked(2, 5.0)
    assert passed == []
    gate.open()
    for thread in threads:
        thread.join(5)
    assert sorted(passed) == [0, 1]


def test_release_frees_parked_threads_for_good() -> None:
    gate = PauseGate()
    gate.close()
    passed: list[int] = []
    threads = start_holders(gate, 1, passed)
    assert gate.wait_parked(1, 5.0)
    gate.release()
    threads[0].join(5)
    assert passed == [0]
    gate.close()
    gate.hold()  # returns at once after release
    assert not gate.wait_parked(1, 0.1)


def test_wait_parked_times_out() -> None:
    gate = PauseGate()
    gate.close()
    assert not gate.wait_parked(1, 0.05)


def put_logger(controller: Controller, body: str) -> tuple[int, dict | None]:
    return controller.handle("PUT", "/logger", body.encode())


def test_put_logger_switches_file_then_fifo(tmp_path: Path) -> None:
    controller = Controller(VmResources(), FakeRuntime(), instance_id="log-vm")
    first = tmp_path / "first.log"
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    log = logging.getLogger("vmm.test")
    assert put_logger(controller, f'{{"log_path": "{first}", "level": "Info"}}')[0] == 204
    log.info("to the file")
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        body = f'{{"log_path": "{fifo}", "level": "Debug", "show_level": true}}'
        assert put_logger(controller, body)[0] == 204
        log.debug("to the pipe")
        piped = os.read(reader, 65536).decode()
    finally:
        os.close(reader)
    assert "to the file" in first.read_text()
    assert "to the pipe" not in first.read_text()
    assert ":DEBUG] to the pipe" in piped


def test_put_logger_bad_path_keeps_destination(tmp_path: Path) -> None:
    controller = Controller(VmResources(), FakeRuntime(), instance_id="log-vm")
    good = tmp_path / "good.log"
    assert put_logger(controller, f'{{"log_path": "{good}"}}')[0] == 204
    status, body = put_logger(controller, f'{{"log_path": "{tmp_path}/no/such.log"}}')
    assert status == 400
    assert body is not None and "no/such.log" in body["fault_message"]
    logging.getLogger("vmm.test").info("still here")
    assert "still here" in good.read_text()


def test_full_log_fifo_drops_lines_and_counts_them(tmp_path: Path) -> None:
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    before = vmm_logger.dropped_line_count()
    output = vmm_logger.configure("log-vm", level="Info", log_path=str(fifo))
    log = logging.getLogger("vmm.test")
    for index in range(20000):
        log.info("line %d %s", index, "x" * 64)
        if output.dropped_lines:
            break
    assert output.dropped_lines >= 1
    assert vmm_logger.dropped_line_count() > before


def test_rate_limited_logger_suppresses_repeats(tmp_path: Path) -> None:
    path = tmp_path / "rate.log"
    vmm_logger.configure("log-vm", level="Info", log_path=str(path))
    limited = vmm_logger.RateLimitedLogger(logging.getLogger("vmm.guest"), burst=3,
                                           interval_s=60)
    logged = [limited.warning("bad descriptor %d", index) for index in range(10)]
    assert logged == [True] * 3 + [False] * 7
    assert path.read_text().count("bad descriptor") == 3
