//! Gap-safe reading of the log tables: [`MySqlPoller`].
//!
//! # Why ids are not enough
//!
//! A log id is handed out when the trigger's INSERT runs and becomes visible when the
//! transaction commits. With concurrent writers, id 12 can be visible while id 11 is
//! still held by an open transaction; a reader that moves on to "after 12" never sees
//! 11. So each (consumer, table) keeps a **high-water mark** (the largest id handled)
//! and a set of **gaps** (ids at or below it that were missing when read).
//!
//! # Reading
//!
//! Each fetch reads new ids and re-reads every gap, in one statement while there are at
//! most `max_gap_ranges` gap ranges:
//! `SELECT ... WHERE id > high_water OR id IN (gaps) OR id BETWEEN lo AND hi
//! ORDER BY id LIMIT n`. New ids are delivered at once, however many gaps lie below
//! them: an open transaction never holds back what others committed. A gap that shows
//! up is delivered then, in id order with the rest of the batch.
//!
//! Changes to one row still arrive in commit order: a second change to a row waits for
//! the first transaction's row lock, so it gets a larger id and commits later. So a
//! read of the gaps that starts after the read of the new ids sees every gap whose
//! transaction committed before a new id was read (InnoDB makes a commit visible before
//! it releases its locks), and the batch puts those fills first. With more gap ranges
//! than one statement should carry, the fetch therefore reads the new ids first and then
//! re-reads all the gaps in statements of `max_gap_ranges` ranges each: delivery never
//! stops, it only costs more statements (and `status` says so).
//!
//! Ids the server never hands out are not gaps: with `auto_increment_increment` N
//! (Galera sets it to the cluster size) only ids `offset + k * N` exist, read from the
//! server's global variables at every gap check ([`IdSeries`]). A writer that sets
//! another increment or offset for its own session is not understood this way; its
//! holes between the series' ids are read as "not gaps".
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
//!
//! # Acknowledging
//!
//! Batches mix gap fills and new ids, in id order. `ack(upto)` marks everything in the
//! batch with id <= `upto` handled: fills leave the gap set, the high-water becomes the
//! largest handled new id, and ids that were missing below it become durable gaps. The
//! cursor row stores both (`high_water`, `gaps` as `3,5-9`), so a restarted daemon keeps
//! watching old gaps. Nothing else is kept between fetches that matters: a fresh
//! instance rebuilds everything from the cursor row.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use epidemic_plugin_sdk::backend::{BackendError, Batch, Consumer};
use epidemic_plugin_sdk::{Change, Op, Value};
use mysql::consts::ColumnType;
use mysql::prelude::Queryable;
use mysql::Conn;

use crate::conn::{server_code, sql_err, NO_INNODB_TRX_CODES};
use crate::gaps::{GapSeen, GapSet, IdSeries, TrxSet};
use crate::schema::{quote, MySqlLogTable};

pub(crate) fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// How dead gaps are recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GapMethod {
    InnoDbTrx,
    Timeout(Duration),
}

/// One consumer's position in one table's log.
pub(crate) struct TableCursor {
    pub log: Arc<MySqlLogTable>,
    /// Every id up to here is handled, except the gaps at or below it.
    pub high_water: i64,
    /// Missing ids. At or below `high_water` they are durable (`epidemic_cursor.gaps`);
    /// above it they were only noticed by the last reads and become durable when an ack
    /// moves the high-water past them.
    pub gaps: GapSet,
    /// Ids of the last batch from this table, ascending, for `ack`.
    pending: Vec<i64>,
    /// Gaps were proven dead since the cursor row was last written.
    dirty: bool,
}

impl TableCursor {
    pub fn new(log: Arc<MySqlLogTable>, high_water: i64, gaps: GapSet) -> Self {
        TableCursor {
            log,
            high_water,
            gaps,
            pending: Vec::new(),
            dirty: false,
        }
    }
}

/// Everything one consumer reads.
pub(crate) struct ConsumerCursors {
    pub tables: Vec<TableCursor>,
    /// The table to try first on the next fetch, so no table starves the others.
    next: usize,
}

impl ConsumerCursors {
    pub fn new(tables: Vec<TableCursor>) -> Self {
        ConsumerCursors { tables, next: 0 }
    }

    /// Whether a gap is waiting to be re-read or proven dead.
    pub fn has_gaps(&self) -> bool {
        self.tables.iter().any(|t| !t.gaps.is_empty())
    }
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

/// Server error code for an unknown column (`trx_rows_modified` before MySQL 5.5).
const ER_BAD_FIELD_ERROR: u16 = 1054;

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

    fn due(&self) -> bool {
        Instant::now() >= self.next_check
    }

    /// A check starts now; the next is due one interval later.
    fn checked(&mut self) {
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
    fn candidates(
        &mut self,
        conn: &mut Conn,
        tc: &mut TableCursor,
        chunk: usize,
        open_now: &mut Option<Option<Arc<TrxSet>>>,
    ) -> Result<Vec<(i64, i64, GapSeen)>, BackendError> {
        let hw = tc.high_water;
        if let GapMethod::Timeout(timeout) = self.method {
            let timed_out: Vec<(i64, i64, GapSeen)> = tc
                .gaps
                .ranges()
                .take_while(|(lo, ..)| *lo <= hw)
                .filter(|(.., seen)| seen.at.elapsed() >= timeout)
                .map(|(lo, hi, seen)| (lo, hi.min(hw), seen.clone()))
                .collect();
            if timed_out.is_empty() {
                return Ok(timed_out);
            }
            let ranges: Vec<(i64, i64)> = timed_out.iter().map(|(l, h, _)| (*l, *h)).collect();
            let present = uncommitted_ids(conn, &tc.log, &ranges, chunk)?;
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
        for (lo, hi, seen) in tc.gaps.seen_mut() {
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
    log: &MySqlLogTable,
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
            quote(&log.log_table),
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

/// Reads batches and keeps cursors for the consumers of one backend instance.
pub(crate) struct MySqlPoller {
    pub judge: GapJudge,
    /// Most gap ranges one statement re-reads (10 000 is about 150 KB of SQL). Beyond
    /// that, new ids are read first and the gaps after, in several statements.
    pub max_gap_ranges: usize,
    /// The ids the server hands out, refreshed at every gap check.
    pub series: IdSeries,
}

/// The server's `auto_increment_increment` and `auto_increment_offset`, as new writer
/// sessions get them.
pub(crate) fn id_series(conn: &mut Conn) -> Result<IdSeries, BackendError> {
    let row: Option<(i64, i64)> = conn
        .query_first("SELECT @@GLOBAL.auto_increment_increment, @@GLOBAL.auto_increment_offset")
        .map_err(sql_err)?;
    Ok(row.map_or(IdSeries::ALL, |(inc, off)| IdSeries::new(inc, off)))
}

impl MySqlPoller {
    pub fn fetch(
        &mut self,
        conn: &mut Conn,
        consumer: &Consumer,
        cursors: &mut ConsumerCursors,
        max: u32,
    ) -> Result<Batch, BackendError> {
        if max == 0 || cursors.tables.is_empty() {
            return Ok(Batch::default());
        }
        let check = self.judge.due();
        if check {
            self.judge.checked();
            self.series = id_series(conn)?;
        }
        let mut open_now = None;
        let n = cursors.tables.len();
        for i in 0..n {
            let idx = (cursors.next + i) % n;
            let tc = &mut cursors.tables[idx];
            let candidates = if check && tc.gaps.any_upto(tc.high_water) {
                self.judge
                    .candidates(conn, tc, self.max_gap_ranges, &mut open_now)?
            } else {
                Vec::new()
            };
            let changes = read_table(conn, tc, max, self.max_gap_ranges, self.series, &candidates)?;
            if changes.is_empty() {
                if tc.dirty {
                    let text = tc.gaps.to_text(tc.high_water);
                    write_cursor(conn, consumer, &tc.log.source_table, tc.high_water, &text)?;
                    tc.dirty = false;
                }
                continue;
            }
            cursors.next = (idx + 1) % n;
            return Ok(Batch {
                changes,
                token: tc.log.source_table.clone(),
            });
        }
        Ok(Batch::default())
    }

    pub fn ack(
        &mut self,
        conn: &mut Conn,
        consumer: &Consumer,
        cursors: &mut ConsumerCursors,
        token: &str,
        upto_id: i64,
    ) -> Result<(), BackendError> {
        let tc = cursors
            .tables
            .iter_mut()
            .find(|t| t.log.source_table == token)
            .ok_or_else(|| BackendError::Other(format!("ack for unknown table {token:?}")))?;
        let handled = tc.pending.partition_point(|id| *id <= upto_id);
        if handled == 0 && !tc.dirty {
            return Ok(());
        }
        let mut gaps = tc.gaps.clone();
        let mut high_water = tc.high_water;
        for &id in &tc.pending[..handled] {
            if id <= tc.high_water {
                gaps.remove(id, self.series);
            } else {
                high_water = high_water.max(id);
            }
        }
        // Ids that were missing between the old and the new high-water are already in
        // `gaps` (the read put them there); `to_text` makes them durable.
        write_cursor(conn, consumer, token, high_water, &gaps.to_text(high_water))?;
        tc.high_water = high_water;
        tc.gaps = gaps;
        tc.pending.drain(..handled);
        tc.dirty = false;
        Ok(())
    }
}

pub(crate) fn write_cursor(
    conn: &mut Conn,
    consumer: &Consumer,
    table: &str,
    high_water: i64,
    gaps: &str,
) -> Result<(), BackendError> {
    conn.exec_drop(
        format!(
            "UPDATE epidemic_cursor SET high_water = ?, gaps = ?, last_seen = {} \
             WHERE daemon = ? AND handler = ? AND source_table = ? AND evicted_at IS NULL",
            crate::ops::DB_NOW_US
        ),
        (high_water, gaps, &consumer.daemon, &consumer.handler, table),
    )
    .map_err(sql_err)?;
    if conn.affected_rows() == 0 {
        crate::ops::ensure_live(conn, consumer, Some(table))?;
    }
    Ok(())
}

/// The `WHERE` condition of one read: new ids (after `high_water`, if given) plus the
/// gap ranges to re-read.
pub(crate) fn gap_condition(high_water: Option<i64>, ranges: &[(i64, i64)]) -> String {
    let mut terms = Vec::new();
    if let Some(hw) = high_water {
        terms.push(format!("`id` > {hw}"));
    }
    let singles: Vec<String> = ranges
        .iter()
        .filter(|(lo, hi)| lo == hi)
        .map(|(lo, _)| lo.to_string())
        .collect();
    if !singles.is_empty() {
        terms.push(format!("`id` IN ({})", singles.join(",")));
    }
    for (lo, hi) in ranges.iter().filter(|(lo, hi)| lo != hi) {
        terms.push(format!("`id` BETWEEN {lo} AND {hi}"));
    }
    terms.join(" OR ")
}

/// Read one table's next changes and update the cursor's gap bookkeeping: fills found,
/// dead gaps forgotten, new ids missing below the last one read remembered.
fn read_table(
    conn: &mut Conn,
    tc: &mut TableCursor,
    max: u32,
    max_gap_ranges: usize,
    series: IdSeries,
    candidates: &[(i64, i64, GapSeen)],
) -> Result<Vec<Change>, BackendError> {
    let hw = tc.high_water;
    let max_gap_ranges = max_gap_ranges.max(1);
    let included: Vec<(i64, i64)> = tc
        .gaps
        .ranges()
        .take_while(|(lo, ..)| *lo <= hw)
        .map(|(lo, hi, _)| (lo, hi.min(hw)))
        .collect();
    let full = |rows: &[Change]| rows.len() == max as usize;
    // `examined[k]`: the largest id the read of the k-th group of `chunk` gap ranges
    // looked at; with a full batch, ids after its last row were not examined.
    let (mut changes, chunk, examined) = if included.len() <= max_gap_ranges {
        let sql = format!(
            "{}{} ORDER BY `id` LIMIT {max}",
            tc.log.select_prefix,
            gap_condition(Some(hw), &included)
        );
        let rows = query_changes(conn, &tc.log, &sql)?;
        let upto = if full(&rows) {
            rows.last().map_or(i64::MAX, |c| c.id)
        } else {
            i64::MAX
        };
        (rows, included.len().max(1), vec![upto])
    } else {
        // New ids first, then every gap: see the module docs for why this order keeps
        // changes to one row in commit order.
        let sql = format!(
            "{}{} ORDER BY `id` LIMIT {max}",
            tc.log.select_prefix,
            gap_condition(Some(hw), &[])
        );
        let new = query_changes(conn, &tc.log, &sql)?;
        let mut rows = Vec::new();
        let mut examined = Vec::new();
        for part in included.chunks(max_gap_ranges) {
            let sql = format!(
                "{}{} ORDER BY `id` LIMIT {max}",
                tc.log.select_prefix,
                gap_condition(None, part)
            );
            let fills = query_changes(conn, &tc.log, &sql)?;
            examined.push(if full(&fills) {
                fills.last().map_or(i64::MAX, |c| c.id)
            } else {
                i64::MAX
            });
            rows.extend(fills);
        }
        // Gaps are below the high-water and new ids above it; the groups are in id order.
        rows.extend(new);
        (rows, max_gap_ranges, examined)
    };

    // Dead gaps: candidates the re-read examined and still did not find.
    for (lo, hi, seen) in candidates {
        // The included range holding the candidate, and the read that examined it.
        let at = included.partition_point(|(l, _)| *l <= *lo);
        let Some(&(_, included_hi)) = at.checked_sub(1).and_then(|i| included.get(i)) else {
            continue;
        };
        if *lo > included_hi {
            continue;
        }
        let hi = (*hi).min(included_hi).min(examined[(at - 1) / chunk]);
        if *lo > hi {
            continue;
        }
        let from = changes.partition_point(|c| c.id < *lo);
        let to = changes.partition_point(|c| c.id <= hi);
        let found: Vec<i64> = changes[from..to].iter().map(|c| c.id).collect();
        if found.len() as i64 == hi - lo + 1 {
            continue;
        }
        tc.gaps.remove_range(*lo, hi, series);
        // Rows found are in this batch but not handled yet: they stay gaps until acked.
        for id in found {
            tc.gaps.add_missing(id, id, seen);
        }
        tc.dirty = true;
    }
    // Rows past the batch size wait for the next read; fills come first.
    changes.truncate(max as usize);

    // New ids: everything of the server's id series between the high-water and the
    // last id read that is not here is held by an open transaction or was rolled back.
    let seen = GapSeen::now();
    let mut expect = hw.saturating_add(1);
    for c in changes.iter().filter(|c| c.id > hw) {
        if let Some((lo, hi)) = series.trim(expect, c.id - 1) {
            tc.gaps.add_missing(lo, hi, &seen);
        }
        tc.gaps.remove(c.id, series);
        expect = c.id + 1;
    }
    tc.pending = changes.iter().map(|c| c.id).collect();
    Ok(changes)
}

/// Run a log read (text protocol) and turn the rows into changes.
fn query_changes(
    conn: &mut Conn,
    log: &MySqlLogTable,
    sql: &str,
) -> Result<Vec<Change>, BackendError> {
    let ncol = log.columns.len();
    let mut out = Vec::new();
    let result = conn.query_iter(sql).map_err(sql_err)?;
    for row in result {
        let row = row.map_err(sql_err)?;
        let columns = row.columns();
        let mut vals = row.unwrap().into_iter().zip(columns.iter());
        let mut next = || vals.next().map(|(v, c)| value(v, c)).unwrap_or(Value::Null);
        let id = next().as_i64().ok_or_else(|| bad_row(log, "id"))?;
        let op = match next().as_str() {
            Some("I") => Op::Insert,
            Some("U") => Op::Update,
            Some("D") => Op::Delete,
            other => {
                return Err(BackendError::Other(format!(
                    "unknown op {other:?} in {} id {id}",
                    log.log_table
                )))
            }
        };
        let changed_at_us = next().as_i64().unwrap_or(0);
        let old: Vec<Value> = (0..ncol).map(|_| next()).collect();
        let new: Vec<Value> = (0..ncol).map(|_| next()).collect();
        out.push(Change {
            id,
            table: log.source_table.clone(),
            op,
            columns: Arc::clone(&log.columns),
            old: (op != Op::Insert).then_some(old),
            new: (op != Op::Delete).then_some(new),
            changed_at_us,
            ..Change::default()
        });
    }
    Ok(out)
}

fn bad_row(log: &MySqlLogTable, what: &str) -> BackendError {
    BackendError::Other(format!("{}: row without a valid {what}", log.log_table))
}

/// The character set number of binary strings (`BINARY`, `VARBINARY`, `BLOB`).
const BINARY_CHARSET: u16 = 63;

/// A column value as the SDK carries it. The text protocol sends every value as bytes;
/// the column's type says what they are. Integers become `Int` (an unsigned BIGINT
/// above i64's range stays text), FLOAT/DOUBLE `Float`, DECIMAL text (exact), dates and
/// times their SQL text, binary strings, BIT and geometry `Bytes`, everything else text.
pub(crate) fn value(v: mysql::Value, col: &mysql::Column) -> Value {
    use ColumnType::*;
    let bytes = match v {
        mysql::Value::NULL => return Value::Null,
        mysql::Value::Bytes(b) => b,
        mysql::Value::Int(i) => return Value::Int(i),
        mysql::Value::UInt(u) => {
            return i64::try_from(u).map_or_else(|_| Value::Text(u.to_string()), Value::Int)
        }
        mysql::Value::Float(f) => return Value::Float(f64::from(f)),
        mysql::Value::Double(f) => return Value::Float(f),
        // Only the binary protocol sends these; the reader uses the text protocol.
        other => return Value::Text(other.as_sql(true).trim_matches('\'').to_owned()),
    };
    match col.column_type() {
        MYSQL_TYPE_TINY | MYSQL_TYPE_SHORT | MYSQL_TYPE_LONG | MYSQL_TYPE_INT24
        | MYSQL_TYPE_LONGLONG | MYSQL_TYPE_YEAR => match std::str::from_utf8(&bytes)
            .ok()
            .and_then(|t| t.parse::<i64>().ok())
        {
            Some(i) => Value::Int(i),
            None => Value::Text(into_text(bytes)),
        },
        MYSQL_TYPE_FLOAT | MYSQL_TYPE_DOUBLE => {
            match std::str::from_utf8(&bytes)
                .ok()
                .and_then(|t| t.parse::<f64>().ok())
            {
                Some(f) => Value::Float(f),
                None => Value::Text(into_text(bytes)),
            }
        }
        MYSQL_TYPE_BIT | MYSQL_TYPE_GEOMETRY => Value::Bytes(bytes),
        MYSQL_TYPE_DECIMAL
        | MYSQL_TYPE_NEWDECIMAL
        | MYSQL_TYPE_JSON
        | MYSQL_TYPE_DATE
        | MYSQL_TYPE_NEWDATE
        | MYSQL_TYPE_TIME
        | MYSQL_TYPE_TIME2
        | MYSQL_TYPE_DATETIME
        | MYSQL_TYPE_DATETIME2
        | MYSQL_TYPE_TIMESTAMP
        | MYSQL_TYPE_TIMESTAMP2
        | MYSQL_TYPE_ENUM
        | MYSQL_TYPE_SET => Value::Text(into_text(bytes)),
        _ if col.character_set() == BINARY_CHARSET => Value::Bytes(bytes),
        _ => Value::Text(into_text(bytes)),
    }
}

/// Bytes the server sent as text; invalid UTF-8 (a latin1 column read through a utf8
/// connection cannot produce it, but a misdeclared one can) is replaced, not an error.
fn into_text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// The ids missing from a log table at or below `upto`: everything below its smallest
/// id and the holes between its rows. Used when a consumer starts "from now": an open
/// transaction may hold any of them, and its change commits after the consumer started.
pub(crate) fn missing_ids(
    conn: &mut Conn,
    log: &MySqlLogTable,
    upto: i64,
    series: IdSeries,
) -> Result<GapSet, BackendError> {
    const CHUNK: usize = 10_000;
    let seen = GapSeen::now();
    let mut gaps = GapSet::default();
    let mut expect = 1_i64;
    let sql = format!(
        "SELECT `id` FROM {} WHERE `id` >= ? AND `id` <= ? ORDER BY `id` LIMIT {CHUNK}",
        quote(&log.log_table)
    );
    loop {
        let ids: Vec<i64> = conn.exec(&sql, (expect, upto)).map_err(sql_err)?;
        for &id in &ids {
            if let Some((lo, hi)) = series.trim(expect, id - 1) {
                gaps.add_missing(lo, hi, &seen);
            }
            expect = id + 1;
        }
        if ids.len() < CHUNK {
            break;
        }
    }
    if let Some((lo, hi)) = series.trim(expect, upto) {
        gaps.add_missing(lo, hi, &seen);
    }
    Ok(gaps)
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
    fn read_condition_lists_singles_and_ranges() {
        assert_eq!(gap_condition(Some(10), &[]), "`id` > 10");
        assert_eq!(
            gap_condition(Some(10), &[(2, 2), (4, 6), (8, 8)]),
            "`id` > 10 OR `id` IN (2,8) OR `id` BETWEEN 4 AND 6"
        );
        assert_eq!(
            gap_condition(None, &[(2, 2), (4, 6)]),
            "`id` IN (2) OR `id` BETWEEN 4 AND 6"
        );
    }
}
