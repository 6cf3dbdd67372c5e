//! The ordinary Rust types plugin code works with: [`Value`], [`Op`], [`Change`],
//! [`Subscription`]. Their stable-ABI twins live in [`crate::ffi`]; conversion happens
//! at the library boundary and nowhere else.

use std::fmt;
use std::sync::Arc;

use abi_stable::StableAbi;
use serde::{Deserialize, Serialize};

/// One column value, as the database stored it.
///
/// Its serde form is tagged (`{"Int": 5}`, `"Null"`) so it round-trips exactly, bytes
/// included; [`Change::to_json`] gives the plain form handlers and scripts want.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Value {
    Null,
    Int(i64),
    Float(f64),
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

/// The kind of row change. Shared as-is across the boundary (a plain `repr(u8)` enum).
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Op {
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

/// One captured row change.
///
/// `columns` names the watched columns; `old` and `new` hold their values in the same
/// order. `old` is `None` for an INSERT, `new` is `None` for a DELETE.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    /// The backend's id of this change: increasing in commit order for one row, unique
    /// within the table's log.
    pub id: i64,
    pub table: String,
    pub op: Op,
    pub columns: Arc<[String]>,
    pub old: Option<Vec<Value>>,
    pub new: Option<Vec<Value>>,
    /// When the change was captured, in microseconds since the Unix epoch (0 if unknown).
    pub changed_at_us: i64,
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

    /// The change as one JSON object: `{"id", "table", "op", "old": {..}, "new": {..}}`.
    pub fn to_json(&self) -> serde_json::Value {
        let row = |vals: &Option<Vec<Value>>| match vals {
            None => serde_json::Value::Null,
            Some(vals) => serde_json::Value::Object(
                self.columns
                    .iter()
                    .zip(vals)
                    .map(|(c, v)| (c.clone(), value_to_json(v)))
                    .collect(),
            ),
        };
        serde_json::json!({
            "id": self.id,
            "table": self.table,
            "op": self.op.as_str(),
            "old": row(&self.old),
            "new": row(&self.new),
            "changed_at_us": self.changed_at_us,
        })
    }
}

fn value_to_json(v: &Value) -> serde_json::Value {
    match v {
        Value::Null => serde_json::Value::Null,
        Value::Int(i) => (*i).into(),
        Value::Float(f) => serde_json::Number::from_f64(*f)
            .map_or(serde_json::Value::Null, serde_json::Value::Number),
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
/// An UPDATE reaches the handler only when one of `columns` changed.
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
    /// an UPDATE at least one of the subscribed columns changed.
    pub fn wants(&self, change: &Change) -> bool {
        change.table == self.table
            && self.ops.contains(change.op)
            && (change.op != Op::Update || self.columns.iter().any(|c| change.changed(c)))
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
            id: change.id,
            table: change.table.clone(),
            op: change.op,
            columns: self.columns.iter().cloned().collect(),
            old: pick(&change.old),
            new: pick(&change.new),
            changed_at_us: change.changed_at_us,
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
            changed_at_us: 0,
        }
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
