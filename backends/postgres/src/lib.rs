//! The PostgreSQL backend for Epidemic, loaded by the host as a plugin library.
//!
//! Capture: for each watched table a trigger copies the old and new values of the
//! watched columns into a log table in Epidemic's own schema and sends a `NOTIFY`
//! wake-up (module `install` describes every object). Reading: a consumer's cursor is a
//! pair of transaction snapshots, as in Skytools' PgQ, so changes are never skipped
//! whatever order transactions commit in, and a long-running transaction holds back
//! nobody else's changes (module `reader`). Waiting: `LISTEN` on one channel (module
//! `listener`).
//!
//! Value mapping: `int2`/`int4`/`int8` are [`Value::Int`](epidemic_plugin_sdk::Value),
//! `float4`/`float8` are `Float`, `bytea` is `Bytes`, `text`/`varchar`/`char`/`name` are
//! `Text`, every other type (including `numeric`, to keep its precision, `bool`,
//! timestamps, `json`, arrays) is its PostgreSQL text form as `Text`; SQL NULL is `Null`.
//!
//! What this crate deliberately does not do: decide which changes a handler wants, retry,
//! keep any state that matters outside the database (a killed daemon loses nothing),
//! capture `TRUNCATE`, or speak TLS (the URL must allow a plain connection).

mod error;
mod ident;
mod install;
mod listener;
mod options;
mod reader;

pub use error::PgError;

use std::time::Duration;

use epidemic_plugin_sdk::{Backend, BackendError, Batch, Consumer, Registered, StartFrom, Watch};
use postgres::{Client, Config, NoTls};

use crate::error::is_connection_error;
use crate::install::PgInstaller;
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
}

fn connect(config: &Config, url: &str) -> Result<Client, PgError> {
    config.connect(NoTls).map_err(|e| PgError::Connect {
        url: url.to_owned(),
        reason: error::describe(&e),
        connection: is_connection_error(&e),
    })
}

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
        Ok(statements)
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

impl Backend for PgBackend {
    const NAME: &'static str = "postgres";
    const URL_SCHEMES_JOINED: &'static str = "postgres,postgresql";

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
        let client = connect(&config, &redacted)?;
        Ok(PgBackend {
            listener: PgListener::new(
                options.schema.clone(),
                options.notify,
                options.fallback_poll,
            ),
            reader: PgReader::new(options.schema.clone()),
            config,
            url: redacted,
            options,
            client,
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
        let statements = self.apply("install", |i, tx| i.plan_install(tx, watches))?;
        // Captured columns may have grown: re-read them on the next fetch.
        self.reader.reset();
        Ok(statements)
    }

    fn plan_uninstall(&mut self) -> Result<Vec<String>, BackendError> {
        let installer = PgInstaller {
            schema: &self.options.schema,
            notify: self.options.notify,
        };
        Ok(installer.plan_uninstall(&mut self.client)?)
    }

    fn uninstall(&mut self) -> Result<Vec<String>, BackendError> {
        let statements = self.apply("uninstall", |i, tx| i.plan_uninstall(tx))?;
        self.reader.reset();
        Ok(statements)
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
        self.listener.discard_pending(&mut self.client);
        Ok(self.reader.fetch(&mut self.client, consumer, max)?)
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
        Ok(())
    }
}

epidemic_plugin_sdk::export_backend!(PgBackend);
