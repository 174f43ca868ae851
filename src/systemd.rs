//! systemd's notify protocol: READY, WATCHDOG and STOPPING. No-ops outside systemd.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

pub fn ready() {
    let _ = sd_notify::notify(&[NotifyState::Ready]);
}

pub fn stopping() {
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
}

/// The main loop's last sign of progress, in unix seconds. The watchdog pets
/// while it is younger than the larger of the watchdog interval and
/// `stale_after`, the longest step the loop may legitimately take.
#[derive(Clone)]
pub struct Heartbeat {
    last: Arc<AtomicU64>,
    stale_after: Duration,
}

impl Heartbeat {
    pub fn new(stale_after: Duration) -> Self {
        Heartbeat {
            last: Arc::default(),
            stale_after,
        }
    }

    pub fn beat(&self) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        self.last.store(now, Ordering::Relaxed);
        metrics::gauge!("outboxd_relay_heartbeat_timestamp_seconds").set(now as f64);
    }

    fn age(&self) -> Duration {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        Duration::from_secs(now.saturating_sub(self.last.load(Ordering::Relaxed)))
    }
}

/// Sends WATCHDOG=1 at half the configured interval, while `heartbeat` (if any) is
/// fresh (see `Heartbeat`): a loop that stopped making progress gets the unit
/// restarted. Every worker beats the one heartbeat, so it notices the relay
/// stalling as a whole, not one wedged worker among working ones.
pub fn spawn_watchdog(
    shutdown: CancellationToken,
    heartbeat: Option<Heartbeat>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let Some(interval) = sd_notify::watchdog_enabled() else {
            return;
        };
        let mut tick = tokio::time::interval(interval / 2);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if heartbeat
                .as_ref()
                .is_none_or(|h| h.age() < interval.max(h.stale_after))
            {
                let _ = sd_notify::notify(&[NotifyState::Watchdog]);
            }
        }
    })
}
