//! How many connections to the broker are opened at once, following the broker's pace.
//!
//! When a whole building's sensors come back at once, opening all their broker connections together
//! overflows the broker's accept queue and its CPU; the kernel drops the SYNs it has no room for and
//! retries them only after 1 s, 3 s, 7 s. So connects take turns: at most a limit of them are in flight
//! (from the TCP connect to the broker's first answer), and the rest wait in line, first come first
//! served, for up to `upstream.queue_timeout`. A device that only waited is never refused because the
//! line is long; only one that waited that long is.
//!
//! The limit follows the broker: each turn's set-up time (connect, TLS handshake, CONNACK) is compared
//! with the fastest seen lately. While set-ups stay close to it the limit grows (by one per set-up up to
//! where it last slowed down, then by one per round), up to `upstream.max_connecting`; when they take
//! several times longer, or a broker does not answer at all within the handshake timeout, the limit is
//! halved, at most once per round, down to a floor. The baseline creeps up slowly, so that a broker that
//! is slower for good is learnt rather than fought.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

/// The least the limit falls to (or the ceiling, if that is lower).
const FLOOR: usize = 4;
/// A set-up this many times slower than the baseline is a sign of a broker slowing down...
const SLOW_FACTOR: u32 = 4;
/// ... provided it is also this much slower: a LAN broker answering in 2 ms may take 8 ms under no strain.
const SLOW_MARGIN: Duration = Duration::from_millis(250);
/// The baseline grows by this share at each set-up, so that it is relearnt when the broker is slower for
/// good (doubling after about 350 set-ups).
const BASELINE_CREEP: f64 = 0.002;

/// The line of connects to the broker, shared by the connectors of every configuration generation that
/// has the same `upstream.max_connecting`.
#[derive(Debug)]
pub(crate) struct Pacer {
    state: Mutex<State>,
    ceiling: usize,
}

#[derive(Debug)]
struct State {
    /// Connects allowed in flight now.
    limit: f64,
    /// Where growth slows from one per set-up to one per round: the limit at the last slow-down.
    threshold: f64,
    in_flight: usize,
    waiting: VecDeque<oneshot::Sender<Turn>>,
    /// The fastest set-up seen lately.
    baseline: Option<Duration>,
    /// Set-ups completed, and how many had completed at the last slow-down (one per round).
    completed: u64,
    slowed_at: Option<u64>,
}

/// What a turn's end says about the broker's pace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pace {
    /// The broker answered after this long.
    Answered(Duration),
    /// It did not answer in time.
    TimedOut,
    /// Nothing to learn (the connect failed, or was given up).
    Unknown,
}

/// A turn to open one connection; gives itself back when dropped.
#[derive(Debug)]
pub(crate) struct Turn {
    pacer: Arc<Pacer>,
    started: Instant,
    pace: Pace,
    /// Whether dropping it gives it back (not for a turn that found nobody to take it).
    armed: bool,
}

impl Pacer {
    pub(crate) fn new(ceiling: usize) -> Arc<Pacer> {
        Arc::new(Pacer {
            state: Mutex::new(State {
                limit: ceiling as f64,
                threshold: ceiling as f64,
                in_flight: 0,
                waiting: VecDeque::new(),
                baseline: None,
                completed: 0,
                slowed_at: None,
            }),
            ceiling,
        })
    }

    /// The `upstream.max_connecting` this line was made for.
    pub(crate) fn ceiling(&self) -> usize {
        self.ceiling
    }

    fn floor(&self) -> f64 {
        FLOOR.min(self.ceiling) as f64
    }

    /// Waits in line for a turn, for at most `patience`; `None` if none came.
    pub(crate) async fn turn(self: &Arc<Self>, patience: Duration) -> Option<Turn> {
        let waiting = {
            let mut state = self.lock();
            if state.waiting.is_empty() && (state.in_flight as f64) < state.limit.floor() {
                state.in_flight += 1;
                return Some(self.granted());
            }
            let (tx, rx) = oneshot::channel();
            state.waiting.push_back(tx);
            rx
        };
        // A turn sent after the wait was given up is dropped with the channel, and so given back.
        tokio::time::timeout(patience, waiting).await.ok()?.ok()
    }

    fn granted(self: &Arc<Self>) -> Turn {
        Turn {
            pacer: self.clone(),
            started: Instant::now(),
            pace: Pace::Unknown,
            armed: true,
        }
    }

    /// The current limit, rounded down.
    pub(crate) fn limit(&self) -> usize {
        self.lock().limit as usize
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A turn has ended with `pace`: learn from it, then hand turns to those waiting, in order.
    fn give_back(self: &Arc<Self>, pace: Pace) {
        let mut state = self.lock();
        state.in_flight -= 1;
        self.learn(&mut state, pace);
        while (state.in_flight as f64) < state.limit.floor() {
            let Some(next) = state.waiting.pop_front() else { break };
            state.in_flight += 1;
            // A wait that was given up leaves a closed channel: the turn goes to the next in line.
            if let Err(mut unclaimed) = next.send(self.granted()) {
                unclaimed.armed = false;
                state.in_flight -= 1;
            }
        }
    }

    fn learn(&self, state: &mut State, pace: Pace) {
        let slow = match pace {
            Pace::Unknown => return,
            Pace::TimedOut => true,
            Pace::Answered(took) => {
                state.completed += 1;
                let baseline = state
                    .baseline
                    .map_or(took, |b| b.mul_f64(1.0 + BASELINE_CREEP).min(took));
                state.baseline = Some(baseline);
                took > (baseline * SLOW_FACTOR).max(baseline + SLOW_MARGIN)
            }
        };
        let ceiling = self.ceiling as f64;
        if !slow {
            let step = if state.limit < state.threshold {
                1.0
            } else {
                1.0 / state.limit
            };
            state.limit = (state.limit + step).min(ceiling);
        } else if pace == Pace::TimedOut
            || state
                .slowed_at
                .is_none_or(|at| state.completed >= at + state.limit as u64)
        {
            // At most once per round of set-ups for slow answers; a broker that does not answer at all
            // slows the line at once.
            // Back to where it slowed, quickly, once the broker is fast again; slowly beyond.
            state.threshold = state.limit.max(self.floor() * 2.0);
            state.limit = (state.limit / 2.0).max(self.floor());
            state.slowed_at = Some(state.completed);
        }
    }
}

impl Turn {
    /// The broker answered: the set-up took from the turn's start until now.
    pub(crate) fn answered(&mut self) {
        self.pace = Pace::Answered(self.started.elapsed());
    }

    /// The broker did not answer in time.
    pub(crate) fn timed_out(&mut self) {
        self.pace = Pace::TimedOut;
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        if self.armed {
            self.pacer.give_back(self.pace);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fast() -> Pace {
        Pace::Answered(Duration::from_millis(10))
    }

    fn slow() -> Pace {
        Pace::Answered(Duration::from_secs(2))
    }

    /// Ends `n` turns with `pace`, one at a time.
    async fn finish(pacer: &Arc<Pacer>, n: usize, pace: Pace) {
        for _ in 0..n {
            let mut turn = pacer.turn(Duration::ZERO).await.expect("a free turn");
            turn.pace = pace;
        }
    }

    #[tokio::test]
    async fn a_broker_that_slows_down_gets_fewer_connects_and_more_once_it_is_fast_again() {
        let pacer = Pacer::new(64);
        finish(&pacer, 10, fast()).await;
        assert_eq!(pacer.limit(), 64, "starts at max_connecting and stays there while fast");
        finish(&pacer, 1, slow()).await;
        assert_eq!(pacer.limit(), 32, "halved");
        finish(&pacer, 5, slow()).await;
        assert_eq!(pacer.limit(), 32, "at most once per round");
        finish(&pacer, 40, slow()).await;
        assert_eq!(pacer.limit(), 16, "once more a round later");
        finish(&pacer, 1000, slow()).await;
        assert_eq!(pacer.limit(), FLOOR, "never under the floor");
        finish(&pacer, 8, fast()).await;
        assert_eq!(pacer.limit(), 8, "up by one per fast set-up while under the threshold");
        finish(&pacer, 1000, fast()).await;
        assert!(pacer.limit() > 8, "then by one per round");
        finish(&pacer, 100_000, fast()).await;
        assert_eq!(pacer.limit(), 64, "up to max_connecting, not beyond");
    }

    #[tokio::test]
    async fn a_broker_that_does_not_answer_slows_the_line_at_once() {
        let pacer = Pacer::new(64);
        finish(&pacer, 1, Pace::TimedOut).await;
        finish(&pacer, 1, Pace::TimedOut).await;
        assert_eq!(pacer.limit(), 16);
        finish(&pacer, 100, Pace::Unknown).await;
        assert_eq!(pacer.limit(), 16, "failed connects teach nothing");
    }

    #[tokio::test]
    async fn those_waiting_are_served_in_order_as_turns_come_back() {
        let pacer = Pacer::new(1);
        let first = pacer.turn(Duration::ZERO).await.unwrap();
        let mut waiting = Vec::new();
        for i in 0..3 {
            let p = pacer.clone();
            waiting.push(tokio::spawn(async move {
                p.turn(Duration::from_secs(3600)).await.map(|_t| i)
            }));
            tokio::task::yield_now().await;
        }
        assert!(pacer.turn(Duration::ZERO).await.is_none(), "no turn without waiting");
        drop(first);
        for (i, w) in waiting.into_iter().enumerate() {
            assert_eq!(w.await.unwrap(), Some(i));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_given_up_does_not_lose_the_turn() {
        let pacer = Pacer::new(1);
        let first = pacer.turn(Duration::ZERO).await.unwrap();
        assert!(pacer.turn(Duration::from_secs(5)).await.is_none(), "gave up after 5 s");
        drop(first);
        assert!(
            pacer.turn(Duration::ZERO).await.is_some(),
            "the turn sent to nobody came back"
        );
    }
}
