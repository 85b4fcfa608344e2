//! MySQL values into the model's `Value`s, once, at capture. Values come two ways: from the
//! binlog's row images as `row_image` reads them (ENUM as its index, SET as its bitmask,
//! TIMESTAMP as seconds since the epoch, JSON already as text) and from the snapshot's queries over the binary
//! protocol (ENUM and SET as their labels, TIMESTAMP as a UTC date-time: the session's time
//! zone is UTC). Each column's decoder knows its type from the catalog.

use mysql_async::Value as MyValue;

use super::catalog::{labels, CatalogColumn};
use crate::event::{Value, ValueType};
use crate::pgtext::datetime::days_from_civil;

const MICROS_PER_SECOND: i64 = 1_000_000;
const MICROS_PER_DAY: i64 = 86_400 * MICROS_PER_SECOND;

/// Where a value was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Binlog,
    Query,
}

/// How one column's values are read.
#[derive(Debug, Clone, PartialEq)]
pub struct ColumnDecoder {
    value_type: ValueType,
    kind: Kind,
}

#[derive(Debug, Clone, PartialEq)]
enum Kind {
    Plain,
    /// An unsigned integer of this many bits: the binlog's row images are read as signed
    /// (they carry no signedness; the catalog does).
    Unsigned(u32),
    /// BINARY(n): the server drops the trailing zero bytes the column pads its values with
    /// when it writes them to the binlog (`Field_string::pack`, as CHAR drops trailing
    /// spaces); the snapshot's queries read all n bytes.
    FixedBinary(usize),
    Enum(Vec<String>),
    Set(Vec<String>),
    /// A string type: its bytes are text in the column's character set.
    Text,
    Geometry,
}

impl ColumnDecoder {
    pub fn new(column: &CatalogColumn, value_type: ValueType) -> ColumnDecoder {
        let unsigned_bits = match column.data_type.as_str() {
            "tinyint" => 8,
            "smallint" => 16,
            "mediumint" => 24,
            "int" | "integer" => 32,
            "bigint" => 64,
            _ => 0,
        };
        let kind = match column.data_type.as_str() {
            _ if unsigned_bits > 0 && column.column_type.contains("unsigned") => {
                Kind::Unsigned(unsigned_bits)
            }
            "binary" => Kind::FixedBinary(
                column
                    .char_length
                    .and_then(|n| usize::try_from(n).ok())
                    .unwrap_or(0),
            ),
            "enum" => Kind::Enum(labels(&column.column_type)),
            "set" => Kind::Set(labels(&column.column_type)),
            "geometry" | "point" | "linestring" | "polygon" | "multipoint" | "multilinestring"
            | "multipolygon" | "geometrycollection" => Kind::Geometry,
            "char" | "varchar" | "tinytext" | "text" | "mediumtext" | "longtext" | "json" => {
                Kind::Text
            }
            _ => Kind::Plain,
        };
        ColumnDecoder { value_type, kind }
    }

    /// A value as `origin` sent it.
    pub fn value(&self, value: MyValue, origin: Origin) -> Result<Value, String> {
        Ok(match (value, &self.kind) {
            (MyValue::NULL, _) => Value::Null,
            (MyValue::Int(n), Kind::Unsigned(bits)) if n < 0 && *bits < 64 => {
                self.integer(i128::from(n) + (1i128 << bits))
            }
            (MyValue::Int(n), Kind::Unsigned(64)) if n < 0 => {
                Value::Numeric((i128::from(n) + (1i128 << 64)).to_string())
            }
            (MyValue::Bytes(mut bytes), Kind::FixedBinary(length)) if origin == Origin::Binlog => {
                if bytes.len() < *length {
                    bytes.resize(*length, 0);
                }
                Value::Bytes(bytes)
            }
            (MyValue::Int(n), Kind::Enum(labels)) => enum_label(labels, n)?,
            (MyValue::Int(n), _) => self.integer(i128::from(n)),
            (MyValue::UInt(n), _) => self.integer(i128::from(n)),
            // A float4 is the decimal the server prints for it, as an f64, as the PostgreSQL
            // source reads one (see pgtext's `write_float`): 1.1, not the f32's binary
            // expansion 1.100000023841858. Rust prints an f32 as the shortest decimal that
            // reads back as it, which is what MySQL prints.
            (MyValue::Float(f), _) => {
                Value::Float(f.to_string().parse().unwrap_or_else(|_| f64::from(f)))
            }
            (MyValue::Double(f), _) => Value::Float(f),
            (MyValue::Date(y, m, d, h, i, s, us), _) => self.date_time(y, m, d, h, i, s, us)?,
            (MyValue::Time(negative, days, h, i, s, us), _) => {
                let micros = i64::from(days) * MICROS_PER_DAY
                    + (i64::from(h) * 3600 + i64::from(i) * 60 + i64::from(s)) * MICROS_PER_SECOND
                    + i64::from(us);
                Value::Time(if negative { -micros } else { micros })
            }
            (MyValue::Bytes(bytes), _) => self.bytes(bytes, origin)?,
        })
    }

    fn integer(&self, n: i128) -> Value {
        match self.value_type {
            ValueType::Numeric => Value::Numeric(n.to_string()),
            // i128 from an i64 or u64 that is not numeric: the mapping picked a wide enough
            // type (a bigint unsigned is numeric).
            _ => Value::Int(i64::try_from(n).unwrap_or(i64::MAX)),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn date_time(
        &self,
        y: u16,
        m: u8,
        d: u8,
        h: u8,
        i: u8,
        s: u8,
        us: u32,
    ) -> Result<Value, String> {
        // MySQL's zero date (and zero parts) has no calendar day: Debezium sends null.
        if m == 0 || d == 0 {
            return Ok(Value::Null);
        }
        if !(1..=12).contains(&m) || d > 31 {
            return Err(format!("invalid date {y:04}-{m:02}-{d:02}"));
        }
        let days = days_from_civil(i64::from(y), u64::from(m), u64::from(d));
        let micros = days * MICROS_PER_DAY
            + (i64::from(h) * 3600 + i64::from(i) * 60 + i64::from(s)) * MICROS_PER_SECOND
            + i64::from(us);
        Ok(match self.value_type {
            ValueType::Date => Value::Date(i32::try_from(days).map_err(|e| e.to_string())?),
            ValueType::TimestampTz => Value::TimestampTz(micros),
            _ => Value::Timestamp(micros),
        })
    }

    fn bytes(&self, bytes: Vec<u8>, origin: Origin) -> Result<Value, String> {
        let text = |bytes: Vec<u8>| match String::from_utf8(bytes) {
            Ok(text) => text,
            // Not UTF-8: a latin1 column (each byte its code point).
            Err(e) => e.into_bytes().iter().map(|&b| char::from(b)).collect(),
        };
        Ok(match (&self.kind, origin) {
            (Kind::Set(labels), Origin::Binlog) => set_labels(labels, &bytes),
            (Kind::Geometry, _) => Value::Text(geometry_text(&bytes)?),
            (Kind::Text | Kind::Enum(_) | Kind::Set(_), _) => match self.value_type {
                ValueType::Json => Value::Json(text(bytes)),
                _ => Value::Text(text(bytes)),
            },
            _ => match self.value_type {
                ValueType::Bytea => Value::Bytes(bytes),
                ValueType::Bool => Value::Bool(bytes.iter().any(|&b| b != 0)),
                ValueType::Numeric => Value::Numeric(text(bytes)),
                ValueType::Json => Value::Json(text(bytes)),
                ValueType::Int2 | ValueType::Int4 | ValueType::Int8 => {
                    let text = text(bytes);
                    Value::Int(
                        text.trim()
                            .parse()
                            .map_err(|_| format!("invalid integer {text:?}"))?,
                    )
                }
                ValueType::Float4 | ValueType::Float8 => {
                    let text = text(bytes);
                    Value::Float(
                        text.trim()
                            .parse()
                            .map_err(|_| format!("invalid number {text:?}"))?,
                    )
                }
                // TIMESTAMP in the binlog: seconds since the epoch, with the fraction.
                ValueType::TimestampTz => {
                    let text = text(bytes);
                    let (seconds, fraction) = text.split_once('.').unwrap_or((&text, ""));
                    let seconds: i64 = seconds
                        .parse()
                        .map_err(|_| format!("invalid timestamp {text:?}"))?;
                    let micros: i64 = format!("{fraction:0<6}")
                        .parse()
                        .map_err(|_| format!("invalid timestamp {text:?}"))?;
                    if seconds == 0 && micros == 0 {
                        // The zero timestamp.
                        Value::Null
                    } else {
                        Value::TimestampTz(seconds * MICROS_PER_SECOND + micros)
                    }
                }
                _ => Value::Text(text(bytes)),
            },
        })
    }
}

fn enum_label(labels: &[String], index: i64) -> Result<Value, String> {
    // Index 0 is the empty string MySQL stores for an invalid value.
    if index == 0 {
        return Ok(Value::Text(String::new()));
    }
    usize::try_from(index - 1)
        .ok()
        .and_then(|i| labels.get(i))
        .map(|label| Value::Text(label.clone()))
        .ok_or_else(|| {
            format!(
                "ENUM index {index} is not one of the column's {} labels",
                labels.len()
            )
        })
}

/// The labels whose bits are set, joined with commas as MySQL shows a SET.
fn set_labels(labels: &[String], bitmask: &[u8]) -> Value {
    let chosen: Vec<&str> = labels
        .iter()
        .enumerate()
        .filter(|(i, _)| {
            bitmask
                .get(i / 8)
                .is_some_and(|byte| byte & (1 << (i % 8)) != 0)
        })
        .map(|(_, label)| label.as_str())
        .collect();
    Value::Text(chosen.join(","))
}

/// MySQL's internal geometry (a 4-byte SRID, then WKB) as well-known text, with the SRID
/// prefixed as PostGIS's EWKT does when it is not 0.
fn geometry_text(bytes: &[u8]) -> Result<String, String> {
    let (srid, wkb) = bytes
        .split_first_chunk::<4>()
        .ok_or("a geometry shorter than its SRID")?;
    let srid = u32::from_le_bytes(*srid);
    let mut reader = Wkb { bytes: wkb, at: 0 };
    let mut out = String::new();
    if srid != 0 {
        out.push_str(&format!("SRID={srid};"));
    }
    reader.geometry(&mut out)?;
    Ok(out)
}

/// A reader of well-known binary.
struct Wkb<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Wkb<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let chunk = self
            .bytes
            .get(self.at..self.at + N)
            .ok_or("a geometry ends early")?;
        self.at += N;
        let mut array = [0; N];
        array.copy_from_slice(chunk);
        Ok(array)
    }

    fn u32(&mut self, little: bool) -> Result<u32, String> {
        let bytes = self.take::<4>()?;
        Ok(if little {
            u32::from_le_bytes(bytes)
        } else {
            u32::from_be_bytes(bytes)
        })
    }

    fn point(&mut self, little: bool, out: &mut String) -> Result<(), String> {
        let mut coordinate = || -> Result<f64, String> {
            let bytes = self.take::<8>()?;
            Ok(if little {
                f64::from_le_bytes(bytes)
            } else {
                f64::from_be_bytes(bytes)
            })
        };
        let (x, y) = (coordinate()?, coordinate()?);
        out.push_str(&format!("{x} {y}"));
        Ok(())
    }

    fn points(&mut self, little: bool, out: &mut String) -> Result<(), String> {
        let count = self.u32(little)?;
        out.push('(');
        for i in 0..count {
            if i > 0 {
                out.push(',');
            }
            self.point(little, out)?;
        }
        out.push(')');
        Ok(())
    }

    fn geometry(&mut self, out: &mut String) -> Result<(), String> {
        let [order] = self.take::<1>()?;
        let little = order == 1;
        let kind = self.u32(little)?;
        let (name, body): (&str, u32) = match kind {
            1 => ("POINT", 1),
            2 => ("LINESTRING", 2),
            3 => ("POLYGON", 3),
            4 => ("MULTIPOINT", 4),
            5 => ("MULTILINESTRING", 4),
            6 => ("MULTIPOLYGON", 4),
            7 => ("GEOMETRYCOLLECTION", 4),
            other => return Err(format!("geometry type {other} is not well-known binary")),
        };
        out.push_str(name);
        match body {
            1 => {
                out.push('(');
                self.point(little, out)?;
                out.push(')');
            }
            2 => self.points(little, out)?,
            3 => {
                let rings = self.u32(little)?;
                out.push('(');
                for i in 0..rings {
                    if i > 0 {
                        out.push(',');
                    }
                    self.points(little, out)?;
                }
                out.push(')');
            }
            _ => {
                let parts = self.u32(little)?;
                out.push('(');
                for i in 0..parts {
                    if i > 0 {
                        out.push(',');
                    }
                    // Each part is a whole geometry; WKT drops the type word inside MULTI*.
                    let mut part = String::new();
                    self.geometry(&mut part)?;
                    if kind == 7 {
                        out.push_str(&part);
                    } else {
                        out.push_str(part.trim_start_matches(char::is_alphabetic));
                    }
                }
                out.push(')');
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn decoder(data_type: &str, column_type: &str, value_type: ValueType) -> ColumnDecoder {
        let column = CatalogColumn {
            name: "c".into(),
            data_type: data_type.into(),
            column_type: column_type.into(),
            primary_key: false,
            char_length: None,
            precision: None,
            scale: None,
            datetime_precision: None,
            default: None,
        };
        ColumnDecoder::new(&column, value_type)
    }

    #[test]
    fn unsigned_integers_sent_as_signed_are_read_unsigned() {
        let tiny = decoder("tinyint", "tinyint(3) unsigned", ValueType::Int2);
        assert_eq!(
            tiny.value(MyValue::Int(-56), Origin::Binlog).unwrap(),
            Value::Int(200)
        );
        let big = decoder("bigint", "bigint(20) unsigned", ValueType::Numeric);
        assert_eq!(
            big.value(MyValue::Int(-1), Origin::Binlog).unwrap(),
            Value::Numeric("18446744073709551615".into())
        );
        assert_eq!(
            big.value(MyValue::UInt(u64::MAX), Origin::Query).unwrap(),
            Value::Numeric("18446744073709551615".into())
        );
    }

    #[test]
    fn enum_and_set_read_as_labels_from_either_origin() {
        let status = decoder("enum", "enum('new','paid')", ValueType::Text);
        assert_eq!(
            status.value(MyValue::Int(2), Origin::Binlog).unwrap(),
            Value::Text("paid".into())
        );
        assert_eq!(
            status
                .value(MyValue::Bytes(b"paid".to_vec()), Origin::Query)
                .unwrap(),
            Value::Text("paid".into())
        );
        let tags = decoder("set", "set('a','b','c')", ValueType::Text);
        assert_eq!(
            tags.value(MyValue::Bytes(vec![0b101]), Origin::Binlog)
                .unwrap(),
            Value::Text("a,c".into())
        );
        assert_eq!(
            tags.value(MyValue::Bytes(b"a,c".to_vec()), Origin::Query)
                .unwrap(),
            Value::Text("a,c".into())
        );
    }

    #[test]
    fn timestamps_are_utc_and_zero_dates_are_null() {
        let ts = decoder("timestamp", "timestamp(3)", ValueType::TimestampTz);
        assert_eq!(
            ts.value(
                MyValue::Bytes(b"1700000000.250000".to_vec()),
                Origin::Binlog
            )
            .unwrap(),
            Value::TimestampTz(1_700_000_000_250_000)
        );
        assert_eq!(
            ts.value(
                MyValue::Date(2023, 11, 14, 22, 13, 20, 250_000),
                Origin::Query
            )
            .unwrap(),
            Value::TimestampTz(1_700_000_000_250_000)
        );
        let dt = decoder("datetime", "datetime", ValueType::Timestamp);
        assert_eq!(
            dt.value(MyValue::Date(0, 0, 0, 0, 0, 0, 0), Origin::Query)
                .unwrap(),
            Value::Null
        );
        let d = decoder("date", "date", ValueType::Date);
        assert_eq!(
            d.value(MyValue::Date(1970, 1, 2, 0, 0, 0, 0), Origin::Binlog)
                .unwrap(),
            Value::Date(1)
        );
        let t = decoder("time", "time", ValueType::Time);
        assert_eq!(
            t.value(MyValue::Time(true, 1, 2, 0, 0, 0), Origin::Binlog)
                .unwrap(),
            Value::Time(-26 * 3600 * MICROS_PER_SECOND)
        );
    }

    #[test]
    fn binary_values_the_binlog_shortened_are_padded_as_the_snapshot_reads_them() {
        let mut fixed = CatalogColumn {
            name: "c".into(),
            data_type: "binary".into(),
            column_type: "binary(4)".into(),
            primary_key: false,
            char_length: Some(4),
            precision: None,
            scale: None,
            datetime_precision: None,
            default: None,
        };
        let binary = ColumnDecoder::new(&fixed, ValueType::Bytea);
        assert_eq!(
            binary
                .value(MyValue::Bytes(vec![0xff, 0x00, 0x01]), Origin::Binlog)
                .unwrap(),
            Value::Bytes(vec![0xff, 0x00, 0x01, 0x00])
        );
        assert_eq!(
            binary
                .value(MyValue::Bytes(vec![]), Origin::Binlog)
                .unwrap(),
            Value::Bytes(vec![0; 4])
        );
        fixed.data_type = "varbinary".into();
        let varbinary = ColumnDecoder::new(&fixed, ValueType::Bytea);
        assert_eq!(
            varbinary
                .value(MyValue::Bytes(vec![0xff]), Origin::Binlog)
                .unwrap(),
            Value::Bytes(vec![0xff])
        );
    }

    #[test]
    fn floats_are_the_decimal_the_server_prints() {
        let float = decoder("float", "float", ValueType::Float4);
        assert_eq!(
            float.value(MyValue::Float(1.1), Origin::Binlog).unwrap(),
            Value::Float(1.1)
        );
        assert_eq!(
            float
                .value(MyValue::Float(-3.40282e38), Origin::Query)
                .unwrap(),
            Value::Float(-3.40282e38)
        );
        let double = decoder("double", "double", ValueType::Float8);
        assert_eq!(
            double.value(MyValue::Double(0.1), Origin::Binlog).unwrap(),
            Value::Float(0.1)
        );
    }

    #[test]
    fn geometry_is_well_known_text() {
        let mut point = 4326u32.to_le_bytes().to_vec();
        point.push(1);
        point.extend(1u32.to_le_bytes());
        point.extend(1.5f64.to_le_bytes());
        point.extend((-2f64).to_le_bytes());
        let g = decoder("point", "point", ValueType::Text);
        assert_eq!(
            g.value(MyValue::Bytes(point), Origin::Binlog).unwrap(),
            Value::Text("SRID=4326;POINT(1.5 -2)".into())
        );
    }
}
