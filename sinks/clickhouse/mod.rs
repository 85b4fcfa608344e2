//! The ClickHouse sink, over ClickHouse's HTTP interface: one target table per source table,
//! in one of three modes.
//!
//! - `merge` (merge.rs): a `ReplacingMergeTree(_tidemark_version, _tidemark_is_deleted)`
//!   ordered by the source primary key; `SELECT … FINAL` reads the live rows.
//! - `scd2` (scd2.rs): every committed version with its validity, the PostgreSQL SCD2 sink's
//!   columns; a version is closed by inserting it again, with a higher `_tidemark_version`.
//! - `changelog` (changelog.rs): every change as a row, partitioned by day.
//!
//! ClickHouse has no transactions: a batch's rows are written first, then the checkpoint (the
//! last log record applied, per sink and offset log, a row of `_tidemark_checkpoint`, itself a
//! ReplacingMergeTree). Each mode makes writing a batch again after a crash in between leave
//! the table as one write would.

pub mod changelog;
pub mod check;
pub mod client;
pub mod merge;
pub mod scd2;
mod schema;
pub mod types;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use self::client::{ClickHouseClient, ClickHouseError};
use self::types::{encode, key_literal, quote_identifier, quote_string, split_rows, ChType};
use super::{DeadLettered, Sink, SinkError};
use crate::config::{ClickHouseMode, ClickHouseSinkConfig};
use crate::dead_letter::{self, DeadLetterQueue, LetterChange};
use crate::event::{ChangeEvent, Op, Position, Relation, RelationId, Row, SnapshotRows, Value};
use crate::log::{LogEntry, OffsetLog, SinkCursor};

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
    /// The last log record applied: the checkpoint `open` read, then each batch's.
    applied: u64,
    /// Changelog: the tables cleared of rows past the checkpoint since the sink opened.
    replay_checked: HashSet<String>,
    /// SCD2: a transaction larger than a batch, split by key as its chunks arrive.
    large: super::large::LargeSplit,
    /// The schema changes of the batch being applied, made before its rows.
    schema_steps: Vec<schema::SchemaStep>,
    /// `dlq retry`: the relations of the letters, by the ids their changes carry.
    retrying: Option<Vec<Arc<Relation>>>,
}

/// How a mode's target table is made: the columns after the source's, and the engine clause.
struct TableShape {
    columns: Vec<(&'static str, ChType)>,
    engine: String,
}

/// One table's rows of a batch, ready to insert.
struct TableRows {
    relation: Arc<Relation>,
    target: String,
    /// The insert's column list.
    columns: Vec<String>,
    rows: Vec<EncodedRow>,
}

struct EncodedRow {
    bytes: Vec<u8>,
    letter: Letter,
}

/// What a row applies, as its dead letter records it (see [`LetterChange`]).
#[derive(Debug, Clone)]
struct Letter {
    action: &'static str,
    row: Row,
    op: Op,
    before: Option<Row>,
    after: Option<Row>,
    commit: Option<(Position, i64)>,
}

/// A row ClickHouse cannot hold, or refused, with the reason.
struct Refused {
    relation: Arc<Relation>,
    letter: Letter,
    reason: String,
}

impl ClickHouseSink {
    pub fn new(
        name: &str,
        config: &ClickHouseSinkConfig,
        log: Arc<OffsetLog>,
        data_dir: &Path,
    ) -> Result<ClickHouseSink, SinkError> {
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
            applied: 0,
            replay_checked: HashSet::new(),
            large: super::large::LargeSplit::new(name, data_dir),
            schema_steps: Vec::new(),
            retrying: None,
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

    /// The relation description `id` names: the log's, or while retrying dead letters theirs.
    fn relation(&self, id: RelationId) -> Result<Arc<Relation>, SinkError> {
        match &self.retrying {
            Some(relations) => relations.get(id.0 as usize).cloned().ok_or_else(|| {
                self.inconsistent(format!("a dead letter names relation {}, not given", id.0))
            }),
            None => Ok(self.log.relation(id)?),
        }
    }

    /// The rows of the snapshot record `seq` as changes, with their relation.
    fn snapshot_changes(
        &self,
        seq: u64,
        rows: &SnapshotRows,
    ) -> Result<(Arc<Relation>, Vec<ChangeEvent>), SinkError> {
        let relation = self.relation(rows.relation)?;
        let changes = rows
            .changes(&relation)
            .map_err(|message| self.inconsistent(format!("log record {seq}: {message}")))?;
        Ok((relation, changes))
    }

    /// Applies dead letters again (`dlq retry`; the sink is open, the agent stopped), each
    /// commit as a transaction of its own: a merge letter at its own version, so a later state
    /// of its key stays; a changelog letter as the change row it was; an SCD2 letter (a version
    /// or a close) unless the target holds a later version of its key, which ended the version
    /// before it already. Letters refused again go back to the queue with the new reason; the
    /// checkpoint stays at `applied`, which `open` returned. Returns how many were refused
    /// again and which of `letters` were left alone as superseded.
    pub async fn retry(
        &mut self,
        letters: &[LetterChange],
        applied: u64,
    ) -> Result<(usize, Vec<usize>), SinkError> {
        let mut superseded = Vec::new();
        let mut refused = 0;
        let mut groups: Vec<Vec<LetterChange>> = Vec::new();
        if self.config.mode == ClickHouseMode::Scd2 {
            // One at a time, in commit order: each finds the version before it as it stands.
            let mut order: Vec<usize> = (0..letters.len()).collect();
            order.sort_by_key(|&i| letters[i].commit.map(|(lsn, _)| lsn));
            for i in order {
                if self.superseded(&letters[i]).await? {
                    superseded.push(i);
                } else {
                    groups.push(vec![letters[i].clone()]);
                }
            }
        } else {
            groups.push(letters.to_vec());
        }
        for group in groups {
            let (entries, relations) = dead_letter::as_transactions(&group, applied);
            self.retrying = Some(relations);
            let result = self.apply_records(&entries, applied, false).await;
            self.retrying = None;
            refused += result?.values().sum::<u64>() as usize;
        }
        Ok((refused, superseded))
    }

    fn inconsistent(&self, message: String) -> SinkError {
        SinkError::Inconsistent {
            sink: self.name.clone(),
            message,
        }
    }

    /// Runs a statement, naming what it does in its error.
    async fn run(&self, sql: &str, context: &str) -> Result<Vec<u8>, SinkError> {
        self.client.query(sql).await.map_err(self.error(context))
    }

    /// The database and table names of the target of `relation`.
    fn target_names(&self, relation: &Relation) -> (String, String) {
        self.renames
            .get(&relation.qualified_name())
            .cloned()
            .unwrap_or_else(|| (self.config.database.clone(), relation.table.clone()))
    }

    /// `database`.`table` of the target of `relation`.
    fn target_of(&self, relation: &Relation) -> String {
        let (database, table) = self.target_names(relation);
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

    /// The ClickHouse types of the source columns of `relation` in this sink's tables: key
    /// columns are never Nullable where the table is ordered by them.
    fn column_types(&self, relation: &Relation) -> Vec<ChType> {
        let keyed = self.config.mode != ClickHouseMode::Changelog;
        relation
            .columns
            .iter()
            .map(|c| ChType::of_column(c, keyed && c.primary_key))
            .collect()
    }

    /// Creates the target table of `relation` if missing and adds the columns it lacks.
    async fn prepare(&mut self, id: RelationId, relation: &Relation) -> Result<(), SinkError> {
        if self.prepared.contains(&id) {
            return Ok(());
        }
        let target = self.target_of(relation);
        let key: Vec<String> = relation
            .primary_key_indexes()
            .map(|i| quote_identifier(&relation.columns[i].name))
            .collect();
        if key.is_empty() && self.config.mode != ClickHouseMode::Changelog {
            return Err(SinkError::Target {
                sink: self.name.clone(),
                message: format!(
                    "table {} has no primary key; a {} table is ordered by one: add a primary \
                     key to the source table",
                    relation.qualified_name(),
                    self.config.mode.name()
                ),
            });
        }
        let shape = match self.config.mode {
            ClickHouseMode::Merge => merge::shape(&key),
            ClickHouseMode::Scd2 => self.layout().shape(&key),
            ClickHouseMode::Changelog => changelog::shape(),
        };
        let columns: Vec<String> = relation
            .columns
            .iter()
            .zip(self.column_types(relation))
            .map(|(c, ty)| format!("{} {}", quote_identifier(&c.name), ty.name()))
            .collect();
        let create = format!(
            "CREATE TABLE IF NOT EXISTS {target} ({}) ENGINE = {}",
            columns
                .iter()
                .cloned()
                .chain(
                    shape
                        .columns
                        .iter()
                        .map(|(name, ty)| format!("{name} {}", ty.name()))
                )
                .collect::<Vec<_>>()
                .join(", "),
            shape.engine
        );
        self.run(&create, &format!("creating {target}")).await?;
        let add = format!(
            "ALTER TABLE {target} {}",
            columns
                .iter()
                .map(|c| format!("ADD COLUMN IF NOT EXISTS {c}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        self.run(&add, &format!("adding columns to {target}"))
            .await?;
        self.prepared.insert(id);
        Ok(())
    }

    /// The insert column list of `relation`'s table: its source columns, then `extra`.
    fn insert_columns(relation: &Relation, extra: &[(&'static str, ChType)]) -> Vec<String> {
        relation
            .columns
            .iter()
            .map(|c| quote_identifier(&c.name))
            .chain(extra.iter().map(|(name, _)| (*name).to_string()))
            .collect()
    }

    /// Each key's latest row of `target` that `filter` admits, by the order `order`: by the
    /// key's RowBinary (`types` of `relation`'s columns), the bytes of each of `columns`
    /// (the source's, then the named others).
    #[allow(clippy::too_many_arguments)]
    async fn latest_by_key(
        &self,
        relation: &Relation,
        target: &str,
        types: &[ChType],
        keys: &[&Row],
        extra: &[(&'static str, ChType)],
        filter: &str,
        order: &str,
    ) -> Result<HashMap<Vec<u8>, Vec<Vec<u8>>>, SinkError> {
        let key: Vec<usize> = relation.primary_key_indexes().collect();
        let mut literals = Vec::new();
        for row in keys {
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
        let key_names = key
            .iter()
            .map(|&i| quote_identifier(&relation.columns[i].name))
            .collect::<Vec<_>>()
            .join(", ");
        let select = format!(
            "SELECT {} FROM {target} WHERE ({key_names}) IN ({}) AND {filter} \
             ORDER BY {order} LIMIT 1 BY {key_names} FORMAT RowBinary",
            Self::insert_columns(relation, extra).join(", "),
            literals.join(", "),
        );
        let context = format!("reading rows of {target} the batch builds on");
        let answer = self.run(&select, &context).await?;
        let all_types: Vec<ChType> = types
            .iter()
            .cloned()
            .chain(extra.iter().map(|(_, ty)| ty.clone()))
            .collect();
        let rows = split_rows(&answer, &all_types)
            .map_err(|e| self.inconsistent(format!("{context}: {e}")))?;
        Ok(rows
            .into_iter()
            .map(|row| (key.iter().flat_map(|&i| row[i].clone()).collect(), row))
            .collect())
    }

    /// Inserts a table's rows; when ClickHouse refuses the batch, row by row, so that only
    /// the rows it refuses are dead-lettered.
    async fn insert(
        &self,
        table: TableRows,
        token: &str,
        refused: &mut Vec<Refused>,
    ) -> Result<(), SinkError> {
        if table.rows.is_empty() {
            return Ok(());
        }
        let insert = format!(
            "INSERT INTO {} ({}) FORMAT RowBinary",
            table.target,
            table.columns.join(", ")
        );
        let body: Vec<u8> = table
            .rows
            .iter()
            .flat_map(|r| r.bytes.iter().copied())
            .collect();
        let context = format!("inserting into {}", table.target);
        let refuse = |row: &EncodedRow, reason: String| Refused {
            relation: Arc::clone(&table.relation),
            letter: row.letter.clone(),
            reason,
        };
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
                refused.push(refuse(&table.rows[0], message));
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
                Err(ClickHouseError::Refused { message, .. }) => refused.push(refuse(row, message)),
                Err(e) => return Err(self.error(&context)(e)),
            }
        }
        Ok(())
    }

    /// Writes the refused rows to the dead-letter queue, durably; returns their count per
    /// table.
    fn dead_letter(
        &mut self,
        refused: &[Refused],
        log_position: u64,
    ) -> Result<DeadLettered, SinkError> {
        let letters: Vec<_> = refused
            .iter()
            .map(|r| {
                dead_letter::letter(
                    &self.name,
                    &r.relation,
                    r.letter.action,
                    &r.letter.row,
                    log_position,
                    r.reason.clone(),
                    LetterChange {
                        relation: (*r.relation).clone(),
                        op: r.letter.op,
                        before: r.letter.before.clone(),
                        after: r.letter.after.clone(),
                        commit: r.letter.commit,
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

    /// A token for a table's insert of the batch `first..=last`, the same when the batch is
    /// written again.
    fn token(&self, first: u64, last: u64, number: usize) -> String {
        format!("{}-{}-{first}-{last}-{number}", self.name, self.log.id())
    }

    /// Writes the checkpoint after the batch's rows, and lets the log trim what it covers.
    async fn checkpoint(&mut self, last: u64, source: Position) -> Result<(), SinkError> {
        let checkpoint = format!(
            "INSERT INTO {} (sink, log_id, log_position, source_position, written_at) \
             VALUES ({}, {}, {}, {}, now64(6))",
            self.checkpoint_table(),
            quote_string(&self.name),
            self.log.id(),
            last,
            source.0
        );
        self.run(&checkpoint, "writing the checkpoint").await?;
        self.applied = last;
        // The target's checkpoint is what resumes the sink; the log's cursor only lets the
        // log trim what the target holds.
        self.log.note_cursor(
            &self.name,
            &SinkCursor {
                seq: last,
                state: Vec::new(),
            },
        )?;
        Ok(())
    }

    /// Applies whole transactions (or, in merge and changelog, a chunk of one) that end at
    /// log record `last`; then, if `checkpoint`, the checkpoint.
    async fn apply_records(
        &mut self,
        entries: &[LogEntry],
        last: u64,
        checkpoint: bool,
    ) -> Result<DeadLettered, SinkError> {
        self.apply_schema_changes(entries).await?;
        let mut refused = Vec::new();
        let source = match self.config.mode {
            ClickHouseMode::Merge => self.apply_merge(entries, &mut refused).await?,
            ClickHouseMode::Scd2 => self.apply_history(entries, &mut refused).await?,
            ClickHouseMode::Changelog => self.apply_changelog(entries, &mut refused).await?,
        };
        let dead_lettered = self.dead_letter(&refused, last)?;
        if checkpoint {
            self.checkpoint(last, source).await?;
        }
        Ok(dead_lettered)
    }
}

impl Sink for ClickHouseSink {
    async fn open(&mut self) -> Result<u64, SinkError> {
        let database = quote_identifier(&self.config.database);
        self.run(
            &format!("CREATE DATABASE IF NOT EXISTS {database}"),
            "creating the database",
        )
        .await?;
        let checkpoint = self.checkpoint_table();
        self.run(
            &format!(
                "CREATE TABLE IF NOT EXISTS {checkpoint} (sink String, log_id UInt64, \
                 log_position UInt64, source_position UInt64, written_at DateTime64(6, 'UTC')) \
                 ENGINE = ReplacingMergeTree(log_position) ORDER BY (sink, log_id)"
            ),
            "creating the checkpoint table",
        )
        .await?;
        let answer = self
            .run(
                &format!(
                    "SELECT max(log_position) FROM {checkpoint} FINAL WHERE sink = {} AND \
                     log_id = {} FORMAT TabSeparated",
                    quote_string(&self.name),
                    self.log.id()
                ),
                "reading the checkpoint",
            )
            .await?;
        let text = String::from_utf8_lossy(&answer);
        let position = text.trim().parse::<u64>().map_err(|_| {
            self.inconsistent(format!(
                "the checkpoint reads {:?}, not a log position",
                text.trim()
            ))
        })?;
        self.prepared.clear();
        self.replay_checked.clear();
        self.applied = position;
        self.large.reset();
        self.dead_letters.load().map_err(|source| SinkError::Io {
            sink: self.name.clone(),
            context: format!("reading {}", self.dead_letters.path().display()),
            source,
        })?;
        Ok(position)
    }

    /// After a failed batch the pipeline opens the sink again, which forgets what the batch
    /// left half done.
    async fn apply(&mut self, entries: &[LogEntry]) -> Result<DeadLettered, SinkError> {
        let Some(last) = entries.last() else {
            return Ok(DeadLettered::new());
        };
        if self.config.mode != ClickHouseMode::Scd2 {
            return self.apply_records(entries, last.seq, true).await;
        }
        // A version is a key's state at its transaction's commit: a transaction larger than
        // a batch is split by key as its chunks arrive and applied at its commit, partition
        // by partition.
        let mut dead_lettered = DeadLettered::new();
        let mut entries = entries;
        let is_commit = |e: &LogEntry| matches!(e.record, crate::event::Record::Commit(_));
        if self.large.is_open() || !entries.iter().any(is_commit) {
            let end = entries.iter().position(is_commit);
            self.large
                .add(&self.log, &entries[..end.unwrap_or(entries.len())])?;
            let Some(end) = end else {
                return Ok(dead_lettered);
            };
            let commit = &entries[end];
            let mut partitions = self.large.finish(commit);
            while let Some((part, is_last)) = partitions.next(&self.log)? {
                for (table, count) in self.apply_records(&part, commit.seq, is_last).await? {
                    *dead_lettered.entry(table).or_default() += count;
                }
            }
            entries = &entries[end + 1..];
        }
        if let Some(last) = entries.last() {
            for (table, count) in self.apply_records(entries, last.seq, true).await? {
                *dead_lettered.entry(table).or_default() += count;
            }
        }
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
