//! Helpers for the outboxd benchmark: throw-away databases, child processes, CPU
//! and memory accounting, percentiles, and the HTTP load generator.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use outboxd::ingest::webhook;
use tokio_postgres::NoTls;

/// The webhook secret the benchmark's ingest runs with.
pub const SECRET: &str = "bench-secret-not-for-production";

#[path = "../../tests/common/ports.rs"]
mod ports;
#[path = "../../tests/common/urls.rs"]
mod urls;
pub use ports::free_port;
pub use urls::{check_loopback, with_database};

/// Connects a plain client (its connection task runs in the background).
pub async fn pg_connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .context("cannot connect to PostgreSQL")?;
    tokio::spawn(conn);
    Ok(client)
}

/// The run's services and the throw-away databases it created (all dropped by `cleanup`).
pub struct Ctx {
    pub admin_url: String,
    pub mongo_url: String,
    pub out: PathBuf,
    pub run: String,
    template: String,
    admin: tokio_postgres::Client,
    pub mongo: mongodb::Client,
    pg_dbs: Mutex<Vec<String>>,
    mongo_dbs: Mutex<Vec<String>>,
}

impl Ctx {
    /// Connects to both services and migrates a template database for this run.
    pub async fn new(out: PathBuf) -> anyhow::Result<Ctx> {
        let admin_url = std::env::var("DATABASE_URL").context(
            "DATABASE_URL is not set: run `make bench`, or `eval \"$(make -s services)\"` first",
        )?;
        let mongo_url = std::env::var("MONGODB_URL")
            .unwrap_or_else(|_| "mongodb://127.0.0.1:27017/outboxd".into());
        check_loopback("DATABASE_URL", &admin_url).map_err(anyhow::Error::msg)?;
        check_loopback("MONGODB_URL", &mongo_url).map_err(anyhow::Error::msg)?;
        let admin = pg_connect(&admin_url).await?;
        // The driver's reason can quote part of a password: not shown.
        let mongo = mongodb::Client::with_uri_str(&mongo_url)
            .await
            .map_err(|_| anyhow::anyhow!("MONGODB_URL is not a valid MongoDB URL"))?;
        let run = format!("{:08x}", fastrand::u32(..));
        let template = format!("bench_{run}_tpl");
        let ctx = Ctx {
            admin_url,
            mongo_url,
            out,
            run,
            template: template.clone(),
            admin,
            mongo,
            pg_dbs: Mutex::new(vec![template.clone()]),
            mongo_dbs: Mutex::new(Vec::new()),
        };
        ctx.admin
            .batch_execute(&format!("CREATE DATABASE {template}"))
            .await
            .context("CREATE DATABASE (the role needs CREATEDB)")?;
        let (mut client, conn) = tokio_postgres::connect(&ctx.db_url(&template), NoTls).await?;
        let handle = tokio::spawn(conn);
        outboxd::migrate::run(&mut client).await?;
        drop(client);
        let _ = handle.await;
        Ok(ctx)
    }

    pub fn db_url(&self, name: &str) -> String {
        with_database(&self.admin_url, name)
    }

    pub fn mongo_db_url(&self, name: &str) -> String {
        with_database(&self.mongo_url, name)
    }

    /// A new, migrated, empty PostgreSQL database (a clone of the run's template).
    pub async fn fresh_db(&self, tag: &str) -> anyhow::Result<String> {
        let name = format!("bench_{}_{tag}_{:04x}", self.run, fastrand::u16(..));
        self.pg_dbs.lock().unwrap().push(name.clone());
        self.admin
            .batch_execute(&format!(
                "CREATE DATABASE {name} TEMPLATE {}",
                self.template
            ))
            .await
            .with_context(|| format!("CREATE DATABASE {name}"))?;
        Ok(name)
    }

    pub async fn drop_db(&self, name: &str) {
        if let Err(e) = self
            .admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await
        {
            let why = e
                .as_db_error()
                .map_or(e.to_string(), |d| d.message().to_owned());
            eprintln!("bench: could not drop database {name}: {why}");
            return;
        }
        self.pg_dbs.lock().unwrap().retain(|n| n != name);
    }

    /// A MongoDB database name not used before (created by its first write).
    pub fn fresh_mongo(&self, tag: &str) -> String {
        let name = format!("bench_{}_{tag}_{:04x}", self.run, fastrand::u16(..));
        self.mongo_dbs.lock().unwrap().push(name.clone());
        name
    }

    pub async fn drop_mongo(&self, name: &str) {
        if let Err(e) = self.mongo.database(name).drop().await {
            eprintln!("bench: could not drop MongoDB database {name}: {e}");
            return;
        }
        self.mongo_dbs.lock().unwrap().retain(|n| n != name);
    }

    /// Drops every database this run created.
    pub async fn cleanup(&self) {
        let pg: Vec<String> = self.pg_dbs.lock().unwrap().clone();
        for name in pg.iter().rev() {
            self.drop_db(name).await;
        }
        let mongo: Vec<String> = self.mongo_dbs.lock().unwrap().clone();
        for name in &mongo {
            self.drop_mongo(name).await;
        }
    }

    pub async fn pg(&self, db: &str) -> anyhow::Result<tokio_postgres::Client> {
        pg_connect(&self.db_url(db)).await
    }

    /// The environment of a child `outboxd` working on `db` and `mongo_db`.
    pub fn child_env(&self, db: &str, mongo_db: &str) -> Vec<(String, String)> {
        vec![
            ("DATABASE_URL".into(), self.db_url(db)),
            ("MONGODB_URL".into(), self.mongo_db_url(mongo_db)),
            ("OUTBOXD_WEBHOOK_SECRET".into(), SECRET.into()),
            ("OUTBOXD__LOG__FORMAT".into(), "json".into()),
        ]
    }

    pub fn log_path(&self, name: &str) -> PathBuf {
        self.out.join("logs").join(format!("{name}.log"))
    }
}

/// A child process, killed when dropped.
pub struct Proc {
    pub child: Child,
}

impl Proc {
    /// Starts `bin args` with `env` added, stdout discarded and stderr to `log`.
    pub fn spawn(
        bin: &Path,
        args: &[&str],
        env: &[(String, String)],
        log: &Path,
    ) -> anyhow::Result<Proc> {
        if let Some(dir) = log.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = std::fs::File::create(log)?;
        let child = Command::new(bin)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        Ok(Proc { child })
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Fails when the process has already exited.
    pub fn check_running(&mut self, what: &str) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{what} exited early: {status}");
        }
        Ok(())
    }

    /// SIGTERM, then SIGKILL after `timeout`.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Some(status);
        }
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.pid(), libc::SIGTERM);
        }
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        self.child.wait().ok()
    }

    /// Peak resident set size so far (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        status_field(self.pid(), "VmHWM:")
    }

    /// User + system CPU seconds so far.
    pub fn cpu_s(&self) -> Option<f64> {
        proc_cpu_s(self.pid())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

fn status_field(pid: i32, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// User + system CPU seconds of any process, from /proc/PID/stat.
pub fn proc_cpu_s(pid: i32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at `state`.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks())
}

/// The parent pid of a process, from /proc/PID/stat.
fn parent_pid(pid: i32) -> Option<i32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    text[text.rfind(')')? + 2..]
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The postmaster of the cluster `client` is connected to: its backend's parent.
pub async fn postmaster_pid(client: &tokio_postgres::Client) -> anyhow::Result<i32> {
    let backend: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await?
        .get(0);
    parent_pid(backend).with_context(|| {
        format!(
            "cannot read the parent of PostgreSQL backend {backend} (is the server on this host?)"
        )
    })
}

/// CPU seconds so far of the PostgreSQL processes that work for one database:
/// its backends and autovacuum workers, and the cluster's own background
/// processes (WAL writer, checkpointer, background writer), by pid. Backends
/// of other databases, such as other tenants' tests, are left out.
pub struct PgCpu(std::collections::HashMap<i32, f64>);

impl PgCpu {
    /// Reads the children of `postmaster` that work for `db`.
    pub fn read(postmaster: i32, db: &str) -> PgCpu {
        let mut by_pid = std::collections::HashMap::new();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return PgCpu(by_pid);
        };
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            if parent_pid(pid) != Some(postmaster) {
                continue;
            }
            let title = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let title = String::from_utf8_lossy(&title).replace('\0', " ");
            // "postgres: 15/main: USER DB HOST(PORT) STATE", "…: autovacuum worker DB",
            // or a background process: "…: walwriter".
            let what = title.splitn(3, ": ").nth(2).unwrap_or_default();
            let words: Vec<&str> = what.split_whitespace().collect();
            let mine = match words.as_slice() {
                ["autovacuum", "worker", d, ..] => *d == db,
                ["walwriter", ..] | ["checkpointer", ..] | ["background", "writer", ..] => true,
                [_, d, host, ..] if host.contains('(') => *d == db,
                _ => false,
            };
            if mine && let Some(cpu) = proc_cpu_s(pid) {
                by_pid.insert(pid, cpu);
            }
        }
        PgCpu(by_pid)
    }

    /// CPU seconds since `earlier`. A backend that exited in between is lost:
    /// `PgCpuWatch` samples while a drain runs for that reason.
    pub fn since(&self, earlier: &PgCpu) -> f64 {
        self.0
            .iter()
            .map(|(pid, cpu)| cpu - earlier.0.get(pid).copied().unwrap_or(0.0))
            .sum()
    }
}

/// `PgCpu` sampled every 250 ms from a thread of its own, so backends that exit
/// before the end (a peer's sessions close with its process) still count, up
/// to their last sample.
pub struct PgCpuWatch {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<f64>,
}

impl PgCpuWatch {
    pub fn start(postmaster: i32, db: &str) -> PgCpuWatch {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (db, stopped) = (db.to_owned(), stop.clone());
        let thread = std::thread::spawn(move || {
            let start = PgCpu::read(postmaster, &db);
            let mut last = PgCpu(start.0.clone());
            loop {
                let done = stopped.load(std::sync::atomic::Ordering::Relaxed);
                // CPU time only grows, so a pid's newest reading is its total.
                last.0.extend(PgCpu::read(postmaster, &db).0);
                if done {
                    return last.since(&start);
                }
                // Seldom: each sample reads every process's /proc entries.
                std::thread::sleep(Duration::from_millis(250));
            }
        });
        PgCpuWatch { stop, thread }
    }

    /// CPU seconds since `start`.
    pub fn stop(self) -> f64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap_or(f64::NAN)
    }
}

fn rusage_s(who: libc::c_int) -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we pass.
    unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(who, &mut usage);
        let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
        t(usage.ru_utime) + t(usage.ru_stime)
    }
}

/// CPU seconds of this process (the load generator, the raw MongoDB loop).
pub fn self_cpu_s() -> f64 {
    rusage_s(libc::RUSAGE_SELF)
}

/// CPU seconds of all waited-for children (pgbench, once it has exited).
pub fn children_cpu_s() -> f64 {
    rusage_s(libc::RUSAGE_CHILDREN)
}

/// Machine-wide CPU time, from /proc/stat: (busy, total) in seconds.
pub fn machine_cpu_s() -> (f64, f64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = text.lines().next().unwrap_or("");
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 5 {
        return (0.0, 0.0);
    }
    // user nice system idle iowait irq softirq steal (guest* are inside user)
    let total: f64 = v.iter().take(8).sum();
    let idle = v[3] + v[4];
    let hz = clock_ticks();
    ((total - idle) / hz, total / hz)
}

/// The value at quantile `q` (nearest rank) of a sorted slice.
pub fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Waits until something accepts TCP connections on `addr`.
pub async fn wait_listening(addr: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("nothing listens on {addr} after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ------------------------------------------------------------- load generator

/// A webhook body for event `r`: a distinct webhook id, client and aggregate, shaped
/// like examples/webhook-email.json (umlauts included).
pub fn webhook_body(r: u64) -> String {
    let ticket = r % 1_000_000_000 + 1;
    let euros = r % 100_000;
    let cents = r % 100;
    format!(
        concat!(
            r#"{{"webhook_id":"evt-bench-{r}","ticket_id":{ticket},"email":{{"#,
            r#""message_id":"<bench-{r}@mail.sparkasse.example>","from":"forderungen@sparkasse.example","#,
            r#""subject":"Forderungsaufstellung Ihr Zeichen MP-{r}","#,
            r#""body":"Sehr geehrte Damen und Herren, die Forderung beträgt 1.234,56 €.","#,
            r#""received_at":"2026-11-28T09:15:00Z"}},"creditor_debt":{{"client_reference":"MP-{r}","#,
            r#""creditor_name":"Sparkasse KölnBonn","creditor_reference":"K-99812","#,
            r#""amount":"{euros}.{cents:02}","currency":"EUR"}}}}"#
        ),
        r = r,
        ticket = ticket,
        euros = euros,
        cents = cents
    )
}

/// `webhook_body(r)`, but for the aggregate `{client}/{creditor_reference}`.
pub fn webhook_body_for(r: u64, client: &str, creditor_reference: &str) -> String {
    webhook_body(r)
        .replace(
            &format!(r#""client_reference":"MP-{r}""#),
            &format!(r#""client_reference":"{client}""#),
        )
        .replace(
            r#""creditor_reference":"K-99812""#,
            &format!(r#""creditor_reference":"{creditor_reference}""#),
        )
}

/// A random event number; the same range pgbench draws from.
pub fn event_number() -> u64 {
    fastrand::u64(1..=9_000_000_000_000_000_000)
}

type Sender = SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> anyhow::Result<Sender> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// Posts one signed webhook on a kept-alive connection; answers the status.
async fn post(sender: &mut Sender, body: String) -> anyhow::Result<u16> {
    let ts = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string();
    let signature = webhook::sign(SECRET.as_bytes(), &ts, body.as_bytes());
    let request = hyper::Request::post("/webhooks/email")
        .header(hyper::header::HOST, "127.0.0.1")
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(webhook::SIGNATURE_HEADER, signature)
        .header(webhook::TIMESTAMP_HEADER, ts)
        .body(Full::new(Bytes::from(body)))?;
    sender.ready().await?;
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    response.into_body().collect().await?;
    Ok(status)
}

/// What a load run saw.
#[derive(Debug, Default)]
pub struct Load {
    pub accepted: u64,
    pub other: BTreeMap<u16, u64>,
    pub errors: u64,
    /// Latency of each 202, in milliseconds.
    pub latencies_ms: Vec<f64>,
    pub elapsed: Duration,
}

impl Load {
    pub fn rps(&self) -> f64 {
        self.accepted as f64 / self.elapsed.as_secs_f64()
    }

    pub fn latency(&mut self, q: f64) -> Option<f64> {
        if !self.latencies_ms.is_sorted_by(|a, b| a <= b) {
            self.latencies_ms.sort_by(f64::total_cmp);
        }
        quantile(&self.latencies_ms, q)
    }

    fn merge(&mut self, other: Load) {
        self.accepted += other.accepted;
        for (k, v) in other.other {
            *self.other.entry(k).or_default() += v;
        }
        self.errors += other.errors;
        self.latencies_ms.extend(other.latencies_ms);
    }
}

/// Makes the body of each webhook a load run posts.
pub type Bodies = Arc<dyn Fn() -> String + Send + Sync>;

/// Posts distinct signed webhooks over `conns` kept-alive connections for `duration`.
/// `rate: None` is a closed loop (each connection sends as soon as it has its answer);
/// `Some(r)` is an open loop at `r` requests/s in total, on a fixed schedule.
pub async fn run_load(
    addr: SocketAddr,
    conns: usize,
    duration: Duration,
    rate: Option<f64>,
) -> anyhow::Result<Load> {
    run_load_with(
        addr,
        conns,
        duration,
        rate,
        Arc::new(|| webhook_body(event_number())),
    )
    .await
}

/// `run_load` with webhooks made by `bodies`.
pub async fn run_load_with(
    addr: SocketAddr,
    conns: usize,
    duration: Duration,
    rate: Option<f64>,
    bodies: Bodies,
) -> anyhow::Result<Load> {
    let mut senders = Vec::with_capacity(conns);
    for _ in 0..conns {
        senders.push(connect(addr).await?);
    }
    let started = tokio::time::Instant::now();
    let end = started + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for (k, mut sender) in senders.into_iter().enumerate() {
        let bodies = bodies.clone();
        tasks.spawn(async move {
            let mut load = Load::default();
            // Open loop: connection k sends requests k, k + conns, k + 2·conns, ...
            let period = rate.map(|r| Duration::from_secs_f64(conns as f64 / r));
            let mut next = started
                + rate
                    .map(|r| Duration::from_secs_f64(k as f64 / r))
                    .unwrap_or_default();
            loop {
                if let Some(period) = period {
                    if next >= end {
                        break;
                    }
                    tokio::time::sleep_until(next).await;
                    next += period;
                } else if tokio::time::Instant::now() >= end {
                    break;
                }
                let t0 = Instant::now();
                match post(&mut sender, bodies()).await {
                    Ok(202) => {
                        load.accepted += 1;
                        load.latencies_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
                    }
                    Ok(status) => *load.other.entry(status).or_default() += 1,
                    Err(_) => {
                        load.errors += 1;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        match connect(addr).await {
                            Ok(s) => sender = s,
                            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                        }
                    }
                }
            }
            load
        });
    }
    let mut total = Load::default();
    while let Some(done) = tasks.join_next().await {
        total.merge(done?);
    }
    total.elapsed = started.elapsed();
    Ok(total)
}
