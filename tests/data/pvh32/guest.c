/*
 * A 32-bit PVH test guest (ELFCLASS32, EM_386), built by tests/pvh32.rs
 * with the system compiler:
 *
 *   gcc -m32 -ffreestanding -nostdlib -static -no-pie -fno-pic \
 *       -mgeneral-regs-only -O2 -Wl,-Ttext-segment=0x100000 -o guest guest.c
 *
 * PVH enters at the note's 32-bit physical address in flat protected mode
 * without paging, with EBX pointing at hvm_start_info. The guest prints on
 * the UART (COM1), dirties 256 KiB of memory, reads the TSC (and keeps
 * nothing of its value: a replay must reach the same state), prints a
 * RESULT line with a checksum and ends through the debug-exit port 0xf4.
 * No x87 or SSE instruction is used (-mgeneral-regs-only).
 */

typedef unsigned int u32;

#define XEN_ELFNOTE_PHYS32_ENTRY 18
#define START_INFO_MAGIC 0x336ec578u

__asm__(
    ".section .note.Xen, \"a\", @note\n"
    ".balign 4\n"
    ".long 4, 4, " "18" "\n"
    ".asciz \"Xen\"\n"
    ".balign 4\n"
    ".long _start\n"
    ".previous\n"
    ".text\n"
    ".globl _start\n"
    "_start:\n"
    "  movl $guest_stack + 16384, %esp\n"
    "  pushl %ebx\n"
    "  call cmain\n"
    "1: hlt\n"
    "  jmp 1b\n");

unsigned char guest_stack[16384] __attribute__((aligned(16)));

static inline void outb(unsigned short port, unsigned char v) {
    __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static void putc_(char c) { outb(0x3f8, (unsigned char)c); }

static void puts_(const char *s) {
    while (*s)
        putc_(*s++);
}

static void puthex(u32 v) {
    for (int i = 28; i >= 0; i -= 4)
        putc_("0123456789abcdef"[(v >> i) & 15]);
}

volatile u32 work[65536]; /* 256 KiB in .bss: dirtied below */

/* Two TSC reads: 1 if the second is not below the first. The values stay
 * inside this asm (every register it used is cleared), so nothing of the
 * host's timing reaches guest state that a replay compares. */
static int tsc_moves_forward(void) {
    u32 forward;
    __asm__ volatile(
        "rdtsc\n"
        "movl %%eax, %%esi\n"
        "movl %%edx, %%edi\n"
        "rdtsc\n"
        "subl %%esi, %%eax\n"
        "sbbl %%edi, %%edx\n"
        "setns %%cl\n"
        "movzbl %%cl, %0\n"
        "xorl %%eax, %%eax\n"
        "xorl %%edx, %%edx\n"
        "xorl %%esi, %%esi\n"
        "xorl %%edi, %%edi\n"
        "xorl %%ecx, %%ecx\n"
        : "=b"(forward)
        :
        : "eax", "ecx", "edx", "esi", "edi", "cc");
    return (int)forward;
}

void cmain(const u32 *start_info);
void cmain(const u32 *start_info) {
    puts_("hello from a 32-bit PVH guest\n");
    if (start_info[0] != START_INFO_MAGIC) {
        puts_("ERROR bad hvm_start_info magic\n");
        outb(0xf4, 3);
    }
    u32 sum = 0x811c9dc5u;
    for (u32 round = 0; round < 4; round++) {
        for (u32 i = 0; i < 65536; i += 1024 / 4) {
            work[i] = work[i] * 31u + i + round;
            sum = (sum ^ work[i]) * 16777619u;
        }
        putc_('.');
    }
    putc_('\n');
    int forward = tsc_moves_forward();
    puts_(forward ? "tsc ok\n" : "tsc went backwards\n");
    puts_("RESULT pvh32 ");
    puthex(sum);
    putc_('\n');
    outb(0xf4, forward ? 0 : 1);
    for (;;)
        __asm__ volatile("hlt");
}
