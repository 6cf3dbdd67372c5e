//! Wake-ups: [`PgListener`] waits for the capture triggers' `NOTIFY` and tells writers
//! when a wake-up is wanted; [`fallback_poll`] is how often a reader reads the log
//! anyway.
//!
//! A notification is only a hint: the data stays in the log tables, every trigger sends
//! the same constant payload on one channel (the schema's name), and PostgreSQL folds
//! identical notifications of one transaction into one, so there is one wake-up per
//! writing transaction at most.
//!
//! # Notifying only while a reader waits (`notify = "when-idle"`, the default)
//!
//! A transaction that calls `pg_notify` takes a database-wide lock at commit
//! (`PreCommit_Notify`) and holds it until its commit is flushed, so notifying writers
//! commit one at a time and lose group commit. With `when-idle` the capture function
//! notifies only while some row of `sleeper` has `since` set, that is while some reader
//! is waiting; under a steady stream readers are busy reading and writers skip the lock.
//!
//! A reader about to block, unless it is registered already, (1) registers: one
//! statement sets its connection's row (`since = now()`) and commits, (2) has the host
//! read the log once more (`wait` returns `true` at once), and only then (3) blocks in
//! `LISTEN`, which it has been doing since before (1), so every notification sent after
//! (1) reaches it. Once the reader is busy, the fetch statement clears the row (see
//! [`crate::reader`]), and the reader registers again before it next blocks. "Busy"
//! means a fetch returns changes right after a fetch that returned changes, or right
//! after a read left to the wake-ups (see [`crate::reader`]) whose wait found a
//! notification already there: the host found more work without waiting, the sign of a
//! stream that keeps the reader going.
//! A reader woken for a change now and then stays registered through the fetch, the
//! acknowledgement and the next wait: a trickle of commits notifies every time, which
//! costs little because they rarely meet at the lock, and the reader writes its row once
//! per idle period, not once per change (few dead row versions for writers to skip
//! when a long transaction elsewhere keeps them from being pruned).
//!
//! A writing transaction W tests `sleeper` for every captured row, with the snapshot of
//! the statement that wrote it, and notifies at its commit if some test saw a waiting
//! reader. Against a reader R that registers:
//!
//! - W commits before R's read (2) takes its snapshot: (2) reads W's changes.
//! - W's last test runs after (1) committed: W notifies when it commits; R wakes.
//! - W's last test ran before (1) committed and W commits after (2) took its snapshot:
//!   nobody tells R. This is the race, and it **delays** W's changes, it never loses
//!   them: they are in the log, and R's next read (which any other writer's notification
//!   triggers) delivers them. At the latest, `wait` reports "read again" when
//!   `fallback_poll` has passed since R's last read (default 250 ms with `when-idle`),
//!   so that is the bound on the delay. For the race, W's interval from its last
//!   captured row to its commit must span R's steps (1) and (2), two round trips: for a
//!   one-statement transaction that takes its commit's WAL flush; a transaction that
//!   does other work after its last captured row widens it by that time. Under
//!   REPEATABLE READ or SERIALIZABLE, W's tests see its transaction's snapshot, so the
//!   window opens at W's first statement instead.
//!
//! A registration counts for [`SLEEPER_TTL`] (ten seconds) after it was written: the
//! triggers compare `since` with their transaction's start. A waiting reader writes it
//! again every [`REFRESH_EVERY`], which needs no read since it never lapsed. So a reader
//! that exits or crashes while waiting makes writers notify for nothing for ten seconds
//! at most, and a reader whose registration lapsed (it was busy that long) registers
//! anew, read included, before it blocks. Each reader also deletes the rows of
//! connections that are gone when it starts listening and every [`CLEANUP_EVERY`] after,
//! so that the table stays a page or so. The rows live in an UNLOGGED table:
//! registering writes no WAL and waits for no flush.
//!
//! With `notify = "always"` the triggers notify unconditionally; readers register all the
//! same, so a daemon configured `always` is still woken by triggers that another daemon
//! installed `when-idle`. A schema without a `sleeper` table (installed by an older
//! version) is read as with `always`.
//!
//! # A dense stream: poll instead of registering, and let changes gather
//!
//! A reader that keeps up with a fast stream catches up again and again, and would
//! register each time; every transaction committed while it is registered notifies and
//! queues at the lock, which cost writers a third of their rate in `epidemic bench` (8
//! writers with a reader attached: 0.47–0.56 of the unwatched rate with `when-idle`,
//! 0.62–0.81 with `off`; 0.53–0.59 with this poll). A read is *dense* when it finds
//! four changes or more, at least one per 0.5 ms since the previous read started
//! (several commits per round trip of the reader, 2,000 changes a second or more; see
//! the SDK's `backend::linger`). After a dense read `wait` sleeps [`HOT_POLL`] and has
//! the host read again, without registering, for [`DENSE_HOLD`] after the last dense
//! read; the first of those reads that finds changes clears a registration still
//! standing, as a busy read does.
//!
//! A reader that keeps up then still reads and acknowledges once per round trip: a
//! thousand cycles a second, each writing the cursor twice and reading the hottest
//! index pages, which cost writers as much as the notifications did. So after a dense
//! read that was not full, the next read waits a while after the dense one started (the
//! SDK's `backend::linger::Linger`: a quarter of `linger`, option `linger_ms`, default
//! 20 ms, then twice as long after each dense read in a row, up to `linger`), and finds
//! the commits of that time in one batch: a few dozen cycles a second under a steady
//! stream (`epidemic bench`-style runs, 8 writers, reader attached, 4 interleaved
//! rounds: 0.50–0.53 of the unwatched rate without it, median 0.72 with 5 ms; `off`
//! 0.64–0.88; the server's CPU per change for the reader 10.6 µs at 5 ms, 6.9 µs at
//! 10 ms, 3.8 µs at 20 ms, docs/benchmarks.md). The hold of [`DENSE_HOLD`] still
//! counts from the dense read: a lingered read that is not dense (the stream slowed or
//! stopped) is followed by a registration, as a trickle's would be. The price is latency
//! under a dense stream only, `linger` at most; a trickle (fewer than four changes per
//! read, or fewer than one per 0.5 ms) is read at once, so its latency stays that of a
//! notification, and a backlog (full reads) is read without pause. This only moves reads: the registration protocol above is
//! unchanged whenever the reader blocks.
//!
//! # A reader that goes away
//!
//! A backend dropped while its connection is registered (the daemon stops, a handler's
//! thread ends) deletes its `sleeper` row first, so writers stop notifying at once
//! rather than for [`SLEEPER_TTL`]; it waits at most two seconds for the server's answer
//! (a dead path must not hold up a shutdown). A reader that crashes, or whose path is
//! dead, leaves the row to the TTL.
//!
//! # What is lost, and why that is fine
//!
//! - Notifications sent while the connection is down: the host reads the log after every
//!   (re)connect.
//! - Notifications sent before the first `wait`: the connection LISTENs lazily, on the
//!   first `wait`, and that `wait` returns at once so the host reads the log again. A
//!   connection used only for `install` or `prune` therefore never listens, and never
//!   buffers notifications nobody drains.
//! - A notification lost or not sent for any other reason (the race above): `wait`
//!   reports "maybe new changes" once `fallback_poll` has passed since the last read.
//!
//! Notifications that pile up while the host works through a long backlog are dropped at
//! the start of each fetch (see [`PgListener::read_started`]): that fetch reads
//! everything they announced.
//!
//! # A dead connection while waiting
//!
//! A connection blocked in `LISTEN` sends nothing and owes nothing, so a path that died
//! silently (an expired NAT entry) would look like a quiet database for ever. While it
//! waits, the listener sends a heartbeat, `SELECT 1`, whenever the connection has sent
//! nothing for a third of `dead_peer_timeout_ms`: a dead peer then leaves the heartbeat
//! unanswered, the stream's watch ([`crate::stream`]) ends the connection, and `wait`
//! returns a connection error, on which the host reconnects and reads the log.

use std::time::{Duration, Instant};

use epidemic_plugin_sdk::backend::linger::Linger;
use postgres::error::SqlState;
use postgres::fallible_iterator::FallibleIterator;
use postgres::Client;

use crate::error::PgError;
use crate::ident::{quote_ident, Ident};
use crate::options::{NotifyMode, PgOptions};

/// The fallback poll interval, unless configured, on a server that allows prepared
/// transactions: `when-idle`'s default.
const TWO_PHASE_FALLBACK_POLL: Duration = Duration::from_millis(250);

/// How long after a read the reader reads again without a wake-up. With prepared
/// transactions enabled the capture triggers do not notify (see [`crate::capture`]), so
/// the fallback poll is how changes are found: unless configured, make it as short as
/// with `when-idle`.
pub(crate) fn fallback_poll(client: &mut Client, options: &PgOptions) -> Duration {
    let two_phase = client
        .query_one(
            "SELECT current_setting('max_prepared_transactions')::int4 > 0",
            &[],
        )
        .map(|r| r.get::<_, bool>(0))
        .unwrap_or(false);
    if two_phase && !options.fallback_poll_configured {
        options.fallback_poll.min(TWO_PHASE_FALLBACK_POLL)
    } else {
        options.fallback_poll
    }
}

/// How long a dense stream keeps the reader polling after its last dense read.
pub(crate) const DENSE_HOLD: Duration = Duration::from_millis(10);

/// The sleep between two reads of a dense stream.
pub(crate) const HOT_POLL: Duration = Duration::from_micros(500);

/// How long a registration as waiting counts, from when it was written: how long writers
/// keep notifying for nothing after a waiting reader went away. The capture functions'
/// `interval '10 seconds'` (see [`crate::capture`]) is this.
pub(crate) const SLEEPER_TTL: Duration = Duration::from_secs(10);

/// How often a waiting reader writes its registration again, well within
/// [`SLEEPER_TTL`] so that a slow round trip does not let it lapse. The reader counts a
/// registration from before it sent it, so it never takes for alive a registration that
/// writers already ignore.
pub(crate) const REFRESH_EVERY: Duration = Duration::from_secs(3);

/// How often a registering reader deletes `sleeper` rows of connections that are gone:
/// housekeeping only, since such a row stops counting after [`SLEEPER_TTL`].
pub(crate) const CLEANUP_EVERY: Duration = Duration::from_secs(60);

pub(crate) struct PgListener {
    /// The schema: the channel's name and where `sleeper` is.
    schema: Ident,
    mode: NotifyMode,
    fallback_poll: Duration,
    /// When `wait` reports "read again" at the latest: `fallback_poll` after the last read.
    read_due: Instant,
    /// Whether this connection has issued LISTEN.
    listening: bool,
    /// When this connection last wrote its `sleeper` row as waiting; `None` when the row
    /// does not say it waits.
    registered: Option<Instant>,
    /// The schema has no `sleeper` table: wait without registering. Checked again after
    /// a reconnect or an install through this connection.
    no_sleeper_table: bool,
    /// When this connection last deleted rows of connections that are gone.
    last_cleanup: Option<Instant>,
    /// The last fetch returned changes.
    busy: bool,
    /// How long the connection may send nothing while waiting before a heartbeat;
    /// `None`: no heartbeat (`dead_peer_timeout_ms = 0`).
    heartbeat: Option<Duration>,
    /// When this connection last sent a statement the listener knows of.
    last_sent: Instant,
    /// The last `wait` ended with a notification: the triggers do notify.
    notified: bool,
    /// The host's last read was skipped (see [`PgListener::may_skip_read`]).
    skipped: bool,
    /// Until when the stream counts as dense: a read was dense (see [`Linger`]), so
    /// writers commit faster than the reader comes back (see the module docs).
    dense_until: Option<Instant>,
    /// The last `wait` returned for a hot poll: the next fetch that finds changes
    /// clears the registration, as a busy one does.
    hot: bool,
    /// Paces the reads of a dense stream (`linger_ms`), and tells a dense read.
    pace: Linger,
}

impl PgListener {
    pub fn new(
        schema: Ident,
        mode: NotifyMode,
        fallback_poll: Duration,
        dead_peer_timeout: Option<Duration>,
        linger: Duration,
    ) -> PgListener {
        PgListener {
            heartbeat: dead_peer_timeout.map(|t| t / 3),
            last_sent: Instant::now(),
            schema,
            mode,
            fallback_poll,
            read_due: Instant::now() + fallback_poll,
            listening: false,
            registered: None,
            no_sleeper_table: false,
            last_cleanup: None,
            busy: false,
            notified: false,
            skipped: false,
            dense_until: None,
            hot: false,
            pace: Linger::new(linger),
        }
    }

    /// Whether a read the host is about to make may be skipped when it could only find
    /// what committed after the snapshot of a read made since the last `wait` (see
    /// `PgReader::take_whole_batch_closed`): this connection listens and is registered
    /// as waiting (or the triggers notify unconditionally), and the last wake-up was a
    /// notification, so the triggers do notify. Every commit after that snapshot then
    /// notifies this connection, after the notifications that read dropped, and the
    /// next `wait` returns at once; except a writer in the race of the module docs,
    /// which `wait` finds at the latest `fallback_poll` after that read, as always.
    pub fn may_skip_read(&self) -> bool {
        self.listening && self.notified && (self.registered.is_some() || self.no_sleeper_table)
    }

    /// The host's read was skipped; the next `wait` first looks for a notification that
    /// came meanwhile.
    pub fn read_skipped(&mut self) {
        self.skipped = true;
    }

    /// Whether the fetch starting now is to clear this connection's registration if it
    /// returns changes: the connection is registered, and the previous fetch returned
    /// changes too, so the host found more work without waiting (see the module docs).
    pub fn clear_if_busy(&self) -> bool {
        self.registered.is_some() && (self.busy || self.hot)
    }

    /// A fetch ended: how many changes it returned of the `max` asked for, and whether it
    /// was to clear the registration (if it returned changes, it did).
    pub fn read_done(&mut self, changes: usize, max: usize, cleared: bool) {
        if changes > 0 && cleared {
            self.registered = None;
        }
        self.busy = changes > 0;
        // One statement reads every log table of the consumer: fewer than `max` is all.
        if self.pace.after_read(changes, changes < max) {
            self.dense_until = Some(Instant::now() + DENSE_HOLD);
        }
    }

    /// The backend is going away: if this connection is registered as waiting, delete
    /// its row so that writers stop notifying now rather than after [`SLEEPER_TTL`].
    /// Best effort: a row left behind lapses all the same.
    pub fn release(&mut self, client: &mut Client) {
        if self.registered.take().is_none() || self.no_sleeper_table || client.is_closed() {
            return;
        }
        let sleeper = format!("{}.{}", self.schema.quoted(), quote_ident("sleeper"));
        let _ = client.batch_execute(&format!(
            "DELETE FROM {sleeper} WHERE pid = pg_catalog.pg_backend_pid()"
        ));
    }

    /// Objects in the schema may have been created or dropped (install, uninstall).
    pub fn schema_changed(&mut self) {
        self.no_sleeper_table = false;
        self.registered = None;
    }

    /// LISTEN and, unless the schema has no `sleeper` table, register as waiting: one
    /// round trip, one transaction.
    fn listen(&mut self, client: &mut Client) -> Result<(), PgError> {
        let listen = format!("LISTEN {}", self.schema.quoted());
        if !self.no_sleeper_table {
            let script = format!("{listen}; {}", self.registration(true));
            let written = Instant::now();
            self.last_sent = written;
            match client.batch_execute(&script) {
                Ok(()) => {
                    self.listening = true;
                    self.registered = Some(written);
                    self.last_cleanup = Some(written);
                    return Ok(());
                }
                Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => {
                    self.no_sleeper_table = true;
                }
                Err(e) => {
                    return Err(PgError::sql(format!("listen on channel {}", self.schema))(
                        e,
                    ))
                }
            }
        }
        client
            .batch_execute(&listen)
            .map_err(PgError::sql(format!("listen on channel {}", self.schema)))?;
        self.listening = true;
        Ok(())
    }

    /// Set this connection's `sleeper` row to "waiting since now", and first delete the
    /// rows of connections that are gone when it is time to.
    fn register(&mut self, client: &mut Client) -> Result<(), PgError> {
        let cleanup = self
            .last_cleanup
            .is_none_or(|t| t.elapsed() >= CLEANUP_EVERY);
        let written = Instant::now();
        self.last_sent = written;
        match client.batch_execute(&self.registration(cleanup)) {
            Ok(()) => {
                self.registered = Some(written);
                if cleanup {
                    self.last_cleanup = Some(Instant::now());
                }
                Ok(())
            }
            Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => {
                self.no_sleeper_table = true;
                Ok(())
            }
            Err(e) => Err(PgError::sql("register as waiting for changes")(e)),
        }
    }

    /// The registration script. A row is gone when no connection has its pid
    /// (`pg_stat_activity` shows every connection's pid to everyone). A row whose pid was
    /// reused stays, harmlessly: its registration has lapsed, and the new connection
    /// overwrites it if it registers.
    fn registration(&self, cleanup: bool) -> String {
        let sleeper = format!("{}.{}", self.schema.quoted(), quote_ident("sleeper"));
        let mut script = String::new();
        if cleanup {
            script.push_str(&format!(
                "DELETE FROM {sleeper} s WHERE NOT EXISTS \
                 (SELECT 1 FROM pg_catalog.pg_stat_activity a WHERE a.pid = s.pid); "
            ));
        }
        script.push_str(&format!(
            "INSERT INTO {sleeper} (pid, since) VALUES (pg_catalog.pg_backend_pid(), pg_catalog.now()) \
             ON CONFLICT (pid) DO UPDATE SET since = EXCLUDED.since"
        ));
        script
    }

    /// A new connection replaced the old one: listen (and register) again if we were
    /// listening. The host reads the log after a reconnect, so registering now is enough.
    pub fn reconnected(&mut self, client: &mut Client) -> Result<(), PgError> {
        self.last_sent = Instant::now();
        self.registered = None;
        self.no_sleeper_table = false;
        self.last_cleanup = None;
        if self.listening {
            self.listening = false;
            self.listen(client)?;
        }
        Ok(())
    }

    /// The host is about to read the log, which covers every commit that notifications
    /// already received announced: drop them, and restart the fallback poll interval.
    /// After a dense read that was not full, it first lets `linger` pass since that read
    /// started (see the module docs).
    pub fn read_started(&mut self, client: &mut Client) {
        self.pace.before_read();
        self.read_due = Instant::now() + self.fallback_poll;
        self.last_sent = Instant::now();
        if self.listening {
            let mut pending = client.notifications();
            // Errors surface on the next statement; this is only housekeeping.
            while let Ok(Some(_)) = pending.iter().next() {}
        }
    }

    /// Block until a notification arrives or `fallback_poll` has passed since the last
    /// read (both: `true`, read the log), or `timeout` passes (`false`). Returns `true`
    /// at once after starting to listen or registering as waiting: the host must read the
    /// log once more before this connection may block (see the module docs).
    pub fn wait(&mut self, client: &mut Client, timeout: Duration) -> Result<bool, PgError> {
        // After a skipped read, a notification already here means the stream goes on:
        // read at once, and stay busy, as if the skipped read had found changes.
        if std::mem::take(&mut self.skipped) && self.listening {
            let came = {
                let mut pending = client.notifications();
                let came = matches!(pending.iter().next(), Ok(Some(_)));
                came
            };
            if came {
                self.notified = true;
                return Ok(true);
            }
        }
        self.busy = false;
        self.notified = false;
        self.hot = false;
        let end = Instant::now() + timeout;
        // A dense stream: read again after a short sleep instead of registering, so that
        // writers keep away from the notification lock (see the module docs).
        if self.mode != NotifyMode::Off
            && self.listening
            && self.dense_until.is_some_and(|t| Instant::now() < t)
        {
            std::thread::sleep(HOT_POLL.min(timeout));
            self.hot = true;
            return Ok(true);
        }
        if self.mode == NotifyMode::Off {
            loop {
                let until = self.read_due.min(end);
                let beat = self.heartbeat_due();
                std::thread::sleep(until.min(beat).saturating_duration_since(Instant::now()));
                let now = Instant::now();
                if until <= now {
                    return Ok(self.poll(self.read_due <= now));
                }
                self.send_heartbeat(client)?;
            }
        }
        if !self.listening {
            self.listen(client)?;
            // Commits between the host's last read and LISTEN sent nothing we could hear.
            return Ok(true);
        }
        // A registration that is about to lapse, or has, cannot be refreshed in time to
        // be sure that no writer saw none: register anew, with the read that goes with it.
        let lapsing = |t: Instant| t.elapsed() >= SLEEPER_TTL - REFRESH_EVERY;
        if !self.no_sleeper_table && self.registered.is_none_or(lapsing) {
            self.register(client)?;
            // Writers that tested `sleeper` before the registration do not notify: read
            // what they committed meanwhile before blocking.
            return Ok(true);
        }
        loop {
            let refresh_due = self
                .registered
                .map(|t| t + REFRESH_EVERY)
                .filter(|_| !self.no_sleeper_table);
            let until = refresh_due
                .map_or(self.read_due, |r| r.min(self.read_due))
                .min(end)
                .min(self.heartbeat_due());
            if self.block(client, until.saturating_duration_since(Instant::now()))? {
                self.notified = true;
                return Ok(true);
            }
            let now = Instant::now();
            if self.read_due <= now || end <= now {
                return Ok(self.poll(self.read_due <= now));
            }
            if refresh_due.is_some_and(|r| r <= now) {
                // It never lapsed meanwhile, so no read is needed. It is a statement
                // too, so it stands for the heartbeat.
                self.register(client)?;
            } else if self.heartbeat_due() <= now {
                self.send_heartbeat(client)?;
            }
        }
    }

    /// When the next heartbeat is due (far away without one).
    fn heartbeat_due(&self) -> Instant {
        match self.heartbeat {
            Some(every) => self.last_sent + every,
            None => Instant::now() + Duration::from_secs(3600),
        }
    }

    /// A statement the server must answer: on a dead path it goes unanswered and the
    /// stream's watch turns that into a connection error (see the module docs).
    fn send_heartbeat(&mut self, client: &mut Client) -> Result<(), PgError> {
        self.last_sent = Instant::now();
        client
            .batch_execute("SELECT 1")
            .map_err(PgError::sql("heartbeat while waiting for changes"))
    }

    /// `polled`: the fallback poll is due; tell the host to read, and count the next
    /// interval from now even if it does not.
    fn poll(&mut self, polled: bool) -> bool {
        if polled {
            self.read_due = Instant::now() + self.fallback_poll;
        }
        polled
    }

    /// Block for a notification for at most `limit`; whether one came.
    fn block(&mut self, client: &mut Client, limit: Duration) -> Result<bool, PgError> {
        let woken = {
            let mut notifications = client.notifications();
            let first = notifications
                .timeout_iter(limit)
                .next()
                .map_err(PgError::sql("wait for notifications"))?;
            if first.is_some() {
                // Several transactions may have committed; one read covers them all.
                while let Some(_more) = notifications
                    .iter()
                    .next()
                    .map_err(PgError::sql("wait for notifications"))?
                {}
            }
            first.is_some()
        };
        // The driver reports a lost connection as "no notification": check.
        if !woken && client.is_closed() {
            return Err(PgError::ConnectionLost(
                "connection closed while waiting for notifications".into(),
            ));
        }
        Ok(woken)
    }
}
