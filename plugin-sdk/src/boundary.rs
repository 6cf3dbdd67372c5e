//! Conversions between the plain types of [`crate::change`] and their stable-ABI twins in
//! [`epidemic_plugin_abi`], used on both sides of the boundary so both convert the same
//! way. For the SDK's adapters and the host crate; handler authors never need it.
//!
//! Column-name lists cross as one shared `RArc` per table and batch, and
//! [`ColumnCache`] turns each back into one shared `Arc<[String]>`: a batch of a
//! thousand changes to one table allocates its column names once, not a thousand times.

use std::sync::Arc;

use abi_stable::std_types::{RArc, RString, RVec};
pub use epidemic_plugin_abi::{RChange, RColumns};
use epidemic_plugin_abi::{ROp, ROrigin, RSubscription, RValue, RWatch};

use crate::backend::{ColumnType, Watch};
use crate::change::{Change, Op, Ops, Origin, Subscription, Value};

impl From<Value> for RValue {
    fn from(v: Value) -> Self {
        match v {
            Value::Null => RValue::Null,
            Value::Int(i) => RValue::Int(i),
            Value::Float(f) => RValue::Float(f),
            Value::Text(s) => RValue::Text(s.into()),
            Value::Bytes(b) => RValue::Bytes(b.into()),
        }
    }
}

impl From<&Value> for RValue {
    fn from(v: &Value) -> Self {
        match v {
            Value::Null => RValue::Null,
            Value::Int(i) => RValue::Int(*i),
            Value::Float(f) => RValue::Float(*f),
            Value::Text(s) => RValue::Text(s.as_str().into()),
            Value::Bytes(b) => RValue::Bytes(b.as_slice().into()),
        }
    }
}

impl From<RValue> for Value {
    fn from(v: RValue) -> Self {
        match v {
            RValue::Null => Value::Null,
            RValue::Int(i) => Value::Int(i),
            RValue::Float(f) => Value::Float(f),
            RValue::Text(s) => Value::Text(s.into()),
            RValue::Bytes(b) => Value::Bytes(b.into()),
        }
    }
}

impl From<&RValue> for Value {
    fn from(v: &RValue) -> Self {
        match v {
            RValue::Null => Value::Null,
            RValue::Int(i) => Value::Int(*i),
            RValue::Float(f) => Value::Float(*f),
            RValue::Text(s) => Value::Text(s.as_str().to_owned()),
            RValue::Bytes(b) => Value::Bytes(b.to_vec()),
        }
    }
}

pub fn rop(op: Op) -> ROp {
    match op {
        Op::Insert => ROp::Insert,
        Op::Update => ROp::Update,
        Op::Delete => ROp::Delete,
    }
}

pub fn op(op: ROp) -> Op {
    match op {
        ROp::Insert => Op::Insert,
        ROp::Update => Op::Update,
        ROp::Delete => Op::Delete,
    }
}

fn rorigin(o: Origin) -> ROrigin {
    match o {
        Origin::Live => ROrigin::Live,
        Origin::Snapshot => ROrigin::Snapshot,
        Origin::Watermark => ROrigin::Watermark,
    }
}

fn origin(o: ROrigin) -> Origin {
    match o {
        ROrigin::Live => Origin::Live,
        ROrigin::Snapshot => Origin::Snapshot,
        ROrigin::Watermark => Origin::Watermark,
    }
}

fn rvalues(v: &[Value]) -> RVec<RValue> {
    v.iter().map(RValue::from).collect()
}

fn into_rvalues(v: Vec<Value>) -> RVec<RValue> {
    v.into_iter().map(RValue::from).collect()
}

fn values(v: &[RValue]) -> Vec<Value> {
    v.iter().map(Value::from).collect()
}

/// Whether two shared lists are the same allocation.
fn same_list(a: &RColumns, b: &RColumns) -> bool {
    std::ptr::eq::<RVec<RString>>(&**a, &**b)
}

/// Remembers the last few column lists seen on each side of the boundary, so that the
/// changes of one table share one list instead of each allocating its own.
#[derive(Default)]
pub struct ColumnCache {
    /// (plain list, its stable-ABI twin), most recently used first.
    pairs: Vec<(Arc<[String]>, RColumns)>,
}

/// Lists kept: a batch rarely mixes more tables than this.
const CACHED_LISTS: usize = 8;

impl ColumnCache {
    pub fn new() -> Self {
        Self::default()
    }

    fn remember(&mut self, plain: Arc<[String]>, r: RColumns) {
        self.pairs.insert(0, (plain, r));
        self.pairs.truncate(CACHED_LISTS);
    }

    /// The stable-ABI twin of a plain list (shared when the same list came before).
    pub fn to_r(&mut self, plain: &Arc<[String]>) -> RColumns {
        if let Some(i) = self
            .pairs
            .iter()
            .position(|(p, _)| Arc::ptr_eq(p, plain) || **p == **plain)
        {
            let r = self.pairs[i].1.clone();
            if i > 0 {
                let pair = self.pairs.remove(i);
                self.pairs.insert(0, pair);
            }
            return r;
        }
        let r: RColumns = RArc::new(plain.iter().map(|c| RString::from(c.as_str())).collect());
        self.remember(plain.clone(), r.clone());
        r
    }

    /// The plain twin of a stable-ABI list (shared when the same list came before).
    pub fn to_plain(&mut self, r: &RColumns) -> Arc<[String]> {
        if let Some(i) = self.pairs.iter().position(|(_, x)| {
            same_list(x, r) || (x.len() == r.len() && x.iter().zip(r.iter()).all(|(a, b)| a == b))
        }) {
            let p = self.pairs[i].0.clone();
            if i > 0 {
                let pair = self.pairs.remove(i);
                self.pairs.insert(0, pair);
            }
            return p;
        }
        let p: Arc<[String]> = r.iter().map(|c| c.as_str().to_owned()).collect();
        self.remember(p.clone(), r.clone());
        p
    }

    /// A change in its stable-ABI form.
    pub fn to_rchange(&mut self, c: &Change) -> RChange {
        RChange {
            id: c.id,
            stable_id: c.stable_id.as_str().into(),
            schema: c.schema.as_deref().map(RString::from).into(),
            table: c.table.as_str().into(),
            op: rop(c.op),
            origin: rorigin(c.origin),
            key_columns: self.to_r(&c.key_columns),
            key: rvalues(&c.key),
            old_key: c.old_key.as_deref().map(rvalues).into(),
            columns: self.to_r(&c.columns),
            old: c.old.as_deref().map(rvalues).into(),
            new: c.new.as_deref().map(rvalues).into(),
            changed_at_us: c.changed_at_us,
            txid: c.txid.into(),
            commit_seq: c.commit_seq.into(),
            attempt: c.attempt,
            ext: RVec::new(),
        }
    }

    /// [`ColumnCache::to_rchange`] for a change the caller no longer needs: its
    /// strings and byte strings become the stable-ABI ones without a copy (a backend's
    /// adapter hands its whole batch over this way).
    pub fn into_rchange(&mut self, c: Change) -> RChange {
        RChange {
            id: c.id,
            stable_id: c.stable_id.into(),
            schema: c.schema.map(RString::from).into(),
            table: c.table.into(),
            op: rop(c.op),
            origin: rorigin(c.origin),
            key_columns: self.to_r(&c.key_columns),
            key: into_rvalues(c.key),
            old_key: c.old_key.map(into_rvalues).into(),
            columns: self.to_r(&c.columns),
            old: c.old.map(into_rvalues).into(),
            new: c.new.map(into_rvalues).into(),
            changed_at_us: c.changed_at_us,
            txid: c.txid.into(),
            commit_seq: c.commit_seq.into(),
            attempt: c.attempt,
            ext: RVec::new(),
        }
    }

    /// A change in its plain form. Fields in `ext` that this SDK does not know are
    /// dropped (they come from a newer 0.2.x).
    pub fn to_change(&mut self, c: &RChange) -> Change {
        Change {
            id: c.id,
            stable_id: c.stable_id.as_str().to_owned(),
            schema: c
                .schema
                .as_ref()
                .map(|s| s.as_str().to_owned())
                .into_option(),
            table: c.table.as_str().to_owned(),
            op: op(c.op),
            origin: origin(c.origin),
            key_columns: self.to_plain(&c.key_columns),
            key: values(&c.key),
            old_key: c.old_key.as_ref().map(|v| values(v)).into_option(),
            columns: self.to_plain(&c.columns),
            old: c.old.as_ref().map(|v| values(v)).into_option(),
            new: c.new.as_ref().map(|v| values(v)).into_option(),
            changed_at_us: c.changed_at_us,
            txid: c.txid.into_option(),
            commit_seq: c.commit_seq.into_option(),
            attempt: c.attempt,
        }
    }
}

impl From<Subscription> for RSubscription {
    fn from(s: Subscription) -> Self {
        RSubscription {
            table: s.table.into(),
            columns: s.columns.into_iter().map(RString::from).collect(),
            insert: s.ops.insert,
            update: s.ops.update,
            delete: s.ops.delete,
        }
    }
}

impl From<RSubscription> for Subscription {
    fn from(s: RSubscription) -> Self {
        Subscription {
            table: s.table.into(),
            columns: s.columns.into_iter().map(String::from).collect(),
            ops: Ops {
                insert: s.insert,
                update: s.update,
                delete: s.delete,
            },
        }
    }
}

pub fn strings(v: &[String]) -> RVec<RString> {
    v.iter().map(|s| RString::from(s.as_str())).collect()
}

pub fn from_rstrings(v: RVec<RString>) -> Vec<String> {
    v.into_iter().map(String::from).collect()
}

impl From<&Watch> for RWatch {
    fn from(w: &Watch) -> Self {
        RWatch {
            table: w.table.as_str().into(),
            columns: strings(&w.columns),
            key: strings(&w.key),
            types: w.types.iter().map(|t| RString::from(t.as_str())).collect(),
        }
    }
}

impl From<RWatch> for Watch {
    fn from(w: RWatch) -> Self {
        Watch {
            table: w.table.into(),
            columns: from_rstrings(w.columns),
            key: from_rstrings(w.key),
            types: w.types.iter().map(|t| ColumnType::parse(t)).collect(),
        }
    }
}

pub fn rwatches(w: &[Watch]) -> RVec<RWatch> {
    w.iter().map(RWatch::from).collect()
}

pub fn watches(w: RVec<RWatch>) -> Vec<Watch> {
    w.into_iter().map(Watch::from).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_round_trips_and_shares_its_column_lists() {
        let columns: Arc<[String]> = vec!["a".to_owned(), "b".to_owned()].into();
        let key: Arc<[String]> = vec!["id".to_owned()].into();
        let c = Change {
            id: 7,
            stable_id: "x-7".into(),
            schema: Some("app".into()),
            table: "app.t".into(),
            op: Op::Update,
            origin: Origin::Snapshot,
            key_columns: key,
            key: vec![Value::Int(2)],
            old_key: Some(vec![Value::Int(1)]),
            columns,
            old: Some(vec![Value::Null, Value::Bytes(vec![0, 255])]),
            new: Some(vec![Value::Float(1.5), Value::Text("é".into())]),
            changed_at_us: 42,
            txid: Some(i64::MAX),
            commit_seq: None,
            attempt: 3,
        };
        let mut out = ColumnCache::new();
        let mut back = ColumnCache::new();
        let r1 = out.to_rchange(&c);
        let r2 = out.to_rchange(&c);
        assert!(same_list(&r1.columns, &r2.columns), "one list per table");
        let c1 = back.to_change(&r1);
        let c2 = back.to_change(&r2);
        assert_eq!(c1, c);
        assert!(Arc::ptr_eq(&c1.columns, &c2.columns));
        assert!(Arc::ptr_eq(&c1.key_columns, &c2.key_columns));
        // Handed over rather than copied: the same stable-ABI change.
        let r3 = out.into_rchange(c.clone());
        assert!(same_list(&r1.columns, &r3.columns));
        assert_eq!(back.to_change(&r3), c);
    }
}
