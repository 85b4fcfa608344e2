//! The log's records: append-only segment files under `data_dir/records`, each named by the
//! sequence number of its first record. A record is a frame — payload length, CRC-32 of the
//! rest, sequence number, the sequence number of its transaction's Begin, its kind — and the
//! payload (a postcard `Record`).
//!
//! Records are written once, read in order and removed a whole file at a time, which is what
//! a change log does; kept in sled's tree instead, every append copied a tree node and the
//! replaced copies waited for an epoch to be freed, so a large transaction or backlog held
//! tens of MiB (benches/README.md). Here the memory is a write buffer, one read buffer per
//! read, and a sparse index of where every `INDEX_EVERY`-th record is.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufReader, ErrorKind, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A segment is closed (and a new one started) once it holds this many bytes: the trimmer
/// removes whole segments, so this is also how far trimming lags behind the slowest sink.
pub const SEGMENT_BYTES: u64 = 16 * 1024 * 1024;
/// One index entry per this many records: a read starts at most this many records early.
const INDEX_EVERY: u64 = 1024;
/// Recent read ends remembered, so a sink's next read starts where its last one stopped.
const HINTS: usize = 16;
const HEADER_BYTES: usize = 25;
/// No record comes near this; a larger length is damage, not data.
const MAX_PAYLOAD_BYTES: u32 = 1 << 30;
const READ_BUFFER_BYTES: usize = 128 * 1024;
const WRITE_BUFFER_BYTES: usize = 256 * 1024;
const SUFFIX: &str = ".seg";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Begin,
    Change,
    Commit,
}

impl Kind {
    fn byte(self) -> u8 {
        match self {
            Kind::Begin => 0,
            Kind::Change => 1,
            Kind::Commit => 2,
        }
    }

    fn from_byte(byte: u8) -> Option<Kind> {
        match byte {
            0 => Some(Kind::Begin),
            1 => Some(Kind::Change),
            2 => Some(Kind::Commit),
            _ => None,
        }
    }
}

/// Where a record starts: its segment (by first sequence number) and byte offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Location {
    pub segment: u64,
    pub offset: u64,
}

/// A record read back.
pub struct Frame {
    pub seq: u64,
    pub kind: Kind,
    pub payload: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    #[error(
        "cannot use the offset log's records in {path}: {source}; check that agent.data_dir \
         is writable and has free space"
    )]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Damaged { path: PathBuf, reason: String },
}

/// What `open` found: the segments left after the crash tail was removed.
pub struct Opened {
    pub segments: Segments,
    /// The last Commit's sequence number and payload; None when the log holds none.
    pub last_commit: Option<(u64, Vec<u8>)>,
}

/// What readers, the trimmer and the writer share (behind the log's mutex).
pub struct Segments {
    dir: PathBuf,
    /// Each segment's first sequence number → bytes written to it (the one appended to is
    /// updated at every Commit).
    sizes: BTreeMap<u64, u64>,
    /// Sequence number → location, for every `INDEX_EVERY`-th record and each segment's first.
    index: BTreeMap<u64, Location>,
    hints: VecDeque<(u64, Location)>,
    /// The oldest record readers see (trimmed below it) and where it is.
    floor: (u64, Location),
    /// The segment being appended to, for the flusher's fsync.
    active: Option<Arc<File>>,
}

impl Segments {
    /// Opens the directory, validating every segment and removing what follows the last
    /// Commit (a crash's torn or uncommitted tail).
    pub fn open(dir: &Path) -> Result<Opened, SegmentError> {
        std::fs::create_dir_all(dir).map_err(io_error(dir))?;
        let mut firsts = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io_error(dir))? {
            let entry = entry.map_err(io_error(dir))?;
            let name = entry.file_name();
            let Some(first) = name
                .to_str()
                .and_then(|n| n.strip_suffix(SUFFIX))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            firsts.push(first);
        }
        firsts.sort_unstable();
        let mut segments = Segments {
            dir: dir.to_path_buf(),
            sizes: BTreeMap::new(),
            index: BTreeMap::new(),
            hints: VecDeque::new(),
            floor: (0, Location::default()),
            active: None,
        };
        let mut last_commit: Option<(u64, Location, u64)> = None;
        let mut floor = None;
        let mut expected = firsts.first().copied();
        for (i, &first) in firsts.iter().enumerate() {
            let path = segments.path(first);
            if expected != Some(first) {
                return Err(SegmentError::Damaged {
                    path,
                    reason: format!(
                        "the segment starts at record {first}, but the next record after the \
                         segment before it is {}",
                        expected.unwrap_or(0)
                    ),
                });
            }
            let scan = scan(&path, first, i + 1 == firsts.len())?;
            for (seq, offset) in scan.indexed {
                segments.index.insert(
                    seq,
                    Location {
                        segment: first,
                        offset,
                    },
                );
            }
            if let Some((seq, offset, end)) = scan.last_commit {
                last_commit = Some((
                    seq,
                    Location {
                        segment: first,
                        offset,
                    },
                    end,
                ));
            }
            if floor.is_none() {
                floor = scan.first_begin.map(|(seq, offset)| {
                    (
                        seq,
                        Location {
                            segment: first,
                            offset,
                        },
                    )
                });
            }
            segments.sizes.insert(first, scan.end);
            expected = Some(first + scan.records);
        }
        let Some((commit_seq, commit_at, commit_end)) = last_commit else {
            // Nothing committed: whatever is here is a first transaction cut short.
            for &first in &firsts {
                segments.remove_file(first)?;
            }
            segments.sizes.clear();
            segments.index.clear();
            return Ok(Opened {
                segments,
                last_commit: None,
            });
        };
        for &first in firsts.iter().filter(|&&f| f > commit_at.segment) {
            segments.remove_file(first)?;
            segments.sizes.remove(&first);
        }
        let path = segments.path(commit_at.segment);
        let file = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(io_error(&path))?;
        file.set_len(commit_end).map_err(io_error(&path))?;
        segments.sizes.insert(commit_at.segment, commit_end);
        segments.index.retain(|&seq, _| seq <= commit_seq);
        segments.floor = floor.unwrap_or((commit_seq, commit_at));
        let mut reader = SegmentReader::at(dir, commit_seq, commit_at)?;
        let payload = reader.next()?.map(|f| f.payload).unwrap_or_default();
        Ok(Opened {
            segments,
            last_commit: Some((commit_seq, payload)),
        })
    }

    pub fn floor(&self) -> u64 {
        self.floor.0
    }

    /// The best known place to start reading for record `seq`: the furthest remembered read
    /// end or indexed record at or before it.
    pub fn nearest(&self, seq: u64) -> (u64, Location) {
        let mut best = self.floor;
        if let Some((&indexed, &at)) = self.index.range(..=seq).next_back() {
            if indexed > best.0 {
                best = (indexed, at);
            }
        }
        for &(hint, at) in &self.hints {
            if hint <= seq && hint > best.0 {
                best = (hint, at);
            }
        }
        best
    }

    /// Remembers that record `seq` is at `at` (where a read stopped).
    pub fn remember(&mut self, seq: u64, at: Location) {
        if self.hints.len() == HINTS {
            self.hints.pop_front();
        }
        self.hints.push_back((seq, at));
    }

    /// Bytes of records from the floor on.
    pub fn held_bytes(&self) -> u64 {
        let (_, at) = self.floor;
        self.sizes
            .range(at.segment..)
            .map(|(_, size)| size)
            .sum::<u64>()
            .saturating_sub(at.offset)
    }

    /// Whether record `seq` belongs in the sparse index (`index` it once appended).
    pub fn indexes(seq: u64) -> bool {
        seq.is_multiple_of(INDEX_EVERY)
    }

    /// Notes where record `seq` is, in the sparse index.
    pub fn index(&mut self, seq: u64, at: Location) {
        self.index.insert(seq, at);
    }

    /// Where the last segment ends: after `open`, where the last Commit ends.
    pub fn end(&self) -> Option<Location> {
        self.sizes
            .last_key_value()
            .map(|(&segment, &offset)| Location { segment, offset })
    }

    pub fn bytes(&self) -> u64 {
        self.sizes.values().sum()
    }

    pub fn active(&self) -> Option<Arc<File>> {
        self.active.clone()
    }

    /// Raises the floor to record `seq` at `at`, and returns the segments wholly below it,
    /// forgotten here; the caller removes their files.
    pub fn raise_floor(&mut self, seq: u64, at: Location) -> Vec<PathBuf> {
        if seq <= self.floor.0 {
            return Vec::new();
        }
        self.floor = (seq, at);
        let below: Vec<u64> = self.sizes.range(..at.segment).map(|(&f, _)| f).collect();
        for first in &below {
            self.sizes.remove(first);
        }
        self.index = self.index.split_off(&seq);
        self.hints
            .retain(|&(hint, place)| hint >= seq && place.segment >= at.segment);
        below.into_iter().map(|first| self.path(first)).collect()
    }

    fn path(&self, first: u64) -> PathBuf {
        segment_path(&self.dir, first)
    }

    fn remove_file(&self, first: u64) -> Result<(), SegmentError> {
        let path = self.path(first);
        std::fs::remove_file(&path).map_err(io_error(&path))
    }

    /// Forgets everything from record `seq` on (an uncommitted transaction discarded).
    fn forget_from(&mut self, seq: u64) {
        self.index.split_off(&seq);
        self.hints.retain(|&(hint, _)| hint < seq);
    }
}

/// What a scan of one segment found.
struct Scan {
    records: u64,
    /// Where the valid records end.
    end: u64,
    indexed: Vec<(u64, u64)>,
    /// The last Commit: sequence number, offset, end offset.
    last_commit: Option<(u64, u64, u64)>,
    first_begin: Option<(u64, u64)>,
}

/// Reads a segment's frames. Every segment but the last must be whole; the last may end in a
/// torn write (a crash while appending), which is cut off. Only the last segment's payloads
/// are checked here: the others were whole when the next one was started, and every read
/// checks what it returns.
fn scan(path: &Path, first: u64, last: bool) -> Result<Scan, SegmentError> {
    let file = File::open(path).map_err(io_error(path))?;
    let length = file.metadata().map_err(io_error(path))?.len();
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, file);
    let mut scan = Scan {
        records: 0,
        end: 0,
        indexed: Vec::new(),
        last_commit: None,
        first_begin: None,
    };
    let damaged = |offset: u64, reason: &str| SegmentError::Damaged {
        path: path.to_path_buf(),
        reason: format!("{reason} at byte {offset}"),
    };
    let mut payload = Vec::new();
    while scan.end < length {
        let seq = first + scan.records;
        let offset = scan.end;
        let problem = match read_header(&mut reader) {
            Ok(Some(header)) if header.seq != seq => Some("a record out of sequence"),
            Ok(Some(header))
                if offset + (HEADER_BYTES as u64) + u64::from(header.length) > length =>
            {
                Some("a record cut short")
            }
            Ok(Some(header)) => {
                let intact = if last {
                    payload.resize(header.length as usize, 0);
                    reader.read_exact(&mut payload).map_err(io_error(path))?;
                    header.checksum == checksum(&header, &payload)
                } else {
                    reader
                        .seek_relative(i64::from(header.length))
                        .map_err(io_error(path))?;
                    true
                };
                if intact {
                    scan.end = offset + HEADER_BYTES as u64 + u64::from(header.length);
                    scan.records += 1;
                    if seq == first || Segments::indexes(seq) {
                        scan.indexed.push((seq, offset));
                    }
                    match header.kind {
                        Kind::Commit => scan.last_commit = Some((seq, offset, scan.end)),
                        Kind::Begin if scan.first_begin.is_none() => {
                            scan.first_begin = Some((seq, offset));
                        }
                        _ => {}
                    }
                    continue;
                }
                Some("a record whose checksum does not match")
            }
            Ok(None) => Some("a record header cut short"),
            Err(HeaderError::Io(e)) => return Err(io_error(path)(e)),
            Err(HeaderError::Invalid(reason)) => Some(reason),
        };
        if let Some(reason) = problem {
            if !last {
                return Err(damaged(offset, reason));
            }
            tracing::warn!(path = %path.display(), offset, reason, "offset log: dropping a torn tail");
            break;
        }
    }
    Ok(scan)
}

struct Header {
    length: u32,
    checksum: u32,
    seq: u64,
    begin: u64,
    kind: Kind,
}

enum HeaderError {
    Io(std::io::Error),
    Invalid(&'static str),
}

/// Reads a frame header; None at the end of the file (or in the middle of a header).
fn read_header(reader: &mut impl Read) -> Result<Option<Header>, HeaderError> {
    let mut bytes = [0u8; HEADER_BYTES];
    match reader.read_exact(&mut bytes) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(HeaderError::Io(e)),
    }
    let u32_at =
        |i: usize| u32::from_be_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    let u64_at = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[i..i + 8]);
        u64::from_be_bytes(b)
    };
    let length = u32_at(0);
    if length > MAX_PAYLOAD_BYTES {
        return Err(HeaderError::Invalid("a record of impossible length"));
    }
    let kind =
        Kind::from_byte(bytes[24]).ok_or(HeaderError::Invalid("a record of unknown kind"))?;
    Ok(Some(Header {
        length,
        checksum: u32_at(4),
        seq: u64_at(8),
        begin: u64_at(16),
        kind,
    }))
}

fn checksum(header: &Header, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&header.seq.to_be_bytes());
    hasher.update(&header.begin.to_be_bytes());
    hasher.update(&[header.kind.byte()]);
    hasher.update(payload);
    hasher.finalize()
}

fn segment_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}{SUFFIX}"))
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> SegmentError + '_ {
    move |source| SegmentError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads records in order from a known location on, across segments.
pub struct SegmentReader {
    dir: PathBuf,
    file: Option<BufReader<File>>,
    next_seq: u64,
    at: Location,
}

impl SegmentReader {
    /// A reader whose first record is `seq`, at `at`.
    pub fn at(dir: &Path, seq: u64, at: Location) -> Result<SegmentReader, SegmentError> {
        let path = segment_path(dir, at.segment);
        let mut file = File::open(&path).map_err(io_error(&path))?;
        file.seek(SeekFrom::Start(at.offset))
            .map_err(io_error(&path))?;
        Ok(SegmentReader {
            dir: dir.to_path_buf(),
            file: Some(BufReader::with_capacity(READ_BUFFER_BYTES, file)),
            next_seq: seq,
            at,
        })
    }

    /// The sequence number and location of the record `next` reads.
    pub fn position(&self) -> (u64, Location) {
        (self.next_seq, self.at)
    }

    /// The next record, its checksum verified; None past the last record written.
    pub fn next(&mut self) -> Result<Option<Frame>, SegmentError> {
        let Some(header) = self.header()? else {
            return Ok(None);
        };
        let mut payload = vec![0; header.length as usize];
        self.read_payload(&mut payload)?;
        if header.checksum != checksum(&header, &payload) {
            return Err(self.damaged("its checksum does not match"));
        }
        Ok(Some(Frame {
            seq: header.seq,
            kind: header.kind,
            payload,
        }))
    }

    /// Passes over the next record without reading its payload; returns its header's begin
    /// and kind, or None past the last record written.
    pub fn skip(&mut self) -> Result<Option<(u64, Kind)>, SegmentError> {
        let Some(header) = self.header()? else {
            return Ok(None);
        };
        let path = self.path();
        if let Some(file) = self.file.as_mut() {
            file.seek_relative(i64::from(header.length))
                .map_err(io_error(&path))?;
        }
        self.advance(header.length);
        Ok(Some((header.begin, header.kind)))
    }

    fn header(&mut self) -> Result<Option<Header>, SegmentError> {
        loop {
            let path = self.path();
            let Some(file) = self.file.as_mut() else {
                return Ok(None);
            };
            match read_header(file) {
                Ok(Some(header)) if header.seq == self.next_seq => return Ok(Some(header)),
                Ok(Some(header)) => {
                    return Err(self.damaged(&format!("record {} found", header.seq)));
                }
                Ok(None) => {
                    // The end of this segment: the next record starts the next one, if any.
                    let next = segment_path(&self.dir, self.next_seq);
                    match File::open(&next) {
                        Ok(file) => {
                            self.file = Some(BufReader::with_capacity(READ_BUFFER_BYTES, file));
                            self.at = Location {
                                segment: self.next_seq,
                                offset: 0,
                            };
                        }
                        Err(e) if e.kind() == ErrorKind::NotFound => {
                            self.file = None;
                            return Ok(None);
                        }
                        Err(e) => return Err(io_error(&next)(e)),
                    }
                }
                Err(HeaderError::Io(e)) => return Err(io_error(&path)(e)),
                Err(HeaderError::Invalid(reason)) => return Err(self.damaged(reason)),
            }
        }
    }

    fn read_payload(&mut self, payload: &mut [u8]) -> Result<(), SegmentError> {
        let path = self.path();
        if let Some(file) = self.file.as_mut() {
            file.read_exact(payload).map_err(io_error(&path))?;
        }
        self.advance(payload.len() as u32);
        Ok(())
    }

    fn advance(&mut self, length: u32) {
        self.at.offset += HEADER_BYTES as u64 + u64::from(length);
        self.next_seq += 1;
    }

    fn path(&self) -> PathBuf {
        segment_path(&self.dir, self.at.segment)
    }

    fn damaged(&self, reason: &str) -> SegmentError {
        SegmentError::Damaged {
            path: self.path(),
            reason: format!(
                "reading record {} at byte {}: {reason}",
                self.next_seq, self.at.offset
            ),
        }
    }
}

/// Appends frames to the last segment, starting a new one when it is full.
pub struct SegmentWriter {
    dir: PathBuf,
    file: File,
    /// Frames not handed to the file yet; dropped, not written, when they are discarded.
    buffer: Vec<u8>,
    at: Location,
}

impl SegmentWriter {
    /// Appends at `end` (where the last Commit ends), or starts the first segment there.
    pub fn open(segments: &mut Segments, end: Location) -> Result<SegmentWriter, SegmentError> {
        let path = segments.path(end.segment);
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_error(&path))?;
        // Whatever lies past `end` is no record (a file of the same name that a crash left,
        // a discarded tail).
        file.set_len(end.offset).map_err(io_error(&path))?;
        file.seek(SeekFrom::Start(end.offset))
            .map_err(io_error(&path))?;
        if segments.sizes.insert(end.segment, end.offset).is_none() {
            let start = Location {
                segment: end.segment,
                offset: 0,
            };
            segments.index.insert(end.segment, start);
            if segments.floor.0 == 0 {
                segments.floor = (end.segment, start);
            }
            sync_dir(&segments.dir)?;
        }
        segments.active = Some(Arc::new(file.try_clone().map_err(io_error(&path))?));
        Ok(SegmentWriter {
            dir: segments.dir.clone(),
            file,
            buffer: Vec::with_capacity(WRITE_BUFFER_BYTES),
            at: end,
        })
    }

    /// Where the next record goes.
    pub fn end(&self) -> Location {
        self.at
    }

    /// Whether the segment is full: the next record should start a new one.
    pub fn full(&self) -> bool {
        self.at.offset >= SEGMENT_BYTES
    }

    /// Appends a record; returns where it starts.
    pub fn append(
        &mut self,
        seq: u64,
        begin: u64,
        kind: Kind,
        payload: &[u8],
    ) -> Result<Location, SegmentError> {
        let at = self.at;
        let length = u32::try_from(payload.len())
            .ok()
            .filter(|&l| l <= MAX_PAYLOAD_BYTES)
            .ok_or_else(|| SegmentError::Io {
                path: self.path(),
                source: std::io::Error::new(ErrorKind::InvalidInput, "a record of 1 GiB or more"),
            })?;
        let header = Header {
            length,
            checksum: 0,
            seq,
            begin,
            kind,
        };
        self.buffer.extend_from_slice(&length.to_be_bytes());
        self.buffer
            .extend_from_slice(&checksum(&header, payload).to_be_bytes());
        self.buffer.extend_from_slice(&seq.to_be_bytes());
        self.buffer.extend_from_slice(&begin.to_be_bytes());
        self.buffer.push(kind.byte());
        self.buffer.extend_from_slice(payload);
        self.at.offset += (HEADER_BYTES + payload.len()) as u64;
        if self.buffer.len() >= WRITE_BUFFER_BYTES {
            self.write_buffer()?;
        }
        Ok(at)
    }

    fn write_buffer(&mut self) -> Result<(), SegmentError> {
        let path = self.path();
        self.file.write_all(&self.buffer).map_err(io_error(&path))?;
        self.buffer.clear();
        Ok(())
    }

    /// Hands what is buffered to the operating system (readers can see it; the flusher's
    /// fsync makes it durable), and records the segment's size.
    pub fn write_out(&mut self, segments: &mut Segments) -> Result<(), SegmentError> {
        self.write_buffer()?;
        segments.sizes.insert(self.at.segment, self.at.offset);
        Ok(())
    }

    /// Closes the full segment (written out and fsynced: the flusher only syncs the one being
    /// appended to) and starts the next with record `seq`.
    pub fn start_segment(&mut self, segments: &mut Segments, seq: u64) -> Result<(), SegmentError> {
        self.write_out(segments)?;
        let path = self.path();
        self.file.sync_data().map_err(io_error(&path))?;
        *self = SegmentWriter::open(
            segments,
            Location {
                segment: seq,
                offset: 0,
            },
        )?;
        Ok(())
    }

    /// Drops everything appended after `end` (record `seq` on): the buffer, the segments
    /// started since, and (reopening at `end`) the bytes written past it.
    pub fn truncate(
        &mut self,
        segments: &mut Segments,
        seq: u64,
        end: Location,
    ) -> Result<(), SegmentError> {
        let later: Vec<u64> = segments
            .sizes
            .range(end.segment + 1..)
            .map(|(&f, _)| f)
            .collect();
        self.buffer.clear();
        for first in later {
            segments.remove_file(first)?;
            segments.sizes.remove(&first);
        }
        segments.forget_from(seq);
        *self = SegmentWriter::open(segments, end)?;
        Ok(())
    }

    fn path(&self) -> PathBuf {
        segment_path(&self.dir, self.at.segment)
    }
}

/// Makes a new segment's name durable.
fn sync_dir(dir: &Path) -> Result<(), SegmentError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir))
}
