//! SQLite backend for Epidemic.
//!
//! For each watched table the backend keeps a log table `epidemic_log_<table>` with an
//! `AUTOINCREMENT` id, filled by triggers that copy the old and new values of the
//! captured columns: the row's key (its primary key, or `[table.NAME] key = [..]`) and
//! the watched columns. SQLite has one writer at a time, so id order is commit order,
//! and `AUTOINCREMENT` never hands an id out twice: a reader that goes `id > cursor`
//! skips nothing.
//!
//! What each change carries: its key (`key_columns`, `key`, `old_key`), a stable id
//! (`<log identity>-<id>`, the identity made by SQLite whenever the log table is
//! created), the captured columns' old and new values, and the capture time. Not given
//! (see [`Backend::capabilities`]): a transaction id (SQLite exposes none to a trigger
//! cheaply), a commit order across tables (log ids are per table), a schema.
//!
//! Start reading at `install` (what is created, keys, stable ids), then `capture`
//! and `replace` (the triggers), `reader` (fetch and ack).
//!
//! Files, one role each, named as in every backend:
//! - `options`: `[database]` options and the URL.
//! - `error`: SQLite errors as [`BackendError`] kinds.
//! - `conn`: connecting and session settings (private cache, no uncommitted reads).
//! - `catalog`: the user's tables, columns and keys in the catalog's spelling; `resolve`.
//! - `install`: planning and applying install and uninstall; the bookkeeping tables.
//! - `capture`: the log table and trigger SQL for one table.
//! - `replace`: the capture of rows `REPLACE` removes without a DELETE trigger.
//! - `reader`: fetch and ack.
//! - `consumers`: register, unregister, heartbeats, eviction.
//! - `snapshot`: a backfill's chunk read by key and its watermark in the log.
//! - `backfill`: backfill requests and progress.
//! - `prune`, `wake` (file events confirmed by `PRAGMA data_version`),
//!   `dead_letters`, `status`, `lease`, `scratch`.
//!
//! The backend never changes the user's tables or the database's journal mode; WAL is
//! recommended (see the README) but left to the application that owns the database.

mod backfill;
mod barrier;
mod capture;
mod catalog;
mod conn;
mod consumers;
mod dead_letters;
mod error;
mod install;
mod lease;
mod options;
mod prune;
mod reader;
mod replace;
mod scratch;
mod snapshot;
mod status;
mod wake;

use std::path::PathBuf;
use std::time::Duration;

use epidemic_plugin_sdk::backend::linger::Linger;
use epidemic_plugin_sdk::backend::{
    Backend, BackendError, BackfillReply, BackfillRequest, BarrierReply, BarrierRequest, Batch,
    BenchVariant, Capabilities, Chunk, ChunkRequest, Consumer, DeadLetter, DeadLetterQuery,
    DeadLetterUpdate, LeaseRequest, LeaseState, Registered, Scratch, StartFrom, Status, Watch,
};
use rusqlite::Connection;

use conn::LockWait;
use options::SqliteOptions;
use reader::SqliteReader;
use wake::SqliteWaker;

pub struct SqliteBackend {
    path: PathBuf,
    options: SqliteOptions,
    conn: Connection,
    /// How `conn` waits for the write lock (see `conn`).
    lock: LockWait,
    waker: SqliteWaker,
    reader: SqliteReader,
    /// Paces the reads of a dense stream (`linger_ms`).
    linger: Linger,
}

impl Backend for SqliteBackend {
    const NAME: &'static str = "sqlite";
    const URL_SCHEMES_JOINED: &'static str = "sqlite";

    fn open(url: &str, options: &serde_json::Value) -> Result<Self, BackendError> {
        let options = SqliteOptions::parse(options)?;
        let path = options::database_path(url)?;
        let (conn, lock) = conn::connect(&path, &options)?;
        let waker = SqliteWaker::new(&path, Duration::from_millis(options.fallback_poll_ms));
        let linger = Linger::new(options.linger()?);
        Ok(SqliteBackend {
            path,
            options,
            conn,
            lock,
            waker,
            reader: SqliteReader::default(),
            linger,
        })
    }

    /// No transaction ids (a trigger has no cheap handle on its transaction), no commit
    /// order across tables (each log numbers its own rows), no schemas.
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            // What the pacing of a dense stream's reads saves the writers.
            bench_variants: vec![BenchVariant {
                label: "linger 0".into(),
                options: serde_json::json!({ "linger_ms": 0 }),
            }],
            transaction_ids: false,
            commit_order: false,
            schemas: false,
        }
    }

    fn resolve(&mut self, watches: &[Watch]) -> Result<Vec<Watch>, BackendError> {
        watches
            .iter()
            .map(|w| catalog::resolve(&self.conn, w))
            .collect()
    }

    fn plan_install(&mut self, watches: &[Watch]) -> Result<Vec<String>, BackendError> {
        install::plan_install(&self.conn, watches)
    }

    fn install(&mut self, watches: &[Watch]) -> Result<Vec<String>, BackendError> {
        self.reader.forget_all();
        install::apply(&mut self.conn, |c| install::plan_install(c, watches))
    }

    /// One write transaction, as install itself applies it (`BEGIN IMMEDIATE`: the write
    /// lock first), so `sqlite3 db < script` applies all of it or nothing.
    fn render_script(&self, statements: &[String]) -> String {
        let body: String = statements.iter().map(|s| format!("{s};\n\n")).collect();
        format!("BEGIN IMMEDIATE;\n\n{body}COMMIT;\n")
    }

    fn plan_uninstall(&mut self) -> Result<Vec<String>, BackendError> {
        install::plan_uninstall(&self.conn)
    }

    fn uninstall(&mut self) -> Result<Vec<String>, BackendError> {
        self.reader.forget_all();
        install::apply(&mut self.conn, install::plan_uninstall)
    }

    fn register(
        &mut self,
        consumer: &Consumer,
        tables: &[String],
        start: StartFrom,
    ) -> Result<Registered, BackendError> {
        let registered = consumers::register(&mut self.conn, consumer, tables, start)?;
        self.reader.forget(consumer);
        Ok(registered)
    }

    /// After a dense read the next one waits a moment, so that commits gather and the
    /// reader's acks take the write lock less often (the SDK's `backend::linger`).
    fn fetch(&mut self, consumer: &Consumer, max: u32) -> Result<Batch, BackendError> {
        self.linger.before_read();
        let batch = self.reader.fetch(&self.conn, &self.lock, consumer, max)?;
        self.linger.after_read(
            batch.changes.len(),
            std::mem::take(&mut self.reader.caught_up),
        );
        Ok(batch)
    }

    fn ack(&mut self, consumer: &Consumer, token: &str, upto_id: i64) -> Result<(), BackendError> {
        self.reader
            .ack(&self.conn, &self.lock, consumer, token, upto_id)
    }

    /// Acks kept while a writer held the lock are tried again while waiting, without
    /// waiting for the lock (see `reader`).
    fn wait(&mut self, timeout: Duration) -> Result<bool, BackendError> {
        let (conn, lock, reader) = (&self.conn, &self.lock, &mut self.reader);
        let busy_timeout = Duration::from_millis(self.options.busy_timeout_ms);
        self.waker.wait(conn, lock, timeout, || {
            reader.retry_pending(conn, lock, busy_timeout)?;
            Ok(reader.retry_interval())
        })
    }

    fn prune(&mut self) -> Result<u64, BackendError> {
        prune::prune(&self.conn, self.options.prune_chunk)
    }

    fn reconnect(&mut self) -> Result<(), BackendError> {
        (self.conn, self.lock) = conn::connect(&self.path, &self.options)?;
        self.reader.forget_all();
        Ok(())
    }

    fn unregister(&mut self, consumer: &Consumer) -> Result<bool, BackendError> {
        self.reader.forget(consumer);
        backfill::forget(&self.conn, consumer)?;
        consumers::unregister(&self.conn, consumer)
    }

    fn touch(&mut self, consumer: &Consumer) -> Result<(), BackendError> {
        consumers::touch(&self.conn, consumer)
    }

    fn lease(&mut self, request: &LeaseRequest) -> Result<LeaseState, BackendError> {
        lease::lease(&mut self.conn, request)
    }

    fn evict_stale(&mut self, ttl: Duration) -> Result<Vec<Consumer>, BackendError> {
        let ttl_us = ttl.as_micros().min(i64::MAX as u128) as i64;
        consumers::evict_stale(&mut self.conn, ttl_us)
    }

    fn add_dead_letter(&mut self, letter: &DeadLetter) -> Result<i64, BackendError> {
        dead_letters::add(&self.conn, letter)
    }

    fn dead_letters(&mut self, query: &DeadLetterQuery) -> Result<Vec<DeadLetter>, BackendError> {
        dead_letters::list(&self.conn, query)
    }

    fn update_dead_letters(&mut self, update: &DeadLetterUpdate) -> Result<u64, BackendError> {
        dead_letters::update(&self.conn, update)
    }

    fn status(&mut self) -> Result<Status, BackendError> {
        status::status(&self.conn)
    }

    /// One bounded SELECT by key, then the watermark (see `snapshot`).
    fn snapshot_chunk(&mut self, request: &ChunkRequest) -> Result<Chunk, BackendError> {
        snapshot::snapshot_chunk(&self.conn, request)
    }

    fn backfills(&mut self, request: &BackfillRequest) -> Result<BackfillReply, BackendError> {
        backfill::backfills(&mut self.conn, request)
    }

    fn barrier(&mut self, request: &BarrierRequest) -> Result<BarrierReply, BackendError> {
        barrier::barrier(&self.conn, request)
    }

    fn scratch(&mut self, op: &Scratch) -> Result<(), BackendError> {
        self.reader.forget_all();
        scratch::scratch(&mut self.conn, &self.lock, op)
    }
}

impl Drop for SqliteBackend {
    /// A clean stop (SIGTERM while an application held the write lock) tries the
    /// refused acks once more, so the next start does not deliver those changes again.
    fn drop(&mut self) {
        self.reader.flush(&self.conn, &self.lock);
    }
}

epidemic_plugin_sdk::export_backend!(SqliteBackend);
