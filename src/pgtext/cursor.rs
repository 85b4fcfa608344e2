//! A byte cursor shared by the text parsers of this module.

use super::Fault;

/// A read position in text structured by ASCII bytes (date/time forms, array literals). It
/// moves byte by byte; callers only stop it at ASCII bytes they recognised, so a slice of the
/// text between two stops never splits a character.
pub(super) struct Cursor<'a> {
    bytes: &'a [u8],
    pub(super) pos: usize,
}

impl<'a> Cursor<'a> {
    pub(super) fn new(text: &'a str) -> Self {
        Cursor {
            bytes: text.as_bytes(),
            pos: 0,
        }
    }

    pub(super) fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    pub(super) fn next(&mut self) -> Option<u8> {
        let byte = self.peek()?;
        self.pos += 1;
        Some(byte)
    }

    pub(super) fn eat(&mut self, byte: u8) -> bool {
        let matched = self.peek() == Some(byte);
        if matched {
            self.pos += 1;
        }
        matched
    }

    pub(super) fn eat_str(&mut self, text: &str) -> bool {
        let matched = self
            .bytes
            .get(self.pos..)
            .is_some_and(|rest| rest.starts_with(text.as_bytes()));
        if matched {
            self.pos += text.len();
        }
        matched
    }

    pub(super) fn expect(&mut self, byte: u8, reason: &'static str) -> Result<(), Fault> {
        if self.eat(byte) {
            Ok(())
        } else {
            Err(Fault::Invalid(reason))
        }
    }

    pub(super) fn is_done(&self) -> bool {
        self.pos >= self.bytes.len()
    }

    pub(super) fn finish(&self) -> Result<(), Fault> {
        if self.is_done() {
            Ok(())
        } else {
            Err(Fault::Invalid("unexpected text at the end"))
        }
    }

    /// `min` to `max` (at most 19) ASCII digits → (value, number of digits).
    pub(super) fn digits(&mut self, min: usize, max: usize) -> Option<(u64, usize)> {
        let start = self.pos;
        let mut value = 0_u64;
        while self.pos - start < max {
            match self.peek() {
                Some(digit @ b'0'..=b'9') => {
                    value = value * 10 + u64::from(digit - b'0');
                    self.pos += 1;
                }
                _ => break,
            }
        }
        let count = self.pos - start;
        (count >= min).then_some((value, count))
    }
}
