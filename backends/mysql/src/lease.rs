//! The daemon-name lease in `epidemic_daemon`: one live daemon per `daemon.name`,
//! granted, renewed and released atomically by the server's clock (see the SDK's
//! `LeaseRequest`).

use epidemic_plugin_sdk::backend::{BackendError, LeaseHolder, LeaseRequest, LeaseState};
use mysql::prelude::Queryable;
use mysql::Conn;

use crate::consumers::DB_NOW_US;
use crate::error::sql_err;

/// Claim, renew, release or list leases.
pub(crate) fn lease(conn: &mut Conn, req: &LeaseRequest) -> Result<LeaseState, BackendError> {
    match req {
        LeaseRequest::List => {
            let exists: Option<i64> = conn
                .query_first(
                    "SELECT 1 FROM information_schema.TABLES \
                     WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'epidemic_daemon'",
                )
                .map_err(sql_err)?;
            if exists.is_none() {
                return Ok(LeaseState::Holders(Vec::new()));
            }
            let rows: Vec<(String, String, i64)> = conn
                .query(format!(
                    "SELECT daemon, holder, (expires_at - {DB_NOW_US}) DIV 1000 FROM epidemic_daemon \
                     WHERE instance <> '' ORDER BY daemon"
                ))
                .map_err(sql_err)?;
            Ok(LeaseState::Holders(
                rows.into_iter()
                    .map(|(daemon, holder, expires_in_ms)| LeaseHolder {
                        daemon,
                        holder,
                        expires_in_ms,
                    })
                    .collect(),
            ))
        }
        LeaseRequest::Release { daemon, instance } => {
            conn.exec_drop(
                "DELETE FROM epidemic_daemon WHERE daemon = ? AND instance = ?",
                (daemon, instance),
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
            conn.exec_drop(
                "INSERT IGNORE INTO epidemic_daemon (daemon, instance, holder, expires_at) VALUES (?, '', '', 0)",
                (daemon,),
            )
            .map_err(sql_err)?;
            // One statement, so the check and the grant are atomic under the row lock.
            conn.exec_drop(
                format!(
                    "UPDATE epidemic_daemon SET instance = ?, holder = ?, expires_at = {DB_NOW_US} + ?, \
                     renewals = renewals + 1 \
                     WHERE daemon = ? AND (instance = ? OR expires_at < {DB_NOW_US} OR instance = ?)"
                ),
                (instance, holder, ttl_us, daemon, instance, take_over),
            )
            .map_err(sql_err)?;
            if conn.affected_rows() > 0 {
                return Ok(LeaseState::Granted);
            }
            let row: Option<(String, String, i64, i64)> = conn
                .exec_first(
                    format!(
                        "SELECT instance, holder, GREATEST(expires_at - {DB_NOW_US}, 0) DIV 1000, renewals \
                         FROM epidemic_daemon WHERE daemon = ?"
                    ),
                    (daemon,),
                )
                .map_err(sql_err)?;
            match row {
                Some((i, holder, expires_in_ms, renewals)) => Ok(LeaseState::Held {
                    instance: i,
                    holder,
                    expires_in_ms: expires_in_ms.max(0) as u64,
                    renewals,
                }),
                None => Err(BackendError::Other(format!(
                    "the lease row of daemon {daemon} vanished while claiming it"
                ))),
            }
        }
    }
}
