//! The relay against real PostgreSQL and FerretDB: cause the faults, then count
//! rows and documents.

mod common;

use std::time::{Duration, Instant};

use common::*;
use mongodb::bson::doc;
use outboxd::mongo::{self, Outcome};
use outboxd::outbox::Claimed;

fn relay(env: &TestEnv, id: &str, extra: &[(&str, &str)]) -> Proc {
    let mut vars = env.child_env();
    vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    Proc::spawn(&["relay", "--id", id], &vars, id)
}

#[tokio::test]
async fn end_to_end_the_document_holds_the_latest_amount() {
    let env = TestEnv::new().await;
    let ingest = Ingest::start(&env.config()).await;
    let _relay = relay(&env, "e2e", &[]);
    let http = common::http();
    let mut last = serde_json::Value::Null;
    for (n, amount) in ["10.00", "20.50", "30.99"].iter().enumerate() {
        let (status, body) = post_signed(
            &http,
            &ingest.url(),
            &event(n as u64, "MP-1", "K-1", amount),
        )
        .await;
        assert_eq!(status, 202);
        last = body;
    }
    assert!(
        env.wait_synced(Duration::from_secs(20)).await,
        "all rows synced"
    );
    let doc = env.doc("MP-1/K-1").await.expect("document exists");
    assert_eq!(doc.get_str("amount").unwrap(), "30.99");
    assert_eq!(doc.get_i64("amount_minor").unwrap(), 3099);
    assert_eq!(
        doc.get_i64("outbox_id").unwrap(),
        last["outbox_id"].as_i64().unwrap()
    );
    assert_eq!(
        doc.get_i64("email_id").unwrap(),
        last["email_id"].as_i64().unwrap()
    );
    assert_eq!(doc.get_str("creditor_name").unwrap(), "Sparkasse KölnBonn");
    assert_eq!(doc.get_str("currency").unwrap(), "EUR");
    assert!(doc.get_datetime("synced_at").is_ok());
    assert_eq!(
        env.count("SELECT count(*) FROM incoming_emails WHERE sync_status = 'synced'")
            .await,
        3
    );
    ingest.stop().await;
}

/// A write deadline that never binds.
fn far() -> Instant {
    Instant::now() + Duration::from_secs(3600)
}

fn claimed(id: i64, aggregate: &str, amount: &str) -> Claimed {
    Claimed {
        id,
        operation: "update_creditor_debt".into(),
        aggregate_id: aggregate.into(),
        payload: Ok(
            serde_json::json!({"client_reference": "C", "creditor_name": "Bank", "creditor_reference": "K",
                                    "amount": amount, "currency": "EUR"}),
        ),
        email_id: id,
        idempotency_key: format!("k{id}"),
        attempts: 0,
        created_at: chrono::Utc::now(),
        ticket_id: 1,
        webhook_id: format!("w{id}"),
        known: false,
    }
}

/// A sink for tests that call it directly, with no lease to fit in: a first
/// write may create the database, which is slow on a busy machine.
async fn direct_sink(env: &TestEnv) -> mongo::Sink {
    let mut config = env.config().mongodb;
    config.timeout_ms = 10_000;
    mongo::connect(&config).await.unwrap()
}

#[tokio::test]
async fn an_older_message_never_moves_a_document_backwards() {
    let env = TestEnv::new().await;
    let sink = direct_sink(&env).await;
    let newer = claimed(20, "C/K", "2.00");
    let older = claimed(10, "C/K", "1.00");
    let applied = sink.apply(std::slice::from_ref(&newer), 1, far()).await;
    assert_eq!(applied[&20], Outcome::Applied);
    let before = env.doc("C/K").await.unwrap();

    // Older after newer: a no-op success (the guarded upsert hits 11000).
    assert_eq!(
        sink.apply(std::slice::from_ref(&older), 1, far()).await[&10],
        Outcome::Applied
    );
    // The same message again: also a no-op.
    assert_eq!(
        sink.apply(std::slice::from_ref(&newer), 1, far()).await[&20],
        Outcome::Applied
    );
    assert_eq!(env.doc("C/K").await.unwrap(), before, "document unchanged");

    // Both in one batch: coalesced to the newest, both count as applied.
    let third = claimed(30, "C/K", "3.00");
    let outcomes = sink.apply(&[older.clone(), third.clone()], 4, far()).await;
    assert_eq!(outcomes[&10], Outcome::Applied);
    assert_eq!(outcomes[&30], Outcome::Applied);
    assert_eq!(
        env.doc("C/K").await.unwrap().get_i64("outbox_id").unwrap(),
        30
    );
    assert_eq!(env.docs().count_documents(doc! {}).await.unwrap(), 1);
}

#[tokio::test]
async fn a_document_past_16_mib_fails_alone_and_a_large_batch_is_split() {
    let env = TestEnv::new().await;
    let sink = direct_sink(&env).await;
    // Two aggregates exist already, with older messages: in their insert
    // command they answer 11000 and take the guarded update.
    for (id, aggregate) in [(4, "C104/K"), (11, "C111/K")] {
        let older = claimed(id, aggregate, "0.50");
        assert_eq!(sink.apply(&[older], 1, far()).await[&id], Outcome::Applied);
    }
    // Eighteen documents of 3 MiB: 54 MiB, more than one command may hold
    // (16 MiB for MongoDB, a 48 MB message for FerretDB), two per command.
    let mut rows: Vec<Claimed> = (101..=118)
        .map(|i| {
            let mut row = claimed(i, &format!("C{i}/K"), "1.00");
            row.payload.as_mut().unwrap()["creditor_name"] = "x".repeat(3 * 1024 * 1024).into();
            row
        })
        .collect();
    let mut huge = claimed(119, "HUGE/K", "1.00");
    huge.payload.as_mut().unwrap()["creditor_name"] = "x".repeat(17 * 1024 * 1024).into();
    rows.push(huge);
    // An older message of that aggregate is coalesced into it, but not failed
    // with it: it goes back to be written alone.
    rows.push(claimed(100, "HUGE/K", "0.75"));
    let outcomes = sink.apply(&rows, 4, far()).await;
    assert_eq!(outcomes[&100], Outcome::Untried);
    for i in 101..=118 {
        assert_eq!(outcomes[&i], Outcome::Applied, "row {i}");
    }
    match &outcomes[&119] {
        Outcome::Permanent(reason) => assert!(reason.contains("16 MiB"), "{reason}"),
        other => panic!("the huge document failed for good, not {other:?}"),
    }
    assert_eq!(env.docs().count_documents(doc! {}).await.unwrap(), 18);
    for aggregate in ["C104/K", "C111/K"] {
        let doc = env.doc(aggregate).await.unwrap();
        assert_eq!(doc.get_str("amount"), Ok("1.00"), "{aggregate} updated");
    }
    assert!(env.doc("HUGE/K").await.is_none());
}

#[tokio::test]
async fn no_write_starts_once_the_lease_is_too_short_to_finish_it() {
    let env = TestEnv::new().await;
    let sink = direct_sink(&env).await;
    // First write of an aggregate (insert) and a later one (guarded update).
    let first = claimed(1, "A/K", "1.00");
    sink.apply(std::slice::from_ref(&first), 1, far()).await;
    let rows = [claimed(2, "A/K", "2.00"), claimed(3, "B/K", "3.00")];
    let outcomes = sink.apply(&rows, 4, Instant::now()).await;
    for id in [2, 3] {
        assert_eq!(outcomes[&id], Outcome::Late, "row {id}");
    }
    assert_eq!(
        env.doc("A/K").await.unwrap().get_i64("outbox_id").unwrap(),
        1,
        "the late update was not sent"
    );
    assert!(
        env.doc("B/K").await.is_none(),
        "the late insert was not sent"
    );
}

/// What a relay's workers share, to call `run_batch` in the test's process.
async fn in_process(
    config: &outboxd::config::Config,
    relay_id: &str,
) -> outboxd::relay::worker::Shared {
    outboxd::relay::worker::Shared {
        relay_id: relay_id.into(),
        config: config.relay.clone(),
        pool: outboxd::db::pool(&config.database).unwrap(),
        sink: mongo::connect(&config.mongodb).await.unwrap(),
        postgres: outboxd::relay::health::Health::new("PostgreSQL"),
        mongodb: outboxd::relay::health::Health::new("MongoDB"),
        heartbeat: outboxd::systemd::Heartbeat::new(Duration::from_secs(config.relay.lease_s + 10)),
        notify_enabled: config.notify.enabled,
        notify_wake: Default::default(),
        shutdown: tokio_util::sync::CancellationToken::new(),
    }
}

#[tokio::test]
async fn a_claim_takes_due_retries_and_new_rows_without_reading_past_rows_backing_off() {
    let env = TestEnv::new().await;
    let pg = env.pg().await;
    // After a MongoDB outage: 3000 rows backing off, two of them due again...
    let old = env.seed(3000, 3000).await;
    pg.execute(
        "UPDATE outbox_messages SET attempts = 2, next_attempt_at = now() + interval '1 hour'",
        &[],
    )
    .await
    .unwrap();
    let due_again = [old[10], old[2000]];
    pg.execute(
        "UPDATE outbox_messages SET next_attempt_at = now() - interval '1 second' WHERE id = ANY($1)",
        &[&&due_again[..]],
    )
    .await
    .unwrap();
    // ...then 2000 new rows, the first of which a DBA postponed.
    let new = env.seed(2000, 2000).await;
    pg.execute(
        "UPDATE outbox_messages SET aggregate_id = 'new-' || id WHERE id = ANY($1)",
        &[&new],
    )
    .await
    .unwrap();
    pg.execute(
        "UPDATE outbox_messages SET next_attempt_at = now() + interval '1 hour' WHERE id = $1",
        &[&new[0]],
    )
    .await
    .unwrap();
    pg.batch_execute("ANALYZE outbox_messages").await.unwrap();

    // The claim's plan passes over no row backing off, as a custom plan and as
    // the generic one a relay's prepared statement may settle on.
    let client = env.pg().await;
    let probe = format!(
        "BEGIN;
         PREPARE claim_probe(text, int8, float8, int4) AS {claim};
         SET LOCAL plan_cache_mode = force_custom_plan;
         EXPLAIN (ANALYZE, COSTS OFF) EXECUTE claim_probe('plan-probe', 4, 30, {class});
         SET LOCAL plan_cache_mode = force_generic_plan;
         EXPLAIN (ANALYZE, COSTS OFF) EXECUTE claim_probe('plan-probe', 4, 30, {class});
         ROLLBACK;
         DEALLOCATE claim_probe;
         SELECT pg_advisory_unlock_all();",
        claim = outboxd::outbox::CLAIM,
        class = outboxd::outbox::AGGREGATE_LOCK_CLASS
    );
    let plans: Vec<String> = client
        .simple_query(&probe)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .collect();
    let passed: u64 = plans
        .iter()
        .filter_map(|l| l.trim().strip_prefix("Rows Removed by Filter: "))
        .map(|n| n.parse::<u64>().unwrap())
        .sum();
    assert!(
        passed <= 10,
        "the claims read past {passed} rows:\n{}",
        plans.join("\n")
    );
    for index in ["outbox_messages_retry_idx", "outbox_messages_fresh_idx"] {
        let scans = plans
            .iter()
            .filter(|l| l.contains(&format!("Index Scan using {index} ")))
            .count();
        assert_eq!(scans, 2, "each plan walks {index}:\n{}", plans.join("\n"));
    }
    assert!(
        !plans.iter().any(|l| l.contains("Seq Scan")),
        "no plan reads a whole table:\n{}",
        plans.join("\n")
    );

    // The due retries first, then the oldest new rows; past the aggregates
    // another session holds, which wait for it.
    let holder = env.pg().await;
    for id in [due_again[0], new[1]] {
        holder
            .execute(
                "SELECT pg_advisory_lock($1, hashtext(aggregate_id)) FROM outbox_messages WHERE id = $2",
                &[&outboxd::outbox::AGGREGATE_LOCK_CLASS, &id],
            )
            .await
            .unwrap();
    }
    let mut config = env.config();
    config.relay.batch_size = 4;
    // The first write also creates the database: time to spare on a busy machine.
    config.relay.lease_s = 60;
    config.mongodb.timeout_ms = 30_000;
    let shared = in_process(&config, "claim-relay").await;
    let synced = "SELECT id FROM outbox_messages WHERE status = 'synced' ORDER BY id";
    let ids = |rows: Vec<tokio_postgres::Row>| rows.iter().map(|r| r.get(0)).collect::<Vec<i64>>();
    let progress = outboxd::relay::worker::run_batch(&shared).await.unwrap();
    assert_eq!(progress.map(|p| p.rows()), Some(4));
    assert_eq!(
        ids(pg.query(synced, &[]).await.unwrap()),
        [due_again[1], new[2], new[3], new[4]]
    );
    holder
        .batch_execute("SELECT pg_advisory_unlock_all()")
        .await
        .unwrap();
    let progress = outboxd::relay::worker::run_batch(&shared).await.unwrap();
    assert_eq!(progress.map(|p| p.rows()), Some(4));
    assert_eq!(
        ids(pg.query(synced, &[]).await.unwrap()),
        [&due_again[..], &new[1..7]].concat()
    );
    assert_eq!(
        env.count("SELECT count(*) FROM outbox_messages WHERE status = 'pending' AND attempts = 2")
            .await,
        2998,
        "the rows backing off wait for their time"
    );
    assert!(
        env.doc(&format!("new-{}", new[0])).await.is_none(),
        "the postponed row waits"
    );
}

#[tokio::test]
async fn a_relay_on_an_older_schema_says_to_migrate_and_still_runs() {
    let env = TestEnv::new().await;
    env.pg()
        .await
        .batch_execute("DELETE FROM schema_migrations WHERE version = (SELECT max(version) FROM schema_migrations)")
        .await
        .unwrap();
    env.seed(3, 3).await;
    let mut r = relay(&env, "old-schema", &[]);
    assert!(
        eventually(Duration::from_secs(30), || async {
            env.unsynced().await == 0
        })
        .await,
        "the relay runs"
    );
    r.signal("TERM");
    assert!(r.wait_timeout(Duration::from_secs(30)).is_some());
    let log = r.log_text();
    assert!(
        log.contains("the schema is older than this outboxd expects: run `outboxd migrate`"),
        "{log}"
    );
}

#[tokio::test]
async fn rows_too_late_for_their_lease_go_back_unwritten_and_uncounted() {
    let env = TestEnv::new().await;
    env.seed(3, 3).await;
    // A lease no longer than one write's timeout leaves no time to start any write.
    let mut config = env.config();
    config.relay.lease_s = 1;
    config.mongodb.timeout_ms = 1000;
    let shared = in_process(&config, "late-relay").await;
    let progress = outboxd::relay::worker::run_batch(&shared).await.unwrap();
    assert_eq!(progress.map(|p| p.rows()), Some(3));
    assert_eq!(
        env.count("SELECT count(*) FROM outbox_messages WHERE status = 'pending' AND attempts = 0 AND locked_by IS NULL")
            .await,
        3,
        "every row is pending again, with no attempt counted"
    );
    assert_eq!(env.docs().count_documents(doc! {}).await.unwrap(), 0);
    assert!(!shared.mongodb.is_down(), "MongoDB is not blamed");
}

#[tokio::test]
async fn mongodb_refusing_every_write_uses_up_no_attempts_and_the_backlog_syncs_after() {
    let env = TestEnv::new().await;
    let ferret = Ferret::start().await;
    let mut config = env.config();
    config.mongodb.url = ferret.url(&env.name).into();
    config.relay.max_attempts = 3;
    // Retries come due at once, so that each batch below is a new attempt.
    config.relay.backoff_base_ms = 1;
    config.relay.backoff_cap_ms = 1;
    let shared = std::sync::Arc::new(in_process(&config, "refused").await);
    env.seed(1, 1).await;
    outboxd::relay::worker::run_batch(&shared).await.unwrap();
    assert_eq!(
        env.unsynced().await,
        0,
        "a first write creates the collection"
    );

    let backlog = env.seed(100, 10).await;
    ferret.set_read_only(true).await;
    // Far more rounds than max_attempts, each refused for every row.
    for _ in 0..10 {
        let _ = outboxd::relay::worker::run_batch(&shared).await;
    }
    let seen: Vec<(String, i32, String)> = env
        .pg()
        .await
        .query(
            "SELECT status, attempts, coalesce(last_error, '') FROM outbox_messages
             WHERE id = ANY($1) ORDER BY id",
            &[&backlog],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    ferret.set_read_only(false).await;
    assert!(
        seen.iter()
            .all(|(status, attempts, _)| status == "pending" && *attempts == 0),
        "{:?}",
        &seen[..3]
    );
    // The server's reason, without the raw reply the driver's text appends.
    assert!(
        seen.iter()
            .all(|(_, _, error)| error.starts_with("MongoDB error 1 ")
                && error.contains("read-only transaction")
                && !error.contains("RawDocumentBuf")),
        "the refusal is shown: {:?}",
        &seen[..3]
    );

    let drained = eventually(Duration::from_secs(60), || async {
        let _ = outboxd::relay::worker::run_batch(&shared).await;
        env.unsynced().await == 0
    })
    .await;
    assert!(drained, "the backlog syncs once MongoDB takes writes again");
    assert_eq!(
        env.count("SELECT count(*) FROM outbox_messages WHERE status = 'failed'")
            .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_write_keeps_its_row_held_until_it_surely_landed() {
    // FerretDB's guarded update is not atomic, so a write that got no answer
    // must not be overtaken by a newer one of its aggregate while it may still
    // land: its row stays `processing` through the wait, even if the session
    // holding the aggregate's lock dies or the wait outlasts the lease, and only
    // then goes back.
    let env = TestEnv::new().await;
    let ferret = Ferret::start().await;
    let mut config = env.config();
    config.mongodb.url = ferret.url(&env.name).into();
    config.mongodb.timeout_ms = 3000;
    // The write times out at 3 s and the wait ends at 9 s, past this lease.
    config.relay.lease_s = 6;
    let shared = std::sync::Arc::new(in_process(&config, "unanswered").await);
    // The database and collection first, with time to spare on a busy machine;
    // then a first batch, so that the sink is connected before FerretDB stops.
    let mut warm = config.mongodb.clone();
    warm.timeout_ms = 30_000;
    let warm = mongo::connect(&warm).await.unwrap();
    let created = warm.apply(&[claimed(1, "warm/K", "1.00")], 1, far()).await;
    assert_eq!(created[&1], Outcome::Applied);
    env.seed(1, 1).await;
    // On a busy machine a first write can outlast 3 s; it is then retried.
    let first = eventually(Duration::from_secs(60), || async {
        let _ = outboxd::relay::worker::run_batch(&shared).await;
        env.unsynced().await == 0
    })
    .await;
    assert!(first, "a first write while FerretDB answers");

    env.seed(1, 1).await;
    ferret.signal("STOP");
    let started = Instant::now();
    let task = tokio::spawn({
        let shared = shared.clone();
        async move { outboxd::relay::worker::run_batch(&shared).await }
    });
    let pending = "SELECT count(*) FROM outbox_messages WHERE status = 'pending'";
    let processing = "SELECT count(*) FROM outbox_messages WHERE status = 'processing'";
    // The row is pending until the batch claims it: watch for it going back
    // only once it was seen held.
    let mut claimed = false;
    let mut became_pending = None;
    while !task.is_finished() && started.elapsed() < Duration::from_secs(60) {
        if !claimed {
            claimed = env.count(processing).await == 1;
        } else if became_pending.is_none() && env.count(pending).await == 1 {
            became_pending = Some(started.elapsed());
        }
        // What a relay's rescue task does: take back rows whose lease ended.
        let client = shared.pool.get().await.unwrap();
        outboxd::outbox::rescue_expired(&client, 5, 100)
            .await
            .unwrap();
        drop(client);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let finished = started.elapsed();
    ferret.signal("CONT");
    assert!(claimed, "the batch claimed the row");
    assert!(task.is_finished(), "run_batch returns after the wait");
    task.await.unwrap().unwrap();
    // The write timed out after 3 s and the wait took 6 s more: the row went
    // back to pending only at its end, not when the write timed out (3 s) nor
    // when its first lease ended (6 s).
    if let Some(at) = became_pending {
        assert!(
            at >= Duration::from_secs(9),
            "pending at {at:?}, batch done at {finished:?}"
        );
    }
    assert!(finished >= Duration::from_secs(9), "{finished:?}");
    // Every write of the batch went unanswered: an outage, which uses up no
    // attempt.
    assert_eq!(
        env.count(
            "SELECT count(*) FROM outbox_messages
             WHERE status = 'pending' AND attempts = 0 AND last_error LIKE '%no answer%'"
        )
        .await,
        1,
        "given back after the wait, with the reason"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_relays_sync_every_row_and_leave_every_document_latest() {
    let env = TestEnv::new().await;
    env.seed(10_000, 100).await;
    // Large batches let each relay coalesce; a long lease, because FerretDB
    // writes only tens of documents per second on a busy 2-core machine.
    let setting = [
        ("OUTBOXD__RELAY__BATCH_SIZE", "500"),
        ("OUTBOXD__RELAY__LEASE_S", "60"),
    ];
    let relays: Vec<Proc> = (0..3)
        .map(|i| relay(&env, &format!("race{i}"), &setting))
        .collect();
    assert!(
        env.wait_synced(Duration::from_secs(400)).await,
        "10k rows synced"
    );
    assert_eq!(
        env.behind().await,
        vec![],
        "every document holds its latest message"
    );
    assert_eq!(env.docs().count_documents(doc! {}).await.unwrap(), 100);
    assert_eq!(
        env.count("SELECT count(*) FROM incoming_emails WHERE sync_status <> 'synced'")
            .await,
        0
    );
    let holders = env
        .count("SELECT count(DISTINCT locked_by) FROM outbox_messages")
        .await;
    assert_eq!(holders, 0, "no row is left held");
    drop(relays);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_batch_loses_nothing_and_another_relay_takes_over() {
    let env = TestEnv::new().await;
    env.seed(3000, 50).await;
    let mut doomed = relay(&env, "doomed", &[("OUTBOXD__RELAY__BATCH_SIZE", "200")]);
    let started = eventually(Duration::from_secs(30), || async {
        env.count("SELECT count(*) FROM outbox_messages WHERE status = 'synced'")
            .await
            > 0
    })
    .await;
    assert!(started, "the first relay syncs something");
    doomed.signal("KILL");
    doomed.wait_timeout(Duration::from_secs(5)).expect("killed");
    let held = env
        .count("SELECT count(*) FROM outbox_messages WHERE locked_by = 'doomed'")
        .await;
    let heir = relay(&env, "heir", &[]);
    assert!(
        env.wait_synced(Duration::from_secs(300)).await,
        "everything synced after the lease expired"
    );
    assert_eq!(env.behind().await, vec![]);
    if held > 0 {
        let rescued = env
            .count("SELECT count(*) FROM outbox_messages WHERE attempts > 0")
            .await;
        assert!(
            rescued > 0,
            "rows held by the dead relay were taken back ({held} held)"
        );
        // One line per row taken back, naming it and the relay that held it.
        let log = heir.log_text();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("lease expired: row taken back") && l.contains("doomed"))
            .collect();
        assert_eq!(lines.len() as i64, held, "{log}");
        assert!(
            lines
                .iter()
                .all(|l| l.contains("\"outbox_id\"") && l.contains("\"idempotency_key\"")),
            "{lines:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ferretdb_outage_keeps_rows_pending_and_drains_after_restart() {
    let env = TestEnv::new().await;
    let mut ferret = Ferret::start().await;
    let url = ferret.url(&env.name);
    let mut r = relay(&env, "outage", &[("MONGODB_URL", &url)]);
    env.seed(10, 5).await;
    assert!(env.wait_synced(Duration::from_secs(30)).await);

    // Only this outage's lines count: a first write to a new FerretDB can be
    // slow enough on a busy machine to be logged as one.
    let log_before = r.log_text().len();
    ferret.stop();
    env.seed(200, 20).await;
    // Tried and given back with the reason, but an outage uses up no attempts.
    let retried = eventually(Duration::from_secs(20), || async {
        env.count("SELECT count(*) FROM outbox_messages WHERE status = 'pending' AND last_error IS NOT NULL").await > 0
    })
    .await;
    assert!(retried, "rows were tried, and given back");
    assert_eq!(
        env.count("SELECT count(*) FROM outbox_messages WHERE attempts > 0")
            .await,
        0
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        env.count("SELECT count(*) FROM outbox_messages WHERE status = 'failed'")
            .await,
        0
    );
    assert!(env.unsynced().await > 0);

    ferret.resume().await;
    assert!(
        env.wait_synced(Duration::from_secs(60)).await,
        "drains after FerretDB is back"
    );
    let client = mongodb::Client::with_uri_str(&url).await.unwrap();
    let docs = client
        .database(&env.name)
        .collection::<mongodb::bson::Document>("creditor_debts");
    assert_eq!(docs.count_documents(doc! {}).await.unwrap(), 20);
    r.signal("TERM");
    r.wait_timeout(Duration::from_secs(10));
    let log = r.log_text().split_off(log_before);
    assert_eq!(
        log.matches("MongoDB unavailable").count(),
        1,
        "one outage line:\n{log}"
    );
    assert_eq!(
        log.matches("MongoDB available again").count(),
        1,
        "one recovery line:\n{log}"
    );
}

#[tokio::test]
async fn a_killed_listener_delays_rows_by_at_most_the_poll_interval() {
    let env = TestEnv::new().await;
    let r = relay(&env, "listener", &[]);
    let pg = env.pg().await;
    let listening = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN%'";
    assert!(
        eventually(Duration::from_secs(10), || async {
            env.count(listening).await == 1
        })
        .await
    );
    // A first row, so that the relay's MongoDB connection and collection exist
    // and the deadline below measures the poll, not start-up.
    env.seed(1, 1).await;
    assert!(env.wait_synced(Duration::from_secs(30)).await);
    // A notification lost with the listener up: rows committed without a NOTIFY
    // are found by the poll alone (nothing else wakes an idle relay).
    // (The deadlines leave room for a busy machine: with no NOTIFY, nothing but
    // the poll finds these rows at all.)
    env.seed(5, 5).await;
    assert!(
        env.wait_synced(Duration::from_secs(15)).await,
        "rows without a NOTIFY applied within a few poll intervals"
    );
    pg.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN%'",
        &[],
    )
    .await
    .unwrap();
    // Rows committed while the listener is down: the poll, or the wake-up that
    // follows its return, finds them.
    env.seed(5, 5).await;
    assert!(
        env.wait_synced(Duration::from_secs(15)).await,
        "applied within a few poll intervals"
    );
    assert!(
        eventually(Duration::from_secs(15), || async {
            env.count(listening).await == 1
        })
        .await,
        "listener back"
    );
    assert!(r.log_text().contains("LISTEN connection lost"));
}

#[tokio::test]
async fn documents_from_before_outboxd_are_taken_over() {
    // Documents from an earlier sync, or edited by hand, may lack `outbox_id` or
    // hold something else in it; the outbox must still be able to write them.
    let env = TestEnv::new().await;
    env.docs()
        .insert_many([
            doc! { "_id": "C-1/K", "amount": "legacy" },
            doc! { "_id": "C-0/K", "amount": "legacy", "outbox_id": "legacy" },
        ])
        .await
        .unwrap();
    let ids = env.seed(2, 2).await;
    let _r = relay(&env, "legacy", &[]);
    assert!(env.wait_synced(Duration::from_secs(30)).await);
    for (aggregate, id) in [("C-1/K", ids[0]), ("C-0/K", ids[1])] {
        let doc = env.doc(aggregate).await.expect("document exists");
        assert_eq!(doc.get_i64("outbox_id"), Ok(id), "{doc}");
        assert_ne!(doc.get_str("amount"), Ok("legacy"), "{doc}");
    }
}

#[tokio::test]
async fn a_pool_of_one_connection_still_claims_and_marks() {
    // Marks go over the claim's own connection: a worker never waits for a
    // second one, so workers do not starve however small the pool.
    let env = TestEnv::new().await;
    env.seed(300, 30).await;
    let _r = relay(
        &env,
        "pool1",
        &[
            ("OUTBOXD__DATABASE__POOL_SIZE", "1"),
            ("OUTBOXD__DATABASE__POOL_WAIT_MS", "500"),
            ("OUTBOXD__RELAY__WORKERS", "2"),
            ("OUTBOXD__RELAY__BATCH_SIZE", "20"),
        ],
    );
    assert!(
        env.wait_synced(Duration::from_secs(30)).await,
        "all rows synced"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM outbox_messages WHERE attempts > 0")
            .await,
        0,
        "no mark was missed"
    );
}

#[tokio::test]
async fn a_poison_row_fails_with_its_reason_and_the_rest_flow() {
    let env = TestEnv::new().await;
    env.seed(20, 5).await;
    let pg = env.pg().await;
    // A bad amount, and two payloads that PostgreSQL stores but serde_json cannot
    // read (a DBA's edit can leave them): a number past f64, and deep nesting.
    let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
    let poisons = [
        ("poison", r#"{"amount": "ten euros"}"#.to_owned(), "amount"),
        (
            "huge-number",
            r#"{"amount": "1.00", "note": 1e400}"#.to_owned(),
            "cannot be read as JSON",
        ),
        (
            "deep",
            format!(r#"{{"amount": "1.00", "note": {deep}}}"#),
            "cannot be read as JSON",
        ),
    ];
    for (key, payload, _) in &poisons {
        pg.execute(
            "WITH e AS (INSERT INTO incoming_emails (webhook_id, ticket_id, from_address, subject, body)
                        VALUES ($1, 1, 'a@b', 's', 'b') RETURNING id)
             INSERT INTO outbox_messages (operation, aggregate_id, payload, email_id, idempotency_key)
             SELECT 'update_creditor_debt', $1 || '/K', $2::text::jsonb, id, $1 FROM e",
            &[key, payload],
        )
        .await
        .unwrap();
    }
    // Two messages of one aggregate, claimed and coalesced together: the newer
    // one's document is past MongoDB's limit. It fails; the older is written.
    pg.execute(
        "WITH e AS (INSERT INTO incoming_emails (webhook_id, ticket_id, from_address, subject, body)
                    SELECT 'layered-' || g, g, 'a@b', 's', 'b' FROM generate_series(1, 2) g
                    RETURNING id, ticket_id)
         INSERT INTO outbox_messages (operation, aggregate_id, payload, email_id, idempotency_key)
         SELECT 'update_creditor_debt', 'layered/K',
                jsonb_build_object('client_reference', 'layered', 'creditor_reference', 'K',
                                   'currency', 'EUR', 'amount', ticket_id || '.00',
                                   'creditor_name', CASE WHEN ticket_id = 1 THEN 'Bank'
                                                         ELSE repeat('x', 17 * 1024 * 1024) END),
                id, 'layered-' || ticket_id
         FROM e ORDER BY ticket_id",
        &[],
    )
    .await
    .unwrap();
    env.seed(20, 5).await;
    // One worker: a single claim takes both messages of layered/K.
    let _r = relay(&env, "poison", &[("OUTBOXD__RELAY__WORKERS", "1")]);
    let done = eventually(Duration::from_secs(30), || async {
        env.count("SELECT count(*) FROM outbox_messages WHERE status IN ('pending', 'processing')")
            .await
            == 0
    })
    .await;
    assert!(done);
    for (key, _, reason) in &poisons {
        let row = pg
            .query_one(
                "SELECT o.status, o.last_error, e.sync_status, o.attempts FROM outbox_messages o
                 JOIN incoming_emails e ON e.id = o.email_id WHERE o.idempotency_key = $1",
                &[key],
            )
            .await
            .unwrap();
        let error: String = row.get(1);
        assert_eq!(row.get::<_, String>(0), "failed", "{key}: {error}");
        assert!(error.contains(reason), "{key}: reason recorded: {error}");
        assert_eq!(row.get::<_, String>(2), "failed", "{key}");
        assert_eq!(
            row.get::<_, i32>(3),
            1,
            "{key}: failed at once, not retried"
        );
    }
    let layered = pg
        .query(
            "SELECT o.status, coalesce(o.last_error, ''), o.attempts FROM outbox_messages o
             WHERE o.aggregate_id = 'layered/K' ORDER BY o.id",
            &[],
        )
        .await
        .unwrap();
    let layered: Vec<(String, String, i32)> = layered
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(layered[0], ("synced".into(), "".into(), 0), "{layered:?}");
    assert_eq!(layered[1].0, "failed");
    assert!(layered[1].1.contains("16 MiB"), "{layered:?}");
    let doc = env
        .doc("layered/K")
        .await
        .expect("the older message written");
    assert_eq!(doc.get_str("amount"), Ok("1.00"));
    assert_eq!(
        env.count("SELECT count(*) FROM outbox_messages WHERE status = 'synced'")
            .await,
        41
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_exits_0_and_leaves_nothing_processing() {
    let env = TestEnv::new().await;
    env.seed(5000, 50).await;
    let mut r = relay(&env, "term", &[("OUTBOXD__RELAY__BATCH_SIZE", "100")]);
    let busy = eventually(Duration::from_secs(90), || async {
        env.count("SELECT count(*) FROM outbox_messages WHERE status = 'synced'")
            .await
            > 100
    })
    .await;
    assert!(busy);
    r.signal("TERM");
    let status = r
        .wait_timeout(Duration::from_secs(35))
        .expect("exits within the shutdown timeout");
    assert!(status.success(), "{status:?}\n{}", r.log_text());
    assert_eq!(
        env.count("SELECT count(*) FROM outbox_messages WHERE status = 'processing'")
            .await,
        0
    );
    assert!(
        env.unsynced().await > 0,
        "stopped before the end of the backlog"
    );
    // What remains is picked up by the next relay.
    let _next = relay(&env, "term2", &[("OUTBOXD__RELAY__BATCH_SIZE", "1000")]);
    assert!(env.wait_synced(Duration::from_secs(300)).await);
    assert_eq!(env.behind().await, vec![]);
}

#[tokio::test]
async fn a_stopping_relay_claims_nothing_and_sends_nothing() {
    let env = TestEnv::new().await;
    env.seed(3, 3).await;
    let shared = in_process(&env.config(), "stopping").await;
    shared.shutdown.cancel();
    let progress = outboxd::relay::worker::run_batch(&shared).await.unwrap();
    assert!(progress.is_none(), "no claim after SIGTERM");
    assert_eq!(
        env.count("SELECT count(*) FROM outbox_messages WHERE status = 'pending' AND attempts = 0 AND locked_by IS NULL")
            .await,
        3,
        "every row is untouched"
    );
    // A batch claimed just before SIGTERM: its writes not yet sent are not sent.
    let rows = [claimed(1, "C-1/K", "1.00"), claimed(2, "C-2/K", "2.00")];
    let stopped = mongo::StartBy::new(far(), shared.shutdown.clone());
    let outcomes = shared.sink.apply(&rows, 4, stopped).await;
    assert_eq!(outcomes[&1], Outcome::Late);
    assert_eq!(outcomes[&2], Outcome::Late);
    assert_eq!(env.docs().count_documents(doc! {}).await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_timeout_leaves_rows_whose_write_may_land_to_their_lease() {
    // A write sent before SIGTERM may land whenever the server gets to it. Its
    // row given back at the shutdown timeout could be claimed and written anew,
    // then overtaken by the late write: it must wait for its lease instead.
    let env = TestEnv::new().await;
    let ferret = Ferret::start().await;
    let url = ferret.url(&env.name);
    let setting = [
        ("MONGODB_URL", url.as_str()),
        ("OUTBOXD__RELAY__SHUTDOWN_TIMEOUT_S", "3"),
        ("OUTBOXD__RELAY__LEASE_S", "10"),
    ];
    let mut r = relay(&env, "overrun", &setting);
    env.seed(1, 1).await;
    assert!(
        env.wait_synced(Duration::from_secs(30)).await,
        "a first write while FerretDB answers"
    );
    ferret.signal("STOP");
    env.seed(1, 1).await;
    let processing = "SELECT count(*) FROM outbox_messages WHERE status = 'processing'";
    let claimed = eventually(Duration::from_secs(10), || async {
        env.count(processing).await == 1
    })
    .await;
    assert!(claimed, "the relay claims the row");
    // The claim commits just before the write is sent; give the relay time to
    // send it. Within the 5 s MongoDB timeout, the row is held either way.
    tokio::time::sleep(Duration::from_secs(2)).await;
    r.signal("TERM");
    let status = r.wait_timeout(Duration::from_secs(10));
    ferret.signal("CONT");
    let status = status.expect("exits within the shutdown timeout");
    assert!(status.success(), "{status:?}\n{}", r.log_text());
    assert_eq!(
        env.count(processing).await,
        1,
        "the row is still held, not given back:\n{}",
        r.log_text()
    );
    assert!(
        r.log_text()
            .contains("rows still held go back to pending when their lease ends")
    );
    // The lease, 10 s from the claim (about 5 s left now), ends 3 x 5 s (the
    // MongoDB timeout) from the exit, so that the write lands before the row is
    // handed on.
    let left = env
        .count("SELECT extract(epoch FROM max(locked_until) - now())::bigint FROM outbox_messages")
        .await;
    assert!(left >= 8, "lease extended: {left} s left");
    // The next relay's rescue takes the row when that lease ends.
    let _next = relay(&env, "overrun2", &setting);
    assert!(env.wait_synced(Duration::from_secs(60)).await);
    let client = mongodb::Client::with_uri_str(&url).await.unwrap();
    let doc = client
        .database(&env.name)
        .collection::<mongodb::bson::Document>("creditor_debts")
        .find_one(doc! { "_id": "C-0/K" })
        .await
        .unwrap()
        .expect("the aggregate's document");
    assert_eq!(doc.get_i64("outbox_id"), Ok(2), "{doc}");
    // (Row 1's first write, to a new FerretDB, may have been retried too.)
    assert_eq!(
        env.count("SELECT count(*) FROM outbox_messages WHERE id = 2 AND attempts >= 1")
            .await,
        1,
        "the lease's end counts the attempt"
    );
}

#[tokio::test]
async fn relay_tells_systemd_ready_alive_and_stopping() {
    let env = TestEnv::new().await;
    let notify = NotifySocket::bind();
    let vars = notify.vars();
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    // The relay pets the watchdog only while its workers turn.
    notify
        .check_lifecycle(&mut relay(&env, "notify", &vars), Duration::from_secs(30))
        .await;
}

#[tokio::test]
async fn metrics_endpoint_serves_relay_metrics() {
    let env = TestEnv::new().await;
    let port = free_port();
    let _r = relay(
        &env,
        "metrics",
        &[(
            "OUTBOXD__RELAY__METRICS_LISTEN",
            &format!("127.0.0.1:{port}"),
        )],
    );
    env.seed(10, 2).await;
    assert!(env.wait_synced(Duration::from_secs(20)).await);
    let http = common::http();
    let needles = [
        "outboxd_relay_rows_applied_total",
        "outboxd_relay_batch_size",
        "outboxd_relay_apply_duration_seconds",
        "outboxd_relay_lag_seconds",
        "outboxd_relay_listener_connected",
        "relay_id=\"metrics\"",
    ];
    // The counters move just after the marks commit, which the test sees first.
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = get_text(&http, &format!("http://127.0.0.1:{port}/metrics")).await;
        if needles.iter().all(|n| text.contains(n)) || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for needle in needles {
        assert!(text.contains(needle), "{needle} missing:\n{text}");
    }
}

/// A unique index of the portal's on another field than `_id`: a collision on
/// it is a rejection, not "the document exists". FerretDB's 11000 names no
/// index, so the relay must find out which one refused the document.
#[tokio::test]
async fn a_duplicate_key_on_another_unique_index_fails_the_row_naming_the_index() {
    let env = TestEnv::new().await;
    env.mongo
        .run_command(doc! {
            "createIndexes": "creditor_debts",
            "indexes": [{"key": {"ticket_id": 1}, "name": "portal_ticket_unique", "unique": true}],
        })
        .await
        .unwrap();
    let ingest = Ingest::start(&env.config()).await;
    let http = common::http();
    // Two aggregates from the sample's one ticket.
    for (n, client) in [(1, "MP-A"), (2, "MP-B")] {
        let (status, _) = post_signed(&http, &ingest.url(), &event(n, client, "K-1", "1.00")).await;
        assert_eq!(status, 202);
    }
    ingest.stop().await;
    let _r = relay(&env, "dupkey", &[("OUTBOXD__RELAY__WORKERS", "1")]);
    let done = eventually(Duration::from_secs(30), || async {
        env.count("SELECT count(*) FROM outbox_messages WHERE status IN ('pending', 'processing')")
            .await
            == 0
    })
    .await;
    assert!(done, "both rows settled");
    let rows = env
        .pg()
        .await
        .query(
            "SELECT o.aggregate_id, o.status, coalesce(o.last_error, ''), e.sync_status
             FROM outbox_messages o JOIN incoming_emails e ON e.id = o.email_id ORDER BY o.id",
            &[],
        )
        .await
        .unwrap();
    let rows: Vec<(String, String, String, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let synced: Vec<_> = rows.iter().filter(|r| r.1 == "synced").collect();
    let failed: Vec<_> = rows.iter().filter(|r| r.1 == "failed").collect();
    assert_eq!((synced.len(), failed.len()), (1, 1), "{rows:?}");
    let failed = failed[0];
    assert!(failed.2.contains("portal_ticket_unique"), "{rows:?}");
    assert_eq!(failed.3, "failed", "the e-mail is failed too: {rows:?}");
    assert!(env.doc(&synced[0].0).await.is_some());
    assert!(
        env.doc(&failed.0).await.is_none(),
        "no document was written"
    );
}

/// The same through the guarded update of an existing document, which FerretDB
/// answers with its backend's unique violation rather than 11000.
#[tokio::test]
async fn an_update_colliding_on_another_unique_index_is_rejected_naming_it() {
    let env = TestEnv::new().await;
    let sink = direct_sink(&env).await;
    env.mongo
        .run_command(doc! {
            "createIndexes": "creditor_debts",
            "indexes": [{"key": {"ticket_id": 1}, "name": "portal_ticket_unique", "unique": true}],
        })
        .await
        .unwrap();
    let mut a = claimed(1, "A/K", "1.00");
    a.ticket_id = 7;
    let mut b = claimed(2, "B/K", "1.00");
    b.ticket_id = 8;
    let outcomes = sink.apply(&[a, b], 2, far()).await;
    assert_eq!(outcomes[&1], Outcome::Applied);
    assert_eq!(outcomes[&2], Outcome::Applied);
    // B's next message takes A's ticket: known, so it goes straight to the update.
    let mut next = claimed(3, "B/K", "2.00");
    next.ticket_id = 7;
    next.known = true;
    let outcome = sink.apply(std::slice::from_ref(&next), 1, far()).await[&3].clone();
    match &outcome {
        Outcome::Permanent(reason) => assert!(reason.contains("portal_ticket_unique"), "{reason}"),
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert_eq!(env.doc("B/K").await.unwrap().get_i64("outbox_id"), Ok(2));
    // And as a new aggregate's insert, and its guarded update after it.
    let mut c = claimed(4, "C/K", "1.00");
    c.ticket_id = 8;
    let outcome = sink.apply(std::slice::from_ref(&c), 1, far()).await[&4].clone();
    assert!(
        matches!(&outcome, Outcome::Permanent(r) if r.contains("portal_ticket_unique")),
        "{outcome:?}"
    );
    assert!(env.doc("C/K").await.is_none());
}

/// FerretDB 1.24 takes any write concern and ignores it (even `w: 5` on its
/// single server), so all a test here can show is that writes with each setting
/// are taken; MongoDB's answer to an unsatisfiable one is its own.
#[tokio::test]
async fn writes_work_with_each_write_concern() {
    for (w, journal) in [("majority", "true"), ("1", "false")] {
        let env = TestEnv::new().await;
        env.seed(20, 4).await;
        let _r = relay(
            &env,
            "concern",
            &[
                ("OUTBOXD__MONGODB__WRITE_CONCERN", w),
                ("OUTBOXD__MONGODB__JOURNAL", journal),
            ],
        );
        assert!(env.wait_synced(Duration::from_secs(20)).await, "w: {w}");
        assert!(env.behind().await.is_empty(), "w: {w}");
    }
}

/// The relay's counter `outboxd_relay_claims_total{result="…"}`, 0 before the
/// first claim.
async fn claims(http: &reqwest::Client, port: u16, result: &str) -> f64 {
    let url = format!("http://127.0.0.1:{port}/metrics");
    // Not listening yet: no claim either.
    let Ok(response) = http.get(&url).send().await else {
        return 0.0;
    };
    let text = response.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("outboxd_relay_claims_total{"))
        .filter(|l| l.contains(&format!("result=\"{result}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Due rows whose aggregate another session holds (a frozen relay, say): the
/// worker finds nothing to claim, and must not claim again at once, over and
/// over, while the holder stays frozen.
#[tokio::test]
async fn a_worker_backs_off_while_due_rows_are_all_held_by_another_session() {
    let env = TestEnv::new().await;
    env.seed(5, 1).await;
    let holder = env.pg().await;
    holder
        .execute(
            "SELECT pg_advisory_lock($1, hashtext('C-0/K'))",
            &[&outboxd::outbox::AGGREGATE_LOCK_CLASS],
        )
        .await
        .unwrap();
    let port = free_port();
    let poll_ms = 1000;
    let _r = relay(
        &env,
        "held",
        &[
            ("OUTBOXD__RELAY__WORKERS", "1"),
            ("OUTBOXD__RELAY__POLL_INTERVAL_MS", &poll_ms.to_string()),
            (
                "OUTBOXD__RELAY__METRICS_LISTEN",
                &format!("127.0.0.1:{port}"),
            ),
        ],
    );
    let http = common::http();
    assert!(
        eventually(Duration::from_secs(20), || async {
            claims(&http, port, "empty").await >= 1.0
        })
        .await,
        "the relay claims"
    );
    let start = claims(&http, port, "empty").await;
    let window = Duration::from_secs(4);
    tokio::time::sleep(window).await;
    let empty = claims(&http, port, "empty").await - start;
    // At the poll interval's rate that is 4; spinning every 20 ms, about 200.
    let bound = 3.0 * window.as_secs_f64() * 1000.0 / poll_ms as f64;
    assert!(
        empty <= bound,
        "{empty} empty claims in {window:?}, more than {bound}"
    );
    assert_eq!(env.unsynced().await, 5, "the held aggregate waits");
    // Once the holder lets go, the rows go within about a poll interval.
    drop(holder);
    assert!(env.wait_synced(Duration::from_secs(10)).await);
}

/// PostgreSQL's shared lock table: max_locks_per_transaction × (max_connections
/// + max_prepared_transactions) entries.
async fn lock_table(env: &TestEnv) -> i64 {
    env.pg()
        .await
        .query_one(
            "SELECT current_setting('max_locks_per_transaction')::int8
                    * (current_setting('max_connections')::int8
                       + current_setting('max_prepared_transactions')::int8)",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn a_relay_whose_locks_could_fill_the_lock_table_refuses_to_start() {
    let env = TestEnv::new().await;
    let table = lock_table(&env).await;
    // Each worker may hold up to twice batch_size aggregate locks: past half
    // the table with the largest batch_size allowed.
    let batch = 10_000;
    let workers = (table / (4 * batch) + 1).to_string();
    let mut greedy = relay(
        &env,
        "greedy",
        &[
            ("OUTBOXD__RELAY__WORKERS", workers.as_str()),
            ("OUTBOXD__RELAY__BATCH_SIZE", "10000"),
        ],
    );
    let status = greedy.wait_timeout(Duration::from_secs(20));
    let log = greedy.log_text();
    assert!(
        status.is_some_and(|s| !s.success()),
        "refuses to start: {status:?}\n{log}"
    );
    for needle in [
        "max_locks_per_transaction",
        "max_connections",
        &table.to_string(),
        &format!("relay.workers ({workers})"),
        "relay.batch_size (10000)",
        "lower relay.batch_size",
    ] {
        assert!(log.contains(needle), "names {needle}:\n{log}");
    }

    // Within the bound it starts, says what share it may take, and syncs.
    env.seed(10, 3).await;
    let within = relay(&env, "within", &[("OUTBOXD__RELAY__BATCH_SIZE", "100")]);
    assert!(
        env.wait_synced(Duration::from_secs(20)).await,
        "{}",
        within.log_text()
    );
    let log = within.log_text();
    assert!(
        log.contains("lock table") && log.contains(r#""max_lock_entries":400"#),
        "says its share at start-up:\n{log}"
    );
}

/// A write whose connection fails once it was sent (a reset, the driver
/// clearing its pool) may still land: it is unanswered, as after a timeout, so
/// that its aggregate stays held, not transient, which would free it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_connection_fails_after_it_was_sent_is_unanswered() {
    let env = TestEnv::new().await;
    let ferret = Ferret::start().await;
    let proxy = Proxy::start(std::net::SocketAddr::from(([127, 0, 0, 1], ferret.port))).await;
    let mut config = env.config();
    config.mongodb.url = format!("mongodb://127.0.0.1:{}/{}", proxy.port, env.name).into();
    config.mongodb.timeout_ms = 30_000;
    let sink = mongo::connect(&config.mongodb).await.unwrap();
    let first = sink.apply(&[claimed(1, "K/1", "1.00")], 1, far()).await;
    assert_eq!(
        first[&1],
        Outcome::Applied,
        "a first write through the proxy"
    );

    // The write leaves, FerretDB is frozen with it, and the connection dies.
    ferret.signal("STOP");
    let task = tokio::spawn(async move {
        let mut second = claimed(2, "K/1", "2.00");
        second.known = true;
        sink.apply(&[second], 1, far()).await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.set_up(false);
    let outcomes = tokio::time::timeout(Duration::from_secs(20), task).await;
    ferret.signal("CONT");
    let outcomes = outcomes
        .expect("the write ends with its connection")
        .unwrap();
    assert!(
        matches!(outcomes[&2], Outcome::Unanswered(_)),
        "{outcomes:?}"
    );
}
