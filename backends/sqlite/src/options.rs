//! The `[database]` options of the SQLite backend and its URL: which file, and how long
//! to wait for locks, poll and prune. Parsed once in `open`; nothing else reads the config.

use std::path::PathBuf;
use std::time::Duration;

use epidemic_plugin_sdk::backend::linger::linger_option;
use epidemic_plugin_sdk::backend::BackendError;
use serde::Deserialize;

/// `[database]` options for the SQLite backend.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct SqliteOptions {
    /// How long a statement waits for a lock held by another connection.
    pub busy_timeout_ms: u64,
    /// How often to check `PRAGMA data_version` when no file event arrives.
    pub fallback_poll_ms: u64,
    /// Rows deleted per statement when pruning, so writers never wait long.
    pub prune_chunk: u32,
    /// How long a reader behind a dense stream lets changes gather between two reads
    /// (the SDK's `backend::linger`); 0: read again at once.
    pub linger_ms: Option<u64>,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            busy_timeout_ms: 5_000,
            fallback_poll_ms: 250,
            prune_chunk: 10_000,
            linger_ms: None,
        }
    }
}

impl SqliteOptions {
    /// The options from the `[database]` table minus `url`, as JSON.
    pub fn parse(options: &serde_json::Value) -> Result<Self, BackendError> {
        let options: SqliteOptions = serde_json::from_value(options.clone())
            .map_err(|e| BackendError::Invalid(format!("[database] options for sqlite: {e}")))?;
        options.linger()?;
        Ok(options)
    }

    /// `linger_ms`, checked: the default when unset.
    pub fn linger(&self) -> Result<Duration, BackendError> {
        linger_option(self.linger_ms)
            .map_err(|e| BackendError::Invalid(format!("[database] options for sqlite: {e}")))
    }
}

/// Path of the database file in a `sqlite://` URL (`sqlite://mail.db` is relative to the
/// working directory, `sqlite:///var/lib/mail.db` is absolute).
pub(crate) fn database_path(url: &str) -> Result<PathBuf, BackendError> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .ok_or_else(|| BackendError::Invalid(format!("not a sqlite URL: {url:?}")))?;
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    // A shared cache lets one connection see another's uncommitted writes (under
    // `read_uncommitted`) and turns lock waits into SQLITE_LOCKED; Epidemic's connections
    // always use a private cache (see `conn::connect`), so asking for a shared one is
    // refused rather than silently overridden.
    if query
        .split('&')
        .any(|kv| kv.eq_ignore_ascii_case("cache=shared"))
    {
        return Err(BackendError::Invalid(
            "sqlite URL: cache=shared is not supported; Epidemic needs a private cache so it never reads uncommitted changes (remove cache=shared)".into(),
        ));
    }
    if path.is_empty() {
        return Err(BackendError::Invalid(
            "sqlite URL has no file path (sqlite://FILE)".into(),
        ));
    }
    Ok(PathBuf::from(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_paths() {
        assert_eq!(
            database_path("sqlite://mail.db").unwrap(),
            PathBuf::from("mail.db")
        );
        assert_eq!(
            database_path("sqlite:///var/x.db").unwrap(),
            PathBuf::from("/var/x.db")
        );
        assert_eq!(
            database_path("sqlite:x.db?mode=rw").unwrap(),
            PathBuf::from("x.db")
        );
        assert!(database_path("sqlite://").is_err());
        assert!(database_path("postgres://x").is_err());
    }

    #[test]
    fn unknown_options_are_refused() {
        assert!(SqliteOptions::parse(&serde_json::json!({"busy_timeout_ms": 10})).is_ok());
        let err = SqliteOptions::parse(&serde_json::json!({"busy_timeout": 10})).unwrap_err();
        assert!(err.to_string().contains("busy_timeout"), "{err}");
    }

    #[test]
    fn linger_defaults_to_20_ms_and_is_bounded() {
        let o = SqliteOptions::parse(&serde_json::json!({})).unwrap();
        assert_eq!(o.linger().unwrap(), Duration::from_millis(20));
        let o = SqliteOptions::parse(&serde_json::json!({"linger_ms": 0})).unwrap();
        assert_eq!(o.linger().unwrap(), Duration::ZERO);
        let err = SqliteOptions::parse(&serde_json::json!({"linger_ms": 5000})).unwrap_err();
        assert!(err.to_string().contains("linger_ms"), "{err}");
    }
}
