//! Driver errors as the SDK's error kinds: the host backs off and reconnects on
//! [`BackendError::Connection`] only, so telling a lost connection from a failed
//! statement is what keeps the daemon from spinning on a bad statement or giving up on
//! a restarting server.

use epidemic_plugin_sdk::backend::BackendError;

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

/// Server error code for an unknown column (`trx_rows_modified` before MySQL 5.5).
pub(crate) const ER_BAD_FIELD_ERROR: u16 = 1054;

/// Map a driver error to the SDK's error kinds.
pub(crate) fn sql_err(e: mysql::Error) -> BackendError {
    match &e {
        // Once connected, a TLS error is the connection's (a corrupted record, a
        // closed session); refusals while connecting are told apart in `conn.rs`.
        mysql::Error::IoError(_) | mysql::Error::CodecError(_) | mysql::Error::TlsError(_) => {
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

/// The server's error code, if the server refused the statement.
pub(crate) fn server_code(e: &mysql::Error) -> Option<u16> {
    match e {
        mysql::Error::MySqlError(m) => Some(m.code),
        _ => None,
    }
}
