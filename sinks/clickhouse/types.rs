//! ClickHouse column types for source columns, and values in ClickHouse's RowBinary format.
//!
//! The mapping keeps every value exact: integers and floats as their own widths,
//! `numeric(p,s)` with p ≤ 38 as `Decimal(p,s)` (wider or unconstrained numeric as its decimal
//! text), dates as `Date32`, timestamps as `DateTime64(6, 'UTC')`, uuid as `UUID`, arrays as
//! `Array(Nullable(…))`, user-defined types (enums) as `LowCardinality(String)`, and
//! everything ClickHouse has no exact type for (time, timetz, interval, json, bytea, network
//! and geometric types) as `String` holding PostgreSQL's text of the value (bytea: its bytes).
//! Columns outside the primary key are `Nullable`, except arrays (ClickHouse has no nullable
//! arrays: a NULL array is stored as an empty one).
//!
//! A value the ClickHouse type cannot hold (a date outside 1900–2299, a numeric with more
//! digits than its column, `NaN` in a decimal column) is an [`EncodeError`], which the sink
//! dead-letters; it never writes a different value.

use crate::event::{Column, Value, ValueType};
use crate::pgtext::copy_text::value_text;

/// PostgreSQL's first OID of a user-defined type.
const FIRST_USER_OID: u32 = 16384;
/// The widest decimal kept as `Decimal`: its values fit an i128.
const MAX_DECIMAL_PRECISION: u32 = 38;
/// Date32's and DateTime64's range: 1900-01-01 to 2299-12-31, in days since 1970-01-01.
const FIRST_DAY: i64 = -25_567;
const LAST_DAY: i64 = 120_529;
const MICROS_PER_DAY: i64 = 86_400_000_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChType {
    Bool,
    Int16,
    Int32,
    Int64,
    UInt8,
    UInt64,
    Float32,
    Float64,
    Decimal {
        precision: u32,
        scale: u32,
    },
    String,
    /// `LowCardinality(String)`: RowBinary writes it as a String.
    Label,
    Date32,
    DateTime64,
    Uuid,
    Array(Box<ChType>),
    Nullable(Box<ChType>),
}

impl ChType {
    /// The type of a source column: `key` columns are never Nullable.
    pub fn of_column(column: &Column, key: bool) -> ChType {
        let base = ChType::of_value_type(&column.value_type, column.type_oid, column.type_modifier);
        if key || matches!(base, ChType::Array(_)) {
            base
        } else {
            ChType::Nullable(Box::new(base))
        }
    }

    fn of_value_type(value_type: &ValueType, type_oid: u32, modifier: i32) -> ChType {
        match value_type {
            ValueType::Bool => ChType::Bool,
            ValueType::Int2 => ChType::Int16,
            ValueType::Int4 => ChType::Int32,
            ValueType::Int8 => ChType::Int64,
            ValueType::Float4 => ChType::Float32,
            ValueType::Float8 => ChType::Float64,
            ValueType::Numeric => match numeric_modifier(modifier) {
                Some((precision, scale)) if precision <= MAX_DECIMAL_PRECISION => {
                    ChType::Decimal { precision, scale }
                }
                _ => ChType::String,
            },
            ValueType::Date => ChType::Date32,
            ValueType::Timestamp | ValueType::TimestampTz => ChType::DateTime64,
            ValueType::Uuid => ChType::Uuid,
            ValueType::Array(element) => ChType::Array(Box::new(ChType::Nullable(Box::new(
                ChType::of_value_type(element, 0, -1),
            )))),
            // Enums (which capture reads as text) and other types of the database's own.
            ValueType::Text | ValueType::Other if type_oid >= FIRST_USER_OID => ChType::Label,
            ValueType::Text
            | ValueType::Bytea
            | ValueType::Time
            | ValueType::TimeTz
            | ValueType::Interval
            | ValueType::Json
            | ValueType::Jsonb
            | ValueType::Other => ChType::String,
        }
    }

    /// The type as a `CREATE TABLE` names it.
    pub fn name(&self) -> String {
        match self {
            ChType::Bool => "Bool".into(),
            ChType::Int16 => "Int16".into(),
            ChType::Int32 => "Int32".into(),
            ChType::Int64 => "Int64".into(),
            ChType::UInt8 => "UInt8".into(),
            ChType::UInt64 => "UInt64".into(),
            ChType::Float32 => "Float32".into(),
            ChType::Float64 => "Float64".into(),
            ChType::Decimal { precision, scale } => format!("Decimal({precision}, {scale})"),
            ChType::String => "String".into(),
            ChType::Label => "LowCardinality(String)".into(),
            ChType::Date32 => "Date32".into(),
            ChType::DateTime64 => "DateTime64(6, 'UTC')".into(),
            ChType::Uuid => "UUID".into(),
            ChType::Array(element) => format!("Array({})", element.name()),
            ChType::Nullable(inner) => match **inner {
                ChType::Label => "LowCardinality(Nullable(String))".into(),
                ref inner => format!("Nullable({})", inner.name()),
            },
        }
    }
}

/// `numeric(p,s)`'s precision and scale from PostgreSQL's type modifier (-1: unconstrained).
fn numeric_modifier(modifier: i32) -> Option<(u32, u32)> {
    let packed = u32::try_from(modifier.checked_sub(4)?).ok()?;
    Some((packed >> 16, packed & 0xFFFF))
}

/// Why a value cannot be written to its ClickHouse column.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct EncodeError(String);

/// Appends `value` as RowBinary of `ty`.
pub fn encode(out: &mut Vec<u8>, ty: &ChType, value: &Value) -> Result<(), EncodeError> {
    let mismatch = || {
        EncodeError(format!(
            "a {} value cannot be written to a {} column",
            variant_name(value),
            ty.name()
        ))
    };
    match (ty, value) {
        (ChType::Nullable(_), Value::Null | Value::UnchangedToast) => out.push(1),
        (ChType::Nullable(inner), value) => {
            out.push(0);
            encode(out, inner, value)?;
        }
        (ChType::Array(_), Value::Null) => out.push(0),
        (ChType::Array(element), Value::Array(items)) => {
            write_varint(out, items.len() as u64);
            for item in items {
                encode(out, element, item)?;
            }
        }
        (_, Value::Null | Value::UnchangedToast) => {
            return Err(EncodeError(format!(
                "NULL cannot be written to a {} column (a primary-key column)",
                ty.name()
            )))
        }
        (ChType::Bool | ChType::UInt8, Value::Bool(b)) => out.push(u8::from(*b)),
        (ChType::Int16, Value::Int(i)) => {
            out.extend_from_slice(&i16::try_from(*i).map_err(|_| mismatch())?.to_le_bytes())
        }
        (ChType::Int32, Value::Int(i)) => {
            out.extend_from_slice(&i32::try_from(*i).map_err(|_| mismatch())?.to_le_bytes())
        }
        (ChType::Int64, Value::Int(i)) => out.extend_from_slice(&i.to_le_bytes()),
        (ChType::UInt64, Value::Int(i)) => {
            out.extend_from_slice(&u64::try_from(*i).map_err(|_| mismatch())?.to_le_bytes())
        }
        (ChType::Float32, Value::Float(f)) => out.extend_from_slice(&(*f as f32).to_le_bytes()),
        (ChType::Float64, Value::Float(f)) => out.extend_from_slice(&f.to_le_bytes()),
        (ChType::Decimal { precision, scale }, Value::Numeric(text)) => {
            let scaled = scaled_decimal(text, *precision, *scale)?;
            // Checked against the precision, so it fits the width the precision gives.
            match precision {
                0..=9 => out.extend_from_slice(&(scaled as i32).to_le_bytes()),
                10..=18 => out.extend_from_slice(&(scaled as i64).to_le_bytes()),
                _ => out.extend_from_slice(&scaled.to_le_bytes()),
            }
        }
        (ChType::String | ChType::Label, value) => {
            let text;
            let bytes = match value {
                Value::Bytes(bytes) => bytes.as_slice(),
                Value::Text(t) | Value::Numeric(t) | Value::Json(t) | Value::Uuid(t) => {
                    t.as_bytes()
                }
                other => {
                    text = value_text(other);
                    text.as_bytes()
                }
            };
            write_varint(out, bytes.len() as u64);
            out.extend_from_slice(bytes);
        }
        (ChType::Date32, Value::Date(days)) => {
            if !(FIRST_DAY..=LAST_DAY).contains(&i64::from(*days)) {
                return Err(out_of_range(value));
            }
            out.extend_from_slice(&days.to_le_bytes());
        }
        (ChType::DateTime64, Value::Timestamp(micros) | Value::TimestampTz(micros)) => {
            if !(FIRST_DAY * MICROS_PER_DAY..(LAST_DAY + 1) * MICROS_PER_DAY).contains(micros) {
                return Err(out_of_range(value));
            }
            out.extend_from_slice(&micros.to_le_bytes());
        }
        (ChType::Uuid, Value::Uuid(text)) => {
            let hex: String = text.chars().filter(|c| *c != '-').collect();
            let uuid = u128::from_str_radix(&hex, 16)
                .ok()
                .filter(|_| hex.len() == 32)
                .ok_or_else(|| EncodeError(format!("{text:?} is not a UUID")))?;
            // Two little-endian halves, the high one first.
            out.extend_from_slice(&((uuid >> 64) as u64).to_le_bytes());
            out.extend_from_slice(&(uuid as u64).to_le_bytes());
        }
        _ => return Err(mismatch()),
    }
    Ok(())
}

fn out_of_range(value: &Value) -> EncodeError {
    EncodeError(format!(
        "{} is outside ClickHouse's Date32 and DateTime64 range (1900-01-01 to 2299-12-31)",
        value_text(value)
    ))
}

fn variant_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "NULL",
        Value::UnchangedToast => "unchanged TOAST",
        Value::Bool(_) => "boolean",
        Value::Int(_) => "integer",
        Value::Float(_) => "floating-point",
        Value::Numeric(_) => "numeric",
        Value::Text(_) => "text",
        Value::Bytes(_) => "bytea",
        Value::Date(_) => "date",
        Value::Time(_) => "time",
        Value::TimeTz { .. } => "timetz",
        Value::Timestamp(_) => "timestamp",
        Value::TimestampTz(_) => "timestamptz",
        Value::Interval { .. } => "interval",
        Value::Uuid(_) => "uuid",
        Value::Json(_) => "json",
        Value::Array(_) => "array",
    }
}

/// Decimal text (`-12.5`, `3`, `0.007`) as an integer of `scale` decimal places, checked to
/// have at most `precision` digits in all.
fn scaled_decimal(text: &str, precision: u32, scale: u32) -> Result<i128, EncodeError> {
    let refused = |why: &str| {
        EncodeError(format!(
            "{text:?} does not fit Decimal({precision}, {scale}): {why}"
        ))
    };
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() && fraction.is_empty() || !all_digits(whole) || !all_digits(fraction) {
        return Err(refused("not a decimal number"));
    }
    let fraction = fraction.trim_end_matches('0');
    if fraction.len() > scale as usize {
        return Err(refused("more decimal places than the column's scale"));
    }
    let whole = whole.trim_start_matches('0');
    if whole.len() + scale as usize > precision as usize {
        return Err(refused("more digits than the column's precision"));
    }
    let mut scaled: i128 = 0;
    let padding = scale as usize - fraction.len();
    for digit in whole
        .bytes()
        .chain(fraction.bytes())
        .chain(std::iter::repeat_n(b'0', padding))
    {
        scaled = scaled * 10 + i128::from(digit - b'0');
    }
    Ok(if negative { -scaled } else { scaled })
}

/// Splits RowBinary rows of `types` into each row's column values, as bytes.
pub fn split_rows(bytes: &[u8], types: &[ChType]) -> Result<Vec<Vec<Vec<u8>>>, String> {
    let mut rows = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let mut row = Vec::with_capacity(types.len());
        for ty in types {
            let start = at;
            at = skip(bytes, at, ty)?;
            row.push(bytes[start..at].to_vec());
        }
        rows.push(row);
    }
    Ok(rows)
}

/// Where the RowBinary value of `ty` that starts at `at` ends.
fn skip(bytes: &[u8], at: usize, ty: &ChType) -> Result<usize, String> {
    let fixed = |width: usize| {
        let end = at + width;
        if end <= bytes.len() {
            Ok(end)
        } else {
            Err(format!("the answer ends inside a {} value", ty.name()))
        }
    };
    match ty {
        ChType::Bool | ChType::UInt8 => fixed(1),
        ChType::Int16 => fixed(2),
        ChType::Int32 | ChType::Float32 | ChType::Date32 => fixed(4),
        ChType::Int64 | ChType::UInt64 | ChType::Float64 | ChType::DateTime64 => fixed(8),
        ChType::Uuid => fixed(16),
        ChType::Decimal { precision, .. } => fixed(match precision {
            0..=9 => 4,
            10..=18 => 8,
            _ => 16,
        }),
        ChType::String | ChType::Label => {
            let (length, start) = read_varint(bytes, at)?;
            let end = usize::try_from(length)
                .ok()
                .and_then(|length| start.checked_add(length))
                .filter(|end| *end <= bytes.len())
                .ok_or_else(|| "the answer ends inside a String value".to_string())?;
            Ok(end)
        }
        ChType::Nullable(inner) => match bytes.get(at) {
            Some(1) => Ok(at + 1),
            Some(_) => skip(bytes, at + 1, inner),
            None => Err("the answer ends inside a Nullable value".into()),
        },
        ChType::Array(element) => {
            let (count, mut end) = read_varint(bytes, at)?;
            for _ in 0..count {
                end = skip(bytes, end, element)?;
            }
            Ok(end)
        }
    }
}

fn read_varint(bytes: &[u8], mut at: usize) -> Result<(u64, usize), String> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *bytes
            .get(at)
            .ok_or_else(|| "the answer ends inside a length".to_string())?;
        at += 1;
        value |= u64::from(byte & 0x7F) << shift;
        if byte < 0x80 {
            return Ok((value, at));
        }
    }
    Err("a length longer than 64 bits".into())
}

/// A SQL expression for a non-null value of a key column, written from its RowBinary bytes
/// so that it is exactly the value the target holds (strings as hex, dates as day numbers).
pub fn key_literal(ty: &ChType, value: &Value) -> Result<String, EncodeError> {
    let mut bytes = Vec::new();
    encode(&mut bytes, ty, value)?;
    let hex = |b: &[u8]| b.iter().map(|b| format!("{b:02X}")).collect::<String>();
    Ok(match ty {
        ChType::String | ChType::Label => {
            let (_, start) = read_varint(&bytes, 0).map_err(EncodeError)?;
            format!("unhex('{}')", hex(&bytes[start..]))
        }
        // reinterpret does not make dates.
        ChType::Date32 => match value {
            Value::Date(days) => format!("addDays(toDate32('1970-01-01'), {days})"),
            _ => not_a_key(ty, value)?,
        },
        // Any other type: the bytes reinterpreted as the column's type.
        _ => format!(
            "reinterpret(unhex('{}'), {})",
            hex(&bytes),
            quote_string(&ty.name())
        ),
    })
}

fn not_a_key(ty: &ChType, value: &Value) -> Result<String, EncodeError> {
    Err(EncodeError(format!(
        "a {} value is not a {} key",
        variant_name(value),
        ty.name()
    )))
}

/// LEB128, as RowBinary writes lengths.
pub fn write_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// Quotes a name for ClickHouse SQL: backticks, with backslash and backtick escaped.
pub fn quote_identifier(name: &str) -> String {
    format!("`{}`", name.replace('\\', "\\\\").replace('`', "\\`"))
}

/// A string literal for ClickHouse SQL.
pub fn quote_string(text: &str) -> String {
    format!("'{}'", text.replace('\\', "\\\\").replace('\'', "\\'"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn encoded(ty: &ChType, value: &Value) -> Result<Vec<u8>, EncodeError> {
        let mut out = Vec::new();
        encode(&mut out, ty, value).map(|()| out)
    }

    #[test]
    fn decimals_are_scaled_integers_of_their_precision() {
        assert_eq!(scaled_decimal("-12.5", 10, 2).unwrap(), -1250);
        assert_eq!(scaled_decimal("0.007", 5, 3).unwrap(), 7);
        assert_eq!(scaled_decimal("12345678.90", 10, 2).unwrap(), 1_234_567_890);
        assert!(scaled_decimal("123456789.00", 10, 2).is_err());
        assert!(scaled_decimal("1.005", 10, 2).is_err());
        assert!(scaled_decimal("NaN", 10, 2).is_err());
        let decimal = ChType::Decimal {
            precision: 12,
            scale: 2,
        };
        assert_eq!(
            encoded(&decimal, &Value::Numeric("19.90".into())).unwrap(),
            1990i64.to_le_bytes()
        );
    }

    #[test]
    fn nullable_and_arrays_prefix_their_values() {
        let nullable_int = ChType::Nullable(Box::new(ChType::Int32));
        assert_eq!(encoded(&nullable_int, &Value::Null).unwrap(), [1]);
        assert_eq!(
            encoded(&nullable_int, &Value::Int(7)).unwrap(),
            [0, 7, 0, 0, 0]
        );
        let array = ChType::Array(Box::new(nullable_int));
        assert_eq!(
            encoded(&array, &Value::Array(vec![Value::Int(1), Value::Null])).unwrap(),
            [2, 0, 1, 0, 0, 0, 1]
        );
        assert_eq!(encoded(&array, &Value::Null).unwrap(), [0]);
        assert!(encoded(&ChType::Int64, &Value::Null).is_err());
    }

    #[test]
    fn values_outside_the_column_are_refused_not_changed() {
        assert!(encoded(&ChType::Int16, &Value::Int(40_000)).is_err());
        assert!(encoded(&ChType::Date32, &Value::Date(i32::MAX)).is_err());
        assert!(encoded(&ChType::DateTime64, &Value::Timestamp(i64::MIN)).is_err());
        assert!(encoded(&ChType::Int64, &Value::Text("12".into())).is_err());
        assert_eq!(
            encoded(&ChType::Date32, &Value::Date(-25_567)).unwrap(),
            (-25_567i32).to_le_bytes()
        );
    }

    #[test]
    fn uuids_are_two_little_endian_halves() {
        let bytes = encoded(
            &ChType::Uuid,
            &Value::Uuid("00112233-4455-6677-8899-aabbccddeeff".into()),
        )
        .unwrap();
        assert_eq!(&bytes[..8], &0x0011_2233_4455_6677u64.to_le_bytes());
        assert_eq!(&bytes[8..], &0x8899_aabb_ccdd_eeffu64.to_le_bytes());
    }

    #[test]
    fn types_follow_the_source_column() {
        let column = |value_type, oid, modifier| Column {
            name: "c".into(),
            type_oid: oid,
            type_modifier: modifier,
            type_name: String::new(),
            value_type,
            primary_key: false,
            replica_identity: false,
        };
        let numeric = |p: i32, s: i32| ((p << 16) | s) + 4;
        assert_eq!(
            ChType::of_column(&column(ValueType::Numeric, 1700, numeric(12, 2)), false).name(),
            "Nullable(Decimal(12, 2))"
        );
        assert_eq!(
            ChType::of_column(&column(ValueType::Numeric, 1700, -1), true).name(),
            "String"
        );
        assert_eq!(
            ChType::of_column(&column(ValueType::Numeric, 1700, numeric(60, 0)), true).name(),
            "String"
        );
        assert_eq!(
            ChType::of_column(&column(ValueType::Other, 20_000, -1), false).name(),
            "LowCardinality(Nullable(String))"
        );
        assert_eq!(
            ChType::of_column(
                &column(ValueType::Array(Box::new(ValueType::Int8)), 1016, -1),
                false
            )
            .name(),
            "Array(Nullable(Int64))"
        );
        assert_eq!(
            ChType::of_column(&column(ValueType::TimestampTz, 1184, -1), true).name(),
            "DateTime64(6, 'UTC')"
        );
    }
}
