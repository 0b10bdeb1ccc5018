//! `tandem dump-log`: print a record log's header and entries, one a line.

use std::fs::File;
use std::io::{BufReader, Write};

use recordlog::{Entry, LogReader};
use vmm::machine::LogConfig;

use super::CmdError;
use crate::cli::DumpLogArgs;

pub fn dump_log(args: DumpLogArgs) -> Result<i32, CmdError> {
    let bad_log = |e: String| CmdError::Input(format!("--log {}: {e}", args.log.display()));
    let file = File::open(&args.log).map_err(|e| bad_log(e.to_string()))?;
    let (mut reader, header) =
        LogReader::open(BufReader::new(file)).map_err(|e| bad_log(e.to_string()))?;
    let config = LogConfig::decode(&header.vm_config).map_err(|e| bad_log(e.to_string()))?;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "format version {}", header.format_version);
    let _ = writeln!(out, "initial state {:?}", header.initial_state);
    let _ = writeln!(out, "config {config:?}");
    loop {
        let offset = reader.offset();
        match reader.next_entry() {
            Ok(Some(e)) => {
                let line = match &e {
                    Entry::SyncPoint { exit_seq, sync } => format!(
                        "SyncPoint {{ exit_seq: {exit_seq}, pages: {} ({} bytes of deltas against the previous sync point), vcpu bytes: {}, device bytes: {}, digest: {} }}",
                        sync.pages.len(),
                        sync.pages.iter().map(|(_, d)| d.len()).sum::<usize>(),
                        sync.vcpu_state.len(),
                        sync.device_state.len(),
                        sync.digest.to_hex()
                    ),
                    other => format!("{other:?}"),
                };
                if writeln!(out, "@{offset} {line}").is_err() {
                    return Ok(0);
                }
            }
            Ok(None) => return Ok(0),
            Err(e) => {
                let _ = out.flush();
                return Err(bad_log(e.to_string()));
            }
        }
    }
}
