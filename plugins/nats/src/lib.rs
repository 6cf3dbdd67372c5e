//! `nats`: an Epidemic handler plugin that publishes every change to a NATS JetStream
//! stream, exactly once into the stream.
//!
//! It is the plugin for sites that outgrow direct fan-out: one Epidemic daemon per
//! database publishes here, and any number of consumers read the stream with durable
//! consumers and queue groups, at no cost to the database (`docs/sinks.md`).
//!
//! # What is published
//!
//! One message per change, to the subject the `subject` template gives (default
//! `epidemic.{table}.{op}`, e.g. `epidemic.mail_users.update`):
//!
//! - **payload**: the change as one JSON object (the SDK's `Change::to_json`):
//!   `{"id": 42, "stable_id": "9f2c…-42", "table": "users", "op": "UPDATE", "origin": "live", "key": {"id": 7}, "old": {"name": "ann"}, "new": {"name": "anna"}, "changed_at_us": 1700000000000000, "attempt": 1}`
//!   (`old` is `null` for an INSERT, `new` for a DELETE; binary values are lowercase hex;
//!   `old_key`, `schema`, `txid` and `commit_seq` appear where they apply).
//! - header **`Nats-Msg-Id`**: the change's `stable_id`, unique in the database for ever.
//!
//! # Exactly once into the stream
//!
//! The daemon delivers at least once: if it dies between JetStream's acknowledgement and
//! its own (the cursor in the database), the changes in hand come again after the
//! restart. JetStream drops a message whose `Nats-Msg-Id` it stored within the stream's
//! duplicate window (`duplicate_window_secs`, 2 minutes by default) and acknowledges it
//! as a duplicate, so the redelivered change is stored once. This holds as long as the
//! daemon is back within the window: a daemon down for longer than that, with changes
//! published but not acknowledged in the database, can store those few (at most one
//! `daemon.batch_size`) a second time. Give the stream a window longer than the longest
//! restart you expect; the window costs the server memory for the ids it remembers.
//!
//! # Order
//!
//! Messages are published asynchronously, up to `max_in_flight` awaiting their
//! acknowledgements at once, and `handle_batch` returns only when every one of them is
//! acknowledged, so the daemon acknowledges a batch only once JetStream holds all of it.
//! A change is not published while an earlier change of the same row (the same key, or
//! the old key of an UPDATE that moved the row) still waits for its acknowledgement. So
//! if a publish fails, no later change of that row can have been stored before it: the
//! stream holds each row's changes in commit order, across failures, retries, broker
//! restarts and daemon crashes. When the acknowledgement of change *i* fails, the
//! handler reports *i*; the daemon takes the ones before it as done and publishes *i* and
//! the rest again (those already stored are dropped as duplicates).
//!
//! # Outcome
//!
//! | the publish | the handler returns |
//! |---|---|
//! | acknowledged (stored, or a duplicate) | success |
//! | no acknowledgement within `timeout_ms`, connection lost, stream missing or full, any other error from the server | a retryable error |
//! | larger than the server's `max_payload` | a permanent error: dead-lettered at once |
//!
//! Use `on_failure = "block"` on the `[[handler]]` entry so a broker outage longer than
//! the retries is waited out rather than dead-lettering changes. While the connection is
//! down the client reconnects in the background (for ever, across every `url`) and keeps
//! messages to send; the daemon's retries go on meanwhile.
//!
//! # Config
//!
//! ```toml
//! [[handler]]
//! name = "bus"
//! plugin = "nats"                        # = libepidemic_nats.so
//! on_failure = "block"                   # wait out a broker outage
//! [handler.config]
//! table = "mail_users"                   # required
//! columns = ["username", "quota_bytes"]  # required: what goes in old/new
//! ops = ["insert", "update", "delete"]   # default: all three
//! url = ["nats://n1:4222", "nats://n2:4222"]  # required: one URL or a list (a cluster)
//! stream = "EPIDEMIC"                    # default; created if missing
//! subject = "epidemic.{table}.{op}"      # default; placeholders {table} {op} {daemon} {handler}
//! duplicate_window_secs = 120            # default; used when the handler creates the stream
//! timeout_ms = 10000                     # default: connect, stream requests, each acknowledgement
//! max_in_flight = 1000                   # default: publishes awaiting acknowledgement at once
//! tls = false                            # default: require TLS (a tls:// URL or a server that requires it also gives TLS)
//! ca_file = "/etc/epidemic/nats-ca.pem"  # optional: trust these CAs too (besides the system's CA store)
//! credentials_file = "/etc/epidemic/bus.creds"  # optional: JWT + NKey; or token_file; or user + password_file
//! ```
//!
//! `{op}` is `insert`, `update` or `delete`; `{table}`, `{daemon}` and `{handler}` are
//! filled in at start. At start the handler connects (one try per URL), then looks the
//! stream up: a missing stream is created (file storage, the subjects this handler
//! publishes to, `duplicate_window_secs`); an existing stream that does not capture one
//! of those subjects is given it (its other settings are left alone, and its own
//! duplicate window applies). A bad URL, an unknown placeholder, an unreadable secret
//! file, a server that cannot be reached, or a stream that cannot be set up stops the
//! daemon with one line naming the handler and the key:
//! `handler "bus" (nats): invalid nats config: subject: unknown placeholder {tabel} in "epidemic.{tabel}.{op}" (known: {table}, {op}, {daemon}, {handler})`.
//!
//! # Client
//!
//! `async-nats`, the NATS maintainers' own Rust client (the older sync `nats` crate is
//! deprecated in its favour), with JetStream and rustls. Its futures run on a small tokio
//! runtime the handler owns (one worker thread, which also answers the server's pings
//! between batches); the host's thread blocks on it for each batch.
//!
//! # What it does not do
//!
//! It does not consume, and it does not manage the stream beyond creating it and adding
//! its subjects: retention, limits, replicas and consumers are the NATS operator's.

mod config;
mod error;

use std::collections::{HashMap, VecDeque};

use async_nats::jetstream::context::{ContextBuilder, PublishAckFuture};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, stream};
use async_nats::{ConnectOptions, Event};
use epidemic_plugin_sdk::{
    tracing, BatchError, Change, Context, Handler, HandlerConfig, HandlerError, Op, Subscription,
};

pub use config::{Auth, NatsConfig, SubjectTemplate, DEFAULT_SUBJECT, PLACEHOLDERS};
pub use error::NatsError;

/// The handler: one per `[[handler]]` entry.
pub struct NatsHandler {
    config: NatsConfig,
    /// Drives the client's connection and the futures of each batch.
    runtime: tokio::runtime::Runtime,
    js: jetstream::Context,
    /// The subject for each operation, rendered once.
    subjects: [String; 3],
}

fn op_index(op: Op) -> usize {
    match op {
        Op::Insert => 0,
        Op::Update => 1,
        Op::Delete => 2,
    }
}

fn start_error(key: &'static str, msg: impl std::fmt::Display) -> NatsError {
    NatsError::Config {
        key,
        msg: msg.to_string(),
    }
}

impl NatsHandler {
    /// Connect and set up the stream for a checked config.
    pub fn connect(config: NatsConfig, name: &str) -> Result<NatsHandler, NatsError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("epidemic-nats")
            .enable_all()
            .build()
            .map_err(|e| start_error("url", format!("cannot start the client's runtime: {e}")))?;
        let js = runtime.block_on(Self::connect_async(&config, name))?;
        let subjects = [Op::Insert, Op::Update, Op::Delete].map(|op| config.subject.render(op));
        Ok(NatsHandler {
            config,
            runtime,
            js,
            subjects,
        })
    }

    async fn connect_async(
        config: &NatsConfig,
        name: &str,
    ) -> Result<jetstream::Context, NatsError> {
        let mut options = ConnectOptions::new()
            .name(name)
            .connection_timeout(config.timeout)
            .request_timeout(Some(config.timeout))
            .require_tls(config.tls)
            .event_callback(|event| async move {
                match event {
                    Event::Connected => tracing::info!("nats: connected"),
                    Event::Disconnected => tracing::warn!("nats: disconnected; reconnecting"),
                    other => tracing::warn!("nats: {other}"),
                }
            });
        if let Some(ca) = &config.ca_file {
            options = options.add_root_certificates(ca.clone());
        }
        options = match &config.auth {
            Auth::None => options,
            Auth::Credentials(path) => options.credentials_file(path).await.map_err(|e| {
                start_error(
                    "credentials_file",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?,
            Auth::Token(token) => options.token(token.clone()),
            Auth::UserPassword(user, password) => {
                options.user_and_password(user.clone(), password.clone())
            }
        };
        let client = options.connect(config.urls.clone()).await.map_err(|e| {
            start_error(
                "url",
                format!("cannot connect to {}: {e}", config.urls.join(", ")),
            )
        })?;
        let js = ContextBuilder::new()
            .timeout(config.timeout)
            .max_ack_inflight(config.max_in_flight)
            .build(client);
        Self::ensure_stream(&js, config).await?;
        Ok(js)
    }

    /// Create the stream if it is missing, and give it the subjects it lacks.
    async fn ensure_stream(js: &jetstream::Context, config: &NatsConfig) -> Result<(), NatsError> {
        let needed = config.stream_subjects();
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            start_error(
                "stream",
                format!("cannot {what} stream {}: {e}", config.stream),
            )
        };
        let stream = js
            .get_or_create_stream(stream::Config {
                name: config.stream.clone(),
                subjects: needed.clone(),
                storage: stream::StorageType::File,
                duplicate_window: config.duplicate_window,
                ..Default::default()
            })
            .await
            .map_err(|e| fail("look up or create", &e))?;
        let mut stream_config = stream.cached_info().config.clone();
        let missing: Vec<String> = needed
            .into_iter()
            .filter(|s| {
                !stream_config
                    .subjects
                    .iter()
                    .any(|pattern| subject_matches(pattern, s))
            })
            .collect();
        if !missing.is_empty() {
            tracing::info!(
                stream = %config.stream,
                subjects = %missing.join(", "),
                "nats: adding subjects to the stream"
            );
            stream_config.subjects.extend(missing);
            js.update_stream(&stream_config)
                .await
                .map_err(|e| fail("add subjects to", &e))?;
        }
        tracing::info!(
            stream = %config.stream,
            duplicate_window = ?stream_config.duplicate_window,
            "nats: publishing to the stream"
        );
        Ok(())
    }

    pub fn config(&self) -> &NatsConfig {
        &self.config
    }

    async fn publish(&self, change: &Change) -> Result<PublishAckFuture, NatsError> {
        let subject = &self.subjects[op_index(change.op)];
        let payload =
            serde_json::to_vec(&change.to_json()).map_err(|e| NatsError::Encode(e.to_string()))?;
        self.js
            .send_publish(
                subject.clone(),
                PublishMessage::build()
                    .payload(payload.into())
                    .message_id(&change.stable_id),
            )
            .await
            .map_err(|source| NatsError::Publish {
                subject: subject.clone(),
                source,
            })
    }

    /// Wait for the acknowledgements in `pending` (in index order), through index
    /// `through` or all of them; the first failure ends it, naming its change.
    async fn settle(
        &self,
        changes: &[Change],
        pending: &mut VecDeque<(usize, PublishAckFuture)>,
        through: Option<usize>,
    ) -> Result<(), BatchError> {
        while let Some(&(i, _)) = pending.front() {
            if through.is_some_and(|t| i > t) {
                break;
            }
            let Some((i, ack)) = pending.pop_front() else {
                break;
            };
            if let Err(source) = ack.await {
                let error = NatsError::Publish {
                    subject: self.subjects[op_index(changes[i].op)].clone(),
                    source,
                };
                return Err(BatchError::new(i, error.into()));
            }
        }
        Ok(())
    }

    async fn publish_batch(&self, changes: &[Change]) -> Result<(), BatchError> {
        let mut pending: VecDeque<(usize, PublishAckFuture)> = VecDeque::new();
        // For each row (key image), the index of its latest change published so far.
        let mut latest: HashMap<String, usize> = HashMap::new();
        for (i, change) in changes.iter().enumerate() {
            let rows = row_images(change);
            // An earlier change of the same row must be stored first.
            if let Some(j) = rows.iter().filter_map(|r| latest.get(r)).max().copied() {
                self.settle(changes, &mut pending, Some(j)).await?;
            }
            if pending.len() >= self.config.max_in_flight {
                let front = pending.front().map(|(i, _)| *i);
                self.settle(changes, &mut pending, front).await?;
            }
            match self.publish(change).await {
                Ok(ack) => pending.push_back((i, ack)),
                Err(e) => {
                    // The changes before this one must be confirmed before the host may
                    // count them as done.
                    self.settle(changes, &mut pending, None).await?;
                    return Err(BatchError::new(i, e.into()));
                }
            }
            for r in rows {
                latest.insert(r, i);
            }
        }
        self.settle(changes, &mut pending, None).await
    }
}

/// The rows a change touches, as text: its key, and its old key when an UPDATE moved it.
fn row_images(change: &Change) -> Vec<String> {
    let mut rows = vec![format!("{}\u{0}{:?}", change.table, change.key)];
    if let Some(old) = &change.old_key {
        rows.push(format!("{}\u{0}{:?}", change.table, old));
    }
    rows
}

/// Whether the subject `subject` is captured by the stream subject `pattern` (with NATS
/// wildcards: `*` one token, `>` the rest).
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

impl Handler for NatsHandler {
    const NAME: &'static str = "nats";

    fn new(config: &HandlerConfig, ctx: &Context) -> Result<Self, HandlerError> {
        let config = NatsConfig::from_handler_config(config, ctx.daemon(), ctx.handler())?;
        let name = format!("epidemic {}/{}", ctx.daemon(), ctx.handler());
        let handler = NatsHandler::connect(config, &name)?;
        ctx.logger().info(&format!(
            "nats {} publishes {} changes to stream {} as {}",
            ctx.handler(),
            handler.config.table,
            handler.config.stream,
            handler.config.stream_subjects().join(", ")
        ));
        Ok(handler)
    }

    fn subscriptions(&self) -> Vec<Subscription> {
        vec![Subscription::new(&self.config.table, &self.config.columns).ops(&self.config.ops)]
    }

    fn handle_batch(&mut self, changes: &[Change]) -> Result<(), BatchError> {
        let this = &*self;
        this.runtime.block_on(this.publish_batch(changes))
    }

    fn handle(&mut self, change: &Change) -> Result<(), HandlerError> {
        self.handle_batch(std::slice::from_ref(change))
            .map_err(|e| e.error)
    }
}

impl Drop for NatsHandler {
    fn drop(&mut self) {
        // Let the client send what it holds (there is nothing unacknowledged: every batch
        // waited for its acknowledgements), within the timeout.
        let client = self.js.client();
        let _ = self
            .runtime
            .block_on(async { tokio::time::timeout(self.config.timeout, client.flush()).await });
    }
}

epidemic_plugin_sdk::export_handler!(NatsHandler);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_subject_patterns_match_as_nats_does() {
        assert!(subject_matches("epidemic.>", "epidemic.users.insert"));
        assert!(subject_matches(
            "epidemic.*.insert",
            "epidemic.users.insert"
        ));
        assert!(!subject_matches("epidemic.*", "epidemic.users.insert"));
        assert!(subject_matches("a.b", "a.b"));
        assert!(!subject_matches("a.b.c", "a.b"));
    }
}
