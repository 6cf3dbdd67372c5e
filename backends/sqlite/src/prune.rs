//! Deleting log rows every live consumer has passed, in chunks so that writers never
//! wait long for the one write lock, and checkpointing Epidemic's own WAL growth.
//!
//! Before deleting, prune records the highest id it is about to delete in the registry
//! (`pruned_upto`): `AUTOINCREMENT` never hands an id out twice while the log's
//! `sqlite_sequence` row lives, and if that row is lost, install finds the sequence
//! below this mark, puts it back above, and gives the log a new identity so no stable id
//! repeats (see `install`).

use epidemic_plugin_sdk::backend::BackendError;
use rusqlite::{params, Connection};

use crate::catalog::quote;
use crate::error::sql_err;
use crate::install::all_watched;

/// Delete what every registered consumer has passed; returns how many rows.
pub(crate) fn prune(conn: &Connection, chunk: u32) -> Result<u64, BackendError> {
    let mut total = 0;
    for log in all_watched(conn)? {
        let (registered, live_min): (i64, Option<i64>) = conn
            .query_row(
                "SELECT count(*), MIN(CASE WHEN evicted_at IS NULL THEN last_id END)
                 FROM epidemic_cursor WHERE source_table = ?1",
                [&log.source_table],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(sql_err)?;
        let min = match live_min {
            Some(m) => m,
            // Nobody registered for the table yet: keep everything, a first consumer
            // started with "from oldest" wants it.
            None if registered == 0 => continue,
            // Every consumer was evicted: nobody live needs any of it.
            None => i64::MAX,
        };
        let log_q = quote(&log.log_table);
        let upto: Option<i64> = conn
            .prepare_cached(&format!("SELECT max(id) FROM {log_q} WHERE id <= ?1"))
            .and_then(|mut s| s.query_row([min], |r| r.get(0)))
            .map_err(sql_err)?;
        let Some(upto) = upto else { continue };
        conn.prepare_cached(
            "UPDATE epidemic_watch SET pruned_upto = ?2 WHERE source_table = ?1 AND pruned_upto < ?2",
        )
        .and_then(|mut s| s.execute(params![log.source_table, upto]))
        .map_err(sql_err)?;
        // The chunk is written into the statement: a bound LIMIT makes SQLite plan the
        // statement again on every use (see `SqliteLogTable::select_sql`).
        let sql = format!(
            "DELETE FROM {log_q} WHERE id IN (SELECT id FROM {log_q} WHERE id <= ?1 ORDER BY id LIMIT {chunk})"
        );
        loop {
            let n = conn
                .prepare_cached(&sql)
                .and_then(|mut s| s.execute(params![upto]))
                .map_err(sql_err)?;
            total += n as u64;
            if n < chunk as usize {
                break;
            }
        }
    }
    // See `conn::connect`: this is where Epidemic's own WAL growth is checkpointed.
    // PASSIVE never waits for readers or writers; in rollback-journal mode it is a no-op.
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
        .map_err(sql_err)?;
    Ok(total)
}
