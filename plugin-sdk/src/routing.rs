//! [`Router`]: which of a handler's subscriptions want a change, and the change as the
//! handler receives it. The daemon's dispatcher and [`crate::testing::Harness`] both
//! route through it, so a handler that passes its author's tests sees the same changes
//! inside the host.
//!
//! A router may carry a [`RowFilter`] (the daemon's `[[handler]] filter`): a change is then
//! judged on whole row images before it reaches the handler, and a row that moves into or
//! out of the filter is a change of its own: an UPDATE whose old row is out and new row
//! in reaches the handler as an INSERT of the new row, the other way round as a DELETE of
//! the old row, and an UPDATE with both out not at all.

use std::sync::Arc;

use crate::change::{Change, Op, Origin, Subscription, Value};

/// A predicate over a row image: the host's `[[handler]] filter`. `columns` and `values`
/// are the captured columns of the change and their values (after the change for the new
/// image, before it for the old one). An error means the row cannot be judged (a type
/// error the start-up check could not see): the change is refused for this handler.
pub trait RowFilter: Send + Sync {
    fn passes(&self, columns: &[String], values: &[Value]) -> Result<bool, String>;
}

impl<F> RowFilter for F
where
    F: Fn(&[String], &[Value]) -> Result<bool, String> + Send + Sync,
{
    fn passes(&self, columns: &[String], values: &[Value]) -> Result<bool, String> {
        self(columns, values)
    }
}

/// What routing made of a change.
#[derive(Debug, Clone, PartialEq)]
pub enum Routed {
    /// Not for this handler (another table, an operation or columns it did not ask for,
    /// a row outside its filter, a backfill's watermark).
    Skip,
    /// Hand this to the handler.
    Deliver(Change),
    /// The filter could not judge the row: the change cannot be delivered; the host
    /// dead-letters it with `error`.
    Refused { change: Change, error: String },
}

/// A handler's subscriptions, and its row filter if any, as the host routes changes to it.
#[derive(Clone)]
pub struct Router {
    subscriptions: Vec<Subscription>,
    filter: Option<Arc<dyn RowFilter>>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("subscriptions", &self.subscriptions)
            .field("filter", &self.filter.is_some())
            .finish()
    }
}

impl Router {
    pub fn new(subscriptions: Vec<Subscription>) -> Router {
        Router {
            subscriptions,
            filter: None,
        }
    }

    /// Judge every change by `filter` first.
    pub fn with_filter(mut self, filter: Arc<dyn RowFilter>) -> Router {
        self.filter = Some(filter);
        self
    }

    pub fn subscriptions(&self) -> &[Subscription] {
        &self.subscriptions
    }

    /// The changes of a batch this handler wants (or that its filter refused), narrowed,
    /// each with its position in `changes` and `attempt` set to 1: what the daemon hands
    /// to [`crate::Handler::handle_batch`]. Changes nobody wants are left out (the host
    /// still moves the cursor past them).
    pub fn route_batch(&self, changes: &[Change]) -> Vec<(usize, Routed)> {
        changes
            .iter()
            .enumerate()
            .filter_map(|(i, c)| match self.route_checked(c) {
                Routed::Skip => None,
                Routed::Deliver(mut c) => {
                    c.attempt = 1;
                    Some((i, Routed::Deliver(c)))
                }
                refused => Some((i, refused)),
            })
            .collect()
    }

    /// The change as the handler receives it, or `None` (skipped, or refused by the
    /// filter). See [`Router::route_checked`].
    pub fn route(&self, change: &Change) -> Option<Change> {
        match self.route_checked(change) {
            Routed::Deliver(c) => Some(c),
            _ => None,
        }
    }

    /// The change narrowed to what the handler subscribed to, after the row filter (see
    /// the module docs); [`Routed::Skip`] when no subscription wants it (another table, an
    /// operation it did not ask for, an UPDATE that changed none of its columns, a
    /// backfill's watermark). When several subscriptions want it, the handler gets the
    /// union of their columns, in first-seen order.
    pub fn route_checked(&self, change: &Change) -> Routed {
        if change.origin == Origin::Watermark {
            return Routed::Skip;
        }
        let moved;
        let change = match &self.filter {
            None => change,
            Some(f) => match filtered(f.as_ref(), change) {
                Ok(Some(c)) => {
                    moved = c;
                    &moved
                }
                Ok(None) => return Routed::Skip,
                Err(error) => {
                    return Routed::Refused {
                        change: change.clone(),
                        error,
                    }
                }
            },
        };
        let wanted: Vec<&Subscription> = self
            .subscriptions
            .iter()
            .filter(|s| s.wants(change))
            .collect();
        match wanted.as_slice() {
            [] => Routed::Skip,
            [one] => Routed::Deliver(one.project(change)),
            many => {
                let mut columns: Vec<String> = Vec::new();
                for c in many.iter().flat_map(|s| &s.columns) {
                    if !columns.contains(c) {
                        columns.push(c.clone());
                    }
                }
                Routed::Deliver(
                    Subscription {
                        table: change.table.clone(),
                        columns,
                        ops: many[0].ops,
                    }
                    .project(change),
                )
            }
        }
    }
}

/// The change as the filter makes it: itself, a move in (INSERT of the new row), a move
/// out (DELETE of the old row), or nothing.
fn filtered(f: &dyn RowFilter, change: &Change) -> Result<Option<Change>, String> {
    let passes = |image: &Option<Vec<Value>>| match image {
        Some(values) => f.passes(&change.columns, values),
        None => Ok(false),
    };
    match change.op {
        Op::Insert => Ok(passes(&change.new)?.then(|| change.clone())),
        Op::Delete => Ok(passes(&change.old)?.then(|| change.clone())),
        Op::Update => match (passes(&change.old)?, passes(&change.new)?) {
            (true, true) => Ok(Some(change.clone())),
            (false, true) => Ok(Some(Change {
                op: Op::Insert,
                old: None,
                old_key: None,
                ..change.clone()
            })),
            (true, false) => Ok(Some(Change {
                op: Op::Delete,
                new: None,
                key: change.old_key.clone().unwrap_or_else(|| change.key.clone()),
                old_key: None,
                ..change.clone()
            })),
            (false, false) => Ok(None),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::Router;
    use crate::change::{Change, Op, Subscription, Value};

    fn update(table: &str, cols: &[&str], old: &[i64], new: &[i64]) -> Change {
        Change {
            id: 1,
            table: table.into(),
            op: Op::Update,
            columns: cols.iter().map(|c| c.to_string()).collect(),
            old: Some(old.iter().map(|v| Value::Int(*v)).collect()),
            new: Some(new.iter().map(|v| Value::Int(*v)).collect()),
            ..Change::default()
        }
    }

    #[test]
    fn several_subscriptions_on_one_table_get_the_union_of_their_columns() {
        let r = Router::new(vec![
            Subscription::new("t", ["a"]),
            Subscription::new("t", ["b", "a"]),
        ]);
        // Only b changed: the second subscription wants it, the handler gets b and a.
        let c = r
            .route(&update("t", &["a", "b", "c"], &[1, 2, 3], &[1, 5, 3]))
            .expect("wanted");
        assert_eq!(c.columns.as_ref(), ["b", "a"]);
        // Both changed: the union in first-seen order.
        let c = r
            .route(&update("t", &["a", "b", "c"], &[1, 2, 3], &[4, 5, 3]))
            .expect("wanted");
        assert_eq!(c.columns.as_ref(), ["a", "b"]);
        assert_eq!(c.new, Some(vec![Value::Int(4), Value::Int(5)]));
        // Only c changed: nobody wants it.
        assert!(r
            .route(&update("t", &["a", "b", "c"], &[1, 2, 3], &[1, 2, 9]))
            .is_none());
        assert!(r.route(&update("u", &["a"], &[1], &[2])).is_none());
    }
}

#[cfg(test)]
mod filter_tests {
    use std::sync::Arc;

    use super::{Routed, Router};
    use crate::change::{Op, Subscription, Value};
    use crate::testing;

    /// Rows whose `host` is `mx1`.
    fn on_mx1(columns: &[String], values: &[Value]) -> Result<bool, String> {
        let i = columns.iter().position(|c| c == "host").ok_or("no host")?;
        Ok(values[i].as_str() == Some("mx1"))
    }

    fn router() -> Router {
        Router::new(vec![Subscription::new("users", ["name"])]).with_filter(Arc::new(on_mx1))
    }

    fn user(name: &str, host: &str) -> [(&'static str, Value); 3] {
        [
            ("id", 1.into()),
            ("name", name.into()),
            ("host", host.into()),
        ]
    }

    fn routed_op(r: Routed) -> Option<(Op, Vec<String>)> {
        match r {
            Routed::Deliver(c) => Some((c.op, c.columns.to_vec())),
            _ => None,
        }
    }

    #[test]
    fn moves_are_changes_and_the_handler_gets_whole_images_of_its_own_columns() {
        let r = router();
        let u = |old: [(&str, Value); 3], new: [(&str, Value); 3]| {
            testing::keyed(testing::update("users", &old, &new), &["id"])
        };
        // In -> in, only the filter column changed: nothing the handler watches changed.
        assert_eq!(
            r.route_checked(&u(user("a", "mx1"), user("a", "mx1"))),
            Routed::Skip
        );
        // Out -> in: an INSERT of the new row, though `name` did not change.
        let moved_in = r.route_checked(&u(user("a", "mx2"), user("a", "mx1")));
        assert_eq!(
            routed_op(moved_in),
            Some((Op::Insert, vec!["name".to_owned()]))
        );
        // In -> out: a DELETE of the old row.
        let moved_out = r.route_checked(&u(user("a", "mx1"), user("a", "mx2")));
        match moved_out {
            Routed::Deliver(c) => {
                assert_eq!(c.op, Op::Delete);
                assert_eq!(c.old, Some(vec![Value::Text("a".into())]));
                assert_eq!(c.new, None);
            }
            other => panic!("{other:?}"),
        }
        // Out -> out: nothing.
        assert_eq!(
            r.route_checked(&u(user("a", "mx2"), user("b", "mx3"))),
            Routed::Skip
        );
        // Inserts and deletes by their one image.
        assert_eq!(
            r.route_checked(&testing::insert("users", &user("a", "mx2"))),
            Routed::Skip
        );
        assert!(r
            .route(&testing::delete("users", &user("a", "mx1")))
            .is_some());
    }

    #[test]
    fn a_row_the_filter_cannot_judge_is_refused_with_the_reason() {
        let r = Router::new(vec![Subscription::new("users", ["name"])]).with_filter(Arc::new(
            |_: &[String], _: &[Value]| Err("no such overload".to_owned()),
        ));
        match r.route_checked(&testing::insert("users", &user("a", "mx1"))) {
            Routed::Refused { error, .. } => assert_eq!(error, "no such overload"),
            other => panic!("{other:?}"),
        }
    }
}
