//! What a file looked like at one moment: size, modification and change times, inode. Two equal stamps
//! mean the file was not rewritten, replaced by a rename, re-linked or chmod-ed in between, which is what
//! the reload watcher and the reuse of unchanged identities rely on.

use std::path::Path;
use std::time::SystemTime;

/// The state of one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
    changed: i64,
    changed_ns: i64,
}

impl Stamp {
    /// The stamp of `path` (following symlinks), or `None` if it cannot be read.
    pub fn of(path: &Path) -> Option<Stamp> {
        std::fs::metadata(path).ok().map(|m| Stamp::from(&m))
    }
}

impl From<&std::fs::Metadata> for Stamp {
    fn from(m: &std::fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        Stamp {
            len: m.len(),
            modified: m.modified().ok(),
            inode: m.ino(),
            changed: m.ctime(),
            changed_ns: m.ctime_nsec(),
        }
    }
}
