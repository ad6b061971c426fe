/*
 * probe_main: read the zero page, find the virtio-mmio devices by the command line and by
 * ACPI, start a driver for each, signal the boot timer and run the login shell.
 */
#include "drivers.h"

/* Boot-timer device: a one-byte write of 123 at its base records the guest's boot time. */
#define BOOT_TIMER_ADDRESS 0xc0000000ull
#define BOOT_TIMER_MAGIC 123

static struct discovery discovery;
static struct virtio_device devices[MAX_DEVICES];
static int devices_found;

const struct discovery *probe_discovery(void)
{
    return &discovery;
}

int device_count(void)
{
    return devices_found;
}

struct virtio_device *device_at(int index)
{
    return index >= 0 && index < devices_found ? &devices[index] : NULL;
}

struct virtio_device *device_of_type(uint32_t device_id, int type_index)
{
    for (int i = 0; i < devices_found; i++) {
        if (devices[i].device_id == device_id && devices[i].type_index == type_index)
            return &devices[i];
    }
    return NULL;
}

static struct virtio_device *find_or_add(uint64_t base)
{
    for (int i = 0; i < devices_found; i++) {
        if (devices[i].base == base)
            return &devices[i];
    }
    if (devices_found == MAX_DEVICES)
        return NULL;
    struct virtio_device *device = &devices[devices_found++];
    device->base = base;
    return device;
}

/* Merge both lists by MMIO base; flag a device whose IRQ differs between them. */
static void merge_discovery(void)
{
    for (int i = 0; i < discovery.cmdline_count; i++) {
        struct virtio_device *device = find_or_add(discovery.cmdline[i].base);
        if (device) {
            device->in_cmdline = true;
            device->irq = discovery.cmdline[i].irq;
        }
    }
    for (int i = 0; i < discovery.acpi_count; i++) {
        struct virtio_device *device = find_or_add(discovery.acpi[i].base);
        if (!device)
            continue;
        if (device->in_cmdline && device->irq != discovery.acpi[i].irq)
            device->irq_mismatch = true;
        if (!device->in_cmdline)
            device->irq = discovery.acpi[i].irq;
        device->in_acpi = true;
    }
}

static bool start_driver(struct virtio_device *device)
{
    switch (device->device_id) {
    case VIRTIO_ID_BLOCK:
        return blk_init(device);
    case VIRTIO_ID_NET:
        return net_init(device);
    case VIRTIO_ID_VSOCK:
        return vsock_init(device);
    case VIRTIO_ID_ENTROPY:
        return rng_init(device);
    case VIRTIO_ID_BALLOON:
        return balloon_init(device);
    default:
        device->error = "no driver for this device type";
        return false;
    }
}

static void start_drivers(void)
{
    int per_type[32] = {0};
    for (int i = 0; i < devices_found; i++) {
        struct virtio_device *device = &devices[i];
        if (!virtio_probe_id(device->base, &device->device_id)) {
            device->error = "no virtio-mmio version 2 device at this address";
            continue;
        }
        device->type_index = device->device_id < 32 ? per_type[device->device_id]++ : 0;
        if (!start_driver(device))
            kprintf("probe: %s%d at 0x%lx: %s\n", virtio_type_name(device->device_id),
                    device->type_index, device->base, device->error);
    }
}

void probe_main(uint64_t zero_page)
{
    struct boot_info info;
    console_init();
    clock_init();
    kprintf("\n%s: booting\n", PROBE_VERSION);
    boot_info_read(zero_page, &info);
    discover_cmdline(info.cmdline, &discovery);
    discover_acpi(info.rsdp_hint, &discovery);
    merge_discovery();
    start_drivers();
    kprintf("probe: %d devices, %lu free pages\n", devices_found, pages_free());
    mmio_write8(BOOT_TIMER_ADDRESS, BOOT_TIMER_MAGIC);
    shell_run();
}
