//! # Tandem test guest
//!
//! A tiny freestanding x86-64 kernel, booted by PVH, that Tandem's tests run
//! inside the VM. It is deliberately small and cheap to execute: on the
//! development machines guest code is emulated at ~1 µs per instruction.
//! It never uses SSE/MMX (compiled with those features off; `core::fmt` is
//! never used because its precompiled code does) — `tests/guest_no_sse.rs`
//! in the root package checks the final ELF.
//!
//! ## Boot ABI
//!
//! * ELF64, linked and loaded at physical 1 MiB (0x100000), physical ==
//!   virtual. A `PT_NOTE` holds the Xen note `XEN_ELFNOTE_PHYS32_ENTRY`
//!   (type 18, name "Xen", 8-byte desc = entry address, zero-extended).
//! * Entry (`pvh_start32`) in 32-bit protected mode, paging off, flat
//!   segments, EBX = physical address of `struct hvm_start_info` (magic
//!   0x336ec578). The guest builds its own GDT, page tables (identity map of
//!   the first 4 GiB with 2 MiB pages), IDT and TSS; it does not care about
//!   the loader's GDT or about register state other than EBX.
//! * Command line: the NUL-terminated string at `cmdline_paddr`.
//! * Memory map: `memmap_paddr`/`memmap_entries` (E820 types); only `dirty` and
//!   `fill` need it (its working set starts at 16 MiB and must be RAM).
//!
//! ## Devices used
//!
//! 8259A PIC pair (vectors 0x20..0x2f), 8254 PIT channel 0 (IRQ0), 16550
//! UART at 0x3f8 (IRQ4, output by polling LSR.THRE), debug-exit port 0xf4
//! (`out 0xf4, al`: the byte is the VM's exit status), virtio-mmio block
//! device at 0xd000_0000 (IRQ5) for `disk`, `mail` and the demo, virtio-mmio
//! network device at 0xd000_1000 (IRQ6) for `net-echo` and `mail` (see
//! `virtio/`; smoltcp is the TCP/IP stack, `netstack.rs`).
//!
//! ## Command line: `WORKLOAD [ARGS] [hz=N]`
//!
//! Words containing `=` are options; unknown ones are ignored:
//! * `hz=N` — PIT rate (default 250);
//! * `virtio=0xADDR[,IRQ]`, `virtio_irq=N` — move the virtio-blk device
//!   (default 0xd0000000, IRQ 5);
//! * `virtio-net=0xADDR[,IRQ]` — move the virtio-net device (default
//!   0xd0001000, IRQ 6). Under QEMU microvm (`ioapic2=off`):
//!   `virtio=0xfeb00c00,11 virtio-net=0xfeb00e00,12 extint`;
//! * `ip=A.B.C.D/PREFIX` (default 10.0.2.15/24), `gw=A.B.C.D` — the
//!   guest's static IPv4 configuration;
//! * the bare word `tsc-stats` makes `mail`'s `XSTATS` report TSC cycles
//!   spent busy (for instruction counts under QEMU TCG `-icount`; RDTSC is
//!   not reproducible, so never under record/replay);
//! * the bare word `extint` (testing under QEMU microvm only) enables the
//!   local APIC with LINT0 = ExtINT so that PIC interrupts reach the CPU;
//!   Tandem has no LAPIC and never needs it.
//!
//! Numbers are decimal (`0x` hex where noted). Every run first prints the
//! banner `Tandem test guest` and `cmdline: <cmdline>`. Every workload ends with a line
//! `RESULT <workload> <16 hex digits>` whose checksum depends only on the
//! workload's data (never on timing or the TSC — except `tsc`, on purpose),
//! then exits with status 0.
//!
//! | workload | what it does |
//! |---|---|
//! | (empty) / `demo` | banner, 10 timer ticks, write+verify 16 sectors if a disk is present |
//! | `hello` | banner line and a greeting, no interrupts; checksum of the banner text |
//! | `ticks N` | idles in `sti; hlt` until N timer interrupts have arrived (default 10) |
//! | `dirty PAGES ROUNDS` | rewrites one u64 in each of PAGES 4 KiB pages (at 16 MiB) ROUNDS times, each value chained from the previous one; prints `round K` after each round (defaults 256 4) |
//! | `fill PAGES ROUNDS TICKS` | overwrites every byte of PAGES 4 KiB pages (at 16 MiB) each round with an xorshift stream XORed into the old contents — incompressible, like a real guest's memory; prints `round K`, then idles TICKS timer ticks (defaults 256 4 0); checksum of the whole working set |
//! | `busy N` | N iterations of integer mixing with the timer running and no exits inside the loop (default 100000) |
//! | `disk SECTORS` | writes a per-sector pattern to 512-byte sectors 0..SECTORS (8 per request), FLUSH, reads back and verifies; checksum of the data read (default 64) |
//! | `echo` | prints `echo ready`, then `echo: <line>` for each serial input line (interrupt-driven RX); `quit` ends it |
//! | `tsc N ROUNDS` | reads RDTSC N times and counts the odd values, ROUNDS times (a line each) — deliberately timing dependent (defaults 1000 1) |
//! | `exits N` | N writes to port 0x80 in a tight loop, interrupts off: one VM exit each (the exit-rate benchmark; default 1000) |
//! | `fault` | executes `ud2`: exercises the exception path (exit status 0xe6) |
//! | `net-echo PORT` | TCP echo service on PORT (default 7), 4 connections at once; runs until the VM is stopped |
//! | `mail` | SMTP on port 25 and POP3 on port 110 over an on-disk mailbox (`mail/`); needs the disk and the network device; runs until the VM is stopped |
//!
//! `net-echo` and `mail` print `net-echo listening on port N` / `mail ready: ...`
//! once they accept connections and never print a RESULT line; `mail`
//! formats an unrecognised disk as an empty mailbox and needs about 30 MiB
//! of RAM (its buffers live above 8 MiB). `hello`, `tsc` and `exits` run with interrupts disabled; all other workloads run
//! with the timer (and the IRQs they need) enabled. `disk` and the demo
//! overwrite the first sectors of the disk. `echo` ends a line at `\n` or
//! `\r` (a `\n` right after `\r` is skipped) and keeps 200 bytes per line.
//!
//! ## Exit status
//!
//! 0 success; 1 workload failure (e.g. disk verify mismatch); 2 bad command
//! line (`ERROR unknown workload <name>`, bad number); 3 a required device or
//! memory is missing (`disk` without a virtio-blk device, `dirty` without
//! enough RAM); 4 bad `hvm_start_info`; 0x7f panic; `0xe0 | vector` for a CPU
//! exception (the line `ERROR exception vector=... rip=...` precedes it).
//! Error lines start with `ERROR `.

#![no_std]
#![no_main]

mod arena;
mod boot;
mod cpuinfo;
mod echo;
mod interrupts;
mod io;
mod mail;
mod net_echo;
mod netstack;
mod rt;
mod virtio;
mod workloads;

pub use rt::Racy;

use boot::{HvmStartInfo, HVM_START_MAGIC};

/// Maximum command-line length we look at.
const CMDLINE_MAX: usize = 512;
static CMDLINE: Racy<[u8; CMDLINE_MAX]> = Racy::new([0; CMDLINE_MAX]);

pub const BANNER: &[u8] = b"Tandem test guest";

/// Print `ERROR <msg>` and exit with `status`.
pub fn fail(msg: &[u8], status: u8) -> ! {
    io::puts(b"ERROR ");
    io::putln(msg);
    io::exit(status)
}

/// Print `RESULT <name> <checksum>` and exit with status 0.
pub fn result(name: &[u8], checksum: u64) -> ! {
    io::puts(b"RESULT ");
    io::puts(name);
    io::putc(b' ');
    io::put_hex64(checksum);
    io::putc(b'\n');
    io::exit(0)
}

#[no_mangle]
extern "C" fn kmain(start_info_paddr: u32) -> ! {
    io::serial_init();
    interrupts::init_cpu_tables();
    interrupts::pic_init();

    // SAFETY: the PVH loader put hvm_start_info at EBX; identity mapped.
    let info: HvmStartInfo =
        unsafe { core::ptr::read_volatile(start_info_paddr as usize as *const HvmStartInfo) };
    io::putln(BANNER);
    if start_info_paddr == 0 || info.magic != HVM_START_MAGIC {
        fail(b"bad hvm_start_info magic", 4);
    }

    // Copy the command line (NUL-terminated) into our own buffer.
    // SAFETY: single CPU, before interrupts; the buffer is ours.
    let buf = unsafe { &mut *CMDLINE.get() };
    let mut len = 0;
    if info.cmdline_paddr != 0 {
        let p = info.cmdline_paddr as usize as *const u8;
        for (i, slot) in buf.iter_mut().enumerate() {
            // SAFETY: reads stop at the NUL or at CMDLINE_MAX.
            let c = unsafe { core::ptr::read_volatile(p.add(i)) };
            if c == 0 {
                break;
            }
            *slot = c;
            len += 1;
        }
    }
    let cmdline = &buf[..len.min(CMDLINE_MAX)];
    io::puts(b"cmdline: ");
    io::putln(cmdline);

    let args = workloads::Args::parse(cmdline);
    interrupts::pit_init(args.hz);
    interrupts::pic_unmask(interrupts::IRQ_TIMER);
    workloads::run(&args, &info)
}
