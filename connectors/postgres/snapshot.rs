//! The initial snapshot: every captured table as the new slot's exported snapshot shows it,
//! read with `COPY … TO STDOUT` over several connections that share that snapshot, and
//! logged as transactions of snapshot rows (`Read` changes, kept as the COPY text the source
//! sent) before streaming starts at the slot's consistent point. Sinks apply it as it comes,
//! so the log never holds much more of it than the sinks are behind. A snapshot cut short (a
//! crash, a lost connection) cannot resume (its exported snapshot is gone): it starts again
//! from a new slot, and its first transaction truncates every captured table, so whatever the
//! first attempt delivered is replaced, not mixed in.
//!
//! Parallelism: each table is split into ranges of heap blocks (`ctid` ranges, which
//! PostgreSQL 14+ scans directly) so that a large table is read by several connections
//! at once; small tables are one range. Each connection takes the next range from a shared
//! queue, checks the COPY text rows (UTF-8, a field per column), and sends them in blocks of
//! whole lines to the one task that appends to the log.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::catalog::{Catalog, SourceTable};
use super::replication::quote_ident;
use super::{PostgresSource, SourceError};
use crate::config::PostgresSourceConfig;
use crate::connectors::backpressure::{self, Backpressure};
use crate::connectors::snapshot_log::SnapshotTransactions;
use crate::event::{Position, Relation, RelationId, TxOrigin};
use crate::log::{LogWriter, SnapshotState, TableSnapshots};
use crate::pgtext::copy_rows::{check_lines, malformed_row};
use crate::telemetry::{SnapshotStatus, TableProgress, Telemetry};

/// A table smaller than this many heap blocks (8 MiB) is read in one range.
const MIN_RANGE_BLOCKS: u32 = 1024;
/// Rows (or bytes of rows) a reader hands to the log at once: one record of the log.
const ROWS_PER_MESSAGE: u32 = 1000;
const BYTES_PER_MESSAGE: usize = 1 << 20;
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(10);
/// How often `/status` learns the rows copied.
const STATUS_INTERVAL: Duration = Duration::from_secs(1);

/// What the snapshot logged.
#[derive(Debug, Clone, Copy)]
pub struct SnapshotSummary {
    pub rows: u64,
    pub elapsed: Duration,
}

/// One table of the snapshot.
struct Table {
    relation_id: RelationId,
    relation: Arc<Relation>,
    estimated_rows: u64,
    copied: u64,
}

/// One `COPY` of a table or of a range of its blocks.
struct Range {
    table: usize,
    query: String,
}

/// Rows of one table, as COPY text lines.
struct Rows {
    table: usize,
    rows: u32,
    text: Bytes,
}

/// The snapshot a new slot exported.
pub struct Exported<'a> {
    pub name: &'a str,
    /// Where the slot's stream starts.
    pub consistent_point: Position,
    /// Server time (Unix microseconds) just before the slot was created: no transaction the
    /// stream carries committed earlier, so the snapshot's rows are as of then.
    pub taken_at: i64,
    /// An earlier snapshot was cut short (or the sinks hold rows of an earlier log): every
    /// table is truncated first.
    pub replaces_earlier: bool,
}

/// Copies `tables` as of `snapshot` into the log for `source`, pausing while the log holds
/// more than the source may let it (backpressure).
pub async fn copy(
    source: &PostgresSource,
    catalog: &mut Catalog,
    tables: &[SourceTable],
    snapshot: Exported<'_>,
    writer: &mut LogWriter,
    cancel: &CancellationToken,
) -> Result<Option<SnapshotSummary>, SourceError> {
    let (config, telemetry) = (&source.config, &*source.telemetry);
    let mut backpressure = Backpressure::new(source.log_max_bytes);
    let started = Instant::now();
    let mut described = Vec::with_capacity(tables.len());
    let mut ranges = VecDeque::new();
    for (index, table) in tables.iter().enumerate() {
        let relation = catalog.describe_table(table).await?;
        let (blocks, estimated_rows) = catalog.estimate(table).await?;
        for query in range_queries(table, &relation, blocks, config.snapshot_parallelism) {
            ranges.push_back(Range {
                table: index,
                query,
            });
        }
        let (relation_id, relation) = writer.relation(relation)?;
        described.push(Table {
            relation_id,
            relation,
            estimated_rows,
            copied: 0,
        });
    }
    tracing::info!(
        tables = tables.len(),
        ranges = ranges.len(),
        parallelism = config.snapshot_parallelism,
        consistent_point = %snapshot.consistent_point,
        "snapshot started"
    );
    let readers = config.snapshot_parallelism.min(ranges.len()).max(1);
    let queue = Arc::new(Mutex::new(ranges));
    let relations: Arc<Vec<Arc<Relation>>> =
        Arc::new(described.iter().map(|t| Arc::clone(&t.relation)).collect());
    let (sender, mut received) = mpsc::channel::<Result<Rows, SourceError>>(readers * 4);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..readers {
        let client = open_reader(config, snapshot.name).await?;
        let (queue, relations, sender) =
            (Arc::clone(&queue), Arc::clone(&relations), sender.clone());
        tasks.spawn(async move {
            if let Err(e) = read_ranges(&client, &queue, &relations, &sender).await {
                let _ = sender.send(Err(e)).await;
            }
        });
    }
    drop(sender);

    writer
        .log()
        .set_snapshot_state(SnapshotState::Running)
        .await?;
    // Strictly below the consistent point: a transaction whose commit record starts exactly
    // there is not in the snapshot and must not be taken for one the log holds.
    let mut logged = SnapshotTransactions::new(
        Position(snapshot.consistent_point.0.saturating_sub(1)),
        snapshot.consistent_point,
        snapshot.taken_at,
        Box::new(|number| TxOrigin::Postgres { xid: number }),
    );
    logged.begin(writer)?;
    if snapshot.replaces_earlier {
        for table in &described {
            logged.truncate(writer, table.relation_id)?;
        }
    }
    let mut rows = 0u64;
    telemetry.snapshot_progress(progress(&described, rows, started, "running"));
    let mut last_progress = Instant::now();
    let mut last_status = Instant::now();
    loop {
        let message = tokio::select! {
            _ = cancel.cancelled() => return Ok(None),
            message = received.recv() => message,
        };
        let Some(message) = message else { break };
        let chunk = message?;
        // The readers wait on the full channel meanwhile, in their snapshot transactions.
        loop {
            backpressure.update(writer.log(), telemetry)?;
            if !backpressure.paused {
                break;
            }
            // What is in the log already shows in /status while the sinks catch up.
            publish_progress(&mut last_status, &described, rows, started, telemetry);
            tokio::select! {
                _ = cancel.cancelled() => return Ok(None),
                _ = tokio::time::sleep(backpressure::CHECK_INTERVAL) => {}
            }
        }
        let table = &mut described[chunk.table];
        logged.rows(writer, table.relation_id, chunk.rows, chunk.text)?;
        table.copied += u64::from(chunk.rows);
        rows += u64::from(chunk.rows);
        publish_progress(&mut last_status, &described, rows, started, telemetry);
        if last_progress.elapsed() >= PROGRESS_INTERVAL {
            last_progress = Instant::now();
            for table in &described {
                tracing::info!(
                    table = %table.relation.qualified_name(),
                    rows = table.copied,
                    estimated = table.estimated_rows,
                    "snapshot progress"
                );
            }
        }
    }
    while let Some(joined) = tasks.join_next().await {
        joined.map_err(|e| SourceError::Snapshot(format!("a snapshot reader failed: {e}")))?;
    }
    logged.commit(writer)?;
    writer.log().flush().await?;
    writer.log().set_table_snapshots(&TableSnapshots {
        done: described
            .iter()
            .map(|t| t.relation.qualified_name())
            .collect(),
        in_progress: None,
    })?;
    writer.log().set_snapshot_state(SnapshotState::Done).await?;
    let summary = SnapshotSummary {
        rows,
        elapsed: started.elapsed(),
    };
    telemetry.snapshot_progress(progress(&described, rows, started, "done"));
    for table in &described {
        let name = table.relation.qualified_name();
        telemetry.captured(&name, table.copied);
        tracing::info!(table = %name, rows = table.copied, "table snapshotted");
    }
    tracing::info!(
        rows,
        seconds = format!("{:.1}", summary.elapsed.as_secs_f64()),
        rows_per_second = (rows as f64 / summary.elapsed.as_secs_f64().max(1e-9)) as u64,
        "snapshot done"
    );
    Ok(Some(summary))
}

/// Publishes the snapshot's progress to `/status`, at most once per `STATUS_INTERVAL`.
fn publish_progress(
    last: &mut Instant,
    tables: &[Table],
    rows: u64,
    started: Instant,
    telemetry: &Telemetry,
) {
    if last.elapsed() >= STATUS_INTERVAL {
        *last = Instant::now();
        telemetry.snapshot_progress(progress(tables, rows, started, "running"));
    }
}

/// Where the snapshot stands, for `/status`.
fn progress(tables: &[Table], rows: u64, started: Instant, state: &'static str) -> SnapshotStatus {
    let seconds = started.elapsed().as_secs_f64();
    SnapshotStatus {
        state,
        rows,
        seconds,
        rows_per_second: (rows as f64 / seconds.max(1e-9)) as u64,
        tables: tables
            .iter()
            .map(|t| {
                let progress = TableProgress {
                    rows: t.copied,
                    estimated: t.estimated_rows,
                };
                (t.relation.qualified_name(), progress)
            })
            .collect(),
    }
}

/// The COPY queries that read `table` in ranges of blocks: about four per reader for a large
/// table, so that readers finishing early take over the rest; one for a small table. The
/// last range is open-ended: the table may have grown since its size was estimated.
fn range_queries(
    table: &SourceTable,
    relation: &Relation,
    blocks: u32,
    parallelism: usize,
) -> Vec<String> {
    let columns = relation
        .columns
        .iter()
        .map(|c| quote_ident(&c.name))
        .collect::<Vec<_>>()
        .join(", ");
    let select = format!("SELECT {columns} FROM {}", table.quoted());
    let copy = |filter: String| format!("COPY ({select}{filter}) TO STDOUT");
    let wanted = u32::try_from(parallelism.saturating_mul(4)).unwrap_or(u32::MAX);
    let size = (blocks / wanted.max(1)).max(MIN_RANGE_BLOCKS);
    if blocks <= size {
        return vec![copy(String::new())];
    }
    let mut queries = Vec::new();
    let mut start = 0u32;
    while start.saturating_add(size) < blocks {
        let end = start + size;
        let lower = if start == 0 {
            String::new()
        } else {
            format!("ctid >= '({start},0)'::tid AND ")
        };
        queries.push(copy(format!(" WHERE {lower}ctid < '({end},0)'::tid")));
        start = end;
    }
    queries.push(copy(format!(" WHERE ctid >= '({start},0)'::tid")));
    queries
}

/// A connection inside a read-only transaction on the exported snapshot, with the session
/// settings the type conversion reads (the replication session's).
async fn open_reader(config: &PostgresSourceConfig, snapshot: &str) -> Result<Client, SourceError> {
    let (client, connection) = crate::tls::connect(&config.url.pg_config())
        .await
        .map_err(|e| match e {
            crate::tls::ConnectError::Postgres(e) => SourceError::connect(&config.url, e),
            crate::tls::ConnectError::Tls(e) => SourceError::Prerequisite(e.to_string()),
        })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "snapshot connection closed");
        }
    });
    client
        .batch_execute(&format!(
            "{}; SET client_encoding = 'UTF8'; \
             BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; \
             SET TRANSACTION SNAPSHOT {}",
            super::replication::set_output_settings(),
            super::replication::quote_literal(snapshot)
        ))
        .await
        .map_err(|e| SourceError::catalog("importing the slot's snapshot", e))?;
    Ok(client)
}

/// Reads ranges from the queue until it is empty, sending parsed rows.
async fn read_ranges(
    client: &Client,
    queue: &Mutex<VecDeque<Range>>,
    relations: &[Arc<Relation>],
    sender: &mpsc::Sender<Result<Rows, SourceError>>,
) -> Result<(), SourceError> {
    loop {
        let next = queue.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
        let Some(range) = next else {
            return Ok(());
        };
        let relation = &relations[range.table];
        let stream = client
            .copy_out(range.query.as_str())
            .await
            .map_err(|e| SourceError::catalog("reading a table for the snapshot", e))?;
        let mut stream = std::pin::pin!(stream);
        // Whole lines are sent on in blocks; a line the stream cut stays for the next bytes.
        let mut block = BytesMut::new();
        let (mut rows, mut checked) = (0u32, 0usize);
        while let Some(bytes) = stream.next().await {
            let bytes =
                bytes.map_err(|e| SourceError::catalog("reading a table for the snapshot", e))?;
            block.extend_from_slice(&bytes);
            let Some(last) = memchr::memrchr(b'\n', &block[checked..]) else {
                continue;
            };
            let line_ends = check_lines(relation, &block[checked..=checked + last])
                .map_err(SourceError::Snapshot)?;
            // Line ends count from `base` in the block as it was checked; `sent` bytes of it
            // have gone out since.
            let (base, mut sent) = (checked, 0);
            for end in line_ends {
                checked = base + end - sent;
                rows += 1;
                if rows == ROWS_PER_MESSAGE || checked >= BYTES_PER_MESSAGE {
                    let text = block.split_to(checked).freeze();
                    let rows = std::mem::take(&mut rows);
                    sent += checked;
                    checked = 0;
                    let chunk = Rows {
                        table: range.table,
                        rows,
                        text,
                    };
                    if sender.send(Ok(chunk)).await.is_err() {
                        return Ok(());
                    }
                }
            }
        }
        if block.len() > checked {
            return Err(SourceError::Snapshot(malformed_row(
                relation,
                "the output ended inside a row",
            )));
        }
        if rows > 0 {
            let chunk = Rows {
                table: range.table,
                rows,
                text: block.split_to(checked).freeze(),
            };
            if sender.send(Ok(chunk)).await.is_err() {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_table_is_read_in_ranges_that_cover_every_block() {
        let table = SourceTable {
            schema: "public".into(),
            table: "t".into(),
        };
        let relation = Relation {
            oid: 1,
            schema: "public".into(),
            table: "t".into(),
            columns: Vec::new(),
        };
        assert_eq!(range_queries(&table, &relation, 10, 2).len(), 1);
        let queries = range_queries(&table, &relation, 100_000, 2);
        assert_eq!(queries.len(), 8);
        assert!(queries[0].ends_with("WHERE ctid < '(12500,0)'::tid) TO STDOUT"));
        assert!(queries[1].contains("ctid >= '(12500,0)'::tid AND ctid < '(25000,0)'::tid"));
        assert!(queries[7].ends_with("WHERE ctid >= '(87500,0)'::tid) TO STDOUT"));
    }
}
