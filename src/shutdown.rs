//! One shutdown signal (SIGTERM or SIGINT) fanned out to every task as a token.
//! systemd hears STOPPING=1 at that moment: the watchdog stops being fed then,
//! and a drain may outlast its interval. A second signal ends the process at
//! once, for an operator who will not wait for the drain.

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// A token cancelled on the first SIGTERM or SIGINT; the second one exits with
/// 128 + its number, like a shell reports a process killed by it.
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        crate::systemd::stopping();
        trigger.cancel();
        // Safe to cut short: an unanswered webhook was not committed, or its
        // redelivery gets the first answer; a relay's claimed rows are rescued
        // when their lease expires, like a relay's that died.
        let code = tokio::select! {
            _ = term.recv() => 128 + SignalKind::terminate().as_raw_value(),
            _ = int.recv() => 128 + SignalKind::interrupt().as_raw_value(),
        };
        tracing::warn!("second signal: exiting now, without finishing the drain");
        std::process::exit(code);
    });
    token
}
