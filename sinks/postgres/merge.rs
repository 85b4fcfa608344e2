//! The set-based statements that apply one collapsed table plan to a merge target: the
//! plan's rows are COPYed into a temporary staging table, then one statement deletes, one
//! upserts complete rows, and one updates rows that arrived with unchanged TOAST values
//! (keeping the values the target holds for those columns).

use bytes::Bytes;

use super::ddl::TargetTable;
use super::staging::{
    stage_row, unchanged_columns, Names, Pass, PlanSql, FROM_COLUMN, OP_COLUMN, ROW_COLUMN,
    UNCHANGED_COLUMN,
};
use crate::event::{Value, ValueType};
use crate::pgtext::copy_text::write_row;
use crate::sinks::collapse::{KeyState, TablePlan};

pub const DELETED_COLUMN: &str = "_tidemark_deleted";

/// The staging columns after the source's and the old key's.
const STAGE_COLUMNS: [(&str, &str); 3] = [
    (ROW_COLUMN, "int"),
    (OP_COLUMN, "\"char\""),
    (UNCHANGED_COLUMN, "int[]"),
];

/// The SQL for one plan: moves (rows moved to a new key, with unchanged values read from
/// the old key's target row; before the delete removes that row), deletes, upserts of
/// complete rows, and updates of rows with unchanged TOAST values. Every pass is the same but
/// for `Pass::OneRow`'s filter: upserts and deletes by key are replay-safe as they are.
pub fn statements(
    target: &TargetTable,
    plan: &TablePlan,
    stage: &str,
    soft_delete: bool,
    pass: Pass,
) -> PlanSql {
    let names = Names::new(target, &plan.relation, stage, pass);
    let Names {
        table, stage, only, ..
    } = &names;
    let key_match = names.key_match("t");
    let key_list = names.key_list();
    let all = names.all();

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

    let non_key: Vec<(usize, &String)> = plan
        .relation
        .columns
        .iter()
        .zip(&names.columns)
        .enumerate()
        .filter(|(_, (c, _))| !c.primary_key)
        .map(|(i, (_, q))| (i, q))
        .collect();
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

    let moved_values = names.values(|i, q| {
        format!("CASE WHEN {i} = ANY(s.{UNCHANGED_COLUMN}) THEN o.{q} ELSE s.{q} END")
    });
    let moved_values = if soft_delete {
        format!("{moved_values}, false")
    } else {
        moved_values
    };
    let from_match = names.key_match_with("o", |n, _| format!("s.{FROM_COLUMN}{n}"));
    let move_rows = format!(
        "INSERT INTO {table} ({insert_columns}) SELECT {moved_values} FROM {stage} s \
         JOIN {table} o ON {from_match} WHERE s.{OP_COLUMN} = 'm'{only} \
         ON CONFLICT ({key_list}) {on_conflict}"
    );

    let with_unchanged = plan.states().iter().any(|state| match state {
        KeyState::Upsert(row) => row.contains(&Value::UnchangedToast),
        KeyState::Delete(_) | KeyState::Move { .. } => false,
    });
    let has_new_rows =
        !plan.copied().is_empty() || (0..plan.states().len()).any(|i| plan.is_new_row(i));
    PlanSql {
        create_stage: names.create_stage(&STAGE_COLUMNS),
        copy_stage: names.copy_stage(&STAGE_COLUMNS),
        truncate: plan.truncate.then(|| format!("TRUNCATE {table}")),
        direct_copy: (pass == Pass::Fresh && has_new_rows)
            .then(|| format!("COPY {table} ({all}) FROM STDIN")),
        statements: [Some(move_rows), Some(delete), Some(upsert)]
            .into_iter()
            .chain([update_unchanged.filter(|_| with_unchanged)])
            .flatten()
            .collect(),
    }
}

/// The plan's rows in COPY text format for the staging table: in a fresh pass, all but the
/// new rows (which go straight into the target), else all.
pub fn stage_rows(plan: &TablePlan, pass: Pass) -> Vec<u8> {
    let mut out = Vec::new();
    for number in 0..plan.states().len() {
        if pass == Pass::Fresh && plan.is_new_row(number) {
            continue;
        }
        stage_state(&mut out, plan, number);
    }
    out
}

/// Appends the plan's key state `number` as a staging row in COPY text format.
pub fn stage_state(out: &mut Vec<u8>, plan: &TablePlan, number: usize) {
    let int_array = ValueType::Array(Box::new(ValueType::Int4));
    let (op, row, from) = match &plan.states()[number] {
        KeyState::Upsert(row) => ("u", row, None),
        KeyState::Delete(row) => ("d", row, None),
        KeyState::Move { row, from } => ("m", row, Some(from)),
    };
    stage_row(
        out,
        &plan.relation,
        row,
        from,
        &[
            (&ValueType::Int4, Value::Int(number as i64)),
            (&ValueType::Text, Value::Text(op.into())),
            (&int_array, unchanged_columns(row)),
        ],
    );
}

/// The new rows of the plan in COPY text format for the target table's source columns:
/// the snapshot rows it kept as the source's COPY text, as they are, then the rows of keys
/// it created (see [`TablePlan::is_new_row`]).
pub fn new_rows(plan: &TablePlan) -> Vec<Bytes> {
    let types: Vec<&ValueType> = plan
        .relation
        .columns
        .iter()
        .map(|c| &c.value_type)
        .collect();
    let mut out = Vec::new();
    for (index, state) in plan.states().iter().enumerate() {
        if let (true, KeyState::Upsert(row)) = (plan.is_new_row(index), state) {
            write_row(&mut out, types.iter().copied().zip(row));
        }
    }
    let mut rows = plan.copied().to_vec();
    if !out.is_empty() {
        rows.push(Bytes::from(out));
    }
    rows
}
