#!/usr/bin/env bash
# The main job: install what is needed, build the guest images (cached after the
# first run), and boot the default guest with its serial console on this terminal.
#
# On a host with hardware virtualisation the guest reaches a login prompt (root/root);
# log out with `reboot`. On a host whose KVM emulates guest supervisor code the kernel
# boots up to the hand-over to init, which cannot run there; the monitor says so and
# exits 0 when the guest resets.
set -euo pipefail
cd "$(dirname "$0")"

.ci/setup
paths=$(python3 -m images paths | tail -n 1)
workdir=$(mktemp -d /tmp/vmm-default-guest.XXXXXX)
python3 - "$paths" "$workdir" <<'PY'
import json, shutil, sys
paths, workdir = json.loads(sys.argv[1]), sys.argv[2]
rootfs = f"{workdir}/rootfs.ext4"
shutil.copyfile(paths["rootfs"], rootfs)
config = {
    "boot-source": {
        "kernel_image_path": paths["kernel"],
        "boot_args": "console=ttyS0 reboot=k panic=1 pci=off",
    },
    "drives": [{
        "drive_id": "rootfs", "path_on_host": rootfs,
        "is_root_device": True, "is_read_only": False,
    }],
    "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
}
with open(f"{workdir}/config.json", "w") as out:
    json.dump(config, out, indent=2)
PY
echo "VM configuration: $workdir/config.json" >&2
exec python3 -m vmm --no-api --boot-timer --config-file "$workdir/config.json" \
    --log-path /dev/stderr --level Info
