//! Dead letters: changes a handler gave up on, in `epidemic_dead_letter`, for
//! `epidemic dead-letters list | retry | drop`. The change and the error are stored as
//! bytes (UTF-8): MySQL 5.0's `utf8` holds no 4-byte characters, and a dead letter must
//! never fail to be written over an emoji.

use epidemic_plugin_sdk::backend::kit::{DeadLetterRow, DEAD_LETTER_COLUMNS};
use epidemic_plugin_sdk::backend::{BackendError, DeadLetter, DeadLetterQuery, DeadLetterUpdate};
use mysql::prelude::Queryable;
use mysql::Conn;

use crate::capture::quote;
use crate::catalog::MySqlCatalog;
use crate::error::sql_err;

/// Store a dead letter; its id.
pub(crate) fn add(conn: &mut Conn, l: &DeadLetter) -> Result<i64, BackendError> {
    conn.exec_drop(
        "INSERT INTO epidemic_dead_letter (daemon, handler, source_table, change_id, op, `change`, error, attempts, failed_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            &l.daemon,
            &l.handler,
            &l.table,
            l.change_id,
            l.op.code(),
            l.change.as_bytes(),
            l.error.as_bytes(),
            l.attempts,
            l.failed_at_us,
        ),
    )
    .map_err(sql_err)?;
    Ok(conn.last_insert_id() as i64)
}

/// `IN (...)` of ids; `IN (NULL)` (matches nothing) for none, as `IN ()` is an error.
fn id_list(ids: &[i64]) -> String {
    if ids.is_empty() {
        return "NULL".into();
    }
    ids.iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A row in [`DEAD_LETTER_COLUMNS`] order, as MySQL returns it (bytes for the change and
/// the error, an integer for the flag).
type LetterRow = (
    i64,
    String,
    String,
    String,
    i64,
    String,
    Vec<u8>,
    Vec<u8>,
    i64,
    i64,
    i64,
);

fn letter(r: LetterRow) -> DeadLetter {
    let (id, daemon, handler, table, change_id, op, change, error, attempts, failed_at_us, retry) =
        r;
    DeadLetterRow {
        id,
        daemon,
        handler,
        table,
        change_id,
        op,
        change: String::from_utf8_lossy(&change).into_owned(),
        error: String::from_utf8_lossy(&error).into_owned(),
        attempts,
        failed_at_us,
        retry_requested: retry != 0,
    }
    .into()
}

pub(crate) fn list(conn: &mut Conn, q: &DeadLetterQuery) -> Result<Vec<DeadLetter>, BackendError> {
    if !MySqlCatalog::new(conn).table_exists("epidemic_dead_letter")? {
        return Ok(Vec::new());
    }
    let columns: Vec<String> = DEAD_LETTER_COLUMNS.iter().map(|c| quote(c)).collect();
    let base = format!("SELECT {} FROM epidemic_dead_letter", columns.join(", "));
    let rows: Vec<LetterRow> = match q {
        DeadLetterQuery::All => conn.query(format!("{base} ORDER BY id")),
        DeadLetterQuery::Consumer(c) => conn.exec(
            format!("{base} WHERE daemon = ? AND handler = ? ORDER BY id"),
            (&c.daemon, &c.handler),
        ),
        DeadLetterQuery::RetryRequested(c) => conn.exec(
            format!("{base} WHERE daemon = ? AND handler = ? AND retry_requested = 1 ORDER BY id"),
            (&c.daemon, &c.handler),
        ),
        DeadLetterQuery::Ids(ids) => {
            conn.query(format!("{base} WHERE id IN ({}) ORDER BY id", id_list(ids)))
        }
    }
    .map_err(sql_err)?;
    Ok(rows.into_iter().map(letter).collect())
}

/// Apply an update; how many letters it touched.
pub(crate) fn update(conn: &mut Conn, u: &DeadLetterUpdate) -> Result<u64, BackendError> {
    match u {
        DeadLetterUpdate::RequestRetry(ids) => conn.query_drop(format!(
            "UPDATE epidemic_dead_letter SET retry_requested = 1 WHERE id IN ({})",
            id_list(ids)
        )),
        DeadLetterUpdate::Delete(ids) => conn.query_drop(format!(
            "DELETE FROM epidemic_dead_letter WHERE id IN ({})",
            id_list(ids)
        )),
        DeadLetterUpdate::Failed {
            id,
            error,
            attempts,
            failed_at_us,
        } => conn.exec_drop(
            "UPDATE epidemic_dead_letter SET retry_requested = 0, error = ?, attempts = ?, failed_at = ? WHERE id = ?",
            (error.as_bytes(), attempts, failed_at_us, id),
        ),
    }
    .map_err(sql_err)?;
    Ok(conn.affected_rows())
}
