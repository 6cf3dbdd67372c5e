//! Opening a connection with the session settings every reading rule relies on, what
//! the connected server supports ([`ServerInfo`]), and the check that the server is one
//! the rules hold on (not a Galera node, unless the operator accepts the risk).

use std::time::Duration;

use epidemic_plugin_sdk::backend::BackendError;
use mysql::prelude::Queryable;
use mysql::{Conn, OptsBuilder};

use crate::error::{server_code, sql_err};
use crate::options::{MySqlOptions, Target};

/// The session isolation every connection of the backend reads with.
pub(crate) const ISOLATION_SQL: &str = "SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ";

/// Connect to `target` with the session settings below.
pub(crate) fn connect(target: &Target, connect_timeout: Duration) -> Result<Conn, BackendError> {
    let opts = OptsBuilder::from_opts(target.opts.clone())
        .tcp_connect_timeout(Some(connect_timeout))
        // A server that vanished without closing the socket (network loss, host
        // crash) must still surface as an error, not a read that blocks for ever.
        .tcp_keepalive_time_ms(Some(30_000))
        .tcp_keepalive_probe_interval_secs(Some(5))
        .tcp_keepalive_probe_count(Some(4))
        // Each backend instance reads with a handful of fixed statements.
        .stmt_cache_size(16)
        .init(vec![
            // Every read must see what committed before it started: a session left in
            // a transaction by `autocommit = 0` (global default or init_connect) would
            // read one old snapshot for ever.
            "SET autocommit = 1",
            // A server whose default is READ-UNCOMMITTED would show the reader log rows
            // of transactions that are still open and may roll back. REPEATABLE READ,
            // not READ COMMITTED: each autocommit SELECT still reads what committed
            // before it began, `START TRANSACTION WITH CONSISTENT SNAPSHOT` (the gap
            // check) is honoured only there, and the prune DELETE stays loggable
            // under `binlog_format = STATEMENT`. This statement form, unlike the
            // variable (`tx_isolation` before MySQL 8.0 / MariaDB 11.1,
            // `transaction_isolation` after), exists on every version.
            ISOLATION_SQL,
        ]);
    Conn::new(opts).map_err(|e| {
        // Wrong credentials or database name will not heal by retrying: say so at once.
        let config_error = server_code(&e).is_some_and(|c| matches!(c, 1044 | 1045 | 1049));
        match sql_err(e) {
            BackendError::Connection(m) | BackendError::Other(m) if config_error => {
                BackendError::Invalid(format!("cannot connect to {}: {m}", target.shown))
            }
            BackendError::Connection(m) | BackendError::Other(m) => {
                BackendError::Connection(format!("cannot connect to {}: {m}", target.shown))
            }
            invalid => invalid,
        }
    })
}

/// What the connected server supports, from `SELECT VERSION()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ServerInfo {
    pub mariadb: bool,
    pub version: (u32, u32, u32),
}

impl ServerInfo {
    /// `10.11.6-MariaDB-0+deb12u1`, `5.7.44-log`, `8.0.36`, `5.5.5-10.3.39-MariaDB`.
    pub fn parse(version: &str) -> ServerInfo {
        let mariadb = version.contains("MariaDB");
        // MariaDB before 11 sometimes reports a `5.5.5-` prefix for old clients.
        let v = match version.strip_prefix("5.5.5-") {
            Some(rest) if mariadb => rest,
            _ => version,
        };
        let mut nums = v
            .split(|c: char| !c.is_ascii_digit())
            .take(3)
            .map(|n| n.parse::<u32>().unwrap_or(0));
        let version = (
            nums.next().unwrap_or(0),
            nums.next().unwrap_or(0),
            nums.next().unwrap_or(0),
        );
        ServerInfo { mariadb, version }
    }

    pub fn query(conn: &mut Conn) -> Result<ServerInfo, BackendError> {
        let v: Option<String> = conn.query_first("SELECT VERSION()").map_err(sql_err)?;
        Ok(ServerInfo::parse(&v.unwrap_or_default()))
    }

    /// `UTC_TIMESTAMP(6)` exists: MySQL 5.6.4+, MariaDB 5.3+.
    pub fn fractional_seconds(&self) -> bool {
        if self.mariadb {
            self.version >= (5, 3, 0)
        } else {
            self.version >= (5, 6, 4)
        }
    }

    /// The character set that holds every UTF-8 string: `utf8mb4` (MySQL 5.5.3+, MariaDB
    /// 5.5+), else `utf8`, which holds all a server without it can store.
    pub fn utf8(&self) -> &'static str {
        let mb4 = if self.mariadb {
            self.version >= (5, 5, 0)
        } else {
            self.version >= (5, 5, 3)
        };
        if mb4 {
            "utf8mb4"
        } else {
            "utf8"
        }
    }

    /// Several triggers per table, event and timing: MySQL 5.7.2+, MariaDB 10.2.3+.
    pub fn multiple_triggers(&self) -> bool {
        if self.mariadb {
            self.version >= (10, 2, 3)
        } else {
            self.version >= (5, 7, 2)
        }
    }
}

/// Galera (`wsrep_on` is `ON`): refused unless accepted, with one line saying why;
/// accepted, it is still a warning. `wsrep_on` is `None` where the variable does not
/// exist (MySQL), `OFF` on a MariaDB that is not in a cluster.
fn galera_decision(wsrep_on: Option<&str>, allow: bool) -> Result<Option<String>, String> {
    let on = wsrep_on.is_some_and(|v| v.eq_ignore_ascii_case("ON") || v == "1");
    const WHY: &str = "gaps in log ids are judged by this node's INNODB_TRX alone, so a change written on \
                       another node whose transaction is still open there when this node sees a later id is lost";
    match (on, allow) {
        (false, _) => Ok(None),
        (true, false) => Err(format!(
            "this server is a Galera node (wsrep_on = ON): {WHY}; point epidemic at a single-primary server, \
             or set allow_galera = true if every write to the watched tables goes to this node"
        )),
        (true, true) => Ok(Some(format!(
            "allow_galera = true on a Galera node: {WHY}; every write to the watched tables must go to this node"
        ))),
    }
}

/// Check the server is one the reading rule holds on (see [`galera_decision`]); the
/// warning to report if it holds only because the operator said so.
pub(crate) fn check_server(
    conn: &mut Conn,
    options: &MySqlOptions,
) -> Result<Option<String>, BackendError> {
    let row: Option<(String, String)> = conn
        .query_first("SHOW GLOBAL VARIABLES LIKE 'wsrep_on'")
        .map_err(sql_err)?;
    galera_decision(row.as_ref().map(|(_, v)| v.as_str()), options.allow_galera)
        .map_err(BackendError::Invalid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        let m = ServerInfo::parse("10.11.6-MariaDB-0+deb12u1");
        assert_eq!(
            m,
            ServerInfo {
                mariadb: true,
                version: (10, 11, 6)
            }
        );
        assert!(m.fractional_seconds() && m.multiple_triggers());
        let m = ServerInfo::parse("5.5.5-10.1.48-MariaDB");
        assert_eq!(m.version, (10, 1, 48));
        assert!(!m.multiple_triggers());
        let my = ServerInfo::parse("5.0.96-community-log");
        assert_eq!(
            my,
            ServerInfo {
                mariadb: false,
                version: (5, 0, 96)
            }
        );
        assert!(!my.fractional_seconds() && !my.multiple_triggers());
        assert!(ServerInfo::parse("5.6.4").fractional_seconds());
        assert!(ServerInfo::parse("8.0.36").multiple_triggers());
    }

    #[test]
    fn galera_is_refused_unless_accepted() {
        // MySQL has no wsrep_on; a MariaDB outside a cluster says OFF.
        assert_eq!(galera_decision(None, false), Ok(None));
        assert_eq!(galera_decision(Some("OFF"), false), Ok(None));
        assert_eq!(galera_decision(Some("OFF"), true), Ok(None));
        let refused = galera_decision(Some("ON"), false).unwrap_err();
        assert!(
            refused.contains("Galera")
                && refused.contains("allow_galera = true")
                && !refused.contains('\n'),
            "{refused}"
        );
        let accepted = galera_decision(Some("ON"), true).unwrap().unwrap();
        assert!(accepted.contains("must go to this node"), "{accepted}");
        assert!(galera_decision(Some("1"), false).is_err());
    }
}
