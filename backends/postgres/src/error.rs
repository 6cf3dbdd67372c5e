//! The backend's error type, how driver errors become one line, and how each maps onto
//! the SDK's [`BackendError`] kinds (the host branches on the kind, never on the text).

use epidemic_plugin_sdk::backend::BackendError;

use crate::ident::Ident;

/// Everything that can go wrong in the PostgreSQL backend. Messages are one line, name the
/// object concerned, and never contain a password.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// The SDK's message, which names the identifier.
    #[error("{0}")]
    InvalidIdentifier(String),
    #[error("invalid database option: {0}")]
    InvalidOption(String),
    #[error("invalid database url {url}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("table {0} does not exist")]
    MissingTable(String),
    #[error("{0} is not a table")]
    NotATable(String),
    #[error("column {column} of table {table} does not exist")]
    MissingColumn { table: String, column: String },
    #[error("column {column} of table {table} is watched but no longer exists (dropped or renamed?); change the handlers' columns or restore the column, then run `epidemic install`")]
    WatchedColumnGone { table: String, column: String },
    #[error("table {table} is in schema {schema}, which holds Epidemic's own objects; it cannot be watched")]
    OwnTable { table: String, schema: String },
    #[error("table {0} has no watched columns")]
    NoColumns(String),
    #[error("schema {0} exists but was not created by Epidemic; set another `schema` option")]
    ForeignSchema(String),
    #[error("table {0} is not installed; run `epidemic install` first")]
    NotInstalled(String),
    #[error("schema {0} does not exist; run `epidemic install` first")]
    NothingInstalled(String),
    #[error("a consumer must read at least one table")]
    NoTables,
    #[error("table {0} was installed by an older version of Epidemic (no key or stable ids in its registry); run `epidemic install`")]
    Outdated(String),
    #[error("the key of table {table} is ({}) now, but its backfill was paging by a key of {paging} columns: the key changed during the backfill; cancel it and request it again", .key.join(", "))]
    KeyChanged {
        table: String,
        key: Vec<String>,
        paging: usize,
    },
    #[error(
        "a key column of table {0} no longer exists (dropped or renamed?); see `epidemic status`"
    )]
    KeyColumnGone(String),
    #[error("log table {log} has no column {column}; run `epidemic install`")]
    LogColumnGone { log: String, column: String },
    #[error("a backfill of consumer {consumer} is already {state} (table {table}: {rows}); wait for it to finish, or cancel it")]
    BackfillBusy {
        consumer: String,
        state: &'static str,
        table: String,
        rows: String,
    },
    #[error("a backfill of consumer {0} needs at least one table")]
    NoBackfillTables(String),
    #[error(
        "schema {0} has no backfill table (installed by an older Epidemic); run `epidemic install`"
    )]
    NoBackfillTable(String),
    #[error("a backfill's progress in the database cannot be read or written: {0}")]
    BadProgress(String),
    /// A condition the SDK words for every backend (`kit::evicted`, `kit::no_key`...),
    /// with its kind.
    #[error("{0}")]
    Backend(BackendError),
    #[error("consumer {consumer}: ack token {token:?} is not a batch token of this backend")]
    BadToken { consumer: String, token: String },
    #[error("consumer {consumer}: ack for batch {token} but the batch in progress is another one (is a second daemon running with the same name?)")]
    StaleToken { consumer: String, token: String },
    #[error("consumer {0}: the cursor changed under this daemon (is a second daemon running with the same name?)")]
    CursorRace(String),
    /// A bug, not a condition: the statement built for the consumer returned a row of a
    /// log table it does not read.
    #[error("consumer {0}: reading the log returned a row of an unknown log table")]
    UnknownLog(String),
    #[error("the cursors in schema {schema} were written by another PostgreSQL cluster (system identifier {recorded}, this one is {current}), as after a dump restored here: nothing is read or pruned by them; run `epidemic install` (or restart the daemon), which restarts every consumer from the oldest change in the log")]
    ForeignCluster {
        schema: String,
        recorded: i64,
        current: i64,
    },
    #[error("cannot connect to {url}: {reason}")]
    Connect {
        url: String,
        reason: String,
        connection: bool,
    },
    /// A TLS handshake the server or our certificate check refused, or certificate
    /// files that cannot be used: retrying does not help until the configuration or the
    /// server's certificate changes.
    #[error("cannot connect to {url}: {reason}")]
    Tls { url: String, reason: String },
    /// The server refused the session: authentication (class 28: a wrong password, no
    /// `pg_hba.conf` line, a client certificate missing) or a database that does not
    /// exist. Configuration, as for MySQL's 1044/1045/1049.
    #[error("cannot connect to {url}: {reason}")]
    Refused { url: String, reason: String },
    #[error("{0}")]
    ConnectionLost(String),
    #[error("{context}: {}", describe(.source))]
    Sql {
        context: String,
        #[source]
        source: postgres::Error,
    },
}

impl From<BackendError> for PgError {
    fn from(e: BackendError) -> Self {
        PgError::Backend(e)
    }
}

impl PgError {
    /// Wrap a driver error with what we were doing.
    pub fn sql(context: impl Into<String>) -> impl FnOnce(postgres::Error) -> PgError {
        let context = context.into();
        move |source| PgError::Sql { context, source }
    }
}

impl From<PgError> for BackendError {
    fn from(e: PgError) -> Self {
        if let PgError::Backend(inner) = e {
            return inner;
        }
        let message = e.to_string();
        match &e {
            PgError::Sql { source, .. } if is_connection_error(source) => {
                BackendError::Connection(message)
            }
            PgError::Connect {
                connection: true, ..
            }
            | PgError::ConnectionLost(_) => BackendError::Connection(message),
            PgError::Sql { .. }
            | PgError::Connect { .. }
            | PgError::CursorRace(_)
            | PgError::UnknownLog(_)
            | PgError::ForeignCluster { .. }
            | PgError::StaleToken { .. }
            | PgError::BadProgress(_)
            // Returned as it is above.
            | PgError::Backend(_) => BackendError::Other(message),
            PgError::InvalidIdentifier(_)
            | PgError::InvalidOption(_)
            | PgError::InvalidUrl { .. }
            | PgError::Tls { .. }
            | PgError::Refused { .. }
            | PgError::MissingTable(_)
            | PgError::NotATable(_)
            | PgError::MissingColumn { .. }
            | PgError::WatchedColumnGone { .. }
            | PgError::NoColumns(_)
            | PgError::ForeignSchema(_)
            | PgError::NotInstalled(_)
            | PgError::NothingInstalled(_)
            | PgError::Outdated(_)
            | PgError::OwnTable { .. }
            | PgError::NoTables
            | PgError::KeyChanged { .. }
            | PgError::BackfillBusy { .. }
            | PgError::NoBackfillTables(_)
            | PgError::NoBackfillTable(_)
            | PgError::KeyColumnGone(_)
            | PgError::LogColumnGone { .. }
            | PgError::BadToken { .. } => BackendError::Invalid(message),
        }
    }
}

/// Wrap a driver error with what we were doing, except that a missing table or schema
/// of our own (`42P01`, `3F000`) means nothing is installed.
pub fn not_installed(
    schema: &Ident,
    context: impl Into<String>,
) -> impl FnOnce(postgres::Error) -> PgError + '_ {
    let context = context.into();
    move |e| {
        use postgres::error::SqlState;
        match e.code() {
            Some(c) if *c == SqlState::UNDEFINED_TABLE || *c == SqlState::INVALID_SCHEMA_NAME => {
                PgError::NothingInstalled(schema.to_string())
            }
            _ => PgError::Sql { context, source: e },
        }
    }
}

/// Whether the error means the connection is gone or the server is not accepting work
/// right now, so that reconnecting later is the cure.
pub fn is_connection_error(e: &postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    if let Some(code) = e.code() {
        let code = code.code();
        // Class 08 is "connection exception"; 57P01-57P03 are admin shutdown, crash
        // shutdown and "cannot connect now" (starting up, shutting down, recovering).
        return code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03");
    }
    // The driver's own timeout (connect_timeout) has no source to inspect; its kind is
    // private, so recognise it by its fixed message.
    if e.to_string() == "timeout waiting for server" {
        return true;
    }
    // Not reported by the server: socket errors carry an io::Error.
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.is::<std::io::Error>() {
            return true;
        }
        source = s.source();
    }
    false
}

/// A driver error as one line: its kind, then the server's message, detail and hint.
pub fn describe(e: &postgres::Error) -> String {
    let text = match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{}: {} ({})", db.severity(), db.message(), db.code().code());
            if let Some(d) = db.detail() {
                s.push_str("; ");
                s.push_str(d);
            }
            if let Some(h) = db.hint() {
                s.push_str("; hint: ");
                s.push_str(h);
            }
            s
        }
        None => match std::error::Error::source(e) {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        },
    };
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}
