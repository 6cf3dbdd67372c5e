//! What `install` and `uninstall` run: [`PgInstaller`] reads the catalogs and Epidemic's
//! registry, validates every watched table and column, and produces the DDL.
//!
//! Everything Epidemic creates lives in one schema (default `epidemic`):
//!
//! - `change_id`: ONE sequence for every log table, so change ids order a batch across
//!   tables. It keeps the default `CACHE 1`: with a per-session cache a later change to a
//!   row could get a smaller id than an earlier one, breaking per-row order in a batch.
//! - `log_<table>` (or `log_<schema>.<table>` outside `public`): one log table per watched
//!   table with `id`, `op` (`I`/`U`/`D`), `txid` (the writer's `pg_current_xact_id()`,
//!   indexed: batches are found by transaction snapshot), `changed_at`, and typed
//!   `old_<column>`/`new_<column>` pairs.
//! - `capture_<table>()`: the PL/pgSQL trigger function, `SECURITY DEFINER` so that the
//!   people who write to the table need no rights on this schema, with a fixed
//!   `search_path` so that it cannot be hijacked by the writer's.
//! - `watched_table`, `watched_column`: the registry of what is captured and under which
//!   log names (for `uninstall`, for readers, for drift checks).
//! - `consumer`: one durable cursor per (daemon, handler).
//!
//! On the user's table there is one trigger, `<schema>_capture`, `AFTER INSERT OR UPDATE
//! OR DELETE ... FOR EACH ROW`. Nothing else outside the schema is touched.
//!
//! Install only grows the captured column set (the union of what every daemon's handlers
//! asked for, so one daemon cannot take columns away from another). The trigger is
//! (re)created only when it is missing or not ours, because `CREATE TRIGGER` takes a lock
//! that blocks writers; the function is replaced in place, which needs no such lock.
//!
//! Not here: reading (see [`crate::reader`]); noticing a dropped or renamed column at
//! run time (install reports it).

use std::collections::{BTreeMap, HashMap, HashSet};

use epidemic_plugin_sdk::Watch;
use postgres::GenericClient;

use crate::error::PgError;
use crate::ident::{quote_literal, Ident, TableName, MAX_IDENT_BYTES};

/// Longest `key` in `capture_<key>`, `log_<key>`, `txid_<key>`, `pkey_<key>`: the longest
/// prefix is `capture_` (8 bytes).
const MAX_KEY_BYTES: usize = MAX_IDENT_BYTES - "capture_".len();

/// Type OIDs whose `=` operator lives in `pg_catalog` are compared with `IS DISTINCT
/// FROM` directly; see [`UserColumn::has_catalog_eq`].
const CATALOG_EQ_SQL: &str = "EXISTS (SELECT 1 FROM pg_catalog.pg_operator o \
     WHERE o.oprname = '=' AND o.oprleft = a.atttypid AND o.oprright = a.atttypid \
       AND o.oprnamespace = 'pg_catalog'::regnamespace)";

/// One column of a watched table, as the catalog describes it now.
#[derive(Debug, Clone)]
struct UserColumn {
    attnum: i16,
    /// The type for the log table's columns: `format_type` without the type modifier,
    /// so that widening the user's column (`varchar(64)` to `varchar(128)`) cannot make
    /// the trigger fail and with it the user's write.
    type_sql: String,
    /// Whether `IS DISTINCT FROM` can use a `pg_catalog` operator. The trigger function
    /// runs with `search_path = pg_catalog, pg_temp`; for other types (extension types,
    /// enums, domains, arrays, `json`) it compares the text forms, which is never wrong,
    /// at worst reports an update whose text changed but whose value compares equal.
    has_catalog_eq: bool,
}

/// A watched table as the catalog describes it now.
#[derive(Debug, Clone)]
struct UserTable {
    oid: u32,
    columns: HashMap<String, UserColumn>,
}

/// A watched column as the registry records it.
#[derive(Debug, Clone)]
pub(crate) struct RegisteredColumn {
    pub name: Ident,
    pub column_type: String,
    pub old_column: Ident,
    pub new_column: Ident,
}

/// A watched table as the registry records it.
#[derive(Debug, Clone)]
pub(crate) struct RegisteredTable {
    pub log_table: Ident,
    pub capture_function: Ident,
    pub trigger_name: Ident,
    /// In capture order.
    pub columns: Vec<RegisteredColumn>,
}

/// Produces install and uninstall DDL for one Epidemic schema.
pub(crate) struct PgInstaller<'a> {
    pub schema: &'a Ident,
    pub notify: bool,
}

/// Whether the schema exists, and whether it is ours.
pub(crate) fn schema_state(
    client: &mut impl GenericClient,
    schema: &Ident,
) -> Result<SchemaState, PgError> {
    let row = client
        .query_opt(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_class c \
                 WHERE c.relnamespace = n.oid AND c.relname = 'watched_table' AND c.relkind = 'r') \
             FROM pg_catalog.pg_namespace n WHERE n.nspname = $1",
            &[&schema.as_str()],
        )
        .map_err(PgError::sql(format!("inspect schema {schema}")))?;
    Ok(match row {
        None => SchemaState::Missing,
        Some(r) if r.get::<_, bool>(0) => SchemaState::Ours,
        Some(_) => SchemaState::Foreign,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SchemaState {
    Missing,
    Ours,
    Foreign,
}

/// The registry: every watched table and its columns. Call only when the schema is ours.
pub(crate) fn load_registry(
    client: &mut impl GenericClient,
    schema: &Ident,
) -> Result<BTreeMap<TableName, RegisteredTable>, PgError> {
    let s = schema.quoted();
    let rows = client
        .query(
            &format!(
                "SELECT t.table_schema, t.table_name, t.log_table, t.capture_function, t.trigger_name, \
                        c.column_name, c.column_type, c.old_column, c.new_column \
                 FROM {s}.watched_table t \
                 LEFT JOIN {s}.watched_column c \
                   ON c.table_schema = t.table_schema AND c.table_name = t.table_name \
                 ORDER BY t.table_schema, t.table_name, c.position"
            ),
            &[],
        )
        .map_err(PgError::sql("read the registry of watched tables"))?;
    let mut registry: BTreeMap<TableName, RegisteredTable> = BTreeMap::new();
    for r in rows {
        // Registry values were validated when they were written; keep them as they are.
        let name = TableName {
            schema: Ident::internal(r.get(0)),
            table: Ident::internal(r.get(1)),
        };
        let entry = registry.entry(name).or_insert_with(|| RegisteredTable {
            log_table: Ident::internal(r.get(2)),
            capture_function: Ident::internal(r.get(3)),
            trigger_name: Ident::internal(r.get(4)),
            columns: Vec::new(),
        });
        if let Some(column) = r.get::<_, Option<String>>(5) {
            entry.columns.push(RegisteredColumn {
                name: Ident::internal(column),
                column_type: r.get(6),
                old_column: Ident::internal(r.get(7)),
                new_column: Ident::internal(r.get(8)),
            });
        }
    }
    Ok(registry)
}

/// `requested` merged per table: columns in the order first asked for, without repeats.
fn merge_watches(watches: &[Watch]) -> Result<BTreeMap<TableName, Vec<Ident>>, PgError> {
    let mut merged: BTreeMap<TableName, Vec<Ident>> = BTreeMap::new();
    for w in watches {
        let table = TableName::parse(&w.table)?;
        let columns = merged.entry(table).or_default();
        for c in &w.columns {
            let c = Ident::parse("column", c)?;
            if !columns.contains(&c) {
                columns.push(c);
            }
        }
    }
    for (table, columns) in &merged {
        if columns.is_empty() {
            return Err(PgError::NoColumns(table.to_string()));
        }
    }
    Ok(merged)
}

fn inspect_table(client: &mut impl GenericClient, name: &TableName) -> Result<UserTable, PgError> {
    let row = client
        .query_opt(
            "SELECT c.oid, c.relkind::text FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2",
            &[&name.schema.as_str(), &name.table.as_str()],
        )
        .map_err(PgError::sql(format!("inspect table {name}")))?
        .ok_or_else(|| PgError::MissingTable(name.to_string()))?;
    let oid: u32 = row.get(0);
    let kind: String = row.get(1);
    // Ordinary and partitioned tables; row triggers on a partitioned table (PostgreSQL
    // 13+) are cloned onto every partition.
    if kind != "r" && kind != "p" {
        return Err(PgError::NotATable(name.to_string()));
    }
    let rows = client
        .query(
            &format!(
                "SELECT a.attname::text, a.attnum, \
                        CASE a.atttypid \
                            WHEN 'pg_catalog.bpchar'::regtype THEN 'pg_catalog.bpchar' \
                            WHEN 'pg_catalog.bit'::regtype THEN 'pg_catalog.varbit' \
                            ELSE pg_catalog.format_type(a.atttypid, NULL) END, \
                        {CATALOG_EQ_SQL} \
                 FROM pg_catalog.pg_attribute a \
                 WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped"
            ),
            &[&oid],
        )
        .map_err(PgError::sql(format!("inspect columns of {name}")))?;
    // `character` and `bit` without a modifier mean length 1, so they are widened to
    // their unbounded forms above rather than copied from format_type.
    let columns = rows
        .into_iter()
        .map(|r| {
            (
                r.get::<_, String>(0),
                UserColumn {
                    attnum: r.get(1),
                    type_sql: r.get(2),
                    has_catalog_eq: r.get(3),
                },
            )
        })
        .collect();
    Ok(UserTable { oid, columns })
}

/// `log_<key>` etc.: `table` in `public`, `schema.table` elsewhere (a dot cannot occur in
/// a validated name, so keys never collide), or `#<oid>` when that would be too long.
fn table_key(name: &TableName, oid: u32) -> String {
    let key = name.to_string();
    if key.len() <= MAX_KEY_BYTES {
        key
    } else {
        format!("#{oid}")
    }
}

/// `old_<column>`, or `old_#<attnum>` when too long (`#` cannot occur in a column name).
fn log_column(prefix: &str, column: &Ident, attnum: i16) -> Ident {
    let name = format!("{prefix}{column}");
    if name.len() <= MAX_IDENT_BYTES {
        Ident::internal(name)
    } else {
        Ident::internal(format!("{prefix}#{attnum}"))
    }
}

impl PgInstaller<'_> {
    fn q(&self, name: &str) -> String {
        format!(
            "{}.{}",
            self.schema.quoted(),
            crate::ident::quote_ident(name)
        )
    }

    /// The statements that bring the installation up to date for `watches`. Validates
    /// everything first: an invalid watch yields an error and no statement at all.
    pub fn plan_install(
        &self,
        client: &mut impl GenericClient,
        watches: &[Watch],
    ) -> Result<Vec<String>, PgError> {
        let requested = merge_watches(watches)?;
        let state = schema_state(client, self.schema)?;
        if state == SchemaState::Foreign {
            return Err(PgError::ForeignSchema(self.schema.to_string()));
        }
        let registry = if state == SchemaState::Ours {
            load_registry(client, self.schema)?
        } else {
            BTreeMap::new()
        };

        // Validate every table and column before producing anything.
        let mut inspected = Vec::with_capacity(requested.len());
        for (name, columns) in &requested {
            let table = inspect_table(client, name)?;
            for c in columns {
                if !table.columns.contains_key(c.as_str()) {
                    return Err(PgError::MissingColumn {
                        table: name.to_string(),
                        column: c.to_string(),
                    });
                }
            }
            if let Some(reg) = registry.get(name) {
                for c in &reg.columns {
                    if !table.columns.contains_key(c.name.as_str()) {
                        return Err(PgError::WatchedColumnGone {
                            table: name.to_string(),
                            column: c.name.to_string(),
                        });
                    }
                }
            }
            inspected.push((name, columns, table));
        }

        let mut plan = self.bookkeeping_ddl();
        let mut taken_logs: HashSet<String> =
            registry.values().map(|r| r.log_table.to_string()).collect();
        for (name, columns, table) in inspected {
            let existing = registry.get(name);
            let (key_tables, is_new) = match existing {
                Some(reg) => (
                    (
                        reg.log_table.clone(),
                        reg.capture_function.clone(),
                        reg.trigger_name.clone(),
                    ),
                    false,
                ),
                None => {
                    let mut key = table_key(name, table.oid);
                    if taken_logs.contains(&format!("log_{key}")) {
                        key = format!("#{}", table.oid);
                    }
                    taken_logs.insert(format!("log_{key}"));
                    (
                        (
                            Ident::internal(format!("log_{key}")),
                            Ident::internal(format!("capture_{key}")),
                            Ident::internal(format!("{}_capture", self.schema)),
                        ),
                        true,
                    )
                }
            };
            let (log_table, function, trigger) = key_tables;
            let key = &log_table.as_str()["log_".len()..];

            // The captured set: what is registered, then what is newly asked for.
            let mut all: Vec<RegisteredColumn> =
                existing.map(|r| r.columns.clone()).unwrap_or_default();
            let mut added: Vec<RegisteredColumn> = Vec::new();
            let mut retyped: Vec<RegisteredColumn> = Vec::new();
            for reg in &mut all {
                let now = &table.columns[reg.name.as_str()];
                if now.type_sql != reg.column_type {
                    reg.column_type = now.type_sql.clone();
                    retyped.push(reg.clone());
                }
            }
            for c in columns {
                if all.iter().any(|r| &r.name == c) {
                    continue;
                }
                let attnum = table.columns[c.as_str()].attnum;
                let column = RegisteredColumn {
                    name: c.clone(),
                    column_type: table.columns[c.as_str()].type_sql.clone(),
                    old_column: log_column("old_", c, attnum),
                    new_column: log_column("new_", c, attnum),
                };
                all.push(column.clone());
                added.push(column);
            }

            let log = self.q(log_table.as_str());
            if is_new {
                let mut cols = String::new();
                for c in &all {
                    cols.push_str(&format!(
                        ",\n    {} {},\n    {} {}",
                        c.old_column.quoted(),
                        c.column_type,
                        c.new_column.quoted(),
                        c.column_type
                    ));
                }
                plan.push(format!(
                    "CREATE TABLE IF NOT EXISTS {log} (\n    \
                         id bigint NOT NULL DEFAULT nextval({seq}),\n    \
                         op \"char\" NOT NULL,\n    \
                         txid xid8 NOT NULL DEFAULT pg_current_xact_id(),\n    \
                         changed_at timestamptz NOT NULL DEFAULT clock_timestamp(){cols},\n    \
                         CONSTRAINT {pkey} PRIMARY KEY (id)\n)",
                    seq = quote_literal(&self.q("change_id")),
                    pkey = crate::ident::quote_ident(&format!("pkey_{key}")),
                ));
                plan.push(format!(
                    "CREATE INDEX IF NOT EXISTS {} ON {log} (txid)",
                    crate::ident::quote_ident(&format!("txid_{key}"))
                ));
                plan.push(format!(
                    "INSERT INTO {} (table_schema, table_name, log_table, capture_function, trigger_name) \
                     VALUES ({}, {}, {}, {}, {}) ON CONFLICT DO NOTHING",
                    self.q("watched_table"),
                    quote_literal(name.schema.as_str()),
                    quote_literal(name.table.as_str()),
                    quote_literal(log_table.as_str()),
                    quote_literal(function.as_str()),
                    quote_literal(trigger.as_str()),
                ));
            } else if !added.is_empty() {
                let adds: Vec<String> = added
                    .iter()
                    .flat_map(|c| {
                        [
                            format!(
                                "ADD COLUMN IF NOT EXISTS {} {}",
                                c.old_column.quoted(),
                                c.column_type
                            ),
                            format!(
                                "ADD COLUMN IF NOT EXISTS {} {}",
                                c.new_column.quoted(),
                                c.column_type
                            ),
                        ]
                    })
                    .collect();
                plan.push(format!("ALTER TABLE {log} {}", adds.join(", ")));
            }
            if !retyped.is_empty() {
                let alters: Vec<String> = retyped
                    .iter()
                    .flat_map(|c| {
                        [&c.old_column, &c.new_column].map(|col| {
                            format!(
                                "ALTER COLUMN {col} TYPE {t} USING {col}::text::{t}",
                                col = col.quoted(),
                                t = c.column_type
                            )
                        })
                    })
                    .collect();
                plan.push(format!("ALTER TABLE {log} {}", alters.join(", ")));
                for c in &retyped {
                    plan.push(format!(
                        "UPDATE {} SET column_type = {} WHERE table_schema = {} AND table_name = {} AND column_name = {}",
                        self.q("watched_column"),
                        quote_literal(&c.column_type),
                        quote_literal(name.schema.as_str()),
                        quote_literal(name.table.as_str()),
                        quote_literal(c.name.as_str()),
                    ));
                }
            }
            if !added.is_empty() {
                let first_position = all.len() - added.len();
                let values: Vec<String> = added
                    .iter()
                    .enumerate()
                    .map(|(i, c)| {
                        format!(
                            "({}, {}, {}, {}, {}, {}, {})",
                            quote_literal(name.schema.as_str()),
                            quote_literal(name.table.as_str()),
                            quote_literal(c.name.as_str()),
                            first_position + i,
                            quote_literal(&c.column_type),
                            quote_literal(c.old_column.as_str()),
                            quote_literal(c.new_column.as_str()),
                        )
                    })
                    .collect();
                plan.push(format!(
                    "INSERT INTO {} (table_schema, table_name, column_name, position, column_type, old_column, new_column) \
                     VALUES {} ON CONFLICT DO NOTHING",
                    self.q("watched_column"),
                    values.join(", ")
                ));
            }

            plan.push(self.capture_function(&function, &log, &all, &table));
            if is_new
                || !trigger_is_ours(client, table.oid, &trigger, self.schema, &function, name)?
            {
                plan.push(format!(
                    "DROP TRIGGER IF EXISTS {} ON {}",
                    trigger.quoted(),
                    name.quoted()
                ));
                plan.push(format!(
                    "CREATE TRIGGER {} AFTER INSERT OR UPDATE OR DELETE ON {} FOR EACH ROW EXECUTE FUNCTION {}()",
                    trigger.quoted(),
                    name.quoted(),
                    self.q(function.as_str())
                ));
            }
        }
        Ok(plan)
    }

    /// The schema, the shared sequence, the registry and the consumer table. Idempotent
    /// and cheap (no lock on any user table), so always part of the plan.
    fn bookkeeping_ddl(&self) -> Vec<String> {
        vec![
            format!("CREATE SCHEMA IF NOT EXISTS {}", self.schema.quoted()),
            format!(
                "CREATE SEQUENCE IF NOT EXISTS {} AS bigint",
                self.q("change_id")
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {} (\n    \
                     table_schema text NOT NULL,\n    \
                     table_name text NOT NULL,\n    \
                     log_table text NOT NULL UNIQUE,\n    \
                     capture_function text NOT NULL,\n    \
                     trigger_name text NOT NULL,\n    \
                     installed_at timestamptz NOT NULL DEFAULT now(),\n    \
                     PRIMARY KEY (table_schema, table_name)\n)",
                self.q("watched_table")
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {} (\n    \
                     table_schema text NOT NULL,\n    \
                     table_name text NOT NULL,\n    \
                     column_name text NOT NULL,\n    \
                     position integer NOT NULL,\n    \
                     column_type text NOT NULL,\n    \
                     old_column text NOT NULL,\n    \
                     new_column text NOT NULL,\n    \
                     PRIMARY KEY (table_schema, table_name, column_name),\n    \
                     FOREIGN KEY (table_schema, table_name) REFERENCES {} ON DELETE CASCADE\n)",
                self.q("watched_column"),
                self.q("watched_table")
            ),
            // prev_snapshot: what the consumer has fully handled. batch_*: the batch in
            // progress (NULL when none), kept durable so that a partial ack followed by a
            // crash resumes exactly the same batch.
            format!(
                "CREATE TABLE IF NOT EXISTS {} (\n    \
                     daemon text NOT NULL,\n    \
                     handler text NOT NULL,\n    \
                     tables text[] NOT NULL,\n    \
                     prev_snapshot pg_snapshot NOT NULL,\n    \
                     batch_id bigint NOT NULL DEFAULT 0,\n    \
                     batch_snapshot pg_snapshot,\n    \
                     batch_done_upto bigint,\n    \
                     batch_last_id bigint,\n    \
                     registered_at timestamptz NOT NULL DEFAULT now(),\n    \
                     last_seen timestamptz NOT NULL DEFAULT now(),\n    \
                     PRIMARY KEY (daemon, handler)\n)",
                self.q("consumer")
            ),
        ]
    }

    fn capture_function(
        &self,
        function: &Ident,
        log: &str,
        columns: &[RegisteredColumn],
        table: &UserTable,
    ) -> String {
        let list = |pick: &dyn Fn(&RegisteredColumn) -> String| {
            columns.iter().map(pick).collect::<Vec<_>>().join(", ")
        };
        let old_cols = list(&|c| c.old_column.quoted());
        let new_cols = list(&|c| c.new_column.quoted());
        let old_vals = list(&|c| format!("OLD.{}", c.name.quoted()));
        let new_vals = list(&|c| format!("NEW.{}", c.name.quoted()));
        let unchanged = columns
            .iter()
            .map(|c| {
                let col = c.name.quoted();
                if table.columns[c.name.as_str()].has_catalog_eq {
                    format!("OLD.{col} IS NOT DISTINCT FROM NEW.{col}")
                } else {
                    format!("OLD.{col}::text IS NOT DISTINCT FROM NEW.{col}::text")
                }
            })
            .collect::<Vec<_>>()
            .join("\n           AND ");
        // One notification per transaction: PostgreSQL folds identical notifications
        // (same channel, same payload) sent within one transaction.
        let notify = if self.notify {
            format!(
                "\n    PERFORM pg_notify({}, '');",
                quote_literal(self.schema.as_str())
            )
        } else {
            String::new()
        };
        let body = format!(
            "\nBEGIN\n    \
                 IF TG_OP = 'INSERT' THEN\n        \
                     INSERT INTO {log} (op, {new_cols}) VALUES ('I', {new_vals});\n    \
                 ELSIF TG_OP = 'UPDATE' THEN\n        \
                     IF {unchanged} THEN\n            \
                         RETURN NULL;\n        \
                     END IF;\n        \
                     INSERT INTO {log} (op, {old_cols}, {new_cols}) VALUES ('U', {old_vals}, {new_vals});\n    \
                 ELSE\n        \
                     INSERT INTO {log} (op, {old_cols}) VALUES ('D', {old_vals});\n    \
                 END IF;{notify}\n    \
                 RETURN NULL;\n\
             END\n"
        );
        // Column names may contain `$`, so pick a dollar-quote tag the body does not hold.
        let mut tag = "$epidemic$".to_owned();
        let mut n = 0;
        while body.contains(&tag) {
            n += 1;
            tag = format!("$epidemic{n}$");
        }
        format!(
            "CREATE OR REPLACE FUNCTION {}() RETURNS trigger\n\
             LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp\n\
             AS {tag}{body}{tag}",
            self.q(function.as_str())
        )
    }

    /// The statements that remove every object Epidemic created: the trigger on each
    /// watched table that still exists, then the schema with everything in it.
    pub fn plan_uninstall(&self, client: &mut impl GenericClient) -> Result<Vec<String>, PgError> {
        match schema_state(client, self.schema)? {
            SchemaState::Missing => return Ok(Vec::new()),
            SchemaState::Foreign => return Err(PgError::ForeignSchema(self.schema.to_string())),
            SchemaState::Ours => {}
        }
        let mut plan = Vec::new();
        for (name, reg) in load_registry(client, self.schema)? {
            match inspect_table(client, &name) {
                Ok(_) => plan.push(format!(
                    "DROP TRIGGER IF EXISTS {} ON {}",
                    reg.trigger_name.quoted(),
                    name.quoted()
                )),
                // The user dropped the table (and with it the trigger) already.
                Err(PgError::MissingTable(_)) => {}
                Err(e) => return Err(e),
            }
        }
        plan.push(format!("DROP SCHEMA {} CASCADE", self.schema.quoted()));
        Ok(plan)
    }
}

/// Whether `table` has our trigger, firing our function for every row change.
fn trigger_is_ours(
    client: &mut impl GenericClient,
    table_oid: u32,
    trigger: &Ident,
    schema: &Ident,
    function: &Ident,
    name: &TableName,
) -> Result<bool, PgError> {
    // tgtype 29 = ROW (1) | INSERT (4) | DELETE (8) | UPDATE (16), AFTER (no BEFORE bit).
    let row = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t \
                 JOIN pg_catalog.pg_proc p ON p.oid = t.tgfoid \
                 JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace \
                 WHERE t.tgrelid = $1 AND t.tgname = $2 AND NOT t.tgisinternal AND t.tgtype = 29 \
                   AND n.nspname = $3 AND p.proname = $4)",
            &[
                &table_oid,
                &trigger.as_str(),
                &schema.as_str(),
                &function.as_str(),
            ],
        )
        .map_err(PgError::sql(format!("inspect triggers of {name}")))?;
    Ok(row.get(0))
}
