//! The HTTP/1 server loop shared by ingest and the metrics endpoints:
//! a connection limit, header read and write timeouts, and graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_io_timeout::TimeoutStream;
use tokio_util::sync::CancellationToken;

/// Limits that keep slow or numerous clients from starving the others.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    /// How long an answer may wait for the client to read it. A client that
    /// stops reading (pipelining requests it never reads the answers to) would
    /// otherwise hold its connection slot for good.
    pub write_timeout: Duration,
    pub shutdown_timeout: Duration,
}

/// A JSON answer.
pub fn json(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    text(status, body.to_string(), "application/json")
}

/// A plain-text answer (metrics, probes).
pub fn text(status: StatusCode, body: String, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// Serves until `shutdown` fires, then stops accepting and waits for in-flight
/// requests, up to the shutdown timeout.
pub async fn serve<H, F>(
    listener: TcpListener,
    limits: Limits,
    shutdown: CancellationToken,
    handler: H,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = permits.clone().acquire_owned() => permit.expect("semaphore is never closed"),
        };
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let mut stream = TimeoutStream::new(stream);
        stream.set_write_timeout(Some(limits.write_timeout));
        let handler = handler.clone();
        let service = service_fn(move |req| {
            let handler = handler.clone();
            async move { Ok::<_, Infallible>(handler(req).await) }
        });
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .serve_connection(TokioIo::new(Box::pin(stream)), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(limits.shutdown_timeout) => {
            tracing::warn!("shutdown timeout: closing connections with requests in flight");
        }
    }
}

/// An error answer: `{"error": message}`.
pub fn status_only(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    json(status, &serde_json::json!({ "error": message }))
}

/// Serves `GET /metrics` (and `/healthz`) on a listener of their own, as
/// `relay.metrics_listen` and `ingest.metrics_listen` ask, until `shutdown`.
pub async fn serve_metrics(
    listener: TcpListener,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    shutdown: CancellationToken,
) {
    let limits = Limits {
        max_connections: 64,
        header_read_timeout: Duration::from_secs(5),
        write_timeout: Duration::from_secs(5),
        shutdown_timeout: Duration::from_secs(1),
    };
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(listen = %addr, "metrics listening");
    }
    serve(listener, limits, shutdown, move |req| {
        let metrics = metrics.clone();
        async move {
            match (req.method(), req.uri().path()) {
                (&Method::GET, "/metrics") => text(
                    StatusCode::OK,
                    metrics.render(),
                    "text/plain; version=0.0.4",
                ),
                (&Method::GET, "/healthz") => {
                    json(StatusCode::OK, &serde_json::json!({"status": "ok"}))
                }
                _ => status_only(StatusCode::NOT_FOUND, "not found"),
            }
        }
    })
    .await;
}
