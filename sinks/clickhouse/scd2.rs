//! SCD2 mode: every committed version of every row, with the PostgreSQL SCD2 sink's columns
//! (tidemark's `valid_from`/`valid_to`/`is_current`, or dbt's snapshot columns), in a
//! `ReplacingMergeTree(_tidemark_version)` ordered by (key, `_tidemark_lsn`): one row per
//! version, the commit position of its transaction in `_tidemark_lsn`.
//!
//! ClickHouse updates no rows: a version is closed by inserting it again with its end set
//! and a higher `_tidemark_version`, which `FINAL` (and merges) keep. `_tidemark_version` is 0
//! while a version is open and `u64::MAX` minus the commit position that closed it once
//! closed, so that of two closes the first stands: a batch written again after a crash may
//! find a version closed by its own later events (a truncate, say) and close it again at the
//! earlier event, which must win. For the same reason a version counts as current before a
//! batch unless the close it carries is older than the batch.

use std::sync::Arc;

use md5::{Digest, Md5};

use super::merge::VERSION_COLUMN;
use super::types::{encode, ChType, EncodeError};
use super::{encoded_key, ClickHouseSink, EncodedRow, Letter, Refused, TableRows, TableShape};
use crate::config::ColumnNaming;
use crate::dead_letter::LetterChange;
use crate::event::{Op, Position, Record, Relation, Row, Value};
use crate::log::LogEntry;
use crate::pgtext::copy_text::value_text;
use crate::sinks::history::{EventKind, History, HistoryPlan, KeyEvent};
use crate::sinks::SinkError;

pub const LSN_COLUMN: &str = "_tidemark_lsn";
pub const OP_COLUMN: &str = "_tidemark_op";

/// How versions are recorded: the validity columns' names and whether deletes are versions.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub naming: ColumnNaming,
    pub tombstones: bool,
}

impl Layout {
    /// The columns a history table has after the source's, `_tidemark_version` last.
    pub fn columns(self) -> Vec<(&'static str, ChType)> {
        let time = || ChType::DateTime64;
        let end = || ChType::Nullable(Box::new(ChType::DateTime64));
        let mut columns = match self.naming {
            ColumnNaming::Tidemark => vec![
                ("valid_from", time()),
                ("valid_to", end()),
                ("is_current", ChType::Bool),
            ],
            ColumnNaming::Dbt => vec![
                ("dbt_scd_id", ChType::String),
                ("dbt_updated_at", time()),
                ("dbt_valid_from", time()),
                ("dbt_valid_to", end()),
            ],
        };
        if self.naming == ColumnNaming::Dbt && self.tombstones {
            columns.push(("dbt_is_deleted", ChType::Label));
        }
        columns.extend([
            (OP_COLUMN, ChType::Label),
            (LSN_COLUMN, ChType::UInt64),
            (VERSION_COLUMN, ChType::UInt64),
        ]);
        columns
    }

    /// The history table: one row per (key, version), the highest `_tidemark_version` kept.
    pub(super) fn shape(self, key: &[String]) -> TableShape {
        TableShape {
            columns: self.columns(),
            engine: format!(
                "ReplacingMergeTree({VERSION_COLUMN}) ORDER BY ({}, {LSN_COLUMN})",
                key.join(", ")
            ),
        }
    }

    fn valid_to(self) -> &'static str {
        match self.naming {
            ColumnNaming::Tidemark => "valid_to",
            ColumnNaming::Dbt => "dbt_valid_to",
        }
    }

    /// Whether an event that is a key's first in the batch ends the key's version before it:
    /// a created key has none current (a delete or a truncate ended it) but a tombstone; a
    /// snapshot's first version follows nothing.
    fn ends_previous(self, event: &KeyEvent) -> bool {
        event.previous.is_none()
            && match event.kind {
                EventKind::Created => self.tombstones,
                EventKind::Read => false,
                _ => true,
            }
    }

    /// The values of the layout's columns, `_tidemark_version` aside, for `event`'s version.
    fn values(self, relation: &Relation, event: &KeyEvent) -> Vec<Value> {
        let at = Value::TimestampTz(event.at);
        let end = event.valid_to.map_or(Value::Null, Value::TimestampTz);
        let mut values = match self.naming {
            ColumnNaming::Tidemark => {
                vec![at, end, Value::Bool(event.valid_to.is_none())]
            }
            ColumnNaming::Dbt => vec![Value::Text(scd_id(relation, event)), at.clone(), at, end],
        };
        if self.naming == ColumnNaming::Dbt && self.tombstones {
            let deleted = if event.kind == EventKind::Tombstone {
                "True"
            } else {
                "False"
            };
            values.push(Value::Text(deleted.into()));
        }
        values.extend([
            Value::Text(event.kind.code().into()),
            Value::Int(event.lsn.0 as i64),
        ]);
        values
    }
}

/// dbt's `dbt_scd_id` as the PostgreSQL SCD2 sink computes it: the MD5 of the key's text and
/// the version's commit LSN, joined by `|`.
fn scd_id(relation: &Relation, event: &KeyEvent) -> String {
    let mut parts: Vec<String> = relation
        .primary_key_indexes()
        .map(|i| match &event.row[i] {
            // `::text` of a boolean, unlike its COPY text.
            Value::Bool(b) => b.to_string(),
            value => value_text(value),
        })
        .collect();
    parts.push(event.lsn.to_string());
    Md5::digest(parts.join("|").as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `_tidemark_version` of a version closed by the transaction that committed at `by`.
fn closed_version(by: Position) -> u64 {
    u64::MAX - by.0
}

impl ClickHouseSink {
    pub(super) fn layout(&self) -> Layout {
        Layout {
            naming: self.config.columns,
            tombstones: self.config.history_deletes,
        }
    }

    /// Whether the target holds a version of an SCD2 letter's key committed after it.
    pub(super) async fn superseded(&self, letter: &LetterChange) -> Result<bool, SinkError> {
        let (Some(row), Some((lsn, _))) = (
            letter.after.as_ref().or(letter.before.as_ref()),
            letter.commit,
        ) else {
            return Ok(false);
        };
        let relation = Arc::new(letter.relation.clone());
        let target = self.target_of(&relation);
        let later = self
            .latest_by_key(
                &relation,
                &target,
                &self.column_types(&relation),
                &[row],
                &[],
                &format!("{LSN_COLUMN} > {}", lsn.0),
                LSN_COLUMN,
            )
            .await?;
        Ok(!later.is_empty())
    }

    /// Inserts a batch of whole transactions as versions; returns its source position.
    pub(super) async fn apply_history(
        &mut self,
        entries: &[LogEntry],
        refused: &mut Vec<Refused>,
    ) -> Result<Position, SinkError> {
        let mut history = History::new(self.config.history_deletes);
        let mut source = Position(0);
        // The first transaction's commit: every version before it is the target's already.
        let mut first_commit = None;
        for entry in entries {
            match &entry.record {
                Record::Begin(begin) => {
                    history.begin(begin);
                    first_commit.get_or_insert(begin.commit_position);
                    source = source.max(begin.commit_position);
                }
                Record::Change(change) => {
                    let relation = self.relation(change.relation)?;
                    history
                        .add(change.relation, &relation, change)
                        .map_err(|e| self.inconsistent(e.to_string()))?;
                }
                Record::SnapshotRows(rows) => {
                    let (relation, changes) = self.snapshot_changes(entry.seq, rows)?;
                    for change in &changes {
                        history
                            .add(rows.relation, &relation, change)
                            .map_err(|e| self.inconsistent(e.to_string()))?;
                    }
                }
                Record::Commit(commit) => {
                    history.commit();
                    source = source.max(commit.commit_position);
                }
                Record::Schema(_) => {}
            }
        }
        let Some(first_commit) = first_commit else {
            return Ok(source);
        };
        let (first, last) = (entries[0].seq, entries[entries.len() - 1].seq);
        for (number, plan) in history.finish().iter().enumerate() {
            let relation = self.target_shape(plan.relation_id, &plan.relation);
            self.prepare(plan.relation_id, &relation).await?;
            let target = self.target_of(&relation);
            if let Some((lsn, at)) = plan.truncate {
                self.close_all(&relation, &target, lsn, at, first_commit)
                    .await?;
            }
            let table = self
                .encode_history(plan, &relation, target, first_commit, refused)
                .await?;
            self.insert(table, &self.token(first, last, number), refused)
                .await?;
        }
        Ok(source)
    }

    /// A truncate at `lsn` (committed at `at`): closes every version current before it.
    async fn close_all(
        &self,
        relation: &Relation,
        target: &str,
        lsn: Position,
        at: i64,
        first_commit: Position,
    ) -> Result<(), SinkError> {
        let layout = self.layout();
        let columns = ClickHouseSink::insert_columns(relation, &layout.columns());
        let values: Vec<String> = columns
            .iter()
            .map(|column| match column.as_str() {
                "is_current" => "false".to_string(),
                c if c == layout.valid_to() => format!("fromUnixTimestamp64Micro({at}, 'UTC')"),
                VERSION_COLUMN => closed_version(lsn).to_string(),
                c => c.to_string(),
            })
            .collect();
        let statement = format!(
            "INSERT INTO {target} ({}) SELECT {} FROM {target} FINAL WHERE {} AND {LSN_COLUMN} < {}",
            columns.join(", "),
            values.join(", "),
            current_before(first_commit),
            lsn.0
        );
        self.run(
            &statement,
            &format!("closing the versions of {target} at a truncate"),
        )
        .await
        .map(drop)
    }

    /// Encodes a plan's versions, and the closes of the versions before the batch that its
    /// events end, as rows of its target; versions ClickHouse cannot hold go to `refused`.
    async fn encode_history(
        &self,
        plan: &HistoryPlan,
        relation: &Arc<Relation>,
        target: String,
        first_commit: Position,
        refused: &mut Vec<Refused>,
    ) -> Result<TableRows, SinkError> {
        let layout = self.layout();
        let types = self.column_types(relation);
        let extra = layout.columns();
        let key: Vec<usize> = relation.primary_key_indexes().collect();
        // The versions before the batch: those its events end, and those that hold the
        // values a version left unchanged (of its key, or of the key it moved from).
        let lookups: Vec<&Row> = plan
            .events
            .iter()
            .flat_map(|event| {
                let ends = layout.ends_previous(event).then_some(&event.row);
                let carries = (event.kind.is_version()
                    && event.row.contains(&Value::UnchangedToast))
                .then(|| event.carry_from.as_ref().map_or(&event.row, |c| &c.from));
                ends.into_iter().chain(carries)
            })
            .collect();
        let before = self
            .latest_by_key(
                relation,
                &target,
                &types,
                &lookups,
                &extra,
                &format!("{LSN_COLUMN} < {}", first_commit.0),
                &format!("{LSN_COLUMN} DESC, {VERSION_COLUMN} DESC"),
            )
            .await?;
        let valid_to = types.len() + position_of(&extra, layout.valid_to());
        let current_column = extra
            .iter()
            .position(|(name, _)| *name == "is_current")
            .map(|i| types.len() + i);
        let version = types.len() + extra.len() - 1;
        let mut rows = Vec::new();
        for event in &plan.events {
            let letter = letter_of(event);
            if layout.ends_previous(event) {
                let previous = before.get(&encoded_key(&event.row, &key, &types));
                if let Some(previous) = previous.filter(|p| was_current(p, version, first_commit)) {
                    let mut closed = previous.clone();
                    closed[valid_to] = [&[0u8][..], &event.at.to_le_bytes()].concat();
                    if let Some(i) = current_column {
                        closed[i] = vec![0];
                    }
                    closed[version] = closed_version(event.lsn).to_le_bytes().to_vec();
                    rows.push(EncodedRow {
                        bytes: closed.concat(),
                        letter: letter.clone(),
                    });
                }
            }
            if !event.kind.is_version() {
                continue;
            }
            let carried = event
                .row
                .contains(&Value::UnchangedToast)
                .then(|| {
                    let from = event.carry_from.as_ref().map_or(&event.row, |c| &c.from);
                    before.get(&encoded_key(from, &key, &types))
                })
                .flatten();
            match encode_version(relation, event, &types, &extra, carried, layout) {
                Ok(bytes) => rows.push(EncodedRow { bytes, letter }),
                Err(e) => refused.push(Refused {
                    relation: Arc::clone(relation),
                    letter,
                    reason: e.to_string(),
                }),
            }
        }
        Ok(TableRows {
            relation: Arc::clone(relation),
            columns: ClickHouseSink::insert_columns(relation, &extra),
            target,
            rows,
        })
    }
}

fn position_of(columns: &[(&'static str, ChType)], name: &str) -> usize {
    columns.iter().position(|(n, _)| *n == name).unwrap_or(0)
}

/// SQL: the version was current when the batch that starts at `first_commit` began.
fn current_before(first_commit: Position) -> String {
    format!(
        "({VERSION_COLUMN} = 0 OR {VERSION_COLUMN} <= {})",
        closed_version(first_commit)
    )
}

/// Whether a version read from the target (its columns' RowBinary, `_tidemark_version` at
/// `version`) was current when the batch that starts at `first_commit` began.
fn was_current(row: &[Vec<u8>], version: usize, first_commit: Position) -> bool {
    let Ok(bytes) = <[u8; 8]>::try_from(row[version].as_slice()) else {
        return false;
    };
    let version = u64::from_le_bytes(bytes);
    version == 0 || version <= closed_version(first_commit)
}

/// A version's row: its values (the unchanged ones from `carried`, the version it
/// supersedes), the layout's, and `_tidemark_version`.
fn encode_version(
    relation: &Relation,
    event: &KeyEvent,
    types: &[ChType],
    extra: &[(&'static str, ChType)],
    carried: Option<&Vec<Vec<u8>>>,
    layout: Layout,
) -> Result<Vec<u8>, EncodeError> {
    let mut bytes = Vec::new();
    for (i, (value, ty)) in event.row.iter().zip(types).enumerate() {
        match (value, carried) {
            (Value::UnchangedToast, Some(carried)) => bytes.extend_from_slice(&carried[i]),
            _ => encode(&mut bytes, ty, value)?,
        }
    }
    for (value, (_, ty)) in layout.values(relation, event).iter().zip(extra) {
        encode(&mut bytes, ty, value)?;
    }
    let version = event.closed_by.map_or(0, closed_version);
    bytes.extend_from_slice(&version.to_le_bytes());
    Ok(bytes)
}

/// An event as its dead letter keeps it: one version, or one close.
fn letter_of(event: &KeyEvent) -> Letter {
    let row = Some(event.row.clone());
    let (action, op, before, after) = match event.kind {
        EventKind::Created => ("version", Op::Insert, None, row),
        EventKind::Read => ("version", Op::Read, None, row),
        EventKind::IncrementalRead => ("version", Op::IncrementalRead, None, row),
        EventKind::Updated => (
            "version",
            Op::Update,
            event.carry_from.as_ref().map(|c| c.from.clone()),
            row,
        ),
        EventKind::Tombstone => ("version", Op::Delete, row, None),
        EventKind::Closed => ("close", Op::Delete, row, None),
    };
    Letter {
        action,
        row: event.row.clone(),
        op,
        before,
        after,
        commit: Some((event.lsn, event.at)),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_first_close_of_a_version_outranks_a_later_one() {
        assert!(closed_version(Position(100)) > closed_version(Position(200)));
        assert!(closed_version(Position(u64::MAX / 2)) > 0);
        let row = |version: u64| vec![vec![1u8], version.to_le_bytes().to_vec()];
        // Open, or closed by the batch itself (a replay): current before the batch.
        assert!(was_current(&row(0), 1, Position(500)));
        assert!(was_current(
            &row(closed_version(Position(600))),
            1,
            Position(500)
        ));
        assert!(was_current(
            &row(closed_version(Position(500))),
            1,
            Position(500)
        ));
        // Closed by an earlier batch.
        assert!(!was_current(
            &row(closed_version(Position(400))),
            1,
            Position(500)
        ));
    }

    #[test]
    fn tombstones_add_dbts_deleted_column_before_the_bookkeeping() {
        let names = |layout: Layout| -> Vec<&str> {
            layout.columns().into_iter().map(|(name, _)| name).collect()
        };
        assert_eq!(
            names(Layout {
                naming: ColumnNaming::Dbt,
                tombstones: true
            }),
            [
                "dbt_scd_id",
                "dbt_updated_at",
                "dbt_valid_from",
                "dbt_valid_to",
                "dbt_is_deleted",
                OP_COLUMN,
                LSN_COLUMN,
                VERSION_COLUMN
            ]
        );
        assert_eq!(
            names(Layout {
                naming: ColumnNaming::Tidemark,
                tombstones: true
            }),
            [
                "valid_from",
                "valid_to",
                "is_current",
                OP_COLUMN,
                LSN_COLUMN,
                VERSION_COLUMN
            ]
        );
    }
}
