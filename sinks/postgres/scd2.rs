//! The SCD2 target: its table layout (tidemark's or dbt's column names) and the set-based
//! statements that apply one history plan. The plan's events are COPYed into a temporary
//! staging table; then one statement inserts the versions whose unchanged TOAST values come
//! from the version they supersede, one inserts the complete versions, and one closes the
//! versions the batch supersedes. Every statement is replay-safe: versions are unique on
//! (key, `_tidemark_lsn`) and a version is only closed by an event that follows it.

use postgres_protocol::escape::escape_identifier;

use super::ddl::{target_type, TargetTable, FILLFACTOR};
use super::staging::{
    stage_row, unchanged_columns, Names, Pass, PlanSql, FROM_COLUMN, OP_COLUMN, ROW_COLUMN,
    UNCHANGED_COLUMN,
};
use crate::config::ColumnNaming;
use crate::event::{Relation, Value, ValueType};
use crate::pgtext::copy_text::write_row;
use crate::sinks::history::{EventKind, HistoryPlan, KeyEvent};

// The staging table's other-row key columns hold the key whose latest version before
// `FROM_LSN_COLUMN` supplies unchanged TOAST values, when it is not the row's own key.
const FROM_LSN_COLUMN: &str = "_tidemark_from_lsn";
const LSN_COLUMN: &str = "_tidemark_lsn";
/// Commit LSN of the key's previous event in the batch.
const PREVIOUS_COLUMN: &str = "_tidemark_previous";
const AT_COLUMN: &str = "_tidemark_at";
const VALID_TO_COLUMN: &str = "_tidemark_valid_to";

/// The staging columns after the source's and the other row's key.
const STAGE_COLUMNS: [(&str, &str); 8] = [
    (FROM_LSN_COLUMN, "pg_lsn"),
    (ROW_COLUMN, "int"),
    (OP_COLUMN, "text"),
    (LSN_COLUMN, "pg_lsn"),
    (PREVIOUS_COLUMN, "pg_lsn"),
    (AT_COLUMN, "timestamptz"),
    (VALID_TO_COLUMN, "timestamptz"),
    (UNCHANGED_COLUMN, "int[]"),
];

/// How versions are recorded: the validity columns' names and whether deletes are versions.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub naming: ColumnNaming,
    pub tombstones: bool,
}

impl Layout {
    /// The columns a history table has beyond the source's, with their types.
    fn columns(self) -> Vec<(&'static str, &'static str)> {
        let mut columns = match self.naming {
            ColumnNaming::Tidemark => vec![
                ("valid_from", "timestamptz NOT NULL"),
                ("valid_to", "timestamptz"),
                ("is_current", "boolean NOT NULL"),
            ],
            ColumnNaming::Dbt => vec![
                ("dbt_scd_id", "text NOT NULL"),
                ("dbt_updated_at", "timestamptz NOT NULL"),
                ("dbt_valid_from", "timestamptz NOT NULL"),
                ("dbt_valid_to", "timestamptz"),
            ],
        };
        if self.naming == ColumnNaming::Dbt && self.tombstones {
            columns.push(("dbt_is_deleted", "text NOT NULL"));
        }
        columns.extend([
            (OP_COLUMN, "text NOT NULL"),
            (LSN_COLUMN, "pg_lsn NOT NULL"),
        ]);
        columns
    }

    /// Whether a fresh pass may COPY the event's version straight into the target: a
    /// complete first version of a key (created or read) that ends no other version (no
    /// tombstone can be current), in the layout whose columns the agent fills itself (dbt's
    /// `dbt_scd_id` is computed by the target).
    fn is_direct(self, event: &KeyEvent) -> bool {
        self.naming == ColumnNaming::Tidemark
            && !self.tombstones
            && matches!(event.kind, EventKind::Created | EventKind::Read)
            && !event.row.contains(&Value::UnchangedToast)
    }

    /// Whether a version is current; `prefix` qualifies the column (`"t."`, or none).
    fn is_current(self, prefix: &str) -> String {
        match self.naming {
            ColumnNaming::Tidemark => format!("{prefix}is_current"),
            ColumnNaming::Dbt => format!("{prefix}dbt_valid_to IS NULL"),
        }
    }

    /// `SET` of a version closed at `at`.
    fn close(self, at: &str) -> String {
        match self.naming {
            ColumnNaming::Tidemark => format!("valid_to = {at}, is_current = false"),
            ColumnNaming::Dbt => format!("dbt_valid_to = {at}"),
        }
    }

    /// The values of the layout's columns for the staged event `s`.
    fn values(self, relation: &Relation) -> String {
        let mut values = match self.naming {
            ColumnNaming::Tidemark => vec![
                format!("s.{AT_COLUMN}"),
                format!("s.{VALID_TO_COLUMN}"),
                format!("s.{VALID_TO_COLUMN} IS NULL"),
            ],
            ColumnNaming::Dbt => {
                // Stable across replays: the key and the version's commit LSN.
                let key: Vec<String> = relation
                    .columns
                    .iter()
                    .filter(|c| c.primary_key)
                    .map(|c| format!("s.{}::text", escape_identifier(&c.name)))
                    .chain([format!("s.{LSN_COLUMN}::text")])
                    .collect();
                vec![
                    format!("md5(concat_ws('|', {}))", key.join(", ")),
                    format!("s.{AT_COLUMN}"),
                    format!("s.{AT_COLUMN}"),
                    format!("s.{VALID_TO_COLUMN}"),
                ]
            }
        };
        if self.naming == ColumnNaming::Dbt && self.tombstones {
            values.push(format!(
                "CASE WHEN s.{OP_COLUMN} = 'd' THEN 'True' ELSE 'False' END"
            ));
        }
        values.extend([format!("s.{OP_COLUMN}"), format!("s.{LSN_COLUMN}")]);
        values.join(", ")
    }
}

/// The history table of `relation`: its columns and the layout's, with the primary key
/// (key, commit LSN). That index finds a key's versions in commit order, which is all "the
/// current version of K" and "the version of K at time T" need; an index on current versions
/// only would make closing a version a non-HOT update and cost about half the apply rate.
pub fn create_table(table: &TargetTable, relation: &Relation, layout: Layout) -> String {
    let columns: Vec<String> = relation
        .columns
        .iter()
        .map(|c| format!("{} {}", escape_identifier(&c.name), target_type(c)))
        .chain(
            layout
                .columns()
                .into_iter()
                .map(|(name, ty)| format!("{name} {ty}")),
        )
        .collect();
    format!(
        "CREATE TABLE IF NOT EXISTS {} ({}, PRIMARY KEY ({}, {LSN_COLUMN})) \
         WITH (fillfactor = {FILLFACTOR})",
        table.quoted(),
        columns.join(", "),
        key_list(relation)
    )
}

fn key_list(relation: &Relation) -> String {
    relation
        .columns
        .iter()
        .filter(|c| c.primary_key)
        .map(|c| escape_identifier(&c.name))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The SQL for one plan: closing the versions current before its truncate, inserting the
/// versions whose unchanged TOAST values come from the version they supersede, inserting the
/// complete versions, and closing the versions the plan's events supersede.
pub fn statements(
    target: &TargetTable,
    plan: &HistoryPlan,
    stage: &str,
    layout: Layout,
    pass: Pass,
) -> PlanSql {
    let names = Names::new(target, &plan.relation, stage, pass);
    let Names {
        table, stage, only, ..
    } = &names;
    let relation = &plan.relation;
    let all = names.all();
    let insert_columns = format!(
        "{all}, {}",
        layout
            .columns()
            .iter()
            .map(|(name, _)| *name)
            .collect::<Vec<_>>()
            .join(", ")
    );
    let layout_values = layout.values(relation);
    // A fresh pass inserts plainly (a version the target holds fails on the primary key,
    // and the batch runs again as a replay): conflict handling costs a fifth of the apply.
    let conflict = if pass == Pass::Fresh {
        String::new()
    } else {
        format!(
            " ON CONFLICT ({}, {LSN_COLUMN}) DO NOTHING",
            names.key_list()
        )
    };

    let plain_values = names.values(|_, q| format!("s.{q}"));
    let insert = format!(
        "INSERT INTO {table} ({insert_columns}) SELECT {plain_values}, {layout_values} \
         FROM {stage} s WHERE s.{OP_COLUMN} <> 'x' AND s.{UNCHANGED_COLUMN} IS NULL{only}{conflict}"
    );
    let carried_values = names.values(|i, q| {
        format!("CASE WHEN {i} = ANY(s.{UNCHANGED_COLUMN}) THEN p.{q} ELSE s.{q} END")
    });
    let carried_match =
        names.key_match_with("p", |n, q| format!("coalesce(s.{FROM_COLUMN}{n}, s.{q})"));
    // The values come from the key's latest version before this one: the version it
    // supersedes, wherever in the batch or before it that was written (not "the current
    // version": an earlier plan of the batch may have written and closed it already).
    let insert_carried = format!(
        "INSERT INTO {table} ({insert_columns}) SELECT {carried_values}, {layout_values} \
         FROM {stage} s LEFT JOIN LATERAL (SELECT * FROM {table} p WHERE {carried_match} \
           AND p.{LSN_COLUMN} < coalesce(s.{FROM_LSN_COLUMN}, s.{LSN_COLUMN}) \
           ORDER BY p.{LSN_COLUMN} DESC LIMIT 1) p ON true \
         WHERE s.{OP_COLUMN} <> 'x' AND s.{UNCHANGED_COLUMN} IS NOT NULL{only}{conflict}"
    );
    // The event that ends a current version is the first one after it: the key's latest
    // version before the event, if it is current and not older than the key's previous event
    // in the batch. Row by row, the events run in order, so the first to run is that one.
    // Each event looks its version up by the primary key and the update finds it by ctid,
    // read in the same statement (the sink is the table's only writer): a join of the stage
    // and the table lets the planner hash the whole history table every batch, three times
    // slower at 150,000 versions and slower still as the history grows.
    let follows = if pass == Pass::OneRow {
        String::new()
    } else {
        format!(" AND p.{LSN_COLUMN} >= coalesce(s.{PREVIOUS_COLUMN}, '0/0')")
    };
    // Without tombstones a created key has no current version to end (a delete or a
    // truncate ended it), so its event needs no lookup; a tombstone is current until then.
    let ends_something = if layout.tombstones {
        "true".to_string()
    } else {
        format!("s.{OP_COLUMN} <> 'c'")
    };
    let close = format!(
        "UPDATE {table} t SET {} FROM (SELECT v.version, s.{AT_COLUMN} AS at FROM {stage} s \
         CROSS JOIN LATERAL (SELECT p.ctid AS version FROM {table} p WHERE {} AND {} \
           AND p.{LSN_COLUMN} < s.{LSN_COLUMN}{follows} \
           ORDER BY p.{LSN_COLUMN} DESC LIMIT 1) v WHERE {ends_something}{only}) c \
         WHERE t.ctid = c.version AND {}",
        layout.close("c.at"),
        names.key_match("p"),
        layout.is_current("p."),
        layout.is_current("t."),
    );
    let truncate = plan.truncate.map(|(lsn, at)| {
        format!(
            "UPDATE {table} t SET {} WHERE {} AND t.{LSN_COLUMN} < '{lsn}'::pg_lsn",
            layout.close(&format!(
                "'epoch'::timestamptz + {at} * interval '1 microsecond'"
            )),
            layout.is_current("t."),
        )
    });

    let carried = plan
        .events
        .iter()
        .any(|e| e.kind.is_version() && e.row.contains(&Value::UnchangedToast));
    let has_direct = plan.events.iter().any(|e| layout.is_direct(e));
    PlanSql {
        direct_copy: (pass == Pass::Fresh && has_direct)
            .then(|| format!("COPY {table} ({insert_columns}) FROM STDIN")),
        create_stage: names.create_stage(&STAGE_COLUMNS),
        copy_stage: names.copy_stage(&STAGE_COLUMNS),
        truncate,
        statements: [insert_carried]
            .into_iter()
            .filter(|_| carried)
            .chain([insert, close])
            .collect(),
    }
}

/// The plan's events in COPY text format for the staging table: in a fresh pass, all but the
/// versions that go straight into the target, else all.
pub fn stage_rows(plan: &HistoryPlan, layout: Layout, pass: Pass) -> Vec<u8> {
    let mut out = Vec::new();
    for (number, event) in plan.events.iter().enumerate() {
        if pass == Pass::Fresh && layout.is_direct(event) {
            continue;
        }
        stage_event(&mut out, plan, number);
    }
    out
}

/// Appends the plan's event `number` as a staging row in COPY text format.
pub fn stage_event(out: &mut Vec<u8>, plan: &HistoryPlan, number: usize) {
    let int_array = ValueType::Array(Box::new(ValueType::Int4));
    let text = |v: String| Value::Text(v);
    let KeyEvent {
        kind,
        row,
        carry_from,
        lsn,
        at,
        previous,
        valid_to,
        closed_by: _,
    } = &plan.events[number];
    let unchanged = if kind.is_version() {
        unchanged_columns(row)
    } else {
        Value::Null
    };
    stage_row(
        out,
        &plan.relation,
        row,
        carry_from.as_ref().map(|carry| &carry.from),
        &[
            (
                &ValueType::Text,
                carry_from
                    .as_ref()
                    .map_or(Value::Null, |carry| text(carry.before.to_string())),
            ),
            (&ValueType::Int4, Value::Int(number as i64)),
            (&ValueType::Text, text(kind.code().into())),
            (&ValueType::Text, text(lsn.to_string())),
            (
                &ValueType::Text,
                previous.map_or(Value::Null, |p| text(p.to_string())),
            ),
            (&ValueType::TimestampTz, Value::TimestampTz(*at)),
            (
                &ValueType::TimestampTz,
                valid_to.map_or(Value::Null, Value::TimestampTz),
            ),
            (&int_array, unchanged),
        ],
    );
}

/// The versions a fresh pass COPYs straight into the target (see `Layout::is_direct`), in
/// COPY text format for the source columns and tidemark's history columns.
pub fn direct_rows(plan: &HistoryPlan, layout: Layout) -> Vec<u8> {
    let types: Vec<&ValueType> = plan
        .relation
        .columns
        .iter()
        .map(|c| &c.value_type)
        .collect();
    let mut out = Vec::new();
    for event in plan.events.iter().filter(|e| layout.is_direct(e)) {
        let history = [
            (&ValueType::TimestampTz, Value::TimestampTz(event.at)),
            (
                &ValueType::TimestampTz,
                event.valid_to.map_or(Value::Null, Value::TimestampTz),
            ),
            (&ValueType::Bool, Value::Bool(event.valid_to.is_none())),
            (&ValueType::Text, Value::Text(event.kind.code().into())),
            (&ValueType::Text, Value::Text(event.lsn.to_string())),
        ];
        write_row(
            &mut out,
            types
                .iter()
                .copied()
                .zip(&event.row)
                .chain(history.iter().map(|(t, v)| (*t, v))),
        );
    }
    out
}
