//! The row images of a binlog rows event, read straight from its bytes. A table's layout (each
//! column's binlog type and what its table-map metadata says about its width) is built once
//! from the table map; each image is then a null bitmap over the columns the event carries
//! (its column bitmap) followed by the non-NULL values of those columns, in column order.
//! WRITE carries after images, DELETE before images, UPDATE a before and an after image per
//! row; version 1 and 2 rows events lay their rows out alike.
//!
//! Values come out as the `mysql_async::Value`s the column decoder reads, with the sign a
//! signed type's bytes hold (unsignedness is the decoder's, from the catalog), TIMESTAMP as
//! seconds since the epoch (`"1700000000.25"`), DECIMAL as its digits, ENUM as its index, SET
//! as its little-endian bitmask, MySQL's binary JSON as JSON text. The encodings are MySQL's
//! (`sql/log_event.cc`, `sql-common/my_time.cc`, `strings/decimal.cc`).

use mysql_async::binlog::events::TableMapEvent;
use mysql_async::binlog::jsonb;
use mysql_async::consts::ColumnType;
use mysql_async::Value as MyValue;
use mysql_common::binlog::decimal::{decimal_bin_size, Decimal};
use mysql_common::io::ParseBuf;

/// Offsets of the packed temporal formats (`my_time.h`).
const TIMEF_INT_OFS: i64 = 0x80_0000;
const TIMEF_OFS: i64 = 0x8000_0000_0000;
const DATETIMEF_INT_OFS: i64 = 0x80_0000_0000;

/// How one column's value is laid out in a row image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// A little-endian two's-complement integer of this many bytes (1, 2, 3, 4 or 8).
    Int(u8),
    Float,
    Double,
    Decimal {
        precision: u8,
        scale: u8,
    },
    Year,
    Date,
    /// The old TIME: three little-endian bytes holding ±HHMMSS.
    Time,
    /// TIME(fsp) in MySQL 5.6's packed big-endian form.
    Time2(u8),
    /// The old DATETIME: eight little-endian bytes holding YYYYMMDDHHMMSS.
    DateTime,
    DateTime2(u8),
    /// The old TIMESTAMP: four little-endian bytes of seconds.
    Timestamp,
    /// Big-endian seconds, then the fraction.
    Timestamp2(u8),
    /// A little-endian length of this many bytes, then the bytes (VARCHAR, CHAR, BINARY, the
    /// BLOB and TEXT family, GEOMETRY).
    Bytes(u8),
    /// MySQL's binary JSON behind a length of this many bytes.
    Json(u8),
    /// The ENUM's index, in this many bytes.
    Enum(u8),
    /// The SET's bitmask, in this many bytes.
    Set(u8),
    /// BIT(n) in this many big-endian bytes.
    Bit(u8),
}

/// A malformed rows event or a table map the reader cannot follow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} (byte {offset} of the rows)")]
pub struct RowImageError {
    pub what: String,
    pub offset: usize,
}

fn malformed(what: impl Into<String>, offset: usize) -> RowImageError {
    RowImageError {
        what: what.into(),
        offset,
    }
}

/// The layout of a table's row images, as one table map described them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowLayout {
    table_id: u64,
    columns: Vec<Layout>,
}

/// One value of a row image.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    /// A value for the column decoder (`MyValue::NULL` for NULL).
    Value(MyValue),
    /// A JSON column's value as JSON text.
    Json(String),
}

impl RowLayout {
    /// The layout the table map describes.
    pub fn new(table_map: &TableMapEvent<'_>) -> Result<RowLayout, RowImageError> {
        let count = usize::try_from(table_map.columns_count())
            .map_err(|_| malformed("a table map with too many columns", 0))?;
        let mut columns = Vec::with_capacity(count);
        let mut types = Vec::with_capacity(count);
        for index in 0..count {
            let column_type = table_map
                .get_column_type(index)
                .map_err(|e| malformed(format!("column {index} of the table map: {e}"), 0))?
                .ok_or_else(|| {
                    malformed(format!("the table map has no type for column {index}"), 0)
                })?;
            types.push(column_type);
        }
        // The table map's metadata is one run over all the columns: read it once, not per
        // column (`get_column_metadata` walks it from the start).
        for (index, column_type) in types.into_iter().enumerate() {
            let metadata = table_map.get_column_metadata(index).unwrap_or_default();
            columns.push(layout(column_type, metadata).map_err(|what| {
                malformed(format!("column {index} of the table map: {what}"), 0)
            })?);
        }
        Ok(RowLayout {
            table_id: table_map.table_id(),
            columns,
        })
    }

    /// A layout from the columns' types and metadata, as a table map lists them.
    #[cfg(test)]
    fn from_parts(columns: &[(ColumnType, &[u8])]) -> Result<RowLayout, String> {
        Ok(RowLayout {
            table_id: 0,
            columns: columns
                .iter()
                .map(|(column_type, metadata)| layout(*column_type, metadata))
                .collect::<Result<_, _>>()?,
        })
    }

    /// Whether this is the layout `table_map` describes: the server gives a table a new id
    /// when its definition changes.
    pub fn describes(&self, table_map: &TableMapEvent<'_>) -> bool {
        self.table_id == table_map.table_id()
            && u64::try_from(self.columns.len()).ok() == Some(table_map.columns_count())
    }

    pub fn column_count(&self) -> usize {
        self.columns.len()
    }
}

/// The column's layout from its type (the real type of a STRING: CHAR, ENUM or SET) and its
/// table-map metadata.
fn layout(column_type: ColumnType, metadata: &[u8]) -> Result<Layout, String> {
    use ColumnType::*;
    let byte = |i: usize| {
        metadata
            .get(i)
            .copied()
            .ok_or_else(|| format!("{column_type:?} with {} bytes of metadata", metadata.len()))
    };
    let prefix = |width: u8| match width {
        1..=4 => Ok(width),
        _ => Err(format!("{column_type:?} with a length of {width} bytes")),
    };
    Ok(match column_type {
        MYSQL_TYPE_TINY => Layout::Int(1),
        MYSQL_TYPE_SHORT => Layout::Int(2),
        MYSQL_TYPE_INT24 => Layout::Int(3),
        MYSQL_TYPE_LONG => Layout::Int(4),
        MYSQL_TYPE_LONGLONG => Layout::Int(8),
        MYSQL_TYPE_FLOAT => Layout::Float,
        MYSQL_TYPE_DOUBLE => Layout::Double,
        MYSQL_TYPE_NEWDECIMAL => {
            let (precision, scale) = (byte(0)?, byte(1)?);
            if precision == 0 || precision > 65 || scale > 30 || scale > precision {
                return Err(format!("DECIMAL({precision},{scale})"));
            }
            Layout::Decimal { precision, scale }
        }
        MYSQL_TYPE_YEAR => Layout::Year,
        MYSQL_TYPE_DATE | MYSQL_TYPE_NEWDATE => Layout::Date,
        MYSQL_TYPE_TIME => Layout::Time,
        MYSQL_TYPE_TIME2 => Layout::Time2(fsp(byte(0)?)?),
        MYSQL_TYPE_DATETIME => Layout::DateTime,
        MYSQL_TYPE_DATETIME2 => Layout::DateTime2(fsp(byte(0)?)?),
        MYSQL_TYPE_TIMESTAMP => Layout::Timestamp,
        MYSQL_TYPE_TIMESTAMP2 => Layout::Timestamp2(fsp(byte(0)?)?),
        // The maximum length in bytes, little-endian: a one-byte length below 256.
        MYSQL_TYPE_VARCHAR | MYSQL_TYPE_VAR_STRING => {
            let max = u16::from_le_bytes([byte(0)?, byte(1)?]);
            Layout::Bytes(if max < 256 { 1 } else { 2 })
        }
        // The real type, then the length; a CHAR longer than 255 bytes keeps the length's
        // high bits, inverted, in bits 4 and 5 of the type byte (MySQL bug #37426).
        MYSQL_TYPE_STRING | MYSQL_TYPE_ENUM | MYSQL_TYPE_SET => {
            let (first, second) = (byte(0)?, byte(1)?);
            let (real, length) = if first == 0 {
                (MYSQL_TYPE_STRING as u8, u16::from_le_bytes([first, second]))
            } else if first & 0x30 != 0x30 {
                (
                    first | 0x30,
                    u16::from(second) | (u16::from((first & 0x30) ^ 0x30) << 4),
                )
            } else {
                (first, u16::from(second))
            };
            match real {
                r if r == MYSQL_TYPE_ENUM as u8 => match second {
                    1 | 2 => Layout::Enum(second),
                    _ => return Err(format!("an ENUM of {second} bytes")),
                },
                r if r == MYSQL_TYPE_SET as u8 => match second {
                    1..=8 => Layout::Set(second),
                    _ => return Err(format!("a SET of {second} bytes")),
                },
                r if r == MYSQL_TYPE_STRING as u8 => {
                    Layout::Bytes(if length > 255 { 2 } else { 1 })
                }
                other => return Err(format!("a STRING whose real type is {other}")),
            }
        }
        // Bits beyond whole bytes, then whole bytes.
        MYSQL_TYPE_BIT => {
            let bits = u16::from(byte(1)?) * 8 + u16::from(byte(0)?);
            Layout::Bit(u8::try_from(bits.div_ceil(8)).map_err(|_| format!("BIT({bits})"))?)
        }
        MYSQL_TYPE_TINY_BLOB
        | MYSQL_TYPE_MEDIUM_BLOB
        | MYSQL_TYPE_LONG_BLOB
        | MYSQL_TYPE_BLOB
        | MYSQL_TYPE_GEOMETRY => Layout::Bytes(prefix(byte(0)?)?),
        MYSQL_TYPE_JSON => Layout::Json(prefix(byte(0)?)?),
        other => {
            return Err(format!(
                "the binlog type {other:?}, which tidemark cannot read"
            ))
        }
    })
}

fn fsp(digits: u8) -> Result<u8, String> {
    if digits <= 6 {
        Ok(digits)
    } else {
        Err(format!("{digits} fractional digits"))
    }
}

/// The columns a rows event's column bitmap names, in order.
#[cfg(test)]
fn present_columns(bitmap: &[u8], count: usize) -> Vec<usize> {
    (0..count)
        .filter(|&i| bitmap.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0))
        .collect()
}

/// A reader over a rows event's row data.
pub struct RowImages<'a> {
    layout: &'a RowLayout,
    data: &'a [u8],
    at: usize,
}

impl<'a> RowImages<'a> {
    pub fn new(layout: &'a RowLayout, data: &'a [u8]) -> RowImages<'a> {
        RowImages {
            layout,
            data,
            at: 0,
        }
    }

    /// Whether every image has been read.
    pub fn is_empty(&self) -> bool {
        self.at >= self.data.len()
    }

    /// Reads the next image, of the columns `present` (ascending column indexes, as
    /// `present_columns` gives them), into `out` as (column index, value).
    pub fn image(
        &mut self,
        present: &[usize],
        out: &mut Vec<(usize, Cell)>,
    ) -> Result<(), RowImageError> {
        out.clear();
        let bitmap_at = self.at;
        let nulls = self.take(present.len().div_ceil(8))?;
        for (i, &column) in present.iter().enumerate() {
            let layout = *self.layout.columns.get(column).ok_or_else(|| {
                malformed(
                    format!(
                        "the rows name column {column} of a table map with {} columns",
                        self.layout.columns.len()
                    ),
                    bitmap_at,
                )
            })?;
            let cell = if nulls[i / 8] & (1 << (i % 8)) != 0 {
                Cell::Value(MyValue::NULL)
            } else {
                let at = self.at;
                self.value(layout)
                    .map_err(|e| malformed(format!("column {column}: {}", e.what), at))?
            };
            out.push((column, cell));
        }
        Ok(())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], RowImageError> {
        let bytes = self
            .at
            .checked_add(n)
            .and_then(|end| self.data.get(self.at..end))
            .ok_or_else(|| {
                malformed(
                    format!("the row data ends within a field of {n} bytes"),
                    self.at,
                )
            })?;
        self.at += n;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], RowImageError> {
        let mut array = [0; N];
        array.copy_from_slice(self.take(N)?);
        Ok(array)
    }

    /// A little-endian unsigned integer of `width` bytes (at most 8).
    fn uint_le(&mut self, width: usize) -> Result<u64, RowImageError> {
        Ok(self
            .take(width)?
            .iter()
            .rev()
            .fold(0, |n, &b| (n << 8) | u64::from(b)))
    }

    /// A big-endian unsigned integer of `width` bytes (at most 8).
    fn uint_be(&mut self, width: usize) -> Result<u64, RowImageError> {
        Ok(self
            .take(width)?
            .iter()
            .fold(0, |n, &b| (n << 8) | u64::from(b)))
    }

    fn length_prefixed(&mut self, width: u8) -> Result<&'a [u8], RowImageError> {
        let length = self.uint_le(usize::from(width))?;
        let length = usize::try_from(length)
            .map_err(|_| malformed(format!("a length of {length} bytes"), self.at))?;
        self.take(length)
    }

    fn value(&mut self, layout: Layout) -> Result<Cell, RowImageError> {
        let value = match layout {
            Layout::Int(1) => MyValue::Int(i64::from(i8::from_le_bytes(self.array()?))),
            Layout::Int(2) => MyValue::Int(i64::from(i16::from_le_bytes(self.array()?))),
            Layout::Int(3) => {
                let [a, b, c] = self.array()?;
                // The sign is the top bit of the third byte: extend it.
                MyValue::Int(i64::from(i32::from_le_bytes([0, a, b, c]) >> 8))
            }
            Layout::Int(4) => MyValue::Int(i64::from(i32::from_le_bytes(self.array()?))),
            Layout::Int(_) => MyValue::Int(i64::from_le_bytes(self.array()?)),
            Layout::Float => MyValue::Float(f32::from_le_bytes(self.array()?)),
            Layout::Double => MyValue::Double(f64::from_le_bytes(self.array()?)),
            Layout::Decimal { precision, scale } => {
                let (precision, scale) = (usize::from(precision), usize::from(scale));
                let at = self.at;
                let bytes = self.take(decimal_bin_size(precision, scale))?;
                let decimal = Decimal::read_bin(bytes, precision, scale, false)
                    .map_err(|e| malformed(format!("a DECIMAL: {e}"), at))?;
                MyValue::Bytes(decimal.to_string().into_bytes())
            }
            // The year minus 1900; 0 is the year 0000.
            Layout::Year => {
                let [year] = self.array()?;
                MyValue::Int(if year == 0 { 0 } else { 1900 + i64::from(year) })
            }
            // day | month << 5 | year << 9, little-endian.
            Layout::Date => {
                let packed = self.uint_le(3)?;
                MyValue::Date(
                    (packed >> 9) as u16,
                    ((packed >> 5) & 15) as u8,
                    (packed & 31) as u8,
                    0,
                    0,
                    0,
                    0,
                )
            }
            Layout::Time => {
                let [a, b, c] = self.array()?;
                let hhmmss = i32::from_le_bytes([0, a, b, c]) >> 8;
                let n = hhmmss.unsigned_abs();
                let hours = n / 10_000;
                MyValue::Time(
                    hhmmss < 0,
                    hours / 24,
                    (hours % 24) as u8,
                    (n / 100 % 100) as u8,
                    (n % 100) as u8,
                    0,
                )
            }
            Layout::Time2(fsp) => time_from_packed(self.time2_packed(fsp)?),
            Layout::DateTime => {
                let n = self.uint_le(8)?;
                let (date, time) = (n / 1_000_000, n % 1_000_000);
                MyValue::Date(
                    (date / 10_000) as u16,
                    (date / 100 % 100) as u8,
                    (date % 100) as u8,
                    (time / 10_000) as u8,
                    (time / 100 % 100) as u8,
                    (time % 100) as u8,
                    0,
                )
            }
            Layout::DateTime2(fsp) => {
                let at = self.at;
                let int = self.uint_be(5)? as i64 - DATETIMEF_INT_OFS;
                let micros = self.fraction(fsp)?;
                if int < 0 {
                    return Err(malformed("a negative DATETIME", at));
                }
                // year * 13 + month (17 bits), day (5), hour (5), minute (6), second (6).
                let (ymd, hms) = (int >> 17, int & ((1 << 17) - 1));
                let (year_month, day) = (ymd >> 5, ymd & 31);
                MyValue::Date(
                    (year_month / 13) as u16,
                    (year_month % 13) as u8,
                    day as u8,
                    (hms >> 12) as u8,
                    ((hms >> 6) & 63) as u8,
                    (hms & 63) as u8,
                    micros,
                )
            }
            Layout::Timestamp => MyValue::Bytes(self.uint_le(4)?.to_string().into_bytes()),
            Layout::Timestamp2(fsp) => {
                let seconds = self.uint_be(4)?;
                let micros = self.fraction(fsp)?;
                MyValue::Bytes(
                    if micros == 0 {
                        seconds.to_string()
                    } else {
                        format!("{seconds}.{micros:06}")
                    }
                    .into_bytes(),
                )
            }
            Layout::Bytes(width) => MyValue::Bytes(self.length_prefixed(width)?.to_vec()),
            Layout::Json(width) => {
                let at = self.at;
                let bytes = self.length_prefixed(width)?;
                return Ok(Cell::Json(jsonb_text(bytes).map_err(|e| malformed(e, at))?));
            }
            Layout::Enum(width) => MyValue::Int(self.uint_le(usize::from(width))? as i64),
            Layout::Set(width) | Layout::Bit(width) => {
                MyValue::Bytes(self.take(usize::from(width))?.to_vec())
            }
        };
        Ok(Cell::Value(value))
    }

    /// The fraction of a TIME2's integer part's companion bytes: (fsp + 1) / 2 big-endian
    /// bytes, in units of 10^-(2 * bytes) seconds.
    fn fraction(&mut self, fsp: u8) -> Result<u32, RowImageError> {
        Ok(match fsp {
            1 | 2 => self.uint_be(1)? as u32 * 10_000,
            3 | 4 => self.uint_be(2)? as u32 * 100,
            5 | 6 => self.uint_be(3)? as u32,
            _ => 0,
        })
    }

    /// A TIME2 as MySQL's packed time: (seconds part << 24) + microseconds, signed
    /// (`my_time_packed_from_binary`). A negative value with a fraction keeps its integer
    /// part one lower and its fraction as the complement.
    fn time2_packed(&mut self, fsp: u8) -> Result<i64, RowImageError> {
        Ok(match fsp {
            5 | 6 => self.uint_be(6)? as i64 - TIMEF_OFS,
            _ => {
                let mut int = self.uint_be(3)? as i64 - TIMEF_INT_OFS;
                let (mut fraction, unit, modulus) = match fsp {
                    1 | 2 => (self.uint_be(1)? as i64, 10_000, 0x100),
                    3 | 4 => (self.uint_be(2)? as i64, 100, 0x1_0000),
                    _ => (0, 0, 0),
                };
                if int < 0 && fraction > 0 {
                    int += 1;
                    fraction -= modulus;
                }
                (int << 24) + fraction * unit
            }
        })
    }
}

/// A packed time as hours, minutes, seconds (10, 6 and 6 bits of the part above the 24
/// bits of microseconds), the hours split into days.
fn time_from_packed(packed: i64) -> MyValue {
    let magnitude = packed.unsigned_abs();
    let (hms, micros) = (magnitude >> 24, magnitude & 0xff_ffff);
    let hours = ((hms >> 12) & 0x3ff) as u32;
    MyValue::Time(
        packed < 0,
        hours / 24,
        (hours % 24) as u8,
        ((hms >> 6) & 63) as u8,
        (hms & 63) as u8,
        micros as u32,
    )
}

/// MySQL's binary JSON as JSON text.
fn jsonb_text(bytes: &[u8]) -> Result<String, String> {
    // An empty value is JSON null (`json_binary::parse_binary` of no bytes).
    if bytes.is_empty() {
        return Ok("null".into());
    }
    let value: jsonb::Value<'_> = ParseBuf(bytes)
        .parse(())
        .map_err(|e| format!("a JSON value the binlog holds is invalid: {e}"))?;
    let json = serde_json::Value::try_from(value)
        .map_err(|e| format!("a JSON value the binlog holds is invalid: {e}"))?;
    Ok(json.to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    //! Row images built by hand from MySQL's documented encodings (`sql/log_event.cc`'s
    //! `log_event_print_value`, `strings/decimal.cc`'s `decimal2bin`, `my_time.cc`'s
    //! `my_*_packed_to_binary`), not from this reader.

    use super::*;
    use ColumnType::*;

    fn read(columns: &[(ColumnType, &[u8])], present: &[usize], data: &[u8]) -> Vec<(usize, Cell)> {
        let layout = RowLayout::from_parts(columns).unwrap();
        let mut images = RowImages::new(&layout, data);
        let mut out = Vec::new();
        images.image(present, &mut out).unwrap();
        assert!(images.is_empty(), "bytes left after the image");
        out
    }

    /// The values of one image of the columns `columns`, all present.
    fn values(columns: &[(ColumnType, &[u8])], data: &[u8]) -> Vec<MyValue> {
        let present: Vec<usize> = (0..columns.len()).collect();
        read(columns, &present, data)
            .into_iter()
            .map(|(_, cell)| match cell {
                Cell::Value(value) => value,
                Cell::Json(json) => panic!("JSON {json}"),
            })
            .collect()
    }

    fn value(column: (ColumnType, &[u8]), bytes: &[u8]) -> MyValue {
        let mut data = vec![0]; // the null bitmap: nothing NULL
        data.extend_from_slice(bytes);
        values(&[column], &data).remove(0)
    }

    fn text(s: &str) -> MyValue {
        MyValue::Bytes(s.as_bytes().to_vec())
    }

    #[test]
    fn integers_are_little_endian_with_the_sign_their_bytes_hold() {
        let columns: [(ColumnType, &[u8]); 6] = [
            (MYSQL_TYPE_TINY, &[]),
            (MYSQL_TYPE_SHORT, &[]),
            (MYSQL_TYPE_INT24, &[]),
            (MYSQL_TYPE_INT24, &[]),
            (MYSQL_TYPE_LONG, &[]),
            (MYSQL_TYPE_LONGLONG, &[]),
        ];
        let data = [
            0x00, // null bitmap
            0xff, // -1
            0xfe, 0xff, // -2
            0x90, 0xee, 0xfe, // -70000 in 24-bit two's complement
            0xff, 0xff, 0x7f, // 8388607, the largest signed MEDIUMINT
            0x78, 0x56, 0x34, 0x12, // 0x12345678
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x80, // i64::MIN
        ];
        assert_eq!(
            values(&columns, &data),
            [
                MyValue::Int(-1),
                MyValue::Int(-2),
                MyValue::Int(-70_000),
                MyValue::Int(8_388_607),
                MyValue::Int(0x1234_5678),
                MyValue::Int(i64::MIN),
            ]
        );
    }

    #[test]
    fn floats_and_doubles_are_little_endian_ieee_754() {
        assert_eq!(
            value((MYSQL_TYPE_FLOAT, &[4]), &[0x00, 0x00, 0xc0, 0x3f]),
            MyValue::Float(1.5)
        );
        assert_eq!(
            value((MYSQL_TYPE_DOUBLE, &[8]), &[0, 0, 0, 0, 0, 0, 0xd0, 0xbf]),
            MyValue::Double(-0.25)
        );
    }

    #[test]
    fn decimals_are_mysqls_binary_decimal() {
        // decimal.cc's own example: 1234567890.1234 as DECIMAL(14,4).
        let d14_4: (ColumnType, &[u8]) = (MYSQL_TYPE_NEWDECIMAL, &[14, 4]);
        assert_eq!(
            value(d14_4, &[0x81, 0x0d, 0xfb, 0x38, 0xd2, 0x04, 0xd2]),
            text("1234567890.1234")
        );
        // Negative: every byte inverted.
        assert_eq!(
            value(d14_4, &[0x7e, 0xf2, 0x04, 0xc7, 0x2d, 0xfb, 0x2d]),
            text("-1234567890.1234")
        );
        // DECIMAL(12,2): one byte for the leading digit, four for nine, one for two.
        assert_eq!(
            value(
                (MYSQL_TYPE_NEWDECIMAL, &[12, 2]),
                &[0x80, 0x00, 0x00, 0x00, 0x0c, 0x32]
            ),
            text("12.50")
        );
    }

    #[test]
    fn year_is_the_year_minus_1900_and_0_is_0000() {
        let year: (ColumnType, &[u8]) = (MYSQL_TYPE_YEAR, &[]);
        assert_eq!(value(year, &[0]), MyValue::Int(0));
        assert_eq!(value(year, &[1]), MyValue::Int(1901));
        assert_eq!(value(year, &[255]), MyValue::Int(2155));
    }

    #[test]
    fn dates_pack_day_month_and_year_in_three_bytes() {
        // 2024-02-29: 29 | 2 << 5 | 2024 << 9 = 0x0fd05d.
        assert_eq!(
            value((MYSQL_TYPE_DATE, &[]), &[0x5d, 0xd0, 0x0f]),
            MyValue::Date(2024, 2, 29, 0, 0, 0, 0)
        );
        assert_eq!(
            value((MYSQL_TYPE_NEWDATE, &[]), &[0, 0, 0]),
            MyValue::Date(0, 0, 0, 0, 0, 0, 0)
        );
    }

    #[test]
    fn time2_is_packed_big_endian_and_negative_fractions_are_exact() {
        let time = |fsp: u8, bytes: &[u8]| {
            let meta = [fsp];
            value((MYSQL_TYPE_TIME2, &meta), bytes)
        };
        // 12:34:56: 0x800000 + (12 << 12 | 34 << 6 | 56).
        assert_eq!(
            time(0, &[0x80, 0xc8, 0xb8]),
            MyValue::Time(false, 0, 12, 34, 56, 0)
        );
        assert_eq!(
            time(0, &[0x7f, 0xf0, 0x00]),
            MyValue::Time(true, 0, 1, 0, 0, 0)
        );
        assert_eq!(
            time(2, &[0x80, 0x10, 0x00, 0x19]),
            MyValue::Time(false, 0, 1, 0, 0, 250_000)
        );
        // -01:00:00.25: the integer part one lower (-4097), the fraction byte -25 (0xe7).
        assert_eq!(
            time(2, &[0x7f, 0xef, 0xff, 0xe7]),
            MyValue::Time(true, 0, 1, 0, 0, 250_000)
        );
        // -00:00:01.5 as TIME(1): stored in hundredths like TIME(2).
        assert_eq!(
            time(1, &[0x7f, 0xff, 0xfe, 0xce]),
            MyValue::Time(true, 0, 0, 0, 1, 500_000)
        );
        // 838:59:59.9999: 34 days and 22 hours, the fraction in ten-thousandths.
        assert_eq!(
            time(4, &[0xb4, 0x6e, 0xfb, 0x27, 0x0f]),
            MyValue::Time(false, 34, 22, 59, 59, 999_900)
        );
        // -00:00:00.001 as TIME(3): -1 → 0x800000 - 1 and 0x10000 - 10.
        assert_eq!(
            time(3, &[0x7f, 0xff, 0xff, 0xff, 0xf6]),
            MyValue::Time(true, 0, 0, 0, 0, 1_000)
        );
        // TIME(6): the six bytes are one number, offset by 0x800000000000.
        assert_eq!(
            time(6, &[0x7f, 0xff, 0xff, 0xff, 0xff, 0xff]),
            MyValue::Time(true, 0, 0, 0, 0, 1)
        );
    }

    #[test]
    fn datetime2_packs_year_month_day_and_time_in_five_bytes() {
        // 2024-02-29 13:45:30: ((2024 * 13 + 2) << 5 | 29) << 17 | (13 << 12 | 45 << 6 | 30),
        // offset by 0x8000000000.
        let at = [0x99, 0xb2, 0xba, 0xdb, 0x5e];
        assert_eq!(
            value((MYSQL_TYPE_DATETIME2, &[0]), &at),
            MyValue::Date(2024, 2, 29, 13, 45, 30, 0)
        );
        let mut micros = at.to_vec();
        micros.extend([0x01, 0xe2, 0x40]); // 123456
        assert_eq!(
            value((MYSQL_TYPE_DATETIME2, &[6]), &micros),
            MyValue::Date(2024, 2, 29, 13, 45, 30, 123_456)
        );
    }

    #[test]
    fn timestamp2_is_big_endian_seconds_then_the_fraction() {
        let seconds = [0x65, 0x53, 0xf1, 0x00]; // 1700000000
        assert_eq!(
            value((MYSQL_TYPE_TIMESTAMP2, &[0]), &seconds),
            text("1700000000")
        );
        let mut millis = seconds.to_vec();
        millis.extend([0x09, 0xc4]); // .2500 in ten-thousandths
        assert_eq!(
            value((MYSQL_TYPE_TIMESTAMP2, &[3]), &millis),
            text("1700000000.250000")
        );
    }

    #[test]
    fn the_old_temporal_formats_are_decimal_digits_in_little_endian_integers() {
        assert_eq!(
            value(
                (MYSQL_TYPE_DATETIME, &[]),
                &[0xc2, 0xf0, 0xaa, 0x8b, 0x68, 0x12, 0x00, 0x00]
            ),
            MyValue::Date(2024, 2, 29, 13, 45, 30, 0)
        );
        // -12:34:56 as the 24-bit two's complement of -123456.
        assert_eq!(
            value((MYSQL_TYPE_TIME, &[]), &[0xc0, 0x1d, 0xfe]),
            MyValue::Time(true, 0, 12, 34, 56, 0)
        );
        assert_eq!(
            value((MYSQL_TYPE_TIMESTAMP, &[]), &[0x00, 0xf1, 0x53, 0x65]),
            text("1700000000")
        );
    }

    #[test]
    fn strings_have_a_length_as_wide_as_their_maximum_needs() {
        // VARCHAR(10): a one-byte length; VARCHAR of 300 bytes: two.
        assert_eq!(
            value((MYSQL_TYPE_VARCHAR, &[10, 0]), &[2, b'h', b'i']),
            text("hi")
        );
        assert_eq!(
            value((MYSQL_TYPE_VARCHAR, &[0x2c, 0x01]), &[2, 0, b'h', b'i']),
            text("hi")
        );
        assert_eq!(
            value((MYSQL_TYPE_VAR_STRING, &[255, 0]), &[1, b'x']),
            text("x")
        );
        // CHAR(4): real type 0xfe, then the length.
        assert_eq!(
            value((MYSQL_TYPE_STRING, &[0xfe, 4]), &[3, b'a', b'b', b'c']),
            text("abc")
        );
        // CHAR(100) in utf8mb4, 400 bytes: 0x100 of the length rides in the type byte as
        // 0xfe ^ 0x10, and the value has a two-byte length.
        assert_eq!(
            value((MYSQL_TYPE_STRING, &[0xee, 0x90]), &[1, 0, b'z']),
            text("z")
        );
        // BLOB (two-byte length), MEDIUMBLOB (three), GEOMETRY (four).
        assert_eq!(
            value((MYSQL_TYPE_BLOB, &[2]), &[3, 0, 0, 0xff, 1]),
            MyValue::Bytes(vec![0, 0xff, 1])
        );
        assert_eq!(
            value((MYSQL_TYPE_MEDIUM_BLOB, &[3]), &[1, 0, 0, 7]),
            MyValue::Bytes(vec![7])
        );
        assert_eq!(
            value((MYSQL_TYPE_GEOMETRY, &[4]), &[0, 0, 0, 0]),
            MyValue::Bytes(vec![])
        );
    }

    #[test]
    fn enums_sets_and_bits_are_their_index_mask_and_bytes() {
        // ENUM with one byte of index; as a table map gives it, type STRING, real type 0xf7.
        assert_eq!(
            value((MYSQL_TYPE_STRING, &[0xf7, 1]), &[3]),
            MyValue::Int(3)
        );
        assert_eq!(
            value((MYSQL_TYPE_ENUM, &[0xf7, 2]), &[0x2c, 0x01]),
            MyValue::Int(300)
        );
        // SET of 9 to 16 members: a two-byte little-endian mask.
        assert_eq!(
            value((MYSQL_TYPE_SET, &[0xf8, 2]), &[0b101, 0b1]),
            MyValue::Bytes(vec![0b101, 0b1])
        );
        // BIT(10): 2 bits beyond one whole byte, two bytes big-endian.
        assert_eq!(
            value((MYSQL_TYPE_BIT, &[2, 1]), &[0x02, 0x01]),
            MyValue::Bytes(vec![0x02, 0x01])
        );
    }

    #[test]
    fn json_is_mysqls_binary_json_as_text() {
        // {"a":1}: a small object of one member, the key at offset 11, the value an inline
        // int16.
        let object = [
            0x00, 0x01, 0x00, 0x0c, 0x00, 0x0b, 0x00, 0x01, 0x00, 0x05, 0x01, 0x00, b'a',
        ];
        let mut data = vec![0, object.len() as u8, 0, 0, 0];
        data.extend(object);
        assert_eq!(
            read(&[(MYSQL_TYPE_JSON, &[4])], &[0], &data),
            [(0, Cell::Json(r#"{"a":1}"#.into()))]
        );
        // The literal true.
        assert_eq!(
            read(
                &[(MYSQL_TYPE_JSON, &[4])],
                &[0],
                &[0, 2, 0, 0, 0, 0x04, 0x01]
            ),
            [(0, Cell::Json("true".into()))]
        );
    }

    #[test]
    fn null_columns_are_bits_of_the_null_bitmap_and_take_no_bytes() {
        let long: (ColumnType, &[u8]) = (MYSQL_TYPE_LONG, &[]);
        let columns = [long; 10];
        // Ten columns: a two-byte bitmap; columns 1 and 9 NULL.
        let mut data = vec![0b0000_0010, 0b0000_0010];
        for n in [0i32, 2, 3, 4, 5, 6, 7, 8] {
            data.extend(n.to_le_bytes());
        }
        let got = values(&columns, &data);
        assert_eq!(got[0], MyValue::Int(0));
        assert_eq!(got[1], MyValue::NULL);
        assert_eq!(got[8], MyValue::Int(8));
        assert_eq!(got[9], MyValue::NULL);
    }

    #[test]
    fn a_partial_column_bitmap_names_the_columns_an_image_holds() {
        let columns: [(ColumnType, &[u8]); 4] = [
            (MYSQL_TYPE_LONG, &[]),
            (MYSQL_TYPE_VARCHAR, &[10, 0]),
            (MYSQL_TYPE_LONG, &[]),
            (MYSQL_TYPE_TINY, &[]),
        ];
        // Columns 0 and 2 of 4 (bitmap 0b0101); the null bitmap is over those two: the
        // second of them (column 2) is NULL.
        let present = present_columns(&[0b0101], 4);
        assert_eq!(present, [0, 2]);
        let layout = RowLayout::from_parts(&columns).unwrap();
        // An UPDATE's pair: the before image of columns 0 and 2, the after image of all four.
        let mut data = vec![0b10, 7, 0, 0, 0];
        data.extend([0b0000, 8, 0, 0, 0, 2, b'h', b'i', 9, 0, 0, 0, 0xff]);
        let mut images = RowImages::new(&layout, &data);
        let mut out = Vec::new();
        images.image(&present, &mut out).unwrap();
        assert_eq!(
            out,
            [
                (0, Cell::Value(MyValue::Int(7))),
                (2, Cell::Value(MyValue::NULL))
            ]
        );
        images.image(&[0, 1, 2, 3], &mut out).unwrap();
        assert_eq!(
            out,
            [
                (0, Cell::Value(MyValue::Int(8))),
                (1, Cell::Value(text("hi"))),
                (2, Cell::Value(MyValue::Int(9))),
                (3, Cell::Value(MyValue::Int(-1))),
            ]
        );
        assert!(images.is_empty());
    }

    #[test]
    fn short_or_malformed_row_data_is_an_error_with_its_offset() {
        let layout =
            RowLayout::from_parts(&[(MYSQL_TYPE_LONG, &[]), (MYSQL_TYPE_BLOB, &[2])]).unwrap();
        let mut out = Vec::new();
        // The BLOB says 5 bytes and has 1.
        let data = [0, 1, 0, 0, 0, 5, 0, b'x'];
        let error = RowImages::new(&layout, &data)
            .image(&[0, 1], &mut out)
            .unwrap_err();
        assert_eq!(error.offset, 5);
        // A column the table map does not have.
        let error = RowImages::new(&layout, &[0, 1, 0, 0, 0])
            .image(&[2], &mut out)
            .unwrap_err();
        assert!(error.what.contains("column 2"), "{error}");
        // A negative TIME2 with every byte 0 must not panic either.
        let layout = RowLayout::from_parts(&[(MYSQL_TYPE_TIME2, &[2])]).unwrap();
        RowImages::new(&layout, &[0, 0, 0, 0, 0xff])
            .image(&[0], &mut out)
            .unwrap();
        assert!(RowLayout::from_parts(&[(MYSQL_TYPE_BLOB, &[9])]).is_err());
        assert!(RowLayout::from_parts(&[(MYSQL_TYPE_NEWDECIMAL, &[70, 2])]).is_err());
    }
}
