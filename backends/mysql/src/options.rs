//! The `[database]` options of the MySQL backend and the `mysql://` / `mariadb://` URL:
//! everything the operator configures, checked before a connection is opened, so a typo
//! is one line naming the key instead of a surprise later.

use std::time::Duration;

use epidemic_plugin_sdk::backend::BackendError;
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
    /// How often an idle reader looks for new log rows.
    pub poll_interval_ms: u64,
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
}

impl Default for MySqlOptions {
    fn default() -> Self {
        MySqlOptions {
            poll_interval_ms: 50,
            gap_detection: GapDetection::Auto,
            gap_timeout_ms: 60_000,
            gap_check_ms: 250,
            max_gap_ranges: 10_000,
            prune_chunk: 10_000,
            connect_timeout_ms: 10_000,
            allow_galera: false,
        }
    }
}

impl MySqlOptions {
    /// The options from the `[database]` table minus `url`, as the host passes them.
    pub fn parse(options: &serde_json::Value) -> Result<MySqlOptions, BackendError> {
        serde_json::from_value(options.clone())
            .map_err(|e| BackendError::Invalid(format!("[database] options for mysql: {e}")))
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms.max(1))
    }
}

/// A parsed `mysql://` (or `mariadb://`) URL: the driver's options and the URL as it
/// may be shown (password hidden).
#[derive(Clone)]
pub(crate) struct Target {
    pub opts: Opts,
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
        // The driver's URL errors never contain the password, but say which URL anyway.
        let opts = Opts::from_url(&driver_url)
            .map_err(|e| BackendError::Invalid(format!("bad database URL {shown}: {e}")))?;
        if opts.get_db_name().unwrap_or_default().is_empty() {
            return Err(BackendError::Invalid(format!(
                "database URL {shown} names no database (mysql://USER@HOST/DATABASE)"
            )));
        }
        Ok(Target { opts, shown })
    }
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
}
