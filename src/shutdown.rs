//! One shutdown signal (SIGTERM or SIGINT) fanned out to every task as a token.
//! systemd hears STOPPING=1 at that moment: the watchdog stops being fed then,
//! and a drain may outlast its interval. A second signal ends the process at
//! once, for an operator who will not wait for the drain.

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// A token cancelled on the first SIGTERM or SIGINT; the second one ends the
/// process by that signal.
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
        let second = tokio::select! {
            _ = term.recv() => SignalKind::terminate(),
            _ = int.recv() => SignalKind::interrupt(),
        };
        tracing::warn!("second signal: exiting now, without finishing the drain");
        die_by(second.as_raw_value());
    });
    token
}

/// Ends the process by `signal`'s default action, so that systemd and shells
/// see it killed by that signal (a stop, not a failure), as if never caught.
fn die_by(signal: i32) -> ! {
    // SAFETY: resetting a signal's action and raising it touch no Rust state.
    unsafe {
        libc::signal(signal, libc::SIG_DFL);
        libc::raise(signal);
    }
    std::process::exit(128 + signal)
}
