//! Named CPU models: everything the guest can learn about its CPU, fixed.
//!
//! A model is data ([`ModelDef`]): vendor, family/model/stepping, brand
//! string, physical and virtual address sizes and the feature bits of
//! leaves 0x1, 0x7 and 0x8000_0001. [`CpuModel::named`] turns it into the
//! exact CPUID table the guest sees ([`CpuModel::leaves`]: every leaf and
//! subleaf, every register), the same on every host. The table, not only
//! the name, is recorded in the VM's configuration (snapshots, log headers,
//! the migration header), so a replay, a restore or an incoming migration
//! rebuilds the very CPU the VM was started with, and refuses a host whose
//! KVM cannot provide it ([`CpuModel::check`]), naming what it lacks.
//!
//! What no model ever has (the determinism boundary, DESIGN.md rule 8):
//! MONITOR/MWAIT, WAITPKG, RDRAND, RDSEED (values and timed waits KVM cannot
//! log), x2APIC, TSC-deadline and the APIC (there is no in-kernel LAPIC),
//! the architectural PMU (leaf 0xa), thermal and power leaf 0x6, VMX/SVM,
//! the invariant TSC, the KVM paravirtual leaves 0x4000_0000.. (kvmclock,
//! steal time) and, today, XSAVE and AVX: the development machines' PVM
//! emulator rejects XSAVE, so leaf 0xd is empty and the FPU state is the
//! legacy FXSAVE area. See docs/cpu-models.md.

use serde::{Deserialize, Serialize};

/// One CPUID leaf/subleaf as the guest sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidLeaf {
    /// EAX on input.
    pub function: u32,
    /// ECX on input (the subleaf; meaningful only if `indexed`).
    pub index: u32,
    /// The leaf has subleaves (KVM_CPUID_FLAG_SIGNIFCANT_INDEX).
    pub indexed: bool,
    /// EAX on output.
    pub eax: u32,
    /// EBX on output.
    pub ebx: u32,
    /// ECX on output.
    pub ecx: u32,
    /// EDX on output.
    pub edx: u32,
}

/// A CPU model as recorded with a VM: its name and its whole table.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuModel {
    /// The model's name (one of [`MODELS`]).
    pub name: String,
    /// Every leaf the guest sees, sorted by (function, index).
    pub leaves: Vec<CpuidLeaf>,
}

impl std::fmt::Debug for CpuModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CpuModel {{ name: {:?}, leaves: {}, table: {} }}",
            self.name,
            self.leaves.len(),
            self.table_hash()
        )
    }
}

/// A register of a CPUID leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reg {
    /// EAX.
    Eax,
    /// EBX.
    Ebx,
    /// ECX.
    Ecx,
    /// EDX.
    Edx,
}

impl Reg {
    fn of(self, l: &CpuidLeaf) -> u32 {
        match self {
            Reg::Eax => l.eax,
            Reg::Ebx => l.ebx,
            Reg::Ecx => l.ecx,
            Reg::Edx => l.edx,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Reg::Eax => "eax",
            Reg::Ebx => "ebx",
            Reg::Ecx => "ecx",
            Reg::Edx => "edx",
        }
    }
}

/// The registers that hold feature flags: a host must have every bit a
/// model sets in them. `(function, index, register)`.
pub const FEATURE_REGS: [(u32, u32, Reg); 7] = [
    (0x1, 0, Reg::Ecx),
    (0x1, 0, Reg::Edx),
    (0x7, 0, Reg::Ebx),
    (0x7, 0, Reg::Ecx),
    (0x7, 0, Reg::Edx),
    (0x8000_0001, 0, Reg::Ecx),
    (0x8000_0001, 0, Reg::Edx),
];

/// Names of feature bits (Linux's /proc/cpuinfo names):
/// `(function, register, bit, name)`.
const FEATURE_NAMES: &[(u32, Reg, u32, &str)] = &[
    (0x1, Reg::Edx, 0, "fpu"),
    (0x1, Reg::Edx, 1, "vme"),
    (0x1, Reg::Edx, 2, "de"),
    (0x1, Reg::Edx, 3, "pse"),
    (0x1, Reg::Edx, 4, "tsc"),
    (0x1, Reg::Edx, 5, "msr"),
    (0x1, Reg::Edx, 6, "pae"),
    (0x1, Reg::Edx, 7, "mce"),
    (0x1, Reg::Edx, 8, "cx8"),
    (0x1, Reg::Edx, 9, "apic"),
    (0x1, Reg::Edx, 11, "sep"),
    (0x1, Reg::Edx, 12, "mtrr"),
    (0x1, Reg::Edx, 13, "pge"),
    (0x1, Reg::Edx, 14, "mca"),
    (0x1, Reg::Edx, 15, "cmov"),
    (0x1, Reg::Edx, 16, "pat"),
    (0x1, Reg::Edx, 17, "pse36"),
    (0x1, Reg::Edx, 19, "clflush"),
    (0x1, Reg::Edx, 23, "mmx"),
    (0x1, Reg::Edx, 24, "fxsr"),
    (0x1, Reg::Edx, 25, "sse"),
    (0x1, Reg::Edx, 26, "sse2"),
    (0x1, Reg::Edx, 27, "ss"),
    (0x1, Reg::Edx, 28, "ht"),
    (0x1, Reg::Ecx, 0, "sse3"),
    (0x1, Reg::Ecx, 1, "pclmulqdq"),
    (0x1, Reg::Ecx, 3, "monitor"),
    (0x1, Reg::Ecx, 5, "vmx"),
    (0x1, Reg::Ecx, 9, "ssse3"),
    (0x1, Reg::Ecx, 12, "fma"),
    (0x1, Reg::Ecx, 13, "cx16"),
    (0x1, Reg::Ecx, 19, "sse4_1"),
    (0x1, Reg::Ecx, 20, "sse4_2"),
    (0x1, Reg::Ecx, 21, "x2apic"),
    (0x1, Reg::Ecx, 22, "movbe"),
    (0x1, Reg::Ecx, 23, "popcnt"),
    (0x1, Reg::Ecx, 24, "tsc_deadline_timer"),
    (0x1, Reg::Ecx, 25, "aes"),
    (0x1, Reg::Ecx, 26, "xsave"),
    (0x1, Reg::Ecx, 28, "avx"),
    (0x1, Reg::Ecx, 29, "f16c"),
    (0x1, Reg::Ecx, 30, "rdrand"),
    (0x1, Reg::Ecx, 31, "hypervisor"),
    (0x7, Reg::Ebx, 0, "fsgsbase"),
    (0x7, Reg::Ebx, 3, "bmi1"),
    (0x7, Reg::Ebx, 5, "avx2"),
    (0x7, Reg::Ebx, 8, "bmi2"),
    (0x7, Reg::Ebx, 9, "erms"),
    (0x7, Reg::Ebx, 18, "rdseed"),
    (0x8000_0001, Reg::Edx, 11, "syscall"),
    (0x8000_0001, Reg::Edx, 20, "nx"),
    (0x8000_0001, Reg::Edx, 26, "pdpe1gb"),
    (0x8000_0001, Reg::Edx, 27, "rdtscp"),
    (0x8000_0001, Reg::Edx, 29, "lm"),
    (0x8000_0001, Reg::Ecx, 0, "lahf_lm"),
    (0x8000_0001, Reg::Ecx, 5, "abm"),
    (0x8000_0001, Reg::Ecx, 8, "3dnowprefetch"),
];

/// The name of a feature bit (`cpuid 0x7.0 ecx bit 4` for one without).
pub fn feature_name(function: u32, index: u32, reg: Reg, bit: u32) -> String {
    FEATURE_NAMES
        .iter()
        .find(|(f, r, b, _)| *f == function && *r == reg && *b == bit)
        .map(|(.., n)| (*n).to_string())
        .unwrap_or_else(|| format!("cpuid {function:#x}.{index} {} bit {bit}", reg.name()))
}

const fn bits(list: &[u32]) -> u32 {
    let mut v = 0;
    let mut i = 0;
    while i < list.len() {
        v |= 1 << list[i];
        i += 1;
    }
    v
}

/// x86-64-v1 leaf 0x1 EDX: fpu vme de pse tsc msr pae mce cx8 sep mtrr pge
/// mca cmov pat pse36 clflush mmx fxsr sse sse2.
const V1_EDX: u32 = bits(&[
    0, 1, 2, 3, 4, 5, 6, 7, 8, 11, 12, 13, 14, 15, 16, 17, 19, 23, 24, 25, 26,
]);
/// Leaf 0x1 ECX bit 31: the guest knows it is virtualised.
const HYPERVISOR: u32 = 1 << 31;
/// x86-64-v2 adds to leaf 0x1 ECX: sse3 ssse3 cx16 sse4_1 sse4_2 popcnt.
const V2_ECX: u32 = bits(&[0, 9, 13, 19, 20, 23]);
/// Leaf 0x8000_0001 EDX of every model: syscall nx lm.
const EXT_EDX: u32 = bits(&[11, 20, 29]);
/// x86-64-v2 adds to leaf 0x8000_0001 ECX: lahf_lm.
const V2_EXT_ECX: u32 = bits(&[0]);

/// A CPU model as data.
#[derive(Debug, Clone, Copy)]
pub struct ModelDef {
    /// Its name (`--cpu-model NAME`).
    pub name: &'static str,
    /// One line for --help and docs.
    pub summary: &'static str,
    /// Leaf 0 vendor string.
    pub vendor: &'static [u8; 12],
    /// CPU family (leaf 0x1 EAX, with the extended family above 15).
    pub family: u32,
    /// CPU model (leaf 0x1 EAX, with the extended model).
    pub model: u32,
    /// Stepping (leaf 0x1 EAX bits 3..0).
    pub stepping: u32,
    /// Leaves 0x8000_0002..=0x8000_0004 (at most 47 bytes).
    pub brand: &'static str,
    /// Leaf 0x1 ECX feature bits.
    pub leaf1_ecx: u32,
    /// Leaf 0x1 EDX feature bits.
    pub leaf1_edx: u32,
    /// Leaf 0x7.0 EBX, ECX, EDX.
    pub leaf7: [u32; 3],
    /// Leaf 0x8000_0001 ECX feature bits.
    pub ext1_ecx: u32,
    /// Leaf 0x8000_0001 EDX feature bits.
    pub ext1_edx: u32,
    /// Physical and linear address bits (leaf 0x8000_0008 EAX).
    pub phys_bits: u32,
    /// Linear address bits.
    pub virt_bits: u32,
}

/// Every model this Tandem knows, least capable first. Models never change
/// once released (a VM recorded with one must find the same table): a new
/// CPU gets a new name.
pub const MODELS: &[ModelDef] = &[
    ModelDef {
        name: "baseline",
        summary: "x86-64-v1 (every x86-64 CPU: SSE2, no SSE3, no XSAVE/AVX), GenuineIntel family 15 model 6",
        vendor: b"GenuineIntel",
        family: 15,
        model: 6,
        stepping: 1,
        brand: "Tandem baseline (x86-64-v1)",
        leaf1_ecx: HYPERVISOR,
        leaf1_edx: V1_EDX,
        leaf7: [0, 0, 0],
        ext1_ecx: 0,
        ext1_edx: EXT_EDX,
        phys_bits: 40,
        virt_bits: 48,
    },
    ModelDef {
        name: "v2",
        summary: "x86-64-v2 (baseline + SSE3, SSSE3, SSE4.1, SSE4.2, POPCNT, CMPXCHG16B, LAHF/SAHF; no XSAVE/AVX), GenuineIntel family 6 model 26 (Nehalem class)",
        vendor: b"GenuineIntel",
        family: 6,
        model: 26,
        stepping: 3,
        brand: "Tandem v2 (x86-64-v2)",
        leaf1_ecx: HYPERVISOR | V2_ECX,
        leaf1_edx: V1_EDX,
        leaf7: [0, 0, 0],
        ext1_ecx: V2_EXT_ECX,
        ext1_edx: EXT_EDX,
        phys_bits: 40,
        virt_bits: 48,
    },
];

/// Highest basic leaf of every model (leaf 0xd, XSAVE, is present and
/// empty: no XSAVE).
const MAX_BASIC: u32 = 0xd;
/// Highest extended leaf of every model.
const MAX_EXT: u32 = 0x8000_0008;
/// Leaves with subleaves: (function, subleaves listed).
const INDEXED: &[(u32, u32)] = &[(0x4, 1), (0x7, 1), (0xb, 1), (0xd, 2)];

impl ModelDef {
    /// Leaf 1 EAX: stepping, model, family with their extended fields.
    fn signature(&self) -> u32 {
        let (family, ext_family) = if self.family >= 15 {
            (15, self.family - 15)
        } else {
            (self.family, 0)
        };
        let (model, ext_model) = if self.family == 6 || self.family >= 15 {
            (self.model & 0xf, self.model >> 4)
        } else {
            (self.model, 0)
        };
        (ext_family << 20) | (ext_model << 16) | (family << 8) | (model << 4) | self.stepping
    }

    /// The exact CPUID table of this model.
    pub fn leaves(&self) -> Vec<CpuidLeaf> {
        let leaf = |function, index, indexed, [eax, ebx, ecx, edx]: [u32; 4]| CpuidLeaf {
            function,
            index,
            indexed,
            eax,
            ebx,
            ecx,
            edx,
        };
        let vendor = |i: usize| u32::from_le_bytes(self.vendor[i..i + 4].try_into().unwrap());
        let mut brand = [0u8; 48];
        let n = self.brand.len().min(47);
        brand[..n].copy_from_slice(&self.brand.as_bytes()[..n]);
        let brand_reg = |i: usize| u32::from_le_bytes(brand[i * 4..i * 4 + 4].try_into().unwrap());
        let mut out = Vec::new();
        for function in 0..=MAX_BASIC {
            let subleaves = INDEXED
                .iter()
                .find(|(f, _)| *f == function)
                .map(|&(_, n)| n);
            for index in 0..subleaves.unwrap_or(1) {
                let regs = match (function, index) {
                    // Vendor string order: EBX, EDX, ECX.
                    (0, _) => [MAX_BASIC, vendor(0), vendor(8), vendor(4)],
                    // EBX: CLFLUSH line 8 x 8 bytes, one logical CPU, APIC id 0.
                    (1, _) => [
                        self.signature(),
                        (1 << 16) | (8 << 8),
                        self.leaf1_ecx,
                        self.leaf1_edx,
                    ],
                    (7, 0) => [0, self.leaf7[0], self.leaf7[1], self.leaf7[2]],
                    _ => [0; 4],
                };
                out.push(leaf(function, index, subleaves.is_some(), regs));
            }
        }
        // The hypervisor range, present and empty: no KVM signature, no
        // kvmclock (without it KVM would answer with the highest basic leaf).
        out.push(leaf(0x4000_0000, 0, false, [0; 4]));
        for function in 0x8000_0000..=MAX_EXT {
            let regs = match function {
                0x8000_0000 => [MAX_EXT, 0, 0, 0],
                0x8000_0001 => [0, 0, self.ext1_ecx, self.ext1_edx],
                0x8000_0002..=0x8000_0004 => {
                    let b = (function - 0x8000_0002) as usize * 4;
                    [
                        brand_reg(b),
                        brand_reg(b + 1),
                        brand_reg(b + 2),
                        brand_reg(b + 3),
                    ]
                }
                0x8000_0008 => [self.phys_bits | (self.virt_bits << 8), 0, 0, 0],
                _ => [0; 4],
            };
            out.push(leaf(function, 0, false, regs));
        }
        out
    }
}

/// Why a CPU model cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CpuModelError {
    /// `--cpu-model NAME` names no model.
    #[error("unknown CPU model '{name}': this Tandem knows {}", known_names())]
    Unknown {
        /// The name given.
        name: String,
    },
    /// The host's KVM cannot provide the model.
    #[error("this host's KVM lacks {} needed by CPU model {model}{}", .missing.join(", "), provided(.provides))]
    Missing {
        /// The model's name.
        model: String,
        /// The features (or properties) missing, by name.
        missing: Vec<String>,
        /// The models this host does provide.
        provides: Vec<String>,
    },
    /// A recorded table that is not this Tandem's table of that name.
    #[error("the recorded CPU model '{name}' is not this Tandem's {}: {detail}", if *.known { "model of that name" } else { "(it knows none of that name)" })]
    Mismatch {
        /// The recorded name.
        name: String,
        /// This Tandem has a model of that name.
        known: bool,
        /// What differs.
        detail: String,
    },
}

fn known_names() -> String {
    MODELS.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")
}

fn provided(list: &[String]) -> String {
    if list.is_empty() {
        "; it provides none of Tandem's CPU models".into()
    } else {
        format!("; this host provides {}", list.join(", "))
    }
}

/// Most leaves a recorded table may have (KVM_MAX_CPUID_ENTRIES).
pub const MAX_LEAVES: usize = 256;

impl CpuModel {
    /// The model called `name`.
    pub fn named(name: &str) -> Result<CpuModel, CpuModelError> {
        MODELS
            .iter()
            .find(|m| m.name == name)
            .map(|m| CpuModel {
                name: m.name.to_string(),
                leaves: m.leaves(),
            })
            .ok_or_else(|| CpuModelError::Unknown { name: name.into() })
    }

    /// The least capable model (what tests and tools use when no host
    /// decides).
    pub fn baseline() -> CpuModel {
        CpuModel::named(MODELS[0].name).expect("the first model exists")
    }

    /// The most capable model `supported` (a host's KVM_GET_SUPPORTED_CPUID)
    /// provides, or why not even the least capable one.
    pub fn most_capable(supported: &[CpuidLeaf]) -> Result<CpuModel, CpuModelError> {
        let mut best = None;
        for def in MODELS {
            let m = CpuModel::named(def.name)?;
            if m.missing(supported).is_empty() {
                best = Some(m);
            }
        }
        best.ok_or_else(|| {
            let least = CpuModel::baseline();
            CpuModelError::Missing {
                missing: least.missing(supported),
                model: least.name,
                provides: Vec::new(),
            }
        })
    }

    /// The names of the models `supported` provides.
    pub fn provided_by(supported: &[CpuidLeaf]) -> Vec<String> {
        MODELS
            .iter()
            .filter_map(|d| CpuModel::named(d.name).ok())
            .filter(|m| m.missing(supported).is_empty())
            .map(|m| m.name)
            .collect()
    }

    fn find(leaves: &[CpuidLeaf], function: u32, index: u32) -> Option<&CpuidLeaf> {
        leaves
            .iter()
            .find(|l| l.function == function && (!l.indexed || l.index == index))
    }

    /// What this model needs that `supported` lacks, by name: feature bits,
    /// address bits.
    pub fn missing(&self, supported: &[CpuidLeaf]) -> Vec<String> {
        let mut missing = Vec::new();
        for (function, index, reg) in FEATURE_REGS {
            let want = Self::find(&self.leaves, function, index).map_or(0, |l| reg.of(l));
            let have = Self::find(supported, function, index).map_or(0, |l| reg.of(l));
            for bit in 0..32 {
                if want & !have & (1 << bit) != 0 {
                    missing.push(feature_name(function, index, reg, bit));
                }
            }
        }
        let addr_bits = |t: &[CpuidLeaf]| Self::find(t, 0x8000_0008, 0).map_or(0, |l| l.eax & 0xff);
        let (want, have) = (addr_bits(&self.leaves), addr_bits(supported));
        if want > have {
            missing.push(format!("{want} physical address bits (it has {have})"));
        }
        missing
    }

    /// Can a host whose KVM supports `supported` run this (recorded) model?
    /// First the host: every feature it lacks is named; then the table: it
    /// must be exactly this Tandem's model of the same name (a peer or a
    /// damaged file never chooses what the guest sees).
    pub fn check(&self, supported: &[CpuidLeaf]) -> Result<(), CpuModelError> {
        let missing = self.missing(supported);
        if !missing.is_empty() {
            return Err(CpuModelError::Missing {
                model: self.name.clone(),
                missing,
                provides: Self::provided_by(supported),
            });
        }
        let ours = match CpuModel::named(&self.name) {
            Ok(m) => m,
            Err(_) => {
                return Err(CpuModelError::Mismatch {
                    name: self.name.clone(),
                    known: false,
                    detail: format!("models: {}", known_names()),
                })
            }
        };
        if ours.leaves != self.leaves {
            let detail = if self.leaves.len() > MAX_LEAVES || ours.leaves.len() != self.leaves.len()
            {
                format!(
                    "{} leaves recorded, {} in this Tandem's",
                    self.leaves.len(),
                    ours.leaves.len()
                )
            } else {
                let (r, o) = self
                    .leaves
                    .iter()
                    .zip(&ours.leaves)
                    .find(|(r, o)| r != o)
                    .expect("the tables differ");
                format!(
                    "leaf {:#x}.{} recorded as {r:x?}, here {o:x?}",
                    o.function, o.index
                )
            };
            return Err(CpuModelError::Mismatch {
                name: self.name.clone(),
                known: true,
                detail,
            });
        }
        Ok(())
    }

    /// Physical address bits the model gives the guest (leaf 0x8000_0008).
    pub fn phys_bits(&self) -> u32 {
        Self::find(&self.leaves, 0x8000_0008, 0).map_or(36, |l| l.eax & 0xff)
    }

    /// A short identity of the table (BLAKE3, first 8 bytes in hex), for
    /// log dumps and messages.
    pub fn table_hash(&self) -> String {
        let bytes = postcard::to_stdvec(&self.leaves).unwrap_or_default();
        blake3::hash(&bytes).to_hex()[..16].to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What this machine's PVM-based KVM reports (KVM_GET_SUPPORTED_CPUID,
    /// the feature leaves): SSE2 but no SSE3, 48 physical address bits.
    fn pvm_host() -> Vec<CpuidLeaf> {
        let l = |function, eax, ebx, ecx, edx| CpuidLeaf {
            function,
            index: 0,
            indexed: function == 7,
            eax,
            ebx,
            ecx,
            edx,
        };
        vec![
            l(0x1, 0x000a_0671, 0x0102_0800, 0x8120_2000, 0x0f8b_fbff),
            l(0x7, 2, 0x0180_2852, 0x1a01_0104, 0x2001_0000),
            l(0x8000_0001, 0, 0, 0x101, 0x2010_0800),
            l(0x8000_0008, 0x3930, 0, 0, 0),
        ]
    }

    /// A host with every x86-64-v2 feature.
    fn v2_host() -> Vec<CpuidLeaf> {
        let mut t = pvm_host();
        t[0].ecx |= V2_ECX;
        t
    }

    #[test]
    fn every_model_is_well_formed() {
        for def in MODELS {
            let m = CpuModel::named(def.name).unwrap();
            assert!(m.leaves.len() <= MAX_LEAVES);
            let leaf1 = CpuModel::find(&m.leaves, 1, 0).unwrap();
            // Never: MONITOR, VMX, x2APIC, TSC-deadline, XSAVE, AVX, RDRAND; no APIC.
            let banned = bits(&[3, 5, 21, 24, 26, 27, 28, 30]);
            assert_eq!(leaf1.ecx & banned, 0, "{}", def.name);
            assert_eq!(leaf1.edx & (1 << 9), 0, "{}", def.name);
            // Leaf 0xd (XSAVE) is empty, leaf 0xa (PMU) and 0x6 too.
            for f in [0x6, 0xa, 0xd] {
                let l = CpuModel::find(&m.leaves, f, 0).unwrap();
                assert_eq!((l.eax, l.ebx, l.ecx, l.edx), (0, 0, 0, 0), "{f:#x}");
            }
            // No invariant TSC.
            assert_eq!(CpuModel::find(&m.leaves, 0x8000_0007, 0).unwrap().edx, 0);
            // Sorted, no duplicates.
            assert!(m
                .leaves
                .windows(2)
                .all(|w| (w[0].function, w[0].index) < (w[1].function, w[1].index)));
        }
        let b = CpuModel::baseline();
        let v0 = CpuModel::find(&b.leaves, 0, 0).unwrap();
        assert_eq!(v0.eax, 0xd);
        assert_eq!(
            [
                v0.ebx.to_le_bytes(),
                v0.edx.to_le_bytes(),
                v0.ecx.to_le_bytes()
            ]
            .concat(),
            b"GenuineIntel"
        );
        assert_eq!(CpuModel::find(&b.leaves, 1, 0).unwrap().eax, 0xf61);
        let v2 = CpuModel::named("v2").unwrap();
        assert_eq!(CpuModel::find(&v2.leaves, 1, 0).unwrap().eax, 0x106a3);
    }

    #[test]
    fn the_default_is_the_most_capable_model_the_host_provides() {
        assert_eq!(
            CpuModel::most_capable(&pvm_host()).unwrap().name,
            "baseline"
        );
        assert_eq!(CpuModel::most_capable(&v2_host()).unwrap().name, "v2");
        assert_eq!(CpuModel::provided_by(&v2_host()), ["baseline", "v2"]);
    }

    #[test]
    fn a_host_without_the_features_is_refused_by_name() {
        let e = CpuModel::named("v2")
            .unwrap()
            .check(&pvm_host())
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "this host's KVM lacks sse3, ssse3, sse4_1, sse4_2, popcnt needed by CPU model v2; \
             this host provides baseline"
        );
        let mut no_sse2 = pvm_host();
        no_sse2[0].edx &= !(1 << 26);
        no_sse2[3].eax = 36;
        let e = CpuModel::most_capable(&no_sse2).unwrap_err();
        assert_eq!(
            e.to_string(),
            "this host's KVM lacks sse2, 40 physical address bits (it has 36) needed by CPU \
             model baseline; it provides none of Tandem's CPU models"
        );
        assert!(CpuModel::baseline().check(&pvm_host()).is_ok());
        assert!(CpuModel::named("v2").unwrap().check(&v2_host()).is_ok());
    }

    #[test]
    fn a_tampered_or_unknown_table_is_refused() {
        // A feature nobody has (a reserved bit): named, refused first.
        let mut m = CpuModel::baseline();
        m.leaves.iter_mut().find(|l| l.function == 1).unwrap().edx |= 1 << 10;
        let e = m.check(&pvm_host()).unwrap_err();
        assert!(
            e.to_string().contains("lacks cpuid 0x1.0 edx bit 10"),
            "{e}"
        );
        // RDRAND on a host that has it: still not this Tandem's baseline.
        let mut host = pvm_host();
        host[0].ecx |= 1 << 30;
        let mut m = CpuModel::baseline();
        m.leaves.iter_mut().find(|l| l.function == 1).unwrap().ecx |= 1 << 30;
        let e = m.check(&host).unwrap_err();
        assert!(
            matches!(e, CpuModelError::Mismatch { known: true, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("leaf 0x1.0"), "{e}");
        let mut m = CpuModel::baseline();
        m.name = "host".into();
        let e = m.check(&pvm_host()).unwrap_err();
        assert!(e.to_string().contains("baseline, v2"), "{e}");
        let e = CpuModel::named("nope").unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown CPU model 'nope': this Tandem knows baseline, v2"
        );
    }
}
