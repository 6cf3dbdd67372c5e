//! Wake-ups: MySQL has no NOTIFY, so a waiting reader polls, every `poll_interval_ms`,
//! one statement that compares the largest id of each log table its consumers read with
//! their high-water marks. It stays cheap because pruning keeps the log tables small.

use std::time::{Duration, Instant};

use epidemic_plugin_sdk::backend::BackendError;
use mysql::prelude::Queryable;
use mysql::Conn;

use crate::capture::{literal, quote};
use crate::error::sql_err;
use crate::reader::ConsumerCursors;

/// Poll every `interval` until a log table has rows past a consumer's high-water or
/// `timeout` passes. While a consumer has gaps, return after one interval so the host
/// fetches and the gaps are re-read. A log made again under the consumer also wakes it,
/// so its next fetch reloads its cursors.
pub(crate) fn wait<'a>(
    conn: &mut Conn,
    consumers: impl Iterator<Item = &'a ConsumerCursors> + Clone,
    interval: Duration,
    timeout: Duration,
) -> Result<bool, BackendError> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        std::thread::sleep(interval.min(left));
        if consumers.clone().any(ConsumerCursors::has_gaps) || probe(conn, consumers.clone())? {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
    }
}

/// Whether any log table a loaded consumer reads has rows past its high-water, or is
/// not the log the consumer's cursors are in any more. With no consumer loaded, yes
/// (the host fetches, which loads them).
fn probe<'a>(
    conn: &mut Conn,
    consumers: impl Iterator<Item = &'a ConsumerCursors>,
) -> Result<bool, BackendError> {
    let mut highs = Vec::new();
    let mut parts = Vec::new();
    for cursors in consumers {
        for t in &cursors.tables {
            highs.push((t.high_water, &t.log.identity));
            parts.push(format!(
                "(SELECT MAX(`id`) FROM {}), \
                 (SELECT `log_identity` FROM `epidemic_watch` WHERE `source_table` = {})",
                quote(&t.log.log_table),
                literal(&t.log.source_table)
            ));
        }
    }
    if parts.is_empty() {
        return Ok(true);
    }
    let row: Option<mysql::Row> = conn
        .query_first(format!("SELECT {}", parts.join(", ")))
        .map_err(sql_err)?;
    let Some(row) = row else { return Ok(false) };
    Ok(highs.iter().enumerate().any(|(i, (hw, identity))| {
        let newer = row
            .get::<Option<i64>, _>(2 * i)
            .flatten()
            .is_some_and(|max| max > *hw);
        let remade = row.get::<Option<String>, _>(2 * i + 1).flatten() != **identity;
        newer || remade
    }))
}
