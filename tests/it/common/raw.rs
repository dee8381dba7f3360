//! A raw-socket "device", for tests where the exact bytes on the wire matter: packets from [`codec`]
//! (re-exported here, so that a test needs one import) are written to a plain TCP socket, and the answers
//! (CONNACK, PUBACK, PINGRESP) are read back under deadlines so that a missing answer fails the test
//! instead of hanging it.
//!
//! [`codec`]: super::codec

use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};

pub use super::codec::{
    connect, disconnect, parse_connack, parse_puback, pingreq, publish, Connack, Connect, Packet, Version,
};
use super::codec::{fixed_header, parse_pingresp};

/// Reads one whole packet before `deadline`. `Err` describes a timeout, an end of stream or an I/O
/// error, with whatever had been read.
pub async fn read_packet<R: AsyncRead + Unpin>(r: &mut R, deadline: Instant) -> Result<Packet, String> {
    let read = async {
        let mut head = vec![r.read_u8().await?];
        let remaining = loop {
            head.push(r.read_u8().await?);
            match fixed_header(&head) {
                Ok(Some((_, remaining))) => break remaining,
                Ok(None) => {}
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            }
        };
        let mut body = vec![0; remaining];
        r.read_exact(&mut body).await?;
        Ok(Packet {
            first_byte: head[0],
            body,
        })
    };
    match timeout_at(deadline, read).await {
        Ok(Ok(p)) => Ok(p),
        Ok(Err(e)) => Err(format!("reading a packet failed: {e} ({:?})", e.kind())),
        Err(_) => Err("no complete packet before the deadline".to_string()),
    }
}

/// A plain-TCP device socket to `addr`, with Nagle off so that every write leaves at once.
pub async fn device(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    s.set_nodelay(true).expect("TCP_NODELAY");
    s
}

/// Reads the next packet and parses it as a CONNACK; panics (with what arrived) otherwise.
pub async fn expect_connack(s: &mut TcpStream, version: Version, within: Duration) -> Connack {
    let p = read_packet(s, Instant::now() + within)
        .await
        .unwrap_or_else(|e| panic!("waiting for CONNACK: {e}"));
    parse_connack(&p, version).unwrap_or_else(|e| panic!("{e}"))
}

/// Sends a PINGREQ and waits for the PINGRESP; `Err` says what happened instead.
pub async fn ping(s: &mut TcpStream, within: Duration) -> Result<(), String> {
    s.write_all(&pingreq())
        .await
        .map_err(|e| format!("writing PINGREQ: {e}"))?;
    let p = read_packet(s, Instant::now() + within).await?;
    parse_pingresp(&p)
}

/// Writes `bytes` one at a time, each in its own TCP segment, pausing `pause` after each.
pub async fn write_bytewise(s: &mut TcpStream, bytes: &[u8], pause: Duration) -> io::Result<()> {
    for b in bytes {
        s.write_all(std::slice::from_ref(b)).await?;
        s.flush().await?;
        tokio::time::sleep(pause).await;
    }
    Ok(())
}

/// How a socket's receive direction ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Closed {
    /// Orderly end of stream (FIN).
    Eof,
    /// The peer reset the connection (e.g. it closed with unread data).
    Reset,
}

/// Reads until the peer ends the stream or resets the connection, before `deadline`. Returns the bytes
/// that arrived before the end and how it ended; `Err` on timeout or another I/O error.
pub async fn read_until_closed(s: &mut TcpStream, deadline: Instant) -> Result<(Vec<u8>, Closed), String> {
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match timeout_at(deadline, s.read(&mut chunk)).await {
            Err(_) => {
                return Err(format!(
                    "connection still open at the deadline; received {} bytes: {:02x?}",
                    got.len(),
                    &got[..got.len().min(64)]
                ))
            }
            Ok(Ok(0)) => return Ok((got, Closed::Eof)),
            Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionReset => return Ok((got, Closed::Reset)),
            Ok(Err(e)) => return Err(format!("read failed: {e}")),
        }
    }
}

/// What a non-blocking peek at the socket's receive queue shows right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeekState {
    /// Open, nothing to read.
    OpenQuiet,
    /// Bytes are waiting.
    Data,
    /// The peer ended the stream.
    Eof,
    /// The socket failed (e.g. reset).
    Error(io::ErrorKind),
}

/// Asks the kernel directly (MSG_PEEK on the non-blocking socket, so nothing is consumed and tokio's
/// readiness cache cannot hide an end of stream that already arrived).
pub fn peek_state(s: &TcpStream) -> PeekState {
    let mut buf = [MaybeUninit::<u8>::uninit(); 1];
    match socket2::SockRef::from(s).peek(&mut buf) {
        Ok(0) => PeekState::Eof,
        Ok(_) => PeekState::Data,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => PeekState::OpenQuiet,
        Err(e) => PeekState::Error(e.kind()),
    }
}
