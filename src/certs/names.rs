//! What a device, a CA or a client id may be called. A device's name becomes both a directory and its
//! certificate's Common Name; a CA's name only a Common Name; a client id is what the device sends in
//! MQTT and goes into `device.toml`.

use rcgen::{DistinguishedName, DnType};

use super::CertsError;

/// X.509's upper bound for a Common Name (RFC 5280, ub-common-name), which a device name becomes.
const MAX_NAME_CHARS: usize = 64;

/// Checks that `name` can be a device directory name and a certificate's Common Name.
pub(super) fn check_name(name: &str) -> Result<(), CertsError> {
    let bad = |reason: &str| {
        Err(CertsError::BadName {
            name: name.to_string(),
            reason: reason.to_string(),
        })
    };
    if name.is_empty() {
        return bad("a name is required");
    }
    if name == "." || name == ".." {
        return bad("`.` and `..` are not directory names");
    }
    if name.contains('/') || name.contains('\\') {
        return bad("must not contain `/` or `\\` (it names one directory)");
    }
    if name.starts_with('.') {
        return bad("must not start with `.` (the device directory skips hidden entries)");
    }
    if let Some(reason) = common_name_problem(name) {
        return bad(&reason);
    }
    if name.trim() != name {
        return bad("must not start or end with white space");
    }
    Ok(())
}

/// What keeps `name` from being a certificate's Common Name: a control character, or more characters
/// than X.509 allows.
fn common_name_problem(name: &str) -> Option<String> {
    if name.chars().any(char::is_control) {
        return Some("must not contain control characters".into());
    }
    if name.chars().count() > MAX_NAME_CHARS {
        return Some(format!(
            "longer than {MAX_NAME_CHARS} characters (the X.509 limit for a Common Name)"
        ));
    }
    None
}

/// Checks that `id` can be sent as an MQTT client id and written to `device.toml`.
pub(super) fn check_client_id(id: &str) -> Result<(), CertsError> {
    let bad = |reason: &str| {
        Err(CertsError::BadClientId {
            id: id.to_string(),
            reason: reason.to_string(),
        })
    };
    if id.is_empty() {
        return bad(
            "must not be empty (a device with an empty client id needs `source` or `listen` rules in device.toml)",
        );
    }
    if id.len() > usize::from(u16::MAX) {
        return bad("longer than 65535 bytes (the MQTT limit)");
    }
    if id.chars().any(char::is_control) {
        return bad("must not contain control characters");
    }
    Ok(())
}

/// Checks that `name` can be a CA certificate's Common Name.
pub(super) fn check_ca_name(name: &str) -> Result<(), CertsError> {
    let bad = |reason: &str| {
        Err(CertsError::BadName {
            name: name.to_string(),
            reason: reason.to_string(),
        })
    };
    if name.trim().is_empty() {
        return bad("a CA name is required");
    }
    match common_name_problem(name) {
        Some(reason) => bad(&reason),
        None => Ok(()),
    }
}

/// The distinguished name `CN=<name>`.
pub(super) fn common_name(name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_cannot_be_directories_are_refused() {
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "a\\b",
            "a\nb",
            " pad",
            "pad ",
            &"x".repeat(65),
        ] {
            assert!(
                matches!(check_name(bad), Err(CertsError::BadName { .. })),
                "{bad:?} was accepted"
            );
        }
        for good in ["boiler-7", "Zähler 3", "a.b", &"x".repeat(64)] {
            check_name(good).unwrap_or_else(|e| panic!("{good:?}: {e}"));
        }
    }
}
