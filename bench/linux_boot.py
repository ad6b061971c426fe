"""Boot the project's Linux guest N times and report how long each boot took.

For each run: a monitor is started with an API socket, configured with the
guest kernel, a copy of the root file system (read-write) and 128 MiB / 1 vCPU,
and the time runs from sending InstanceStart to the console line
`Run /sbin/init as init process`. The monitor's own exit summary gives the vCPU
exits and the emulation fallbacks of the whole run (to the guest's reset on an
emulating host, where init cannot run). Usage:

    python -m bench.linux_boot [--runs 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

INIT_MARKER = b"Run /sbin/init as init process"
SUMMARY = re.compile(
    r"vcpu exits: .* \(total (?P<exits>\d+)\); emulation fallbacks: "
    r"(?:fwait=(?P<fwait>\d+) int3=(?P<int3>\d+)|none)"
)
BOOT_TIMEOUT_S = 600


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=30)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)


def _put(socket_path: str, path: str, body: dict) -> None:
    connection = _UnixConnection(socket_path)
    connection.request("PUT", path, json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    data = response.read()
    connection.close()
    if response.status != 204:
        raise RuntimeError(f"PUT {path} returned {response.status}: {data!r}")


def _wait_for_socket(path: str, process: subprocess.Popen, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"monitor API socket {path} did not appear")
        time.sleep(0.01)


def boot_once(kernel: str, rootfs: str) -> dict[str, float | int | None]:
    with tempfile.TemporaryDirectory() as workdir:
        socket_path = os.path.join(workdir, "api.sock")
        log_path = os.path.join(workdir, "monitor.log")
        disk = os.path.join(workdir, "rootfs.ext4")
        shutil.copyfile(rootfs, disk)
        process = subprocess.Popen(
            [sys.executable, "-m", "vmm", "--api-sock", socket_path,
             "--log-path", log_path, "--level", "Info"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )
        try:
            _wait_for_socket(socket_path, process)
            _put(socket_path, "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128})
            _put(socket_path, "/boot-source", {
                "kernel_image_path": kernel,
                "boot_args": "console=ttyS0 reboot=k panic=1 pci=off",
            })
            _put(socket_path, "/drives/rootfs", {
                "drive_id": "rootfs", "path_on_host": disk,
                "is_root_device": True, "is_read_only": False,
            })
            started = time.monotonic()
            _put(socket_path, "/actions", {"action_type": "InstanceStart"})
            seconds_to_init = _wait_for_marker(process, started)
            process.wait(timeout=BOOT_TIMEOUT_S)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        with open(log_path, encoding="utf-8", errors="replace") as log:
            summary = SUMMARY.search(log.read())
    return {
        "instance_start_to_run_init_s": round(seconds_to_init, 2),
        "exit_code": process.returncode,
        "vcpu_exits": int(summary["exits"]) if summary else None,
        "fwait_completed": int(summary["fwait"]) if summary and summary["fwait"] else 0,
        "int3_delivered": int(summary["int3"]) if summary and summary["int3"] else 0,
    }


def _wait_for_marker(process: subprocess.Popen, started: float) -> float:
    assert process.stdout is not None
    seen = b""
    while time.monotonic() - started < BOOT_TIMEOUT_S:
        ready, _, _ = select.select([process.stdout], [], [], 1.0)
        if not ready:
            continue
        chunk = os.read(process.stdout.fileno(), 65536)
        if not chunk:
            break
        seen = (seen + chunk)[-4096:]
        if INIT_MARKER in seen:
            return time.monotonic() - started
    raise RuntimeError("the guest never printed the hand-over to init")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="number of boots")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    from images import build_paths

    paths = build_paths()
    runs = [boot_once(paths["kernel"], paths["rootfs"]) for _ in range(args.runs)]
    for run in runs:
        print(json.dumps(run))
    median = statistics.median(run["instance_start_to_run_init_s"] for run in runs)
    summary = {"runs": args.runs, "instance_start_to_run_init_s_median": median}
    print(json.dumps(summary))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump({"summary": summary, "runs": runs}, out, indent=2)


if __name__ == "__main__":
    main()
