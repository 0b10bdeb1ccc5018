//! Command-line parsing and the workloads (see the crate docs).

use core::ptr::{read_volatile, write_volatile};

use crate::arena::Arena;
use crate::boot::{HvmMemmapEntry, HvmStartInfo, E820_RAM};
use crate::interrupts::{self, sti};
use crate::netstack::IpConfig;
use crate::rt::{mix64, Hash};
use crate::virtio::{Blk, Buffer, ProbeError, BATCH_SECTORS, SECTOR_SIZE};
use crate::{echo, fail, io, mail, net_echo, result, Racy, BANNER};

const MAX_WORDS: usize = 8;

pub struct Args<'a> {
    words: [&'a [u8]; MAX_WORDS],
    n: usize,
    pub hz: u64,
    pub virtio_base: u64,
    pub virtio_irq: u64,
    pub net_base: u64,
    pub net_irq: u64,
    pub ip: IpConfig,
    pub extint: bool,
}

impl<'a> Args<'a> {
    pub fn parse(cmdline: &'a [u8]) -> Args<'a> {
        let mut args = Args {
            words: [&[]; MAX_WORDS],
            n: 0,
            hz: 250,
            virtio_base: crate::virtio::BLK.base() as u64,
            virtio_irq: crate::virtio::BLK.irq() as u64,
            net_base: crate::virtio::NET.base() as u64,
            net_irq: crate::virtio::NET.irq() as u64,
            ip: IpConfig::DEFAULT,
            extint: false,
        };
        for word in cmdline
            .split(|&c| c == b' ' || c == b'\t' || c == b'\n')
            .filter(|w| !w.is_empty())
        {
            if let Some(eq) = word.iter().position(|&c| c == b'=') {
                let (key, value) = (&word[..eq], word.get(eq + 1..).unwrap_or(&[]));
                match key {
                    b"hz" => match parse_dec(value) {
                        Some(v) if v > 0 => args.hz = v,
                        _ => fail(b"bad hz= value", 2),
                    },
                    b"virtio" => match parse_window(value) {
                        Some((base, irq)) => {
                            args.virtio_base = base;
                            args.virtio_irq = irq.unwrap_or(args.virtio_irq);
                        }
                        None => fail(b"bad virtio= value (ADDR[,IRQ])", 2),
                    },
                    b"virtio-net" => match parse_window(value) {
                        Some((base, irq)) => {
                            args.net_base = base;
                            args.net_irq = irq.unwrap_or(args.net_irq);
                        }
                        None => fail(b"bad virtio-net= value (ADDR[,IRQ])", 2),
                    },
                    b"ip" => match parse_cidr(value) {
                        Some((addr, prefix)) => {
                            args.ip.addr = addr;
                            args.ip.prefix = prefix;
                        }
                        None => fail(b"bad ip= value (A.B.C.D/PREFIX)", 2),
                    },
                    b"gw" => match parse_ipv4(value) {
                        Some(a) => args.ip.gw = Some(a),
                        None => fail(b"bad gw= value (A.B.C.D)", 2),
                    },
                    b"virtio_irq" => match parse_irq(value) {
                        Some(v) => args.virtio_irq = v,
                        None => fail(b"bad virtio_irq= value", 2),
                    },
                    _ => {}
                }
                continue;
            }
            if word == b"tsc-stats" {
                interrupts::MEASURE_TSC.store(true, core::sync::atomic::Ordering::Relaxed);
                continue;
            }
            if word == b"extint" {
                args.extint = true;
                continue;
            }
            if let Some(slot) = args.words.get_mut(args.n) {
                *slot = word;
                args.n += 1;
            }
        }
        args
    }

    fn word(&self, i: usize) -> Option<&'a [u8]> {
        if i < self.n {
            self.words.get(i).copied()
        } else {
            None
        }
    }

    /// Positional number `i` (decimal), or `default` if absent.
    fn num(&self, i: usize, default: u64) -> u64 {
        match self.word(i) {
            None => default,
            Some(w) => match parse_dec(w) {
                Some(v) => v,
                None => {
                    io::puts(b"ERROR bad number ");
                    io::putln(w);
                    io::exit(2)
                }
            },
        }
    }
}

/// An 8259 line a device may use (not the timer, not the cascade).
fn parse_irq(s: &[u8]) -> Option<u64> {
    parse_num(s).filter(|&v| v < 16 && v != 2 && v != 0)
}

/// `ADDR[,IRQ]`: a virtio-mmio window (512-byte aligned, below 4 GiB) and
/// optionally its IRQ line.
fn parse_window(s: &[u8]) -> Option<(u64, Option<u64>)> {
    let (addr, irq) = match s.iter().position(|&c| c == b',') {
        Some(i) => (&s[..i], Some(s.get(i + 1..)?)),
        None => (s, None),
    };
    let base = parse_num(addr).filter(|&v| v % 512 == 0 && v < (4u64 << 30))?;
    let irq = match irq {
        Some(i) => Some(parse_irq(i)?),
        None => None,
    };
    Some((base, irq))
}

/// `A.B.C.D`.
fn parse_ipv4(s: &[u8]) -> Option<[u8; 4]> {
    let mut out = [0u8; 4];
    let mut parts = s.split(|&c| c == b'.');
    for slot in out.iter_mut() {
        let v = parse_dec(parts.next()?)?;
        *slot = u8::try_from(v).ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(out)
}

/// `A.B.C.D/PREFIX` (PREFIX 1..32; without it, 24).
fn parse_cidr(s: &[u8]) -> Option<([u8; 4], u8)> {
    match s.iter().position(|&c| c == b'/') {
        Some(i) => {
            let p = parse_dec(s.get(i + 1..)?)?;
            if p == 0 || p > 32 {
                return None;
            }
            Some((parse_ipv4(&s[..i])?, p as u8))
        }
        None => Some((parse_ipv4(s)?, 24)),
    }
}

/// Decimal, or hex with a `0x` prefix.
fn parse_num(s: &[u8]) -> Option<u64> {
    match s {
        [b'0', b'x' | b'X', hex @ ..] if !hex.is_empty() => {
            let mut v: u64 = 0;
            for &c in hex {
                let d = match c {
                    b'0'..=b'9' => c - b'0',
                    b'a'..=b'f' => c - b'a' + 10,
                    b'A'..=b'F' => c - b'A' + 10,
                    _ => return None,
                };
                v = v.checked_mul(16)?.checked_add(d as u64)?;
            }
            Some(v)
        }
        _ => parse_dec(s),
    }
}

fn parse_dec(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for &c in s {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add((c - b'0') as u64)?;
    }
    Some(v)
}

pub fn run(args: &Args, info: &HvmStartInfo) -> ! {
    crate::virtio::BLK.configure(args.virtio_base as usize, args.virtio_irq as u8);
    crate::virtio::NET.configure(args.net_base as usize, args.net_irq as u8);
    if args.extint {
        interrupts::lapic_extint();
    }
    let name = args.word(0).unwrap_or(b"demo");
    match name {
        b"demo" => demo(),
        b"hello" => hello(),
        b"ticks" => ticks(args.num(1, 10)),
        b"dirty" => dirty(args.num(1, 256), args.num(2, 4), info),
        b"fill" => fill(args.num(1, 256), args.num(2, 4), args.num(3, 0), info),
        b"busy" => busy(args.num(1, 100_000)),
        b"disk" => disk(args.num(1, 64)),
        b"echo" => result(b"echo", echo::run()),
        b"tsc" => tsc(args.num(1, 1000), args.num(2, 1)),
        b"cpuid" => crate::cpuinfo::run(),
        b"fault" => fault(),
        b"exits" => exits(args.num(1, 1000)),
        b"net-echo" => net_echo::run(args.num(1, 7), &args.ip, &mut Arena::new(info)),
        b"mail" => mail::run(&args.ip, &mut Arena::new(info)),
        _ => {
            io::puts(b"ERROR unknown workload ");
            io::putln(name);
            io::exit(2)
        }
    }
}

fn hello() -> ! {
    io::putln(b"hello from the Tandem test guest");
    let mut h = Hash::new();
    h.bytes(BANNER);
    result(b"hello", h.finish())
}

fn ticks(n: u64) -> ! {
    sti();
    interrupts::wait_ticks(n);
    io::puts(b"ticks done ");
    io::put_dec(n);
    io::putc(b'\n');
    let mut h = Hash::new();
    h.bytes(b"ticks");
    h.u64(n);
    result(b"ticks", h.finish())
}

/// Start of the `dirty` working set.
const DIRTY_BASE: u64 = 16 << 20;
const PAGE: u64 = 4096;
const LCG_MUL: u64 = 6_364_136_223_846_793_005;

/// Check that `pages` pages from [`DIRTY_BASE`] are RAM (`what`: the
/// workload, for the error message).
fn working_set(pages: u64, info: &HvmStartInfo, what: &[u8]) {
    if pages == 0 || pages > ((4u64 << 30) - DIRTY_BASE) / PAGE {
        io::puts(b"ERROR ");
        io::puts(what);
        io::putln(b": PAGES out of range");
        io::exit(2)
    }
    let need_end = DIRTY_BASE + pages * PAGE;
    let mut ok = false;
    let entries = (info.memmap_entries as usize).min(256);
    for i in 0..entries {
        // SAFETY: the loader's memory map, identity mapped.
        let e: HvmMemmapEntry =
            unsafe { read_volatile((info.memmap_paddr as usize as *const HvmMemmapEntry).add(i)) };
        if e.kind == E820_RAM && e.addr <= DIRTY_BASE && e.addr.saturating_add(e.size) >= need_end {
            ok = true;
        }
    }
    if info.memmap_paddr == 0 || !ok {
        io::puts(b"ERROR ");
        io::puts(what);
        io::putln(b": not enough RAM at 16 MiB for the working set (give more --mem-mib)");
        io::exit(3)
    }
}

fn dirty(pages: u64, rounds: u64, info: &HvmStartInfo) -> ! {
    working_set(pages, info, b"dirty");
    sti();
    io::puts(b"dirty ");
    io::put_dec(pages);
    io::puts(b" pages x ");
    io::put_dec(rounds);
    io::putln(b" rounds");

    // One u64 per page; its offset varies with the page number.
    let slot = |p: u64| (DIRTY_BASE + p * PAGE + (p % 512) * 8) as usize as *mut u64;
    let mut prev = 0u64;
    for p in 0..pages {
        let x = mix64(p);
        // SAFETY: checked above that [DIRTY_BASE, need_end) is RAM; the
        // kernel image lives below 16 MiB.
        unsafe { write_volatile(slot(p), x) };
        prev = x;
    }
    for r in 1..=rounds {
        prev ^= r;
        for p in 0..pages {
            // SAFETY: as above.
            unsafe {
                let v = read_volatile(slot(p));
                let x = v.wrapping_mul(LCG_MUL).wrapping_add(prev ^ p);
                write_volatile(slot(p), x);
                prev = x;
            }
        }
        io::puts(b"round ");
        io::put_dec(r);
        io::putc(b'\n');
    }
    // `prev` chains every final value of the last pass in order.
    let mut h = Hash::new();
    h.u64(pages);
    h.u64(rounds);
    h.u64(prev);
    result(b"dirty", h.finish())
}

/// Random source of `fill`: two pages of an xorshift64 stream.
static FILL_SRC: Racy<[u64; 1024]> = Racy::new([0; 1024]);

/// `fill PAGES ROUNDS TICKS`: every round overwrites every byte of PAGES
/// pages at 16 MiB with random data, prints `round K`, then idles TICKS
/// timer ticks (0: none). Page P of round R is the 4 KiB window at word
/// `(7P + 13R) mod 512` of a two-page xorshift64 stream (one `rep movsq`
/// each: this host emulates guest code per instruction, and a word-by-word
/// loop would take seconds per MiB), its first word XORed with `P << 32 | R`
/// so that no two pages are alike: incompressible, as a real guest's memory
/// mostly is. The checksum covers the first, middle and last word of every
/// page: a page lost or stale after a migration changes it. Integer only.
fn fill(pages: u64, rounds: u64, idle_ticks: u64, info: &HvmStartInfo) -> ! {
    working_set(pages, info, b"fill");
    sti();
    io::puts(b"fill ");
    io::put_dec(pages);
    io::puts(b" pages x ");
    io::put_dec(rounds);
    io::putln(b" rounds");
    let src = FILL_SRC.get() as *mut u64;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..1024 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // SAFETY: i < 1024, our static buffer.
        unsafe { write_volatile(src.add(i), x) };
    }
    let page = |p: u64| (DIRTY_BASE + p * PAGE) as usize as *mut u64;
    for r in 1..=rounds {
        for p in 0..pages {
            let from = ((7 * p + 13 * r) % 512) as usize;
            // SAFETY: `working_set` checked that [DIRTY_BASE, +pages) is
            // RAM (the kernel image lives below 16 MiB); the source window
            // ends within FILL_SRC (from + 512 <= 1024).
            unsafe {
                core::arch::asm!(
                    "rep movsq",
                    inout("rcx") 512usize => _,
                    inout("rsi") src.add(from) => _,
                    inout("rdi") page(p) => _,
                    options(nostack, preserves_flags)
                );
                write_volatile(page(p), read_volatile(page(p)) ^ (p << 32 | r));
            }
        }
        io::puts(b"round ");
        io::put_dec(r);
        io::putc(b'\n');
        if idle_ticks > 0 {
            interrupts::wait_ticks(idle_ticks);
        }
    }
    let mut h = Hash::new();
    h.u64(pages);
    h.u64(rounds);
    for p in 0..pages {
        for w in [0, 256, 511] {
            // SAFETY: as above.
            h.0 = mix64(h.0 ^ unsafe { read_volatile(page(p).add(w)) });
        }
    }
    result(b"fill", h.finish())
}

fn busy(n: u64) -> ! {
    sti();
    io::puts(b"busy ");
    io::put_dec(n);
    io::putc(b'\n');
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for i in 0..n {
        x ^= x >> 29;
        x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9).wrapping_add(i);
        x = x.rotate_left(17);
    }
    result(b"busy", x)
}

/// `N` writes to port 0x80 in a tight loop with interrupts off: one VM
/// exit each and almost nothing else, for the exit-rate benchmark
/// (`benches/exits.rs`). The checksum covers N and the last POST code read
/// back from port 0x80, which is `N & 0xff` (0 when N is 0).
fn exits(n: u64) -> ! {
    io::puts(b"exits ");
    io::put_dec(n);
    io::putc(b'\n');
    if n > 0 {
        // Exactly the bare benchmark loop: `out 0x80, al; loop`, so that
        // the two measure the same guest instructions per exit.
        // SAFETY: port I/O and RCX only.
        unsafe {
            core::arch::asm!(
                "2:",
                "out 0x80, al",
                "loop 2b",
                inout("rcx") n => _,
                in("al") n as u8,
                options(nomem, nostack, preserves_flags)
            )
        };
    }
    let mut h = Hash::new();
    h.bytes(b"exits");
    h.u64(n);
    h.u64(io::inb(0x80) as u64);
    result(b"exits", h.finish())
}

/// Deliberately executes `ud2`: tests the exception path (exit 0xe6).
fn fault() -> ! {
    io::putln(b"fault: executing ud2");
    // SAFETY: raises #UD, which the IDT turns into a fatal exit.
    unsafe { core::arch::asm!("ud2", options(nomem, nostack)) };
    fail(b"fault: ud2 returned", 1)
}

use interrupts::rdtsc;

fn tsc(n: u64, rounds: u64) -> ! {
    // Branch on the low bits of the distance between consecutive reads:
    // host timing decides them, so a replay that does not trap RDTSC takes
    // other branches and ends with other data (a known divergence source).
    // Each of `rounds` rounds prints its count: one divergence per round.
    let mut h = Hash::new();
    for _ in 0..rounds.max(1) {
        let mut taken = 0u64;
        let mut prev = rdtsc();
        for _ in 0..n {
            let t = rdtsc();
            let delta = t.wrapping_sub(prev);
            prev = t;
            h.u64(delta);
            if (delta >> 3) & 1 == 1 {
                taken += 1;
            }
        }
        io::puts(b"tsc branch taken ");
        io::put_dec(taken);
        io::puts(b" of ");
        io::put_dec(n);
        io::putc(b'\n');
        h.u64(n);
        h.u64(taken);
    }
    result(b"tsc", h.finish())
}

static WBUF: Racy<Buffer> = Racy::new(Buffer([0; BATCH_SECTORS * SECTOR_SIZE]));
static RBUF: Racy<Buffer> = Racy::new(Buffer([0; BATCH_SECTORS * SECTOR_SIZE]));
const WORDS_PER_SECTOR: u64 = (SECTOR_SIZE / 8) as u64;

fn pattern(sector: u64, word: u64) -> u64 {
    mix64((sector << 6 | word) ^ 0x7461_6e64_656d_0000)
}

fn probe_or_fail() -> Option<Blk> {
    match Blk::probe() {
        Ok(b) => Some(b),
        Err(ProbeError::NoDevice) => None,
        Err(ProbeError::Failed(msg)) => fail(msg, 3),
    }
}

/// Write the pattern to `sectors` sectors from 0, flush, read back, verify.
/// Returns the checksum of the data read.
fn disk_check(blk: &mut Blk, sectors: u64) -> u64 {
    let wbuf = WBUF.get();
    let rbuf = RBUF.get();
    let w = wbuf as *mut u64;
    let r = rbuf as *mut u64;
    let mut s = 0;
    while s < sectors {
        let n = (sectors - s).min(BATCH_SECTORS as u64);
        for i in 0..n * WORDS_PER_SECTOR {
            // SAFETY: i < 8 * 64 words = the 4 KiB buffer.
            unsafe {
                write_volatile(
                    w.add(i as usize),
                    pattern(s + i / WORDS_PER_SECTOR, i % WORDS_PER_SECTOR),
                )
            };
        }
        if let Err(msg) = blk.rw(true, s, n as usize, wbuf) {
            fail(msg, 1);
        }
        s += n;
    }
    if let Err(msg) = blk.flush() {
        fail(msg, 1);
    }
    let mut h = Hash::new();
    let mut s = 0;
    while s < sectors {
        let n = (sectors - s).min(BATCH_SECTORS as u64);
        // SAFETY: our buffer; poison it so a read that does nothing fails.
        unsafe { core::ptr::write_bytes(rbuf as *mut u8, 0xa5, BATCH_SECTORS * SECTOR_SIZE) };
        if let Err(msg) = blk.rw(false, s, n as usize, rbuf) {
            fail(msg, 1);
        }
        for i in 0..n * WORDS_PER_SECTOR {
            let sector = s + i / WORDS_PER_SECTOR;
            // SAFETY: as above.
            let v = unsafe { read_volatile(r.add(i as usize)) };
            if v != pattern(sector, i % WORDS_PER_SECTOR) {
                io::puts(b"ERROR disk verify mismatch at sector ");
                io::put_dec(sector);
                io::putc(b'\n');
                io::exit(1);
            }
            h.0 = mix64(h.0 ^ v);
        }
        s += n;
    }
    h.finish()
}

fn disk(sectors: u64) -> ! {
    let Some(mut blk) = probe_or_fail() else {
        io::puts(b"ERROR no virtio-blk device at ");
        io::put_hex(crate::virtio::BLK.base() as u64);
        io::putc(b'\n');
        io::exit(3)
    };
    sti();
    io::puts(b"disk capacity ");
    io::put_dec(blk.capacity);
    io::putln(b" sectors");
    if sectors > blk.capacity {
        fail(b"disk: SECTORS exceeds the disk capacity", 3);
    }
    let sum = disk_check(&mut blk, sectors);
    io::puts(b"disk verified ");
    io::put_dec(sectors);
    io::putln(b" sectors");
    let mut h = Hash::new();
    h.u64(sectors);
    h.u64(sum);
    result(b"disk", h.finish())
}

fn demo() -> ! {
    const DEMO_TICKS: u64 = 10;
    const DEMO_SECTORS: u64 = 16;
    let mut h = Hash::new();
    h.bytes(BANNER);
    io::putln(b"demo: waiting for 10 timer ticks");
    sti();
    interrupts::wait_ticks(DEMO_TICKS);
    io::putln(b"demo: timer ok");
    h.u64(DEMO_TICKS);
    match probe_or_fail() {
        Some(mut blk) if blk.capacity >= DEMO_SECTORS => {
            let sum = disk_check(&mut blk, DEMO_SECTORS);
            io::putln(b"demo: disk ok (16 sectors written and verified)");
            h.u64(sum);
        }
        Some(_) => {
            io::putln(b"demo: disk smaller than 16 sectors, skipping disk check");
            h.bytes(b"smalldisk");
        }
        None => {
            io::putln(b"demo: no disk, skipping disk check");
            h.bytes(b"nodisk");
        }
    }
    io::putln(b"demo: done");
    result(b"demo", h.finish())
}
