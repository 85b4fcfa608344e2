//! What the merge and SCD2 statements share: one plan's SQL (its staging table and the
//! statements that apply it, in order) and the quoted names and lists they are written from.
//! A staging table holds the source columns, then the key columns of another row (a moved
//! row's old key), then each mode's own bookkeeping columns.

use postgres_protocol::escape::escape_identifier;

use super::ddl::{target_type, TargetTable};
use crate::event::{Relation, Row, Value, ValueType};
use crate::pgtext::copy_text::write_row;

/// The staging column numbering the staged rows, which a one-row statement filters on.
pub const ROW_COLUMN: &str = "_tidemark_row";
/// Prefix of the staging columns holding another row's key.
pub const FROM_COLUMN: &str = "_tidemark_from_";
pub const OP_COLUMN: &str = "_tidemark_op";
/// The staging column listing, for a row with unchanged TOAST values, their column numbers.
pub const UNCHANGED_COLUMN: &str = "_tidemark_unchanged";

/// Which rows a plan's statements apply, and whether the target may hold some already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Every staged row, none of which the target holds: what a sink resuming from its own
    /// checkpoint sees. A statement may count on it to skip conflict handling, as long as a
    /// row the target does hold fails with a unique violation (then `Replay` runs instead).
    Fresh,
    /// Every staged row, any of which the target may hold already.
    Replay,
    /// Only the staged row numbered `$1`, any of which the target may hold already: a batch
    /// the target refuses is applied row by row to find the rows it refuses.
    OneRow,
}

/// One plan's SQL, in the order it runs.
pub struct PlanSql {
    pub create_stage: String,
    pub copy_stage: String,
    pub truncate: Option<String>,
    /// `COPY` straight into the target of the rows a fresh pass may insert plainly (merge:
    /// the complete rows of keys the batch created), before `statements`.
    pub direct_copy: Option<String>,
    /// Apply the staged rows the pass is for.
    pub statements: Vec<String>,
}

/// The quoted names one plan's statements are written from.
pub struct Names<'a> {
    pub relation: &'a Relation,
    /// The target table, quoted.
    pub table: String,
    /// The staging table, quoted.
    pub stage: String,
    /// The source columns, quoted, in order.
    pub columns: Vec<String>,
    /// ` AND s._tidemark_row = $1` for one-row statements, else empty.
    pub only: String,
}

impl<'a> Names<'a> {
    pub fn new(target: &TargetTable, relation: &'a Relation, stage: &str, pass: Pass) -> Names<'a> {
        Names {
            relation,
            table: target.quoted(),
            stage: escape_identifier(stage),
            columns: relation
                .columns
                .iter()
                .map(|c| escape_identifier(&c.name))
                .collect(),
            only: if pass == Pass::OneRow {
                format!(" AND s.{ROW_COLUMN} = $1")
            } else {
                String::new()
            },
        }
    }

    /// The source columns, comma-separated.
    pub fn all(&self) -> String {
        self.columns.join(", ")
    }

    /// The quoted key columns with their number among them.
    pub fn key(&self) -> impl Iterator<Item = (usize, &String)> {
        self.relation
            .columns
            .iter()
            .zip(&self.columns)
            .filter(|(c, _)| c.primary_key)
            .map(|(_, q)| q)
            .enumerate()
    }

    pub fn key_list(&self) -> String {
        self.key()
            .map(|(_, q)| q.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `{alias}.k = s.k AND …` over the key columns.
    pub fn key_match(&self, alias: &str) -> String {
        self.key()
            .map(|(_, q)| format!("{alias}.{q} = s.{q}"))
            .collect::<Vec<_>>()
            .join(" AND ")
    }

    /// `{alias}.k = {value(n, k)} AND …` over the key columns.
    pub fn key_match_with(&self, alias: &str, value: impl Fn(usize, &str) -> String) -> String {
        self.key()
            .map(|(n, q)| format!("{alias}.{q} = {}", value(n, q)))
            .collect::<Vec<_>>()
            .join(" AND ")
    }

    /// `from_0, from_1, …, ` naming the staged other-row key columns.
    pub fn from_list(&self) -> String {
        self.key()
            .map(|(n, _)| format!("{FROM_COLUMN}{n}, "))
            .collect()
    }

    /// Each source column with `unchanged(i, q)` for the non-key ones (`i` its number, `q` its
    /// quoted name) and `s.q` for the key ones.
    pub fn values(&self, unchanged: impl Fn(usize, &str) -> String) -> String {
        self.relation
            .columns
            .iter()
            .zip(&self.columns)
            .enumerate()
            .map(|(i, (c, q))| {
                if c.primary_key {
                    format!("s.{q}")
                } else {
                    unchanged(i, q)
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `CREATE TEMP TABLE` of the staging table: the source columns, the other-row key
    /// columns, then `extra` (name and type). Created once per session and emptied by every
    /// commit: creating and dropping a table per batch would churn the target's catalog.
    pub fn create_stage(&self, extra: &[(&str, &str)]) -> String {
        let key_types = self
            .relation
            .columns
            .iter()
            .filter(|c| c.primary_key)
            .enumerate()
            .map(|(n, c)| format!("{FROM_COLUMN}{n} {}", target_type(c)));
        let columns: Vec<String> = self
            .relation
            .columns
            .iter()
            .zip(&self.columns)
            .map(|(c, q)| format!("{q} {}", target_type(c)))
            .chain(key_types)
            .chain(extra.iter().map(|(name, ty)| format!("{name} {ty}")))
            .collect();
        format!(
            "CREATE TEMP TABLE IF NOT EXISTS {} ({}) ON COMMIT DELETE ROWS",
            self.stage,
            columns.join(", ")
        )
    }

    /// `COPY` into the staging table, in the column order of [`stage_row`].
    pub fn copy_stage(&self, extra: &[(&str, &str)]) -> String {
        let extra: Vec<&str> = extra.iter().map(|(name, _)| *name).collect();
        format!(
            "COPY {} ({}, {}{}) FROM STDIN",
            self.stage,
            self.all(),
            self.from_list(),
            extra.join(", ")
        )
    }
}

/// Writes one staging row in COPY text format: `row`, the key columns of `from` (NULL when
/// there is none), then `extra`.
pub fn stage_row(
    out: &mut Vec<u8>,
    relation: &Relation,
    row: &Row,
    from: Option<&Row>,
    extra: &[(&ValueType, Value)],
) {
    let types = relation.columns.iter().map(|c| &c.value_type);
    let key_types = relation
        .columns
        .iter()
        .filter(|c| c.primary_key)
        .map(|c| &c.value_type);
    let from: Vec<&Value> = relation
        .primary_key_indexes()
        .map(|i| from.and_then(|from| from.get(i)).unwrap_or(&Value::Null))
        .collect();
    write_row(
        out,
        types
            .zip(row)
            .chain(key_types.zip(from))
            .chain(extra.iter().map(|(t, v)| (*t, v))),
    );
}

/// The column numbers of `row`'s unchanged TOAST values as an `int[]`, NULL when none.
pub fn unchanged_columns(row: &Row) -> Value {
    let unchanged: Vec<Value> = row
        .iter()
        .enumerate()
        .filter(|(_, v)| **v == Value::UnchangedToast)
        .map(|(i, _)| Value::Int(i as i64))
        .collect();
    if unchanged.is_empty() {
        Value::Null
    } else {
        Value::Array(unchanged)
    }
}
