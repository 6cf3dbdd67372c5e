//! `epidemic status` for MySQL: per watched table its triggers (its own and the parents'
//! cascade triggers), drift (a table, captured column or key column gone, a trigger
//! missing, an engine converted, a TRUNCATE noticed), log size; per consumer its
//! position, backlog and dead letters; and the warnings that say what the reading rule
//! cannot see on this server.

use epidemic_plugin_sdk::backend::{kit, BackendError, ConsumerStatus, Status, TableStatus};
use epidemic_plugin_sdk::ops::drift;
use epidemic_plugin_sdk::Op;
use mysql::prelude::Queryable;
use mysql::Conn;

use crate::capture::{quote, trigger_name, EVENTS};
use crate::cascade::{self, CascadeMode, WatchedLog};
use crate::catalog::MySqlCatalog;
use crate::conn::ServerInfo;
use crate::error::sql_err;
use crate::gaps::{GapSeen, GapSet};
use crate::reader::gap_condition;
use crate::registry::{self, MySqlLogTable};
use crate::truncation;

/// daemon, handler, source_table, high_water, gaps, last_seen, evicted_at.
type CursorRow = (String, String, String, i64, String, i64, Option<i64>);

/// The status report; `warnings` are this connection's reading warnings (see
/// [`reading_warnings`]).
pub(crate) fn status(
    conn: &mut Conn,
    server: ServerInfo,
    max_gap_ranges: usize,
    warnings: &[String],
) -> Result<Status, BackendError> {
    let mut status = Status {
        backend: "mysql".into(),
        ..Status::default()
    };
    // A user that may only read (monitoring) cannot store the marks; what earlier checks
    // stored is still reported below.
    let _ = truncation::check_truncation(conn);
    if registry::installed(conn)? {
        let watched = registry::all_watched(conn)?;
        table_status(conn, server, &watched, &mut status)?;
        consumer_status(conn, &watched, &mut status)?;
    }
    status
        .warnings
        .extend(reading_warnings(conn, max_gap_ranges, warnings)?);
    Ok(status)
}

fn table_status(
    conn: &mut Conn,
    server: ServerInfo,
    watched: &[MySqlLogTable],
    status: &mut Status,
) -> Result<(), BackendError> {
    let truncations = truncation::truncations(conn)?;
    let fks = MySqlCatalog::new(conn).foreign_keys()?;
    let mode = cascade::mode(conn, server);
    for log in watched {
        let mut catalog = MySqlCatalog::new(conn);
        let mut problems = Vec::new();
        let exists = catalog.table_exists(&log.source_table)?;
        let present = catalog.trigger_names(&log.source_table)?;
        let mut triggers = Vec::new();
        for ((suffix, _), op) in EVENTS.iter().zip([Op::Insert, Op::Update, Op::Delete]) {
            let name = trigger_name(&log.source_table, suffix);
            let here = present.contains(&name);
            if !here && exists {
                problems.push(drift::trigger_missing(&name, &log.source_table, op));
            }
            triggers.push((name, here));
        }
        if !exists {
            problems.insert(0, drift::table_gone(&log.source_table));
        } else {
            let have = catalog.column_names(&log.source_table)?;
            for c in log.columns.iter() {
                if !have.iter().any(|h| h.eq_ignore_ascii_case(c)) {
                    let consequence = if log.key.contains(c) {
                        "it is part of the row's key, and the triggers fail every write to the table"
                    } else {
                        "the triggers fail every write to the table"
                    };
                    problems.push(drift::column_gone(c, &log.source_table, consequence));
                }
            }
            if log.key.is_empty() || log.identity.is_none() {
                problems.push(format!(
                    "the log of table {} was installed by an older version: its changes carry no key or \
                     stable id until `epidemic install` runs",
                    log.source_table
                ));
            }
            if let Some(why) = catalog.engine_problem(&log.source_table)? {
                problems.push(why);
            }
            let w = WatchedLog {
                table: log.source_table.clone(),
                log_table: log.log_table.clone(),
                columns: log.columns.to_vec(),
            };
            match cascade::status_triggers(conn, server, &w, &fks, mode)? {
                Ok(cascades) => {
                    if mode == CascadeMode::Direct {
                        if let Some((parent, ..)) = cascades.first() {
                            status.warnings.push(format!(
                                "foreign-key cascades from {parent} into {} are logged before the parent row changes \
                                 (this server allows one trigger per table and event, or has innodb_autoinc_lock_mode = 2): \
                                 a DELETE IGNORE or UPDATE IGNORE that then skips the parent row logs a cascade that did not happen",
                                log.source_table
                            ));
                        }
                    }
                    for (parent, name, here) in cascades {
                        if !here {
                            problems.push(format!(
                                "trigger {name} on table {parent} is missing or out of date: foreign-key cascades \
                                 from {parent} into {} are not captured; run `epidemic install`",
                                log.source_table
                            ));
                        }
                        triggers.push((name, here));
                    }
                }
                Err(why) => problems.push(why),
            }
        }
        if let Some((_, at)) = truncations.iter().find(|(t, _)| *t == log.source_table) {
            let warning = truncation::truncated_warning(&log.source_table, at);
            problems.push(warning.clone());
            status.warnings.push(warning);
        }
        let log_rows = if MySqlCatalog::new(conn).table_exists(&log.log_table)? {
            conn.query_first(format!("SELECT COUNT(*) FROM {}", quote(&log.log_table)))
                .map_err(sql_err)?
                .unwrap_or(0)
        } else {
            0
        };
        status.tables.push(TableStatus {
            table: log.source_table.clone(),
            log_table: log.log_table.clone(),
            columns: log.columns.to_vec(),
            log_rows,
            triggers,
            problems,
        });
    }
    Ok(())
}

fn consumer_status(
    conn: &mut Conn,
    watched: &[MySqlLogTable],
    status: &mut Status,
) -> Result<(), BackendError> {
    let mut catalog = MySqlCatalog::new(conn);
    let mut logs = Vec::new();
    for w in watched {
        if catalog.table_exists(&w.log_table)? {
            logs.push(w);
        }
    }
    let has_dead = catalog.table_exists("epidemic_dead_letter")?;
    let dead: Vec<(String, String, i64)> = if has_dead {
        conn.query(
            "SELECT daemon, handler, COUNT(*) FROM epidemic_dead_letter GROUP BY daemon, handler",
        )
        .map_err(sql_err)?
    } else {
        Vec::new()
    };
    let rows: Vec<CursorRow> = conn
        .query(
            "SELECT daemon, handler, source_table, high_water, gaps, last_seen, evicted_at FROM epidemic_cursor \
             ORDER BY daemon, handler, source_table",
        )
        .map_err(sql_err)?;
    let now = kit::now_us();
    for (daemon, handler, table, high_water, gaps_text, last_seen, evicted_at) in rows {
        let gaps = GapSet::parse(&gaps_text, &GapSeen::now()).unwrap_or_default();
        let ranges: Vec<(i64, i64)> = gaps.ranges().map(|(lo, hi, _)| (lo, hi)).collect();
        let (backlog, oldest): (i64, Option<i64>) =
            match logs.iter().find(|w| w.source_table == table) {
                Some(log) => conn
                    .query_first(format!(
                        "SELECT COUNT(*), MIN(`changed_at`) FROM {} WHERE {}",
                        quote(&log.log_table),
                        gap_condition(Some(high_water), &ranges)
                    ))
                    .map_err(sql_err)?
                    .unwrap_or((0, None)),
                None => (0, None),
            };
        let age = oldest.map(|t| ((now - t).max(0) as f64) / 1e6);
        let position = if ranges.is_empty() {
            format!("{table}:{high_water}")
        } else {
            format!("{table}:{high_water} (gaps {gaps_text})")
        };
        let evicted = evicted_at.is_some();
        match status
            .consumers
            .iter_mut()
            .find(|c| c.daemon == daemon && c.handler == handler)
        {
            Some(c) => {
                c.tables.push(table);
                c.position.push_str(&format!(", {position}"));
                c.backlog += backlog;
                c.oldest_pending_age_s = match (c.oldest_pending_age_s, age) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    (a, b) => a.or(b),
                };
                c.last_seen_us = c.last_seen_us.max(last_seen);
                c.evicted |= evicted;
            }
            None => {
                let dead_letters = dead
                    .iter()
                    .find(|(d, h, _)| *d == daemon && *h == handler)
                    .map_or(0, |(.., n)| *n);
                status.consumers.push(ConsumerStatus {
                    daemon,
                    handler,
                    tables: vec![table],
                    position,
                    backlog,
                    oldest_pending_age_s: age,
                    dead_letters,
                    last_seen_us: last_seen,
                    evicted,
                })
            }
        }
    }
    Ok(())
}

/// This server's reading warnings (`warnings`, found at connection: the gap fallback,
/// Galera), and one per cursor that tracks more gap ranges than one read statement
/// carries (each read then takes several statements, and pruning waits for the oldest
/// gap).
fn reading_warnings(
    conn: &mut Conn,
    max_gap_ranges: usize,
    warnings: &[String],
) -> Result<Vec<String>, BackendError> {
    let mut out = warnings.to_vec();
    if !MySqlCatalog::new(conn).table_exists("epidemic_cursor")? {
        return Ok(out);
    }
    let rows: Vec<(String, String, String, String)> = conn
        .query(
            "SELECT daemon, handler, source_table, gaps FROM epidemic_cursor \
             WHERE evicted_at IS NULL ORDER BY daemon, handler, source_table",
        )
        .map_err(sql_err)?;
    let limit = max_gap_ranges.max(1);
    let mut piled = Vec::new();
    for (daemon, handler, table, gaps) in rows {
        let ranges = gaps.split(',').filter(|p| !p.trim().is_empty()).count();
        if ranges > limit {
            piled.push(format!(
                "{daemon}/{handler} tracks {ranges} gap ranges on {table}"
            ));
        }
    }
    if piled.is_empty() {
        return Ok(out);
    }
    // Which open transaction keeps them, where INNODB_TRX can tell.
    let oldest: Option<(String, String)> = conn
        .query_first(
            "SELECT trx_mysql_thread_id, trx_started FROM information_schema.INNODB_TRX \
             WHERE trx_rows_modified > 0 ORDER BY trx_started LIMIT 1",
        )
        .unwrap_or(None);
    let holder = match oldest {
        Some((thread, started)) => {
            format!("the oldest open transaction that has written rows is thread {thread}, open since {started} (server time)")
        }
        None => "they go once the transactions that could still fill them have ended".to_owned(),
    };
    out.push(format!(
        "{} (more than max_gap_ranges = {limit}): ids below the newest one read that an open transaction may still \
         fill; every read re-reads them in several statements and pruning waits for the oldest; {holder}",
        piled.join(", ")
    ));
    Ok(out)
}
