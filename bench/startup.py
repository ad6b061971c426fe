"""Measure the monitor's start-up: wall and CPU milliseconds from exec to API ready.

"API ready" is the first moment a client connecting to the socket gets an answer
to `GET /`. CPU time is the process's user + system time read from
/proc/PID/stat at that moment, which includes the Python interpreter's own
start-up. Usage: python -m bench.startup [--runs N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_REQUEST = b"GET / HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\r\n"


def process_cpu_ms(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    user_ticks, system_ticks = int(fields[11]), int(fields[12])
    return (user_ticks + system_ticks) * 1000 / _CLOCK_TICKS


def answers_get_root(path: str) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(1)
            client.connect(path)
            client.sendall(_REQUEST)
            return client.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def measure_once(command: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as workdir:
        socket_path = os.path.join(workdir, "api.sock")
        began = time.monotonic()
        process = subprocess.Popen(
            [*command, "--api-sock", socket_path],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            while not answers_get_root(socket_path):
                if process.poll() is not None:
                    raise RuntimeError(f"{command[0]} exited with {process.returncode}")
                if time.monotonic() - began > 30:
                    raise TimeoutError("API not ready after 30 s")
                time.sleep(0.0005)
            wall_ms = (time.monotonic() - began) * 1000
            cpu_ms = process_cpu_ms(process.pid)
        finally:
            process.kill()
            process.wait()
    return {"wall_ms": wall_ms, "cpu_ms": cpu_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="number of starts to measure")
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument(
        "--command", default=f"{sys.executable} -m vmm",
        help="monitor command line without --api-sock (default: this Python's vmm)",
    )
    args = parser.parse_args()
    command = args.command.split()
    runs = [measure_once(command) for _ in range(args.runs)]
    summary = {
        "command": args.command,
        "runs": args.runs,
        "wall_ms_median": round(statistics.median(r["wall_ms"] for r in runs), 1),
        "cpu_ms_median": round(statistics.median(r["cpu_ms"] for r in runs), 1),
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump({"summary": summary, "runs": runs}, out, indent=2)


if __name__ == "__main__":
    main()
