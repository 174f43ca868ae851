//! Outage tracking for one dependency: logs once when it goes down and once when
//! it comes back, however many attempts fail in between.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

pub struct Health {
    name: &'static str,
    down_since: Mutex<Option<Instant>>,
    /// Whether the last probe went unanswered. Only then do wake-ups wait for
    /// the backoff: a server that answers but refuses writes is still "down",
    /// yet new rows may be tried at once.
    unreachable: AtomicBool,
}

impl Health {
    pub const fn new(name: &'static str) -> Self {
        Health {
            name,
            down_since: Mutex::new(None),
            unreachable: AtomicBool::new(false),
        }
    }

    /// Records a failure; logs only on the transition from up to down.
    pub fn failed(&self, error: &dyn std::fmt::Display) {
        let mut down = self.down_since.lock().expect("health lock");
        if down.is_none() {
            *down = Some(Instant::now());
            tracing::warn!(dependency = self.name, error = %error, "{} unavailable; retrying with backoff", self.name);
        } else {
            tracing::debug!(dependency = self.name, error = %error, "{} still unavailable", self.name);
        }
    }

    /// Records a success; logs only on the transition from down to up.
    pub fn ok(&self) {
        self.unreachable.store(false, Ordering::Relaxed);
        let mut down = self.down_since.lock().expect("health lock");
        if let Some(since) = down.take() {
            let secs = since.elapsed().as_secs_f64();
            tracing::info!(
                dependency = self.name,
                outage_s = secs,
                "{} available again after {:.1}s",
                self.name,
                secs
            );
        }
    }

    /// Records whether a probe was answered.
    pub fn probed(&self, answered: bool) {
        self.unreachable.store(!answered, Ordering::Relaxed);
    }

    pub fn is_unreachable(&self) -> bool {
        self.unreachable.load(Ordering::Relaxed)
    }

    pub fn is_down(&self) -> bool {
        self.down_since.lock().expect("health lock").is_some()
    }
}
