//! Test support for handler authors: build changes and feed them to a handler in a unit
//! test, without a database or the host.
//!
//! ```
//! use epidemic_plugin_sdk::{testing, Change, Handler, HandlerConfig, HandlerError, Subscription};
//!
//! struct Count(usize);
//! impl Handler for Count {
//!     const NAME: &'static str = "count";
//!     fn new(_: &HandlerConfig) -> Result<Self, HandlerError> { Ok(Count(0)) }
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

use crate::change::{Change, Op, Subscription, Value};
use crate::handler::{panic_message, Handler, HandlerConfig, HandlerError};
use crate::routing::Router;

static NEXT_ID: AtomicI64 = AtomicI64::new(1);

fn build(
    table: &str,
    op: Op,
    old: Option<&[(&str, Value)]>,
    new: Option<&[(&str, Value)]>,
) -> Change {
    let cols = old.or(new).unwrap_or(&[]);
    Change {
        id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        table: table.to_owned(),
        op,
        columns: cols.iter().map(|(c, _)| (*c).to_owned()).collect(),
        old: old.map(|r| r.iter().map(|(_, v)| v.clone()).collect()),
        new: new.map(|r| r.iter().map(|(_, v)| v.clone()).collect()),
        changed_at_us: 0,
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

/// Drives a handler the way the host does: routes each change with the host's own
/// [`Router`] (filters by the subscriptions, narrows to the subscribed columns, merges
/// the columns of several subscriptions on one table), and turns a panic into
/// [`HandlerError::Panic`].
pub struct Harness<H: Handler> {
    handler: H,
    router: Router,
}

impl<H: Handler> Harness<H> {
    /// Build the handler from a config table given as JSON (what `[handler.config]` holds).
    pub fn new(config: serde_json::Value) -> Result<Self, HandlerError> {
        let handler = H::new(&HandlerConfig::from_json(config))?;
        let router = Router::new(handler.subscriptions());
        Ok(Harness { handler, router })
    }

    /// Deliver a change. `Ok(false)` when no subscription wanted it.
    pub fn send(&mut self, change: Change) -> Result<bool, HandlerError> {
        let Some(change) = self.router.route(&change) else {
            return Ok(false);
        };
        let handler = &mut self.handler;
        match catch_unwind(AssertUnwindSafe(|| handler.handle(&change))) {
            Ok(r) => r.map(|()| true),
            Err(p) => Err(HandlerError::Panic(panic_message(&*p))),
        }
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
        fn new(_: &HandlerConfig) -> Result<Self, HandlerError> {
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
}
