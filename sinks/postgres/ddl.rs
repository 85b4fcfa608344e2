//! The SQL that shapes a PostgreSQL target: its schema, each target table created from the
//! source relation (same column types for built-in types, same primary key), columns that
//! appear later added, and the checkpoint table. Every identifier is quoted.

use postgres_protocol::escape::escape_identifier;

use crate::event::{Column, Relation, ValueType};

/// The first OID a user-defined object can have (PostgreSQL's `FirstNormalObjectId`): types
/// below it exist in every database, types above it (enums, domains, composites) may not exist
/// in the target.
const FIRST_USER_OID: u32 = 16384;

/// Pages of target tables keep a tenth free, so that an update (merge) or the closing of a
/// version (SCD2) can put the new row version on the same page without touching the indexes
/// (a HOT update): applying a batch of updates is about a fifth faster for it.
pub const FILLFACTOR: u32 = 90;

/// A target table: schema and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TargetTable {
    pub schema: String,
    pub name: String,
}

impl TargetTable {
    pub fn quoted(&self) -> String {
        format!(
            "{}.{}",
            escape_identifier(&self.schema),
            escape_identifier(&self.name)
        )
    }
}

impl std::fmt::Display for TargetTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// The column type in the target: the source's own spelling for built-in types, the closest
/// built-in type for user-defined ones (enums and unknown types as text), each as
/// `format_type` spells it, so that it compares with what the target's catalog says.
pub fn target_type(column: &Column) -> String {
    if column.type_oid < FIRST_USER_OID {
        return column.type_name.clone();
    }
    builtin_name(&column.value_type)
}

fn builtin_name(value_type: &ValueType) -> String {
    match value_type {
        ValueType::Bool => "boolean".into(),
        ValueType::Int2 => "smallint".into(),
        ValueType::Int4 => "integer".into(),
        ValueType::Int8 => "bigint".into(),
        ValueType::Float4 => "real".into(),
        ValueType::Float8 => "double precision".into(),
        ValueType::Numeric => "numeric".into(),
        ValueType::Bytea => "bytea".into(),
        ValueType::Date => "date".into(),
        ValueType::Time => "time without time zone".into(),
        ValueType::TimeTz => "time with time zone".into(),
        ValueType::Timestamp => "timestamp without time zone".into(),
        ValueType::TimestampTz => "timestamp with time zone".into(),
        ValueType::Interval => "interval".into(),
        ValueType::Uuid => "uuid".into(),
        ValueType::Json => "json".into(),
        ValueType::Jsonb => "jsonb".into(),
        ValueType::Array(element) => format!("{}[]", builtin_name(element)),
        ValueType::Text | ValueType::Other => "text".into(),
    }
}

pub fn create_schema(schema: &str) -> String {
    format!("CREATE SCHEMA IF NOT EXISTS {}", escape_identifier(schema))
}

/// The target table with the source's columns and primary key.
pub fn create_table(table: &TargetTable, relation: &Relation) -> String {
    let mut parts: Vec<String> = relation
        .columns
        .iter()
        .map(|c| format!("{} {}", escape_identifier(&c.name), target_type(c)))
        .collect();
    let key: Vec<String> = relation
        .columns
        .iter()
        .filter(|c| c.primary_key)
        .map(|c| escape_identifier(&c.name))
        .collect();
    if !key.is_empty() {
        parts.push(format!("PRIMARY KEY ({})", key.join(", ")));
    }
    format!(
        "CREATE TABLE IF NOT EXISTS {} ({}) WITH (fillfactor = {FILLFACTOR})",
        table.quoted(),
        parts.join(", ")
    )
}

pub fn add_column(table: &TargetTable, column: &Column) -> String {
    format!(
        "ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}",
        table.quoted(),
        escape_identifier(&column.name),
        target_type(column)
    )
}

/// One row per sink: the last log record applied and the log it belongs to, written in the
/// same transaction as the batch it ends. (`log_id` came later: added to older tables.)
pub fn create_checkpoint_table(schema: &str) -> String {
    let schema = escape_identifier(schema);
    format!(
        "CREATE TABLE IF NOT EXISTS {schema}._tidemark_checkpoint (\
           sink text PRIMARY KEY, \
           log_position bigint NOT NULL, \
           source_lsn pg_lsn NOT NULL, \
           updated_at timestamptz NOT NULL DEFAULT now(), \
           log_id bigint);\n\
         ALTER TABLE {schema}._tidemark_checkpoint ADD COLUMN IF NOT EXISTS log_id bigint"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn column(name: &str, oid: u32, type_name: &str, value_type: ValueType, pk: bool) -> Column {
        Column {
            name: name.into(),
            type_oid: oid,
            type_modifier: -1,
            type_name: type_name.into(),
            value_type,
            primary_key: pk,
            replica_identity: pk,
        }
    }

    #[test]
    fn create_table_quotes_names_and_keeps_types_and_key() {
        let relation = Relation {
            oid: 1,
            schema: "public".into(),
            table: "Order Lines".into(),
            columns: vec![
                column("Id", 23, "integer", ValueType::Int4, true),
                column("line", 23, "integer", ValueType::Int4, true),
                column("amount", 1700, "numeric(12,2)", ValueType::Numeric, false),
                column("mood", 16390, "mood", ValueType::Text, false),
                column(
                    "moods",
                    16389,
                    "mood[]",
                    ValueType::Array(Box::new(ValueType::Text)),
                    false,
                ),
            ],
        };
        let table = TargetTable {
            schema: "re\"plica".into(),
            name: "Order Lines".into(),
        };
        assert_eq!(
            create_table(&table, &relation),
            "CREATE TABLE IF NOT EXISTS \"re\"\"plica\".\"Order Lines\" (\"Id\" integer, \
             \"line\" integer, \"amount\" numeric(12,2), \"mood\" text, \"moods\" text[], \
             PRIMARY KEY (\"Id\", \"line\")) WITH (fillfactor = 90)"
        );
    }
}
