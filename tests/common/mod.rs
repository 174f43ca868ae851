//! Test harness: each test gets its own PostgreSQL database, cloned from a migrated
//! template, and its own MongoDB database; both are dropped when the test ends.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mongodb::bson::{Document, doc};
use outboxd::config::Config;
use outboxd::ingest::{self, webhook};
use serde_json::Value;
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

mod ports;
pub mod smtp;
mod urls;
pub use ports::free_port;
pub use urls::{check_loopback, with_database};

pub const SECRET: &str = "test-secret-never-logged";
pub const SAMPLE: &str = include_str!("../../examples/webhook-email.json");

pub fn database_url() -> String {
    let url = std::env::var("DATABASE_URL")
        .expect("DATABASE_URL is set (run `eval \"$(make -s services)\"`)");
    check_loopback("DATABASE_URL", &url).unwrap_or_else(|e| panic!("{e}"));
    url
}

pub fn mongodb_url() -> String {
    let url =
        std::env::var("MONGODB_URL").unwrap_or_else(|_| "mongodb://127.0.0.1:27017/outboxd".into());
    check_loopback("MONGODB_URL", &url).unwrap_or_else(|e| panic!("{e}"));
    url
}

/// An HTTP client for the servers under test. It ignores `HTTP_PROXY` and its
/// kin, which would send loopback requests, signatures and all, to a proxy.
pub fn http() -> reqwest::Client {
    http_builder().build().unwrap()
}

pub fn http_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder().no_proxy()
}

async fn admin() -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&database_url(), NoTls)
        .await
        .expect("PostgreSQL reachable");
    tokio::spawn(conn);
    client
}

fn template_name() -> String {
    let mut sums = String::new();
    for (v, _, sql) in outboxd::migrate::MIGRATIONS {
        sums.push_str(&format!("{v}:{}", sql.len()));
        sums.push_str(&outboxd::idempotency::content_hash(&Value::String(
            sql.to_string(),
        )));
    }
    format!(
        "outboxd_tpl_{}",
        &outboxd::idempotency::content_hash(&Value::String(sums))[..12]
    )
}

/// Creates the migrated template once per schema, under an advisory lock.
async fn ensure_template(admin: &tokio_postgres::Client) -> String {
    let name = template_name();
    admin
        .execute("SELECT pg_advisory_lock(7411)", &[])
        .await
        .unwrap();
    let exists: bool = admin
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)",
            &[&name],
        )
        .await
        .unwrap()
        .get(0);
    if !exists {
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        let (mut client, conn) =
            tokio_postgres::connect(&with_database(&database_url(), &name), NoTls)
                .await
                .unwrap();
        let handle = tokio::spawn(conn);
        outboxd::migrate::run(&mut client)
            .await
            .expect("migrations apply to the template");
        drop(client);
        let _ = handle.await;
    }
    admin
        .execute("SELECT pg_advisory_unlock(7411)", &[])
        .await
        .unwrap();
    name
}

/// A fresh database pair for one test.
pub struct TestEnv {
    pub name: String,
    pub database_url: String,
    pub mongodb_url: String,
    pub mongo: mongodb::Database,
}

impl TestEnv {
    pub async fn new() -> TestEnv {
        let admin = admin().await;
        let template = ensure_template(&admin).await;
        let name = format!("t_{}_{:08x}", std::process::id(), fastrand::u32(..));
        let mut tries = 0;
        // Concurrent clones may briefly see the template busy.
        while let Err(e) = admin
            .batch_execute(&format!("CREATE DATABASE {name} TEMPLATE {template}"))
            .await
        {
            tries += 1;
            assert!(tries < 50, "cannot clone the template: {e}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mongodb_url = with_database(&mongodb_url(), &name);
        let client = mongodb::Client::with_uri_str(&mongodb_url).await.unwrap();
        TestEnv {
            database_url: with_database(&database_url(), &name),
            mongo: client.database(&name),
            mongodb_url,
            name,
        }
    }

    /// A config pointing at this test's databases, with quick timings for tests.
    pub fn config(&self) -> Config {
        let mut config = Config::default();
        config.database.url = self.database_url.clone().into();
        config.database.pool_size = 8;
        // Shared 2-core machines can be slow to hand out many connections at once.
        config.database.connect_timeout_ms = 10_000;
        config.database.pool_wait_ms = 10_000;
        config.mongodb.url = self.mongodb_url.clone().into();
        config.relay.poll_interval_ms = 200;
        config.relay.backoff_base_ms = 100;
        config.relay.backoff_cap_ms = 1000;
        config.relay.lease_s = 5;
        // Writes start only while they can finish within the lease.
        config.mongodb.timeout_ms = 2000;
        config
    }

    pub async fn pg(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.database_url, NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
    }

    pub async fn count(&self, sql: &str) -> i64 {
        self.pg().await.query_one(sql, &[]).await.unwrap().get(0)
    }

    pub fn docs(&self) -> mongodb::Collection<Document> {
        self.mongo.collection("creditor_debts")
    }

    pub async fn doc(&self, aggregate: &str) -> Option<Document> {
        self.docs().find_one(doc! {"_id": aggregate}).await.unwrap()
    }

    /// Environment for a child `outboxd` process.
    pub fn child_env(&self) -> Vec<(String, String)> {
        vec![
            ("DATABASE_URL".into(), self.database_url.clone()),
            ("MONGODB_URL".into(), self.mongodb_url.clone()),
            ("OUTBOXD_WEBHOOK_SECRET".into(), SECRET.into()),
            ("OUTBOXD__RELAY__POLL_INTERVAL_MS".into(), "200".into()),
            ("OUTBOXD__RELAY__BACKOFF_BASE_MS".into(), "100".into()),
            ("OUTBOXD__RELAY__BACKOFF_CAP_MS".into(), "1000".into()),
            ("OUTBOXD__RELAY__LEASE_S".into(), "10".into()),
            ("OUTBOXD__DATABASE__POOL_SIZE".into(), "8".into()),
            // As in `config`: a slow connection on a busy machine is no outage.
            (
                "OUTBOXD__DATABASE__CONNECT_TIMEOUT_MS".into(),
                "10000".into(),
            ),
            ("OUTBOXD__DATABASE__POOL_WAIT_MS".into(), "10000".into()),
            ("OUTBOXD__LOG__FORMAT".into(), "json".into()),
        ]
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let name = self.name.clone();
        let mongodb_url = self.mongodb_url.clone();
        // Drop runs outside async; clean up on a runtime (and clients) of our own,
        // since the test's runtime is blocked here.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let admin = admin().await;
                let _ = admin
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await;
                if let Ok(client) = mongodb::Client::with_uri_str(&mongodb_url).await {
                    let _ = client.database(&name).drop().await;
                }
            });
        })
        .join();
    }
}

/// An in-process ingest on a free loopback port.
pub struct Ingest {
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub handle: tokio::task::JoinHandle<()>,
}

impl Ingest {
    pub async fn start(config: &Config) -> Ingest {
        if std::env::var_os("TEST_LOG").is_some() {
            outboxd::telemetry::init_logs(&config.log);
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let pool = outboxd::db::pool(&config.database).unwrap();
        let app = ingest::App::new(config, pool, SECRET.to_string().into(), shutdown.clone());
        let handle = tokio::spawn(ingest::serve(listener, app, shutdown.clone()));
        Ingest {
            addr,
            shutdown,
            handle,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/webhooks/email", self.addr)
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.handle.await;
    }
}

pub fn now_stamp() -> String {
    chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// The body of a GET, as text (a `/metrics` page, say).
pub async fn get_text(http: &reqwest::Client, url: &str) -> String {
    http.get(url).send().await.unwrap().text().await.unwrap()
}

/// Posts a body signed with the test secret.
pub async fn post_signed(http: &reqwest::Client, url: &str, body: &str) -> (u16, Value) {
    try_post_signed(http, url, body)
        .await
        .expect("ingest answers")
}

/// Posts a body signed with the test secret; `Err` for transport failures
/// (refused, reset, timeout).
pub async fn try_post_signed(
    http: &reqwest::Client,
    url: &str,
    body: &str,
) -> Result<(u16, Value), reqwest::Error> {
    try_post_signed_at(http, url, body, &now_stamp()).await
}

/// As `try_post_signed`, with the signature timestamp `ts`.
pub async fn try_post_signed_at(
    http: &reqwest::Client,
    url: &str,
    body: &str,
    ts: &str,
) -> Result<(u16, Value), reqwest::Error> {
    let sig = webhook::sign(SECRET.as_bytes(), ts, body.as_bytes());
    let response = http
        .post(url)
        .header("content-type", "application/json")
        .header(webhook::SIGNATURE_HEADER, sig)
        .header(webhook::TIMESTAMP_HEADER, ts)
        .body(body.to_owned())
        .send()
        .await?;
    let status = response.status().as_u16();
    let json = response.json().await.unwrap_or(Value::Null);
    Ok((status, json))
}

/// A webhook body for `client`/`creditor` with `amount`, unique webhook id `n`.
pub fn event(n: u64, client: &str, creditor: &str, amount: &str) -> String {
    let mut v: Value = serde_json::from_str(SAMPLE).unwrap();
    v["webhook_id"] = Value::String(format!("evt-{n}-{:08x}", fastrand::u32(..)));
    v["creditor_debt"]["client_reference"] = Value::String(client.into());
    v["creditor_debt"]["creditor_reference"] = Value::String(creditor.into());
    v["creditor_debt"]["amount"] = Value::String(amount.into());
    v.to_string()
}

/// Polls `check` until it is true or `timeout` passes; returns whether it became true.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A child `outboxd` process whose log goes to a file; killed when dropped.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(args: &[&str], env: &[(String, String)], log_name: &str) -> Proc {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let log = dir.join(format!(
            "{log_name}-{}-{:08x}.log",
            std::process::id(),
            fastrand::u32(..)
        ));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_outboxd"))
            .args(args)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("outboxd starts");
        Proc { child, log }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Waits for exit up to `timeout`; `None` if it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A private FerretDB on its own port, for tests that stop it. Its backend is
/// the services' (`make services`): a PostgreSQL database of its own on
/// FerretDB's cluster when `FERRETDB_POSTGRESQL_URL` is set, else SQLite in a
/// temporary directory.
pub struct Ferret {
    pub port: u16,
    dir: tempfile::TempDir,
    /// The backend database's URL, when on PostgreSQL.
    backend: Option<String>,
    child: Option<Child>,
}

/// Runs `sql` on the `postgres` database of the cluster that `url` names.
async fn ferret_backend_admin(url: &str, sql: &str) {
    let admin = with_database(url, "postgres");
    check_loopback("FERRETDB_POSTGRESQL_URL", &admin).unwrap_or_else(|e| panic!("{e}"));
    let (client, conn) = tokio_postgres::connect(&admin, NoTls)
        .await
        .expect("FerretDB's PostgreSQL backend reachable");
    let handle = tokio::spawn(conn);
    client
        .batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("on FerretDB's backend cluster: {e}"));
    drop(client);
    let _ = handle.await;
}

pub fn ferretdb_bin() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.tools/bin/ferretdb"))
}

impl Ferret {
    pub async fn start() -> Ferret {
        let port = free_port();
        let backend = match std::env::var("FERRETDB_POSTGRESQL_URL") {
            Ok(url) => {
                let name = format!(
                    "ferret_{}_{port}_{:08x}",
                    std::process::id(),
                    fastrand::u32(..)
                );
                ferret_backend_admin(&url, &format!("CREATE DATABASE {name}")).await;
                Some(with_database(&url, &name))
            }
            Err(_) => None,
        };
        let mut ferret = Ferret {
            port,
            dir: tempfile::tempdir().unwrap(),
            backend,
            child: None,
        };
        ferret.resume().await;
        ferret
    }

    pub fn url(&self, db: &str) -> String {
        format!("mongodb://127.0.0.1:{}/{db}", self.port)
    }

    pub async fn resume(&mut self) {
        let data = self.dir.path().join("data");
        let state = self.dir.path().join("state");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::create_dir_all(&state).unwrap();
        let mut command = Command::new(ferretdb_bin());
        match &self.backend {
            Some(url) => command
                .arg("--handler=postgresql")
                .arg(format!("--postgresql-url={url}")),
            None => command
                .arg("--handler=sqlite")
                .arg(format!("--sqlite-url=file:{}/", data.display())),
        };
        let child = command
            .arg(format!("--listen-addr=127.0.0.1:{}", self.port))
            .arg(format!("--state-dir={}", state.display()))
            .arg("--telemetry=disable")
            .arg("--debug-addr=-")
            .arg("--log-level=error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("FerretDB starts (make services builds it)");
        self.child = Some(child);
        let port = self.port;
        let up = eventually(Duration::from_secs(20), || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
        .await;
        assert!(up, "FerretDB did not start");
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Makes the backend refuse every write (`default_transaction_read_only`),
    /// or take them again: a MongoDB that answers pings but refuses writes, as
    /// a read-only or full disk, a lost privilege or a demoted primary do.
    pub async fn set_read_only(&self, on: bool) {
        let url = self
            .backend
            .as_ref()
            .expect("FerretDB on PostgreSQL (FERRETDB_POSTGRESQL_URL, make services)");
        let name = url.rsplit('/').next().unwrap().split('?').next().unwrap();
        // Sessions take the setting when they start: end FerretDB's own.
        ferret_backend_admin(
            url,
            &format!(
                "ALTER DATABASE {name} SET default_transaction_read_only = {on};
                 SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE datname = '{name}' AND pid <> pg_backend_pid();"
            ),
        )
        .await;
    }

    /// Sends `signal` (`STOP`, `CONT`, …) to the running FerretDB.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("FerretDB is running").id();
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }
}

impl Drop for Ferret {
    fn drop(&mut self) {
        self.stop();
        let Some(url) = self.backend.take() else {
            return;
        };
        // As TestEnv's drop: a runtime of our own, the test's being blocked here.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let name = url.rsplit('/').next().unwrap_or_default().to_owned();
            rt.block_on(ferret_backend_admin(
                &url,
                &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
            ));
        })
        .join();
    }
}

/// A TCP proxy on loopback that can cut every connection and refuse new ones,
/// to stand for a database that went away.
pub struct Proxy {
    pub port: u16,
    up: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (up, _) = tokio::sync::watch::channel(true);
        let up = Arc::new(up);
        let state = up.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if !*state.borrow() {
                    drop(inbound);
                    continue;
                }
                let mut down = state.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = down.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Proxy { port, up }
    }

    pub fn set_up(&self, up: bool) {
        self.up.send_replace(up);
    }
}

pub fn pg_addr() -> SocketAddr {
    let url = database_url();
    let authority = url.split("://").nth(1).unwrap().split('/').next().unwrap();
    let host_port = authority.rsplit('@').next().unwrap();
    let host_port = if host_port.contains(':') {
        host_port.to_string()
    } else {
        format!("{host_port}:5432")
    };
    let host_port = host_port.replace("localhost", "127.0.0.1");
    host_port
        .parse()
        .expect("DATABASE_URL host is an IP address or localhost")
}

/// A URL like `url` but through `port` on loopback.
pub fn via_port(url: &str, port: u16) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (authority, tail) = rest.split_once('/').unwrap_or((rest, ""));
    let creds = authority
        .rsplit_once('@')
        .map(|(c, _)| format!("{c}@"))
        .unwrap_or_default();
    format!("{scheme}://{creds}127.0.0.1:{port}/{tail}")
}

impl TestEnv {
    /// Inserts `n` e-mails with one pending outbox row each, spread over `aggregates`
    /// aggregates (`C-{i}/K`), amount `{ticket}.00`. Returns the new outbox ids.
    pub async fn seed(&self, n: i64, aggregates: i64) -> Vec<i64> {
        let pg = self.pg().await;
        let tag = format!("{:08x}", fastrand::u32(..));
        let rows = pg
            .query(
                "WITH e AS (
                     INSERT INTO incoming_emails (webhook_id, ticket_id, from_address, subject, body)
                     SELECT 'seed-' || $3 || '-' || g, g, 'a@b.example', 's', 'b' FROM generate_series(1, $1::bigint) g
                     RETURNING id, ticket_id)
                 INSERT INTO outbox_messages (operation, aggregate_id, payload, email_id, idempotency_key)
                 SELECT 'update_creditor_debt', 'C-' || (ticket_id % $2::bigint) || '/K',
                        jsonb_build_object('client_reference', 'C-' || (ticket_id % $2), 'creditor_name', 'Bank',
                                           'creditor_reference', 'K', 'amount', ticket_id || '.00', 'currency', 'EUR'),
                        id, 'seed:' || $3 || ':' || id
                 FROM e ORDER BY id
                 RETURNING id",
                &[&n, &aggregates, &tag],
            )
            .await
            .unwrap();
        let mut ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        ids.sort();
        ids
    }

    /// Rows not yet synced.
    pub async fn unsynced(&self) -> i64 {
        self.count("SELECT count(*) FROM outbox_messages WHERE status <> 'synced'")
            .await
    }

    /// Aggregates whose document is missing or does not hold the latest message.
    pub async fn behind(&self) -> Vec<(String, i64, Option<i64>)> {
        let pg = self.pg().await;
        let latest = pg
            .query(
                "SELECT aggregate_id, max(id) FROM outbox_messages GROUP BY 1",
                &[],
            )
            .await
            .unwrap();
        let mut bad = Vec::new();
        for row in latest {
            let (agg, id): (String, i64) = (row.get(0), row.get(1));
            let held = self
                .doc(&agg)
                .await
                .and_then(|d| d.get_i64("outbox_id").ok());
            if held != Some(id) {
                bad.push((agg, id, held));
            }
        }
        bad
    }

    pub async fn wait_synced(&self, timeout: Duration) -> bool {
        eventually(timeout, || async { self.unsynced().await == 0 }).await
    }
}

/// A stand-in for systemd's notify socket: a child given `vars()` sends its
/// READY, WATCHDOG and STOPPING messages here.
pub struct NotifySocket {
    _dir: tempfile::TempDir,
    path: PathBuf,
    socket: tokio::net::UnixDatagram,
}

impl NotifySocket {
    pub fn bind() -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let socket = tokio::net::UnixDatagram::bind(&path).unwrap();
        NotifySocket {
            _dir: dir,
            path,
            socket,
        }
    }

    /// The environment systemd gives a `Type=notify` unit with `WatchdogSec=1s`.
    pub fn vars(&self) -> Vec<(String, String)> {
        vec![
            ("NOTIFY_SOCKET".into(), self.path.display().to_string()),
            ("WATCHDOG_USEC".into(), "1000000".into()),
        ]
    }

    /// What systemd sees of a `Type=notify` unit given `vars()`: `READY=1` first,
    /// (within `ready_within`), then `WATCHDOG=1` every half interval, and on SIGTERM
    /// `STOPPING=1` and exit 0.
    pub async fn check_lifecycle(&self, child: &mut Proc, ready_within: Duration) {
        let ready = self.until("READY=1", ready_within).await;
        assert_eq!(
            ready,
            Some(vec!["READY=1".to_string()]),
            "{}",
            child.log_text()
        );
        for _ in 0..3 {
            let pet = self.until("WATCHDOG=1", Duration::from_secs(5)).await;
            assert!(pet.is_some(), "no WATCHDOG=1:\n{}", child.log_text());
        }
        child.signal("TERM");
        let stopping = self.until("STOPPING=1", Duration::from_secs(10)).await;
        assert!(stopping.is_some(), "no STOPPING=1:\n{}", child.log_text());
        let status = child.wait_timeout(Duration::from_secs(35)).expect("exits");
        assert!(status.success(), "{status:?}");
    }

    /// The messages received until `message` (one `KEY=value` line), or `None`
    /// when it did not come within `timeout`.
    async fn until(&self, message: &str, timeout: Duration) -> Option<Vec<String>> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut seen = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            let n = tokio::time::timeout_at(deadline, self.socket.recv(&mut buf))
                .await
                .ok()?
                .unwrap();
            for line in String::from_utf8_lossy(&buf[..n]).lines() {
                seen.push(line.to_string());
                if line == message {
                    return Some(seen);
                }
            }
        }
    }
}

/// Runs the `outboxd` binary on this test's databases: its exit code and its
/// stdout and stderr together.
pub fn outboxd(args: &[&str], env: &TestEnv) -> (i32, String) {
    outboxd_with(args, &env.child_env())
}

/// `outboxd`, with the environment `vars` (a test's own config file, say).
pub fn outboxd_with(args: &[&str], vars: &[(String, String)]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_outboxd"))
        .args(args)
        .envs(vars.iter().cloned())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// A relay child process named `id`, on this test's databases.
pub fn relay(env: &TestEnv, id: &str) -> Proc {
    Proc::spawn(&["relay", "--id", id], &env.child_env(), id)
}
