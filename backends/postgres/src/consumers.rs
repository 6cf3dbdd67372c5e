//! Consumers and their cursors' lifecycle: [`PgConsumers`] registers a consumer (creating
//! or bringing up to date its row in `consumer`), forgets one, records that one is alive,
//! and evicts those unseen for too long. Reading and acknowledging by the cursor is
//! [`crate::reader`]'s.
//!
//! # Liveness
//!
//! Every cursor write, and [`PgConsumers::touch`], sets the consumer's `last_seen`, by the
//! database's clock. [`PgConsumers::evict_stale`] marks consumers unseen for longer than a
//! TTL as evicted: they no longer hold back pruning, and since changes they had not
//! handled may be gone, fetching or acknowledging for them is refused until they register
//! again, which restarts them like a new consumer and says so ([`Registered::Evicted`]).
//! A heartbeat that updates no cursor is an error ([`kit::evicted`] or
//! [`kit::not_registered`]), never a success.

use std::time::Duration;

use epidemic_plugin_sdk::backend::{kit, Consumer, Registered, StartFrom};
use postgres::Client;

use crate::error::{not_installed, PgError};
use crate::ident::{quote_ident, Ident};
use crate::registry::{
    check_cluster, cursor_lock_key, has_column, load_registry, logs_of, schema_state, ClusterCheck,
    SchemaState,
};

/// The consumers of one Epidemic schema.
pub(crate) struct PgConsumers<'a> {
    pub schema: &'a Ident,
}

impl PgConsumers<'_> {
    fn q(&self, name: &str) -> String {
        format!("{}.{}", self.schema.quoted(), quote_ident(name))
    }

    /// Create the consumer's cursor, or bring an existing one up to date: its table list
    /// becomes exactly `tables` (a table it no longer reads stops holding back pruning),
    /// and an evicted consumer starts over as a new one would, at `start`.
    ///
    /// A batch in progress is kept when tables are only removed (their remaining rows in
    /// it are simply not read). When a table is added the batch is dropped and the next
    /// one starts from the last fully handled snapshot: the batch's bounds were taken over
    /// the old tables and would skip the new table's rows, so the part of it already
    /// handled is delivered again instead (at least once, never lost).
    pub fn register(
        &self,
        client: &mut Client,
        consumer: &Consumer,
        tables: &[String],
        start: StartFrom,
    ) -> Result<Registered, PgError> {
        if schema_state(client, self.schema)? != SchemaState::Ours {
            return Err(PgError::NothingInstalled(self.schema.to_string()));
        }
        if let ClusterCheck::Foreign { recorded, current } = check_cluster(client, self.schema)? {
            return Err(PgError::ForeignCluster {
                schema: self.schema.to_string(),
                recorded,
                current,
            });
        }
        let registry = load_registry(client, self.schema)?;
        logs_of(&registry, tables)?;
        let has_prev_upto = has_column(client, self.schema, "consumer", "prev_upto")?;
        let consumer_table = self.q("consumer");
        let context = || format!("register consumer {consumer}");
        let from_now = start == StartFrom::Now;
        let (d, h) = (&consumer.daemon, &consumer.handler);
        let mut tx = client.transaction().map_err(PgError::sql(context()))?;
        // Before the snapshot below is taken, until commit: a prune meanwhile would not
        // see this consumer, and could delete rows committed after its snapshot that
        // the other consumers have passed.
        tx.execute(
            &format!(
                "SELECT pg_catalog.pg_advisory_xact_lock_shared({})",
                cursor_lock_key(self.schema)
            ),
            &[],
        )
        .map_err(PgError::sql(context()))?;
        // 1:1: sees no transaction at all, so the first batch is the whole log.
        let start_snapshot = "CASE WHEN $3 THEN pg_current_snapshot() ELSE '1:1:'::pg_snapshot END";
        // `prev_upto` (see `registry::bookkeeping_ddl`): the sequence's last value, read
        // after the statement's snapshot was taken, is past every id that snapshot (or
        // an older one) shows, in every log; the snapshot that sees nothing shows none.
        let id_bound = format!(
            "(SELECT last_value FROM {}.{})",
            self.schema.quoted(),
            quote_ident("change_id")
        );
        let (upto_column, upto_value, upto_start, upto_grown) = if has_prev_upto {
            (
                ", prev_upto",
                format!(", CASE WHEN $3 THEN {id_bound} ELSE 0 END"),
                format!(", prev_upto = CASE WHEN $3 THEN {id_bound} ELSE 0 END"),
                format!(", prev_upto = {id_bound}"),
            )
        } else {
            Default::default()
        };
        let inserted = tx
            .query_opt(
                &format!(
                    "INSERT INTO {consumer_table} (daemon, handler, tables, prev_snapshot{upto_column}) \
                     VALUES ($1, $2, $4, {start_snapshot}{upto_value}) \
                     ON CONFLICT (daemon, handler) DO NOTHING RETURNING batch_id"
                ),
                &[d, h, &from_now, &tables],
            )
            .map_err(PgError::sql(context()))?;
        let registered = if inserted.is_some() {
            Registered::New
        } else {
            let row = tx
                .query_one(
                    &format!(
                        "SELECT evicted_at IS NOT NULL, NOT tables @> $3, batch_snapshot IS NOT NULL \
                         FROM {consumer_table} WHERE daemon = $1 AND handler = $2 FOR UPDATE"
                    ),
                    &[d, h, &tables],
                )
                .map_err(PgError::sql(context()))?;
            let (evicted, grown, mid_batch): (bool, bool, bool) =
                (row.get(0), row.get(1), row.get(2));
            let restart_batch = "batch_id = batch_id + 1, batch_snapshot = NULL, \
                                 batch_done_upto = NULL, batch_last_id = NULL";
            if evicted {
                tx.execute(
                    &format!(
                        "UPDATE {consumer_table} SET tables = $4, prev_snapshot = {start_snapshot}, {restart_batch}, \
                             evicted_at = NULL, registered_at = now(), last_seen = now(){upto_start} \
                         WHERE daemon = $1 AND handler = $2"
                    ),
                    &[d, h, &from_now, &tables],
                )
            } else {
                let restart = if grown && mid_batch {
                    format!(", {restart_batch}")
                } else {
                    String::new()
                };
                // A new table's log rows that `prev` shows may have any id below the
                // sequence's, not only below the bound kept for the old tables' logs.
                let upto = if grown { upto_grown.as_str() } else { "" };
                tx.execute(
                    &format!(
                        "UPDATE {consumer_table} SET tables = $3{restart}{upto}, last_seen = now() \
                         WHERE daemon = $1 AND handler = $2"
                    ),
                    &[d, h, &tables],
                )
            }
            .map_err(PgError::sql(context()))?;
            if evicted {
                Registered::Evicted
            } else {
                Registered::Existing
            }
        };
        tx.commit().map_err(PgError::sql(context()))?;
        Ok(registered)
    }

    /// The consumer is alive: `last_seen` becomes now. An error for an evicted consumer
    /// (it must register again) or an unknown one: a heartbeat that updates no row is
    /// never a success.
    pub fn touch(&self, client: &mut Client, consumer: &Consumer) -> Result<(), PgError> {
        let n = client
            .execute(
                &format!(
                    "UPDATE {} SET last_seen = now() WHERE daemon = $1 AND handler = $2 AND evicted_at IS NULL",
                    self.q("consumer")
                ),
                &[&consumer.daemon, &consumer.handler],
            )
            .map_err(not_installed(
                self.schema,
                format!("record that {consumer} is alive"),
            ))?;
        if n == 0 {
            let evicted = client
                .query_opt(
                    &format!(
                        "SELECT evicted_at IS NOT NULL FROM {} WHERE daemon = $1 AND handler = $2",
                        self.q("consumer")
                    ),
                    &[&consumer.daemon, &consumer.handler],
                )
                .map_err(PgError::sql(format!("read the cursor of {consumer}")))?
                .is_some_and(|r| r.get::<_, bool>(0));
            return Err(if evicted {
                kit::evicted(consumer)
            } else {
                kit::not_registered(consumer)
            }
            .into());
        }
        Ok(())
    }

    /// Evict every live consumer unseen for longer than `ttl`; returns them.
    pub fn evict_stale(
        &self,
        client: &mut Client,
        ttl: Duration,
    ) -> Result<Vec<Consumer>, PgError> {
        if schema_state(client, self.schema)? != SchemaState::Ours {
            return Ok(Vec::new());
        }
        // Some 3000 years: a longer TTL would take `now() - ttl` out of the range of
        // timestamps, and can evict nobody anyway.
        let ttl_s = ttl.as_secs_f64().min(1e11);
        let rows = client
            .query(
                &format!(
                    "UPDATE {} SET evicted_at = now() \
                     WHERE evicted_at IS NULL AND last_seen < now() - make_interval(secs => $1) \
                     RETURNING daemon, handler",
                    self.q("consumer")
                ),
                &[&ttl_s],
            )
            .map_err(PgError::sql("evict stale consumers"))?;
        let mut evicted: Vec<Consumer> = rows
            .iter()
            .map(|r| Consumer {
                daemon: r.get(0),
                handler: r.get(1),
            })
            .collect();
        evicted.sort_by(|a, b| (&a.daemon, &a.handler).cmp(&(&b.daemon, &b.handler)));
        Ok(evicted)
    }

    /// Forget the consumer's cursor; returns whether there was one.
    pub fn unregister(&self, client: &mut Client, consumer: &Consumer) -> Result<bool, PgError> {
        if schema_state(client, self.schema)? != SchemaState::Ours {
            return Ok(false);
        }
        let n = client
            .execute(
                &format!(
                    "DELETE FROM {} WHERE daemon = $1 AND handler = $2",
                    self.q("consumer")
                ),
                &[&consumer.daemon, &consumer.handler],
            )
            .map_err(PgError::sql(format!("unregister consumer {consumer}")))?;
        Ok(n > 0)
    }
}
