//! Deleting log rows every live consumer has handled: [`PgPruner::prune`].
//!
//! # What goes
//!
//! A consumer has handled a log row when the row's transaction is visible in its `prev`
//! snapshot (every batch up to it is closed), or when it has a batch in progress whose
//! snapshot `cur` shows the transaction and the row's id is at most the batch's
//! `done_upto` (the batch is read in id order from `done_upto` on, and everything up to
//! it was acknowledged). A row every live consumer of its table has handled goes.
//! Visibility is checked per row, not by the snapshots' `xmin`, so a transaction left
//! open elsewhere (a long report, an idle session in a transaction) does not hold back
//! pruning of what committed around it; and the acknowledged part of a large batch goes
//! while the rest is being read, so a drained backlog does not wait for its last change
//! to be pruned. A consumer registered from the oldest change has a snapshot that sees
//! nothing, so it keeps the whole log; tables whose consumers are all evicted are emptied
//! of committed rows, since nobody live needs them; tables nobody reads are left alone,
//! so a consumer registered later can still start from the oldest. The cursors are read
//! under the cursor lock (see `registry::cursor_lock_key`), so that a consumer being
//! registered, whose snapshot may miss rows the others have passed, is never left out;
//! and only if this cluster wrote them (a dump restored from another cluster holds
//! snapshots of other transaction ids). Rows of transactions still running are
//! invisible to the statements below and stay.
//!
//! # How: up the primary key, once per prune
//!
//! Each log is walked in id order, in chunks of [`PRUNE_CHUNK`] rows read by primary key
//! after the last id of the previous chunk (`id > $after ORDER BY id LIMIT n`, an index
//! range scan that starts where the last one ended), and the chunk's handled rows are
//! deleted by id. So a prune reads each row below its upper bound once: no statement
//! walks again over what an earlier one deleted (a `DELETE … WHERE id IN (SELECT …
//! LIMIT n)` on the other conditions may, and then it is quadratic), and the plan cannot
//! turn into a sequential scan per chunk.
//!
//! The walk stops at an upper bound: no row above it is handled by every consumer. For
//! one consumer it is the larger of its batch's `done_upto` and `prev_upto`, which the
//! cursor keeps (see `registry::bookkeeping_ddl`): no row of its logs that `prev` shows
//! has a greater id. For all of a table's consumers it is the smallest of theirs; with a
//! consumer whose `prev_upto` is not known (a cursor from before it was kept, until its
//! next batch closes), the end of the log. A consumer keeping up has handled nearly
//! everything below the bound, and a consumer reading a large backlog has a bound near
//! what it acknowledged: what a prune reads is what it deletes, plus the rows of
//! transactions that commit out of id order around the bound, not the unread backlog.
//! An underestimated `prev_upto` would only keep rows longer (the bound decides where to
//! look, the visibility test what to delete), never delete one that is needed.

use std::collections::HashMap;

use postgres::Client;

use crate::error::PgError;
use crate::ident::{quote_ident, quote_literal, Ident, TableName};
use crate::registry::{
    check_cluster, cursor_lock_key, has_column, load_registry, schema_state, ClusterCheck,
    SchemaState,
};

/// Rows read, and at most deleted, per statement, so no statement runs long.
const PRUNE_CHUNK: i64 = 10_000;

/// How far one live consumer of a table has handled it (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Handled {
    prev: String,
    /// The batch in progress: its snapshot and what was acknowledged of it.
    batch: Option<(String, i64)>,
    prev_upto: Option<i64>,
}

impl Handled {
    /// The SQL test that this consumer handled the row `(c.id, c.txid)`.
    fn test(&self) -> String {
        let prev = format!(
            "pg_catalog.pg_visible_in_snapshot(c.txid, {}::pg_catalog.pg_snapshot)",
            quote_literal(&self.prev)
        );
        match &self.batch {
            None => prev,
            Some((cur, done)) => format!(
                "({prev} OR (c.id <= {done} AND \
                  pg_catalog.pg_visible_in_snapshot(c.txid, {}::pg_catalog.pg_snapshot)))",
                quote_literal(cur)
            ),
        }
    }

    /// No row above this is handled by this consumer; `None`: not known.
    fn upper_bound(&self) -> Option<i64> {
        let done = self.batch.as_ref().map(|(_, d)| *d);
        self.prev_upto.map(|u| done.map_or(u, |d| d.max(u)))
    }
}

/// Prunes the logs of one Epidemic schema.
pub(crate) struct PgPruner<'a> {
    pub schema: &'a Ident,
}

impl PgPruner<'_> {
    fn q(&self, name: &str) -> String {
        format!("{}.{}", self.schema.quoted(), quote_ident(name))
    }

    /// Delete, per log table, the rows every live consumer of that table has handled
    /// (see the module docs); returns how many.
    pub fn prune(&self, client: &mut Client) -> Result<u64, PgError> {
        if schema_state(client, self.schema)? != SchemaState::Ours {
            return Ok(0);
        }
        let prev_upto = if has_column(client, self.schema, "consumer", "prev_upto")? {
            "prev_upto"
        } else {
            "NULL::int8"
        };
        // The cursors are read under the cursor lock, so no registration is in flight
        // (see `cursor_lock_key`), and only if this cluster wrote them: never prune on
        // the strength of another cluster's snapshots.
        let mut tx = client
            .transaction()
            .map_err(PgError::sql("read consumer cursors"))?;
        tx.execute(
            &format!(
                "SELECT pg_catalog.pg_advisory_xact_lock({})",
                cursor_lock_key(self.schema)
            ),
            &[],
        )
        .map_err(PgError::sql("lock consumer cursors"))?;
        if let ClusterCheck::Foreign { recorded, current } = check_cluster(&mut tx, self.schema)? {
            return Err(PgError::ForeignCluster {
                schema: self.schema.to_string(),
                recorded,
                current,
            });
        }
        let rows = tx
            .query(
                &format!(
                    "SELECT tables, prev_snapshot::text, batch_snapshot::text, batch_done_upto, \
                            {prev_upto}, evicted_at IS NOT NULL FROM {}",
                    self.q("consumer")
                ),
                &[],
            )
            .map_err(PgError::sql("read consumer cursors"))?;
        tx.commit().map_err(PgError::sql("read consumer cursors"))?;
        if rows.is_empty() {
            return Ok(0);
        }
        // Per table read by some consumer: how far each of its live consumers got (none
        // while all are evicted: nobody live needs the rows).
        let mut horizon: HashMap<TableName, Vec<Handled>> = HashMap::new();
        for r in &rows {
            let tables: Vec<String> = r.get(0);
            let batch: Option<String> = r.get(2);
            let done: Option<i64> = r.get(3);
            let handled = Handled {
                prev: r.get(1),
                batch: batch.zip(done),
                prev_upto: r.get(4),
            };
            let evicted: bool = r.get(5);
            for t in tables {
                // Names were validated at registration.
                let Ok(name) = TableName::parse(&t) else {
                    continue;
                };
                let consumers = horizon.entry(name).or_default();
                if !evicted && !consumers.contains(&handled) {
                    consumers.push(handled.clone());
                }
            }
        }
        let registry = load_registry(client, self.schema)?;
        let record_pruned = has_column(client, self.schema, "watched_table", "pruned_upto")?;
        let watched_table = self.q("watched_table");
        let mut total = 0u64;
        for (name, reg) in &registry {
            let Some(consumers) = horizon.get(name) else {
                continue;
            };
            let log = reg.log(self.schema);
            let handled_by_all = if consumers.is_empty() {
                "true".to_owned()
            } else {
                consumers
                    .iter()
                    .map(Handled::test)
                    .collect::<Vec<_>>()
                    .join(" AND ")
            };
            // A consumer whose bound is not known bounds nothing; the others still do.
            let upper_bound = consumers
                .iter()
                .filter_map(Handled::upper_bound)
                .min()
                .unwrap_or(i64::MAX);
            // One chunk: the next rows by primary key, and those of them every consumer
            // handled deleted by primary key. The greatest id deleted is recorded with
            // the log, so that install can tell a sequence that went back below it (see
            // `registry::check_logs`).
            let recorded = if record_pruned {
                format!(
                    ", u AS (UPDATE {watched_table} SET pruned_upto = greatest(pruned_upto, m.top) \
                             FROM m WHERE m.top IS NOT NULL AND table_schema = $4 AND table_name = $5)"
                )
            } else {
                String::new()
            };
            let sql = format!(
                "WITH c AS MATERIALIZED (\
                     SELECT id, txid FROM {log} WHERE id > $1 AND id <= $2 ORDER BY id LIMIT $3), \
                 d AS (DELETE FROM {log} WHERE id = ANY (ARRAY(\
                     SELECT c.id FROM c WHERE {handled_by_all})) RETURNING id), \
                 m AS (SELECT count(*) AS n, max(id) AS top FROM d){recorded} \
                 SELECT (SELECT count(*) FROM c), (SELECT max(id) FROM c), (SELECT n FROM m)"
            );
            let chunk = client
                .prepare(&sql)
                .map_err(PgError::sql(format!("prune the log of {name}")))?;
            let (schema, table) = (name.schema.as_str(), name.table.as_str());
            let mut after = i64::MIN;
            loop {
                let params: &[&(dyn postgres::types::ToSql + Sync)] = if record_pruned {
                    &[&after, &upper_bound, &PRUNE_CHUNK, &schema, &table]
                } else {
                    &[&after, &upper_bound, &PRUNE_CHUNK]
                };
                let row = client
                    .query_one(&chunk, params)
                    .map_err(PgError::sql(format!("prune the log of {name}")))?;
                let (read, last, deleted): (i64, Option<i64>, i64) =
                    (row.get(0), row.get(1), row.get(2));
                total += deleted as u64;
                match last {
                    Some(last) if read == PRUNE_CHUNK => after = last,
                    _ => break,
                }
            }
        }
        Ok(total)
    }
}
