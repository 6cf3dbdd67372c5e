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
//! Acks: an ack the database refuses because an application holds the write lock longer
//! than `busy_timeout_ms` is remembered and written before the next read, so the handler
//! is not handed the same changes again once per timeout (see
//! [`SqliteReader::pending_acks`]).

use std::collections::HashMap;
use std::sync::Arc;

use epidemic_plugin_sdk::backend::{kit, BackendError, Batch, Consumer};
use epidemic_plugin_sdk::{Change, Op, Origin, Value};
use rusqlite::{params, Connection};

use crate::capture::{SqliteLogTable, WATERMARK_OP};
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
    /// Cursor positions and registry entries as last read or acked; dropped whenever the
    /// registry or cursors may have changed (install, register, reconnect, or any schema
    /// change: see `schema_version`).
    consumers: HashMap<Consumer, ConsumerState>,
    /// `PRAGMA schema_version` when `consumers` was filled. Another daemon's install
    /// (a new key epoch, more captured columns, a log created again) always changes the
    /// schema, since it recreates the triggers: the registry entries are read again, so
    /// changes are not read with a key or identity that no longer holds.
    schema_version: Option<i64>,
    /// Acks the database refused because another connection held the write lock past
    /// `busy_timeout_ms` (or the file was unreachable): (consumer, table) → the id
    /// handled. The handler has handled these changes; the next `fetch` writes the ack
    /// before reading, so a held lock delays the cursor instead of making the same
    /// changes be delivered again once per timeout. Kept across `reconnect` (it is what
    /// was handled, not connection state); lost if the daemon dies, which only means
    /// redelivery (at least once).
    pending_acks: HashMap<(Consumer, String), i64>,
}

impl SqliteReader {
    /// Forget every consumer's cached state (the registry or cursors changed).
    pub fn forget_all(&mut self) {
        self.consumers.clear();
    }

    /// Forget one consumer's cached state.
    pub fn forget(&mut self, consumer: &Consumer) {
        self.consumers.remove(consumer);
    }

    pub fn fetch(
        &mut self,
        conn: &Connection,
        consumer: &Consumer,
        max: u32,
    ) -> Result<Batch, BackendError> {
        // Finish an ack a held write lock refused before reading: reading first would
        // hand the handler the same changes again.
        let pending: Vec<(String, i64)> = self
            .pending_acks
            .iter()
            .filter(|((c, _), _)| c == consumer)
            .map(|((_, t), id)| (t.clone(), *id))
            .collect();
        for (token, id) in pending {
            self.ack(conn, consumer, &token, id)?;
        }
        let version: i64 = conn
            .query_row("PRAGMA schema_version", [], |r| r.get(0))
            .map_err(sql_err)?;
        if self.schema_version.replace(version) != Some(version) {
            self.consumers.clear();
        }
        let state = self.state(conn, consumer)?;
        let n = state.tables.len();
        for i in 0..n {
            let idx = (state.next + i) % n;
            let (log, last) = &state.tables[idx];
            let changes = read_log(conn, log, *last, max)?;
            if !changes.is_empty() {
                state.next = (idx + 1) % n;
                return Ok(Batch {
                    changes,
                    token: log.source_table.clone(),
                });
            }
        }
        Ok(Batch::default())
    }

    pub fn ack(
        &mut self,
        conn: &Connection,
        consumer: &Consumer,
        token: &str,
        upto_id: i64,
    ) -> Result<(), BackendError> {
        let key = (consumer.clone(), token.to_owned());
        let upto_id = self
            .pending_acks
            .remove(&key)
            .map_or(upto_id, |p| p.max(upto_id));
        let n = match write_ack(conn, consumer, token, upto_id) {
            Ok(n) => n,
            Err(e) => {
                // A write that could not happen (a held lock, an unreachable file) is
                // tried again before the next read; any other failure drops it, so a
                // consumer is never stuck behind one ack (at worst its changes come again).
                return Err(match sql_err(e) {
                    BackendError::Connection(m) => {
                        self.pending_acks.insert(key, upto_id);
                        BackendError::Connection(format!(
                            "acknowledging {token} up to change {upto_id}: {m}; written before the next read, the changes are not delivered again"
                        ))
                    }
                    other => other,
                });
            }
        };
        if n == 0 {
            // Nothing moved: fine if the cursor is already there or beyond (an ack
            // repeated after a partial one), an error if it was evicted or is gone —
            // never a silent success.
            let live: bool = conn
                .query_row(
                    "SELECT count(*) > 0 FROM epidemic_cursor
                     WHERE daemon = ?1 AND handler = ?2 AND source_table = ?3 AND evicted_at IS NULL",
                    params![consumer.daemon, consumer.handler, token],
                    |r| r.get(0),
                )
                .map_err(sql_err)?;
            if !live {
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

    /// Try the refused acks once more (a clean stop while an application held the write
    /// lock), so the next start does not deliver those changes again.
    pub fn flush(&mut self, conn: &Connection) {
        for ((consumer, token), id) in std::mem::take(&mut self.pending_acks) {
            let _ = write_ack(conn, &consumer, &token, id);
        }
    }

    fn state(
        &mut self,
        conn: &Connection,
        consumer: &Consumer,
    ) -> Result<&mut ConsumerState, BackendError> {
        if !self.consumers.contains_key(consumer) {
            let state = load_state(conn, consumer)?;
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
    max: u32,
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
        let op: String = row.get(1).map_err(sql_err)?;
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
        let op = Op::from_code(&op).ok_or_else(|| {
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
