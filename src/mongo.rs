//! The MongoDB sink: one document per aggregate, written only forwards.
//!
//! Each write is a guarded upsert, `{_id: agg, outbox_id: {$lt: m}}` with `$set`.
//! No match on an existing document means it is already at m or newer; the upsert's
//! insert then fails with duplicate key 11000, which counts as success. Only
//! update/upsert, `$set` and code 11000 are used, all of which MongoDB ≥ 5.0 and
//! FerretDB 1.24 support.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use mongodb::bson::{self, Bson, Document, doc};
use mongodb::error::{Error as MongoError, ErrorKind};
use mongodb::options::ClientOptions;
use mongodb::{Client, Database};
use secrecy::ExposeSecret;

use crate::config::MongoConfig;
use crate::money::Amount;
use crate::outbox::Claimed;

const DUPLICATE_KEY: i32 = 11000;
/// Server error codes that mean "try again later" (not primary, shutting down, timeouts).
const TRANSIENT_CODES: &[i32] = &[
    6, 7, 50, 89, 91, 112, 189, 262, 9001, 10107, 11600, 11602, 13435, 13436,
];

/// A connected sink: the database named in the URL and the target collection.
#[derive(Clone)]
pub struct Sink {
    db: Database,
    collection: String,
}

/// The outcome of applying one message.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Written, or the document already held this message or a newer one.
    Applied,
    /// Worth retrying later: the server or the network failed.
    Transient(String),
    /// The document was rejected; retrying cannot help.
    Permanent(String),
}

/// Builds a client with bounded timeouts; it connects lazily.
pub async fn connect(config: &MongoConfig) -> anyhow::Result<Sink> {
    let mut options = ClientOptions::parse(config.url.expose_secret())
        .await
        .map_err(|e| anyhow::anyhow!("invalid `mongodb.url` (MONGODB_URL): {}", redact(&e)))?;
    let timeout = Duration::from_millis(config.timeout_ms);
    options.server_selection_timeout = Some(timeout);
    options.connect_timeout = Some(timeout);
    options.app_name.get_or_insert_with(|| "outboxd".into());
    let db_name = options
        .default_database
        .clone()
        .unwrap_or_else(|| "outboxd".into());
    let client = Client::with_options(options).context("cannot create the MongoDB client")?;
    Ok(Sink {
        db: client.database(&db_name),
        collection: config.collection.clone(),
    })
}

/// A MongoDB error as text, without the URL or credentials.
pub fn redact(err: &MongoError) -> String {
    match &*err.kind {
        ErrorKind::Authentication { .. } => "authentication failed".into(),
        _ => err.to_string(),
    }
}

impl Sink {
    pub fn database(&self) -> &Database {
        &self.db
    }

    pub fn collection_name(&self) -> &str {
        &self.collection
    }

    /// A round trip to the server.
    pub async fn ping(&self) -> Result<(), MongoError> {
        self.db.run_command(doc! { "ping": 1 }).await.map(|_| ())
    }

    /// The server's version, by `buildInfo`.
    pub async fn server_version(&self) -> Result<String, MongoError> {
        let info = self.db.run_command(doc! { "buildInfo": 1 }).await?;
        Ok(info.get_str("version").unwrap_or("unknown").to_owned())
    }

    /// Applies a batch: coalesces messages per aggregate to the newest, writes those in
    /// `concurrency` update commands, and answers an outcome per message id.
    pub async fn apply(&self, rows: &[Claimed], concurrency: usize) -> HashMap<i64, Outcome> {
        let mut outcomes = HashMap::with_capacity(rows.len());
        let mut newest: HashMap<&str, &Claimed> = HashMap::new();
        for row in rows {
            match document(row) {
                Err(reason) => {
                    outcomes.insert(row.id, Outcome::Permanent(reason));
                }
                Ok(_) => {
                    let entry = newest.entry(&row.aggregate_id).or_insert(row);
                    if row.id > entry.id {
                        *entry = row;
                    }
                }
            }
        }
        let mut writes: Vec<&Claimed> = newest.into_values().collect();
        writes.sort_by_key(|r| r.id);
        let chunk = writes.len().div_ceil(concurrency.max(1)).max(1);
        let results =
            futures_util::future::join_all(writes.chunks(chunk).map(|c| self.write_guarded(c)))
                .await;
        let by_aggregate: HashMap<&str, Outcome> = results.into_iter().flatten().collect();
        for row in rows {
            if outcomes.contains_key(&row.id) {
                continue;
            }
            // Older messages of an aggregate share the newest one's outcome.
            let outcome = by_aggregate
                .get(row.aggregate_id.as_str())
                .cloned()
                .unwrap_or_else(|| Outcome::Transient("no outcome recorded".into()));
            outcomes.insert(row.id, outcome);
        }
        outcomes
    }

    /// One `update` command with a guarded upsert per row. A duplicate key is retried
    /// once: it may be a racing first insert of an older message, not a newer document.
    async fn write_guarded<'a>(&self, rows: &[&'a Claimed]) -> Vec<(&'a str, Outcome)> {
        let mut pending: Vec<&'a Claimed> = rows.to_vec();
        let mut done = Vec::with_capacity(rows.len());
        for round in 0..2 {
            if pending.is_empty() {
                break;
            }
            let updates: Vec<Document> = pending
                .iter()
                .map(|row| {
                    let doc = document(row).expect("checked before");
                    doc! {
                        "q": { "_id": &row.aggregate_id, "outbox_id": { "$lt": row.id } },
                        "u": { "$set": doc },
                        "upsert": true,
                    }
                })
                .collect();
            let command = doc! { "update": &self.collection, "updates": updates, "ordered": false };
            let reply = match self.db.run_command(command).await {
                Ok(reply) => reply,
                Err(e) => {
                    let outcome = classify(&e);
                    done.extend(
                        pending
                            .iter()
                            .map(|r| (r.aggregate_id.as_str(), outcome.clone())),
                    );
                    return done;
                }
            };
            let mut errors: HashMap<usize, (i32, String)> = HashMap::new();
            if let Ok(list) = reply.get_array("writeErrors") {
                for e in list.iter().filter_map(Bson::as_document) {
                    let index = e.get_i32("index").map(|i| i as usize).unwrap_or(usize::MAX);
                    let code = e.get_i32("code").unwrap_or(0);
                    let message = e.get_str("errmsg").unwrap_or("write error").to_owned();
                    errors.insert(index, (code, message));
                }
            }
            let concern_error = reply.get_document("writeConcernError").ok().map(|e| {
                format!(
                    "write concern error: {}",
                    e.get_str("errmsg").unwrap_or("unknown")
                )
            });
            let mut retry = Vec::new();
            for (index, row) in pending.iter().enumerate() {
                let outcome = match errors.get(&index) {
                    None => match &concern_error {
                        None => Outcome::Applied,
                        Some(message) => Outcome::Transient(message.clone()),
                    },
                    Some((DUPLICATE_KEY, _)) if round == 0 => {
                        retry.push(*row);
                        continue;
                    }
                    Some((DUPLICATE_KEY, _)) => Outcome::Applied,
                    Some((code, message)) if TRANSIENT_CODES.contains(code) => {
                        Outcome::Transient(format!("MongoDB error {code}: {message}"))
                    }
                    Some((code, message)) => Outcome::Permanent(format!(
                        "MongoDB rejected the document (code {code}): {message}"
                    )),
                };
                done.push((row.aggregate_id.as_str(), outcome));
            }
            pending = retry;
        }
        done
    }
}

/// The document fields for one message; `Err` names what makes the payload unusable.
pub fn document(row: &Claimed) -> Result<Document, String> {
    if row.operation != crate::idempotency::UPDATE_CREDITOR_DEBT {
        return Err(format!("unknown operation `{}`", row.operation));
    }
    let p = &row.payload;
    let field = |name: &str| -> Result<String, String> {
        p.get(name)
            .and_then(|v| v.as_str())
            .map(str::to_owned)
            .ok_or_else(|| format!("payload field `{name}` is missing or not a string"))
    };
    let amount_text = field("amount")?;
    let amount = Amount::parse(&amount_text).map_err(|e| format!("payload field `amount` {e}"))?;
    let creditor_reference = match p.get("creditor_reference") {
        None | Some(serde_json::Value::Null) => Bson::Null,
        Some(serde_json::Value::String(s)) => Bson::String(s.clone()),
        Some(_) => return Err("payload field `creditor_reference` is not a string".into()),
    };
    Ok(doc! {
        "client_reference": field("client_reference")?,
        "creditor_name": field("creditor_name")?,
        "creditor_reference": creditor_reference,
        "amount": amount.text,
        "amount_minor": amount.minor,
        "currency": field("currency")?,
        "email_id": row.email_id,
        "ticket_id": row.ticket_id,
        "webhook_id": &row.webhook_id,
        "idempotency_key": &row.idempotency_key,
        "outbox_id": row.id,
        "synced_at": bson::DateTime::now(),
    })
}

/// Command-level failures: network, selection timeout and server state are transient.
fn classify(err: &MongoError) -> Outcome {
    let text = redact(err);
    let transient = match &*err.kind {
        ErrorKind::Command(c) => TRANSIENT_CODES.contains(&c.code),
        ErrorKind::Write(_)
        | ErrorKind::InvalidArgument { .. }
        | ErrorKind::BsonSerialization(_) => false,
        _ => true,
    };
    if transient || err.contains_label("RetryableWriteError") {
        Outcome::Transient(text)
    } else {
        Outcome::Permanent(text)
    }
}
