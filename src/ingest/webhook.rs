//! The Zendesk webhook: its signature, and the body turned into a validated event.
//! Pure functions, so the fuzzer and unit tests reach them without a server.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use chrono::{DateTime, TimeDelta, Utc};
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Map, Value, json};
use sha2::Sha256;

use crate::idempotency;
use crate::money::Amount;

pub const SIGNATURE_HEADER: &str = "x-zendesk-webhook-signature";
pub const TIMESTAMP_HEADER: &str = "x-zendesk-webhook-signature-timestamp";

/// Why a signature was refused; logged, never echoed with the signature itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("missing signature headers")]
    Missing,
    #[error("malformed signature timestamp")]
    BadTimestamp,
    #[error("signature timestamp outside the allowed window")]
    Stale,
    #[error("signature does not match")]
    Mismatch,
}

/// HMAC-SHA256(secret, timestamp + body), the MAC Zendesk signs with.
fn mac(secret: &[u8], timestamp: &str, body: &[u8]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(timestamp.as_bytes());
    mac.update(body);
    mac
}

/// Computes Zendesk's signature: base64(HMAC-SHA256(secret, timestamp + body)).
pub fn sign(secret: &[u8], timestamp: &str, body: &[u8]) -> String {
    let mac = mac(secret, timestamp, body);
    BASE64.encode(mac.finalize().into_bytes())
}

/// Checks freshness, then the MAC in constant time.
pub fn verify(
    secret: &[u8],
    signature: Option<&str>,
    timestamp: Option<&str>,
    body: &[u8],
    now: DateTime<Utc>,
    tolerance_s: u64,
) -> Result<(), SignatureError> {
    let (Some(signature), Some(timestamp)) = (signature, timestamp) else {
        return Err(SignatureError::Missing);
    };
    let at =
        DateTime::parse_from_rfc3339(timestamp.trim()).map_err(|_| SignatureError::BadTimestamp)?;
    // Exact durations: whole seconds would truncate 300.9 s of skew to 300.
    let skew = (now - at.with_timezone(&Utc)).abs();
    let tolerance = i64::try_from(tolerance_s)
        .ok()
        .and_then(TimeDelta::try_seconds)
        .unwrap_or(TimeDelta::MAX);
    if skew > tolerance {
        return Err(SignatureError::Stale);
    }
    let expected = BASE64
        .decode(signature.trim())
        .map_err(|_| SignatureError::Mismatch)?;
    let mac = mac(secret, timestamp, body);
    mac.verify_slice(&expected)
        .map_err(|_| SignatureError::Mismatch)
}

/// A 400 answer: what is wrong, and which field (dotted path), if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub field: Option<String>,
    pub error: String,
}

impl Invalid {
    fn field(field: &str, error: impl Into<String>) -> Self {
        Invalid {
            field: Some(field.to_owned()),
            error: format!("`{field}` {}", error.into()),
        }
    }
}

/// A webhook that passed validation, ready to be written.
#[derive(Debug, Clone)]
pub struct Event {
    pub webhook_id: String,
    pub ticket_id: i64,
    pub message_id: Option<String>,
    pub from: String,
    pub subject: String,
    pub body: String,
    pub received_at: Option<DateTime<Utc>>,
    pub aggregate_id: String,
    pub idempotency_key: String,
    /// The `creditor_debt` object as stored in the outbox (validated fields only).
    pub payload: Value,
}

const SHORT: usize = 256;
const LINE: usize = 998; // RFC 5322's line limit bounds subjects and message ids.

/// Parses and validates the body. Unknown fields are ignored.
pub fn parse(body: &[u8]) -> Result<Event, Invalid> {
    let value: Value = serde_json::from_slice(body).map_err(|e| Invalid {
        field: None,
        error: format!("malformed JSON: {}", e),
    })?;
    let root = value.as_object().ok_or(Invalid {
        field: None,
        error: "the body must be a JSON object".into(),
    })?;
    let webhook_id = text(root, "webhook_id", "webhook_id", SHORT, true)?.expect("required");
    let ticket_id = match root.get("ticket_id") {
        None | Some(Value::Null) => return Err(Invalid::field("ticket_id", "is required")),
        Some(v) => v
            .as_i64()
            .filter(|id| *id > 0)
            .ok_or_else(|| Invalid::field("ticket_id", "must be a positive integer"))?,
    };
    let email = object(root, "email")?;
    let message_id = text(email, "message_id", "email.message_id", LINE, false)?;
    let from = text(email, "from", "email.from", 320, true)?.expect("required");
    if !looks_like_address(&from) {
        return Err(Invalid::field("email.from", "must be an e-mail address"));
    }
    let subject = any_text(email, "subject", "email.subject", LINE)?;
    let body_text = any_text(email, "body", "email.body", usize::MAX)?;
    let received_at = match text(email, "received_at", "email.received_at", SHORT, false)? {
        None => None,
        Some(t) => Some(
            DateTime::parse_from_rfc3339(&t)
                .map_err(|_| Invalid::field("email.received_at", "must be an RFC 3339 timestamp"))?
                .with_timezone(&Utc),
        ),
    };

    let debt = object(root, "creditor_debt")?;
    let client_reference = text(
        debt,
        "client_reference",
        "creditor_debt.client_reference",
        SHORT,
        true,
    )?
    .expect("required");
    if client_reference.contains('/') {
        return Err(Invalid::field(
            "creditor_debt.client_reference",
            "must not contain '/'",
        ));
    }
    let creditor_name = text(
        debt,
        "creditor_name",
        "creditor_debt.creditor_name",
        SHORT,
        true,
    )?
    .expect("required");
    let creditor_reference = text(
        debt,
        "creditor_reference",
        "creditor_debt.creditor_reference",
        SHORT,
        false,
    )?;
    // `name:` marks a name-based aggregate; a reference spelling one would share
    // another creditor's document. Case-insensitive, so none even looks alike.
    if creditor_reference
        .as_deref()
        .and_then(|r| r.get(..5))
        .is_some_and(|prefix| prefix.eq_ignore_ascii_case("name:"))
    {
        return Err(Invalid::field(
            "creditor_debt.creditor_reference",
            "must not begin with \"name:\"",
        ));
    }
    let amount_text = match debt.get("amount") {
        None | Some(Value::Null) => {
            return Err(Invalid::field("creditor_debt.amount", "is required"));
        }
        Some(Value::String(s)) => s.clone(),
        Some(_) => {
            return Err(Invalid::field(
                "creditor_debt.amount",
                "must be a decimal string such as \"1234.56\", not a number",
            ));
        }
    };
    Amount::parse(&amount_text).map_err(|e| Invalid::field("creditor_debt.amount", e))?;
    let currency = text(debt, "currency", "creditor_debt.currency", 3, true)?.expect("required");
    if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(Invalid::field(
            "creditor_debt.currency",
            "must be a three-letter ISO 4217 code such as \"EUR\"",
        ));
    }

    let mut payload = json!({
        "client_reference": client_reference,
        "creditor_name": creditor_name,
        "amount": amount_text,
        "currency": currency,
    });
    if let Some(reference) = &creditor_reference {
        payload["creditor_reference"] = Value::String(reference.clone());
    }
    let aggregate_id = idempotency::aggregate_id(
        &client_reference,
        creditor_reference.as_deref(),
        &creditor_name,
    );
    let idempotency_key =
        idempotency::key(idempotency::UPDATE_CREDITOR_DEBT, &aggregate_id, &payload);
    Ok(Event {
        webhook_id,
        ticket_id,
        message_id,
        from,
        subject,
        body: body_text,
        received_at,
        aggregate_id,
        idempotency_key,
        payload,
    })
}

fn object<'a>(root: &'a Map<String, Value>, name: &str) -> Result<&'a Map<String, Value>, Invalid> {
    match root.get(name) {
        None | Some(Value::Null) => Err(Invalid::field(name, "is required")),
        Some(Value::Object(map)) => Ok(map),
        Some(_) => Err(Invalid::field(name, "must be an object")),
    }
}

/// A string field that, when present, is non-blank, bounded, and free of control
/// characters. A blank optional field counts as absent: Zendesk's placeholders
/// render a missing value as "", and refusing it would refuse every redelivery.
fn text(
    map: &Map<String, Value>,
    key: &str,
    path: &str,
    max: usize,
    required: bool,
) -> Result<Option<String>, Invalid> {
    match map.get(key) {
        None | Some(Value::Null) if required => Err(Invalid::field(path, "is required")),
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => {
            if s.trim().is_empty() {
                if required {
                    return Err(Invalid::field(path, "must not be empty"));
                }
                return Ok(None);
            }
            if s.chars().count() > max {
                return Err(Invalid::field(
                    path,
                    format!("must be at most {max} characters"),
                ));
            }
            if s.chars().any(char::is_control) {
                return Err(Invalid::field(path, "must not contain control characters"));
            }
            Ok(Some(s.clone()))
        }
        Some(_) => Err(Invalid::field(path, "must be a string")),
    }
}

/// A required string that may be empty or multi-line (subject, body); NUL is refused
/// because PostgreSQL text cannot hold it.
fn any_text(
    map: &Map<String, Value>,
    key: &str,
    path: &str,
    max: usize,
) -> Result<String, Invalid> {
    match map.get(key) {
        None | Some(Value::Null) => Err(Invalid::field(path, "is required")),
        Some(Value::String(s)) => {
            if s.contains('\0') {
                return Err(Invalid::field(path, "must not contain NUL characters"));
            }
            if max != usize::MAX && s.chars().count() > max {
                return Err(Invalid::field(
                    path,
                    format!("must be at most {max} characters"),
                ));
            }
            Ok(s.clone())
        }
        Some(_) => Err(Invalid::field(path, "must be a string")),
    }
}

fn looks_like_address(s: &str) -> bool {
    match s.rsplit_once('@') {
        Some((local, domain)) => {
            !local.is_empty() && !domain.is_empty() && !s.chars().any(char::is_whitespace)
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = include_str!("../../examples/webhook-email.json");
    const SECRET: &str = "dGhpc19zZWNyZXRfaXNfZm9yX3Rlc3Rpbmdfb25seQ==";

    #[test]
    fn signature_matches_the_independent_vector() {
        let ts = "2026-11-28T09:15:02Z";
        let sig = "R4VErBajZHXbU2jz5vWlgVsUXOxlO4wpmGna6kGtVgE=";
        assert_eq!(SAMPLE.len(), 553);
        assert_eq!(sign(SECRET.as_bytes(), ts, SAMPLE.as_bytes()), sig);
        let now = DateTime::parse_from_rfc3339("2026-11-28T09:16:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            verify(
                SECRET.as_bytes(),
                Some(sig),
                Some(ts),
                SAMPLE.as_bytes(),
                now,
                300
            ),
            Ok(())
        );
        assert_eq!(
            verify(b"other", Some(sig), Some(ts), SAMPLE.as_bytes(), now, 300),
            Err(SignatureError::Mismatch)
        );
        let later = now + chrono::Duration::minutes(10);
        assert_eq!(
            verify(
                SECRET.as_bytes(),
                Some(sig),
                Some(ts),
                SAMPLE.as_bytes(),
                later,
                300
            ),
            Err(SignatureError::Stale)
        );
        assert_eq!(
            verify(SECRET.as_bytes(), None, Some(ts), b"", now, 300),
            Err(SignatureError::Missing)
        );
    }

    #[test]
    fn the_window_is_exact_to_the_millisecond() {
        let ts = "2026-11-28T09:15:00Z";
        let sig = sign(SECRET.as_bytes(), ts, b"{}");
        let at = DateTime::parse_from_rfc3339(ts)
            .unwrap()
            .with_timezone(&Utc);
        let check = |skew_ms| {
            let now = at + TimeDelta::milliseconds(skew_ms);
            verify(SECRET.as_bytes(), Some(&sig), Some(ts), b"{}", now, 300)
        };
        assert_eq!(check(300_000), Ok(()));
        assert_eq!(check(-300_000), Ok(()));
        assert_eq!(check(300_001), Err(SignatureError::Stale));
        assert_eq!(check(-300_900), Err(SignatureError::Stale));
    }

    #[test]
    fn parses_the_sample() {
        let event = parse(SAMPLE.as_bytes()).unwrap();
        assert_eq!(event.aggregate_id, "MP-2026-0042/K-99812");
        assert_eq!(
            event.idempotency_key,
            "update_creditor_debt:MP-2026-0042/K-99812:92bb92c4cd9d0363"
        );
        assert_eq!(event.payload["creditor_name"], "Sparkasse KölnBonn");
    }

    #[test]
    fn names_the_bad_field() {
        let mut v: Value = serde_json::from_str(SAMPLE).unwrap();
        v["creditor_debt"]["amount"] = json!(12.5);
        let err = parse(v.to_string().as_bytes()).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("creditor_debt.amount"));
        v["creditor_debt"]["amount"] = json!("1");
        v["email"].as_object_mut().unwrap().remove("from");
        assert_eq!(
            parse(v.to_string().as_bytes())
                .unwrap_err()
                .field
                .as_deref(),
            Some("email.from")
        );
        assert_eq!(parse(b"{").unwrap_err().field, None);
    }
}
