//! Reading a dense stream in batches: [`Linger`] paces a backend's reads so that a reader
//! keeping up with many writers reads (and acknowledges) a few dozen times a second
//! rather than once per commit.
//!
//! A reader that keeps up with a fast stream finds a few changes on every read and comes
//! straight back for more: a read and an acknowledgement per round trip, each one work
//! for the database that the writers wait behind (cursor writes, the hottest index pages,
//! SQLite's one write lock). After a *dense* read, one that found [`DENSE_BATCH`] changes
//! or more, at least one per [`DENSE_SPACING`] since the previous read started, and left
//! nothing behind that the reader knows of (it was not full, and no other log table of
//! the consumer went unread), [`Linger::before_read`] waits until some time after that
//! read started, and the next read takes the commits of that time in one batch.
//!
//! How long: a quarter of `linger` (each backend's `linger_ms` option, default
//! [`DEFAULT_LINGER`]) after the first dense read, twice as long after each dense read
//! in a row, up to `linger`. A burst in a trickle makes one read dense and waits the
//! short step (the read after it, at the trickle's pace, is not dense); a stream that
//! stays dense is read every `linger`, where the reader's cost per change is a fraction
//! of what it is at the short step (PostgreSQL, 8 writers: the reader's server CPU per
//! change 10.6 µs at 5 ms, 3.8 µs at 20 ms; docs/benchmarks.md).
//!
//! Only a dense stream waits, and at most `linger`: a trickle (fewer than
//! [`DENSE_BATCH`] changes per read, or fewer than one per [`DENSE_SPACING`]) is read at
//! once, so its latency is the wake-up's; a backlog (full reads, or a read that left
//! another table unread) is read without pause.

use std::time::{Duration, Instant};

/// A read that finds this many changes or more, at least one per [`DENSE_SPACING`], is
/// dense: several commits per round trip of the reader.
pub const DENSE_BATCH: usize = 4;

/// A dense read found at least one change per this much time since the previous read
/// started (2,000 changes a second).
pub const DENSE_SPACING: Duration = Duration::from_micros(500);

/// `linger_ms` unless configured.
pub const DEFAULT_LINGER: Duration = Duration::from_millis(20);

/// The first dense read waits `linger` divided by this; each dense read in a row doubles
/// the wait, up to `linger`.
pub const RAMP: u32 = 4;

/// The largest `linger_ms` accepted: a dense stream's changes would wait up to a second,
/// longer than PgQ's ticks or any backend's default poll.
pub const MAX_LINGER_MS: u64 = 1000;

/// Whether a read of `changes` changes, `span` after the previous read started, was
/// dense: [`DENSE_BATCH`] or more, at least one per [`DENSE_SPACING`]. With no previous
/// read to compare with (`span` zero) the count decides.
pub fn is_dense(changes: usize, span: Duration) -> bool {
    changes >= DENSE_BATCH
        && span <= DENSE_SPACING.saturating_mul(u32::try_from(changes).unwrap_or(u32::MAX))
}

/// The `linger_ms` option: unset is [`DEFAULT_LINGER`], `0` is off; the message names the
/// option for the backend's one-line error.
pub fn linger_option(ms: Option<u64>) -> Result<Duration, String> {
    match ms {
        None => Ok(DEFAULT_LINGER),
        Some(ms) if ms > MAX_LINGER_MS => Err(format!(
            "linger_ms must be between 0 (off) and {MAX_LINGER_MS}, not {ms}"
        )),
        Some(ms) => Ok(Duration::from_millis(ms)),
    }
}

/// One connection's reads; see the module docs.
#[derive(Debug, Clone)]
pub struct Linger {
    linger: Duration,
    /// When the current (or last) read started, and the one before it.
    start: Option<Instant>,
    previous: Option<Instant>,
    /// How long after the last read started the next one waits; zero: it does not (the
    /// last read was not dense, or was full).
    wait: Duration,
}

impl Linger {
    /// `linger`: how long a dense stream's changes gather at most; zero never waits.
    pub fn new(linger: Duration) -> Linger {
        Linger {
            linger,
            start: None,
            previous: None,
            wait: Duration::ZERO,
        }
    }

    /// Call right before a read: after a dense read that was not full, sleeps until the
    /// wait (see the module docs) after that read started.
    pub fn before_read(&mut self) {
        if let (false, Some(t)) = (self.wait.is_zero(), self.start) {
            std::thread::sleep((t + self.wait).saturating_duration_since(Instant::now()));
        }
        self.previous = self.start;
        self.start = Some(Instant::now());
    }

    /// Call after the read: it returned `changes`, and `caught_up` says it left nothing
    /// behind that the reader knows of (fewer than it asked for, and every log table of
    /// the consumer read). Whether it was dense.
    pub fn after_read(&mut self, changes: usize, caught_up: bool) -> bool {
        let span = match (self.previous, self.start) {
            (Some(before), Some(now)) => now.saturating_duration_since(before),
            _ => Duration::ZERO,
        };
        let dense = is_dense(changes, span);
        self.wait = if dense && caught_up {
            if self.wait.is_zero() {
                self.linger / RAMP
            } else {
                self.wait.saturating_mul(2).min(self.linger)
            }
        } else {
            Duration::ZERO
        };
        dense
    }

    /// How long after the last read started the next one will wait (zero: not at all).
    pub fn next_wait(&self) -> Duration {
        self.wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_is_dense_with_enough_changes_close_enough_together() {
        // A trickle: fewer than DENSE_BATCH, however close.
        assert!(!is_dense(3, Duration::ZERO));
        assert!(!is_dense(0, Duration::ZERO));
        // The first read, or one right after the previous: the count decides.
        assert!(is_dense(4, Duration::ZERO));
        assert!(is_dense(500, Duration::from_micros(100)));
        // 4 changes over 2 ms: 2,000 a second, the edge.
        assert!(is_dense(4, Duration::from_millis(2)));
        assert!(!is_dense(4, Duration::from_micros(2001)));
        // 1,000 changes a second read every 5 ms (a hiccup): not a dense stream.
        assert!(!is_dense(5, Duration::from_millis(5)));
        // A burst after a long wait: not a stream either.
        assert!(!is_dense(50, Duration::from_millis(200)));
        assert!(is_dense(usize::MAX, Duration::from_secs(3600)));
    }

    /// How long `before_read` took.
    fn timed_read(l: &mut Linger) -> Duration {
        let t = Instant::now();
        l.before_read();
        t.elapsed()
    }

    #[test]
    fn only_a_dense_read_that_was_not_full_makes_the_next_one_wait() {
        // A dense read, not full: the next read starts a quarter of `linger` after it at
        // the earliest (the first step; see the ramp's test).
        let linger = Duration::from_millis(200);
        let mut l = Linger::new(linger);
        let started = Instant::now();
        l.before_read();
        assert!(l.after_read(10, true));
        l.before_read();
        assert!(started.elapsed() >= linger / RAMP);

        // Reads that do not wait, with a linger no loaded machine could mistake for a
        // pause: the first, after a read that left more behind (a backlog), a trickle,
        // nothing.
        let long = Duration::from_secs(20);
        let mut l = Linger::new(long);
        assert!(timed_read(&mut l) < long / 8, "the first read");
        assert!(l.after_read(100, false));
        assert!(l.next_wait().is_zero());
        assert!(timed_read(&mut l) < long / 8, "after a read that left more");
        assert!(!l.after_read(1, true));
        assert!(l.next_wait().is_zero());
        assert!(timed_read(&mut l) < long / 8, "after a trickle");
        assert!(!l.after_read(0, true));
        assert!(l.next_wait().is_zero());
        assert!(timed_read(&mut l) < long / 8, "after nothing");
    }

    #[test]
    fn the_wait_starts_at_a_quarter_and_doubles_while_reads_stay_dense() {
        let ms = Duration::from_millis;
        let mut l = Linger::new(ms(20));
        // Every read right after the previous one: dense whenever it finds 4 or more.
        let mut read = |changes: usize, caught_up: bool| {
            l.start = Some(Instant::now());
            l.previous = l.start;
            l.after_read(changes, caught_up);
            l.next_wait()
        };
        assert_eq!(read(10, true), ms(5), "the first dense read");
        assert_eq!(read(10, true), ms(10));
        assert_eq!(read(10, true), ms(20));
        assert_eq!(read(10, true), ms(20), "never more than linger");
        assert_eq!(
            read(2, true),
            ms(0),
            "a read that is not dense ends the streak"
        );
        assert_eq!(read(10, true), ms(5), "and the next dense one starts over");
        assert_eq!(read(10, true), ms(10));
        assert_eq!(read(100, false), ms(0), "a full read: read again at once");
        assert_eq!(read(10, true), ms(5));
    }

    #[test]
    fn zero_never_waits_and_the_option_is_bounded() {
        let mut l = Linger::new(Duration::ZERO);
        l.before_read();
        assert!(l.after_read(10, true), "still tells a dense read");
        assert!(l.next_wait().is_zero());
        assert_eq!(linger_option(None), Ok(Duration::from_millis(20)));
        assert_eq!(linger_option(Some(0)), Ok(Duration::ZERO));
        assert_eq!(linger_option(Some(1000)), Ok(Duration::from_secs(1)));
        let e = linger_option(Some(5000)).unwrap_err();
        assert!(e.contains("linger_ms") && e.contains("5000"), "{e}");
    }
}
