//! Debezium's JSON value payload (schemas disabled) for one change: `before`, `after`, the
//! `source` block, `op`, `ts_ms`/`ts_us`/`ts_ns` and the `transaction` block. Values follow
//! Debezium's default encodings, except numeric and money, which are exact strings
//! (`decimal.handling.mode=string`). A TOASTed value the change left untouched is Debezium's
//! placeholder. An update that changes the primary key becomes a delete of the old key and a
//! create of the new one, as Debezium emits it.

use std::collections::HashMap;
use std::io::Write;

use base64::Engine;
use serde::ser::{SerializeMap, SerializeSeq, Serializer};
use serde::Serialize;

use crate::event::{ChangeEvent, Op, Position, Relation, Row, TxBegin, TxOrigin, Value};

pub const UNAVAILABLE_VALUE: &str = "__debezium_unavailable_value";
/// Debezium's average month (365.25 / 12 days) for interval → microseconds.
const MICROS_PER_MONTH: f64 = 30.4375 * 86_400_000_000.0;
const MICROS_PER_DAY: i64 = 86_400_000_000;

/// Who produced the envelopes: the `name` and `db` of the `source` block.
#[derive(Debug, Clone)]
pub struct SourceInfo {
    pub connector: &'static str,
    pub name: String,
    pub database: String,
}

/// Counts a transaction's events for the `transaction` block, and the rows of each binlog
/// event for MySQL's `row`.
#[derive(Debug, Default)]
pub struct TransactionOrder {
    total: u64,
    per_table: HashMap<(String, String), u64>,
    /// The position of the last change and how many changes before it had that position.
    event_row: Option<(Position, u64)>,
}

impl TransactionOrder {
    fn next(&mut self, relation: &Relation) -> (u64, u64) {
        self.total += 1;
        let per_table = self
            .per_table
            .entry((relation.schema.clone(), relation.table.clone()))
            .or_default();
        *per_table += 1;
        (self.total, *per_table)
    }

    /// The change's row number within the source event at its position (a MySQL rows event
    /// holds many rows at one position).
    fn row_in_event(&mut self, position: Position) -> u64 {
        let row = match self.event_row {
            Some((last, row)) if last == position => row + 1,
            _ => 0,
        };
        self.event_row = Some((position, row));
        row
    }
}

/// Writes the envelopes of one change, one JSON object per line, and advances `order`.
/// `now_ns` (nanoseconds since the Unix epoch) is the processing time of the top-level
/// `ts_ms`/`ts_us`/`ts_ns`; the `source` block's are the commit time.
pub fn write_envelopes<W: Write>(
    out: &mut W,
    source: &SourceInfo,
    tx: &TxBegin,
    relation: &Relation,
    change: &ChangeEvent,
    order: &mut TransactionOrder,
    now_ns: i64,
) -> std::io::Result<()> {
    let snapshot = match change.op {
        Op::Read => "true",
        Op::IncrementalRead => "incremental",
        _ => "false",
    };
    let row_in_event = order.row_in_event(change.position);
    let mut emit = |op: &'static str, before: Option<&Row>, after: Option<&Row>| {
        let (total_order, table_order) = order.next(relation);
        let common = CommonSourceJson {
            version: env!("CARGO_PKG_VERSION"),
            connector: source.connector,
            name: &source.name,
            ts_ms: tx.commit_ts.div_euclid(1000),
            // The sources' commit timestamps have microseconds: the nanoseconds are exact.
            ts_us: tx.commit_ts,
            ts_ns: tx.commit_ts.saturating_mul(1000),
            snapshot,
        };
        let (source_json, transaction_id) = match &tx.origin {
            TxOrigin::Postgres { xid } => (
                SourceJson::Postgres(PostgresSourceJson {
                    common,
                    db: &source.database,
                    sequence: format!("[\"{}\",\"{}\"]", tx.commit_position.0, change.position.0),
                    schema: &relation.schema,
                    table: &relation.table,
                    tx_id: *xid,
                    lsn: change.position.0,
                    xmin: None,
                }),
                format!("{xid}:{}", tx.commit_position.0),
            ),
            TxOrigin::MySql {
                server_id,
                thread,
                file,
                gtid,
                ..
            } => (
                SourceJson::MySql(MySqlSourceJson {
                    common,
                    db: &relation.schema,
                    sequence: None,
                    table: &relation.table,
                    server_id: *server_id,
                    gtid: gtid.as_deref(),
                    file,
                    pos: change.position.binlog_offset(),
                    row: row_in_event,
                    thread: *thread,
                    query: None,
                }),
                match gtid {
                    Some(gtid) => gtid.clone(),
                    None => format!("{file}:{}", tx.commit_position.binlog_offset()),
                },
            ),
        };
        let envelope = Envelope {
            before: before.map(|row| RowJson { relation, row }),
            after: after.map(|row| RowJson { relation, row }),
            source: source_json,
            op,
            ts_ms: now_ns.div_euclid(1_000_000),
            ts_us: now_ns.div_euclid(1000),
            ts_ns: now_ns,
            transaction: TransactionJson {
                id: transaction_id,
                total_order,
                data_collection_order: table_order,
            },
        };
        serde_json::to_writer(&mut *out, &envelope)?;
        out.write_all(b"\n")
    };
    match change.op {
        Op::Insert => emit("c", None, change.after.as_ref()),
        Op::Read | Op::IncrementalRead => emit("r", None, change.after.as_ref()),
        Op::Delete => emit("d", change.before.as_ref(), None),
        Op::Truncate => emit("t", None, None),
        Op::Update => match (&change.before, &change.after) {
            (Some(before), Some(after)) if key_changed(relation, before, after) => {
                emit("d", Some(before), None)?;
                emit("c", None, Some(after))
            }
            (before, after) => {
                let full_before = before.as_ref().filter(|b| is_full_row(relation, b));
                emit("u", full_before, after.as_ref())
            }
        },
    }
}

/// Whether an update moved the row to another primary key. A table without a primary key has
/// no key to move (Debezium's message key is null there): its update is one `u`, even under
/// REPLICA IDENTITY FULL, where every column is part of the identity.
pub fn key_changed(relation: &Relation, before: &Row, after: &Row) -> bool {
    relation
        .primary_key_indexes()
        .any(|i| match (before.get(i), after.get(i)) {
            (Some(Value::UnchangedToast), _) | (_, Some(Value::UnchangedToast)) => false,
            (b, a) => b != a,
        })
}

/// An old row under REPLICA IDENTITY FULL carries every column; an old key only the key.
fn is_full_row(relation: &Relation, row: &Row) -> bool {
    relation
        .columns
        .iter()
        .zip(row)
        .any(|(c, v)| !c.replica_identity && *v != Value::Null)
        || relation.columns.iter().all(|c| c.replica_identity)
}

#[derive(Serialize)]
struct Envelope<'a> {
    before: Option<RowJson<'a>>,
    after: Option<RowJson<'a>>,
    source: SourceJson<'a>,
    op: &'static str,
    ts_ms: i64,
    ts_us: i64,
    ts_ns: i64,
    transaction: TransactionJson,
}

/// The `source` block as the Debezium connector of the source's database writes it.
#[derive(Serialize)]
#[serde(untagged)]
enum SourceJson<'a> {
    Postgres(PostgresSourceJson<'a>),
    MySql(MySqlSourceJson<'a>),
}

/// The fields every connector's `source` block starts with.
#[derive(Serialize)]
struct CommonSourceJson<'a> {
    version: &'static str,
    connector: &'static str,
    name: &'a str,
    ts_ms: i64,
    snapshot: &'static str,
    ts_us: i64,
    ts_ns: i64,
}

#[derive(Serialize)]
struct PostgresSourceJson<'a> {
    #[serde(flatten)]
    common: CommonSourceJson<'a>,
    db: &'a str,
    sequence: String,
    schema: &'a str,
    table: &'a str,
    #[serde(rename = "txId")]
    tx_id: u32,
    lsn: u64,
    xmin: Option<u64>,
}

#[derive(Serialize)]
struct MySqlSourceJson<'a> {
    #[serde(flatten)]
    common: CommonSourceJson<'a>,
    db: &'a str,
    sequence: Option<&'a str>,
    table: &'a str,
    server_id: u32,
    gtid: Option<&'a str>,
    file: &'a str,
    pos: u64,
    row: u64,
    thread: u32,
    query: Option<&'a str>,
}

#[derive(Serialize)]
struct TransactionJson {
    id: String,
    total_order: u64,
    data_collection_order: u64,
}

/// A row as Debezium's `before`/`after` object: column name → value.
pub struct RowJson<'a> {
    pub relation: &'a Relation,
    pub row: &'a Row,
}

impl Serialize for RowJson<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.row.len()))?;
        for (column, value) in self.relation.columns.iter().zip(self.row) {
            map.serialize_entry(&column.name, &ValueJson(value))?;
        }
        map.end()
    }
}

struct ValueJson<'a>(&'a Value);

impl Serialize for ValueJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Value::Null => s.serialize_none(),
            Value::UnchangedToast => s.serialize_str(UNAVAILABLE_VALUE),
            Value::Bool(b) => s.serialize_bool(*b),
            Value::Int(i) => s.serialize_i64(*i),
            Value::Float(f) if f.is_nan() => s.serialize_str("NaN"),
            Value::Float(f) if f.is_infinite() => {
                s.serialize_str(if *f > 0.0 { "Infinity" } else { "-Infinity" })
            }
            Value::Float(f) => s.serialize_f64(*f),
            Value::Numeric(n) => s.serialize_str(n),
            Value::Text(t) | Value::Uuid(t) | Value::Json(t) => s.serialize_str(t),
            Value::TimeTz {
                micros,
                offset_secs,
            } => s.serialize_str(&zoned_time(*micros, *offset_secs)),
            Value::Bytes(b) => {
                s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(b))
            }
            Value::Date(d) => s.serialize_i32(*d),
            Value::Time(t) | Value::Timestamp(t) => s.serialize_i64(*t),
            Value::TimestampTz(t) => s.serialize_str(&zoned_timestamp(*t)),
            Value::Interval {
                months,
                days,
                micros,
            } => {
                let total = f64::from(*months) * MICROS_PER_MONTH
                    + (i64::from(*days) * MICROS_PER_DAY + micros) as f64;
                s.serialize_i64(total.round() as i64)
            }
            Value::Array(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(&ValueJson(item))?;
                }
                seq.end()
            }
        }
    }
}

/// Debezium's ZonedTime: the time of day normalised to UTC, wrapped into one day, as
/// `HH:MM:SS[.ffffff]Z` with the fraction only as long as needed.
fn zoned_time(local_micros: i64, offset_secs: i32) -> String {
    let utc = local_micros
        .saturating_sub(i64::from(offset_secs) * 1_000_000)
        .rem_euclid(MICROS_PER_DAY);
    let seconds = utc / 1_000_000;
    let fraction = utc % 1_000_000;
    let base = format!(
        "{:02}:{:02}:{:02}",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60
    );
    if fraction == 0 {
        format!("{base}Z")
    } else {
        let digits = format!("{fraction:06}");
        format!("{base}.{}Z", digits.trim_end_matches('0'))
    }
}

/// Debezium's ZonedTimestamp: ISO-8601 in UTC, fraction only as long as needed.
fn zoned_timestamp(micros: i64) -> String {
    match micros {
        i64::MAX => return "infinity".into(),
        i64::MIN => return "-infinity".into(),
        _ => {}
    }
    let Some(ts) = chrono::DateTime::from_timestamp_micros(micros) else {
        return micros.to_string();
    };
    let base = ts.format("%Y-%m-%dT%H:%M:%S").to_string();
    let fraction = micros.rem_euclid(1_000_000);
    if fraction == 0 {
        format!("{base}Z")
    } else {
        let digits = format!("{fraction:06}");
        format!("{base}.{}Z", digits.trim_end_matches('0'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Column, RelationId, ValueType};

    /// `orders (id PRIMARY KEY, note)` with the default replica identity.
    fn relation() -> Relation {
        orders(true, false)
    }

    /// `orders (id, note)`: `id` the primary key or not; the replica identity the key, or
    /// every column (FULL).
    fn orders(id_is_key: bool, identity_full: bool) -> Relation {
        let column = |name: &str, pk: bool| Column {
            name: name.into(),
            type_oid: 23,
            type_modifier: -1,
            type_name: "integer".into(),
            value_type: ValueType::Int4,
            primary_key: pk,
            replica_identity: pk || identity_full,
        };
        Relation {
            oid: 1,
            schema: "public".into(),
            table: "orders".into(),
            columns: vec![column("id", id_is_key), column("note", false)],
        }
    }

    fn render(op: Op, before: Option<Row>, after: Option<Row>) -> Vec<serde_json::Value> {
        render_with(&relation(), op, before, after)
    }

    fn render_with(
        relation: &Relation,
        op: Op,
        before: Option<Row>,
        after: Option<Row>,
    ) -> Vec<serde_json::Value> {
        let change = ChangeEvent {
            relation: RelationId(1),
            position: Position(500),
            op,
            before,
            after,
        };
        let tx = TxBegin {
            origin: TxOrigin::Postgres { xid: 7 },
            commit_position: Position(600),
            commit_ts: 1_732_460_000_123_456,
        };
        let source = SourceInfo {
            connector: "postgresql",
            name: "shop".into(),
            database: "shopdb".into(),
        };
        let mut out = Vec::new();
        let mut order = TransactionOrder::default();
        let now_ns = 1_732_460_000_456_789_012;
        write_envelopes(
            &mut out, &source, &tx, relation, &change, &mut order, now_ns,
        )
        .unwrap();
        String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn insert_envelope_has_debezium_fields() {
        let events = render(Op::Insert, None, Some(vec![Value::Int(7), Value::Null]));
        let e = &events[0];
        assert_eq!(e["op"], "c");
        assert_eq!(e["before"], serde_json::Value::Null);
        assert_eq!(e["after"]["id"], 7);
        assert_eq!(e["source"]["connector"], "postgresql");
        assert_eq!(e["source"]["name"], "shop");
        assert_eq!(e["source"]["db"], "shopdb");
        assert_eq!(e["source"]["ts_ms"], 1_732_460_000_123i64);
        assert_eq!(e["source"]["ts_us"], 1_732_460_000_123_456i64);
        assert_eq!(e["source"]["ts_ns"], 1_732_460_000_123_456_000i64);
        assert_eq!(e["source"]["txId"], 7);
        assert_eq!(e["source"]["lsn"], 500);
        assert_eq!(e["source"]["sequence"], "[\"600\",\"500\"]");
        assert_eq!(e["source"]["snapshot"], "false");
        assert_eq!(e["ts_ms"], 1_732_460_000_456i64);
        assert_eq!(e["ts_us"], 1_732_460_000_456_789i64);
        assert_eq!(e["ts_ns"], 1_732_460_000_456_789_012i64);
        assert_eq!(e["transaction"]["id"], "7:600");
        assert_eq!(e["transaction"]["total_order"], 1);
    }

    #[test]
    fn mysql_envelope_has_the_mysql_connectors_source_block() {
        let mut relation = relation();
        relation.schema = "shop".into();
        let tx = TxBegin {
            origin: TxOrigin::MySql {
                server_id: 223344,
                thread: 12,
                file: "binlog.000003".into(),
                gtid: Some("0-223344-41".into()),
                gtid_state: Some("0-223344-41".into()),
            },
            commit_position: Position::binlog(3, 900),
            commit_ts: 1_732_460_000_123_000,
        };
        let source = SourceInfo {
            connector: "mysql",
            name: "shop".into(),
            database: "shop".into(),
        };
        let mut out = Vec::new();
        let mut order = TransactionOrder::default();
        for (position, id) in [(400, 1), (400, 2), (700, 3)] {
            let change = ChangeEvent {
                relation: RelationId(1),
                position: Position::binlog(3, position),
                op: Op::Insert,
                before: None,
                after: Some(vec![Value::Int(id), Value::Null]),
            };
            write_envelopes(&mut out, &source, &tx, &relation, &change, &mut order, 0).unwrap();
        }
        let events: Vec<serde_json::Value> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let rows: Vec<_> = events
            .iter()
            .map(|e| (e["source"]["pos"].clone(), e["source"]["row"].clone()))
            .collect();
        assert_eq!(
            rows,
            [(400, 0), (400, 1), (700, 0)].map(|(p, r)| (p.into(), r.into()))
        );
        let e = &events[0]["source"];
        assert_eq!(e["connector"], "mysql");
        assert_eq!(e["db"], "shop");
        assert_eq!(e["table"], "orders");
        assert_eq!(e["server_id"], 223344);
        assert_eq!(e["gtid"], "0-223344-41");
        assert_eq!(e["file"], "binlog.000003");
        assert_eq!(e["thread"], 12);
        assert_eq!(e["ts_ms"], 1_732_460_000_123i64);
        assert!(e.get("lsn").is_none() && e.get("txId").is_none());
        assert_eq!(events[0]["transaction"]["id"], "0-223344-41");
    }

    #[test]
    fn key_update_becomes_delete_and_create() {
        let events = render(
            Op::Update,
            Some(vec![Value::Int(1), Value::Null]),
            Some(vec![Value::Int(2), Value::Text("x".into())]),
        );
        assert_eq!(events.len(), 2);
        assert_eq!(events[0]["op"], "d");
        assert_eq!(events[0]["before"]["id"], 1);
        assert_eq!(events[1]["op"], "c");
        assert_eq!(events[1]["after"]["id"], 2);
        assert_eq!(events[1]["transaction"]["total_order"], 2);
        assert_eq!(events[1]["transaction"]["data_collection_order"], 2);
    }

    #[test]
    fn update_without_a_primary_key_is_one_update_under_identity_full() {
        let before = vec![Value::Int(1), Value::Text("old".into())];
        let after = vec![Value::Int(2), Value::Text("new".into())];
        let events = render_with(&orders(false, true), Op::Update, Some(before), Some(after));
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0]["op"], "u");
        assert_eq!(
            events[0]["before"],
            serde_json::json!({"id": 1, "note": "old"})
        );
        assert_eq!(
            events[0]["after"],
            serde_json::json!({"id": 2, "note": "new"})
        );
    }

    #[test]
    fn key_update_under_identity_full_is_still_delete_and_create() {
        let events = render_with(
            &orders(true, true),
            Op::Update,
            Some(vec![Value::Int(1), Value::Text("n".into())]),
            Some(vec![Value::Int(2), Value::Text("n".into())]),
        );
        let ops: Vec<_> = events.iter().map(|e| e["op"].clone()).collect();
        assert_eq!(ops, ["d", "c"]);
        assert_eq!(
            events[0]["before"],
            serde_json::json!({"id": 1, "note": "n"})
        );
    }

    #[test]
    fn unchanged_toast_is_the_placeholder_and_old_key_is_not_a_before_image() {
        let events = render(
            Op::Update,
            None,
            Some(vec![Value::Int(1), Value::UnchangedToast]),
        );
        assert_eq!(events.len(), 1);
        assert_eq!(events[0]["op"], "u");
        assert_eq!(events[0]["before"], serde_json::Value::Null);
        assert_eq!(events[0]["after"]["note"], UNAVAILABLE_VALUE);
    }

    #[test]
    fn values_use_debezium_encodings() {
        let json = |v: Value| serde_json::to_value(ValueJson(&v)).unwrap();
        assert_eq!(json(Value::Numeric("123.4500".into())), "123.4500");
        assert_eq!(json(Value::Bytes(vec![0, 1, 255])), "AAH/");
        assert_eq!(
            json(Value::TimestampTz(946_684_800_000_000)),
            "2000-01-01T00:00:00Z"
        );
        assert_eq!(
            json(Value::TimestampTz(1_500_000)),
            "1970-01-01T00:00:01.5Z"
        );
        assert_eq!(json(Value::Timestamp(1_500_000)), 1_500_000);
        assert_eq!(json(Value::Date(-1)), -1);
        assert_eq!(json(Value::Float(f64::NAN)), "NaN");
        assert_eq!(
            json(Value::Interval {
                months: 1,
                days: 1,
                micros: 1
            }),
            2_629_800_000_000i64 + 86_400_000_001
        );
        assert_eq!(
            json(Value::Array(vec![Value::Text("a".into()), Value::Null])),
            serde_json::json!(["a", null])
        );
    }

    #[test]
    fn timetz_is_a_zoned_time_in_utc() {
        let json = |micros: i64, offset_secs: i32| {
            serde_json::to_value(ValueJson(&Value::TimeTz {
                micros,
                offset_secs,
            }))
            .unwrap()
        };
        let hms = |h: i64, m: i64, s: i64| (h * 3600 + m * 60 + s) * 1_000_000;
        // 23:59:59.999999-14:59
        assert_eq!(
            json(hms(23, 59, 59) + 999_999, -(14 * 3600 + 59 * 60)),
            "14:58:59.999999Z"
        );
        // 00:30:00+01
        assert_eq!(json(hms(0, 30, 0), 3600), "23:30:00Z");
        // 12:34:56.789+05:30
        assert_eq!(json(hms(12, 34, 56) + 789_000, 19_800), "07:04:56.789Z");
        // 12:00:00.1+00 and 24:00:00-08, 24:00:00+00
        assert_eq!(json(hms(12, 0, 0) + 100_000, 0), "12:00:00.1Z");
        assert_eq!(json(hms(24, 0, 0), -8 * 3600), "08:00:00Z");
        assert_eq!(json(hms(24, 0, 0), 0), "00:00:00Z");
        // 12:00:00+05:30:15
        assert_eq!(json(hms(12, 0, 0), 19_815), "06:29:45Z");
        // Array elements too.
        let array = Value::Array(vec![Value::TimeTz {
            micros: hms(1, 0, 0),
            offset_secs: 5 * 3600,
        }]);
        assert_eq!(
            serde_json::to_value(ValueJson(&array)).unwrap(),
            serde_json::json!(["20:00:00Z"])
        );
    }
}
