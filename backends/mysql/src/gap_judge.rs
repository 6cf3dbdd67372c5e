//! When a gap is dead: [`GapJudge`] decides which ids missing from a log table were
//! rolled back and may be forgotten, and [`choose_method`] picks how, for this server and
//! user. See `reader.rs` for what a gap is and `gaps.rs` for their bookkeeping.
//!
//! # When a gap is dead
//!
//! A rolled-back transaction leaves a gap that never fills. It may be forgotten only
//! when no transaction that could still fill it is open:
//!
//! - With `information_schema.INNODB_TRX` readable (PROCESS privilege, InnoDB plugin 1.0
//!   / MySQL 5.5 or later): the first up-to-date list of open **writers** taken after a
//!   gap was seen is kept with the gap. The transaction holding the id was in that list,
//!   unless it had already finished: it took the id before the reader saw a larger one,
//!   and it had changed a row by then, because the capture triggers run `AFTER` the
//!   change of the user's (InnoDB) row; a transaction that started later cannot hold a
//!   smaller id. Once a later list shares no transaction with it, the holder has
//!   finished; a re-read **after** that list decides: the row is there (committed,
//!   deliver it) or not (rolled back, the gap is dead). Checking the list first and
//!   re-reading second is what makes a commit between the two harmless.
//!
//!   A writer is a transaction with `trx_rows_modified > 0` (`trx_weight > 0` where the
//!   column is missing, before MySQL 5.5). So a `START TRANSACTION WITH CONSISTENT
//!   SNAPSHOT` held for hours by `mysqldump --single-transaction`, or a long report,
//!   keeps no gap alive. A long transaction that has written rows anywhere may still hold
//!   any gap: its gaps stay, cost a re-read per fetch and hold back pruning until it ends,
//!   never delivery.
//!
//!   "Up-to-date" matters: InnoDB serves INNODB_TRX from a cache that is refreshed only
//!   when it has not been read for 0.1 s, so a busy server can answer with an old list.
//!   The check therefore runs inside its own `START TRANSACTION WITH CONSISTENT
//!   SNAPSHOT`, with a literal of its own in the SELECT (a nonce), and trusts the list
//!   only if it shows this connection executing that very statement (`trx_query`): then
//!   the list was taken after the check began, which is after the gap was seen. Seeing
//!   this connection is not enough: a cache filled during the connection's *previous*
//!   check shows the same thread with the same empty trx_id, and trusting it lost a
//!   change under heavy gap churn (found by the differential test; checked by hand on
//!   MariaDB 10.11: a second check within 0.1 s shows the first one's statement). Stale
//!   lists are skipped, with the check interval backing off (many readers polling the
//!   table keep its cache from refreshing).
//! - Otherwise (no PROCESS, or MySQL 5.0/5.1 without the table): a gap that has been
//!   missing for `gap_timeout_ms` is read once more with `READ UNCOMMITTED`. An open
//!   transaction's log row is in the table from its INSERT on, so an id found by that
//!   read is kept (and delivered at commit, however long the transaction stays open); an
//!   id it does not find either, nor the committed re-read after it, is dead. What this
//!   cannot see is a transaction that took its id but has not written the row yet: for
//!   longer than `gap_timeout_ms` that needs a lock wait on the log table itself
//!   (`innodb_lock_wait_timeout`, 50 s by default, below the 60 s default timeout).

use std::sync::Arc;
use std::time::{Duration, Instant};

use epidemic_plugin_sdk::backend::BackendError;
use mysql::prelude::Queryable;
use mysql::Conn;

use crate::capture::quote;
use crate::error::{server_code, sql_err, ER_BAD_FIELD_ERROR, NO_INNODB_TRX_CODES};
use crate::gaps::{GapSeen, GapSet, TrxSet};
use crate::options::{GapDetection, MySqlOptions};
use crate::reader::gap_condition;

/// How dead gaps are recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GapMethod {
    InnoDbTrx,
    Timeout(Duration),
}

/// Which INNODB_TRX column says a transaction has written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WritesColumn {
    /// MySQL 5.5+, MariaDB 5.5+: undo records written.
    RowsModified,
    /// InnoDB plugin 1.0 (MySQL 5.1): undo records plus locks held, so a locking reader
    /// counts as a writer too (safe, only slower to clear).
    Weight,
}

impl WritesColumn {
    fn name(self) -> &'static str {
        match self {
            WritesColumn::RowsModified => "trx_rows_modified",
            WritesColumn::Weight => "trx_weight",
        }
    }
}

/// Decides when gaps are dead; see the module docs.
pub(crate) struct GapJudge {
    pub method: GapMethod,
    /// The timeout to fall back to if INNODB_TRX stops being readable.
    fallback: Duration,
    writes: WritesColumn,
    base_interval: Duration,
    interval: Duration,
    next_check: Instant,
    /// Numbers the checks, so each check's statement is unique (see `open_writers`).
    checks: u64,
}

/// A transaction as INNODB_TRX lists it: trx_id, thread, started, rows written, the
/// statement it is executing (all as text, which every version can give).
type TrxRow = (
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
);

/// The open writers in an INNODB_TRX list, and whether the list is up to date: it shows
/// the checking connection (thread `me`) executing the check's own statement (the one
/// holding `nonce`). A transaction that has changed no row holds no log id (see the
/// module docs), so it is left out.
fn open_writers(rows: Vec<TrxRow>, me: &str, nonce: &str) -> (bool, TrxSet) {
    let mut fresh = false;
    let mut open = TrxSet::new();
    for (id, thread, started, writes, query) in rows {
        let thread = thread.unwrap_or_default();
        if thread == me {
            fresh |= query.is_some_and(|q| q.contains(nonce));
            continue;
        }
        // Anything unreadable counts as a writer: keeping a gap too long is safe.
        let writes = writes
            .and_then(|w| w.trim().parse::<u64>().ok())
            .unwrap_or(1);
        if writes == 0 {
            continue;
        }
        open.insert(format!(
            "{}/{thread}/{}",
            id.unwrap_or_default(),
            started.unwrap_or_default()
        ));
    }
    (fresh, open)
}

impl GapJudge {
    pub fn new(method: GapMethod, fallback: Duration, interval: Duration) -> Self {
        GapJudge {
            method,
            fallback,
            writes: WritesColumn::RowsModified,
            base_interval: interval,
            interval,
            next_check: Instant::now(),
            checks: 0,
        }
    }

    pub fn due(&self) -> bool {
        Instant::now() >= self.next_check
    }

    /// A check starts now; the next is due one interval later.
    pub fn checked(&mut self) {
        self.next_check = Instant::now() + self.interval;
    }

    /// The open writers, excluding this connection, if the list is up to date.
    fn open_transactions(&mut self, conn: &mut Conn) -> Result<Option<Arc<TrxSet>>, BackendError> {
        conn.query_drop("START TRANSACTION WITH CONSISTENT SNAPSHOT")
            .map_err(sql_err)?;
        self.checks += 1;
        // A literal, not a comment: clients and proxies may strip comments.
        let nonce = format!("epidemic-gap-check-{}-{}", std::process::id(), self.checks);
        let rows: Result<Vec<TrxRow>, mysql::Error> = conn.query(format!(
            "SELECT trx_id, trx_mysql_thread_id, trx_started, {}, trx_query \
             FROM information_schema.INNODB_TRX WHERE '{nonce}' <> ''",
            self.writes.name()
        ));
        let ended = conn.query_drop("COMMIT");
        let rows = match rows {
            Ok(rows) => rows,
            Err(e)
                if server_code(&e) == Some(ER_BAD_FIELD_ERROR)
                    && self.writes == WritesColumn::RowsModified =>
            {
                ended.map_err(sql_err)?;
                self.writes = WritesColumn::Weight;
                return self.open_transactions(conn);
            }
            Err(e) if server_code(&e).is_some_and(|c| NO_INNODB_TRX_CODES.contains(&c)) => {
                // The privilege was revoked under a running daemon. The fallback keeps
                // every gap whose row is in the table; `status` says what it cannot see.
                self.method = GapMethod::Timeout(self.fallback);
                return Ok(None);
            }
            Err(e) => return Err(sql_err(e)),
        };
        ended.map_err(sql_err)?;
        let (fresh, open) = open_writers(rows, &conn.connection_id().to_string(), &nonce);
        // A stale list is most likely when many readers poll INNODB_TRX: back off so the
        // cache gets the 0.1 s of quiet it needs to refresh.
        self.interval = if fresh {
            self.base_interval
        } else {
            (self.interval * 2).min(self.base_interval * 16)
        };
        self.next_check = Instant::now() + self.interval;
        Ok(fresh.then(|| Arc::new(open)))
    }

    /// The gap ranges at or below the high-water that may be dead: a re-read that still
    /// misses them proves it. `open_now` caches one INNODB_TRX list per fetch.
    /// `log_table` is the table's log, `hw` the cursor's high-water, `gaps` its gaps.
    pub fn candidates(
        &mut self,
        conn: &mut Conn,
        log_table: &str,
        hw: i64,
        gaps: &mut GapSet,
        chunk: usize,
        open_now: &mut Option<Option<Arc<TrxSet>>>,
    ) -> Result<Vec<(i64, i64, GapSeen)>, BackendError> {
        if let GapMethod::Timeout(timeout) = self.method {
            let timed_out: Vec<(i64, i64, GapSeen)> = gaps
                .ranges()
                .take_while(|(lo, ..)| *lo <= hw)
                .filter(|(.., seen)| seen.at.elapsed() >= timeout)
                .map(|(lo, hi, seen)| (lo, hi.min(hw), seen.clone()))
                .collect();
            if timed_out.is_empty() {
                return Ok(timed_out);
            }
            let ranges: Vec<(i64, i64)> = timed_out.iter().map(|(l, h, _)| (*l, *h)).collect();
            let present = uncommitted_ids(conn, log_table, &ranges, chunk)?;
            return Ok(without_ids(timed_out, &present));
        }
        let open = match open_now {
            Some(open) => open.clone(),
            None => {
                let open = self.open_transactions(conn)?;
                *open_now = Some(open.clone());
                open
            }
        };
        let Some(open) = open else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for (lo, hi, seen) in gaps.seen_mut() {
            // Every gap here was seen by an earlier statement than this check's, so the
            // list is the first up-to-date one after the gap was seen, or a later one.
            let then = seen.open_then.get_or_insert_with(|| Arc::clone(&open));
            if lo <= hw && then.is_disjoint(&open) {
                out.push((lo, hi.min(hw), seen.clone()));
            }
        }
        Ok(out)
    }
}

/// The ids in `ranges` whose rows are in the log table now, committed or not: a
/// `READ UNCOMMITTED` read sees the row an open transaction inserted. The isolation is
/// set for that one transaction only; the session keeps its own.
fn uncommitted_ids(
    conn: &mut Conn,
    log_table: &str,
    ranges: &[(i64, i64)],
    chunk: usize,
) -> Result<Vec<i64>, BackendError> {
    let mut out = Vec::new();
    for part in ranges.chunks(chunk.max(1)) {
        conn.query_drop("SET TRANSACTION ISOLATION LEVEL READ UNCOMMITTED")
            .map_err(sql_err)?;
        conn.query_drop("START TRANSACTION").map_err(sql_err)?;
        let ids: Result<Vec<i64>, mysql::Error> = conn.query(format!(
            "SELECT `id` FROM {} WHERE {} ORDER BY `id`",
            quote(log_table),
            gap_condition(None, part)
        ));
        let ended = conn.query_drop("COMMIT");
        out.extend(ids.map_err(sql_err)?);
        ended.map_err(sql_err)?;
    }
    Ok(out)
}

/// `ranges` (ascending, disjoint) with the ids in `present` (ascending) cut out.
fn without_ids(ranges: Vec<(i64, i64, GapSeen)>, present: &[i64]) -> Vec<(i64, i64, GapSeen)> {
    let mut out = Vec::new();
    for (lo, hi, seen) in ranges {
        let from = present.partition_point(|id| *id < lo);
        let to = present.partition_point(|id| *id <= hi);
        let mut next = lo;
        for &id in &present[from..to] {
            if id > next {
                out.push((next, id - 1, seen.clone()));
            }
            next = id + 1;
        }
        if next <= hi {
            out.push((next, hi, seen));
        }
    }
    out
}

/// `CURRENT_USER()` (`name@host`) as a GRANT spells it: `'name'@'host'`.
fn grantee(current_user: &str) -> String {
    let (name, host) = current_user.rsplit_once('@').unwrap_or((current_user, "%"));
    format!(
        "'{}'@'{}'",
        name.replace('\'', "''"),
        host.replace('\'', "''")
    )
}

/// What the timeout fallback cannot see, for the operator.
fn timeout_consequence(options: &MySqlOptions) -> String {
    format!(
        "an id missing from a log table counts as rolled back once it has been missing for gap_timeout_ms = {} \
         and a READ UNCOMMITTED read does not find its row either, so a change whose transaction waits longer than that \
         between taking its log id and writing the log row (a lock wait on the log table) is never delivered",
        options.gap_timeout_ms
    )
}

/// Choose how gaps are proven dead; with the timeout, also the warning that says what
/// it cannot see and how to avoid it (for `status`, and logged by `run` at start).
pub(crate) fn choose_method(
    conn: &mut Conn,
    options: &MySqlOptions,
) -> Result<(GapMethod, Option<String>), BackendError> {
    let timeout = GapMethod::Timeout(Duration::from_millis(options.gap_timeout_ms));
    if options.gap_detection == GapDetection::Timeout {
        return Ok((
            timeout,
            Some(format!(
                "gap_detection = \"timeout\": {}; use gap_detection = \"auto\" with the PROCESS privilege to avoid it",
                timeout_consequence(options)
            )),
        ));
    }
    match conn.query_drop("SELECT COUNT(*) FROM information_schema.INNODB_TRX") {
        Ok(()) => Ok((GapMethod::InnoDbTrx, None)),
        Err(e) if server_code(&e).is_some_and(|c| NO_INNODB_TRX_CODES.contains(&c)) => {
            if options.gap_detection == GapDetection::InnodbTrx {
                return Err(BackendError::Invalid(format!(
                    "gap_detection = \"innodb_trx\" but information_schema.INNODB_TRX is not readable: {e}"
                )));
            }
            let warning = if server_code(&e) == Some(1109) {
                format!(
                    "this server has no information_schema.INNODB_TRX (MySQL 5.0/5.1 without the InnoDB plugin): {}; \
                     upgrade, or load the InnoDB plugin, to avoid it",
                    timeout_consequence(options)
                )
            } else {
                let user: Option<String> =
                    conn.query_first("SELECT CURRENT_USER()").map_err(sql_err)?;
                let grantee = grantee(&user.unwrap_or_default());
                format!(
                    "MySQL user {grantee} cannot read information_schema.INNODB_TRX (it needs the PROCESS privilege): {}; \
                     fix: GRANT PROCESS ON *.* TO {grantee}",
                    timeout_consequence(options)
                )
            };
            Ok((timeout, Some(warning)))
        }
        Err(e) => Err(sql_err(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_writers_can_hold_a_gap() {
        let row = |id: &str, thread: &str, writes: Option<&str>, query: Option<&str>| {
            (
                Some(id.to_owned()),
                Some(thread.to_owned()),
                Some("2026-01-01 00:00:00".to_owned()),
                writes.map(str::to_owned),
                query.map(str::to_owned),
            )
        };
        let rows = vec![
            // This check's own statement: the list is up to date.
            row("0", "7", Some("0"), Some("SELECT … WHERE 'nonce-2' <> ''")),
            // A consistent snapshot (mysqldump) and a long SELECT: they wrote nothing.
            row("0", "8", Some("0"), None),
            row("421", "9", Some("0"), Some("SELECT 1")),
            row("422", "10", Some("3"), None),
            // Unreadable counts as a writer.
            row("423", "11", None, None),
        ];
        let (fresh, open) = open_writers(rows.clone(), "7", "nonce-2");
        assert!(fresh);
        let mut open: Vec<String> = open.into_iter().collect();
        open.sort();
        assert_eq!(
            open,
            vec![
                "422/10/2026-01-01 00:00:00".to_owned(),
                "423/11/2026-01-01 00:00:00".to_owned()
            ]
        );
        assert!(
            !open_writers(rows.clone(), "99", "nonce-2").0,
            "a list without the check is stale"
        );
        // The same connection's previous check, served from InnoDB's cache: stale.
        assert!(
            !open_writers(rows, "7", "nonce-3").0,
            "a list showing the previous check's statement is stale"
        );
    }

    #[test]
    fn ids_an_open_transaction_wrote_are_cut_out_of_timed_out_gaps() {
        let seen = GapSeen::now();
        let ranges = vec![(2, 2, seen.clone()), (5, 10, seen.clone()), (12, 12, seen)];
        let left: Vec<(i64, i64)> = without_ids(ranges, &[2, 5, 7, 8, 11])
            .into_iter()
            .map(|(l, h, _)| (l, h))
            .collect();
        assert_eq!(left, vec![(6, 6), (9, 10), (12, 12)]);
    }

    #[test]
    fn grantee_is_quoted_for_a_grant() {
        assert_eq!(grantee("epidemic@%"), "'epidemic'@'%'");
        assert_eq!(grantee("ep@db@10.0.0.%"), "'ep@db'@'10.0.0.%'");
        assert_eq!(grantee("o'neil@localhost"), "'o''neil'@'localhost'");
    }
}
