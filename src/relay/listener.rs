//! The LISTEN connection, turned into wake-ups for the workers. It reconnects with
//! capped, jittered backoff; while it is down the workers fall back to polling.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::Notify;
use tokio_postgres::AsyncMessage;
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
    pg: crate::db::Connector,
    wakers: Vec<Arc<Notify>>,
    nudge: Arc<Notify>,
    poll_ms: u64,
    shutdown: CancellationToken,
) {
    let schedule = || super::retry_forever(Duration::from_millis(100), Duration::from_secs(10));
    let mut backoff = schedule();
    let mut was_connected = true; // so that a first failure is logged
    loop {
        match listen(&pg, &wakers, &nudge, &shutdown).await {
            Ok(()) => return, // shutdown
            Err(Lost { connected, error }) => {
                metrics::gauge!("outboxd_relay_listener_connected").set(0.0);
                // Start the backoff over only after a connection that lasted: one
                // killed right after LISTEN must not be retried every 100 ms.
                if connected.is_some_and(|up| up >= STABLE) {
                    backoff = schedule();
                }
                let connected = connected.is_some();
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

/// A LISTEN connection up this long counts as having worked.
const STABLE: Duration = Duration::from_secs(30);
/// For connecting, and again for LISTEN: a server that accepts TCP and then
/// stalls must not leave the relay without a listener and without a retry.
const SET_UP: Duration = Duration::from_secs(10);

struct Lost {
    /// How long the connection was up, if LISTEN succeeded.
    connected: Option<Duration>,
    error: String,
}

async fn listen(
    pg: &crate::db::Connector,
    wakers: &[Arc<Notify>],
    nudge: &Arc<Notify>,
    shutdown: &CancellationToken,
) -> Result<(), Lost> {
    let lost = |e: tokio_postgres::Error| Lost {
        connected: None,
        error: crate::db::summarize(&e),
    };
    let timed_out = |_| Lost {
        connected: None,
        error: format!("no connection and LISTEN within {SET_UP:?}"),
    };
    let (client, mut connection) = tokio::time::timeout(SET_UP, pg.connect())
        .await
        .map_err(timed_out)?
        .map_err(lost)?;
    let (done_tx, mut done_rx) = tokio::sync::oneshot::channel::<String>();
    let forward = nudge.clone();
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        let reason = loop {
            match messages.next().await {
                Some(Ok(AsyncMessage::Notification(_))) => forward.notify_one(),
                Some(Ok(_)) => {}
                Some(Err(e)) => break crate::db::summarize(&e),
                None => break "connection closed".to_owned(),
            }
        };
        let _ = done_tx.send(reason);
    });
    let listening = tokio::time::timeout(SET_UP, crate::outbox::listen(&client));
    match listening.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            driver.abort();
            return Err(lost(e));
        }
        Err(elapsed) => {
            driver.abort();
            return Err(timed_out(elapsed));
        }
    }
    let since = std::time::Instant::now();
    metrics::gauge!("outboxd_relay_listener_connected").set(1.0);
    tracing::info!(channel = CHANNEL, "listening for notifications");
    // Rows committed while we were not listening were never announced.
    wake_all(wakers);
    tokio::select! {
        _ = shutdown.cancelled() => {
            driver.abort();
            Ok(())
        }
        reason = &mut done_rx => Err(Lost {
            connected: Some(since.elapsed()),
            error: reason.unwrap_or_else(|_| "driver ended".into()),
        }),
    }
}
