"""Tests of the guest image builders: pure parts first, one full build (marked boot) last."""

import fcntl
import shutil
import subprocess
from pathlib import Path

import pytest

from images import cache, host, kconfig, kernel_build, rootfs_files
from vmm.arch.x86_64.layout import BOOT_TIMER_ADDRESS

FRAGMENT_TEXT = kernel_build.FRAGMENT_PATH.read_text()
FRAGMENT = kconfig.parse_config(FRAGMENT_TEXT)

needs_dpkg = pytest.mark.skipif(
    shutil.which("dpkg-query") is None, reason="needs dpkg-query (a Debian host)"
)

# Settings the guest needs, as the fragment must state them.
REQUIRED_SETTINGS: dict[str, str] = {
    "CONFIG_64BIT": "y",
    "CONFIG_SMP": "y",
    "CONFIG_NR_CPUS": "32",
    "CONFIG_SERIAL_8250": "y",
    "CONFIG_SERIAL_8250_CONSOLE": "y",
    "CONFIG_PRINTK": "y",
    "CONFIG_BLK_DEV_INITRD": "y",
    "CONFIG_BINFMT_ELF": "y",
    "CONFIG_BINFMT_SCRIPT": "y",
    "CONFIG_PROC_FS": "y",
    "CONFIG_SYSFS": "y",
    "CONFIG_DEVTMPFS": "y",
    "CONFIG_DEVTMPFS_MOUNT": "y",
    "CONFIG_DEVMEM": "y",
    "CONFIG_ACPI": "y",
    "CONFIG_PCI": "y",
    "CONFIG_VIRTIO_MMIO": "y",
    "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES": "y",
    "CONFIG_VIRTIO_BLK": "y",
    "CONFIG_VIRTIO_NET": "y",
    "CONFIG_VSOCKETS": "y",
    "CONFIG_VIRTIO_VSOCKETS": "y",
    "CONFIG_VIRTIO_BALLOON": "y",
    "CONFIG_HW_RANDOM_VIRTIO": "y",
    "CONFIG_EXT4_FS": "y",
    "CONFIG_UNIX": "y",
    "CONFIG_INET": "y",
    "CONFIG_PACKET": "y",
    "CONFIG_SERIO_I8042": "y",
    "CONFIG_KEYBOARD_ATKBD": "y",
    "CONFIG_KVM_GUEST": "y",
    "CONFIG_PARAVIRT": "y",
    "CONFIG_HZ_100": "y",
    "CONFIG_HZ": "100",
    "CONFIG_NO_HZ_IDLE": "y",
    "CONFIG_CRYPTO_MANAGER_DISABLE_TESTS": "y",
}

# Options that must be off: modules, 32-bit compatibility, KASLR, and the boot-time costs
# of speculation mitigations, jitter entropy and the KVM PTP clock.
FORBIDDEN_OPTIONS: tuple[str, ...] = (
    "CONFIG_MODULES",
    "CONFIG_IA32_EMULATION",
    "CONFIG_RANDOMIZE_BASE",
    "CONFIG_CPU_MITIGATIONS",
    "CONFIG_SPECULATION_MITIGATIONS",
    "CONFIG_RETPOLINE",
    "CONFIG_RETHUNK",
    "CONFIG_PAGE_TABLE_ISOLATION",
    "CONFIG_CPU_UNRET_ENTRY",
    "CONFIG_CPU_IBPB_ENTRY",
    "CONFIG_CPU_IBRS_ENTRY",
    "CONFIG_SLS",
    "CONFIG_CRYPTO_JITTERENTROPY",
    "CONFIG_PTP_1588_CLOCK_KVM",
)


@pytest.mark.parametrize("symbol", sorted(REQUIRED_SETTINGS))
def test_fragment_sets_required_option(symbol: str) -> None:
    assert FRAGMENT.get(symbol) == REQUIRED_SETTINGS[symbol]


@pytest.mark.parametrize("symbol", FORBIDDEN_OPTIONS)
def test_fragment_disables_forbidden_option(symbol: str) -> None:
    assert symbol in FRAGMENT
    assert FRAGMENT[symbol] is None


def test_fragment_sets_each_symbol_once() -> None:
    setting_lines = [
        line for line in FRAGMENT_TEXT.splitlines() if line.startswith(("CONFIG_", "# CONFIG_"))
    ]
    assert len(setting_lines) == len(FRAGMENT)


def test_parse_config_reads_values_and_unset() -> None:
    text = 'CONFIG_A=y\n# CONFIG_B is not set\n# comment\n\nCONFIG_C="x y"\n'
    settings = kconfig.parse_config(text)
    assert settings == {"CONFIG_A": "y", "CONFIG_B": None, "CONFIG_C": '"x y"'}


def test_parse_config_rejects_garbage_line() -> None:
    with pytest.raises(ValueError, match="line 2"):
        kconfig.parse_config("CONFIG_A=y\nA=y\n")


def test_merge_config_replaces_base_settings() -> None:
    base = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_KEEP=m\n"
    merged = kconfig.merge_config(base, {"CONFIG_A": None, "CONFIG_B": "y"})
    expected = {"CONFIG_A": None, "CONFIG_B": "y", "CONFIG_KEEP": "m"}
    assert kconfig.parse_config(merged) == expected
    assert merged.count("CONFIG_A") == 1


def test_unmet_settings_lists_dropped_and_changed() -> None:
    fragment = {"CONFIG_A": "y", "CONFIG_B": "y", "CONFIG_C": None, "CONFIG_D": None}
    final = "CONFIG_A=y\nCONFIG_B=n\nCONFIG_C=y\n"
    unmet = kconfig.unmet_settings(fragment, final)
    assert unmet == [
        "CONFIG_B=y requested but is n",
        "CONFIG_C should be unset but is y",
    ]


def test_unmet_settings_reports_missing_symbol() -> None:
    unmet = kconfig.unmet_settings({"CONFIG_A": "y"}, "")
    assert unmet == ["CONFIG_A=y requested but is unset"]


def test_input_key_changes_with_fragment(tmp_path: Path) -> None:
    fragment = tmp_path / "microvm.config"
    fragment.write_text(FRAGMENT_TEXT)
    settings = {"package linux-source-6.1": "6.1.0"}
    before = cache.input_key([fragment], settings)
    assert cache.input_key([fragment], settings) == before
    fragment.write_text(FRAGMENT_TEXT + "CONFIG_EXTRA=y\n")
    assert cache.input_key([fragment], settings) != before


def test_input_key_changes_with_package_version(tmp_path: Path) -> None:
    fragment = tmp_path / "microvm.config"
    fragment.write_text(FRAGMENT_TEXT)
    old = cache.input_key([fragment], {"package busybox-static": "1:1.35.0-4"})
    new = cache.input_key([fragment], {"package busybox-static": "1:1.36.1-1"})
    assert old != new


@pytest.mark.skipif(
    not kernel_build.SOURCE_TARBALL.is_file(), reason="needs linux-source-6.1 installed"
)
def test_kernel_inputs_include_fragment() -> None:
    files, settings = kernel_build.kernel_inputs()
    assert kernel_build.FRAGMENT_PATH in files
    assert "package linux-source-6.1" in settings


def test_cached_build_discards_failed_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(cache.CACHE_ENVIRONMENT_VARIABLE, str(tmp_path))

    def failing_build(output: Path) -> None:
        (output / "half-written").write_text("partial")
        raise RuntimeError("build step failed")

    with pytest.raises(RuntimeError, match="build step failed"):
        cache.cached_build("thing", "0123", failing_build)
    assert [path.name for path in tmp_path.iterdir() if not path.name.endswith(".lock")] == []


def test_cached_build_builds_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(cache.CACHE_ENVIRONMENT_VARIABLE, str(tmp_path))
    calls: list[Path] = []

    def build(output: Path) -> None:
        calls.append(output)
        (output / "result").write_text("done")

    first = cache.cached_build("thing", "0123", build)
    second = cache.cached_build("thing", "0123", build)
    assert first == second == tmp_path / "thing-0123"
    assert (first / "result").read_text() == "done"
    assert len(calls) == 1


def test_cached_build_removes_abandoned_partials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(cache.CACHE_ENVIRONMENT_VARIABLE, str(tmp_path))
    same_key = tmp_path / ".thing-0123.partial-999999"
    other_key = tmp_path / ".other-4567.partial-999998"
    for partial in (same_key, other_key):
        (partial / "work").mkdir(parents=True)

    cache.cached_build("thing", "0123", lambda output: None)
    assert not same_key.exists()
    assert not other_key.exists()
    assert (tmp_path / "thing-0123").is_dir()


def test_abandoned_cleanup_spares_running_build(tmp_path: Path) -> None:
    running = tmp_path / ".other-4567.partial-1"
    running.mkdir()
    with open(tmp_path / ".other-4567.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cache.remove_abandoned_builds(tmp_path, held="thing-0123")
    assert running.is_dir()


def test_missing_tool_names_apt_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(host.TOOL_PACKAGES, "no-such-tool-for-images", "fake-package")
    with pytest.raises(host.ImageError) as raised:
        host.require_tools(["sh", "no-such-tool-for-images"])
    message = str(raised.value)
    assert "no-such-tool-for-images" in message
    assert "apt-get install fake-package" in message
    assert "sh," not in message


@needs_dpkg
def test_missing_package_names_apt_package() -> None:
    with pytest.raises(host.ImageError, match="apt-get install no-such-package-for-images"):
        host.package_versions(["dpkg", "no-such-package-for-images"])


@needs_dpkg
def test_package_versions_reads_dpkg() -> None:
    versions = host.package_versions(["dpkg"])
    assert list(versions) == ["dpkg"]
    assert versions["dpkg"][0].isdigit()


def test_sha512_crypt_matches_known_hash() -> None:
    # Computed with `openssl passwd -6 -salt abcdefgh root` (OpenSSL 3.0).
    expected = (
        "$6$abcdefgh$cnW4XDznaFa1hR9LnqrjoiAqed87oTXop3rUraOEgMC9xZ8cZ4bnv81B/PgWNFtDN0PN"
        "btGZlCIhm8Jws2OPr0"
    )
    assert rootfs_files.sha512_crypt("root", "abcdefgh") == expected


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
@pytest.mark.parametrize(
    ("password", "salt"), [("root", "s"), ("x" * 130, "saltsaltsaltsalt"), ("pässwort", "abc")]
)
def test_sha512_crypt_agrees_with_openssl(password: str, salt: str) -> None:
    openssl = subprocess.run(
        ["openssl", "passwd", "-6", "-salt", salt, password],
        capture_output=True, text=True, check=True,
    )
    assert rootfs_files.sha512_crypt(password, salt) == openssl.stdout.strip()


def test_sha512_crypt_truncates_long_salt() -> None:
    hashed = rootfs_files.sha512_crypt("root", "0123456789abcdefXYZ")
    assert hashed.startswith("$6$0123456789abcdef$")


def test_sha512_crypt_rejects_dollar_in_salt() -> None:
    with pytest.raises(ValueError, match="salt"):
        rootfs_files.sha512_crypt("root", "a$b")


def test_inittab_runs_sysinit_getty_and_ctrlaltdel() -> None:
    lines = rootfs_files.inittab().splitlines()
    assert "::sysinit:/etc/init.d/rcS" in lines
    assert "ttyS0::respawn:/sbin/getty -L 115200 ttyS0 vt100" in lines
    assert "::ctrlaltdel:/sbin/reboot" in lines
    for line in lines:
        assert len(line.split(":", 3)) == 4, line


def test_sysinit_mounts_and_starts_services() -> None:
    script = rootfs_files.sysinit_script()
    assert script.startswith("#!/bin/sh\n")
    for needed in ("-t proc", "-t sysfs", "-t devtmpfs", "-t devpts", "ip link set lo up"):
        assert needed in script
    assert f"devmem {BOOT_TIMER_ADDRESS:#x} 8 123" in script
    assert f"dropbear -r {rootfs_files.DROPBEAR_HOST_KEY}" in script


def test_passwd_and_shadow_describe_root() -> None:
    assert rootfs_files.passwd().split(":")[:4] == ["root", "x", "0", "0"]
    hashed = rootfs_files.sha512_crypt(rootfs_files.ROOT_PASSWORD, "salt1234")
    fields = rootfs_files.shadow(hashed).rstrip("\n").split(":")
    assert fields[0] == "root"
    assert fields[1] == hashed
    assert len(fields) == 9


def test_shells_lists_root_shell() -> None:
    root_shell = rootfs_files.passwd().rstrip("\n").split(":")[6]
    assert root_shell in rootfs_files.shells().splitlines()


def boot_tests_selected(config: pytest.Config) -> bool:
    """Tell whether the run selected boot tests by name (`-m boot` or `-k boot`)."""
    expressions = f"{config.getoption('markexpr', '')} {config.getoption('keyword', '')}"
    return "boot" in expressions and "not boot" not in expressions


@pytest.mark.boot
def test_build_paths_produces_images(request: pytest.FixtureRequest) -> None:
    # The first build of the kernel takes minutes, too long for a plain unit test run.
    if not boot_tests_selected(request.config):
        pytest.skip("builds the guest kernel (minutes); select it with -m boot or -k boot")
    import images

    paths = images.build_paths()
    assert set(paths) == {"kernel", "bzimage", "rootfs", "ssh_key"}
    for name, path in paths.items():
        assert Path(path).is_file(), f"{name} image {path} is missing"
    header = Path(paths["kernel"]).read_bytes()[:20]
    assert header[:4] == b"\x7fELF"
    assert header[4] == 2, "EI_CLASS is not ELFCLASS64"
    assert header[5] == 1, "EI_DATA is not little-endian"
    assert int.from_bytes(header[18:20], "little") == 62, "e_machine is not EM_X86_64"
    assert Path(paths["ssh_key"]).read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
