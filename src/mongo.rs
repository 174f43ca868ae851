//! The MongoDB sink: one document per aggregate, written only forwards.
//!
//! A batch's aggregates that PostgreSQL has not synced before go first as one
//! unordered insert: a new aggregate's document is written at once. The others
//! (`Claimed::known`), and the ids the insert finds existing (11000), take a
//! guarded upsert, `{_id: agg, outbox_id: {$not: {$gte: m}}}` with `$set` (`$lt` would
//! never match a document without a numeric `outbox_id`). No match on an existing
//! document means it is already at m or newer; the upsert's insert then fails with
//! duplicate key 11000 on `_id`, which counts as success once a read finds the
//! document at m or newer. A duplicate key on any other unique index (one the
//! portal added, say) is a rejection: the row fails, naming the index. MongoDB's
//! 11000 carries its `keyPattern` and index name; FerretDB's names neither, so the
//! read that finds no document with the `_id` tells it apart, and the collection's
//! unique indexes are searched for the one that refused it. Only insert,
//! update/upsert, find, listIndexes, `$set`, `$not`, `$gte`, `$ne` and code 11000
//! are used, all of which MongoDB ≥ 5.0 and FerretDB 1.24 support.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::StreamExt;
use mongodb::bson::{self, Bson, Document, doc};
use mongodb::error::{Error as MongoError, ErrorKind};
use mongodb::options::{Acknowledgment, ClientOptions, DatabaseOptions, WriteConcern};
use mongodb::{Client, Database};
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;

use crate::config::{Invalid, MongoConfig, W};
use crate::money::Amount;
use crate::outbox::Claimed;

const DUPLICATE_KEY: i32 = 11000;
/// Server error codes that reject the document itself, so retrying cannot help:
/// bad values and types, bad field names, `_id` problems, validation, size.
/// Every other code is retried with backoff, and fails the row only after
/// `relay.max_attempts`: FerretDB answers a failure of its own backend with
/// code 1, and a permissions mistake is code 13; neither may fail a backlog.
const REJECTED_CODES: &[i32] = &[2, 14, 22, 28, 30, 52, 53, 55, 56, 57, 66, 121, 10334, 17280];
/// FerretDB 1.24 answers an update that collides with a unique index with its
/// PostgreSQL backend's error (code 1), not 11000.
const FERRETDB_UNIQUE_VIOLATION: &str = "duplicate key value violates unique constraint";
/// A document past MongoDB's 16 MiB limit, less room for `_id`, fails alone,
/// before it is sent: in a command with others it would fail them all.
const MAX_DOCUMENT_BYTES: usize = 16 * 1024 * 1024 - 64 * 1024;
/// The documents of one `insert` command: well under the 16 MiB a command may
/// hold, however large `relay.batch_size` and the documents are.
const MAX_INSERT_BYTES: usize = 8 * 1024 * 1024;

/// A connected sink: the database named in the URL and the target collection.
#[derive(Clone)]
pub struct Sink {
    client: Client,
    db: Database,
    collection: String,
    timeout: Duration,
    /// Every insert's and update's `writeConcern` (`mongodb.write_concern`).
    concern: Document,
}

/// The outcome of applying one message.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Written: the document now holds this message (or, for an older message
    /// coalesced into it, the batch's newest of the aggregate). `apply` also
    /// answers it for `AlreadyNewer`.
    Applied,
    /// Nothing written: the document already held a newer message. Only
    /// `apply_detailed` answers it.
    AlreadyNewer,
    /// Worth retrying later: the server answered that it failed, or the
    /// command was never sent.
    Transient(String),
    /// No answer (in time, or the connection failed once the command may have
    /// left): retry later, but the write may still land meanwhile.
    Unanswered(String),
    /// The document was rejected; retrying cannot help.
    Permanent(String),
    /// Not sent: the batch's lease would end before the write could finish, or
    /// the relay is shutting down.
    Late,
    /// Not tried: coalesced into a newer message of its aggregate, which was
    /// rejected. Alone, it may well be written.
    Untried,
}

/// When writes may no longer start: the last instant a write can still finish
/// within the batch's lease, or shutdown, whichever comes first.
#[derive(Clone, Debug)]
pub struct StartBy {
    last: Instant,
    stop: CancellationToken,
}

impl StartBy {
    pub fn new(last: Instant, stop: CancellationToken) -> StartBy {
        StartBy { last, stop }
    }

    fn passed(&self) -> bool {
        self.stop.is_cancelled() || Instant::now() > self.last
    }
}

impl From<Instant> for StartBy {
    fn from(last: Instant) -> StartBy {
        StartBy::new(last, CancellationToken::new())
    }
}

/// Builds a client with bounded timeouts; it connects lazily.
pub async fn connect(config: &MongoConfig) -> anyhow::Result<Sink> {
    let mut options = ClientOptions::parse(config.url.expose_secret())
        .await
        .map_err(|e| {
            // A malformed URL is the configuration's fault; a failed SRV lookup is not.
            match *e.kind {
                ErrorKind::InvalidArgument { .. } => {
                    anyhow::Error::from(Invalid(malformed_url(config.url.expose_secret(), &e)))
                }
                _ => anyhow::anyhow!("invalid `mongodb.url` (MONGODB_URL): {}", redact(&e)),
            }
        })?;
    let timeout = Duration::from_millis(config.timeout_ms);
    options.server_selection_timeout = Some(timeout);
    options.connect_timeout = Some(timeout);
    options.app_name.get_or_insert_with(|| "outboxd".into());
    let db_name = options
        .default_database
        .clone()
        .unwrap_or_else(|| "outboxd".into());
    let w = config.w().map_err(Invalid)?;
    let client = Client::with_options(options).context("cannot create the MongoDB client")?;
    // The operator commands' repairs (typed collection calls) take it from here.
    let acknowledgment = match w {
        W::Majority => Acknowledgment::Majority,
        W::Members(n) => Acknowledgment::Nodes(u32::from(n)),
    };
    let concern = WriteConcern::builder()
        .w(acknowledgment)
        .journal(config.journal)
        .build();
    let db = client.database_with_options(
        &db_name,
        DatabaseOptions::builder().write_concern(concern).build(),
    );
    Ok(Sink {
        db,
        client,
        collection: config.collection.clone(),
        timeout,
        concern: write_concern(w, config.journal),
    })
}

/// The `writeConcern` of every write. Sent with each command, since a concern
/// in the URL does not reach commands run as `run_command`. "majority" by
/// default: a write only one member has may be rolled back at a failover,
/// after PostgreSQL has marked its row synced.
fn write_concern(w: W, journal: Option<bool>) -> Document {
    let mut concern = match w {
        W::Majority => doc! { "w": "majority" },
        W::Members(n) => doc! { "w": i32::from(n) },
    };
    if let Some(j) = journal {
        concern.insert("j", j);
    }
    concern
}

/// Why the URL was refused. The driver splits a URL at its first `?` before it
/// looks for the credentials' `@`, so its reason can quote part of a password
/// that holds an unencoded `?`, `/` or `#`; with credentials in the URL, it is
/// withheld.
fn malformed_url(url: &str, err: &MongoError) -> String {
    let reason = if url.contains('@') {
        "not a valid MongoDB URL (the reason is withheld, since the URL holds \
         credentials); percent-encode any `:` `/` `?` `#` `[` `]` `@` in the \
         user name and password"
            .to_string()
    } else {
        err.to_string()
    };
    format!("invalid `mongodb.url` (MONGODB_URL): {reason}")
}

/// A MongoDB error as text, without the URL or credentials.
pub fn redact(err: &MongoError) -> String {
    match &*err.kind {
        ErrorKind::Authentication { .. } => "authentication failed".into(),
        // Not the error's own text: it appends the server's raw reply, which
        // may quote the document, as a hex dump.
        ErrorKind::Command(c) => {
            format!("MongoDB error {} ({}): {}", c.code, c.code_name, c.message)
        }
        kind => kind.to_string(),
    }
}

impl Sink {
    pub fn database(&self) -> &Database {
        &self.db
    }

    pub fn collection_name(&self) -> &str {
        &self.collection
    }

    /// How long one call may take before it counts as unanswered.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Ends the driver's sessions and background tasks while the runtime still
    /// runs. Left to `Drop`, that clean-up races the runtime's own shutdown, and
    /// the driver can panic as the process exits.
    pub async fn shutdown(&self) {
        let done = self.client.clone().shutdown().immediate(true);
        let _ = tokio::time::timeout(self.timeout.min(Duration::from_secs(1)), done).await;
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
    ///
    /// No write starts after `start_by`: one started later could outlive the
    /// batch's lease, while another relay already writes the same aggregate; and
    /// at shutdown, rows not yet sent are better given back than held. Their
    /// rows answer `Late`.
    pub async fn apply(
        &self,
        rows: &[Claimed],
        concurrency: usize,
        start_by: impl Into<StartBy>,
    ) -> HashMap<i64, Outcome> {
        let mut outcomes = self.apply_detailed(rows, concurrency, start_by).await;
        for outcome in outcomes.values_mut() {
            if *outcome == Outcome::AlreadyNewer {
                *outcome = Outcome::Applied;
            }
        }
        outcomes
    }

    /// `apply`, telling a write that changed the document (`Applied`) from one
    /// that found it already newer (`AlreadyNewer`): only the first notifies.
    pub async fn apply_detailed(
        &self,
        rows: &[Claimed],
        concurrency: usize,
        start_by: impl Into<StartBy>,
    ) -> HashMap<i64, Outcome> {
        let start_by = start_by.into();
        let mut outcomes = HashMap::with_capacity(rows.len());
        let mut newest: HashMap<&str, Write> = HashMap::new();
        for row in rows {
            match document(row) {
                Err(reason) => {
                    outcomes.insert(row.id, Outcome::Permanent(reason));
                }
                Ok(doc) => {
                    let write = Write {
                        id: row.id,
                        aggregate_id: row.aggregate_id.clone(),
                        known: row.known,
                        doc,
                    };
                    match newest.entry(&row.aggregate_id) {
                        Entry::Vacant(e) => {
                            e.insert(write);
                        }
                        Entry::Occupied(mut e) if e.get().id < row.id => {
                            e.insert(write);
                        }
                        Entry::Occupied(_) => {}
                    }
                }
            }
        }
        // Sized once coalesced: a document too large for MongoDB fails its
        // aggregate's rows here, alone, instead of the command it would join.
        let written: HashMap<&str, i64> = newest.iter().map(|(a, w)| (*a, w.id)).collect();
        let mut too_large = Vec::new();
        let mut writes = Vec::with_capacity(newest.len());
        let mut buffer = Vec::new();
        for write in newest.into_values() {
            buffer.clear();
            match write.doc.to_writer(&mut buffer) {
                Ok(()) if buffer.len() <= MAX_DOCUMENT_BYTES => writes.push((write, buffer.len())),
                Ok(()) => too_large.push((
                    write.aggregate_id,
                    Outcome::Permanent(format!(
                        "the document is {} bytes, past MongoDB's limit of 16 MiB",
                        buffer.len()
                    )),
                )),
                Err(e) => too_large.push((
                    write.aggregate_id,
                    Outcome::Permanent(format!("the document cannot be encoded: {e}")),
                )),
            }
        }
        // Aggregates seen for the first time are created by one insert; an
        // existing `_id` answers 11000 and takes the guarded update. An insert
        // never overwrites, so it cannot move a document backwards. Known
        // aggregates skip it: on FerretDB a failed insert costs about as much
        // as the update that follows it.
        let (known, new): (Vec<_>, Vec<_>) = writes.into_iter().partition(|(w, _)| w.known);
        let (mut by_aggregate, mut existing) = self.insert_new(new, &start_by).await;
        existing.extend(known.into_iter().map(|(w, _)| w));
        by_aggregate.extend(too_large);
        // One single-statement command per aggregate, `concurrency` at a time:
        // FerretDB runs a multi-statement update command far slower than the
        // same statements sent concurrently (docs/benchmarks.md).
        // Owned futures: borrowed ones trip the compiler's Send inference in spawned tasks.
        let sink = self.clone();
        let updated: Vec<(String, Outcome)> = futures_util::stream::iter(existing)
            .map(move |write: Write| {
                let sink = sink.clone();
                let start_by = start_by.clone();
                async move {
                    let outcome = sink.write_guarded(&write, &start_by).await;
                    (write.aggregate_id, outcome)
                }
            })
            .buffer_unordered(concurrency.max(1))
            .collect()
            .await;
        by_aggregate.extend(updated);
        for row in rows {
            if outcomes.contains_key(&row.id) {
                continue;
            }
            // Older messages of an aggregate share the newest one's outcome, but
            // not its rejection, which is that message's own fault.
            let outcome = match by_aggregate.get(row.aggregate_id.as_str()) {
                Some(Outcome::Permanent(_)) if written[row.aggregate_id.as_str()] != row.id => {
                    Outcome::Untried
                }
                Some(outcome) => outcome.clone(),
                None => Outcome::Transient("no outcome recorded".into()),
            };
            outcomes.insert(row.id, outcome);
        }
        outcomes
    }

    /// Inserts the documents of `rows` (each with its encoded size) in unordered
    /// commands of at most `MAX_INSERT_BYTES` (one, but for huge batches).
    /// Answers the outcome per aggregate, and the rows whose document already
    /// exists. Rows of a command not sent answer `Late` past `start_by`, or
    /// `Transient` after a command failed for want of the server: the next
    /// would likely fail alike, and wait out another timeout within the lease.
    async fn insert_new(
        &self,
        rows: Vec<(Write, usize)>,
        start_by: &StartBy,
    ) -> (HashMap<String, Outcome>, Vec<Write>) {
        let mut outcomes = HashMap::with_capacity(rows.len());
        let mut existing = Vec::new();
        let mut server_failed: Option<String> = None;
        let mut rows = rows.into_iter().peekable();
        while rows.peek().is_some() {
            let mut chunk = Vec::new();
            let mut bytes = 0;
            while let Some((row, size)) =
                rows.next_if(|(_, size)| chunk.is_empty() || bytes + size <= MAX_INSERT_BYTES)
            {
                bytes += size;
                chunk.push(row);
            }
            let not_sent = match &server_failed {
                Some(error) => Some(Outcome::Transient(format!(
                    "not sent: an earlier insert of the batch failed: {error}"
                ))),
                None if start_by.passed() => Some(Outcome::Late),
                None => None,
            };
            if let Some(outcome) = not_sent {
                outcomes.extend(chunk.into_iter().map(|r| (r.aggregate_id, outcome.clone())));
                continue;
            }
            match self.insert_chunk(chunk).await {
                Ok((done, exist)) => {
                    outcomes.extend(done);
                    existing.extend(exist);
                }
                Err((done, outcome)) => {
                    outcomes.extend(done);
                    if let Outcome::Transient(error) | Outcome::Unanswered(error) = outcome {
                        server_failed = Some(error);
                    }
                }
            }
        }
        (outcomes, existing)
    }

    /// One insert command. `Err` when the command itself failed: every row's
    /// outcome, and that outcome.
    async fn insert_chunk(&self, rows: Vec<Write>) -> Result<Inserted, (Outcomes, Outcome)> {
        let mut outcomes = HashMap::with_capacity(rows.len());
        let mut documents = Vec::with_capacity(rows.len());
        for row in &rows {
            let mut doc = Document::new();
            doc.insert("_id", &row.aggregate_id);
            doc.extend(row.doc.clone());
            documents.push(doc);
        }
        let command = doc! {
            "insert": &self.collection, "documents": documents, "ordered": false,
            "writeConcern": &self.concern,
        };
        let reply = match self.run_write(command).await {
            Ok(reply) => reply,
            Err(outcome) => {
                let outcomes = rows
                    .into_iter()
                    .map(|r| (r.aggregate_id, outcome.clone()))
                    .collect();
                return Err((outcomes, outcome));
            }
        };
        let (mut errors, concern) = write_errors(&reply);
        let mut existing = Vec::new();
        for (index, row) in rows.into_iter().enumerate() {
            let outcome = match (errors.remove(&index), &concern) {
                // On `_id`, or maybe (FerretDB): the guarded update finds out.
                (
                    Some(WriteError {
                        code: DUPLICATE_KEY,
                        index: Index::Id | Index::Unknown,
                        ..
                    }),
                    _,
                ) => {
                    existing.push(row);
                    continue;
                }
                (Some(error), _) => error.outcome(),
                (None, Some(message)) => Outcome::Transient(message.clone()),
                (None, None) => Outcome::Applied,
            };
            outcomes.insert(row.aggregate_id, outcome);
        }
        Ok((outcomes, existing))
    }

    /// One guarded upsert. A duplicate key on `_id` is retried once: it may be a
    /// racing first insert of an older message, not a newer document.
    async fn write_guarded(&self, row: &Write, start_by: &StartBy) -> Outcome {
        let command = doc! {
            "update": &self.collection,
            "updates": [{
                // Not `$lt`: a document from before outboxd, without a numeric
                // `outbox_id`, must match too, or it could never be written.
                "q": { "_id": &row.aggregate_id, "outbox_id": { "$not": { "$gte": row.id } } },
                "u": { "$set": &row.doc },
                "upsert": true,
            }],
            "writeConcern": &self.concern,
        };
        for round in 0..2 {
            if start_by.passed() {
                return Outcome::Late;
            }
            let reply = match self.run_write(command.clone()).await {
                Ok(reply) => reply,
                Err(Outcome::Permanent(e)) if e.contains(FERRETDB_UNIQUE_VIOLATION) => {
                    return self.refused_by_index(row).await;
                }
                Err(outcome) => return outcome,
            };
            let (errors, concern) = write_errors(&reply);
            if let Some(message) = concern {
                return Outcome::Transient(message);
            }
            return match errors.into_values().next() {
                None => Outcome::Applied,
                Some(WriteError {
                    code: DUPLICATE_KEY,
                    index: Index::Id | Index::Unknown,
                    ..
                }) if round == 0 => continue,
                Some(WriteError {
                    code: DUPLICATE_KEY,
                    index: Index::Id | Index::Unknown,
                    ..
                }) => self.holds(row).await,
                Some(error) => error.outcome(),
            };
        }
        Outcome::Applied
    }

    /// After a guarded write matched nothing and its insert hit a duplicate key:
    /// `Applied` if the document holds exactly this message (an earlier try wrote
    /// it, and its mark was lost, so its notification is still owed),
    /// `AlreadyNewer` if it holds a newer one. No document with the `_id` means the
    /// duplicate was on another unique index: a rejection.
    async fn holds(&self, row: &Write) -> Outcome {
        let command = doc! {
            "find": &self.collection,
            "filter": { "_id": &row.aggregate_id },
            "projection": { "outbox_id": 1 },
            "limit": 1,
        };
        let reply = match self.run_write(command).await {
            Ok(reply) => reply,
            Err(outcome) => return outcome,
        };
        let Some(found) = first_batch(&reply).first().and_then(Bson::as_document) else {
            return self.refused_by_index(row).await;
        };
        match found.get("outbox_id") {
            Some(Bson::Int64(id)) if *id == row.id => Outcome::Applied,
            Some(Bson::Int32(id)) if i64::from(*id) == row.id => Outcome::Applied,
            Some(Bson::Int64(id)) if *id > row.id => Outcome::AlreadyNewer,
            Some(Bson::Int32(id)) if i64::from(*id) > row.id => Outcome::AlreadyNewer,
            // Older, or not outboxd's: the guard should have matched. A race
            // with a writer outside outboxd; try again later.
            _ => Outcome::Transient(
                "duplicate key, yet the document does not hold this message or a newer one".into(),
            ),
        }
    }

    /// The rejection of a document that a unique index other than `_id` refused,
    /// naming the index: the first whose key another document already holds.
    /// FerretDB's duplicate-key error does not say which.
    async fn refused_by_index(&self, row: &Write) -> Outcome {
        let reply = match self
            .run_write(doc! { "listIndexes": &self.collection })
            .await
        {
            Ok(reply) => reply,
            Err(outcome) => return outcome,
        };
        let mut unique = Vec::new();
        for index in first_batch(&reply).iter().filter_map(Bson::as_document) {
            let Ok(key) = index.get_document("key") else {
                continue;
            };
            if !index.get_bool("unique").unwrap_or(false) || key.keys().all(|k| k == "_id") {
                continue;
            }
            let name = index.get_str("name").unwrap_or("unnamed").to_owned();
            let mut filter = doc! { "_id": { "$ne": &row.aggregate_id } };
            for field in key.keys() {
                let value = if field == "_id" {
                    Bson::String(row.aggregate_id.clone())
                } else {
                    row.doc.get(field).cloned().unwrap_or(Bson::Null)
                };
                filter.insert(field, value);
            }
            let command = doc! {
                "find": &self.collection, "filter": filter, "projection": { "_id": 1 }, "limit": 1,
            };
            match self.run_write(command).await {
                Ok(found) if !first_batch(&found).is_empty() => {
                    return Outcome::Permanent(duplicate_on(&name));
                }
                Ok(_) => unique.push(name),
                Err(outcome) => return outcome,
            }
        }
        Outcome::Permanent(if unique.is_empty() {
            "MongoDB rejected the document: duplicate key on a unique index other than `_id`".into()
        } else {
            format!(
                "MongoDB rejected the document: duplicate key on one of the unique indexes {}",
                unique.join(", ")
            )
        })
    }

    /// Runs one command (a write, or `holds`'s read). `Err` is the outcome of
    /// every document in it.
    async fn run_write(&self, command: Document) -> Result<Document, Outcome> {
        // The driver has no per-operation timeout; a server that stops answering
        // must not hold the batch (and its aggregates' locks) forever.
        match tokio::time::timeout(self.timeout, self.db.run_command(command)).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(e)) => Err(classify(&e)),
            Err(_) => Err(Outcome::Unanswered(format!(
                "no answer from MongoDB within {:?}",
                self.timeout
            ))),
        }
    }
}

/// A cursor reply's first batch (`find`, `listIndexes`).
fn first_batch(reply: &Document) -> &[Bson] {
    reply
        .get_document("cursor")
        .ok()
        .and_then(|c| c.get_array("firstBatch").ok())
        .map_or(&[], Vec::as_slice)
}

/// One document's error in a write reply.
#[derive(Debug, PartialEq)]
struct WriteError {
    code: i32,
    message: String,
    /// For a duplicate key: the index it is on.
    index: Index,
}

/// The index a duplicate-key error is on.
#[derive(Debug, PartialEq)]
enum Index {
    Id,
    Other(String),
    /// Not said (FerretDB).
    Unknown,
}

impl WriteError {
    fn parse(e: &Document) -> WriteError {
        let code = e.get_i32("code").unwrap_or(0);
        let message = e.get_str("errmsg").unwrap_or("write error").to_owned();
        // MongoDB: "E11000 duplicate key error collection: db.c index: ticket_id_1 dup key: { ... }".
        let named = message
            .split_once(" index: ")
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .map(str::to_owned);
        let index = match (e.get_document("keyPattern").ok(), named) {
            (Some(key), _) if !key.is_empty() && key.keys().all(|k| k == "_id") => Index::Id,
            (_, Some(name)) if name == "_id_" => Index::Id,
            (_, Some(name)) => Index::Other(name),
            (Some(key), None) if !key.is_empty() => {
                Index::Other(key.keys().cloned().collect::<Vec<_>>().join(", "))
            }
            _ => Index::Unknown,
        };
        WriteError {
            code,
            message,
            index,
        }
    }

    /// The outcome of an error that is no duplicate key on `_id`.
    fn outcome(&self) -> Outcome {
        match &self.index {
            Index::Other(name) if self.code == DUPLICATE_KEY => {
                Outcome::Permanent(duplicate_on(name))
            }
            _ => rejected(self.code, &self.message),
        }
    }
}

/// The rejection by unique index `name`.
fn duplicate_on(name: &str) -> String {
    format!(
        "MongoDB rejected the document: duplicate key on unique index `{name}` (another document holds its value)"
    )
}

/// A write reply's per-document errors by index, and its write-concern error.
fn write_errors(reply: &Document) -> (HashMap<usize, WriteError>, Option<String>) {
    let mut errors = HashMap::new();
    if let Ok(list) = reply.get_array("writeErrors") {
        for e in list.iter().filter_map(Bson::as_document) {
            let index = e.get_i32("index").map(|i| i as usize).unwrap_or(usize::MAX);
            errors.insert(index, WriteError::parse(e));
        }
    }
    let concern = reply.get_document("writeConcernError").ok().map(|e| {
        format!(
            "write concern error: {}",
            e.get_str("errmsg").unwrap_or("unknown")
        )
    });
    (errors, concern)
}

/// The outcome of a per-document write error other than a duplicate key.
fn rejected(code: i32, message: &str) -> Outcome {
    if REJECTED_CODES.contains(&code) {
        Outcome::Permanent(format!(
            "MongoDB rejected the document (code {code}): {message}"
        ))
    } else {
        Outcome::Transient(format!("MongoDB error {code}: {message}"))
    }
}

/// The newest message of one aggregate in a batch, ready to write.
struct Write {
    id: i64,
    aggregate_id: String,
    /// `Claimed::known`: no insert is tried first.
    known: bool,
    doc: Document,
}

/// Outcomes by aggregate.
type Outcomes = HashMap<String, Outcome>;
/// An insert's outcomes, and the writes whose document already exists.
type Inserted = (Outcomes, Vec<Write>);

/// The document fields for one message; `Err` names what makes the payload unusable.
pub fn document(row: &Claimed) -> Result<Document, String> {
    if row.operation != crate::idempotency::UPDATE_CREDITOR_DEBT {
        return Err(format!("unknown operation `{}`", row.operation));
    }
    let p = row.payload.as_ref().map_err(String::clone)?;
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

/// Command-level failures: transient unless the server rejected the document, or
/// the driver could not encode it.
fn classify(err: &MongoError) -> Outcome {
    let text = redact(err);
    let transient = match &*err.kind {
        ErrorKind::Command(c) if c.code == 1 && c.message.contains(FERRETDB_UNIQUE_VIOLATION) => {
            false
        }
        // A write concern the server cannot meet (say `w: 2` on a standalone) is
        // the configuration's fault, not the rows': it must not fail them at once.
        ErrorKind::Command(c) if mentions_write_concern(&c.message) => true,
        ErrorKind::Command(c) => !REJECTED_CODES.contains(&c.code),
        ErrorKind::Write(_)
        | ErrorKind::InvalidArgument { .. }
        | ErrorKind::BsonSerialization(_) => false,
        // The connection failed, or the driver cleared its pool (a heartbeat
        // timed out), perhaps after the command left: the write may yet land,
        // so the aggregate stays held as after a timeout.
        ErrorKind::Io(_)
        | ErrorKind::ConnectionPoolCleared { .. }
        | ErrorKind::InvalidResponse { .. }
            if !err.contains_label("NoWritesPerformed") =>
        {
            return Outcome::Unanswered(text);
        }
        _ => true,
    };
    if transient || err.contains_label("RetryableWriteError") {
        Outcome::Transient(text)
    } else {
        Outcome::Permanent(text)
    }
}

/// Whether a command error is about the write concern (`mongodb.write_concern`).
fn mentions_write_concern(message: &str) -> bool {
    let message = message.to_ascii_lowercase();
    message.contains("write concern") || message.contains("writeconcern") || message.contains("'w'")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_write_concern_is_majority_unless_set() {
        let config = MongoConfig::default();
        assert_eq!(
            write_concern(config.w().unwrap(), config.journal),
            doc! { "w": "majority" }
        );
        assert_eq!(
            write_concern(W::Members(1), Some(true)),
            doc! { "w": 1, "j": true }
        );
    }

    #[test]
    fn a_write_concern_refused_is_no_fault_of_the_rows() {
        assert!(mentions_write_concern(
            "cannot use 'w' > 1 with a standalone"
        ));
        assert!(mentions_write_concern(
            "Not enough data-bearing nodes to satisfy write concern"
        ));
        assert!(!mentions_write_concern("Document failed validation"));
    }

    #[test]
    fn a_duplicate_key_names_its_index() {
        // MongoDB's shape: keyPattern, keyValue, and the index in errmsg.
        let on_id = doc! {
            "index": 0, "code": 11000,
            "errmsg": "E11000 duplicate key error collection: outboxd.creditor_debts index: _id_ dup key: { _id: \"A/K\" }",
            "keyPattern": { "_id": 1 }, "keyValue": { "_id": "A/K" },
        };
        assert_eq!(WriteError::parse(&on_id).index, Index::Id);
        let on_ticket = doc! {
            "index": 0, "code": 11000,
            "errmsg": "E11000 duplicate key error collection: outboxd.creditor_debts index: ticket_unique dup key: { ticket_id: 7 }",
            "keyPattern": { "ticket_id": 1 }, "keyValue": { "ticket_id": 7 },
        };
        let error = WriteError::parse(&on_ticket);
        assert_eq!(error.index, Index::Other("ticket_unique".into()));
        assert!(matches!(error.outcome(), Outcome::Permanent(r) if r.contains("`ticket_unique`")));
        // Only a key pattern, or only the message.
        let pattern_only =
            doc! { "code": 11000, "errmsg": "E11000", "keyPattern": { "ticket_id": 1 } };
        assert_eq!(
            WriteError::parse(&pattern_only).index,
            Index::Other("ticket_id".into())
        );
        let message_only = doc! { "code": 11000, "errmsg": "E11000 duplicate key error collection: d.c index: _id_ dup key: { _id: 1 }" };
        assert_eq!(WriteError::parse(&message_only).index, Index::Id);
        // FerretDB 1.24's shape says neither.
        let ferretdb = doc! { "index": 0, "code": 11000, "errmsg": "E11000 duplicate key error collection: outboxd.creditor_debts" };
        assert_eq!(WriteError::parse(&ferretdb).index, Index::Unknown);
    }

    #[test]
    fn only_a_rejected_document_fails_at_once() {
        // FerretDB's backend failing (1), permissions (13), no primary (10107).
        for code in [1, 13, 10107, 11600, 99999] {
            assert!(
                matches!(rejected(code, "x"), Outcome::Transient(_)),
                "{code}"
            );
        }
        // Validation, bad field name, too large.
        for code in [121, 52, 10334] {
            assert!(
                matches!(rejected(code, "x"), Outcome::Permanent(_)),
                "{code}"
            );
        }
    }
}
