//! Files that hold records for a while, one append-only file per number, each read back once
//! in the order written and then removed: the changes of streamed transactions (pgoutput v2)
//! until the transaction commits or aborts (`data_dir/streams`, one file per transaction), and
//! an SCD2 sink's large transaction split by key (`sinks/postgres/large.rs`). They need no
//! fsync: after a crash what they held is received or read again, so every file left then is
//! removed.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, BufWriter, ErrorKind, Read, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error(
    "cannot keep a streamed transaction in {path}: {source}; check that agent.data_dir is \
     writable and has free space (a transaction larger than the server's \
     logical_decoding_work_mem waits there until it commits)"
)]
pub struct SpillError {
    path: PathBuf,
    source: std::io::Error,
}

pub struct Spill {
    dir: PathBuf,
    /// Buffer of each open file.
    buffer_bytes: usize,
    open: HashMap<u32, BufWriter<File>>,
}

impl Spill {
    /// Opens the directory, removing whatever an earlier process left in it.
    pub fn open(dir: &Path, buffer_bytes: usize) -> Result<Spill, SpillError> {
        let mut spill = Spill {
            dir: dir.to_path_buf(),
            buffer_bytes,
            open: HashMap::new(),
        };
        std::fs::create_dir_all(dir).map_err(|source| spill.error_at(dir, source))?;
        spill.discard_all()?;
        Ok(spill)
    }

    /// Adds one change (an encoded record) of transaction `xid`'s subtransaction `subxid`.
    pub fn append(&mut self, xid: u32, subxid: u32, record: &[u8]) -> Result<(), SpillError> {
        let path = self.path(xid);
        let file = match self.open.entry(xid) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let file = File::create(&path).map_err(|source| SpillError {
                    path: path.clone(),
                    source,
                })?;
                e.insert(BufWriter::with_capacity(self.buffer_bytes, file))
            }
        };
        let length = u32::try_from(record.len()).map_err(|_| SpillError {
            path: path.clone(),
            source: std::io::Error::new(ErrorKind::InvalidInput, "a change of 4 GiB or more"),
        })?;
        file.write_all(&subxid.to_be_bytes())
            .and_then(|()| file.write_all(&length.to_be_bytes()))
            .and_then(|()| file.write_all(record))
            .map_err(|source| SpillError { path, source })
    }

    /// Transaction `xid`'s changes in arrival order (none when nothing was streamed for it).
    /// The file is removed once the reader is dropped.
    pub fn read(&mut self, xid: u32) -> Result<SpillReader, SpillError> {
        let path = self.path(xid);
        let Some(writer) = self.open.remove(&xid) else {
            return Ok(SpillReader {
                file: None,
                path,
                record: Vec::new(),
            });
        };
        let file = writer
            .into_inner()
            .map_err(|e| e.into_error())
            .and_then(|_| File::open(&path))
            .map_err(|source| SpillError {
                path: path.clone(),
                source,
            })?;
        Ok(SpillReader {
            file: Some(BufReader::with_capacity(self.buffer_bytes, file)),
            path,
            record: Vec::new(),
        })
    }

    /// Forgets transaction `xid` (it aborted, or the log holds it already).
    pub fn discard(&mut self, xid: u32) -> Result<(), SpillError> {
        if self.open.remove(&xid).is_some() {
            let path = self.path(xid);
            std::fs::remove_file(&path).map_err(|source| SpillError { path, source })?;
        }
        Ok(())
    }

    /// Forgets every transaction.
    pub fn discard_all(&mut self) -> Result<(), SpillError> {
        self.open.clear();
        let entries =
            std::fs::read_dir(&self.dir).map_err(|source| self.error_at(&self.dir, source))?;
        for entry in entries {
            let path = entry
                .map_err(|source| self.error_at(&self.dir, source))?
                .path();
            std::fs::remove_file(&path).map_err(|source| SpillError { path, source })?;
        }
        Ok(())
    }

    fn path(&self, xid: u32) -> PathBuf {
        self.dir.join(xid.to_string())
    }

    fn error_at(&self, path: &Path, source: std::io::Error) -> SpillError {
        SpillError {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Reads one streamed transaction's changes back, then removes its file.
pub struct SpillReader {
    file: Option<BufReader<File>>,
    path: PathBuf,
    record: Vec<u8>,
}

impl SpillReader {
    /// The next change: its subtransaction and encoded record.
    pub fn next_record(&mut self) -> Result<Option<(u32, &[u8])>, SpillError> {
        let Some(file) = self.file.as_mut() else {
            return Ok(None);
        };
        let mut header = [0; 8];
        match file.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(None),
            Err(source) => return Err(self.error(source)),
        }
        let [s0, s1, s2, s3, l0, l1, l2, l3] = header;
        let subxid = u32::from_be_bytes([s0, s1, s2, s3]);
        self.record
            .resize(u32::from_be_bytes([l0, l1, l2, l3]) as usize, 0);
        if let Err(source) = file.read_exact(&mut self.record) {
            return Err(self.error(source));
        }
        Ok(Some((subxid, &self.record)))
    }

    fn error(&self, source: std::io::Error) -> SpillError {
        SpillError {
            path: self.path.clone(),
            source,
        }
    }
}

impl Drop for SpillReader {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            if let Err(e) = std::fs::remove_file(&self.path) {
                tracing::warn!(path = %self.path.display(), error = %e, "removing a streamed transaction's file");
            }
        }
    }
}
