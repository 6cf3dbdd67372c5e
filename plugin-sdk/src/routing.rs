//! [`Router`]: which of a handler's subscriptions want a change, and the change as the
//! handler receives it. The daemon's dispatcher and [`crate::testing::Harness`] both
//! route through it, so a handler that passes its author's tests sees the same changes
//! inside the host.

use crate::change::{Change, Subscription};

/// A handler's subscriptions, as the host routes changes to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Router {
    subscriptions: Vec<Subscription>,
}

impl Router {
    pub fn new(subscriptions: Vec<Subscription>) -> Router {
        Router { subscriptions }
    }

    pub fn subscriptions(&self) -> &[Subscription] {
        &self.subscriptions
    }

    /// The changes of a batch this handler wants, narrowed, each with its position in
    /// `changes` and `attempt` set to 1: what the daemon hands to
    /// [`crate::Handler::handle_batch`]. Changes nobody wants are left out (the host still
    /// moves the cursor past them).
    pub fn route_batch(&self, changes: &[Change]) -> Vec<(usize, Change)> {
        changes
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                self.route(c).map(|mut c| {
                    c.attempt = 1;
                    (i, c)
                })
            })
            .collect()
    }

    /// The change narrowed to what the handler subscribed to, or `None` when no
    /// subscription wants it (another table, an operation it did not ask for, an UPDATE
    /// that changed none of its columns, a backfill's watermark). When several subscriptions want it, the
    /// handler gets the union of their columns, in first-seen order.
    pub fn route(&self, change: &Change) -> Option<Change> {
        if change.origin == crate::change::Origin::Watermark {
            return None;
        }
        let wanted: Vec<&Subscription> = self
            .subscriptions
            .iter()
            .filter(|s| s.wants(change))
            .collect();
        match wanted.as_slice() {
            [] => None,
            [one] => Some(one.project(change)),
            many => {
                let mut columns: Vec<String> = Vec::new();
                for c in many.iter().flat_map(|s| &s.columns) {
                    if !columns.contains(c) {
                        columns.push(c.clone());
                    }
                }
                Some(
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
