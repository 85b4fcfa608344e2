//! Schema changes of captured tables. pgoutput describes a table again (a Relation message)
//! only before its next row change, by column names: it cannot tell a rename from a drop and
//! an add, and says nothing of the value a new column has in the rows that existed before.
//! So an event trigger on `ddl_command_end` writes, after each `ALTER TABLE`, a transactional
//! logical decoding message with the table's columns as the catalog holds them then (number,
//! name, type, whether it has a default, the value existing rows hold), at the change's exact
//! place in the stream. The source compares it with the table's previous columns by number.
//!
//! Without the trigger (creating one needs a superuser) the source compares each new Relation
//! message with the table's previous description by name, and reads the values of new columns
//! from the catalog when the message arrives: renames become a drop and an add.

use serde::{Deserialize, Serialize};

use crate::event::{Column, ColumnChange, ExistingRows, Relation};

/// The prefix of the trigger's logical decoding messages.
pub const MESSAGE_PREFIX: &str = "tidemark_ddl";

/// The event trigger, in the source database.
pub const TRIGGER_NAME: &str = "tidemark_ddl";

/// A table's columns as the source catalog describes them at one point in the stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableShape {
    pub oid: u32,
    pub schema: String,
    pub table: String,
    /// The session's `TimeZone` when the shape was read.
    pub time_zone: String,
    pub columns: Vec<ShapeColumn>,
}

/// One column of a [`TableShape`]: the columns pgoutput sends (not dropped, not generated).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShapeColumn {
    pub attnum: i16,
    pub name: String,
    pub type_oid: u32,
    pub typmod: i32,
    pub has_default: bool,
    /// `attmissingval` as text: a one-element array literal holding the value rows that
    /// existed when the column was added have in it.
    pub missing: Option<String>,
    pub primary_key: bool,
    pub replica_identity: bool,
}

impl ShapeColumn {
    /// What rows that existed before this column was added hold in it.
    fn existing_rows(&self) -> ExistingRows {
        match (&self.missing, self.has_default) {
            (Some(missing), _) => match array_element(missing) {
                Some(value) => ExistingRows::Value(value),
                None => ExistingRows::Null,
            },
            // A default PostgreSQL evaluated for each row while rewriting the table.
            (None, true) => ExistingRows::Unknown,
            (None, false) => ExistingRows::Null,
        }
    }
}

/// A query that returns the shape of the table whose oid `table` (an SQL expression) is, as
/// JSON text, or NULL when it is not an ordinary or partitioned table.
pub fn shape_query(table: &str) -> String {
    format!(
        "SELECT json_build_object('oid', c.oid::int8, 'schema', n.nspname, 'table', c.relname, \
           'time_zone', current_setting('TimeZone'), \
           'columns', coalesce(json_agg(json_build_object( \
             'attnum', a.attnum, 'name', a.attname, 'type_oid', a.atttypid::int8, \
             'typmod', a.atttypmod, 'has_default', a.atthasdef, \
             'missing', CASE WHEN a.atthasmissing THEN a.attmissingval::text END, \
             'primary_key', coalesce(a.attnum = ANY(pk.indkey), false), \
             'replica_identity', CASE c.relreplident WHEN 'f' THEN true \
               WHEN 'i' THEN coalesce(a.attnum = ANY(ri.indkey), false) \
               WHEN 'd' THEN coalesce(a.attnum = ANY(pk.indkey), false) ELSE false END) \
             ORDER BY a.attnum) FILTER (WHERE a.attnum IS NOT NULL), '[]'))::text \
         FROM pg_catalog.pg_class c \
         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
         LEFT JOIN pg_catalog.pg_index pk ON pk.indrelid = c.oid AND pk.indisprimary \
         LEFT JOIN pg_catalog.pg_index ri ON ri.indrelid = c.oid AND ri.indisreplident \
         LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 \
           AND NOT a.attisdropped AND a.attgenerated = '' \
         WHERE c.oid = {table} AND c.relkind IN ('r', 'p') \
         GROUP BY c.oid, n.nspname, c.relname"
    )
}

/// The trigger function's body: one message per table an `ALTER TABLE` changed. It runs as
/// its owner (`SECURITY DEFINER`), so the role that alters a table needs no extra right, and
/// prints the values existing rows hold in the formats the agent reads (all but `TimeZone`,
/// which it reports: a timestamp with time zone prints with its offset).
fn trigger_function() -> String {
    format!(
        "CREATE OR REPLACE FUNCTION tidemark.ddl_message() RETURNS event_trigger \
         LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog \
         SET DateStyle = 'ISO' SET IntervalStyle = 'iso_8601' SET extra_float_digits = 3 \
         SET lc_monetary = 'C' AS $tidemark$ \
         DECLARE altered oid; shape text; \
         BEGIN \
           FOR altered IN SELECT DISTINCT objid FROM pg_event_trigger_ddl_commands() \
               WHERE classid = 'pg_class'::regclass LOOP \
             shape := ({}); \
             IF shape IS NOT NULL THEN \
               PERFORM pg_logical_emit_message(true, '{MESSAGE_PREFIX}', shape); \
             END IF; \
           END LOOP; \
         END $tidemark$",
        shape_query("altered")
    )
}

/// Statements that install (or update) the trigger and its function.
pub fn install_statements() -> String {
    format!(
        "CREATE SCHEMA IF NOT EXISTS tidemark;\n{};\n\
         DO $tidemark$ BEGIN \
           IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = '{TRIGGER_NAME}') THEN \
             CREATE EVENT TRIGGER {TRIGGER_NAME} ON ddl_command_end WHEN TAG IN ('ALTER TABLE') \
               EXECUTE FUNCTION tidemark.ddl_message(); \
           END IF; \
         END $tidemark$",
        trigger_function()
    )
}

/// Whether the installed trigger is enabled and runs this release's function (its body as
/// `pg_proc.prosrc` holds it).
pub fn installed_query() -> String {
    format!(
        "SELECT coalesce(bool_and(e.evtenabled <> 'D' AND p.prosrc = $1), false) \
         FROM pg_event_trigger e JOIN pg_proc p ON p.oid = e.evtfoid \
         WHERE e.evtname = '{TRIGGER_NAME}'"
    )
}

/// The function's body as `pg_proc.prosrc` keeps it: what lies between the dollar quotes.
pub fn trigger_function_source() -> String {
    let function = trigger_function();
    let start = function
        .find("$tidemark$")
        .map_or(0, |i| i + "$tidemark$".len());
    let end = function.rfind("$tidemark$").unwrap_or(function.len());
    function[start..end].to_string()
}

/// What changed between two shapes of one table, by column number: a column whose number
/// disappeared was dropped, a new number was added, a number with another name was renamed,
/// one with another type was retyped. `before_columns` are `before`'s columns as the model
/// describes them, in the same order.
pub fn diff_shapes(
    before: &TableShape,
    before_columns: &[Column],
    after: &TableShape,
) -> Vec<ColumnChange> {
    let mut changes = Vec::new();
    let find = |attnum: i16| after.columns.iter().find(|c| c.attnum == attnum);
    for old in &before.columns {
        if find(old.attnum).is_none() {
            changes.push(ColumnChange::Dropped {
                name: old.name.clone(),
            });
        }
    }
    for (old, old_column) in before.columns.iter().zip(before_columns) {
        let Some(new) = find(old.attnum) else {
            continue;
        };
        if new.name != old.name {
            changes.push(ColumnChange::Renamed {
                from: old.name.clone(),
                to: new.name.clone(),
            });
        }
        if (new.type_oid, new.typmod) != (old.type_oid, old.typmod) {
            changes.push(ColumnChange::Retyped {
                name: new.name.clone(),
                from: old_column.clone(),
                time_zone: Some(after.time_zone.clone()),
            });
        }
    }
    for new in &after.columns {
        if !before.columns.iter().any(|c| c.attnum == new.attnum) {
            changes.push(ColumnChange::Added {
                name: new.name.clone(),
                existing_rows: new.existing_rows(),
            });
        }
    }
    changes
}

/// What changed between two descriptions of one table, by column name (no trigger): renames
/// look like a drop and an add. `now` is the table's shape as the catalog holds it when the
/// new description arrived, for the values of added columns.
pub fn diff_relations(before: &Relation, after: &Relation, now: &TableShape) -> Vec<ColumnChange> {
    let mut changes = Vec::new();
    for old in &before.columns {
        if !after.columns.iter().any(|c| c.name == old.name) {
            changes.push(ColumnChange::Dropped {
                name: old.name.clone(),
            });
        }
    }
    for new in &after.columns {
        match before.columns.iter().find(|c| c.name == new.name) {
            Some(old) if (old.type_oid, old.type_modifier) != (new.type_oid, new.type_modifier) => {
                changes.push(ColumnChange::Retyped {
                    name: new.name.clone(),
                    from: old.clone(),
                    time_zone: None,
                })
            }
            Some(_) => {}
            None => changes.push(ColumnChange::Added {
                name: new.name.clone(),
                existing_rows: now
                    .columns
                    .iter()
                    .find(|c| c.name == new.name)
                    .map_or(ExistingRows::Unknown, ShapeColumn::existing_rows),
            }),
        }
    }
    changes
}

/// The element of a one-element array literal (`{7}`, `{"a \"b\""}`, `{NULL}`), or None for
/// NULL or anything else.
fn array_element(literal: &str) -> Option<String> {
    let inner = literal.strip_prefix('{')?.strip_suffix('}')?;
    let Some(quoted) = inner.strip_prefix('"') else {
        return (!inner.eq_ignore_ascii_case("NULL")).then(|| inner.to_string());
    };
    let quoted = quoted.strip_suffix('"')?;
    let mut value = String::with_capacity(quoted.len());
    let mut chars = quoted.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => value.push(chars.next()?),
            c => value.push(c),
        }
    }
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::ValueType;

    fn shape_column(attnum: i16, name: &str, type_oid: u32) -> ShapeColumn {
        ShapeColumn {
            attnum,
            name: name.into(),
            type_oid,
            typmod: -1,
            has_default: false,
            missing: None,
            primary_key: attnum == 1,
            replica_identity: attnum == 1,
        }
    }

    fn shape(columns: Vec<ShapeColumn>) -> TableShape {
        TableShape {
            oid: 7,
            schema: "public".into(),
            table: "t".into(),
            time_zone: "UTC".into(),
            columns,
        }
    }

    fn column(c: &ShapeColumn) -> Column {
        Column {
            name: c.name.clone(),
            type_oid: c.type_oid,
            type_modifier: c.typmod,
            type_name: format!("type{}", c.type_oid),
            value_type: ValueType::Other,
            primary_key: c.primary_key,
            replica_identity: c.replica_identity,
        }
    }

    fn diff(before: &TableShape, after: &TableShape) -> Vec<ColumnChange> {
        let columns: Vec<Column> = before.columns.iter().map(column).collect();
        diff_shapes(before, &columns, after)
    }

    #[test]
    fn a_renamed_column_keeps_its_number() {
        let before = shape(vec![shape_column(1, "id", 23), shape_column(2, "a", 25)]);
        let after = shape(vec![shape_column(1, "id", 23), shape_column(2, "b", 25)]);
        assert_eq!(
            diff(&before, &after),
            vec![ColumnChange::Renamed {
                from: "a".into(),
                to: "b".into()
            }]
        );
    }

    #[test]
    fn a_dropped_and_added_column_of_the_same_name_is_two_changes() {
        let before = shape(vec![shape_column(1, "id", 23), shape_column(2, "a", 25)]);
        let after = shape(vec![shape_column(1, "id", 23), shape_column(3, "a", 25)]);
        assert_eq!(
            diff(&before, &after),
            vec![
                ColumnChange::Dropped { name: "a".into() },
                ColumnChange::Added {
                    name: "a".into(),
                    existing_rows: ExistingRows::Null
                }
            ]
        );
    }

    #[test]
    fn an_added_column_says_what_existing_rows_hold() {
        let before = shape(vec![shape_column(1, "id", 23)]);
        let mut constant = shape_column(2, "d", 25);
        constant.has_default = true;
        constant.missing = Some(r#"{"x \"y\" \\z"}"#.into());
        let mut rewritten = shape_column(3, "u", 2950);
        rewritten.has_default = true;
        let mut number = shape_column(4, "n", 23);
        number.has_default = true;
        number.missing = Some("{7}".into());
        let after = shape(vec![
            shape_column(1, "id", 23),
            constant,
            rewritten,
            number,
            shape_column(5, "plain", 25),
        ]);
        let existing: Vec<ExistingRows> = diff(&before, &after)
            .into_iter()
            .map(|change| match change {
                ColumnChange::Added { existing_rows, .. } => existing_rows,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            existing,
            vec![
                ExistingRows::Value(r#"x "y" \z"#.into()),
                ExistingRows::Unknown,
                ExistingRows::Value("7".into()),
                ExistingRows::Null,
            ]
        );
    }

    #[test]
    fn a_retyped_column_carries_its_old_type_and_the_time_zone() {
        let before = shape(vec![shape_column(1, "id", 23), shape_column(2, "n", 23)]);
        let mut after = shape(vec![shape_column(1, "id", 23), shape_column(2, "n", 20)]);
        after.time_zone = "Europe/Berlin".into();
        assert_eq!(
            diff(&before, &after),
            vec![ColumnChange::Retyped {
                name: "n".into(),
                from: column(&shape_column(2, "n", 23)),
                time_zone: Some("Europe/Berlin".into()),
            }]
        );
    }

    #[test]
    fn array_literals_give_their_one_element() {
        assert_eq!(array_element("{7}").as_deref(), Some("7"));
        assert_eq!(array_element("{NULL}"), None);
        assert_eq!(array_element(r#"{"{1,2}"}"#).as_deref(), Some("{1,2}"));
        assert_eq!(array_element(r#"{"NULL"}"#).as_deref(), Some("NULL"));
        assert_eq!(array_element("7"), None);
    }

    #[test]
    fn without_numbers_a_rename_is_a_drop_and_an_add() {
        let before_shape = shape(vec![shape_column(1, "id", 23), shape_column(2, "a", 25)]);
        let now = shape(vec![shape_column(1, "id", 23), shape_column(2, "b", 25)]);
        let relation = |s: &TableShape| Relation {
            oid: 7,
            schema: "public".into(),
            table: "t".into(),
            columns: s.columns.iter().map(column).collect(),
        };
        assert_eq!(
            diff_relations(&relation(&before_shape), &relation(&now), &now),
            vec![
                ColumnChange::Dropped { name: "a".into() },
                ColumnChange::Added {
                    name: "b".into(),
                    existing_rows: ExistingRows::Null
                }
            ]
        );
    }
}
