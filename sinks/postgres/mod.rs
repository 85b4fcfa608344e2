//! PostgreSQL table sinks. `mode = "merge"` keeps a live mirror of each source table: each
//! batch is collapsed to the last state per key. `mode = "scd2"` keeps every committed version
//! of each row: each batch becomes one event per key and transaction. Either way the batch is
//! loaded into staging tables and applied with set-based statements, and the checkpoint row
//! (the last log record applied) is written in the same target transaction, so replaying any
//! suffix of the log changes nothing twice.

pub mod check;
pub mod ddl;
pub mod merge;
pub mod scd2;
pub mod schema;
pub mod staging;

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::pin::pin;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::SinkExt;
use tokio_postgres::Client;

use self::ddl::TargetTable;
use self::schema::SchemaStep;
use self::staging::{Pass, PlanSql};
use super::collapse::{Collapse, CollapseError, KeyState, TablePlan};
use super::history::{EventKind, History, HistoryPlan};
use super::large::LargeSplit;
use super::{DeadLettered, Sink, SinkError};
use crate::config::{PostgresSinkConfig, SinkMode};
use crate::dead_letter::{self, DeadLetterQueue, LetterChange, Touch};
use crate::event::{ChangeEvent, Op, Position, Record, Relation, RelationId, Row};
use crate::log::{LogEntry, OffsetLog, SinkCursor};
use crate::pgclient::db_message;
use crate::pgtext::copy_rows::parse_copy_rows;
use crate::retry::is_transient;
use crate::tls::ConnectError;

pub struct PostgresSink {
    name: String,
    config: PostgresSinkConfig,
    log: Arc<OffsetLog>,
    client: Option<Client>,
    /// Relation descriptions whose target table is known to exist with all their columns.
    prepared: HashSet<RelationId>,
    planner: BatchPlanner,
    dead_letters: DeadLetterQueue,
    /// SCD2: a transaction larger than a batch, split by key as its chunks arrive.
    large: LargeSplit,
    /// How many connections COPY a batch that holds only initial-snapshot rows (the
    /// source's `snapshot_parallelism`), and the ones open besides `client`.
    snapshot_writers: usize,
    extra_writers: Vec<Client>,
}

impl PostgresSink {
    pub fn new(
        name: &str,
        config: &PostgresSinkConfig,
        log: Arc<OffsetLog>,
        data_dir: &Path,
    ) -> Result<PostgresSink, SinkError> {
        if config.mode == SinkMode::Append {
            return Err(SinkError::Unsupported(format!(
                "sink {name:?}: mode \"append\" is not built yet for a postgres sink; use \
                 mode = \"merge\" or \"scd2\", or a jsonl sink for a stream of envelopes"
            )));
        }
        let renames = config
            .tables
            .iter()
            .filter_map(|m| {
                let (schema, name) = m.target.split_once('.')?;
                Some((
                    m.source.clone(),
                    TargetTable {
                        schema: schema.into(),
                        name: name.into(),
                    },
                ))
            })
            .collect();
        Ok(PostgresSink {
            name: name.to_string(),
            config: config.clone(),
            planner: BatchPlanner {
                sink: name.to_string(),
                config: config.clone(),
                renames,
                log: Arc::clone(&log),
            },
            log,
            client: None,
            prepared: HashSet::new(),
            dead_letters: DeadLetterQueue::new(data_dir, name),
            large: LargeSplit::new(name, data_dir),
            snapshot_writers: 1,
            extra_writers: Vec::new(),
        })
    }

    /// COPYs batches of initial-snapshot rows over `writers` connections at once (see
    /// [`PostgresSink::apply_snapshot_rows`]).
    pub fn with_snapshot_writers(mut self, writers: usize) -> PostgresSink {
        self.snapshot_writers = writers.max(1);
        self
    }

    /// A new connection to the target.
    async fn connect(&self) -> Result<Client, SinkError> {
        let context = format!("connecting to {}", self.config.url.redacted());
        let (client, connection) = crate::tls::connect(&self.config.url.pg_config())
            .await
            .map_err(|e| match e {
                // A certificate that fails verification needs the operator, not a retry.
                ConnectError::Tls(e) => SinkError::Target {
                    sink: self.name.clone(),
                    message: e.to_string(),
                },
                ConnectError::Postgres(e) => target_error(&self.name, context, e),
            })?;
        let sink = self.name.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(sink, error = %e, "target connection closed");
            }
        });
        // money's input reads the session's lc_monetary format (under de_DE `1234.56` is
        // 123456 euros): the amounts capture reads under C, and the snapshot's COPY text
        // forwarded as is, load back exactly under C.
        client
            .batch_execute("SET lc_monetary = 'C'")
            .await
            .map_err(self.error("setting lc_monetary".into()))?;
        Ok(client)
    }

    fn error(&self, context: String) -> impl FnOnce(tokio_postgres::Error) -> SinkError + '_ {
        move |e| target_error(&self.name, context, e)
    }

    fn client(&self) -> Result<&Client, SinkError> {
        self.client.as_ref().ok_or_else(|| SinkError::Transient {
            sink: self.name.clone(),
            message: "not connected".into(),
        })
    }

    /// Creates the target table of `relation` if missing and adds columns it lacks.
    async fn prepare(&mut self, id: RelationId, relation: &Relation) -> Result<(), SinkError> {
        if self.prepared.contains(&id) {
            return Ok(());
        }
        let target = self.planner.target_of(relation);
        let sql = self.planner.table_sql(&target, relation);
        self.client()?
            .batch_execute(&sql.join(";\n"))
            .await
            .map_err(self.error(format!("creating or altering {target}")))?;
        self.prepared.insert(id);
        Ok(())
    }

    /// Plans the batch and creates the target tables it needs (or the columns they lack).
    async fn plan(
        &mut self,
        entries: &[LogEntry],
        relation_of: impl Fn(RelationId) -> Result<Arc<Relation>, SinkError>,
        snapshot_text: SnapshotText,
    ) -> Result<PlannedBatch, SinkError> {
        let planned = self.planner.plan(entries, relation_of, snapshot_text)?;
        self.prepare_tables(planned).await
    }

    /// Prepares the target tables of the batch's work; those of tables a schema change of the
    /// batch alters are brought to shape in the batch's transaction instead (columns added
    /// here, before it, would miss the values existing rows hold).
    async fn prepare_tables(&mut self, planned: PlannedBatch) -> Result<PlannedBatch, SinkError> {
        for table in &planned.tables {
            if !planned.alters(table.relation.oid) {
                self.prepare(table.relation_id, &table.relation).await?;
            }
        }
        Ok(planned)
    }

    /// What plans batches without the connection, so the pipeline can plan the next batch
    /// while this one is applied.
    pub fn planner(&self) -> BatchPlanner {
        self.planner.clone()
    }
}

/// Turns batches of log records into the work each target table gets, without touching the
/// target: a pure step that runs on a blocking thread for the batch after the one being
/// applied.
#[derive(Clone)]
pub struct BatchPlanner {
    sink: String,
    config: PostgresSinkConfig,
    /// Source `schema.table` → target, from `[[sink.table]]`.
    renames: HashMap<String, TargetTable>,
    log: Arc<OffsetLog>,
}

/// What a plan does with the initial snapshot's rows, which the log holds as COPY text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SnapshotText {
    /// A merge sink's fresh pass COPYs them into the target as they are.
    Forward,
    /// Decoded into `Read` changes, like every other change: for the passes that stage
    /// them (a replay, one row at a time) and for SCD2.
    Decode,
}

/// A planned batch: its records (by sequence number), each table's work with the fresh
/// pass's rows already encoded, and the furthest source LSN it holds.
pub struct PlannedBatch {
    pub first: u64,
    pub last: u64,
    /// Schema changes, applied before the tables' work.
    schema: Vec<SchemaStep>,
    tables: Vec<TableWork>,
    source_lsn: Position,
}

impl PlannedBatch {
    /// Whether a schema change of the batch alters the source table `oid`.
    fn alters(&self, oid: u32) -> bool {
        self.schema.iter().any(|step| step.relation.oid == oid)
    }

    fn into_batch(self, log_position: u64, checkpoint: bool) -> Batch {
        Batch {
            schema: self.schema,
            tables: self.tables,
            log_position,
            source_lsn: self.source_lsn,
            checkpoint,
        }
    }
}

impl BatchPlanner {
    fn target_of(&self, relation: &Relation) -> TargetTable {
        self.renames
            .get(&relation.qualified_name())
            .cloned()
            .unwrap_or_else(|| TargetTable {
                schema: self.config.schema.clone(),
                name: relation.table.clone(),
            })
    }

    /// What creates the target table of `relation` if missing and adds the columns it lacks.
    fn table_sql(&self, target: &TargetTable, relation: &Relation) -> Vec<String> {
        let mut sql = vec![ddl::create_schema(&target.schema)];
        match self.config.mode {
            SinkMode::Scd2 => sql.push(scd2::create_table(target, relation, self.layout())),
            _ => sql.push(ddl::create_table(target, relation)),
        }
        sql.extend(relation.columns.iter().map(|c| ddl::add_column(target, c)));
        if self.config.soft_delete && self.config.mode == SinkMode::Merge {
            sql.push(format!(
                "ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} boolean NOT NULL DEFAULT false",
                target.quoted(),
                merge::DELETED_COLUMN
            ));
        }
        sql
    }

    /// Applies the batch's schema changes in its transaction, before its rows; returns what
    /// must run after them.
    async fn alter(
        &self,
        transaction: &tokio_postgres::Transaction<'_>,
        steps: &[SchemaStep],
    ) -> Result<Vec<String>, ApplyError> {
        let mut after_rows = Vec::new();
        let mut tables: HashMap<TargetTable, schema::TargetColumns> = HashMap::new();
        for step in steps {
            let columns = match tables.entry(step.target.clone()) {
                Entry::Occupied(known) => known.into_mut(),
                Entry::Vacant(unknown) => {
                    let rows = transaction
                        .query(schema::TARGET_COLUMNS_QUERY, &[&step.target.quoted()])
                        .await
                        .map_err(ApplyError::with(format!(
                            "reading the columns of {}",
                            step.target
                        )))?;
                    let columns: Vec<(String, String)> =
                        rows.iter().map(|r| (r.get(0), r.get(1))).collect();
                    unknown.insert((!columns.is_empty()).then_some(columns))
                }
            };
            let create = self.table_sql(&step.target, &step.relation);
            let alters = schema::alters(step, columns, &create, self.config.dropped_columns)
                .map_err(ApplyError::Narrowing)?;
            schema_statements(transaction, &alters.before).await?;
            tracing::info!(
                sink = %self.sink,
                table = %step.target,
                changes = ?step.change.columns,
                inferred = !step.change.exact,
                "schema change applied"
            );
            after_rows.extend(alters.after);
        }
        Ok(after_rows)
    }

    fn layout(&self) -> scd2::Layout {
        scd2::Layout {
            naming: self.config.columns,
            tombstones: self.config.history_deletes,
        }
    }

    /// Plans a batch the pipeline read ahead; None when it is not worth planning now (an
    /// SCD2 batch inside a transaction larger than a batch goes to its partitions instead) or
    /// cannot be (the error shows when the batch is applied).
    pub fn plan_ahead(&self, entries: &[LogEntry]) -> Option<PlannedBatch> {
        let whole = entries
            .last()
            .is_some_and(|e| matches!(e.record, Record::Commit(_)));
        if self.config.mode == SinkMode::Scd2 && !whole {
            return None;
        }
        self.plan(
            entries,
            |id| Ok(self.log.relation(id)?),
            SnapshotText::Forward,
        )
        .ok()
    }

    /// Turns the records into one piece of work per table and relation description
    /// (`relation_of` resolves the ids).
    fn plan(
        &self,
        entries: &[LogEntry],
        relation_of: impl Fn(RelationId) -> Result<Arc<Relation>, SinkError>,
        snapshot_text: SnapshotText,
    ) -> Result<PlannedBatch, SinkError> {
        let mut builder = match self.config.mode {
            SinkMode::Scd2 => PlanBuilder::History(History::new(self.config.history_deletes)),
            _ => PlanBuilder::Merge(Collapse::default()),
        };
        let inconsistent = |message: String| SinkError::Inconsistent {
            sink: self.sink.clone(),
            message,
        };
        let mut source_lsn = Position(0);
        let mut schema = Vec::new();
        for entry in entries {
            match &entry.record {
                Record::Schema(change) => {
                    let relation = relation_of(change.relation)?;
                    schema.push(SchemaStep {
                        target: self.target_of(&relation),
                        relation,
                        change: change.clone(),
                    });
                    source_lsn = source_lsn.max(change.position);
                }
                Record::Change(change) => {
                    let relation = relation_of(change.relation)?;
                    builder
                        .add(&relation, change)
                        .map_err(|e| inconsistent(e.to_string()))?;
                    source_lsn = source_lsn.max(change.position);
                }
                Record::SnapshotRows(rows) => {
                    let relation = relation_of(rows.relation)?;
                    let forwarded = match (&mut builder, snapshot_text) {
                        (PlanBuilder::Merge(collapse), SnapshotText::Forward) => collapse
                            .add_copied(rows.relation, &relation, rows)
                            .map_err(|e| inconsistent(e.to_string()))?,
                        _ => false,
                    };
                    if !forwarded {
                        let changes = rows.changes(&relation).map_err(|message| {
                            inconsistent(format!("log record {}: {message}", entry.seq))
                        })?;
                        for change in &changes {
                            builder
                                .add(&relation, change)
                                .map_err(|e| inconsistent(e.to_string()))?;
                        }
                    }
                    source_lsn = source_lsn.max(rows.position);
                }
                Record::Commit(commit) => {
                    source_lsn = source_lsn.max(commit.commit_position);
                    if let PlanBuilder::History(history) = &mut builder {
                        history.commit();
                    }
                }
                Record::Begin(begin) => {
                    if let PlanBuilder::History(history) = &mut builder {
                        history.begin(begin);
                    }
                }
            }
        }
        let mut seen: HashMap<(RelationId, Option<RelationId>), usize> = HashMap::new();
        let mut stage_of = |relation_id: RelationId, renamed_by: Option<RelationId>| {
            let occurrence = seen.entry((relation_id, renamed_by)).or_default();
            *occurrence += 1;
            stage_name(relation_id, renamed_by, *occurrence - 1)
        };
        // A description older than a schema change of the batch takes the names the change
        // gives its columns (the change is applied first); its staging table is another.
        let mut rename = |relation_id: RelationId, relation: &mut Arc<Relation>| {
            let later = || {
                schema.iter().filter(|step| {
                    step.relation.oid == relation.oid && step.change.relation > relation_id
                })
            };
            let renamed_by = later().map(|step| step.change.relation).max();
            if renamed_by.is_some() {
                *relation = Arc::new(schema::renamed(relation, later()));
            }
            stage_of(relation_id, renamed_by)
        };
        let tables = match builder {
            PlanBuilder::Merge(collapse) => collapse
                .finish()
                .into_iter()
                .map(|mut plan| {
                    let stage = rename(plan.relation_id, &mut plan.relation);
                    let target = self.target_of(&plan.relation);
                    TableWork::merge(target, &stage, plan, self.config.soft_delete)
                })
                .collect(),
            PlanBuilder::History(history) => history
                .finish()
                .into_iter()
                .map(|mut plan| {
                    let stage = rename(plan.relation_id, &mut plan.relation);
                    let target = self.target_of(&plan.relation);
                    TableWork::history(target, &stage, plan, self.layout())
                })
                .collect(),
        };
        Ok(PlannedBatch {
            first: entries.first().map_or(0, |e| e.seq),
            last: entries.last().map_or(0, |e| e.seq),
            schema,
            tables,
            source_lsn,
        })
    }
}

enum PlanBuilder {
    Merge(Collapse),
    History(History),
}

impl PlanBuilder {
    fn add(&mut self, relation: &Arc<Relation>, change: &ChangeEvent) -> Result<(), CollapseError> {
        match self {
            PlanBuilder::Merge(collapse) => collapse.add(change.relation, relation, change),
            PlanBuilder::History(history) => history.add(change.relation, relation, change),
        }
    }
}

impl PostgresSink {
    /// Applies dead letters again (`dlq retry`; the sink is open, the agent stopped), in one
    /// target transaction, each as a transaction of its own in commit order. Letters the target
    /// refuses again go back to the queue with the new reason; the checkpoint stays where it
    /// is (`applied`, which `open` returned). Returns how many were refused again.
    pub async fn retry(
        &mut self,
        letters: &[LetterChange],
        applied: u64,
    ) -> Result<usize, SinkError> {
        let (entries, relations) = dead_letter::as_transactions(letters, applied);
        let batch = self
            .plan(
                &entries,
                |id| Ok(Arc::clone(&relations[id.0 as usize])),
                SnapshotText::Decode,
            )
            .await?
            .into_batch(applied, false);
        let refused = self
            .apply_batch(&batch, Pass::OneRow)
            .await
            .map_err(|e| e.into_sink_error(&self.name))?;
        Ok(refused.len())
    }
}

impl Sink for PostgresSink {
    async fn open(&mut self) -> Result<u64, SinkError> {
        self.extra_writers.clear();
        let client = self.connect().await?;
        client
            .batch_execute(&format!(
                "{};\n{}",
                ddl::create_schema(&self.config.schema),
                ddl::create_checkpoint_table(&self.config.schema)
            ))
            .await
            .map_err(self.error("creating the checkpoint table".into()))?;
        let row = client
            .query_opt(
                &format!(
                    "SELECT log_position, log_id FROM {}._tidemark_checkpoint WHERE sink = $1",
                    postgres_protocol::escape::escape_identifier(&self.config.schema)
                ),
                &[&self.name],
            )
            .await
            .map_err(self.error("reading the checkpoint".into()))?;
        self.client = Some(client);
        self.prepared.clear();
        self.large.reset();
        self.dead_letters.load().map_err(|source| SinkError::Io {
            sink: self.name.clone(),
            context: format!("reading {}", self.dead_letters.path().display()),
            source,
        })?;
        let Some(row) = row else {
            return Ok(0);
        };
        let (position, log_id): (i64, Option<i64>) = (row.get(0), row.get(1));
        if log_id.is_some_and(|id| id as u64 != self.log.id()) {
            // The data_dir was replaced: positions of the old log mean nothing in this one,
            // which starts with a snapshot that replaces the tables.
            tracing::warn!(
                sink = %self.name,
                "the target's checkpoint belongs to another offset log; applying this log from its start"
            );
            return Ok(0);
        }
        Ok(position as u64)
    }

    async fn apply(&mut self, entries: &[LogEntry]) -> Result<DeadLettered, SinkError> {
        self.apply_planned_ahead(entries, None).await
    }
}

impl PostgresSink {
    /// Applies a batch; `planned` is the batch as the pipeline planned it ahead, if it did.
    pub async fn apply_planned_ahead(
        &mut self,
        entries: &[LogEntry],
        planned: Option<PlannedBatch>,
    ) -> Result<DeadLettered, SinkError> {
        let mut rejected = Vec::new();
        let mut entries = entries;
        let is_commit = |e: &LogEntry| matches!(e.record, Record::Commit(_));
        if self.config.mode == SinkMode::Scd2
            && (self.large.is_open() || !entries.iter().any(is_commit))
        {
            // A chunk of a transaction larger than a batch (a batch that holds a Commit ends
            // with whole transactions).
            let end = entries.iter().position(is_commit);
            self.large
                .add(&self.log, &entries[..end.unwrap_or(entries.len())])?;
            let Some(end) = end else {
                return Ok(DeadLettered::new());
            };
            rejected = self.apply_large(&entries[end]).await?;
            entries = &entries[end + 1..];
        }
        if let Some(last) = entries.last() {
            let log = Arc::clone(&self.log);
            let ahead = planned.filter(|p| p.first == entries[0].seq && p.last == last.seq);
            let planned = match ahead {
                Some(planned) => self.prepare_tables(planned).await?,
                None => {
                    self.plan(entries, |id| Ok(log.relation(id)?), SnapshotText::Forward)
                        .await?
                }
            };
            rejected.extend(
                self.apply_planned(&planned.into_batch(last.seq, true), entries)
                    .await?,
            );
        }
        if !rejected.is_empty() {
            tracing::warn!(
                sink = %self.name,
                rows = rejected.len(),
                file = %self.dead_letters.path().display(),
                "rows dead-lettered"
            );
        }
        Ok(rejected
            .into_iter()
            .fold(DeadLettered::new(), |mut counts, table| {
                *counts.entry(table).or_default() += 1;
                counts
            }))
    }
}

impl PostgresSink {
    /// Applies a planned batch of `entries` and its checkpoint, handling what the target
    /// may answer: a dropped table is created again, rows it holds already are skipped, rows
    /// it refuses are dead-lettered. Stores the log cursor once the checkpoint is written.
    /// Returns the tables of the rows dead-lettered.
    async fn apply_planned(
        &mut self,
        batch: &Batch,
        entries: &[LogEntry],
    ) -> Result<Vec<String>, SinkError> {
        if !batch.only_snapshot_rows() {
            // The snapshot is over (or paused by other changes): its connections go.
            self.extra_writers.clear();
        } else if self.extra_writers.len() + 1 < self.snapshot_writers {
            while self.extra_writers.len() + 1 < self.snapshot_writers {
                let client = self.connect().await?;
                self.extra_writers.push(client);
            }
            tracing::info!(
                sink = %self.name,
                connections = self.snapshot_writers,
                "copying snapshot rows over several target connections"
            );
        }
        let mut result = self.apply_batch(batch, Pass::Fresh).await;
        if matches!(&result, Err(e) if e.is_missing_target()) {
            // Someone dropped a target table or column: create it again and go on. Rows it
            // held before are gone from the mirror until the table is re-snapshotted.
            tracing::warn!(
                sink = %self.name,
                error = %result.as_ref().err().map(ToString::to_string).unwrap_or_default(),
                "a target table or column is missing; creating it again (rows it held before \
                 are not in it until the table is re-snapshotted)"
            );
            self.prepared.clear();
            for table in &batch.tables {
                self.prepare(table.relation_id, &table.relation).await?;
            }
            result = self.apply_batch(batch, Pass::Fresh).await;
        }
        // The passes after a fresh one stage every row: snapshot rows forwarded as COPY text
        // are decoded for them.
        let decoded;
        let staging_next =
            matches!(&result, Err(e) if e.is_unique_violation() || e.is_data_error());
        let batch = if staging_next && batch.forwards_snapshot_rows() {
            let log = Arc::clone(&self.log);
            decoded = self
                .plan(entries, |id| Ok(log.relation(id)?), SnapshotText::Decode)
                .await?
                .into_batch(batch.log_position, batch.checkpoint);
            &decoded
        } else {
            batch
        };
        if matches!(&result, Err(e) if e.is_unique_violation()) {
            // The target holds part of the batch already (its checkpoint was older than its
            // rows, or another sink writes the same tables): apply it again, skipping what
            // is there.
            tracing::info!(
                sink = %self.name,
                "the target holds part of the batch already; applying it as a replay"
            );
            result = self.apply_batch(batch, Pass::Replay).await;
        }
        let rejected = match result {
            Err(e) if e.is_data_error() => {
                tracing::warn!(
                    sink = %self.name,
                    error = %e,
                    "the target refused the batch; applying it row by row to dead-letter the refused rows"
                );
                self.apply_batch(batch, Pass::OneRow).await
            }
            result => result,
        }
        .map_err(|e| e.into_sink_error(&self.name))?;
        if batch.checkpoint {
            // The target's checkpoint is what resumes the sink; the log's cursor only lets
            // the log trim what the target holds, so it need not be durable at once.
            self.log.note_cursor(
                &self.name,
                &SinkCursor {
                    seq: batch.log_position,
                    state: Vec::new(),
                },
            )?;
        }
        Ok(rejected)
    }

    /// Applies the large transaction that `commit` ends, partition by partition; the last
    /// writes the checkpoint. Returns the tables of the rows dead-lettered.
    async fn apply_large(&mut self, commit: &LogEntry) -> Result<Vec<String>, SinkError> {
        let log = Arc::clone(&self.log);
        let mut partitions = self.large.finish(commit);
        let mut rejected = Vec::new();
        while let Some((entries, last)) = partitions.next(&log)? {
            let batch = self
                .plan(&entries, |id| Ok(log.relation(id)?), SnapshotText::Decode)
                .await?
                .into_batch(commit.seq, last);
            rejected.extend(self.apply_planned(&batch, &entries).await?);
        }
        Ok(rejected)
    }
}

/// A planned batch ready to apply.
struct Batch {
    schema: Vec<SchemaStep>,
    tables: Vec<TableWork>,
    log_position: u64,
    source_lsn: Position,
    /// Advance the checkpoint to `log_position` (not for dead letters applied again).
    checkpoint: bool,
}

impl Batch {
    /// Whether a table's fresh pass COPYs snapshot rows in as the source sent them (which
    /// the other passes' statements do not stage).
    fn forwards_snapshot_rows(&self) -> bool {
        self.tables
            .iter()
            .any(|t| matches!(&t.plan, Plan::Merge(plan) if !plan.copied().is_empty()))
    }

    /// Whether the batch is only snapshot rows forwarded as COPY text: new keys, nothing
    /// truncated, nothing staged.
    fn only_snapshot_rows(&self) -> bool {
        self.schema.is_empty()
            && self.tables.iter().all(|t| {
                matches!(&t.plan, Plan::Merge(plan)
                if !plan.truncate && plan.states().is_empty() && !plan.copied().is_empty())
            })
    }
}

/// One table's part of a batch: rows for a staging table and the statements that apply them.
struct TableWork {
    relation_id: RelationId,
    relation: Arc<Relation>,
    target: TargetTable,
    create_stage: String,
    copy_stage: String,
    truncate: Option<String>,
    /// A fresh pass's COPY of new rows straight into the target.
    direct_copy: Option<String>,
    /// The fresh pass's staged rows and direct rows, encoded while planning.
    fresh_rows: Bytes,
    fresh_direct_rows: Vec<Bytes>,
    /// The statements of each pass, in order.
    fresh: Vec<String>,
    replay: Vec<String>,
    one_row: Vec<String>,
    plan: Plan,
}

enum Plan {
    Merge(TablePlan),
    History(HistoryPlan, scd2::Layout),
}

impl TableWork {
    fn merge(target: TargetTable, stage: &str, plan: TablePlan, soft_delete: bool) -> TableWork {
        let sql = |pass| merge::statements(&target, &plan, stage, soft_delete, pass);
        let passes = [sql(Pass::Fresh), sql(Pass::Replay), sql(Pass::OneRow)];
        TableWork::new(target, passes, Plan::Merge(plan))
    }

    fn history(
        target: TargetTable,
        stage: &str,
        plan: HistoryPlan,
        layout: scd2::Layout,
    ) -> TableWork {
        let sql = |pass| scd2::statements(&target, &plan, stage, layout, pass);
        let passes = [sql(Pass::Fresh), sql(Pass::Replay), sql(Pass::OneRow)];
        TableWork::new(target, passes, Plan::History(plan, layout))
    }

    /// `passes`: the plan's SQL for a fresh pass, a replay and one row.
    fn new(target: TargetTable, passes: [PlanSql; 3], plan: Plan) -> TableWork {
        let (relation_id, relation) = match &plan {
            Plan::Merge(plan) => (plan.relation_id, Arc::clone(&plan.relation)),
            Plan::History(plan, _) => (plan.relation_id, Arc::clone(&plan.relation)),
        };
        let [fresh, replay, one_row] = passes;
        let fresh_rows = encode_staged(&plan, Pass::Fresh);
        let fresh_direct_rows = match (&fresh.direct_copy, &plan) {
            (None, _) => Vec::new(),
            (Some(_), Plan::Merge(plan)) => merge::new_rows(plan),
            (Some(_), Plan::History(plan, layout)) => {
                vec![Bytes::from(scd2::direct_rows(plan, *layout))]
            }
        };
        TableWork {
            relation_id,
            relation,
            target,
            create_stage: fresh.create_stage,
            copy_stage: fresh.copy_stage,
            truncate: fresh.truncate,
            direct_copy: fresh.direct_copy,
            fresh_rows,
            fresh_direct_rows,
            fresh: fresh.statements,
            replay: replay.statements,
            one_row: one_row.statements,
            plan,
        }
    }

    /// The rows the pass stages, in COPY text format.
    fn staged_rows_text(&self, pass: Pass) -> Bytes {
        match pass {
            Pass::Fresh => self.fresh_rows.clone(),
            _ => encode_staged(&self.plan, pass),
        }
    }

    /// Staged row `number` alone, in COPY text format.
    fn staged_row_text(&self, number: usize) -> Bytes {
        let mut out = Vec::new();
        match &self.plan {
            Plan::Merge(plan) => merge::stage_state(&mut out, plan, number),
            Plan::History(plan, _) => scd2::stage_event(&mut out, plan, number),
        }
        Bytes::from(out)
    }

    /// A fresh pass's COPY straight into the target, with its rows.
    fn direct(&self, pass: Pass) -> Option<(&str, &[Bytes])> {
        let sql = self
            .direct_copy
            .as_deref()
            .filter(|_| pass == Pass::Fresh)?;
        Some((sql, &self.fresh_direct_rows))
    }

    fn statements(&self, pass: Pass) -> &[String] {
        match pass {
            Pass::Fresh => &self.fresh,
            Pass::Replay => &self.replay,
            Pass::OneRow => &self.one_row,
        }
    }

    fn staged_rows(&self) -> usize {
        match &self.plan {
            Plan::Merge(plan) => plan.states().len(),
            Plan::History(plan, _) => plan.events.len(),
        }
    }

    /// Staged row `number`: what the dead-letter queue calls it, its row, and the key it
    /// moved from, if it did.
    fn staged(&self, number: usize) -> (&'static str, &Row, Option<&Row>) {
        match &self.plan {
            Plan::Merge(plan) => match &plan.states()[number] {
                KeyState::Upsert(row) => ("upsert", row, None),
                KeyState::Move { row, from } => ("upsert", row, Some(from)),
                KeyState::Delete(row) => ("delete", row, None),
            },
            Plan::History(plan, _) => {
                let event = &plan.events[number];
                let action = if event.kind.is_version() {
                    "version"
                } else {
                    "close"
                };
                (
                    action,
                    &event.row,
                    event.carry_from.as_ref().map(|c| &c.from),
                )
            }
        }
    }

    /// Staged row `number` as a change the planner turns into it again (`dlq retry`).
    fn letter_change(&self, number: usize) -> LetterChange {
        let (_, row, from) = self.staged(number);
        let (row, from) = (Some(row.clone()), from.cloned());
        let (op, before, after, commit) = match &self.plan {
            Plan::Merge(plan) => match &plan.states()[number] {
                KeyState::Upsert(_) | KeyState::Move { .. } => (Op::Update, from, row, None),
                KeyState::Delete(_) => (Op::Delete, row, None, None),
            },
            Plan::History(plan, _) => {
                let event = &plan.events[number];
                let (op, before, after) = match event.kind {
                    EventKind::Created => (Op::Insert, None, row),
                    EventKind::Read => (Op::Read, None, row),
                    EventKind::IncrementalRead => (Op::IncrementalRead, None, row),
                    EventKind::Updated => (Op::Update, from, row),
                    EventKind::Tombstone | EventKind::Closed => (Op::Delete, row, None),
                };
                (op, before, after, Some((event.lsn, event.at)))
            }
        };
        LetterChange {
            relation: (*self.relation).clone(),
            op,
            before,
            after,
            commit,
        }
    }

    /// The keys with dead letters this work touches (a truncate touches every one), as
    /// records for the queue at `log_position`.
    fn touches(&self, dead_letters: &DeadLetterQueue, log_position: u64) -> Vec<Touch> {
        let table = self.relation.qualified_name();
        let Some(lettered) = dead_letters.lettered_keys(&table) else {
            return Vec::new();
        };
        let touch = |key: String| Touch {
            table: table.clone(),
            key,
            log_position,
        };
        if self.truncate.is_some() {
            return lettered.iter().cloned().map(touch).collect();
        }
        let mut touched = Vec::new();
        for number in 0..self.staged_rows() {
            let (_, row, from) = self.staged(number);
            for row in std::iter::once(row).chain(from) {
                let key = dead_letter::key_text(&self.relation, row);
                if lettered.contains(&key) {
                    touched.push(touch(key));
                }
            }
        }
        if let Plan::Merge(plan) = &self.plan {
            for text in plan.copied() {
                // Rows the source sent were checked when the snapshot read them.
                let rows = parse_copy_rows(&self.relation, text).unwrap_or_default();
                for row in &rows {
                    let key = dead_letter::key_text(&self.relation, row);
                    if lettered.contains(&key) {
                        touched.push(touch(key));
                    }
                }
            }
        }
        touched
    }
}

/// The rows `pass` stages, in COPY text format.
fn encode_staged(plan: &Plan, pass: Pass) -> Bytes {
    Bytes::from(match plan {
        Plan::Merge(plan) => merge::stage_rows(plan, pass),
        Plan::History(plan, layout) => scd2::stage_rows(plan, *layout, pass),
    })
}

/// The staging table of the `occurrence`th plan of a relation description in a batch: a
/// table truncated inside the batch has a second plan, and staging tables are emptied only
/// at the commit. A description whose columns a later schema change renamed (`renamed_by`)
/// stages into a table of the new names.
fn stage_name(
    relation_id: RelationId,
    renamed_by: Option<RelationId>,
    occurrence: usize,
) -> String {
    match renamed_by {
        None => format!("_tidemark_stage_{}_{occurrence}", relation_id.0),
        Some(by) => format!("_tidemark_stage_{}_{}_{occurrence}", relation_id.0, by.0),
    }
}

impl PostgresSink {
    /// Applies the batch and its checkpoint in one target transaction. With `Pass::OneRow`,
    /// each row goes in its own savepoint and rows the target refuses are dead-lettered
    /// (durably, before the commit) instead of failing the batch; returns those rows' tables.
    async fn apply_batch(&mut self, batch: &Batch, pass: Pass) -> Result<Vec<String>, ApplyError> {
        if pass == Pass::Fresh && !self.extra_writers.is_empty() && batch.only_snapshot_rows() {
            let applied = self.apply_snapshot_rows(batch).await;
            if applied.is_err() {
                // A writer may be the one that failed; the next snapshot batch opens new ones.
                self.extra_writers.clear();
            }
            return applied.map(|()| Vec::new());
        }
        let client = self.client.as_mut().ok_or(ApplyError::NotConnected)?;
        let mut transaction = client
            .transaction()
            .await
            .map_err(ApplyError::at("starting a transaction"))?;
        let after_rows = self.planner.alter(&transaction, &batch.schema).await?;
        let mut letters = Vec::new();
        let mut refused_tables = Vec::new();
        for table in &batch.tables {
            let target = &table.target;
            let statements = table.statements(pass);
            let staging_context = || format!("staging changes for {target}");
            // A batch of new rows only (a snapshot, inserts) stages nothing: every statement
            // reads the stage, so without rows they are skipped with it. Row by row, each
            // row is staged in its own savepoint below: COPY reads every value into the
            // stage's column types, so one value a type cannot hold (a MySQL TIME of 838
            // hours in a `time`) would refuse the whole COPY, and with it every other row.
            let staged = (pass != Pass::OneRow).then(|| table.staged_rows_text(pass));
            let staging = staged
                .as_ref()
                .map_or(table.staged_rows() > 0, |staged| !staged.is_empty());
            if staging {
                transaction
                    .batch_execute(&table.create_stage)
                    .await
                    .map_err(ApplyError::with(staging_context()))?;
                if let Some(staged) = staged {
                    send_copy(transaction.copy_in(&table.copy_stage).await, &[staged])
                        .await
                        .map_err(ApplyError::with(staging_context()))?;
                }
            }
            if let Some(truncate) = &table.truncate {
                transaction
                    .batch_execute(truncate)
                    .await
                    .map_err(ApplyError::with(format!("truncating {target}")))?;
            }
            if let Some((copy, rows)) = table.direct(pass) {
                send_copy(transaction.copy_in(copy).await, rows)
                    .await
                    .map_err(ApplyError::with(format!(
                        "inserting new rows into {target}"
                    )))?;
            }
            if !staging {
                continue;
            }
            let context = || format!("applying changes to {target}");
            if pass != Pass::OneRow {
                for statement in statements {
                    transaction
                        .execute(statement.as_str(), &[])
                        .await
                        .map_err(ApplyError::with(context()))?;
                }
                continue;
            }
            for number in 0..table.staged_rows() {
                let savepoint = transaction
                    .savepoint(format!("row_{number}"))
                    .await
                    .map_err(ApplyError::with(context()))?;
                let row = table.staged_row_text(number);
                let staged = send_copy(savepoint.copy_in(&table.copy_stage).await, &[row]).await;
                let mut refused = match staged {
                    Ok(()) => None,
                    Err(e) if is_data_error(&e) => {
                        Some(format!("{}: {}", staging_context(), db_message(&e)))
                    }
                    Err(e) => return Err(ApplyError::with(staging_context())(e)),
                };
                let param = number as i32;
                let statements = if refused.is_none() { statements } else { &[] };
                for statement in statements {
                    if let Err(e) = savepoint.execute(statement.as_str(), &[&param]).await {
                        if !is_data_error(&e) {
                            return Err(ApplyError::with(context())(e));
                        }
                        refused = Some(format!("{}: {}", context(), db_message(&e)));
                        break;
                    }
                }
                match refused {
                    Some(reason) => {
                        savepoint
                            .rollback()
                            .await
                            .map_err(ApplyError::with(context()))?;
                        let (action, row, _) = table.staged(number);
                        refused_tables.push(table.relation.qualified_name());
                        letters.push(dead_letter::letter(
                            &self.name,
                            &table.relation,
                            action,
                            row,
                            batch.log_position,
                            reason,
                            table.letter_change(number),
                        ));
                    }
                    None => savepoint
                        .commit()
                        .await
                        .map_err(ApplyError::with(context()))?,
                }
            }
        }
        schema_statements(&transaction, &after_rows).await?;
        let end = BatchEnd {
            sink: &self.name,
            schema: &self.config.schema,
            log_id: self.log.id(),
        };
        end.commit(transaction, batch, &mut self.dead_letters, &letters)
            .await?;
        Ok(refused_tables)
    }

    /// Applies a batch of initial-snapshot rows only (new keys) over the sink's connection
    /// and its extra writers at once, each COPYing a share of every table's rows: the
    /// extra writers' COPYs commit on their own, then the sink's own transaction commits its
    /// share with the checkpoint. A crash between the two leaves rows in the target that
    /// the checkpoint does not cover, which the replay of the batch takes as they are.
    async fn apply_snapshot_rows(&mut self, batch: &Batch) -> Result<(), ApplyError> {
        let writers = 1 + self.extra_writers.len();
        let mut shares: Vec<Vec<(&str, &[Bytes])>> = vec![Vec::new(); writers];
        for table in &batch.tables {
            let Some((copy, rows)) = table.direct(Pass::Fresh) else {
                continue;
            };
            for (share, blocks) in shares
                .iter_mut()
                .zip(rows.chunks(rows.len().div_ceil(writers).max(1)))
            {
                share.push((copy, blocks));
            }
        }
        let context = |copy: &str| format!("copying snapshot rows ({copy})");
        let client = self.client.as_mut().ok_or(ApplyError::NotConnected)?;
        let transaction = client
            .transaction()
            .await
            .map_err(ApplyError::at("starting a transaction"))?;
        let own = async {
            for &(copy, blocks) in &shares[0] {
                let sink = transaction.copy_in(copy).await;
                send_copy(sink, blocks)
                    .await
                    .map_err(ApplyError::with(context(copy)))?;
            }
            Ok::<(), ApplyError>(())
        };
        let others =
            futures_util::future::try_join_all(self.extra_writers.iter().zip(&shares[1..]).map(
                |(writer, share)| async move {
                    for &(copy, blocks) in share {
                        send_copy(writer.copy_in(copy).await, blocks)
                            .await
                            .map_err(ApplyError::with(context(copy)))?;
                    }
                    Ok::<(), ApplyError>(())
                },
            ));
        let (own, others) = futures_util::future::join(own, others).await;
        own?;
        others?;
        let end = BatchEnd {
            sink: &self.name,
            schema: &self.config.schema,
            log_id: self.log.id(),
        };
        end.commit(transaction, batch, &mut self.dead_letters, &[])
            .await
    }
}

/// What ends every batch's target transaction.
struct BatchEnd<'a> {
    sink: &'a str,
    schema: &'a str,
    log_id: u64,
}

impl BatchEnd<'_> {
    /// Writes the checkpoint (when the batch moves it) and the batch's dead letters and
    /// touches of dead-lettered keys, then commits.
    async fn commit(
        &self,
        transaction: tokio_postgres::Transaction<'_>,
        batch: &Batch,
        dead_letters: &mut DeadLetterQueue,
        letters: &[dead_letter::DeadLetter<'_>],
    ) -> Result<(), ApplyError> {
        if batch.checkpoint {
            let checkpoint = format!(
                "INSERT INTO {}._tidemark_checkpoint \
                   (sink, log_position, source_lsn, updated_at, log_id) \
                 VALUES ($1, $2, $3::text::pg_lsn, now(), $4) ON CONFLICT (sink) DO UPDATE SET \
                 log_position = EXCLUDED.log_position, source_lsn = EXCLUDED.source_lsn, \
                 updated_at = now(), log_id = EXCLUDED.log_id",
                postgres_protocol::escape::escape_identifier(self.schema)
            );
            transaction
                .execute(
                    checkpoint.as_str(),
                    &[
                        &self.sink,
                        &(batch.log_position as i64),
                        &batch.source_lsn.to_string(),
                        &(self.log_id as i64),
                    ],
                )
                .await
                .map_err(ApplyError::at("writing the checkpoint"))?;
        }
        // Before the commit, like the letters: a touch lost in a crash after it would let
        // `dlq retry` put an older state back.
        let touches: Vec<Touch> = batch
            .tables
            .iter()
            .flat_map(|table| table.touches(dead_letters, batch.log_position))
            .collect();
        dead_letters
            .record_touches(&touches)
            .map_err(ApplyError::DeadLetters)?;
        dead_letters
            .append(letters)
            .map_err(ApplyError::DeadLetters)?;
        transaction
            .commit()
            .await
            .map_err(ApplyError::at("committing the batch"))
    }
}

async fn schema_statements(
    transaction: &tokio_postgres::Transaction<'_>,
    statements: &[String],
) -> Result<(), ApplyError> {
    for statement in statements {
        transaction
            .batch_execute(statement)
            .await
            .map_err(ApplyError::with(format!(
                "applying a schema change: {statement}"
            )))?;
    }
    Ok(())
}

/// Sends `rows` (blocks of whole lines in COPY text format) into a started `COPY … FROM
/// STDIN` and ends it.
async fn send_copy(
    sink: Result<tokio_postgres::CopyInSink<Bytes>, tokio_postgres::Error>,
    rows: &[Bytes],
) -> Result<(), tokio_postgres::Error> {
    let mut sink = pin!(sink?);
    for block in rows {
        sink.feed(block.clone()).await?;
    }
    sink.as_mut().finish().await?;
    Ok(())
}

/// Why applying a batch failed, before it is classified for the pipeline.
#[derive(Debug, thiserror::Error)]
enum ApplyError {
    #[error("not connected to the target")]
    NotConnected,
    #[error("{context}: {}", db_message(.source))]
    Target {
        context: String,
        source: tokio_postgres::Error,
    },
    #[error("writing dead letters: {0}")]
    DeadLetters(std::io::Error),
    #[error(transparent)]
    Narrowing(Box<schema::Narrowing>),
}

impl ApplyError {
    fn with(context: String) -> impl FnOnce(tokio_postgres::Error) -> ApplyError {
        move |source| ApplyError::Target { context, source }
    }

    fn at(context: &'static str) -> impl FnOnce(tokio_postgres::Error) -> ApplyError {
        ApplyError::with(context.to_string())
    }

    /// A target table or column the sink created is gone (undefined_table, undefined_column).
    fn is_missing_target(&self) -> bool {
        matches!(self, ApplyError::Target { source, .. }
            if source.code().is_some_and(|c| matches!(c.code(), "42P01" | "42703")))
    }

    /// A unique index refused a row (SQLSTATE 23505).
    fn is_unique_violation(&self) -> bool {
        matches!(self, ApplyError::Target { source, .. }
            if source.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION))
    }

    /// The target refused a value (class 22 data exception, class 23 constraint violation):
    /// retrying will not help, isolating the row will.
    fn is_data_error(&self) -> bool {
        matches!(self, ApplyError::Target { source, .. } if is_data_error(source))
    }

    fn into_sink_error(self, sink: &str) -> SinkError {
        match self {
            ApplyError::NotConnected => SinkError::Transient {
                sink: sink.to_string(),
                message: "not connected".into(),
            },
            ApplyError::Target { context, source } => target_error(sink, context, source),
            ApplyError::DeadLetters(source) => SinkError::Io {
                sink: sink.to_string(),
                context: "writing dead letters".into(),
                source,
            },
            ApplyError::Narrowing(narrowing) => SinkError::Blocked {
                sink: sink.to_string(),
                message: narrowing.to_string(),
            },
        }
    }
}

fn is_data_error(e: &tokio_postgres::Error) -> bool {
    e.code()
        .is_some_and(|c| c.code().starts_with("22") || c.code().starts_with("23"))
}

/// Classifies a target error: connection trouble and serialization failures are transient.
fn target_error(sink: &str, context: String, e: tokio_postgres::Error) -> SinkError {
    let message = format!("{context}: {}", db_message(&e));
    let transient = e.is_closed() || e.code().is_none_or(is_transient);
    if transient {
        SinkError::Transient {
            sink: sink.to_string(),
            message,
        }
    } else {
        SinkError::Target {
            sink: sink.to_string(),
            message,
        }
    }
}
