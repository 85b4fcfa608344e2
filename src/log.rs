//! The durable offset log: every captured transaction as Begin, its changes, Commit, under
//! consecutive sequence numbers. The records are in append-only segment files (`segments`);
//! sled keeps what is small and changes in place: sink cursors, relations, metadata.
//!
//! The invariant it keeps: a position is *durable* only after the records up to it (and sled,
//! for the relations they name) are fsynced, and only durable, committed transactions are
//! visible to readers or may be confirmed to the source. Changes are written as they arrive,
//! so a transaction is never held whole in memory; a crash in the middle of one leaves a tail
//! after the last Commit that `open` removes. Each sink has a cursor; records below the slowest cursor's transaction are
//! trimmed (their segment files removed once wholly below it).
//!
//! Changes the server streams before their transaction commits (pgoutput v2) wait in a file
//! per transaction (`spill`) and move into the log at the commit: sinks see transactions whole
//! and in commit order, and a crash or a reconnection discards them (the server sends an
//! unfinished transaction again).

mod segments;
pub mod spill;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};

use self::segments::{Kind, Location, SegmentError, SegmentReader, SegmentWriter, Segments};
use self::spill::{Spill, SpillReader};

use crate::event::{ChangeEvent, Position, Record, Relation, RelationId, TxBegin};

/// Bumped whenever the on-disk encoding changes; `open` refuses other versions. Version 2 moved
/// the records from sled into segment files; version 3 gave each transaction its source's
/// origin (`TxOrigin`) in place of PostgreSQL's xid.
const FORMAT_VERSION: u64 = 3;
const FORMAT_KEY: &[u8] = b"format_version";
const ID_KEY: &[u8] = b"log_id";
const SOURCE_KEY: &[u8] = b"source_identity";
const SNAPSHOT_KEY: &[u8] = b"snapshot";
const CONFIRMED_KEY: &[u8] = b"confirmed_without_commit";
const TABLE_SNAPSHOTS_KEY: &[u8] = b"table_snapshots";
/// Buffer of each streamed transaction's file: a streamed block is written in few system calls.
const STREAM_BUFFER_BYTES: usize = 64 * 1024;
/// Keeps sled's page cache from claiming its 1 GiB default (DESIGN, bounded memory).
const CACHE_CAPACITY_BYTES: u64 = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error(
        "{path} is in use by another tidemark process; stop the other agent or give this one \
         its own agent.data_dir"
    )]
    Locked { path: PathBuf },
    #[error("cannot use data_dir {path}: {source}; check that it exists and is writable")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot open the offset log in {path}: {source}; if the directory is damaged, move it \
         aside and start again with a fresh data_dir (the affected tables must be re-snapshotted)"
    )]
    Open { path: PathBuf, source: sled::Error },
    #[error(
        "the offset log in {path} is damaged ({reason}); tidemark stops without using it. \
         Move agent.data_dir aside (keep it for inspection) and start again: with snapshot = \
         \"initial\" the agent drops its slot and snapshots again, and the sinks' tables are \
         replaced"
    )]
    Damaged { path: PathBuf, reason: String },
    #[error(
        "the offset log in {path} has format version {found}, this tidemark writes version \
         {FORMAT_VERSION}; use the tidemark release that wrote it, or start with a fresh data_dir"
    )]
    Format { path: PathBuf, found: u64 },
    #[error("offset log I/O: {0}")]
    Io(#[from] sled::Error),
    #[error(transparent)]
    Records(SegmentError),
    #[error(
        "offset log record {seq} is corrupt ({reason}); the log cannot be trusted: move \
         agent.data_dir aside and re-snapshot"
    )]
    Corrupt { seq: u64, reason: String },
    #[error("relation {0:?} is missing from the offset log")]
    MissingRelation(RelationId),
    #[error(transparent)]
    Spill(#[from] spill::SpillError),
    #[error("offset log background task failed: {0}")]
    Background(String),
}

impl From<SegmentError> for LogError {
    fn from(error: SegmentError) -> LogError {
        match error {
            SegmentError::Damaged { path, reason } => LogError::Damaged { path, reason },
            io => LogError::Records(io),
        }
    }
}

/// The position of the last committed transaction that is durable in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Durable {
    /// Sequence number of its Commit record; 0 when the log holds nothing yet.
    pub seq: u64,
    pub commit_position: Position,
    /// The source position that may be confirmed.
    pub end_position: Position,
}

/// Where a sink stands in the log, plus whatever the sink needs to resume (the JSONL sink keeps
/// its file position here).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SinkCursor {
    /// Sequence number of the last record the sink has applied.
    pub seq: u64,
    pub state: Vec<u8>,
}

/// Where the initial snapshot stands, kept with the log: a snapshot that is still `Running`
/// when the agent starts was cut short, and its rows may have reached the sinks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotState {
    Running,
    Done,
}

/// Which captured tables the log holds the rows of (from the initial snapshot or an
/// incremental one), and how far the incremental snapshot of the next one has come.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableSnapshots {
    /// `schema.table` of each table snapshotted.
    pub done: BTreeSet<String>,
    /// The table being snapshotted incrementally, and the primary key (each column's text) of
    /// the last row logged (None: no chunk yet).
    pub in_progress: Option<(String, Option<Vec<String>>)>,
}

/// One record read back from the log.
#[derive(Debug, Clone, PartialEq)]
pub struct LogEntry {
    pub seq: u64,
    pub record: Record,
}

pub struct OffsetLog {
    /// Tells this log from any other: a sink's checkpoint that names another log (the
    /// data_dir was replaced) does not count here.
    id: u64,
    path: PathBuf,
    /// Held for the life of the log: one agent per data_dir.
    _lock: std::fs::File,
    db: sled::Db,
    /// The segment files of the records; locked only to look up or note a place, never
    /// across I/O.
    records: Mutex<Segments>,
    records_dir: PathBuf,
    /// sled holds something the next flush must make durable (the snapshot list).
    meta_dirty: AtomicBool,
    relations: sled::Tree,
    /// The source's own description of each table's columns, keyed by table and the
    /// position it holds from (see [`OffsetLog::set_table_shape`]).
    table_shapes: sled::Tree,
    cursors: sled::Tree,
    meta: sled::Tree,
    /// Where streamed transactions wait for their commit.
    spill_dir: PathBuf,
    /// The last Commit appended (durable or not), published by the writer for the flusher.
    appended: watch::Sender<Durable>,
    durable: watch::Sender<Durable>,
    relation_cache: Mutex<HashMap<RelationId, Arc<Relation>>>,
    /// Capture paused on the log's size asks the trimmer to run now, not at its next round.
    trim_wanted: Notify,
}

impl OffsetLog {
    /// Opens (or creates) the log under `dir`, dropping the uncommitted tail a crash left.
    pub fn open(dir: &Path) -> Result<Arc<OffsetLog>, LogError> {
        let path = dir.join("log");
        let lock = lock_data_dir(dir)?;
        let db = open_sled(&path)?;
        let meta = db.open_tree("meta")?;
        match meta.get(FORMAT_KEY)? {
            Some(v) => {
                let found = decode_u64(&v).unwrap_or(u64::MAX);
                if found != FORMAT_VERSION {
                    return Err(LogError::Format { path, found });
                }
            }
            None => {
                meta.insert(FORMAT_KEY, &FORMAT_VERSION.to_be_bytes())?;
            }
        }
        let id = match meta.get(ID_KEY)?.and_then(|v| decode_u64(&v)) {
            Some(id) => id,
            None => {
                let id = new_log_id();
                meta.insert(ID_KEY, &id.to_be_bytes())?;
                id
            }
        };
        db.flush()?;
        let records_dir = dir.join("records");
        let opened = Segments::open(&records_dir)?;
        let durable = match opened.last_commit {
            Some((seq, payload)) => match decode(seq, &payload)? {
                Record::Commit(commit) => Durable {
                    seq,
                    commit_position: commit.commit_position,
                    end_position: commit.end_position,
                },
                _ => {
                    return Err(LogError::Corrupt {
                        seq,
                        reason: "a record marked Commit holds something else".into(),
                    })
                }
            },
            None => Durable::default(),
        };
        Ok(Arc::new(OffsetLog {
            id,
            path,
            _lock: lock,
            relations: db.open_tree("relations")?,
            table_shapes: db.open_tree("table_shapes")?,
            cursors: db.open_tree("cursors")?,
            meta,
            records: Mutex::new(opened.segments),
            records_dir,
            meta_dirty: AtomicBool::new(false),
            spill_dir: dir.join("streams"),
            db,
            appended: watch::channel(durable).0,
            durable: watch::channel(durable).0,
            relation_cache: Mutex::new(HashMap::new()),
            trim_wanted: Notify::new(),
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// The writer side. There is one writer: the source task.
    pub fn writer(self: &Arc<Self>) -> Result<LogWriter, LogError> {
        let next_seq = self.durable().seq + 1;
        let (file, committed_end) = {
            let mut records = lock(&self.records);
            let end = records.end().unwrap_or(Location {
                segment: next_seq,
                offset: 0,
            });
            (SegmentWriter::open(&mut records, end)?, end)
        };
        Ok(LogWriter {
            log: Arc::clone(self),
            next_seq,
            file,
            committed_end,
            relations: HashMap::new(),
            open_begin: None,
            spill: Spill::open(&self.spill_dir, STREAM_BUFFER_BYTES)?,
            moving: None,
        })
    }

    pub fn durable(&self) -> Durable {
        *self.durable.borrow()
    }

    pub fn subscribe_durable(&self) -> watch::Receiver<Durable> {
        self.durable.subscribe()
    }

    /// What the log was captured from, as the source described it (opaque to the log), so a
    /// restart can tell it still follows the same source.
    pub fn source_identity(&self) -> Result<Option<Vec<u8>>, LogError> {
        Ok(self.meta.get(SOURCE_KEY)?.map(|v| v.to_vec()))
    }

    pub async fn set_source_identity(&self, identity: &[u8]) -> Result<(), LogError> {
        self.meta.insert(SOURCE_KEY, identity)?;
        self.db.flush_async().await?;
        Ok(())
    }

    /// Where the initial snapshot stands; None before one started.
    pub fn snapshot_state(&self) -> Result<Option<SnapshotState>, LogError> {
        self.meta
            .get(SNAPSHOT_KEY)?
            .map(|v| decode(0, &v))
            .transpose()
    }

    pub fn table_snapshots(&self) -> Result<Option<TableSnapshots>, LogError> {
        self.meta
            .get(TABLE_SNAPSHOTS_KEY)?
            .map(|v| decode(0, &v))
            .transpose()
    }

    /// Records which tables are snapshotted. Not flushed here: it becomes durable with the
    /// next flush, with (or after) the transaction that logged the rows it counts.
    pub fn set_table_snapshots(&self, snapshots: &TableSnapshots) -> Result<(), LogError> {
        self.meta.insert(TABLE_SNAPSHOTS_KEY, encode(snapshots))?;
        self.meta_dirty.store(true, Ordering::Release);
        Ok(())
    }

    /// Records (durably) where the initial snapshot stands.
    pub async fn set_snapshot_state(&self, state: SnapshotState) -> Result<(), LogError> {
        self.meta.insert(SNAPSHOT_KEY, encode(&state))?;
        self.db.flush_async().await?;
        Ok(())
    }

    /// The furthest position the source confirmed to the server past the log's last commit
    /// (a new slot's start, an idle stream's keepalive), if any.
    pub fn confirmed_without_commit(&self) -> Result<Position, LogError> {
        Ok(self
            .meta
            .get(CONFIRMED_KEY)?
            .map(|v| decode::<Position>(0, &v))
            .transpose()?
            .unwrap_or_default())
    }

    /// Records (durably) a position the source is about to confirm past the log's last
    /// commit, so that a slot confirmed further than the log reaches shows the log lost
    /// records.
    pub async fn set_confirmed_without_commit(&self, lsn: Position) -> Result<(), LogError> {
        if lsn <= self.confirmed_without_commit()? {
            return Ok(());
        }
        self.meta.insert(CONFIRMED_KEY, encode(&lsn))?;
        self.db.flush_async().await?;
        Ok(())
    }

    /// Makes every Commit appended so far durable and visible. Group commit: one flush covers
    /// every transaction appended before it started. Runs until the writer is dropped.
    pub async fn run_flusher(&self) -> Result<(), LogError> {
        let mut appended = self.appended.subscribe();
        loop {
            let target = *appended.borrow_and_update();
            if target.seq > self.durable().seq {
                self.sync().await?;
                self.durable.send_replace(target);
                continue;
            }
            if appended.changed().await.is_err() {
                return Ok(());
            }
        }
    }

    /// Flushes everything appended and publishes it; used at shutdown.
    pub async fn flush(&self) -> Result<Durable, LogError> {
        let target = *self.appended.borrow();
        self.sync().await?;
        if target.seq > self.durable().seq {
            self.durable.send_replace(target);
        }
        Ok(self.durable())
    }

    /// Makes everything appended before the call durable: the segment being appended to
    /// (full ones were fsynced when closed) and sled if it holds something new.
    async fn sync(&self) -> Result<(), LogError> {
        let active = lock(&self.records).active();
        if let Some(file) = active {
            let dir = self.records_dir.clone();
            tokio::task::spawn_blocking(move || file.sync_data())
                .await
                .map_err(|e| LogError::Background(e.to_string()))?
                .map_err(|source| LogError::Records(SegmentError::Io { path: dir, source }))?;
        }
        if self.meta_dirty.swap(false, Ordering::AcqRel) {
            self.db.flush_async().await?;
        }
        Ok(())
    }

    /// Durable records after `after`, in log order, up to `max` records or row changes
    /// (a record of snapshot rows counts as its rows; at least one record).
    pub fn read(&self, after: u64, max: usize) -> Result<Vec<LogEntry>, LogError> {
        let limit = self.durable().seq;
        let Some(mut reader) = self.reader_at((after + 1).max(self.floor()), limit)? else {
            return Ok(Vec::new());
        };
        let wanted = (limit - reader.position().0 + 1).min(max as u64);
        let mut out = Vec::with_capacity(wanted as usize);
        let mut weight = 0;
        while (out.len() as u64) < wanted && weight < max {
            let Some(frame) = reader.next()? else {
                return Err(self.missing(reader.position().0));
            };
            let record: Record = decode(frame.seq, &frame.payload)?;
            weight += record.changes().max(1);
            out.push(LogEntry {
                seq: frame.seq,
                record,
            });
        }
        let (next, at) = reader.position();
        lock(&self.records).remember(next, at);
        Ok(out)
    }

    /// A reader whose next record is `seq`, if `seq` is durable (at most `limit`).
    fn reader_at(&self, seq: u64, limit: u64) -> Result<Option<SegmentReader>, LogError> {
        if seq > limit || limit == 0 {
            return Ok(None);
        }
        let (from, at) = lock(&self.records).nearest(seq);
        let mut reader = SegmentReader::at(&self.records_dir, from, at)?;
        while reader.position().0 < seq {
            if reader.skip()?.is_none() {
                return Err(self.missing(reader.position().0));
            }
        }
        Ok(Some(reader))
    }

    fn missing(&self, seq: u64) -> LogError {
        LogError::Corrupt {
            seq,
            reason: format!(
                "the record is missing from {} although the log reaches {}",
                self.records_dir.display(),
                self.durable().seq
            ),
        }
    }

    /// The oldest record readers see: records below it are trimmed.
    fn floor(&self) -> u64 {
        lock(&self.records).floor()
    }

    /// Bytes of records the log holds from its oldest on (what the sinks have not all
    /// applied plus what the trimmer has not removed yet), durable or not.
    pub fn held_bytes(&self) -> Result<u64, LogError> {
        Ok(lock(&self.records).held_bytes())
    }

    /// Waits until the durable position passes `after`.
    pub async fn wait_beyond(&self, after: u64) {
        let mut rx = self.durable.subscribe();
        let _ = rx.wait_for(|d| d.seq > after).await;
    }

    /// The Begin of the transaction that contains `seq`, so a reader resuming in the middle
    /// of a transaction knows which transaction it is in. `None` between transactions.
    /// Only durable records count: past the durable position this is `None`.
    pub fn transaction_of(&self, seq: u64) -> Result<Option<(u64, TxBegin)>, LogError> {
        let limit = self.durable().seq;
        if seq < self.floor() {
            return Ok(None);
        }
        let Some(mut reader) = self.reader_at(seq, limit)? else {
            return Ok(None);
        };
        let Some((begin_seq, _)) = reader.skip()? else {
            return Err(self.missing(seq));
        };
        if begin_seq < self.floor() {
            return Ok(None);
        }
        let Some(frame) = self
            .reader_at(begin_seq, limit)?
            .map(|mut r| r.next())
            .transpose()?
            .flatten()
        else {
            return Err(self.missing(begin_seq));
        };
        match decode(begin_seq, &frame.payload)? {
            Record::Begin(begin) if frame.kind == Kind::Begin => Ok(Some((begin_seq, begin))),
            _ => Err(LogError::Corrupt {
                seq: begin_seq,
                reason: format!("record {seq} names it as its transaction's Begin, it is not"),
            }),
        }
    }

    /// The sequence number of the Commit of the durable transaction whose Begin is
    /// `begin_seq`, found without decoding the records between.
    pub fn commit_of(&self, begin_seq: u64) -> Result<Option<u64>, LogError> {
        let limit = self.durable().seq;
        let Some(mut reader) = self.reader_at(begin_seq, limit)? else {
            return Ok(None);
        };
        loop {
            let (seq, _) = reader.position();
            if seq > limit {
                return Ok(None);
            }
            match reader.skip()? {
                Some((_, Kind::Commit)) => return Ok(Some(seq)),
                Some(_) => {}
                None => return Err(self.missing(seq)),
            }
        }
    }

    pub fn relation(&self, id: RelationId) -> Result<Arc<Relation>, LogError> {
        if let Some(r) = lock(&self.relation_cache).get(&id) {
            return Ok(Arc::clone(r));
        }
        let bytes = self
            .relations
            .get(id.0.to_be_bytes())?
            .ok_or(LogError::MissingRelation(id))?;
        let relation = Arc::new(decode::<Relation>(0, &bytes)?);
        lock(&self.relation_cache).insert(id, Arc::clone(&relation));
        Ok(relation)
    }

    /// The description the log stored last for the source table `oid`, if any: what a new
    /// description of the table is compared with after a restart.
    pub fn latest_relation(
        &self,
        oid: u32,
    ) -> Result<Option<(RelationId, Arc<Relation>)>, LogError> {
        for entry in self.relations.iter().rev() {
            let (key, bytes) = entry?;
            let relation = decode::<Relation>(0, &bytes)?;
            if relation.oid == oid {
                let id = RelationId(decode_u64(&key).unwrap_or_default());
                return Ok(Some((id, Arc::new(relation))));
            }
        }
        Ok(None)
    }

    /// Stores the source's description of table `oid` (opaque to the log: the source encodes
    /// it) as it stands from `lsn` on, durable before it returns (as [`LogWriter::relation`]).
    /// Kept per position, so that a transaction the source sends again after a restart finds
    /// the description before it.
    pub fn set_table_shape(&self, oid: u32, lsn: Position, shape: &[u8]) -> Result<(), LogError> {
        self.table_shapes.insert(shape_key(oid, lsn), shape)?;
        self.db.flush()?;
        Ok(())
    }

    /// The description of table `oid` that holds just before `lsn`, if one was stored.
    pub fn table_shape_before(&self, oid: u32, lsn: Position) -> Result<Option<Vec<u8>>, LogError> {
        let start = shape_key(oid, Position(0));
        let end = shape_key(oid, lsn);
        Ok(self
            .table_shapes
            .range(start..end)
            .next_back()
            .transpose()?
            .map(|(_, shape)| shape.to_vec()))
    }

    pub fn cursor(&self, sink: &str) -> Result<Option<SinkCursor>, LogError> {
        self.cursors
            .get(sink.as_bytes())?
            .map(|v| decode(0, &v))
            .transpose()
    }

    /// Stores a sink's cursor durably.
    pub async fn store_cursor(&self, sink: &str, cursor: &SinkCursor) -> Result<(), LogError> {
        self.note_cursor(sink, cursor)?;
        self.db.flush_async().await?;
        Ok(())
    }

    /// Stores a sink's cursor without waiting for it to be durable (sled writes it within
    /// half a second): for a sink that resumes from its own checkpoint, the cursor only
    /// tells the trimmer what it may remove, and one lost in a crash only keeps more.
    pub fn note_cursor(&self, sink: &str, cursor: &SinkCursor) -> Result<(), LogError> {
        self.cursors.insert(sink.as_bytes(), encode(cursor))?;
        Ok(())
    }

    /// Trims records every listed sink has applied, keeping the transaction the slowest sink
    /// is in and the last Commit (which anchors the log's position): readers no longer see
    /// them, and segment files wholly below are removed. Returns how many records were
    /// trimmed.
    pub fn trim(&self, sinks: &[&str]) -> Result<u64, LogError> {
        let durable = self.durable().seq;
        let mut slowest = durable;
        for sink in sinks {
            slowest = slowest.min(self.cursor(sink)?.map_or(0, |c| c.seq));
        }
        let keep_from = match self.transaction_of(slowest + 1)? {
            Some((begin_seq, _)) => begin_seq,
            None => slowest + 1,
        }
        .min(durable);
        let floor = self.floor();
        if keep_from <= floor {
            return Ok(0);
        }
        let Some(reader) = self.reader_at(keep_from, durable)? else {
            return Ok(0);
        };
        let (_, at) = reader.position();
        drop(reader);
        let below = lock(&self.records).raise_floor(keep_from, at);
        for path in below {
            std::fs::remove_file(&path)
                .map_err(|source| LogError::Records(SegmentError::Io { path, source }))?;
        }
        Ok(keep_from - floor)
    }

    /// Asks the trimmer to trim now: capture is paused until the log shrinks.
    pub fn want_trim(&self) {
        self.trim_wanted.notify_one();
    }

    /// Returns when a trim is wanted (see [`OffsetLog::want_trim`]).
    pub async fn trim_wanted(&self) {
        self.trim_wanted.notified().await;
    }

    /// Bytes the log occupies on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0) + lock(&self.records).bytes()
    }
}

/// Sees each change of a streamed transaction as it enters the log.
pub type InspectChange<'a> = &'a mut dyn FnMut(&ChangeEvent) -> Result<(), LogError>;

/// Appends records. Owned by the source task; its commits become durable through the flusher.
pub struct LogWriter {
    log: Arc<OffsetLog>,
    next_seq: u64,
    file: SegmentWriter,
    /// Where the last Commit appended ends: what discarding an open transaction goes back to.
    committed_end: Location,
    relations: HashMap<u32, (RelationId, Arc<Relation>)>,
    /// Sequence of the open transaction's Begin.
    open_begin: Option<u64>,
    /// Changes of streamed transactions that have not committed yet.
    spill: Spill,
    /// The committed streamed transaction being appended, and where its reading stands.
    moving: Option<(u32, SpillReader)>,
}

impl LogWriter {
    /// The last transaction appended (durable or about to be); a source re-sending anything at
    /// or below its commit LSN is sending what the log already holds.
    pub fn last_appended(&self) -> Durable {
        *self.log.appended.borrow()
    }

    pub fn append(&mut self, record: &Record) -> Result<u64, LogError> {
        let kind = match record {
            Record::Begin(_) => Kind::Begin,
            Record::Change(_) | Record::SnapshotRows(_) | Record::Schema(_) => Kind::Change,
            Record::Commit(_) => Kind::Commit,
        };
        let seq = self.insert(kind, &encode(record))?;
        match record {
            Record::Begin(_) => self.open_begin = Some(seq),
            Record::Commit(_) => self.open_begin = None,
            Record::Change(_) | Record::SnapshotRows(_) | Record::Schema(_) => {}
        }
        if let Record::Commit(commit) = record {
            self.file.write_out(&mut lock(&self.log.records))?;
            self.committed_end = self.file.end();
            self.log.appended.send_replace(Durable {
                seq,
                commit_position: commit.commit_position,
                end_position: commit.end_position,
            });
        }
        Ok(seq)
    }

    /// Stores an encoded record under the next sequence number, and returns that.
    fn insert(&mut self, kind: Kind, record: &[u8]) -> Result<u64, LogError> {
        let seq = self.next_seq;
        if self.file.full() {
            self.file.start_segment(&mut lock(&self.log.records), seq)?;
        }
        let begin = match kind {
            Kind::Begin => seq,
            Kind::Change | Kind::Commit => self.open_begin.unwrap_or(seq),
        };
        let at = self.file.append(seq, begin, kind, record)?;
        if Segments::indexes(seq) {
            lock(&self.log.records).index(seq, at);
        }
        self.next_seq += 1;
        Ok(seq)
    }

    /// Removes what the log holds of transactions whose commit has not come (the one being
    /// appended, and the streamed ones): a source that lost its connection receives them again.
    pub fn discard_uncommitted(&mut self) -> Result<(), LogError> {
        self.moving = None;
        self.spill.discard_all()?;
        let Some(begin) = self.open_begin.take() else {
            return Ok(());
        };
        self.file
            .truncate(&mut lock(&self.log.records), begin, self.committed_end)?;
        self.next_seq = begin;
        Ok(())
    }

    /// Holds a change (a `Record::Change`) that the server streamed before transaction `xid`
    /// committed; `subxid` is the subtransaction it belongs to (`xid` itself for none).
    pub fn append_streamed(
        &mut self,
        xid: u32,
        subxid: u32,
        change: &Record,
    ) -> Result<(), LogError> {
        Ok(self.spill.append(xid, subxid, &encode(change))?)
    }

    /// Appends up to `max` of the changes streamed for transaction `xid`, in arrival order,
    /// leaving out those of `aborted` subtransactions, and forgets them; `inspect` (when given)
    /// sees each change appended. Reads the transaction one change at a time, never holding
    /// it; the next call goes on where this one stopped. Returns how many changes were
    /// appended and whether the transaction's changes are all in the log.
    pub fn append_streamed_transaction(
        &mut self,
        xid: u32,
        aborted: &HashSet<u32>,
        mut inspect: Option<InspectChange<'_>>,
        max: usize,
    ) -> Result<(u64, bool), LogError> {
        let mut reader = match self.moving.take() {
            Some((moving, reader)) if moving == xid => reader,
            _ => self.spill.read(xid)?,
        };
        let mut appended = 0;
        for _ in 0..max {
            let Some((subxid, record)) = reader.next_record()? else {
                return Ok((appended, true));
            };
            if aborted.contains(&subxid) {
                continue;
            }
            if let Some(inspect) = inspect.as_mut() {
                if let Record::Change(change) = decode(self.next_seq, record)? {
                    inspect(&change)?;
                }
            }
            self.insert(Kind::Change, record)?;
            appended += 1;
        }
        self.moving = Some((xid, reader));
        Ok((appended, false))
    }

    /// Forgets the changes streamed for transaction `xid` (it aborted, or the log holds it).
    pub fn discard_streamed(&mut self, xid: u32) -> Result<(), LogError> {
        Ok(self.spill.discard(xid)?)
    }

    /// Stores a relation description (once per distinct description) and returns its id.
    /// Durable before it returns: the records that name it reach the segment file, and so
    /// survive a killed process, as soon as their transaction commits, before any flush.
    pub fn relation(
        &mut self,
        relation: Relation,
    ) -> Result<(RelationId, Arc<Relation>), LogError> {
        if let Some((id, known)) = self.relations.get(&relation.oid) {
            if **known == relation {
                return Ok((*id, Arc::clone(known)));
            }
        }
        let id = RelationId(self.log.db.generate_id()?);
        self.log
            .relations
            .insert(id.0.to_be_bytes(), encode(&relation))?;
        self.log.db.flush()?;
        let relation = Arc::new(relation);
        self.relations
            .insert(relation.oid, (id, Arc::clone(&relation)));
        Ok((id, relation))
    }

    pub fn log(&self) -> &Arc<OffsetLog> {
        &self.log
    }
}

/// Big-endian, so that sled's byte order is (table, position) order.
fn shape_key(oid: u32, lsn: Position) -> [u8; 12] {
    let mut key = [0; 12];
    key[..4].copy_from_slice(&oid.to_be_bytes());
    key[4..].copy_from_slice(&lsn.0.to_be_bytes());
    key
}

/// A log id that no other log has: the clock's nanoseconds and the process id, mixed.
fn new_log_id() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    (nanos ^ (u64::from(std::process::id()) << 48)) & (i64::MAX as u64)
}

/// Opens sled's database. sled panics on some damaged files instead of returning an error;
/// that panic becomes `LogError::Damaged` (and its message is not printed as a crash).
fn open_sled(path: &Path) -> Result<sled::Db, LogError> {
    let open = || {
        sled::Config::new()
            .path(path)
            .cache_capacity(CACHE_CAPACITY_BYTES)
            .mode(sled::Mode::HighThroughput)
            .open()
    };
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let opened = std::panic::catch_unwind(open);
    std::panic::set_hook(hook);
    match opened {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(source)) => Err(LogError::Open {
            path: path.to_path_buf(),
            source,
        }),
        Err(panic) => Err(LogError::Damaged {
            path: path.to_path_buf(),
            reason: panic
                .downcast_ref::<&str>()
                .map(ToString::to_string)
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "the storage engine cannot read it".to_string()),
        }),
    }
}

/// Takes the data_dir's lock, held while the returned file lives: one process at a time uses
/// a data_dir (an agent, or a command that changes its files).
pub fn lock_data_dir(dir: &Path) -> Result<std::fs::File, LogError> {
    let path = dir.join("lock");
    let data_dir_error = |source| LogError::DataDir {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(data_dir_error)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(data_dir_error)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(LogError::Locked {
            path: dir.to_path_buf(),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(data_dir_error(e)),
    }
}

fn decode_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serialising plain data into a Vec cannot fail.
    postcard::to_allocvec(value).unwrap_or_default()
}

fn decode<T: for<'de> Deserialize<'de>>(seq: u64, bytes: &[u8]) -> Result<T, LogError> {
    postcard::from_bytes(bytes).map_err(|e| LogError::Corrupt {
        seq,
        reason: e.to_string(),
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{ChangeEvent, Op, TxCommit, TxOrigin, Value};

    /// Opens the log in `dir`, waiting while sled's background threads still hold the file
    /// lock of a handle the test dropped: sled lets go of its files on its own threads a
    /// moment after the last handle is dropped, so an immediate reopen in the same process
    /// can find the lock taken (the agent opens its log once per process).
    fn open(dir: &Path) -> Arc<OffsetLog> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match OffsetLog::open(dir) {
                Err(LogError::Open { source, .. })
                    if source.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                opened => return opened.unwrap(),
            }
        }
    }

    fn begin(lsn: u64) -> Record {
        Record::Begin(TxBegin {
            origin: TxOrigin::Postgres { xid: lsn as u32 },
            commit_position: Position(lsn),
            commit_ts: 0,
        })
    }

    fn change(lsn: u64) -> Record {
        Record::Change(ChangeEvent {
            relation: RelationId(1),
            position: Position(lsn),
            op: Op::Insert,
            before: None,
            after: Some(vec![
                Value::Int(lsn as i64),
                Value::UnchangedToast,
                Value::Null,
            ]),
        })
    }

    fn commit(lsn: u64) -> Record {
        Record::Commit(TxCommit {
            commit_position: Position(lsn),
            end_position: Position(lsn + 8),
            commit_ts: 0,
        })
    }

    /// Every record readers see, in log order.
    fn durable_records(log: &OffsetLog) -> Vec<Record> {
        log.read(0, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|e| e.record)
            .collect()
    }

    fn append_tx(writer: &mut LogWriter, lsn: u64, changes: u64) {
        writer.append(&begin(lsn)).unwrap();
        for i in 0..changes {
            writer.append(&change(lsn - changes + i)).unwrap();
        }
        writer.append(&commit(lsn)).unwrap();
    }

    #[tokio::test]
    async fn records_are_invisible_until_flushed_and_committed() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        let mut writer = log.writer().unwrap();
        writer.append(&begin(100)).unwrap();
        writer.append(&change(90)).unwrap();
        log.flush().await.unwrap();
        assert!(
            log.read(0, 10).unwrap().is_empty(),
            "open transaction visible"
        );
        writer.append(&commit(100)).unwrap();
        assert!(
            log.read(0, 10).unwrap().is_empty(),
            "unflushed commit visible"
        );
        let durable = log.flush().await.unwrap();
        assert_eq!(durable.end_position, Position(108));
        let read = log.read(0, 10).unwrap();
        assert_eq!(read.len(), 3);
        assert_eq!(read[1].record, change(90));
        assert_eq!(
            read.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
    }

    /// A read stops at `max` row changes, a record of snapshot rows counting as its rows,
    /// and returns one record however many rows it holds.
    #[tokio::test]
    async fn a_read_counts_the_rows_of_snapshot_records() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        let mut writer = log.writer().unwrap();
        let rows = |n: u32| {
            Record::SnapshotRows(crate::event::SnapshotRows {
                relation: RelationId(1),
                position: Position(90),
                rows: n,
                text: bytes::Bytes::from("1\tx\n".repeat(n as usize)),
            })
        };
        writer.append(&begin(100)).unwrap();
        for n in [600, 600, 600] {
            writer.append(&rows(n)).unwrap();
        }
        writer.append(&commit(100)).unwrap();
        log.flush().await.unwrap();
        let seqs = |after, max| -> Vec<u64> {
            log.read(after, max)
                .unwrap()
                .iter()
                .map(|e| e.seq)
                .collect()
        };
        // Begin (one) and the first block (600) reach 1,000 only with the second block.
        assert_eq!(seqs(0, 1000), [1, 2, 3]);
        assert_eq!(seqs(0, 601), [1, 2]);
        assert_eq!(
            seqs(1, 10),
            [2],
            "a block larger than the batch is read alone"
        );
        assert_eq!(seqs(3, 10_000), [4, 5]);
        assert_eq!(log.read(1, 10).unwrap()[0].record, rows(600));
    }

    #[tokio::test]
    async fn reopening_drops_the_uncommitted_tail() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = open(dir.path());
            let mut writer = log.writer().unwrap();
            append_tx(&mut writer, 100, 2);
            writer.append(&begin(200)).unwrap();
            writer.append(&change(150)).unwrap();
            log.flush().await.unwrap();
        }
        let log = open(dir.path());
        assert_eq!(log.durable().seq, 4);
        assert_eq!(log.durable().commit_position, Position(100));
        let mut writer = log.writer().unwrap();
        assert_eq!(writer.append(&begin(300)).unwrap(), 5);
    }

    #[tokio::test]
    async fn a_discarded_open_transaction_leaves_no_record() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        let mut writer = log.writer().unwrap();
        append_tx(&mut writer, 100, 2);
        writer.append(&begin(200)).unwrap();
        writer.append(&change(150)).unwrap();
        writer.discard_uncommitted().unwrap();
        append_tx(&mut writer, 200, 1);
        log.flush().await.unwrap();
        let records = durable_records(&log);
        assert_eq!(records.len(), 7);
        assert!(matches!(&records[4], Record::Begin(b) if b.commit_position == Position(200)));
        assert_eq!(log.transaction_of(6).unwrap().map(|(seq, _)| seq), Some(5));
    }

    #[tokio::test]
    async fn flusher_publishes_group_commits() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        let flusher = {
            let log = Arc::clone(&log);
            tokio::spawn(async move { log.run_flusher().await })
        };
        let mut writer = log.writer().unwrap();
        for lsn in [100, 200, 300] {
            append_tx(&mut writer, lsn, 3);
        }
        log.wait_beyond(14).await;
        assert_eq!(log.durable().commit_position, Position(300));
        assert_eq!(log.read(0, 100).unwrap().len(), 15);
        flusher.abort();
    }

    #[tokio::test]
    async fn trim_keeps_the_slowest_cursors_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        let mut writer = log.writer().unwrap();
        append_tx(&mut writer, 100, 3); // seqs 1..=5
        append_tx(&mut writer, 200, 3); // seqs 6..=10
        log.flush().await.unwrap();
        log.store_cursor(
            "a",
            &SinkCursor {
                seq: 10,
                state: vec![],
            },
        )
        .await
        .unwrap();
        log.store_cursor(
            "b",
            &SinkCursor {
                seq: 7,
                state: vec![],
            },
        )
        .await
        .unwrap();
        assert_eq!(log.trim(&["a", "b"]).unwrap(), 5);
        assert_eq!(log.read(0, 100).unwrap().first().map(|e| e.seq), Some(6));
        assert_eq!(log.transaction_of(8).unwrap().map(|(s, _)| s), Some(6));
        log.store_cursor(
            "b",
            &SinkCursor {
                seq: 10,
                state: vec![],
            },
        )
        .await
        .unwrap();
        log.trim(&["a", "b"]).unwrap();
        let left = log.read(0, 100).unwrap();
        assert_eq!(left.len(), 1, "the last Commit anchors the position");
        assert_eq!(left[0].record, commit(200));
        drop(writer);
        drop(log);
        let log = open(dir.path());
        assert_eq!(log.durable().commit_position, Position(200));
        assert_eq!(log.writer().unwrap().next_seq, 11);
    }

    #[tokio::test]
    async fn relations_are_stored_once_per_description() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        let mut writer = log.writer().unwrap();
        let relation = Relation {
            oid: 42,
            schema: "public".into(),
            table: "Orders".into(),
            columns: vec![],
        };
        let (a, _) = writer.relation(relation.clone()).unwrap();
        let (b, _) = writer.relation(relation.clone()).unwrap();
        assert_eq!(a, b);
        let mut changed = relation.clone();
        changed.table = "orders2".into();
        let (c, _) = writer.relation(changed).unwrap();
        assert_ne!(a, c);
        assert_eq!(*log.relation(a).unwrap(), relation);
    }

    #[tokio::test]
    async fn a_streamed_transaction_enters_the_log_at_its_commit_without_aborted_subtransactions() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        let mut writer = log.writer().unwrap();
        // Transaction 7 streams three changes, one of them in subtransaction 8, which aborts;
        // transaction 9 streams one change and aborts; another commits meanwhile.
        writer.append_streamed(7, 7, &change(10)).unwrap();
        writer.append_streamed(9, 9, &change(11)).unwrap();
        writer.append_streamed(7, 8, &change(12)).unwrap();
        append_tx(&mut writer, 20, 1);
        writer.append_streamed(7, 7, &change(13)).unwrap();
        writer.discard_streamed(9).unwrap();
        writer.append(&begin(30)).unwrap();
        let mut inspected = Vec::new();
        let mut inspect = |c: &ChangeEvent| {
            inspected.push(c.position.0);
            Ok(())
        };
        let aborted = HashSet::from([8]);
        let appended = writer
            .append_streamed_transaction(7, &aborted, Some(&mut inspect), 1)
            .unwrap();
        assert_eq!(appended, (1, false), "one change per call");
        let appended = writer
            .append_streamed_transaction(7, &aborted, Some(&mut inspect), 10)
            .unwrap();
        writer.append(&commit(30)).unwrap();
        log.flush().await.unwrap();

        assert_eq!(appended, (1, true));
        assert_eq!(inspected, vec![10, 13]);
        let records = durable_records(&log);
        assert_eq!(
            records,
            vec![
                begin(20),
                change(19),
                commit(20),
                begin(30),
                change(10),
                change(13),
                commit(30)
            ]
        );
        assert_eq!(
            std::fs::read_dir(dir.path().join("streams"))
                .unwrap()
                .count(),
            0,
            "files of finished streamed transactions remain"
        );
    }

    #[test]
    fn streamed_changes_left_by_a_crash_or_a_lost_connection_are_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let streams = dir.path().join("streams");
        {
            let log = open(dir.path());
            let mut writer = log.writer().unwrap();
            writer.append_streamed(7, 7, &change(10)).unwrap();
            writer.append_streamed(8, 8, &change(11)).unwrap();
            writer.discard_uncommitted().unwrap();
            assert_eq!(std::fs::read_dir(&streams).unwrap().count(), 0);
            writer.append_streamed(7, 7, &change(10)).unwrap();
            assert_eq!(std::fs::read_dir(&streams).unwrap().count(), 1);
        }
        let log = open(dir.path());
        let mut writer = log.writer().unwrap();
        assert_eq!(std::fs::read_dir(&streams).unwrap().count(), 0);
        writer.append(&begin(30)).unwrap();
        let appended = writer
            .append_streamed_transaction(7, &HashSet::new(), None, 10)
            .unwrap();
        assert_eq!(
            appended,
            (0, true),
            "a change of an earlier process was appended"
        );
    }

    /// A change of about 4 KiB: a few thousand of them fill a segment.
    fn wide_change(lsn: u64) -> Record {
        Record::Change(ChangeEvent {
            relation: RelationId(1),
            position: Position(lsn),
            op: Op::Insert,
            before: None,
            after: Some(vec![Value::Int(lsn as i64), Value::Text("x".repeat(4096))]),
        })
    }

    fn segment_files(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join("records"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        files
    }

    /// Appends transactions of `changes` wide changes, with commit LSNs from `first_lsn` on,
    /// until the log has `segments` segment files; returns the last commit LSN.
    fn append_wide(writer: &mut LogWriter, first_lsn: u64, changes: u64, segments: usize) -> u64 {
        let dir = writer.log().records_dir.clone();
        let mut lsn = first_lsn;
        while std::fs::read_dir(&dir).unwrap().count() < segments {
            writer.append(&begin(lsn)).unwrap();
            for i in 0..changes {
                writer.append(&wide_change(lsn * 1000 + i)).unwrap();
            }
            writer.append(&commit(lsn)).unwrap();
            lsn += 1;
        }
        lsn - 1
    }

    #[tokio::test]
    async fn records_span_segments_and_trimming_removes_whole_segments() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        let mut writer = log.writer().unwrap();
        let last = append_wide(&mut writer, 1, 10, 4);
        log.flush().await.unwrap();
        assert_eq!(segment_files(dir.path()).len(), 4);

        // Read in odd-sized pieces: every record once, in order, across the boundaries.
        let mut after = 0;
        let mut seen = 0;
        loop {
            let batch = log.read(after, 777).unwrap();
            let Some(end) = batch.last() else { break };
            for (i, entry) in batch.iter().enumerate() {
                assert_eq!(entry.seq, after + 1 + i as u64);
            }
            after = end.seq;
            seen += batch.len() as u64;
        }
        assert_eq!(seen, log.durable().seq);
        assert_eq!(log.durable().commit_position, Position(last));
        // A record in the third segment knows its transaction's Begin.
        let in_third = log.durable().seq * 2 / 3;
        let (begin_seq, tx) = log.transaction_of(in_third).unwrap().unwrap();
        assert_eq!(log.commit_of(begin_seq).unwrap(), Some(begin_seq + 11));
        assert_eq!((in_third - begin_seq) / 12, 0, "12 records per transaction");
        assert_eq!((in_third - 1) / 12 * 12 + 1, begin_seq);
        assert_eq!(tx.commit_position, Position((begin_seq - 1) / 12 + 1));

        let held = log.held_bytes().unwrap();
        log.store_cursor(
            "a",
            &SinkCursor {
                seq: in_third,
                state: vec![],
            },
        )
        .await
        .unwrap();
        let (keep_from, _) = log.transaction_of(in_third + 1).unwrap().unwrap();
        assert_eq!(log.trim(&["a"]).unwrap(), keep_from - 1);
        assert_eq!(
            segment_files(dir.path()).len(),
            2,
            "the first two segments remain"
        );
        assert!(log.held_bytes().unwrap() < held / 2 + segments::SEGMENT_BYTES / 4);
        assert_eq!(log.read(0, 1).unwrap()[0].seq, keep_from);

        // Reopened: the same durable position, reading starts at a transaction's Begin.
        drop(writer);
        drop(log);
        let log = open(dir.path());
        assert_eq!(log.durable().commit_position, Position(last));
        let first = log.read(0, 1).unwrap();
        assert!(matches!(first[0].record, Record::Begin(_)), "{first:?}");
        assert!(first[0].seq <= keep_from);
        let mut writer = log.writer().unwrap();
        append_tx(&mut writer, last + 1, 1);
        log.flush().await.unwrap();
        let tail = log.read(log.durable().seq - 3, 10).unwrap();
        assert_eq!(tail[0].record, begin(last + 1));
        assert_eq!(tail.len(), 3);
    }

    /// Appends a transaction whose changes fill two segments, leaving it open.
    fn append_open_wide(writer: &mut LogWriter, lsn: u64) {
        writer.append(&begin(lsn)).unwrap();
        for i in 0..(2 * segments::SEGMENT_BYTES / 4096) {
            writer.append(&wide_change(i)).unwrap();
        }
    }

    #[tokio::test]
    async fn an_open_transaction_larger_than_a_segment_is_discarded_whole() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        let mut writer = log.writer().unwrap();
        append_tx(&mut writer, 100, 2);
        append_open_wide(&mut writer, 200);
        assert_eq!(segment_files(dir.path()).len(), 3);
        writer.discard_uncommitted().unwrap();
        assert_eq!(segment_files(dir.path()).len(), 1);
        append_tx(&mut writer, 300, 1);
        log.flush().await.unwrap();
        let read = log.read(0, 100).unwrap();
        assert_eq!(
            read.iter().map(|e| e.record.clone()).collect::<Vec<_>>(),
            vec![
                begin(100),
                change(98),
                change(99),
                commit(100),
                begin(300),
                change(299),
                commit(300)
            ]
        );
        assert_eq!(read.last().map(|e| e.seq), Some(7));
    }

    #[tokio::test]
    async fn a_crash_inside_a_transaction_larger_than_a_segment_leaves_the_last_commit() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = open(dir.path());
            let mut writer = log.writer().unwrap();
            append_tx(&mut writer, 100, 2);
            append_open_wide(&mut writer, 200);
            log.flush().await.unwrap();
        }
        let log = open(dir.path());
        assert_eq!(segment_files(dir.path()).len(), 1);
        assert_eq!(log.durable().seq, 4);
        let mut writer = log.writer().unwrap();
        append_tx(&mut writer, 300, 1);
        log.flush().await.unwrap();
        assert_eq!(durable_records(&log)[4], begin(300));
        assert_eq!(log.durable().seq, 7);
    }

    #[tokio::test]
    async fn a_torn_tail_is_cut_off_at_the_last_whole_commit() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = open(dir.path());
            let mut writer = log.writer().unwrap();
            append_tx(&mut writer, 100, 2);
            append_tx(&mut writer, 200, 2);
            log.flush().await.unwrap();
        }
        // The last Commit half written, then garbage where the next record would be.
        let segment = segment_files(dir.path()).remove(0);
        let length = std::fs::metadata(&segment).unwrap().len();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&segment)
            .unwrap();
        file.set_len(length - 5).unwrap();
        drop(file);
        let mut bytes = std::fs::read(&segment).unwrap();
        bytes.extend_from_slice(&[0xAB; 40]);
        std::fs::write(&segment, &bytes).unwrap();

        let log = open(dir.path());
        assert_eq!(log.durable().commit_position, Position(100));
        let mut writer = log.writer().unwrap();
        append_tx(&mut writer, 300, 1);
        log.flush().await.unwrap();
        assert_eq!(
            durable_records(&log)[4..],
            [begin(300), change(299), commit(300)]
        );
    }

    #[tokio::test]
    async fn damage_before_the_last_segment_is_refused_and_a_damaged_record_is_not_returned() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = open(dir.path());
            let mut writer = log.writer().unwrap();
            append_wide(&mut writer, 1, 10, 2);
            log.flush().await.unwrap();
        }
        let first = segment_files(dir.path()).remove(0);
        let mut bytes = std::fs::read(&first).unwrap();
        // A payload byte of a record in the middle: only its checksum shows it.
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0xFF;
        std::fs::write(&first, &bytes).unwrap();
        let log = open(dir.path());
        let mut after = 0;
        let error = loop {
            match log.read(after, 1000) {
                Ok(batch) => after = batch.last().unwrap().seq,
                Err(e) => break e,
            }
        };
        assert!(matches!(error, LogError::Damaged { .. }), "{error}");
        assert!(
            error.to_string().contains("Move agent.data_dir aside"),
            "{error}"
        );
        drop(log);

        // A header damaged: the segment cannot be walked, and the log is refused at open.
        bytes[0] ^= 0xFF;
        std::fs::write(&first, &bytes).unwrap();
        let error = OffsetLog::open(dir.path()).err().unwrap();
        assert!(matches!(error, LogError::Damaged { .. }), "{error}");
    }

    #[test]
    fn a_second_open_of_the_same_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _first = open(dir.path());
        let err = OffsetLog::open(dir.path()).err().unwrap();
        assert!(matches!(err, LogError::Locked { .. }), "{err}");
    }
}
