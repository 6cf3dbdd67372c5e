//! What `install` and `uninstall` run: [`PgInstaller`] reads the catalogs and Epidemic's
//! registry, validates every watched table, its key and its columns, and produces the
//! DDL, which [`PgInstaller::apply`] runs in one transaction under an advisory lock;
//! `epidemic sql` prints the very same statements.
//!
//! Everything Epidemic creates lives in one schema (default `epidemic`): the bookkeeping
//! tables (see [`crate::registry`]) and, per watched table, a log table and a trigger
//! function (see [`crate::capture`]); only the capture triggers are on the user's table.
//!
//! Install grows the captured column set: the row's key columns (configured, or the
//! primary key) and the union of what every daemon's handlers asked for, so one daemon
//! cannot take columns away from another. The one exception is a column that no longer
//! exists in the table and that this install does not ask for: it is dropped from the
//! capture, so that the table can be captured again. A changed key is recorded in the
//! registry and its columns are captured from then on (a change logged before carries the
//! values the log has for them: `NULL` for a column not captured then). The triggers are
//! (re)created only when they are missing, not ours or out of date, because
//! `CREATE TRIGGER` takes a lock that blocks writers; the function is replaced in place,
//! which needs no such lock (and is how the `notify` option takes effect: the capture
//! functions notify always, only while a reader waits, or never).
//!
//! Install also repairs what would make a stable change id repeat (see
//! [`crate::registry`]): a log table dropped by hand is created again with a new identity,
//! one re-created outside install gets a new identity, and a sequence found behind the ids
//! already used is put past them, every log getting a new identity.
//!
//! Not here: reading (see [`crate::reader`]); reporting drift (see [`crate::status`]).

use std::collections::{BTreeMap, HashSet};

use epidemic_plugin_sdk::backend::Watch;
use postgres::{Client, GenericClient, Transaction};

use crate::capture::{find_triggers, list, Event, PgCapture};
use crate::catalog::inspect_table;
use crate::error::PgError;
use crate::ident::{quote_ident, quote_literal, Ident, TableName, MAX_IDENT_BYTES};
use crate::options::NotifyMode;
use crate::partition;
use crate::registry::{
    bookkeeping_ddl, check_cluster, check_logs, has_column, load_registry, rebase_ddl,
    schema_state, ClusterCheck, LogCheck, RegisteredColumn, RegisteredTable, SchemaState,
};

/// Longest `key` in `capture_<key>`, `log_<key>`, `txid_<key>`, `pkey_<key>`: the longest
/// prefix is `capture_` (8 bytes).
const MAX_KEY_BYTES: usize = MAX_IDENT_BYTES - "capture_".len();

/// Produces install and uninstall DDL for one Epidemic schema.
pub(crate) struct PgInstaller<'a> {
    pub schema: &'a Ident,
    pub notify: NotifyMode,
}

/// What the watches ask of one table.
#[derive(Debug, Default)]
struct Requested {
    /// The table's name as the first watch spelled it (`t` or `public.t`), for messages.
    spelled: String,
    /// The columns, in the order first asked for, without repeats.
    columns: Vec<Ident>,
    /// The key columns the config names (the first watch that names any); empty for the
    /// primary key.
    key: Vec<String>,
}

/// `watches` merged per table.
fn merge_watches(watches: &[Watch]) -> Result<BTreeMap<TableName, Requested>, PgError> {
    let mut merged: BTreeMap<TableName, Requested> = BTreeMap::new();
    for w in watches {
        let table = TableName::parse(&w.table)?;
        let req = merged.entry(table).or_insert_with(|| Requested {
            spelled: w.table.clone(),
            ..Requested::default()
        });
        for c in &w.columns {
            let c = Ident::parse("column", c)?;
            if !req.columns.contains(&c) {
                req.columns.push(c);
            }
        }
        if req.key.is_empty() {
            req.key = w.key.clone();
        }
    }
    for (table, req) in &merged {
        if req.columns.is_empty() {
            return Err(PgError::NoColumns(table.to_string()));
        }
    }
    Ok(merged)
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

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

/// `ARRAY['a', 'b']::text[]`.
fn text_array(items: &[Ident]) -> String {
    let items: Vec<String> = items.iter().map(|i| quote_literal(i.as_str())).collect();
    format!("ARRAY[{}]::pg_catalog.text[]", items.join(", "))
}

impl PgInstaller<'_> {
    fn q(&self, name: &str) -> String {
        format!("{}.{}", self.schema.quoted(), quote_ident(name))
    }

    fn capture(&self) -> PgCapture<'_> {
        PgCapture {
            schema: self.schema,
            notify: self.notify,
        }
    }

    /// `(SELECT oid of the log table)`, evaluated when the statement runs (after the
    /// statement that created the table, in a DBA's script too).
    fn log_oid_sql(&self, log_table: &Ident) -> String {
        format!(
            "{}::pg_catalog.regclass::pg_catalog.oid",
            quote_literal(&self.q(log_table.as_str()))
        )
    }

    /// `WHERE` condition selecting `name`'s registry row.
    fn in_registry(name: &TableName) -> String {
        format!(
            "table_schema = {} AND table_name = {}",
            quote_literal(name.schema.as_str()),
            quote_literal(name.table.as_str()),
        )
    }

    /// Compute a plan inside one transaction, run it and commit: how install, uninstall
    /// and the bench's scratch table are applied. Concurrent installs of the same schema
    /// are serialised by an advisory lock taken before the plan is computed and held
    /// until commit, so each plans against what the one before it committed.
    pub fn apply(
        &self,
        client: &mut Client,
        what: &str,
        plan: impl FnOnce(&PgInstaller<'_>, &mut Transaction<'_>) -> Result<Vec<String>, PgError>,
    ) -> Result<Vec<String>, PgError> {
        let mut tx = client
            .transaction()
            .map_err(PgError::sql(format!("begin {what}")))?;
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext('epidemic install ' || $1))",
            &[&self.schema.as_str()],
        )
        .map_err(PgError::sql(format!("lock for {what}")))?;
        let statements = plan(self, &mut tx)?;
        for s in &statements {
            tx.batch_execute(s)
                .map_err(PgError::sql(format!("{what}: {}", first_line(s))))?;
        }
        tx.commit()
            .map_err(PgError::sql(format!("commit {what}")))?;
        Ok(statements)
    }

    /// The statements that bring the installation up to date for `watches`. Validates
    /// everything first: an invalid watch yields an error and no statement at all. A
    /// watch without a key gets the table's primary key.
    pub fn plan_install(
        &self,
        client: &mut impl GenericClient,
        watches: &[Watch],
    ) -> Result<Vec<String>, PgError> {
        let requested = merge_watches(watches)?;
        for name in requested.keys() {
            // A capture trigger on a log table would log its own log.
            if &name.schema == self.schema {
                return Err(PgError::OwnTable {
                    table: name.to_string(),
                    schema: self.schema.to_string(),
                });
            }
        }
        let state = schema_state(client, self.schema)?;
        if state == SchemaState::Foreign {
            return Err(PgError::ForeignSchema(self.schema.to_string()));
        }
        let registry = if state == SchemaState::Ours {
            load_registry(client, self.schema)?
        } else {
            BTreeMap::new()
        };

        // Validate every table, key and column before producing anything. The captured
        // columns: the key's first, then the watched ones.
        let mut inspected = Vec::with_capacity(requested.len());
        for (name, req) in &requested {
            let table = inspect_table(client, name)?;
            let key = table.key(&req.spelled, &req.key)?;
            let mut captured = key.clone();
            for c in &req.columns {
                if !captured.contains(c) {
                    captured.push(c.clone());
                }
            }
            let registered = registry.get(name);
            for c in &captured {
                if table.columns.contains_key(c.as_str()) {
                    continue;
                }
                let was_watched =
                    registered.is_some_and(|r| r.columns.iter().any(|rc| &rc.name == c));
                return Err(if was_watched {
                    PgError::WatchedColumnGone {
                        table: name.to_string(),
                        column: c.to_string(),
                    }
                } else {
                    PgError::MissingColumn {
                        table: name.to_string(),
                        column: c.to_string(),
                    }
                });
            }
            inspected.push((name, key, captured, table));
        }

        let mut plan = bookkeeping_ddl(client, self.schema, state)?;
        let logs = if state == SchemaState::Ours {
            let logs = check_logs(client, self.schema, &registry)?;
            if let ClusterCheck::Foreign { .. } = check_cluster(client, self.schema)? {
                let present: BTreeMap<TableName, RegisteredTable> = registry
                    .iter()
                    .filter(|(name, _)| !logs.missing.contains(name))
                    .map(|(name, reg)| (name.clone(), reg.clone()))
                    .collect();
                plan.extend(rebase_ddl(self.schema, &present));
            }
            plan.extend(self.repair_ids(&registry, &logs));
            logs
        } else {
            LogCheck::default()
        };

        let mut taken_logs: HashSet<String> =
            registry.values().map(|r| r.log_table.to_string()).collect();
        for (name, key, captured, table) in inspected {
            let existing = registry.get(name);
            let (log_table, function, trigger_base) = match existing {
                Some(reg) => (
                    reg.log_table.clone(),
                    reg.capture_function.clone(),
                    reg.trigger_name.clone(),
                ),
                None => {
                    let mut key = table_key(name, table.oid);
                    if taken_logs.contains(&format!("log_{key}")) {
                        key = format!("#{}", table.oid);
                    }
                    taken_logs.insert(format!("log_{key}"));
                    (
                        Ident::internal(format!("log_{key}")),
                        Ident::internal(format!("capture_{key}")),
                        Ident::internal(format!("{}_capture", self.schema)),
                    )
                }
            };
            let log_key = &log_table.as_str()["log_".len()..];
            // The log table is created for a new registration, and again when it was
            // dropped by hand (writes to the table fail until it is back).
            let create_log = existing.is_none() || logs.missing.contains(name);

            // The captured set: what is registered and still exists, then what is newly
            // asked for. A registered column that is gone and not asked for (checked
            // above) leaves the capture.
            let registered: Vec<RegisteredColumn> =
                existing.map(|r| r.columns.clone()).unwrap_or_default();
            let (mut all, gone): (Vec<RegisteredColumn>, Vec<RegisteredColumn>) = registered
                .into_iter()
                .partition(|c| table.columns.contains_key(c.name.as_str()));
            let mut added: Vec<RegisteredColumn> = Vec::new();
            let mut retyped: Vec<RegisteredColumn> = Vec::new();
            for reg in &mut all {
                let now = &table.columns[reg.name.as_str()];
                if now.type_sql != reg.column_type {
                    reg.column_type = now.type_sql.clone();
                    retyped.push(reg.clone());
                }
            }
            let mut next_position = existing
                .and_then(|r| r.columns.iter().map(|c| c.position).max())
                .map_or(0, |p| p + 1);
            for c in &captured {
                if all.iter().any(|r| &r.name == c) {
                    continue;
                }
                let attnum = table.columns[c.as_str()].attnum;
                let column = RegisteredColumn {
                    name: c.clone(),
                    position: next_position,
                    column_type: table.columns[c.as_str()].type_sql.clone(),
                    old_column: log_column("old_", c, attnum),
                    new_column: log_column("new_", c, attnum),
                };
                next_position += 1;
                all.push(column.clone());
                added.push(column);
            }

            let log = self.q(log_table.as_str());
            let in_registry = Self::in_registry(name);
            if create_log {
                plan.extend(self.capture().log_table(&log_table, log_key, &all));
            }
            match existing {
                None => plan.push(format!(
                    "INSERT INTO {} (table_schema, table_name, log_table, capture_function, trigger_name, \
                     key_columns, log_oid) \
                     VALUES ({}, {}, {}, {}, {}, {}, {}) ON CONFLICT DO NOTHING",
                    self.q("watched_table"),
                    quote_literal(name.schema.as_str()),
                    quote_literal(name.table.as_str()),
                    quote_literal(log_table.as_str()),
                    quote_literal(function.as_str()),
                    quote_literal(trigger_base.as_str()),
                    text_array(&key),
                    self.log_oid_sql(&log_table),
                )),
                Some(_) if create_log => plan.push(format!(
                    "UPDATE {} SET log_identity = DEFAULT, log_oid = {}, pruned_upto = 0 WHERE {in_registry}",
                    self.q("watched_table"),
                    self.log_oid_sql(&log_table),
                )),
                Some(_) => {}
            }
            if existing.is_some_and(|r| r.key_columns != key) {
                plan.push(format!(
                    "UPDATE {} SET key_columns = {} WHERE {in_registry}",
                    self.q("watched_table"),
                    text_array(&key),
                ));
            }
            if !create_log && !added.is_empty() {
                let adds: Vec<String> = added
                    .iter()
                    .flat_map(|c| {
                        [&c.old_column, &c.new_column].map(|col| {
                            format!(
                                "ADD COLUMN IF NOT EXISTS {} {}",
                                col.quoted(),
                                c.column_type
                            )
                        })
                    })
                    .collect();
                plan.push(format!("ALTER TABLE {log} {}", adds.join(", ")));
            }
            if !gone.is_empty() {
                if !create_log {
                    let drops: Vec<String> = gone
                        .iter()
                        .flat_map(|c| {
                            [&c.old_column, &c.new_column]
                                .map(|col| format!("DROP COLUMN IF EXISTS {}", col.quoted()))
                        })
                        .collect();
                    plan.push(format!("ALTER TABLE {log} {}", drops.join(", ")));
                }
                plan.push(format!(
                    "DELETE FROM {} WHERE {in_registry} AND column_name IN ({})",
                    self.q("watched_column"),
                    list(&gone, |c| quote_literal(c.name.as_str()))
                ));
            }
            if !retyped.is_empty() {
                if !create_log {
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
                }
                for c in &retyped {
                    plan.push(format!(
                        "UPDATE {} SET column_type = {} WHERE {in_registry} AND column_name = {}",
                        self.q("watched_column"),
                        quote_literal(&c.column_type),
                        quote_literal(c.name.as_str())
                    ));
                }
            }
            if !added.is_empty() {
                let values: Vec<String> = added
                    .iter()
                    .map(|c| {
                        format!(
                            "({}, {}, {}, {}, {}, {}, {})",
                            quote_literal(name.schema.as_str()),
                            quote_literal(name.table.as_str()),
                            quote_literal(c.name.as_str()),
                            c.position,
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

            let capture = self.capture();
            plan.push(capture.function(&function, &log, &all, name, &table, &trigger_base));
            plan.extend(capture.plan_triggers(
                client,
                name,
                &table,
                &function,
                &trigger_base,
                &all,
                existing.is_some(),
            )?);
        }
        Ok(plan)
    }

    /// What keeps stable ids from repeating, for every registered table (see
    /// [`crate::registry`]): a new identity for a log table that is not the one its
    /// identity was made for; the oid of the log table where none is recorded yet (a
    /// schema installed before stable ids); and, when the sequence is behind an id
    /// already used, the sequence past it and a new identity for every log.
    fn repair_ids(
        &self,
        registry: &BTreeMap<TableName, RegisteredTable>,
        logs: &LogCheck,
    ) -> Vec<String> {
        let mut plan = Vec::new();
        let watched_table = self.q("watched_table");
        for name in &logs.recreated {
            if let Some(reg) = registry.get(name) {
                plan.push(format!(
                    "UPDATE {watched_table} SET log_identity = DEFAULT, log_oid = {} WHERE {}",
                    self.log_oid_sql(&reg.log_table),
                    Self::in_registry(name)
                ));
            }
        }
        for (name, reg) in registry {
            if reg.log_oid.is_none() && !logs.missing.contains(name) {
                plan.push(format!(
                    "UPDATE {watched_table} SET log_oid = {} WHERE {}",
                    self.log_oid_sql(&reg.log_table),
                    Self::in_registry(name)
                ));
            }
        }
        if let Some(used) = logs.sequence_behind {
            // In one statement with reading the sequence, so that ids handed out
            // meanwhile are not handed out again.
            plan.push(format!(
                "SELECT pg_catalog.setval({seq}, GREATEST({used}, last_value)) FROM {}",
                self.q("change_id"),
                seq = quote_literal(&self.q("change_id")),
            ));
            plan.push(format!("UPDATE {watched_table} SET log_identity = DEFAULT"));
        }
        plan
    }

    /// The statements that remove every object Epidemic created: the triggers on each
    /// watched table that still exists, then the schema with everything in it.
    pub fn plan_uninstall(&self, client: &mut impl GenericClient) -> Result<Vec<String>, PgError> {
        match schema_state(client, self.schema)? {
            SchemaState::Missing => return Ok(Vec::new()),
            SchemaState::Foreign => return Err(PgError::ForeignSchema(self.schema.to_string())),
            SchemaState::Ours => {}
        }
        let mut plan = Vec::new();
        for (name, reg) in load_registry(client, self.schema)? {
            plan.extend(self.drop_triggers(client, &name, &reg)?);
        }
        plan.push(format!("DROP SCHEMA {} CASCADE", self.schema.quoted()));
        Ok(plan)
    }

    /// `DROP TRIGGER` for every capture trigger of a registered table (none when the table
    /// is gone: the triggers went with it).
    fn drop_triggers(
        &self,
        client: &mut impl GenericClient,
        name: &TableName,
        reg: &RegisteredTable,
    ) -> Result<Vec<String>, PgError> {
        let table = match inspect_table(client, name) {
            Ok(t) => t,
            Err(PgError::MissingTable(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut names: Vec<String> = Event::for_table(table.partitioned)
            .iter()
            .map(|e| e.trigger_name(&reg.trigger_name).to_string())
            .collect();
        for t in find_triggers(
            client,
            table.oid,
            self.schema,
            &reg.capture_function,
            &reg.trigger_name,
        )? {
            if t.ours && !names.contains(&t.name) {
                names.push(t.name);
            }
        }
        let mut plan: Vec<String> = names
            .iter()
            .map(|t| {
                format!(
                    "DROP TRIGGER IF EXISTS {} ON {}",
                    quote_ident(t),
                    name.quoted()
                )
            })
            .collect();
        if table.partitioned {
            let trigger = Event::Truncate.trigger_name(&reg.trigger_name);
            for leaf in partition::partition_leaves(
                client,
                table.oid,
                self.schema,
                &reg.capture_function,
                &trigger,
            )? {
                if leaf.enabled.is_some() {
                    plan.push(format!(
                        "DROP TRIGGER IF EXISTS {} ON {}",
                        trigger.quoted(),
                        leaf.quoted
                    ));
                }
            }
        }
        Ok(plan)
    }

    /// The statements that remove everything Epidemic keeps for one table (triggers, log,
    /// function, registry entry, the table from consumers' lists and consumers left with
    /// no table, dead letters), leaving the rest of the installation alone. Empty when
    /// the table is not registered.
    pub fn plan_forget_table(
        &self,
        client: &mut impl GenericClient,
        name: &TableName,
    ) -> Result<Vec<String>, PgError> {
        if schema_state(client, self.schema)? != SchemaState::Ours {
            return Ok(Vec::new());
        }
        let registry = load_registry(client, self.schema)?;
        let Some(reg) = registry.get(name) else {
            return Ok(Vec::new());
        };
        let mut plan = self.drop_triggers(client, name, reg)?;
        plan.push(format!(
            "DROP TABLE IF EXISTS {}",
            self.q(reg.log_table.as_str())
        ));
        plan.push(format!(
            "DROP FUNCTION IF EXISTS {}()",
            self.q(reg.capture_function.as_str())
        ));
        plan.push(format!(
            "DELETE FROM {} WHERE table_schema = {} AND table_name = {}",
            self.q("watched_table"),
            quote_literal(name.schema.as_str()),
            quote_literal(name.table.as_str())
        ));
        // Consumers and dead letters name the table as configured: `t` or `public.t`.
        let mut spellings = vec![format!("{}.{}", name.schema, name.table)];
        if name.schema.as_str() == "public" {
            spellings.push(name.table.to_string());
        }
        let spellings_sql = spellings
            .iter()
            .map(|s| quote_literal(s))
            .collect::<Vec<_>>()
            .join(", ");
        plan.push(format!(
            "UPDATE {} SET tables = ARRAY(SELECT t FROM unnest(tables) AS t WHERE t NOT IN ({spellings_sql})) \
             WHERE tables && ARRAY[{spellings_sql}]",
            self.q("consumer")
        ));
        plan.push(format!(
            "DELETE FROM {} WHERE cardinality(tables) = 0",
            self.q("consumer")
        ));
        // A schema installed before dead letters existed has no such table yet.
        if has_column(client, self.schema, "dead_letter", "source_table")? {
            plan.push(format!(
                "DELETE FROM {} WHERE source_table IN ({spellings_sql})",
                self.q("dead_letter")
            ));
        }
        Ok(plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_key_named_for_a_table_wins_and_columns_merge() {
        let mut a = Watch::new("t", ["x"]);
        a.key = vec!["k".into()];
        let b = Watch::new("public.t", ["y", "x"]);
        let merged = merge_watches(&[b, a]).unwrap();
        let req = &merged[&TableName::parse("t").unwrap()];
        assert_eq!(req.spelled, "public.t");
        assert_eq!(req.key, vec!["k".to_owned()]);
        let columns: Vec<&str> = req.columns.iter().map(Ident::as_str).collect();
        assert_eq!(columns, ["y", "x"]);
    }
}
