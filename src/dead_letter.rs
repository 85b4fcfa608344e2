//! The dead-letter queue: changes a sink's target refused for good (a CHECK constraint the
//! source does not have, a value too long for the target column …), each with its reason,
//! kept under `data_dir/dead_letters/<sink>.jsonl` so nothing is dropped silently (DESIGN
//! invariant 5). An entry is durable (fsynced) before the batch that skipped it commits.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::envelope::RowJson;
use crate::event::{Relation, Row};

/// One refused change.
#[derive(Serialize)]
pub struct DeadLetter<'a> {
    /// When it was dead-lettered, milliseconds since the Unix epoch.
    pub ts_ms: i64,
    pub sink: &'a str,
    /// `schema.table` of the source.
    pub table: String,
    /// What the sink tried: `upsert` or `delete`.
    pub action: &'static str,
    pub row: RowJson<'a>,
    /// The last log record of the batch it was part of.
    pub log_position: u64,
    pub reason: String,
}

/// Appends dead letters of one sink.
pub struct DeadLetterQueue {
    path: PathBuf,
    file: Option<File>,
}

impl DeadLetterQueue {
    pub fn new(data_dir: &Path, sink: &str) -> DeadLetterQueue {
        DeadLetterQueue {
            path: data_dir.join("dead_letters").join(format!("{sink}.jsonl")),
            file: None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the entries and makes them durable.
    pub fn append(&mut self, letters: &[DeadLetter<'_>]) -> std::io::Result<()> {
        if letters.is_empty() {
            return Ok(());
        }
        let file = match &mut self.file {
            Some(file) => file,
            None => {
                if let Some(dir) = self.path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                let file = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.path)?;
                self.file.insert(file)
            }
        };
        let mut out = Vec::new();
        for letter in letters {
            serde_json::to_writer(&mut out, letter)?;
            out.push(b'\n');
        }
        file.write_all(&out)?;
        file.sync_data()
    }
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// Builds the entry for one refused row.
pub fn letter<'a>(
    sink: &'a str,
    relation: &'a Relation,
    action: &'static str,
    row: &'a Row,
    log_position: u64,
    reason: String,
) -> DeadLetter<'a> {
    DeadLetter {
        ts_ms: now_ms(),
        sink,
        table: relation.qualified_name(),
        action,
        row: RowJson { relation, row },
        log_position,
        reason,
    }
}

/// One entry of a dead-letter file as stored, for `tidemark dlq`.
#[derive(Debug, Clone, serde::Deserialize, Serialize)]
pub struct StoredLetter {
    pub ts_ms: i64,
    pub sink: String,
    pub table: String,
    pub action: String,
    pub row: serde_json::Value,
    pub log_position: u64,
    pub reason: String,
}

/// The dead-letter files under `data_dir`: sink name → path.
pub fn files(data_dir: &Path) -> std::io::Result<Vec<(String, PathBuf)>> {
    let dir = data_dir.join("dead_letters");
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut files = Vec::new();
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "jsonl") {
            if let Some(sink) = path.file_stem().and_then(|s| s.to_str()) {
                files.push((sink.to_string(), path.clone()));
            }
        }
    }
    files.sort();
    Ok(files)
}

/// Every entry of one dead-letter file, in the order written.
pub fn read(path: &Path) -> std::io::Result<Vec<StoredLetter>> {
    let text = std::fs::read_to_string(path)?;
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            serde_json::from_str(line)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
        })
        .collect()
}

/// Replaces the file with `letters` (write a temporary file, fsync, rename). The caller holds
/// the data_dir's lock, so no agent appends meanwhile.
pub fn rewrite(path: &Path, letters: &[StoredLetter]) -> std::io::Result<()> {
    let temporary = path.with_extension("jsonl.tmp");
    let mut out = Vec::new();
    for letter in letters {
        serde_json::to_writer(&mut out, letter)?;
        out.push(b'\n');
    }
    let mut file = File::create(&temporary)?;
    file.write_all(&out)?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}
