//! Ingest: outboxd against pgbench running the same transaction.

use super::*;

pub(crate) struct IngestRound {
    pub(crate) rps: f64,
    pub(crate) p50: Option<f64>,
    pub(crate) p99: Option<f64>,
    pub(crate) cpu: Value,
}

pub(crate) async fn phase_ingest(
    ctx: &Ctx,
    plan: &Plan,
    report: &mut Report,
) -> anyhow::Result<()> {
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

pub(crate) async fn ingest_round(
    ctx: &Ctx,
    plan: &Plan,
    round: usize,
) -> anyhow::Result<IngestRound> {
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
pub(crate) fn pgbench_script() -> String {
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
pub(crate) fn find_pgbench(install: bool) -> anyhow::Result<PathBuf> {
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

pub(crate) async fn pgbench_round(
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
