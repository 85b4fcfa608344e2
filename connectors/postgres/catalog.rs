//! What the source learns from the catalog over an ordinary tokio-postgres connection: the
//! server's prerequisites, which tables the configured patterns name, their keys, the
//! publication, the slot, and how each column type converts. Publication DDL is the only
//! write, and only when the publication is missing or lacks a configured table.

use std::collections::HashMap;

use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use super::ddl::{self, ShapeColumn, TableShape};
use super::pgoutput::RelationMessage;
use super::replication::quote_ident;
use super::SourceError;
use crate::config::{ConnectionUrl, TablePattern};
use crate::event::{Column, Position, Relation, ValueType};
use crate::pgclient::db_message;
use crate::pgtext::{builtin_value_type, value_type_from_catalog};
use crate::tls::ConnectError;

pub struct Catalog {
    client: Client,
    value_types: HashMap<u32, ValueType>,
    type_names: HashMap<(u32, i32), String>,
}

/// A replication slot as `pg_replication_slots` shows it.
#[derive(Debug, Clone)]
pub struct SlotInfo {
    pub plugin: Option<String>,
    pub database: Option<String>,
    pub confirmed_flush: Option<Position>,
    pub active_pid: Option<i32>,
}

/// A table the source captures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceTable {
    pub schema: String,
    pub table: String,
}

impl SourceTable {
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.table))
    }
}

impl std::fmt::Display for SourceTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.schema, self.table)
    }
}

impl Catalog {
    pub async fn connect(url: &ConnectionUrl) -> Result<Catalog, SourceError> {
        let (client, connection) =
            crate::tls::connect(&url.pg_config())
                .await
                .map_err(|e| match e {
                    // A certificate that fails verification, or a server without TLS under a
                    // mode that requires it, needs the operator: retrying cannot cure it.
                    ConnectError::Tls(e) => {
                        SourceError::Prerequisite(format!("cannot connect to the source: {e}"))
                    }
                    ConnectError::Postgres(e) => SourceError::connect(url, e),
                })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "catalog connection closed");
            }
        });
        // The values it reads (an incremental snapshot's rows, the value a new column holds
        // for existing rows) are converted as the stream's are.
        client
            .batch_execute(&super::replication::set_output_settings())
            .await
            .map_err(|e| SourceError::catalog("setting the session's output formats", e))?;
        Ok(Catalog {
            client,
            value_types: HashMap::new(),
            type_names: HashMap::new(),
        })
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub async fn wal_level(&self) -> Result<String, SourceError> {
        let row = self
            .client
            .query_one("SELECT current_setting('wal_level')", &[])
            .await
            .map_err(|e| SourceError::catalog("reading wal_level", e))?;
        Ok(row.get(0))
    }

    /// The server's version as a number (150004 for 15.4).
    pub async fn server_version_num(&self) -> Result<i32, SourceError> {
        let row = self
            .client
            .query_one("SELECT current_setting('server_version_num')::int", &[])
            .await
            .map_err(|e| SourceError::catalog("reading server_version_num", e))?;
        Ok(row.get(0))
    }

    /// Whether the connected role may open a replication connection.
    pub async fn can_replicate(&self) -> Result<(String, bool), SourceError> {
        let row = self
            .client
            .query_one(
                "SELECT current_user::text, rolreplication OR rolsuper \
                 FROM pg_roles WHERE rolname = current_user",
                &[],
            )
            .await
            .map_err(|e| SourceError::catalog("reading the role's REPLICATION attribute", e))?;
        Ok((row.get(0), row.get(1)))
    }

    /// The tables the patterns name, in a stable order. A pattern naming one table that does
    /// not exist is an error; a schema glob may match none.
    pub async fn resolve_tables(
        &self,
        patterns: &[TablePattern],
    ) -> Result<Vec<SourceTable>, SourceError> {
        let rows = self
            .client
            .query(
                "SELECT n.nspname::text, c.relname::text FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition \
                   AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
                 ORDER BY 1, 2",
                &[],
            )
            .await
            .map_err(|e| SourceError::catalog("listing tables", e))?;
        let all: Vec<SourceTable> = rows
            .iter()
            .map(|r| SourceTable {
                schema: r.get(0),
                table: r.get(1),
            })
            .collect();
        let mut missing = Vec::new();
        for pattern in patterns {
            if pattern.table.is_some() && !all.iter().any(|t| pattern.matches(&t.schema, &t.table))
            {
                missing.push(pattern.to_string());
            }
        }
        if !missing.is_empty() {
            return Err(SourceError::Prerequisite(format!(
                "source.tables names tables that do not exist: {}; create them or fix \
                 source.tables",
                missing.join(", ")
            )));
        }
        Ok(all
            .into_iter()
            .filter(|t| patterns.iter().any(|p| p.matches(&t.schema, &t.table)))
            .collect())
    }

    /// Refuses tables whose updates and deletes PostgreSQL cannot publish with a key.
    pub async fn check_replica_identity(&self, tables: &[SourceTable]) -> Result<(), SourceError> {
        let mut refused = Vec::new();
        for table in tables {
            let row = self
                .client
                .query_one(
                    "SELECT c.relreplident::text, \
                       EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary), \
                       EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident) \
                     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE n.nspname = $1 AND c.relname = $2",
                    &[&table.schema, &table.table],
                )
                .await
                .map_err(|e| SourceError::catalog("reading replica identity", e))?;
            let identity: String = row.get(0);
            let has_pk: bool = row.get(1);
            let has_identity_index: bool = row.get(2);
            let ok = match identity.as_str() {
                "d" => has_pk,
                "i" => has_identity_index,
                "f" => true,
                _ => false,
            };
            if !ok {
                refused.push(table.clone());
            }
        }
        if refused.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = refused.iter().map(ToString::to_string).collect();
        let fixes: Vec<String> = refused
            .iter()
            .map(|t| format!("ALTER TABLE {} ADD PRIMARY KEY (…)", t.quoted()))
            .collect();
        Err(SourceError::Prerequisite(format!(
            "table(s) without a primary key or replica identity: {}; PostgreSQL cannot publish \
             their updates and deletes. Add a primary key ({}) or, where none fits, \
             ALTER TABLE … REPLICA IDENTITY FULL (supported too), or remove them from \
             source.tables",
            names.join(", "),
            fixes.join("; ")
        )))
    }

    /// Refuses tables without a primary key: a table sink upserts by it. (REPLICA IDENTITY
    /// FULL lets PostgreSQL publish such a table, which an append sink can take.)
    pub async fn check_primary_keys(&self, tables: &[SourceTable]) -> Result<(), SourceError> {
        let mut missing = Vec::new();
        for table in tables {
            let row = self
                .client
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid \
                       JOIN pg_namespace n ON n.oid = c.relnamespace \
                       WHERE n.nspname = $1 AND c.relname = $2 AND i.indisprimary)",
                    &[&table.schema, &table.table],
                )
                .await
                .map_err(|e| SourceError::catalog("reading primary keys", e))?;
            if !row.get::<_, bool>(0) {
                missing.push(table.to_string());
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        Err(SourceError::Prerequisite(format!(
            "table(s) without a primary key: {}; a postgres sink mirrors a table by its primary \
             key: add one (ALTER TABLE … ADD PRIMARY KEY (…)), or capture these tables into a \
             jsonl sink only (REPLICA IDENTITY FULL is enough there)",
            missing.join(", ")
        )))
    }

    /// Creates the publication for `tables`, or adds the tables it lacks.
    pub async fn ensure_publication(
        &self,
        publication: &str,
        tables: &[SourceTable],
    ) -> Result<(), SourceError> {
        let exists = self
            .client
            .query_opt(
                "SELECT 1 FROM pg_publication WHERE pubname = $1",
                &[&publication],
            )
            .await
            .map_err(|e| SourceError::catalog("reading pg_publication", e))?
            .is_some();
        let missing: Vec<&SourceTable> = if exists {
            let rows = self
                .client
                .query(
                    "SELECT schemaname::text, tablename::text FROM pg_publication_tables \
                     WHERE pubname = $1",
                    &[&publication],
                )
                .await
                .map_err(|e| SourceError::catalog("reading pg_publication_tables", e))?;
            let published: Vec<(String, String)> =
                rows.iter().map(|r| (r.get(0), r.get(1))).collect();
            tables
                .iter()
                .filter(|t| !published.contains(&(t.schema.clone(), t.table.clone())))
                .collect()
        } else {
            tables.iter().collect()
        };
        if exists && missing.is_empty() {
            return Ok(());
        }
        let list = missing
            .iter()
            .map(|t| t.quoted())
            .collect::<Vec<_>>()
            .join(", ");
        let sql = match (exists, list.is_empty()) {
            (false, true) => format!("CREATE PUBLICATION {}", quote_ident(publication)),
            (false, false) => format!(
                "CREATE PUBLICATION {} FOR TABLE {list}",
                quote_ident(publication)
            ),
            (true, _) => format!(
                "ALTER PUBLICATION {} ADD TABLE {list}",
                quote_ident(publication)
            ),
        };
        self.client.batch_execute(&sql).await.map_err(|e| {
            SourceError::Prerequisite(format!(
                "cannot create or extend publication {publication:?} ({}); run as the tables' \
                 owner or a superuser: {sql}",
                db_message(&e)
            ))
        })?;
        tracing::info!(publication, tables = %list, "publication updated");
        Ok(())
    }

    pub async fn slot(&self, slot: &str) -> Result<Option<SlotInfo>, SourceError> {
        let row = self
            .client
            .query_opt(
                "SELECT plugin::text, database::text, confirmed_flush_lsn::text, active_pid \
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(|e| SourceError::catalog("reading pg_replication_slots", e))?;
        Ok(row.map(|r| SlotInfo {
            plugin: r.get(0),
            database: r.get(1),
            confirmed_flush: r.get::<_, Option<String>>(2).and_then(|l| l.parse().ok()),
            active_pid: r.get(3),
        }))
    }

    /// Turns a Relation message into the relation the log stores: column types resolved,
    /// primary key from the catalog.
    pub async fn describe(&mut self, message: &RelationMessage) -> Result<Relation, SourceError> {
        let pk_rows = self
            .client
            .query(
                "SELECT a.attname::text FROM pg_index i \
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
                 WHERE i.indrelid = $1 AND i.indisprimary",
                &[&message.relation_id],
            )
            .await
            .map_err(|e| SourceError::catalog("reading the primary key", e))?;
        let primary_key: Vec<String> = pk_rows.iter().map(|r| r.get(0)).collect();
        let mut columns = Vec::with_capacity(message.columns.len());
        for column in &message.columns {
            columns.push(
                self.column(
                    &column.name,
                    column.type_oid,
                    column.type_modifier,
                    primary_key.contains(&column.name),
                    column.is_key(),
                )
                .await?,
            );
        }
        Ok(Relation {
            oid: message.relation_id,
            schema: message.namespace.clone(),
            table: message.name.clone(),
            columns,
        })
    }

    /// The relation a schema change leaves: `shape`'s columns, described as the stream's
    /// Relation message will describe them.
    pub async fn describe_shape(&mut self, shape: &TableShape) -> Result<Relation, SourceError> {
        Ok(Relation {
            oid: shape.oid,
            schema: shape.schema.clone(),
            table: shape.table.clone(),
            columns: self.shape_columns(&shape.columns).await?,
        })
    }

    /// `columns` as the change model describes them.
    pub async fn shape_columns(
        &mut self,
        columns: &[ShapeColumn],
    ) -> Result<Vec<Column>, SourceError> {
        let mut described = Vec::with_capacity(columns.len());
        for c in columns {
            described.push(
                self.column(
                    &c.name,
                    c.type_oid,
                    c.typmod,
                    c.primary_key,
                    c.replica_identity,
                )
                .await?,
            );
        }
        Ok(described)
    }

    async fn column(
        &mut self,
        name: &str,
        type_oid: u32,
        type_modifier: i32,
        primary_key: bool,
        replica_identity: bool,
    ) -> Result<Column, SourceError> {
        Ok(Column {
            name: name.to_string(),
            type_oid,
            type_modifier,
            type_name: self.type_name(type_oid, type_modifier).await?,
            value_type: self.value_type(type_oid).await?,
            primary_key,
            replica_identity,
        })
    }

    /// The table's columns as the catalog holds them now (None: no such ordinary table).
    pub async fn table_shape(&self, oid: u32) -> Result<Option<TableShape>, SourceError> {
        let row = self
            .client
            .query_opt(&ddl::shape_query("$1::oid"), &[&oid])
            .await
            .map_err(|e| SourceError::catalog("reading a table's columns", e))?;
        parse_shape(row.map(|r| r.get(0)))
    }

    /// [`Catalog::table_shape`] of a table by name.
    pub async fn table_shape_of(
        &self,
        table: &SourceTable,
    ) -> Result<Option<TableShape>, SourceError> {
        let row = self
            .client
            .query_opt(&ddl::shape_query("$1::text::regclass"), &[&table.quoted()])
            .await
            .map_err(|e| SourceError::catalog("reading a table's columns", e))?;
        parse_shape(row.map(|r| r.get(0)))
    }

    /// Whether the schema-change trigger is installed, enabled and current.
    pub async fn ddl_trigger_installed(&self) -> Result<bool, SourceError> {
        let row = self
            .client
            .query_one(&ddl::installed_query(), &[&ddl::trigger_function_source()])
            .await
            .map_err(|e| SourceError::catalog("looking for the schema-change trigger", e))?;
        Ok(row.get(0))
    }

    /// Installs the schema-change trigger, or brings its function up to date. Returns false,
    /// changing nothing, when the role may not (creating an event trigger needs a superuser).
    pub async fn install_ddl_trigger(&self) -> Result<bool, SourceError> {
        if self.ddl_trigger_installed().await? {
            return Ok(true);
        }
        match self.client.batch_execute(&ddl::install_statements()).await {
            Ok(()) => Ok(true),
            Err(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => Ok(false),
            Err(e) => Err(SourceError::catalog(
                "installing the schema-change trigger",
                e,
            )),
        }
    }

    /// The relation the log stores for `table` as the catalog describes it now, for rows a
    /// snapshot reads: the columns pgoutput sends (not dropped, not generated), in order.
    pub async fn describe_table(&mut self, table: &SourceTable) -> Result<Relation, SourceError> {
        let shape = self.table_shape_of(table).await?.ok_or_else(|| {
            SourceError::Prerequisite(format!(
                "{table} is not a table (nor a partitioned table): only tables can be captured"
            ))
        })?;
        self.describe_shape(&shape).await
    }

    /// The table's size: its heap blocks now, and its rows as the planner last estimated them
    /// (0 before the table was analyzed).
    pub async fn estimate(&self, table: &SourceTable) -> Result<(u32, u64), SourceError> {
        let row = self
            .client
            .query_one(
                "SELECT pg_relation_size(oid) / current_setting('block_size')::int8, \
                   greatest(reltuples, 0)::int8 FROM pg_class WHERE oid = $1::text::regclass",
                &[&table.quoted()],
            )
            .await
            .map_err(|e| SourceError::catalog("estimating the size of a captured table", e))?;
        let (pages, rows): (i64, i64) = (row.get(0), row.get(1));
        Ok((
            u32::try_from(pages).unwrap_or(0),
            u64::try_from(rows).unwrap_or(0),
        ))
    }

    /// Whether the server has room for the agent's replication connection and, when `slot`
    /// does not exist yet, for one more slot; the error names the setting to raise.
    pub async fn check_replication_headroom(&self, slot: &str) -> Result<String, SourceError> {
        let row = self
            .client
            .query_one(
                "SELECT current_setting('max_replication_slots')::int8, \
                   (SELECT count(*) FROM pg_replication_slots), \
                   EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1), \
                   current_setting('max_wal_senders')::int8, \
                   (SELECT count(*) FROM pg_stat_replication)",
                &[&slot],
            )
            .await
            .map_err(|e| SourceError::catalog("reading the replication settings", e))?;
        let (max_slots, slots, exists, max_senders, senders): (i64, i64, bool, i64, i64) =
            (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
        if !exists && slots >= max_slots {
            return Err(SourceError::Prerequisite(format!(
                "every replication slot is taken ({slots} of max_replication_slots = \
                 {max_slots}) and slot {slot:?} does not exist yet: run ALTER SYSTEM SET \
                 max_replication_slots = {}; and restart PostgreSQL, or drop an unused slot",
                max_slots + 1
            )));
        }
        if senders >= max_senders {
            return Err(SourceError::Prerequisite(format!(
                "every WAL sender is busy ({senders} of max_wal_senders = {max_senders}): run \
                 ALTER SYSTEM SET max_wal_senders = {}; and restart PostgreSQL",
                max_senders + 1
            )));
        }
        Ok(format!(
            "{slots} of {max_slots} replication slots used{}, {senders} of {max_senders} WAL \
             senders busy",
            if exists { " (ours among them)" } else { "" }
        ))
    }

    /// Whether the role may read every table (the snapshot reads them with COPY).
    pub async fn check_select(&self, tables: &[SourceTable]) -> Result<(), SourceError> {
        let mut refused = Vec::new();
        for table in tables {
            let row = self
                .client
                .query_one(
                    "SELECT has_table_privilege($1::text::regclass, 'SELECT'), current_user::text",
                    &[&table.quoted()],
                )
                .await
                .map_err(|e| SourceError::catalog("reading table privileges", e))?;
            if !row.get::<_, bool>(0) {
                refused.push((table.quoted(), row.get::<_, String>(1)));
            }
        }
        match refused.first() {
            None => Ok(()),
            Some((_, user)) => Err(SourceError::Prerequisite(format!(
                "role {user:?} may not read {}: GRANT SELECT ON {} TO {};",
                refused
                    .iter()
                    .map(|(t, _)| t.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                refused
                    .iter()
                    .map(|(t, _)| t.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                quote_ident(user)
            ))),
        }
    }

    /// Whether the publication holds every table, or the agent can create or extend it.
    pub async fn check_publication(
        &self,
        publication: &str,
        tables: &[SourceTable],
    ) -> Result<String, SourceError> {
        let row = self
            .client
            .query_opt(
                "SELECT pg_has_role(pubowner, 'USAGE') OR (SELECT rolsuper FROM pg_roles \
                   WHERE rolname = current_user), \
                   array(SELECT schemaname || '.' || tablename FROM pg_publication_tables t \
                         WHERE t.pubname = p.pubname)::text[] \
                 FROM pg_publication p WHERE pubname = $1",
                &[&publication],
            )
            .await
            .map_err(|e| SourceError::catalog("reading pg_publication", e))?;
        let Some(row) = row else {
            return Ok(format!(
                "publication {publication:?} does not exist yet; `run` creates it for the tables"
            ));
        };
        let (owned, published): (bool, Vec<String>) = (row.get(0), row.get(1));
        let missing: Vec<String> = tables
            .iter()
            .filter(|t| !published.contains(&t.to_string()))
            .map(SourceTable::quoted)
            .collect();
        match (missing.is_empty(), owned) {
            (true, _) => Ok(format!("publication {publication:?} holds every table")),
            (false, true) => Ok(format!(
                "publication {publication:?} lacks {}; `run` adds them",
                missing.join(", ")
            )),
            (false, false) => Err(SourceError::Prerequisite(format!(
                "publication {publication:?} lacks {} and this role does not own it: run \
                 ALTER PUBLICATION {} ADD TABLE {}; as its owner",
                missing.join(", "),
                quote_ident(publication),
                missing.join(", ")
            ))),
        }
    }

    /// WAL the slot keeps on the server; None when the slot does not exist.
    pub async fn slot_retained_bytes(&self, slot: &str) -> Result<Option<i64>, SourceError> {
        let row = self
            .client
            .query_opt(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::int8 \
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(|e| SourceError::catalog("reading the slot's retained WAL", e))?;
        Ok(row.and_then(|r| r.get(0)))
    }

    /// The server's clock now, in Unix microseconds.
    pub async fn now_micros(&self) -> Result<i64, SourceError> {
        let row = self
            .client
            .query_one(
                "SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::int8",
                &[],
            )
            .await
            .map_err(|e| SourceError::catalog("reading the server's clock", e))?;
        Ok(row.get(0))
    }

    /// Drops the slot (which must not be in use).
    pub async fn drop_slot(&self, slot: &str) -> Result<(), SourceError> {
        self.client
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await
            .map_err(|e| SourceError::catalog("dropping the replication slot", e))?;
        Ok(())
    }

    async fn type_name(&mut self, oid: u32, modifier: i32) -> Result<String, SourceError> {
        if let Some(name) = self.type_names.get(&(oid, modifier)) {
            return Ok(name.clone());
        }
        let row = self
            .client
            .query_one("SELECT format_type($1, $2)", &[&oid, &modifier])
            .await
            .map_err(|e| SourceError::catalog("reading a column type", e))?;
        let name: String = row.get(0);
        self.type_names.insert((oid, modifier), name.clone());
        Ok(name)
    }

    /// How values of type `oid` convert: built in, or resolved from pg_type (domains to their
    /// base type, arrays to their element type, enums to text).
    async fn value_type(&mut self, oid: u32) -> Result<ValueType, SourceError> {
        if let Some(t) = builtin_value_type(oid) {
            return Ok(t);
        }
        if let Some(t) = self.value_types.get(&oid) {
            return Ok(t.clone());
        }
        let mut pending = vec![oid];
        // Resolve depth-first without recursion: domains over arrays of domains are legal.
        while let Some(&current) = pending.last() {
            let row = self
                .client
                .query_opt(
                    "SELECT typtype::text, typcategory::text, typelem, typbasetype \
                     FROM pg_type WHERE oid = $1",
                    &[&current],
                )
                .await
                .map_err(|e| SourceError::catalog("reading pg_type", e))?;
            let Some(row) = row else {
                self.value_types.insert(current, ValueType::Other);
                pending.pop();
                continue;
            };
            let typtype: String = row.get(0);
            let category: String = row.get(1);
            let elem: u32 = row.get(2);
            let base: u32 = row.get(3);
            let known = |o: u32, cache: &HashMap<u32, ValueType>| {
                builtin_value_type(o).or_else(|| cache.get(&o).cloned())
            };
            let dependency = [elem, base]
                .into_iter()
                .find(|&o| o != 0 && o != current && known(o, &self.value_types).is_none());
            if let Some(dep) = dependency {
                if pending.contains(&dep) {
                    self.value_types.insert(dep, ValueType::Other);
                } else {
                    pending.push(dep);
                }
                continue;
            }
            let resolved = value_type_from_catalog(
                typtype.chars().next().unwrap_or('b'),
                category.chars().next().unwrap_or('U'),
                (elem != 0)
                    .then(|| known(elem, &self.value_types))
                    .flatten(),
                (base != 0)
                    .then(|| known(base, &self.value_types))
                    .flatten(),
            );
            self.value_types.insert(current, resolved);
            pending.pop();
        }
        Ok(self
            .value_types
            .get(&oid)
            .cloned()
            .unwrap_or(ValueType::Other))
    }
}

fn parse_shape(json: Option<Option<String>>) -> Result<Option<TableShape>, SourceError> {
    let Some(json) = json.flatten() else {
        return Ok(None);
    };
    serde_json::from_str(&json).map(Some).map_err(|e| {
        SourceError::SchemaChange(format!(
            "the catalog described a table's columns as {json:?}: {e}"
        ))
    })
}
