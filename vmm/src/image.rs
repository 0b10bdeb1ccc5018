//! Disk images: the one way Tandem opens one, and the advisory lock that
//! keeps two processes from writing the same image (QEMU's "image
//! locking").
//!
//! Every open of a disk image goes through [`Image::open`]. An image opened
//! for writing ([`Access::Write`], [`Access::Create`], [`Access::CreateNew`])
//! holds an exclusive `flock(2)` on it, one opened for reading
//! ([`Access::Read`]) a shared one, for as long as an [`Image`] or an
//! [`ImageLock`] of it is alive. A lock another process holds is refused
//! with [`ImageError::Locked`] *before* anything is changed: nothing is
//! created, truncated or written.
//!
//! `flock` locks belong to an open file description, so two `open`s of one
//! file in one process would conflict with each other. This process's
//! locks are therefore kept in a registry by file identity (device and
//! inode): opening an image this process already holds shares that lock
//! (upgrading a shared lock to an exclusive one when asked to write), so a
//! VM, its migration thread and a disk move may open the image they already
//! own. The lock ends when the last [`Image`]/[`ImageLock`] is dropped, or
//! earlier with [`ImageLock::release`] (a migration onto shared storage lets
//! go at the switchover; [`ImageLock::retake`] takes it back).
//!
//! The locks are advisory: they keep out other Tandem processes (and QEMU,
//! which uses byte-range locks of its own on other bytes: not these), not a
//! program that ignores them. On NFS, Linux emulates `flock` with a lock of
//! the whole file on the server (NLM, NFSv4), which other clients see; on a
//! file system without locks the open fails with the error naming it.

use std::fs::{File, OpenOptions, TryLockError};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

/// What an image is opened for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reading only: a shared lock.
    Read,
    /// Reading and writing an existing image: an exclusive lock.
    Write,
    /// As `Write`, creating the file if it is missing. An existing file is
    /// not truncated here: lock first, then change it.
    Create,
    /// As `Write`, the file must not exist yet.
    CreateNew,
}

impl Access {
    fn writes(self) -> bool {
        self != Access::Read
    }
}

/// Why an image could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The file could not be opened (or created).
    #[error("cannot open disk image {path}: {source}")]
    Open {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Another process holds a lock that excludes ours.
    #[error(
        "disk image {path} is in use by another process: failed to get the \"{}\" lock \
         (is another tandem running a VM, a secondary, a replay or a migration on this image?)",
        if *write { "write" } else { "read" }
    )]
    Locked {
        /// The image.
        path: PathBuf,
        /// The lock asked for was the exclusive (write) one.
        write: bool,
    },
    /// Locking failed for another reason (a file system without locks).
    #[error("cannot lock disk image {path}: {source}")]
    Lock {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// An open disk image and its lock.
#[derive(Debug)]
pub struct Image {
    file: File,
    lock: ImageLock,
}

/// A lock on an image this process holds, shared by every [`Image`] of the
/// same file in this process. Cloning shares it.
#[derive(Debug, Clone)]
pub struct ImageLock(Arc<Held>);

#[derive(Debug)]
struct Held {
    /// The open file description that carries the `flock`.
    fd: File,
    id: FileId,
    path: PathBuf,
    state: Mutex<LockState>,
}

#[derive(Debug, Clone, Copy)]
struct LockState {
    exclusive: bool,
    /// Let go with [`ImageLock::release`].
    released: bool,
}

/// A file's identity: (device, inode).
type FileId = (u64, u64);

/// This process's locks, by file identity.
static HELD: Mutex<Vec<(FileId, Weak<Held>)>> = Mutex::new(Vec::new());

fn take_lock(f: &File, exclusive: bool, path: &Path) -> Result<(), ImageError> {
    let r = if exclusive {
        f.try_lock()
    } else {
        f.try_lock_shared()
    };
    match r {
        Ok(()) => Ok(()),
        Err(TryLockError::WouldBlock) => Err(ImageError::Locked {
            path: path.to_path_buf(),
            write: exclusive,
        }),
        Err(TryLockError::Error(source)) => Err(ImageError::Lock {
            path: path.to_path_buf(),
            source,
        }),
    }
}

impl Image {
    /// Open the image at `path` for `access` and lock it (see the module
    /// docs). A lock held by another process is refused with
    /// [`ImageError::Locked`] and nothing is changed.
    pub fn open(path: &Path, access: Access) -> Result<Image, ImageError> {
        let mut opts = OpenOptions::new();
        opts.read(true).write(access.writes());
        match access {
            Access::Create => {
                opts.create(true);
            }
            Access::CreateNew => {
                opts.create_new(true);
            }
            Access::Read | Access::Write => {}
        }
        let open_err = |source| ImageError::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = opts.open(path).map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        let id = (meta.dev(), meta.ino());
        let exclusive = access.writes();
        let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
        held.retain(|(_, w)| w.strong_count() > 0);
        let existing = held
            .iter()
            .find(|(i, _)| *i == id)
            .and_then(|(_, w)| w.upgrade());
        if let Some(h) = existing {
            let mut st = h.state.lock().unwrap_or_else(|e| e.into_inner());
            let want = exclusive || st.exclusive;
            if st.released || want != st.exclusive {
                take_lock(&h.fd, want, path)?;
                st.released = false;
                st.exclusive = want;
            }
            drop(st);
            return Ok(Image {
                file,
                lock: ImageLock(h),
            });
        }
        take_lock(&file, exclusive, path)?;
        let fd = file.try_clone().map_err(open_err)?;
        let h = Arc::new(Held {
            fd,
            id,
            path: path.to_path_buf(),
            state: Mutex::new(LockState {
                exclusive,
                released: false,
            }),
        });
        held.push((id, Arc::downgrade(&h)));
        Ok(Image {
            file,
            lock: ImageLock(h),
        })
    }

    /// The open file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Its lock.
    pub fn lock(&self) -> &ImageLock {
        &self.lock
    }

    /// The file and its lock (keep the lock as long as the file may be
    /// written).
    pub fn into_parts(self) -> (File, ImageLock) {
        (self.file, self.lock)
    }
}

impl ImageLock {
    /// The path the image was first opened under in this process.
    pub fn path(&self) -> &Path {
        &self.0.path
    }

    /// Is it the exclusive (write) lock?
    pub fn is_exclusive(&self) -> bool {
        self.0
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .exclusive
    }

    /// Let another process have the image (a migration's destination on
    /// shared storage, once this process has stopped writing it), while
    /// keeping it open.
    pub fn release(&self) -> std::io::Result<()> {
        let mut st = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
        self.0.fd.unlock()?;
        st.released = true;
        Ok(())
    }

    /// Take the lock back after [`Self::release`] (a switchover that
    /// failed): refused with [`ImageError::Locked`] if another process
    /// took it meanwhile.
    pub fn retake(&self) -> Result<(), ImageError> {
        let mut st = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.released {
            take_lock(&self.0.fd, st.exclusive, &self.0.path)?;
            st.released = false;
        }
        Ok(())
    }

    /// Is the lock let go ([`Self::release`])?
    pub fn released(&self) -> bool {
        self.0
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .released
    }

    /// Is it a lock on the file `other` (same device and inode)?
    pub fn same_file(&self, other: &ImageLock) -> bool {
        self.0.id == other.0.id
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A fresh directory, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            use std::sync::atomic::{AtomicU32, Ordering};
            static N: AtomicU32 = AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "tandem-image-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn image(name: &str, bytes: &[u8]) -> (TempDir, PathBuf) {
        let dir = TempDir::new();
        let p = dir.0.join(name);
        File::create(&p).unwrap().write_all(bytes).unwrap();
        (dir, p)
    }

    /// Another process's view: a separate open file description, outside
    /// the registry.
    fn other(p: &Path) -> File {
        File::open(p).unwrap()
    }

    #[test]
    fn a_writer_excludes_other_processes_until_dropped() {
        let (_d, p) = image("a.img", b"data");
        let img = Image::open(&p, Access::Write).unwrap();
        assert!(img.lock().is_exclusive());
        assert!(matches!(
            other(&p).try_lock_shared(),
            Err(TryLockError::WouldBlock)
        ));
        drop(img);
        other(&p).try_lock().unwrap();
    }

    #[test]
    fn a_locked_image_is_refused_and_not_changed() {
        let (_d, p) = image("b.img", b"keep me");
        let theirs = other(&p);
        theirs.try_lock().unwrap();
        for access in [Access::Read, Access::Write, Access::Create] {
            let e = Image::open(&p, access).unwrap_err();
            let msg = e.to_string();
            assert!(matches!(e, ImageError::Locked { .. }), "{msg}");
            assert!(msg.contains(&p.display().to_string()), "{msg}");
            assert!(msg.contains("in use by another process"), "{msg}");
        }
        assert_eq!(std::fs::read(&p).unwrap(), b"keep me");
        // A shared lock elsewhere lets readers in, not writers.
        theirs.unlock().unwrap();
        theirs.try_lock_shared().unwrap();
        Image::open(&p, Access::Read).unwrap();
        let e = Image::open(&p, Access::Write).unwrap_err();
        assert!(e.to_string().contains("\"write\" lock"), "{e}");
    }

    #[test]
    fn this_process_shares_its_lock_and_upgrades_it() {
        let (_d, p) = image("c.img", b"x");
        let r = Image::open(&p, Access::Read).unwrap();
        assert!(!r.lock().is_exclusive());
        // A second name of the same file.
        let link = p.with_file_name("c-link.img");
        std::fs::hard_link(&p, &link).unwrap();
        let w = Image::open(&link, Access::Write).unwrap();
        assert!(r.lock().same_file(w.lock()));
        assert!(r.lock().is_exclusive());
        assert!(matches!(
            other(&p).try_lock_shared(),
            Err(TryLockError::WouldBlock)
        ));
        drop(w);
        drop(r);
        other(&p).try_lock().unwrap();
    }

    #[test]
    fn release_and_retake() {
        let (_d, p) = image("d.img", b"x");
        let img = Image::open(&p, Access::Write).unwrap();
        img.lock().release().unwrap();
        assert!(img.lock().released());
        let theirs = other(&p);
        theirs.try_lock().unwrap();
        assert!(matches!(
            img.lock().retake(),
            Err(ImageError::Locked { write: true, .. })
        ));
        theirs.unlock().unwrap();
        img.lock().retake().unwrap();
        assert!(matches!(theirs.try_lock(), Err(TryLockError::WouldBlock)));
    }

    #[test]
    fn create_new_and_missing_files() {
        let dir = TempDir::new();
        let p = dir.0.join("new.img");
        let e = Image::open(&p, Access::Write).unwrap_err();
        assert!(matches!(e, ImageError::Open { .. }), "{e}");
        let img = Image::open(&p, Access::CreateNew).unwrap();
        assert!(matches!(
            other(&p).try_lock(),
            Err(TryLockError::WouldBlock)
        ));
        drop(img);
        assert!(Image::open(&p, Access::CreateNew).is_err());
        Image::open(&p, Access::Create).unwrap();
    }
}
