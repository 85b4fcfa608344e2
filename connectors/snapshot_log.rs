//! The initial snapshot's rows in the log, the same for every source: transactions of
//! snapshot rows at the snapshot's position, the first one truncating what an earlier,
//! cut-short snapshot delivered when asked.

use bytes::Bytes;

use crate::event::{
    ChangeEvent, Op, Position, Record, RelationId, SnapshotRows, TxBegin, TxCommit, TxOrigin,
};
use crate::log::{LogError, LogWriter};

/// Rows of one logged snapshot transaction.
const ROWS_PER_TRANSACTION: u64 = 50_000;

/// The snapshot's transactions in the log: all at the snapshot's position (just before the
/// first transaction the stream will send), numbered from 1, each of at most
/// `ROWS_PER_TRANSACTION` rows.
pub struct SnapshotTransactions {
    position: Position,
    end_position: Position,
    commit_ts: i64,
    /// The origin of the transaction numbered so.
    origin: Box<dyn Fn(u32) -> TxOrigin + Send>,
    number: u32,
    rows: u64,
}

impl SnapshotTransactions {
    pub fn new(
        position: Position,
        end_position: Position,
        commit_ts: i64,
        origin: Box<dyn Fn(u32) -> TxOrigin + Send>,
    ) -> SnapshotTransactions {
        SnapshotTransactions {
            position,
            end_position,
            commit_ts,
            origin,
            number: 0,
            rows: 0,
        }
    }

    pub fn begin(&mut self, writer: &mut LogWriter) -> Result<(), LogError> {
        self.number += 1;
        self.rows = 0;
        writer.append(&Record::Begin(TxBegin {
            origin: (self.origin)(self.number),
            commit_position: self.position,
            commit_ts: self.commit_ts,
        }))?;
        Ok(())
    }

    pub fn truncate(
        &mut self,
        writer: &mut LogWriter,
        relation: RelationId,
    ) -> Result<(), LogError> {
        writer.append(&Record::Change(ChangeEvent {
            relation,
            position: self.position,
            op: Op::Truncate,
            before: None,
            after: None,
        }))?;
        // A truncate is a change of the transaction like a row (50,000 changes at most).
        self.rows += 1;
        Ok(())
    }

    pub fn rows(
        &mut self,
        writer: &mut LogWriter,
        relation: RelationId,
        rows: u32,
        text: Bytes,
    ) -> Result<(), LogError> {
        if self.rows > 0 && self.rows + u64::from(rows) > ROWS_PER_TRANSACTION {
            self.commit(writer)?;
            self.begin(writer)?;
        }
        writer.append(&Record::SnapshotRows(SnapshotRows {
            relation,
            position: self.position,
            rows,
            text,
        }))?;
        self.rows += u64::from(rows);
        Ok(())
    }

    pub fn commit(&mut self, writer: &mut LogWriter) -> Result<(), LogError> {
        writer.append(&Record::Commit(TxCommit {
            commit_position: self.position,
            end_position: self.end_position,
            commit_ts: self.commit_ts,
        }))?;
        Ok(())
    }
}
