//! Consumers' cursors: registering, forgetting, heartbeats and eviction.
//!
//! Cursors are keyed by the registry's spelling of the table (the catalog's), which is
//! also the ack token and what pruning looks up. `last_seen` and eviction use SQLite's
//! clock ([`NOW_US`]). An update that touches no cursor is [`BackendError::Evicted`],
//! never a success.

use epidemic_plugin_sdk::backend::{kit, BackendError, Consumer, Registered, StartFrom};
use rusqlite::{params, Connection, TransactionBehavior};

use crate::capture::last_id;
use crate::conn::NOW_US;
use crate::error::sql_err;
use crate::install::{installed, watched};

pub(crate) fn register(
    conn: &mut Connection,
    consumer: &Consumer,
    tables: &[String],
    start: StartFrom,
) -> Result<Registered, BackendError> {
    let now = kit::now_us();
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sql_err)?;
    let mut created = false;
    let mut evicted = false;
    // Cursors are keyed by the registry's spelling of the table (the catalog's): a
    // cursor keyed by a handler's `mail_users` for a registry's `Mail_Users` would
    // never move.
    let mut logs = Vec::with_capacity(tables.len());
    for table in tables {
        logs.push(watched(&tx, table)?.ok_or_else(|| {
            BackendError::Invalid(format!(
                "table {table} is not watched; run `epidemic install` first"
            ))
        })?);
    }
    let tables: Vec<&str> = logs.iter().map(|l| l.source_table.as_str()).collect();
    for (log, table) in logs.iter().zip(&tables) {
        // A cursor written under another spelling (before names were resolved) keeps
        // its position under the registry's.
        tx.execute(
            "UPDATE OR IGNORE epidemic_cursor SET source_table = ?3
             WHERE daemon = ?1 AND handler = ?2 AND source_table = ?3 COLLATE NOCASE AND source_table <> ?3",
            params![consumer.daemon, consumer.handler, table],
        )
        .map_err(sql_err)?;
        let start_id = match start {
            StartFrom::Oldest => 0,
            StartFrom::Now => last_id(&tx, &log.log_table)?,
        };
        // An evicted consumer's old cursor may point at pruned rows: restart it like a
        // new one, and say so.
        let n = tx
            .execute(
                "UPDATE epidemic_cursor SET last_id = ?4, evicted_at = NULL, registered_at = ?5
                 WHERE daemon = ?1 AND handler = ?2 AND source_table = ?3 AND evicted_at IS NOT NULL",
                params![consumer.daemon, consumer.handler, table, start_id, now],
            )
            .map_err(sql_err)?;
        evicted |= n > 0;
        let n = tx
            .execute(
                "INSERT OR IGNORE INTO epidemic_cursor (daemon, handler, source_table, last_id, registered_at, last_seen)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
                params![consumer.daemon, consumer.handler, table, start_id, now],
            )
            .map_err(sql_err)?;
        created |= n > 0;
    }
    tx.execute(
        "UPDATE epidemic_cursor SET last_seen = ?3 WHERE daemon = ?1 AND handler = ?2",
        params![consumer.daemon, consumer.handler, now],
    )
    .map_err(sql_err)?;
    // A table the handler no longer subscribes to: its old cursor would hold back that
    // table's pruning for ever.
    let keep = serde_json::to_string(&tables).map_err(|e| BackendError::Other(e.to_string()))?;
    tx.execute(
        "DELETE FROM epidemic_cursor WHERE daemon = ?1 AND handler = ?2
         AND source_table NOT IN (SELECT value FROM json_each(?3))",
        params![consumer.daemon, consumer.handler, keep],
    )
    .map_err(sql_err)?;
    tx.commit().map_err(sql_err)?;
    Ok(if evicted {
        Registered::Evicted
    } else if created {
        Registered::New
    } else {
        Registered::Existing
    })
}

/// Forget a consumer's cursors; whether it had any.
pub(crate) fn unregister(conn: &Connection, consumer: &Consumer) -> Result<bool, BackendError> {
    if !installed(conn)? {
        return Ok(false);
    }
    let n = conn
        .execute(
            "DELETE FROM epidemic_cursor WHERE daemon = ?1 AND handler = ?2",
            params![consumer.daemon, consumer.handler],
        )
        .map_err(sql_err)?;
    Ok(n > 0)
}

pub(crate) fn touch(conn: &Connection, c: &Consumer) -> Result<(), BackendError> {
    let n = conn
        .prepare_cached(&format!(
            "UPDATE epidemic_cursor SET last_seen = {NOW_US} WHERE daemon = ?1 AND handler = ?2 AND evicted_at IS NULL"
        ))
        .and_then(|mut s| s.execute(params![c.daemon, c.handler]))
        .map_err(sql_err)?;
    if n == 0 {
        return Err(gone(conn, c)?);
    }
    Ok(())
}

/// Why a consumer's cursor update touched no row: it was evicted, or it is gone.
pub(crate) fn gone(conn: &Connection, c: &Consumer) -> Result<BackendError, BackendError> {
    let evicted: bool = conn
        .query_row(
            "SELECT count(*) > 0 FROM epidemic_cursor WHERE daemon = ?1 AND handler = ?2 AND evicted_at IS NOT NULL",
            params![c.daemon, c.handler],
            |r| r.get(0),
        )
        .map_err(sql_err)?;
    Ok(if evicted {
        kit::evicted(c)
    } else {
        kit::not_registered(c)
    })
}

/// Mark every consumer unseen for `ttl_us` (by SQLite's clock) as evicted; returns them.
pub(crate) fn evict_stale(
    conn: &mut Connection,
    ttl_us: i64,
) -> Result<Vec<Consumer>, BackendError> {
    let tx = conn.transaction().map_err(sql_err)?;
    let now: i64 = tx
        .query_row(&format!("SELECT {NOW_US}"), [], |r| r.get(0))
        .map_err(sql_err)?;
    let stale: Vec<Consumer> = {
        let mut stmt = tx
            .prepare(
                "SELECT daemon, handler FROM epidemic_cursor WHERE evicted_at IS NULL
                 GROUP BY daemon, handler HAVING MAX(last_seen) < ?1",
            )
            .map_err(sql_err)?;
        let rows = stmt
            .query_map([now - ttl_us], |r| {
                Ok(Consumer {
                    daemon: r.get(0)?,
                    handler: r.get(1)?,
                })
            })
            .map_err(sql_err)?;
        rows.collect::<Result<_, _>>().map_err(sql_err)?
    };
    for c in &stale {
        tx.execute(
            "UPDATE epidemic_cursor SET evicted_at = ?3 WHERE daemon = ?1 AND handler = ?2",
            params![c.daemon, c.handler, now],
        )
        .map_err(sql_err)?;
    }
    tx.commit().map_err(sql_err)?;
    Ok(stale)
}
