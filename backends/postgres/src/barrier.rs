//! The delivery barrier behind `epidemic wait` (see `epidemic_plugin_sdk::barrier`).
//!
//! A fence is a transaction snapshot, `pg_current_snapshot()`: every transaction
//! committed by now is visible in it. A consumer is behind the fence on a table while the
//! table's log holds a row written by a transaction the fence sees and the consumer's
//! fully handled snapshot (`prev_snapshot`) does not; the txid index keeps it to the rows
//! at or after the consumer's `xmin`. So only changes matter, not unrelated transactions.
//!
//! As a query an application can run itself, in its own database (`:fence` is the text of
//! `pg_current_snapshot()` taken when it wrote; empty means every consumer is done):
//!
//! ```sql
//! SELECT c.daemon, c.handler FROM epidemic.consumer c
//!  WHERE c.evicted_at IS NULL AND 'mail_users' = ANY (c.tables)
//!    AND EXISTS (SELECT 1 FROM epidemic.log_mail_users l
//!                WHERE l.txid >= pg_snapshot_xmin(c.prev_snapshot)
//!                  AND pg_visible_in_snapshot(l.txid, :fence::pg_snapshot)
//!                  AND NOT pg_visible_in_snapshot(l.txid, c.prev_snapshot));
//! ```

use epidemic_plugin_sdk::backend::{BackendError, BarrierReply, BarrierRequest, Laggard};
use postgres::GenericClient;
use serde::{Deserialize, Serialize};

use crate::error::PgError;
use crate::ident::{Ident, TableName};
use crate::registry::{load_registry, schema_state, SchemaState};

#[derive(Serialize, Deserialize)]
struct Fence {
    snapshot: String,
    tables: Vec<String>,
}

pub(crate) fn barrier(
    client: &mut impl GenericClient,
    schema: &Ident,
    request: &BarrierRequest,
) -> Result<BarrierReply, PgError> {
    match request {
        BarrierRequest::Fence { tables } => {
            let snapshot: String = client
                .query_one("SELECT pg_catalog.pg_current_snapshot()::text", &[])
                .map_err(PgError::sql("take a snapshot for the fence"))?
                .get(0);
            let fence = serde_json::to_string(&Fence {
                snapshot,
                tables: tables.clone(),
            })
            .map_err(|e| PgError::Backend(BackendError::Other(e.to_string())))?;
            Ok(BarrierReply {
                fence,
                laggards: Vec::new(),
            })
        }
        BarrierRequest::Laggards { fence, consumers } => {
            let fence: Fence = serde_json::from_str(fence).map_err(|e| {
                PgError::Backend(BackendError::Invalid(format!(
                    "not a fence of the PostgreSQL backend: {e}"
                )))
            })?;
            if schema_state(client, schema)? != SchemaState::Ours {
                return Ok(BarrierReply::default());
            }
            let registry = load_registry(client, schema)?;
            let s = schema.quoted();
            let mut laggards = Vec::new();
            for c in consumers {
                let row = client
                    .query_opt(
                        &format!(
                            "SELECT tables, prev_snapshot::text FROM {s}.consumer \
                             WHERE daemon = $1 AND handler = $2"
                        ),
                        &[&c.daemon, &c.handler],
                    )
                    .map_err(PgError::sql("read a consumer's cursor"))?;
                let Some(row) = row else {
                    laggards.push(Laggard {
                        consumer: c.clone(),
                        tables: fence.tables.clone(),
                    });
                    continue;
                };
                let reads: Vec<String> = row.get(0);
                let prev: String = row.get(1);
                let mut behind = Vec::new();
                for t in fence.tables.iter().filter(|t| reads.contains(t)) {
                    let Some(reg) = registry.get(&TableName::parse(t)?) else {
                        continue;
                    };
                    let lagging: bool = client
                        .query_one(
                            &format!(
                                "SELECT EXISTS (SELECT 1 FROM {} l \
                                 WHERE l.txid >= pg_catalog.pg_snapshot_xmin($1::text::pg_snapshot) \
                                   AND pg_catalog.pg_visible_in_snapshot(l.txid, $2::text::pg_snapshot) \
                                   AND NOT pg_catalog.pg_visible_in_snapshot(l.txid, $1::text::pg_snapshot))",
                                reg.log(schema)
                            ),
                            &[&prev, &fence.snapshot],
                        )
                        .map_err(PgError::sql(format!("compare consumer {c} with the fence")))?
                        .get(0);
                    if lagging {
                        behind.push(t.clone());
                    }
                }
                if !behind.is_empty() {
                    laggards.push(Laggard {
                        consumer: c.clone(),
                        tables: behind,
                    });
                }
            }
            Ok(BarrierReply {
                fence: String::new(),
                laggards,
            })
        }
    }
}
