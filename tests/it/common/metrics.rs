//! Scraping mqtls's metrics endpoint the way Prometheus does, and reading values out of the text format.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `GET path` over HTTP/1.1; returns the status line and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect to the metrics endpoint");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/plain\r\n\r\n");
    s.write_all(request.as_bytes()).await.expect("send request");
    let mut response = Vec::new();
    s.read_to_end(&mut response).await.expect("read response");
    let text = String::from_utf8(response).expect("UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
    (head.lines().next().unwrap_or_default().to_string(), body.to_string())
}

/// Scrapes `/metrics` until `cond` holds (`what` names it in the failure), waiting up to
/// [`GUARD`](super::daemon::GUARD).
pub async fn scrape_until(addr: SocketAddr, what: &str, cond: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = tokio::time::Instant::now() + super::daemon::GUARD;
    loop {
        let s = Scrape::take(addr).await;
        if cond(&s) {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never: {what}; last scrape:\n{}",
            s.0
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// One scrape of `/metrics`.
#[derive(Debug, Clone)]
pub struct Scrape(pub String);

impl Scrape {
    pub async fn take(addr: SocketAddr) -> Scrape {
        let (status, body) = http_get(addr, "/metrics").await;
        assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
        Scrape(body)
    }

    /// The value of the sample written exactly as `series` (name and labels as rendered, e.g.
    /// `mqtls_bytes_total{device="a",direction="to_broker"}`); labels may come in any order.
    pub fn value(&self, series: &str) -> Option<f64> {
        let (name, labels) = split_series(series);
        self.0.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
            let (s, v) = l.rsplit_once(' ')?;
            let (n, ls) = split_series(s);
            (n == name && ls == labels).then(|| v.parse().ok()).flatten()
        })
    }

    /// Like [`Scrape::value`], panicking with the whole scrape when the series is missing.
    pub fn get(&self, series: &str) -> f64 {
        self.value(series)
            .unwrap_or_else(|| panic!("no series {series} in the scrape:\n{}", self.0))
    }

    /// Every metric family named on a `# TYPE` line, with its type.
    pub fn families(&self) -> Vec<(String, String)> {
        self.0
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_once(' '))
            .map(|(n, t)| (n.to_string(), t.to_string()))
            .collect()
    }

    /// The HELP text of a family.
    pub fn help(&self, family: &str) -> Option<String> {
        let prefix = format!("# HELP {family} ");
        self.0.lines().find_map(|l| l.strip_prefix(&prefix)).map(str::to_string)
    }
}

/// `name{a="1",b="2"}` -> (`name`, sorted labels).
fn split_series(s: &str) -> (String, Vec<String>) {
    match s.split_once('{') {
        Some((name, rest)) => {
            let mut labels: Vec<String> = rest
                .trim_end_matches('}')
                .split(',')
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect();
            labels.sort();
            (name.to_string(), labels)
        }
        None => (s.to_string(), Vec::new()),
    }
}
