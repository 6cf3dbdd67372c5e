//! Epidemic's bookkeeping tables in its schema: the DDL that creates them
//! ([`bookkeeping_ddl`]) and how every other module reads them: whether the schema is
//! ours, the registry of watched tables ([`load_registry`]), the cluster the cursors
//! belong to ([`check_cluster`], [`rebase_ddl`]), the state of the log tables and of the
//! shared id sequence ([`check_logs`]), and the lock that orders registrations against
//! pruning ([`cursor_lock_key`]).
//!
//! The objects (default schema `epidemic`):
//!
//! - `change_id`: ONE sequence for every log table, so change ids order a batch across
//!   tables. It keeps the default `CACHE 1`: with a per-session cache a later change to a
//!   row could get a smaller id than an earlier one, breaking per-row order in a batch.
//! - `watched_table`, `watched_column`: the registry of what is captured and under which
//!   log names (for `uninstall`, for readers, for drift checks). A table's row also holds
//!   its key (`key_columns`, in key order; every key column is a captured column), the
//!   identity of its log (`log_identity`: random, made by the database whenever install
//!   creates the log table, the first half of every stable change id; `log_oid`: the log
//!   table it was made for) and `pruned_upto`, the greatest id pruned from the log.
//! - `consumer`: one durable cursor per (daemon, handler); `evicted_at` is set when the
//!   consumer was unseen longer than the daemon's `consumer_ttl`.
//! - `dead_letter`: changes a handler gave up on.
//! - `daemon`: one row per daemon name: the lease of the live daemon using it.
//! - `cluster`: the system identifier of the cluster whose transaction ids the cursors
//!   hold (see [`rebase_ddl`]).
//! - `backfill`: one row per (daemon, handler, table) backfill: its state and progress
//!   (see [`crate::backfill`]).
//! - `sleeper`: UNLOGGED, one row per reading connection (`pid`), with `since` set while
//!   that reader waits for a wake-up (see [`crate::wake`]). Nothing in it matters after a
//!   crash, hence UNLOGGED: writing it costs no WAL.
//!
//! # Stable change ids
//!
//! A change's stable id is its log's identity and its id in that log. The id is unique in
//! the log as long as the sequence never goes back, and the identity is new whenever the
//! log is: install makes a new one when it creates the log table (first install, after
//! `uninstall`, after the log table was dropped by hand), when the log table is not the
//! one the identity was made for (re-created outside install, or restored from a dump),
//! when the sequence is found behind an id the log already used (restarted or set back by
//! hand, a dump of an older state restored), and when it rebases the cursors of another
//! cluster. The sequence is then put past every id used. `status` reports the last three
//! until install has run; stable ids of changes captured meanwhile may repeat.

use std::collections::{BTreeMap, HashMap};

use postgres::GenericClient;

use crate::error::PgError;
use crate::ident::{quote_ident, quote_literal, Ident, TableName};

/// The SQL that makes a log identity: 64 random bits as 16 hex digits, from the server's
/// strong random source (`gen_random_uuid`, built in since PostgreSQL 13).
pub(crate) const LOG_IDENTITY_SQL: &str =
    "pg_catalog.left(pg_catalog.md5(pg_catalog.gen_random_uuid()::text), 16)";

/// A watched column as the registry records it.
#[derive(Debug, Clone)]
pub(crate) struct RegisteredColumn {
    pub name: Ident,
    pub position: i32,
    pub column_type: String,
    pub old_column: Ident,
    pub new_column: Ident,
}

/// A watched table as the registry records it.
#[derive(Debug, Clone)]
pub(crate) struct RegisteredTable {
    pub log_table: Ident,
    pub capture_function: Ident,
    /// The base of the capture triggers' names; see [`crate::capture::Event::trigger_name`].
    pub trigger_name: Ident,
    /// In capture order.
    pub columns: Vec<RegisteredColumn>,
    /// The row's key columns, in key order; each is one of `columns`. Empty in a schema
    /// installed before keys were captured, until the next install.
    pub key_columns: Vec<Ident>,
    /// The identity of the log, for stable ids; `None` in a schema installed before
    /// stable ids, until the next install.
    pub log_identity: Option<String>,
    /// The oid of the log table the identity was made for; `None` if not recorded.
    pub log_oid: Option<u32>,
    /// The greatest id pruned from the log (0 if none).
    pub pruned_upto: i64,
}

impl RegisteredTable {
    /// `schema.log_<key>`, quoted.
    pub fn log(&self, schema: &Ident) -> String {
        format!("{}.{}", schema.quoted(), self.log_table.quoted())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SchemaState {
    Missing,
    Ours,
    Foreign,
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

/// The advisory lock that orders consumer registrations against pruning (and against
/// the rebase after a restore into another cluster): a registration holds it shared from
/// before it takes its snapshot until it commits; `prune` holds it exclusively while it
/// reads the cursors. So `prune` never computes its horizon without a consumer that is
/// being registered, whose snapshot may miss rows the other consumers have passed.
pub(crate) fn cursor_lock_key(schema: &Ident) -> String {
    format!(
        "pg_catalog.hashtext({})",
        quote_literal(&format!("epidemic cursors {schema}"))
    )
}

/// Whether the cursors in the schema were written by this cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClusterCheck {
    /// The recorded system identifier is this cluster's.
    Same,
    /// Nothing recorded (an installation older than the record; install records it).
    Unrecorded,
    /// Recorded by another cluster: the schema came here by a dump and restore, and its
    /// cursors are snapshots of the other cluster's transaction ids.
    Foreign { recorded: i64, current: i64 },
}

/// Compare the system identifier recorded in the schema with this cluster's
/// (`pg_control_system()`, executable by everyone).
pub(crate) fn check_cluster(
    client: &mut impl GenericClient,
    schema: &Ident,
) -> Result<ClusterCheck, PgError> {
    let table = format!("{}.{}", schema.quoted(), quote_ident("cluster"));
    let exists: bool = client
        .query_one("SELECT pg_catalog.to_regclass($1) IS NOT NULL", &[&table])
        .map_err(PgError::sql("inspect the cluster record"))?
        .get(0);
    if !exists {
        return Ok(ClusterCheck::Unrecorded);
    }
    let row = client
        .query_one(
            &format!(
                "SELECT (SELECT system_identifier FROM {table} LIMIT 1), \
                        (SELECT system_identifier FROM pg_catalog.pg_control_system())"
            ),
            &[],
        )
        .map_err(PgError::sql("read the cluster record"))?;
    let recorded: Option<i64> = row.get(0);
    let current: i64 = row.get(1);
    Ok(match recorded {
        None => ClusterCheck::Unrecorded,
        Some(r) if r == current => ClusterCheck::Same,
        Some(recorded) => ClusterCheck::Foreign { recorded, current },
    })
}

/// Whether `schema.table` has a column `column`: for bookkeeping tables that gained a
/// column after a schema was first installed.
pub(crate) fn has_column(
    client: &mut impl GenericClient,
    schema: &Ident,
    table: &str,
    column: &str,
) -> Result<bool, PgError> {
    let row = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a \
                 JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
                 JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2 AND a.attname = $3 AND NOT a.attisdropped)",
            &[&schema.as_str(), &table, &column],
        )
        .map_err(PgError::sql(format!("inspect {schema}.{table}")))?;
    Ok(row.get(0))
}

/// The registry: every watched table and its columns. Call only when the schema is ours.
pub(crate) fn load_registry(
    client: &mut impl GenericClient,
    schema: &Ident,
) -> Result<BTreeMap<TableName, RegisteredTable>, PgError> {
    let s = schema.quoted();
    // A schema installed before keys and stable ids has none of their columns until the
    // next install adds them (all at once).
    let stable_ids = has_column(client, schema, "watched_table", "log_identity")?;
    let table_extra = if stable_ids {
        "t.key_columns, t.log_identity, t.log_oid, t.pruned_upto"
    } else {
        "'{}'::text[], NULL::text, NULL::oid, 0::int8"
    };
    let rows = client
        .query(
            &format!(
                "SELECT t.table_schema, t.table_name, t.log_table, t.capture_function, t.trigger_name, \
                        c.column_name, c.position, c.column_type, c.old_column, c.new_column, \
                        {table_extra} \
                 FROM {s}.watched_table t \
                 LEFT JOIN {s}.watched_column c \
                   ON c.table_schema = t.table_schema AND c.table_name = t.table_name \
                 ORDER BY t.table_schema, t.table_name, c.position, c.column_name"
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
            key_columns: r
                .get::<_, Vec<String>>(10)
                .into_iter()
                .map(Ident::internal)
                .collect(),
            log_identity: r.get(11),
            log_oid: r.get(12),
            pruned_upto: r.get(13),
        });
        if let Some(column) = r.get::<_, Option<String>>(5) {
            entry.columns.push(RegisteredColumn {
                name: Ident::internal(column),
                position: r.get(6),
                column_type: r.get(7),
                old_column: Ident::internal(r.get(8)),
                new_column: Ident::internal(r.get(9)),
            });
        }
    }
    Ok(registry)
}

/// The registered logs a consumer reads, from its tables as it spells them: one per table
/// (`users` and `public.users` are one log, read once), with the spelling first given.
pub(crate) fn logs_of<'r>(
    registry: &'r BTreeMap<TableName, RegisteredTable>,
    tables: &[String],
) -> Result<Vec<(String, TableName, &'r RegisteredTable)>, PgError> {
    if tables.is_empty() {
        return Err(PgError::NoTables);
    }
    let mut out: Vec<(String, TableName, &RegisteredTable)> = Vec::new();
    for t in tables {
        let name = TableName::parse(t)?;
        let reg = registry
            .get(&name)
            .ok_or_else(|| PgError::NotInstalled(t.clone()))?;
        if !out.iter().any(|(_, n, _)| n == &name) {
            out.push((t.clone(), name, reg));
        }
    }
    Ok(out)
}

/// The state of the registered log tables and of the id sequence they share.
#[derive(Debug, Clone, Default)]
pub(crate) struct LogCheck {
    /// Registered tables whose log table is gone (dropped by hand).
    pub missing: Vec<TableName>,
    /// Registered tables whose log table is not the one its identity was made for.
    pub recreated: Vec<TableName>,
    /// The greatest id a log has used, when the sequence is not past it: the sequence
    /// went back, and would hand out ids (and stable ids) again.
    pub sequence_behind: Option<i64>,
}

/// Check every registered log table (see [`LogCheck`]). Call only when the schema is ours.
pub(crate) fn check_logs(
    client: &mut impl GenericClient,
    schema: &Ident,
    registry: &BTreeMap<TableName, RegisteredTable>,
) -> Result<LogCheck, PgError> {
    let oids: HashMap<String, u32> = client
        .query(
            "SELECT c.relname::text, c.oid FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relkind = 'r'",
            &[&schema.as_str()],
        )
        .map_err(PgError::sql("inspect log tables"))?
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut check = LogCheck::default();
    let mut used = 0i64;
    for (name, reg) in registry {
        let Some(&oid) = oids.get(reg.log_table.as_str()) else {
            check.missing.push(name.clone());
            continue;
        };
        if reg.log_oid.is_some_and(|o| o != oid) {
            check.recreated.push(name.clone());
            continue;
        }
        let top: Option<i64> = client
            .query_one(&format!("SELECT max(id) FROM {}", reg.log(schema)), &[])
            .map_err(PgError::sql(format!(
                "read the newest id in the log of {name}"
            )))?
            .get(0);
        used = used.max(reg.pruned_upto).max(top.unwrap_or(0));
    }
    let last: i64 = client
        .query_one(
            &format!(
                "SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END FROM {}.{}",
                schema.quoted(),
                quote_ident("change_id")
            ),
            &[],
        )
        .map_err(PgError::sql("read the change id sequence"))?
        .get(0);
    if last < used {
        check.sequence_behind = Some(used);
    }
    Ok(check)
}

/// Epidemic's schema and bookkeeping tables: the shared sequence, the registry, the
/// consumer, lease, cluster, sleeper, dead-letter and backfill tables. Idempotent and cheap (no
/// lock on any user table), so always part of an install; a column added to a
/// bookkeeping table since a schema was first installed is added when it is missing.
pub(crate) fn bookkeeping_ddl(
    client: &mut impl GenericClient,
    schema: &Ident,
    state: SchemaState,
) -> Result<Vec<String>, PgError> {
    let q = |name: &str| format!("{}.{}", schema.quoted(), quote_ident(name));
    let mut ddl = vec![
        format!("CREATE SCHEMA IF NOT EXISTS {}", schema.quoted()),
        format!("CREATE SEQUENCE IF NOT EXISTS {} AS bigint", q("change_id")),
        format!(
            "CREATE TABLE IF NOT EXISTS {} (\n    \
                 table_schema text NOT NULL,\n    \
                 table_name text NOT NULL,\n    \
                 log_table text NOT NULL UNIQUE,\n    \
                 capture_function text NOT NULL,\n    \
                 trigger_name text NOT NULL,\n    \
                 installed_at timestamptz NOT NULL DEFAULT now(),\n    \
                 key_columns text[] NOT NULL DEFAULT '{{}}',\n    \
                 log_identity text NOT NULL DEFAULT {LOG_IDENTITY_SQL},\n    \
                 log_oid oid,\n    \
                 pruned_upto bigint NOT NULL DEFAULT 0,\n    \
                 PRIMARY KEY (table_schema, table_name)\n)",
            q("watched_table")
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
            q("watched_column"),
            q("watched_table")
        ),
        // prev_snapshot: what the consumer has fully handled. batch_*: the batch in
        // progress (NULL when none), kept durable so that a partial ack followed by a
        // crash resumes exactly the same batch. evicted_at: set by evict_stale; an
        // evicted consumer holds back no pruning and must register again. prev_upto: no
        // row of the consumer's logs visible in prev_snapshot has a greater id (NULL: not
        // known); how far up the id range prune needs to look (see `crate::prune`).
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
                 evicted_at timestamptz,\n    \
                 prev_upto bigint,\n    \
                 PRIMARY KEY (daemon, handler)\n)",
            q("consumer")
        ),
    ];
    if state == SchemaState::Ours {
        if !has_column(client, schema, "consumer", "evicted_at")? {
            ddl.push(format!(
                "ALTER TABLE {} ADD COLUMN IF NOT EXISTS evicted_at timestamptz",
                q("consumer")
            ));
        }
        // NULL, "not known", for the cursors there are: prune looks through their logs
        // to the end until their next batch closes.
        if !has_column(client, schema, "consumer", "prev_upto")? {
            ddl.push(format!(
                "ALTER TABLE {} ADD COLUMN IF NOT EXISTS prev_upto bigint",
                q("consumer")
            ));
        }
        // Keys and stable ids came later. The volatile default gives every registered log
        // an identity of its own; install records the log tables' oids.
        if !has_column(client, schema, "watched_table", "log_identity")? {
            ddl.push(format!(
                "ALTER TABLE {} ADD COLUMN IF NOT EXISTS key_columns text[] NOT NULL DEFAULT '{{}}', \
                 ADD COLUMN IF NOT EXISTS log_identity text NOT NULL DEFAULT {LOG_IDENTITY_SQL}, \
                 ADD COLUMN IF NOT EXISTS log_oid oid, \
                 ADD COLUMN IF NOT EXISTS pruned_upto bigint NOT NULL DEFAULT 0",
                q("watched_table")
            ));
        }
    }
    // The lease that makes a daemon name exclusive to one live daemon.
    ddl.push(format!(
        "CREATE TABLE IF NOT EXISTS {} (\n    \
             daemon text PRIMARY KEY,\n    \
             instance text NOT NULL,\n    \
             holder text NOT NULL,\n    \
             expires_at timestamptz NOT NULL,\n    \
             renewals bigint NOT NULL DEFAULT 0\n)",
        q("daemon")
    ));
    // The cluster whose transaction ids the cursors and log rows hold; see `rebase_ddl`
    // for what a restore into another cluster does.
    ddl.push(format!(
        "CREATE TABLE IF NOT EXISTS {} (system_identifier bigint NOT NULL)",
        q("cluster")
    ));
    ddl.push(format!(
        "INSERT INTO {c} (system_identifier) \
         SELECT system_identifier FROM pg_catalog.pg_control_system() \
         WHERE NOT EXISTS (SELECT 1 FROM {c})",
        c = q("cluster")
    ));
    // pid: the reading connection's backend; since: set while it waits for a wake-up.
    // Rows of connections that are gone are deleted by the next reader that registers.
    ddl.push(format!(
        "CREATE UNLOGGED TABLE IF NOT EXISTS {} (\n    \
             pid integer PRIMARY KEY,\n    \
             since timestamptz\n)",
        q("sleeper")
    ));
    // change: the change as delivered (JSON, opaque here). source_table: as the
    // consumer spelled it.
    ddl.push(format!(
        "CREATE TABLE IF NOT EXISTS {} (\n    \
             id bigserial PRIMARY KEY,\n    \
             daemon text NOT NULL,\n    \
             handler text NOT NULL,\n    \
             source_table text NOT NULL,\n    \
             change_id bigint NOT NULL,\n    \
             op text NOT NULL,\n    \
             change text NOT NULL,\n    \
             error text NOT NULL,\n    \
             attempts integer NOT NULL,\n    \
             failed_at timestamptz NOT NULL,\n    \
             retry_requested boolean NOT NULL DEFAULT false\n)",
        q("dead_letter")
    ));
    ddl.push(format!(
        "CREATE INDEX IF NOT EXISTS dead_letter_consumer ON {} (daemon, handler)",
        q("dead_letter")
    ));
    ddl.push(crate::backfill::ddl(schema));
    Ok(ddl)
}

/// After a dump of the schema was restored into another cluster (a migration, an
/// upgrade by dump), the cursors are snapshots of the old cluster's transaction ids,
/// and so are the restored log rows' `txid`s, while rows written here since carry
/// this cluster's: compared with each other they mean nothing (typically every new
/// change looks handled, and is pruned). Rebasing makes them mean something again,
/// without losing any change: every log row this statement sees (committed: the
/// restored ones and those written here since) gets `txid` 1, which every snapshot
/// sees as committed and none of the cursors below as handled; rows of transactions
/// still running keep theirs, and are read by the snapshots as usual once they
/// commit. Every consumer restarts from the snapshot that sees nothing, so it is
/// delivered everything in the log, again for what it had handled before the move
/// (at least once, never lost). Under the cursor lock, so that no prune runs on the
/// old cursors meanwhile. `pg_upgrade` also gives the cluster a new system
/// identifier (it keeps the transaction ids), so after it too the retained log is
/// delivered again: redundant, never lossy.
///
/// Every log gets a new identity: the dump may be older than the last change the old
/// cluster captured, and the ids after it are handed out again here.
pub(crate) fn rebase_ddl(
    schema: &Ident,
    registry: &BTreeMap<TableName, RegisteredTable>,
) -> Vec<String> {
    let q = |name: &str| format!("{}.{}", schema.quoted(), quote_ident(name));
    let mut ddl = vec![format!(
        "SELECT pg_catalog.pg_advisory_xact_lock({})",
        cursor_lock_key(schema)
    )];
    for reg in registry.values() {
        ddl.push(format!(
            "UPDATE {} SET txid = '1'::pg_catalog.xid8 WHERE txid <> '1'::pg_catalog.xid8",
            reg.log(schema)
        ));
    }
    ddl.push(format!(
        "UPDATE {} SET prev_snapshot = '1:1:', batch_id = batch_id + 1, batch_snapshot = NULL, \
             batch_done_upto = NULL, batch_last_id = NULL, prev_upto = 0",
        q("consumer")
    ));
    ddl.push(format!(
        "UPDATE {} SET log_identity = DEFAULT",
        q("watched_table")
    ));
    ddl.push(format!(
        "UPDATE {} SET system_identifier = \
             (SELECT system_identifier FROM pg_catalog.pg_control_system())",
        q("cluster")
    ));
    ddl
}
