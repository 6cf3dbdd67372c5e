//! The SQL objects the SQLite backend creates, and the checks before it creates them.
//!
//! Objects (all named `epidemic_*`):
//! - `epidemic_watch`: one row per watched table: its log table and watched columns.
//! - `epidemic_cursor`: one row per (daemon, handler, table): the last id handled.
//! - `epidemic_dead_letter`: changes handlers gave up on.
//! - `epidemic_daemon`: one row per daemon name: the lease of the live daemon using it.
//! - `epidemic_log_<table>`: the change log of one table.
//! - triggers `epidemic_<table>_insert|_update|_delete` on the user's table.

use std::sync::Arc;

use epidemic_plugin_sdk::{ident, BackendError, Watch};
use rusqlite::{Connection, OptionalExtension};

use crate::sql_err;

pub(crate) fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

const WATCH_DDL: &str = "CREATE TABLE IF NOT EXISTS epidemic_watch (
    source_table TEXT PRIMARY KEY,
    log_table TEXT NOT NULL,
    columns TEXT NOT NULL -- JSON array of watched column names
)";

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
    "epidemic_daemon",
    "epidemic_dead_letter",
    "epidemic_cursor",
    "epidemic_watch",
];

/// A watched table's log, as the registry describes it.
#[derive(Debug, Clone)]
pub(crate) struct LogTable {
    pub source_table: String,
    pub log_table: String,
    pub columns: Arc<[String]>,
    /// `SELECT id, op, changed_at, old..., new... WHERE id > ?1 ORDER BY id LIMIT ?2`.
    pub select_sql: String,
}

impl LogTable {
    fn new(source_table: String, log_table: String, columns: Vec<String>) -> Self {
        let olds: Vec<String> = columns.iter().map(|c| quote(&format!("o_{c}"))).collect();
        let news: Vec<String> = columns.iter().map(|c| quote(&format!("n_{c}"))).collect();
        let select_sql = format!(
            "SELECT id, op, changed_at, {} FROM {} WHERE id > ?1 ORDER BY id LIMIT ?2",
            olds.iter()
                .chain(&news)
                .cloned()
                .collect::<Vec<_>>()
                .join(", "),
            quote(&log_table)
        );
        LogTable {
            source_table,
            log_table,
            columns: columns.into(),
            select_sql,
        }
    }
}

pub(crate) struct SqliteSchema<'c> {
    conn: &'c Connection,
}

impl<'c> SqliteSchema<'c> {
    pub fn new(conn: &'c Connection) -> Self {
        SqliteSchema { conn }
    }

    pub fn table_exists(&self, name: &str) -> Result<Option<String>, BackendError> {
        self.conn
            .query_row(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name = ?1 COLLATE NOCASE",
                [name],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql_err)
    }

    pub fn table_columns(&self, table: &str) -> Result<Vec<String>, BackendError> {
        let mut stmt = self
            .conn
            .prepare("SELECT name FROM pragma_table_info(?1) ORDER BY cid")
            .map_err(sql_err)?;
        let cols = stmt
            .query_map([table], |r| r.get(0))
            .map_err(sql_err)?
            .collect::<Result<Vec<String>, _>>()
            .map_err(sql_err)?;
        Ok(cols)
    }

    pub fn installed(&self) -> Result<bool, BackendError> {
        Ok(self.table_exists("epidemic_watch")?.is_some())
    }

    /// The registry entry for a source table, if it is watched.
    pub fn watched(&self, table: &str) -> Result<Option<LogTable>, BackendError> {
        if !self.installed()? {
            return Ok(None);
        }
        let row: Option<(String, String, String)> = self
            .conn
            .query_row(
                "SELECT source_table, log_table, columns FROM epidemic_watch WHERE source_table = ?1 COLLATE NOCASE",
                [table],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(sql_err)?;
        row.map(|(s, l, c)| registry_entry(s, l, &c)).transpose()
    }

    pub fn all_watched(&self) -> Result<Vec<LogTable>, BackendError> {
        if !self.installed()? {
            return Ok(Vec::new());
        }
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT source_table, log_table, columns FROM epidemic_watch ORDER BY source_table",
            )
            .map_err(sql_err)?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(sql_err)?
            .collect::<Result<Vec<(String, String, String)>, _>>()
            .map_err(sql_err)?;
        rows.into_iter()
            .map(|(s, l, c)| registry_entry(s, l, &c))
            .collect()
    }

    /// The highest id ever handed out in a log table (0 if none), from `sqlite_sequence`
    /// so that pruned rows still count.
    pub fn last_id(&self, log_table: &str) -> Result<i64, BackendError> {
        let seq: Option<i64> = self
            .conn
            .query_row(
                "SELECT seq FROM sqlite_sequence WHERE name = ?1",
                [log_table],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql_err)?;
        Ok(seq.unwrap_or(0))
    }

    /// Check the watches against the database and return the statements that bring the
    /// log tables and triggers up to date. Applies nothing.
    pub fn plan_install(&self, watches: &[Watch]) -> Result<Vec<String>, BackendError> {
        let mut plan = vec![
            WATCH_DDL.to_owned(),
            CURSOR_DDL.to_owned(),
            DEAD_LETTER_DDL.to_owned(),
            DAEMON_DDL.to_owned(),
        ];
        for w in watches {
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
            let table = self.table_exists(&w.table)?.ok_or_else(|| {
                BackendError::Invalid(format!("table {} does not exist", w.table))
            })?;
            let existing = self.table_columns(&table)?;
            // Columns already watched (maybe by another daemon's handlers) stay watched:
            // install only ever adds, so two daemons with different handlers never undo
            // each other's triggers.
            let mut columns: Vec<String> = match self.watched(&table)? {
                Some(log) => log.columns.to_vec(),
                None => Vec::new(),
            };
            for c in &w.columns {
                ident::check("column", c)?;
                let canonical = existing
                    .iter()
                    .find(|e| e.eq_ignore_ascii_case(c))
                    .ok_or_else(|| {
                        BackendError::Invalid(format!("column {c} does not exist in table {table}"))
                    })?;
                if !columns.iter().any(|x| x.eq_ignore_ascii_case(canonical)) {
                    columns.push(canonical.clone());
                }
            }
            if columns.is_empty() {
                return Err(BackendError::Invalid(format!(
                    "table {table}: no columns to watch"
                )));
            }
            self.plan_table(&table, &columns, &mut plan)?;
        }
        Ok(plan)
    }

    fn plan_table(
        &self,
        table: &str,
        columns: &[String],
        plan: &mut Vec<String>,
    ) -> Result<(), BackendError> {
        let log = format!("epidemic_log_{table}");
        let log_q = quote(&log);
        let log_cols: Vec<String> = columns
            .iter()
            .flat_map(|c| [format!("o_{c}"), format!("n_{c}")])
            .collect();
        match self.table_exists(&log)? {
            None => {
                let cols: Vec<String> = log_cols
                    .iter()
                    .map(|c| format!("    {}", quote(c)))
                    .collect();
                plan.push(format!(
                    "CREATE TABLE {log_q} (\n    id INTEGER PRIMARY KEY AUTOINCREMENT,\n    op TEXT NOT NULL,\n    \
                     changed_at INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER)),\n{}\n)",
                    cols.join(",\n")
                ));
            }
            Some(_) => {
                let have = self.table_columns(&log)?;
                for c in &log_cols {
                    if !have.iter().any(|h| h.eq_ignore_ascii_case(c)) {
                        plan.push(format!("ALTER TABLE {log_q} ADD COLUMN {}", quote(c)));
                    }
                }
            }
        }
        let t = quote(table);
        let olds: Vec<String> = columns.iter().map(|c| quote(&format!("o_{c}"))).collect();
        let news: Vec<String> = columns.iter().map(|c| quote(&format!("n_{c}"))).collect();
        let old_vals: Vec<String> = columns
            .iter()
            .map(|c| format!("OLD.{}", quote(c)))
            .collect();
        let new_vals: Vec<String> = columns
            .iter()
            .map(|c| format!("NEW.{}", quote(c)))
            .collect();
        let changed: Vec<String> = columns
            .iter()
            .map(|c| format!("OLD.{q} IS NOT NEW.{q}", q = quote(c)))
            .collect();
        let trig = |suffix: &str| quote(&format!("epidemic_{table}_{suffix}"));
        for suffix in ["insert", "update", "delete"] {
            plan.push(format!("DROP TRIGGER IF EXISTS {}", trig(suffix)));
        }
        plan.push(format!(
            "CREATE TRIGGER {} AFTER INSERT ON {t} FOR EACH ROW BEGIN\n    INSERT INTO {log_q} (op, {}) VALUES ('I', {});\nEND",
            trig("insert"),
            news.join(", "),
            new_vals.join(", ")
        ));
        plan.push(format!(
            "CREATE TRIGGER {} AFTER UPDATE ON {t} FOR EACH ROW WHEN {} BEGIN\n    INSERT INTO {log_q} (op, {}, {}) VALUES ('U', {}, {});\nEND",
            trig("update"),
            changed.join(" OR "),
            olds.join(", "),
            news.join(", "),
            old_vals.join(", "),
            new_vals.join(", ")
        ));
        plan.push(format!(
            "CREATE TRIGGER {} AFTER DELETE ON {t} FOR EACH ROW BEGIN\n    INSERT INTO {log_q} (op, {}) VALUES ('D', {});\nEND",
            trig("delete"),
            olds.join(", "),
            old_vals.join(", ")
        ));
        let cols_json =
            serde_json::to_string(columns).map_err(|e| BackendError::Other(e.to_string()))?;
        plan.push(format!(
            "INSERT OR REPLACE INTO epidemic_watch (source_table, log_table, columns) VALUES ({}, {}, {})",
            literal(table),
            literal(&log),
            literal(&cols_json)
        ));
        Ok(())
    }

    /// The statements that remove every object Epidemic created.
    pub fn plan_uninstall(&self) -> Result<Vec<String>, BackendError> {
        let mut plan = Vec::new();
        for log in self.all_watched()? {
            for suffix in ["insert", "update", "delete"] {
                plan.push(format!(
                    "DROP TRIGGER IF EXISTS {}",
                    quote(&format!("epidemic_{}_{suffix}", log.source_table))
                ));
            }
            plan.push(format!("DROP TABLE IF EXISTS {}", quote(&log.log_table)));
        }
        for t in OWN_TABLES {
            if self.table_exists(t)?.is_some() {
                plan.push(format!("DROP TABLE {t}"));
            }
        }
        Ok(plan)
    }
}

fn registry_entry(
    source: String,
    log: String,
    columns_json: &str,
) -> Result<LogTable, BackendError> {
    let columns: Vec<String> = serde_json::from_str(columns_json).map_err(|e| {
        BackendError::Other(format!("epidemic_watch row for {source} is damaged: {e}"))
    })?;
    Ok(LogTable::new(source, log, columns))
}
