//! Deleting log rows every live consumer has passed: [`PgPruner::prune`].
//!
//! Per log table the horizon is the oldest `xmin` of the `prev` snapshots of the live
//! consumers that read it: a row whose transaction is older is visible in all of them,
//! so handled by all. The cursors are read under the cursor lock (see
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

/// Prunes the logs of one Epidemic schema.
pub(crate) struct PgPruner<'a> {
    pub schema: &'a Ident,
}

impl PgPruner<'_> {
    fn q(&self, name: &str) -> String {
        format!("{}.{}", self.schema.quoted(), quote_ident(name))
    }

    /// Delete, per log table, the rows every live consumer of that table has passed:
    /// those whose transaction is older than the oldest `xmin` of the consumers' `prev`
    /// snapshots (visible in all of them, so handled by all). Tables nobody reads are
    /// left alone, so a consumer registered later can still start from the oldest;
    /// tables whose consumers are all evicted are emptied, since nobody live needs them.
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
                    "SELECT tables, pg_snapshot_xmin(prev_snapshot)::text, evicted_at IS NOT NULL FROM {}",
                    self.q("consumer")
                ),
                &[],
            )
            .map_err(PgError::sql("read consumer cursors"))?;
        tx.commit().map_err(PgError::sql("read consumer cursors"))?;
        if rows.is_empty() {
            return Ok(0);
        }
        // Per table: the oldest xmin of its live consumers; None while all are evicted.
        let mut horizon: HashMap<TableName, Option<u64>> = HashMap::new();
        for r in &rows {
            let tables: Vec<String> = r.get(0);
            let xmin: String = r.get(1);
            let evicted: bool = r.get(2);
            let xmin = match xmin.parse::<u64>() {
                Ok(x) if !evicted => Some(x),
                _ => None,
            };
            for t in tables {
                // Names were validated at registration.
                if let Ok(name) = TableName::parse(&t) {
                    let h = horizon.entry(name).or_insert(None);
                    *h = match (*h, xmin) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                }
            }
        }
        let registry = load_registry(client, self.schema)?;
        let record_pruned = has_column(client, self.schema, "watched_table", "pruned_upto")?;
        let watched_table = self.q("watched_table");
        let mut total = 0u64;
        for (name, reg) in &registry {
            let Some(xmin) = horizon.get(name) else {
                continue;
            };
            let log = reg.log(self.schema);
            // Without a live consumer the horizon is "everything committed": rows of
            // transactions still running are invisible to the DELETE and stay.
            let xmin = xmin.map_or_else(|| u64::MAX.to_string(), |x| x.to_string());
            // The greatest id deleted is recorded with the log, so that install can tell
            // a sequence that went back below it (see `registry::check_logs`).
            let sql = if record_pruned {
                format!(
                    "WITH d AS (DELETE FROM {log} WHERE id IN \
                                (SELECT id FROM {log} WHERE txid < $1::text::xid8 LIMIT $2) RETURNING id), \
                          m AS (SELECT count(*) AS n, max(id) AS top FROM d), \
                          u AS (UPDATE {watched_table} SET pruned_upto = greatest(pruned_upto, m.top) \
                                FROM m WHERE m.top IS NOT NULL AND table_schema = $3 AND table_name = $4) \
                     SELECT n FROM m"
                )
            } else {
                format!(
                    "WITH d AS (DELETE FROM {log} WHERE id IN \
                                (SELECT id FROM {log} WHERE txid < $1::text::xid8 LIMIT $2) RETURNING id) \
                     SELECT count(*) FROM d"
                )
            };
            loop {
                let (schema, table) = (name.schema.as_str(), name.table.as_str());
                let params: &[&(dyn postgres::types::ToSql + Sync)] = if record_pruned {
                    &[&xmin, &PRUNE_CHUNK, &schema, &table]
                } else {
                    &[&xmin, &PRUNE_CHUNK]
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
