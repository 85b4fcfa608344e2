//! The dead-letter queue: changes a sink's target refused for good (a CHECK constraint the
//! source does not have, a value too long for the target column …), each with its reason,
//! kept under `data_dir/dead_letters/<sink>.jsonl` so nothing is dropped silently (DESIGN
//! invariant 5). An entry is durable (fsynced) before the batch that skipped it commits.
//!
//! `dlq retry` applies an entry again once the target takes it, unless a later change of the
//! same key has been applied since (the entry would put an older state back). So a sink
//! records, next to its letters in `<sink>.touched`, each later batch that touches a key
//! with a letter, durably before that batch commits; a record counts once the sink's
//! checkpoint has reached its position.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::envelope::RowJson;
use std::sync::Arc;

use crate::event::{
    ChangeEvent, Op, Position, Record, Relation, RelationId, Row, TxBegin, TxCommit, TxOrigin,
    Value,
};
use crate::log::LogEntry;

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
    /// The keys the refused change touches (a moved row: its old key too), as [`key_text`].
    pub keys: Vec<String>,
    pub change: LetterChange,
}

/// A refused change as the sink's planner takes it again: `dlq retry` applies it as a
/// transaction of its own. Merge letters are the collapsed state of a key (its changes in
/// the batch as one), SCD2 letters one version or close.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LetterChange {
    pub relation: Relation,
    pub op: Op,
    pub before: Option<Row>,
    pub after: Option<Row>,
    /// The source transaction's commit (SCD2: the version's `valid_from`); merge letters
    /// have none, the mirror keeps no time.
    pub commit: Option<(Position, i64)>,
}

/// Letters as log entries for a sink's planner: each commit (merge letters: each version) a
/// transaction of its own, in commit order, at log position `applied`. A change's relation id
/// is its index in the relations returned.
pub fn as_transactions(
    letters: &[LetterChange],
    applied: u64,
) -> (Vec<LogEntry>, Vec<Arc<Relation>>) {
    let mut relations: Vec<Arc<Relation>> = Vec::new();
    let mut order: Vec<&LetterChange> = letters.iter().collect();
    order.sort_by_key(|letter| letter.commit.map(|(lsn, _)| lsn));
    let mut entries = Vec::new();
    let mut open: Option<(Position, i64)> = None;
    let commit = |(commit_position, commit_ts): (Position, i64)| {
        Record::Commit(TxCommit {
            commit_position,
            end_position: commit_position,
            commit_ts,
        })
    };
    for letter in order {
        let relation = match relations.iter().position(|r| **r == letter.relation) {
            Some(i) => i,
            None => {
                relations.push(Arc::new(letter.relation.clone()));
                relations.len() - 1
            }
        };
        let (commit_position, commit_ts) = letter.commit.unwrap_or_default();
        if open != Some((commit_position, commit_ts)) {
            entries.extend(open.map(commit));
            entries.push(Record::Begin(TxBegin {
                origin: TxOrigin::Postgres { xid: 0 },
                commit_position,
                commit_ts,
            }));
            open = Some((commit_position, commit_ts));
        }
        entries.push(Record::Change(ChangeEvent {
            relation: RelationId(relation as u64),
            position: commit_position,
            op: letter.op,
            before: letter.before.clone(),
            after: letter.after.clone(),
        }));
    }
    entries.extend(open.map(commit));
    let entries = entries
        .into_iter()
        .map(|record| LogEntry {
            seq: applied,
            record,
        })
        .collect();
    (entries, relations)
}

/// A later batch that touched a key with a dead letter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Touch {
    pub table: String,
    pub key: String,
    /// The last log record of that batch.
    pub log_position: u64,
}

/// The primary key of `row` as text: equal keys are equal text.
pub fn key_text(relation: &Relation, row: &[Value]) -> String {
    let key: Vec<&Value> = relation
        .primary_key_indexes()
        .filter_map(|i| row.get(i))
        .collect();
    serde_json::to_string(&key).unwrap_or_default()
}

/// The dead letters of one sink: appends them, and records later batches touching their keys.
pub struct DeadLetterQueue {
    path: PathBuf,
    file: Option<File>,
    touches: Option<File>,
    /// `schema.table` → keys with a letter.
    keys: HashMap<String, HashSet<String>>,
}

impl DeadLetterQueue {
    pub fn new(data_dir: &Path, sink: &str) -> DeadLetterQueue {
        DeadLetterQueue {
            path: data_dir.join("dead_letters").join(format!("{sink}.jsonl")),
            file: None,
            touches: None,
            keys: HashMap::new(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads which keys have letters (letters dropped or retried since the last start go).
    pub fn load(&mut self) -> std::io::Result<()> {
        self.keys.clear();
        let letters = match read(&self.path) {
            Ok(letters) => letters,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        for letter in letters {
            self.keys
                .entry(letter.table)
                .or_default()
                .extend(letter.keys);
        }
        Ok(())
    }

    /// The keys of `table` with letters, if any.
    pub fn lettered_keys(&self, table: &str) -> Option<&HashSet<String>> {
        self.keys.get(table).filter(|keys| !keys.is_empty())
    }

    /// Writes the entries and makes them durable.
    pub fn append(&mut self, letters: &[DeadLetter<'_>]) -> std::io::Result<()> {
        if letters.is_empty() {
            return Ok(());
        }
        append_lines(&mut self.file, &self.path, letters)?;
        for letter in letters {
            self.keys
                .entry(letter.table.clone())
                .or_default()
                .extend(letter.keys.iter().cloned());
        }
        Ok(())
    }

    /// Records, durably, that a batch touches keys with letters.
    pub fn record_touches(&mut self, touches: &[Touch]) -> std::io::Result<()> {
        if touches.is_empty() {
            return Ok(());
        }
        append_lines(&mut self.touches, &touches_path(&self.path), touches)
    }
}

/// Appends one JSON line per item to the file (opened on first use) and fsyncs it.
fn append_lines<T: Serialize>(
    file: &mut Option<File>,
    path: &Path,
    items: &[T],
) -> std::io::Result<()> {
    let file = match file {
        Some(file) => file,
        None => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            file.insert(OpenOptions::new().create(true).append(true).open(path)?)
        }
    };
    let mut out = Vec::new();
    for item in items {
        serde_json::to_writer(&mut out, item)?;
        out.push(b'\n');
    }
    file.write_all(&out)?;
    file.sync_data()
}

/// Where the touches of the letters in `letters_path` are recorded.
fn touches_path(letters_path: &Path) -> PathBuf {
    letters_path.with_extension("touched")
}

/// The touches recorded next to a dead-letter file.
pub fn read_touches(letters_path: &Path) -> std::io::Result<Vec<Touch>> {
    match read_lines(&touches_path(letters_path)) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        result => result,
    }
}

/// Whether a batch applied after the letter (and committed: at or below the sink's
/// checkpoint `applied`) touched one of its keys.
pub fn is_superseded(letter: &StoredLetter, touches: &[Touch], applied: u64) -> bool {
    touches.iter().any(|t| {
        t.table == letter.table
            && t.log_position > letter.log_position
            && t.log_position <= applied
            && letter.keys.contains(&t.key)
    })
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
    change: LetterChange,
) -> DeadLetter<'a> {
    let mut keys = vec![key_text(relation, row)];
    if let Some(before) = &change.before {
        let old = key_text(relation, before);
        if !keys.contains(&old) {
            keys.push(old);
        }
    }
    DeadLetter {
        ts_ms: now_ms(),
        sink,
        table: relation.qualified_name(),
        action,
        row: RowJson { relation, row },
        log_position,
        reason,
        keys,
        change,
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
    /// Absent from letters of tidemark before `dlq retry` existed: those cannot be retried.
    #[serde(default)]
    pub keys: Vec<String>,
    #[serde(default)]
    pub change: Option<LetterChange>,
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
    read_lines(path)
}

fn read_lines<T: serde::de::DeserializeOwned>(path: &Path) -> std::io::Result<Vec<T>> {
    let text = std::fs::read_to_string(path)?;
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            serde_json::from_str(line)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
        })
        .collect()
}

/// Replaces the file with `letters` (write a temporary file, fsync, rename), and drops the
/// touches of keys no letter has any more. The caller holds the data_dir's lock, so no agent
/// appends meanwhile.
pub fn rewrite(path: &Path, letters: &[StoredLetter]) -> std::io::Result<()> {
    replace_lines(path, letters)?;
    let touches = read_touches(path)?;
    if touches.is_empty() {
        return Ok(());
    }
    let kept: Vec<Touch> = touches
        .into_iter()
        .filter(|t| {
            letters
                .iter()
                .any(|l| l.table == t.table && l.keys.contains(&t.key))
        })
        .collect();
    replace_lines(&touches_path(path), &kept)
}

fn replace_lines<T: Serialize>(path: &Path, items: &[T]) -> std::io::Result<()> {
    let temporary = path.with_extension("tmp");
    let mut out = Vec::new();
    for item in items {
        serde_json::to_writer(&mut out, item)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(log_position: u64, keys: &[&str]) -> StoredLetter {
        StoredLetter {
            ts_ms: 0,
            sink: "mirror".into(),
            table: "public.t".into(),
            action: "upsert".into(),
            row: serde_json::Value::Null,
            log_position,
            reason: String::new(),
            keys: keys.iter().map(|k| k.to_string()).collect(),
            change: None,
        }
    }

    fn touch(key: &str, log_position: u64) -> Touch {
        Touch {
            table: "public.t".into(),
            key: key.into(),
            log_position,
        }
    }

    #[test]
    fn only_a_later_committed_touch_of_one_of_its_keys_supersedes_a_letter() {
        let moved = letter(10, &["[2]", "[1]"]);
        // The letter's own batch, another key, a batch not yet committed: still to retry.
        assert!(!is_superseded(&moved, &[touch("[2]", 10)], 20));
        assert!(!is_superseded(&moved, &[touch("[3]", 15)], 20));
        assert!(!is_superseded(&moved, &[touch("[2]", 25)], 20));
        // A later committed batch touching either key.
        assert!(is_superseded(&moved, &[touch("[2]", 15)], 20));
        assert!(is_superseded(&moved, &[touch("[1]", 20)], 20));
        let other_table = Touch {
            table: "public.u".into(),
            ..touch("[2]", 15)
        };
        assert!(!is_superseded(&moved, &[other_table], 20));
    }

    #[test]
    fn equal_keys_are_equal_text_whatever_the_other_columns() {
        let column = |name: &str, primary_key| crate::event::Column {
            name: name.into(),
            type_oid: 23,
            type_modifier: -1,
            type_name: "integer".into(),
            value_type: crate::event::ValueType::Int4,
            primary_key,
            replica_identity: primary_key,
        };
        let relation = Relation {
            oid: 1,
            schema: "public".into(),
            table: "t".into(),
            columns: vec![column("v", false), column("id", true)],
        };
        let key = key_text(&relation, &[Value::Int(5), Value::Int(1)]);
        assert_eq!(key, key_text(&relation, &[Value::Null, Value::Int(1)]));
        assert_ne!(key, key_text(&relation, &[Value::Int(5), Value::Int(2)]));
    }
}
