/* Polled virtio-blk driver (virtio 1.2, 5.2): one request in flight, descriptors 0-2. */
#include "drivers.h"

/* 5.2.4 Device configuration layout: capacity in 512-byte sectors at offset 0. */
#define BLK_CONFIG_CAPACITY 0
#define BLK_REQUEST_TIMEOUT_MS 10000

struct blk_request_header {
    uint32_t type;
    uint32_t reserved;
    uint64_t sector;
};

static struct blk_request_header header;
static volatile uint8_t status;

bool blk_init(struct virtio_device *device)
{
    uint64_t wanted = 1ull << VIRTIO_BLK_F_RO | 1ull << VIRTIO_BLK_F_FLUSH;
    if (!virtio_negotiate(device, wanted) || !virtio_setup_queue(device, 0))
        return false;
    virtio_driver_ok(device);
    return true;
}

uint64_t blk_capacity(struct virtio_device *device)
{
    uint32_t low = virtio_config_read32(device, BLK_CONFIG_CAPACITY);
    uint32_t high = virtio_config_read32(device, BLK_CONFIG_CAPACITY + 4);
    return (uint64_t)high << 32 | low;
}

bool blk_read_only(struct virtio_device *device)
{
    return device->features & (1ull << VIRTIO_BLK_F_RO);
}

const char *blk_status_name(int value)
{
    switch (value) {
    case VIRTIO_BLK_S_OK:
        return "ok";
    case VIRTIO_BLK_S_IOERR:
        return "ioerr";
    case VIRTIO_BLK_S_UNSUPP:
        return "unsupp";
    case REQUEST_TIMED_OUT:
        return "timeout";
    default:
        return "invalid";
    }
}

/*
 * Send one request (5.2.6): header, optional data (device-writable unless it is a write),
 * status byte. Return the status the device wrote, or REQUEST_TIMED_OUT.
 */
int blk_request(struct virtio_device *device, uint32_t type, uint64_t sector, void *data,
                uint32_t length)
{
    struct virtq *queue = &device->queues[0];
    struct vbuf buffers[3];
    int count = 0;
    header.type = type;
    header.reserved = 0;
    header.sector = sector;
    status = 0xff;
    buffers[count++] = (struct vbuf){&header, sizeof header, false};
    if (length)
        buffers[count++] = (struct vbuf){data, length, type != VIRTIO_BLK_T_OUT};
    buffers[count++] = (struct vbuf){(const void *)&status, 1, true};
    virtq_add(queue, 0, buffers, count);
    virtq_publish(queue, 0);
    virtq_notify(queue);
    uint32_t id;
    uint32_t used_length;
    /* NOTE: a request that times out stays in the ring, and the next request reuses its
     * descriptors, so the results of later requests on this device are unreliable. */
    if (virtq_wait_used(queue, &id, &used_length, BLK_REQUEST_TIMEOUT_MS) != WAIT_DONE)
        return REQUEST_TIMED_OUT;
    return status;
}
