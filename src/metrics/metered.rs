//! A stream adapter that counts bytes into a device's [`DeviceStats`] as they pass, so that
//! `mqtls_bytes_total` moves while a connection lives (sensors stay connected for months) and the copy
//! loop stays ignorant of metrics.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::DeviceStats;

/// Wraps the device's side of a connection: what is read from it goes to the broker, what is written
/// to it came from the broker.
pub struct Metered<'a, S> {
    inner: S,
    stats: &'a DeviceStats,
}

impl<'a, S> Metered<'a, S> {
    /// Counts the bytes that pass through `inner` into `stats`.
    pub fn new(inner: S, stats: &'a DeviceStats) -> Self {
        Metered { inner, stats }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<'_, S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        self.stats.add_to_broker((buf.filled().len() - before) as u64);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<'_, S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let n = ready!(Pin::new(&mut self.inner).poll_write(cx, data))?;
        self.stats.add_to_device(n as u64);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let n = ready!(Pin::new(&mut self.inner).poll_write_vectored(cx, bufs))?;
        self.stats.add_to_device(n as u64);
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn counts_both_directions() {
        let stats = DeviceStats::default();
        let (mut outer, inner) = duplex(64);
        let mut m = Metered::new(inner, &stats);
        outer.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(m.read(&mut buf).await.unwrap(), 5);
        m.write_all(b"abc").await.unwrap();
        assert_eq!(stats.to_broker.load(std::sync::atomic::Ordering::Relaxed), 5);
        assert_eq!(stats.to_device.load(std::sync::atomic::Ordering::Relaxed), 3);
    }
}
