//! `make bench` (`cargo bench --bench outboxd`): outboxd's speed, each figure side by
//! side with a reference measured in the same run on the same machine.
//!
//! - ingest: the release `outboxd ingest` under 32 kept-alive connections of signed
//!   webhooks, against pgbench running the same SQL statement at 32 clients (A/B/A/B);
//! - relay drain: a 100k-row backlog (one aggregate per row) drained by 1, 2 and 4
//!   relays, each against a raw MongoDB loop writing the same documents with the same
//!   command shape and concurrency;
//! - lag: commit-to-apply lag at about half the lower of the two maxima;
//! - claim: one claim's latency at a 10k and at a 1M pending backlog;
//! - memory: a relay's peak RSS while draining 100k and 1M rows.
//!
//! `BENCH_SCALE=small` is the quick run; see docs/benchmarks.md. Without `--bench`
//! (as `cargo test --all-targets` runs it) only a few-second smoke runs.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use mongodb::bson::{Document, doc};
use outboxd::outbox::Claimed;
use serde_json::{Map, Value, json};
use support::{Ctx, Proc};

const BIN: &str = env!("CARGO_BIN_EXE_outboxd");
/// Concurrent connections (ingest) and clients (pgbench).
const CONNS: usize = 32;
const COLLECTION: &str = "creditor_debts";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scale {
    Smoke,
    Small,
    Full,
}

impl Scale {
    fn name(self) -> &'static str {
        match self {
            Scale::Smoke => "smoke",
            Scale::Small => "small",
            Scale::Full => "full",
        }
    }
}

/// Sizes and durations of one scale.
#[derive(Debug, Clone)]
struct Plan {
    scale: Scale,
    ingest_secs: u64,
    ingest_rounds: usize,
    warmup_secs: f64,
    drain_rows: i64,
    relay_counts: Vec<usize>,
    /// Alternating relay/raw pairs per relay count; the figures are their medians.
    drain_pairs: usize,
    /// Rows per candidate of the relay-setting sweep; 0 skips the sweep.
    tune_rows: i64,
    tune_candidates: usize,
    lag_secs: f64,
    lag_relays: usize,
    /// How long the whole pipeline runs flat out to find the lag phase's maximum.
    pipeline_secs: f64,
    claim_small: i64,
    claim_large: i64,
    claim_reps: usize,
    /// Pending backlogs at which one relay's peak RSS is taken, and for how long it drains.
    rss_small: i64,
    rss_large: i64,
    rss_secs: f64,
    /// Whether pgbench may be installed with apt-get when missing.
    install_pgbench: bool,
    /// The update workload: documents preloaded, and backlog rows (benches/update.rs).
    update_docs: i64,
    update_rows: i64,
}

impl Plan {
    fn new(scale: Scale) -> Plan {
        match scale {
            // Exercises every moving part for a few seconds; lag and memory skipped.
            Scale::Smoke => Plan {
                scale,
                ingest_secs: 2,
                ingest_rounds: 1,
                warmup_secs: 0.3,
                drain_rows: 30,
                relay_counts: vec![1],
                drain_pairs: 1,
                tune_rows: 0,
                tune_candidates: 0,
                lag_secs: 0.0,
                lag_relays: 1,
                pipeline_secs: 0.0,
                claim_small: 200,
                claim_large: 2_000,
                claim_reps: 5,
                rss_small: 0,
                rss_large: 0,
                rss_secs: 0.0,
                install_pgbench: false,
                update_docs: 200,
                update_rows: 100,
            },
            Scale::Small => Plan {
                scale,
                ingest_secs: 5,
                ingest_rounds: 2,
                warmup_secs: 1.0,
                drain_rows: 10_000,
                relay_counts: vec![1, 2, 4],
                drain_pairs: 2,
                tune_rows: 0,
                tune_candidates: 0,
                lag_secs: 8.0,
                lag_relays: 1,
                pipeline_secs: 5.0,
                claim_small: 10_000,
                claim_large: 100_000,
                claim_reps: 30,
                rss_small: 10_000,
                rss_large: 100_000,
                rss_secs: 3.0,
                install_pgbench: true,
                update_docs: 20_000,
                update_rows: 10_000,
            },
            Scale::Full => Plan {
                scale,
                ingest_secs: 15,
                ingest_rounds: 3,
                warmup_secs: 2.0,
                drain_rows: 100_000,
                relay_counts: vec![1, 2, 4],
                drain_pairs: 3,
                tune_rows: 10_000,
                tune_candidates: 9,
                lag_secs: 30.0,
                lag_relays: 1,
                pipeline_secs: 10.0,
                claim_small: 10_000,
                claim_large: 1_000_000,
                claim_reps: 50,
                rss_small: 100_000,
                rss_large: 1_000_000,
                rss_secs: 20.0,
                install_pgbench: true,
                update_docs: 100_000,
                update_rows: 30_000,
            },
        }
    }
}

/// The relay knobs the benchmark turns (`OUTBOXD__RELAY__*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Setting {
    workers: usize,
    batch: i64,
    conc: usize,
}

impl Setting {
    /// The built-in defaults of src/config.rs, overridden by BENCH_RELAY_* variables.
    fn configured() -> (Setting, bool) {
        let d = outboxd::config::RelayConfig::default();
        let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<i64>().ok());
        let fixed = [
            "BENCH_RELAY_WORKERS",
            "BENCH_RELAY_BATCH_SIZE",
            "BENCH_RELAY_WRITE_CONCURRENCY",
        ]
        .iter()
        .any(|n| std::env::var_os(n).is_some());
        let s = Setting {
            workers: var("BENCH_RELAY_WORKERS").map_or(d.workers, |v| v.max(1) as usize),
            batch: var("BENCH_RELAY_BATCH_SIZE").unwrap_or(d.batch_size).max(1),
            conc: var("BENCH_RELAY_WRITE_CONCURRENCY")
                .map_or(d.write_concurrency, |v| v.max(1) as usize),
        };
        (s, fixed)
    }

    fn env(&self) -> Vec<(String, String)> {
        vec![
            ("OUTBOXD__RELAY__WORKERS".into(), self.workers.to_string()),
            ("OUTBOXD__RELAY__BATCH_SIZE".into(), self.batch.to_string()),
            (
                "OUTBOXD__RELAY__WRITE_CONCURRENCY".into(),
                self.conc.to_string(),
            ),
        ]
    }

    fn label(&self) -> String {
        format!(
            "workers={} batch_size={} write_concurrency={}",
            self.workers, self.batch, self.conc
        )
    }

    fn json(&self) -> Value {
        json!({"workers": self.workers, "batch_size": self.batch, "write_concurrency": self.conc})
    }
}

fn started() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

macro_rules! say {
    ($($arg:tt)*) => {
        eprintln!("[bench {:6.1}s] {}", started().elapsed().as_secs_f64(), format_args!($($arg)*))
    };
}

// After `say!`, which they use.
mod peers;
mod plot;
mod update;

/// The report under construction: flat figures plus nested details.
#[derive(Default)]
struct Report {
    figures: Map<String, Value>,
    details: Map<String, Value>,
    errors: Vec<String>,
}

impl Report {
    fn set(&mut self, key: &str, value: impl Into<Value>) {
        self.figures.insert(key.into(), value.into());
    }

    fn num(&self, key: &str) -> Option<f64> {
        self.figures.get(key).and_then(Value::as_f64)
    }

    fn detail(&mut self, key: &str, value: Value) {
        self.details.insert(key.into(), value);
    }
}

fn rnd(x: f64, places: i32) -> f64 {
    let f = 10f64.powi(places);
    (x * f).round() / f
}

fn opt(x: Option<f64>, places: i32) -> Value {
    x.filter(|v| v.is_finite())
        .map_or(Value::Null, |v| json!(rnd(v, places)))
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn main() -> ExitCode {
    let bench = std::env::args().any(|a| a == "--bench");
    let scale = if bench {
        match std::env::var("BENCH_SCALE").unwrap_or_default().as_str() {
            "" | "full" => Scale::Full,
            "small" => Scale::Small,
            "smoke" => Scale::Smoke,
            other => {
                eprintln!("bench: unknown BENCH_SCALE={other:?} (full, small or smoke)");
                return ExitCode::FAILURE;
            }
        }
    } else {
        // `cargo test --all-targets`: a few-second smoke, only with the services up.
        if std::env::var("BENCH_SMOKE").is_ok_and(|v| v == "0")
            || std::env::var_os("DATABASE_URL").is_none()
        {
            eprintln!("bench: smoke skipped (no --bench; DATABASE_URL unset or BENCH_SMOKE=0)");
            return ExitCode::SUCCESS;
        }
        Scale::Smoke
    };
    started();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut plan = Plan::new(scale);
    if let Some(rows) = std::env::var("BENCH_DRAIN_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        plan.drain_rows = rows;
    }
    if let Some(pairs) = std::env::var("BENCH_DRAIN_PAIRS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        plan.drain_pairs = pairs.max(1);
    }
    let ok = runtime.block_on(run(plan, bench));
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// FerretDB's SQLite backend pushes no filter down for a string `_id`: every update
/// (the relay's guarded upsert included) scans the whole collection, so updates are
/// quadratic in the number of documents (measured: ~50 rows/s at 300 documents,
/// ~7 rows/s at 1000). The relay now inserts first-seen aggregates, which the
/// drain's distinct aggregates all are, so the caps below no longer bite.
async fn sink_limits(ctx: &Ctx, plan: &mut Plan, report: &mut Report) {
    let info = ctx
        .mongo
        .database("admin")
        .run_command(doc! {"buildInfo": 1})
        .await
        .ok();
    let ferret = info
        .as_ref()
        .and_then(|d| d.get_str("ferretdbVersion").ok().map(str::to_owned));
    let overridden = std::env::var_os("BENCH_DRAIN_ROWS").is_some();
    let mut note = Value::Null;
    if let Some(version) = &ferret
        && !overridden
    {
        // Since the relay inserts first-seen aggregates, FerretDB drains the full
        // backlogs; only the smoke run stays tiny.
        let cap = match plan.scale {
            Scale::Smoke => 30,
            Scale::Small => 10_000,
            Scale::Full => 100_000,
        };
        if plan.drain_rows > cap {
            note = json!(format!(
                "MongoDB is FerretDB {version}: its SQLite backend scans the whole collection for every \
                 update with a string _id (no filter pushdown), so a drain is quadratic; \
                 drain backlogs capped from {} to {cap} rows (BENCH_DRAIN_ROWS overrides)",
                plan.drain_rows
            ));
            say!("{}", note.as_str().unwrap_or_default());
            plan.drain_rows = cap;
            plan.tune_rows = plan.tune_rows.min(cap);
            plan.tune_candidates = plan.tune_candidates.min(4);
        }
    }
    report.detail(
        "sink",
        json!({"ferretdb": ferret, "drain_rows": plan.drain_rows, "note": note}),
    );
}

fn out_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("bench")
}

async fn run(mut plan: Plan, bench: bool) -> bool {
    let out = out_dir();
    let _ = std::fs::remove_dir_all(out.join("logs"));
    if let Err(e) = std::fs::create_dir_all(out.join("logs")) {
        eprintln!("bench: cannot create {}: {e}", out.display());
        return false;
    }
    let ctx = match Ctx::new(out.clone()).await {
        Ok(ctx) => Arc::new(ctx),
        Err(e) => {
            eprintln!("bench: {e:#}");
            return false;
        }
    };
    say!(
        "scale {} · run {} · binary {}",
        plan.scale.name(),
        ctx.run,
        BIN
    );
    let mut report = Report::default();
    sink_limits(&ctx, &mut plan, &mut report).await;
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("bench: cannot watch SIGTERM: {e}");
            return false;
        }
    };
    let interrupted = tokio::select! {
        _ = phases(&ctx, &plan, &mut report) => false,
        _ = tokio::signal::ctrl_c() => true,
        _ = term.recv() => true,
    };
    if interrupted {
        report.errors.push("interrupted".into());
        say!("interrupted; cleaning up");
    }
    ctx.cleanup().await;
    if plan.scale != Scale::Smoke {
        match plot::write(&out, &plan, &report) {
            Ok(paths) => paths.iter().for_each(|p| say!("wrote {}", p.display())),
            Err(e) => report.errors.push(format!("plots: {e:#}")),
        }
    }
    let doc = finish(&ctx, &plan, &mut report).await;
    let name = if bench && plan.scale != Scale::Smoke {
        "report.json"
    } else {
        "smoke-report.json"
    };
    let path = out.join(name);
    match std::fs::write(&path, serde_json::to_string_pretty(&doc).unwrap() + "\n") {
        Ok(()) => say!("wrote {}", path.display()),
        Err(e) => report
            .errors
            .push(format!("cannot write {}: {e}", path.display())),
    }
    println!("{}", table(&plan, &report));
    for e in &report.errors {
        eprintln!("bench: ERROR: {e}");
    }
    report.errors.is_empty()
}

async fn phases(ctx: &Arc<Ctx>, plan: &Plan, report: &mut Report) {
    macro_rules! phase {
        ($name:literal, $e:expr) => {{
            let t = Instant::now();
            say!("== {} ==", $name);
            let r = $e.await;
            say!("== {} done in {:.1}s ==", $name, t.elapsed().as_secs_f64());
            if let Err(e) = &r {
                report.errors.push(format!("{}: {e:#}", $name));
            }
            r
        }};
    }
    // BENCH_ONLY=ingest,drain,lag,claim runs a subset (for investigating one figure).
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let wanted = |name: &str| only.is_empty() || only.split(',').any(|o| o.trim() == name);
    if std::env::var_os("BENCH_PROBE_MONGO").is_some() {
        let _ = phase!("probe", probe_mongo(ctx, plan));
        return;
    }
    if wanted("ingest") {
        let _ = phase!("ingest", phase_ingest(ctx, plan, report));
    }
    let (configured, _) = Setting::configured();
    let mut setting = configured;
    if wanted("drain")
        && let Ok(s) = phase!("drain", phase_drain(ctx, plan, report))
    {
        setting = s;
    }
    if wanted("lag") && plan.lag_secs > 0.0 {
        let _ = phase!("lag", phase_lag(ctx, plan, report, setting));
    }
    if wanted("update") {
        let _ = phase!("update", update::phase_update(ctx, plan, report, setting));
        if plan.lag_secs > 0.0 {
            let _ = phase!(
                "update lag",
                update::phase_update_lag(ctx, plan, report, setting)
            );
        }
    }
    // The peers install themselves from npm and PyPI: not in the smoke run.
    let peers = std::env::var("BENCH_PEERS").map_or(true, |v| v != "0");
    if wanted("peers") && peers && plan.scale != Scale::Smoke {
        let _ = phase!("peers", peers::phase_peers(ctx, plan, report));
    }
    if wanted("claim") {
        let _ = phase!(
            "claim+memory",
            phase_claim_memory(ctx, plan, report, setting)
        );
    }
}

// --------------------------------------------------------------------- ingest

struct IngestRound {
    rps: f64,
    p50: Option<f64>,
    p99: Option<f64>,
    cpu: Value,
}

async fn phase_ingest(ctx: &Ctx, plan: &Plan, report: &mut Report) -> anyhow::Result<()> {
    let pgbench = match find_pgbench(plan.install_pgbench) {
        Ok(p) => Some(p),
        Err(e) => {
            if plan.scale != Scale::Smoke {
                report.errors.push(format!("pgbench: {e:#}"));
            }
            say!("pgbench unavailable: {e:#}");
            None
        }
    };
    let script = ctx.out.join("pgbench-enqueue.sql");
    std::fs::write(&script, pgbench_script())?;
    let mut ingest = Vec::new();
    let mut pg = Vec::new();
    for round in 0..plan.ingest_rounds {
        let r = ingest_round(ctx, plan, round).await?;
        say!(
            "ingest round {round}: {:.0} accepted/s, p50 {:.2} ms, p99 {:.2} ms",
            r.rps,
            r.p50.unwrap_or(f64::NAN),
            r.p99.unwrap_or(f64::NAN)
        );
        ingest.push(r);
        if let Some(pgbench) = &pgbench {
            let r = pgbench_round(ctx, plan, pgbench, &script, round).await?;
            say!(
                "pgbench round {round}: {:.0} tps, p50 {:.2} ms, p99 {:.2} ms",
                r.rps,
                r.p50.unwrap_or(f64::NAN),
                r.p99.unwrap_or(f64::NAN)
            );
            pg.push(r);
        }
    }
    let med = |v: &[IngestRound], f: fn(&IngestRound) -> Option<f64>| {
        support::median(&v.iter().filter_map(f).collect::<Vec<_>>())
    };
    let ingest_rps = med(&ingest, |r| Some(r.rps));
    let pgbench_tps = med(&pg, |r| Some(r.rps));
    report.set("ingest_rps", opt(ingest_rps, 1));
    report.set("pgbench_tps", opt(pgbench_tps, 1));
    report.set("ingest_ratio", opt(ratio(ingest_rps, pgbench_tps), 3));
    report.set("ingest_p50_ms", opt(med(&ingest, |r| r.p50), 3));
    report.set("ingest_p99_ms", opt(med(&ingest, |r| r.p99), 3));
    report.set("pgbench_p50_ms", opt(med(&pg, |r| r.p50), 3));
    report.set("pgbench_p99_ms", opt(med(&pg, |r| r.p99), 3));
    let rounds = |v: &[IngestRound]| -> Vec<Value> {
        v.iter()
            .map(|r| json!({"rate": rnd(r.rps, 1), "p50_ms": opt(r.p50, 3), "p99_ms": opt(r.p99, 3), "cpu": r.cpu}))
            .collect()
    };
    report.detail(
        "ingest",
        json!({
            "connections": CONNS,
            "seconds_per_round": plan.ingest_secs,
            "warmup_s": plan.warmup_secs,
            "order": "ingest, pgbench, ingest, pgbench, ... (fresh database each round)",
            "ingest_rounds": rounds(&ingest),
            "pgbench_rounds": rounds(&pg),
            "pgbench": pgbench.map(|p| p.display().to_string()),
            "pgbench_args": format!("-n -M prepared -c {CONNS} -j 2 -T {} -f pgbench-enqueue.sql", plan.ingest_secs),
        }),
    );
    Ok(())
}

async fn ingest_round(ctx: &Ctx, plan: &Plan, round: usize) -> anyhow::Result<IngestRound> {
    let db = ctx.fresh_db("ingest").await?;
    let result: anyhow::Result<IngestRound> = async {
        let addr = SocketAddr::from(([127, 0, 0, 1], support::free_port()));
        let mut ingest = Proc::spawn(
            Path::new(BIN),
            &["ingest", "--listen", &addr.to_string()],
            &ctx.child_env(&db, "bench_unused"),
            &ctx.log_path(&format!("ingest-{round}")),
        )?;
        support::wait_listening(addr, Duration::from_secs(15)).await?;
        ingest.check_running("ingest")?;
        support::run_load(addr, CONNS, Duration::from_secs_f64(plan.warmup_secs), None).await?;
        let (busy0, total0) = support::machine_cpu_s();
        let ingest0 = ingest.cpu_s().unwrap_or(0.0);
        let self0 = support::self_cpu_s();
        let mut load =
            support::run_load(addr, CONNS, Duration::from_secs(plan.ingest_secs), None).await?;
        let (busy1, total1) = support::machine_cpu_s();
        let ingest_cpu = ingest.cpu_s().unwrap_or(0.0) - ingest0;
        let loadgen_cpu = support::self_cpu_s() - self0;
        ingest.check_running("ingest")?;
        ingest.terminate(Duration::from_secs(10));
        if load.accepted == 0 {
            bail!(
                "no webhook was accepted (other answers {:?}, errors {}); see {}",
                load.other,
                load.errors,
                ctx.log_path(&format!("ingest-{round}")).display()
            );
        }
        if !load.other.is_empty() || load.errors > 0 {
            say!(
                "ingest round {round}: besides 202s: {:?}, {} connection errors",
                load.other,
                load.errors
            );
        }
        let n = load.accepted as f64;
        let busy = busy1 - busy0;
        let cpu = json!({
            "machine_busy_pct": rnd(100.0 * busy / (total1 - total0).max(1e-9), 1),
            "ingest_us_per_req": rnd(ingest_cpu / n * 1e6, 1),
            "loadgen_us_per_req": rnd(loadgen_cpu / n * 1e6, 1),
            "postgres_and_rest_us_per_req": rnd((busy - ingest_cpu - loadgen_cpu) / n * 1e6, 1),
            "other_answers": format!("{:?}", load.other),
            "errors": load.errors,
        });
        Ok(IngestRound {
            rps: load.rps(),
            p50: load.latency(0.50),
            p99: load.latency(0.99),
            cpu,
        })
    }
    .await;
    ctx.drop_db(&db).await;
    result
}

/// pgbench's script: `outbox::ENQUEUE` itself, its parameters replaced by pgbench
/// expressions giving the same values, lengths and distinctness as the load
/// generator's. pgbench takes `:name` as a variable even inside a quoted literal,
/// so no literal here has a colon before a letter or digit.
fn pgbench_script() -> String {
    let key = "'update_creditor_debt:' || 'MP-' || :r::text || '/K-99812:' || '92bb92c4cd9d0363'";
    let params = [
        key,
        "'evt-bench-' || :r::text",
        "86400::float8",
        ":ticket::int8",
        "'<bench-' || :r::text || '@mail.sparkasse.example>'",
        "'forderungen@sparkasse.example'",
        "'Forderungsaufstellung Ihr Zeichen MP-' || :r::text",
        "'Sehr geehrte Damen und Herren, die Forderung beträgt 1.234,56 €.'",
        "to_timestamp(1795857300)",
        "'update_creditor_debt'",
        "'MP-' || :r::text || '/K-99812'",
        "jsonb_build_object('client_reference', 'MP-' || :r::text, 'creditor_name', 'Sparkasse KölnBonn', \
         'amount', :euros::text || '.' || lpad(:cents::text, 2, '0'), 'currency', 'EUR', \
         'creditor_reference', 'K-99812')",
    ];
    let mut sql = outboxd::outbox::ENQUEUE.to_owned();
    // Highest first, so that $1 does not eat the start of $10..$12.
    for (i, value) in params.iter().enumerate().rev() {
        sql = sql.replace(&format!("${}", i + 1), &format!("({value})"));
    }
    format!(
        "\\set r random(1, 9000000000000000000)\n\\set ticket :r % 1000000000 + 1\n\\set euros :r % 100000\n\\set cents :r % 100\n{};\n",
        sql.trim()
    )
}

/// pgbench: the server's own (highest version), else PATH, else apt-get (when allowed).
fn find_pgbench(install: bool) -> anyhow::Result<PathBuf> {
    let works = |p: &Path| {
        std::process::Command::new(p)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let find = || -> Option<PathBuf> {
        let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let v = e.file_name().to_str()?.parse::<u32>().ok()?;
                let p = e.path().join("bin/pgbench");
                p.is_file().then_some((v, p))
            })
            .collect();
        found.sort();
        if let Some((_, p)) = found.pop().filter(|(_, p)| works(p)) {
            return Some(p);
        }
        let p = PathBuf::from("pgbench");
        works(&p).then_some(p)
    };
    if let Some(p) = find() {
        return Ok(p);
    }
    if !install {
        bail!("pgbench not found");
    }
    say!("pgbench not found; installing postgresql-contrib with apt-get");
    let sudo = |args: &[&str]| {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let mut cmd = std::process::Command::new(if root { "apt-get" } else { "sudo" });
        if !root {
            cmd.args(["-n", "apt-get"]);
        }
        cmd.args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
    };
    let _ = sudo(&["update", "-qq"]);
    let status = sudo(&["install", "-y", "-qq", "postgresql-contrib"])?;
    if !status.success() {
        bail!("apt-get install postgresql-contrib failed ({status})");
    }
    find().context("pgbench still not found after installing postgresql-contrib")
}

async fn pgbench_round(
    ctx: &Ctx,
    plan: &Plan,
    pgbench: &Path,
    script: &Path,
    round: usize,
) -> anyhow::Result<IngestRound> {
    let db = ctx.fresh_db("pgbench").await?;
    let result: anyhow::Result<IngestRound> = async {
        let pg: tokio_postgres::Config = ctx.db_url(&db).parse()?;
        let mut cmd = tokio::process::Command::new(pgbench);
        if let Some(tokio_postgres::config::Host::Tcp(h)) = pg.get_hosts().first() {
            cmd.env("PGHOST", h);
        }
        if let Some(port) = pg.get_ports().first() {
            cmd.env("PGPORT", port.to_string());
        }
        if let Some(user) = pg.get_user() {
            cmd.env("PGUSER", user);
        }
        if let Some(pw) = pg.get_password() {
            cmd.env("PGPASSWORD", String::from_utf8_lossy(pw).to_string());
        }
        let prefix = ctx.out.join("logs").join(format!("pgbench-{round}"));
        cmd.env("PGCLIENTENCODING", "UTF8")
            .args([
                "-n",
                "-M",
                "prepared",
                "-c",
                CONNS.to_string().as_str(),
                "-j",
                "2",
            ])
            .args(["-T", plan.ingest_secs.to_string().as_str()])
            .arg(format!("--random-seed={}", fastrand::u32(..)))
            .arg("-f")
            .arg(script)
            .arg("-l")
            .arg(format!("--log-prefix={}", prefix.display()))
            .arg(&db);
        let (busy0, total0) = support::machine_cpu_s();
        let child0 = support::children_cpu_s();
        let output = cmd.output().await.context("cannot run pgbench")?;
        let (busy1, total1) = support::machine_cpu_s();
        let pgbench_cpu = support::children_cpu_s() - child0;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            bail!(
                "pgbench failed ({}): {}{}",
                output.status,
                stdout,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let field = |prefix: &str| {
            stdout
                .lines()
                .find_map(|l| l.trim().strip_prefix(prefix))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|x| x.parse::<f64>().ok())
        };
        let tps =
            field("tps = ").with_context(|| format!("no tps in pgbench's output:\n{stdout}"))?;
        let processed = field("number of transactions actually processed:").unwrap_or(0.0);
        let failed = field("number of failed transactions:").unwrap_or(0.0);
        if failed > 0.0 {
            bail!("pgbench: {failed} failed transactions:\n{stdout}");
        }
        // Per-transaction log: client, transaction, latency (µs), ...
        let mut lat = Vec::new();
        let stem = prefix.file_name().unwrap().to_string_lossy().to_string();
        for entry in std::fs::read_dir(prefix.parent().unwrap())?.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if !name.starts_with(&format!("{stem}.")) {
                continue;
            }
            let text = std::fs::read_to_string(entry.path())?;
            lat.extend(
                text.lines()
                    .filter_map(|l| l.split_whitespace().nth(2)?.parse::<f64>().ok())
                    .map(|us| us / 1000.0),
            );
            let _ = std::fs::remove_file(entry.path());
        }
        lat.sort_by(f64::total_cmp);
        let n = processed.max(1.0);
        let busy = busy1 - busy0;
        Ok(IngestRound {
            rps: tps,
            p50: support::quantile(&lat, 0.50),
            p99: support::quantile(&lat, 0.99),
            cpu: json!({
                "machine_busy_pct": rnd(100.0 * busy / (total1 - total0).max(1e-9), 1),
                "pgbench_us_per_tx": rnd(pgbench_cpu / n * 1e6, 1),
                "postgres_and_rest_us_per_tx": rnd((busy - pgbench_cpu) / n * 1e6, 1),
            }),
        })
    }
    .await;
    ctx.drop_db(&db).await;
    result
}

// ---------------------------------------------------------------------- drain

/// Inserts pending rows `from..=to` directly, one distinct aggregate each, shaped like
/// ingest's rows, then VACUUM ANALYZE (as autovacuum would, but before the clock runs).
async fn insert_backlog(client: &tokio_postgres::Client, from: i64, to: i64) -> anyhow::Result<()> {
    insert_rows(client, from, to, false).await
}

/// Inserts rows `from..=to`, due now or, with `backing_off`, each after a failed
/// attempt and due only in a day.
async fn insert_rows(
    client: &tokio_postgres::Client,
    from: i64,
    to: i64,
    backing_off: bool,
) -> anyhow::Result<()> {
    let (attempts, next_attempt_at) = if backing_off {
        ("1", "now() + interval '1 day'")
    } else {
        ("0", "now()")
    };
    let chunk = 100_000;
    let mut lo = from;
    while lo <= to {
        let hi = (lo + chunk - 1).min(to);
        client
            .batch_execute(&format!(
                "BEGIN;
                 INSERT INTO incoming_emails (id, webhook_id, ticket_id, message_id, from_address, subject, body, received_at)
                 SELECT i, 'evt-backlog-' || i, 100000 + i, '<backlog-' || i || '@mail.sparkasse.example>',
                        'forderungen@sparkasse.example', 'Forderungsaufstellung Ihr Zeichen MP-B' || i,
                        'Sehr geehrte Damen und Herren, die Forderung beträgt 1.234,56 €.',
                        '2026-11-28T09:15:00Z'
                 FROM generate_series({lo}::int8, {hi}::int8) AS i;
                 INSERT INTO outbox_messages (id, operation, aggregate_id, payload, email_id, idempotency_key,
                                              attempts, next_attempt_at)
                 SELECT i, 'update_creditor_debt', 'MP-B' || i || '/K-' || i,
                        jsonb_build_object('client_reference', 'MP-B' || i, 'creditor_name', 'Sparkasse KölnBonn',
                                           'amount', (i % 100000) || '.' || lpad((i % 100)::text, 2, '0'),
                                           'currency', 'EUR', 'creditor_reference', 'K-' || i),
                        i, 'update_creditor_debt:MP-B' || i || '/K-' || i || ':' || substr(md5(i::text), 1, 16),
                        {attempts}, {next_attempt_at}
                 FROM generate_series({lo}::int8, {hi}::int8) AS i;
                 COMMIT;"
            ))
            .await
            .context("inserting the backlog")?;
        lo = hi + 1;
    }
    client
        .batch_execute(&format!(
            "SELECT setval('incoming_emails_id_seq', {to}); SELECT setval('outbox_messages_id_seq', {to});"
        ))
        .await?;
    client
        .batch_execute("VACUUM (ANALYZE) incoming_emails")
        .await?;
    client
        .batch_execute("VACUUM (ANALYZE) outbox_messages")
        .await?;
    Ok(())
}

async fn backlog_db(ctx: &Ctx, tag: &str, rows: i64) -> anyhow::Result<String> {
    let db = ctx.fresh_db(tag).await?;
    let client = ctx.pg(&db).await?;
    insert_backlog(&client, 1, rows).await?;
    Ok(db)
}

/// The claimed form of every pending row (what the relay hands to MongoDB), in id order.
async fn load_rows(ctx: &Ctx, db: &str) -> anyhow::Result<Vec<Claimed>> {
    let client = ctx.pg(db).await?;
    let rows = client
        .query(
            // The claim's columns, and its `known` (src/outbox.rs, CLAIM).
            "SELECT o.id, o.operation, o.aggregate_id, o.payload, o.email_id, o.idempotency_key,
                    o.attempts, o.created_at, e.ticket_id, e.webhook_id, NULL,
                    EXISTS (SELECT 1 FROM outbox_messages p
                            WHERE p.aggregate_id = o.aggregate_id AND p.status = 'synced')
             FROM outbox_messages o JOIN incoming_emails e ON e.id = o.email_id
             WHERE o.status = 'pending' ORDER BY o.id",
            &[],
        )
        .await?;
    Ok(rows.iter().map(Claimed::from_row).collect())
}

struct DrainRun {
    rps: f64,
    secs: f64,
    /// Peak RSS of each relay, KiB.
    rss_kib: Vec<u64>,
    relay_cpu_s: f64,
    /// CPU of the outbox's PostgreSQL cluster over the drain (all its processes).
    pg_cpu_s: Option<f64>,
}

async fn pending_or_held(client: &tokio_postgres::Client) -> anyhow::Result<(i64, i64, i64)> {
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM outbox_messages WHERE status = 'pending'),
                    (SELECT count(*) FROM outbox_messages WHERE status = 'processing'),
                    (SELECT count(*) FROM outbox_messages WHERE status = 'failed')",
            &[],
        )
        .await?;
    Ok((row.get(0), row.get(1), row.get(2)))
}

/// What a drain writes into: documents preloaded before the clock starts, and
/// how many the collection holds once every row is applied.
#[derive(Clone, Copy, Debug)]
struct Target {
    preload: i64,
    docs: i64,
}

impl Target {
    /// An empty collection, and a document per row (the insert workload).
    fn empty(rows: i64) -> Target {
        Target {
            preload: 0,
            docs: rows,
        }
    }
}

/// Starts `procs` relays on a backlog database and times them until every row is synced.
async fn relay_drain(
    ctx: &Ctx,
    db: &str,
    rows: i64,
    setting: Setting,
    procs: usize,
    tag: &str,
    target: Target,
) -> anyhow::Result<DrainRun> {
    let mongo = ctx.fresh_mongo(tag);
    let result: anyhow::Result<DrainRun> = async {
        update::preload(ctx, &mongo, target.preload).await?;
        let client = ctx.pg(db).await?;
        // The backlog's bulk insert would otherwise leave its checkpoint to run
        // during the drain, a cost that the raw loop never pays.
        if let Err(e) = client.batch_execute("CHECKPOINT").await {
            say!("no CHECKPOINT before the drain ({e}); the backlog's may still be running");
        }
        // The poll must stay cheap as synced rows pile up: walk the partial indexes.
        client.batch_execute("SET enable_seqscan = off").await?;
        let mut env = ctx.child_env(db, &mongo);
        env.extend(setting.env());
        let postmaster = support::postmaster_pid(&client).await?;
        let pg_cpu = support::PgCpuWatch::start(postmaster, db);
        let t0 = Utc::now();
        let clock = Instant::now();
        let mut relays = Vec::new();
        for i in 0..procs {
            relays.push(Proc::spawn(
                Path::new(BIN),
                &["relay", "--id", &format!("bench-{tag}-{i}")],
                &env,
                &ctx.log_path(&format!("relay-{tag}-{procs}x-{i}")),
            )?);
        }
        let timeout = Duration::from_secs_f64(120.0 + rows as f64 / 100.0);
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let done: bool = client
                .query_one(
                    "SELECT NOT EXISTS (SELECT 1 FROM outbox_messages WHERE status = 'pending')
                        AND NOT EXISTS (SELECT 1 FROM outbox_messages WHERE status = 'processing')",
                    &[],
                )
                .await?
                .get(0);
            if done {
                break;
            }
            for (i, r) in relays.iter_mut().enumerate() {
                r.check_running(&format!("relay {i}"))?;
            }
            if clock.elapsed() > timeout {
                let (p, h, f) = pending_or_held(&client).await?;
                bail!("not drained after {timeout:?}: {p} pending, {h} processing, {f} failed");
            }
        }
        // The last mark's own clock, not the poll's: no polling granularity.
        let last: DateTime<Utc> = client
            .query_one(
                "SELECT max(synced_at) FROM outbox_messages WHERE status = 'synced'",
                &[],
            )
            .await?
            .get(0);
        let secs = (last - t0).num_microseconds().unwrap_or(0) as f64 / 1e6;
        let pg_cpu_s = Some(pg_cpu.stop());
        let rss_kib: Vec<u64> = relays.iter().filter_map(Proc::peak_rss_kib).collect();
        let relay_cpu_s: f64 = relays.iter().filter_map(Proc::cpu_s).sum();
        for r in &mut relays {
            r.terminate(Duration::from_secs(10));
        }
        let (p, h, f) = pending_or_held(&client).await?;
        let synced: i64 = client
            .query_one(
                "SELECT count(*) FROM outbox_messages WHERE status = 'synced'",
                &[],
            )
            .await?
            .get(0);
        // Preloaded documents have a synced row each, as earlier messages left them.
        if synced != rows + target.preload || p + h + f > 0 {
            bail!("after the drain: {synced} synced of {rows} (and {} synced before), {p} pending, {h} processing, {f} failed", target.preload);
        }
        let docs = ctx
            .mongo
            .database(&mongo)
            .collection::<Document>(COLLECTION)
            .estimated_document_count()
            .await?;
        if docs as i64 != target.docs {
            bail!("MongoDB holds {docs} documents, expected {}", target.docs);
        }
        update::check_newest(ctx, &mongo, &update::newest_in(&client).await?).await?;
        Ok(DrainRun {
            rps: rows as f64 / secs.max(1e-6),
            secs,
            rss_kib,
            relay_cpu_s,
            pg_cpu_s,
        })
    }
    .await;
    ctx.drop_mongo(&mongo).await;
    result
}

/// One run of the raw MongoDB loop.
struct RawRun {
    rps: f64,
    cpu_s: f64,
    /// Writes that failed for now and were tried again.
    retried: usize,
}

/// The reference: the same documents written straight to MongoDB by this process,
/// through the relay's own sink (`outboxd::mongo::Sink::apply`: one unordered
/// insert of the aggregates it has not seen, a guarded update for the others,
/// `write_concurrency` at a time) and with its concurrency: `procs` clients ×
/// `workers` loops, each taking batches of `batch_size`. No PostgreSQL.
async fn raw_drain(
    ctx: &Ctx,
    rows: Arc<Vec<Claimed>>,
    setting: Setting,
    procs: usize,
    target: Target,
) -> anyhow::Result<RawRun> {
    let mongo = ctx.fresh_mongo("raw");
    let result: anyhow::Result<RawRun> = async {
        update::preload(ctx, &mongo, target.preload).await?;
        let cursor = Arc::new(AtomicUsize::new(0));
        let mut dbs = Vec::new();
        let mut sinks = Vec::new();
        for _ in 0..procs {
            let client = mongodb::Client::with_uri_str(ctx.mongo_db_url(&mongo)).await?;
            dbs.push(client.database(&mongo));
            let config = outboxd::config::MongoConfig {
                url: ctx.mongo_db_url(&mongo).into(),
                ..Default::default()
            };
            sinks.push(outboxd::mongo::connect(&config).await?);
        }
        let cpu0 = support::self_cpu_s();
        let t0 = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for sink in &sinks {
            for _ in 0..setting.workers {
                let (sink, rows, cursor) = (sink.clone(), rows.clone(), cursor.clone());
                tasks.spawn(async move {
                    use outboxd::mongo::Outcome;
                    let batch = setting.batch as usize;
                    let mut retried = 0usize;
                    loop {
                        let start = cursor.fetch_add(batch, Ordering::Relaxed);
                        if start >= rows.len() {
                            return Ok::<_, anyhow::Error>(retried);
                        }
                        let mut todo = rows[start..(start + batch).min(rows.len())].to_vec();
                        // Like the relay, a writer retries what failed for now
                        // (a timeout under load, say); the retries count in its time.
                        for attempt in 1.. {
                            let far = Instant::now() + Duration::from_secs(3600);
                            let outcomes = sink.apply(&todo, setting.conc, far).await;
                            if let Some(o) = outcomes.values().find(|o| {
                                matches!(o, Outcome::Permanent(_) | Outcome::Late | Outcome::Untried)
                            }) {
                                bail!("raw MongoDB loop: a write was not made: {o:?}");
                            }
                            todo.retain(|row| outcomes.get(&row.id) != Some(&Outcome::Applied));
                            if todo.is_empty() {
                                break;
                            }
                            if attempt == 5 {
                                let first = outcomes.values().find(|o| **o != Outcome::Applied);
                                bail!("raw MongoDB loop: {} writes still failing after {attempt} tries: {first:?}", todo.len());
                            }
                            retried += todo.len();
                            tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                        }
                    }
                });
            }
        }
        let mut retried = 0;
        while let Some(done) = tasks.join_next().await {
            retried += done??;
        }
        let secs = t0.elapsed().as_secs_f64();
        let cpu = support::self_cpu_s() - cpu0;
        if retried > 0 {
            say!("raw MongoDB loop: {retried} writes failed for now and were retried");
        }
        let docs = dbs[0]
            .collection::<Document>(COLLECTION)
            .estimated_document_count()
            .await?;
        if docs as i64 != target.docs {
            bail!("raw MongoDB loop: {docs} documents, expected {}", target.docs);
        }
        Ok(RawRun {
            rps: rows.len() as f64 / secs,
            cpu_s: cpu,
            retried,
        })
    }
    .await;
    ctx.drop_mongo(&mongo).await;
    result
}

/// BENCH_PROBE_MONGO=1: the raw loop alone at several shapes (a diagnostic).
async fn probe_mongo(ctx: &Ctx, plan: &Plan) -> anyhow::Result<()> {
    let db = backlog_db(ctx, "probe", plan.drain_rows).await?;
    let rows = Arc::new(load_rows(ctx, &db).await?);
    ctx.drop_db(&db).await;
    for (procs, workers, batch, conc) in [
        (1, 1, 100, 1),
        (1, 1, 1000, 1),
        (1, 1, 100, 4),
        (1, 2, 100, 4),
        (1, 4, 100, 1),
        (1, 1, 10, 1),
    ] {
        let s = Setting {
            workers,
            batch,
            conc,
        };
        let target = Target::empty(rows.len() as i64);
        let rps = raw_drain(ctx, rows.clone(), s, procs, target).await?.rps;
        say!("probe: {procs} client(s), {}: {rps:.0} rows/s", s.label());
    }
    Ok(())
}

/// The sweep's candidates around the defaults.
fn candidates(base: Setting) -> Vec<Setting> {
    let mut v = vec![base];
    for (workers, batch, conc) in [
        (1, 100, 1),
        (1, 100, 4),
        (2, 100, 1),
        (2, 200, 2),
        (4, 100, 2),
        (2, 500, 4),
        (4, 200, 4),
        (2, 100, 8),
    ] {
        let s = Setting {
            workers,
            batch,
            conc,
        };
        if !v.contains(&s) {
            v.push(s);
        }
    }
    v
}

async fn phase_drain(ctx: &Ctx, plan: &Plan, report: &mut Report) -> anyhow::Result<Setting> {
    let (configured, fixed) = Setting::configured();
    let mut setting = configured;
    let mut sweep = Vec::new();
    if plan.tune_rows > 0 && !fixed {
        let mut best = 0.0;
        for s in candidates(configured)
            .into_iter()
            .take(plan.tune_candidates)
        {
            // On the real workload: updates of existing documents.
            let (db, target) = update::backlog_db(ctx, plan, plan.tune_rows).await?;
            let run = relay_drain(ctx, &db, plan.tune_rows, s, 1, "tune", target).await;
            ctx.drop_db(&db).await;
            let run = run?;
            say!("sweep: 1 relay, {}: {:.0} rows/s", s.label(), run.rps);
            sweep.push(
                json!({"setting": s.json(), "rows": plan.tune_rows, "rows_per_s": rnd(run.rps, 1)}),
            );
            if run.rps > best {
                best = run.rps;
                setting = s;
            }
        }
    }
    say!("drain setting: {}", setting.label());
    let mut rows_cache: Option<Arc<Vec<Claimed>>> = None;
    // Per relay count: (relay rows/s, raw rows/s) of each pair. Rounds go over
    // every count in turn, so that the machine's drifting load falls on all.
    let mut pairs: Vec<Vec<(f64, f64)>> = vec![Vec::new(); plan.relay_counts.len()];
    let mut runs = Vec::new();
    for round in 0..plan.drain_pairs {
        for (i, &procs) in plan.relay_counts.iter().enumerate() {
            let db = backlog_db(ctx, "drain", plan.drain_rows).await?;
            if rows_cache.is_none() {
                rows_cache = Some(Arc::new(load_rows(ctx, &db).await?));
            }
            let target = Target::empty(plan.drain_rows);
            let run = relay_drain(ctx, &db, plan.drain_rows, setting, procs, "drain", target).await;
            ctx.drop_db(&db).await;
            let run = run?;
            let rows = rows_cache.clone().unwrap();
            let raw_run = raw_drain(ctx, rows, setting, procs, target).await?;
            let raw = raw_run.rps;
            say!(
                "drain {} rows, pair {}/{}: {procs} relay(s) {:.0} rows/s ({:.1} s) · raw MongoDB loop, same concurrency: {:.0} rows/s",
                plan.drain_rows,
                round + 1,
                plan.drain_pairs,
                run.rps,
                run.secs,
                raw
            );
            pairs[i].push((run.rps, raw));
            runs.push(json!({
                "relays": procs,
                "pair": round + 1,
                "rows": plan.drain_rows,
                "seconds": rnd(run.secs, 3),
                "rows_per_s": rnd(run.rps, 1),
                "relay_cpu_us_per_row": rnd(run.relay_cpu_s / plan.drain_rows as f64 * 1e6, 1),
                "pg_cpu_us_per_row": opt(run.pg_cpu_s.map(|s| s / plan.drain_rows as f64 * 1e6), 1),
                "relay_peak_rss_mib": run.rss_kib.iter().map(|k| rnd(*k as f64 / 1024.0, 1)).collect::<Vec<_>>(),
                "raw_rows_per_s": rnd(raw, 1),
                "raw_cpu_us_per_row": rnd(raw_run.cpu_s / plan.drain_rows as f64 * 1e6, 1),
                "raw_writes_retried": raw_run.retried,
                "ratio": rnd(run.rps / raw, 3),
            }));
        }
    }
    // (relays, relay rows/s, raw rows/s, ratio): medians over the pairs; the
    // ratio is the median of each pair's own ratio.
    let mut counts = Vec::new();
    for (i, &procs) in plan.relay_counts.iter().enumerate() {
        let med = |f: fn(&(f64, f64)) -> f64| {
            support::median(&pairs[i].iter().map(f).collect::<Vec<_>>()).context("no drain run")
        };
        let (rps, raw, ratio) = (med(|p| p.0)?, med(|p| p.1)?, med(|p| p.0 / p.1)?);
        report.set(&format!("drain_rps_{procs}"), json!(rnd(rps, 1)));
        report.set(&format!("mongo_raw_rps_{procs}"), json!(rnd(raw, 1)));
        report.set(&format!("drain_ratio_{procs}"), json!(rnd(ratio, 3)));
        counts.push((procs, rps, raw, ratio));
    }
    let best = counts
        .iter()
        .copied()
        .max_by(|a, b| a.3.total_cmp(&b.3))
        .context("no drain run")?;
    let fastest = counts
        .iter()
        .copied()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .context("no drain run")?;
    // The issue asks for the best ratio; the ratio at the relay count that
    // drained fastest is kept beside it (it was `drain_ratio` until 2026-11-29).
    let (best_procs, _, raw, ratio) = best;
    report.set("mongo_raw_rps", json!(rnd(raw, 1)));
    report.set("drain_ratio", json!(rnd(ratio, 3)));
    report.set("drain_best_relays", json!(best_procs));
    report.set("drain_ratio_at_fastest", json!(rnd(fastest.3, 3)));
    report.set("drain_fastest_relays", json!(fastest.0));
    report.detail(
        "drain",
        json!({
            "rows": plan.drain_rows,
            "pairs": plan.drain_pairs,
            "setting": setting.json(),
            "setting_env": setting.env().iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
            "setting_chosen_by": if fixed { "BENCH_RELAY_* variables" } else if plan.tune_rows > 0 { "sweep (1 relay, best rows/s on the update workload)" } else { "src/config.rs defaults" },
            "sweep": sweep,
            "runs": runs,
            "mongo_raw_rps_is": format!("the raw loop at the concurrency of the relay count with the best ratio ({best_procs})"),
        }),
    );
    Ok(setting)
}

// ------------------------------------------------------------------------ lag

async fn phase_lag(
    ctx: &Ctx,
    plan: &Plan,
    report: &mut Report,
    setting: Setting,
) -> anyhow::Result<()> {
    let ingest_max = report.num("ingest_rps");
    let drain_max = ["drain_rps_1", "drain_rps_2", "drain_rps_4"]
        .iter()
        .filter_map(|k| report.num(k))
        .reduce(f64::max);
    // The earlier rule, kept for the record: half of min(ingest alone, relay alone).
    let standalone = match (ingest_max, drain_max) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    // BENCH_LAG_MAX=N stands in for the measured maximum (to study lag alone).
    let given = std::env::var("BENCH_LAG_MAX")
        .ok()
        .and_then(|v| v.parse::<f64>().ok());
    // The maximum is measured on its own databases, dropped before the lag run,
    // so that their clean-up (autovacuum) does not run during it.
    let pipeline = match given {
        Some(_) => None,
        None => {
            let p = Pipeline::start(ctx, plan, setting, "pipeline", 0).await?;
            let bodies: support::Bodies =
                Arc::new(|| support::webhook_body(support::event_number()));
            let measured = pipeline_max(plan, p.addr, &p.client, bodies).await;
            p.stop(ctx).await;
            Some(measured?)
        }
    };
    let max = given.or(pipeline.map(|p| p.0)).unwrap_or(1.0);
    let mut lag = Pipeline::start(ctx, plan, setting, "lag", 0).await?;
    let result: anyhow::Result<()> = async {
        let rate = (max / 2.0).max(1.0);
        say!(
            "lag: {rate:.0} webhooks/s (half of {max:.0}) through ingest, {} relay(s), {}",
            plan.lag_relays,
            setting.label()
        );
        let bodies: support::Bodies =
            Arc::new(|| support::webhook_body(support::event_number()));
        let mut run = measure_lag(plan, &mut lag, rate, bodies).await?;
        let (n, unsynced, p50, p99, max_ms) = (run.rows, run.unsynced, run.p50, run.p99, run.max);
        let load = &mut run.load;
        say!(
            "lag over {n} rows: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (offered {rate:.0}/s, achieved {:.0}/s)",
            p50.unwrap_or(f64::NAN),
            p99.unwrap_or(f64::NAN),
            max_ms.unwrap_or(f64::NAN),
            load.rps()
        );
        report.set("lag_p50_ms", opt(p50, 3));
        report.set("lag_p99_ms", opt(p99, 3));
        report.set("lag_max_ms", opt(max_ms, 3));
        report.set("pipeline_max_rps", opt(pipeline.map(|p| p.0), 1));
        report.detail(
            "lag",
            json!({
                "rate_is": if given.is_some() { "half of BENCH_LAG_MAX" } else { "half of pipeline_max_rps" },
                "pipeline_max": pipeline.map(|p| json!({
                    "rps": rnd(p.0, 1), "accepted_rps": rnd(p.1, 1), "synced_rps": rnd(p.2, 1),
                    "seconds": plan.pipeline_secs,
                    "definition": "ingest under a closed loop of 32 connections with the relay(s) running: min(webhooks accepted/s, rows synced/s) over the window",
                })),
                "half_of_standalone_min_rps": opt(standalone.map(|m| m / 2.0), 1),
                "offered_rps": rnd(rate, 1),
                "achieved_rps": rnd(load.rps(), 1),
                "seconds": plan.lag_secs,
                "rows": n,
                "rows_not_synced_at_end": unsynced,
                "relays": plan.lag_relays,
                "setting": setting.json(),
                "http_p50_ms": opt(load.latency(0.5), 3),
                "http_p99_ms": opt(load.latency(0.99), 3),
                "other_answers": format!("{:?}", load.other),
                "definition": "synced_at - created_at of rows created after the warm-up, from PostgreSQL",
            }),
        );
        Ok(())
    }
    .await;
    lag.stop(ctx).await;
    result
}

/// What one lag run saw: rows created after the warm-up, those still not synced
/// when measured, and their commit-to-apply lag in ms.
struct LagRun {
    rows: i64,
    unsynced: i64,
    p50: Option<f64>,
    p99: Option<f64>,
    max: Option<f64>,
    load: support::Load,
}

/// Offers `rate` webhooks/s made by `bodies` to the pipeline for `plan.lag_secs`
/// after a warm-up, lets the relays catch up, and reads each row's lag.
async fn measure_lag(
    plan: &Plan,
    pipeline: &mut Pipeline,
    rate: f64,
    bodies: support::Bodies,
) -> anyhow::Result<LagRun> {
    let (addr, client) = (pipeline.addr, &pipeline.client);
    let warm = Duration::from_secs_f64(plan.warmup_secs.max(1.0));
    support::run_load_with(addr, CONNS, warm, Some(rate), bodies.clone()).await?;
    let since = Utc::now();
    let secs = Duration::from_secs_f64(plan.lag_secs);
    let load = support::run_load_with(addr, CONNS, secs, Some(rate), bodies).await?;
    // Let the relay catch up; rows still unsynced after that are reported, not hidden.
    let deadline = Instant::now() + Duration::from_secs_f64(30f64.max(3.0 * plan.lag_secs));
    loop {
        let (p, h, _) = pending_or_held(client).await?;
        if p + h == 0 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (i, p) in pipeline.procs.iter_mut().enumerate() {
        p.check_running(&format!("lag process {i}"))?;
    }
    let row = client
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE status <> 'synced'),
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY lag),
                    percentile_cont(0.99) WITHIN GROUP (ORDER BY lag),
                    max(lag)
             FROM (SELECT status, extract(epoch FROM synced_at - created_at)::float8 * 1000 AS lag
                   FROM outbox_messages WHERE created_at >= $1) s",
            &[&since],
        )
        .await?;
    let run = LagRun {
        rows: row.get(0),
        unsynced: row.get(1),
        p50: row.get(2),
        p99: row.get(3),
        max: row.get(4),
        load,
    };
    if run.rows == 0 {
        bail!("lag: no row was written");
    }
    if run.unsynced > 0 {
        say!(
            "lag: {} of {} rows still not synced when measured",
            run.unsynced,
            run.rows
        );
    }
    Ok(run)
}

/// Ingest and the relays running on fresh databases, as in production.
struct Pipeline {
    db: String,
    mongo: String,
    addr: SocketAddr,
    client: tokio_postgres::Client,
    procs: Vec<Proc>,
}

impl Pipeline {
    /// `preload`: documents written before the processes start (the update workload's).
    async fn start(
        ctx: &Ctx,
        plan: &Plan,
        setting: Setting,
        tag: &str,
        preload: i64,
    ) -> anyhow::Result<Pipeline> {
        let db = ctx.fresh_db(tag).await?;
        let mongo = ctx.fresh_mongo(tag);
        let mut env = ctx.child_env(&db, &mongo);
        env.extend(setting.env());
        let mut procs = Vec::new();
        let started: anyhow::Result<SocketAddr> = async {
            update::preload(ctx, &mongo, preload).await?;
            for i in 0..plan.lag_relays {
                procs.push(Proc::spawn(
                    Path::new(BIN),
                    &["relay", "--id", &format!("bench-{tag}-{i}")],
                    &env,
                    &ctx.log_path(&format!("relay-{tag}-{i}")),
                )?);
            }
            let addr = SocketAddr::from(([127, 0, 0, 1], support::free_port()));
            procs.push(Proc::spawn(
                Path::new(BIN),
                &["ingest", "--listen", &addr.to_string()],
                &env,
                &ctx.log_path(&format!("ingest-{tag}")),
            )?);
            support::wait_listening(addr, Duration::from_secs(15)).await?;
            Ok(addr)
        }
        .await;
        let ready = match started {
            Ok(addr) => match ctx.pg(&db).await {
                Ok(client) => update::insert_history(&client, preload)
                    .await
                    .map(|_| (addr, client)),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        match ready {
            Ok((addr, client)) => Ok(Pipeline {
                db,
                mongo,
                addr,
                client,
                procs,
            }),
            Err(e) => {
                for p in &mut procs {
                    p.terminate(Duration::from_secs(10));
                }
                ctx.drop_db(&db).await;
                ctx.drop_mongo(&mongo).await;
                Err(e)
            }
        }
    }

    async fn stop(mut self, ctx: &Ctx) {
        for p in &mut self.procs {
            p.terminate(Duration::from_secs(10));
        }
        drop(self.client);
        ctx.drop_db(&self.db).await;
        ctx.drop_mongo(&self.mongo).await;
    }
}

/// The whole pipeline's maximum: ingest driven flat out (closed loop) while the
/// relays run, on the same machine. Answers (max, accepted/s, synced/s); max is
/// the lower, since a rate the relays do not keep up with is not sustainable.
async fn pipeline_max(
    plan: &Plan,
    addr: SocketAddr,
    client: &tokio_postgres::Client,
    bodies: support::Bodies,
) -> anyhow::Result<(f64, f64, f64)> {
    let warm = Duration::from_secs_f64(plan.warmup_secs.max(1.0));
    support::run_load_with(addr, CONNS, warm, None, bodies.clone()).await?;
    let from = Utc::now();
    let secs = Duration::from_secs_f64(plan.pipeline_secs);
    let load = support::run_load_with(addr, CONNS, secs, None, bodies).await?;
    let to = Utc::now();
    let synced: i64 = client
        .query_one(
            "SELECT count(*) FROM outbox_messages WHERE synced_at >= $1 AND synced_at < $2",
            &[&from, &to],
        )
        .await?
        .get(0);
    let secs = (to - from).num_microseconds().unwrap_or(1) as f64 / 1e6;
    let (accepted, synced) = (load.rps(), synced as f64 / secs);
    say!(
        "pipeline: {accepted:.0} webhooks/s accepted, {synced:.0} rows/s synced, with the relay(s) running"
    );
    Ok((accepted.min(synced), accepted, synced))
}

// ------------------------------------------------------------- claim + memory

/// Claim latency on each database: `outbox::claim` (the relay's statement) in a
/// transaction that is rolled back, one claim on each database in turn, so that
/// the machine's other load falls on all alike; medians after 5 warm-ups each. A
/// checkpoint first: a large backlog's bulk insert would otherwise leave one
/// running, which would slow the large side only.
async fn compare_claims(
    ctx: &Ctx,
    dbs: &[&str],
    batch: i64,
    reps: usize,
) -> anyhow::Result<Vec<f64>> {
    if let Err(e) = ctx.pg(dbs[0]).await?.batch_execute("CHECKPOINT").await {
        say!("no CHECKPOINT before the claims ({e}); the large backlog's may still be running");
    }
    let mut pools = Vec::new();
    for db in dbs {
        let config = outboxd::config::DatabaseConfig {
            url: ctx.db_url(db).into(),
            pool_size: 1,
            ..Default::default()
        };
        pools.push(outboxd::db::pool(&config)?);
    }
    let mut times = vec![Vec::with_capacity(reps); dbs.len()];
    for i in 0..reps + 5 {
        for (pool, times) in pools.iter().zip(times.iter_mut()) {
            let mut client = pool.get().await?;
            let tx = client.transaction().await?;
            let t0 = Instant::now();
            let claimed = outboxd::outbox::claim(&tx, "bench-claim", batch, 30.0).await?;
            let ms = t0.elapsed().as_secs_f64() * 1000.0;
            tx.rollback().await?;
            outboxd::outbox::unlock_aggregates(&client).await?;
            if claimed.rows.len() as i64 != batch {
                bail!(
                    "claim returned {} rows, expected {batch}",
                    claimed.rows.len()
                );
            }
            if i >= 5 {
                times.push(ms);
            }
        }
    }
    times
        .iter()
        .map(|t| support::median(t).context("no claim timed"))
        .collect()
}

async fn phase_claim_memory(
    ctx: &Ctx,
    plan: &Plan,
    report: &mut Report,
    setting: Setting,
) -> anyhow::Result<()> {
    // One database, topped up in steps: claims timed at the large claim backlog
    // (against a second database holding the small one, and a third holding it
    // behind rows backing off), and a relay's peak RSS taken while it drains
    // for a fixed time from the two RSS backlogs.
    let mut steps: Vec<i64> = [plan.claim_large, plan.rss_small, plan.rss_large]
        .into_iter()
        .filter(|&n| n > 0)
        .collect();
    steps.sort();
    steps.dedup();
    let db = ctx.fresh_db("claim").await?;
    let small_db = backlog_db(ctx, "claim_small", plan.claim_small).await?;
    let mut claims: BTreeMap<i64, f64> = BTreeMap::new();
    let mut claim_behind = None;
    let mut rss: BTreeMap<i64, (f64, i64, f64)> = BTreeMap::new();
    let result: anyhow::Result<()> = async {
        let client = ctx.pg(&db).await?;
        let mut inserted = 0;
        for size in steps {
            let t = Instant::now();
            insert_backlog(&client, inserted + 1, size).await?;
            inserted = size;
            let (pending, _, _) = pending_or_held(&client).await?;
            say!(
                "backlog: {size} rows inserted ({pending} pending) in {:.1} s",
                t.elapsed().as_secs_f64()
            );
            if size == plan.claim_large {
                // The same claim behind as many rows backing off, as after a
                // spell of failed writes: it must not read past them.
                let backoff_db = ctx.fresh_db("claim_backoff").await?;
                let timed = async {
                    let client = ctx.pg(&backoff_db).await?;
                    insert_rows(&client, 1, size, true).await?;
                    insert_rows(&client, size + 1, size + plan.claim_small, false).await?;
                    compare_claims(
                        ctx,
                        &[&small_db, &db, &backoff_db],
                        setting.batch,
                        plan.claim_reps,
                    )
                    .await
                }
                .await;
                ctx.drop_db(&backoff_db).await;
                let &[small, large, behind] = &timed?[..] else {
                    bail!("three databases, three medians")
                };
                say!(
                    "claim of {} rows at {} pending: {small:.3} ms; at {pending} pending: {large:.3} ms; \
                     behind {size} rows backing off: {behind:.3} ms",
                    setting.batch,
                    plan.claim_small
                );
                claims.insert(plan.claim_small, small);
                claims.insert(plan.claim_large, large);
                claim_behind = Some(behind);
            }
            if plan.rss_secs > 0.0 && (size == plan.rss_small || size == plan.rss_large) {
                let (kib, synced, secs) = relay_for(ctx, &db, setting, plan.rss_secs).await?;
                let mib = kib as f64 / 1024.0;
                say!(
                    "memory at {pending} pending: 1 relay synced {synced} rows in {secs:.1} s, peak RSS {mib:.1} MiB"
                );
                rss.insert(size, (mib, synced, secs));
            }
        }
        Ok(())
    }
    .await;
    ctx.drop_db(&db).await;
    ctx.drop_db(&small_db).await;
    let small = claims.get(&plan.claim_small).copied();
    let large = claims.get(&plan.claim_large).copied();
    report.set("claim_ms_10k", opt(small, 4));
    report.set("claim_ms_1m", opt(large, 4));
    report.set("claim_ratio", opt(ratio(large, small), 3));
    report.set("claim_ms_backoff_1m", opt(claim_behind, 4));
    report.set("claim_backoff_ratio", opt(ratio(claim_behind, small), 3));
    let rss_small = rss.get(&plan.rss_small).map(|r| r.0);
    let rss_large = rss.get(&plan.rss_large).map(|r| r.0);
    report.set("relay_rss_mib_100k", opt(rss_small, 1));
    report.set("relay_rss_mib_1m", opt(rss_large, 1));
    report.set("relay_rss_ratio", opt(ratio(rss_large, rss_small), 3));
    report.detail(
        "claim",
        json!({
            "backlog_small": plan.claim_small,
            "backlog_large": plan.claim_large,
            "batch_size": setting.batch,
            "repetitions": plan.claim_reps,
            "method": "outbox::claim (the relay's own statement) in a transaction that is rolled back; \
                       three databases: the small and the large backlog, and the small one behind as many \
                       rows backing off as the large (attempts 1, due in a day), each inserted with \
                       generate_series, then VACUUM ANALYZE; a CHECKPOINT once all are in; then one claim \
                       on each in turn, 5 warm-ups and `repetitions` timed each; client-side medians",
        }),
    );
    report.detail(
        "memory",
        json!({
            "backlog_small": plan.rss_small,
            "backlog_large": plan.rss_large,
            "seconds_each": plan.rss_secs,
            "setting": setting.json(),
            "runs": rss.iter().map(|(size, (mib, synced, secs))| json!({
                "backlog": size, "peak_rss_mib": rnd(*mib, 1), "rows_synced": synced, "seconds": rnd(*secs, 1)
            })).collect::<Vec<_>>(),
            "method": "VmHWM of one relay process draining the pending backlog for a fixed time, \
                       then SIGTERM; fresh MongoDB database each time",
        }),
    );
    result
}

/// Runs one relay on `db` for `secs`, then stops it: (peak RSS KiB, rows synced, seconds).
async fn relay_for(
    ctx: &Ctx,
    db: &str,
    setting: Setting,
    secs: f64,
) -> anyhow::Result<(u64, i64, f64)> {
    let mongo = ctx.fresh_mongo("rss");
    let result: anyhow::Result<(u64, i64, f64)> = async {
        let client = ctx.pg(db).await?;
        let count = "SELECT count(*) FROM outbox_messages WHERE status = 'synced'";
        let before: i64 = client.query_one(count, &[]).await?.get(0);
        let mut env = ctx.child_env(db, &mongo);
        env.extend(setting.env());
        let t0 = Instant::now();
        let mut relay = Proc::spawn(
            Path::new(BIN),
            &["relay", "--id", "bench-rss"],
            &env,
            &ctx.log_path(&format!("relay-rss-{}", fastrand::u16(..))),
        )?;
        let mut peak = 0;
        while t0.elapsed().as_secs_f64() < secs {
            tokio::time::sleep(Duration::from_millis(100)).await;
            relay.check_running("relay")?;
            peak = peak.max(relay.peak_rss_kib().unwrap_or(0));
        }
        let elapsed = t0.elapsed().as_secs_f64();
        peak = peak.max(relay.peak_rss_kib().unwrap_or(0));
        // Its rows in flight keep their lease; nothing reads them afterwards.
        relay.terminate(Duration::from_secs(5));
        let after: i64 = client.query_one(count, &[]).await?.get(0);
        Ok((peak, after - before, elapsed))
    }
    .await;
    ctx.drop_mongo(&mongo).await;
    result
}

// --------------------------------------------------------------------- report

fn sh(cmd: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

async fn machine(ctx: &Ctx) -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: Option<f64> = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok());
    let pg = async {
        let c = support::pg_connect(&ctx.admin_url).await.ok()?;
        let v: String = c.query_one("SELECT version()", &[]).await.ok()?.get(0);
        let settings = c
            .query(
                "SELECT name, setting || coalesce(unit, '') FROM pg_settings WHERE name IN
                 ('shared_buffers', 'synchronous_commit', 'fsync', 'max_connections', 'wal_level', 'max_wal_size')",
                &[],
            )
            .await
            .ok()?;
        let s: BTreeMap<String, String> = settings.iter().map(|r| (r.get(0), r.get(1))).collect();
        Some(json!({"version": v, "settings": s}))
    }
    .await;
    let mongo = ctx
        .mongo
        .database("admin")
        .run_command(doc! {"buildInfo": 1})
        .await
        .ok()
        .map(|d| {
            json!({
                "version": d.get_str("version").unwrap_or("?"),
                "ferretdb": d.get_document("ferretdbFeatures").is_ok() || d.get_str("ferretdbVersion").is_ok(),
                "ferretdb_version": d.get_str("ferretdbVersion").ok(),
            })
        });
    json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": model,
        "memory_gib": mem_kib.map(|k| rnd(k / 1024.0 / 1024.0, 1)),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").ok().map(|s| s.trim().to_string()),
        "loadavg_end": std::fs::read_to_string("/proc/loadavg").ok().map(|s| s.trim().to_string()),
        "postgresql": pg,
        "mongodb": mongo,
        "rustc": sh("rustc", &["-V"]),
        "git": sh("git", &["-C", env!("CARGO_MANIFEST_DIR"), "describe", "--always", "--dirty"]),
    })
}

const KEYS: &[&str] = &[
    "ingest_rps",
    "pgbench_tps",
    "ingest_ratio",
    "ingest_p50_ms",
    "ingest_p99_ms",
    "drain_rps_1",
    "drain_rps_2",
    "drain_rps_4",
    "mongo_raw_rps",
    "drain_ratio_1",
    "drain_ratio_2",
    "drain_ratio_4",
    "drain_ratio",
    "drain_ratio_at_fastest",
    "pipeline_max_rps",
    "lag_p50_ms",
    "lag_p99_ms",
    "lag_max_ms",
    "claim_ms_10k",
    "claim_ms_1m",
    "claim_ratio",
    "claim_ms_backoff_1m",
    "claim_backoff_ratio",
    "relay_rss_mib_100k",
    "relay_rss_mib_1m",
    "relay_rss_ratio",
    "update_drain_rps_1",
    "update_drain_rps_2",
    "update_drain_rps_4",
    "update_drain_rps",
    "update_raw_rps",
    "update_drain_ratio",
    "update_pipeline_max_rps",
    "update_lag_p50_ms",
    "update_lag_p99_ms",
    "update_lag_half_p50_ms",
    "update_lag_half_p99_ms",
    "pg_cpu_us_per_row",
    "peer_gw_rps",
    "peer_seed_rps",
    "peer_gw_pg_cpu_us_per_row",
    "peer_seed_pg_cpu_us_per_row",
    "peer_gw_lag_p50_ms",
    "peer_seed_lag_p50_ms",
    "vs_gw",
    "vs_seed",
    "vs_gw_lag_p50",
    "vs_seed_lag_p50",
];

async fn finish(ctx: &Ctx, plan: &Plan, report: &mut Report) -> Value {
    let mut figures = Map::new();
    for key in KEYS {
        figures.insert(
            (*key).into(),
            report.figures.get(*key).cloned().unwrap_or(Value::Null),
        );
    }
    for (k, v) in &report.figures {
        figures.entry(k.clone()).or_insert(v.clone());
    }
    let goals: Vec<Value> = GOALS
        .iter()
        .map(|(key, op, goal)| {
            json!({"figure": key, "goal": format!("{op} {goal}"), "met": met(report.num(key), op, *goal)})
        })
        .collect();
    let mut doc = Value::Object(figures);
    doc["scale"] = json!(plan.scale.name());
    doc["goals"] = json!(goals);
    doc["machine"] = machine(ctx).await;
    doc["settings"] = json!({
        "scale": plan.scale.name(),
        "plan": format!("{plan:?}"),
        "relay_defaults": Setting::configured().0.json(),
    });
    doc["details"] = Value::Object(report.details.clone());
    doc["errors"] = json!(report.errors);
    doc["generated_at"] = json!(Utc::now().to_rfc3339());
    doc["duration_s"] = json!(rnd(started().elapsed().as_secs_f64(), 1));
    doc
}

const GOALS: &[(&str, &str, f64)] = &[
    ("ingest_ratio", "≥", 0.8),
    ("drain_ratio", "≥", 0.8),
    ("lag_p50_ms", "≤", 5.0),
    ("lag_p99_ms", "≤", 50.0),
    ("claim_ratio", "≤", 1.5),
    // Ours, not the issue's: the same bound behind rows backing off.
    ("claim_backoff_ratio", "≤", 1.5),
    ("relay_rss_ratio", "≤", 1.2),
    ("update_drain_rps_1", "≥", 1000.0),
    ("update_drain_ratio", "≥", 0.8),
    ("vs_gw", "≥", 3.0),
    // Lag p50 of the seed-style relay over outboxd's, both at 200 messages/s.
    ("vs_seed_lag_p50", "≥", 10.0),
];

fn met(value: Option<f64>, op: &str, goal: f64) -> Option<bool> {
    value.map(|v| if op == "≥" { v >= goal } else { v <= goal })
}

fn table(plan: &Plan, report: &Report) -> String {
    let label = |key: &str| -> String {
        if key.starts_with("update_drain_rps") || key == "update_raw_rps" {
            return format!(
                "{key} ({} rows onto {} documents)",
                plan.update_rows, plan.update_docs
            );
        }
        let at = match key {
            "claim_ms_10k" => plan.claim_small,
            "claim_ms_1m" | "claim_ms_backoff_1m" => plan.claim_large,
            "relay_rss_mib_100k" => plan.rss_small,
            "relay_rss_mib_1m" => plan.rss_large,
            k if k.starts_with("drain_rps") || k == "mongo_raw_rps" => plan.drain_rows,
            _ => return key.to_string(),
        };
        let nominal = match key {
            "claim_ms_10k" => 10_000,
            "claim_ms_1m" | "claim_ms_backoff_1m" | "relay_rss_mib_1m" => 1_000_000,
            _ => 100_000,
        };
        if at == nominal {
            key.to_string()
        } else {
            format!("{key} (at {at} rows)")
        }
    };
    let mut s = format!(
        "\n### outboxd benchmark ({} scale)\n\n| figure | value | goal | result |\n|---|---:|---|---|\n",
        plan.scale.name()
    );
    for key in KEYS {
        let value =
            report
                .figures
                .get(*key)
                .and_then(Value::as_f64)
                .map_or("n/a".to_string(), |v| {
                    if v.abs() >= 100.0 {
                        format!("{v:.0}")
                    } else {
                        format!("{v:.3}")
                    }
                });
        let goal = GOALS.iter().find(|g| g.0 == *key);
        let (goal_text, result) = match goal {
            None => ("".to_string(), "".to_string()),
            Some((_, op, g)) => (
                format!("{op} {g}"),
                match met(report.num(key), op, *g) {
                    Some(true) => "pass".into(),
                    Some(false) => "**miss**".into(),
                    None => "n/a".into(),
                },
            ),
        };
        s.push_str(&format!(
            "| {} | {value} | {goal_text} | {result} |\n",
            label(key)
        ));
    }
    s
}
