//! The ClickHouse sink, over ClickHouse's HTTP interface. `mode = "merge"` keeps a
//! `ReplacingMergeTree(_tidemark_version, _tidemark_is_deleted)` table per source table,
//! ordered by the source primary key: each batch is collapsed to the last state per key and
//! inserted as RowBinary, a delete as a row with `_tidemark_is_deleted = 1`; `SELECT … FINAL`
//! reads the live rows. The version is the source position of the batch's last transaction,
//! so a state written again after a crash (the checkpoint is written after the rows, as
//! ClickHouse has no transactions) is the same row at the same version, and a later state of a
//! key always has a higher one.
//!
//! The checkpoint (the last log record applied, per sink and offset log) is a row of
//! `_tidemark_checkpoint`, itself a ReplacingMergeTree.

pub mod check;
pub mod client;
pub mod types;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use self::client::{ClickHouseClient, ClickHouseError};
use self::types::{encode, key_literal, quote_identifier, quote_string, split_rows, ChType};
use super::collapse::{Collapse, KeyState, TablePlan};
use super::{DeadLettered, Sink, SinkError};
use crate::config::{ClickHouseMode, ClickHouseSinkConfig};
use crate::dead_letter::{self, DeadLetterQueue, LetterChange};
use crate::event::{Op, Position, Record, Relation, RelationId, Value};
use crate::log::{LogEntry, OffsetLog, SinkCursor};

pub const VERSION_COLUMN: &str = "_tidemark_version";
pub const DELETED_COLUMN: &str = "_tidemark_is_deleted";
const CHECKPOINT_TABLE: &str = "_tidemark_checkpoint";

pub struct ClickHouseSink {
    name: String,
    config: ClickHouseSinkConfig,
    log: Arc<OffsetLog>,
    client: ClickHouseClient,
    /// Relation descriptions whose target table exists with all their columns.
    prepared: HashSet<RelationId>,
    /// Source `schema.table` → target `(database, table)`, from `[[sink.table]]`.
    renames: HashMap<String, (String, String)>,
    dead_letters: DeadLetterQueue,
}

/// One table's rows of a batch, ready to insert.
struct TableRows {
    relation: Arc<Relation>,
    target: String,
    truncate: bool,
    rows: Vec<EncodedRow>,
}

struct EncodedRow {
    bytes: Vec<u8>,
    /// What the row applies, for the dead-letter queue.
    state: KeyState,
}

impl ClickHouseSink {
    pub fn new(
        name: &str,
        config: &ClickHouseSinkConfig,
        log: Arc<OffsetLog>,
        data_dir: &Path,
    ) -> Result<ClickHouseSink, SinkError> {
        if config.mode != ClickHouseMode::Merge {
            return Err(SinkError::Unsupported(format!(
                "sink {name:?}: mode {:?} is not built yet for a clickhouse sink; use mode = \
                 \"merge\", or a postgres sink for SCD2 history",
                match config.mode {
                    ClickHouseMode::Scd2 => "scd2",
                    _ => "changelog",
                }
            )));
        }
        let client = ClickHouseClient::new(config).map_err(|message| SinkError::Target {
            sink: name.to_string(),
            message,
        })?;
        let renames = config
            .tables
            .iter()
            .filter_map(|m| {
                let (database, table) = m.target.split_once('.')?;
                Some((m.source.clone(), (database.to_owned(), table.to_owned())))
            })
            .collect();
        Ok(ClickHouseSink {
            name: name.to_string(),
            config: config.clone(),
            log,
            client,
            prepared: HashSet::new(),
            renames,
            dead_letters: DeadLetterQueue::new(data_dir, name),
        })
    }

    fn error(&self, context: &str) -> impl Fn(ClickHouseError) -> SinkError + '_ {
        let context = context.to_string();
        move |e| match e {
            ClickHouseError::Passing(message) => SinkError::Transient {
                sink: self.name.clone(),
                message: format!("{context}: {message}"),
            },
            ClickHouseError::Refused { message, .. } => SinkError::Target {
                sink: self.name.clone(),
                message: format!("{context}: {message}"),
            },
        }
    }

    fn inconsistent(&self, message: String) -> SinkError {
        SinkError::Inconsistent {
            sink: self.name.clone(),
            message,
        }
    }

    /// `database`.`table` of the target of `relation`.
    fn target_of(&self, relation: &Relation) -> String {
        let (database, table) = self
            .renames
            .get(&relation.qualified_name())
            .cloned()
            .unwrap_or_else(|| (self.config.database.clone(), relation.table.clone()));
        format!(
            "{}.{}",
            quote_identifier(&database),
            quote_identifier(&table)
        )
    }

    fn checkpoint_table(&self) -> String {
        format!(
            "{}.{}",
            quote_identifier(&self.config.database),
            quote_identifier(CHECKPOINT_TABLE)
        )
    }

    /// Creates the target table of `relation` if missing and adds the columns it lacks.
    async fn prepare(&mut self, id: RelationId, relation: &Relation) -> Result<(), SinkError> {
        if self.prepared.contains(&id) {
            return Ok(());
        }
        let target = self.target_of(relation);
        let columns: Vec<String> = relation
            .columns
            .iter()
            .map(|c| {
                format!(
                    "{} {}",
                    quote_identifier(&c.name),
                    ChType::of_column(c, c.primary_key).name()
                )
            })
            .collect();
        let key: Vec<String> = relation
            .primary_key_indexes()
            .map(|i| quote_identifier(&relation.columns[i].name))
            .collect();
        if key.is_empty() {
            return Err(SinkError::Target {
                sink: self.name.clone(),
                message: format!(
                    "table {} has no primary key; a merge sink orders its target by one: add a \
                     primary key to the source table",
                    relation.qualified_name()
                ),
            });
        }
        let create = format!(
            "CREATE TABLE IF NOT EXISTS {target} ({}, {VERSION_COLUMN} UInt64, {DELETED_COLUMN} UInt8) \
             ENGINE = ReplacingMergeTree({VERSION_COLUMN}, {DELETED_COLUMN}) ORDER BY ({})",
            columns.join(", "),
            key.join(", ")
        );
        let context = format!("creating {target}");
        self.client
            .query(&create)
            .await
            .map_err(self.error(&context))?;
        let add = format!(
            "ALTER TABLE {target} {}",
            columns
                .iter()
                .map(|c| format!("ADD COLUMN IF NOT EXISTS {c}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let context = format!("adding columns to {target}");
        self.client
            .query(&add)
            .await
            .map_err(self.error(&context))?;
        self.prepared.insert(id);
        Ok(())
    }

    /// Collapses the batch per table and key; returns the plans and the version of its rows
    /// (the source position of its last transaction).
    fn plan(&self, entries: &[LogEntry]) -> Result<(Vec<TablePlan>, Position), SinkError> {
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
                    let relation = self.log.relation(change.relation)?;
                    collapse
                        .add(change.relation, &relation, change)
                        .map_err(|e| self.inconsistent(e.to_string()))?;
                    version = version.max(change.position);
                }
                Record::SnapshotRows(rows) => {
                    let relation = self.log.relation(rows.relation)?;
                    let changes = rows.changes(&relation).map_err(|message| {
                        self.inconsistent(format!("log record {}: {message}", entry.seq))
                    })?;
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

    /// Encodes a plan's states as rows of its target table; states ClickHouse cannot hold
    /// go to `refused` with the reason.
    async fn encode_plan(
        &self,
        plan: &TablePlan,
        version: Position,
        refused: &mut Vec<(Arc<Relation>, KeyState, String)>,
    ) -> Result<TableRows, SinkError> {
        let relation = &plan.relation;
        let types: Vec<ChType> = relation
            .columns
            .iter()
            .map(|c| ChType::of_column(c, c.primary_key))
            .collect();
        let target = self.target_of(relation);
        let held = self.held_rows(plan, &target, &types, version).await?;
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
            match encoded {
                Ok(()) => {
                    bytes.extend_from_slice(&version.0.to_le_bytes());
                    bytes.push(u8::from(deleted));
                    rows.push(EncodedRow {
                        bytes,
                        state: state.clone(),
                    });
                }
                Err(e) => refused.push((Arc::clone(relation), state.clone(), e.to_string())),
            }
        }
        Ok(TableRows {
            relation: Arc::clone(relation),
            target,
            truncate: plan.truncate,
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
        target: &str,
        types: &[ChType],
        version: Position,
    ) -> Result<HashMap<Vec<u8>, Vec<Vec<u8>>>, SinkError> {
        let relation = &plan.relation;
        let key: Vec<usize> = relation.primary_key_indexes().collect();
        let mut literals = Vec::new();
        for state in plan.states() {
            let row = match state {
                KeyState::Upsert(row) if row.contains(&Value::UnchangedToast) => row,
                KeyState::Move { row, from } if row.contains(&Value::UnchangedToast) => from,
                _ => continue,
            };
            let values: Vec<String> = key
                .iter()
                .map(|&i| key_literal(&types[i], &row[i]))
                .collect::<Result<_, _>>()
                .map_err(|e| {
                    self.inconsistent(format!("a key of {}: {e}", relation.qualified_name()))
                })?;
            literals.push(format!("({})", values.join(", ")));
        }
        if literals.is_empty() {
            return Ok(HashMap::new());
        }
        let names = |indexes: &mut dyn Iterator<Item = usize>| {
            indexes
                .map(|i| quote_identifier(&relation.columns[i].name))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let key_names = names(&mut key.iter().copied());
        let select = format!(
            "SELECT {} FROM {target} WHERE ({key_names}) IN ({}) AND {VERSION_COLUMN} <= {} \
             AND {DELETED_COLUMN} = 0 ORDER BY {VERSION_COLUMN} DESC LIMIT 1 BY {key_names} \
             FORMAT RowBinary",
            names(&mut (0..relation.columns.len())),
            literals.join(", "),
            version.0
        );
        let context = format!("reading the values of unchanged TOAST columns from {target}");
        let answer = self
            .client
            .query(&select)
            .await
            .map_err(self.error(&context))?;
        let rows =
            split_rows(&answer, types).map_err(|e| self.inconsistent(format!("{context}: {e}")))?;
        Ok(rows
            .into_iter()
            .map(|row| (key.iter().flat_map(|&i| row[i].clone()).collect(), row))
            .collect())
    }

    /// Inserts a table's rows; when ClickHouse refuses the batch, row by row, so that only
    /// the rows it refuses are dead-lettered.
    async fn insert(
        &self,
        table: &TableRows,
        token: &str,
        refused: &mut Vec<(Arc<Relation>, KeyState, String)>,
    ) -> Result<(), SinkError> {
        if table.rows.is_empty() {
            return Ok(());
        }
        let insert = format!(
            "INSERT INTO {} ({}, {VERSION_COLUMN}, {DELETED_COLUMN}) FORMAT RowBinary",
            table.target,
            table
                .relation
                .columns
                .iter()
                .map(|c| quote_identifier(&c.name))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let body: Vec<u8> = table
            .rows
            .iter()
            .flat_map(|r| r.bytes.iter().copied())
            .collect();
        let context = format!("inserting into {}", table.target);
        match self
            .client
            .insert(&insert, &[("insert_deduplication_token", token)], body)
            .await
        {
            Ok(()) => return Ok(()),
            Err(ClickHouseError::Refused { message, .. }) if table.rows.len() > 1 => {
                tracing::warn!(
                    sink = %self.name,
                    table = %table.target,
                    error = %message,
                    "ClickHouse refused the batch; inserting it row by row to dead-letter the refused rows"
                );
            }
            Err(ClickHouseError::Refused { message, .. }) => {
                refused.push((
                    Arc::clone(&table.relation),
                    table.rows[0].state.clone(),
                    message,
                ));
                return Ok(());
            }
            Err(e) => return Err(self.error(&context)(e)),
        }
        for (number, row) in table.rows.iter().enumerate() {
            let token = format!("{token}-{number}");
            match self
                .client
                .insert(
                    &insert,
                    &[("insert_deduplication_token", &token)],
                    row.bytes.clone(),
                )
                .await
            {
                Ok(()) => {}
                Err(ClickHouseError::Refused { message, .. }) => {
                    refused.push((Arc::clone(&table.relation), row.state.clone(), message))
                }
                Err(e) => return Err(self.error(&context)(e)),
            }
        }
        Ok(())
    }

    /// Writes the refused states to the dead-letter queue, durably; returns their count per
    /// table.
    fn dead_letter(
        &mut self,
        refused: &[(Arc<Relation>, KeyState, String)],
        log_position: u64,
    ) -> Result<DeadLettered, SinkError> {
        let letters: Vec<_> = refused
            .iter()
            .map(|(relation, state, reason)| {
                let (action, op, row, before) = match state {
                    KeyState::Upsert(row) => ("upsert", Op::Insert, row, None),
                    KeyState::Move { row, from } => ("upsert", Op::Update, row, Some(from.clone())),
                    KeyState::Delete(row) => ("delete", Op::Delete, row, None),
                };
                let (after, before_row) = match op {
                    Op::Delete => (None, Some(row.clone())),
                    _ => (Some(row.clone()), before),
                };
                dead_letter::letter(
                    &self.name,
                    relation,
                    action,
                    row,
                    log_position,
                    reason.clone(),
                    LetterChange {
                        relation: (**relation).clone(),
                        op,
                        before: before_row,
                        after,
                        commit: None,
                    },
                )
            })
            .collect();
        self.dead_letters
            .append(&letters)
            .map_err(|source| SinkError::Io {
                sink: self.name.clone(),
                context: format!("writing {}", self.dead_letters.path().display()),
                source,
            })?;
        if !letters.is_empty() {
            tracing::warn!(
                sink = %self.name,
                rows = letters.len(),
                file = %self.dead_letters.path().display(),
                "rows dead-lettered"
            );
        }
        Ok(letters
            .iter()
            .fold(DeadLettered::new(), |mut counts, letter| {
                *counts.entry(letter.table.clone()).or_default() += 1;
                counts
            }))
    }
}

impl Sink for ClickHouseSink {
    async fn open(&mut self) -> Result<u64, SinkError> {
        let database = quote_identifier(&self.config.database);
        self.client
            .query(&format!("CREATE DATABASE IF NOT EXISTS {database}"))
            .await
            .map_err(self.error("creating the database"))?;
        let checkpoint = self.checkpoint_table();
        self.client
            .query(&format!(
                "CREATE TABLE IF NOT EXISTS {checkpoint} (sink String, log_id UInt64, \
                 log_position UInt64, source_position UInt64, written_at DateTime64(6, 'UTC')) \
                 ENGINE = ReplacingMergeTree(log_position) ORDER BY (sink, log_id)"
            ))
            .await
            .map_err(self.error("creating the checkpoint table"))?;
        let answer = self
            .client
            .query(&format!(
                "SELECT max(log_position) FROM {checkpoint} FINAL WHERE sink = {} AND log_id = {} \
                 FORMAT TabSeparated",
                quote_string(&self.name),
                self.log.id()
            ))
            .await
            .map_err(self.error("reading the checkpoint"))?;
        let text = String::from_utf8_lossy(&answer);
        let position = text.trim().parse::<u64>().map_err(|_| {
            self.inconsistent(format!(
                "the checkpoint reads {:?}, not a log position",
                text.trim()
            ))
        })?;
        self.prepared.clear();
        self.dead_letters.load().map_err(|source| SinkError::Io {
            sink: self.name.clone(),
            context: format!("reading {}", self.dead_letters.path().display()),
            source,
        })?;
        Ok(position)
    }

    async fn apply(&mut self, entries: &[LogEntry]) -> Result<DeadLettered, SinkError> {
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return Ok(DeadLettered::new());
        };
        let (plans, version) = self.plan(entries)?;
        let mut refused = Vec::new();
        for (number, plan) in plans.iter().enumerate() {
            self.prepare(plan.relation_id, &plan.relation).await?;
            let table = self.encode_plan(plan, version, &mut refused).await?;
            if table.truncate {
                let context = format!("truncating {}", table.target);
                self.client
                    .query(&format!("TRUNCATE TABLE {}", table.target))
                    .await
                    .map_err(self.error(&context))?;
            }
            let token = format!(
                "{}-{}-{}-{}-{number}",
                self.name,
                self.log.id(),
                first.seq,
                last.seq
            );
            self.insert(&table, &token, &mut refused).await?;
        }
        let dead_lettered = self.dead_letter(&refused, last.seq)?;
        let checkpoint = format!(
            "INSERT INTO {} (sink, log_id, log_position, source_position, written_at) \
             VALUES ({}, {}, {}, {}, now64(6))",
            self.checkpoint_table(),
            quote_string(&self.name),
            self.log.id(),
            last.seq,
            version.0
        );
        self.client
            .query(&checkpoint)
            .await
            .map_err(self.error("writing the checkpoint"))?;
        // The target's checkpoint is what resumes the sink; the log's cursor only lets the
        // log trim what the target holds.
        self.log.note_cursor(
            &self.name,
            &SinkCursor {
                seq: last.seq,
                state: Vec::new(),
            },
        )?;
        Ok(dead_lettered)
    }
}

/// The key of `row` as RowBinary, the way the target's rows are matched to it.
fn encoded_key(row: &[Value], key: &[usize], types: &[ChType]) -> Vec<u8> {
    let mut bytes = Vec::new();
    for &i in key {
        // A key that does not encode matches no row.
        let _ = encode(&mut bytes, &types[i], &row[i]);
    }
    bytes
}
