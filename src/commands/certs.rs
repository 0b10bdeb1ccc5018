//! `tandem certs init|issue`: the cluster PKI of the channel.

use super::CmdError;
use crate::cli::CertsCommand;

pub fn certs(cmd: CertsCommand) -> Result<i32, CmdError> {
    match cmd {
        CertsCommand::Init { dir } => {
            failover::certs::init_ca(&dir).map_err(|e| CmdError::Input(e.to_string()))?;
            eprintln!(
                "tandem: cluster CA created in {} (keep ca.key off the hosts once they are issued)",
                dir.display()
            );
        }
        CertsCommand::Issue {
            dir,
            name,
            san,
            out,
        } => {
            failover::certs::issue(&dir, &name, out.as_deref(), &san)
                .map_err(|e| CmdError::Input(e.to_string()))?;
            let out = out.unwrap_or(dir);
            eprintln!("tandem: {}/{name}.pem and {name}.key issued", out.display());
        }
    }
    Ok(0)
}
