//! `outboxd check`: one line per dependency and for the webhook secret, non-zero
//! exit when one is unreachable or the secret is unfit for ingest.

use std::time::Duration;

use crate::config::Config;
use crate::{db, migrate, mongo};

/// Each check gets this long, so the whole command ends within about 5 seconds.
const CHECK_TIMEOUT: Duration = Duration::from_millis(4500);

pub async fn run(config: &Config) -> anyhow::Result<u8> {
    let (pg, mg) = tokio::join!(
        tokio::time::timeout(CHECK_TIMEOUT, postgres(config)),
        tokio::time::timeout(CHECK_TIMEOUT, mongodb(config)),
    );
    let mut ok = true;
    for (name, result) in [("postgresql", pg), ("mongodb", mg)] {
        match result {
            Ok(Ok(line)) => println!("{name:<11} ok    {line}"),
            Ok(Err(e)) => {
                ok = false;
                println!("{name:<11} FAIL  {e:#}");
            }
            Err(_) => {
                ok = false;
                println!(
                    "{name:<11} FAIL  no answer within {:.1}s",
                    CHECK_TIMEOUT.as_secs_f64()
                );
            }
        }
    }
    // Only ingest needs a secret: a relay's host may have none.
    if config.has_webhook_secret() {
        match config.ingest_secret() {
            Ok(found) => {
                let insecure = match found.weakness() {
                    Some(weakness) => {
                        format!(
                            " (insecure: {weakness}; allowed by `ingest.allow_insecure_secret`)"
                        )
                    }
                    None => String::new(),
                };
                let shadows = found
                    .shadows()
                    .map_or(String::new(), |names| format!("; it shadows {names}"));
                println!(
                    "{:<11} ok    secret from {}{insecure}{shadows}",
                    "webhook", found.source
                );
            }
            Err(e) => {
                ok = false;
                println!("{:<11} FAIL  {e:#}", "webhook");
            }
        }
    } else {
        println!(
            "{:<11} none  not configured here (only ingest needs it)",
            "webhook"
        );
    }
    Ok(if ok { 0 } else { 1 })
}

async fn postgres(config: &Config) -> anyhow::Result<String> {
    let mut connector = db::connector(&config.database)?;
    connector.pg.connect_timeout(CHECK_TIMEOUT);
    let (client, connection) = connector
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("unreachable: {}", db::describe(&e)))?;
    tokio::spawn(connection);
    let version: String = client.query_one("SHOW server_version", &[]).await?.get(0);
    let expected = migrate::latest_version();
    match migrate::schema(&client).await? {
        migrate::Schema::Current(v) => Ok(format!("server {version}, schema version {v}")),
        migrate::Schema::Newer(v) => anyhow::bail!(
            "server {version}, schema version {v} is newer than this outboxd knows ({expected}): upgrade outboxd"
        ),
        migrate::Schema::Older(v) => anyhow::bail!(
            "server {version}, schema version {v} but this outboxd expects {expected}: run `outboxd migrate`"
        ),
        migrate::Schema::Missing => {
            anyhow::bail!("server {version}, no schema yet: run `outboxd migrate`")
        }
    }
}

async fn mongodb(config: &Config) -> anyhow::Result<String> {
    let mut mongo_config = config.mongodb.clone();
    mongo_config.timeout_ms = mongo_config
        .timeout_ms
        .min(CHECK_TIMEOUT.as_millis() as u64 - 500);
    let sink = mongo::connect(&mongo_config).await?;
    let version = sink.server_version().await;
    sink.shutdown().await;
    let version = version.map_err(|e| anyhow::anyhow!("unreachable: {}", mongo::redact(&e)))?;
    Ok(format!(
        "server {version}, database {}, collection {}",
        sink.database().name(),
        sink.collection_name()
    ))
}
