//! Hostile input against a real ingest, through the real HTTP stack (raw TCP, so
//! that framing, headers and encodings can be as broken as an attacker likes).
//!
//! A seeded generator (HOSTILE_SEED replays a campaign) produces HOSTILE_CASES
//! requests: mutations of the sample body (wrong types, missing fields, huge and
//! control-laden strings, invalid UTF-8, lone surrogates, bad amounts, deep nesting,
//! 5 MB bodies, duplicated keys), random bodies, random headers, content types,
//! encodings and framings (chunked, truncated, conflicting lengths), signed
//! correctly or not. Then truncated, slow and slowloris clients.
//!
//! It asserts: no panic, no 5xx, no hang, zero rows for invalid input (rows equal
//! the 202 answers), and the server still serving. Report: target/hostile/report.json.

#![recursion_limit = "512"]

#[path = "hostile_input/bodies.rs"]
mod bodies;
mod common;
#[path = "hostile_input/requests.rs"]
mod requests;
#[path = "hostile_input/wire.rs"]
mod wire;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bodies::*;
use common::{Ingest, SAMPLE, SECRET, TestEnv};
use outboxd::ingest::webhook;
use requests::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wire::*;

static PANICS: AtomicUsize = AtomicUsize::new(0);

const HEADER_TIMEOUT_MS: u64 = 1000;
const BODY_TIMEOUT_MS: u64 = 2000;
const BODY_LIMIT: usize = 1024 * 1024;
/// The cases `make test` replays; `HOSTILE_SEED` picks others.
const FIXED_SEED: u64 = 20261128;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_input_campaign() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        previous(info);
    }));
    let cases: u64 = std::env::var("HOSTILE_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1500);
    let seed: u64 = std::env::var("HOSTILE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        // Fixed cases in `make test`; `make fuzz` draws new ones.
        .unwrap_or(FIXED_SEED);
    println!("hostile: seed={seed} cases={cases} (HOSTILE_SEED / HOSTILE_CASES replay or resize)");
    let started = Instant::now();

    let env = TestEnv::new().await;
    let mut config = env.config();
    config.ingest.header_read_timeout_ms = HEADER_TIMEOUT_MS;
    config.ingest.body_read_timeout_ms = BODY_TIMEOUT_MS;
    let ingest = Ingest::start(&config).await;
    let addr = ingest.addr;
    // A new connection per request: a pooled one idles between requests, and
    // the server may close it (header timeout) just as it is reused.
    let http = common::http_builder()
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    assert_eq!(healthz(addr).await, Some(200));

    // 1. The campaign: generated cases, 8 at a time.
    let tally = Arc::new(Mutex::new(Tally::default()));
    let rng = Arc::new(Mutex::new(fastrand::Rng::with_seed(seed)));
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let runners: Vec<_> = (0..8)
        .map(|_| {
            let (tally, rng, next) = (tally.clone(), rng.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= cases {
                        return;
                    }
                    // Each case draws from its own stream, so a seed replays the same cases.
                    let case_seed = rng.lock().unwrap().u64(..) ^ n;
                    let case = gen_case(&mut fastrand::Rng::with_seed(case_seed), n);
                    let ex = exchange(
                        addr,
                        case.bytes.clone(),
                        case.half_close,
                        1,
                        Duration::from_secs(20),
                    )
                    .await;
                    record(&tally, &case, &ex);
                }
            })
        })
        .collect();
    for r in runners {
        r.await.unwrap();
    }
    let campaign_s = started.elapsed().as_secs_f64();

    // 2. Truncated requests: close mid-body, with and without a half-close.
    let mut truncated = Vec::new();
    for (i, half) in [(0, false), (1, true), (2, false), (3, true)] {
        let body = base(1_000_000 + i).to_string();
        let ts = stamp(0);
        let sig = webhook::sign(SECRET.as_bytes(), &ts, body.as_bytes());
        let mut bytes = format!(
            "POST /webhooks/email HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{}: {sig}\r\n{}: {ts}\r\nContent-Length: {}\r\n\r\n",
            webhook::SIGNATURE_HEADER,
            webhook::TIMESTAMP_HEADER,
            body.len()
        )
        .into_bytes();
        bytes.extend_from_slice(&body.as_bytes()[..body.len() / 2]);
        let ex = if half {
            exchange(addr, bytes, true, 1, Duration::from_secs(10)).await
        } else {
            // Write, then drop the connection entirely.
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(&bytes).await.unwrap();
            drop(s);
            Exchange {
                statuses: vec![],
                end: "dropped",
                elapsed: Duration::ZERO,
            }
        };
        if ex.end == "timeout" || ex.statuses.iter().any(|s| *s >= 500) {
            tally
                .lock()
                .unwrap()
                .failures
                .push(format!("truncated request: {ex:?}"));
        }
        truncated.push(json!({"half_close": half, "statuses": ex.statuses, "end": ex.end, "elapsed_s": ex.elapsed.as_secs_f64()}));
    }

    // 3. Slow requests: headers slower than the header timeout; a body slower than the body timeout.
    let slow_headers = trickle(
        addr,
        b"POST /webhooks/email HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".to_vec(),
        Duration::from_millis(200),
        Duration::from_secs(15),
    )
    .await;
    let slow_body = {
        let body = base(2_000_000).to_string();
        let ts = stamp(0);
        let sig = webhook::sign(SECRET.as_bytes(), &ts, body.as_bytes());
        let head = format!(
            "POST /webhooks/email HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{}: {sig}\r\n{}: {ts}\r\nContent-Length: {}\r\n\r\n",
            webhook::SIGNATURE_HEADER,
            webhook::TIMESTAMP_HEADER,
            body.len()
        );
        let stream = TcpStream::connect(addr).await.unwrap();
        let (rd, mut wr) = stream.into_split();
        wr.write_all(head.as_bytes()).await.unwrap();
        let started = Instant::now();
        let writer = tokio::spawn(async move {
            for b in body.as_bytes() {
                if wr.write_all(&[*b]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        let mut rd = rd;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let closed = loop {
            match tokio::time::timeout(
                Duration::from_secs(15).saturating_sub(started.elapsed()),
                rd.read(&mut chunk),
            )
            .await
            {
                Err(_) => break false,
                Ok(Ok(0)) | Ok(Err(_)) => break true,
                Ok(Ok(n)) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if !parse_responses(&buf).0.is_empty() {
                        break true;
                    }
                }
            }
        };
        writer.abort();
        (
            closed,
            started.elapsed(),
            parse_responses(&buf).0.first().copied(),
        )
    };
    let header_limit = Duration::from_millis(HEADER_TIMEOUT_MS + 2000);
    let body_limit = Duration::from_millis(BODY_TIMEOUT_MS + 2000);
    let slow_ok = slow_headers.0
        && slow_headers.1 <= header_limit
        && slow_body.0
        && slow_body.1 <= body_limit;
    if !slow_ok {
        tally.lock().unwrap().failures.push(format!(
            "slow requests were not cut off in time: headers {slow_headers:?} (limit {header_limit:?}), body {slow_body:?} (limit {body_limit:?})"
        ));
    }
    if slow_body.2.is_some_and(|s| s >= 500) {
        tally
            .lock()
            .unwrap()
            .failures
            .push(format!("slow body answered {:?}", slow_body.2));
    }

    // 4. Slowloris: 200 connections trickling headers (reconnecting when cut off), half
    // of them complete headers then trickle the body, while normal requests go on.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cut_off = Arc::new(AtomicUsize::new(0));
    let mut lorises = Vec::new();
    for i in 0..200 {
        let (stop, cut_off) = (stop.clone(), cut_off.clone());
        lorises.push(tokio::spawn(async move {
            let bytes: Vec<u8> = if i % 2 == 0 {
                b"POST /webhooks/email HTTP/1.1\r\nHost: x\r\nX-Slow: zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz".to_vec()
            } else {
                b"POST /webhooks/email HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{\"a\":\"zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz".to_vec()
            };
            while !stop.load(Ordering::Relaxed) {
                let (closed, _, _) = trickle(addr, bytes.clone(), Duration::from_millis(300), Duration::from_secs(3)).await;
                if closed {
                    cut_off.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut normal = Vec::new();
    for i in 0..8 {
        let body = base(3_000_000 + i).to_string();
        let t = Instant::now();
        let status = signed_post(&http, &ingest.url(), &body).await;
        normal.push((status, t.elapsed().as_secs_f64()));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for l in lorises {
        let _ = l.await;
    }
    let normal_max_s = normal.iter().map(|n| n.1).fold(0.0, f64::max);
    // Queued behind the slow clients, every request would take about a header
    // or body timeout (1-2 s); a busy machine may stall one or two.
    let quick = normal.iter().filter(|(_, l)| *l < 1.0).count();
    let normal_ok = normal.iter().all(|(s, _)| *s == Some(202)) && quick >= normal.len() - 2;
    if !normal_ok {
        tally
            .lock()
            .unwrap()
            .failures
            .push(format!("normal requests starved by slowloris: {normal:?}"));
    }
    let normal_accepted = normal.iter().filter(|(s, _)| *s == Some(202)).count() as u64;

    // 5. Still serving, nothing panicked, and rows only for what was accepted.
    let alive = !ingest.handle.is_finished();
    let health = healthz(addr).await;
    let after = signed_post(&http, &ingest.url(), &base(4_000_000).to_string()).await;
    let emails = env.count("SELECT count(*) FROM incoming_emails").await;
    let outbox = env.count("SELECT count(*) FROM outbox_messages").await;
    let keys = env.count("SELECT count(*) FROM idempotency_keys").await;
    let mut t = std::mem::take(&mut *tally.lock().unwrap());
    let accepted = t.accepted_202 + normal_accepted + u64::from(after == Some(202));
    let rows_for_invalid = [emails, outbox, keys]
        .iter()
        .map(|n| *n - accepted as i64)
        .max()
        .unwrap();
    let panics = PANICS.load(Ordering::SeqCst);
    if !alive || health != Some(200) || after != Some(202) {
        t.failures.push(format!("server not serving afterwards: task alive={alive} healthz={health:?} signed post={after:?}"));
    }
    let invalid_accepted = t
        .failures
        .iter()
        .filter(|f| f.starts_with("invalid input accepted"))
        .count();
    let five_xx = t.failures.iter().filter(|f| f.starts_with('5')).count();
    let hangs = t.failures.iter().filter(|f| f.starts_with("HANG")).count();
    let runtime_s = started.elapsed().as_secs_f64();
    let report = json!({
        "seed": seed,
        "cases": t.cases,
        "runtime_s": runtime_s,
        "campaign_s": campaign_s,
        "cases_per_s": t.cases as f64 / campaign_s,
        "answers_by_status": t.by_status,
        "answers_by_body_kind": t.by_label,
        "accepted_202": t.accepted_202,
        "duplicates_200": t.duplicates_200,
        "rows": {"incoming_emails": emails, "outbox_messages": outbox, "idempotency_keys": keys, "accepted_total": accepted},
        "rows_for_invalid_input": rows_for_invalid,
        "invalid_accepted": invalid_accepted,
        "five_xx": five_xx,
        "http_505_for_unsupported_version": t.five_oh_five,
        "closed_without_answer": t.closed_without_answer,
        "hangs": hangs,
        "panics": panics,
        "gzip_declared_but_plain_accepted": t.gzip_declared_accepted,
        "max_case_s": t.max_case_s,
        "truncated": truncated,
        "slow_headers": {"closed": slow_headers.0, "after_s": slow_headers.1.as_secs_f64(), "status": slow_headers.2, "header_timeout_ms": HEADER_TIMEOUT_MS},
        "slow_body": {"closed": slow_body.0, "after_s": slow_body.1.as_secs_f64(), "status": slow_body.2, "body_timeout_ms": BODY_TIMEOUT_MS},
        "slowloris": {"connections": 200, "cut_off": cut_off.load(Ordering::Relaxed), "normal_requests": normal.iter().map(|(s, l)| json!({"status": s, "latency_s": l})).collect::<Vec<_>>(), "normal_max_latency_s": normal_max_s},
        "still_serving": alive && health == Some(200) && after == Some(202),
        "cargo_fuzz": "not used: cargo-fuzz is not installed (a nightly toolchain is); this campaign is a seeded generator through the real HTTP stack",
        "failures": t.failures.iter().take(50).collect::<Vec<_>>(),
    });
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/hostile");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(&report).unwrap(),
    )
    .unwrap();
    println!("hostile: answers by status {:?}", t.by_status);
    println!(
        "hostile: slow headers cut after {:.2}s, slow body after {:.2}s ({:?}); slowloris: 200 connections, {} cut off, normal requests max {:.3}s",
        slow_headers.1.as_secs_f64(),
        slow_body.1.as_secs_f64(),
        slow_body.2,
        cut_off.load(Ordering::Relaxed),
        normal_max_s
    );
    for f in t.failures.iter().take(20) {
        println!("hostile: FAILURE: {}", &f[..f.len().min(600)]);
    }
    println!(
        "hostile: cases={} runtime_s={runtime_s:.1} accepted={accepted} rows_for_invalid={rows_for_invalid} invalid_accepted={invalid_accepted} 5xx={five_xx} hangs={hangs} panics={panics} still_serving={} report=target/hostile/report.json",
        t.cases,
        alive && health == Some(200)
    );
    ingest.stop().await;
    assert_eq!(panics, 0, "the server panicked");
    assert_eq!(
        rows_for_invalid, 0,
        "rows written for input that was not accepted"
    );
    assert!(
        t.failures.is_empty(),
        "{} failures, first: {}",
        t.failures.len(),
        t.failures[0]
    );
}
