/*
 * Entry of the probe guest, called like a 64-bit Linux kernel (Linux boot protocol,
 * "64-bit BOOT PROTOCOL"): long mode, paging on with an identity map that covers the
 * image, interrupts off, RSI = physical address of struct boot_params (the zero page).
 *
 * The entry sets a stack, clears .bss, loads its own GDT and page tables (an identity map
 * of the first 4 GiB in 2 MiB pages, the MMIO gap from 3 GiB uncached), loads the IDT
 * that probe_main's callee fills, and calls probe_main(zero_page).
 */

#define CODE_SELECTOR 0x08
#define DATA_SELECTOR 0x10
/* Page-table entry bits (Intel SDM vol. 3A, 4.5 "4-Level Paging"). */
#define PTE_PRESENT 0x01
#define PTE_WRITABLE 0x02
#define PTE_PWT 0x08
#define PTE_PCD 0x10
#define PDE_PAGE_SIZE 0x80
#define HUGE_PAGE_SIZE 0x200000
/* 4 GiB / 2 MiB page-directory entries, in four page directories. */
#define PDE_COUNT 2048
#define PD_COUNT 4
#define MMIO_GAP_START 0xC0000000
#define STACK_SIZE 16384

    .section .text.entry, "ax"
    .code64
    .globl _start
_start:
    cli
    cld
    mov %rsi, %r12
    lea stack_top(%rip), %rsp

    /* .bss ends 8-byte aligned (probe.ld), so a qword loop clears it exactly. */
    lea __bss_start(%rip), %rdi
    lea __bss_end(%rip), %rcx
    sub %rdi, %rcx
    shr $3, %rcx
    xor %eax, %eax
    rep stosq

    lgdt gdt_descriptor(%rip)
    mov $DATA_SELECTOR, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %ax, %fs
    mov %ax, %gs
    /* Reload CS through a far return to the next instruction. */
    pushq $CODE_SELECTOR
    lea 1f(%rip), %rax
    pushq %rax
    lretq
1:
    call build_page_tables
    call idt_fill
    lidt idt_descriptor(%rip)
    mov %r12, %rdi
    call probe_main
2:
    cli
    hlt
    jmp 2b

/* Identity-map [0, 4 GiB): PML4[0] -> PDPT, PDPT[0..3] -> four page directories. */
build_page_tables:
    lea pdpt(%rip), %rax
    or $(PTE_PRESENT | PTE_WRITABLE), %rax
    mov %rax, pml4(%rip)

    lea pdpt(%rip), %rdi
    lea page_directories(%rip), %rax
    or $(PTE_PRESENT | PTE_WRITABLE), %rax
    mov $PD_COUNT, %ecx
3:
    mov %rax, (%rdi)
    add $8, %rdi
    add $4096, %rax
    dec %ecx
    jnz 3b

    lea page_directories(%rip), %rdi
    mov $(PTE_PRESENT | PTE_WRITABLE | PDE_PAGE_SIZE), %eax
    mov $MMIO_GAP_START, %r8d
    xor %ecx, %ecx
4:
    mov %rax, %rdx
    cmp %r8, %rax
    jb 5f
    /* Device registers must not be cached: PCD and PWT select the UC memory type. */
    or $(PTE_PCD | PTE_PWT), %rdx
5:
    mov %rdx, (%rdi, %rcx, 8)
    add $HUGE_PAGE_SIZE, %rax
    inc %ecx
    cmp $PDE_COUNT, %ecx
    jb 4b

    lea pml4(%rip), %rax
    mov %rax, %cr3
    ret

/*
 * Interrupt and exception stubs, one per vector, each 16 bytes long so that stub v sits at
 * isr_stubs + 16 * v. Vectors whose exceptions push an error code (Intel SDM vol. 3A,
 * table 6-1: 8, 10-14, 17, 21, 29, 30) skip the dummy push, so every frame looks the same.
 */
    .altmacro
    .macro isr_stub vector
    .balign 16
    .set has_error_code, 0
    .irp code, 8, 10, 11, 12, 13, 14, 17, 21, 29, 30
    .if \vector == \code
    .set has_error_code, 1
    .endif
    .endr
    .if has_error_code == 0
    pushq $0
    .endif
    pushq $\vector
    jmp isr_common
    .endm

    .balign 16
    .globl isr_stubs
isr_stubs:
    .set vector, 0
    .rept 256
    isr_stub %vector
    .set vector, vector + 1
    .endr

/* Save the general registers, call interrupt_dispatch(frame), restore and return. */
isr_common:
    push %rax
    push %rcx
    push %rdx
    push %rbx
    push %rbp
    push %rsi
    push %rdi
    push %r8
    push %r9
    push %r10
    push %r11
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, %rdi
    /* The frame is 8 mod 16 here; align the stack for the C call and keep the old value. */
    mov %rsp, %rbx
    and $-16, %rsp
    call interrupt_dispatch
    mov %rbx, %rsp
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rdi
    pop %rsi
    pop %rbp
    pop %rbx
    pop %rdx
    pop %rcx
    pop %rax
    add $16, %rsp
    iretq

    .section .rodata
    .balign 16
gdt:
    .quad 0
    /* 64-bit code: present, DPL 0, code execute/read, L = 1. */
    .quad 0x00209A0000000000
    /* Data: present, DPL 0, read/write. */
    .quad 0x0000920000000000
gdt_end:
gdt_descriptor:
    .word gdt_end - gdt - 1
    .quad gdt

    .section .data
    .balign 16
    .globl idt_descriptor
idt_descriptor:
    .word 256 * 16 - 1
    .quad idt

    .section .bss.pagetables, "aw", @nobits
    .balign 4096
pml4:
    .skip 4096
pdpt:
    .skip 4096
page_directories:
    .skip 4096 * PD_COUNT
    .globl idt
idt:
    .skip 256 * 16
stack:
    .skip STACK_SIZE
stack_top:

    .section .note.GNU-stack, "", @progbits
