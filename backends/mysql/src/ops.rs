//! Consumer liveness, dead letters, the status report and `epidemic bench`'s scratch
//! table, for MySQL. None of this is on the path of a change from trigger to handler.

use epidemic_plugin_sdk::backend::{
    BackendError, Consumer, ConsumerStatus, DeadLetter, DeadLetterQuery, DeadLetterUpdate,
    LeaseHolder, LeaseRequest, LeaseState, Scratch, Status, TableStatus, SCRATCH_TABLE,
};
use epidemic_plugin_sdk::ops::drift;
use epidemic_plugin_sdk::Op;
use mysql::prelude::Queryable;
use mysql::Conn;

use crate::cascade::CascadeMode;
use crate::conn::{sql_err, ServerInfo};
use crate::gaps::{GapSeen, GapSet};
use crate::poller::{gap_condition, now_us};
use crate::schema::{log_table_name, quote, trigger_name, MySqlSchema};

/// Now by the server's clock, in microseconds since the Unix epoch (whole seconds: all
/// MySQL versions have it, and liveness needs no more). `last_seen`, eviction and leases
/// use it, never a daemon's clock, so a daemon whose clock runs ahead evicts nobody.
pub(crate) const DB_NOW_US: &str = "(UNIX_TIMESTAMP() * 1000000)";

pub(crate) fn touch(conn: &mut Conn, c: &Consumer) -> Result<(), BackendError> {
    conn.exec_drop(
        format!("UPDATE epidemic_cursor SET last_seen = {DB_NOW_US} WHERE daemon = ? AND handler = ? AND evicted_at IS NULL"),
        (&c.daemon, &c.handler),
    )
    .map_err(sql_err)?;
    if conn.affected_rows() == 0 {
        ensure_live(conn, c, None)?;
    }
    Ok(())
}

/// After a cursor update that changed no row (MySQL counts changed rows, so 0 can also
/// mean "same values"): fine while a live cursor exists, an error when it was evicted
/// or is gone — never a silent success.
pub(crate) fn ensure_live(
    conn: &mut Conn,
    c: &Consumer,
    table: Option<&str>,
) -> Result<(), BackendError> {
    let rows: Vec<Option<i64>> = conn
        .exec(
            "SELECT evicted_at FROM epidemic_cursor WHERE daemon = ? AND handler = ? AND (? IS NULL OR source_table = ?)",
            (&c.daemon, &c.handler, table, table),
        )
        .map_err(sql_err)?;
    if rows.iter().any(Option::is_none) {
        return Ok(());
    }
    Err(BackendError::Evicted(if rows.is_empty() {
        format!("consumer {c} has no cursor any more (it was forgotten); it must register again")
    } else {
        format!(
            "consumer {c} was evicted (unseen longer than consumer_ttl) and may have missed changes; \
             it must register again"
        )
    }))
}

pub(crate) fn lease(conn: &mut Conn, req: &LeaseRequest) -> Result<LeaseState, BackendError> {
    match req {
        LeaseRequest::List => {
            let exists: Option<i64> = conn
                .query_first(
                    "SELECT 1 FROM information_schema.TABLES \
                     WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'epidemic_daemon'",
                )
                .map_err(sql_err)?;
            if exists.is_none() {
                return Ok(LeaseState::Holders(Vec::new()));
            }
            let rows: Vec<(String, String, i64)> = conn
                .query(format!(
                    "SELECT daemon, holder, (expires_at - {DB_NOW_US}) DIV 1000 FROM epidemic_daemon \
                     WHERE instance <> '' ORDER BY daemon"
                ))
                .map_err(sql_err)?;
            Ok(LeaseState::Holders(
                rows.into_iter()
                    .map(|(daemon, holder, expires_in_ms)| LeaseHolder {
                        daemon,
                        holder,
                        expires_in_ms,
                    })
                    .collect(),
            ))
        }
        LeaseRequest::Release { daemon, instance } => {
            conn.exec_drop(
                "DELETE FROM epidemic_daemon WHERE daemon = ? AND instance = ?",
                (daemon, instance),
            )
            .map_err(sql_err)?;
            Ok(LeaseState::Released)
        }
        LeaseRequest::Claim {
            daemon,
            instance,
            holder,
            ttl_ms,
            take_over,
        } => {
            let ttl_us = (*ttl_ms as i64).saturating_mul(1000);
            conn.exec_drop(
                "INSERT IGNORE INTO epidemic_daemon (daemon, instance, holder, expires_at) VALUES (?, '', '', 0)",
                (daemon,),
            )
            .map_err(sql_err)?;
            // One statement, so the check and the grant are atomic under the row lock.
            conn.exec_drop(
                format!(
                    "UPDATE epidemic_daemon SET instance = ?, holder = ?, expires_at = {DB_NOW_US} + ?, \
                     renewals = renewals + 1 \
                     WHERE daemon = ? AND (instance = ? OR expires_at < {DB_NOW_US} OR instance = ?)"
                ),
                (instance, holder, ttl_us, daemon, instance, take_over),
            )
            .map_err(sql_err)?;
            if conn.affected_rows() > 0 {
                return Ok(LeaseState::Granted);
            }
            let row: Option<(String, String, i64, i64)> = conn
                .exec_first(
                    format!(
                        "SELECT instance, holder, GREATEST(expires_at - {DB_NOW_US}, 0) DIV 1000, renewals \
                         FROM epidemic_daemon WHERE daemon = ?"
                    ),
                    (daemon,),
                )
                .map_err(sql_err)?;
            match row {
                Some((i, holder, expires_in_ms, renewals)) => Ok(LeaseState::Held {
                    instance: i,
                    holder,
                    expires_in_ms: expires_in_ms.max(0) as u64,
                    renewals,
                }),
                None => Err(BackendError::Other(format!(
                    "the lease row of daemon {daemon} vanished while claiming it"
                ))),
            }
        }
    }
}

pub(crate) fn unregister(conn: &mut Conn, c: &Consumer) -> Result<bool, BackendError> {
    conn.exec_drop(
        "DELETE FROM epidemic_cursor WHERE daemon = ? AND handler = ?",
        (&c.daemon, &c.handler),
    )
    .map_err(sql_err)?;
    Ok(conn.affected_rows() > 0)
}

pub(crate) fn evict_stale(conn: &mut Conn, ttl_us: i64) -> Result<Vec<Consumer>, BackendError> {
    let now: i64 = conn
        .query_first(format!("SELECT {DB_NOW_US}"))
        .map_err(sql_err)?
        .unwrap_or(0);
    let stale: Vec<(String, String)> = conn
        .exec(
            "SELECT daemon, handler FROM epidemic_cursor WHERE evicted_at IS NULL
             GROUP BY daemon, handler HAVING MAX(last_seen) < ?",
            (now.saturating_sub(ttl_us),),
        )
        .map_err(sql_err)?;
    let mut evicted = Vec::new();
    for (daemon, handler) in stale {
        // Checked again in the UPDATE: a consumer that came back since the SELECT stays.
        conn.exec_drop(
            "UPDATE epidemic_cursor SET evicted_at = ? WHERE daemon = ? AND handler = ? AND evicted_at IS NULL
             AND last_seen < ?",
            (now, &daemon, &handler, now.saturating_sub(ttl_us)),
        )
        .map_err(sql_err)?;
        if conn.affected_rows() > 0 {
            evicted.push(Consumer { daemon, handler });
        }
    }
    Ok(evicted)
}

/// A stored dead letter's operation; the column is only ever written from an `Op`.
fn op_from(code: &str) -> Op {
    Op::from_code(code).unwrap_or(Op::Update)
}

pub(crate) fn add_dead_letter(conn: &mut Conn, l: &DeadLetter) -> Result<i64, BackendError> {
    conn.exec_drop(
        "INSERT INTO epidemic_dead_letter (daemon, handler, source_table, change_id, op, `change`, error, attempts, failed_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            &l.daemon,
            &l.handler,
            &l.table,
            l.change_id,
            l.op.code(),
            l.change.as_bytes(),
            l.error.as_bytes(),
            l.attempts,
            l.failed_at_us,
        ),
    )
    .map_err(sql_err)?;
    Ok(conn.last_insert_id() as i64)
}

/// `IN (...)` of ids; `IN (NULL)` (matches nothing) for none, as `IN ()` is an error.
fn id_list(ids: &[i64]) -> String {
    if ids.is_empty() {
        return "NULL".into();
    }
    ids.iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

type LetterRow = (
    i64,
    String,
    String,
    String,
    i64,
    String,
    Vec<u8>,
    Vec<u8>,
    u32,
    i64,
    i64,
);

fn letter(r: LetterRow) -> DeadLetter {
    let (id, daemon, handler, table, change_id, op, change, error, attempts, failed_at_us, retry) =
        r;
    DeadLetter {
        id,
        daemon,
        handler,
        table,
        change_id,
        op: op_from(&op),
        change: String::from_utf8_lossy(&change).into_owned(),
        error: String::from_utf8_lossy(&error).into_owned(),
        attempts,
        failed_at_us,
        retry_requested: retry != 0,
    }
}

pub(crate) fn dead_letters(
    conn: &mut Conn,
    server: ServerInfo,
    q: &DeadLetterQuery,
) -> Result<Vec<DeadLetter>, BackendError> {
    if !MySqlSchema::new(conn, server).table_exists("epidemic_dead_letter")? {
        return Ok(Vec::new());
    }
    let base = "SELECT id, daemon, handler, source_table, change_id, op, `change`, error, attempts, failed_at, \
                retry_requested FROM epidemic_dead_letter";
    let rows: Vec<LetterRow> = match q {
        DeadLetterQuery::All => conn.query(format!("{base} ORDER BY id")),
        DeadLetterQuery::Consumer(c) => conn.exec(
            format!("{base} WHERE daemon = ? AND handler = ? ORDER BY id"),
            (&c.daemon, &c.handler),
        ),
        DeadLetterQuery::RetryRequested(c) => conn.exec(
            format!("{base} WHERE daemon = ? AND handler = ? AND retry_requested = 1 ORDER BY id"),
            (&c.daemon, &c.handler),
        ),
        DeadLetterQuery::Ids(ids) => {
            conn.query(format!("{base} WHERE id IN ({}) ORDER BY id", id_list(ids)))
        }
    }
    .map_err(sql_err)?;
    Ok(rows.into_iter().map(letter).collect())
}

pub(crate) fn update_dead_letters(
    conn: &mut Conn,
    u: &DeadLetterUpdate,
) -> Result<u64, BackendError> {
    match u {
        DeadLetterUpdate::RequestRetry(ids) => conn.query_drop(format!(
            "UPDATE epidemic_dead_letter SET retry_requested = 1 WHERE id IN ({})",
            id_list(ids)
        )),
        DeadLetterUpdate::Delete(ids) => conn.query_drop(format!(
            "DELETE FROM epidemic_dead_letter WHERE id IN ({})",
            id_list(ids)
        )),
        DeadLetterUpdate::Failed {
            id,
            error,
            attempts,
            failed_at_us,
        } => conn.exec_drop(
            "UPDATE epidemic_dead_letter SET retry_requested = 0, error = ?, attempts = ?, failed_at = ? WHERE id = ?",
            (error.as_bytes(), attempts, failed_at_us, id),
        ),
    }
    .map_err(sql_err)?;
    Ok(conn.affected_rows())
}

/// The InnoDB table id of `table`, where the server shows it (it needs the PROCESS
/// privilege): `INNODB_SYS_TABLES` on MariaDB and MySQL 5.6/5.7, `INNODB_TABLES` on
/// MySQL 8. Names with characters InnoDB encodes in its file names are not looked up.
fn innodb_table_id(conn: &mut Conn, db: &str, table: &str) -> Option<i64> {
    let plain = |s: &str| s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !plain(db) || !plain(table) {
        return None;
    }
    let name = format!("{db}/{table}");
    for view in ["INNODB_SYS_TABLES", "INNODB_TABLES"] {
        let sql = format!("SELECT TABLE_ID FROM information_schema.{view} WHERE NAME = ?");
        if let Ok(Some(id)) = conn.exec_first::<i64, _, _>(sql, (&name,)) {
            return Some(id);
        }
    }
    None
}

/// What TRUNCATE detection compares, as stored in `epidemic_watch` or read now.
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct TableMarks {
    pub table_id: Option<i64>,
    pub created: Option<String>,
    pub auto_increment: Option<u64>,
    /// `NOW()` when the marks were read.
    pub checked_at: Option<String>,
}

/// Whether the table was truncated between two readings of its marks.
///
/// TRUNCATE fires no trigger. On InnoDB it recreates the table: the table id changes and
/// the AUTO_INCREMENT counter restarts, while MariaDB keeps `CREATE_TIME` (checked on
/// MariaDB 10.11). A rebuilding `ALTER TABLE` or `OPTIMIZE` also changes the id but sets
/// `CREATE_TIME` to the time of the rebuild. So: the id changed and the creation time did
/// not, where the creation time is older than the previous check (else a rebuild in that
/// same second would look the same); or the counter went down. `CREATE_TIME` has whole
/// seconds, hence the care.
pub(crate) fn truncated(before: &TableMarks, now: &TableMarks) -> bool {
    let id_changed = matches!((before.table_id, now.table_id), (Some(a), Some(b)) if a != b);
    let same_creation = before.created.is_some()
        && before.created == now.created
        && matches!((&before.created, &before.checked_at), (Some(c), Some(at)) if c < at);
    let counter_down =
        matches!((before.auto_increment, now.auto_increment), (Some(a), Some(b)) if b < a);
    (id_changed && same_creation) || counter_down
}

/// Compare every watched table's marks with the stored ones, remember a truncation
/// (`truncated_at`, kept until cleared by hand) and store the new marks.
pub(crate) fn check_truncation(conn: &mut Conn, server: ServerInfo) -> Result<(), BackendError> {
    let mut schema = MySqlSchema::new(conn, server);
    if !schema.installed()?
        || !schema
            .column_names("epidemic_watch")?
            .iter()
            .any(|c| c == "truncated_at")
    {
        return Ok(());
    }
    // MySQL 8 caches these statistics for a day unless told otherwise; older servers do
    // not know the variable.
    let _ = conn.query_drop("SET SESSION information_schema_stats_expiry = 0");
    let db: Option<String> = conn.query_first("SELECT DATABASE()").map_err(sql_err)?;
    let db = db.unwrap_or_default();
    type Stored = (
        String,
        Option<i64>,
        Option<String>,
        Option<u64>,
        Option<String>,
    );
    let stored: Vec<Stored> = conn
        .query(
            "SELECT source_table, table_id, created, auto_increment, checked_at FROM epidemic_watch ORDER BY source_table",
        )
        .map_err(sql_err)?;
    for (table, table_id, created, auto_increment, checked_at) in stored {
        let before = TableMarks {
            table_id,
            created,
            auto_increment,
            checked_at,
        };
        let row: Option<(Option<String>, Option<u64>, String)> = conn
            .exec_first(
                "SELECT CAST(CREATE_TIME AS CHAR), AUTO_INCREMENT, CAST(NOW() AS CHAR) FROM information_schema.TABLES \
                 WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?",
                (&table,),
            )
            .map_err(sql_err)?;
        // A table that is gone is reported as drift by `status`.
        let Some((created, auto_increment, checked_at)) = row else {
            continue;
        };
        let now = TableMarks {
            table_id: innodb_table_id(conn, &db, &table),
            created,
            auto_increment,
            checked_at: Some(checked_at),
        };
        let hit = truncated(&before, &now);
        conn.exec_drop(
            "UPDATE epidemic_watch SET table_id = ?, created = ?, auto_increment = ?, checked_at = ?, \
             truncated_at = IF(? AND truncated_at IS NULL, CAST(UTC_TIMESTAMP() AS CHAR), truncated_at) \
             WHERE source_table = ?",
            (
                now.table_id,
                &now.created,
                now.auto_increment,
                &now.checked_at,
                hit,
                &table,
            ),
        )
        .map_err(sql_err)?;
    }
    Ok(())
}

/// The sentence for a table a TRUNCATE emptied behind the triggers' back.
pub(crate) fn truncated_warning(table: &str, at: &str) -> String {
    format!(
        "table {table} was truncated (noticed at {at} UTC): its rows were removed without DELETE changes, \
         so handlers still act as if they existed; run a resync (backfill) or reconcile by hand, then clear \
         this with: UPDATE epidemic_watch SET truncated_at = NULL WHERE source_table = '{table}'"
    )
}

/// daemon, handler, source_table, high_water, gaps, last_seen, evicted_at.
type CursorRow = (String, String, String, i64, String, i64, Option<i64>);

pub(crate) fn status(conn: &mut Conn, server: ServerInfo) -> Result<Status, BackendError> {
    let mut status = Status {
        backend: "mysql".into(),
        ..Status::default()
    };
    // A user that may only read (monitoring) cannot store the marks; what earlier checks
    // stored is still reported below.
    let _ = check_truncation(conn, server);
    let mut schema = MySqlSchema::new(conn, server);
    if !schema.installed()? {
        return Ok(status);
    }
    let watched = schema.all_watched()?;
    let truncations: Vec<(String, String)> = if schema
        .column_names("epidemic_watch")?
        .iter()
        .any(|c| c == "truncated_at")
    {
        conn.query(
            "SELECT source_table, truncated_at FROM epidemic_watch WHERE truncated_at IS NOT NULL ORDER BY source_table",
        )
        .map_err(sql_err)?
    } else {
        Vec::new()
    };
    let mut schema = MySqlSchema::new(conn, server);
    let fks = schema.foreign_keys()?;
    let mode = schema.cascade_mode();
    let mut log_tables = Vec::new();
    for log in &watched {
        let mut problems = Vec::new();
        let exists = schema.table_exists(&log.source_table)?;
        let present = schema.trigger_names(&log.source_table)?;
        let mut triggers = Vec::new();
        for (suffix, op) in [
            ("insert", Op::Insert),
            ("update", Op::Update),
            ("delete", Op::Delete),
        ] {
            let name = trigger_name(&log.source_table, suffix);
            let here = present.contains(&name);
            if !here && exists {
                problems.push(drift::trigger_missing(&name, &log.source_table, op));
            }
            triggers.push((name, here));
        }
        if !exists {
            problems.insert(0, drift::table_gone(&log.source_table));
        } else {
            let have = schema.column_names(&log.source_table)?;
            for c in log.columns.iter() {
                if !have.iter().any(|h| h.eq_ignore_ascii_case(c)) {
                    problems.push(drift::column_gone(
                        c,
                        &log.source_table,
                        "the triggers fail every write to the table",
                    ));
                }
            }
        }
        if exists {
            if let Some(why) = schema.engine_problem(&log.source_table)? {
                problems.push(why);
            }
            match schema.cascade_triggers(log, &fks, mode)? {
                Ok(cascades) => {
                    if mode == CascadeMode::Direct {
                        if let Some((parent, ..)) = cascades.first() {
                            status.warnings.push(format!(
                                "foreign-key cascades from {parent} into {} are logged before the parent row changes \
                                 (this server allows one trigger per table and event, or has innodb_autoinc_lock_mode = 2): \
                                 a DELETE IGNORE or UPDATE IGNORE that then skips the parent row logs a cascade that did not happen",
                                log.source_table
                            ));
                        }
                    }
                    for (parent, name, here) in cascades {
                        if !here {
                            problems.push(format!(
                                "trigger {name} on table {parent} is missing or out of date: foreign-key cascades \
                                 from {parent} into {} are not captured; run `epidemic install`",
                                log.source_table
                            ));
                        }
                        triggers.push((name, here));
                    }
                }
                Err(why) => problems.push(why),
            }
        }
        if let Some((_, at)) = truncations.iter().find(|(t, _)| *t == log.source_table) {
            let warning = truncated_warning(&log.source_table, at);
            problems.push(warning.clone());
            status.warnings.push(warning);
        }
        log_tables.push(schema.table_exists(&log.log_table)?);
        status.tables.push(TableStatus {
            table: log.source_table.clone(),
            log_table: log.log_table.clone(),
            columns: log.columns.to_vec(),
            log_rows: 0,
            triggers,
            problems,
        });
    }
    for (t, exists) in status.tables.iter_mut().zip(&log_tables) {
        if *exists {
            t.log_rows = conn
                .query_first(format!("SELECT COUNT(*) FROM {}", quote(&t.log_table)))
                .map_err(sql_err)?
                .unwrap_or(0);
        }
    }
    let dead: Vec<(String, String, i64)> =
        if MySqlSchema::new(conn, server).table_exists("epidemic_dead_letter")? {
            conn.query(
            "SELECT daemon, handler, COUNT(*) FROM epidemic_dead_letter GROUP BY daemon, handler",
        )
        .map_err(sql_err)?
        } else {
            Vec::new()
        };
    let rows: Vec<CursorRow> = conn
        .query(
            "SELECT daemon, handler, source_table, high_water, gaps, last_seen, evicted_at FROM epidemic_cursor \
             ORDER BY daemon, handler, source_table",
        )
        .map_err(sql_err)?;
    let now = now_us();
    for (daemon, handler, table, high_water, gaps_text, last_seen, evicted_at) in rows {
        let gaps = GapSet::parse(&gaps_text, &GapSeen::now()).unwrap_or_default();
        let ranges: Vec<(i64, i64)> = gaps.ranges().map(|(lo, hi, _)| (lo, hi)).collect();
        let log = watched
            .iter()
            .zip(&log_tables)
            .find(|(w, exists)| w.source_table == table && **exists);
        let (backlog, oldest): (i64, Option<i64>) = match log {
            Some((log, _)) => conn
                .query_first(format!(
                    "SELECT COUNT(*), MIN(`changed_at`) FROM {} WHERE {}",
                    quote(&log.log_table),
                    gap_condition(Some(high_water), &ranges)
                ))
                .map_err(sql_err)?
                .unwrap_or((0, None)),
            _ => (0, None),
        };
        let age = oldest.map(|t| ((now - t).max(0) as f64) / 1e6);
        let position = if ranges.is_empty() {
            format!("{table}:{high_water}")
        } else {
            format!("{table}:{high_water} (gaps {gaps_text})")
        };
        let evicted = evicted_at.is_some();
        match status
            .consumers
            .iter_mut()
            .find(|c| c.daemon == daemon && c.handler == handler)
        {
            Some(c) => {
                c.tables.push(table);
                c.position.push_str(&format!(", {position}"));
                c.backlog += backlog;
                c.oldest_pending_age_s = match (c.oldest_pending_age_s, age) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    (a, b) => a.or(b),
                };
                c.last_seen_us = c.last_seen_us.max(last_seen);
                c.evicted |= evicted;
            }
            None => {
                let dead_letters = dead
                    .iter()
                    .find(|(d, h, _)| *d == daemon && *h == handler)
                    .map_or(0, |(.., n)| *n);
                status.consumers.push(ConsumerStatus {
                    daemon,
                    handler,
                    tables: vec![table],
                    position,
                    backlog,
                    oldest_pending_age_s: age,
                    dead_letters,
                    last_seen_us: last_seen,
                    evicted,
                })
            }
        }
    }
    Ok(status)
}

/// `epidemic bench`'s scratch table. Only ever touches `SCRATCH_TABLE`-named objects.
pub(crate) fn scratch(
    conn: &mut Conn,
    server: ServerInfo,
    op: &Scratch,
) -> Result<(), BackendError> {
    match op {
        Scratch::Create { table } => {
            check_scratch(table)?;
            drop_scratch(conn, server, table)?;
            conn.query_drop(format!(
                "CREATE TABLE {} (`id` BIGINT NOT NULL PRIMARY KEY, `payload` VARCHAR(64)) ENGINE=InnoDB",
                quote(table)
            ))
            .map_err(sql_err)
        }
        Scratch::Insert {
            table,
            first_id,
            count,
            per_tx,
        } => {
            check_scratch(table)?;
            let per_tx = (*per_tx).max(1) as i64;
            let end = first_id.saturating_add(*count as i64);
            let mut id = *first_id;
            while id < end {
                let stop = id.saturating_add(per_tx).min(end);
                conn.query_drop("START TRANSACTION").map_err(sql_err)?;
                // Rows go in statements of up to 1000 (the triggers fire per row anyway).
                let mut from = id;
                while from < stop {
                    let to = (from + 1_000).min(stop);
                    let values: Vec<String> =
                        (from..to).map(|i| format!("({i}, 'bench')")).collect();
                    if let Err(e) = conn.query_drop(format!(
                        "INSERT INTO {} (`id`, `payload`) VALUES {}",
                        quote(table),
                        values.join(",")
                    )) {
                        let _ = conn.query_drop("ROLLBACK");
                        return Err(sql_err(e));
                    }
                    from = to;
                }
                conn.query_drop("COMMIT").map_err(sql_err)?;
                id = stop;
            }
            Ok(())
        }
        Scratch::Drop { table } => {
            check_scratch(table)?;
            drop_scratch(conn, server, table)
        }
    }
}

fn check_scratch(table: &str) -> Result<(), BackendError> {
    if table != SCRATCH_TABLE {
        return Err(BackendError::Invalid(format!(
            "bench works only on {SCRATCH_TABLE}, not {table}"
        )));
    }
    Ok(())
}

fn drop_scratch(conn: &mut Conn, server: ServerInfo, table: &str) -> Result<(), BackendError> {
    for suffix in ["insert", "update", "delete"] {
        conn.query_drop(format!(
            "DROP TRIGGER IF EXISTS {}",
            quote(&trigger_name(table, suffix))
        ))
        .map_err(sql_err)?;
    }
    conn.query_drop(format!(
        "DROP TABLE IF EXISTS {}",
        quote(&log_table_name(table))
    ))
    .map_err(sql_err)?;
    for own in ["epidemic_watch", "epidemic_cursor", "epidemic_dead_letter"] {
        if MySqlSchema::new(conn, server).table_exists(own)? {
            conn.exec_drop(
                format!("DELETE FROM {own} WHERE source_table = ?"),
                (table,),
            )
            .map_err(sql_err)?;
        }
    }
    conn.query_drop(format!("DROP TABLE IF EXISTS {}", quote(table)))
        .map_err(sql_err)
}
