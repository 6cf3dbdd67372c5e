//! The config file: one TOML file plus `EPIDEMIC_SECTION__KEY` environment overrides,
//! read with the `config` crate. Unknown keys are errors; every error names the file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub database: DatabaseConfig,
    #[serde(default)]
    pub daemon: DaemonConfig,
    #[serde(default, rename = "handler")]
    pub handlers: Vec<HandlerConfig>,
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// `[table.NAME]`: settings of one watched table.
    #[serde(default, rename = "table")]
    pub tables: BTreeMap<String, TableConfig>,
    /// The file this was read from (set after reading).
    #[serde(skip)]
    pub path: PathBuf,
}

/// `[database]`: `url` picks the backend; every other key goes to the backend, which
/// rejects keys it does not know.
#[derive(Debug, Clone, Deserialize)]
pub struct DatabaseConfig {
    pub url: String,
    /// A backend library to use instead of the one the URL scheme picks.
    #[serde(default)]
    pub backend: Option<PathBuf>,
    #[serde(flatten)]
    pub options: BTreeMap<String, serde_json::Value>,
}

/// `[table.NAME]`: what Epidemic needs to know about one watched table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableConfig {
    /// The columns that identify a row, for a table without a primary key (or to use
    /// other columns than its primary key). Every change carries their values.
    #[serde(default)]
    pub key: Vec<String>,
}

/// `[metrics]`: Prometheus text on `listen` (e.g. "127.0.0.1:9187") while `run` runs.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    pub listen: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// This daemon's consumer name; default: the host name.
    pub name: Option<String>,
    /// Where plugin libraries are looked up before the binary's own directory.
    pub plugin_dir: Option<PathBuf>,
    /// Changes fetched per batch.
    pub batch_size: u32,
    /// Longest wait for a wake-up before reading the log anyway (covers a lost wake-up).
    pub idle_check_ms: u64,
    /// How often the daemon deletes log rows every consumer has passed.
    pub prune_interval_ms: u64,
    /// A consumer (of any daemon) unseen this long is evicted: it stops holding back
    /// pruning, and is told it missed changes when it comes back. "0" never evicts.
    #[serde(deserialize_with = "duration")]
    pub consumer_ttl: Duration,
    /// How long this daemon's claim on its name lasts without a renewal (renewed every
    /// third of it). A second daemon with the same name is refused while it is held; a
    /// restart after a crash on the same host takes the name over at once, elsewhere it
    /// waits at most this long.
    #[serde(deserialize_with = "duration")]
    pub lease_ttl: Duration,
    /// How often a running daemon looks at `status` and logs problems and warnings that
    /// appeared since (a dropped trigger, a TRUNCATE noticed on MySQL, a revoked privilege).
    #[serde(deserialize_with = "duration")]
    pub health_check_interval: Duration,
    /// Rows read per chunk of a backfill: each is one bounded SELECT by key, and the
    /// consumer's live changes wait at most one chunk.
    pub backfill_chunk: u32,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            name: None,
            plugin_dir: None,
            batch_size: 500,
            idle_check_ms: 1_000,
            prune_interval_ms: 5_000,
            consumer_ttl: Duration::from_secs(7 * 24 * 3600),
            lease_ttl: Duration::from_secs(15),
            health_check_interval: Duration::from_secs(60),
            backfill_chunk: 1_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandlerConfig {
    /// Unique within the daemon; with the daemon name it identifies the consumer.
    pub name: String,
    /// Library file: a bare name is looked up in `plugin_dir` and next to the binary
    /// (`maildir` means `libepidemic_maildir.so`); a path is relative to the config file.
    pub plugin: String,
    /// Attempts per change before giving up on it (1 = no retry).
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt (with jitter) up to `retry_max_ms`.
    #[serde(default = "default_retry_initial_ms")]
    pub retry_initial_ms: u64,
    #[serde(default = "default_retry_max_ms")]
    pub retry_max_ms: u64,
    /// What to do when a change still fails after `max_attempts` (or fails permanently):
    /// `dead-letter` stores it in the dead-letter table and moves on; `block` keeps
    /// retrying it (backoff capped at `retry_max_ms`) and holds back this handler's
    /// later changes, for handlers that need strict order.
    #[serde(default)]
    pub on_failure: OnFailure,
    /// Most changes handed to the handler in one call (0, the default: every change of a
    /// fetched batch it wants). A handler that takes long per change can be given small
    /// calls so that a shutdown finishes sooner.
    #[serde(default)]
    pub handler_batch: u32,
    /// The handler's own settings, passed to the plugin as they are.
    #[serde(default = "empty_table")]
    pub config: serde_json::Value,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnFailure {
    #[default]
    DeadLetter,
    Block,
}

/// A duration as `"30s"`, `"7d"`, `"500ms"` (humantime), or a number of seconds.
fn duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Secs(u64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Secs(s) => Ok(Duration::from_secs(s)),
        Raw::Text(t) if t.trim() == "0" => Ok(Duration::ZERO),
        Raw::Text(t) => humantime::parse_duration(t.trim()).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration {t:?}: {e} (examples: \"30s\", \"7d\")"
            ))
        }),
    }
}

fn default_max_attempts() -> u32 {
    5
}
fn default_retry_initial_ms() -> u64 {
    100
}
fn default_retry_max_ms() -> u64 {
    30_000
}
fn empty_table() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}

impl Config {
    pub fn load(path: &Path) -> Result<Config> {
        if !path.exists() {
            bail!(
                "config file {} not found (pass --config FILE; see docs/configuration.md)",
                path.display()
            );
        }
        let built = config::Config::builder()
            .add_source(
                config::File::from(path)
                    .format(config::FileFormat::Toml)
                    .required(true),
            )
            // `.prefix_separator("_")`: without it the `config` crate expects
            // `EPIDEMIC__DATABASE__URL` and silently ignores `EPIDEMIC_DATABASE__URL`.
            .add_source(
                config::Environment::with_prefix("EPIDEMIC")
                    .prefix_separator("_")
                    .separator("__")
                    .source(Some(env_overrides())),
            )
            .build()
            .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), one_line(&e.to_string())))?;
        let mut cfg: Config = built
            .try_deserialize()
            .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), one_line(&e.to_string())))?;
        cfg.path = path.to_owned();
        cfg.validate()?;
        Ok(cfg)
    }

    /// The key columns `[table.NAME] key` names for a table (matched without regard to
    /// ASCII case, as the backends resolve names); empty when none.
    pub fn table_key(&self, table: &str) -> Vec<String> {
        self.tables
            .get(table)
            .or_else(|| {
                self.tables
                    .iter()
                    .find(|(t, _)| t.eq_ignore_ascii_case(table))
                    .map(|(_, c)| c)
            })
            .map(|c| c.key.clone())
            .unwrap_or_default()
    }

    fn validate(&self) -> Result<()> {
        let file = self.path.display();
        if self.database.url.trim().is_empty() {
            bail!("{file}: database.url is empty");
        }
        if !self.database.url.contains(':') {
            bail!(
                "{file}: database.url must start with a scheme (sqlite://, postgres://, mysql://)"
            );
        }
        if self.daemon.batch_size == 0 {
            bail!("{file}: daemon.batch_size must be at least 1");
        }
        if let Some(name) = &self.daemon.name {
            check_name(&format!("{file}: daemon.name"), name)?;
        }
        for (table, t) in &self.tables {
            for (i, c) in t.key.iter().enumerate() {
                if t.key[..i].contains(c) {
                    bail!("{file}: table.{table}.key names column {c:?} twice");
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (i, h) in self.handlers.iter().enumerate() {
            check_name(&format!("{file}: handler[{i}].name"), &h.name)?;
            if !seen.insert(h.name.as_str()) {
                bail!(
                    "{file}: handler name {:?} is used twice; each [[handler]] needs its own name",
                    h.name
                );
            }
            if h.max_attempts == 0 {
                bail!(
                    "{file}: handler {:?}: max_attempts must be at least 1",
                    h.name
                );
            }
            if !h.config.is_object() {
                bail!(
                    "{file}: handler {:?}: config must be a table ([handler.config])",
                    h.name
                );
            }
        }
        Ok(())
    }

    /// The daemon's consumer name: `daemon.name`, or the host name.
    pub fn daemon_name(&self) -> Result<String> {
        if let Some(n) = &self.daemon.name {
            return Ok(n.clone());
        }
        let host = hostname::get()
            .context("cannot read the host name; set daemon.name")?
            .to_string_lossy()
            .into_owned();
        Ok(host)
    }

    /// The directory relative plugin paths are resolved against.
    pub fn dir(&self) -> PathBuf {
        match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        }
    }

    /// The backend options as a JSON object (everything in `[database]` but `url` and
    /// `backend`).
    pub fn backend_options(&self) -> serde_json::Value {
        serde_json::Value::Object(self.database.options.clone().into_iter().collect())
    }
}

/// The `EPIDEMIC_SECTION__KEY` variables. Others with the prefix (`EPIDEMIC_CONFIG`,
/// which names the file, or a test harness's own) are not config keys and would
/// otherwise be read as unknown top-level keys.
fn env_overrides() -> config::Map<String, String> {
    std::env::vars()
        .filter(|(k, _)| {
            k.strip_prefix("EPIDEMIC_")
                .is_some_and(|rest| rest.contains("__"))
        })
        .collect()
}

/// Daemon and handler names end up as keys in the database and in metric labels: keep
/// them plain.
fn check_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if !ok {
        bail!("{what} {name:?} is invalid: use 1-64 letters, digits, '_', '-' or '.'");
    }
    Ok(())
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
