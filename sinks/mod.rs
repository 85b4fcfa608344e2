//! Sinks: where logged changes go. Each sink reads the offset log from its own cursor, at its
//! own pace, in its own task.
//!
//! The contract of a sink (the pipeline keeps its side, every sink keeps its own):
//! - `open` is called once before anything else and returns the log sequence number of the
//!   last record the sink has durably applied, read from the sink's own checkpoint (0: none).
//! - `apply` receives durable log records in log order, each batch starting right after the
//!   last applied record. Batches end on a transaction's Commit, except that a transaction
//!   larger than a batch arrives in consecutive chunks. Calls are sequential.
//! - When `apply` returns `Ok`, the batch's effect and the sink's checkpoint are durable.
//!   Applying again records that were already applied (after a crash between the write and the
//!   checkpoint) must leave the destination as one application would, or, for an append-only
//!   destination, the sink must undo the unrecorded write first.

pub mod clickhouse;
pub mod collapse;
pub mod history;
pub mod jsonl;
pub mod large;
pub mod postgres;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use crate::config::{SinkConfig, SinkKind};
use crate::envelope::SourceInfo;
use crate::log::{LogEntry, LogError, OffsetLog};

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("sink {sink:?}: {context}: {source}")]
    Io {
        sink: String,
        context: String,
        source: std::io::Error,
    },
    #[error("sink {sink:?}: {message}")]
    Inconsistent { sink: String, message: String },
    /// Connection trouble, serialization failures: retried with backoff.
    #[error("sink {sink:?}: {message}")]
    Transient { sink: String, message: String },
    /// The target cannot take the batch until the operator acts (the message says how):
    /// retried with backoff meanwhile, so the sink goes on once it can.
    #[error("sink {sink:?}: {message}")]
    Blocked { sink: String, message: String },
    /// The target refused the batch for good.
    #[error("sink {sink:?}: {message}")]
    Target { sink: String, message: String },
    #[error("{0}")]
    Unsupported(String),
    #[error(transparent)]
    Log(#[from] LogError),
}

impl SinkError {
    /// Whether retrying the batch later may succeed; the log keeps everything meanwhile.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            SinkError::Io { .. } | SinkError::Transient { .. } | SinkError::Blocked { .. }
        )
    }
}

/// Changes a sink's target refused and its dead-letter queue took, per source table.
pub type DeadLettered = BTreeMap<String, u64>;

pub trait Sink {
    fn open(&mut self) -> impl Future<Output = Result<u64, SinkError>> + Send;
    fn apply(
        &mut self,
        entries: &[LogEntry],
    ) -> impl Future<Output = Result<DeadLettered, SinkError>> + Send;
}

/// The closed set of sinks, built from config with one match.
#[allow(clippy::large_enum_variant)] // a few per process, built once: boxing saves nothing
pub enum AnySink {
    Jsonl(jsonl::JsonlSink),
    Postgres(postgres::PostgresSink),
    ClickHouse(clickhouse::ClickHouseSink),
}

impl AnySink {
    /// `snapshot_writers`: connections a table sink COPYs the initial snapshot's rows with.
    pub fn build(
        config: &SinkConfig,
        log: &Arc<OffsetLog>,
        source: &SourceInfo,
        data_dir: &Path,
        snapshot_writers: usize,
    ) -> Result<AnySink, SinkError> {
        match &config.kind {
            SinkKind::Jsonl(jsonl) => Ok(AnySink::Jsonl(jsonl::JsonlSink::new(
                &config.name,
                jsonl,
                Arc::clone(log),
                source.clone(),
            ))),
            SinkKind::Postgres(target) => Ok(AnySink::Postgres(
                postgres::PostgresSink::new(&config.name, target, Arc::clone(log), data_dir)?
                    .with_snapshot_writers(snapshot_writers),
            )),
            SinkKind::ClickHouse(target) => Ok(AnySink::ClickHouse(
                clickhouse::ClickHouseSink::new(&config.name, target, Arc::clone(log), data_dir)?,
            )),
        }
    }

    pub async fn open(&mut self) -> Result<u64, SinkError> {
        match self {
            AnySink::Jsonl(sink) => sink.open().await,
            AnySink::Postgres(sink) => sink.open().await,
            AnySink::ClickHouse(sink) => sink.open().await,
        }
    }

    /// Applies a batch; `ahead` is what the sink's planner made of it while the batch
    /// before was applied, if it did.
    pub async fn apply(
        &mut self,
        entries: &[LogEntry],
        ahead: Option<Planned>,
    ) -> Result<DeadLettered, SinkError> {
        match self {
            AnySink::Jsonl(sink) => sink.apply(entries).await,
            AnySink::Postgres(sink) => {
                let planned = ahead.map(|Planned::Postgres(planned)| planned);
                sink.apply_planned_ahead(entries, planned).await
            }
            AnySink::ClickHouse(sink) => sink.apply(entries).await,
        }
    }

    /// What plans this sink's batches without its connection (None: it has nothing to do
    /// ahead of applying one).
    pub fn planner(&self) -> Option<Planner> {
        match self {
            AnySink::Jsonl(_) | AnySink::ClickHouse(_) => None,
            AnySink::Postgres(sink) => Some(Planner::Postgres(sink.planner())),
        }
    }
}

/// Plans a sink's next batch on a blocking thread while its current batch is applied: the
/// agent's work on one batch overlaps the target's on the other.
#[derive(Clone)]
pub enum Planner {
    Postgres(postgres::BatchPlanner),
}

pub enum Planned {
    Postgres(postgres::PlannedBatch),
}

impl Planner {
    /// None when the batch is not worth planning ahead (the sink plans it as it applies it).
    pub fn plan(&self, entries: &[LogEntry]) -> Option<Planned> {
        match self {
            Planner::Postgres(planner) => planner.plan_ahead(entries).map(Planned::Postgres),
        }
    }
}
