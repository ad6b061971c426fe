/* The serial login (root/root) and the command shell; `help` lists the commands. */
#include "drivers.h"

#define LINE_SIZE 1024
#define MAX_WORDS 8
#define LOGIN_USER "root"
#define LOGIN_PASSWORD "root"
#define PROMPT "probe# "
/* An I/O port nothing decodes: each write is one exit to the monitor. */
#define UNUSED_PORT 0x80
#define NET_RECV_DEFAULT_MS 1000
#define VSOCK_RECV_DEFAULT_MS 1000
#define VSOCK_LISTEN_DEFAULT_MS 10000
#define HEX_BYTES_PER_LINE 32
/* Destination and source MAC plus EtherType. */
#define NET_MIN_FLOOD_FRAME 14

static const char help_text[] =
    "echo WORDS...              print WORDS\n"
    "uname                      print the probe version\n"
    "devices                    list virtio devices and how they were found\n"
    "mem                        print free and total 4 KiB pages\n"
    "blk read N SECTOR          print a 512-byte sector of block device N as hex\n"
    "blk write N SECTOR TEXT    write TEXT, zero-padded to 512 bytes, to SECTOR\n"
    "blk flush N                flush block device N\n"
    "blk id N                   print the device ID string of block device N\n"
    "blk bench N COUNT          read COUNT sectors one request at a time; print the time\n"
    "rng COUNT                  print COUNT (1-4096) random bytes as hex\n"
    "net mac N                  print the MAC address of network device N\n"
    "net send N HEXFRAME        send an Ethernet frame given as hex\n"
    "net recv N [MS]            print one received frame as hex, or none (default 1000 ms)\n"
    "net flood N COUNT LEN      send COUNT broadcast frames of LEN bytes; print the time\n"
    "vsock connect PORT         connect to the host (CID 2) on PORT\n"
    "vsock listen PORT [MS]     accept one connection from the host on PORT\n"
    "vsock send TEXT            send TEXT and a newline on the connection\n"
    "vsock recv [MS]            print one received payload, or none (default 1000 ms)\n"
    "vsock close                shut the connection down\n"
    "balloon                    follow the balloon target; print target and actual pages\n"
    "exits N                    write N times to an unused port (exit-cost benchmark)\n"
    "reboot                     reset the machine through the i8042\n";

/* Words of a command line, split in place in a copy of the line. */
struct command_line {
    char *words[MAX_WORDS];
    int count;
};

static void split_words(char *line, struct command_line *command)
{
    command->count = 0;
    char *cursor = line;
    while (*cursor && command->count < MAX_WORDS) {
        while (*cursor == ' ')
            cursor++;
        if (!*cursor)
            break;
        command->words[command->count++] = cursor;
        while (*cursor && *cursor != ' ')
            cursor++;
        if (*cursor)
            *cursor++ = '\0';
    }
}

/* Return the original text from word `index` to the end of the line, spaces included. */
static const char *text_from(const char *original, const char *line_copy,
                             struct command_line *command, int index)
{
    return original + (command->words[index] - line_copy);
}

static bool number_argument(struct command_line *command, int index, const char *name,
                            uint64_t *value)
{
    if (index >= command->count) {
        kprintf("error: %s: missing argument %d\n", name, index);
        return false;
    }
    if (!parse_u64(command->words[index], value)) {
        kprintf("error: %s: invalid number '%s'\n", name, command->words[index]);
        return false;
    }
    return true;
}

static struct virtio_device *device_argument(struct command_line *command, int index,
                                             uint32_t device_id, const char *name)
{
    uint64_t number;
    if (!number_argument(command, index, name, &number))
        return NULL;
    struct virtio_device *device = device_of_type(device_id, (int)number);
    if (!device) {
        kprintf("error: %s: no %s device %lu\n", name, virtio_type_name(device_id), number);
        return NULL;
    }
    if (!device->ready) {
        kprintf("error: %s: %s%lu is not ready: %s\n", name, virtio_type_name(device_id),
                number, device->error ? device->error : "driver not started");
        return NULL;
    }
    return device;
}

static void print_device(int index, struct virtio_device *device)
{
    const char *source = device->in_cmdline && device->in_acpi ? "cmdline+acpi"
                         : device->in_cmdline                  ? "cmdline-only"
                                                               : "acpi-only";
    kprintf("%d %s%d mmio=0x%lx irq=%u features=0x%lx", index,
            virtio_type_name(device->device_id), device->type_index, device->base,
            device->irq, device->features);
    if (device->device_id == VIRTIO_ID_BLOCK && device->ready)
        kprintf(" sectors=%lu %s", blk_capacity(device), blk_read_only(device) ? "ro" : "rw");
    kprintf(" found=%s%s", source, device->irq_mismatch ? " irq-mismatch" : "");
    if (!device->ready)
        kprintf(" error=\"%s\"", device->error ? device->error : "not started");
    kprintf("\n");
}

static void command_devices(void)
{
    const struct discovery *found = probe_discovery();
    bool agree = found->cmdline_count == found->acpi_count;
    for (int i = 0; i < device_count(); i++) {
        struct virtio_device *device = device_at(i);
        if (!device->in_cmdline || !device->in_acpi || device->irq_mismatch)
            agree = false;
    }
    kprintf("cpus %d\n", found->cpu_count);
    kprintf("discovery cmdline=%d acpi=%d %s\n", found->cmdline_count, found->acpi_count,
            agree ? "agree" : "disagree");
    for (int i = 0; i < device_count(); i++)
        print_device(i, device_at(i));
}

/* Read COUNT sectors, one request in flight, cycling through the first 1024 sectors (or the
 * whole disk if smaller), and print the elapsed time: a request-rate benchmark. */
static void blk_bench(struct command_line *command, struct virtio_device *device,
                      uint8_t *sector_data)
{
    uint64_t count;
    if (!number_argument(command, 3, "blk bench", &count))
        return;
    uint64_t sectors = blk_capacity(device);
    uint64_t span = sectors < 1024 ? sectors : 1024;
    if (span == 0) {
        kprintf("error: blk bench: the device has no sectors\n");
        return;
    }
    uint64_t start = clock_us();
    for (uint64_t i = 0; i < count; i++) {
        int status = blk_request(device, VIRTIO_BLK_T_IN, i % span, sector_data, SECTOR_SIZE);
        if (status != VIRTIO_BLK_S_OK) {
            kprintf("error: blk bench: request %lu ended with %s\n", i, blk_status_name(status));
            return;
        }
        clock_us(); /* keep up with the 55 ms counter behind the clock */
    }
    kprintf("blk bench %lu requests in %lu us\n", count, clock_us() - start);
}

static void command_blk(struct command_line *command, const char *original,
                        const char *line_copy)
{
    static uint8_t sector_data[SECTOR_SIZE];
    const char *usage = "error: blk: usage: blk read|write|flush|id|bench N ...\n";
    if (command->count < 3) {
        kprintf("%s", usage);
        return;
    }
    const char *action = command->words[1];
    struct virtio_device *device = device_argument(command, 2, VIRTIO_ID_BLOCK, "blk");
    if (!device)
        return;
    uint64_t sector = 0;
    int status;
    if (strcmp(action, "read") == 0) {
        if (!number_argument(command, 3, "blk read", &sector))
            return;
        status = blk_request(device, VIRTIO_BLK_T_IN, sector, sector_data, SECTOR_SIZE);
        if (status == VIRTIO_BLK_S_OK)
            print_hex_lines(sector_data, SECTOR_SIZE, HEX_BYTES_PER_LINE);
    } else if (strcmp(action, "write") == 0) {
        if (!number_argument(command, 3, "blk write", &sector))
            return;
        if (command->count < 5) {
            kprintf("error: blk write: missing TEXT\n");
            return;
        }
        const char *text = text_from(original, line_copy, command, 4);
        size_t length = strlen(text);
        memset(sector_data, 0, SECTOR_SIZE);
        memcpy(sector_data, text, length < SECTOR_SIZE ? length : SECTOR_SIZE);
        status = blk_request(device, VIRTIO_BLK_T_OUT, sector, sector_data, SECTOR_SIZE);
    } else if (strcmp(action, "flush") == 0) {
        status = blk_request(device, VIRTIO_BLK_T_FLUSH, 0, NULL, 0);
    } else if (strcmp(action, "bench") == 0) {
        blk_bench(command, device, sector_data);
        return;
    } else if (strcmp(action, "id") == 0) {
        memset(sector_data, 0, VIRTIO_BLK_ID_BYTES + 1);
        status = blk_request(device, VIRTIO_BLK_T_GET_ID, 0, sector_data, VIRTIO_BLK_ID_BYTES);
        if (status == VIRTIO_BLK_S_OK)
            kprintf("id %s\n", (const char *)sector_data);
    } else {
        kprintf("%s", usage);
        return;
    }
    kprintf("status %s\n", blk_status_name(status));
}

static void command_rng(struct command_line *command)
{
    static uint8_t data[RNG_MAX_BYTES];
    uint64_t count;
    if (!number_argument(command, 1, "rng", &count))
        return;
    if (count < 1 || count > RNG_MAX_BYTES) {
        kprintf("error: rng: COUNT %lu is outside 1..%d\n", count, RNG_MAX_BYTES);
        return;
    }
    struct virtio_device *device = device_of_type(VIRTIO_ID_ENTROPY, 0);
    if (!device || !device->ready) {
        kprintf("error: rng: no entropy device is ready\n");
        return;
    }
    int length = rng_read(device, data, (uint32_t)count);
    if (length < 0) {
        kprintf("error: rng: the device did not answer in time\n");
        return;
    }
    print_hex_lines(data, (size_t)length, HEX_BYTES_PER_LINE);
    kprintf("rng %d bytes\n", length);
}

static bool parse_hex_frame(const char *hex, uint8_t *frame, uint32_t *length)
{
    size_t digits = strlen(hex);
    if (digits % 2 || digits / 2 > NET_MAX_FRAME || !digits)
        return false;
    for (size_t i = 0; i < digits; i += 2) {
        char pair[3] = {hex[i], hex[i + 1], '\0'};
        char prefixed[5] = {'0', 'x', pair[0], pair[1], '\0'};
        uint64_t value;
        if (!parse_u64(prefixed, &value))
            return false;
        frame[i / 2] = (uint8_t)value;
    }
    *length = (uint32_t)(digits / 2);
    return true;
}

/* Send COUNT broadcast frames of LEN bytes (EtherType 0x88b5, IEEE local experimental) and
 * print the elapsed time: a transmit-rate benchmark. */
static void net_flood(struct command_line *command, struct virtio_device *device, uint8_t *frame)
{
    uint64_t count;
    uint64_t length;
    if (!number_argument(command, 3, "net flood", &count) ||
        !number_argument(command, 4, "net flood", &length))
        return;
    if (length < NET_MIN_FLOOD_FRAME || length > NET_MAX_FRAME) {
        kprintf("error: net flood: LEN %lu is outside %d..%d\n", length, NET_MIN_FLOOD_FRAME,
                NET_MAX_FRAME);
        return;
    }
    memset(frame, 0xff, 6);
    if (!net_mac(device, frame + 6))
        memcpy(frame + 6, "\x02\x00\x00\x00\x00\x01", 6);
    frame[12] = 0x88;
    frame[13] = 0xb5;
    for (uint64_t i = 14; i < length; i++)
        frame[i] = (uint8_t)i;
    uint64_t start = clock_us();
    for (uint64_t i = 0; i < count; i++) {
        if (net_send(device, frame, (uint32_t)length) != 0) {
            kprintf("error: net flood: frame %lu was not taken in time\n", i);
            return;
        }
        /* Read the clock often enough that its 55 ms counter cannot wrap unseen. */
        if ((i & 15) == 15)
            clock_us();
    }
    kprintf("net flood %lu frames of %lu bytes in %lu us\n", count, length, clock_us() - start);
}

static void command_net(struct command_line *command)
{
    static uint8_t frame[NET_MAX_FRAME];
    const char *usage = "error: net: usage: net mac|send|recv|flood N ...\n";
    if (command->count < 3) {
        kprintf("%s", usage);
        return;
    }
    const char *action = command->words[1];
    struct virtio_device *device = device_argument(command, 2, VIRTIO_ID_NET, "net");
    if (!device)
        return;
    if (strcmp(action, "mac") == 0) {
        uint8_t mac[6];
        if (!net_mac(device, mac)) {
            kprintf("error: net mac: the device offers no MAC (VIRTIO_NET_F_MAC)\n");
            return;
        }
        kprintf("mac %02x:%02x:%02x:%02x:%02x:%02x\n", mac[0], mac[1], mac[2], mac[3], mac[4],
                mac[5]);
    } else if (strcmp(action, "send") == 0) {
        uint32_t length;
        if (command->count < 4 || !parse_hex_frame(command->words[3], frame, &length)) {
            kprintf("error: net send: HEXFRAME must be 1..%d bytes as hex digits\n",
                    NET_MAX_FRAME);
            return;
        }
        if (net_send(device, frame, length) != 0) {
            kprintf("error: net send: the device did not take the frame in time\n");
            return;
        }
        kprintf("sent %u\n", length);
    } else if (strcmp(action, "flood") == 0) {
        net_flood(command, device, frame);
    } else if (strcmp(action, "recv") == 0) {
        uint64_t timeout = NET_RECV_DEFAULT_MS;
        if (command->count > 3 && !number_argument(command, 3, "net recv", &timeout))
            return;
        int length = net_recv(device, frame, sizeof frame, timeout);
        if (length < 0) {
            kprintf("none\n");
            return;
        }
        print_hex_lines(frame, (size_t)length, HEX_BYTES_PER_LINE);
        kprintf("frame %d bytes\n", length);
    } else {
        kprintf("%s", usage);
    }
}

static void command_vsock(struct command_line *command, const char *original,
                          const char *line_copy)
{
    struct virtio_device *device = device_of_type(VIRTIO_ID_VSOCK, 0);
    if (command->count < 2) {
        kprintf("error: vsock: usage: vsock connect|listen|send|recv|close ...\n");
        return;
    }
    if (!device || !device->ready) {
        kprintf("error: vsock: no vsock device is ready\n");
        return;
    }
    const char *action = command->words[1];
    uint64_t value;
    if (strcmp(action, "connect") == 0) {
        if (number_argument(command, 2, "vsock connect", &value))
            vsock_connect(device, (uint32_t)value);
    } else if (strcmp(action, "listen") == 0) {
        uint64_t timeout = VSOCK_LISTEN_DEFAULT_MS;
        if (!number_argument(command, 2, "vsock listen", &value))
            return;
        if (command->count > 3 && !number_argument(command, 3, "vsock listen", &timeout))
            return;
        vsock_listen(device, (uint32_t)value, timeout);
    } else if (strcmp(action, "send") == 0) {
        if (command->count < 3) {
            kprintf("error: vsock send: missing TEXT\n");
            return;
        }
        vsock_send(device, text_from(original, line_copy, command, 2));
    } else if (strcmp(action, "recv") == 0) {
        uint64_t timeout = VSOCK_RECV_DEFAULT_MS;
        if (command->count > 2 && !number_argument(command, 2, "vsock recv", &timeout))
            return;
        vsock_recv(device, timeout);
    } else if (strcmp(action, "close") == 0) {
        vsock_close(device);
    } else {
        kprintf("error: vsock: unknown action '%s'\n", action);
    }
}

static void command_exits(struct command_line *command)
{
    uint64_t count;
    if (!number_argument(command, 1, "exits", &count))
        return;
    uint64_t start = clock_us();
    for (uint64_t i = 0; i < count; i++) {
        outb(UNUSED_PORT, (uint8_t)i);
        /* Read the clock often enough that its 55 ms counter cannot wrap unseen. */
        if ((i & 63) == 63)
            clock_us();
    }
    uint64_t elapsed = clock_us() - start;
    kprintf("exits %lu in %lu us\n", count, elapsed);
}

static void command_balloon(void)
{
    struct virtio_device *device = device_of_type(VIRTIO_ID_BALLOON, 0);
    if (!device || !device->ready) {
        kprintf("error: balloon: no balloon device is ready\n");
        return;
    }
    balloon_update(device);
}

static void run_command(const char *original)
{
    static char line[LINE_SIZE];
    struct command_line command;
    memcpy(line, original, strlen(original) + 1);
    split_words(line, &command);
    if (!command.count)
        return;
    const char *name = command.words[0];
    if (strcmp(name, "echo") == 0) {
        kprintf("%s\n", command.count > 1 ? text_from(original, line, &command, 1) : "");
    } else if (strcmp(name, "help") == 0) {
        console_write(help_text, sizeof help_text - 1);
    } else if (strcmp(name, "uname") == 0) {
        kprintf("%s\n", PROBE_VERSION);
    } else if (strcmp(name, "devices") == 0) {
        command_devices();
    } else if (strcmp(name, "mem") == 0) {
        kprintf("free %lu pages of %lu\n", pages_free(), pages_total());
    } else if (strcmp(name, "blk") == 0) {
        command_blk(&command, original, line);
    } else if (strcmp(name, "rng") == 0) {
        command_rng(&command);
    } else if (strcmp(name, "net") == 0) {
        command_net(&command);
    } else if (strcmp(name, "vsock") == 0) {
        command_vsock(&command, original, line);
    } else if (strcmp(name, "balloon") == 0) {
        command_balloon();
    } else if (strcmp(name, "exits") == 0) {
        command_exits(&command);
    } else if (strcmp(name, "reboot") == 0) {
        kprintf("rebooting\n");
        machine_reset();
    } else {
        kprintf("error: unknown command '%s'; try help\n", name);
    }
}

static void login(void)
{
    char user[64];
    char password[64];
    for (;;) {
        kprintf("login: ");
        console_readline(user, sizeof user, true);
        kprintf("Password: ");
        console_readline(password, sizeof password, false);
        if (strcmp(user, LOGIN_USER) == 0 && strcmp(password, LOGIN_PASSWORD) == 0)
            return;
        kprintf("Login incorrect\n");
    }
}

void shell_run(void)
{
    static char input[LINE_SIZE];
    login();
    kprintf("%s\n", PROBE_VERSION);
    for (;;) {
        kprintf(PROMPT);
        console_readline(input, sizeof input, true);
        run_command(input);
    }
}
