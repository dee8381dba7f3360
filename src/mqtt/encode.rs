//! Encoding a CONNECT from its fields: the other half of a rewrite.
//!
//! The encoder refuses what the reader would refuse (a string with U+0000, a field longer than MQTT's
//! two-byte lengths, a password without a user name before 5.0, properties before 5.0), so that every
//! packet it writes parses back into the fields it was given. The remaining length is recomputed and
//! written in its shortest form.

use super::{ConnectView, ProtocolVersion, CONNECT_BYTE, MAX_REMAINING_LEN};

/// Why a CONNECT cannot be encoded from these fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A string or binary field is longer than its two-byte length can say.
    #[error("the {0} is longer than 65535 bytes")]
    TooLong(&'static str),
    /// A string holds U+0000, which MQTT does not allow in a string.
    #[error("the {0} holds the character U+0000")]
    Nul(&'static str),
    /// MQTT 3.1 and 3.1.1 have no password without a user name.
    #[error("MQTT {0} allows no password without a user name")]
    PasswordWithoutUsername(ProtocolVersion),
    /// Properties exist only in MQTT 5.
    #[error("MQTT {0} has no properties")]
    PropertiesBefore5(ProtocolVersion),
    /// The will QoS is not 0, 1 or 2.
    #[error("will QoS {0} is not 0, 1 or 2")]
    WillQos(u8),
    /// The whole packet is longer than the remaining length can say.
    #[error("the packet is longer than MQTT allows")]
    PacketTooLarge,
}

impl ConnectView<'_> {
    /// Appends the CONNECT these fields make to `out`. On error nothing is appended.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let remaining = self.remaining_len()?;
        out.reserve(1 + 4 + remaining);
        out.push(CONNECT_BYTE);
        put_varint(out, remaining);
        let (name, level) = self.protocol();
        put_bin(out, name);
        out.push(level);
        out.push(self.flags());
        out.extend_from_slice(&self.keep_alive.to_be_bytes());
        let v5 = self.version == ProtocolVersion::V5;
        if v5 {
            put_varint(out, self.properties.len());
            out.extend_from_slice(self.properties);
        }
        put_bin(out, self.client_id.as_bytes());
        if let Some(w) = &self.will {
            if v5 {
                put_varint(out, w.properties.len());
                out.extend_from_slice(w.properties);
            }
            put_bin(out, w.topic.as_bytes());
            put_bin(out, w.payload);
        }
        if let Some(u) = self.username {
            put_bin(out, u.as_bytes());
        }
        if let Some(p) = self.password {
            put_bin(out, p);
        }
        Ok(())
    }

    /// The remaining length of the packet these fields make, once they are checked.
    fn remaining_len(&self) -> Result<usize, EncodeError> {
        let v5 = self.version == ProtocolVersion::V5;
        if !v5 {
            let will_properties = self.will.as_ref().is_some_and(|w| !w.properties.is_empty());
            if !self.properties.is_empty() || will_properties {
                return Err(EncodeError::PropertiesBefore5(self.version));
            }
            if self.password.is_some() && self.username.is_none() {
                return Err(EncodeError::PasswordWithoutUsername(self.version));
            }
        }
        let (name, _) = self.protocol();
        // Name, level, flags, keep-alive.
        let mut len = 2 + name.len() + 1 + 1 + 2;
        if v5 {
            len += properties_len(self.properties)?;
        }
        len += string_len("client id", self.client_id)?;
        if let Some(w) = &self.will {
            if w.qos > 2 {
                return Err(EncodeError::WillQos(w.qos));
            }
            if v5 {
                len += properties_len(w.properties)?;
            }
            len += string_len("will topic", w.topic)?;
            len += binary_len("will payload", w.payload)?;
        }
        if let Some(u) = self.username {
            len += string_len("user name", u)?;
        }
        if let Some(p) = self.password {
            len += binary_len("password", p)?;
        }
        if len > MAX_REMAINING_LEN {
            return Err(EncodeError::PacketTooLarge);
        }
        Ok(len)
    }
}

fn binary_len(field: &'static str, bytes: &[u8]) -> Result<usize, EncodeError> {
    match bytes.len() <= usize::from(u16::MAX) {
        true => Ok(2 + bytes.len()),
        false => Err(EncodeError::TooLong(field)),
    }
}

fn string_len(field: &'static str, s: &str) -> Result<usize, EncodeError> {
    if s.contains('\0') {
        return Err(EncodeError::Nul(field));
    }
    binary_len(field, s.as_bytes())
}

fn properties_len(properties: &[u8]) -> Result<usize, EncodeError> {
    if properties.len() > MAX_REMAINING_LEN {
        return Err(EncodeError::PacketTooLarge);
    }
    Ok(varint_len(properties.len()) + properties.len())
}

fn varint_len(n: usize) -> usize {
    match n {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// A variable byte integer, shortest form; `n` is at most [`MAX_REMAINING_LEN`] (checked by the caller).
fn put_varint(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return;
        }
    }
}

/// Two-byte length, then the bytes; the length is checked by the caller.
fn put_bin(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::arb::Fields;
    use crate::mqtt::{parse_connect, Will};
    use proptest::prelude::*;

    const MAX: usize = 1 << 20;

    fn plain(version: ProtocolVersion) -> ConnectView<'static> {
        ConnectView {
            version,
            clean_start: true,
            keep_alive: 60,
            properties: &[],
            client_id: "dev",
            will: None,
            username: None,
            password: None,
        }
    }

    fn encoded(v: &ConnectView<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        v.encode(&mut out).unwrap();
        out
    }

    #[test]
    fn a_plain_connect_is_the_bytes_the_spec_gives() {
        let v311 = [
            0x10, 15, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 3, b'd', b'e', b'v',
        ];
        assert_eq!(encoded(&plain(ProtocolVersion::V311)), v311);
        let v31 = encoded(&plain(ProtocolVersion::V31));
        assert_eq!(&v31[2..11], b"\x00\x06MQIsdp\x03");
        let v5 = encoded(&plain(ProtocolVersion::V5));
        assert_eq!(
            &v5[8..13],
            [5, 0x02, 0, 60, 0],
            "level, flags, keep-alive, no properties"
        );
    }

    #[test]
    fn the_remaining_length_grows_to_as_many_bytes_as_it_needs() {
        let payload = vec![0x41; 20_000];
        let mut v = plain(ProtocolVersion::V311);
        v.will = Some(Will {
            qos: 1,
            retain: false,
            properties: &[],
            topic: "t",
            payload: &payload,
        });
        let bytes = encoded(&v);
        assert_eq!(&bytes[1..4], [0xB4, 0x9C, 0x01], "20,020 bytes in three length bytes");
        let (back, len) = ConnectView::parse(&bytes, MAX).unwrap();
        assert_eq!((back, len), (v, bytes.len()));
    }

    #[test]
    fn what_the_reader_refuses_is_not_written() {
        let mut v = plain(ProtocolVersion::V311);
        v.password = Some(b"p");
        assert_eq!(
            v.encode(&mut Vec::new()),
            Err(EncodeError::PasswordWithoutUsername(ProtocolVersion::V311))
        );
        let mut v = plain(ProtocolVersion::V31);
        v.properties = &[0x11, 0, 0, 0, 1];
        assert_eq!(
            v.encode(&mut Vec::new()),
            Err(EncodeError::PropertiesBefore5(ProtocolVersion::V31))
        );
        let mut v = plain(ProtocolVersion::V5);
        v.client_id = "a\0b";
        assert_eq!(v.encode(&mut Vec::new()), Err(EncodeError::Nul("client id")));
        let long = "x".repeat(65_536);
        let mut v = plain(ProtocolVersion::V5);
        v.username = Some(&long);
        let mut out = vec![7];
        assert_eq!(v.encode(&mut out), Err(EncodeError::TooLong("user name")));
        assert_eq!(out, [7], "nothing appended on error");
        let mut v = plain(ProtocolVersion::V5);
        v.will = Some(Will {
            qos: 3,
            retain: false,
            properties: &[],
            topic: "t",
            payload: &[],
        });
        assert_eq!(v.encode(&mut Vec::new()), Err(EncodeError::WillQos(3)));
        // 5.0 allows a password alone.
        let mut v = plain(ProtocolVersion::V5);
        v.password = Some(b"token");
        let bytes = encoded(&v);
        assert_eq!(ConnectView::parse(&bytes, MAX).unwrap().0, v);
    }

    fn arb_fields() -> impl Strategy<Value = Fields> {
        super::super::arb::arb_fields(proptest::collection::vec(any::<u8>(), 0..300))
    }

    proptest! {
        #[test]
        fn prop_every_encoded_connect_parses_back_to_its_fields(f in arb_fields()) {
            let v = f.view();
            let bytes = encoded(&v);
            let (back, len) = ConnectView::parse(&bytes, MAX).unwrap();
            prop_assert_eq!(len, bytes.len());
            prop_assert_eq!(&back, &v);
            // And the routing reader agrees.
            let c = parse_connect(&bytes, MAX).unwrap();
            prop_assert_eq!(c.client_id.as_str(), f.client_id.as_str());
            prop_assert_eq!(c.packet_len, bytes.len());
        }

        #[test]
        fn prop_a_parsed_connect_encodes_to_the_same_bytes_when_its_length_is_minimal(f in arb_fields()) {
            let bytes = encoded(&f.view());
            let (view, _) = ConnectView::parse(&bytes, MAX).unwrap();
            prop_assert_eq!(encoded(&view), bytes);
        }
    }
}
