//! Merge mode: a `ReplacingMergeTree(_tidemark_version, _tidemark_is_deleted)` table per
//! source table, ordered by the source primary key. Each batch is collapsed to the last state
//! per key and inserted as RowBinary, a delete as a row with `_tidemark_is_deleted = 1`;
//! `SELECT … FINAL` reads the live rows. The version is the source position of the batch's
//! last transaction, so a state written again after a crash is the same row at the same
//! version, and a later state of a key always has a higher one.

use std::collections::HashMap;
use std::sync::Arc;

use super::types::{encode, ChType};
use super::{encoded_key, ClickHouseSink, EncodedRow, Letter, Refused, TableRows, TableShape};
use crate::event::{Op, Position, Record, Relation, Row, Value};
use crate::log::LogEntry;
use crate::sinks::collapse::{Collapse, KeyState, TablePlan};
use crate::sinks::SinkError;

pub const VERSION_COLUMN: &str = "_tidemark_version";
pub const DELETED_COLUMN: &str = "_tidemark_is_deleted";

const EXTRA_COLUMNS: [(&str, ChType); 2] = [
    (VERSION_COLUMN, ChType::UInt64),
    (DELETED_COLUMN, ChType::UInt8),
];

/// The merge table: ordered by the key (quoted column names).
pub(super) fn shape(key: &[String]) -> TableShape {
    TableShape {
        columns: EXTRA_COLUMNS.to_vec(),
        engine: format!(
            "ReplacingMergeTree({VERSION_COLUMN}, {DELETED_COLUMN}) ORDER BY ({})",
            key.join(", ")
        ),
    }
}

impl ClickHouseSink {
    /// Inserts the batch's last state of each key; returns the batch's source position.
    pub(super) async fn apply_merge(
        &mut self,
        entries: &[LogEntry],
        refused: &mut Vec<Refused>,
    ) -> Result<Position, SinkError> {
        let (plans, version) = self.plan_merge(entries)?;
        for (number, plan) in plans.iter().enumerate() {
            let relation = self.target_shape(plan.relation_id, &plan.relation);
            self.prepare(plan.relation_id, &relation).await?;
            let table = self.encode_plan(plan, &relation, version, refused).await?;
            if plan.truncate {
                let context = format!("truncating {}", table.target);
                self.run(&format!("TRUNCATE TABLE {}", table.target), &context)
                    .await?;
            }
            let token = self.token(entries[0].seq, entries[entries.len() - 1].seq, number);
            self.insert(table, &token, refused).await?;
        }
        Ok(version)
    }

    /// Collapses the batch per table and key; returns the plans and the version of its rows
    /// (the source position of its last transaction).
    fn plan_merge(&self, entries: &[LogEntry]) -> Result<(Vec<TablePlan>, Position), SinkError> {
        let mut collapse = Collapse::default();
        // A chunk of a transaction larger than a batch has no Begin of its own: its rows take
        // the transaction's version, as its first chunk's did.
        let mut version = match entries.first() {
            Some(first) if !matches!(first.record, Record::Begin(_)) => self
                .log
                .transaction_of(first.seq)?
                .map_or(Position(0), |(_, begin)| begin.commit_position),
            _ => Position(0),
        };
        for entry in entries {
            match &entry.record {
                Record::Begin(begin) => version = version.max(begin.commit_position),
                Record::Change(change) => {
                    let relation = self.relation(change.relation)?;
                    collapse
                        .add(change.relation, &relation, change)
                        .map_err(|e| self.inconsistent(e.to_string()))?;
                    version = version.max(change.position);
                }
                Record::SnapshotRows(rows) => {
                    let (relation, changes) = self.snapshot_changes(entry.seq, rows)?;
                    for change in &changes {
                        collapse
                            .add(rows.relation, &relation, change)
                            .map_err(|e| self.inconsistent(e.to_string()))?;
                    }
                    version = version.max(rows.position);
                }
                Record::Commit(commit) => version = version.max(commit.commit_position),
                // The tables are brought to each description as its rows come.
                Record::Schema(_) => {}
            }
        }
        Ok((collapse.finish(), version))
    }

    /// Encodes a plan's states as rows of its target table (`relation`: the plan's as the
    /// target stands); states ClickHouse cannot hold go to `refused` with the reason.
    async fn encode_plan(
        &self,
        plan: &TablePlan,
        relation: &Arc<Relation>,
        version: Position,
        refused: &mut Vec<Refused>,
    ) -> Result<TableRows, SinkError> {
        let types = self.column_types(relation);
        let target = self.target_of(relation);
        let held = self
            .held_rows(plan, relation, &target, &types, version)
            .await?;
        let key: Vec<usize> = relation.primary_key_indexes().collect();
        let mut rows = Vec::with_capacity(plan.states().len());
        for state in plan.states() {
            let (row, deleted, from) = match state {
                KeyState::Upsert(row) => (row, false, row),
                KeyState::Move { row, from } => (row, false, from),
                KeyState::Delete(row) => (row, true, row),
            };
            // Unchanged TOAST values: the target's, for a row that stays; NULL in a delete.
            let held_row = (!deleted && row.contains(&Value::UnchangedToast))
                .then(|| held.get(&encoded_key(from, &key, &types)))
                .flatten();
            let mut bytes = Vec::new();
            let encoded =
                row.iter()
                    .zip(&types)
                    .enumerate()
                    .try_for_each(|(i, (value, ty))| match (value, held_row) {
                        (Value::UnchangedToast, Some(held)) => {
                            bytes.extend_from_slice(&held[i]);
                            Ok(())
                        }
                        _ => encode(&mut bytes, ty, value),
                    });
            let letter = letter_of(state, version);
            match encoded {
                Ok(()) => {
                    bytes.extend_from_slice(&version.0.to_le_bytes());
                    bytes.push(u8::from(deleted));
                    rows.push(EncodedRow { bytes, letter });
                }
                Err(e) => refused.push(Refused {
                    relation: Arc::clone(relation),
                    letter,
                    reason: e.to_string(),
                }),
            }
        }
        Ok(TableRows {
            relation: Arc::clone(relation),
            columns: ClickHouseSink::insert_columns(relation, &EXTRA_COLUMNS),
            target,
            rows,
        })
    }

    /// The rows the target holds for the keys whose new state lacks unchanged TOAST values
    /// (values the source did not send): by the key's RowBinary, each column's RowBinary.
    /// Each key's latest live row up to this batch's `version`: not `FINAL`, which would
    /// hide the old key of a moved row that a replay of this batch has already marked
    /// deleted; a row of this version is this batch's own (an earlier chunk of a large
    /// transaction, or a replay), as exact as the one before it.
    async fn held_rows(
        &self,
        plan: &TablePlan,
        relation: &Relation,
        target: &str,
        types: &[ChType],
        version: Position,
    ) -> Result<HashMap<Vec<u8>, Vec<Vec<u8>>>, SinkError> {
        let keys: Vec<&Row> = plan
            .states()
            .iter()
            .filter_map(|state| match state {
                KeyState::Upsert(row) if row.contains(&Value::UnchangedToast) => Some(row),
                KeyState::Move { row, from } if row.contains(&Value::UnchangedToast) => Some(from),
                _ => None,
            })
            .collect();
        self.latest_by_key(
            relation,
            target,
            types,
            &keys,
            &[],
            &format!("{VERSION_COLUMN} <= {} AND {DELETED_COLUMN} = 0", version.0),
            &format!("{VERSION_COLUMN} DESC"),
        )
        .await
    }
}

/// A merge state as its dead letter keeps it: a later state of the key has a higher version
/// (`commit`), so `dlq retry` cannot put an older state back.
fn letter_of(state: &KeyState, version: Position) -> Letter {
    let (action, row, op, before, after) = match state {
        KeyState::Upsert(row) => ("upsert", row, Op::Update, None, Some(row.clone())),
        KeyState::Move { row, from } => (
            "upsert",
            row,
            Op::Update,
            Some(from.clone()),
            Some(row.clone()),
        ),
        KeyState::Delete(row) => ("delete", row, Op::Delete, Some(row.clone()), None),
    };
    Letter {
        action,
        row: row.clone(),
        op,
        before,
        after,
        commit: Some((version, 0)),
    }
}
