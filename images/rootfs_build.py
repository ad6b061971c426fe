"""Build the guest root filesystem: an ext4 image of busybox-static and dropbear.

The file tree is assembled in a work directory and turned into an image with
`mkfs.ext4 -d`, so the build needs no loop device and no mount. Dropbear is dynamically
linked: it goes in with the shared libraries `ldd` lists, at the paths `ldd` prints.

The SSH host key and a client key pair are generated at build time. The client's private key
(OpenSSH format, which paramiko reads) and public key stay in the output directory beside
`rootfs.ext4`. The public key is root's only `authorized_keys` entry.
"""

import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import vmm.arch.x86_64.layout
from images import cache, host, rootfs_files

ROOTFS_SIZE: Final = "64M"
ROOTFS_LABEL: Final = "rootfs"
BUSYBOX_PATH: Final = Path("/bin/busybox")
DROPBEAR_PATH: Final = Path("/usr/sbin/dropbear")
ROOTFS_TOOLS: Final = (
    "busybox", "dropbear", "dropbearkey", "dropbearconvert", "ldd", "mkfs.ext4", "debugfs",
)
ROOTFS_PACKAGES: Final = ("busybox-static", "dropbear-bin", "e2fsprogs")
# Directories of the guest tree, created empty before anything is copied in.
GUEST_DIRECTORIES: Final = (
    "bin", "sbin", "usr/bin", "usr/sbin", "etc/init.d", "etc/dropbear", "dev", "proc",
    "sys", "run", "tmp", "var", "root/.ssh",
)
SSH_KEY_NAME: Final = "id_ed25519"
SSH_KEY_TYPE: Final = "ed25519"


@dataclass(frozen=True)
class RootfsImages:
    """Paths of one finished root filesystem build."""

    rootfs: Path
    ssh_key: Path
    ssh_public_key: Path


def dropbear_libraries() -> list[Path]:
    """Return the shared libraries `ldd` lists for dropbear, at the paths it prints."""
    libraries: list[Path] = []
    for line in host.run([host.find_tool("ldd"), str(DROPBEAR_PATH)]).splitlines():
        # "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)" or "/lib64/ld-... (0x...)";
        # linux-vdso has no file and is skipped.
        fields = line.split()
        candidates = [field for field in fields if field.startswith("/")]
        if candidates:
            libraries.append(Path(candidates[0]))
    if not libraries:
        raise host.ImageError(f"ldd listed no shared libraries for {DROPBEAR_PATH}")
    return libraries


def rootfs_inputs() -> tuple[list[Path], dict[str, str]]:
    """Return the files and the package versions the root filesystem depends on."""
    host.require_tools(ROOTFS_TOOLS)
    library_packages = {host.package_owning(library) for library in dropbear_libraries()}
    versions = host.package_versions(set(ROOTFS_PACKAGES) | library_packages)
    # The helper modules images.host and images.cache do not change the output.
    files = [Path(__file__), Path(rootfs_files.__file__), Path(vmm.arch.x86_64.layout.__file__)]
    return files, {f"package {name}": version for name, version in versions.items()}


def build_rootfs() -> RootfsImages:
    """Return the cached root filesystem for the current inputs, building it if missing."""
    files, settings = rootfs_inputs()
    output = cache.cached_build("rootfs", cache.input_key(files, settings), _build_into)
    return RootfsImages(
        output / "rootfs.ext4", output / SSH_KEY_NAME, output / f"{SSH_KEY_NAME}.pub"
    )


def _build_into(output: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="work-", dir=output) as work:
        tree = Path(work) / "tree"
        host.progress("rootfs: assembling busybox, dropbear and /etc")
        for directory in GUEST_DIRECTORIES:
            (tree / directory).mkdir(parents=True, exist_ok=True)
        (tree / "var/run").symlink_to("../run")
        _install_busybox(tree)
        _install_dropbear(tree)
        _write_etc(tree)
        _make_keys(tree, Path(work), output)
        image = output / "rootfs.ext4"
        host.progress(f"rootfs: mkfs.ext4 -d ({ROOTFS_SIZE})")
        host.run([host.find_tool("mkfs.ext4"), "-q", "-F", "-L", ROOTFS_LABEL,
                  "-E", "root_owner=0:0", "-d", str(tree), str(image), ROOTFS_SIZE])
        _set_root_ownership(image, tree, Path(work))


def _install_busybox(tree: Path) -> None:
    shutil.copy2(BUSYBOX_PATH, tree / "bin/busybox")
    applets = host.run([str(BUSYBOX_PATH), "--list-full"]).split()
    for applet in applets:
        link = tree / applet
        if link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/bin/busybox")


def _install_dropbear(tree: Path) -> None:
    shutil.copy2(DROPBEAR_PATH, tree / DROPBEAR_PATH.relative_to("/"))
    for library in dropbear_libraries():
        target = tree / library.relative_to("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        # copy2 follows the symlink ldd printed, so the guest gets the file itself.
        shutil.copy2(library, target)


def _write_etc(tree: Path) -> None:
    salt = secrets.token_hex(8)
    files: dict[str, tuple[str, int]] = {
        "etc/inittab": (rootfs_files.inittab(), 0o644),
        rootfs_files.SYSINIT_SCRIPT.lstrip("/"): (rootfs_files.sysinit_script(), 0o755),
        "etc/passwd": (rootfs_files.passwd(), 0o644),
        "etc/shadow": (rootfs_files.shadow(
            rootfs_files.sha512_crypt(rootfs_files.ROOT_PASSWORD, salt)), 0o600),
        "etc/group": (rootfs_files.group(), 0o644),
        "etc/shells": (rootfs_files.shells(), 0o644),
        "etc/hosts": (rootfs_files.hosts(), 0o644),
        "etc/hostname": (f"{rootfs_files.HOSTNAME}\n", 0o644),
        "etc/profile": (rootfs_files.profile(), 0o644),
    }
    for relative, (text, mode) in files.items():
        path = tree / relative
        path.write_text(text)
        path.chmod(mode)
    (tree / "root").chmod(0o700)


def _make_keys(tree: Path, work: Path, output: Path) -> None:
    host.progress(f"rootfs: generating {SSH_KEY_TYPE} host and client keys")
    dropbearkey = host.find_tool("dropbearkey")
    host_key = tree / rootfs_files.DROPBEAR_HOST_KEY.lstrip("/")
    host.run([dropbearkey, "-t", SSH_KEY_TYPE, "-f", str(host_key)])

    client_key = work / "client_key.dropbear"
    host.run([dropbearkey, "-t", SSH_KEY_TYPE, "-f", str(client_key)])
    listing = host.run([dropbearkey, "-y", "-f", str(client_key)])
    public_lines = [line for line in listing.splitlines() if line.startswith("ssh-")]
    if len(public_lines) != 1:
        raise host.ImageError(f"no public key line in `dropbearkey -y` output:\n{listing}")
    public_key = public_lines[0] + "\n"

    private_key = output / SSH_KEY_NAME
    host.run([host.find_tool("dropbearconvert"), "dropbear", "openssh",
              str(client_key), str(private_key)])
    private_key.chmod(0o600)
    (output / f"{SSH_KEY_NAME}.pub").write_text(public_key)
    authorized_keys = tree / "root/.ssh/authorized_keys"
    authorized_keys.write_text(public_key)
    authorized_keys.chmod(0o600)
    (tree / "root/.ssh").chmod(0o700)


def _set_root_ownership(image: Path, tree: Path, work: Path) -> None:
    # mkfs.ext4 -d copies each file's owner, which is the builder's user. Dropbear rejects
    # an authorized_keys owned by another user, so every inode is set to root:root.
    commands = ["sif / uid 0", "sif / gid 0"]
    for path in sorted(tree.rglob("*")):
        guest_path = "/" + str(path.relative_to(tree))
        commands += [f'sif "{guest_path}" uid 0', f'sif "{guest_path}" gid 0']
    command_file = work / "debugfs-commands"
    command_file.write_text("\n".join(commands) + "\n")
    result = subprocess.run(
        [host.find_tool("debugfs"), "-w", "-f", str(command_file), str(image)],
        capture_output=True, text=True, check=False,
    )
    # debugfs exits 0 even when a command fails; it reports failures on stderr after its
    # version banner ("debugfs 1.47.0 (5-Feb-2023)").
    problems = [line for line in result.stderr.splitlines() if not line.startswith("debugfs ")]
    if result.returncode != 0 or problems:
        raise host.ImageError(
            f"debugfs could not set root ownership in {image} "
            f"(exit status {result.returncode}):\n" + "\n".join(problems)
        )
