//! MQTT packets built and parsed from the specifications (3.1 `MQIsdp` level 3, 3.1.1 level 4, 5.0
//! level 5), for tests and the benchmark driver that must control or check the exact bytes on the wire.
//!
//! It is written independently of mqtls's own parser (`src/mqtt.rs`), which it exists to check, so it
//! never uses the `mqtls` crate. The benchmark driver (`bench/`, a crate of its own) includes this file
//! by `#[path]`, so it uses nothing but `std` and does no I/O: sockets are the caller's business.

/// The protocol a CONNECT speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// MQTT 3.1: protocol name `MQIsdp`, level 3.
    V31,
    /// MQTT 3.1.1: protocol name `MQTT`, level 4.
    V311,
    /// MQTT 5.0: protocol name `MQTT`, level 5.
    V5,
}

/// The MQTT 3.1.1 CONNACK that accepts a connection (no session present), as a broker answers a CONNECT.
pub const CONNACK_ACCEPTED: [u8; 4] = [0x20, 0x02, 0x00, 0x00];

/// MQTT Variable Byte Integer (the remaining length and v5 property lengths).
pub fn varint(mut n: usize) -> Vec<u8> {
    assert!(n <= 268_435_455, "{n} does not fit a variable byte integer");
    let mut out = Vec::with_capacity(4);
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if n == 0 {
            return out;
        }
    }
}

/// A two-byte big-endian length followed by the bytes (MQTT strings and binary data).
pub fn put_bin(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = u16::try_from(bytes.len()).expect("MQTT string longer than 65535 bytes");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
}

/// A whole packet: `first_byte`, the remaining length, then `body`.
pub fn packet(first_byte: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first_byte];
    out.extend_from_slice(&varint(body.len()));
    out.extend_from_slice(body);
    out
}

/// A CONNECT packet. Clean session, no will; the fields are public so a test can add a login.
#[derive(Debug, Clone)]
pub struct Connect {
    pub version: Version,
    pub client_id: String,
    pub keep_alive: u16,
    pub username: Option<String>,
    pub password: Option<Vec<u8>>,
    /// MQTT 5 CONNECT properties, already encoded (without their length).
    pub properties: Vec<u8>,
}

impl Connect {
    pub fn new(version: Version, client_id: &str, keep_alive: u16) -> Connect {
        Connect {
            version,
            client_id: client_id.to_string(),
            keep_alive,
            username: None,
            password: None,
            properties: Vec::new(),
        }
    }

    /// Adds a user name and password.
    pub fn login(mut self, username: &str, password: &[u8]) -> Connect {
        self.username = Some(username.to_string());
        self.password = Some(password.to_vec());
        self
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        match self.version {
            Version::V31 => {
                put_bin(&mut body, b"MQIsdp");
                body.push(3);
            }
            Version::V311 => {
                put_bin(&mut body, b"MQTT");
                body.push(4);
            }
            Version::V5 => {
                put_bin(&mut body, b"MQTT");
                body.push(5);
            }
        }
        let mut flags = 0x02; // clean session / clean start
        if self.username.is_some() {
            flags |= 0x80;
        }
        if self.password.is_some() {
            flags |= 0x40;
        }
        body.push(flags);
        body.extend_from_slice(&self.keep_alive.to_be_bytes());
        if self.version == Version::V5 {
            body.extend_from_slice(&varint(self.properties.len()));
            body.extend_from_slice(&self.properties);
        }
        put_bin(&mut body, self.client_id.as_bytes());
        if let Some(u) = &self.username {
            put_bin(&mut body, u.as_bytes());
        }
        if let Some(p) = &self.password {
            put_bin(&mut body, p);
        }
        packet(0x10, &body)
    }
}

/// The CONNECT bytes for `client_id` with `keep_alive` seconds.
pub fn connect(version: Version, client_id: &str, keep_alive: u16) -> Vec<u8> {
    Connect::new(version, client_id, keep_alive).encode()
}

/// A PUBLISH. `packet_id` is used only for QoS 1 and 2. In MQTT 5 the property length is 0.
pub fn publish(version: Version, topic: &str, qos: u8, packet_id: u16, payload: &[u8]) -> Vec<u8> {
    assert!(qos <= 2, "QoS {qos}");
    let mut body = Vec::new();
    put_bin(&mut body, topic.as_bytes());
    if qos > 0 {
        body.extend_from_slice(&packet_id.to_be_bytes());
    }
    if version == Version::V5 {
        body.push(0);
    }
    body.extend_from_slice(payload);
    packet(0x30 | (qos << 1), &body)
}

/// PINGREQ.
pub fn pingreq() -> Vec<u8> {
    vec![0xC0, 0x00]
}

/// DISCONNECT (normal disconnection; in MQTT 5 the reason code may be left out).
pub fn disconnect() -> Vec<u8> {
    vec![0xE0, 0x00]
}

/// One packet read from the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub first_byte: u8,
    pub body: Vec<u8>,
}

impl Packet {
    /// The packet as it was on the wire.
    pub fn to_bytes(&self) -> Vec<u8> {
        packet(self.first_byte, &self.body)
    }
}

/// The start of a packet's bytes as (fixed header length, remaining length), once the fixed header is
/// complete; `Ok(None)` while more bytes are needed. `Err` for a remaining length longer than 4 bytes.
pub fn fixed_header(bytes: &[u8]) -> Result<Option<(usize, usize)>, String> {
    let mut remaining = 0usize;
    for i in 0..4 {
        let Some(&b) = bytes.get(1 + i) else {
            return Ok(None);
        };
        remaining |= usize::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((2 + i, remaining)));
        }
    }
    Err("remaining length longer than 4 bytes".into())
}

/// A parsed CONNACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connack {
    pub session_present: bool,
    /// Return code (3.1, 3.1.1) or reason code (5.0); 0 is success.
    pub code: u8,
    /// MQTT 5 properties as (identifier, value bytes), in order.
    pub properties: Vec<(u8, Vec<u8>)>,
}

impl Connack {
    /// The MQTT 5 Server Keep Alive (property 0x13), if present.
    pub fn server_keep_alive(&self) -> Option<u16> {
        self.properties
            .iter()
            .find(|(id, _)| *id == 0x13)
            .map(|(_, v)| u16::from_be_bytes([v[0], v[1]]))
    }
}

/// Parses a CONNACK in `version`. Strict: wrong type, wrong length or leftover bytes are errors.
pub fn parse_connack(p: &Packet, version: Version) -> Result<Connack, String> {
    if p.first_byte != 0x20 {
        return Err(format!("not a CONNACK: {:02x?}", p.to_bytes()));
    }
    if p.body.len() < 2 {
        return Err(format!("CONNACK too short: {:02x?}", p.to_bytes()));
    }
    let session_present = p.body[0] & 0x01 != 0;
    let code = p.body[1];
    let mut properties = Vec::new();
    match version {
        Version::V31 | Version::V311 => {
            if p.body.len() != 2 {
                return Err(format!("3.x CONNACK must have 2 body bytes: {:02x?}", p.to_bytes()));
            }
        }
        Version::V5 => {
            let mut rest = &p.body[2..];
            if !rest.is_empty() {
                let len = take_varint(&mut rest)?;
                if rest.len() != len {
                    return Err(format!(
                        "CONNACK property length {len} but {} bytes follow: {:02x?}",
                        rest.len(),
                        p.to_bytes()
                    ));
                }
                while !rest.is_empty() {
                    let id = rest[0];
                    rest = &rest[1..];
                    let value = take_property(id, &mut rest)?;
                    properties.push((id, value));
                }
            }
        }
    }
    Ok(Connack {
        session_present,
        code,
        properties,
    })
}

fn take_varint(rest: &mut &[u8]) -> Result<usize, String> {
    let mut n = 0usize;
    for i in 0..4 {
        let Some((&b, tail)) = rest.split_first() else {
            return Err("truncated variable byte integer".into());
        };
        *rest = tail;
        n |= usize::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(n);
        }
    }
    Err("variable byte integer longer than 4 bytes".into())
}

fn take_n(rest: &mut &[u8], n: usize) -> Result<Vec<u8>, String> {
    if rest.len() < n {
        return Err(format!("property value truncated: need {n}, have {}", rest.len()));
    }
    let (v, tail) = rest.split_at(n);
    *rest = tail;
    Ok(v.to_vec())
}

/// The value of MQTT 5 property `id` (its raw bytes, length prefixes included for strings).
fn take_property(id: u8, rest: &mut &[u8]) -> Result<Vec<u8>, String> {
    match id {
        // Byte.
        0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => take_n(rest, 1),
        // Two-byte integer.
        0x13 | 0x21 | 0x22 | 0x23 => take_n(rest, 2),
        // Four-byte integer.
        0x02 | 0x11 | 0x18 | 0x27 => take_n(rest, 4),
        // Variable byte integer.
        0x0B => {
            let before = *rest;
            take_varint(rest)?;
            Ok(before[..before.len() - rest.len()].to_vec())
        }
        // UTF-8 string or binary data.
        0x03 | 0x08 | 0x09 | 0x12 | 0x15 | 0x16 | 0x1A | 0x1C | 0x1F => {
            let len = take_n(rest, 2)?;
            let n = usize::from(u16::from_be_bytes([len[0], len[1]]));
            Ok([len, take_n(rest, n)?].concat())
        }
        // String pair.
        0x26 => {
            let mut out = Vec::new();
            for _ in 0..2 {
                let len = take_n(rest, 2)?;
                let n = usize::from(u16::from_be_bytes([len[0], len[1]]));
                out.extend_from_slice(&len);
                out.extend_from_slice(&take_n(rest, n)?);
            }
            Ok(out)
        }
        other => Err(format!("unknown MQTT 5 property {other:#04x}")),
    }
}

/// The packet id of a PUBACK (any version; a v5 reason code, if present, must be success).
pub fn parse_puback(p: &Packet) -> Result<u16, String> {
    if p.first_byte != 0x40 || p.body.len() < 2 {
        return Err(format!("not a PUBACK: {:02x?}", p.to_bytes()));
    }
    if let Some(&reason) = p.body.get(2) {
        if reason >= 0x80 {
            return Err(format!("PUBACK with failure reason {reason:#04x}"));
        }
    }
    Ok(u16::from_be_bytes([p.body[0], p.body[1]]))
}

/// Checks that `p` is a PINGRESP.
pub fn parse_pingresp(p: &Packet) -> Result<(), String> {
    match p.to_bytes()[..] {
        [0xD0, 0x00] => Ok(()),
        _ => Err(format!("expected PINGRESP, got {:02x?}", p.to_bytes())),
    }
}
