//! Copies bytes both ways between the device and the broker until both directions have ended.
//!
//! This is the path every byte takes after the CONNECT, so it is built for idle fleets: a direction holds
//! a copy buffer only while it has bytes in flight, and gives it back as soon as its reader has nothing
//! more (most sensors are silent almost all the time). Half-close is honoured: end-of-stream on one side
//! becomes a write shutdown (for TLS, a close_notify) on the other, and the opposite direction keeps
//! flowing until it ends too. The device's silence is bounded by its MQTT keep-alive. The copy knows
//! nothing about TLS or MQTT: it moves bytes between two streams.

use std::fmt;
use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Size of a copy buffer while bytes are in flight: one full TLS record of plaintext.
pub const COPY_BUFFER_SIZE: usize = 16 * 1024;

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
            End::DeviceSilent(limit) => write!(f, "device silent for {:?} (1.5 x keep-alive)", limit),
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
    buf: Option<Box<[u8]>>,
    start: usize,
    end: usize,
    read_done: bool,
    done: bool,
    bytes: u64,
}

impl Half {
    /// Moves bytes from `reader` to `writer` until the reader would block (Pending) or the direction has
    /// finished (Ready). `activity` is set when bytes were read or written.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
        activity: &mut bool,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        loop {
            if self.start < self.end {
                let buf = self.buf.as_deref().unwrap_or_default();
                let n = ready!(Pin::new(&mut *writer).poll_write(cx, &buf[self.start..self.end]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.start += n;
                self.bytes += n as u64;
                // Progress while the reader waited on the writer: the device is not silent, we were busy.
                *activity = true;
                continue;
            }
            if self.read_done {
                ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                // The peer may already be gone; its end-of-stream is then reported by the other direction.
                let _ = ready!(Pin::new(&mut *writer).poll_shutdown(cx));
                self.buf = None;
                return Poll::Ready(Ok(()));
            }
            let buf = self
                .buf
                .get_or_insert_with(|| vec![0; COPY_BUFFER_SIZE].into_boxed_slice());
            let mut rb = ReadBuf::new(buf);
            match Pin::new(&mut *reader).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    (self.start, self.end) = (0, n);
                    if n == 0 {
                        self.read_done = true;
                    } else {
                        *activity = true;
                    }
                }
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => self.read_done = true,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // Nothing to read: give the buffer back, and push out anything the writer still holds.
                    self.buf = None;
                    ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                    return Poll::Pending;
                }
            }
        }
    }
}

/// Copies between `device` and `broker` until both directions end, an error occurs, or the device stays
/// silent longer than `silence_limit` (`None`: no limit).
pub async fn pipe<D, B>(device: &mut D, broker: &mut B, silence_limit: Option<Duration>) -> Transfer
where
    D: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut up = Half::default();
    let mut down = Half::default();
    let mut first_closed = None;
    let mut silence: Option<Pin<Box<Sleep>>> = silence_limit.map(|d| Box::pin(tokio::time::sleep(d)));

    let end = poll_fn(|cx| {
        if !up.done {
            let mut activity = false;
            let r = up.poll_copy(cx, device, broker, &mut activity);
            if activity {
                if let (Some(sleep), Some(limit)) = (silence.as_mut(), silence_limit) {
                    sleep.as_mut().reset(Instant::now() + limit);
                }
            }
            match r {
                Poll::Ready(Ok(())) => {
                    up.done = true;
                    first_closed.get_or_insert(Side::Device);
                }
                Poll::Ready(Err(error)) => {
                    return Poll::Ready(End::Error {
                        side: failing_side(&up, Side::Device),
                        error,
                    })
                }
                Poll::Pending => {}
            }
        }
        if !down.done {
            let mut activity = false;
            match down.poll_copy(cx, broker, device, &mut activity) {
                Poll::Ready(Ok(())) => {
                    down.done = true;
                    first_closed.get_or_insert(Side::Broker);
                }
                Poll::Ready(Err(error)) => {
                    return Poll::Ready(End::Error {
                        side: failing_side(&down, Side::Broker),
                        error,
                    })
                }
                Poll::Pending => {}
            }
        }
        if up.done && down.done {
            return Poll::Ready(End::Closed {
                first: first_closed.unwrap_or(Side::Device),
            });
        }
        if let (Some(sleep), Some(limit)) = (silence.as_mut(), silence_limit) {
            if !up.done && sleep.as_mut().poll(cx).is_ready() {
                return Poll::Ready(End::DeviceSilent(limit));
            }
        }
        Poll::Pending
    })
    .await;

    Transfer {
        device_to_broker: up.bytes,
        broker_to_device: down.bytes,
        end,
    }
}

/// An error while bytes were waiting to be written came from the writer's side; otherwise the reader's.
fn failing_side(half: &Half, reader: Side) -> Side {
    let writing = half.start < half.end || half.read_done;
    match (writing, reader) {
        (false, side) => side,
        (true, Side::Device) => Side::Broker,
        (true, Side::Broker) => Side::Device,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn copies_both_ways_and_honours_half_close() {
        let (mut dev_outer, mut dev_inner) = duplex(64);
        let (mut brk_outer, mut brk_inner) = duplex(64);
        let task = tokio::spawn(async move { pipe(&mut dev_inner, &mut brk_inner, None).await });

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
        let task =
            tokio::spawn(async move { pipe(&mut dev_inner, &mut brk_inner, Some(Duration::from_secs(15))).await });
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
}
