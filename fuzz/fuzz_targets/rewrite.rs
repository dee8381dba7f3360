//! Feeds arbitrary bytes, as a device's first bytes, through the CONNECT reader and then a rewrite with
//! rules picked by the input: the rewrite must never panic, and what it produces must parse back into the
//! fields of the original with only the rewritten ones changed, followed by the bytes that came after the
//! CONNECT, unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mqtls::mqtt::{parse_connect, ConnectView, ProtocolVersion};
use mqtls::rewrite::{rewrite, Change, Context, Rewrite, Secret, Template};

const CLIENT_IDS: [&str; 6] = ["{name}", "{client_id}", "esp-{source}", "{cn}/{client_id}", "x{client_id}", ""];
const USERNAMES: [&str; 3] = ["hub/{cn}/?api-version=1", "", "{client_id}{client_id}"];

/// Rules from one byte: the client id template (or none), what happens to the user name and to the password.
fn rules(b: u8) -> Rewrite {
    let client_id = match usize::from(b & 0x07) {
        i if i < CLIENT_IDS.len() => Some(Template::parse(CLIENT_IDS[i]).unwrap()),
        _ => None,
    };
    let username = match (b >> 3) & 0x03 {
        0 => Change::Keep,
        1 => Change::Drop,
        n => Change::Set(Template::parse(USERNAMES[usize::from(n - 2 + (b >> 7))]).unwrap()),
    };
    let password = match (b >> 5) & 0x03 {
        0 => Change::Keep,
        1 => Change::Drop,
        _ => Change::Set(Secret::new(b"from-file".to_vec())),
    };
    Rewrite {
        client_id,
        username,
        password,
    }
}

fuzz_target!(|data: &[u8]| {
    let [r, a, b, bytes @ ..] = data else {
        return;
    };
    let Ok(connect) = parse_connect(bytes, 1 << 20) else {
        return;
    };
    let rules = rules(*r);
    let ctx = Context {
        name: "device",
        cn: Some("device.example"),
        source: if a & 1 == 0 {
            std::net::IpAddr::from([10, 0, *a, *b])
        } else {
            std::net::IpAddr::from([0xfd00, 0, 0, 0, 0, 0, u16::from(*a), u16::from(*b)])
        },
    };
    let Ok(out) = rewrite(bytes.to_vec(), &connect, &rules, &ctx) else {
        return;
    };
    let (original, _) = ConnectView::parse(bytes, 1 << 20).unwrap();
    let (back, len) = ConnectView::parse(&out.bytes, usize::MAX).expect("a rewritten CONNECT parses");
    assert_eq!(&out.bytes[len..], &bytes[connect.packet_len..], "the bytes after the CONNECT");
    let kept = ConnectView {
        client_id: back.client_id,
        username: back.username,
        password: back.password,
        ..original.clone()
    };
    assert_eq!(back, kept, "only the rewritten fields change");
    match &rules.client_id {
        Some(t) => assert_eq!(back.client_id, t.expand(&ctx, original.client_id)),
        None => assert_eq!(back.client_id, original.client_id),
    }
    if rules.password == Change::Drop {
        assert_eq!(back.password, None);
    }
    if back.version != ProtocolVersion::V5 && back.username.is_none() {
        assert_eq!(back.password, None);
    }
    if back == original {
        assert_eq!(out.bytes, bytes);
    }
});
