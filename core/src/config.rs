//! The config file: one TOML file plus `EPIDEMIC_SECTION__KEY` environment overrides,
//! read with the `config` crate. Unknown keys are errors; every error names the file (or
//! the variable) and the key (`serde_path_to_error` finds the key), on one line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::exit::{self, config_bail};
use crate::secrets;

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
    /// The file this was read from (set after reading), as given.
    #[serde(skip)]
    pub path: PathBuf,
    /// Its directory, absolute (set after reading).
    #[serde(skip)]
    dir: PathBuf,
}

/// `[database]`: `url` picks the backend; every other key goes to the backend, which
/// rejects keys it does not know.
#[derive(Clone, Deserialize)]
pub struct DatabaseConfig {
    /// The URL, with the password from `password_file` in it once loaded. Never log it
    /// without `redact_url`.
    #[serde(default)]
    pub url: String,
    /// A file holding the URL instead (`cred:NAME` is a systemd credential).
    #[serde(default)]
    pub url_file: Option<String>,
    /// A file holding the password, put into the URL (`cred:NAME` is a systemd
    /// credential).
    #[serde(default)]
    pub password_file: Option<String>,
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

/// Shows the URL without its password, so a `{:?}` can never leak it.
impl std::fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("url", &epidemic_plugin_sdk::redact_url(&self.url))
            .field("url_file", &self.url_file)
            .field("password_file", &self.password_file)
            .field("backend", &self.backend)
            .field("options", &self.options)
            .finish()
    }
}

/// `[metrics]`: Prometheus text on `listen` (e.g. "127.0.0.1:9187") while `run` runs,
/// with `/healthz` and `/readyz`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    pub listen: Option<String>,
    /// `/readyz` fails while a handler with changes waiting has finished no call for
    /// this long (a handler blocked in a call).
    #[serde(deserialize_with = "duration")]
    pub handler_stuck_after: Duration,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: None,
            handler_stuck_after: Duration::from_secs(300),
        }
    }
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
    /// A row filter: a CEL expression over the row's columns, with `daemon.name` the
    /// daemon's own name (`mailhost == daemon.name`). Rows moving in and out of it reach
    /// the handler as INSERTs and DELETEs.
    #[serde(default)]
    pub filter: Option<String>,
    /// Let a backfill's SELECT skip rows the filter cannot pass (`col = 'x'`, `col IN
    /// (...)`, the parts of the filter a SELECT can say; the filter still judges every row
    /// read). `false` reads every row of the table and leaves all of it to the filter.
    #[serde(default = "default_snapshot_pushdown")]
    pub snapshot_pushdown: bool,
    /// Where this handler's consumer starts the first time it runs: `now` (changes from
    /// now on), `oldest` (every change still in the log), or `snapshot` (every existing
    /// row as a snapshot row, then live changes; a backfill).
    #[serde(default)]
    pub start: StartMode,
    /// What a consumer that was evicted (unseen longer than `consumer_ttl`) does when it
    /// comes back: `continue` from now (what it missed is logged loudly), or `resync`: a
    /// backfill of its tables, so it converges to them again.
    #[serde(default)]
    pub on_evicted: OnEvicted,
    /// Most changes handed to the handler in one call (0, the default: every change of a
    /// fetched batch it wants). A handler that takes long per change can be given small
    /// calls so that a shutdown finishes sooner.
    #[serde(default)]
    pub handler_batch: u32,
    /// The handler's own settings, passed to the plugin as they are.
    #[serde(default = "empty_table")]
    pub config: serde_json::Value,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OnFailure {
    #[default]
    DeadLetter,
    Block,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StartMode {
    #[default]
    Now,
    Oldest,
    Snapshot,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OnEvicted {
    #[default]
    Continue,
    Resync,
}

/// One of `values` (by name), with an error that lists them instead of naming a Rust type.
fn one_of<'de, D: serde::Deserializer<'de>, T: Copy>(
    d: D,
    values: &[(&str, T)],
) -> Result<T, D::Error> {
    let s = String::deserialize(d)?;
    values
        .iter()
        .find(|(name, _)| *name == s)
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            let names: Vec<String> = values.iter().map(|(n, _)| format!("{n:?}")).collect();
            serde::de::Error::custom(format!(
                "{s:?} is not a valid value: use {}",
                names.join(" or ")
            ))
        })
}

impl<'de> Deserialize<'de> for StartMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        one_of(
            d,
            &[
                ("now", StartMode::Now),
                ("oldest", StartMode::Oldest),
                ("snapshot", StartMode::Snapshot),
            ],
        )
    }
}

impl<'de> Deserialize<'de> for OnEvicted {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        one_of(
            d,
            &[
                ("continue", OnEvicted::Continue),
                ("resync", OnEvicted::Resync),
            ],
        )
    }
}

/// By hand rather than derived: the derived error names the Rust type
/// (`enum OnFailure does not have variant constructor retry`).
impl<'de> Deserialize<'de> for OnFailure {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            "dead-letter" => Ok(OnFailure::DeadLetter),
            "block" => Ok(OnFailure::Block),
            _ => Err(serde::de::Error::custom(format!(
                "{s:?} is not a valid value: use \"dead-letter\" or \"block\""
            ))),
        }
    }
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

fn default_snapshot_pushdown() -> bool {
    true
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
    /// Read `path` and the `EPIDEMIC_SECTION__KEY` variables. Every error is one line
    /// that names the file (or the variable) and the key, and is a
    /// [`ConfigError`](crate::exit::ConfigError).
    pub fn load(path: &Path) -> Result<Config> {
        let file = path.display().to_string();
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => config_bail!(
                "config file {file} not found (pass --config FILE; see docs/configuration.md)"
            ),
            Err(e) => config_bail!("config file {file}: cannot read it: {e}"),
        };
        // Parsed here first for an error with its line and column on one line; the
        // `config` crate would flatten toml's multi-line snippet into a run-on line.
        let table: toml::Table =
            toml::from_str(&text).map_err(|e| exit::config(toml_error(&file, &text, &e)))?;
        if table.get("handler").is_some_and(|h| h.is_table()) {
            config_bail!(
                "{file}: [handler] must be written [[handler]] (double brackets: one [[handler]] table per handler)"
            );
        }
        let env = env_overrides();
        let built = config::Config::builder()
            .add_source(config::File::from_str(&text, config::FileFormat::Toml))
            // `.prefix_separator("_")`: without it the `config` crate expects
            // `EPIDEMIC__DATABASE__URL` and silently ignores `EPIDEMIC_DATABASE__URL`.
            .add_source(
                config::Environment::with_prefix("EPIDEMIC")
                    .prefix_separator("_")
                    .separator("__")
                    .source(Some(env.clone())),
            )
            .build()
            .map_err(|e| exit::config(format!("{file}: {}", one_line(&e.to_string()))))?;
        let mut cfg: Config = serde_path_to_error::deserialize(built)
            .map_err(|e| exit::config(deserialize_error(&file, &env, &e)))?;
        cfg.database.options_from_env(&env);
        cfg.path = path.to_owned();
        cfg.dir = absolute_dir(path)?;
        cfg.database.resolve_secrets(&file, &cfg.dir)?;
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
            config_bail!("{file}: database.url is empty");
        }
        if !self.database.url.contains(':') {
            config_bail!(
                "{file}: database.url must start with a scheme (sqlite://, postgres://, mysql://)"
            );
        }
        if self.daemon.lease_ttl < Duration::from_millis(300) {
            config_bail!("{file}: daemon.lease_ttl: must be at least 300ms");
        }
        if self.daemon.batch_size == 0 {
            config_bail!("{file}: daemon.batch_size must be at least 1");
        }
        if let Some(name) = &self.daemon.name {
            check_name(&format!("{file}: daemon.name"), name)?;
        }
        for (table, t) in &self.tables {
            for (i, c) in t.key.iter().enumerate() {
                if t.key[..i].contains(c) {
                    return Err(crate::exit::config(format!(
                        "{file}: table.{table}.key names column {c:?} twice"
                    )));
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (i, h) in self.handlers.iter().enumerate() {
            check_name(&format!("{file}: handler[{i}].name"), &h.name)?;
            if !seen.insert(h.name.as_str()) {
                config_bail!(
                    "{file}: handler name {:?} is used twice; each [[handler]] needs its own name",
                    h.name
                );
            }
            if h.max_attempts == 0 {
                config_bail!("{file}: handler[{i}].max_attempts must be at least 1");
            }
            if !h.config.is_object() {
                config_bail!("{file}: handler[{i}].config must be a table ([handler.config])");
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

    /// The config file's directory, absolute: relative paths in the config are relative
    /// to it.
    pub fn dir(&self) -> PathBuf {
        self.dir.clone()
    }

    /// Make the config file's directory the working directory, so that every relative
    /// path in the config (the SQLite file in `database.url`, paths in a
    /// `[handler.config]`) means the same under a service manager (which starts in `/`)
    /// as in a shell next to the file. The host names no database, so it cannot rewrite
    /// a backend's URL itself.
    pub fn enter_dir(&self) -> Result<()> {
        std::env::set_current_dir(&self.dir).map_err(|e| {
            exit::config(format!(
                "{}: cannot change into the config file's directory {}: {e}",
                self.path.display(),
                self.dir.display()
            ))
        })
    }

    /// The backend options as a JSON object (everything in `[database]` but `url`,
    /// `url_file`, `password_file` and `backend`).
    pub fn backend_options(&self) -> serde_json::Value {
        serde_json::Value::Object(self.database.options.clone().into_iter().collect())
    }
}

impl DatabaseConfig {
    /// `[database]` keys the host reads itself; every other key is a backend option.
    const HOST_KEYS: [&'static str; 4] = ["url", "url_file", "password_file", "backend"];

    /// A backend option from the environment arrives as a string, which a backend
    /// expecting a number or a boolean would refuse: read it as a TOML value when it is
    /// one (`100`, `true`, `2.5`, `"quoted"`), else keep the string (`when-idle`). Keys of
    /// the host's own sections need no such help: they are typed, and the `config` crate
    /// converts them.
    fn options_from_env(&mut self, env: &config::Map<String, String>) {
        for (var, raw) in env {
            let Some(key) = var.strip_prefix("EPIDEMIC_DATABASE__") else {
                continue;
            };
            let key = key.to_lowercase();
            if key.contains("__") || Self::HOST_KEYS.contains(&key.as_str()) {
                continue;
            }
            let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .and_then(|v| serde_json::to_value(v).ok())
                .unwrap_or_else(|| serde_json::Value::String(raw.clone()));
            self.options.insert(key, value);
        }
    }

    /// Fill `url` from `url_file` and put `password_file`'s password into it.
    fn resolve_secrets(&mut self, file: &str, dir: &Path) -> Result<()> {
        if let Some(source) = self.url_file.clone() {
            if !self.url.is_empty() {
                config_bail!("{file}: database.url and database.url_file are both set; keep one");
            }
            self.url = secrets::read(file, "database.url_file", &source, dir)?;
        } else if self.url.is_empty() {
            config_bail!("{file}: database.url is missing (or set database.url_file)");
        }
        if let Some(source) = self.password_file.clone() {
            let password = secrets::read(file, "database.password_file", &source, dir)?;
            self.url = secrets::with_password(&self.url, &password)
                .map_err(|e| exit::config(format!("{file}: database.password_file: {e}")))?;
        }
        Ok(())
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

/// The config key a variable sets: `EPIDEMIC_DAEMON__NAME` is `daemon.name`.
fn env_key(var: &str) -> String {
    var.strip_prefix("EPIDEMIC_")
        .unwrap_or(var)
        .split("__")
        .map(str::to_lowercase)
        .collect::<Vec<_>>()
        .join(".")
}

/// One line for a value the config structs refused, blaming the variable when the
/// value came from the environment and the file otherwise, e.g.
/// `EPIDEMIC_DAEMON__NMAE: daemon.nmae: unknown field ...`.
fn deserialize_error(
    file: &str,
    env: &config::Map<String, String>,
    e: &serde_path_to_error::Error<config::ConfigError>,
) -> String {
    let key = e.path().to_string();
    let (message, from_env) = config_error_message(e.inner());
    let var = env.keys().find(|v| env_key(v) == key).or_else(|| {
        // A type error knows its source; its key may be the unknown field's parent.
        from_env
            .then(|| {
                env.keys()
                    .find(|v| env_key(v).starts_with(&format!("{key}.")))
            })
            .flatten()
    });
    let origin = match var {
        Some(v) => format!("{v} (environment)"),
        None => file.to_owned(),
    };
    if key.is_empty() || key == "?" {
        format!("{origin}: {message}")
    } else {
        format!("{origin}: {key}: {message}")
    }
}

/// The `config` crate's error without its own "for key ..." suffix (the caller names
/// the key), and whether it says the value came from the environment.
fn config_error_message(e: &config::ConfigError) -> (String, bool) {
    match e {
        config::ConfigError::At { error, origin, .. } => {
            let (m, env) = config_error_message(error);
            (m, env || origin.as_deref() == Some("the environment"))
        }
        config::ConfigError::Type {
            origin,
            unexpected,
            expected,
            ..
        } => (
            format!("invalid type: {unexpected}, expected {expected}"),
            origin.as_deref() == Some("the environment"),
        ),
        other => (one_line(&other.to_string()), false),
    }
}

/// toml's error as `FILE:LINE:COLUMN: message (near "text")`.
fn toml_error(file: &str, text: &str, e: &toml::de::Error) -> String {
    let message = one_line(e.message());
    let Some(span) = e.span() else {
        return format!("{file}: {message}");
    };
    let before = &text[..span.start.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    let line_text = text[line_start..].lines().next().unwrap_or("").trim();
    format!("{file}:{line}:{column}: {message} (line {line}: {line_text:?})")
}

/// The directory of the config file, absolute.
fn absolute_dir(path: &Path) -> Result<PathBuf> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    std::fs::canonicalize(&parent).map_err(|e| {
        exit::config(format!(
            "{}: cannot resolve its directory: {e}",
            path.display()
        ))
    })
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
        config_bail!("{what} {name:?} is invalid: use 1-64 letters, digits, '_', '-' or '.'");
    }
    Ok(())
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
