//! Throwaway end-to-end check of the boot loaders: boots a kernel with a bare
//! KVM loop that only models the COM1 transmitter, and prints what the guest
//! writes to it.
//!
//! usage: boot_linux KERNEL [CMDLINE] [MEM_MIB] [STOP_STRING] [MAX_SECONDS]
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VcpuExit};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
use vmm::loader::{self, layout, BootSource};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let kernel = args
        .get(1)
        .expect("usage: boot_linux KERNEL [CMDLINE] [MEM_MIB] [STOP] [SECS]");
    let cmdline = args
        .get(2)
        .map(String::as_str)
        .unwrap_or("earlyprintk=serial console=ttyS0 noapic nolapic");
    let mem_mib: u64 = args.get(3).map(|s| s.parse().unwrap()).unwrap_or(256);
    let stop = args
        .get(4)
        .cloned()
        .unwrap_or_else(|| "Linux version".into());
    let secs: u64 = args.get(5).map(|s| s.parse().unwrap()).unwrap_or(300);

    let kvm = Kvm::new().expect("open /dev/kvm");
    let vm = kvm.create_vm().unwrap();
    vm.set_tss_address(0xfffb_d000).unwrap();
    let mem = vmm::GuestMemory::from_ranges(&layout::ram_regions(mem_mib << 20)).unwrap();
    for (slot, r) in mem.iter().enumerate() {
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: r.start_addr().raw_value(),
            memory_size: r.len(),
            userspace_addr: mem.get_host_address(r.start_addr()).unwrap() as u64,
        };
        // SAFETY: the mapping outlives the VM.
        unsafe { vm.set_user_memory_region(region).unwrap() };
    }
    let vcpu = vm.create_vcpu(0).unwrap();
    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .unwrap();
    vcpu.set_cpuid2(&cpuid).unwrap();

    let t0 = Instant::now();
    let entry = loader::load(
        &mem,
        &BootSource {
            kernel: Path::new(kernel),
            cmdline,
            initrd: None,
        },
    )
    .unwrap_or_else(|e| panic!("load: {e}"));
    loader::configure_vcpu(&vcpu, &entry, &mem).unwrap();
    eprintln!("loaded {entry:x?} in {:?}", t0.elapsed());

    // Every 10 s, kick the vCPU out of KVM_RUN (SIGUSR1 -> EINTR) to show
    // where the guest is.
    extern "C" fn on_sigusr1(_: libc::c_int) {}
    // SAFETY: installs a no-op handler without SA_RESTART so that KVM_RUN
    // returns EINTR.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigusr1 as *const () as usize;
        libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut());
    }
    // SAFETY: pthread_self has no preconditions.
    let me = unsafe { libc::pthread_self() } as usize;
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_secs(10));
        // SAFETY: the main thread lives as long as the process.
        unsafe { libc::pthread_kill(me as libc::pthread_t, libc::SIGUSR1) };
    });

    let mut out = Vec::new();
    let mut exits = 0u64;
    let deadline = t0 + Duration::from_secs(secs);
    let mut vcpu = vcpu;
    loop {
        if Instant::now() > deadline {
            eprintln!("\n[timeout after {exits} exits]");
            break;
        }
        exits += 1;
        match vcpu.run() {
            Ok(VcpuExit::IoOut(0x3f8, data)) => {
                out.extend_from_slice(data);
                std::io::stdout().write_all(data).unwrap();
                std::io::stdout().flush().unwrap();
                if String::from_utf8_lossy(&out).contains(stop.as_str()) {
                    eprintln!("\n[saw {stop:?} after {:?}, {exits} exits]", t0.elapsed());
                    break;
                }
            }
            Ok(VcpuExit::IoOut(..)) => {}
            Ok(VcpuExit::IoIn(port, data)) => {
                let v = match port {
                    0x3fd => 0x60,
                    _ => 0xff,
                };
                data.fill(v);
            }
            Ok(VcpuExit::MmioRead(_, data)) => data.fill(0xff),
            Ok(VcpuExit::MmioWrite(..)) => {}
            Ok(VcpuExit::Hlt) => {
                eprintln!("\n[HLT after {exits} exits, {:?}]", t0.elapsed());
                break;
            }
            Ok(VcpuExit::Shutdown) => {
                let r = vcpu.get_regs().unwrap();
                eprintln!(
                    "\n[shutdown (triple fault?) rip={:#x} after {exits} exits]",
                    r.rip
                );
                break;
            }
            Ok(other) => {
                eprintln!("\n[exit {other:?}]");
                break;
            }
            Err(e) if e.errno() == libc::EINTR => {
                let r = vcpu.get_regs().unwrap();
                let s = vcpu.get_sregs().unwrap();
                eprintln!(
                    "[{:?}: {exits} exits, rip={:#x} rsp={:#x} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs.l={}]",
                    t0.elapsed(), r.rip, r.rsp, s.cr0, s.cr3, s.cr4, s.efer, s.cs.l
                );
            }
            Err(e) => {
                eprintln!("\n[KVM_RUN error {e}]");
                break;
            }
        }
    }
}
