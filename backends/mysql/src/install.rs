//! Planning and applying install and uninstall, and Epidemic's bookkeeping tables,
//! among them the registry of watched tables that every other role reads.
//!
//! Objects (all named `epidemic_*`, in the URL's database):
//! - `epidemic_watch`, the registry: one row per watched table: its log table, the
//!   captured columns and which of them are the key, the log's identity (below), and
//!   the marks TRUNCATE detection compares (`truncation.rs`); read through `registry.rs`.
//! - `epidemic_cursor`: one row per (daemon, handler, table): high-water mark and gaps.
//! - `epidemic_daemon`: one row per daemon name: the lease of the live daemon using it.
//! - `epidemic_dead_letter`: changes handlers gave up on.
//! - `epidemic_backfill`: one row per (daemon, handler, table) backfill: its state and
//!   its progress as JSON (`backfill.rs`).
//! - `epidemic_watermark`: one row per table a backfill wrote a watermark into: how many
//!   (`snapshot.rs` says why the watermark's transaction writes it first).
//! - per watched table, its log table and triggers (`capture.rs`), and the parents'
//!   cascade triggers and pending tables (`cascade.rs`).
//!
//! Checked before anything is generated: every name is an identifier, the table exists
//! (its catalog spelling is used everywhere), it is a base table, its engine is
//! transactional, it has a key (its primary key or the configured columns, which must
//! exist), and every cascade into it can be captured. MySQL DDL is not transactional,
//! so [`plan_install`] checks everything before it returns a statement, and `install`
//! runs exactly the statements it returned. Log and bookkeeping tables are always
//! `ENGINE=InnoDB`; the servers' default `sql_mode` has `NO_ENGINE_SUBSTITUTION`, so a
//! server without InnoDB fails the install instead of substituting another engine.
//!
//! Install only adds: columns already captured stay captured, so two daemons with
//! different handlers never undo each other's triggers. The key is the last install's
//! (two daemons configured with different keys for one table take turns); a running
//! reader keeps the key it read with its cursors until it reads them again.
//!
//! # The log's identity
//!
//! Each registry row holds `log_identity`, a random token the database makes
//! (`MD5(CONCAT(UUID(), RAND()))`, which MySQL 5.0 has) whenever install creates the log
//! table. A change's stable id is that token and its log id, so it is never reused: not
//! after `uninstall` + `install` (a new registry row), not after the log table was
//! dropped by hand and install made it again. In the statement that makes a new token,
//! install also moves every cursor of the table back to the new log's start: the new
//! log's ids start again at 1, and a cursor of the old log would skip them. Readers
//! notice a token that is not their cursors' (`reader.rs`) and reload their cursors.
//! The AUTO_INCREMENT of a log that stays never goes back (`prune.rs`).

use std::collections::HashMap;

use epidemic_plugin_sdk::backend::BackendError;
use epidemic_plugin_sdk::backend::Watch;
use epidemic_plugin_sdk::ident;
use mysql::prelude::Queryable;
use mysql::Conn;

use crate::capture::{self, literal, log_table_name, pend_table_name, quote};
use crate::cascade;
use crate::catalog::{ExistingTrigger, MySqlCatalog, SourceColumn};
use crate::conn::ServerInfo;
use crate::error::{sql_err, stmt_err};
use crate::registry::{all_watched, MySqlLogTable};

const WATCH_DDL: &str = "CREATE TABLE IF NOT EXISTS `epidemic_watch` (
    `source_table` VARCHAR(64) CHARACTER SET utf8 COLLATE utf8_bin NOT NULL,
    `log_table` VARCHAR(64) CHARACTER SET utf8 COLLATE utf8_bin NOT NULL,
    `columns` TEXT CHARACTER SET utf8 NOT NULL COMMENT 'captured columns (the key and the watched ones), comma-separated',
    `key_columns` TEXT CHARACTER SET utf8 NULL COMMENT 'the key columns among them, comma-separated',
    `log_identity` VARCHAR(32) CHARACTER SET ascii NULL DEFAULT NULL COMMENT 'random, made when the log table was created: stable change ids are log_identity-id',
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

/// Backfills and their progress (`backfill.rs`). The progress is the SDK's
/// `BackfillProgress` as JSON, stored as bytes like the dead letters' changes: a text key
/// in `last_key` may hold 4-byte characters, which MySQL 5.0's `utf8` cannot.
const BACKFILL_DDL: &str = "CREATE TABLE IF NOT EXISTS `epidemic_backfill` (
    `daemon` VARCHAR(128) CHARACTER SET utf8 COLLATE utf8_bin NOT NULL,
    `handler` VARCHAR(128) CHARACTER SET utf8 COLLATE utf8_bin NOT NULL,
    `source_table` VARCHAR(64) CHARACTER SET utf8 COLLATE utf8_bin NOT NULL,
    `state` VARCHAR(16) CHARACTER SET ascii NOT NULL COMMENT 'requested, running or done',
    `progress` MEDIUMBLOB NOT NULL COMMENT 'the progress as JSON (UTF-8): last key done, rows done, times',
    `requested_at` BIGINT NOT NULL COMMENT 'microseconds since the Unix epoch: which request this row is',
    `updated_at` BIGINT NOT NULL COMMENT 'microseconds since the Unix epoch, by the server clock',
    PRIMARY KEY (`daemon`, `handler`, `source_table`)
) ENGINE=InnoDB COMMENT='Epidemic: backfills (every row of a table to one consumer) and their progress'";

/// How many watermarks each table's log got. A watermark's transaction updates its row
/// before it takes its log id, so it is a writer in INNODB_TRX by then (`snapshot.rs`).
const WATERMARK_DDL: &str = "CREATE TABLE IF NOT EXISTS `epidemic_watermark` (
    `source_table` VARCHAR(64) CHARACTER SET utf8 COLLATE utf8_bin NOT NULL,
    `written` BIGINT NOT NULL COMMENT 'watermarks written into the table''s log',
    PRIMARY KEY (`source_table`)
) ENGINE=InnoDB COMMENT='Epidemic: backfill watermarks written per table'";

/// The token a new log gets: random, made by the database (MySQL 5.0 has both).
const NEW_IDENTITY: &str = "MD5(CONCAT(UUID(), RAND()))";

/// Longest daemon or handler name `epidemic_cursor` holds.
pub(crate) const MAX_CONSUMER_NAME: usize = 128;

/// One watch after validation: the table's catalog name, what to capture, its key.
struct ResolvedWatch {
    table: String,
    /// Captured columns: those already captured, the key, the watched ones.
    columns: Vec<SourceColumn>,
    key: Vec<String>,
    /// A key that identifies one row for certain, for the UPDATE trigger's check.
    unique_key: Option<Vec<String>>,
}

/// Check the watches against the database and return the statements that bring the
/// log tables, triggers and bookkeeping tables up to date. Applies nothing.
pub(crate) fn plan_install(
    conn: &mut Conn,
    server: ServerInfo,
    watches: &[Watch],
) -> Result<Vec<String>, BackendError> {
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
        for c in w.columns.iter().chain(&w.key) {
            ident::check("column", c)?;
        }
    }
    let mut catalog = MySqlCatalog::new(conn);
    // Log rows must commit and roll back with the changes they record.
    if !catalog.engine_transactional("InnoDB")? {
        return Err(BackendError::Invalid(
            "InnoDB is not enabled on this server: Epidemic's log tables must be InnoDB".into(),
        ));
    }
    let triggers = catalog.triggers()?;
    let registry: HashMap<String, MySqlLogTable> = all_watched(conn)?
        .into_iter()
        .map(|l| (l.source_table.clone(), l))
        .collect();
    let resolved = resolve_watches(conn, server, watches, &registry, &triggers)?;

    let mut plan = plan_bookkeeping(conn)?;
    for r in &resolved {
        plan_table(
            conn,
            server,
            r,
            registry.get(&r.table),
            &triggers,
            &mut plan,
        )?;
    }
    // A cascade shape that cannot be captured refuses the whole install: nothing has
    // run yet, the plan is only returned whole.
    let mut tables: Vec<cascade::WatchedLog> = resolved
        .iter()
        .map(|r| cascade::WatchedLog {
            table: r.table.clone(),
            log_table: log_table_name(&r.table),
            columns: r.columns.iter().map(|c| c.name.clone()).collect(),
        })
        .collect();
    for (name, reg) in &registry {
        if !tables.iter().any(|t| t.table == *name) {
            tables.push(cascade::WatchedLog {
                table: name.clone(),
                log_table: reg.log_table.clone(),
                columns: reg.columns.to_vec(),
            });
        }
    }
    let cascades = cascade::plan(conn, server, tables, &triggers, &plan)?;
    plan.extend(cascades);
    Ok(plan)
}

/// Resolve every table, key and column before generating anything: MySQL DDL is not
/// transactional, so a bad watch found half-way would leave half an install.
fn resolve_watches(
    conn: &mut Conn,
    server: ServerInfo,
    watches: &[Watch],
    registry: &HashMap<String, MySqlLogTable>,
    triggers: &[ExistingTrigger],
) -> Result<Vec<ResolvedWatch>, BackendError> {
    let mut catalog = MySqlCatalog::new(conn);
    let mut resolved: Vec<ResolvedWatch> = Vec::new();
    for w in watches {
        let table = catalog.resolve_table(&w.table)?;
        let source = catalog.columns_of(&table)?;
        let find = |c: &str| {
            source
                .iter()
                .find(|s| s.name.eq_ignore_ascii_case(c))
                .cloned()
        };
        let idx = match resolved.iter().position(|r| r.table == table) {
            Some(i) => i,
            None => {
                // Columns already captured (maybe for another daemon's handlers) stay
                // captured: install only ever adds.
                let mut columns = Vec::new();
                if let Some(reg) = registry.get(&table) {
                    for c in reg.columns.iter() {
                        columns.push(find(c).ok_or_else(|| {
                            BackendError::Invalid(format!(
                                "captured column {c} no longer exists in table {table} (dropped or renamed?)"
                            ))
                        })?);
                    }
                }
                let key = catalog.key_of(&table, &w.key)?;
                // A key from the catalog becomes SQL and registry text like a watched column.
                for k in &key {
                    ident::check("column", k)?;
                }
                resolved.push(ResolvedWatch {
                    table: table.clone(),
                    columns,
                    unique_key: catalog.unique_row_key(&table)?,
                    key,
                });
                resolved.len() - 1
            }
        };
        let r = &mut resolved[idx];
        if r.columns.is_empty() && w.columns.is_empty() {
            return Err(BackendError::Invalid(format!(
                "table {table}: no columns to watch"
            )));
        }
        for c in r.key.clone().iter().chain(&w.columns) {
            let col = find(c).ok_or_else(|| {
                BackendError::Invalid(format!("column {c} does not exist in table {table}"))
            })?;
            if !r.columns.iter().any(|x| x.name == col.name) {
                r.columns.push(col);
            }
        }
        if !server.multiple_triggers() {
            for (suffix, event) in capture::EVENTS {
                let ours = capture::trigger_name(&table, suffix);
                if let Some(t) = triggers.iter().find(|t| {
                    t.table == table && t.event == event && t.timing == "AFTER" && t.name != ours
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
    Ok(resolved)
}

/// The bookkeeping tables, created or brought up to date from an older version.
fn plan_bookkeeping(conn: &mut Conn) -> Result<Vec<String>, BackendError> {
    let mut catalog = MySqlCatalog::new(conn);
    let mut plan = Vec::new();
    if !catalog.table_exists("epidemic_watch")? {
        plan.push(WATCH_DDL.to_owned());
    } else {
        let have = catalog.column_names("epidemic_watch")?;
        let mut add = Vec::new();
        if !have.iter().any(|c| c == "truncated_at") {
            // Installed by a version before TRUNCATE detection.
            add.extend([
                "ADD COLUMN `table_id` BIGINT NULL DEFAULT NULL",
                "ADD COLUMN `created` VARCHAR(32) CHARACTER SET ascii NULL DEFAULT NULL",
                "ADD COLUMN `auto_increment` BIGINT UNSIGNED NULL DEFAULT NULL",
                "ADD COLUMN `checked_at` VARCHAR(32) CHARACTER SET ascii NULL DEFAULT NULL",
                "ADD COLUMN `truncated_at` VARCHAR(32) CHARACTER SET ascii NULL DEFAULT NULL",
            ]);
        }
        if !have.iter().any(|c| c == "log_identity") {
            // Installed by a version before keys and stable ids.
            add.extend([
                "ADD COLUMN `key_columns` TEXT CHARACTER SET utf8 NULL",
                "ADD COLUMN `log_identity` VARCHAR(32) CHARACTER SET ascii NULL DEFAULT NULL",
            ]);
        }
        if !add.is_empty() {
            plan.push(format!("ALTER TABLE `epidemic_watch` {}", add.join(", ")));
        }
    }
    if !catalog.table_exists("epidemic_cursor")? {
        plan.push(CURSOR_DDL.to_owned());
    } else if !catalog
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
    if !catalog.table_exists("epidemic_dead_letter")? {
        plan.push(DEAD_LETTER_DDL.to_owned());
    }
    if !catalog.table_exists("epidemic_daemon")? {
        plan.push(DAEMON_DDL.to_owned());
    }
    if !catalog.table_exists("epidemic_backfill")? {
        plan.push(BACKFILL_DDL.to_owned());
    }
    if !catalog.table_exists("epidemic_watermark")? {
        plan.push(WATERMARK_DDL.to_owned());
    }
    Ok(plan)
}

fn plan_table(
    conn: &mut Conn,
    server: ServerInfo,
    r: &ResolvedWatch,
    registered: Option<&MySqlLogTable>,
    triggers: &[ExistingTrigger],
    plan: &mut Vec<String>,
) -> Result<(), BackendError> {
    let table = &r.table;
    let log = log_table_name(table);
    let names: Vec<String> = r.columns.iter().map(|c| c.name.clone()).collect();
    let t = literal(table);

    // The registry row first: if a later statement fails, `uninstall` still knows
    // every object this install may have created. Readers fail (and retry) on the
    // missing log columns until the install is completed.
    let up_to_date = registered.is_some_and(|reg| {
        reg.log_table == log && reg.columns[..] == names[..] && reg.key[..] == r.key[..]
    });
    if !up_to_date {
        // With the table's CREATE_TIME and AUTO_INCREMENT as the first baseline of
        // TRUNCATE detection (`truncation.rs`).
        plan.push(format!(
            "INSERT INTO `epidemic_watch` (`source_table`, `log_table`, `columns`, `key_columns`, `created`, `auto_increment`, `checked_at`) \
             SELECT {t}, {}, {}, {}, CAST(`CREATE_TIME` AS CHAR), `AUTO_INCREMENT`, CAST(NOW() AS CHAR) \
             FROM information_schema.TABLES WHERE `TABLE_SCHEMA` = DATABASE() AND `TABLE_NAME` = {t} \
             ON DUPLICATE KEY UPDATE `log_table` = VALUES(`log_table`), `columns` = VALUES(`columns`), \
             `key_columns` = VALUES(`key_columns`)",
            literal(&log),
            literal(&names.join(",")),
            literal(&r.key.join(",")),
        ));
    }

    let mut catalog = MySqlCatalog::new(conn);
    let existing = catalog
        .tables_named(&log)?
        .into_iter()
        .find(|x| x.name == log);
    let have = match &existing {
        Some(_) => catalog.columns_of(&log)?,
        None => Vec::new(),
    };
    if existing.is_none() {
        // A new log: a new identity, and, in the same statement, every cursor of the
        // table back to the start (see the module docs).
        plan.push(format!(
            "UPDATE `epidemic_watch` AS `w` LEFT JOIN `epidemic_cursor` AS `c` ON `c`.`source_table` = `w`.`source_table` \
             SET `w`.`log_identity` = {NEW_IDENTITY}, `c`.`high_water` = 0, `c`.`gaps` = '' \
             WHERE `w`.`source_table` = {t}"
        ));
    } else if registered.is_none_or(|reg| reg.identity.is_none()) {
        // A log made by a version before identities (or a registry row deleted by hand):
        // an identity it has never had.
        plan.push(format!(
            "UPDATE `epidemic_watch` SET `log_identity` = {NEW_IDENTITY} \
             WHERE `source_table` = {t} AND `log_identity` IS NULL"
        ));
    }
    if let Some(stmt) =
        capture::plan_log_table(table, &r.columns, existing.as_ref().map(|e| (e, &have[..])))
    {
        plan.push(stmt);
    }
    let bodies = capture::trigger_bodies(table, r.unique_key.as_deref(), &r.columns, server);
    plan.extend(capture::plan_triggers(table, &bodies, triggers));
    Ok(())
}

/// The statements that remove every object Epidemic created.
pub(crate) fn plan_uninstall(conn: &mut Conn) -> Result<Vec<String>, BackendError> {
    let mut plan = Vec::new();
    // The parents' cascade triggers first: they write into the log tables.
    let triggers = MySqlCatalog::new(conn).triggers()?;
    for t in &triggers {
        if cascade::is_cascade_trigger(t) {
            plan.push(format!("DROP TRIGGER IF EXISTS {}", quote(&t.name)));
        }
    }
    for log in all_watched(conn)? {
        // Triggers first, so writes to the table never hit a missing log table.
        plan.extend(capture::drop_triggers(&log.source_table));
        plan.push(format!("DROP TABLE IF EXISTS {}", quote(&log.log_table)));
        let pend = pend_table_name(&log.source_table);
        if MySqlCatalog::new(conn).table_exists(&pend)? {
            plan.push(format!("DROP TABLE {}", quote(&pend)));
        }
    }
    for t in [
        "epidemic_watermark",
        "epidemic_backfill",
        "epidemic_daemon",
        "epidemic_dead_letter",
        "epidemic_cursor",
        "epidemic_watch",
    ] {
        if MySqlCatalog::new(conn).table_exists(t)? {
            plan.push(format!("DROP TABLE {}", quote(t)));
        }
    }
    Ok(plan)
}

/// Run a plan's statements one by one (DDL cannot be prepared, and MySQL DDL commits
/// each statement anyway), holding an advisory lock so two daemons installing at once
/// do not interleave their plans. `make_plan` runs under the lock.
pub(crate) fn apply(
    conn: &mut Conn,
    make_plan: impl FnOnce(&mut Conn) -> Result<Vec<String>, BackendError>,
) -> Result<Vec<String>, BackendError> {
    const LOCK_NAME: &str = "LEFT(CONCAT('epidemic_install:', DATABASE()), 64)";
    let got: Option<Option<i64>> = conn
        .query_first(format!("SELECT GET_LOCK({LOCK_NAME}, 60)"))
        .map_err(sql_err)?;
    if got.flatten() != Some(1) {
        return Err(BackendError::Other(
            "another epidemic install or uninstall has held the lock for 60 s; try again".into(),
        ));
    }
    let result = make_plan(conn).and_then(|plan| {
        for stmt in &plan {
            if let Err(e) = conn.query_drop(stmt) {
                // A failed statement between LOCK TABLES and UNLOCK TABLES must not
                // leave the user's table locked for as long as this connection lives.
                let _ = conn.query_drop("UNLOCK TABLES");
                return Err(stmt_err(e, stmt));
            }
        }
        Ok(plan)
    });
    let _ = conn.query_drop(format!("DO RELEASE_LOCK({LOCK_NAME})"));
    result
}
