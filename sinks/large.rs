//! SCD2 and transactions larger than a batch. A version is a key's state when its
//! transaction commits, so an SCD2 sink cannot apply such a transaction chunk by chunk the way
//! merge does; holding it whole would make memory grow with its size. Instead its changes are
//! split by key into partition files as the chunks arrive, and at the commit each partition —
//! every change of its keys, in order — is planned and applied as a transaction of its own:
//! one version per key however large the transaction, with at most about a batch of it in
//! memory. The checkpoint moves past the transaction only with its last partition; a crash
//! before that applies every partition again, which the SCD2 statements make a no-op for the
//! versions already there.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use crate::event::{ChangeEvent, Op, Record, Relation, TxBegin, Value};
use crate::log::spill::{Spill, SpillError, SpillReader};
use crate::log::{LogEntry, OffsetLog};
use crate::sinks::collapse::key_of;
use crate::sinks::SinkError;

/// One sink's transactions larger than a batch: splits each as its chunks arrive, and at its
/// commit hands out its partitions.
pub struct LargeSplit {
    sink: String,
    /// Where the partition files go.
    dir: PathBuf,
    current: Option<LargeTransaction>,
}

impl LargeSplit {
    pub fn new(sink: &str, data_dir: &Path) -> LargeSplit {
        LargeSplit {
            sink: sink.to_string(),
            dir: data_dir.join("large_transactions").join(sink),
            current: None,
        }
    }

    /// Whether a transaction is being split.
    pub fn is_open(&self) -> bool {
        self.current.is_some()
    }

    /// Forgets the transaction being split: the sink applies it again from its start.
    pub fn reset(&mut self) {
        self.current = None;
    }

    /// Adds a chunk of a large transaction (its Begin first, for the first chunk), up to
    /// and without its Commit.
    pub fn add(&mut self, log: &OffsetLog, chunk: &[LogEntry]) -> Result<(), SinkError> {
        for entry in chunk {
            match &entry.record {
                Record::Begin(begin) => {
                    let commit = log.commit_of(entry.seq)?.ok_or_else(|| {
                        self.inconsistent(format!(
                            "the transaction that begins at log record {} has no commit",
                            entry.seq
                        ))
                    })?;
                    let large = LargeTransaction::start(
                        &self.dir,
                        entry.seq,
                        begin.clone(),
                        commit - entry.seq,
                        // The first chunk is a whole batch: partitions of about its size.
                        chunk.len(),
                    )
                    .map_err(|e| self.io(e.into()))?;
                    tracing::info!(
                        sink = %self.sink,
                        records = commit - entry.seq,
                        partitions = large.partitions(),
                        "a transaction larger than a batch: splitting it by key"
                    );
                    self.current = Some(large);
                }
                Record::Change(change) => {
                    let relation = log.relation(change.relation)?;
                    self.add_change(entry.seq, &relation, &entry.record)?;
                }
                Record::SnapshotRows(rows) => {
                    let relation = log.relation(rows.relation)?;
                    let changes = rows.changes(&relation).map_err(|message| {
                        self.inconsistent(format!("log record {}: {message}", entry.seq))
                    })?;
                    for change in changes {
                        self.add_change(entry.seq, &relation, &Record::Change(change))?;
                    }
                }
                Record::Schema(_) => {
                    // Its rows are applied after the change, under its names: the whole
                    // transaction must be planned as one batch.
                    if let Some(large) = self.current.as_mut() {
                        large.whole = true;
                    }
                }
                Record::Commit(_) => {}
            }
        }
        Ok(())
    }

    /// Adds a change of log record `seq` (`record`, a `Record::Change`).
    fn add_change(
        &mut self,
        seq: u64,
        relation: &Relation,
        record: &Record,
    ) -> Result<(), SinkError> {
        let Record::Change(change) = record else {
            return Err(self.inconsistent(format!("log record {seq} is not a change")));
        };
        let encoded =
            postcard::to_allocvec(record).map_err(|e| self.inconsistent(e.to_string()))?;
        let Some(large) = self.current.as_mut() else {
            return Err(self.inconsistent(format!("log record {seq} is not inside a transaction")));
        };
        let added = large.add(change, relation, &encoded);
        added.map_err(|e| self.io(e.into()))
    }

    /// Ends the transaction that `commit` ends: its partitions, each to apply as a
    /// transaction of its own (none when no transaction was being split).
    pub fn finish(&mut self, commit: &LogEntry) -> Partitions {
        Partitions {
            sink: self.sink.clone(),
            dir: self.dir.clone(),
            large: self.current.take(),
            commit: commit.clone(),
            next: 0,
        }
    }

    fn inconsistent(&self, message: String) -> SinkError {
        SinkError::Inconsistent {
            sink: self.sink.clone(),
            message,
        }
    }

    fn io(&self, error: PartitionError) -> SinkError {
        partition_error(&self.sink, &self.dir, error)
    }
}

fn partition_error(sink: &str, dir: &Path, error: PartitionError) -> SinkError {
    SinkError::Io {
        sink: sink.to_string(),
        context: format!("splitting a large transaction under {}", dir.display()),
        source: std::io::Error::other(error.to_string()),
    }
}

/// The partitions of a large transaction, handed out one at a time: at most about a batch
/// of it is in memory (unless it must be applied whole).
pub struct Partitions {
    sink: String,
    dir: PathBuf,
    large: Option<LargeTransaction>,
    commit: LogEntry,
    next: u32,
}

impl Partitions {
    /// The next partition's entries as a transaction of their own (Begin, its changes,
    /// Commit), and whether it is the last.
    pub fn next(&mut self, log: &OffsetLog) -> Result<Option<(Vec<LogEntry>, bool)>, SinkError> {
        let Some(large) = self.large.as_mut() else {
            return Ok(None);
        };
        let commit = &self.commit;
        if large.whole {
            tracing::warn!(
                sink = %self.sink,
                records = commit.seq - large.begin_seq,
                "a transaction larger than a batch moves rows to other keys or changes a \
                 table's columns: applying it whole, in memory"
            );
            let mut entries = Vec::new();
            while entries.last().is_none_or(|e: &LogEntry| e.seq < commit.seq) {
                let after = entries.last().map_or(large.begin_seq - 1, |e| e.seq);
                let chunk = log.read(after, large.batch_records)?;
                if chunk.is_empty() {
                    break;
                }
                entries.extend(chunk);
            }
            entries.retain(|e| e.seq <= commit.seq);
            self.large = None;
            return Ok(Some((entries, true)));
        }
        let begin = LogEntry {
            seq: large.begin_seq,
            record: Record::Begin(large.begin.clone()),
        };
        let number = self.next;
        let mut reader = large
            .read(number)
            .map_err(|e| partition_error(&self.sink, &self.dir, e.into()))?;
        let entries = partition_entries(&begin, &mut reader, commit)
            .map_err(|e| partition_error(&self.sink, &self.dir, e))?;
        let last = number + 1 == large.partitions();
        self.next += 1;
        if last {
            self.large = None;
        }
        Ok(Some((entries, last)))
    }
}

/// At most this many partition files: their write buffers share `BUFFER_BUDGET_BYTES`.
const MAX_PARTITIONS: u64 = 4096;
const BUFFER_BUDGET_BYTES: usize = 1024 * 1024;

/// Where a change goes.
enum Route {
    One(u32),
    /// A truncate: every partition's keys end there.
    All,
    /// An update that moves a row from the key of partition `from` to one of partition `to`.
    Across {
        from: u32,
        to: u32,
    },
}

struct LargeTransaction {
    pub begin_seq: u64,
    pub begin: TxBegin,
    /// Changes per partition, about: the pipeline's batch size.
    pub batch_records: usize,
    partitions: u32,
    spill: Spill,
    /// A change moved a row to a key of another partition leaving TOASTed values unchanged
    /// (they may come from an earlier change of the old key, planned in the other partition),
    /// or a schema change renamed columns under the changes before it: this transaction is
    /// applied whole, read back from the log (its memory unbounded).
    pub whole: bool,
}

impl LargeTransaction {
    /// Starts splitting the transaction that begins at `begin_seq` and holds `records`
    /// records, into partitions of about `per_partition` changes under `dir` (whatever an
    /// earlier one left there is removed).
    pub fn start(
        dir: &Path,
        begin_seq: u64,
        begin: TxBegin,
        records: u64,
        per_partition: usize,
    ) -> Result<LargeTransaction, SpillError> {
        let partitions = records
            .div_ceil(per_partition.max(1) as u64)
            .clamp(1, MAX_PARTITIONS);
        let buffer = (BUFFER_BUDGET_BYTES / partitions as usize).clamp(4 * 1024, 64 * 1024);
        Ok(LargeTransaction {
            begin_seq,
            begin,
            batch_records: per_partition,
            partitions: partitions as u32,
            spill: Spill::open(dir, buffer)?,
            whole: false,
        })
    }

    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// Adds one change (`encoded`: its log record) to the partitions of the keys it touches.
    pub fn add(
        &mut self,
        change: &ChangeEvent,
        relation: &Relation,
        encoded: &[u8],
    ) -> Result<(), SpillError> {
        if self.whole {
            return Ok(());
        }
        match self.route(change, relation) {
            Route::One(partition) => self.spill.append(partition, 0, encoded),
            Route::All => {
                for partition in 0..self.partitions {
                    self.spill.append(partition, 0, encoded)?;
                }
                Ok(())
            }
            Route::Across { .. }
                if change
                    .after
                    .iter()
                    .flatten()
                    .any(|v| *v == Value::UnchangedToast) =>
            {
                // Read back from the log at the commit: the partitions are not needed.
                self.whole = true;
                self.spill.discard_all()
            }
            Route::Across { from, to } => {
                // With every value present, a move is what SCD2 makes of a delete of the old
                // key and an insert of the new one: each goes to its key's partition.
                let delete = ChangeEvent {
                    op: Op::Delete,
                    after: None,
                    ..change.clone()
                };
                let insert = ChangeEvent {
                    op: Op::Insert,
                    before: None,
                    ..change.clone()
                };
                self.spill.append(from, 0, &encode_change(delete))?;
                self.spill.append(to, 0, &encode_change(insert))
            }
        }
    }

    /// The changes of partition `number`, in log order; its file goes when the reader does.
    pub fn read(&mut self, number: u32) -> Result<SpillReader, SpillError> {
        self.spill.read(number)
    }

    fn route(&self, change: &ChangeEvent, relation: &Relation) -> Route {
        let pk: Vec<usize> = relation.primary_key_indexes().collect();
        let partition = |row: &[Value]| {
            let mut hasher = DefaultHasher::new();
            (relation.oid, key_of(row, &pk)).hash(&mut hasher);
            (hasher.finish() % u64::from(self.partitions)) as u32
        };
        let new = change.after.as_deref().map(partition);
        let old = change
            .before
            .as_deref()
            .filter(|before| {
                !pk.iter()
                    .any(|&i| before.get(i) == Some(&Value::UnchangedToast))
            })
            .map(partition);
        match (change.op, old, new) {
            (Op::Truncate, _, _) => Route::All,
            (_, Some(from), Some(to)) if from != to => Route::Across { from, to },
            (_, _, Some(partition)) | (_, Some(partition), None) => Route::One(partition),
            // Without rows the planner reports what is missing; any partition will do.
            (_, None, None) => Route::One(0),
        }
    }
}

fn encode_change(change: ChangeEvent) -> Vec<u8> {
    // Serialising plain data into a Vec cannot fail.
    postcard::to_allocvec(&Record::Change(change)).unwrap_or_default()
}

/// The entries of one partition as a transaction of their own: the Begin, the partition's
/// changes, the Commit.
fn partition_entries(
    begin: &LogEntry,
    reader: &mut SpillReader,
    commit: &LogEntry,
) -> Result<Vec<LogEntry>, PartitionError> {
    let mut entries = vec![begin.clone()];
    while let Some((_, encoded)) = reader.next_record()? {
        let record: Record =
            postcard::from_bytes(encoded).map_err(|e| PartitionError::Decode(e.to_string()))?;
        entries.push(LogEntry {
            seq: begin.seq,
            record,
        });
    }
    entries.push(commit.clone());
    Ok(entries)
}

#[derive(Debug, thiserror::Error)]
enum PartitionError {
    #[error(transparent)]
    Spill(#[from] SpillError),
    #[error("a change read back from a partition file does not decode: {0}")]
    Decode(String),
}
