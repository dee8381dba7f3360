//! Devices: plain TCP (through a proxy) or TLS (the "direct" contender), MQTT 3.1.1 packets from the codec
//! shared with the tests, and a small buffered packet reader. Device sockets are bound to source addresses spread over 127.77.0.0/16 so that
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

use crate::common::codec::{self, Packet, Version};

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
        let connack = codec::parse_connack(&p, Version::V311).map_err(invalid)?;
        if connack.code != 0 {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("CONNACK refused with code {}", connack.code),
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
            if let Some((hdr, len)) = codec::fixed_header(&self.buf[self.start..self.end]).map_err(invalid)? {
                let total = hdr + len;
                if self.end - self.start >= total {
                    let first_byte = self.buf[self.start];
                    let body = self.buf[self.start + hdr..self.start + total].to_vec();
                    self.start += total;
                    return Ok(Packet { first_byte, body });
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
        self.send(&codec::pingreq()).await?;
        let p = self.read_packet().await?;
        codec::parse_pingresp(&p).map_err(invalid)
    }

    /// DISCONNECT, end of our sending direction, then reads until the other side closes.
    pub async fn close(mut self, within: Duration) -> io::Result<()> {
        self.send(&codec::disconnect()).await?;
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

fn invalid(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

/// An MQTT 3.1.1 CONNECT: clean session, no will, no login.
pub fn connect(client_id: &str, keep_alive: u16) -> Vec<u8> {
    codec::connect(Version::V311, client_id, keep_alive)
}

/// An MQTT 3.1.1 PUBLISH.
pub fn publish(topic: &str, qos: u8, packet_id: u16, payload: &[u8]) -> Vec<u8> {
    codec::publish(Version::V311, topic, qos, packet_id, payload)
}
