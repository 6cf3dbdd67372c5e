//! The PostgreSQL backend for Epidemic, loaded by the host as a plugin library.
//!
//! Capture: for each watched table a trigger copies the old and new values of the
//! captured columns (the row's key, and every column a handler watches) into a log table
//! in Epidemic's own schema and sends a `NOTIFY` wake-up. Reading: a consumer's cursor is
//! a pair of transaction snapshots, as in Skytools' PgQ, so changes are never skipped
//! whatever order transactions commit in, and a long-running transaction holds back
//! nobody else's changes. Waiting: `LISTEN` on one channel, with writers notifying only
//! while a reader waits unless configured otherwise.
//!
//! What a change carries beyond the minimum ([`Capabilities`]): the table's schema
//! (always, `public` included), the writing transaction's id (`txid`, its `xid8`), and a
//! commit-order token (`commit_seq`, one per batch, growing from one batch of a consumer
//! to the next); see `reader` for their exact meaning. Every change carries the row's
//! key and a stable id that is never handed out twice (see `registry`).
//!
//! Start reading at [`PgBackend`]'s `impl Backend`, which only delegates. The code map,
//! one role per module, the same names as the other backends where the role is the same:
//!
//! - `options`: the `[database]` options and the URL; `conn`: connecting, session
//!   settings; `tls`: `sslmode` and the connector; `stream`: the dead-peer watch;
//!   `error`: errors and their kinds; `ident`: validated names and quoting.
//! - `catalog`: the user's tables, columns and keys, and `resolve`.
//! - `install`: planning and applying install and uninstall; `registry`: Epidemic's
//!   bookkeeping tables; `capture`: the log table, trigger function and triggers of one
//!   table; `partition`: partition moves and TRUNCATE of partitions.
//! - `reader`: fetch and ack by snapshots; `consumers`: registration, liveness,
//!   eviction; `prune`; `wake`: `LISTEN`/`NOTIFY` wake-ups.
//! - `snapshot`: a backfill's chunk read by key and its watermark in the log;
//!   `backfill`: backfill requests and progress.
//! - `dead_letters`, `status`, `lease`, `scratch` (bench).
//!
//! Value mapping: `int2`/`int4`/`int8` are [`Value::Int`](epidemic_plugin_sdk::Value),
//! `float4`/`float8` are `Float`, `bytea` is `Bytes`, `text`/`varchar`/`char`/`name` are
//! `Text`, every other type (including `numeric`, to keep its precision, `bool`,
//! timestamps, `json`, arrays) is its PostgreSQL text form as `Text`; SQL NULL is `Null`.
//!
//! Connections: TLS as libpq's `sslmode`, `sslrootcert`, `sslcert` and `sslkey` in the
//! URL say (`tls`), every connection's stream watched for a peer that went silent
//! (`stream`, with TCP keepalives and a heartbeat while waiting in `wake`), all driven by
//! the `dead_peer_timeout_ms` option: a dead path becomes a connection error, on which the
//! host reconnects and reads the log again.
//!
//! What this crate deliberately does not do: decide which changes a handler wants, retry,
//! or keep any state that matters outside the database (a killed daemon loses nothing).

mod backfill;
mod barrier;
mod capture;
mod catalog;
mod conn;
mod consumers;
mod dead_letters;
mod error;
mod ident;
mod install;
mod lease;
mod options;
mod partition;
mod prune;
mod reader;
mod registry;
mod scratch;
mod snapshot;
mod status;
mod stream;
mod tls;
mod wake;

pub use error::PgError;

use std::time::Duration;

use epidemic_plugin_sdk::backend::{
    kit, Backend, BackendError, BackfillReply, BackfillRequest, BarrierReply, BarrierRequest,
    Batch, BenchVariant, Capabilities, Chunk, ChunkRequest, Consumer, DeadLetter, DeadLetterQuery,
    DeadLetterUpdate, LeaseRequest, LeaseState, Registered, Scratch, StartFrom, Status, Watch,
};
use postgres::Client;

use crate::backfill::PgBackfills;
use crate::consumers::PgConsumers;
use crate::dead_letters::PgDeadLetters;
use crate::ident::TableName;
use crate::install::PgInstaller;
use crate::lease::PgLeases;
use crate::options::{PgOptions, PgUrl};
use crate::prune::PgPruner;
use crate::reader::PgReader;
use crate::scratch::PgScratch;
use crate::snapshot::PgSnapshots;
use crate::stream::DeadPeerWatch;
use crate::wake::PgListener;

/// One connection to the database, serving one thread of the host.
pub struct PgBackend {
    url: PgUrl,
    options: PgOptions,
    client: Client,
    /// The dead-peer limit of this backend's connection, and its patient statements.
    watch: DeadPeerWatch,
    listener: PgListener,
    reader: PgReader,
    snapshots: PgSnapshots,
    scratch: PgScratch,
}

/// How long a dropped backend waits for the server to delete its registration: a
/// path that died silently must not hold up a daemon's shutdown (the row lapses anyway).
const RELEASE_LIMIT: Duration = Duration::from_secs(2);

impl Drop for PgBackend {
    fn drop(&mut self) {
        let (listener, client) = (&mut self.listener, &mut self.client);
        self.watch
            .hurried(RELEASE_LIMIT, || listener.release(client));
    }
}

impl PgBackend {
    /// Apply a plan like an install; what this connection prepared may be out of date
    /// afterwards (registrations, captured columns, tables).
    fn apply(
        &mut self,
        what: &str,
        plan: impl FnOnce(
            &PgInstaller<'_>,
            &mut postgres::Transaction<'_>,
        ) -> Result<Vec<String>, PgError>,
    ) -> Result<Vec<String>, PgError> {
        let installer = PgInstaller {
            schema: &self.options.schema,
            notify: self.options.notify,
        };
        // DDL may wait for locks behind the application's transactions: no dead-peer
        // limit on its answers (see `stream`).
        let client = &mut self.client;
        let statements = self.watch.patient(|| installer.apply(client, what, plan))?;
        self.reader.reset();
        self.snapshots.reset();
        self.listener.schema_changed();
        self.scratch.reset();
        Ok(statements)
    }
}

impl Backend for PgBackend {
    const NAME: &'static str = "postgres";
    const URL_SCHEMES_JOINED: &'static str = "postgres,postgresql";

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            // NOTIFY takes a database-wide lock at commit, and a reader that reads once per
            // commit costs writers too: worth seeing what each costs.
            bench_variants: vec![
                BenchVariant {
                    label: "notify off".into(),
                    options: serde_json::json!({ "notify": false }),
                },
                BenchVariant {
                    label: "linger 0".into(),
                    options: serde_json::json!({ "linger_ms": 0 }),
                },
            ],
            transaction_ids: true,
            commit_order: true,
            schemas: true,
        }
    }

    fn open(url: &str, options: &serde_json::Value) -> Result<Self, BackendError> {
        let options = PgOptions::from_json(options)?;
        let url = PgUrl::parse(url, options.dead_peer_timeout)?;
        let watch = DeadPeerWatch::new(options.dead_peer_timeout);
        let mut client = conn::connect(&url, &watch)?;
        let poll = wake::fallback_poll(&mut client, &options);
        Ok(PgBackend {
            listener: PgListener::new(
                options.schema.clone(),
                options.notify,
                poll,
                options.dead_peer_timeout,
                options.linger,
            ),
            watch,
            reader: PgReader::new(options.schema.clone()),
            snapshots: PgSnapshots::new(options.schema.clone()),
            url,
            options,
            client,
            scratch: PgScratch::default(),
        })
    }

    fn resolve(&mut self, watches: &[Watch]) -> Result<Vec<Watch>, BackendError> {
        Ok(catalog::resolve(&mut self.client, watches)?)
    }

    fn plan_install(&mut self, watches: &[Watch]) -> Result<Vec<String>, BackendError> {
        let installer = PgInstaller {
            schema: &self.options.schema,
            notify: self.options.notify,
        };
        Ok(installer.plan_install(&mut self.client, watches)?)
    }

    fn install(&mut self, watches: &[Watch]) -> Result<Vec<String>, BackendError> {
        Ok(self.apply("install", |i, tx| i.plan_install(tx, watches))?)
    }

    /// One transaction, as install itself applies it: a DBA's `psql -f` applies all of it
    /// or nothing.
    fn render_script(&self, statements: &[String]) -> String {
        let body: String = statements.iter().map(|s| format!("{s};\n\n")).collect();
        format!("BEGIN;\n\n{body}COMMIT;\n")
    }

    fn plan_uninstall(&mut self) -> Result<Vec<String>, BackendError> {
        let installer = PgInstaller {
            schema: &self.options.schema,
            notify: self.options.notify,
        };
        Ok(installer.plan_uninstall(&mut self.client)?)
    }

    fn uninstall(&mut self) -> Result<Vec<String>, BackendError> {
        Ok(self.apply("uninstall", |i, tx| i.plan_uninstall(tx))?)
    }

    fn register(
        &mut self,
        consumer: &Consumer,
        tables: &[String],
        start: StartFrom,
    ) -> Result<Registered, BackendError> {
        self.reader.forget(consumer);
        self.snapshots.reset();
        let consumers = PgConsumers {
            schema: &self.options.schema,
        };
        Ok(consumers.register(&mut self.client, consumer, tables, start)?)
    }

    fn fetch(&mut self, consumer: &Consumer, max: u32) -> Result<Batch, BackendError> {
        // Right after the ack that closed a batch this connection read whole, a read
        // would find only what committed since; the wake-ups say when that is (see
        // `PgListener::may_skip_read`).
        if self.reader.take_whole_batch_closed(consumer) && self.listener.may_skip_read() {
            self.listener.read_skipped();
            return Ok(Batch::default());
        }
        self.listener.read_started(&mut self.client);
        let clear = self.listener.clear_if_busy();
        let batch = self.reader.fetch(&mut self.client, consumer, max, clear)?;
        self.listener
            .read_done(batch.changes.len(), max as usize, clear);
        Ok(batch)
    }

    fn ack(&mut self, consumer: &Consumer, token: &str, upto_id: i64) -> Result<(), BackendError> {
        Ok(self
            .reader
            .ack(&mut self.client, consumer, token, upto_id)?)
    }

    fn wait(&mut self, timeout: Duration) -> Result<bool, BackendError> {
        self.reader.clear_whole_batch_closed();
        Ok(self.listener.wait(&mut self.client, timeout)?)
    }

    fn prune(&mut self) -> Result<u64, BackendError> {
        let pruner = PgPruner {
            schema: &self.options.schema,
        };
        // One DELETE of a large backlog may run long: no dead-peer limit on its answer.
        let client = &mut self.client;
        Ok(self.watch.patient(|| pruner.prune(client))?)
    }

    fn reconnect(&mut self) -> Result<(), BackendError> {
        let mut client = conn::connect(&self.url, &self.watch)?;
        self.listener.reconnected(&mut client)?;
        self.client = client;
        self.reader.reset();
        self.snapshots.reset();
        self.scratch.reset();
        Ok(())
    }

    fn unregister(&mut self, consumer: &Consumer) -> Result<bool, BackendError> {
        self.reader.forget(consumer);
        let backfills = PgBackfills {
            schema: &self.options.schema,
        };
        backfills.forget(&mut self.client, consumer)?;
        let consumers = PgConsumers {
            schema: &self.options.schema,
        };
        Ok(consumers.unregister(&mut self.client, consumer)?)
    }

    fn touch(&mut self, consumer: &Consumer) -> Result<(), BackendError> {
        let consumers = PgConsumers {
            schema: &self.options.schema,
        };
        Ok(consumers.touch(&mut self.client, consumer)?)
    }

    fn lease(&mut self, request: &LeaseRequest) -> Result<LeaseState, BackendError> {
        let leases = PgLeases {
            schema: &self.options.schema,
        };
        Ok(leases.apply(&mut self.client, request)?)
    }

    fn evict_stale(&mut self, ttl: Duration) -> Result<Vec<Consumer>, BackendError> {
        let consumers = PgConsumers {
            schema: &self.options.schema,
        };
        let evicted = consumers.evict_stale(&mut self.client, ttl)?;
        for c in &evicted {
            self.reader.forget(c);
        }
        Ok(evicted)
    }

    fn add_dead_letter(&mut self, letter: &DeadLetter) -> Result<i64, BackendError> {
        let letters = PgDeadLetters {
            schema: &self.options.schema,
        };
        Ok(letters.add(&mut self.client, letter)?)
    }

    fn dead_letters(&mut self, query: &DeadLetterQuery) -> Result<Vec<DeadLetter>, BackendError> {
        let letters = PgDeadLetters {
            schema: &self.options.schema,
        };
        Ok(letters.list(&mut self.client, query)?)
    }

    fn update_dead_letters(&mut self, update: &DeadLetterUpdate) -> Result<u64, BackendError> {
        let letters = PgDeadLetters {
            schema: &self.options.schema,
        };
        Ok(letters.update(&mut self.client, update)?)
    }

    fn status(&mut self) -> Result<Status, BackendError> {
        Ok(status::status(&mut self.client, &self.options.schema)?)
    }

    fn barrier(&mut self, request: &BarrierRequest) -> Result<BarrierReply, BackendError> {
        Ok(barrier::barrier(
            &mut self.client,
            &self.options.schema,
            request,
        )?)
    }

    /// One bounded SELECT by key, then the watermark (see module `snapshot`).
    fn snapshot_chunk(&mut self, request: &ChunkRequest) -> Result<Chunk, BackendError> {
        // The watermark is written here and notifies nobody: the next fetch must read.
        self.reader.clear_whole_batch_closed();
        Ok(self.snapshots.chunk(&mut self.client, request)?)
    }

    fn backfills(&mut self, request: &BackfillRequest) -> Result<BackfillReply, BackendError> {
        let backfills = PgBackfills {
            schema: &self.options.schema,
        };
        Ok(backfills.apply(&mut self.client, request)?)
    }

    /// Only ever touches the scratch table; see module `scratch`.
    fn scratch(&mut self, op: &Scratch) -> Result<(), BackendError> {
        let (Scratch::Create { table } | Scratch::Insert { table, .. } | Scratch::Drop { table }) =
            op;
        kit::check_scratch(table)?;
        let name = TableName::parse(table)?;
        match op {
            Scratch::Create { .. } => {
                self.apply("create the bench's scratch table", |i, tx| {
                    scratch::create_plan(i, tx, &name)
                })?;
            }
            Scratch::Insert {
                first_id,
                count,
                per_tx,
                ..
            } => self
                .scratch
                .insert(&mut self.client, &name, *first_id, *count, *per_tx)?,
            Scratch::Drop { .. } => {
                self.apply("drop the bench's scratch table", |i, tx| {
                    scratch::drop_plan(i, tx, &name)
                })?;
            }
        }
        Ok(())
    }
}

epidemic_plugin_sdk::export_backend!(PgBackend);
