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
mod claims;
mod drain;
mod ingest;
mod lag;
mod peers;
mod plot;
mod report;
mod update;

use claims::*;
use drain::*;
use ingest::*;
use lag::*;
use report::*;

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
