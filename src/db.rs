//! PostgreSQL connections (the pool, and single sessions over the same TLS)
//! and the error classes the daemons act on.

mod tls;

pub use tls::{SslMode, TlsSettings};

use std::time::Duration;

use anyhow::Context;
use deadpool_postgres::{
    Hook, HookError, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime, Timeouts,
};
use secrecy::ExposeSecret;
use tokio_postgres::error::SqlState;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{Client, Connection, Socket};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::DatabaseConfig;

/// The server's side of TCP keepalive. A session whose client host died without
/// closing it (power loss, a partition) would otherwise hold its locks, a
/// relay's aggregate locks among them, for the kernel's default of about two
/// hours; with these it ends within about 25 s.
const SERVER_KEEPALIVES: &str =
    "-c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5 -c tcp_keepalives_count=3";

/// Every session's search_path: only the schema outboxd's tables live in, and
/// no `"$user"` schema, which another role may create. pg_catalog, not listed,
/// is searched first, so an object planted in `public` cannot shadow a built-in
/// of the same signature (listed first, it would also be where `migrate`
/// creates tables); the SQL qualifies the calls whose arguments an overload
/// could match better (`pg_catalog.nextval(…)`). A URL whose `options` set
/// their own search_path (tables in another schema) wins.
const SEARCH_PATH: &str = "-c search_path=public";

/// Parses the URL and applies the configured timeouts; errors never echo the URL.
pub fn pg_config(config: &DatabaseConfig) -> anyhow::Result<tokio_postgres::Config> {
    Ok(parse(config)?.0)
}

/// The session settings and the URL's TLS parameters.
fn parse(config: &DatabaseConfig) -> anyhow::Result<(tokio_postgres::Config, TlsSettings)> {
    let (url, tls) = tls::split(config.url.expose_secret())?;
    let mut pg: tokio_postgres::Config = url.parse().map_err(|_| {
        crate::config::Invalid("invalid `database.url` (DATABASE_URL): not a PostgreSQL URL".into())
    })?;
    pg.ssl_mode(tls.pg_mode());
    pg.connect_timeout(Duration::from_millis(config.connect_timeout_ms));
    // Our side of keepalive: a session whose server vanished (a crash, a
    // failover, a partition) fails within ~25 s, not the kernel's ~2 h. The
    // LISTEN session, which only receives, would otherwise never notice.
    pg.keepalives(true);
    pg.keepalives_idle(Duration::from_secs(10));
    pg.keepalives_interval(Duration::from_secs(5));
    pg.keepalives_retries(3);
    // And a statement sent to a server that vanished fails after 30 s without
    // an acknowledgement, not after TCP's ~15 min of retransmissions.
    pg.tcp_user_timeout(Duration::from_secs(30));
    if pg.get_application_name().is_none() {
        pg.application_name("outboxd");
    }
    // Added to the URL's own `options` (a search_path, say), not in their place.
    // Later settings win: the URL's over the search_path and the keepalives,
    // the configured statement_timeout over the URL's.
    let mut options = Vec::new();
    if config.server_keepalives {
        options.push(SERVER_KEEPALIVES.to_owned());
    }
    options.extend(
        pg.get_options()
            .map(str::trim)
            .filter(|o| !o.is_empty())
            .map(str::to_owned),
    );
    if config.statement_timeout_ms > 0 {
        options.push(format!(
            "-c statement_timeout={}",
            config.statement_timeout_ms
        ));
    }
    // Behind PgBouncer, which refuses the parameter, nothing is sent (the
    // keepalives and the timeout are off): the role's own search_path holds there.
    if !options.is_empty() {
        options.insert(0, SEARCH_PATH.to_owned());
        pg.options(options.join(" "));
    }
    Ok((pg, tls))
}

/// The TLS stream of a session that `Connector::connect` opened.
pub type TlsStream = <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream;

/// Opens single sessions (LISTEN, migrate, check) as the pool does.
pub struct Connector {
    pub pg: tokio_postgres::Config,
    tls: MakeRustlsConnect,
}

impl Connector {
    pub async fn connect(
        &self,
    ) -> Result<(Client, Connection<Socket, TlsStream>), tokio_postgres::Error> {
        self.pg.connect(self.tls.clone()).await
    }
}

/// The settings and TLS of `database.url`; a bad `sslmode` or unreadable
/// `sslrootcert` is a configuration error.
pub fn connector(config: &DatabaseConfig) -> anyhow::Result<Connector> {
    let (pg, tls) = parse(config)?;
    Ok(Connector {
        pg,
        tls: tls.connector()?,
    })
}

/// Pooled connections are replaced once this old: a session opened on a server
/// that was read-only then (a standby, a lock-out since cleared), or on the old
/// primary after a failover, does not outlive the change by more than this.
const MAX_CONNECTION_AGE: Duration = Duration::from_secs(60);

/// Builds a pool; connections are opened lazily, so this succeeds while PostgreSQL is down.
pub fn pool(config: &DatabaseConfig) -> anyhow::Result<Pool> {
    let Connector { pg, tls } = connector(config)?;
    let manager = Manager::from_config(
        pg,
        tls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let wait = Duration::from_millis(config.pool_wait_ms);
    Pool::builder(manager)
        .max_size(config.pool_size)
        .pre_recycle(Hook::sync_fn(|_, metrics| {
            if metrics.age() > MAX_CONNECTION_AGE {
                return Err(HookError::message("replaced: past its maximum age"));
            }
            Ok(())
        }))
        .runtime(Runtime::Tokio1)
        .timeouts(Timeouts {
            wait: Some(wait),
            create: Some(Duration::from_millis(config.connect_timeout_ms)),
            recycle: Some(wait),
        })
        .build()
        .context("cannot build the PostgreSQL pool")
}

/// The error with its causes ("db error: password authentication failed…").
pub fn describe(err: &tokio_postgres::Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The error for logs that must not quote customer data: a server error's
/// message and SQLSTATE, without its DETAIL ("Failing row contains (…)").
pub fn summarize(err: &tokio_postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => format!("db error: {} (SQLSTATE {})", db.message(), db.code().code()),
        // An I/O or protocol error: its causes ("connection refused") say what happened.
        None => describe(err),
    }
}

/// `summarize` for an error that may wrap a PostgreSQL or pool error; any other
/// error with its causes.
pub fn summarize_any(err: &anyhow::Error) -> String {
    if let Some(pg) = err.downcast_ref::<tokio_postgres::Error>() {
        return summarize(pg);
    }
    if let Some(pool) = err.downcast_ref::<deadpool_postgres::PoolError>() {
        return summarize_pool(pool);
    }
    format!("{err:#}")
}

/// `summarize` for a pool error: waiting for a connection, or opening one.
pub fn summarize_pool(err: &deadpool_postgres::PoolError) -> String {
    match err {
        deadpool_postgres::PoolError::Backend(pg) => summarize(pg),
        other => other.to_string(),
    }
}

/// True when retrying later may succeed: the server is unreachable, restarting,
/// overloaded, or the statement timed out. False for errors in the statement itself.
pub fn is_transient(err: &tokio_postgres::Error) -> bool {
    match err.code() {
        None => true, // I/O or protocol: the connection is gone.
        Some(code) => {
            let c = code.code();
            c.starts_with("08") // connection exception
                || c.starts_with("53") // insufficient resources
                || c.starts_with("57") // operator intervention: shutdown, cancel, timeout
                || *code == SqlState::T_R_SERIALIZATION_FAILURE
                || *code == SqlState::T_R_DEADLOCK_DETECTED
                || *code == SqlState::LOCK_NOT_AVAILABLE
                // A standby, or a primary being demoted, during a failover.
                || *code == SqlState::READ_ONLY_SQL_TRANSACTION
        }
    }
}

/// A read-only session: on a standby, on a primary being demoted, or with
/// `default_transaction_read_only` set when it began.
pub fn is_read_only(err: &tokio_postgres::Error) -> bool {
    err.code() == Some(&SqlState::READ_ONLY_SQL_TRANSACTION)
}

/// Whether a pool error means PostgreSQL is unavailable (rather than a bug).
pub fn pool_error_is_transient(err: &deadpool_postgres::PoolError) -> bool {
    match err {
        deadpool_postgres::PoolError::Backend(e) => is_transient(e),
        _ => true,
    }
}
