//! Typed configuration, each layer over the one before: the `Default` impls
//! (which `config/outboxd.toml` repeats, checked by a test), a TOML file,
//! `OUTBOXD__SECTION__KEY` variables, systemd credentials
//! (`$CREDENTIALS_DIRECTORY`), then `DATABASE_URL` and `MONGODB_URL`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

/// Environment variable naming the config file when `--config` is not given.
pub const CONFIG_ENV: &str = "OUTBOXD_CONFIG";

/// The whole configuration of both daemons and the operator commands.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub database: DatabaseConfig,
    pub mongodb: MongoConfig,
    pub ingest: IngestConfig,
    pub relay: RelayConfig,
    pub notify: NotifyConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    #[serde(serialize_with = "expose")]
    pub url: SecretString,
    pub pool_size: usize,
    pub connect_timeout_ms: u64,
    pub statement_timeout_ms: u64,
    /// Ask the server to probe idle sessions (`tcp_keepalives_*`).
    pub server_keepalives: bool,
    /// How long a request waits for a free pooled connection.
    pub pool_wait_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MongoConfig {
    #[serde(serialize_with = "expose")]
    pub url: SecretString,
    pub collection: String,
    pub timeout_ms: u64,
    /// The `w` of every write's write concern: "majority" or a member count
    /// (see `write_concern`).
    pub write_concern: WriteConcernSetting,
    /// The write concern's `j`; unset leaves the server's default.
    pub journal: Option<bool>,
}

/// `mongodb.write_concern` as written: a word or a number, in TOML or the
/// environment (where "1" arrives as a number).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum WriteConcernSetting {
    Members(i64),
    Text(String),
}

/// A write concern's `w`, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum W {
    Majority,
    Members(u8),
}

/// Replica sets have at most 50 members.
const MAX_MEMBERS: i64 = 50;

impl MongoConfig {
    /// The write concern's `w`; `Err` says what is wrong with the setting.
    pub fn w(&self) -> Result<W, String> {
        let members = match &self.write_concern {
            WriteConcernSetting::Members(n) => *n,
            WriteConcernSetting::Text(text) if text.trim().eq_ignore_ascii_case("majority") => {
                return Ok(W::Majority);
            }
            WriteConcernSetting::Text(text) => text.trim().parse().map_err(|_| {
                format!(
                    "invalid configuration: `mongodb.write_concern` must be \"majority\" or a number \
                     of members from 1 to {MAX_MEMBERS}, not {text:?} (tagged write concerns are not supported)"
                )
            })?,
        };
        match members {
            0 => Err(
                "invalid configuration: `mongodb.write_concern` 0 (unacknowledged) is refused: \
                 the relay marks a row synced only once MongoDB has confirmed its write"
                    .into(),
            ),
            1..=MAX_MEMBERS => Ok(W::Members(members as u8)),
            _ => Err(format!(
                "invalid configuration: `mongodb.write_concern` must be \"majority\" or a number of \
                 members from 1 to {MAX_MEMBERS}, not {members}"
            )),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    pub listen: SocketAddr,
    /// Serve `/metrics` here instead of on `listen`.
    pub metrics_listen: Option<SocketAddr>,
    pub webhook_secret_file: Option<PathBuf>,
    /// Development only: start with the default or a short webhook secret.
    pub allow_insecure_secret: bool,
    pub timestamp_tolerance_s: u64,
    pub body_limit_bytes: usize,
    pub idempotency_ttl_s: u64,
    pub notify_interval_ms: u64,
    pub header_read_timeout_ms: u64,
    pub body_read_timeout_ms: u64,
    pub max_connections: usize,
    pub shutdown_timeout_s: u64,
    pub threads: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    pub id: Option<String>,
    pub metrics_listen: Option<SocketAddr>,
    pub workers: usize,
    pub batch_size: i64,
    pub write_concurrency: usize,
    pub poll_interval_ms: u64,
    pub lease_s: u64,
    pub max_attempts: i32,
    pub backoff_base_ms: u64,
    pub backoff_cap_ms: u64,
    pub shutdown_timeout_s: u64,
    pub housekeeping_interval_s: u64,
    pub housekeeping_batch: i64,
    pub retention_s: u64,
    pub threads: usize,
}

/// `[notify]`: the e-mail sent for each message written to MongoDB (src/notify).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotifyConfig {
    pub enabled: bool,
    /// `smtp://`, `smtps://` (TLS) or `smtp://…?tls=required` (STARTTLS).
    #[serde(serialize_with = "expose")]
    pub smtp_url: SecretString,
    /// Password for the URL's user, when the URL holds none.
    pub smtp_password_file: Option<PathBuf>,
    pub from: String,
    pub to: Vec<String>,
    pub subject: String,
    pub body: String,
    pub timeout_ms: u64,
    pub batch_size: i64,
    pub concurrency: usize,
    pub max_attempts: i32,
    pub lease_s: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `auto` (text on a terminal, JSON otherwise), `text` or `json`.
    pub format: LogFormat,
    /// A tracing filter, overridden by `RUST_LOG`.
    pub level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Auto,
    Text,
    Json,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: "postgres://outboxd@127.0.0.1:5432/outboxd".into(),
            pool_size: 32,
            connect_timeout_ms: 3000,
            statement_timeout_ms: 5000,
            server_keepalives: true,
            pool_wait_ms: 3000,
        }
    }
}

impl Default for MongoConfig {
    fn default() -> Self {
        Self {
            url: "mongodb://127.0.0.1:27017/outboxd".into(),
            collection: "creditor_debts".into(),
            timeout_ms: 5000,
            write_concern: WriteConcernSetting::Text("majority".into()),
            journal: None,
        }
    }
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".parse().expect("literal address"),
            metrics_listen: None,
            webhook_secret_file: None,
            allow_insecure_secret: false,
            timestamp_tolerance_s: 300,
            body_limit_bytes: 1024 * 1024,
            idempotency_ttl_s: 24 * 3600,
            notify_interval_ms: 2,
            header_read_timeout_ms: 5000,
            body_read_timeout_ms: 10_000,
            max_connections: 1024,
            shutdown_timeout_s: 30,
            threads: 0,
        }
    }
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            id: None,
            metrics_listen: None,
            workers: 2,
            batch_size: 100,
            write_concurrency: 8,
            poll_interval_ms: 1000,
            lease_s: 30,
            max_attempts: 10,
            backoff_base_ms: 1000,
            backoff_cap_ms: 300_000,
            shutdown_timeout_s: 30,
            housekeeping_interval_s: 60,
            housekeeping_batch: 1000,
            retention_s: 7 * 24 * 3600,
            threads: 0,
        }
    }
}

impl Default for NotifyConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            smtp_url: "smtp://127.0.0.1:25".into(),
            smtp_password_file: None,
            from: "outboxd <outboxd@localhost>".into(),
            to: Vec::new(),
            subject: "Forderung aktualisiert: {{ client_reference }} – {{ creditor }}".into(),
            body: DEFAULT_BODY.into(),
            timeout_ms: 10_000,
            batch_size: 20,
            concurrency: 4,
            max_attempts: 10,
            lease_s: 60,
        }
    }
}

/// The default `notify.body` template (repeated in config/outboxd.toml).
const DEFAULT_BODY: &str = "Die Forderung wurde in MongoDB aktualisiert.

Mandant:        {{ client_reference }}
Gläubiger:      {{ creditor }}
Neuer Betrag:   {{ amount }}
{% if previous_amount %}Bisher:         {{ previous_amount }}
{% endif %}Ticket:         {{ ticket_id }}
E-Mail:         {{ email_subject }} (von {{ email_from }}, Nr. {{ email_id }})
Outbox-Nr.:     {{ outbox_id }}
";

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Auto,
            level: "info".into(),
        }
    }
}

fn expose<S: serde::Serializer>(secret: &SecretString, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(secret.expose_secret())
}

/// A configuration problem found after loading, such as a missing secret. The
/// process exits 78 (EX_CONFIG) on it, as on an error from `Config::load`.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

/// figment quotes a misplaced string value in full: a URL with its password,
/// when `database = "postgres://…"` is written for `database.url`, or an
/// unquoted URL in a TOML syntax error. The key (or line and column) and the
/// source still name the problem.
fn without_strings(error: figment::Error) -> figment::Error {
    use figment::error::{Actual, Kind};
    let hide = |actual: &mut Actual| {
        if let Actual::Str(_) = actual {
            *actual = Actual::Other("a string".into());
        }
    };
    // A TOML syntax error quotes the offending line under its position.
    let unquoted = |message: &str| -> String {
        message
            .lines()
            .filter(|line| !line.contains('|'))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let errors: Vec<figment::Error> = error
        .into_iter()
        .map(|mut e| {
            match &mut e.kind {
                Kind::InvalidType(actual, _)
                | Kind::InvalidValue(actual, _)
                | Kind::UnsupportedKey(actual, _)
                | Kind::Unsupported(actual) => hide(actual),
                Kind::UnknownVariant(value, _) => *value = "…".into(),
                Kind::Message(message) => *message = unquoted(message),
                _ => {}
            }
            e
        })
        .collect();
    let mut rest = errors.into_iter().rev();
    let last = rest
        .next()
        .expect("a figment error holds at least one error");
    rest.fold(last, |chain, e| chain.chain(e))
}

impl Config {
    /// Loads the layers in order; an error names the offending key and its source.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Self> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = path {
            if !path.is_file() {
                bail!("config file {} does not exist", path.display());
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        figment = figment.merge(Env::prefixed("OUTBOXD__").split("__").lowercase(true));
        let mut config: Config = figment.extract().map_err(|e| {
            // figment's message names the key and where the value came from.
            anyhow::anyhow!("invalid configuration: {}", without_strings(e))
        })?;
        if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
            let dir = PathBuf::from(dir);
            if let Some(url) = read_credential(&dir, "database-url")? {
                config.database.url = url;
            }
            if let Some(url) = read_credential(&dir, "mongodb-url")? {
                config.mongodb.url = url;
            }
            if let Some(url) = read_credential(&dir, "smtp-url")? {
                config.notify.smtp_url = url;
            }
        }
        if let Ok(url) = std::env::var("DATABASE_URL") {
            config.database.url = url.into();
        }
        if let Ok(url) = std::env::var("MONGODB_URL") {
            config.mongodb.url = url.into();
        }
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> anyhow::Result<()> {
        let positive = [
            ("database.pool_size", self.database.pool_size as u64),
            ("relay.workers", self.relay.workers as u64),
            ("relay.batch_size", self.relay.batch_size.max(0) as u64),
            (
                "relay.write_concurrency",
                self.relay.write_concurrency as u64,
            ),
            ("relay.max_attempts", self.relay.max_attempts.max(0) as u64),
            (
                "relay.housekeeping_batch",
                self.relay.housekeeping_batch.max(0) as u64,
            ),
            (
                "ingest.body_limit_bytes",
                self.ingest.body_limit_bytes as u64,
            ),
            ("ingest.max_connections", self.ingest.max_connections as u64),
            ("notify.batch_size", self.notify.batch_size.max(0) as u64),
            ("notify.concurrency", self.notify.concurrency as u64),
            (
                "notify.max_attempts",
                self.notify.max_attempts.max(0) as u64,
            ),
        ];
        for (key, value) in positive {
            if value == 0 {
                bail!("invalid configuration: `{key}` must be greater than 0");
            }
        }
        // Durations as (key, milliseconds, whether 0 means something). A zero
        // timeout would fail every attempt at once (libpq and MongoDB URLs read
        // 0 as "no timeout"; these do not). Past ten years, a deadline
        // overflows the clock or PostgreSQL's interval range.
        const TEN_YEARS_MS: u64 = 10 * 366 * 86_400 * 1000;
        let s = |seconds: u64| seconds.saturating_mul(1000);
        let durations = [
            (
                "database.connect_timeout_ms",
                self.database.connect_timeout_ms,
                false,
            ),
            (
                "database.statement_timeout_ms",
                self.database.statement_timeout_ms,
                true,
            ),
            ("database.pool_wait_ms", self.database.pool_wait_ms, false),
            ("mongodb.timeout_ms", self.mongodb.timeout_ms, false),
            (
                "ingest.timestamp_tolerance_s",
                s(self.ingest.timestamp_tolerance_s),
                true,
            ),
            (
                "ingest.idempotency_ttl_s",
                s(self.ingest.idempotency_ttl_s),
                true,
            ),
            (
                "ingest.notify_interval_ms",
                self.ingest.notify_interval_ms,
                true,
            ),
            (
                "ingest.header_read_timeout_ms",
                self.ingest.header_read_timeout_ms,
                false,
            ),
            (
                "ingest.body_read_timeout_ms",
                self.ingest.body_read_timeout_ms,
                false,
            ),
            (
                "ingest.shutdown_timeout_s",
                s(self.ingest.shutdown_timeout_s),
                true,
            ),
            ("relay.poll_interval_ms", self.relay.poll_interval_ms, false),
            ("relay.lease_s", s(self.relay.lease_s), false),
            ("relay.backoff_base_ms", self.relay.backoff_base_ms, true),
            ("relay.backoff_cap_ms", self.relay.backoff_cap_ms, true),
            (
                "relay.shutdown_timeout_s",
                s(self.relay.shutdown_timeout_s),
                true,
            ),
            (
                "relay.housekeeping_interval_s",
                s(self.relay.housekeeping_interval_s),
                true,
            ),
            ("relay.retention_s", s(self.relay.retention_s), true),
            ("notify.timeout_ms", self.notify.timeout_ms, false),
            ("notify.lease_s", s(self.notify.lease_s), false),
        ];
        for (key, ms, zero_allowed) in durations {
            if ms == 0 && !zero_allowed {
                bail!("invalid configuration: `{key}` must be greater than 0");
            }
            if ms > TEN_YEARS_MS {
                bail!("invalid configuration: `{key}` must be at most ten years");
            }
        }
        if self.database.statement_timeout_ms > i32::MAX as u64 {
            bail!(
                "invalid configuration: `database.statement_timeout_ms` must be at most {} (PostgreSQL's limit)",
                i32::MAX
            );
        }
        // A batch's writes must fit in its lease, with room for one slow write.
        if self.relay.lease_s.saturating_mul(1000) < self.mongodb.timeout_ms.saturating_mul(2) {
            bail!(
                "invalid configuration: `relay.lease_s` ({} s) must be at least twice `mongodb.timeout_ms` ({} ms)",
                self.relay.lease_s,
                self.mongodb.timeout_ms
            );
        }
        if self.relay.batch_size > 10_000 {
            bail!("invalid configuration: `relay.batch_size` must be at most 10000");
        }
        if self.relay.backoff_cap_ms < self.relay.backoff_base_ms {
            bail!(
                "invalid configuration: `relay.backoff_cap_ms` must be >= `relay.backoff_base_ms`"
            );
        }
        if self.notify.lease_s.saturating_mul(1000) < self.notify.timeout_ms.saturating_mul(2) {
            bail!(
                "invalid configuration: `notify.lease_s` ({} s) must be at least twice `notify.timeout_ms` ({} ms)",
                self.notify.lease_s,
                self.notify.timeout_ms
            );
        }
        self.mongodb.w().map_err(|e| anyhow::anyhow!(e))?;
        if self.mongodb.collection.is_empty() || self.mongodb.collection.contains('$') {
            bail!("invalid configuration: `mongodb.collection` must be a plain collection name");
        }
        Ok(())
    }

    /// The webhook secret: `OUTBOXD_WEBHOOK_SECRET`, then `ingest.webhook_secret_file`,
    /// then the systemd credential `webhook-secret`. Failing is a configuration error.
    pub fn webhook_secret(&self) -> anyhow::Result<WebhookSecret> {
        self.find_webhook_secret()
            .map_err(|e| Invalid(format!("{e:#}")).into())
    }

    /// The webhook secret ingest may serve with: not the development default,
    /// nor shorter than 16 bytes, unless `ingest.allow_insecure_secret`.
    pub fn ingest_secret(&self) -> anyhow::Result<WebhookSecret> {
        let found = self.webhook_secret()?;
        if let Some(weakness) = found.weakness()
            && !self.ingest.allow_insecure_secret
        {
            return Err(Invalid(format!(
                "invalid configuration: the webhook secret from {} is {weakness}; \
                 use a random secret of at least {MIN_SECRET_BYTES} bytes (the Zendesk \
                 webhook's signing secret), or, for development only, set \
                 `ingest.allow_insecure_secret = true`",
                found.source
            ))
            .into());
        }
        Ok(found)
    }

    /// Whether any source of a webhook secret is present (only ingest needs one).
    pub fn has_webhook_secret(&self) -> bool {
        !self.webhook_secret_sources().is_empty()
    }

    /// The sources present, in order of precedence; none is read yet.
    fn webhook_secret_sources(&self) -> Vec<SecretSource> {
        let mut sources = Vec::new();
        if std::env::var_os("OUTBOXD_WEBHOOK_SECRET").is_some_and(|v| !v.is_empty()) {
            sources.push(SecretSource::Env);
        }
        if let Some(path) = &self.ingest.webhook_secret_file {
            sources.push(SecretSource::File(path.clone()));
        }
        if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY")
            && Path::new(&dir).join(SECRET_CREDENTIAL).exists()
        {
            sources.push(SecretSource::Credential(PathBuf::from(dir)));
        }
        sources
    }

    fn find_webhook_secret(&self) -> anyhow::Result<WebhookSecret> {
        let mut sources = self.webhook_secret_sources().into_iter();
        let Some(source) = sources.next() else {
            bail!(
                "no webhook secret: set OUTBOXD_WEBHOOK_SECRET, or `ingest.webhook_secret_file`, \
                 or a systemd credential named `{SECRET_CREDENTIAL}`"
            )
        };
        let secret = match &source {
            SecretSource::Env => std::env::var("OUTBOXD_WEBHOOK_SECRET")
                .context("OUTBOXD_WEBHOOK_SECRET is not valid UTF-8")?
                .into(),
            SecretSource::File(path) => read_secret_file(path)
                .with_context(|| format!("`ingest.webhook_secret_file` ({})", path.display()))?,
            SecretSource::Credential(dir) => read_credential(dir, SECRET_CREDENTIAL)?
                .context("the credential `webhook-secret` vanished while being read")?,
        };
        Ok(WebhookSecret {
            secret,
            source,
            shadowed: sources.collect(),
        })
    }
}

/// The development secret `make run` uses; refused outside development.
pub const DEV_WEBHOOK_SECRET: &str = "dev-secret-change-me";
/// The shortest webhook secret ingest accepts outside development.
pub const MIN_SECRET_BYTES: usize = 16;
const SECRET_CREDENTIAL: &str = "webhook-secret";

/// Where a webhook secret comes from; logged by name, never with the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    Env,
    File(PathBuf),
    /// The systemd credential, in this `$CREDENTIALS_DIRECTORY`.
    Credential(PathBuf),
}

impl std::fmt::Display for SecretSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretSource::Env => f.write_str("OUTBOXD_WEBHOOK_SECRET"),
            SecretSource::File(path) => {
                write!(f, "`ingest.webhook_secret_file` ({})", path.display())
            }
            SecretSource::Credential(_) => {
                write!(f, "the systemd credential `{SECRET_CREDENTIAL}`")
            }
        }
    }
}

/// The webhook secret, the source it came from, and the sources it shadows.
pub struct WebhookSecret {
    pub secret: SecretString,
    pub source: SecretSource,
    /// Sources also present but of lower precedence, so not used.
    pub shadowed: Vec<SecretSource>,
}

impl WebhookSecret {
    /// The shadowed sources, named and joined, if any.
    pub fn shadows(&self) -> Option<String> {
        let names: Vec<String> = self.shadowed.iter().map(ToString::to_string).collect();
        (!names.is_empty()).then(|| names.join(" and "))
    }

    /// Why the secret is unfit outside development, if it is.
    pub fn weakness(&self) -> Option<&'static str> {
        let secret = self.secret.expose_secret();
        if secret == DEV_WEBHOOK_SECRET {
            Some("the development default that `make run` uses")
        } else if secret.len() < MIN_SECRET_BYTES {
            Some("shorter than 16 bytes")
        } else {
            None
        }
    }
}

/// A systemd credential's text, if the file exists.
pub(crate) fn read_credential(dir: &Path, name: &str) -> anyhow::Result<Option<SecretString>> {
    let path = dir.join(name);
    if !path.exists() {
        return Ok(None);
    }
    read_secret_file(&path)
        .with_context(|| format!("credential `{name}`"))
        .map(Some)
}

/// A secret file's text, less its trailing newline; empty is an error.
pub(crate) fn read_secret_file(path: &Path) -> anyhow::Result<SecretString> {
    let text = std::fs::read_to_string(path).context("cannot read the secret file")?;
    let secret = text.trim_end_matches(['\n', '\r']);
    if secret.is_empty() {
        bail!("the secret file is empty");
    }
    Ok(secret.to_owned().into())
}
