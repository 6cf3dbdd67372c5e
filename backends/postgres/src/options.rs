//! The backend's options (the config's `[database]` table minus `url`) and the URL:
//! parsing it with Epidemic's defaults ([`PgUrl`]) and keeping passwords out of messages
//! ([`redact_url`]).

use std::time::Duration;

use serde::Deserialize;

use crate::error::{self, PgError};
use crate::ident::Ident;

/// Connecting gives up after this long unless the URL sets `connect_timeout`, so that a
/// reconnect attempt during an outage does not hang the host.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where to connect: the URL parsed, with Epidemic's defaults for what it leaves out.
#[derive(Debug, Clone)]
pub struct PgUrl {
    pub config: postgres::Config,
    /// For messages: the URL with its password replaced.
    pub redacted: String,
}

impl PgUrl {
    /// Parse a `postgres://` URL or a libpq key-value string. Unless the URL says
    /// otherwise, connecting times out after ten seconds and the session is named
    /// `epidemic` (in `pg_stat_activity`).
    pub fn parse(url: &str) -> Result<PgUrl, PgError> {
        let redacted = redact_url(url);
        let mut config: postgres::Config =
            url.parse()
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
        Ok(PgUrl { config, redacted })
    }
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
}

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
        Ok(PgOptions {
            schema,
            notify,
            fallback_poll: Duration::from_millis(fallback_ms),
            fallback_poll_configured: raw.fallback_poll_ms.is_some(),
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
