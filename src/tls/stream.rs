//! The broker side's TLS stream: rustls's unbuffered API over a transport (a tokio `TcpStream` in
//! production), holding no buffer while the connection is idle.
//!
//! Why not tokio-rustls: rustls's buffered `ClientConnection` (what tokio-rustls drives) keeps a 4 KiB
//! receive buffer for the connection's life: it never shrinks below one read. For a gateway of idle
//! sensors that was four tenths of each connection's memory: moving to this stream took the idle cost
//! from 10.4 to 6.4 KiB per connection (`bench/`, N = 3,000) and lowered the latency added. Here bytes are
//! read into a buffer on the stack and processed at once; only what cannot be finished in one go waits on
//! the heap (part of a record, plaintext the reader has not taken, encrypted bytes the transport has not
//! taken), and only until it is gone. Keep it unless rustls's buffered connection learns to give its
//! buffers back, and measure with `bench/run` before and after any change here.
//!
//! Both directions must be driven from one task: reading may write (the answer to a key update), and the
//! transport keeps one waker per direction, so a reader and a writer on two tasks could each leave the
//! other unwoken. The type holds that rule: the stream implements [`Duplex`], not tokio's `AsyncRead` and
//! `AsyncWrite`, and the only way to read or write it is the borrowed view [`Duplex::io`], which no task
//! can take away (`tokio::spawn` needs `'static`).

use std::future::poll_fn;
use std::io;
use std::mem::{self, MaybeUninit};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls::client::UnbufferedClientConnection;
use rustls::pki_types::ServerName;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::io::poll_read_buf;

use crate::duplex::Duplex;

/// Bytes read from the socket at once, into a buffer on the stack: a full TLS record and its overhead.
const READ_SIZE: usize = 16 * 1024 + 512;

/// Room for a TLS record's header, content type, tag and padding, generously.
const RECORD_OVERHEAD: usize = 64;
/// The largest plaintext in one TLS record.
const MAX_FRAGMENT: usize = 16 * 1024;

/// A client TLS connection over the transport `T`. Reads and writes carry application data; shutting
/// down sends a close_notify and then shuts the transport down (a FIN), and the peer's close_notify reads
/// as the end of the stream (a FIN without it as `UnexpectedEof`, as tokio-rustls reports it).
pub(crate) struct TlsStream<T> {
    transport: T,
    conn: UnbufferedClientConnection,
    /// Received TLS bytes not processed yet: the start of a record.
    incoming: Vec<u8>,
    /// Decrypted bytes the reader has not taken yet: `plain[plain_at..]`.
    plain: Vec<u8>,
    plain_at: usize,
    /// Encrypted bytes the socket has not taken yet: `outgoing[out_at..]`.
    outgoing: Vec<u8>,
    out_at: usize,
    /// The peer sent its close_notify: nothing more will be read.
    read_closed: bool,
    /// TCP end of stream.
    eof: bool,
    close_notify_queued: bool,
}

/// What to do once rustls lets application data be sent.
#[derive(Clone, Copy)]
enum Action<'a> {
    None,
    Encrypt(&'a [u8]),
    CloseNotify,
}

/// Where processing stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// rustls needs more bytes from the peer to go on with the handshake.
    MoreData,
    /// Application data may be sent (and whatever complete records arrived have been processed).
    Traffic,
    /// Both sides have sent their close_notify.
    Closed,
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Whether `e`, returned by a [`TlsStream`], is a TLS protocol failure (an alert the peer sent, or one we
/// sent about what it sent) rather than the transport failing or closing. After a TLS 1.3 handshake, a
/// broker that rejects the client certificate says so this way, at the first read.
pub(crate) fn is_tls_failure(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<rustls::Error>())
}

impl<T: AsyncRead + AsyncWrite + Unpin> TlsStream<T> {
    /// Makes the TLS handshake with `name` over `transport`, presenting what `config` holds.
    pub(crate) async fn connect(
        config: Arc<ClientConfig>,
        name: ServerName<'static>,
        transport: T,
    ) -> io::Result<Self> {
        let conn = UnbufferedClientConnection::new(config, name).map_err(tls_error)?;
        let mut s = TlsStream {
            transport,
            conn,
            incoming: Vec::new(),
            plain: Vec::new(),
            plain_at: 0,
            outgoing: Vec::new(),
            out_at: 0,
            read_closed: false,
            eof: false,
            close_notify_queued: false,
        };
        poll_fn(|cx| s.poll_handshake(cx)).await?;
        Ok(s)
    }

    /// Whether the last handshake resumed an earlier session.
    pub(crate) fn resumed(&self) -> bool {
        self.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed)
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut next = self.absorb(&mut [], None)?;
        loop {
            ready!(self.poll_send_pending(cx))?;
            match next {
                Next::Traffic => return Poll::Ready(Ok(())),
                Next::Closed => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the TLS connection closed during the handshake",
                    )))
                }
                Next::MoreData => match ready!(self.poll_receive(cx, None))? {
                    Some(n) => next = n,
                    None => {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the peer closed the connection during the TLS handshake",
                        )))
                    }
                },
            }
        }
    }

    /// Reads from the socket and processes what arrived (`None`: end of stream). Bytes land on the stack
    /// and are processed there, unless a record's start waits in `incoming`: then they land right after
    /// it, so that neither is copied again to join them.
    fn poll_receive(&mut self, cx: &mut Context<'_>, out: Option<&mut ReadBuf<'_>>) -> Poll<io::Result<Option<Next>>> {
        if !self.incoming.is_empty() {
            self.incoming.reserve(READ_SIZE);
            if ready!(poll_read_buf(Pin::new(&mut self.transport), cx, &mut self.incoming))? == 0 {
                return Poll::Ready(Ok(None));
            }
            return Poll::Ready(self.absorb(&mut [], out).map(Some));
        }
        let mut stack = [MaybeUninit::<u8>::uninit(); READ_SIZE];
        let mut rb = ReadBuf::uninit(&mut stack);
        ready!(Pin::new(&mut self.transport).poll_read(cx, &mut rb))?;
        if rb.filled().is_empty() {
            return Poll::Ready(Ok(None));
        }
        Poll::Ready(self.absorb(rb.filled_mut(), out).map(Some))
    }

    /// Processes `fresh` bytes from the peer (after any kept from before). Decrypted bytes go to `out`
    /// as far as it has room, then to `plain`; a record's unfinished start is kept for the next bytes.
    fn absorb(&mut self, fresh: &mut [u8], out: Option<&mut ReadBuf<'_>>) -> io::Result<Next> {
        if self.incoming.is_empty() {
            let (used, next) = self.process(fresh, out, Action::None)?;
            if used < fresh.len() && !self.read_closed {
                self.incoming.extend_from_slice(&fresh[used..]);
            }
            return Ok(next);
        }
        let mut incoming = mem::take(&mut self.incoming);
        incoming.extend_from_slice(fresh);
        let (used, next) = self.process(&mut incoming, out, Action::None)?;
        incoming.drain(..used);
        // Kept only while a record is unfinished; nothing after the peer's close_notify matters.
        if !incoming.is_empty() && !self.read_closed {
            self.incoming = incoming;
        }
        Ok(next)
    }

    /// Runs rustls over `data` until it needs more bytes or lets application data be sent, and then does
    /// `action`. Returns how many bytes of `data` it consumed.
    fn process(
        &mut self,
        data: &mut [u8],
        mut out: Option<&mut ReadBuf<'_>>,
        action: Action<'_>,
    ) -> io::Result<(usize, Next)> {
        let mut used = 0;
        loop {
            let UnbufferedStatus { discard, state } = self.conn.process_tls_records(&mut data[used..]);
            let mut extra = 0;
            let state = match state {
                Ok(state) => state,
                Err(e) => {
                    self.send_alert_best_effort();
                    return Err(tls_error(e));
                }
            };
            let next = match state {
                ConnectionState::EncodeTlsData(mut e) => {
                    let at = self.outgoing.len();
                    self.outgoing.resize(at + MAX_FRAGMENT + RECORD_OVERHEAD, 0);
                    let n = match e.encode(&mut self.outgoing[at..]) {
                        Ok(n) => n,
                        Err(EncodeError::InsufficientSize(s)) => {
                            self.outgoing.resize(at + s.required_size, 0);
                            e.encode(&mut self.outgoing[at..]).map_err(io::Error::other)?
                        }
                        Err(other) => return Err(io::Error::other(other)),
                    };
                    self.outgoing.truncate(at + n);
                    None
                }
                // The bytes wait in `outgoing`, in order, and leave before anything encrypted later.
                ConnectionState::TransmitTlsData(t) => {
                    t.done();
                    None
                }
                ConnectionState::ReadTraffic(mut r) => {
                    while let Some(record) = r.next_record() {
                        let record = record.map_err(tls_error)?;
                        extra += record.discard;
                        deliver(record.payload, out.as_deref_mut(), &mut self.plain, self.plain_at);
                    }
                    None
                }
                ConnectionState::PeerClosed => {
                    self.read_closed = true;
                    None
                }
                ConnectionState::Closed => {
                    self.read_closed = true;
                    Some(Next::Closed)
                }
                ConnectionState::BlockedHandshake => Some(Next::MoreData),
                ConnectionState::WriteTraffic(mut w) => {
                    let at = self.outgoing.len();
                    let written = match action {
                        Action::None => Ok(0),
                        Action::Encrypt(data) => {
                            let room = data.len() + (data.len() / MAX_FRAGMENT + 2) * RECORD_OVERHEAD;
                            self.outgoing.resize(at + room, 0);
                            match w.encrypt(data, &mut self.outgoing[at..]) {
                                Err(EncryptError::InsufficientSize(s)) => {
                                    self.outgoing.resize(at + s.required_size, 0);
                                    w.encrypt(data, &mut self.outgoing[at..])
                                }
                                r => r,
                            }
                        }
                        Action::CloseNotify => {
                            self.outgoing.resize(at + RECORD_OVERHEAD, 0);
                            w.queue_close_notify(&mut self.outgoing[at..])
                        }
                    };
                    match written {
                        Ok(n) => self.outgoing.truncate(at + n),
                        Err(e) => {
                            self.outgoing.truncate(at);
                            return Err(io::Error::other(e));
                        }
                    }
                    Some(Next::Traffic)
                }
                _ => return Err(io::Error::other("unexpected TLS connection state")),
            };
            used += discard + extra;
            if let Some(next) = next {
                return Ok((used, next));
            }
        }
    }

    /// rustls queued a fatal alert with the error it returned: hand it to the socket if it takes it now.
    fn send_alert_best_effort(&mut self) {
        let UnbufferedStatus { state, .. } = self.conn.process_tls_records(&mut []);
        if let Ok(ConnectionState::EncodeTlsData(mut e)) = state {
            let mut alert = [0u8; RECORD_OVERHEAD];
            if let Ok(n) = e.encode(&mut alert) {
                self.outgoing.extend_from_slice(&alert[..n]);
            }
        }
        // Once, without waiting: the connection is failing anyway.
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let _ = Pin::new(&mut self.transport).poll_write(&mut cx, &self.outgoing[self.out_at..]);
    }

    /// Processes what waits in `incoming`, then does `action` (which needs the handshake done and our
    /// side still open).
    fn act(&mut self, action: Action<'_>) -> io::Result<()> {
        let mut incoming = mem::take(&mut self.incoming);
        let r = self.process(&mut incoming, None, action);
        if let Ok((used, _)) = &r {
            incoming.drain(..*used);
        }
        if !incoming.is_empty() && !self.read_closed {
            self.incoming = incoming;
        }
        match r?.1 {
            Next::Traffic => Ok(()),
            Next::Closed => Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the TLS connection is closed",
            )),
            Next::MoreData => Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the TLS handshake is not finished",
            )),
        }
    }

    /// Writes what waits in `outgoing`; frees it once all of it is out.
    fn poll_send_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_at < self.outgoing.len() {
            let n = ready!(Pin::new(&mut self.transport).poll_write(cx, &self.outgoing[self.out_at..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_at += n;
        }
        self.outgoing = Vec::new();
        self.out_at = 0;
        Poll::Ready(Ok(()))
    }

    /// Gives the reader what `plain` holds; frees it once all of it is taken.
    fn take_plain(&mut self, buf: &mut ReadBuf<'_>) {
        let n = buf.remaining().min(self.plain.len() - self.plain_at);
        buf.put_slice(&self.plain[self.plain_at..self.plain_at + n]);
        self.plain_at += n;
        if self.plain_at == self.plain.len() {
            self.plain = Vec::new();
            self.plain_at = 0;
        }
    }
}

/// Puts `bytes` into `out` as far as it has room (only when nothing waits in `plain`, to keep the order),
/// and the rest at the end of `plain`.
fn deliver(bytes: &[u8], out: Option<&mut ReadBuf<'_>>, plain: &mut Vec<u8>, plain_at: usize) {
    let mut rest = bytes;
    if let Some(out) = out {
        if plain.len() == plain_at {
            let n = out.remaining().min(rest.len());
            out.put_slice(&rest[..n]);
            rest = &rest[n..];
        }
    }
    plain.extend_from_slice(rest);
}

impl<T: AsyncRead + AsyncWrite + Unpin> Duplex for TlsStream<T> {
    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self;
        // What rustls queued while reading (an alert, a key update) leaves when the socket takes it; a
        // socket that does not take it yet wakes this task when it will.
        if let Poll::Ready(Err(e)) = this.poll_send_pending(cx) {
            return Poll::Ready(Err(e));
        }
        loop {
            if this.plain_at < this.plain.len() {
                this.take_plain(buf);
                return Poll::Ready(Ok(()));
            }
            if this.read_closed {
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection without sending a TLS close_notify",
                )));
            }
            let before = buf.filled().len();
            if ready!(this.poll_receive(cx, Some(&mut *buf)))?.is_none() {
                this.eof = true;
                continue;
            }
            if let Poll::Ready(Err(e)) = this.poll_send_pending(cx) {
                return Poll::Ready(Err(e));
            }
            if buf.filled().len() > before {
                return Poll::Ready(Ok(()));
            }
        }
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self;
        // Earlier bytes first: a socket that takes nothing holds back what comes next.
        ready!(this.poll_send_pending(cx))?;
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        // One call encrypts at most a few records: the caller keeps the rest, `outgoing` stays bounded.
        let data = &data[..data.len().min(4 * MAX_FRAGMENT)];
        this.act(Action::Encrypt(data))?;
        // Sent at once if the socket takes it; otherwise it waits in `outgoing` for the next call.
        if let Poll::Ready(Err(e)) = this.poll_send_pending(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self;
        ready!(this.poll_send_pending(cx))?;
        Pin::new(&mut this.transport).poll_flush(cx)
    }

    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self;
        if !this.close_notify_queued {
            ready!(this.poll_send_pending(cx))?;
            this.close_notify_queued = true;
            match this.act(Action::CloseNotify) {
                // Closed both ways already: nothing more to say.
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {}
                r => r?,
            }
        }
        ready!(this.poll_send_pending(cx))?;
        Pin::new(&mut this.transport).poll_shutdown(cx)
    }
}

#[cfg(test)]
impl<T> TlsStream<T> {
    /// Heap bytes the stream holds for its buffers.
    fn held(&self) -> usize {
        self.incoming.capacity() + self.plain.capacity() + self.outgoing.capacity()
    }
}

#[cfg(test)]
mod tests {
    //! Whole conversations against an in-process rustls server (tokio-rustls) over loopback TCP: TLS 1.2
    //! and 1.3, records split anywhere, tiny records, key updates and session tickets mixed into the data,
    //! half-close, rejected certificates, and what one write may hold.
    use super::*;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    use rustls::server::WebPkiClientVerifier;
    use rustls::{RootCertStore, ServerConfig, SupportedProtocolVersion};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::task::JoinHandle;

    type Server = tokio_rustls::server::TlsStream<TcpStream>;
    type Ours = TlsStream<TcpStream>;

    fn cert(name: &str) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        let c = rcgen::generate_simple_self_signed(vec![name.into()]).unwrap();
        (
            CertificateDer::from(c.cert.der().to_vec()),
            PrivatePkcs8KeyDer::from(c.key_pair.serialize_der()).into(),
        )
    }

    fn roots(c: &CertificateDer<'static>) -> Arc<RootCertStore> {
        let mut r = RootCertStore::empty();
        r.add(c.clone()).unwrap();
        Arc::new(r)
    }

    #[derive(Clone, Copy)]
    struct Opts {
        versions: &'static [&'static SupportedProtocolVersion],
        frag: Option<usize>,
        tickets: usize,
        trickle: bool,
        server_rejects_client: bool,
        client_distrusts_server: bool,
    }

    impl Opts {
        fn v(versions: &'static [&'static SupportedProtocolVersion]) -> Opts {
            Opts {
                versions,
                frag: None,
                tickets: 2,
                trickle: false,
                server_rejects_client: false,
                client_distrusts_server: false,
            }
        }
    }

    const V12: &[&SupportedProtocolVersion] = &[&rustls::version::TLS12];
    const V13: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13];
    const ANY: &[&SupportedProtocolVersion] = rustls::DEFAULT_VERSIONS;

    /// Copies `from` to `to` a few bytes at a time, so that reads see records split anywhere.
    async fn trickle(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf) {
        let mut buf = [0u8; 4096];
        let mut k = 0usize;
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut at = 0;
            while at < n {
                k += 1;
                let step = (k % 7 + 1).min(n - at);
                if to.write_all(&buf[at..at + step]).await.is_err() {
                    return;
                }
                at += step;
                tokio::task::yield_now().await;
            }
        }
        let _ = to.shutdown().await;
    }

    /// Our client and a rustls server as `o` says; the handshake's outcome on both sides.
    async fn setup(o: Opts) -> (io::Result<Ours>, JoinHandle<io::Result<Server>>) {
        let (scert, skey) = cert("localhost");
        let (ccert, ckey) = cert("client");
        let (other, _) = cert("other");
        let builder = ServerConfig::builder_with_provider(crate::tls::provider())
            .with_protocol_versions(o.versions)
            .unwrap();
        let mut server = if o.server_rejects_client {
            let v = WebPkiClientVerifier::builder_with_provider(roots(&other), crate::tls::provider())
                .build()
                .unwrap();
            builder
                .with_client_cert_verifier(v)
                .with_single_cert(vec![scert.clone()], skey)
                .unwrap()
        } else {
            builder
                .with_no_client_auth()
                .with_single_cert(vec![scert.clone()], skey)
                .unwrap()
        };
        server.max_fragment_size = o.frag;
        server.send_tls13_tickets = o.tickets;
        let client_roots = if o.client_distrusts_server {
            roots(&other)
        } else {
            roots(&scert)
        };
        let client = ClientConfig::builder_with_provider(crate::tls::provider())
            .with_protocol_versions(o.versions)
            .unwrap()
            .with_root_certificates(client_roots);
        let client = if o.server_rejects_client {
            client.with_client_auth_cert(vec![ccert], ckey).unwrap()
        } else {
            client.with_no_client_auth()
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let accepted = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            tcp.set_nodelay(true).unwrap();
            acceptor.accept(tcp).await
        });
        if o.trickle {
            let relay = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let server_addr = addr;
            addr = relay.local_addr().unwrap();
            tokio::spawn(async move {
                let (a, _) = relay.accept().await.unwrap();
                let b = TcpStream::connect(server_addr).await.unwrap();
                a.set_nodelay(true).unwrap();
                b.set_nodelay(true).unwrap();
                let (ar, aw) = a.into_split();
                let (br, bw) = b.into_split();
                tokio::spawn(trickle(br, aw));
                tokio::spawn(trickle(ar, bw));
            });
        }
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        (TlsStream::connect(Arc::new(client), name, tcp).await, accepted)
    }

    /// A connected pair with the default versions.
    async fn pair() -> (Ours, Server) {
        let (ours, accepted) = setup(Opts::v(ANY)).await;
        (ours.unwrap(), accepted.await.unwrap().unwrap())
    }

    #[tokio::test]
    async fn exchanges_bytes_both_ways_and_holds_no_buffer_once_idle() {
        let (mut ours, mut server) = pair().await;
        ours.io().write_all(b"PUBLISH").await.unwrap();
        ours.io().flush().await.unwrap();
        let mut got = [0u8; 7];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"PUBLISH");
        server.write_all(b"PUBACK").await.unwrap();
        server.flush().await.unwrap();
        let mut got = [0u8; 6];
        ours.io().read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"PUBACK");
        assert_eq!(ours.held(), 0, "an idle connection keeps no buffer");
    }

    #[tokio::test]
    async fn many_records_arrive_intact_through_a_small_reader_buffer() {
        let (mut ours, mut server) = pair().await;
        let data = pattern(1 << 20, 0);
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            server.write_all(&sent).await.unwrap();
            server.shutdown().await.unwrap();
            server
        });
        let mut got = Vec::new();
        let mut small = [0u8; 1000];
        loop {
            match ours.io().read(&mut small).await.unwrap() {
                0 => break,
                n => got.extend_from_slice(&small[..n]),
            }
        }
        assert!(got == data, "bytes changed, lost or reordered");
        assert_eq!(ours.held(), 0);
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn bulk_writes_arrive_intact() {
        let (mut ours, mut server) = pair().await;
        let data = pattern(3 << 20, 0);
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            got
        });
        for chunk in data.chunks(64 * 1024 + 17) {
            ours.io().write_all(chunk).await.unwrap();
        }
        ours.io().shutdown().await.unwrap();
        assert!(reader.await.unwrap() == data, "bytes changed, lost or reordered");
    }

    #[tokio::test]
    async fn half_close_sends_close_notify_and_the_other_direction_keeps_flowing() {
        let (mut ours, mut server) = pair().await;
        ours.io().write_all(b"last words").await.unwrap();
        ours.io().shutdown().await.unwrap();
        let mut got = Vec::new();
        // tokio-rustls reads a close_notify as the end of the stream (and a bare FIN as an error).
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"last words");
        server.write_all(b"late reply").await.unwrap();
        server.shutdown().await.unwrap();
        let mut reply = Vec::new();
        ours.io().read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"late reply");
    }

    #[tokio::test]
    async fn a_peer_that_closes_tcp_without_close_notify_is_an_unexpected_eof() {
        let (mut ours, server) = pair().await;
        let (tcp, _) = server.into_inner();
        drop(tcp);
        let mut b = [0u8; 16];
        let e = ours.io().read(&mut b).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
        assert!(!is_tls_failure(&e), "a closed transport is no TLS failure");
    }

    fn pattern(n: usize, seed: usize) -> Vec<u8> {
        (0..n).map(|i| ((i + seed) * 31 % 251) as u8).collect()
    }

    /// Server sends `down` in chunks (a KeyUpdate after each, TLS 1.3), reads `up`, then closes; the client
    /// reads through a small buffer, answers, reads EOF, closes.
    async fn conversation(o: Opts) {
        let (ours, accepted) = setup(o).await;
        let mut ours = ours.unwrap();
        let mut server = accepted.await.unwrap().unwrap();
        let tls13 = server.get_ref().1.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3);
        let down = pattern(300_000, 1);
        let up = pattern(120_000, 7);
        let (d2, u2) = (down.clone(), up.clone());
        let srv = tokio::spawn(async move {
            for (i, chunk) in d2.chunks(30_001).enumerate() {
                server.write_all(chunk).await.unwrap();
                if tls13 && i % 2 == 0 {
                    server.get_mut().1.refresh_traffic_keys().unwrap();
                }
                server.flush().await.unwrap();
            }
            let mut got = vec![0u8; u2.len()];
            server.read_exact(&mut got).await.unwrap();
            assert!(got == u2, "server got changed bytes");
            server.shutdown().await.unwrap();
            let mut rest = Vec::new();
            server.read_to_end(&mut rest).await.unwrap();
            rest.len()
        });
        let mut got = Vec::new();
        let mut small = [0u8; 700];
        while got.len() < down.len() {
            let n = ours.io().read(&mut small).await.unwrap();
            assert!(n > 0, "early eof at {}", got.len());
            got.extend_from_slice(&small[..n]);
        }
        assert!(got == down, "client got changed bytes");
        for c in up.chunks(9_999) {
            ours.io().write_all(c).await.unwrap();
        }
        ours.io().flush().await.unwrap();
        let mut rest = Vec::new();
        ours.io().read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        ours.io().shutdown().await.unwrap();
        assert_eq!(srv.await.unwrap(), 0);
        assert_eq!(ours.held(), 0, "buffers held after the conversation");
    }

    #[tokio::test]
    async fn tls12_conversation_passes_every_byte_and_ends_holding_nothing() {
        conversation(Opts::v(V12)).await
    }
    #[tokio::test]
    async fn tls13_key_updates_and_tickets_amid_the_data_lose_nothing() {
        conversation(Opts {
            tickets: 40,
            ..Opts::v(V13)
        })
        .await
    }
    #[tokio::test]
    async fn tls12_tiny_records_lose_nothing() {
        conversation(Opts {
            frag: Some(32),
            ..Opts::v(V12)
        })
        .await
    }
    #[tokio::test]
    async fn tls13_tiny_records_and_many_tickets_lose_nothing() {
        conversation(Opts {
            frag: Some(32),
            tickets: 40,
            ..Opts::v(V13)
        })
        .await
    }
    #[tokio::test]
    async fn tls12_records_split_anywhere_are_joined() {
        conversation(Opts {
            trickle: true,
            frag: Some(100),
            ..Opts::v(V12)
        })
        .await
    }
    #[tokio::test]
    async fn tls13_records_split_anywhere_are_joined() {
        conversation(Opts {
            trickle: true,
            tickets: 10,
            ..Opts::v(V13)
        })
        .await
    }

    fn inner_rustls(e: &io::Error) -> Option<rustls::Error> {
        assert!(is_tls_failure(e), "{e:?}");
        e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()).cloned()
    }

    #[tokio::test]
    async fn tls13_rejected_client_certificate_surfaces_as_a_rustls_error_on_read() {
        let (ours, accepted) = setup(Opts {
            server_rejects_client: true,
            ..Opts::v(V13)
        })
        .await;
        let mut ours = ours.expect("TLS 1.3: the client's handshake completes");
        let _ = accepted.await.unwrap().expect_err("server rejects");
        let _ = ours.io().write_all(b"CONNECT").await;
        let _ = ours.io().flush().await;
        let e = ours.io().read(&mut [0u8; 64]).await.unwrap_err();
        assert!(
            matches!(inner_rustls(&e), Some(rustls::Error::AlertReceived(_))),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn tls12_rejected_client_certificate_fails_the_handshake_with_a_rustls_error() {
        let (ours, accepted) = setup(Opts {
            server_rejects_client: true,
            ..Opts::v(V12)
        })
        .await;
        let e = ours.err().expect("TLS 1.2: rejected in the handshake");
        let _ = accepted.await.unwrap().expect_err("server rejects");
        assert!(
            matches!(inner_rustls(&e), Some(rustls::Error::AlertReceived(_))),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn the_broker_learns_why_its_certificate_was_refused() {
        for versions in [V12, V13] {
            let (ours, accepted) = setup(Opts {
                client_distrusts_server: true,
                ..Opts::v(versions)
            })
            .await;
            let ours_err = ours.err().expect("untrusted broker");
            assert!(inner_rustls(&ours_err).is_some(), "{ours_err:?}");
            let server_err = accepted.await.unwrap().expect_err("handshake fails");
            assert!(
                matches!(inner_rustls(&server_err), Some(rustls::Error::AlertReceived(_))),
                "the broker was not told why: {server_err:?}"
            );
        }
    }

    #[tokio::test]
    async fn closing_after_a_key_update_request_still_sends_close_notify() {
        let (ours, accepted) = setup(Opts::v(V13)).await;
        let mut ours = ours.unwrap();
        let mut server = accepted.await.unwrap().unwrap();
        server.get_mut().1.refresh_traffic_keys().unwrap();
        server.write_all(b"x").await.unwrap();
        server.flush().await.unwrap();
        let mut one = [0u8; 1];
        ours.io().read_exact(&mut one).await.unwrap();
        ours.io().shutdown().await.unwrap();
        let mut rest = Vec::new();
        server
            .read_to_end(&mut rest)
            .await
            .expect("clean close_notify after the key update");
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn one_large_write_holds_a_few_records_at_most() {
        let (ours, accepted) = setup(Opts::v(V13)).await;
        let mut ours = ours.unwrap();
        let _server = accepted.await.unwrap().unwrap(); // never reads
        let big = vec![5u8; 32 << 20];
        let n = ours.io().write(&big).await.unwrap();
        assert!(n <= 4 * MAX_FRAGMENT, "one write took {n} bytes");
        assert!(ours.held() < 1 << 20, "one write buffered {} bytes", ours.held());
    }
}
