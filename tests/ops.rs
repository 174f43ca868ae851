//! Operator commands and least-privilege roles, against real servers.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use mongodb::bson::doc;
use serde_json::Value;

#[tokio::test]
async fn status_matches_the_database() {
    let env = TestEnv::new().await;
    env.seed(10, 10).await;
    let pg = env.pg().await;
    pg.batch_execute(
        "UPDATE outbox_messages SET status = 'synced', synced_at = created_at + interval '3 ms' WHERE id IN (1, 2, 3);
         UPDATE outbox_messages SET status = 'failed', attempts = 10, last_error = 'boom' WHERE id IN (4, 5);
         UPDATE outbox_messages SET status = 'failed', attempts = 1, last_error = 'rejected' WHERE id = 6;
         UPDATE outbox_messages SET status = 'processing', locked_by = 'r1', locked_until = now() + interval '1 minute' WHERE id = 7;",
    )
    .await
    .unwrap();
    let (code, out) = outboxd(&["status", "--json"], &env);
    assert_eq!(code, 2, "failed rows exit 2: {out}");
    let s: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(s["counts"]["pending"], 3);
    assert_eq!(s["counts"]["processing"], 1);
    assert_eq!(s["counts"]["synced"], 3);
    assert_eq!(s["counts"]["failed"], 3);
    assert_eq!(s["lag_last_minute_ms"]["synced"], 3);
    assert!((s["lag_last_minute_ms"]["p50"].as_f64().unwrap() - 3.0).abs() < 0.01);
    assert_eq!(s["failed"][0]["last_error"], "boom");
    assert_eq!(s["failed"][0]["rows"], 2);
    assert_eq!(s["inflight"][0]["relay_id"], "r1");
    assert_eq!(s["inflight"][0]["rows"], 1);
    assert!(s["oldest_pending_age_s"].as_f64().unwrap() >= 0.0);

    let (code, table) = outboxd(&["status"], &env);
    assert_eq!(code, 2);
    // A usage error is told apart from failed rows.
    let (code, out) = outboxd(&["status", "--jsno"], &env);
    assert_eq!(code, 64, "{out}");
    assert!(out.contains("--jsno"), "{out}");
    let (code, out) = outboxd(&["status", "--help"], &env);
    assert_eq!(code, 0, "{out}");
    assert!(
        table.contains("failed") && table.contains("boom") && table.contains("r1"),
        "{table}"
    );

    // The DBA's view says the same, with the oldest row of each state.
    let view = pg
        .query(
            "SELECT status, count, oldest_id, lag_rows FROM outbox_status",
            &[],
        )
        .await
        .unwrap();
    let view: Vec<(String, i64, Option<i64>, Option<i64>)> = view
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(
        view,
        vec![
            ("pending".into(), 3, Some(8), None),
            ("processing".into(), 1, Some(7), None),
            ("synced".into(), 3, None, Some(3)),
            ("failed".into(), 3, Some(4), None),
        ]
    );
    let comment: String = pg
        .query_one("SELECT obj_description('outbox_failed'::regclass)", &[])
        .await
        .unwrap()
        .get(0);
    assert!(comment.contains("outboxd retry --id N"), "{comment}");

    pg.batch_execute(
        "UPDATE outbox_messages SET status = 'pending', last_error = NULL WHERE status = 'failed'",
    )
    .await
    .unwrap();
    assert_eq!(outboxd(&["status"], &env).0, 0);
}

#[tokio::test]
async fn retry_requeues_failed_rows_and_the_relay_syncs_them() {
    let env = TestEnv::new().await;
    env.seed(6, 6).await;
    let pg = env.pg().await;
    pg.batch_execute(
        "UPDATE outbox_messages SET status = 'failed', attempts = 10, last_error = 'MongoDB down',
                updated_at = now() - interval '2 hours' WHERE id IN (1, 2);
         UPDATE outbox_messages SET status = 'failed', attempts = 10, last_error = 'MongoDB down' WHERE id IN (3, 4, 5, 6);
         UPDATE incoming_emails SET sync_status = 'failed';",
    )
    .await
    .unwrap();
    let (code, out) = outboxd(&["retry", "--id", "1"], &env);
    assert_eq!((code, out.trim()), (0, "requeued 1 failed row"));
    let since = (chrono::Utc::now() - chrono::Duration::minutes(30)).to_rfc3339();
    let (_, out) = outboxd(&["retry", "--failed-since", &since], &env);
    assert_eq!(out.trim(), "requeued 4 failed rows");
    let (_, out) = outboxd(&["retry", "--all-failed"], &env);
    assert_eq!(out.trim(), "requeued 1 failed row");
    let (_, out) = outboxd(&["retry", "--all-failed"], &env);
    assert_eq!(
        out.trim(),
        "requeued 0 failed rows",
        "running it twice does no harm"
    );
    // Ids it cannot requeue are named, so that a typo is not taken for success.
    let (code, out) = outboxd(&["retry", "--id", "1", "99"], &env);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("requeued 0 failed rows"), "{out}");
    assert!(
        out.contains("outbox row 1 is pending, not failed: left as it is"),
        "{out}"
    );
    assert!(out.contains("no outbox row 99"), "{out}");
    assert_eq!(
        env.count("SELECT count(*) FROM outbox_messages WHERE attempts <> 0")
            .await,
        0
    );
    assert_eq!(
        env.count("SELECT count(*) FROM incoming_emails WHERE sync_status = 'pending'")
            .await,
        6
    );

    let _r = relay(&env, "retry");
    assert!(env.wait_synced(Duration::from_secs(20)).await);
    assert_eq!(
        env.count("SELECT count(*) FROM incoming_emails WHERE sync_status = 'synced'")
            .await,
        6
    );
}

#[tokio::test]
async fn retry_requeues_a_large_failed_set_in_batches() {
    let env = TestEnv::new().await;
    env.seed(2500, 50).await;
    env.pg()
        .await
        .batch_execute(
            "UPDATE outbox_messages SET status = 'failed', attempts = 10, last_error = 'MongoDB down';
             UPDATE incoming_emails SET sync_status = 'failed';",
        )
        .await
        .unwrap();
    let (code, out) = outboxd(&["retry", "--all-failed"], &env);
    assert_eq!((code, out.trim()), (0, "requeued 2500 failed rows"));
    assert_eq!(
        env.count("SELECT count(*) FROM outbox_messages WHERE status = 'pending' AND attempts = 0")
            .await,
        2500
    );
    assert_eq!(
        env.count("SELECT count(*) FROM incoming_emails WHERE sync_status = 'pending'")
            .await,
        2500
    );
}

#[tokio::test]
async fn retry_gives_up_on_rows_locked_by_an_open_transaction() {
    let env = TestEnv::new().await;
    env.seed(2, 2).await;
    let pg = env.pg().await;
    pg.batch_execute(
        "UPDATE outbox_messages SET status = 'failed', attempts = 10, last_error = 'x';
         UPDATE incoming_emails SET sync_status = 'failed';",
    )
    .await
    .unwrap();
    // A DBA's session, mid-fix of a payload, not yet committed.
    pg.batch_execute("BEGIN; UPDATE outbox_messages SET payload = payload WHERE id = 1")
        .await
        .unwrap();
    let (code, out) = outboxd(&["retry", "--all-failed"], &env);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("waiting for a lock on outbox rows"), "{out}");
    pg.batch_execute("COMMIT").await.unwrap();
    let (code, out) = outboxd(&["retry", "--all-failed"], &env);
    assert_eq!((code, out.trim()), (0, "requeued 2 failed rows"));
}

#[tokio::test]
async fn audit_finds_missing_and_rolled_back_documents_and_repairs_them() {
    let env = TestEnv::new().await;
    env.seed(30, 10).await;
    let mut r = relay(&env, "audit");
    assert!(env.wait_synced(Duration::from_secs(20)).await);
    r.signal("TERM");
    r.wait_timeout(Duration::from_secs(10));
    let (code, out) = outboxd(&["audit"], &env);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("10 aggregates checked, 0 missing, 0 behind"),
        "{out}"
    );

    env.docs().delete_one(doc! {"_id": "C-3/K"}).await.unwrap();
    env.docs()
        .update_one(
            doc! {"_id": "C-4/K"},
            doc! {"$set": {"outbox_id": 1_i64, "amount": "0.00"}},
        )
        .await
        .unwrap();
    let (code, out) = outboxd(&["audit"], &env);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("1 missing, 1 behind"), "{out}");
    assert!(out.contains("C-3/K") && out.contains("C-4/K"), "{out}");

    let (code, out) = outboxd(&["audit", "--repair"], &env);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("requeued 2 rows"), "{out}");
    assert_eq!(env.unsynced().await, 2);
    let _r = relay(&env, "audit2");
    assert!(env.wait_synced(Duration::from_secs(20)).await);
    assert_eq!(outboxd(&["audit"], &env).0, 0);
    assert_eq!(env.behind().await, vec![]);

    // An outbox_id written as a whole double by another tool reads as that number.
    let at = env
        .doc("C-6/K")
        .await
        .unwrap()
        .get_i64("outbox_id")
        .unwrap();
    env.docs()
        .update_one(
            doc! {"_id": "C-6/K"},
            doc! {"$set": {"outbox_id": at as f64}},
        )
        .await
        .unwrap();
    let (code, out) = outboxd(&["audit"], &env);
    assert_eq!(code, 0, "{out}");
    env.docs()
        .update_one(doc! {"_id": "C-6/K"}, doc! {"$set": {"outbox_id": at}})
        .await
        .unwrap();

    // PostgreSQL restored from an older backup: a document holds a message whose
    // id PostgreSQL has not issued (yet). Its new messages would be taken as old.
    env.docs()
        .update_one(
            doc! {"_id": "C-5/K"},
            doc! {"$set": {"outbox_id": 1_000_000_i64, "amount": "lost.00"}},
        )
        .await
        .unwrap();
    let (code, out) = outboxd(&["audit"], &env);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("0 missing, 0 behind, 1 ahead"), "{out}");
    assert!(
        out.contains("ahead    C-5/K  document at outbox_id 1000000"),
        "{out}"
    );
    let (code, out) = outboxd(&["audit", "--repair"], &env);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("requeued 1 row"), "{out}");
    assert!(out.contains("lowered 1 of 1 documents ahead"), "{out}");
    // The running relay writes PostgreSQL's latest message of C-5/K again.
    let rewritten = eventually(Duration::from_secs(20), || async {
        env.doc("C-5/K").await.is_some_and(|d| {
            d.get_i64("outbox_id")
                .is_ok_and(|id| id > 0 && id < 1_000_000)
                && d.get_str("amount") != Ok("lost.00")
        })
    })
    .await;
    assert!(rewritten);
    assert!(env.wait_synced(Duration::from_secs(20)).await);
    assert_eq!(outboxd(&["audit"], &env).0, 0);
    assert_eq!(env.behind().await, vec![]);

    // The sequence restarted just past the table (its last value then reads as
    // NULL), and the newest row deleted as retention would: its document is at
    // an id only the sequence still knows, and not ahead.
    let pg = env.pg().await;
    pg.batch_execute(
        "SELECT setval(pg_get_serial_sequence('outbox_messages', 'id'),
                       (SELECT max(id) FROM outbox_messages) + 1, false);
         DELETE FROM outbox_messages WHERE id = (SELECT max(id) FROM outbox_messages)",
    )
    .await
    .unwrap();
    let (code, out) = outboxd(&["audit"], &env);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("0 behind, 0 ahead"), "{out}");

    // A row inserted with an id above the sequence: its document is not ahead,
    // but new messages of its aggregate would take lower ids, which the version
    // guard drops. Audit says so, and how to set the sequence.
    pg.batch_execute(
        "WITH e AS (INSERT INTO incoming_emails (webhook_id, ticket_id, from_address, subject, body)
                    VALUES ('by-hand', 7, 'a@b', 's', 'b') RETURNING id)
         INSERT INTO outbox_messages (id, operation, aggregate_id, payload, email_id, idempotency_key)
         SELECT 777777, 'update_creditor_debt', 'C-5/K',
                jsonb_build_object('client_reference', 'C-5', 'creditor_name', 'Bank',
                                   'creditor_reference', 'K', 'amount', '7.77', 'currency', 'EUR'),
                id, 'by-hand' FROM e",
    )
    .await
    .unwrap();
    assert!(env.wait_synced(Duration::from_secs(20)).await);
    let (code, out) = outboxd(&["audit"], &env);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("0 behind, 0 ahead"), "{out}");
    assert!(out.contains("sequence behind the table"), "{out}");
    pg.batch_execute("SELECT setval(pg_get_serial_sequence('outbox_messages', 'id'), 777777)")
        .await
        .unwrap();
    let (code, out) = outboxd(&["audit"], &env);
    assert_eq!(code, 0, "{out}");
}

async fn login_role(env: &TestEnv, group: &str) -> (String, String) {
    let name = format!("t_{group}_{:08x}", fastrand::u32(..)).replace("outboxd_", "");
    let pg = env.pg().await;
    pg.batch_execute(&format!(
        "CREATE ROLE {name} LOGIN PASSWORD 'pw' IN ROLE {group}"
    ))
    .await
    .unwrap();
    let url = env
        .database_url
        .replacen("outboxd:outboxd@", &format!("{name}:pw@"), 1);
    (name, url)
}

/// sql/roles.sql as SQL: the file is written for psql, and its meta-commands
/// are psql's.
fn roles_sql() -> String {
    include_str!("../sql/roles.sql")
        .lines()
        .filter(|l| !l.starts_with('\\'))
        .map(|l| format!("{l}\n"))
        .collect()
}

#[tokio::test]
async fn functions_planted_in_public_gain_nothing() {
    let env = TestEnv::new().await;
    let pg = env.pg().await;
    // PostgreSQL before 15 lets every role create in `public`.
    let attacker = format!("t_attacker_{:08x}", fastrand::u32(..));
    pg.batch_execute(&format!(
        "CREATE ROLE {attacker} LOGIN PASSWORD 'pw';
         GRANT CREATE ON SCHEMA public TO PUBLIC;"
    ))
    .await
    .unwrap();
    let attacker_url = env
        .database_url
        .replacen("outboxd:outboxd@", &format!("{attacker}:pw@"), 1);
    let (as_attacker, conn) = tokio_postgres::connect(&attacker_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    // Overloads that beat the built-ins for outboxd's arguments (an untyped
    // literal prefers text; integers are closer than float8), each recording
    // that it ran with outboxd's privileges, then doing the built-in's work.
    as_attacker
        .batch_execute(
            "CREATE TABLE public.planted_calls (fn text, at_user text);
             GRANT ALL ON public.planted_calls TO PUBLIC;
             CREATE FUNCTION public.nextval(text) RETURNS bigint LANGUAGE sql AS $$
                 INSERT INTO public.planted_calls VALUES ('nextval', current_user);
                 SELECT pg_catalog.nextval($1::pg_catalog.regclass) $$;
             CREATE FUNCTION public.power(integer, integer) RETURNS double precision
             LANGUAGE sql AS $$
                 INSERT INTO public.planted_calls VALUES ('power', current_user);
                 SELECT pg_catalog.power($1::float8, $2::float8) $$;
             -- And an operator that would type an untyped parameter as text:
             -- outboxd's f64 could then not be sent, and nothing would flow.
             CREATE FUNCTION public.text_times(text, interval) RETURNS interval
             LANGUAGE sql AS $$
                 INSERT INTO public.planted_calls VALUES ('*', current_user);
                 SELECT $2 $$;
             CREATE OPERATOR public.* (FUNCTION = public.text_times,
                                       LEFTARG = text, RIGHTARG = interval);",
        )
        .await
        .unwrap();

    let roles = roles_sql();
    pg.batch_execute(&roles).await.expect("roles.sql applies");

    // A webhook (ingest takes its ids with nextval) and a row the relay fails
    // (its backoff uses power), under the owner's URL: the role with the most to lose.
    let ingest = Ingest::start(&env.config()).await;
    let http = common::http();
    let (status, body) = post_signed(&http, &ingest.url(), SAMPLE).await;
    pg.batch_execute(
        "WITH e AS (INSERT INTO incoming_emails (webhook_id, ticket_id, from_address, subject, body)
                    VALUES ('poison', 1, 'a@b', 's', 'b') RETURNING id)
         INSERT INTO outbox_messages (operation, aggregate_id, payload, email_id, idempotency_key)
         SELECT 'update_creditor_debt', 'poison/K', '{\"amount\": \"ten euros\"}', id, 'poison' FROM e",
    )
    .await
    .unwrap();
    let r = relay(&env, "planted");
    let done = eventually(Duration::from_secs(30), || async {
        env.count("SELECT count(*) FROM outbox_messages WHERE status IN ('pending', 'processing')")
            .await
            == 0
    })
    .await;
    ingest.stop().await;
    // And the other commands' sessions.
    for args in [&["migrate"][..], &["check"], &["status"], &["audit"]] {
        let (code, out) = outboxd(args, &env);
        // `status` exits 2: the poison row failed.
        assert!(
            code == 0 || (args == ["status"] && code == 2),
            "{args:?}: {out}"
        );
    }
    let calls: Vec<String> = pg
        .query(
            "SELECT fn || ' as ' || at_user FROM public.planted_calls",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(calls.is_empty(), "planted functions ran: {calls:?}");
    assert_eq!(status, 202, "{body}");
    assert!(done, "{}", r.log_text());
    assert_eq!(
        env.count("SELECT count(*) FROM outbox_messages WHERE idempotency_key = 'poison' AND status = 'failed'")
            .await,
        1
    );
    assert_eq!(env.unsynced().await, 1, "only the poison row is not synced");
    drop(r);
    // And after roles.sql, it can plant nothing more.
    let err = as_attacker
        .batch_execute("CREATE TABLE public.after_roles (x int)")
        .await
        .unwrap_err();
    assert!(
        format!("{err:?}").contains("permission denied"),
        "roles.sql takes CREATE on public from PUBLIC: {err:?}"
    );

    drop(as_attacker);
    let _ = pg.batch_execute(&format!("DROP OWNED BY {attacker}")).await;
    let _ = pg
        .batch_execute(&format!("DROP ROLE IF EXISTS {attacker}"))
        .await;
}

#[tokio::test]
async fn roles_allow_each_job_and_nothing_else() {
    let env = TestEnv::new().await;
    let pg = env.pg().await;
    let roles = roles_sql();
    pg.batch_execute(&roles).await.expect("roles.sql applies");
    // Running it twice does no harm.
    pg.batch_execute(&roles).await.unwrap();
    let (ingest_role, ingest_url) = login_role(&env, "outboxd_ingest").await;
    let (relay_role, relay_url) = login_role(&env, "outboxd_relay").await;
    let (readonly_role, readonly_url) = login_role(&env, "outboxd_readonly").await;

    // Ingest works end to end under its role.
    let mut config = env.config();
    config.database.url = ingest_url.clone().into();
    let ingest = Ingest::start(&config).await;
    let http = common::http();
    let (status, body) = post_signed(&http, &ingest.url(), SAMPLE).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(post_signed(&http, &ingest.url(), SAMPLE).await.0, 200);
    ingest.stop().await;

    // The relay works end to end under its role, housekeeping included.
    pg.batch_execute(
        "INSERT INTO idempotency_keys (key, webhook_id, email_id, outbox_id, expires_at)
         VALUES ('expired', 'old', 0, 0, now() - interval '1 hour')",
    )
    .await
    .unwrap();
    let mut vars = env.child_env();
    vars.retain(|(k, _)| k != "DATABASE_URL");
    vars.push(("DATABASE_URL".into(), relay_url.clone()));
    let mut with_housekeeping = vars.clone();
    with_housekeeping.extend([
        ("OUTBOXD__RELAY__HOUSEKEEPING_INTERVAL_S".into(), "1".into()),
        ("OUTBOXD__RELAY__RETENTION_S".into(), "1".into()),
    ]);
    let r = Proc::spawn(&["relay", "--id", "role"], &with_housekeeping, "role-relay");
    assert!(env.wait_synced(Duration::from_secs(20)).await);
    let cleaned = eventually(Duration::from_secs(20), || async {
        // Retention keeps the aggregate's newest synced message (its current state).
        env.count("SELECT (SELECT count(*) FROM idempotency_keys WHERE key = 'expired') + (SELECT count(*) FROM outbox_messages)")
            .await
            == 1
    })
    .await;
    assert!(cleaned, "housekeeping under the role:\n{}", r.log_text());
    assert!(
        !r.log_text().contains("permission denied"),
        "{}",
        r.log_text()
    );
    // So do the operator commands.
    for args in [
        &["status"][..],
        &["retry", "--all-failed"],
        &["audit", "--repair"],
        &["audit", "--all", "--repair"],
        &["resync"],
        &["check"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_outboxd"))
            .args(args)
            .envs(vars.iter().cloned())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?} under the relay role: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(!stdout.contains("not checked"), "{args:?}: {stdout}");
    }

    let connect = |url: String| async move {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
    };
    let as_ingest = connect(ingest_url).await;
    let refused = as_ingest
        .execute("UPDATE outbox_messages SET status = 'failed'", &[])
        .await;
    assert!(
        refused.unwrap_err().to_string().contains("db error"),
        "ingest may not update the outbox"
    );
    let err = as_ingest
        .execute("DELETE FROM incoming_emails", &[])
        .await
        .unwrap_err();
    assert!(format!("{err:?}").contains("permission denied"));

    // Ingest writes only the columns and ids of its own statement, and takes
    // a key again only once it expired. (A drawn id first, so that the huge
    // one below meets the policy, not currval's "not yet defined".)
    as_ingest
        .execute("SELECT nextval('outbox_messages_id_seq')", &[])
        .await
        .unwrap();
    for (sql, why) in [
        (
            "INSERT INTO outbox_messages (operation, aggregate_id, payload, email_id, idempotency_key, locked_until)
             VALUES ('update_creditor_debt', 'a', '{}', 1, 'k', 'infinity')",
            "ingest may not insert a pre-claimed row",
        ),
        (
            "INSERT INTO outbox_messages (id, operation, aggregate_id, payload, email_id, idempotency_key)
             VALUES (9000000000000000000, 'update_creditor_debt', 'a', '{}', 1, 'k')",
            "ingest may not insert an id of its choosing",
        ),
    ] {
        let err = as_ingest.execute(sql, &[]).await.unwrap_err();
        let text = format!("{err:?}");
        assert!(
            text.contains("permission denied") || text.contains("row-level security"),
            "{why}: {text}"
        );
    }
    pg.batch_execute(
        "INSERT INTO idempotency_keys (key, webhook_id, email_id, outbox_id, expires_at)
         VALUES ('live', 'live', 0, 0, now() + interval '1 hour')",
    )
    .await
    .unwrap();
    let taken = as_ingest
        .execute(
            "UPDATE idempotency_keys SET expires_at = now(), outbox_id = 42",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(taken, 0, "ingest may not take a live key");

    let as_relay = connect(relay_url).await;
    // Retention deletes synced rows and expired keys, nothing still owed.
    // (Failed rows, which the relay running above leaves alone.)
    let owed = env.seed(3, 3).await;
    pg.execute(
        "UPDATE outbox_messages SET status = 'failed' WHERE id = ANY($1)",
        &[&owed],
    )
    .await
    .unwrap();
    as_relay
        .execute("DELETE FROM outbox_messages", &[])
        .await
        .unwrap();
    assert_eq!(
        env.count("SELECT count(*) FROM outbox_messages WHERE status = 'failed'")
            .await,
        3,
        "relay may not delete owed rows"
    );
    pg.execute("DELETE FROM outbox_messages WHERE id = ANY($1)", &[&owed])
        .await
        .unwrap();
    as_relay
        .execute("DELETE FROM idempotency_keys", &[])
        .await
        .unwrap();
    assert_eq!(
        env.count("SELECT count(*) FROM idempotency_keys WHERE key = 'live'")
            .await,
        1,
        "relay may not delete a live key"
    );
    for (sql, why) in [
        (
            "DELETE FROM incoming_emails",
            "relay may not delete e-mails",
        ),
        (
            "SELECT body FROM incoming_emails",
            "relay may not read e-mail bodies",
        ),
        (
            "UPDATE outbox_messages SET payload = '{}'",
            "relay may not rewrite a message",
        ),
    ] {
        let err = as_relay.execute(sql, &[]).await.unwrap_err();
        assert!(format!("{err:?}").contains("permission denied"), "{why}");
    }
    let err = as_relay
        .execute("INSERT INTO idempotency_keys (key, webhook_id, email_id, outbox_id, expires_at) VALUES ('x', 'x', 1, 1, now())", &[])
        .await
        .unwrap_err();
    assert!(format!("{err:?}").contains("permission denied"));

    // A dashboard sees where every row stands, but no e-mail's content.
    let as_readonly = connect(readonly_url.clone()).await;
    for sql in [
        "SELECT * FROM outbox_status",
        "SELECT * FROM outbox_failed",
        "SELECT id, status, payload FROM outbox_messages",
        "SELECT id, webhook_id, ticket_id, sync_status FROM incoming_emails",
    ] {
        assert!(as_readonly.query(sql, &[]).await.is_ok(), "readonly: {sql}");
    }
    for sql in [
        "SELECT body FROM incoming_emails",
        "SELECT * FROM incoming_emails",
        "UPDATE outbox_messages SET status = 'failed'",
    ] {
        let err = as_readonly.execute(sql, &[]).await.unwrap_err();
        assert!(format!("{err:?}").contains("permission denied"), "{sql}");
    }
    drop((as_ingest, as_relay, as_readonly));
    drop(r);

    // A relay without the rights it needs: its failing claim is no outage. It is
    // logged once per worker and retried with backoff, not on every NOTIFY.
    env.seed(3, 3).await;
    let mut readonly_vars = env.child_env();
    readonly_vars.retain(|(k, _)| k != "DATABASE_URL");
    readonly_vars.push(("DATABASE_URL".into(), readonly_url));
    let denied = Proc::spawn(&["relay", "--id", "denied"], &readonly_vars, "denied-relay");
    assert!(
        eventually(Duration::from_secs(20), || async {
            denied.log_text().contains("batch failed")
        })
        .await,
        "{}",
        denied.log_text()
    );
    for _ in 0..30 {
        pg.execute("SELECT pg_notify($1, '')", &[&outboxd::outbox::CHANNEL])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = denied.log_text();
    assert!(
        log.matches("batch failed").count() <= 2,
        "one line per worker:\n{log}"
    );
    assert!(!log.contains("PostgreSQL unavailable"), "{log}");
    assert_eq!(
        env.count("SELECT count(*) FROM outbox_messages WHERE status <> 'pending' AND idempotency_key LIKE 'seed:%'")
            .await,
        0
    );
    drop(denied);
    // Login roles are cluster-wide: remove them (the database goes with the test).
    let roles = format!("{ingest_role}, {relay_role}, {readonly_role}");
    let _ = pg.batch_execute(&format!("DROP OWNED BY {roles}")).await;
    let _ = pg
        .batch_execute(&format!("DROP ROLE IF EXISTS {roles}"))
        .await;
}
