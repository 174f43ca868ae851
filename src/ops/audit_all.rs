//! `outboxd audit --all`: every aggregate's current state in PostgreSQL
//! against its document, field by field, and the documents no aggregate explains.
//!
//! One pass over the collection with a cursor (FerretDB's SQLite backend scans
//! the whole collection for any filter but a single `_id`, so no `$in` per
//! page): each batch of documents is checked against PostgreSQL with
//! `aggregate_id = ANY($1)` and its ids go to a temporary table; an anti-join
//! against that table then pages through the aggregates whose document is
//! missing. Memory holds a batch, never all ids.

use futures_util::TryStreamExt;
use mongodb::bson::{Bson, Document, doc};
use serde_json::{Value, json};

use super::progress::Progress;
use super::{AUDIT_PAGE, audit_ahead, client, lock_wait_hint, mongo_error, outbox_id_of};
use crate::config::Config;
use crate::outbox::current::{self, Current};
use crate::{mongo, outbox};

/// The fields compared, as `mongo::document` writes them.
const FIELDS: [&str; 7] = [
    "amount",
    "amount_minor",
    "currency",
    "client_reference",
    "creditor_name",
    "creditor_reference",
    "outbox_id",
];

/// Findings of one kind listed in full up to this many (`--json`); text lists 20.
const LIST_CAP: usize = 1000;
const TEXT_LIST: usize = 20;

/// What `--all` was asked to do.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub repair: bool,
    pub delete_unknown: bool,
    pub json: bool,
}

/// Findings of one kind: counted, the first `LIST_CAP` kept.
#[derive(Default)]
struct Kind {
    count: u64,
    listed: Vec<Value>,
}

impl Kind {
    fn add(&mut self, item: impl FnOnce() -> Value) {
        self.count += 1;
        if self.listed.len() < LIST_CAP {
            self.listed.push(item());
        }
    }
}

#[derive(Default)]
struct Report {
    documents: u64,
    aggregates: u64,
    missing: Kind,
    differs: Kind,
    unknown: Kind,
    inflight: u64,
    requeued: u64,
    lowered: u64,
    deleted: u64,
}

/// Numbers compare by value (an Int32 1 is an Int64 1), anything else exactly.
fn same(a: Option<&Bson>, b: Option<&Bson>) -> bool {
    fn whole(v: &Bson) -> Option<i64> {
        outbox_id_of(&doc! { "outbox_id": v.clone() })
    }
    match (a, b) {
        (Some(a), Some(b)) => a == b || whole(a).is_some_and(|x| Some(x) == whole(b)),
        (a, b) => a == b,
    }
}

/// The fields in which `doc` differs from the document `current` makes.
fn differences(current: &Current, doc: &Document) -> Vec<String> {
    match mongo::document(&current.row) {
        Ok(expected) => FIELDS
            .iter()
            .filter(|f| !same(expected.get(**f), doc.get(**f)))
            .map(|f| f.to_string())
            .collect(),
        Err(e) => vec![format!("unusable message: {e}")],
    }
}

/// What the repair of one document needs.
enum Fix {
    /// The document is behind or missing: requeueing the message overwrites it.
    Requeue(i64),
    /// It holds the message's outbox id (or a later one) with other content:
    /// lower its `outbox_id` to 0, guarded by the one it held, then requeue.
    Lower(String, Bson, i64),
    /// A document no aggregate explains, by `_id`: deleted only with `--delete-unknown`.
    Delete(Bson),
}

/// `outboxd audit --all`. Exit 0 when clean, 1 when not (or when `--repair`
/// left something unfixed, such as unknown documents without `--delete-unknown`).
pub async fn run(config: &Config, options: Options) -> anyhow::Result<u8> {
    let sink = mongo::connect(&config.mongodb).await?;
    let result = audit(config, &sink, options).await;
    sink.shutdown().await;
    result.map_err(lock_wait_hint)
}

async fn audit(config: &Config, sink: &mongo::Sink, options: Options) -> anyhow::Result<u8> {
    let client = client(config, true).await?;
    let collection = sink
        .database()
        .collection::<Document>(sink.collection_name());
    let ahead = audit_ahead(&client, &collection, options.repair).await?;
    let handled = ahead
        .as_ref()
        .map(|a| a.handled.clone())
        .unwrap_or_default();
    let started = current::now(&client).await?;
    current::create_seen(&client).await?;
    let mut report = Report {
        requeued: ahead.as_ref().map_or(0, |a| a.requeued),
        lowered: ahead.as_ref().map_or(0, |a| a.lowered),
        ..Report::default()
    };

    let total = collection.estimated_document_count().await.ok();
    let mut progress = Progress::new("documents", total);
    let mut cursor = collection
        .find(doc! {})
        .batch_size(AUDIT_PAGE as u32)
        .await
        .map_err(mongo_error)?;
    let mut batch = Vec::with_capacity(AUDIT_PAGE as usize);
    loop {
        let next = cursor.try_next().await.map_err(mongo_error)?;
        let end = next.is_none();
        batch.extend(next);
        if batch.len() >= AUDIT_PAGE as usize || (end && !batch.is_empty()) {
            let n = batch.len() as u64;
            let fixes =
                check_documents(&client, &collection, &handled, &mut batch, &mut report).await?;
            repair(&client, &collection, options, fixes, &mut report).await?;
            progress.inc(n);
        }
        if end {
            break;
        }
    }
    progress.finish();

    // Aggregates whose document the pass did not see.
    let mut after = String::new();
    loop {
        let (n, last, unseen) = current::unseen_page(&client, &after, AUDIT_PAGE).await?;
        report.aggregates += n as u64;
        let mut fixes = Vec::new();
        for u in unseen {
            if handled.contains(&u.aggregate_id) {
                continue;
            }
            if u.inflight {
                report.inflight += 1;
                continue;
            }
            // Synced since the pass began: its document may have come after the cursor.
            if u.synced_at >= started
                && let Some(doc) = collection
                    .find_one(doc! { "_id": &u.aggregate_id })
                    .await
                    .map_err(mongo_error)?
            {
                let fix = recheck(&client, &collection, &doc, &u.aggregate_id, &mut report).await?;
                fixes.extend(fix);
                continue;
            }
            report
                .missing
                .add(|| json!({"aggregate_id": u.aggregate_id, "outbox_id": u.id}));
            fixes.push(Fix::Requeue(u.id));
        }
        repair(&client, &collection, options, fixes, &mut report).await?;
        match last {
            Some(last) if n as i64 == AUDIT_PAGE => after = last,
            _ => break,
        }
    }
    print(&report, ahead.as_ref().map(|a| a.found.count), options)?;
    let unfixed = if options.repair {
        report.unknown.count - report.deleted
    } else {
        report.missing.count + report.differs.count + report.unknown.count
    };
    let ahead_bad = match &ahead {
        None => true,
        Some(a) => a.sequence_behind.is_some() || (!options.repair && a.found.count > 0),
    };
    Ok(u8::from(unfixed > 0 || ahead_bad))
}

/// Checks a batch of documents (emptied) against PostgreSQL and returns the fixes.
async fn check_documents(
    client: &deadpool_postgres::Object,
    collection: &mongodb::Collection<Document>,
    handled: &std::collections::HashSet<String>,
    batch: &mut Vec<Document>,
    report: &mut Report,
) -> anyhow::Result<Vec<Fix>> {
    let mut ids = Vec::with_capacity(batch.len());
    let mut docs = std::collections::HashMap::with_capacity(batch.len());
    let mut unknown = Vec::new();
    for doc in batch.drain(..) {
        report.documents += 1;
        match doc.get("_id") {
            Some(Bson::String(id)) => {
                ids.push(id.clone());
                docs.insert(id.clone(), doc);
            }
            other => {
                let id = other.map_or("(none)".to_owned(), |v| v.to_string());
                report
                    .unknown
                    .add(|| json!({"_id": id, "reason": "_id is not a string"}));
                unknown.extend(other.cloned());
            }
        }
    }
    current::add_seen(client, &ids).await?;
    let mut fixes = Vec::new();
    for c in current::newest_synced_of(client, &ids).await? {
        let Some(doc) = docs.remove(&c.row.aggregate_id) else {
            continue;
        };
        if handled.contains(&c.row.aggregate_id) || differences(&c, &doc).is_empty() {
            continue;
        }
        if c.inflight {
            report.inflight += 1;
            continue;
        }
        let aggregate = c.row.aggregate_id.clone();
        fixes.extend(recheck(client, collection, &doc, &aggregate, report).await?);
    }
    // Left: documents without a synced message behind them.
    let rest: Vec<String> = docs.into_keys().collect();
    let inflight: std::collections::HashSet<String> = current::inflight_of(client, &rest)
        .await?
        .into_iter()
        .collect();
    for id in rest {
        if inflight.contains(&id) {
            report.inflight += 1;
        } else if !handled.contains(&id) {
            report
                .unknown
                .add(|| json!({"_id": id, "reason": "no aggregate in PostgreSQL"}));
            unknown.push(Bson::String(id));
        }
    }
    fixes.extend(unknown.into_iter().map(Fix::Delete));
    Ok(fixes)
}

/// Reads a differing document and its aggregate again (a relay may have moved
/// both meanwhile) and records what still differs.
async fn recheck(
    client: &deadpool_postgres::Object,
    collection: &mongodb::Collection<Document>,
    first: &Document,
    aggregate: &str,
    report: &mut Report,
) -> anyhow::Result<Option<Fix>> {
    let doc = collection
        .find_one(doc! { "_id": aggregate })
        .await
        .map_err(mongo_error)?
        .unwrap_or_else(|| first.clone());
    let ids = [aggregate.to_owned()];
    let Some(c) = current::newest_synced_of(client, &ids).await?.pop() else {
        return Ok(None);
    };
    let fields = differences(&c, &doc);
    if fields.is_empty() {
        return Ok(None);
    }
    if c.inflight {
        report.inflight += 1;
        return Ok(None);
    }
    let held = doc.get("outbox_id").cloned();
    let at = outbox_id_of(&doc);
    report.differs.add(|| {
        json!({"aggregate_id": aggregate, "outbox_id": c.row.id, "document_outbox_id": at, "fields": fields})
    });
    Ok(Some(match (at, held) {
        (Some(at), Some(held)) if at >= c.row.id => {
            Fix::Lower(aggregate.to_owned(), held, c.row.id)
        }
        _ => Fix::Requeue(c.row.id),
    }))
}

/// With `--repair`, applies `fixes`: requeued through the outbox, so the
/// relay's guarded write does the writing.
async fn repair(
    client: &deadpool_postgres::Object,
    collection: &mongodb::Collection<Document>,
    options: Options,
    fixes: Vec<Fix>,
    report: &mut Report,
) -> anyhow::Result<()> {
    if !options.repair || fixes.is_empty() {
        return Ok(());
    }
    let mut ids = Vec::with_capacity(fixes.len());
    for fix in fixes {
        match fix {
            Fix::Requeue(id) => ids.push(id),
            Fix::Lower(aggregate, held, id) => {
                report.lowered += collection
                    .update_one(
                        doc! { "_id": &aggregate, "outbox_id": held },
                        doc! { "$set": { "outbox_id": 0_i64 } },
                    )
                    .await
                    .map_err(mongo_error)?
                    .modified_count;
                ids.push(id);
            }
            Fix::Delete(id) if options.delete_unknown => {
                report.deleted += collection
                    .delete_one(doc! { "_id": id })
                    .await
                    .map_err(mongo_error)?
                    .deleted_count;
            }
            Fix::Delete(_) => {}
        }
    }
    if ids.is_empty() {
        return Ok(());
    }
    let n = outbox::requeue_synced(client, &ids).await?;
    if n > 0 {
        outbox::notify(client).await?;
    }
    report.requeued += n;
    Ok(())
}

/// The report as JSON (`--json`).
fn render(report: &Report, ahead: Option<usize>, options: Options) -> Value {
    json!({
        "documents": report.documents,
        "aggregates": report.aggregates,
        "missing": {"count": report.missing.count, "listed": report.missing.listed},
        "differs": {"count": report.differs.count, "listed": report.differs.listed},
        "unknown": {"count": report.unknown.count, "listed": report.unknown.listed},
        "in_flight": report.inflight,
        "ahead": ahead,
        "repair": options.repair.then(|| json!({
            "requeued": report.requeued,
            "lowered": report.lowered,
            "deleted_unknown": report.deleted,
        })),
    })
}

fn print(report: &Report, ahead: Option<usize>, options: Options) -> anyhow::Result<()> {
    let v = render(report, ahead, options);
    if options.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let ahead = ahead.map_or("ahead not checked".to_owned(), |n| format!("{n} ahead"));
    println!(
        "audit --all: {} aggregates, {} documents: {} missing, {} differ, {} unknown, {} in flight, {ahead}",
        report.aggregates,
        report.documents,
        report.missing.count,
        report.differs.count,
        report.unknown.count,
        report.inflight
    );
    for (kind, found) in [
        ("missing", &report.missing),
        ("differs", &report.differs),
        ("unknown", &report.unknown),
    ] {
        for item in found.listed.iter().take(TEXT_LIST) {
            println!("  {kind:<8} {item}");
        }
        if found.count > TEXT_LIST as u64 {
            println!("  … and {} more {kind}", found.count - TEXT_LIST as u64);
        }
    }
    if options.repair {
        println!(
            "requeued {}, lowered {} to outbox_id 0, deleted {} unknown",
            report.requeued, report.lowered, report.deleted
        );
    }
    Ok(())
}
