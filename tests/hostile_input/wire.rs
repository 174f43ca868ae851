//! Raw-TCP exchanges with ingest, their tally, and slow clients.

use super::*;

/// How an exchange ended.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Exchange {
    pub(crate) statuses: Vec<u16>,
    /// "answered", "eof", "reset" or "timeout".
    pub(crate) end: &'static str,
    pub(crate) elapsed: Duration,
}

/// Finds complete responses in `buf`; returns their final statuses (1xx skipped)
/// and how many bytes they used.
pub(crate) fn parse_responses(buf: &[u8]) -> (Vec<u16>, usize) {
    let mut statuses = Vec::new();
    let mut at = 0;
    loop {
        let rest = &buf[at..];
        let Some(end) = rest.windows(4).position(|w| w == b"\r\n\r\n") else {
            break;
        };
        let head = String::from_utf8_lossy(&rest[..end]).to_string();
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let length: usize = head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(0);
        let total = end
            + 4
            + if (100..200).contains(&status) {
                0
            } else {
                length
            };
        if rest.len() < total {
            break;
        }
        at += total;
        if !(100..200).contains(&status) {
            statuses.push(status);
        }
    }
    (statuses, at)
}

/// Sends `bytes` (concurrently with reading, so that an early answer is seen),
/// optionally half-closes, and reads until `want` final answers, EOF or `timeout`.
pub(crate) async fn exchange(
    addr: SocketAddr,
    bytes: Vec<u8>,
    half_close: bool,
    want: usize,
    timeout: Duration,
) -> Exchange {
    let started = Instant::now();
    let stream = match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(_) => {
            return Exchange {
                statuses: vec![],
                end: "refused",
                elapsed: started.elapsed(),
            };
        }
    };
    let (mut rd, mut wr) = stream.into_split();
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&bytes).await;
        if half_close {
            let _ = wr.shutdown().await;
        }
        // Keep the write half open (unless half-closed) until the reader is done.
        wr
    });
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let deadline = tokio::time::Instant::now() + timeout;
    let end = loop {
        match tokio::time::timeout_at(deadline, rd.read(&mut chunk)).await {
            Err(_) => break "timeout",
            Ok(Ok(0)) => break "eof",
            Ok(Ok(n)) => {
                buf.extend_from_slice(&chunk[..n]);
                if parse_responses(&buf).0.len() >= want {
                    break "answered";
                }
            }
            Ok(Err(_)) => break "reset",
        }
    };
    writer.abort();
    Exchange {
        statuses: parse_responses(&buf).0,
        end,
        elapsed: started.elapsed(),
    }
}

#[derive(Default)]
pub(crate) struct Tally {
    pub(crate) cases: u64,
    pub(crate) by_status: BTreeMap<String, u64>,
    pub(crate) by_label: BTreeMap<String, BTreeMap<String, u64>>,
    pub(crate) accepted_202: u64,
    pub(crate) duplicates_200: u64,
    pub(crate) failures: Vec<String>,
    pub(crate) five_oh_five: u64,
    pub(crate) closed_without_answer: u64,
    pub(crate) gzip_declared_accepted: u64,
    pub(crate) max_case_s: f64,
}

pub(crate) fn record(tally: &Mutex<Tally>, case: &Case, ex: &Exchange) {
    let mut t = tally.lock().unwrap();
    t.cases += 1;
    t.max_case_s = t.max_case_s.max(ex.elapsed.as_secs_f64());
    let key = match ex.statuses.first() {
        Some(s) => s.to_string(),
        None => format!("no_answer:{}", ex.end),
    };
    *t.by_status.entry(key.clone()).or_default() += 1;
    let first_label = case.label.split('+').next().unwrap_or("").to_owned();
    *t.by_label
        .entry(first_label)
        .or_default()
        .entry(key)
        .or_default() += 1;
    let show = || {
        let head = String::from_utf8_lossy(&case.bytes[..case.bytes.len().min(300)]);
        format!(
            "case {} [{}] {:?}: {}",
            case.n,
            case.label,
            ex,
            without_signature(&head)
        )
    };
    match ex.statuses.first().copied() {
        None if ex.end == "timeout" => t.failures.push(format!("HANG: {}", show())),
        None => {
            t.closed_without_answer += 1;
            if !case.may_close {
                t.failures
                    .push(format!("closed without an answer: {}", show()));
            }
        }
        Some(505) if case.may_505 => t.five_oh_five += 1,
        Some(s) if s >= 500 => t.failures.push(format!("{s}: {}", show())),
        Some(s @ 200..=299) => {
            if case.expect == Expect::Invalid {
                t.failures
                    .push(format!("invalid input accepted with {s}: {}", show()));
            }
            if s == 202 {
                t.accepted_202 += 1;
            } else {
                t.duplicates_200 += 1;
            }
            if case.label.contains("content_encoding_gzip") {
                t.gzip_declared_accepted += 1;
            }
        }
        Some(s @ 400..=499) => {
            let _ = s;
        }
        Some(s) => t
            .failures
            .push(format!("unexpected status {s}: {}", show())),
    }
}

/// A request as reported, with its signature's value left out.
pub(crate) fn without_signature(head: &str) -> String {
    head.split_inclusive('\n')
        .map(|line| {
            let name = line.split(':').next().unwrap_or("");
            if name.eq_ignore_ascii_case("x-zendesk-webhook-signature") {
                "X-Zendesk-Webhook-Signature: <redacted>\r\n"
            } else {
                line
            }
        })
        .collect()
}

pub(crate) async fn signed_post(http: &reqwest::Client, url: &str, body: &str) -> Option<u16> {
    let answer = common::try_post_signed(http, url, body).await.ok();
    answer.map(|(status, _)| status)
}

pub(crate) async fn healthz(addr: SocketAddr) -> Option<u16> {
    let ex = exchange(
        addr,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
        false,
        1,
        Duration::from_secs(5),
    )
    .await;
    ex.statuses.first().copied()
}

/// Trickles `bytes` one byte per `every` until the server closes or `limit` passes;
/// answers (closed by the server?, after how long, status if any).
pub(crate) async fn trickle(
    addr: SocketAddr,
    bytes: Vec<u8>,
    every: Duration,
    limit: Duration,
) -> (bool, Duration, Option<u16>) {
    let started = Instant::now();
    let Ok(stream) = TcpStream::connect(addr).await else {
        return (true, started.elapsed(), None);
    };
    let (mut rd, mut wr) = stream.into_split();
    let writer = tokio::spawn(async move {
        for b in bytes.iter().cycle() {
            if wr.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(every).await;
        }
    });
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let closed = loop {
        match tokio::time::timeout(limit.saturating_sub(started.elapsed()), rd.read(&mut chunk))
            .await
        {
            Err(_) => break false,
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    writer.abort();
    (
        closed,
        started.elapsed(),
        parse_responses(&buf).0.first().copied(),
    )
}
