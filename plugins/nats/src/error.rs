//! How publishing can fail, and whether trying again can help.

use epidemic_plugin_sdk::HandlerError;

/// A failed NATS config, start-up or publish.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    /// The config table does not parse (an unknown key, a wrong type): serde's message,
    /// which names the key.
    #[error("{0}")]
    Parse(String),

    /// A bad `[handler.config]` value, or a start-up step that failed because of one:
    /// names the key.
    #[error("invalid nats config: {key}: {msg}")]
    Config { key: &'static str, msg: String },

    /// The stream could not be looked up, created or given the subjects it needs.
    #[error("stream {stream}: {msg}")]
    Stream { stream: String, msg: String },

    /// The change could not be turned into a message.
    #[error("cannot encode the change: {0}")]
    Encode(String),

    /// A publish got no positive acknowledgement.
    #[error("publish to {subject}: {source}")]
    Publish {
        subject: String,
        #[source]
        source: async_nats::jetstream::context::PublishError,
    },
}

impl NatsError {
    /// Whether the change will fail the same way however often it is published again:
    /// only a message larger than the server's `max_payload`. A missing stream, a
    /// timeout, a broken connection or a full stream are fixed by the server or an
    /// operator, not by the change.
    pub fn is_permanent(&self) -> bool {
        use async_nats::jetstream::context::PublishErrorKind;
        match self {
            NatsError::Parse(_) | NatsError::Config { .. } | NatsError::Encode(_) => true,
            NatsError::Stream { .. } => false,
            NatsError::Publish { source, .. } => {
                matches!(source.kind(), PublishErrorKind::MaxPayloadExceeded)
            }
        }
    }
}

impl From<NatsError> for HandlerError {
    fn from(e: NatsError) -> Self {
        if e.is_permanent() {
            HandlerError::Permanent(e.to_string())
        } else {
            HandlerError::Retryable(e.to_string())
        }
    }
}
