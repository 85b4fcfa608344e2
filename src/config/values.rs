//! The value kinds of the file besides plain strings and connection strings: names, paths,
//! counts, addresses, durations and sizes, each with the rule it must satisfy and the message
//! that says how to fix it.

use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use super::check::{Checker, Spot};
use super::document::{Node, Val};

/// PostgreSQL's NAMEDATALEN - 1.
const MAX_NAME_BYTES: usize = 63;

/// Nanoseconds per unit.
const DURATION_UNITS: &[(&str, u128)] = &[
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60_000_000_000),
    ("h", 3_600_000_000_000),
];

/// Bytes per unit; kB/MB/GB are powers of 1000.
const SIZE_UNITS: &[(&str, u128)] = &[
    ("B", 1),
    ("kB", 1_000),
    ("KiB", 1 << 10),
    ("MB", 1_000_000),
    ("MiB", 1 << 20),
    ("GB", 1_000_000_000),
    ("GiB", 1 << 30),
];

impl Checker<'_> {
    /// A string matching `rule`, described by `rule_text`.
    pub(super) fn name(
        &mut self,
        spot: &Spot,
        val: &Val,
        rule: fn(&str) -> bool,
        rule_text: &str,
    ) -> Option<String> {
        let text = self.text(spot, val)?;
        if rule(&text.value) {
            Some(text.value)
        } else {
            self.report(
                spot.at,
                format!("{} must be {rule_text}; found {}", spot.what, text.shown()),
            );
            None
        }
    }

    /// A path, resolved against the config file's directory `base`.
    pub(super) fn path(&mut self, spot: &Spot, val: &Val, base: &Path) -> Option<PathBuf> {
        let text = self.text(spot, val)?;
        if text.value.is_empty() {
            self.report(spot.at, format!("{} must not be empty", spot.what));
            return None;
        }
        Some(resolve(base, &text.value))
    }

    pub(super) fn positive_count(&mut self, spot: &Spot, val: &Val) -> Option<usize> {
        match &val.node {
            Node::Int(n) => match usize::try_from(*n) {
                Ok(n) if n >= 1 => Some(n),
                _ => {
                    self.report(
                        spot.at,
                        format!("{} must be at least 1, found {n}", spot.what),
                    );
                    None
                }
            },
            other => {
                self.wrong_type(spot, "an integer", other);
                None
            }
        }
    }

    pub(super) fn socket_addr(&mut self, spot: &Spot, val: &Val) -> Option<SocketAddr> {
        let text = self.text(spot, val)?;
        match text.value.parse::<SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => {
                self.report(
                    spot.at,
                    format!(
                        "{} must be an IP address and port such as \"127.0.0.1:8686\" (host names are not resolved); found {}",
                        spot.what,
                        text.shown()
                    ),
                );
                None
            }
        }
    }

    pub(super) fn duration(
        &mut self,
        spot: &Spot,
        val: &Val,
        allow_zero: bool,
    ) -> Option<Duration> {
        let units = unit_names(DURATION_UNITS);
        let text = match &val.node {
            Node::Int(n) => {
                self.report(
                    spot.at,
                    format!(
                        "{} is a bare number ({n}); add a unit: write e.g. \"{n}s\" or \"{n}ms\" ({units})",
                        spot.what
                    ),
                );
                return None;
            }
            Node::Float(x) => {
                self.report(
                    spot.at,
                    format!(
                        "{} is a bare number ({x}); add a unit: write e.g. \"{x}s\" ({units})",
                        spot.what
                    ),
                );
                return None;
            }
            _ => self.text(spot, val)?,
        };
        match parse_duration(&text.value) {
            Ok(d) if d.is_zero() && !allow_zero => {
                self.report(spot.at, format!("{} must be greater than zero", spot.what));
                None
            }
            Ok(d) => Some(d),
            Err(NumberError::NoUnit) => {
                let n = text.value.trim();
                let example = if text.raw.is_none() {
                    format!("\"{n}s\" or \"{n}ms\"")
                } else {
                    "\"30s\" or \"500ms\"".to_owned()
                };
                self.report(
                    spot.at,
                    format!(
                        "{} needs a unit: found {}; write e.g. {example} ({units})",
                        spot.what,
                        text.shown()
                    ),
                );
                None
            }
            Err(NumberError::TooLarge) => {
                self.report(
                    spot.at,
                    format!("{} is too large: {}", spot.what, text.shown()),
                );
                None
            }
            Err(NumberError::Invalid) => {
                self.report(
                    spot.at,
                    format!(
                        "{} must be a duration such as \"500ms\", \"30s\", \"1.5s\" or \"2m\" ({units}); found {}",
                        spot.what,
                        text.shown()
                    ),
                );
                None
            }
        }
    }

    /// A number of bytes, at least 1: a bare integer or a string with a unit.
    pub(super) fn size(&mut self, spot: &Spot, val: &Val) -> Option<u64> {
        let units = unit_names(SIZE_UNITS);
        let bytes = match &val.node {
            Node::Int(n) => u64::try_from(*n).unwrap_or(0),
            _ => {
                let text = self.text(spot, val)?;
                match parse_size(&text.value) {
                    Ok(n) => n,
                    Err(NumberError::NoUnit) => {
                        self.report(
                            spot.at,
                            format!(
                                "{} needs a unit: found {}; write e.g. \"64MiB\" ({units}), or a bare integer for bytes",
                                spot.what,
                                text.shown()
                            ),
                        );
                        return None;
                    }
                    Err(NumberError::TooLarge) => {
                        self.report(
                            spot.at,
                            format!("{} is too large: {}", spot.what, text.shown()),
                        );
                        return None;
                    }
                    Err(NumberError::Invalid) => {
                        self.report(
                            spot.at,
                            format!(
                                "{} must be a size such as \"64MiB\", \"1GiB\" or \"500kB\" ({units}) or an integer number of bytes; found {}",
                                spot.what,
                                text.shown()
                            ),
                        );
                        return None;
                    }
                }
            }
        };
        if bytes == 0 {
            self.report(spot.at, format!("{} must be greater than zero", spot.what));
            return None;
        }
        Some(bytes)
    }
}

pub(super) fn is_agent_name(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

pub(super) fn is_sink_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

pub(super) fn is_slot_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME_BYTES
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

pub(super) fn is_publication_name(s: &str) -> bool {
    s.len() <= MAX_NAME_BYTES
        && s.bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// A name used literally (quoted) in SQL: anything PostgreSQL can store.
pub(super) fn is_literal_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_NAME_BYTES && !s.contains('\0')
}

/// `p` against the config file's directory `base`, without `.` components.
pub(super) fn resolve(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    let mut out = base.to_path_buf();
    for component in p.components() {
        if component != Component::CurDir {
            out.push(component);
        }
    }
    if out.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        out
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NumberError {
    NoUnit,
    Invalid,
    TooLarge,
}

/// `"units ms, s, m, h"`, for messages.
fn unit_names(units: &[(&str, u128)]) -> String {
    let names: Vec<&str> = units.iter().map(|(name, _)| *name).collect();
    format!("units {}", names.join(", "))
}

/// `"1.5 GiB"` in the smallest unit of `units`, rounded down.
fn parse_with_unit(s: &str, units: &[(&str, u128)]) -> Result<u128, NumberError> {
    let s = s.trim();
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(end);
    let unit = unit.trim_start();
    if number.is_empty() {
        return Err(NumberError::Invalid);
    }
    if unit.is_empty() {
        // Distinguish "30" (a unit is missing) from garbage.
        return Err(match scale(number, 1) {
            Ok(_) => NumberError::NoUnit,
            Err(e) => e,
        });
    }
    match units.iter().find(|(name, _)| *name == unit) {
        Some((_, per_unit)) => scale(number, *per_unit),
        None => Err(NumberError::Invalid),
    }
}

/// `number` (digits, optionally `.digits`) times `unit`, rounded down; exact in integers.
fn scale(number: &str, unit: u128) -> Result<u128, NumberError> {
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits(whole) || !digits(fraction) || number.ends_with('.') {
        return Err(NumberError::Invalid);
    }
    let whole: u128 = whole.parse().map_err(|_| NumberError::TooLarge)?;
    // Digits past the 12th change the result by less than a nanosecond or byte per unit.
    let fraction = &fraction[..fraction.len().min(12)];
    let scaled_fraction = if fraction.is_empty() {
        0
    } else {
        let value: u128 = fraction.parse().map_err(|_| NumberError::Invalid)?;
        value * unit / 10u128.pow(fraction.len() as u32)
    };
    whole
        .checked_mul(unit)
        .and_then(|w| w.checked_add(scaled_fraction))
        .ok_or(NumberError::TooLarge)
}

/// `"500ms"`, `"30s"`, `"1.5s"`, `"2m"`, `"1h"`.
fn parse_duration(s: &str) -> Result<Duration, NumberError> {
    let nanos = parse_with_unit(s, DURATION_UNITS)?;
    u64::try_from(nanos)
        .map(Duration::from_nanos)
        .map_err(|_| NumberError::TooLarge)
}

/// `"64MiB"`, `"1GiB"`, `"500kB"`, `"100B"`.
fn parse_size(s: &str) -> Result<u64, NumberError> {
    let bytes = parse_with_unit(s, SIZE_UNITS)?;
    u64::try_from(bytes).map_err(|_| NumberError::TooLarge)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::testing::{errors, parse, HEAD, JSONL_SINK};

    #[test]
    fn bad_durations_say_what_is_wrong() {
        let text = format!(
            "{HEAD}connect_timeout = \"30\"\nstatus_interval = \"10 sec\"\n{JSONL_SINK}batch_max_wait = 1.5\n"
        );
        assert_eq!(
            errors(&text),
            [
                r#"tidemark.toml:8:19: "connect_timeout" in [source] needs a unit: found "30"; write e.g. "30s" or "30ms" (units ms, s, m, h)"#,
                r#"tidemark.toml:9:19: "status_interval" in [source] must be a duration such as "500ms", "30s", "1.5s" or "2m" (units ms, s, m, h); found "10 sec""#,
                r#"tidemark.toml:14:18: "batch_max_wait" in [[sink]] "e" is a bare number (1.5); add a unit: write e.g. "1.5s" (units ms, s, m, h)"#,
            ]
            .join("\n")
        );
        let text = format!("{HEAD}connect_timeout = \"0s\"\n{JSONL_SINK}");
        assert_eq!(
            errors(&text),
            r#"tidemark.toml:8:19: "connect_timeout" in [source] must be greater than zero"#
        );
        // Zero is a valid wait: write at once.
        let config = parse(&format!("{HEAD}{JSONL_SINK}batch_max_wait = \"0ms\"\n")).unwrap();
        assert_eq!(config.sinks[0].batch_max_wait, Duration::ZERO);
    }

    #[test]
    fn durations_parse_exactly() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("0.1s"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("2.5ms"), Ok(Duration::from_micros(2500)));
        assert_eq!(parse_duration(" 30 s "), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("0ms"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("30"), Err(NumberError::NoUnit));
        assert_eq!(parse_duration("1.s"), Err(NumberError::Invalid));
        assert_eq!(parse_duration(".5s"), Err(NumberError::Invalid));
        assert_eq!(parse_duration("-1s"), Err(NumberError::Invalid));
        assert_eq!(parse_duration("5d"), Err(NumberError::Invalid));
        assert_eq!(parse_duration("s"), Err(NumberError::Invalid));
        assert_eq!(parse_duration("1.2.3s"), Err(NumberError::Invalid));
        assert_eq!(
            parse_duration("99999999999999h"),
            Err(NumberError::TooLarge)
        );
    }

    #[test]
    fn bad_sizes_say_what_is_wrong() {
        let text = format!(
            "{HEAD}[[sink]]\nname = \"a\"\ntype = \"jsonl\"\npath = \"a\"\nmax_file_bytes = \"64mb\"\n\
             [[sink]]\nname = \"b\"\ntype = \"jsonl\"\npath = \"b\"\nmax_file_bytes = \"4096\"\n\
             [[sink]]\nname = \"c\"\ntype = \"jsonl\"\npath = \"c\"\nmax_file_bytes = 0\n"
        );
        assert_eq!(
            errors(&text),
            [
                r#"tidemark.toml:12:18: "max_file_bytes" in [[sink]] "a" must be a size such as "64MiB", "1GiB" or "500kB" (units B, kB, KiB, MB, MiB, GB, GiB) or an integer number of bytes; found "64mb""#,
                r#"tidemark.toml:17:18: "max_file_bytes" in [[sink]] "b" needs a unit: found "4096"; write e.g. "64MiB" (units B, kB, KiB, MB, MiB, GB, GiB), or a bare integer for bytes"#,
                r#"tidemark.toml:22:18: "max_file_bytes" in [[sink]] "c" must be greater than zero"#,
            ]
            .join("\n")
        );
    }

    #[test]
    fn sizes_parse_with_decimal_and_binary_units() {
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("500kB"), Ok(500_000));
        assert_eq!(parse_size("2KiB"), Ok(2048));
        assert_eq!(parse_size("3MB"), Ok(3_000_000));
        assert_eq!(parse_size("1GB"), Ok(1_000_000_000));
        assert_eq!(parse_size("100B"), Ok(100));
        assert_eq!(parse_size("1.5KiB"), Ok(1536));
        assert_eq!(parse_size("64 MiB"), Ok(64 << 20));
        assert_eq!(parse_size("64"), Err(NumberError::NoUnit));
        assert_eq!(parse_size("64KB"), Err(NumberError::Invalid));
        assert_eq!(parse_size("MiB"), Err(NumberError::Invalid));
        assert_eq!(parse_size("99999999999GiB"), Err(NumberError::TooLarge));
    }
}
