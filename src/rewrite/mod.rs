//! Per-device CONNECT rewriting: the client id, user name and password a device's broker session is opened
//! with, when its entry asks for them to change (`connect.client_id`, `connect.username`,
//! `connect.password`, `connect.password_file`).
//!
//! Legacy firmware hard-codes its client id (a batch of sensors all connecting as `ESP8266Client`, or with an
//! empty one) and often a user name and password that the certificate has replaced. Forwarded unchanged, the
//! shared id makes the broker close one device's session for every other's connection, and the old password
//! travels to the broker and into its logs. A rewrite changes just those fields of the CONNECT and nothing
//! else: every other field (flags, keep-alive, will, MQTT 5 properties in their order) is encoded again as
//! the device sent it, and whatever the device sent after its CONNECT follows byte for byte. Without a
//! rewrite configured nothing here runs and the CONNECT goes out as it came.
//!
//! [`rewrite`] is a pure function of the bytes read, the device's rules and the connection's context, so
//! that it is tested (and fuzzed) on its own; the connection calls it once the device is known, before the
//! broker is reached. Which client ids a device may present, and that no other entry presents them, is
//! `crate::device`'s concern.

pub(crate) mod spec;
pub mod template;

use std::fmt;

use crate::mqtt::{Connect, ConnectError, ConnectView, EncodeError, ProtocolVersion};

pub use spec::RewriteSpec;
pub use template::{Context, IdPattern, Template, TemplateError, Values};

/// What becomes of one field of the CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change<T> {
    /// As the device sent it.
    Keep,
    /// Left out.
    Drop,
    /// This value.
    Set(T),
}

/// A password from a file, held for connections and never shown.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Box<[u8]>);

impl Secret {
    /// A secret holding `bytes`.
    pub fn new(bytes: Vec<u8>) -> Secret {
        Secret(bytes.into_boxed_slice())
    }

    /// The bytes, for the CONNECT.
    fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<not shown>)")
    }
}

/// One device's rewrite rules, ready for its connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewrite {
    /// The client id the broker sees; `None`: the device's own.
    pub client_id: Option<Template>,
    /// The user name.
    pub username: Change<Template>,
    /// The password.
    pub password: Change<Secret>,
}

impl Rewrite {
    /// Whether these rules would leave every CONNECT as it is.
    pub fn is_noop(&self) -> bool {
        self.client_id.as_ref().is_none_or(Template::is_client_id)
            && self.username == Change::Keep
            && self.password == Change::Keep
    }
}

/// The bytes to forward once a rewrite has been applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewritten {
    /// The CONNECT (rewritten, or as sent when the rules changed nothing in it), then every byte the device
    /// sent after it.
    pub bytes: Vec<u8>,
    /// The client id the broker sees, when it is not the one the device sent.
    pub client_id: Option<String>,
}

/// Why a device's CONNECT could not be rewritten; the device is refused (`rewrite_failed`).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RewriteError {
    /// The bytes are not the CONNECT the reader parsed (a caller's mistake; never from a device).
    #[error("the bytes given are not the CONNECT that was read: {0}")]
    NotTheConnect(ConnectError),
    /// `connect.client_id` expanded to a client id that is not valid.
    #[error("connect.client_id gives the client id {id:?}, which {reason}")]
    ClientId {
        /// The expanded client id.
        id: String,
        /// What is wrong with it.
        reason: InvalidClientId,
    },
    /// `connect.username` expanded to a user name that MQTT cannot carry.
    #[error("connect.username gives a user name that {0}")]
    Username(InvalidUsername),
    /// A password is to be sent and there is no user name, which MQTT 3.1.x does not allow.
    #[error("connect.password_file sets a password, but MQTT {0} allows no password without a user name and there is none (set connect.username)")]
    PasswordNeedsUsername(ProtocolVersion),
    /// The rewritten packet cannot be encoded.
    #[error("the rewritten CONNECT cannot be encoded: {0}")]
    Encode(EncodeError),
}

/// Rewrites the CONNECT at the start of `first_bytes` (the packet `connect` was parsed from, then whatever
/// the device sent after it in the same reads) by `rules`, for the connection `ctx` describes.
///
/// The packet is taken apart into every one of its fields, the rewritten ones are replaced, and it is
/// encoded again; the bytes after it follow unchanged. When the rules change nothing in this particular
/// packet (e.g. they drop a password the device did not send) `first_bytes` comes back as it was.
///
/// In MQTT 3.1 and 3.1.1 a password cannot go without a user name: when `rules` drop the user name, a
/// password the device sent is dropped with it; a password set from a file without any user name is an
/// error.
pub fn rewrite(
    first_bytes: Vec<u8>,
    connect: &Connect,
    rules: &Rewrite,
    ctx: &Context<'_>,
) -> Result<Rewritten, RewriteError> {
    let packet = first_bytes.get(..connect.packet_len).unwrap_or(&first_bytes);
    let (view, packet_len) = ConnectView::parse(packet, packet.len()).map_err(RewriteError::NotTheConnect)?;
    if packet_len != connect.packet_len {
        return Err(RewriteError::NotTheConnect(ConnectError::Malformed(
            "the packet length differs",
        )));
    }
    let client_id = match &rules.client_id {
        Some(t) if !t.is_client_id() => {
            let id = t.expand(ctx, view.client_id);
            check_client_id(&id, Some(view.version))
                .map_err(|reason| RewriteError::ClientId { id: id.clone(), reason })?;
            Some(id)
        }
        _ => None,
    };
    let username = match &rules.username {
        Change::Set(t) => {
            let name = t.expand(ctx, view.client_id);
            check_username(&name).map_err(RewriteError::Username)?;
            Some(name)
        }
        _ => None,
    };
    let mut out = view.clone();
    if let Some(id) = &client_id {
        out.client_id = id;
    }
    match &rules.username {
        Change::Keep => {}
        Change::Drop => out.username = None,
        Change::Set(_) => out.username = username.as_deref(),
    }
    match &rules.password {
        Change::Keep => {}
        Change::Drop => out.password = None,
        Change::Set(secret) => out.password = Some(secret.expose()),
    }
    if out.version != ProtocolVersion::V5 && out.username.is_none() && out.password.is_some() {
        match rules.password {
            Change::Set(_) => return Err(RewriteError::PasswordNeedsUsername(out.version)),
            _ => out.password = None,
        }
    }
    let encoded = match out == view {
        true => None,
        false => {
            let mut bytes = Vec::with_capacity(first_bytes.len() + 64);
            out.encode(&mut bytes).map_err(RewriteError::Encode)?;
            bytes.extend_from_slice(&first_bytes[packet_len..]);
            Some(bytes)
        }
    };
    let presented = client_id.filter(|id| id.as_str() != view.client_id);
    Ok(Rewritten {
        bytes: encoded.unwrap_or(first_bytes),
        client_id: presented,
    })
}

/// Why a client id is not one to present to a broker.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidClientId {
    /// Empty: the broker would assign one of its own (or refuse it), which is what the rewrite is for.
    #[error("is empty")]
    Empty,
    /// Longer than an MQTT string.
    #[error("is {0} bytes long, more than MQTT's 65535")]
    TooLong(usize),
    /// Longer than MQTT 3.1 allows.
    #[error("is {0} characters long, more than the 23 MQTT 3.1 allows")]
    TooLongFor31(usize),
    /// Holds a character MQTT says a client id should not hold.
    #[error("holds the character {0:?} (control characters and non-characters are not allowed)")]
    Character(char),
}

/// Whether `id` may be presented to a broker: 1 to 65535 bytes of UTF-8 without control characters
/// (U+0000–U+001F, U+007F–U+009F) or non-characters (MQTT 3.1.1 §1.5.3, 5.0 §1.5.4), and for MQTT 3.1
/// (`version` given as 3.1) at most 23 characters.
pub fn check_client_id(id: &str, version: Option<ProtocolVersion>) -> Result<(), InvalidClientId> {
    if id.is_empty() {
        return Err(InvalidClientId::Empty);
    }
    if id.len() > usize::from(u16::MAX) {
        return Err(InvalidClientId::TooLong(id.len()));
    }
    if let Some(c) = id.chars().find(|c| !allowed_char(*c)) {
        return Err(InvalidClientId::Character(c));
    }
    let chars = id.chars().count();
    if version == Some(ProtocolVersion::V31) && chars > 23 {
        return Err(InvalidClientId::TooLongFor31(chars));
    }
    Ok(())
}

/// Why a user name cannot be sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidUsername {
    /// Longer than an MQTT string.
    #[error("is {0} bytes long, more than MQTT's 65535")]
    TooLong(usize),
    /// Holds a character MQTT does not allow in a string.
    #[error("holds the character {0:?} (control characters and non-characters are not allowed)")]
    Character(char),
}

/// Whether `name` can be sent as a user name (an empty one can).
pub fn check_username(name: &str) -> Result<(), InvalidUsername> {
    if name.len() > usize::from(u16::MAX) {
        return Err(InvalidUsername::TooLong(name.len()));
    }
    match name.chars().find(|c| !allowed_char(*c)) {
        Some(c) => Err(InvalidUsername::Character(c)),
        None => Ok(()),
    }
}

/// A character MQTT lets a string hold without a receiver being free to close the connection for it.
pub(crate) fn allowed_char(c: char) -> bool {
    let control = matches!(c, '\u{0}'..='\u{1F}' | '\u{7F}'..='\u{9F}');
    let non_character = matches!(c, '\u{FDD0}'..='\u{FDEF}') || (u32::from(c) & 0xFFFE) == 0xFFFE;
    !control && !non_character
}

#[cfg(test)]
mod tests;
