//! `tandem`: a fault-tolerant virtual machine monitor.
//!
//! Exit status: the guest's debug-exit status when the guest ends that way;
//! 2 for bad input (a message names it); 123 when a host disk error stopped
//! the VM (no control socket to pause it on); 124 when the guest halted for good;
//! 125 when Tandem itself failed; 126 when the guest crashed (emulation
//! failure, triple fault).

mod api;
mod cli;
mod commands;
mod console;
mod guest_image;
mod net;
mod signals;
mod spare;

use std::io::IsTerminal;

use clap::Parser;

fn main() {
    let cli = cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal, never in logs or pipes.
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TANDEM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let code = match commands::dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tandem: {e}");
            e.exit_code()
        }
    };
    std::process::exit(code);
}
