//! Rows of `COPY … TO STDOUT` in text format, as the source's snapshot and incremental reads
//! receive them and the log keeps them ([`crate::event::SnapshotRows`]): lines checked
//! (UTF-8, a field per column), fields unescaped ("COPY", section "Text Format", in the
//! PostgreSQL manual) and converted to values as streamed values are.

use crate::event::{Column, Relation, Row, Value};

/// Rows in COPY text format (whole lines, as [`crate::event::SnapshotRows`] holds them) as rows of
/// `relation`; the error says which row is malformed and how.
pub fn parse_copy_rows(relation: &Relation, text: &[u8]) -> Result<Vec<Row>, String> {
    let ends = check_lines(relation, text)?;
    let text = std::str::from_utf8(&text[..ends.last().copied().unwrap_or_default()])
        .map_err(|_| malformed_row(relation, "not UTF-8"))?;
    let mut start = 0;
    ends.into_iter()
        .map(|end| {
            // A line end is a character boundary: the slice is whole characters.
            let line = &text[start..end - 1];
            start = end;
            parse_row(relation, line)
        })
        .collect()
}

/// One line of COPY text output (a field per column, checked) as a row of `relation`.
fn parse_row(relation: &Relation, line: &str) -> Result<Row, String> {
    let malformed = |what: &str| malformed_row(relation, what);
    line.split('\t')
        .zip(&relation.columns)
        .map(|(field, column)| {
            if field == "\\N" {
                return Ok(Value::Null);
            }
            let text = unescape(field).ok_or_else(|| malformed("a bad escape"))?;
            Ok(parse_column(relation, column, &text))
        })
        .collect()
}

/// Checks whole lines of COPY text output (values are parsed when a sink needs them): UTF-8
/// (checked at once: a line end never falls inside a character), a field for each column of
/// `relation`. Returns where each line ends (past its `\n`); bytes after the last `\n` are
/// not looked at.
pub fn check_lines(relation: &Relation, text: &[u8]) -> Result<Vec<usize>, String> {
    let text = match memchr::memrchr(b'\n', text) {
        Some(last) => &text[..=last],
        None => return Ok(Vec::new()),
    };
    if std::str::from_utf8(text).is_err() {
        return Err(malformed_row(relation, "not UTF-8"));
    }
    let mut ends = Vec::new();
    let mut fields = 1;
    for at in memchr::memchr2_iter(b'\t', b'\n', text) {
        if text[at] == b'\t' {
            fields += 1;
            continue;
        }
        if fields != relation.columns.len() {
            return Err(malformed_row(
                relation,
                &format!(
                    "{fields} fields for {} columns in row {}",
                    relation.columns.len(),
                    ends.len() + 1
                ),
            ));
        }
        fields = 1;
        ends.push(at + 1);
    }
    Ok(ends)
}

pub fn malformed_row(relation: &Relation, what: &str) -> String {
    format!(
        "COPY of {} returned a malformed row ({what})",
        relation.qualified_name()
    )
}

/// A COPY text field without its backslash escapes; None when an escape is malformed.
fn unescape(field: &str) -> Option<std::borrow::Cow<'_, str>> {
    if !field.contains('\\') {
        return Some(std::borrow::Cow::Borrowed(field));
    }
    let mut out = Vec::with_capacity(field.len());
    let bytes = field.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'\\' {
            out.push(bytes[i]);
            i += 1;
            continue;
        }
        let escaped = *bytes.get(i + 1)?;
        i += 2;
        match escaped {
            b'b' => out.push(0x08),
            b'f' => out.push(0x0c),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(0x0b),
            b'0'..=b'7' => {
                let mut value = u32::from(escaped - b'0');
                for _ in 0..2 {
                    match bytes.get(i) {
                        Some(&d @ b'0'..=b'7') => {
                            value = value * 8 + u32::from(d - b'0');
                            i += 1;
                        }
                        _ => break,
                    }
                }
                out.push(u8::try_from(value & 0xff).ok()?);
            }
            b'x' => {
                let mut value = 0u32;
                let mut digits = 0;
                while digits < 2 {
                    match bytes.get(i).and_then(|b| char::from(*b).to_digit(16)) {
                        Some(d) => {
                            value = value * 16 + d;
                            i += 1;
                            digits += 1;
                        }
                        None => break,
                    }
                }
                if digits == 0 {
                    out.push(b'x');
                } else {
                    out.push(u8::try_from(value).ok()?);
                }
            }
            other => out.push(other),
        }
    }
    String::from_utf8(out).ok().map(std::borrow::Cow::Owned)
}

/// A column's text as the server printed it, converted to its value; a value the type
/// conversion cannot read is kept as its text, with a warning, rather than stopping capture
/// or losing it.
pub fn parse_column(relation: &Relation, column: &Column, text: &str) -> Value {
    super::parse_text(&column.value_type, text).unwrap_or_else(|e| {
        tracing::warn!(
            table = %relation.qualified_name(),
            column = %column.name,
            error = %e,
            "value kept as text"
        );
        Value::Text(text.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescape_reads_what_copy_text_writes() {
        assert_eq!(unescape("plain").unwrap(), "plain");
        assert_eq!(unescape(r"a\tb\nc\\d\re").unwrap(), "a\tb\nc\\d\re");
        assert_eq!(unescape(r"\b\f\v").unwrap(), "\u{8}\u{c}\u{b}");
        assert_eq!(unescape(r"\101\x42\q").unwrap(), "ABq");
        assert_eq!(unescape("ends\\"), None);
    }

    #[test]
    fn copy_lines_are_checked_and_split_where_they_end() {
        // public.t1 (id text primary key, body text)
        let relation = crate::sinks::collapse::tests::relation(1);
        let text = "1\tä\n2\t\\N\n3\tpartial";
        assert_eq!(check_lines(&relation, text.as_bytes()), Ok(vec![5, 10]));
        assert_eq!(check_lines(&relation, b"1\tno end"), Ok(vec![]));
        assert_eq!(
            parse_copy_rows(&relation, b"1\ta\\tb\n2\t\\N\n"),
            Ok(vec![
                vec![Value::Text("1".into()), Value::Text("a\tb".into())],
                vec![Value::Text("2".into()), Value::Null],
            ])
        );
        let error = check_lines(&relation, b"1\ta\n2\ta\tb\n").unwrap_err();
        assert!(error.contains("3 fields for 2 columns in row 2"), "{error}");
        let error = check_lines(&relation, b"1\t\xff\n").unwrap_err();
        assert!(error.contains("not UTF-8"), "{error}");
        assert!(error.contains("public.t1"), "{error}");
    }
}
