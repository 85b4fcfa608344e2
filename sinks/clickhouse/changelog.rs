//! Changelog mode, the bronze layer: every change as a row of a `MergeTree` partitioned by
//! the day of its commit, in log order. A row holds the change's row in the source's columns
//! (the new row; a delete's old row), `_tidemark_op` as Debezium's envelope says it (an update
//! that moves a row to another key is a delete and a create), the old row as JSON where the
//! source sent one, the names of the columns the source did not send (unchanged TOAST
//! values, NULL in their columns), and where the change stands in the source and in the log.
//!
//! A MergeTree keeps what is inserted twice: before a table takes the first rows after the
//! sink opens (as the pipeline does again after a failed batch), the rows past the checkpoint — written by a batch
//! whose checkpoint was not — are deleted, so a plain `SELECT` is exact.

use std::collections::HashMap;
use std::sync::Arc;

use super::types::{encode, ChType, EncodeError};
use super::{ClickHouseSink, EncodedRow, Letter, Refused, TableRows, TableShape};
use crate::envelope::{key_changed, RowJson};
use crate::event::{ChangeEvent, Op, Position, Record, Relation, RelationId, Row, TxBegin, Value};
use crate::log::LogEntry;
use crate::sinks::SinkError;

pub const OP_COLUMN: &str = "_tidemark_op";
pub const SEQ_COLUMN: &str = "_tidemark_seq";
const COMMIT_TIME_COLUMN: &str = "_tidemark_commit_time";

fn extra_columns() -> [(&'static str, ChType); 8] {
    [
        (OP_COLUMN, ChType::Label),
        (
            "_tidemark_before",
            ChType::Nullable(Box::new(ChType::String)),
        ),
        (
            "_tidemark_unchanged",
            ChType::Array(Box::new(ChType::String)),
        ),
        ("_tidemark_lsn", ChType::UInt64),
        ("_tidemark_commit_lsn", ChType::UInt64),
        (COMMIT_TIME_COLUMN, ChType::DateTime64),
        (SEQ_COLUMN, ChType::UInt64),
        ("_tidemark_row", ChType::UInt64),
    ]
}

/// The changelog table: a partition per day of commits, in log order.
pub(super) fn shape() -> TableShape {
    TableShape {
        columns: extra_columns().to_vec(),
        engine: format!(
            "MergeTree PARTITION BY toDate({COMMIT_TIME_COLUMN}) ORDER BY ({SEQ_COLUMN}, _tidemark_row)"
        ),
    }
}

/// One changelog row before encoding.
struct ChangeRow<'a> {
    op: &'static str,
    row: Option<&'a Row>,
    before: Option<&'a Row>,
    position: Position,
    seq: u64,
    number: u64,
}

impl ClickHouseSink {
    /// Inserts a row per change; returns the batch's source position.
    pub(super) async fn apply_changelog(
        &mut self,
        entries: &[LogEntry],
        refused: &mut Vec<Refused>,
    ) -> Result<Position, SinkError> {
        // A chunk of a transaction larger than a batch: its changes take its first chunk's
        // commit.
        let mut begin: Option<TxBegin> = match entries.first() {
            Some(first) if !matches!(first.record, Record::Begin(_)) => {
                self.log.transaction_of(first.seq)?.map(|(_, begin)| begin)
            }
            _ => None,
        };
        let mut source = Position(0);
        // Per relation description, in the order first seen: its rows.
        let mut tables: Vec<(RelationId, Arc<Relation>, Vec<EncodedRow>)> = Vec::new();
        let mut index: HashMap<RelationId, usize> = HashMap::new();
        for entry in entries {
            let (id, changes) = match &entry.record {
                Record::Begin(b) => {
                    source = source.max(b.commit_position);
                    begin = Some(b.clone());
                    continue;
                }
                Record::Commit(commit) => {
                    source = source.max(commit.commit_position);
                    continue;
                }
                Record::Schema(_) => continue,
                Record::Change(change) => (change.relation, vec![change.clone()]),
                Record::SnapshotRows(rows) => {
                    (rows.relation, self.snapshot_changes(entry.seq, rows)?.1)
                }
            };
            let Some(tx) = &begin else {
                return Err(self.inconsistent(format!(
                    "log record {} is a change outside a transaction",
                    entry.seq
                )));
            };
            // Written as the target stands after the batch's schema changes.
            let relation = self.target_shape(id, &self.relation(id)?);
            let slot = *index.entry(id).or_insert_with(|| {
                tables.push((id, Arc::clone(&relation), Vec::new()));
                tables.len() - 1
            });
            let types = self.column_types(&relation);
            let mut number = 0;
            for change in &changes {
                for row in change_rows(&relation, change, entry.seq, &mut number) {
                    let letter = letter_of(change, tx);
                    match encode_row(&relation, &types, &row, tx) {
                        Ok(bytes) => tables[slot].2.push(EncodedRow { bytes, letter }),
                        Err(e) => refused.push(Refused {
                            relation: Arc::clone(&relation),
                            letter,
                            reason: e.to_string(),
                        }),
                    }
                }
            }
        }
        let (first, last) = (entries[0].seq, entries[entries.len() - 1].seq);
        for (number, (id, relation, rows)) in tables.into_iter().enumerate() {
            self.prepare(id, &relation).await?;
            let target = self.target_of(&relation);
            self.remove_unrecorded(&target).await?;
            let table = TableRows {
                columns: ClickHouseSink::insert_columns(&relation, &extra_columns()),
                relation,
                target,
                rows,
            };
            self.insert(table, &self.token(first, last, number), refused)
                .await?;
        }
        Ok(source)
    }

    /// Deletes the rows a batch wrote past the checkpoint, once per table after the sink
    /// opens.
    async fn remove_unrecorded(&mut self, target: &str) -> Result<(), SinkError> {
        if !self.replay_checked.insert(target.to_string()) {
            return Ok(());
        }
        let past = format!("{SEQ_COLUMN} > {}", self.applied);
        let context = format!("looking for rows past the checkpoint in {target}");
        let count = self
            .run(
                &format!("SELECT count() FROM {target} WHERE {past} FORMAT TabSeparated"),
                &context,
            )
            .await?;
        if String::from_utf8_lossy(&count).trim() != "0" {
            tracing::info!(
                sink = %self.name,
                table = %target,
                "deleting the rows a batch wrote before its checkpoint was lost; the batch is written again"
            );
            self.run(
                &format!("DELETE FROM {target} WHERE {past}"),
                &format!("deleting rows past the checkpoint from {target}"),
            )
            .await?;
        }
        Ok(())
    }
}

/// The rows a change makes, as its envelopes do; `number` counts the log record's rows.
fn change_rows<'a>(
    relation: &Relation,
    change: &'a ChangeEvent,
    seq: u64,
    number: &mut u64,
) -> Vec<ChangeRow<'a>> {
    let mut row = |op, row, before| {
        *number += 1;
        ChangeRow {
            op,
            row,
            before,
            position: change.position,
            seq,
            number: *number - 1,
        }
    };
    let (before, after) = (change.before.as_ref(), change.after.as_ref());
    match change.op {
        Op::Insert => vec![row("c", after, None)],
        Op::Read | Op::IncrementalRead => vec![row("r", after, None)],
        Op::Delete => vec![row("d", before, before)],
        Op::Truncate => vec![row("t", None, None)],
        Op::Update => match (before, after) {
            (Some(old), Some(new)) if key_changed(relation, old, new) => {
                vec![row("d", before, before), row("c", after, None)]
            }
            _ => vec![row("u", after, before)],
        },
    }
}

fn encode_row(
    relation: &Relation,
    types: &[ChType],
    row: &ChangeRow<'_>,
    tx: &TxBegin,
) -> Result<Vec<u8>, EncodeError> {
    let mut bytes = Vec::new();
    let mut unchanged = Vec::new();
    for (i, ty) in types.iter().enumerate() {
        let value = row.row.and_then(|r| r.get(i)).unwrap_or(&Value::Null);
        if *value == Value::UnchangedToast {
            unchanged.push(Value::Text(relation.columns[i].name.clone()));
        }
        encode(&mut bytes, ty, value)?;
    }
    let before = row.before.map_or(Value::Null, |before| {
        Value::Text(
            serde_json::to_string(&RowJson {
                relation,
                row: before,
            })
            .unwrap_or_default(),
        )
    });
    let values = [
        Value::Text(row.op.into()),
        before,
        Value::Array(unchanged),
        Value::Int(row.position.0 as i64),
        Value::Int(tx.commit_position.0 as i64),
        Value::TimestampTz(tx.commit_ts),
        Value::Int(row.seq as i64),
        Value::Int(row.number as i64),
    ];
    for (value, (_, ty)) in values.iter().zip(extra_columns().iter()) {
        encode(&mut bytes, ty, value)?;
    }
    Ok(bytes)
}

fn letter_of(change: &ChangeEvent, tx: &TxBegin) -> Letter {
    let (action, row) = match (&change.after, &change.before) {
        (Some(after), _) => ("append", after.clone()),
        (None, Some(before)) => ("append", before.clone()),
        (None, None) => ("append", Vec::new()),
    };
    Letter {
        action,
        row,
        op: change.op,
        before: change.before.clone(),
        after: change.after.clone(),
        commit: Some((tx.commit_position, tx.commit_ts)),
    }
}
