"""Linux user space drives every device: serial and SSH login, ping, MMDS, vsock, balloon,
entropy and block throughput.

These tests need a host whose KVM runs guest code in hardware (VMX or SVM), so they are
marked `hardware_virt`; conftest.py skips them elsewhere with the reason. One Linux guest
(images.build_paths()) serves the module: a tap in a network namespace the test creates,
`ip=` on the kernel command line for eth0, MMDS V1 on eth0, vsock, balloon, entropy, and
two extra drives. The MMDS V2 test boots a guest of its own, since the MMDS version is
set before boot.

What the root file system lacks, and how the tests cope:
- no iperf3 or fio: throughput is measured with busybox `dd` on a raw drive;
- no socat, and busybox `nc` has no AF_VSOCK: the test compiles a small static vsock echo
  server with the host's gcc (`gcc -static`, needs libc6-dev) and hands it to the guest on
  an ext4 drive built with `mkfs.ext4 -d`;
- busybox `wget` cannot send PUT: the V2 token request goes through busybox `nc`.
All network traffic stays inside the test's namespace; the test reaches the guest's SSH
server from a thread that joins the namespace with setns(2).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paramiko
import pytest

from tests.integration.microvm import Monitor
from tests.integration.test_probe_guest import make_tap_namespace

pytestmark = [pytest.mark.kvm, pytest.mark.hardware_virt]

MEM_SIZE_MIB = 256
BOOT_TIMEOUT_S = 60
COMMAND_TIMEOUT_S = 60
SHELL_PROMPT = r"# "
HOST_ADDRESS = "10.254.10.1"
GUEST_ADDRESS = "10.254.10.2"
NETMASK = "255.255.255.0"
GUEST_MAC = "aa:fc:00:00:00:10"
# Kernel IP autoconfiguration (Documentation/admin-guide/nfs/nfsroot.rst):
# ip=<client>:<server>:<gateway>:<netmask>:<hostname>:<device>:<autoconf>.
IP_ARGUMENT = f"ip={GUEST_ADDRESS}::{HOST_ADDRESS}:{NETMASK}::eth0:off"
BOOT_ARGS = f"console=ttyS0 reboot=k panic=1 pci=off {IP_ARGUMENT}"
MMDS_ADDRESS = "169.254.169.254"
MMDS_DATA = {"latest": {"meta-data": {"ami-id": "ami-linux-0001", "zone": "linux-1a"}}}
TOKEN_TTL_S = 60
GUEST_CID = 3
VSOCK_PORT = 5210
BALLOON_MIB = 64
BALLOON_TIMEOUT_S = 30
SCRATCH_MIB = 64
DD_MIB = 32
PING_COUNT = 3
SSH_PORT = 22
# linux/sched.h: the namespace type setns(2) checks.
CLONE_NEWNET = 0x4000_0000

# A vsock server for the guest: accept one connection on the port given, echo until EOF.
VSOCK_ECHO_SOURCE = r"""
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

int main(int argc, char **argv)
{
    struct sockaddr_vm address = {0};
    char buffer[4096];
    ssize_t count;
    int server = socket(AF_VSOCK, SOCK_STREAM, 0);
    address.svm_family = AF_VSOCK;
    address.svm_cid = VMADDR_CID_ANY;
    address.svm_port = (unsigned int)atoi(argv[1]);
    if (server < 0 || bind(server, (struct sockaddr *)&address, sizeof address) < 0 ||
        listen(server, 1) < 0)
        return 1;
    int client = accept(server, NULL, NULL);
    if (client < 0)
        return 2;
    while ((count = read(client, buffer, sizeof buffer)) > 0)
        if (write(client, buffer, (size_t)count) != count)
            return 3;
    return 0;
}
"""


class GuestShell:
    """The root shell on the guest's serial console, after login."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor
        self.counter = 0

    def run(self, command: str, timeout_s: float = COMMAND_TIMEOUT_S) -> tuple[int, str]:
        """Run `command`; return its exit status and output (stdout and stderr)."""
        self.counter += 1
        begin, end = f"__begin{self.counter}", f"__end{self.counter}_"
        self.monitor.process.sendline(f"echo {begin}; {command} 2>&1; echo {end}$?")
        # In the echoed command line the markers are followed by ";" and "$?", so only the
        # lines the shell prints match these patterns.
        self.monitor.expect(rf"{begin}\r?\n", timeout_s)
        match = self.monitor.expect(rf"{end}(\d+)\r?\n", timeout_s)
        output = (self.monitor.process.before or "").replace("\r\n", "\n")
        self.monitor.expect(SHELL_PROMPT, timeout_s)
        return int(match.group(1)), output.strip("\n")

    def check(self, command: str, timeout_s: float = COMMAND_TIMEOUT_S) -> str:
        """Run `command`, assert that it exits 0, and return its output."""
        status, output = self.run(command, timeout_s)
        assert status == 0, f"`{command}` exited {status}:\n{output}"
        return output


@dataclass
class LinuxVm:
    monitor: Monitor
    shell: GuestShell
    namespace: str
    vsock_path: Path
    scratch: Path
    login_s: float


def build_tools_image(workdir: Path) -> Path:
    """Compile the vsock echo server statically and put it in an ext4 image; return it."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the guest's vsock echo server (no socat)")
    tree = workdir / "tools"
    tree.mkdir()
    source = workdir / "vsock_echo.c"
    source.write_text(VSOCK_ECHO_SOURCE)
    built = subprocess.run(["gcc", "-static", "-O2", "-o", str(tree / "vsock_echo"),
                            str(source)], capture_output=True, text=True, timeout=120)
    if built.returncode != 0:
        pytest.skip(f"gcc -static failed (is libc6-dev installed?): {built.stderr[-500:]}")
    image = workdir / "tools.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-d", str(tree), str(image), "8M"], check=True,
                   capture_output=True, timeout=60)
    return image


@contextlib.contextmanager
def tap_namespace() -> Iterator[tuple[str, str]]:
    """Make a network namespace with a tap at HOST_ADDRESS; yield (namespace, tap)."""
    with make_tap_namespace("linuxtest-", "linuxtap", HOST_ADDRESS) as made:
        yield made


@pytest.fixture(scope="module")
def namespace() -> Iterator[tuple[str, str]]:
    with tap_namespace() as made:
        yield made


def drive_body(drive_id: str, path: Path, root: bool, read_only: bool) -> dict[str, object]:
    return {"drive_id": drive_id, "path_on_host": str(path), "is_root_device": root,
            "is_read_only": read_only}


def boot_linux(workdir: Path, namespace: tuple[str, str], mmds_version: str,
               extra: dict[str, dict[str, object]]) -> LinuxVm:
    """Boot the Linux guest with eth0 on the namespace's tap, log in on the serial console."""
    from images import build_paths

    paths = build_paths()
    rootfs = workdir / "rootfs.ext4"
    shutil.copyfile(paths["rootfs"], rootfs)
    netns, tap = namespace
    monitor = Monitor(workdir, "--boot-timer", netns=netns)
    try:
        monitor.wait_for_api()
        requests: dict[str, dict[str, object]] = {
            "/machine-config": {"vcpu_count": 2, "mem_size_mib": MEM_SIZE_MIB},
            "/boot-source": {"kernel_image_path": paths["kernel"], "boot_args": BOOT_ARGS},
            "/drives/rootfs": drive_body("rootfs", rootfs, root=True, read_only=False),
            "/network-interfaces/eth0": {"iface_id": "eth0", "host_dev_name": tap,
                                         "guest_mac": GUEST_MAC},
            "/mmds/config": {"network_interfaces": ["eth0"], "version": mmds_version},
            "/mmds": MMDS_DATA,
            **extra,
        }
        for path, body in requests.items():
            status, answer = monitor.api.put(path, body)
            assert status == 204, (path, answer)
        started = time.monotonic()
        status, answer = monitor.api.put("/actions", {"action_type": "InstanceStart"})
        assert status == 204, answer
        monitor.expect("login: ", BOOT_TIMEOUT_S)
        monitor.process.sendline("root")
        monitor.expect("Password: ", COMMAND_TIMEOUT_S)
        monitor.process.sendline("root")
        monitor.expect(SHELL_PROMPT, COMMAND_TIMEOUT_S)
        login_s = time.monotonic() - started
    except BaseException:
        monitor.terminate()
        raise
    shell = GuestShell(monitor)
    shell.check(f"ip route add {MMDS_ADDRESS} dev eth0")
    return LinuxVm(monitor, shell, netns, workdir / "vsock.sock", workdir / "scratch.img",
                   login_s)


@pytest.fixture(scope="module")
def linux(tmp_path_factory: pytest.TempPathFactory,
          namespace: tuple[str, str]) -> Iterator[LinuxVm]:
    workdir = tmp_path_factory.mktemp("linux-devices")
    scratch = workdir / "scratch.img"
    scratch.write_bytes(bytes(SCRATCH_MIB << 20))
    tools = build_tools_image(workdir)
    extra: dict[str, dict[str, object]] = {
        "/drives/tools": drive_body("tools", tools, root=False, read_only=True),
        "/drives/scratch": drive_body("scratch", scratch, root=False, read_only=False),
        "/entropy": {},
        "/balloon": {"amount_mib": 0, "deflate_on_oom": False, "stats_polling_interval_s": 1},
        "/vsock": {"guest_cid": GUEST_CID, "uds_path": str(workdir / "vsock.sock")},
    }
    vm = boot_linux(workdir, namespace, "V1", extra)
    yield vm
    vm.monitor.terminate()


def guest_disk(vm: LinuxVm, drive_id: str) -> str:
    """Return /dev/vdX of the drive whose virtio-blk serial (its drive_id) is `drive_id`."""
    script = (f"for d in /sys/block/vd*; do [ \"$(cat $d/serial)\" = {drive_id} ] "
              "&& echo /dev/${d##*/}; done")
    device = vm.shell.check(script).strip()
    assert device.startswith("/dev/vd"), f"no disk with serial {drive_id!r}: {device!r}"
    return device


def test_serial_login(linux: LinuxVm, figures: dict[str, object]) -> None:
    figures["instance_start_to_shell_s"] = round(linux.login_s, 3)
    assert linux.shell.check("id -u") == "0"
    assert IP_ARGUMENT in linux.shell.check("cat /proc/cmdline")


# SSH -----------------------------------------------------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def connect_in_namespace(namespace: str, address: str, port: int) -> socket.socket:
    """Return a TCP socket connected to address:port from inside `namespace`.

    setns(2) moves only the calling thread, so a short-lived thread joins the namespace,
    connects, and hands the socket back; the socket keeps its namespace afterwards.
    """
    result: dict[str, object] = {}

    def connect() -> None:
        try:
            fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    error = ctypes.get_errno()
                    raise OSError(error, f"setns into {namespace} failed: {os.strerror(error)}")
            finally:
                os.close(fd)
            result["socket"] = socket.create_connection((address, port), timeout=30)
        except OSError as error:
            result["error"] = error

    thread = threading.Thread(target=connect)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result["socket"]  # type: ignore[return-value]


def test_ssh_login_runs_command(linux: LinuxVm, figures: dict[str, object]) -> None:
    from images import build_paths

    key = paramiko.Ed25519Key.from_private_key_file(build_paths()["ssh_key"])
    started = time.monotonic()
    sock = connect_in_namespace(linux.namespace, GUEST_ADDRESS, SSH_PORT)
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    try:
        client.connect(GUEST_ADDRESS, username="root", pkey=key, sock=sock,
                       allow_agent=False, look_for_keys=False, timeout=30)
        _, stdout, _ = client.exec_command("uname -n; cat /proc/sys/kernel/random/boot_id")
        lines = stdout.read().decode().split()
        figures["ssh_connect_and_command_s"] = round(time.monotonic() - started, 3)
        assert stdout.channel.recv_exit_status() == 0
        assert lines[0] == "microvm"
        assert lines[1] == linux.shell.check("cat /proc/sys/kernel/random/boot_id")
    finally:
        client.close()


# Network ------------------------------------------------------------------------------------


def test_ping_both_ways(linux: LinuxVm, figures: dict[str, object]) -> None:
    started = time.monotonic()
    output = linux.shell.check(f"ping -c {PING_COUNT} -W 5 {HOST_ADDRESS}")
    figures["guest_to_host_ping_s"] = round(time.monotonic() - started, 3)
    assert f"{PING_COUNT} packets received" in output
    started = time.monotonic()
    ping = subprocess.run(["ip", "netns", "exec", linux.namespace, "ping", "-c",
                           str(PING_COUNT), "-W", "5", GUEST_ADDRESS],
                          capture_output=True, text=True, timeout=60)
    figures["host_to_guest_ping_s"] = round(time.monotonic() - started, 3)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    assert f"{PING_COUNT} received" in ping.stdout


def test_mmds_v1_wget(linux: LinuxVm, figures: dict[str, object]) -> None:
    started = time.monotonic()
    value = linux.shell.check(f"wget -q -O - http://{MMDS_ADDRESS}/latest/meta-data/ami-id")
    figures["mmds_v1_get_s"] = round(time.monotonic() - started, 3)
    assert value == "ami-linux-0001"
    listing = linux.shell.check(f"wget -q -O - http://{MMDS_ADDRESS}/latest/meta-data/")
    assert listing.split() == ["ami-id", "zone"]


def test_mmds_v2_token_required(tmp_path: Path, figures: dict[str, object]) -> None:
    # A namespace of its own: the module's guest keeps the other one's tap open.
    with tap_namespace() as own_namespace:
        vm = boot_linux(tmp_path, own_namespace, "V2", {})
        try:
            check_mmds_v2(vm, figures)
        finally:
            vm.monitor.terminate()


def check_mmds_v2(vm: LinuxVm, figures: dict[str, object]) -> None:
    """Get a token with PUT (through nc), then GET with it (200) and without it (401)."""
    shell = vm.shell
    started = time.monotonic()
    request = (r"PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\n"
               rf"X-metadata-token-ttl-seconds: {TOKEN_TTL_S}\r\nContent-Length: 0\r\n\r\n")
    response = shell.check(f"printf '{request}' | nc -w 3 {MMDS_ADDRESS} 80")
    assert response.startswith("HTTP/1.1 200"), response
    token = response.replace("\r\n", "\n").split("\n\n", 1)[1].strip()
    assert token
    url = f"http://{MMDS_ADDRESS}/latest/meta-data/zone"
    value = shell.check(f"wget -q -O - --header 'X-metadata-token: {token}' {url}")
    figures["mmds_v2_token_and_get_s"] = round(time.monotonic() - started, 3)
    assert value == "linux-1a"
    status, output = shell.run(f"wget -O - {url}")
    assert status != 0
    assert "401" in output
    assert "linux-1a" not in output


# vsock, entropy, balloon and block -----------------------------------------------------------


def test_vsock_echo_from_host(linux: LinuxVm, figures: dict[str, object]) -> None:
    mount = linux.shell.check("mkdir -p /run/tools && "
                              f"mount -o ro {guest_disk(linux, 'tools')} /run/tools && echo ok")
    assert mount.endswith("ok")
    linux.shell.check(f"/run/tools/vsock_echo {VSOCK_PORT} > /dev/null 2>&1 &")
    started = time.monotonic()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as host:
        host.settimeout(COMMAND_TIMEOUT_S)
        for _ in range(50):
            try:
                host.connect(str(linux.vsock_path))
                break
            except OSError:
                time.sleep(0.1)
        host.sendall(f"CONNECT {VSOCK_PORT}\n".encode())
        assert host.recv(64).startswith(b"OK ")
        payload = os.urandom(3000)
        host.sendall(payload)
        echoed = b""
        while len(echoed) < len(payload):
            chunk = host.recv(4096)
            assert chunk, "the guest closed the vsock connection early"
            echoed += chunk
    figures["vsock_echo_s"] = round(time.monotonic() - started, 3)
    assert echoed == payload


def test_hwrng_reads_fresh_bytes(linux: LinuxVm) -> None:
    assert linux.shell.check("cat /sys/class/misc/hw_random/rng_current").startswith("virtio")
    first = linux.shell.check("head -c 64 /dev/hwrng | sha256sum")
    second = linux.shell.check("head -c 64 /dev/hwrng | sha256sum")
    assert first != second


def meminfo_kib(vm: LinuxVm, field: str) -> int:
    output = vm.shell.check(f"grep '^{field}:' /proc/meminfo")
    return int(output.split()[1])


def test_balloon_inflation_shrinks_guest_memory(linux: LinuxVm,
                                                figures: dict[str, object]) -> None:
    before = meminfo_kib(linux, "MemTotal")
    started = time.monotonic()
    status, body = linux.monitor.api.request("PATCH", "/balloon", {"amount_mib": BALLOON_MIB})
    assert status == 204, body
    expected_drop = BALLOON_MIB * 1024
    deadline = time.monotonic() + BALLOON_TIMEOUT_S
    after = before
    while time.monotonic() < deadline:
        after = meminfo_kib(linux, "MemTotal")
        if before - after >= expected_drop:
            break
        time.sleep(0.5)
    figures["balloon_inflate_s"] = round(time.monotonic() - started, 3)
    assert before - after >= expected_drop, f"MemTotal went from {before} to {after} KiB"
    status, stats = linux.monitor.api.get("/balloon/statistics")
    assert status == 200, stats
    assert stats["actual_mib"] == BALLOON_MIB
    status, body = linux.monitor.api.request("PATCH", "/balloon", {"amount_mib": 0})
    assert status == 204, body


def dd_rate(output: str) -> str:
    """Return the rate busybox dd reports ("... copied, 0.1 seconds, 160MB/s")."""
    match = re.search(r"seconds, ([\d.]+\s*[KMG]?B/s)", output)
    assert match, f"no rate in dd output: {output!r}"
    return match.group(1)


def test_block_dd_throughput(linux: LinuxVm, figures: dict[str, object]) -> None:
    device = guest_disk(linux, "scratch")
    write = linux.shell.check(
        f"dd if=/dev/urandom of={device} bs=1M count={DD_MIB} conv=fsync", timeout_s=300)
    read = linux.shell.check(
        f"echo 3 > /proc/sys/vm/drop_caches; dd if={device} of=/dev/null bs=1M", timeout_s=300)
    figures["dd_write_rate"] = dd_rate(write)
    figures["dd_read_rate"] = dd_rate(read)
    guest_sum = linux.shell.check(
        f"dd if={device} bs=1M count={DD_MIB} 2>/dev/null | md5sum").split()[0]
    with open(linux.scratch, "rb") as scratch:
        host_sum = hashlib.md5(scratch.read(DD_MIB << 20)).hexdigest()
    assert guest_sum == host_sum
    assert host_sum != hashlib.md5(bytes(DD_MIB << 20)).hexdigest(), "nothing was written"
