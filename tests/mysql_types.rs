#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Every MySQL / MariaDB column type the README's type table lists, through both of the
//! source's decode paths (the snapshot's binary-protocol queries and the binlog's row
//! images) into a PostgreSQL merge mirror and JSONL envelopes: the mirror holds the values
//! stated here and the values MariaDB itself prints, and a row taken by the snapshot and the
//! same row read from the binlog make equal envelopes. Then a snapshot taken while a writer
//! keeps changing the table: nothing lost, nothing doubled.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::agent::{eventually, every_sink, mirror_sink, AgentSetup, EVENTS_SINK};
use common::mariadb::{assert_no_envelope_twice, MariaDb};
use common::PgCluster;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value as Json};

/// How long a sink may take to apply what was committed before it is declared stuck.
const WAIT: Duration = Duration::from_secs(120);

/// A session time zone far from UTC (and not a whole hour), so that a TIMESTAMP read in the
/// session's zone instead of UTC shows.
const SERVER_TIME_ZONE: &str = "+05:30";

/// One column of `every_type`.
struct TypedColumn {
    name: &'static str,
    mysql_type: &'static str,
    /// The mirror's column type, as PostgreSQL's `format_type` spells it (the README's table).
    pg_type: &'static str,
    /// The mirror's column read as text; a `timestamptz` in UTC, whatever the session's zone.
    pg_text: &'static str,
    /// A MariaDB expression and a mirror expression whose text forms must agree, where the
    /// two servers print the type alike once normalised; None where they cannot be made to
    /// (floats print exponents differently).
    same_text: Option<(&'static str, &'static str)>,
}

const fn column(
    name: &'static str,
    mysql_type: &'static str,
    pg_type: &'static str,
    pg_text: &'static str,
    same_text: Option<(&'static str, &'static str)>,
) -> TypedColumn {
    TypedColumn {
        name,
        mysql_type,
        pg_type,
        pg_text,
        same_text,
    }
}

/// The table's columns besides `id`, one per type of the README's MySQL table.
const EVERY_TYPE: &[TypedColumn] = &[
    column("t_tiny", "TINYINT", "smallint", "t_tiny::text", Some(("t_tiny", "t_tiny"))),
    column("t_tiny_u", "TINYINT UNSIGNED", "smallint", "t_tiny_u::text", Some(("t_tiny_u", "t_tiny_u"))),
    column("t_small", "SMALLINT", "smallint", "t_small::text", Some(("t_small", "t_small"))),
    column("t_small_u", "SMALLINT UNSIGNED", "integer", "t_small_u::text", Some(("t_small_u", "t_small_u"))),
    column("t_medium", "MEDIUMINT", "integer", "t_medium::text", Some(("t_medium", "t_medium"))),
    column("t_medium_u", "MEDIUMINT UNSIGNED", "integer", "t_medium_u::text", Some(("t_medium_u", "t_medium_u"))),
    column("t_int", "INT", "integer", "t_int::text", Some(("t_int", "t_int"))),
    column("t_int_u", "INT UNSIGNED", "bigint", "t_int_u::text", Some(("t_int_u", "t_int_u"))),
    column("t_big", "BIGINT", "bigint", "t_big::text", Some(("t_big", "t_big"))),
    column("t_big_u", "BIGINT UNSIGNED", "numeric(20,0)", "t_big_u::text", Some(("t_big_u", "t_big_u"))),
    column("t_decimal", "DECIMAL(10,2)", "numeric(10,2)", "t_decimal::text", Some(("t_decimal", "t_decimal"))),
    column("t_decimal_wide", "DECIMAL(65,30)", "numeric(65,30)", "t_decimal_wide::text", Some(("t_decimal_wide", "t_decimal_wide"))),
    column("t_float", "FLOAT", "real", "t_float::text", None),
    column("t_double", "DOUBLE", "double precision", "t_double::text", None),
    column("t_flag", "BIT(1)", "boolean", "t_flag::text", Some(("t_flag + 0", "t_flag::int"))),
    column("t_bits", "BIT(12)", "bytea", "t_bits::text", Some(("LPAD(LOWER(HEX(t_bits)), 4, '0')", "encode(t_bits, 'hex')"))),
    column("t_date", "DATE", "date", "t_date::text", Some(("t_date", "t_date"))),
    column("t_datetime", "DATETIME(6)", "timestamp(6) without time zone", "t_datetime::text",
        Some(("DATE_FORMAT(t_datetime, '%Y-%m-%d %H:%i:%s.%f')", "to_char(t_datetime, 'YYYY-MM-DD HH24:MI:SS.US')"))),
    column("t_timestamp", "TIMESTAMP(6) NULL", "timestamp(6) with time zone", "(t_timestamp AT TIME ZONE 'UTC')::text",
        Some((
            "DATE_FORMAT(CONVERT_TZ(t_timestamp, @@session.time_zone, '+00:00'), '%Y-%m-%d %H:%i:%s.%f')",
            "to_char(t_timestamp AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US')",
        ))),
    column("t_time", "TIME(6)", "time(6) without time zone", "t_time::text",
        Some(("TIME_FORMAT(t_time, '%H:%i:%s.%f')", "to_char(t_time, 'HH24:MI:SS.US')"))),
    column("t_year", "YEAR", "smallint", "t_year::text", Some(("t_year + 0", "t_year"))),
    column("t_char", "CHAR(10)", "character varying(10)", "t_char::text", Some(("t_char", "t_char"))),
    column("t_varchar", "VARCHAR(40)", "character varying(40)", "t_varchar::text", Some(("t_varchar", "t_varchar"))),
    column("t_binary", "BINARY(6)", "bytea", "t_binary::text", Some(("LOWER(HEX(t_binary))", "encode(t_binary, 'hex')"))),
    column("t_varbinary", "VARBINARY(16)", "bytea", "t_varbinary::text", Some(("LOWER(HEX(t_varbinary))", "encode(t_varbinary, 'hex')"))),
    column("t_blob", "BLOB", "bytea", "t_blob::text", Some(("LOWER(HEX(t_blob))", "encode(t_blob, 'hex')"))),
    column("t_text", "TEXT", "text", "t_text::text", Some(("t_text", "t_text"))),
    column("t_enum", "ENUM('small','medium','large')", "text", "t_enum::text", Some(("t_enum", "t_enum"))),
    column("t_set", "SET('red','green','blue')", "text", "t_set::text", Some(("t_set", "t_set"))),
    // MariaDB's JSON is LONGTEXT with a json_valid check: the catalog says longtext, and the
    // README's text row applies.
    column("t_json", "JSON", "text", "t_json::text", Some(("t_json", "t_json"))),
    column("t_geometry", "GEOMETRY", "text", "t_geometry::text", Some((
        "CONCAT(IF(ST_SRID(t_geometry) <> 0, CONCAT('SRID=', ST_SRID(t_geometry), ';'), ''), ST_AsText(t_geometry))",
        "t_geometry",
    ))),
    column("t_point", "POINT", "text", "t_point::text", Some((
        "CONCAT(IF(ST_SRID(t_point) <> 0, CONCAT('SRID=', ST_SRID(t_point), ';'), ''), ST_AsText(t_point))",
        "t_point",
    ))),
];

/// One value of one column: how it is written in MariaDB, what the mirror must show of it
/// as text (None: NULL), and what the envelope must carry.
struct Cell {
    sql: &'static str,
    mirror: Option<&'static str>,
    envelope: Json,
}

fn cell(sql: &'static str, mirror: &'static str, envelope: Json) -> Cell {
    Cell {
        sql,
        mirror: Some(mirror),
        envelope,
    }
}

/// A JSON number as serde_json reads the envelope's text of it: its float parsing is not
/// exact in the last bit, so a number is compared as read from the same text.
fn number(text: &str) -> Json {
    serde_json::from_str(text).expect("a JSON number")
}

fn null() -> Cell {
    Cell {
        sql: "NULL",
        mirror: None,
        envelope: Json::Null,
    }
}

/// A row's values, by column name.
struct ValueSet {
    what: &'static str,
    cells: BTreeMap<&'static str, Cell>,
}

/// The rows of `every_type`, each stated three ways: as MariaDB SQL, as PostgreSQL text and
/// as envelope JSON (the README's encodings, e.g. dates as days since 1970-01-01, DATETIME
/// as microseconds, bytes as base64).
fn value_sets() -> Vec<ValueSet> {
    let largest = [
        ("t_tiny", cell("127", "127", json!(127))),
        ("t_tiny_u", cell("255", "255", json!(255))),
        ("t_small", cell("32767", "32767", json!(32767))),
        ("t_small_u", cell("65535", "65535", json!(65535))),
        ("t_medium", cell("8388607", "8388607", json!(8_388_607))),
        (
            "t_medium_u",
            cell("16777215", "16777215", json!(16_777_215)),
        ),
        (
            "t_int",
            cell("2147483647", "2147483647", json!(2_147_483_647)),
        ),
        (
            "t_int_u",
            cell("4294967295", "4294967295", json!(4_294_967_295u32)),
        ),
        (
            "t_big",
            cell(
                "9223372036854775807",
                "9223372036854775807",
                json!(i64::MAX),
            ),
        ),
        (
            "t_big_u",
            cell(
                "18446744073709551615",
                "18446744073709551615",
                json!("18446744073709551615"),
            ),
        ),
        (
            "t_decimal",
            cell("99999999.99", "99999999.99", json!("99999999.99")),
        ),
        (
            "t_decimal_wide",
            cell(
                "99999999999999999999999999999999999.999999999999999999999999999999",
                "99999999999999999999999999999999999.999999999999999999999999999999",
                json!("99999999999999999999999999999999999.999999999999999999999999999999"),
            ),
        ),
        // A FLOAT is the decimal MariaDB prints for it (as a PostgreSQL float4 is).
        (
            "t_float",
            cell("3.40282e38", "3.40282e+38", number("3.40282e38")),
        ),
        (
            "t_double",
            cell(
                "1.7976931348623157e308",
                "1.7976931348623157e+308",
                number("1.7976931348623157e308"),
            ),
        ),
        ("t_flag", cell("b'1'", "true", json!(true))),
        ("t_bits", cell("b'101010101010'", "\\x0aaa", json!("Cqo="))),
        (
            "t_date",
            cell("'9999-12-31'", "9999-12-31", json!(2_932_896)),
        ),
        (
            "t_datetime",
            cell(
                "'9999-12-31 23:59:59.999999'",
                "9999-12-31 23:59:59.999999",
                json!(253_402_300_799_999_999i64),
            ),
        ),
        // The largest TIMESTAMP, 2038-01-19 03:14:07.999999 UTC, in the session's +05:30.
        (
            "t_timestamp",
            cell(
                "'2038-01-19 08:44:07.999999'",
                "2038-01-19 03:14:07.999999",
                json!("2038-01-19T03:14:07.999999Z"),
            ),
        ),
        (
            "t_time",
            cell(
                "'23:59:59.999999'",
                "23:59:59.999999",
                json!(86_399_999_999i64),
            ),
        ),
        ("t_year", cell("2155", "2155", json!(2155))),
        (
            "t_char",
            cell("'🦀 Zürich'", "🦀 Zürich", json!("🦀 Zürich")),
        ),
        (
            "t_varchar",
            cell(
                "'emoji 🦀, clef 𝄞, ünïcode'",
                "emoji 🦀, clef 𝄞, ünïcode",
                json!("emoji 🦀, clef 𝄞, ünïcode"),
            ),
        ),
        // BINARY(n) is padded with zero bytes to its length: the value is six bytes.
        (
            "t_binary",
            cell("x'FF00FE01'", "\\xff00fe010000", json!("/wD+AQAA")),
        ),
        (
            "t_varbinary",
            cell("x'00FF8000'", "\\x00ff8000", json!("AP+AAA==")),
        ),
        (
            "t_blob",
            cell(
                "x'89504E470D0A1A0A00FF'",
                "\\x89504e470d0a1a0a00ff",
                json!("iVBORw0KGgoA/w=="),
            ),
        ),
        (
            "t_text",
            cell(
                "'line one\\nline two 🎉'",
                "line one\nline two 🎉",
                json!("line one\nline two 🎉"),
            ),
        ),
        ("t_enum", cell("'large'", "large", json!("large"))),
        (
            "t_set",
            cell(
                "'red,green,blue'",
                "red,green,blue",
                json!("red,green,blue"),
            ),
        ),
        (
            "t_json",
            cell(
                r#"'{"nested": {"list": [1, 2.5, -3e2, true, false, null, "ünï🦀"]}, "big": 12345678901234567890}'"#,
                r#"{"nested": {"list": [1, 2.5, -3e2, true, false, null, "ünï🦀"]}, "big": 12345678901234567890}"#,
                json!(
                    r#"{"nested": {"list": [1, 2.5, -3e2, true, false, null, "ünï🦀"]}, "big": 12345678901234567890}"#
                ),
            ),
        ),
        (
            "t_geometry",
            cell(
                "ST_GeomFromText('POLYGON((0 0,4 0,4 4,0 4,0 0),(1 1,2 1,2 2,1 1))')",
                "POLYGON((0 0,4 0,4 4,0 4,0 0),(1 1,2 1,2 2,1 1))",
                json!("POLYGON((0 0,4 0,4 4,0 4,0 0),(1 1,2 1,2 2,1 1))"),
            ),
        ),
        (
            "t_point",
            cell(
                "ST_GeomFromText('POINT(1.5 -2.25)')",
                "POINT(1.5 -2.25)",
                json!("POINT(1.5 -2.25)"),
            ),
        ),
    ];
    let smallest = [
        ("t_tiny", cell("-128", "-128", json!(-128))),
        ("t_tiny_u", cell("0", "0", json!(0))),
        ("t_small", cell("-32768", "-32768", json!(-32768))),
        ("t_small_u", cell("0", "0", json!(0))),
        ("t_medium", cell("-8388608", "-8388608", json!(-8_388_608))),
        ("t_medium_u", cell("0", "0", json!(0))),
        (
            "t_int",
            cell("-2147483648", "-2147483648", json!(-2_147_483_648i64)),
        ),
        ("t_int_u", cell("0", "0", json!(0))),
        (
            "t_big",
            cell(
                "-9223372036854775808",
                "-9223372036854775808",
                json!(i64::MIN),
            ),
        ),
        ("t_big_u", cell("0", "0", json!("0"))),
        ("t_decimal", cell("-0.05", "-0.05", json!("-0.05"))),
        (
            "t_decimal_wide",
            cell(
                "-0.000000000000000000000000000001",
                "-0.000000000000000000000000000001",
                json!("-0.000000000000000000000000000001"),
            ),
        ),
        ("t_float", cell("-1.1", "-1.1", number("-1.1"))),
        (
            "t_double",
            cell(
                "-2.2250738585072014e-308",
                "-2.2250738585072014e-308",
                number("-2.2250738585072014e-308"),
            ),
        ),
        ("t_flag", cell("b'0'", "false", json!(false))),
        ("t_bits", cell("b'000000000001'", "\\x0001", json!("AAE="))),
        (
            "t_date",
            cell("'1000-01-01'", "1000-01-01", json!(-354_285)),
        ),
        (
            "t_datetime",
            cell(
                "'1000-01-01 00:00:00.000001'",
                "1000-01-01 00:00:00.000001",
                json!(-30_610_223_999_999_999i64),
            ),
        ),
        // The smallest TIMESTAMP but one second, 1970-01-01 00:00:01.000001 UTC.
        (
            "t_timestamp",
            cell(
                "'1970-01-01 05:30:01.000001'",
                "1970-01-01 00:00:01.000001",
                json!("1970-01-01T00:00:01.000001Z"),
            ),
        ),
        ("t_time", cell("'00:00:00'", "00:00:00", json!(0))),
        ("t_year", cell("1901", "1901", json!(1901))),
        ("t_char", cell("''", "", json!(""))),
        (
            "t_varchar",
            cell(
                r#"'tab\there "quoted" back\\slash'"#,
                "tab\there \"quoted\" back\\slash",
                json!("tab\there \"quoted\" back\\slash"),
            ),
        ),
        // The zero bytes BINARY pads with are all there is of an empty value.
        (
            "t_binary",
            cell("x''", "\\x000000000000", json!("AAAAAAAA")),
        ),
        ("t_varbinary", cell("x''", "\\x", json!(""))),
        ("t_blob", cell("x''", "\\x", json!(""))),
        ("t_text", cell("''", "", json!(""))),
        ("t_enum", cell("'small'", "small", json!("small"))),
        ("t_set", cell("''", "", json!(""))),
        ("t_json", cell("'[]'", "[]", json!("[]"))),
        (
            "t_geometry",
            cell(
                "ST_GeomFromText('LINESTRING(-1.5 2.25,3 -4)', 4326)",
                "SRID=4326;LINESTRING(-1.5 2.25,3 -4)",
                json!("SRID=4326;LINESTRING(-1.5 2.25,3 -4)"),
            ),
        ),
        (
            "t_point",
            cell(
                "ST_GeomFromText('POINT(-180 90)', 4326)",
                "SRID=4326;POINT(-180 90)",
                json!("SRID=4326;POINT(-180 90)"),
            ),
        ),
    ];
    let everyday = [
        ("t_tiny", cell("-1", "-1", json!(-1))),
        ("t_tiny_u", cell("200", "200", json!(200))),
        ("t_small", cell("-300", "-300", json!(-300))),
        ("t_small_u", cell("40000", "40000", json!(40000))),
        ("t_medium", cell("-70000", "-70000", json!(-70000))),
        ("t_medium_u", cell("9000000", "9000000", json!(9_000_000))),
        ("t_int", cell("42", "42", json!(42))),
        (
            "t_int_u",
            cell("3000000000", "3000000000", json!(3_000_000_000u32)),
        ),
        ("t_big", cell("-42", "-42", json!(-42))),
        (
            "t_big_u",
            cell(
                "9223372036854775808",
                "9223372036854775808",
                json!("9223372036854775808"),
            ),
        ),
        ("t_decimal", cell("19.9", "19.90", json!("19.90"))),
        (
            "t_decimal_wide",
            cell(
                "-12345678901234567890.5",
                "-12345678901234567890.500000000000000000000000000000",
                json!("-12345678901234567890.500000000000000000000000000000"),
            ),
        ),
        ("t_float", cell("0.5", "0.5", json!(0.5))),
        ("t_double", cell("0.1", "0.1", number("0.1"))),
        ("t_flag", cell("b'1'", "true", json!(true))),
        ("t_bits", cell("b'100100011'", "\\x0123", json!("ASM="))),
        ("t_date", cell("'2024-02-29'", "2024-02-29", json!(19782))),
        (
            "t_datetime",
            cell(
                "'2024-02-29 13:14:15.5'",
                "2024-02-29 13:14:15.5",
                json!(1_709_212_455_500_000i64),
            ),
        ),
        (
            "t_timestamp",
            cell(
                "'2024-02-29 19:44:15'",
                "2024-02-29 14:14:15",
                json!("2024-02-29T14:14:15Z"),
            ),
        ),
        (
            "t_time",
            cell("'12:34:56.5'", "12:34:56.5", json!(45_296_500_000i64)),
        ),
        // YEAR's zero year.
        ("t_year", cell("'0000'", "0", json!(0))),
        // CHAR drops trailing spaces when read, never leading ones.
        (
            "t_char",
            cell("'  padded  '", "  padded", json!("  padded")),
        ),
        ("t_varchar", cell("'plain'", "plain", json!("plain"))),
        (
            "t_binary",
            cell("x'000000000080'", "\\x000000000080", json!("AAAAAACA")),
        ),
        ("t_varbinary", cell("x'C328'", "\\xc328", json!("wyg="))),
        (
            "t_blob",
            cell(
                "'plain text'",
                "\\x706c61696e2074657874",
                json!("cGxhaW4gdGV4dA=="),
            ),
        ),
        ("t_text", cell("'it''s'", "it's", json!("it's"))),
        ("t_enum", cell("'medium'", "medium", json!("medium"))),
        // A SET reads in its definition's order, whatever the order written.
        ("t_set", cell("'blue,red'", "red,blue", json!("red,blue"))),
        // The JSON document null, not SQL NULL.
        ("t_json", cell("'null'", "null", json!("null"))),
        (
            "t_geometry",
            cell(
                "ST_GeomFromText('GEOMETRYCOLLECTION(POINT(1 2),LINESTRING(0 0,1 1))')",
                "GEOMETRYCOLLECTION(POINT(1 2),LINESTRING(0 0,1 1))",
                json!("GEOMETRYCOLLECTION(POINT(1 2),LINESTRING(0 0,1 1))"),
            ),
        ),
        (
            "t_point",
            cell("POINT(0.1, 0.2)", "POINT(0.1 0.2)", json!("POINT(0.1 0.2)")),
        ),
    ];
    let nulls = EVERY_TYPE.iter().map(|c| (c.name, null())).collect();
    vec![
        ValueSet {
            what: "largest values",
            cells: largest.into_iter().collect(),
        },
        ValueSet {
            what: "smallest values",
            cells: smallest.into_iter().collect(),
        },
        ValueSet {
            what: "NULL in every column",
            cells: nulls,
        },
        ValueSet {
            what: "everyday values",
            cells: everyday.into_iter().collect(),
        },
    ]
}

/// The fields of one line of COPY text (PostgreSQL's `COPY … TO STDOUT`, or the `mariadb`
/// client's batch output, whose escapes are the same and whose NULL is `null_marker`).
fn text_fields(line: &str, null_marker: &str) -> Vec<Option<String>> {
    line.split('\t')
        .map(|field| {
            if field == null_marker {
                return None;
            }
            let mut value = String::new();
            let mut chars = field.chars();
            while let Some(c) = chars.next() {
                if c != '\\' {
                    value.push(c);
                    continue;
                }
                match chars.next() {
                    Some('t') => value.push('\t'),
                    Some('n') => value.push('\n'),
                    Some('r') => value.push('\r'),
                    Some('0') => value.push('\0'),
                    Some(other) => value.push(other),
                    None => value.push('\\'),
                }
            }
            Some(value)
        })
        .collect()
}

/// Rows of text fields, keyed by their first field (the `id`).
type TextRows = BTreeMap<i64, Vec<Option<String>>>;

fn text_rows(output: &str, null_marker: &str) -> TextRows {
    output
        .split('\n')
        .filter(|line| !line.is_empty())
        .map(|line| {
            let mut fields = text_fields(line, null_marker);
            let id = fields
                .remove(0)
                .expect("an id")
                .parse()
                .expect("a numeric id");
            (id, fields)
        })
        .collect()
}

/// `expressions` over the mirror table `replica.{table}`, one row per id; empty while the
/// table is not there.
fn mirror_rows(pg: &PgCluster, warehouse: &str, table: &str, expressions: &[&str]) -> TextRows {
    let sql = format!(
        "COPY (SELECT id, {} FROM replica.{table} ORDER BY id) TO STDOUT",
        expressions.join(", ")
    );
    pg.try_psql(warehouse, &sql)
        .map(|output| text_rows(&output, "\\N"))
        .unwrap_or_default()
}

/// `expressions` over the source table, one row per id, as MariaDB prints them.
fn source_rows(my: &MariaDb, db: &str, table: &str, expressions: &[&str]) -> TextRows {
    let sql = format!(
        "SELECT id, {} FROM {table} ORDER BY id",
        expressions.join(", ")
    );
    text_rows(&my.query(db, &sql), "NULL")
}

/// Differences between two sets of rows, one line per differing field.
fn differences(
    names: &[&str],
    expected: &TextRows,
    found: &TextRows,
    expected_what: &str,
) -> Vec<String> {
    let ids: BTreeSet<i64> = expected.keys().chain(found.keys()).copied().collect();
    let mut lines = Vec::new();
    for id in ids {
        match (expected.get(&id), found.get(&id)) {
            (Some(want), Some(got)) => {
                for (i, name) in names.iter().enumerate() {
                    if want.get(i) != got.get(i) {
                        lines.push(format!(
                            "id {id}, {name}: {expected_what} {:?}, mirror {:?}",
                            want.get(i),
                            got.get(i)
                        ));
                    }
                }
            }
            (Some(_), None) => lines.push(format!("id {id}: missing from the mirror")),
            (None, Some(_)) => lines.push(format!("id {id}: in the mirror only")),
            (None, None) => {}
        }
    }
    lines
}

/// The envelope of `table` with operation `op` whose row (after, or before for a delete)
/// has `id`.
fn envelope_of<'a>(envelopes: &'a [Json], table: &str, op: &str, id: i64) -> Option<&'a Json> {
    envelopes.iter().find(|e| {
        let image = if op == "d" { &e["before"] } else { &e["after"] };
        e["source"]["table"] == table && e["op"] == op && image["id"] == id
    })
}

/// An envelope's row image without its `id`, which differs between rows holding the same
/// values.
fn values_of(image: &Json) -> Json {
    let mut image = image.clone();
    if let Some(object) = image.as_object_mut() {
        object.remove("id");
    }
    image
}

/// The dead letters of `sink`; none when it never wrote one.
fn dead_letters(setup: &AgentSetup, sink: &str) -> Vec<Json> {
    let path = setup.data_dir().join(format!("dead_letters/{sink}.jsonl"));
    if path.exists() {
        setup.dead_letters(sink)
    } else {
        Vec::new()
    }
}

fn insert_sql(table: &str, id: i64, set: &ValueSet) -> String {
    let names: Vec<&str> = EVERY_TYPE.iter().map(|c| c.name).collect();
    let values: Vec<&str> = EVERY_TYPE.iter().map(|c| set.cells[c.name].sql).collect();
    format!(
        "INSERT INTO {table} (id, {}) VALUES ({id}, {});",
        names.join(", "),
        values.join(", ")
    )
}

/// What the mirror must hold for a row of `set`, as its text fields.
fn expected_mirror_row(set: &ValueSet) -> Vec<Option<String>> {
    EVERY_TYPE
        .iter()
        .map(|c| set.cells[c.name].mirror.map(str::to_owned))
        .collect()
}

/// Rows taken by the snapshot have ids 1..=4 (one per value set), rows written to the binlog
/// ids 11..=14; id 15 is inserted with NULLs and updated to the everyday values, id 16
/// inserted with the largest values and deleted.
#[test]
fn every_type_arrives_exactly_through_snapshot_and_binlog() {
    let my = MariaDb::start_with(&[("default-time-zone", SERVER_TIME_ZONE)]);
    let db = my.fresh_database("types");
    let definitions: Vec<String> = EVERY_TYPE
        .iter()
        .map(|c| format!("{} {}", c.name, c.mysql_type))
        .collect();
    my.exec(
        &db,
        &format!(
            "CREATE TABLE every_type (id INT PRIMARY KEY, {})",
            definitions.join(", ")
        ),
    );
    let sets = value_sets();
    let snapshot_rows: String = sets
        .iter()
        .zip(1..)
        .map(|(set, id)| insert_sql("every_type", id, set))
        .collect();
    my.exec(&db, &snapshot_rows);

    let pg = PgCluster::start();
    let warehouse = pg.fresh_database("warehouse");
    let setup = AgentSetup::with_source(
        &my.source_toml(&db, &format!("\"{db}.every_type\"")),
        &every_sink(&pg.url(&warehouse)),
    );
    let mut agent = setup.start();
    agent.wait_log("streaming the binlog", WAIT);

    let binlog_rows: String = sets
        .iter()
        .zip(11..)
        .map(|(set, id)| insert_sql("every_type", id, set))
        .collect();
    let assignments: Vec<String> = EVERY_TYPE
        .iter()
        .map(|c| format!("{} = {}", c.name, sets[3].cells[c.name].sql))
        .collect();
    my.exec(
        &db,
        &format!(
            "START TRANSACTION; {binlog_rows} COMMIT;
             {}
             UPDATE every_type SET {} WHERE id = 15;
             {}
             DELETE FROM every_type WHERE id = 16;",
            insert_sql("every_type", 15, &sets[2]),
            assignments.join(", "),
            insert_sql("every_type", 16, &sets[0]),
        ),
    );

    // The mirror's column types are the README's.
    let types = pg.psql(
        &warehouse,
        "SELECT attname || ' ' || format_type(atttypid, atttypmod) FROM pg_attribute \
         WHERE attrelid = 'replica.every_type'::regclass AND attnum > 1 AND NOT attisdropped \
         ORDER BY attnum",
    );
    let expected_types: Vec<String> = EVERY_TYPE
        .iter()
        .map(|c| format!("{} {}", c.name, c.pg_type))
        .collect();
    assert_eq!(types.lines().collect::<Vec<_>>(), expected_types);

    // The mirror holds the stated values.
    let names: Vec<&str> = EVERY_TYPE.iter().map(|c| c.name).collect();
    let pg_text: Vec<&str> = EVERY_TYPE.iter().map(|c| c.pg_text).collect();
    let mut expected = TextRows::new();
    for (set, id) in sets.iter().zip(1..) {
        expected.insert(id, expected_mirror_row(set));
        expected.insert(id + 10, expected_mirror_row(set));
    }
    expected.insert(15, expected_mirror_row(&sets[3]));
    let mut found = TextRows::new();
    let arrived = eventually(WAIT, || {
        found = mirror_rows(&pg, &warehouse, "every_type", &pg_text);
        found == expected
    });
    assert!(
        arrived,
        "the mirror differs from the stated values:\n{}",
        differences(&names, &expected, &found, "stated").join("\n")
    );

    // ... and the values MariaDB itself prints.
    let (names_alike, (mariadb_exprs, pg_exprs)): (Vec<&str>, (Vec<&str>, Vec<&str>)) = EVERY_TYPE
        .iter()
        .filter_map(|c| c.same_text.map(|pair| (c.name, pair)))
        .unzip();
    let source = source_rows(&my, &db, "every_type", &mariadb_exprs);
    let mirror = mirror_rows(&pg, &warehouse, "every_type", &pg_exprs);
    assert!(
        source == mirror,
        "the mirror differs from MariaDB's own text:\n{}",
        differences(&names_alike, &source, &mirror, "MariaDB").join("\n")
    );

    // The envelopes: the snapshot's carry the stated values, and the binlog's equal them.
    let mut envelopes = Vec::new();
    assert!(eventually(WAIT, || {
        envelopes = setup.envelopes();
        envelope_of(&envelopes, "every_type", "d", 16).is_some()
    }));
    for (set, id) in sets.iter().zip(1..) {
        let snapshot = envelope_of(&envelopes, "every_type", "r", id)
            .unwrap_or_else(|| panic!("no snapshot envelope for id {id}"));
        let mut wrong = Vec::new();
        for column in EVERY_TYPE {
            let want = &set.cells[column.name].envelope;
            let got = &snapshot["after"][column.name];
            if want != got {
                wrong.push(format!("{}: stated {want}, envelope {got}", column.name));
            }
        }
        assert!(
            wrong.is_empty(),
            "the snapshot's envelope of the {} (id {id}) differs:\n{}",
            set.what,
            wrong.join("\n")
        );
        let streamed = envelope_of(&envelopes, "every_type", "c", id + 10)
            .unwrap_or_else(|| panic!("no binlog envelope for id {}", id + 10));
        assert_eq!(
            values_of(&streamed["after"]),
            values_of(&snapshot["after"]),
            "the binlog's envelope of the {} differs from the snapshot's",
            set.what
        );
    }
    let update = envelope_of(&envelopes, "every_type", "u", 15).expect("the update of id 15");
    let nulls = envelope_of(&envelopes, "every_type", "r", 3).unwrap();
    let everyday = envelope_of(&envelopes, "every_type", "r", 4).unwrap();
    assert_eq!(values_of(&update["before"]), values_of(&nulls["after"]));
    assert_eq!(values_of(&update["after"]), values_of(&everyday["after"]));
    let delete = envelope_of(&envelopes, "every_type", "d", 16).unwrap();
    let largest = envelope_of(&envelopes, "every_type", "r", 1).unwrap();
    assert_eq!(values_of(&delete["before"]), values_of(&largest["after"]));
    assert_eq!(dead_letters(&setup, "mirror"), Vec::<Json>::new());
    agent.terminate();
}

/// TIME beyond a day and below zero (MySQL allows -838:59:59 to 838:59:59) reaches the
/// envelope as signed microseconds, from the snapshot (whose rows the log keeps as COPY text)
/// as from the binlog; zero dates, and dates with a zero part, are NULL. A PostgreSQL `time`
/// holds only the spans of a day: the merge mirror takes those and dead-letters the rows of
/// the others, never wrapping or clamping them into another time of day, and goes on. Ids
/// 1..=4 are taken by the snapshot, 11..=14 are the same values from the binlog.
#[test]
fn times_a_postgresql_time_cannot_hold_agree_and_are_dead_lettered() {
    let my = MariaDb::start_with(&[("default-time-zone", SERVER_TIME_ZONE)]);
    let db = my.fresh_database("edges");
    my.exec(
        &db,
        "CREATE TABLE edge_values (
            id INT PRIMARY KEY,
            span TIME(6),
            span_cs TIME(2),
            day DATE,
            moment DATETIME,
            stamp TIMESTAMP NULL
        )",
    );
    // (values as SQL, the envelope's values, whether a PostgreSQL `time` holds both spans)
    let rows: [(&str, [Json; 5], bool); 4] = [
        (
            "'838:59:59', '-01:00:00.25', '0000-00-00', '0000-00-00 00:00:00', '0000-00-00 00:00:00'",
            [json!(3_020_399_000_000i64), json!(-3_600_250_000i64), Json::Null, Json::Null, Json::Null],
            false,
        ),
        (
            "'-838:59:59', '-00:00:00.5', NULL, NULL, NULL",
            [json!(-3_020_399_000_000i64), json!(-500_000), Json::Null, Json::Null, Json::Null],
            false,
        ),
        (
            "'24:00:00', '00:00:00.01', '2024-02-00', '2024-00-01 00:00:00', NULL",
            [json!(86_400_000_000i64), json!(10_000), Json::Null, Json::Null, Json::Null],
            true,
        ),
        (
            "'-00:00:00.000001', '23:59:59.99', '1970-01-01', '1970-01-01 00:00:00', '1970-01-01 05:30:01'",
            [json!(-1), json!(86_399_990_000i64), json!(0), json!(0), json!("1970-01-01T00:00:01Z")],
            false,
        ),
    ];
    let insert = |first_id: i64| -> String {
        rows.iter()
            .zip(first_id..)
            .map(|((values, _, _), id)| format!("INSERT INTO edge_values VALUES ({id}, {values});"))
            .collect()
    };
    my.exec(&db, &insert(1));

    let pg = PgCluster::start();
    let warehouse = pg.fresh_database("warehouse");
    let setup = AgentSetup::with_source(
        &my.source_toml(&db, &format!("\"{db}.edge_values\"")),
        &format!(
            "{}
{EVENTS_SINK}",
            mirror_sink(&pg.url(&warehouse))
        ),
    );
    let mut agent = setup.start();
    agent.wait_log("streaming the binlog", WAIT);
    my.exec(&db, &insert(11));

    let names = ["span", "span_cs", "day", "moment", "stamp"];
    let mut envelopes = Vec::new();
    assert!(eventually(WAIT, || {
        envelopes = setup.envelopes();
        envelope_of(&envelopes, "edge_values", "c", 14).is_some()
    }));
    for ((_, expected, _), id) in rows.iter().zip(1..) {
        for (op, id) in [("r", id), ("c", id + 10)] {
            let envelope = envelope_of(&envelopes, "edge_values", op, id)
                .unwrap_or_else(|| panic!("no envelope {op} for id {id}"));
            let found: Vec<&Json> = names.iter().map(|n| &envelope["after"][n]).collect();
            assert_eq!(
                found,
                expected.iter().collect::<Vec<_>>(),
                "the envelope ({op}) of id {id}, columns {names:?}"
            );
        }
    }

    // Only the spans a `time` holds reach the mirror; the others are dead letters, never
    // wrapped or clamped into another time of day.
    let mut mirrored = TextRows::new();
    assert!(
        eventually(WAIT, || {
            mirrored = mirror_rows(&pg, &warehouse, "edge_values", &names);
            mirrored.keys().copied().collect::<Vec<_>>() == [3, 13]
        }),
        "the mirror holds {mirrored:?}"
    );
    let third = Some(vec![
        Some("24:00:00".to_owned()),
        Some("00:00:00.01".to_owned()),
        None,
        None,
        None,
    ]);
    assert_eq!(mirrored.get(&3).cloned(), third);
    assert_eq!(mirrored.get(&13).cloned(), third);
    let mut refused = BTreeSet::new();
    assert!(
        eventually(WAIT, || {
            refused = dead_letters(&setup, "mirror")
                .iter()
                .filter_map(|letter| letter["row"]["id"].as_i64())
                .collect();
            refused.len() == 6
        }),
        "the mirror's dead letters are for ids {refused:?}"
    );
    let expected_refused: BTreeSet<i64> = rows
        .iter()
        .zip(1..)
        .filter(|((_, _, fits), _)| !fits)
        .flat_map(|(_, id)| [id, id + 10])
        .collect();
    assert_eq!(refused, expected_refused);
    assert!(agent.is_running(), "{}", agent.log());
    agent.terminate();
}

/// Rows of the `ledger` table as MariaDB holds them: (account, entry) → (amount, note).
type Ledger = BTreeMap<(i64, i64), (i64, String)>;

fn ledger_in_source(my: &MariaDb, db: &str) -> Ledger {
    my.query(
        db,
        "SELECT account, entry, amount, note FROM ledger ORDER BY account, entry",
    )
    .lines()
    .map(|line| {
        let fields: Vec<&str> = line.split('\t').collect();
        (
            (fields[0].parse().unwrap(), fields[1].parse().unwrap()),
            (fields[2].parse().unwrap(), fields[3].to_owned()),
        )
    })
    .collect()
}

/// One transaction of the writer: a few inserts, multi-row updates, deletes and primary-key
/// moves (across the snapshot's key ranges), committed or rolled back.
fn ledger_transaction(rng: &mut rand::rngs::StdRng, serial: &AtomicU64) -> String {
    let mut statements = vec!["START TRANSACTION".to_owned()];
    for _ in 0..rng.gen_range(2..7) {
        let n = serial.fetch_add(1, Ordering::Relaxed);
        // Accounts past the snapshot's highest key land in its open-ended last range.
        let account = rng.gen_range(0..700);
        let entry = rng.gen_range(0..100);
        statements.push(match rng.gen_range(0..5) {
            0 => format!(
                "INSERT INTO ledger VALUES ({account}, {}, {}, 'new {n}')",
                100_000 + n,
                rng.gen_range(-1000..1000)
            ),
            1 => format!(
                "UPDATE ledger SET amount = amount + {}, note = 'upd {n}' \
                 WHERE account = {account} AND entry < {entry}",
                rng.gen_range(1..50)
            ),
            2 => format!("DELETE FROM ledger WHERE account = {account} AND entry = {entry}"),
            3 => format!(
                "UPDATE ledger SET account = {}, entry = {}, note = 'moved {n}' \
                 WHERE account = {account} AND entry = {entry}",
                rng.gen_range(0..700),
                100_000 + n
            ),
            _ => format!(
                "DELETE FROM ledger WHERE account = {account} AND entry BETWEEN {entry} AND {}",
                entry + 3
            ),
        });
    }
    statements.push(
        if rng.gen_bool(0.15) {
            "ROLLBACK"
        } else {
            "COMMIT"
        }
        .to_owned(),
    );
    statements.join(";\n")
}

/// The snapshot is taken (by two readers, over key ranges) while a writer keeps changing the
/// table; afterwards the mirror and the history's current versions equal the table, and the
/// JSONL envelopes replayed in order build the table again with no row read twice by the
/// snapshot, no insert of a row already there, and no update or delete of a row not there.
#[test]
fn snapshot_under_concurrent_writes_loses_and_doubles_nothing() {
    let my = MariaDb::start();
    let db = my.fresh_database("ledger");
    // More rows than the snapshot's threshold for splitting a table into key ranges.
    my.exec(
        &db,
        "CREATE TABLE ledger (
            account INT NOT NULL,
            entry INT NOT NULL,
            amount BIGINT NOT NULL,
            note VARCHAR(40) NOT NULL,
            PRIMARY KEY (account, entry)
        );
        INSERT INTO ledger
            SELECT seq DIV 100, seq MOD 100, seq * 7, CONCAT('row ', seq) FROM seq_0_to_59999;
        ANALYZE TABLE ledger;",
    );
    let pg = PgCluster::start();
    let warehouse = pg.fresh_database("warehouse");
    let setup = AgentSetup::with_source(
        &my.source_toml(&db, &format!("\"{db}.ledger\"")),
        &every_sink(&pg.url(&warehouse)),
    );

    let stop = AtomicBool::new(false);
    let committed_or_not = AtomicU64::new(0);
    let serial = AtomicU64::new(0);
    std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(0x001e_d6e5);
            while !stop.load(Ordering::Relaxed) {
                my.exec(&db, &ledger_transaction(&mut rng, &serial));
                committed_or_not.fetch_add(1, Ordering::Relaxed);
            }
        });
        let transactions_by = |count: u64| {
            assert!(
                eventually(WAIT, || committed_or_not.load(Ordering::Relaxed) >= count),
                "the writer is stuck"
            );
        };
        transactions_by(10);
        let mut agent = setup.start();
        agent.wait_log("streaming the binlog", WAIT);
        assert!(
            agent
                .log()
                .contains("snapshot reads the table in key ranges"),
            "the snapshot read the ledger whole, not in ranges by its readers:\n{}",
            agent.log()
        );
        let at_streaming = committed_or_not.load(Ordering::Relaxed);
        transactions_by(at_streaming + 100);
        stop.store(true, Ordering::Relaxed);
        writer.join().expect("the writer");
        assert!(
            agent.log().contains("snapshot done"),
            "the snapshot did not finish: {}",
            agent.log()
        );

        let columns = "account, entry, amount, note";
        let source = my.dump(&db, "ledger", columns);
        let mut mirror = String::new();
        let same = eventually(WAIT, || {
            mirror = pg.dump(&warehouse, "replica.ledger", columns);
            mirror == source
        });
        assert!(same, "{}", first_difference("mirror", &source, &mirror));
        let mut current = String::new();
        let same = eventually(WAIT, || {
            current = pg.dump(&warehouse, "history.ledger WHERE is_current", columns);
            current == source
        });
        assert!(
            same,
            "{}",
            first_difference("history's current versions", &source, &current)
        );
        agent.terminate();
    });

    let envelopes: Vec<Json> = setup
        .envelopes()
        .into_iter()
        .filter(|e| e["source"]["table"] == "ledger")
        .collect();
    assert_no_envelope_twice(&envelopes);

    let key = |image: &Json| {
        (
            image["account"].as_i64().unwrap(),
            image["entry"].as_i64().unwrap(),
        )
    };
    let mut replayed = Ledger::new();
    let mut snapshot_reads = 0;
    for envelope in &envelopes {
        let (before, after) = (&envelope["before"], &envelope["after"]);
        let op = envelope["op"].as_str().unwrap();
        if matches!(op, "u" | "d") {
            assert!(
                replayed.remove(&key(before)).is_some(),
                "{op} of a row the envelopes before it never created: {envelope}"
            );
        }
        if matches!(op, "r" | "c" | "u") {
            snapshot_reads += usize::from(op == "r");
            let values = (
                after["amount"].as_i64().unwrap(),
                after["note"].as_str().unwrap().to_owned(),
            );
            assert!(
                replayed.insert(key(after), values).is_none(),
                "{op} of a row that exists already: {envelope}"
            );
        }
    }
    assert!(
        snapshot_reads > 50_000,
        "{snapshot_reads} rows read by the snapshot"
    );
    let source = ledger_in_source(&my, &db);
    assert_eq!(replayed.len(), source.len());
    let differing: Vec<_> = source
        .iter()
        .filter(|(key, values)| replayed.get(key) != Some(values))
        .take(5)
        .collect();
    assert!(
        differing.is_empty(),
        "the envelopes replayed differ at {differing:?}"
    );
}

/// The first line where `expected` (the source) and `found` differ, for a failure message.
fn first_difference(what: &str, expected: &str, found: &str) -> String {
    let (expected_lines, found_lines) = (expected.lines().count(), found.lines().count());
    let at = expected
        .lines()
        .zip(found.lines())
        .position(|(a, b)| a != b);
    format!(
        "the {what} differs from the source ({expected_lines} rows in the source, \
         {found_lines} in the {what}); first difference at row {at:?}: source {:?}, {what} {:?}",
        at.and_then(|i| expected.lines().nth(i)),
        at.and_then(|i| found.lines().nth(i)),
    )
}

/// A negative TIME with a fraction arrives exactly at every precision, the one- and two-digit
/// ones included: their binlog form keeps the integer part one lower and the fraction as its
/// complement (`-01:00:00.25` is -4097 and -25), which mysql_common 0.35 read into an unsigned
/// integer (a panic, or a wrong time without overflow checks).
#[test]
fn a_negative_time_with_a_fraction_arrives_exactly() {
    let my = MariaDb::start();
    let db = my.fresh_database("edges");
    my.exec(
        &db,
        "CREATE TABLE spans (id INT PRIMARY KEY, t1 TIME(1), t2 TIME(2), t3 TIME(3), t5 TIME(5))",
    );
    let setup = AgentSetup::with_source(
        &my.source_toml(&db, &format!("\"{db}.spans\"")),
        EVENTS_SINK,
    );
    let mut agent = setup.start();
    agent.wait_log("streaming the binlog", WAIT);
    my.exec(
        &db,
        "INSERT INTO spans VALUES
            (1, '-01:00:00.2', '-01:00:00.25', '-01:00:00.251', '-01:00:00.25001'),
            (2, '-00:00:00.5', '-00:00:00.01', '-00:00:00.001', '-00:00:00.00001'),
            (3, '-838:59:59.9', '-838:59:59.99', '-838:59:59.999', '-838:59:59.99999'),
            (4, '00:00:00.1', '23:59:59.99', '-00:00:01', '838:59:59.99999');
         UPDATE spans SET t2 = '-00:00:01.5' WHERE id = 4;",
    );
    let hour: i64 = 3_600_000_000;
    let max: i64 = 3_020_399_000_000; // 838:59:59
    let expected: [(&str, i64, [i64; 4]); 5] = [
        (
            "c",
            1,
            [
                -hour - 200_000,
                -hour - 250_000,
                -hour - 251_000,
                -hour - 250_010,
            ],
        ),
        ("c", 2, [-500_000, -10_000, -1_000, -10]),
        (
            "c",
            3,
            [
                -max - 900_000,
                -max - 990_000,
                -max - 999_000,
                -max - 999_990,
            ],
        ),
        ("c", 4, [100_000, 86_399_990_000, -1_000_000, max + 999_990]),
        ("u", 4, [100_000, -1_500_000, -1_000_000, max + 999_990]),
    ];
    let mut envelopes = Vec::new();
    assert!(
        eventually(WAIT, || {
            envelopes = setup.envelopes();
            envelope_of(&envelopes, "spans", "u", 4).is_some()
        }),
        "the rows did not arrive:\n{}",
        agent.log()
    );
    for (op, id, times) in expected {
        let envelope = envelope_of(&envelopes, "spans", op, id)
            .unwrap_or_else(|| panic!("no envelope {op} for id {id}"));
        let found: Vec<&Json> = ["t1", "t2", "t3", "t5"]
            .iter()
            .map(|n| &envelope["after"][n])
            .collect();
        let times: Vec<Json> = times.iter().map(|t| json!(t)).collect();
        assert_eq!(found, times.iter().collect::<Vec<_>>(), "{op} of id {id}");
    }
    assert!(agent.is_running(), "{}", agent.log());
    agent.terminate();
}
