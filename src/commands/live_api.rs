//! After a failover (issue 10, re-protection; `docs/failover.md`): the
//! secondary that went live keeps serving its `--api-socket`, now as the
//! VM's full control socket. `tandem status` says `unprotected after
//! failover` with the VM's generation and whom it took over from; `tandem
//! protect --to NEWHOST` seeds a new secondary while the VM runs, with the
//! next protection generation (`failover::lineage`).

use crossbeam_channel::Receiver;
use failover::heartbeat::Protection;
use failover::lineage::Lineage;
use vmm::devices::virtio::net::tap::TapReceiver;
use vmm::inputs::LiveInputs;
use vmm::machine::Machine;

use super::golive::{FirstOutput, LiveApi};
use super::CmdError;

/// Run the VM live with its control socket at `api.sock` until the guest
/// ends (its status) or it is migrated away.
pub(super) fn run(
    machine: &mut Machine,
    api: LiveApi,
    (p, event): (&Protection, &'static str),
    (virtual_ns, input, net): (u64, Option<Receiver<Vec<u8>>>, Option<TapReceiver>),
    outputs: FirstOutput,
) -> Result<i32, CmdError> {
    // The secondary's status server gives the path up first.
    drop(api.server);
    let mut lineage = Lineage::after_failover(p.vm_id.clone(), p.generation, api.from);
    if event == "switchover" {
        lineage.role = failover::lineage::Role::UnprotectedAfterSwitchover;
    }
    eprintln!(
        "tandem: the control socket {} serves the live VM now (tandem status, tandem protect --to NEWHOST protects it again with generation {})",
        api.sock.display(),
        p.generation + 1
    );
    let inputs = LiveInputs::new(virtual_ns, input)
        .with_outputs(Box::new(outputs))
        .with_net(net);
    let spare = api.spare;
    let status = super::migrate::run_with_api_as(machine, inputs, &api.sock, false, |ctl| {
        let mut lineage = lineage;
        if let Some(s) = &spare {
            lineage.spares = s.spares.clone();
        }
        *ctl.lineage() = lineage;
        if let Some(s) = spare {
            let ctl = ctl.clone();
            let spawned = std::thread::Builder::new()
                .name("spare".into())
                .spawn(move || crate::spare::seed_spare(&ctl, &s));
            if let Err(e) = spawned {
                eprintln!("tandem: cannot start seeding a spare: {e}");
            }
        }
    })?;
    eprintln!(
        "tandem: the VM ended at exit {} with status {status}, running on this host since the {event}",
        machine.exit_seq
    );
    Ok(status)
}
