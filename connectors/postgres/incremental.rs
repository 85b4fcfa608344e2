//! Incremental snapshots: a table added to `source.tables` after the initial snapshot is read
//! in primary-key chunks while the stream goes on, and each chunk is merged into the stream
//! with watermarks (DBLog, Netflix 2019).
//!
//! For each chunk the reader commits a *low* watermark (a transactional logical decoding
//! message), selects the next rows in key order, hands them over, and commits a *high*
//! watermark. The stream carries both watermarks in commit order. Between them it notes the
//! keys of the table that changed; at the high watermark it logs the chunk's other rows as
//! `op = r` changes of that transaction. A row changed inside the window is left to the
//! stream, whose change is as new as the chunk's copy or newer; a row changed after the
//! window comes after the chunk in the log. So every sink sees each row's changes in commit
//! order, and a change made before a row's chunk may precede its read (as in Debezium).
//!
//! Progress (the key of the last row logged) is recorded with the transaction that logged it:
//! a restart resumes after it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::catalog::{Catalog, SourceTable};
use super::replication::quote_ident;
use super::SourceError;
use crate::event::{ChangeEvent, Op, Relation, RelationId, Row, Value};
use crate::pgtext::copy_rows::parse_column;
use crate::telemetry::{SnapshotStatus, TableProgress};

/// Rows per chunk: small enough that the reader holds one or two in memory, large enough that
/// the two watermark transactions are cheap beside it.
pub const CHUNK_ROWS: usize = 5_000;
/// The logical decoding message prefix of watermarks.
pub const WATERMARK_PREFIX: &str = "tidemark";

/// A watermark as the message's content. `slot` and `run` tell this reader's watermarks from
/// those of another agent on the same database, or of an earlier run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watermark {
    pub slot: String,
    pub run: u64,
    pub chunk: u64,
    /// `schema.table` of the chunk.
    pub table: String,
    pub high: bool,
}

/// The rows of one chunk, handed from the reader to the stream.
#[derive(Debug)]
pub struct Chunk {
    pub id: u64,
    pub relation: Relation,
    pub rows: Vec<Row>,
    /// The primary key (each column's text) of the last row: where the next chunk starts.
    pub last_key: Option<Vec<String>>,
    /// The table has no rows after this chunk.
    pub last: bool,
    pub estimated_rows: u64,
}

/// The primary key of `row` as comparable text (by column name, so two descriptions of the
/// table agree).
pub fn key_of(relation: &Relation, row: &[Value]) -> String {
    let mut key: Vec<(&str, &Value)> = relation
        .primary_key_indexes()
        .filter_map(|i| Some((relation.columns[i].name.as_str(), row.get(i)?)))
        .collect();
    key.sort_by(|a, b| a.0.cmp(b.0));
    serde_json::to_string(&key).unwrap_or_default()
}

/// The stream's side of one chunk, between its watermarks.
#[derive(Debug)]
pub struct Window {
    pub chunk: u64,
    pub table: String,
    /// Keys of the table changed inside the window.
    changed: HashSet<String>,
    /// The table was truncated inside the window: the chunk's rows are all stale.
    truncated: bool,
}

impl Window {
    pub fn open(chunk: u64, table: String) -> Window {
        Window {
            chunk,
            table,
            changed: HashSet::new(),
            truncated: false,
        }
    }

    /// Notes a change committed inside the window, if it is of the window's table (both keys
    /// of a key update; a truncate makes every row of the chunk stale).
    pub fn note(&mut self, relation: &Relation, change: &ChangeEvent) {
        if relation.qualified_name() != self.table {
            return;
        }
        if change.op == Op::Truncate {
            self.truncated = true;
        }
        for row in [&change.before, &change.after].into_iter().flatten() {
            self.changed.insert(key_of(relation, row));
        }
    }

    /// The chunk's rows the stream did not change inside the window.
    pub fn close(self, relation: &Relation, rows: Vec<Row>) -> Vec<Row> {
        if self.truncated {
            return Vec::new();
        }
        rows.into_iter()
            .filter(|row| !self.changed.contains(&key_of(relation, row)))
            .collect()
    }
}

/// The stream's side of the incremental snapshots under way.
pub struct Merge {
    /// `schema.table` of every table this run snapshots.
    pub tables: Vec<String>,
    pub slot: String,
    pub run: u64,
    pub chunks: mpsc::Receiver<Chunk>,
    pub window: Option<Window>,
    /// `schema.table` → its description in the log.
    pub relations: HashMap<String, (RelationId, Arc<Relation>)>,
    /// What the open transaction logged, recorded as progress at its commit.
    pub logged: Option<Logged>,
    /// `schema.table` → rows logged and the catalog's estimate, for `/status`.
    pub progress: BTreeMap<String, (u64, u64)>,
    pub started: Instant,
    pub last_progress_line: Instant,
}

/// A chunk logged in the open transaction.
pub struct Logged {
    pub table: String,
    pub rows: u64,
    pub last_key: Option<Vec<String>>,
    pub last: bool,
}

impl Merge {
    /// The stream's side for snapshotting `tables`, and the sender the reader hands chunks
    /// to. One chunk waits at a time: the reader selects the next while the stream reaches
    /// the high watermark of the one before.
    pub fn new(tables: &[SourceTable], slot: &str) -> (Merge, mpsc::Sender<Chunk>) {
        let (sender, chunks) = mpsc::channel(1);
        // Tells this run's watermarks from those an earlier run left in the WAL.
        let run = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id());
        let merge = Merge {
            tables: tables.iter().map(SourceTable::to_string).collect(),
            slot: slot.to_string(),
            run,
            chunks,
            window: None,
            relations: HashMap::new(),
            logged: None,
            progress: BTreeMap::new(),
            started: Instant::now(),
            last_progress_line: Instant::now(),
        };
        (merge, sender)
    }

    /// Where the incremental snapshots stand, for `/status`.
    pub fn status(&self, state: &'static str) -> SnapshotStatus {
        let rows = self.progress.values().map(|(rows, _)| rows).sum();
        let seconds = self.started.elapsed().as_secs_f64();
        SnapshotStatus {
            state,
            rows,
            seconds,
            rows_per_second: (rows as f64 / seconds.max(1e-9)) as u64,
            tables: self
                .progress
                .iter()
                .map(|(table, &(rows, estimated))| {
                    (table.clone(), TableProgress { rows, estimated })
                })
                .collect(),
        }
    }
}

/// Reads `tables` chunk by chunk (the first from after `resume_after`), committing the
/// watermarks around each and sending each chunk before its high watermark. Returns when every
/// table is read or the stream stopped taking chunks.
pub async fn read_tables(
    mut catalog: Catalog,
    tables: Vec<SourceTable>,
    mut resume_after: Option<Vec<String>>,
    slot: String,
    run: u64,
    chunks: mpsc::Sender<Chunk>,
) -> Result<(), SourceError> {
    let mut id = 0;
    for table in tables {
        let relation = catalog.describe_table(&table).await?;
        let (_, estimated_rows) = catalog.estimate(&table).await?;
        let key: Vec<usize> = relation.primary_key_indexes().collect();
        if key.is_empty() {
            return Err(SourceError::Prerequisite(format!(
                "table {} was added to source.tables after the initial snapshot and has no \
                 primary key, so it cannot be read in key order alongside the stream: add a \
                 primary key, or take a new initial snapshot (move agent.data_dir aside)",
                relation.qualified_name()
            )));
        }
        let mut after = resume_after.take();
        let name = relation.qualified_name();
        loop {
            id += 1;
            let mark = |high| Watermark {
                slot: slot.clone(),
                run,
                chunk: id,
                table: name.clone(),
                high,
            };
            emit(&catalog, &mark(false)).await?;
            let (rows, last_key) =
                select_chunk(&catalog, &table, &relation, after.as_deref()).await?;
            let last = rows.len() < CHUNK_ROWS;
            let chunk = Chunk {
                id,
                relation: relation.clone(),
                rows,
                last_key: last_key.clone().or_else(|| after.clone()),
                last,
                estimated_rows,
            };
            if chunks.send(chunk).await.is_err() {
                return Ok(());
            }
            emit(&catalog, &mark(true)).await?;
            if last {
                break;
            }
            after = last_key;
        }
    }
    Ok(())
}

/// Commits a watermark into the WAL.
async fn emit(catalog: &Catalog, watermark: &Watermark) -> Result<(), SourceError> {
    let content = serde_json::to_string(watermark).unwrap_or_default();
    catalog
        .client()
        .execute(
            "SELECT pg_logical_emit_message(true, $1::text, $2::text)",
            &[&WATERMARK_PREFIX, &content],
        )
        .await
        .map_err(|e| SourceError::catalog("writing an incremental snapshot watermark", e))?;
    Ok(())
}

/// The next `CHUNK_ROWS` rows in key order after `after`, and the key of the last one.
async fn select_chunk(
    catalog: &Catalog,
    table: &SourceTable,
    relation: &Relation,
    after: Option<&[String]>,
) -> Result<(Vec<Row>, Option<Vec<String>>), SourceError> {
    let key: Vec<usize> = relation.primary_key_indexes().collect();
    let columns: Vec<String> = relation
        .columns
        .iter()
        .map(|c| quote_ident(&c.name))
        .collect();
    let key_columns: Vec<String> = key.iter().map(|&i| columns[i].clone()).collect();
    let condition = match after {
        Some(values) => {
            let literals: Vec<String> = key
                .iter()
                .zip(values)
                .map(|(&i, value)| {
                    format!(
                        "{}::{}",
                        postgres_protocol::escape::escape_literal(value),
                        relation.columns[i].type_name
                    )
                })
                .collect();
            format!(
                " WHERE ({}) > ({})",
                key_columns.join(", "),
                literals.join(", ")
            )
        }
        None => String::new(),
    };
    let sql = format!(
        "SELECT {} FROM {}{condition} ORDER BY {} LIMIT {CHUNK_ROWS}",
        columns.join(", "),
        table.quoted(),
        key_columns.join(", ")
    );
    let messages = catalog
        .client()
        .simple_query(&sql)
        .await
        .map_err(|e| SourceError::catalog("reading a chunk of an added table", e))?;
    let mut rows = Vec::new();
    let mut last_key = None;
    for message in messages {
        let tokio_postgres::SimpleQueryMessage::Row(row) = message else {
            continue;
        };
        let values: Row = relation
            .columns
            .iter()
            .enumerate()
            .map(|(i, column)| match row.get(i) {
                Some(text) => parse_column(relation, column, text),
                None => Value::Null,
            })
            .collect();
        last_key = Some(
            key.iter()
                .map(|&i| row.get(i).unwrap_or_default().to_string())
                .collect(),
        );
        rows.push(values);
    }
    Ok((rows, last_key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Column, Position, ValueType};

    fn relation() -> Relation {
        let column = |name: &str, primary_key| Column {
            name: name.into(),
            type_oid: 23,
            type_modifier: -1,
            type_name: "integer".into(),
            value_type: ValueType::Int4,
            primary_key,
            replica_identity: primary_key,
        };
        Relation {
            oid: 1,
            schema: "public".into(),
            table: "t".into(),
            columns: vec![column("id", true), column("v", false)],
        }
    }

    fn chunk(rows: &[(i64, i64)]) -> Chunk {
        Chunk {
            id: 1,
            relation: relation(),
            rows: rows
                .iter()
                .map(|&(id, v)| vec![Value::Int(id), Value::Int(v)])
                .collect(),
            last_key: None,
            last: true,
            estimated_rows: 0,
        }
    }

    fn change(op: Op, before: Option<Row>, after: Option<Row>) -> ChangeEvent {
        ChangeEvent {
            relation: RelationId(1),
            position: Position(1),
            op,
            before,
            after,
        }
    }

    #[test]
    fn rows_changed_inside_the_window_are_left_to_the_stream() {
        let relation = relation();
        let mut window = Window::open(1, "public.t".into());
        let updated = vec![Value::Int(2), Value::Int(20)];
        let moved_from = vec![Value::Int(3), Value::Null];
        let moved_to = vec![Value::Int(9), Value::Int(90)];
        window.note(&relation, &change(Op::Update, None, Some(updated)));
        window.note(
            &relation,
            &change(Op::Update, Some(moved_from), Some(moved_to)),
        );
        let mut other = relation.clone();
        other.table = "other".into();
        let other_row = vec![Value::Int(4), Value::Int(40)];
        window.note(&other, &change(Op::Insert, None, Some(other_row)));
        let chunk = chunk(&[(1, 1), (2, 2), (3, 3), (4, 4)]);
        let kept = window.close(&chunk.relation, chunk.rows);
        assert_eq!(
            kept,
            vec![
                vec![Value::Int(1), Value::Int(1)],
                vec![Value::Int(4), Value::Int(4)]
            ]
        );
    }

    #[test]
    fn a_truncate_inside_the_window_drops_the_whole_chunk() {
        let mut window = Window::open(1, "public.t".into());
        window.note(&relation(), &change(Op::Truncate, None, None));
        let chunk = chunk(&[(1, 1)]);
        assert!(window.close(&chunk.relation, chunk.rows).is_empty());
    }

    #[test]
    fn watermarks_round_trip_as_json() {
        let mark = Watermark {
            slot: "s".into(),
            run: 7,
            chunk: 3,
            table: "public.t".into(),
            high: true,
        };
        let text = serde_json::to_string(&mark).unwrap();
        assert_eq!(serde_json::from_str::<Watermark>(&text).unwrap(), mark);
    }
}
