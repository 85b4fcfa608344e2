//! PostgreSQL type knowledge of the source connector: which built-in type OIDs map to which
//! `ValueType`, how a `pg_type` row resolves the types that are not built in (domains, enums,
//! arrays of user types), and the conversion of PostgreSQL's text output into `Value`. All of it
//! is pure functions over strings. The invariant: the text parsed is what the server prints
//! under the replication session's settings (`DateStyle=ISO`, `IntervalStyle=iso_8601`,
//! `TimeZone=UTC`, `extra_float_digits=3`; see "Date/Time Output" and "Interval Output" in the
//! PostgreSQL manual), and any other input, malformed or beyond what `Value` can represent, is a
//! `TypeError`: never a panic, never a silently different value.

use std::num::{IntErrorKind, ParseIntError};
use std::str::FromStr;

use crate::event::{Value, ValueType};

/// Built-in types with a mapping: (type OID, array type OID, value type), from PostgreSQL's
/// `src/include/catalog/pg_type.dat`.
static BUILTIN_TYPES: [(u32, u32, ValueType); 25] = [
    (16, 1000, ValueType::Bool),          // bool
    (17, 1001, ValueType::Bytea),         // bytea
    (18, 1002, ValueType::Text),          // "char"
    (19, 1003, ValueType::Text),          // name
    (20, 1016, ValueType::Int8),          // int8
    (21, 1005, ValueType::Int2),          // int2
    (23, 1007, ValueType::Int4),          // int4
    (25, 1009, ValueType::Text),          // text
    (26, 1028, ValueType::Int8),          // oid: unsigned 32 bits, so it needs int8
    (114, 199, ValueType::Json),          // json
    (142, 143, ValueType::Text),          // xml
    (700, 1021, ValueType::Float4),       // float4
    (701, 1022, ValueType::Float8),       // float8
    (790, 791, ValueType::Other),         // money: its text depends on lc_monetary
    (1042, 1014, ValueType::Text),        // bpchar
    (1043, 1015, ValueType::Text),        // varchar
    (1082, 1182, ValueType::Date),        // date
    (1083, 1183, ValueType::Time),        // time
    (1114, 1115, ValueType::Timestamp),   // timestamp
    (1184, 1185, ValueType::TimestampTz), // timestamptz
    (1186, 1187, ValueType::Interval),    // interval
    (1266, 1270, ValueType::TimeTz),      // timetz
    (1700, 1231, ValueType::Numeric),     // numeric
    (2950, 2951, ValueType::Uuid),        // uuid
    (3802, 3807, ValueType::Jsonb),       // jsonb
];

/// PostgreSQL's limit on array dimensions (`MAXDIM`); also bounds the parser's recursion.
const MAX_ARRAY_DIMENSIONS: usize = 6;

/// Longest excerpt of the offending text an error carries, in characters.
const EXCERPT_CHARS: usize = 64;

const MICROS_PER_SECOND: i64 = 1_000_000;
const MICROS_PER_MINUTE: i64 = 60 * MICROS_PER_SECOND;
const MICROS_PER_HOUR: i64 = 60 * MICROS_PER_MINUTE;
const MICROS_PER_DAY: i64 = 24 * MICROS_PER_HOUR;

/// The `ValueType` of a built-in type or of an array of one, by type OID; `None` for any
/// other OID (enums, domains, extension types, arrays of those), which the catalog resolves
/// with [`value_type_from_catalog`].
pub fn builtin_value_type(type_oid: u32) -> Option<ValueType> {
    BUILTIN_TYPES
        .iter()
        .find_map(|(oid, array_oid, value_type)| {
            if *oid == type_oid {
                Some(value_type.clone())
            } else if *array_oid == type_oid {
                Some(ValueType::Array(Box::new(value_type.clone())))
            } else {
                None
            }
        })
}

/// Resolves a type that is not built in from its `pg_type` row: a domain (`typtype` 'd') is
/// represented as its base type (`base`, already resolved), an enum ('e') as text, an array
/// (`typcategory` 'A') as an array of its resolved element type, anything else (composite,
/// range, extension types) as `Other`, kept in its text form.
pub fn value_type_from_catalog(
    typtype: char,
    typcategory: char,
    element: Option<ValueType>,
    base: Option<ValueType>,
) -> ValueType {
    match typtype {
        'd' => base.unwrap_or(ValueType::Other),
        'e' => ValueType::Text,
        _ if typcategory == 'A' => element.map_or(ValueType::Other, |element| {
            ValueType::Array(Box::new(element))
        }),
        _ => ValueType::Other,
    }
}

/// A value whose text is not what PostgreSQL prints for its type, or that `Value` cannot
/// represent. `text` is the offending text, cut to 64 characters.
#[derive(Debug, thiserror::Error)]
pub enum TypeError {
    #[error("invalid {} value {text:?}: {reason}", type_name(.value_type))]
    Invalid {
        value_type: ValueType,
        text: String,
        reason: &'static str,
    },
    #[error("{} value {text:?} is out of range: {reason}", type_name(.value_type))]
    OutOfRange {
        value_type: ValueType,
        text: String,
        reason: &'static str,
    },
    /// One element of an array literal failed; `index` counts elements from 1 in the order
    /// they are written, across all dimensions.
    #[error("invalid {} value {text:?}: element {index}", type_name(.value_type))]
    Element {
        value_type: ValueType,
        text: String,
        index: usize,
        source: Box<TypeError>,
    },
}

/// Converts one value from PostgreSQL's text output format (as sent by pgoutput and COPY) to
/// a `Value` of the column's type.
///
/// Representations beyond what `Value`'s doc comments fix:
/// - float4 is read as the decimal it prints (`0.1` → `0.1_f64`); with
///   `extra_float_digits=3` that decimal converts back to the exact float4.
/// - timetz keeps what PostgreSQL stores, the local time of day and the printed offset, not
///   normalised to UTC (`24:00:00-08` is 24:00 at 8 hours west of UTC).
/// - timestamps after 294247-01-10 04:00:54.775806 (PostgreSQL goes on to 294276 AD) do not
///   fit 64-bit microseconds since 1970 beside the infinity sentinels: `OutOfRange`.
/// - interval `infinity`/`-infinity` (PostgreSQL 17) keep PostgreSQL's own encoding: every
///   field at its maximum, or at its minimum.
/// - arrays of `Other` (whose element delimiter may not be `,`: box uses `;`) stay the whole
///   literal as `Value::Text`; other arrays drop any bounds prefix (`[0:1]=`) and become
///   nested `Value::Array`s, one level per dimension.
pub fn parse_text(value_type: &ValueType, text: &str) -> Result<Value, TypeError> {
    match value_type {
        ValueType::Array(element) => parse_array(value_type, element, text),
        _ => parse_scalar(value_type, text).map_err(|fault| fault.into_error(value_type, text)),
    }
}

/// Why a scalar failed, before the type and text are attached.
enum Fault {
    Invalid(&'static str),
    OutOfRange(&'static str),
}

impl Fault {
    fn into_error(self, value_type: &ValueType, text: &str) -> TypeError {
        let value_type = value_type.clone();
        let text = excerpt(text);
        match self {
            Fault::Invalid(reason) => TypeError::Invalid {
                value_type,
                text,
                reason,
            },
            Fault::OutOfRange(reason) => TypeError::OutOfRange {
                value_type,
                text,
                reason,
            },
        }
    }
}

const BEYOND_I64_MICROS: &str =
    "beyond the microseconds since 1970 that 64 bits hold (about 292277 BC to 294247 AD)";

fn parse_scalar(value_type: &ValueType, text: &str) -> Result<Value, Fault> {
    Ok(match value_type {
        ValueType::Bool => match text {
            "t" => Value::Bool(true),
            "f" => Value::Bool(false),
            _ => return Err(Fault::Invalid("expected t or f")),
        },
        ValueType::Int2 => Value::Int(parse_integer::<i16>(text)?.into()),
        ValueType::Int4 => Value::Int(parse_integer::<i32>(text)?.into()),
        ValueType::Int8 => Value::Int(parse_integer::<i64>(text)?),
        // Rust's parser accepts `NaN`, `Infinity` and `-Infinity` as PostgreSQL prints them.
        ValueType::Float4 | ValueType::Float8 => Value::Float(
            text.parse::<f64>()
                .map_err(|_| Fault::Invalid("not a floating-point number"))?,
        ),
        ValueType::Numeric if is_numeric_text(text) => Value::Numeric(text.to_owned()),
        ValueType::Numeric => return Err(Fault::Invalid("not a decimal number")),
        ValueType::Text | ValueType::Other => Value::Text(text.to_owned()),
        ValueType::Bytea => Value::Bytes(parse_bytea(text)?),
        ValueType::Date => Value::Date(parse_date(text)?),
        ValueType::Time => {
            let mut cursor = Cursor::new(text);
            let micros = time_of_day(&mut cursor, true)?;
            cursor.finish()?;
            Value::Time(micros)
        }
        ValueType::TimeTz => {
            let (micros, offset_secs) = parse_timetz(text)?;
            Value::TimeTz {
                micros,
                offset_secs,
            }
        }
        ValueType::Timestamp => Value::Timestamp(parse_timestamp(text, false)?),
        ValueType::TimestampTz => Value::TimestampTz(parse_timestamp(text, true)?),
        ValueType::Interval => {
            let (months, days, micros) = parse_interval(text)?;
            Value::Interval {
                months,
                days,
                micros,
            }
        }
        ValueType::Uuid if is_uuid_text(text) => Value::Uuid(text.to_ascii_lowercase()),
        ValueType::Uuid => return Err(Fault::Invalid("not a UUID")),
        ValueType::Json | ValueType::Jsonb => Value::Json(text.to_owned()),
        // Only reached for an array nested in an array type, which PostgreSQL does not have.
        ValueType::Array(_) => {
            return Err(Fault::Invalid("an array where an element was expected"))
        }
    })
}

fn parse_integer<T: FromStr<Err = ParseIntError>>(text: &str) -> Result<T, Fault> {
    text.parse::<T>().map_err(|error| match error.kind() {
        IntErrorKind::PosOverflow | IntErrorKind::NegOverflow => {
            Fault::OutOfRange("does not fit the type")
        }
        _ => Fault::Invalid("not an integer"),
    })
}

/// numeric prints as plain decimal digits (never an exponent) or as a special value.
fn is_numeric_text(text: &str) -> bool {
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

fn is_uuid_text(text: &str) -> bool {
    text.len() == 36
        && text.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

/// bytea in the hex format (`\x0a0b`, the default since PostgreSQL 9.0) or the escape format
/// (printable bytes as themselves, `\\` for a backslash, `\ooo` in octal for the rest).
fn parse_bytea(text: &str) -> Result<Vec<u8>, Fault> {
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

/// `YYYY-MM-DD[ BC]` or `±infinity` → days since 1970-01-01.
fn parse_date(text: &str) -> Result<i32, Fault> {
    match text {
        "infinity" => return Ok(i32::MAX),
        "-infinity" => return Ok(i32::MIN),
        _ => {}
    }
    let mut cursor = Cursor::new(text);
    let date = calendar_date(&mut cursor)?;
    let bc = cursor.eat_str(" BC");
    cursor.finish()?;
    let days = date.days_since_epoch(bc)?;
    match i32::try_from(days) {
        Ok(days) if days != i32::MAX && days != i32::MIN => Ok(days),
        _ => Err(Fault::OutOfRange(
            "beyond the days since 1970 that 32 bits hold",
        )),
    }
}

/// `HH:MM:SS[.f]±HH[:MM[:SS]]` → the local time of day in microseconds since midnight and
/// the offset in seconds east of UTC, as written (no normalisation).
fn parse_timetz(text: &str) -> Result<(i64, i32), Fault> {
    let mut cursor = Cursor::new(text);
    let local = time_of_day(&mut cursor, true)?;
    let offset = utc_offset_seconds(&mut cursor)?;
    cursor.finish()?;
    Ok((local, offset))
}

/// `YYYY-MM-DD HH:MM:SS[.f][±HH[:MM[:SS]]][ BC]` or `±infinity` → microseconds since
/// 1970-01-01 (in UTC when `with_zone`; PostgreSQL writes ` BC` after the offset).
fn parse_timestamp(text: &str, with_zone: bool) -> Result<i64, Fault> {
    match text {
        "infinity" => return Ok(i64::MAX),
        "-infinity" => return Ok(i64::MIN),
        _ => {}
    }
    let mut cursor = Cursor::new(text);
    let date = calendar_date(&mut cursor)?;
    cursor.expect(b' ', "expected a space between date and time")?;
    let time = time_of_day(&mut cursor, false)?;
    let offset = if with_zone {
        utc_offset_micros(&mut cursor)?
    } else {
        0
    };
    let bc = cursor.eat_str(" BC");
    cursor.finish()?;
    let days = date.days_since_epoch(bc)?;
    match days
        .checked_mul(MICROS_PER_DAY)
        .and_then(|micros| micros.checked_add(time))
        .and_then(|micros| micros.checked_sub(offset))
    {
        Some(micros) if micros != i64::MAX && micros != i64::MIN => Ok(micros),
        _ => Err(Fault::OutOfRange(BEYOND_I64_MICROS)),
    }
}

/// An interval as `IntervalStyle=iso_8601` prints it (`P1Y2M3DT4H5M6.789S`, `PT0S`, each part
/// with its own sign, only seconds with a fraction) → (months, days, microseconds).
fn parse_interval(text: &str) -> Result<(i32, i32, i64), Fault> {
    match text {
        "infinity" => return Ok((i32::MAX, i32::MAX, i64::MAX)),
        "-infinity" => return Ok((i32::MIN, i32::MIN, i64::MIN)),
        _ => {}
    }
    let mut cursor = Cursor::new(text);
    cursor.expect(
        b'P',
        "does not start with P (expected IntervalStyle iso_8601)",
    )?;
    let (mut months, mut days, mut micros) = (0_i128, 0_i128, 0_i128);
    let mut parts = 0;
    // Designators appear at most once each, in this order; `rank` is the last one seen.
    let mut rank = 0;
    while !cursor.is_done() && cursor.peek() != Some(b'T') {
        let (value, fraction) = interval_number(&mut cursor)?;
        let (part_rank, unit, total) = match cursor.next() {
            Some(b'Y') => (1, 12, &mut months),
            Some(b'M') => (2, 1, &mut months),
            Some(b'D') => (3, 1, &mut days),
            _ => return Err(Fault::Invalid("expected Y, M or D after a number")),
        };
        if fraction.is_some() {
            return Err(Fault::Invalid("only seconds may have a fraction"));
        }
        if part_rank <= rank {
            return Err(Fault::Invalid("parts repeated or out of order"));
        }
        rank = part_rank;
        *total += value * unit;
        parts += 1;
    }
    if cursor.eat(b'T') {
        let mut rank = 0;
        let mut time_parts = 0;
        while !cursor.is_done() {
            let (value, fraction) = interval_number(&mut cursor)?;
            let (part_rank, unit) = match cursor.next() {
                Some(b'H') => (1, MICROS_PER_HOUR),
                Some(b'M') => (2, MICROS_PER_MINUTE),
                Some(b'S') => (3, MICROS_PER_SECOND),
                _ => return Err(Fault::Invalid("expected H, M or S after a number")),
            };
            if fraction.is_some() && part_rank != 3 {
                return Err(Fault::Invalid("only seconds may have a fraction"));
            }
            if part_rank <= rank {
                return Err(Fault::Invalid("parts repeated or out of order"));
            }
            rank = part_rank;
            micros += value * i128::from(unit) + fraction.unwrap_or(0);
            time_parts += 1;
        }
        if time_parts == 0 {
            return Err(Fault::Invalid("no hours, minutes or seconds after T"));
        }
        parts += time_parts;
    }
    if parts == 0 {
        return Err(Fault::Invalid("no parts after P"));
    }
    match (
        i32::try_from(months),
        i32::try_from(days),
        i64::try_from(micros),
    ) {
        (Ok(months), Ok(days), Ok(micros)) => Ok((months, days, micros)),
        _ => Err(Fault::OutOfRange(
            "beyond 32-bit months and days or 64-bit microseconds",
        )),
    }
}

/// `[-]digits[.fraction]` of one interval part → (signed value, signed fraction in micros).
/// At most 19 digits, so the value times any unit fits an i128.
fn interval_number(cursor: &mut Cursor<'_>) -> Result<(i128, Option<i128>), Fault> {
    let sign = if cursor.eat(b'-') { -1 } else { 1 };
    let (value, _) = cursor
        .digits(1, 19)
        .ok_or(Fault::Invalid("expected a number"))?;
    let fraction = match cursor.peek() {
        Some(b'.') => Some(sign * i128::from(fraction_micros(cursor)?)),
        _ => None,
    };
    Ok((sign * i128::from(value), fraction))
}

/// A proleptic Gregorian date as written, before the era is applied.
struct CalendarDate {
    year: u64,
    month: u64,
    day: u64,
}

impl CalendarDate {
    /// Days since 1970-01-01, counting the year as BC when `bc` (1 BC is the leap year 0).
    fn days_since_epoch(&self, bc: bool) -> Result<i64, Fault> {
        if self.year == 0 {
            return Err(Fault::Invalid("year 0 does not exist (1 BC precedes 1 AD)"));
        }
        // At most 9 digits, so these conversions and the arithmetic below cannot overflow.
        let year = i64::try_from(self.year).map_err(|_| Fault::OutOfRange("year too large"))?;
        let year = if bc { 1 - year } else { year };
        if !(1..=12).contains(&self.month) {
            return Err(Fault::Invalid("month out of range"));
        }
        if self.day < 1 || self.day > days_in_month(year, self.month) {
            return Err(Fault::Invalid("day out of range for the month"));
        }
        Ok(days_from_civil(year, self.month, self.day))
    }
}

/// `YYYY-MM-DD`, the year with 1 to 9 digits (PostgreSQL pads to 4 and dates reach 5874897).
fn calendar_date(cursor: &mut Cursor<'_>) -> Result<CalendarDate, Fault> {
    const SHAPE: &str = "expected a date as YYYY-MM-DD";
    let (year, _) = cursor.digits(1, 9).ok_or(Fault::Invalid(SHAPE))?;
    cursor.expect(b'-', SHAPE)?;
    let (month, _) = cursor.digits(2, 2).ok_or(Fault::Invalid(SHAPE))?;
    cursor.expect(b'-', SHAPE)?;
    let (day, _) = cursor.digits(2, 2).ok_or(Fault::Invalid(SHAPE))?;
    Ok(CalendarDate { year, month, day })
}

fn is_leap_year(year: i64) -> bool {
    year.rem_euclid(4) == 0 && (year.rem_euclid(100) != 0 || year.rem_euclid(400) == 0)
}

fn days_in_month(year: i64, month: u64) -> u64 {
    match month {
        2 if is_leap_year(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date with astronomical year numbering
/// (Howard Hinnant's `days_from_civil`); valid for any year whose days fit an i64.
fn days_from_civil(year: i64, month: u64, day: u64) -> i64 {
    // Month and day are validated (1..=12, 1..=31), so the casts are lossless.
    let (month, day) = (month as i64, day as i64);
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// `HH:MM:SS[.f]` → microseconds since midnight; `24:00:00` only when `allow_24` (the time
/// types allow it, timestamps do not).
fn time_of_day(cursor: &mut Cursor<'_>, allow_24: bool) -> Result<i64, Fault> {
    const SHAPE: &str = "expected a time as HH:MM:SS";
    let (hour, _) = cursor.digits(2, 2).ok_or(Fault::Invalid(SHAPE))?;
    cursor.expect(b':', SHAPE)?;
    let (minute, _) = cursor.digits(2, 2).ok_or(Fault::Invalid(SHAPE))?;
    cursor.expect(b':', SHAPE)?;
    let (second, _) = cursor.digits(2, 2).ok_or(Fault::Invalid(SHAPE))?;
    let fraction = match cursor.peek() {
        Some(b'.') => fraction_micros(cursor)?,
        _ => 0,
    };
    let end_of_day = allow_24 && hour == 24 && minute == 0 && second == 0 && fraction == 0;
    if (hour > 23 && !end_of_day) || minute > 59 || second > 59 {
        return Err(Fault::Invalid("time of day out of range"));
    }
    // Two digits each, so the casts are lossless.
    let seconds = (hour * 3600 + minute * 60 + second) as i64;
    Ok(seconds * MICROS_PER_SECOND + fraction)
}

/// `.` and 1 to 6 digits (PostgreSQL prints microseconds without trailing zeros) → micros.
fn fraction_micros(cursor: &mut Cursor<'_>) -> Result<i64, Fault> {
    cursor.expect(b'.', "expected a fraction")?;
    let (value, count) = cursor
        .digits(1, 6)
        .ok_or(Fault::Invalid("expected 1 to 6 digits after the point"))?;
    if cursor.peek().is_some_and(|b| b.is_ascii_digit()) {
        return Err(Fault::Invalid("more than 6 fractional digits"));
    }
    // At most 6 digits: both casts are lossless.
    Ok(value as i64 * 10_i64.pow(6 - count as u32))
}

/// `±HH[:MM[:SS]]` → the offset east of UTC in microseconds.
fn utc_offset_micros(cursor: &mut Cursor<'_>) -> Result<i64, Fault> {
    Ok(i64::from(utc_offset_seconds(cursor)?) * MICROS_PER_SECOND)
}

/// `±HH[:MM[:SS]]` → the offset east of UTC in seconds. Seconds appear for local mean time
/// offsets of old timestamps; PostgreSQL allows offsets up to 15:59:59.
fn utc_offset_seconds(cursor: &mut Cursor<'_>) -> Result<i32, Fault> {
    const SHAPE: &str = "expected a UTC offset as +HH, +HH:MM or +HH:MM:SS";
    let sign = match cursor.next() {
        Some(b'+') => 1,
        Some(b'-') => -1,
        _ => return Err(Fault::Invalid(SHAPE)),
    };
    let (hours, _) = cursor.digits(2, 2).ok_or(Fault::Invalid(SHAPE))?;
    let mut minutes = 0;
    let mut seconds = 0;
    if cursor.eat(b':') {
        (minutes, _) = cursor.digits(2, 2).ok_or(Fault::Invalid(SHAPE))?;
        if cursor.eat(b':') {
            (seconds, _) = cursor.digits(2, 2).ok_or(Fault::Invalid(SHAPE))?;
        }
    }
    if hours > 15 || minutes > 59 || seconds > 59 {
        return Err(Fault::Invalid("UTC offset out of range"));
    }
    // Two digits each, so the cast is lossless.
    Ok(sign * (hours * 3600 + minutes * 60 + seconds) as i32)
}

/// A read position in ASCII-structured text. It moves byte by byte but only ever stops at
/// ASCII bytes it recognised, so it never splits a character.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(text: &'a str) -> Self {
        Cursor {
            bytes: text.as_bytes(),
            pos: 0,
        }
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let byte = self.peek()?;
        self.pos += 1;
        Some(byte)
    }

    fn eat(&mut self, byte: u8) -> bool {
        let matched = self.peek() == Some(byte);
        if matched {
            self.pos += 1;
        }
        matched
    }

    fn eat_str(&mut self, text: &str) -> bool {
        let matched = self
            .bytes
            .get(self.pos..)
            .is_some_and(|rest| rest.starts_with(text.as_bytes()));
        if matched {
            self.pos += text.len();
        }
        matched
    }

    fn expect(&mut self, byte: u8, reason: &'static str) -> Result<(), Fault> {
        if self.eat(byte) {
            Ok(())
        } else {
            Err(Fault::Invalid(reason))
        }
    }

    fn is_done(&self) -> bool {
        self.pos >= self.bytes.len()
    }

    fn finish(&self) -> Result<(), Fault> {
        if self.is_done() {
            Ok(())
        } else {
            Err(Fault::Invalid("unexpected text at the end"))
        }
    }

    /// `min` to `max` (at most 19) ASCII digits → (value, number of digits).
    fn digits(&mut self, min: usize, max: usize) -> Option<(u64, usize)> {
        let start = self.pos;
        let mut value = 0_u64;
        while self.pos - start < max {
            match self.peek() {
                Some(digit @ b'0'..=b'9') => {
                    value = value * 10 + u64::from(digit - b'0');
                    self.pos += 1;
                }
                _ => break,
            }
        }
        let count = self.pos - start;
        (count >= min).then_some((value, count))
    }
}

/// Why an array literal failed, before the type and text are attached.
enum ArrayFault {
    Syntax(&'static str),
    Element { index: usize, source: TypeError },
}

fn parse_array(
    array_type: &ValueType,
    element: &ValueType,
    text: &str,
) -> Result<Value, TypeError> {
    // PostgreSQL has no arrays of arrays: every dimension has the same scalar element type.
    let mut element = element;
    while let ValueType::Array(inner) = element {
        element = inner;
    }
    if *element == ValueType::Other {
        return Ok(Value::Text(text.to_owned()));
    }
    let literal = ArrayLiteral {
        bytes: text.as_bytes(),
        pos: 0,
        element,
        elements: 0,
    };
    literal.parse().map(Value::Array).map_err(|fault| {
        let value_type = array_type.clone();
        let text = excerpt(text);
        match fault {
            ArrayFault::Syntax(reason) => TypeError::Invalid {
                value_type,
                text,
                reason,
            },
            ArrayFault::Element { index, source } => TypeError::Element {
                value_type,
                text,
                index,
                source: Box::new(source),
            },
        }
    })
}

/// An array literal as `array_out` writes it ("Array Value Input" in the manual): `{…}` per
/// dimension, `,` between elements, elements double-quoted when they are empty, `NULL` in any
/// case, or contain `"`, `\`, `{`, `}`, `,` or white space, with `"` and `\` backslash-escaped
/// inside quotes; an unquoted `NULL` is the null value. Like `array_in`, it also accepts white
/// space around elements and backslash escapes in unquoted elements.
struct ArrayLiteral<'a> {
    bytes: &'a [u8],
    pos: usize,
    element: &'a ValueType,
    /// Elements read so far, for error messages.
    elements: usize,
}

impl ArrayLiteral<'_> {
    fn parse(mut self) -> Result<Vec<Value>, ArrayFault> {
        self.skip_space();
        if self.peek() == Some(b'[') {
            self.skip_bounds()?;
        }
        if !self.eat(b'{') {
            return Err(ArrayFault::Syntax("does not start with {"));
        }
        let values = self.items(1)?;
        self.skip_space();
        if self.pos < self.bytes.len() {
            return Err(ArrayFault::Syntax("unexpected text after the closing }"));
        }
        Ok(values)
    }

    /// Skips `[lower:upper]…=`, which `array_out` writes when a lower bound is not 1.
    fn skip_bounds(&mut self) -> Result<(), ArrayFault> {
        const SHAPE: &str = "malformed dimension bounds, expected [lower:upper]=";
        while self.eat(b'[') {
            loop {
                match self.next() {
                    Some(b']') => break,
                    Some(b'0'..=b'9' | b'-' | b'+' | b':') => {}
                    _ => return Err(ArrayFault::Syntax(SHAPE)),
                }
            }
        }
        self.skip_space();
        if !self.eat(b'=') {
            return Err(ArrayFault::Syntax(SHAPE));
        }
        self.skip_space();
        Ok(())
    }

    /// The items of one dimension, after its `{`, through its `}`.
    fn items(&mut self, depth: usize) -> Result<Vec<Value>, ArrayFault> {
        if depth > MAX_ARRAY_DIMENSIONS {
            return Err(ArrayFault::Syntax("more than 6 dimensions"));
        }
        let mut values = Vec::new();
        self.skip_space();
        if self.eat(b'}') {
            return Ok(values);
        }
        let mut sub_arrays = None;
        loop {
            self.skip_space();
            let is_sub_array = self.eat(b'{');
            if *sub_arrays.get_or_insert(is_sub_array) != is_sub_array {
                return Err(ArrayFault::Syntax(
                    "mixes sub-arrays and elements in one dimension",
                ));
            }
            values.push(if is_sub_array {
                Value::Array(self.items(depth + 1)?)
            } else {
                self.element()?
            });
            self.skip_space();
            match self.next() {
                Some(b',') => {}
                Some(b'}') => return Ok(values),
                Some(_) => return Err(ArrayFault::Syntax("expected , or } after an element")),
                None => return Err(ArrayFault::Syntax("ends before its closing }")),
            }
        }
    }

    fn element(&mut self) -> Result<Value, ArrayFault> {
        self.elements += 1;
        let mut raw = Vec::new();
        if self.eat(b'"') {
            loop {
                match self.next() {
                    Some(b'"') => break,
                    Some(b'\\') => match self.next() {
                        Some(byte) => raw.push(byte),
                        None => return Err(ArrayFault::Syntax("ends inside a quoted element")),
                    },
                    Some(byte) => raw.push(byte),
                    None => return Err(ArrayFault::Syntax("ends inside a quoted element")),
                }
            }
        } else {
            let mut escaped = false;
            // Length of `raw` through its last escaped or non-space byte: trailing white
            // space of an unquoted element is not part of it.
            let mut kept = 0;
            loop {
                match self.peek() {
                    Some(b',' | b'}') => break,
                    Some(b'"' | b'{') => {
                        return Err(ArrayFault::Syntax("unquoted element contains \" or {"))
                    }
                    Some(b'\\') => {
                        self.pos += 1;
                        match self.next() {
                            Some(byte) => raw.push(byte),
                            None => return Err(ArrayFault::Syntax("ends after a backslash")),
                        }
                        escaped = true;
                        kept = raw.len();
                    }
                    Some(byte) => {
                        self.pos += 1;
                        raw.push(byte);
                        if !is_array_space(byte) {
                            kept = raw.len();
                        }
                    }
                    None => return Err(ArrayFault::Syntax("ends before its closing }")),
                }
            }
            raw.truncate(kept);
            if raw.is_empty() {
                return Err(ArrayFault::Syntax("empty unquoted element"));
            }
            if !escaped && raw.eq_ignore_ascii_case(b"NULL") {
                return Ok(Value::Null);
            }
        }
        // Only ASCII bytes were removed from valid UTF-8, so this cannot fail; still no panic.
        let text =
            String::from_utf8(raw).map_err(|_| ArrayFault::Syntax("element is not valid UTF-8"))?;
        parse_text(self.element, &text).map_err(|source| ArrayFault::Element {
            index: self.elements,
            source,
        })
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let byte = self.peek()?;
        self.pos += 1;
        Some(byte)
    }

    fn eat(&mut self, byte: u8) -> bool {
        let matched = self.peek() == Some(byte);
        if matched {
            self.pos += 1;
        }
        matched
    }

    fn skip_space(&mut self) {
        while self.peek().is_some_and(is_array_space) {
            self.pos += 1;
        }
    }
}

/// White space as `array_in` and `array_out` see it (`scanner_isspace`).
fn is_array_space(byte: u8) -> bool {
    matches!(byte, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

/// PostgreSQL's name of a value type, for messages.
fn type_name(value_type: &ValueType) -> String {
    let name = match value_type {
        ValueType::Bool => "bool",
        ValueType::Int2 => "int2",
        ValueType::Int4 => "int4",
        ValueType::Int8 => "int8",
        ValueType::Float4 => "float4",
        ValueType::Float8 => "float8",
        ValueType::Numeric => "numeric",
        ValueType::Text => "text",
        ValueType::Bytea => "bytea",
        ValueType::Date => "date",
        ValueType::Time => "time",
        ValueType::TimeTz => "timetz",
        ValueType::Timestamp => "timestamp",
        ValueType::TimestampTz => "timestamptz",
        ValueType::Interval => "interval",
        ValueType::Uuid => "uuid",
        ValueType::Json => "json",
        ValueType::Jsonb => "jsonb",
        ValueType::Array(element) => return format!("{}[]", type_name(element)),
        ValueType::Other => "other",
    };
    name.to_owned()
}

/// The first 64 characters of `text`, marked with `…` when cut.
fn excerpt(text: &str) -> String {
    match text.char_indices().nth(EXCERPT_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use chrono::Datelike;
    use proptest::prelude::*;

    /// 4714-11-24 00:00:00 BC, PostgreSQL's earliest timestamp (Julian day 0).
    const PG_MIN_TIMESTAMP: i64 = -210_866_803_200_000_000;
    /// PostgreSQL's earliest and latest dates as days since 1970.
    const PG_MIN_DATE: i32 = -2_440_588;
    const PG_MAX_DATE: i32 = 2_145_042_905;

    fn parse(value_type: &ValueType, text: &str) -> Value {
        match parse_text(value_type, text) {
            Ok(value) => value,
            Err(error) => panic!("{text:?} as {value_type:?}: {error}"),
        }
    }

    fn parse_err(value_type: &ValueType, text: &str) -> TypeError {
        match parse_text(value_type, text) {
            Ok(value) => panic!("{text:?} as {value_type:?} parsed to {value:?}"),
            Err(error) => error,
        }
    }

    fn is_invalid(value_type: &ValueType, text: &str) -> bool {
        matches!(parse_text(value_type, text), Err(TypeError::Invalid { .. }))
    }

    fn is_out_of_range(value_type: &ValueType, text: &str) -> bool {
        matches!(
            parse_text(value_type, text),
            Err(TypeError::OutOfRange { .. })
        )
    }

    fn array(element: ValueType) -> ValueType {
        ValueType::Array(Box::new(element))
    }

    fn text(s: &str) -> Value {
        Value::Text(s.to_owned())
    }

    fn ints(values: &[i64]) -> Value {
        Value::Array(values.iter().map(|v| Value::Int(*v)).collect())
    }

    /// Inverse of `days_from_civil`, written independently of it (Howard Hinnant's
    /// `civil_from_days`): astronomical year, month, day.
    fn civil_from_days(days: i64) -> (i64, i64, i64) {
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let day_of_era = z - era * 146_097;
        let year_of_era =
            (day_of_era - day_of_era / 1460 + day_of_era / 36524 - day_of_era / 146_096) / 365;
        let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
        let mp = (5 * day_of_year + 2) / 153;
        let day = day_of_year - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = year_of_era + era * 400 + i64::from(month <= 2);
        (year, month, day)
    }

    /// A date as PostgreSQL prints it with DateStyle=ISO: the year padded to 4 digits and
    /// the era as a ` BC` suffix, returned separately because it goes last.
    fn pg_date(year: i64, month: i64, day: i64) -> (String, &'static str) {
        let (year, era) = if year <= 0 {
            (1 - year, " BC")
        } else {
            (year, "")
        };
        (format!("{year:04}-{month:02}-{day:02}"), era)
    }

    /// `HH:MM:SS[.f]` with trailing zeros of the fraction trimmed, as PostgreSQL prints it.
    fn pg_time(micros: i64) -> String {
        let seconds = micros / 1_000_000;
        let fraction = micros % 1_000_000;
        let mut out = format!(
            "{:02}:{:02}:{:02}",
            seconds / 3600,
            seconds / 60 % 60,
            seconds % 60
        );
        if fraction != 0 {
            out.push('.');
            out.push_str(format!("{fraction:06}").trim_end_matches('0'));
        }
        out
    }

    /// `+HH`, `+HH:MM` or `+HH:MM:SS`, as PostgreSQL prints a UTC offset in seconds.
    fn pg_offset(offset_seconds: i64) -> String {
        let sign = if offset_seconds < 0 { '-' } else { '+' };
        let abs = offset_seconds.abs();
        let (hours, minutes, seconds) = (abs / 3600, abs / 60 % 60, abs % 60);
        match (minutes, seconds) {
            (0, 0) => format!("{sign}{hours:02}"),
            (_, 0) => format!("{sign}{hours:02}:{minutes:02}"),
            _ => format!("{sign}{hours:02}:{minutes:02}:{seconds:02}"),
        }
    }

    /// A timestamp as PostgreSQL prints it, with the offset when given: `utc_micros` shown in
    /// the zone `offset_seconds` east of UTC.
    fn pg_timestamp(utc_micros: i64, offset_seconds: Option<i64>) -> Option<String> {
        let local = utc_micros.checked_add(offset_seconds.unwrap_or(0) * 1_000_000)?;
        let (year, month, day) = civil_from_days(local.div_euclid(MICROS_PER_DAY));
        let (date, era) = pg_date(year, month, day);
        let time = pg_time(local.rem_euclid(MICROS_PER_DAY));
        let offset = offset_seconds.map(pg_offset).unwrap_or_default();
        Some(format!("{date} {time}{offset}{era}"))
    }

    /// An interval as PostgreSQL's `EncodeInterval` prints it with IntervalStyle=iso_8601.
    fn pg_interval(months: i32, days: i32, micros: i64) -> String {
        let (year, month) = (months / 12, months % 12);
        let hour = micros / MICROS_PER_HOUR;
        let minute = micros % MICROS_PER_HOUR / MICROS_PER_MINUTE;
        let second = micros % MICROS_PER_MINUTE / MICROS_PER_SECOND;
        let fraction = micros % MICROS_PER_SECOND;
        if year == 0 && month == 0 && days == 0 && micros == 0 {
            return "PT0S".to_owned();
        }
        let mut out = String::from("P");
        let mut part = |value: i64, designator: char| {
            if value != 0 {
                out.push_str(&format!("{value}{designator}"));
            }
        };
        part(year.into(), 'Y');
        part(month.into(), 'M');
        part(days.into(), 'D');
        if micros != 0 {
            out.push('T');
        }
        let mut part = |value: i64, designator: char| {
            if value != 0 {
                out.push_str(&format!("{value}{designator}"));
            }
        };
        part(hour, 'H');
        part(minute, 'M');
        if second != 0 || fraction != 0 {
            if second < 0 || fraction < 0 {
                out.push('-');
            }
            out.push_str(&second.abs().to_string());
            if fraction != 0 {
                out.push('.');
                out.push_str(format!("{:06}", fraction.abs()).trim_end_matches('0'));
            }
            out.push('S');
        }
        out
    }

    /// One element as `array_out` writes it.
    fn pg_array_element(element: Option<&str>) -> String {
        let Some(element) = element else {
            return "NULL".to_owned();
        };
        let needs_quotes = element.is_empty()
            || element.eq_ignore_ascii_case("NULL")
            || element
                .bytes()
                .any(|b| matches!(b, b'"' | b'\\' | b'{' | b'}' | b',') || is_array_space(b));
        if !needs_quotes {
            return element.to_owned();
        }
        let mut out = String::from("\"");
        for c in element.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
        out
    }

    fn pg_array(elements: &[Option<String>]) -> String {
        let items: Vec<String> = elements
            .iter()
            .map(|e| pg_array_element(e.as_deref()))
            .collect();
        format!("{{{}}}", items.join(","))
    }

    fn text_values(elements: &[Option<String>]) -> Value {
        Value::Array(
            elements
                .iter()
                .map(|e| e.as_ref().map_or(Value::Null, |s| Value::Text(s.clone())))
                .collect(),
        )
    }

    fn all_value_types() -> Vec<ValueType> {
        let scalars = ValueType::SCALARS.to_vec();
        let arrays: Vec<ValueType> = scalars.iter().cloned().map(array).collect();
        let mut all = scalars;
        all.extend(arrays);
        all.push(array(array(ValueType::Int4)));
        all
    }

    #[test]
    fn builtin_scalar_oids_map_to_their_value_types() {
        let expected = [
            (16, ValueType::Bool),
            (21, ValueType::Int2),
            (23, ValueType::Int4),
            (20, ValueType::Int8),
            (26, ValueType::Int8),
            (700, ValueType::Float4),
            (701, ValueType::Float8),
            (1700, ValueType::Numeric),
            (790, ValueType::Other),
            (25, ValueType::Text),
            (1043, ValueType::Text),
            (1042, ValueType::Text),
            (19, ValueType::Text),
            (18, ValueType::Text),
            (17, ValueType::Bytea),
            (1082, ValueType::Date),
            (1083, ValueType::Time),
            (1266, ValueType::TimeTz),
            (1114, ValueType::Timestamp),
            (1184, ValueType::TimestampTz),
            (1186, ValueType::Interval),
            (2950, ValueType::Uuid),
            (114, ValueType::Json),
            (3802, ValueType::Jsonb),
            (142, ValueType::Text),
        ];
        for (oid, value_type) in expected {
            assert_eq!(builtin_value_type(oid), Some(value_type), "oid {oid}");
        }
    }

    #[test]
    fn builtin_array_oids_map_to_arrays_of_their_element() {
        let expected = [
            (1000, ValueType::Bool),
            (1005, ValueType::Int2),
            (1007, ValueType::Int4),
            (1016, ValueType::Int8),
            (1028, ValueType::Int8),
            (1021, ValueType::Float4),
            (1022, ValueType::Float8),
            (1231, ValueType::Numeric),
            (791, ValueType::Other),
            (1009, ValueType::Text),
            (1015, ValueType::Text),
            (1014, ValueType::Text),
            (1003, ValueType::Text),
            (1002, ValueType::Text),
            (1001, ValueType::Bytea),
            (1182, ValueType::Date),
            (1183, ValueType::Time),
            (1270, ValueType::TimeTz),
            (1115, ValueType::Timestamp),
            (1185, ValueType::TimestampTz),
            (1187, ValueType::Interval),
            (2951, ValueType::Uuid),
            (199, ValueType::Json),
            (3807, ValueType::Jsonb),
            (143, ValueType::Text),
        ];
        for (oid, element) in expected {
            assert_eq!(builtin_value_type(oid), Some(array(element)), "oid {oid}");
        }
    }

    #[test]
    fn unknown_oids_are_left_to_the_catalog() {
        // point, inet, int4range, a typical user type OID, and the invalid OID 0.
        for oid in [0, 600, 869, 3904, 16_384, u32::MAX] {
            assert_eq!(builtin_value_type(oid), None, "oid {oid}");
        }
    }

    #[test]
    fn catalog_resolves_domains_enums_and_arrays() {
        assert_eq!(
            value_type_from_catalog('d', 'N', None, Some(ValueType::Int4)),
            ValueType::Int4
        );
        assert_eq!(
            value_type_from_catalog('d', 'A', None, Some(array(ValueType::Text))),
            array(ValueType::Text)
        );
        assert_eq!(
            value_type_from_catalog('d', 'N', None, None),
            ValueType::Other
        );
        assert_eq!(
            value_type_from_catalog('e', 'E', None, None),
            ValueType::Text
        );
        assert_eq!(
            value_type_from_catalog('b', 'A', Some(ValueType::Text), None),
            array(ValueType::Text)
        );
        assert_eq!(
            value_type_from_catalog('b', 'A', None, None),
            ValueType::Other
        );
        assert_eq!(
            value_type_from_catalog('c', 'C', None, None),
            ValueType::Other
        );
        assert_eq!(
            value_type_from_catalog('r', 'R', None, None),
            ValueType::Other
        );
        assert_eq!(
            value_type_from_catalog('b', 'S', None, None),
            ValueType::Other
        );
    }

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
    fn dates_count_days_from_1970() {
        let date = |s| parse(&ValueType::Date, s);
        assert_eq!(date("1970-01-01"), Value::Date(0));
        assert_eq!(date("1970-01-02"), Value::Date(1));
        assert_eq!(date("1969-12-31"), Value::Date(-1));
        assert_eq!(date("2000-01-01"), Value::Date(10_957));
        assert_eq!(date("2024-01-05"), Value::Date(19_727));
        assert_eq!(date("2024-02-29"), Value::Date(19_782));
        assert_eq!(date("10000-01-01"), Value::Date(2_932_897));
    }

    #[test]
    fn bc_dates_use_proleptic_gregorian_with_1_bc_as_a_leap_year() {
        // Expected values from PostgreSQL 15: `'…'::date - '1970-01-01'::date`.
        let date = |s| parse(&ValueType::Date, s);
        assert_eq!(date("0044-03-15 BC"), Value::Date(-735_160));
        assert_eq!(date("0001-01-01 BC"), Value::Date(-719_528));
        assert_eq!(date("0001-12-31 BC"), Value::Date(-719_163));
        assert_eq!(date("0001-01-01"), Value::Date(-719_162));
        assert_eq!(date("0001-02-29 BC"), Value::Date(-719_469));
        assert_eq!(date("0005-02-29 BC"), Value::Date(-720_930));
        assert_eq!(date("4714-11-24 BC"), Value::Date(PG_MIN_DATE));
        assert_eq!(date("5874897-12-31"), Value::Date(PG_MAX_DATE));
    }

    #[test]
    fn date_infinity_and_invalid_dates() {
        assert_eq!(parse(&ValueType::Date, "infinity"), Value::Date(i32::MAX));
        assert_eq!(parse(&ValueType::Date, "-infinity"), Value::Date(i32::MIN));
        for bad in [
            "2023-02-29",
            "2024-13-01",
            "2024-00-10",
            "2024-04-31",
            "2024-01-00",
            "0000-01-01",
            "2024-1-05",
            "2024-01-05 AD",
            "2024-01-05 BC ",
            "2024/01/05",
            "",
            "Infinity",
        ] {
            assert!(is_invalid(&ValueType::Date, bad), "{bad:?}");
        }
        // Well-formed, but not a 32-bit day count.
        assert!(is_out_of_range(&ValueType::Date, "999999999-01-01"));
        assert!(is_out_of_range(&ValueType::Date, "999999999-01-01 BC"));
    }

    #[test]
    fn times_count_micros_from_midnight() {
        let time = |s| parse(&ValueType::Time, s);
        assert_eq!(time("00:00:00"), Value::Time(0));
        assert_eq!(time("12:34:56"), Value::Time(45_296_000_000));
        assert_eq!(time("12:34:56.123456"), Value::Time(45_296_123_456));
        assert_eq!(time("12:34:56.5"), Value::Time(45_296_500_000));
        assert_eq!(time("12:34:56.000001"), Value::Time(45_296_000_001));
        assert_eq!(time("23:59:59.999999"), Value::Time(86_399_999_999));
        assert_eq!(time("24:00:00"), Value::Time(86_400_000_000));
        for bad in [
            "24:00:00.000001",
            "24:00:01",
            "25:00:00",
            "12:60:00",
            "12:00:60",
            "12:00",
            "12:00:00.",
            "12:00:00.1234567",
            "12:00:00+00",
            "1:00:00",
        ] {
            assert!(is_invalid(&ValueType::Time, bad), "{bad:?}");
        }
    }

    /// A timetz value from its local time of day in seconds plus microseconds and its offset
    /// in seconds east of UTC.
    fn timetz_value(seconds: i64, fraction: i64, offset_secs: i32) -> Value {
        Value::TimeTz {
            micros: seconds * MICROS_PER_SECOND + fraction,
            offset_secs,
        }
    }

    #[test]
    fn timetz_keeps_its_local_time_and_offset() {
        let timetz = |s| parse(&ValueType::TimeTz, s);
        let hms = |h: i64, m: i64, s: i64| h * 3600 + m * 60 + s;
        assert_eq!(
            timetz("12:34:56.789+05:30"),
            timetz_value(hms(12, 34, 56), 789_000, 19_800)
        );
        assert_eq!(
            timetz("12:34:56.789+05:30:15"),
            timetz_value(hms(12, 34, 56), 789_000, 19_815)
        );
        assert_eq!(timetz("12:00:00+00"), timetz_value(hms(12, 0, 0), 0, 0));
        assert_eq!(
            timetz("12:00:00-08"),
            timetz_value(hms(12, 0, 0), 0, -28_800)
        );
        assert_eq!(
            timetz("12:00:00.000001+05"),
            timetz_value(hms(12, 0, 0), 1, 18_000)
        );
        assert_eq!(
            timetz("12:00:00.100000+00"),
            timetz_value(hms(12, 0, 0), 100_000, 0)
        );
        assert_eq!(
            timetz("23:59:59.999999-14:59"),
            timetz_value(hms(23, 59, 59), 999_999, -(14 * 3600 + 59 * 60))
        );
        assert_eq!(
            timetz("00:00:00-15:59:59"),
            timetz_value(0, 0, -(15 * 3600 + 59 * 60 + 59))
        );
        // Equal instants in different zones stay different values, as in PostgreSQL.
        assert_ne!(timetz("12:00:00+01"), timetz("11:00:00+00"));
    }

    #[test]
    fn timetz_allows_end_of_day_and_rejects_malformed_text() {
        let timetz = |s| parse(&ValueType::TimeTz, s);
        assert_eq!(timetz("24:00:00-08"), timetz_value(24 * 3600, 0, -28_800));
        assert_eq!(timetz("24:00:00+00"), timetz_value(24 * 3600, 0, 0));
        for bad in [
            "12:00:00",
            "12:00:00+16",
            "12:00:00+05:60",
            "12:00:00+05:30:60",
            "12:00:00+5",
            "12:00:00Z",
            "24:00:00.000001+00",
            "12:00:00+05:30 ",
        ] {
            assert!(is_invalid(&ValueType::TimeTz, bad), "{bad:?}");
        }
    }

    #[test]
    fn timestamps_count_micros_from_1970() {
        let timestamp = |s| parse(&ValueType::Timestamp, s);
        assert_eq!(timestamp("1970-01-01 00:00:00"), Value::Timestamp(0));
        assert_eq!(
            timestamp("2024-01-05 12:34:56"),
            Value::Timestamp(1_704_458_096_000_000)
        );
        assert_eq!(
            timestamp("2024-01-05 12:34:56.5"),
            Value::Timestamp(1_704_458_096_500_000)
        );
        assert_eq!(
            timestamp("2024-01-05 12:34:56.000123"),
            Value::Timestamp(1_704_458_096_000_123)
        );
        assert_eq!(
            timestamp("1969-12-31 23:59:59.999999"),
            Value::Timestamp(-1)
        );
        assert_eq!(
            timestamp("0044-03-15 12:00:00 BC"),
            Value::Timestamp(-63_517_780_800_000_000)
        );
        assert_eq!(
            timestamp("4714-11-24 00:00:00 BC"),
            Value::Timestamp(PG_MIN_TIMESTAMP)
        );
        assert_eq!(timestamp("infinity"), Value::Timestamp(i64::MAX));
        assert_eq!(timestamp("-infinity"), Value::Timestamp(i64::MIN));
    }

    #[test]
    fn timestamps_beyond_64_bit_micros_are_out_of_range() {
        assert_eq!(
            parse(&ValueType::Timestamp, "294247-01-10 04:00:54.775806"),
            Value::Timestamp(i64::MAX - 1)
        );
        // i64::MAX itself is the infinity sentinel.
        assert!(is_out_of_range(
            &ValueType::Timestamp,
            "294247-01-10 04:00:54.775807"
        ));
        // PostgreSQL's latest timestamp is past what 64-bit micros since 1970 hold.
        assert!(is_out_of_range(
            &ValueType::Timestamp,
            "294276-12-31 23:59:59.999999"
        ));
        assert!(is_out_of_range(
            &ValueType::TimestampTz,
            "999999999-12-31 23:59:59+00"
        ));
        assert!(is_out_of_range(
            &ValueType::Timestamp,
            "999999999-12-31 23:59:59 BC"
        ));
    }

    #[test]
    fn malformed_timestamps_are_invalid() {
        for bad in [
            "2024-01-05T12:34:56",
            "2024-01-05 24:00:00",
            "2024-01-05 12:34",
            "2024-01-05",
            "2024-01-05 12:34:56+00",
            "2024-01-05 12:34:56 AD",
            "2024-02-30 00:00:00",
            "0000-01-01 00:00:00",
            "",
        ] {
            assert!(is_invalid(&ValueType::Timestamp, bad), "{bad:?}");
        }
        for bad in [
            "2024-01-05 12:34:56",
            "2024-01-05 12:34:56 BC+00",
            "2024-01-05 12:34:56 UTC",
            "2024-01-05 12:34:56+00:00:00:00",
        ] {
            assert!(is_invalid(&ValueType::TimestampTz, bad), "{bad:?}");
        }
    }

    #[test]
    fn timestamptz_applies_the_offset() {
        let timestamptz = |s| parse(&ValueType::TimestampTz, s);
        assert_eq!(
            timestamptz("2000-01-01 00:00:00+00"),
            Value::TimestampTz(946_684_800_000_000)
        );
        assert_eq!(
            timestamptz("2000-01-01 05:30:00+05:30"),
            Value::TimestampTz(946_684_800_000_000)
        );
        assert_eq!(
            timestamptz("2024-01-05 12:34:56.5-08"),
            Value::TimestampTz(1_704_486_896_500_000)
        );
        // A local mean time offset, as PostgreSQL prints 1900 in Europe/Amsterdam.
        assert_eq!(
            timestamptz("1900-01-01 00:00:00+00:19:32"),
            Value::TimestampTz(-2_208_989_972_000_000)
        );
        // The era follows the offset.
        assert_eq!(
            timestamptz("0044-03-15 12:00:00+00 BC"),
            Value::TimestampTz(-63_517_780_800_000_000)
        );
        assert_eq!(timestamptz("infinity"), Value::TimestampTz(i64::MAX));
        assert_eq!(timestamptz("-infinity"), Value::TimestampTz(i64::MIN));
    }

    #[test]
    fn intervals_in_iso_8601() {
        let interval = |s| parse(&ValueType::Interval, s);
        let expect = |months, days, micros| Value::Interval {
            months,
            days,
            micros,
        };
        assert_eq!(
            interval("P1Y2M3DT4H5M6.789S"),
            expect(14, 3, 14_706_789_000)
        );
        assert_eq!(interval("PT0S"), expect(0, 0, 0));
        assert_eq!(interval("P1D"), expect(0, 1, 0));
        assert_eq!(interval("PT55M"), expect(0, 0, 3_300_000_000));
        assert_eq!(interval("P-7M"), expect(-7, 0, 0));
        assert_eq!(
            interval("P-1Y-2M3DT-4H-5M-6.5S"),
            expect(-14, 3, -14_706_500_000)
        );
        assert_eq!(interval("PT-0.000001S"), expect(0, 0, -1));
        assert_eq!(interval("PT0.5S"), expect(0, 0, 500_000));
        assert_eq!(interval("PT2562047788H54.775807S"), expect(0, 0, i64::MAX));
        assert_eq!(
            interval("PT-2562047788H-54.775808S"),
            expect(0, 0, i64::MIN)
        );
        assert_eq!(
            interval("P-178956970Y-8M-2147483648D"),
            expect(i32::MIN, i32::MIN, 0)
        );
        assert_eq!(interval("infinity"), expect(i32::MAX, i32::MAX, i64::MAX));
        assert_eq!(interval("-infinity"), expect(i32::MIN, i32::MIN, i64::MIN));
    }

    #[test]
    fn malformed_intervals_are_invalid() {
        for bad in [
            "1 day",
            "@ 1 day",
            "",
            "P",
            "PT",
            "P1DT",
            "P1H",
            "PT1Y",
            "PT1D",
            "P1M1Y",
            "P1Y1Y",
            "PT1S1M",
            "P1.5Y",
            "PT1.5H",
            "PT1.1234567S",
            "PT1.S",
            "P-Y",
            "P1Y ",
            "P1",
            "PT1H2",
        ] {
            assert!(is_invalid(&ValueType::Interval, bad), "{bad:?}");
        }
        assert!(is_out_of_range(&ValueType::Interval, "P178956971Y"));
        assert!(is_out_of_range(&ValueType::Interval, "P2147483648D"));
        assert!(is_out_of_range(&ValueType::Interval, "PT2562047788H55S"));
        assert!(is_out_of_range(
            &ValueType::Interval,
            "PT9999999999999999999H"
        ));
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

    #[test]
    fn arrays_with_quoting_escapes_and_nulls() {
        assert_eq!(
            parse(&array(ValueType::Text), r#"{a,b,"c d",NULL,"e\"f"}"#),
            Value::Array(vec![
                text("a"),
                text("b"),
                text("c d"),
                Value::Null,
                text("e\"f")
            ])
        );
        // As PostgreSQL prints ARRAY['NULL','null','',' x','a\b','é,','{}'].
        assert_eq!(
            parse(
                &array(ValueType::Text),
                r#"{"NULL","null",""," x","a\\b","é,","{}"}"#
            ),
            Value::Array(vec![
                text("NULL"),
                text("null"),
                text(""),
                text(" x"),
                text("a\\b"),
                text("é,"),
                text("{}"),
            ])
        );
        assert_eq!(
            parse(&array(ValueType::Int4), "{1,NULL,null,3}"),
            Value::Array(vec![Value::Int(1), Value::Null, Value::Null, Value::Int(3)])
        );
        assert_eq!(
            parse(&array(ValueType::Text), r#"{\NULL}"#),
            Value::Array(vec![text("NULL")])
        );
    }

    #[test]
    fn arrays_empty_nested_and_with_bounds() {
        assert_eq!(parse(&array(ValueType::Int4), "{}"), Value::Array(vec![]));
        assert_eq!(
            parse(&array(ValueType::Int4), "{{1,2},{3,4}}"),
            Value::Array(vec![ints(&[1, 2]), ints(&[3, 4])])
        );
        assert_eq!(parse(&array(ValueType::Int4), "[0:1]={1,2}"), ints(&[1, 2]));
        assert_eq!(
            parse(&array(ValueType::Int4), "[0:1][-2:-1]={{1,2},{3,4}}"),
            Value::Array(vec![ints(&[1, 2]), ints(&[3, 4])])
        );
        // Arrays of arrays do not exist in PostgreSQL; dimensions are one array type.
        assert_eq!(
            parse(&array(array(ValueType::Int4)), "{{1,2},{3,4}}"),
            Value::Array(vec![ints(&[1, 2]), ints(&[3, 4])])
        );
        let six_deep = "{{{{{{1}}}}}}";
        assert!(parse_text(&array(ValueType::Int4), six_deep).is_ok());
        assert!(is_invalid(&array(ValueType::Int4), "{{{{{{{1}}}}}}}"));
        // Deep nesting is an error, not a stack overflow.
        assert!(is_invalid(&array(ValueType::Int4), &"{".repeat(100_000)));
    }

    #[test]
    fn arrays_allow_white_space_around_elements() {
        assert_eq!(
            parse(&array(ValueType::Text), r#"{" a ",b  ,  c}"#),
            Value::Array(vec![text(" a "), text("b"), text("c")])
        );
        assert_eq!(
            parse(&array(ValueType::Text), " { a b , \"c\" } "),
            Value::Array(vec![text("a b"), text("c")])
        );
        assert_eq!(
            parse(&array(ValueType::Text), r#"{a\ ,b\,c}"#),
            Value::Array(vec![text("a "), text("b,c")])
        );
        assert_eq!(
            parse(&array(ValueType::Int4), "{{1, 2}, {3, 4}}"),
            Value::Array(vec![ints(&[1, 2]), ints(&[3, 4])])
        );
    }

    #[test]
    fn array_elements_use_the_element_type() {
        assert_eq!(
            parse(&array(ValueType::Bytea), r#"{"\\x0102","\\x61625c",NULL}"#),
            Value::Array(vec![
                Value::Bytes(vec![1, 2]),
                Value::Bytes(b"ab\\".to_vec()),
                Value::Null
            ])
        );
        assert_eq!(
            parse(&array(ValueType::Bytea), r#"{"\\000\\\\"}"#),
            Value::Array(vec![Value::Bytes(vec![0, b'\\'])])
        );
        assert_eq!(
            parse(&array(ValueType::Json), r#"{"{\"a\": [1, \"x\"]}"}"#),
            Value::Array(vec![Value::Json(r#"{"a": [1, "x"]}"#.to_owned())])
        );
        match parse(&array(ValueType::Float4), "{1.5,NaN,-Infinity,0.1}") {
            Value::Array(values) => {
                assert_eq!(values.len(), 4);
                assert_eq!(values[0], Value::Float(1.5));
                assert!(matches!(values[1], Value::Float(f) if f.is_nan()));
                assert_eq!(values[2], Value::Float(f64::NEG_INFINITY));
                assert_eq!(values[3], Value::Float(0.1));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse(
                &array(ValueType::TimestampTz),
                r#"{"2000-01-01 00:00:00+00"}"#
            ),
            Value::Array(vec![Value::TimestampTz(946_684_800_000_000)])
        );
        assert_eq!(
            parse(&array(ValueType::TimeTz), "{12:00:00+01}"),
            Value::Array(vec![Value::TimeTz {
                micros: 12 * MICROS_PER_HOUR,
                offset_secs: 3600
            }])
        );
        assert_eq!(
            parse(&array(ValueType::Interval), "{P1D,PT0S}"),
            Value::Array(vec![
                Value::Interval {
                    months: 0,
                    days: 1,
                    micros: 0
                },
                Value::Interval {
                    months: 0,
                    days: 0,
                    micros: 0
                }
            ])
        );
        assert_eq!(
            parse(&array(ValueType::Numeric), "{1.50,NaN}"),
            Value::Array(vec![
                Value::Numeric("1.50".to_owned()),
                Value::Numeric("NaN".to_owned())
            ])
        );
    }

    #[test]
    fn arrays_of_other_types_keep_the_whole_literal() {
        let boxes = "{(3,4),(1,2);(7,8),(5,6)}";
        assert_eq!(parse(&array(ValueType::Other), boxes), text(boxes));
        assert_eq!(parse(&array(ValueType::Other), "{$1.00}"), text("{$1.00}"));
    }

    #[test]
    fn malformed_arrays_are_invalid() {
        for bad in [
            "",
            "1,2",
            "{1,2",
            "{1,2}x",
            "{1,,2}",
            "{,}",
            "{1,{2}}",
            "{{1},2}",
            "{\"a}",
            "{\"a\"b}",
            "{a\"b}",
            "{a{b}",
            "{a\\",
            "[1:2]{1,2}",
            "[1:x]={1,2}",
            "[1:2={1,2}",
            "}",
        ] {
            assert!(is_invalid(&array(ValueType::Text), bad), "{bad:?}");
        }
    }

    #[test]
    fn a_bad_array_element_names_its_position() {
        let error = parse_err(&array(ValueType::Int4), "{1,x,3}");
        match &error {
            TypeError::Element { index, source, .. } => {
                assert_eq!(*index, 2);
                assert!(matches!(**source, TypeError::Invalid { .. }));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            error.to_string(),
            r#"invalid int4[] value "{1,x,3}": element 2"#
        );
        let source = std::error::Error::source(&error).map(ToString::to_string);
        assert_eq!(
            source.as_deref(),
            Some(r#"invalid int4 value "x": not an integer"#)
        );
        let nested = parse_err(&array(ValueType::Int2), "{{1,2},{3,99999}}");
        assert!(matches!(
            nested,
            TypeError::Element { index: 4, ref source, .. }
                if matches!(**source, TypeError::OutOfRange { .. })
        ));
    }

    #[test]
    fn errors_name_the_type_and_a_bounded_excerpt() {
        assert_eq!(
            parse_err(&ValueType::Date, "2023-02-29").to_string(),
            r#"invalid date value "2023-02-29": day out of range for the month"#
        );
        assert_eq!(
            parse_err(&ValueType::Int2, "40000").to_string(),
            r#"int2 value "40000" is out of range: does not fit the type"#
        );
        let long = "é".repeat(1000);
        match parse_err(&ValueType::Int4, &long) {
            TypeError::Invalid { text, .. } => {
                assert_eq!(text, format!("{}…", "é".repeat(64)));
            }
            other => panic!("{other:?}"),
        }
        let message = parse_err(&array(ValueType::Uuid), &format!("{{{long}}}")).to_string();
        assert!(message.chars().count() < 120, "{message}");
    }

    #[test]
    fn days_from_civil_agrees_with_chrono_at_the_edges() {
        for (year, month, day) in [
            (1970, 1, 1),
            (2000, 2, 29),
            (-262_143, 1, 1),
            (262_142, 12, 31),
            (0, 2, 29),
        ] {
            let Some(date) = chrono::NaiveDate::from_ymd_opt(year, month, day) else {
                panic!("chrono rejects {year}-{month}-{day}");
            };
            assert_eq!(
                days_from_civil(year.into(), month.into(), day.into()),
                i64::from(date.num_days_from_ce()) - 719_163,
                "{year}-{month}-{day}"
            );
        }
    }

    proptest! {
        #[test]
        fn timestamps_round_trip_through_postgres_text(
            micros in PG_MIN_TIMESTAMP..i64::MAX,
        ) {
            let Some(printed) = pg_timestamp(micros, None) else {
                return Err(TestCaseError::reject("unprintable"));
            };
            prop_assert_eq!(parse(&ValueType::Timestamp, &printed), Value::Timestamp(micros));
        }

        #[test]
        fn timestamptz_round_trips_in_any_zone(
            micros in PG_MIN_TIMESTAMP..i64::MAX - 16 * MICROS_PER_HOUR,
            offset_seconds in -(15 * 3600 + 59 * 60 + 59)..=(15 * 3600 + 59 * 60 + 59_i64),
        ) {
            let Some(printed) = pg_timestamp(micros, Some(offset_seconds)) else {
                return Err(TestCaseError::reject("unprintable"));
            };
            prop_assert_eq!(parse(&ValueType::TimestampTz, &printed), Value::TimestampTz(micros));
        }

        #[test]
        fn dates_round_trip_over_postgres_range(days in PG_MIN_DATE..=PG_MAX_DATE) {
            let (year, month, day) = civil_from_days(days.into());
            let (date, era) = pg_date(year, month, day);
            prop_assert_eq!(parse(&ValueType::Date, &format!("{date}{era}")), Value::Date(days));
        }

        #[test]
        fn dates_agree_with_chrono(days in -95_000_000..95_000_000_i32) {
            let Some(date) = chrono::NaiveDate::from_num_days_from_ce_opt(days + 719_163) else {
                return Err(TestCaseError::reject("beyond chrono"));
            };
            let (printed, era) = pg_date(date.year().into(), date.month().into(), date.day().into());
            prop_assert_eq!(parse(&ValueType::Date, &format!("{printed}{era}")), Value::Date(days));
        }

        #[test]
        fn times_round_trip(micros in 0..=MICROS_PER_DAY) {
            prop_assert_eq!(parse(&ValueType::Time, &pg_time(micros)), Value::Time(micros));
        }

        #[test]
        fn timetz_round_trips_through_postgres_text(
            local in 0..=MICROS_PER_DAY,
            offset_secs in -(15 * 3600 + 59 * 60 + 59)..=(15 * 3600 + 59 * 60 + 59_i32),
        ) {
            let printed = format!("{}{}", pg_time(local), pg_offset(offset_secs.into()));
            prop_assert_eq!(
                parse(&ValueType::TimeTz, &printed),
                Value::TimeTz { micros: local, offset_secs }
            );
        }

        #[test]
        fn intervals_round_trip(months in any::<i32>(), days in any::<i32>(), micros in any::<i64>()) {
            prop_assert_eq!(
                parse(&ValueType::Interval, &pg_interval(months, days, micros)),
                Value::Interval { months, days, micros }
            );
        }

        #[test]
        fn text_arrays_round_trip(
            elements in prop::collection::vec(
                prop::option::of(prop_oneof![
                    "[a-zA-Z0-9 \"\\\\,{}\t\né€\\[\\]:=]{0,8}",
                    Just("NULL".to_owned()),
                    Just("null".to_owned()),
                    Just(String::new()),
                ]),
                0..8,
            ),
        ) {
            let literal = pg_array(&elements);
            prop_assert_eq!(parse(&array(ValueType::Text), &literal), text_values(&elements));
        }

        #[test]
        fn two_dimensional_text_arrays_round_trip(
            rows in (1..4_usize).prop_flat_map(|width| prop::collection::vec(
                prop::collection::vec(
                    prop::option::of("[a-z \"\\\\,{}NUL]{0,6}"),
                    width,
                ),
                1..4,
            )),
        ) {
            let literal = format!(
                "{{{}}}",
                rows.iter().map(|row| pg_array(row)).collect::<Vec<_>>().join(",")
            );
            let expected = Value::Array(rows.iter().map(|row| text_values(row)).collect());
            prop_assert_eq!(parse(&array(ValueType::Text), &literal), expected);
        }

        #[test]
        fn parse_text_never_panics_on_arbitrary_text(input in any::<String>()) {
            for value_type in all_value_types() {
                let _ = parse_text(&value_type, &input);
            }
        }

        #[test]
        fn parse_text_never_panics_on_near_miss_text(
            input in "[-+0-9:. TPYMDHSBCinftyNaUL{}\\[\\]=\",\\\\xé]{0,40}",
        ) {
            for value_type in all_value_types() {
                let _ = parse_text(&value_type, &input);
            }
        }
    }
}
