//! Backfill requests and progress ([`PgBackfills`]), in the bookkeeping table `backfill`
//! (created by install with the others, dropped with the schema by uninstall): one row per
//! (daemon, handler, table) with its state, its progress as JSON (the SDK's
//! `BackfillProgress`), when it was requested (which identifies the request) and when it
//! was last updated, by the database's clock. The table is named as the consumer spells
//! it (`users` or `public.users`), which is how its changes and its watermarks reach the
//! consumer.
//!
//! A request is checked and stored in one transaction under an advisory lock of the
//! schema's backfills ([`lock_key`]): two requests for one consumer are serialised, and
//! the second one's check (its own statement, so its own READ COMMITTED snapshot, taken
//! after the first committed) sees the first one's rows and refuses; a refused request
//! stores nothing. A save updates the row of the same request only (same
//! `requested_at`), so a daemon still running a backfill that was cancelled, or cancelled
//! and requested again, learns that it is gone instead of overwriting the new request.
//!
//! Not here: reading a chunk and writing its watermark ([`crate::snapshot`]); what the
//! host does with them (`core/src/backfill.rs`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use epidemic_plugin_sdk::backend::{
    BackfillProgress, BackfillReply, BackfillRequest, BackfillState, Consumer,
};
use postgres::{Client, GenericClient, Row};

use crate::error::PgError;
use crate::ident::{quote_ident, quote_literal, Ident, TableName};
use crate::registry::{load_registry, schema_state, SchemaState};

/// The bookkeeping table's DDL (part of every install; see [`crate::registry`]).
pub(crate) fn ddl(schema: &Ident) -> String {
    // progress: JSON, the SDK's BackfillProgress (last key done, rows done, estimate, who
    // asked, times); the columns are what the row is. position: the table's place in its
    // request, the order the host takes the tables in.
    format!(
        "CREATE TABLE IF NOT EXISTS {}.{} (\n    \
             daemon text NOT NULL,\n    \
             handler text NOT NULL,\n    \
             source_table text NOT NULL,\n    \
             state text NOT NULL CHECK (state IN ('requested', 'running', 'done')),\n    \
             progress text NOT NULL,\n    \
             position integer NOT NULL DEFAULT 0,\n    \
             requested_at timestamptz NOT NULL DEFAULT now(),\n    \
             updated_at timestamptz NOT NULL DEFAULT now(),\n    \
             PRIMARY KEY (daemon, handler, source_table)\n)",
        schema.quoted(),
        quote_ident("backfill")
    )
}

/// The advisory lock that serialises backfill requests in one schema.
fn lock_key(schema: &Ident) -> String {
    format!(
        "pg_catalog.hashtext({})",
        quote_literal(&format!("epidemic backfills {schema}"))
    )
}

const NOT_DONE: &str = "state IN ('requested', 'running')";

/// What every read of the table selects, in [`progress`]'s order.
const COLUMNS: &str = "daemon, handler, source_table, state, progress, requested_at, updated_at";

/// What every read of the table is ordered by: consumer, request, place in the request.
const ORDER: &str = "daemon, handler, requested_at, position, source_table";

fn state_text(s: BackfillState) -> &'static str {
    match s {
        BackfillState::Requested => "requested",
        BackfillState::Running => "running",
        BackfillState::Done => "done",
    }
}

fn state_from(s: &str) -> BackfillState {
    match s {
        "running" => BackfillState::Running,
        "done" => BackfillState::Done,
        _ => BackfillState::Requested,
    }
}

fn us_of(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_micros() as i64,
        Err(e) => -(e.duration().as_micros() as i64),
    }
}

fn time_of(us: i64) -> SystemTime {
    let d = Duration::from_micros(us.unsigned_abs());
    if us >= 0 {
        UNIX_EPOCH + d
    } else {
        UNIX_EPOCH - d
    }
}

/// A row of the table (selected as [`COLUMNS`]) as progress: the JSON, with what the
/// columns say over it.
fn progress(r: &Row) -> Result<BackfillProgress, PgError> {
    let json: String = r.get(4);
    let mut p: BackfillProgress =
        serde_json::from_str(&json).map_err(|e| PgError::BadProgress(e.to_string()))?;
    p.daemon = r.get(0);
    p.handler = r.get(1);
    p.table = r.get(2);
    p.state = state_from(r.get(3));
    p.requested_at_us = us_of(r.get(5));
    p.updated_at_us = us_of(r.get(6));
    Ok(p)
}

fn json(p: &BackfillProgress) -> Result<String, PgError> {
    serde_json::to_string(p).map_err(|e| PgError::BadProgress(e.to_string()))
}

/// `t` and `public.t` for a table in `public`, `s.t` otherwise: how a consumer may spell it.
fn spellings(name: &TableName) -> Vec<String> {
    let mut s = vec![format!("{}.{}", name.schema, name.table)];
    if name.schema.as_str() == "public" {
        s.push(name.table.to_string());
    }
    s
}

/// The backfills of one Epidemic schema.
pub(crate) struct PgBackfills<'a> {
    pub schema: &'a Ident,
}

impl PgBackfills<'_> {
    fn table(&self) -> String {
        format!("{}.{}", self.schema.quoted(), quote_ident("backfill"))
    }

    /// Whether the backfill table exists (an installation older than backfills has none
    /// until the next install).
    fn exists(&self, client: &mut impl GenericClient) -> Result<bool, PgError> {
        Ok(client
            .query_one(
                "SELECT pg_catalog.to_regclass($1) IS NOT NULL",
                &[&self.table()],
            )
            .map_err(PgError::sql("inspect the backfill table"))?
            .get(0))
    }

    pub fn apply(
        &self,
        client: &mut Client,
        request: &BackfillRequest,
    ) -> Result<BackfillReply, PgError> {
        if !self.exists(client)? {
            return match request {
                BackfillRequest::Request { .. } => {
                    if schema_state(client, self.schema)? == SchemaState::Ours {
                        Err(PgError::NoBackfillTable(self.schema.to_string()))
                    } else {
                        Err(PgError::NothingInstalled(self.schema.to_string()))
                    }
                }
                // Nothing was ever requested here.
                _ => Ok(BackfillReply::default()),
            };
        }
        let t = self.table();
        let backfills = match request {
            BackfillRequest::Request {
                consumer,
                tables,
                requested_by,
            } => self.request(client, consumer, tables, requested_by)?,
            BackfillRequest::Pending { consumer } => self.select(
                client,
                &format!("WHERE daemon = $1 AND handler = $2 AND {NOT_DONE}"),
                Some(consumer),
            )?,
            BackfillRequest::Save(p) => self.save(client, p)?,
            BackfillRequest::List => self.select(client, "", None)?,
            BackfillRequest::Cancel { consumer } => {
                let rows = client
                    .query(
                        &format!(
                            "DELETE FROM {t} WHERE daemon = $1 AND handler = $2 AND {NOT_DONE} \
                             RETURNING {COLUMNS}"
                        ),
                        &[&consumer.daemon, &consumer.handler],
                    )
                    .map_err(PgError::sql(format!("cancel the backfill of {consumer}")))?;
                let mut cancelled = rows.iter().map(progress).collect::<Result<Vec<_>, _>>()?;
                cancelled.sort_by_key(|p| p.requested_at_us);
                cancelled
            }
        };
        Ok(BackfillReply { backfills })
    }

    /// Check and store a request; see the module docs.
    fn request(
        &self,
        client: &mut Client,
        consumer: &Consumer,
        tables: &[String],
        requested_by: &str,
    ) -> Result<Vec<BackfillProgress>, PgError> {
        if tables.is_empty() {
            return Err(PgError::NoBackfillTables(consumer.to_string()));
        }
        let t = self.table();
        let context = || format!("request a backfill of {consumer}");
        let mut tx = client.transaction().map_err(PgError::sql(context()))?;
        tx.execute(
            &format!(
                "SELECT pg_catalog.pg_advisory_xact_lock({})",
                lock_key(self.schema)
            ),
            &[],
        )
        .map_err(PgError::sql(context()))?;
        // Each table watched, with a key; one row per table however it is spelled.
        let registry = load_registry(&mut tx, self.schema)?;
        let mut names: Vec<(String, TableName)> = Vec::with_capacity(tables.len());
        for table in tables {
            let name = TableName::parse(table)?;
            let reg = registry
                .get(&name)
                .ok_or_else(|| PgError::NotInstalled(table.clone()))?;
            if reg.key_columns.is_empty() || reg.log_identity.is_none() {
                return Err(PgError::Outdated(table.clone()));
            }
            if !names.iter().any(|(_, n)| n == &name) {
                names.push((table.clone(), name));
            }
        }
        let (d, h) = (&consumer.daemon, &consumer.handler);
        let busy = tx
            .query(
                &format!(
                    "SELECT {COLUMNS} FROM {t} WHERE daemon = $1 AND handler = $2 AND {NOT_DONE} \
                     ORDER BY {ORDER} LIMIT 1"
                ),
                &[d, h],
            )
            .map_err(PgError::sql(context()))?;
        if let Some(b) = busy.first() {
            let b = progress(b)?;
            let rows = match b.rows_estimate {
                Some(total) => format!("{} of ~{total} rows", b.rows_done),
                None => format!("{} rows done", b.rows_done),
            };
            return Err(PgError::BackfillBusy {
                consumer: consumer.to_string(),
                state: state_text(b.state),
                table: b.table,
                rows,
            });
        }
        let mut stored = Vec::with_capacity(names.len());
        for (position, (table, name)) in names.into_iter().enumerate() {
            // A done backfill of the table, however it was spelled, is replaced.
            tx.execute(
                &format!("DELETE FROM {t} WHERE daemon = $1 AND handler = $2 AND source_table = ANY ($3)"),
                &[d, h, &spellings(&name)],
            )
            .map_err(PgError::sql(context()))?;
            let mut p = BackfillProgress {
                daemon: d.clone(),
                handler: h.clone(),
                table,
                state: BackfillState::Requested,
                requested_by: requested_by.to_owned(),
                ..BackfillProgress::default()
            };
            let row = tx
                .query_one(
                    &format!(
                        "INSERT INTO {t} (daemon, handler, source_table, state, progress, position) \
                         VALUES ($1, $2, $3, 'requested', $4, $5) RETURNING {COLUMNS}"
                    ),
                    &[d, h, &p.table, &json(&p)?, &(position as i32)],
                )
                .map_err(PgError::sql(context()))?;
            let times = progress(&row)?;
            p.requested_at_us = times.requested_at_us;
            p.updated_at_us = times.updated_at_us;
            stored.push(p);
        }
        tx.commit().map_err(PgError::sql(context()))?;
        Ok(stored)
    }

    /// Update the row of the same request; nothing when it is gone (cancelled, or
    /// requested again since).
    fn save(
        &self,
        client: &mut Client,
        p: &BackfillProgress,
    ) -> Result<Vec<BackfillProgress>, PgError> {
        let row = client
            .query_opt(
                &format!(
                    "UPDATE {} SET state = $4, progress = $5, updated_at = now() \
                     WHERE daemon = $1 AND handler = $2 AND source_table = $3 AND requested_at = $6 \
                     RETURNING {COLUMNS}",
                    self.table()
                ),
                &[
                    &p.daemon,
                    &p.handler,
                    &p.table,
                    &state_text(p.state),
                    &json(p)?,
                    &time_of(p.requested_at_us),
                ],
            )
            .map_err(PgError::sql(format!(
                "save the backfill progress of {}/{} on {}",
                p.daemon, p.handler, p.table
            )))?;
        row.as_ref().map(progress).into_iter().collect()
    }

    /// The rows matching `filter` (`$1`, `$2`: the consumer), in request order.
    fn select(
        &self,
        client: &mut Client,
        filter: &str,
        consumer: Option<&Consumer>,
    ) -> Result<Vec<BackfillProgress>, PgError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM {} {filter} ORDER BY {ORDER}",
            self.table()
        );
        let rows = match consumer {
            Some(c) => client.query(&sql, &[&c.daemon, &c.handler]),
            None => client.query(&sql, &[]),
        }
        .map_err(PgError::sql("read backfills"))?;
        rows.iter().map(progress).collect()
    }

    /// Forget a consumer's backfills (it is unregistered).
    pub fn forget(&self, client: &mut Client, consumer: &Consumer) -> Result<(), PgError> {
        if self.exists(client)? {
            client
                .execute(
                    &format!(
                        "DELETE FROM {} WHERE daemon = $1 AND handler = $2",
                        self.table()
                    ),
                    &[&consumer.daemon, &consumer.handler],
                )
                .map_err(PgError::sql(format!("forget the backfills of {consumer}")))?;
        }
        Ok(())
    }
}
