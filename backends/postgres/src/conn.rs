//! Connecting: one session per [`crate::PgBackend`], with the settings every Epidemic
//! session needs whatever the server's, database's or role's defaults, over TLS as the
//! URL's `sslmode` says ([`crate::tls`]) and watched for a dead peer
//! ([`crate::stream`]).

use postgres::config::{SslMode as DriverSslMode, SslNegotiation};
use postgres::{Client, NoTls};

use crate::error::{describe, is_connection_error, PgError};
use crate::options::PgUrl;
use crate::stream::DeadPeerWatch;
use crate::tls::{Attempt, PgConnector, TlsFailure};

/// What every connection sets first, whatever the database's or role's defaults: the
/// reading rule needs each statement to see what committed before it (READ COMMITTED;
/// under SERIALIZABLE our reads would also take part in the writers' serialization
/// checks and could make *their* transactions fail), and install, the cursors and the
/// log are written (a `default_transaction_read_only = on` set for the database must not
/// stop Epidemic). Only these sessions are affected.
const SESSION_SETTINGS: &str = "SET default_transaction_isolation = 'read committed'; \
     SET default_transaction_read_only = off; SET default_transaction_deferrable = off";

/// A new session to `url`, set up. A failure says whether it is a connection problem
/// (retry later) or not (a wrong password, a database that does not exist, a
/// certificate that does not check out).
pub(crate) fn connect(url: &PgUrl, watch: &DeadPeerWatch) -> Result<Client, PgError> {
    let attempts = url.tls.attempts();
    let mut last = None;
    for (i, attempt) in attempts.iter().enumerate() {
        match connect_once(url, *attempt, watch) {
            Ok(client) => return Ok(client),
            Err(e) => {
                // libpq's fallbacks: `prefer` tries plain after a TLS handshake that
                // failed; `allow` tries TLS after a plain connection the server refused
                // (pg_hba.conf's `hostssl`). Network failures are not retried here: the
                // host backs off and reconnects.
                let fall_back = matches!(
                    (attempt, &e),
                    (Attempt::TlsIfOffered, PgError::Tls { .. })
                        | (Attempt::Plain, PgError::Refused { .. })
                );
                last = Some(e);
                if !fall_back || i + 1 == attempts.len() {
                    break;
                }
            }
        }
    }
    Err(last.unwrap_or_else(|| PgError::ConnectionLost("no connection attempt was made".into())))
}

fn connect_once(url: &PgUrl, attempt: Attempt, watch: &DeadPeerWatch) -> Result<Client, PgError> {
    let failed = |e: postgres::Error| match tls_failure(&e) {
        Some(TlsFailure::Io(io)) => PgError::Connect {
            url: url.redacted.clone(),
            reason: io.to_string(),
            connection: true,
        },
        Some(refusal) => PgError::Tls {
            url: url.redacted.clone(),
            reason: format!(
                "{refusal} (sslmode={}, {})",
                url.tls.mode.as_str(),
                url.tls.root_certs_shown()
            ),
        },
        None if refused_session(&e) => PgError::Refused {
            url: url.redacted.clone(),
            reason: describe(&e),
        },
        None => PgError::Connect {
            url: url.redacted.clone(),
            reason: describe(&e),
            connection: is_connection_error(&e),
        },
    };
    let mut client = if url.through_connector {
        let connector =
            PgConnector::new(&url.tls, attempt, watch.clone()).map_err(|e| PgError::Tls {
                url: url.redacted.clone(),
                reason: e.to_string(),
            })?;
        // "Direct" TLS with `require` makes the driver hand the connector every fresh
        // socket; the connector negotiates as `sslmode` says (see `crate::tls`).
        let mut config = url.config.clone();
        config
            .ssl_mode(DriverSslMode::Require)
            .ssl_negotiation(SslNegotiation::Direct);
        config.connect(connector).map_err(failed)?
    } else {
        // A Unix socket: local, so neither TLS (as in libpq) nor a dead path.
        let mut config = url.config.clone();
        config.ssl_mode(DriverSslMode::Disable);
        config.connect(NoTls).map_err(failed)?
    };
    client.batch_execute(SESSION_SETTINGS).map_err(failed)?;
    Ok(client)
}

/// The server refused this session for a reason retrying cannot cure: authentication
/// (SQLSTATE class 28) or a database that does not exist (3D000).
fn refused_session(e: &postgres::Error) -> bool {
    e.code()
        .is_some_and(|c| c.code().starts_with("28") || c.code() == "3D000")
}

/// The connector's own failure, if that is what the driver's error carries.
fn tls_failure(e: &postgres::Error) -> Option<&TlsFailure> {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(f) = s.downcast_ref::<TlsFailure>() {
            return Some(f);
        }
        source = s.source();
    }
    None
}
