//! Planning and applying install and uninstall, and the bookkeeping tables.
//!
//! Objects (all named `epidemic_*`):
//! - `epidemic_watch`: the registry, one row per watched table: its log table, captured
//!   columns, key epochs (which captured columns are the key, from which log id on), the
//!   log's identity and the highest log id prune ever deleted.
//! - `epidemic_cursor`: one row per (daemon, handler, table): the last id handled.
//! - `epidemic_dead_letter`: changes handlers gave up on.
//! - `epidemic_daemon`: one row per daemon name: the lease of the live daemon using it.
//! - `epidemic_backfill`: one row per (daemon, handler, table) backfill: its state and
//!   progress (see [`crate::backfill`]).
//! - per watched table, what [`crate::capture`] and [`crate::replace`] create: the log
//!   table `epidemic_log_<table>`, the triggers `epidemic_<table>_*` and the scratch table
//!   `epidemic_replaced_<table>`.
//!
//! Install only ever adds captured columns, so two daemons with different handlers never
//! undo each other's triggers. Keys: a watch without key columns gets the table's primary
//! key (so `epidemic sql` and a DBA's script work without `resolve`), and a table with
//! neither is refused. A changed key starts a new key epoch at the log's next id.
//!
//! Stable ids are `<log identity>-<log id>`. The identity is `lower(hex(randomblob(8)))`,
//! made by SQLite in the statement that writes the registry row, whenever the log table
//! is created (first install, after `uninstall`, after the log was dropped by hand) and
//! whenever the log's `AUTOINCREMENT` sequence is found to have gone back (its
//! `sqlite_sequence` row deleted or restored from an old copy): below a consumer's cursor
//! or below what prune deleted, ids could repeat. The same install puts the sequence back
//! above both, so later changes are neither skipped nor numbered again. The window left:
//! a change numbered again between the loss and that install, read by a consumer before
//! it (one that starts from the oldest change), carries the old identity.

use epidemic_plugin_sdk::backend::{BackendError, Watch};
use epidemic_plugin_sdk::ident;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior};

use crate::backfill::{BACKFILL_DDL, BACKFILL_TABLE};
use crate::capture::{
    last_id, log_table_name, plan_log, plan_triggers, trigger_name, SqliteLogTable, TRIGGERS,
};
use crate::catalog::{self, literal, quote, spelled, table_columns, table_exists};
use crate::error::{sql_err, statement_err};
use crate::replace::replaced_table;

const WATCH_DDL: &str = "CREATE TABLE IF NOT EXISTS epidemic_watch (
    source_table TEXT PRIMARY KEY,
    log_table TEXT NOT NULL,
    columns TEXT NOT NULL, -- JSON array of the captured column names, the key's first
    keys TEXT NOT NULL DEFAULT '[]', -- JSON array of {\"from\": log id, \"key\": [column, ...]}
    log_identity TEXT, -- made by SQLite when the log table was created; stable ids are <log_identity>-<id>
    pruned_upto INTEGER NOT NULL DEFAULT 0 -- the highest log id prune deleted
)";

/// Registry columns added after the first release, with their definitions, for
/// registries an older Epidemic created.
const WATCH_ADDED: &[(&str, &str)] = &[
    ("keys", "keys TEXT NOT NULL DEFAULT '[]'"),
    ("log_identity", "log_identity TEXT"),
    ("pruned_upto", "pruned_upto INTEGER NOT NULL DEFAULT 0"),
];

const CURSOR_DDL: &str = "CREATE TABLE IF NOT EXISTS epidemic_cursor (
    daemon TEXT NOT NULL,
    handler TEXT NOT NULL,
    source_table TEXT NOT NULL,
    last_id INTEGER NOT NULL, -- id of the last change handled in epidemic_log_<source_table>
    registered_at INTEGER NOT NULL, -- microseconds since the Unix epoch
    last_seen INTEGER NOT NULL,
    evicted_at INTEGER, -- set when unseen longer than consumer_ttl; no longer holds back pruning
    PRIMARY KEY (daemon, handler, source_table)
)";

const DEAD_LETTER_DDL: &str = "CREATE TABLE IF NOT EXISTS epidemic_dead_letter (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    daemon TEXT NOT NULL,
    handler TEXT NOT NULL,
    source_table TEXT NOT NULL,
    change_id INTEGER NOT NULL,
    op TEXT NOT NULL,
    change TEXT NOT NULL, -- the change as delivered, JSON
    error TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    failed_at INTEGER NOT NULL, -- microseconds since the Unix epoch
    retry_requested INTEGER NOT NULL DEFAULT 0
)";

/// The lease that makes a daemon name exclusive to one live daemon (see the SDK's
/// `LeaseRequest`); times by SQLite's clock, microseconds since the Unix epoch.
const DAEMON_DDL: &str = "CREATE TABLE IF NOT EXISTS epidemic_daemon (
    daemon TEXT PRIMARY KEY,
    instance TEXT NOT NULL,
    holder TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    renewals INTEGER NOT NULL DEFAULT 0
)";

/// Fixed bookkeeping tables, in the order uninstall drops them.
const OWN_TABLES: &[&str] = &[
    BACKFILL_TABLE,
    "epidemic_daemon",
    "epidemic_dead_letter",
    "epidemic_cursor",
    "epidemic_watch",
];

/// SQL for a new log identity: random, made by the database.
const NEW_IDENTITY: &str = "lower(hex(randomblob(8)))";

/// Plan and run statements in one write transaction. `BEGIN IMMEDIATE` takes the write
/// lock first: a deferred transaction that read the schema and then writes fails at once
/// with SQLITE_BUSY in WAL mode if another connection committed meanwhile (the busy
/// handler is not consulted for that upgrade), and planning inside the transaction
/// means the plan matches the schema it is applied to.
pub(crate) fn apply(
    conn: &mut Connection,
    plan: impl FnOnce(&Connection) -> Result<Vec<String>, BackendError>,
) -> Result<Vec<String>, BackendError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sql_err)?;
    let plan = plan(&tx)?;
    for stmt in &plan {
        tx.execute_batch(stmt).map_err(|e| statement_err(e, stmt))?;
    }
    tx.commit().map_err(sql_err)?;
    Ok(plan)
}

/// Whether Epidemic's registry exists in this database.
pub(crate) fn installed(conn: &Connection) -> Result<bool, BackendError> {
    Ok(table_exists(conn, "epidemic_watch")?.is_some())
}

/// The registry's SELECT, with defaults for the columns an older registry lacks.
fn registry_select(conn: &Connection) -> Result<String, BackendError> {
    let have = table_columns(conn, "epidemic_watch")?;
    let col = |name: &str, default: &str| {
        if have.iter().any(|h| h == name) {
            name.to_owned()
        } else {
            format!("{default} AS {name}")
        }
    };
    Ok(format!(
        "SELECT source_table, log_table, columns, {}, {} FROM epidemic_watch",
        col("keys", "'[]'"),
        col("log_identity", "NULL"),
    ))
}

type RegistryRow = (String, String, String, String, Option<String>);

fn registry_entry(row: RegistryRow) -> Result<SqliteLogTable, BackendError> {
    let (source, log, columns, keys, identity) = row;
    let damaged = |e: serde_json::Error| {
        BackendError::Other(format!("epidemic_watch row for {source} is damaged: {e}"))
    };
    let columns: Vec<String> = serde_json::from_str(&columns).map_err(damaged)?;
    #[derive(serde::Deserialize)]
    struct Epoch {
        from: i64,
        key: Vec<String>,
    }
    let keys: Vec<Epoch> = serde_json::from_str(&keys).map_err(damaged)?;
    SqliteLogTable::new(
        source.clone(),
        log,
        columns,
        keys.into_iter().map(|e| (e.from, e.key)).collect(),
        identity,
    )
}

fn read_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RegistryRow> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
}

/// The registry entry for a source table (any spelling), if it is watched.
pub(crate) fn watched(
    conn: &Connection,
    table: &str,
) -> Result<Option<SqliteLogTable>, BackendError> {
    if !installed(conn)? {
        return Ok(None);
    }
    let sql = format!(
        "{} WHERE source_table = ?1 COLLATE NOCASE",
        registry_select(conn)?
    );
    let row = conn
        .query_row(&sql, [table], read_row)
        .optional()
        .map_err(sql_err)?;
    row.map(registry_entry).transpose()
}

/// Every registry entry, by table name.
pub(crate) fn all_watched(conn: &Connection) -> Result<Vec<SqliteLogTable>, BackendError> {
    if !installed(conn)? {
        return Ok(Vec::new());
    }
    let sql = format!("{} ORDER BY source_table", registry_select(conn)?);
    let mut stmt = conn.prepare_cached(&sql).map_err(sql_err)?;
    let rows = stmt
        .query_map([], read_row)
        .map_err(sql_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(sql_err)?;
    rows.into_iter().map(registry_entry).collect()
}

/// The highest of the table's cursors and of the ids prune deleted from its log: no id
/// at or below it may be handed out again.
fn id_floor(conn: &Connection, table: &str) -> Result<i64, BackendError> {
    let max = |sql: &str| -> Result<i64, BackendError> {
        conn.query_row(sql, [table], |r| r.get::<_, Option<i64>>(0))
            .map(|v| v.unwrap_or(0))
            .map_err(sql_err)
    };
    let mut floor = 0;
    if table_columns(conn, "epidemic_watch")?
        .iter()
        .any(|c| c == "pruned_upto")
    {
        floor = max(
            "SELECT max(pruned_upto) FROM epidemic_watch WHERE source_table = ?1 COLLATE NOCASE",
        )?;
    }
    if table_exists(conn, "epidemic_cursor")?.is_some() {
        floor = floor.max(max(
            "SELECT max(last_id) FROM epidemic_cursor WHERE source_table = ?1 COLLATE NOCASE",
        )?);
    }
    Ok(floor)
}

/// Check the watches against the database and return the statements that bring the
/// log tables and triggers up to date. Applies nothing.
pub(crate) fn plan_install(
    conn: &Connection,
    watches: &[Watch],
) -> Result<Vec<String>, BackendError> {
    let mut plan = vec![WATCH_DDL.to_owned()];
    if installed(conn)? {
        let have = table_columns(conn, "epidemic_watch")?;
        for (name, def) in WATCH_ADDED {
            if !have.iter().any(|h| h == name) {
                plan.push(format!("ALTER TABLE epidemic_watch ADD COLUMN {def}"));
            }
        }
    }
    plan.extend([
        CURSOR_DDL.to_owned(),
        DEAD_LETTER_DDL.to_owned(),
        DAEMON_DDL.to_owned(),
        BACKFILL_DDL.to_owned(),
    ]);
    for w in watches {
        plan_table(conn, w, &mut plan)?;
    }
    Ok(plan)
}

fn plan_table(conn: &Connection, w: &Watch, plan: &mut Vec<String>) -> Result<(), BackendError> {
    ident::check("table", &w.table)?;
    let lower = w.table.to_ascii_lowercase();
    // Epidemic's own tables are off limits, but for bench's scratch table.
    let own = lower.starts_with("epidemic_") && !lower.starts_with("epidemic_bench_");
    if own || lower.starts_with("sqlite_") {
        return Err(BackendError::Invalid(format!(
            "table {}: Epidemic cannot watch its own or SQLite's internal tables",
            w.table
        )));
    }
    let table = table_exists(conn, &w.table)?
        .ok_or_else(|| BackendError::Invalid(format!("table {} does not exist", w.table)))?;
    let existing = table_columns(conn, &table)?;
    let key = catalog::key(conn, &table, &existing, &w.key)?;
    let previous = watched(conn, &table)?;
    // The key first, then the columns already captured (maybe for another daemon's
    // handlers: they stay), then the new ones; all in the catalog's spelling, as
    // `resolve` gives them to the host.
    let mut columns: Vec<String> = key.clone();
    let kept = previous.iter().flat_map(|p| p.columns.iter());
    for c in kept {
        let c = spelled(&existing, c).unwrap_or(c);
        if !columns.iter().any(|x| x.eq_ignore_ascii_case(c)) {
            columns.push(c.clone());
        }
    }
    for c in &w.columns {
        ident::check("column", c)?;
        let canonical = spelled(&existing, c).ok_or_else(|| {
            BackendError::Invalid(format!("column {c} does not exist in table {table}"))
        })?;
        if !columns.iter().any(|x| x.eq_ignore_ascii_case(canonical)) {
            columns.push(canonical.clone());
        }
    }
    let log = log_table_name(&table);
    let (log_ddl, created) = plan_log(conn, &table, &columns)?;
    plan.extend(log_ddl);
    plan.extend(plan_triggers(conn, &table, &columns)?);

    // A sequence below a cursor or below what prune deleted went back (see the module
    // docs): ids at or below that floor would be skipped, or numbered again.
    let restarted = !created && last_id(conn, &log)? < id_floor(conn, &table)?;
    let t = literal(&table);
    let l = literal(&log);
    let floor = format!(
        "max(COALESCE((SELECT max(last_id) FROM epidemic_cursor WHERE source_table = {t} COLLATE NOCASE), 0), \
         COALESCE((SELECT max(pruned_upto) FROM epidemic_watch WHERE source_table = {t} COLLATE NOCASE), 0))"
    );
    plan.push(format!(
        "UPDATE sqlite_sequence SET seq = {floor} WHERE name = {l} COLLATE NOCASE AND seq < {floor}"
    ));
    plan.push(format!(
        "INSERT INTO sqlite_sequence (name, seq) SELECT {l}, {floor} WHERE {floor} > 0 \
         AND NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = {l} COLLATE NOCASE)"
    ));

    // One registry row per table, in the catalog's spelling (a table renamed to another
    // case, or registered before names were resolved, keeps one row).
    let old = |column: &str| {
        format!(
            "(SELECT {column} FROM epidemic_watch WHERE source_table = {t} COLLATE NOCASE \
             ORDER BY source_table = {t} DESC LIMIT 1)"
        )
    };
    let key_json = literal(&json(&key)?);
    let epoch = |from: &str| format!("json_object('from', {from}, 'key', json({key_json}))");
    let keys = if created {
        format!("json_array({})", epoch("0"))
    } else if previous.as_ref().is_some_and(|p| p.key() == key.as_slice()) {
        old("keys")
    } else {
        // Rows logged from the next id on carry the new key.
        let next = format!(
            "max(COALESCE((SELECT max(seq) FROM sqlite_sequence WHERE name = {l} COLLATE NOCASE), 0), \
             COALESCE((SELECT max(id) FROM {}), 0)) + 1",
            quote(&log)
        );
        format!(
            "json_insert(COALESCE({}, '[]'), '$[#]', {})",
            old("keys"),
            epoch(&next)
        )
    };
    let identity = if created || restarted {
        NEW_IDENTITY.to_owned()
    } else {
        format!("COALESCE({}, {NEW_IDENTITY})", old("log_identity"))
    };
    let pruned = if created {
        "0".to_owned()
    } else {
        format!("COALESCE({}, 0)", old("pruned_upto"))
    };
    plan.push(format!(
        "INSERT OR REPLACE INTO epidemic_watch (source_table, log_table, columns, keys, log_identity, pruned_upto)\n    \
         SELECT {t}, {l}, {}, {keys}, {identity}, {pruned}",
        literal(&json(&columns)?),
    ));
    plan.push(format!(
        "DELETE FROM epidemic_watch WHERE source_table = {t} COLLATE NOCASE AND source_table <> {t}"
    ));
    Ok(())
}

fn json(names: &[String]) -> Result<String, BackendError> {
    serde_json::to_string(names).map_err(|e| BackendError::Other(e.to_string()))
}

/// Epidemic's triggers on a watched table whose SQL is not what install would create
/// now: a unique key or index was added or dropped, or a column renamed, since.
pub(crate) fn stale_triggers(
    conn: &Connection,
    log: &SqliteLogTable,
) -> Result<Vec<String>, BackendError> {
    let plan = plan_triggers(conn, &log.source_table, &log.columns)?;
    let mut stale = Vec::new();
    for (suffix, _) in TRIGGERS {
        let name = trigger_name(&log.source_table, suffix);
        let create = format!("CREATE TRIGGER {} ", quote(&name));
        let have: Option<String> = conn
            .query_row(
                "SELECT sql FROM sqlite_master WHERE type = 'trigger' AND name = ?1",
                [&name],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql_err)?;
        let want = plan.iter().find(|s| s.starts_with(&create));
        if let (Some(have), Some(want)) = (have, want) {
            if &have != want {
                stale.push(name);
            }
        }
    }
    Ok(stale)
}

/// The statements that remove every object Epidemic created.
pub(crate) fn plan_uninstall(conn: &Connection) -> Result<Vec<String>, BackendError> {
    let mut plan = Vec::new();
    for log in all_watched(conn)? {
        plan.extend(drop_table_objects(&log.source_table));
    }
    for t in OWN_TABLES {
        if table_exists(conn, t)?.is_some() {
            plan.push(format!("DROP TABLE {t}"));
        }
    }
    Ok(plan)
}

/// The statements that drop what Epidemic made for one watched table (triggers, log and
/// scratch table), leaving the bookkeeping rows.
pub(crate) fn drop_table_objects(table: &str) -> Vec<String> {
    let mut plan: Vec<String> = TRIGGERS
        .iter()
        .map(|(suffix, _)| {
            format!(
                "DROP TRIGGER IF EXISTS {}",
                quote(&trigger_name(table, suffix))
            )
        })
        .collect();
    plan.push(format!(
        "DROP TABLE IF EXISTS {}",
        quote(&log_table_name(table))
    ));
    plan.push(format!(
        "DROP TABLE IF EXISTS {}",
        quote(&replaced_table(table))
    ));
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch(table: &str, columns: &[&str], key: &[&str]) -> Watch {
        Watch {
            table: table.into(),
            columns: columns.iter().map(|c| c.to_string()).collect(),
            key: key.iter().map(|c| c.to_string()).collect(),
            ..Watch::default()
        }
    }

    fn install(conn: &mut Connection, w: Watch) {
        apply(conn, |c| plan_install(c, &[w])).unwrap();
    }

    #[test]
    fn a_key_change_starts_a_key_epoch_at_the_next_id() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t (a INTEGER PRIMARY KEY, b TEXT, v TEXT)")
            .unwrap();
        install(&mut conn, watch("t", &["v"], &[]));
        conn.execute_batch("INSERT INTO t VALUES (1, 'x', 'p'), (2, 'y', 'q')")
            .unwrap();
        install(&mut conn, watch("T", &["V"], &["B"]));
        let log = watched(&conn, "t").unwrap().unwrap();
        assert_eq!(&*log.columns, ["b", "a", "v"]);
        assert_eq!(log.key(), ["b"]);
        assert_eq!(&**log.key_at(2).0, ["a"]);
        assert_eq!(&**log.key_at(3).0, ["b"]);
        // Reinstalling with the same key keeps the epochs.
        install(&mut conn, watch("t", &["v"], &["b"]));
        assert_eq!(watched(&conn, "t").unwrap().unwrap().keys.len(), 2);
    }

    #[test]
    fn an_older_registry_is_brought_up_to_date() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT);
             CREATE TABLE epidemic_watch (source_table TEXT PRIMARY KEY, log_table TEXT NOT NULL, columns TEXT NOT NULL);
             CREATE TABLE epidemic_log_t (id INTEGER PRIMARY KEY AUTOINCREMENT, op TEXT NOT NULL, changed_at INTEGER NOT NULL DEFAULT 0, o_v, n_v);
             INSERT INTO epidemic_watch VALUES ('t', 'epidemic_log_t', '[\"v\"]');
             INSERT INTO epidemic_log_t (op, n_v) VALUES ('I', 'old');",
        )
        .unwrap();
        let old = watched(&conn, "t").unwrap().unwrap();
        assert_eq!(old.identity, None);
        install(&mut conn, watch("t", &["v"], &[]));
        let log = watched(&conn, "t").unwrap().unwrap();
        assert_eq!(log.identity.as_deref().map(str::len), Some(16));
        assert_eq!(&*log.columns, ["id", "v"]);
        // The row logged before keys were captured has none.
        assert!(log.key_at(1).0.is_empty());
        assert_eq!(&**log.key_at(2).0, ["id"]);
    }
}
