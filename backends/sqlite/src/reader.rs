//! Reading a consumer's changes (fetch) and moving its cursor (ack).
//!
//! Each consumer (daemon, handler) has one cursor row per table in `epidemic_cursor`: the
//! id of the last change it handled. SQLite has one writer at a time and the log ids are
//! `AUTOINCREMENT`, so id order is commit order within a table and "handled up to id N"
//! is all a cursor needs. A batch comes from one table at a time, tables taken in turn so
//! none starves the others; its token is the table's name.
//!
//! What a change carries: its log id; `stable_id` = the log's identity and the id (see
//! `install`); the key columns of the key epoch the row was logged under, with `key` and
//! `old_key` from their values; the captured columns (key included) and their old/new
//! values; the capture time. SQLite gives no cheap transaction id and its log ids are per
//! table (no order across tables), so `txid` and `commit_seq` are `None`; it has no
//! schemas, so `schema` is `None`.
//!
//! A backfill's watermark (op `W`, see `snapshot`) is a log row like any other for the
//! cursor: it is read in id order with the changes around it and comes to every consumer
//! of the table as a change of origin `Watermark` with its log id and stable id, no key,
//! no columns and no values. The host consumes it; acks and prune pass it like a change.
//!
//! Acks never make the reader wait for the write lock while there is something to read.
//! An ack is written at once when the lock is free. When another connection holds it (in
//! WAL mode a writer holds it through its commit's fsync, and a steady writer takes it
//! back a few microseconds after each commit, so a waiting ack could starve for tens of
//! milliseconds), the ack is kept in memory and the consumer's in-memory cursor moves
//! on: the next fetch reads the following changes at once (a WAL reader never waits for
//! the writer). A kept ack is tried again, without waiting, before each fetch (right after
//! a wake-up, when the writer has just released the lock) and every fraction of a
//! millisecond while the reader waits for changes ([`SqliteReader::retry_pending`]).
//! Two bounds keep what a crash can cost as it was:
//! - a fetch never reads more than one batch (`max`) past the cursor the database has: when
//!   the kept acks cover a whole batch, the fetch waits for the lock and writes them first.
//!   So a crash redelivers at most one batch's worth of changes, and one daemon never hands
//!   a handler the same change twice;
//! - an ack kept longer than `busy_timeout_ms` (an application holds the lock) is an error,
//!   as a refused ack always was, and stays kept: the changes are not delivered again once
//!   per timeout (see [`SqliteReader::pending_acks`]).
//!
//! A kept ack that is written later moves the cursor only forward (`last_id < ?`), so its
//! lateness can never move a cursor back past an ack written meanwhile.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use epidemic_plugin_sdk::backend::{kit, BackendError, Batch, Consumer};
use epidemic_plugin_sdk::{Change, Op, Origin, Value};
use rusqlite::{params, Connection};

use crate::capture::{SqliteLogTable, WATERMARK_OP};
use crate::conn::{is_busy, LockWait};
use crate::consumers::gone;
use crate::error::sql_err;
use crate::install::watched;

/// What a consumer reads: per table, its log table and cursor.
struct ConsumerState {
    tables: Vec<(Arc<SqliteLogTable>, i64)>,
    /// The table to try first on the next fetch, so no table starves the others.
    next: usize,
}

#[derive(Default)]
pub(crate) struct SqliteReader {
    /// The last fetch left nothing behind that it knows of: it returned fewer changes
    /// than it could, from the last of the consumer's tables it tried (the others had
    /// none), or nothing at all. Paces a dense stream (see `lib.rs`).
    pub caught_up: bool,
    /// Cursor positions and registry entries as last read or acked; dropped whenever the
    /// registry or cursors may have changed (install, register, reconnect, or any schema
    /// change: see `schema_version`).
    consumers: HashMap<Consumer, ConsumerState>,
    /// `PRAGMA schema_version` when `consumers` was filled. Another daemon's install
    /// (a new key epoch, more captured columns, a log created again) always changes the
    /// schema, since it recreates the triggers: the registry entries are read again, so
    /// changes are not read with a key or identity that no longer holds.
    schema_version: Option<i64>,
    /// Acks not written yet because another connection held the write lock (or the
    /// file was unreachable): (consumer, table) → the cursor in the database and the id
    /// handled. The handler has handled these changes and the in-memory cursor is past
    /// them; they are written at the next chance (see the module docs), so a held lock
    /// delays the cursor instead of making the same changes be delivered again. Kept
    /// across `reconnect` (it is what was handled, not connection state); lost if the
    /// daemon dies, which only means redelivery (at least once) of at most one batch's
    /// worth of changes.
    pending_acks: HashMap<(Consumer, String), PendingAck>,
}

/// An ack the database has not taken yet.
#[derive(Debug, Clone, Copy)]
struct PendingAck {
    /// The cursor as the database has it: where a restart would resume.
    durable: i64,
    /// The id handled up to.
    upto: i64,
    /// Since when the ack has been refused (or since it was last reported refused).
    since: Instant,
}

/// The shortest interval between two tries of a kept ack while the reader waits.
const ACK_RETRY_MIN: Duration = Duration::from_micros(250);
/// The longest: an application holding the lock for seconds costs a few tries a second.
const ACK_RETRY_MAX: Duration = Duration::from_millis(20);

/// Whether writing kept acks may wait for the write lock.
#[derive(Debug, Clone, Copy, PartialEq)]
enum LockPolicy {
    /// Only if the lock is free now: a held lock keeps the ack for later.
    IfFree,
    /// Wait up to `busy_timeout_ms`; an error if the lock is still held then.
    Wait,
}

impl SqliteReader {
    /// Forget every consumer's cached state (the registry or cursors changed).
    pub fn forget_all(&mut self) {
        self.consumers.clear();
    }

    /// Forget one consumer's cached state and its kept acks (it registers again, or
    /// goes: its cursor is set anew).
    pub fn forget(&mut self, consumer: &Consumer) {
        self.consumers.remove(consumer);
        self.pending_acks.retain(|(c, _), _| c != consumer);
    }

    pub fn fetch(
        &mut self,
        conn: &Connection,
        lock: &LockWait,
        consumer: &Consumer,
        max: u32,
    ) -> Result<Batch, BackendError> {
        // Write the kept acks if the lock is free; if not, read on, as long as what is
        // handled but not acknowledged in the database stays within one batch.
        self.write_pending(conn, lock, Some(consumer), LockPolicy::IfFree)?;
        if self.unwritten(consumer) >= i64::from(max) {
            self.write_pending(conn, lock, Some(consumer), LockPolicy::Wait)?;
        }
        let room = (i64::from(max) - self.unwritten(consumer)).max(1);
        let version: i64 = conn
            .prepare_cached("PRAGMA schema_version")
            .and_then(|mut s| s.query_row([], |r| r.get(0)))
            .map_err(sql_err)?;
        if self.schema_version.replace(version) != Some(version) {
            self.consumers.clear();
        }
        self.caught_up = false;
        let state = self.state(conn, consumer)?;
        let n = state.tables.len();
        for i in 0..n {
            let idx = (state.next + i) % n;
            let (log, last) = &state.tables[idx];
            let changes = read_log(conn, log, *last, room)?;
            if !changes.is_empty() {
                state.next = (idx + 1) % n;
                let caught_up = i + 1 == n && (changes.len() as i64) < room;
                let token = log.source_table.clone();
                self.caught_up = caught_up;
                return Ok(Batch { changes, token });
            }
        }
        self.caught_up = true;
        Ok(Batch::default())
    }

    pub fn ack(
        &mut self,
        conn: &Connection,
        lock: &LockWait,
        consumer: &Consumer,
        token: &str,
        upto_id: i64,
    ) -> Result<(), BackendError> {
        let key = (consumer.clone(), token.to_owned());
        let kept = self.pending_acks.remove(&key);
        let upto_id = kept.map_or(upto_id, |p| p.upto.max(upto_id));
        let n = match lock.without_waiting(|| write_ack(conn, consumer, token, upto_id)) {
            Ok(n) => n,
            Err(e) if is_busy(&e) => {
                // A writer holds the lock: keep the ack and move the in-memory cursor,
                // so the next fetch reads on without waiting (see the module docs).
                if !cursor_live(conn, consumer, token)? {
                    self.consumers.remove(consumer);
                    return Err(gone(conn, consumer)?);
                }
                let state = self.state(conn, consumer)?;
                let Some((_, last)) = state
                    .tables
                    .iter_mut()
                    .find(|(l, _)| l.source_table == token)
                else {
                    return Err(BackendError::Other(format!(
                        "ack for unknown table {token:?}"
                    )));
                };
                // With no ack kept, the in-memory cursor is the database's.
                let durable = kept.map_or(*last, |p| p.durable);
                *last = (*last).max(upto_id);
                self.pending_acks.insert(
                    key,
                    PendingAck {
                        durable,
                        upto: upto_id,
                        since: kept.map_or_else(Instant::now, |p| p.since),
                    },
                );
                return Ok(());
            }
            Err(e) => {
                // A write that could not happen (an unreachable file) is tried again
                // before the next read; any other failure drops it, so a consumer is
                // never stuck behind one ack (at worst its changes come again).
                return Err(match sql_err(e) {
                    BackendError::Connection(m) => {
                        // Not read from the file, which may be unreachable: the
                        // in-memory cursor is the database's while no ack is kept.
                        let durable = kept.map(|p| p.durable).unwrap_or_else(|| {
                            self.in_memory_cursor(consumer, token).unwrap_or(upto_id)
                        });
                        self.pending_acks.insert(
                            key,
                            PendingAck {
                                durable,
                                upto: upto_id,
                                since: kept.map_or_else(Instant::now, |p| p.since),
                            },
                        );
                        BackendError::Connection(format!(
                            "acknowledging {token} up to change {upto_id}: {m}; written before the next read, the changes are not delivered again"
                        ))
                    }
                    other => {
                        self.consumers.remove(consumer);
                        other
                    }
                });
            }
        };
        if n == 0 {
            // Nothing moved: fine if the cursor is already there or beyond (an ack
            // repeated after a partial one), an error if it was evicted or is gone —
            // never a silent success.
            if !cursor_live(conn, consumer, token)? {
                self.consumers.remove(consumer);
                return Err(gone(conn, consumer)?);
            }
        }
        let state = self.state(conn, consumer)?;
        if let Some((_, last)) = state
            .tables
            .iter_mut()
            .find(|(l, _)| l.source_table == token)
        {
            *last = (*last).max(upto_id);
        } else if n == 0 {
            return Err(BackendError::Other(format!(
                "ack for unknown table {token:?}"
            )));
        }
        Ok(())
    }

    /// Write the kept acks of `consumer` (of every consumer: `None`), waiting for the
    /// lock or not as `policy` says. An ack the lock still keeps out stays kept: an
    /// error with [`LockPolicy::Wait`], none with [`LockPolicy::IfFree`].
    fn write_pending(
        &mut self,
        conn: &Connection,
        lock: &LockWait,
        consumer: Option<&Consumer>,
        policy: LockPolicy,
    ) -> Result<(), BackendError> {
        let keys: Vec<(Consumer, String)> = self
            .pending_acks
            .keys()
            .filter(|(c, _)| consumer.is_none_or(|want| c == want))
            .cloned()
            .collect();
        for key in keys {
            let Some(&PendingAck { upto, .. }) = self.pending_acks.get(&key) else {
                continue;
            };
            let (consumer, token) = (&key.0, key.1.as_str());
            let result = match policy {
                LockPolicy::IfFree => {
                    lock.without_waiting(|| write_ack(conn, consumer, token, upto))
                }
                LockPolicy::Wait => write_ack(conn, consumer, token, upto),
            };
            match result {
                Ok(n) => {
                    self.pending_acks.remove(&key);
                    if n == 0 && !cursor_live(conn, consumer, token)? {
                        self.consumers.remove(consumer);
                        return Err(gone(conn, consumer)?);
                    }
                    // An ack refused by an error had not moved the in-memory cursor.
                    if let Some((_, last)) = self
                        .consumers
                        .get_mut(consumer)
                        .and_then(|s| s.tables.iter_mut().find(|(l, _)| l.source_table == token))
                    {
                        *last = (*last).max(upto);
                    }
                }
                Err(e) if policy == LockPolicy::IfFree && is_busy(&e) => {}
                Err(e) => {
                    return Err(match sql_err(e) {
                        BackendError::Connection(m) => BackendError::Connection(format!(
                            "acknowledging {token} up to change {upto}: {m}; written before the next read, the changes are not delivered again"
                        )),
                        other => {
                            // Dropped, so the consumer is not stuck behind it; the
                            // cursor is read again, so those changes come again.
                            self.pending_acks.remove(&key);
                            self.consumers.remove(consumer);
                            other
                        }
                    });
                }
            }
        }
        Ok(())
    }

    /// Try the kept acks again without waiting for the lock (the reader waits for
    /// changes); returns whether some are still kept. One kept longer than `timeout`
    /// (`busy_timeout_ms`) is reported as the error a refused ack always was, and its
    /// clock starts again.
    pub fn retry_pending(
        &mut self,
        conn: &Connection,
        lock: &LockWait,
        timeout: Duration,
    ) -> Result<bool, BackendError> {
        self.write_pending(conn, lock, None, LockPolicy::IfFree)?;
        if let Some(((_, token), p)) = self
            .pending_acks
            .iter_mut()
            .find(|(_, p)| p.since.elapsed() >= timeout)
        {
            p.since = Instant::now();
            return Err(BackendError::Connection(format!(
                "acknowledging {token} up to change {}: database is locked for longer than busy_timeout_ms; written before the next read, the changes are not delivered again",
                p.upto
            )));
        }
        Ok(!self.pending_acks.is_empty())
    }

    /// When the kept acks should be tried again: soon after they were refused, less
    /// often the longer the lock stays held.
    pub fn retry_interval(&self) -> Option<Duration> {
        let oldest = self.pending_acks.values().map(|p| p.since).min()?;
        Some((oldest.elapsed() / 16).clamp(ACK_RETRY_MIN, ACK_RETRY_MAX))
    }

    /// How many log ids lie between `consumer`'s cursors in the database and what its
    /// handler handled: at least the number of changes a crash would deliver again.
    fn unwritten(&self, consumer: &Consumer) -> i64 {
        self.pending_acks
            .iter()
            .filter(|((c, _), _)| c == consumer)
            .map(|(_, p)| p.upto.saturating_sub(p.durable).max(0))
            .sum()
    }

    /// Where the consumer's reading stands on `table`, if its state is loaded.
    fn in_memory_cursor(&self, consumer: &Consumer, table: &str) -> Option<i64> {
        self.consumers
            .get(consumer)?
            .tables
            .iter()
            .find(|(l, _)| l.source_table == table)
            .map(|(_, last)| *last)
    }

    /// Try the kept acks once more, waiting for the lock (a clean stop), so the next
    /// start does not deliver those changes again.
    pub fn flush(&mut self, conn: &Connection, lock: &LockWait) {
        let _ = self.write_pending(conn, lock, None, LockPolicy::Wait);
    }

    fn state(
        &mut self,
        conn: &Connection,
        consumer: &Consumer,
    ) -> Result<&mut ConsumerState, BackendError> {
        if !self.consumers.contains_key(consumer) {
            let mut state = load_state(conn, consumer)?;
            // The kept acks are handled changes: reading resumes after them.
            for (log, last) in &mut state.tables {
                let key = (consumer.clone(), log.source_table.clone());
                if let Some(p) = self.pending_acks.get(&key) {
                    *last = (*last).max(p.upto);
                }
            }
            self.consumers.insert(consumer.clone(), state);
        }
        Ok(self.consumers.get_mut(consumer).expect("inserted above"))
    }
}

/// The consumer's cursors as the database has them.
fn load_state(conn: &Connection, consumer: &Consumer) -> Result<ConsumerState, BackendError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT source_table, last_id FROM epidemic_cursor WHERE daemon = ?1 AND handler = ?2 ORDER BY source_table",
        )
        .map_err(sql_err)?;
    let rows: Vec<(String, i64)> = stmt
        .query_map(params![consumer.daemon, consumer.handler], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .map_err(sql_err)?
        .collect::<Result<_, _>>()
        .map_err(sql_err)?;
    drop(stmt);
    if rows.is_empty() {
        return Err(kit::not_registered(consumer));
    }
    let mut tables = Vec::with_capacity(rows.len());
    for (table, last) in rows {
        let log = watched(conn, &table)?.ok_or_else(|| {
            BackendError::Invalid(format!(
                "table {table} is not watched; run `epidemic install`"
            ))
        })?;
        if log.identity.is_none() {
            return Err(BackendError::Invalid(format!(
                "log {} was installed by an older Epidemic (it has no identity for stable ids); run `epidemic install`",
                log.log_table
            )));
        }
        tables.push((Arc::new(log), last));
    }
    Ok(ConsumerState { tables, next: 0 })
}

/// Whether the consumer has a live (not evicted) cursor on `table`. A read: it never
/// waits for a writer in WAL mode.
fn cursor_live(conn: &Connection, consumer: &Consumer, table: &str) -> Result<bool, BackendError> {
    conn.prepare_cached(
        "SELECT count(*) > 0 FROM epidemic_cursor
         WHERE daemon = ?1 AND handler = ?2 AND source_table = ?3 AND evicted_at IS NULL",
    )
    .and_then(|mut s| {
        s.query_row(params![consumer.daemon, consumer.handler, table], |r| {
            r.get(0)
        })
    })
    .map_err(sql_err)
}

/// Move a consumer's cursor forward (never back) to `upto_id`; returns the rows updated.
fn write_ack(
    conn: &Connection,
    consumer: &Consumer,
    token: &str,
    upto_id: i64,
) -> rusqlite::Result<usize> {
    conn.prepare_cached(
        "UPDATE epidemic_cursor SET last_id = ?4, last_seen = ?5
         WHERE daemon = ?1 AND handler = ?2 AND source_table = ?3 AND last_id < ?4 AND evicted_at IS NULL",
    )
    .and_then(|mut s| {
        s.execute(params![
            consumer.daemon,
            consumer.handler,
            token,
            upto_id,
            kit::now_us()
        ])
    })
}

/// A value as SQLite stored it: the log and a snapshot read of the user's table give the
/// same `Value` for the same stored value.
pub(crate) fn value(v: rusqlite::types::ValueRef<'_>) -> Value {
    use rusqlite::types::ValueRef;
    match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::Int(i),
        ValueRef::Real(f) => Value::Float(f),
        ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => Value::Bytes(b.to_vec()),
    }
}

/// Up to `max` changes after `after` from one log table, in id (= commit) order.
fn read_log(
    conn: &Connection,
    log: &SqliteLogTable,
    after: i64,
    max: i64,
) -> Result<Vec<Change>, BackendError> {
    let identity = log.identity.as_deref().unwrap_or_default();
    let mut stmt = conn.prepare_cached(&log.select_sql).map_err(sql_err)?;
    let mut rows = stmt.query(params![after]).map_err(sql_err)?;
    let ncol = log.columns.len();
    let max = usize::try_from(max).unwrap_or(0);
    let mut out = Vec::new();
    while out.len() < max {
        let Some(row) = rows.next().map_err(sql_err)? else {
            break;
        };
        let id: i64 = row.get(0).map_err(sql_err)?;
        let code = row.get_ref(1).map_err(sql_err)?;
        let op = code.as_str().map_err(|e| sql_err(e.into()))?;
        let changed_at_us: i64 = row.get(2).map_err(sql_err)?;
        if op == WATERMARK_OP {
            out.push(Change {
                id,
                stable_id: kit::stable_id(identity, id),
                schema: None,
                table: log.source_table.clone(),
                op: Op::Insert,
                origin: Origin::Watermark,
                key_columns: log.no_columns().clone(),
                key: Vec::new(),
                old_key: None,
                columns: log.no_columns().clone(),
                old: None,
                new: None,
                changed_at_us,
                txid: None,
                commit_seq: None,
                attempt: 0,
            });
            continue;
        }
        let op = Op::from_code(op).ok_or_else(|| {
            BackendError::Other(format!("unknown op {op:?} in {}", log.log_table))
        })?;
        let vals = |offset: usize| -> Result<Vec<Value>, BackendError> {
            (0..ncol)
                .map(|i| row.get_ref(offset + i).map(value).map_err(sql_err))
                .collect()
        };
        let old = if op == Op::Insert {
            None
        } else {
            Some(vals(3)?)
        };
        let new = if op == Op::Delete {
            None
        } else {
            Some(vals(3 + ncol)?)
        };
        let (key_columns, index) = log.key_at(id);
        let pick = |image: &Option<Vec<Value>>| {
            image
                .as_ref()
                .map(|v| index.iter().map(|&i| v[i].clone()).collect::<Vec<_>>())
        };
        let (key, old_key) = kit::row_key(op, pick(&old), pick(&new));
        out.push(Change {
            id,
            stable_id: kit::stable_id(identity, id),
            schema: None,
            table: log.source_table.clone(),
            op,
            origin: Origin::Live,
            key_columns: key_columns.clone(),
            key,
            old_key,
            columns: log.columns.clone(),
            old,
            new,
            changed_at_us,
            txid: None,
            commit_seq: None,
            attempt: 0,
        });
    }
    Ok(out)
}
