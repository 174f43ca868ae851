//! outboxd: a transactional outbox from PostgreSQL to MongoDB.

pub mod check;
pub mod cli;
pub mod config;
pub mod db;
pub mod http;
pub mod idempotency;
pub mod ingest;
pub mod migrate;
pub mod money;
pub mod mongo;
pub mod ops;
pub mod outbox;
pub mod relay;
pub mod shutdown;
pub mod sign;
pub mod systemd;
pub mod telemetry;

/// `outboxd migrate`: applies pending migrations and says what it did.
pub async fn migrate_cmd(config: &config::Config) -> anyhow::Result<u8> {
    let pg = db::pg_config(&config.database)?;
    let (mut client, connection) = pg
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|e| anyhow::anyhow!("PostgreSQL unreachable: {}", db::describe(&e)))?;
    tokio::spawn(connection);
    let applied = migrate::run(&mut client).await?;
    if applied.is_empty() {
        println!(
            "schema is up to date (version {})",
            migrate::latest_version()
        );
    } else {
        for name in &applied {
            println!("applied {name}");
        }
        println!("schema is now at version {}", migrate::latest_version());
    }
    Ok(0)
}
