//! `outboxd ingest`: the webhook endpoint. Verifies, validates, and commits the
//! e-mail, its outbox row and its idempotency key in one transaction. It never
//! talks to MongoDB.

pub mod notifier;
pub mod webhook;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use bytes::BytesMut;
use deadpool_postgres::Pool;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Incoming};
use hyper::header::{
    ALLOW, CONNECTION, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue, RETRY_AFTER,
};
use hyper::{Method, Request, Response, StatusCode};
use metrics_exporter_prometheus::PrometheusHandle;
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_postgres::error::SqlState;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, IngestConfig};
use crate::http::{self, Limits};
use crate::outbox::{self, Accepted};
use crate::{db, systemd};
use notifier::Notifier;

/// Everything a request needs.
pub struct App {
    pub pool: Pool,
    pub secret: SecretString,
    pub config: IngestConfig,
    pub metrics: PrometheusHandle,
    pub notifier: Notifier,
    /// The last readiness answer and when it was found: every `/readyz`
    /// within a second shares it, so a flood of probes costs PostgreSQL one
    /// check a second and takes no pool connections from webhooks.
    readiness: tokio::sync::Mutex<Option<(Instant, Readiness)>>,
}

/// Ready, or why not.
type Readiness = Result<(), &'static str>;

/// How long one readiness answer serves every probe.
const READINESS_TTL: Duration = Duration::from_secs(1);

/// Runs the daemon until `shutdown`: binds, reports ready to systemd, serves.
pub async fn run(
    config: &Config,
    listen: Option<SocketAddr>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let found = config.ingest_secret()?;
    // Named, never shown: which source won, and any it shadows (a stale
    // variable left beside a rotated credential would fail every signature).
    match found.shadows() {
        None => tracing::info!(source = %found.source, "webhook secret from {}", found.source),
        Some(shadowed) => tracing::warn!(
            source = %found.source,
            shadowed,
            "webhook secret from {}; it shadows {shadowed}, which ingest ignores",
            found.source
        ),
    }
    if let Some(weakness) = found.weakness() {
        tracing::warn!(
            source = %found.source,
            "insecure webhook secret ({weakness}), allowed by `ingest.allow_insecure_secret`: for development only"
        );
    }
    let secret = found.secret;
    let pool = db::pool(&config.database)?;
    let addr = listen.unwrap_or(config.ingest.listen);
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (`ingest.listen` / --listen)"))?;
    let metrics_listener = match config.ingest.metrics_listen {
        Some(addr) => Some(TcpListener::bind(addr).await.with_context(|| {
            format!("cannot listen on {addr} (`ingest.metrics_listen` / --metrics-listen)")
        })?),
        None => None,
    };
    match pool.get().await {
        Ok(client) => crate::migrate::warn_unless_current(&client).await,
        Err(e) => {
            tracing::warn!(error = %db::summarize_pool(&e), "PostgreSQL is not reachable yet; answering 503 until it is")
        }
    }
    // The notifier outlives the drain: rows committed during it still get a NOTIFY.
    let drained = CancellationToken::new();
    let app = App::new(config, pool, secret, drained.clone());
    tracing::info!(listen = %listener.local_addr()?, "ingest listening");
    systemd::ready();
    let watchdog = systemd::spawn_watchdog(shutdown.clone(), None);
    // Scraped through the drain too: it stops with the notifier.
    let metrics = metrics_listener.map(|listener| {
        tokio::spawn(http::serve_metrics(
            listener,
            app.metrics.clone(),
            drained.clone(),
        ))
    });
    serve(listener, app, shutdown).await;
    drained.cancel();
    if let Some(metrics) = metrics {
        let _ = metrics.await;
    }
    watchdog.abort();
    tracing::info!("ingest stopped");
    Ok(())
}

impl App {
    pub fn new(
        config: &Config,
        pool: Pool,
        secret: SecretString,
        shutdown: CancellationToken,
    ) -> Arc<App> {
        let interval = Duration::from_millis(config.ingest.notify_interval_ms);
        let notifier = Notifier::spawn(pool.clone(), interval, shutdown);
        Arc::new(App {
            pool,
            secret,
            config: config.ingest.clone(),
            metrics: crate::telemetry::init_metrics(&[]),
            notifier,
            readiness: tokio::sync::Mutex::new(None),
        })
    }
}

/// Serves `app` on `listener` until `shutdown`, then drains in-flight requests.
pub async fn serve(listener: TcpListener, app: Arc<App>, shutdown: CancellationToken) {
    let limits = Limits {
        max_connections: app.config.max_connections,
        header_read_timeout: Duration::from_millis(app.config.header_read_timeout_ms),
        // As long as a body may take to arrive, an answer may take to leave.
        write_timeout: Duration::from_millis(app.config.body_read_timeout_ms),
        shutdown_timeout: Duration::from_secs(app.config.shutdown_timeout_s),
    };
    http::serve(listener, limits, shutdown, move |req| {
        route(app.clone(), req)
    })
    .await;
}

async fn route(app: Arc<App>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let started = Instant::now();
    // A body left unread here would be read as the next request, or reset the
    // connection when it closes: the answer says the connection ends.
    let unread_body = !req.body().is_end_stream();
    let probe = matches!(*req.method(), Method::GET | Method::HEAD);
    // With `ingest.metrics_listen`, /metrics lives there alone.
    let metrics_here = app.config.metrics_listen.is_none();
    let (name, response) = match (req.method(), req.uri().path()) {
        (&Method::POST, "/webhooks/email") => ("/webhooks/email", webhook(&app, req).await),
        (_, "/healthz") if probe => (
            "/healthz",
            http::json(StatusCode::OK, &json!({"status": "ok"})),
        ),
        (_, "/readyz") if probe => ("/readyz", readyz(&app).await),
        (_, "/metrics") if probe && metrics_here => (
            "/metrics",
            http::text(
                StatusCode::OK,
                app.metrics.render(),
                "text/plain; version=0.0.4",
            ),
        ),
        (_, path @ ("/webhooks/email" | "/healthz" | "/readyz" | "/metrics"))
            if path != "/metrics" || metrics_here =>
        {
            let allow = if path == "/webhooks/email" {
                "POST"
            } else {
                "GET, HEAD"
            };
            let mut response =
                http::status_only(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static(allow));
            ("other", closing_if(unread_body, response))
        }
        _ => (
            "other",
            closing_if(
                unread_body,
                http::status_only(StatusCode::NOT_FOUND, "not found"),
            ),
        ),
    };
    let status = response.status().as_u16().to_string();
    metrics::counter!("outboxd_http_requests_total", "route" => name, "status" => status)
        .increment(1);
    metrics::histogram!("outboxd_http_request_duration_seconds", "route" => name)
        .record(started.elapsed().as_secs_f64());
    response
}

async fn readyz(app: &App) -> Response<Full<Bytes>> {
    match readiness(app).await {
        Ok(()) => http::json(StatusCode::OK, &json!({"status": "ready"})),
        Err(message) => unavailable(message),
    }
}

/// The cached answer while it is fresh, else one new check. Probes that come
/// during the check wait for it (the lock) rather than start their own.
async fn readiness(app: &App) -> Readiness {
    let mut cached = app.readiness.lock().await;
    if let Some((at, answer)) = *cached
        && at.elapsed() < READINESS_TTL
    {
        return answer;
    }
    let answer = check_ready(app).await;
    *cached = Some((Instant::now(), answer));
    answer
}

/// Ready means writable: a read-only server answers every webhook 503.
async fn check_ready(app: &App) -> Readiness {
    const DOWN: &str = "PostgreSQL is unavailable";
    let check = async {
        let client = app.pool.get().await.map_err(|_| DOWN)?;
        let row = client
            .query_one("SHOW transaction_read_only", &[])
            .await
            .map_err(|_| DOWN)?;
        if row.get::<_, String>(0) == "on" {
            drop(deadpool_postgres::Object::take(client));
            return Err("PostgreSQL is read-only");
        }
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(2), check)
        .await
        .unwrap_or(Err(DOWN))
}

fn unavailable(message: &str) -> Response<Full<Bytes>> {
    let mut response = http::status_only(StatusCode::SERVICE_UNAVAILABLE, message);
    response
        .headers_mut()
        .insert(RETRY_AFTER, "5".parse().expect("static header"));
    response
}

fn bad_request(field: Option<&str>, error: &str) -> Response<Full<Bytes>> {
    http::json(
        StatusCode::BAD_REQUEST,
        &json!({ "error": error, "field": field }),
    )
}

/// `POST /webhooks/email`, in the order: content type and encoding, size, signature,
/// body, database.
async fn webhook(app: &App, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let is_json = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        tracing::info!(outcome = "unsupported_media_type", "webhook refused");
        return closing(http::status_only(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Content-Type must be application/json",
        ));
    }
    // A compressed body would be verified and parsed as if it were the JSON.
    let encoded = req.headers().get_all(CONTENT_ENCODING).iter().any(|v| {
        !v.to_str()
            .is_ok_and(|v| v.trim().eq_ignore_ascii_case("identity"))
    });
    if encoded {
        tracing::info!(outcome = "unsupported_media_type", "webhook refused");
        return closing(http::status_only(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Content-Encoding is not supported; send the JSON uncompressed",
        ));
    }
    let limit = app.config.body_limit_bytes;
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        tracing::info!(outcome = "too_large", "webhook refused");
        return closing(too_large(limit));
    }
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let signature = header(webhook::SIGNATURE_HEADER);
    let timestamp = header(webhook::TIMESTAMP_HEADER);

    let read = read_body(req.into_body(), limit, declared.unwrap_or(0) as usize);
    let body =
        match tokio::time::timeout(Duration::from_millis(app.config.body_read_timeout_ms), read)
            .await
        {
            Err(_) => {
                tracing::info!(outcome = "body_timeout", "webhook refused");
                return closing(http::status_only(
                    StatusCode::REQUEST_TIMEOUT,
                    "timed out reading the body",
                ));
            }
            Ok(Ok(None)) => {
                tracing::info!(outcome = "too_large", "webhook refused");
                return closing(too_large(limit));
            }
            Ok(Err(_)) => {
                return closing(bad_request(None, "could not read the request body"));
            }
            Ok(Ok(Some(body))) => body,
        };

    if let Err(e) = webhook::verify(
        app.secret.expose_secret().as_bytes(),
        signature.as_deref(),
        timestamp.as_deref(),
        &body,
        chrono::Utc::now(),
        app.config.timestamp_tolerance_s,
    ) {
        metrics::counter!("outboxd_ingest_signature_failures_total").increment(1);
        tracing::warn!(outcome = "unauthorized", reason = %e, "webhook refused");
        return http::status_only(StatusCode::UNAUTHORIZED, "invalid or stale signature");
    }

    let event = match webhook::parse(&body) {
        Ok(event) => event,
        Err(invalid) => {
            tracing::info!(
                outcome = "invalid",
                field = invalid.field.as_deref(),
                "webhook refused"
            );
            return bad_request(invalid.field.as_deref(), &invalid.error);
        }
    };
    let result = accept(app, &event).await;
    // The event's fields go on each line rather than on a span: the JSON
    // formatter parses and re-serialises a span's fields for every line.
    let (webhook_id, idempotency_key) = (&event.webhook_id, &event.idempotency_key);
    let operation = crate::idempotency::UPDATE_CREDITOR_DEBT;
    match result {
        Ok((accepted, duplicate)) => {
            let (email_id, outbox_id) = (accepted.email_id, accepted.outbox_id);
            let mut body = json!({
                "email_id": accepted.email_id,
                "outbox_id": accepted.outbox_id,
                "idempotency_key": accepted.idempotency_key,
                "status": "pending",
            });
            if duplicate {
                metrics::counter!("outboxd_ingest_duplicates_total").increment(1);
                body["duplicate"] = json!(true);
                tracing::info!(
                    outcome = "duplicate",
                    webhook_id,
                    email_id,
                    outbox_id,
                    idempotency_key,
                    operation,
                    "webhook already accepted"
                );
                http::json(StatusCode::OK, &body)
            } else {
                app.notifier.wake();
                tracing::info!(
                    outcome = "accepted",
                    webhook_id,
                    email_id,
                    outbox_id,
                    idempotency_key,
                    operation,
                    "webhook accepted"
                );
                http::json(StatusCode::ACCEPTED, &body)
            }
        }
        Err(Failure::Unavailable(e)) => {
            tracing::warn!(
                outcome = "unavailable",
                webhook_id,
                idempotency_key,
                operation,
                error = %e,
                "PostgreSQL unavailable"
            );
            unavailable("PostgreSQL is unavailable; retry later")
        }
        Err(Failure::Internal(e)) => {
            tracing::error!(
                outcome = "error",
                webhook_id,
                idempotency_key,
                operation,
                error = %e,
                "webhook failed; nothing was written"
            );
            http::status_only(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal error; nothing was written",
            )
        }
    }
}

/// Reads the body into one buffer; `None` past `limit` bytes. Not hyper's
/// frames kept apart: a body sent in one-byte chunks would cost tens of times
/// its size in frame headers and the read buffers they pin.
async fn read_body(
    mut body: Incoming,
    limit: usize,
    expected: usize,
) -> Result<Option<Bytes>, hyper::Error> {
    // Not all of a declared length up front: the headers alone would reserve it.
    let mut buffer = BytesMut::with_capacity(expected.min(limit).min(64 * 1024));
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            if buffer.len() + data.len() > limit {
                return Ok(None);
            }
            buffer.extend_from_slice(&data);
        }
    }
    Ok(Some(buffer.freeze()))
}

/// The answer, and the end of the connection: sent before the request's body
/// was read to its end.
fn closing(mut response: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    response
        .headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    response
}

fn closing_if(close: bool, response: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    if close { closing(response) } else { response }
}

fn too_large(limit: usize) -> Response<Full<Bytes>> {
    http::status_only(
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!("body exceeds {limit} bytes"),
    )
}

enum Failure {
    Unavailable(String),
    Internal(String),
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Self {
        if db::is_transient(&e) {
            Failure::Unavailable(db::summarize(&e))
        } else {
            Failure::Internal(db::summarize(&e))
        }
    }
}

/// Writes the event, or finds the first answer for it. `(accepted, duplicate)`.
async fn accept(app: &App, event: &webhook::Event) -> Result<(Accepted, bool), Failure> {
    let client = app.pool.get().await.map_err(|e| {
        if db::pool_error_is_transient(&e) {
            Failure::Unavailable(db::summarize_pool(&e))
        } else {
            Failure::Internal(db::summarize_pool(&e))
        }
    })?;
    let ttl = app.config.idempotency_ttl_s as f64;
    // A duplicate's first answer can vanish between the two statements (expiry,
    // housekeeping); then the event is new again, so try once more.
    for _ in 0..3 {
        match outbox::enqueue(&client, event, ttl).await {
            Ok(Some(accepted)) => return Ok((accepted, false)),
            Ok(None) => {
                // The key's holder may be another webhook (it took over the key after
                // this one's expired); a redelivery gets its own first answer.
                if let Some(first) = outbox::accepted_by_webhook(&client, &event.webhook_id).await?
                {
                    return Ok((first, true));
                }
                if let Some(first) =
                    outbox::accepted_by_key(&client, &event.idempotency_key).await?
                {
                    return Ok((first, true));
                }
            }
            Err(e) if is_webhook_conflict(&e) => {
                if let Some(first) = outbox::accepted_by_webhook(&client, &event.webhook_id).await?
                {
                    return Ok((first, true));
                }
            }
            Err(e) => {
                if db::is_read_only(&e) {
                    // The session stays read-only after the server is writable
                    // again (a failover, a cleared lock-out): a new one is not.
                    drop(deadpool_postgres::Object::take(client));
                }
                return Err(e.into());
            }
        }
    }
    Err(Failure::Unavailable(
        "concurrent writes kept racing this event".into(),
    ))
}

fn is_webhook_conflict(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|db| {
        *db.code() == SqlState::UNIQUE_VIOLATION
            && db.constraint() == Some("incoming_emails_webhook_id_key")
    })
}
