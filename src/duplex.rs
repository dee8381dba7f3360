//! Streams whose two directions must be driven from one task, and the borrowed view through which the
//! rest of the crate reads and writes them.
//!
//! The broker side's TLS stream may write while it reads (the answer to a TLS key update) and its
//! transport keeps one waker per direction: were its reader and writer polled from two tasks (what
//! `tokio::io::split` and a spawned half would do), a wake-up could reach the wrong one and a direction
//! would stall for good. So such a stream implements [`Duplex`] instead of `AsyncRead`/`AsyncWrite`, and
//! is read and written through [`Io`], a view that borrows it: a split of the view borrows too, and no
//! half can be moved into another task, because `tokio::spawn` takes only `'static` futures.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A byte stream read and written from one task only.
pub(crate) trait Duplex: Unpin {
    /// As [`AsyncRead::poll_read`].
    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>>;
    /// As [`AsyncWrite::poll_write`].
    fn poll_write(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>>;
    /// As [`AsyncWrite::poll_flush`].
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// As [`AsyncWrite::poll_shutdown`].
    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;

    /// The stream as tokio's `AsyncRead + AsyncWrite`, for as long as it is borrowed.
    fn io(&mut self) -> Io<'_, Self>
    where
        Self: Sized,
    {
        Io(self)
    }
}

/// A borrowed [`Duplex`], readable and writable with tokio's traits and helpers.
pub(crate) struct Io<'a, D>(&'a mut D);

impl<D: Duplex> AsyncRead for Io<'_, D> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.get_mut().0.poll_read(cx, buf)
    }
}

impl<D: Duplex> AsyncWrite for Io<'_, D> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        self.get_mut().0.poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().0.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().0.poll_shutdown(cx)
    }
}

/// Plain streams (a TCP socket, an in-memory pipe in tests) have no such rule; they are duplex streams
/// too, so that code written for the broker side works on them.
impl<S: AsyncRead + AsyncWrite + Unpin> Duplex for S {
    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(self).poll_read(cx, buf)
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(self).poll_write(cx, data)
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self).poll_flush(cx)
    }

    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self).poll_shutdown(cx)
    }
}
