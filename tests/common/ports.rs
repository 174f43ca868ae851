//! Loopback ports for the servers that tests and benches start.

/// A loopback port that nothing listens on, below the kernel's ephemeral range.
/// A port the kernel handed out (`bind(0)`) could be taken by any outgoing
/// connection between this call and the server's bind, or while a test restarts
/// the server that holds it; ports below the range are never handed out.
pub fn free_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let (low, span) = (10_000, ephemeral_low.saturating_sub(10_000));
    if span < 1_000 {
        return bind_any_port();
    }
    // Each test process starts somewhere else, and its tests take turns from there.
    let start = std::process::id().wrapping_mul(2_654_435_761) % span;
    for _ in 0..span {
        let offset = (start + NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)) % span;
        let port = (low + offset) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    bind_any_port()
}

fn bind_any_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
