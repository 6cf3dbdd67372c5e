//! The delivery barrier behind `epidemic wait` (see `epidemic_plugin_sdk::barrier`).
//!
//! A fence is, for each fenced table, the largest id in its log that a consistent read
//! sees now: every change committed by now is visible, so its id is at or below that.
//! (Pruning never deletes a log's newest row, so the read always finds it.) A consumer is
//! behind the fence on a table while its `high_water` is below the fence's id, or while
//! one of its gaps at or below it is a row of the log now: a change it has not read yet.
//! A gap still missing is a transaction that had not committed when the fence was taken
//! (or a rollback): no change of before the fence.
//!
//! As a query an application can run itself (`:fence` read first; empty means done):
//!
//! ```sql
//! SELECT MAX(id) FROM epidemic_log_mail_users;              -- :fence
//! SELECT daemon, handler, gaps FROM epidemic_cursor
//!  WHERE source_table = 'mail_users' AND evicted_at IS NULL
//!    AND (high_water < :fence OR gaps <> '');                -- then: is a gap <= :fence a row?
//! ```

use std::collections::BTreeMap;

use epidemic_plugin_sdk::backend::{BackendError, BarrierReply, BarrierRequest, Laggard};
use mysql::prelude::Queryable;
use mysql::Conn;

use crate::capture::quote;
use crate::error::sql_err;
use crate::gaps::{GapSeen, GapSet};
use crate::registry::{installed, watched};

pub(crate) fn barrier(
    conn: &mut Conn,
    request: &BarrierRequest,
) -> Result<BarrierReply, BackendError> {
    match request {
        BarrierRequest::Fence { tables } => {
            let mut fence = BTreeMap::new();
            if installed(conn)? {
                for t in tables {
                    if let Some(log) = watched(conn, t)? {
                        let max: Option<i64> = conn
                            .query_first(format!("SELECT MAX(`id`) FROM {}", quote(&log.log_table)))
                            .map_err(sql_err)?
                            .flatten();
                        fence.insert(log.source_table.clone(), max.unwrap_or(0));
                    }
                }
            }
            let fence =
                serde_json::to_string(&fence).map_err(|e| BackendError::Other(e.to_string()))?;
            Ok(BarrierReply {
                fence,
                laggards: Vec::new(),
            })
        }
        BarrierRequest::Laggards { fence, consumers } => {
            let fence: BTreeMap<String, i64> = serde_json::from_str(fence).map_err(|e| {
                BackendError::Invalid(format!("not a fence of the MySQL backend: {e}"))
            })?;
            let mut laggards = Vec::new();
            for c in consumers {
                let cursors: Vec<(String, i64, String)> = conn
                    .exec(
                        "SELECT source_table, high_water, gaps FROM epidemic_cursor \
                         WHERE daemon = ? AND handler = ?",
                        (&c.daemon, &c.handler),
                    )
                    .map_err(sql_err)?;
                if cursors.is_empty() {
                    laggards.push(Laggard {
                        consumer: c.clone(),
                        tables: fence.keys().cloned().collect(),
                    });
                    continue;
                }
                let mut behind = Vec::new();
                for (table, high_water, gaps) in cursors {
                    let Some(upto) = fence.get(&table) else {
                        continue;
                    };
                    if high_water < *upto || gap_filled(conn, &table, &gaps, *upto)? {
                        behind.push(table);
                    }
                }
                if !behind.is_empty() {
                    laggards.push(Laggard {
                        consumer: c.clone(),
                        tables: behind,
                    });
                }
            }
            Ok(BarrierReply {
                fence: String::new(),
                laggards,
            })
        }
    }
}

/// Whether one of the consumer's gaps at or below `upto` is a row of the log now.
fn gap_filled(conn: &mut Conn, table: &str, gaps: &str, upto: i64) -> Result<bool, BackendError> {
    let set = GapSet::parse(gaps, &GapSeen::now())
        .map_err(|e| BackendError::Other(format!("cursor of {table}: {e}")))?;
    let ranges: Vec<String> = set
        .ranges()
        .filter(|(lo, _, _)| *lo <= upto)
        .map(|(lo, hi, _)| format!("(`id` BETWEEN {lo} AND {})", hi.min(upto)))
        .collect();
    if ranges.is_empty() {
        return Ok(false);
    }
    let Some(log) = watched(conn, table)? else {
        return Ok(false);
    };
    let found: Option<i64> = conn
        .query_first(format!(
            "SELECT `id` FROM {} WHERE {} LIMIT 1",
            quote(&log.log_table),
            ranges.join(" OR ")
        ))
        .map_err(sql_err)?;
    Ok(found.is_some())
}
