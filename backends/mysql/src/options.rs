//! The `[database]` options of the MySQL backend and the `mysql://` / `mariadb://` URL:
//! everything the operator configures, checked before a connection is opened, so a typo
//! is one line naming the key instead of a surprise later.
//!
//! TLS is set in the URL with the MySQL client's names, as sqlx spells them:
//! `ssl-mode` (`disabled`, `preferred` — the default, as in the `mysql` client —,
//! `required`, `verify_ca`, `verify_identity`; any case), `ssl-ca` (a PEM file of CA
//! certificates), `ssl-cert` and `ssl-key` (a client certificate and its key). See
//! [`MySqlTls`].

use std::path::PathBuf;
use std::time::Duration;

use epidemic_plugin_sdk::backend::linger::linger_option;
use epidemic_plugin_sdk::backend::{kit, BackendError};
use epidemic_plugin_sdk::redact_url;
use mysql::Opts;
use serde::Deserialize;

/// How dead gaps are recognised (option `gap_detection`; see `gap_judge.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum GapDetection {
    /// INNODB_TRX where readable, else the timeout.
    Auto,
    /// INNODB_TRX; refuse to start without it.
    InnodbTrx,
    /// Only the timeout (for servers where INNODB_TRX is costly to read).
    Timeout,
}

/// `[database]` options for the MySQL backend.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct MySqlOptions {
    /// How often an idle reader looks for new log rows: the slowest poll.
    pub poll_interval_ms: u64,
    /// The fastest poll, right after the reader last found changes; the interval then
    /// grows with the quiet time up to `poll_interval_ms` (see `wake.rs`).
    pub poll_min_ms: u64,
    pub gap_detection: GapDetection,
    /// How long a gap may stay unfilled before it counts as rolled back, when
    /// INNODB_TRX cannot tell.
    pub gap_timeout_ms: u64,
    /// How often INNODB_TRX is read while there are gaps.
    pub gap_check_ms: u64,
    /// Most gap ranges one statement re-reads; with more, a read takes several
    /// statements and `status` warns.
    pub max_gap_ranges: usize,
    /// Rows deleted per statement when pruning, so writers never wait long.
    pub prune_chunk: u32,
    pub connect_timeout_ms: u64,
    /// Run on a Galera node although its gaps are judged by this node alone.
    pub allow_galera: bool,
    /// How long the server may leave a statement unanswered before the connection is
    /// taken for dead; also drives TCP keepalives and `TCP_USER_TIMEOUT`. 0: off.
    pub dead_peer_timeout_ms: u64,
    /// How long a reader behind a dense stream lets changes gather between two reads
    /// (the SDK's `backend::linger`); 0: read again at once.
    pub linger_ms: Option<u64>,
}

impl Default for MySqlOptions {
    fn default() -> Self {
        MySqlOptions {
            poll_interval_ms: 50,
            poll_min_ms: 1,
            gap_detection: GapDetection::Auto,
            gap_timeout_ms: 60_000,
            gap_check_ms: 250,
            max_gap_ranges: 10_000,
            prune_chunk: 10_000,
            connect_timeout_ms: 10_000,
            allow_galera: false,
            dead_peer_timeout_ms: 30_000,
            linger_ms: None,
        }
    }
}

impl MySqlOptions {
    /// The options from the `[database]` table minus `url`, as the host passes them.
    pub fn parse(options: &serde_json::Value) -> Result<MySqlOptions, BackendError> {
        let options: MySqlOptions = serde_json::from_value(options.clone())
            .map_err(|e| BackendError::Invalid(format!("[database] options for mysql: {e}")))?;
        if (1..1000).contains(&options.dead_peer_timeout_ms) {
            return Err(BackendError::Invalid(format!(
                "[database] options for mysql: dead_peer_timeout_ms must be 0 (off) or at least 1000, not {}",
                options.dead_peer_timeout_ms
            )));
        }
        options.linger()?;
        if options.poll_min_ms == 0 || options.poll_min_ms > options.poll_interval_ms.max(1) {
            return Err(BackendError::Invalid(format!(
                "[database] options for mysql: poll_min_ms must be at least 1 and at most poll_interval_ms ({}), not {}",
                options.poll_interval_ms.max(1),
                options.poll_min_ms
            )));
        }
        Ok(options)
    }

    /// `linger_ms`, checked: the default when unset.
    pub fn linger(&self) -> Result<Duration, BackendError> {
        linger_option(self.linger_ms)
            .map_err(|e| BackendError::Invalid(format!("[database] options for mysql: {e}")))
    }

    /// The poll's bounds: fastest right after activity, slowest when idle.
    pub fn poll_bounds(&self) -> (Duration, Duration) {
        let slow = Duration::from_millis(self.poll_interval_ms.max(1));
        (
            Duration::from_millis(self.poll_min_ms.max(1)).min(slow),
            slow,
        )
    }

    /// `None` when switched off.
    pub fn dead_peer_timeout(&self) -> Option<Duration> {
        (self.dead_peer_timeout_ms > 0).then(|| Duration::from_millis(self.dead_peer_timeout_ms))
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms.max(1))
    }
}

/// The URL's `ssl-mode` (the MySQL client's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SslMode {
    Disabled,
    /// TLS when the server offers it, certificate not checked; plain otherwise, or when
    /// the handshake fails.
    Preferred,
    /// TLS or nothing; the certificate is checked against `ssl-ca` only if one is given.
    Required,
    /// TLS, the certificate signed by a CA in `ssl-ca`; the host name is not checked.
    VerifyCa,
    /// TLS, the certificate signed by a CA in `ssl-ca` and valid for the URL's host.
    VerifyIdentity,
}

impl SslMode {
    fn parse(value: &str) -> Result<SslMode, String> {
        Ok(match value.to_ascii_lowercase().as_str() {
            "disabled" => SslMode::Disabled,
            "preferred" => SslMode::Preferred,
            "required" => SslMode::Required,
            "verify_ca" => SslMode::VerifyCa,
            "verify_identity" => SslMode::VerifyIdentity,
            _ => {
                return Err(format!(
                    "ssl-mode must be disabled, preferred, required, verify_ca or verify_identity, not {value:?}"
                ))
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disabled => "disabled",
            SslMode::Preferred => "preferred",
            SslMode::Required => "required",
            SslMode::VerifyCa => "verify_ca",
            SslMode::VerifyIdentity => "verify_identity",
        }
    }
}

/// The URL's TLS parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MySqlTls {
    pub mode: SslMode,
    /// `ssl-ca`: PEM file of the CA certificates the server's must chain to.
    pub ca: Option<PathBuf>,
    /// `ssl-cert` and `ssl-key`: the client certificate chain and its private key (PEM).
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// The URL parameters this backend reads itself, taken out before the driver parses the
/// rest.
const OWN_PARAMS: [&str; 4] = ["ssl-mode", "ssl-ca", "ssl-cert", "ssl-key"];

/// The driver's own TLS parameters, refused in favour of ours (one way to say it, and
/// none that turns checks off behind the operator's back).
const DRIVER_TLS_PARAMS: [(&str, &str); 8] = [
    ("require_ssl", "ssl-mode=required"),
    ("verify_ca", "ssl-mode=verify_ca"),
    ("verify_identity", "ssl-mode=verify_identity"),
    ("root_cert_path", "ssl-ca"),
    ("cert_chain_path", "ssl-cert"),
    ("priv_key_path", "ssl-key"),
    ("danger_accept_invalid_certs", "ssl-mode=required"),
    ("danger_skip_domain_validation", "ssl-mode=verify_ca"),
];

impl MySqlTls {
    fn from_params(params: &[(String, String)]) -> Result<MySqlTls, String> {
        let mut mode = None;
        let (mut ca, mut cert, mut key) = (None, None, None);
        for (k, v) in params {
            match k.as_str() {
                "ssl-mode" => mode = Some(SslMode::parse(v)?),
                "ssl-ca" => ca = Some(PathBuf::from(v)),
                "ssl-cert" => cert = Some(PathBuf::from(v)),
                "ssl-key" => key = Some(PathBuf::from(v)),
                _ => {}
            }
        }
        // As in the mysql client: a CA given without a mode means verify_ca.
        let mode = match (mode, &ca) {
            (Some(m), _) => m,
            (None, Some(_)) => SslMode::VerifyCa,
            (None, None) => SslMode::Preferred,
        };
        if matches!(mode, SslMode::VerifyCa | SslMode::VerifyIdentity) && ca.is_none() {
            return Err(format!(
                "ssl-mode={} needs ssl-ca=FILE (the CA certificates, PEM)",
                mode.as_str()
            ));
        }
        let client_cert = match (cert, key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => return Err("ssl-cert and ssl-key go together: give both, or neither".into()),
        };
        Ok(MySqlTls {
            mode,
            ca,
            client_cert,
        })
    }
}

/// A parsed `mysql://` (or `mariadb://`) URL: the driver's options, the TLS parameters,
/// and the URL as it may be shown (password hidden).
#[derive(Clone)]
pub(crate) struct Target {
    pub opts: Opts,
    pub tls: MySqlTls,
    /// For messages: the URL with its password hidden.
    pub shown: String,
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, BackendError> {
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
        let bad = |e: String| BackendError::Invalid(format!("bad database URL {shown}: {e}"));
        let (driver_url, own) = split_params(&driver_url).map_err(bad)?;
        let tls = MySqlTls::from_params(&own).map_err(bad)?;
        // The driver's URL errors never contain the password, but say which URL anyway.
        let opts = Opts::from_url(&driver_url)
            .map_err(|e| BackendError::Invalid(format!("bad database URL {shown}: {e}")))?;
        if opts.get_db_name().unwrap_or_default().is_empty() {
            return Err(BackendError::Invalid(format!(
                "database URL {shown} names no database (mysql://USER@HOST/DATABASE)"
            )));
        }
        Ok(Target { opts, tls, shown })
    }
}

/// Take [`OWN_PARAMS`] out of the URL's query; refuse the driver's TLS parameters.
fn split_params(url: &str) -> Result<(String, Vec<(String, String)>), String> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_owned(), Vec::new()));
    };
    let mut rest = Vec::new();
    let mut own = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if let Some((_, ours)) = DRIVER_TLS_PARAMS.iter().find(|(theirs, _)| *theirs == k) {
            return Err(format!("use {ours} instead of {k}"));
        }
        if OWN_PARAMS.contains(&k) {
            own.push((k.to_owned(), kit::percent_decode(v)?));
        } else {
            rest.push(pair);
        }
    }
    let url = if rest.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    Ok((url, own))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_have_defaults_and_refuse_unknown_keys() {
        let o = MySqlOptions::parse(&serde_json::json!({})).unwrap();
        assert_eq!(o.poll_interval_ms, 50);
        assert_eq!(o.gap_detection, GapDetection::Auto);
        assert!(!o.allow_galera);
        let o = MySqlOptions::parse(&serde_json::json!({"allow_galera": true})).unwrap();
        assert!(o.allow_galera);
        assert!(MySqlOptions::parse(&serde_json::json!({"allow_galera": "yes"})).is_err());
        let o = MySqlOptions::parse(
            &serde_json::json!({"gap_detection": "timeout", "gap_timeout_ms": 5}),
        )
        .unwrap();
        assert_eq!(o.gap_detection, GapDetection::Timeout);
        let err = MySqlOptions::parse(&serde_json::json!({"pol_interval_ms": 5}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("pol_interval_ms"), "{err}");
    }

    #[test]
    fn linger_defaults_to_20_ms_and_is_bounded() {
        let o = MySqlOptions::parse(&serde_json::json!({})).unwrap();
        assert_eq!(o.linger().unwrap(), Duration::from_millis(20));
        let o = MySqlOptions::parse(&serde_json::json!({"linger_ms": 0})).unwrap();
        assert_eq!(o.linger().unwrap(), Duration::ZERO);
        let err = MySqlOptions::parse(&serde_json::json!({"linger_ms": 5000}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("linger_ms") && err.contains("mysql"), "{err}");
    }

    #[test]
    fn the_poll_bounds_are_checked() {
        let o = MySqlOptions::parse(&serde_json::json!({})).unwrap();
        assert_eq!(
            o.poll_bounds(),
            (Duration::from_millis(1), Duration::from_millis(50))
        );
        let o = MySqlOptions::parse(&serde_json::json!({"poll_min_ms": 50})).unwrap();
        assert_eq!(
            o.poll_bounds(),
            (Duration::from_millis(50), Duration::from_millis(50))
        );
        for bad in [
            serde_json::json!({"poll_min_ms": 0}),
            serde_json::json!({"poll_min_ms": 60}),
            serde_json::json!({"poll_interval_ms": 5, "poll_min_ms": 10}),
        ] {
            let err = MySqlOptions::parse(&bad).unwrap_err().to_string();
            assert!(err.contains("poll_min_ms"), "{err}");
        }
    }

    #[test]
    fn urls_are_checked_and_passwords_hidden() {
        let err = Target::parse("postgres://a:secret@h/db")
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("not a mysql URL") && !err.contains("secret"),
            "{err}"
        );
        let err = Target::parse("mysql://a:secret@h/")
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("names no database") && !err.contains("secret"),
            "{err}"
        );
        let err = Target::parse("mysql://a:secret@h/db?bogus=1")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("bogus") && !err.contains("secret"), "{err}");
        assert!(Target::parse("mariadb://a:secret@h:3307/db").is_ok());
    }

    #[test]
    fn tls_parameters_have_the_mysql_clients_names() {
        let t = Target::parse("mysql://a:secret@h/db").unwrap();
        assert_eq!(t.tls.mode, SslMode::Preferred);
        let t = Target::parse(
            "mysql://a:secret@h/db?ssl-mode=VERIFY_IDENTITY&ssl-ca=%2Fetc%2Fca.pem&ssl-cert=/c.pem&ssl-key=/k.pem&prefer_socket=false",
        )
        .unwrap();
        assert_eq!(t.tls.mode, SslMode::VerifyIdentity);
        assert_eq!(t.tls.ca, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(
            t.tls.client_cert,
            Some((PathBuf::from("/c.pem"), PathBuf::from("/k.pem")))
        );
        assert!(!t.opts.get_prefer_socket());
        // A CA alone means verify_ca, as in the mysql client.
        let t = Target::parse("mysql://a@h/db?ssl-ca=/ca.pem").unwrap();
        assert_eq!(t.tls.mode, SslMode::VerifyCa);
        for (url, expect) in [
            (
                "mysql://a:secret@h/db?ssl-mode=verify-full",
                "ssl-mode must be",
            ),
            ("mysql://a:secret@h/db?ssl-mode=verify_ca", "needs ssl-ca"),
            ("mysql://a:secret@h/db?ssl-cert=/c.pem", "ssl-key"),
            (
                "mysql://a:secret@h/db?root_cert_path=/ca.pem",
                "use ssl-ca instead",
            ),
            (
                "mysql://a:secret@h/db?danger_accept_invalid_certs=true",
                "ssl-mode=required",
            ),
        ] {
            let e = Target::parse(url).err().unwrap().to_string();
            assert!(e.contains(expect) && !e.contains("secret"), "{url}: {e}");
        }
        let e = MySqlOptions::parse(&serde_json::json!({"dead_peer_timeout_ms": 5})).unwrap_err();
        assert!(e.to_string().contains("dead_peer_timeout_ms"), "{e}");
        let o = MySqlOptions::parse(&serde_json::json!({})).unwrap();
        assert_eq!(o.dead_peer_timeout(), Some(Duration::from_secs(30)));
    }
}
