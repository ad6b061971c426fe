"""Measure API request latency and throughput of a monitor process over its Unix socket.

Starts `python -m vmm` with a fresh socket, then on keep-alive connections:
- median and p99 latency of `GET /` and of `PUT /machine-config` (one client);
- requests per second of `GET /` with 1, 4 and 16 concurrent clients.
Prints a table; `--json PATH` also writes the figures. Usage:
python -m bench.api_latency [--requests N] [--clients 1,4,16] [--json PATH]
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
import threading
import time

_GET_ROOT = b"GET / HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\r\n"
_MACHINE_CONFIG_BODY = b'{"vcpu_count": 1, "mem_size_mib": 128}'
_PUT_MACHINE_CONFIG = (
    b"PUT /machine-config HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n" % len(_MACHINE_CONFIG_BODY)
) + _MACHINE_CONFIG_BODY
_READY_TIMEOUT_S = 20.0


class KeepAliveClient:
    """Sends one request at a time on one connection and reads the whole response."""

    def __init__(self, socket_path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(socket_path)
        self.sock.settimeout(10)
        self.buffer = b""

    def send(self, request: bytes) -> int:
        """Send `request`; return the response status."""
        self.sock.sendall(request)
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self._recv()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(self.buffer) < length:
            self.buffer += self._recv()
        self.buffer = self.buffer[length:]
        return int(head[9:12])

    def _recv(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the monitor closed the API connection")
        return data

    def close(self) -> None:
        self.sock.close()


def start_monitor(socket_path: str) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, "-m", "vmm", "--api-sock", socket_path, "--level", "Error"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            client = KeepAliveClient(socket_path)
            client.send(_GET_ROOT)
            client.close()
            return process
        except OSError:
            time.sleep(0.01)
    process.kill()
    raise RuntimeError(f"the monitor did not respond to GET / on {socket_path} within "
                       f"{_READY_TIMEOUT_S} s")


def latencies_us(socket_path: str, request: bytes, count: int) -> dict[str, float]:
    """Return median and p99 latency in microseconds of `count` sequential requests."""
    client = KeepAliveClient(socket_path)
    samples = []
    try:
        for _ in range(count):
            began = time.perf_counter()
            status = client.send(request)
            samples.append((time.perf_counter() - began) * 1e6)
            if status >= 300:
                raise RuntimeError(f"request failed with status {status}")
    finally:
        client.close()
    samples.sort()
    return {
        "median_us": round(statistics.median(samples), 1),
        "p99_us": round(samples[min(len(samples) - 1, int(len(samples) * 0.99))], 1),
        "requests": count,
    }


def throughput(socket_path: str, clients: int, per_client: int) -> float:
    """Return requests per second of GET / with `clients` concurrent connections."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            client = KeepAliveClient(socket_path)
            for _ in range(per_client):
                client.send(_GET_ROOT)
            client.close()
        except (OSError, RuntimeError) as error:
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(clients)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    if errors:
        raise RuntimeError(f"{len(errors)} clients failed, first: {errors[0]!r}")
    return round(clients * per_client / elapsed, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.api_latency",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000,
                        help="requests per latency measurement (default: 2000)")
    parser.add_argument("--clients", default="1,4,16",
                        help="comma-separated client counts for throughput (default: 1,4,16)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    client_counts = [int(part) for part in args.clients.split(",")]

    with tempfile.TemporaryDirectory(prefix="api-latency-") as workdir:
        socket_path = os.path.join(workdir, "api.sock")
        process = start_monitor(socket_path)
        try:
            results = {
                "GET /": latencies_us(socket_path, _GET_ROOT, args.requests),
                "PUT /machine-config": latencies_us(socket_path, _PUT_MACHINE_CONFIG,
                                                    args.requests),
                "throughput_rps": {
                    str(count): throughput(socket_path, count,
                                           max(1, args.requests // count))
                    for count in client_counts
                },
            }
        finally:
            process.terminate()
            process.wait(10)

    print(f"{'request':<22}{'median us':>12}{'p99 us':>12}")
    for name in ("GET /", "PUT /machine-config"):
        print(f"{name:<22}{results[name]['median_us']:>12}{results[name]['p99_us']:>12}")
    print(f"\n{'clients':<22}{'requests/s':>12}")
    for count, rate in results["throughput_rps"].items():
        print(f"{count:<22}{rate:>12}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as output:
            json.dump(results, output, indent=2)
            output.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
