//! PostgreSQL source: logical replication with pgoutput into the offset log.
//!
//! The slot is confirmed only up to what the log has made durable (DESIGN invariant 1):
//! standby status updates carry the log's durable end LSN, never the received position.
//! Transactions the server re-sends below the last logged commit are recognised by their
//! commit LSN and skipped.
//!
//! On PostgreSQL 14 and newer the server streams a transaction that outgrows its
//! `logical_decoding_work_mem` before it commits (pgoutput protocol version 2): the log holds
//! those changes apart and appends them at the Stream Commit, so neither side keeps a large
//! transaction in memory.

pub mod catalog;
pub mod check;
pub mod ddl;
pub mod incremental;
pub mod pgoutput;
pub mod replication;
pub mod snapshot;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::error::SqlState;
use tokio_util::sync::CancellationToken;

use self::catalog::{Catalog, SourceTable};
use self::pgoutput::{LogicalMessage, OldTuple, TupleValue};
use self::replication::{
    ReplicationConnection, ReplicationError, ReplicationMessage, PG_EPOCH_OFFSET_MICROS,
};
use crate::config::{ConnectionUrl, PostgresSourceConfig, SnapshotMode};
use crate::connectors::backpressure::{self, Backpressure};
use crate::envelope::SourceInfo;
use crate::event::{
    ChangeEvent, ColumnChange, ExistingRows, Op, Position, Record, Relation, RelationId, Row,
    SchemaChange, TxBegin, TxCommit, TxOrigin, Value,
};
use crate::log::{InspectChange, LogError, LogWriter, OffsetLog, SnapshotState, TableSnapshots};
use crate::pgclient::db_message;
use crate::pgtext::copy_rows::parse_column;
use crate::retry::{is_transient, RetryPolicy};
use crate::telemetry::Telemetry;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot connect to the source at {url}: {message}")]
    Connect {
        url: String,
        message: String,
        code: Option<SqlState>,
    },
    #[error("source catalog, {context}: {message}")]
    Catalog {
        context: &'static str,
        message: String,
        code: Option<SqlState>,
    },
    #[error("replication connection: {0}")]
    Replication(#[from] ReplicationError),
    /// The server or the configuration is not ready for capture; the message says the fix.
    #[error("{0}")]
    Prerequisite(String),
    #[error("malformed pgoutput data at {lsn}: {source}")]
    Decode {
        lsn: Position,
        source: pgoutput::DecodeError,
    },
    /// Continuing could silently skip changes; the message says how to recover.
    #[error("{0}")]
    Diverged(String),
    #[error("initial snapshot: {0}")]
    Snapshot(String),
    /// A schema change the source cannot read.
    #[error("schema change: {0}")]
    SchemaChange(String),
    #[error(transparent)]
    Log(#[from] LogError),
}

impl SourceError {
    pub fn connect(url: &ConnectionUrl, e: tokio_postgres::Error) -> SourceError {
        let code = e.code().cloned();
        let hint = match code.as_ref().map(SqlState::code) {
            Some("28P01") => "; check the user and password in source.url",
            Some("28000") => "; the server refuses this user (pg_hba.conf or role attributes)",
            Some("3D000") => "; check the database name in source.url",
            _ if code.is_none() => {
                "; check the host and port in source.url and that PostgreSQL is running"
            }
            _ => "",
        };
        SourceError::Connect {
            url: url.redacted(),
            message: format!("{}{hint}", connect_message(&e)),
            code,
        }
    }

    pub fn catalog(context: &'static str, e: tokio_postgres::Error) -> SourceError {
        SourceError::Catalog {
            context,
            message: db_message(&e),
            code: e.code().cloned(),
        }
    }

    /// Whether waiting and reconnecting may cure it.
    pub fn is_transient(&self) -> bool {
        match self {
            SourceError::Connect { code, .. } | SourceError::Catalog { code, .. } => {
                code.as_ref().is_none_or(is_transient)
            }
            SourceError::Replication(e) => match e {
                ReplicationError::Connect { .. } | ReplicationError::Io(_) => true,
                ReplicationError::Server { code, .. } => is_transient(code),
                ReplicationError::Protocol(_) | ReplicationError::Unsupported(_) => false,
            },
            SourceError::Decode { .. } => true,
            SourceError::Prerequisite(_)
            | SourceError::Diverged(_)
            | SourceError::Snapshot(_)
            | SourceError::SchemaChange(_)
            | SourceError::Log(_) => false,
        }
    }

    /// Whether the error is the operator's setup rather than a runtime failure.
    pub fn is_prerequisite(&self) -> bool {
        match self {
            SourceError::Prerequisite(_) => true,
            SourceError::Connect { code, .. } => code.is_some() && !self.is_transient(),
            SourceError::Replication(ReplicationError::Server { code, .. }) => !is_transient(code),
            _ => false,
        }
    }
}

/// tokio-postgres wraps I/O failures; the innermost cause is what the operator needs.
fn connect_message(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return db.message().to_string();
    }
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        message = inner.to_string();
        source = inner.source();
    }
    message
}

/// What an offset log was captured from, kept in the log, so that a restart can tell it
/// still follows the same server, database and slot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct SourceIdentity {
    system_id: String,
    database: String,
    slot: String,
}

/// Captures the configured tables of one PostgreSQL database.
pub struct PostgresSource {
    config: PostgresSourceConfig,
    /// A table sink is configured: every table needs a primary key.
    require_primary_keys: bool,
    telemetry: Arc<Telemetry>,
    /// Backpressure: reading WAL pauses while the log holds more than this.
    log_max_bytes: u64,
}

/// Changes of a committed streamed transaction appended between two status updates (well
/// under a second).
const STREAMED_PART_CHANGES: usize = 50_000;

/// Where the stream stands while a session runs.
struct Session {
    catalog: Catalog,
    /// The oids of the captured tables: schema changes of other tables are not followed.
    captured_tables: HashSet<u32>,
    /// The schema-change trigger is installed: its messages say each change, and a Relation
    /// message is compared only with the description this session saw last (after a
    /// restart the log's last description may be ahead of the stream, from a transaction the
    /// crash cut short).
    ddl_messages: bool,
    relations: HashMap<u32, (RelationId, Arc<Relation>)>,
    /// The transaction being received; `None` between transactions.
    open: Option<OpenTransaction>,
    /// The transaction whose streamed block is being received (Stream Start to Stream Stop).
    streaming: Option<u32>,
    /// Streamed transactions whose commit or abort has not come, by transaction id.
    streamed: HashMap<u32, StreamedTransaction>,
    /// The last position reported to the server.
    confirmed: Position,
    /// The furthest WAL position of the data received (messages the server writes ahead of
    /// the change they belong to, such as Relation, carry none).
    received: Position,
    /// Changes of the open transaction per relation oid, counted as captured at its Commit.
    captured: HashMap<u32, u64>,
    /// When the slot's retained WAL was last warned about.
    retention_warned: Option<Instant>,
    telemetry: Arc<Telemetry>,
    /// The incremental snapshot of tables added after the initial one, while under way.
    incremental: Option<incremental::Merge>,
}

/// What a streamed transaction needs at its commit besides the changes the log holds.
#[derive(Default)]
struct StreamedTransaction {
    /// Changes per (subtransaction, relation oid), counted as captured at the commit.
    captured: HashMap<(u32, u32), u64>,
    aborted_subtransactions: HashSet<u32>,
    /// Incremental snapshot watermarks it carries, handled at its commit like any other's.
    watermarks: Vec<(Position, bytes::Bytes)>,
}

#[derive(Clone, Copy)]
enum OpenTransaction {
    Logging,
    /// Already in the log (the server re-sent it after a restart).
    Skipping,
}

impl PostgresSource {
    pub fn new(
        config: PostgresSourceConfig,
        require_primary_keys: bool,
        telemetry: Arc<Telemetry>,
        log_max_bytes: u64,
    ) -> PostgresSource {
        PostgresSource {
            config,
            require_primary_keys,
            telemetry,
            log_max_bytes,
        }
    }

    /// The envelopes' `source` block: connector `postgresql`, the database of `url`.
    pub fn info(&self, name: &str) -> SourceInfo {
        SourceInfo {
            connector: "postgresql",
            name: name.to_string(),
            database: self
                .config
                .url
                .pg_config()
                .get_dbname()
                .unwrap_or_default()
                .to_string(),
        }
    }

    pub fn snapshot_parallelism(&self) -> usize {
        self.config.snapshot_parallelism
    }

    /// Streams into the log until `cancel` fires. Transient failures reconnect with backoff;
    /// before the first successful start they are retried for `connect_timeout` only, so a
    /// misconfigured agent stops instead of retrying forever.
    pub async fn run(
        &self,
        writer: &mut LogWriter,
        cancel: CancellationToken,
    ) -> Result<(), SourceError> {
        let mut policy = RetryPolicy::new();
        let started = Instant::now();
        let mut streamed = false;
        loop {
            let result = self
                .stream(writer, &cancel, &mut streamed, &mut policy)
                .await;
            match result {
                Ok(()) => return Ok(()),
                Err(e)
                    if e.is_transient()
                        && (streamed || started.elapsed() < self.config.connect_timeout) =>
                {
                    let delay = policy.next_delay();
                    self.telemetry.reconnected(&e.to_string());
                    tracing::warn!(error = %e, retry_in = ?delay, "source interrupted; reconnecting");
                    tokio::select! {
                        _ = cancel.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn stream(
        &self,
        writer: &mut LogWriter,
        cancel: &CancellationToken,
        streamed: &mut bool,
        policy: &mut RetryPolicy,
    ) -> Result<(), SourceError> {
        let mut catalog = Catalog::connect(&self.config.url).await?;
        check_prerequisites(&catalog).await?;
        let tables = catalog.resolve_tables(&self.config.tables).await?;
        if tables.is_empty() {
            return Err(SourceError::Prerequisite(format!(
                "source.tables ({}) matches no table; create the tables or fix the patterns",
                self.config
                    .tables
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        catalog.check_replica_identity(&tables).await?;
        if self.require_primary_keys {
            catalog.check_primary_keys(&tables).await?;
        }
        catalog
            .ensure_publication(&self.config.publication, &tables)
            .await?;
        let streaming = catalog.server_version_num().await? >= 140_000;
        // Before a snapshot starts: a change made while it runs is compared with the columns
        // the tables had when it began.
        let (captured_tables, ddl_messages) = self
            .follow_schema_changes(&catalog, writer.log(), &tables, streaming)
            .await?;

        let mut connection = ReplicationConnection::connect(&self.config.url.pg_config()).await?;
        let system = connection.identify_system().await?;
        let database = system.database.clone().unwrap_or_default();
        self.check_identity(writer, &system.system_id, &database)
            .await?;
        // Transactions the last connection was receiving come again from their start.
        writer.discard_uncommitted()?;
        let snapshot = self.config.snapshot == SnapshotMode::Initial;
        let logged_nothing = writer.last_appended().seq == 0;
        // A snapshot cut short cannot resume (its exported snapshot is gone), and one the log
        // does not hold (data_dir moved aside) must be taken again: both start over.
        let snapshot_again = snapshot
            && (writer.log().snapshot_state()? == Some(SnapshotState::Running) || logged_nothing);
        let mut slot = catalog.slot(&self.config.slot).await?;
        // The sinks may hold rows of an earlier snapshot, or of an earlier log: the new
        // snapshot replaces them.
        let replace =
            snapshot_again && (slot.is_some() || writer.log().snapshot_state()?.is_some());
        if slot.is_some() && snapshot_again {
            tracing::warn!(
                slot = %self.config.slot,
                "the offset log holds no complete snapshot; dropping the slot to snapshot again"
            );
            catalog.drop_slot(&self.config.slot).await?;
            slot = None;
        }
        match slot {
            Some(slot) => {
                self.check_slot(&slot, &database)?;
                self.check_log_reaches_slot(&slot, writer)?;
            }
            None if !logged_nothing && !snapshot_again => {
                return Err(SourceError::Diverged(format!(
                    "replication slot {:?} no longer exists (failover, or dropped by hand), but \
                     the offset log continues from {}: changes made since may have been missed. \
                     Recover by re-snapshotting: stop the agent, move agent.data_dir aside, and \
                     start again with snapshot = \"initial\" (this re-creates the slot)",
                    self.config.slot,
                    writer.last_appended().end_position
                )))
            }
            None if snapshot => {
                // Every transaction the stream will carry commits after this: the snapshot's
                // time must not be later than theirs.
                let taken_at = catalog.now_micros().await?;
                let (lsn, exported) = connection.create_slot_exporting(&self.config.slot).await?;
                tracing::info!(slot = %self.config.slot, %lsn, "replication slot created");
                // The replication connection stays idle meanwhile: its next command would end
                // the exported snapshot the readers import.
                let copied = snapshot::copy(
                    self,
                    &mut catalog,
                    &tables,
                    snapshot::Exported {
                        name: &exported,
                        consistent_point: lsn,
                        taken_at,
                        replaces_earlier: replace,
                    },
                    writer,
                    cancel,
                )
                .await?;
                if copied.is_none() {
                    return Ok(());
                }
            }
            None => {
                let lsn = connection.create_slot(&self.config.slot).await?;
                writer.log().set_confirmed_without_commit(lsn).await?;
                tracing::info!(slot = %self.config.slot, %lsn, "replication slot created");
            }
        }
        let added = self.tables_to_snapshot(writer, &tables, &catalog).await?;
        let log_position = writer.last_appended();
        connection
            .start_replication(
                &self.config.slot,
                &self.config.publication,
                log_position.end_position,
                replication::StreamOptions {
                    streaming,
                    // Schema-change messages, and the incremental snapshot's watermarks.
                    messages: streaming,
                },
            )
            .await?;
        tracing::info!(
            slot = %self.config.slot,
            publication = %self.config.publication,
            from = %log_position.end_position,
            tables = tables.len(),
            "streaming changes"
        );
        *streamed = true;
        policy.reset();
        self.telemetry.source_connected();
        let mut session = Session {
            catalog,
            captured_tables,
            ddl_messages,
            relations: HashMap::new(),
            open: None,
            streaming: None,
            streamed: HashMap::new(),
            confirmed: Position(0),
            received: Position(0),
            captured: HashMap::new(),
            retention_warned: None,
            telemetry: Arc::clone(&self.telemetry),
            incremental: None,
        };
        let mut reader = None;
        if let Some((pending, resume_after)) = added {
            let (merge, sender) = incremental::Merge::new(&pending, &self.config.slot);
            tracing::info!(
                tables = %merge.tables.join(", "),
                "incremental snapshot of tables added since the initial one started"
            );
            let catalog = Catalog::connect(&self.config.url).await?;
            reader = Some(AbortOnDrop(tokio::spawn(incremental::read_tables(
                catalog,
                pending,
                resume_after,
                self.config.slot.clone(),
                merge.run,
                sender,
            ))));
            session.incremental = Some(merge);
        }
        let result = self
            .stream_messages(
                &mut connection,
                &mut session,
                writer,
                cancel,
                reader.as_mut(),
            )
            .await;
        if result.is_ok() {
            // Shutdown: make everything received durable and say so before leaving.
            let durable = writer.log().flush().await?;
            connection.send_status(durable.end_position).await?;
            connection.close().await?;
        }
        result
    }

    async fn stream_messages(
        &self,
        connection: &mut ReplicationConnection,
        session: &mut Session,
        writer: &mut LogWriter,
        cancel: &CancellationToken,
        mut reader: Option<&mut AbortOnDrop>,
    ) -> Result<(), SourceError> {
        let mut durable = writer.log().subscribe_durable();
        let mut status_timer = tokio::time::interval(self.config.status_interval);
        let heartbeat = !self.config.heartbeat_interval.is_zero();
        let mut backpressure = Backpressure::new(self.log_max_bytes);
        let mut pressure_timer = tokio::time::interval(backpressure::CHECK_INTERVAL);
        let mut heartbeat_timer =
            tokio::time::interval(self.config.heartbeat_interval.max(Duration::from_millis(1)));
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return Ok(()),
                changed = durable.changed() => {
                    if changed.is_ok() {
                        let end = durable.borrow_and_update().end_position;
                        session.confirm(connection, end).await?;
                    }
                }
                _ = status_timer.tick() => {
                    let end = writer.log().durable().end_position.max(session.confirmed);
                    connection.send_status(end).await?;
                    session.report(writer, &self.config).await;
                }
                _ = heartbeat_timer.tick(), if heartbeat => {
                    if let Err(e) = session.catalog.client().batch_execute(&self.config.heartbeat_query).await {
                        tracing::warn!(error = %db_message(&e), query = %self.config.heartbeat_query, "heartbeat failed; fix source.heartbeat_query or set heartbeat_interval = \"0s\"");
                    }
                }
                _ = pressure_timer.tick() => backpressure.update(writer.log(), &self.telemetry)?,
                read = async {
                    match reader.as_mut() {
                        Some(reader) => (&mut reader.0).await,
                        None => std::future::pending().await,
                    }
                }, if reader.is_some() => {
                    // The reader has sent every chunk (or failed); the stream logs the rest.
                    reader = None;
                    match read {
                        Ok(result) => result?,
                        Err(e) => return Err(SourceError::Snapshot(format!("the incremental snapshot reader failed: {e}"))),
                    }
                }
                message = connection.next_message(), if !backpressure.paused => match message? {
                    ReplicationMessage::XLogData { wal_start, data, .. } => {
                        session.received = session.received.max(wal_start);
                        let message = pgoutput::decode(&data, session.streaming.is_some())
                            .map_err(|source| SourceError::Decode { lsn: wal_start, source })?;
                        session.handle(connection, writer, wal_start, message).await?;
                    }
                    ReplicationMessage::PrimaryKeepalive { wal_end, reply_requested } => {
                        // Idle and everything received is durable: the server may forget
                        // WAL up to what it has sent, or an idle slot pins WAL forever.
                        let log = writer.log();
                        let caught_up = session.open.is_none()
                            && session.streamed.is_empty()
                            && writer.last_appended().seq == log.durable().seq;
                        let end = if caught_up {
                            wal_end.max(log.durable().end_position)
                        } else {
                            log.durable().end_position
                        };
                        if reply_requested || end > session.confirmed {
                            if end > log.durable().end_position {
                                log.set_confirmed_without_commit(end).await?;
                            }
                            connection.send_status(end.max(session.confirmed)).await?;
                            session.confirmed = end.max(session.confirmed);
                        }
                    }
                }
            }
        }
    }

    async fn check_identity(
        &self,
        writer: &LogWriter,
        system_id: &str,
        database: &str,
    ) -> Result<(), SourceError> {
        let current = SourceIdentity {
            system_id: system_id.to_string(),
            database: database.to_string(),
            slot: self.config.slot.clone(),
        };
        let logged = writer
            .log()
            .source_identity()?
            .map(|bytes| {
                postcard::from_bytes::<SourceIdentity>(&bytes).map_err(|e| {
                    SourceError::Diverged(format!(
                        "the offset log names its source in a form this release cannot read \
                         ({e}); use the release that wrote it, or move agent.data_dir aside \
                         and re-snapshot"
                    ))
                })
            })
            .transpose()?;
        match logged {
            None => {
                // Serialising plain data into a Vec cannot fail.
                let encoded = postcard::to_allocvec(&current).unwrap_or_default();
                writer.log().set_source_identity(&encoded).await?
            }
            Some(logged) if logged == current => {}
            Some(logged) => {
                return Err(SourceError::Diverged(format!(
                    "the offset log was captured from system {} database {:?} slot {:?}, but \
                     the source is system {} database {:?} slot {:?} (a restored or promoted \
                     server, or a changed config): resuming could skip or repeat changes. \
                     Recover by re-snapshotting: stop the agent, move agent.data_dir aside and \
                     start again",
                    logged.system_id,
                    logged.database,
                    logged.slot,
                    current.system_id,
                    current.database,
                    current.slot
                )))
            }
        }
        Ok(())
    }

    /// Installs the schema-change trigger when the role may and the server sends its
    /// messages (PostgreSQL 14 and newer), and keeps each captured table's columns where the
    /// log has none yet: what its first schema change is compared with. Returns the captured
    /// tables' oids, and whether the trigger's messages will say each schema change.
    async fn follow_schema_changes(
        &self,
        catalog: &Catalog,
        log: &OffsetLog,
        tables: &[SourceTable],
        messages: bool,
    ) -> Result<(HashSet<u32>, bool), SourceError> {
        let trigger = messages && catalog.install_ddl_trigger().await?;
        if !messages {
            tracing::warn!(
                "schema changes are inferred from the stream's table descriptions: PostgreSQL \
                 13 and older send no logical decoding messages (see the README, Schema changes)"
            );
        } else if !trigger {
            tracing::warn!(
                trigger = ddl::TRIGGER_NAME,
                "the source role may not create the schema-change event trigger (it needs a \
                 superuser): schema changes are inferred from the stream's table descriptions, \
                 so a renamed column is followed as a drop and an add, and new columns' values \
                 for existing rows are read when the table next changes. Have a superuser run \
                 `tidemark check` once to install it (see the README, Schema changes)"
            );
        }
        let mut captured = HashSet::new();
        for table in tables {
            let Some(shape) = catalog.table_shape_of(table).await? else {
                continue;
            };
            captured.insert(shape.oid);
            if log
                .table_shape_before(shape.oid, Position(u64::MAX))?
                .is_none()
            {
                log.set_table_shape(shape.oid, Position(0), &encode_shape(&shape))?;
            }
        }
        Ok((captured, trigger))
    }

    /// The tables added to `source.tables` since the initial snapshot, for an incremental
    /// snapshot: the one under way first, with the key it stopped after. None when there are
    /// none (or no initial snapshot to add to).
    async fn tables_to_snapshot(
        &self,
        writer: &LogWriter,
        tables: &[SourceTable],
        catalog: &Catalog,
    ) -> Result<Option<(Vec<SourceTable>, Option<Vec<String>>)>, SourceError> {
        let log = writer.log();
        if self.config.snapshot != SnapshotMode::Initial
            || log.snapshot_state()? != Some(SnapshotState::Done)
        {
            return Ok(None);
        }
        let snapshots = match log.table_snapshots()? {
            Some(snapshots) => snapshots,
            None => {
                // A log from before tidemark kept this: its snapshot had the tables of then.
                let snapshots = TableSnapshots {
                    done: tables.iter().map(SourceTable::to_string).collect(),
                    in_progress: None,
                };
                log.set_table_snapshots(&snapshots)?;
                snapshots
            }
        };
        let mut pending: Vec<SourceTable> = tables
            .iter()
            .filter(|t| !snapshots.done.contains(&t.to_string()))
            .cloned()
            .collect();
        if pending.is_empty() {
            return Ok(None);
        }
        if catalog.server_version_num().await? < 140_000 {
            tracing::warn!(
                tables = %pending.iter().map(SourceTable::to_string).collect::<Vec<_>>().join(", "),
                "these tables were added after the initial snapshot, and snapshotting them \
                 alongside the stream needs PostgreSQL 14 or newer: only their changes from now \
                 on are captured (move agent.data_dir aside to snapshot every table again)"
            );
            return Ok(None);
        }
        let mut resume_after = None;
        if let Some((table, after)) = &snapshots.in_progress {
            if let Some(i) = pending.iter().position(|t| t.to_string() == *table) {
                let under_way = pending.remove(i);
                pending.insert(0, under_way);
                resume_after = after.clone();
            }
        }
        Ok(Some((pending, resume_after)))
    }

    /// The slot is never confirmed past what the log holds, so a slot that is shows the log
    /// lost records it once held (restored from an older copy, damaged on disk): streaming
    /// from the slot would skip the transactions in between.
    fn check_log_reaches_slot(
        &self,
        slot: &catalog::SlotInfo,
        writer: &LogWriter,
    ) -> Result<(), SourceError> {
        let logged = writer
            .last_appended()
            .end_position
            .max(writer.log().confirmed_without_commit()?);
        match slot.confirmed_flush {
            Some(confirmed) if confirmed > logged => Err(SourceError::Diverged(format!(
                "replication slot {:?} was confirmed up to {confirmed}, but the offset log in \
                 agent.data_dir reaches only {logged}: the log lost transactions it once held \
                 (restored from an older copy, or damaged), and streaming on would skip them. \
                 Recover by re-snapshotting: stop the agent, move agent.data_dir aside (keep it \
                 for inspection) and start again with snapshot = \"initial\" (the slot is \
                 dropped and created again); or, to stream only what commits from now on, \
                 drop the slot: SELECT pg_drop_replication_slot('{}')",
                self.config.slot, self.config.slot
            ))),
            _ => Ok(()),
        }
    }

    fn check_slot(&self, slot: &catalog::SlotInfo, database: &str) -> Result<(), SourceError> {
        if slot.plugin.as_deref() != Some("pgoutput") || slot.database.as_deref() != Some(database)
        {
            return Err(SourceError::Prerequisite(format!(
                "replication slot {:?} exists but is not a pgoutput slot of database {database:?} \
                 (plugin {:?}, database {:?}); choose another source.slot or drop it: \
                 SELECT pg_drop_replication_slot('{}')",
                self.config.slot,
                slot.plugin.as_deref().unwrap_or("none"),
                slot.database.as_deref().unwrap_or("none"),
                self.config.slot
            )));
        }
        Ok(())
    }
}

/// Checks the server settings and role attributes capture needs; each failure names its fix.
pub async fn check_prerequisites(catalog: &Catalog) -> Result<(), SourceError> {
    let wal_level = catalog.wal_level().await?;
    if wal_level != "logical" {
        return Err(SourceError::Prerequisite(format!(
            "the source has wal_level = {wal_level}, logical decoding needs wal_level = logical: \
             run ALTER SYSTEM SET wal_level = logical; and restart PostgreSQL"
        )));
    }
    let (user, can_replicate) = catalog.can_replicate().await?;
    if !can_replicate {
        return Err(SourceError::Prerequisite(format!(
            "role {user:?} lacks the REPLICATION attribute needed for a replication connection: \
             run ALTER ROLE \"{user}\" REPLICATION; (on RDS: GRANT rds_replication TO \"{user}\";)"
        )));
    }
    Ok(())
}

impl Session {
    /// Tells the telemetry where the stream stands and how much WAL the slot keeps, and
    /// warns (at most once a minute) while that is more than `slot_max_retained_bytes`.
    async fn report(&mut self, writer: &LogWriter, config: &PostgresSourceConfig) {
        self.telemetry.source_positions(
            self.received,
            writer.log().durable().end_position,
            self.confirmed,
        );
        match self.catalog.slot_retained_bytes(&config.slot).await {
            Ok(Some(bytes)) => {
                self.telemetry.slot_retained(bytes);
                let over = u64::try_from(bytes).unwrap_or(0) > config.slot_max_retained_bytes;
                let due = self
                    .retention_warned
                    .is_none_or(|at| at.elapsed() >= Duration::from_secs(60));
                if over && due {
                    self.retention_warned = Some(Instant::now());
                    tracing::warn!(
                        slot = %config.slot,
                        retained_bytes = bytes,
                        limit = config.slot_max_retained_bytes,
                        "the replication slot keeps more WAL than source.slot_max_retained_bytes: \
                         a sink may be stuck or the agent behind; the source's disk fills until it \
                         catches up"
                    );
                }
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(error = %e, "reading the slot's retained WAL"),
        }
    }

    async fn confirm(
        &mut self,
        connection: &mut ReplicationConnection,
        durable_end: Position,
    ) -> Result<(), SourceError> {
        if durable_end > self.confirmed {
            connection.send_status(durable_end).await?;
            self.confirmed = durable_end;
        }
        Ok(())
    }

    async fn handle(
        &mut self,
        connection: &mut ReplicationConnection,
        writer: &mut LogWriter,
        lsn: Position,
        message: LogicalMessage,
    ) -> Result<(), SourceError> {
        match message {
            LogicalMessage::Begin {
                final_lsn,
                commit_ts,
                xid,
            } => self.begin(writer, xid, Position(final_lsn), commit_ts)?,
            LogicalMessage::Commit {
                commit_lsn,
                end_lsn,
                commit_ts,
                ..
            } => self.commit(writer, commit_lsn, end_lsn, commit_ts)?,
            LogicalMessage::StreamStart { xid, .. } => {
                if self.open.is_some() || self.streaming.is_some() {
                    return Err(protocol_error(format!(
                        "Stream Start of transaction {xid} at {lsn} inside another transaction"
                    )));
                }
                self.streaming = Some(xid);
                self.streamed.entry(xid).or_default();
            }
            LogicalMessage::StreamStop => self.streaming = None,
            LogicalMessage::StreamAbort { xid, subxid } => {
                if xid == subxid {
                    self.streamed.remove(&xid);
                    writer.discard_streamed(xid)?;
                } else if let Some(streamed) = self.streamed.get_mut(&xid) {
                    streamed.aborted_subtransactions.insert(subxid);
                }
            }
            LogicalMessage::StreamCommit {
                xid,
                commit_lsn,
                end_lsn,
                commit_ts,
                ..
            } => {
                let streamed = self.streamed.remove(&xid).unwrap_or_default();
                self.begin(writer, xid, Position(commit_lsn), commit_ts)?;
                if let Some(OpenTransaction::Logging) = self.open {
                    self.append_streamed(connection, writer, xid, streamed)
                        .await?;
                }
                writer.discard_streamed(xid)?;
                self.commit(writer, commit_lsn, end_lsn, commit_ts)?;
            }
            LogicalMessage::Relation(body) => {
                let relation = self.catalog.describe(&body).await?;
                let previous = match self.relations.get(&body.relation_id) {
                    Some((_, known)) => Some(Arc::clone(known)),
                    None if self.ddl_messages => None,
                    None => writer
                        .log()
                        .latest_relation(body.relation_id)?
                        .map(|(_, r)| r),
                };
                let (id, relation) = writer.relation(relation)?;
                self.relations
                    .insert(body.relation_id, (id, Arc::clone(&relation)));
                if let Some(previous) = previous.filter(|p| !same_columns(p, &relation)) {
                    self.inferred_schema_change(writer, lsn, body.xid, id, &previous, &relation)
                        .await?;
                }
            }
            LogicalMessage::Insert {
                xid,
                relation_id,
                new,
            } => {
                self.change(writer, lsn, xid, relation_id, Op::Insert, None, Some(new))?;
            }
            LogicalMessage::Update {
                xid,
                relation_id,
                old,
                mut new,
            } => {
                // Under REPLICA IDENTITY FULL an unchanged TOAST value is the old row's:
                // every sink then gets the value, not the placeholder.
                if let Some(old) = &old {
                    old.fill_unchanged_toast(&mut new);
                }
                let old = old.map(|o| match o {
                    OldTuple::Key(t) | OldTuple::Full(t) => t,
                });
                self.change(writer, lsn, xid, relation_id, Op::Update, old, Some(new))?;
            }
            LogicalMessage::Delete {
                xid,
                relation_id,
                old,
            } => {
                let (OldTuple::Key(old) | OldTuple::Full(old)) = old;
                self.change(writer, lsn, xid, relation_id, Op::Delete, Some(old), None)?;
            }
            LogicalMessage::Truncate {
                xid, relation_ids, ..
            } => {
                for relation_id in relation_ids {
                    self.change(writer, lsn, xid, relation_id, Op::Truncate, None, None)?;
                }
            }
            LogicalMessage::Message {
                prefix,
                content,
                xid,
                lsn: message_lsn,
                ..
            } if prefix == ddl::MESSAGE_PREFIX => {
                self.schema_message(writer, Position(message_lsn), xid, &content)
                    .await?
            }
            LogicalMessage::Message {
                prefix, content, ..
            } if prefix == incremental::WATERMARK_PREFIX => match self.streaming {
                Some(xid) => self
                    .streamed
                    .entry(xid)
                    .or_default()
                    .watermarks
                    .push((lsn, content)),
                None => self.watermark(writer, lsn, &content)?,
            },
            // Origins, type descriptions (the catalog resolves types) and logical decoding
            // messages carry no row changes.
            _ => {}
        }
        Ok(())
    }

    /// Whether what arrives now belongs in the log: a transaction being logged, or a streamed
    /// one (which the server sends once, before its commit).
    fn logging(&self) -> bool {
        matches!(
            (self.open, self.streaming),
            (Some(OpenTransaction::Logging), _) | (None, Some(_))
        )
    }

    /// A message of the schema-change trigger: the table's columns after an `ALTER TABLE`,
    /// compared with its columns before by number.
    async fn schema_message(
        &mut self,
        writer: &mut LogWriter,
        lsn: Position,
        xid: Option<u32>,
        content: &[u8],
    ) -> Result<(), SourceError> {
        if !self.logging() {
            return Ok(());
        }
        let shape: ddl::TableShape = serde_json::from_slice(content).map_err(|e| {
            SourceError::SchemaChange(format!(
                "the {} message at {lsn} is not a table description: {e}",
                ddl::MESSAGE_PREFIX
            ))
        })?;
        if !self.captured_tables.contains(&shape.oid) {
            return Ok(());
        }
        let log = Arc::clone(writer.log());
        let Some(previous) = log.table_shape_before(shape.oid, lsn)? else {
            return Ok(());
        };
        let previous = decode_shape(&previous)?;
        log.set_table_shape(shape.oid, lsn, &encode_shape(&shape))?;
        let before_columns = self.catalog.shape_columns(&previous.columns).await?;
        let columns = ddl::diff_shapes(&previous, &before_columns, &shape);
        if columns.is_empty() {
            return Ok(());
        }
        let relation = self.catalog.describe_shape(&shape).await?;
        let (id, relation) = writer.relation(relation)?;
        self.relations
            .insert(shape.oid, (id, Arc::clone(&relation)));
        let change = SchemaChange {
            relation: id,
            position: lsn,
            columns,
            exact: true,
        };
        self.append_schema_change(writer, xid, &relation, change)
    }

    /// A new description of a table whose columns differ from its last one, with no message
    /// of the trigger before it: the change is inferred by column name.
    async fn inferred_schema_change(
        &mut self,
        writer: &mut LogWriter,
        lsn: Position,
        xid: Option<u32>,
        id: RelationId,
        previous: &Relation,
        relation: &Arc<Relation>,
    ) -> Result<(), SourceError> {
        if !self.logging() {
            return Ok(());
        }
        let Some(now) = self.catalog.table_shape(relation.oid).await? else {
            return Ok(());
        };
        let columns = ddl::diff_relations(previous, relation, &now);
        if columns.is_empty() {
            return Ok(());
        }
        // What the next message of the trigger, once installed, is compared with.
        writer
            .log()
            .set_table_shape(relation.oid, lsn, &encode_shape(&now))?;
        tracing::warn!(
            table = %relation.qualified_name(),
            "schema change inferred from the table's new description, not read from the \
             schema-change trigger: a renamed column is followed as a drop and an add"
        );
        let change = SchemaChange {
            relation: id,
            position: lsn,
            columns,
            exact: false,
        };
        self.append_schema_change(writer, xid, relation, change)
    }

    fn append_schema_change(
        &mut self,
        writer: &mut LogWriter,
        xid: Option<u32>,
        relation: &Relation,
        change: SchemaChange,
    ) -> Result<(), SourceError> {
        for column in &change.columns {
            tracing::info!(table = %relation.qualified_name(), change = ?column, lsn = %change.position, "schema change");
            if let ColumnChange::Added {
                name,
                existing_rows: ExistingRows::Unknown,
            } = column
            {
                tracing::warn!(
                    table = %relation.qualified_name(),
                    column = %name,
                    "a column was added with a default PostgreSQL evaluated row by row (a \
                     volatile default, or the table was rewritten): the change stream does not \
                     carry those values, so the sinks hold NULL in it for rows that existed \
                     before until they change; re-snapshot the table to fill them (see the \
                     README, Schema changes)"
                );
            }
        }
        let record = Record::Schema(change);
        match self.streaming {
            Some(top) => writer.append_streamed(top, xid.unwrap_or(top), &record)?,
            None => {
                writer.append(&record)?;
            }
        }
        Ok(())
    }

    /// Starts logging the transaction that commits at `commit_position`, or skipping it when the
    /// log already holds it (the server re-sends from the slot's confirmed position).
    fn begin(
        &mut self,
        writer: &mut LogWriter,
        xid: u32,
        commit_position: Position,
        commit_ts: i64,
    ) -> Result<(), SourceError> {
        if commit_position <= writer.last_appended().commit_position {
            self.open = Some(OpenTransaction::Skipping);
            return Ok(());
        }
        self.open = Some(OpenTransaction::Logging);
        writer.append(&Record::Begin(TxBegin {
            origin: TxOrigin::Postgres { xid },
            commit_position,
            commit_ts: unix_micros(commit_ts),
        }))?;
        Ok(())
    }

    fn commit(
        &mut self,
        writer: &mut LogWriter,
        commit_lsn: u64,
        end_lsn: u64,
        commit_ts: i64,
    ) -> Result<(), SourceError> {
        if let Some(OpenTransaction::Logging) = self.open.take() {
            for (oid, changes) in self.captured.drain() {
                if let Some((_, relation)) = self.relations.get(&oid) {
                    self.telemetry.captured(&relation.qualified_name(), changes);
                }
            }
            writer.append(&Record::Commit(TxCommit {
                commit_position: Position(commit_lsn),
                end_position: Position(end_lsn),
                commit_ts: unix_micros(commit_ts),
            }))?;
            self.record_chunk(writer)?;
        }
        Ok(())
    }

    /// Appends a committed streamed transaction's changes (after its Begin): what an
    /// incremental snapshot's window must know of them, their count, its watermarks. A large
    /// one takes seconds: a status update between parts tells the server the agent is alive
    /// (it ends a connection silent for `wal_sender_timeout`, and would send the transaction
    /// again, and again).
    async fn append_streamed(
        &mut self,
        connection: &mut ReplicationConnection,
        writer: &mut LogWriter,
        xid: u32,
        streamed: StreamedTransaction,
    ) -> Result<(), SourceError> {
        let aborted = &streamed.aborted_subtransactions;
        let window_open = self
            .incremental
            .as_ref()
            .is_some_and(|merge| merge.window.is_some());
        let log = Arc::clone(writer.log());
        let mut note = |change: &ChangeEvent| -> Result<(), LogError> {
            if let Some(window) = self
                .incremental
                .as_mut()
                .and_then(|merge| merge.window.as_mut())
            {
                window.note(&*log.relation(change.relation)?, change);
            }
            Ok(())
        };
        let started = Instant::now();
        let mut appended = 0;
        loop {
            let inspect: Option<InspectChange<'_>> =
                if window_open { Some(&mut note) } else { None };
            let (part, done) =
                writer.append_streamed_transaction(xid, aborted, inspect, STREAMED_PART_CHANGES)?;
            appended += part;
            if done {
                break;
            }
            connection.send_status(self.confirmed).await?;
        }
        tracing::debug!(
            xid,
            changes = appended,
            seconds = started.elapsed().as_secs_f64(),
            "streamed transaction appended"
        );
        for ((subxid, oid), changes) in streamed.captured {
            if !aborted.contains(&subxid) {
                *self.captured.entry(oid).or_default() += changes;
            }
        }
        for (lsn, content) in streamed.watermarks {
            self.watermark(writer, lsn, &content)?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn change(
        &mut self,
        writer: &mut LogWriter,
        lsn: Position,
        xid: Option<u32>,
        relation_id: u32,
        op: Op,
        before: Option<Vec<TupleValue>>,
        after: Option<Vec<TupleValue>>,
    ) -> Result<(), SourceError> {
        match (self.open, self.streaming) {
            (Some(OpenTransaction::Logging), _) | (None, Some(_)) => {}
            (Some(OpenTransaction::Skipping), _) => return Ok(()),
            (None, None) => {
                return Err(protocol_error(format!(
                    "change at {lsn} outside a transaction"
                )))
            }
        }
        let (id, relation) = self.relations.get(&relation_id).ok_or_else(|| {
            protocol_error(format!(
                "change at {lsn} for relation {relation_id} before its Relation message"
            ))
        })?;
        let change = ChangeEvent {
            relation: *id,
            position: lsn,
            op,
            before: before.map(|t| to_row(relation, lsn, t)).transpose()?,
            after: after.map(|t| to_row(relation, lsn, t)).transpose()?,
        };
        if let Some(top) = self.streaming {
            let subxid = xid.unwrap_or(top);
            let streamed = self.streamed.entry(top).or_default();
            *streamed.captured.entry((subxid, relation_id)).or_default() += 1;
            writer.append_streamed(top, subxid, &Record::Change(change))?;
            return Ok(());
        }
        *self.captured.entry(relation_id).or_default() += 1;
        if let Some(window) = self
            .incremental
            .as_mut()
            .and_then(|merge| merge.window.as_mut())
        {
            window.note(relation, &change);
        }
        writer.append(&Record::Change(change))?;
        Ok(())
    }
}

impl Session {
    /// A watermark of the incremental snapshot: a low one opens the chunk's window, a high
    /// one logs the chunk's rows the window left (in the watermark's own transaction).
    fn watermark(
        &mut self,
        writer: &mut LogWriter,
        lsn: Position,
        content: &[u8],
    ) -> Result<(), SourceError> {
        let Some(merge) = self.incremental.as_mut() else {
            return Ok(());
        };
        let Ok(mark) = serde_json::from_slice::<incremental::Watermark>(content) else {
            return Ok(());
        };
        // Another agent's, an earlier run's, or one the log already holds.
        if mark.slot != merge.slot
            || mark.run != merge.run
            || !matches!(self.open, Some(OpenTransaction::Logging))
        {
            return Ok(());
        }
        if !mark.high {
            merge.window = Some(incremental::Window::open(mark.chunk, mark.table));
            return Ok(());
        }
        let Some(window) = merge.window.take().filter(|w| w.chunk == mark.chunk) else {
            return Ok(());
        };
        let chunk = merge
            .chunks
            .try_recv()
            .ok()
            .filter(|chunk| chunk.id == mark.chunk)
            .ok_or_else(|| {
                SourceError::Snapshot(format!(
                    "the rows of incremental snapshot chunk {} were not handed over before its                      high watermark",
                    mark.chunk
                ))
            })?;
        let table = chunk.relation.qualified_name();
        let (relation_id, relation) = match merge.relations.get(&table) {
            Some(known) => known.clone(),
            None => {
                let known = writer.relation(chunk.relation)?;
                merge.relations.insert(table.clone(), known.clone());
                known
            }
        };
        let rows = window.close(&relation, chunk.rows);
        let logged = rows.len() as u64;
        for row in rows {
            writer.append(&Record::Change(ChangeEvent {
                relation: relation_id,
                position: lsn,
                op: Op::IncrementalRead,
                before: None,
                after: Some(row),
            }))?;
        }
        merge.progress.entry(table.clone()).or_insert((0, 0)).1 = chunk.estimated_rows;
        merge.logged = Some(incremental::Logged {
            table,
            rows: logged,
            last_key: chunk.last_key,
            last: chunk.last,
        });
        Ok(())
    }

    /// After the commit of a transaction that logged a chunk: records how far its table has
    /// come (durable with the commit, by the next flush).
    fn record_chunk(&mut self, writer: &LogWriter) -> Result<(), SourceError> {
        let Some(merge) = self.incremental.as_mut() else {
            return Ok(());
        };
        let Some(logged) = merge.logged.take() else {
            return Ok(());
        };
        let log = writer.log();
        let mut snapshots = log.table_snapshots()?.unwrap_or_default();
        let copied = &mut merge.progress.entry(logged.table.clone()).or_default().0;
        *copied += logged.rows;
        let copied = *copied;
        self.telemetry.captured(&logged.table, logged.rows);
        if merge.last_progress_line.elapsed() >= snapshot::PROGRESS_INTERVAL {
            merge.last_progress_line = Instant::now();
            tracing::info!(
                table = %logged.table,
                rows = copied,
                estimated = merge.progress.get(&logged.table).map_or(0, |p| p.1),
                "snapshot progress"
            );
        }
        if logged.last {
            snapshots.in_progress = None;
            snapshots.done.insert(logged.table.clone());
            tracing::info!(table = %logged.table, rows = copied, "table snapshotted (incremental)");
        } else {
            snapshots.in_progress = Some((logged.table, logged.last_key));
        }
        log.set_table_snapshots(&snapshots)?;
        let all_done = merge.tables.iter().all(|t| snapshots.done.contains(t));
        let state = if all_done { "done" } else { "incremental" };
        self.telemetry.snapshot_progress(merge.status(state));
        Ok(())
    }
}

/// Aborts the task when dropped: the incremental snapshot reader lives as long as the stream.
struct AbortOnDrop(tokio::task::JoinHandle<Result<(), SourceError>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn protocol_error(message: String) -> SourceError {
    SourceError::Replication(ReplicationError::Protocol(message))
}

/// Converts a pgoutput tuple to a row of values.
fn to_row(relation: &Relation, lsn: Position, tuple: Vec<TupleValue>) -> Result<Row, SourceError> {
    if tuple.len() != relation.columns.len() {
        return Err(protocol_error(format!(
            "change at {lsn} for {} has {} columns, its Relation message {}",
            relation.qualified_name(),
            tuple.len(),
            relation.columns.len()
        )));
    }
    tuple
        .into_iter()
        .zip(&relation.columns)
        .map(|(value, column)| match value {
            TupleValue::Null => Ok(Value::Null),
            TupleValue::UnchangedToast => Ok(Value::UnchangedToast),
            TupleValue::Text(bytes) => {
                let text = std::str::from_utf8(&bytes).map_err(|_| {
                    protocol_error(format!(
                        "change at {lsn}: column {}.{} is not valid UTF-8",
                        relation.qualified_name(),
                        column.name
                    ))
                })?;
                Ok(parse_column(relation, column, text))
            }
            TupleValue::Binary(_) => Err(protocol_error(format!(
                "change at {lsn}: binary tuple data was not requested"
            ))),
        })
        .collect()
}

/// Whether two descriptions of a table have the same columns (names and types, in order).
fn same_columns(a: &Relation, b: &Relation) -> bool {
    a.columns.len() == b.columns.len()
        && a.columns.iter().zip(&b.columns).all(|(x, y)| {
            (&x.name, x.type_oid, x.type_modifier) == (&y.name, y.type_oid, y.type_modifier)
        })
}

fn encode_shape(shape: &ddl::TableShape) -> Vec<u8> {
    // Serialising plain data into a Vec cannot fail.
    postcard::to_allocvec(shape).unwrap_or_default()
}

fn decode_shape(bytes: &[u8]) -> Result<ddl::TableShape, SourceError> {
    postcard::from_bytes(bytes).map_err(|e| {
        SourceError::SchemaChange(format!(
            "a table description the offset log keeps cannot be read ({e}); the log cannot be \
             trusted: move agent.data_dir aside and re-snapshot"
        ))
    })
}

fn unix_micros(pg_micros: i64) -> i64 {
    pg_micros.saturating_add(PG_EPOCH_OFFSET_MICROS)
}
