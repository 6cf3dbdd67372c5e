//! `webhook`: an Epidemic handler plugin that POSTs every change, as JSON, to an HTTP(S)
//! endpoint: signed, with an idempotency key, and with outcomes the daemon can act on.
//!
//! # What the receiver gets
//!
//! One `POST` per change (the default), or one per batch of up to `batch_max` changes:
//!
//! - **body**: the change as one JSON object (the SDK's `Change::to_json`):
//!   `{"id": 42, "stable_id": "9f2c…-42", "table": "users", "op": "UPDATE", "origin": "live", "key": {"id": 7}, "old": {"name": "ann"}, "new": {"name": "anna"}, "changed_at_us": 1700000000000000, "attempt": 1}`
//!   (`old` is `null` for an INSERT, `new` for a DELETE; binary values are lowercase hex;
//!   `old_key`, `schema`, `txid` and `commit_seq` appear where they apply). With
//!   `batch_max` > 1 the body is always a JSON array of such objects, in commit order
//!   (an array of one when only one change is in hand).
//! - `Content-Type: application/json`
//! - `Idempotency-Key`: the change's `stable_id`, unique in the database for ever. A
//!   change sent again (a retry, or a redelivery after the daemon crashed between the
//!   receiver's answer and its acknowledgement) carries the same key, so a receiver that
//!   remembers the keys it processed does each change once. For a batch it is
//!   `FIRST..LAST`, the stable ids of its first and last change. A batch sent again may be
//!   cut differently (after a crash, or when the daemon retries its failed part), so a
//!   batch receiver deduplicates on each element's `stable_id`, not on the header.
//! - `Epidemic-Signature: sha256=HEX` when `secret_file` is set: the lowercase hex
//!   HMAC-SHA256 of the exact body bytes, keyed with the secret file's contents (one
//!   trailing newline removed). See [Verifying the signature](#verifying-the-signature).
//! - `User-Agent: epidemic-webhook/VERSION`, and the `headers` from the config.
//!
//! # Outcome
//!
//! | the request | the handler returns |
//! |---|---|
//! | answered 2xx | success |
//! | answered 3xx, or 4xx other than 408 and 429 | a permanent error: dead-lettered at once; the dead letter's error holds the status and the start of the response body (300 characters) |
//! | answered 5xx, 408 or 429 | a retryable error: retried with backoff, then dead-lettered (or retried for ever with `on_failure = "block"`) |
//! | answered 429 or 503 with `Retry-After` (seconds or an HTTP date) | the handler waits that long itself (at most `retry_after_max_ms`), then returns a retryable error, so the retry never comes earlier than the receiver asked while the wait stays short enough for a shutdown |
//! | no answer: connection refused or reset, DNS failure, TLS failure, connect or read timeout | a retryable error |
//!
//! Redirects are not followed: a webhook URL that redirects is a config mistake, and
//! following it would resend a signed body somewhere else. A TLS failure (an expired or
//! untrusted certificate) is retryable because it is about the endpoint, not the change:
//! an operator fixes it and the changes go through, from the dead letters if need be
//! (`epidemic dead-letters retry`). For a receiver that must get every change, use
//! `on_failure = "block"` on the `[[handler]]` entry so an outage is waited out instead
//! of dead-lettering.
//!
//! # Config
//!
//! ```toml
//! [[handler]]
//! name = "crm"
//! plugin = "webhook"                         # = libepidemic_webhook.so
//! on_failure = "block"                       # wait out a receiver outage (see above)
//! [handler.config]
//! table = "accounts"                         # required
//! columns = ["login", "plan"]                # required: what goes in old/new
//! ops = ["insert", "delete"]                 # default: all three
//! url = "https://crm.example.org/hooks/epidemic"  # required: http:// or https://
//! headers = { Authorization = "Bearer 1234" }     # optional; not Content-Type, Idempotency-Key, Epidemic-Signature
//! secret_file = "/etc/epidemic/crm.secret"   # optional: sign bodies (Epidemic-Signature)
//! batch_max = 1                              # default 1: one change per POST; >1: JSON arrays of up to that many
//! connect_timeout_ms = 5000                  # default 5 s
//! read_timeout_ms = 30000                    # default 30 s: sending the body, waiting for and reading the answer
//! retry_after_max_ms = 30000                 # default 30 s: the longest Retry-After waited out in the handler
//! ca_file = "/etc/epidemic/internal-ca.pem"  # optional: trust these CAs instead of the built-in roots
//! check_reachable = true                     # default true: refuse to start if the host does not accept a connection
//! ```
//!
//! At start the handler checks the config and, unless `check_reachable = false`, opens a
//! TCP connection to the URL's host and port (no request is sent). A bad URL, a missing
//! or empty secret file, an unreadable CA file, or an unreachable host stops the daemon
//! with one line naming the handler and the key:
//! `handler "crm" (webhook): invalid webhook config: url: crm.example.org:443 is unreachable: connection refused`.
//!
//! HTTPS is verified with rustls against Mozilla's root certificates (built in, so the
//! result does not depend on the host's CA bundle), or, with `ca_file`, against only the
//! CAs in that PEM file (a private CA). The proxy variables `HTTPS_PROXY`/`HTTP_PROXY`/
//! `ALL_PROXY` and `NO_PROXY` are honoured.
//!
//! # Verifying the signature
//!
//! Compute HMAC-SHA256 over the raw request body as received (before any JSON parsing),
//! keyed with the shared secret, and compare its lowercase hex with the header's value
//! after `sha256=`, in constant time. In Python:
//!
//! ```python
//! import hmac, hashlib
//! def verified(secret: bytes, body: bytes, header: str) -> bool:
//!     want = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
//!     return hmac.compare_digest(want, header)
//! ```
//!
//! From a shell: `openssl dgst -sha256 -hmac "$(cat crm.secret)" body.json`. Then skip the
//! change if its `Idempotency-Key` (or, for batches, each `stable_id`) was already
//! processed; answer 2xx only once the change is safely handled.
//!
//! # Client
//!
//! HTTP is `ureq` 3: a small, synchronous client (no async runtime inside a plugin that
//! the host calls from one thread), maintained, with rustls for TLS and a connection pool
//! so consecutive POSTs reuse one keep-alive connection. Signing is RustCrypto's `hmac`
//! and `sha2`.
//!
//! # What it does not do
//!
//! It sends one request at a time (the host calls a handler from one thread, and per-row
//! order must hold); it does not follow redirects, keep responses, or retry inside the
//! handler (the host owns retries and their backoff). Delivery is at-least-once: the
//! receiver deduplicates with the idempotency key.

mod config;
mod error;
mod sign;

use std::time::{Duration, SystemTime};

use epidemic_plugin_sdk::{
    BatchError, Change, Context, Handler, HandlerConfig, HandlerError, Subscription,
};
use ureq::tls::{Certificate, PemItem, RootCerts, TlsConfig};
use ureq::Agent;

pub use config::WebhookConfig;
pub use error::WebhookError;
pub use sign::{signature, verify};

/// The header carrying the body's HMAC-SHA256.
pub const SIGNATURE_HEADER: &str = "Epidemic-Signature";
const SIGNATURE_HEADER_LOWER: &str = "epidemic-signature";

/// The most of a response body read (to keep the connection reusable and to quote it).
const MAX_RESPONSE_BODY: u64 = 64 * 1024;

/// The handler: one per `[[handler]]` entry.
pub struct WebhookHandler {
    config: WebhookConfig,
    agent: Agent,
}

impl WebhookHandler {
    /// Build the handler from a checked config (no reachability check).
    pub fn from_config(config: WebhookConfig) -> Result<WebhookHandler, WebhookError> {
        let tls = match &config.ca_pem {
            None => TlsConfig::builder().root_certs(RootCerts::WebPki).build(),
            Some(pem) => {
                let mut certs: Vec<Certificate<'static>> = Vec::new();
                for item in ureq::tls::parse_pem(pem) {
                    match item {
                        Ok(PemItem::Certificate(c)) => certs.push(c),
                        Ok(_) => {}
                        Err(e) => {
                            return Err(WebhookError::Config {
                                key: "ca_file",
                                msg: format!("not PEM: {e}"),
                            })
                        }
                    }
                }
                if certs.is_empty() {
                    return Err(WebhookError::Config {
                        key: "ca_file",
                        msg: "holds no PEM certificate".into(),
                    });
                }
                TlsConfig::builder()
                    .root_certs(RootCerts::new_with_certs(&certs))
                    .build()
            }
        };
        let agent: Agent = Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .max_redirects_will_error(false)
            .timeout_connect(Some(config.connect_timeout))
            .timeout_send_request(Some(config.read_timeout))
            .timeout_send_body(Some(config.read_timeout))
            .timeout_recv_response(Some(config.read_timeout))
            .timeout_recv_body(Some(config.read_timeout))
            .user_agent(concat!("epidemic-webhook/", env!("CARGO_PKG_VERSION")))
            .tls_config(tls)
            .build()
            .into();
        Ok(WebhookHandler { config, agent })
    }

    pub fn config(&self) -> &WebhookConfig {
        &self.config
    }

    /// POST one body; `Ok` on a 2xx answer.
    fn post(&self, body: &[u8], idempotency_key: &str) -> Result<(), WebhookError> {
        let url = self.config.url.as_str();
        let mut request = self
            .agent
            .post(url)
            .header("Content-Type", "application/json")
            .header("Idempotency-Key", idempotency_key);
        if let Some(secret) = &self.config.secret {
            request = request.header(SIGNATURE_HEADER, signature(secret, body));
        }
        for (name, value) in &self.config.headers {
            request = request.header(name.as_str(), value.as_str());
        }
        let mut response = request
            .send(body)
            .map_err(|source| WebhookError::Transport {
                url: url.to_owned(),
                source,
            })?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        // Read the answer so the connection can be reused; its start goes into errors.
        let answer = response
            .body_mut()
            .with_config()
            .limit(MAX_RESPONSE_BODY)
            .read_to_vec()
            .unwrap_or_default();
        if (200..300).contains(&status) {
            return Ok(());
        }
        Err(WebhookError::Status {
            url: url.to_owned(),
            status,
            body: error::body_excerpt(&answer),
            retry_after,
        })
    }

    /// POST and turn the outcome into the handler's answer, waiting out a `Retry-After`.
    fn send(&self, body: &[u8], idempotency_key: &str) -> Result<(), HandlerError> {
        match self.post(body, idempotency_key) {
            Ok(()) => Ok(()),
            Err(e) => {
                if let WebhookError::Status {
                    retry_after: Some(wait),
                    ..
                } = &e
                {
                    if !e.is_permanent() {
                        std::thread::sleep((*wait).min(self.config.retry_after_max));
                    }
                }
                Err(e.into())
            }
        }
    }

    fn encode(value: &serde_json::Value) -> Result<Vec<u8>, HandlerError> {
        serde_json::to_vec(value)
            .map_err(|e| HandlerError::permanent(format!("cannot encode the change: {e}")))
    }

    /// One change per request.
    fn send_each(&self, changes: &[Change]) -> Result<(), BatchError> {
        for (i, change) in changes.iter().enumerate() {
            let body = Self::encode(&change.to_json()).map_err(|e| BatchError::new(i, e))?;
            self.send(&body, &change.stable_id)
                .map_err(|e| BatchError::new(i, e))?;
        }
        Ok(())
    }

    /// Up to `batch_max` changes per request, as a JSON array.
    fn send_batches(&self, changes: &[Change]) -> Result<(), BatchError> {
        let mut start = 0;
        for chunk in changes.chunks(self.config.batch_max) {
            let array = serde_json::Value::Array(chunk.iter().map(Change::to_json).collect());
            let body = Self::encode(&array).map_err(|e| BatchError::new(start, e))?;
            let key = batch_key(chunk);
            // Nothing of a failed request counts as done: the host retries its first
            // change alone and then sends the rest again.
            self.send(&body, &key)
                .map_err(|e| BatchError::new(start, e))?;
            start += chunk.len();
        }
        Ok(())
    }
}

/// The `Idempotency-Key` of a batch: `FIRST..LAST`, or the one stable id of a batch of one.
fn batch_key(chunk: &[Change]) -> String {
    match chunk {
        [] => String::new(),
        [only] => only.stable_id.clone(),
        [first, .., last] => format!("{}..{}", first.stable_id, last.stable_id),
    }
}

/// `Retry-After`: a number of seconds, or an HTTP date (time from now; none if past).
fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

impl Handler for WebhookHandler {
    const NAME: &'static str = "webhook";

    fn new(config: &HandlerConfig, ctx: &Context) -> Result<Self, HandlerError> {
        let config = WebhookConfig::from_handler_config(config)?;
        if config.check_reachable {
            config.check_reachable()?;
        }
        if config.secret.is_none() {
            ctx.logger().warn(&format!(
                "webhook {}: no secret_file: bodies to {} are not signed",
                ctx.handler(),
                config.url
            ));
        }
        ctx.logger().info(&format!(
            "webhook {} posts {} changes to {}",
            ctx.handler(),
            config.table,
            config.url
        ));
        Ok(WebhookHandler::from_config(config)?)
    }

    fn subscriptions(&self) -> Vec<Subscription> {
        vec![Subscription::new(&self.config.table, &self.config.columns).ops(&self.config.ops)]
    }

    fn handle_batch(&mut self, changes: &[Change]) -> Result<(), BatchError> {
        if self.config.batch_max > 1 {
            self.send_batches(changes)
        } else {
            self.send_each(changes)
        }
    }

    fn handle(&mut self, change: &Change) -> Result<(), HandlerError> {
        self.handle_batch(std::slice::from_ref(change))
            .map_err(|e| e.error)
    }
}

epidemic_plugin_sdk::export_handler!(WebhookHandler);

#[cfg(test)]
mod tests;
