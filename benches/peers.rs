//! The peers a user would pick instead, on the same servers and the same update
//! workload: graphile-worker (one job per message) and a seed-style polling
//! relay (psycopg + pymongo). Each lives under `benches/peers/` with its own
//! lockfile and is installed by `benches/peers/run.sh install` on first use.
//! `BENCH_PEERS=0` skips them.

use std::io::Write as _;

use super::*;

/// The peers, by the name `run.sh` knows them and the report's.
const PEERS: &[(&str, &str)] = &[
    ("gw", "graphile-worker 0.16"),
    ("seed", "seed-style polling relay"),
];

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/peers/run.sh")
}

/// Runs `run.sh PEER MODE args…`; its stdout's last line is a JSON object.
async fn run(peer: &str, mode: &str, args: &[String], log: &Path) -> anyhow::Result<Value> {
    let stderr = std::fs::File::create(log)?;
    let out = tokio::process::Command::new("bash")
        .arg(script())
        .arg(peer)
        .arg(mode)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stderr(stderr)
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("cannot run {}", script().display()))?;
    if !out.status.success() {
        bail!(
            "peer {peer} {mode} failed ({}); see {}",
            out.status,
            log.display()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().rev().find(|l| l.trim_start().starts_with('{'));
    let Some(last) = last else {
        if mode == "install" || mode == "load" {
            return Ok(Value::Null);
        }
        bail!("peer {peer} {mode} printed no JSON; see {}", log.display());
    };
    serde_json::from_str(last).with_context(|| format!("peer {peer} {mode}: {last}"))
}

/// The arguments every `run.sh` mode but install takes: where the peer's
/// queue, its collection and the workload are.
fn databases(ctx: &Ctx, db: &str, mongo: &str, workload: &Path) -> Vec<String> {
    vec![
        "--database-url".into(),
        ctx.db_url(db),
        "--mongodb-url".into(),
        ctx.mongo_db_url(mongo),
        "--collection".into(),
        COLLECTION.into(),
        "--workload".into(),
        workload.display().to_string(),
    ]
}

/// The workload as `run.sh` reads it: one JSON line per message, in id order.
fn write_workload(rows: &[Claimed], path: &Path) -> anyhow::Result<()> {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    for r in rows {
        let line = json!({
            "outbox_id": r.id, "aggregate_id": r.aggregate_id, "email_id": r.email_id,
            "ticket_id": r.ticket_id, "webhook_id": r.webhook_id,
            "idempotency_key": r.idempotency_key,
            "payload": r.payload.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?,
        });
        writeln!(file, "{line}")?;
    }
    file.flush()?;
    Ok(())
}

/// Each peer's drain at each concurrency, and its lag at the fixed rate.
pub async fn phase_peers(ctx: &Ctx, plan: &Plan, report: &mut Report) -> anyhow::Result<()> {
    let (rows, target) = update::workload(ctx, plan).await?;
    let workload = ctx.out.join("peers-workload.jsonl");
    write_workload(&rows, &workload)?;
    let newest = update::newest_of(&rows);
    let mut details = Map::new();
    for (peer, name) in PEERS {
        let log = |what: &str| ctx.log_path(&format!("peer-{peer}-{what}"));
        say!("peer {name}: installing (first run only)");
        run(peer, "install", &[], &log("install")).await?;
        let mut drains = Vec::new();
        let mut best = 0.0f64;
        for &n in &plan.relay_counts {
            let db = ctx.fresh_db(&format!("peer{peer}")).await?;
            let mongo = ctx.fresh_mongo(&format!("peer{peer}"));
            let result = async {
                update::preload(ctx, &mongo, target.preload).await?;
                let mut args = databases(ctx, &db, &mongo, &workload);
                args.extend(["--concurrency".into(), n.to_string()]);
                run(peer, "load", &args, &log(&format!("load-{n}"))).await?;
                let client = ctx.pg(&db).await?;
                let postmaster = support::postmaster_pid(&client).await?;
                let cpu = support::PgCpuWatch::start(postmaster, &db);
                let drain = [args.as_slice(), &["--loaded".into()]].concat();
                let out = run(peer, "drain", &drain, &log(&format!("drain-{n}"))).await?;
                let cpu = Some(cpu.stop());
                let docs = ctx
                    .mongo
                    .database(&mongo)
                    .collection::<Document>(COLLECTION)
                    .estimated_document_count()
                    .await? as i64;
                if docs != target.docs {
                    bail!(
                        "peer {peer}: {docs} documents after the drain, expected {}",
                        target.docs
                    );
                }
                update::check_newest(ctx, &mongo, &newest).await?;
                Ok::<_, anyhow::Error>((out, cpu))
            }
            .await;
            ctx.drop_db(&db).await;
            ctx.drop_mongo(&mongo).await;
            let (out, cpu) = result?;
            let rps = out["rps"].as_f64().context("peer drain: no rps")?;
            let pg_us = cpu.map(|c| c / rows.len() as f64 * 1e6);
            say!(
                "peer {name}: concurrency {n}: {rps:.0} rows/s · PostgreSQL {:.0} µs CPU per row",
                pg_us.unwrap_or(f64::NAN)
            );
            best = best.max(rps);
            if n == 1 {
                report.set(&format!("peer_{peer}_pg_cpu_us_per_row"), opt(pg_us, 1));
            }
            report.set(&format!("peer_{peer}_rps_{n}"), json!(rnd(rps, 1)));
            drains.push(json!({"concurrency": n, "peer": out, "pg_cpu_us_per_row": opt(pg_us, 1)}));
        }
        report.set(&format!("peer_{peer}_rps"), json!(rnd(best, 1)));
        let lag = peer_lag(ctx, plan, peer, &workload, target, &log("lag")).await;
        let lag = match lag {
            Ok(v) => v,
            Err(e) => {
                report.errors.push(format!("peer {peer} lag: {e:#}"));
                Value::Null
            }
        };
        report.set(&format!("peer_{peer}_lag_p50_ms"), lag["p50_ms"].clone());
        report.set(&format!("peer_{peer}_lag_p99_ms"), lag["p99_ms"].clone());
        details.insert(
            (*peer).into(),
            json!({"name": name, "drains": drains, "lag": lag}),
        );
    }
    let ours = report.num("update_drain_rps");
    report.set("vs_gw", opt(ratio(ours, report.num("peer_gw_rps")), 3));
    report.set("vs_seed", opt(ratio(ours, report.num("peer_seed_rps")), 3));
    let lag = report.num("update_lag_p50_ms");
    report.set(
        "vs_gw_lag_p50",
        opt(ratio(report.num("peer_gw_lag_p50_ms"), lag), 3),
    );
    report.set(
        "vs_seed_lag_p50",
        opt(ratio(report.num("peer_seed_lag_p50_ms"), lag), 3),
    );
    details.insert(
        "definition".into(),
        json!("vs_gw, vs_seed: update_drain_rps / the peer's best rows/s over concurrency 1, 2, 4; vs_*_lag_p50: the peer's lag p50 at 200 messages/s / update_lag_p50_ms"),
    );
    report.detail("peers", Value::Object(details));
    Ok(())
}

/// A peer's lag at `update::FIXED_LAG_RATE`, on fresh databases.
async fn peer_lag(
    ctx: &Ctx,
    plan: &Plan,
    peer: &str,
    workload: &Path,
    target: Target,
    log: &Path,
) -> anyhow::Result<Value> {
    let db = ctx.fresh_db(&format!("peerlag{peer}")).await?;
    let mongo = ctx.fresh_mongo(&format!("peerlag{peer}"));
    let result = async {
        update::preload(ctx, &mongo, target.preload).await?;
        let mut args = databases(ctx, &db, &mongo, workload);
        args.extend([
            "--rate".into(),
            update::FIXED_LAG_RATE.to_string(),
            "--seconds".into(),
            plan.lag_secs.max(5.0).to_string(),
        ]);
        run(peer, "lag", &args, log).await
    }
    .await;
    ctx.drop_db(&db).await;
    ctx.drop_mongo(&mongo).await;
    let out = result?;
    say!(
        "peer {peer}: lag at {}/s: p50 {} ms, p99 {} ms",
        update::FIXED_LAG_RATE,
        out["p50_ms"],
        out["p99_ms"]
    );
    Ok(out)
}
