//! Scalar values whose text is one token: integers (within their type's bounds), numeric
//! text, money amounts, uuid and bytea in the hex and escape formats. The dispatch in `mod.rs`
//! handles the types that need no parsing (bool, floats, text, json).

use std::num::{IntErrorKind, ParseIntError};
use std::str::FromStr;

use super::Fault;

pub(super) fn parse_integer<T: FromStr<Err = ParseIntError>>(text: &str) -> Result<T, Fault> {
    text.parse::<T>().map_err(|error| match error.kind() {
        IntErrorKind::PosOverflow | IntErrorKind::NegOverflow => {
            Fault::OutOfRange("does not fit the type")
        }
        _ => Fault::Invalid("not an integer"),
    })
}

/// numeric prints as plain decimal digits (never an exponent) or as a special value.
pub(super) fn is_numeric_text(text: &str) -> bool {
    if matches!(text, "NaN" | "Infinity" | "-Infinity") {
        return true;
    }
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let unsigned = text.strip_prefix('-').unwrap_or(text);
    match unsigned.split_once('.') {
        Some((whole, fraction)) => all_digits(whole) && all_digits(fraction),
        None => all_digits(unsigned),
    }
}

/// A money amount as PostgreSQL prints it under `lc_monetary=C`, the setting of every capture
/// session: a dollar sign after an optional minus, the whole units in groups of three digits
/// separated by commas, a point and two fraction digits (`$1,234.56`, `-$0.05`). Returns the
/// decimal it stands for, as numeric prints it (`1234.56`, `-0.05`). Under another
/// `lc_monetary` the symbols, separators, sign and even the number of fraction digits differ
/// (see `cash_out` in PostgreSQL's `cash.c`): such text is refused, never guessed at.
pub(super) fn parse_money(text: &str) -> Result<String, Fault> {
    const NOT_MONEY: Fault =
        Fault::Invalid("not a decimal number (nor money as lc_monetary=C prints it)");
    let (sign, unsigned) = match text.strip_prefix('-') {
        Some(rest) => ("-", rest),
        None => ("", text),
    };
    let (whole, fraction) = unsigned
        .strip_prefix('$')
        .and_then(|amount| amount.split_once('.'))
        .ok_or(NOT_MONEY)?;
    let digits = |s: &str, count: std::ops::RangeInclusive<usize>| {
        count.contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit())
    };
    let mut groups = whole.split(',');
    let first = groups.next().unwrap_or_default();
    let well_formed = digits(first, 1..=3)
        && (whole == "0" || !first.starts_with('0'))
        && groups.all(|group| digits(group, 3..=3))
        && digits(fraction, 2..=2);
    if !well_formed {
        return Err(NOT_MONEY);
    }
    Ok(format!("{sign}{}.{fraction}", whole.replace(',', "")))
}

pub(super) fn is_uuid_text(text: &str) -> bool {
    text.len() == 36
        && text.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

/// bytea in the hex format (`\x0a0b`, the default since PostgreSQL 9.0) or the escape format
/// (printable bytes as themselves, `\\` for a backslash, `\ooo` in octal for the rest).
pub(super) fn parse_bytea(text: &str) -> Result<Vec<u8>, Fault> {
    if let Some(hex) = text.strip_prefix("\\x") {
        if hex.len() % 2 != 0 {
            return Err(Fault::Invalid("odd number of hex digits"));
        }
        return hex
            .as_bytes()
            .chunks_exact(2)
            .map(|pair| match pair {
                [high, low] => Ok(hex_digit(*high)? << 4 | hex_digit(*low)?),
                _ => Err(Fault::Invalid("odd number of hex digits")),
            })
            .collect();
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&byte) = bytes.get(i) {
        if byte != b'\\' {
            out.push(byte);
            i += 1;
        } else if bytes.get(i + 1) == Some(&b'\\') {
            out.push(b'\\');
            i += 2;
        } else if let Some(&[a @ b'0'..=b'3', b @ b'0'..=b'7', c @ b'0'..=b'7']) =
            bytes.get(i + 1..i + 4)
        {
            out.push((a - b'0') << 6 | (b - b'0') << 3 | (c - b'0'));
            i += 4;
        } else {
            return Err(Fault::Invalid(
                "a backslash must be followed by a backslash or three octal digits",
            ));
        }
    }
    Ok(out)
}

fn hex_digit(byte: u8) -> Result<u8, Fault> {
    match byte {
        b'0'..=b'9' => Ok(byte - b'0'),
        b'a'..=b'f' => Ok(byte - b'a' + 10),
        b'A'..=b'F' => Ok(byte - b'A' + 10),
        _ => Err(Fault::Invalid("not a hex digit")),
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use crate::event::{Value, ValueType};

    #[test]
    fn bool_is_t_or_f() {
        assert_eq!(parse(&ValueType::Bool, "t"), Value::Bool(true));
        assert_eq!(parse(&ValueType::Bool, "f"), Value::Bool(false));
        assert!(is_invalid(&ValueType::Bool, "true"));
        assert!(is_invalid(&ValueType::Bool, ""));
    }

    #[test]
    fn integers_keep_their_type_bounds() {
        assert_eq!(parse(&ValueType::Int2, "-32768"), Value::Int(-32768));
        assert_eq!(parse(&ValueType::Int2, "32767"), Value::Int(32767));
        assert!(is_out_of_range(&ValueType::Int2, "32768"));
        assert_eq!(
            parse(&ValueType::Int4, "-2147483648"),
            Value::Int(-2_147_483_648)
        );
        assert!(is_out_of_range(&ValueType::Int4, "2147483648"));
        assert_eq!(
            parse(&ValueType::Int8, "9223372036854775807"),
            Value::Int(i64::MAX)
        );
        assert_eq!(
            parse(&ValueType::Int8, "-9223372036854775808"),
            Value::Int(i64::MIN)
        );
        assert!(is_out_of_range(&ValueType::Int8, "9223372036854775808"));
        // oid is unsigned 32 bits.
        assert_eq!(
            parse(&ValueType::Int8, "4294967295"),
            Value::Int(4_294_967_295)
        );
        assert!(is_invalid(&ValueType::Int4, "1.5"));
        assert!(is_invalid(&ValueType::Int4, "abc"));
        assert!(is_invalid(&ValueType::Int4, ""));
    }

    #[test]
    fn floats_accept_exponents_and_special_values() {
        assert_eq!(parse(&ValueType::Float8, "0.1"), Value::Float(0.1));
        assert_eq!(parse(&ValueType::Float8, "1e+300"), Value::Float(1e300));
        assert_eq!(parse(&ValueType::Float4, "0.1"), Value::Float(0.1));
        assert_eq!(parse(&ValueType::Float4, "1e+30"), Value::Float(1e30));
        assert_eq!(parse(&ValueType::Float4, "-1.5"), Value::Float(-1.5));
        assert_eq!(
            parse(&ValueType::Float8, "Infinity"),
            Value::Float(f64::INFINITY)
        );
        assert_eq!(
            parse(&ValueType::Float4, "-Infinity"),
            Value::Float(f64::NEG_INFINITY)
        );
        assert!(matches!(parse(&ValueType::Float8, "NaN"), Value::Float(f) if f.is_nan()));
        // With extra_float_digits=3 the printed decimal converts back to the exact float4.
        for (printed, exact) in [
            ("3.4028235e+38", f32::MAX),
            ("1.1754944e-38", f32::MIN_POSITIVE),
            ("1e-45", f32::from_bits(1)),
            ("0.1", 0.1_f32),
        ] {
            match parse(&ValueType::Float4, printed) {
                Value::Float(f) => assert_eq!(f as f32, exact, "{printed}"),
                other => panic!("{other:?}"),
            }
        }
        assert!(is_invalid(&ValueType::Float8, "one"));
        assert!(is_invalid(&ValueType::Float8, ""));
    }

    #[test]
    fn numeric_text_is_kept_exactly() {
        for exact in [
            "123456789012345678901234567890",
            "123456789012345678901234567890.123",
            "-0.5",
            "0.00",
            "NaN",
            "Infinity",
            "-Infinity",
        ] {
            assert_eq!(
                parse(&ValueType::Numeric, exact),
                Value::Numeric(exact.to_owned())
            );
        }
        for bad in ["", "-", "1.", ".5", "1e5", "1,5", "nan", " 1"] {
            assert!(is_invalid(&ValueType::Numeric, bad), "{bad:?}");
        }
    }

    #[test]
    fn money_under_lc_monetary_c_is_its_decimal() {
        for (money, decimal) in [
            ("$0.00", "0.00"),
            ("$0.05", "0.05"),
            ("-$0.05", "-0.05"),
            ("$1,234.56", "1234.56"),
            ("-$1,234.56", "-1234.56"),
            ("$999.99", "999.99"),
            ("$1,000,000.00", "1000000.00"),
            ("-$92,233,720,368,547,758.08", "-92233720368547758.08"),
            ("$92,233,720,368,547,758.07", "92233720368547758.07"),
        ] {
            assert_eq!(
                parse(&ValueType::Numeric, money),
                Value::Numeric(decimal.to_owned()),
                "{money}"
            );
        }
    }

    #[test]
    fn money_in_another_format_is_refused_not_guessed() {
        for other in [
            "1.234,56 €",  // de_DE
            "￥1,234",     // ja_JP: no fraction digits
            "($1,234.56)", // a locale that puts negatives in parentheses
            "$1234.56",    // no thousands separator
            "$1,23.45",    // a group of two
            "$1,234.5",    // one fraction digit
            "$1,234",      // no fraction
            "$01.00",      // a leading zero
            "$0,123.00",
            "$,123.00",
            "$1,234.56 ",
            "-$",
            "$.50",
            "--$1.00",
            "$-1.00",
        ] {
            assert!(is_invalid(&ValueType::Numeric, other), "{other:?}");
        }
    }

    #[test]
    fn text_types_and_other_keep_their_text() {
        assert_eq!(parse(&ValueType::Text, ""), text(""));
        assert_eq!(parse(&ValueType::Text, "é \\ \"x\""), text("é \\ \"x\""));
        assert_eq!(parse(&ValueType::Other, "(1,2),(3,4)"), text("(1,2),(3,4)"));
        assert_eq!(parse(&ValueType::Other, "$1.00"), text("$1.00"));
    }

    #[test]
    fn bytea_hex_format() {
        assert_eq!(
            parse(&ValueType::Bytea, "\\x00410a5c7f80ff"),
            Value::Bytes(vec![0x00, 0x41, 0x0a, 0x5c, 0x7f, 0x80, 0xff])
        );
        assert_eq!(parse(&ValueType::Bytea, "\\x"), Value::Bytes(vec![]));
        assert_eq!(
            parse(&ValueType::Bytea, "\\xDEADbeef"),
            Value::Bytes(vec![0xde, 0xad, 0xbe, 0xef])
        );
        assert!(is_invalid(&ValueType::Bytea, "\\x0"));
        assert!(is_invalid(&ValueType::Bytea, "\\x0g"));
        assert!(is_invalid(&ValueType::Bytea, "\\xé0"));
    }

    #[test]
    fn bytea_escape_format() {
        // What PostgreSQL prints for '\x00410a5c7f80ff22' with bytea_output=escape.
        assert_eq!(
            parse(&ValueType::Bytea, "\\000A\\012\\\\\\177\\200\\377\""),
            Value::Bytes(vec![0x00, 0x41, 0x0a, 0x5c, 0x7f, 0x80, 0xff, 0x22])
        );
        assert_eq!(parse(&ValueType::Bytea, ""), Value::Bytes(vec![]));
        assert_eq!(
            parse(&ValueType::Bytea, "abc"),
            Value::Bytes(b"abc".to_vec())
        );
        for bad in ["\\", "a\\", "\\9", "\\400", "\\01", "\\0a1"] {
            assert!(is_invalid(&ValueType::Bytea, bad), "{bad:?}");
        }
    }

    #[test]
    fn uuid_and_json() {
        assert_eq!(
            parse(&ValueType::Uuid, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            Value::Uuid("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11".to_owned())
        );
        assert_eq!(
            parse(&ValueType::Uuid, "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11"),
            Value::Uuid("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11".to_owned())
        );
        for bad in [
            "a0eebc999c0b4ef8bb6d6bb9bd380a11",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1g",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1",
            "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}",
        ] {
            assert!(is_invalid(&ValueType::Uuid, bad), "{bad:?}");
        }
        let doc = r#"{"a": [1, "x"], "b": null}"#;
        assert_eq!(parse(&ValueType::Json, doc), Value::Json(doc.to_owned()));
        assert_eq!(parse(&ValueType::Jsonb, doc), Value::Json(doc.to_owned()));
    }
}
