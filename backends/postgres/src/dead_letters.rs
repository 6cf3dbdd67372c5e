//! [`PgDeadLetters`]: changes a handler gave up on, kept in the `dead_letter` table of
//! Epidemic's schema until `epidemic dead-letters retry` has them delivered again or
//! `drop` forgets them.
//!
//! The change is stored as the JSON the host hands over and is never looked into here.
//! `failed_at` is a `timestamptz` for people reading the table; it converts exactly to
//! and from the SDK's microseconds since the Unix epoch.

use epidemic_plugin_sdk::backend::kit::{DeadLetterRow, DEAD_LETTER_COLUMNS};
use epidemic_plugin_sdk::backend::{DeadLetter, DeadLetterQuery, DeadLetterUpdate};
use postgres::{Client, Row};

use crate::error::{not_installed, PgError};
use crate::ident::{quote_ident, Ident};
use crate::registry::{schema_state, SchemaState};

/// SQL for a `timestamptz` from microseconds since the epoch in parameter `$n`.
fn from_us(n: usize) -> String {
    format!("('epoch'::timestamptz + ${n}::int8 * interval '1 microsecond')")
}

/// The select list for [`DeadLetterRow`]: its columns in order, `failed_at` as
/// microseconds since the epoch.
fn letter_columns() -> String {
    DEAD_LETTER_COLUMNS
        .map(|c| match c {
            "failed_at" => "(extract(epoch FROM failed_at) * 1000000)::int8".to_owned(),
            c => c.to_owned(),
        })
        .join(", ")
}

fn letter(r: &Row) -> Result<DeadLetter, postgres::Error> {
    Ok(DeadLetterRow {
        id: r.try_get(0)?,
        daemon: r.try_get(1)?,
        handler: r.try_get(2)?,
        table: r.try_get(3)?,
        change_id: r.try_get(4)?,
        op: r.try_get(5)?,
        change: r.try_get(6)?,
        error: r.try_get(7)?,
        attempts: i64::from(r.try_get::<_, i32>(8)?),
        failed_at_us: r.try_get(9)?,
        retry_requested: r.try_get(10)?,
    }
    .into())
}

/// `attempts` for the `integer` column.
fn attempts(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// The dead letters of one Epidemic schema.
pub(crate) struct PgDeadLetters<'a> {
    pub schema: &'a Ident,
}

impl PgDeadLetters<'_> {
    fn table(&self) -> String {
        format!("{}.{}", self.schema.quoted(), quote_ident("dead_letter"))
    }

    /// Store a letter; returns its id.
    pub fn add(&self, client: &mut Client, l: &DeadLetter) -> Result<i64, PgError> {
        let row = client
            .query_one(
                &format!(
                    "INSERT INTO {} (daemon, handler, source_table, change_id, op, change, error, attempts, failed_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, {}) RETURNING id",
                    self.table(),
                    from_us(9)
                ),
                &[
                    &l.daemon,
                    &l.handler,
                    &l.table,
                    &l.change_id,
                    &l.op.code(),
                    &l.change,
                    &l.error,
                    &attempts(l.attempts),
                    &l.failed_at_us,
                ],
            )
            .map_err(not_installed(
                self.schema,
                format!("store a dead letter for {}/{}", l.daemon, l.handler),
            ))?;
        Ok(row.get(0))
    }

    /// The letters `query` selects, oldest first. None before Epidemic is installed.
    pub fn list(
        &self,
        client: &mut Client,
        query: &DeadLetterQuery,
    ) -> Result<Vec<DeadLetter>, PgError> {
        if schema_state(client, self.schema)? != SchemaState::Ours {
            return Ok(Vec::new());
        }
        let base = format!("SELECT {} FROM {}", letter_columns(), self.table());
        let context = "read dead letters";
        let rows = match query {
            DeadLetterQuery::All => client.query(&format!("{base} ORDER BY id"), &[]),
            DeadLetterQuery::Consumer(c) => client.query(
                &format!("{base} WHERE daemon = $1 AND handler = $2 ORDER BY id"),
                &[&c.daemon, &c.handler],
            ),
            DeadLetterQuery::RetryRequested(c) => client.query(
                &format!(
                    "{base} WHERE daemon = $1 AND handler = $2 AND retry_requested ORDER BY id"
                ),
                &[&c.daemon, &c.handler],
            ),
            DeadLetterQuery::Ids(ids) => {
                client.query(&format!("{base} WHERE id = ANY ($1) ORDER BY id"), &[ids])
            }
        }
        .map_err(not_installed(self.schema, context))?;
        rows.iter()
            .map(letter)
            .collect::<Result<_, _>>()
            .map_err(PgError::sql(context))
    }

    /// Apply `update`; returns how many letters it touched (none before install).
    pub fn update(&self, client: &mut Client, update: &DeadLetterUpdate) -> Result<u64, PgError> {
        if schema_state(client, self.schema)? != SchemaState::Ours {
            return Ok(0);
        }
        let table = self.table();
        match update {
            DeadLetterUpdate::RequestRetry(ids) => client.execute(
                &format!("UPDATE {table} SET retry_requested = true WHERE id = ANY ($1)"),
                &[ids],
            ),
            DeadLetterUpdate::Delete(ids) => {
                client.execute(&format!("DELETE FROM {table} WHERE id = ANY ($1)"), &[ids])
            }
            DeadLetterUpdate::Failed {
                id,
                error,
                attempts: n,
                failed_at_us,
            } => client.execute(
                &format!(
                    "UPDATE {table} SET retry_requested = false, error = $2, attempts = $3, failed_at = {} \
                     WHERE id = $1",
                    from_us(4)
                ),
                &[id, error, &attempts(*n), failed_at_us],
            ),
        }
        .map_err(not_installed(self.schema, "update dead letters"))
    }
}
