//! Consumer liveness, dead letters and the status report for SQLite.

use epidemic_plugin_sdk::backend::{
    BackendError, Consumer, ConsumerStatus, DeadLetter, DeadLetterQuery, DeadLetterUpdate,
    LeaseHolder, LeaseRequest, LeaseState, Scratch, Status, TableStatus, SCRATCH_TABLE,
};
use epidemic_plugin_sdk::Op;
use rusqlite::{params, params_from_iter, Connection, Row};

use epidemic_plugin_sdk::ops::drift;

use crate::schema::{quote, replaced_table, trigger_name, SqliteSchema, TRIGGERS};
use crate::{now_us, sql_err};

/// Now, by SQLite's clock, in microseconds since the Unix epoch. All of a database's
/// daemons run on the host that has the file, so they share this clock.
pub(crate) const NOW_US: &str = "CAST(unixepoch('subsec') * 1000000 AS INTEGER)";

pub(crate) fn touch(conn: &Connection, c: &Consumer) -> Result<(), BackendError> {
    let n = conn
        .prepare_cached(&format!(
            "UPDATE epidemic_cursor SET last_seen = {NOW_US} WHERE daemon = ?1 AND handler = ?2 AND evicted_at IS NULL"
        ))
        .and_then(|mut s| s.execute(params![c.daemon, c.handler]))
        .map_err(sql_err)?;
    if n == 0 {
        return Err(gone(conn, c)?);
    }
    Ok(())
}

/// Why a consumer's cursor update touched no row: it was evicted, or it is gone.
pub(crate) fn gone(conn: &Connection, c: &Consumer) -> Result<BackendError, BackendError> {
    let evicted: bool = conn
        .query_row(
            "SELECT count(*) > 0 FROM epidemic_cursor WHERE daemon = ?1 AND handler = ?2 AND evicted_at IS NOT NULL",
            params![c.daemon, c.handler],
            |r| r.get(0),
        )
        .map_err(sql_err)?;
    Ok(BackendError::Evicted(if evicted {
        format!("consumer {c} was evicted (unseen longer than consumer_ttl) and may have missed changes; it must register again")
    } else {
        format!("consumer {c} has no cursor any more (it was forgotten); it must register again")
    }))
}

pub(crate) fn lease(conn: &mut Connection, req: &LeaseRequest) -> Result<LeaseState, BackendError> {
    match req {
        LeaseRequest::List => {
            let exists: bool = conn
                .query_row(
                    "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'epidemic_daemon'",
                    [],
                    |r| r.get(0),
                )
                .map_err(sql_err)?;
            if !exists {
                return Ok(LeaseState::Holders(Vec::new()));
            }
            let mut stmt = conn
                .prepare(&format!(
                    "SELECT daemon, holder, (expires_at - {NOW_US}) / 1000 FROM epidemic_daemon
                     WHERE instance <> '' ORDER BY daemon"
                ))
                .map_err(sql_err)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok(LeaseHolder {
                        daemon: r.get(0)?,
                        holder: r.get(1)?,
                        expires_in_ms: r.get(2)?,
                    })
                })
                .map_err(sql_err)?;
            Ok(LeaseState::Holders(
                rows.collect::<Result<_, _>>().map_err(sql_err)?,
            ))
        }
        LeaseRequest::Release { daemon, instance } => {
            conn.execute(
                "DELETE FROM epidemic_daemon WHERE daemon = ?1 AND instance = ?2",
                params![daemon, instance],
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
            let tx = conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(sql_err)?;
            tx.execute(
                "INSERT OR IGNORE INTO epidemic_daemon (daemon, instance, holder, expires_at) VALUES (?1, '', '', 0)",
                params![daemon],
            )
            .map_err(sql_err)?;
            let n = tx
                .execute(
                    &format!(
                        "UPDATE epidemic_daemon SET instance = ?2, holder = ?3, expires_at = {NOW_US} + ?4,
                         renewals = renewals + 1
                         WHERE daemon = ?1 AND (instance = ?2 OR expires_at < {NOW_US} OR instance = ?5)"
                    ),
                    params![daemon, instance, holder, ttl_us, take_over],
                )
                .map_err(sql_err)?;
            let state = if n > 0 {
                LeaseState::Granted
            } else {
                tx.query_row(
                    &format!(
                        "SELECT instance, holder, max(expires_at - {NOW_US}, 0) / 1000, renewals
                         FROM epidemic_daemon WHERE daemon = ?1"
                    ),
                    params![daemon],
                    |r| {
                        Ok(LeaseState::Held {
                            instance: r.get(0)?,
                            holder: r.get(1)?,
                            expires_in_ms: r.get::<_, i64>(2)?.max(0) as u64,
                            renewals: r.get(3)?,
                        })
                    },
                )
                .map_err(sql_err)?
            };
            tx.commit().map_err(sql_err)?;
            Ok(state)
        }
    }
}

pub(crate) fn evict_stale(
    conn: &mut Connection,
    ttl_us: i64,
) -> Result<Vec<Consumer>, BackendError> {
    let tx = conn.transaction().map_err(sql_err)?;
    let now: i64 = tx
        .query_row(&format!("SELECT {NOW_US}"), [], |r| r.get(0))
        .map_err(sql_err)?;
    let stale: Vec<Consumer> = {
        let mut stmt = tx
            .prepare(
                "SELECT daemon, handler FROM epidemic_cursor WHERE evicted_at IS NULL
                 GROUP BY daemon, handler HAVING MAX(last_seen) < ?1",
            )
            .map_err(sql_err)?;
        let rows = stmt
            .query_map([now - ttl_us], |r| {
                Ok(Consumer {
                    daemon: r.get(0)?,
                    handler: r.get(1)?,
                })
            })
            .map_err(sql_err)?;
        rows.collect::<Result<_, _>>().map_err(sql_err)?
    };
    for c in &stale {
        tx.execute(
            "UPDATE epidemic_cursor SET evicted_at = ?3 WHERE daemon = ?1 AND handler = ?2",
            params![c.daemon, c.handler, now],
        )
        .map_err(sql_err)?;
    }
    tx.commit().map_err(sql_err)?;
    Ok(stale)
}

/// A stored dead letter's operation; the column is only ever written from an `Op`.
fn op_from(code: &str) -> Op {
    Op::from_code(code).unwrap_or(Op::Update)
}

pub(crate) fn add_dead_letter(conn: &Connection, l: &DeadLetter) -> Result<i64, BackendError> {
    conn.execute(
        "INSERT INTO epidemic_dead_letter (daemon, handler, source_table, change_id, op, change, error, attempts, failed_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![l.daemon, l.handler, l.table, l.change_id, l.op.code(), l.change, l.error, l.attempts, l.failed_at_us],
    )
    .map_err(sql_err)?;
    Ok(conn.last_insert_rowid())
}

const LETTER_COLUMNS: &str =
    "id, daemon, handler, source_table, change_id, op, change, error, attempts, failed_at, retry_requested";

fn letter(r: &Row<'_>) -> rusqlite::Result<DeadLetter> {
    Ok(DeadLetter {
        id: r.get(0)?,
        daemon: r.get(1)?,
        handler: r.get(2)?,
        table: r.get(3)?,
        change_id: r.get(4)?,
        op: op_from(&r.get::<_, String>(5)?),
        change: r.get(6)?,
        error: r.get(7)?,
        attempts: r.get(8)?,
        failed_at_us: r.get(9)?,
        retry_requested: r.get::<_, i64>(10)? != 0,
    })
}

pub(crate) fn dead_letters(
    conn: &Connection,
    q: &DeadLetterQuery,
) -> Result<Vec<DeadLetter>, BackendError> {
    if !SqliteSchema::new(conn).installed()? {
        return Ok(Vec::new());
    }
    let base = format!("SELECT {LETTER_COLUMNS} FROM epidemic_dead_letter");
    let (sql, args): (String, Vec<rusqlite::types::Value>) = match q {
        DeadLetterQuery::All => (format!("{base} ORDER BY id"), vec![]),
        DeadLetterQuery::Consumer(c) => (
            format!("{base} WHERE daemon = ?1 AND handler = ?2 ORDER BY id"),
            vec![c.daemon.clone().into(), c.handler.clone().into()],
        ),
        DeadLetterQuery::RetryRequested(c) => (
            format!(
                "{base} WHERE daemon = ?1 AND handler = ?2 AND retry_requested = 1 ORDER BY id"
            ),
            vec![c.daemon.clone().into(), c.handler.clone().into()],
        ),
        DeadLetterQuery::Ids(ids) => (
            format!(
                "{base} WHERE id IN ({}) ORDER BY id",
                placeholders(ids.len())
            ),
            ids.iter().map(|i| (*i).into()).collect(),
        ),
    };
    let mut stmt = conn.prepare_cached(&sql).map_err(sql_err)?;
    let rows = stmt
        .query_map(params_from_iter(args), letter)
        .map_err(sql_err)?;
    rows.collect::<Result<_, _>>().map_err(sql_err)
}

fn placeholders(n: usize) -> String {
    if n == 0 {
        // `IN ()` is a syntax error; `IN (NULL)` matches nothing.
        return "NULL".into();
    }
    (1..=n)
        .map(|i| format!("?{i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub(crate) fn update_dead_letters(
    conn: &Connection,
    u: &DeadLetterUpdate,
) -> Result<u64, BackendError> {
    let n = match u {
        DeadLetterUpdate::RequestRetry(ids) => conn.execute(
            &format!("UPDATE epidemic_dead_letter SET retry_requested = 1 WHERE id IN ({})", placeholders(ids.len())),
            params_from_iter(ids),
        ),
        DeadLetterUpdate::Delete(ids) => conn.execute(
            &format!("DELETE FROM epidemic_dead_letter WHERE id IN ({})", placeholders(ids.len())),
            params_from_iter(ids),
        ),
        DeadLetterUpdate::Failed {
            id,
            error,
            attempts,
            failed_at_us,
        } => conn.execute(
            "UPDATE epidemic_dead_letter SET retry_requested = 0, error = ?2, attempts = ?3, failed_at = ?4 WHERE id = ?1",
            params![id, error, attempts, failed_at_us],
        ),
    }
    .map_err(sql_err)?;
    Ok(n as u64)
}

pub(crate) fn status(conn: &Connection) -> Result<Status, BackendError> {
    let schema = SqliteSchema::new(conn);
    let mut status = Status {
        backend: "sqlite".into(),
        ..Status::default()
    };
    if !schema.installed()? {
        return Ok(status);
    }
    let watched = schema.all_watched()?;
    let now = now_us();
    for log in &watched {
        let mut problems = Vec::new();
        let exists = schema.table_exists(&log.source_table)?.is_some();
        let mut triggers = Vec::new();
        for (suffix, op) in TRIGGERS.iter().copied() {
            let name = trigger_name(&log.source_table, suffix);
            let present: bool = conn
                .query_row(
                    "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'trigger' AND name = ?1",
                    [&name],
                    |r| r.get(0),
                )
                .map_err(sql_err)?;
            if !present {
                problems.push(drift::trigger_missing(&name, &log.source_table, op));
            }
            triggers.push((name, present));
        }
        if !exists {
            problems.insert(0, drift::table_gone(&log.source_table));
        } else {
            for index in schema.replace_keys(&log.source_table)?.unmatched {
                status.warnings.push(format!(
                    "table {}: unique index {index} is on an expression, so a REPLACE or UPDATE OR REPLACE that removes a row because of it is not delivered as a DELETE; make it a plain column index, or write with plain INSERT/UPDATE",
                    log.source_table
                ));
            }
            match schema.stale_triggers(log) {
                Ok(stale) if stale.is_empty() => {}
                Ok(stale) => problems.push(format!(
                    "triggers {} on {} are out of date (a unique key or index, or a column name, changed since install): a REPLACE through a new key removes rows without delivering their DELETE; run `epidemic install` (a starting daemon does)",
                    stale.join(", "),
                    log.source_table
                )),
                Err(e) => problems.push(format!(
                    "triggers on {} cannot be checked: {e}",
                    log.source_table
                )),
            }
            let have = schema.table_columns(&log.source_table)?;
            for c in log.columns.iter() {
                if !have.iter().any(|h| h.eq_ignore_ascii_case(c)) {
                    problems.push(drift::column_gone(
                        c,
                        &log.source_table,
                        "handlers that need it cannot get it",
                    ));
                }
            }
        }
        let cursor_max: Option<i64> = conn
            .query_row(
                "SELECT max(last_id) FROM epidemic_cursor WHERE source_table = ?1 COLLATE NOCASE",
                [&log.source_table],
                |r| r.get(0),
            )
            .map_err(sql_err)?;
        let handed_out = schema.last_id(&log.log_table)?;
        if let Some(cursor) = cursor_max.filter(|c| *c > handed_out) {
            problems.push(format!(
                "log {} has handed out ids only up to {handed_out} but a consumer is at {cursor}: it was emptied or restored without sqlite_sequence, so changes written now get ids consumers have passed and are skipped; run `epidemic install` (a starting daemon does) before the table is written to",
                log.log_table
            ));
        }
        let log_rows: i64 = conn
            .query_row(
                &format!("SELECT count(*) FROM {}", quote(&log.log_table)),
                [],
                |r| r.get(0),
            )
            .map_err(sql_err)?;
        status.tables.push(TableStatus {
            table: log.source_table.clone(),
            log_table: log.log_table.clone(),
            columns: log.columns.to_vec(),
            log_rows,
            triggers,
            problems,
        });
    }
    // One row per (consumer, table); fold into one status per consumer.
    let mut stmt = conn
        .prepare(
            "SELECT c.daemon, c.handler, c.source_table, c.last_id, c.last_seen, c.evicted_at IS NOT NULL,
                    (SELECT count(*) FROM epidemic_dead_letter d WHERE d.daemon = c.daemon AND d.handler = c.handler)
             FROM epidemic_cursor c ORDER BY c.daemon, c.handler, c.source_table",
        )
        .map_err(sql_err)?;
    let rows: Vec<(String, String, String, i64, i64, bool, i64)> = stmt
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
            ))
        })
        .map_err(sql_err)?
        .collect::<Result<_, _>>()
        .map_err(sql_err)?;
    for (daemon, handler, table, last_id, last_seen, evicted, dead) in rows {
        let (backlog, oldest): (i64, Option<i64>) =
            match watched.iter().find(|w| w.source_table == table) {
                Some(log) => conn
                    .query_row(
                        &format!(
                            "SELECT count(*), min(changed_at) FROM {} WHERE id > ?1",
                            quote(&log.log_table)
                        ),
                        [last_id],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .map_err(sql_err)?,
                None => (0, None),
            };
        let age = oldest.map(|t| ((now - t).max(0) as f64) / 1e6);
        match status
            .consumers
            .iter_mut()
            .find(|c| c.daemon == daemon && c.handler == handler)
        {
            Some(c) => {
                c.tables.push(table.clone());
                c.position.push_str(&format!(", {table}:{last_id}"));
                c.backlog += backlog;
                c.oldest_pending_age_s = match (c.oldest_pending_age_s, age) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    (a, b) => a.or(b),
                };
                c.last_seen_us = c.last_seen_us.max(last_seen);
                c.evicted |= evicted;
            }
            None => status.consumers.push(ConsumerStatus {
                daemon,
                handler,
                position: format!("{table}:{last_id}"),
                tables: vec![table],
                backlog,
                oldest_pending_age_s: age,
                dead_letters: dead,
                last_seen_us: last_seen,
                evicted,
            }),
        }
    }
    Ok(status)
}

/// `epidemic bench`'s scratch table. Only ever touches `SCRATCH_TABLE`-named objects.
pub(crate) fn scratch(conn: &mut Connection, op: &Scratch) -> Result<(), BackendError> {
    match op {
        Scratch::Create { table } => {
            check_scratch(table)?;
            drop_scratch(conn, table)?;
            conn.execute_batch(&format!(
                "CREATE TABLE {} (id INTEGER PRIMARY KEY, payload TEXT)",
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
            // Write as an application does, with SQLite's default durability and
            // checkpointing, not the settings Epidemic uses for its own bookkeeping
            // (see `connect`).
            let sync: i64 = conn
                .query_row("PRAGMA synchronous", [], |r| r.get(0))
                .map_err(sql_err)?;
            let checkpoint: i64 = conn
                .query_row("PRAGMA wal_autocheckpoint", [], |r| r.get(0))
                .map_err(sql_err)?;
            conn.pragma_update(None, "synchronous", "FULL")
                .map_err(sql_err)?;
            conn.pragma_update(None, "wal_autocheckpoint", 1000)
                .map_err(sql_err)?;
            let result = insert_scratch(conn, table, *first_id, *count, (*per_tx).max(1));
            conn.pragma_update(None, "synchronous", sync)
                .map_err(sql_err)?;
            conn.pragma_update(None, "wal_autocheckpoint", checkpoint)
                .map_err(sql_err)?;
            result
        }
        Scratch::Drop { table } => {
            check_scratch(table)?;
            drop_scratch(conn, table)
        }
    }
}

fn insert_scratch(
    conn: &mut Connection,
    table: &str,
    first_id: i64,
    count: u64,
    per_tx: u64,
) -> Result<(), BackendError> {
    let sql = format!(
        "INSERT INTO {} (id, payload) VALUES (?1, 'bench')",
        quote(table)
    );
    let end = first_id + count as i64;
    let mut id = first_id;
    while id < end {
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(sql_err)?;
        {
            let mut stmt = tx.prepare_cached(&sql).map_err(sql_err)?;
            for i in id..(id + per_tx as i64).min(end) {
                stmt.execute([i]).map_err(sql_err)?;
            }
        }
        tx.commit().map_err(sql_err)?;
        id += per_tx as i64;
    }
    Ok(())
}

fn check_scratch(table: &str) -> Result<(), BackendError> {
    if table != SCRATCH_TABLE {
        return Err(BackendError::Invalid(format!(
            "bench works only on {SCRATCH_TABLE}, not {table}"
        )));
    }
    Ok(())
}

fn drop_scratch(conn: &mut Connection, table: &str) -> Result<(), BackendError> {
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(sql_err)?;
    for (suffix, _) in TRIGGERS {
        tx.execute_batch(&format!(
            "DROP TRIGGER IF EXISTS {}",
            quote(&trigger_name(table, suffix))
        ))
        .map_err(sql_err)?;
    }
    tx.execute_batch(&format!(
        "DROP TABLE IF EXISTS {}",
        quote(&replaced_table(table))
    ))
    .map_err(sql_err)?;
    tx.execute_batch(&format!(
        "DROP TABLE IF EXISTS {}",
        quote(&format!("epidemic_log_{table}"))
    ))
    .map_err(sql_err)?;
    if SqliteSchema::new(&tx).installed()? {
        for t in ["epidemic_watch", "epidemic_cursor", "epidemic_dead_letter"] {
            tx.execute(&format!("DELETE FROM {t} WHERE source_table = ?1"), [table])
                .map_err(sql_err)?;
        }
    }
    tx.execute_batch(&format!("DROP TABLE IF EXISTS {}", quote(table)))
        .map_err(sql_err)?;
    tx.commit().map_err(sql_err)
}
