//! Log capture for unit tests: what an operator would read, as lines.

use std::io;
use std::sync::{Arc, Mutex};

/// Runs `f` with a subscriber of its own (on this thread) and returns every line it logged, as the text
/// format writes them (without colours).
pub(crate) fn capture(f: impl FnOnce()) -> Vec<String> {
    let (captured, subscriber) = Captured::new();
    tracing::subscriber::with_default(subscriber, f);
    captured.lines()
}

/// For async tests on a current-thread runtime (their tasks run on this thread): what is logged on this
/// thread while the guard lives.
pub(crate) fn capture_here() -> (Captured, tracing::subscriber::DefaultGuard) {
    let (captured, subscriber) = Captured::new();
    (captured, tracing::subscriber::set_default(subscriber))
}

/// The lines a capture has taken so far.
pub(crate) struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn new() -> (Captured, impl tracing::Subscriber + Send + Sync) {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = Sink(buf.clone());
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || sink.clone())
            .finish();
        (Captured(buf), subscriber)
    }

    /// Every line so far, as the text format writes them (without colours).
    pub(crate) fn lines(&self) -> Vec<String> {
        let text = String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned();
        text.lines().map(str::to_string).collect()
    }
}

#[derive(Clone)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl io::Write for Sink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
