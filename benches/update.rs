//! The realistic workload: almost every message updates a document that exists.
//!
//! A collection is preloaded with one document per aggregate (`Plan::update_docs`);
//! the backlog's rows update those aggregates, skewed so that some get many
//! messages, and a few create new ones. Drained by 1, 2 and 4 relays, each
//! against the raw loop writing the same rows through the same sink into the
//! same preloaded collection; then commit-to-apply lag through ingest at 200
//! webhooks/s and at half the pipeline's maximum on this workload.

use super::*;

/// Share of backlog rows that update an existing aggregate.
const UPDATE_SHARE: f64 = 0.92;
/// Skew: an existing aggregate is drawn as `docs · u^SKEW` for uniform `u`, so
/// the first 1 % of aggregates get 10 % of the updates.
const SKEW: f64 = 2.0;
/// Offered rate of the fixed-rate lag run, webhooks/s (the issue's).
pub const FIXED_LAG_RATE: f64 = 200.0;

/// The preloaded aggregate `a`: client `MP-U{a}`, creditor reference `K-1`.
fn aggregate(a: i64) -> String {
    format!("MP-U{a}/K-1")
}

/// Writes `docs` documents, one per aggregate of the update workload, each as a
/// relay wrote it for its message in `insert_history`, in unordered inserts.
pub async fn preload(ctx: &Ctx, mongo: &str, docs: i64) -> anyhow::Result<()> {
    if docs == 0 {
        return Ok(());
    }
    let collection = ctx.mongo.database(mongo).collection::<Document>(COLLECTION);
    let now = mongodb::bson::DateTime::now();
    let mut batch = Vec::with_capacity(10_000);
    for a in 0..docs {
        batch.push(doc! {
            "_id": aggregate(a),
            "client_reference": format!("MP-U{a}"),
            "creditor_name": "Sparkasse KölnBonn",
            "creditor_reference": "K-1",
            "amount": "0.00",
            "amount_minor": 0i64,
            "currency": "EUR",
            "email_id": a + 1,
            "ticket_id": a + 1,
            "webhook_id": format!("evt-history-{}", a + 1),
            "idempotency_key": format!("update_creditor_debt:MP-U{a}/K-1:history"),
            "outbox_id": a + 1,
            "synced_at": now,
        });
        if batch.len() == 10_000 || a == docs - 1 {
            collection
                .insert_many(std::mem::take(&mut batch))
                .ordered(false)
                .await
                .context("preloading the update workload's documents")?;
        }
    }
    Ok(())
}

/// The synced message behind each preloaded document, as earlier traffic left
/// it: outbox id `a + 1` for aggregate `a`, synced a day ago. The relay's claim
/// reads them to tell updates from first writes (`Claimed::known`).
pub async fn insert_history(client: &tokio_postgres::Client, docs: i64) -> anyhow::Result<()> {
    if docs == 0 {
        return Ok(());
    }
    client
        .batch_execute(&format!(
            "BEGIN;
             INSERT INTO incoming_emails (id, webhook_id, ticket_id, from_address, subject, body, sync_status)
             SELECT i, 'evt-history-' || i, i, 'forderungen@sparkasse.example',
                    'Forderungsaufstellung', 'Sehr geehrte Damen und Herren', 'synced'
             FROM generate_series(1::int8, {docs}::int8) AS i;
             INSERT INTO outbox_messages (id, operation, aggregate_id, payload, email_id, idempotency_key,
                                          status, created_at, synced_at)
             SELECT i, 'update_creditor_debt', 'MP-U' || (i - 1) || '/K-1',
                    jsonb_build_object('client_reference', 'MP-U' || (i - 1), 'creditor_name', 'Sparkasse KölnBonn',
                                       'amount', '0.00', 'currency', 'EUR', 'creditor_reference', 'K-1'),
                    i, 'update_creditor_debt:MP-U' || (i - 1) || '/K-1:history', 'synced',
                    now() - interval '1 day', now() - interval '1 day'
             FROM generate_series(1::int8, {docs}::int8) AS i;
             COMMIT;
             SELECT setval('incoming_emails_id_seq', {docs});
             SELECT setval('outbox_messages_id_seq', {docs});"
        ))
        .await
        .context("inserting the preloaded documents' history")?;
    Ok(())
}

/// Inserts the history of `docs` preloaded aggregates, then `rows` pending
/// rows: `UPDATE_SHARE` of them for those aggregates (skewed), the rest for new
/// ones, shaped like ingest's rows. The same seed makes the same backlog in
/// every database. Answers the number of documents the collection holds once
/// it is applied.
pub async fn insert_backlog(
    client: &tokio_postgres::Client,
    docs: i64,
    rows: i64,
) -> anyhow::Result<i64> {
    insert_history(client, docs).await?;
    let last = docs + rows;
    client
        .batch_execute(&format!(
            "BEGIN;
             SELECT setseed(0.21);
             CREATE TEMP TABLE backlog AS
                 SELECT i, CASE WHEN random() < {UPDATE_SHARE}
                                THEN 'MP-U' || floor({docs} * power(random(), {SKEW}))::int8
                                ELSE 'MP-N' || i END AS client
                 FROM generate_series({docs}::int8 + 1, {last}::int8) AS i;
             INSERT INTO incoming_emails (id, webhook_id, ticket_id, message_id, from_address, subject, body, received_at)
             SELECT i, 'evt-update-' || i, 100000 + i, '<update-' || i || '@mail.sparkasse.example>',
                    'forderungen@sparkasse.example', 'Forderungsaufstellung Ihr Zeichen ' || client,
                    'Sehr geehrte Damen und Herren, die Forderung beträgt 1.234,56 €.',
                    '2026-11-28T09:15:00Z'
             FROM backlog;
             INSERT INTO outbox_messages (id, operation, aggregate_id, payload, email_id, idempotency_key)
             SELECT i, 'update_creditor_debt', client || '/K-1',
                    jsonb_build_object('client_reference', client, 'creditor_name', 'Sparkasse KölnBonn',
                                       'amount', (i % 100000) || '.' || lpad((i % 100)::text, 2, '0'),
                                       'currency', 'EUR', 'creditor_reference', 'K-1'),
                    i, 'update_creditor_debt:' || client || '/K-1:' || substr(md5(i::text), 1, 16)
             FROM backlog;
             COMMIT;
             SELECT setval('incoming_emails_id_seq', {last});
             SELECT setval('outbox_messages_id_seq', {last});"
        ))
        .await
        .context("inserting the update backlog")?;
    // One statement each: VACUUM cannot run in a multi-statement query.
    client
        .batch_execute("VACUUM (ANALYZE) incoming_emails")
        .await?;
    client
        .batch_execute("VACUUM (ANALYZE) outbox_messages")
        .await?;
    let new: i64 = client
        .query_one(
            "SELECT count(DISTINCT aggregate_id) FROM outbox_messages WHERE aggregate_id LIKE 'MP-N%'",
            &[],
        )
        .await?
        .get(0);
    Ok(docs + new)
}

/// Each aggregate's newest outbox id.
pub type Newest = std::collections::HashMap<String, i64>;

/// The newest outbox id of each aggregate in `rows`.
pub fn newest_of(rows: &[Claimed]) -> Newest {
    let mut newest = Newest::new();
    for r in rows {
        let id = newest.entry(r.aggregate_id.clone()).or_insert(r.id);
        *id = (*id).max(r.id);
    }
    newest
}

/// The newest outbox id of each aggregate in the outbox table.
pub async fn newest_in(client: &tokio_postgres::Client) -> anyhow::Result<Newest> {
    let rows = client
        .query(
            "SELECT aggregate_id, max(id) FROM outbox_messages GROUP BY aggregate_id",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Every aggregate's document holds the outbox id of its newest message: the
/// drain wrote every message forwards, none lost or overtaken.
pub async fn check_newest(ctx: &Ctx, mongo: &str, newest: &Newest) -> anyhow::Result<()> {
    let mut cursor = ctx
        .mongo
        .database(mongo)
        .collection::<Document>(COLLECTION)
        .find(doc! {})
        .projection(doc! {"outbox_id": 1})
        .await?;
    let (mut behind, mut seen) = (0usize, 0usize);
    let mut example = None;
    while cursor.advance().await? {
        let d = cursor.deserialize_current()?;
        let (Ok(id), Ok(at)) = (d.get_str("_id"), d.get_i64("outbox_id")) else {
            continue;
        };
        let Some(&want) = newest.get(id) else {
            continue;
        };
        seen += 1;
        if at != want {
            behind += 1;
            example.get_or_insert_with(|| format!("{id} holds {at}, newest {want}"));
        }
    }
    if seen != newest.len() {
        bail!("{} aggregates have no document", newest.len() - seen);
    }
    if behind > 0 {
        bail!(
            "{behind} documents do not hold their aggregate's newest message (e.g. {})",
            example.unwrap_or_default()
        );
    }
    Ok(())
}

/// A database with `rows` of the update backlog, and the documents its
/// collection ends with.
pub async fn backlog_db(ctx: &Ctx, plan: &Plan, rows: i64) -> anyhow::Result<(String, Target)> {
    let db = ctx.fresh_db("update").await?;
    let client = ctx.pg(&db).await?;
    let docs = insert_backlog(&client, plan.update_docs, rows).await?;
    let target = Target {
        preload: plan.update_docs,
        docs,
    };
    Ok((db, target))
}

/// The update workload's rows in their claimed form, for the raw loop and the peers.
pub async fn workload(ctx: &Ctx, plan: &Plan) -> anyhow::Result<(Arc<Vec<Claimed>>, Target)> {
    let (db, target) = backlog_db(ctx, plan, plan.update_rows).await?;
    let rows = load_rows(ctx, &db).await;
    ctx.drop_db(&db).await;
    Ok((Arc::new(rows?), target))
}

/// One relay/raw pair: relay rows/s, raw rows/s, PostgreSQL µs CPU per row.
type Pair = (f64, f64, Option<f64>);

/// The drains, in alternating relay/raw pairs per relay count as the insert
/// drain's, and PostgreSQL's CPU per relayed row.
pub async fn phase_update(
    ctx: &Ctx,
    plan: &Plan,
    report: &mut Report,
    setting: Setting,
) -> anyhow::Result<()> {
    let (rows, target) = workload(ctx, plan).await?;
    say!(
        "update workload: {} rows over {} preloaded documents, {} documents once applied",
        plan.update_rows,
        plan.update_docs,
        target.docs
    );
    let mut pairs: Vec<Vec<Pair>> = vec![Vec::new(); plan.relay_counts.len()];
    let mut runs = Vec::new();
    for round in 0..plan.drain_pairs {
        for (i, &procs) in plan.relay_counts.iter().enumerate() {
            let (db, _) = backlog_db(ctx, plan, plan.update_rows).await?;
            let run = relay_drain(ctx, &db, plan.update_rows, setting, procs, "upd", target).await;
            ctx.drop_db(&db).await;
            let run = run?;
            let raw = raw_drain(ctx, rows.clone(), setting, procs, target).await?;
            let pg_us = run.pg_cpu_s.map(|s| s / plan.update_rows as f64 * 1e6);
            say!(
                "update drain {} rows, pair {}/{}: {procs} relay(s) {:.0} rows/s · raw loop {:.0} rows/s · PostgreSQL {:.0} µs CPU per row",
                plan.update_rows,
                round + 1,
                plan.drain_pairs,
                run.rps,
                raw.rps,
                pg_us.unwrap_or(f64::NAN)
            );
            pairs[i].push((run.rps, raw.rps, pg_us));
            runs.push(json!({
                "relays": procs, "pair": round + 1, "rows": plan.update_rows,
                "seconds": rnd(run.secs, 3), "rows_per_s": rnd(run.rps, 1),
                "raw_rows_per_s": rnd(raw.rps, 1), "ratio": rnd(run.rps / raw.rps, 3),
                "pg_cpu_us_per_row": opt(pg_us, 1),
                "relay_cpu_us_per_row": rnd(run.relay_cpu_s / plan.update_rows as f64 * 1e6, 1),
                "raw_writes_retried": raw.retried,
            }));
        }
    }
    let mut best: Option<(usize, f64, f64)> = None;
    for (i, &procs) in plan.relay_counts.iter().enumerate() {
        let med = |f: &dyn Fn(&Pair) -> Option<f64>| {
            support::median(&pairs[i].iter().filter_map(f).collect::<Vec<_>>())
        };
        let (rps, raw) = (med(&|p| Some(p.0)), med(&|p| Some(p.1)));
        let ratio = med(&|p| Some(p.0 / p.1));
        report.set(&format!("update_drain_rps_{procs}"), opt(rps, 1));
        report.set(&format!("update_raw_rps_{procs}"), opt(raw, 1));
        report.set(&format!("update_drain_ratio_{procs}"), opt(ratio, 3));
        report.set(&format!("pg_cpu_us_per_row_{procs}"), opt(med(&|p| p.2), 1));
        if let (Some(ratio), Some(raw)) = (ratio, raw)
            && best.is_none_or(|b| ratio > b.1)
        {
            best = Some((procs, ratio, raw));
        }
    }
    let (best_procs, ratio, raw) = best.context("no update drain run")?;
    let fastest = plan
        .relay_counts
        .iter()
        .filter_map(|n| report.num(&format!("update_drain_rps_{n}")))
        .reduce(f64::max);
    report.set("update_drain_rps", opt(fastest, 1));
    report.set("update_raw_rps", json!(rnd(raw, 1)));
    report.set("update_drain_ratio", json!(rnd(ratio, 3)));
    // The system of record's load, at one relay (the figure a user sizes by).
    let one = report.num("pg_cpu_us_per_row_1");
    report.set("pg_cpu_us_per_row", opt(one, 1));
    report.detail(
        "update",
        json!({
            "documents_preloaded": plan.update_docs,
            "documents_after": target.docs,
            "rows": plan.update_rows,
            "update_share": UPDATE_SHARE,
            "skew": format!("existing aggregate drawn as floor(docs * u^{SKEW})"),
            "pairs": plan.drain_pairs,
            "setting": setting.json(),
            "runs": runs,
            "update_drain_rps_is": "the fastest relay count's median",
            "update_raw_rps_is": format!("the raw loop at the relay count with the best ratio ({best_procs})"),
            "pg_cpu_us_per_row_is": "CPU of every process of the outbox's PostgreSQL cluster over the drain, per row, at one relay (FerretDB's backend is a cluster of its own)",
        }),
    );
    Ok(())
}

/// Webhooks for the update workload: mostly existing aggregates, skewed.
fn bodies(docs: i64) -> support::Bodies {
    Arc::new(move || {
        let r = support::event_number();
        let client = if fastrand::f64() < UPDATE_SHARE {
            format!("MP-U{}", (docs as f64 * fastrand::f64().powf(SKEW)) as i64)
        } else {
            format!("MP-N{r}")
        };
        support::webhook_body_for(r, &client, "K-1")
    })
}

/// Lag on the update workload through ingest: at `FIXED_LAG_RATE` and at half
/// of this workload's pipeline maximum.
pub async fn phase_update_lag(
    ctx: &Ctx,
    plan: &Plan,
    report: &mut Report,
    setting: Setting,
) -> anyhow::Result<()> {
    let p = Pipeline::start(ctx, plan, setting, "upipe", plan.update_docs).await?;
    let max = pipeline_max(plan, p.addr, &p.client, bodies(plan.update_docs)).await;
    p.stop(ctx).await;
    let (max, _, _) = max?;
    report.set("update_pipeline_max_rps", json!(rnd(max, 1)));
    let mut details = Vec::new();
    for (key, rate) in [("", FIXED_LAG_RATE), ("_half", (max / 2.0).max(1.0))] {
        let mut pipeline = Pipeline::start(ctx, plan, setting, "ulag", plan.update_docs).await?;
        let run = measure_lag(plan, &mut pipeline, rate, bodies(plan.update_docs)).await;
        pipeline.stop(ctx).await;
        let mut run = run?;
        say!(
            "update lag at {rate:.0}/s over {} rows: p50 {:.2} ms, p99 {:.2} ms",
            run.rows,
            run.p50.unwrap_or(f64::NAN),
            run.p99.unwrap_or(f64::NAN)
        );
        report.set(&format!("update_lag{key}_p50_ms"), opt(run.p50, 3));
        report.set(&format!("update_lag{key}_p99_ms"), opt(run.p99, 3));
        details.push(json!({
            "offered_rps": rnd(rate, 1), "achieved_rps": rnd(run.load.rps(), 1),
            "rows": run.rows, "rows_not_synced_at_end": run.unsynced,
            "p50_ms": opt(run.p50, 3), "p99_ms": opt(run.p99, 3), "max_ms": opt(run.max, 3),
            "http_p99_ms": opt(run.load.latency(0.99), 3),
        }));
    }
    report.detail(
        "update_lag",
        json!({
            "documents_preloaded": plan.update_docs,
            "relays": plan.lag_relays,
            "setting": setting.json(),
            "runs": details,
            "definition": "synced_at - created_at of rows created after the warm-up, from PostgreSQL; update_lag_* at 200 webhooks/s, update_lag_half_* at half of update_pipeline_max_rps",
        }),
    );
    Ok(())
}
