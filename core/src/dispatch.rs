//! The dispatcher: one consumer's loop of fetch, route, hand over, retry or dead-letter,
//! acknowledge. `epidemic run` starts one per handler on its own thread and connection;
//! `epidemic bench` runs the same loop with a built-in handler.
//!
//! A fetched batch is routed with the SDK's [`Router`] (the code the plugin authors' test
//! harness uses), and the changes the handler wants go to it in one
//! [`HostHandler::handle_batch`] call. When the handler reports that change `i` failed,
//! the changes before it count as handled, change `i` is retried on its own with backoff
//! (and given up on into the dead letters, or retried until it succeeds with `on_failure =
//! "block"`), and the rest of the batch follows in one call again. A panic inside a batch
//! names no change, so that batch goes on one change at a time.
//!
//! The cursor moves once per batch, past every change that was handled, dead-lettered or
//! not wanted, and stops before the first change that was not: a shutdown while retrying,
//! or a dead letter the database would not take. So a crash redelivers at most the batch
//! in flight, and nothing is ever skipped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use epidemic_plugin_host::{HostBackend, HostHandler};
use epidemic_plugin_sdk::backend::{
    BackendError, BackfillRequest, BackfillState, ChunkRequest, ColumnIn, Consumer, Registered,
    StartFrom,
};
use epidemic_plugin_sdk::ops::{DeadLetter, DeadLetterQuery, DeadLetterUpdate};
use epidemic_plugin_sdk::routing::{Routed, RowFilter};
use epidemic_plugin_sdk::{Change, HandlerError, Router, SnapshotEvent, Subscription};
use tracing::{debug, error, info, warn};

use crate::backfill::{Backfill, PendingChunk};
use crate::backoff::{backoff_delay, now_us, sleep_unless, RECONNECT_INITIAL, RECONNECT_MAX};
use crate::config::{HandlerConfig, OnFailure};
use crate::metrics::{HandlerMetrics, Metrics};

/// Longest single block in the backend's `wait`, so a shutdown request is seen quickly.
const WAIT_SLICE: Duration = Duration::from_millis(200);
/// How often a consumer looks for dead letters that `epidemic dead-letters retry` marked.
const RETRY_CHECK: Duration = Duration::from_secs(1);

/// How a handler's failures are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per change before giving up on it (1 = no retry).
    pub max_attempts: u32,
    pub retry_initial_ms: u64,
    pub retry_max_ms: u64,
    pub on_failure: OnFailure,
}

impl From<&HandlerConfig> for RetryPolicy {
    fn from(h: &HandlerConfig) -> Self {
        RetryPolicy {
            max_attempts: h.max_attempts,
            retry_initial_ms: h.retry_initial_ms,
            retry_max_ms: h.retry_max_ms,
            on_failure: h.on_failure,
        }
    }
}

/// What a dispatcher needs besides its connection and its handler.
#[derive(Clone)]
pub struct DispatchSettings {
    pub consumer: Consumer,
    pub subscriptions: Vec<Subscription>,
    pub retry: RetryPolicy,
    /// Changes fetched per batch.
    pub batch_size: u32,
    /// Most changes handed to the handler in one call (0: all it wants of a fetched batch).
    pub handler_batch: u32,
    /// Rows read per chunk of a backfill.
    pub backfill_chunk: u32,
    /// Ask for a backfill when the consumer comes back evicted (`on_evicted = "resync"`).
    pub resync_on_evicted: bool,
    /// The handler's row filter (`[[handler]] filter`), if any.
    pub filter: Option<Arc<dyn RowFilter>>,
    /// Per table: the part of the filter a backfill's SELECT may apply (the chunk
    /// requests' `only`; see `filter.rs`). The filter still judges every row read.
    pub snapshot_only: HashMap<String, Vec<ColumnIn>>,
    /// Longest wait for a wake-up before reading the log anyway.
    pub idle_check: Duration,
}

impl DispatchSettings {
    /// The tables the subscriptions read, sorted, each once.
    pub fn tables(&self) -> Vec<String> {
        let mut t: Vec<String> = self.subscriptions.iter().map(|s| s.table.clone()).collect();
        t.sort();
        t.dedup();
        t
    }
}

/// How one change fared with the handler after retries.
enum Outcome {
    Handled,
    GaveUp { error: HandlerError, attempts: u32 },
    Abandoned,
}

pub struct Dispatcher {
    pub consumer: Consumer,
    backend: HostBackend,
    handler: HostHandler,
    router: Router,
    tables: Vec<String>,
    retry: RetryPolicy,
    batch_size: u32,
    /// Most changes per handler call.
    handler_batch: usize,
    idle_check: Duration,
    metrics: Arc<HandlerMetrics>,
    all_metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
    /// Set by the heartbeat when touching this consumer updated no cursor.
    lost_cursor: Arc<AtomicBool>,
    /// The backfill in hand, if any.
    backfill: Option<Backfill>,
    backfill_chunk: u32,
    resync_on_evicted: bool,
    /// The backend keeps backfills (an older one may not).
    backfills_supported: bool,
    /// What each table's chunk requests ask the backend to keep (`only`).
    snapshot_only: HashMap<String, Vec<ColumnIn>>,
}

impl Dispatcher {
    pub fn new(
        settings: DispatchSettings,
        backend: HostBackend,
        handler: HostHandler,
        metrics: Arc<Metrics>,
        stop: Arc<AtomicBool>,
    ) -> Self {
        Dispatcher {
            tables: settings.tables(),
            metrics: metrics.handler(&settings.consumer.handler),
            all_metrics: metrics,
            consumer: settings.consumer,
            backend,
            handler,
            router: match settings.filter {
                Some(f) => Router::new(settings.subscriptions).with_filter(f),
                None => Router::new(settings.subscriptions),
            },
            retry: settings.retry,
            batch_size: settings.batch_size.max(1),
            handler_batch: match settings.handler_batch {
                0 => usize::MAX,
                n => n as usize,
            },
            idle_check: settings.idle_check.max(Duration::from_millis(1)),
            stop,
            lost_cursor: Arc::new(AtomicBool::new(false)),
            backfill: None,
            backfill_chunk: settings.backfill_chunk.max(1),
            resync_on_evicted: settings.resync_on_evicted,
            backfills_supported: true,
            snapshot_only: settings.snapshot_only,
        }
    }

    /// The flag the heartbeat sets when touching this consumer updated no cursor.
    pub fn with_lost_cursor_flag(mut self, flag: Arc<AtomicBool>) -> Self {
        self.lost_cursor = flag;
        self
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Deliver until the stop flag is set: reconnect after outages, register again after
    /// an eviction, and hand marked dead letters over again.
    pub fn run(mut self) {
        let mut outage: Option<Instant> = None;
        let mut backoff = RECONNECT_INITIAL;
        let mut next_retry_check = Instant::now();
        while !self.stopping() {
            let mut result = if self.lost_cursor.swap(false, Ordering::Relaxed) {
                Err(BackendError::Evicted(format!(
                    "consumer {}: the heartbeat found no live cursor",
                    self.consumer
                )))
            } else {
                self.step()
            };
            if result.is_ok() {
                if let Some(since) = outage.take() {
                    info!(consumer = %self.consumer, after = ?since.elapsed(), "database reachable again; catching up");
                }
                backoff = RECONNECT_INITIAL;
            }
            if result.is_ok() && Instant::now() >= next_retry_check {
                next_retry_check = Instant::now() + RETRY_CHECK;
                result = self
                    .redeliver_requested()
                    .and_then(|()| self.check_backfills());
            }
            if let Err(e) = result {
                self.recover(&e, &mut outage);
                sleep_unless(&self.stop, backoff);
                backoff = (backoff * 2).min(RECONNECT_MAX);
                // A chunk read before the error is read again.
                if let Some(b) = self.backfill.as_mut() {
                    b.drop_chunk();
                }
                if e.is_connection() {
                    self.all_metrics.reconnect();
                    if let Err(e) = self.backend.reconnect() {
                        debug!(consumer = %self.consumer, error = %e, "reconnect failed");
                    }
                } else if e.is_evicted() {
                    self.register_again();
                }
            }
        }
        debug!(consumer = %self.consumer, "handler thread stopped");
    }

    fn recover(&self, e: &BackendError, outage: &mut Option<Instant>) {
        if e.is_connection() {
            // Log an outage once, not once per attempt.
            if outage.is_none() {
                warn!(consumer = %self.consumer, error = %e, "database connection lost; reconnecting");
                *outage = Some(Instant::now());
            }
        } else {
            error!(consumer = %self.consumer, error = %e, "reading changes failed; retrying");
        }
    }

    /// The consumer was evicted while this daemon was cut off, or its cursor vanished:
    /// register again, which says loudly what was missed.
    fn register_again(&mut self) {
        // The cursor moves: a chunk waiting for its watermark would wait for ever.
        if let Some(b) = self.backfill.as_mut() {
            b.drop_chunk();
        }
        match self
            .backend
            .register(&self.consumer, &self.tables, StartFrom::Now)
        {
            Ok(Registered::Evicted) if self.resync_on_evicted => {
                warn!(
                    consumer = %self.consumer,
                    "this consumer had been evicted (unseen longer than consumer_ttl); changes it had not \
                     handled may have been pruned: resyncing (a backfill of its tables)"
                );
                let tables = self.tables.clone();
                if let Err(e) = crate::daemon::request_backfill(
                    &mut self.backend,
                    &self.consumer,
                    &tables,
                    "on_evicted = \"resync\"",
                ) {
                    error!(consumer = %self.consumer, error = %e, "could not request the resync");
                }
            }
            Ok(Registered::Evicted) => error!(
                consumer = %self.consumer,
                "this consumer had been evicted (unseen longer than consumer_ttl); changes it had not \
                 handled may have been pruned and are MISSED; continuing from now \
                 (on_evicted = \"resync\" would resync it)"
            ),
            Ok(Registered::New) => error!(
                consumer = %self.consumer,
                "this consumer's cursor had vanished (deleted by hand?); registered again from now: \
                 changes committed since it vanished may be MISSED"
            ),
            Ok(Registered::Existing) => {}
            Err(e) => debug!(consumer = %self.consumer, error = %e, "re-register failed"),
        }
    }

    /// Read one batch and deliver it; or wait for changes when there are none. With a
    /// backfill in hand, first read its next chunk when none waits for its watermark.
    pub fn step(&mut self) -> Result<(), BackendError> {
        self.backfill_prepare()?;
        let batch = self.backend.fetch(&self.consumer, self.batch_size)?;
        if batch.changes.is_empty() {
            if let Some(run) = self.backfill.as_mut().and_then(|b| b.current()) {
                if run.chunk.as_mut().is_some_and(PendingChunk::empty_fetch) {
                    warn!(consumer = %self.consumer, table = %run.progress.table, "a backfill chunk's watermark did not come; reading the chunk again");
                    run.chunk = None;
                }
                // Read the next chunk without waiting.
                if run.chunk.is_none() {
                    return Ok(());
                }
            }
            let deadline = Instant::now() + self.idle_check;
            while !self.stopping() {
                let now = Instant::now();
                if now >= deadline || self.backend.wait((deadline - now).min(WAIT_SLICE))? {
                    break;
                }
            }
            return Ok(());
        }
        let (done, emitted, result) = self.deliver(&batch.changes);
        if let Some((watermark_at, handed)) = emitted {
            if done > watermark_at {
                // The chunk's rows were handed over: save the progress before the ack, so
                // a crash in between repeats no chunk (the batch comes again; the
                // watermark, no longer awaited, is passed over).
                self.chunk_delivered(handed)?;
            } else if let Some(b) = self.backfill.as_mut() {
                b.drop_chunk();
            }
        }
        // Every change before `done` was handled, dead-lettered or not wanted.
        if done > 0 {
            self.backend
                .ack(&self.consumer, &batch.token, batch.changes[done - 1].id)?;
        }
        result
    }

    /// Hand a fetched batch to the handler, with a backfill chunk's rows right after its
    /// watermark when the batch holds it. Returns how many of `changes`, from the start,
    /// the cursor may move past; where the watermark was and how many chunk rows were
    /// handed with it; and the error that stopped delivery early, if any.
    #[allow(clippy::type_complexity)]
    fn deliver(
        &mut self,
        changes: &[Change],
    ) -> (usize, Option<(usize, u64)>, Result<(), BackendError>) {
        let mut positions = Vec::new();
        let mut wanted = Vec::new();
        // Changes the row filter could not judge: (position, change, why).
        let mut refused = Vec::new();
        for (i, routed) in self.router.route_batch(changes) {
            match routed {
                Routed::Deliver(c) => {
                    positions.push(i);
                    wanted.push(c);
                }
                Routed::Refused { change, error } => refused.push((i, change, error)),
                Routed::Skip => {}
            }
        }
        let mut emitted = None;
        // The handler receives change `i`: wanted, or refused (its dead letter stands for it).
        let mut handed = vec![false; changes.len()];
        for p in positions.iter().chain(refused.iter().map(|(p, ..)| p)) {
            handed[*p] = true;
        }
        if let Some((at, rows)) = self
            .backfill
            .as_mut()
            .and_then(|b| b.splice(changes, |i| handed[i]))
        {
            let mut handed = Vec::new();
            for row in &rows {
                match self.router.route_checked(row) {
                    Routed::Deliver(mut r) => {
                        r.attempt = 1;
                        handed.push(r);
                    }
                    Routed::Refused { change, error } => refused.push((at, change, error)),
                    Routed::Skip => {}
                }
            }
            // Right after the watermark; a row left unhandled keeps the cursor before it.
            let insert_at = positions
                .iter()
                .position(|p| *p > at)
                .unwrap_or(positions.len());
            emitted = Some((at, handed.len() as u64));
            positions.splice(insert_at..insert_at, std::iter::repeat_n(at, handed.len()));
            wanted.splice(insert_at..insert_at, handed);
        }
        // A change the filter refused is dead-lettered at once (a permanent failure: the
        // same row would be refused again). One the database would not take stops the
        // batch there, so the cursor never passes it.
        let mut total = changes.len();
        let mut stopped = Ok(());
        refused.sort_by_key(|(at, ..)| *at);
        for (at, change, error) in refused {
            let error = HandlerError::Permanent(format!("row filter: {error}"));
            if let Err(e) = self.dead_letter(&change, &error, 1) {
                total = at;
                stopped = Err(e);
                break;
            }
        }
        if total < changes.len() {
            let keep = positions
                .iter()
                .position(|p| *p >= total)
                .unwrap_or(positions.len());
            positions.truncate(keep);
            wanted.truncate(keep);
        }
        let (done, result) = self.hand_over(total, &positions, &mut wanted);
        (done, emitted, result.and(stopped))
    }

    /// Hand the wanted changes over in as few calls as the handler and the settings
    /// allow, retrying and dead-lettering as the policy says. `positions[i]` is where
    /// `wanted[i]` stands in the fetched batch of `total` changes.
    fn hand_over(
        &mut self,
        total: usize,
        positions: &[usize],
        wanted: &mut [Change],
    ) -> (usize, Result<(), BackendError>) {
        // `next`: the first wanted change not handled yet.
        let mut next = 0;
        let mut one_by_one = false;
        while next < wanted.len() {
            if self.stopping() {
                return (positions[next], Ok(()));
            }
            let end = if one_by_one {
                next + 1
            } else {
                wanted.len().min(next.saturating_add(self.handler_batch))
            };
            let started = Instant::now();
            let result = self.handler.handle_batch(&wanted[next..end]);
            self.metrics.observe(started.elapsed());
            let (index, error) = match result {
                Ok(()) => {
                    self.delivered(&wanted[next..end]);
                    next = end;
                    continue;
                }
                Err(e) => (e.index, e.error),
            };
            self.delivered(&wanted[next..next + index]);
            if matches!(error, HandlerError::Panic(_)) && end - next > 1 {
                // A panic names no change: go on one change at a time, counting no
                // attempt against any of them.
                warn!(consumer = %self.consumer, error = %error, "handler panicked in a batch; delivering the rest of it one change at a time");
                next += index;
                one_by_one = true;
                continue;
            }
            let failed = next + index;
            match self.retry(&mut wanted[failed], error) {
                Outcome::Handled => {}
                Outcome::Abandoned => return (positions[failed], Ok(())),
                Outcome::GaveUp { error, attempts } => {
                    if let Err(e) = self.dead_letter(&wanted[failed], &error, attempts) {
                        // Could not record it: do not move past this change.
                        return (positions[failed], Err(e));
                    }
                }
            }
            next = failed + 1;
        }
        (total, Ok(()))
    }

    fn delivered(&self, changes: &[Change]) {
        for c in changes {
            self.metrics.delivered();
            debug!(consumer = %self.consumer, table = %c.table, op = %c.op, id = c.id, "delivered");
        }
    }

    fn dead_letter(
        &mut self,
        change: &Change,
        error: &HandlerError,
        attempts: u32,
    ) -> Result<(), BackendError> {
        let letter = DeadLetter::new(
            &self.consumer,
            change,
            &error.to_string(),
            attempts,
            now_us(),
        );
        let id = self.backend.add_dead_letter(&letter)?;
        self.metrics.dead_lettered();
        error!(
            consumer = %self.consumer, table = %change.table, op = %change.op, id = change.id,
            attempts, error = %error, dead_letter = id,
            "handler failed; giving up on this change and moving it to the dead letters \
             (`epidemic dead-letters list`)"
        );
        Ok(())
    }

    /// The handler failed once on `change` with `error`: retry it on its own as the policy
    /// says, counting `change.attempt` up with every delivery.
    fn retry(&mut self, change: &mut Change, mut error: HandlerError) -> Outcome {
        // Failures in this round (a dead letter's redelivery starts a new round).
        let mut attempt = 1u32;
        loop {
            self.metrics.failed();
            let block = self.retry.on_failure == OnFailure::Block;
            let retryable = matches!(error, HandlerError::Retryable(_) | HandlerError::Panic(_));
            if !block && (!retryable || attempt >= self.retry.max_attempts) {
                return Outcome::GaveUp {
                    error,
                    attempts: attempt,
                };
            }
            let delay = backoff_delay(
                attempt,
                self.retry.retry_initial_ms,
                self.retry.retry_max_ms,
            );
            warn!(
                consumer = %self.consumer, table = %change.table, op = %change.op, id = change.id,
                attempt, error = %error, retry_in = ?delay,
                "handler failed; will retry"
            );
            sleep_unless(&self.stop, delay);
            if self.stopping() {
                return Outcome::Abandoned;
            }
            attempt += 1;
            change.attempt = change.attempt.saturating_add(1);
            let started = Instant::now();
            let result = self.handler.handle(change);
            self.metrics.observe(started.elapsed());
            match result {
                Ok(()) => {
                    self.delivered(std::slice::from_ref(change));
                    return Outcome::Handled;
                }
                Err(e) => error = e,
            }
        }
    }

    /// Start the consumer's pending backfills, if it has any and none is in hand.
    fn check_backfills(&mut self) -> Result<(), BackendError> {
        if self.backfill.is_some() || !self.backfills_supported {
            return Ok(());
        }
        let pending = match self.backend.backfills(&BackfillRequest::Pending {
            consumer: self.consumer.clone(),
        }) {
            Ok(reply) => reply.backfills,
            Err(BackendError::Unsupported(m)) => {
                debug!(consumer = %self.consumer, "{m}");
                self.backfills_supported = false;
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        if !pending.is_empty() {
            let tables: Vec<&str> = pending.iter().map(|p| p.table.as_str()).collect();
            info!(consumer = %self.consumer, tables = ?tables, chunk = self.backfill_chunk, "backfill starting: every row of these tables comes as a snapshot row, interleaved with live changes");
            self.backfill = Some(Backfill::new(pending, self.backfill_chunk));
        }
        Ok(())
    }

    /// Store a table's backfill progress; false when the backfill was cancelled.
    fn save_progress(
        &mut self,
        progress: &epidemic_plugin_sdk::backend::BackfillProgress,
    ) -> Result<bool, BackendError> {
        let reply = self
            .backend
            .backfills(&BackfillRequest::Save(progress.clone()))?;
        Ok(!reply.backfills.is_empty())
    }

    /// Before a fetch: with a backfill in hand and no chunk waiting for its watermark,
    /// tell the handler a table's snapshot begins (once) and read the next chunk.
    fn backfill_prepare(&mut self) -> Result<(), BackendError> {
        let Some(bf) = self.backfill.as_mut() else {
            return Ok(());
        };
        let chunk_size = bf.chunk_size;
        let Some(run) = bf.current() else {
            self.backfill = None;
            return Ok(());
        };
        if run.chunk.is_some() {
            return Ok(());
        }
        let table = run.progress.table.clone();
        if !run.began {
            let resumed = run.resumed;
            let event = SnapshotEvent::Began {
                table: table.clone(),
                resumed,
            };
            if let Err(e) = self.handler.snapshot(&event) {
                warn!(consumer = %self.consumer, table = %table, error = %e, "the handler failed at the start of a snapshot; going on");
            }
            let mut progress = {
                let run = self
                    .backfill
                    .as_mut()
                    .and_then(|b| b.current())
                    .expect("in hand");
                run.began = true;
                run.progress.clone()
            };
            if progress.state != BackfillState::Running {
                progress.state = BackfillState::Running;
                progress.started_at_us = now_us();
            }
            progress.updated_at_us = now_us();
            if !self.save_progress(&progress)? {
                return self.backfill_cancelled(&table);
            }
            info!(consumer = %self.consumer, table = %table, resumed, rows_done = progress.rows_done, "snapshot of a table begins");
            let run = self
                .backfill
                .as_mut()
                .and_then(|b| b.current())
                .expect("in hand");
            run.progress = progress;
        }
        let after = self
            .backfill
            .as_mut()
            .and_then(|b| b.current())
            .and_then(|r| r.progress.last_key.clone());
        let chunk = self.backend.snapshot_chunk(&ChunkRequest {
            table: table.clone(),
            after,
            limit: chunk_size,
            only: self.snapshot_only.get(&table).cloned().unwrap_or_default(),
        })?;
        let run = self
            .backfill
            .as_mut()
            .and_then(|b| b.current())
            .expect("in hand");
        if chunk.rows_estimate.is_some() {
            run.progress.rows_estimate = chunk.rows_estimate;
        }
        // Even an empty last chunk waits for its watermark: the table's snapshot ends
        // only once every change committed before that read has been delivered, so a
        // handler that cleans up at the end (orphans) has seen every row by then.
        run.chunk = Some(PendingChunk::new(chunk));
        Ok(())
    }

    /// The chunk in flight was handed over (`handed` rows of it wanted): save progress,
    /// and finish the table after its last chunk.
    fn chunk_delivered(&mut self, handed: u64) -> Result<(), BackendError> {
        let Some(run) = self.backfill.as_mut().and_then(|b| b.current()) else {
            return Ok(());
        };
        let Some(chunk) = run.chunk.take() else {
            return Ok(());
        };
        run.delivered += handed;
        run.progress.rows_done += chunk.rows.len() as u64;
        if chunk.last_key.is_some() {
            run.progress.last_key = chunk.last_key.clone();
        }
        run.progress.updated_at_us = now_us();
        if chunk.last {
            return self.table_done();
        }
        let progress = run.progress.clone();
        if !self.save_progress(&progress)? {
            return self.backfill_cancelled(&progress.table);
        }
        Ok(())
    }

    /// The table in hand has no rows left: tell the handler, store it as done.
    fn table_done(&mut self) -> Result<(), BackendError> {
        let Some(bf) = self.backfill.as_mut() else {
            return Ok(());
        };
        let Some(mut run) = bf.finish_current() else {
            return Ok(());
        };
        if bf.is_empty() {
            self.backfill = None;
        }
        run.progress.state = BackfillState::Done;
        run.progress.updated_at_us = now_us();
        let event = SnapshotEvent::Ended {
            table: run.progress.table.clone(),
            rows: run.delivered,
            whole: !run.resumed,
        };
        if let Err(e) = self.handler.snapshot(&event) {
            warn!(consumer = %self.consumer, table = %run.progress.table, error = %e, "the handler failed at the end of a snapshot");
        }
        self.save_progress(&run.progress)?;
        info!(
            consumer = %self.consumer, table = %run.progress.table, rows = run.progress.rows_done,
            delivered = run.delivered, secs = run.started.elapsed().as_secs_f64(),
            "snapshot of a table done"
        );
        Ok(())
    }

    fn backfill_cancelled(&mut self, table: &str) -> Result<(), BackendError> {
        warn!(consumer = %self.consumer, table = %table, "the backfill was cancelled; stopping it");
        self.backfill = None;
        Ok(())
    }

    /// Deliver the dead letters `epidemic dead-letters retry` marked for this consumer.
    fn redeliver_requested(&mut self) -> Result<(), BackendError> {
        let letters = self
            .backend
            .dead_letters(&DeadLetterQuery::RetryRequested(self.consumer.clone()))?;
        for letter in letters {
            if self.stopping() {
                break;
            }
            let mut change = match letter.change() {
                Ok(c) => c,
                Err(e) => {
                    error!(consumer = %self.consumer, dead_letter = letter.id, error = %e, "cannot retry");
                    continue;
                }
            };
            // This delivery continues the count of the ones that failed before.
            change.attempt = letter.attempts.saturating_add(1);
            let first_attempt = change.attempt;
            let started = Instant::now();
            let first = self.handler.handle(&change);
            self.metrics.observe(started.elapsed());
            let outcome = match first {
                Ok(()) => {
                    self.delivered(std::slice::from_ref(&change));
                    Outcome::Handled
                }
                Err(e) => self.retry(&mut change, e),
            };
            match outcome {
                Outcome::Handled => {
                    self.backend
                        .update_dead_letters(&DeadLetterUpdate::Delete(vec![letter.id]))?;
                    info!(consumer = %self.consumer, dead_letter = letter.id, id = change.id, attempt = first_attempt, "dead letter redelivered");
                }
                Outcome::GaveUp { error, attempts } => {
                    self.backend
                        .update_dead_letters(&DeadLetterUpdate::Failed {
                            id: letter.id,
                            error: error.to_string(),
                            attempts: letter.attempts + attempts,
                            failed_at_us: now_us(),
                        })?;
                    warn!(consumer = %self.consumer, dead_letter = letter.id, error = %error, "dead letter failed again");
                }
                Outcome::Abandoned => break,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "dispatch_tests.rs"]
mod tests;
