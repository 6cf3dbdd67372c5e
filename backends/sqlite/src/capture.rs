//! The log table and the triggers that fill it, for one watched table.
//!
//! `epidemic_log_<table>` has an `INTEGER PRIMARY KEY AUTOINCREMENT` id, the operation,
//! the capture time, and an `o_<column>` / `n_<column>` pair per captured column: the
//! row's key columns first, then the watched ones. SQLite has one writer at a time, so id
//! order is commit order; `AUTOINCREMENT` (not a plain rowid) guarantees that an id is
//! never handed out twice, even after pruning deleted the newest rows — a plain rowid
//! table would reuse `max(rowid)+1` and land new changes below a consumer's cursor.
//!
//! Triggers on the user's table (`epidemic_<table>_<suffix>`): AFTER INSERT, AFTER
//! UPDATE (only when a captured column changed, the key included: an UPDATE of the key
//! alone is a change) and AFTER DELETE copy the old and new values into the log; the
//! BEFORE triggers of [`crate::replace`] catch the rows a REPLACE removes silently.
//!
//! A backfill's watermark (see [`crate::snapshot`]) is a log row too: op [`WATERMARK_OP`],
//! every value NULL, written by the backend itself, never by a trigger.
//!
//! A log table never changes shape but by growing: columns are added, never dropped, so
//! a row logged before a key or column change still reads the values it was logged with.

use std::sync::Arc;

use epidemic_plugin_sdk::backend::BackendError;
use epidemic_plugin_sdk::Op;
use rusqlite::Connection;

use crate::catalog::{quote, table_columns, table_exists};
use crate::error::sql_err;
use crate::replace::ReplaceCapture;

/// Suffixes of the triggers Epidemic puts on a watched table (`epidemic_<table>_<suffix>`),
/// each with the kind of change that goes uncaptured without it.
pub(crate) const TRIGGERS: &[(&str, Op)] = &[
    ("insert", Op::Insert),
    ("update", Op::Update),
    ("delete", Op::Delete),
    ("insert_replace", Op::Delete),
    ("update_replace", Op::Delete),
];

/// The op of a backfill's watermark in a log table. Triggers write only `I`, `U` and
/// `D` (no trigger any Epidemic ever created writes anything else), so a reader never
/// takes a watermark for a change, nor a change for a watermark.
pub(crate) const WATERMARK_OP: &str = "W";

pub(crate) fn trigger_name(table: &str, suffix: &str) -> String {
    format!("epidemic_{table}_{suffix}")
}

pub(crate) fn log_table_name(table: &str) -> String {
    format!("epidemic_log_{table}")
}

/// The key of the log rows from id `from` on: a key change (another primary key, another
/// `[table.NAME] key`) starts a new one at install, so older rows keep the key they were
/// logged with.
#[derive(Debug, Clone)]
pub(crate) struct KeyEpoch {
    pub from: i64,
    pub columns: Arc<[String]>,
    /// Where each key column is among the log's captured columns.
    pub index: Vec<usize>,
}

/// A watched table's log, as the registry describes it.
#[derive(Debug, Clone)]
pub(crate) struct SqliteLogTable {
    pub source_table: String,
    pub log_table: String,
    /// The captured columns, in the log's order (the key columns of the current key
    /// first).
    pub columns: Arc<[String]>,
    /// Key epochs in `from` order; rows before the first have no key (logged by an
    /// Epidemic that did not capture keys).
    pub keys: Vec<KeyEpoch>,
    /// The log's identity, made by SQLite when the log table was created; `None` for a
    /// registry written by an Epidemic without stable ids, until the next install.
    pub identity: Option<String>,
    /// `SELECT id, op, changed_at, old..., new... WHERE id > ?1 ORDER BY id`: a range of
    /// the rowid, read lazily, so the reader stops after as many rows as it wants. No
    /// `LIMIT ?`: SQLite (the bundled 3.54) marks a statement whose LIMIT is a bound
    /// parameter to be prepared again whenever its bindings are cleared, and rusqlite's
    /// statement cache clears them on every use, so every fetch parsed and planned its
    /// SELECT again.
    pub select_sql: String,
    /// The key columns of rows logged before any key epoch: none.
    no_key: Arc<[String]>,
}

impl SqliteLogTable {
    pub fn new(
        source_table: String,
        log_table: String,
        columns: Vec<String>,
        keys: Vec<(i64, Vec<String>)>,
        identity: Option<String>,
    ) -> Result<Self, BackendError> {
        let olds: Vec<String> = columns.iter().map(|c| quote(&format!("o_{c}"))).collect();
        let news: Vec<String> = columns.iter().map(|c| quote(&format!("n_{c}"))).collect();
        let select_sql = format!(
            "SELECT id, op, changed_at, {} FROM {} WHERE id > ?1 ORDER BY id",
            olds.iter()
                .chain(&news)
                .cloned()
                .collect::<Vec<_>>()
                .join(", "),
            quote(&log_table)
        );
        let mut epochs: Vec<KeyEpoch> = Vec::with_capacity(keys.len());
        for (from, key) in keys {
            let index = key
                .iter()
                .map(|k| {
                    columns.iter().position(|c| c == k).ok_or_else(|| {
                        BackendError::Other(format!(
                            "epidemic_watch row for {source_table} is damaged: key column {k} is not captured"
                        ))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            epochs.push(KeyEpoch {
                from,
                columns: key.into(),
                index,
            });
        }
        epochs.sort_by_key(|e| e.from);
        Ok(SqliteLogTable {
            source_table,
            log_table,
            columns: columns.into(),
            keys: epochs,
            identity,
            select_sql,
            no_key: Arc::from(Vec::new()),
        })
    }

    /// The current key (the latest epoch's); empty for a registry without keys.
    pub fn key(&self) -> &[String] {
        self.keys.last().map_or(&[], |e| &e.columns)
    }

    /// The key columns of the current key epoch, shared with the changes that carry them;
    /// `None` for a registry without keys.
    pub fn current_key(&self) -> Option<&KeyEpoch> {
        self.keys.last()
    }

    /// An empty column list, shared (a watermark carries no columns and no key).
    pub fn no_columns(&self) -> &Arc<[String]> {
        &self.no_key
    }

    /// The key columns of log row `id` and where they are among the captured columns.
    pub fn key_at(&self, id: i64) -> (&Arc<[String]>, &[usize]) {
        match self.keys.iter().rev().find(|e| e.from <= id) {
            Some(e) => (&e.columns, &e.index),
            None => (&self.no_key, &[]),
        }
    }
}

/// The highest id ever handed out in a log table (0 if none), from `sqlite_sequence`
/// so that pruned rows still count.
pub(crate) fn last_id(conn: &Connection, log_table: &str) -> Result<i64, BackendError> {
    let seq: Option<i64> = conn
        .query_row(
            "SELECT max(seq) FROM sqlite_sequence WHERE name = ?1 COLLATE NOCASE",
            [log_table],
            |r| r.get(0),
        )
        .map_err(sql_err)?;
    Ok(seq.unwrap_or(0))
}

/// The statements that create the log table of `table` with `columns` captured, or add
/// the columns it lacks; and whether the log table is created (it does not exist).
pub(crate) fn plan_log(
    conn: &Connection,
    table: &str,
    columns: &[String],
) -> Result<(Vec<String>, bool), BackendError> {
    let log = log_table_name(table);
    let log_q = quote(&log);
    let log_cols: Vec<String> = columns
        .iter()
        .flat_map(|c| [format!("o_{c}"), format!("n_{c}")])
        .collect();
    if table_exists(conn, &log)?.is_none() {
        let cols: Vec<String> = log_cols
            .iter()
            .map(|c| format!("    {}", quote(c)))
            .collect();
        let create = format!(
            "CREATE TABLE {log_q} (\n    id INTEGER PRIMARY KEY AUTOINCREMENT,\n    op TEXT NOT NULL,\n    \
             changed_at INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER)),\n{}\n)",
            cols.join(",\n")
        );
        return Ok((vec![create], true));
    }
    let have = table_columns(conn, &log)?;
    let add = log_cols
        .iter()
        .filter(|c| !have.iter().any(|h| h.eq_ignore_ascii_case(c)))
        .map(|c| format!("ALTER TABLE {log_q} ADD COLUMN {}", quote(c)))
        .collect();
    Ok((add, false))
}

/// The statements that (re)create every trigger on `table` capturing `columns` (the
/// key's first) into its log, with the REPLACE capture's scratch table.
pub(crate) fn plan_triggers(
    conn: &Connection,
    table: &str,
    columns: &[String],
) -> Result<Vec<String>, BackendError> {
    let log_q = quote(&log_table_name(table));
    let t = quote(table);
    let olds: Vec<String> = columns.iter().map(|c| quote(&format!("o_{c}"))).collect();
    let news: Vec<String> = columns.iter().map(|c| quote(&format!("n_{c}"))).collect();
    let image = |row: &str| -> Vec<String> {
        columns
            .iter()
            .map(|c| format!("{row}.{}", quote(c)))
            .collect()
    };
    let (old_vals, new_vals) = (image("OLD"), image("NEW"));
    let changed = columns
        .iter()
        .map(|c| format!("OLD.{q} IS NOT NEW.{q}", q = quote(c)))
        .collect::<Vec<_>>()
        .join(" OR ");
    let trig = |suffix: &str| quote(&trigger_name(table, suffix));
    let mut plan: Vec<String> = TRIGGERS
        .iter()
        .map(|(suffix, _)| format!("DROP TRIGGER IF EXISTS {}", trig(suffix)))
        .collect();

    let replace = ReplaceCapture::new(conn, table, columns, &log_table_name(table))?;
    plan.extend(replace.scratch_table());
    plan.push(replace.before_insert(&trig("insert_replace")));
    plan.push(replace.before_update(&trig("update_replace")));
    plan.push(format!(
        "CREATE TRIGGER {} AFTER INSERT ON {t} FOR EACH ROW BEGIN\n    {}\n    INSERT INTO {log_q} (op, {}) VALUES ('I', {});\nEND",
        trig("insert"),
        replace.after_insert(),
        news.join(", "),
        new_vals.join(", ")
    ));
    let unique_key_changed = replace.unique_key_changed();
    plan.push(format!(
        "CREATE TRIGGER {} AFTER UPDATE ON {t} FOR EACH ROW WHEN {changed} OR {unique_key_changed} BEGIN\n    {}\n    \
         INSERT INTO {log_q} (op, {}, {}) SELECT 'U', {}, {} WHERE {changed};\nEND",
        trig("update"),
        replace.after_update(),
        olds.join(", "),
        news.join(", "),
        old_vals.join(", "),
        new_vals.join(", ")
    ));
    plan.push(format!(
        "CREATE TRIGGER {} AFTER DELETE ON {t} FOR EACH ROW BEGIN\n    {}\n    INSERT INTO {log_q} (op, {}) VALUES ('D', {});\nEND",
        trig("delete"),
        replace.after_delete(),
        olds.join(", "),
        old_vals.join(", ")
    ));
    Ok(plan)
}
