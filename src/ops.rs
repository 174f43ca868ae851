//! The operator commands: `status`, `retry`, `audit` and `resync`.

mod audit_all;
mod progress;
mod resync;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use futures_util::TryStreamExt;
use mongodb::bson::{Bson, Document, doc};
use serde_json::{Value, json};

use crate::cli::{ResyncArgs, RetryArgs};
use crate::config::Config;
use crate::{db, mongo, outbox};

/// One connection. `bulk` commands run without a statement timeout, neither
/// `database.statement_timeout_ms` nor the role's or database's own: requeueing
/// after a long outage, or auditing a week of rows, may outlast it. They wait
/// for a row lock at most `BULK_LOCK_WAIT`: relays hold theirs for moments, so
/// a longer wait is someone's open transaction.
async fn client(config: &Config, bulk: bool) -> anyhow::Result<deadpool_postgres::Object> {
    let mut database = config.database.clone();
    database.pool_size = 1;
    if bulk {
        database.statement_timeout_ms = 0;
    }
    let client = db::pool(&database)?
        .get()
        .await
        .context("PostgreSQL unreachable")?;
    if bulk {
        client
            .batch_execute(&format!(
                "SET statement_timeout = 0; SET lock_timeout = '{BULK_LOCK_WAIT}s'"
            ))
            .await?;
    }
    Ok(client)
}

const BULK_LOCK_WAIT: u32 = 10;

/// Names the likely cause when a bulk command gave up waiting for a row lock.
fn lock_wait_hint(err: anyhow::Error) -> anyhow::Error {
    let locked = err
        .downcast_ref::<tokio_postgres::Error>()
        .and_then(|e| e.code())
        .is_some_and(|c| *c == tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE);
    if locked {
        anyhow::anyhow!(
            "gave up after {BULK_LOCK_WAIT} s waiting for a lock on outbox rows: another \
             transaction holds them (an open psql session?); end it, then run this again \
             (what was done so far is kept)"
        )
    } else {
        err
    }
}

/// The status snapshot; its JSON shape is documented in the README and kept stable.
pub async fn snapshot(client: &deadpool_postgres::Object) -> anyhow::Result<Value> {
    let c = client;
    let counts: serde_json::Map<String, Value> = outbox::counts(c)
        .await?
        .into_iter()
        .map(|(s, n)| (s.to_string(), json!(n)))
        .collect();
    let (lag_n, p50, p99, max) = outbox::lag_last_minute(c).await?;
    let failed: Vec<Value> = outbox::failed_by_error(c)
        .await?
        .into_iter()
        .map(
            |(error, rows, newest)| json!({"last_error": error, "rows": rows, "newest_id": newest}),
        )
        .collect();
    let inflight: Vec<Value> = outbox::inflight(c)
        .await?
        .into_iter()
        .map(|(relay, rows, until, expired)| {
            json!({"relay_id": relay, "rows": rows, "lease_expires_at": until.to_rfc3339(), "lease_expired": expired})
        })
        .collect();
    let notifications: serde_json::Map<String, Value> = crate::notify::store::counts(c)
        .await?
        .into_iter()
        .map(|(s, n)| (s.to_string(), json!(n)))
        .collect();
    Ok(json!({
        "counts": counts,
        "notifications": notifications,
        "oldest_pending_age_s": outbox::oldest_pending_age(c).await?,
        "lag_last_minute_ms": {"synced": lag_n, "p50": p50, "p99": p99, "max": max},
        "failed": failed,
        "inflight": inflight,
    }))
}

/// Failed outbox rows and failed notifications: either needs an operator.
fn failed_rows(snapshot: &Value) -> i64 {
    snapshot["counts"]["failed"].as_i64().unwrap_or(0)
        + snapshot["notifications"]["failed"].as_i64().unwrap_or(0)
}

fn render(s: &Value, rates: Option<(f64, f64)>) -> String {
    let mut out = String::new();
    let n = |k: &str| s["counts"][k].as_i64().unwrap_or(0);
    let ms = |v: &Value| {
        v.as_f64()
            .map(|x| format!("{x:.1}ms"))
            .unwrap_or_else(|| "-".into())
    };
    let _ = writeln!(out, "{:<12}{:>12}", "status", "rows");
    for k in ["pending", "processing", "synced", "failed"] {
        let _ = writeln!(out, "{k:<12}{:>12}", n(k));
    }
    let age = s["oldest_pending_age_s"]
        .as_f64()
        .map(|a| format!("{a:.1}s"))
        .unwrap_or_else(|| "-".into());
    let mail = |k: &str| s["notifications"][k].as_i64().unwrap_or(0);
    let _ = writeln!(
        out,
        "\nnotifications   pending {}  processing {}  sent {}  failed {}",
        mail("pending"),
        mail("processing"),
        mail("sent"),
        mail("failed")
    );
    let _ = writeln!(out, "oldest pending  {age}");
    let lag = &s["lag_last_minute_ms"];
    let _ = writeln!(
        out,
        "lag (last min)  p50 {}  p99 {}  max {}  ({} synced)",
        ms(&lag["p50"]),
        ms(&lag["p99"]),
        ms(&lag["max"]),
        lag["synced"]
    );
    if let Some((synced, pending)) = rates {
        let _ = writeln!(
            out,
            "rates           synced {synced:.0}/s  pending {pending:+.0}/s"
        );
    }
    if let Some(rows) = s["inflight"].as_array().filter(|r| !r.is_empty()) {
        let _ = writeln!(out, "\nin flight");
        for r in rows {
            let expired = if r["lease_expired"].as_bool() == Some(true) {
                "  (lease expired)"
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "  {:<28}{:>8} rows  lease until {}{expired}",
                r["relay_id"].as_str().unwrap_or(""),
                r["rows"],
                r["lease_expires_at"].as_str().unwrap_or("")
            );
        }
    }
    if let Some(rows) = s["failed"].as_array().filter(|r| !r.is_empty()) {
        let _ = writeln!(out, "\nfailed, by last error");
        for r in rows {
            let _ = writeln!(
                out,
                "  {:>8} rows  (newest id {})  {}",
                r["rows"],
                r["newest_id"],
                r["last_error"].as_str().unwrap_or("")
            );
        }
    }
    out
}

/// `outboxd status`: exit 0, or 2 when rows have failed.
pub async fn status(config: &Config, as_json: bool, watch: bool) -> anyhow::Result<u8> {
    let client = client(config, false).await?;
    if !watch {
        let s = snapshot(&client).await?;
        if as_json {
            println!("{}", serde_json::to_string_pretty(&s)?);
        } else {
            print!("{}", render(&s, None));
        }
        return Ok(if failed_rows(&s) > 0 { 2 } else { 0 });
    }
    // The synced rate counts rows by `synced_at`, on the server's clock: the
    // synced count also falls as retention deletes old rows.
    let mut previous: Option<(DateTime<Utc>, i64)> = None;
    let mut ctrl_c = std::pin::pin!(tokio::signal::ctrl_c());
    loop {
        let s = snapshot(&client).await?;
        let (newly_synced, now) = outbox::synced_since(&client, previous.map(|p| p.0)).await?;
        let pending = s["counts"]["pending"].as_i64().unwrap_or(0);
        let rates = previous.map(|(at, pe)| {
            let dt = ((now - at).as_seconds_f64()).max(1e-3);
            (newly_synced as f64 / dt, (pending - pe) as f64 / dt)
        });
        previous = Some((now, pending));
        print!(
            "\x1b[2J\x1b[H{}  (refreshing every second; Ctrl-C to stop)\n\n{}",
            Utc::now().format("%H:%M:%S"),
            render(&s, rates)
        );
        tokio::select! {
            _ = &mut ctrl_c => return Ok(0),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Rows requeued per transaction: after a long outage there may be a great many,
/// and one huge transaction would hold back vacuum and lose all if cut short.
const RETRY_BATCH: i64 = 1000;

/// `outboxd retry`: requeues failed rows and says how many. With `--id`, names
/// each id it left alone, and exits 1 if any.
pub async fn retry(config: &Config, args: &RetryArgs) -> anyhow::Result<u8> {
    retry_with(config, args).await.map_err(lock_wait_hint)
}

async fn retry_with(config: &Config, args: &RetryArgs) -> anyhow::Result<u8> {
    let client = client(config, true).await?;
    if args.notifications || !args.notification_id.is_empty() {
        return retry_notifications(&client, &args.notification_id).await;
    }
    let ids = (!args.id.is_empty()).then_some(args.id.as_slice());
    // Ids are kept only to name those of `--id` left alone.
    let mut requeued = std::collections::BTreeSet::new();
    let mut n = 0;
    let mut after = 0;
    loop {
        let page =
            outbox::requeue_failed(&client, ids, args.failed_since, after, RETRY_BATCH).await?;
        if !page.moved.is_empty() {
            // Relays start on each batch while the next is requeued.
            outbox::notify(&client).await?;
        }
        n += page.moved.len();
        if ids.is_some() {
            requeued.extend(page.moved);
        }
        match page.last_picked {
            Some(last) if page.picked == RETRY_BATCH => after = last,
            _ => break,
        }
    }
    println!("requeued {n} failed row{}", if n == 1 { "" } else { "s" });
    let Some(ids) = ids else { return Ok(0) };
    let left: Vec<i64> = ids
        .iter()
        .copied()
        .filter(|id| !requeued.contains(id))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    if left.is_empty() {
        return Ok(0);
    }
    let found: HashMap<i64, crate::status::Status> = outbox::statuses(&client, &left)
        .await?
        .into_iter()
        .collect();
    for id in &left {
        match found.get(id) {
            Some(status) => eprintln!("outbox row {id} is {status}, not failed: left as it is"),
            None => eprintln!("no outbox row {id}"),
        }
    }
    Ok(1)
}

/// `retry --notifications` / `--notification-id`: failed notifications back to
/// pending; the relays' senders poll for them.
async fn retry_notifications(
    client: &deadpool_postgres::Object,
    ids: &[i64],
) -> anyhow::Result<u8> {
    let only = (!ids.is_empty()).then_some(ids);
    let moved = crate::notify::store::requeue_failed(client, only).await?;
    let n = moved.len();
    println!(
        "requeued {n} failed notification{}",
        if n == 1 { "" } else { "s" }
    );
    let left: Vec<&i64> = ids.iter().filter(|id| !moved.contains(id)).collect();
    for id in &left {
        eprintln!("notification {id} is not failed (or does not exist): left as it is");
    }
    Ok(if left.is_empty() { 0 } else { 1 })
}

/// Rows of audit output listed by id before the rest is only counted.
const AUDIT_LIST: usize = 20;
const AUDIT_PAGE: i64 = 1000;

/// `outboxd audit`: looks for documents ahead of PostgreSQL, then pages through
/// aggregates with synced rows and compares each with its document. Exit 1 when
/// any is missing, behind or ahead, or the ahead check could not run (0 once
/// `--repair` dealt with them all).
pub async fn audit(
    config: &Config,
    since: Option<DateTime<Utc>>,
    repair: bool,
) -> anyhow::Result<u8> {
    let sink = mongo::connect(&config.mongodb).await?;
    let result = audit_with(config, &sink, since, repair).await;
    sink.shutdown().await;
    result.map_err(lock_wait_hint)
}

/// Bad documents of one kind: counted, and the first few kept to list.
#[derive(Default)]
struct Found {
    count: usize,
    listed: Vec<String>,
}

impl Found {
    fn add(&mut self, line: impl FnOnce() -> String) {
        self.count += 1;
        if self.listed.len() < AUDIT_LIST {
            self.listed.push(line());
        }
    }

    fn print(&self, kind: &str) {
        for line in &self.listed {
            println!("  {kind:<8} {line}");
        }
        if self.count > self.listed.len() {
            println!("  … and {} more {kind}", self.count - self.listed.len());
        }
    }
}

/// A document's `outbox_id`, when it is a whole number.
fn outbox_id_of(doc: &Document) -> Option<i64> {
    match doc.get("outbox_id")? {
        Bson::Int64(v) => Some(*v),
        Bson::Int32(v) => Some(i64::from(*v)),
        Bson::Double(v) if v.fract() == 0.0 && v.abs() < 9.0e15 => Some(*v as i64),
        _ => None,
    }
}

fn mongo_error(e: mongodb::error::Error) -> anyhow::Error {
    anyhow::anyhow!("MongoDB: {}", mongo::redact(&e))
}

/// The documents matching `filter`, with only their `_id` and `outbox_id`.
async fn outbox_ids(
    collection: &mongodb::Collection<Document>,
    filter: Document,
) -> anyhow::Result<Vec<Document>> {
    collection
        .find(filter)
        .projection(doc! { "outbox_id": 1 })
        .await
        .map_err(mongo_error)?
        .try_collect()
        .await
        .map_err(mongo_error)
}

/// What the look for documents ahead of PostgreSQL found.
#[derive(Default)]
struct Ahead {
    found: Found,
    /// Lowered to 0 by `--repair`.
    lowered: u64,
    /// Their aggregates, requeued already: the page pass leaves them be.
    handled: std::collections::HashSet<String>,
    requeued: u64,
    /// The sequence's last value, when below the table's highest id.
    sequence_behind: Option<(i64, i64)>,
}

/// Documents at an outbox id above any PostgreSQL knows. It lost messages (a
/// restore from backup, a failover to a lagging standby) and issues their ids
/// again, so the version guard takes its new messages for old ones. Repair
/// lowers such a document's `outbox_id` to 0 (guarded by the one it held) and
/// requeues its aggregate's latest synced message, which then overwrites it.
/// A sequence behind the table's own ids does the same harm; it is reported,
/// for the DBA to set. `None` when this role may not read the sequence.
async fn audit_ahead(
    client: &deadpool_postgres::Object,
    collection: &mongodb::Collection<Document>,
    repair: bool,
) -> anyhow::Result<Option<Ahead>> {
    let known = |marks: (Option<i64>, i64)| -> anyhow::Result<(i64, i64)> {
        let (issued, max_id) = marks;
        let issued = issued.context("outbox_messages.id has no sequence")?;
        Ok((issued, max_id))
    };
    let (issued, max_id) = match outbox::id_marks(client).await {
        Ok(marks) => known(marks)?,
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) => {
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    };
    let docs = outbox_ids(
        collection,
        doc! { "outbox_id": { "$gt": issued.max(max_id) } },
    )
    .await?;
    // Read again: a message issued and written meanwhile is not ahead.
    let (issued, max_id) = known(outbox::id_marks(client).await?)?;
    let highest = issued.max(max_id);
    let mut ahead: Vec<(String, i64)> = docs
        .iter()
        .filter_map(|d| {
            let at = outbox_id_of(d).filter(|at| *at > highest)?;
            Some((d.get_str("_id").ok()?.to_owned(), at))
        })
        .collect();
    ahead.sort();
    let mut result = Ahead {
        sequence_behind: (max_id > issued).then_some((issued, max_id)),
        ..Ahead::default()
    };
    for (aggregate, at) in &ahead {
        result.found.add(|| {
            format!("{aggregate}  document at outbox_id {at}, past the highest PostgreSQL knows ({highest})")
        });
        if !repair {
            continue;
        }
        result.lowered += collection
            .update_one(
                doc! { "_id": aggregate, "outbox_id": at },
                doc! { "$set": { "outbox_id": 0_i64 } },
            )
            .await
            .map_err(mongo_error)?
            .modified_count;
        // Whatever `--since` says: nothing else would rewrite it.
        if let Some(latest) = outbox::latest_synced_of(client, aggregate).await? {
            result.requeued += outbox::requeue_synced(client, &[latest]).await?;
        }
        result.handled.insert(aggregate.clone());
    }
    if result.requeued > 0 {
        outbox::notify(client).await?;
    }
    Ok(Some(result))
}

async fn audit_with(
    config: &Config,
    sink: &mongo::Sink,
    since: Option<DateTime<Utc>>,
    repair: bool,
) -> anyhow::Result<u8> {
    let client = client(config, true).await?;
    let collection = sink
        .database()
        .collection::<Document>(sink.collection_name());
    let ahead = audit_ahead(&client, &collection, repair).await?;
    let handled = ahead.as_ref().map(|a| &a.handled);
    let (mut checked, mut missing, mut behind) = (0u64, Found::default(), Found::default());
    let mut requeued = ahead.as_ref().map_or(0, |a| a.requeued);
    let mut fixed = 0u64;
    let mut after = String::new();
    loop {
        let page = outbox::latest_synced_page(&client, &after, since, AUDIT_PAGE).await?;
        let Some((last, _)) = page.last() else { break };
        after = last.clone();
        let ids: Vec<Bson> = page
            .iter()
            .map(|(agg, _)| Bson::String(agg.clone()))
            .collect();
        let docs = outbox_ids(&collection, doc! { "_id": { "$in": ids } }).await?;
        let held: HashMap<String, Option<i64>> = docs
            .iter()
            .filter_map(|d| Some((d.get_str("_id").ok()?.to_owned(), outbox_id_of(d))))
            .collect();
        let mut bad = Vec::new();
        for (aggregate, latest) in &page {
            if handled.is_some_and(|h| h.contains(aggregate)) {
                continue;
            }
            checked += 1;
            let line = |at: &dyn std::fmt::Display| {
                format!("{aggregate}  latest synced outbox_id {latest}, document at {at}")
            };
            match held.get(aggregate) {
                None => missing.add(|| line(&"-")),
                Some(None) => behind.add(|| line(&"no numeric outbox_id")),
                Some(Some(at)) if at < latest => behind.add(|| line(at)),
                Some(_) => continue,
            }
            bad.push(*latest);
        }
        // A page at a time, each followed by a NOTIFY: relays start while it runs.
        if repair && !bad.is_empty() {
            let n = outbox::requeue_synced(&client, &bad).await?;
            if n > 0 {
                outbox::notify(&client).await?;
            }
            requeued += n;
            fixed += n;
        }
    }
    let ahead_count = match &ahead {
        Some(a) => format!("{} ahead", a.found.count),
        None => "ahead not checked".into(),
    };
    println!(
        "audit: {checked} aggregates checked, {} missing, {} behind, {ahead_count}",
        missing.count, behind.count
    );
    missing.print("missing");
    behind.print("behind");
    let Some(ahead) = ahead else {
        println!(
            "  ahead: not checked, since this role may not read the outbox id sequence (re-run sql/roles.sql)"
        );
        // Not checked is not clean: right after a restore, this check matters most.
        return Ok(1);
    };
    ahead.found.print("ahead");
    if ahead.found.count > 0 && !repair {
        println!(
            "  documents ahead hold messages PostgreSQL no longer has (restored from a backup?); \
             `outboxd audit --repair` lets PostgreSQL's messages overwrite them"
        );
    }
    if let Some((issued, max_id)) = ahead.sequence_behind {
        println!(
            "  sequence behind the table: the outbox id sequence is at {issued} but a row has id {max_id}, \
             so new messages would take ids that documents already hold; as the tables' owner: \
             SELECT setval(pg_get_serial_sequence('outbox_messages', 'id'), {max_id});"
        );
    }
    if repair {
        println!(
            "requeued {requeued} row{}",
            if requeued == 1 { "" } else { "s" }
        );
        if ahead.found.count > 0 {
            println!(
                "lowered {} of {} documents ahead to outbox_id 0",
                ahead.lowered, ahead.found.count
            );
        }
    }
    let bad = missing.count + behind.count + ahead.found.count;
    let fixed = fixed as usize + ahead.lowered as usize;
    let clean = if repair { fixed >= bad } else { bad == 0 };
    // A row that retention deleted meanwhile could not be requeued.
    Ok(u8::from(!clean || ahead.sequence_behind.is_some()))
}

/// `outboxd audit --all` (src/ops/audit_all.rs).
pub async fn audit_all(
    config: &Config,
    repair: bool,
    delete_unknown: bool,
    json: bool,
) -> anyhow::Result<u8> {
    let options = audit_all::Options {
        repair,
        delete_unknown,
        json,
    };
    audit_all::run(config, options).await
}

/// `outboxd resync` (src/ops/resync.rs).
pub async fn resync(config: &Config, args: &ResyncArgs) -> anyhow::Result<u8> {
    let options = resync::Options {
        aggregates: args.aggregates.clone(),
        since: args.since,
        rate: args.rate,
        restart: args.restart,
    };
    resync::run(config, &options).await
}
