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
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(format!("{var} is not a URL"));
    };
    if scheme.ends_with("+srv") {
        return Err(format!("{var} is a +srv URL, which looks up remote hosts"));
    }
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    // Credentials end at the last `@` of the authority.
    let hosts = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let socket_only = hosts.is_empty() && rest.contains("host=/");
    let all_loopback = !hosts.is_empty()
        && hosts.split(',').all(|h| {
            let host = match h.strip_prefix('[') {
                Some(v6) => v6.split(']').next().unwrap_or(""),
                None => h.split(':').next().unwrap_or(""),
            };
            matches!(host, "127.0.0.1" | "localhost" | "::1")
        });
    if socket_only || all_loopback {
        Ok(())
    } else {
        Err(format!(
            "{var} must point at 127.0.0.1, localhost or ::1 (or a Unix socket): \
             tests and benchmarks send no traffic off this host"
        ))
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
            "postgres:///outboxd?host=/var/run/postgresql",
        ] {
            assert_eq!(super::check_loopback("X", ok), Ok(()), "{ok}");
        }
        for bad in [
            "postgres://u:p@db.example:5432/x",
            "mongodb+srv://cluster.example/x",
            "mongodb://127.0.0.1,10.0.0.2/x",
            "postgres://u:p@127.0.0.1@evil.example/x",
            "postgres:///x",
        ] {
            assert!(super::check_loopback("X", bad).is_err(), "{bad}");
        }
    }
}
