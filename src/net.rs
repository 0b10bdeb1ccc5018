//! The NIC's host side: the TAP named by `--net`, its reader thread and
//! sending handle, and the run's end-of-run report.

use vmm::devices::virtio::net::tap::{Tap, TapReceiver, TapWriter};
use vmm::devices::virtio::net::MacAddr;
use vmm::inputs::LiveInputs;
use vmm::machine::{Machine, NetConfig};
use vmm::outputs::LiveOutputs;

use crate::cli::NetArg;
use crate::commands::CmdError;
use crate::console::Console;

/// An open TAP with its reader thread running.
pub struct HostNet {
    tap: Tap,
    pub rx: TapReceiver,
    pub tx: TapWriter,
    /// The address `--net` asked for (or the default).
    pub mac: MacAddr,
}

impl HostNet {
    /// Open (or create) the TAP of `--net`; errors name it.
    pub fn open(arg: &NetArg) -> Result<Self, CmdError> {
        let bad = |e: String| CmdError::Input(format!("--net tap={}: {e}", arg.tap));
        let tap = Tap::open(&arg.tap).map_err(|e| bad(e.to_string()))?;
        let rx = tap.spawn_reader().map_err(|e| bad(e.to_string()))?;
        let tx = tap.writer().map_err(|e| bad(e.to_string()))?;
        if tap.created() {
            eprintln!(
                "tandem: created TAP {} (removed when this VM ends)",
                tap.name()
            );
        }
        Ok(HostNet {
            tap,
            rx,
            tx,
            mac: arg.mac.unwrap_or(MacAddr::DEFAULT),
        })
    }

    /// The NIC of a VM booted with this `--net`.
    pub fn config(&self) -> NetConfig {
        NetConfig {
            mac: self.mac,
            tap: self.tap.name().to_owned(),
        }
    }
}

/// Open the TAP of `--net`, if given.
pub fn open(arg: Option<&NetArg>) -> Result<Option<HostNet>, CmdError> {
    arg.map(HostNet::open).transpose()
}

/// The live inputs and outputs of a VM: console in and out, frames in and
/// out.
pub fn live_inputs(base_ns: u64, console: Console, net: Option<&HostNet>) -> LiveInputs {
    LiveInputs::new(base_ns, console.input)
        .with_outputs(Box::new(LiveOutputs::new(
            console.out,
            net.map(|n| n.tx.clone()),
        )))
        .with_net(net.map(|n| n.rx.clone()))
}

/// Warn when a restored or received VM and this host's `--net` disagree.
pub fn check_restored(machine: &Machine, net: Option<&HostNet>) {
    match (machine.devices.net.as_ref(), net) {
        (Some(dev), None) => eprintln!(
            "tandem: the VM has a network device ({}) but no --net was given; its frames go nowhere",
            dev.mac()
        ),
        (None, Some(n)) => eprintln!(
            "tandem: --net tap={}: the VM has no network device; the TAP stays unused",
            n.tap.name()
        ),
        (Some(dev), Some(n)) if dev.mac() != n.mac && n.mac != MacAddr::DEFAULT => eprintln!(
            "tandem: the VM keeps its MAC address {} (--net asked for {})",
            dev.mac(),
            n.mac
        ),
        _ => {}
    }
}

/// One line on stderr about the NIC's traffic, if the VM has one.
pub fn report(machine: &Machine, host_dropped: u64) {
    let Some(dev) = machine.devices.net.as_ref() else {
        return;
    };
    let s = dev.stats();
    eprintln!(
        "tandem: net {}: received {} frames, sent {}; dropped {} too large for the guest's buffers, {} with a bad receive chain, {} bad sends, {} with the host queue full",
        dev.mac(),
        s.rx_frames,
        s.tx_frames,
        s.rx_too_large,
        s.rx_bad_chain,
        s.tx_dropped,
        host_dropped
    );
}

/// The TAP of `tandem secondary --net`: opened (created if missing) so
/// that a bad one fails up front, held for going live, and never read or
/// written while this host is the secondary (its VM's frames come from the
/// log; what it sends goes nowhere).
pub struct StandbyTap {
    tap: Option<Tap>,
    mac: Option<MacAddr>,
}

impl StandbyTap {
    /// Open the TAP of `--net`, if given.
    pub fn open(arg: Option<&NetArg>) -> Result<Self, CmdError> {
        let Some(arg) = arg else {
            return Ok(StandbyTap {
                tap: None,
                mac: None,
            });
        };
        let tap = Tap::open(&arg.tap)
            .map_err(|e| CmdError::Input(format!("--net tap={}: {e}", arg.tap)))?;
        if tap.created() {
            eprintln!(
                "tandem: created TAP {} (removed when this VM ends)",
                tap.name()
            );
        }
        Ok(StandbyTap {
            tap: Some(tap),
            mac: arg.mac,
        })
    }

    /// Going live: start reading the TAP (frames for the guest, from now on)
    /// and give its sending handle; `None` without `--net`.
    pub fn attach(&self) -> Result<Option<(TapReceiver, TapWriter)>, CmdError> {
        let Some(tap) = &self.tap else {
            return Ok(None);
        };
        let bad = |e: std::io::Error| CmdError::Internal(format!("TAP {}: {e}", tap.name()));
        let rx = tap.spawn_reader().map_err(bad)?;
        let tx = tap.writer().map_err(bad)?;
        Ok(Some((rx, tx)))
    }

    /// Say how the protected VM's NIC and this `--net` relate.
    pub fn check(&self, nic: Option<&NetConfig>) {
        match (nic, &self.tap) {
            (Some(n), None) => eprintln!(
                "tandem: the VM has a network device ({}) but no --net was given: it could not go live on the network",
                n.mac
            ),
            (None, Some(t)) => eprintln!(
                "tandem: --net tap={}: the VM has no network device; the TAP stays unused",
                t.name()
            ),
            (Some(n), Some(t)) => {
                if let Some(m) = self.mac.filter(|m| *m != n.mac) {
                    eprintln!("tandem: the VM keeps its MAC address {} (--net asked for {m})", n.mac);
                }
                eprintln!(
                    "tandem: TAP {} held for going live; nothing is sent on it while this host is the secondary",
                    t.name()
                );
            }
            (None, None) => {}
        }
    }
}
