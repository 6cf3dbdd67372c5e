//! Wake-ups: MySQL has no NOTIFY, so a waiting reader polls one statement that compares
//! the largest id of each log table its consumers read with their high-water marks. It
//! stays cheap because pruning keeps the log tables small.
//!
//! The poll is adaptive ([`Pace`]): right after the reader found changes it polls every
//! `poll_min_ms` (1 ms), and the interval grows with the time since, a twentieth of it,
//! up to `poll_interval_ms` (50 ms) after a second of quiet. A steady stream is polled
//! at the fastest pace, so its latency is about a millisecond, while an idle daemon
//! polls as seldom as before; the climb from fast to slow costs about 140 polls per
//! burst (some 14 per doubling of the interval).

use std::time::{Duration, Instant};

use epidemic_plugin_sdk::backend::BackendError;
use mysql::prelude::Queryable;
use mysql::Conn;

use crate::capture::{literal, quote};
use crate::error::sql_err;
use crate::reader::ConsumerCursors;

/// How often to poll: fast after activity, slower the longer the log stays quiet.
#[derive(Debug)]
pub(crate) struct Pace {
    fastest: Duration,
    slowest: Duration,
    /// When the reader last found changes (a fetch that returned some, or a poll that
    /// saw new rows); `None`: not since start, poll slowly.
    active: Option<Instant>,
}

impl Pace {
    pub fn new((fastest, slowest): (Duration, Duration)) -> Pace {
        Pace {
            fastest,
            slowest,
            active: None,
        }
    }

    /// The reader found changes now.
    pub fn activity(&mut self) {
        self.active = Some(Instant::now());
    }

    /// The interval before the next poll at `now`.
    pub fn interval(&self, now: Instant) -> Duration {
        match self.active {
            None => self.slowest,
            Some(at) => (now.saturating_duration_since(at) / 20).clamp(self.fastest, self.slowest),
        }
    }
}

/// Poll at `pace` until a log table has rows past a consumer's high-water or `timeout`
/// passes. While a consumer has gaps, return after one interval so the host fetches and
/// the gaps are re-read. A log made again under the consumer also wakes it, so its next
/// fetch reloads its cursors.
pub(crate) fn wait<'a>(
    conn: &mut Conn,
    consumers: impl Iterator<Item = &'a ConsumerCursors> + Clone,
    pace: &mut Pace,
    timeout: Duration,
) -> Result<bool, BackendError> {
    let deadline = Instant::now() + timeout;
    loop {
        let now = Instant::now();
        let left = deadline.saturating_duration_since(now);
        std::thread::sleep(pace.interval(now).min(left));
        if consumers.clone().any(ConsumerCursors::has_gaps) {
            return Ok(true);
        }
        if probe(conn, consumers.clone())? {
            pace.activity();
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

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_pace_is_slow_until_activity_then_fast_and_slower_with_quiet() {
        let mut pace = Pace::new((MS, 50 * MS));
        let now = Instant::now();
        assert_eq!(
            pace.interval(now),
            50 * MS,
            "no activity yet: the slowest poll"
        );
        pace.activity();
        let at = pace.active.unwrap();
        assert_eq!(pace.interval(at), MS, "right after activity: the fastest");
        assert_eq!(
            pace.interval(at + 10 * MS),
            MS,
            "a twentieth of 10 ms is below the fastest"
        );
        assert_eq!(pace.interval(at + 200 * MS), 10 * MS);
        assert_eq!(pace.interval(at + 1000 * MS), 50 * MS);
        assert_eq!(
            pace.interval(at + 60_000 * MS),
            50 * MS,
            "never slower than the slowest"
        );
    }

    #[test]
    fn equal_bounds_poll_at_one_pace() {
        let mut pace = Pace::new((50 * MS, 50 * MS));
        pace.activity();
        let at = pace.active.unwrap();
        assert_eq!(pace.interval(at), 50 * MS);
        assert_eq!(pace.interval(at + 5000 * MS), 50 * MS);
    }
}
