//! What mqtls logs while it runs in-process, captured per test so that a test can assert what an operator
//! would read.

use std::cell::RefCell;
use std::io;
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

/// Captures the tracing output of one test. One subscriber serves the whole test binary (tracing caches
/// each callsite's interest globally, so per-thread subscribers would miss events when tests run in
/// parallel); it hands every line to the capture of the thread that logged it. A `#[tokio::test]` runs its
/// body and every task it spawns, mqtls in-process included, on the test's own thread, so a `Logs` holds
/// its own test's lines and no other's. Lines logged on a thread without a capture are dropped.
#[derive(Clone)]
pub struct Logs {
    lines: Capture,
}

/// Ends the capture when dropped; hold it for as long as the test reads its logs.
pub struct LogGuard {
    previous: Option<Capture>,
}

type Capture = Arc<Mutex<Vec<u8>>>;

thread_local! {
    /// Where lines logged on this thread go.
    static CAPTURE: RefCell<Option<Capture>> = const { RefCell::new(None) };
}

/// The writer for one log line: the logging thread's capture, if it has one.
struct ThreadCapture(Option<Capture>);

impl ThreadCapture {
    fn current() -> ThreadCapture {
        ThreadCapture(CAPTURE.with(|c| c.borrow().clone()))
    }
}

impl io::Write for ThreadCapture {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(lines) = &self.0 {
            lines.lock().unwrap().extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn install_subscriber() {
    static INSTALLED: Once = Once::new();
    INSTALLED.call_once(|| {
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter("debug,rustls=info,rumqttc=info")
            .with_ansi(false)
            .with_writer(ThreadCapture::current)
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("one global subscriber per test binary");
    });
}

impl Logs {
    /// Starts capturing what this thread logs (from now on, until the guard is dropped).
    pub fn capture() -> (Logs, LogGuard) {
        install_subscriber();
        let lines = Capture::default();
        let previous = CAPTURE.with(|c| c.replace(Some(lines.clone())));
        (Logs { lines }, LogGuard { previous })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.lines.lock().unwrap()).into_owned()
    }

    /// Waits until a line contains every one of `needles`; returns that line.
    pub async fn wait_line(&self, needles: &[&str], timeout: Duration) -> Result<String, String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(line) = self.text().lines().find(|l| needles.iter().all(|n| l.contains(n))) {
                return Ok(line.to_string());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "no log line with {needles:?} within {timeout:?}; log:\n{}",
                    self.text()
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        let previous = self.previous.take();
        CAPTURE.with(|c| *c.borrow_mut() = previous);
    }
}
