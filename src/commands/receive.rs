//! `tandem receive`: the destination of a live migration.

use std::time::Duration;

use secondary::migration::{listen, receive as accept_vm, ReceiveOptions};
use vmm::run::RunLimits;

use super::run::outcome_status;
use super::CmdError;
use crate::cli::ReceiveArgs;
use crate::{console, net};

pub fn receive(args: ReceiveArgs) -> Result<i32, CmdError> {
    crate::signals::block();
    let (creds, name) = super::load_creds(&args.creds, "destination")?;
    let listener = listen(args.listen, &creds, &name)
        .map_err(|e| CmdError::Input(format!("--listen {}: {e}", args.listen)))?;
    let addr = listener
        .local_addr()
        .map_err(|e| CmdError::Internal(e.to_string()))?;
    let host_net = net::open(args.net.net.as_ref())?;
    eprintln!("tandem: waiting for a VM on {addr}");
    let console = console::open(&args.serial)?;
    let opts = ReceiveOptions {
        disk: args.disk.clone(),
        disk_dir: args.disk_dir.clone(),
        control_socket: args.api_socket.is_some(),
        replica: false,
    };
    let received = accept_vm(&listener, &opts).map_err(|e| CmdError::Internal(e.to_string()))?;
    let mut machine = received.machine;
    if machine.devices.net.is_none() {
        net::check_restored(&machine, host_net.as_ref());
    }
    let inputs = net::live_inputs(received.virtual_ns, console, host_net.as_ref());
    let what = match (&args.api_socket, received.paused) {
        // Only with a control socket may a VM arrive paused.
        (Some(sock), true) => format!(
            "it was paused and stays paused (`tandem resume --api {}` runs it)",
            sock.display()
        ),
        _ => "running it".to_string(),
    };
    eprintln!(
        "tandem: VM received from {} after {} pre-copy rounds; {what}",
        received.from, received.rounds
    );
    // The guest starts now: announce its MAC from here (QEMU's order, once
    // the VM runs; the rounds go on on their own thread).
    secondary::migration::announce_guest_mac(&machine, host_net.as_ref().map(|n| &n.tx));
    let status = match &args.api_socket {
        Some(sock) => super::migrate::run_with_api(machine, inputs, sock, received.paused),
        None => {
            let stop = crate::signals::on_stop(machine.vcpu.kicker().clone());
            let mut inputs = inputs.with_wakeup(stop.wakeup);
            let limits = RunLimits {
                stop_at_exit: None,
                pause: Some(stop.flag),
                ..Default::default()
            };
            let outcome = machine.run(&mut inputs, limits);
            net::report(&machine, inputs.net_frames_dropped());
            outcome.map_err(CmdError::from).map(|o| {
                super::run::stopped_by_signal(&mut machine, &mut inputs, true);
                outcome_status(o)
            })
        }
    };
    // The source ends once it has our confirmation; let it see it before
    // this process (and the connection) goes away.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !received.goodbye.is_finished() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    // Only now: closing the listener closes its connections too.
    listener.close();
    status
}
