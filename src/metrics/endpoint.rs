//! The scrape endpoint: just enough HTTP/1.1 for Prometheus (`GET /metrics`) and a liveness probe
//! (`GET /health`).
//!
//! A full HTTP stack would be the largest dependency of the daemon for one fixed page. This one reads a
//! bounded request head under a timeout, answers once and closes, and serves a bounded number of clients
//! at a time, so whoever can reach the port cannot pin memory or tasks.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::Metrics;

/// Scrapes served at once; more wait in the listen backlog.
const MAX_CLIENTS: usize = 8;
/// Longest request head accepted.
const MAX_REQUEST: usize = 8 * 1024;
/// Time a client has to send its request head: a scraper sends it at once, and idle clients must not
/// hold the few slots for long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Time a client has, in all, to send its request and take the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `GET /metrics` on `listener` until `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    let clients = Arc::new(Semaphore::new(MAX_CLIENTS));
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return,
            p = clients.clone().acquire_owned() => p.expect("the semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "metrics endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = timeout(CLIENT_TIMEOUT, answer(stream, &metrics))
                .await
                .unwrap_or_else(|_| Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "client too slow")))
            {
                debug!(%peer, error = %e, "metrics endpoint: client dropped");
            }
            drop(permit);
        });
    }
}

async fn answer(mut stream: TcpStream, metrics: &Arc<Metrics>) -> std::io::Result<()> {
    let head = timeout(REQUEST_TIMEOUT, read_head(&mut stream))
        .await
        .unwrap_or_else(|_| Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "no request in time")))?;
    let (status, content_type, body) = match route(&head) {
        Route::Metrics => {
            // Thousands of devices make a page of megabytes: render it off the threads that serve devices.
            let metrics = metrics.clone();
            let page = tokio::task::spawn_blocking(move || metrics.render())
                .await
                .map_err(std::io::Error::other)?;
            ("200 OK", "text/plain; version=0.0.4; charset=utf-8", page)
        }
        Route::Health => ("200 OK", "text/plain; charset=utf-8", "ok\n".to_string()),
        Route::NotFound => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "mqtls serves /metrics and /health\n".to_string(),
        ),
        Route::NotAllowed => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "GET only\n".to_string(),
        ),
        Route::Bad => (
            "400 Bad Request",
            "text/plain; charset=utf-8",
            "bad request\n".to_string(),
        ),
    };
    let head_only = head.starts_with(b"HEAD ");
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        response.extend_from_slice(body.as_bytes());
    }
    stream.write_all(&response).await?;
    stream.shutdown().await
}

/// Reads until the blank line that ends the request head; a longer head is an error.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.extend_from_slice(&chunk[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            return Ok(head);
        }
        if head.len() > MAX_REQUEST {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "request head too large",
            ));
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics,
    Health,
    NotFound,
    NotAllowed,
    Bad,
}

fn route(head: &[u8]) -> Route {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let mut parts = line.split(|b| *b == b' ');
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Route::Bad;
    };
    if method != b"GET" && method != b"HEAD" {
        return Route::NotAllowed;
    }
    let path = target.split(|b| *b == b'?').next().unwrap_or_default();
    match path {
        b"/metrics" => Route::Metrics,
        b"/health" => Route::Health,
        _ => Route::NotFound,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(route(b"GET /metrics HTTP/1.1\r\n\r\n"), Route::Metrics);
        assert_eq!(route(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"), Route::Metrics);
        assert_eq!(route(b"HEAD /health HTTP/1.1\r\n\r\n"), Route::Health);
        assert_eq!(route(b"POST /metrics HTTP/1.1\r\n\r\n"), Route::NotAllowed);
        assert_eq!(route(b"GET / HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(route(b"garbage\r\n\r\n"), Route::Bad);
    }
}
