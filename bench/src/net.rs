//! Devices: plain TCP (through a proxy) or TLS (the "direct" contender), raw MQTT 3.1.1 packets and a small
//! buffered packet reader. Device sockets are bound to source addresses spread over 127.77.0.0/16 so that
//! thousands of connections never run short of local ports.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::timeout;

/// Anything a device can talk through.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Where devices connect.
#[derive(Clone)]
pub enum Target {
    /// Plain TCP (a proxy's listener, or the plain sink).
    Plain(SocketAddr),
    /// The device speaks mutual TLS itself, presenting the shared client certificate.
    Tls {
        addr: SocketAddr,
        config: Arc<rustls::ClientConfig>,
    },
}

impl Target {
    pub fn addr(&self) -> SocketAddr {
        match self {
            Target::Plain(a) => *a,
            Target::Tls { addr, .. } => *addr,
        }
    }
}

static NEXT_SOURCE: AtomicUsize = AtomicUsize::new(0);
static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

/// The next source address in 127.77.0.1 ... 127.77.255.254.
pub fn next_source() -> IpAddr {
    let n = NEXT_SOURCE.fetch_add(1, Ordering::Relaxed);
    IpAddr::V4(Ipv4Addr::new(127, 77, ((n / 254) % 256) as u8, (n % 254 + 1) as u8))
}

/// A client id unique within the run (the broker would otherwise take sessions over).
pub fn next_client_id() -> String {
    format!("dev-{}", NEXT_ID.fetch_add(1, Ordering::Relaxed))
}

/// A TCP connection from a spread source address, Nagle off.
pub async fn tcp(addr: SocketAddr) -> io::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(next_source(), 0))?;
    let s = sock.connect(addr).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// A device connection, with a read buffer for whole MQTT packets.
pub struct Conn {
    io: Box<dyn Io>,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// For TLS devices: whether the handshake resumed a session.
    pub resumed: Option<bool>,
}

/// One MQTT packet: its first byte and body.
pub struct Packet {
    pub first: u8,
    pub body: Vec<u8>,
}

impl Conn {
    /// Opens the transport (TCP, and TLS for [`Target::Tls`]). No MQTT yet.
    pub async fn open(target: &Target) -> io::Result<Conn> {
        let tcp = tcp(target.addr()).await?;
        let (io, resumed): (Box<dyn Io>, _) = match target {
            Target::Plain(_) => (Box::new(tcp), None),
            Target::Tls { config, .. } => {
                let name = ServerName::try_from("localhost").expect("server name");
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name, tcp)
                    .await?;
                let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
                (Box::new(tls), Some(resumed))
            }
        };
        Ok(Conn {
            io,
            buf: vec![0; 64],
            start: 0,
            end: 0,
            resumed,
        })
    }

    /// Opens the transport and completes CONNECT/CONNACK; `Err` unless the CONNACK accepts.
    pub async fn mqtt(target: &Target, keep_alive: u16, within: Duration) -> io::Result<Conn> {
        timeout(within, async {
            let mut c = Conn::open(target).await?;
            c.handshake(keep_alive).await?;
            Ok(c)
        })
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "no CONNACK in time")))
    }

    /// CONNECT with a fresh client id, then the CONNACK, which must accept.
    pub async fn handshake(&mut self, keep_alive: u16) -> io::Result<()> {
        self.send(&connect(&next_client_id(), keep_alive)).await?;
        let p = self.read_packet().await?;
        if p.first != 0x20 || p.body.len() != 2 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("not a CONNACK: {:02x}", p.first),
            ));
        }
        if p.body[1] != 0 {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("CONNACK refused with code {}", p.body[1]),
            ));
        }
        Ok(())
    }

    /// Writes and flushes.
    pub async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.io.write_all(bytes).await?;
        self.io.flush().await
    }

    /// Writes without flushing (for batches).
    pub async fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.io.write_all(bytes).await
    }

    pub async fn flush(&mut self) -> io::Result<()> {
        self.io.flush().await
    }

    /// Reads the next whole packet.
    pub async fn read_packet(&mut self) -> io::Result<Packet> {
        loop {
            if let Some((hdr, len)) = header(&self.buf[self.start..self.end])? {
                let total = hdr + len;
                if self.end - self.start >= total {
                    let first = self.buf[self.start];
                    let body = self.buf[self.start + hdr..self.start + total].to_vec();
                    self.start += total;
                    return Ok(Packet { first, body });
                }
                if total > self.buf.len() - self.start {
                    self.buf.copy_within(self.start..self.end, 0);
                    (self.end, self.start) = (self.end - self.start, 0);
                    if total > self.buf.len() {
                        self.buf.resize(total, 0);
                    }
                }
            }
            if self.start == self.end {
                (self.start, self.end) = (0, 0);
            } else if self.end == self.buf.len() {
                self.buf.copy_within(self.start..self.end, 0);
                (self.end, self.start) = (self.end - self.start, 0);
            }
            let n = self.io.read(&mut self.buf[self.end..]).await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.end += n;
        }
    }

    /// Reads raw bytes (for the sinks' one-byte answer).
    pub async fn read_raw(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.start < self.end {
            let n = out.len().min(self.end - self.start);
            out[..n].copy_from_slice(&self.buf[self.start..self.start + n]);
            self.start += n;
            return Ok(n);
        }
        self.io.read(out).await
    }

    /// PINGREQ, then waits for the PINGRESP.
    pub async fn ping(&mut self) -> io::Result<()> {
        self.send(&[0xC0, 0x00]).await?;
        let p = self.read_packet().await?;
        if p.first != 0xD0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("expected PINGRESP, got {:02x}", p.first),
            ));
        }
        Ok(())
    }

    /// DISCONNECT, end of our sending direction, then reads until the other side closes.
    pub async fn close(mut self, within: Duration) -> io::Result<()> {
        self.send(&[0xE0, 0x00]).await?;
        let _ = self.io.shutdown().await;
        let drain = async {
            let mut b = [0u8; 256];
            loop {
                match self.io.read(&mut b).await {
                    Ok(0) => return Ok(()),
                    Ok(_) => {}
                    // A TLS peer that closes TCP without close_notify, or a reset after our shutdown.
                    Err(e) if matches!(e.kind(), io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset) => {
                        return Ok(())
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        timeout(within, drain)
            .await
            .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "connection not closed in time")))
    }
}

/// (header length, body length) once the fixed header is complete.
fn header(b: &[u8]) -> io::Result<Option<(usize, usize)>> {
    let mut len = 0usize;
    for i in 0..4 {
        let Some(&byte) = b.get(1 + i) else { return Ok(None) };
        len |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((2 + i, len)));
        }
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "remaining length longer than 4 bytes",
    ))
}

fn varint(mut n: usize, out: &mut Vec<u8>) {
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

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    varint(body.len(), &mut out);
    out.extend_from_slice(body);
    out
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// An MQTT 3.1.1 CONNECT: clean session, no will, no login.
pub fn connect(client_id: &str, keep_alive: u16) -> Vec<u8> {
    let mut body = Vec::new();
    put_str(&mut body, b"MQTT");
    body.push(4);
    body.push(0x02);
    body.extend_from_slice(&keep_alive.to_be_bytes());
    put_str(&mut body, client_id.as_bytes());
    packet(0x10, &body)
}

/// An MQTT 3.1.1 PUBLISH.
pub fn publish(topic: &str, qos: u8, packet_id: u16, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    put_str(&mut body, topic.as_bytes());
    if qos > 0 {
        body.extend_from_slice(&packet_id.to_be_bytes());
    }
    body.extend_from_slice(payload);
    packet(0x30 | (qos << 1), &body)
}
