//! The `[handler.config]` table of a webhook handler, and its checks at start-up.

use std::collections::BTreeMap;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use epidemic_plugin_sdk::{HandlerConfig, Op};
use serde::Deserialize;

use crate::error::WebhookError;

/// The config table as written in the file. See the crate docs for each key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WebhookConfigFile {
    table: String,
    columns: Vec<String>,
    ops: Option<Vec<OpName>>,
    url: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    secret_file: Option<PathBuf>,
    #[serde(default = "default_batch_max")]
    batch_max: usize,
    #[serde(default = "default_connect_timeout_ms")]
    connect_timeout_ms: u64,
    #[serde(default = "default_read_timeout_ms")]
    read_timeout_ms: u64,
    #[serde(default = "default_retry_after_max_ms")]
    retry_after_max_ms: u64,
    ca_file: Option<PathBuf>,
    #[serde(default = "default_true")]
    check_reachable: bool,
}

fn default_batch_max() -> usize {
    1
}

fn default_connect_timeout_ms() -> u64 {
    5_000
}

fn default_read_timeout_ms() -> u64 {
    30_000
}

fn default_retry_after_max_ms() -> u64 {
    30_000
}

fn default_true() -> bool {
    true
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

/// Headers the handler sets itself; the config may not set them.
pub const OWN_HEADERS: [&str; 4] = [
    "content-type",
    "idempotency-key",
    crate::SIGNATURE_HEADER_LOWER,
    "content-length",
];

/// The checked config.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    pub table: String,
    pub columns: Vec<String>,
    pub ops: Vec<Op>,
    pub url: url::Url,
    pub headers: Vec<(String, String)>,
    /// The HMAC key, read from `secret_file`.
    pub secret: Option<Vec<u8>>,
    pub batch_max: usize,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub retry_after_max: Duration,
    /// PEM certificates to trust instead of the built-in roots.
    pub ca_pem: Option<Vec<u8>>,
    pub check_reachable: bool,
}

fn invalid(key: &'static str, msg: impl std::fmt::Display) -> WebhookError {
    WebhookError::Config {
        key,
        msg: msg.to_string(),
    }
}

impl WebhookConfig {
    /// Parse and check the config table; reads the secret and CA files. Does not touch
    /// the network (see [`WebhookConfig::check_reachable`]).
    pub fn from_handler_config(config: &HandlerConfig) -> Result<WebhookConfig, WebhookError> {
        let file: WebhookConfigFile = config
            .parse()
            .map_err(|e| WebhookError::Parse(e.to_string()))?;
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
        let url = url::Url::parse(&file.url)
            .map_err(|e| invalid("url", format!("{:?} is not a URL: {e}", file.url)))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(invalid(
                "url",
                format!("{:?} is not an http:// or https:// URL", file.url),
            ));
        }
        if url.host_str().unwrap_or_default().is_empty() {
            return Err(invalid("url", format!("{:?} names no host", file.url)));
        }
        let mut headers = Vec::new();
        for (name, value) in file.headers {
            let lower = name.to_ascii_lowercase();
            if OWN_HEADERS.contains(&lower.as_str()) {
                return Err(invalid(
                    "headers",
                    format!("{name} is set by the handler itself"),
                ));
            }
            let valid_name = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
            if !valid_name {
                return Err(invalid("headers", format!("{name:?} is not a header name")));
            }
            if value.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
                return Err(invalid(
                    "headers",
                    format!("the value of {name} holds a control character"),
                ));
            }
            headers.push((name, value));
        }
        let secret = match &file.secret_file {
            None => None,
            Some(path) => {
                let mut bytes = std::fs::read(path).map_err(|e| {
                    invalid(
                        "secret_file",
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                // `echo secret > file` adds a newline that is not part of the secret.
                if bytes.ends_with(b"\n") {
                    bytes.pop();
                    if bytes.ends_with(b"\r") {
                        bytes.pop();
                    }
                }
                if bytes.is_empty() {
                    return Err(invalid(
                        "secret_file",
                        format!("{} is empty", path.display()),
                    ));
                }
                Some(bytes)
            }
        };
        let ca_pem =
            match &file.ca_file {
                None => None,
                Some(path) => Some(std::fs::read(path).map_err(|e| {
                    invalid("ca_file", format!("cannot read {}: {e}", path.display()))
                })?),
            };
        if file.batch_max == 0 {
            return Err(invalid("batch_max", "must be at least 1"));
        }
        if file.connect_timeout_ms == 0 {
            return Err(invalid("connect_timeout_ms", "must be at least 1"));
        }
        if file.read_timeout_ms == 0 {
            return Err(invalid("read_timeout_ms", "must be at least 1"));
        }
        Ok(WebhookConfig {
            table: file.table,
            columns: file.columns,
            ops,
            url,
            headers,
            secret,
            batch_max: file.batch_max,
            connect_timeout: Duration::from_millis(file.connect_timeout_ms),
            read_timeout: Duration::from_millis(file.read_timeout_ms),
            retry_after_max: Duration::from_millis(file.retry_after_max_ms),
            ca_pem,
            check_reachable: file.check_reachable,
        })
    }

    /// Open (and close) a TCP connection to the URL's host and port, so that a wrong host
    /// or port stops the daemon at start rather than filling the dead letters later. No
    /// request is sent.
    pub fn check_reachable(&self) -> Result<(), WebhookError> {
        let host = self.url.host_str().unwrap_or_default();
        let port = self.url.port_or_known_default().unwrap_or(80);
        // `host_str` keeps the brackets of an IPv6 literal; the resolver wants it bare.
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let addrs: Vec<_> = (bare, port)
            .to_socket_addrs()
            .map_err(|e| invalid("url", format!("cannot resolve {host}: {e}")))?
            .collect();
        let mut last = None;
        for addr in &addrs {
            match TcpStream::connect_timeout(addr, self.connect_timeout) {
                Ok(_) => return Ok(()),
                Err(e) => last = Some(e),
            }
        }
        Err(invalid(
            "url",
            match last {
                Some(e) => format!("{host}:{port} is unreachable: {e}"),
                None => format!("{host} resolves to no address"),
            },
        ))
    }
}
