//! `mqtls certs`: device identities on disk, made the way the rest of mqtls reads them.
//!
//! Copied openssl recipes get the details wrong: a certificate without the clientAuth purpose, a key left
//! readable by everyone, files in a layout the daemon does not look at. This module writes them one way:
//!
//! - [`init_ca`]: a private CA for a lab or a site (`ca.pem`, and `ca.key` with mode 0600);
//! - [`issue`](fn@issue): a device's key and certificate signed by that CA, in the device-directory
//!   layout that [`crate::config`] loads (`<out>/<name>/{key.pem,cert.pem,device.toml}`);
//! - [`csr`]: a key and a certificate signing request for a CA that someone else runs; until the signed
//!   `cert.pem` is saved next to the key, the directory is a [`PendingDevice`](crate::config::PendingDevice)
//!   that the loader skips.
//!
//! What `mqtls certs list` prints about the identities once they exist is [`crate::inventory`]'s.
//!
//! Files are written the way a daemon that reloads on file changes needs them: every file goes to a
//! temporary name in its own directory and is renamed into place, keys are created with mode 0600 (never
//! written first and chmod'ed later), and the key lands before the certificate, so a reload triggered by
//! `cert.pem` finds the key that matches it. With an [`Owner`] (`--owner`), each file is given to that
//! user while it still has its temporary name, so the daemon's user never meets a key it cannot read.
//!
//! Inside: `keys` (key types, key generation, reading a signing key, random serials), `names` (what a
//! device, CA or client id may be), `files` (the atomic writes), `ca` (`init-ca`, and loading the CA
//! for signing), `issue` (`issue` and `csr`), `owner` (`--owner`).

use std::fmt;
use std::path::{Path, PathBuf};

use crate::tls::TlsFileError;

mod ca;
mod files;
mod issue;
mod keys;
mod names;
mod owner;

pub use ca::{init_ca, CaCreated, CaRequest};
pub use issue::{csr, issue, CsrCreated, CsrRequest, IssueRequest, Issued};
pub use keys::KeyType;
pub use owner::Owner;

/// Default validity of a site CA: ten years, longer than any device certificate it signs.
pub const DEFAULT_CA_DAYS: u32 = 3650;
/// Default validity of a device certificate.
pub const DEFAULT_DEVICE_DAYS: u32 = 365;
/// Default Common Name of a CA made by [`init_ca`].
pub const DEFAULT_CA_NAME: &str = "mqtls device CA";
/// The longest validity accepted, in days (100 years).
const MAX_DAYS: u32 = 36_500;

/// Certificates start this long before "now", so a broker whose clock runs a little behind still
/// accepts a certificate issued a moment ago.
const BACKDATE: time::Duration = time::Duration::hours(1);

/// Why a `certs` command could not do its work.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    /// The device or CA name cannot be used.
    #[error("invalid name {name:?}: {reason}")]
    BadName {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The client id cannot be used.
    #[error("invalid client id {id:?}: {reason}")]
    BadClientId {
        /// The client id as given.
        id: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The validity is out of range.
    #[error("--days {days}: must be between 1 and {MAX_DAYS}")]
    BadDays {
        /// The number of days given.
        days: u32,
    },
    /// The command would replace files that already exist.
    #[error("{}: {what} already exists; {hint}", path.display())]
    Exists {
        /// The file or directory in the way.
        path: PathBuf,
        /// What it holds.
        what: &'static str,
        /// What the operator can do.
        hint: &'static str,
    },
    /// A file could not be read, written or used.
    #[error("{}: {reason}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Key generation or signing failed.
    #[error("{0}")]
    Crypto(String),
    /// The owner given for the written files cannot be used.
    #[error("--owner {owner}: {reason}")]
    BadOwner {
        /// The owner as given.
        owner: String,
        /// What is wrong with it.
        reason: String,
    },
}

fn file_error(path: &Path, reason: impl fmt::Display) -> CertsError {
    CertsError::File {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn tls_file_error(e: TlsFileError) -> CertsError {
    CertsError::File {
        path: e.path,
        reason: e.reason,
    }
}

/// Turns an rcgen failure into a [`CertsError::Crypto`] that says what was being done.
fn crypto(what: &str) -> impl Fn(rcgen::Error) -> CertsError + '_ {
    move |e| CertsError::Crypto(format!("{what}: {e}"))
}

/// Checks that a validity of `days` is between 1 and [`MAX_DAYS`].
fn check_days(days: u32) -> Result<(), CertsError> {
    if (1..=MAX_DAYS).contains(&days) {
        Ok(())
    } else {
        Err(CertsError::BadDays { days })
    }
}
