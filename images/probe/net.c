/*
 * Polled virtio-net driver (virtio 1.2, 5.1) without offloads: receiveq 0 has one 2 KiB
 * device-writable buffer per descriptor; transmitq 1 sends one frame at a time. With
 * VIRTIO_F_VERSION_1 every packet starts with the 12-byte struct virtio_net_hdr (5.1.6).
 */
#include "drivers.h"

#define NET_RECEIVE_QUEUE 0
#define NET_TRANSMIT_QUEUE 1
#define NET_HEADER_SIZE 12
/* 5.1.6.3.1: without mergeable buffers or offloads, a buffer fits a header and 1514 bytes. */
#define NET_BUFFER_SIZE 2048
#define NET_CONFIG_MAC 0
#define NET_SEND_TIMEOUT_MS 5000
#define NET_POLL_BATCH 64

struct net_driver {
    uint8_t *receive_buffers[PROBE_QUEUE_SIZE];
    uint8_t transmit_buffer[NET_HEADER_SIZE + NET_MAX_FRAME];
};

static struct net_driver net_drivers[2];
static int net_driver_count;

static void post_receive_buffer(struct virtio_device *device, uint16_t id)
{
    struct net_driver *driver = device->driver;
    struct virtq *queue = &device->queues[NET_RECEIVE_QUEUE];
    struct vbuf buffer = {driver->receive_buffers[id], NET_BUFFER_SIZE, true};
    virtq_add(queue, id, &buffer, 1);
    virtq_publish(queue, id);
}

bool net_init(struct virtio_device *device)
{
    if (net_driver_count == (int)(sizeof net_drivers / sizeof net_drivers[0])) {
        device->error = "too many network devices for the probe";
        return false;
    }
    struct net_driver *driver = &net_drivers[net_driver_count];
    if (!virtio_negotiate(device, 1ull << VIRTIO_NET_F_MAC) ||
        !virtio_setup_queue(device, NET_RECEIVE_QUEUE) ||
        !virtio_setup_queue(device, NET_TRANSMIT_QUEUE))
        return false;
    struct virtq *receive = &device->queues[NET_RECEIVE_QUEUE];
    for (uint16_t id = 0; id < receive->size; id += 2) {
        uint8_t *page = page_alloc();
        if (!page) {
            device->error = "out of memory for receive buffers";
            return false;
        }
        driver->receive_buffers[id] = page;
        driver->receive_buffers[id + 1] = page + NET_BUFFER_SIZE;
    }
    net_driver_count++;
    device->driver = driver;
    for (uint16_t id = 0; id < receive->size; id++)
        post_receive_buffer(device, id);
    virtio_driver_ok(device);
    virtq_notify(receive);
    return true;
}

bool net_mac(struct virtio_device *device, uint8_t mac[6])
{
    if (!(device->features & (1ull << VIRTIO_NET_F_MAC)))
        return false;
    for (uint32_t i = 0; i < 6; i++)
        mac[i] = virtio_config_read8(device, NET_CONFIG_MAC + i);
    return true;
}

/* Send one frame with a zeroed header; return 0, or REQUEST_TIMED_OUT. */
int net_send(struct virtio_device *device, const uint8_t *frame, uint32_t length)
{
    struct net_driver *driver = device->driver;
    struct virtq *queue = &device->queues[NET_TRANSMIT_QUEUE];
    memset(driver->transmit_buffer, 0, NET_HEADER_SIZE);
    memcpy(driver->transmit_buffer + NET_HEADER_SIZE, frame, length);
    struct vbuf buffer = {driver->transmit_buffer, NET_HEADER_SIZE + length, false};
    virtq_add(queue, 0, &buffer, 1);
    virtq_publish(queue, 0);
    virtq_notify(queue);
    uint32_t id;
    uint32_t used_length;
    if (virtq_wait_used(queue, &id, &used_length, NET_SEND_TIMEOUT_MS) != WAIT_DONE)
        return REQUEST_TIMED_OUT;
    return 0;
}

/* Copy one received frame (without its header) into `frame`; return its length or -1. */
int net_recv(struct virtio_device *device, uint8_t *frame, uint32_t size, uint64_t timeout_ms)
{
    struct net_driver *driver = device->driver;
    struct virtq *queue = &device->queues[NET_RECEIVE_QUEUE];
    uint32_t id;
    uint32_t length;
    if (virtq_wait_used(queue, &id, &length, timeout_ms) != WAIT_DONE)
        return -1;
    if (id >= queue->size || length < NET_HEADER_SIZE)
        return -1;
    uint32_t frame_length = length - NET_HEADER_SIZE;
    if (frame_length > size)
        frame_length = size;
    memcpy(frame, driver->receive_buffers[id] + NET_HEADER_SIZE, frame_length);
    post_receive_buffer(device, (uint16_t)id);
    virtq_notify(queue);
    return (int)frame_length;
}
