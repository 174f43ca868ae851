//! Hostile bodies: mutations of the sample, and random JSON.

use super::*;

/// What a case's answer may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expect {
    /// Must be refused: 4xx, or (for broken framing) the connection closed.
    Invalid,
    /// May be accepted (2xx) or refused (4xx).
    MaybeValid,
}

/// One body, before headers and framing.
pub(crate) struct BodyCase {
    pub(crate) label: &'static str,
    pub(crate) bytes: Vec<u8>,
    pub(crate) expect: Expect,
}

/// Paths of the sample's string fields: (path, max chars, control characters allowed).
pub(crate) const STRING_FIELDS: &[(&str, usize, bool)] = &[
    ("webhook_id", 256, false),
    ("email.message_id", 998, false),
    ("email.from", 320, false),
    ("email.subject", 998, true),
    ("email.body", usize::MAX, true),
    ("email.received_at", 256, false),
    ("creditor_debt.client_reference", 256, false),
    ("creditor_debt.creditor_name", 256, false),
    ("creditor_debt.creditor_reference", 256, false),
    ("creditor_debt.amount", 20, false),
    ("creditor_debt.currency", 3, false),
];
pub(crate) const REQUIRED: &[&str] = &[
    "webhook_id",
    "ticket_id",
    "email",
    "email.from",
    "email.subject",
    "email.body",
    "creditor_debt",
    "creditor_debt.client_reference",
    "creditor_debt.creditor_name",
    "creditor_debt.amount",
    "creditor_debt.currency",
];
pub(crate) const OPTIONAL: &[&str] = &[
    "email.message_id",
    "email.received_at",
    "creditor_debt.creditor_reference",
];

pub(crate) fn base(n: u64) -> Value {
    let mut v: Value = serde_json::from_str(SAMPLE).unwrap();
    v["webhook_id"] = json!(format!("hostile-{n}"));
    // A unique amount per case, so that valid cases do not share an idempotency key.
    v["creditor_debt"]["amount"] = json!(format!("{}.{:02}", n / 100, n % 100));
    v
}

pub(crate) fn set(v: &mut Value, path: &str, new: Value) {
    let mut cur = v;
    let parts: Vec<&str> = path.split('.').collect();
    for p in &parts[..parts.len() - 1] {
        cur = &mut cur[*p];
    }
    cur[parts[parts.len() - 1]] = new;
}

pub(crate) fn remove(v: &mut Value, path: &str) {
    let mut cur = v;
    let parts: Vec<&str> = path.split('.').collect();
    for p in &parts[..parts.len() - 1] {
        cur = &mut cur[*p];
    }
    cur.as_object_mut().unwrap().remove(parts[parts.len() - 1]);
}

pub(crate) fn random_string(rng: &mut fastrand::Rng, len: usize) -> String {
    const POOL: &[char] = &[
        'a', 'Z', '0', ' ', 'ä', 'ö', 'ü', 'ß', '€', '😀', '中', '"', '\\', '/', '<', '{',
        '\u{200b}', '\u{feff}',
    ];
    (0..len).map(|_| POOL[rng.usize(..POOL.len())]).collect()
}

pub(crate) fn random_json(rng: &mut fastrand::Rng, depth: u32) -> Value {
    match rng.u32(..if depth > 3 { 5 } else { 7 }) {
        0 => Value::Null,
        1 => json!(rng.bool()),
        2 => json!(rng.i64(..)),
        3 => json!(rng.f64() * 1e6 - 5e5),
        4 => {
            let len = rng.usize(..40);
            json!(random_string(rng, len))
        }
        5 => Value::Array(
            (0..rng.usize(..4))
                .map(|_| random_json(rng, depth + 1))
                .collect(),
        ),
        _ => Value::Object(
            (0..rng.usize(..4))
                .map(|i| (format!("k{i}"), random_json(rng, depth + 1)))
                .collect(),
        ),
    }
}

/// A body: a mutation of the sample, or something else entirely.
pub(crate) fn gen_body(rng: &mut fastrand::Rng, n: u64) -> BodyCase {
    use Expect::*;
    let mut v = base(n);
    let to_bytes = |v: &Value| v.to_string().into_bytes();
    match rng.u32(..30) {
        0 => BodyCase {
            label: "valid",
            bytes: to_bytes(&v),
            expect: MaybeValid,
        },
        1 => {
            let field = REQUIRED[rng.usize(..REQUIRED.len())];
            remove(&mut v, field);
            BodyCase {
                label: "missing_required",
                bytes: to_bytes(&v),
                expect: Invalid,
            }
        }
        2 => {
            let field = OPTIONAL[rng.usize(..OPTIONAL.len())];
            if rng.bool() {
                remove(&mut v, field)
            } else {
                set(&mut v, field, Value::Null)
            }
            BodyCase {
                label: "missing_optional",
                bytes: to_bytes(&v),
                expect: MaybeValid,
            }
        }
        3 => {
            // A wrong type for a field (strings get non-strings, objects get scalars, ...).
            let fields: Vec<&str> = REQUIRED.iter().chain(OPTIONAL).copied().collect();
            let field = fields[rng.usize(..fields.len())];
            let wrong = match (field, rng.u32(..5)) {
                ("ticket_id", 0) => json!("81234"),
                ("ticket_id", 1) => json!(1.5),
                ("ticket_id", 2) => json!(true),
                ("ticket_id", _) => json!([81234]),
                ("email" | "creditor_debt", 0) => json!("text"),
                ("email" | "creditor_debt", 1) => json!([]),
                ("email" | "creditor_debt", _) => json!(7),
                (_, 0) => json!(12.5),
                (_, 1) => json!(true),
                (_, 2) => json!(["a"]),
                (_, 3) => json!({"a": "b"}),
                _ => json!(-1),
            };
            set(&mut v, field, wrong);
            BodyCase {
                label: "wrong_type",
                bytes: to_bytes(&v),
                expect: Invalid,
            }
        }
        4 => {
            // Over a field's length limit (subject/body: under and over the body limit).
            let (field, max, _) = STRING_FIELDS[rng.usize(..STRING_FIELDS.len())];
            if max == usize::MAX {
                let len = if rng.bool() {
                    rng.usize(1000..200_000)
                } else {
                    rng.usize(BODY_LIMIT..BODY_LIMIT + 100_000)
                };
                set(&mut v, field, json!("x".repeat(len)));
                let expect = if len + 600 < BODY_LIMIT {
                    MaybeValid
                } else {
                    Invalid
                };
                BodyCase {
                    label: "huge_string",
                    bytes: to_bytes(&v),
                    expect,
                }
            } else {
                set(
                    &mut v,
                    field,
                    json!("y".repeat(max + 1 + rng.usize(..50_000))),
                );
                BodyCase {
                    label: "huge_string",
                    bytes: to_bytes(&v),
                    expect: Invalid,
                }
            }
        }
        5 => {
            let (field, _, _) = STRING_FIELDS[rng.usize(..STRING_FIELDS.len())];
            set(&mut v, field, json!(format!("a\u{0}b{}", rng.u32(..))));
            BodyCase {
                label: "nul",
                bytes: to_bytes(&v),
                expect: Invalid,
            }
        }
        6 => {
            let (field, _, control_ok) = STRING_FIELDS[rng.usize(..STRING_FIELDS.len())];
            let c = ['\u{1}', '\n', '\t', '\r', '\u{7f}', '\u{1b}', '\u{85}'][rng.usize(..7)];
            set(&mut v, field, json!(format!("x{c}y")));
            BodyCase {
                label: "control_char",
                bytes: to_bytes(&v),
                expect: if control_ok { MaybeValid } else { Invalid },
            }
        }
        7 => {
            // A lone surrogate escape, which is not a Unicode scalar value.
            let (field, _, _) = STRING_FIELDS[rng.usize(..STRING_FIELDS.len())];
            set(&mut v, field, json!("@@SURROGATE@@"));
            let escape = ["\\ud800", "\\udfff", "\\ud800\\u0041", "\\udc00\\ud800"][rng.usize(..4)];
            let text = v
                .to_string()
                .replace("@@SURROGATE@@", &format!("a{escape}b"));
            BodyCase {
                label: "lone_surrogate",
                bytes: text.into_bytes(),
                expect: Invalid,
            }
        }
        8 | 9 => {
            let bad: &[Value] = &[
                json!(1234.56),
                json!(1234),
                json!(-1),
                json!(1e3),
                json!("-1"),
                json!("-0.01"),
                json!("1e3"),
                json!("1E3"),
                json!("1.234"),
                json!("1,23"),
                json!("1.234,56"),
                json!(" 1"),
                json!("1 "),
                json!("+1"),
                json!("0x10"),
                json!(""),
                json!("NaN"),
                json!("inf"),
                json!("Infinity"),
                json!("١٢٣"),
                json!("1."),
                json!(".5"),
                json!("1.2.3"),
                json!("9999999999999999"),
                json!("1_000"),
                json!("12\u{0}"),
                json!("€12"),
                json!("12.5€"),
                json!(true),
                json!(null),
                json!([1]),
                json!({"value": "1"}),
                json!("0.001"),
                json!("1.0000000000000000000001"),
            ];
            set(
                &mut v,
                "creditor_debt.amount",
                bad[rng.usize(..bad.len())].clone(),
            );
            BodyCase {
                label: "bad_amount",
                bytes: to_bytes(&v),
                expect: Invalid,
            }
        }
        10 => {
            let ok = [
                format!("{n}"),
                format!("0.{:02}", n % 100),
                format!("999999999999999.{:02}", n % 100),
                format!("{n}.5"),
            ];
            set(
                &mut v,
                "creditor_debt.amount",
                json!(ok[rng.usize(..ok.len())]),
            );
            BodyCase {
                label: "edge_amount",
                bytes: to_bytes(&v),
                expect: MaybeValid,
            }
        }
        11 => {
            let bad = [
                json!("eur"),
                json!("EURO"),
                json!("EU"),
                json!("€"),
                json!(978),
                json!("E R"),
                json!("ÄÖÜ"),
            ];
            set(
                &mut v,
                "creditor_debt.currency",
                bad[rng.usize(..bad.len())].clone(),
            );
            BodyCase {
                label: "bad_currency",
                bytes: to_bytes(&v),
                expect: Invalid,
            }
        }
        12 => {
            let bad = [
                json!(0),
                json!(-1),
                json!(1e20),
                json!(9223372036854775808u64),
                json!(-9223372036854775807i64),
                json!("x"),
            ];
            set(&mut v, "ticket_id", bad[rng.usize(..bad.len())].clone());
            BodyCase {
                label: "bad_ticket_id",
                bytes: to_bytes(&v),
                expect: Invalid,
            }
        }
        13 => {
            let (field, value) = [
                ("webhook_id", json!("")),
                ("webhook_id", json!("   ")),
                ("email.from", json!("no-at-sign")),
                ("email.from", json!("a@")),
                ("email.from", json!("@b")),
                ("email.from", json!("a b@c.example")),
                ("email.received_at", json!("yesterday")),
                ("email.received_at", json!("2026-13-01T00:00:00Z")),
                ("email.received_at", json!("2026-11-28 09:15:00")),
                ("creditor_debt.client_reference", json!("MP/2026")),
                ("creditor_debt.client_reference", json!("")),
                ("creditor_debt.creditor_name", json!(" ")),
            ][rng.usize(..12)]
            .clone();
            set(&mut v, field, value);
            BodyCase {
                label: "bad_value",
                bytes: to_bytes(&v),
                expect: Invalid,
            }
        }
        14 => {
            let key = [
                "x",
                "__proto__",
                "$where",
                "constructor",
                "webhook_id ",
                "Webhook_Id",
            ][rng.usize(..6)];
            v[key] = random_json(rng, 0);
            v["creditor_debt"]["$set"] = random_json(rng, 0);
            BodyCase {
                label: "unknown_fields",
                bytes: to_bytes(&v),
                expect: MaybeValid,
            }
        }
        15 => {
            // Duplicated keys: serde_json keeps the last one. A bad last value must fail.
            let text = v.to_string();
            let (dup, expect) = match rng.u32(..3) {
                0 => ("\"webhook_id\":5,", Invalid),
                1 => ("\"creditor_debt\":\"x\",", Invalid),
                _ => ("\"ticket_id\":\"first\",", MaybeValid),
            };
            let text = if expect == Invalid {
                // Append the bad duplicate last.
                format!(
                    "{},{}}}",
                    &text[..text.len() - 1],
                    dup.trim_end_matches(',')
                )
            } else {
                format!("{{{dup}{}", &text[1..])
            };
            BodyCase {
                label: "duplicate_keys",
                bytes: text.into_bytes(),
                expect,
            }
        }
        16 => {
            // Deep nesting: 10k levels, in an unknown field or as the whole body.
            let depth = [200, 1000, 10_000, 100_000][rng.usize(..4)];
            let (open, close) = if rng.bool() {
                ("[", "]")
            } else {
                ("{\"a\":", "}")
            };
            let nest = format!("{}1{}", open.repeat(depth), close.repeat(depth));
            let text = if rng.bool() {
                nest
            } else {
                format!("{{\"deep\":{nest},{}", &v.to_string()[1..])
            };
            BodyCase {
                label: "deep_nesting",
                bytes: text.into_bytes(),
                expect: Invalid,
            }
        }
        17 => {
            let size = rng.usize(2 * BODY_LIMIT..5 * BODY_LIMIT + 1);
            let mut bytes = format!("{{\"webhook_id\":\"big-{n}\",\"pad\":\"").into_bytes();
            bytes.resize(size, b'z');
            bytes.extend_from_slice(b"\"}");
            BodyCase {
                label: "body_5mb",
                bytes,
                expect: Invalid,
            }
        }
        18 => {
            let text: &[u8] = [
                &b""[..],
                b"null",
                b"[]",
                b"\"str\"",
                b"1",
                b"true",
                b"{}",
                b"{\"webhook_id\":\"x\"}",
                b"\xef\xbb\xbf{}",
            ][rng.usize(..9)];
            BodyCase {
                label: "not_an_event",
                bytes: text.to_vec(),
                expect: Invalid,
            }
        }
        19 => {
            let mut bytes = v.to_string().into_bytes();
            bytes.extend_from_slice([&b"x"[..], b"}", b",", b"{}", b"\0", b"\xff"][rng.usize(..6)]);
            BodyCase {
                label: "trailing_garbage",
                bytes,
                expect: Invalid,
            }
        }
        20 => {
            let mut bytes = v.to_string().into_bytes();
            bytes.extend_from_slice([&b" "[..], b"\n", b"\r\n\t "][rng.usize(..3)]);
            BodyCase {
                label: "trailing_whitespace",
                bytes,
                expect: MaybeValid,
            }
        }
        21 => {
            // Invalid UTF-8 inside a string value.
            let (field, _, _) = STRING_FIELDS[rng.usize(..STRING_FIELDS.len())];
            set(&mut v, field, json!("@@BYTES@@"));
            let bad: &[u8] = [
                &b"\xff"[..],
                b"\xc3",
                b"\xed\xa0\x80",
                b"\xc0\xaf",
                b"\xf8\x88\x80\x80\x80",
                b"\x80",
            ][rng.usize(..6)];
            let text = v.to_string();
            let at = text.find("@@BYTES@@").unwrap();
            let mut bytes = text.as_bytes()[..at].to_vec();
            bytes.extend_from_slice(b"ok");
            bytes.extend_from_slice(bad);
            bytes.extend_from_slice(&text.as_bytes()[at + 9..]);
            BodyCase {
                label: "invalid_utf8",
                bytes,
                expect: Invalid,
            }
        }
        22 => {
            let len = rng.usize(..4000);
            BodyCase {
                label: "random_bytes",
                bytes: (0..len).map(|_| rng.u8(..)).collect(),
                expect: Invalid,
            }
        }
        23 => {
            let mut value = random_json(rng, 0);
            if rng.bool() {
                value = json!({"webhook_id": random_json(rng, 2), "ticket_id": random_json(rng, 2), "email": random_json(rng, 1), "creditor_debt": random_json(rng, 1)});
            }
            BodyCase {
                label: "random_json",
                bytes: value.to_string().into_bytes(),
                expect: Invalid,
            }
        }
        24 => {
            // Truncated JSON.
            let text = v.to_string();
            let cut = rng.usize(..text.len());
            BodyCase {
                label: "truncated_json",
                bytes: text.as_bytes()[..cut].to_vec(),
                expect: Invalid,
            }
        }
        25 => {
            // Unicode in every text field, valid.
            set(&mut v, "email.subject", json!(random_string(rng, 60)));
            set(
                &mut v,
                "creditor_debt.creditor_name",
                json!(format!("Gläubiger {} 中文 😀", rng.u32(..))),
            );
            BodyCase {
                label: "unicode",
                bytes: to_bytes(&v),
                expect: MaybeValid,
            }
        }
        _ => {
            // Byte-level mutations of the sample; may or may not stay valid.
            let mut bytes = v.to_string().into_bytes();
            for _ in 0..rng.usize(1..6) {
                if bytes.is_empty() {
                    break;
                }
                let i = rng.usize(..bytes.len());
                match rng.u32(..5) {
                    0 => bytes[i] ^= 1 << rng.u32(..8),
                    1 => bytes.insert(i, rng.u8(..)),
                    2 => {
                        bytes.remove(i);
                    }
                    3 => bytes[i] = b"{}[]\",:\\0"[rng.usize(..9)],
                    _ => {
                        let j = rng.usize(i..bytes.len().min(i + 20) + 1).min(bytes.len());
                        let piece = bytes[i..j].to_vec();
                        bytes.splice(i..i, piece);
                    }
                }
            }
            BodyCase {
                label: "byte_mutation",
                bytes,
                expect: MaybeValid,
            }
        }
    }
}
