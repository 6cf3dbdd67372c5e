//! The `[handler.config]` table of a NATS handler, its checks at start-up, and the subject
//! template.

use std::path::PathBuf;
use std::time::Duration;

use async_nats::ServerAddr;
use epidemic_plugin_sdk::{HandlerConfig, Op};
use serde::Deserialize;

use crate::error::NatsError;

/// The config table as written in the file. See the crate docs for each key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NatsConfigFile {
    table: String,
    columns: Vec<String>,
    ops: Option<Vec<OpName>>,
    url: Urls,
    #[serde(default = "default_stream")]
    stream: String,
    #[serde(default = "default_subject")]
    subject: String,
    #[serde(default = "default_duplicate_window_secs")]
    duplicate_window_secs: u64,
    #[serde(default = "default_timeout_ms")]
    timeout_ms: u64,
    #[serde(default = "default_max_in_flight")]
    max_in_flight: usize,
    #[serde(default)]
    tls: bool,
    ca_file: Option<PathBuf>,
    credentials_file: Option<PathBuf>,
    token_file: Option<PathBuf>,
    user: Option<String>,
    password_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "a URL or a list of URLs")]
enum Urls {
    One(String),
    Many(Vec<String>),
}

fn default_stream() -> String {
    "EPIDEMIC".into()
}

/// The default subject template.
pub const DEFAULT_SUBJECT: &str = "epidemic.{table}.{op}";

fn default_subject() -> String {
    DEFAULT_SUBJECT.into()
}

fn default_duplicate_window_secs() -> u64 {
    120
}

fn default_timeout_ms() -> u64 {
    10_000
}

fn default_max_in_flight() -> usize {
    1_000
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum OpName {
    #[serde(alias = "INSERT")]
    Insert,
    #[serde(alias = "UPDATE")]
    Update,
    #[serde(alias = "DELETE")]
    Delete,
}

impl From<OpName> for Op {
    fn from(op: OpName) -> Op {
        match op {
            OpName::Insert => Op::Insert,
            OpName::Update => Op::Update,
            OpName::Delete => Op::Delete,
        }
    }
}

/// How the handler authenticates to the server.
#[derive(Debug, Clone)]
pub enum Auth {
    None,
    /// A `.creds` file (JWT and NKey seed), read by the client at connect.
    Credentials(PathBuf),
    Token(String),
    UserPassword(String, String),
}

/// The checked config.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    pub table: String,
    pub columns: Vec<String>,
    pub ops: Vec<Op>,
    pub urls: Vec<String>,
    pub stream: String,
    pub subject: SubjectTemplate,
    pub duplicate_window: Duration,
    pub timeout: Duration,
    pub max_in_flight: usize,
    pub tls: bool,
    pub ca_file: Option<PathBuf>,
    pub auth: Auth,
}

fn invalid(key: &'static str, msg: impl std::fmt::Display) -> NatsError {
    NatsError::Config {
        key,
        msg: msg.to_string(),
    }
}

/// A secret from a file, one trailing newline removed; empty is an error.
fn read_secret(key: &'static str, path: &PathBuf) -> Result<String, NatsError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))?;
    let secret = text
        .strip_suffix('\n')
        .map(|s| s.strip_suffix('\r').unwrap_or(s))
        .unwrap_or(&text);
    if secret.is_empty() {
        return Err(invalid(key, format!("{} is empty", path.display())));
    }
    Ok(secret.to_owned())
}

impl NatsConfig {
    /// Parse and check the config table for handler `handler` of daemon `daemon` (the
    /// `{daemon}` and `{handler}` placeholders). Reads the secret files; does not touch
    /// the network.
    pub fn from_handler_config(
        config: &HandlerConfig,
        daemon: &str,
        handler: &str,
    ) -> Result<NatsConfig, NatsError> {
        let file: NatsConfigFile = config
            .parse()
            .map_err(|e| NatsError::Parse(e.to_string()))?;
        if file.table.trim().is_empty() {
            return Err(invalid("table", "must not be empty"));
        }
        if file.columns.is_empty() {
            return Err(invalid("columns", "must name at least one column"));
        }
        let ops: Vec<Op> = match file.ops {
            None => vec![Op::Insert, Op::Update, Op::Delete],
            Some(ops) if ops.is_empty() => {
                return Err(invalid("ops", "must name at least one operation"))
            }
            Some(ops) => ops.into_iter().map(Op::from).collect(),
        };
        let urls = match file.url {
            Urls::One(u) => vec![u],
            Urls::Many(us) => us,
        };
        if urls.is_empty() {
            return Err(invalid("url", "names no server"));
        }
        for u in &urls {
            u.parse::<ServerAddr>()
                .map_err(|e| invalid("url", format!("{u:?} is not a NATS URL: {e}")))?;
        }
        if !valid_stream_name(&file.stream) {
            return Err(invalid(
                "stream",
                format!(
                    "{:?} is not a JetStream stream name (letters, digits, - and _)",
                    file.stream
                ),
            ));
        }
        let subject = SubjectTemplate::parse(&file.subject, &file.table, daemon, handler)?;
        if file.duplicate_window_secs == 0 {
            return Err(invalid("duplicate_window_secs", "must be at least 1"));
        }
        if file.timeout_ms == 0 {
            return Err(invalid("timeout_ms", "must be at least 1"));
        }
        if file.max_in_flight == 0 {
            return Err(invalid("max_in_flight", "must be at least 1"));
        }
        if let Some(ca) = &file.ca_file {
            std::fs::metadata(ca)
                .map_err(|e| invalid("ca_file", format!("cannot read {}: {e}", ca.display())))?;
        }
        let auth = match (
            file.credentials_file,
            file.token_file,
            file.user,
            file.password_file,
        ) {
            (None, None, None, None) => Auth::None,
            (Some(creds), None, None, None) => {
                std::fs::metadata(&creds).map_err(|e| {
                    invalid(
                        "credentials_file",
                        format!("cannot read {}: {e}", creds.display()),
                    )
                })?;
                Auth::Credentials(creds)
            }
            (None, Some(token), None, None) => Auth::Token(read_secret("token_file", &token)?),
            (None, None, Some(user), Some(password)) => {
                Auth::UserPassword(user, read_secret("password_file", &password)?)
            }
            (None, None, Some(_), None) => {
                return Err(invalid("user", "needs password_file"));
            }
            (None, None, None, Some(_)) => {
                return Err(invalid("password_file", "needs user"));
            }
            _ => {
                return Err(invalid(
                    "credentials_file",
                    "give one of credentials_file, token_file, or user with password_file",
                ))
            }
        };
        Ok(NatsConfig {
            table: file.table,
            columns: file.columns,
            ops,
            urls,
            stream: file.stream,
            subject,
            duplicate_window: Duration::from_secs(file.duplicate_window_secs),
            timeout: Duration::from_millis(file.timeout_ms),
            max_in_flight: file.max_in_flight,
            tls: file.tls,
            ca_file: file.ca_file,
            auth,
        })
    }

    /// The subjects the stream must capture: one per operation the handler publishes.
    pub fn stream_subjects(&self) -> Vec<String> {
        let mut subjects: Vec<String> =
            self.ops.iter().map(|op| self.subject.render(*op)).collect();
        subjects.sort();
        subjects.dedup();
        subjects
    }
}

/// JetStream's stream names: no spaces, dots, `*`, `>`, path separators; we allow the
/// portable subset.
fn valid_stream_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A subject template with `{table}`, `{daemon}` and `{handler}` filled in at start-up and
/// `{op}` (`insert`, `update`, `delete`) per change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectTemplate {
    /// The text around each `{op}`: `parts.join(op)` is the subject.
    parts: Vec<String>,
}

/// The placeholders a subject template may use.
pub const PLACEHOLDERS: [&str; 4] = ["table", "op", "daemon", "handler"];

impl SubjectTemplate {
    pub fn parse(
        template: &str,
        table: &str,
        daemon: &str,
        handler: &str,
    ) -> Result<SubjectTemplate, NatsError> {
        let mut parts = vec![String::new()];
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            parts
                .last_mut()
                .expect("parts is never empty")
                .push_str(&rest[..open]);
            let after = &rest[open + 1..];
            let close = after.find('}').ok_or_else(|| {
                invalid(
                    "subject",
                    format!("{template:?} has a {{ without a closing }}"),
                )
            })?;
            let name = &after[..close];
            let last = parts.last_mut().expect("parts is never empty");
            match name {
                "table" => last.push_str(table),
                "daemon" => last.push_str(daemon),
                "handler" => last.push_str(handler),
                "op" => parts.push(String::new()),
                other => {
                    return Err(invalid(
                        "subject",
                        format!(
                            "unknown placeholder {{{other}}} in {template:?} (known: {{{}}})",
                            PLACEHOLDERS.join("}, {")
                        ),
                    ))
                }
            }
            rest = &after[close + 1..];
        }
        if rest.contains('}') {
            return Err(invalid(
                "subject",
                format!("{template:?} has a }} without an opening {{"),
            ));
        }
        parts
            .last_mut()
            .expect("parts is never empty")
            .push_str(rest);
        let t = SubjectTemplate { parts };
        for op in [Op::Insert, Op::Update, Op::Delete] {
            let subject = t.render(op);
            check_subject(&subject).map_err(|why| {
                invalid(
                    "subject",
                    format!("{template:?} gives {subject:?}, which is not a NATS subject: {why}"),
                )
            })?;
        }
        Ok(t)
    }

    /// The subject of a change with operation `op`.
    pub fn render(&self, op: Op) -> String {
        let name = match op {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
        };
        self.parts.join(name)
    }
}

/// A subject to publish to: dot-separated non-empty tokens, no whitespace, no wildcards.
fn check_subject(subject: &str) -> Result<(), &'static str> {
    if subject.is_empty() {
        return Err("it is empty");
    }
    if subject.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("it holds white space");
    }
    for token in subject.split('.') {
        if token.is_empty() {
            return Err("it has an empty token");
        }
        if token.contains('*') || token.contains('>') {
            return Err("it holds a wildcard");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(template: &str) -> Result<SubjectTemplate, NatsError> {
        SubjectTemplate::parse(template, "mail_users", "mx1", "bus")
    }

    #[test]
    fn subject_templates_fill_in_their_placeholders() {
        let d = t(DEFAULT_SUBJECT).unwrap();
        assert_eq!(d.render(Op::Insert), "epidemic.mail_users.insert");
        assert_eq!(d.render(Op::Delete), "epidemic.mail_users.delete");
        let x = t("{daemon}.{handler}.{table}-{op}s.{op}").unwrap();
        assert_eq!(x.render(Op::Update), "mx1.bus.mail_users-updates.update");
        assert_eq!(t("fixed").unwrap().render(Op::Update), "fixed");
    }

    #[test]
    fn bad_subject_templates_name_the_key_and_the_problem() {
        let e = t("epidemic.{tabel}.{op}").unwrap_err().to_string();
        assert!(
            e.starts_with("invalid nats config: subject: unknown placeholder {tabel}"),
            "{e}"
        );
        assert!(e.contains("{table}, {op}, {daemon}, {handler}"), "{e}");
        for bad in [
            "epidemic.{table",
            "a}.b",
            "a..{op}",
            "a.*.{op}",
            "a b.{op}",
            ".{op}",
        ] {
            let e = t(bad).unwrap_err().to_string();
            assert!(e.starts_with("invalid nats config: subject:"), "{bad}: {e}");
        }
        // A table name that makes no subject.
        let e = SubjectTemplate::parse(DEFAULT_SUBJECT, "my table", "d", "h")
            .unwrap_err()
            .to_string();
        assert!(e.contains("white space"), "{e}");
    }
}
