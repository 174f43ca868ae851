//! A real SMTP server for tests: `scripts/smtp-sink.py` (aiosmtpd, installed
//! into `.tools/smtp-venv` on first use) on a free loopback port, storing each
//! message it accepts as a file this harness reads.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// One received mail: its envelope recipients, headers (unfolded) and body
/// (quoted-printable or base64 decoded, as UTF-8).
#[derive(Debug, Clone)]
pub struct Mail {
    pub envelope_to: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Mail {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A running sink; stopped when dropped.
pub struct SmtpSink {
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: Option<Child>,
}

fn python() -> String {
    static PYTHON: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PYTHON.get_or_init(install).clone()
}

fn install() -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/smtp-sink-install.sh");
    let out = Command::new(script)
        .stderr(Stdio::inherit())
        .output()
        .expect("scripts/smtp-sink-install.sh runs");
    assert!(out.status.success(), "installing aiosmtpd failed");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

impl SmtpSink {
    pub async fn start() -> SmtpSink {
        let mut sink = SmtpSink {
            port: super::free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        sink.resume().await;
        sink
    }

    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    /// (Re)starts the server on its port, and waits until it answers.
    pub async fn resume(&mut self) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/smtp-sink.py");
        let child = Command::new(python())
            .args([script, &self.port.to_string()])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("smtp-sink starts");
        self.child = Some(child);
        let up = super::eventually(Duration::from_secs(20), || async {
            tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
        })
        .await;
        assert!(up, "smtp-sink did not come up on {}", self.port);
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Each DATA answer waits `seconds` after storing the mail (0: none).
    pub fn set_delay(&self, seconds: f64) {
        std::fs::write(self.dir.path().join(".delay"), seconds.to_string()).unwrap();
    }

    /// Each MAIL, RCPT and DATA answer waits `seconds` (0: none).
    pub fn set_slow(&self, seconds: f64) {
        std::fs::write(self.dir.path().join(".slow"), seconds.to_string()).unwrap();
    }

    /// Whether DATA is answered 550, refusing each mail for good.
    pub fn set_reject(&self, reject: bool) {
        let path = self.dir.path().join(".reject");
        if reject {
            std::fs::write(path, "").unwrap();
        } else {
            let _ = std::fs::remove_file(path);
        }
    }

    /// The mails received so far, in order.
    pub fn mails(&self) -> Vec<Mail> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "eml"))
            .collect();
        files.sort();
        parse(&files)
    }

    pub fn count(&self) -> usize {
        std::fs::read_dir(self.dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "eml"))
            })
            .count()
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Parses stored messages; decodes RFC 2047 headers and the bodies' transfer
/// encoding with Python's `email` package, an independent reader.
fn parse(files: &[PathBuf]) -> Vec<Mail> {
    const DECODE: &str = r#"
import sys, json, email, email.policy
out = []
for path in sys.stdin.read().splitlines():
    with open(path, "rb") as f:
        m = email.message_from_bytes(f.read(), policy=email.policy.default)
    out.append({"headers": [[k, str(v)] for k, v in m.items()], "body": m.get_content()})
print(json.dumps(out))
"#;
    if files.is_empty() {
        return Vec::new();
    }
    // The paths on stdin: a long campaign stores more than an argument list holds.
    let mut child = Command::new(python())
        .args(["-c", DECODE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let paths: String = files.iter().map(|f| format!("{}\n", f.display())).collect();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(paths.as_bytes()));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(out.status.success(), "cannot parse the stored mails");
    let v: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    v.iter()
        .map(|m| {
            let headers: Vec<(String, String)> = m["headers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|h| (h[0].as_str().unwrap().into(), h[1].as_str().unwrap().into()))
                .collect();
            let envelope_to = headers
                .iter()
                .find(|(k, _)| k == "X-Envelope-To")
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
            Mail {
                envelope_to,
                headers,
                body: m["body"].as_str().unwrap().into(),
            }
        })
        .collect()
}
