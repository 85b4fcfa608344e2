//! Array literals as `array_out` writes them: one `{…}` per dimension, quoting and
//! escapes, `NULL` elements and an optional bounds prefix; each element is parsed as the
//! array's element type.

use super::cursor::Cursor;
use super::{excerpt, parse_text, TypeError};
use crate::event::{Value, ValueType};

/// PostgreSQL's limit on array dimensions (`MAXDIM`); also bounds the parser's recursion.
const MAX_ARRAY_DIMENSIONS: usize = 6;

/// Why an array literal failed, before the type and text are attached.
enum ArrayFault {
    Syntax(&'static str),
    Element { index: usize, source: TypeError },
}

pub(super) fn parse_array(
    array_type: &ValueType,
    element: &ValueType,
    text: &str,
) -> Result<Value, TypeError> {
    // PostgreSQL has no arrays of arrays: every dimension has the same scalar element type.
    let mut element = element;
    while let ValueType::Array(inner) = element {
        element = inner;
    }
    if *element == ValueType::Other {
        return Ok(Value::Text(text.to_owned()));
    }
    let literal = ArrayLiteral {
        cursor: Cursor::new(text),
        element,
        elements: 0,
    };
    literal.parse().map(Value::Array).map_err(|fault| {
        let value_type = array_type.clone();
        let text = excerpt(text);
        match fault {
            ArrayFault::Syntax(reason) => TypeError::Invalid {
                value_type,
                text,
                reason,
            },
            ArrayFault::Element { index, source } => TypeError::Element {
                value_type,
                text,
                index,
                source: Box::new(source),
            },
        }
    })
}

/// An array literal as `array_out` writes it ("Array Value Input" in the manual): `{…}` per
/// dimension, `,` between elements, elements double-quoted when they are empty, `NULL` in any
/// case, or contain `"`, `\`, `{`, `}`, `,` or white space, with `"` and `\` backslash-escaped
/// inside quotes; an unquoted `NULL` is the null value. Like `array_in`, it also accepts white
/// space around elements and backslash escapes in unquoted elements.
struct ArrayLiteral<'a> {
    cursor: Cursor<'a>,
    element: &'a ValueType,
    /// Elements read so far, for error messages.
    elements: usize,
}

impl ArrayLiteral<'_> {
    fn parse(mut self) -> Result<Vec<Value>, ArrayFault> {
        self.skip_space();
        if self.cursor.peek() == Some(b'[') {
            self.skip_bounds()?;
        }
        if !self.cursor.eat(b'{') {
            return Err(ArrayFault::Syntax("does not start with {"));
        }
        let values = self.items(1)?;
        self.skip_space();
        if !self.cursor.is_done() {
            return Err(ArrayFault::Syntax("unexpected text after the closing }"));
        }
        Ok(values)
    }

    /// Skips `[lower:upper]…=`, which `array_out` writes when a lower bound is not 1.
    fn skip_bounds(&mut self) -> Result<(), ArrayFault> {
        const SHAPE: &str = "malformed dimension bounds, expected [lower:upper]=";
        while self.cursor.eat(b'[') {
            loop {
                match self.cursor.next() {
                    Some(b']') => break,
                    Some(b'0'..=b'9' | b'-' | b'+' | b':') => {}
                    _ => return Err(ArrayFault::Syntax(SHAPE)),
                }
            }
        }
        self.skip_space();
        if !self.cursor.eat(b'=') {
            return Err(ArrayFault::Syntax(SHAPE));
        }
        self.skip_space();
        Ok(())
    }

    /// The items of one dimension, after its `{`, through its `}`.
    fn items(&mut self, depth: usize) -> Result<Vec<Value>, ArrayFault> {
        if depth > MAX_ARRAY_DIMENSIONS {
            return Err(ArrayFault::Syntax("more than 6 dimensions"));
        }
        let mut values = Vec::new();
        self.skip_space();
        if self.cursor.eat(b'}') {
            return Ok(values);
        }
        let mut sub_arrays = None;
        loop {
            self.skip_space();
            let is_sub_array = self.cursor.eat(b'{');
            if *sub_arrays.get_or_insert(is_sub_array) != is_sub_array {
                return Err(ArrayFault::Syntax(
                    "mixes sub-arrays and elements in one dimension",
                ));
            }
            values.push(if is_sub_array {
                Value::Array(self.items(depth + 1)?)
            } else {
                self.element()?
            });
            self.skip_space();
            match self.cursor.next() {
                Some(b',') => {}
                Some(b'}') => return Ok(values),
                Some(_) => return Err(ArrayFault::Syntax("expected , or } after an element")),
                None => return Err(ArrayFault::Syntax("ends before its closing }")),
            }
        }
    }

    fn element(&mut self) -> Result<Value, ArrayFault> {
        self.elements += 1;
        let mut raw = Vec::new();
        if self.cursor.eat(b'"') {
            loop {
                match self.cursor.next() {
                    Some(b'"') => break,
                    Some(b'\\') => match self.cursor.next() {
                        Some(byte) => raw.push(byte),
                        None => return Err(ArrayFault::Syntax("ends inside a quoted element")),
                    },
                    Some(byte) => raw.push(byte),
                    None => return Err(ArrayFault::Syntax("ends inside a quoted element")),
                }
            }
        } else {
            let mut escaped = false;
            // Length of `raw` through its last escaped or non-space byte: trailing white
            // space of an unquoted element is not part of it.
            let mut kept = 0;
            loop {
                match self.cursor.peek() {
                    Some(b',' | b'}') => break,
                    Some(b'"' | b'{') => {
                        return Err(ArrayFault::Syntax("unquoted element contains \" or {"))
                    }
                    Some(b'\\') => {
                        self.cursor.pos += 1;
                        match self.cursor.next() {
                            Some(byte) => raw.push(byte),
                            None => return Err(ArrayFault::Syntax("ends after a backslash")),
                        }
                        escaped = true;
                        kept = raw.len();
                    }
                    Some(byte) => {
                        self.cursor.pos += 1;
                        raw.push(byte);
                        if !is_array_space(byte) {
                            kept = raw.len();
                        }
                    }
                    None => return Err(ArrayFault::Syntax("ends before its closing }")),
                }
            }
            raw.truncate(kept);
            if raw.is_empty() {
                return Err(ArrayFault::Syntax("empty unquoted element"));
            }
            if !escaped && raw.eq_ignore_ascii_case(b"NULL") {
                return Ok(Value::Null);
            }
        }
        // Only ASCII bytes were removed from valid UTF-8, so this cannot fail; still no panic.
        let text =
            String::from_utf8(raw).map_err(|_| ArrayFault::Syntax("element is not valid UTF-8"))?;
        parse_text(self.element, &text).map_err(|source| ArrayFault::Element {
            index: self.elements,
            source,
        })
    }

    fn skip_space(&mut self) {
        while self.cursor.peek().is_some_and(is_array_space) {
            self.cursor.pos += 1;
        }
    }
}

/// White space as `array_in` and `array_out` see it (`scanner_isspace`).
pub fn is_array_space(byte: u8) -> bool {
    matches!(byte, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

#[cfg(test)]
mod tests {
    use super::super::datetime::MICROS_PER_HOUR;
    use super::super::test_support::*;
    use super::*;

    use proptest::prelude::*;

    use crate::pgtext::copy_text::write_array_element;

    /// One element as `array_out` writes it (the merge sink's encoder writes the same form).
    fn pg_array_element(element: Option<&str>) -> String {
        let mut out = String::new();
        match element {
            Some(element) => write_array_element(&mut out, element).unwrap(),
            None => out.push_str("NULL"),
        }
        out
    }

    fn pg_array(elements: &[Option<String>]) -> String {
        let items: Vec<String> = elements
            .iter()
            .map(|e| pg_array_element(e.as_deref()))
            .collect();
        format!("{{{}}}", items.join(","))
    }

    fn text_values(elements: &[Option<String>]) -> Value {
        Value::Array(
            elements
                .iter()
                .map(|e| e.as_ref().map_or(Value::Null, |s| Value::Text(s.clone())))
                .collect(),
        )
    }

    #[test]
    fn arrays_with_quoting_escapes_and_nulls() {
        assert_eq!(
            parse(&array(ValueType::Text), r#"{a,b,"c d",NULL,"e\"f"}"#),
            Value::Array(vec![
                text("a"),
                text("b"),
                text("c d"),
                Value::Null,
                text("e\"f")
            ])
        );
        // As PostgreSQL prints ARRAY['NULL','null','',' x','a\b','é,','{}'].
        assert_eq!(
            parse(
                &array(ValueType::Text),
                r#"{"NULL","null",""," x","a\\b","é,","{}"}"#
            ),
            Value::Array(vec![
                text("NULL"),
                text("null"),
                text(""),
                text(" x"),
                text("a\\b"),
                text("é,"),
                text("{}"),
            ])
        );
        assert_eq!(
            parse(&array(ValueType::Int4), "{1,NULL,null,3}"),
            Value::Array(vec![Value::Int(1), Value::Null, Value::Null, Value::Int(3)])
        );
        assert_eq!(
            parse(&array(ValueType::Text), r#"{\NULL}"#),
            Value::Array(vec![text("NULL")])
        );
    }

    #[test]
    fn arrays_empty_nested_and_with_bounds() {
        assert_eq!(parse(&array(ValueType::Int4), "{}"), Value::Array(vec![]));
        assert_eq!(
            parse(&array(ValueType::Int4), "{{1,2},{3,4}}"),
            Value::Array(vec![ints(&[1, 2]), ints(&[3, 4])])
        );
        assert_eq!(parse(&array(ValueType::Int4), "[0:1]={1,2}"), ints(&[1, 2]));
        assert_eq!(
            parse(&array(ValueType::Int4), "[0:1][-2:-1]={{1,2},{3,4}}"),
            Value::Array(vec![ints(&[1, 2]), ints(&[3, 4])])
        );
        // Arrays of arrays do not exist in PostgreSQL; dimensions are one array type.
        assert_eq!(
            parse(&array(array(ValueType::Int4)), "{{1,2},{3,4}}"),
            Value::Array(vec![ints(&[1, 2]), ints(&[3, 4])])
        );
        let six_deep = "{{{{{{1}}}}}}";
        assert!(parse_text(&array(ValueType::Int4), six_deep).is_ok());
        assert!(is_invalid(&array(ValueType::Int4), "{{{{{{{1}}}}}}}"));
        // Deep nesting is an error, not a stack overflow.
        assert!(is_invalid(&array(ValueType::Int4), &"{".repeat(100_000)));
    }

    #[test]
    fn arrays_allow_white_space_around_elements() {
        assert_eq!(
            parse(&array(ValueType::Text), r#"{" a ",b  ,  c}"#),
            Value::Array(vec![text(" a "), text("b"), text("c")])
        );
        assert_eq!(
            parse(&array(ValueType::Text), " { a b , \"c\" } "),
            Value::Array(vec![text("a b"), text("c")])
        );
        assert_eq!(
            parse(&array(ValueType::Text), r#"{a\ ,b\,c}"#),
            Value::Array(vec![text("a "), text("b,c")])
        );
        assert_eq!(
            parse(&array(ValueType::Int4), "{{1, 2}, {3, 4}}"),
            Value::Array(vec![ints(&[1, 2]), ints(&[3, 4])])
        );
    }

    #[test]
    fn array_elements_use_the_element_type() {
        assert_eq!(
            parse(&array(ValueType::Bytea), r#"{"\\x0102","\\x61625c",NULL}"#),
            Value::Array(vec![
                Value::Bytes(vec![1, 2]),
                Value::Bytes(b"ab\\".to_vec()),
                Value::Null
            ])
        );
        assert_eq!(
            parse(&array(ValueType::Bytea), r#"{"\\000\\\\"}"#),
            Value::Array(vec![Value::Bytes(vec![0, b'\\'])])
        );
        assert_eq!(
            parse(&array(ValueType::Json), r#"{"{\"a\": [1, \"x\"]}"}"#),
            Value::Array(vec![Value::Json(r#"{"a": [1, "x"]}"#.to_owned())])
        );
        match parse(&array(ValueType::Float4), "{1.5,NaN,-Infinity,0.1}") {
            Value::Array(values) => {
                assert_eq!(values.len(), 4);
                assert_eq!(values[0], Value::Float(1.5));
                assert!(matches!(values[1], Value::Float(f) if f.is_nan()));
                assert_eq!(values[2], Value::Float(f64::NEG_INFINITY));
                assert_eq!(values[3], Value::Float(0.1));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse(
                &array(ValueType::TimestampTz),
                r#"{"2000-01-01 00:00:00+00"}"#
            ),
            Value::Array(vec![Value::TimestampTz(946_684_800_000_000)])
        );
        assert_eq!(
            parse(&array(ValueType::TimeTz), "{12:00:00+01}"),
            Value::Array(vec![Value::TimeTz {
                micros: 12 * MICROS_PER_HOUR,
                offset_secs: 3600
            }])
        );
        assert_eq!(
            parse(&array(ValueType::Interval), "{P1D,PT0S}"),
            Value::Array(vec![
                Value::Interval {
                    months: 0,
                    days: 1,
                    micros: 0
                },
                Value::Interval {
                    months: 0,
                    days: 0,
                    micros: 0
                }
            ])
        );
        assert_eq!(
            parse(&array(ValueType::Numeric), "{1.50,NaN}"),
            Value::Array(vec![
                Value::Numeric("1.50".to_owned()),
                Value::Numeric("NaN".to_owned())
            ])
        );
    }

    #[test]
    fn arrays_of_other_types_keep_the_whole_literal() {
        let boxes = "{(3,4),(1,2);(7,8),(5,6)}";
        assert_eq!(parse(&array(ValueType::Other), boxes), text(boxes));
        assert_eq!(parse(&array(ValueType::Other), "{$1.00}"), text("{$1.00}"));
    }

    #[test]
    fn malformed_arrays_are_invalid() {
        for bad in [
            "",
            "1,2",
            "{1,2",
            "{1,2}x",
            "{1,,2}",
            "{,}",
            "{1,{2}}",
            "{{1},2}",
            "{\"a}",
            "{\"a\"b}",
            "{a\"b}",
            "{a{b}",
            "{a\\",
            "[1:2]{1,2}",
            "[1:x]={1,2}",
            "[1:2={1,2}",
            "}",
        ] {
            assert!(is_invalid(&array(ValueType::Text), bad), "{bad:?}");
        }
    }

    #[test]
    fn a_bad_array_element_names_its_position() {
        let error = parse_err(&array(ValueType::Int4), "{1,x,3}");
        match &error {
            TypeError::Element { index, source, .. } => {
                assert_eq!(*index, 2);
                assert!(matches!(**source, TypeError::Invalid { .. }));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            error.to_string(),
            r#"invalid int4[] value "{1,x,3}": element 2"#
        );
        let source = std::error::Error::source(&error).map(ToString::to_string);
        assert_eq!(
            source.as_deref(),
            Some(r#"invalid int4 value "x": not an integer"#)
        );
        let nested = parse_err(&array(ValueType::Int2), "{{1,2},{3,99999}}");
        assert!(matches!(
            nested,
            TypeError::Element { index: 4, ref source, .. }
                if matches!(**source, TypeError::OutOfRange { .. })
        ));
    }

    proptest! {
        #[test]
        fn text_arrays_round_trip(
            elements in prop::collection::vec(
                prop::option::of(prop_oneof![
                    "[a-zA-Z0-9 \"\\\\,{}\t\né€\\[\\]:=]{0,8}",
                    Just("NULL".to_owned()),
                    Just("null".to_owned()),
                    Just(String::new()),
                ]),
                0..8,
            ),
        ) {
            let literal = pg_array(&elements);
            prop_assert_eq!(parse(&array(ValueType::Text), &literal), text_values(&elements));
        }

        #[test]
        fn two_dimensional_text_arrays_round_trip(
            rows in (1..4_usize).prop_flat_map(|width| prop::collection::vec(
                prop::collection::vec(
                    prop::option::of("[a-z \"\\\\,{}NUL]{0,6}"),
                    width,
                ),
                1..4,
            )),
        ) {
            let literal = format!(
                "{{{}}}",
                rows.iter().map(|row| pg_array(row)).collect::<Vec<_>>().join(",")
            );
            let expected = Value::Array(rows.iter().map(|row| text_values(row)).collect());
            prop_assert_eq!(parse(&array(ValueType::Text), &literal), expected);
        }
    }
}
