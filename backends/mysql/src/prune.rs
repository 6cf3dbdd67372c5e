//! Pruning: deleting the log rows every live consumer has handled, so polling stays
//! cheap.
//!
//! Pruning never deletes the newest row of a log table: before MySQL 8.0 and MariaDB
//! 10.2.4 the AUTO_INCREMENT counter restarts at `MAX(id) + 1` after a server restart,
//! and an emptied log would hand out ids below the consumers' high-water marks again,
//! and ids (and so stable change ids) a change already had. Rows go in chunks of
//! `prune_chunk`, so writers never wait long for the log's locks.

use epidemic_plugin_sdk::backend::BackendError;
use mysql::prelude::Queryable;
use mysql::Conn;

use crate::capture::quote;
use crate::error::sql_err;
use crate::gaps;
use crate::registry;

/// The id a prune deletes below (exclusive), or `None` to keep everything.
///
/// `live` holds each live (not evicted) consumer's high-water and smallest gap. A row is
/// deletable when every live consumer is past it: below its smallest gap, or if it has
/// none, at or below its high-water. The newest row always stays (see the module docs),
/// so the bound is never above `newest`. With no consumer registered at all nothing is
/// deleted, because a first consumer starting "from the oldest" wants it; with only
/// evicted ones, everything but the newest row goes.
pub fn prune_bound(
    live: &[(i64, Option<i64>)],
    registered: bool,
    newest: Option<i64>,
) -> Option<i64> {
    let newest = newest?;
    let bound = live
        .iter()
        .map(|(high_water, first_gap)| first_gap.unwrap_or(high_water.saturating_add(1)))
        .min();
    match bound {
        Some(bound) => Some(bound.min(newest)),
        None if registered => Some(newest),
        None => None,
    }
}

/// Delete what every live consumer of every log has passed, `chunk` rows per
/// statement; how many rows went.
pub(crate) fn prune(conn: &mut Conn, chunk: u32) -> Result<u64, BackendError> {
    let mut total = 0;
    let chunk = chunk.max(1);
    for log in registry::all_watched(conn)? {
        let rows: Vec<(i64, String, Option<i64>)> = conn
            .exec(
                "SELECT high_water, gaps, evicted_at FROM epidemic_cursor WHERE source_table = ?",
                (&log.source_table,),
            )
            .map_err(sql_err)?;
        let registered = !rows.is_empty();
        let mut cursors = Vec::with_capacity(rows.len());
        // Evicted consumers no longer hold the log back.
        for (high_water, gaps, _) in rows.into_iter().filter(|r| r.2.is_none()) {
            let first = gaps::first_in_text(&gaps).map_err(|e| {
                BackendError::Other(format!(
                    "epidemic_cursor row on {} is damaged: {e}",
                    log.source_table
                ))
            })?;
            cursors.push((high_water, first));
        }
        let log_q = quote(&log.log_table);
        let newest: Option<i64> = conn
            .query_first(format!("SELECT MAX(`id`) FROM {log_q}"))
            .map_err(sql_err)?
            .flatten();
        let Some(bound) = prune_bound(&cursors, registered, newest) else {
            continue;
        };
        let sql = format!("DELETE FROM {log_q} WHERE `id` < {bound} ORDER BY `id` LIMIT {chunk}");
        loop {
            conn.query_drop(&sql).map_err(sql_err)?;
            let n = conn.affected_rows();
            total += n;
            if n < u64::from(chunk) {
                break;
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prune_keeps_the_newest_row_and_every_gap() {
        // No consumer: keep everything.
        assert_eq!(prune_bound(&[], false, Some(10)), None);
        // Empty log: nothing to delete.
        assert_eq!(prune_bound(&[(5, None)], true, None), None);
        // Everyone handled everything: delete below the newest row, keep it.
        assert_eq!(
            prune_bound(&[(10, None), (10, None)], true, Some(10)),
            Some(10)
        );
        // The slowest consumer decides.
        assert_eq!(
            prune_bound(&[(10, None), (4, None)], true, Some(10)),
            Some(5)
        );
        // A gap pins the log from its smallest id on.
        assert_eq!(
            prune_bound(&[(10, Some(3)), (10, None)], true, Some(10)),
            Some(3)
        );
        // A consumer ahead of the visible log (rows rolled back above it) never lets the
        // bound pass the newest row.
        assert_eq!(prune_bound(&[(12, None)], true, Some(10)), Some(10));
        // Only evicted consumers: all but the newest row go.
        assert_eq!(prune_bound(&[], true, Some(10)), Some(10));
    }
}
