//! Copies bytes both ways between the device and the broker until both directions have ended.
//!
//! This is the path every byte takes after the CONNECT, so it is built for idle fleets: a direction holds
//! a copy buffer only while it has bytes in flight, and gives it back as soon as its reader has nothing
//! more (most sensors are silent almost all the time). A direction whose reads keep filling its buffer
//! (a bulk transfer) gets a larger one, so that rustls encrypts several records per write and each system
//! call carries more bytes; a process-wide cap on those larger buffers bounds what a crowd of senders
//! can claim. Half-close is honoured: end-of-stream on one side
//! becomes a write shutdown (for TLS, a close_notify) on the other, and the opposite direction keeps
//! flowing until it ends too. The device's silence is bounded by its MQTT keep-alive, and the silence of
//! the whole connection by `listen.max_idle` (a device whose keep-alive is 0 asks for none). The copy knows
//! nothing about TLS or MQTT: it moves bytes between two streams.

use std::fmt;
use std::future::{poll_fn, Future};
use std::io;
use std::ops::{Deref, DerefMut};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::ReadBuf;
use tokio::time::{Instant, Sleep};

use crate::duplex::Duplex;

/// Size of a copy buffer while bytes are in flight: one full TLS record of plaintext.
pub const COPY_BUFFER_SIZE: usize = 16 * 1024;
/// Size a copy buffer grows to once a read has filled it: four TLS records, written to the socket at once.
const BULK_BUFFER_SIZE: usize = 64 * 1024;
/// Bulk buffers that may exist at once in the process (64 MiB in all); beyond it, bursts keep
/// [`COPY_BUFFER_SIZE`] buffers.
const MAX_BULK_BUFFERS: usize = 1024;

/// A count of bulk buffers in use, with a ceiling.
struct BulkBudget {
    used: AtomicUsize,
    max: usize,
}

impl BulkBudget {
    const fn new(max: usize) -> BulkBudget {
        BulkBudget {
            used: AtomicUsize::new(0),
            max,
        }
    }

    fn take(&self) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.max).then_some(n + 1))
            .is_ok()
    }

    fn give_back(&self) {
        self.used.fetch_sub(1, Ordering::AcqRel);
    }
}

static BULK_BUDGET: BulkBudget = BulkBudget::new(MAX_BULK_BUFFERS);

/// A heap copy buffer; a bulk one counts against its budget while it lives.
struct Buffer {
    bytes: Box<[u8]>,
    budget: Option<&'static BulkBudget>,
}

impl Buffer {
    fn copy() -> Buffer {
        Buffer {
            bytes: vec![0; COPY_BUFFER_SIZE].into_boxed_slice(),
            budget: None,
        }
    }

    /// A bulk buffer, unless `budget` is spent.
    fn bulk(budget: &'static BulkBudget) -> Option<Buffer> {
        budget.take().then(|| Buffer {
            bytes: vec![0; BULK_BUFFER_SIZE].into_boxed_slice(),
            budget: Some(budget),
        })
    }

    fn is_bulk(&self) -> bool {
        self.budget.is_some()
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        if let Some(b) = self.budget {
            b.give_back();
        }
    }
}

impl Deref for Buffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

impl DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.bytes
    }
}

/// Which end of the proxied connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The legacy device (plain TCP).
    Device,
    /// The broker (TLS).
    Broker,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Device => "device",
            Side::Broker => "broker",
        })
    }
}

/// Why the copy ended.
#[derive(Debug)]
pub enum End {
    /// Both directions reached end-of-stream; `first` closed first.
    Closed {
        /// The side whose end-of-stream came first.
        first: Side,
    },
    /// The device sent nothing for longer than its keep-alive allows.
    DeviceSilent(Duration),
    /// The broker took none of the device's bytes for that long.
    BrokerStalled(Duration),
    /// Nothing passed either way for `listen.max_idle`.
    Idle(Duration),
    /// Retired at a safe point (`[retire]`).
    Retired(Retirement),
    /// Reading from or writing to one side failed.
    Error {
        /// The side whose socket failed.
        side: Side,
        /// The error.
        error: io::Error,
    },
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            End::Closed { first } => write!(f, "{first} closed"),
            End::DeviceSilent(limit) => write!(f, "device silent for {limit:?} (1.5 x keep-alive)"),
            End::BrokerStalled(limit) => write!(f, "broker took no bytes for {limit:?} (1.5 x keep-alive)"),
            End::Idle(limit) => write!(f, "nothing passed either way for {limit:?} (listen.max_idle)"),
            End::Retired(Retirement::Renewed) => {
                f.write_str("retired: its certificate was replaced ([retire] renewed)")
            }
            End::Retired(Retirement::Expiring) => {
                f.write_str("retired: its certificate is ending ([retire] expiring_within)")
            }
            End::Error { side, error } => write!(f, "{side} error: {error}"),
        }
    }
}

/// What a finished copy did.
#[derive(Debug)]
pub struct Transfer {
    /// Bytes copied from the device to the broker.
    pub device_to_broker: u64,
    /// Bytes copied from the broker to the device.
    pub broker_to_device: u64,
    /// Why it ended.
    pub end: End,
}

/// One direction of the copy.
#[derive(Default)]
struct Half {
    /// Bytes read but not yet written, at `buf[start..end]`; also the read buffer during bursts.
    buf: Option<Buffer>,
    start: usize,
    end: usize,
    /// The last read filled the whole heap buffer: the next read gets a bulk buffer if it can.
    filled: bool,
    read_done: bool,
    done: bool,
    bytes: u64,
}

/// Which stream of a direction failed.
enum Failed {
    Reader(io::Error),
    Writer(io::Error),
}

impl Half {
    fn pending(&self) -> bool {
        self.start < self.end
    }

    /// Moves bytes from `reader` to `writer` until the reader would block (Pending) or the direction has
    /// finished (Ready). `activity` is set when bytes were read or written.
    ///
    /// Reads go first into a small buffer on the stack and are written straight on, so a quiet connection
    /// exchanging small MQTT packets allocates nothing. The heap buffer appears only when a read fills
    /// the stack buffer (a burst) or the writer cannot take everything at once, and is released after a
    /// wake-up in which nothing was read.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
        activity: &mut bool,
    ) -> Poll<Result<(), Failed>>
    where
        R: Duplex + ?Sized,
        W: Duplex + ?Sized,
    {
        let mut read_something = false;
        loop {
            if self.pending() {
                let buf = self.buf.as_deref().unwrap_or_default();
                let n = match ready!(writer.poll_write(cx, &buf[self.start..self.end])) {
                    Ok(0) => return Poll::Ready(Err(Failed::Writer(io::ErrorKind::WriteZero.into()))),
                    Ok(n) => n,
                    Err(e) => return Poll::Ready(Err(Failed::Writer(e))),
                };
                self.start += n;
                self.bytes += n as u64;
                // Progress while the reader waited on the writer: the device is not silent, we were busy.
                *activity = true;
                continue;
            }
            if self.read_done {
                ready!(writer.poll_flush(cx)).map_err(Failed::Writer)?;
                // The peer may already be gone; its end-of-stream is then reported by the other direction.
                let _ = ready!(writer.poll_shutdown(cx));
                self.buf = None;
                return Poll::Ready(Ok(()));
            }
            if self.filled && self.buf.as_ref().is_some_and(|b| !b.is_bulk()) {
                if let Some(bulk) = Buffer::bulk(&BULK_BUDGET) {
                    self.buf = Some(bulk);
                }
            }
            let polled = match self.buf.as_deref_mut() {
                Some(buf) => {
                    let mut rb = ReadBuf::new(buf);
                    match reader.poll_read(cx, &mut rb) {
                        Poll::Ready(Ok(())) => {
                            let n = rb.filled().len();
                            self.filled = n == rb.capacity();
                            (self.start, self.end) = (0, n);
                            Poll::Ready(Ok(n))
                        }
                        Poll::Ready(Err(e)) => Poll::Ready(Err(Failed::Reader(e))),
                        Poll::Pending => Poll::Pending,
                    }
                }
                None => self.poll_read_small(cx, reader, writer),
            };
            match polled {
                Poll::Ready(Ok(0)) => self.read_done = true,
                Poll::Ready(Ok(_)) => {
                    read_something = true;
                    *activity = true;
                }
                // A peer that closes TCP without a TLS close_notify: for MQTT, just the end of the stream.
                Poll::Ready(Err(Failed::Reader(e))) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    self.read_done = true
                }
                Poll::Ready(Err(failed)) => return Poll::Ready(Err(failed)),
                Poll::Pending => {
                    if !read_something {
                        self.buf = None;
                        self.filled = false;
                    }
                    ready!(writer.poll_flush(cx)).map_err(Failed::Writer)?;
                    return Poll::Pending;
                }
            }
        }
    }

    /// Reads into a stack buffer and writes straight on. Leaves in `self.buf` whatever the writer did not
    /// take, and allocates `self.buf` for the next reads when the stack buffer came back full. Returns
    /// the bytes read.
    fn poll_read_small<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
    ) -> Poll<Result<usize, Failed>>
    where
        R: Duplex + ?Sized,
        W: Duplex + ?Sized,
    {
        let mut small = [0u8; SMALL_READ];
        let mut rb = ReadBuf::new(&mut small);
        ready!(reader.poll_read(cx, &mut rb)).map_err(Failed::Reader)?;
        let n = rb.filled().len();
        if n == 0 {
            return Poll::Ready(Ok(0));
        }
        if n == SMALL_READ {
            // A burst, or a packet larger than the stack buffer: gather what else is waiting so that it
            // goes out in one write (one TLS record) rather than split at the stack buffer's edge.
            let mut buf = Buffer::copy();
            buf[..n].copy_from_slice(&small);
            let mut rest = ReadBuf::new(&mut buf[n..]);
            let more = match reader.poll_read(cx, &mut rest) {
                Poll::Ready(Ok(())) if rest.filled().is_empty() => {
                    self.read_done = true;
                    0
                }
                Poll::Ready(Ok(())) => {
                    self.filled = rest.remaining() == 0;
                    rest.filled().len()
                }
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    self.read_done = true;
                    0
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(Failed::Reader(e))),
                Poll::Pending => 0,
            };
            (self.start, self.end) = (0, n + more);
            self.buf = Some(buf);
            return Poll::Ready(Ok(n + more));
        }
        let written = match writer.poll_write(cx, &small[..n]) {
            Poll::Ready(Ok(w)) => w,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(Failed::Writer(e))),
            Poll::Pending => 0,
        };
        self.bytes += written as u64;
        if written < n {
            let mut buf = Buffer::copy();
            buf[..n - written].copy_from_slice(&small[written..n]);
            (self.start, self.end) = (0, n - written);
            self.buf = Some(buf);
        }
        Poll::Ready(Ok(n))
    }
}

/// Bytes read on the stack before a heap buffer is needed: larger than most MQTT packets of a sensor.
const SMALL_READ: usize = 2048;

/// How long a connection may stay silent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Silence {
    /// The device may send nothing for this long (1.5 x its MQTT keep-alive); `None`: no such limit.
    pub device: Option<Duration>,
    /// Nothing may pass either way for this long (`listen.max_idle`), whatever the keep-alive.
    pub both: Duration,
}

/// Why a connection is retired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retirement {
    /// A reload replaced its device's certificate.
    Renewed,
    /// Its certificate is about to end.
    Expiring,
}

impl Retirement {
    /// The `reason` label of `mqtls_connections_retired_total`.
    pub fn label(self) -> &'static str {
        match self {
            Retirement::Renewed => "renewed",
            Retirement::Expiring => "expiring",
        }
    }
}

/// When to end a connection at a safe point: once `due` completes, as soon as nothing has passed either
/// way for `quiet` and nothing waits in the copy's buffers, or `patience` later whatever happens. Boxed,
/// so that a connection without it carries one pointer.
pub struct Retire<'a> {
    due: Pin<Box<dyn Future<Output = Retirement> + Send + 'a>>,
    quiet: Duration,
    patience: Duration,
    /// Once due: why, and by when at the latest.
    retiring: Option<(Retirement, Instant)>,
}

impl<'a> Retire<'a> {
    /// Retires once `due` completes (with its reason), at the first `quiet` moment, or `patience` later.
    pub fn new(
        due: Pin<Box<dyn Future<Output = Retirement> + Send + 'a>>,
        quiet: Duration,
        patience: Duration,
    ) -> Box<Retire<'a>> {
        Box::new(Retire {
            due,
            quiet,
            patience,
            retiring: None,
        })
    }
}

/// Copies between `device` and `broker` until both directions end, an error occurs, a [`Silence`]
/// limit passes, or the connection is retired ([`Retire`]).
///
/// One timer serves both limits. Activity only notes the time; the timer is set again when it fires
/// early, for whichever deadline then comes first, so a busy connection does not touch the timer wheel
/// on every packet.
pub async fn pipe<D, B>(device: &mut D, broker: &mut B, silence: Silence, retire: Option<Box<Retire<'_>>>) -> Transfer
where
    D: Duplex + ?Sized,
    B: Duplex + ?Sized,
{
    let started = Instant::now();
    let first_deadline = started + silence.device.map_or(silence.both, |d| d.min(silence.both));
    // One struct, so that the closure below holds one reference to it rather than one per variable.
    let mut st = CopyState {
        up: Half::default(),
        down: Half::default(),
        first_closed: None,
        device_heard: started,
        any_heard: started,
        timer: Box::pin(tokio::time::sleep_until(first_deadline)),
        retire,
    };
    let end = poll_fn(|cx| st.poll(cx, device, broker, &silence)).await;
    Transfer {
        device_to_broker: st.up.bytes,
        broker_to_device: st.down.bytes,
        end,
    }
}

/// Both directions of a copy, and when it last heard from each side.
struct CopyState<'a> {
    up: Half,
    down: Half,
    first_closed: Option<Side>,
    device_heard: Instant,
    any_heard: Instant,
    /// One timer for every limit: set again, for whichever deadline comes first, when it fires early.
    timer: Pin<Box<Sleep>>,
    retire: Option<Box<Retire<'a>>>,
}

impl CopyState<'_> {
    fn poll<D, B>(&mut self, cx: &mut Context<'_>, device: &mut D, broker: &mut B, silence: &Silence) -> Poll<End>
    where
        D: Duplex + ?Sized,
        B: Duplex + ?Sized,
    {
        if !self.up.done {
            let mut activity = false;
            let r = self.up.poll_copy(cx, device, broker, &mut activity);
            if activity {
                self.device_heard = Instant::now();
                self.any_heard = self.device_heard;
            }
            match r {
                Poll::Ready(Ok(())) => {
                    self.up.done = true;
                    self.first_closed.get_or_insert(Side::Device);
                }
                Poll::Ready(Err(failed)) => return Poll::Ready(failed.end(Side::Device, Side::Broker)),
                Poll::Pending => {}
            }
        }
        if !self.down.done {
            let mut activity = false;
            let r = self.down.poll_copy(cx, broker, device, &mut activity);
            if activity {
                self.any_heard = Instant::now();
            }
            match r {
                Poll::Ready(Ok(())) => {
                    self.down.done = true;
                    self.first_closed.get_or_insert(Side::Broker);
                }
                Poll::Ready(Err(failed)) => return Poll::Ready(failed.end(Side::Broker, Side::Device)),
                Poll::Pending => {}
            }
        }
        if let Some(first) = self.first_closed.filter(|_| self.up.done && self.down.done) {
            return Poll::Ready(End::Closed { first });
        }
        if let Some(r) = self.retire.as_mut().filter(|r| r.retiring.is_none()) {
            if let Poll::Ready(why) = r.due.as_mut().poll(cx) {
                r.retiring = Some((why, Instant::now() + r.patience));
                // Looked at now: the connection may be quiet already.
                self.timer.as_mut().reset(Instant::now());
            }
        }
        while self.timer.as_mut().poll(cx).is_ready() {
            if let Some(end) = self.deadline_passed(silence) {
                return Poll::Ready(end);
            }
        }
        Poll::Pending
    }

    /// The timer fired: the limit that passed, if one did; otherwise the timer is set for the next one.
    fn deadline_passed(&mut self, silence: &Silence) -> Option<End> {
        let now = Instant::now();
        let device_deadline = silence
            .device
            .filter(|_| !self.up.done)
            .map(|limit| (self.device_heard + limit, limit));
        if let Some((_, limit)) = device_deadline.filter(|(at, _)| *at <= now) {
            return Some(if self.up.pending() {
                End::BrokerStalled(limit)
            } else {
                End::DeviceSilent(limit)
            });
        }
        let idle_deadline = self.any_heard + silence.both;
        if idle_deadline <= now {
            return Some(End::Idle(silence.both));
        }
        let mut next = device_deadline.map_or(idle_deadline, |(at, _)| at.min(idle_deadline));
        if let Some((r, (why, latest))) = self.retire.as_ref().and_then(|r| Some((r, r.retiring?))) {
            let quiet_since = self.any_heard + r.quiet;
            let safe = quiet_since <= now && !self.up.pending() && !self.down.pending();
            if safe || latest <= now {
                return Some(End::Retired(why));
            }
            next = next.min(latest).min(quiet_since.max(now + r.quiet / 4));
        }
        self.timer.as_mut().reset(next);
        None
    }
}

impl Failed {
    fn end(self, reader: Side, writer: Side) -> End {
        match self {
            Failed::Reader(error) => End::Error { side: reader, error },
            Failed::Writer(error) => End::Error { side: writer, error },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};
    use tokio::io::{AsyncRead, AsyncWrite};

    /// Longer than any test runs.
    const LONG: Duration = Duration::from_secs(24 * 3600);
    const NO_LIMIT: Silence = Silence {
        device: None,
        both: LONG,
    };

    fn device_limit(limit: Duration) -> Silence {
        Silence {
            device: Some(limit),
            both: LONG,
        }
    }

    #[tokio::test]
    async fn copies_both_ways_and_honours_half_close() {
        let (mut dev_outer, mut dev_inner) = duplex(64);
        let (mut brk_outer, mut brk_inner) = duplex(64);
        let task = tokio::spawn(async move { pipe(&mut dev_inner, &mut brk_inner, NO_LIMIT, None).await });

        dev_outer.write_all(b"hello broker").await.unwrap();
        dev_outer.shutdown().await.unwrap();
        let mut got = Vec::new();
        brk_outer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello broker");

        // The device has half-closed; the broker can still answer.
        brk_outer.write_all(b"late reply").await.unwrap();
        brk_outer.shutdown().await.unwrap();
        let mut reply = Vec::new();
        dev_outer.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"late reply");

        let t = task.await.unwrap();
        assert_eq!((t.device_to_broker, t.broker_to_device), (12, 10));
        assert!(matches!(t.end, End::Closed { first: Side::Device }), "{}", t.end);
    }

    #[tokio::test(start_paused = true)]
    async fn silent_device_is_cut_off_and_activity_resets_the_clock() {
        let (mut dev_outer, mut dev_inner) = duplex(64);
        let (_brk_outer, mut brk_inner) = duplex(64);
        let task = tokio::spawn(async move {
            pipe(
                &mut dev_inner,
                &mut brk_inner,
                device_limit(Duration::from_secs(15)),
                None,
            )
            .await
        });
        tokio::time::sleep(Duration::from_secs(10)).await;
        dev_outer.write_all(b"ping").await.unwrap();
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(!task.is_finished(), "activity at 10 s must push the limit to 25 s");
        let t = task.await.unwrap();
        assert!(
            matches!(t.end, End::DeviceSilent(d) if d == Duration::from_secs(15)),
            "{}",
            t.end
        );
        assert_eq!(t.device_to_broker, 4);
    }

    #[tokio::test]
    async fn bulk_bytes_arrive_intact_through_a_narrow_writer() {
        let (mut dev_outer, mut dev_inner) = duplex(300);
        let (mut brk_outer, mut brk_inner) = duplex(700);
        let task = tokio::spawn(async move { pipe(&mut dev_inner, &mut brk_inner, NO_LIMIT, None).await });
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            dev_outer.write_all(&sent).await.unwrap();
            dev_outer.shutdown().await.unwrap();
            dev_outer
        });
        let mut got = Vec::new();
        brk_outer.read_to_end(&mut got).await.unwrap();
        assert!(got == data, "bytes changed or reordered");
        drop(brk_outer);
        drop(writer.await.unwrap());
        assert_eq!(task.await.unwrap().device_to_broker, data.len() as u64);
    }

    /// A writer that accepts nothing and fails on flush, as a broker socket that was reset.
    struct Broken;

    impl AsyncRead for Broken {
        fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, _: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for Broken {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, _: &[u8]) -> Poll<io::Result<usize>> {
            Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_failing_broker_is_blamed_even_when_the_device_is_idle() {
        let (_dev_outer, mut dev_inner) = duplex(64);
        let t = pipe(&mut dev_inner, &mut Broken, NO_LIMIT, None).await;
        assert!(matches!(t.end, End::Error { side: Side::Broker, .. }), "{}", t.end);
    }

    #[tokio::test(start_paused = true)]
    async fn a_broker_that_takes_nothing_is_reported_as_stalled_not_the_device_as_silent() {
        let (mut dev_outer, mut dev_inner) = duplex(1 << 20);
        let (_brk_outer, mut brk_inner) = duplex(16);
        let task = tokio::spawn(async move {
            pipe(
                &mut dev_inner,
                &mut brk_inner,
                device_limit(Duration::from_secs(3)),
                None,
            )
            .await
        });
        dev_outer.write_all(&[1u8; 4096]).await.unwrap();
        let t = task.await.unwrap();
        assert!(matches!(t.end, End::BrokerStalled(_)), "{}", t.end);
        assert_eq!(t.device_to_broker, 16, "only what the broker took");
    }

    /// A broker that says nothing (end of stream at once), takes everything, and remembers the size of
    /// each write.
    #[derive(Default)]
    struct Recording(std::sync::Arc<std::sync::Mutex<Vec<usize>>>);

    impl AsyncRead for Recording {
        fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, _: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Recording {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
            self.0.lock().unwrap().push(b.len());
            Poll::Ready(Ok(b.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_sender_that_keeps_filling_the_buffer_gets_bulk_writes() {
        let (mut dev_outer, mut dev_inner) = duplex(1 << 20);
        let writes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut broker = Recording(writes.clone());
        let data = vec![9u8; 4 * BULK_BUFFER_SIZE];
        dev_outer.write_all(&data).await.unwrap();
        dev_outer.shutdown().await.unwrap();
        let t = pipe(&mut dev_inner, &mut broker, NO_LIMIT, None).await;
        assert_eq!(t.device_to_broker, data.len() as u64);
        let writes = writes.lock().unwrap();
        assert_eq!(writes.iter().sum::<usize>(), data.len());
        assert_eq!(writes[0], COPY_BUFFER_SIZE, "the first burst read: {writes:?}");
        assert!(writes.contains(&BULK_BUFFER_SIZE), "no bulk write: {writes:?}");
    }

    #[test]
    fn bulk_buffers_stop_at_their_budget_and_come_back_when_dropped() {
        static BUDGET: BulkBudget = BulkBudget::new(2);
        let a = Buffer::bulk(&BUDGET).expect("first");
        let b = Buffer::bulk(&BUDGET).expect("second");
        assert!(Buffer::bulk(&BUDGET).is_none(), "a third beyond a budget of two");
        drop(a);
        let c = Buffer::bulk(&BUDGET).expect("one given back");
        assert_eq!((b.len(), c.len()), (BULK_BUFFER_SIZE, BULK_BUFFER_SIZE));
    }

    #[tokio::test]
    async fn a_packet_larger_than_the_stack_buffer_goes_out_in_one_write() {
        let (mut dev_outer, mut dev_inner) = duplex(64 * 1024);
        let writes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut broker = Recording(writes.clone());
        dev_outer.write_all(&[7u8; SMALL_READ + 35]).await.unwrap();
        dev_outer.shutdown().await.unwrap();
        let t = pipe(&mut dev_inner, &mut broker, NO_LIMIT, None).await;
        assert_eq!(t.device_to_broker, (SMALL_READ + 35) as u64);
        assert_eq!(*writes.lock().unwrap(), vec![SMALL_READ + 35]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_device_with_keep_alive_0_is_cut_at_max_idle_unless_something_passes() {
        let (mut dev_outer, mut dev_inner) = duplex(64);
        let (mut brk_outer, mut brk_inner) = duplex(64);
        let idle = Duration::from_secs(3600);
        let limits = Silence {
            device: None,
            both: idle,
        };
        let task = tokio::spawn(async move { pipe(&mut dev_inner, &mut brk_inner, limits, None).await });
        tokio::time::sleep(Duration::from_secs(3000)).await;
        // The broker speaks: the connection is not idle, though the device is silent.
        brk_outer.write_all(b"retained").await.unwrap();
        let mut got = [0u8; 8];
        dev_outer.read_exact(&mut got).await.unwrap();
        tokio::time::sleep(Duration::from_secs(3000)).await;
        assert!(!task.is_finished(), "something passed 3,000 s ago");
        let started = tokio::time::Instant::now();
        let t = task.await.unwrap();
        assert!(matches!(t.end, End::Idle(d) if d == idle), "{}", t.end);
        assert_eq!(started.elapsed(), Duration::from_secs(600));
    }

    #[tokio::test(start_paused = true)]
    async fn the_keep_alive_limit_comes_first_when_it_is_shorter_and_the_broker_talking_does_not_reset_it() {
        let (_dev_outer, mut dev_inner) = duplex(64);
        let (mut brk_outer, mut brk_inner) = duplex(1024);
        let limits = Silence {
            device: Some(Duration::from_secs(90)),
            both: Duration::from_secs(3600),
        };
        let task = tokio::spawn(async move { pipe(&mut dev_inner, &mut brk_inner, limits, None).await });
        for _ in 0..8 {
            tokio::time::sleep(Duration::from_secs(10)).await;
            brk_outer.write_all(b"x").await.unwrap();
        }
        let t = task.await.unwrap();
        assert!(
            matches!(t.end, End::DeviceSilent(d) if d == Duration::from_secs(90)),
            "{}",
            t.end
        );
    }

    fn retire_after(after: Duration) -> Box<Retire<'static>> {
        let due = Box::pin(async move {
            tokio::time::sleep(after).await;
            Retirement::Renewed
        });
        Retire::new(due, Duration::from_secs(2), Duration::from_secs(600))
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_connection_is_retired_once_due() {
        let (mut dev_outer, mut dev_inner) = duplex(64);
        let (mut brk_outer, mut brk_inner) = duplex(64);
        let retire = retire_after(Duration::from_secs(100));
        let task = tokio::spawn(async move { pipe(&mut dev_inner, &mut brk_inner, NO_LIMIT, Some(retire)).await });
        let started = tokio::time::Instant::now();
        let t = task.await.unwrap();
        assert!(matches!(t.end, End::Retired(Retirement::Renewed)), "{}", t.end);
        assert_eq!(started.elapsed(), Duration::from_secs(100));
        let mut rest = Vec::new();
        dev_outer.read_to_end(&mut rest).await.unwrap();
        brk_outer.read_to_end(&mut rest).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_retired_between_packets_not_in_the_middle_of_them() {
        let (mut dev_outer, mut dev_inner) = duplex(64);
        let (_brk_outer, mut brk_inner) = duplex(1 << 20);
        let retire = retire_after(Duration::from_secs(10));
        let task = tokio::spawn(async move { pipe(&mut dev_inner, &mut brk_inner, NO_LIMIT, Some(retire)).await });
        // A packet every second until 30 s, then silence.
        for _ in 0..30 {
            dev_outer.write_all(b"PUBLISH").await.unwrap();
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert!(!task.is_finished(), "retired while packets were passing");
        }
        let t = task.await.unwrap();
        assert!(matches!(t.end, End::Retired(_)), "{}", t.end);
        assert_eq!(t.device_to_broker, 30 * 7, "every packet passed before the end");
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_is_never_quiet_is_retired_after_its_patience() {
        let (mut dev_outer, mut dev_inner) = duplex(64);
        let (_brk_outer, mut brk_inner) = duplex(1 << 20);
        let retire = retire_after(Duration::from_secs(10));
        let task = tokio::spawn(async move { pipe(&mut dev_inner, &mut brk_inner, NO_LIMIT, Some(retire)).await });
        let started = tokio::time::Instant::now();
        while !task.is_finished() {
            let _ = dev_outer.write_all(b"x").await;
            tokio::time::sleep(Duration::from_millis(500)).await;
            assert!(started.elapsed() < Duration::from_secs(700), "never retired");
        }
        let t = task.await.unwrap();
        assert!(matches!(t.end, End::Retired(_)), "{}", t.end);
        assert!(started.elapsed() >= Duration::from_secs(610), "{:?}", started.elapsed());
    }
}
