//! How a delivery can fail, and whether trying again can help.

use std::time::Duration;

use epidemic_plugin_sdk::HandlerError;

/// A failed webhook config or delivery.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// The config table does not parse (an unknown key, a wrong type): serde's message,
    /// which names the key.
    #[error("{0}")]
    Parse(String),

    /// A bad `[handler.config]` value: names the key.
    #[error("invalid webhook config: {key}: {msg}")]
    Config { key: &'static str, msg: String },

    /// The request did not get an answer: connection refused or reset, a timeout, DNS, TLS.
    #[error("POST {url}: {source}")]
    Transport {
        url: String,
        #[source]
        source: ureq::Error,
    },

    /// The receiver answered with a status that is not 2xx.
    #[error(
        "POST {url}: HTTP {status}{}{}",
        retry_after.map(|d| format!(" (Retry-After {} s)", d.as_secs())).unwrap_or_default(),
        if body.is_empty() { String::new() } else { format!(": {body}") }
    )]
    Status {
        url: String,
        status: u16,
        /// The start of the response body, on one line.
        body: String,
        /// The receiver's `Retry-After`, if it sent one (429, 503).
        retry_after: Option<Duration>,
    },
}

impl WebhookError {
    /// Whether the change will fail the same way however often it is sent again: a 4xx
    /// other than 408 and 429, a redirect (webhooks are not followed across redirects),
    /// or a bad config. Everything about the connection is worth retrying: an expired
    /// certificate or a receiver that is down is fixed by an operator, not by the data.
    pub fn is_permanent(&self) -> bool {
        match self {
            WebhookError::Parse(_) | WebhookError::Config { .. } => true,
            WebhookError::Transport { .. } => false,
            WebhookError::Status { status, .. } => match *status {
                408 | 429 => false,
                300..=499 => true,
                _ => false,
            },
        }
    }
}

impl From<WebhookError> for HandlerError {
    fn from(e: WebhookError) -> Self {
        if e.is_permanent() {
            HandlerError::Permanent(e.to_string())
        } else {
            HandlerError::Retryable(e.to_string())
        }
    }
}

/// The start of a response body as one line for an error message: at most
/// [`BODY_EXCERPT_CHARS`] characters, control characters made spaces.
pub fn body_excerpt(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let one_line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let trimmed = one_line.trim();
    if trimmed.chars().count() <= BODY_EXCERPT_CHARS {
        trimmed.to_owned()
    } else {
        let head: String = trimmed.chars().take(BODY_EXCERPT_CHARS).collect();
        format!("{head}…")
    }
}

/// How much of a response body an error message keeps.
pub const BODY_EXCERPT_CHARS: usize = 300;

#[cfg(test)]
mod tests {
    use super::*;

    fn status(status: u16) -> WebhookError {
        WebhookError::Status {
            url: "http://x/".into(),
            status,
            body: String::new(),
            retry_after: None,
        }
    }

    #[test]
    fn which_statuses_are_permanent() {
        for s in [400, 401, 403, 404, 410, 422, 301] {
            assert!(status(s).is_permanent(), "{s}");
        }
        for s in [408, 429, 500, 502, 503, 504] {
            assert!(!status(s).is_permanent(), "{s}");
        }
    }

    #[test]
    fn body_excerpt_is_one_short_line() {
        assert_eq!(body_excerpt(b"  bad\nrow\r\n"), "bad row");
        let long = "x".repeat(1000);
        let e = body_excerpt(long.as_bytes());
        assert_eq!(e.chars().count(), BODY_EXCERPT_CHARS + 1);
        assert!(e.ends_with('…'));
    }
}
