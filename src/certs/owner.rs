//! `--owner USER[:GROUP]`: whom the files written by `mqtls certs issue` and `csr` belong to.
//!
//! The daemon runs as its own user and reads only keys that user owns, and it polls the device
//! directory and reloads whenever something there changes. A key that turns up under its final name
//! owned by root makes that reload fail, however soon a `chown` follows. So each file is given its owner
//! while it still has its temporary name, and the rename is the only thing the daemon ever sees.
//!
//! Names are looked up in `/etc/passwd` and `/etc/group`, where `systemd-sysusers` and `useradd --system`
//! put system users; that keeps the library free of the unsafe `getpwnam` call. Users that exist only in
//! a directory service (LDAP, NIS) can be given by number.

use std::fmt;
use std::fs;
use std::path::Path;

use super::CertsError;

/// The user database that names are looked up in.
const PASSWD_FILE: &str = "/etc/passwd";
/// The group database that names are looked up in.
const GROUP_FILE: &str = "/etc/group";

/// The user and group that written files are given, from `--owner USER[:GROUP]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// The numeric user id.
    pub uid: u32,
    /// The numeric group id.
    pub gid: u32,
    /// The owner as it was given (for messages).
    spec: String,
}

impl Owner {
    /// Resolves `USER`, `USER:GROUP`, `UID` or `UID:GID` (names and numbers may be mixed) against
    /// `/etc/passwd` and `/etc/group`. A user without a group, or with an empty one (`USER:`), means the
    /// user's primary group, as `chown USER:` does.
    pub fn resolve(spec: &str) -> Result<Owner, CertsError> {
        Owner::resolve_in(spec, Path::new(PASSWD_FILE), Path::new(GROUP_FILE))
    }

    /// [`Owner::resolve`] against other user and group databases (in the same format).
    fn resolve_in(spec: &str, passwd: &Path, group: &Path) -> Result<Owner, CertsError> {
        let bad = |reason: String| CertsError::BadOwner {
            owner: spec.to_string(),
            reason,
        };
        let (user, group_part) = match spec.split_once(':') {
            Some((u, g)) => (u, Some(g).filter(|g| !g.is_empty())),
            None => (spec, None),
        };
        if user.is_empty() {
            return Err(bad("a user is required: USER, USER:GROUP, UID or UID:GID".into()));
        }
        let (uid, primary_gid) = match numeric_id(user).map_err(&bad)? {
            Some(uid) => (uid, None),
            None => {
                let (uid, gid) = lookup_user(passwd, user)
                    .map_err(&bad)?
                    .ok_or_else(|| bad(format!("no user `{user}` in {}", passwd.display())))?;
                (uid, Some(gid))
            }
        };
        let gid = match group_part {
            Some(g) => match numeric_id(g).map_err(&bad)? {
                Some(gid) => gid,
                None => lookup_group(group, g)
                    .map_err(&bad)?
                    .ok_or_else(|| bad(format!("no group `{g}` in {}", group.display())))?,
            },
            None => match primary_gid {
                Some(gid) => gid,
                None => primary_group_of(passwd, uid).map_err(&bad)?.ok_or_else(|| {
                    bad(format!(
                        "uid {uid} is not in {}, so it has no primary group; give one: {uid}:GID",
                        passwd.display()
                    ))
                })?,
            },
        };
        Ok(Owner {
            uid,
            gid,
            spec: spec.to_string(),
        })
    }

    /// Refuses, before anything is written, an owner that this process may not give files to: only
    /// root (CAP_CHOWN) gives files away; anyone may keep them as their own user and one of their groups.
    pub fn check_allowed(&self) -> Result<(), CertsError> {
        use rustix::process::{getegid, geteuid, getgroups};
        let euid = geteuid();
        if euid.is_root() {
            return Ok(());
        }
        let own_group = getegid().as_raw() == self.gid
            || getgroups().is_ok_and(|groups| groups.iter().any(|g| g.as_raw() == self.gid));
        if euid.as_raw() == self.uid && own_group {
            return Ok(());
        }
        Err(CertsError::BadOwner {
            owner: self.spec.clone(),
            reason: format!(
                "giving files to uid {}, gid {} needs root (CAP_CHOWN), and this runs as uid {}; \
                 run the command with sudo",
                self.uid,
                self.gid,
                euid.as_raw()
            ),
        })
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (uid {}, gid {})", self.spec, self.uid, self.gid)
    }
}

/// `Some(id)` for an all-digit string; `None` for a name.
fn numeric_id(text: &str) -> Result<Option<u32>, String> {
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(None);
    }
    match text.parse::<u32>() {
        // chown(2) reads -1 as "leave unchanged", so it cannot be an owner.
        Ok(id) if id != u32::MAX => Ok(Some(id)),
        _ => Err(format!("`{text}` is not a valid id (0 to {})", u32::MAX - 1)),
    }
}

/// The records of a colon-separated database (`/etc/passwd`, `/etc/group`), comments and NIS `+`/`-`
/// lines left out.
fn records(path: &Path) -> Result<Vec<Vec<String>>, String> {
    let text = fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('+') && !l.starts_with('-'))
        .map(|l| l.split(':').map(str::to_string).collect())
        .collect())
}

fn id_field(record: &[String], index: usize) -> Option<u32> {
    record.get(index).and_then(|f| f.parse().ok())
}

/// `name:password:uid:gid:...` -> (uid, gid).
fn lookup_user(passwd: &Path, name: &str) -> Result<Option<(u32, u32)>, String> {
    Ok(records(passwd)?
        .iter()
        .filter(|r| r[0] == name)
        .find_map(|r| Some((id_field(r, 2)?, id_field(r, 3)?))))
}

fn primary_group_of(passwd: &Path, uid: u32) -> Result<Option<u32>, String> {
    Ok(records(passwd)?
        .iter()
        .filter(|r| id_field(r, 2) == Some(uid))
        .find_map(|r| id_field(r, 3)))
}

/// `name:password:gid:members` -> gid.
fn lookup_group(group: &Path, name: &str) -> Result<Option<u32>, String> {
    Ok(records(group)?
        .iter()
        .filter(|r| r[0] == name)
        .find_map(|r| id_field(r, 2)))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Db {
        _dir: tempfile::TempDir,
        passwd: std::path::PathBuf,
        group: std::path::PathBuf,
    }

    fn db() -> Db {
        let dir = tempfile::tempdir().unwrap();
        let passwd = dir.path().join("passwd");
        let group = dir.path().join("group");
        fs::write(
            &passwd,
            "root:x:0:0:root:/root:/bin/bash\n# a comment\n+nisuser::::::\n\
             mqtls:x:998:997:mqtls MQTT-to-mTLS proxy:/:/usr/sbin/nologin\nbroken:x:notanumber:1::/:\n",
        )
        .unwrap();
        fs::write(&group, "root:x:0:\nmqtls:x:997:\nadm:x:4:alice,bob\n").unwrap();
        Db {
            _dir: dir,
            passwd,
            group,
        }
    }

    fn resolve(spec: &str) -> Result<(u32, u32), String> {
        let db = db();
        Owner::resolve_in(spec, &db.passwd, &db.group)
            .map(|o| (o.uid, o.gid))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn a_user_alone_brings_its_primary_group() {
        assert_eq!(resolve("mqtls"), Ok((998, 997)));
        assert_eq!(resolve("mqtls:"), Ok((998, 997)));
        assert_eq!(resolve("998"), Ok((998, 997)));
    }

    #[test]
    fn names_and_numbers_mix() {
        assert_eq!(resolve("mqtls:adm"), Ok((998, 4)));
        assert_eq!(resolve("mqtls:4"), Ok((998, 4)));
        assert_eq!(resolve("0:mqtls"), Ok((0, 997)));
        assert_eq!(resolve("12345:678"), Ok((12345, 678)), "numbers need no entry");
    }

    #[test]
    fn unknown_names_and_bad_ids_are_named() {
        let err = resolve("nosuch").unwrap_err();
        assert!(err.starts_with("--owner nosuch: no user `nosuch` in "), "{err}");
        let err = resolve("mqtls:nosuch").unwrap_err();
        assert!(err.contains("no group `nosuch` in "), "{err}");
        let err = resolve("12345").unwrap_err();
        assert!(
            err.contains("uid 12345 is not in ") && err.contains("give one: 12345:GID"),
            "{err}"
        );
        for spec in ["", ":mqtls"] {
            assert!(resolve(spec).unwrap_err().contains("a user is required"), "{spec:?}");
        }
        assert!(resolve("4294967295:0").unwrap_err().contains("not a valid id"));
        assert!(resolve("99999999999").unwrap_err().contains("not a valid id"));
        assert!(
            resolve("nisuser").unwrap_err().contains("no user"),
            "NIS lines are not users"
        );
        assert!(
            resolve("broken").unwrap_err().contains("no user"),
            "a record without a uid"
        );
    }

    #[test]
    fn an_unreadable_database_is_named() {
        let err = Owner::resolve_in(
            "mqtls",
            Path::new("/nonexistent/passwd"),
            Path::new("/nonexistent/group"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("cannot read /nonexistent/passwd"), "{err}");
    }

    #[test]
    fn the_own_user_is_always_allowed() {
        let me = Owner {
            uid: rustix::process::geteuid().as_raw(),
            gid: rustix::process::getegid().as_raw(),
            spec: "me".into(),
        };
        me.check_allowed().unwrap();
    }
}
