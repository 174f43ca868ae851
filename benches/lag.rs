//! Commit-to-apply lag through ingest at fixed offered rates.

use super::*;

pub(crate) async fn phase_lag(
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
pub(crate) struct LagRun {
    pub(crate) rows: i64,
    pub(crate) unsynced: i64,
    pub(crate) p50: Option<f64>,
    pub(crate) p99: Option<f64>,
    pub(crate) max: Option<f64>,
    pub(crate) load: support::Load,
}

/// Offers `rate` webhooks/s made by `bodies` to the pipeline for `plan.lag_secs`
/// after a warm-up, lets the relays catch up, and reads each row's lag.
pub(crate) async fn measure_lag(
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
pub(crate) struct Pipeline {
    pub(crate) db: String,
    pub(crate) mongo: String,
    pub(crate) addr: SocketAddr,
    pub(crate) client: tokio_postgres::Client,
    pub(crate) procs: Vec<Proc>,
}

impl Pipeline {
    /// `preload`: documents written before the processes start (the update workload's).
    pub(crate) async fn start(
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

    pub(crate) async fn stop(mut self, ctx: &Ctx) {
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
pub(crate) async fn pipeline_max(
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
