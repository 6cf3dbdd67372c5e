//! The backend's options (the config's `[database]` table minus `url`) and URL handling.

use std::time::Duration;

use serde::Deserialize;

use crate::error::PgError;
use crate::ident::Ident;

/// The longest schema name we accept: the triggers on each watched table are named
/// `<schema>_capture_insert|update|delete`, which must stay within PostgreSQL's 63-byte
/// limit.
const MAX_SCHEMA_BYTES: usize = crate::ident::MAX_IDENT_BYTES - "_capture_update".len();

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOptions {
    schema: Option<String>,
    notify: Option<bool>,
    fallback_poll_ms: Option<u64>,
}

/// Validated options.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// The one schema that holds everything Epidemic creates (default `epidemic`). Also
    /// the NOTIFY channel, so two installations in one database do not wake each other.
    pub schema: Ident,
    /// Whether the capture triggers send `NOTIFY` and `wait` listens for it (default
    /// true). Without it `wait` simply sleeps for `fallback_poll`; writes are cheaper
    /// because notifying transactions serialise their commits.
    pub notify: bool,
    /// The longest `wait` blocks before telling the host to read the log anyway: covers a
    /// lost notification, and is the polling interval when `notify` is off. Default 10 s
    /// with notify, 1 s without.
    pub fallback_poll: Duration,
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
        let notify = raw.notify.unwrap_or(true);
        let fallback_ms = raw
            .fallback_poll_ms
            .unwrap_or(if notify { 10_000 } else { 1_000 });
        if fallback_ms == 0 {
            return Err(PgError::InvalidOption(
                "fallback_poll_ms must be at least 1".into(),
            ));
        }
        Ok(PgOptions {
            schema,
            notify,
            fallback_poll: Duration::from_millis(fallback_ms),
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
        assert!(o.notify);
        assert_eq!(o.fallback_poll, Duration::from_secs(10));
        let o = PgOptions::from_json(&serde_json::Value::Null).unwrap();
        assert_eq!(o.schema.as_str(), "epidemic");
        let o = PgOptions::from_json(&json!({"notify": false})).unwrap();
        assert_eq!(o.fallback_poll, Duration::from_secs(1));
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
