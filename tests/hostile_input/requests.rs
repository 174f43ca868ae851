//! Hostile requests: a body with headers, encodings and framing around it.

use super::*;

/// A complete hostile request.
pub(crate) struct Case {
    pub(crate) n: u64,
    pub(crate) label: String,
    pub(crate) bytes: Vec<u8>,
    pub(crate) half_close: bool,
    pub(crate) expect: Expect,
    /// Broken framing or headers: closing without an answer is acceptable.
    pub(crate) may_close: bool,
    /// An unsupported HTTP version: hyper's 505 is acceptable.
    pub(crate) may_505: bool,
}

pub(crate) fn stamp(offset_s: i64) -> String {
    (chrono::Utc::now() + chrono::Duration::seconds(offset_s))
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

pub(crate) fn gen_case(rng: &mut fastrand::Rng, n: u64) -> Case {
    let body = gen_body(rng, n);
    let mut expect = body.expect;
    let mut labels = vec![body.label.to_string()];
    let mut may_close = false;
    let mut may_505 = false;
    let mut headers: Vec<(Vec<u8>, Vec<u8>)> = vec![(b"Host".to_vec(), b"127.0.0.1".to_vec())];

    // Signature.
    let ts = stamp(0);
    let good = webhook::sign(SECRET.as_bytes(), &ts, &body.bytes);
    let sig_mode = rng.u32(..32);
    let (sig, tsv): (Option<Vec<u8>>, Option<Vec<u8>>) = match sig_mode {
        0 => (None, None),
        1 => (None, Some(ts.clone().into_bytes())),
        2 => (Some(good.clone().into_bytes()), None),
        3 => (
            Some(webhook::sign(b"wrong-secret", &ts, &body.bytes).into_bytes()),
            Some(ts.clone().into_bytes()),
        ),
        4 => {
            let old = stamp(-600);
            (
                Some(webhook::sign(SECRET.as_bytes(), &old, &body.bytes).into_bytes()),
                Some(old.into_bytes()),
            )
        }
        5 => {
            let future = stamp(600);
            (
                Some(webhook::sign(SECRET.as_bytes(), &future, &body.bytes).into_bytes()),
                Some(future.into_bytes()),
            )
        }
        6 => {
            let weird = [
                "yesterday",
                "1764320100",
                "",
                "2026-11-28T12:00:00",
                "9999-99-99T99:99:99Z",
            ][rng.usize(..5)];
            (
                Some(webhook::sign(SECRET.as_bytes(), weird, &body.bytes).into_bytes()),
                Some(weird.as_bytes().to_vec()),
            )
        }
        7 => {
            let garbage: &[u8] = [
                &b"!!!"[..],
                b"",
                b"AAAA",
                b"\xff\xfe",
                b"=====",
                b"sha256=abc",
            ][rng.usize(..6)];
            (Some(garbage.to_vec()), Some(ts.clone().into_bytes()))
        }
        _ => (Some(good.into_bytes()), Some(ts.into_bytes())),
    };
    if sig_mode < 8 {
        expect = Expect::Invalid;
        labels.push("bad_signature".into());
    }
    if let Some(s) = sig {
        headers.push((webhook::SIGNATURE_HEADER.as_bytes().to_vec(), s));
    }
    if let Some(t) = tsv {
        headers.push((webhook::TIMESTAMP_HEADER.as_bytes().to_vec(), t));
    }

    // Content type.
    let ct_mode = rng.u32(..32);
    let ct: Option<&[u8]> = match ct_mode {
        0 => None,
        1 => Some(b"text/plain"),
        2 => Some(b"application/x-www-form-urlencoded"),
        3 => Some(b"multipart/form-data; boundary=xyz"),
        4 => Some(b"application/jsonx"),
        5 => Some(b""),
        6 => Some(b"application/json, text/plain"),
        7 => Some(b"application/\xffjson"),
        8 => Some(b"application/json; charset=utf-8"),
        9 => Some(b"APPLICATION/JSON"),
        10 => Some(b" application/json "),
        11 => Some(b"application/json;charset=latin1;x=\"y\""),
        _ => Some(b"application/json"),
    };
    if ct_mode < 8 {
        expect = Expect::Invalid;
        labels.push("bad_content_type".into());
    }
    if let Some(ct) = ct {
        headers.push((b"Content-Type".to_vec(), ct.to_vec()));
    }

    // Extra headers.
    match rng.u32(..24) {
        0 => {
            headers.push((b"Content-Encoding".to_vec(), b"gzip".to_vec()));
            labels.push("content_encoding_gzip".into());
        }
        1 => {
            for i in 0..rng.usize(90..300) {
                headers.push((format!("X-Many-{i}").into_bytes(), b"v".to_vec()));
            }
            labels.push("many_headers".into());
            may_close = true;
        }
        2 => {
            headers.push((b"X-Huge".to_vec(), vec![b'h'; rng.usize(10_000..600_000)]));
            labels.push("huge_header".into());
            may_close = true;
        }
        3 => {
            headers.push((b"Bad Header".to_vec(), b"x".to_vec()));
            expect = Expect::Invalid;
            labels.push("bad_header_name".into());
            may_close = true;
        }
        4 => {
            headers.push((b"X-Folded".to_vec(), b"a\r\n  folded".to_vec()));
            expect = Expect::Invalid;
            labels.push("obs_fold".into());
            may_close = true;
        }
        5 => {
            headers.push((b"Expect".to_vec(), b"100-continue".to_vec()));
            labels.push("expect_continue".into());
        }
        6 => {
            headers.push((b"X-Binary".to_vec(), vec![0x80, 0xff, 0xfe, b'a']));
            labels.push("binary_header".into());
        }
        7 => {
            headers.push((b"X-Nul".to_vec(), b"a\0b".to_vec()));
            expect = Expect::Invalid;
            labels.push("nul_header".into());
            may_close = true;
        }
        8 => {
            // A second content type header: the first one counts.
            headers.push((b"Content-Type".to_vec(), b"text/plain".to_vec()));
            labels.push("second_content_type".into());
        }
        9 => {
            headers.push((b"Connection".to_vec(), b"keep-alive, Upgrade".to_vec()));
            headers.push((b"Upgrade".to_vec(), b"websocket".to_vec()));
            labels.push("upgrade".into());
        }
        _ => {}
    }
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case(b"Connection"))
    {
        headers.push((b"Connection".to_vec(), b"close".to_vec()));
    }

    // Request line.
    let (method, target, version) = match rng.u32(..80) {
        0 => ("GET", "/webhooks/email", "HTTP/1.1"),
        1 => ("PUT", "/webhooks/email", "HTTP/1.1"),
        2 => ("DELETE", "/webhooks/email", "HTTP/1.1"),
        3 => ("FOO", "/webhooks/email", "HTTP/1.1"),
        4 => ("POST", "/webhooks/email/", "HTTP/1.1"),
        5 => ("POST", "/webhooks/EMAIL", "HTTP/1.1"),
        6 => ("POST", "//webhooks/email", "HTTP/1.1"),
        7 => ("POST", "/%2e%2e/webhooks/email", "HTTP/1.1"),
        8 => ("POST", "*", "HTTP/1.1"),
        9 => ("POST", "/webhooks/email", "HTTP/2.0"),
        10 => ("POST", "/webhooks/email", "HTTP/9.9"),
        11 => ("POST", "/webhooks/email", "HTTP/1.0"),
        12 => ("POST", "/webhooks/email?x=1&y=%00", "HTTP/1.1"),
        13 => ("POST", "http://127.0.0.1/webhooks/email", "HTTP/1.1"),
        14 => ("POST", "/webhooks/email\0", "HTTP/1.1"),
        _ => ("POST", "/webhooks/email", "HTTP/1.1"),
    };
    let line_ok = method == "POST"
        && matches!(
            target,
            "/webhooks/email" | "/webhooks/email?x=1&y=%00" | "http://127.0.0.1/webhooks/email"
        )
        && matches!(version, "HTTP/1.1" | "HTTP/1.0");
    if !line_ok {
        expect = Expect::Invalid;
        labels.push(format!("request_line:{method} {target} {version}"));
    }
    if version == "HTTP/2.0" || version == "HTTP/9.9" {
        may_505 = true;
        may_close = true;
    }
    if target.contains('\0') {
        may_close = true;
    }

    // Framing.
    let mut half_close = false;
    let mut framing: Vec<u8> = Vec::new();
    let mut payload = body.bytes.clone();
    let chunked = |rng: &mut fastrand::Rng, data: &[u8], ext: bool| {
        let mut out = Vec::new();
        let mut i = 0;
        while i < data.len() {
            let len = rng.usize(1..=data.len() - i).min(rng.usize(1..70_000));
            if ext {
                out.extend_from_slice(format!("{len:x};name=value\r\n").as_bytes());
            } else {
                out.extend_from_slice(format!("{len:X}\r\n").as_bytes());
            }
            out.extend_from_slice(&data[i..i + len]);
            out.extend_from_slice(b"\r\n");
            i += len;
        }
        out
    };
    let framing_mode = if version == "HTTP/1.0" {
        20
    } else {
        rng.u32(..30)
    };
    match framing_mode {
        0..=2 => {
            framing.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
            let mut out = chunked(rng, &body.bytes, framing_mode == 1);
            out.extend_from_slice(if framing_mode == 2 {
                b"0\r\nX-Trailer: t\r\n\r\n"
            } else {
                b"0\r\n\r\n"
            });
            payload = out;
            labels.push("chunked".into());
        }
        3 => {
            framing.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
            payload = b"zz\r\nabc\r\n0\r\n\r\n".to_vec();
            expect = Expect::Invalid;
            may_close = true;
            labels.push("chunked_bad_size".into());
        }
        4 => {
            framing.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
            let mut out = chunked(rng, &body.bytes, false);
            out.truncate(rng.usize(..out.len().max(1)));
            payload = out;
            half_close = true;
            expect = Expect::Invalid;
            may_close = true;
            labels.push("chunked_truncated".into());
        }
        5 => {
            framing
                .extend_from_slice(format!("Content-Length: {}\r\n", body.bytes.len()).as_bytes());
            framing.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
            let mut out = chunked(rng, &body.bytes, false);
            out.extend_from_slice(b"0\r\n\r\n");
            payload = out;
            // RFC 9112 lets a server either refuse this or let chunked win; both are fine.
            may_close = true;
            labels.push("cl_and_te".into());
        }
        6 => {
            framing.extend_from_slice(
                format!(
                    "Content-Length: {}\r\nContent-Length: {}\r\n",
                    body.bytes.len(),
                    body.bytes.len() + 1
                )
                .as_bytes(),
            );
            expect = Expect::Invalid;
            may_close = true;
            labels.push("cl_conflict".into());
        }
        7 => {
            let bad =
                ["abc", "-1", "99999999999999999999", "1e3", "0x10", "+5", ""][rng.usize(..7)];
            framing.extend_from_slice(format!("Content-Length: {bad}\r\n").as_bytes());
            expect = Expect::Invalid;
            may_close = true;
            labels.push("cl_garbage".into());
        }
        8 => {
            // Declares more than is sent, then closes: a truncated body.
            framing.extend_from_slice(
                format!(
                    "Content-Length: {}\r\n",
                    body.bytes.len() + rng.usize(1..1000)
                )
                .as_bytes(),
            );
            half_close = true;
            expect = Expect::Invalid;
            may_close = true;
            labels.push("cl_long_truncated".into());
        }
        9 if !body.bytes.is_empty() => {
            // Declares less than is sent: the server reads a prefix of the body.
            let short = rng.usize(..body.bytes.len());
            framing.extend_from_slice(format!("Content-Length: {short}\r\n").as_bytes());
            expect = Expect::Invalid;
            labels.push("cl_short".into());
        }
        10 => {
            framing.extend_from_slice(b"Transfer-Encoding: gzip, chunked\r\n");
            let mut out = chunked(rng, &body.bytes, false);
            out.extend_from_slice(b"0\r\n\r\n");
            payload = out;
            may_close = true;
            labels.push("te_gzip_chunked".into());
        }
        11 => {
            // gzip garbage declared as such.
            let mut garbage = vec![0x1f, 0x8b, 0x08, 0x00];
            garbage.extend((0..rng.usize(..500)).map(|_| rng.u8(..)));
            let ts = stamp(0);
            let sig = webhook::sign(SECRET.as_bytes(), &ts, &garbage);
            headers.retain(|(k, _)| {
                !k.eq_ignore_ascii_case(webhook::SIGNATURE_HEADER.as_bytes())
                    && !k.eq_ignore_ascii_case(webhook::TIMESTAMP_HEADER.as_bytes())
            });
            headers.push((
                webhook::SIGNATURE_HEADER.as_bytes().to_vec(),
                sig.into_bytes(),
            ));
            headers.push((
                webhook::TIMESTAMP_HEADER.as_bytes().to_vec(),
                ts.into_bytes(),
            ));
            headers.push((b"Content-Encoding".to_vec(), b"gzip".to_vec()));
            framing.extend_from_slice(format!("Content-Length: {}\r\n", garbage.len()).as_bytes());
            payload = garbage;
            expect = Expect::Invalid;
            labels.push("gzip_garbage".into());
        }
        12 if body.bytes.is_empty() => {
            // No framing at all for an empty body.
            labels.push("no_length".into());
        }
        _ => {
            if version == "HTTP/1.0" && rng.bool() {
                // HTTP/1.0 without a length: the body is whatever comes before the close.
                half_close = true;
                may_close = true;
                labels.push("http10_close_delimited".into());
                // hyper reads no body for a request without a length.
                expect = Expect::Invalid;
            } else {
                framing.extend_from_slice(
                    format!("Content-Length: {}\r\n", body.bytes.len()).as_bytes(),
                );
            }
        }
    }

    let mut bytes = format!("{method} {target} {version}\r\n").into_bytes();
    for (k, v) in &headers {
        bytes.extend_from_slice(k);
        bytes.extend_from_slice(b": ");
        bytes.extend_from_slice(v);
        bytes.extend_from_slice(b"\r\n");
    }
    bytes.extend_from_slice(&framing);
    bytes.extend_from_slice(b"\r\n");
    bytes.extend_from_slice(&payload);
    // An answer sent before the whole body was read may be lost to a TCP reset.
    if body.bytes.len() > BODY_LIMIT || half_close {
        may_close = true;
    }
    Case {
        n,
        label: labels.join("+"),
        bytes,
        half_close,
        expect,
        may_close,
        may_505,
    }
}
