//! What the server's catalog (`information_schema`) says of the captured tables, and how each
//! MySQL column type maps onto the model's types. A column is described by the PostgreSQL
//! type its values land in (oid, type modifier and `format_type` spelling), so table sinks
//! create and alter their targets as for a PostgreSQL source; the README's type table lists
//! the mapping.

use mysql_async::prelude::Queryable;
use mysql_async::Conn;

use super::SourceError;
use crate::config::TablePattern;
use crate::event::{Column, Relation, ValueType};

/// A captured table's identity in the model (`Relation::oid`): stable across restarts and
/// schema changes, derived from its name (the server has no table oid in the binlog).
pub fn table_oid(database: &str, table: &str) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(database.as_bytes());
    hasher.update(b".");
    hasher.update(table.as_bytes());
    hasher.finalize()
}

/// One column as `information_schema.COLUMNS` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogColumn {
    pub name: String,
    /// `DATA_TYPE`, e.g. `int`, `varchar`, `enum`.
    pub data_type: String,
    /// `COLUMN_TYPE`, e.g. `int(10) unsigned`, `varchar(20)`, `enum('a','b')`.
    pub column_type: String,
    pub primary_key: bool,
    pub char_length: Option<u64>,
    pub precision: Option<u64>,
    pub scale: Option<u64>,
    pub datetime_precision: Option<u64>,
    /// `COLUMN_DEFAULT` as the server spells it (MariaDB quotes string literals).
    pub default: Option<String>,
}

/// The captured base tables that exist now, as (database, table), sorted.
pub async fn captured_tables(
    conn: &mut Conn,
    patterns: &[TablePattern],
) -> Result<Vec<(String, String)>, SourceError> {
    let databases: Vec<&str> = patterns.iter().map(|p| p.schema.as_str()).collect();
    let placeholders = vec!["?"; databases.len()].join(", ");
    let rows: Vec<(String, String)> = conn
        .exec(
            format!(
                "SELECT TABLE_SCHEMA, TABLE_NAME FROM information_schema.TABLES \
                 WHERE TABLE_TYPE = 'BASE TABLE' AND TABLE_SCHEMA IN ({placeholders}) \
                 ORDER BY TABLE_SCHEMA, TABLE_NAME"
            ),
            databases,
        )
        .await
        .map_err(|e| SourceError::query("listing the captured tables", e))?;
    Ok(rows
        .into_iter()
        .filter(|(db, table)| patterns.iter().any(|p| p.matches(db, table)))
        .collect())
}

/// The columns of `database.table` in their order; empty when the table does not exist.
pub async fn columns(
    conn: &mut Conn,
    database: &str,
    table: &str,
) -> Result<Vec<CatalogColumn>, SourceError> {
    type Row = (
        String,
        String,
        String,
        String,
        Option<u64>,
        Option<u64>,
        Option<u64>,
        Option<u64>,
        Option<String>,
    );
    let rows: Vec<Row> = conn
        .exec(
            "SELECT COLUMN_NAME, DATA_TYPE, COLUMN_TYPE, COLUMN_KEY, CHARACTER_MAXIMUM_LENGTH, \
             NUMERIC_PRECISION, NUMERIC_SCALE, DATETIME_PRECISION, COLUMN_DEFAULT \
             FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? \
             ORDER BY ORDINAL_POSITION",
            (database, table),
        )
        .await
        .map_err(|e| {
            SourceError::query(&format!("reading the columns of {database}.{table}"), e)
        })?;
    Ok(rows
        .into_iter()
        .map(
            |(name, data_type, column_type, key, char_length, precision, scale, dt, default)| {
                CatalogColumn {
                    name,
                    data_type: data_type.to_ascii_lowercase(),
                    column_type: column_type.to_ascii_lowercase(),
                    primary_key: key == "PRI",
                    char_length,
                    precision,
                    scale,
                    datetime_precision: dt,
                    default,
                }
            },
        )
        .collect())
}

/// The model's description of a table from its catalog columns.
pub fn relation(database: &str, table: &str, columns: &[CatalogColumn]) -> Relation {
    Relation {
        oid: table_oid(database, table),
        schema: database.to_owned(),
        table: table.to_owned(),
        columns: columns
            .iter()
            .map(|c| {
                let mapped = map_type(c);
                Column {
                    name: c.name.clone(),
                    type_oid: mapped.oid,
                    type_modifier: mapped.modifier,
                    type_name: mapped.name,
                    value_type: mapped.value_type,
                    primary_key: c.primary_key,
                    // The binlog's before image holds every column (binlog_row_image=FULL).
                    replica_identity: true,
                }
            })
            .collect(),
    }
}

/// The PostgreSQL type a MySQL column's values land in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappedType {
    pub value_type: ValueType,
    pub oid: u32,
    pub modifier: i32,
    /// As PostgreSQL's `format_type` spells it.
    pub name: String,
}

const BOOL: u32 = 16;
const BYTEA: u32 = 17;
const INT8: u32 = 20;
const INT2: u32 = 21;
const INT4: u32 = 23;
const TEXT: u32 = 25;
const JSON: u32 = 114;
const FLOAT4: u32 = 700;
const FLOAT8: u32 = 701;
const VARCHAR: u32 = 1043;
const DATE: u32 = 1082;
const TIME: u32 = 1083;
const TIMESTAMP: u32 = 1114;
const TIMESTAMPTZ: u32 = 1184;
const NUMERIC: u32 = 1700;

fn mapped(value_type: ValueType, oid: u32, modifier: i32, name: impl Into<String>) -> MappedType {
    MappedType {
        value_type,
        oid,
        modifier,
        name: name.into(),
    }
}

/// `numeric(p,s)` with PostgreSQL's type modifier for it.
fn numeric(precision: u64, scale: u64) -> MappedType {
    let modifier = i32::try_from((precision << 16) | scale).map_or(-1, |m| m + 4);
    mapped(
        ValueType::Numeric,
        NUMERIC,
        modifier,
        format!("numeric({precision},{scale})"),
    )
}

/// A time type with MySQL's fractional-second precision (0 to 6, as PostgreSQL's).
fn with_precision(value_type: ValueType, oid: u32, base: &str, zone: &str, fsp: u64) -> MappedType {
    let fsp = fsp.min(6);
    mapped(value_type, oid, fsp as i32, format!("{base}({fsp}) {zone}"))
}

pub fn map_type(column: &CatalogColumn) -> MappedType {
    let unsigned = column.column_type.contains("unsigned");
    let fsp = column.datetime_precision.unwrap_or(0);
    match column.data_type.as_str() {
        "tinyint" => mapped(ValueType::Int2, INT2, -1, "smallint"),
        "smallint" if unsigned => mapped(ValueType::Int4, INT4, -1, "integer"),
        "smallint" => mapped(ValueType::Int2, INT2, -1, "smallint"),
        "mediumint" => mapped(ValueType::Int4, INT4, -1, "integer"),
        "int" | "integer" if unsigned => mapped(ValueType::Int8, INT8, -1, "bigint"),
        "int" | "integer" => mapped(ValueType::Int4, INT4, -1, "integer"),
        "bigint" if unsigned => numeric(20, 0),
        "bigint" => mapped(ValueType::Int8, INT8, -1, "bigint"),
        "decimal" | "numeric" => numeric(column.precision.unwrap_or(10), column.scale.unwrap_or(0)),
        "float" => mapped(ValueType::Float4, FLOAT4, -1, "real"),
        "double" | "real" => mapped(ValueType::Float8, FLOAT8, -1, "double precision"),
        "bit" if column.precision == Some(1) => mapped(ValueType::Bool, BOOL, -1, "boolean"),
        "bit" => mapped(ValueType::Bytea, BYTEA, -1, "bytea"),
        "char" | "varchar" => match column.char_length.and_then(|n| i32::try_from(n).ok()) {
            Some(n) if n < 10_485_760 => mapped(
                ValueType::Text,
                VARCHAR,
                n + 4,
                format!("character varying({n})"),
            ),
            _ => mapped(ValueType::Text, TEXT, -1, "text"),
        },
        "binary" | "varbinary" | "tinyblob" | "blob" | "mediumblob" | "longblob" => {
            mapped(ValueType::Bytea, BYTEA, -1, "bytea")
        }
        "json" => mapped(ValueType::Json, JSON, -1, "json"),
        "date" => mapped(ValueType::Date, DATE, -1, "date"),
        "time" => with_precision(ValueType::Time, TIME, "time", "without time zone", fsp),
        "datetime" => with_precision(
            ValueType::Timestamp,
            TIMESTAMP,
            "timestamp",
            "without time zone",
            fsp,
        ),
        "timestamp" => with_precision(
            ValueType::TimestampTz,
            TIMESTAMPTZ,
            "timestamp",
            "with time zone",
            fsp,
        ),
        "year" => mapped(ValueType::Int2, INT2, -1, "smallint"),
        // Text types, ENUM and SET (as their labels), GEOMETRY (as WKT) and anything newer.
        _ => mapped(ValueType::Text, TEXT, -1, "text"),
    }
}

/// The labels of an `enum('a','b')` or `set('a','b')` column type, in order.
pub fn labels(column_type: &str) -> Vec<String> {
    let Some(inner) = column_type
        .split_once('(')
        .and_then(|(_, rest)| rest.strip_suffix(')'))
    else {
        return Vec::new();
    };
    let mut labels = Vec::new();
    let mut chars = inner.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\'' {
            continue;
        }
        let mut label = String::new();
        while let Some(c) = chars.next() {
            match c {
                // '' is a quote inside the label; a lone ' ends it.
                '\'' if chars.peek() == Some(&'\'') => {
                    chars.next();
                    label.push('\'');
                }
                '\'' => break,
                '\\' => {
                    if let Some(escaped) = chars.next() {
                        label.push(escaped);
                    }
                }
                c => label.push(c),
            }
        }
        labels.push(label);
    }
    labels
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn column(data_type: &str, column_type: &str) -> CatalogColumn {
        CatalogColumn {
            name: "c".into(),
            data_type: data_type.into(),
            column_type: column_type.into(),
            primary_key: false,
            char_length: None,
            precision: None,
            scale: None,
            datetime_precision: None,
            default: None,
        }
    }

    #[test]
    fn unsigned_integers_take_the_next_wider_type() {
        let name =
            |data_type: &str, column_type: &str| map_type(&column(data_type, column_type)).name;
        assert_eq!(name("smallint", "smallint(5) unsigned"), "integer");
        assert_eq!(name("int", "int(10) unsigned"), "bigint");
        assert_eq!(name("int", "int(11)"), "integer");
        assert_eq!(name("bigint", "bigint(20) unsigned"), "numeric(20,0)");
        assert_eq!(
            map_type(&column("bigint", "bigint(20) unsigned")).modifier,
            (20 << 16) + 4
        );
    }

    #[test]
    fn lengths_precisions_and_zones_carry_over() {
        let mut c = column("varchar", "varchar(40)");
        c.char_length = Some(40);
        assert_eq!(map_type(&c).name, "character varying(40)");
        assert_eq!(map_type(&c).modifier, 44);
        let mut c = column("decimal", "decimal(12,2)");
        (c.precision, c.scale) = (Some(12), Some(2));
        assert_eq!(map_type(&c).name, "numeric(12,2)");
        let mut c = column("datetime", "datetime(3)");
        c.datetime_precision = Some(3);
        assert_eq!(map_type(&c).name, "timestamp(3) without time zone");
        let c = column("timestamp", "timestamp");
        assert_eq!(map_type(&c).name, "timestamp(0) with time zone");
        assert_eq!(map_type(&c).value_type, ValueType::TimestampTz);
    }

    #[test]
    fn enum_and_set_labels_are_read_with_their_quotes() {
        assert_eq!(
            labels("enum('new','paid','it''s')"),
            ["new", "paid", "it's"]
        );
        assert_eq!(labels("set('a','b,c')"), ["a", "b,c"]);
        assert!(labels("int(11)").is_empty());
    }
}
