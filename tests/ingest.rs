//! `POST /webhooks/email` against a real PostgreSQL: answers, rows, and what is never written.

mod common;

use std::time::Duration;

use common::*;
use outboxd::ingest::webhook;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn rows(env: &TestEnv) -> (i64, i64, i64) {
    (
        env.count("SELECT count(*) FROM incoming_emails").await,
        env.count("SELECT count(*) FROM outbox_messages").await,
        env.count("SELECT count(*) FROM idempotency_keys").await,
    )
}

#[tokio::test]
async fn accepts_a_signed_webhook_and_writes_three_rows() {
    let env = TestEnv::new().await;
    let ingest = Ingest::start(&env.config()).await;
    let http = common::http();

    let (status, body) = post_signed(&http, &ingest.url(), SAMPLE).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["status"], "pending");
    assert_eq!(
        body["idempotency_key"],
        "update_creditor_debt:MP-2026-0042/K-99812:92bb92c4cd9d0363"
    );
    let pg = env.pg().await;
    let row = pg
        .query_one(
            "SELECT o.id, o.operation, o.aggregate_id, o.payload, o.status, e.id, e.sync_status, e.webhook_id,
                    e.body, o.idempotency_key, (SELECT count(*) FROM idempotency_keys k WHERE k.key = o.idempotency_key)
             FROM outbox_messages o JOIN incoming_emails e ON e.id = o.email_id",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), body["outbox_id"].as_i64().unwrap());
    assert_eq!(row.get::<_, i64>(5), body["email_id"].as_i64().unwrap());
    assert_eq!(row.get::<_, String>(1), "update_creditor_debt");
    assert_eq!(row.get::<_, String>(2), "MP-2026-0042/K-99812");
    let payload: Value = row.get(3);
    assert_eq!(
        payload["creditor_name"], "Sparkasse KölnBonn",
        "umlauts arrive intact"
    );
    assert_eq!(payload["amount"], "1234.56");
    assert_eq!(row.get::<_, String>(4), "pending");
    assert_eq!(row.get::<_, String>(6), "pending");
    assert_eq!(row.get::<_, String>(7), "evt-2f9c1d");
    assert!(row.get::<_, String>(8).contains("beträgt 1.234,56 €"));
    assert_eq!(row.get::<_, i64>(10), 1);
    ingest.stop().await;
}

#[tokio::test]
async fn refuses_bad_signatures_with_401_and_writes_nothing() {
    let env = TestEnv::new().await;
    let ingest = Ingest::start(&env.config()).await;
    let http = common::http();
    let ts = now_stamp();
    let good = webhook::sign(SECRET.as_bytes(), &ts, SAMPLE.as_bytes());
    let wrong_secret = webhook::sign(b"another-secret", &ts, SAMPLE.as_bytes());
    let stale_ts = (chrono::Utc::now() - chrono::Duration::minutes(6))
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let stale = webhook::sign(SECRET.as_bytes(), &stale_ts, SAMPLE.as_bytes());
    let future_ts = (chrono::Utc::now() + chrono::Duration::minutes(6))
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let future = webhook::sign(SECRET.as_bytes(), &future_ts, SAMPLE.as_bytes());
    let cases: Vec<(&str, Option<String>, Option<String>)> = vec![
        ("missing both", None, None),
        ("missing signature", None, Some(ts.clone())),
        ("missing timestamp", Some(good.clone()), None),
        (
            "garbage signature",
            Some("not base64!".into()),
            Some(ts.clone()),
        ),
        (
            "signature of another body",
            Some(webhook::sign(SECRET.as_bytes(), &ts, b"{}")),
            Some(ts.clone()),
        ),
        (
            "truncated signature",
            Some(good[..good.len() - 4].to_string()),
            Some(ts.clone()),
        ),
        ("wrong secret", Some(wrong_secret), Some(ts.clone())),
        ("stale timestamp", Some(stale), Some(stale_ts)),
        ("future timestamp", Some(future), Some(future_ts)),
        (
            "timestamp not the signed one",
            Some(good.clone()),
            Some("2026-01-01T00:00:00Z".into()),
        ),
        (
            "malformed timestamp",
            Some(good.clone()),
            Some("yesterday".into()),
        ),
    ];
    for (name, sig, ts) in cases {
        let mut req = http
            .post(ingest.url())
            .header("content-type", "application/json")
            .body(SAMPLE);
        if let Some(sig) = sig {
            req = req.header(webhook::SIGNATURE_HEADER, sig);
        }
        if let Some(ts) = ts {
            req = req.header(webhook::TIMESTAMP_HEADER, ts);
        }
        let response = req.send().await.unwrap();
        assert_eq!(response.status().as_u16(), 401, "{name}");
        let body: Value = response.json().await.unwrap();
        assert!(body["error"].is_string(), "{name}: JSON error body");
    }
    assert_eq!(rows(&env).await, (0, 0, 0));
    ingest.stop().await;
}

#[tokio::test]
async fn names_the_field_of_every_invalid_body_and_writes_nothing() {
    let env = TestEnv::new().await;
    let ingest = Ingest::start(&env.config()).await;
    let http = common::http();
    let sample: Value = serde_json::from_str(SAMPLE).unwrap();
    let with = |path: &[&str], value: Option<Value>| {
        let mut v = sample.clone();
        let mut target = &mut v;
        for key in &path[..path.len() - 1] {
            target = target.get_mut(*key).unwrap();
        }
        let last = path[path.len() - 1];
        match value {
            Some(value) => target[last] = value,
            None => {
                target.as_object_mut().unwrap().remove(last);
            }
        }
        v.to_string()
    };
    let cases: Vec<(String, Option<&str>)> = vec![
        ("{".into(), None),
        ("[]".into(), None),
        ("\"text\"".into(), None),
        ("".into(), None),
        (with(&["webhook_id"], None), Some("webhook_id")),
        (with(&["webhook_id"], Some(json!(""))), Some("webhook_id")),
        (with(&["webhook_id"], Some(json!(42))), Some("webhook_id")),
        (with(&["ticket_id"], None), Some("ticket_id")),
        (
            with(&["ticket_id"], Some(json!("81234"))),
            Some("ticket_id"),
        ),
        (with(&["ticket_id"], Some(json!(-1))), Some("ticket_id")),
        (with(&["ticket_id"], Some(json!(1.5))), Some("ticket_id")),
        (with(&["email"], None), Some("email")),
        (with(&["email"], Some(json!("x"))), Some("email")),
        (with(&["email", "from"], None), Some("email.from")),
        (
            with(&["email", "from"], Some(json!("no-at-sign"))),
            Some("email.from"),
        ),
        (with(&["email", "subject"], None), Some("email.subject")),
        (with(&["email", "body"], None), Some("email.body")),
        (
            with(&["email", "body"], Some(json!("nul \u{0} inside"))),
            Some("email.body"),
        ),
        (
            with(&["email", "received_at"], Some(json!("yesterday"))),
            Some("email.received_at"),
        ),
        (with(&["creditor_debt"], None), Some("creditor_debt")),
        (
            with(&["creditor_debt", "client_reference"], None),
            Some("creditor_debt.client_reference"),
        ),
        (
            with(&["creditor_debt", "client_reference"], Some(json!("   "))),
            Some("creditor_debt.client_reference"),
        ),
        (
            with(&["creditor_debt", "creditor_name"], None),
            Some("creditor_debt.creditor_name"),
        ),
        (
            with(&["creditor_debt", "creditor_reference"], Some(json!(7))),
            Some("creditor_debt.creditor_reference"),
        ),
        (
            with(&["creditor_debt", "amount"], None),
            Some("creditor_debt.amount"),
        ),
        (
            with(&["creditor_debt", "amount"], Some(json!(1234.56))),
            Some("creditor_debt.amount"),
        ),
        (
            with(&["creditor_debt", "amount"], Some(json!("-1.00"))),
            Some("creditor_debt.amount"),
        ),
        (
            with(&["creditor_debt", "amount"], Some(json!("1.234"))),
            Some("creditor_debt.amount"),
        ),
        (
            with(&["creditor_debt", "amount"], Some(json!("1e3"))),
            Some("creditor_debt.amount"),
        ),
        (
            with(&["creditor_debt", "amount"], Some(json!("12,50"))),
            Some("creditor_debt.amount"),
        ),
        (
            with(&["creditor_debt", "currency"], None),
            Some("creditor_debt.currency"),
        ),
        (
            with(&["creditor_debt", "currency"], Some(json!("euro"))),
            Some("creditor_debt.currency"),
        ),
    ];
    for (body, field) in cases {
        let (status, answer) = post_signed(&http, &ingest.url(), &body).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(
            answer["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{answer}"
        );
        assert_eq!(answer["field"].as_str(), field, "{body}: {answer}");
    }
    assert_eq!(rows(&env).await, (0, 0, 0));
    ingest.stop().await;
}

#[tokio::test]
async fn refuses_large_bodies_and_other_content_types() {
    let env = TestEnv::new().await;
    let ingest = Ingest::start(&env.config()).await;
    let http = common::http();

    let mut huge: Value = serde_json::from_str(SAMPLE).unwrap();
    huge["email"]["body"] = Value::String("x".repeat(1024 * 1024 + 1));
    let (status, answer) = post_signed(&http, &ingest.url(), &huge.to_string()).await;
    assert_eq!(status, 413, "{answer}");

    // Without Content-Length (chunked), the limit still holds while reading.
    let ts = now_stamp();
    let body = huge.to_string();
    let sig = webhook::sign(SECRET.as_bytes(), &ts, body.as_bytes());
    let stream = futures_util::stream::iter(
        body.into_bytes()
            .chunks(64 * 1024)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    let response = http
        .post(ingest.url())
        .header("content-type", "application/json")
        .header(webhook::SIGNATURE_HEADER, sig)
        .header(webhook::TIMESTAMP_HEADER, ts)
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 413);

    for content_type in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("application/jsonp"),
    ] {
        let headers: Vec<_> = content_type
            .map(|ct| ("content-type", ct))
            .into_iter()
            .collect();
        let response = sample_signed(&http, &ingest.url(), &headers).await;
        assert_eq!(response.status().as_u16(), 415, "{content_type:?}");
        // Answered before the body was read: the connection ends with it.
        assert_eq!(response.headers()["connection"], "close");
    }
    // A compressed body is refused, not verified and parsed as if it were JSON.
    for encoding in ["gzip", "deflate, gzip", "br"] {
        let headers = [
            ("content-type", "application/json"),
            ("content-encoding", encoding),
        ];
        let response = sample_signed(&http, &ingest.url(), &headers).await;
        assert_eq!(response.status().as_u16(), 415, "{encoding}");
        assert!(response.text().await.unwrap().contains("Content-Encoding"));
    }
    assert_eq!(rows(&env).await, (0, 0, 0), "nothing written");
    // A charset parameter is fine, and so is the identity encoding.
    let headers = [
        ("content-type", "application/json; charset=utf-8"),
        ("content-encoding", "identity"),
    ];
    let response = sample_signed(&http, &ingest.url(), &headers).await;
    assert_eq!(response.status().as_u16(), 202);
    assert_eq!(rows(&env).await, (1, 1, 1));
    ingest.stop().await;
}

/// SAMPLE, validly signed, with exactly these other headers.
async fn sample_signed(
    http: &reqwest::Client,
    url: &str,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let ts = now_stamp();
    let sig = webhook::sign(SECRET.as_bytes(), &ts, SAMPLE.as_bytes());
    let mut req = http
        .post(url)
        .header(webhook::SIGNATURE_HEADER, sig)
        .header(webhook::TIMESTAMP_HEADER, ts)
        .body(SAMPLE);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    req.send().await.unwrap()
}

#[tokio::test]
async fn a_redelivery_answers_200_with_the_first_answer() {
    let env = TestEnv::new().await;
    let ingest = Ingest::start(&env.config()).await;
    let http = common::http();
    let (status, first) = post_signed(&http, &ingest.url(), SAMPLE).await;
    assert_eq!(status, 202);
    let (status, again) = post_signed(&http, &ingest.url(), SAMPLE).await;
    assert_eq!(status, 200);
    assert_eq!(again["duplicate"], true);
    for key in ["email_id", "outbox_id", "idempotency_key", "status"] {
        assert_eq!(again[key], first[key], "{key}");
    }

    // Same content under a new webhook id: a duplicate by key.
    let mut other: Value = serde_json::from_str(SAMPLE).unwrap();
    other["webhook_id"] = json!("evt-other");
    let (status, by_key) = post_signed(&http, &ingest.url(), &other.to_string()).await;
    assert_eq!(status, 200);
    assert_eq!(by_key["outbox_id"], first["outbox_id"]);

    // Same webhook id with other content: a duplicate by webhook id.
    let mut changed: Value = serde_json::from_str(SAMPLE).unwrap();
    changed["creditor_debt"]["amount"] = json!("1.00");
    let (status, by_webhook) = post_signed(&http, &ingest.url(), &changed.to_string()).await;
    assert_eq!(status, 200, "{by_webhook}");
    assert_eq!(by_webhook["outbox_id"], first["outbox_id"]);
    assert_eq!(by_webhook["duplicate"], true);

    assert_eq!(rows(&env).await, (1, 1, 1));

    // Once retention deleted the outbox row and the key, a late redelivery still
    // gets its e-mail's id; what went with the row is null.
    env.pg()
        .await
        .batch_execute("DELETE FROM idempotency_keys; DELETE FROM outbox_messages;")
        .await
        .unwrap();
    let (status, late) = post_signed(&http, &ingest.url(), SAMPLE).await;
    assert_eq!(status, 200, "{late}");
    assert_eq!(late["duplicate"], true);
    assert_eq!(late["email_id"], first["email_id"]);
    assert_eq!(late["outbox_id"], Value::Null);
    assert_eq!(late["idempotency_key"], Value::Null);
    ingest.stop().await;
}

#[tokio::test]
async fn key_is_stable_when_json_keys_are_reordered() {
    let env = TestEnv::new().await;
    let ingest = Ingest::start(&env.config()).await;
    let http = common::http();
    let reordered = r#"{"creditor_debt":{"currency":"EUR","amount":"1234.56","creditor_reference":"K-99812",
        "creditor_name":"Sparkasse KölnBonn","client_reference":"MP-2026-0042"},"ticket_id":81234,
        "email":{"received_at":"2026-11-28T09:15:00Z","body":"b","subject":"s","from":"a@b.example"},
        "webhook_id":"evt-reordered"}"#;
    let (status, answer) = post_signed(&http, &ingest.url(), reordered).await;
    assert_eq!(status, 202);
    assert_eq!(
        answer["idempotency_key"],
        "update_creditor_debt:MP-2026-0042/K-99812:92bb92c4cd9d0363"
    );
    ingest.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forty_concurrent_identical_deliveries_write_once() {
    let env = TestEnv::new().await;
    let mut config = env.config();
    config.database.pool_size = 40;
    let ingest = Ingest::start(&config).await;
    let http = common::http();
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(40));
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let (http, url, barrier) = (http.clone(), ingest.url(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            post_signed(&http, &url, SAMPLE).await
        }));
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    let statuses: Vec<u16> = answers.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        answers.iter().filter(|(s, _)| *s == 202).count(),
        1,
        "{statuses:?} {:?}",
        answers.iter().find(|(s, _)| *s >= 300)
    );
    assert_eq!(answers.iter().filter(|(s, _)| *s == 200).count(), 39);
    let outbox_id = &answers[0].1["outbox_id"];
    assert!(answers.iter().all(|(_, a)| &a["outbox_id"] == outbox_id));
    assert_eq!(rows(&env).await, (1, 1, 1));
    ingest.stop().await;
}

#[tokio::test]
async fn postgres_down_gives_503_then_recovers_without_restart() {
    let env = TestEnv::new().await;
    let proxy = Proxy::start(pg_addr()).await;
    let mut config = env.config();
    config.database.url = via_port(&env.database_url, proxy.port).into();
    config.database.connect_timeout_ms = 2000;
    config.database.pool_wait_ms = 1000;
    let ingest = Ingest::start(&config).await;
    let http = common::http();
    let (status, _) = post_signed(&http, &ingest.url(), &event(1, "C-1", "K-1", "1.00")).await;
    assert_eq!(status, 202);

    proxy.set_up(false);
    let response = http
        .get(format!("http://{}/readyz", ingest.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 503);
    let down_body = event(2, "C-2", "K-2", "2.00");
    for _ in 0..3 {
        let ts = now_stamp();
        let sig = webhook::sign(SECRET.as_bytes(), &ts, down_body.as_bytes());
        let response = http
            .post(ingest.url())
            .header("content-type", "application/json")
            .header(webhook::SIGNATURE_HEADER, sig)
            .header(webhook::TIMESTAMP_HEADER, ts)
            .body(down_body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 503);
        assert!(response.headers().contains_key("retry-after"));
    }
    assert_eq!(
        rows(&env).await,
        (1, 1, 1),
        "nothing half-written while down"
    );

    proxy.set_up(true);
    let url = ingest.url();
    let recovered = eventually(Duration::from_secs(10), || {
        let (http, url, body) = (http.clone(), url.clone(), down_body.clone());
        async move {
            let (status, answer) = post_signed(&http, &url, &body).await;
            eprintln!("after recovery: {status} {answer}");
            status == 202
        }
    })
    .await;
    assert!(recovered, "ingest serves again once PostgreSQL is back");
    // A readiness answer serves every probe for a second.
    let readyz = format!("http://{}/readyz", ingest.addr);
    assert!(
        eventually(Duration::from_secs(3), || {
            let (http, readyz) = (http.clone(), readyz.clone());
            async move { http.get(readyz).send().await.unwrap().status().as_u16() == 200 }
        })
        .await,
        "ready again"
    );
    assert_eq!(rows(&env).await, (2, 2, 2));
    ingest.stop().await;
}

#[tokio::test]
async fn probes_and_metrics_answer() {
    let env = TestEnv::new().await;
    let ingest = Ingest::start(&env.config()).await;
    let http = common::http();
    let base = format!("http://{}", ingest.addr);
    post_signed(&http, &ingest.url(), SAMPLE).await;
    post_signed(&http, &ingest.url(), SAMPLE).await;
    http.post(ingest.url())
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(
        http.get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    assert_eq!(
        http.get(format!("{base}/readyz"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    assert_eq!(
        http.get(format!("{base}/nope"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        404
    );
    assert_eq!(
        http.get(ingest.url())
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        405
    );
    let metrics = get_text(&http, &format!("{base}/metrics")).await;
    for needle in [
        "outboxd_http_requests_total",
        "outboxd_http_request_duration_seconds_bucket",
        "outboxd_ingest_duplicates_total",
        "outboxd_ingest_signature_failures_total",
    ] {
        assert!(metrics.contains(needle), "{needle} missing from /metrics");
    }
    ingest.stop().await;
}

/// `outboxd ingest` as its own process (to send it signals) on a free port,
/// once it answers `/healthz`.
async fn ingest_process(vars: &[(String, String)]) -> (Proc, u16) {
    let port = free_port();
    let ingest = Proc::spawn(
        &["ingest", "--listen", &format!("127.0.0.1:{port}")],
        vars,
        "ingest",
    );
    let http = common::http();
    assert!(
        eventually(Duration::from_secs(10), || {
            let http = http.clone();
            async move {
                http.get(format!("http://127.0.0.1:{port}/healthz"))
                    .send()
                    .await
                    .is_ok()
            }
        })
        .await,
        "ingest answers /healthz"
    );
    (ingest, port)
}

#[tokio::test]
async fn ingest_tells_systemd_ready_alive_and_stopping() {
    let env = TestEnv::new().await;
    let notify = NotifySocket::bind();
    let mut vars = env.child_env();
    vars.extend(notify.vars());
    let (mut ingest, _port) = ingest_process(&vars).await;
    notify
        .check_lifecycle(&mut ingest, Duration::from_secs(10))
        .await;
}

#[tokio::test]
async fn sigterm_with_requests_in_flight_loses_none() {
    let env = TestEnv::new().await;
    let (mut ingest, port) = ingest_process(&env.child_env()).await;
    let url = format!("http://127.0.0.1:{port}/webhooks/email");
    let http = common::http();
    let mut tasks = Vec::new();
    for n in 0..200u64 {
        let (http, url) = (http.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(n * 2)).await;
            let body = event(n, &format!("C-{n}"), "K", "1.00");
            let ts = now_stamp();
            let sig = webhook::sign(SECRET.as_bytes(), &ts, body.as_bytes());
            let response = http
                .post(&url)
                .header("content-type", "application/json")
                .header(webhook::SIGNATURE_HEADER, sig)
                .header(webhook::TIMESTAMP_HEADER, ts)
                .body(body)
                .send()
                .await;
            match response {
                Ok(r) => Some((r.status().as_u16(), r.json::<Value>().await.ok())),
                Err(_) => None, // refused after shutdown began: never accepted
            }
        }));
    }
    // Once a first webhook is committed, the others are in flight or coming.
    assert!(
        eventually(Duration::from_secs(10), || async {
            env.count("SELECT count(*) FROM incoming_emails").await > 0
        })
        .await
    );
    ingest.signal("TERM");
    let mut accepted = Vec::new();
    for t in tasks {
        if let Some((202, Some(body))) = t.await.unwrap() {
            accepted.push(body["email_id"].as_i64().unwrap());
        }
    }
    let status = ingest
        .wait_timeout(Duration::from_secs(15))
        .expect("ingest exits after SIGTERM");
    assert!(status.success(), "exit status {status:?}");
    assert!(!accepted.is_empty());
    let pg = env.pg().await;
    let stored: i64 = pg
        .query_one(
            "SELECT count(*) FROM incoming_emails WHERE id = ANY($1)",
            &[&accepted],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored as usize, accepted.len(), "every 202 was committed");
    assert!(
        !ingest.log_text().contains(SECRET),
        "the secret never reaches the log"
    );
}

#[tokio::test]
async fn a_second_signal_cuts_the_drain_short() {
    let env = TestEnv::new().await;
    let mut child_env = env.child_env();
    child_env.extend([
        ("OUTBOXD__INGEST__SHUTDOWN_TIMEOUT_S".into(), "120".into()),
        (
            "OUTBOXD__INGEST__BODY_READ_TIMEOUT_MS".into(),
            "120000".into(),
        ),
    ]);
    let (mut ingest, port) = ingest_process(&child_env).await;
    // A webhook whose body never comes holds the drain open. The server's
    // "100 Continue" shows that the handler is waiting for that body.
    let mut stalled = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    stalled
        .write_all(
            b"POST /webhooks/email HTTP/1.1\r\nhost: x\r\n\
              content-type: application/json\r\ncontent-length: 100\r\n\
              expect: 100-continue\r\n\r\n",
        )
        .await
        .unwrap();
    let mut answer = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), stalled.read(&mut answer))
        .await
        .expect("an answer to Expect")
        .unwrap();
    assert!(
        String::from_utf8_lossy(&answer[..n]).contains("100 Continue"),
        "{:?}",
        String::from_utf8_lossy(&answer[..n])
    );

    ingest.signal("INT");
    assert!(
        eventually(Duration::from_secs(10), || async {
            ingest.log_text().contains("SIGINT: shutting down")
        })
        .await
    );
    assert!(
        ingest.wait_timeout(Duration::from_secs(1)).is_none(),
        "the first signal waits for the request in flight"
    );
    ingest.signal("INT");
    let status = ingest
        .wait_timeout(Duration::from_secs(15))
        .expect("the second signal ends ingest long before its 120 s drain");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGINT),
        "killed by the signal, as if never caught: {status:?}"
    );
    assert!(ingest.log_text().contains("second signal"));
    assert_eq!(env.count("SELECT count(*) FROM incoming_emails").await, 0);
}

#[tokio::test]
async fn a_redelivery_gets_its_own_first_answer_after_its_key_was_retaken() {
    let env = TestEnv::new().await;
    let mut config = env.config();
    config.ingest.idempotency_ttl_s = 1;
    let ingest = Ingest::start(&config).await;
    let http = common::http();
    let mut w2: Value = serde_json::from_str(SAMPLE).unwrap();
    w2["webhook_id"] = json!("evt-w2");
    let w2 = w2.to_string();

    let (status, first) = post_signed(&http, &ingest.url(), SAMPLE).await;
    assert_eq!(status, 202, "{first}");
    let expired = eventually(Duration::from_secs(10), || async {
        env.count("SELECT count(*) FROM idempotency_keys WHERE expires_at <= now()")
            .await
            == 1
    })
    .await;
    assert!(expired, "the key expires after its TTL");
    // Same content under a new webhook id takes over the expired key.
    let (status, second) = post_signed(&http, &ingest.url(), &w2).await;
    assert_eq!(status, 202, "{second}");
    assert_ne!(second["email_id"], first["email_id"]);

    // Each webhook id's redelivery gets its own first answer, not the key holder's.
    for (body, answer) in [(SAMPLE, &first), (w2.as_str(), &second)] {
        let (status, again) = post_signed(&http, &ingest.url(), body).await;
        assert_eq!(status, 200, "{again}");
        assert_eq!(again["duplicate"], true);
        for key in ["email_id", "outbox_id", "idempotency_key", "status"] {
            assert_eq!(again[key], answer[key], "{key}: {again} vs {answer}");
        }
    }
    assert_eq!(rows(&env).await, (2, 2, 1));
    ingest.stop().await;
}

#[tokio::test]
async fn refuses_a_creditor_reference_that_could_pose_as_a_creditor_name() {
    let env = TestEnv::new().await;
    let ingest = Ingest::start(&env.config()).await;
    let http = common::http();
    let mut by_name: Value = serde_json::from_str(SAMPLE).unwrap();
    by_name["creditor_debt"]
        .as_object_mut()
        .unwrap()
        .remove("creditor_reference");
    let (status, answer) = post_signed(&http, &ingest.url(), &by_name.to_string()).await;
    assert_eq!(status, 202, "{answer}");

    // Another creditor whose reference spells the first one's name-based aggregate.
    for reference in [
        "name:sparkasse kölnbonn",
        "NAME:Sparkasse KölnBonn",
        "Name:x",
    ] {
        let mut v: Value = serde_json::from_str(SAMPLE).unwrap();
        v["webhook_id"] = json!(format!("evt-{reference}"));
        v["creditor_debt"]["creditor_name"] = json!("Volksbank Irgendwo");
        v["creditor_debt"]["creditor_reference"] = json!(reference);
        let (status, answer) = post_signed(&http, &ingest.url(), &v.to_string()).await;
        assert_eq!(status, 400, "{reference}: {answer}");
        assert_eq!(answer["field"], "creditor_debt.creditor_reference");
    }
    // A reference merely containing `name:` is fine.
    let mut v: Value = serde_json::from_str(SAMPLE).unwrap();
    v["webhook_id"] = json!("evt-inner");
    v["creditor_debt"]["creditor_reference"] = json!("K-name:1");
    let (status, answer) = post_signed(&http, &ingest.url(), &v.to_string()).await;
    assert_eq!(status, 202, "{answer}");

    let aggregates: Vec<String> = env
        .pg()
        .await
        .query("SELECT aggregate_id FROM outbox_messages ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        aggregates,
        [
            "MP-2026-0042/name:sparkasse kölnbonn",
            "MP-2026-0042/K-name:1"
        ]
    );
    assert_eq!(rows(&env).await, (2, 2, 2));
    ingest.stop().await;
}

#[tokio::test]
async fn refuses_a_timestamp_less_than_a_second_beyond_the_window() {
    let env = TestEnv::new().await;
    let ingest = Ingest::start(&env.config()).await;
    let http = common::http();
    let stamp = |offset_ms: i64| {
        (chrono::Utc::now() + chrono::Duration::milliseconds(offset_ms))
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    };
    // 300 s is the default tolerance; a fraction of a second past it is stale.
    // In the past, so that the request's own latency only adds to the skew (the
    // unit test `the_window_is_exact_to_the_millisecond` covers both sides).
    let body = event(1, "C-1", "K-1", "1.00");
    let (status, answer) = try_post_signed_at(&http, &ingest.url(), &body, &stamp(-300_300))
        .await
        .unwrap();
    assert_eq!(status, 401, "{answer}");
    assert_eq!(rows(&env).await, (0, 0, 0));
    let body = event(2, "C-2", "K-2", "1.00");
    let (status, answer) = try_post_signed_at(&http, &ingest.url(), &body, &stamp(-290_000))
        .await
        .unwrap();
    assert_eq!(status, 202, "inside the window: {answer}");
    assert_eq!(rows(&env).await, (1, 1, 1));
    ingest.stop().await;
}

#[tokio::test]
async fn blank_optional_fields_count_as_absent() {
    let env = TestEnv::new().await;
    let ingest = Ingest::start(&env.config()).await;
    let http = common::http();
    // As a Zendesk placeholder renders a value the ticket lacks.
    let mut blank: Value = serde_json::from_str(SAMPLE).unwrap();
    blank["email"]["message_id"] = json!("");
    blank["email"]["received_at"] = json!(" ");
    blank["creditor_debt"]["creditor_reference"] = json!("");
    let (status, first) = post_signed(&http, &ingest.url(), &blank.to_string()).await;
    assert_eq!(status, 202, "{first}");
    let row = env
        .pg()
        .await
        .query_one(
            "SELECT e.message_id, e.received_at IS NULL, o.aggregate_id, o.payload ? 'creditor_reference'
             FROM outbox_messages o JOIN incoming_emails e ON e.id = o.email_id",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<String>>(0), None);
    assert!(row.get::<_, bool>(1));
    assert_eq!(
        row.get::<_, String>(2),
        "MP-2026-0042/name:sparkasse kölnbonn"
    );
    assert!(!row.get::<_, bool>(3), "no reference in the payload");

    // The same event with the fields left out is the same update.
    let mut absent: Value = serde_json::from_str(SAMPLE).unwrap();
    absent["webhook_id"] = json!("evt-absent");
    absent["email"]
        .as_object_mut()
        .unwrap()
        .remove("message_id");
    absent["email"]
        .as_object_mut()
        .unwrap()
        .remove("received_at");
    absent["creditor_debt"]
        .as_object_mut()
        .unwrap()
        .remove("creditor_reference");
    let (status, again) = post_signed(&http, &ingest.url(), &absent.to_string()).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["idempotency_key"], first["idempotency_key"]);

    // A blank required field is still refused.
    let mut v: Value = serde_json::from_str(SAMPLE).unwrap();
    v["webhook_id"] = json!("evt-blank-name");
    v["creditor_debt"]["creditor_name"] = json!(" ");
    let (status, answer) = post_signed(&http, &ingest.url(), &v.to_string()).await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["field"], "creditor_debt.creditor_name");
    assert_eq!(rows(&env).await, (1, 1, 1));
    ingest.stop().await;
}

/// Sends `request` on a new connection and reads until the server closes it.
async fn raw_exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    // The server may answer and close before reading all of it.
    let _ = stream.write_all(request).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn probes_answer_head_and_a_wrong_method_names_the_allowed_ones() {
    let env = TestEnv::new().await;
    let ingest = Ingest::start(&env.config()).await;
    let head = raw_exchange(
        ingest.addr,
        b"HEAD /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.ends_with("\r\n\r\n"), "no body: {head}");
    let http = common::http();
    let base = format!("http://{}", ingest.addr);
    let response = http.head(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    for (method, path, allow) in [
        (reqwest::Method::POST, "/healthz", "GET, HEAD"),
        (reqwest::Method::DELETE, "/metrics", "GET, HEAD"),
        (reqwest::Method::GET, "/webhooks/email", "POST"),
    ] {
        let response = http
            .request(method.clone(), format!("{base}{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 405, "{method} {path}");
        assert_eq!(response.headers()["allow"], allow, "{method} {path}");
    }
    ingest.stop().await;
}

#[tokio::test]
async fn a_refused_body_sent_at_once_still_gets_its_answer() {
    let env = TestEnv::new().await;
    let ingest = Ingest::start(&env.config()).await;
    // The whole 2 MiB body follows the headers at once, as most clients send it.
    let mut request = format!(
        "POST /webhooks/email HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        2 * 1024 * 1024
    )
    .into_bytes();
    request.extend(std::iter::repeat_n(b' ', 2 * 1024 * 1024));
    let answer = raw_exchange(ingest.addr, &request).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer.to_lowercase().contains("connection: close"),
        "{answer}"
    );
    assert_eq!(rows(&env).await, (0, 0, 0));
    ingest.stop().await;
}

#[tokio::test]
async fn a_body_in_one_byte_chunks_is_read_whole() {
    let env = TestEnv::new().await;
    let ingest = Ingest::start(&env.config()).await;
    let ts = now_stamp();
    let sig = webhook::sign(SECRET.as_bytes(), &ts, SAMPLE.as_bytes());
    let mut request = format!(
        "POST /webhooks/email HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{}: {sig}\r\n{}: {ts}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        webhook::SIGNATURE_HEADER,
        webhook::TIMESTAMP_HEADER
    )
    .into_bytes();
    for byte in SAMPLE.as_bytes() {
        request.extend_from_slice(b"1\r\n");
        request.push(*byte);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    let answer = raw_exchange(ingest.addr, &request).await;
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
    assert_eq!(rows(&env).await, (1, 1, 1));
    ingest.stop().await;
}

#[tokio::test]
async fn a_client_that_stops_reading_answers_gives_up_its_connection() {
    let env = TestEnv::new().await;
    let mut config = env.config();
    config.ingest.max_connections = 1;
    config.ingest.body_read_timeout_ms = 1000;
    // So that only the write timeout can free the slot in time.
    config.ingest.header_read_timeout_ms = 60_000;
    let ingest = Ingest::start(&config).await;
    // Pipelined probes whose answers are never read, with a small receive
    // buffer: the server's writes stall and, unbounded, would hold the only slot.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut greedy = socket.connect(ingest.addr).await.unwrap();
    let writer = tokio::spawn(async move {
        let request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".repeat(100_000);
        let _ = greedy.write_all(&request).await;
        // Held open, never read, until the test ends.
        tokio::time::sleep(Duration::from_secs(60)).await;
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let http = common::http_builder()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap();
    let response = http
        .get(format!("http://{}/healthz", ingest.addr))
        .send()
        .await;
    assert_eq!(
        response.map(|r| r.status().as_u16()).ok(),
        Some(200),
        "another client is served once the stalled one is cut off"
    );
    writer.abort();
    ingest.stop().await;
}

#[tokio::test]
async fn a_read_only_database_answers_503_not_500() {
    // What a webhook meets during a failover: a standby, or a primary being demoted.
    let env = TestEnv::new().await;
    env.pg()
        .await
        .batch_execute(&format!(
            "ALTER DATABASE \"{}\" SET default_transaction_read_only = on",
            env.name
        ))
        .await
        .unwrap();
    let ingest = Ingest::start(&env.config()).await;
    let http = common::http();
    let response = sample_signed(
        &http,
        &ingest.url(),
        &[("content-type", "application/json")],
    )
    .await;
    assert_eq!(response.status().as_u16(), 503);
    assert!(response.headers().contains_key("retry-after"));
    let ready = http
        .get(format!("http://{}/readyz", ingest.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status().as_u16(), 503, "not ready while read-only");
    assert!(ready.text().await.unwrap().contains("read-only"));

    // Writable again: the read-only sessions are dropped as they fail, and a
    // redelivery is accepted without a restart.
    let admin = env.pg().await;
    admin
        .batch_execute("SET default_transaction_read_only = off")
        .await
        .unwrap();
    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"{}\" RESET default_transaction_read_only",
            env.name
        ))
        .await
        .unwrap();
    let mut statuses = Vec::new();
    for _ in 0..10 {
        let response = sample_signed(
            &http,
            &ingest.url(),
            &[("content-type", "application/json")],
        )
        .await;
        statuses.push(response.status().as_u16());
        if statuses.last() == Some(&202) {
            break;
        }
    }
    assert_eq!(statuses.last(), Some(&202), "{statuses:?}");
    assert_eq!(rows(&env).await, (1, 1, 1));
    ingest.stop().await;
}

/// `outboxd ingest` with `vars`, expected to stop at once: its exit code and
/// everything it printed. `None` if it was still running after 15 s.
fn ingest_exit(vars: &[(String, String)]) -> (Option<i32>, String) {
    let mut ingest = Proc::spawn(&["ingest", "--listen", "127.0.0.1:0"], vars, "ingest");
    let status = ingest.wait_timeout(Duration::from_secs(15));
    (status.and_then(|s| s.code()), ingest.log_text())
}

/// The test environment with `secret` as `OUTBOXD_WEBHOOK_SECRET`.
fn with_secret(env: &TestEnv, secret: &str) -> Vec<(String, String)> {
    let mut vars = env.child_env();
    vars.retain(|(k, _)| k != "OUTBOXD_WEBHOOK_SECRET");
    vars.push(("OUTBOXD_WEBHOOK_SECRET".into(), secret.into()));
    vars
}

#[tokio::test]
async fn refuses_the_development_secret_or_a_short_one_outside_development() {
    let env = TestEnv::new().await;
    for (secret, why) in [
        ("dev-secret-change-me", "the development default"),
        ("fifteen-bytes!!", "shorter than 16 bytes"),
    ] {
        let vars = with_secret(&env, secret);
        let (code, out) = ingest_exit(&vars);
        assert_eq!(code, Some(78), "a configuration error: {out}");
        assert!(
            out.contains(why)
                && out.contains("OUTBOXD_WEBHOOK_SECRET")
                && out.contains("ingest.allow_insecure_secret"),
            "{out}"
        );
        assert!(!out.contains(secret), "the secret is never printed: {out}");

        // `check` says the same.
        let (code, out) = outboxd_with(&["check"], &vars);
        assert_eq!(code, 1, "{out}");
        assert!(
            out.contains("webhook     FAIL") && out.contains(why),
            "{out}"
        );
        assert!(!out.contains(secret), "{out}");

        // Development, said so, may use it, with a warning.
        let mut dev = vars.clone();
        dev.push((
            "OUTBOXD__INGEST__ALLOW_INSECURE_SECRET".into(),
            "true".into(),
        ));
        let (ingest, _port) = ingest_process(&dev).await;
        assert!(
            eventually(Duration::from_secs(5), || async {
                ingest.log_text().contains("insecure webhook secret")
            })
            .await,
            "{}",
            ingest.log_text()
        );
        assert!(!ingest.log_text().contains(secret));
        let (code, out) = outboxd_with(&["check"], &dev);
        assert!(out.contains("webhook     ok"), "{code}: {out}");
    }
    // Sixteen bytes are enough.
    let (ingest, port) = ingest_process(&with_secret(&env, "sixteen-bytes-ok")).await;
    let http = common::http();
    let status = http
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status.as_u16(), 200, "{}", ingest.log_text());
}

#[tokio::test]
async fn names_the_secret_source_that_won_and_those_it_shadows() {
    const CREDENTIAL: &str = "credential-secret-not-used";
    const FILE: &str = "file-secret-never-logged";
    let env = TestEnv::new().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("webhook-secret"), format!("{CREDENTIAL}\n")).unwrap();
    let file = dir.path().join("secret-file");
    std::fs::write(&file, format!("{FILE}\n")).unwrap();
    let mut vars = env.child_env();
    vars.push((
        "CREDENTIALS_DIRECTORY".into(),
        dir.path().display().to_string(),
    ));
    vars.push((
        "OUTBOXD__INGEST__WEBHOOK_SECRET_FILE".into(),
        file.display().to_string(),
    ));

    let (ingest, port) = ingest_process(&vars).await;
    let url = format!("http://127.0.0.1:{port}/webhooks/email");
    let http = common::http();
    // The environment variable wins: its signature is the one accepted.
    let ts = now_stamp();
    let by_credential = webhook::sign(CREDENTIAL.as_bytes(), &ts, SAMPLE.as_bytes());
    let refused = http
        .post(&url)
        .header("content-type", "application/json")
        .header(webhook::SIGNATURE_HEADER, by_credential)
        .header(webhook::TIMESTAMP_HEADER, &ts)
        .body(SAMPLE)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 401);
    assert_eq!(post_signed(&http, &url, SAMPLE).await.0, 202);
    let log = ingest.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("webhook secret from"))
        .unwrap_or_else(|| panic!("a start-up line names the source: {log}"));
    assert!(
        line.contains("\"source\":\"OUTBOXD_WEBHOOK_SECRET\"")
            && line.contains("ingest.webhook_secret_file")
            && line.contains("credential `webhook-secret`"),
        "{line}"
    );
    for secret in [SECRET, CREDENTIAL, FILE] {
        assert!(!log.contains(secret), "{log}");
    }
    drop(ingest);

    // Without the variable the file wins over the credential; `check` says so too.
    vars.retain(|(k, _)| k != "OUTBOXD_WEBHOOK_SECRET");
    let (ingest, _port) = ingest_process(&vars).await;
    let log = ingest.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("webhook secret from"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(
        line.contains("\"source\":\"`ingest.webhook_secret_file`")
            && line.contains("credential `webhook-secret`"),
        "{line}"
    );
    let (code, out) = outboxd_with(&["check"], &vars);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("webhook     ok    secret from `ingest.webhook_secret_file`")
            && out.contains("shadows the systemd credential `webhook-secret`"),
        "{out}"
    );
    assert!(!out.contains(FILE) && !out.contains(CREDENTIAL), "{out}");
}

/// Transactions PostgreSQL has counted in this test's database, once every
/// other session there has ended (a session's counts arrive when it ends).
async fn committed_once_idle(env: &TestEnv) -> i64 {
    assert!(
        eventually(Duration::from_secs(10), || async {
            env.count(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid()",
            )
            .await
                == 0
        })
        .await,
        "the other sessions end"
    );
    env.count(
        "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_readyz_flood_costs_postgresql_one_check_a_second_and_webhooks_still_get_202() {
    const FLOODERS: usize = 16;
    const PROBES_EACH: usize = 60;
    const WEBHOOKS: u64 = 20;
    let env = TestEnv::new().await;
    let mut vars = env.child_env();
    // A tiny pool: each probe that reached PostgreSQL would hold one of two.
    vars.push(("OUTBOXD__DATABASE__POOL_SIZE".into(), "2".into()));
    let before = committed_once_idle(&env).await;
    let started = std::time::Instant::now();
    let (mut ingest, port) = ingest_process(&vars).await;
    let http = common::http();
    let flood: Vec<_> = (0..FLOODERS)
        .map(|_| {
            let (http, url) = (http.clone(), format!("http://127.0.0.1:{port}/readyz"));
            tokio::spawn(async move {
                let mut ready = 0;
                for _ in 0..PROBES_EACH {
                    let r = http.get(&url).send().await.unwrap();
                    ready += usize::from(r.status().as_u16() == 200);
                }
                ready
            })
        })
        .collect();
    let url = format!("http://127.0.0.1:{port}/webhooks/email");
    let webhooks: Vec<_> = (0..WEBHOOKS)
        .map(|n| {
            let (http, url) = (http.clone(), url.clone());
            tokio::spawn(async move {
                let body = event(n, &format!("C-{n}"), "K", "1.00");
                post_signed(&http, &url, &body).await.0
            })
        })
        .collect();
    for w in webhooks {
        assert_eq!(w.await.unwrap(), 202, "a webhook during the flood");
    }
    let mut ready = 0;
    for f in flood {
        ready += f.await.unwrap();
    }
    assert_eq!(ready, FLOODERS * PROBES_EACH, "every probe answered ready");
    ingest.signal("TERM");
    ingest
        .wait_timeout(Duration::from_secs(15))
        .expect("ingest stops");
    let seconds = started.elapsed().as_secs() as i64;
    let committed = committed_once_idle(&env).await - before;
    // Each webhook costs a transaction and at most one NOTIFY; start-up and
    // statement preparation a few more. Probes reaching PostgreSQL one by one
    // would add about a thousand.
    let budget = 2 * WEBHOOKS as i64 + 20 + 2 * (seconds + 1);
    assert!(
        committed <= budget,
        "{committed} transactions in {seconds} s for {WEBHOOKS} webhooks and {} probes (budget {budget})",
        FLOODERS * PROBES_EACH
    );
}

#[tokio::test]
async fn metrics_move_to_their_own_address_when_metrics_listen_is_set() {
    let env = TestEnv::new().await;
    let metrics_port = free_port();
    let mut vars = env.child_env();
    vars.push((
        "OUTBOXD__INGEST__METRICS_LISTEN".into(),
        format!("127.0.0.1:{metrics_port}"),
    ));
    let (ingest, port) = ingest_process(&vars).await;
    let http = common::http();
    let base = format!("http://127.0.0.1:{port}");
    assert_eq!(
        post_signed(&http, &format!("{base}/webhooks/email"), SAMPLE)
            .await
            .0,
        202
    );
    // The webhook's address no longer serves them, whatever the method.
    for method in [
        reqwest::Method::GET,
        reqwest::Method::HEAD,
        reqwest::Method::POST,
    ] {
        let status = http
            .request(method.clone(), format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(
            status.as_u16(),
            404,
            "{method} /metrics on the main address"
        );
    }
    let metrics = http
        .get(format!("http://127.0.0.1:{metrics_port}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status().as_u16(), 200, "{}", ingest.log_text());
    let text = metrics.text().await.unwrap();
    assert!(
        text.contains("outboxd_http_requests_total") && text.contains("route=\"/webhooks/email\""),
        "{text}"
    );
    let health = http
        .get(format!("http://127.0.0.1:{metrics_port}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status().as_u16(), 200);
    // And the metrics address serves nothing else.
    let webhook = http
        .post(format!("http://127.0.0.1:{metrics_port}/webhooks/email"))
        .send()
        .await
        .unwrap();
    assert_eq!(webhook.status().as_u16(), 404);
}
