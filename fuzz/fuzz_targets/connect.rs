//! Feeds arbitrary bytes to the CONNECT and CONNACK parsers: they must never
//! panic, and an accepted packet must lie within the buffer and the limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mqtls::mqtt::{parse_connack, parse_connect, ProtocolVersion};

fuzz_target!(|data: &[u8]| {
    // The first two bytes pick the limit, so small limits get explored too.
    let (max, buf) = match data {
        [a, b, rest @ ..] => (usize::from(u16::from_le_bytes([*a, *b])), rest),
        _ => return,
    };
    if let Ok(c) = parse_connect(buf, max) {
        assert!(c.packet_len <= buf.len() && c.packet_len <= max);
        // Bytes after the packet must not change the result.
        assert_eq!(parse_connect(&buf[..c.packet_len], max), Ok(c));
    }
    for v in [ProtocolVersion::V31, ProtocolVersion::V311, ProtocolVersion::V5] {
        if let Ok(c) = parse_connack(buf, v) {
            assert!(c.packet_len <= buf.len());
            assert_eq!(parse_connack(&buf[..c.packet_len], v), Ok(c));
        }
    }
});
