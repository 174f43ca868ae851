//! `outboxd sign`: signs a body file the way Zendesk does, for trying ingest by hand.

use std::path::Path;

use anyhow::Context;
use secrecy::ExposeSecret;

use crate::config::Config;
use crate::ingest::webhook;

pub fn run(
    config: &Config,
    file: &Path,
    curl: Option<&str>,
    timestamp: Option<String>,
) -> anyhow::Result<()> {
    let body = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let secret = config.webhook_secret()?.secret;
    let timestamp =
        timestamp.unwrap_or_else(|| chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string());
    let signature = webhook::sign(secret.expose_secret().as_bytes(), &timestamp, &body);
    match curl {
        None => {
            println!("X-Zendesk-Webhook-Signature: {signature}");
            println!("X-Zendesk-Webhook-Signature-Timestamp: {timestamp}");
        }
        Some(url) => println!(
            "curl -sS -X POST '{url}' -H 'Content-Type: application/json' \
             -H 'X-Zendesk-Webhook-Signature: {signature}' \
             -H 'X-Zendesk-Webhook-Signature-Timestamp: {timestamp}' \
             --data-binary @'{}'",
            file.display()
        ),
    }
    Ok(())
}
