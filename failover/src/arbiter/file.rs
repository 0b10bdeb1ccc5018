//! `--arbiter file:DIR`: the test-and-set on storage both hosts reach.
//!
//! The claim of `(V, G)` is the file `DIR/V.gG.claim`, holding the winner's
//! identity, the VM and the generation as text. Claiming it:
//! 1. write the claim text to a private temporary file
//!    `DIR/.V.gG.PID.NANOS.tmp` (`O_CREAT|O_EXCL`), `fsync` it;
//! 2. `link(2)` it to `DIR/V.gG.claim`. `link` creates the name atomically
//!    or fails with `EEXIST` if it exists (also on NFS, where it is the
//!    classic lock primitive); there is no window in which the name exists
//!    with partial content, because the content was durable before the
//!    name was made;
//! 3. `fsync(DIR)` so the name itself is durable before we act on it (go
//!    live), then remove the temporary name.
//!
//! Crash safety, step by step: before step 2 only a private temporary file
//! exists (ignored by everyone, harmless garbage); after step 2 the claim
//! is complete; a crash between 2 and 3 leaves a complete claim whose
//! claimant never acted on it (it had not returned `Won`): the VM stays
//! held by a dead claimant, which is safe (no two live copies) and visible
//! to the operator. A `link` whose answer was lost (an NFS retransmission
//! reporting `EEXIST` for our own link) is recognised by reading the claim
//! back: our own identity in it means we won.
//!
//! `DIR` is never created here: a missing directory means the shared
//! storage is not mounted, and creating a local one would let both hosts
//! "win" on their own disks.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::{claim_holder, claim_text, clean, Arbiter, ArbiterError, Verdict};
use crate::heartbeat::check_vm_id;

/// Largest claim file read back.
const MAX_CLAIM: u64 = 4096;

/// The directory's id file: `tandem-arbiter-id HEX`, made once by the
/// first side to open the arbiter, the same for every host whatever path
/// it mounts the directory at (`Arbiter::identity`).
pub const ID_FILE: &str = "tandem-arbiter.id";

/// See the module docs.
#[derive(Debug, Clone)]
pub struct FileArbiter {
    dir: PathBuf,
}

impl FileArbiter {
    /// Claims live in `dir` (which must exist).
    pub fn new(dir: PathBuf) -> Self {
        FileArbiter { dir }
    }

    /// The claim file of `(vm_id, generation)`.
    pub fn claim_path(&self, vm_id: &str, generation: u64) -> PathBuf {
        self.dir.join(format!("{vm_id}.g{generation}.claim"))
    }

    fn unreachable(&self, what: &str, e: impl std::fmt::Display) -> ArbiterError {
        ArbiterError::Unreachable {
            arbiter: self.describe(),
            reason: format!("{what}: {e}"),
        }
    }

    /// Read the holder out of an existing claim.
    fn holder(&self, path: &Path, vm_id: &str, generation: u64) -> Result<String, ArbiterError> {
        let mut text = String::new();
        File::open(path)
            .and_then(|f| f.take(MAX_CLAIM).read_to_string(&mut text))
            .map_err(|e| self.unreachable(&format!("reading {}", path.display()), e))?;
        claim_holder(&text, vm_id, generation).map_err(|reason| ArbiterError::Damaged {
            arbiter: self.describe(),
            what: path.display().to_string(),
            reason,
        })
    }
}

impl FileArbiter {
    /// Write `text` to the private `tmp`, make it durable, then link it to
    /// `path` (atomic: `path` never exists with partial content).
    fn publish(
        &self,
        tmp: &Path,
        path: &Path,
        text: &str,
    ) -> Result<std::io::Result<()>, ArbiterError> {
        let written = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(tmp)
            .and_then(|mut f| {
                f.write_all(text.as_bytes())?;
                f.sync_all()
            });
        if let Err(e) = written {
            let _ = std::fs::remove_file(tmp);
            return Err(self.unreachable(&format!("writing {}", tmp.display()), e));
        }
        let linked = std::fs::hard_link(tmp, path);
        let _ = std::fs::remove_file(tmp);
        Ok(linked)
    }

    /// `Err` unless the directory exists (it is never created here).
    fn is_dir(&self) -> Result<(), ArbiterError> {
        match std::fs::metadata(&self.dir) {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => Err(self.unreachable(&self.dir.display().to_string(), "not a directory")),
            Err(e) => Err(self.unreachable(&self.dir.display().to_string(), e)),
        }
    }

    /// A private temporary name in the directory (ignored by everyone).
    fn tmp_path(&self, what: &str) -> PathBuf {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        self.dir
            .join(format!(".{what}.{}.{nanos}.tmp", std::process::id()))
    }
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Arbiter for FileArbiter {
    fn claim(&self, vm_id: &str, generation: u64, holder: &str) -> Result<Verdict, ArbiterError> {
        check_vm_id(vm_id)?;
        let holder = clean(holder);
        self.is_dir()?;
        let path = self.claim_path(vm_id, generation);
        let tmp = self.tmp_path(&format!("{vm_id}.g{generation}"));
        let text = claim_text(vm_id, generation, &holder);
        match self.publish(&tmp, &path, &text)? {
            Ok(()) => {
                fsync_dir(&self.dir)
                    .map_err(|e| self.unreachable(&format!("fsync {}", self.dir.display()), e))?;
                Ok(Verdict::Won)
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                let h = self.holder(&path, vm_id, generation)?;
                if h == holder {
                    fsync_dir(&self.dir).map_err(|e| {
                        self.unreachable(&format!("fsync {}", self.dir.display()), e)
                    })?;
                    Ok(Verdict::Won)
                } else {
                    Ok(Verdict::Lost { holder: h })
                }
            }
            Err(e) => Err(self.unreachable(&format!("link {}", path.display()), e)),
        }
    }

    fn describe(&self) -> String {
        format!("file:{}", self.dir.display())
    }

    /// The directory exists and a file can be created in it (and is
    /// removed again): what a claim needs.
    fn check(&self) -> Result<(), ArbiterError> {
        self.is_dir()?;
        let probe = self.tmp_path("probe");
        let made = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&probe)
            .and_then(|f| f.sync_all());
        let _ = std::fs::remove_file(&probe);
        made.map_err(|e| self.unreachable(&format!("creating {}", probe.display()), e))
    }

    /// The id in [`ID_FILE`], made now if this is the directory's first use
    /// (two first users at once: one link wins, both read its id).
    fn identity(&self) -> Result<String, ArbiterError> {
        self.is_dir()?;
        let path = self.dir.join(ID_FILE);
        if !path.exists() {
            let id = crate::heartbeat::new_vm_id(self.dir.as_os_str().as_encoded_bytes());
            let text = format!("tandem-arbiter-id {id}\n");
            match self.publish(&self.tmp_path("id"), &path, &text)? {
                Ok(()) => fsync_dir(&self.dir)
                    .map_err(|e| self.unreachable(&format!("fsync {}", self.dir.display()), e))?,
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                Err(e) => return Err(self.unreachable(&format!("link {}", path.display()), e)),
            }
        }
        let mut text = String::new();
        File::open(&path)
            .and_then(|f| f.take(MAX_CLAIM).read_to_string(&mut text))
            .map_err(|e| self.unreachable(&format!("reading {}", path.display()), e))?;
        text.strip_prefix("tandem-arbiter-id ")
            .map(str::trim_end)
            .filter(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_hexdigit()))
            .map(|id| format!("file arbiter {id}"))
            .ok_or_else(|| ArbiterError::Damaged {
                arbiter: self.describe(),
                what: path.display().to_string(),
                reason: "not a tandem arbiter id (expected `tandem-arbiter-id HEX`)".into(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_claim_wins_and_the_loser_learns_who() {
        let dir = tempfile::tempdir().unwrap();
        let a = FileArbiter::new(dir.path().into());
        assert_eq!(a.claim("ab12", 1, "secondary b").unwrap(), Verdict::Won);
        assert_eq!(
            a.claim("ab12", 1, "primary a").unwrap(),
            Verdict::Lost {
                holder: "secondary b".into()
            }
        );
        // The winner claiming again (a retry) still holds it.
        assert_eq!(a.claim("ab12", 1, "secondary b").unwrap(), Verdict::Won);
        // Another generation and another VM are other claims.
        assert_eq!(a.claim("ab12", 2, "primary a").unwrap(), Verdict::Won);
        assert_eq!(a.claim("cd34", 1, "primary a").unwrap(), Verdict::Won);
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.iter().all(|n| n.ends_with(".claim")), "{names:?}");
    }

    #[test]
    fn a_missing_directory_is_unreachable_and_never_created() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("not-mounted");
        let a = FileArbiter::new(gone.clone());
        let e = a.claim("ab12", 1, "me").unwrap_err();
        assert!(matches!(e, ArbiterError::Unreachable { .. }), "{e}");
        assert!(!gone.exists());
    }

    #[test]
    fn a_crash_before_the_link_leaves_no_claim_and_garbage_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        // What a claimant that died after writing its temporary file leaves.
        std::fs::write(
            dir.path().join(".ab12.g1.99.1.tmp"),
            "tandem-claim 1\nholder dead\n",
        )
        .unwrap();
        let a = FileArbiter::new(dir.path().into());
        assert_eq!(a.claim("ab12", 1, "secondary b").unwrap(), Verdict::Won);
    }

    #[test]
    fn a_damaged_claim_is_no_answer() {
        let dir = tempfile::tempdir().unwrap();
        let a = FileArbiter::new(dir.path().into());
        std::fs::write(a.claim_path("ab12", 1), "garbage").unwrap();
        let e = a.claim("ab12", 1, "me").unwrap_err();
        assert!(matches!(e, ArbiterError::Damaged { .. }), "{e}");
        assert!(a.claim("../x", 1, "me").is_err());
    }

    #[test]
    fn concurrent_claims_have_one_winner() {
        let dir = tempfile::tempdir().unwrap();
        let wins: usize = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|i| {
                    let a = FileArbiter::new(dir.path().into());
                    s.spawn(move || a.claim("ab12", 1, &format!("claimant {i}")).unwrap())
                })
                .collect();
            hs.into_iter()
                .map(|h| (h.join().unwrap() == Verdict::Won) as usize)
                .sum()
        });
        assert_eq!(wins, 1);
    }
}
