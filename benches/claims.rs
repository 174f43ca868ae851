//! Claim latency and relay memory at depth.

use super::*;

/// Claim latency on each database: `outbox::claim` (the relay's statement) in a
/// transaction that is rolled back, one claim on each database in turn, so that
/// the machine's other load falls on all alike; medians after 5 warm-ups each. A
/// checkpoint first: a large backlog's bulk insert would otherwise leave one
/// running, which would slow the large side only.
pub(crate) async fn compare_claims(
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

pub(crate) async fn phase_claim_memory(
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
pub(crate) async fn relay_for(
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
