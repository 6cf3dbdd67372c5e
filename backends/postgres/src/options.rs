//! The backend's options (the config's `[database]` table minus `url`) and the URL:
//! parsing it with Epidemic's defaults ([`PgUrl`]) and keeping passwords out of messages
//! ([`redact_url`]).

use std::path::PathBuf;
use std::time::Duration;

use epidemic_plugin_sdk::backend::kit;
use epidemic_plugin_sdk::backend::linger::linger_option;
use serde::Deserialize;

use crate::error::{self, PgError};
use crate::ident::Ident;
use crate::tls::{Attempt, PgTlsSettings, RootCerts, SslMode};

/// Connecting gives up after this long unless the URL sets `connect_timeout`, so that a
/// reconnect attempt during an outage does not hang the host.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The URL parameters Epidemic reads itself (libpq's TLS parameters, which the driver
/// does not know or knows only in part), taken out before the driver parses the rest.
const OWN_PARAMS: [&str; 5] = [
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "sslnegotiation",
];

/// URL parameters that tune TCP keepalives; when the URL sets one, `dead_peer_timeout_ms`
/// leaves them all as the URL says.
const KEEPALIVE_PARAMS: [&str; 5] = [
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_retries",
    "tcp_user_timeout",
];

/// Where to connect: the URL parsed, with Epidemic's defaults for what it leaves out.
#[derive(Debug, Clone)]
pub struct PgUrl {
    pub config: postgres::Config,
    /// For messages: the URL with its password replaced.
    pub redacted: String,
    pub tls: PgTlsSettings,
    /// The connection goes to a host name over TCP, so it passes through
    /// [`crate::tls::PgConnector`] (TLS and the dead-peer watch). A Unix socket (local:
    /// no TLS, as in libpq, and no dead path) or a bare `hostaddr` does not.
    pub through_connector: bool,
}

impl PgUrl {
    /// Parse a `postgres://` URL or a libpq key-value string. Unless the URL says
    /// otherwise, connecting times out after ten seconds, the session is named
    /// `epidemic` (in `pg_stat_activity`), and TCP keepalives and `tcp_user_timeout` are
    /// set from `dead_peer` (see [`keepalives_for`]).
    pub fn parse(url: &str, dead_peer: Option<Duration>) -> Result<PgUrl, PgError> {
        let redacted = redact_url(url);
        let invalid = |reason: String| PgError::InvalidUrl {
            url: redacted.clone(),
            reason,
        };
        let split = split_params(url).map_err(invalid)?;
        let tls = tls_settings(&split.own).map_err(invalid)?;
        let mut config: postgres::Config =
            split
                .rest
                .parse()
                .map_err(|e: postgres::Error| PgError::InvalidUrl {
                    url: redacted.clone(),
                    reason: error::describe(&e),
                })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(DEFAULT_CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("epidemic");
        }
        let tuned = split
            .keys
            .iter()
            .any(|k| KEEPALIVE_PARAMS.contains(&k.as_str()));
        if let (Some(limit), false) = (dead_peer, tuned) {
            let k = keepalives_for(limit);
            config
                .keepalives(true)
                .keepalives_idle(k.idle)
                .keepalives_interval(k.interval)
                .keepalives_retries(k.retries)
                .tcp_user_timeout(limit);
        }
        use postgres::config::Host;
        let hosts = config.get_hosts();
        let tcp = hosts.iter().filter(|h| matches!(h, Host::Tcp(_))).count();
        if tcp > 0 && tcp < hosts.len() {
            return Err(invalid(
                "a host list that mixes TCP hosts and Unix sockets is not supported".into(),
            ));
        }
        let through_connector = tcp > 0;
        if !through_connector && tls.attempts() == [Attempt::Tls] && hosts.is_empty() {
            return Err(invalid(format!(
                "sslmode={} needs a host name (host=) to check the certificate against, not only hostaddr=",
                tls.mode.as_str()
            )));
        }
        Ok(PgUrl {
            config,
            redacted,
            tls,
            through_connector,
        })
    }
}

/// TCP keepalive settings that find a silent path within `limit`: the first probe after
/// a third of it without traffic, then three probes a ninth of it apart (whole seconds,
/// at least one: the kernel counts in seconds).
pub(crate) struct Keepalives {
    pub idle: Duration,
    pub interval: Duration,
    pub retries: u32,
}

pub(crate) fn keepalives_for(limit: Duration) -> Keepalives {
    let secs = |d: Duration| Duration::from_secs(d.as_secs().max(1));
    Keepalives {
        idle: secs(limit / 3),
        interval: secs(limit / 9),
        retries: 3,
    }
}

/// A URL split into Epidemic's own parameters and the rest, for the driver.
struct SplitUrl {
    rest: String,
    own: Vec<(String, String)>,
    /// Every parameter name the URL has.
    keys: Vec<String>,
}

/// Take [`OWN_PARAMS`] out of a URL's query (`postgres://h/db?sslmode=verify-full`) or a
/// key-value string (`host=h sslmode=verify-full`).
fn split_params(url: &str) -> Result<SplitUrl, String> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let (base, query) = match url.split_once('?') {
            Some((b, q)) => (b, q),
            None => (url, ""),
        };
        let mut rest = Vec::new();
        let mut own = Vec::new();
        let mut keys = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let key = kit::percent_decode(k)?;
            keys.push(key.clone());
            if OWN_PARAMS.contains(&key.as_str()) {
                own.push((key, kit::percent_decode(v)?));
            } else {
                rest.push(pair);
            }
        }
        let rest = if rest.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", rest.join("&"))
        };
        return Ok(SplitUrl { rest, own, keys });
    }
    let mut rest = String::new();
    let mut own = Vec::new();
    let mut keys = Vec::new();
    for (key, value, text) in key_values(url)? {
        keys.push(key.clone());
        if OWN_PARAMS.contains(&key.as_str()) {
            own.push((key, value));
        } else {
            if !rest.is_empty() {
                rest.push(' ');
            }
            rest.push_str(text);
        }
    }
    Ok(SplitUrl { rest, own, keys })
}

/// The pairs of a libpq key-value string, each with its text as written.
fn key_values(s: &str) -> Result<Vec<(String, String, &str)>, String> {
    let mut out = Vec::new();
    let bytes = s.as_bytes();
    let mut i = 0;
    let skip_space = |i: &mut usize| {
        while *i < bytes.len() && bytes[*i].is_ascii_whitespace() {
            *i += 1;
        }
    };
    loop {
        skip_space(&mut i);
        if i >= bytes.len() {
            return Ok(out);
        }
        let start = i;
        while i < bytes.len() && bytes[i] != b'=' && !bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = s[start..i].to_owned();
        skip_space(&mut i);
        if i >= bytes.len() || bytes[i] != b'=' {
            return Err(format!("missing `=` after {key:?}"));
        }
        i += 1;
        skip_space(&mut i);
        let mut value = String::new();
        if i < bytes.len() && bytes[i] == b'\'' {
            i += 1;
            loop {
                match bytes.get(i) {
                    None => return Err(format!("unterminated quoted value of {key:?}")),
                    Some(b'\'') => {
                        i += 1;
                        break;
                    }
                    Some(b'\\') if i + 1 < bytes.len() => {
                        value.push(bytes[i + 1] as char);
                        i += 2;
                    }
                    Some(_) => {
                        let c = s[i..].chars().next().unwrap_or_default();
                        value.push(c);
                        i += c.len_utf8();
                    }
                }
            }
        } else {
            let v_start = i;
            while i < bytes.len() && !bytes[i].is_ascii_whitespace() {
                i += 1;
            }
            value.push_str(&s[v_start..i]);
        }
        out.push((key, value, &s[start..i]));
    }
}

/// `sslmode`, `sslrootcert`, `sslcert`, `sslkey` as given (the last of a repeated one
/// wins, as in libpq).
fn tls_settings(own: &[(String, String)]) -> Result<PgTlsSettings, String> {
    let mut settings = PgTlsSettings::default();
    let (mut cert, mut key) = (None, None);
    for (k, v) in own {
        match k.as_str() {
            "sslmode" => settings.mode = SslMode::parse(v)?,
            "sslrootcert" if v == "system" => settings.root_certs = Some(RootCerts::System),
            "sslrootcert" => settings.root_certs = Some(RootCerts::File(v.into())),
            "sslcert" => cert = Some(PathBuf::from(v)),
            "sslkey" => key = Some(PathBuf::from(v)),
            "sslnegotiation" if v == "postgres" => {}
            "sslnegotiation" => {
                return Err(format!(
                    "sslnegotiation={v} is not supported (only the default, postgres)"
                ))
            }
            _ => {}
        }
    }
    settings.client_cert = match (cert, key) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        _ => return Err("sslcert and sslkey go together: give both, or neither".into()),
    };
    settings.validate()?;
    Ok(settings)
}

/// The longest schema name we accept: the triggers on each watched table are named
/// `<schema>_capture_insert|update|delete`, which must stay within PostgreSQL's 63-byte
/// limit.
const MAX_SCHEMA_BYTES: usize = crate::ident::MAX_IDENT_BYTES - "_capture_update".len();

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOptions {
    schema: Option<String>,
    /// A mode name, or a boolean (the option's original form).
    notify: Option<serde_json::Value>,
    fallback_poll_ms: Option<u64>,
    dead_peer_timeout_ms: Option<u64>,
    linger_ms: Option<u64>,
}

/// `dead_peer_timeout_ms` unless configured.
pub const DEFAULT_DEAD_PEER_TIMEOUT: Duration = Duration::from_secs(30);

/// When the capture triggers send their `NOTIFY` wake-up; see [`crate::wake`] for the
/// trade-off. The option takes effect on the triggers at `install`; the reading side is
/// the same for `Always` and `WhenIdle`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotifyMode {
    /// Every writing transaction notifies (`"always"`). Wake-ups are never late, but every
    /// writing transaction takes PostgreSQL's database-wide notify lock at commit, which
    /// serialises the commits of concurrent writers.
    Always,
    /// A transaction notifies only while some reader is registered as waiting
    /// (`"when-idle"`, or `true`; the default). Under a steady stream readers are busy and
    /// writers skip the lock; a wake-up can be late by at most the fallback poll interval.
    WhenIdle,
    /// No notification (`"off"`, or `false`): readers poll every fallback poll interval.
    Off,
}

impl NotifyMode {
    fn parse(raw: Option<&serde_json::Value>) -> Result<NotifyMode, PgError> {
        use serde_json::Value;
        match raw {
            None | Some(Value::Bool(true)) => Ok(NotifyMode::WhenIdle),
            Some(Value::Bool(false)) => Ok(NotifyMode::Off),
            Some(Value::String(m)) if m == "always" => Ok(NotifyMode::Always),
            Some(Value::String(m)) if m == "when-idle" => Ok(NotifyMode::WhenIdle),
            Some(Value::String(m)) if m == "off" => Ok(NotifyMode::Off),
            Some(other) => Err(PgError::InvalidOption(format!(
                "notify must be \"always\", \"when-idle\", \"off\", true or false, not {other}"
            ))),
        }
    }

    /// The default for `fallback_poll_ms`. With `WhenIdle` it bounds how late a wake-up
    /// that lost the race described in [`crate::wake`] can be, so it is short.
    fn default_fallback_poll_ms(self) -> u64 {
        match self {
            NotifyMode::Always => 10_000,
            NotifyMode::WhenIdle => 250,
            NotifyMode::Off => 1_000,
        }
    }
}

/// Validated options.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// The one schema that holds everything Epidemic creates (default `epidemic`). Also
    /// the NOTIFY channel, so two installations in one database do not wake each other.
    pub schema: Ident,
    /// When the capture triggers send `NOTIFY` (default [`NotifyMode::WhenIdle`]). With
    /// [`NotifyMode::Off`] `wait` does not listen and simply sleeps.
    pub notify: NotifyMode,
    /// The longest time after a read of the log before `wait` tells the host to read it
    /// again anyway: covers a late or lost notification, and is the polling interval when
    /// `notify` is off. Default 250 ms with `when-idle`, 10 s with `always`, 1 s with `off`.
    pub fallback_poll: Duration,
    /// Whether `fallback_poll_ms` was set, rather than defaulted.
    pub fallback_poll_configured: bool,
    /// How long the server may leave a statement unanswered before the connection is
    /// taken for dead (default 30 s); `None` when set to 0 (no watch, no keepalive
    /// tuning, no heartbeat). See [`crate::stream`].
    pub dead_peer_timeout: Option<Duration>,
    /// The longest a reader behind a dense stream lets changes gather between two reads
    /// (default 20 ms; zero: read again at once). See [`crate::wake`], "A dense stream".
    pub linger: Duration,
}

impl PgOptions {
    pub fn from_json(options: &serde_json::Value) -> Result<PgOptions, PgError> {
        let raw: RawOptions = match options {
            serde_json::Value::Null => RawOptions::default(),
            v => serde_json::from_value(v.clone())
                .map_err(|e| PgError::InvalidOption(e.to_string()))?,
        };
        let schema = Ident::parse("schema", raw.schema.as_deref().unwrap_or("epidemic"))?;
        if schema.as_str().len() > MAX_SCHEMA_BYTES {
            return Err(PgError::InvalidOption(format!(
                "schema \"{schema}\" is longer than {MAX_SCHEMA_BYTES} bytes"
            )));
        }
        let notify = NotifyMode::parse(raw.notify.as_ref())?;
        let fallback_ms = raw
            .fallback_poll_ms
            .unwrap_or_else(|| notify.default_fallback_poll_ms());
        if fallback_ms == 0 {
            return Err(PgError::InvalidOption(
                "fallback_poll_ms must be at least 1".into(),
            ));
        }
        let dead_peer_timeout = match raw.dead_peer_timeout_ms {
            None => Some(DEFAULT_DEAD_PEER_TIMEOUT),
            Some(0) => None,
            Some(ms) if ms < 1000 => {
                return Err(PgError::InvalidOption(format!(
                    "dead_peer_timeout_ms must be 0 (off) or at least 1000, not {ms}"
                )))
            }
            Some(ms) => Some(Duration::from_millis(ms)),
        };
        let linger = linger_option(raw.linger_ms).map_err(PgError::InvalidOption)?;
        Ok(PgOptions {
            schema,
            notify,
            fallback_poll: Duration::from_millis(fallback_ms),
            fallback_poll_configured: raw.fallback_poll_ms.is_some(),
            dead_peer_timeout,
            linger,
        })
    }
}

/// The URL with any password replaced by `***`, for messages. The SDK's
/// [`redact_url`](epidemic_plugin_sdk::redact_url) handles the userinfo
/// (`postgres://user:secret@host/db`); libpq also takes the password as a query parameter
/// (`?password=secret`) and in its key-value form (`host=... password=secret`), which are
/// PostgreSQL's own and handled here.
pub fn redact_url(url: &str) -> String {
    redact_key_value(&epidemic_plugin_sdk::redact_url(url))
}

/// Replace the value of every `password=` pair (query string or key-value form).
fn redact_key_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("password=") {
        let boundary_ok = i == 0 || matches!(rest.as_bytes()[i - 1], b'?' | b'&' | b' ');
        let value_start = i + "password=".len();
        out.push_str(&rest[..value_start]);
        rest = &rest[value_start..];
        if boundary_ok {
            let value_end = match rest.strip_prefix('\'') {
                Some(quoted) => quoted.find('\'').map_or(rest.len(), |j| j + 2),
                None => rest.find(['&', ' ', '#']).unwrap_or(rest.len()),
            };
            out.push_str("***");
            rest = &rest[value_end..];
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults() {
        let o = PgOptions::from_json(&json!({})).unwrap();
        assert_eq!(o.schema.as_str(), "epidemic");
        assert_eq!(o.notify, NotifyMode::WhenIdle);
        assert_eq!(o.fallback_poll, Duration::from_millis(250));
        let o = PgOptions::from_json(&serde_json::Value::Null).unwrap();
        assert_eq!(o.schema.as_str(), "epidemic");
        let o = PgOptions::from_json(&json!({"notify": false})).unwrap();
        assert_eq!(o.notify, NotifyMode::Off);
        assert_eq!(o.fallback_poll, Duration::from_secs(1));
        let o = PgOptions::from_json(&json!({"notify": "always"})).unwrap();
        assert_eq!(o.notify, NotifyMode::Always);
        assert_eq!(o.fallback_poll, Duration::from_secs(10));
    }

    #[test]
    fn notify_takes_a_mode_or_a_boolean() {
        for (v, mode) in [
            (json!(true), NotifyMode::WhenIdle),
            (json!(false), NotifyMode::Off),
            (json!("when-idle"), NotifyMode::WhenIdle),
            (json!("always"), NotifyMode::Always),
            (json!("off"), NotifyMode::Off),
        ] {
            let o = PgOptions::from_json(&json!({ "notify": v, "fallback_poll_ms": 5 })).unwrap();
            assert_eq!(o.notify, mode, "{v}");
            assert_eq!(o.fallback_poll, Duration::from_millis(5));
        }
        for bad in [json!("sometimes"), json!(1)] {
            let e = PgOptions::from_json(&json!({ "notify": bad })).unwrap_err();
            assert!(e.to_string().contains("notify"), "{e}");
        }
    }

    #[test]
    fn rejects_unknown_keys_and_bad_schema() {
        let e = PgOptions::from_json(&json!({"shema": "x"})).unwrap_err();
        assert!(e.to_string().contains("shema"), "{e}");
        let e = PgOptions::from_json(&json!({"schema": "a; DROP SCHEMA public"})).unwrap_err();
        assert!(e.to_string().contains("a; DROP SCHEMA public"), "{e}");
        assert!(PgOptions::from_json(&json!({"fallback_poll_ms": 0})).is_err());
    }

    #[test]
    fn tls_parameters_are_read_from_either_url_form() {
        let u = PgUrl::parse(
            "postgres://mx:pw@db.example:5433/mail?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&application_name=x",
            Some(Duration::from_secs(30)),
        )
        .unwrap();
        assert_eq!(u.tls.mode, SslMode::VerifyFull);
        assert_eq!(
            u.tls.root_certs,
            Some(RootCerts::File("/etc/ca.pem".into()))
        );
        assert_eq!(u.config.get_application_name(), Some("x"));
        assert!(u.through_connector);
        assert_eq!(u.config.get_keepalives_idle(), Duration::from_secs(10));
        assert_eq!(
            u.config.get_tcp_user_timeout(),
            Some(&Duration::from_secs(30))
        );
        let u = PgUrl::parse(
            "host=db.example user=mx sslmode=require sslcert='/etc/my cert.pem' sslkey=/k.pem dbname=mail",
            None,
        )
        .unwrap();
        assert_eq!(u.tls.mode, SslMode::Require);
        assert_eq!(
            u.tls.client_cert,
            Some(("/etc/my cert.pem".into(), "/k.pem".into()))
        );
        assert_eq!(u.config.get_dbname(), Some("mail"));
        assert_eq!(u.config.get_tcp_user_timeout(), None);
        // Defaults: libpq's `prefer`; keepalives the URL sets are left alone.
        let u = PgUrl::parse(
            "postgres://db/mail?keepalives_idle=7",
            Some(Duration::from_secs(30)),
        )
        .unwrap();
        assert_eq!(u.tls.mode, SslMode::Prefer);
        assert_eq!(u.config.get_keepalives_idle(), Duration::from_secs(7));
        // A Unix socket is neither TLS nor watched.
        let u = PgUrl::parse("host=/run/postgresql dbname=mail", None).unwrap();
        assert!(!u.through_connector);
    }

    #[test]
    fn bad_tls_parameters_are_one_line_naming_the_url_without_its_password() {
        for (url, expect) in [
            (
                "postgres://mx:pw@db/mail?sslmode=verify_full",
                "verify-full",
            ),
            ("postgres://mx:pw@db/mail?sslmode=verify-ca", "sslrootcert"),
            ("postgres://mx:pw@db/mail?sslcert=/c.pem", "sslkey"),
            (
                "postgres://mx:pw@db/mail?sslnegotiation=direct",
                "sslnegotiation",
            ),
        ] {
            let e = PgUrl::parse(url, None).unwrap_err().to_string();
            assert!(
                e.contains(expect) && e.contains("mx:***@db") && !e.contains("pw"),
                "{e}"
            );
            assert!(!e.contains('\n'), "{e}");
        }
        let e = PgOptions::from_json(&json!({"dead_peer_timeout_ms": 10})).unwrap_err();
        assert!(e.to_string().contains("dead_peer_timeout_ms"), "{e}");
        let o = PgOptions::from_json(&json!({"dead_peer_timeout_ms": 0})).unwrap();
        assert_eq!(o.dead_peer_timeout, None);
        let o = PgOptions::from_json(&json!({})).unwrap();
        assert_eq!(o.dead_peer_timeout, Some(Duration::from_secs(30)));
    }

    #[test]
    fn linger_defaults_to_20_ms_and_is_bounded() {
        let o = PgOptions::from_json(&json!({})).unwrap();
        assert_eq!(o.linger, Duration::from_millis(20));
        let o = PgOptions::from_json(&json!({"linger_ms": 0})).unwrap();
        assert_eq!(o.linger, Duration::ZERO);
        let o = PgOptions::from_json(&json!({"linger_ms": 20})).unwrap();
        assert_eq!(o.linger, Duration::from_millis(20));
        let e = PgOptions::from_json(&json!({"linger_ms": 5000}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("linger_ms") && e.contains("5000"), "{e}");
        assert!(PgOptions::from_json(&json!({"linger_ms": -1})).is_err());
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://mx:s3cr@t@db.example:5432/mail"),
            "postgres://mx:***@db.example:5432/mail"
        );
        assert_eq!(redact_url("postgres://mx@db/mail"), "postgres://mx@db/mail");
        assert_eq!(
            redact_url("postgresql://db/mail?user=mx&password=hunter2&sslmode=disable"),
            "postgresql://db/mail?user=mx&password=***&sslmode=disable"
        );
        assert_eq!(
            redact_url("host=db password='a b' user=mx"),
            "host=db password=*** user=mx"
        );
        assert_eq!(redact_url("host=db password=x"), "host=db password=***");
    }
}
