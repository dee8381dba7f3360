//! Writing a device's or a CA's files so that a daemon reloading on file changes never sees half of them:
//! each file is written and flushed under a temporary name in its own directory, given to its owner,
//! and only then renamed into place; a device directory made for a command that failed is removed again.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::{file_error, CertsError, Owner};

/// Private keys: the owner alone reads them.
pub(super) const KEY_MODE: u32 = 0o600;
/// Certificates, CSRs and `device.toml`.
pub(super) const PUBLIC_MODE: u32 = 0o644;
const DEVICE_DIR_MODE: u32 = 0o755;

/// A file written under a temporary name beside its destination, renamed into place by [`Staged::commit`]
/// and removed if never committed.
pub(super) struct Staged {
    tmp: PathBuf,
    dest: PathBuf,
    committed: bool,
}

impl Staged {
    /// Writes `contents` to a new temporary file created with `mode` and given to `owner`, and flushes it
    /// to disk.
    pub(super) fn write(dest: &Path, contents: &[u8], mode: u32, owner: Option<&Owner>) -> Result<Staged, CertsError> {
        let name = dest.file_name().unwrap_or_default().to_string_lossy();
        let tmp = dest.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
        // A leftover from a crashed run of this same pid; create_new below must not trip over it.
        let _ = fs::remove_file(&tmp);
        let staged = Staged {
            tmp,
            dest: dest.to_path_buf(),
            committed: false,
        };
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&staged.tmp)
            .map_err(|e| file_error(&staged.tmp, format!("cannot create: {e}")))?;
        if let Some(o) = owner {
            std::os::unix::fs::fchown(&f, Some(o.uid), Some(o.gid))
                .map_err(|e| file_error(&staged.dest, format!("cannot give the new file to {o}: {e}")))?;
        }
        f.write_all(contents)
            .and_then(|()| f.sync_all())
            .map_err(|e| file_error(&staged.tmp, format!("cannot write: {e}")))?;
        Ok(staged)
    }

    /// Renames the file into place.
    pub(super) fn commit(mut self) -> Result<(), CertsError> {
        fs::rename(&self.tmp, &self.dest).map_err(|e| file_error(&self.dest, format!("cannot replace: {e}")))?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Makes the renames in `dir` durable.
pub(super) fn sync_dir(dir: &Path) -> Result<(), CertsError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| file_error(dir, format!("cannot sync: {e}")))
}

/// Creates `dir` and any missing parents with `mode`.
pub(super) fn create_dir(dir: &Path, mode: u32) -> Result<(), CertsError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .map_err(|e| file_error(dir, format!("cannot create the directory: {e}")))
}

/// A device's directory, removed again (if still empty) unless [`DeviceDir::keep`] is called: an empty
/// directory left by a failed command would be a device without files, which fails the next reload.
pub(super) struct DeviceDir {
    path: PathBuf,
    created: bool,
}

impl DeviceDir {
    /// Creates `dir` (and its parents) if missing; a directory it creates is given to `owner`.
    pub(super) fn create(dir: &Path, owner: Option<&Owner>) -> Result<DeviceDir, CertsError> {
        let created = !dir.exists();
        create_dir(dir, DEVICE_DIR_MODE)?;
        let guard = DeviceDir {
            path: dir.to_path_buf(),
            created,
        };
        if let (true, Some(o)) = (created, owner) {
            std::os::unix::fs::chown(dir, Some(o.uid), Some(o.gid))
                .map_err(|e| file_error(dir, format!("cannot give the new directory to {o}: {e}")))?;
        }
        Ok(guard)
    }

    /// Keeps the directory: the command has put a file in it.
    pub(super) fn keep(mut self) {
        self.created = false;
    }
}

impl Drop for DeviceDir {
    fn drop(&mut self) {
        if self.created {
            let _ = fs::remove_dir(&self.path);
        }
    }
}

/// Removes `path`; one that is not there is already removed.
pub(super) fn remove_if_present(path: &Path) -> Result<(), CertsError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(file_error(path, format!("cannot remove: {e}"))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEVICE_DIR_KEY;

    /// An owner that is not the user running the test where that is allowed (as root), else the same.
    fn other_owner() -> Owner {
        let euid = rustix::process::geteuid();
        let spec = match euid.is_root() {
            true => "65534:65534".to_string(),
            false => format!("{}:{}", euid.as_raw(), rustix::process::getegid().as_raw()),
        };
        Owner::resolve(&spec).unwrap()
    }

    #[test]
    fn a_staged_file_has_its_owner_before_it_takes_its_name() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join(DEVICE_DIR_KEY);
        let owner = other_owner();
        let staged = Staged::write(&dest, b"key", KEY_MODE, Some(&owner)).unwrap();
        let tmp = fs::metadata(&staged.tmp).unwrap();
        assert_eq!((tmp.uid(), tmp.gid()), (owner.uid, owner.gid));
        assert_eq!(tmp.mode() & 0o777, KEY_MODE);
        assert!(!dest.exists(), "the final name appeared before the rename");
        let tmp_path = staged.tmp.clone();
        staged.commit().unwrap();
        let placed = fs::metadata(&dest).unwrap();
        assert_eq!(
            placed.ino(),
            tmp.ino(),
            "the file in place is the one that was given away"
        );
        assert_eq!((placed.uid(), placed.gid()), (owner.uid, owner.gid));
        assert!(!tmp_path.exists());
    }

    #[test]
    fn a_device_directory_made_for_a_failed_command_is_removed() {
        use std::os::unix::fs::MetadataExt as _;
        let out = tempfile::tempdir().unwrap();
        let owner = other_owner();
        let dir = out.path().join("boiler-7");
        let made = DeviceDir::create(&dir, Some(&owner)).unwrap();
        let m = fs::metadata(&dir).unwrap();
        assert_eq!((m.uid(), m.gid()), (owner.uid, owner.gid));
        drop(made);
        assert!(!dir.exists(), "an empty device directory was left behind");
        DeviceDir::create(&dir, Some(&owner)).unwrap().keep();
        assert!(dir.is_dir());
        let existing = DeviceDir::create(&dir, None).unwrap();
        drop(existing);
        assert!(dir.is_dir(), "a directory that was there before was removed");
    }
}
