//! IDT, TSS (IST stacks for #NMI, #DF, #MC), the 8259A PIC pair, the 8254
//! PIT and the interrupt entry stubs.
//!
//! Vectors 0..31 are CPU exceptions: fatal, they print `ERROR exception ...`
//! and exit with status `0xe0 | vector`. IRQs 0..15 arrive at 0x20..0x2f.

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::io::{self, inb, outb};
use crate::Racy;

pub const IRQ_BASE: u8 = 0x20;
pub const IRQ_TIMER: u8 = 0;
pub const IRQ_SERIAL: u8 = 4;
const NUM_VECTORS: usize = 48;

/// Timer interrupts seen since boot.
pub static TICKS: AtomicU64 = AtomicU64::new(0);
/// Timer interrupts that arrived while the CPU was working (not idling in
/// [`idle`]): busy time in ticks, for the workloads' cost reports.
pub static BUSY_TICKS: AtomicU64 = AtomicU64::new(0);
static IDLE: AtomicBool = AtomicBool::new(false);
/// With the command-line word `tsc-stats` (benchmarks under QEMU TCG with
/// `-icount`, where the TSC counts instructions): TSC cycles spent outside
/// [`idle`]. Off by default: RDTSC is not reproducible on replay.
pub static MEASURE_TSC: AtomicBool = AtomicBool::new(false);
pub static BUSY_TSC: AtomicU64 = AtomicU64::new(0);
static WAKE_TSC: AtomicU64 = AtomicU64::new(0);

pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: rdtsc only reads the time-stamp counter.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    (hi as u64) << 32 | lo as u64
}

// Entry stubs: push a dummy error code where the CPU does not, push the
// vector, save all GPRs and call `isr_dispatch(&mut Frame)`. The frame is
// 22 qwords (176 bytes) so RSP is 16-byte aligned at the call.
global_asm!(
    r#"
    .section .text.isr, "ax"
    .macro ISR_NOERR n
isr_stub_\n:
    pushq $0
    pushq $\n
    jmp isr_common
    .endm
    .macro ISR_ERR n
isr_stub_\n:
    pushq $\n
    jmp isr_common
    .endm

    .irp n, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31
    ISR_NOERR \n
    .endr
    .irp n, 8,10,11,12,13,14,17,21,29,30
    ISR_ERR \n
    .endr
    .irp n, 32,33,34,35,36,37,38,39,40,41,42,43,44,45,46,47
    ISR_NOERR \n
    .endr

isr_common:
    pushq %rax
    pushq %rbx
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %rbp
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, %rdi
    cld
    call isr_dispatch
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rbp
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rbx
    popq %rax
    addq $16, %rsp
    iretq

    .section .rodata.isr_table, "a"
    .balign 8
    .global isr_table
isr_table:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,32,33,34,35,36,37,38,39,40,41,42,43,44,45,46,47
    .quad isr_stub_\n
    .endr
    .text
"#,
    options(att_syntax)
);

extern "C" {
    static isr_table: [u64; NUM_VECTORS];
    static mut boot_gdt: [u64; 5];
}

/// Saved state, as laid out by `isr_common` and the CPU.
#[repr(C)]
pub struct Frame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

#[repr(C, align(16))]
struct Idt([[u64; 2]; NUM_VECTORS]);
static IDT: Racy<Idt> = Racy::new(Idt([[0; 2]; NUM_VECTORS]));

/// 64-bit TSS as 26 dwords (104 bytes; the u64 fields are unaligned).
#[repr(C, align(16))]
struct Tss([u32; 26]);
static TSS: Racy<Tss> = Racy::new(Tss([0; 26]));

const IST_STACK_SIZE: usize = 4096;
#[repr(C, align(16))]
struct IstStacks([[u8; IST_STACK_SIZE]; 3]);
static IST_STACKS: Racy<IstStacks> = Racy::new(IstStacks([[0; IST_STACK_SIZE]; 3]));

#[repr(C, packed)]
struct DescPtr {
    limit: u16,
    base: u64,
}

/// Load the TSS (with IST1 = #DF, IST2 = NMI, IST3 = #MC) and the IDT.
pub fn init_cpu_tables() {
    // SAFETY: single CPU, called once before interrupts are enabled; the
    // tables are statics that live forever.
    unsafe {
        let stacks = IST_STACKS.get() as u64;
        let tss = &mut (*TSS.get()).0;
        for i in 0..3u64 {
            let top = stacks + (i + 1) * IST_STACK_SIZE as u64;
            let idx = 9 + 2 * i as usize; // ist1 at byte 36 = dword 9
            tss[idx] = top as u32;
            tss[idx + 1] = (top >> 32) as u32;
        }
        tss[25] = 104 << 16; // I/O map base beyond the limit: no bitmap

        let base = TSS.get() as u64;
        let limit = 103u64;
        let low = (limit & 0xffff)
            | ((base & 0xff_ffff) << 16)
            | (0x89u64 << 40) // present, 64-bit TSS (available)
            | (((limit >> 16) & 0xf) << 48)
            | (((base >> 24) & 0xff) << 56);
        let gdt = &raw mut boot_gdt;
        (*gdt)[3] = low;
        (*gdt)[4] = base >> 32;
        let gdtr = DescPtr {
            limit: (5 * 8 - 1) as u16,
            base: gdt as u64,
        };
        asm!("lgdt [{}]", in(reg) &gdtr, options(readonly, nostack, preserves_flags));
        asm!("ltr {0:x}", in(reg) 0x18u16, options(nostack, preserves_flags));

        let idt = &mut (*IDT.get()).0;
        let table = &isr_table;
        for (v, (entry, &handler)) in idt.iter_mut().zip(table.iter()).enumerate() {
            let ist: u64 = match v {
                2 => 2,  // NMI
                8 => 1,  // #DF
                18 => 3, // #MC
                _ => 0,
            };
            entry[0] = (handler & 0xffff)
                | (0x08u64 << 16)
                | (ist << 32)
                | (0x8eu64 << 40) // present, DPL0, 64-bit interrupt gate
                | (((handler >> 16) & 0xffff) << 48);
            entry[1] = handler >> 32;
        }
        let idtr = DescPtr {
            limit: (NUM_VECTORS * 16 - 1) as u16,
            base: IDT.get() as u64,
        };
        asm!("lidt [{}]", in(reg) &idtr, options(readonly, nostack, preserves_flags));
    }
}

/// Testing aid for QEMU microvm (cmdline option `extint`): route the PIC
/// through the local APIC by enabling it and setting LINT0 to ExtINT. Tandem
/// has no LAPIC; never used there.
pub fn lapic_extint() {
    const LAPIC: usize = 0xfee0_0000;
    // SAFETY: identity-mapped LAPIC registers (only with `extint`).
    unsafe {
        core::ptr::write_volatile((LAPIC + 0xf0) as *mut u32, 0x1ff); // SVR: enable, spurious 0xff
        core::ptr::write_volatile((LAPIC + 0x350) as *mut u32, 0x700); // LINT0: ExtINT
        core::ptr::write_volatile((LAPIC + 0x360) as *mut u32, 0x400); // LINT1: NMI
    }
}

const PIC1_CMD: u16 = 0x20;
const PIC1_DATA: u16 = 0x21;
const PIC2_CMD: u16 = 0xa0;
const PIC2_DATA: u16 = 0xa1;

static PIC_MASK: AtomicU64 = AtomicU64::new(0xffff);

/// ICW1..4: edge triggered, cascade (slave on IRQ2), vectors 0x20 / 0x28,
/// 8086 mode. Everything masked except the cascade line.
pub fn pic_init() {
    outb(PIC1_CMD, 0x11);
    outb(PIC2_CMD, 0x11);
    outb(PIC1_DATA, IRQ_BASE);
    outb(PIC2_DATA, IRQ_BASE + 8);
    outb(PIC1_DATA, 0x04);
    outb(PIC2_DATA, 0x02);
    outb(PIC1_DATA, 0x01);
    outb(PIC2_DATA, 0x01);
    PIC_MASK.store(0xffff & !(1 << 2), Ordering::Relaxed);
    pic_write_mask();
}

fn pic_write_mask() {
    let m = PIC_MASK.load(Ordering::Relaxed);
    outb(PIC1_DATA, m as u8);
    outb(PIC2_DATA, (m >> 8) as u8);
}

pub fn pic_unmask(irq: u8) {
    let m = PIC_MASK.load(Ordering::Relaxed) & !(1u64 << irq);
    PIC_MASK.store(m, Ordering::Relaxed);
    pic_write_mask();
}

fn pic_eoi(irq: u8) {
    if irq >= 8 {
        outb(PIC2_CMD, 0x20);
    }
    outb(PIC1_CMD, 0x20);
}

/// In-service register of the master (OCW3 "read ISR").
fn pic_isr(cmd: u16) -> u8 {
    outb(cmd, 0x0b);
    let v = inb(cmd);
    outb(cmd, 0x0a);
    v
}

pub const PIT_HZ: u64 = 1_193_182;
static HZ: AtomicU64 = AtomicU64::new(250);

/// The programmed timer rate.
pub fn hz() -> u64 {
    HZ.load(Ordering::Relaxed)
}

/// Channel 0, lobyte/hibyte, mode 2 (rate generator), binary → IRQ0 at `hz`.
pub fn pit_init(hz: u64) {
    let hz = hz.clamp(19, PIT_HZ);
    HZ.store(hz, Ordering::Relaxed);
    let div = ((PIT_HZ + hz / 2) / hz).clamp(1, 0xffff);
    outb(0x43, 0x34);
    outb(0x40, div as u8);
    outb(0x40, (div >> 8) as u8);
}

#[inline(always)]
pub fn cli() {
    // SAFETY: only changes IF.
    unsafe { asm!("cli", options(nomem, nostack)) }
}

#[inline(always)]
pub fn sti() {
    // SAFETY: only changes IF; handlers are installed before the first sti.
    unsafe { asm!("sti", options(nomem, nostack)) }
}

/// `sti; hlt`: atomically enable interrupts and wait for one (the interrupt
/// shadow of STI guarantees no wake-up is lost).
#[inline(always)]
pub fn sti_hlt() {
    // SAFETY: as sti.
    unsafe { asm!("sti", "hlt", options(nomem, nostack)) }
}

#[no_mangle]
extern "C" fn isr_dispatch(frame: &mut Frame) {
    let vector = frame.vector as u8;
    if vector < IRQ_BASE {
        fatal_exception(frame);
    }
    let irq = vector - IRQ_BASE;
    // Spurious IRQ7 / IRQ15: no EOI to the PIC that raised it.
    if irq == 7 && pic_isr(PIC1_CMD) & 0x80 == 0 {
        return;
    }
    if irq == 15 && pic_isr(PIC2_CMD) & 0x80 == 0 {
        outb(PIC1_CMD, 0x20);
        return;
    }
    match irq {
        IRQ_TIMER => {
            TICKS.store(TICKS.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
            if !IDLE.load(Ordering::Relaxed) {
                BUSY_TICKS.store(BUSY_TICKS.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
            }
        }
        IRQ_SERIAL => crate::echo::serial_irq(),
        _ => {
            crate::virtio::irq(irq);
        }
    }
    pic_eoi(irq);
}

fn fatal_exception(frame: &Frame) -> ! {
    let vector = frame.vector;
    io::puts(b"ERROR exception vector=");
    io::put_hex(vector);
    io::puts(b" error=");
    io::put_hex(frame.error);
    io::puts(b" rip=");
    io::put_hex(frame.rip);
    io::puts(b" rsp=");
    io::put_hex(frame.rsp);
    if vector == 14 {
        let cr2: u64;
        // SAFETY: reading CR2 has no side effects.
        unsafe { asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack)) };
        io::puts(b" cr2=");
        io::put_hex(cr2);
    }
    io::putc(b'\n');
    io::exit(0xe0 | (vector as u8 & 0x1f))
}

/// `sti; hlt` (call with interrupts off), counted as idle time.
pub fn idle() {
    let measure = MEASURE_TSC.load(Ordering::Relaxed);
    if measure {
        let busy = rdtsc().wrapping_sub(WAKE_TSC.load(Ordering::Relaxed));
        BUSY_TSC.store(BUSY_TSC.load(Ordering::Relaxed) + busy, Ordering::Relaxed);
    }
    IDLE.store(true, Ordering::Relaxed);
    sti_hlt();
    IDLE.store(false, Ordering::Relaxed);
    if measure {
        WAKE_TSC.store(rdtsc(), Ordering::Relaxed);
    }
}

/// Current timer tick count.
pub fn ticks() -> u64 {
    TICKS.load(Ordering::Relaxed)
}

/// Idle in HLT until `n` more timer interrupts have arrived.
pub fn wait_ticks(n: u64) {
    let target = ticks() + n;
    loop {
        cli();
        if ticks() >= target {
            break;
        }
        sti_hlt();
    }
    sti();
}
