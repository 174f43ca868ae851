//! Notification e-mails against a real SMTP server (aiosmtpd, tests/common/smtp.rs),
//! real PostgreSQL and FerretDB, with relays as child processes.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::smtp::{Mail, SmtpSink};
use common::{Proc, TestEnv, eventually, outboxd_with};

const FROM_DOMAIN: &str = "inkasso.example";

/// A config file enabling `[notify]` towards `sink`, for a child relay.
fn notify_file(
    env: &TestEnv,
    sink: &SmtpSink,
    extra: &str,
) -> (tempfile::TempDir, Vec<(String, String)>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outboxd.toml");
    std::fs::write(
        &path,
        format!(
            "[notify]\nenabled = true\nsmtp_url = \"{}\"\n\
             from = \"Forderungsdienst <benachrichtigung@{FROM_DOMAIN}>\"\n\
             to = [\"sachbearbeitung@{FROM_DOMAIN}\", \"Jörg Übel <joerg@{FROM_DOMAIN}>\"]\n\
             timeout_ms = 2000\nlease_s = 5\n{extra}",
            sink.url()
        ),
    )
    .unwrap();
    let mut vars = env.child_env();
    vars.push(("OUTBOXD_CONFIG".into(), path.display().to_string()));
    (dir, vars)
}

fn relay(vars: &[(String, String)], id: &str) -> Proc {
    Proc::spawn(&["relay", "--id", id], vars, id)
}

/// Inserts one e-mail and its pending outbox row; returns the outbox id.
async fn message(env: &TestEnv, ticket: i64, client: &str, creditor: &str, amount: &str) -> i64 {
    let pg = env.pg().await;
    let row = pg
        .query_one(
            "WITH e AS (
                 INSERT INTO incoming_emails (webhook_id, ticket_id, message_id, from_address, subject, body)
                 VALUES ('w-' || $1::bigint, $1, '<orig-' || $1::bigint || '@kunde.example>',
                         'Frau Schäfer <schaefer@kunde.example>', 'Änderung der Forderung', 'b')
                 RETURNING id)
             INSERT INTO outbox_messages (operation, aggregate_id, payload, email_id, idempotency_key)
             SELECT 'update_creditor_debt', $2 || '/' || $3,
                    jsonb_build_object('client_reference', $2::text, 'creditor_name', $3::text,
                                       'creditor_reference', 'K', 'amount', $4::text, 'currency', 'EUR'),
                    id, 'k-' || $1::bigint FROM e
             RETURNING id",
            &[&ticket, &client, &creditor, &amount],
        )
        .await
        .unwrap();
    row.get(0)
}

fn message_id(outbox_id: i64) -> String {
    format!("<outboxd-notify-{outbox_id}@{FROM_DOMAIN}>")
}

async fn wait_mails(sink: &SmtpSink, n: usize, timeout: Duration) -> bool {
    eventually(timeout, || async { sink.count() >= n }).await
}

/// Outbox ids by the Message-IDs received, with how often each came.
fn by_message_id(mails: &[Mail]) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for m in mails {
        *seen
            .entry(m.header("Message-ID").unwrap_or("").to_owned())
            .or_default() += 1;
    }
    seen
}

#[tokio::test]
async fn a_written_message_mails_its_recipients_in_german_with_umlauts_intact() {
    let env = TestEnv::new().await;
    let sink = SmtpSink::start().await;
    let (_dir, vars) = notify_file(&env, &sink, "");
    let mut relay = relay(&vars, "notify-content");
    let first = message(&env, 41, "K-100", "Müller & Söhne GmbH", "1000").await;
    assert!(
        wait_mails(&sink, 1, Duration::from_secs(30)).await,
        "{}",
        relay.log_text()
    );
    let second = message(&env, 42, "K-100", "Müller & Söhne GmbH", "1234.56").await;
    assert!(
        wait_mails(&sink, 2, Duration::from_secs(30)).await,
        "{}",
        relay.log_text()
    );

    let mails = sink.mails();
    assert_eq!(mails.len(), 2);
    let m = &mails[1];
    assert_eq!(m.header("Message-ID"), Some(message_id(second).as_str()));
    assert_eq!(
        mails[0].header("Message-ID"),
        Some(message_id(first).as_str())
    );
    assert_eq!(
        m.envelope_to,
        format!("sachbearbeitung@{FROM_DOMAIN}, joerg@{FROM_DOMAIN}")
    );
    let to = m.header("To").unwrap();
    assert!(
        to.contains("Jörg Übel") && to.contains("sachbearbeitung@"),
        "{to}"
    );
    assert!(
        m.header("From")
            .unwrap()
            .contains(&format!("benachrichtigung@{FROM_DOMAIN}"))
    );
    assert!(m.header("Date").is_some());
    assert_eq!(
        m.header("Subject"),
        Some("Forderung aktualisiert: K-100 – Müller & Söhne GmbH")
    );
    let body = &m.body;
    assert!(
        body.contains("Gläubiger:      Müller & Söhne GmbH"),
        "{body}"
    );
    assert!(body.contains("Neuer Betrag:   1.234,56\u{a0}€"), "{body}");
    assert!(body.contains("Bisher:         1.000,00\u{a0}€"), "{body}");
    assert!(body.contains("Ticket:         42"), "{body}");
    assert!(
        body.contains("Änderung der Forderung (von Frau Schäfer <schaefer@kunde.example>"),
        "{body}"
    );
    // The first had no earlier amount: no "Bisher" line.
    assert!(!mails[0].body.contains("Bisher"), "{}", mails[0].body);
    assert!(mails[0].body.contains("1.000,00\u{a0}€"));

    assert_eq!(
        env.count("SELECT count(*) FROM outbox_notifications WHERE status = 'sent' AND sent_at IS NOT NULL").await,
        2
    );
    relay.signal("TERM");
    assert!(relay.wait_timeout(Duration::from_secs(20)).is_some());
    // A requeued synced row (audit --repair, resync) is written again, but mails no more.
    env.pg()
        .await
        .execute(
            "UPDATE outbox_messages SET status = 'pending', synced_at = NULL WHERE id = $1",
            &[&second],
        )
        .await
        .unwrap();
    let again = self::relay(&vars, "notify-content-2");
    assert!(
        env.wait_synced(Duration::from_secs(30)).await,
        "{}",
        again.log_text()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(sink.count(), 2);
    again.signal("TERM");
    assert!(!again.log_text().contains("test-secret"));
}

#[tokio::test]
async fn exactly_one_mail_per_written_message_with_two_relays() {
    let env = TestEnv::new().await;
    let sink = SmtpSink::start().await;
    let (_dir, vars) = notify_file(&env, &sink, "concurrency = 8\n");
    let relays = [relay(&vars, "notify-a"), relay(&vars, "notify-b")];
    // 1,000 messages over 100 aggregates, in waves while the relays run.
    for _ in 0..10 {
        env.seed(100, 100).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert!(env.wait_synced(Duration::from_secs(120)).await);
    let owed = env.count("SELECT count(*) FROM outbox_notifications").await as usize;
    assert!(
        wait_mails(&sink, owed, Duration::from_secs(120)).await,
        "{} of {owed} mails; {}",
        sink.count(),
        relays[0].log_text()
    );
    // No late extra mail either.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mails = sink.mails();
    let pg = env.pg().await;
    let ids: BTreeSet<String> = pg
        .query(
            "SELECT outbox_id FROM outbox_notifications WHERE status = 'sent'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| message_id(r.get(0)))
        .collect();
    assert_eq!(ids.len(), owed, "every notification is sent");
    let seen = by_message_id(&mails);
    assert_eq!(seen.keys().cloned().collect::<BTreeSet<_>>(), ids);
    assert!(seen.values().all(|n| *n == 1), "a duplicate: {seen:?}");
    // Every aggregate's newest message was written, so notified; coalesced
    // ones were not, and none notified twice.
    let newest_unnotified = env
        .count(
            "SELECT count(*) FROM (SELECT max(id) AS id FROM outbox_messages GROUP BY aggregate_id) n
             WHERE NOT EXISTS (SELECT 1 FROM outbox_notifications WHERE outbox_id = n.id)",
        )
        .await;
    assert_eq!(newest_unnotified, 0);
    assert!((100..=1000).contains(&owed), "{owed}");
    println!(
        "1000 messages: {owed} written and mailed, {} coalesced or no-ops",
        1000 - owed
    );
}

#[tokio::test]
async fn an_smtp_outage_holds_mails_back_but_not_mongodb() {
    let env = TestEnv::new().await;
    let mut sink = SmtpSink::start().await;
    let (_dir, vars) = notify_file(&env, &sink, "");
    let mut relay = relay(&vars, "notify-outage");
    sink.stop();
    let seeded = env.seed(30, 30).await;
    assert!(
        env.wait_synced(Duration::from_secs(30)).await,
        "MongoDB syncing goes on"
    );
    assert!(env.behind().await.is_empty());
    // Several rounds of failing sends and probes.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        env.count(
            "SELECT count(*) FROM outbox_notifications WHERE status IN ('pending', 'processing')"
        )
        .await,
        seeded.len() as i64
    );
    assert_eq!(
        env.count("SELECT count(*) FROM outbox_notifications WHERE status = 'failed'")
            .await,
        0
    );
    sink.resume().await;
    assert!(
        wait_mails(&sink, seeded.len(), Duration::from_secs(60)).await,
        "{}",
        relay.log_text()
    );
    assert_eq!(by_message_id(&sink.mails()).len(), seeded.len());
    relay.signal("TERM");
    assert!(relay.wait_timeout(Duration::from_secs(20)).is_some());
    let log = relay.log_text();
    assert_eq!(log.matches("SMTP unavailable").count(), 1, "{log}");
    assert_eq!(log.matches("SMTP available again").count(), 1, "{log}");
}

#[tokio::test]
async fn a_relay_killed_mid_send_or_before_it_loses_no_mail() {
    let env = TestEnv::new().await;
    let mut sink = SmtpSink::start().await;
    let (_dir, vars) = notify_file(&env, &sink, "concurrency = 1\nbatch_size = 5\n");

    // Between the MongoDB write (and its mark) and the send: SMTP down, kill.
    sink.stop();
    let mut first = relay(&vars, "notify-kill-1");
    let early = env.seed(5, 5).await;
    assert!(env.wait_synced(Duration::from_secs(30)).await);
    first.signal("KILL");
    let _ = first.wait_timeout(Duration::from_secs(10));
    sink.resume().await;

    // Between the send and its mark: the server has the mail but stalls its
    // answer, and the relay dies waiting.
    sink.set_delay(30.0);
    let mut second = relay(&vars, "notify-kill-2");
    assert!(
        wait_mails(&sink, 1, Duration::from_secs(30)).await,
        "{}",
        second.log_text()
    );
    second.signal("KILL");
    let _ = second.wait_timeout(Duration::from_secs(10));
    sink.set_delay(0.0);
    sink.stop();
    sink.resume().await;

    let late = env.seed(5, 5).await;
    let third = relay(&vars, "notify-kill-3");
    let all: BTreeSet<String> = early
        .iter()
        .chain(&late)
        .map(|id| message_id(*id))
        .collect();
    let arrived = eventually(Duration::from_secs(60), || async {
        by_message_id(&sink.mails())
            .keys()
            .cloned()
            .collect::<BTreeSet<_>>()
            == all
    })
    .await;
    let seen = by_message_id(&sink.mails());
    assert!(arrived, "{seen:?} vs {all:?}; {}", third.log_text());
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    // The mail in flight at the kill came again, with the same Message-ID.
    assert!(duplicates >= 1, "{seen:?}");
    println!("kill -9 mid-send: {duplicates} duplicate(s), 0 lost");
    assert_eq!(
        env.count("SELECT count(*) FROM outbox_notifications WHERE status <> 'sent'")
            .await,
        0
    );
    third.signal("TERM");
}

#[tokio::test]
async fn a_write_whose_mark_was_lost_still_mails_but_an_already_newer_one_does_not() {
    use outboxd::mongo::Outcome;
    let env = TestEnv::new().await;
    let config = env.config();
    let sink = outboxd::mongo::connect(&config.mongodb).await.unwrap();
    let older = message(&env, 1, "K-1", "Bank", "10").await;
    let newer = message(&env, 2, "K-1", "Bank", "20").await;
    let pg = env.pg().await;
    let claimed = |id: i64| {
        let pg = &pg;
        async move {
            let row = pg
                .query_one(
                    "SELECT o.id, o.operation, o.aggregate_id, o.payload, o.email_id, o.idempotency_key,
                            o.attempts, o.created_at, e.ticket_id, e.webhook_id
                     FROM outbox_messages o JOIN incoming_emails e ON e.id = o.email_id WHERE o.id = $1",
                    &[&id],
                )
                .await
                .unwrap();
            outboxd::outbox::Claimed::from_row(&row)
        }
    };
    let far = || std::time::Instant::now() + Duration::from_secs(60);
    let (o, n) = (claimed(older).await, claimed(newer).await);
    // The newer written first (a crash before its mark), then the older arrives late.
    assert_eq!(
        sink.apply_detailed(std::slice::from_ref(&n), 1, far())
            .await[&newer],
        Outcome::Applied
    );
    assert_eq!(
        sink.apply_detailed(&[n], 1, far()).await[&newer],
        Outcome::Applied,
        "same message again"
    );
    assert_eq!(
        sink.apply_detailed(std::slice::from_ref(&o), 1, far())
            .await[&older],
        Outcome::AlreadyNewer
    );
    assert_eq!(
        sink.apply(&[o], 1, far()).await[&older],
        Outcome::Applied,
        "apply keeps its answer"
    );
}

#[tokio::test]
async fn a_send_cut_off_by_its_deadline_leaves_no_connection_that_fails_the_next_mails() {
    let env = TestEnv::new().await;
    let sink = SmtpSink::start().await;
    // Each step answers within the 1 s step timeout, but a whole send (MAIL and
    // two RCPTs) outlasts the send's deadline of twice that.
    let (_dir, mut vars) = notify_file(&env, &sink, "concurrency = 1\n");
    vars.push(("OUTBOXD__NOTIFY__TIMEOUT_MS".into(), "1000".into()));
    sink.set_slow(0.8);
    let mut relay = relay(&vars, "notify-cut-off");
    let first = message(&env, 8, "K-8", "Bank", "5").await;
    let timed_out = eventually(Duration::from_secs(30), || async {
        env.count("SELECT count(*) FROM outbox_notifications WHERE attempts >= 1")
            .await
            == 1
    })
    .await;
    assert!(timed_out, "{}", relay.log_text());
    sink.set_slow(0.0);
    let second = message(&env, 9, "K-9", "Sparkasse", "6").await;
    let all = BTreeSet::from([message_id(first), message_id(second)]);
    let arrived = eventually(Duration::from_secs(30), || async {
        by_message_id(&sink.mails())
            .keys()
            .cloned()
            .collect::<BTreeSet<_>>()
            == all
    })
    .await;
    let failed: Vec<String> = env
        .pg()
        .await
        .query(
            "SELECT outbox_id || ': ' || coalesce(last_error, '') FROM outbox_notifications
             WHERE status = 'failed'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(failed, Vec::<String>::new(), "{}", relay.log_text());
    assert!(arrived, "{:?}; {}", sink.mails().len(), relay.log_text());
    relay.signal("TERM");
    assert!(relay.wait_timeout(Duration::from_secs(20)).is_some());
}

#[tokio::test]
async fn a_refused_mail_fails_shows_in_status_and_retry_sends_it() {
    let env = TestEnv::new().await;
    let sink = SmtpSink::start().await;
    let (_dir, vars) = notify_file(&env, &sink, "");
    sink.set_reject(true);
    let mut relay = relay(&vars, "notify-refused");
    let id = message(&env, 7, "K-7", "Bank", "5").await;
    let failed = eventually(Duration::from_secs(30), || async {
        env.count("SELECT count(*) FROM outbox_notifications WHERE status = 'failed'")
            .await
            == 1
    })
    .await;
    assert!(failed, "{}", relay.log_text());
    let error: String = env
        .pg()
        .await
        .query_one(
            "SELECT last_error FROM outbox_notifications WHERE outbox_id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert!(error.contains("550"), "{error}");
    // A 5xx is final at once: one attempt.
    assert_eq!(
        env.count("SELECT attempts::bigint FROM outbox_notifications")
            .await,
        1
    );

    let (code, out) = outboxd_with(&["status", "--json"], &vars);
    assert_eq!(code, 2, "{out}");
    let s: serde_json::Value = serde_json::from_str(&out[..out.rfind('}').unwrap() + 1]).unwrap();
    assert_eq!(s["notifications"]["failed"], 1, "{s}");
    assert_eq!(s["counts"]["synced"], 1, "{s}");
    let (code, out) = outboxd_with(&["status"], &vars);
    assert!(
        out.contains("notifications   pending 0  processing 0  sent 0  failed 1"),
        "{code} {out}"
    );

    let (code, out) = outboxd_with(&["retry", "--notification-id", "999999"], &vars);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("notification 999999 is not failed"), "{out}");
    sink.set_reject(false);
    let (code, out) = outboxd_with(&["retry", "--notifications"], &vars);
    assert_eq!((code, out.trim()), (0, "requeued 1 failed notification"));
    assert!(
        wait_mails(&sink, 1, Duration::from_secs(30)).await,
        "{}",
        relay.log_text()
    );
    assert_eq!(
        sink.mails()[0].header("Message-ID"),
        Some(message_id(id).as_str())
    );
    let sent = eventually(Duration::from_secs(10), || async {
        env.count("SELECT count(*) FROM outbox_notifications WHERE status = 'sent'")
            .await
            == 1
    })
    .await;
    assert!(sent);
    let (code, out) = outboxd_with(&["status", "--json"], &vars);
    assert_eq!(code, 0, "{out}");
    relay.signal("TERM");
    assert!(relay.wait_timeout(Duration::from_secs(20)).is_some());
}

#[tokio::test]
async fn a_bad_notify_config_stops_the_relay_at_start_without_showing_secrets() {
    let env = TestEnv::new().await;
    let sink = SmtpSink::start().await;
    for (key, value, named) in [
        ("SUBJECT", "{{ creditorr }}", "notify.subject"),
        ("BODY", "{% if %}", "notify.body"),
        ("FROM", "not an address", "notify.from"),
        ("TO", "[]", "notify.to"),
    ] {
        let (_dir, mut vars) = notify_file(&env, &sink, "");
        vars.push((format!("OUTBOXD__NOTIFY__{key}"), value.into()));
        let (code, out) = outboxd_with(&["relay", "--id", "bad"], &vars);
        assert_eq!(code, 78, "{key}: {out}");
        assert!(out.contains(named), "{key}: {out}");
    }
    // A password file that cannot be read, or one for a URL naming no user.
    let password = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(password.path(), "pw-never-shown\n").unwrap();
    for (file, named) in [
        (
            "/nonexistent/smtp-password".to_owned(),
            "notify.smtp_password_file",
        ),
        (password.path().display().to_string(), "names no user"),
    ] {
        let (_dir, mut vars) = notify_file(&env, &sink, "");
        vars.push(("OUTBOXD__NOTIFY__SMTP_PASSWORD_FILE".into(), file));
        let (code, out) = outboxd_with(&["relay", "--id", "bad"], &vars);
        assert_eq!(code, 78, "{out}");
        assert!(
            out.contains(named) && !out.contains("pw-never-shown"),
            "{out}"
        );
    }
    let (_dir, mut vars) = notify_file(&env, &sink, "");
    vars.push((
        "OUTBOXD__NOTIFY__SMTP_URL".into(),
        "smtq://user:hunter2-never-shown@127.0.0.1:1".into(),
    ));
    let (code, out) = outboxd_with(&["relay", "--id", "bad"], &vars);
    assert_eq!(code, 78, "{out}");
    assert!(
        out.contains("notify.smtp_url") && !out.contains("hunter2"),
        "{out}"
    );
}

#[tokio::test]
async fn sigterm_mid_send_finishes_the_send_and_gives_the_rest_back() {
    let env = TestEnv::new().await;
    let sink = SmtpSink::start().await;
    let (_dir, vars) = notify_file(&env, &sink, "concurrency = 1\n");
    sink.set_delay(2.0);
    let mut first = relay(&vars, "notify-term-1");
    let ids = env.seed(3, 3).await;
    assert!(
        wait_mails(&sink, 1, Duration::from_secs(30)).await,
        "{}",
        first.log_text()
    );
    first.signal("TERM");
    let status = first.wait_timeout(Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}: {}",
        first.log_text()
    );
    // The send in flight was answered and marked; none is left held.
    assert_eq!(
        env.count("SELECT count(*) FROM outbox_notifications WHERE status = 'processing'")
            .await,
        0
    );
    assert!(
        env.count("SELECT count(*) FROM outbox_notifications WHERE status = 'sent'")
            .await
            >= 1
    );
    sink.set_delay(0.0);
    let second = relay(&vars, "notify-term-2");
    assert!(
        wait_mails(&sink, ids.len(), Duration::from_secs(30)).await,
        "{}",
        second.log_text()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let seen = by_message_id(&sink.mails());
    assert_eq!(seen.len(), ids.len(), "{seen:?}");
    assert!(
        seen.values().all(|n| *n == 1),
        "no duplicate after a clean stop: {seen:?}"
    );
}

#[tokio::test]
async fn rebuilding_a_lost_mongodb_with_resync_mails_nothing_again() {
    let env = TestEnv::new().await;
    let sink = SmtpSink::start().await;
    let (_dir, vars) = notify_file(&env, &sink, "");
    message(&env, 1, "K-1", "Bank", "10").await;
    message(&env, 2, "K-2", "Bank", "20").await;
    let _relay = relay(&vars, "resent-a");
    assert!(env.wait_synced(Duration::from_secs(30)).await);
    assert!(wait_mails(&sink, 2, Duration::from_secs(30)).await);
    // Retention took the sent notifications, then MongoDB was lost.
    let pg = env.pg().await;
    pg.execute("DELETE FROM outbox_notifications", &[])
        .await
        .unwrap();
    env.docs().drop().await.unwrap();
    let (code, out) = outboxd_with(&["resync"], &vars);
    assert_eq!(code, 0, "{out}");
    assert!(env.wait_synced(Duration::from_secs(30)).await);
    assert!(
        eventually(Duration::from_secs(10), || async {
            env.docs()
                .count_documents(mongodb::bson::doc! {})
                .await
                .unwrap()
                == 2
        })
        .await
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(sink.count(), 2, "the rebuild mailed again");
    assert_eq!(
        env.count("SELECT count(*) FROM outbox_notifications").await,
        0
    );
    // A live message after the rebuild still mails.
    let live = message(&env, 3, "K-1", "Bank", "30").await;
    assert!(wait_mails(&sink, 3, Duration::from_secs(30)).await);
    assert_eq!(by_message_id(&sink.mails())[&message_id(live)], 1);
}
