//! Backfill requests and progress in `epidemic_backfill` (made by install, see
//! `install.rs`): one row per (daemon, handler, source table) with its state
//! (`requested`, `running`, `done`), the SDK's `BackfillProgress` as JSON, and when the
//! row was last written by the server's clock. The consumer's daemon carries a backfill
//! out (`snapshot.rs` reads its chunks); this file only stores what the host says.
//!
//! A request is refused, with nothing stored, while the consumer has a backfill that is
//! requested or running for any table. Two requests racing for one consumer must not
//! both pass that check: each runs in a transaction that first reads the consumer's rows
//! with `FOR UPDATE`. Rows that exist are then locked, so the second waits for the first
//! to commit and reads its rows; where none exist, both hold only gap locks on the
//! consumer's part of the primary key, each one's INSERT waits for the other's, and
//! InnoDB rolls one back as a deadlock, which is tried again from the start and then
//! sees the other's rows.
//!
//! A save updates the row of the same request only (the same `requested_at`), so a daemon
//! still running a backfill that was cancelled and requested again stops instead of
//! overwriting the new request's progress with its own.
//!
//! A database installed by a version without backfills has no `epidemic_backfill` until
//! the next install: nothing can be pending there, and a request says to install.

use epidemic_plugin_sdk::backend::{
    BackendError, BackfillProgress, BackfillReply, BackfillRequest, BackfillState, Consumer,
};
use mysql::prelude::Queryable;
use mysql::Conn;

use crate::capture::now_expr;
use crate::catalog::MySqlCatalog;
use crate::conn::ServerInfo;
use crate::error::{server_code, sql_err};
use crate::install::MAX_CONSUMER_NAME;
use crate::snapshot;

/// Server error codes of a transaction InnoDB rolled back to break a deadlock or a lock
/// wait that timed out: the request is tried again.
const ER_LOCK_DEADLOCK: u16 = 1213;
const ER_LOCK_WAIT_TIMEOUT: u16 = 1205;

/// How often a request rolled back by a deadlock is tried again.
const REQUEST_TRIES: u32 = 5;

fn state_text(s: BackfillState) -> &'static str {
    match s {
        BackfillState::Requested => "requested",
        BackfillState::Running => "running",
        BackfillState::Done => "done",
    }
}

fn parse_state(s: &str) -> Result<BackfillState, BackendError> {
    match s {
        "requested" => Ok(BackfillState::Requested),
        "running" => Ok(BackfillState::Running),
        "done" => Ok(BackfillState::Done),
        other => Err(BackendError::Other(format!(
            "epidemic_backfill holds an unknown state {other:?}"
        ))),
    }
}

/// daemon, handler, source_table, state, progress.
type Row = (String, String, String, String, Vec<u8>);

const COLUMNS: &str = "`daemon`, `handler`, `source_table`, `state`, `progress`";

/// A stored row as progress: the JSON, with the row's own columns (what every query
/// selects by) taking precedence over what the JSON says.
fn decode(
    (daemon, handler, table, state, progress): Row,
) -> Result<BackfillProgress, BackendError> {
    let mut p: BackfillProgress = serde_json::from_slice(&progress).map_err(|e| {
        BackendError::Other(format!(
            "epidemic_backfill row of {daemon}/{handler} on {table} is damaged: {e}"
        ))
    })?;
    p.state = parse_state(&state)?;
    p.daemon = daemon;
    p.handler = handler;
    p.table = table;
    Ok(p)
}

fn encode(p: &BackfillProgress) -> Result<Vec<u8>, BackendError> {
    serde_json::to_vec(p).map_err(|e| BackendError::Other(format!("backfill progress: {e}")))
}

fn installed(conn: &mut Conn) -> Result<bool, BackendError> {
    MySqlCatalog::new(conn).table_exists("epidemic_backfill")
}

/// Answer a [`BackfillRequest`].
pub(crate) fn backfills(
    conn: &mut Conn,
    server: ServerInfo,
    request: &BackfillRequest,
) -> Result<BackfillReply, BackendError> {
    if !installed(conn)? {
        return match request {
            BackfillRequest::Request { .. } => Err(BackendError::Invalid(
                "this database has no table for backfills yet (installed by an older version): \
                 run `epidemic install` first"
                    .into(),
            )),
            _ => Ok(BackfillReply::default()),
        };
    }
    let backfills = match request {
        BackfillRequest::Request {
            consumer,
            tables,
            requested_by,
        } => request_backfill(conn, server, consumer, tables, requested_by)?,
        BackfillRequest::Pending { consumer } => select(
            conn,
            "WHERE `daemon` = ? AND `handler` = ? AND `state` <> 'done' ORDER BY `source_table`",
            (&consumer.daemon, &consumer.handler),
        )?,
        BackfillRequest::Save(progress) => save(conn, server, progress)?,
        BackfillRequest::List => select(conn, "ORDER BY `daemon`, `handler`, `source_table`", ())?,
        BackfillRequest::Cancel { consumer } => cancel(conn, consumer)?,
    };
    Ok(BackfillReply { backfills })
}

fn select(
    conn: &mut Conn,
    rest: &str,
    params: impl Into<mysql::Params>,
) -> Result<Vec<BackfillProgress>, BackendError> {
    let rows: Vec<Row> = conn
        .exec(
            format!("SELECT {COLUMNS} FROM `epidemic_backfill` {rest}"),
            params,
        )
        .map_err(sql_err)?;
    rows.into_iter().map(decode).collect()
}

/// Run `work` in a transaction: committed when it returns `Ok`, rolled back otherwise.
fn in_transaction<T, E: From<mysql::Error>>(
    conn: &mut Conn,
    work: impl FnOnce(&mut Conn) -> Result<T, E>,
) -> Result<T, E> {
    conn.query_drop("START TRANSACTION")?;
    match work(conn).and_then(|t| conn.query_drop("COMMIT").map(|()| t).map_err(E::from)) {
        Ok(t) => Ok(t),
        Err(e) => {
            let _ = conn.query_drop("ROLLBACK");
            Err(e)
        }
    }
}

/// Why a request was not stored.
enum Refusal {
    Sql(mysql::Error),
    /// Another backfill of the consumer is requested or running (the message).
    Busy(String),
}

impl From<mysql::Error> for Refusal {
    fn from(e: mysql::Error) -> Self {
        Refusal::Sql(e)
    }
}

fn request_backfill(
    conn: &mut Conn,
    server: ServerInfo,
    consumer: &Consumer,
    tables: &[String],
    requested_by: &str,
) -> Result<Vec<BackfillProgress>, BackendError> {
    for (what, name) in [("daemon", &consumer.daemon), ("handler", &consumer.handler)] {
        if name.is_empty() || name.chars().count() > MAX_CONSUMER_NAME {
            return Err(BackendError::Invalid(format!(
                "{what} name {name:?} must be 1 to {MAX_CONSUMER_NAME} characters"
            )));
        }
    }
    let mut wanted: Vec<&String> = Vec::new();
    for t in tables {
        if !wanted.contains(&t) {
            wanted.push(t);
        }
    }
    if wanted.is_empty() {
        return Err(BackendError::Invalid(format!(
            "a backfill of consumer {consumer} needs at least one table"
        )));
    }
    // Every table first: a table that cannot be paged through refuses the whole request.
    for t in &wanted {
        snapshot::check_table(conn, server, t)?;
    }
    let now = epidemic_plugin_sdk::backend::kit::now_us();
    let rows: Vec<BackfillProgress> = wanted
        .iter()
        .map(|t| BackfillProgress {
            daemon: consumer.daemon.clone(),
            handler: consumer.handler.clone(),
            table: (*t).clone(),
            state: BackfillState::Requested,
            requested_by: requested_by.to_owned(),
            requested_at_us: now,
            ..Default::default()
        })
        .collect();
    let encoded = rows.iter().map(encode).collect::<Result<Vec<_>, _>>()?;
    let mut tries = 0;
    loop {
        tries += 1;
        let attempt = in_transaction(conn, |c| -> Result<(), Refusal> {
            let mine: Vec<Row> = c.exec(
                format!(
                    "SELECT {COLUMNS} FROM `epidemic_backfill` WHERE `daemon` = ? AND `handler` = ? \
                     ORDER BY `source_table` FOR UPDATE"
                ),
                (&consumer.daemon, &consumer.handler),
            )?;
            // A running one says the most (how far it is).
            let busy = mine
                .iter()
                .position(|r| r.3 == "running")
                .or_else(|| mine.iter().position(|r| r.3 != "done"));
            if let Some(i) = busy {
                return Err(Refusal::Busy(busy_message(consumer, mine[i].clone())));
            }
            for (p, progress) in rows.iter().zip(&encoded) {
                // A done backfill of the same table is replaced.
                c.exec_drop(
                    format!(
                        "REPLACE INTO `epidemic_backfill` ({COLUMNS}, `requested_at`, `updated_at`) \
                         VALUES (?, ?, ?, 'requested', ?, ?, {})",
                        now_expr(server)
                    ),
                    (&p.daemon, &p.handler, &p.table, progress, p.requested_at_us),
                )?;
            }
            Ok(())
        });
        match attempt {
            Ok(()) => return Ok(rows),
            Err(Refusal::Busy(m)) => return Err(BackendError::Invalid(m)),
            Err(Refusal::Sql(e))
                if tries < REQUEST_TRIES
                    && matches!(
                        server_code(&e),
                        Some(ER_LOCK_DEADLOCK | ER_LOCK_WAIT_TIMEOUT)
                    ) =>
            {
                continue
            }
            Err(Refusal::Sql(e)) => return Err(sql_err(e)),
        }
    }
}

/// "a backfill of consumer mx1/maildir is already running (table users: 1200 of ~50000
/// rows); wait for it to finish, or cancel it".
fn busy_message(consumer: &Consumer, row: Row) -> String {
    let table = row.2.clone();
    let state = row.3.clone();
    let how = match decode(row) {
        Ok(p) if p.state == BackfillState::Running => {
            let total = p
                .rows_estimate
                .map_or("?".to_owned(), |t| format!("~{}", t.max(p.rows_done)));
            format!("running (table {table}: {} of {total} rows)", p.rows_done)
        }
        Ok(_) => format!("requested (table {table}, not started yet)"),
        Err(_) => format!("{state} (table {table})"),
    };
    format!(
        "a backfill of consumer {consumer} is already {how}; wait for it to finish, or cancel it \
         (`epidemic backfill --handler {} --cancel`)",
        consumer.handler
    )
}

/// Store the progress in the row its request made; nothing when that row is gone
/// (cancelled, maybe requested again since).
fn save(
    conn: &mut Conn,
    server: ServerInfo,
    progress: &BackfillProgress,
) -> Result<Vec<BackfillProgress>, BackendError> {
    let encoded = encode(progress)?;
    let key = (&progress.daemon, &progress.handler, &progress.table);
    let stored = in_transaction(conn, |c| -> Result<bool, mysql::Error> {
        let requested_at: Option<i64> = c.exec_first(
            "SELECT `requested_at` FROM `epidemic_backfill` WHERE `daemon` = ? AND `handler` = ? AND `source_table` = ? FOR UPDATE",
            key,
        )?;
        if requested_at != Some(progress.requested_at_us) {
            return Ok(false);
        }
        c.exec_drop(
            format!(
                "UPDATE `epidemic_backfill` SET `state` = ?, `progress` = ?, `updated_at` = {} \
                 WHERE `daemon` = ? AND `handler` = ? AND `source_table` = ?",
                now_expr(server)
            ),
            (
                state_text(progress.state),
                &encoded,
                &progress.daemon,
                &progress.handler,
                &progress.table,
            ),
        )?;
        Ok(true)
    })
    .map_err(sql_err)?;
    Ok(if stored {
        vec![progress.clone()]
    } else {
        Vec::new()
    })
}

/// Forget the consumer's backfills that are not done; the ones forgotten.
fn cancel(conn: &mut Conn, consumer: &Consumer) -> Result<Vec<BackfillProgress>, BackendError> {
    let key = (&consumer.daemon, &consumer.handler);
    let rows = in_transaction(conn, |c| -> Result<Vec<Row>, mysql::Error> {
        let rows: Vec<Row> = c.exec(
            format!(
                "SELECT {COLUMNS} FROM `epidemic_backfill` WHERE `daemon` = ? AND `handler` = ? \
                 AND `state` <> 'done' ORDER BY `source_table` FOR UPDATE"
            ),
            key,
        )?;
        c.exec_drop(
            "DELETE FROM `epidemic_backfill` WHERE `daemon` = ? AND `handler` = ? AND `state` <> 'done'",
            key,
        )?;
        Ok(rows)
    })
    .map_err(sql_err)?;
    rows.into_iter().map(decode).collect()
}

/// Forget every backfill of a consumer (it is being unregistered).
pub(crate) fn forget(conn: &mut Conn, consumer: &Consumer) -> Result<(), BackendError> {
    if !installed(conn)? {
        return Ok(());
    }
    conn.exec_drop(
        "DELETE FROM `epidemic_backfill` WHERE `daemon` = ? AND `handler` = ?",
        (&consumer.daemon, &consumer.handler),
    )
    .map_err(sql_err)
}
