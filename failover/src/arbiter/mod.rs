//! The arbiter: who may be live for VM `V` at protection generation `G`
//! (DESIGN.md, "Roles and the channel"; `docs/failover.md`).
//!
//! Whoever wants to be live after losing its peer (the secondary that lost
//! the primary, the primary that lost the secondary and wants to go on
//! alone) first wins [`Arbiter::claim`], an atomic test-and-set: the first
//! claim for `(V, G)` wins, every later one learns who won. A side that
//! loses stops; a side that cannot reach the arbiter does not go live (a
//! primary keeps its outputs held and stops).
//!
//! Backends: [`FileArbiter`] (`file:DIR`, a test-and-set on shared storage)
//! and [`EtcdArbiter`] (`etcd:URL[,URL...]`, a key under an etcd lease that
//! the winner keeps alive; it stops the process before the lease can end).

mod etcd;
mod file;

pub use etcd::{EtcdArbiter, EtcdOptions, DEFAULT_TTL_S};
pub use file::FileArbiter;

/// Exit status of a side that stopped because it may not be live (it lost
/// the arbiter, could not reach it, or could not keep its etcd lease).
pub const STOPPED: i32 = 3;

/// First line of a claim's text (a file arbiter's claim file, an etcd
/// arbiter's key value).
const MAGIC: &str = "tandem-claim 1";

/// The text of a claim of `(vm_id, generation)` by `holder`.
fn claim_text(vm_id: &str, generation: u64, holder: &str) -> String {
    format!("{MAGIC}\nvm {vm_id}\ngeneration {generation}\nholder {holder}\n")
}

/// The holder named in a claim's `text`, checked to be the claim of
/// `(vm_id, generation)`; `Err` says what is wrong with it.
fn claim_holder(text: &str, vm_id: &str, generation: u64) -> Result<String, String> {
    let mut lines = text.lines();
    if lines.next() != Some(MAGIC) {
        return Err(format!("does not start with {MAGIC:?}"));
    }
    let mut holder = None;
    for line in lines {
        match line.split_once(' ') {
            Some(("vm", v)) if v != vm_id => return Err(format!("is for VM {v}, not {vm_id}")),
            Some(("generation", g)) if g != generation.to_string() => {
                return Err(format!("is for generation {g}, not {generation}"))
            }
            Some(("holder", h)) => holder = Some(h.to_string()),
            _ => {}
        }
    }
    holder.ok_or_else(|| "names no holder".into())
}

/// One line, printable: an identity never breaks the claim's format.
fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(200)
        .collect()
}

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
    ///
    /// A backend whose grant can lapse (etcd's lease) keeps it alive from
    /// the `Won` on, for as long as the process runs, and ends the process
    /// with [`STOPPED`] before it could lapse.
    fn claim(&self, vm_id: &str, generation: u64, holder: &str) -> Result<Verdict, ArbiterError>;
    /// The arbiter as the operator named it (for messages).
    fn describe(&self) -> String;
    /// Can a claim reach the arbiter now? Checked when protection starts:
    /// a side whose arbiter cannot be reached could never go live (nor go
    /// on alone), so its protection would be for show.
    fn check(&self) -> Result<(), ArbiterError>;
    /// What identifies this arbiter whatever path or address a host
    /// reaches it by (a file arbiter's id file, the etcd cluster's id):
    /// the primary and its secondary must ask the same arbiter, or a
    /// partition lets each win its own claim and both go live. Implies
    /// [`Self::check`].
    fn identity(&self) -> Result<String, ArbiterError>;
    /// The fencing token of the claim of `(vm_id, generation)` this
    /// arbiter won, if the backend has one: etcd's revision at which the
    /// key was created, larger for every later claim in that etcd cluster.
    /// The file arbiter has none.
    fn fencing_token(&self, _vm_id: &str, _generation: u64) -> Option<u64> {
        None
    }
}

/// `" (fencing token N)"` for a claim `arbiter` won with a token, else `""`
/// (for messages).
pub fn token_note(arbiter: &dyn Arbiter, vm_id: &str, generation: u64) -> String {
    arbiter
        .fencing_token(vm_id, generation)
        .map(|t| format!(" (fencing token {t})"))
        .unwrap_or_default()
}

/// Parse `--arbiter SPEC`: `file:DIR` (a directory on storage both hosts
/// reach) or `etcd:URL[,URL...][?ttl=SECONDS]` (members of an etcd
/// cluster, `http://HOST:PORT`).
pub fn from_spec(spec: &str) -> Result<Box<dyn Arbiter>, ArbiterError> {
    match spec.split_once(':') {
        Some(("file", path)) if !path.is_empty() => Ok(Box::new(FileArbiter::new(path.into()))),
        Some(("etcd", rest)) => Ok(Box::new(EtcdArbiter::from_spec(rest).map_err(|e| {
            ArbiterError::Config(format!("--arbiter {spec}: {e}"))
        })?)),
        _ => Err(ArbiterError::Config(format!(
            "--arbiter {spec}: expected file:DIR (a directory both hosts reach) or etcd:URL[,URL...][?ttl=SECONDS]"
        ))),
    }
}

/// [`from_spec`], then [`Arbiter::check`] and [`Arbiter::identity`]: the
/// arbiter a side starts protection with, reachable now (an error says why
/// not and names it), and its identity.
pub fn open(spec: &str) -> Result<Opened, ArbiterError> {
    let arbiter = from_spec(spec)?;
    let unreachable = |e: ArbiterError| {
        ArbiterError::Config(format!(
            "--arbiter {spec}: {e}; protection with an arbiter nobody can reach could never fail over (a file arbiter's directory is never created: mount the shared storage or create it on it)"
        ))
    };
    arbiter.check().map_err(unreachable)?;
    let identity = arbiter.identity().map_err(unreachable)?;
    Ok(Opened { arbiter, identity })
}

/// An arbiter reachable when protection started, with its identity.
pub struct Opened {
    /// The arbiter.
    pub arbiter: Box<dyn Arbiter>,
    /// Its [`Arbiter::identity`] then.
    pub identity: String,
}

/// Longest arbiter identity accepted from a peer.
pub const MAX_IDENTITY: usize = 128;

/// Do a primary whose arbiter is `primary` (its identity, from the peer)
/// and a secondary whose own is `mine` ask the same arbiter? Two sides
/// with different arbiters could both win a partition and both go live;
/// a side with none never goes on alone, so one missing is safe.
pub fn same_arbiter(primary: Option<&str>, mine: Option<&str>) -> Result<(), String> {
    match (primary, mine) {
        (Some(p), _) if p.len() > MAX_IDENTITY => Err(format!(
            "the primary's arbiter identity is {} bytes long (at most {MAX_IDENTITY})",
            p.len()
        )),
        (Some(p), Some(m)) if p != m => Err(format!(
            "the primary's arbiter is {p:?}, this secondary's {m:?}: both sides must give --arbiter the same arbiter (the same shared directory or etcd cluster), or a partition would let each win its own claim and both go live"
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_are_parsed() {
        assert!(from_spec("file:/tmp/x").is_ok());
        assert!(from_spec("file:").is_err());
        assert!(from_spec("etcd:http://127.0.0.1:2379").is_ok());
        assert!(from_spec("etcd:http://127.0.0.1:2379,http://10.0.0.2:2379?ttl=5").is_ok());
        for bad in [
            "etcd:",
            "etcd:http://a:1,",
            "etcd:https://a:1",
            "etcd:http://a:1?ttl=0",
            "etcd:http://a:1?ttl=x",
            "etcd:http://a:1?tll=3",
        ] {
            let e = from_spec(bad).err().unwrap().to_string();
            assert!(e.contains(bad), "{e}");
        }
        assert!(from_spec("/tmp/x").is_err());
    }

    #[test]
    fn a_missing_directory_or_a_file_is_refused_at_open() {
        let dir = std::env::temp_dir().join(format!("tandem-arb-open-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let spec = format!("file:{}", dir.display());
        let e = open(&spec).err().unwrap().to_string();
        assert!(e.contains(&spec) && e.contains("cannot be reached"), "{e}");
        assert!(!dir.exists(), "open created {}", dir.display());
        std::fs::write(&dir, b"not a dir").unwrap();
        let e = open(&spec).err().unwrap().to_string();
        assert!(e.contains("not a directory"), "{e}");
        std::fs::remove_file(&dir).unwrap();
        std::fs::create_dir(&dir).unwrap();
        let first = open(&spec).unwrap().identity;
        // Only the id file is left (the probe is removed), and it names
        // the directory for whoever opens it next, by any path.
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(left, [file::ID_FILE], "{left:?}");
        let other = std::env::temp_dir().join(format!("tandem-arb-link-{}", std::process::id()));
        let _ = std::fs::remove_file(&other);
        std::os::unix::fs::symlink(&dir, &other).unwrap();
        let again = open(&format!("file:{}", other.display())).unwrap().identity;
        assert_eq!(first, again);
        std::fs::remove_file(&other).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn different_arbiters_are_refused_one_missing_is_not() {
        assert!(same_arbiter(Some("file:a"), Some("file:a")).is_ok());
        assert!(same_arbiter(None, Some("file:a")).is_ok());
        assert!(same_arbiter(Some("file:a"), None).is_ok());
        assert!(same_arbiter(None, None).is_ok());
        let e = same_arbiter(Some("file:a"), Some("file:b")).unwrap_err();
        assert!(e.contains("both go live"), "{e}");
        let long = "x".repeat(MAX_IDENTITY + 1);
        assert!(same_arbiter(Some(&long), None).is_err());
    }
}
