//! The delivery barrier behind `epidemic wait` (see `epidemic_plugin_sdk::barrier`).
//!
//! A fence is, for each fenced table, the highest id its log ever handed out
//! (`sqlite_sequence`, read in one read transaction): SQLite has one writer at a time and
//! ids in commit order, so every change committed by now has an id at or below it, and
//! nothing uncommitted is visible to the read. A consumer has handled everything before
//! the fence once its cursor for each fenced table it reads is at or past that id.
//!
//! As a query an application can run itself (the fence, then the laggards):
//!
//! ```sql
//! SELECT seq FROM sqlite_sequence WHERE name = 'epidemic_log_mail_users';   -- :fence
//! SELECT daemon, handler FROM epidemic_cursor
//!  WHERE source_table = 'mail_users' AND last_id < :fence;                  -- until empty
//! ```

use std::collections::BTreeMap;

use epidemic_plugin_sdk::backend::{BackendError, BarrierReply, BarrierRequest, Laggard};
use rusqlite::{params, Connection};

use crate::capture::last_id;
use crate::error::sql_err;
use crate::install::{installed, watched};

pub(crate) fn barrier(
    conn: &Connection,
    request: &BarrierRequest,
) -> Result<BarrierReply, BackendError> {
    match request {
        BarrierRequest::Fence { tables } => {
            let mut fence = BTreeMap::new();
            if installed(conn)? {
                let tx = conn.unchecked_transaction().map_err(sql_err)?;
                for t in tables {
                    if let Some(log) = watched(&tx, t)? {
                        fence.insert(log.source_table.clone(), last_id(&tx, &log.log_table)?);
                    }
                }
                tx.finish().map_err(sql_err)?;
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
                BackendError::Invalid(format!("not a fence of the SQLite backend: {e}"))
            })?;
            let mut laggards = Vec::new();
            let mut stmt = conn
                .prepare_cached(
                    "SELECT source_table, last_id FROM epidemic_cursor WHERE daemon = ?1 AND handler = ?2",
                )
                .map_err(sql_err)?;
            for c in consumers {
                let cursors: BTreeMap<String, i64> = stmt
                    .query_map(params![c.daemon, c.handler], |r| Ok((r.get(0)?, r.get(1)?)))
                    .map_err(sql_err)?
                    .collect::<Result<_, _>>()
                    .map_err(sql_err)?;
                let behind: Vec<String> = if cursors.is_empty() {
                    // Not registered: nothing of the fence is handled.
                    fence.keys().cloned().collect()
                } else {
                    fence
                        .iter()
                        .filter(|(t, upto)| cursors.get(*t).is_some_and(|last| last < *upto))
                        .map(|(t, _)| t.clone())
                        .collect()
                };
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
