//! `epidemic status` for SQLite: per watched table its triggers and drift, per consumer
//! its position, backlog and dead letters. Read-only, like every status.

use epidemic_plugin_sdk::backend::kit;
use epidemic_plugin_sdk::backend::{BackendError, ConsumerStatus, Status, TableStatus};
use epidemic_plugin_sdk::ops::drift;
use rusqlite::Connection;

use crate::capture::{last_id, trigger_name, SqliteLogTable, TRIGGERS};
use crate::catalog::{quote, table_columns, table_exists};
use crate::error::sql_err;
use crate::install::{all_watched, installed, stale_triggers};
use crate::replace::ReplaceKeys;

pub(crate) fn status(conn: &Connection) -> Result<Status, BackendError> {
    let mut status = Status {
        backend: "sqlite".into(),
        ..Status::default()
    };
    if !installed(conn)? {
        return Ok(status);
    }
    let watched = all_watched(conn)?;
    let now = kit::now_us();
    for log in &watched {
        let table = table_status(conn, log, &mut status.warnings)?;
        status.tables.push(table);
    }
    // One row per (consumer, table); fold into one status per consumer.
    let mut stmt = conn
        .prepare(
            "SELECT c.daemon, c.handler, c.source_table, c.last_id, c.last_seen, c.evicted_at IS NOT NULL,
                    (SELECT count(*) FROM epidemic_dead_letter d WHERE d.daemon = c.daemon AND d.handler = c.handler)
             FROM epidemic_cursor c ORDER BY c.daemon, c.handler, c.source_table",
        )
        .map_err(sql_err)?;
    let rows: Vec<(String, String, String, i64, i64, bool, i64)> = stmt
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
            ))
        })
        .map_err(sql_err)?
        .collect::<Result<_, _>>()
        .map_err(sql_err)?;
    for (daemon, handler, table, last_id, last_seen, evicted, dead) in rows {
        let (backlog, oldest): (i64, Option<i64>) =
            match watched.iter().find(|w| w.source_table == table) {
                Some(log) => conn
                    .query_row(
                        &format!(
                            "SELECT count(*), min(changed_at) FROM {} WHERE id > ?1",
                            quote(&log.log_table)
                        ),
                        [last_id],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .map_err(sql_err)?,
                None => (0, None),
            };
        let age = oldest.map(|t| ((now - t).max(0) as f64) / 1e6);
        match status
            .consumers
            .iter_mut()
            .find(|c| c.daemon == daemon && c.handler == handler)
        {
            Some(c) => {
                c.tables.push(table.clone());
                c.position.push_str(&format!(", {table}:{last_id}"));
                c.backlog += backlog;
                c.oldest_pending_age_s = match (c.oldest_pending_age_s, age) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    (a, b) => a.or(b),
                };
                c.last_seen_us = c.last_seen_us.max(last_seen);
                c.evicted |= evicted;
            }
            None => status.consumers.push(ConsumerStatus {
                daemon,
                handler,
                position: format!("{table}:{last_id}"),
                tables: vec![table],
                backlog,
                oldest_pending_age_s: age,
                dead_letters: dead,
                last_seen_us: last_seen,
                evicted,
            }),
        }
    }
    Ok(status)
}

/// One watched table's triggers and drift; warnings (what install cannot fix) go to
/// `warnings`.
fn table_status(
    conn: &Connection,
    log: &SqliteLogTable,
    warnings: &mut Vec<String>,
) -> Result<TableStatus, BackendError> {
    let table = &log.source_table;
    let mut problems = Vec::new();
    let mut triggers = Vec::new();
    for (suffix, op) in TRIGGERS.iter().copied() {
        let name = trigger_name(table, suffix);
        let present: bool = conn
            .query_row(
                "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'trigger' AND name = ?1",
                [&name],
                |r| r.get(0),
            )
            .map_err(sql_err)?;
        if !present {
            problems.push(drift::trigger_missing(&name, table, op));
        }
        triggers.push((name, present));
    }
    if table_exists(conn, table)?.is_none() {
        problems.insert(0, drift::table_gone(table));
    } else {
        for index in ReplaceKeys::read(conn, table)?.unmatched {
            warnings.push(format!(
                "table {table}: unique index {index} is on an expression, so a REPLACE or UPDATE OR REPLACE that removes a row because of it is not delivered as a DELETE; make it a plain column index, or write with plain INSERT/UPDATE"
            ));
        }
        match stale_triggers(conn, log) {
            Ok(stale) if stale.is_empty() => {}
            Ok(stale) => problems.push(format!(
                "triggers {} on {table} are out of date (a unique key or index, or a column name, changed since install): a REPLACE through a new key removes rows without delivering their DELETE; run `epidemic install` (a starting daemon does)",
                stale.join(", "),
            )),
            Err(e) => problems.push(format!("triggers on {table} cannot be checked: {e}")),
        }
        // SQLite refuses to drop a column a trigger names and renames it inside the
        // triggers: a column gone from the catalog was renamed, and its values are still
        // captured under the old name.
        let have = table_columns(conn, table)?;
        for c in log.columns.iter() {
            if !have.iter().any(|h| h.eq_ignore_ascii_case(c)) {
                let consequence = if log.key().contains(c) {
                    "it is part of the key every change carries, which still names it so"
                } else {
                    "handlers that need it cannot get it"
                };
                problems.push(drift::column_gone(c, table, consequence));
            }
        }
    }
    if log.identity.is_none() {
        problems.push(format!(
            "log {} was installed by an older Epidemic (no identity for stable ids, no keys); run `epidemic install` (a starting daemon does)",
            log.log_table
        ));
    }
    // Install puts the sequence back above both (see `install`).
    let (cursor_max, pruned): (Option<i64>, i64) = conn
        .query_row(
            &format!(
                "SELECT (SELECT max(last_id) FROM epidemic_cursor WHERE source_table = ?1 COLLATE NOCASE), {}",
                if table_columns(conn, "epidemic_watch")?.iter().any(|c| c == "pruned_upto") {
                    "(SELECT COALESCE(max(pruned_upto), 0) FROM epidemic_watch WHERE source_table = ?1)"
                } else {
                    "0"
                }
            ),
            [table],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map_err(sql_err)?;
    let handed_out = last_id(conn, &log.log_table)?;
    if let Some(cursor) = cursor_max.filter(|c| *c > handed_out) {
        problems.push(format!(
            "log {} has handed out ids only up to {handed_out} but a consumer is at {cursor}: it was emptied or restored without sqlite_sequence, so changes written now get ids consumers have passed and are skipped; run `epidemic install` (a starting daemon does) before the table is written to",
            log.log_table
        ));
    } else if pruned > handed_out {
        problems.push(format!(
            "log {} has handed out ids only up to {handed_out} but ids up to {pruned} were pruned: its sqlite_sequence row was lost, so new changes may get the ids of old ones; run `epidemic install` (a starting daemon does)",
            log.log_table
        ));
    }
    let log_rows: i64 = conn
        .query_row(
            &format!("SELECT count(*) FROM {}", quote(&log.log_table)),
            [],
            |r| r.get(0),
        )
        .map_err(sql_err)?;
    Ok(TableStatus {
        table: table.clone(),
        log_table: log.log_table.clone(),
        columns: log.columns.to_vec(),
        log_rows,
        triggers,
        problems,
    })
}
