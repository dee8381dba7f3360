//! One connection's first bytes as the proxy sees them, for the fuzz targets in `fuzz/`.
//!
//! A fuzzer that only calls the CONNECT parser cannot find what goes wrong around it: bytes after the
//! CONNECT lost or reordered, a verdict that depends on how the bytes were split into reads, a refusal
//! answered in the wrong version. So [`connect`] runs the code a real connection runs, from the first read
//! to the end of the copy (CONNECT reader, refusal and its answer, device lookup, session start, copy),
//! over a [`Device`] that sends its bytes in the pieces the fuzzer chose, and says what the device was
//! told, what reached the broker and which refusal was counted.
//!
//! Built for the unit tests and with the `fuzzing` feature only: no part of mqtls's API. The broker is a
//! stand-in that takes every byte and answers an accepting CONNACK in the device's version. The device
//! table holds [`OWNED`], a client id whose device connects from another address than the one the fuzzed
//! device comes from (so a CONNECT naming it is a forged one), and, when the [`Site`] asks, a fallback
//! that serves every other client id, or those its pattern names.

use std::cell::Cell;
use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

use super::admission::{Admission, Admitted};
use super::connection::Connection;
use super::Generation;
use crate::config::{Config, Listen};
use crate::device::{Device as Entry, DeviceTable, Rules};
use crate::metrics::Metrics;
use crate::mqtt::{connack, parse_connect};
use crate::refusal::log_budget::WINDOW;
use crate::rules::Pattern;
use crate::tls::Identity;
use crate::upstream::{Broker, ConnectError, Connected};

/// The client id that belongs to a device connecting from another address than the fuzzed device's.
pub const OWNED: &str = "boiler-1";

const LISTENER: &str = "127.0.0.1:1883";
const PEER: &str = "10.0.0.9:40000";
const OWNER_SOURCE: &str = "192.168.10.21";

/// What the gateway is configured with.
#[derive(Debug, Clone, Copy)]
pub struct Site {
    /// `listen.max_connect_size`.
    pub max_connect_size: usize,
    /// Whether a `[fallback]` serves the client ids no device owns.
    pub fallback: bool,
    /// The `fallback.client_id` pattern that narrows the fallback, if any.
    pub fallback_only: Option<&'static str>,
}

/// What happened to one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Every byte the device was sent (a CONNACK, mqtls's or the broker's, or nothing).
    pub to_device: Vec<u8>,
    /// Every byte the broker was sent; empty when the broker was never reached.
    pub to_broker: Vec<u8>,
    /// The `reason` label of the refusal counted, if the connection was refused.
    pub refused: Option<String>,
}

/// The device's end of a connection: it sends its bytes in the given pieces, one per read, then closes
/// its side, and keeps what it is sent.
#[derive(Debug)]
pub struct Device {
    pieces: VecDeque<Vec<u8>>,
    received: Vec<u8>,
}

impl Device {
    /// A device that sends `data` cut into pieces of `sizes` bytes, in turn, and the rest as the last
    /// piece. Sizes of 0 are skipped (a read of no bytes would be the end of the stream).
    pub fn new(data: &[u8], sizes: &[usize]) -> Device {
        let mut rest = data;
        let mut pieces = VecDeque::new();
        for &size in sizes {
            let (piece, tail) = rest.split_at(size.min(rest.len()));
            if !piece.is_empty() {
                pieces.push_back(piece.to_vec());
            }
            rest = tail;
        }
        if !rest.is_empty() {
            pieces.push_back(rest.to_vec());
        }
        Device {
            pieces,
            received: Vec::new(),
        }
    }
}

impl AsyncRead for Device {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if let Some(mut piece) = self.pieces.pop_front() {
            let n = piece.len().min(buf.remaining());
            buf.put_slice(&piece[..n]);
            if n < piece.len() {
                piece.drain(..n);
                self.pieces.push_front(piece);
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Device {
    fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        self.received.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Serves `device`'s connection from its first byte to its end, at a gateway configured as `site`.
pub fn connect(site: Site, mut device: Device) -> Outcome {
    let received = Arc::new(Mutex::new(Vec::new()));
    let generation = Arc::new(generation(site, StandIn(received.clone())));
    let metrics = metrics();
    let peer: SocketAddr = PEER.parse().expect("an address");
    let Admitted::Serve(permit, slot) = Admission::new(1).admit(peer.ip(), &generation.listen, Instant::now()) else {
        unreachable!("the first connection of a fresh admission is served")
    };
    let connection = Box::new(Connection {
        listener: LISTENER.parse().expect("an address"),
        peer,
        generation,
        metrics: metrics.clone(),
        slot,
        _permit: permit,
        device: &mut device,
    });
    let reasons = Arc::new(Reasons::default());
    tracing::subscriber::with_default(reasons.clone(), || runtime().block_on(connection.serve()));
    // The proxy drains histogram samples every few seconds; a million connections a minute must too.
    metrics.upkeep();
    let refused = reasons.0.lock().unwrap_or_else(|e| e.into_inner()).first().cloned();
    let to_broker = std::mem::take(&mut *received.lock().unwrap_or_else(|e| e.into_inner()));
    Outcome {
        to_device: device.received,
        to_broker,
        refused,
    }
}

/// One set of metrics per thread, made once (making one costs more than serving a connection), with a
/// log window of its own for each connection: the refusal log budget would otherwise hold back the lines
/// that say which refusal was counted. Histogram samples left in metrics that are dropped are never
/// freed (metrics-util's bucket has no `Drop`), one more reason to keep them.
fn metrics() -> Arc<Metrics> {
    thread_local! {
        static METRICS: (Arc<Metrics>, Instant, Cell<u32>) = (Arc::new(Metrics::new(true)), Instant::now(), Cell::new(0));
    }
    METRICS.with(|(metrics, start, windows)| {
        windows.set(windows.get() + 1);
        metrics.refusal_logs().roll(*start + WINDOW * windows.get());
        metrics.clone()
    })
}

/// One runtime per thread, made once: a fuzzer runs millions of connections.
fn runtime() -> &'static tokio::runtime::Runtime {
    thread_local! {
        static RUNTIME: &'static tokio::runtime::Runtime = Box::leak(Box::new(
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("a runtime"),
        ));
    }
    RUNTIME.with(|r| *r)
}

/// The generation `site` describes, reaching the broker through `broker`.
fn generation(site: Site, broker: StandIn) -> Generation<StandIn> {
    static PARTS: OnceLock<(Listen, Identity)> = OnceLock::new();
    let (listen, identity) = PARTS.get_or_init(|| {
        let toml = format!("[listen]\naddress = \"{LISTENER}\"\n[upstream]\naddress = \"broker.invalid:8883\"\n[fallback]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n");
        let config = Config::from_toml(&toml, Path::new("/nonexistent/mqtls.toml")).expect("a valid configuration");
        (config.listen, Identity::in_memory("fuzzing"))
    });
    let listener = LISTENER.parse().expect("an address");
    let owner = Entry {
        name: OWNED.into(),
        rules: Rules {
            client_id: Some(OWNED.into()),
            client_id_patterns: Vec::new(),
            sources: vec![crate::config::parse_net(OWNER_SOURCE).expect("a network")],
            listeners: vec![listener],
        },
        identity: identity.clone(),
        rewrite: None,
        presents: None,
    };
    let fallback = site.fallback.then(|| Entry {
        name: "fallback".into(),
        rules: Rules {
            client_id: None,
            client_id_patterns: site
                .fallback_only
                .iter()
                .map(|p| Pattern::new(p).expect("a pattern"))
                .collect(),
            sources: Vec::new(),
            listeners: vec![listener],
        },
        identity: identity.clone(),
        rewrite: None,
        presents: None,
    });
    let mut listen = listen.clone();
    listen.max_connect_size = site.max_connect_size;
    Generation {
        table: DeviceTable::of(vec![owner], fallback),
        broker,
        listen,
        retire: None,
        renewals: Default::default(),
    }
}

/// A broker that takes every byte into the shared buffer and accepts every session: its CONNACK, in the
/// version of the CONNECT it was sent, has code 0 and no properties.
struct StandIn(Arc<Mutex<Vec<u8>>>);

struct Session {
    received: Arc<Mutex<Vec<u8>>>,
    /// How much of its CONNACK it has sent.
    answered: usize,
}

impl Broker for StandIn {
    type Stream = Session;

    async fn connect(&self, _: &Identity, from: usize) -> Result<Connected<Session>, ConnectError> {
        let stream = Session {
            received: self.0.clone(),
            answered: 0,
        };
        Ok(Connected {
            stream,
            failed: Vec::new(),
            address: from,
        })
    }

    fn answer_timeout(&self) -> Duration {
        Duration::from_secs(10)
    }

    fn refused_session(&self, _: &io::Error) -> bool {
        false
    }

    fn addresses(&self) -> usize {
        1
    }

    fn unavailable(&self, _: usize, _: &str) {}
}

impl AsyncRead for Session {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        // The connection reads only once it has passed on the device's CONNECT.
        let version = parse_connect(&self.received.lock().unwrap_or_else(|e| e.into_inner()), usize::MAX)
            .map(|c| c.version)
            .map_err(|e| io::Error::other(format!("the broker was sent no CONNECT: {e}")))?;
        let connack = connack(version, 0);
        let rest = &connack.as_bytes()[self.answered..];
        let n = rest.len().min(buf.remaining());
        buf.put_slice(&rest[..n]);
        self.answered += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Session {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        self.received
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Collects the `reason` field of every event: the refusal's log line carries the same label as its
/// counter. Cheaper than rendering the metrics, which reads `/proc` too.
#[derive(Default)]
struct Reasons(Mutex<Vec<String>>);

impl Visit for &Reasons {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "reason" {
            self.0.lock().unwrap_or_else(|e| e.into_inner()).push(value.to_string());
        }
    }

    fn record_debug(&mut self, _: &Field, _: &dyn std::fmt::Debug) {}
}

impl Subscriber for Reasons {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.is_event()
    }

    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        event.record(&mut &*self);
    }

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    const SITE: Site = Site {
        max_connect_size: 4096,
        fallback: true,
        fallback_only: None,
    };

    /// A 3.1.1 CONNECT with a clean session, keep-alive 60 and `client_id`.
    fn connect_packet(client_id: &str) -> Vec<u8> {
        let mut packet = vec![
            0x10,
            (12 + client_id.len()) as u8,
            0,
            4,
            b'M',
            b'Q',
            b'T',
            b'T',
            4,
            0x02,
            0,
            60,
        ];
        packet.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
        packet.extend_from_slice(client_id.as_bytes());
        packet
    }

    #[test]
    fn a_served_device_reaches_the_broker_whole_whatever_its_pieces() {
        let mut data = connect_packet("sensor-7");
        data.extend_from_slice(&[0x30, 0x03, 0x00, 0x01, b't', 0xC0, 0x00]);
        let whole = connect(SITE, Device::new(&data, &[]));
        assert_eq!(whole.to_broker, data);
        assert_eq!(whole.to_device, [0x20, 0x02, 0x00, 0x00]);
        assert_eq!(whole.refused, None);
        let byte_by_byte = connect(SITE, Device::new(&data, &vec![1; data.len()]));
        assert_eq!(byte_by_byte, whole);
    }

    #[test]
    fn a_forged_client_id_is_refused_and_an_unknown_one_without_a_fallback() {
        let forged = connect(SITE, Device::new(&connect_packet(OWNED), &[]));
        assert_eq!(forged.refused.as_deref(), Some("client_id_spoofed"));
        assert_eq!(forged.to_device, [0x20, 0x02, 0x00, 0x02]);
        assert!(forged.to_broker.is_empty());
        let site = Site {
            fallback: false,
            ..SITE
        };
        let unknown = connect(site, Device::new(&connect_packet("sensor-7"), &[]));
        assert_eq!(unknown.refused.as_deref(), Some("unknown_device"));
    }

    #[test]
    fn a_tls_client_hello_is_told_apart_from_a_bad_packet() {
        let hello = [0x16, 0x03, 0x01, 0x00, 0x05, 0x01, 0x00, 0x00, 0x01, 0x03];
        let outcome = connect(SITE, Device::new(&hello, &[]));
        assert_eq!(outcome.refused.as_deref(), Some("tls_on_plain_port"));
        assert!(outcome.to_device.is_empty() && outcome.to_broker.is_empty());
        let http = connect(SITE, Device::new(b"GET / HTTP/1.1\r\n\r\n", &[]));
        assert_eq!(http.refused.as_deref(), Some("bad_connect"));
    }

    /// Found by the fuzzer: a ClientHello whose first byte came alone was counted as a bad packet, because
    /// the reader stops at a wrong first byte and one byte is not yet a TLS record's start.
    #[test]
    fn a_client_hello_whose_first_byte_comes_alone_is_still_told_apart() {
        let hello = [0x16, 0x03, 0x01, 0x00, 0x05, 0x01, 0x00, 0x00, 0x01, 0x03];
        let outcome = connect(SITE, Device::new(&hello, &[1]));
        assert_eq!(outcome.refused.as_deref(), Some("tls_on_plain_port"));
        let lone = connect(SITE, Device::new(&[0x16], &[]));
        assert_eq!(
            lone.refused.as_deref(),
            Some("bad_connect"),
            "one byte and the end: not a TLS record"
        );
    }

    #[test]
    fn a_narrowed_fallback_serves_only_the_client_ids_it_names() {
        let site = Site {
            fallback_only: Some("sensor-*"),
            ..SITE
        };
        let served = connect(site, Device::new(&connect_packet("sensor-7"), &[]));
        assert_eq!(served.refused, None);
        let other = connect(site, Device::new(&connect_packet("camera-2"), &[]));
        assert_eq!(other.refused.as_deref(), Some("unknown_device"));
    }
}
