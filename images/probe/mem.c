/*
 * The zero page (struct boot_params, Linux Documentation/arch/x86/zero-page.rst) and a
 * page allocator over the e820 usable RAM the probe image does not occupy.
 *
 * Pages come from a bump pointer per usable range; freed pages go on a stack whose links
 * live in the free pages themselves. Nothing is touched until it is handed out, so the
 * allocator costs nothing at boot however large the guest is.
 */
#include "probe.h"

/* Offsets in struct boot_params. */
#define BOOT_PARAMS_ACPI_RSDP_ADDR 0x070
#define BOOT_PARAMS_E820_ENTRIES 0x1e8
#define BOOT_PARAMS_CMD_LINE_PTR 0x228
#define BOOT_PARAMS_EXT_CMD_LINE_PTR 0x0c8
#define BOOT_PARAMS_E820_TABLE 0x2d0
/* E820_MAX_ENTRIES_ZEROPAGE and struct boot_e820_entry (addr u64, size u64, type u32). */
#define E820_MAX_ENTRIES 128
#define E820_ENTRY_SIZE 20
#define E820_TYPE_RAM 1
/* Low memory contains the monitor's boot structures and ACPI tables, so the allocator skips it. */
#define LOW_MEMORY_END 0x100000ull
/* The page tables map 4 GiB, so RAM past 4 GiB (above the MMIO gap) is left unused. */
#define MAPPED_LIMIT 0x100000000ull
#define MAX_RANGES 8

struct free_page {
    struct free_page *next;
};

struct range {
    uint64_t next;
    uint64_t end;
};

extern uint8_t __image_start[];
extern uint8_t __image_end[];

static struct range ranges[MAX_RANGES];
static int range_count;
static struct free_page *free_stack;
static uint64_t free_stack_count;
static uint64_t total_pages;

static uint64_t align_up(uint64_t value)
{
    return (value + PAGE_SIZE - 1) & ~(uint64_t)(PAGE_SIZE - 1);
}

static void add_range(uint64_t start, uint64_t end)
{
    start = align_up(start);
    end &= ~(uint64_t)(PAGE_SIZE - 1);
    if (end <= start || range_count == MAX_RANGES)
        return;
    ranges[range_count].next = start;
    ranges[range_count].end = end;
    range_count++;
    total_pages += (end - start) / PAGE_SIZE;
}

/* Add [start, end) less the low megabyte, the probe image and anything past 4 GiB. */
static void add_usable(uint64_t start, uint64_t end)
{
    uint64_t image_start = (uint64_t)__image_start;
    uint64_t image_end = align_up((uint64_t)__image_end);
    if (start < LOW_MEMORY_END)
        start = LOW_MEMORY_END;
    if (end > MAPPED_LIMIT)
        end = MAPPED_LIMIT;
    if (end <= start)
        return;
    if (start < image_end && end > image_start) {
        add_range(start, image_start);
        add_range(image_end, end);
        return;
    }
    add_range(start, end);
}

void boot_info_read(uint64_t zero_page, struct boot_info *info)
{
    const uint8_t *params = (const uint8_t *)zero_page;
    uint64_t cmdline = *(const uint32_t *)(params + BOOT_PARAMS_CMD_LINE_PTR);
    cmdline |= (uint64_t)*(const uint32_t *)(params + BOOT_PARAMS_EXT_CMD_LINE_PTR) << 32;
    info->cmdline = cmdline ? (const char *)cmdline : "";
    info->rsdp_hint = *(const uint64_t *)(params + BOOT_PARAMS_ACPI_RSDP_ADDR);

    unsigned entries = params[BOOT_PARAMS_E820_ENTRIES];
    if (entries > E820_MAX_ENTRIES)
        entries = E820_MAX_ENTRIES;
    for (unsigned i = 0; i < entries; i++) {
        const uint8_t *entry = params + BOOT_PARAMS_E820_TABLE + i * E820_ENTRY_SIZE;
        uint64_t address = *(const uint64_t *)entry;
        uint64_t size = *(const uint64_t *)(entry + 8);
        uint32_t type = *(const uint32_t *)(entry + 16);
        if (type == E820_TYPE_RAM)
            add_usable(address, address + size);
    }
}

void *page_alloc(void)
{
    if (free_stack) {
        struct free_page *page = free_stack;
        free_stack = page->next;
        free_stack_count--;
        return page;
    }
    for (int i = 0; i < range_count; i++) {
        if (ranges[i].next < ranges[i].end) {
            void *page = (void *)ranges[i].next;
            ranges[i].next += PAGE_SIZE;
            return page;
        }
    }
    return NULL;
}

void *page_alloc_zeroed(void)
{
    void *page = page_alloc();
    if (page)
        memset(page, 0, PAGE_SIZE);
    return page;
}

void page_free(void *page)
{
    struct free_page *entry = page;
    entry->next = free_stack;
    free_stack = entry;
    free_stack_count++;
}

uint64_t pages_free(void)
{
    uint64_t count = free_stack_count;
    for (int i = 0; i < range_count; i++)
        count += (ranges[i].end - ranges[i].next) / PAGE_SIZE;
    return count;
}

uint64_t pages_total(void)
{
    return total_pages;
}
