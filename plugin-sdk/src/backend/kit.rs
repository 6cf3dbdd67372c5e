//! What every backend needs the same way, so that three backends say it once: the time,
//! the messages the host and the operator rely on, stable ids, key images, dead-letter
//! rows and the bench's scratch-table guard.

use super::{BackendError, Consumer};
use crate::change::{Op, Value};
use crate::ops::{DeadLetter, SCRATCH_TABLE};

/// Now, in microseconds since the Unix epoch (0 if the clock is before it).
pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// The error for a consumer whose cursor is gone (forgotten, deleted by hand, or never
/// registered): the host registers it again, which says loudly what may be missed.
pub fn not_registered(consumer: &Consumer) -> BackendError {
    BackendError::Evicted(format!(
        "consumer {consumer} is not registered (its cursor is gone); it must register again"
    ))
}

/// The error for an ack or heartbeat that updated no cursor because the consumer was
/// evicted meanwhile.
pub fn evicted(consumer: &Consumer) -> BackendError {
    BackendError::Evicted(format!(
        "consumer {consumer} was evicted (unseen longer than consumer_ttl); it must register again"
    ))
}

/// The error for a watched table with no primary key and no `key` in the config.
pub fn no_key(table: &str) -> BackendError {
    BackendError::Invalid(format!(
        "table {table} has no primary key: add one, or name the columns that identify a row \
         in the config ([table.{table}] key = [\"column\", ...])"
    ))
}

/// The error for key columns named in the config that the table does not have.
pub fn no_such_key_column(table: &str, column: &str) -> BackendError {
    BackendError::Invalid(format!(
        "[table.{table}] key: table {table} has no column {column}"
    ))
}

/// A change's stable id: the identity of its log (random, made when the log table was
/// created, so a log created again never repeats one) and its position in that log.
pub fn stable_id(log_identity: &str, id: i64) -> String {
    format!("{log_identity}-{id}")
}

/// The key of a change from the key columns' old and new values: the key after the change
/// (before it for a DELETE), and the key before an UPDATE that changed it.
pub fn row_key(
    op: Op,
    old: Option<Vec<Value>>,
    new: Option<Vec<Value>>,
) -> (Vec<Value>, Option<Vec<Value>>) {
    match (op, old, new) {
        (Op::Update, Some(old), Some(new)) => {
            let moved = old != new;
            (new, moved.then_some(old))
        }
        (_, _, Some(new)) => (new, None),
        (_, Some(old), None) => (old, None),
        (_, None, None) => (Vec::new(), None),
    }
}

/// A stored dead letter's operation; the column is only ever written from an [`Op`].
pub fn stored_op(code: &str) -> Op {
    Op::from_code(code).unwrap_or(Op::Update)
}

/// The columns of a dead-letter table, in the order [`DeadLetterRow`] reads them.
pub const DEAD_LETTER_COLUMNS: [&str; 11] = [
    "id",
    "daemon",
    "handler",
    "source_table",
    "change_id",
    "op",
    "change",
    "error",
    "attempts",
    "failed_at",
    "retry_requested",
];

/// One row of a dead-letter table as a backend read it, in [`DEAD_LETTER_COLUMNS`] order
/// (`failed_at` as microseconds since the epoch).
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetterRow {
    pub id: i64,
    pub daemon: String,
    pub handler: String,
    pub table: String,
    pub change_id: i64,
    pub op: String,
    pub change: String,
    pub error: String,
    pub attempts: i64,
    pub failed_at_us: i64,
    pub retry_requested: bool,
}

impl From<DeadLetterRow> for DeadLetter {
    fn from(r: DeadLetterRow) -> Self {
        DeadLetter {
            id: r.id,
            daemon: r.daemon,
            handler: r.handler,
            table: r.table,
            change_id: r.change_id,
            op: stored_op(&r.op),
            change: r.change,
            error: r.error,
            attempts: u32::try_from(r.attempts.max(0)).unwrap_or(u32::MAX),
            failed_at_us: r.failed_at_us,
            retry_requested: r.retry_requested,
        }
    }
}

/// `epidemic bench` works on [`SCRATCH_TABLE`] only, never on a user's table.
pub fn check_scratch(table: &str) -> Result<(), BackendError> {
    if table != SCRATCH_TABLE {
        return Err(BackendError::Invalid(format!(
            "bench works only on {SCRATCH_TABLE}, not {table}"
        )));
    }
    Ok(())
}

/// `%XX` escapes of a URL part decoded (no `+` for space: URL parameters as libpq and the
/// MySQL driver read them); an escape that is not two hex digits, or bytes that are not
/// UTF-8, are an error naming the text.
pub fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent-encoding in {s:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8 once decoded"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_of_an_update_that_moved_the_row_carries_both_images() {
        let (key, old) = row_key(Op::Update, Some(vec![1.into()]), Some(vec![2.into()]));
        assert_eq!((key, old), (vec![Value::Int(2)], Some(vec![Value::Int(1)])));
        let (key, old) = row_key(Op::Update, Some(vec![1.into()]), Some(vec![1.into()]));
        assert_eq!((key, old), (vec![Value::Int(1)], None));
        let (key, old) = row_key(Op::Delete, Some(vec![3.into()]), None);
        assert_eq!((key, old), (vec![Value::Int(3)], None));
    }

    #[test]
    fn scratch_guard_refuses_other_tables() {
        assert!(check_scratch(SCRATCH_TABLE).is_ok());
        assert!(check_scratch("mail_users").is_err());
    }
}
