/* Polled entropy (virtio 1.2, 5.4) and traditional memory balloon (5.5) drivers. */
#include "drivers.h"

#define RNG_TIMEOUT_MS 5000
#define BALLOON_INFLATE_QUEUE 0
#define BALLOON_DEFLATE_QUEUE 1
/* 5.5.3 Feature bits and 5.5.4 configuration: num_pages (target) and actual, in 4 KiB pages. */
#define VIRTIO_BALLOON_F_MUST_TELL_HOST 0
#define BALLOON_CONFIG_NUM_PAGES 0
#define BALLOON_CONFIG_ACTUAL 4
#define BALLOON_PFN_SHIFT 12
#define BALLOON_TIMEOUT_MS 10000
/* PFNs sent per request: one page of 32-bit page frame numbers. */
#define BALLOON_PFNS_PER_REQUEST (PAGE_SIZE / 4)

static uint8_t rng_buffer[RNG_MAX_BYTES];

bool rng_init(struct virtio_device *device)
{
    if (!virtio_negotiate(device, 0) || !virtio_setup_queue(device, 0))
        return false;
    virtio_driver_ok(device);
    return true;
}

/* Fill `data` with up to `count` random bytes; return the number written or -1. */
int rng_read(struct virtio_device *device, uint8_t *data, uint32_t count)
{
    struct virtq *queue = &device->queues[0];
    struct vbuf buffer = {rng_buffer, count, true};
    virtq_add(queue, 0, &buffer, 1);
    virtq_publish(queue, 0);
    virtq_notify(queue);
    uint32_t id;
    uint32_t length;
    if (virtq_wait_used(queue, &id, &length, RNG_TIMEOUT_MS) != WAIT_DONE)
        return -1;
    if (length > count)
        length = count;
    memcpy(data, rng_buffer, length);
    return (int)length;
}

/*
 * Balloon state: the page frame numbers given to the host, in `inflated`, a table the probe
 * allocates at start-up with room for every page it could ever give.
 */
struct balloon_driver {
    uint32_t *inflated;
    uint64_t inflated_count;
    uint64_t capacity;
    uint32_t *pfns;
};

static struct balloon_driver balloon;

bool balloon_init(struct virtio_device *device)
{
    uint64_t capacity = pages_free();
    uint64_t table_pages = (capacity * 4 + PAGE_SIZE - 1) / PAGE_SIZE;
    if (!virtio_negotiate(device, 1ull << VIRTIO_BALLOON_F_MUST_TELL_HOST) ||
        !virtio_setup_queue(device, BALLOON_INFLATE_QUEUE) ||
        !virtio_setup_queue(device, BALLOON_DEFLATE_QUEUE))
        return false;
    /* Take the table's pages in one run from the bump allocator, so they are contiguous. */
    balloon.inflated = NULL;
    for (uint64_t i = 0; i < table_pages; i++) {
        void *page = page_alloc();
        if (!page || (balloon.inflated && (uint8_t *)page != (uint8_t *)balloon.inflated +
                                                               i * PAGE_SIZE)) {
            device->error = "no contiguous memory for the balloon page table";
            return false;
        }
        if (!balloon.inflated)
            balloon.inflated = page;
    }
    balloon.pfns = page_alloc();
    if (!balloon.pfns) {
        device->error = "out of memory for the balloon PFN buffer";
        return false;
    }
    balloon.capacity = table_pages * PAGE_SIZE / 4;
    device->driver = &balloon;
    virtio_driver_ok(device);
    return true;
}

static bool balloon_send(struct virtio_device *device, int queue_index, uint32_t count)
{
    struct virtq *queue = &device->queues[queue_index];
    struct vbuf buffer = {balloon.pfns, count * 4, false};
    virtq_add(queue, 0, &buffer, 1);
    virtq_publish(queue, 0);
    virtq_notify(queue);
    uint32_t id;
    uint32_t length;
    return virtq_wait_used(queue, &id, &length, BALLOON_TIMEOUT_MS) == WAIT_DONE;
}

/* Give up to `pages` free pages to the host; return how many it took. */
static uint64_t balloon_inflate(struct virtio_device *device, uint64_t pages)
{
    uint64_t done = 0;
    while (done < pages) {
        uint32_t count = 0;
        while (count < BALLOON_PFNS_PER_REQUEST && done + count < pages &&
               balloon.inflated_count + count < balloon.capacity) {
            void *page = page_alloc();
            if (!page)
                break;
            balloon.pfns[count] = (uint32_t)((uint64_t)page >> BALLOON_PFN_SHIFT);
            balloon.inflated[balloon.inflated_count + count] = balloon.pfns[count];
            count++;
        }
        if (!count)
            break;
        if (!balloon_send(device, BALLOON_INFLATE_QUEUE, count)) {
            for (uint32_t i = 0; i < count; i++)
                page_free((void *)((uint64_t)balloon.pfns[i] << BALLOON_PFN_SHIFT));
            break;
        }
        balloon.inflated_count += count;
        done += count;
    }
    return done;
}

/* Take back up to `pages` pages. The host is told before reuse, MUST_TELL_HOST or not. */
static uint64_t balloon_deflate(struct virtio_device *device, uint64_t pages)
{
    uint64_t done = 0;
    while (done < pages && balloon.inflated_count) {
        uint32_t count = 0;
        while (count < BALLOON_PFNS_PER_REQUEST && done + count < pages &&
               count < balloon.inflated_count) {
            balloon.pfns[count] = balloon.inflated[balloon.inflated_count - 1 - count];
            count++;
        }
        if (!balloon_send(device, BALLOON_DEFLATE_QUEUE, count))
            break;
        for (uint32_t i = 0; i < count; i++)
            page_free((void *)((uint64_t)balloon.pfns[i] << BALLOON_PFN_SHIFT));
        balloon.inflated_count -= count;
        done += count;
    }
    return done;
}

void balloon_update(struct virtio_device *device)
{
    uint64_t target = virtio_config_read32(device, BALLOON_CONFIG_NUM_PAGES);
    if (target > balloon.inflated_count)
        balloon_inflate(device, target - balloon.inflated_count);
    else if (target < balloon.inflated_count)
        balloon_deflate(device, balloon.inflated_count - target);
    virtio_config_write32(device, BALLOON_CONFIG_ACTUAL, (uint32_t)balloon.inflated_count);
    kprintf("balloon target %lu actual %lu\n", target, balloon.inflated_count);
}
