/*
 * Device discovery by both routes a Linux guest may take:
 *
 * - the command line: `virtio_mmio.device=<size>@<base>:<irq>` entries, the syntax of
 *   Linux's CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES;
 * - ACPI (ACPI 6.3): the RSDP, found on a 16-byte boundary in 0xE0000-0xFFFFF (5.2.5.1),
 *   leads to the XSDT, and the XSDT's FADT to the DSDT. The DSDT's AML lists each
 *   virtio-mmio device as a Device with _HID "LNRO0005". Its _CRS contains a Memory32Fixed
 *   and an Extended Interrupt descriptor (6.4.3.4, 6.4.3.6).
 *   The MADT gives the number of enabled CPUs.
 */
#include "probe.h"

#define CMDLINE_KEY "virtio_mmio.device="

#define BIOS_AREA_START 0xe0000ull
#define BIOS_AREA_END 0x100000ull
#define RSDP_ALIGNMENT 16
#define RSDP_V1_LENGTH 20
#define RSDP_XSDT_ADDRESS 24
#define TABLE_HEADER_LENGTH 36
#define TABLE_LENGTH 4
#define FADT_DSDT 40
#define FADT_X_DSDT 140
#define MADT_ENTRIES 44
#define MADT_TYPE_LOCAL_APIC 0
#define MADT_LAPIC_FLAGS 4
#define MADT_LAPIC_ENABLED 1u

/* AML opcodes (ACPI 6.3, 20.2). */
#define AML_EXT_OP_PREFIX 0x5b
#define AML_DEVICE_OP 0x82
#define AML_BUFFER_OP 0x11
#define AML_STRING_PREFIX 0x0d
#define AML_ZERO_OP 0x00
#define AML_ONE_OP 0x01
#define AML_BYTE_PREFIX 0x0a
#define AML_WORD_PREFIX 0x0b
#define AML_DWORD_PREFIX 0x0c
/* Resource descriptors (6.4): large items have bit 7 set and a 16-bit length. */
#define RESOURCE_LARGE 0x80
#define RESOURCE_MEMORY32_FIXED 0x86
#define RESOURCE_EXTENDED_INTERRUPT 0x89
#define RESOURCE_SMALL_END_TAG 0x0f

static const char virtio_mmio_hid[] = "LNRO0005";

static bool parse_entry(const char *text, size_t length, struct device_location *location)
{
    char buffer[64];
    if (length >= sizeof buffer)
        return false;
    memcpy(buffer, text, length);
    buffer[length] = '\0';
    char *at = buffer;
    while (*at && *at != '@')
        at++;
    if (!*at)
        return false;
    char *base = at + 1;
    char *colon = base;
    while (*colon && *colon != ':')
        colon++;
    if (!*colon)
        return false;
    *colon = '\0';
    char *irq = colon + 1;
    char *end = irq;
    while (*end && *end != ':')
        end++;
    *end = '\0';
    uint64_t irq_value;
    if (!parse_u64(base, &location->base) || !parse_u64(irq, &irq_value))
        return false;
    location->irq = (uint32_t)irq_value;
    return true;
}

void discover_cmdline(const char *cmdline, struct discovery *found)
{
    size_t key_length = strlen(CMDLINE_KEY);
    const char *cursor = cmdline;
    while (*cursor) {
        while (*cursor == ' ')
            cursor++;
        const char *word = cursor;
        while (*cursor && *cursor != ' ')
            cursor++;
        size_t length = (size_t)(cursor - word);
        if (length <= key_length || strncmp(word, CMDLINE_KEY, key_length) != 0)
            continue;
        struct device_location location;
        if (found->cmdline_count < MAX_DEVICES &&
            parse_entry(word + key_length, length - key_length, &location))
            found->cmdline[found->cmdline_count++] = location;
    }
}

static bool checksum_ok(const uint8_t *data, uint32_t length)
{
    uint8_t sum = 0;
    for (uint32_t i = 0; i < length; i++)
        sum += data[i];
    return sum == 0;
}

static const uint8_t *find_rsdp(uint64_t hint)
{
    for (uint64_t address = BIOS_AREA_START; address < BIOS_AREA_END;
         address += RSDP_ALIGNMENT) {
        const uint8_t *candidate = (const uint8_t *)address;
        if (memcmp(candidate, "RSD PTR ", 8) == 0 && checksum_ok(candidate, RSDP_V1_LENGTH))
            return candidate;
    }
    /* Not in the BIOS area: the zero page's acpi_rsdp_addr is the boot protocol's hint. */
    if (hint && memcmp((const uint8_t *)hint, "RSD PTR ", 8) == 0)
        return (const uint8_t *)hint;
    return NULL;
}

static uint32_t table_length(const uint8_t *table)
{
    return *(const uint32_t *)(table + TABLE_LENGTH);
}

/* Decode the AML PkgLength at `data` and store the number of bytes it takes in *size. */
static uint32_t pkg_length(const uint8_t *data, uint32_t *size)
{
    uint32_t follow = data[0] >> 6;
    if (!follow) {
        *size = 1;
        return data[0] & 0x3f;
    }
    uint32_t length = data[0] & 0x0f;
    for (uint32_t i = 0; i < follow; i++)
        length |= (uint32_t)data[1 + i] << (4 + 8 * i);
    *size = 1 + follow;
    return length;
}

static const uint8_t *find_bytes(const uint8_t *start, const uint8_t *end,
                                 const void *needle, size_t length)
{
    for (const uint8_t *p = start; p + length <= end; p++) {
        if (memcmp(p, needle, length) == 0)
            return p;
    }
    return NULL;
}

/* Skip an AML integer (the Buffer's size). Return the byte after it, or NULL. */
static const uint8_t *skip_integer(const uint8_t *p)
{
    switch (p[0]) {
    case AML_ZERO_OP:
    case AML_ONE_OP:
        return p + 1;
    case AML_BYTE_PREFIX:
        return p + 2;
    case AML_WORD_PREFIX:
        return p + 3;
    case AML_DWORD_PREFIX:
        return p + 5;
    default:
        return NULL;
    }
}

/* Read Memory32Fixed and Extended Interrupt from a ResourceTemplate buffer. */
static bool parse_resources(const uint8_t *p, const uint8_t *end,
                            struct device_location *location)
{
    bool have_memory = false;
    bool have_irq = false;
    while (p < end) {
        uint8_t tag = p[0];
        if (!(tag & RESOURCE_LARGE)) {
            if (((tag >> 3) & 0x0f) == RESOURCE_SMALL_END_TAG)
                break;
            p += 1 + (tag & 7);
            continue;
        }
        uint16_t length = (uint16_t)(p[1] | p[2] << 8);
        const uint8_t *body = p + 3;
        if (tag == RESOURCE_MEMORY32_FIXED && length >= 9) {
            location->base = *(const uint32_t *)(body + 1);
            have_memory = true;
        } else if (tag == RESOURCE_EXTENDED_INTERRUPT && length >= 6 && body[1] >= 1) {
            location->irq = *(const uint32_t *)(body + 2);
            have_irq = true;
        }
        p = body + length;
    }
    return have_memory && have_irq;
}

static bool parse_device(const uint8_t *body, const uint8_t *end,
                         struct device_location *location)
{
    uint8_t hid[4 + 1 + sizeof virtio_mmio_hid];
    memcpy(hid, "_HID", 4);
    hid[4] = AML_STRING_PREFIX;
    memcpy(hid + 5, virtio_mmio_hid, sizeof virtio_mmio_hid);
    if (!find_bytes(body, end, hid, sizeof hid))
        return false;
    const uint8_t *crs = find_bytes(body, end, "_CRS", 4);
    if (!crs || crs + 6 > end || crs[4] != AML_BUFFER_OP)
        return false;
    uint32_t size_bytes;
    uint32_t length = pkg_length(crs + 5, &size_bytes);
    const uint8_t *buffer_end = crs + 5 + length;
    const uint8_t *resources = skip_integer(crs + 5 + size_bytes);
    if (!resources || buffer_end > end)
        return false;
    return parse_resources(resources, buffer_end, location);
}

static void scan_dsdt(const uint8_t *dsdt, struct discovery *found)
{
    const uint8_t *end = dsdt + table_length(dsdt);
    for (const uint8_t *p = dsdt + TABLE_HEADER_LENGTH; p + 2 < end; p++) {
        if (p[0] != AML_EXT_OP_PREFIX || p[1] != AML_DEVICE_OP)
            continue;
        uint32_t size_bytes;
        uint32_t length = pkg_length(p + 2, &size_bytes);
        const uint8_t *device_end = p + 2 + length;
        if (device_end > end)
            continue;
        struct device_location location;
        if (found->acpi_count < MAX_DEVICES &&
            parse_device(p + 2 + size_bytes, device_end, &location))
            found->acpi[found->acpi_count++] = location;
    }
}

static int count_cpus(const uint8_t *madt)
{
    const uint8_t *end = madt + table_length(madt);
    int cpus = 0;
    for (const uint8_t *p = madt + MADT_ENTRIES; p + 2 <= end && p[1] >= 2; p += p[1]) {
        if (p[0] == MADT_TYPE_LOCAL_APIC &&
            (*(const uint32_t *)(p + MADT_LAPIC_FLAGS) & MADT_LAPIC_ENABLED))
            cpus++;
    }
    return cpus;
}

void discover_acpi(uint64_t rsdp_hint, struct discovery *found)
{
    const uint8_t *rsdp = find_rsdp(rsdp_hint);
    if (!rsdp)
        return;
    found->rsdp_found = true;
    const uint8_t *xsdt = (const uint8_t *)*(const uint64_t *)(rsdp + RSDP_XSDT_ADDRESS);
    if (!xsdt || memcmp(xsdt, "XSDT", 4) != 0 || !checksum_ok(xsdt, table_length(xsdt)))
        return;
    uint32_t entries = (table_length(xsdt) - TABLE_HEADER_LENGTH) / 8;
    for (uint32_t i = 0; i < entries; i++) {
        const uint8_t *table =
            (const uint8_t *)*(const uint64_t *)(xsdt + TABLE_HEADER_LENGTH + 8 * i);
        if (!checksum_ok(table, table_length(table)))
            continue;
        if (memcmp(table, "APIC", 4) == 0)
            found->cpu_count = count_cpus(table);
        if (memcmp(table, "FACP", 4) != 0)
            continue;
        uint64_t dsdt = *(const uint64_t *)(table + FADT_X_DSDT);
        if (!dsdt)
            dsdt = *(const uint32_t *)(table + FADT_DSDT);
        const uint8_t *dsdt_table = (const uint8_t *)dsdt;
        if (dsdt && memcmp(dsdt_table, "DSDT", 4) == 0 &&
            checksum_ok(dsdt_table, table_length(dsdt_table)))
            scan_dsdt(dsdt_table, found);
    }
}
