//! Deleting log rows every live consumer has passed: [`PgPruner::prune`].
//!
//! A consumer's `prev` snapshot is what it has fully handled: a log row whose transaction
//! is visible in the `prev` snapshot of every live consumer that reads the table is
//! handled by all, and goes. Visibility is checked per row, not by the snapshots' `xmin`,
//! so a transaction left open elsewhere (a long report, an idle session in a transaction)
//! does not hold back pruning of what committed around it. A consumer registered from the
//! oldest change has a snapshot that sees nothing, so it keeps the whole log; tables
//! whose consumers are all evicted are emptied of committed rows, since nobody live needs
//! them; tables nobody reads are left alone, so a consumer registered later can still
//! start from the oldest. The cursors are read under the cursor lock (see
//! `registry::cursor_lock_key`), so that a consumer being registered, whose snapshot may
//! miss rows the others have passed, is never left out; and only if this cluster wrote
//! them (a dump restored from another cluster holds snapshots of other transaction ids).

use std::collections::HashMap;

use postgres::Client;

use crate::error::PgError;
use crate::ident::{quote_ident, Ident, TableName};
use crate::registry::{
    check_cluster, cursor_lock_key, has_column, load_registry, schema_state, ClusterCheck,
    SchemaState,
};

/// Rows deleted per statement, so no statement holds many locks or runs long.
const PRUNE_CHUNK: i64 = 10_000;

/// What the live consumers of one log table have handled.
#[derive(Debug, Default)]
struct Horizon {
    /// Their `prev` snapshots, each once.
    snapshots: Vec<String>,
    /// The oldest of their `xmax`: no transaction at or above it is visible in all.
    xmax: Option<u64>,
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
                    "SELECT tables, prev_snapshot::text, pg_snapshot_xmax(prev_snapshot)::text, \
                            evicted_at IS NOT NULL FROM {}",
                    self.q("consumer")
                ),
                &[],
            )
            .map_err(PgError::sql("read consumer cursors"))?;
        tx.commit().map_err(PgError::sql("read consumer cursors"))?;
        if rows.is_empty() {
            return Ok(0);
        }
        // Per table read by some consumer: the `prev` snapshots of its live consumers
        // (none while all are evicted: nobody live needs the rows).
        let mut horizon: HashMap<TableName, Horizon> = HashMap::new();
        for r in &rows {
            let tables: Vec<String> = r.get(0);
            let snapshot: String = r.get(1);
            let xmax: String = r.get(2);
            let evicted: bool = r.get(3);
            for t in tables {
                // Names were validated at registration.
                let Ok(name) = TableName::parse(&t) else {
                    continue;
                };
                let h = horizon.entry(name).or_default();
                if evicted || h.snapshots.contains(&snapshot) {
                    continue;
                }
                if let Ok(x) = xmax.parse::<u64>() {
                    h.xmax = Some(h.xmax.map_or(x, |m| m.min(x)));
                    h.snapshots.push(snapshot.clone());
                }
            }
        }
        let registry = load_registry(client, self.schema)?;
        let record_pruned = has_column(client, self.schema, "watched_table", "pruned_upto")?;
        let watched_table = self.q("watched_table");
        let mut total = 0u64;
        for (name, reg) in &registry {
            let Some(h) = horizon.get(name) else {
                continue;
            };
            let log = reg.log(self.schema);
            // Rows of transactions still running are invisible to the DELETE and stay.
            // The bound on `txid` (the oldest `xmax`: nothing at or above it is visible
            // in every snapshot) lets the `txid` index find the candidates.
            let bound = h
                .xmax
                .map_or_else(|| u64::MAX.to_string(), |x| x.to_string());
            let candidates = format!(
                "SELECT l.id FROM {log} l WHERE l.txid < $1::text::xid8 \
                   AND NOT EXISTS (SELECT 1 FROM unnest($3::text[]) AS s(snapshot) \
                                   WHERE NOT pg_visible_in_snapshot(l.txid, s.snapshot::pg_snapshot)) \
                 LIMIT $2"
            );
            // The greatest id deleted is recorded with the log, so that install can tell
            // a sequence that went back below it (see `registry::check_logs`).
            let sql = if record_pruned {
                format!(
                    "WITH d AS (DELETE FROM {log} WHERE id IN ({candidates}) RETURNING id), \
                          m AS (SELECT count(*) AS n, max(id) AS top FROM d), \
                          u AS (UPDATE {watched_table} SET pruned_upto = greatest(pruned_upto, m.top) \
                                FROM m WHERE m.top IS NOT NULL AND table_schema = $4 AND table_name = $5) \
                     SELECT n FROM m"
                )
            } else {
                format!(
                    "WITH d AS (DELETE FROM {log} WHERE id IN ({candidates}) RETURNING id) \
                     SELECT count(*) FROM d"
                )
            };
            loop {
                let (schema, table) = (name.schema.as_str(), name.table.as_str());
                let params: &[&(dyn postgres::types::ToSql + Sync)] = if record_pruned {
                    &[&bound, &PRUNE_CHUNK, &h.snapshots, &schema, &table]
                } else {
                    &[&bound, &PRUNE_CHUNK, &h.snapshots]
                };
                let n: i64 = client
                    .query_one(&sql, params)
                    .map_err(PgError::sql(format!("prune the log of {name}")))?
                    .get(0);
                total += n as u64;
                if n < PRUNE_CHUNK {
                    break;
                }
            }
        }
        Ok(total)
    }
}
