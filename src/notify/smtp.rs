//! The SMTP transport (lettre): built from `notify.smtp_url`, its password from
//! a file or the systemd credential `smtp-password` when the URL has none.

use std::path::Path;
use std::time::Duration;

use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use secrecy::ExposeSecret;

use crate::config::{Invalid, NotifyConfig, read_credential, read_secret_file};

/// A connected-on-demand SMTP client.
#[derive(Clone)]
pub struct Smtp {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    timeout: Duration,
}

/// Why a send failed.
#[derive(Debug)]
pub enum SendError {
    /// The server refused the mail for good (5xx): retrying cannot help.
    Permanent(String),
    /// The server or the network failed, or no answer in time: retry later.
    Transient(String),
    /// Not tried: shutting down, or too late in the lease.
    NotStarted,
}

impl Smtp {
    /// Builds the transport; a bad URL or unreadable password is a
    /// configuration error. Connects only when sending.
    pub fn new(config: &NotifyConfig) -> Result<Smtp, Invalid> {
        let url = config.smtp_url.expose_secret();
        // lettre's error may quote the URL: never show it.
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::from_url(url).map_err(|_| {
            Invalid(
                "invalid configuration: `notify.smtp_url` is not a valid SMTP URL \
                 (smtp://, smtps:// or smtp://host?tls=required; the URL is not shown)"
                    .into(),
            )
        })?;
        if let Some(password) = password(config)? {
            let user = url::Url::parse(url)
                .ok()
                .map(|u| percent_decode(u.username()))
                .filter(|u| !u.is_empty())
                .ok_or_else(|| {
                    Invalid(
                        "invalid configuration: an SMTP password is given but \
                         `notify.smtp_url` names no user"
                            .into(),
                    )
                })?;
            builder = builder.credentials(Credentials::new(user, password));
        }
        let timeout = Duration::from_millis(config.timeout_ms);
        Ok(Smtp {
            transport: builder.timeout(Some(timeout)).build(),
            timeout,
        })
    }

    /// How long one SMTP step may take.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Whether the server answers (a connection and NOOP), while it is down.
    pub async fn probe(&self) -> Result<(), String> {
        match tokio::time::timeout(self.timeout * 2, self.transport.test_connection()).await {
            Ok(Ok(true)) => Ok(()),
            Ok(Ok(false)) => Err("the SMTP server does not answer NOOP".into()),
            Ok(Err(e)) => Err(describe(&e)),
            Err(_) => Err(format!(
                "no answer from the SMTP server within {:?}",
                self.timeout * 2
            )),
        }
    }

    /// Sends one mail, within the timeout.
    pub async fn send(&self, message: Message) -> Result<(), SendError> {
        // In a task of its own: a send cut off at the deadline runs on to its
        // end (each step has the timeout), instead of handing a connection
        // stopped mid-transaction back to lettre's pool, where the next mail's
        // MAIL would be refused "503 nested MAIL command".
        let transport = self.transport.clone();
        let send = tokio::spawn(async move { transport.send(message).await });
        match tokio::time::timeout(self.timeout * 2, send).await {
            Ok(Ok(Ok(_))) => Ok(()),
            Ok(Ok(Err(e))) if e.is_permanent() && !out_of_sequence(&e) => {
                Err(SendError::Permanent(describe(&e)))
            }
            Ok(Ok(Err(e))) => Err(SendError::Transient(describe(&e))),
            Ok(Err(e)) => Err(SendError::Transient(format!("the send task failed: {e}"))),
            Err(_) => Err(SendError::Transient(format!(
                "no answer from the SMTP server within {:?}",
                self.timeout * 2
            ))),
        }
    }
}

/// 503 "bad sequence of commands" is about the connection's state, not the
/// mail: lettre drops that connection, and a retry on a new one can succeed.
fn out_of_sequence(e: &lettre::transport::smtp::Error) -> bool {
    e.status().is_some_and(|code| u16::from(code) == 503)
}

/// The password from `notify.smtp_password_file`, else the credential
/// `smtp-password`; `None` leaves the URL's own.
fn password(config: &NotifyConfig) -> Result<Option<String>, Invalid> {
    let invalid = |e: anyhow::Error| Invalid(format!("invalid configuration: {e:#}"));
    if let Some(path) = &config.smtp_password_file {
        let secret = read_secret_file(path).map_err(|e| {
            invalid(e.context(format!("`notify.smtp_password_file` ({})", path.display())))
        })?;
        return Ok(Some(secret.expose_secret().to_owned()));
    }
    if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY")
        && let Some(secret) = read_credential(Path::new(&dir), "smtp-password").map_err(invalid)?
    {
        return Ok(Some(secret.expose_secret().to_owned()));
    }
    Ok(None)
}

/// A URL user name as written before percent-encoding.
fn percent_decode(text: &str) -> String {
    percent_encoding::percent_decode_str(text)
        .decode_utf8_lossy()
        .into_owned()
}

/// An SMTP error as text: its code and reason, never credentials (lettre's
/// messages carry no URL or password).
fn describe(e: &lettre::transport::smtp::Error) -> String {
    match e.status() {
        Some(code) => format!("SMTP error {code}: {e}"),
        None => format!("SMTP failed: {e}"),
    }
}
