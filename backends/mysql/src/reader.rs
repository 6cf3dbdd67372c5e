//! Gap-safe reading of the log tables: [`MySqlPoller`] fetches a consumer's next
//! changes and acknowledges them.
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
//! When a gap is dead is `gap_judge.rs`'s question.
//!
//! # Watermarks
//!
//! A log row with `op = 'W'` is a backfill's watermark (`snapshot.rs`), delivered in id
//! order like any change, as a change of origin `Watermark` with no key and no values.
//! Every read above is one statement with one InnoDB read view, and a batch holds every
//! visible id below its last one that is new or a gap (with split reads, the gap reads
//! come after the read of the new ids and the batch is cut before anything they may not
//! have looked at): so when a batch brings a watermark, it brings before it (or an
//! earlier batch brought) every change committed before the watermark was inserted. The
//! whole argument is in ARCHITECTURE.md ("MySQL / MariaDB backfill rule").
//!
//! # Acknowledging
//!
//! Batches mix gap fills and new ids, in id order. `ack(upto)` marks everything in the
//! batch with id <= `upto` handled: fills leave the gap set, the high-water becomes the
//! largest handled new id, and ids that were missing below it become durable gaps. The
//! cursor row stores both (`high_water`, `gaps` as `3,5-9`), so a restarted daemon keeps
//! watching old gaps. Nothing else is kept between fetches that matters: a fresh
//! instance rebuilds everything from the cursor row.
//!
//! # What a change carries
//!
//! Every change has the row's key (`key`, and `old_key` when an UPDATE moved the row)
//! from the captured key columns, and a stable id: the log's identity (made by the
//! database when install created the log table, see `install.rs`) and the log id. The
//! identity is read in the very statement that reads the rows, so a change is never
//! named after another incarnation of its log.
//!
//! A cursor belongs to one incarnation of a log: install moves every cursor of a table
//! back to the start in the statement that gives its new log a new identity. A reader
//! holding cursors of an older incarnation (a log dropped by hand and made again under
//! a running daemon) notices, because rows, an empty read's check and every cursor write
//! carry the identity, and reloads its cursors ([`ReadError::Stale`]) instead of skipping
//! the new log's first ids.
//!
//! Not given: the writing transaction (`txid`) and a commit order (`commit_seq`). A
//! trigger cannot learn its transaction's id without a query of `INNODB_TRX` per row,
//! and log ids are not commit order (see above); `schema` is `None`, the URL names the
//! one database whose tables are watched.

use std::sync::Arc;

use epidemic_plugin_sdk::backend::{kit, BackendError, Batch, Consumer};
use epidemic_plugin_sdk::{Change, Op, Origin, Value};
use mysql::consts::ColumnType;
use mysql::prelude::Queryable;
use mysql::Conn;

use crate::capture::{literal, log_column, quote};
use crate::consumers::{ensure_live, DB_NOW_US};
use crate::error::sql_err;
use crate::gap_judge::GapJudge;
use crate::gaps::{GapSeen, GapSet, IdSeries};
use crate::registry::MySqlLogTable;

/// Why a read or an acknowledgement did not happen.
#[derive(Debug)]
pub(crate) enum ReadError {
    Backend(BackendError),
    /// The consumer's cursors belong to an older incarnation of this table's log (it was
    /// made again, and the cursors moved back to its start): reload them.
    Stale {
        table: String,
    },
}

impl From<BackendError> for ReadError {
    fn from(e: BackendError) -> Self {
        ReadError::Backend(e)
    }
}

/// One consumer's position in one table's log.
pub(crate) struct TableCursor {
    /// The table's registry entry as read together with the cursor row: its
    /// `identity` is the log this position is in.
    pub log: Arc<MySqlLogTable>,
    /// Every id up to here is handled, except the gaps at or below it.
    pub high_water: i64,
    /// Missing ids. At or below `high_water` they are durable (`epidemic_cursor.gaps`);
    /// above it they were only noticed by the last reads and become durable when an ack
    /// moves the high-water past them.
    pub gaps: GapSet,
    /// `SELECT <identity>, id, op, changed_at, old_..., new_... FROM log WHERE `; each
    /// read adds its id conditions, `ORDER BY` and `LIMIT`.
    select_prefix: String,
    /// Ids of the last batch from this table, ascending, for `ack`.
    pending: Vec<i64>,
    /// Gaps were proven dead since the cursor row was last written.
    dirty: bool,
}

/// The registry's identity of `table`'s log, as an SQL expression.
fn identity_expr(table: &str) -> String {
    format!(
        "(SELECT `log_identity` FROM `epidemic_watch` WHERE `source_table` = {})",
        literal(table)
    )
}

impl TableCursor {
    pub fn new(log: Arc<MySqlLogTable>, high_water: i64, gaps: GapSet) -> Self {
        let olds = log.columns.iter().map(|c| quote(&log_column("old", c)));
        let news = log.columns.iter().map(|c| quote(&log_column("new", c)));
        let select_prefix = format!(
            "SELECT {}, `id`, `op`, `changed_at`, {} FROM {} WHERE ",
            identity_expr(&log.source_table),
            olds.chain(news).collect::<Vec<_>>().join(", "),
            quote(&log.log_table)
        );
        TableCursor {
            log,
            high_water,
            gaps,
            select_prefix,
            pending: Vec::new(),
            dirty: false,
        }
    }

    fn stale(&self) -> ReadError {
        ReadError::Stale {
            table: self.log.source_table.clone(),
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

    /// Whether every cursor is in the log the registry has now (one statement).
    pub fn current(&self, conn: &mut Conn) -> Result<bool, BackendError> {
        if self.tables.is_empty() {
            return Ok(true);
        }
        let exprs: Vec<String> = self
            .tables
            .iter()
            .map(|t| identity_expr(&t.log.source_table))
            .collect();
        let row: Option<mysql::Row> = conn
            .query_first(format!("SELECT {}", exprs.join(", ")))
            .map_err(sql_err)?;
        let Some(row) = row else { return Ok(false) };
        Ok(self
            .tables
            .iter()
            .enumerate()
            .all(|(i, t)| row.get::<Option<String>, _>(i).flatten() == t.log.identity))
    }
}

/// Reads batches and keeps cursors for the consumers of one backend instance.
pub(crate) struct MySqlPoller {
    pub judge: GapJudge,
    /// Most gap ranges one statement re-reads (10 000 is about 150 KB of SQL). Beyond
    /// that, new ids are read first and the gaps after, in several statements.
    pub max_gap_ranges: usize,
    /// The ids the server hands out, refreshed at every gap check.
    pub series: IdSeries,
    /// The last fetch left nothing behind that it knows of: fewer changes than `max`,
    /// from the last of the consumer's tables it tried (the others had none), or
    /// nothing at all. Paces a dense stream (see `lib.rs`).
    pub caught_up: bool,
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
    ) -> Result<Batch, ReadError> {
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
                self.judge.candidates(
                    conn,
                    &tc.log.log_table,
                    tc.high_water,
                    &mut tc.gaps,
                    self.max_gap_ranges,
                    &mut open_now,
                )?
            } else {
                Vec::new()
            };
            let changes = read_table(conn, tc, max, self.max_gap_ranges, self.series, &candidates)?;
            if changes.is_empty() {
                if tc.dirty {
                    let text = tc.gaps.to_text(tc.high_water);
                    write_cursor(conn, consumer, tc, tc.high_water, &text)?;
                    tc.dirty = false;
                }
                continue;
            }
            cursors.next = (idx + 1) % n;
            self.caught_up = i + 1 == n && changes.len() < max as usize;
            return Ok(Batch {
                changes,
                token: tc.log.source_table.clone(),
            });
        }
        // Nothing new: rows would have shown a log made again, an empty read does not.
        if !cursors.current(conn)? {
            return Err(cursors.tables[0].stale());
        }
        self.caught_up = true;
        Ok(Batch::default())
    }

    pub fn ack(
        &mut self,
        conn: &mut Conn,
        consumer: &Consumer,
        cursors: &mut ConsumerCursors,
        token: &str,
        upto_id: i64,
    ) -> Result<(), ReadError> {
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
        write_cursor(conn, consumer, tc, high_water, &gaps.to_text(high_water))?;
        tc.high_water = high_water;
        tc.gaps = gaps;
        tc.pending.drain(..handled);
        tc.dirty = false;
        Ok(())
    }
}

/// Store a cursor position, only into the log incarnation it is a position in: the
/// registry's identity is checked in the same statement (a locking read, so an install
/// making the log again waits or is waited for).
fn write_cursor(
    conn: &mut Conn,
    consumer: &Consumer,
    tc: &TableCursor,
    high_water: i64,
    gaps: &str,
) -> Result<(), ReadError> {
    let table = &tc.log.source_table;
    conn.exec_drop(
        format!(
            "UPDATE epidemic_cursor SET high_water = ?, gaps = ?, last_seen = {DB_NOW_US} \
             WHERE daemon = ? AND handler = ? AND source_table = ? AND evicted_at IS NULL \
             AND EXISTS (SELECT 1 FROM epidemic_watch WHERE source_table = ? AND log_identity <=> ?)"
        ),
        (
            high_water,
            gaps,
            &consumer.daemon,
            &consumer.handler,
            table,
            table,
            &tc.log.identity,
        ),
    )
    .map_err(sql_err)?;
    if conn.affected_rows() == 0 {
        // MySQL counts changed rows: 0 also means "the same values".
        let identity: Option<Option<String>> = conn
            .exec_first(
                "SELECT log_identity FROM epidemic_watch WHERE source_table = ?",
                (table,),
            )
            .map_err(sql_err)?;
        if identity.flatten() != tc.log.identity {
            return Err(tc.stale());
        }
        ensure_live(conn, consumer, Some(table))?;
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
) -> Result<Vec<Change>, ReadError> {
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
            tc.select_prefix,
            gap_condition(Some(hw), &included)
        );
        let rows = query_changes(conn, tc, &sql)?;
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
            tc.select_prefix,
            gap_condition(Some(hw), &[])
        );
        let new = query_changes(conn, tc, &sql)?;
        let mut rows = Vec::new();
        let mut examined = Vec::new();
        for part in included.chunks(max_gap_ranges) {
            let sql = format!(
                "{}{} ORDER BY `id` LIMIT {max}",
                tc.select_prefix,
                gap_condition(None, part)
            );
            let fills = query_changes(conn, tc, &sql)?;
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

/// Run a log read (text protocol) and turn the rows into changes. Rows of another
/// incarnation of the log than the cursor's are [`ReadError::Stale`].
fn query_changes(conn: &mut Conn, tc: &TableCursor, sql: &str) -> Result<Vec<Change>, ReadError> {
    let log = &tc.log;
    let ncol = log.columns.len();
    let mut out = Vec::new();
    let result = conn.query_iter(sql).map_err(sql_err)?;
    for row in result {
        let row = row.map_err(sql_err)?;
        let columns = row.columns();
        let mut vals = row.unwrap().into_iter().zip(columns.iter());
        let mut next = || vals.next().map(|(v, c)| value(v, c)).unwrap_or(Value::Null);
        let identity = match next() {
            Value::Text(i) => Some(i),
            _ => None,
        };
        if identity != tc.log.identity {
            return Err(tc.stale());
        }
        let Some(identity) = identity else {
            return Err(BackendError::Invalid(format!(
                "the log of table {} has no identity yet: run `epidemic install`",
                log.source_table
            ))
            .into());
        };
        let id = next().as_i64().ok_or_else(|| bad_row(log, "id"))?;
        let code = next();
        let changed_at_us = next().as_i64().unwrap_or(0);
        if code.as_str() == Some(WATERMARK_CODE) {
            out.push(watermark(log, &identity, id, changed_at_us));
            continue;
        }
        let op = code
            .as_str()
            .and_then(Op::from_code)
            .ok_or_else(|| bad_row(log, "op"))?;
        let old: Vec<Value> = (0..ncol).map(|_| next()).collect();
        let new: Vec<Value> = (0..ncol).map(|_| next()).collect();
        let key_of = |vals: &[Value]| -> Vec<Value> {
            log.key_at
                .iter()
                .map(|&i| vals.get(i).cloned().unwrap_or(Value::Null))
                .collect()
        };
        let (key, old_key) = kit::row_key(
            op,
            (op != Op::Insert).then(|| key_of(&old)),
            (op != Op::Delete).then(|| key_of(&new)),
        );
        out.push(Change {
            id,
            stable_id: kit::stable_id(&identity, id),
            schema: None,
            table: log.source_table.clone(),
            op,
            origin: Origin::Live,
            key_columns: Arc::clone(&log.key),
            key,
            old_key,
            columns: Arc::clone(&log.columns),
            old: (op != Op::Insert).then_some(old),
            new: (op != Op::Delete).then_some(new),
            changed_at_us,
            txid: None,
            commit_seq: None,
            attempt: 0,
        });
    }
    Ok(out)
}

/// The `op` of a backfill's watermark row (`snapshot.rs`). The triggers write only `I`,
/// `U` and `D`, so no change of a row can ever read as a watermark.
pub(crate) const WATERMARK_CODE: &str = "W";

/// A watermark as the consumer's stream carries it: its log id and table, no key and no
/// values; the host consumes it and no handler ever sees it.
fn watermark(log: &MySqlLogTable, identity: &str, id: i64, changed_at_us: i64) -> Change {
    Change {
        id,
        stable_id: kit::stable_id(identity, id),
        schema: None,
        table: log.source_table.clone(),
        op: Op::Insert,
        origin: Origin::Watermark,
        key_columns: Arc::from(Vec::new()),
        key: Vec::new(),
        old_key: None,
        columns: Arc::from(Vec::new()),
        old: None,
        new: None,
        changed_at_us,
        txid: None,
        commit_seq: None,
        attempt: 0,
    }
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

#[cfg(test)]
mod tests {
    use super::*;

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
