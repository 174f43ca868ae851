//! Idempotency keys and aggregate ids, as the original design defines them.
//!
//! - aggregate: `{client_reference}/{creditor}`, where the creditor is its
//!   `creditor_reference` when given, else `name:` plus its normalised name
//!   (trimmed, inner whitespace collapsed to one space, lower-cased). Ingest
//!   refuses a reference beginning with `name:`, so the two never meet.
//! - key: `{operation}:{aggregate_id}:{first 16 hex of sha256(canonical JSON)}`,
//!   canonical JSON having sorted keys, no whitespace and raw UTF-8.

use serde_json::Value;
use sha2::{Digest, Sha256};

/// The only operation ingest enqueues today.
pub const UPDATE_CREDITOR_DEBT: &str = "update_creditor_debt";

/// Derives the aggregate id of one client's debt with one creditor.
pub fn aggregate_id(
    client_reference: &str,
    creditor_reference: Option<&str>,
    creditor_name: &str,
) -> String {
    match creditor_reference {
        Some(reference) => format!("{client_reference}/{reference}"),
        None => {
            let name = creditor_name
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            format!("{client_reference}/name:{}", name.to_lowercase())
        }
    }
}

/// Sorted keys, no insignificant whitespace, non-ASCII as raw UTF-8.
pub fn canonical_json(value: &Value) -> String {
    // Another crate turns on serde_json's `preserve_order`, so sort explicitly.
    let mut sorted = value.clone();
    sorted.sort_all_objects();
    serde_json::to_string(&sorted).expect("a Value always serialises")
}

/// The first 16 hex characters of the SHA-256 of the payload's canonical JSON.
pub fn content_hash(payload: &Value) -> String {
    let digest = Sha256::digest(canonical_json(payload).as_bytes());
    hex::encode(&digest[..8])
}

/// The idempotency key of an operation on an aggregate with a payload.
pub fn key(operation: &str, aggregate_id: &str, payload: &Value) -> String {
    format!("{operation}:{aggregate_id}:{}", content_hash(payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_independent_vector() {
        let sample: Value =
            serde_json::from_str(include_str!("../examples/webhook-email.json")).unwrap();
        let debt = &sample["creditor_debt"];
        assert_eq!(
            canonical_json(debt),
            r#"{"amount":"1234.56","client_reference":"MP-2026-0042","creditor_name":"Sparkasse KölnBonn","creditor_reference":"K-99812","currency":"EUR"}"#
        );
        assert_eq!(content_hash(debt), "92bb92c4cd9d0363");
    }

    #[test]
    fn key_ignores_key_order() {
        let a: Value = serde_json::from_str(r#"{"b":1,"a":"ö"}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{ "a" : "ö", "b" : 1 }"#).unwrap();
        assert_eq!(key("op", "x", &a), key("op", "x", &b));
    }

    #[test]
    fn aggregate_prefers_the_reference() {
        assert_eq!(aggregate_id("C1", Some("K-9"), "Bank"), "C1/K-9");
        assert_eq!(
            aggregate_id("C1", None, "  Sparkasse   KölnBonn "),
            "C1/name:sparkasse kölnbonn"
        );
    }
}
