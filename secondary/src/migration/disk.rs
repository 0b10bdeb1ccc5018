//! The destination's disk image during an incoming migration.
//!
//! The receiver's operator owns its paths: the image goes to
//! `tandem receive --disk PATH`, or to `--disk-dir DIR` under the source
//! image's file name once [`check_disk_name`] accepted it. Nothing is
//! created or truncated before the header has been accepted, and an
//! existing file is never written: the image is written to a temporary
//! file next to its place (`.NAME.tandem-incoming-NONCE`) and put there
//! only at the switchover ([`DestDisk::commit`]). Until the VM runs here
//! ([`DestDisk::keep`]), dropping a [`DestDisk`] puts everything back as it
//! was. A device node is written in place (it cannot be staged).
//!
//! If the place already holds the source's own image (the same host reached
//! under another address, or storage both hosts share; see
//! [`DiskIdentity::matches`]) nothing is written at all: the plan is
//! [`DiskPlan::Shared`] and only memory moves.

use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use failover::migration::{check_disk_block, check_disk_name, new_nonce, DiskOffer, DiskPlan};
use vmm::image::{Access, Image, ImageLock};

use super::ReceiveOptions;

/// What the destination does with a regular file.
enum Stage {
    /// Being written as `tmp`; `place` untouched so far.
    Writing,
    /// `tmp` is now at `place`; the file that was there before (if any)
    /// waits at `previous` until the VM runs.
    Committed,
    /// The VM runs on it: nothing to undo.
    Kept,
}

enum Kind {
    /// The source's own image: written by nobody here.
    Shared,
    /// A device node, written in place.
    Device(Image),
    /// A regular file, staged.
    Staged(Staged),
}

/// A regular file written next to its place.
struct Staged {
    /// `None` once committed.
    file: Option<File>,
    /// The lock of the new image (kept past the commit, so that the VM's
    /// device takes it over with no gap: `vmm::image`).
    lock: Option<ImageLock>,
    /// The file at the place, locked against other processes until the VM
    /// runs on the new one (a VM running on it refuses the migration).
    replaced: Option<Image>,
    tmp: PathBuf,
    previous: PathBuf,
    /// Was there a file at the place before?
    replaces: bool,
    stage: Stage,
}

/// The destination's disk.
pub(crate) struct DestDisk {
    /// Where the VM's disk is once it runs here.
    place: PathBuf,
    kind: Kind,
    /// The guest-visible size the header announced: every block the
    /// source sends must lie inside it.
    len: u64,
}

/// `p` made absolute and free of symlinks: canonical if it exists, else
/// its canonical parent joined with its file name.
fn resolve(p: &Path) -> Result<PathBuf, String> {
    if let Ok(c) = p.canonicalize() {
        return Ok(c);
    }
    let name = p
        .file_name()
        .ok_or_else(|| format!("destination disk {}: no file name", p.display()))?;
    let parent = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let parent = parent.canonicalize().map_err(|e| {
        format!(
            "destination disk {}: {}: {e}",
            p.display(),
            parent.display()
        )
    })?;
    Ok(parent.join(name))
}

impl DestDisk {
    /// Decide where the offered disk goes and get it ready: the source's
    /// own image (shared), a device node, or a fresh temporary file of the
    /// disk's size next to its place. Refusals name the reason.
    pub(crate) fn prepare(opts: &ReceiveOptions, offer: &DiskOffer) -> Result<DestDisk, String> {
        let (place, replace) = match (&opts.disk, &opts.disk_dir) {
            (Some(p), _) => (resolve(p)?, true),
            (None, Some(dir)) => {
                check_disk_name(&offer.name)?;
                let dir = dir
                    .canonicalize()
                    .map_err(|e| format!("--disk-dir {}: {e}", dir.display()))?;
                if !dir.is_dir() {
                    return Err(format!("--disk-dir {}: not a directory", dir.display()));
                }
                (dir.join(&offer.name), false)
            }
            (None, None) => {
                return Err(
                    "the VM has a disk but the destination was started without --disk PATH or --disk-dir DIR"
                        .into(),
                )
            }
        };
        let shown = place.display();
        let kind = match place.symlink_metadata() {
            Ok(meta) => {
                let same = offer
                    .identity
                    .matches(&place)
                    .map_err(|e| format!("destination disk {shown}: {e}"))?;
                let t = meta.file_type();
                if same && opts.replica {
                    return Err(format!(
                        "the secondary's disk {shown} is the primary's own image (the same file): a secondary replays every write on a copy of its own, behind the primary (disks are replicated, not shared), and writing the primary's live image would corrupt it; give the secondary another file (--disk)"
                    ));
                }
                if same {
                    if t.is_file() && meta.len() < offer.len {
                        return Err(format!(
                            "destination disk {shown} is the source's own image but holds {} bytes, not {}",
                            meta.len(),
                            offer.len
                        ));
                    }
                    tracing::info!("{shown} is the source's own image: not copying the disk");
                    Kind::Shared
                } else if t.is_dir() {
                    return Err(format!("destination disk {shown} is a directory"));
                } else if !replace {
                    return Err(format!(
                        "destination disk {shown} exists and is not the source's image; the receiver does not replace files in --disk-dir"
                    ));
                } else if t.is_block_device() || t.is_char_device() {
                    let f = Image::open(&place, Access::Write)
                        .map_err(|e| format!("destination disk: {e}"))?;
                    Kind::Device(f)
                } else if t.is_file() {
                    // Not replaced under a process that writes it: a VM
                    // running on it would go on writing the old file. (A
                    // shared lock excludes writers, and needs no write
                    // permission on a file that is only renamed.)
                    let replaced = Image::open(&place, Access::Read)
                        .map_err(|e| format!("destination disk: {e}"))?;
                    Self::stage(&place, offer.len, Some(replaced))?
                } else {
                    return Err(format!(
                        "destination disk {shown} is neither a regular file nor a device"
                    ));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Self::stage(&place, offer.len, None)?
            }
            Err(e) => return Err(format!("destination disk {shown}: {e}")),
        };
        Ok(DestDisk {
            place,
            kind,
            len: offer.len,
        })
    }

    /// A fresh sparse temporary file of `len` bytes next to `place` (blocks
    /// the source does not send are zero).
    fn stage(place: &Path, len: u64, replaced: Option<Image>) -> Result<Kind, String> {
        let replaces = replaced.is_some();
        let nonce = new_nonce().map_err(|e| format!("random nonce: {e}"))?;
        let name = place
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = place.with_file_name(format!(".{name}.tandem-incoming-{nonce}"));
        let previous = place.with_file_name(format!(".{name}.tandem-previous-{nonce}"));
        let (file, lock) = Image::open(&tmp, Access::CreateNew)
            .map_err(|e| format!("creating {}: {e}", tmp.display()))?
            .into_parts();
        if let Err(e) = file.set_len(len) {
            let _ = std::fs::remove_file(&tmp);
            return Err(format!("sizing {}: {e}", tmp.display()));
        }
        Ok(Kind::Staged(Staged {
            file: Some(file),
            lock: Some(lock),
            replaced,
            tmp,
            previous,
            replaces,
            stage: Stage::Writing,
        }))
    }

    /// What the source is to do with the disk.
    pub(crate) fn plan(&self) -> DiskPlan {
        match self.kind {
            Kind::Shared => DiskPlan::Shared,
            _ => DiskPlan::Copy,
        }
    }

    /// Where the VM's disk is once it runs here.
    pub(crate) fn place(&self) -> &Path {
        &self.place
    }

    fn file(&self) -> Result<&File, String> {
        match &self.kind {
            Kind::Device(f) => Ok(f.file()),
            Kind::Staged(Staged { file: Some(f), .. }) => Ok(f),
            Kind::Staged(Staged { file: None, .. }) => Err("the disk was already committed".into()),
            Kind::Shared => Err(format!(
                "disk blocks for {}, the source's own image",
                self.place.display()
            )),
        }
    }

    fn what(&self) -> String {
        match &self.kind {
            Kind::Staged(Staged { tmp, .. }) => {
                format!("{} (for {})", tmp.display(), self.place.display())
            }
            _ => self.place.display().to_string(),
        }
    }

    pub(crate) fn write(&self, offset: u64, data: &[u8]) -> Result<(), String> {
        check_disk_block(offset, data.len() as u64, self.len).map_err(|e| e.to_string())?;
        self.file()?
            .write_all_at(data, offset)
            .map_err(|e| format!("writing destination disk {}: {e}", self.what()))
    }

    /// Make what was written durable (nothing to do for a shared image:
    /// the source synced it).
    pub(crate) fn sync(&self) -> Result<(), String> {
        if matches!(self.kind, Kind::Shared) {
            return Ok(());
        }
        self.file()?
            .sync_data()
            .map_err(|e| format!("syncing destination disk {}: {e}", self.what()))
    }

    /// At the switchover: put the staged image at its place (durably). The
    /// file that was there is kept aside until [`keep`](Self::keep).
    pub(crate) fn commit(&mut self) -> Result<(), String> {
        self.sync()?;
        match &mut self.kind {
            Kind::Staged(st) => st.commit(&self.place),
            _ => Ok(()),
        }
    }

    /// The VM runs on the image: forget the file it replaced.
    pub(crate) fn keep(mut self) {
        if let Kind::Staged(st) = &mut self.kind {
            if matches!(st.stage, Stage::Committed) && st.replaces {
                let _ = std::fs::remove_file(&st.previous);
            }
            st.stage = Stage::Kept;
            // The VM's device holds the new image's lock now.
            st.lock = None;
            st.replaced = None;
        }
    }
}

impl Staged {
    fn commit(&mut self, place: &Path) -> Result<(), String> {
        if let Some(f) = self.file.take() {
            f.sync_all()
                .map_err(|e| format!("syncing {}: {e}", self.tmp.display()))?;
        }
        if self.replaces {
            std::fs::rename(place, &self.previous).map_err(|e| {
                format!(
                    "moving {} aside to {}: {e}",
                    place.display(),
                    self.previous.display()
                )
            })?;
        }
        // A hard link never replaces a file that appeared meanwhile.
        if let Err(e) = std::fs::hard_link(&self.tmp, place) {
            if self.replaces {
                let _ = std::fs::rename(&self.previous, place);
            }
            return Err(format!(
                "putting {} at {}: {e}",
                self.tmp.display(),
                place.display()
            ));
        }
        self.stage = Stage::Committed;
        let _ = std::fs::remove_file(&self.tmp);
        sync_dir(place);
        Ok(())
    }

    /// Put everything back as it was before the migration.
    fn undo(&mut self, place: &Path) {
        drop(self.file.take());
        match self.stage {
            Stage::Writing => {
                let _ = std::fs::remove_file(&self.tmp);
            }
            Stage::Committed => {
                if self.replaces {
                    let _ = std::fs::rename(&self.previous, place);
                } else {
                    let _ = std::fs::remove_file(place);
                }
                sync_dir(place);
            }
            Stage::Kept => {}
        }
    }
}

/// Make a rename in `file`'s directory durable.
fn sync_dir(file: &Path) {
    if let Some(d) = file.parent() {
        let _ = File::open(d).and_then(|d| d.sync_all());
    }
}

impl Drop for DestDisk {
    /// A migration that did not end with the VM running here: leave the
    /// destination's files as they were.
    fn drop(&mut self) {
        if let Kind::Staged(st) = &mut self.kind {
            st.undo(&self.place);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use failover::migration::DiskIdentity;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn offer(len: u64) -> DiskOffer {
        DiskOffer {
            len,
            name: "vm.img".into(),
            identity: DiskIdentity {
                boot_id: "another host".into(),
                dev: 0,
                ino: 0,
                marker: None,
            },
        }
    }

    #[test]
    fn staged_image_replaces_the_old_one_only_when_kept() {
        let dir = std::env::temp_dir().join(format!("tandem-destdisk-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("vm.img");
        std::fs::write(&img, b"old").unwrap();
        let opts = ReceiveOptions {
            disk: Some(img.clone()),
            disk_dir: None,
            ..Default::default()
        };
        // Committed at the switchover, then the restore fails: the old
        // file comes back.
        let mut d = DestDisk::prepare(&opts, &offer(4096)).unwrap();
        assert_eq!(d.plan(), DiskPlan::Copy);
        assert_eq!(std::fs::read(&img).unwrap(), b"old");
        d.write(0, b"new").unwrap();
        d.commit().unwrap();
        assert_eq!(&std::fs::read(&img).unwrap()[..3], b"new");
        drop(d);
        assert_eq!(std::fs::read(&img).unwrap(), b"old");
        assert_eq!(names(&dir), ["vm.img"]);
        // The VM runs: the new image stays, nothing else is left.
        let mut d = DestDisk::prepare(&opts, &offer(4096)).unwrap();
        d.write(0, b"new").unwrap();
        d.commit().unwrap();
        d.keep();
        let got = std::fs::read(&img).unwrap();
        assert_eq!((got.len(), &got[..3]), (4096, &b"new"[..]));
        assert_eq!(names(&dir), ["vm.img"]);
        // A new place that fails before the switchover leaves nothing.
        let opts = ReceiveOptions {
            disk: Some(dir.join("fresh.img")),
            disk_dir: None,
            ..Default::default()
        };
        let d = DestDisk::prepare(&opts, &offer(4096)).unwrap();
        assert_eq!(names(&dir).len(), 2);
        drop(d);
        assert_eq!(names(&dir), ["vm.img"]);
        // The same file (here: same host, same inode) is never staged.
        let opts = ReceiveOptions {
            disk: Some(img.clone()),
            disk_dir: None,
            ..Default::default()
        };
        let mut same = offer(4096);
        same.identity = DiskIdentity::of(&img).unwrap();
        let d = DestDisk::prepare(&opts, &same).unwrap();
        assert_eq!(d.plan(), DiskPlan::Shared);
        assert!(d.write(0, b"x").is_err());
        drop(d);
        // A secondary's replica is never the primary's own image.
        let replica = ReceiveOptions {
            replica: true,
            ..opts
        };
        let e = DestDisk::prepare(&replica, &same).err().unwrap();
        assert!(e.contains("the primary's own image"), "{e}");
        assert_eq!(names(&dir), ["vm.img"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
