//! The arbiter: who may be live for VM `V` at protection generation `G`
//! (DESIGN.md, "Roles and the channel"; `docs/failover.md`).
//!
//! Whoever wants to be live after losing its peer (the secondary that lost
//! the primary, the primary that lost the secondary and wants to go on
//! alone) first wins [`Arbiter::claim`], an atomic test-and-set: the first
//! claim for `(V, G)` wins, every later one learns who won. A side that
//! loses stops; a side that cannot reach the arbiter does not go live (a
//! primary keeps its outputs held and stops).

mod file;

pub use file::FileArbiter;

/// What a claim found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// We hold `(V, G)`: we may be live.
    Won,
    /// Someone else holds it (their identity as they wrote it).
    Lost {
        /// Who won.
        holder: String,
    },
}

/// Why the arbiter could not answer.
#[derive(Debug, thiserror::Error)]
pub enum ArbiterError {
    /// Not reachable (storage missing, I/O error, timeout): no answer, so
    /// nobody may go live on it.
    #[error("the arbiter {arbiter} cannot be reached: {reason}")]
    Unreachable {
        /// [`Arbiter::describe`].
        arbiter: String,
        /// What failed.
        reason: String,
    },
    /// The arbiter holds something that is not a claim of ours to read
    /// (damaged, another program's file): no answer either.
    #[error("the arbiter {arbiter} holds an unreadable claim {what}: {reason}")]
    Damaged {
        /// [`Arbiter::describe`].
        arbiter: String,
        /// The claim.
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A bad `--arbiter`.
    #[error("{0}")]
    Config(String),
    /// A bad VM identity.
    #[error(transparent)]
    VmId(#[from] crate::heartbeat::HeartbeatError),
}

/// An atomic test-and-set per `(vm_id, generation)`.
pub trait Arbiter: Send + Sync {
    /// Claim `(vm_id, generation)` for `holder` (a human-readable identity:
    /// host, role, process). Claiming again what `holder` already holds
    /// wins again (a retry after an ambiguous failure).
    fn claim(&self, vm_id: &str, generation: u64, holder: &str) -> Result<Verdict, ArbiterError>;
    /// The arbiter as the operator named it (for messages).
    fn describe(&self) -> String;
}

/// Parse `--arbiter SPEC`: `file:DIR` (a directory on storage both hosts
/// reach). `etcd:URL[,URL...]` is named but not built yet.
pub fn from_spec(spec: &str) -> Result<Box<dyn Arbiter>, ArbiterError> {
    match spec.split_once(':') {
        Some(("file", path)) if !path.is_empty() => Ok(Box::new(FileArbiter::new(path.into()))),
        Some(("etcd", _)) => Err(ArbiterError::Config(format!(
            "--arbiter {spec}: the etcd arbiter is not built yet; use file:DIR on storage both hosts share"
        ))),
        _ => Err(ArbiterError::Config(format!(
            "--arbiter {spec}: expected file:DIR (a directory both hosts reach)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_are_parsed() {
        assert!(from_spec("file:/tmp/x").is_ok());
        assert!(from_spec("file:").is_err());
        assert!(from_spec("etcd:http://127.0.0.1:2379")
            .err()
            .unwrap()
            .to_string()
            .contains("not built"));
        assert!(from_spec("/tmp/x").is_err());
    }
}
