//! `epidemic bench`'s scratch table: created, filled, dropped with its log, triggers
//! and bookkeeping rows. Only ever touches objects of the scratch table's name
//! (`kit::check_scratch`), never a user's table.

use epidemic_plugin_sdk::backend::kit::check_scratch;
use epidemic_plugin_sdk::backend::{BackendError, Scratch};
use mysql::prelude::Queryable;
use mysql::Conn;

use crate::capture::{drop_triggers, log_table_name, quote};
use crate::catalog::MySqlCatalog;
use crate::error::sql_err;

/// Do `op` on the scratch table.
pub(crate) fn scratch(conn: &mut Conn, op: &Scratch) -> Result<(), BackendError> {
    match op {
        Scratch::Create { table } => {
            check_scratch(table)?;
            drop_scratch(conn, table)?;
            conn.query_drop(format!(
                "CREATE TABLE {} (`id` BIGINT NOT NULL PRIMARY KEY, `payload` VARCHAR(64)) ENGINE=InnoDB",
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
            let per_tx = (*per_tx).max(1) as i64;
            let end = first_id.saturating_add(*count as i64);
            let mut id = *first_id;
            while id < end {
                let stop = id.saturating_add(per_tx).min(end);
                conn.query_drop("START TRANSACTION").map_err(sql_err)?;
                // Rows go in statements of up to 1000 (the triggers fire per row anyway).
                let mut from = id;
                while from < stop {
                    let to = (from + 1_000).min(stop);
                    let values: Vec<String> =
                        (from..to).map(|i| format!("({i}, 'bench')")).collect();
                    if let Err(e) = conn.query_drop(format!(
                        "INSERT INTO {} (`id`, `payload`) VALUES {}",
                        quote(table),
                        values.join(",")
                    )) {
                        let _ = conn.query_drop("ROLLBACK");
                        return Err(sql_err(e));
                    }
                    from = to;
                }
                conn.query_drop("COMMIT").map_err(sql_err)?;
                id = stop;
            }
            Ok(())
        }
        Scratch::Drop { table } => {
            check_scratch(table)?;
            drop_scratch(conn, table)
        }
    }
}

fn drop_scratch(conn: &mut Conn, table: &str) -> Result<(), BackendError> {
    for stmt in drop_triggers(table) {
        conn.query_drop(stmt).map_err(sql_err)?;
    }
    conn.query_drop(format!(
        "DROP TABLE IF EXISTS {}",
        quote(&log_table_name(table))
    ))
    .map_err(sql_err)?;
    for own in ["epidemic_watch", "epidemic_cursor", "epidemic_dead_letter"] {
        if MySqlCatalog::new(conn).table_exists(own)? {
            conn.exec_drop(
                format!("DELETE FROM {own} WHERE source_table = ?"),
                (table,),
            )
            .map_err(sql_err)?;
        }
    }
    conn.query_drop(format!("DROP TABLE IF EXISTS {}", quote(table)))
        .map_err(sql_err)
}
