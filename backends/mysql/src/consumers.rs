//! Consumers and their durable cursors in `epidemic_cursor`: registering (where a new
//! consumer starts), loading a consumer's cursors for the reader, heartbeats, eviction
//! of consumers unseen for too long, and forgetting one.
//!
//! `last_seen`, eviction and leases use the server's clock ([`DB_NOW_US`]), never a
//! daemon's, so a daemon whose clock runs ahead evicts nobody.
//!
//! A consumer registered "from now" starts at the largest visible id, with every id
//! below it that is not in the log as a gap: a transaction still open at registration
//! commits after it, so its change is delivered.

use std::sync::Arc;

use epidemic_plugin_sdk::backend::{kit, BackendError, Consumer, Registered, StartFrom};
use mysql::prelude::Queryable;
use mysql::Conn;

use crate::capture::quote;
use crate::error::sql_err;
use crate::gaps::{GapSeen, GapSet, IdSeries};
use crate::install::MAX_CONSUMER_NAME;
use crate::reader::{id_series, ConsumerCursors, TableCursor};
use crate::registry::{self, MySqlLogTable};

/// Now by the server's clock, in microseconds since the Unix epoch (whole seconds: all
/// MySQL versions have it, and liveness needs no more).
pub(crate) const DB_NOW_US: &str = "(UNIX_TIMESTAMP() * 1000000)";

/// The registry entry of a table a consumer reads, or the error that says to install.
fn watched(conn: &mut Conn, table: &str) -> Result<MySqlLogTable, BackendError> {
    registry::watched(conn, table)?.ok_or_else(|| {
        BackendError::Invalid(format!(
            "table {table} is not watched; run `epidemic install` first"
        ))
    })
}

/// Check that every captured column still exists in the source table; a dropped or
/// renamed column makes the triggers fail every write to the table, so say so.
fn check_columns(conn: &mut Conn, log: &MySqlLogTable) -> Result<(), BackendError> {
    let have = crate::catalog::MySqlCatalog::new(conn).column_names(&log.source_table)?;
    if have.is_empty() {
        return Err(BackendError::Invalid(format!(
            "watched table {} no longer exists; run `epidemic uninstall` or restore it",
            log.source_table
        )));
    }
    for c in log.columns.iter() {
        if !have.iter().any(|h| h.eq_ignore_ascii_case(c)) {
            return Err(BackendError::Invalid(format!(
                "watched column {c} no longer exists in table {} (dropped or renamed?); \
                 writes to the table fail until it is restored or the table is re-installed",
                log.source_table
            )));
        }
    }
    Ok(())
}

/// Where a new (or evicted) consumer starts.
///
/// "From now" starts at the largest visible id. Transactions still open may hold smaller
/// ids and commit after this moment, so every id at or below it that is not in the log
/// is a gap: delivered if it ever commits, forgotten once proven rolled back.
fn start_position(
    conn: &mut Conn,
    log: &MySqlLogTable,
    start: StartFrom,
    series: IdSeries,
) -> Result<(i64, String), BackendError> {
    match start {
        StartFrom::Oldest => Ok((0, String::new())),
        StartFrom::Now => {
            let max: Option<i64> = conn
                .query_first(format!("SELECT MAX(`id`) FROM {}", quote(&log.log_table)))
                .map_err(sql_err)?
                .flatten();
            Ok(match max {
                None => (0, String::new()),
                Some(max) => (
                    max,
                    missing_ids(conn, &log.log_table, max, series)?.to_text(max),
                ),
            })
        }
    }
}

/// Make sure the consumer has a live cursor on each of `tables`, and none on others.
pub(crate) fn register(
    conn: &mut Conn,
    consumer: &Consumer,
    tables: &[String],
    start: StartFrom,
) -> Result<Registered, BackendError> {
    for (what, name) in [("daemon", &consumer.daemon), ("handler", &consumer.handler)] {
        if name.is_empty() || name.chars().count() > MAX_CONSUMER_NAME {
            return Err(BackendError::Invalid(format!(
                "{what} name {name:?} must be 1 to {MAX_CONSUMER_NAME} characters"
            )));
        }
    }
    let now = kit::now_us();
    let (mut created, mut evicted) = (false, false);
    for table in tables {
        let log = watched(conn, table)?;
        check_columns(conn, &log)?;
        let existing: Option<Option<i64>> = conn
            .exec_first(
                "SELECT evicted_at FROM epidemic_cursor WHERE daemon = ? AND handler = ? AND source_table = ?",
                (&consumer.daemon, &consumer.handler, table),
            )
            .map_err(sql_err)?;
        // A live cursor stays where it is. An evicted one may point at pruned rows:
        // it restarts like a new one, and the host is told.
        if matches!(existing, Some(None)) {
            continue;
        }
        let series = id_series(conn)?;
        let (high_water, gaps) = start_position(conn, &log, start, series)?;
        if existing.is_some() {
            conn.exec_drop(
                "UPDATE epidemic_cursor SET high_water = ?, gaps = ?, evicted_at = NULL, registered_at = ? \
                 WHERE daemon = ? AND handler = ? AND source_table = ? AND evicted_at IS NOT NULL",
                (high_water, gaps, now, &consumer.daemon, &consumer.handler, table),
            )
            .map_err(sql_err)?;
            evicted |= conn.affected_rows() > 0;
        } else {
            conn.exec_drop(
                "INSERT IGNORE INTO epidemic_cursor \
                 (daemon, handler, source_table, high_water, gaps, registered_at, last_seen) \
                 VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    &consumer.daemon,
                    &consumer.handler,
                    table,
                    high_water,
                    gaps,
                    now,
                    now,
                ),
            )
            .map_err(sql_err)?;
            created |= conn.affected_rows() > 0;
        }
    }
    // A table the handler no longer reads: its old cursor would hold back that
    // table's pruning for ever.
    let keep = if tables.is_empty() {
        "NULL".to_owned()
    } else {
        vec!["?"; tables.len()].join(", ")
    };
    let mut params: Vec<mysql::Value> = vec![
        consumer.daemon.as_str().into(),
        consumer.handler.as_str().into(),
    ];
    params.extend(tables.iter().map(|t| mysql::Value::from(t.as_str())));
    conn.exec_drop(
        format!(
            "DELETE FROM epidemic_cursor WHERE daemon = ? AND handler = ? AND source_table NOT IN ({keep})"
        ),
        params,
    )
    .map_err(sql_err)?;
    // By the server's clock, like every other `last_seen`.
    conn.exec_drop(
        format!(
            "UPDATE epidemic_cursor SET last_seen = {DB_NOW_US} WHERE daemon = ? AND handler = ?"
        ),
        (&consumer.daemon, &consumer.handler),
    )
    .map_err(sql_err)?;
    Ok(if evicted {
        Registered::Evicted
    } else if created {
        Registered::New
    } else {
        Registered::Existing
    })
}

/// daemon's table, high_water, gaps, and the registry's log_table, columns, key_columns,
/// log_identity.
type CursorRow = (
    String,
    i64,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
);

/// The consumer's cursors as the database has them, each read in one statement with
/// the registry row of its table, so a cursor is never paired with another incarnation
/// of its log than the one it is a position in.
pub(crate) fn load_cursors(
    conn: &mut Conn,
    consumer: &Consumer,
) -> Result<ConsumerCursors, BackendError> {
    let rows: Vec<CursorRow> = conn
        .exec(
            "SELECT c.source_table, c.high_water, c.gaps, w.log_table, w.`columns`, w.key_columns, w.log_identity \
             FROM epidemic_cursor c LEFT JOIN epidemic_watch w ON w.source_table = c.source_table \
             WHERE c.daemon = ? AND c.handler = ? ORDER BY c.source_table",
            (&consumer.daemon, &consumer.handler),
        )
        .map_err(sql_err)?;
    if rows.is_empty() {
        return Err(kit::not_registered(consumer));
    }
    let seen = GapSeen::now();
    let mut tables = Vec::with_capacity(rows.len());
    for (table, high_water, gaps, log_table, columns, key, identity) in rows {
        let (Some(log_table), Some(columns)) = (log_table, columns) else {
            return Err(BackendError::Invalid(format!(
                "table {table} is not watched; run `epidemic install`"
            )));
        };
        let log =
            MySqlLogTable::from_row(table.clone(), log_table, &columns, key.as_deref(), identity)?;
        let gaps = GapSet::parse(&gaps, &seen).map_err(|e| {
            BackendError::Other(format!(
                "epidemic_cursor row for {consumer} on {table} is damaged: {e}"
            ))
        })?;
        tables.push(TableCursor::new(Arc::new(log), high_water, gaps));
    }
    Ok(ConsumerCursors::new(tables))
}

/// Heartbeat: the consumer is alive.
pub(crate) fn touch(conn: &mut Conn, c: &Consumer) -> Result<(), BackendError> {
    conn.exec_drop(
        format!("UPDATE epidemic_cursor SET last_seen = {DB_NOW_US} WHERE daemon = ? AND handler = ? AND evicted_at IS NULL"),
        (&c.daemon, &c.handler),
    )
    .map_err(sql_err)?;
    if conn.affected_rows() == 0 {
        ensure_live(conn, c, None)?;
    }
    Ok(())
}

/// After a cursor update that changed no row (MySQL counts changed rows, so 0 can also
/// mean "same values"): fine while a live cursor exists, an error when it was evicted
/// or is gone — never a silent success.
pub(crate) fn ensure_live(
    conn: &mut Conn,
    c: &Consumer,
    table: Option<&str>,
) -> Result<(), BackendError> {
    let rows: Vec<Option<i64>> = conn
        .exec(
            "SELECT evicted_at FROM epidemic_cursor WHERE daemon = ? AND handler = ? AND (? IS NULL OR source_table = ?)",
            (&c.daemon, &c.handler, table, table),
        )
        .map_err(sql_err)?;
    if rows.iter().any(Option::is_none) {
        return Ok(());
    }
    Err(if rows.is_empty() {
        kit::not_registered(c)
    } else {
        kit::evicted(c)
    })
}

/// Forget a consumer's cursors and backfills; whether it had cursors.
pub(crate) fn unregister(conn: &mut Conn, c: &Consumer) -> Result<bool, BackendError> {
    crate::backfill::forget(conn, c)?;
    if !crate::catalog::MySqlCatalog::new(conn).table_exists("epidemic_cursor")? {
        return Ok(false);
    }
    conn.exec_drop(
        "DELETE FROM epidemic_cursor WHERE daemon = ? AND handler = ?",
        (&c.daemon, &c.handler),
    )
    .map_err(sql_err)?;
    Ok(conn.affected_rows() > 0)
}

/// Mark every consumer unseen for `ttl_us` as evicted; the ones this call evicted.
pub(crate) fn evict_stale(conn: &mut Conn, ttl_us: i64) -> Result<Vec<Consumer>, BackendError> {
    let now: i64 = conn
        .query_first(format!("SELECT {DB_NOW_US}"))
        .map_err(sql_err)?
        .unwrap_or(0);
    let stale: Vec<(String, String)> = conn
        .exec(
            "SELECT daemon, handler FROM epidemic_cursor WHERE evicted_at IS NULL
             GROUP BY daemon, handler HAVING MAX(last_seen) < ?",
            (now.saturating_sub(ttl_us),),
        )
        .map_err(sql_err)?;
    let mut evicted = Vec::new();
    for (daemon, handler) in stale {
        // Checked again in the UPDATE: a consumer that came back since the SELECT stays.
        conn.exec_drop(
            "UPDATE epidemic_cursor SET evicted_at = ? WHERE daemon = ? AND handler = ? AND evicted_at IS NULL
             AND last_seen < ?",
            (now, &daemon, &handler, now.saturating_sub(ttl_us)),
        )
        .map_err(sql_err)?;
        if conn.affected_rows() > 0 {
            evicted.push(Consumer { daemon, handler });
        }
    }
    Ok(evicted)
}

/// The ids missing from a log table at or below `upto`: everything below its smallest
/// id and the holes between its rows. Used when a consumer starts "from now": an open
/// transaction may hold any of them, and its change commits after the consumer started.
pub(crate) fn missing_ids(
    conn: &mut Conn,
    log_table: &str,
    upto: i64,
    series: IdSeries,
) -> Result<GapSet, BackendError> {
    const CHUNK: usize = 10_000;
    let seen = GapSeen::now();
    let mut gaps = GapSet::default();
    let mut expect = 1_i64;
    let sql = format!(
        "SELECT `id` FROM {} WHERE `id` >= ? AND `id` <= ? ORDER BY `id` LIMIT {CHUNK}",
        quote(log_table)
    );
    loop {
        let ids: Vec<i64> = conn.exec(&sql, (expect, upto)).map_err(sql_err)?;
        for &id in &ids {
            if let Some((lo, hi)) = series.trim(expect, id - 1) {
                gaps.add_missing(lo, hi, &seen);
            }
            expect = id + 1;
        }
        if ids.len() < CHUNK {
            break;
        }
    }
    if let Some((lo, hi)) = series.trim(expect, upto) {
        gaps.add_missing(lo, hi, &seen);
    }
    Ok(gaps)
}
