/*
 * virtio-mmio version 2 transport (virtio 1.2, 4.2.3) and polled split virtqueues (2.7).
 *
 * Each queue takes one zeroed page: descriptor table at 0, available ring at 256, used ring
 * at 512, which meets the 16-, 2- and 4-byte alignments of 2.7. The driver sets
 * VIRTQ_AVAIL_F_NO_INTERRUPT and polls the used ring, so the device raises no interrupts
 * the probe would have to handle.
 */
#include "virtio.h"

#define QUEUE_AVAIL_OFFSET 256
#define QUEUE_USED_OFFSET 512
/* Poll the used ring at most this often between clock reads, to keep port I/O low. */
#define POLLS_PER_CLOCK_READ 64

static uint32_t reg_read(uint64_t base, uint32_t offset)
{
    return mmio_read32(base + offset);
}

static void reg_write(uint64_t base, uint32_t offset, uint32_t value)
{
    mmio_write32(base + offset, value);
}

const char *virtio_type_name(uint32_t device_id)
{
    switch (device_id) {
    case VIRTIO_ID_NET:
        return "net";
    case VIRTIO_ID_BLOCK:
        return "blk";
    case VIRTIO_ID_ENTROPY:
        return "rng";
    case VIRTIO_ID_BALLOON:
        return "balloon";
    case VIRTIO_ID_VSOCK:
        return "vsock";
    default:
        return "unknown";
    }
}

/* Check MagicValue and Version (4.2.3.1.1) and read DeviceID; 0 means no device here. */
bool virtio_probe_id(uint64_t base, uint32_t *device_id)
{
    if (reg_read(base, VIRTIO_MMIO_MAGIC_VALUE) != VIRTIO_MMIO_MAGIC)
        return false;
    if (reg_read(base, VIRTIO_MMIO_VERSION) != VIRTIO_MMIO_MODERN_VERSION)
        return false;
    *device_id = reg_read(base, VIRTIO_MMIO_DEVICE_ID);
    return *device_id != 0;
}

static uint64_t read_device_features(uint64_t base)
{
    reg_write(base, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    uint64_t features = (uint64_t)reg_read(base, VIRTIO_MMIO_DEVICE_FEATURES) << 32;
    reg_write(base, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    return features | reg_read(base, VIRTIO_MMIO_DEVICE_FEATURES);
}

/*
 * Run 3.1.1 steps 1-6: reset, ACKNOWLEDGE, DRIVER, accept the offered subset of `wanted`
 * plus VERSION_1, FEATURES_OK and its read-back. Set device->error when a step fails.
 */
bool virtio_negotiate(struct virtio_device *device, uint64_t wanted)
{
    uint64_t base = device->base;
    reg_write(base, VIRTIO_MMIO_STATUS, 0);
    reg_write(base, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE);
    reg_write(base, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER);
    uint64_t offered = read_device_features(base);
    if (!(offered & (1ull << VIRTIO_F_VERSION_1))) {
        device->error = "device does not offer VIRTIO_F_VERSION_1";
        reg_write(base, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_FAILED);
        return false;
    }
    uint64_t accepted = offered & (wanted | 1ull << VIRTIO_F_VERSION_1);
    reg_write(base, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    reg_write(base, VIRTIO_MMIO_DRIVER_FEATURES, (uint32_t)accepted);
    reg_write(base, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    reg_write(base, VIRTIO_MMIO_DRIVER_FEATURES, (uint32_t)(accepted >> 32));
    uint32_t status = VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER |
                      VIRTIO_STATUS_FEATURES_OK;
    reg_write(base, VIRTIO_MMIO_STATUS, status);
    if (!(reg_read(base, VIRTIO_MMIO_STATUS) & VIRTIO_STATUS_FEATURES_OK)) {
        device->error = "device rejected the features (FEATURES_OK not kept)";
        reg_write(base, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_FAILED);
        return false;
    }
    device->features = accepted;
    return true;
}

static void write_address(uint64_t base, uint32_t low_offset, const volatile void *address)
{
    uint64_t value = (uint64_t)address;
    reg_write(base, low_offset, (uint32_t)value);
    reg_write(base, low_offset + 4, (uint32_t)(value >> 32));
}

/* Set up queue `index` (4.2.3.2) with min(QueueNumMax, PROBE_QUEUE_SIZE) entries. */
bool virtio_setup_queue(struct virtio_device *device, int index)
{
    uint64_t base = device->base;
    struct virtq *queue = &device->queues[index];
    reg_write(base, VIRTIO_MMIO_QUEUE_SEL, (uint32_t)index);
    if (reg_read(base, VIRTIO_MMIO_QUEUE_READY)) {
        device->error = "queue already ready after reset";
        return false;
    }
    uint32_t maximum = reg_read(base, VIRTIO_MMIO_QUEUE_NUM_MAX);
    if (!maximum) {
        device->error = "queue not available (QueueNumMax 0)";
        return false;
    }
    uint8_t *page = page_alloc_zeroed();
    if (!page) {
        device->error = "out of memory for a virtqueue";
        return false;
    }
    queue->size = (uint16_t)(maximum < PROBE_QUEUE_SIZE ? maximum : PROBE_QUEUE_SIZE);
    queue->desc = (volatile struct virtq_desc *)page;
    queue->avail = (volatile struct virtq_avail *)(page + QUEUE_AVAIL_OFFSET);
    queue->used = (volatile struct virtq_used *)(page + QUEUE_USED_OFFSET);
    queue->avail->flags = VIRTQ_AVAIL_F_NO_INTERRUPT;
    queue->last_used = 0;
    queue->index = (uint16_t)index;
    queue->base = base;

    reg_write(base, VIRTIO_MMIO_QUEUE_NUM, queue->size);
    write_address(base, VIRTIO_MMIO_QUEUE_DESC_LOW, queue->desc);
    write_address(base, VIRTIO_MMIO_QUEUE_DRIVER_LOW, queue->avail);
    write_address(base, VIRTIO_MMIO_QUEUE_DEVICE_LOW, queue->used);
    reg_write(base, VIRTIO_MMIO_QUEUE_READY, 1);
    if (index + 1 > device->queue_count)
        device->queue_count = index + 1;
    return true;
}

void virtio_driver_ok(struct virtio_device *device)
{
    reg_write(device->base, VIRTIO_MMIO_STATUS,
              VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK |
                  VIRTIO_STATUS_DRIVER_OK);
    device->ready = true;
}

uint32_t virtio_config_read32(struct virtio_device *device, uint32_t offset)
{
    return reg_read(device->base, VIRTIO_MMIO_CONFIG + offset);
}

uint8_t virtio_config_read8(struct virtio_device *device, uint32_t offset)
{
    return mmio_read8(device->base + VIRTIO_MMIO_CONFIG + offset);
}

void virtio_config_write32(struct virtio_device *device, uint32_t offset, uint32_t value)
{
    reg_write(device->base, VIRTIO_MMIO_CONFIG + offset, value);
}

/* Write `count` buffers as a chain in descriptors head, head + 1, ... (caller owns them). */
void virtq_add(struct virtq *queue, uint16_t head, const struct vbuf *buffers, int count)
{
    for (int i = 0; i < count; i++) {
        volatile struct virtq_desc *desc = &queue->desc[head + i];
        desc->addr = (uint64_t)buffers[i].address;
        desc->len = buffers[i].length;
        desc->flags = (uint16_t)((buffers[i].writable ? VIRTQ_DESC_F_WRITE : 0) |
                                 (i + 1 < count ? VIRTQ_DESC_F_NEXT : 0));
        desc->next = (uint16_t)(i + 1 < count ? head + i + 1 : 0);
    }
}

/* Put chain `head` in the available ring; the descriptors are written first (2.7.13). */
void virtq_publish(struct virtq *queue, uint16_t head)
{
    uint16_t index = queue->avail->idx;
    queue->avail->ring[index % queue->size] = head;
    barrier();
    queue->avail->idx = (uint16_t)(index + 1);
    barrier();
}

void virtq_notify(struct virtq *queue)
{
    reg_write(queue->base, VIRTIO_MMIO_QUEUE_NOTIFY, queue->index);
}

bool virtq_pop_used(struct virtq *queue, uint32_t *id, uint32_t *length)
{
    barrier();
    if (queue->used->idx == queue->last_used)
        return false;
    barrier();
    volatile struct virtq_used_elem *element = &queue->used->ring[queue->last_used %
                                                                  queue->size];
    *id = element->id;
    *length = element->len;
    queue->last_used++;
    return true;
}

enum wait_result virtq_wait_used(struct virtq *queue, uint32_t *id, uint32_t *length,
                                 uint64_t timeout_ms)
{
    uint64_t start = clock_ms();
    for (;;) {
        for (int i = 0; i < POLLS_PER_CLOCK_READ; i++) {
            if (virtq_pop_used(queue, id, length))
                return WAIT_DONE;
        }
        if (clock_ms() - start >= timeout_ms)
            return WAIT_TIMEOUT;
    }
}
