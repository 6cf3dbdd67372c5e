//! `epidemic bench`'s scratch table. Every call is checked by the SDK's scratch guard, so
//! it only ever touches `epidemic_bench_scratch` and what Epidemic keeps for it.

use epidemic_plugin_sdk::backend::kit::check_scratch;
use epidemic_plugin_sdk::backend::{BackendError, Scratch};
use rusqlite::{Connection, TransactionBehavior};

use crate::catalog::quote;
use crate::conn::LockWait;
use crate::error::sql_err;
use crate::install::{drop_table_objects, installed};

pub(crate) fn scratch(
    conn: &mut Connection,
    lock: &LockWait,
    op: &Scratch,
) -> Result<(), BackendError> {
    match op {
        Scratch::Create { table } => {
            check_scratch(table)?;
            drop_scratch(conn, table)?;
            conn.execute_batch(&format!(
                "CREATE TABLE {} (id INTEGER PRIMARY KEY, payload TEXT)",
                quote(table)
            ))
            .map_err(sql_err)
        }
        Scratch::Insert {
            table,
            first_id,
            count,
            per_tx,
        } => {
            check_scratch(table)?;
            // Write as an application does, with SQLite's default durability,
            // checkpointing and busy handler, not the settings Epidemic uses for its own
            // bookkeeping (see `conn::connect`).
            let sync: i64 = conn
                .query_row("PRAGMA synchronous", [], |r| r.get(0))
                .map_err(sql_err)?;
            let checkpoint: i64 = conn
                .query_row("PRAGMA wal_autocheckpoint", [], |r| r.get(0))
                .map_err(sql_err)?;
            conn.pragma_update(None, "synchronous", "FULL")
                .map_err(sql_err)?;
            conn.pragma_update(None, "wal_autocheckpoint", 1000)
                .map_err(sql_err)?;
            // With SQLite's default busy handler (sleeps of 1, 2, 5 … 100 ms) one of 32
            // writers can be passed over for longer than `busy_timeout_ms`: give the
            // bench's writers a minute, so they measure throughput instead of failing.
            conn.busy_timeout(lock.timeout().max(std::time::Duration::from_secs(60)))
                .map_err(sql_err)?;
            let result = insert_scratch(conn, table, *first_id, *count, (*per_tx).max(1));
            lock.install(conn)?;
            conn.pragma_update(None, "synchronous", sync)
                .map_err(sql_err)?;
            conn.pragma_update(None, "wal_autocheckpoint", checkpoint)
                .map_err(sql_err)?;
            result
        }
        Scratch::Drop { table } => {
            check_scratch(table)?;
            drop_scratch(conn, table)
        }
    }
}

fn insert_scratch(
    conn: &mut Connection,
    table: &str,
    first_id: i64,
    count: u64,
    per_tx: u64,
) -> Result<(), BackendError> {
    let sql = format!(
        "INSERT INTO {} (id, payload) VALUES (?1, 'bench')",
        quote(table)
    );
    let end = first_id + count as i64;
    let mut id = first_id;
    while id < end {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql_err)?;
        {
            let mut stmt = tx.prepare_cached(&sql).map_err(sql_err)?;
            for i in id..(id + per_tx as i64).min(end) {
                stmt.execute([i]).map_err(sql_err)?;
            }
        }
        tx.commit().map_err(sql_err)?;
        id += per_tx as i64;
    }
    Ok(())
}

fn drop_scratch(conn: &mut Connection, table: &str) -> Result<(), BackendError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sql_err)?;
    for stmt in drop_table_objects(table) {
        tx.execute_batch(&stmt).map_err(sql_err)?;
    }
    if installed(&tx)? {
        for t in ["epidemic_watch", "epidemic_cursor", "epidemic_dead_letter"] {
            tx.execute(&format!("DELETE FROM {t} WHERE source_table = ?1"), [table])
                .map_err(sql_err)?;
        }
    }
    tx.execute_batch(&format!("DROP TABLE IF EXISTS {}", quote(table)))
        .map_err(sql_err)?;
    tx.commit().map_err(sql_err)
}
