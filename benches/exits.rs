//! Exit-rate benchmark: how many VM exits per second Tandem's run loop
//! handles, against a bare minimum KVM loop measured in the same run.
//!
//! `cargo bench --bench exits` (env `TANDEM_BENCH_EXITS=N` changes N,
//! `TANDEM_BENCH_REPEAT=R` the number of runs per measurement; the median is
//! reported).
//!
//! * **bare**: kvm-ioctls directly, one vCPU in 64-bit mode (paging on,
//!   like the test guest) running `mov ecx, N; l: out 0x80, al; loop l;
//!   hlt` in 64 KiB of RAM; the loop
//!   is `KVM_RUN` until HLT, counting `KVM_EXIT_IO` out exits. Nothing else:
//!   no devices, no state, no bookkeeping — the floor for one exit.
//! * **tandem**: the `tandem` binary running the built-in guest's
//!   `exits N` workload (the same `out 0x80, al; loop` with interrupts
//!   off), console captured and checked for its RESULT line. Its startup (process, VM creation, boot,
//!   banner, result) is measured with `exits 0` and subtracted:
//!   exits/s = N / (t(exits N) - t(exits 0)).
//!
//! On the PVM development machines both numbers are dominated by the
//! emulation of guest code and of each exit; on VT-x/AMD-V hosts they show
//! the run loop's real cost.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const TANDEM: &str = env!("CARGO_BIN_EXE_tandem");
const CODE_ADDR: u64 = 0x1000;
const PML4_ADDR: u64 = 0x2000;
const PDPT_ADDR: u64 = 0x3000;
const PD_ADDR: u64 = 0x4000;
const MEM_SIZE: usize = 0x10000;

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

/// The bare loop: returns (exits counted, time of the KVM_RUN loop).
fn bare(n: u32) -> (u64, Duration) {
    let kvm = Kvm::new().expect("open /dev/kvm");
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    // Intel needs a TSS area for real mode; harmless elsewhere.
    let _ = vm.set_tss_address(0xfffb_d000);
    let mem: GuestMemoryMmap =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory");
    let host = mem.get_host_address(GuestAddress(0)).expect("host address") as u64;
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        userspace_addr: host,
        flags: 0,
    };
    // SAFETY: the region is backed by `mem`, which outlives the VM.
    unsafe { vm.set_user_memory_region(region) }.expect("KVM_SET_USER_MEMORY_REGION");

    // 64-bit code, like the test guest's loop (rcx = N).
    let mut code = vec![0xb9]; // mov ecx, imm32 (zero-extends to rcx)
    code.extend_from_slice(&n.to_le_bytes());
    code.extend_from_slice(&[
        0xe6, 0x80, // l: out 0x80, al
        0xe2, 0xfc, // loop l
        0xf4, // hlt
    ]);
    mem.write_slice(&code, GuestAddress(CODE_ADDR))
        .expect("write code");
    // Identity map of the first 2 MiB: PML4 -> PDPT -> PD with one 2 MiB page.
    for (addr, entry) in [
        (PML4_ADDR, PDPT_ADDR | 3),
        (PDPT_ADDR, PD_ADDR | 3),
        (PD_ADDR, 0x83u64), // present, writable, 2 MiB page
    ] {
        mem.write_obj(entry, GuestAddress(addr))
            .expect("page tables");
    }

    let mut vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    let mut sregs = vcpu.get_sregs().expect("KVM_GET_SREGS");
    let code_seg = kvm_bindings::kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x08,
        type_: 11, // execute/read, accessed
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    };
    let data_seg = kvm_bindings::kvm_segment {
        selector: 0x10,
        type_: 3, // read/write, accessed
        db: 1,
        l: 0,
        ..code_seg
    };
    sregs.cs = code_seg;
    sregs.ds = data_seg;
    sregs.es = data_seg;
    sregs.fs = data_seg;
    sregs.gs = data_seg;
    sregs.ss = data_seg;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = 1 << 5; // PAE
    sregs.cr0 = 0x8000_0011; // PG | ET | PE
    sregs.efer = 0x500; // LME | LMA
    vcpu.set_sregs(&sregs).expect("KVM_SET_SREGS");
    let regs = kvm_bindings::kvm_regs {
        rip: CODE_ADDR,
        rsp: MEM_SIZE as u64,
        rflags: 2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).expect("KVM_SET_REGS");

    let mut exits = 0u64;
    let start = Instant::now();
    loop {
        match vcpu.run().expect("KVM_RUN") {
            VcpuExit::IoOut(0x80, _) => exits += 1,
            VcpuExit::Hlt => break,
            other => panic!("bare loop: unexpected exit {other:?}"),
        }
    }
    let t = start.elapsed();
    assert_eq!(
        exits, n as u64,
        "bare loop counted the wrong number of exits"
    );
    drop(mem);
    (exits, t)
}

/// Wall time of `tandem run --cmdline "exits N"`, checked to succeed.
fn tandem(n: u64) -> Duration {
    let cmdline = format!("exits {n}");
    let start = Instant::now();
    let out = Command::new(TANDEM)
        .args(["run", "--cmdline", &cmdline])
        .stdin(Stdio::null())
        .output()
        .expect("run tandem");
    let t = start.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !stdout.contains("RESULT exits ") {
        panic!(
            "tandem run --cmdline {cmdline:?} failed ({})\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    t
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn row(name: &str, exits: u64, t: Duration) -> (f64, f64) {
    let rate = exits as f64 / t.as_secs_f64();
    let ns = t.as_secs_f64() * 1e9 / exits as f64;
    println!(
        "{name:<8} {exits:>9} {:>10.3} s {:>12.0} {:>10.0}",
        t.as_secs_f64(),
        rate,
        ns
    );
    (rate, ns)
}

fn main() {
    let bare_n = env_u64("TANDEM_BENCH_BARE_EXITS", 200_000);
    let n = env_u64("TANDEM_BENCH_EXITS", 100_000);
    let repeat = env_u64("TANDEM_BENCH_REPEAT", 3).max(1);
    let bare_n = u32::try_from(bare_n).expect("TANDEM_BENCH_BARE_EXITS fits in 32 bits");

    // Warm up (page cache, KVM module paths).
    bare(1000);
    tandem(0);

    let bare_t = median((0..repeat).map(|_| bare(bare_n).1).collect());
    let startup = median((0..repeat).map(|_| tandem(0)).collect());
    let full = median((0..repeat).map(|_| tandem(n)).collect());
    let loop_t = full.saturating_sub(startup);
    assert!(
        loop_t > startup / 10,
        "the exit loop ({loop_t:?}) is lost in the startup noise ({startup:?}); raise TANDEM_BENCH_EXITS"
    );

    println!();
    println!("exit-rate benchmark (median of {repeat} runs; each exit is one `out 0x80, al`)");
    println!(
        "tandem startup (`exits 0`): {:.3} s, subtracted",
        startup.as_secs_f64()
    );
    println!();
    println!(
        "{:<8} {:>9} {:>12} {:>12} {:>10}",
        "loop", "exits", "time", "exits/s", "ns/exit"
    );
    let (bare_rate, bare_ns) = row("bare", bare_n as u64, bare_t);
    let (tandem_rate, tandem_ns) = row("tandem", n, loop_t);
    println!();
    println!(
        "ratio bare/tandem: {:.2}x   tandem overhead per exit: {:.0} ns",
        bare_rate / tandem_rate,
        tandem_ns - bare_ns
    );
}
