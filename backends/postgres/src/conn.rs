//! Connecting: one session per [`crate::PgBackend`], with the settings every Epidemic
//! session needs whatever the server's, database's or role's defaults.

use postgres::{Client, NoTls};

use crate::error::{describe, is_connection_error, PgError};
use crate::options::PgUrl;

/// What every connection sets first, whatever the database's or role's defaults: the
/// reading rule needs each statement to see what committed before it (READ COMMITTED;
/// under SERIALIZABLE our reads would also take part in the writers' serialization
/// checks and could make *their* transactions fail), and install, the cursors and the
/// log are written (a `default_transaction_read_only = on` set for the database must not
/// stop Epidemic). Only these sessions are affected.
const SESSION_SETTINGS: &str = "SET default_transaction_isolation = 'read committed'; \
     SET default_transaction_read_only = off; SET default_transaction_deferrable = off";

/// A new session to `url`, set up. A failure says whether it is a connection problem
/// (retry later) or not (a wrong password, a database that does not exist).
pub(crate) fn connect(url: &PgUrl) -> Result<Client, PgError> {
    let failed = |e: postgres::Error| PgError::Connect {
        url: url.redacted.clone(),
        reason: describe(&e),
        connection: is_connection_error(&e),
    };
    let mut client = url.config.connect(NoTls).map_err(failed)?;
    client.batch_execute(SESSION_SETTINGS).map_err(failed)?;
    Ok(client)
}
