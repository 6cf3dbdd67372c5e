//! Reading the log by transaction snapshots: [`PgReader`] fetches a consumer's batches and
//! acknowledges them. The fetch statement is built in [`statement`], its rows become
//! changes in [`decode`].
//!
//! # Why snapshots
//!
//! Sequence values are handed out at INSERT but become visible at COMMIT, so
//! transactions commit out of id order and a reader that keeps `id > last_seen` skips
//! rows. Instead every log row carries its writer's transaction id (`txid`), and a
//! consumer's cursor holds a snapshot (`prev_snapshot`, from `pg_current_snapshot()`)
//! of what it has fully handled. The next batch is taken against a new snapshot `cur`:
//! the rows whose transaction is visible in `cur` but was not in `prev`, i.e. exactly
//! the transactions that committed between the two (the technique of Skytools' PgQ).
//! Snapshots only grow, so batches partition the committed transactions: none twice,
//! none skipped, and a rolled-back transaction's rows are never visible at all.
//!
//! A transaction visible in `cur` and not in `prev` either started after `prev`
//! (`txid >= xmax(prev)`, and `< xmax(cur)`) or was running at `prev` (in
//! `xip(prev)`). The batch query scans exactly those two sets with the `txid` index,
//! so a long-running transaction (which keeps `xmin` low) does not make batches scan
//! everything committed since it started, and does not hold back anybody else's
//! commits either: it is simply in `xip` until it ends.
//!
//! # A batch's life
//!
//! One statement per fetch does steps 1 and 2, so a change costs one round trip to read
//! and one to acknowledge (round trips are most of the latency from a commit to the
//! handler). After a fetch that returned a full piece of a batch, the next piece is read
//! by a read-only variant that only does step 2.
//!
//! 1. It reads the consumer's cursor. No batch in progress: it takes `cur` and the first
//!    and last change id of the batch (over all of the consumer's log tables). An empty
//!    batch just moves `prev` to `cur` (at most once a second, see [`ADVANCE_EVERY`]).
//!    Otherwise it stores `cur`, the last id and `done_upto = first id - 1`: the batch is
//!    started.
//! 2. It reads the rows of the batch in progress (or just started) by primary key:
//!    `id > done_upto AND id <= last_id`, filtered by the two snapshots, ordered by id, at
//!    most `max`. A large batch is read in pieces by later fetches with the same
//!    snapshots, each piece costing O(max), not O(batch).
//! 3. `ack(upto)` is one UPDATE: `done_upto = upto`, or, when `upto` reaches the last id,
//!    `prev = cur` and the batch is closed (and `prev_upto`, the bound prune walks up to,
//!    moves past the batch's last id: see [`crate::prune`]). A crash after a partial ack
//!    resumes the same batch after `upto`.
//!
//! # Commits that do not wait for their flush
//!
//! Every cursor write of this module (the fetch statement's batch start or advance, the
//! ack, the close of an exhausted batch) commits without waiting for its WAL to reach
//! disk (`synchronous_commit = off` for that transaction only), which takes a flush (a
//! disk round trip, ~1 ms) off every batch. What they write may be lost in a server
//! crash, and that is safe:
//!
//! - A lost batch start leaves the cursor at `prev`, and the next fetch starts a batch
//!   from `prev` again that holds everything the lost one held (delivered again: at
//!   least once). A lost advance of an empty batch leaves `prev` where it was, which
//!   spans no change of the consumer's.
//! - A lost ack leaves the cursor where an earlier write put it: the changes it covered
//!   come again (at least once). An ack never says more than the host handled, so even
//!   a lost one said only what was true.
//! - Nothing durable builds on a lost one. Recovery replays a prefix of the WAL, and a
//!   transaction that read a cursor write (it saw it committed) writes its own commit
//!   record after that write's, which was inserted before the write became visible:
//!   whatever survives a crash, every cursor write it read survived too. `prune`, which
//!   deletes by the cursors it reads, is such a transaction (and, with the server's
//!   default `synchronous_commit`, its commit waits for its flush, so the acks it pruned
//!   by are durable once it returns); so are a later
//!   ack and everything the host writes after a fetch (dead letters, backfill progress).
//!
//! A handler's effects outside the database (a mail folder created, a message
//! published) are the case "crash after the handler, before the ack" that at-least-once
//! delivery always had; the window is now the WAL writer's delay (at most three times
//! `wal_writer_delay`, 600 ms by default) after the ack rather than the ack's round trip.
//! A sink that deduplicates (NATS JetStream by `Nats-Msg-Id`, a webhook receiver by
//! `Idempotency-Key`) covers it with a window far longer than that.
//! `tests/tests/postgres_noloss.rs` crashes the server right after an ack.
//!
//! # A read left to the wake-ups
//!
//! The host's loop is fetch, handle, ack, fetch again, and wait when a fetch is empty.
//! When a fetch started a batch and returned all of it (fewer than `max` changes) and
//! the ack closes it, the next fetch could only find what committed after the batch's
//! snapshot; the backend skips it (returns no changes without a round trip) when the
//! wake-ups are sure to report such a commit: see `PgListener::may_skip_read` in
//! [`crate::wake`]. So a change costs one read and one ack, not two reads and an ack.
//! Skipping a read only moves it: the host waits, and the wait returns at once if a
//! notification came, at the latest `fallback_poll` after the last read.

//! When asked to (the connection is registered as waiting for a wake-up and busy, see
//! [`crate::wake`]), the fetch statement also clears the registration if it returns
//! changes.
//!
//! Within a batch, rows come in id order. Two changes to one row are in commit order:
//! the second writer waits for the first one's row lock, so it draws its id after the
//! first committed.
//!
//! # What a change carries
//!
//! Besides its values: `schema` (always, `public` included); the key (`key_columns`,
//! `key`, `old_key`: the registry's key columns among the captured ones); `stable_id`,
//! the log's identity and the id (see [`crate::registry`]); `txid`, the writing
//! transaction's `xid8` (changes of one transaction share it; rows of a dump restored
//! from another cluster all carry 1, see `registry::rebase_ddl`); and `commit_seq`, one
//! token per batch that grows from each of a consumer's batches to the next, since every
//! change of a batch committed before every change of the next (see
//! [`statement`]'s `COMMIT_SEQ_SQL`). Within a batch the commit order of different
//! transactions is not known, so they share the token; the token is comparable between
//! batches of one consumer only, and starts over lower after a restore into another
//! cluster.
//!
//! A backfill's watermark (op `W`, written by [`crate::snapshot`] after a chunk's read) is
//! a log row like any other for batches, acks and prune: it comes to every consumer of
//! the table in id order with the changes around it, as a change of origin `Watermark`
//! with no key and no values (see [`decode`]); the host consumes it.
//!
//! Not here: registering consumers and their liveness ([`crate::consumers`]), pruning
//! ([`crate::prune`]), deciding which changes a handler wants, retries, dead letters (the
//! host).

pub(crate) mod decode;
pub(crate) mod statement;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use epidemic_plugin_sdk::backend::{kit, Batch, Consumer};
use postgres::{Client, Statement};

use crate::error::{not_installed, PgError};
use crate::ident::Ident;
use crate::reader::statement::{col, FetchStatements};
use crate::registry::{check_cluster, has_column, ClusterCheck};

/// An empty batch moves the consumer's `prev_snapshot` forward (so pruning can proceed
/// and `last_seen` stays fresh), but at most this often: a consumer woken by changes to
/// tables it does not watch would otherwise write its cursor once per foreign commit.
/// Not advancing is always safe: the next batch simply starts from the older snapshot.
const ADVANCE_EVERY: Duration = Duration::from_secs(1);

/// Appended to the WHERE clause of the cursor writes that need not wait for their WAL
/// flush: it turns off synchronous commit for the statement's transaction when it is
/// evaluated, which it is for every row the statement updates.
const ASYNC_COMMIT: &str =
    "AND pg_catalog.set_config('synchronous_commit', 'off', true) IS NOT NULL";

/// The prepared statements for one consumer on the current connection.
struct ConsumerPlan {
    /// The consumer's tables as stored with its cursor; the plan is rebuilt when they change.
    tables: Vec<String>,
    statements: FetchStatements,
    /// The last fetch returned a full piece of a batch: the batch likely has more.
    continuing: bool,
    last_advance: Option<Instant>,
    /// The last fetch started a batch and returned all of it: its id and last change id.
    whole: Option<(i64, i64)>,
}

/// The consumer's cursor row, as far as this module needs it outside the fetch statement.
struct Cursor {
    tables: Vec<String>,
    batch_id: i64,
    in_progress: bool,
    evicted: bool,
}

/// Statements shared by every consumer, prepared once per connection.
struct Shared {
    load: Statement,
    finish: Statement,
    ack: Statement,
}

/// Reads batches and acknowledges them. Holds prepared statements: call
/// [`PgReader::reset`] whenever the connection is replaced or the installation changed,
/// and [`PgReader::forget`] when a consumer's cursor was changed by another module.
pub(crate) struct PgReader {
    schema: Ident,
    shared: Option<Shared>,
    plans: HashMap<(String, String), ConsumerPlan>,
    /// This connection found the cursors written by this cluster (see
    /// [`PgReader::same_cluster`]).
    cluster_checked: bool,
    /// The consumer whose last fetch, the last read on this connection, started a batch
    /// and returned all of it, and whose ack just closed that batch (see
    /// [`PgReader::take_whole_batch_closed`]).
    whole_batch_closed: Option<(String, String)>,
}

fn key(c: &Consumer) -> (String, String) {
    (c.daemon.clone(), c.handler.clone())
}

impl PgReader {
    pub fn new(schema: Ident) -> PgReader {
        PgReader {
            schema,
            shared: None,
            plans: HashMap::new(),
            cluster_checked: false,
            whole_batch_closed: None,
        }
    }

    /// Forget every prepared statement (they belong to the old connection).
    pub fn reset(&mut self) {
        self.shared = None;
        self.plans.clear();
        self.cluster_checked = false;
        self.whole_batch_closed = None;
    }

    /// Forget the consumer's plan: it is prepared again, for its cursor's tables, on the
    /// next fetch.
    pub fn forget(&mut self, consumer: &Consumer) {
        self.plans.remove(&key(consumer));
        self.whole_batch_closed = None;
    }

    /// Whether the last thing this reader did was to close, by `consumer`'s ack, a batch
    /// that the last fetch on this connection both started and returned whole; asking
    /// clears it. Then a fetch right away could only find what committed after that
    /// batch's snapshot, and the caller may leave that to the wake-ups (see
    /// `crate::wake`). Anything else written on this connection in between (a
    /// backfill's watermark) must call [`PgReader::clear_whole_batch_closed`].
    pub fn take_whole_batch_closed(&mut self, consumer: &Consumer) -> bool {
        self.whole_batch_closed
            .take()
            .is_some_and(|k| k.0 == consumer.daemon && k.1 == consumer.handler)
    }

    pub fn clear_whole_batch_closed(&mut self) {
        self.whole_batch_closed = None;
    }

    /// Refuse to read by cursors that another cluster wrote (a dump restored here: its
    /// snapshots are of the other cluster's transaction ids, see
    /// `registry::rebase_ddl`). Checked once per connection: a restore into another
    /// cluster comes with a new connection.
    fn same_cluster(&mut self, client: &mut Client) -> Result<(), PgError> {
        if self.cluster_checked {
            return Ok(());
        }
        match check_cluster(client, &self.schema)? {
            ClusterCheck::Foreign { recorded, current } => Err(PgError::ForeignCluster {
                schema: self.schema.to_string(),
                recorded,
                current,
            }),
            ClusterCheck::Same | ClusterCheck::Unrecorded => {
                self.cluster_checked = true;
                Ok(())
            }
        }
    }

    fn q(&self, name: &str) -> String {
        format!(
            "{}.{}",
            self.schema.quoted(),
            crate::ident::quote_ident(name)
        )
    }

    fn shared(&mut self, client: &mut Client) -> Result<&Shared, PgError> {
        if self.shared.is_none() {
            let consumer = self.q("consumer");
            let schema = self.schema.clone();
            // Closing a batch moves `prev_upto` (see `registry::bookkeeping_ddl`) past
            // the batch's rows: no row the new `prev` shows but the old did not has an id
            // above `batch_last_id`. When it was not known, the sequence's last value,
            // read after the batch's snapshot was taken, bounds every row it shows.
            let (close_upto, ack_upto) = if has_column(client, &schema, "consumer", "prev_upto")? {
                let upto = format!(
                    "CASE WHEN prev_upto IS NULL THEN (SELECT last_value FROM {}) \
                              ELSE GREATEST(prev_upto, batch_last_id) END",
                    self.q("change_id")
                );
                (
                        format!("prev_upto = {upto}, "),
                        format!(
                            "prev_upto = CASE WHEN $4 >= batch_last_id THEN {upto} ELSE prev_upto END, "
                        ),
                    )
            } else {
                Default::default()
            };
            let mut prepare = |sql: String| {
                client
                    .prepare(&sql)
                    .map_err(not_installed(&schema, "prepare cursor statements"))
            };
            let shared = Shared {
                load: prepare(format!(
                    "SELECT tables, batch_id, batch_snapshot IS NOT NULL, evicted_at IS NOT NULL \
                     FROM {consumer} WHERE daemon = $1 AND handler = $2"
                ))?,
                // Every cursor write checks `evicted_at IS NULL`: an eviction between
                // reading the cursor and writing it must not be overwritten. Both commit
                // without waiting for their WAL flush (the `set_config` in the WHERE
                // clause runs for the row they update): see the module docs for why
                // that is safe.
                finish: prepare(format!(
                    "UPDATE {consumer} SET prev_snapshot = batch_snapshot, batch_snapshot = NULL, \
                         {close_upto}batch_done_upto = NULL, batch_last_id = NULL, last_seen = now() \
                     WHERE daemon = $1 AND handler = $2 AND batch_id = $3 AND batch_snapshot IS NOT NULL \
                       AND evicted_at IS NULL {ASYNC_COMMIT}"
                ))?,
                // Everything on the right-hand side sees the row as it was, so the batch
                // closes (prev := cur) exactly when upto reaches its last id.
                ack: prepare(format!(
                    "UPDATE {consumer} SET \
                         {ack_upto}prev_snapshot = CASE WHEN $4 >= batch_last_id THEN batch_snapshot ELSE prev_snapshot END, \
                         batch_snapshot = CASE WHEN $4 >= batch_last_id THEN NULL ELSE batch_snapshot END, \
                         batch_done_upto = CASE WHEN $4 >= batch_last_id THEN NULL \
                                                ELSE GREATEST(batch_done_upto, $4) END, \
                         batch_last_id = CASE WHEN $4 >= batch_last_id THEN NULL ELSE batch_last_id END, \
                         last_seen = now() \
                     WHERE daemon = $1 AND handler = $2 AND batch_id = $3 AND batch_snapshot IS NOT NULL \
                       AND evicted_at IS NULL {ASYNC_COMMIT}"
                ))?,
            };
            self.shared = Some(shared);
        }
        // Just filled in above when it was missing.
        self.shared
            .as_ref()
            .ok_or_else(|| PgError::NothingInstalled(self.schema.to_string()))
    }

    fn load(&mut self, client: &mut Client, consumer: &Consumer) -> Result<Cursor, PgError> {
        let load = self.shared(client)?.load.clone();
        let row = client
            .query_opt(&load, &[&consumer.daemon, &consumer.handler])
            .map_err(PgError::sql(format!("read the cursor of {consumer}")))?
            .ok_or_else(|| PgError::from(kit::not_registered(consumer)))?;
        Ok(Cursor {
            tables: row.get(0),
            batch_id: row.get(1),
            in_progress: row.get(2),
            evicted: row.get(3),
        })
    }

    /// The next changes for the consumer, at most `max`. `clear_waiting`: if it returns
    /// changes, clear this connection's registration as waiting for a wake-up.
    pub fn fetch(
        &mut self,
        client: &mut Client,
        consumer: &Consumer,
        max: u32,
        clear_waiting: bool,
    ) -> Result<Batch, PgError> {
        let max = i64::from(max.max(1));
        let k = key(consumer);
        let consumer_table = self.q("consumer");
        let (d, h) = (&consumer.daemon, &consumer.handler);
        let race = |client: &mut Client| lost_race(client, &consumer_table, consumer);
        self.same_cluster(client)?;
        self.whole_batch_closed = None;
        if let Some(plan) = self.plans.get_mut(&k) {
            plan.whole = None;
        }

        // At most: find the plan stale and rebuild it, find a batch that was expected to
        // go on finished, find the batch in progress exhausted and close it, start a new
        // one and read it.
        for _ in 0..4 {
            if !self.plans.contains_key(&k) {
                let cursor = self.load(client, consumer)?;
                if cursor.evicted {
                    return Err(kit::evicted(consumer).into());
                }
                let statements =
                    statement::prepare(client, &self.schema, consumer, &cursor.tables)?;
                self.plans.insert(
                    k.clone(),
                    ConsumerPlan {
                        tables: cursor.tables,
                        statements,
                        continuing: false,
                        last_advance: None,
                        whole: None,
                    },
                );
            }
            let finish = self.shared(client)?.finish.clone();
            let Some(plan) = self.plans.get_mut(&k) else {
                return Err(kit::not_registered(consumer).into());
            };
            let may_advance = plan
                .last_advance
                .is_none_or(|t| t.elapsed() >= ADVANCE_EVERY);
            // The statement that clears the registration is `next`.
            let continuing = std::mem::take(&mut plan.continuing) && !clear_waiting;
            let rows = if continuing {
                client.query(&plan.statements.more, &[d, h, &plan.tables, &max])
            } else {
                client.query(
                    &plan.statements.next,
                    &[d, h, &plan.tables, &max, &may_advance, &clear_waiting],
                )
            }
            .map_err(PgError::sql(format!("read the log for {consumer}")))?;
            // The statement returns exactly one header row: the one without a change.
            let Some(head) = rows
                .iter()
                .find(|r| r.get::<_, Option<i64>>(col::ID).is_none())
            else {
                return Err(kit::not_registered(consumer).into());
            };
            let get_flag = |i: usize| head.get::<_, Option<bool>>(i).unwrap_or(false);
            if !get_flag(col::REGISTERED) {
                self.plans.remove(&k);
                return Err(kit::not_registered(consumer).into());
            }
            if get_flag(col::EVICTED) {
                self.plans.remove(&k);
                return Err(kit::evicted(consumer).into());
            }
            if !get_flag(col::SAME_TABLES) {
                // Registered again with other tables: prepare for those.
                self.plans.remove(&k);
                continue;
            }
            let in_progress = get_flag(col::IN_PROGRESS);
            let found_new = get_flag(col::FOUND_NEW);
            let batch_id: Option<i64> = head.get(col::BATCH_ID);
            // Present whenever a batch is read from.
            let commit_seq: i64 = head.get::<_, Option<i64>>(col::COMMIT_SEQ).unwrap_or(0);
            let started: i64 = head.get(col::STARTED);
            let advanced: i64 = head.get(col::ADVANCED);
            if continuing && rows.len() < 2 {
                // The batch had nothing more, or is no longer in progress: `next` sorts
                // that out.
                continue;
            }
            if found_new && started != 1 {
                return Err(race(client));
            }
            if !continuing && !in_progress && !found_new && may_advance {
                if advanced != 1 {
                    return Err(race(client));
                }
                plan.last_advance = Some(Instant::now());
            }
            let mut changes = Vec::with_capacity(rows.len());
            for row in &rows {
                let Some(id) = row.get::<_, Option<i64>>(col::ID) else {
                    continue;
                };
                let log: i32 = row.get(col::LOG);
                let Some(log) = usize::try_from(log)
                    .ok()
                    .and_then(|i| plan.statements.logs.get(i))
                else {
                    self.plans.remove(&k);
                    return Err(PgError::UnknownLog(consumer.to_string()));
                };
                changes.push(
                    log.change(row, id, commit_seq)
                        .map_err(PgError::sql(format!("decode the log of {}", log.table)))?,
                );
            }
            if let (false, Some(batch_id)) = (changes.is_empty(), batch_id) {
                changes.sort_unstable_by_key(|c| c.id);
                plan.continuing = changes.len() as i64 == max;
                // Fewer than `max` from the statement that started the batch: the whole
                // batch, whose last id is the last change's.
                if found_new && !plan.continuing {
                    plan.whole = changes.last().map(|c| (batch_id, c.id));
                }
                return Ok(Batch {
                    changes,
                    token: batch_id.to_string(),
                });
            }
            match (in_progress, batch_id) {
                (true, Some(batch_id)) => {
                    // Nothing left after done_upto although the batch was not acked to
                    // its end (its last rows were deleted by hand): close it.
                    let n = client
                        .execute(&finish, &[d, h, &batch_id])
                        .map_err(PgError::sql(format!("close the batch of {consumer}")))?;
                    if n != 1 {
                        return Err(race(client));
                    }
                }
                _ => return Ok(Batch::default()),
            }
        }
        Ok(Batch::default())
    }

    pub fn ack(
        &mut self,
        client: &mut Client,
        consumer: &Consumer,
        token: &str,
        upto_id: i64,
    ) -> Result<(), PgError> {
        let batch_id: i64 = token.parse().map_err(|_| PgError::BadToken {
            consumer: consumer.to_string(),
            token: token.to_owned(),
        })?;
        let ack = self.shared(client)?.ack.clone();
        let n = client
            .execute(
                &ack,
                &[&consumer.daemon, &consumer.handler, &batch_id, &upto_id],
            )
            .map_err(PgError::sql(format!("acknowledge for {consumer}")))?;
        if n == 1 {
            let k = key(consumer);
            if let Some(plan) = self.plans.get_mut(&k) {
                if plan
                    .whole
                    .is_some_and(|(b, last)| b == batch_id && upto_id >= last)
                {
                    plan.whole = None;
                    self.whole_batch_closed = Some(k);
                }
            }
            return Ok(());
        }
        // Acking a batch that is already closed is fine: the host may repeat an ack whose
        // reply was lost with the connection.
        let cursor = self.load(client, consumer)?;
        if cursor.evicted {
            self.plans.remove(&key(consumer));
            return Err(kit::evicted(consumer).into());
        }
        if cursor.batch_id == batch_id && !cursor.in_progress {
            return Ok(());
        }
        Err(PgError::StaleToken {
            consumer: consumer.to_string(),
            token: token.to_owned(),
        })
    }
}

/// A cursor write found the row changed since it was read: the consumer was evicted
/// meanwhile, or another daemon with the same name moved it.
fn lost_race(client: &mut Client, consumer_table: &str, consumer: &Consumer) -> PgError {
    let evicted = client
        .query_opt(
            &format!(
                "SELECT evicted_at IS NOT NULL FROM {consumer_table} WHERE daemon = $1 AND handler = $2"
            ),
            &[&consumer.daemon, &consumer.handler],
        )
        .ok()
        .flatten()
        .is_some_and(|r| r.get::<_, bool>(0));
    if evicted {
        kit::evicted(consumer).into()
    } else {
        PgError::CursorRace(consumer.to_string())
    }
}
