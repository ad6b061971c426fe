/*
 * Polled virtio-vsock driver (virtio 1.2, 5.10) for one stream connection to the host
 * (CID 2). Queues: rx 0 with one 4 KiB device-writable buffer per descriptor, tx 1 one
 * packet at a time, event 2 with posted event buffers. Credit (5.10.6.3): the probe
 * advertises VSOCK_BUFFER_ALLOC bytes and counts what it consumed in fwd_cnt.
 */
#include "drivers.h"

#define VSOCK_RX_QUEUE 0
#define VSOCK_TX_QUEUE 1
#define VSOCK_EVENT_QUEUE 2
#define VSOCK_RX_BUFFER_SIZE 4096
#define VSOCK_EVENT_BUFFERS 4
#define VSOCK_CONFIG_GUEST_CID 0
#define VSOCK_HOST_CID 2
#define VSOCK_TYPE_STREAM 1
#define VSOCK_BUFFER_ALLOC 65536
#define VSOCK_FIRST_LOCAL_PORT 49152
#define VSOCK_REPLY_TIMEOUT_MS 5000
#define VSOCK_TX_TIMEOUT_MS 5000
#define VSOCK_MAX_PAYLOAD 1024

/* 5.10.6 Operations. */
enum vsock_op {
    VSOCK_OP_REQUEST = 1,
    VSOCK_OP_RESPONSE = 2,
    VSOCK_OP_RST = 3,
    VSOCK_OP_SHUTDOWN = 4,
    VSOCK_OP_RW = 5,
    VSOCK_OP_CREDIT_UPDATE = 6,
    VSOCK_OP_CREDIT_REQUEST = 7,
};
/* SHUTDOWN flags: the sender will receive no more, send no more. */
#define VSOCK_SHUTDOWN_BOTH 3u

struct vsock_header {
    uint64_t src_cid;
    uint64_t dst_cid;
    uint32_t src_port;
    uint32_t dst_port;
    uint32_t len;
    uint16_t type;
    uint16_t op;
    uint32_t flags;
    uint32_t buf_alloc;
    uint32_t fwd_cnt;
} __attribute__((packed));

enum vsock_state { VSOCK_CLOSED, VSOCK_CONNECTING, VSOCK_CONNECTED };

struct vsock_driver {
    uint8_t *rx_buffers[PROBE_QUEUE_SIZE];
    uint32_t events[VSOCK_EVENT_BUFFERS];
    struct vsock_header tx_header;
    uint8_t tx_payload[VSOCK_MAX_PAYLOAD];
    enum vsock_state state;
    uint32_t local_port;
    uint32_t peer_port;
    uint32_t next_port;
    uint32_t forwarded;
    uint32_t listen_port;
    /* The last payload received and not yet printed. */
    uint8_t pending[VSOCK_RX_BUFFER_SIZE];
    uint32_t pending_length;
};

static struct vsock_driver vsock;

static void post_rx(struct virtio_device *device, uint16_t id)
{
    struct virtq *queue = &device->queues[VSOCK_RX_QUEUE];
    struct vbuf buffer = {vsock.rx_buffers[id], VSOCK_RX_BUFFER_SIZE, true};
    virtq_add(queue, id, &buffer, 1);
    virtq_publish(queue, id);
}

static void post_events(struct virtio_device *device)
{
    struct virtq *queue = &device->queues[VSOCK_EVENT_QUEUE];
    for (uint16_t id = 0; id < VSOCK_EVENT_BUFFERS && id < queue->size; id++) {
        struct vbuf buffer = {&vsock.events[id], sizeof vsock.events[id], true};
        virtq_add(queue, id, &buffer, 1);
        virtq_publish(queue, id);
    }
    virtq_notify(queue);
}

bool vsock_init(struct virtio_device *device)
{
    if (!virtio_negotiate(device, 0) || !virtio_setup_queue(device, VSOCK_RX_QUEUE) ||
        !virtio_setup_queue(device, VSOCK_TX_QUEUE) ||
        !virtio_setup_queue(device, VSOCK_EVENT_QUEUE))
        return false;
    struct virtq *rx = &device->queues[VSOCK_RX_QUEUE];
    for (uint16_t id = 0; id < rx->size; id++) {
        vsock.rx_buffers[id] = page_alloc();
        if (!vsock.rx_buffers[id]) {
            device->error = "out of memory for vsock receive buffers";
            return false;
        }
    }
    vsock.next_port = VSOCK_FIRST_LOCAL_PORT;
    device->driver = &vsock;
    for (uint16_t id = 0; id < rx->size; id++)
        post_rx(device, id);
    virtio_driver_ok(device);
    virtq_notify(rx);
    post_events(device);
    return true;
}

uint64_t vsock_guest_cid(struct virtio_device *device)
{
    return (uint64_t)virtio_config_read32(device, VSOCK_CONFIG_GUEST_CID + 4) << 32 |
           virtio_config_read32(device, VSOCK_CONFIG_GUEST_CID);
}

/* Send one packet to the host; return false if the device did not take it in time. */
static bool send_packet(struct virtio_device *device, enum vsock_op op, uint32_t flags,
                        const void *payload, uint32_t length)
{
    struct virtq *queue = &device->queues[VSOCK_TX_QUEUE];
    struct vsock_header *header = &vsock.tx_header;
    memset(header, 0, sizeof *header);
    header->src_cid = vsock_guest_cid(device);
    header->dst_cid = VSOCK_HOST_CID;
    header->src_port = vsock.local_port;
    header->dst_port = vsock.peer_port;
    header->len = length;
    header->type = VSOCK_TYPE_STREAM;
    header->op = (uint16_t)op;
    header->flags = flags;
    header->buf_alloc = VSOCK_BUFFER_ALLOC;
    header->fwd_cnt = vsock.forwarded;
    struct vbuf buffers[2] = {{header, sizeof *header, false},
                              {vsock.tx_payload, length, false}};
    /* NOTE: the peer's credit (buf_alloc - (sent - fwd_cnt)) is not checked before sending.
     * Payloads are at most VSOCK_MAX_PAYLOAD bytes, far below a host's usual buffer. */
    if (length)
        memcpy(vsock.tx_payload, payload, length);
    virtq_add(queue, 0, buffers, length ? 2 : 1);
    virtq_publish(queue, 0);
    virtq_notify(queue);
    uint32_t id;
    uint32_t used_length;
    return virtq_wait_used(queue, &id, &used_length, VSOCK_TX_TIMEOUT_MS) == WAIT_DONE;
}

static bool belongs_to_connection(const struct vsock_header *header)
{
    return header->src_cid == VSOCK_HOST_CID && header->dst_port == vsock.local_port &&
           header->src_port == vsock.peer_port;
}

/* Act on one received packet; return the operation it carried for the caller's wait. */
static int handle_packet(struct virtio_device *device, const struct vsock_header *header,
                         const uint8_t *payload)
{
    if (header->op == VSOCK_OP_REQUEST && vsock.state == VSOCK_CLOSED && vsock.listen_port &&
        header->dst_port == vsock.listen_port) {
        vsock.local_port = header->dst_port;
        vsock.peer_port = header->src_port;
        vsock.forwarded = 0;
        vsock.state = VSOCK_CONNECTED;
        send_packet(device, VSOCK_OP_RESPONSE, 0, NULL, 0);
        return VSOCK_OP_REQUEST;
    }
    if (vsock.state == VSOCK_CLOSED || !belongs_to_connection(header))
        return 0;
    switch (header->op) {
    case VSOCK_OP_RESPONSE:
        vsock.state = VSOCK_CONNECTED;
        break;
    case VSOCK_OP_RST:
        vsock.state = VSOCK_CLOSED;
        break;
    case VSOCK_OP_SHUTDOWN:
        send_packet(device, VSOCK_OP_RST, 0, NULL, 0);
        vsock.state = VSOCK_CLOSED;
        break;
    case VSOCK_OP_RW: {
        uint32_t length = header->len;
        if (length > VSOCK_RX_BUFFER_SIZE - sizeof *header)
            length = VSOCK_RX_BUFFER_SIZE - sizeof *header;
        memcpy(vsock.pending, payload, length);
        vsock.pending_length = length;
        vsock.forwarded += length;
        break;
    }
    case VSOCK_OP_CREDIT_REQUEST:
        send_packet(device, VSOCK_OP_CREDIT_UPDATE, 0, NULL, 0);
        break;
    default:
        break;
    }
    return header->op;
}

/* Process received packets until one carries `op` (0: any) or the time runs out. */
static bool wait_for(struct virtio_device *device, int op, uint64_t timeout_ms)
{
    struct virtq *queue = &device->queues[VSOCK_RX_QUEUE];
    uint64_t start = clock_ms();
    for (;;) {
        uint64_t elapsed = clock_ms() - start;
        if (elapsed >= timeout_ms)
            return false;
        uint32_t id;
        uint32_t length;
        if (virtq_wait_used(queue, &id, &length, timeout_ms - elapsed) != WAIT_DONE)
            return false;
        if (id >= queue->size)
            continue;
        const struct vsock_header *header = (const struct vsock_header *)vsock.rx_buffers[id];
        int seen = 0;
        if (length >= sizeof *header)
            seen = handle_packet(device, header, vsock.rx_buffers[id] + sizeof *header);
        post_rx(device, (uint16_t)id);
        virtq_notify(queue);
        if (seen && (op == 0 || seen == op || seen == VSOCK_OP_RST))
            return seen == op || op == 0;
    }
}

void vsock_connect(struct virtio_device *device, uint32_t port)
{
    if (vsock.state != VSOCK_CLOSED) {
        kprintf("error: vsock connect: a connection to port %u is open; close it first\n",
                vsock.peer_port);
        return;
    }
    vsock.local_port = vsock.next_port++;
    vsock.peer_port = port;
    vsock.forwarded = 0;
    vsock.pending_length = 0;
    vsock.state = VSOCK_CONNECTING;
    if (!send_packet(device, VSOCK_OP_REQUEST, 0, NULL, 0)) {
        vsock.state = VSOCK_CLOSED;
        kprintf("error: vsock connect: the device did not take the request\n");
        return;
    }
    if (wait_for(device, VSOCK_OP_RESPONSE, VSOCK_REPLY_TIMEOUT_MS) &&
        vsock.state == VSOCK_CONNECTED) {
        kprintf("connected cid %d port %u local %u\n", VSOCK_HOST_CID, port, vsock.local_port);
        return;
    }
    int refused = vsock.state == VSOCK_CLOSED;
    vsock.state = VSOCK_CLOSED;
    kprintf("error: vsock connect to port %u %s\n", port,
            refused ? "refused (RST)" : "timed out");
}

void vsock_listen(struct virtio_device *device, uint32_t port, uint64_t timeout_ms)
{
    if (vsock.state != VSOCK_CLOSED) {
        kprintf("error: vsock listen: a connection is open; close it first\n");
        return;
    }
    vsock.listen_port = port;
    vsock.pending_length = 0;
    bool accepted = wait_for(device, VSOCK_OP_REQUEST, timeout_ms);
    vsock.listen_port = 0;
    if (!accepted) {
        kprintf("error: vsock listen on port %u: no connection in %lu ms\n", port, timeout_ms);
        return;
    }
    kprintf("accepted cid %d port %u\n", VSOCK_HOST_CID, vsock.peer_port);
}

void vsock_send(struct virtio_device *device, const char *text)
{
    uint32_t length = (uint32_t)strlen(text);
    if (vsock.state != VSOCK_CONNECTED) {
        kprintf("error: vsock send: not connected\n");
        return;
    }
    if (length + 1 > VSOCK_MAX_PAYLOAD) {
        kprintf("error: vsock send: %u bytes exceed the %d-byte limit\n", length,
                VSOCK_MAX_PAYLOAD - 1);
        return;
    }
    /* The text goes out as one line, newline included. */
    char line[VSOCK_MAX_PAYLOAD];
    memcpy(line, text, length);
    line[length] = '\n';
    if (!send_packet(device, VSOCK_OP_RW, 0, line, length + 1)) {
        kprintf("error: vsock send: the device did not take the packet\n");
        return;
    }
    kprintf("sent %u\n", length + 1);
}

static void print_payload(const uint8_t *data, uint32_t length)
{
    char text[VSOCK_RX_BUFFER_SIZE + 1];
    for (uint32_t i = 0; i < length; i++)
        text[i] = data[i] >= ' ' && data[i] < 0x7f ? (char)data[i] : '.';
    text[length] = '\0';
    kprintf("recv %u %s\n", length, text);
}

void vsock_recv(struct virtio_device *device, uint64_t timeout_ms)
{
    if (vsock.state != VSOCK_CONNECTED && !vsock.pending_length) {
        kprintf("error: vsock recv: not connected\n");
        return;
    }
    if (!vsock.pending_length)
        wait_for(device, VSOCK_OP_RW, timeout_ms);
    if (!vsock.pending_length) {
        kprintf(vsock.state == VSOCK_CONNECTED ? "none\n" : "closed by peer\n");
        return;
    }
    print_payload(vsock.pending, vsock.pending_length);
    vsock.pending_length = 0;
    send_packet(device, VSOCK_OP_CREDIT_UPDATE, 0, NULL, 0);
}

void vsock_close(struct virtio_device *device)
{
    if (vsock.state == VSOCK_CLOSED) {
        kprintf("error: vsock close: not connected\n");
        return;
    }
    send_packet(device, VSOCK_OP_SHUTDOWN, VSOCK_SHUTDOWN_BOTH, NULL, 0);
    bool reset = wait_for(device, VSOCK_OP_RST, VSOCK_REPLY_TIMEOUT_MS);
    vsock.state = VSOCK_CLOSED;
    kprintf(reset ? "closed\n" : "closed (no RST from the host)\n");
}
