//! The serial console's host side: where output goes, where input comes
//! from.

use std::io::Write;

use crossbeam_channel::Receiver;

use crate::cli::SerialTarget;
use crate::commands::CmdError;

/// Writes and flushes every chunk at once, so nothing is lost when the
/// process exits with the guest's status.
struct Unbuffered<W: Write>(W);

impl<W: Write> Write for Unbuffered<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write_all(buf)?;
        self.0.flush()?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// A console's output sink and, for stdio, its input channel.
pub struct Console {
    pub out: Box<dyn Write + Send>,
    pub input: Option<Receiver<Vec<u8>>>,
}

/// Open the console named by `--serial`.
pub fn open(target: &SerialTarget) -> Result<Console, CmdError> {
    let (out, input): (Box<dyn Write + Send>, _) = match target {
        SerialTarget::Stdio => (
            Box::new(Unbuffered(std::io::stdout())),
            Some(vmm::inputs::LiveInputs::spawn_console_reader(
                std::io::stdin(),
            )),
        ),
        SerialTarget::File(path) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| CmdError::Input(format!("--serial file:{}: {e}", path.display())))?;
            (Box::new(Unbuffered(f)), None)
        }
        SerialTarget::Null => (Box::new(std::io::sink()), None),
    };
    Ok(Console { out, input })
}
