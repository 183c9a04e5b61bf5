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
