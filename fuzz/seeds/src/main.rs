//! Writes the seed corpora of the fuzz targets into the directory given (one subdirectory per target):
//! real CONNECT packets of every protocol version, built by the integration tests' own MQTT codec
//! (`tests/it/common/codec.rs`, independent of mqtls's parser), and a few broken ones. Generated at each
//! fuzz run rather than committed, so the seeds follow the codec and nothing opaque is kept in the tree.
//!
//! The `connect` target reads a two-byte limit before the packet; `first_packet` reads a limit, site
//! flags and piece sizes, and gets what a device sends after its CONNECT too; `rewrite` reads a rules byte
//! and two source bytes (see each target's docs).

#[path = "../../../tests/it/common/codec.rs"]
#[allow(dead_code)]
mod codec;

use std::path::Path;
use std::{env, fs, io};

use codec::{packet, put_bin, varint, Connect, Version};

/// The limit the seeds are read under: mqtls's default `listen.max_connect_size` (16 KiB).
const MAX: u16 = 16 * 1024;

fn main() -> io::Result<()> {
    let out = env::args_os().nth(1).expect("usage: mqtls-fuzz-seeds OUT_DIR");
    let out = Path::new(&out);
    let seeds = seeds();
    for (name, version, bytes) in &seeds {
        write(&out.join("connect"), name, &[&MAX.to_le_bytes()[..], bytes].concat())?;
        // A fallback narrowed to sensor-* (site flags 3), and the bytes cut after 1, 7 and 30 bytes, then
        // what a device sends next.
        let header = [&MAX.to_le_bytes()[..], &[3, 3, 1, 7, 30]].concat();
        let next = [codec::publish(*version, "t/1", 1, 7, b"21.5"), codec::pingreq()].concat();
        write(&out.join("first_packet"), name, &[&header[..], bytes, &next].concat())?;
        // Rules byte 0x53: the client id `{cn}/{client_id}`, the user name and the password set; the
        // source 10.0.7.9.
        write(&out.join("rewrite"), name, &[&[0x53, 7, 9][..], bytes, &next].concat())?;
    }
    println!("{} seeds for each target in {}", seeds.len(), out.display());
    Ok(())
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    fs::write(dir.join(name), bytes)
}

/// (name, version of what follows, bytes).
fn seeds() -> Vec<(&'static str, Version, Vec<u8>)> {
    use Version::{V31, V311, V5};
    let mut properties = Vec::new();
    properties.extend_from_slice(&[0x11, 0, 0, 0x0E, 0x10]); // session expiry interval: 3600 s
    properties.extend_from_slice(&[0x21, 0, 20]); // receive maximum
    properties.push(0x26); // user property
    put_bin(&mut properties, b"site");
    put_bin(&mut properties, b"boiler-room");
    let mut with_properties = Connect::new(V5, "sensor-5p", 30);
    with_properties.properties = properties;
    let mut v311_level_9 = codec::connect(V311, "sensor-9", 60);
    v311_level_9[8] = 9;
    let mut v5_level_9 = codec::connect(V5, "sensor-9", 60);
    v5_level_9[8] = 9;
    let mut reserved_flag = codec::connect(V311, "sensor-r", 60);
    reserved_flag[9] |= 0x01;
    let truncated = codec::connect(V311, "sensor-truncated", 60);
    vec![
        ("v31", V31, codec::connect(V31, "sensor-31", 60)),
        ("v311", V311, codec::connect(V311, "sensor-311", 60)),
        ("v5", V5, codec::connect(V5, "sensor-5", 60)),
        ("v311-empty-id", V311, codec::connect(V311, "", 0)),
        ("v311-owned-id", V311, codec::connect(V311, "boiler-1", 60)),
        (
            "v31-login",
            V31,
            Connect::new(V31, "sensor-31l", 60).login("user", b"secret").encode(),
        ),
        (
            "v311-login",
            V311,
            Connect::new(V311, "sensor-311l", 60).login("user", b"secret").encode(),
        ),
        (
            "v5-login",
            V5,
            Connect::new(V5, "sensor-5l", 60).login("user", b"secret").encode(),
        ),
        ("v5-properties", V5, with_properties.encode()),
        ("v31-will", V31, with_will(V31, "sensor-31w", &[])),
        ("v311-will", V311, with_will(V311, "sensor-311w", &[])),
        ("v5-will", V5, with_will(V5, "sensor-5w", &[0x18, 0, 0, 0, 10, 0x01, 1])),
        ("v311-long-id", V311, codec::connect(V311, &"x".repeat(300), 60)),
        ("bad-v311-level-9", V311, v311_level_9),
        ("bad-v5-level-9", V5, v5_level_9),
        ("bad-nul-in-id", V311, codec::connect(V311, "sensor\0nul", 60)),
        ("bad-utf8-id", V311, raw_id(&[b's', 0xC3, 0x28])),
        ("bad-reserved-flag", V311, reserved_flag),
        ("bad-truncated", V311, truncated[..truncated.len() - 3].to_vec()),
        ("bad-five-byte-length", V311, vec![0x10, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F]),
        ("bad-over-limit", V311, [&[0x10][..], &varint(100_000)].concat()),
        (
            "bad-tls-client-hello",
            V311,
            vec![0x16, 0x03, 0x01, 0x00, 0x2A, 0x01, 0x00, 0x00, 0x26, 0x03, 0x03],
        ),
        ("bad-http", V311, b"GET / HTTP/1.1\r\nHost: gateway\r\n\r\n".to_vec()),
    ]
}

/// A CONNECT with a will (QoS 1, retained; `will_properties` for 5.0) and a login, laid out as the spec
/// says, with the codec's pieces.
fn with_will(version: Version, client_id: &str, will_properties: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    let (name, level): (&[u8], u8) = match version {
        Version::V31 => (b"MQIsdp", 3),
        Version::V311 => (b"MQTT", 4),
        Version::V5 => (b"MQTT", 5),
    };
    put_bin(&mut body, name);
    body.push(level);
    body.push(0x80 | 0x40 | 0x20 | 0x08 | 0x04 | 0x02); // username, password, will retain, QoS 1, will, clean
    body.extend_from_slice(&60u16.to_be_bytes());
    if version == Version::V5 {
        body.push(0); // no CONNECT properties
    }
    put_bin(&mut body, client_id.as_bytes());
    if version == Version::V5 {
        body.extend_from_slice(&varint(will_properties.len()));
        body.extend_from_slice(will_properties);
    }
    put_bin(&mut body, b"status/offline");
    put_bin(&mut body, b"gone");
    put_bin(&mut body, b"user");
    put_bin(&mut body, b"secret");
    packet(0x10, &body)
}

/// A 3.1.1 CONNECT whose client id is `id`, bytes that need not be UTF-8.
fn raw_id(id: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    put_bin(&mut body, b"MQTT");
    body.extend_from_slice(&[4, 0x02, 0, 60]);
    put_bin(&mut body, id);
    packet(0x10, &body)
}
