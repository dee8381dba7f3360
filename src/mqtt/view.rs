//! Every field of a CONNECT, borrowed from the bytes it was read from: what a rewrite needs to build the
//! packet anew with one field changed and every other one as the device sent it.
//!
//! The parser that fills it is the reader's own (`ConnectView::parse`, in the parent module), so a packet
//! the proxy accepts and a packet a rewrite can take apart are the same packets. MQTT 5 properties are
//! kept as the bytes they were sent as, in their order: nothing in them is rewritten, and a broker judges
//! them as it would without mqtls.

use std::fmt;

use super::ProtocolVersion;

/// A CONNECT packet's fields. The protocol name and level follow from [`ConnectView::version`]
/// (`MQIsdp`/3, `MQTT`/4, `MQTT`/5); the connect flags from the fields that are present.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnectView<'a> {
    /// The protocol version.
    pub version: ProtocolVersion,
    /// Clean session (3.1.x) or clean start (5.0).
    pub clean_start: bool,
    /// Keep-alive in seconds.
    pub keep_alive: u16,
    /// MQTT 5 CONNECT properties as sent, without their length; empty before 5.0.
    pub properties: &'a [u8],
    /// The client identifier.
    pub client_id: &'a str,
    /// The will message, if the device set one.
    pub will: Option<Will<'a>>,
    /// The user name, if sent.
    pub username: Option<&'a str>,
    /// The password, if sent (binary data in MQTT).
    pub password: Option<&'a [u8]>,
}

/// A will message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will<'a> {
    /// Will QoS: 0, 1 or 2.
    pub qos: u8,
    /// Will retain.
    pub retain: bool,
    /// MQTT 5 will properties as sent, without their length; empty before 5.0.
    pub properties: &'a [u8],
    /// Will topic.
    pub topic: &'a str,
    /// Will payload.
    pub payload: &'a [u8],
}

/// Everything but the password, which shows only whether there is one and its length.
impl fmt::Debug for ConnectView<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectView")
            .field("version", &self.version)
            .field("clean_start", &self.clean_start)
            .field("keep_alive", &self.keep_alive)
            .field("properties", &self.properties)
            .field("client_id", &self.client_id)
            .field("will", &self.will)
            .field("username", &self.username)
            .field(
                "password",
                &self.password.map(|p| format!("<{} bytes, not shown>", p.len())),
            )
            .finish()
    }
}

impl ConnectView<'_> {
    /// The connect flags byte these fields call for (the reserved bit clear).
    pub fn flags(&self) -> u8 {
        let mut f = 0;
        if self.clean_start {
            f |= 0x02;
        }
        if let Some(w) = &self.will {
            f |= 0x04 | (w.qos << 3);
            if w.retain {
                f |= 0x20;
            }
        }
        if self.password.is_some() {
            f |= 0x40;
        }
        if self.username.is_some() {
            f |= 0x80;
        }
        f
    }

    /// The protocol name and level of `version`.
    pub(super) fn protocol(&self) -> (&'static [u8], u8) {
        match self.version {
            ProtocolVersion::V31 => (b"MQIsdp", 3),
            ProtocolVersion::V311 => (b"MQTT", 4),
            ProtocolVersion::V5 => (b"MQTT", 5),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_never_shows_in_debug() {
        let view = ConnectView {
            version: ProtocolVersion::V311,
            clean_start: true,
            keep_alive: 60,
            properties: &[],
            client_id: "dev",
            will: None,
            username: Some("alice"),
            password: Some(b"hunter2"),
        };
        let text = format!("{view:?}");
        assert!(!text.contains("hunter2") && !text.contains("104, 117"), "{text}");
        assert!(text.contains("<7 bytes, not shown>"), "{text}");
    }
}
