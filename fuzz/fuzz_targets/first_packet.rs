//! A connection's first bytes through the proxy's own connection logic: the CONNECT, whatever follows it,
//! cut into reads as the fuzzer likes (`mqtls::proxy::fuzzing`).
//!
//! Input: two bytes `listen.max_connect_size` (little-endian, at least 64), one byte of site flags (bit 0:
//! a fallback is configured; bit 1: it serves only the client ids `sensor-*`), one byte `k` (taken modulo
//! 16), `k` piece sizes, then the device's bytes.
//!
//! What must hold, besides never panicking:
//! - the CONNECT reader keeps exactly the bytes it read, in order, never more than the limit, and
//!   agrees with the parser run on all the bytes at once;
//! - the outcome (what the device is told, what reaches the broker, the refusal counted) does not depend
//!   on how the bytes were cut into reads;
//! - and it is the one the rules give: a served device's bytes all reach the broker unchanged, in order;
//!   a forged or unknown client id and an unsupported protocol level are answered with the right
//!   CONNACK in the device's version (a CONNECT of another protocol name than MQTT's is closed
//!   unanswered); a TLS ClientHello and every other bad first packet are closed unanswered, each under
//!   its own reason.
#![no_main]

use std::future::Future;
use std::mem::discriminant;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use libfuzzer_sys::fuzz_target;
use mqtls::mqtt::{connack, parse_connect, read_connect, ConnectError, ProtocolVersion, ReadConnectError};
use mqtls::proxy::fuzzing::{connect, Device, Outcome, Site, OWNED};

/// Where mqtls's read limit starts (`listen.max_connect_size` is at least 64).
const MIN_CONNECT_SIZE: usize = 64;
/// The pattern a narrowed fallback serves, and what it means.
const FALLBACK_ONLY: &str = "sensor-*";
const FALLBACK_PREFIX: &str = "sensor-";

fuzz_target!(|input: &[u8]| {
    let Some((site, sizes, data)) = split(input) else {
        return;
    };
    for sizes in [&[][..], &sizes] {
        check_reader(data, sizes, site.max_connect_size);
    }
    let whole = connect(site, Device::new(data, &[]));
    let cut = connect(site, Device::new(data, &sizes));
    assert_eq!(
        cut, whole,
        "cutting the bytes into reads of {sizes:?} changed the outcome"
    );
    assert_eq!(whole, expected(site, data), "the outcome is not the one the rules give");
});

/// The site, the piece sizes and the device's bytes.
fn split(input: &[u8]) -> Option<(Site, Vec<usize>, &[u8])> {
    let [lo, hi, flags, k, rest @ ..] = input else {
        return None;
    };
    let k = usize::from(*k % 16);
    let sizes = rest.get(..k)?.iter().map(|&s| usize::from(s)).collect();
    let site = Site {
        max_connect_size: usize::from(u16::from_le_bytes([*lo, *hi])).max(MIN_CONNECT_SIZE),
        fallback: flags & 1 != 0,
        fallback_only: (flags & 2 != 0).then_some(FALLBACK_ONLY),
    };
    Some((site, sizes, &rest[k..]))
}

/// `mqtt::read_connect` over the device's reads: what it keeps and what it says.
fn check_reader(data: &[u8], sizes: &[usize], max: usize) {
    let mut device = Device::new(data, sizes);
    let mut buf = Vec::new();
    let result = {
        let read = pin!(read_connect(&mut device, &mut buf, max));
        match read.poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(result) => result,
            Poll::Pending => panic!("the reader waited, though every read is ready"),
        }
    };
    assert!(
        buf.len() <= max,
        "the reader kept {} bytes, over the limit {max}",
        buf.len()
    );
    assert_eq!(buf, data[..buf.len()], "the reader did not keep the bytes as they came");
    let all_at_once = parse_connect(data, max);
    match result {
        Ok(c) => {
            assert!(c.packet_len <= buf.len());
            assert_eq!(parse_connect(&buf[..c.packet_len], max), Ok(c.clone()));
            assert_eq!(all_at_once, Ok(c));
        }
        Err(ReadConnectError::Closed(n)) => {
            assert_eq!(n, data.len(), "closed before every byte was read");
            assert_eq!(all_at_once, Err(ConnectError::Incomplete));
        }
        Err(ReadConnectError::Parse(e)) => {
            let whole = all_at_once.expect_err("the parser accepts what the reader refused");
            assert_ne!(
                whole,
                ConnectError::Incomplete,
                "the reader refused a packet still arriving"
            );
            // A packet is refused as too large as soon as the part of its length that has arrived shows
            // it, which can be before the byte that makes the length malformed.
            let early = matches!(e, ConnectError::TooLarge { .. });
            assert!(
                early || discriminant(&e) == discriminant(&whole),
                "reader: {e:?}, parser: {whole:?}"
            );
        }
        Err(ReadConnectError::Io(e)) => panic!("the device cannot fail a read: {e}"),
    }
}

/// What the rules say happens to a device that sends `data` at `site`.
fn expected(site: Site, data: &[u8]) -> Outcome {
    let refused = |reason: &str, answer: Option<(ProtocolVersion, u8, u8)>| Outcome {
        to_device: answer
            .map(|(v, v3, v5)| {
                connack(v, if v == ProtocolVersion::V5 { v5 } else { v3 })
                    .as_bytes()
                    .to_vec()
            })
            .unwrap_or_default(),
        to_broker: Vec::new(),
        refused: Some(reason.to_string()),
    };
    if data.starts_with(&[0x16, 0x03]) {
        return refused("tls_on_plain_port", None);
    }
    match parse_connect(data, site.max_connect_size) {
        Ok(c) if c.client_id == OWNED => refused("client_id_spoofed", Some((c.version, 0x02, 0x87))),
        Ok(c) if !site.fallback || (site.fallback_only.is_some() && !c.client_id.starts_with(FALLBACK_PREFIX)) => {
            refused("unknown_device", Some((c.version, 0x02, 0x85)))
        }
        Ok(c) => Outcome {
            to_device: connack(c.version, 0).as_bytes().to_vec(),
            to_broker: data.to_vec(),
            refused: None,
        },
        // A CONNECT of another protocol name is closed unanswered: MQTT has nothing to tell it.
        Err(ConnectError::UnsupportedProtocol { answer_as, .. }) => {
            refused("unsupported_protocol", answer_as.map(|v| (v, 0x01, 0x84)))
        }
        Err(_) => refused("bad_connect", None),
    }
}
