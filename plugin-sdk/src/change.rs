//! The ordinary Rust types plugin code works with: [`Value`], [`Op`], [`Change`],
//! [`Subscription`]. Their stable-ABI twins live in [`crate::abi`]; conversion happens at
//! the library boundary ([`crate::boundary`]) and nowhere else.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// One column value, as the database stored it.
///
/// Its serde form is tagged (`{"Int": 5}`, `"Null"`) so it round-trips exactly, bytes
/// and non-finite floats included (`{"Float": "inf"}`, which JSON has no number for);
/// [`Change::to_json`] gives the plain form handlers and scripts want.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Value {
    Null,
    Int(i64),
    Float(#[serde(with = "any_float")] f64),
    Text(String),
    Bytes(Vec<u8>),
}

impl Value {
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// The value as text, if it is text.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Text(s) => Some(s),
            _ => None,
        }
    }

    /// The value as an integer: integers as they are, text that parses as one.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Text(s) => s.trim().parse().ok(),
            _ => None,
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => f.write_str("NULL"),
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => write!(f, "{x}"),
            Value::Text(s) => f.write_str(s),
            Value::Bytes(b) => write!(f, "<{} bytes>", b.len()),
        }
    }
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}
impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Float(v)
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Text(v.to_owned())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Text(v)
    }
}
impl From<Vec<u8>> for Value {
    fn from(v: Vec<u8>) -> Self {
        Value::Bytes(v)
    }
}
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

/// The kind of row change.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Op {
    #[default]
    Insert,
    Update,
    Delete,
}

impl Op {
    /// The one-letter code backends store in their log tables: `I`, `U`, `D`.
    pub fn code(self) -> &'static str {
        match self {
            Op::Insert => "I",
            Op::Update => "U",
            Op::Delete => "D",
        }
    }

    /// The operation for a one-letter code, if it is one.
    pub fn from_code(code: &str) -> Option<Op> {
        match code {
            "I" => Some(Op::Insert),
            "U" => Some(Op::Update),
            "D" => Some(Op::Delete),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "INSERT",
            Op::Update => "UPDATE",
            Op::Delete => "DELETE",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a change comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// A change an application committed, read from the log.
    #[default]
    Live,
    /// A row as it stood when a snapshot of the table read it (a backfill or resync):
    /// delivered as an INSERT of the row's current values.
    Snapshot,
    /// A marker a backfill wrote into the table's log. Backends deliver it in the stream
    /// like a change; the host consumes it, and it never reaches a handler.
    Watermark,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Live => "live",
            Origin::Snapshot => "snapshot",
            Origin::Watermark => "watermark",
        }
    }
}

/// One row change, as a handler receives it.
///
/// `columns` names the columns the handler subscribed to; `old` and `new` hold their
/// values in the same order (`old` is `None` for an INSERT, `new` for a DELETE). The
/// row's primary key comes with every change, whatever the handler subscribed to.
///
/// Use [`Change::stable_id`] as an idempotency key outside Epidemic: it is unique in the
/// database for ever. [`Change::id`] is only a position in one table's log.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Change {
    /// The change's position in its table's log: increasing in commit order for one row,
    /// unique within the log while the log exists. What the host acknowledges.
    pub id: i64,
    /// Unique in this database for ever, including after `uninstall` + `install` and
    /// after a log table was recreated: an identity of the log (made when the log was
    /// created) and the change's position in it, as text. Use it as an idempotency key
    /// (an HTTP `Idempotency-Key`, a broker's message id).
    #[serde(default)]
    pub stable_id: String,
    /// The schema the table lives in, on databases that have schemas (PostgreSQL: always,
    /// `public` included); `None` elsewhere.
    #[serde(default)]
    pub schema: Option<String>,
    /// The table, as the handler subscribed to it (`users`; on PostgreSQL `app.users`
    /// for a table outside `public`).
    pub table: String,
    pub op: Op,
    #[serde(default)]
    pub origin: Origin,
    /// The names of the row's key columns: its primary key, or the columns the config
    /// names as its key (`[table.NAME] key = [..]`).
    #[serde(default = "no_columns")]
    pub key_columns: Arc<[String]>,
    /// The row's key after the change (for a DELETE: before it), in `key_columns` order.
    #[serde(default)]
    pub key: Vec<Value>,
    /// The key before an UPDATE that changed it; `None` when the key did not change.
    #[serde(default)]
    pub old_key: Option<Vec<Value>>,
    pub columns: Arc<[String]>,
    pub old: Option<Vec<Value>>,
    pub new: Option<Vec<Value>>,
    /// When the change was captured, in microseconds since the Unix epoch (0 if unknown).
    pub changed_at_us: i64,
    /// The writing transaction, where the backend knows it cheaply (PostgreSQL: its
    /// `xid8`); changes of one transaction share it.
    #[serde(default)]
    pub txid: Option<i64>,
    /// A commit-order token, where the backend has one: for one consumer it never goes
    /// down from one change to the next, and a change with a smaller value was committed
    /// before one with a larger value. See each backend's documentation for its grain.
    #[serde(default)]
    pub commit_seq: Option<i64>,
    /// Which delivery of this change to this handler this is: 1 on the first try, more
    /// on retries (0 in a change no host has delivered yet).
    #[serde(default)]
    pub attempt: u32,
}

fn no_columns() -> Arc<[String]> {
    Arc::from(Vec::new())
}

impl Change {
    fn index(&self, column: &str) -> Option<usize> {
        self.columns.iter().position(|c| c == column)
    }

    /// The value a column had before the change (`None` for an INSERT or an unknown column).
    pub fn old_value(&self, column: &str) -> Option<&Value> {
        let i = self.index(column)?;
        self.old.as_ref().and_then(|v| v.get(i))
    }

    /// The value a column has after the change (`None` for a DELETE or an unknown column).
    pub fn new_value(&self, column: &str) -> Option<&Value> {
        let i = self.index(column)?;
        self.new.as_ref().and_then(|v| v.get(i))
    }

    /// The current value: the new one, or for a DELETE the old one.
    pub fn value(&self, column: &str) -> Option<&Value> {
        self.new_value(column).or_else(|| self.old_value(column))
    }

    /// Whether this change altered the column (always true for INSERT and DELETE).
    pub fn changed(&self, column: &str) -> bool {
        match self.op {
            Op::Insert | Op::Delete => self.index(column).is_some(),
            Op::Update => self.old_value(column) != self.new_value(column),
        }
    }

    /// The value of one key column (after the change; before it for a DELETE).
    pub fn key_value(&self, column: &str) -> Option<&Value> {
        let i = self.key_columns.iter().position(|c| c == column)?;
        self.key.get(i)
    }

    /// Whether this UPDATE moved the row to another key.
    pub fn key_changed(&self) -> bool {
        self.old_key.is_some()
    }

    /// The change as one JSON object: `{"id", "stable_id", "table", "op", "origin",
    /// "key": {..}, "old": {..}, "new": {..}, ...}` with plain values (bytes as hex).
    pub fn to_json(&self) -> serde_json::Value {
        let row = |names: &[String], vals: Option<&Vec<Value>>| match vals {
            None => serde_json::Value::Null,
            Some(vals) => serde_json::Value::Object(
                names
                    .iter()
                    .zip(vals)
                    .map(|(c, v)| (c.clone(), value_to_json(v)))
                    .collect(),
            ),
        };
        let mut json = serde_json::json!({
            "id": self.id,
            "stable_id": self.stable_id,
            "table": self.table,
            "op": self.op.as_str(),
            "origin": self.origin.as_str(),
            "key": row(&self.key_columns, Some(&self.key)),
            "old": row(&self.columns, self.old.as_ref()),
            "new": row(&self.columns, self.new.as_ref()),
            "changed_at_us": self.changed_at_us,
            "attempt": self.attempt,
        });
        let obj = json.as_object_mut().expect("an object");
        if let Some(schema) = &self.schema {
            obj.insert("schema".into(), schema.clone().into());
        }
        if let Some(old_key) = &self.old_key {
            obj.insert("old_key".into(), row(&self.key_columns, Some(old_key)));
        }
        if let Some(txid) = self.txid {
            obj.insert("txid".into(), txid.into());
        }
        if let Some(seq) = self.commit_seq {
            obj.insert("commit_seq".into(), seq.into());
        }
        json
    }
}

/// A value as plain JSON: numbers, text, `null`; bytes as lowercase hex; a float JSON has
/// no number for as `"inf"`, `"-inf"` or `"NaN"` (not `null`, which is SQL's NULL).
pub fn value_to_json(v: &Value) -> serde_json::Value {
    match v {
        Value::Null => serde_json::Value::Null,
        Value::Int(i) => (*i).into(),
        Value::Float(f) => serde_json::Number::from_f64(*f).map_or_else(
            || {
                let text = if f.is_nan() {
                    "NaN"
                } else if *f > 0.0 {
                    "inf"
                } else {
                    "-inf"
                };
                serde_json::Value::String(text.into())
            },
            serde_json::Value::Number,
        ),
        Value::Text(s) => s.clone().into(),
        // Bytes as an array of numbers would be ambiguous with text; use lowercase hex.
        Value::Bytes(b) => b
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect::<String>()
            .into(),
    }
}

/// Which operations a subscription wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ops {
    pub insert: bool,
    pub update: bool,
    pub delete: bool,
}

impl Ops {
    pub const ALL: Ops = Ops {
        insert: true,
        update: true,
        delete: true,
    };

    pub fn contains(self, op: Op) -> bool {
        match op {
            Op::Insert => self.insert,
            Op::Update => self.update,
            Op::Delete => self.delete,
        }
    }
}

impl fmt::Display for Ops {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = [Op::Insert, Op::Update, Op::Delete]
            .into_iter()
            .filter(|op| self.contains(*op))
            .map(Op::as_str)
            .collect();
        f.write_str(&names.join(","))
    }
}

/// What a handler wants to hear about: a table, the columns it needs, the operations.
///
/// An UPDATE reaches the handler only when one of `columns` changed, or when it moved
/// the row to another key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscription {
    pub table: String,
    pub columns: Vec<String>,
    pub ops: Ops,
}

impl Subscription {
    /// All operations on `table`, for the given columns.
    pub fn new<C: Into<String>>(
        table: impl Into<String>,
        columns: impl IntoIterator<Item = C>,
    ) -> Self {
        Subscription {
            table: table.into(),
            columns: columns.into_iter().map(Into::into).collect(),
            ops: Ops::ALL,
        }
    }

    /// Restrict the subscription to these operations.
    pub fn ops(mut self, ops: &[Op]) -> Self {
        self.ops = Ops {
            insert: ops.contains(&Op::Insert),
            update: ops.contains(&Op::Update),
            delete: ops.contains(&Op::Delete),
        };
        self
    }
}

impl Subscription {
    /// Whether `change` is for this subscription: same table, a wanted operation, and for
    /// an UPDATE at least one of the subscribed columns changed or the row's key did.
    pub fn wants(&self, change: &Change) -> bool {
        change.table == self.table
            && self.ops.contains(change.op)
            && (change.op != Op::Update
                || change.key_changed()
                || self.columns.iter().any(|c| change.changed(c)))
    }

    /// `change` narrowed to this subscription's columns, in the subscription's order.
    pub fn project(&self, change: &Change) -> Change {
        let idx: Vec<Option<usize>> = self
            .columns
            .iter()
            .map(|c| change.columns.iter().position(|x| x == c))
            .collect();
        let pick = |vals: &Option<Vec<Value>>| {
            vals.as_ref().map(|v| {
                idx.iter()
                    .map(|i| i.and_then(|i| v.get(i).cloned()).unwrap_or(Value::Null))
                    .collect()
            })
        };
        Change {
            stable_id: change.stable_id.clone(),
            schema: change.schema.clone(),
            table: change.table.clone(),
            key_columns: change.key_columns.clone(),
            key: change.key.clone(),
            old_key: change.old_key.clone(),
            columns: self.columns.iter().cloned().collect(),
            old: pick(&change.old),
            new: pick(&change.new),
            ..*change
        }
    }
}

/// A float as a JSON number when it is finite, else as `"inf"`, `"-inf"` or `"NaN"`
/// (serde_json would write `null` and fail to read it back).
mod any_float {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(f: &f64, s: S) -> Result<S::Ok, S::Error> {
        if f.is_finite() {
            s.serialize_f64(*f)
        } else if f.is_nan() {
            s.serialize_str("NaN")
        } else if *f > 0.0 {
            s.serialize_str("inf")
        } else {
            s.serialize_str("-inf")
        }
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Form {
        Number(f64),
        Text(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        match Form::deserialize(d)? {
            Form::Number(f) => Ok(f),
            Form::Text(t) => match t.as_str() {
                "inf" => Ok(f64::INFINITY),
                "-inf" => Ok(f64::NEG_INFINITY),
                "NaN" => Ok(f64::NAN),
                other => Err(serde::de::Error::custom(format!(
                    "not a float: {other:?} (expected a number, \"inf\", \"-inf\" or \"NaN\")"
                ))),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(op: Op, old: Option<Vec<Value>>, new: Option<Vec<Value>>) -> Change {
        Change {
            id: 1,
            table: "t".into(),
            op,
            columns: vec!["a".to_string(), "b".to_string()].into(),
            old,
            new,
            ..Change::default()
        }
    }

    #[test]
    fn values_round_trip_through_json_non_finite_floats_included() {
        let values = vec![
            Value::Null,
            Value::Int(-7),
            Value::Float(1.5),
            Value::Float(f64::INFINITY),
            Value::Float(f64::NEG_INFINITY),
            Value::Text("inf".into()),
            Value::Bytes(vec![0, 255]),
        ];
        let json = serde_json::to_string(&values).unwrap();
        assert!(json.contains(r#"{"Float":"inf"}"#), "{json}");
        assert!(json.contains(r#"{"Float":1.5}"#), "{json}");
        let back: Vec<Value> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, values);
        let nan: Value =
            serde_json::from_str(&serde_json::to_string(&Value::Float(f64::NAN)).unwrap()).unwrap();
        assert!(matches!(nan, Value::Float(f) if f.is_nan()));
        assert!(serde_json::from_str::<Value>(r#"{"Float":"many"}"#).is_err());
        assert_eq!(value_to_json(&Value::Float(f64::NEG_INFINITY)), "-inf");
        assert_eq!(value_to_json(&Value::Null), serde_json::Value::Null);
    }

    #[test]
    fn changed_compares_old_and_new_per_column() {
        let c = change(
            Op::Update,
            Some(vec![1.into(), "x".into()]),
            Some(vec![1.into(), "y".into()]),
        );
        assert!(!c.changed("a"));
        assert!(c.changed("b"));
        assert!(!c.changed("nope"));
    }

    #[test]
    fn value_falls_back_to_old_for_delete() {
        let c = change(Op::Delete, Some(vec![7.into(), Value::Null]), None);
        assert_eq!(c.value("a"), Some(&Value::Int(7)));
        assert_eq!(c.new_value("a"), None);
        assert_eq!(c.to_json()["old"]["b"], serde_json::Value::Null);
    }
}
