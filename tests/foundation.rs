//! Migrations, `check` and configuration errors, through the real binary.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn outboxd(args: &[&str], env: &[(String, String)]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_outboxd"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .unwrap()
}

/// An empty database (not from the template), dropped at the end.
struct EmptyDb {
    name: String,
    url: String,
}

impl EmptyDb {
    async fn new() -> EmptyDb {
        let name = format!("m_{}_{:08x}", std::process::id(), fastrand::u32(..));
        let (client, conn) = tokio_postgres::connect(&database_url(), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        EmptyDb {
            url: with_database(&database_url(), &name),
            name,
        }
    }

    async fn pg(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
    }

    fn env(&self) -> Vec<(String, String)> {
        vec![
            ("DATABASE_URL".into(), self.url.clone()),
            ("MONGODB_URL".into(), mongodb_url()),
        ]
    }
}

impl Drop for EmptyDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let _ = Command::new("psql")
            .arg(database_url())
            .args([
                "-qc",
                &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
            ])
            .output();
    }
}

/// Polls `count_sql` (a count of waiting lock requests) until it is non-zero.
async fn wait_for_a_waiter(client: &tokio_postgres::Client, count_sql: &str, never: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while client
        .query_one(count_sql, &[])
        .await
        .unwrap()
        .get::<_, i64>(0)
        == 0
    {
        assert!(Instant::now() < deadline, "{never}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn migrate_waits_for_the_lock_beyond_the_statement_timeout() {
    let db = EmptyDb::new().await;
    let mut env = db.env();
    env.push((
        "OUTBOXD__DATABASE__STATEMENT_TIMEOUT_MS".into(),
        "200".into(),
    ));
    // Another host's migrate, holding the lock for longer than the timeout.
    let holder = db.pg().await;
    holder
        .execute(
            "SELECT pg_advisory_lock($1)",
            &[&outboxd::migrate::LOCK_KEY],
        )
        .await
        .unwrap();
    let migrate = std::thread::spawn(move || outboxd(&["migrate"], &env));
    // Once migrate waits for the lock, hold it past its statement timeout.
    let waiting = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted
                   AND database = (SELECT oid FROM pg_database WHERE datname = current_database())";
    wait_for_a_waiter(&holder, waiting, "migrate never waited for the lock").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    holder
        .execute(
            "SELECT pg_advisory_unlock($1)",
            &[&outboxd::migrate::LOCK_KEY],
        )
        .await
        .unwrap();
    let out = migrate.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("schema is now at version"));
}

#[tokio::test]
async fn migrate_gives_way_to_writers_while_a_long_transaction_holds_a_table() {
    let db = EmptyDb::new().await;
    let env = db.env();
    let first = outboxd(&["migrate"], &env);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    // Back to schema version 4, before 0005 built its indexes.
    let admin = db.pg().await;
    admin
        .batch_execute(
            "DROP INDEX outbox_messages_fresh_idx, outbox_messages_retry_idx;
             DELETE FROM schema_migrations WHERE version = 5",
        )
        .await
        .unwrap();
    // A transaction that wrote to the outbox and stays open.
    let long = db.pg().await;
    long.batch_execute("BEGIN; LOCK TABLE outbox_messages IN ROW EXCLUSIVE MODE")
        .await
        .unwrap();
    let migrate = std::thread::spawn(move || outboxd(&["migrate"], &env));
    // Once migrate waits for the table, past a first try's timeout.
    let waiting = "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'outbox_messages'::regclass";
    wait_for_a_waiter(&admin, waiting, "migrate never waited for the table").await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // Meanwhile other writers get through, between migrate's tries.
    for _ in 0..3 {
        let writer = db.pg().await;
        let write =
            writer.batch_execute("BEGIN; LOCK TABLE outbox_messages IN ROW EXCLUSIVE MODE; COMMIT");
        assert!(
            tokio::time::timeout(Duration::from_secs(20), write)
                .await
                .is_ok(),
            "a writer waited behind the migration"
        );
    }
    long.batch_execute("COMMIT").await.unwrap();
    let out = migrate.join().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("could not take its locks"), "{stdout}");
    assert!(stdout.contains("applied 0005"), "{stdout}");
    let indexes: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_indexes WHERE indexname IN ('outbox_messages_fresh_idx', 'outbox_messages_retry_idx')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(indexes, 2);
}

#[tokio::test]
async fn migrate_twice_is_a_no_op_and_concurrent_migrates_are_safe() {
    let db = EmptyDb::new().await;
    let env = db.env();
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| outboxd(&["migrate"], &env));
        let b = s.spawn(|| outboxd(&["migrate"], &env));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    assert!(b.status.success(), "{}", String::from_utf8_lossy(&b.stderr));
    let outputs = format!(
        "{}{}",
        String::from_utf8_lossy(&a.stdout),
        String::from_utf8_lossy(&b.stdout)
    );
    assert_eq!(outputs.matches("applied 0001").count(), 1, "{outputs}");

    let again = outboxd(&["migrate"], &env);
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("up to date"));

    let client = db.pg().await;
    let versions: i64 = client
        .query_one("SELECT count(*) FROM schema_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(versions as usize, outboxd::migrate::MIGRATIONS.len());

    // A file changed after it was applied is refused, naming it.
    client
        .execute(
            "UPDATE schema_migrations SET checksum = 'edited' || checksum WHERE version = 1",
            &[],
        )
        .await
        .unwrap();
    let refused = outboxd(&["migrate"], &env);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("0001_outbox.sql was changed after it was applied"),
        "{err}"
    );
}

#[tokio::test]
async fn check_is_ok_with_both_up_and_fails_fast_naming_mongodb() {
    let env = TestEnv::new().await;
    let vars = env.child_env();
    let ok = outboxd(&["check"], &vars);
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{out}");
    assert!(
        out.contains("postgresql  ok") && out.contains("schema version"),
        "{out}"
    );
    assert!(
        out.contains("mongodb     ok") && out.contains("server "),
        "{out}"
    );

    let mut closed = vars.clone();
    closed.retain(|(k, _)| k != "MONGODB_URL");
    closed.push((
        "MONGODB_URL".into(),
        format!("mongodb://127.0.0.1:{}/x", free_port()),
    ));
    let started = Instant::now();
    let failed = outboxd(&["check"], &closed);
    let elapsed = started.elapsed();
    let out = String::from_utf8_lossy(&failed.stdout);
    assert!(!failed.status.success());
    assert!(out.contains("mongodb     FAIL"), "{out}");
    assert!(out.contains("postgresql  ok"), "{out}");
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");

    let mut no_pg = vars.clone();
    no_pg.retain(|(k, _)| k != "DATABASE_URL");
    no_pg.push((
        "DATABASE_URL".into(),
        format!("postgres://outboxd:x@127.0.0.1:{}/x", free_port()),
    ));
    let failed = outboxd(&["check"], &no_pg);
    let out = String::from_utf8_lossy(&failed.stdout);
    assert!(!failed.status.success());
    assert!(
        out.contains("postgresql  FAIL") && out.contains("refused"),
        "{out}"
    );
}

#[test]
fn a_bad_config_stops_start_up_naming_the_key() {
    let env = vec![("OUTBOXD__RELAY__LEASE_S".to_string(), "thirty".to_string())];
    let out = outboxd(&["check"], &env);
    assert_eq!(out.status.code(), Some(78));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .to_lowercase()
            .contains("lease_s")
    );

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[relay]\nbatch_sise = 5\n").unwrap();
    let out = outboxd(&["--config", file.to_str().unwrap(), "check"], &[]);
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("batch_sise"));

    std::fs::write(&file, "[relay]\nbatch_size = 0\n").unwrap();
    let out = outboxd(&["--config", file.to_str().unwrap(), "check"], &[]);
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("relay.batch_size"));

    // A lease too short for one slow write is refused before anything starts.
    std::fs::write(
        &file,
        "[relay]\nlease_s = 5\n[mongodb]\ntimeout_ms = 5000\n",
    )
    .unwrap();
    let out = outboxd(&["--config", file.to_str().unwrap(), "check"], &[]);
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("relay.lease_s") && err.contains("mongodb.timeout_ms"),
        "{err}"
    );

    // Zero timeouts would fail every attempt; huge ones overflow a deadline.
    for (toml, key) in [
        ("[mongodb]\ntimeout_ms = 0\n", "mongodb.timeout_ms"),
        (
            "[database]\nconnect_timeout_ms = 0\n",
            "database.connect_timeout_ms",
        ),
        (
            "[ingest]\nidempotency_ttl_s = 9223372036854775807\n",
            "ingest.idempotency_ttl_s",
        ),
        ("[relay]\nlease_s = 9223372036854775807\n", "relay.lease_s"),
    ] {
        std::fs::write(&file, toml).unwrap();
        let out = outboxd(&["--config", file.to_str().unwrap(), "check"], &[]);
        assert_eq!(out.status.code(), Some(78), "{toml}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "{toml}: {err}");
    }

    // A malformed URL is a configuration error too: the units do not restart on it.
    // (`check` reports it as a failed check instead.)
    let out = outboxd(
        &["migrate"],
        &[("DATABASE_URL".into(), "postgres://[::1".into())],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(err.contains("database.url"), "{err}");
    let out = outboxd(&["audit"], &[("MONGODB_URL".into(), "mongo://x".into())]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(err.contains("mongodb.url"), "{err}");

    // The shipped file loads, and holds exactly the defaults.
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/config/outboxd.toml");
    let config = outboxd::config::Config::load(Some(std::path::Path::new(shipped))).unwrap();
    let defaults = outboxd::config::Config::default();
    assert_eq!(
        format!("{:?}", config.relay),
        format!("{:?}", defaults.relay)
    );
    assert_eq!(
        format!("{:?}", config.ingest),
        format!("{:?}", defaults.ingest)
    );
    assert_eq!(
        format!("{:?}", config.notify),
        format!("{:?}", defaults.notify)
    );
    assert_eq!(
        format!("{:?}", config.mongodb),
        format!("{:?}", defaults.mongodb)
    );
}

#[test]
fn a_bad_write_concern_stops_start_up_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("wc.toml");
    for (value, says) in [
        ("\"majorty\"", "\"majority\""),
        ("\"\"", "\"majority\""),
        ("0", "unacknowledged"),
        ("\"0\"", "unacknowledged"),
        ("-1", "from 1 to 50"),
        ("51", "from 1 to 50"),
        ("true", "write_concern"),
    ] {
        std::fs::write(&file, format!("[mongodb]\nwrite_concern = {value}\n")).unwrap();
        for command in ["check", "relay"] {
            let out = outboxd(&["--config", file.to_str().unwrap(), command], &[]);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(78), "{value}: {err}");
            assert!(
                err.contains("mongodb.write_concern") || err.contains("write_concern"),
                "{value}: {err}"
            );
            assert!(err.contains(says), "{value}: {err}");
        }
    }
    // From the environment, as a number or a word; and journal.
    let bad = outboxd(
        &["check"],
        &[("OUTBOXD__MONGODB__WRITE_CONCERN".into(), "most".into())],
    );
    assert_eq!(bad.status.code(), Some(78));
    let bad = outboxd(
        &["check"],
        &[("OUTBOXD__MONGODB__JOURNAL".into(), "maybe".into())],
    );
    assert_eq!(bad.status.code(), Some(78));
    assert!(
        String::from_utf8_lossy(&bad.stderr)
            .to_lowercase()
            .contains("mongodb.journal")
    );
    for (value, journal) in [
        ("majority", "true"),
        ("1", "false"),
        ("3", "true"),
        ("MAJORITY", "false"),
    ] {
        let out = outboxd(
            &["check"],
            &[
                ("OUTBOXD__MONGODB__WRITE_CONCERN".into(), value.into()),
                ("OUTBOXD__MONGODB__JOURNAL".into(), journal.into()),
            ],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.status.code(), Some(78), "{value}: {err}");
    }
}

#[test]
fn ingest_refuses_to_start_without_a_secret() {
    let out = Command::new(env!("CARGO_BIN_EXE_outboxd"))
        .args(["ingest", "--listen", "127.0.0.1:0"])
        .env_remove("OUTBOXD_WEBHOOK_SECRET")
        .env_remove("CREDENTIALS_DIRECTORY")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78), "a configuration error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no webhook secret"));
}

#[test]
fn secrets_never_appear_in_errors() {
    let out = outboxd(
        &["check"],
        &[
            (
                "DATABASE_URL".into(),
                format!(
                    "postgres://outboxd:hunter2secret@127.0.0.1:{}/x",
                    free_port()
                ),
            ),
            (
                "MONGODB_URL".into(),
                format!("mongodb://u:hunter2secret@127.0.0.1:{}/x", free_port()),
            ),
        ],
    );
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!all.contains("hunter2secret"), "{all}");

    // A URL written where a table belongs: figment would quote it whole.
    let out = outboxd(
        &["check"],
        &[(
            "OUTBOXD__DATABASE".into(),
            "postgres://outboxd:hunter2secret@127.0.0.1/x".into(),
        )],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(
        err.to_lowercase().contains("database") && !err.contains("hunter2secret"),
        "{err}"
    );

    // A URL left unquoted in the file: the TOML syntax error would quote its line.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("unquoted.toml");
    std::fs::write(
        &file,
        "[database]\nurl = postgres://outboxd:hunter2secret@127.0.0.1/x\n",
    )
    .unwrap();
    let out = outboxd(&["--config", file.to_str().unwrap(), "check"], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(
        err.contains("line 2") && !err.contains("hunter2secret"),
        "{err}"
    );

    // A `?` in a password: the driver splits there, and its reason would quote
    // what lies on either side of it.
    for url in [
        "mongodb://u:hunter2?secret@127.0.0.1:1/x",
        "mongodb://u:1234?hunter2secret@127.0.0.1:1/x",
        "mongodb://u:hunt/er2secret@127.0.0.1:1/x",
    ] {
        let out = outboxd(&["check"], &[("MONGODB_URL".into(), url.into())]);
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            all.contains("percent-encode") && !all.contains("hunter2") && !all.contains("secret"),
            "{all}"
        );
    }
}

#[tokio::test]
async fn options_in_the_database_url_are_kept_beside_the_timeout_and_keepalives() {
    let env = TestEnv::new().await;
    let mut config = env.config();
    let sep = if env.database_url.contains('?') {
        '&'
    } else {
        '?'
    };
    config.database.url = format!(
        "{}{sep}options=-c%20search_path%3Dcreditors%2Cpublic%20-c%20statement_timeout%3D9%20-c%20tcp_keepalives_count%3D7",
        env.database_url
    )
    .into();
    config.database.statement_timeout_ms = 1234;
    let pool = outboxd::db::pool(&config.database).unwrap();
    let client = pool.get().await.unwrap();
    let show = |name: &'static str| {
        let client = &client;
        async move {
            let row = client.query_one(&format!("SHOW {name}"), &[]).await;
            row.unwrap().get::<_, String>(0)
        }
    };
    assert_eq!(show("search_path").await, "creditors,public");
    // Without one in the URL, outboxd's own: no "$user" (the built-ins come
    // first unlisted).
    let pinned = outboxd::db::pool(&env.config().database).unwrap();
    let pinned = pinned.get().await.unwrap();
    let row = pinned.query_one("SHOW search_path", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "public");
    // The configured timeout comes last, so it wins over the URL's.
    assert_eq!(show("statement_timeout").await, "1234ms");
    // The server detects a dead client within seconds, not hours; the URL's own
    // keepalive settings win over outboxd's.
    assert_eq!(show("tcp_keepalives_idle").await, "10");
    assert_eq!(show("tcp_keepalives_count").await, "7");
    // Behind PgBouncer, which refuses the `options` startup parameter, none is sent.
    let mut quiet = env.config().database;
    quiet.server_keepalives = false;
    quiet.statement_timeout_ms = 0;
    assert_eq!(outboxd::db::pg_config(&quiet).unwrap().get_options(), None);
}

/// The test role that may log in over TLS only (scripts/services.sh), on this
/// test's database, with `params` (sslmode and its friends).
fn tls_url(env: &TestEnv, params: &str) -> String {
    let url = std::env::var("OUTBOXD_TEST_PG_TLS_URL")
        .expect("OUTBOXD_TEST_PG_TLS_URL is set (run `eval \"$(make -s services)\"`)");
    check_loopback("OUTBOXD_TEST_PG_TLS_URL", &url).unwrap_or_else(|e| panic!("{e}"));
    let base = url.rsplit_once('/').unwrap().0;
    format!("{base}/{}?{params}", env.name)
}

fn test_ca() -> String {
    std::env::var("OUTBOXD_TEST_PG_CA").expect("OUTBOXD_TEST_PG_CA is set (make services)")
}

fn with_database_url(env: &TestEnv, url: &str) -> Vec<(String, String)> {
    let mut vars = env.child_env();
    vars.retain(|(k, _)| k != "DATABASE_URL");
    vars.push(("DATABASE_URL".into(), url.to_owned()));
    vars
}

#[tokio::test]
async fn ingest_and_relay_speak_tls_to_postgresql_with_verify_full() {
    let env = TestEnv::new().await;
    let url = tls_url(
        &env,
        &format!("sslmode=verify-full&sslrootcert={}", test_ca()),
    );
    let (code, out) = outboxd_with(&["migrate"], &with_database_url(&env, &url));
    assert_eq!(code, 0, "{out}");
    let (code, out) = outboxd_with(&["check"], &with_database_url(&env, &url));
    assert_eq!(code, 0, "{out}");

    let mut config = env.config();
    config.database.url = url.clone().into();
    let ingest = Ingest::start(&config).await;
    let (status, body) = post_signed(&http(), &ingest.url(), &event(1, "K-1", "Bank", "10")).await;
    assert_eq!(status, 202, "{body}");
    let mut relay = Proc::spawn(
        &["relay", "--id", "tls-relay"],
        &with_database_url(&env, &url),
        "tls-relay",
    );
    assert!(
        env.wait_synced(Duration::from_secs(30)).await,
        "{}",
        relay.log_text()
    );
    // Every session of the TLS-only role, the relay's LISTEN among them, is encrypted.
    // Seen from a session of that role (other roles' rows are hidden), opened
    // by outboxd's own connector.
    let (client, connection) = outboxd::db::connector(&config.database)
        .unwrap()
        .connect()
        .await
        .unwrap();
    tokio::spawn(connection);
    let sessions: Vec<(String, bool)> = client
        .query(
            "SELECT a.query, s.ssl FROM pg_stat_activity a
             JOIN pg_stat_ssl s ON s.pid = a.pid
             WHERE a.datname = current_database() AND a.usename = 'outboxd_tls'
               AND a.pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(
        sessions
            .iter()
            .any(|(query, _)| query.starts_with("LISTEN")),
        "{sessions:?}"
    );
    assert!(sessions.iter().all(|(_, ssl)| *ssl), "{sessions:?}");
    relay.signal("TERM");
    assert!(relay.wait_timeout(Duration::from_secs(20)).is_some());
    ingest.stop().await;
}

#[tokio::test]
async fn tls_that_the_server_or_its_certificate_refuses_fails_with_the_reason() {
    let env = TestEnv::new().await;
    // No TLS for a role that may log in only with it: the server's reason.
    let (code, out) = outboxd_with(
        &["migrate"],
        &with_database_url(&env, &tls_url(&env, "sslmode=disable")),
    );
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("no encryption"), "{out}");
    assert!(!out.contains("outboxd_tls:outboxd_tls"), "{out}");

    // A certificate from a CA that is not the given one.
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other-ca.crt");
    let made = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=another CA", "-keyout"])
        .arg(dir.path().join("other-ca.key"))
        .arg("-out")
        .arg(&other)
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    for mode in ["verify-ca", "verify-full"] {
        let url = tls_url(
            &env,
            &format!("sslmode={mode}&sslrootcert={}", other.display()),
        );
        let (code, out) = outboxd_with(&["migrate"], &with_database_url(&env, &url));
        assert_ne!(code, 0, "{mode}: {out}");
        assert!(out.contains("certificate"), "{mode}: {out}");
    }

    // A root certificate file that cannot be read: a configuration error.
    let url = tls_url(&env, "sslmode=verify-full&sslrootcert=/nonexistent/ca.crt");
    let (code, out) = outboxd_with(&["migrate"], &with_database_url(&env, &url));
    assert_eq!(code, 78, "{out}");
    assert!(out.contains("sslrootcert /nonexistent/ca.crt"), "{out}");
    let (code, out) = outboxd_with(
        &["migrate"],
        &with_database_url(&env, &tls_url(&env, "sslmode=always")),
    );
    assert_eq!(code, 78, "{out}");
    assert!(out.contains("sslmode=always"), "{out}");
}
