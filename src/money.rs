//! Exact money amounts: decimal strings, never binary floats.

/// A non-negative amount with at most two fraction digits, kept as its string
/// and as integer minor units (cents).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Amount {
    pub text: String,
    pub minor: i64,
}

/// Integer digits allowed, so that minor units fit an i64 with room to spare.
const MAX_INTEGER_DIGITS: usize = 15;

impl Amount {
    /// Parses `"1234.56"`, `"0"`, `"7.5"`; rejects signs, exponents, spaces and
    /// more than two fraction digits. The error says what is wrong.
    pub fn parse(text: &str) -> Result<Amount, &'static str> {
        let (int, frac) = match text.split_once('.') {
            Some((i, f)) => (i, Some(f)),
            None => (text, None),
        };
        if int.is_empty() || !int.bytes().all(|b| b.is_ascii_digit()) {
            return Err("must be a non-negative decimal string such as \"1234.56\"");
        }
        if int.len() > MAX_INTEGER_DIGITS {
            return Err("must have at most 15 integer digits");
        }
        let frac = frac.unwrap_or("");
        if text.contains('.') && frac.is_empty() {
            return Err("must have digits after the decimal point");
        }
        if !frac.bytes().all(|b| b.is_ascii_digit()) {
            return Err("must be a non-negative decimal string such as \"1234.56\"");
        }
        if frac.len() > 2 {
            return Err("must have at most 2 fraction digits");
        }
        let int_value: i64 = int
            .parse()
            .map_err(|_| "must have at most 15 integer digits")?;
        let cents: i64 = match frac.len() {
            0 => 0,
            1 => frac.parse::<i64>().unwrap_or(0) * 10,
            _ => frac.parse().unwrap_or(0),
        };
        Ok(Amount {
            text: text.to_owned(),
            minor: int_value * 100 + cents,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::Amount;

    #[test]
    fn parses_exact_amounts() {
        assert_eq!(Amount::parse("1234.56").unwrap().minor, 123_456);
        assert_eq!(Amount::parse("0").unwrap().minor, 0);
        assert_eq!(Amount::parse("7.5").unwrap().minor, 750);
        assert_eq!(Amount::parse("0.01").unwrap().minor, 1);
        assert_eq!(
            Amount::parse("999999999999999.99").unwrap().minor,
            99_999_999_999_999_999
        );
    }

    #[test]
    fn rejects_everything_else() {
        for bad in [
            "",
            "-1",
            "+1",
            "1.234",
            "1.",
            ".5",
            "1e3",
            " 1",
            "1 ",
            "1,5",
            "NaN",
            "0x10",
            "1.2.3",
            "١٢",
            "9999999999999999",
        ] {
            assert!(Amount::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
