//! The broker side of a proxied connection while it holds its turn to connect (see [`super::pacing`]).
//!
//! A connection keeps its turn until the broker first answers on it (its CONNACK), not only until the
//! TLS handshake ends on our side: until then the broker still has work to do for it (our last handshake
//! message, the CONNECT), and by then it has sent its TLS 1.3 session tickets, so that the next
//! connection to start can resume a session (cheaper for the broker) rather than make a full handshake.
//! How long that took is what the line of connects learns the broker's pace from.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::ReadBuf;
use tokio::time::{sleep, Sleep};

use super::pacing::Turn as PacedTurn;
use crate::duplex::Duplex;

/// A session with the broker that holds a turn to connect until the broker first answers on it (a read
/// that returns bytes, the end of the stream or an error), or for at most `answer_within` after the
/// handshake, so that a broker that never answers does not keep it.
pub(crate) struct BrokerStream<S> {
    inner: S,
    turn: Option<Turn>,
}

struct Turn {
    turn: PacedTurn,
    deadline: Pin<Box<Sleep>>,
}

impl<S> BrokerStream<S> {
    pub(crate) fn new(inner: S, turn: PacedTurn, answer_within: Duration) -> BrokerStream<S> {
        let turn = Turn {
            turn,
            deadline: Box::pin(sleep(answer_within)),
        };
        BrokerStream {
            inner,
            turn: Some(turn),
        }
    }
}

impl<S> std::fmt::Debug for BrokerStream<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerStream")
            .field("holds_turn", &self.turn.is_some())
            .finish_non_exhaustive()
    }
}

impl<S: Duplex> Duplex for BrokerStream<S> {
    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let polled = self.inner.poll_read(cx, buf);
        if let Some(turn) = &mut self.turn {
            // Polling the deadline registers this task to be woken when it passes.
            if polled.is_ready() {
                turn.turn.answered();
                self.turn = None;
            } else if turn.deadline.as_mut().poll(cx).is_ready() {
                turn.turn.timed_out();
                self.turn = None;
            }
        }
        polled
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        self.inner.poll_write(cx, data)
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner.poll_flush(cx)
    }

    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::time::timeout;

    use crate::upstream::pacing::Pacer;

    #[tokio::test]
    async fn the_turn_is_kept_until_the_broker_first_answers() {
        let pacer = Pacer::new(1);
        let (mut broker, ours) = tokio::io::duplex(64);
        let turn = pacer.turn(Duration::ZERO).await.unwrap();
        let mut s = BrokerStream::new(ours, turn, Duration::from_secs(3600));
        s.io().write_all(b"CONNECT").await.unwrap();
        assert!(pacer.turn(Duration::ZERO).await.is_none(), "writing is no answer");
        broker.write_all(b"CONNACK").await.unwrap();
        let mut got = [0u8; 7];
        s.io().read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"CONNACK");
        assert!(
            pacer.turn(Duration::ZERO).await.is_some(),
            "given back at the first answer"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_broker_that_never_answers_keeps_the_turn_only_until_the_deadline() {
        let pacer = Pacer::new(1);
        let (_broker, ours) = tokio::io::duplex(64);
        let turn = pacer.turn(Duration::ZERO).await.unwrap();
        let s = BrokerStream::new(ours, turn, Duration::from_secs(10));
        let reader = tokio::spawn(async move {
            let mut s = s;
            let mut b = [0u8; 1];
            s.io().read(&mut b).await
        });
        tokio::time::sleep(Duration::from_secs(9)).await;
        assert!(pacer.turn(Duration::ZERO).await.is_none());
        // Only the deadline can wake the reader: the broker says nothing.
        let again = timeout(Duration::from_secs(60), pacer.turn(Duration::from_secs(3600))).await;
        assert!(again.is_ok(), "the turn was not given back at the deadline");
        assert!(!reader.is_finished(), "the stream itself stays open");
    }
}
