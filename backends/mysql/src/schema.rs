//! The SQL objects the MySQL backend creates, and the checks before it creates them.
//!
//! Objects (all named `epidemic_*`, in the URL's database):
//! - `epidemic_watch`: one row per watched table: its log table and watched columns, and
//!   the marks TRUNCATE detection compares (`ops::check_truncation`).
//! - `epidemic_cursor`: one row per (daemon, handler, table): high-water mark and gaps.
//! - `epidemic_daemon`: one row per daemon name: the lease of the live daemon using it.
//! - `epidemic_dead_letter`: changes handlers gave up on.
//! - `epidemic_log_<table>`: the change log of one table (InnoDB, `BIGINT AUTO_INCREMENT`
//!   id, `op`, `changed_at` in microseconds, typed `old_<col>`/`new_<col>` columns).
//! - triggers `epidemic_<table>_insert|_update|_delete`, `AFTER`, on the user's table.
//! - triggers `epidemic_<parent>_cascade_del|_cascade_upd`, `BEFORE`, on a table whose
//!   foreign-key cascades reach a watched table (`cascade.rs`).
//!
//! Checked before anything is generated: the table exists (its catalog spelling is used
//! everywhere: `resolve` gives it to the host, which then names tables and columns
//! exactly as the log does), it is a base table, its engine is transactional (a MyISAM
//! table keeps a rolled-back change while its InnoDB log row goes), and every cascade
//! into it can be captured. Log and bookkeeping tables are always `ENGINE=InnoDB`; the
//! servers' default `sql_mode` has `NO_ENGINE_SUBSTITUTION`, so a server without InnoDB
//! fails the install instead of substituting another engine.
//!
//! Names longer than MySQL's 64 characters are cut and given a hash suffix.
//!
//! Everything generated here runs on MySQL 5.0: no JSON functions, no `IF NOT EXISTS`
//! on triggers, no fractional-second types in the DDL (the time is a `BIGINT` filled by
//! the trigger, with microseconds where the server has `UTC_TIMESTAMP(6)`), one trigger
//! per table, event and timing. MySQL DDL is not transactional, so
//! [`MySqlSchema::plan_install`] checks every table and column before it returns a
//! statement, and `install` runs exactly the statements it returned.

use std::collections::HashMap;
use std::sync::Arc;

use epidemic_plugin_sdk::backend::{BackendError, Watch};
use epidemic_plugin_sdk::ident;
use mysql::prelude::Queryable;
use mysql::Conn;

use crate::cascade::{
    self, CascadeCapture, CascadeMode, FkRule, ForeignKey, ParentEvent, Timing, WatchedTable,
};
use crate::conn::{sql_err, ServerInfo};

/// MySQL's limit for table, column and trigger names.
const MAX_NAME: usize = 64;

/// Backtick-quote an identifier (a backtick inside is doubled).
pub(crate) fn quote(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

/// A string literal. Only ever used with checked identifiers and comma-joined lists of
/// them; quotes and backslashes are escaped anyway.
fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

/// FNV-1a, for stable short name suffixes (not for security).
pub(crate) fn fnv1a32(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// `name` if it fits MySQL's 64 characters, else its first 55 characters, `_` and eight
/// hex digits of its hash. Names are ASCII (checked by [`ident::check`]).
pub(crate) fn fit(name: String) -> String {
    if name.len() <= MAX_NAME {
        return name;
    }
    format!("{}_{:08x}", &name[..MAX_NAME - 9], fnv1a32(&name))
}

pub(crate) fn log_table_name(source: &str) -> String {
    fit(format!("epidemic_log_{source}"))
}

/// Where a parent's BEFORE trigger puts the rows its cascade is about to touch in
/// `source` until the AFTER trigger moves them into the log (`cascade.rs`).
pub(crate) fn pend_table_name(source: &str) -> String {
    fit(format!("epidemic_pend_{source}"))
}

pub(crate) fn trigger_name(source: &str, event: &str) -> String {
    fit(format!("epidemic_{source}_{event}"))
}

pub(crate) fn log_column(prefix: &str, column: &str) -> String {
    fit(format!("{prefix}_{column}"))
}

const WATCH_DDL: &str = "CREATE TABLE IF NOT EXISTS `epidemic_watch` (
    `source_table` VARCHAR(64) CHARACTER SET utf8 COLLATE utf8_bin NOT NULL,
    `log_table` VARCHAR(64) CHARACTER SET utf8 COLLATE utf8_bin NOT NULL,
    `columns` TEXT CHARACTER SET utf8 NOT NULL COMMENT 'watched columns, comma-separated',
    `table_id` BIGINT NULL DEFAULT NULL COMMENT 'InnoDB table id when last checked: TRUNCATE changes it',
    `created` VARCHAR(32) CHARACTER SET ascii NULL DEFAULT NULL COMMENT 'CREATE_TIME when last checked: a rebuild changes it, TRUNCATE does not',
    `auto_increment` BIGINT UNSIGNED NULL DEFAULT NULL COMMENT 'AUTO_INCREMENT when last checked: TRUNCATE resets it',
    `checked_at` VARCHAR(32) CHARACTER SET ascii NULL DEFAULT NULL COMMENT 'NOW() of the last check',
    `truncated_at` VARCHAR(32) CHARACTER SET ascii NULL DEFAULT NULL COMMENT 'UTC time a TRUNCATE was noticed; cleared by hand',
    PRIMARY KEY (`source_table`)
) ENGINE=InnoDB COMMENT='Epidemic: watched tables'";

const CURSOR_DDL: &str = "CREATE TABLE IF NOT EXISTS `epidemic_cursor` (
    `daemon` VARCHAR(128) CHARACTER SET utf8 COLLATE utf8_bin NOT NULL,
    `handler` VARCHAR(128) CHARACTER SET utf8 COLLATE utf8_bin NOT NULL,
    `source_table` VARCHAR(64) CHARACTER SET utf8 COLLATE utf8_bin NOT NULL,
    `high_water` BIGINT NOT NULL COMMENT 'largest log id handled',
    `gaps` MEDIUMTEXT CHARACTER SET ascii NOT NULL COMMENT 'ids below high_water not seen yet: 3,5-9',
    `registered_at` BIGINT NOT NULL COMMENT 'microseconds since the Unix epoch',
    `last_seen` BIGINT NOT NULL COMMENT 'microseconds since the Unix epoch',
    `evicted_at` BIGINT NULL DEFAULT NULL COMMENT 'set when unseen longer than consumer_ttl: no longer holds back pruning',
    PRIMARY KEY (`daemon`, `handler`, `source_table`)
) ENGINE=InnoDB COMMENT='Epidemic: one cursor per consumer and table'";

/// Changes and errors are stored as bytes: MySQL 5.0's `utf8` holds no 4-byte
/// characters, and a dead letter must never fail to be written over an emoji.
const DEAD_LETTER_DDL: &str = "CREATE TABLE IF NOT EXISTS `epidemic_dead_letter` (
    `id` BIGINT NOT NULL AUTO_INCREMENT,
    `daemon` VARCHAR(128) CHARACTER SET utf8 COLLATE utf8_bin NOT NULL,
    `handler` VARCHAR(128) CHARACTER SET utf8 COLLATE utf8_bin NOT NULL,
    `source_table` VARCHAR(64) CHARACTER SET utf8 COLLATE utf8_bin NOT NULL,
    `change_id` BIGINT NOT NULL,
    `op` CHAR(1) CHARACTER SET ascii NOT NULL,
    `change` LONGBLOB NOT NULL COMMENT 'the change as delivered, JSON (UTF-8)',
    `error` MEDIUMBLOB NOT NULL COMMENT 'the last error (UTF-8)',
    `attempts` INT NOT NULL,
    `failed_at` BIGINT NOT NULL COMMENT 'microseconds since the Unix epoch',
    `retry_requested` TINYINT NOT NULL DEFAULT 0,
    PRIMARY KEY (`id`),
    KEY `consumer` (`daemon`, `handler`)
) ENGINE=InnoDB COMMENT='Epidemic: changes handlers gave up on'";

/// The lease that makes a daemon name exclusive to one live daemon (see the SDK's
/// `LeaseRequest`); times by the server's clock, microseconds since the Unix epoch.
const DAEMON_DDL: &str = "CREATE TABLE IF NOT EXISTS `epidemic_daemon` (
    `daemon` VARCHAR(128) CHARACTER SET utf8 COLLATE utf8_bin NOT NULL,
    `instance` VARCHAR(64) CHARACTER SET ascii NOT NULL,
    `holder` VARCHAR(255) CHARACTER SET utf8 NOT NULL COMMENT 'pid and host of the holder',
    `expires_at` BIGINT NOT NULL COMMENT 'microseconds since the Unix epoch',
    `renewals` BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (`daemon`)
) ENGINE=InnoDB COMMENT='Epidemic: which live daemon holds each daemon name'";

/// Longest daemon or handler name `epidemic_cursor` holds.
pub(crate) const MAX_CONSUMER_NAME: usize = 128;

/// A watched table's log, as the registry describes it.
#[derive(Debug, Clone)]
pub(crate) struct MySqlLogTable {
    pub source_table: String,
    pub log_table: String,
    pub columns: Arc<[String]>,
    /// `SELECT id, op, changed_at, old_..., new_... FROM log WHERE `; the reader adds
    /// its id conditions, `ORDER BY` and `LIMIT`.
    pub select_prefix: String,
}

impl MySqlLogTable {
    fn new(source_table: String, log_table: String, columns: Vec<String>) -> Self {
        let olds = columns.iter().map(|c| quote(&log_column("old", c)));
        let news = columns.iter().map(|c| quote(&log_column("new", c)));
        let select_prefix = format!(
            "SELECT `id`, `op`, `changed_at`, {} FROM {} WHERE ",
            olds.chain(news).collect::<Vec<_>>().join(", "),
            quote(&log_table)
        );
        MySqlLogTable {
            source_table,
            log_table,
            columns: columns.into(),
            select_prefix,
        }
    }
}

/// A column of a user's table, as `information_schema.COLUMNS` describes it.
#[derive(Debug, Clone)]
struct SourceColumn {
    name: String,
    /// `varchar(255)`, `int(10) unsigned`, `enum('a','b')`.
    column_type: String,
    /// `utf8mb4` for character columns, `None` otherwise.
    charset: Option<String>,
}

impl SourceColumn {
    /// The type of a log column holding this column's values: the same type, the same
    /// character set, and always nullable (an INSERT has no old values). `NULL DEFAULT
    /// NULL` also keeps MySQL 5.x from giving a `TIMESTAMP` column automatic
    /// initialisation, which would replace a NULL with the current time.
    fn log_type(&self) -> String {
        match &self.charset {
            Some(cs) => format!("{} CHARACTER SET {cs} NULL DEFAULT NULL", self.column_type),
            None => format!("{} NULL DEFAULT NULL", self.column_type),
        }
    }

    fn same_type(&self, other: &SourceColumn) -> bool {
        self.column_type.eq_ignore_ascii_case(&other.column_type) && self.charset == other.charset
    }
}

#[derive(Debug, Clone)]
struct ExistingTrigger {
    name: String,
    timing: String,
    event: String,
    table: String,
    body: String,
}

/// A parent's cascade trigger a watched table needs: (parent, trigger name, whether it is
/// there and current).
pub(crate) type CascadeTrigger = (String, String, bool);

/// A table as `information_schema.TABLES` describes it.
#[derive(Debug, Clone)]
struct CatalogTable {
    name: String,
    /// `BASE TABLE`, `VIEW`, `SEQUENCE`.
    kind: String,
    engine: Option<String>,
    transactional: bool,
}

/// One watch after validation: the table's real name and the full column set.
struct ResolvedWatch {
    table: String,
    columns: Vec<SourceColumn>,
    /// The columns that identify a row, for the UPDATE trigger's check that the row
    /// really changed (see [`MySqlSchema::trigger_bodies`]).
    key: Option<Vec<String>>,
}

const EVENTS: [(&str, &str); 3] = [
    ("insert", "INSERT"),
    ("update", "UPDATE"),
    ("delete", "DELETE"),
];

pub(crate) struct MySqlSchema<'c> {
    conn: &'c mut Conn,
    server: ServerInfo,
}

impl<'c> MySqlSchema<'c> {
    pub fn new(conn: &'c mut Conn, server: ServerInfo) -> Self {
        MySqlSchema { conn, server }
    }

    /// Tables of the current database whose name equals `name` without regard to case,
    /// with their type and engine. The comparison goes through `LOWER()` on purpose: with
    /// `lower_case_table_names = 0` an equality on `TABLE_NAME` becomes a case-sensitive
    /// file lookup, which misses `Mail_Users` when asked for `mail_users`.
    fn tables_named(&mut self, name: &str) -> Result<Vec<CatalogTable>, BackendError> {
        const SELECT: &str =
            "SELECT TABLE_NAME, TABLE_TYPE, ENGINE FROM information_schema.TABLES \
             WHERE TABLE_SCHEMA = DATABASE() AND ";
        // The exact name first: cheap (one table opened), and the usual case.
        let exact = self.catalog_rows(&format!("{SELECT}TABLE_NAME = ?"), name)?;
        if exact.iter().any(|t| t.name == name) {
            return Ok(exact);
        }
        self.catalog_rows(&format!("{SELECT}LOWER(TABLE_NAME) = LOWER(?)"), name)
    }

    fn catalog_rows(&mut self, sql: &str, name: &str) -> Result<Vec<CatalogTable>, BackendError> {
        let rows: Vec<(String, String, Option<String>)> =
            self.conn.exec(sql, (name,)).map_err(sql_err)?;
        let mut out = Vec::with_capacity(rows.len());
        for (name, kind, engine) in rows {
            let transactional = match &engine {
                Some(e) => self.engine_transactional(e)?,
                None => false,
            };
            out.push(CatalogTable {
                name,
                kind,
                engine,
                transactional,
            });
        }
        Ok(out)
    }

    /// Whether the server has `engine` enabled and it is transactional. MySQL 5.0 has no
    /// `information_schema.ENGINES`; there the engines known to be transactional count.
    fn engine_transactional(&mut self, engine: &str) -> Result<bool, BackendError> {
        match self.conn.exec_first::<Option<String>, _, _>(
            "SELECT TRANSACTIONS FROM information_schema.ENGINES WHERE ENGINE = ?",
            (engine,),
        ) {
            Ok(row) => Ok(row.flatten().as_deref() == Some("YES")),
            Err(_) => Ok(["InnoDB", "TokuDB", "RocksDB", "ndbcluster"]
                .iter()
                .any(|e| e.eq_ignore_ascii_case(engine))),
        }
    }

    /// Whether a table of exactly this name exists (Epidemic's own tables, whose names
    /// it made from catalog spellings).
    pub fn table_exists(&mut self, name: &str) -> Result<bool, BackendError> {
        let found: Vec<String> = self
            .conn
            .exec(
                "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?",
                (name,),
            )
            .map_err(sql_err)?;
        Ok(found.iter().any(|t| t == name))
    }

    /// The catalog's entry for a user's table as the config names it: the exact name,
    /// else the one table whose name differs only in case. Table names are
    /// case-insensitive with `lower_case_table_names` 1 or 2 (the catalog then holds one
    /// spelling); with 0 they are file names, but a handler that wrote `mail_users` for
    /// the only table `Mail_Users` still means that table.
    fn catalog_table(&mut self, name: &str) -> Result<CatalogTable, BackendError> {
        let mut found = self.tables_named(name)?;
        let pick = match found.iter().position(|t| t.name == name) {
            Some(i) => found.swap_remove(i),
            None if found.len() == 1 => found.remove(0),
            None if found.is_empty() => {
                return Err(BackendError::Invalid(format!(
                    "table {name} does not exist"
                )))
            }
            None => {
                let names: Vec<&str> = found.iter().map(|t| t.name.as_str()).collect();
                return Err(BackendError::Invalid(format!(
                    "table {name} is ambiguous: {} differ only in case; name one exactly",
                    names.join(" and ")
                )));
            }
        };
        if pick.kind != "BASE TABLE" {
            return Err(BackendError::Invalid(format!(
                "table {} is a {}: only base tables can have triggers",
                pick.name,
                pick.kind.to_ascii_lowercase()
            )));
        }
        Ok(pick)
    }

    /// For `status`: why a watched table's engine cannot be captured correctly (it was
    /// converted after install), if it cannot.
    pub fn engine_problem(&mut self, table: &str) -> Result<Option<String>, BackendError> {
        match self.resolve_table(table) {
            Err(BackendError::Invalid(why)) if why.contains("not transactional") => Ok(Some(why)),
            Err(BackendError::Invalid(_)) | Ok(_) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// [`Self::catalog_table`], refusing a table whose engine is not transactional: a
    /// rolled-back write would keep its row change while its InnoDB log row goes, and
    /// concurrent writes could be logged out of order.
    fn resolve_table(&mut self, name: &str) -> Result<String, BackendError> {
        let t = self.catalog_table(name)?;
        if !t.transactional {
            let engine = t.engine.as_deref().unwrap_or("unknown");
            return Err(BackendError::Invalid(format!(
                "table {} uses the {engine} engine, which is not transactional (a rolled-back write would \
                 keep its change and lose its log row); convert it first: ALTER TABLE {} ENGINE=InnoDB",
                t.name,
                quote(&t.name)
            )));
        }
        Ok(t.name)
    }

    /// The watches in the catalog's spelling (see [`epidemic_plugin_sdk::backend::Backend::resolve`]).
    /// A name that does not resolve is returned as given; install reports it.
    pub fn resolve(&mut self, watches: &[Watch]) -> Result<Vec<Watch>, BackendError> {
        let mut out = Vec::with_capacity(watches.len());
        for w in watches {
            if ident::check("table", &w.table).is_err() {
                out.push(w.clone());
                continue;
            }
            let Ok(t) = self.catalog_table(&w.table) else {
                out.push(w.clone());
                continue;
            };
            let have = self.columns_of(&t.name)?;
            let columns = w
                .columns
                .iter()
                .map(|c| {
                    have.iter()
                        .find(|h| h.name.eq_ignore_ascii_case(c))
                        .map_or_else(|| c.clone(), |h| h.name.clone())
                })
                .collect();
            out.push(Watch {
                table: t.name,
                columns,
                key: w.key.clone(),
            });
        }
        Ok(out)
    }

    /// The columns that identify a row: the primary key, else the first unique key whose
    /// columns are all NOT NULL. `None` for a table with neither.
    fn row_key(&mut self, table: &str) -> Result<Option<Vec<String>>, BackendError> {
        let rows: Vec<(String, String, String, String, i64)> = self
            .conn
            .exec(
                "SELECT TABLE_NAME, INDEX_NAME, COLUMN_NAME, NULLABLE, NON_UNIQUE FROM information_schema.STATISTICS \
                 WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? \
                 ORDER BY INDEX_NAME <> 'PRIMARY', INDEX_NAME, SEQ_IN_INDEX",
                (table,),
            )
            .map_err(sql_err)?;
        let mut keys: Vec<(String, Vec<String>, bool)> = Vec::new();
        for (t, index, column, nullable, non_unique) in rows {
            if t != table || non_unique != 0 {
                continue;
            }
            match keys.last_mut() {
                Some((name, cols, nulls)) if *name == index => {
                    cols.push(column);
                    *nulls |= nullable == "YES";
                }
                _ => keys.push((index, vec![column], nullable == "YES")),
            }
        }
        Ok(keys
            .into_iter()
            .find(|(_, _, nulls)| !nulls)
            .map(|(_, cols, _)| cols))
    }

    pub fn column_names(&mut self, table: &str) -> Result<Vec<String>, BackendError> {
        Ok(self
            .columns_of(table)?
            .into_iter()
            .map(|c| c.name)
            .collect())
    }

    fn columns_of(&mut self, table: &str) -> Result<Vec<SourceColumn>, BackendError> {
        let rows: Vec<(String, String, String, Option<String>)> = self
            .conn
            .exec(
                "SELECT TABLE_NAME, COLUMN_NAME, COLUMN_TYPE, CHARACTER_SET_NAME FROM information_schema.COLUMNS \
                 WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION",
                (table,),
            )
            .map_err(sql_err)?;
        Ok(rows
            .into_iter()
            .filter(|(t, ..)| t == table)
            .map(|(_, name, column_type, charset)| SourceColumn {
                name,
                column_type,
                charset,
            })
            .collect())
    }

    fn triggers(&mut self) -> Result<Vec<ExistingTrigger>, BackendError> {
        let rows: Vec<(String, String, String, String, String)> = self
            .conn
            .query(
                "SELECT TRIGGER_NAME, ACTION_TIMING, EVENT_MANIPULATION, EVENT_OBJECT_TABLE, ACTION_STATEMENT \
                 FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = DATABASE()",
            )
            .map_err(sql_err)?;
        Ok(rows
            .into_iter()
            .map(|(name, timing, event, table, body)| ExistingTrigger {
                name,
                timing,
                event,
                table,
                body,
            })
            .collect())
    }

    /// The names of the triggers on `table`.
    pub fn trigger_names(&mut self, table: &str) -> Result<Vec<String>, BackendError> {
        Ok(self
            .triggers()?
            .into_iter()
            .filter(|t| t.table == table)
            .map(|t| t.name)
            .collect())
    }

    pub fn installed(&mut self) -> Result<bool, BackendError> {
        self.table_exists("epidemic_watch")
    }

    /// The registry entry for a source table, if it is watched.
    pub fn watched(&mut self, table: &str) -> Result<Option<MySqlLogTable>, BackendError> {
        if !self.installed()? {
            return Ok(None);
        }
        let row: Option<(String, String, String)> = self
            .conn
            .exec_first(
                "SELECT source_table, log_table, columns FROM epidemic_watch WHERE source_table = ?",
                (table,),
            )
            .map_err(sql_err)?;
        row.map(|(s, l, c)| registry_entry(s, l, &c)).transpose()
    }

    pub fn all_watched(&mut self) -> Result<Vec<MySqlLogTable>, BackendError> {
        if !self.installed()? {
            return Ok(Vec::new());
        }
        let rows: Vec<(String, String, String)> = self
            .conn
            .query(
                "SELECT source_table, log_table, columns FROM epidemic_watch ORDER BY source_table",
            )
            .map_err(sql_err)?;
        rows.into_iter()
            .map(|(s, l, c)| registry_entry(s, l, &c))
            .collect()
    }

    /// Check that every watched column still exists in the source table; a dropped or
    /// renamed column makes the triggers fail every write to the table, so say so.
    pub fn check_columns(&mut self, log: &MySqlLogTable) -> Result<(), BackendError> {
        let have = self.columns_of(&log.source_table)?;
        if have.is_empty() {
            return Err(BackendError::Invalid(format!(
                "watched table {} no longer exists; run `epidemic uninstall` or restore it",
                log.source_table
            )));
        }
        for c in log.columns.iter() {
            if !have.iter().any(|h| h.name.eq_ignore_ascii_case(c)) {
                return Err(BackendError::Invalid(format!(
                    "watched column {c} no longer exists in table {} (dropped or renamed?); \
                     writes to the table fail until it is restored or the table is re-installed",
                    log.source_table
                )));
            }
        }
        Ok(())
    }

    /// Check the watches against the database and return the statements that bring the
    /// log tables and triggers up to date. Applies nothing.
    pub fn plan_install(&mut self, watches: &[Watch]) -> Result<Vec<String>, BackendError> {
        // Cheap checks first, so a bad name never reaches the server.
        for w in watches {
            ident::check("table", &w.table)?;
            // `epidemic bench` watches its own scratch table; nothing else of ours.
            let lower = w.table.to_ascii_lowercase();
            if lower.starts_with("epidemic_") && !lower.starts_with("epidemic_bench_") {
                return Err(BackendError::Invalid(format!(
                    "table {}: Epidemic cannot watch its own tables",
                    w.table
                )));
            }
            for c in &w.columns {
                ident::check("column", c)?;
            }
        }
        // Log rows must commit and roll back with the changes they record.
        if !self.engine_transactional("InnoDB")? {
            return Err(BackendError::Invalid(
                "InnoDB is not enabled on this server: Epidemic's log tables must be InnoDB".into(),
            ));
        }
        let installed = self.installed()?;
        let registry: HashMap<String, MySqlLogTable> = self
            .all_watched()?
            .into_iter()
            .map(|l| (l.source_table.clone(), l))
            .collect();
        let triggers = self.triggers()?;

        // Resolve every table and column before generating anything: MySQL DDL is not
        // transactional, so a bad watch found half-way would leave half an install.
        let mut resolved: Vec<ResolvedWatch> = Vec::new();
        for w in watches {
            let table = self.resolve_table(&w.table)?;
            let source = self.columns_of(&table)?;
            let find = |c: &str| {
                source
                    .iter()
                    .find(|s| s.name.eq_ignore_ascii_case(c))
                    .cloned()
            };
            let idx = match resolved.iter().position(|r| r.table == table) {
                Some(i) => i,
                None => {
                    // Columns already watched (maybe by another daemon's handlers) stay
                    // watched: install only ever adds, so two daemons with different
                    // handlers never undo each other's triggers.
                    let mut columns = Vec::new();
                    if let Some(reg) = registry.get(&table) {
                        for c in reg.columns.iter() {
                            columns.push(find(c).ok_or_else(|| {
                                BackendError::Invalid(format!(
                                    "watched column {c} no longer exists in table {table} (dropped or renamed?)"
                                ))
                            })?);
                        }
                    }
                    let key = self.row_key(&table)?;
                    resolved.push(ResolvedWatch {
                        table: table.clone(),
                        columns,
                        key,
                    });
                    resolved.len() - 1
                }
            };
            for c in &w.columns {
                let col = find(c).ok_or_else(|| {
                    BackendError::Invalid(format!("column {c} does not exist in table {table}"))
                })?;
                let r = &mut resolved[idx];
                if !r
                    .columns
                    .iter()
                    .any(|x| x.name.eq_ignore_ascii_case(&col.name))
                {
                    r.columns.push(col);
                }
            }
            if resolved[idx].columns.is_empty() {
                return Err(BackendError::Invalid(format!(
                    "table {table}: no columns to watch"
                )));
            }
            if !self.server.multiple_triggers() {
                for (suffix, event) in EVENTS {
                    let ours = trigger_name(&table, suffix);
                    if let Some(t) = triggers.iter().find(|t| {
                        t.table == table
                            && t.event == event
                            && t.timing == "AFTER"
                            && t.name != ours
                    }) {
                        return Err(BackendError::Invalid(format!(
                            "table {table} already has an AFTER {event} trigger ({}) and this server allows only one \
                             per table and event; merge it by hand or upgrade to MySQL 5.7.2+/MariaDB 10.2.3+",
                            t.name
                        )));
                    }
                }
            }
        }

        let mut plan = Vec::new();
        if !installed {
            plan.push(WATCH_DDL.to_owned());
        } else if !self
            .column_names("epidemic_watch")?
            .iter()
            .any(|c| c == "truncated_at")
        {
            // Installed by a version before TRUNCATE detection.
            plan.push(
                "ALTER TABLE `epidemic_watch` ADD COLUMN `table_id` BIGINT NULL DEFAULT NULL, \
                 ADD COLUMN `created` VARCHAR(32) CHARACTER SET ascii NULL DEFAULT NULL, \
                 ADD COLUMN `auto_increment` BIGINT UNSIGNED NULL DEFAULT NULL, \
                 ADD COLUMN `checked_at` VARCHAR(32) CHARACTER SET ascii NULL DEFAULT NULL, \
                 ADD COLUMN `truncated_at` VARCHAR(32) CHARACTER SET ascii NULL DEFAULT NULL"
                    .to_owned(),
            );
        }
        if !self.table_exists("epidemic_cursor")? {
            plan.push(CURSOR_DDL.to_owned());
        } else if !self
            .column_names("epidemic_cursor")?
            .iter()
            .any(|c| c == "evicted_at")
        {
            // Installed by a version before consumer eviction.
            plan.push(
                "ALTER TABLE `epidemic_cursor` ADD COLUMN `evicted_at` BIGINT NULL DEFAULT NULL"
                    .to_owned(),
            );
        }
        if !self.table_exists("epidemic_dead_letter")? {
            plan.push(DEAD_LETTER_DDL.to_owned());
        }
        if !self.table_exists("epidemic_daemon")? {
            plan.push(DAEMON_DDL.to_owned());
        }
        for r in &resolved {
            self.plan_table(r, registry.get(&r.table), &triggers, &mut plan)?;
        }
        // A cascade shape that cannot be captured refuses the whole install: nothing has
        // run yet, the plan is only returned whole.
        let cascades = self.plan_cascades(&resolved, &registry, &triggers, &plan)?;
        plan.extend(cascades);
        Ok(plan)
    }

    /// Every foreign key of the current database whose child is in it.
    pub fn foreign_keys(&mut self) -> Result<Vec<ForeignKey>, BackendError> {
        type Row = (
            String,
            String,
            String,
            String,
            String,
            String,
            String,
            String,
        );
        let rows: Vec<Row> = self
            .conn
            .query(
                "SELECT rc.CONSTRAINT_NAME, rc.TABLE_NAME, rc.REFERENCED_TABLE_NAME, k.REFERENCED_TABLE_SCHEMA, \
                 rc.UPDATE_RULE, rc.DELETE_RULE, k.COLUMN_NAME, k.REFERENCED_COLUMN_NAME \
                 FROM information_schema.REFERENTIAL_CONSTRAINTS rc \
                 JOIN information_schema.KEY_COLUMN_USAGE k ON k.CONSTRAINT_SCHEMA = rc.CONSTRAINT_SCHEMA \
                   AND k.TABLE_NAME = rc.TABLE_NAME AND k.CONSTRAINT_NAME = rc.CONSTRAINT_NAME \
                   AND k.REFERENCED_TABLE_NAME IS NOT NULL \
                 WHERE rc.CONSTRAINT_SCHEMA = DATABASE() \
                 ORDER BY rc.TABLE_NAME, rc.CONSTRAINT_NAME, k.ORDINAL_POSITION",
            )
            .map_err(sql_err)?;
        let db: Option<String> = self
            .conn
            .query_first("SELECT DATABASE()")
            .map_err(sql_err)?;
        let db = db.unwrap_or_default();
        let mut fks: Vec<ForeignKey> = Vec::new();
        for (name, child, parent, parent_db, upd, del, col, pcol) in rows {
            match fks.last_mut() {
                Some(f) if f.name == name && f.child == child => f.columns.push((col, pcol)),
                _ => fks.push(ForeignKey {
                    name,
                    child,
                    parent,
                    local: parent_db == db,
                    columns: vec![(col, pcol)],
                    on_delete: FkRule::parse(&del),
                    on_update: FkRule::parse(&upd),
                }),
            }
        }
        // Names are checked as identifiers where a capture uses them (`cascade.rs`), so an
        // unrelated table with an odd name does not stop an install.
        Ok(fks)
    }

    /// How cascaded rows reach the log on this server (see [`CascadeMode`]).
    pub fn cascade_mode(&mut self) -> CascadeMode {
        if !self.server.multiple_triggers() {
            return CascadeMode::Direct;
        }
        match self
            .conn
            .query_first::<Option<i64>, _>("SELECT @@innodb_autoinc_lock_mode")
        {
            Ok(Some(Some(0 | 1))) => CascadeMode::Staged,
            _ => CascadeMode::Direct,
        }
    }

    /// For `status`: the parents' cascade triggers a watched table needs, each with
    /// whether it is there and current (`Ok`), or why its cascades cannot be captured.
    pub fn cascade_triggers(
        &mut self,
        log: &MySqlLogTable,
        fks: &[ForeignKey],
        mode: CascadeMode,
    ) -> Result<Result<Vec<CascadeTrigger>, String>, BackendError> {
        let w = WatchedTable {
            table: &log.source_table,
            log_table: &log.log_table,
            columns: &log.columns,
        };
        let captures = match cascade::captures(&w, fks, self.now_expr()) {
            Ok(c) => c,
            Err(e) => return Ok(Err(e.to_string())),
        };
        let triggers = self.triggers()?;
        let pend = pend_table_name(&log.source_table);
        let mut out = Vec::new();
        for c in &captures {
            let mut wanted = vec![(Timing::Before, c.before(mode, &pend))];
            if mode == CascadeMode::Staged {
                let key = self.row_key(&c.parent)?;
                wanted.push((Timing::After, c.after(&pend, key.as_deref())));
            }
            for (timing, statement) in wanted {
                let name = cascade::trigger_name(&c.parent, c.event, timing);
                let here = triggers.iter().any(|t| {
                    t.name == name
                        && t.table == c.parent
                        && t.timing == timing.sql()
                        && t.body.contains(&statement)
                });
                out.push((c.parent.clone(), name, here));
            }
        }
        Ok(Ok(out))
    }

    /// The statements that bring the parents' cascade triggers and the pending tables up
    /// to date for every watched table (this install's and those already registered),
    /// including dropping ones no longer needed. `earlier` is the plan so far. See
    /// `cascade.rs`.
    fn plan_cascades(
        &mut self,
        resolved: &[ResolvedWatch],
        registry: &HashMap<String, MySqlLogTable>,
        triggers: &[ExistingTrigger],
        earlier: &[String],
    ) -> Result<Vec<String>, BackendError> {
        let fks = self.foreign_keys()?;
        let mut tables: Vec<(String, String, Vec<String>)> = resolved
            .iter()
            .map(|r| {
                (
                    r.table.clone(),
                    log_table_name(&r.table),
                    r.columns.iter().map(|c| c.name.clone()).collect(),
                )
            })
            .collect();
        for (name, reg) in registry {
            if !tables.iter().any(|(t, ..)| t == name) {
                tables.push((name.clone(), reg.log_table.clone(), reg.columns.to_vec()));
            }
        }
        tables.sort();
        let now = self.now_expr();
        let mode = self.cascade_mode();
        let mut all: Vec<CascadeCapture> = Vec::new();
        for (table, log_table, columns) in &tables {
            let w = WatchedTable {
                table,
                log_table,
                columns,
            };
            all.extend(cascade::captures(&w, &fks, now)?);
        }
        let mut plan = Vec::new();

        // Pending tables: the log table's exact shape (`CREATE TABLE ... LIKE`), made
        // again whenever the log table changes. Between statements they hold only rows
        // of parent rows an IGNORE statement skipped, which are garbage.
        for (table, log_table, _) in &tables {
            let pend = pend_table_name(table);
            let needed = mode == CascadeMode::Staged && all.iter().any(|c| c.watched == *table);
            let exists = self.table_exists(&pend)?;
            if !needed {
                if exists {
                    plan.push(format!("DROP TABLE {}", quote(&pend)));
                }
                continue;
            }
            let log_q = quote(log_table);
            let log_changes = earlier.iter().any(|s| {
                s.starts_with(&format!("ALTER TABLE {log_q}"))
                    || s.starts_with(&format!("CREATE TABLE {log_q}"))
            });
            let same_shape = exists && !log_changes && {
                let a = self.columns_of(&pend)?;
                let b = self.columns_of(log_table)?;
                a.len() == b.len()
                    && a.iter()
                        .zip(&b)
                        .all(|(x, y)| x.name == y.name && x.same_type(y))
            };
            if !same_shape {
                if exists {
                    plan.push(format!("DROP TABLE {}", quote(&pend)));
                }
                plan.push(format!("CREATE TABLE {} LIKE {log_q}", quote(&pend)));
            }
        }

        let mut parents: Vec<(String, ParentEvent)> =
            all.iter().map(|c| (c.parent.clone(), c.event)).collect();
        parents.sort_by(|a, b| (a.0.as_str(), a.1.sql()).cmp(&(b.0.as_str(), b.1.sql())));
        parents.dedup();
        let mut wanted_names: Vec<String> = Vec::new();
        for (parent, event) in &parents {
            let parent_table = self.catalog_table(parent)?;
            let mine: Vec<&CascadeCapture> = all
                .iter()
                .filter(|c| c.parent == *parent && c.event == *event)
                .collect();
            let mut bodies = vec![(
                Timing::Before,
                mine.iter()
                    .map(|c| c.before(mode, &pend_table_name(&c.watched)))
                    .collect::<Vec<_>>(),
            )];
            if mode == CascadeMode::Staged {
                let key = self.row_key(&parent_table.name)?;
                bodies.push((
                    Timing::After,
                    mine.iter()
                        .map(|c| c.after(&pend_table_name(&c.watched), key.as_deref()))
                        .collect(),
                ));
            }
            for (timing, statements) in bodies {
                let name = cascade::trigger_name(parent, *event, timing);
                wanted_names.push(name.clone());
                if !self.server.multiple_triggers() {
                    if let Some(t) = triggers.iter().find(|t| {
                        t.table == *parent
                            && t.event == event.sql()
                            && t.timing == timing.sql()
                            && t.name != name
                    }) {
                        return Err(BackendError::Invalid(format!(
                            "table {parent} already has a {} {} trigger ({}) and this server allows only one \
                             per table and event, so the foreign-key cascades into watched tables cannot be captured; \
                             merge it by hand or upgrade to MySQL 5.7.2+/MariaDB 10.2.3+",
                            timing.sql(),
                            event.sql(),
                            t.name
                        )));
                    }
                }
                let refs: Vec<&str> = statements.iter().map(String::as_str).collect();
                let body = cascade::body(&refs);
                let current = triggers.iter().any(|t| {
                    t.name == name
                        && t.table == *parent
                        && t.event == event.sql()
                        && t.timing == timing.sql()
                        && t.body == body
                });
                if current {
                    continue;
                }
                // As for the tables' own triggers: no write to the parent between the
                // DROP and the CREATE.
                plan.push(format!("LOCK TABLES {} WRITE", quote(&parent_table.name)));
                plan.push(format!("DROP TRIGGER IF EXISTS {}", quote(&name)));
                plan.push(format!(
                    "CREATE TRIGGER {} {} {} ON {} FOR EACH ROW {body}",
                    quote(&name),
                    timing.sql(),
                    event.sql(),
                    quote(parent)
                ));
                plan.push("UNLOCK TABLES".to_owned());
            }
        }
        // Cascade triggers no watched table needs any more (a foreign key dropped, the
        // mode changed).
        for t in triggers {
            let ours = cascade::KINDS.iter().any(|(e, timing)| {
                t.name == cascade::trigger_name(&t.table, *e, *timing) && t.timing == timing.sql()
            });
            if ours && !wanted_names.contains(&t.name) {
                plan.push(format!("DROP TRIGGER IF EXISTS {}", quote(&t.name)));
            }
        }
        Ok(plan)
    }

    fn plan_table(
        &mut self,
        r: &ResolvedWatch,
        registered: Option<&MySqlLogTable>,
        triggers: &[ExistingTrigger],
        plan: &mut Vec<String>,
    ) -> Result<(), BackendError> {
        let table = &r.table;
        let log = log_table_name(table);
        let log_q = quote(&log);
        let names: Vec<String> = r.columns.iter().map(|c| c.name.clone()).collect();

        // The registry row first: if a later statement fails, `uninstall` still knows
        // every object this install may have created. Readers fail (and retry) on the
        // missing log columns until the install is completed.
        let up_to_date =
            registered.is_some_and(|reg| reg.log_table == log && reg.columns[..] == names[..]);
        if !up_to_date {
            // With the table's CREATE_TIME and AUTO_INCREMENT as the first baseline of
            // TRUNCATE detection (`ops::check_truncation`).
            plan.push(format!(
                "INSERT INTO `epidemic_watch` (`source_table`, `log_table`, `columns`, `created`, `auto_increment`, `checked_at`) \
                 SELECT {}, {}, {}, CAST(`CREATE_TIME` AS CHAR), `AUTO_INCREMENT`, CAST(NOW() AS CHAR) \
                 FROM information_schema.TABLES WHERE `TABLE_SCHEMA` = DATABASE() AND `TABLE_NAME` = {} \
                 ON DUPLICATE KEY UPDATE `log_table` = VALUES(`log_table`), `columns` = VALUES(`columns`)",
                literal(table),
                literal(&log),
                literal(&names.join(",")),
                literal(table)
            ));
        }

        let wanted: Vec<(String, &SourceColumn)> = ["old", "new"]
            .iter()
            .flat_map(|p| r.columns.iter().map(move |c| (log_column(p, &c.name), c)))
            .collect();
        let existing = self.tables_named(&log)?.into_iter().find(|t| t.name == log);
        if let Some(existing) = existing {
            let have = self.columns_of(&log)?;
            let mut changes = Vec::new();
            // Converted by hand to another engine: its rows would no longer roll back
            // with the changes they record.
            if !existing
                .engine
                .as_deref()
                .is_some_and(|e| e.eq_ignore_ascii_case("InnoDB"))
            {
                changes.push("ENGINE=InnoDB".to_owned());
            }
            for (name, col) in &wanted {
                match have.iter().find(|h| h.name.eq_ignore_ascii_case(name)) {
                    None => changes.push(format!("ADD COLUMN {} {}", quote(name), col.log_type())),
                    // The source column's type changed (a longer VARCHAR, say): follow it.
                    Some(h) if !h.same_type(col) => {
                        changes.push(format!("MODIFY COLUMN {} {}", quote(name), col.log_type()))
                    }
                    Some(_) => {}
                }
            }
            if !changes.is_empty() {
                plan.push(format!(
                    "ALTER TABLE {log_q}\n    {}",
                    changes.join(",\n    ")
                ));
            }
        } else {
            let cols: Vec<String> = wanted
                .iter()
                .map(|(name, col)| format!("    {} {},\n", quote(name), col.log_type()))
                .collect();
            plan.push(format!(
                "CREATE TABLE {log_q} (\n    `id` BIGINT NOT NULL AUTO_INCREMENT,\n    `op` CHAR(1) CHARACTER SET ascii NOT NULL,\n    \
                 `changed_at` BIGINT NOT NULL COMMENT 'microseconds since the Unix epoch',\n{}    PRIMARY KEY (`id`)\n) \
                 ENGINE=InnoDB COMMENT={}",
                cols.concat(),
                literal(&format!("Epidemic: changes of {table}"))
            ));
        }

        let bodies = self.trigger_bodies(table, r.key.as_deref(), &log_q, &r.columns);
        let current = EVENTS.iter().zip(&bodies).all(|((suffix, event), body)| {
            let name = trigger_name(table, suffix);
            triggers.iter().any(|t| {
                t.name == name
                    && t.table == *table
                    && t.event == *event
                    && t.timing == "AFTER"
                    && t.body == *body
            })
        });
        if !current {
            // Between DROP TRIGGER and CREATE TRIGGER a write to the table would not be
            // captured. A WRITE lock on the table holds writers off for those few
            // milliseconds; DDL's implicit commits do not release table locks.
            plan.push(format!("LOCK TABLES {} WRITE", quote(table)));
            for (suffix, _) in EVENTS {
                plan.push(format!(
                    "DROP TRIGGER IF EXISTS {}",
                    quote(&trigger_name(table, suffix))
                ));
            }
            for ((suffix, event), body) in EVENTS.iter().zip(&bodies) {
                plan.push(format!(
                    "CREATE TRIGGER {} AFTER {event} ON {} FOR EACH ROW {body}",
                    quote(&trigger_name(table, suffix)),
                    quote(table)
                ));
            }
            plan.push("UNLOCK TABLES".to_owned());
        }
        Ok(())
    }

    /// The time a change was captured, in microseconds since the Unix epoch. Servers
    /// without fractional seconds (before MySQL 5.6.4) give whole seconds.
    fn now_expr(&self) -> &'static str {
        if self.server.fractional_seconds() {
            "TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6))"
        } else {
            "UNIX_TIMESTAMP() * 1000000"
        }
    }

    /// The bodies of the INSERT, UPDATE and DELETE triggers, exactly as the server
    /// reports them back in `information_schema.TRIGGERS.ACTION_STATEMENT`.
    ///
    /// MariaDB fires AFTER UPDATE also for a row that `UPDATE IGNORE` skipped over a
    /// duplicate key or a foreign-key error (the row keeps its old values). Where the table
    /// has a key that identifies a row, the UPDATE trigger therefore logs only when the
    /// row under the old key no longer holds the old values: after a real update it holds
    /// the new ones (some watched column differs) or, after a key change, the old key is
    /// empty (no other row can have moved there before this row's trigger ran). One
    /// primary-key lookup per logged update.
    fn trigger_bodies(
        &self,
        table: &str,
        key: Option<&[String]>,
        log_q: &str,
        columns: &[SourceColumn],
    ) -> [String; 3] {
        let now = self.now_expr();
        let list = |prefix: &str| -> String {
            columns
                .iter()
                .map(|c| quote(&log_column(prefix, &c.name)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let vals = |row: &str| -> String {
            columns
                .iter()
                .map(|c| format!("{row}.{}", quote(&c.name)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        // NULL-safe equality, on the bytes for character columns: under a
        // case-insensitive or PAD SPACE collation 'ann' = 'Ann ' holds, but a handler
        // that copies the value must still hear of the change.
        let same_as = |a: &str, b: &str| -> Vec<String> {
            columns
                .iter()
                .map(|c| {
                    let q = quote(&c.name);
                    if c.charset.is_some() {
                        format!("CAST({a}.{q} AS BINARY) <=> CAST({b}.{q} AS BINARY)")
                    } else {
                        format!("{a}.{q} <=> {b}.{q}")
                    }
                })
                .collect()
        };
        let same = same_as("OLD", "NEW");
        let mut changed = format!("NOT ({})", same.join(" AND "));
        if let Some(key) = key {
            let at_old_key: Vec<String> = key
                .iter()
                .map(|k| format!("`epidemic_row`.{} = OLD.{}", quote(k), quote(k)))
                .chain(same_as("`epidemic_row`", "OLD"))
                .collect();
            changed.push_str(&format!(
                "\n        AND NOT EXISTS (SELECT 1 FROM {} AS `epidemic_row` WHERE {})",
                quote(table),
                at_old_key.join(" AND ")
            ));
        }
        [
            format!(
                "BEGIN\n    INSERT INTO {log_q} (`op`, `changed_at`, {}) VALUES ('I', {now}, {});\nEND",
                list("new"),
                vals("NEW")
            ),
            format!(
                "BEGIN\n    IF {changed} THEN\n        INSERT INTO {log_q} (`op`, `changed_at`, {}, {}) VALUES ('U', {now}, {}, {});\n    END IF;\nEND",
                list("old"),
                list("new"),
                vals("OLD"),
                vals("NEW")
            ),
            format!(
                "BEGIN\n    INSERT INTO {log_q} (`op`, `changed_at`, {}) VALUES ('D', {now}, {});\nEND",
                list("old"),
                vals("OLD")
            ),
        ]
    }

    /// The statements that remove every object Epidemic created.
    pub fn plan_uninstall(&mut self) -> Result<Vec<String>, BackendError> {
        let mut plan = Vec::new();
        // The parents' cascade triggers first: they write into the log tables.
        for t in self.triggers()? {
            let ours = cascade::KINDS.iter().any(|(e, timing)| {
                t.name == cascade::trigger_name(&t.table, *e, *timing) && t.timing == timing.sql()
            });
            if ours {
                plan.push(format!("DROP TRIGGER IF EXISTS {}", quote(&t.name)));
            }
        }
        for log in self.all_watched()? {
            // Triggers first, so writes to the table never hit a missing log table.
            for (suffix, _) in EVENTS {
                plan.push(format!(
                    "DROP TRIGGER IF EXISTS {}",
                    quote(&trigger_name(&log.source_table, suffix))
                ));
            }
            plan.push(format!("DROP TABLE IF EXISTS {}", quote(&log.log_table)));
            let pend = pend_table_name(&log.source_table);
            if self.table_exists(&pend)? {
                plan.push(format!("DROP TABLE {}", quote(&pend)));
            }
        }
        for t in [
            "epidemic_daemon",
            "epidemic_dead_letter",
            "epidemic_cursor",
            "epidemic_watch",
        ] {
            if self.table_exists(t)? {
                plan.push(format!("DROP TABLE {}", quote(t)));
            }
        }
        Ok(plan)
    }
}

fn registry_entry(
    source: String,
    log: String,
    columns: &str,
) -> Result<MySqlLogTable, BackendError> {
    let columns: Vec<String> = columns.split(',').map(str::to_owned).collect();
    // The row is ours, but a damaged one must not become SQL.
    ident::check("table", &source)
        .and_then(|()| columns.iter().try_for_each(|c| ident::check("column", c)))
        .map_err(|e| {
            BackendError::Other(format!("epidemic_watch row for {source:?} is damaged: {e}"))
        })?;
    if !log.starts_with("epidemic_log_") || log.contains('`') {
        return Err(BackendError::Other(format!(
            "epidemic_watch row for {source}: unexpected log table {log:?}"
        )));
    }
    Ok(MySqlLogTable::new(source, log, columns))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_doubles_backticks() {
        assert_eq!(quote("order"), "`order`");
        assert_eq!(quote("a`b"), "`a``b`");
        assert_eq!(literal("it's"), "'it''s'");
    }

    #[test]
    fn long_names_fit_and_stay_distinct() {
        let a = "a".repeat(63);
        let b = format!("{}b", "a".repeat(62));
        let la = log_table_name(&a);
        let lb = log_table_name(&b);
        assert_eq!(la.len(), 64);
        assert!(la.starts_with("epidemic_log_aaa"));
        assert_ne!(la, lb);
        assert_eq!(la, log_table_name(&a), "stable");
        assert_eq!(log_table_name("users"), "epidemic_log_users");
        assert_eq!(trigger_name("users", "update"), "epidemic_users_update");
        assert!(trigger_name(&a, "delete").len() <= 64);
        assert!(log_column("old", &a).len() <= 64);
    }

    #[test]
    fn damaged_registry_rows_are_refused() {
        assert!(registry_entry("users".into(), "epidemic_log_users".into(), "a,b").is_ok());
        assert!(registry_entry("users".into(), "epidemic_log_users".into(), "a,b`; DROP").is_err());
        assert!(registry_entry("users".into(), "users".into(), "a").is_err());
    }
}
