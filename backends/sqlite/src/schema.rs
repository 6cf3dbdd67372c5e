//! The SQL objects the SQLite backend creates, and the checks before it creates them.
//!
//! Objects (all named `epidemic_*`):
//! - `epidemic_watch`: one row per watched table: its log table and watched columns.
//! - `epidemic_cursor`: one row per (daemon, handler, table): the last id handled.
//! - `epidemic_dead_letter`: changes handlers gave up on.
//! - `epidemic_daemon`: one row per daemon name: the lease of the live daemon using it.
//! - `epidemic_log_<table>`: the change log of one table.
//! - triggers `epidemic_<table>_insert|_update|_delete` on the user's table.
//! - triggers `epidemic_<table>_insert_replace|_update_replace` and the scratch table
//!   `epidemic_replaced_<table>`: the rows a REPLACE is about to remove (below).
//!
//! REPLACE: `INSERT OR REPLACE`, `REPLACE INTO` and `UPDATE OR REPLACE` delete the rows
//! that hold the new row's primary or unique key without firing DELETE triggers (unless
//! `PRAGMA recursive_triggers` is on in the writer's connection, which Epidemic does not
//! control), and no trigger can tell which conflict clause its statement has. So a
//! BEFORE INSERT (and a BEFORE UPDATE that changes a key) trigger copies every row that
//! holds one of the new row's keys into `epidemic_replaced_<table>`, and the AFTER
//! trigger of the same row logs a DELETE for each copied row that is gone by then (or
//! whose identity the new row took): a REPLACE removed it. With `OR IGNORE`, `OR FAIL`
//! and upserts nothing is gone, so nothing is logged; with `OR ABORT`/`OR ROLLBACK` the
//! copies are rolled back with the statement. The DELETE trigger removes a row's copy,
//! so a REPLACE under `recursive_triggers` logs its DELETE once. A copy left over (an
//! ignored row) is cleared by the next BEFORE trigger before it matters.

use std::sync::Arc;

use epidemic_plugin_sdk::backend::{BackendError, Watch};
use epidemic_plugin_sdk::{ident, Op};
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

/// Suffixes of the triggers Epidemic puts on a watched table (`epidemic_<table>_<suffix>`),
/// each with the kind of change that goes uncaptured without it.
pub(crate) const TRIGGERS: &[(&str, Op)] = &[
    ("insert", Op::Insert),
    ("update", Op::Update),
    ("delete", Op::Delete),
    ("insert_replace", Op::Delete),
    ("update_replace", Op::Delete),
];

pub(crate) fn trigger_name(table: &str, suffix: &str) -> String {
    format!("epidemic_{table}_{suffix}")
}

/// The scratch table where a BEFORE trigger copies the rows a REPLACE may remove.
pub(crate) fn replaced_table(table: &str) -> String {
    format!("epidemic_replaced_{table}")
}

/// How the REPLACE triggers find the rows a new row conflicts with.
#[derive(Debug)]
pub(crate) struct ReplaceKeys {
    /// SQL for the columns that identify a row: the rowid (bare: a quoted `"rowid"`
    /// that resolves to no column would be read as a string), or a WITHOUT ROWID
    /// table's primary key.
    identity: Vec<String>,
    /// Each unique key (rowid, primary key, UNIQUE constraints and unique indexes).
    keys: Vec<UniqueKey>,
    /// Unique indexes on expressions, which the triggers cannot match.
    pub unmatched: Vec<String>,
}

/// One unique key as the REPLACE triggers match it.
#[derive(Debug, PartialEq)]
struct UniqueKey {
    /// Each column's SQL and the collation the index compares it with. The collation is
    /// always spelled out: the column's own may differ, and then no index would serve
    /// the lookup.
    columns: Vec<(String, Option<String>)>,
    /// A partial index's WHERE clause, repeated in the lookup so that the index can
    /// serve it (a lookup that does not imply it scans the whole table).
    condition: Option<String>,
}

impl ReplaceKeys {
    /// Every column of any key, for "did this UPDATE change a key".
    fn key_columns(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for (c, _) in self.keys.iter().flat_map(|k| &k.columns) {
            if !out.contains(&c.as_str()) {
                out.push(c);
            }
        }
        out
    }

    fn key_changed(&self) -> String {
        self.key_columns()
            .iter()
            .map(|c| format!("OLD.{c} IS NOT NEW.{c}"))
            .collect::<Vec<_>>()
            .join(" OR ")
    }

    /// For each unique key, the condition that `row` holds NEW's value of it. Each goes
    /// in a SELECT of its own: SQLite serves an OR of them from one index per term only
    /// when no term needs a collation other than its column's, and scans otherwise.
    fn conflicts(&self, row: &str) -> Vec<String> {
        self.keys
            .iter()
            .map(|k| {
                let mut parts: Vec<String> = k
                    .columns
                    .iter()
                    .map(|(c, coll)| match coll {
                        Some(coll) => format!("{row}.{c} = NEW.{c} COLLATE {}", quote(coll)),
                        None => format!("{row}.{c} = NEW.{c}"),
                    })
                    .collect();
                if let Some(cond) = &k.condition {
                    parts.push(format!("({cond})"));
                }
                parts.join(" AND ")
            })
            .collect()
    }

    /// The copy `copy` is of the row `image` (`OLD`, `NEW` or a table alias) names.
    fn same_row(&self, copy: &str, image: &str) -> String {
        self.identity
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{copy}.k_{i} = {image}.{c}"))
            .collect::<Vec<_>>()
            .join(" AND ")
    }

    /// Two images (table aliases, `OLD`, `NEW`) are of the same row.
    fn identity_eq(&self, a: &str, b: &str) -> String {
        self.identity
            .iter()
            .map(|c| format!("{a}.{c} = {b}.{c}"))
            .collect::<Vec<_>>()
            .join(" AND ")
    }

    fn copy_columns(&self) -> Vec<String> {
        (0..self.identity.len()).map(|i| format!("k_{i}")).collect()
    }
}

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
                "SELECT max(seq) FROM sqlite_sequence WHERE name = ?1 COLLATE NOCASE",
                [log_table],
                |r| r.get(0),
            )
            .map_err(sql_err)?;
        Ok(seq.unwrap_or(0))
    }

    /// The unique keys of `table`, for the REPLACE triggers.
    pub fn replace_keys(&self, table: &str) -> Result<ReplaceKeys, BackendError> {
        let without_rowid: bool = self
            .conn
            .query_row(
                "SELECT wr FROM pragma_table_list WHERE schema = 'main' AND name = ?1",
                [table],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql_err)?
            .unwrap_or(false);
        let columns = self.table_columns(table)?;
        let mut keys = Vec::new();
        let identity: Vec<String> = if without_rowid {
            let mut stmt = self
                .conn
                .prepare("SELECT name FROM pragma_table_info(?1) WHERE pk > 0 ORDER BY pk")
                .map_err(sql_err)?;
            let pk = stmt
                .query_map([table], |r| r.get::<_, String>(0))
                .map_err(sql_err)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(sql_err)?;
            pk.iter().map(|c| quote(c)).collect()
        } else {
            // A column may shadow `rowid`; SQLite keeps `_rowid_` and `oid` as spares.
            let alias = ["rowid", "_rowid_", "oid"]
                .into_iter()
                .find(|a| !columns.iter().any(|c| c.eq_ignore_ascii_case(a)))
                .ok_or_else(|| {
                    BackendError::Invalid(format!(
                        "table {table}: its columns rowid, _rowid_ and oid hide the rowid, which Epidemic needs to capture REPLACE; rename one of them"
                    ))
                })?;
            keys.push(UniqueKey {
                columns: vec![(alias.to_owned(), None)],
                condition: None,
            });
            vec![alias.to_owned()]
        };
        let mut unmatched = Vec::new();
        let indexes: Vec<(String, bool, Option<String>)> = {
            let mut stmt = self
                .conn
                .prepare(
                    "SELECT l.name, l.partial, m.sql FROM pragma_index_list(?1) AS l
                     LEFT JOIN sqlite_master AS m ON m.type = 'index' AND m.name = l.name
                     WHERE l.\"unique\" = 1 ORDER BY l.seq",
                )
                .map_err(sql_err)?;
            let rows = stmt
                .query_map([table], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, bool>(1)?,
                        r.get::<_, Option<String>>(2)?,
                    ))
                })
                .map_err(sql_err)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(sql_err)?;
            rows
        };
        for (index, partial, sql) in indexes {
            let mut stmt = self
                .conn
                .prepare("SELECT cid, name, coll FROM pragma_index_xinfo(?1) WHERE key = 1 ORDER BY seqno")
                .map_err(sql_err)?;
            let cols = stmt
                .query_map([&index], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, Option<String>>(1)?,
                        r.get::<_, Option<String>>(2)?,
                    ))
                })
                .map_err(sql_err)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(sql_err)?;
            let mut key = Vec::new();
            for (cid, name, coll) in cols {
                match (cid, name) {
                    (-1, _) if !without_rowid => key.push((identity[0].clone(), None)),
                    (c, Some(name)) if c >= 0 => key.push((quote(&name), coll)),
                    _ => {
                        unmatched.push(index.clone());
                        key.clear();
                        break;
                    }
                }
            }
            if key.is_empty() {
                continue;
            }
            // Without its condition a partial index is matched as if it were whole: a
            // row it does not cover is copied but, not being removed, never logged.
            let condition = match (partial, sql) {
                (true, Some(sql)) => {
                    partial_condition(&sql).filter(|c| self.condition_compiles(table, c))
                }
                _ => None,
            };
            let key = UniqueKey {
                columns: key,
                condition,
            };
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
        Ok(ReplaceKeys {
            identity,
            keys,
            unmatched,
        })
    }

    /// A partial index's condition, as read from its SQL, is a valid filter on the table
    /// (so a misread can only cost speed, never a failing install).
    fn condition_compiles(&self, table: &str, condition: &str) -> bool {
        self.conn
            .prepare(&format!(
                "SELECT 1 FROM {} AS epidemic_row WHERE ({condition})",
                quote(table)
            ))
            .is_ok()
    }

    /// The watch with the table's and columns' catalog spelling; a name the catalog does
    /// not have is kept as given, for install to report.
    pub fn resolve(&self, w: &Watch) -> Result<Watch, BackendError> {
        let Some(table) = self.table_exists(&w.table)? else {
            return Ok(w.clone());
        };
        let existing = self.table_columns(&table)?;
        let columns = w
            .columns
            .iter()
            .map(|c| {
                existing
                    .iter()
                    .find(|e| e.eq_ignore_ascii_case(c))
                    .unwrap_or(c)
                    .clone()
            })
            .collect();
        Ok(Watch {
            table,
            columns,
            key: w.key.clone(),
        })
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
            // In the catalog's spelling, as `resolve` gives them to the host.
            let mut columns: Vec<String> = match self.watched(&table)? {
                Some(log) => log
                    .columns
                    .iter()
                    .map(|c| {
                        existing
                            .iter()
                            .find(|e| e.eq_ignore_ascii_case(c))
                            .unwrap_or(c)
                            .clone()
                    })
                    .collect(),
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
        let existing_log = self.table_exists(&log)?.is_some();
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
        let changed = changed.join(" OR ");
        let trig = |suffix: &str| quote(&trigger_name(table, suffix));
        for (suffix, _) in TRIGGERS {
            plan.push(format!("DROP TRIGGER IF EXISTS {}", trig(suffix)));
        }

        // REPLACE (see the module docs): the scratch table holds nothing between
        // statements that matters, so it is simply made anew.
        let keys = self.replace_keys(table)?;
        let replaced = quote(&replaced_table(table));
        let copy_cols = keys.copy_columns();
        plan.push(format!("DROP TABLE IF EXISTS {replaced}"));
        plan.push(format!(
            "CREATE TABLE {replaced} ({})",
            copy_cols
                .iter()
                .map(String::as_str)
                .chain(olds.iter().map(String::as_str))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        let row = "epidemic_row";
        // Copy the rows holding one of NEW's keys (`extra` narrows them), each once.
        let copy_into = |extra: &str| {
            let select = format!(
                "SELECT {}, {} FROM {t} AS {row}",
                keys.identity
                    .iter()
                    .map(|c| format!("{row}.{c}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                columns
                    .iter()
                    .map(|c| format!("{row}.{}", quote(c)))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let selects: Vec<String> = keys
                .conflicts(row)
                .iter()
                .map(|cond| format!("{select} WHERE {extra}{cond}"))
                .collect();
            format!(
                "INSERT INTO {replaced} ({}, {})\n    {};",
                copy_cols.join(", "),
                olds.join(", "),
                selects.join("\n    UNION ")
            )
        };
        // A copied row is gone, or the new row took its identity: the statement
        // replaced it.
        let log_replaced = |extra: &str| {
            format!(
                "INSERT INTO {log_q} (op, {}) SELECT 'D', {} FROM {replaced} AS epidemic_copy\n    \
                 WHERE {extra}({} OR NOT EXISTS (SELECT 1 FROM {t} AS {row} WHERE {}))\n    ORDER BY epidemic_copy.rowid;",
                olds.join(", "),
                olds.join(", "),
                keys.same_row("epidemic_copy", "NEW"),
                keys.same_row("epidemic_copy", row),
            )
        };
        let key_changed = keys.key_changed();
        plan.push(format!(
            "CREATE TRIGGER {} BEFORE INSERT ON {t} FOR EACH ROW BEGIN\n    DELETE FROM {replaced};\n    {}\nEND",
            trig("insert_replace"),
            copy_into(""),
        ));
        plan.push(format!(
            "CREATE TRIGGER {} BEFORE UPDATE ON {t} FOR EACH ROW WHEN {key_changed} BEGIN\n    DELETE FROM {replaced};\n    {}\nEND",
            trig("update_replace"),
            copy_into(&format!("NOT ({}) AND ", keys.identity_eq(row, "OLD"))),
        ));
        plan.push(format!(
            "CREATE TRIGGER {} AFTER INSERT ON {t} FOR EACH ROW BEGIN\n    {}\n    DELETE FROM {replaced};\n    INSERT INTO {log_q} (op, {}) VALUES ('I', {});\nEND",
            trig("insert"),
            log_replaced(""),
            news.join(", "),
            new_vals.join(", ")
        ));
        // An upsert's DO UPDATE keeps the row it copied (OLD), even if it moves it.
        plan.push(format!(
            "CREATE TRIGGER {} AFTER UPDATE ON {t} FOR EACH ROW WHEN {changed} OR {key_changed} BEGIN\n    {}\n    \
             DELETE FROM {replaced} WHERE {key_changed};\n    \
             INSERT INTO {log_q} (op, {}, {}) SELECT 'U', {}, {} WHERE {changed};\nEND",
            trig("update"),
            log_replaced(&format!(
                "({key_changed}) AND NOT ({}) AND ",
                keys.same_row("epidemic_copy", "OLD")
            )),
            olds.join(", "),
            news.join(", "),
            old_vals.join(", "),
            new_vals.join(", ")
        ));
        // Under `recursive_triggers` a REPLACE fires this trigger for the row it removes:
        // its copy goes, so the AFTER INSERT/UPDATE trigger does not log it again.
        plan.push(format!(
            "CREATE TRIGGER {} AFTER DELETE ON {t} FOR EACH ROW BEGIN\n    DELETE FROM {replaced} WHERE {};\n    INSERT INTO {log_q} (op, {}) VALUES ('D', {});\nEND",
            trig("delete"),
            keys.identity
                .iter()
                .enumerate()
                .map(|(i, c)| format!("k_{i} = OLD.{c}"))
                .collect::<Vec<_>>()
                .join(" AND "),
            olds.join(", "),
            old_vals.join(", ")
        ));
        if existing_log {
            // A log emptied and restored from a copy without `sqlite_sequence` hands out
            // ids again from its highest remaining row: ids consumers are already past,
            // so those changes would never be read. Put the sequence at or above every
            // cursor (it never moves back otherwise; see the crate docs).
            let cursor_max = format!(
                "(SELECT max(last_id) FROM epidemic_cursor WHERE source_table = {} COLLATE NOCASE)",
                literal(table)
            );
            plan.push(format!(
                "UPDATE sqlite_sequence SET seq = {cursor_max} WHERE name = {l} COLLATE NOCASE AND seq < {cursor_max}",
                l = literal(&log)
            ));
            plan.push(format!(
                "INSERT INTO sqlite_sequence (name, seq) SELECT {l}, {cursor_max} WHERE {cursor_max} > 0 \
                 AND NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = {l} COLLATE NOCASE)",
                l = literal(&log)
            ));
        }
        let cols_json =
            serde_json::to_string(columns).map_err(|e| BackendError::Other(e.to_string()))?;
        // One registry row per table, in the catalog's spelling (a table renamed to
        // another case, or registered before names were resolved, keeps one row).
        plan.push(format!(
            "DELETE FROM epidemic_watch WHERE source_table = {} COLLATE NOCASE",
            literal(table)
        ));
        plan.push(format!(
            "INSERT OR REPLACE INTO epidemic_watch (source_table, log_table, columns) VALUES ({}, {}, {})",
            literal(table),
            literal(&log),
            literal(&cols_json)
        ));
        Ok(())
    }

    /// Epidemic's triggers on a watched table whose SQL is not what install would create
    /// now: a unique key or index was added or dropped, or a column renamed, since.
    pub fn stale_triggers(&self, log: &LogTable) -> Result<Vec<String>, BackendError> {
        let mut plan = Vec::new();
        self.plan_table(&log.source_table, &log.columns, &mut plan)?;
        let mut stale = Vec::new();
        for (suffix, _) in TRIGGERS {
            let name = trigger_name(&log.source_table, suffix);
            let create = format!("CREATE TRIGGER {} ", quote(&name));
            let have: Option<String> = self
                .conn
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
    pub fn plan_uninstall(&self) -> Result<Vec<String>, BackendError> {
        let mut plan = Vec::new();
        for log in self.all_watched()? {
            for (suffix, _) in TRIGGERS {
                plan.push(format!(
                    "DROP TRIGGER IF EXISTS {}",
                    quote(&trigger_name(&log.source_table, suffix))
                ));
            }
            plan.push(format!("DROP TABLE IF EXISTS {}", quote(&log.log_table)));
            plan.push(format!(
                "DROP TABLE IF EXISTS {}",
                quote(&replaced_table(&log.source_table))
            ));
        }
        for t in OWN_TABLES {
            if self.table_exists(t)?.is_some() {
                plan.push(format!("DROP TABLE {t}"));
            }
        }
        Ok(plan)
    }
}

/// The WHERE clause of a `CREATE UNIQUE INDEX ... ON t (...) WHERE ...` statement: what
/// follows the column list (the first parenthesis outside quotes).
fn partial_condition(sql: &str) -> Option<String> {
    let mut depth = 0usize;
    let mut quote: Option<char> = None;
    let mut end = None;
    for (i, c) in sql.char_indices() {
        match quote {
            // A doubled quote closes and reopens: same result.
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None => match c {
                '\'' | '"' | '`' => quote = Some(c),
                '[' => quote = Some(']'),
                '(' => depth += 1,
                ')' if depth > 0 => {
                    depth -= 1;
                    if depth == 0 {
                        end = Some(i + 1);
                        break;
                    }
                }
                _ => {}
            },
        }
    }
    let rest = sql.get(end?..)?.trim_start();
    let head = rest.get(..5)?;
    let cond = rest.get(5..)?.trim();
    (head.eq_ignore_ascii_case("where") && !cond.is_empty()).then(|| cond.to_owned())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_index_conditions() {
        assert_eq!(
            partial_condition("CREATE UNIQUE INDEX i ON t (a, b) WHERE b > 0").as_deref(),
            Some("b > 0")
        );
        assert_eq!(
            partial_condition(
                "CREATE UNIQUE INDEX \"i(\" ON \"t)\" (a, lower(b)) where (a IS NOT NULL)"
            )
            .as_deref(),
            Some("(a IS NOT NULL)")
        );
        assert_eq!(partial_condition("CREATE UNIQUE INDEX i ON t (a)"), None);
    }

    fn log(conn: &Connection) -> Vec<(String, Option<i64>, Option<i64>)> {
        let mut stmt = conn
            .prepare("SELECT op, \"o_id\", \"n_id\" FROM epidemic_log_t ORDER BY id")
            .unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// The REPLACE triggers in-process: a partial unique index and an index whose
    /// collation differs from its column's are matched, and use their indexes.
    #[test]
    fn replace_through_partial_and_collated_indexes() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE t (id INTEGER PRIMARY KEY, email TEXT COLLATE NOCASE, dom TEXT, q INTEGER);
             CREATE UNIQUE INDEX t_email ON t (email COLLATE BINARY);
             CREATE UNIQUE INDEX t_dom ON t (dom) WHERE q > 0;",
        )
        .unwrap();
        let watch = Watch {
            table: "t".into(),
            columns: vec!["id".into()],
            ..Default::default()
        };
        let plan = SqliteSchema::new(&conn).plan_install(&[watch]).unwrap();
        let before = plan.iter().find(|s| s.contains("BEFORE INSERT")).unwrap();
        assert!(before.contains("(q > 0)"), "{before}");
        assert!(before.contains("COLLATE \"BINARY\""), "{before}");
        for stmt in &plan {
            conn.execute_batch(stmt).unwrap();
        }
        conn.execute_batch(
            "INSERT INTO t VALUES (1, 'a', 'x', 1), (2, 'A', 'y', 0), (3, 'c', 'y', 0);
             INSERT OR REPLACE INTO t VALUES (4, 'd', 'x', 1);  -- replaces 1 through t_dom
             INSERT OR REPLACE INTO t VALUES (5, 'a', 'y', 0);  -- replaces nothing: 'a' <> 'A' in BINARY, q = 0 is outside t_dom
             INSERT OR REPLACE INTO t VALUES (6, 'A', 'z', 0);  -- replaces 2 through t_email",
        )
        .unwrap();
        assert_eq!(
            log(&conn),
            vec![
                ("I".into(), None, Some(1)),
                ("I".into(), None, Some(2)),
                ("I".into(), None, Some(3)),
                ("D".into(), Some(1), None),
                ("I".into(), None, Some(4)),
                ("I".into(), None, Some(5)),
                ("D".into(), Some(2), None),
                ("I".into(), None, Some(6)),
            ]
        );
        // The lookup the BEFORE INSERT trigger makes, with NEW's values bound: no scan
        // (of a table big enough for the planner to care).
        conn.execute_batch(
            "WITH RECURSIVE n(i) AS (SELECT 100 UNION ALL SELECT i + 1 FROM n WHERE i < 300)
             INSERT INTO t SELECT i, 'e' || i, 'd' || i, i FROM n;",
        )
        .unwrap();
        let lookups: Vec<String> = before
            .split("FROM \"t\" AS epidemic_row")
            .skip(1)
            .map(|s| {
                s.split("\n")
                    .next()
                    .unwrap()
                    .trim_end_matches(';')
                    .replace("NEW.rowid", "?1")
                    .replace("NEW.\"email\"", "?1")
                    .replace("NEW.\"dom\"", "?1")
            })
            .collect();
        assert_eq!(lookups.len(), 3, "{before}");
        for lookup in lookups {
            let plan: Vec<String> = conn
                .prepare(&format!(
                    "EXPLAIN QUERY PLAN SELECT 1 FROM \"t\" AS epidemic_row {lookup}"
                ))
                .unwrap()
                .query_map([1], |r| r.get::<_, String>(3))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            assert!(
                plan.iter().all(|step| step.starts_with("SEARCH")),
                "{plan:?} for {lookup}"
            );
        }
    }

    /// A WITHOUT ROWID table: the primary key is the identity; UPDATE OR REPLACE through
    /// the primary key and through a unique column, with and without recursive triggers.
    #[test]
    fn without_rowid_update_or_replace() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE t (a TEXT, b INTEGER, u TEXT UNIQUE, PRIMARY KEY (a, b)) WITHOUT ROWID;",
        )
        .unwrap();
        let watch = Watch {
            table: "t".into(),
            columns: vec!["u".into()],
            ..Default::default()
        };
        for stmt in SqliteSchema::new(&conn).plan_install(&[watch]).unwrap() {
            conn.execute_batch(&stmt).unwrap();
        }
        conn.execute_batch(
            "INSERT INTO t VALUES ('x', 1, 'p'), ('x', 2, 'q'), ('y', 1, 'r');
             UPDATE OR REPLACE t SET b = 2 WHERE a = 'x' AND b = 1;  -- removes ('x', 2)
             UPDATE OR REPLACE t SET u = 'p' WHERE a = 'y';          -- removes ('x', 2, 'p')
             PRAGMA recursive_triggers = ON;
             INSERT OR REPLACE INTO t VALUES ('y', 1, 's');          -- removes ('y', 1) once",
        )
        .unwrap();
        let mut stmt = conn
            .prepare("SELECT op, \"o_u\", \"n_u\" FROM epidemic_log_t ORDER BY id")
            .unwrap();
        let got: Vec<(String, Option<String>, Option<String>)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let row = |op: &str, o: Option<&str>, n: Option<&str>| {
            (op.to_owned(), o.map(str::to_owned), n.map(str::to_owned))
        };
        assert_eq!(
            got,
            vec![
                row("I", None, Some("p")),
                row("I", None, Some("q")),
                row("I", None, Some("r")),
                row("D", Some("q"), None),
                row("D", Some("p"), None),
                row("U", Some("r"), Some("p")),
                row("D", Some("p"), None),
                row("I", None, Some("s")),
            ]
        );
    }
}
