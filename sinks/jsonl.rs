//! The JSONL sink: one Debezium envelope per line, in commit order, in files
//! `<path>/<sink>-00000001.jsonl`, `…-00000002.jsonl`, …, a new file once one passes
//! `max_file_bytes`.
//!
//! Exactly once across crashes: after each batch the file is fsynced, then the cursor (the
//! last log record written, and the file and byte offset just past it) is stored in the offset
//! log. On start the sink cuts the file back to that offset and removes later files, so lines
//! written after the last stored cursor are written again exactly once.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{DeadLettered, Sink, SinkError};
use crate::config::JsonlSinkConfig;
use crate::envelope::{write_envelopes, SourceInfo, TransactionOrder};
use crate::event::{ChangeEvent, Record, TxBegin};
use crate::log::{LogEntry, OffsetLog, SinkCursor};

const WRITE_BUFFER_BYTES: usize = 256 * 1024;

/// Where the next line goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct FilePosition {
    index: u32,
    offset: u64,
}

pub struct JsonlSink {
    name: String,
    dir: PathBuf,
    max_file_bytes: u64,
    log: Arc<OffsetLog>,
    source: SourceInfo,
    file: Option<File>,
    position: FilePosition,
    /// The transaction the last applied record belongs to, if it is still open.
    transaction: Option<(TxBegin, TransactionOrder)>,
}

impl JsonlSink {
    pub fn new(
        name: &str,
        config: &JsonlSinkConfig,
        log: Arc<OffsetLog>,
        source: SourceInfo,
    ) -> JsonlSink {
        JsonlSink {
            name: name.to_string(),
            dir: config.path.clone(),
            max_file_bytes: config.max_file_bytes,
            log,
            source,
            file: None,
            position: FilePosition {
                index: 1,
                offset: 0,
            },
            transaction: None,
        }
    }

    fn file_path(&self, index: u32) -> PathBuf {
        self.dir.join(format!("{}-{index:08}.jsonl", self.name))
    }

    fn io_error(&self, context: String) -> impl FnOnce(std::io::Error) -> SinkError + '_ {
        move |source| SinkError::Io {
            sink: self.name.clone(),
            context,
            source,
        }
    }

    /// Cuts the files back to the cursor's position: what lies beyond was written but never
    /// recorded, and is written again.
    fn restore_files(&mut self) -> Result<(), SinkError> {
        std::fs::create_dir_all(&self.dir)
            .map_err(self.io_error(format!("creating directory {}", self.dir.display())))?;
        let entries = std::fs::read_dir(&self.dir)
            .map_err(self.io_error(format!("listing {}", self.dir.display())))?;
        for entry in entries.flatten() {
            let path = entry.path();
            if matches!(self.index_of(&path), Some(i) if i > self.position.index) {
                std::fs::remove_file(&path)
                    .map_err(self.io_error(format!("removing {}", path.display())))?;
            }
        }
        let path = self.file_path(self.position.index);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(self.io_error(format!("opening {}", path.display())))?;
        let len = file
            .metadata()
            .map_err(self.io_error(format!("reading {}", path.display())))?
            .len();
        if len < self.position.offset {
            return Err(SinkError::Inconsistent {
                sink: self.name.clone(),
                message: format!(
                    "{} has {len} bytes but the sink recorded {} bytes written: the file was \
                     truncated or replaced outside tidemark, and envelopes are missing from it. \
                     Move the sink's directory aside and remove its cursor by giving the sink a \
                     new name to write every logged change again",
                    path.display(),
                    self.position.offset
                ),
            });
        }
        if len > self.position.offset {
            tracing::info!(
                sink = %self.name,
                file = %path.display(),
                bytes = len - self.position.offset,
                "removing envelopes written after the last recorded position"
            );
            file.set_len(self.position.offset)
                .and_then(|()| file.sync_all())
                .map_err(self.io_error(format!("truncating {}", path.display())))?;
        }
        self.file = Some(file);
        Ok(())
    }

    fn index_of(&self, path: &Path) -> Option<u32> {
        let name = path.file_name()?.to_str()?;
        let rest = name.strip_prefix(&self.name)?.strip_prefix('-')?;
        rest.strip_suffix(".jsonl")?.parse().ok()
    }

    /// Rebuilds the envelope order counters of a transaction the cursor stands inside.
    fn restore_transaction(&mut self, cursor: u64) -> Result<(), SinkError> {
        let Some((begin_seq, _)) = self.log.transaction_of(cursor)? else {
            return Ok(());
        };
        let mut seen = begin_seq - 1;
        while seen < cursor {
            let entries = self.log.read(seen, (cursor - seen) as usize)?;
            let Some(last) = entries.last() else { break };
            seen = last.seq;
            self.render(&entries, &mut std::io::sink(), now_ns())?;
        }
        Ok(())
    }

    fn render(
        &mut self,
        entries: &[LogEntry],
        out: &mut impl Write,
        now_ns: i64,
    ) -> Result<(), SinkError> {
        for entry in entries {
            match &entry.record {
                Record::Begin(begin) => {
                    self.transaction = Some((begin.clone(), TransactionOrder::default()));
                }
                Record::Change(change) => self.render_change(out, entry.seq, change, now_ns)?,
                Record::SnapshotRows(rows) => {
                    let relation = self.log.relation(rows.relation)?;
                    let changes =
                        rows.changes(&relation)
                            .map_err(|message| SinkError::Inconsistent {
                                sink: self.name.clone(),
                                message: format!("log record {}: {message}", entry.seq),
                            })?;
                    for change in &changes {
                        self.render_change(out, entry.seq, change, now_ns)?;
                    }
                }
                Record::Commit(_) => self.transaction = None,
                // Envelopes carry no schema (Debezium's with schemas disabled): the changes
                // after it show the new columns.
                Record::Schema(_) => {}
            }
        }
        Ok(())
    }

    /// Writes the envelopes of the change at log record `seq`.
    fn render_change(
        &mut self,
        out: &mut impl Write,
        seq: u64,
        change: &ChangeEvent,
        now_ns: i64,
    ) -> Result<(), SinkError> {
        let relation = self.log.relation(change.relation)?;
        let Some((begin, order)) = self.transaction.as_mut() else {
            return Err(SinkError::Inconsistent {
                sink: self.name.clone(),
                message: format!("log record {seq} is a change outside a transaction"),
            });
        };
        write_envelopes(out, &self.source, begin, &relation, change, order, now_ns).map_err(
            |source| SinkError::Io {
                sink: self.name.clone(),
                context: format!("writing {}", self.dir.display()),
                source,
            },
        )
    }

    /// Writes the batch's envelopes through a small buffer and makes them durable.
    fn write(&mut self, entries: &[LogEntry]) -> Result<(), SinkError> {
        if self.position.offset >= self.max_file_bytes {
            self.rotate()?;
        }
        let path = self.file_path(self.position.index);
        let Some(file) = self.file.take() else {
            return Err(SinkError::Inconsistent {
                sink: self.name.clone(),
                message: "applied before open".into(),
            });
        };
        let mut out = BufWriter::with_capacity(WRITE_BUFFER_BYTES, &file);
        let rendered = self.render(entries, &mut out, now_ns());
        let flushed = out.flush();
        drop(out);
        let written = flushed
            .and_then(|()| file.sync_data())
            .and_then(|()| file.metadata());
        self.file = Some(file);
        rendered?;
        self.position.offset = written
            .map_err(self.io_error(format!("writing {}", path.display())))?
            .len();
        Ok(())
    }

    fn rotate(&mut self) -> Result<(), SinkError> {
        let next = self.position.index + 1;
        let path = self.file_path(next);
        let file =
            File::create(&path).map_err(self.io_error(format!("creating {}", path.display())))?;
        // The new file's directory entry must survive a crash once the cursor names it.
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(self.io_error(format!("syncing {}", self.dir.display())))?;
        self.file = Some(file);
        self.position = FilePosition {
            index: next,
            offset: 0,
        };
        Ok(())
    }
}

impl Sink for JsonlSink {
    async fn open(&mut self) -> Result<u64, SinkError> {
        let cursor = self.log.cursor(&self.name)?.unwrap_or_default();
        if let Ok(position) = postcard::from_bytes::<FilePosition>(&cursor.state) {
            self.position = position;
        }
        tokio::task::block_in_place(|| {
            self.restore_files()?;
            self.restore_transaction(cursor.seq)
        })?;
        Ok(cursor.seq)
    }

    async fn apply(&mut self, entries: &[LogEntry]) -> Result<DeadLettered, SinkError> {
        let Some(last) = entries.last() else {
            return Ok(DeadLettered::new());
        };
        tokio::task::block_in_place(|| self.write(entries))?;
        let cursor = SinkCursor {
            seq: last.seq,
            state: postcard::to_allocvec(&self.position).unwrap_or_default(),
        };
        self.log.store_cursor(&self.name, &cursor).await?;
        Ok(DeadLettered::new())
    }
}

/// The processing time of the envelopes, in nanoseconds since the Unix epoch (an `i64` holds
/// them until 2262).
fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{
        ChangeEvent, Column, Op, Position, Relation, TxCommit, TxOrigin, Value, ValueType,
    };
    use crate::log::LogWriter;

    fn relation() -> Relation {
        Relation {
            oid: 7,
            schema: "public".into(),
            table: "t".into(),
            columns: vec![Column {
                name: "id".into(),
                type_oid: 23,
                type_modifier: -1,
                type_name: "integer".into(),
                value_type: ValueType::Int4,
                primary_key: true,
                replica_identity: true,
            }],
        }
    }

    fn append_tx(writer: &mut LogWriter, xid: u32, ids: std::ops::Range<i64>) {
        let (relation, _) = writer.relation(relation()).unwrap();
        let lsn = Position(u64::from(xid) * 1000);
        writer
            .append(&Record::Begin(TxBegin {
                origin: TxOrigin::Postgres { xid },
                commit_position: lsn,
                commit_ts: 0,
            }))
            .unwrap();
        for id in ids {
            writer
                .append(&Record::Change(ChangeEvent {
                    relation,
                    position: Position(lsn.0 - 500 + id as u64),
                    op: Op::Insert,
                    before: None,
                    after: Some(vec![Value::Int(id)]),
                }))
                .unwrap();
        }
        writer
            .append(&Record::Commit(TxCommit {
                commit_position: lsn,
                end_position: Position(lsn.0 + 8),
                commit_ts: 0,
            }))
            .unwrap();
    }

    fn sink(dir: &Path, log: &Arc<OffsetLog>, max_file_bytes: u64) -> JsonlSink {
        let config = JsonlSinkConfig {
            path: dir.join("events"),
            max_file_bytes,
        };
        let source = SourceInfo {
            connector: "postgresql",
            name: "test".into(),
            database: "db".into(),
        };
        JsonlSink::new("events", &config, Arc::clone(log), source)
    }

    fn lines(dir: &Path) -> Vec<serde_json::Value> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join("events"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        files
            .iter()
            .flat_map(|f| {
                std::fs::read_to_string(f)
                    .unwrap()
                    .lines()
                    .map(|l| serde_json::from_str(l).unwrap())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn lines_written_after_the_last_cursor_are_cut_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let log = OffsetLog::open(&dir.path().join("data")).unwrap();
        let mut writer = log.writer().unwrap();
        append_tx(&mut writer, 1, 0..3);
        log.flush().await.unwrap();
        let mut first = sink(dir.path(), &log, 1 << 20);
        assert_eq!(first.open().await.unwrap(), 0);
        first.apply(&log.read(0, 100).unwrap()).await.unwrap();
        assert_eq!(lines(dir.path()).len(), 3);

        // A crash between writing a batch and storing its cursor leaves unrecorded lines.
        append_tx(&mut writer, 2, 3..5);
        log.flush().await.unwrap();
        let mut file = OpenOptions::new()
            .append(true)
            .open(first.file_path(1))
            .unwrap();
        file.write_all(b"{\"partial\": tr").unwrap();
        drop(first);

        let mut second = sink(dir.path(), &log, 1 << 20);
        let applied = second.open().await.unwrap();
        assert_eq!(applied, 5);
        assert_eq!(
            lines(dir.path()).len(),
            3,
            "the unrecorded tail was not cut"
        );
        second
            .apply(&log.read(applied, 100).unwrap())
            .await
            .unwrap();
        let ids: Vec<i64> = lines(dir.path())
            .iter()
            .map(|e| e["after"]["id"].as_i64().unwrap())
            .collect();
        assert_eq!(ids, vec![0, 1, 2, 3, 4]);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn resuming_inside_a_transaction_continues_its_order() {
        let dir = tempfile::tempdir().unwrap();
        let log = OffsetLog::open(&dir.path().join("data")).unwrap();
        let mut writer = log.writer().unwrap();
        append_tx(&mut writer, 1, 0..4);
        log.flush().await.unwrap();
        let entries = log.read(0, 100).unwrap();
        let mut first = sink(dir.path(), &log, 1 << 20);
        first.open().await.unwrap();
        first.apply(&entries[..3]).await.unwrap();
        drop(first);
        let mut second = sink(dir.path(), &log, 1 << 20);
        assert_eq!(second.open().await.unwrap(), 3);
        second.apply(&entries[3..]).await.unwrap();
        let orders: Vec<u64> = lines(dir.path())
            .iter()
            .map(|e| e["transaction"]["total_order"].as_u64().unwrap())
            .collect();
        assert_eq!(orders, vec![1, 2, 3, 4]);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn files_rotate_and_later_unrecorded_files_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let log = OffsetLog::open(&dir.path().join("data")).unwrap();
        let mut writer = log.writer().unwrap();
        for xid in 1..=3 {
            append_tx(&mut writer, xid, 0..2);
        }
        log.flush().await.unwrap();
        let mut sink_a = sink(dir.path(), &log, 10);
        sink_a.open().await.unwrap();
        for tx in log.read(0, 100).unwrap().chunks(4) {
            sink_a.apply(tx).await.unwrap();
        }
        assert!(
            sink_a.file_path(3).exists(),
            "one file per batch past 10 bytes"
        );
        // A file created by a rotation whose cursor was never stored.
        std::fs::write(sink_a.file_path(4), "{}\n").unwrap();
        drop(sink_a);
        let mut sink_b = sink(dir.path(), &log, 10);
        sink_b.open().await.unwrap();
        assert!(!sink_b.file_path(4).exists());
        assert_eq!(lines(dir.path()).len(), 6);
    }
}
