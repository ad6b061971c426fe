/* Commands of the polled virtio drivers, called by the shell. */
#ifndef DRIVERS_H
#define DRIVERS_H

#include "virtio.h"

/* Block (5.2): request types and status values of 5.2.6. */
#define VIRTIO_BLK_T_IN 0u
#define VIRTIO_BLK_T_OUT 1u
#define VIRTIO_BLK_T_FLUSH 4u
#define VIRTIO_BLK_T_GET_ID 8u
#define VIRTIO_BLK_S_OK 0
#define VIRTIO_BLK_S_IOERR 1
#define VIRTIO_BLK_S_UNSUPP 2
#define VIRTIO_BLK_F_RO 5
#define VIRTIO_BLK_F_FLUSH 9
#define VIRTIO_BLK_ID_BYTES 20
#define SECTOR_SIZE 512
/* A request the device did not complete in time; not a virtio status. */
#define REQUEST_TIMED_OUT (-1)

int blk_request(struct virtio_device *device, uint32_t type, uint64_t sector, void *data,
                uint32_t length);
uint64_t blk_capacity(struct virtio_device *device);
bool blk_read_only(struct virtio_device *device);
const char *blk_status_name(int status);

/* Network (5.1). */
#define VIRTIO_NET_F_MAC 5
#define NET_MAX_FRAME 1514
bool net_mac(struct virtio_device *device, uint8_t mac[6]);
int net_send(struct virtio_device *device, const uint8_t *frame, uint32_t length);
int net_recv(struct virtio_device *device, uint8_t *frame, uint32_t size, uint64_t timeout_ms);

/* Entropy (5.4). */
#define RNG_MAX_BYTES 4096
int rng_read(struct virtio_device *device, uint8_t *data, uint32_t count);

/* Socket (5.10): one stream connection at a time; each command prints its outcome. */
void vsock_connect(struct virtio_device *device, uint32_t port);
void vsock_listen(struct virtio_device *device, uint32_t port, uint64_t timeout_ms);
void vsock_send(struct virtio_device *device, const char *text);
void vsock_recv(struct virtio_device *device, uint64_t timeout_ms);
void vsock_close(struct virtio_device *device);
uint64_t vsock_guest_cid(struct virtio_device *device);

/* Traditional memory balloon (5.5): honour the target and print target and actual. */
void balloon_update(struct virtio_device *device);

#endif
