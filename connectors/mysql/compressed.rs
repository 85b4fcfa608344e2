//! MariaDB's compressed binlog events (`log_bin_compress = ON`) unwrapped into the plain
//! events they stand for, so that the stream decodes one form of each. MariaDB compresses a
//! query event's statement and a rows event's row images — never their headers — with zlib,
//! behind one byte `0x80 | n` and the uncompressed length in `n` big-endian bytes.

use std::io::{self, Read};

use mysql_async::binlog::events::Event;

const QUERY: u8 = 2;
const QUERY_COMPRESSED: u8 = 165;
/// MariaDB's compressed rows events, in the order of the plain ones they compress:
/// write, update, delete v1 (23–25), then write, update, delete v2 (30–32).
const ROWS_COMPRESSED_V1: std::ops::RangeInclusive<u8> = 166..=168;
const ROWS_COMPRESSED_V2: std::ops::RangeInclusive<u8> = 169..=171;
const UPDATE_ROWS_COMPRESSED: [u8; 2] = [167, 170];
const EVENT_HEADER_LEN: usize = 19;
/// A query event's fixed part: thread id, seconds, database name length, error code and the
/// status variables' length.
const QUERY_POST_HEADER_LEN: usize = 13;
/// A rows event's table id (6 bytes) and flags; v2 adds the length of its extra data.
const ROWS_POST_HEADER_LEN: usize = 8;
/// Uncompressed lengths above this are not a binlog event's (MariaDB's events are below 4 GiB).
const MAX_UNCOMPRESSED_LEN: usize = u32::MAX as usize;

/// Whether `event_type` is one of MariaDB's compressed events.
pub fn is_compressed(event_type: u8) -> bool {
    event_type == QUERY_COMPRESSED
        || ROWS_COMPRESSED_V1.contains(&event_type)
        || ROWS_COMPRESSED_V2.contains(&event_type)
}

/// The plain event a compressed one stands for, with the same header (time, server id,
/// position, flags) and its body decompressed.
pub fn unwrap(event: &Event) -> io::Result<Event> {
    let header = event.header();
    let compressed_type = header.event_type_raw();
    let data = event.data();
    let (plain_type, kept) = match compressed_type {
        QUERY_COMPRESSED => (QUERY, query_prefix_len(data)?),
        t if ROWS_COMPRESSED_V1.contains(&t) => (
            t - ROWS_COMPRESSED_V1.start() + 23,
            rows_prefix_len(data, false, UPDATE_ROWS_COMPRESSED.contains(&t))?,
        ),
        t if ROWS_COMPRESSED_V2.contains(&t) => (
            t - ROWS_COMPRESSED_V2.start() + 30,
            rows_prefix_len(data, true, UPDATE_ROWS_COMPRESSED.contains(&t))?,
        ),
        t => {
            return Err(malformed(format!(
                "event type {t} is not a compressed event"
            )))
        }
    };
    let body = decompress(&data[kept..])?;
    let event_size = u32::try_from(EVENT_HEADER_LEN + kept + body.len())
        .map_err(|_| malformed("the decompressed event is larger than 4 GiB".into()))?;
    let mut bytes = Vec::with_capacity(EVENT_HEADER_LEN + kept + body.len());
    bytes.extend_from_slice(&header.timestamp().to_le_bytes());
    bytes.push(plain_type);
    bytes.extend_from_slice(&header.server_id().to_le_bytes());
    bytes.extend_from_slice(&event_size.to_le_bytes());
    bytes.extend_from_slice(&header.log_pos().to_le_bytes());
    bytes.extend_from_slice(&header.flags_raw().to_le_bytes());
    bytes.extend_from_slice(&data[..kept]);
    bytes.extend_from_slice(&body);
    // The bytes built here carry no checksum: the compressed event's was checked on arrival.
    let mut footer = event.footer();
    footer.set_checksum_enabled(false);
    let fde = event.fde().clone().with_footer(footer);
    Event::read(&fde, bytes.as_slice())
}

/// The length of a compressed query event's uncompressed part: the fixed part, the status
/// variables and the NUL-terminated database name.
fn query_prefix_len(data: &[u8]) -> io::Result<usize> {
    let fixed = data
        .get(..QUERY_POST_HEADER_LEN)
        .ok_or_else(|| malformed("a compressed query event is shorter than its header".into()))?;
    let database_len = usize::from(fixed[8]);
    let status_len = usize::from(u16::from_le_bytes([fixed[11], fixed[12]]));
    let len = QUERY_POST_HEADER_LEN + status_len + database_len + 1;
    within(data, len, "query")
}

/// The length of a compressed rows event's uncompressed part: table id, flags, v2's extra
/// data, the column count and the column bitmaps (two for updates).
fn rows_prefix_len(data: &[u8], v2: bool, update: bool) -> io::Result<usize> {
    let mut at = ROWS_POST_HEADER_LEN;
    if v2 {
        let extra = data.get(at..at + 2).ok_or_else(|| {
            malformed("a compressed rows event is shorter than its header".into())
        })?;
        // The length counts its own two bytes.
        at += usize::from(u16::from_le_bytes([extra[0], extra[1]])).max(2);
    }
    let (columns, width) = length_encoded(data.get(at..).unwrap_or_default())?;
    at += width;
    let bitmap = usize::try_from(columns.div_ceil(8))
        .map_err(|_| malformed(format!("a compressed rows event claims {columns} columns")))?;
    at += bitmap * if update { 2 } else { 1 };
    within(data, at, "rows")
}

fn within(data: &[u8], len: usize, kind: &str) -> io::Result<usize> {
    if len <= data.len() {
        Ok(len)
    } else {
        Err(malformed(format!(
            "a compressed {kind} event of {} bytes claims a header of {len}",
            data.len()
        )))
    }
}

/// A length-encoded integer: the value and the bytes it took.
fn length_encoded(bytes: &[u8]) -> io::Result<(u64, usize)> {
    let short = || malformed("a compressed rows event ends inside its column count".into());
    let first = *bytes.first().ok_or_else(short)?;
    let width = match first {
        0..=0xfa => return Ok((u64::from(first), 1)),
        0xfc => 2,
        0xfd => 3,
        0xfe => 8,
        _ => return Err(malformed(format!("{first:#x} starts no column count"))),
    };
    let value = bytes.get(1..=width).ok_or_else(short)?;
    let mut le = [0u8; 8];
    le[..width].copy_from_slice(value);
    Ok((u64::from_le_bytes(le), 1 + width))
}

/// MariaDB's compressed block: `0x80 | n`, the uncompressed length in `n` big-endian bytes,
/// the zlib stream.
fn decompress(block: &[u8]) -> io::Result<Vec<u8>> {
    let (&lead, rest) = block
        .split_first()
        .ok_or_else(|| malformed("a compressed event has no compressed body".into()))?;
    let len_width = usize::from(lead & 0x07);
    if lead & 0x80 == 0 || !(1..=4).contains(&len_width) {
        return Err(malformed(format!(
            "a compressed body starts with {lead:#04x}, not 0x81–0x84"
        )));
    }
    let (len_bytes, stream) = rest
        .split_at_checked(len_width)
        .ok_or_else(|| malformed("a compressed body ends inside its length".into()))?;
    let len = len_bytes
        .iter()
        .fold(0usize, |len, &b| (len << 8) | usize::from(b));
    if len > MAX_UNCOMPRESSED_LEN {
        return Err(malformed(format!("a compressed body claims {len} bytes")));
    }
    let mut body = Vec::with_capacity(len);
    flate2::read::ZlibDecoder::new(stream)
        .take(len as u64 + 1)
        .read_to_end(&mut body)?;
    if body.len() != len {
        return Err(malformed(format!(
            "a compressed body decompressed to {} bytes, its header says {len}",
            body.len()
        )));
    }
    Ok(body)
}

fn malformed(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn compressed_block(plain: &[u8]) -> Vec<u8> {
        let len = u32::try_from(plain.len()).unwrap();
        let width = if len > 0xff_ffff {
            4
        } else if len > 0xffff {
            3
        } else if len > 0xff {
            2
        } else {
            1
        };
        let mut block = vec![0x80 | width];
        block.extend_from_slice(&len.to_be_bytes()[4 - usize::from(width)..]);
        let mut zlib = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        zlib.write_all(plain).unwrap();
        block.extend(zlib.finish().unwrap());
        block
    }

    #[test]
    fn a_compressed_block_decompresses_to_its_stated_length() {
        for size in [0, 1, 255, 256, 70_000] {
            let plain: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            assert_eq!(decompress(&compressed_block(&plain)).unwrap(), plain);
        }
    }

    #[test]
    fn a_block_whose_length_lies_is_refused() {
        let mut block = compressed_block(b"twelve bytes");
        block[1] = 11;
        let error = decompress(&block).unwrap_err();
        assert!(error.to_string().contains("header says 11"), "{error}");
        assert!(decompress(&[0x05, 1, 2]).is_err());
        assert!(decompress(&[]).is_err());
    }

    #[test]
    fn a_rows_event_keeps_its_header_and_bitmaps_uncompressed() {
        // Table id, flags, 10 columns (one length byte), one bitmap of two bytes.
        let mut data = vec![7, 0, 0, 0, 0, 0, 1, 0, 10, 0xff, 0x03];
        data.extend(compressed_block(b"rows"));
        assert_eq!(rows_prefix_len(&data, false, false).unwrap(), 11);
        // An update's two bitmaps; v2's extra data of 2 + 3 bytes.
        assert_eq!(rows_prefix_len(&data, false, true).unwrap(), 13);
        let mut v2 = vec![7, 0, 0, 0, 0, 0, 1, 0, 5, 0, 9, 9, 9, 10, 0xff, 0x03];
        v2.extend(compressed_block(b"rows"));
        assert_eq!(rows_prefix_len(&v2, true, false).unwrap(), 16);
        assert!(rows_prefix_len(&data[..9], false, false).is_err());
    }

    #[test]
    fn a_query_event_keeps_its_status_and_database_uncompressed() {
        // Thread 1, 0 s, database "db" (2), error 0, 3 bytes of status variables.
        let mut data = vec![
            1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 3, 0, 9, 9, 9, b'd', b'b', 0,
        ];
        assert_eq!(query_prefix_len(&data).unwrap(), 19);
        data.truncate(18);
        assert!(query_prefix_len(&data).is_err());
    }
}
