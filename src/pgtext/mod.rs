//! PostgreSQL's text formats, both ways, for every part of tidemark that talks to PostgreSQL
//! (the source reads them, the table sinks write them): which built-in type OIDs map to which
//! `ValueType`, how a `pg_type` row resolves the types that are not built in (domains, enums,
//! arrays of user types), the conversion of PostgreSQL's text output into `Value`, rows of
//! COPY text (`copy_rows`), and values written as COPY text (`copy_text`). All of it is pure
//! functions over strings. The invariant: the text parsed is what the server prints
//! under the replication session's settings (`DateStyle=ISO`, `IntervalStyle=iso_8601`,
//! `TimeZone=UTC`, `extra_float_digits=3`, `lc_monetary=C`; see "Date/Time Output", "Interval
//! Output" and "Monetary Types" in the PostgreSQL manual), and any other input, malformed or beyond what `Value` can represent, is a
//! `TypeError`: never a panic, never a silently different value.
//!
//! This module holds the public API and the dispatch by type; the parsers live by idea in
//! `scalar` (integers, numeric, money, bytea, uuid), `datetime` (date, time, timestamp, interval and the
//! calendar arithmetic) and `array` (array literals).

mod array;
pub mod copy_rows;
pub mod copy_text;
mod cursor;
pub(crate) mod datetime;
mod scalar;
#[cfg(test)]
mod test_support;

use crate::event::{Value, ValueType};

pub use array::is_array_space;
use array::parse_array;
use datetime::{parse_date, parse_interval, parse_time, parse_timestamp, parse_timetz};
use scalar::{is_numeric_text, is_uuid_text, parse_bytea, parse_integer, parse_money};

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
    (790, 791, ValueType::Numeric),       // money: an exact decimal, see `parse_money`
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

/// Longest excerpt of the offending text an error carries, in characters.
const EXCERPT_CHARS: usize = 64;

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
/// - money is a `Value::Numeric`: the decimal of its `lc_monetary=C` text (`$1,234.56` is
///   `1234.56`), two fraction digits as that locale has; text in another locale's format is
///   `Invalid`.
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
        // Money, which maps to numeric, prints as an amount (`$1,234.56`).
        ValueType::Numeric => Value::Numeric(parse_money(text)?),
        ValueType::Text | ValueType::Other => Value::Text(text.to_owned()),
        ValueType::Bytea => Value::Bytes(parse_bytea(text)?),
        ValueType::Date => Value::Date(parse_date(text)?),
        ValueType::Time => Value::Time(parse_time(text)?),
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
    use super::test_support::*;
    use super::*;

    use proptest::prelude::*;

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
            (790, ValueType::Numeric),
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
            (791, ValueType::Numeric),
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

    proptest! {
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
