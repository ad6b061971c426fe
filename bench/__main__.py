"""Side-by-side benchmarks: this monitor, a Firecracker binary and QEMU's microvm machine.

Usage: python -m bench [--json PATH] [--runs N]

Figures per monitor (medians):
- startup_wall_ms, startup_cpu_ms: exec to the first answer on the control socket
  (REST `GET /` for this monitor and Firecracker, the QMP greeting for QEMU);
- api_latency_us: one request on a fresh connection (`GET /`, or QMP query-status);
- rss_before_boot_kib: resident memory once the control socket answers;
- starts_per_s: processes started to a ready control socket per second, one at a time;
- exit_cost_us, boots_per_s, blk_read_us: need a booted guest. Firecracker and QEMU
  stop with an emulation failure on hosts whose KVM emulates guest supervisor code,
  so there they are reported as not measured, with that reason.
Set FIRECRACKER_BIN to a Firecracker binary; QEMU is used when qemu-system-x86_64 is on PATH.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.startup import answers_get_root, process_cpu_ms
from vmm.arch.x86_64.emulation import HostKind, detect_host_kind

READY_TIMEOUT_S = 30.0
_GET_ROOT = b"GET / HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\r\n"
NOT_BOOTABLE = ("not measured: this host's KVM emulates guest supervisor code and this "
                "peer stops with an emulation failure before its guest runs")
EXIT_LOOP_COUNT = 20000


class Peer:
    """How to start one monitor and talk to its control socket."""

    def __init__(self, name: str, command: Callable[[str], list[str]],
                 ready: Callable[[str], bool], request: Callable[[str], None]) -> None:
        self.name = name
        self.command = command
        self.ready = ready
        self.request = request

    def spawn(self, workdir: str) -> tuple[subprocess.Popen[bytes], str, float]:
        """Start the peer; return the process, socket path and wall ms until ready."""
        path = os.path.join(workdir, "ctl.sock")
        began = time.monotonic()
        process = subprocess.Popen(self.command(path), stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   cwd=workdir)
        while not self.ready(path):
            if process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {process.returncode}")
            if time.monotonic() - began > READY_TIMEOUT_S:
                process.kill()
                raise TimeoutError(f"{self.name} not ready after {READY_TIMEOUT_S} s")
            time.sleep(0.0005)
        return process, path, (time.monotonic() - began) * 1000


def _rest_request(path: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(5)
        client.connect(path)
        client.sendall(_GET_ROOT)
        if not client.recv(4096).startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"GET / on {path} did not return 200")


def _qmp_ready(path: str) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(1)
            client.connect(path)
            return b"QMP" in client.recv(4096)
    except OSError:
        return False


def _qmp_request(path: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(5)
        client.connect(path)
        reader = client.makefile("rb")
        reader.readline()
        client.sendall(b'{"execute": "qmp_capabilities"}\n')
        reader.readline()
        client.sendall(b'{"execute": "query-status"}\n')
        if b"return" not in reader.readline():
            raise RuntimeError("QMP query-status failed")


def peers() -> list[Peer]:
    """This monitor, plus Firecracker and QEMU where available."""
    found = [Peer("vmm", lambda path: [sys.executable, "-m", "vmm", "--api-sock", path],
                  answers_get_root, _rest_request)]
    firecracker = os.environ.get("FIRECRACKER_BIN")
    if firecracker and os.access(firecracker, os.X_OK):
        found.append(Peer("firecracker", lambda path: [firecracker, "--api-sock", path],
                          answers_get_root, _rest_request))
    qemu = shutil.which("qemu-system-x86_64")
    if qemu:
        found.append(Peer("qemu-microvm", lambda path: [
            qemu, "-M", "microvm", "-enable-kvm", "-m", "128", "-nodefaults", "-no-user-config",
            "-display", "none", "-S", "-qmp", f"unix:{path},server=on,wait=off",
        ], _qmp_ready, _qmp_request))
    return found


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def measure_process(peer: Peer, runs: int) -> dict[str, float]:
    """Start-up, API latency and RSS figures of `peer`, medians over `runs` starts."""
    walls, cpus, rss, latencies = [], [], [], []
    began = time.monotonic()
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as workdir:
            process, path, wall_ms = peer.spawn(workdir)
            try:
                walls.append(wall_ms)
                cpus.append(process_cpu_ms(process.pid))
                rss.append(_rss_kib(process.pid))
                for _ in range(20):
                    started = time.perf_counter()
                    peer.request(path)
                    latencies.append((time.perf_counter() - started) * 1e6)
            finally:
                process.kill()
                process.wait()
    elapsed = time.monotonic() - began
    return {
        "startup_wall_ms": round(statistics.median(walls), 1),
        "startup_cpu_ms": round(statistics.median(cpus), 1),
        "api_latency_us": round(statistics.median(latencies), 1),
        "rss_before_boot_kib": statistics.median(rss),
        "starts_per_s": round(runs / elapsed, 2),
    }


def _exit_loop_kernel(workdir: Path) -> Path:
    """A tiny kernel: EXIT_LOOP_COUNT writes to port 0x80, then the i8042 reset."""
    from tests.kvm.tiny_kernels import write_elf

    code = (b"\xb9" + EXIT_LOOP_COUNT.to_bytes(4, "little")   # mov ecx, count
            + b"\xe6\x80\xe2\xfc"                              # 1: out 0x80, al; loop 1b
            + b"\xb0\xfe\xe6\x64\xf4\xeb\xfd")                 # reset; hlt; jmp
    return write_elf(workdir / "exits.elf", code)


def measure_guest(runs: int) -> dict[str, float]:
    """This monitor only: exit cost and boot-to-reset rate with a tiny guest, probe blk reads."""
    from vmm.pytest_plugin import MicroVm

    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as root:
        kernel = _exit_loop_kernel(Path(root))
        durations = []
        began = time.monotonic()
        for index in range(runs):
            workdir = Path(root) / f"vm{index}"
            workdir.mkdir()
            vm = MicroVm(workdir, extra_args=())
            try:
                vm.configure(kernel, mem_size_mib=32)
                vm.start()
                vm.console.wait()
                log = vm.log_path.read_text()
                ran = re.search(r"microVM ran ([\d.]+) s; vcpu exits: IO=(\d+)", log)
                if ran:
                    durations.append(float(ran[1]) * 1e6 / max(1, int(ran[2])))
            finally:
                vm.kill()
        results["boots_per_s"] = round(runs / (time.monotonic() - began), 2)
        if durations:
            results["exit_cost_us"] = round(statistics.median(durations), 2)
        results["blk_read_us"] = _probe_blk_read_us(Path(root))
    return results


def _probe_blk_read_us(root: Path) -> float:
    from images.probe_build import build_probe
    from vmm.pytest_plugin import MicroVm

    workdir = root / "probe"
    workdir.mkdir()
    disk = workdir / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    vm = MicroVm(workdir)
    try:
        vm.configure(build_probe(), boot_args="console=ttyS0", mem_size_mib=64, devices={
            "/drives/scratch": {"drive_id": "scratch", "path_on_host": str(disk),
                                "is_root_device": False, "is_read_only": False}})
        vm.start()
        vm.login_serial(prompt="probe# ")
        timings = []
        for sector in range(20):
            started = time.perf_counter()
            vm.run(f"blk read 0 {sector}")
            timings.append((time.perf_counter() - started) * 1e6)
        return round(statistics.median(timings), 1)
    finally:
        vm.kill()


def render(results: dict[str, dict[str, Any]]) -> str:
    """A table with one column per monitor and the ratio vmm / peer for each figure."""
    names = list(results)
    metrics = sorted({metric for figures in results.values() for metric, value in figures.items()
                      if isinstance(value, (int, float))})
    header = f"{'figure':<22}" + "".join(f"{name:>16}" for name in names)
    header += "".join(f"{'vmm/' + name:>18}" for name in names[1:])
    lines = [header]
    for metric in metrics:
        row = f"{metric:<22}"
        for name in names:
            value = results[name].get(metric)
            row += f"{value if isinstance(value, (int, float)) else 'n/a':>16}"
        ours = results["vmm"].get(metric)
        for name in names[1:]:
            theirs = results[name].get(metric)
            ratio = "n/a"
            if isinstance(ours, (int, float)) and isinstance(theirs, (int, float)) and theirs:
                ratio = f"{ours / theirs:.2f}"
            row += f"{ratio:>18}"
        lines.append(row)
    return "\n".join(lines)


def plot(results: dict[str, dict[str, Any]], path: Path) -> bool:
    """Write a bar chart per shared figure when matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    shared = [m for m in results["vmm"] if all(isinstance(r.get(m), (int, float))
                                                for r in results.values())]
    figure, axes = plt.subplots(1, len(shared), figsize=(4 * len(shared), 3))
    for axis, metric in zip(axes if len(shared) > 1 else [axes], shared):
        axis.bar(list(results), [results[name][metric] for name in results])
        axis.set_title(metric)
    figure.tight_layout()
    figure.savefig(path)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the figures to this JSON file")
    parser.add_argument("--runs", type=int, default=10, help="starts per monitor")
    args = parser.parse_args()
    host = detect_host_kind()
    results: dict[str, dict[str, Any]] = {}
    for peer in peers():
        print(f"measuring {peer.name} ...", file=sys.stderr)
        try:
            results[peer.name] = measure_process(peer, args.runs)
        except (RuntimeError, TimeoutError, OSError) as error:
            results[peer.name] = {"error": str(error)}
    print("measuring vmm with a booted guest ...", file=sys.stderr)
    results["vmm"].update(measure_guest(max(3, args.runs // 2)))
    for name in results:
        if name != "vmm" and host is HostKind.EMULATING:
            results[name]["guest_figures"] = NOT_BOOTABLE
    print(f"host: {host.value}")
    print(render(results))
    for name, figures in results.items():
        if "guest_figures" in figures:
            print(f"{name}: {figures['guest_figures']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"host": host.value, "results": results},
                                              indent=2) + "\n")
        if plot(results, Path(args.json).with_suffix(".png")):
            print(f"plot: {Path(args.json).with_suffix('.png')}")


if __name__ == "__main__":
    main()
