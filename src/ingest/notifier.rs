//! Wakes relays after commits without putting NOTIFY in the ingest transaction.
//!
//! PostgreSQL serialises the commits of transactions that notified. So requests
//! only raise a flag; one task sends at most one NOTIFY per interval, after the
//! commits it covers. Relays also poll, so a lost wake-up only delays a row.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::{db, outbox};

/// The request side: cheap to call after every commit.
#[derive(Clone)]
pub struct Notifier {
    flag: Arc<Notify>,
}

impl Notifier {
    /// Starts the sending task, which stops with `shutdown`.
    pub fn spawn(pool: Pool, interval: Duration, shutdown: CancellationToken) -> Notifier {
        let flag = Arc::new(Notify::new());
        let waiter = flag.clone();
        tokio::spawn(async move {
            let mut failing = false;
            loop {
                tokio::select! {
                    // A wake-up asked for before `shutdown` is still sent.
                    biased;
                    _ = waiter.notified() => {}
                    _ = shutdown.cancelled() => return,
                }
                let sent = match pool.get().await {
                    Ok(client) => outbox::notify(&client).await.map_err(|e| db::summarize(&e)),
                    Err(e) => Err(db::summarize_pool(&e)),
                };
                // Once per change: relays still poll, but a lasting failure shows as lag.
                match sent {
                    Err(e) if !failing => {
                        failing = true;
                        tracing::warn!(error = %e, "NOTIFY failed; relays poll until it works again");
                    }
                    Ok(()) if failing => {
                        failing = false;
                        tracing::info!("NOTIFY works again");
                    }
                    _ => {}
                }
                // Commits during this pause are covered by the next single NOTIFY.
                tokio::time::sleep(interval).await;
            }
        });
        Notifier { flag }
    }

    /// Asks for a NOTIFY soon; many calls before it is sent make one.
    pub fn wake(&self) {
        self.flag.notify_one();
    }
}
