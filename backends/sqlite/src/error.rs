//! SQLite errors as the host's [`BackendError`] kinds: the host backs off and reconnects
//! on [`BackendError::Connection`] only, so a busy or locked database, a file that cannot
//! be opened or is no database are connection errors; everything else is unexpected SQL.

use epidemic_plugin_sdk::backend::BackendError;

pub(crate) fn sql_err(e: rusqlite::Error) -> BackendError {
    use rusqlite::ErrorCode::*;
    match e.sqlite_error_code() {
        Some(DatabaseBusy | DatabaseLocked | CannotOpen | SystemIoFailure | NotADatabase) => {
            BackendError::Connection(e.to_string())
        }
        _ => BackendError::Other(e.to_string()),
    }
}

/// [`sql_err`] for a statement of a plan, naming the statement when the error is not a
/// connection error (an install that fails says which DDL it could not run).
pub(crate) fn statement_err(e: rusqlite::Error, statement: &str) -> BackendError {
    match sql_err(e) {
        BackendError::Other(m) => BackendError::Other(format!("{m} in: {statement}")),
        other => other,
    }
}
