//! SCD2 and transactions larger than a batch. A version is a key's state when its
//! transaction commits, so the sink cannot apply such a transaction chunk by chunk the way
//! merge does; holding it whole would make memory grow with its size. Instead its changes are
//! split by key into partition files as the chunks arrive, and at the commit each partition —
//! every change of its keys, in order — is planned and applied as a transaction of its own:
//! one version per key however large the transaction, with at most about a batch of it in
//! memory. The checkpoint moves past the transaction only with its last partition; a crash
//! before that applies every partition again, which the SCD2 statements make a no-op for the
//! versions already there.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::Path;

use crate::event::{ChangeEvent, Op, Record, Relation, TxBegin, Value};
use crate::log::spill::{Spill, SpillError, SpillReader};
use crate::log::LogEntry;
use crate::sinks::collapse::key_of;

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

pub struct LargeTransaction {
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
pub fn partition_entries(
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
pub enum PartitionError {
    #[error(transparent)]
    Spill(#[from] SpillError),
    #[error("a change read back from a partition file does not decode: {0}")]
    Decode(String),
}
