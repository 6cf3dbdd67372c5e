//! The dead-letter table: changes a handler gave up on, for `epidemic dead-letters
//! list | retry | drop` and the daemon's retries. Rows map through the SDK's
//! [`DeadLetterRow`], as in every backend.

use epidemic_plugin_sdk::backend::kit::{DeadLetterRow, DEAD_LETTER_COLUMNS};
use epidemic_plugin_sdk::backend::{BackendError, DeadLetter, DeadLetterQuery, DeadLetterUpdate};
use rusqlite::{params, params_from_iter, Connection, Row};

use crate::error::sql_err;
use crate::install::installed;

pub(crate) fn add(conn: &Connection, l: &DeadLetter) -> Result<i64, BackendError> {
    conn.execute(
        "INSERT INTO epidemic_dead_letter (daemon, handler, source_table, change_id, op, change, error, attempts, failed_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![l.daemon, l.handler, l.table, l.change_id, l.op.code(), l.change, l.error, l.attempts, l.failed_at_us],
    )
    .map_err(sql_err)?;
    Ok(conn.last_insert_rowid())
}

fn letter(r: &Row<'_>) -> rusqlite::Result<DeadLetter> {
    Ok(DeadLetterRow {
        id: r.get(0)?,
        daemon: r.get(1)?,
        handler: r.get(2)?,
        table: r.get(3)?,
        change_id: r.get(4)?,
        op: r.get(5)?,
        change: r.get(6)?,
        error: r.get(7)?,
        attempts: r.get(8)?,
        failed_at_us: r.get(9)?,
        retry_requested: r.get::<_, i64>(10)? != 0,
    }
    .into())
}

pub(crate) fn list(
    conn: &Connection,
    q: &DeadLetterQuery,
) -> Result<Vec<DeadLetter>, BackendError> {
    if !installed(conn)? {
        return Ok(Vec::new());
    }
    let base = format!(
        "SELECT {} FROM epidemic_dead_letter",
        DEAD_LETTER_COLUMNS.join(", ")
    );
    let (sql, args): (String, Vec<rusqlite::types::Value>) = match q {
        DeadLetterQuery::All => (format!("{base} ORDER BY id"), vec![]),
        DeadLetterQuery::Consumer(c) => (
            format!("{base} WHERE daemon = ?1 AND handler = ?2 ORDER BY id"),
            vec![c.daemon.clone().into(), c.handler.clone().into()],
        ),
        DeadLetterQuery::RetryRequested(c) => (
            format!(
                "{base} WHERE daemon = ?1 AND handler = ?2 AND retry_requested = 1 ORDER BY id"
            ),
            vec![c.daemon.clone().into(), c.handler.clone().into()],
        ),
        DeadLetterQuery::Ids(ids) => (
            format!(
                "{base} WHERE id IN ({}) ORDER BY id",
                placeholders(ids.len())
            ),
            ids.iter().map(|i| (*i).into()).collect(),
        ),
    };
    let mut stmt = conn.prepare_cached(&sql).map_err(sql_err)?;
    let rows = stmt
        .query_map(params_from_iter(args), letter)
        .map_err(sql_err)?;
    rows.collect::<Result<_, _>>().map_err(sql_err)
}

fn placeholders(n: usize) -> String {
    if n == 0 {
        // `IN ()` is a syntax error; `IN (NULL)` matches nothing.
        return "NULL".into();
    }
    (1..=n)
        .map(|i| format!("?{i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub(crate) fn update(conn: &Connection, u: &DeadLetterUpdate) -> Result<u64, BackendError> {
    let n = match u {
        DeadLetterUpdate::RequestRetry(ids) => conn.execute(
            &format!(
                "UPDATE epidemic_dead_letter SET retry_requested = 1 WHERE id IN ({})",
                placeholders(ids.len())
            ),
            params_from_iter(ids),
        ),
        DeadLetterUpdate::Delete(ids) => conn.execute(
            &format!(
                "DELETE FROM epidemic_dead_letter WHERE id IN ({})",
                placeholders(ids.len())
            ),
            params_from_iter(ids),
        ),
        DeadLetterUpdate::Failed {
            id,
            error,
            attempts,
            failed_at_us,
        } => conn.execute(
            "UPDATE epidemic_dead_letter SET retry_requested = 0, error = ?2, attempts = ?3, failed_at = ?4 WHERE id = ?1",
            params![id, error, attempts, failed_at_us],
        ),
    }
    .map_err(sql_err)?;
    Ok(n as u64)
}
