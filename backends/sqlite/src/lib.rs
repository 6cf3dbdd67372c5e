//! SQLite backend for Epidemic.
//!
//! For each watched table the backend keeps a log table `epidemic_log_<table>` with an
//! `INTEGER PRIMARY KEY AUTOINCREMENT` id, filled by `AFTER INSERT/UPDATE/DELETE` triggers
//! that copy the old and new values of the watched columns. SQLite has one writer at a
//! time, so id order is commit order; `AUTOINCREMENT` (not a plain rowid) guarantees that
//! an id is never handed out twice, even after pruning deleted the newest rows — a plain
//! rowid table would reuse `max(rowid)+1` and land new changes below a consumer's cursor.
//!
//! Each consumer (daemon, handler) has one cursor row per table in `epidemic_cursor`:
//! the id of the last change it handled. A batch comes from one table at a time, tables
//! taken in turn, so "handled up to id N" is all a cursor needs.
//!
//! Wake-ups: the backend watches the database's directory (inotify through `notify`)
//! for writes to the database, its WAL or its journal, and confirms each with
//! `PRAGMA data_version`, which changes only when *another* connection committed. A slow
//! `data_version` poll covers file systems without change events.
//!
//! Names: SQLite compares table and column names without regard to ASCII case. `resolve`
//! gives the host the catalog's spelling (`sqlite_master`, `pragma_table_info`), and the
//! registry, log columns, cursors and every change carry that same spelling.
//!
//! Acks: an ack the database refuses because an application holds the write lock longer
//! than `busy_timeout_ms` is remembered and written before the next read, so the handler
//! is not handed the same changes again once per timeout (see `SqliteBackend::pending_acks`).
//!
//! Every connection uses a private cache with `read_uncommitted` off: only a shared
//! cache can show a connection another's uncommitted rows, and `?cache=shared` is refused.
//!
//! `INSERT OR REPLACE`, `REPLACE` and `UPDATE OR REPLACE` remove rows without a DELETE
//! trigger; see `schema` for how those DELETEs are captured anyway.
//!
//! The backend never changes the user's tables or the database's journal mode; WAL is
//! recommended (see the README) but left to the application that owns the database.

mod ops;
mod schema;
mod wake;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use epidemic_plugin_sdk::backend::{
    Backend, BackendError, Batch, Consumer, DeadLetter, DeadLetterQuery, DeadLetterUpdate,
    LeaseRequest, LeaseState, Registered, StartFrom, Status, Watch,
};
use epidemic_plugin_sdk::{Change, Op, Value};
use rusqlite::{params, Connection, OpenFlags};
use serde::Deserialize;

use schema::{LogTable, SqliteSchema};
use wake::SqliteWaker;

/// `[database]` options for the SQLite backend.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct SqliteOptions {
    /// How long a statement waits for a lock held by another connection.
    busy_timeout_ms: u64,
    /// How often to check `PRAGMA data_version` when no file event arrives.
    fallback_poll_ms: u64,
    /// Rows deleted per statement when pruning, so writers never wait long.
    prune_chunk: u32,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            busy_timeout_ms: 5_000,
            fallback_poll_ms: 250,
            prune_chunk: 10_000,
        }
    }
}

/// Path of the database file in a `sqlite://` URL (`sqlite://mail.db` is relative to the
/// working directory, `sqlite:///var/lib/mail.db` is absolute).
fn database_path(url: &str) -> Result<PathBuf, BackendError> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .ok_or_else(|| BackendError::Invalid(format!("not a sqlite URL: {url:?}")))?;
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    // A shared cache lets one connection see another's uncommitted writes (under
    // `read_uncommitted`) and turns lock waits into SQLITE_LOCKED; Epidemic's connections
    // always use a private cache (see `connect`), so asking for a shared one is refused
    // rather than silently overridden.
    if query
        .split('&')
        .any(|kv| kv.eq_ignore_ascii_case("cache=shared"))
    {
        return Err(BackendError::Invalid(
            "sqlite URL: cache=shared is not supported; Epidemic needs a private cache so it never reads uncommitted changes (remove cache=shared)".into(),
        ));
    }
    if path.is_empty() {
        return Err(BackendError::Invalid(
            "sqlite URL has no file path (sqlite://FILE)".into(),
        ));
    }
    Ok(PathBuf::from(path))
}

pub(crate) fn sql_err(e: rusqlite::Error) -> BackendError {
    use rusqlite::ErrorCode::*;
    match e.sqlite_error_code() {
        Some(DatabaseBusy | DatabaseLocked | CannotOpen | SystemIoFailure | NotADatabase) => {
            BackendError::Connection(e.to_string())
        }
        _ => BackendError::Other(e.to_string()),
    }
}

/// What a consumer reads: per table, its log table and cursor.
struct ConsumerState {
    tables: Vec<(Arc<LogTable>, i64)>,
    /// The table to try first on the next fetch, so no table starves the others.
    next: usize,
}

pub struct SqliteBackend {
    path: PathBuf,
    options: SqliteOptions,
    conn: Connection,
    waker: SqliteWaker,
    consumers: HashMap<Consumer, ConsumerState>,
    /// Acks the database refused because another connection held the write lock past
    /// `busy_timeout_ms` (or the file was unreachable): (consumer, table) → the id handled. The handler has handled
    /// these changes; the next `fetch` writes the ack before reading, so a held lock
    /// delays the cursor instead of making the same changes be delivered again once per
    /// timeout. Kept across `reconnect` (it is what was handled, not connection state);
    /// lost if the daemon dies, which only means redelivery (at least once).
    pending_acks: HashMap<(Consumer, String), i64>,
}

impl SqliteBackend {
    fn connect(path: &PathBuf, options: &SqliteOptions) -> Result<Connection, BackendError> {
        if !path.exists() {
            return Err(BackendError::Invalid(format!(
                "database file {} does not exist",
                path.display()
            )));
        }
        let conn = Connection::open_with_flags(
            path,
            // PRIVATE_CACHE even if the process enabled shared caches: only a shared
            // cache can show a connection uncommitted rows, so this and
            // `read_uncommitted = 0` below mean every read sees committed data only.
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX
                | OpenFlags::SQLITE_OPEN_PRIVATE_CACHE,
        )
        .map_err(|e| BackendError::Connection(format!("cannot open {}: {e}", path.display())))?;
        conn.pragma_update(None, "read_uncommitted", 0)
            .map_err(sql_err)?;
        conn.busy_timeout(Duration::from_millis(options.busy_timeout_ms))
            .map_err(sql_err)?;
        // This connection writes only Epidemic's bookkeeping: cursors, heartbeats, dead
        // letters, pruning. In WAL mode `synchronous = NORMAL` skips the fsync per commit
        // (a reader acks after every batch; each fsync held SQLite's one write lock for
        // milliseconds, delaying writers and the reader's next read). What a power loss
        // can cost is the newest bookkeeping commits, in order: an ack lost means a change
        // is delivered again, never that one is lost. Writers' own commits, which fill
        // the log through the triggers, keep their connection's setting. In
        // rollback-journal mode NORMAL risks corruption on power loss: left as it is.
        let journal: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .map_err(sql_err)?;
        if journal.eq_ignore_ascii_case("wal") {
            conn.pragma_update(None, "synchronous", "NORMAL")
                .map_err(sql_err)?;
            // A commit that finds the WAL over its limit checkpoints it, fsyncs
            // included, in the committing connection. A reader acks often, so it did most
            // checkpoints and every one delayed its next read by tens of milliseconds.
            // Epidemic's connections never checkpoint on commit; `prune`, off the
            // delivery path, runs a passive checkpoint instead (and the application's
            // own commits still checkpoint as usual).
            conn.pragma_update(None, "wal_autocheckpoint", 0)
                .map_err(sql_err)?;
        }
        conn.set_prepared_statement_cache_capacity(64);
        Ok(conn)
    }

    /// Plan and run DDL in one write transaction. `BEGIN IMMEDIATE` takes the write lock
    /// first: a deferred transaction that read the schema and then writes fails at once
    /// with SQLITE_BUSY in WAL mode if another connection committed meanwhile (the busy
    /// handler is not consulted for that upgrade), and planning inside the transaction
    /// means the plan matches the schema it is applied to.
    fn apply(
        &mut self,
        plan: impl FnOnce(&SqliteSchema<'_>) -> Result<Vec<String>, BackendError>,
    ) -> Result<Vec<String>, BackendError> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(sql_err)?;
        let plan = plan(&SqliteSchema::new(&tx))?;
        for stmt in &plan {
            tx.execute_batch(stmt).map_err(|e| match sql_err(e) {
                BackendError::Other(m) => BackendError::Other(format!("{m} in: {stmt}")),
                other => other,
            })?;
        }
        tx.commit().map_err(sql_err)?;
        self.consumers.clear();
        Ok(plan)
    }

    fn schema(&self) -> SqliteSchema<'_> {
        SqliteSchema::new(&self.conn)
    }

    fn state(&mut self, consumer: &Consumer) -> Result<&mut ConsumerState, BackendError> {
        if !self.consumers.contains_key(consumer) {
            let state = self.load_state(consumer)?;
            self.consumers.insert(consumer.clone(), state);
        }
        Ok(self.consumers.get_mut(consumer).expect("inserted above"))
    }

    /// The consumer's cursors as the database has them.
    fn load_state(&self, consumer: &Consumer) -> Result<ConsumerState, BackendError> {
        let mut stmt = self
            .conn
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
            return Err(BackendError::Evicted(format!(
                "consumer {consumer} is not registered (its cursor is gone); it must register again"
            )));
        }
        let schema = self.schema();
        let mut tables = Vec::with_capacity(rows.len());
        for (table, last) in rows {
            let log = schema.watched(&table)?.ok_or_else(|| {
                BackendError::Invalid(format!(
                    "table {table} is not watched; run `epidemic install`"
                ))
            })?;
            tables.push((Arc::new(log), last));
        }
        Ok(ConsumerState { tables, next: 0 })
    }
}

pub(crate) fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

fn value(v: rusqlite::types::ValueRef<'_>) -> Value {
    use rusqlite::types::ValueRef;
    match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::Int(i),
        ValueRef::Real(f) => Value::Float(f),
        ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => Value::Bytes(b.to_vec()),
    }
}

impl Backend for SqliteBackend {
    const NAME: &'static str = "sqlite";
    const URL_SCHEMES_JOINED: &'static str = "sqlite";

    fn open(url: &str, options: &serde_json::Value) -> Result<Self, BackendError> {
        let options: SqliteOptions = serde_json::from_value(options.clone())
            .map_err(|e| BackendError::Invalid(format!("[database] options for sqlite: {e}")))?;
        let path = database_path(url)?;
        let conn = Self::connect(&path, &options)?;
        let waker = SqliteWaker::new(&path, Duration::from_millis(options.fallback_poll_ms));
        Ok(SqliteBackend {
            path,
            options,
            conn,
            waker,
            consumers: HashMap::new(),
            pending_acks: HashMap::new(),
        })
    }

    fn resolve(&mut self, watches: &[Watch]) -> Result<Vec<Watch>, BackendError> {
        let schema = self.schema();
        watches.iter().map(|w| schema.resolve(w)).collect()
    }

    fn plan_install(&mut self, watches: &[Watch]) -> Result<Vec<String>, BackendError> {
        self.schema().plan_install(watches)
    }

    fn install(&mut self, watches: &[Watch]) -> Result<Vec<String>, BackendError> {
        self.apply(|schema| schema.plan_install(watches))
    }

    fn plan_uninstall(&mut self) -> Result<Vec<String>, BackendError> {
        self.schema().plan_uninstall()
    }

    fn uninstall(&mut self) -> Result<Vec<String>, BackendError> {
        self.apply(|schema| schema.plan_uninstall())
    }

    fn register(
        &mut self,
        consumer: &Consumer,
        tables: &[String],
        start: StartFrom,
    ) -> Result<Registered, BackendError> {
        let now = now_us();
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(sql_err)?;
        let mut created = false;
        let mut evicted = false;
        {
            let schema = SqliteSchema::new(&tx);
            // Cursors are keyed by the registry's spelling of the table (the catalog's),
            // which is also the ack token and what pruning looks up: a cursor keyed by a
            // handler's `mail_users` for a registry's `Mail_Users` would never move.
            let mut logs = Vec::with_capacity(tables.len());
            for table in tables {
                logs.push(schema.watched(table)?.ok_or_else(|| {
                    BackendError::Invalid(format!(
                        "table {table} is not watched; run `epidemic install` first"
                    ))
                })?);
            }
            let tables: Vec<&str> = logs.iter().map(|l| l.source_table.as_str()).collect();
            for (log, table) in logs.iter().zip(&tables) {
                // A cursor written under another spelling (before names were resolved)
                // keeps its position under the registry's.
                tx.execute(
                    "UPDATE OR IGNORE epidemic_cursor SET source_table = ?3
                     WHERE daemon = ?1 AND handler = ?2 AND source_table = ?3 COLLATE NOCASE AND source_table <> ?3",
                    params![consumer.daemon, consumer.handler, table],
                )
                .map_err(sql_err)?;
                let start_id = match start {
                    StartFrom::Oldest => 0,
                    StartFrom::Now => schema.last_id(&log.log_table)?,
                };
                // An evicted consumer's old cursor may point at pruned rows: restart it
                // like a new one, and say so.
                let n = tx
                    .execute(
                        "UPDATE epidemic_cursor SET last_id = ?4, evicted_at = NULL, registered_at = ?5
                         WHERE daemon = ?1 AND handler = ?2 AND source_table = ?3 AND evicted_at IS NOT NULL",
                        params![consumer.daemon, consumer.handler, table, start_id, now],
                    )
                    .map_err(sql_err)?;
                evicted |= n > 0;
                let n = tx
                    .execute(
                        "INSERT OR IGNORE INTO epidemic_cursor (daemon, handler, source_table, last_id, registered_at, last_seen)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
                        params![consumer.daemon, consumer.handler, table, start_id, now],
                    )
                    .map_err(sql_err)?;
                created |= n > 0;
            }
            tx.execute(
                "UPDATE epidemic_cursor SET last_seen = ?3 WHERE daemon = ?1 AND handler = ?2",
                params![consumer.daemon, consumer.handler, now],
            )
            .map_err(sql_err)?;
            // A table the handler no longer subscribes to: its old cursor would hold
            // back that table's pruning for ever.
            let keep =
                serde_json::to_string(&tables).map_err(|e| BackendError::Other(e.to_string()))?;
            tx.execute(
                "DELETE FROM epidemic_cursor WHERE daemon = ?1 AND handler = ?2
                 AND source_table NOT IN (SELECT value FROM json_each(?3))",
                params![consumer.daemon, consumer.handler, keep],
            )
            .map_err(sql_err)?;
        }
        tx.commit().map_err(sql_err)?;
        self.consumers.remove(consumer);
        Ok(if evicted {
            Registered::Evicted
        } else if created {
            Registered::New
        } else {
            Registered::Existing
        })
    }

    fn fetch(&mut self, consumer: &Consumer, max: u32) -> Result<Batch, BackendError> {
        // Finish an ack a held write lock refused before reading: reading first would
        // hand the handler the same changes again.
        let pending: Vec<(String, i64)> = self
            .pending_acks
            .iter()
            .filter(|((c, _), _)| c == consumer)
            .map(|((_, t), id)| (t.clone(), *id))
            .collect();
        for (token, id) in pending {
            self.ack(consumer, &token, id)?;
        }
        // Borrow juggling: take the state out while the connection is in use.
        let mut state = match self.consumers.remove(consumer) {
            Some(s) => s,
            None => self.load_state(consumer)?,
        };
        let n = state.tables.len();
        let mut batch = Batch::default();
        for i in 0..n {
            let idx = (state.next + i) % n;
            let (log, last) = &state.tables[idx];
            let changes = read_log(&self.conn, log, *last, max)?;
            if !changes.is_empty() {
                state.next = (idx + 1) % n;
                batch = Batch {
                    changes,
                    token: log.source_table.clone(),
                };
                break;
            }
        }
        self.consumers.insert(consumer.clone(), state);
        Ok(batch)
    }

    fn ack(&mut self, consumer: &Consumer, token: &str, upto_id: i64) -> Result<(), BackendError> {
        let key = (consumer.clone(), token.to_owned());
        let upto_id = self
            .pending_acks
            .remove(&key)
            .map_or(upto_id, |p| p.max(upto_id));
        let n = match write_ack(&self.conn, consumer, token, upto_id) {
            Ok(n) => n,
            Err(e) => {
                // A write that could not happen (a held lock, an unreachable file) is
                // tried again before the next read; any other failure drops it, so a
                // consumer is never stuck behind one ack (at worst its changes come again).
                let e = match sql_err(e) {
                    BackendError::Connection(m) => {
                        self.pending_acks.insert(key, upto_id);
                        BackendError::Connection(format!(
                            "acknowledging {token} up to change {upto_id}: {m}; written before the next read, the changes are not delivered again"
                        ))
                    }
                    other => other,
                };
                return Err(e);
            }
        };
        if n == 0 {
            // Nothing moved: fine if the cursor is already there or beyond (an ack
            // repeated after a partial one), an error if it was evicted or is gone —
            // never a silent success.
            let live: bool = self
                .conn
                .query_row(
                    "SELECT count(*) > 0 FROM epidemic_cursor
                     WHERE daemon = ?1 AND handler = ?2 AND source_table = ?3 AND evicted_at IS NULL",
                    params![consumer.daemon, consumer.handler, token],
                    |r| r.get(0),
                )
                .map_err(sql_err)?;
            if !live {
                self.consumers.remove(consumer);
                return Err(ops::gone(&self.conn, consumer)?);
            }
        }
        let state = self.state(consumer)?;
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

    fn wait(&mut self, timeout: Duration) -> Result<bool, BackendError> {
        self.waker.wait(&self.conn, timeout)
    }

    fn prune(&mut self) -> Result<u64, BackendError> {
        let mut total = 0;
        for log in self.schema().all_watched()? {
            let (registered, live_min): (i64, Option<i64>) = self
                .conn
                .query_row(
                    "SELECT count(*), MIN(CASE WHEN evicted_at IS NULL THEN last_id END)
                     FROM epidemic_cursor WHERE source_table = ?1",
                    [&log.source_table],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .map_err(sql_err)?;
            let min = match live_min {
                Some(m) => m,
                // Nobody registered for the table yet: keep everything, a first consumer
                // started with "from oldest" wants it.
                None if registered == 0 => continue,
                // Every consumer was evicted: nobody live needs any of it.
                None => i64::MAX,
            };
            let sql = format!(
                "DELETE FROM {q} WHERE id IN (SELECT id FROM {q} WHERE id <= ?1 ORDER BY id LIMIT ?2)",
                q = schema::quote(&log.log_table)
            );
            loop {
                let n = self
                    .conn
                    .prepare_cached(&sql)
                    .and_then(|mut s| s.execute(params![min, self.options.prune_chunk]))
                    .map_err(sql_err)?;
                total += n as u64;
                if n < self.options.prune_chunk as usize {
                    break;
                }
            }
        }
        // See `connect`: this is where Epidemic's own WAL growth is checkpointed.
        // PASSIVE never waits for readers or writers; in rollback-journal mode it is a no-op.
        self.conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
            .map_err(sql_err)?;
        Ok(total)
    }

    fn reconnect(&mut self) -> Result<(), BackendError> {
        self.conn = Self::connect(&self.path, &self.options)?;
        self.consumers.clear();
        Ok(())
    }

    fn unregister(&mut self, consumer: &Consumer) -> Result<bool, BackendError> {
        self.consumers.remove(consumer);
        if !self.schema().installed()? {
            return Ok(false);
        }
        let n = self
            .conn
            .execute(
                "DELETE FROM epidemic_cursor WHERE daemon = ?1 AND handler = ?2",
                params![consumer.daemon, consumer.handler],
            )
            .map_err(sql_err)?;
        Ok(n > 0)
    }

    fn touch(&mut self, consumer: &Consumer) -> Result<(), BackendError> {
        ops::touch(&self.conn, consumer)
    }

    fn lease(&mut self, request: &LeaseRequest) -> Result<LeaseState, BackendError> {
        ops::lease(&mut self.conn, request)
    }

    fn evict_stale(&mut self, ttl: Duration) -> Result<Vec<Consumer>, BackendError> {
        ops::evict_stale(&mut self.conn, ttl.as_micros().min(i64::MAX as u128) as i64)
    }

    fn add_dead_letter(&mut self, letter: &DeadLetter) -> Result<i64, BackendError> {
        ops::add_dead_letter(&self.conn, letter)
    }

    fn dead_letters(&mut self, query: &DeadLetterQuery) -> Result<Vec<DeadLetter>, BackendError> {
        ops::dead_letters(&self.conn, query)
    }

    fn update_dead_letters(&mut self, update: &DeadLetterUpdate) -> Result<u64, BackendError> {
        ops::update_dead_letters(&self.conn, update)
    }

    fn status(&mut self) -> Result<Status, BackendError> {
        ops::status(&self.conn)
    }

    fn scratch(&mut self, op: &epidemic_plugin_sdk::backend::Scratch) -> Result<(), BackendError> {
        self.consumers.clear();
        ops::scratch(&mut self.conn, op)
    }
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
            now_us()
        ])
    })
}

impl Drop for SqliteBackend {
    /// A clean stop (SIGTERM while an application held the write lock) tries the
    /// refused acks once more, so the next start does not deliver those changes again.
    fn drop(&mut self) {
        for ((consumer, token), id) in std::mem::take(&mut self.pending_acks) {
            let _ = write_ack(&self.conn, &consumer, &token, id);
        }
    }
}

/// Up to `max` changes after `after` from one log table, in id (= commit) order.
fn read_log(
    conn: &Connection,
    log: &LogTable,
    after: i64,
    max: u32,
) -> Result<Vec<Change>, BackendError> {
    let mut stmt = conn.prepare_cached(&log.select_sql).map_err(sql_err)?;
    let mut rows = stmt.query(params![after, max]).map_err(sql_err)?;
    let ncol = log.columns.len();
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(sql_err)? {
        let id: i64 = row.get(0).map_err(sql_err)?;
        let op: String = row.get(1).map_err(sql_err)?;
        let changed_at_us: i64 = row.get(2).map_err(sql_err)?;
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
        out.push(Change {
            id,
            table: log.source_table.clone(),
            op,
            columns: log.columns.clone(),
            old,
            new,
            changed_at_us,
            ..Change::default()
        });
    }
    Ok(out)
}

epidemic_plugin_sdk::export_backend!(SqliteBackend);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_paths() {
        assert_eq!(
            database_path("sqlite://mail.db").unwrap(),
            PathBuf::from("mail.db")
        );
        assert_eq!(
            database_path("sqlite:///var/x.db").unwrap(),
            PathBuf::from("/var/x.db")
        );
        assert_eq!(
            database_path("sqlite:x.db?mode=rw").unwrap(),
            PathBuf::from("x.db")
        );
        assert!(database_path("sqlite://").is_err());
        assert!(database_path("postgres://x").is_err());
    }

    #[test]
    fn connections_never_read_uncommitted_rows() {
        let err = database_path("sqlite:///var/x.db?mode=rw&cache=shared")
            .expect_err("a shared cache must be refused");
        assert!(err.to_string().contains("cache=shared"), "{err}");
        let path = std::env::temp_dir().join(format!(
            "epidemic-sqlite-unit-{}-private-cache.db",
            std::process::id()
        ));
        Connection::open(&path).unwrap();
        let conn = SqliteBackend::connect(&path, &SqliteOptions::default()).unwrap();
        let read_uncommitted: i64 = conn
            .query_row("PRAGMA read_uncommitted", [], |r| r.get(0))
            .unwrap();
        assert_eq!(read_uncommitted, 0);
        drop(conn);
        let _ = std::fs::remove_file(&path);
    }
}
