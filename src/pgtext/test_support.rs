//! Helpers shared by the tests of every parser in this module.

use super::{parse_text, TypeError};
use crate::event::{Value, ValueType};

pub(super) fn parse(value_type: &ValueType, text: &str) -> Value {
    match parse_text(value_type, text) {
        Ok(value) => value,
        Err(error) => panic!("{text:?} as {value_type:?}: {error}"),
    }
}

pub(super) fn parse_err(value_type: &ValueType, text: &str) -> TypeError {
    match parse_text(value_type, text) {
        Ok(value) => panic!("{text:?} as {value_type:?} parsed to {value:?}"),
        Err(error) => error,
    }
}

pub(super) fn is_invalid(value_type: &ValueType, text: &str) -> bool {
    matches!(parse_text(value_type, text), Err(TypeError::Invalid { .. }))
}

pub(super) fn is_out_of_range(value_type: &ValueType, text: &str) -> bool {
    matches!(
        parse_text(value_type, text),
        Err(TypeError::OutOfRange { .. })
    )
}

pub(super) fn array(element: ValueType) -> ValueType {
    ValueType::Array(Box::new(element))
}

pub(super) fn text(s: &str) -> Value {
    Value::Text(s.to_owned())
}

pub(super) fn ints(values: &[i64]) -> Value {
    Value::Array(values.iter().map(|v| Value::Int(*v)).collect())
}
