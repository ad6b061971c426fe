/*
 * COM1 8250 console with interrupt-driven input, the interrupt controllers, a PIT clock and
 * the i8042 reset.
 *
 * Input: IRQ 4 reaches the IOAPIC (pin 4, KVM's default GSI routing) and is delivered to the
 * boot CPU as vector SERIAL_VECTOR. The handler drains the receive FIFO into a ring buffer.
 * A reader that finds the ring empty waits with `sti; hlt`. STI delays interrupts until the
 * instruction after it completes, so the wake-up cannot fall between the check and HLT.
 * An idle probe therefore costs no exits to the monitor.
 */
#include "probe.h"

/* 8250/16550 registers, offsets from the base port (PC16550D datasheet, table II). */
#define COM1_PORT 0x3f8
#define UART_DATA 0
#define UART_IER 1
#define UART_FCR 2
#define UART_MCR 4
#define UART_LSR 5
#define UART_IER_RECEIVED_DATA 0x01
#define UART_FCR_ENABLE_CLEAR 0x07
#define UART_MCR_DTR_RTS_OUT2 0x0b
#define UART_LSR_DATA_READY 0x01
#define COM1_IRQ 4

/* 8259A PIC data ports: writing OCW1 there sets the interrupt mask register. */
#define PIC_MASTER_DATA 0x21
#define PIC_SLAVE_DATA 0xa1
#define PIC_MASK_ALL 0xff

/* Local APIC registers (Intel SDM vol. 3A, table 11-1), xAPIC MMIO at its default base. */
#define LAPIC_BASE 0xfee00000ull
#define LAPIC_ID 0x020
#define LAPIC_TPR 0x080
#define LAPIC_EOI 0x0b0
#define LAPIC_SVR 0x0f0
#define LAPIC_SVR_ENABLE 0x100
#define SPURIOUS_VECTOR 0xff

/* I/O APIC (82093AA datasheet): index and data window, redirection entries from 0x10. */
#define IOAPIC_BASE 0xfec00000ull
#define IOAPIC_REGSEL 0x00
#define IOAPIC_WINDOW 0x10
#define IOAPIC_REDIRECTION_TABLE 0x10

/* Interrupt vector of the serial line, above the 32 vectors of CPU exceptions. */
#define SERIAL_VECTOR 0x24

/* 8254 PIT: channel 0 counts down from 65536 at 1.193182 MHz (mode 2, rate generator). */
#define PIT_CHANNEL0 0x40
#define PIT_COMMAND 0x43
#define PIT_CHANNEL0_LOBYTE_HIBYTE_MODE2 0x34
#define PIT_LATCH_CHANNEL0 0x00
#define PIT_HZ 1193182ull

/* i8042 command port. Command 0xfe pulses the CPU reset line. */
#define I8042_COMMAND_PORT 0x64
#define I8042_RESET_CPU 0xfe

#define INPUT_RING_SIZE 256

static volatile uint8_t input_ring[INPUT_RING_SIZE];
static volatile uint32_t input_head;
static volatile uint32_t input_tail;
static uint16_t pit_last;
static uint64_t pit_ticks;

static void ioapic_write(uint32_t reg, uint32_t value)
{
    mmio_write32(IOAPIC_BASE + IOAPIC_REGSEL, reg);
    mmio_write32(IOAPIC_BASE + IOAPIC_WINDOW, value);
}

static void lapic_write(uint32_t reg, uint32_t value)
{
    mmio_write32(LAPIC_BASE + reg, value);
}

static void route_serial_interrupt(void)
{
    uint32_t apic_id = mmio_read32(LAPIC_BASE + LAPIC_ID) >> 24;
    /* Fixed delivery, physical destination, active high, edge triggered, unmasked. */
    ioapic_write(IOAPIC_REDIRECTION_TABLE + 2 * COM1_IRQ + 1, apic_id << 24);
    ioapic_write(IOAPIC_REDIRECTION_TABLE + 2 * COM1_IRQ, SERIAL_VECTOR);
}

void console_init(void)
{
    /* The PICs also see IRQ 4 and would pass it through LINT0 (ExtINT), so mask them. */
    outb(PIC_MASTER_DATA, PIC_MASK_ALL);
    outb(PIC_SLAVE_DATA, PIC_MASK_ALL);
    lapic_write(LAPIC_TPR, 0);
    lapic_write(LAPIC_SVR, LAPIC_SVR_ENABLE | SPURIOUS_VECTOR);
    route_serial_interrupt();

    outb(COM1_PORT + UART_FCR, UART_FCR_ENABLE_CLEAR);
    outb(COM1_PORT + UART_MCR, UART_MCR_DTR_RTS_OUT2);
    outb(COM1_PORT + UART_IER, UART_IER_RECEIVED_DATA);
    __asm__ __volatile__("sti");
}

static void serial_interrupt(void)
{
    while (inb(COM1_PORT + UART_LSR) & UART_LSR_DATA_READY) {
        uint8_t c = inb(COM1_PORT + UART_DATA);
        if (input_head - input_tail < INPUT_RING_SIZE) {
            input_ring[input_head % INPUT_RING_SIZE] = c;
            input_head++;
        }
    }
}

struct interrupt_frame {
    uint64_t r15, r14, r13, r12, r11, r10, r9, r8;
    uint64_t rdi, rsi, rbp, rbx, rdx, rcx, rax;
    uint64_t vector, error_code;
    uint64_t rip, cs, rflags, rsp, ss;
};

static uint64_t read_cr2(void)
{
    uint64_t value;
    __asm__ __volatile__("mov %%cr2, %0" : "=r"(value));
    return value;
}

void interrupt_dispatch(struct interrupt_frame *frame)
{
    if (frame->vector == SERIAL_VECTOR) {
        serial_interrupt();
        lapic_write(LAPIC_EOI, 0);
        return;
    }
    if (frame->vector == SPURIOUS_VECTOR)
        return;
    if (frame->vector >= 32) {
        /* An unexpected device interrupt: acknowledge it and carry on. */
        lapic_write(LAPIC_EOI, 0);
        return;
    }
    kprintf("\npanic: exception %lu error 0x%lx at rip 0x%lx (cr2 0x%lx, rsp 0x%lx)\n",
            frame->vector, frame->error_code, frame->rip, read_cr2(), frame->rsp);
    for (;;)
        __asm__ __volatile__("cli; hlt");
}

struct idt_entry {
    uint16_t offset_low;
    uint16_t selector;
    uint8_t ist;
    uint8_t type_attributes;
    uint16_t offset_middle;
    uint32_t offset_high;
    uint32_t reserved;
} __attribute__((packed));

extern struct idt_entry idt[256];
extern const uint8_t isr_stubs[];
/* Present, DPL 0, 64-bit interrupt gate (IF cleared on entry). */
#define IDT_INTERRUPT_GATE 0x8e
#define CODE_SELECTOR 0x08
#define ISR_STUB_SIZE 16

void idt_fill(void)
{
    for (int vector = 0; vector < 256; vector++) {
        uint64_t handler = (uint64_t)(isr_stubs + ISR_STUB_SIZE * vector);
        idt[vector].offset_low = (uint16_t)handler;
        idt[vector].selector = CODE_SELECTOR;
        idt[vector].type_attributes = IDT_INTERRUPT_GATE;
        idt[vector].offset_middle = (uint16_t)(handler >> 16);
        idt[vector].offset_high = (uint32_t)(handler >> 32);
    }
}

/* Write bytes to THR, turning LF into CR LF. The monitor's UART sends each byte at once. */
void console_write(const char *text, size_t length)
{
    for (size_t i = 0; i < length; i++) {
        if (text[i] == '\n')
            outb(COM1_PORT + UART_DATA, '\r');
        outb(COM1_PORT + UART_DATA, (uint8_t)text[i]);
    }
}

int console_getchar(void)
{
    for (;;) {
        __asm__ __volatile__("cli");
        if (input_tail != input_head) {
            uint8_t c = input_ring[input_tail % INPUT_RING_SIZE];
            input_tail++;
            __asm__ __volatile__("sti");
            return c;
        }
        __asm__ __volatile__("sti; hlt" ::: "memory");
    }
}

/*
 * Read one line into `line` (NUL-terminated, at most size - 1 characters) and return its
 * length. CR or LF ends the line; backspace or DEL erases one character. Without echo
 * nothing is printed but the final newline.
 */
size_t console_readline(char *line, size_t size, bool echo)
{
    size_t length = 0;
    for (;;) {
        int c = console_getchar();
        if (c == '\r' || c == '\n') {
            line[length] = '\0';
            console_write("\n", 1);
            return length;
        }
        if (c == '\b' || c == 0x7f) {
            if (length) {
                length--;
                if (echo)
                    console_write("\b \b", 3);
            }
            continue;
        }
        if (c < ' ' || length + 1 >= size)
            continue;
        line[length++] = (char)c;
        if (echo)
            console_write((const char *)&line[length - 1], 1);
    }
}

void clock_init(void)
{
    outb(PIT_COMMAND, PIT_CHANNEL0_LOBYTE_HIBYTE_MODE2);
    outb(PIT_CHANNEL0, 0);
    outb(PIT_CHANNEL0, 0);
    pit_last = 0;
}

/* Accumulate PIT ticks. Callers must read the clock at least once per 55 ms wrap. */
static uint64_t clock_ticks(void)
{
    outb(PIT_COMMAND, PIT_LATCH_CHANNEL0);
    uint16_t low = inb(PIT_CHANNEL0);
    uint16_t count = (uint16_t)(low | (uint16_t)inb(PIT_CHANNEL0) << 8);
    pit_ticks += (uint16_t)(pit_last - count);
    pit_last = count;
    return pit_ticks;
}

uint64_t clock_ms(void)
{
    return clock_ticks() * 1000 / PIT_HZ;
}

uint64_t clock_us(void)
{
    return clock_ticks() * 1000000 / PIT_HZ;
}

void machine_reset(void)
{
    outb(I8042_COMMAND_PORT, I8042_RESET_CPU);
    for (;;)
        __asm__ __volatile__("cli; hlt");
}
