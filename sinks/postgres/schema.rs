//! Source schema changes in a PostgreSQL target. The schema changes a batch holds are applied
//! in the batch's own transaction: columns added, renamed and widened before its rows,
//! the temporary defaults of added columns removed (and dropped columns dropped, when so
//! configured) after them. The statements are computed from the target table's columns as
//! they are, so applying a batch again, or after the operator altered a column by hand,
//! changes nothing twice.
//!
//! Changes that came before a schema change in the batch are applied after it, under the
//! names it gives their columns ([`renamed`]). A row the batch inserts before a column was
//! added takes the column's value for existing rows (its default until the batch ends), as it
//! did in the source.

use std::sync::Arc;

use postgres_protocol::escape::{escape_identifier, escape_literal};

use super::ddl::{target_type, TargetTable};
use crate::config::DroppedColumns;
use crate::event::{Column, ColumnChange, ExistingRows, Relation, SchemaChange};

/// A schema change of one table and the target table it applies to.
#[derive(Debug, Clone)]
pub struct SchemaStep {
    pub target: TargetTable,
    /// The table's description after the change.
    pub relation: Arc<Relation>,
    pub change: SchemaChange,
}

/// The target table's columns as a step finds them: name and type as `format_type` spells
/// it; None when the table does not exist.
pub type TargetColumns = Option<Vec<(String, String)>>;

/// The columns of the target table `$1` (its quoted, qualified name), if it exists.
pub const TARGET_COLUMNS_QUERY: &str =
    "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a \
     WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped \
     ORDER BY a.attnum";

/// The statements of one step: before the batch's rows, and after them.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Alters {
    pub before: Vec<String>,
    pub after: Vec<String>,
}

/// A schema change the target cannot take without the operator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the source changed column {column:?} of {table} from {from} to {to}, which the target \
     column ({target} {column:?}, now {now}) cannot take without losing values; alter it \
     yourself, deciding what becomes of values that do not fit (ALTER TABLE {target} ALTER \
     COLUMN {quoted} TYPE {to} USING …): the sink retries the batch and goes on once the target \
     column has type {to}"
)]
pub struct Narrowing {
    pub table: String,
    pub target: String,
    pub column: String,
    pub quoted: String,
    pub from: String,
    pub to: String,
    pub now: String,
}

/// The statements that bring the target table from `columns` to the shape `step` leaves,
/// and `columns` as they leave it. `create` is what creates the table with all of the
/// description's columns, for a table that does not exist yet.
pub fn alters(
    step: &SchemaStep,
    columns: &mut TargetColumns,
    create: &[String],
    dropped: DroppedColumns,
) -> Result<Alters, Box<Narrowing>> {
    let table = step.target.quoted();
    let mut alters = Alters::default();
    let Some(existing) = columns.as_mut() else {
        alters.before.extend_from_slice(create);
        *columns = Some(
            step.relation
                .columns
                .iter()
                .map(|c| (c.name.clone(), target_type(c)))
                .collect(),
        );
        return Ok(alters);
    };
    let has = |existing: &[(String, String)], name: &str| existing.iter().any(|(n, _)| n == name);
    for change in &step.change.columns {
        match change {
            ColumnChange::Renamed { from, to } => {
                if has(existing, from) && !has(existing, to) {
                    alters.before.push(format!(
                        "ALTER TABLE {table} RENAME COLUMN {} TO {}",
                        escape_identifier(from),
                        escape_identifier(to)
                    ));
                    for (name, _) in existing.iter_mut().filter(|(n, _)| n == from) {
                        name.clone_from(to);
                    }
                    rename_default(&mut alters.after, &table, from, to);
                }
            }
            ColumnChange::Added {
                name,
                existing_rows,
            } => {
                let Some(column) = step.relation.columns.iter().find(|c| c.name == *name) else {
                    continue;
                };
                if has(existing, name) {
                    continue;
                }
                let column_type = target_type(column);
                let quoted = escape_identifier(name);
                match existing_rows {
                    ExistingRows::Value(value) => {
                        alters.before.push(format!(
                            "ALTER TABLE {table} ADD COLUMN {quoted} {column_type} DEFAULT {}::{column_type}",
                            escape_literal(value)
                        ));
                        alters.after.push(drop_default(&table, name));
                    }
                    ExistingRows::Null | ExistingRows::Unknown => alters.before.push(format!(
                        "ALTER TABLE {table} ADD COLUMN {quoted} {column_type}"
                    )),
                }
                existing.push((name.clone(), column_type));
            }
            ColumnChange::Retyped {
                name,
                from,
                time_zone,
            } => {
                let Some(column) = step.relation.columns.iter().find(|c| c.name == *name) else {
                    continue;
                };
                let wanted = target_type(column);
                let Some((_, now)) = existing.iter_mut().find(|(n, _)| n == name) else {
                    continue;
                };
                if *now == wanted {
                    continue;
                }
                let quoted = escape_identifier(name);
                match conversion(from, column, &quoted, time_zone.as_deref()) {
                    Some(using) => {
                        alters.before.push(format!(
                            "ALTER TABLE {table} ALTER COLUMN {quoted} TYPE {wanted} USING {using}"
                        ));
                        *now = wanted;
                    }
                    None => {
                        return Err(Box::new(Narrowing {
                            table: step.relation.qualified_name(),
                            target: table,
                            column: name.clone(),
                            quoted,
                            from: from.type_name.clone(),
                            to: wanted,
                            now: now.clone(),
                        }))
                    }
                }
            }
            ColumnChange::Dropped { name } => {
                let default = drop_default(&table, name);
                alters.after.retain(|s| *s != default);
                if dropped == DroppedColumns::Drop && has(existing, name) {
                    alters.after.push(format!(
                        "ALTER TABLE {table} DROP COLUMN IF EXISTS {}",
                        escape_identifier(name)
                    ));
                    existing.retain(|(n, _)| n != name);
                }
            }
        }
    }
    // Columns the target lacks for any other reason (a rename of a column it never had).
    for column in &step.relation.columns {
        if !has(existing, &column.name) {
            let column_type = target_type(column);
            alters.before.push(format!(
                "ALTER TABLE {table} ADD COLUMN {} {column_type}",
                escape_identifier(&column.name)
            ));
            existing.push((column.name.clone(), column_type));
        }
    }
    Ok(alters)
}

fn drop_default(table: &str, column: &str) -> String {
    format!(
        "ALTER TABLE {table} ALTER COLUMN {} DROP DEFAULT",
        escape_identifier(column)
    )
}

/// An added column renamed in the same batch: its default goes under the new name.
fn rename_default(after: &mut [String], table: &str, from: &str, to: &str) {
    let old = drop_default(table, from);
    for statement in after.iter_mut().filter(|s| **s == old) {
        *statement = drop_default(table, to);
    }
}

/// The `USING` expression that converts a column of type `from` into `to` without losing a
/// value, or None when the change narrows (or converts between unrelated types). `time_zone`
/// is the source session's, which PostgreSQL read a timestamp without zone in.
fn conversion(from: &Column, to: &Column, quoted: &str, time_zone: Option<&str>) -> Option<String> {
    const INT2: u32 = 21;
    const INT4: u32 = 23;
    const INT8: u32 = 20;
    const NUMERIC: u32 = 1700;
    const FLOAT4: u32 = 700;
    const FLOAT8: u32 = 701;
    const TEXT: u32 = 25;
    const VARCHAR: u32 = 1043;
    const BPCHAR: u32 = 1042;
    const DATE: u32 = 1082;
    const TIMESTAMP: u32 = 1114;
    const TIMESTAMPTZ: u32 = 1184;
    const TIME: u32 = 1083;
    const TIMETZ: u32 = 1266;
    const VARBIT: u32 = 1562;
    const JSON: u32 = 114;
    const JSONB: u32 = 3802;
    let wanted = target_type(to);
    let cast = format!("{quoted}::{wanted}");
    let (old, new) = (from.type_modifier, to.type_modifier);
    let widens = match (from.type_oid, to.type_oid) {
        // Lengths: -1 is unlimited.
        (a, b) if a == b && matches!(a, VARCHAR | BPCHAR | VARBIT) => {
            new == -1 || (old != -1 && new >= old)
        }
        (NUMERIC, NUMERIC) => new == -1 || (old != -1 && numeric_fits(old, new)),
        // Fractional-second precision: -1 is the most (6).
        (a, b) if a == b && matches!(a, TIMESTAMP | TIMESTAMPTZ | TIME | TIMETZ) => {
            new == -1 || (old != -1 && new >= old)
        }
        (INT2, INT4 | INT8 | NUMERIC | FLOAT4 | FLOAT8) => true,
        (INT4, INT8 | NUMERIC | FLOAT8) => true,
        (INT8, NUMERIC) => true,
        (FLOAT4, FLOAT8) => true,
        (VARCHAR | BPCHAR, TEXT) => true,
        (TEXT, VARCHAR) => new == -1,
        (BPCHAR, VARCHAR) => new == -1 || (old != -1 && new >= old),
        (JSON, JSONB) => true,
        (TIMESTAMP, TIMESTAMPTZ) | (DATE, TIMESTAMPTZ) => {
            return Some(match time_zone {
                Some(zone) => format!("{quoted}::timestamp AT TIME ZONE {}", escape_literal(zone)),
                None => cast,
            })
        }
        (DATE, TIMESTAMP) => true,
        _ => false,
    };
    widens.then_some(cast)
}

/// Whether every value of `numeric(p, s)` (type modifier `old`) fits `numeric(p2, s2)`
/// (`new`): as many digits before the point, and as many after.
fn numeric_fits(old: i32, new: i32) -> bool {
    let split = |typmod: i32| {
        let packed = typmod - 4;
        ((packed >> 16) & 0xFFFF, packed & 0xFFFF)
    };
    let ((p, s), (p2, s2)) = (split(old), split(new));
    p2 - s2 >= p - s && s2 >= s
}

/// `relation` as it stands after the schema changes `later` (each of its table, after it in
/// the batch): its columns under their new names.
pub fn renamed<'a>(relation: &Relation, later: impl Iterator<Item = &'a SchemaStep>) -> Relation {
    let mut renamed = relation.clone();
    for step in later {
        for change in &step.change.columns {
            if let ColumnChange::Renamed { from, to } = change {
                for column in renamed.columns.iter_mut().filter(|c| c.name == *from) {
                    column.name.clone_from(to);
                }
            }
        }
    }
    renamed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Position, RelationId, ValueType};

    fn column(name: &str, type_oid: u32, type_modifier: i32, type_name: &str) -> Column {
        Column {
            name: name.into(),
            type_oid,
            type_modifier,
            type_name: type_name.into(),
            value_type: ValueType::Other,
            primary_key: name == "id",
            replica_identity: name == "id",
        }
    }

    fn step(columns: Vec<Column>, changes: Vec<ColumnChange>) -> SchemaStep {
        SchemaStep {
            target: TargetTable {
                schema: "replica".into(),
                name: "t".into(),
            },
            relation: Arc::new(Relation {
                oid: 1,
                schema: "public".into(),
                table: "t".into(),
                columns,
            }),
            change: SchemaChange {
                relation: RelationId(9),
                position: Position(1),
                columns: changes,
                exact: true,
            },
        }
    }

    fn target(columns: &[(&str, &str)]) -> TargetColumns {
        Some(
            columns
                .iter()
                .map(|(n, t)| (n.to_string(), t.to_string()))
                .collect(),
        )
    }

    #[test]
    fn an_added_column_gives_existing_rows_their_value_until_the_batch_ends() {
        let step = step(
            vec![column("id", 23, -1, "integer"), column("d", 25, -1, "text")],
            vec![ColumnChange::Added {
                name: "d".into(),
                existing_rows: ExistingRows::Value("it's".into()),
            }],
        );
        let mut columns = target(&[("id", "integer")]);
        let alters = alters(&step, &mut columns, &[], DroppedColumns::Keep).unwrap();
        assert_eq!(
            alters,
            Alters {
                before: vec![
                    "ALTER TABLE \"replica\".\"t\" ADD COLUMN \"d\" text DEFAULT 'it''s'::text"
                        .into()
                ],
                after: vec!["ALTER TABLE \"replica\".\"t\" ALTER COLUMN \"d\" DROP DEFAULT".into()],
            }
        );
        // Applied again (a replay), the target holds it: nothing to do.
        assert_eq!(
            super::alters(&step, &mut columns, &[], DroppedColumns::Keep).unwrap(),
            Alters::default()
        );
    }

    #[test]
    fn a_rename_is_applied_once() {
        let step = step(
            vec![column("id", 23, -1, "integer"), column("b", 25, -1, "text")],
            vec![ColumnChange::Renamed {
                from: "a".into(),
                to: "b".into(),
            }],
        );
        let mut columns = target(&[("id", "integer"), ("a", "text")]);
        let first = alters(&step, &mut columns, &[], DroppedColumns::Keep).unwrap();
        assert_eq!(
            first.before,
            vec!["ALTER TABLE \"replica\".\"t\" RENAME COLUMN \"a\" TO \"b\"".to_string()]
        );
        let again = alters(&step, &mut columns, &[], DroppedColumns::Keep).unwrap();
        assert_eq!(again, Alters::default());
    }

    #[test]
    fn widening_alters_the_type_and_narrowing_names_the_column_and_the_fix() {
        let widened = step(
            vec![
                column("id", 23, -1, "integer"),
                column("n", 20, -1, "bigint"),
                column("p", 1700, (12 << 16 | 4) + 4, "numeric(12,4)"),
                column("v", 25, -1, "text"),
                column("at", 1184, -1, "timestamp with time zone"),
            ],
            vec![
                ColumnChange::Retyped {
                    name: "n".into(),
                    from: column("n", 23, -1, "integer"),
                    time_zone: None,
                },
                ColumnChange::Retyped {
                    name: "p".into(),
                    from: column("p", 1700, (6 << 16 | 2) + 4, "numeric(6,2)"),
                    time_zone: None,
                },
                ColumnChange::Retyped {
                    name: "v".into(),
                    from: column("v", 1043, 14, "character varying(10)"),
                    time_zone: None,
                },
                ColumnChange::Retyped {
                    name: "at".into(),
                    from: column("at", 1114, -1, "timestamp without time zone"),
                    time_zone: Some("Europe/Berlin".into()),
                },
            ],
        );
        let mut columns = target(&[
            ("id", "integer"),
            ("n", "integer"),
            ("p", "numeric(6,2)"),
            ("v", "character varying(10)"),
            ("at", "timestamp without time zone"),
        ]);
        let alters = alters(&widened, &mut columns, &[], DroppedColumns::Keep).unwrap();
        assert_eq!(
            alters.before,
            vec![
                "ALTER TABLE \"replica\".\"t\" ALTER COLUMN \"n\" TYPE bigint USING \"n\"::bigint",
                "ALTER TABLE \"replica\".\"t\" ALTER COLUMN \"p\" TYPE numeric(12,4) USING \"p\"::numeric(12,4)",
                "ALTER TABLE \"replica\".\"t\" ALTER COLUMN \"v\" TYPE text USING \"v\"::text",
                "ALTER TABLE \"replica\".\"t\" ALTER COLUMN \"at\" TYPE timestamp with time zone \
                 USING \"at\"::timestamp AT TIME ZONE 'Europe/Berlin'",
            ]
        );

        let narrowed = step(
            vec![
                column("id", 23, -1, "integer"),
                column("p", 1700, (6 << 16 | 2) + 4, "numeric(6,2)"),
            ],
            vec![ColumnChange::Retyped {
                name: "p".into(),
                from: column("p", 1700, (12 << 16 | 4) + 4, "numeric(12,4)"),
                time_zone: None,
            }],
        );
        let mut columns = target(&[("id", "integer"), ("p", "numeric(12,4)")]);
        let error = super::alters(&narrowed, &mut columns, &[], DroppedColumns::Keep).unwrap_err();
        assert_eq!(error.column, "p");
        assert!(
            error.to_string().contains(
                "ALTER TABLE \"replica\".\"t\" ALTER COLUMN \"p\" TYPE numeric(6,2) USING"
            ),
            "{error}"
        );
        // The operator altered the target column: the sink goes on.
        let mut columns = target(&[("id", "integer"), ("p", "numeric(6,2)")]);
        assert_eq!(
            super::alters(&narrowed, &mut columns, &[], DroppedColumns::Keep).unwrap(),
            Alters::default()
        );
    }

    #[test]
    fn a_dropped_column_is_kept_or_dropped_after_the_rows() {
        let step = step(
            vec![column("id", 23, -1, "integer")],
            vec![ColumnChange::Dropped { name: "c".into() }],
        );
        let mut columns = target(&[("id", "integer"), ("c", "text")]);
        assert_eq!(
            alters(&step, &mut columns, &[], DroppedColumns::Keep).unwrap(),
            Alters::default()
        );
        assert_eq!(
            alters(&step, &mut columns, &[], DroppedColumns::Drop)
                .unwrap()
                .after,
            vec!["ALTER TABLE \"replica\".\"t\" DROP COLUMN IF EXISTS \"c\"".to_string()]
        );
    }

    #[test]
    fn a_missing_table_is_created_with_the_new_columns() {
        let step = step(
            vec![column("id", 23, -1, "integer")],
            vec![ColumnChange::Dropped { name: "c".into() }],
        );
        let mut columns = None;
        let create = vec!["CREATE TABLE …".to_string()];
        let alters = alters(&step, &mut columns, &create, DroppedColumns::Keep).unwrap();
        assert_eq!(alters.before, create);
        assert_eq!(columns, target(&[("id", "integer")]));
    }

    #[test]
    fn earlier_rows_take_the_later_names() {
        let later = step(
            vec![column("id", 23, -1, "integer"), column("b", 25, -1, "text")],
            vec![ColumnChange::Renamed {
                from: "a".into(),
                to: "b".into(),
            }],
        );
        let earlier = Relation {
            oid: 1,
            schema: "public".into(),
            table: "t".into(),
            columns: vec![column("id", 23, -1, "integer"), column("a", 25, -1, "text")],
        };
        let names: Vec<String> = renamed(&earlier, [&later].into_iter())
            .columns
            .into_iter()
            .map(|c| c.name)
            .collect();
        assert_eq!(names, vec!["id", "b"]);
    }
}
