//! The set-based statements that apply one collapsed table plan to a merge target: the
//! plan's rows are COPYed into a temporary staging table, then one statement deletes, one
//! upserts complete rows, and one updates rows that arrived with unchanged TOAST values
//! (keeping the values the target holds for those columns).

use postgres_protocol::escape::escape_identifier;

use super::collapse::{KeyState, TablePlan};
use super::copy_text::write_row;
use super::ddl::{target_type, TargetTable};
use crate::event::{Value, ValueType};

const ROW_COLUMN: &str = "_tidemark_row";
/// Prefix of the staging columns holding a moved row's old key.
const FROM_COLUMN: &str = "_tidemark_from_";
const OP_COLUMN: &str = "_tidemark_op";
const UNCHANGED_COLUMN: &str = "_tidemark_unchanged";
pub const DELETED_COLUMN: &str = "_tidemark_deleted";

/// The SQL for one plan, in the order it runs.
pub struct MergeStatements {
    pub create_stage: String,
    pub copy_stage: String,
    pub truncate: Option<String>,
    /// Rows moved to a new key, with unchanged values read from the old key's target row;
    /// runs before `delete` removes that row.
    pub move_rows: String,
    pub delete: String,
    pub upsert: String,
    /// None when the table has only key columns.
    pub update_unchanged: Option<String>,
}

/// With `one_row`, each statement applies only the staged row whose number is `$1`, so a
/// batch the target refuses can be applied row by row to find the rows it refuses.
pub fn statements(
    target: &TargetTable,
    plan: &TablePlan,
    stage: &str,
    soft_delete: bool,
    one_row: bool,
) -> MergeStatements {
    let only = if one_row {
        format!(" AND s.{ROW_COLUMN} = $1")
    } else {
        String::new()
    };
    let relation = &plan.relation;
    let stage = escape_identifier(stage);
    let table = target.quoted();
    let quoted: Vec<String> = relation
        .columns
        .iter()
        .map(|c| escape_identifier(&c.name))
        .collect();
    let key_match = relation
        .columns
        .iter()
        .zip(&quoted)
        .filter(|(c, _)| c.primary_key)
        .map(|(_, q)| format!("t.{q} = s.{q}"))
        .collect::<Vec<_>>()
        .join(" AND ");
    let key_list = relation
        .columns
        .iter()
        .zip(&quoted)
        .filter(|(c, _)| c.primary_key)
        .map(|(_, q)| q.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let non_key: Vec<(usize, &String)> = relation
        .columns
        .iter()
        .zip(&quoted)
        .enumerate()
        .filter(|(_, (c, _))| !c.primary_key)
        .map(|(i, (_, q))| (i, q))
        .collect();

    let from_columns: Vec<(String, String)> = relation
        .columns
        .iter()
        .filter(|c| c.primary_key)
        .enumerate()
        .map(|(n, c)| (format!("{FROM_COLUMN}{n}"), target_type(c)))
        .collect();
    let from_match = relation
        .columns
        .iter()
        .zip(&quoted)
        .filter(|(c, _)| c.primary_key)
        .zip(&from_columns)
        .map(|((_, q), (from, _))| format!("o.{q} = s.{from}"))
        .collect::<Vec<_>>()
        .join(" AND ");
    let stage_columns = relation
        .columns
        .iter()
        .zip(&quoted)
        .map(|(c, q)| format!("{q} {}", target_type(c)))
        .chain(from_columns.iter().map(|(name, ty)| format!("{name} {ty}")))
        .chain([
            format!("{ROW_COLUMN} int"),
            format!("{OP_COLUMN} \"char\""),
            format!("{UNCHANGED_COLUMN} int[]"),
        ])
        .collect::<Vec<_>>()
        .join(", ");
    let all = quoted.join(", ");

    let delete = if soft_delete {
        // Rows the target holds are flagged; a row it never held (inserted and deleted in
        // one batch) is written with the last values the batch saw, flagged.
        format!(
            "WITH flagged AS (UPDATE {table} t SET {DELETED_COLUMN} = true FROM {stage} s \
               WHERE s.{OP_COLUMN} = 'd' AND {key_match}{only} RETURNING 1) \
             INSERT INTO {table} ({all}, {DELETED_COLUMN}) SELECT {all}, true FROM {stage} s \
             WHERE s.{OP_COLUMN} = 'd'{only} ON CONFLICT ({key_list}) DO NOTHING"
        )
    } else {
        format!(
            "DELETE FROM {table} t USING {stage} s \
             WHERE s.{OP_COLUMN} = 'd' AND {key_match}{only}"
        )
    };

    let mut sets: Vec<String> = non_key
        .iter()
        .map(|(_, q)| format!("{q} = EXCLUDED.{q}"))
        .collect();
    let (insert_columns, select_columns) = if soft_delete {
        sets.push(format!("{DELETED_COLUMN} = false"));
        (format!("{all}, {DELETED_COLUMN}"), format!("{all}, false"))
    } else {
        (all.clone(), all.clone())
    };
    let on_conflict = if sets.is_empty() {
        "DO NOTHING".to_string()
    } else {
        format!("DO UPDATE SET {}", sets.join(", "))
    };
    let upsert = format!(
        "INSERT INTO {table} ({insert_columns}) SELECT {select_columns} FROM {stage} s \
         WHERE {OP_COLUMN} = 'u' AND {UNCHANGED_COLUMN} IS NULL{only} \
         ON CONFLICT ({key_list}) {on_conflict}"
    );

    let mut keep_sets: Vec<String> = non_key
        .iter()
        .map(|(i, q)| {
            format!("{q} = CASE WHEN {i} = ANY(s.{UNCHANGED_COLUMN}) THEN t.{q} ELSE s.{q} END")
        })
        .collect();
    if soft_delete {
        keep_sets.push(format!("{DELETED_COLUMN} = false"));
    }
    let update_unchanged = (!keep_sets.is_empty()).then(|| {
        format!(
            "UPDATE {table} t SET {} FROM {stage} s \
             WHERE s.{OP_COLUMN} = 'u' AND s.{UNCHANGED_COLUMN} IS NOT NULL AND {key_match}{only}",
            keep_sets.join(", ")
        )
    });

    let moved_values = relation
        .columns
        .iter()
        .zip(&quoted)
        .enumerate()
        .map(|(i, (c, q))| {
            if c.primary_key {
                format!("s.{q}")
            } else {
                format!("CASE WHEN {i} = ANY(s.{UNCHANGED_COLUMN}) THEN o.{q} ELSE s.{q} END")
            }
        })
        .collect::<Vec<_>>()
        .join(", ");
    let moved_values = if soft_delete {
        format!("{moved_values}, false")
    } else {
        moved_values
    };
    let move_rows = format!(
        "INSERT INTO {table} ({insert_columns}) SELECT {moved_values} FROM {stage} s \
         JOIN {table} o ON {from_match} WHERE s.{OP_COLUMN} = 'm'{only} \
         ON CONFLICT ({key_list}) {on_conflict}"
    );
    let from_list: String = from_columns
        .iter()
        .map(|(name, _)| format!("{name}, "))
        .collect();

    MergeStatements {
        move_rows,
        // Created once per session and emptied by every commit: creating and dropping a
        // table per batch would churn the target's catalog.
        create_stage: format!(
            "CREATE TEMP TABLE IF NOT EXISTS {stage} ({stage_columns}) ON COMMIT DELETE ROWS"
        ),
        copy_stage: format!(
            "COPY {stage} ({all}, {from_list}{ROW_COLUMN}, {OP_COLUMN}, {UNCHANGED_COLUMN}) \
             FROM STDIN"
        ),
        truncate: plan.truncate.then(|| format!("TRUNCATE {table}")),
        delete,
        upsert,
        update_unchanged,
    }
}

/// The plan's rows in COPY text format for the staging table, and how many arrived with
/// unchanged TOAST values.
pub fn stage_rows(plan: &TablePlan) -> (Vec<u8>, usize) {
    let columns = &plan.relation.columns;
    let types: Vec<&ValueType> = columns.iter().map(|c| &c.value_type).collect();
    let key: Vec<usize> = plan.relation.primary_key_indexes().collect();
    let int_array = ValueType::Array(Box::new(ValueType::Int4));
    let no_origin: Vec<Value> = vec![Value::Null; key.len()];
    let mut out = Vec::new();
    let mut with_unchanged = 0;
    for (number, state) in plan.states().iter().enumerate() {
        let (op, row, origin) = match state {
            KeyState::Upsert(row) => ("u", row, no_origin.clone()),
            KeyState::Delete(row) => ("d", row, no_origin.clone()),
            KeyState::Move { row, from } => (
                "m",
                row,
                key.iter()
                    .map(|&i| from.get(i).cloned().unwrap_or(Value::Null))
                    .collect(),
            ),
        };
        let unchanged: Vec<Value> = row
            .iter()
            .enumerate()
            .filter(|(_, v)| **v == Value::UnchangedToast)
            .map(|(i, _)| Value::Int(i as i64))
            .collect();
        let unchanged = if unchanged.is_empty() {
            Value::Null
        } else {
            with_unchanged += 1;
            Value::Array(unchanged)
        };
        let op = Value::Text(op.into());
        let number = Value::Int(number as i64);
        write_row(
            &mut out,
            types
                .iter()
                .copied()
                .zip(row)
                .chain(key.iter().map(|&i| types[i]).zip(&origin))
                .chain([
                    (&ValueType::Int4, &number),
                    (&ValueType::Text, &op),
                    (&int_array, &unchanged),
                ]),
        );
    }
    (out, with_unchanged)
}
