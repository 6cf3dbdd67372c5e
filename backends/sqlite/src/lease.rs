//! The lease that makes a daemon name exclusive to one live daemon (`epidemic_daemon`):
//! claimed, renewed and released atomically in one write transaction, by SQLite's clock
//! ([`NOW_US`]), which every daemon of a database file shares (they run on the host that
//! has the file).

use epidemic_plugin_sdk::backend::{BackendError, LeaseHolder, LeaseRequest, LeaseState};
use rusqlite::{params, Connection, TransactionBehavior};

use crate::conn::NOW_US;
use crate::error::sql_err;

pub(crate) fn lease(conn: &mut Connection, req: &LeaseRequest) -> Result<LeaseState, BackendError> {
    match req {
        LeaseRequest::List => {
            let exists: bool = conn
                .query_row(
                    "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'epidemic_daemon'",
                    [],
                    |r| r.get(0),
                )
                .map_err(sql_err)?;
            if !exists {
                return Ok(LeaseState::Holders(Vec::new()));
            }
            let mut stmt = conn
                .prepare(&format!(
                    "SELECT daemon, holder, (expires_at - {NOW_US}) / 1000 FROM epidemic_daemon
                     WHERE instance <> '' ORDER BY daemon"
                ))
                .map_err(sql_err)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok(LeaseHolder {
                        daemon: r.get(0)?,
                        holder: r.get(1)?,
                        expires_in_ms: r.get(2)?,
                    })
                })
                .map_err(sql_err)?;
            Ok(LeaseState::Holders(
                rows.collect::<Result<_, _>>().map_err(sql_err)?,
            ))
        }
        LeaseRequest::Release { daemon, instance } => {
            conn.execute(
                "DELETE FROM epidemic_daemon WHERE daemon = ?1 AND instance = ?2",
                params![daemon, instance],
            )
            .map_err(sql_err)?;
            Ok(LeaseState::Released)
        }
        LeaseRequest::Claim {
            daemon,
            instance,
            holder,
            ttl_ms,
            take_over,
        } => {
            let ttl_us = (*ttl_ms as i64).saturating_mul(1000);
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(sql_err)?;
            tx.execute(
                "INSERT OR IGNORE INTO epidemic_daemon (daemon, instance, holder, expires_at) VALUES (?1, '', '', 0)",
                params![daemon],
            )
            .map_err(sql_err)?;
            let n = tx
                .execute(
                    &format!(
                        "UPDATE epidemic_daemon SET instance = ?2, holder = ?3, expires_at = {NOW_US} + ?4,
                         renewals = renewals + 1
                         WHERE daemon = ?1 AND (instance = ?2 OR expires_at < {NOW_US} OR instance = ?5)"
                    ),
                    params![daemon, instance, holder, ttl_us, take_over],
                )
                .map_err(sql_err)?;
            let state = if n > 0 {
                LeaseState::Granted
            } else {
                tx.query_row(
                    &format!(
                        "SELECT instance, holder, max(expires_at - {NOW_US}, 0) / 1000, renewals
                         FROM epidemic_daemon WHERE daemon = ?1"
                    ),
                    params![daemon],
                    |r| {
                        Ok(LeaseState::Held {
                            instance: r.get(0)?,
                            holder: r.get(1)?,
                            expires_in_ms: r.get::<_, i64>(2)?.max(0) as u64,
                            renewals: r.get(3)?,
                        })
                    },
                )
                .map_err(sql_err)?
            };
            tx.commit().map_err(sql_err)?;
            Ok(state)
        }
    }
}
