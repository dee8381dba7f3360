//! The `connect` keys as the configuration gives them: read by serde, checked into a [`RewriteSpec`] (each
//! problem named by its key), merged with the defaults of `[device_dir]`, and turned into a device's
//! [`Rewrite`] when the configuration loads (which is when a password file is read).
//!
//! A password is never written in the configuration itself: `connect.password` takes only `false` (drop
//! the device's) or `true` (keep it), and `connect.password_file` names a file that only mqtls may read (or
//! a systemd credential), like a private key.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{allowed_char, Change, Rewrite, Secret, Template};

/// The `connect` table of a `[[device]]`, a `device.toml`, `[device_dir]` or `[fallback]`.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConnect {
    client_id: Option<String>,
    username: Option<toml::Value>,
    password: Option<toml::Value>,
    password_file: Option<String>,
}

/// The `connect` keys of one table, checked. A key that is not set is `None` (for a device: its
/// `[device_dir]` default, else the device's own value).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RewriteSpec {
    /// `connect.client_id`.
    pub client_id: Option<Template>,
    /// `connect.username`: a template, `false` (drop) or `true` (keep).
    pub username: Option<Change<Template>>,
    /// `connect.password` (`false`: drop, `true`: keep) or `connect.password_file` (set).
    pub password: Option<Change<PathBuf>>,
}

/// A problem with one `connect` key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeyError {
    /// The key within the `connect` table, e.g. `client_id`.
    pub key: &'static str,
    pub reason: String,
}

impl RawConnect {
    /// Checks every key; a relative `password_file` is resolved against `base`.
    pub(crate) fn check(self, base: &Path) -> (RewriteSpec, Vec<KeyError>) {
        let mut errors = Vec::new();
        let mut error = |key, reason: String| errors.push(KeyError { key, reason });
        let client_id = self.client_id.and_then(|t| match template(&t) {
            Ok(t) => Some(t),
            Err(reason) => {
                error("client_id", reason);
                None
            }
        });
        let username = match self.username {
            None => None,
            Some(toml::Value::Boolean(false)) => Some(Change::Drop),
            Some(toml::Value::Boolean(true)) => Some(Change::Keep),
            Some(toml::Value::String(t)) => match template(&t) {
                Ok(t) => Some(Change::Set(t)),
                Err(reason) => {
                    error("username", reason);
                    None
                }
            },
            Some(other) => {
                error(
                    "username",
                    format!(
                        "{} is not a template or a boolean: write a template, false to drop the device's user name or true to keep it",
                        other.type_str()
                    ),
                );
                None
            }
        };
        let password = match (self.password, self.password_file) {
            (Some(_), Some(_)) => {
                error(
                    "password_file",
                    "give connect.password (true or false) or connect.password_file, not both".into(),
                );
                None
            }
            (None, None) => None,
            (None, Some(file)) if file.is_empty() => {
                error("password_file", "is empty: name a file".into());
                None
            }
            (None, Some(file)) => Some(Change::Set(resolve(base, &file))),
            (Some(toml::Value::Boolean(false)), None) => Some(Change::Drop),
            (Some(toml::Value::Boolean(true)), None) => Some(Change::Keep),
            (Some(toml::Value::String(_)), None) => {
                error(
                    "password",
                    "a password is never written in the configuration: put it in a file only mqtls can read (or a \
                     systemd credential) and name that with connect.password_file; connect.password takes false \
                     (drop the device's password) or true (keep it)"
                        .into(),
                );
                None
            }
            (Some(other), None) => {
                error(
                    "password",
                    format!(
                        "{} is not a boolean: false drops the device's password, true keeps it (connect.password_file sets one)",
                        other.type_str()
                    ),
                );
                None
            }
        };
        let spec = RewriteSpec {
            client_id,
            username,
            password,
        };
        (spec, errors)
    }
}

impl RewriteSpec {
    /// These keys, with each one not set taken from `default`.
    pub fn or(self, default: &RewriteSpec) -> RewriteSpec {
        RewriteSpec {
            client_id: self.client_id.or_else(|| default.client_id.clone()),
            username: self.username.or_else(|| default.username.clone()),
            password: self.password.or_else(|| default.password.clone()),
        }
    }

    /// The password file, if one is named.
    pub fn password_file(&self) -> Option<&Path> {
        match &self.password {
            Some(Change::Set(p)) => Some(p),
            _ => None,
        }
    }

    /// The device's rewrite, its password file read; `None` when nothing in a CONNECT would change.
    /// `allow_readable` accepts a password file that group or others can read (as
    /// `upstream.allow_readable_keys` does keys).
    pub fn load(&self, allow_readable: bool) -> Result<Option<Rewrite>, PasswordFileError> {
        let password = match &self.password {
            None | Some(Change::Keep) => Change::Keep,
            Some(Change::Drop) => Change::Drop,
            Some(Change::Set(path)) => Change::Set(read_password(path, allow_readable)?),
        };
        let rewrite = Rewrite {
            client_id: self.client_id.clone().filter(|t| !t.is_client_id()),
            username: self.username.clone().unwrap_or(Change::Keep),
            password,
        };
        Ok((!rewrite.is_noop()).then_some(rewrite))
    }
}

/// A password file that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {reason}", path.display())]
pub struct PasswordFileError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong.
    pub reason: String,
}

/// Reads a password file: its bytes, less one final line break (`echo secret > file` writes one). A file
/// that group or others can read is refused unless `allow_readable`, or it is a systemd credential.
fn read_password(path: &Path, allow_readable: bool) -> Result<Secret, PasswordFileError> {
    let fail = |reason: String| PasswordFileError {
        path: path.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| fail(format!("cannot read the password file: {e}")))?;
    let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777;
    if crate::tls::key_mode_is_open(mode) && !allow_readable && !crate::systemd::is_credential(path) {
        return Err(fail(format!(
            "the password file is {} (mode {mode:04o}); run `chmod 600 {}` or set upstream.allow_readable_keys = true",
            crate::tls::key_mode_exposure(mode),
            path.display()
        )));
    }
    let mut bytes = std::fs::read(path).map_err(|e| fail(format!("cannot read the password file: {e}")))?;
    if bytes.ends_with(b"\r\n") {
        bytes.truncate(bytes.len() - 2);
    } else if bytes.ends_with(b"\n") {
        bytes.truncate(bytes.len() - 1);
    }
    if bytes.len() > usize::from(u16::MAX) {
        return Err(fail(format!(
            "the password is {} bytes long, more than MQTT's 65535",
            bytes.len()
        )));
    }
    Ok(Secret::new(bytes))
}

/// A template whose fixed text MQTT can carry.
fn template(text: &str) -> Result<Template, String> {
    let t = Template::parse(text).map_err(|e| format!("`{text}`: {e}"))?;
    let bad = t.literals().flat_map(str::chars).find(|c| !allowed_char(*c));
    match bad {
        Some(c) => Err(format!(
            "`{}` holds the character {c:?}, which MQTT does not allow here",
            text.escape_debug()
        )),
        None => Ok(t),
    }
}

fn resolve(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    match p.is_absolute() {
        true => p.to_path_buf(),
        false => base.join(p),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> (RewriteSpec, Vec<KeyError>) {
        let raw: RawConnect = toml::from_str(text).unwrap();
        raw.check(Path::new("/etc/mqtls"))
    }

    #[test]
    fn every_key_is_read() {
        let (spec, errors) =
            check("client_id = \"esp-{name}\"\nusername = false\npassword_file = \"secrets/boiler\"\n");
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(spec.client_id.unwrap().to_string(), "esp-{name}");
        assert_eq!(spec.username, Some(Change::Drop));
        assert_eq!(
            spec.password,
            Some(Change::Set(PathBuf::from("/etc/mqtls/secrets/boiler")))
        );
        let (spec, errors) = check("username = \"hub/{cn}\"\npassword = false\n");
        assert!(errors.is_empty());
        assert!(matches!(spec.username, Some(Change::Set(_))));
        assert_eq!(spec.password, Some(Change::Drop));
        let (spec, _) = check("username = true\npassword = true\n");
        assert_eq!((spec.username, spec.password), (Some(Change::Keep), Some(Change::Keep)));
    }

    #[test]
    fn each_mistake_names_its_key() {
        let keys = |text: &str| check(text).1.into_iter().map(|e| e.key).collect::<Vec<_>>();
        assert_eq!(keys("client_id = \"{host}\""), ["client_id"]);
        assert_eq!(keys("username = 3"), ["username"]);
        assert_eq!(keys("username = \"a\\u0001\""), ["username"]);
        assert_eq!(keys("password = \"hunter2\""), ["password"]);
        assert_eq!(keys("password = 1"), ["password"]);
        assert_eq!(keys("password = false\npassword_file = \"p\""), ["password_file"]);
        assert_eq!(keys("password_file = \"\""), ["password_file"]);
        let (_, errors) = check("password = \"hunter2\"");
        assert!(!errors[0].reason.contains("hunter2"), "the password is not repeated");
        assert!(
            toml::from_str::<RawConnect>("clientid = \"x\"").is_err(),
            "unknown keys"
        );
    }

    #[test]
    fn a_device_key_wins_over_its_default() {
        let (default, _) = check("client_id = \"{name}\"\nusername = false\npassword = false\n");
        let (own, _) = check("username = true\n");
        let merged = own.or(&default);
        assert_eq!(merged.client_id.unwrap().to_string(), "{name}");
        assert_eq!(merged.username, Some(Change::Keep));
        assert_eq!(merged.password, Some(Change::Drop));
    }

    #[test]
    fn rules_that_change_nothing_are_no_rewrite() {
        let (spec, _) = check("client_id = \"{client_id}\"\nusername = true\n");
        assert_eq!(spec.load(false), Ok(None));
        assert_eq!(RewriteSpec::default().load(false), Ok(None));
    }

    #[test]
    fn a_password_file_is_read_once_and_only_if_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("password");
        std::fs::write(&path, b"s3cret\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let spec = RewriteSpec {
            password: Some(Change::Set(path.clone())),
            ..RewriteSpec::default()
        };
        let rewrite = spec.load(false).unwrap().unwrap();
        assert_eq!(rewrite.password, Change::Set(Secret::new(b"s3cret".to_vec())));
        assert!(!format!("{rewrite:?}").contains("s3cret"));

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = spec.load(false).unwrap_err();
        assert!(err.reason.contains("readable by group or others"), "{err}");
        assert!(spec.load(true).is_ok(), "allowed like a readable key");

        std::fs::remove_file(&path).unwrap();
        let err = spec.load(false).unwrap_err();
        assert!(err.to_string().contains("cannot read the password file"), "{err}");
    }
}
