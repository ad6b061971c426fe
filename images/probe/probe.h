/* Shared declarations of the probe guest: a freestanding 64-bit test kernel. */
#ifndef PROBE_H
#define PROBE_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define PROBE_VERSION "probe 0.1 x86_64"
#define PAGE_SIZE 4096u

/* Compiler barrier; x86 keeps stores and loads to ordinary memory in order (TSO). */
#define barrier() __asm__ __volatile__("" ::: "memory")

/* Port and MMIO access. */
static inline void outb(uint16_t port, uint8_t value)
{
    __asm__ __volatile__("outb %0, %1" : : "a"(value), "Nd"(port));
}

static inline uint8_t inb(uint16_t port)
{
    uint8_t value;
    __asm__ __volatile__("inb %1, %0" : "=a"(value) : "Nd"(port));
    return value;
}

static inline uint32_t mmio_read32(uint64_t address)
{
    return *(volatile uint32_t *)address;
}

static inline void mmio_write32(uint64_t address, uint32_t value)
{
    *(volatile uint32_t *)address = value;
}

static inline uint8_t mmio_read8(uint64_t address)
{
    return *(volatile uint8_t *)address;
}

static inline void mmio_write8(uint64_t address, uint8_t value)
{
    *(volatile uint8_t *)address = value;
}

/* lib.c: freestanding string, number and formatting helpers. */
void *memset(void *destination, int value, size_t count);
void *memcpy(void *destination, const void *source, size_t count);
int memcmp(const void *left, const void *right, size_t count);
size_t strlen(const char *text);
int strcmp(const char *left, const char *right);
int strncmp(const char *left, const char *right, size_t count);
bool parse_u64(const char *text, uint64_t *value);
int kvsnprintf(char *buffer, size_t size, const char *format, va_list arguments);
void kprintf(const char *format, ...) __attribute__((format(printf, 1, 2)));
void print_hex_lines(const uint8_t *data, size_t length, size_t per_line);

/* console.c: COM1, interrupt controllers, PIT clock, i8042 reset. */
void console_init(void);
void console_write(const char *text, size_t length);
int console_getchar(void);
size_t console_readline(char *line, size_t size, bool echo);
void clock_init(void);
uint64_t clock_ms(void);
uint64_t clock_us(void);
void machine_reset(void) __attribute__((noreturn));

/* mem.c: boot_params, e820 and the page allocator. */
struct boot_info {
    const char *cmdline;
    uint64_t rsdp_hint;
};
void boot_info_read(uint64_t zero_page, struct boot_info *info);
void *page_alloc(void);
void *page_alloc_zeroed(void);
void page_free(void *page);
uint64_t pages_free(void);
uint64_t pages_total(void);

/* discover.c: virtio-mmio devices from the command line and from ACPI. */
#define MAX_DEVICES 16
struct device_location {
    uint64_t base;
    uint32_t irq;
};
struct discovery {
    struct device_location cmdline[MAX_DEVICES];
    struct device_location acpi[MAX_DEVICES];
    int cmdline_count;
    int acpi_count;
    int cpu_count;
    bool rsdp_found;
};
void discover_cmdline(const char *cmdline, struct discovery *found);
void discover_acpi(uint64_t rsdp_hint, struct discovery *found);

/* shell.c */
void shell_run(void) __attribute__((noreturn));

/* main.c */
const struct discovery *probe_discovery(void);

#endif
