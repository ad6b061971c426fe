/* virtio-mmio version 2 transport and split virtqueues, from the virtio 1.2 specification. */
#ifndef VIRTIO_H
#define VIRTIO_H

#include "probe.h"

/* 4.2.2 MMIO Device Register Layout: offsets from the device's base address. */
#define VIRTIO_MMIO_MAGIC_VALUE 0x000
#define VIRTIO_MMIO_VERSION 0x004
#define VIRTIO_MMIO_DEVICE_ID 0x008
#define VIRTIO_MMIO_DEVICE_FEATURES 0x010
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL 0x014
#define VIRTIO_MMIO_DRIVER_FEATURES 0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL 0x024
#define VIRTIO_MMIO_QUEUE_SEL 0x030
#define VIRTIO_MMIO_QUEUE_NUM_MAX 0x034
#define VIRTIO_MMIO_QUEUE_NUM 0x038
#define VIRTIO_MMIO_QUEUE_READY 0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY 0x050
#define VIRTIO_MMIO_INTERRUPT_STATUS 0x060
#define VIRTIO_MMIO_INTERRUPT_ACK 0x064
#define VIRTIO_MMIO_STATUS 0x070
#define VIRTIO_MMIO_QUEUE_DESC_LOW 0x080
#define VIRTIO_MMIO_QUEUE_DESC_HIGH 0x084
#define VIRTIO_MMIO_QUEUE_DRIVER_LOW 0x090
#define VIRTIO_MMIO_QUEUE_DRIVER_HIGH 0x094
#define VIRTIO_MMIO_QUEUE_DEVICE_LOW 0x0a0
#define VIRTIO_MMIO_QUEUE_DEVICE_HIGH 0x0a4
#define VIRTIO_MMIO_CONFIG_GENERATION 0x0fc
#define VIRTIO_MMIO_CONFIG 0x100
/* MagicValue reads "virt" as a little-endian 32-bit value. */
#define VIRTIO_MMIO_MAGIC 0x74726976u
#define VIRTIO_MMIO_MODERN_VERSION 2u

/* 2.1 Device Status Field. */
#define VIRTIO_STATUS_ACKNOWLEDGE 1u
#define VIRTIO_STATUS_DRIVER 2u
#define VIRTIO_STATUS_DRIVER_OK 4u
#define VIRTIO_STATUS_FEATURES_OK 8u
#define VIRTIO_STATUS_NEEDS_RESET 64u
#define VIRTIO_STATUS_FAILED 128u

/* 6 Reserved Feature Bits. */
#define VIRTIO_F_VERSION_1 32

/* 5 Device Types. */
#define VIRTIO_ID_NET 1u
#define VIRTIO_ID_BLOCK 2u
#define VIRTIO_ID_ENTROPY 4u
#define VIRTIO_ID_BALLOON 5u
#define VIRTIO_ID_VSOCK 19u

/* 2.7.5 The Virtqueue Descriptor Table. */
#define VIRTQ_DESC_F_NEXT 1u
#define VIRTQ_DESC_F_WRITE 2u
/* 2.7.6 The Virtqueue Available Ring. */
#define VIRTQ_AVAIL_F_NO_INTERRUPT 1u

/* Queue size the probe uses: small rings keep set-up and zeroing cheap. */
#define PROBE_QUEUE_SIZE 16u
#define MAX_QUEUES 3

struct virtq_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct virtq_avail {
    uint16_t flags;
    uint16_t idx;
    uint16_t ring[PROBE_QUEUE_SIZE];
};

struct virtq_used_elem {
    uint32_t id;
    uint32_t len;
};

struct virtq_used {
    uint16_t flags;
    uint16_t idx;
    struct virtq_used_elem ring[PROBE_QUEUE_SIZE];
};

struct virtq {
    volatile struct virtq_desc *desc;
    volatile struct virtq_avail *avail;
    volatile struct virtq_used *used;
    uint16_t size;
    uint16_t last_used;
    uint16_t index;
    uint64_t base;
};

/* One buffer of a descriptor chain: guest-physical address, length, device-writable. */
struct vbuf {
    const void *address;
    uint32_t length;
    bool writable;
};

/* Outcome of waiting for the device to use a chain. */
enum wait_result { WAIT_DONE = 0, WAIT_TIMEOUT = 1 };

struct virtio_device {
    uint64_t base;
    uint32_t irq;
    uint32_t device_id;
    uint64_t features;
    bool ready;
    bool in_cmdline;
    bool in_acpi;
    bool irq_mismatch;
    const char *error;
    int type_index;
    struct virtq queues[MAX_QUEUES];
    int queue_count;
    void *driver;
};

bool virtio_probe_id(uint64_t base, uint32_t *device_id);
bool virtio_negotiate(struct virtio_device *device, uint64_t wanted);
bool virtio_setup_queue(struct virtio_device *device, int index);
void virtio_driver_ok(struct virtio_device *device);
uint32_t virtio_config_read32(struct virtio_device *device, uint32_t offset);
uint8_t virtio_config_read8(struct virtio_device *device, uint32_t offset);
void virtio_config_write32(struct virtio_device *device, uint32_t offset, uint32_t value);
void virtq_add(struct virtq *queue, uint16_t head, const struct vbuf *buffers, int count);
void virtq_publish(struct virtq *queue, uint16_t head);
void virtq_notify(struct virtq *queue);
bool virtq_pop_used(struct virtq *queue, uint32_t *id, uint32_t *length);
enum wait_result virtq_wait_used(struct virtq *queue, uint32_t *id, uint32_t *length,
                                 uint64_t timeout_ms);
const char *virtio_type_name(uint32_t device_id);

/* Drivers: each initialises a device after negotiation and owns its queues. */
bool blk_init(struct virtio_device *device);
bool net_init(struct virtio_device *device);
bool vsock_init(struct virtio_device *device);
bool rng_init(struct virtio_device *device);
bool balloon_init(struct virtio_device *device);

/* Registry of the devices found at boot (main.c). */
int device_count(void);
struct virtio_device *device_at(int index);
struct virtio_device *device_of_type(uint32_t device_id, int type_index);

#endif
