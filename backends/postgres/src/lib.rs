//! The PostgreSQL backend for Epidemic, loaded by the host as a plugin library.
//!
//! Capture: for each watched table a trigger copies the old and new values of the
//! watched columns into a log table in Epidemic's own schema and sends a `NOTIFY`
//! wake-up (module `install` describes every object). Reading: a consumer's cursor is a
//! pair of transaction snapshots, as in Skytools' PgQ, so changes are never skipped
//! whatever order transactions commit in, and a long-running transaction holds back
//! nobody else's changes (module `reader`, which also keeps consumers' liveness and
//! eviction). Waiting: `LISTEN` on one channel, with writers notifying only while a
//! reader waits unless configured otherwise (module `listener`). For the host's
//! operations: dead letters (module `dead_letters`), the status report with exact
//! backlogs and schema drift (module `status`), and the bench's scratch table
//! ([`PgBackend::scratch`](epidemic_plugin_sdk::backend::Backend::scratch)).
//!
//! Value mapping: `int2`/`int4`/`int8` are [`Value::Int`](epidemic_plugin_sdk::Value),
//! `float4`/`float8` are `Float`, `bytea` is `Bytes`, `text`/`varchar`/`char`/`name` are
//! `Text`, every other type (including `numeric`, to keep its precision, `bool`,
//! timestamps, `json`, arrays) is its PostgreSQL text form as `Text`; SQL NULL is `Null`.
//!
//! What this crate deliberately does not do: decide which changes a handler wants, retry,
//! keep any state that matters outside the database (a killed daemon loses nothing),
//! or speak TLS (the URL must allow a plain connection).

mod dead_letters;
mod error;
mod ident;
mod install;
mod lease;
mod listener;
mod options;
mod reader;
mod status;

pub use error::PgError;

use std::time::Duration;

use epidemic_plugin_sdk::backend::{
    Backend, BackendError, Batch, BenchVariant, Capabilities, Consumer, DeadLetter,
    DeadLetterQuery, DeadLetterUpdate, LeaseRequest, LeaseState, Registered, Scratch, StartFrom,
    Status, Watch, SCRATCH_TABLE,
};
use postgres::{Client, Config, NoTls, Statement};

use crate::dead_letters::PgDeadLetters;
use crate::error::is_connection_error;
use crate::ident::TableName;
use crate::install::PgInstaller;
use crate::lease::PgLeases;
use crate::listener::PgListener;
use crate::options::{redact_url, PgOptions};
use crate::reader::PgReader;

/// Connecting gives up after this long unless the URL sets `connect_timeout`, so that a
/// reconnect attempt during an outage does not hang the host.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// One connection to the database, serving one thread of the host.
pub struct PgBackend {
    config: Config,
    /// For messages: the URL with its password replaced.
    url: String,
    options: PgOptions,
    client: Client,
    listener: PgListener,
    reader: PgReader,
    /// The bench's scratch-table insert, prepared on this connection.
    scratch_insert: Option<Statement>,
}

/// What every connection sets first, whatever the database's or role's defaults: the
/// reading rule needs each statement to see what committed before it (READ COMMITTED;
/// under SERIALIZABLE our reads would also take part in the writers' serialization
/// checks and could make *their* transactions fail), and install, the cursors and the
/// log are written (a `default_transaction_read_only = on` set for the database must not
/// stop Epidemic). Only these sessions are affected.
const SESSION_SETTINGS: &str = "SET default_transaction_isolation = 'read committed'; \
     SET default_transaction_read_only = off; SET default_transaction_deferrable = off";

fn connect(config: &Config, url: &str) -> Result<Client, PgError> {
    let failed = |e: postgres::Error| PgError::Connect {
        url: url.to_owned(),
        reason: error::describe(&e),
        connection: is_connection_error(&e),
    };
    let mut client = config.connect(NoTls).map_err(failed)?;
    client.batch_execute(SESSION_SETTINGS).map_err(failed)?;
    Ok(client)
}

/// With prepared transactions enabled the capture triggers do not notify (see
/// [`crate::install`]), so the fallback poll is how changes are found: unless configured,
/// make it as short as with `when-idle`.
fn fallback_poll(client: &mut Client, options: &PgOptions) -> Duration {
    let two_phase = client
        .query_one(
            "SELECT current_setting('max_prepared_transactions')::int4 > 0",
            &[],
        )
        .map(|r| r.get::<_, bool>(0))
        .unwrap_or(false);
    if two_phase && !options.fallback_poll_configured {
        options.fallback_poll.min(TWO_PHASE_FALLBACK_POLL)
    } else {
        options.fallback_poll
    }
}

/// The fallback poll interval, unless configured, on a server that allows prepared
/// transactions: `when-idle`'s default.
const TWO_PHASE_FALLBACK_POLL: Duration = Duration::from_millis(250);

impl PgBackend {
    /// Run `plan` (computed inside the transaction) and commit. Concurrent installs of
    /// the same schema are serialised by an advisory lock held until commit.
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
        let mut tx = self
            .client
            .transaction()
            .map_err(PgError::sql(format!("begin {what}")))?;
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext('epidemic install ' || $1))",
            &[&installer.schema.as_str()],
        )
        .map_err(PgError::sql(format!("lock for {what}")))?;
        let statements = plan(&installer, &mut tx)?;
        for s in &statements {
            tx.batch_execute(s)
                .map_err(PgError::sql(format!("{what}: {}", first_line(s))))?;
        }
        tx.commit()
            .map_err(PgError::sql(format!("commit {what}")))?;
        // Registrations, captured columns or tables may have changed: prepared reads
        // are rebuilt on the next use.
        self.reader.reset();
        self.listener.schema_changed();
        self.scratch_insert = None;
        Ok(statements)
    }

    /// Insert scratch rows `first_id ..< first_id + count`, `per_tx` per transaction.
    fn scratch_insert(
        &mut self,
        name: &TableName,
        first_id: i64,
        count: u64,
        per_tx: u64,
    ) -> Result<(), PgError> {
        let statement = match &self.scratch_insert {
            Some(s) => s.clone(),
            None => {
                let s = self
                    .client
                    .prepare(&format!(
                        "INSERT INTO {} (id, payload) VALUES ($1, 'bench')",
                        name.quoted()
                    ))
                    .map_err(PgError::sql(format!("prepare inserts into {name}")))?;
                self.scratch_insert = Some(s.clone());
                s
            }
        };
        let context = || format!("insert into {name}");
        let end = first_id.saturating_add(i64::try_from(count).unwrap_or(i64::MAX));
        let per_tx = i64::try_from(per_tx.max(1)).unwrap_or(i64::MAX);
        let mut id = first_id;
        while id < end {
            let upto = id.saturating_add(per_tx).min(end);
            if upto - id == 1 {
                // One row: one round trip, the statement is its own transaction.
                self.client
                    .execute(&statement, &[&id])
                    .map_err(PgError::sql(context()))?;
            } else {
                let mut tx = self.client.transaction().map_err(PgError::sql(context()))?;
                for i in id..upto {
                    tx.execute(&statement, &[&i])
                        .map_err(PgError::sql(context()))?;
                }
                tx.commit().map_err(PgError::sql(context()))?;
            }
            id = upto;
        }
        Ok(())
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

impl Backend for PgBackend {
    const NAME: &'static str = "postgres";
    const URL_SCHEMES_JOINED: &'static str = "postgres,postgresql";

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            // NOTIFY takes a database-wide lock at commit: worth seeing what it costs.
            bench_variants: vec![BenchVariant {
                label: "notify off".into(),
                options: serde_json::json!({ "notify": false }),
            }],
            transaction_ids: false,
            commit_order: false,
            schemas: false,
        }
    }

    fn open(url: &str, options: &serde_json::Value) -> Result<Self, BackendError> {
        let options = PgOptions::from_json(options)?;
        let redacted = redact_url(url);
        let mut config: Config = url
            .parse()
            .map_err(|e: postgres::Error| PgError::InvalidUrl {
                url: redacted.clone(),
                reason: error::describe(&e),
            })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(DEFAULT_CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("epidemic");
        }
        let mut client = connect(&config, &redacted)?;
        let poll = fallback_poll(&mut client, &options);
        Ok(PgBackend {
            listener: PgListener::new(options.schema.clone(), options.notify, poll),
            reader: PgReader::new(options.schema.clone()),
            config,
            url: redacted,
            options,
            client,
            scratch_insert: None,
        })
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
        Ok(self
            .reader
            .register(&mut self.client, consumer, tables, start)?)
    }

    fn fetch(&mut self, consumer: &Consumer, max: u32) -> Result<Batch, BackendError> {
        self.listener.read_started(&mut self.client);
        let clear = self.listener.clear_if_busy();
        let batch = self.reader.fetch(&mut self.client, consumer, max, clear)?;
        self.listener.read_done(!batch.changes.is_empty(), clear);
        Ok(batch)
    }

    fn ack(&mut self, consumer: &Consumer, token: &str, upto_id: i64) -> Result<(), BackendError> {
        Ok(self
            .reader
            .ack(&mut self.client, consumer, token, upto_id)?)
    }

    fn wait(&mut self, timeout: Duration) -> Result<bool, BackendError> {
        Ok(self.listener.wait(&mut self.client, timeout)?)
    }

    fn prune(&mut self) -> Result<u64, BackendError> {
        Ok(self.reader.prune(&mut self.client)?)
    }

    fn reconnect(&mut self) -> Result<(), BackendError> {
        let mut client = connect(&self.config, &self.url)?;
        self.listener.reconnected(&mut client)?;
        self.client = client;
        self.reader.reset();
        self.scratch_insert = None;
        Ok(())
    }

    fn unregister(&mut self, consumer: &Consumer) -> Result<bool, BackendError> {
        Ok(self.reader.unregister(&mut self.client, consumer)?)
    }

    fn touch(&mut self, consumer: &Consumer) -> Result<(), BackendError> {
        Ok(self.reader.touch(&mut self.client, consumer)?)
    }

    fn lease(&mut self, request: &LeaseRequest) -> Result<LeaseState, BackendError> {
        let leases = PgLeases {
            schema: &self.options.schema,
        };
        Ok(leases.apply(&mut self.client, request)?)
    }

    fn evict_stale(&mut self, ttl: Duration) -> Result<Vec<Consumer>, BackendError> {
        Ok(self.reader.evict_stale(&mut self.client, ttl)?)
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

    /// Only ever touches [`SCRATCH_TABLE`] in `public` (the default `search_path`) and
    /// what Epidemic keeps for it. `Create` and `Drop` run like install: in one
    /// transaction, under the install lock.
    fn scratch(&mut self, op: &Scratch) -> Result<(), BackendError> {
        let (Scratch::Create { table } | Scratch::Insert { table, .. } | Scratch::Drop { table }) =
            op;
        if table != SCRATCH_TABLE {
            return Err(PgError::NotScratch {
                expected: SCRATCH_TABLE,
                table: table.clone(),
            }
            .into());
        }
        let name = TableName::parse(table)?;
        match op {
            Scratch::Create { .. } => {
                self.apply("create the bench's scratch table", |i, tx| {
                    let mut plan = i.plan_forget_table(tx, &name)?;
                    plan.push(format!("DROP TABLE IF EXISTS {}", name.quoted()));
                    plan.push(format!(
                        "CREATE TABLE {} (id bigint PRIMARY KEY, payload text)",
                        name.quoted()
                    ));
                    Ok(plan)
                })?;
            }
            Scratch::Insert {
                first_id,
                count,
                per_tx,
                ..
            } => self.scratch_insert(&name, *first_id, *count, *per_tx)?,
            Scratch::Drop { .. } => {
                self.apply("drop the bench's scratch table", |i, tx| {
                    let mut plan = i.plan_forget_table(tx, &name)?;
                    plan.push(format!("DROP TABLE IF EXISTS {}", name.quoted()));
                    Ok(plan)
                })?;
            }
        }
        Ok(())
    }
}

epidemic_plugin_sdk::export_backend!(PgBackend);
