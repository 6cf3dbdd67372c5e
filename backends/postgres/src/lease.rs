//! [`PgLeases`]: the `daemon` table of Epidemic's schema, one row per daemon name, that
//! makes a name exclusive to one live daemon (see the SDK's `LeaseRequest`). Every time
//! is the server's `clock_timestamp()`, never a daemon's clock.

use epidemic_plugin_sdk::backend::{LeaseHolder, LeaseRequest, LeaseState};
use postgres::Client;

use crate::error::{not_installed, PgError};
use crate::ident::{quote_ident, Ident};

pub(crate) struct PgLeases<'a> {
    pub schema: &'a Ident,
}

impl PgLeases<'_> {
    fn table(&self) -> String {
        format!("{}.{}", self.schema.quoted(), quote_ident("daemon"))
    }

    pub fn apply(&self, client: &mut Client, req: &LeaseRequest) -> Result<LeaseState, PgError> {
        let t = self.table();
        match req {
            LeaseRequest::List => {
                let exists: bool = client
                    .query_one("SELECT to_regclass($1) IS NOT NULL", &[&t])
                    .map_err(PgError::sql("look for the daemon table"))?
                    .get(0);
                if !exists {
                    return Ok(LeaseState::Holders(Vec::new()));
                }
                let rows = client
                    .query(
                        &format!(
                            "SELECT daemon, holder, \
                             (extract(epoch FROM expires_at - clock_timestamp()) * 1000)::int8 \
                             FROM {t} ORDER BY daemon"
                        ),
                        &[],
                    )
                    .map_err(PgError::sql("list daemon leases"))?;
                Ok(LeaseState::Holders(
                    rows.iter()
                        .map(|r| LeaseHolder {
                            daemon: r.get(0),
                            holder: r.get(1),
                            expires_in_ms: r.get(2),
                        })
                        .collect(),
                ))
            }
            LeaseRequest::Release { daemon, instance } => {
                client
                    .execute(
                        &format!("DELETE FROM {t} WHERE daemon = $1 AND instance = $2"),
                        &[daemon, instance],
                    )
                    .map_err(not_installed(
                        self.schema,
                        format!("release daemon name {daemon}"),
                    ))?;
                Ok(LeaseState::Released)
            }
            LeaseRequest::Claim {
                daemon,
                instance,
                holder,
                ttl_ms,
                take_over,
            } => {
                let ttl_ms = i64::try_from(*ttl_ms).unwrap_or(i64::MAX).min(1 << 40);
                // One statement: insert the name, or take it when it is ours, expired,
                // or held by the instance the caller proved dead; the row lock makes
                // the check and the grant atomic. RETURNING tells whether it was granted.
                let row = client
                    .query_opt(
                        &format!(
                            "INSERT INTO {t} AS d (daemon, instance, holder, expires_at, renewals) \
                             VALUES ($1, $2, $3, clock_timestamp() + $4 * interval '1 millisecond', 1) \
                             ON CONFLICT (daemon) DO UPDATE SET instance = EXCLUDED.instance, \
                                 holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at, \
                                 renewals = d.renewals + 1 \
                             WHERE d.instance = $2 OR d.expires_at < clock_timestamp() OR d.instance = $5 \
                             RETURNING 1"
                        ),
                        &[daemon, instance, holder, &(ttl_ms as f64), take_over],
                    )
                    .map_err(not_installed(
                        self.schema,
                        format!("claim daemon name {daemon}"),
                    ))?;
                if row.is_some() {
                    return Ok(LeaseState::Granted);
                }
                let r = client
                    .query_one(
                        &format!(
                            "SELECT instance, holder, \
                             greatest(extract(epoch FROM expires_at - clock_timestamp()) * 1000, 0)::int8, \
                             renewals FROM {t} WHERE daemon = $1"
                        ),
                        &[daemon],
                    )
                    .map_err(PgError::sql(format!("read the lease of daemon name {daemon}")))?;
                Ok(LeaseState::Held {
                    instance: r.get(0),
                    holder: r.get(1),
                    expires_in_ms: r.get::<_, i64>(2).max(0) as u64,
                    renewals: r.get(3),
                })
            }
        }
    }
}
