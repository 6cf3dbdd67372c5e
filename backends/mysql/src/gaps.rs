//! The ids a consumer has not seen yet although a later id was already visible: gaps.
//!
//! InnoDB hands out AUTO_INCREMENT ids at INSERT, but a row becomes visible only at
//! COMMIT, so transactions commit out of id order. When a reader sees id 12 but not 11,
//! id 11 is either held by a transaction that is still open (it will appear later) or
//! was rolled back (it never will). [`GapSet`] remembers such ids, as ranges because one
//! long transaction can hold thousands of consecutive ids, together with what the reader
//! knew when it first missed them ([`GapSeen`]), which is what later proves a gap dead.
//!
//! This module is pure bookkeeping: no SQL runs here.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

/// The ids a server hands out: `offset + N * increment` (`auto_increment_increment`,
/// `auto_increment_offset`; Galera sets the increment to the cluster size). Ids outside
/// the series are never handed out, so a hole made of them is not a gap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IdSeries {
    increment: i64,
    /// `offset % increment`: the residue every id of the series has.
    residue: i64,
}

impl IdSeries {
    /// Every id (increment 1).
    pub const ALL: IdSeries = IdSeries {
        increment: 1,
        residue: 0,
    };

    pub fn new(increment: i64, offset: i64) -> IdSeries {
        let increment = increment.max(1);
        // MySQL and MariaDB ignore an offset larger than the increment (checked on
        // MariaDB 10.11: increment 3, offset 5 hands out 1, 4, 7).
        let offset = if (1..=increment).contains(&offset) {
            offset
        } else {
            1
        };
        IdSeries {
            increment,
            residue: offset % increment,
        }
    }

    /// The smallest and largest ids of the series in `lo..=hi`, or `None` if the series
    /// has none there. Ids between them that are outside the series stay in the range:
    /// re-reading them is harmless and one range stays one range.
    pub fn trim(&self, lo: i64, hi: i64) -> Option<(i64, i64)> {
        if lo > hi {
            return None;
        }
        if self.increment == 1 {
            return Some((lo, hi));
        }
        let first = lo.checked_add((self.residue - lo).rem_euclid(self.increment))?;
        let last = hi - (hi - self.residue).rem_euclid(self.increment);
        (first <= last).then_some((first, last))
    }
}

/// The InnoDB transactions open at one moment that have changed rows, each as
/// `trx_id/thread/started` (from `information_schema.INNODB_TRX`). A writer's trx id,
/// thread and start time do not change while it is open.
pub(crate) type TrxSet = HashSet<String>;

/// What the reader knew when it first missed some ids.
#[derive(Debug, Clone)]
pub(crate) struct GapSeen {
    /// When this reader (process) first missed the ids; the fallback timeout counts from
    /// here. After a restart it is the time the cursor was loaded, which is later than
    /// the real detection and therefore only ever waits longer.
    pub at: Instant,
    /// The open transactions in the first up-to-date read of `INNODB_TRX` taken after
    /// the ids were missed. The transaction holding a missing id was open then, unless it
    /// had already finished; so once none of these is open any more, a re-read decides.
    pub open_then: Option<Arc<TrxSet>>,
}

impl GapSeen {
    pub fn now() -> Self {
        GapSeen {
            at: Instant::now(),
            open_then: None,
        }
    }
}

/// Missing ids as disjoint, inclusive ranges `lo..=hi`, keyed by `lo`.
#[derive(Debug, Clone, Default)]
pub(crate) struct GapSet {
    ranges: BTreeMap<i64, (i64, GapSeen)>,
}

impl GapSet {
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The smallest missing id.
    pub fn first(&self) -> Option<i64> {
        self.ranges.keys().next().copied()
    }

    #[cfg(test)]
    pub fn contains(&self, id: i64) -> bool {
        self.ranges
            .range(..=id)
            .next_back()
            .is_some_and(|(_, (hi, _))| *hi >= id)
    }

    /// Whether any missing id is at most `upto`.
    pub fn any_upto(&self, upto: i64) -> bool {
        self.first().is_some_and(|lo| lo <= upto)
    }

    /// The ranges in id order.
    pub fn ranges(&self) -> impl Iterator<Item = (i64, i64, &GapSeen)> {
        self.ranges.iter().map(|(lo, (hi, seen))| (*lo, *hi, seen))
    }

    /// The ranges in id order, with their detection records open for update.
    pub fn seen_mut(&mut self) -> impl Iterator<Item = (i64, i64, &mut GapSeen)> {
        self.ranges
            .iter_mut()
            .map(|(lo, (hi, seen))| (*lo, *hi, seen))
    }

    /// The ranges that overlap `lo..=hi`, in id order.
    fn overlapping(&self, lo: i64, hi: i64) -> Vec<(i64, i64)> {
        let mut out: Vec<(i64, i64)> = self
            .ranges
            .range(..=hi)
            .rev()
            .take_while(|(_, (h, _))| *h >= lo)
            .map(|(l, (h, _))| (*l, *h))
            .collect();
        // `take_while` above stops at the first range ending before `lo`; ranges are
        // disjoint and sorted, so every earlier one ends before `lo` too.
        out.reverse();
        out
    }

    /// Record `lo..=hi` as missing. Ids already known to be missing keep their older
    /// detection record: a transaction holding them was open at the earlier time too.
    pub fn add_missing(&mut self, lo: i64, hi: i64, seen: &GapSeen) {
        if lo > hi {
            return;
        }
        let mut next = lo;
        for (l, h) in self.overlapping(lo, hi) {
            if l > next {
                self.ranges.insert(next, (l - 1, seen.clone()));
            }
            next = next.max(h.saturating_add(1));
        }
        if next <= hi {
            self.ranges.insert(next, (hi, seen.clone()));
        }
    }

    /// Forget `lo..=hi`: the ids were delivered or are proven never to appear. What is
    /// left of a range is trimmed to `series`, so no range is left holding only ids the
    /// server never hands out.
    pub fn remove_range(&mut self, lo: i64, hi: i64, series: IdSeries) {
        if lo > hi {
            return;
        }
        for (l, h) in self.overlapping(lo, hi) {
            let Some((_, seen)) = self.ranges.remove(&l) else {
                continue;
            };
            if let Some((l, h)) = series.trim(l, h.min(lo - 1)) {
                self.ranges.insert(l, (h, seen.clone()));
            }
            if let Some((l, h)) = series.trim(l.max(hi + 1), h) {
                self.ranges.insert(l, (h, seen));
            }
        }
    }

    pub fn remove(&mut self, id: i64, series: IdSeries) {
        self.remove_range(id, id, series);
    }

    /// The durable form of the ranges at or below `upto`: `3,5-9,12` (ascending).
    pub fn to_text(&self, upto: i64) -> String {
        let mut out = String::new();
        for (lo, hi, _) in self.ranges() {
            if lo > upto {
                break;
            }
            let hi = hi.min(upto);
            if !out.is_empty() {
                out.push(',');
            }
            if lo == hi {
                out.push_str(&lo.to_string());
            } else {
                out.push_str(&format!("{lo}-{hi}"));
            }
        }
        out
    }

    /// Parse [`GapSet::to_text`]'s output; every range gets `seen`.
    pub fn parse(text: &str, seen: &GapSeen) -> Result<GapSet, String> {
        let mut set = GapSet::default();
        let mut last: Option<i64> = None;
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (lo, hi) = split_range(part);
            let lo: i64 = lo.parse().map_err(|_| format!("bad gap {part:?}"))?;
            let hi: i64 = hi.parse().map_err(|_| format!("bad gap {part:?}"))?;
            if lo > hi || last.is_some_and(|l| lo <= l) {
                return Err(format!("gap {part:?} is out of order"));
            }
            last = Some(hi);
            set.ranges.insert(lo, (hi, seen.clone()));
        }
        Ok(set)
    }
}

/// `"5-9"` as `("5", "9")`, `"5"` as `("5", "5")`. A '-' in first place would be a
/// sign, so the split is on the first '-' after the first character.
fn split_range(part: &str) -> (&str, &str) {
    match part.char_indices().skip(1).find(|(_, c)| *c == '-') {
        Some((i, _)) => (&part[..i], &part[i + 1..]),
        None => (part, part),
    }
}

/// The smallest gap id in a durable gap list, without parsing the rest of it.
pub(crate) fn first_in_text(text: &str) -> Result<Option<i64>, String> {
    let part = text.split(',').map(str::trim).find(|p| !p.is_empty());
    let Some(part) = part else { return Ok(None) };
    split_range(part)
        .0
        .parse()
        .map(Some)
        .map_err(|_| format!("bad gap {part:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranges(g: &GapSet) -> Vec<(i64, i64)> {
        g.ranges().map(|(l, h, _)| (l, h)).collect()
    }

    #[test]
    fn add_keeps_older_records_and_fills_holes() {
        let mut g = GapSet::default();
        let early = GapSeen::now();
        g.add_missing(5, 7, &early);
        g.add_missing(10, 10, &early);
        let late = GapSeen::now();
        g.add_missing(1, 12, &late);
        assert_eq!(ranges(&g), vec![(1, 4), (5, 7), (8, 9), (10, 10), (11, 12)]);
        assert_eq!(g.ranges.get(&5).map(|(_, s)| s.at), Some(early.at));
        g.add_missing(3, 6, &late);
        assert_eq!(ranges(&g).len(), 5, "nothing new to add");
    }

    #[test]
    fn remove_splits_ranges() {
        let mut g = GapSet::default();
        g.add_missing(1, 10, &GapSeen::now());
        g.add_missing(20, 20, &GapSeen::now());
        let all = IdSeries::ALL;
        g.remove(5, all);
        assert_eq!(ranges(&g), vec![(1, 4), (6, 10), (20, 20)]);
        g.remove_range(3, 20, all);
        assert_eq!(ranges(&g), vec![(1, 2)]);
        assert!(g.contains(2));
        assert!(!g.contains(3));
        g.remove(1, all);
        g.remove(2, all);
        assert!(g.is_empty());

        // Increment 3, offset 2: what is left of 2..=11 after its ends were delivered
        // holds no id the server hands out but 5 and 8.
        let series = IdSeries::new(3, 2);
        g.add_missing(2, 11, &GapSeen::now());
        g.remove(2, series);
        assert_eq!(ranges(&g), vec![(5, 11)]);
        g.remove(11, series);
        assert_eq!(ranges(&g), vec![(5, 8)]);
        g.remove(5, series);
        g.remove(8, series);
        assert!(g.is_empty(), "{:?}", ranges(&g));
    }

    #[test]
    fn id_series_trims_holes_the_server_never_fills() {
        let all = IdSeries::new(1, 1);
        assert_eq!(all, IdSeries::ALL);
        assert_eq!(all.trim(3, 9), Some((3, 9)));
        assert_eq!(all.trim(9, 3), None);
        // Increment 3, offset 2: 2, 5, 8, 11, ...
        let s = IdSeries::new(3, 2);
        assert_eq!(s.trim(3, 4), None, "the regular hole between 2 and 5");
        assert_eq!(s.trim(3, 7), Some((5, 5)));
        assert_eq!(s.trim(6, 13), Some((8, 11)));
        assert_eq!(s.trim(5, 5), Some((5, 5)));
        // Offset equal to the increment: multiples of it.
        let s = IdSeries::new(3, 3);
        assert_eq!(s.trim(1, 7), Some((3, 6)));
        // An offset above the increment is ignored, as the server does.
        let s = IdSeries::new(3, 5);
        assert_eq!(s.trim(2, 8), Some((4, 7)));
        assert_eq!(IdSeries::new(0, 0), IdSeries::ALL);
    }

    #[test]
    fn text_round_trip_clips_at_high_water() {
        let mut g = GapSet::default();
        g.add_missing(3, 3, &GapSeen::now());
        g.add_missing(5, 9, &GapSeen::now());
        g.add_missing(12, 15, &GapSeen::now());
        assert_eq!(g.to_text(100), "3,5-9,12-15");
        assert_eq!(g.to_text(13), "3,5-9,12-13");
        assert_eq!(g.to_text(4), "3");
        let back = GapSet::parse("3,5-9,12-15", &GapSeen::now()).unwrap();
        assert_eq!(ranges(&back), vec![(3, 3), (5, 9), (12, 15)]);
        assert!(GapSet::parse("", &GapSeen::now()).unwrap().is_empty());
        assert!(GapSet::parse("5,3", &GapSeen::now()).is_err());
        assert!(GapSet::parse("5-3", &GapSeen::now()).is_err());
        assert!(GapSet::parse("x", &GapSeen::now()).is_err());
        assert_eq!(first_in_text("5-9,12"), Ok(Some(5)));
        assert_eq!(first_in_text(""), Ok(None));
    }
}
