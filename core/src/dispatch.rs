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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use epidemic_plugin_host::{HostBackend, HostHandler};
use epidemic_plugin_sdk::backend::{BackendError, Consumer, Registered, StartFrom};
use epidemic_plugin_sdk::ops::{DeadLetter, DeadLetterQuery, DeadLetterUpdate};
use epidemic_plugin_sdk::{Change, HandlerError, Router, Subscription};
use tracing::{debug, error, info, warn};

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
#[derive(Debug, Clone)]
pub struct DispatchSettings {
    pub consumer: Consumer,
    pub subscriptions: Vec<Subscription>,
    pub retry: RetryPolicy,
    /// Changes fetched per batch.
    pub batch_size: u32,
    /// Most changes handed to the handler in one call (0: all it wants of a fetched batch).
    pub handler_batch: u32,
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
            router: Router::new(settings.subscriptions),
            retry: settings.retry,
            batch_size: settings.batch_size.max(1),
            handler_batch: match settings.handler_batch {
                0 => usize::MAX,
                n => n as usize,
            },
            idle_check: settings.idle_check.max(Duration::from_millis(1)),
            stop,
            lost_cursor: Arc::new(AtomicBool::new(false)),
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
                result = self.redeliver_requested();
            }
            if let Err(e) = result {
                self.recover(&e, &mut outage);
                sleep_unless(&self.stop, backoff);
                backoff = (backoff * 2).min(RECONNECT_MAX);
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
        match self
            .backend
            .register(&self.consumer, &self.tables, StartFrom::Now)
        {
            Ok(Registered::Evicted) => error!(
                consumer = %self.consumer,
                "this consumer had been evicted (unseen longer than consumer_ttl); changes it had not \
                 handled may have been pruned and are MISSED; continuing from now"
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

    /// Read one batch and deliver it; or wait for changes when there are none.
    pub fn step(&mut self) -> Result<(), BackendError> {
        let batch = self.backend.fetch(&self.consumer, self.batch_size)?;
        if batch.changes.is_empty() {
            let deadline = Instant::now() + self.idle_check;
            while !self.stopping() {
                let now = Instant::now();
                if now >= deadline || self.backend.wait((deadline - now).min(WAIT_SLICE))? {
                    break;
                }
            }
            return Ok(());
        }
        let (done, result) = self.deliver(&batch.changes);
        // Every change before `done` was handled, dead-lettered or not wanted.
        if done > 0 {
            self.backend
                .ack(&self.consumer, &batch.token, batch.changes[done - 1].id)?;
        }
        result
    }

    /// Hand a fetched batch to the handler. Returns how many of `changes`, from the
    /// start, the cursor may move past, and the error that stopped it early, if any.
    fn deliver(&mut self, changes: &[Change]) -> (usize, Result<(), BackendError>) {
        let routed = self.router.route_batch(changes);
        let (positions, mut wanted): (Vec<usize>, Vec<Change>) = routed.into_iter().unzip();
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
        (changes.len(), Ok(()))
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
