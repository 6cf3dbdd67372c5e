//! MySQL and MariaDB backend for Epidemic (`mysql://`, `mariadb://`).
//!
//! For each watched table the backend keeps an InnoDB log table `epidemic_log_<table>`
//! with a `BIGINT AUTO_INCREMENT` id, filled by `AFTER INSERT/UPDATE/DELETE` triggers
//! that copy the old and new values of the watched columns into typed columns (see
//! `schema.rs` for the objects and why the SQL runs on MySQL 5.0). There is no NOTIFY, so
//! the backend polls: cheaply, because pruning keeps the log tables small.
//!
//! Reading is gap-safe (`poller.rs`): InnoDB transactions commit out of id order, so a
//! consumer's cursor is a high-water mark plus the ids below it that were missing when
//! read; those are re-read until they appear or are proven dead (rolled back) through
//! `information_schema.INNODB_TRX`, or after `gap_timeout_ms` and a `READ UNCOMMITTED`
//! read where that table is not readable. What the fallback cannot see is said in
//! `Status::warnings` (logged by `epidemic run` at start, shown by `epidemic status`).
//!
//! Every connection reads with `REPEATABLE READ`, whatever the server's default: under
//! `READ-UNCOMMITTED` the reader would deliver rows of transactions that roll back.
//!
//! The reading rule needs every transaction that can hold a log id to be visible in
//! this server's INNODB_TRX, which holds on a single primary only. A Galera node
//! (`wsrep_on = ON`) is refused unless `allow_galera = true` (see
//! docs/configuration.md for what is supported).
//!
//! A consumer registered "from now" starts at the largest visible id, with every id
//! below it that is not in the log as a gap: a transaction still open at registration
//! commits after it, so its change is delivered.
//!
//! Pruning never deletes the newest row of a log table: before MySQL 8.0 and MariaDB
//! 10.2.4 the AUTO_INCREMENT counter restarts at `MAX(id) + 1` after a server restart,
//! and an emptied log would hand out ids below the consumers' high-water marks again.
//!
//! Trigger bodies contain `;`. `install` runs each statement on its own, so it needs no
//! `DELIMITER`; a script for the `mysql` command-line client does (see `epidemic sql`).
//!
//! Options (`[database]`, all optional): `poll_interval_ms` (50), `gap_detection`
//! (`"auto"`, `"innodb_trx"` or `"timeout"`), `gap_timeout_ms` (60000), `gap_check_ms`
//! (250), `max_gap_ranges` (10000), `prune_chunk` (10000), `connect_timeout_ms` (10000),
//! `allow_galera` (false).
//!
//! The backend never changes the user's tables, their data or the server's settings,
//! and it keeps nothing in memory that matters: cursors, gaps and dead letters live in
//! the database (`ops.rs` has consumer eviction, dead letters and the status report).

mod cascade;
mod conn;
mod gaps;
mod ops;
mod poller;
mod schema;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use epidemic_plugin_sdk::backend::{
    Backend, BackendError, Batch, Consumer, DeadLetter, DeadLetterQuery, DeadLetterUpdate,
    LeaseRequest, LeaseState, Registered, StartFrom, Status, Watch,
};
use mysql::prelude::Queryable;
use mysql::Conn;
use serde::Deserialize;

use conn::{server_code, sql_err, stmt_err, ServerInfo, Target, NO_INNODB_TRX_CODES};
use gaps::{GapSeen, GapSet, IdSeries};
use poller::{id_series, now_us, ConsumerCursors, GapJudge, GapMethod, MySqlPoller, TableCursor};
use schema::{quote, MySqlSchema, MAX_CONSUMER_NAME};

/// How dead gaps are recognised (option `gap_detection`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum GapDetection {
    /// INNODB_TRX where readable, else the timeout.
    Auto,
    /// INNODB_TRX; refuse to start without it.
    InnodbTrx,
    /// Only the timeout (for servers where INNODB_TRX is costly to read).
    Timeout,
}

/// `[database]` options for the MySQL backend.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct MySqlOptions {
    /// How often an idle reader looks for new log rows.
    poll_interval_ms: u64,
    gap_detection: GapDetection,
    /// How long a gap may stay unfilled before it counts as rolled back, when
    /// INNODB_TRX cannot tell.
    gap_timeout_ms: u64,
    /// How often INNODB_TRX is read while there are gaps.
    gap_check_ms: u64,
    /// Most gap ranges one statement re-reads; with more, a read takes several
    /// statements and `status` warns.
    max_gap_ranges: usize,
    /// Rows deleted per statement when pruning, so writers never wait long.
    prune_chunk: u32,
    connect_timeout_ms: u64,
    /// Run on a Galera node although its gaps are judged by this node alone.
    allow_galera: bool,
}

impl Default for MySqlOptions {
    fn default() -> Self {
        MySqlOptions {
            poll_interval_ms: 50,
            gap_detection: GapDetection::Auto,
            gap_timeout_ms: 60_000,
            gap_check_ms: 250,
            max_gap_ranges: 10_000,
            prune_chunk: 10_000,
            connect_timeout_ms: 10_000,
            allow_galera: false,
        }
    }
}

/// The id a prune deletes below (exclusive), or `None` to keep everything.
///
/// `live` holds each live (not evicted) consumer's high-water and smallest gap. A row is
/// deletable when every live consumer is past it: below its smallest gap, or if it has
/// none, at or below its high-water. The newest row always stays (see the crate docs),
/// so the bound is never above `newest`. With no consumer registered at all nothing is
/// deleted, because a first consumer starting "from the oldest" wants it; with only
/// evicted ones, everything but the newest row goes.
pub fn prune_bound(
    live: &[(i64, Option<i64>)],
    registered: bool,
    newest: Option<i64>,
) -> Option<i64> {
    let newest = newest?;
    let bound = live
        .iter()
        .map(|(high_water, first_gap)| first_gap.unwrap_or(high_water.saturating_add(1)))
        .min();
    match bound {
        Some(bound) => Some(bound.min(newest)),
        None if registered => Some(newest),
        None => None,
    }
}

/// Where a new (or evicted) consumer starts.
///
/// "From now" starts at the largest visible id. Transactions still open may hold smaller
/// ids and commit after this moment, so every id at or below it that is not in the log
/// is a gap: delivered if it ever commits, forgotten once proven rolled back.
fn start_position(
    conn: &mut Conn,
    log: &schema::MySqlLogTable,
    start: StartFrom,
    series: IdSeries,
) -> Result<(i64, String), BackendError> {
    match start {
        StartFrom::Oldest => Ok((0, String::new())),
        StartFrom::Now => {
            let max: Option<i64> = conn
                .query_first(format!("SELECT MAX(`id`) FROM {}", quote(&log.log_table)))
                .map_err(sql_err)?
                .flatten();
            Ok(match max {
                None => (0, String::new()),
                Some(max) => (
                    max,
                    poller::missing_ids(conn, log, max, series)?.to_text(max),
                ),
            })
        }
    }
}

pub struct MySqlBackend {
    target: Target,
    options: MySqlOptions,
    conn: Conn,
    server: ServerInfo,
    poller: MySqlPoller,
    consumers: HashMap<Consumer, ConsumerCursors>,
    /// When `prune` last looked for truncated tables.
    truncation_checked: Option<Instant>,
    /// What the reading rule cannot see on this server, with the remedy (for `status`).
    warnings: Vec<String>,
}

/// `CURRENT_USER()` (`name@host`) as a GRANT spells it: `'name'@'host'`.
fn grantee(current_user: &str) -> String {
    let (name, host) = current_user.rsplit_once('@').unwrap_or((current_user, "%"));
    format!(
        "'{}'@'{}'",
        name.replace('\'', "''"),
        host.replace('\'', "''")
    )
}

/// What the timeout fallback cannot see, for the operator.
fn timeout_consequence(options: &MySqlOptions) -> String {
    format!(
        "an id missing from a log table counts as rolled back once it has been missing for gap_timeout_ms = {} \
         and a READ UNCOMMITTED read does not find its row either, so a change whose transaction waits longer than that \
         between taking its log id and writing the log row (a lock wait on the log table) is never delivered",
        options.gap_timeout_ms
    )
}

/// How often `prune` looks for truncated watched tables (`ops::check_truncation`).
const TRUNCATION_CHECK: Duration = Duration::from_secs(10);

/// Choose how gaps are proven dead; with the timeout, also the warning that says what
/// it cannot see and how to avoid it.
fn choose_method(
    conn: &mut Conn,
    options: &MySqlOptions,
) -> Result<(GapMethod, Option<String>), BackendError> {
    let timeout = GapMethod::Timeout(Duration::from_millis(options.gap_timeout_ms));
    if options.gap_detection == GapDetection::Timeout {
        return Ok((
            timeout,
            Some(format!(
                "gap_detection = \"timeout\": {}; use gap_detection = \"auto\" with the PROCESS privilege to avoid it",
                timeout_consequence(options)
            )),
        ));
    }
    match conn.query_drop("SELECT COUNT(*) FROM information_schema.INNODB_TRX") {
        Ok(()) => Ok((GapMethod::InnoDbTrx, None)),
        Err(e) if server_code(&e).is_some_and(|c| NO_INNODB_TRX_CODES.contains(&c)) => {
            if options.gap_detection == GapDetection::InnodbTrx {
                return Err(BackendError::Invalid(format!(
                    "gap_detection = \"innodb_trx\" but information_schema.INNODB_TRX is not readable: {e}"
                )));
            }
            let warning = if server_code(&e) == Some(1109) {
                format!(
                    "this server has no information_schema.INNODB_TRX (MySQL 5.0/5.1 without the InnoDB plugin): {}; \
                     upgrade, or load the InnoDB plugin, to avoid it",
                    timeout_consequence(options)
                )
            } else {
                let user: Option<String> =
                    conn.query_first("SELECT CURRENT_USER()").map_err(sql_err)?;
                let grantee = grantee(&user.unwrap_or_default());
                format!(
                    "MySQL user {grantee} cannot read information_schema.INNODB_TRX (it needs the PROCESS privilege): {}; \
                     fix: GRANT PROCESS ON *.* TO {grantee}",
                    timeout_consequence(options)
                )
            };
            Ok((timeout, Some(warning)))
        }
        Err(e) => Err(sql_err(e)),
    }
}

/// Galera (`wsrep_on` is `ON`): refused unless accepted, with one line saying why;
/// accepted, it is still a warning. `wsrep_on` is `None` where the variable does not
/// exist (MySQL), `OFF` on a MariaDB that is not in a cluster.
fn galera_decision(wsrep_on: Option<&str>, allow: bool) -> Result<Option<String>, String> {
    let on = wsrep_on.is_some_and(|v| v.eq_ignore_ascii_case("ON") || v == "1");
    const WHY: &str = "gaps in log ids are judged by this node's INNODB_TRX alone, so a change written on \
                       another node whose transaction is still open there when this node sees a later id is lost";
    match (on, allow) {
        (false, _) => Ok(None),
        (true, false) => Err(format!(
            "this server is a Galera node (wsrep_on = ON): {WHY}; point epidemic at a single-primary server, \
             or set allow_galera = true if every write to the watched tables goes to this node"
        )),
        (true, true) => Ok(Some(format!(
            "allow_galera = true on a Galera node: {WHY}; every write to the watched tables must go to this node"
        ))),
    }
}

/// Check the server is one the reading rule holds on (see [`galera_decision`]).
fn check_server(conn: &mut Conn, options: &MySqlOptions) -> Result<Option<String>, BackendError> {
    let row: Option<(String, String)> = conn
        .query_first("SHOW GLOBAL VARIABLES LIKE 'wsrep_on'")
        .map_err(sql_err)?;
    galera_decision(row.as_ref().map(|(_, v)| v.as_str()), options.allow_galera)
        .map_err(BackendError::Invalid)
}

impl MySqlBackend {
    fn schema(&mut self) -> MySqlSchema<'_> {
        MySqlSchema::new(&mut self.conn, self.server)
    }

    /// The consumer's cursors as the database has them.
    fn load_cursors(&mut self, consumer: &Consumer) -> Result<ConsumerCursors, BackendError> {
        let rows: Vec<(String, i64, String)> = self
            .conn
            .exec(
                "SELECT source_table, high_water, gaps FROM epidemic_cursor WHERE daemon = ? AND handler = ? ORDER BY source_table",
                (&consumer.daemon, &consumer.handler),
            )
            .map_err(sql_err)?;
        if rows.is_empty() {
            return Err(BackendError::Evicted(format!(
                "consumer {consumer} is not registered (its cursor is gone); it must register again"
            )));
        }
        let seen = GapSeen::now();
        let mut tables = Vec::with_capacity(rows.len());
        for (table, high_water, gaps) in rows {
            let log = self.schema().watched(&table)?.ok_or_else(|| {
                BackendError::Invalid(format!(
                    "table {table} is not watched; run `epidemic install`"
                ))
            })?;
            let gaps = GapSet::parse(&gaps, &seen).map_err(|e| {
                BackendError::Other(format!(
                    "epidemic_cursor row for {consumer} on {table} is damaged: {e}"
                ))
            })?;
            tables.push(TableCursor::new(Arc::new(log), high_water, gaps));
        }
        Ok(ConsumerCursors::new(tables))
    }

    fn take_cursors(&mut self, consumer: &Consumer) -> Result<ConsumerCursors, BackendError> {
        match self.consumers.remove(consumer) {
            Some(c) => Ok(c),
            None => self.load_cursors(consumer),
        }
    }

    /// Run statements one by one (DDL cannot be prepared, and MySQL DDL commits each
    /// statement anyway), holding an advisory lock so two daemons installing at once do
    /// not interleave their plans.
    fn apply(
        &mut self,
        plan_fn: impl FnOnce(&mut Self) -> Result<Vec<String>, BackendError>,
    ) -> Result<Vec<String>, BackendError> {
        const LOCK_NAME: &str = "LEFT(CONCAT('epidemic_install:', DATABASE()), 64)";
        let got: Option<Option<i64>> = self
            .conn
            .query_first(format!("SELECT GET_LOCK({LOCK_NAME}, 60)"))
            .map_err(sql_err)?;
        if got.flatten() != Some(1) {
            return Err(BackendError::Other(
                "another epidemic install or uninstall has held the lock for 60 s; try again"
                    .into(),
            ));
        }
        let result = plan_fn(self).and_then(|plan| {
            for stmt in &plan {
                if let Err(e) = self.conn.query_drop(stmt) {
                    // A failed statement between LOCK TABLES and UNLOCK TABLES must not
                    // leave the user's table locked for as long as this connection lives.
                    let _ = self.conn.query_drop("UNLOCK TABLES");
                    return Err(stmt_err(e, stmt));
                }
            }
            Ok(plan)
        });
        let _ = self
            .conn
            .query_drop(format!("DO RELEASE_LOCK({LOCK_NAME})"));
        self.consumers.clear();
        result
    }

    /// This server's reading warnings, and one per cursor that tracks more gap ranges
    /// than one read statement carries (each read then takes several statements, and
    /// pruning waits for the oldest gap).
    fn reading_warnings(&mut self) -> Result<Vec<String>, BackendError> {
        let mut out = self.warnings.clone();
        if !self.schema().table_exists("epidemic_cursor")? {
            return Ok(out);
        }
        let rows: Vec<(String, String, String, String)> = self
            .conn
            .query(
                "SELECT daemon, handler, source_table, gaps FROM epidemic_cursor \
                 WHERE evicted_at IS NULL ORDER BY daemon, handler, source_table",
            )
            .map_err(sql_err)?;
        let limit = self.options.max_gap_ranges.max(1);
        let mut piled = Vec::new();
        for (daemon, handler, table, gaps) in rows {
            let ranges = gaps.split(',').filter(|p| !p.trim().is_empty()).count();
            if ranges > limit {
                piled.push(format!(
                    "{daemon}/{handler} tracks {ranges} gap ranges on {table}"
                ));
            }
        }
        if piled.is_empty() {
            return Ok(out);
        }
        // Which open transaction keeps them, where INNODB_TRX can tell.
        let oldest: Option<(String, String)> = self
            .conn
            .query_first(
                "SELECT trx_mysql_thread_id, trx_started FROM information_schema.INNODB_TRX \
                 WHERE trx_rows_modified > 0 ORDER BY trx_started LIMIT 1",
            )
            .unwrap_or(None);
        let holder = match oldest {
            Some((thread, started)) => {
                format!("the oldest open transaction that has written rows is thread {thread}, open since {started} (server time)")
            }
            None => {
                "they go once the transactions that could still fill them have ended".to_owned()
            }
        };
        out.push(format!(
            "{} (more than max_gap_ranges = {limit}): ids below the newest one read that an open transaction may still \
             fill; every read re-reads them in several statements and pruning waits for the oldest; {holder}",
            piled.join(", ")
        ));
        Ok(out)
    }

    /// Whether any log table a loaded consumer reads has rows past its high-water.
    fn probe(&mut self) -> Result<bool, BackendError> {
        let mut highs = Vec::new();
        let mut parts = Vec::new();
        for cursors in self.consumers.values() {
            for t in &cursors.tables {
                highs.push(t.high_water);
                parts.push(format!(
                    "(SELECT MAX(`id`) FROM {})",
                    quote(&t.log.log_table)
                ));
            }
        }
        if parts.is_empty() {
            return Ok(true);
        }
        let row: Option<mysql::Row> = self
            .conn
            .query_first(format!("SELECT {}", parts.join(", ")))
            .map_err(sql_err)?;
        let Some(row) = row else { return Ok(false) };
        Ok(highs.iter().enumerate().any(|(i, hw)| {
            row.get::<Option<i64>, _>(i)
                .flatten()
                .is_some_and(|max| max > *hw)
        }))
    }
}

impl Backend for MySqlBackend {
    const NAME: &'static str = "mysql";
    const URL_SCHEMES_JOINED: &'static str = "mysql,mariadb";

    fn open(url: &str, options: &serde_json::Value) -> Result<Self, BackendError> {
        let options: MySqlOptions = serde_json::from_value(options.clone())
            .map_err(|e| BackendError::Invalid(format!("[database] options for mysql: {e}")))?;
        let target = Target::parse(
            url,
            Duration::from_millis(options.connect_timeout_ms.max(1)),
        )?;
        let mut conn = target.connect()?;
        let server = ServerInfo::query(&mut conn)?;
        let galera = check_server(&mut conn, &options)?;
        let (method, fallback) = choose_method(&mut conn, &options)?;
        let series = id_series(&mut conn)?;
        let judge = GapJudge::new(
            method,
            Duration::from_millis(options.gap_timeout_ms),
            Duration::from_millis(options.gap_check_ms.max(1)),
        );
        let poller = MySqlPoller {
            judge,
            max_gap_ranges: options.max_gap_ranges.max(1),
            series,
        };
        Ok(MySqlBackend {
            target,
            options,
            conn,
            server,
            poller,
            consumers: HashMap::new(),
            truncation_checked: None,
            warnings: galera.into_iter().chain(fallback).collect(),
        })
    }

    fn plan_install(&mut self, watches: &[Watch]) -> Result<Vec<String>, BackendError> {
        self.schema().plan_install(watches)
    }

    /// Table and column names as `information_schema` spells them (see `schema.rs`).
    fn resolve(&mut self, watches: &[Watch]) -> Result<Vec<Watch>, BackendError> {
        self.schema().resolve(watches)
    }

    fn install(&mut self, watches: &[Watch]) -> Result<Vec<String>, BackendError> {
        self.apply(|b| b.schema().plan_install(watches))
    }

    fn plan_uninstall(&mut self) -> Result<Vec<String>, BackendError> {
        self.schema().plan_uninstall()
    }

    fn uninstall(&mut self) -> Result<Vec<String>, BackendError> {
        self.apply(|b| b.schema().plan_uninstall())
    }

    fn register(
        &mut self,
        consumer: &Consumer,
        tables: &[String],
        start: StartFrom,
    ) -> Result<Registered, BackendError> {
        for (what, name) in [("daemon", &consumer.daemon), ("handler", &consumer.handler)] {
            if name.is_empty() || name.chars().count() > MAX_CONSUMER_NAME {
                return Err(BackendError::Invalid(format!(
                    "{what} name {name:?} must be 1 to {MAX_CONSUMER_NAME} characters"
                )));
            }
        }
        let now = now_us();
        let (mut created, mut evicted) = (false, false);
        for table in tables {
            let log = self.schema().watched(table)?.ok_or_else(|| {
                BackendError::Invalid(format!(
                    "table {table} is not watched; run `epidemic install` first"
                ))
            })?;
            self.schema().check_columns(&log)?;
            let existing: Option<Option<i64>> = self
                .conn
                .exec_first(
                    "SELECT evicted_at FROM epidemic_cursor WHERE daemon = ? AND handler = ? AND source_table = ?",
                    (&consumer.daemon, &consumer.handler, table),
                )
                .map_err(sql_err)?;
            // A live cursor stays where it is. An evicted one may point at pruned rows:
            // it restarts like a new one, and the host is told.
            if matches!(existing, Some(None)) {
                continue;
            }
            let series = id_series(&mut self.conn)?;
            let (high_water, gaps) = start_position(&mut self.conn, &log, start, series)?;
            if existing.is_some() {
                self.conn
                    .exec_drop(
                        "UPDATE epidemic_cursor SET high_water = ?, gaps = ?, evicted_at = NULL, registered_at = ? \
                         WHERE daemon = ? AND handler = ? AND source_table = ? AND evicted_at IS NOT NULL",
                        (high_water, gaps, now, &consumer.daemon, &consumer.handler, table),
                    )
                    .map_err(sql_err)?;
                evicted |= self.conn.affected_rows() > 0;
            } else {
                self.conn
                    .exec_drop(
                        "INSERT IGNORE INTO epidemic_cursor \
                         (daemon, handler, source_table, high_water, gaps, registered_at, last_seen) \
                         VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (&consumer.daemon, &consumer.handler, table, high_water, gaps, now, now),
                    )
                    .map_err(sql_err)?;
                created |= self.conn.affected_rows() > 0;
            }
        }
        // A table the handler no longer reads: its old cursor would hold back that
        // table's pruning for ever.
        let keep = if tables.is_empty() {
            "NULL".to_owned()
        } else {
            vec!["?"; tables.len()].join(", ")
        };
        let mut params: Vec<mysql::Value> = vec![
            consumer.daemon.as_str().into(),
            consumer.handler.as_str().into(),
        ];
        params.extend(tables.iter().map(|t| mysql::Value::from(t.as_str())));
        self.conn
            .exec_drop(
                format!(
                    "DELETE FROM epidemic_cursor WHERE daemon = ? AND handler = ? AND source_table NOT IN ({keep})"
                ),
                params,
            )
            .map_err(sql_err)?;
        // By the server's clock, like every other `last_seen`.
        self.conn
            .exec_drop(
                format!(
                    "UPDATE epidemic_cursor SET last_seen = {} WHERE daemon = ? AND handler = ?",
                    ops::DB_NOW_US
                ),
                (&consumer.daemon, &consumer.handler),
            )
            .map_err(sql_err)?;
        self.consumers.remove(consumer);
        Ok(if evicted {
            Registered::Evicted
        } else if created {
            Registered::New
        } else {
            Registered::Existing
        })
    }

    fn fetch(&mut self, consumer: &Consumer, max: u32) -> Result<Batch, BackendError> {
        let mut cursors = self.take_cursors(consumer)?;
        let batch = self
            .poller
            .fetch(&mut self.conn, consumer, &mut cursors, max)?;
        // Kept only after success: after an error the cursors are reloaded from the
        // database, which is the truth (an eviction, an ack that may not have landed).
        self.consumers.insert(consumer.clone(), cursors);
        Ok(batch)
    }

    fn ack(&mut self, consumer: &Consumer, token: &str, upto_id: i64) -> Result<(), BackendError> {
        let mut cursors = self.take_cursors(consumer)?;
        self.poller
            .ack(&mut self.conn, consumer, &mut cursors, token, upto_id)?;
        self.consumers.insert(consumer.clone(), cursors);
        Ok(())
    }

    /// Poll every `poll_interval_ms` until a log table has rows past a consumer's
    /// high-water. While a consumer has gaps, return after one interval so the host
    /// fetches and the gaps are re-read.
    fn wait(&mut self, timeout: Duration) -> Result<bool, BackendError> {
        let deadline = Instant::now() + timeout;
        let interval = Duration::from_millis(self.options.poll_interval_ms.max(1));
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            std::thread::sleep(interval.min(left));
            if self.consumers.values().any(ConsumerCursors::has_gaps) || self.probe()? {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
        }
    }

    fn prune(&mut self) -> Result<u64, BackendError> {
        // TRUNCATE fires no trigger: look for one alongside pruning, which the daemon
        // runs periodically, at most every TRUNCATION_CHECK.
        if self
            .truncation_checked
            .is_none_or(|t| t.elapsed() >= TRUNCATION_CHECK)
        {
            ops::check_truncation(&mut self.conn, self.server)?;
            self.truncation_checked = Some(Instant::now());
        }
        let mut total = 0;
        let chunk = self.options.prune_chunk.max(1);
        for log in self.schema().all_watched()? {
            let rows: Vec<(i64, String, Option<i64>)> = self
                .conn
                .exec(
                    "SELECT high_water, gaps, evicted_at FROM epidemic_cursor WHERE source_table = ?",
                    (&log.source_table,),
                )
                .map_err(sql_err)?;
            let registered = !rows.is_empty();
            let mut cursors = Vec::with_capacity(rows.len());
            // Evicted consumers no longer hold the log back.
            for (high_water, gaps, _) in rows.into_iter().filter(|r| r.2.is_none()) {
                let first = gaps::first_in_text(&gaps).map_err(|e| {
                    BackendError::Other(format!(
                        "epidemic_cursor row on {} is damaged: {e}",
                        log.source_table
                    ))
                })?;
                cursors.push((high_water, first));
            }
            let log_q = quote(&log.log_table);
            let newest: Option<i64> = self
                .conn
                .query_first(format!("SELECT MAX(`id`) FROM {log_q}"))
                .map_err(sql_err)?
                .flatten();
            let Some(bound) = prune_bound(&cursors, registered, newest) else {
                continue;
            };
            let sql =
                format!("DELETE FROM {log_q} WHERE `id` < {bound} ORDER BY `id` LIMIT {chunk}");
            loop {
                self.conn.query_drop(&sql).map_err(sql_err)?;
                let n = self.conn.affected_rows();
                total += n;
                if n < u64::from(chunk) {
                    break;
                }
            }
        }
        Ok(total)
    }

    fn reconnect(&mut self) -> Result<(), BackendError> {
        let mut conn = self.target.connect()?;
        self.server = ServerInfo::query(&mut conn)?;
        // The address may now reach another server (a failover behind one name).
        check_server(&mut conn, &self.options)?;
        self.conn = conn;
        // Cursors are reloaded from the database: an ack that failed with the old
        // connection may or may not have been written.
        self.consumers.clear();
        Ok(())
    }

    fn unregister(&mut self, consumer: &Consumer) -> Result<bool, BackendError> {
        self.consumers.remove(consumer);
        if !self.schema().table_exists("epidemic_cursor")? {
            return Ok(false);
        }
        ops::unregister(&mut self.conn, consumer)
    }

    fn touch(&mut self, consumer: &Consumer) -> Result<(), BackendError> {
        ops::touch(&mut self.conn, consumer)
    }

    fn lease(&mut self, request: &LeaseRequest) -> Result<LeaseState, BackendError> {
        ops::lease(&mut self.conn, request)
    }

    fn evict_stale(&mut self, ttl: Duration) -> Result<Vec<Consumer>, BackendError> {
        let evicted =
            ops::evict_stale(&mut self.conn, ttl.as_micros().min(i64::MAX as u128) as i64)?;
        for c in &evicted {
            self.consumers.remove(c);
        }
        Ok(evicted)
    }

    fn add_dead_letter(&mut self, letter: &DeadLetter) -> Result<i64, BackendError> {
        ops::add_dead_letter(&mut self.conn, letter)
    }

    fn dead_letters(&mut self, query: &DeadLetterQuery) -> Result<Vec<DeadLetter>, BackendError> {
        ops::dead_letters(&mut self.conn, self.server, query)
    }

    fn update_dead_letters(&mut self, update: &DeadLetterUpdate) -> Result<u64, BackendError> {
        ops::update_dead_letters(&mut self.conn, update)
    }

    fn status(&mut self) -> Result<Status, BackendError> {
        let mut status = ops::status(&mut self.conn, self.server)?;
        status.warnings.extend(self.reading_warnings()?);
        Ok(status)
    }

    /// Trigger bodies contain `;`, which the `mysql` client takes as the end of the
    /// statement unless the delimiter is changed around them.
    fn render_script(&self, statements: &[String]) -> String {
        statements
            .iter()
            .map(|s| {
                if s.trim_start().starts_with("CREATE TRIGGER") {
                    format!("DELIMITER //\n{s} //\nDELIMITER ;\n\n")
                } else {
                    format!("{s};\n\n")
                }
            })
            .collect()
    }

    fn scratch(&mut self, op: &epidemic_plugin_sdk::backend::Scratch) -> Result<(), BackendError> {
        self.consumers.clear();
        ops::scratch(&mut self.conn, self.server, op)
    }
}

epidemic_plugin_sdk::export_backend!(MySqlBackend);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prune_keeps_the_newest_row_and_every_gap() {
        // No consumer: keep everything.
        assert_eq!(prune_bound(&[], false, Some(10)), None);
        // Empty log: nothing to delete.
        assert_eq!(prune_bound(&[(5, None)], true, None), None);
        // Everyone handled everything: delete below the newest row, keep it.
        assert_eq!(
            prune_bound(&[(10, None), (10, None)], true, Some(10)),
            Some(10)
        );
        // The slowest consumer decides.
        assert_eq!(
            prune_bound(&[(10, None), (4, None)], true, Some(10)),
            Some(5)
        );
        // A gap pins the log from its smallest id on.
        assert_eq!(
            prune_bound(&[(10, Some(3)), (10, None)], true, Some(10)),
            Some(3)
        );
        // A consumer ahead of the visible log (rows rolled back above it) never lets the
        // bound pass the newest row.
        assert_eq!(prune_bound(&[(12, None)], true, Some(10)), Some(10));
        // Only evicted consumers: all but the newest row go.
        assert_eq!(prune_bound(&[], true, Some(10)), Some(10));
    }

    #[test]
    fn galera_is_refused_unless_accepted() {
        // MySQL has no wsrep_on; a MariaDB outside a cluster says OFF.
        assert_eq!(galera_decision(None, false), Ok(None));
        assert_eq!(galera_decision(Some("OFF"), false), Ok(None));
        assert_eq!(galera_decision(Some("OFF"), true), Ok(None));
        let refused = galera_decision(Some("ON"), false).unwrap_err();
        assert!(
            refused.contains("Galera")
                && refused.contains("allow_galera = true")
                && !refused.contains('\n'),
            "{refused}"
        );
        let accepted = galera_decision(Some("ON"), true).unwrap().unwrap();
        assert!(accepted.contains("must go to this node"), "{accepted}");
        assert!(galera_decision(Some("1"), false).is_err());
    }

    #[test]
    fn grantee_is_quoted_for_a_grant() {
        assert_eq!(grantee("epidemic@%"), "'epidemic'@'%'");
        assert_eq!(grantee("ep@db@10.0.0.%"), "'ep@db'@'10.0.0.%'");
        assert_eq!(grantee("o'neil@localhost"), "'o''neil'@'localhost'");
    }

    #[test]
    fn options_have_defaults_and_refuse_unknown_keys() {
        let o: MySqlOptions = serde_json::from_value(serde_json::json!({})).unwrap();
        assert_eq!(o.poll_interval_ms, 50);
        assert_eq!(o.gap_detection, GapDetection::Auto);
        assert!(!o.allow_galera);
        let o: MySqlOptions =
            serde_json::from_value(serde_json::json!({"allow_galera": true})).unwrap();
        assert!(o.allow_galera);
        assert!(
            serde_json::from_value::<MySqlOptions>(serde_json::json!({"allow_galera": "yes"}))
                .is_err()
        );
        let o: MySqlOptions = serde_json::from_value(
            serde_json::json!({"gap_detection": "timeout", "gap_timeout_ms": 5}),
        )
        .unwrap();
        assert_eq!(o.gap_detection, GapDetection::Timeout);
        assert!(
            serde_json::from_value::<MySqlOptions>(serde_json::json!({"pol_interval_ms": 5}))
                .is_err()
        );
    }
}
