//! Just enough MQTT to learn who a device is, and to rewrite its CONNECT when asked.
//!
//! mqtls reads only the device's first packet, the CONNECT, to find out which
//! device is talking (its client id) and so which TLS client identity to
//! present to the broker. Unless the device's entry asks for a rewrite, every
//! byte, the CONNECT included, is then forwarded to the broker exactly as the
//! device sent it, and this module only inspects bytes.
//!
//! Anyone on the device LAN can connect and send whatever they like, so the
//! reader is strict and bounded: it never buffers more than the caller's
//! limit, rejects an oversized packet as soon as its declared length is known,
//! never panics on any input, and copies nothing it does not need (the
//! [`Connect`] it returns holds no password and no will message).
//!
//! One parser serves both uses: it walks every field into a [`ConnectView`]
//! borrowed from the bytes read, of which [`parse_connect`] keeps what routing
//! needs. A rewrite (`crate::rewrite`) parses the packet into its view again,
//! changes a field or two and encodes it anew (`encode`), so the common path
//! pays nothing for it.
//!
//! The first packet the broker sends back, the CONNACK, is parsed too, since
//! an MQTT 5 broker may override the keep-alive the device asked for.

#[cfg(test)]
pub(crate) mod arb;
mod encode;
mod view;

pub use encode::EncodeError;
pub use view::{ConnectView, Will};

use std::fmt;
use std::io;

use tokio::io::{AsyncRead, AsyncReadExt};

/// Largest value the 4-byte remaining-length field can hold.
const MAX_REMAINING_LEN: usize = 268_435_455;

/// Upper bound on the first read, made before the packet length is known.
const FIRST_READ: usize = 512;

/// First byte of a CONNECT: packet type 1, flags 0.
const CONNECT_BYTE: u8 = 0x10;

/// First byte of a CONNACK: packet type 2, flags 0.
const CONNACK_BYTE: u8 = 0x20;

/// The MQTT protocol version a device speaks, from its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProtocolVersion {
    /// MQTT 3.1 (protocol name "MQIsdp", level 3).
    V31,
    /// MQTT 3.1.1 (protocol name "MQTT", level 4).
    V311,
    /// MQTT 5.0 (protocol name "MQTT", level 5).
    V5,
}

impl ProtocolVersion {
    /// The protocol level byte sent in the CONNECT: 3, 4 or 5.
    pub fn level(self) -> u8 {
        match self {
            Self::V31 => 3,
            Self::V311 => 4,
            Self::V5 => 5,
        }
    }
}

impl fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V31 => "3.1",
            Self::V311 => "3.1.1",
            Self::V5 => "5.0",
        })
    }
}

/// What mqtls learns from a device's CONNECT packet.
///
/// The password is deliberately not kept, and neither is the will message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// Protocol version the device speaks.
    pub version: ProtocolVersion,
    /// The client identifier; may be empty.
    pub client_id: String,
    /// Keep-alive the device asked for, in seconds; 0 means none.
    pub keep_alive: u16,
    /// Total size of the CONNECT packet in bytes, fixed header included.
    pub packet_len: usize,
    /// Whether the device sent a user name (its value is validated, never kept: it stays the broker's).
    pub has_username: bool,
    /// The clean session (3.1.x) or clean start (5.0) flag.
    pub clean_start: bool,
}

/// Why the bytes at the start of a buffer are not (yet) a usable CONNECT or CONNACK.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConnectError {
    /// More bytes are needed; not an error for a reader that can wait for them.
    #[error("incomplete packet, more bytes needed")]
    Incomplete,
    /// The first packet is not a CONNECT (its first byte is not 0x10).
    #[error("first packet is not a CONNECT (first byte {first_byte:#04x})")]
    NotConnect {
        /// The first byte received.
        first_byte: u8,
    },
    /// The broker's first packet is not a CONNACK (its first byte is not 0x20).
    #[error("first packet from the broker is not a CONNACK (first byte {first_byte:#04x})")]
    NotConnack {
        /// The first byte received.
        first_byte: u8,
    },
    /// The packet is larger than allowed.
    ///
    /// `len` is the declared total size, or a lower bound on it when the
    /// length field itself has only partly arrived.
    #[error("packet of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Declared total packet size in bytes (at least this many).
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// The packet breaks the MQTT encoding rules.
    #[error("malformed MQTT packet: {0}")]
    Malformed(&'static str),
    /// A string field is not valid UTF-8.
    #[error("invalid UTF-8 string in the {0}")]
    BadString(&'static str),
    /// A string field holds U+0000, which MQTT strings may not.
    #[error("the {0} holds the character U+0000, which MQTT does not allow in a string")]
    NulInString(&'static str),
    /// The protocol name and level are not MQIsdp/3, MQTT/4 or MQTT/5.
    #[error("unsupported protocol {name:?} level {level}")]
    UnsupportedProtocol {
        /// The protocol name sent, lossily decoded and cut to 16 characters.
        name: String,
        /// The protocol level sent.
        level: u8,
        /// For the names MQTT and MQIsdp, the version whose CONNACK the device should be answered with:
        /// 5.0 when the rest of the packet is laid out as 5.0's (properties after the keep-alive), else
        /// 3.1.1 (whose spec asks for "unacceptable protocol version", 0x01). `None` for another name: a
        /// client that does not speak MQTT at all.
        answer_as: Option<ProtocolVersion>,
    },
}

/// Why [`read_connect`] did not produce a CONNECT.
#[derive(Debug, thiserror::Error)]
pub enum ReadConnectError {
    /// The bytes received are not an acceptable CONNECT.
    #[error(transparent)]
    Parse(#[from] ConnectError),
    /// The peer closed the connection after this many bytes, before a complete CONNECT.
    #[error("connection closed after {0} bytes, before a complete CONNECT")]
    Closed(usize),
    /// Reading from the connection failed.
    #[error("reading the CONNECT failed: {0}")]
    Io(#[from] io::Error),
}

/// Parses one CONNECT packet from the start of `buf`.
///
/// Returns `Ok` only when the whole packet is in `buf`; bytes after it are
/// ignored (they belong to the next packet). Returns
/// [`ConnectError::Incomplete`] while more bytes are needed, and
/// [`ConnectError::TooLarge`] as soon as the declared size is known to exceed
/// `max_len`, before the body has arrived.
pub fn parse_connect(buf: &[u8], max_len: usize) -> Result<Connect, ConnectError> {
    let (view, packet_len) = ConnectView::parse(buf, max_len)?;
    Ok(Connect {
        version: view.version,
        client_id: view.client_id.to_owned(),
        keep_alive: view.keep_alive,
        packet_len,
        has_username: view.username.is_some(),
        clean_start: view.clean_start,
    })
}

impl<'a> ConnectView<'a> {
    /// Parses one CONNECT packet from the start of `buf` into every one of its fields, borrowed from
    /// `buf`, and its total size. The rules and errors are [`parse_connect`]'s, which calls this.
    pub fn parse(buf: &'a [u8], max_len: usize) -> Result<(ConnectView<'a>, usize), ConnectError> {
        if let Some(&first_byte) = buf.first() {
            if first_byte != CONNECT_BYTE {
                return Err(ConnectError::NotConnect { first_byte });
            }
        }
        let (header_len, remaining) = fixed_header(buf, max_len)?;
        let packet_len = header_len + remaining;
        let body = buf.get(header_len..packet_len).ok_or(ConnectError::Incomplete)?;
        let mut c = Cursor(body);

        let name = c.binary("truncated protocol name")?;
        let level = c.u8("truncated protocol level")?;
        let version = match (name, level) {
            (b"MQIsdp", 3) => ProtocolVersion::V31,
            (b"MQTT", 4) => ProtocolVersion::V311,
            (b"MQTT", 5) => ProtocolVersion::V5,
            _ => {
                let mqtt = name == b"MQTT" || name == b"MQIsdp";
                let laid_out_as_v5 = mqtt && connect_body(c, ProtocolVersion::V5).is_ok();
                let answer_as = mqtt.then_some(match laid_out_as_v5 {
                    true if connect_body(c, ProtocolVersion::V311).is_err() => ProtocolVersion::V5,
                    _ => ProtocolVersion::V311,
                });
                return Err(ConnectError::UnsupportedProtocol {
                    name: String::from_utf8_lossy(name).chars().take(16).collect(),
                    level,
                    answer_as,
                });
            }
        };
        Ok((connect_body(c, version)?, packet_len))
    }
}

/// Parses the rest of a CONNECT (`c` is just past the protocol level) as `version` lays it out.
fn connect_body(mut c: Cursor<'_>, version: ProtocolVersion) -> Result<ConnectView<'_>, ConnectError> {
    let flags = c.u8("truncated connect flags")?;
    if flags & 0x01 != 0 {
        return Err(ConnectError::Malformed("reserved connect flag is set"));
    }
    let clean_start = flags & 0x02 != 0;
    let has_will = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0x03;
    let will_retain = flags & 0x20 != 0;
    let has_password = flags & 0x40 != 0;
    let has_username = flags & 0x80 != 0;
    if will_qos == 3 {
        return Err(ConnectError::Malformed("will QoS is 3"));
    }
    if !has_will && (will_qos != 0 || will_retain) {
        return Err(ConnectError::Malformed("will QoS or retain set without the will flag"));
    }
    if has_password && !has_username && version != ProtocolVersion::V5 {
        return Err(ConnectError::Malformed("password flag set without the username flag"));
    }

    let keep_alive = c.u16("truncated keep alive")?;
    let properties = match version {
        ProtocolVersion::V5 => c.properties("truncated properties")?,
        _ => &[],
    };
    let client_id = c.string("client id", "truncated client id")?;
    let will = match has_will {
        true => Some(Will {
            qos: will_qos,
            retain: will_retain,
            properties: match version {
                ProtocolVersion::V5 => c.properties("truncated will properties")?,
                _ => &[],
            },
            topic: c.string("will topic", "truncated will topic")?,
            payload: c.binary("truncated will payload")?,
        }),
        false => None,
    };
    let username = match has_username {
        true => Some(c.string("username", "truncated username")?),
        false => None,
    };
    let password = match has_password {
        true => Some(c.binary("truncated password")?),
        false => None,
    };
    if !c.0.is_empty() {
        return Err(ConnectError::Malformed("bytes left over after the CONNECT payload"));
    }
    Ok(ConnectView {
        version,
        clean_start,
        keep_alive,
        properties,
        client_id,
        will,
        username,
        password,
    })
}

/// The most `read_connect` asks for in one read.
const READ_CHUNK: usize = 2048;

/// Reads from `r` into `buf` until `buf` holds a complete CONNECT, and returns it.
///
/// `buf` keeps every byte read, including any the device sent after the
/// CONNECT; they must be forwarded later, in order. Bytes already in `buf` on
/// entry are parsed first. `buf` never grows beyond `max_len` bytes: the
/// first read asks for at most 512 bytes, and once the packet length is known
/// reads ask only for what the packet still lacks, so nothing past the end of
/// a CONNECT is read after that.
///
/// There is no timeout inside; wrap the call. Dropping the future is safe:
/// `buf` then holds exactly the bytes read so far, and a later call resumes.
pub async fn read_connect<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    max_len: usize,
) -> Result<Connect, ReadConnectError> {
    loop {
        let target = match parse_connect(buf, max_len) {
            Ok(connect) => return Ok(connect),
            Err(ConnectError::Incomplete) => match fixed_header(buf, max_len) {
                Ok((header_len, remaining)) => header_len + remaining,
                Err(_) => FIRST_READ.max(buf.len() + 1),
            },
            Err(e) => return Err(e.into()),
        };
        // `parse_connect` reports Incomplete only while the packet could still
        // fit in `max_len`, so there is always room; the check is a safety net.
        let want = target.min(max_len).saturating_sub(buf.len());
        if want == 0 {
            return Err(ConnectError::TooLarge {
                len: buf.len() + 1,
                max: max_len,
            }
            .into());
        }
        // Grow with what arrives, not with what the header claims: a declared size costs nothing.
        let want = want.min(READ_CHUNK);
        buf.reserve(want);
        let n = loop {
            match (&mut *r).take(want as u64).read_buf(buf).await {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        };
        if n == 0 {
            return Err(ReadConnectError::Closed(buf.len()));
        }
    }
}

/// A CONNACK that mqtls sends itself, to refuse a device: no session present, a return code (3.1, 3.1.1)
/// or reason code (5.0), no properties.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OwnConnack {
    bytes: [u8; 5],
    len: usize,
}

impl OwnConnack {
    /// The packet's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// The CONNACK carrying `code`, in the device's protocol version (see `refusal` for which code
/// answers which refusal).
pub fn connack(version: ProtocolVersion, code: u8) -> OwnConnack {
    match version {
        ProtocolVersion::V31 | ProtocolVersion::V311 => OwnConnack {
            bytes: [CONNACK_BYTE, 0x02, 0x00, code, 0],
            len: 4,
        },
        ProtocolVersion::V5 => OwnConnack {
            bytes: [CONNACK_BYTE, 0x03, 0x00, code, 0x00],
            len: 5,
        },
    }
}

/// What a CONNACK return code (3.1, 3.1.1) or reason code (5.0) means, for the log.
pub fn connack_code_name(version: ProtocolVersion, code: u8) -> &'static str {
    match (version, code) {
        (_, 0x00) => "accepted",
        (ProtocolVersion::V31 | ProtocolVersion::V311, 0x01) => "unacceptable protocol version",
        (ProtocolVersion::V31 | ProtocolVersion::V311, 0x02) => "identifier rejected",
        (ProtocolVersion::V31 | ProtocolVersion::V311, 0x03) => "server unavailable",
        (ProtocolVersion::V31 | ProtocolVersion::V311, 0x04) => "bad user name or password",
        (ProtocolVersion::V31 | ProtocolVersion::V311, 0x05) => "not authorized",
        (ProtocolVersion::V5, 0x80) => "unspecified error",
        (ProtocolVersion::V5, 0x81) => "malformed packet",
        (ProtocolVersion::V5, 0x82) => "protocol error",
        (ProtocolVersion::V5, 0x83) => "implementation specific error",
        (ProtocolVersion::V5, 0x84) => "unsupported protocol version",
        (ProtocolVersion::V5, 0x85) => "client identifier not valid",
        (ProtocolVersion::V5, 0x86) => "bad user name or password",
        (ProtocolVersion::V5, 0x87) => "not authorized",
        (ProtocolVersion::V5, 0x88) => "server unavailable",
        (ProtocolVersion::V5, 0x89) => "server busy",
        (ProtocolVersion::V5, 0x8A) => "banned",
        (ProtocolVersion::V5, 0x8C) => "bad authentication method",
        (ProtocolVersion::V5, 0x90) => "topic name invalid",
        (ProtocolVersion::V5, 0x95) => "packet too large",
        (ProtocolVersion::V5, 0x97) => "quota exceeded",
        (ProtocolVersion::V5, 0x99) => "payload format invalid",
        (ProtocolVersion::V5, 0x9A) => "retain not supported",
        (ProtocolVersion::V5, 0x9B) => "QoS not supported",
        (ProtocolVersion::V5, 0x9C) => "use another server",
        (ProtocolVersion::V5, 0x9D) => "server moved",
        (ProtocolVersion::V5, 0x9F) => "connection rate exceeded",
        _ => "not a CONNACK code MQTT defines",
    }
}

/// What mqtls needs from the broker's first packet, the CONNACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connack {
    /// Total size of the CONNACK packet in bytes, fixed header included.
    pub packet_len: usize,
    /// The session present flag (always false for MQTT 3.1, which has none).
    pub session_present: bool,
    /// The return code (3.1.x) or reason code (5.0); 0 means accepted.
    pub code: u8,
    /// MQTT 5 Server Keep Alive (property 0x13), which overrides the
    /// device's keep-alive when present.
    pub server_keep_alive: Option<u16>,
}

/// Parses the broker's CONNACK from the start of `buf`, in the protocol
/// version the device's CONNECT used.
///
/// Returns [`ConnectError::Incomplete`] while more bytes are needed and
/// [`ConnectError::NotConnack`] if the first byte is not 0x20. Bytes after the
/// packet are ignored. There is no size limit here: bound the buffer in the
/// caller.
pub fn parse_connack(buf: &[u8], version: ProtocolVersion) -> Result<Connack, ConnectError> {
    if let Some(&first_byte) = buf.first() {
        if first_byte != CONNACK_BYTE {
            return Err(ConnectError::NotConnack { first_byte });
        }
    }
    let (header_len, remaining) = fixed_header(buf, usize::MAX)?;
    let packet_len = header_len + remaining;
    let body = buf.get(header_len..packet_len).ok_or(ConnectError::Incomplete)?;
    let mut c = Cursor(body);

    let flags = c.u8("truncated CONNACK flags")?;
    let code = c.u8("truncated CONNACK return code")?;
    let session_present = match version {
        // 3.1 leaves this byte unused.
        ProtocolVersion::V31 => false,
        ProtocolVersion::V311 | ProtocolVersion::V5 => {
            if flags & 0xFE != 0 {
                return Err(ConnectError::Malformed("reserved CONNACK flag is set"));
            }
            flags & 0x01 != 0
        }
    };
    let mut server_keep_alive = None;
    // Lenient: a 5.0 CONNACK without the property length byte has no properties.
    if version == ProtocolVersion::V5 && !c.0.is_empty() {
        let len = c.varint("truncated CONNACK property length")?;
        let mut props = Cursor(c.take(len, "truncated CONNACK properties")?);
        while !props.0.is_empty() {
            let id = props.u8("truncated property identifier")?;
            if id == 0x13 {
                let value = props.u16("truncated Server Keep Alive")?;
                if server_keep_alive.replace(value).is_some() {
                    return Err(ConnectError::Malformed("Server Keep Alive property appears twice"));
                }
            } else {
                props.skip_property(id)?;
            }
        }
    }
    if !c.0.is_empty() {
        return Err(ConnectError::Malformed("bytes left over after the CONNACK"));
    }
    Ok(Connack {
        packet_len,
        session_present,
        code,
        server_keep_alive,
    })
}

/// Decodes the fixed header at the start of `buf` (its first byte already
/// checked) into (header length, remaining length).
///
/// Fails with `TooLarge` as soon as the packet is known to need more than
/// `max_len` bytes, and with `Incomplete` while the length field is partial.
fn fixed_header(buf: &[u8], max_len: usize) -> Result<(usize, usize), ConnectError> {
    let (at_least, result) = match decode_varint(buf.get(1..).unwrap_or_default()) {
        Varint::Value { value, len } => {
            let total = 1 + len + value;
            (total, Ok((1 + len, value)))
        }
        // At least one more length byte is needed, and it may add nothing.
        Varint::Partial { len, so_far } => (2 + len + so_far, Err(ConnectError::Incomplete)),
        Varint::TooLong => return Err(ConnectError::Malformed("remaining length is longer than 4 bytes")),
    };
    if at_least > max_len {
        return Err(ConnectError::TooLarge {
            len: at_least,
            max: max_len,
        });
    }
    result
}

/// Outcome of decoding an MQTT variable byte integer.
enum Varint {
    /// A complete integer of `len` bytes.
    Value { value: usize, len: usize },
    /// `len` bytes, all with the continuation bit, worth `so_far` so far.
    Partial { len: usize, so_far: usize },
    /// Four bytes, the fourth still with the continuation bit.
    TooLong,
}

/// Decodes a variable byte integer (at most 4 bytes) from the start of `bytes`.
/// Non-minimal encodings are accepted; the broker judges those.
fn decode_varint(bytes: &[u8]) -> Varint {
    let mut value = 0usize;
    for (i, &b) in bytes.iter().take(4).enumerate() {
        value |= usize::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            debug_assert!(value <= MAX_REMAINING_LEN);
            return Varint::Value { value, len: i + 1 };
        }
    }
    if bytes.len() >= 4 {
        Varint::TooLong
    } else {
        Varint::Partial {
            len: bytes.len(),
            so_far: value,
        }
    }
}

/// Reads fields from a packet body whose length is already known, so that
/// running out of bytes means the packet is malformed, not incomplete.
#[derive(Clone, Copy)]
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, err: &'static str) -> Result<&'a [u8], ConnectError> {
        if n > self.0.len() {
            return Err(ConnectError::Malformed(err));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self, err: &'static str) -> Result<u8, ConnectError> {
        Ok(self.take(1, err)?[0])
    }

    fn u16(&mut self, err: &'static str) -> Result<u16, ConnectError> {
        let b = self.take(2, err)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// Binary data: a two-byte length, then that many bytes.
    fn binary(&mut self, err: &'static str) -> Result<&'a [u8], ConnectError> {
        let n = self.u16(err)?;
        self.take(usize::from(n), err)
    }

    /// An MQTT UTF-8 string: binary data that is valid UTF-8 without U+0000.
    fn string(&mut self, field: &'static str, err: &'static str) -> Result<&'a str, ConnectError> {
        let s = std::str::from_utf8(self.binary(err)?).map_err(|_| ConnectError::BadString(field))?;
        if s.contains('\0') {
            return Err(ConnectError::NulInString(field));
        }
        Ok(s)
    }

    fn varint(&mut self, err: &'static str) -> Result<usize, ConnectError> {
        match decode_varint(self.0) {
            Varint::Value { value, len } => {
                self.0 = &self.0[len..];
                Ok(value)
            }
            Varint::Partial { .. } => Err(ConnectError::Malformed(err)),
            Varint::TooLong => Err(ConnectError::Malformed("variable byte integer is longer than 4 bytes")),
        }
    }

    /// A property block (length, then properties), returned as it is without looking inside.
    fn properties(&mut self, err: &'static str) -> Result<&'a [u8], ConnectError> {
        let n = self.varint(err)?;
        self.take(n, err)
    }

    /// Skips the value of one property, whose identifier was just read.
    fn skip_property(&mut self, id: u8) -> Result<(), ConnectError> {
        const ERR: &str = "truncated property";
        match id {
            // Byte.
            0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => self.take(1, ERR).map(drop),
            // Two-byte integer.
            0x13 | 0x21 | 0x22 | 0x23 => self.take(2, ERR).map(drop),
            // Four-byte integer.
            0x02 | 0x11 | 0x18 | 0x27 => self.take(4, ERR).map(drop),
            // Variable byte integer.
            0x0B => self.varint(ERR).map(drop),
            // UTF-8 string or binary data; only skipped, so not validated.
            0x03 | 0x08 | 0x09 | 0x12 | 0x15 | 0x16 | 0x1A | 0x1C | 0x1F => self.binary(ERR).map(drop),
            // User property: a string pair.
            0x26 => {
                self.binary(ERR)?;
                self.binary(ERR).map(drop)
            }
            _ => Err(ConnectError::Malformed("unknown property identifier")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use tokio::io::{AsyncWriteExt, ReadBuf};

    const MAX: usize = 4096;

    // --- test-only encoder ---

    fn put_varint(out: &mut Vec<u8>, mut n: usize) {
        loop {
            let mut b = (n % 128) as u8;
            n /= 128;
            if n > 0 {
                b |= 0x80;
            }
            out.push(b);
            if n == 0 {
                break;
            }
        }
    }

    fn put_bin(out: &mut Vec<u8>, bytes: &[u8]) {
        out.extend_from_slice(&u16::try_from(bytes.len()).unwrap().to_be_bytes());
        out.extend_from_slice(bytes);
    }

    fn packet(first: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![first];
        put_varint(&mut out, body.len());
        out.extend_from_slice(body);
        out
    }

    #[derive(Debug, Clone)]
    struct TestWill {
        props: Vec<u8>,
        topic: Vec<u8>,
        payload: Vec<u8>,
        qos: u8,
        retain: bool,
    }

    #[derive(Debug, Clone)]
    struct TestConnect {
        name: Vec<u8>,
        level: u8,
        version: ProtocolVersion,
        client_id: Vec<u8>,
        keep_alive: u16,
        clean: bool,
        props: Vec<u8>,
        will: Option<TestWill>,
        username: Option<Vec<u8>>,
        password: Option<Vec<u8>>,
        /// XORed into the connect flags byte, to build invalid flag combinations.
        flags_xor: u8,
        /// Appended inside the remaining length, after the payload.
        trailing: Vec<u8>,
    }

    impl TestConnect {
        fn new(version: ProtocolVersion, client_id: &str) -> Self {
            let name: &[u8] = match version {
                ProtocolVersion::V31 => b"MQIsdp",
                _ => b"MQTT",
            };
            Self {
                name: name.to_vec(),
                level: version.level(),
                version,
                client_id: client_id.as_bytes().to_vec(),
                keep_alive: 60,
                clean: true,
                props: Vec::new(),
                will: None,
                username: None,
                password: None,
                flags_xor: 0,
                trailing: Vec::new(),
            }
        }

        fn flags(&self) -> u8 {
            let mut f = 0;
            if self.clean {
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
            f ^ self.flags_xor
        }

        fn body(&self) -> Vec<u8> {
            let v5 = self.version == ProtocolVersion::V5;
            let mut b = Vec::new();
            put_bin(&mut b, &self.name);
            b.push(self.level);
            b.push(self.flags());
            b.extend_from_slice(&self.keep_alive.to_be_bytes());
            if v5 {
                put_varint(&mut b, self.props.len());
                b.extend_from_slice(&self.props);
            }
            put_bin(&mut b, &self.client_id);
            if let Some(w) = &self.will {
                if v5 {
                    put_varint(&mut b, w.props.len());
                    b.extend_from_slice(&w.props);
                }
                put_bin(&mut b, &w.topic);
                put_bin(&mut b, &w.payload);
            }
            if let Some(u) = &self.username {
                put_bin(&mut b, u);
            }
            if let Some(p) = &self.password {
                put_bin(&mut b, p);
            }
            b.extend_from_slice(&self.trailing);
            b
        }

        fn encode(&self) -> Vec<u8> {
            packet(0x10, &self.body())
        }

        fn expected(&self) -> Connect {
            Connect {
                version: self.version,
                client_id: String::from_utf8(self.client_id.clone()).unwrap(),
                keep_alive: self.keep_alive,
                packet_len: self.encode().len(),
                has_username: self.username.is_some(),
                clean_start: self.clean,
            }
        }
    }

    fn will() -> TestWill {
        TestWill {
            props: Vec::new(),
            topic: b"devices/lamp/status".to_vec(),
            payload: b"offline".to_vec(),
            qos: 1,
            retain: true,
        }
    }

    /// Some MQTT 5 properties: session expiry, receive maximum, a user property.
    fn v5_props() -> Vec<u8> {
        let mut p = vec![0x11, 0, 0, 0x0E, 0x10, 0x21, 0x00, 0x0A, 0x26];
        put_bin(&mut p, b"site");
        put_bin(&mut p, b"plant-7");
        p
    }

    fn assert_roundtrip(t: &TestConnect) {
        let bytes = t.encode();
        assert_eq!(parse_connect(&bytes, MAX), Ok(t.expected()), "{t:?}");
    }

    fn assert_err(t: &TestConnect, err: ConnectError) {
        assert_eq!(parse_connect(&t.encode(), MAX), Err(err), "{t:?}");
    }

    // --- parse_connect ---

    #[test]
    fn parses_v31() {
        let t = TestConnect::new(ProtocolVersion::V31, "old-sensor");
        assert_roundtrip(&t);
        let c = parse_connect(&t.encode(), MAX).unwrap();
        assert_eq!(c.version, ProtocolVersion::V31);
        assert_eq!(c.client_id, "old-sensor");
    }

    #[test]
    fn parses_v311() {
        let mut t = TestConnect::new(ProtocolVersion::V311, "lamp-01");
        t.clean = false;
        t.keep_alive = 0;
        assert_roundtrip(&t);
    }

    #[test]
    fn parses_v5_with_properties() {
        let mut t = TestConnect::new(ProtocolVersion::V5, "meter-42");
        t.props = v5_props();
        assert_roundtrip(&t);
    }

    #[test]
    fn parses_will_in_every_version() {
        for v in [ProtocolVersion::V31, ProtocolVersion::V311, ProtocolVersion::V5] {
            let mut t = TestConnect::new(v, "with-will");
            let mut w = will();
            if v == ProtocolVersion::V5 {
                w.props = vec![0x18, 0, 0, 0, 5, 0x01, 1];
                t.props = v5_props();
            }
            t.will = Some(w);
            assert_roundtrip(&t);
        }
    }

    #[test]
    fn parses_username_and_password() {
        for v in [ProtocolVersion::V31, ProtocolVersion::V311, ProtocolVersion::V5] {
            let mut t = TestConnect::new(v, "dev");
            t.username = Some("alice".into());
            t.password = Some(b"s3cret".to_vec());
            assert_roundtrip(&t);
            let c = parse_connect(&t.encode(), MAX).unwrap();
            assert!(c.has_username);
            assert!(!format!("{c:?}").contains("s3cret"));

            t.password = None;
            assert_roundtrip(&t);
        }
    }

    #[test]
    fn password_without_username_only_in_v5() {
        let mut t = TestConnect::new(ProtocolVersion::V5, "dev");
        t.password = Some(b"token".to_vec());
        assert_roundtrip(&t);
        for v in [ProtocolVersion::V31, ProtocolVersion::V311] {
            let mut t = TestConnect::new(v, "dev");
            t.password = Some(b"token".to_vec());
            assert!(matches!(
                parse_connect(&t.encode(), MAX),
                Err(ConnectError::Malformed(_))
            ));
        }
    }

    #[test]
    fn everything_at_once_v5() {
        let mut t = TestConnect::new(ProtocolVersion::V5, "kitchen/ø-スマート");
        t.props = v5_props();
        let mut w = will();
        w.props = vec![0x18, 0, 0, 0, 5];
        w.qos = 2;
        t.will = Some(w);
        t.username = Some("user".into());
        t.password = Some(vec![0, 1, 2, 0xFF]);
        t.keep_alive = u16::MAX;
        assert_roundtrip(&t);
    }

    #[test]
    fn empty_client_id() {
        for v in [ProtocolVersion::V31, ProtocolVersion::V311, ProtocolVersion::V5] {
            let t = TestConnect::new(v, "");
            assert_roundtrip(&t);
            assert_eq!(parse_connect(&t.encode(), MAX).unwrap().client_id, "");
        }
    }

    #[test]
    fn keep_alive_values() {
        for ka in [0, 1, 60, 255, 256, 0x1234, u16::MAX] {
            let mut t = TestConnect::new(ProtocolVersion::V311, "k");
            t.keep_alive = ka;
            assert_eq!(parse_connect(&t.encode(), MAX).unwrap().keep_alive, ka);
        }
    }

    #[test]
    fn long_client_id_uses_multibyte_length() {
        let id = "x".repeat(300);
        let t = TestConnect::new(ProtocolVersion::V311, &id);
        let bytes = t.encode();
        assert_eq!(bytes[1] & 0x80, 0x80, "two-byte remaining length");
        assert_eq!(parse_connect(&bytes, MAX).unwrap().client_id, id);
    }

    #[test]
    fn packet_len_ignores_following_publish() {
        let t = TestConnect::new(ProtocolVersion::V311, "lamp");
        let connect = t.encode();
        let mut publish_body = Vec::new();
        put_bin(&mut publish_body, b"lamp/state");
        publish_body.extend_from_slice(b"on");
        let publish = packet(0x30, &publish_body);
        let mut bytes = connect.clone();
        bytes.extend_from_slice(&publish);
        let c = parse_connect(&bytes, MAX).unwrap();
        assert_eq!(c.packet_len, connect.len());
        assert_eq!(&bytes[c.packet_len..], &publish[..]);
    }

    #[test]
    fn every_strict_prefix_is_incomplete() {
        let mut t = TestConnect::new(ProtocolVersion::V5, "prefix");
        t.props = v5_props();
        t.will = Some(will());
        t.username = Some("u".into());
        t.password = Some(b"p".to_vec());
        let bytes = t.encode();
        for n in 0..bytes.len() {
            assert_eq!(
                parse_connect(&bytes[..n], MAX),
                Err(ConnectError::Incomplete),
                "prefix {n}"
            );
        }
        assert!(parse_connect(&bytes, MAX).is_ok());
    }

    #[test]
    fn not_connect() {
        for b in [0x00, 0x11, 0x12, 0x20, 0x30, 0x82, 0xC0, 0xFF] {
            assert_eq!(
                parse_connect(&[b], MAX),
                Err(ConnectError::NotConnect { first_byte: b })
            );
        }
        assert_eq!(
            parse_connect(b"GET / HTTP/1.1\r\n", MAX),
            Err(ConnectError::NotConnect { first_byte: b'G' })
        );
    }

    #[test]
    fn too_large_from_header_alone() {
        // Declares 1000 bytes of body; only the fixed header has arrived.
        let header = [0x10, 0xE8, 0x07];
        assert_eq!(
            parse_connect(&header, 256),
            Err(ConnectError::TooLarge { len: 1003, max: 256 })
        );
        assert_eq!(parse_connect(&header, 1003), Err(ConnectError::Incomplete));
        // Partial length field: already at least 2 + 1 + 0x68 bytes.
        assert_eq!(
            parse_connect(&header[..2], 64),
            Err(ConnectError::TooLarge { len: 107, max: 64 })
        );
        assert_eq!(parse_connect(&[], 1), Err(ConnectError::TooLarge { len: 2, max: 1 }));
        // A complete valid packet one byte over the limit.
        let bytes = TestConnect::new(ProtocolVersion::V311, "dev").encode();
        let len = bytes.len();
        assert_eq!(
            parse_connect(&bytes, len - 1),
            Err(ConnectError::TooLarge { len, max: len - 1 })
        );
        assert!(parse_connect(&bytes, len).is_ok());
    }

    #[test]
    fn remaining_length_of_five_bytes() {
        let bytes = [0x10, 0xFF, 0xFF, 0xFF, 0xFF, 0x01];
        assert!(matches!(
            parse_connect(&bytes, usize::MAX),
            Err(ConnectError::Malformed(_))
        ));
        // Detected as soon as the fourth length byte arrives.
        assert!(matches!(
            parse_connect(&bytes[..5], usize::MAX),
            Err(ConnectError::Malformed(_))
        ));
        // The largest 4-byte value is fine, just too large.
        assert_eq!(
            parse_connect(&[0x10, 0xFF, 0xFF, 0xFF, 0x7F], MAX),
            Err(ConnectError::TooLarge {
                len: 5 + MAX_REMAINING_LEN,
                max: MAX
            })
        );
    }

    #[test]
    fn lengths_overrunning_the_packet() {
        let good = TestConnect::new(ProtocolVersion::V311, "abc").body();
        // Shorten the body so the client id length points past its end.
        let short = &good[..good.len() - 1];
        assert_eq!(
            parse_connect(&packet(0x10, short), MAX),
            Err(ConnectError::Malformed("truncated client id"))
        );
        // A protocol name length far beyond the packet.
        let mut body = vec![0x00, 0xFF];
        body.extend_from_slice(b"MQTT\x04\x02\x00\x3C");
        assert_eq!(
            parse_connect(&packet(0x10, &body), MAX),
            Err(ConnectError::Malformed("truncated protocol name"))
        );
        // An MQTT 5 property length beyond the packet.
        let mut body = Vec::new();
        put_bin(&mut body, b"MQTT");
        body.extend_from_slice(&[5, 0x02, 0, 60, 0x40, 0x11, 0, 0]);
        assert_eq!(
            parse_connect(&packet(0x10, &body), MAX),
            Err(ConnectError::Malformed("truncated properties"))
        );
        // Will flag set but the payload ends after the client id.
        let mut t = TestConnect::new(ProtocolVersion::V311, "abc");
        t.flags_xor = 0x04;
        assert_err(&t, ConnectError::Malformed("truncated will topic"));
        // Username flag set with no username.
        let mut t = TestConnect::new(ProtocolVersion::V5, "abc");
        t.flags_xor = 0x80;
        assert_err(&t, ConnectError::Malformed("truncated username"));
        // Empty body.
        assert!(matches!(
            parse_connect(&[0x10, 0x00], MAX),
            Err(ConnectError::Malformed(_))
        ));
    }

    #[test]
    fn leftover_bytes_inside_the_packet() {
        for v in [ProtocolVersion::V31, ProtocolVersion::V311, ProtocolVersion::V5] {
            let mut t = TestConnect::new(v, "dev");
            t.trailing = vec![0];
            assert!(matches!(
                parse_connect(&t.encode(), MAX),
                Err(ConnectError::Malformed(_))
            ));
        }
    }

    #[test]
    fn reserved_flag() {
        let mut t = TestConnect::new(ProtocolVersion::V311, "dev");
        t.flags_xor = 0x01;
        assert_err(&t, ConnectError::Malformed("reserved connect flag is set"));
    }

    #[test]
    fn invalid_will_flags() {
        // Will QoS 3.
        let mut t = TestConnect::new(ProtocolVersion::V311, "dev");
        t.will = Some(TestWill { qos: 3, ..will() });
        assert_err(&t, ConnectError::Malformed("will QoS is 3"));
        // Will QoS or retain without the will flag.
        for xor in [0x08, 0x10, 0x18, 0x20] {
            let mut t = TestConnect::new(ProtocolVersion::V5, "dev");
            t.flags_xor = xor;
            assert!(
                matches!(parse_connect(&t.encode(), MAX), Err(ConnectError::Malformed(_))),
                "flags xor {xor:#04x}"
            );
        }
    }

    #[test]
    fn bad_strings() {
        let mut t = TestConnect::new(ProtocolVersion::V311, "");
        t.client_id = vec![b'a', 0xFF, b'b'];
        assert_err(&t, ConnectError::BadString("client id"));
        t.client_id = vec![0xED, 0xA0, 0x80]; // an encoded surrogate
        assert_err(&t, ConnectError::BadString("client id"));
        t.client_id = b"a\0b".to_vec();
        assert_err(&t, ConnectError::NulInString("client id"));

        let mut t = TestConnect::new(ProtocolVersion::V311, "ok");
        t.username = Some(vec![0xC3]);
        assert_err(&t, ConnectError::BadString("username"));

        let mut t = TestConnect::new(ProtocolVersion::V5, "ok");
        t.will = Some(TestWill {
            topic: b"a\0".to_vec(),
            ..will()
        });
        assert_err(&t, ConnectError::NulInString("will topic"));

        // The password and will payload are binary: anything goes.
        let mut t = TestConnect::new(ProtocolVersion::V311, "ok");
        t.username = Some(b"u".to_vec());
        t.password = Some(vec![0, 0xFF, 0xC3]);
        t.will = Some(TestWill {
            payload: vec![0, 0xFF],
            ..will()
        });
        assert_roundtrip(&t);
    }

    #[test]
    fn unsupported_protocols() {
        use ProtocolVersion::{V311, V5};
        // (name, level, the layout of the rest, the version the answer takes).
        let cases: &[(&[u8], u8, ProtocolVersion, Option<ProtocolVersion>)] = &[
            (b"MQTT", 3, V311, Some(V311)),
            (b"MQTT", 6, V311, Some(V311)),
            (b"MQTT", 9, V311, Some(V311)),
            (b"MQTT", 9, V5, Some(V5)),
            (b"MQTT", 0, V311, Some(V311)),
            (b"MQIsdp", 4, V311, Some(V311)),
            (b"MQIsdp", 5, V311, Some(V311)),
            (b"mqtt", 4, V311, None),
            (b"HTTP", 4, V311, None),
            (b"", 4, V311, None),
        ];
        for &(name, level, layout, answer_as) in cases {
            let mut t = TestConnect::new(layout, "dev");
            t.name = name.to_vec();
            t.level = level;
            assert_err(
                &t,
                ConnectError::UnsupportedProtocol {
                    name: String::from_utf8(name.to_vec()).unwrap(),
                    level,
                    answer_as,
                },
            );
        }
        // Long or non-UTF-8 names are cut to 16 characters, lossily.
        let mut t = TestConnect::new(ProtocolVersion::V311, "dev");
        t.name = [&[0xFF][..], &[b'A'; 40][..]].concat();
        let err = parse_connect(&t.encode(), MAX).unwrap_err();
        let ConnectError::UnsupportedProtocol { name, level, .. } = err else {
            panic!("{err:?}");
        };
        assert_eq!(level, 4);
        assert_eq!(name.chars().count(), 16);
        assert!(name.starts_with('\u{FFFD}'));
    }

    #[test]
    fn a_nul_in_the_client_id_is_named_as_such() {
        assert_eq!(
            ConnectError::NulInString("client id").to_string(),
            "the client id holds the character U+0000, which MQTT does not allow in a string"
        );
    }

    #[test]
    fn error_messages() {
        assert_eq!(
            ConnectError::NotConnect { first_byte: 0x47 }.to_string(),
            "first packet is not a CONNECT (first byte 0x47)"
        );
        assert_eq!(
            ConnectError::BadString("client id").to_string(),
            "invalid UTF-8 string in the client id"
        );
        assert_eq!(
            ReadConnectError::Closed(3).to_string(),
            "connection closed after 3 bytes, before a complete CONNECT"
        );
        assert_eq!(
            ReadConnectError::Parse(ConnectError::Malformed("x")).to_string(),
            "malformed MQTT packet: x"
        );
    }

    #[test]
    fn version_level_and_display() {
        assert_eq!(ProtocolVersion::V31.level(), 3);
        assert_eq!(ProtocolVersion::V311.level(), 4);
        assert_eq!(ProtocolVersion::V5.level(), 5);
        assert_eq!(ProtocolVersion::V31.to_string(), "3.1");
        assert_eq!(ProtocolVersion::V311.to_string(), "3.1.1");
        assert_eq!(ProtocolVersion::V5.to_string(), "5.0");
    }

    // --- read_connect ---

    /// Serves `data` in reads of the given sizes (cycled), optionally
    /// returning Pending before every read, then reports end of stream.
    struct ChunkedReader {
        data: Vec<u8>,
        pos: usize,
        chunks: Vec<usize>,
        next: usize,
        pending_first: bool,
        pending_now: bool,
    }

    impl ChunkedReader {
        fn new(data: Vec<u8>, chunks: Vec<usize>) -> Self {
            Self {
                data,
                pos: 0,
                chunks,
                next: 0,
                pending_first: false,
                pending_now: false,
            }
        }
    }

    impl AsyncRead for ChunkedReader {
        fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            let this = &mut *self;
            if this.pending_first {
                this.pending_now = !this.pending_now;
                if this.pending_now {
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
            }
            let chunk = this.chunks[this.next % this.chunks.len()];
            this.next += 1;
            let n = chunk.min(buf.remaining()).min(this.data.len() - this.pos);
            buf.put_slice(&this.data[this.pos..this.pos + n]);
            this.pos += n;
            Poll::Ready(Ok(()))
        }
    }

    struct FailingReader;

    impl AsyncRead for FailingReader {
        fn poll_read(self: Pin<&mut Self>, _cx: &mut Context<'_>, _buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionReset, "reset")))
        }
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    fn full_connect() -> TestConnect {
        let mut t = TestConnect::new(ProtocolVersion::V5, "one-byte-at-a-time");
        t.props = v5_props();
        t.will = Some(will());
        t.username = Some("u".into());
        t.password = Some(b"p".to_vec());
        t
    }

    #[tokio::test]
    async fn read_one_byte_at_a_time() {
        let t = full_connect();
        let bytes = t.encode();
        let mut r = ChunkedReader::new(bytes.clone(), vec![1]);
        r.pending_first = true;
        let mut buf = Vec::new();
        let c = read_connect(&mut r, &mut buf, MAX).await.unwrap();
        assert_eq!(c, t.expected());
        assert_eq!(buf, bytes);
        assert_eq!(r.pos, bytes.len());
    }

    #[tokio::test]
    async fn read_keeps_bytes_after_the_connect() {
        let t = TestConnect::new(ProtocolVersion::V311, "lamp");
        let mut bytes = t.encode();
        let mut publish_body = Vec::new();
        put_bin(&mut publish_body, b"lamp/state");
        publish_body.extend_from_slice(b"on");
        bytes.extend_from_slice(&packet(0x30, &publish_body));
        let mut r: &[u8] = &bytes;
        let mut buf = Vec::new();
        let c = read_connect(&mut r, &mut buf, MAX).await.unwrap();
        assert_eq!(c, t.expected());
        assert_eq!(buf, bytes);
    }

    #[tokio::test]
    async fn read_stops_at_the_end_of_a_long_connect() {
        // Longer than the first read, so the second read is sized to the packet.
        let t = TestConnect::new(ProtocolVersion::V311, &"d".repeat(1000));
        let connect = t.encode();
        let mut bytes = connect.clone();
        bytes.extend_from_slice(&[0xC0, 0x00]);
        let mut r = ChunkedReader::new(bytes, vec![usize::MAX]);
        let mut buf = Vec::new();
        let c = read_connect(&mut r, &mut buf, MAX).await.unwrap();
        assert_eq!(c.packet_len, connect.len());
        assert_eq!(buf, connect);
        assert_eq!(r.pos, connect.len());
    }

    #[tokio::test]
    async fn read_early_close() {
        let bytes = TestConnect::new(ProtocolVersion::V311, "dev").encode();
        for n in [0, 1, 2, 10, bytes.len() - 1] {
            let mut r: &[u8] = &bytes[..n];
            let mut buf = Vec::new();
            let err = read_connect(&mut r, &mut buf, MAX).await.unwrap_err();
            assert!(matches!(err, ReadConnectError::Closed(m) if m == n), "{err:?}");
            assert_eq!(buf, &bytes[..n]);
        }
    }

    #[tokio::test]
    async fn read_oversize_stops_at_max_len() {
        // Declares a 1 MiB packet, then keeps sending.
        let mut bytes = vec![0x10];
        put_varint(&mut bytes, 1 << 20);
        bytes.resize(1 << 20, 0x41);
        for max in [100, 2000] {
            for chunks in [vec![1], vec![3, 7], vec![usize::MAX]] {
                let one_by_one = chunks == [1];
                let mut r = ChunkedReader::new(bytes.clone(), chunks);
                let mut buf = Vec::new();
                let err = read_connect(&mut r, &mut buf, max).await.unwrap_err();
                assert!(
                    matches!(err, ReadConnectError::Parse(ConnectError::TooLarge { .. })),
                    "{err:?}"
                );
                assert!(buf.len() <= max && r.pos <= max);
                if one_by_one {
                    assert_eq!(buf.len(), 4, "stopped once the length was known");
                }
            }
        }
        // A valid CONNECT just over a tiny limit.
        let bytes = TestConnect::new(ProtocolVersion::V311, "dev").encode();
        let max = bytes.len() - 1;
        let mut r = ChunkedReader::new(bytes.clone(), vec![usize::MAX]);
        let mut buf = Vec::new();
        let err = read_connect(&mut r, &mut buf, max).await.unwrap_err();
        assert!(matches!(
            err,
            ReadConnectError::Parse(ConnectError::TooLarge { len, max: m }) if len == bytes.len() && m == max
        ));
        assert!(r.pos <= max);
        // max_len 0 reads nothing at all.
        let mut r = ChunkedReader::new(bytes, vec![usize::MAX]);
        let mut buf = Vec::new();
        assert!(read_connect(&mut r, &mut buf, 0).await.is_err());
        assert_eq!(r.pos, 0);
    }

    #[tokio::test]
    async fn read_reports_parse_and_io_errors() {
        let mut r: &[u8] = b"GET / HTTP/1.1\r\n\r\n";
        let mut buf = Vec::new();
        let err = read_connect(&mut r, &mut buf, MAX).await.unwrap_err();
        assert!(matches!(
            err,
            ReadConnectError::Parse(ConnectError::NotConnect { first_byte: b'G' })
        ));

        let mut buf = Vec::new();
        let err = read_connect(&mut FailingReader, &mut buf, MAX).await.unwrap_err();
        assert!(matches!(err, ReadConnectError::Io(e) if e.kind() == io::ErrorKind::ConnectionReset));
    }

    #[tokio::test]
    async fn read_resumes_after_a_timeout_and_uses_bytes_already_in_buf() {
        let t = full_connect();
        let bytes = t.encode();
        let (mut device, mut proxy) = tokio::io::duplex(64);
        let half = bytes.len() / 2;
        device.write_all(&bytes[..half]).await.unwrap();
        let mut buf = Vec::new();
        let timed_out = tokio::time::timeout(
            std::time::Duration::from_millis(20),
            read_connect(&mut proxy, &mut buf, MAX),
        )
        .await;
        assert!(timed_out.is_err());
        assert_eq!(buf, &bytes[..half]);
        device.write_all(&bytes[half..]).await.unwrap();
        let c = read_connect(&mut proxy, &mut buf, MAX).await.unwrap();
        assert_eq!(c, t.expected());
        assert_eq!(buf, bytes);

        // A complete packet already in buf needs no read at all.
        let mut r = FailingReader;
        assert_eq!(read_connect(&mut r, &mut buf, MAX).await.unwrap(), c);
    }

    // --- CONNACK ---

    #[test]
    fn connack_bytes() {
        use ProtocolVersion::*;
        for v in [V31, V311] {
            assert_eq!(connack(v, 0x02).as_bytes(), [0x20, 2, 0, 0x02]);
        }
        assert_eq!(connack(V5, 0x85).as_bytes(), [0x20, 3, 0, 0x85, 0]);
        // Our own refusals parse back.
        for v in [V31, V311, V5] {
            for code in [0x02, 0x03, 0x85, 0x88, 0x89] {
                let own = connack(v, code);
                let c = parse_connack(own.as_bytes(), v).unwrap();
                assert_eq!(c.packet_len, own.as_bytes().len());
                assert_eq!(c.code, code);
                assert!(!c.session_present);
            }
        }
    }

    fn v5_connack(props: &[u8]) -> Vec<u8> {
        let mut body = vec![0x01, 0x00];
        put_varint(&mut body, props.len());
        body.extend_from_slice(props);
        packet(0x20, &body)
    }

    #[test]
    fn parse_connack_v311() {
        let bytes = [0x20, 0x02, 0x01, 0x00, 0x30, 0x00];
        assert_eq!(
            parse_connack(&bytes, ProtocolVersion::V311),
            Ok(Connack {
                packet_len: 4,
                session_present: true,
                code: 0,
                server_keep_alive: None,
            })
        );
        let refused = parse_connack(&[0x20, 0x02, 0x00, 0x05], ProtocolVersion::V311).unwrap();
        assert_eq!((refused.session_present, refused.code), (false, 5));
        for n in 0..4 {
            assert_eq!(
                parse_connack(&bytes[..n], ProtocolVersion::V311),
                Err(ConnectError::Incomplete)
            );
        }
        assert_eq!(
            parse_connack(&[0x10, 0x02], ProtocolVersion::V311),
            Err(ConnectError::NotConnack { first_byte: 0x10 })
        );
        for bad in [
            &[0x20, 0x02, 0x02, 0x00][..],
            &[0x20, 0x03, 0x00, 0x00, 0x00],
            &[0x20, 0x01, 0x00],
        ] {
            assert!(matches!(
                parse_connack(bad, ProtocolVersion::V311),
                Err(ConnectError::Malformed(_))
            ));
        }
        // 3.1 has no session present flag and no reserved bits to check.
        let c = parse_connack(&[0x20, 0x02, 0x01, 0x00], ProtocolVersion::V31).unwrap();
        assert!(!c.session_present);
    }

    #[test]
    fn parse_connack_v5_server_keep_alive() {
        // Session expiry, receive maximum, maximum QoS, maximum packet size,
        // a user property, a reason string, an assigned client id and a
        // two-byte subscription identifier.
        let mut props = vec![0x11, 0, 0, 0, 30, 0x21, 0, 20, 0x24, 1, 0x27, 0, 1, 0, 0, 0x26];
        put_bin(&mut props, b"k");
        put_bin(&mut props, b"v");
        props.push(0x1F);
        put_bin(&mut props, b"welcome");
        props.push(0x12);
        put_bin(&mut props, b"auto-1234");
        props.extend_from_slice(&[0x0B, 0x80, 0x01]);

        let without = v5_connack(&props);
        let c = parse_connack(&without, ProtocolVersion::V5).unwrap();
        assert_eq!(
            c,
            Connack {
                packet_len: without.len(),
                session_present: true,
                code: 0,
                server_keep_alive: None,
            }
        );

        let mut with = props.clone();
        with.splice(5..5, [0x13, 0x00, 0x1E]);
        let mut bytes = v5_connack(&with);
        let len = bytes.len();
        bytes.extend_from_slice(&[0x30, 0x00]);
        let c = parse_connack(&bytes, ProtocolVersion::V5).unwrap();
        assert_eq!(c.server_keep_alive, Some(30));
        assert_eq!(c.packet_len, len);
        for n in 0..len {
            assert_eq!(
                parse_connack(&bytes[..n], ProtocolVersion::V5),
                Err(ConnectError::Incomplete)
            );
        }

        let only = v5_connack(&[0x13, 0x01, 0x00]);
        let c = parse_connack(&only, ProtocolVersion::V5).unwrap();
        assert_eq!(c.server_keep_alive, Some(256));

        // Without the property length byte at all: accepted, no properties.
        let c = parse_connack(&[0x20, 0x02, 0x00, 0x87], ProtocolVersion::V5).unwrap();
        assert_eq!((c.code, c.server_keep_alive), (0x87, None));
    }

    #[test]
    fn parse_connack_v5_malformed() {
        for bad in [
            v5_connack(&[0x13, 0x00]),                     // truncated value
            v5_connack(&[0x13, 0, 1, 0x13, 0, 2]),         // twice
            v5_connack(&[0x7F, 0x00]),                     // unknown property
            v5_connack(&[0x1F, 0x00, 0x05, b'a']),         // string overruns
            packet(0x20, &[0x00, 0x00, 0x05, 0x13, 0x00]), // property length overruns
            packet(0x20, &[0x00, 0x00, 0x00, 0x00]),       // leftover byte
        ] {
            assert!(
                matches!(
                    parse_connack(&bad, ProtocolVersion::V5),
                    Err(ConnectError::Malformed(_))
                ),
                "{bad:02x?}"
            );
        }
    }

    // --- property tests ---

    fn arb_version() -> impl Strategy<Value = ProtocolVersion> {
        prop_oneof![
            Just(ProtocolVersion::V31),
            Just(ProtocolVersion::V311),
            Just(ProtocolVersion::V5),
        ]
    }

    fn arb_props() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), 0..200)
    }

    fn arb_will() -> impl Strategy<Value = TestWill> {
        (
            arb_props(),
            "\\PC{0,20}",
            proptest::collection::vec(any::<u8>(), 0..40),
            0u8..=2,
            any::<bool>(),
        )
            .prop_map(|(props, topic, payload, qos, retain)| TestWill {
                props,
                topic: topic.into_bytes(),
                payload,
                qos,
                retain,
            })
    }

    prop_compose! {
        fn arb_connect()(
            version in arb_version(),
            client_id in "\\PC{0,40}",
            keep_alive in any::<u16>(),
            clean in any::<bool>(),
            props in arb_props(),
            will in proptest::option::of(arb_will()),
            username in proptest::option::of("\\PC{0,20}"),
            password in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
        ) -> TestConnect {
            let mut t = TestConnect::new(version, &client_id);
            t.keep_alive = keep_alive;
            t.clean = clean;
            t.will = will;
            t.username = username.map(String::into_bytes);
            t.password = password;
            if version == ProtocolVersion::V5 {
                t.props = props;
            } else {
                if let Some(w) = &mut t.will {
                    w.props.clear();
                }
                if t.username.is_none() {
                    t.password = None;
                }
            }
            t
        }
    }

    proptest! {
        #[test]
        fn prop_arbitrary_bytes_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..2048),
            max in 0usize..3000,
            force_connect in any::<bool>(),
        ) {
            let mut bytes = bytes;
            if force_connect && !bytes.is_empty() {
                bytes[0] = 0x10;
            }
            if let Ok(c) = parse_connect(&bytes, max) {
                prop_assert!(c.packet_len <= bytes.len());
                prop_assert!(c.packet_len <= max);
            }
            for v in [ProtocolVersion::V31, ProtocolVersion::V311, ProtocolVersion::V5] {
                if let Ok(c) = parse_connack(&bytes, v) {
                    prop_assert!(c.packet_len <= bytes.len());
                }
            }
        }

        #[test]
        fn prop_valid_connects_roundtrip(
            t in arb_connect(),
            extra in proptest::collection::vec(any::<u8>(), 0..20),
        ) {
            let bytes = t.encode();
            for n in 0..bytes.len() {
                prop_assert_eq!(parse_connect(&bytes[..n], MAX), Err(ConnectError::Incomplete));
            }
            let mut with_extra = bytes.clone();
            with_extra.extend_from_slice(&extra);
            prop_assert_eq!(parse_connect(&with_extra, MAX), Ok(t.expected()));
            prop_assert_eq!(parse_connect(&bytes, bytes.len()), Ok(t.expected()));
            let too_large = Err(ConnectError::TooLarge { len: bytes.len(), max: bytes.len() - 1 });
            prop_assert_eq!(parse_connect(&bytes, bytes.len() - 1), too_large);
        }

        #[test]
        fn prop_read_connect_matches_parse_connect(
            data in prop_oneof![
                (arb_connect(), proptest::collection::vec(any::<u8>(), 0..600))
                    .prop_map(|(t, extra)| [t.encode(), extra].concat()),
                proptest::collection::vec(any::<u8>(), 0..600)
                    .prop_map(|mut b| { if let Some(x) = b.first_mut() { *x = 0x10 } b }),
            ],
            chunks in proptest::collection::vec(1usize..64, 1..8),
            max in prop_oneof![0usize..700, Just(MAX)],
            pending in any::<bool>(),
        ) {
            let mut r = ChunkedReader::new(data.clone(), chunks);
            r.pending_first = pending;
            let mut buf = Vec::new();
            let got = block_on(read_connect(&mut r, &mut buf, max));
            prop_assert!(buf.len() <= max);
            prop_assert_eq!(&buf[..], &data[..buf.len()]);
            prop_assert_eq!(r.pos, buf.len());
            match (parse_connect(&data, max), got) {
                (Ok(want), Ok(c)) => {
                    prop_assert!(buf.len() >= c.packet_len);
                    prop_assert_eq!(want, c);
                }
                (Err(ConnectError::Incomplete), Err(ReadConnectError::Closed(n))) => {
                    prop_assert_eq!(n, data.len());
                }
                (
                    Err(ConnectError::TooLarge { .. }),
                    Err(ReadConnectError::Parse(ConnectError::TooLarge { len, max: m })),
                ) => {
                    prop_assert_eq!(m, max);
                    prop_assert!(len > max);
                }
                // A partial length field can already be too large for `max`
                // before its fifth byte shows it is malformed.
                (
                    Err(ConnectError::Malformed("remaining length is longer than 4 bytes")),
                    Err(ReadConnectError::Parse(ConnectError::TooLarge { len, .. })),
                ) => prop_assert!(len > max),
                (Err(want), Err(ReadConnectError::Parse(e))) => prop_assert_eq!(want, e),
                (want, got) => prop_assert!(false, "parse {:?} vs read {:?}", want, got),
            }
        }
    }
}
