//! Backfill requests and progress, in `epidemic_backfill` (created by install, dropped
//! by uninstall): one row per (daemon, handler, table) with its state, its progress as
//! JSON (the SDK's `BackfillProgress`) and when it was requested and last updated.
//!
//! A request is checked and stored in one `BEGIN IMMEDIATE` transaction: SQLite's one
//! write lock serialises two requests for the same consumer, so the second sees the
//! first's rows and is refused; nothing is stored by a refused request. A save updates the
//! row of the same request only (same `requested_at`), so a daemon still running a
//! backfill that was cancelled and requested again stops instead of overwriting the new
//! request's progress.

use epidemic_plugin_sdk::backend::{
    kit, BackendError, BackfillProgress, BackfillReply, BackfillRequest, BackfillState, Consumer,
};
use rusqlite::{params, Connection, TransactionBehavior};

use crate::catalog::table_exists;
use crate::error::sql_err;
use crate::install::watched;

pub(crate) const BACKFILL_TABLE: &str = "epidemic_backfill";

pub(crate) const BACKFILL_DDL: &str = "CREATE TABLE IF NOT EXISTS epidemic_backfill (
    daemon TEXT NOT NULL,
    handler TEXT NOT NULL,
    source_table TEXT NOT NULL,
    state TEXT NOT NULL, -- requested, running or done
    progress TEXT NOT NULL, -- JSON: last key done, rows done, estimate, who asked, times
    requested_at INTEGER NOT NULL, -- microseconds since the Unix epoch; identifies the request
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (daemon, handler, source_table)
)";

const NOT_DONE: &str = "state IN ('requested', 'running')";

fn state_text(s: BackfillState) -> &'static str {
    match s {
        BackfillState::Requested => "requested",
        BackfillState::Running => "running",
        BackfillState::Done => "done",
    }
}

fn state_from(s: &str) -> BackfillState {
    match s {
        "running" => BackfillState::Running,
        "done" => BackfillState::Done,
        _ => BackfillState::Requested,
    }
}

fn json_err(e: serde_json::Error) -> BackendError {
    BackendError::Other(format!("{BACKFILL_TABLE}: {e}"))
}

pub(crate) fn backfills(
    conn: &mut Connection,
    request: &BackfillRequest,
) -> Result<BackfillReply, BackendError> {
    if table_exists(conn, BACKFILL_TABLE)?.is_none() {
        return match request {
            BackfillRequest::Request { .. } => Err(BackendError::Invalid(
                "this database has no backfill table (installed by an older Epidemic); run `epidemic install`".into(),
            )),
            // Nothing was ever requested here.
            _ => Ok(BackfillReply::default()),
        };
    }
    let backfills = match request {
        BackfillRequest::Request {
            consumer,
            tables,
            requested_by,
        } => request_backfill(conn, consumer, tables, requested_by)?,
        BackfillRequest::Pending { consumer } => select(
            conn,
            &format!("WHERE daemon = ?1 AND handler = ?2 AND {NOT_DONE}"),
            Some(consumer),
        )?,
        BackfillRequest::Save(p) => save(conn, p)?,
        BackfillRequest::List => select(conn, "", None)?,
        BackfillRequest::Cancel { consumer } => {
            let tx = conn.transaction().map_err(sql_err)?;
            let cancelled = select(
                &tx,
                &format!("WHERE daemon = ?1 AND handler = ?2 AND {NOT_DONE}"),
                Some(consumer),
            )?;
            tx.execute(
                &format!("DELETE FROM epidemic_backfill WHERE daemon = ?1 AND handler = ?2 AND {NOT_DONE}"),
                params![consumer.daemon, consumer.handler],
            )
            .map_err(sql_err)?;
            tx.commit().map_err(sql_err)?;
            cancelled
        }
    };
    Ok(BackfillReply { backfills })
}

/// Check and store a request; see the module docs.
fn request_backfill(
    conn: &mut Connection,
    consumer: &Consumer,
    tables: &[String],
    requested_by: &str,
) -> Result<Vec<BackfillProgress>, BackendError> {
    if tables.is_empty() {
        return Err(BackendError::Invalid(format!(
            "a backfill of consumer {consumer} needs at least one table"
        )));
    }
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sql_err)?;
    // The registry's spelling of each table, each watched and with a key.
    let mut names: Vec<String> = Vec::with_capacity(tables.len());
    for table in tables {
        let log = watched(&tx, table)?.ok_or_else(|| {
            BackendError::Invalid(format!(
                "table {table} is not watched; run `epidemic install` first"
            ))
        })?;
        if log.key().is_empty() {
            return Err(BackendError::Invalid(format!(
                "table {table} has no key in Epidemic's registry (installed by an older Epidemic); run `epidemic install`"
            )));
        }
        if !names.contains(&log.source_table) {
            names.push(log.source_table);
        }
    }
    let busy = select(
        &tx,
        &format!("WHERE daemon = ?1 AND handler = ?2 AND {NOT_DONE}"),
        Some(consumer),
    )?;
    if let Some(b) = busy.first() {
        let rows = match b.rows_estimate {
            Some(total) => format!("{} of ~{total} rows", b.rows_done),
            None => format!("{} rows done", b.rows_done),
        };
        return Err(BackendError::Invalid(format!(
            "a backfill of consumer {consumer} is already {} (table {}: {rows}); wait for it to finish, or cancel it",
            state_text(b.state),
            b.table
        )));
    }
    let now = kit::now_us();
    let mut stored = Vec::with_capacity(names.len());
    for table in names {
        let p = BackfillProgress {
            daemon: consumer.daemon.clone(),
            handler: consumer.handler.clone(),
            table,
            state: BackfillState::Requested,
            requested_by: requested_by.to_owned(),
            requested_at_us: now,
            updated_at_us: now,
            ..BackfillProgress::default()
        };
        // A done backfill of the table is replaced.
        tx.execute(
            "INSERT OR REPLACE INTO epidemic_backfill
               (daemon, handler, source_table, state, progress, requested_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
            params![
                p.daemon,
                p.handler,
                p.table,
                state_text(p.state),
                serde_json::to_string(&p).map_err(json_err)?,
                now
            ],
        )
        .map_err(sql_err)?;
        stored.push(p);
    }
    tx.commit().map_err(sql_err)?;
    Ok(stored)
}

/// Update the row of the same request; nothing when it is gone (cancelled, or requested
/// again since).
fn save(conn: &Connection, p: &BackfillProgress) -> Result<Vec<BackfillProgress>, BackendError> {
    let n = conn
        .execute(
            "UPDATE epidemic_backfill SET state = ?4, progress = ?5, updated_at = ?6
             WHERE daemon = ?1 AND handler = ?2 AND source_table = ?3 AND requested_at = ?7",
            params![
                p.daemon,
                p.handler,
                p.table,
                state_text(p.state),
                serde_json::to_string(p).map_err(json_err)?,
                kit::now_us(),
                p.requested_at_us
            ],
        )
        .map_err(sql_err)?;
    Ok(if n == 0 { Vec::new() } else { vec![p.clone()] })
}

/// The rows matching `filter` (`?1`, `?2`: the consumer), in request order.
fn select(
    conn: &Connection,
    filter: &str,
    consumer: Option<&Consumer>,
) -> Result<Vec<BackfillProgress>, BackendError> {
    let sql = format!(
        "SELECT daemon, handler, source_table, state, progress, requested_at, updated_at
         FROM epidemic_backfill {filter} ORDER BY daemon, handler, requested_at, rowid"
    );
    let mut stmt = conn.prepare_cached(&sql).map_err(sql_err)?;
    let read = |r: &rusqlite::Row<'_>| -> rusqlite::Result<_> {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, String>(4)?,
            r.get::<_, i64>(5)?,
            r.get::<_, i64>(6)?,
        ))
    };
    let rows: Vec<_> = match consumer {
        Some(c) => stmt.query_map(params![c.daemon, c.handler], read),
        None => stmt.query_map([], read),
    }
    .map_err(sql_err)?
    .collect::<Result<_, _>>()
    .map_err(sql_err)?;
    rows.into_iter()
        .map(
            |(daemon, handler, table, state, progress, requested_at, updated_at)| {
                let mut p: BackfillProgress = serde_json::from_str(&progress).map_err(json_err)?;
                // The columns are what the row is; the JSON is the rest.
                p.daemon = daemon;
                p.handler = handler;
                p.table = table;
                p.state = state_from(&state);
                p.requested_at_us = requested_at;
                p.updated_at_us = updated_at;
                Ok(p)
            },
        )
        .collect()
}

/// Forget a consumer's backfills (it is unregistered).
pub(crate) fn forget(conn: &Connection, consumer: &Consumer) -> Result<(), BackendError> {
    if table_exists(conn, BACKFILL_TABLE)?.is_some() {
        conn.execute(
            "DELETE FROM epidemic_backfill WHERE daemon = ?1 AND handler = ?2",
            params![consumer.daemon, consumer.handler],
        )
        .map_err(sql_err)?;
    }
    Ok(())
}
