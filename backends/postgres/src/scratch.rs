//! `epidemic bench`'s scratch table: creating it (with whatever Epidemic kept for an
//! earlier one forgotten first), filling it, and dropping it with everything Epidemic
//! kept for it. Only ever [`SCRATCH_TABLE`](epidemic_plugin_sdk::backend::SCRATCH_TABLE)
//! in `public` (the default `search_path`); the backend checks the name before calling
//! anything here, and runs the create and drop plans like an install: in one
//! transaction, under the install lock.

use postgres::{Client, GenericClient, Statement};

use crate::error::PgError;
use crate::ident::TableName;
use crate::install::PgInstaller;

/// Forget what Epidemic kept for an earlier scratch table, then create a new one.
pub(crate) fn create_plan(
    installer: &PgInstaller<'_>,
    client: &mut impl GenericClient,
    name: &TableName,
) -> Result<Vec<String>, PgError> {
    let mut plan = installer.plan_forget_table(client, name)?;
    plan.push(format!("DROP TABLE IF EXISTS {}", name.quoted()));
    plan.push(format!(
        "CREATE TABLE {} (id bigint PRIMARY KEY, payload text)",
        name.quoted()
    ));
    Ok(plan)
}

/// Forget what Epidemic kept for the scratch table, then drop it.
pub(crate) fn drop_plan(
    installer: &PgInstaller<'_>,
    client: &mut impl GenericClient,
    name: &TableName,
) -> Result<Vec<String>, PgError> {
    let mut plan = installer.plan_forget_table(client, name)?;
    plan.push(format!("DROP TABLE IF EXISTS {}", name.quoted()));
    Ok(plan)
}

/// Inserts into the scratch table, with the statement prepared on the connection once.
#[derive(Default)]
pub(crate) struct PgScratch {
    insert: Option<Statement>,
}

impl PgScratch {
    /// Forget the prepared statement (a new connection, or the table was recreated).
    pub fn reset(&mut self) {
        self.insert = None;
    }

    /// Insert rows `first_id ..< first_id + count`, `per_tx` per transaction.
    pub fn insert(
        &mut self,
        client: &mut Client,
        name: &TableName,
        first_id: i64,
        count: u64,
        per_tx: u64,
    ) -> Result<(), PgError> {
        let statement = match &self.insert {
            Some(s) => s.clone(),
            None => {
                let s = client
                    .prepare(&format!(
                        "INSERT INTO {} (id, payload) VALUES ($1, 'bench')",
                        name.quoted()
                    ))
                    .map_err(PgError::sql(format!("prepare inserts into {name}")))?;
                self.insert = Some(s.clone());
                s
            }
        };
        let context = || format!("insert into {name}");
        let end = first_id.saturating_add(i64::try_from(count).unwrap_or(i64::MAX));
        let per_tx = i64::try_from(per_tx.max(1)).unwrap_or(i64::MAX);
        let mut id = first_id;
        while id < end {
            let upto = id.saturating_add(per_tx).min(end);
            if upto - id == 1 {
                // One row: one round trip, the statement is its own transaction.
                client
                    .execute(&statement, &[&id])
                    .map_err(PgError::sql(context()))?;
            } else {
                let mut tx = client.transaction().map_err(PgError::sql(context()))?;
                for i in id..upto {
                    tx.execute(&statement, &[&i])
                        .map_err(PgError::sql(context()))?;
                }
                tx.commit().map_err(PgError::sql(context()))?;
            }
            id = upto;
        }
        Ok(())
    }
}
