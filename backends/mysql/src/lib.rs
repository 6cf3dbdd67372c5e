//! MySQL and MariaDB backend for Epidemic (`mysql://`, `mariadb://`).
//!
//! For each watched table the backend keeps an InnoDB log table `epidemic_log_<table>`
//! with a `BIGINT AUTO_INCREMENT` id, filled by `AFTER INSERT/UPDATE/DELETE` triggers
//! that copy the old and new values of the captured columns (the row's key and the
//! watched columns) into typed columns; the SQL runs on MySQL 5.0 (`capture.rs`).
//! Foreign-key cascades fire no trigger on MySQL: the parents get triggers that capture
//! them (`cascade.rs`). There is no NOTIFY, so the backend polls (`wake.rs`): cheaply,
//! because pruning keeps the log tables small (`prune.rs`).
//!
//! Reading is gap-safe (`reader.rs`): InnoDB transactions commit out of id order, so a
//! consumer's cursor is a high-water mark plus the ids below it that were missing when
//! read (`gaps.rs`); those are re-read until they appear or are proven dead (rolled
//! back) through `information_schema.INNODB_TRX`, or after `gap_timeout_ms` and a
//! `READ UNCOMMITTED` read where that table is not readable (`gap_judge.rs`). What the
//! fallback cannot see is said in `Status::warnings` (logged by `epidemic run` at
//! start, shown by `epidemic status`).
//!
//! Every connection reads with `REPEATABLE READ`, whatever the server's default
//! (`conn.rs`). The reading rule needs every transaction that can hold a log id to be
//! visible in this server's INNODB_TRX, which holds on a single primary only: a Galera
//! node (`wsrep_on = ON`) is refused unless `allow_galera = true`.
//!
//! Every change carries the row's key (the primary key, or the columns the config names:
//! `catalog.rs`) and a stable id made of the log's identity and its log id
//! (`install.rs`). It carries no transaction id, commit order or schema
//! ([`Backend::capabilities`] says so): see `reader.rs` for why.
//!
//! Backfills (every existing row of a table to one consumer, interleaved with its live
//! changes): `snapshot.rs` reads a chunk by key without a lock and then writes a
//! watermark row (`op = 'W'`) into the table's log, which the reader delivers like a
//! change; `backfill.rs` stores requests and progress in `epidemic_backfill`. Why every
//! change committed before a chunk's read reaches every consumer before its watermark is
//! in ARCHITECTURE.md ("MySQL / MariaDB backfill rule").
//!
//! Trigger bodies contain `;`. `install` runs each statement on its own, so it needs no
//! `DELIMITER`; a script for the `mysql` command-line client does (see `epidemic sql`).
//!
//! Options (`[database]`, all optional; `options.rs`): `poll_interval_ms` (50),
//! `poll_min_ms` (1), `gap_detection` (`"auto"`, `"innodb_trx"` or `"timeout"`), `gap_timeout_ms` (60000),
//! `gap_check_ms` (250), `max_gap_ranges` (10000), `prune_chunk` (10000),
//! `connect_timeout_ms` (10000), `allow_galera` (false), `dead_peer_timeout_ms` (30000).
//! TLS is in the URL (`ssl-mode`, `ssl-ca`, `ssl-cert`, `ssl-key`), and every connection
//! has the dead-peer limits (`conn.rs`).
//!
//! The backend never changes the user's tables, their data or the server's settings,
//! and it keeps nothing in memory that matters: cursors, gaps and dead letters live in
//! the database. This file is only the [`Backend`] glue; start reading at `reader.rs`
//! for the reading rule, `install.rs` for the objects.

mod backfill;
mod barrier;
mod capture;
mod cascade;
mod catalog;
mod conn;
mod consumers;
mod dead_letters;
mod error;
mod gap_judge;
mod gaps;
mod install;
mod lease;
mod options;
mod prune;
mod reader;
mod registry;
mod scratch;
mod snapshot;
mod status;
mod truncation;
mod wake;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use epidemic_plugin_sdk::backend::linger::Linger;
use epidemic_plugin_sdk::backend::{
    Backend, BackendError, BackfillReply, BackfillRequest, BarrierReply, BarrierRequest, Batch,
    BenchVariant, Capabilities, Chunk, ChunkRequest, Consumer, DeadLetter, DeadLetterQuery,
    DeadLetterUpdate, LeaseRequest, LeaseState, Registered, Scratch, StartFrom, Status, Watch,
};
use epidemic_plugin_sdk::tracing;
use mysql::Conn;

use conn::ServerInfo;
use gap_judge::GapJudge;
use options::{MySqlOptions, Target};
use reader::{id_series, ConsumerCursors, MySqlPoller, ReadError};
use snapshot::SnapshotPlan;

pub use prune::prune_bound;

pub struct MySqlBackend {
    target: Target,
    options: MySqlOptions,
    conn: Conn,
    server: ServerInfo,
    poller: MySqlPoller,
    /// Each consumer's cursors as last read or written; the database is the truth, and
    /// any error drops them so they are read again.
    consumers: HashMap<Consumer, ConsumerCursors>,
    /// When `prune` last looked for truncated tables.
    truncation_checked: Option<Instant>,
    /// What the reading rule cannot see on this server, with the remedy (for `status`).
    warnings: Vec<String>,
    /// How each table is read for backfills, made again when its registry entry changes.
    snapshots: HashMap<String, SnapshotPlan>,
    /// How often `wait` polls: fast after changes, slow when idle.
    pace: wake::Pace,
    /// Paces the reads of a dense stream (`linger_ms`).
    linger: Linger,
}

impl MySqlBackend {
    /// The next changes for the consumer, at most `max`.
    fn read_batch(&mut self, consumer: &Consumer, max: u32) -> Result<Batch, BackendError> {
        let fetch = |p: &mut MySqlPoller, c: &mut Conn, cur: &mut ConsumerCursors| {
            p.fetch(c, consumer, cur, max)
        };
        match self.with_cursors(consumer, fetch)? {
            Ok(batch) => {
                if !batch.changes.is_empty() {
                    self.pace.activity();
                }
                Ok(batch)
            }
            Err(ReadError::Backend(e)) => Err(e),
            // Cursors of a log made again: read with the ones the database has now
            // (install moved them to the new log's start).
            Err(ReadError::Stale { table }) => {
                tracing::warn!(
                    consumer = %consumer,
                    table = %table,
                    "the log table was made again since this consumer's cursors were read; reading them again"
                );
                match self.with_cursors(consumer, fetch)? {
                    Ok(batch) => Ok(batch),
                    Err(ReadError::Backend(e)) => Err(e),
                    Err(ReadError::Stale { table }) => Err(BackendError::Other(format!(
                        "the log of table {table} changed twice during one fetch; trying again"
                    ))),
                }
            }
        }
    }

    fn take_cursors(&mut self, consumer: &Consumer) -> Result<ConsumerCursors, BackendError> {
        match self.consumers.remove(consumer) {
            Some(c) => Ok(c),
            None => consumers::load_cursors(&mut self.conn, consumer),
        }
    }

    /// Run `read` on the consumer's cursors, kept only after success: after an error
    /// they are read again from the database, which is the truth (an eviction, an ack
    /// that may not have landed, a log made again).
    fn with_cursors<T>(
        &mut self,
        consumer: &Consumer,
        read: impl Fn(&mut MySqlPoller, &mut Conn, &mut ConsumerCursors) -> Result<T, ReadError>,
    ) -> Result<Result<T, ReadError>, BackendError> {
        let mut cursors = self.take_cursors(consumer)?;
        let result = read(&mut self.poller, &mut self.conn, &mut cursors);
        if result.is_ok() {
            self.consumers.insert(consumer.clone(), cursors);
        }
        Ok(result)
    }
}

impl Backend for MySqlBackend {
    const NAME: &'static str = "mysql";
    const URL_SCHEMES_JOINED: &'static str = "mysql,mariadb";

    fn open(url: &str, options: &serde_json::Value) -> Result<Self, BackendError> {
        let options = MySqlOptions::parse(options)?;
        let target = Target::parse(url)?;
        let mut conn = conn::connect(&target, &options)?;
        let server = ServerInfo::query(&mut conn)?;
        let galera = conn::check_server(&mut conn, &options)?;
        let (method, fallback) = gap_judge::choose_method(&mut conn, &options)?;
        let poller = MySqlPoller {
            judge: GapJudge::new(
                method,
                Duration::from_millis(options.gap_timeout_ms),
                Duration::from_millis(options.gap_check_ms.max(1)),
            ),
            max_gap_ranges: options.max_gap_ranges.max(1),
            series: id_series(&mut conn)?,
            caught_up: false,
        };
        let pace = wake::Pace::new(options.poll_bounds());
        let linger = Linger::new(options.linger()?);
        Ok(MySqlBackend {
            target,
            options,
            conn,
            server,
            poller,
            consumers: HashMap::new(),
            truncation_checked: None,
            warnings: galera.into_iter().chain(fallback).collect(),
            snapshots: HashMap::new(),
            pace,
            linger,
        })
    }

    /// No transaction ids, commit order or schemas: see `reader.rs`.
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

    fn plan_install(&mut self, watches: &[Watch]) -> Result<Vec<String>, BackendError> {
        install::plan_install(&mut self.conn, self.server, watches)
    }

    /// Table, column and key names as `information_schema` spells them, each watch with
    /// its key (`catalog.rs`).
    fn resolve(&mut self, watches: &[Watch]) -> Result<Vec<Watch>, BackendError> {
        catalog::MySqlCatalog::new(&mut self.conn).resolve(watches)
    }

    fn install(&mut self, watches: &[Watch]) -> Result<Vec<String>, BackendError> {
        let server = self.server;
        // DDL waits for metadata locks behind the application's transactions: on a
        // connection without the dead-peer read timeout (`conn.rs`).
        let mut patient = conn::connect_patient(&self.target, &self.options)?;
        let result = install::apply(&mut patient, |c| install::plan_install(c, server, watches));
        self.consumers.clear();
        self.snapshots.clear();
        result
    }

    fn plan_uninstall(&mut self) -> Result<Vec<String>, BackendError> {
        install::plan_uninstall(&mut self.conn)
    }

    fn uninstall(&mut self) -> Result<Vec<String>, BackendError> {
        let mut patient = conn::connect_patient(&self.target, &self.options)?;
        let result = install::apply(&mut patient, install::plan_uninstall);
        self.consumers.clear();
        self.snapshots.clear();
        result
    }

    fn register(
        &mut self,
        consumer: &Consumer,
        tables: &[String],
        start: StartFrom,
    ) -> Result<Registered, BackendError> {
        self.consumers.remove(consumer);
        consumers::register(&mut self.conn, consumer, tables, start)
    }

    /// After a dense read the next one waits a moment, so that commits gather (the SDK's
    /// `backend::linger`).
    fn fetch(&mut self, consumer: &Consumer, max: u32) -> Result<Batch, BackendError> {
        self.linger.before_read();
        let batch = self.read_batch(consumer, max)?;
        // Clear first: an error leaves no stale "caught up" for the next read.
        self.linger.after_read(
            batch.changes.len(),
            std::mem::take(&mut self.poller.caught_up),
        );
        Ok(batch)
    }

    fn ack(&mut self, consumer: &Consumer, token: &str, upto_id: i64) -> Result<(), BackendError> {
        let ack = |p: &mut MySqlPoller, c: &mut Conn, cur: &mut ConsumerCursors| {
            p.ack(c, consumer, cur, token, upto_id)
        };
        match self.with_cursors(consumer, ack)? {
            Ok(()) => Ok(()),
            Err(ReadError::Backend(e)) => Err(e),
            // The batch came from a log that is gone; its cursors start over in the new
            // one, which this ack must not move.
            Err(ReadError::Stale { table }) => {
                tracing::warn!(
                    consumer = %consumer,
                    table = %table,
                    "acknowledged changes of a log table that was made again since; its cursor stays at the new log's start"
                );
                Ok(())
            }
        }
    }

    fn wait(&mut self, timeout: Duration) -> Result<bool, BackendError> {
        wake::wait(
            &mut self.conn,
            self.consumers.values(),
            &mut self.pace,
            timeout,
        )
    }

    fn prune(&mut self) -> Result<u64, BackendError> {
        // TRUNCATE fires no trigger: look for one alongside pruning, which the daemon
        // runs periodically, at most every TRUNCATION_CHECK.
        if self
            .truncation_checked
            .is_none_or(|t| t.elapsed() >= truncation::TRUNCATION_CHECK)
        {
            truncation::check_truncation(&mut self.conn)?;
            self.truncation_checked = Some(Instant::now());
        }
        prune::prune(&mut self.conn, self.options.prune_chunk)
    }

    fn reconnect(&mut self) -> Result<(), BackendError> {
        let mut conn = conn::connect(&self.target, &self.options)?;
        self.server = ServerInfo::query(&mut conn)?;
        // The address may now reach another server (a failover behind one name).
        conn::check_server(&mut conn, &self.options)?;
        self.conn = conn;
        // Cursors are reloaded from the database: an ack that failed with the old
        // connection may or may not have been written.
        self.consumers.clear();
        self.snapshots.clear();
        Ok(())
    }

    fn unregister(&mut self, consumer: &Consumer) -> Result<bool, BackendError> {
        self.consumers.remove(consumer);
        consumers::unregister(&mut self.conn, consumer)
    }

    fn touch(&mut self, consumer: &Consumer) -> Result<(), BackendError> {
        consumers::touch(&mut self.conn, consumer)
    }

    fn lease(&mut self, request: &LeaseRequest) -> Result<LeaseState, BackendError> {
        lease::lease(&mut self.conn, request)
    }

    fn evict_stale(&mut self, ttl: Duration) -> Result<Vec<Consumer>, BackendError> {
        let ttl_us = ttl.as_micros().min(i64::MAX as u128) as i64;
        let evicted = consumers::evict_stale(&mut self.conn, ttl_us)?;
        for c in &evicted {
            self.consumers.remove(c);
        }
        Ok(evicted)
    }

    fn add_dead_letter(&mut self, letter: &DeadLetter) -> Result<i64, BackendError> {
        dead_letters::add(&mut self.conn, letter)
    }

    fn dead_letters(&mut self, query: &DeadLetterQuery) -> Result<Vec<DeadLetter>, BackendError> {
        dead_letters::list(&mut self.conn, query)
    }

    fn update_dead_letters(&mut self, update: &DeadLetterUpdate) -> Result<u64, BackendError> {
        dead_letters::update(&mut self.conn, update)
    }

    fn status(&mut self) -> Result<Status, BackendError> {
        status::status(
            &mut self.conn,
            self.server,
            self.options.max_gap_ranges,
            &self.warnings,
        )
    }

    fn barrier(&mut self, request: &BarrierRequest) -> Result<BarrierReply, BackendError> {
        barrier::barrier(&mut self.conn, request)
    }

    /// Trigger bodies contain `;`, which the `mysql` client takes as the end of the
    /// statement unless the delimiter is changed around them.
    fn render_script(&self, statements: &[String]) -> String {
        // MySQL commits each DDL statement on its own: say so, rather than pretend.
        let header = "-- MySQL/MariaDB commit every CREATE/ALTER/DROP on its own: this script \
                      cannot be applied atomically.\n-- If it stops half-way, fix the cause and \
                      run `epidemic install` (or a new `epidemic sql`): it plans from what \
                      exists.\n\n";
        let body: String = statements
            .iter()
            .map(|s| {
                if s.trim_start().starts_with("CREATE TRIGGER") {
                    format!("DELIMITER //\n{s} //\nDELIMITER ;\n\n")
                } else {
                    format!("{s};\n\n")
                }
            })
            .collect();
        format!("{header}{body}")
    }

    fn scratch(&mut self, op: &Scratch) -> Result<(), BackendError> {
        self.consumers.clear();
        self.snapshots.clear();
        scratch::scratch(&mut self.conn, op)
    }

    /// The next rows by key, then the watermark (`snapshot.rs`).
    fn snapshot_chunk(&mut self, request: &ChunkRequest) -> Result<Chunk, BackendError> {
        let result =
            snapshot::snapshot_chunk(&mut self.conn, self.server, &mut self.snapshots, request);
        if result.is_err() {
            // The catalog may have changed under the plan (a key column altered).
            self.snapshots.remove(&request.table);
        }
        result
    }

    /// Requests and progress in `epidemic_backfill` (`backfill.rs`).
    fn backfills(&mut self, request: &BackfillRequest) -> Result<BackfillReply, BackendError> {
        backfill::backfills(&mut self.conn, self.server, request)
    }
}

epidemic_plugin_sdk::export_backend!(MySqlBackend);
