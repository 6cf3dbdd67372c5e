//! Test support for handler authors: build changes and feed them to a handler in a unit
//! test, without a database or the host, routed by the host's own [`Router`].
//!
//! ```
//! use epidemic_plugin_sdk::{testing, Change, Context, Handler, HandlerConfig, HandlerError, Subscription};
//!
//! struct Count(usize);
//! impl Handler for Count {
//!     const NAME: &'static str = "count";
//!     fn new(_: &HandlerConfig, _: &Context) -> Result<Self, HandlerError> { Ok(Count(0)) }
//!     fn subscriptions(&self) -> Vec<Subscription> { vec![Subscription::new("users", ["name"])] }
//!     fn insert(&mut self, _: &Change) -> Result<(), HandlerError> { self.0 += 1; Ok(()) }
//! }
//!
//! let mut h = testing::Harness::<Count>::new(serde_json::json!({})).unwrap();
//! h.send(testing::insert("users", &[("name", "ann".into())])).unwrap();
//! // An UPDATE that leaves the subscribed columns alone is not delivered, as in the host.
//! let delivered = h.send(testing::update("users", &[("name", "ann".into())], &[("name", "ann".into())])).unwrap();
//! assert!(!delivered);
//! assert_eq!(h.handler().0, 1);
//! ```

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use crate::backend::kit;
use crate::change::{Change, Op, Subscription, Value};
use crate::context::Context;
use crate::handler::{panic_message, BatchError, Handler, HandlerConfig, HandlerError};
use crate::routing::{Routed, Router, RowFilter};

static NEXT_ID: AtomicI64 = AtomicI64::new(1);

fn build(
    table: &str,
    op: Op,
    old: Option<&[(&str, Value)]>,
    new: Option<&[(&str, Value)]>,
) -> Change {
    let cols = old.or(new).unwrap_or(&[]);
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    Change {
        id,
        stable_id: kit::stable_id("test", id),
        table: table.to_owned(),
        op,
        columns: cols.iter().map(|(c, _)| (*c).to_owned()).collect(),
        old: old.map(|r| r.iter().map(|(_, v)| v.clone()).collect()),
        new: new.map(|r| r.iter().map(|(_, v)| v.clone()).collect()),
        ..Change::default()
    }
}

/// An INSERT of a row with these column values.
pub fn insert(table: &str, row: &[(&str, Value)]) -> Change {
    build(table, Op::Insert, None, Some(row))
}

/// An UPDATE; `old` and `new` must name the same columns in the same order.
pub fn update(table: &str, old: &[(&str, Value)], new: &[(&str, Value)]) -> Change {
    build(table, Op::Update, Some(old), Some(new))
}

/// A DELETE of a row that had these values.
pub fn delete(table: &str, old: &[(&str, Value)]) -> Change {
    build(table, Op::Delete, Some(old), None)
}

/// The change with its key taken from its own columns, as a backend fills it in:
/// `keyed(insert("users", &[("id", 1.into()), ..]), &["id"])`.
pub fn keyed(mut change: Change, key_columns: &[&str]) -> Change {
    let pick = |vals: &Option<Vec<Value>>| {
        vals.as_ref().map(|v| {
            key_columns
                .iter()
                .map(|k| {
                    change
                        .columns
                        .iter()
                        .position(|c| c == k)
                        .and_then(|i| v.get(i).cloned())
                        .unwrap_or(Value::Null)
                })
                .collect::<Vec<_>>()
        })
    };
    let (old, new) = (pick(&change.old), pick(&change.new));
    let (key, old_key) = kit::row_key(change.op, old, new);
    change.key_columns = key_columns
        .iter()
        .map(|k| (*k).to_owned())
        .collect::<Arc<[String]>>();
    change.key = key;
    change.old_key = old_key;
    change
}

/// Drives a handler the way the host does: routes changes with the host's own [`Router`]
/// (filters by the subscriptions, narrows to the subscribed columns, merges the columns
/// of several subscriptions on one table), calls [`Handler::handle_batch`] with what is
/// left, and turns a panic into [`HandlerError::Panic`].
pub struct Harness<H: Handler> {
    handler: H,
    router: Router,
}

impl<H: Handler> Harness<H> {
    /// Build the handler from a config table given as JSON (what `[handler.config]`
    /// holds), as daemon `test`, logging to stderr.
    pub fn new(config: serde_json::Value) -> Result<Self, HandlerError> {
        Self::with_context(config, &Context::for_tests(H::NAME))
    }

    /// Build the handler with a context of the test's choosing (another daemon name).
    pub fn with_context(config: serde_json::Value, ctx: &Context) -> Result<Self, HandlerError> {
        let handler = H::new(&HandlerConfig::from_json(config), ctx)?;
        let router = Router::new(handler.subscriptions());
        Ok(Harness { handler, router })
    }

    /// Judge changes by a row filter first, as the daemon does with `[[handler]] filter`
    /// (moves into and out of it become INSERTs and DELETEs). A refused row is an error
    /// at its index.
    pub fn with_filter(mut self, filter: std::sync::Arc<dyn RowFilter>) -> Self {
        self.router = self.router.with_filter(filter);
        self
    }

    /// Deliver a change. `Ok(false)` when no subscription wanted it.
    pub fn send(&mut self, change: Change) -> Result<bool, HandlerError> {
        match self.send_batch(&[change]) {
            Ok(n) => Ok(n == 1),
            Err(e) => Err(e.error),
        }
    }

    /// Deliver a batch as the daemon does: the wanted changes in one
    /// [`Handler::handle_batch`] call. Returns how many were delivered; on failure the
    /// index is into `changes`.
    pub fn send_batch(&mut self, changes: &[Change]) -> Result<usize, BatchError> {
        let mut routed = Vec::new();
        let mut refused = None;
        for (i, r) in self.router.route_batch(changes) {
            match r {
                Routed::Deliver(c) => routed.push((i, c)),
                Routed::Refused { error, .. } => {
                    refused = Some(BatchError::new(i, HandlerError::Permanent(error)));
                    break;
                }
                Routed::Skip => {}
            }
        }
        if routed.is_empty() {
            return refused.map_or(Ok(0), Err);
        }
        let batch: Vec<Change> = routed.iter().map(|(_, c)| c.clone()).collect();
        let handler = &mut self.handler;
        match catch_unwind(AssertUnwindSafe(|| handler.handle_batch(&batch))) {
            Ok(Ok(())) => refused.map_or(Ok(batch.len()), Err),
            Ok(Err(e)) => {
                let at = routed[e.index.min(routed.len() - 1)].0;
                Err(BatchError::new(at, e.error))
            }
            Err(p) => Err(BatchError::new(
                routed[0].0,
                HandlerError::Panic(panic_message(&*p)),
            )),
        }
    }

    /// Tell the handler a snapshot begins or ends, as the daemon does around a backfill.
    pub fn snapshot(&mut self, event: crate::backfill::SnapshotEvent) -> Result<(), HandlerError> {
        let handler = &mut self.handler;
        match catch_unwind(AssertUnwindSafe(|| handler.snapshot(&event))) {
            Ok(r) => r,
            Err(p) => Err(HandlerError::Panic(panic_message(&*p))),
        }
    }

    /// A row of a snapshot, as the daemon delivers one during a backfill: an INSERT of
    /// origin `Snapshot`, routed like any change. `Ok(false)` when nothing wants it.
    pub fn send_snapshot_row(&mut self, mut change: Change) -> Result<bool, HandlerError> {
        change.op = Op::Insert;
        change.origin = crate::change::Origin::Snapshot;
        change.old = None;
        change.old_key = None;
        self.send(change)
    }

    pub fn handler(&self) -> &H {
        &self.handler
    }

    pub fn handler_mut(&mut self) -> &mut H {
        &mut self.handler
    }

    pub fn subscriptions(&self) -> &[Subscription] {
        self.router.subscriptions()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Remembers the columns of every change it gets.
    struct Columns(Vec<Vec<String>>);

    impl Handler for Columns {
        const NAME: &'static str = "columns";
        fn new(_: &HandlerConfig, _: &Context) -> Result<Self, HandlerError> {
            Ok(Columns(Vec::new()))
        }
        fn subscriptions(&self) -> Vec<Subscription> {
            vec![
                Subscription::new("users", ["name"]),
                Subscription::new("users", ["quota"]),
            ]
        }
        fn handle(&mut self, change: &Change) -> Result<(), HandlerError> {
            self.0.push(change.columns.to_vec());
            Ok(())
        }
    }

    #[test]
    fn harness_merges_the_columns_of_several_subscriptions_like_the_daemon() {
        let mut h = Harness::<Columns>::new(serde_json::json!({})).unwrap();
        let old = [("name", "ann".into()), ("quota", 1.into())];
        let new = [("name", "bea".into()), ("quota", 2.into())];
        assert!(h.send(update("users", &old, &new)).unwrap());
        let only_quota = [("name", "bea".into()), ("quota", 3.into())];
        assert!(h.send(update("users", &new, &only_quota)).unwrap());
        assert_eq!(
            h.handler().0,
            vec![
                vec!["name".to_owned(), "quota".to_owned()],
                vec!["quota".to_owned()]
            ]
        );
    }

    /// Fails on the change whose `name` is `bad`.
    struct FailsOnBad(Vec<String>);

    impl Handler for FailsOnBad {
        const NAME: &'static str = "fails";
        fn new(_: &HandlerConfig, _: &Context) -> Result<Self, HandlerError> {
            Ok(FailsOnBad(Vec::new()))
        }
        fn subscriptions(&self) -> Vec<Subscription> {
            vec![Subscription::new("users", ["name"])]
        }
        fn insert(&mut self, c: &Change) -> Result<(), HandlerError> {
            let name = c.value("name").and_then(Value::as_str).unwrap_or_default();
            if name == "bad" {
                return Err(HandlerError::permanent("bad name"));
            }
            self.0.push(name.to_owned());
            Ok(())
        }
    }

    #[test]
    fn a_batch_stops_at_the_failing_change_and_names_its_place_in_the_batch() {
        let mut h = Harness::<FailsOnBad>::new(serde_json::json!({})).unwrap();
        let batch = [
            insert("users", &[("name", "ann".into())]),
            insert("other", &[("name", "x".into())]),
            insert("users", &[("name", "bad".into())]),
            insert("users", &[("name", "cy".into())]),
        ];
        let err = h.send_batch(&batch).unwrap_err();
        assert_eq!(err.index, 2, "the index is into the batch as sent");
        assert_eq!(h.handler().0, vec!["ann".to_owned()]);
    }

    #[test]
    fn keyed_fills_the_key_and_the_old_key_of_a_move() {
        let c = keyed(
            update(
                "users",
                &[("id", 1.into()), ("name", "a".into())],
                &[("id", 2.into()), ("name", "a".into())],
            ),
            &["id"],
        );
        assert_eq!(c.key, vec![Value::Int(2)]);
        assert_eq!(c.old_key, Some(vec![Value::Int(1)]));
        assert_eq!(c.key_value("id"), Some(&Value::Int(2)));
    }
}
