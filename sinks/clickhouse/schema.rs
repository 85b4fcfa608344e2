//! Schema changes in a ClickHouse target. A batch's schema changes are made first, in log
//! order, before any of its rows (a table it has not written yet is created with the new
//! columns first): `ADD COLUMN` (with the value the rows that existed before
//! hold, as the column's `DEFAULT`, which ClickHouse reads for the parts written before it;
//! not in a changelog, whose earlier rows are changes made before the column existed),
//! `RENAME COLUMN`, `MODIFY COLUMN` to the new type (ClickHouse converts the rows it holds). A
//! dropped column stays, NULL in the rows written after. Each statement is a no-op when made
//! again after a crash before the checkpoint. Rows of the batch described before a change are
//! then written as the target stands: under the later names and types (`target_shape`).

use std::sync::Arc;

use super::types::{key_literal, quote_identifier, quote_string, ChType};
use super::ClickHouseSink;
use crate::config::ClickHouseMode;
use crate::event::{
    Column, ColumnChange, ExistingRows, Record, Relation, RelationId, SchemaChange,
};
use crate::log::LogEntry;
use crate::pgtext::parse_text;
use crate::sinks::SinkError;

/// A schema change of the batch and the table's description after it.
pub(super) struct SchemaStep {
    relation: Arc<Relation>,
    change: SchemaChange,
}

impl ClickHouseSink {
    /// Makes the schema changes of `entries` in the target tables that exist; remembers them
    /// for [`ClickHouseSink::target_shape`].
    pub(super) async fn apply_schema_changes(
        &mut self,
        entries: &[LogEntry],
    ) -> Result<(), SinkError> {
        self.schema_steps.clear();
        for entry in entries {
            let Record::Schema(change) = &entry.record else {
                continue;
            };
            let relation = self.log.relation(change.relation)?;
            let target = self.target_of(&relation);
            let (database, table) = self.target_names(&relation);
            let listed = self
                .run(
                    &format!(
                        "SELECT name FROM system.columns WHERE database = {} AND table = {} \
                         FORMAT TSVRaw",
                        quote_string(&database),
                        quote_string(&table)
                    ),
                    &format!("reading the columns of {target}"),
                )
                .await?;
            let mut columns: Vec<String> = String::from_utf8_lossy(&listed)
                .lines()
                .map(str::to_string)
                .collect();
            if columns.is_empty() {
                // A table the batch has not written yet is created with the new columns; the
                // statements then only set the added columns' defaults for the rows before.
                self.prepare(change.relation, &relation).await?;
                columns = relation.columns.iter().map(|c| c.name.clone()).collect();
            }
            for alter in self.alters(&relation, change, &target, &columns)? {
                self.run(&alter, &format!("changing the columns of {target}"))
                    .await?;
            }
            tracing::info!(
                sink = %self.name,
                table = %relation.qualified_name(),
                changes = ?change.columns,
                "schema change applied"
            );
            // Tables are checked again against the descriptions their rows come with.
            self.prepared.clear();
            self.schema_steps.push(SchemaStep {
                relation,
                change: change.clone(),
            });
        }
        Ok(())
    }

    /// The statements that bring `target` to `relation`, the description `change` leaves.
    /// `columns`: the names the target's columns have now.
    fn alters(
        &self,
        relation: &Relation,
        change: &SchemaChange,
        target: &str,
        columns: &[String],
    ) -> Result<Vec<String>, SinkError> {
        let has = |name: &str| columns.iter().any(|c| c == name);
        let keyed = self.config.mode != ClickHouseMode::Changelog;
        let column_of = |name: &str| relation.columns.iter().find(|c| c.name == name);
        let mut alters = Vec::new();
        for column_change in &change.columns {
            match column_change {
                ColumnChange::Added {
                    name,
                    existing_rows,
                } => {
                    let Some(column) = column_of(name) else {
                        continue;
                    };
                    let ty = ChType::of_column(column, keyed && column.primary_key);
                    // A changelog's rows are changes made before the column existed: NULL.
                    let default = match existing_rows {
                        ExistingRows::Value(text) if keyed => {
                            self.default_of(relation, column, text)
                        }
                        _ => String::new(),
                    };
                    let quoted = quote_identifier(name);
                    alters.push(format!(
                        "ALTER TABLE {target} ADD COLUMN IF NOT EXISTS {quoted} {}{default}",
                        ty.name()
                    ));
                    if !default.is_empty() {
                        alters.push(format!(
                            "ALTER TABLE {target} MODIFY COLUMN {quoted}{default}"
                        ));
                    }
                }
                // Made once: after a crash the target may have the new name already.
                ColumnChange::Renamed { from, to } if !has(from) || has(to) => {}
                ColumnChange::Renamed { from, to } => {
                    if keyed && column_of(to).is_some_and(|c| c.primary_key) {
                        return Err(SinkError::Target {
                            sink: self.name.clone(),
                            message: format!(
                                "column {from:?} of {} was renamed to {to:?}, but it is part of \
                                 the primary key, which orders {target}: ClickHouse cannot \
                                 rename a key column. Rename it in ClickHouse by recreating \
                                 the table, or drop {target} and re-snapshot the table",
                                relation.qualified_name()
                            ),
                        });
                    }
                    alters.push(format!(
                        "ALTER TABLE {target} RENAME COLUMN {} TO {}",
                        quote_identifier(from),
                        quote_identifier(to)
                    ));
                }
                ColumnChange::Retyped { name, .. } => {
                    let Some(column) = column_of(name) else {
                        continue;
                    };
                    alters.push(format!(
                        "ALTER TABLE {target} MODIFY COLUMN IF EXISTS {} {}",
                        quote_identifier(name),
                        ChType::of_column(column, keyed && column.primary_key).name()
                    ));
                }
                // Kept: the rows written before hold their values, later ones NULL.
                ColumnChange::Dropped { .. } => {}
            }
        }
        Ok(alters)
    }

    /// ` DEFAULT <value>` for a column added with `text` in the rows that existed; none (they
    /// read NULL) when ClickHouse's column cannot hold it, with a warning.
    fn default_of(&self, relation: &Relation, column: &Column, text: &str) -> String {
        let ty = match ChType::of_column(column, true) {
            ChType::Nullable(inner) => *inner,
            ty => ty,
        };
        let literal = parse_text(&column.value_type, text)
            .map_err(|e| e.to_string())
            .and_then(|value| key_literal(&ty, &value).map_err(|e| e.to_string()))
            .ok()
            .filter(|_| !matches!(ty, ChType::Array(_)));
        match literal {
            Some(literal) => format!(" DEFAULT {literal}"),
            None => {
                tracing::warn!(
                    sink = %self.name,
                    table = %relation.qualified_name(),
                    column = %column.name,
                    value = %text,
                    "the rows that existed before the column was added hold a value ClickHouse \
                     cannot take as the column's default; they read NULL (or empty) in it"
                );
                String::new()
            }
        }
    }

    /// `relation` (description `id`) as the target stands after the batch's schema changes of
    /// its table that follow it: its columns under their later names, with their later types.
    pub(super) fn target_shape(&self, id: RelationId, relation: &Arc<Relation>) -> Arc<Relation> {
        let later: Vec<&SchemaStep> = self
            .schema_steps
            .iter()
            .filter(|step| step.relation.oid == relation.oid && step.change.relation > id)
            .collect();
        let Some(last) = later.last() else {
            return Arc::clone(relation);
        };
        let mut shaped = (**relation).clone();
        for step in &later {
            for change in &step.change.columns {
                if let ColumnChange::Renamed { from, to } = change {
                    for column in shaped.columns.iter_mut().filter(|c| c.name == *from) {
                        column.name.clone_from(to);
                    }
                }
            }
        }
        for column in &mut shaped.columns {
            if let Some(now) = last.relation.columns.iter().find(|c| c.name == column.name) {
                let primary_key = column.primary_key;
                *column = now.clone();
                column.primary_key = primary_key;
            }
        }
        Arc::new(shaped)
    }
}
