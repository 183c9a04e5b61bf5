//! The writing layers' guard against disk trouble: before they write, they check that the data
//! directory's file system is writable and has room, and stop with an error that says so
//! instead of failing half-way through a write.

use std::path::Path;

use rustix::fs::{statvfs, StatVfsMountFlags};

use crate::{Error, Result};

/// What the file system holding a path has left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Space {
    pub free_bytes: u64,
    pub read_only: bool,
}

/// Free space and read-only flag of the file system holding `path` (or its nearest existing
/// ancestor).
pub fn space(path: &Path) -> Result<Space> {
    let mut p = path;
    while !p.exists() {
        match p.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => p = parent,
            _ => break,
        }
    }
    let st = statvfs(p).map_err(|e| Error::io(p, e.into()))?;
    Ok(Space {
        free_bytes: st.f_bavail.saturating_mul(st.f_frsize),
        read_only: st.f_flag.contains(StatVfsMountFlags::RDONLY),
    })
}

/// Fails with [`Error::Disk`] when the file system is read-only or has less than `min_free_mb`
/// MiB free.
pub fn check(path: &Path, min_free_mb: u64) -> Result<()> {
    let s = space(path)?;
    if s.read_only {
        return Err(Error::Disk {
            path: path.to_path_buf(),
            reason: "Read-only file system".into(),
        });
    }
    let min = min_free_mb.saturating_mul(1 << 20);
    if s.free_bytes < min {
        return Err(Error::Disk {
            path: path.to_path_buf(),
            reason: format!(
                "No space left on device: {:.1} MiB free, below the reserve of {min_free_mb} MiB (min-free-mb); free space and restart",
                s.free_bytes as f64 / f64::from(1 << 20)
            ),
        });
    }
    Ok(())
}

/// Writes `bytes` to a new file at `path` and syncs it to disk before returning.
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    let mut w = std::io::BufWriter::new(file);
    w.write_all(bytes).map_err(|e| Error::io(path, e))?;
    let file = w
        .into_inner()
        .map_err(|e| Error::io(path, e.into_error()))?;
    file.sync_all().map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reserve_larger_than_the_disk_stops_with_the_key_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(check(dir.path(), 0).is_ok());
        let e = check(dir.path(), u64::MAX / (1 << 21))
            .expect_err("no disk is that large")
            .to_string();
        assert!(e.contains("No space left on device"), "{e}");
        assert!(e.contains("min-free-mb"), "{e}");
        assert!(e.contains(&dir.path().display().to_string()), "{e}");
    }

    #[test]
    fn missing_paths_are_checked_at_their_nearest_ancestor() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = space(&dir.path().join("not/yet/made")).expect("space");
        assert!(s.free_bytes > 0);
    }
}

/// The identity (device and inode) of a data directory when a layer started, so that a layer
/// notices when the directory is removed, unmounted or replaced under it instead of running on
/// blind (its open files would keep working on the old one).
#[derive(Clone, Debug)]
pub struct Anchor {
    path: std::path::PathBuf,
    id: (u64, u64),
}

impl Anchor {
    /// Takes the identity of `path` now.
    pub fn take(path: &Path) -> Result<Anchor> {
        Ok(Anchor {
            path: path.to_path_buf(),
            id: identity(path)?,
        })
    }

    /// Fails, naming the path, when it is gone or is another directory than at [`Anchor::take`].
    pub fn check(&self) -> Result<()> {
        match identity(&self.path) {
            Ok(id) if id == self.id => Ok(()),
            Ok(_) => Err(Error::Other(format!(
                "the data directory {} was replaced by another one while in use; stopping",
                self.path.display()
            ))),
            Err(_) => Err(Error::Other(format!(
                "the data directory {} is gone (removed or unmounted) while in use; stopping",
                self.path.display()
            ))),
        }
    }
}

fn identity(path: &Path) -> Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    Ok((m.dev(), m.ino()))
}

#[cfg(test)]
mod anchor_tests {
    use super::*;

    #[test]
    fn a_removed_or_replaced_directory_is_noticed() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("data");
        std::fs::create_dir(&dir).expect("mkdir");
        let anchor = Anchor::take(&dir).expect("anchor");
        anchor.check().expect("unchanged");
        std::fs::rename(&dir, root.path().join("moved")).expect("move away");
        std::fs::create_dir(&dir).expect("a new one in its place");
        let e = anchor.check().expect_err("replaced").to_string();
        assert!(e.contains("replaced") && e.contains("data"), "{e}");
        std::fs::remove_dir(&dir).expect("remove");
        let e = anchor.check().expect_err("gone").to_string();
        assert!(e.contains("is gone"), "{e}");
    }
}

/// An exclusive lock on a directory a layer writes (`<dir>/.lock`, `flock`), held while the
/// layer runs: a second writer stops at start instead of writing into the same files. The
/// kernel releases it when the process ends, however it ends.
#[derive(Debug)]
pub struct DirLock {
    _file: std::fs::File,
}

impl DirLock {
    /// Takes the lock of `dir` for `what` (e.g. "the archiver"), or says who holds it.
    pub fn acquire(dir: &Path, what: &str) -> Result<DirLock> {
        use std::io::{Read, Seek, Write};
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let path = dir.join(".lock");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        if rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            return Err(Error::Other(format!(
                "{what} cannot start: another process ({}) holds {}; stop it first or use another data directory",
                match holder.trim() {
                    "" => "pid unknown".to_string(),
                    pid => format!("pid {pid}"),
                },
                path.display()
            )));
        }
        let _ = file.set_len(0);
        let _ = file.rewind();
        let _ = write!(file, "{}", std::process::id());
        Ok(DirLock { _file: file })
    }
}

#[cfg(test)]
mod lock_tests {
    use super::*;

    #[test]
    fn a_second_writer_is_refused_until_the_first_lets_go() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = DirLock::acquire(dir.path(), "the archiver").expect("first");
        let e = DirLock::acquire(dir.path(), "the archiver")
            .expect_err("second")
            .to_string();
        assert!(e.contains("another process") && e.contains(".lock"), "{e}");
        assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
        drop(first);
        DirLock::acquire(dir.path(), "the archiver").expect("free again");
    }
}

/// Bytes of the files under `dir`, every level down; 0 for what cannot be read.
pub fn dir_bytes(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(_) => e.metadata().map_or(0, |m| m.len()),
            Err(_) => 0,
        })
        .sum()
}
