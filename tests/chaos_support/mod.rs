//! Helpers for the fault campaign (tests/chaos.rs): a private PostgreSQL cluster
//! that can be restarted without disturbing other tests, a PostgreSQL client that
//! reconnects by itself, and a resilient signed POST.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

/// A throw-away PostgreSQL cluster owned by the `postgres` OS user, on its own
/// loopback port and socket directory. Stopped and removed when dropped.
pub struct PgCluster {
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub bin: PathBuf,
    pub log: PathBuf,
}

/// The newest installed server's bin directory with initdb and pg_ctl.
fn pg_bin_dir() -> Option<PathBuf> {
    let mut best: Option<(u32, PathBuf)> = None;
    for entry in std::fs::read_dir("/usr/lib/postgresql").ok()?.flatten() {
        let Ok(version) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let bin = entry.path().join("bin");
        if bin.join("initdb").is_file()
            && bin.join("pg_ctl").is_file()
            && best.as_ref().is_none_or(|b| version > b.0)
        {
            best = Some((version, bin));
        }
    }
    best.map(|b| b.1)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn run_as_postgres(args: &[&str]) -> Result<String, String> {
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("runuser: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("{} failed ({}): {text}", args[0], out.status))
    }
}

impl PgCluster {
    /// `Err` explains why a private cluster is impossible here (not root, no initdb).
    pub fn start() -> Result<PgCluster, String> {
        if !is_root() {
            return Err("not running as root, so cannot run initdb as the postgres user".into());
        }
        let bin = pg_bin_dir().ok_or("no /usr/lib/postgresql/<ver>/bin/initdb found")?;
        if Command::new("id")
            .arg("postgres")
            .stdout(Stdio::null())
            .status()
            .map(|s| !s.success())
            .unwrap_or(true)
        {
            return Err("there is no `postgres` OS user".into());
        }
        let dir = tempfile::Builder::new()
            .prefix("outboxd-chaos-pg-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let data = dir.path().join("data");
        let log = dir.path().join("postgres.log");
        std::fs::create_dir_all(&data).map_err(|e| e.to_string())?;
        let chown = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(dir.path())
            .status();
        if !chown.is_ok_and(|s| s.success()) {
            return Err("cannot chown the cluster directory to postgres".into());
        }
        let initdb = bin.join("initdb");
        run_as_postgres(&[
            initdb.to_str().unwrap(),
            "-D",
            data.to_str().unwrap(),
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ])?;
        let cluster = PgCluster {
            port: crate::common::free_port(),
            dir,
            bin,
            log,
        };
        cluster.ctl(&["start"])?;
        Ok(cluster)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn ctl(&self, action: &[&str]) -> Result<String, String> {
        let pg_ctl = self.bin.join("pg_ctl");
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200",
            self.port,
            self.dir.path().display()
        );
        let data = self.data();
        let log = self.log.clone();
        let mut args: Vec<&str> = vec![
            pg_ctl.to_str().unwrap(),
            "-D",
            data.to_str().unwrap(),
            "-o",
            &opts,
            "-l",
            log.to_str().unwrap(),
            "-w",
            "-t",
            "60",
        ];
        args.extend_from_slice(action);
        run_as_postgres(&args)
    }

    /// `postgres://postgres@127.0.0.1:PORT/db`
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// `pg_ctl restart -m MODE` (fast or immediate); returns how long it took.
    pub fn restart(&self, mode: &str) -> Result<Duration, String> {
        let started = Instant::now();
        self.ctl(&["restart", "-m", mode])?;
        Ok(started.elapsed())
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self.ctl(&["stop", "-m", "immediate"]);
    }
}

/// A PostgreSQL client that reconnects after errors (restarts, terminations), with
/// bounded waits; every query answers `None` instead of failing.
pub struct Pg {
    url: String,
    client: Option<tokio_postgres::Client>,
}

impl Pg {
    pub fn new(url: &str) -> Pg {
        Pg {
            url: url.to_owned(),
            client: None,
        }
    }

    async fn client(&mut self) -> Option<&tokio_postgres::Client> {
        if self.client.as_ref().is_some_and(|c| c.is_closed()) {
            self.client = None;
        }
        if self.client.is_none() {
            match tokio::time::timeout(
                Duration::from_secs(3),
                tokio_postgres::connect(&self.url, NoTls),
            )
            .await
            {
                Ok(Ok((client, conn))) => {
                    tokio::spawn(conn);
                    self.client = Some(client);
                }
                _ => return None,
            }
        }
        self.client.as_ref()
    }

    pub async fn query(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Option<Vec<Row>> {
        let client = self.client().await?;
        match tokio::time::timeout(Duration::from_secs(20), client.query(sql, params)).await {
            Ok(Ok(rows)) => Some(rows),
            _ => {
                self.client = None;
                None
            }
        }
    }

    pub async fn count(&mut self, sql: &str) -> Option<i64> {
        self.query(sql, &[]).await.map(|rows| rows[0].get(0))
    }

    /// Retries until it answers or `timeout` passes.
    pub async fn query_retry(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        timeout: Duration,
    ) -> Vec<Row> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(rows) = self.query(sql, params).await {
                return rows;
            }
            assert!(
                Instant::now() < deadline,
                "PostgreSQL did not answer `{sql}` within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Lines of a log file that contain `needle`.
pub fn count_lines(path: &Path, needle: &str) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

/// Sends `signal` (e.g. "KILL", "TERM", "STOP", "CONT") to `pid`; false if it failed
/// (for instance because the process is already gone).
pub fn send_signal(pid: i32, signal: &str) -> bool {
    Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
