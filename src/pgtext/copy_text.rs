//! Encoding of `Value`s as fields of `COPY … FROM STDIN` in text format, for loading the
//! PostgreSQL sink's staging tables. It owns one invariant: what it writes for a value is
//! text that the column type's input function reads back as exactly that value, whatever the
//! loading session's `DateStyle`, `IntervalStyle`, `TimeZone` and `extra_float_digits` — so
//! the target holds what the source held. Where PostgreSQL has a canonical output, the text is
//! that output (as [`crate::pgtext::parse_text`] parses it), so the encoder is tested against
//! that parser; then COPY's own escapes are applied ("COPY", section "Text Format", in the
//! PostgreSQL manual). The bytes are UTF-8: the loading session's `client_encoding` must be
//! `UTF8`.

use std::fmt;

use super::is_array_space;
use crate::event::{Value, ValueType};

const MICROS_PER_SECOND: i64 = 1_000_000;
const MICROS_PER_MINUTE: i64 = 60 * MICROS_PER_SECOND;
const MICROS_PER_HOUR: i64 = 60 * MICROS_PER_MINUTE;
const MICROS_PER_DAY: i64 = 24 * MICROS_PER_HOUR;

/// Appends `value` to `out` as one field of COPY's text format, in a form PostgreSQL's input
/// function for `value_type` accepts, so that the target holds exactly the source's value.
///
/// NULL is `\N`. `Value::UnchangedToast` is not a value: the caller must leave such columns out
/// of what it loads (or take them from the target); it is written as `\N` here only so that a
/// mistake cannot produce a bogus field. A value whose variant does not match `value_type`
/// (capture keeps a value it could not read as `Value::Text`) is written as its own variant's
/// text, so PostgreSQL reads it as it would have read the source's text. Values no PostgreSQL
/// type holds (a `Value::Time` beyond 24:00:00, a timetz offset beyond ±15:59:59, a date past
/// 5874897 AD …) are written as text PostgreSQL rejects, never as a different value.
///
/// The text depends on the value alone: each variant has one text that every type it is
/// captured from reads exactly (float4 included, see `write_float`; an array's elements carry
/// their own variants). `value_type` is the column's type, taken so that callers state it.
pub fn write_field(out: &mut Vec<u8>, _value_type: &ValueType, value: &Value) {
    match value {
        Value::Null | Value::UnchangedToast => out.extend_from_slice(b"\\N"),
        // `CopyEscaped` never fails, so neither does writing through it.
        _ => {
            let _ = write_text(&mut CopyEscaped(out), value);
        }
    }
}

/// Appends one row (fields separated by '\t', ending with '\n').
pub fn write_row<'a>(
    out: &mut Vec<u8>,
    fields: impl IntoIterator<Item = (&'a ValueType, &'a Value)>,
) {
    for (index, (value_type, value)) in fields.into_iter().enumerate() {
        if index > 0 {
            out.push(b'\t');
        }
        write_field(out, value_type, value);
    }
    out.push(b'\n');
}

/// The text of a non-null value as PostgreSQL writes it, without COPY's escapes: for targets
/// that keep a type they lack as its text.
pub fn value_text(value: &Value) -> String {
    let mut text = String::new();
    // Writing into a String never fails.
    let _ = write_text(&mut text, value);
    text
}

/// Appends text to a COPY buffer with the text format's escapes applied: a backslash, newline,
/// carriage return or tab in the data would otherwise end or change the field.
struct CopyEscaped<'a>(&'a mut Vec<u8>);

impl fmt::Write for CopyEscaped<'_> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        let mut rest = text.as_bytes();
        while let Some(at) = rest
            .iter()
            .position(|b| matches!(b, b'\\' | b'\n' | b'\r' | b'\t'))
        {
            let (plain, special) = rest.split_at(at);
            self.0.extend_from_slice(plain);
            let (byte, tail) = match special.split_first() {
                Some((byte, tail)) => (*byte, tail),
                None => break,
            };
            self.0.extend_from_slice(match byte {
                b'\\' => b"\\\\",
                b'\n' => b"\\n",
                b'\r' => b"\\r",
                _ => b"\\t",
            });
            rest = tail;
        }
        self.0.extend_from_slice(rest);
        Ok(())
    }
}

/// The text of a non-null value, before COPY escaping. Nulls inside arrays are `NULL`; a
/// top-level null never gets here.
fn write_text<W: fmt::Write>(w: &mut W, value: &Value) -> fmt::Result {
    match value {
        Value::Null | Value::UnchangedToast => w.write_str("NULL"),
        Value::Bool(true) => w.write_char('t'),
        Value::Bool(false) => w.write_char('f'),
        Value::Int(int) => write!(w, "{int}"),
        Value::Float(float) => write_float(w, *float),
        Value::Numeric(text) | Value::Text(text) | Value::Uuid(text) | Value::Json(text) => {
            w.write_str(text)
        }
        Value::Bytes(bytes) => write_bytea(w, bytes),
        Value::Date(days) => write_date(w, *days),
        Value::Time(micros) => write_time(w, *micros),
        Value::TimeTz {
            micros,
            offset_secs,
        } => {
            write_time(w, *micros)?;
            write_utc_offset(w, *offset_secs)
        }
        Value::Timestamp(micros) => write_timestamp(w, *micros, ""),
        Value::TimestampTz(micros) => write_timestamp(w, *micros, "+00"),
        Value::Interval {
            months,
            days,
            micros,
        } => write_interval(w, *months, *days, *micros),
        Value::Array(items) => write_array(w, items, &mut String::new()),
    }
}

/// `NaN`, `Infinity`, `-Infinity` as PostgreSQL spells them, or the shortest decimal that
/// reads back as the same `f64` (Rust's `{}` and `{:e}` both write it; exponent form keeps very
/// large and very small numbers short).
///
/// That decimal is also exact for float4, which capture reads as the decimal PostgreSQL prints
/// (types.rs): that decimal lies strictly inside its float4's rounding interval (float4out
/// never prints a decimal on the boundary), the interval's ends are themselves `f64`s, so the
/// `f64` read from it and every decimal that reads back as that `f64` lie strictly inside too,
/// and float4in (strtof) reads any of them as the source's float4, with no tie to break. It is
/// in fact the very decimal PostgreSQL printed. Going through `f32` instead would not be exact:
/// the `f64` of `7.038531e-26` is a float4 rounding boundary, and `as f32` rounds it to the
/// neighbour of the float4 PostgreSQL printed.
fn write_float<W: fmt::Write>(w: &mut W, float: f64) -> fmt::Result {
    if float.is_nan() {
        return w.write_str("NaN");
    }
    if float.is_infinite() {
        return w.write_str(if float > 0.0 { "Infinity" } else { "-Infinity" });
    }
    let magnitude = float.abs();
    if magnitude == 0.0 || (1e-4..1e15).contains(&magnitude) {
        write!(w, "{float}")
    } else {
        write!(w, "{float:e}")
    }
}

/// bytea's hex format, `\x` and two lowercase digits per byte.
fn write_bytea<W: fmt::Write>(w: &mut W, bytes: &[u8]) -> fmt::Result {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    w.write_str("\\x")?;
    let mut hex = [0_u8; 128];
    for chunk in bytes.chunks(hex.len() / 2) {
        for (byte, pair) in chunk.iter().zip(hex.chunks_exact_mut(2)) {
            pair.copy_from_slice(&[
                DIGITS[usize::from(byte >> 4)],
                DIGITS[usize::from(byte & 0x0f)],
            ]);
        }
        let digits = hex.get(..chunk.len() * 2).ok_or(fmt::Error)?;
        w.write_str(std::str::from_utf8(digits).map_err(|_| fmt::Error)?)?;
    }
    Ok(())
}

/// `YYYY-MM-DD[ BC]`, or `infinity`/`-infinity` for `i32::MAX`/`MIN`. The year is padded to
/// four digits, so every `DateStyle` reads the fields as year, month, day.
fn write_date<W: fmt::Write>(w: &mut W, days: i32) -> fmt::Result {
    match days {
        i32::MAX => w.write_str("infinity"),
        i32::MIN => w.write_str("-infinity"),
        _ => {
            let era = write_calendar_date(w, days.into())?;
            w.write_str(era)
        }
    }
}

/// `YYYY-MM-DD` of a day counted from 1970-01-01 in the proleptic Gregorian calendar; returns
/// the era suffix (` BC` or nothing), which PostgreSQL reads at the very end of the value.
/// Astronomical year 0 is 1 BC, year -1 is 2 BC: PostgreSQL has no year 0.
fn write_calendar_date<W: fmt::Write>(w: &mut W, days: i64) -> Result<&'static str, fmt::Error> {
    let (year, month, day) = civil_from_days(days);
    let (year, era) = if year <= 0 {
        (1 - year, " BC")
    } else {
        (year, "")
    };
    write!(w, "{year:04}-{month:02}-{day:02}")?;
    Ok(era)
}

/// Astronomical year, month and day of a day counted from 1970-01-01 (Howard Hinnant's
/// `civil_from_days`); exact for any `days` an `i64` of microseconds can reach.
pub(crate) fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let shifted = days + 719_468;
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// `HH:MM:SS[.ffffff]`; `24:00:00` is a valid time. Outside 0 to 24 hours (a MySQL TIME
/// span) the hours are written as they are (with a leading `-` when negative), which
/// PostgreSQL rejects and `parse_text` reads back as the same span.
fn write_time<W: fmt::Write>(w: &mut W, micros: i64) -> fmt::Result {
    if micros < 0 {
        w.write_char('-')?;
    }
    write_clock(w, micros.unsigned_abs())
}

/// `+HH`, `+HH:MM` or `+HH:MM:SS` (`-` west of UTC), as PostgreSQL prints a UTC offset:
/// minutes only when not whole hours, seconds only when not whole minutes. timetz's input
/// reads it back as exactly this zone, whatever the session's `TimeZone`. An offset beyond
/// PostgreSQL's ±15:59:59 is written as it is, which PostgreSQL rejects.
fn write_utc_offset<W: fmt::Write>(w: &mut W, offset_secs: i32) -> fmt::Result {
    w.write_char(if offset_secs < 0 { '-' } else { '+' })?;
    let abs = offset_secs.unsigned_abs();
    let (hours, minutes, seconds) = (abs / 3600, abs / 60 % 60, abs % 60);
    write!(w, "{hours:02}")?;
    if minutes != 0 || seconds != 0 {
        write!(w, ":{minutes:02}")?;
    }
    if seconds != 0 {
        write!(w, ":{seconds:02}")?;
    }
    Ok(())
}

/// `HH:MM:SS[.ffffff]` of a non-negative duration, the fraction without trailing zeros as
/// PostgreSQL prints it.
fn write_clock<W: fmt::Write>(w: &mut W, micros: u64) -> fmt::Result {
    let seconds = micros / 1_000_000;
    write!(
        w,
        "{:02}:{:02}:{:02}",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60
    )?;
    write_fraction(w, micros % 1_000_000)
}

/// `.ffffff` of a fraction of a second in microseconds, without trailing zeros; nothing for
/// zero.
fn write_fraction<W: fmt::Write>(w: &mut W, mut micros: u64) -> fmt::Result {
    if micros == 0 {
        return Ok(());
    }
    let mut width = 6;
    while micros.is_multiple_of(10) {
        micros /= 10;
        width -= 1;
    }
    write!(w, ".{micros:0width$}")
}

/// `YYYY-MM-DD HH:MM:SS[.ffffff]<zone>[ BC]`, or `infinity`/`-infinity` for `i64::MAX`/`MIN`.
/// `zone` is `+00` for timestamptz: an explicit offset makes the session's `TimeZone`
/// irrelevant (and timestamp, which would ignore it, gets none).
fn write_timestamp<W: fmt::Write>(w: &mut W, micros: i64, zone: &str) -> fmt::Result {
    match micros {
        i64::MAX => return w.write_str("infinity"),
        i64::MIN => return w.write_str("-infinity"),
        _ => {}
    }
    let era = write_calendar_date(w, micros.div_euclid(MICROS_PER_DAY))?;
    w.write_char(' ')?;
    write_clock(w, micros.rem_euclid(MICROS_PER_DAY).unsigned_abs())?;
    w.write_str(zone)?;
    w.write_str(era)
}

/// ISO 8601 "format with designators", as PostgreSQL prints it under `IntervalStyle=iso_8601`
/// (`P1Y2M3DT4H5M6.5S`, `P-1Y-2M3DT-4H`, `PT0S`). Every part carries its own sign and the
/// input function reads this format the same under every `IntervalStyle` (unlike
/// `-1 2:03:04`, whose sign `sql_standard` spreads over all fields). Seconds stay below 60 and
/// hours are whole, so PostgreSQL's conversion of each part through a double is exact. PostgreSQL
/// 17's infinite intervals, every field at its maximum or minimum, are `infinity` and
/// `-infinity` (which servers before 17 reject: they have no infinite interval).
fn write_interval<W: fmt::Write>(w: &mut W, months: i32, days: i32, micros: i64) -> fmt::Result {
    match (months, days, micros) {
        (i32::MAX, i32::MAX, i64::MAX) => return w.write_str("infinity"),
        (i32::MIN, i32::MIN, i64::MIN) => return w.write_str("-infinity"),
        (0, 0, 0) => return w.write_str("PT0S"),
        _ => {}
    }
    w.write_char('P')?;
    // Truncating division, as PostgreSQL's: the year and month parts share the sign of
    // `months`, as hours, minutes and seconds share the sign of `micros`.
    for (part, designator) in [(months / 12, 'Y'), (months % 12, 'M'), (days, 'D')] {
        if part != 0 {
            write!(w, "{part}{designator}")?;
        }
    }
    if micros == 0 {
        return Ok(());
    }
    w.write_char('T')?;
    let hours = micros / MICROS_PER_HOUR;
    let minutes = micros % MICROS_PER_HOUR / MICROS_PER_MINUTE;
    let second_micros = micros % MICROS_PER_MINUTE;
    for (part, designator) in [(hours, 'H'), (minutes, 'M')] {
        if part != 0 {
            write!(w, "{part}{designator}")?;
        }
    }
    if second_micros != 0 {
        if second_micros < 0 {
            w.write_char('-')?;
        }
        let second_micros = second_micros.unsigned_abs();
        write!(w, "{}", second_micros / 1_000_000)?;
        write_fraction(w, second_micros % 1_000_000)?;
        w.write_char('S')?;
    }
    Ok(())
}

/// An array literal as `array_out` writes it ("Array Value Input" in the manual): `{…}` per
/// dimension, `,` between items, an unquoted `NULL` for a null element, and each element's
/// text double-quoted when `array_in` would otherwise misread it. `scratch` holds one
/// element's text at a time, reused across the whole literal.
fn write_array<W: fmt::Write>(w: &mut W, items: &[Value], scratch: &mut String) -> fmt::Result {
    w.write_char('{')?;
    for (index, item) in items.iter().enumerate() {
        if index > 0 {
            w.write_char(',')?;
        }
        match item {
            Value::Null | Value::UnchangedToast => w.write_str("NULL")?,
            Value::Array(inner) => write_array(w, inner, scratch)?,
            _ => {
                scratch.clear();
                write_text(scratch, item)?;
                write_array_element(w, scratch)?;
            }
        }
    }
    w.write_char('}')
}

/// One element, quoted when it is empty, reads as `NULL` in any case, or contains a
/// character `array_in` treats specially (`{ } , " \` or white space); inside quotes `"` and
/// `\` are backslash-escaped.
pub(crate) fn write_array_element<W: fmt::Write>(w: &mut W, text: &str) -> fmt::Result {
    let needs_quotes = text.is_empty()
        || text.eq_ignore_ascii_case("NULL")
        || text
            .bytes()
            .any(|b| matches!(b, b'{' | b'}' | b',' | b'"' | b'\\') || is_array_space(b));
    if !needs_quotes {
        return w.write_str(text);
    }
    w.write_char('"')?;
    let mut rest = text;
    while let Some(at) = rest.find(['"', '\\']) {
        // `at` is the position of an ASCII character, so both splits are on boundaries.
        let (plain, special) = rest.split_at(at);
        let (special, tail) = special.split_at(1);
        w.write_str(plain)?;
        w.write_char('\\')?;
        w.write_str(special)?;
        rest = tail;
    }
    w.write_str(rest)?;
    w.write_char('"')
}

#[cfg(test)]
mod tests {
    use super::*;

    use proptest::prelude::*;

    use crate::pgtext::parse_text;

    /// 4714-11-24 00:00:00 BC, PostgreSQL's earliest timestamp (Julian day 0).
    const PG_MIN_TIMESTAMP: i64 = -210_866_803_200_000_000;
    /// PostgreSQL's earliest and latest dates as days since 1970.
    const PG_MIN_DATE: i32 = -2_440_588;
    const PG_MAX_DATE: i32 = 2_145_042_905;
    /// MySQL's longest TIME, 838:59:59, in microseconds (its shortest is the negation).
    const MYSQL_TIME_MAX: i64 = 3_020_399_000_000;

    fn field(value_type: &ValueType, value: &Value) -> String {
        let mut out = Vec::new();
        write_field(&mut out, value_type, value);
        match String::from_utf8(out) {
            Ok(text) => text,
            Err(error) => panic!("{value:?} wrote invalid UTF-8: {error}"),
        }
    }

    /// The inverse of COPY's text-format escaping for the escapes `write_field` uses (plus
    /// the ones it never needs), `None` for `\N`. Panics on a raw tab, newline or carriage
    /// return, which would split the field or the row.
    fn unescape_copy(field: &str) -> Option<String> {
        if field == "\\N" {
            return None;
        }
        assert!(
            !field.contains(['\t', '\n', '\r']),
            "unescaped delimiter in {field:?}"
        );
        let mut out = String::new();
        let mut chars = field.chars();
        while let Some(c) = chars.next() {
            if c != '\\' {
                out.push(c);
                continue;
            }
            match chars.next() {
                Some('\\') => out.push('\\'),
                Some('n') => out.push('\n'),
                Some('r') => out.push('\r'),
                Some('t') => out.push('\t'),
                other => panic!("unexpected escape {other:?} in {field:?}"),
            }
        }
        Some(out)
    }

    /// What PostgreSQL would hold after loading `value`, read back through the capture's
    /// parser; compared by `Debug` so that NaN equals NaN and -0.0 differs from 0.0.
    fn round_trip(value_type: &ValueType, value: &Value) -> Result<(), String> {
        let written = field(value_type, value);
        let Some(text) = unescape_copy(&written) else {
            return Err(format!("{value:?} written as NULL"));
        };
        let parsed = parse_text(value_type, &text).map_err(|e| format!("{written:?}: {e}"))?;
        if format!("{parsed:?}") == format!("{value:?}") {
            Ok(())
        } else {
            Err(format!("{value:?} written as {written:?} reads {parsed:?}"))
        }
    }

    fn array(element: ValueType) -> ValueType {
        ValueType::Array(Box::new(element))
    }

    fn text(s: &str) -> Value {
        Value::Text(s.to_owned())
    }

    fn interval(months: i32, days: i32, micros: i64) -> Value {
        Value::Interval {
            months,
            days,
            micros,
        }
    }

    #[test]
    fn null_and_unchanged_toast_are_copy_null() {
        assert_eq!(field(&ValueType::Int4, &Value::Null), "\\N");
        assert_eq!(field(&ValueType::Text, &Value::UnchangedToast), "\\N");
    }

    #[test]
    fn text_escapes_copy_delimiters_and_backslash() {
        assert_eq!(
            field(&ValueType::Text, &text("a\tb\nc\rd\\e")),
            "a\\tb\\nc\\rd\\\\e"
        );
        assert_eq!(field(&ValueType::Text, &text("")), "");
        assert_eq!(field(&ValueType::Text, &text("\\N")), "\\\\N");
        assert_eq!(field(&ValueType::Text, &text("\\.")), "\\\\.");
        assert_eq!(field(&ValueType::Text, &text("é€ \"x\" 😀")), "é€ \"x\" 😀");
        assert_eq!(
            field(&ValueType::Json, &Value::Json("{\"a\":\"\\n\"}".to_owned())),
            "{\"a\":\"\\\\n\"}"
        );
    }

    #[test]
    fn bool_int_numeric_uuid_as_postgres_prints_them() {
        assert_eq!(field(&ValueType::Bool, &Value::Bool(true)), "t");
        assert_eq!(field(&ValueType::Bool, &Value::Bool(false)), "f");
        assert_eq!(
            field(&ValueType::Int8, &Value::Int(i64::MIN)),
            "-9223372036854775808"
        );
        assert_eq!(field(&ValueType::Int2, &Value::Int(42)), "42");
        for numeric in [
            "-0.50",
            "123456789012345678901234567890.000",
            "NaN",
            "-Infinity",
        ] {
            assert_eq!(
                field(&ValueType::Numeric, &Value::Numeric(numeric.to_owned())),
                numeric
            );
        }
        let uuid = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11";
        assert_eq!(field(&ValueType::Uuid, &Value::Uuid(uuid.to_owned())), uuid);
    }

    #[test]
    fn timetz_is_its_local_time_with_its_offset_as_postgres_prints_them() {
        let timetz = |micros, offset_secs| {
            field(
                &ValueType::TimeTz,
                &Value::TimeTz {
                    micros,
                    offset_secs,
                },
            )
        };
        assert_eq!(timetz(11 * MICROS_PER_HOUR + 500_000, 0), "11:00:00.5+00");
        assert_eq!(
            timetz(MICROS_PER_DAY - 1, -(14 * 3600 + 59 * 60)),
            "23:59:59.999999-14:59"
        );
        assert_eq!(timetz(12 * MICROS_PER_HOUR, 19_800), "12:00:00+05:30");
        assert_eq!(timetz(0, 3600), "00:00:00+01");
        assert_eq!(timetz(0, -1), "00:00:00-00:00:01");
        assert_eq!(timetz(0, 19_815), "00:00:00+05:30:15");
        assert_eq!(timetz(0, 3605), "00:00:00+01:00:05");
        assert_eq!(
            timetz(MICROS_PER_DAY, -(15 * 3600 + 59 * 60 + 59)),
            "24:00:00-15:59:59"
        );
        // Not a timetz PostgreSQL holds: written so that it is rejected.
        assert_eq!(timetz(0, 16 * 3600), "00:00:00+16");
        assert_eq!(timetz(0, i32::MIN), "00:00:00-596523:14:08");
        assert_eq!(timetz(-1, 0), "-00:00:00.000001+00");
        // Array elements are written the same way, needing no quotes.
        assert_eq!(
            field(
                &array(ValueType::TimeTz),
                &Value::Array(vec![Value::TimeTz {
                    micros: 0,
                    offset_secs: -3600
                }])
            ),
            "{00:00:00-01}"
        );
    }

    #[test]
    fn floats_are_shortest_round_trip_with_postgres_special_values() {
        let float8 = |f: f64| field(&ValueType::Float8, &Value::Float(f));
        assert_eq!(float8(0.1), "0.1");
        assert_eq!(float8(-1.5), "-1.5");
        assert_eq!(float8(0.0), "0");
        assert_eq!(float8(-0.0), "-0");
        assert_eq!(float8(123_456_789.125), "123456789.125");
        assert_eq!(float8(1e300), "1e300");
        assert_eq!(float8(1.5e-7), "1.5e-7");
        assert_eq!(float8(f64::MAX), "1.7976931348623157e308");
        assert_eq!(float8(f64::from_bits(1)), "5e-324");
        assert_eq!(float8(f64::NAN), "NaN");
        assert_eq!(float8(f64::INFINITY), "Infinity");
        assert_eq!(float8(f64::NEG_INFINITY), "-Infinity");
    }

    #[test]
    fn float4_is_written_as_the_float4_the_source_printed() {
        let float4 = |f: f64| field(&ValueType::Float4, &Value::Float(f));
        // As types.rs reads PostgreSQL's float4 output: the printed decimal as an f64.
        assert_eq!(float4(0.1), "0.1");
        assert_eq!(float4(3.4028235e38), "3.4028235e38");
        assert_eq!(float4(1e-45), "1e-45");
        assert_eq!(float4(1.1754944e-38), "1.1754944e-38");
        assert_eq!(float4(16_777_216.0), "16777216");
        assert_eq!(float4(f64::NEG_INFINITY), "-Infinity");
        // PostgreSQL 15 prints float4 0x15ae43fd as 7.038531e-26, whose f64 is a float4
        // rounding boundary: the decimal reads back as that float4, the f64 `as f32` does not.
        let source = f32::from_bits(0x15ae_43fd);
        assert_eq!(float4(7.038531e-26), "7.038531e-26");
        assert_eq!("7.038531e-26".parse::<f32>(), Ok(source));
        assert_ne!(7.038531e-26_f64 as f32, source);
        // PostgreSQL prints 0xcea11974 as -1.3513999e+09, not as the shorter -1.3514e9 on the
        // boundary; both read back as that float4.
        assert_eq!(float4(-1.3513999e9), "-1351399900");
        assert_eq!(float4(-1.3514e9), "-1351400000");
        for text in ["-1351399900", "-1351400000"] {
            assert_eq!(text.parse::<f32>().map(f32::to_bits), Ok(0xcea1_1974));
        }
        // A float4 widened exactly, not read from text: still the same float4 for PostgreSQL.
        let widened = f64::from(0.1_f32);
        assert_eq!(float4(widened).parse::<f32>(), Ok(0.1_f32));
        // Beyond float4: written as is, for PostgreSQL to reject rather than round to infinity.
        assert_eq!(float4(1e300), "1e300");
        // Array elements are written the same way.
        assert_eq!(
            field(
                &array(ValueType::Float4),
                &Value::Array(vec![Value::Float(0.1)])
            ),
            "{0.1}"
        );
    }

    #[test]
    fn bytea_is_lowercase_hex_with_an_escaped_backslash() {
        assert_eq!(
            field(
                &ValueType::Bytea,
                &Value::Bytes(vec![0x00, 0x41, 0x0a, 0x5c, 0xff])
            ),
            "\\\\x00410a5cff"
        );
        assert_eq!(field(&ValueType::Bytea, &Value::Bytes(vec![])), "\\\\x");
        let long: Vec<u8> = (0..=255).collect();
        let hex: String = long.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            field(&ValueType::Bytea, &Value::Bytes(long)),
            format!("\\\\x{hex}")
        );
    }

    #[test]
    fn dates_are_iso_with_bc_and_no_year_zero() {
        let date = |days| field(&ValueType::Date, &Value::Date(days));
        assert_eq!(date(0), "1970-01-01");
        assert_eq!(date(-1), "1969-12-31");
        assert_eq!(date(19_782), "2024-02-29");
        assert_eq!(date(2_932_897), "10000-01-01");
        assert_eq!(date(-719_162), "0001-01-01");
        assert_eq!(date(-719_163), "0001-12-31 BC");
        assert_eq!(date(-719_528), "0001-01-01 BC");
        // 1 BC is a leap year (astronomical year 0).
        assert_eq!(date(-719_469), "0001-02-29 BC");
        assert_eq!(date(-735_160), "0044-03-15 BC");
        assert_eq!(date(PG_MIN_DATE), "4714-11-24 BC");
        assert_eq!(date(PG_MAX_DATE), "5874897-12-31");
        assert_eq!(date(i32::MAX), "infinity");
        assert_eq!(date(i32::MIN), "-infinity");
    }

    #[test]
    fn times_have_microsecond_fractions_without_trailing_zeros() {
        let time = |micros| field(&ValueType::Time, &Value::Time(micros));
        assert_eq!(time(0), "00:00:00");
        assert_eq!(time(1), "00:00:00.000001");
        assert_eq!(time(45_296_500_000), "12:34:56.5");
        assert_eq!(time(86_399_999_999), "23:59:59.999999");
        assert_eq!(time(MICROS_PER_DAY), "24:00:00");
        // Not a time PostgreSQL holds: written so that it is rejected.
        assert_eq!(time(MICROS_PER_DAY + 1), "24:00:00.000001");
        assert_eq!(time(-1), "-00:00:00.000001");
    }

    #[test]
    fn timestamps_are_iso_with_the_era_last() {
        let timestamp = |micros| field(&ValueType::Timestamp, &Value::Timestamp(micros));
        let timestamptz = |micros| field(&ValueType::TimestampTz, &Value::TimestampTz(micros));
        assert_eq!(timestamp(0), "1970-01-01 00:00:00");
        assert_eq!(timestamp(-1), "1969-12-31 23:59:59.999999");
        assert_eq!(timestamp(946_684_800_123_400), "2000-01-01 00:00:00.1234");
        assert_eq!(timestamp(PG_MIN_TIMESTAMP), "4714-11-24 00:00:00 BC");
        assert_eq!(timestamp(-62_135_596_800_000_000), "0001-01-01 00:00:00");
        assert_eq!(
            timestamp(-62_135_596_800_000_001),
            "0001-12-31 23:59:59.999999 BC"
        );
        assert_eq!(timestamp(i64::MAX - 1), "294247-01-10 04:00:54.775806");
        assert_eq!(timestamp(i64::MAX), "infinity");
        assert_eq!(timestamp(i64::MIN), "-infinity");
        assert_eq!(timestamptz(0), "1970-01-01 00:00:00+00");
        assert_eq!(timestamptz(1_500_000), "1970-01-01 00:00:01.5+00");
        assert_eq!(timestamptz(PG_MIN_TIMESTAMP), "4714-11-24 00:00:00+00 BC");
        assert_eq!(timestamptz(i64::MAX), "infinity");
        assert_eq!(timestamptz(i64::MIN), "-infinity");
    }

    #[test]
    fn intervals_are_iso_8601_with_a_sign_per_part() {
        let iso =
            |months, days, micros| field(&ValueType::Interval, &interval(months, days, micros));
        assert_eq!(iso(0, 0, 0), "PT0S");
        assert_eq!(
            iso(
                14,
                3,
                4 * MICROS_PER_HOUR + 5 * MICROS_PER_MINUTE + 6_500_000
            ),
            "P1Y2M3DT4H5M6.5S"
        );
        assert_eq!(iso(-14, 3, -4 * MICROS_PER_HOUR), "P-1Y-2M3DT-4H");
        assert_eq!(iso(0, -1, 1), "P-1DT0.000001S");
        assert_eq!(iso(0, 0, -500_000), "PT-0.5S");
        assert_eq!(iso(0, 0, -61 * MICROS_PER_SECOND), "PT-1M-1S");
        assert_eq!(iso(12, 0, 0), "P1Y");
        assert_eq!(iso(0, 0, MICROS_PER_HOUR), "PT1H");
        assert_eq!(
            iso(i32::MIN, i32::MIN, i64::MIN + 1),
            "P-178956970Y-8M-2147483648DT-2562047788H-54.775807S"
        );
        assert_eq!(
            iso(i32::MAX, 0, i64::MAX),
            "P178956970Y7MT2562047788H54.775807S"
        );
        // PostgreSQL 17's infinite intervals.
        assert_eq!(iso(i32::MAX, i32::MAX, i64::MAX), "infinity");
        assert_eq!(iso(i32::MIN, i32::MIN, i64::MIN), "-infinity");
    }

    /// In these expectations every backslash of the array literal appears doubled, as COPY
    /// escapes it, and a tab in an element appears as COPY's `\t`.
    #[test]
    fn arrays_quote_only_what_array_in_would_misread() {
        let items = vec![
            text("a"),
            text(""),
            text("NULL"),
            text("null"),
            Value::Null,
            text("c d"),
            text("e\"f"),
            text("g\\h"),
            text("{}"),
            text("x,y"),
            text("tab\there"),
            text("é"),
        ];
        assert_eq!(
            field(&array(ValueType::Text), &Value::Array(items)),
            r#"{a,"","NULL","null",NULL,"c d","e\\"f","g\\\\h","{}","x,y","tab\there",é}"#
        );
        assert_eq!(field(&array(ValueType::Int4), &Value::Array(vec![])), "{}");
    }

    #[test]
    fn nested_arrays_are_nested_braces() {
        let rows = Value::Array(vec![
            Value::Array(vec![Value::Int(1), Value::Null]),
            Value::Array(vec![Value::Int(-3), Value::Int(4)]),
        ]);
        assert_eq!(field(&array(ValueType::Int4), &rows), "{{1,NULL},{-3,4}}");
        let quoted = Value::Array(vec![Value::Array(vec![text("a b"), text("\"")])]);
        assert_eq!(
            field(&array(ValueType::Text), &quoted),
            r#"{{"a b","\\""}}"#
        );
    }

    #[test]
    fn array_elements_are_quoted_as_their_text_requires() {
        let bytea = Value::Array(vec![Value::Bytes(vec![1, 0xab]), Value::Bytes(vec![])]);
        // `"\\x01ab"` in the literal, each backslash doubled again by COPY.
        assert_eq!(
            field(&array(ValueType::Bytea), &bytea),
            r#"{"\\\\x01ab","\\\\x"}"#
        );
        let stamps = Value::Array(vec![
            Value::TimestampTz(0),
            Value::TimestampTz(i64::MAX),
            Value::TimestampTz(PG_MIN_TIMESTAMP),
        ]);
        assert_eq!(
            field(&array(ValueType::TimestampTz), &stamps),
            r#"{"1970-01-01 00:00:00+00",infinity,"4714-11-24 00:00:00+00 BC"}"#
        );
        let dates = Value::Array(vec![Value::Date(0), Value::Date(-719_163)]);
        assert_eq!(
            field(&array(ValueType::Date), &dates),
            r#"{1970-01-01,"0001-12-31 BC"}"#
        );
        let json = Value::Array(vec![Value::Json(r#"{"a": [1, "x\ty"]}"#.to_owned())]);
        assert_eq!(
            field(&array(ValueType::Jsonb), &json),
            r#"{"{\\"a\\": [1, \\"x\\\\ty\\"]}"}"#
        );
        let intervals = Value::Array(vec![interval(0, 1, 0), interval(0, 0, 0)]);
        assert_eq!(field(&array(ValueType::Interval), &intervals), "{P1D,PT0S}");
    }

    #[test]
    fn arrays_of_other_types_and_unreadable_values_are_written_as_their_text() {
        let boxes = "{(3,4),(1,2);(7,8),(5,6)}";
        assert_eq!(field(&array(ValueType::Other), &text(boxes)), boxes);
        assert_eq!(field(&ValueType::Other, &text("10.0.0.1/8")), "10.0.0.1/8");
        // Capture kept what it could not read as text; it goes back as it came.
        assert_eq!(field(&ValueType::Int4, &text("12\t")), "12\\t");
        assert_eq!(
            field(&array(ValueType::Int4), &text("[0:1]={1,2}")),
            "[0:1]={1,2}"
        );
        assert_eq!(field(&ValueType::Float8, &Value::Int(3)), "3");
    }

    #[test]
    fn rows_separate_fields_with_tabs_and_end_with_a_newline() {
        let int = ValueType::Int4;
        let txt = ValueType::Text;
        let mut out = Vec::new();
        write_row(
            &mut out,
            [
                (&int, &Value::Int(1)),
                (&txt, &text("a\tb")),
                (&txt, &Value::Null),
                (&txt, &text("")),
            ],
        );
        write_row(&mut out, [(&int, &Value::Int(2))]);
        assert_eq!(out, b"1\ta\\tb\t\\N\t\n2\n");
    }

    #[test]
    fn edge_values_round_trip_through_the_capture_parser() {
        let cases = [
            (ValueType::Date, Value::Date(PG_MIN_DATE)),
            (ValueType::Date, Value::Date(PG_MAX_DATE)),
            (ValueType::Date, Value::Date(i32::MIN)),
            (ValueType::Timestamp, Value::Timestamp(PG_MIN_TIMESTAMP)),
            (ValueType::Timestamp, Value::Timestamp(i64::MAX - 1)),
            (ValueType::TimestampTz, Value::TimestampTz(i64::MIN)),
            (ValueType::Interval, interval(i32::MIN, i32::MIN, i64::MIN)),
            (
                ValueType::Interval,
                interval(i32::MIN, i32::MIN, i64::MIN + 1),
            ),
            (ValueType::Interval, interval(i32::MAX, i32::MAX, i64::MAX)),
            (ValueType::Interval, interval(1, -1, -1)),
            (ValueType::Time, Value::Time(MICROS_PER_DAY)),
            (ValueType::Time, Value::Time(MICROS_PER_DAY + 1)),
            (ValueType::Time, Value::Time(-1)),
            (ValueType::Time, Value::Time(MYSQL_TIME_MAX)),
            (ValueType::Time, Value::Time(-MYSQL_TIME_MAX)),
            (ValueType::Time, Value::Time(i64::MAX)),
            (ValueType::Time, Value::Time(i64::MIN)),
            (
                ValueType::TimeTz,
                Value::TimeTz {
                    micros: MICROS_PER_DAY,
                    offset_secs: -(15 * 3600 + 59 * 60 + 59),
                },
            ),
            (
                ValueType::TimeTz,
                Value::TimeTz {
                    micros: MICROS_PER_DAY - 1,
                    offset_secs: -(14 * 3600 + 59 * 60),
                },
            ),
            (ValueType::Float4, Value::Float(f64::from(f32::MAX))),
            (ValueType::Float8, Value::Float(f64::MIN_POSITIVE)),
            (ValueType::Bytea, Value::Bytes(b"\\\t\n".to_vec())),
            (
                array(ValueType::Text),
                Value::Array(vec![Value::Array(vec![
                    text("NuLl"),
                    Value::Null,
                    text(" "),
                ])]),
            ),
        ];
        for (value_type, value) in cases {
            if let Err(message) = round_trip(&value_type, &value) {
                panic!("{message}");
            }
        }
    }

    /// Values of `value_type` as capture produces them from PostgreSQL's output, over the
    /// whole range PostgreSQL holds (and the extremes `Value` allows beyond it).
    fn scalar_values(value_type: &ValueType) -> BoxedStrategy<Value> {
        match value_type {
            ValueType::Bool => any::<bool>().prop_map(Value::Bool).boxed(),
            ValueType::Int2 => any::<i16>().prop_map(|i| Value::Int(i.into())).boxed(),
            ValueType::Int4 => any::<i32>().prop_map(|i| Value::Int(i.into())).boxed(),
            ValueType::Int8 => any::<i64>().prop_map(Value::Int).boxed(),
            // As types.rs reads float4: the shortest decimal of the float4, as an f64.
            ValueType::Float4 => any::<u32>()
                .prop_map(|bits| {
                    let float = f32::from_bits(bits);
                    match format!("{float:e}").parse::<f64>() {
                        Ok(read) if float.is_finite() => Value::Float(read),
                        _ => Value::Float(float.into()),
                    }
                })
                .boxed(),
            ValueType::Float8 => any::<u64>()
                .prop_map(|bits| Value::Float(f64::from_bits(bits)))
                .boxed(),
            ValueType::Numeric => prop_oneof![
                "-?[0-9]{1,40}(\\.[0-9]{1,30})?",
                Just("NaN".to_owned()),
                Just("Infinity".to_owned()),
                Just("-Infinity".to_owned()),
            ]
            .prop_map(Value::Numeric)
            .boxed(),
            ValueType::Text | ValueType::Other => prop_oneof![
                any::<String>(),
                "[a-zA-Z \t\n\r\\\\\"{},é\u{b}\u{c}]{0,10}",
                Just("NULL".to_owned()),
                Just("\\N".to_owned()),
            ]
            .prop_map(Value::Text)
            .boxed(),
            ValueType::Bytea => prop::collection::vec(any::<u8>(), 0..40)
                .prop_map(Value::Bytes)
                .boxed(),
            ValueType::Date => prop_oneof![
                PG_MIN_DATE..=PG_MAX_DATE,
                -800_000..-700_000_i32,
                Just(i32::MAX),
                Just(i32::MIN),
            ]
            .prop_map(Value::Date)
            .boxed(),
            ValueType::Time => (0..=MICROS_PER_DAY).prop_map(Value::Time).boxed(),
            ValueType::Timestamp | ValueType::TimestampTz => {
                let is_tz = *value_type == ValueType::TimestampTz;
                prop_oneof![
                    PG_MIN_TIMESTAMP..i64::MAX,
                    -62_200_000_000_000_000..-62_100_000_000_000_000_i64,
                    Just(i64::MAX),
                    Just(i64::MIN),
                ]
                .prop_map(move |micros| {
                    if is_tz {
                        Value::TimestampTz(micros)
                    } else {
                        Value::Timestamp(micros)
                    }
                })
                .boxed()
            }
            ValueType::TimeTz => {
                const MAX_OFFSET: i32 = 15 * 3600 + 59 * 60 + 59;
                (
                    0..=MICROS_PER_DAY,
                    prop_oneof![
                        -MAX_OFFSET..=MAX_OFFSET,
                        (-15..=15_i32).prop_map(|hours| hours * 3600),
                        (-959..=959_i32).prop_map(|minutes| minutes * 60),
                    ],
                )
                    .prop_map(|(micros, offset_secs)| Value::TimeTz {
                        micros,
                        offset_secs,
                    })
                    .boxed()
            }
            ValueType::Interval => prop_oneof![
                (any::<i32>(), any::<i32>(), any::<i64>()),
                (
                    -30..30_i32,
                    -40..40_i32,
                    -100_000_000_000..100_000_000_000_i64
                ),
            ]
            .prop_map(|(months, days, micros)| interval(months, days, micros))
            .boxed(),
            ValueType::Uuid => "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
                .prop_map(Value::Uuid)
                .boxed(),
            ValueType::Json | ValueType::Jsonb => {
                prop_oneof![any::<String>(), "[\\[\\]{}\":, a-z0-9\\\\\t\n]{0,16}",]
                    .prop_map(Value::Json)
                    .boxed()
            }
            ValueType::Array(_) => Just(Value::Null).boxed(),
        }
    }

    /// Every scalar type whose values go through PostgreSQL's output as a whole.
    fn scalar_types() -> Vec<ValueType> {
        ValueType::SCALARS.to_vec()
    }

    fn typed_scalars() -> impl Strategy<Value = (ValueType, Value)> {
        prop::sample::select(scalar_types())
            .prop_flat_map(|value_type| (Just(value_type.clone()), scalar_values(&value_type)))
    }

    /// One- and two-dimensional arrays (rectangular, as PostgreSQL requires) with nulls, of
    /// every scalar type but `Other`, whose arrays stay text.
    fn typed_arrays() -> impl Strategy<Value = (ValueType, Value)> {
        let element_types: Vec<ValueType> = scalar_types()
            .into_iter()
            .filter(|t| *t != ValueType::Other)
            .collect();
        prop::sample::select(element_types).prop_flat_map(|element| {
            let item = prop::option::weighted(0.8, scalar_values(&element))
                .prop_map(|item| item.unwrap_or(Value::Null));
            let flat = prop::collection::vec(item.clone(), 0..6).prop_map(Value::Array);
            let rows = (1..4_usize).prop_flat_map(move |width| {
                prop::collection::vec(
                    prop::collection::vec(item.clone(), width).prop_map(Value::Array),
                    1..4,
                )
                .prop_map(Value::Array)
            });
            (Just(array(element)), prop_oneof![flat, rows])
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        #[test]
        fn scalars_read_back_as_written((value_type, value) in typed_scalars()) {
            if let Err(message) = round_trip(&value_type, &value) {
                return Err(TestCaseError::fail(message));
            }
        }

        #[test]
        fn mysql_time_spans_read_back_as_written(
            micros in prop_oneof![-MYSQL_TIME_MAX..=MYSQL_TIME_MAX, any::<i64>()],
        ) {
            if let Err(message) = round_trip(&ValueType::Time, &Value::Time(micros)) {
                return Err(TestCaseError::fail(message));
            }
        }

        #[test]
        fn arrays_read_back_as_written((value_type, value) in typed_arrays()) {
            if let Err(message) = round_trip(&value_type, &value) {
                return Err(TestCaseError::fail(message));
            }
        }

        #[test]
        fn float4_text_is_the_source_float4(bits in any::<u32>()) {
            let source = f32::from_bits(bits);
            prop_assume!(source.is_finite());
            let Ok(read) = format!("{source:e}").parse::<f64>() else {
                return Err(TestCaseError::fail("unparsable float"));
            };
            // What PostgreSQL's float4in (strtof) makes of the text. Rust's shortest decimal
            // may lie on the rounding boundary (PostgreSQL's never does); nine significant
            // digits always lie strictly inside.
            let written = field(&ValueType::Float4, &Value::Float(read));
            prop_assert_eq!(written.parse::<f32>().map(f32::to_bits), Ok(bits));
            let Ok(nine_digits) = format!("{source:.8e}").parse::<f64>() else {
                return Err(TestCaseError::fail("unparsable float"));
            };
            let written = field(&ValueType::Float4, &Value::Float(nine_digits));
            prop_assert_eq!(written.parse::<f32>().map(f32::to_bits), Ok(bits));
            // A float4 widened to f64 without going through text reaches the same float4.
            let widened = field(&ValueType::Float4, &Value::Float(source.into()));
            prop_assert_eq!(widened.parse::<f32>().map(f32::to_bits), Ok(bits));
        }

        #[test]
        fn other_arrays_keep_their_literal(literal in any::<String>()) {
            let written = field(&array(ValueType::Other), &Value::Text(literal.clone()));
            prop_assert_eq!(unescape_copy(&written), Some(literal));
        }

        #[test]
        fn rows_split_back_into_their_fields(
            values in prop::collection::vec(scalar_values(&ValueType::Text), 1..6),
        ) {
            let mut out = Vec::new();
            write_row(&mut out, values.iter().map(|v| (&ValueType::Text, v)));
            let Ok(line) = String::from_utf8(out) else {
                return Err(TestCaseError::fail("invalid UTF-8"));
            };
            let Some(line) = line.strip_suffix('\n') else {
                return Err(TestCaseError::fail("no newline at the end"));
            };
            let fields: Vec<Option<Value>> = line
                .split('\t')
                .map(|f| unescape_copy(f).map(Value::Text))
                .collect();
            let expected: Vec<Option<Value>> = values.into_iter().map(Some).collect();
            prop_assert_eq!(fields, expected);
        }
    }
}
