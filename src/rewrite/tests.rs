//! The rewrite against the reader: what a rewrite changes, what it keeps byte for byte, and what it refuses.

use std::net::IpAddr;

use proptest::prelude::*;

use super::*;
use crate::mqtt::arb::Fields;
use crate::mqtt::parse_connect;

const MAX: usize = 1 << 20;
const PUBLISH: [u8; 9] = [0x30, 0x07, 0x00, 0x01, b't', b'h', b'e', b'l', b'o'];

fn ctx() -> Context<'static> {
    Context {
        name: "esp-a",
        cn: Some("esp-a.plant-7"),
        source: IpAddr::from([192, 168, 10, 31]),
    }
}

fn rules(client_id: Option<&str>, username: Change<&str>, password: Change<&[u8]>) -> Rewrite {
    Rewrite {
        client_id: client_id.map(|t| Template::parse(t).unwrap()),
        username: match username {
            Change::Keep => Change::Keep,
            Change::Drop => Change::Drop,
            Change::Set(t) => Change::Set(Template::parse(t).unwrap()),
        },
        password: match password {
            Change::Keep => Change::Keep,
            Change::Drop => Change::Drop,
            Change::Set(p) => Change::Set(Secret::new(p.to_vec())),
        },
    }
}

fn view(version: ProtocolVersion, client_id: &str) -> ConnectView<'_> {
    ConnectView {
        version,
        clean_start: true,
        keep_alive: 60,
        properties: &[],
        client_id,
        will: None,
        username: None,
        password: None,
    }
}

fn bytes_of(v: &ConnectView<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    v.encode(&mut out).unwrap();
    out
}

/// Rewrites `packet` followed by `after` under `rules`.
fn apply(packet: &[u8], after: &[u8], rules: &Rewrite) -> Result<Rewritten, RewriteError> {
    let connect = parse_connect(packet, MAX).unwrap();
    rewrite([packet, after].concat(), &connect, rules, &ctx())
}

#[test]
fn a_shared_client_id_becomes_the_devices_own_and_what_follows_is_kept() {
    let packet = bytes_of(&view(ProtocolVersion::V311, "ESP8266Client"));
    let out = apply(&packet, &PUBLISH, &rules(Some("{name}"), Change::Keep, Change::Keep)).unwrap();
    assert_eq!(out.client_id.as_deref(), Some("esp-a"));
    let (back, len) = ConnectView::parse(&out.bytes, MAX).unwrap();
    assert_eq!(back, view(ProtocolVersion::V311, "esp-a"));
    assert_eq!(&out.bytes[len..], PUBLISH, "the bytes after the CONNECT, unchanged");
}

#[test]
fn an_empty_client_id_with_a_clean_session_gets_one() {
    let packet = bytes_of(&view(ProtocolVersion::V311, ""));
    let out = apply(
        &packet,
        &[],
        &rules(Some("sensor-{source}"), Change::Keep, Change::Keep),
    )
    .unwrap();
    assert_eq!(out.client_id.as_deref(), Some("sensor-192.168.10.31"));
    assert_eq!(
        parse_connect(&out.bytes, MAX).unwrap().client_id,
        "sensor-192.168.10.31"
    );
}

#[test]
fn every_placeholder_reaches_the_packet() {
    let packet = bytes_of(&view(ProtocolVersion::V5, "dev"));
    let r = rules(
        Some("{name}|{cn}|{client_id}|{source}"),
        Change::Set("hub.example/{cn}/?api-version=2021-04-12"),
        Change::Keep,
    );
    let out = apply(&packet, &[], &r).unwrap();
    let (back, _) = ConnectView::parse(&out.bytes, MAX).unwrap();
    assert_eq!(back.client_id, "esp-a|esp-a.plant-7|dev|192.168.10.31");
    assert_eq!(back.username, Some("hub.example/esp-a.plant-7/?api-version=2021-04-12"));
}

#[test]
fn a_dropped_password_never_reaches_the_bytes() {
    for version in [ProtocolVersion::V31, ProtocolVersion::V311, ProtocolVersion::V5] {
        let mut v = view(version, "boiler-1");
        v.username = Some("admin");
        v.password = Some(b"hunter2-legacy");
        let out = apply(&bytes_of(&v), &PUBLISH, &rules(None, Change::Keep, Change::Drop)).unwrap();
        assert!(!out.bytes.windows(7).any(|w| w == b"hunter2"), "{version}");
        let (back, len) = ConnectView::parse(&out.bytes, MAX).unwrap();
        assert_eq!((back.username, back.password), (Some("admin"), None));
        assert_eq!(out.client_id, None, "the client id is the device's");
        assert_eq!(&out.bytes[len..], PUBLISH);
    }
}

#[test]
fn before_5_a_dropped_user_name_takes_the_password_with_it() {
    let mut v = view(ProtocolVersion::V311, "boiler-1");
    v.username = Some("admin");
    v.password = Some(b"pw");
    let out = apply(&bytes_of(&v), &[], &rules(None, Change::Drop, Change::Keep)).unwrap();
    let (back, _) = ConnectView::parse(&out.bytes, MAX).unwrap();
    assert_eq!((back.username, back.password), (None, None));
    // 5.0 allows a password alone.
    v.version = ProtocolVersion::V5;
    let out = apply(&bytes_of(&v), &[], &rules(None, Change::Drop, Change::Keep)).unwrap();
    let (back, _) = ConnectView::parse(&out.bytes, MAX).unwrap();
    assert_eq!((back.username, back.password), (None, Some(&b"pw"[..])));
}

#[test]
fn a_password_from_a_file_needs_a_user_name_before_5() {
    let r = rules(None, Change::Keep, Change::Set(b"from-file"));
    let v = view(ProtocolVersion::V311, "boiler-1");
    assert_eq!(
        apply(&bytes_of(&v), &[], &r),
        Err(RewriteError::PasswordNeedsUsername(ProtocolVersion::V311))
    );
    let r = rules(None, Change::Set("{name}"), Change::Set(b"from-file"));
    let out = apply(&bytes_of(&v), &[], &r).unwrap();
    let (back, _) = ConnectView::parse(&out.bytes, MAX).unwrap();
    assert_eq!((back.username, back.password), (Some("esp-a"), Some(&b"from-file"[..])));
    let v5 = view(ProtocolVersion::V5, "boiler-1");
    let r = rules(None, Change::Keep, Change::Set(b"from-file"));
    let out = apply(&bytes_of(&v5), &[], &r).unwrap();
    let (back, _) = ConnectView::parse(&out.bytes, MAX).unwrap();
    assert_eq!((back.username, back.password), (None, Some(&b"from-file"[..])));
}

#[test]
fn rules_that_change_nothing_in_this_packet_forward_it_as_it_came() {
    // A non-minimal remaining length would not survive a re-encoding: it must not be re-encoded.
    let mut packet = bytes_of(&view(ProtocolVersion::V311, "boiler-1"));
    packet.splice(1..2, [packet[1] | 0x80, 0x00]);
    let first = [&packet[..], &PUBLISH].concat();
    let connect = parse_connect(&first, MAX).unwrap();
    for r in [
        rules(None, Change::Drop, Change::Drop),
        rules(Some("{client_id}"), Change::Keep, Change::Keep),
        rules(Some("{name}"), Change::Keep, Change::Keep),
    ] {
        let mut c = ctx();
        c.name = "boiler-1";
        let out = rewrite(first.clone(), &connect, &r, &c).unwrap();
        assert_eq!(out.bytes, first, "{r:?}");
        assert_eq!(out.client_id, None);
    }
}

#[test]
fn a_client_id_that_cannot_be_presented_is_refused() {
    let r = |t: &str| rules(Some(t), Change::Keep, Change::Keep);
    let packet = |version, id| bytes_of(&view(version, id));
    let id_error = |res: Result<Rewritten, RewriteError>| match res {
        Err(RewriteError::ClientId { reason, .. }) => reason,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        id_error(apply(
            &packet(ProtocolVersion::V311, ""),
            &[],
            &r("{client_id}{client_id}")
        )),
        InvalidClientId::Empty
    );
    assert_eq!(
        id_error(apply(&packet(ProtocolVersion::V5, "a\u{1}"), &[], &r("x-{client_id}"))),
        InvalidClientId::Character('\u{1}')
    );
    assert_eq!(
        id_error(apply(&packet(ProtocolVersion::V31, "x"), &[], &r("{cn}-{source}"))),
        InvalidClientId::TooLongFor31(27)
    );
    assert!(apply(&packet(ProtocolVersion::V311, "x"), &[], &r("{cn}-{source}")).is_ok());
    let long = "x".repeat(40_000);
    assert_eq!(
        id_error(apply(
            &packet(ProtocolVersion::V5, &long),
            &[],
            &r("{client_id}{client_id}")
        )),
        InvalidClientId::TooLong(80_000)
    );
    let err = apply(&packet(ProtocolVersion::V311, ""), &[], &r("{client_id}{client_id}")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "connect.client_id gives the client id \"\", which is empty"
    );
}

#[test]
fn bytes_that_are_not_the_connect_read_are_refused_not_trusted() {
    let packet = bytes_of(&view(ProtocolVersion::V311, "boiler-1"));
    let connect = parse_connect(&packet, MAX).unwrap();
    let r = rules(Some("{name}"), Change::Keep, Change::Keep);
    let short = packet[..packet.len() - 1].to_vec();
    assert!(matches!(
        rewrite(short, &connect, &r, &ctx()),
        Err(RewriteError::NotTheConnect(_))
    ));
}

#[test]
fn client_id_rules() {
    assert!(check_client_id("boiler-1", None).is_ok());
    assert!(check_client_id("kitchen/ø-スマート", None).is_ok());
    assert_eq!(
        check_client_id("a\u{7F}", None),
        Err(InvalidClientId::Character('\u{7F}'))
    );
    assert_eq!(
        check_client_id("a\u{FFFE}", None),
        Err(InvalidClientId::Character('\u{FFFE}'))
    );
    assert_eq!(check_client_id(&"x".repeat(24), None), Ok(()));
    assert_eq!(
        check_client_id(&"x".repeat(24), Some(ProtocolVersion::V31)),
        Err(InvalidClientId::TooLongFor31(24))
    );
    assert_eq!(check_username(""), Ok(()));
    assert_eq!(check_username("a\0"), Err(InvalidUsername::Character('\0')));
}

// --- property tests ---

/// MQTT 5 properties as a device might send them: session expiry, receive maximum, user properties,
/// authentication method and data, in any order.
fn arb_properties() -> impl Strategy<Value = Vec<u8>> {
    let one = prop_oneof![
        any::<u32>().prop_map(|v| [&[0x11][..], &v.to_be_bytes()].concat()),
        any::<u16>().prop_map(|v| [&[0x21][..], &v.to_be_bytes()].concat()),
        ("[a-z]{0,8}", "[a-z0-9]{0,8}").prop_map(|(k, v)| {
            let mut p = vec![0x26];
            p.extend_from_slice(&(k.len() as u16).to_be_bytes());
            p.extend_from_slice(k.as_bytes());
            p.extend_from_slice(&(v.len() as u16).to_be_bytes());
            p.extend_from_slice(v.as_bytes());
            p
        }),
        proptest::collection::vec(any::<u8>(), 0..16).prop_map(|d| {
            let mut p = vec![0x15, 0, 5];
            p.extend_from_slice(b"SCRAM");
            p.push(0x16);
            p.extend_from_slice(&(d.len() as u16).to_be_bytes());
            p.extend_from_slice(&d);
            p
        }),
    ];
    proptest::collection::vec(one, 0..5).prop_map(|ps| ps.concat())
}

fn arb_fields() -> impl Strategy<Value = Fields> {
    crate::mqtt::arb::arb_fields(arb_properties().boxed())
}

fn arb_rules() -> impl Strategy<Value = Rewrite> {
    let client_id = proptest::option::of(prop_oneof![
        Just("{name}"),
        Just("{client_id}"),
        Just("esp-{source}"),
        Just("{cn}/{client_id}"),
        Just("x{client_id}"),
    ]);
    let username = prop_oneof![
        Just(Change::Keep),
        Just(Change::Drop),
        Just(Change::Set("hub/{cn}/?api-version=1")),
        Just(Change::Set("")),
    ];
    let password = prop_oneof![
        Just(Change::Keep),
        Just(Change::Drop),
        Just(Change::Set(&b"from-file"[..])),
    ];
    (client_id, username, password).prop_map(|(c, u, p)| rules(c, u, p))
}

proptest! {
    #[test]
    fn prop_a_rewrite_keeps_every_field_but_the_rewritten_ones(
        f in arb_fields(),
        r in arb_rules(),
        after in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let original = f.view();
        let packet = bytes_of(&original);
        let first = [&packet[..], &after].concat();
        let connect = parse_connect(&first, MAX).unwrap();
        let c = ctx();
        let out = match rewrite(first.clone(), &connect, &r, &c) {
            Ok(out) => out,
            Err(RewriteError::ClientId { reason, .. }) => {
                let id = r.client_id.as_ref().unwrap().expand(&c, original.client_id);
                prop_assert_eq!(check_client_id(&id, Some(original.version)), Err(reason));
                return Ok(());
            }
            Err(RewriteError::PasswordNeedsUsername(v)) => {
                prop_assert!(v != ProtocolVersion::V5);
                prop_assert!(matches!(r.password, Change::Set(_)));
                prop_assert!(r.username == Change::Drop || (r.username == Change::Keep && original.username.is_none()));
                return Ok(());
            }
            Err(e) => return Err(TestCaseError::fail(format!("{e}"))),
        };
        let (back, len) = ConnectView::parse(&out.bytes, MAX).unwrap();
        prop_assert_eq!(&out.bytes[len..], &after[..], "what followed the CONNECT");

        // The rewritten fields are what the rules say.
        let want_id = match &r.client_id {
            Some(t) => t.expand(&c, original.client_id),
            None => original.client_id.to_string(),
        };
        prop_assert_eq!(back.client_id, want_id.as_str());
        let presented = out.client_id.as_deref().unwrap_or(original.client_id);
        prop_assert_eq!(presented, want_id.as_str());
        let want_user = match &r.username {
            Change::Keep => original.username.map(str::to_string),
            Change::Drop => None,
            Change::Set(t) => Some(t.expand(&c, original.client_id)),
        };
        prop_assert_eq!(back.username.map(str::to_string), want_user);
        let want_password = match &r.password {
            Change::Keep => original.password,
            Change::Drop => None,
            Change::Set(_) => Some(&b"from-file"[..]),
        };
        let dropped_with_user = original.version != ProtocolVersion::V5 && back.username.is_none();
        prop_assert_eq!(back.password, if dropped_with_user { None } else { want_password });

        // Every other field is as the device sent it.
        let kept = ConnectView {
            client_id: back.client_id,
            username: back.username,
            password: back.password,
            ..original.clone()
        };
        prop_assert_eq!(&back, &kept);
        // Unchanged fields, unchanged bytes.
        if back == original {
            prop_assert_eq!(out.bytes, first);
        }
    }

    #[test]
    fn prop_no_rewrite_rules_never_change_a_byte(
        f in arb_fields(),
        after in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let first = [bytes_of(&f.view()), after].concat();
        let connect = parse_connect(&first, MAX).unwrap();
        let r = rules(Some("{client_id}"), Change::Keep, Change::Keep);
        let out = rewrite(first.clone(), &connect, &r, &ctx()).unwrap();
        prop_assert_eq!(out, Rewritten { bytes: first, client_id: None });
    }
}
