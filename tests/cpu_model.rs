//! Named CPU models (docs/cpu-models.md) through the binary: the guest sees
//! its model's CPUID table (the built-in guest's `cpuid` workload prints
//! it), a recording replays with the model it was recorded with, a log or
//! snapshot whose model this host cannot provide is refused naming the
//! missing feature, and an unknown `--cpu-model` names the choices.

mod common;

use std::path::Path;

use common::{arg, tandem, Output, TempDir};
use vmm::machine::{LogConfig, MachineState};
use vmm::vstate::cpu_model::{CpuModel, CpuidLeaf};

/// Registers that this development machine's PVM-based KVM (the
/// `kvm_pvm` module) fills from the hardware whatever the table says:
/// leaf 0x1 ECX/EDX, all of leaf 0x7 and leaf 0xd. `(leaf, subleaf,
/// register index)`; every other register must be the model's.
fn pvm_overrides(leaf: u32, reg: usize) -> bool {
    matches!((leaf, reg), (0x1, 2 | 3) | (0x7, _) | (0xd, _))
}

fn is_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// `cpuid LEAF.SUB EAX EBX ECX EDX` lines of the `cpuid` workload.
fn guest_cpuid(out: &Output) -> Vec<(u32, u32, [u32; 4])> {
    let hex = |s: &str| u32::from_str_radix(s.trim_start_matches("0x"), 16).unwrap();
    out.stdout
        .lines()
        .filter_map(|l| l.strip_prefix("cpuid "))
        .map(|l| {
            let w: Vec<&str> = l.split(' ').collect();
            let (leaf, sub) = w[0].split_once('.').unwrap();
            let regs = [hex(w[1]), hex(w[2]), hex(w[3]), hex(w[4])];
            (hex(leaf), sub.parse().unwrap(), regs)
        })
        .collect()
}

/// What the model says the guest reads at (leaf, sub): the table's entry,
/// or for a leaf beyond the table the highest basic leaf (KVM's rule for a
/// GenuineIntel guest).
fn expected(model: &CpuModel, leaf: u32, sub: u32) -> [u32; 4] {
    let find = |f: u32, i: u32| {
        model
            .leaves
            .iter()
            .find(|l| l.function == f && (!l.indexed || l.index == i))
    };
    let max_basic = find(0, 0).unwrap().eax;
    let l: &CpuidLeaf = find(leaf, sub).unwrap_or_else(|| find(max_basic, sub).unwrap());
    [l.eax, l.ebx, l.ecx, l.edx]
}

/// Every register the guest read is the model's (but the ones PVM
/// overrides, on a PVM host: said on stderr).
fn assert_guest_sees(model: &CpuModel, out: &Output) {
    out.assert_status(0);
    let seen = guest_cpuid(out);
    assert!(seen.len() >= 10, "{}", out.describe());
    let mut skipped = 0;
    for (leaf, sub, regs) in seen {
        let want = expected(model, leaf, sub);
        for r in 0..4 {
            if is_pvm() && pvm_overrides(leaf, r) {
                skipped += 1;
                continue;
            }
            assert_eq!(
                regs[r],
                want[r],
                "cpuid {leaf:#x}.{sub} register {r}: guest saw {:#x}, model {} has {:#x}\n{}",
                regs[r],
                model.name,
                want[r],
                out.describe()
            );
        }
    }
    if skipped > 0 {
        eprintln!(
            "PVM host: {skipped} registers set by kvm_pvm from the hardware were not compared"
        );
    }
    assert!(
        out.stdout.contains("vendor GenuineIntel\n"),
        "{}",
        out.describe()
    );
}

#[test]
fn an_unknown_model_names_the_choices() {
    let out = tandem(&["run", "--cpu-model", "nope", "--cmdline", "hello"]);
    out.assert_status(2);
    for want in ["nope", "baseline", "v2"] {
        assert!(out.stderr.contains(want), "{}", out.describe());
    }
    let rec = tandem(&[
        "record",
        "--log",
        "/nonexistent/x.tlog",
        "--cpu-model",
        "host",
    ]);
    rec.assert_status(2);
    assert!(rec.stderr.contains("baseline, v2"), "{}", rec.describe());
}

#[test]
fn the_guest_sees_the_baseline_table() {
    let out = tandem(&["run", "--cpu-model", "baseline", "--cmdline", "cpuid"]);
    assert_guest_sees(&CpuModel::baseline(), &out);
    assert!(
        out.stdout.contains("brand Tandem baseline (x86-64-v1)\n"),
        "{}",
        out.describe()
    );
}

/// `v2` either runs and shows its table, or (on a host without SSE4.2 and
/// the rest, such as PVM) is refused naming what is missing.
#[test]
fn v2_runs_or_is_refused_naming_the_missing_features() {
    let out = tandem(&["run", "--cpu-model", "v2", "--cmdline", "cpuid"]);
    if out.status == 0 {
        assert_guest_sees(&CpuModel::named("v2").unwrap(), &out);
    } else {
        out.assert_status(2);
        assert!(
            out.stderr.contains("this host's KVM lacks ")
                && out
                    .stderr
                    .contains(" needed by CPU model v2; this host provides baseline"),
            "{}",
            out.describe()
        );
        assert!(out.stdout.is_empty(), "{}", out.describe());
    }
}

/// The default is a model, never the host: the log records it.
#[test]
fn a_recording_replays_with_its_model() {
    let dir = TempDir::new("cpumodel");
    let log = dir.file("r.tlog");
    let rec = tandem(&["record", "--log", arg(&log), "--cmdline", "cpuid"]);
    rec.assert_status(0);
    let dump = tandem(&["dump-log", "--log", arg(&log)]);
    dump.assert_status(0);
    let default = vmm::vstate::cpuid::host_default().unwrap();
    assert!(
        dump.stdout
            .contains(&format!("CpuModel {{ name: \"{}\"", default.name)),
        "{}",
        dump.describe()
    );
    let rep = tandem(&["replay", "--log", arg(&log)]);
    rep.assert_status(0);
    assert!(rep.stderr.contains("replay verified"), "{}", rep.describe());
    assert_eq!(rep.stdout, rec.stdout, "the replayed guest saw another CPU");
    assert_guest_sees(&default, &rep);
}

/// Set a bit no CPU has (leaf 0x1 EDX bit 10 is reserved) in a model.
fn demand_reserved_bit(cpu: &mut CpuModel) {
    cpu.leaves.iter_mut().find(|l| l.function == 1).unwrap().edx |= 1 << 10;
}

#[track_caller]
fn assert_refused_naming_the_feature(out: &Output) {
    out.assert_status(2);
    assert!(
        out.stderr
            .contains("this host's KVM lacks cpuid 0x1.0 edx bit 10 needed by CPU model baseline"),
        "{}",
        out.describe()
    );
    assert!(out.stdout.is_empty(), "the guest ran: {}", out.describe());
}

#[test]
fn a_log_whose_model_this_host_lacks_is_refused() {
    let dir = TempDir::new("cpumodel-log");
    let log = dir.file("r.tlog");
    tandem(&[
        "record",
        "--log",
        arg(&log),
        "--cpu-model",
        "baseline",
        "--cmdline",
        "hello",
    ])
    .assert_status(0);
    let bytes = common::read(&log);
    let (header, len) = recordlog::Header::decode(&bytes).unwrap();
    let mut config = LogConfig::decode(&header.vm_config).unwrap();
    assert_eq!(config.vm.cpu, CpuModel::baseline());
    demand_reserved_bit(&mut config.vm.cpu);
    let tampered = recordlog::Header::new(config.encode().unwrap(), header.initial_state);
    let mut out = tampered.encode().unwrap();
    out.extend_from_slice(&bytes[len..]);
    let bad = dir.write("tampered.tlog", &out);
    assert_refused_naming_the_feature(&tandem(&["replay", "--log", arg(&bad)]));
}

#[test]
fn a_snapshot_whose_model_this_host_lacks_is_refused() {
    let dir = TempDir::new("cpumodel-snap");
    let snap = dir.file("s.snap");
    tandem(&[
        "run",
        "--cpu-model",
        "baseline",
        "--cmdline",
        "ticks 5",
        "--snapshot-at",
        "20",
        "--snapshot",
        arg(&snap),
    ])
    .assert_status(0);
    let bytes = common::read(&snap);
    // magic[8], version u32, state length u64, state, memory, crc u32.
    let n = u64::from_le_bytes(bytes[12..20].try_into().unwrap()) as usize;
    let mut state: MachineState =
        vmm::persist::decode_state("machine state", &bytes[20..20 + n]).unwrap();
    assert_eq!(state.config.cpu, CpuModel::baseline());
    demand_reserved_bit(&mut state.config.cpu);
    let enc = vmm::persist::encode_state("machine state", &state).unwrap();
    let mut out = bytes[..12].to_vec();
    out.extend_from_slice(&(enc.len() as u64).to_le_bytes());
    out.extend_from_slice(&enc);
    out.extend_from_slice(&bytes[20 + n..bytes.len() - 4]);
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    let bad = dir.write("tampered.snap", &out);
    assert_refused_naming_the_feature(&tandem(&["restore", "--snapshot", arg(&bad)]));
    // And so is recording from it.
    let rec = tandem(&[
        "record",
        "--log",
        arg(&dir.file("r.tlog")),
        "--from-snapshot",
        arg(&bad),
    ]);
    assert_refused_naming_the_feature(&rec);
    // The untampered snapshot restores; another --cpu-model is refused.
    let other = tandem(&[
        "record",
        "--log",
        arg(&dir.file("r2.tlog")),
        "--from-snapshot",
        arg(&snap),
        "--cpu-model",
        "v2",
    ]);
    other.assert_status(2);
    assert!(
        other.stderr.contains("has CPU model baseline"),
        "{}",
        other.describe()
    );
    tandem(&["restore", "--snapshot", arg(&snap)]).assert_status(0);
}

/// An incoming migration builds the VM from the header's configuration:
/// the destination's `accept_header` checks it (`incoming_layout`) before
/// it accepts, so a model this host lacks is refused before any page moves.
#[test]
fn an_incoming_vm_whose_model_this_host_lacks_is_refused() {
    let mut cpu = CpuModel::baseline();
    demand_reserved_bit(&mut cpu);
    let config = vmm::machine::VmConfig {
        mem_mib: 16,
        kernel: None,
        cmdline: "hello".into(),
        initrd: None,
        disk: None,
        net: None,
        cpu,
    };
    // Before `Accepted` (the header check) and when the VM is built.
    let early = vmm::machine::Machine::incoming_layout(&config).unwrap_err();
    let e = vmm::machine::Machine::prepare_incoming(&config)
        .err()
        .expect("refused");
    for e in [early.to_string(), e.to_string()] {
        assert!(
            e.contains("lacks cpuid 0x1.0 edx bit 10 needed by CPU model baseline"),
            "{e}"
        );
    }
}
