//! Opening a connection with the session settings every reading rule relies on, over
//! TLS as the URL's `ssl-mode` says and with the dead-peer limits of
//! `dead_peer_timeout_ms`, what the connected server supports ([`ServerInfo`]), and the
//! check that the server is one the rules hold on (not a Galera node, unless the
//! operator accepts the risk).
//!
//! # TLS
//!
//! The `mysql` crate's TLS, built on rustls with the `ring` provider (`rustls-tls-ring`:
//! no OpenSSL, the same stack as the PostgreSQL backend's). The crate trusts the CAs in
//! `ssl-ca` *and* the public web roots it ships (webpki-roots); `verify_identity` also
//! checks the host name. A refused handshake, a certificate that does not check out or a
//! server without TLS under `required` is a configuration error, one line naming the URL
//! (password hidden): retrying cannot fix it. From `required` on, the driver's move of a
//! connection to a local server onto its Unix socket (`prefer_socket`) is off, since a
//! socket has no TLS. `preferred` falls back to a plain
//! connection when the server offers no TLS or the handshake fails, as the `mysql`
//! client does for a server without TLS.
//!
//! # Dead connections
//!
//! A path that goes silent without closing (an expired NAT entry, a frozen proxy) would
//! leave a read blocked for ever. Every socket gets a read and write timeout of
//! `dead_peer_timeout_ms` (a statement the server leaves unanswered that long fails as a
//! lost connection, and the host reconnects), `TCP_USER_TIMEOUT` of the same, and TCP
//! keepalives probing after a third of it. Install and uninstall, whose DDL may wait for
//! metadata locks behind the application's transactions, run on a connection of their own
//! without the read timeout ([`connect_patient`]): cutting them would leave the statement
//! queued for the lock, blocking the table's writers, and try again for ever.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::time::Duration;

use epidemic_plugin_sdk::backend::BackendError;
use mysql::prelude::Queryable;
use mysql::{ClientIdentity, Conn, OptsBuilder, SslOpts};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::{server_code, sql_err};
use crate::options::{MySqlOptions, SslMode, Target};

/// The session isolation every connection of the backend reads with.
pub(crate) const ISOLATION_SQL: &str = "SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ";

/// Connect to `target` with the session settings below.
pub(crate) fn connect(target: &Target, options: &MySqlOptions) -> Result<Conn, BackendError> {
    connect_with(target, options, true)
}

/// Like [`connect`], with no read timeout: for DDL that may wait for locks.
pub(crate) fn connect_patient(
    target: &Target,
    options: &MySqlOptions,
) -> Result<Conn, BackendError> {
    connect_with(target, options, false)
}

/// How one attempt treats TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attempt {
    Plain,
    /// TLS; `fallback`: a plain attempt follows if this one cannot agree on TLS.
    Tls {
        fallback: bool,
    },
}

fn connect_with(
    target: &Target,
    options: &MySqlOptions,
    read_timeout: bool,
) -> Result<Conn, BackendError> {
    let attempts: &[Attempt] = match target.tls.mode {
        SslMode::Disabled => &[Attempt::Plain],
        SslMode::Preferred => &[Attempt::Tls { fallback: true }, Attempt::Plain],
        _ => &[Attempt::Tls { fallback: false }],
    };
    let mut last = None;
    for attempt in attempts {
        match connect_once(target, options, *attempt, read_timeout) {
            Ok(conn) => return Ok(conn),
            Err(Failure::NoTls(_)) if *attempt == (Attempt::Tls { fallback: true }) => continue,
            Err(failure) => {
                last = Some(failure.into_error(target));
                break;
            }
        }
    }
    Err(last
        .unwrap_or_else(|| BackendError::Connection(format!("cannot connect to {}", target.shown))))
}

/// Why one attempt failed.
enum Failure {
    /// TLS could not be agreed on (none offered, handshake refused, certificate not
    /// accepted): configuration, unless a plain attempt follows.
    NoTls(String),
    /// The driver's error; `plain`: the attempt had no TLS.
    Driver {
        error: mysql::Error,
        plain: bool,
    },
    Other(BackendError),
}

impl Failure {
    fn into_error(self, target: &Target) -> BackendError {
        match self {
            Failure::NoTls(reason) => BackendError::Invalid(format!(
                "cannot connect to {}: {reason} (ssl-mode={})",
                target.shown,
                target.tls.mode.as_str()
            )),
            Failure::Other(e) => e,
            Failure::Driver { error: e, plain } => {
                // Wrong credentials or database name will not heal by retrying: say so
                // at once. So do servers that refuse a plain connection
                // (`require_secure_transport`: 3159 on MySQL, 1045 with a message on
                // MariaDB).
                let code = server_code(&e);
                let config_error = code.is_some_and(|c| matches!(c, 1044 | 1045 | 1049 | 3159));
                // MariaDB hides why it refused a plain connection under
                // `require_secure_transport`: it says "Access denied".
                let hint = if plain && code == Some(1045) {
                    format!(
                        "; the connection was not encrypted (ssl-mode={}), and a server that requires \
                         secure transport refuses a plain connection this way",
                        target.tls.mode.as_str()
                    )
                } else {
                    String::new()
                };
                match sql_err(e) {
                    BackendError::Connection(m) | BackendError::Other(m) if config_error => {
                        BackendError::Invalid(format!(
                            "cannot connect to {}: {m}{hint}",
                            target.shown
                        ))
                    }
                    BackendError::Connection(m) | BackendError::Other(m) => {
                        BackendError::Connection(format!("cannot connect to {}: {m}", target.shown))
                    }
                    invalid => invalid,
                }
            }
        }
    }
}

fn connect_once(
    target: &Target,
    options: &MySqlOptions,
    attempt: Attempt,
    read_timeout: bool,
) -> Result<Conn, Failure> {
    let mut opts = OptsBuilder::from_opts(target.opts.clone())
        .tcp_connect_timeout(Some(options.connect_timeout()))
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
    if let Some(limit) = options.dead_peer_timeout() {
        let ms = u32::try_from(limit.as_millis()).unwrap_or(u32::MAX);
        let secs = |d: Duration| u32::try_from(d.as_secs().max(1)).unwrap_or(u32::MAX);
        opts = opts
            .write_timeout(Some(limit))
            .tcp_user_timeout_ms(Some(ms))
            // A silent path found within the limit even while idle: the first probe
            // after a third of it, then three a ninth of it apart.
            .tcp_keepalive_time_ms(Some(ms / 3))
            .tcp_keepalive_probe_interval_secs(Some(secs(limit / 9)))
            .tcp_keepalive_probe_count(Some(3));
        if read_timeout {
            opts = opts.read_timeout(Some(limit));
        }
    }
    if attempt == (Attempt::Tls { fallback: false }) {
        // The driver moves a connection to a local server over to its Unix socket
        // (`prefer_socket`), which never has TLS: not when the URL asks for TLS.
        opts = opts.prefer_socket(false);
    }
    if let Attempt::Tls { fallback } = attempt {
        // The driver builds its TLS configuration with rustls' process-wide default
        // provider, which rustls cannot choose by itself if another crate of the build
        // enables a second one (aws-lc-rs): name ring, once per library. An error means
        // one is installed already.
        #[allow(deprecated)]
        let _ = rustls::crypto::ring::default_provider().install_default();
        opts = opts.ssl_opts(Some(ssl_opts(target, fallback).map_err(Failure::Other)?));
    }
    // The driver has panicked on TLS options before (a build without a TLS feature): a
    // panic in it is an error here, never the daemon's end.
    let connected = catch_unwind(AssertUnwindSafe(|| Conn::new(opts))).map_err(|panic| {
        let what = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("a panic");
        Failure::Other(BackendError::Other(format!(
            "cannot connect to {}: the mysql driver failed: {what}",
            target.shown
        )))
    })?;
    connected.map_err(|e| match tls_refusal(&e) {
        Some(reason) if attempt != Attempt::Plain => Failure::NoTls(reason),
        _ => Failure::Driver {
            error: e,
            plain: attempt == Attempt::Plain,
        },
    })
}

/// The driver's TLS settings for the URL's mode. Certificate files are checked here,
/// at every connection, so a missing or unreadable one is a configuration error that
/// names the parameter (the driver would report a bare "No such file").
fn ssl_opts(target: &Target, unverified: bool) -> Result<SslOpts, BackendError> {
    let tls = &target.tls;
    let bad = |e: String| BackendError::Invalid(format!("cannot connect to {}: {e}", target.shown));
    let mut ssl = SslOpts::default();
    if let Some(ca) = &tls.ca {
        check_certs(ca, "ssl-ca").map_err(bad)?;
        ssl = ssl.with_root_cert_path(Some(ca.clone()));
    }
    if let Some((cert, key)) = &tls.client_cert {
        check_certs(cert, "ssl-cert").map_err(bad)?;
        PrivateKeyDer::from_pem_file(key).map_err(|e| {
            // The file is named, its contents never shown.
            bad(format!(
                "ssl-key={}: cannot read a private key (PEM): {e}",
                key.display()
            ))
        })?;
        ssl = ssl.with_client_identity(Some(ClientIdentity::new(cert.clone(), key.clone())));
    }
    let check_chain = match tls.mode {
        SslMode::VerifyCa | SslMode::VerifyIdentity => true,
        SslMode::Required => tls.ca.is_some(),
        SslMode::Disabled | SslMode::Preferred => false,
    };
    Ok(ssl
        .with_danger_accept_invalid_certs(unverified || !check_chain)
        .with_danger_skip_domain_validation(tls.mode != SslMode::VerifyIdentity))
}

fn check_certs(path: &Path, key: &str) -> Result<(), String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{key}={}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{key}={}: no certificate (PEM) in the file",
            path.display()
        ));
    }
    Ok(())
}

/// Why TLS could not be agreed on, if that is what the driver's error says.
fn tls_refusal(e: &mysql::Error) -> Option<String> {
    match e {
        mysql::Error::DriverError(mysql::DriverError::TlsNotSupported) => {
            Some("the server does not accept TLS connections".into())
        }
        mysql::Error::TlsError(t) => Some(format!("TLS: {t}")),
        // rustls reports a refused handshake as an io::Error carrying its error, which
        // the driver passes on as such or inside its packet codec's error.
        mysql::Error::IoError(io) => handshake_refusal(io),
        mysql::Error::CodecError(codec) => std::error::Error::source(codec)
            .and_then(|s| s.downcast_ref::<std::io::Error>())
            .and_then(handshake_refusal),
        _ => None,
    }
}

fn handshake_refusal(io: &std::io::Error) -> Option<String> {
    io.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .map(|r| format!("TLS handshake failed: {}", describe_rustls(r)))
}

/// A rustls error in words an operator can act on.
fn describe_rustls(e: &rustls::Error) -> String {
    use rustls::{AlertDescription as Alert, CertificateError as Cert};
    match e {
        rustls::Error::InvalidCertificate(Cert::UnknownIssuer) => {
            "the server's certificate is not signed by a CA in ssl-ca".into()
        }
        rustls::Error::InvalidCertificate(Cert::NotValidForName | Cert::NotValidForNameContext { .. }) => {
            "the server's certificate is not valid for the host name in the URL (verify_identity checks it; verify_ca does not)".into()
        }
        rustls::Error::InvalidCertificate(Cert::Expired | Cert::ExpiredContext { .. }) => {
            "the server's certificate has expired".into()
        }
        rustls::Error::AlertReceived(Alert::CertificateRequired | Alert::BadCertificate) => {
            format!("the server refused the client certificate (ssl-cert, ssl-key): {e}")
        }
        other => other.to_string(),
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
