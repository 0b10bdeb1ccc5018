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

use std::time::{Duration, Instant};

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

/// How long a side that wants to be live keeps retrying a claim the
/// arbiter does not answer (an etcd leader election, a partition between
/// this host and the arbiter that heals) before it gives up: the claim is
/// an atomic test-and-set, so asking again is always safe, and a VM whose
/// two hosts both lost the arbiter for a moment just as they lost each
/// other still gets exactly one live copy once it answers.
pub const CLAIM_PATIENCE: Duration = Duration::from_secs(10);

/// Pause between two attempts of [`claim_patiently`].
const CLAIM_RETRY: Duration = Duration::from_millis(250);

/// [`Arbiter::claim`], retried for up to `patience` while the arbiter
/// cannot be reached (every other answer, a damaged claim among them, is
/// final). `say` is told once, at the first failure, what failed and how
/// long this side keeps trying. The last error, if it never answered,
/// names the attempts and the time they took.
pub fn claim_patiently(
    arbiter: &dyn Arbiter,
    vm_id: &str,
    generation: u64,
    holder: &str,
    patience: Duration,
    mut say: impl FnMut(&str),
) -> Result<Verdict, ArbiterError> {
    let start = Instant::now();
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        match arbiter.claim(vm_id, generation, holder) {
            Err(ArbiterError::Unreachable { arbiter: a, reason }) => {
                if start.elapsed() + CLAIM_RETRY >= patience {
                    return Err(ArbiterError::Unreachable {
                        arbiter: a,
                        reason: format!(
                            "{reason} (no answer to {attempts} claims over {:.1} s)",
                            start.elapsed().as_secs_f64()
                        ),
                    });
                }
                if attempts == 1 {
                    say(&format!(
                        "the arbiter {a} cannot be reached ({reason}); asking again for up to {:.0} s",
                        patience.as_secs_f64()
                    ));
                }
                std::thread::sleep(CLAIM_RETRY);
            }
            other => {
                if attempts > 1 {
                    say(&format!(
                        "the arbiter {} answered after {attempts} claims ({:.1} s)",
                        arbiter.describe(),
                        start.elapsed().as_secs_f64()
                    ));
                }
                return other;
            }
        }
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

    /// Fails `fail` claims as unreachable (or damaged), then wins.
    struct Flaky {
        fail: std::sync::atomic::AtomicU32,
        damaged: bool,
    }

    impl Arbiter for Flaky {
        fn claim(&self, _: &str, _: u64, _: &str) -> Result<Verdict, ArbiterError> {
            use std::sync::atomic::Ordering;
            if self.fail.load(Ordering::SeqCst) == 0 {
                return Ok(Verdict::Won);
            }
            self.fail.fetch_sub(1, Ordering::SeqCst);
            Err(if self.damaged {
                ArbiterError::Damaged {
                    arbiter: "flaky".into(),
                    what: "c".into(),
                    reason: "bad".into(),
                }
            } else {
                ArbiterError::Unreachable {
                    arbiter: "flaky".into(),
                    reason: "no answer".into(),
                }
            })
        }
        fn describe(&self) -> String {
            "flaky".into()
        }
        fn check(&self) -> Result<(), ArbiterError> {
            Ok(())
        }
        fn identity(&self) -> Result<String, ArbiterError> {
            Ok("flaky".into())
        }
    }

    fn flaky(fail: u32, damaged: bool) -> Flaky {
        Flaky {
            fail: fail.into(),
            damaged,
        }
    }

    #[test]
    fn an_unreachable_arbiter_is_asked_again_within_the_patience() {
        let mut said = Vec::new();
        let v = claim_patiently(
            &flaky(3, false),
            "ab",
            1,
            "me",
            Duration::from_secs(5),
            |m| said.push(m.to_string()),
        );
        assert_eq!(v.unwrap(), Verdict::Won);
        assert_eq!(said.len(), 2, "{said:?}");
        assert!(said[0].contains("asking again for up to 5 s"), "{said:?}");
        assert!(said[1].contains("answered after 4 claims"), "{said:?}");
    }

    #[test]
    fn patience_runs_out_and_a_damaged_claim_is_final() {
        let start = Instant::now();
        let e = claim_patiently(
            &flaky(1000, false),
            "ab",
            1,
            "me",
            Duration::from_millis(800),
            |_| {},
        )
        .unwrap_err();
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
        let e = e.to_string();
        assert!(
            e.contains("cannot be reached") && e.contains("no answer to"),
            "{e}"
        );
        let arb = flaky(5, true);
        let e = claim_patiently(&arb, "ab", 1, "me", Duration::from_secs(5), |_| {}).unwrap_err();
        assert!(matches!(e, ArbiterError::Damaged { .. }), "{e}");
        assert_eq!(
            arb.fail.load(std::sync::atomic::Ordering::SeqCst),
            4,
            "asked once only"
        );
    }
}
