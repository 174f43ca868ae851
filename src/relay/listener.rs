//! The LISTEN connection, turned into wake-ups for the workers. It reconnects with
//! capped, jittered backoff; while it is down the workers fall back to polling.

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::StreamExt;
use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;

use crate::outbox::CHANNEL;

/// Wakes every worker once (each keeps a permit if it is busy).
fn wake_all(wakers: &[Arc<Notify>]) {
    for w in wakers {
        w.notify_one();
    }
}

/// Runs until `shutdown`. `poll_ms` only appears in the log line about the fallback.
///
/// A notification wakes one idle worker through `nudge` (or the next to finish,
/// if all are busy): waking all of them would send each one to claim, and all
/// but one would find nothing. A reconnect wakes every worker, through `wakers`.
pub async fn run(
    pg: tokio_postgres::Config,
    wakers: Vec<Arc<Notify>>,
    nudge: Arc<Notify>,
    poll_ms: u64,
    shutdown: CancellationToken,
) {
    let schedule = || {
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(10))
            .with_jitter()
            .without_max_times()
            .build()
    };
    let mut backoff = schedule();
    let mut was_connected = true; // so that a first failure is logged
    loop {
        match listen(&pg, &wakers, &nudge, &shutdown).await {
            Ok(()) => return, // shutdown
            Err(Lost { connected, error }) => {
                metrics::gauge!("outboxd_relay_listener_connected").set(0.0);
                if connected {
                    backoff = schedule();
                }
                if connected || was_connected {
                    tracing::warn!(error = %error, poll_ms, "LISTEN connection lost; polling until it is back");
                }
                was_connected = false;
            }
        }
        let delay = backoff.next().unwrap_or(Duration::from_secs(10));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

struct Lost {
    connected: bool,
    error: String,
}

async fn listen(
    pg: &tokio_postgres::Config,
    wakers: &[Arc<Notify>],
    nudge: &Arc<Notify>,
    shutdown: &CancellationToken,
) -> Result<(), Lost> {
    let lost = |connected: bool| {
        move |e: tokio_postgres::Error| Lost {
            connected,
            error: e.to_string(),
        }
    };
    let (client, mut connection) = pg.connect(NoTls).await.map_err(lost(false))?;
    let (done_tx, mut done_rx) = tokio::sync::oneshot::channel::<String>();
    let forward = nudge.clone();
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        let reason = loop {
            match messages.next().await {
                Some(Ok(AsyncMessage::Notification(_))) => forward.notify_one(),
                Some(Ok(_)) => {}
                Some(Err(e)) => break e.to_string(),
                None => break "connection closed".to_owned(),
            }
        };
        let _ = done_tx.send(reason);
    });
    if let Err(e) = client.batch_execute(&format!("LISTEN {CHANNEL}")).await {
        driver.abort();
        return Err(lost(false)(e));
    }
    metrics::gauge!("outboxd_relay_listener_connected").set(1.0);
    tracing::info!(channel = CHANNEL, "listening for notifications");
    // Rows committed while we were not listening were never announced.
    wake_all(wakers);
    tokio::select! {
        _ = shutdown.cancelled() => {
            driver.abort();
            Ok(())
        }
        reason = &mut done_rx => Err(Lost { connected: true, error: reason.unwrap_or_else(|_| "driver ended".into()) }),
    }
}
