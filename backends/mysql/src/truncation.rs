//! TRUNCATE of a watched table, which fires no trigger on MySQL or MariaDB: not
//! captured, but noticed after the fact and reported until an operator clears it.
//!
//! The registry keeps marks of each watched table (InnoDB table id, `CREATE_TIME`,
//! `AUTO_INCREMENT`); `prune` compares them with the table's current ones at most every
//! [`TRUNCATION_CHECK`] and records a truncation in `epidemic_watch.truncated_at`;
//! `status` reports it (and `run` logs it at start) with the remedy. See [`truncated`]
//! for what counts, and docs/guarantees.md for what it misses.

use std::time::Duration;

use epidemic_plugin_sdk::backend::BackendError;
use mysql::prelude::Queryable;
use mysql::Conn;

use crate::catalog::MySqlCatalog;
use crate::error::sql_err;
use crate::registry;

/// How often `prune` looks for truncated watched tables.
pub(crate) const TRUNCATION_CHECK: Duration = Duration::from_secs(10);

/// Whether the registry has the marks (a registry of a version before TRUNCATE
/// detection has not, until the next install).
pub(crate) fn has_marks(conn: &mut Conn) -> Result<bool, BackendError> {
    Ok(registry::installed(conn)?
        && MySqlCatalog::new(conn)
            .column_names("epidemic_watch")?
            .iter()
            .any(|c| c == "truncated_at"))
}

/// The watched tables a TRUNCATE was noticed on, with when (UTC).
pub(crate) fn truncations(conn: &mut Conn) -> Result<Vec<(String, String)>, BackendError> {
    if !has_marks(conn)? {
        return Ok(Vec::new());
    }
    conn.query(
        "SELECT source_table, truncated_at FROM epidemic_watch WHERE truncated_at IS NOT NULL ORDER BY source_table",
    )
    .map_err(sql_err)
}

/// The InnoDB table id of `table`, where the server shows it (it needs the PROCESS
/// privilege): `INNODB_SYS_TABLES` on MariaDB and MySQL 5.6/5.7, `INNODB_TABLES` on
/// MySQL 8. Names with characters InnoDB encodes in its file names are not looked up.
fn innodb_table_id(conn: &mut Conn, db: &str, table: &str) -> Option<i64> {
    let plain = |s: &str| s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !plain(db) || !plain(table) {
        return None;
    }
    let name = format!("{db}/{table}");
    for view in ["INNODB_SYS_TABLES", "INNODB_TABLES"] {
        let sql = format!("SELECT TABLE_ID FROM information_schema.{view} WHERE NAME = ?");
        if let Ok(Some(id)) = conn.exec_first::<i64, _, _>(sql, (&name,)) {
            return Some(id);
        }
    }
    None
}

/// What TRUNCATE detection compares, as stored in `epidemic_watch` or read now.
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct TableMarks {
    pub table_id: Option<i64>,
    pub created: Option<String>,
    pub auto_increment: Option<u64>,
    /// `NOW()` when the marks were read.
    pub checked_at: Option<String>,
}

/// Whether the table was truncated between two readings of its marks.
///
/// TRUNCATE fires no trigger. On InnoDB it recreates the table: the table id changes and
/// the AUTO_INCREMENT counter restarts, while MariaDB keeps `CREATE_TIME` (checked on
/// MariaDB 10.11). A rebuilding `ALTER TABLE` or `OPTIMIZE` also changes the id but sets
/// `CREATE_TIME` to the time of the rebuild. So: the id changed and the creation time did
/// not, where the creation time is older than the previous check (else a rebuild in that
/// same second would look the same); or the counter went down. `CREATE_TIME` has whole
/// seconds, hence the care.
pub(crate) fn truncated(before: &TableMarks, now: &TableMarks) -> bool {
    let id_changed = matches!((before.table_id, now.table_id), (Some(a), Some(b)) if a != b);
    let same_creation = before.created.is_some()
        && before.created == now.created
        && matches!((&before.created, &before.checked_at), (Some(c), Some(at)) if c < at);
    let counter_down =
        matches!((before.auto_increment, now.auto_increment), (Some(a), Some(b)) if b < a);
    (id_changed && same_creation) || counter_down
}

/// Compare every watched table's marks with the stored ones, remember a truncation
/// (`truncated_at`, kept until cleared by hand) and store the new marks.
pub(crate) fn check_truncation(conn: &mut Conn) -> Result<(), BackendError> {
    if !has_marks(conn)? {
        return Ok(());
    }
    // MySQL 8 caches these statistics for a day unless told otherwise; older servers do
    // not know the variable.
    let _ = conn.query_drop("SET SESSION information_schema_stats_expiry = 0");
    let db: Option<String> = conn.query_first("SELECT DATABASE()").map_err(sql_err)?;
    let db = db.unwrap_or_default();
    type Stored = (
        String,
        Option<i64>,
        Option<String>,
        Option<u64>,
        Option<String>,
    );
    let stored: Vec<Stored> = conn
        .query(
            "SELECT source_table, table_id, created, auto_increment, checked_at FROM epidemic_watch ORDER BY source_table",
        )
        .map_err(sql_err)?;
    for (table, table_id, created, auto_increment, checked_at) in stored {
        let before = TableMarks {
            table_id,
            created,
            auto_increment,
            checked_at,
        };
        let row: Option<(Option<String>, Option<u64>, String)> = conn
            .exec_first(
                "SELECT CAST(CREATE_TIME AS CHAR), AUTO_INCREMENT, CAST(NOW() AS CHAR) FROM information_schema.TABLES \
                 WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?",
                (&table,),
            )
            .map_err(sql_err)?;
        // A table that is gone is reported as drift by `status`.
        let Some((created, auto_increment, checked_at)) = row else {
            continue;
        };
        let now = TableMarks {
            table_id: innodb_table_id(conn, &db, &table),
            created,
            auto_increment,
            checked_at: Some(checked_at),
        };
        let hit = truncated(&before, &now);
        conn.exec_drop(
            "UPDATE epidemic_watch SET table_id = ?, created = ?, auto_increment = ?, checked_at = ?, \
             truncated_at = IF(? AND truncated_at IS NULL, CAST(UTC_TIMESTAMP() AS CHAR), truncated_at) \
             WHERE source_table = ?",
            (
                now.table_id,
                &now.created,
                now.auto_increment,
                &now.checked_at,
                hit,
                &table,
            ),
        )
        .map_err(sql_err)?;
    }
    Ok(())
}

/// The sentence for a table a TRUNCATE emptied behind the triggers' back.
pub(crate) fn truncated_warning(table: &str, at: &str) -> String {
    format!(
        "table {table} was truncated (noticed at {at} UTC): its rows were removed without DELETE changes, \
         so handlers still act as if they existed; run a resync (backfill) or reconcile by hand, then clear \
         this with: UPDATE epidemic_watch SET truncated_at = NULL WHERE source_table = '{table}'"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marks(id: i64, created: &str, auto: u64, at: &str) -> TableMarks {
        TableMarks {
            table_id: Some(id),
            created: Some(created.into()),
            auto_increment: Some(auto),
            checked_at: Some(at.into()),
        }
    }

    #[test]
    fn a_new_table_id_under_an_old_creation_time_or_a_lower_counter_is_a_truncation() {
        let before = marks(7, "2026-01-01 10:00:00", 50, "2026-01-01 10:00:05");
        // TRUNCATE: new id, same creation time, counter back to 1.
        assert!(truncated(
            &before,
            &marks(8, "2026-01-01 10:00:00", 1, "2026-01-01 10:01:00")
        ));
        // A rebuild (ALTER, OPTIMIZE): new id and a new creation time.
        assert!(!truncated(
            &before,
            &marks(8, "2026-01-01 10:00:30", 50, "2026-01-01 10:01:00")
        ));
        // Nothing happened.
        assert!(!truncated(
            &before,
            &marks(7, "2026-01-01 10:00:00", 60, "2026-01-01 10:01:00")
        ));
        // A rebuild in the second of the previous check cannot be told apart: not flagged.
        let same_second = marks(7, "2026-01-01 10:00:05", 50, "2026-01-01 10:00:05");
        assert!(!truncated(
            &same_second,
            &marks(8, "2026-01-01 10:00:05", 50, "2026-01-01 10:01:00")
        ));
    }
}
