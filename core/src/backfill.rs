//! A consumer's backfill, inside its own delivery loop: the tables still to snapshot, the
//! chunk waiting for its watermark, and where the chunk's rows go in the stream.
//!
//! The rule (see `epidemic_plugin_sdk::backfill` and ARCHITECTURE.md): the dispatcher
//! reads a chunk of rows between two fetches, and the backend writes a watermark into
//! the table's log after the read. Every change the consumer fetches after that read and
//! before the watermark may be newer than the chunk: the chunk's row with the same key
//! (before or after the change) is dropped, since the live change carries the row's
//! newer state. The chunk's remaining rows go to the handler right after the watermark,
//! where every change committed before the read has already been delivered. So for one
//! key, a snapshot row is never older than a live change the handler already had, and
//! live delivery is never held back for more than one chunk.
//!
//! Progress is saved in the database after each chunk's rows were handed over, so a
//! restarted daemon resumes after the last finished chunk; a chunk in flight when the
//! daemon stopped is read again (its rows may come twice, never too old).

use std::collections::{HashSet, VecDeque};
use std::time::Instant;

use epidemic_plugin_sdk::backend::{BackfillProgress, BackfillState, Chunk};
use epidemic_plugin_sdk::{Change, Origin, Value};

/// Empty fetches after which a chunk whose watermark never came is read again (its
/// watermark was deleted by hand, say): the watermark is committed before the chunk is
/// returned, so it is visible to the next fetches.
const EMPTY_FETCHES_BEFORE_REREAD: u32 = 3;

/// The backfill of one consumer.
pub struct Backfill {
    /// Tables still to do, in order; the first is the one in hand.
    tables: VecDeque<TableRun>,
    pub chunk_size: u32,
}

/// One table's snapshot for this consumer.
pub struct TableRun {
    pub progress: BackfillProgress,
    /// It was running before this daemon started: this instance misses its first rows.
    pub resumed: bool,
    /// The handler was told it began.
    pub began: bool,
    /// Rows handed over by this instance.
    pub delivered: u64,
    pub chunk: Option<PendingChunk>,
    pub started: Instant,
}

/// A chunk read, waiting for its watermark in the stream.
pub struct PendingChunk {
    pub rows: Vec<Change>,
    /// Keys (as JSON text) of rows a live change touched after the read.
    dropped: HashSet<String>,
    pub watermark: i64,
    pub last: bool,
    /// The key of the chunk's last row (dropped or not): where the next chunk starts.
    pub last_key: Option<Vec<Value>>,
    empty_fetches: u32,
}

fn key_text(key: &[Value]) -> String {
    serde_json::to_string(key).unwrap_or_default()
}

impl PendingChunk {
    pub fn new(chunk: Chunk) -> PendingChunk {
        PendingChunk {
            last_key: chunk.rows.last().map(|r| r.key.clone()),
            rows: chunk.rows,
            dropped: HashSet::new(),
            watermark: chunk.watermark,
            last: chunk.last,
            empty_fetches: 0,
        }
    }

    /// A fetch came back empty; true when the chunk should be read again.
    pub fn empty_fetch(&mut self) -> bool {
        self.empty_fetches += 1;
        self.empty_fetches >= EMPTY_FETCHES_BEFORE_REREAD
    }

    /// The rows no live change touched, in key order.
    fn surviving(&self) -> Vec<Change> {
        self.rows
            .iter()
            .filter(|r| !self.dropped.contains(&key_text(&r.key)))
            .cloned()
            .collect()
    }
}

impl Backfill {
    /// The consumer's pending backfills, as the database has them.
    pub fn new(pending: Vec<BackfillProgress>, chunk_size: u32) -> Backfill {
        Backfill {
            tables: pending
                .into_iter()
                .map(|p| TableRun {
                    resumed: p.state == BackfillState::Running,
                    progress: p,
                    began: false,
                    delivered: 0,
                    chunk: None,
                    started: Instant::now(),
                })
                .collect(),
            chunk_size: chunk_size.max(1),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }

    pub fn current(&mut self) -> Option<&mut TableRun> {
        self.tables.front_mut()
    }

    /// The table in hand is done.
    pub fn finish_current(&mut self) -> Option<TableRun> {
        self.tables.pop_front()
    }

    /// Forget the chunk in flight (it is read again): after an error, a shutdown, or a
    /// registration that moved the cursor.
    pub fn drop_chunk(&mut self) {
        if let Some(run) = self.tables.front_mut() {
            run.chunk = None;
        }
    }

    /// Splice the pending chunk into a fetched batch: note the keys of the table's live
    /// changes before the watermark that the handler receives (`handed(i)`: change `i`
    /// goes to it), and return the position of the watermark in `changes`, if it is
    /// there, with the chunk's rows to hand over right after it.
    ///
    /// Only changes the handler receives count: one it does not want (an UPDATE of
    /// columns another handler watches) leaves its columns as the chunk read them, so the
    /// chunk's row is still right, and dropping it would leave the handler without the row.
    pub fn splice(
        &mut self,
        changes: &[Change],
        handed: impl Fn(usize) -> bool,
    ) -> Option<(usize, Vec<Change>)> {
        let run = self.tables.front_mut()?;
        let chunk = run.chunk.as_mut()?;
        let table = run.progress.table.as_str();
        for (i, c) in changes.iter().enumerate() {
            if c.table != table {
                continue;
            }
            if c.origin == Origin::Watermark {
                if c.id == chunk.watermark {
                    return Some((i, chunk.surviving()));
                }
                continue;
            }
            if !handed(i) {
                continue;
            }
            chunk.dropped.insert(key_text(&c.key));
            if let Some(old) = &c.old_key {
                chunk.dropped.insert(key_text(old));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use epidemic_plugin_sdk::{testing, Op};

    fn row(k: i64) -> Change {
        let mut c = testing::keyed(
            testing::insert("t", &[("id", k.into()), ("v", "snap".into())]),
            &["id"],
        );
        c.origin = Origin::Snapshot;
        c
    }

    fn live(k: i64, op: Op) -> Change {
        let c = match op {
            Op::Delete => testing::delete("t", &[("id", k.into()), ("v", "x".into())]),
            _ => testing::insert("t", &[("id", k.into()), ("v", "live".into())]),
        };
        testing::keyed(c, &["id"])
    }

    fn watermark(id: i64) -> Change {
        Change {
            id,
            table: "t".into(),
            origin: Origin::Watermark,
            ..Change::default()
        }
    }

    impl Backfill {
        /// Every change goes to the handler.
        fn splice_all(&mut self, changes: &[Change]) -> Option<(usize, Vec<Change>)> {
            self.splice(changes, |_| true)
        }
    }

    fn backfill() -> Backfill {
        let mut b = Backfill::new(
            vec![BackfillProgress {
                table: "t".into(),
                ..Default::default()
            }],
            10,
        );
        b.current().unwrap().chunk = Some(PendingChunk::new(Chunk {
            rows: (1..=4).map(row).collect(),
            watermark: 99,
            last: false,
            rows_estimate: None,
        }));
        b
    }

    #[test]
    fn rows_a_live_change_touched_before_the_watermark_are_dropped() {
        let mut b = backfill();
        // A first fetch after the read: no watermark yet, key 2 changed.
        assert!(b.splice_all(&[live(2, Op::Insert)]).is_none());
        // The watermark's fetch: key 3 deleted before it, key 4 changed after it.
        let (at, rows) = b
            .splice_all(&[live(3, Op::Delete), watermark(99), live(4, Op::Insert)])
            .expect("the watermark is there");
        assert_eq!(at, 1);
        let keys: Vec<i64> = rows.iter().map(|r| r.key[0].as_i64().unwrap()).collect();
        assert_eq!(
            keys,
            [1, 4],
            "2 and 3 dropped; 4 changed after the watermark"
        );
    }

    #[test]
    fn other_tables_and_other_watermarks_do_not_count() {
        let mut b = backfill();
        let mut other = live(1, Op::Insert);
        other.table = "u".into();
        let (_, rows) = b
            .splice_all(&[other, watermark(98), watermark(99)])
            .expect("ours");
        assert_eq!(rows.len(), 4);
    }

    #[test]
    fn a_change_the_handler_does_not_receive_keeps_the_row() {
        let mut b = backfill();
        // Key 2 changed in a way this handler does not want (position 0 not handed).
        let (_, rows) = b
            .splice(&[live(2, Op::Insert), watermark(99)], |i| i != 0)
            .unwrap();
        assert_eq!(
            rows.len(),
            4,
            "the row of key 2 is still the handler's only news of it"
        );
    }

    #[test]
    fn a_key_moved_away_drops_both_keys() {
        let mut b = backfill();
        let moved = testing::keyed(
            testing::update(
                "t",
                &[("id", 1.into()), ("v", "a".into())],
                &[("id", 4.into()), ("v", "a".into())],
            ),
            &["id"],
        );
        let (_, rows) = b.splice_all(&[moved, watermark(99)]).unwrap();
        let keys: Vec<i64> = rows.iter().map(|r| r.key[0].as_i64().unwrap()).collect();
        assert_eq!(keys, [2, 3]);
    }
}
