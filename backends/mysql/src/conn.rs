//! Opening a connection, telling connection failures from SQL errors, and what the
//! server can do.

use std::time::Duration;

use epidemic_plugin_sdk::backend::BackendError;
use epidemic_plugin_sdk::redact_url;
use mysql::{Conn, Opts, OptsBuilder};

/// Server error codes that mean the connection, not the statement, failed: the host
/// should back off and reconnect.
const CONNECTION_CODES: &[u16] = &[
    1040, // ER_CON_COUNT_ERROR: too many connections
    1053, // ER_SERVER_SHUTDOWN
    1077, // ER_NORMAL_SHUTDOWN
    1078, // ER_GOT_SIGNAL
    1079, // ER_SHUTDOWN_COMPLETE
    1152, // ER_ABORTING_CONNECTION
    1153, // ER_NET_PACKET_TOO_LARGE (the server drops the connection)
    1158, // ER_NET_READ_ERROR
    1159, // ER_NET_READ_INTERRUPTED
    1160, // ER_NET_ERROR_ON_WRITE
    1161, // ER_NET_WRITE_INTERRUPTED
    1927, // ER_CONNECTION_KILLED (MariaDB)
    2002, // CR_CONNECTION_ERROR
    2003, // CR_CONN_HOST_ERROR
    2006, // CR_SERVER_GONE_ERROR
    2013, // CR_SERVER_LOST
    2055, // CR_SERVER_LOST_EXTENDED
    4031, // ER_CLIENT_INTERACTION_TIMEOUT (MySQL 8.0.24+)
];

/// Server error codes for a missing or inaccessible `information_schema.INNODB_TRX`.
pub(crate) const NO_INNODB_TRX_CODES: &[u16] = &[
    1044, // ER_DBACCESS_DENIED_ERROR
    1109, // ER_UNKNOWN_TABLE (before InnoDB plugin 1.0 / MySQL 5.1.38)
    1142, // ER_TABLEACCESS_DENIED_ERROR
    1227, // ER_SPECIFIC_ACCESS_DENIED_ERROR: needs PROCESS
];

/// Map a driver error to the SDK's error kinds.
pub(crate) fn sql_err(e: mysql::Error) -> BackendError {
    match &e {
        mysql::Error::IoError(_) | mysql::Error::CodecError(_) => {
            BackendError::Connection(format!("mysql connection lost: {e}"))
        }
        mysql::Error::DriverError(d) => match d {
            mysql::DriverError::Params(_)
            | mysql::DriverError::MixedParams
            | mysql::DriverError::MismatchedStmtParams(..) => BackendError::Other(e.to_string()),
            _ => BackendError::Connection(format!("mysql connection lost: {e}")),
        },
        mysql::Error::MySqlError(m) if CONNECTION_CODES.contains(&m.code) => {
            BackendError::Connection(format!("mysql connection lost: {e}"))
        }
        mysql::Error::UrlError(_) => BackendError::Invalid(e.to_string()),
        _ => BackendError::Other(e.to_string()),
    }
}

/// Like [`sql_err`], naming the statement when the statement itself failed.
pub(crate) fn stmt_err(e: mysql::Error, stmt: &str) -> BackendError {
    match sql_err(e) {
        BackendError::Other(m) => BackendError::Other(format!("{m} in: {stmt}")),
        other => other,
    }
}

pub(crate) fn server_code(e: &mysql::Error) -> Option<u16> {
    match e {
        mysql::Error::MySqlError(m) => Some(m.code),
        _ => None,
    }
}

/// The session isolation every connection of the backend reads with.
pub(crate) const ISOLATION_SQL: &str = "SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ";

/// Parsed `mysql://` (or `mariadb://`) URL: driver options and the database it names.
#[derive(Clone)]
pub(crate) struct Target {
    opts: Opts,
    /// For messages: the URL with its password hidden.
    pub shown: String,
}

impl Target {
    pub fn parse(url: &str, connect_timeout: Duration) -> Result<Target, BackendError> {
        let shown = redact_url(url);
        // The driver only knows `mysql://`; `mariadb://` means the same server protocol.
        let driver_url = match url.strip_prefix("mariadb://") {
            Some(rest) => format!("mysql://{rest}"),
            None => url.to_owned(),
        };
        if !driver_url.starts_with("mysql://") {
            return Err(BackendError::Invalid(format!(
                "not a mysql URL: {shown} (expected mysql://USER:PASSWORD@HOST:PORT/DATABASE)"
            )));
        }
        // The driver's URL errors never contain the password, but say which URL anyway.
        let opts = Opts::from_url(&driver_url)
            .map_err(|e| BackendError::Invalid(format!("bad database URL {shown}: {e}")))?;
        if opts.get_db_name().unwrap_or_default().is_empty() {
            return Err(BackendError::Invalid(format!(
                "database URL {shown} names no database (mysql://USER@HOST/DATABASE)"
            )));
        }
        let opts = OptsBuilder::from_opts(opts)
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
        Ok(Target {
            opts: opts.into(),
            shown,
        })
    }

    pub fn connect(&self) -> Result<Conn, BackendError> {
        Conn::new(self.opts.clone()).map_err(|e| {
            // Wrong credentials or database name will not heal by retrying: say so at once.
            let config_error = server_code(&e).is_some_and(|c| matches!(c, 1044 | 1045 | 1049));
            match sql_err(e) {
                BackendError::Connection(m) | BackendError::Other(m) if config_error => {
                    BackendError::Invalid(format!("cannot connect to {}: {m}", self.shown))
                }
                BackendError::Connection(m) | BackendError::Other(m) => {
                    BackendError::Connection(format!("cannot connect to {}: {m}", self.shown))
                }
                invalid => invalid,
            }
        })
    }
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
        use mysql::prelude::Queryable;
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

    /// Several triggers per table, event and timing: MySQL 5.7.2+, MariaDB 10.2.3+.
    pub fn multiple_triggers(&self) -> bool {
        if self.mariadb {
            self.version >= (10, 2, 3)
        } else {
            self.version >= (5, 7, 2)
        }
    }
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
    fn urls_are_checked_and_passwords_hidden() {
        let t = Duration::from_secs(1);
        let err = Target::parse("postgres://a:secret@h/db", t)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("not a mysql URL") && !err.contains("secret"),
            "{err}"
        );
        let err = Target::parse("mysql://a:secret@h/", t)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("names no database") && !err.contains("secret"),
            "{err}"
        );
        let err = Target::parse("mysql://a:secret@h/db?bogus=1", t)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("bogus") && !err.contains("secret"), "{err}");
        assert!(Target::parse("mariadb://a:secret@h:3307/db", t).is_ok());
    }
}
