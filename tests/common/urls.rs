//! The services' URLs, shared by the tests and the benchmark.

/// `url` with its database (path) replaced.
pub fn with_database(url: &str, name: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("URL has a scheme");
    let (authority, tail) = rest.split_once('/').unwrap_or((rest, ""));
    let query = tail
        .split_once('?')
        .map(|(_, q)| format!("?{q}"))
        .unwrap_or_default();
    format!("{scheme}://{authority}/{name}{query}")
}

/// Tests and benchmarks talk only to servers on this host: a URL taken from the
/// environment must name loopback, or a Unix socket. `Err` names the variable
/// and why, never the URL (it may hold a password).
pub fn check_loopback(var: &str, url: &str) -> Result<(), String> {
    let refuse = |why: &str| {
        Err(format!(
            "{var} must point at 127.0.0.1, localhost or ::1 (or a Unix socket), since \
             tests and benchmarks send no traffic off this host: {why}"
        ))
    };
    let Some((scheme, rest)) = url.split_once("://") else {
        return refuse("not a URL");
    };
    if scheme.ends_with("+srv") {
        return refuse("a +srv URL looks up remote hosts");
    }
    let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, path) = before_query.split_once('/').unwrap_or((before_query, ""));
    if path.contains('@') || query.contains('@') {
        // Some parsers take everything up to the last `@` as credentials.
        return refuse("an `@` past the host");
    }
    let hosts = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let mut named: Vec<&str> = hosts.split(',').filter(|h| !h.is_empty()).collect();
    for (key, value) in query.split('&').filter_map(|kv| kv.split_once('=')) {
        match key {
            "host" => named.extend(value.split(',').filter(|h| !h.starts_with('/'))),
            "hostaddr" => named.extend(value.split(',')),
            _ => {}
        }
    }
    let socket = query
        .split('&')
        .any(|kv| kv.strip_prefix("host=").is_some_and(|v| v.starts_with('/')));
    if named.is_empty() && !socket {
        return refuse("no host");
    }
    let loopback = |h: &str| {
        let host = match h.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(""),
            None if h.matches(':').count() > 1 => h,
            None => h.split(':').next().unwrap_or(""),
        };
        matches!(host, "127.0.0.1" | "localhost" | "::1")
    };
    match named.into_iter().find(|h| !loopback(h)) {
        Some(_) => refuse("a host that is not loopback"),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_loopback_passes() {
        for ok in [
            "postgres://outboxd:pw@127.0.0.1:5432/outboxd",
            "mongodb://127.0.0.1:27017/outboxd",
            "mongodb://localhost,127.0.0.1:27018/x?replicaSet=r",
            "postgres://u:p@[::1]:5432/x",
            "postgres://u:p@127.0.0.1/x?host=127.0.0.1&hostaddr=::1",
            "postgres:///outboxd?host=/var/run/postgresql",
        ] {
            assert_eq!(super::check_loopback("X", ok), Ok(()), "{ok}");
        }
        for bad in [
            "postgres://u:p@db.example:5432/x",
            "mongodb+srv://cluster.example/x",
            "mongodb://127.0.0.1,10.0.0.2/x",
            "postgres://u:p@127.0.0.1@evil.example/x",
            "postgres://127.0.0.1/x@db.example",
            "postgres://u:p@127.0.0.1/x?hostaddr=10.0.0.5",
            "postgres:///x?host=/tmp,db.example",
            "postgres:///x",
        ] {
            assert!(super::check_loopback("X", bad).is_err(), "{bad}");
        }
    }
}
