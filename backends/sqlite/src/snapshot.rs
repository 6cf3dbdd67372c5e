//! A backfill's chunk: the next rows of a watched table by key, then a watermark in the
//! table's log.
//!
//! The read is one bounded SELECT on the user's table, in autocommit mode (its own read
//! transaction, ended before anything is written), keyset-paginated on the table's key
//! as the registry has it (what `resolve` gave install): `WHERE (k1, k2) > (?, ?)
//! ORDER BY k1, k2 LIMIT n`, composite keys compared as a row value, in key order, each
//! column with its own collation and affinity for both the comparison and the order. On a
//! primary key that is one seek in the key's index; no lock but the read's own. A key
//! given by the config (`key = [..]`) should have an index, or each chunk scans the table.
//!
//! Then, in a statement of its own that commits before [`snapshot_chunk`] returns, the
//! watermark: a log row with op [`WATERMARK_OP`] and no values. Why every change
//! committed before the read comes before it in every consumer's stream (ARCHITECTURE.md,
//! "Backfill rule: SQLite"): the read sees every transaction committed before it began,
//! and each such change's log row was inserted in its transaction; SQLite has one writer
//! at a time, and the watermark's insert takes the write lock after the read ended, so its
//! `AUTOINCREMENT` id is larger than every log id committed before — and the reader
//! delivers each log in id order, which is commit order.
//!
//! The request's `only` conditions (the part of the handler's row filter a SELECT can
//! say) become `AND col = ?` or `AND col IN (?, ...)` with bound values, on a column of
//! integer or text affinity whose values are of that kind (any other condition is
//! ignored: it is a hint, and the host filters every row anyway); a column the table does
//! not have is refused. SQLite compares with the column's affinity and collation:
//! `NOCASE` or `RTRIM` read rows the host then drops, never fewer than exact equality.
//! Paging stays by key over the rows kept; an index on `(col, key)` lets each chunk read
//! only the rows it returns, else the key's index is walked past the rows of others.
//!
//! Snapshot rows carry the captured columns in the log's order (key first) with values
//! read as the log reads them ([`crate::reader::value`]), so a row's key equals a live
//! change's key for the same row. Their stable ids are `<log identity>-w<watermark>.<i>`:
//! the watermark's id is never handed out again in that log, so no two rows share one.

use epidemic_plugin_sdk::backend::{BackendError, Chunk, ChunkRequest, ColumnIn, ColumnType};
use epidemic_plugin_sdk::{Change, Op, Origin, Value};
use rusqlite::types::Value as SqlValue;
use rusqlite::{params_from_iter, Connection};

use crate::capture::WATERMARK_OP;
use crate::catalog::{column_types, quote};
use crate::error::sql_err;
use crate::install::watched;
use crate::reader::value;

/// Read the next `limit` rows of the table after `after` by key, then write the
/// watermark; see the module docs.
pub(crate) fn snapshot_chunk(
    conn: &Connection,
    request: &ChunkRequest,
) -> Result<Chunk, BackendError> {
    let table = &request.table;
    let log = watched(conn, table)?.ok_or_else(|| {
        BackendError::Invalid(format!(
            "table {table} is not watched; run `epidemic install`"
        ))
    })?;
    let identity = log.identity.clone().ok_or_else(|| {
        BackendError::Invalid(format!(
            "log {} was installed by an older Epidemic (it has no identity for stable ids); run `epidemic install`",
            log.log_table
        ))
    })?;
    let key = log.current_key().ok_or_else(|| {
        BackendError::Invalid(format!(
            "table {table} has no key in Epidemic's registry (installed by an older Epidemic); run `epidemic install`"
        ))
    })?;
    if let Some(after) = &request.after {
        if after.len() != key.columns.len() {
            return Err(BackendError::Invalid(format!(
                "the key of table {} is ({}) now, but its backfill was paging by a key of {} columns: \
                 the key changed during the backfill; cancel it and request it again",
                log.source_table,
                key.columns.join(", "),
                after.len()
            )));
        }
    }

    let columns: Vec<String> = log.columns.iter().map(|c| quote(c)).collect();
    let key_q: Vec<String> = key.columns.iter().map(|c| quote(c)).collect();
    let (after, mut binds) = after_filter(&key_q, request.after.as_deref());
    let (only, only_binds) = only_filter(conn, &log.source_table, &request.only)?;
    binds.extend(only_binds.iter().cloned());
    let filter = match (after.is_empty(), only.is_empty()) {
        (true, true) => String::new(),
        (false, true) => format!("WHERE {after}"),
        (true, false) => format!("WHERE {only}"),
        (false, false) => format!("WHERE ({after}) AND {only}"),
    };
    let limit = request.limit.max(1);
    // The limit is written into the statement: a bound LIMIT makes SQLite plan the
    // statement again on every use (see `SqliteLogTable::select_sql`).
    let sql = format!(
        "SELECT {} FROM {} {filter} ORDER BY {} LIMIT {limit}",
        columns.join(", "),
        quote(&log.source_table),
        key_q.join(", ")
    );
    let images: Vec<Vec<Value>> = {
        let mut stmt = conn
            .prepare_cached(&sql)
            .map_err(|e| read_err(e, &log.source_table))?;
        let mut rows = stmt
            .query(params_from_iter(binds))
            .map_err(|e| read_err(e, &log.source_table))?;
        let mut images = Vec::with_capacity(limit as usize);
        while let Some(row) = rows.next().map_err(sql_err)? {
            images.push(
                (0..columns.len())
                    .map(|i| row.get_ref(i).map(value).map_err(sql_err))
                    .collect::<Result<_, _>>()?,
            );
        }
        images
        // The statement is reset here: the read transaction ends before the watermark.
    };
    // Only for the first chunk: a count is a scan of the table (or of its smallest
    // index), and the host keeps the estimate it has. Of the rows `only` keeps: what the
    // backfill will read.
    let rows_estimate = match request.after {
        None => Some(
            conn.query_row(
                &format!(
                    "SELECT count(*) FROM {}{}",
                    quote(&log.source_table),
                    if only.is_empty() {
                        String::new()
                    } else {
                        format!(" WHERE {only}")
                    }
                ),
                params_from_iter(only_binds),
                |r| r.get::<_, i64>(0),
            )
            .map_err(sql_err)?
            .max(0) as u64,
        ),
        Some(_) => None,
    };

    let (watermark, at): (i64, i64) = conn
        .prepare_cached(&format!(
            "INSERT INTO {} (op) VALUES ('{WATERMARK_OP}') RETURNING id, changed_at",
            quote(&log.log_table)
        ))
        .and_then(|mut s| s.query_row([], |r| Ok((r.get(0)?, r.get(1)?))))
        .map_err(sql_err)?;

    let last = images.len() < limit as usize;
    let rows = images
        .into_iter()
        .enumerate()
        .map(|(i, new)| Change {
            id: 0,
            stable_id: format!("{identity}-w{watermark}.{i}"),
            schema: None,
            table: log.source_table.clone(),
            op: Op::Insert,
            origin: Origin::Snapshot,
            key_columns: key.columns.clone(),
            key: key.index.iter().map(|&k| new[k].clone()).collect(),
            old_key: None,
            columns: log.columns.clone(),
            old: None,
            new: Some(new),
            changed_at_us: at,
            txid: None,
            commit_seq: None,
            attempt: 0,
        })
        .collect();
    Ok(Chunk {
        rows,
        watermark,
        last,
        rows_estimate,
    })
}

/// The condition that keeps the rows `only` asks for (see the module docs), with the
/// values it binds; empty when none applies. A column the table does not have is
/// refused.
fn only_filter(
    conn: &Connection,
    table: &str,
    only: &[ColumnIn],
) -> Result<(String, Vec<SqlValue>), BackendError> {
    if only.is_empty() {
        return Ok((String::new(), Vec::new()));
    }
    let columns = column_types(conn, table)?;
    let mut terms = Vec::new();
    let mut binds = Vec::new();
    for c in only {
        let (name, kind) = columns
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(&c.column))
            .ok_or_else(|| {
                BackendError::Invalid(format!(
                    "a backfill of table {table} was asked to keep only rows by column {}, which the table does not have",
                    c.column
                ))
            })?;
        let fits = |v: &Value| {
            matches!(
                (kind, v),
                (ColumnType::Int, Value::Int(_)) | (ColumnType::Text, Value::Text(_))
            )
        };
        if !c.values.iter().all(fits) {
            continue;
        }
        if c.values.is_empty() {
            terms.push("0".to_owned());
            continue;
        }
        // One value as an equality, so that an index on `(col, key)` gives key order.
        terms.push(if c.values.len() == 1 {
            format!("{} = ?", quote(name))
        } else {
            let marks = vec!["?"; c.values.len()].join(", ");
            format!("{} IN ({marks})", quote(name))
        });
        binds.extend(c.values.iter().map(sql_value));
    }
    Ok((terms.join(" AND "), binds))
}

/// The condition that keeps rows whose key (`key`, quoted) comes after `after` in
/// `ORDER BY key` order, with the values it binds. A row value comparison when `after`
/// has no NULL (an index seek); SQLite sorts NULL first but a row value comparison with
/// a NULL is NULL, so a key with NULLs (possible in a configured key) is compared column
/// by column instead.
fn after_filter(key: &[String], after: Option<&[Value]>) -> (String, Vec<SqlValue>) {
    let Some(after) = after else {
        return (String::new(), Vec::new());
    };
    if !after.iter().any(Value::is_null) {
        let marks = vec!["?"; key.len()].join(", ");
        let filter = if key.len() == 1 {
            format!("{} > ?", key[0])
        } else {
            format!("({}) > ({marks})", key.join(", "))
        };
        return (filter, after.iter().map(sql_value).collect());
    }
    // (k1 > a1) OR (k1 = a1 AND k2 > a2) OR ..., with "= NULL" as IS NULL and
    // "> NULL" as IS NOT NULL.
    let mut binds = Vec::new();
    let mut alternatives = Vec::with_capacity(key.len());
    for i in 0..key.len() {
        let mut terms = Vec::with_capacity(i + 1);
        for (k, a) in key.iter().zip(after).take(i) {
            if a.is_null() {
                terms.push(format!("{k} IS NULL"));
            } else {
                terms.push(format!("{k} = ?"));
                binds.push(sql_value(a));
            }
        }
        if after[i].is_null() {
            terms.push(format!("{} IS NOT NULL", key[i]));
        } else {
            terms.push(format!("{} > ?", key[i]));
            binds.push(sql_value(&after[i]));
        }
        alternatives.push(format!("({})", terms.join(" AND ")));
    }
    (alternatives.join(" OR "), binds)
}

fn sql_value(v: &Value) -> SqlValue {
    match v {
        Value::Null => SqlValue::Null,
        Value::Int(i) => SqlValue::Integer(*i),
        Value::Float(f) => SqlValue::Real(*f),
        Value::Text(s) => SqlValue::Text(s.clone()),
        Value::Bytes(b) => SqlValue::Blob(b.clone()),
    }
}

/// A failed read of the user's table, naming it (a captured column dropped since
/// install is drift: `epidemic status` says which).
fn read_err(e: rusqlite::Error, table: &str) -> BackendError {
    match sql_err(e) {
        BackendError::Other(m) => BackendError::Other(format!(
            "reading table {table} for a backfill: {m} (see `epidemic status`)"
        )),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use epidemic_plugin_sdk::backend::Watch;

    /// Every row of `t` by chunks of `limit`, keys only.
    fn page(conn: &Connection, limit: u32) -> Vec<Vec<Value>> {
        page_only(conn, limit, &[])
    }

    /// The rows of `t` that `only` keeps, by chunks of `limit`, keys only.
    fn page_only(conn: &Connection, limit: u32, only: &[ColumnIn]) -> Vec<Vec<Value>> {
        let mut after = None;
        let mut keys = Vec::new();
        loop {
            let chunk = snapshot_chunk(
                conn,
                &ChunkRequest {
                    table: "t".into(),
                    after: after.clone(),
                    limit,
                    only: only.to_vec(),
                },
            )
            .unwrap();
            keys.extend(chunk.rows.iter().map(|r| r.key.clone()));
            if chunk.last {
                return keys;
            }
            after = chunk.rows.last().map(|r| r.key.clone());
        }
    }

    #[test]
    fn keys_with_nulls_page_in_order_by_key() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE t (a TEXT, b INTEGER, v TEXT);
             INSERT INTO t VALUES (NULL, NULL, 'x'), (NULL, 2, 'x'), (NULL, 1, 'x'),
                                  ('m', NULL, 'x'), ('m', 3, 'x'), ('a', 9, 'x'), ('z', NULL, 'x');",
        )
        .unwrap();
        let w = Watch {
            table: "t".into(),
            columns: vec!["v".into()],
            key: vec!["a".into(), "b".into()],
            ..Watch::default()
        };
        crate::install::apply(&mut conn, |c| crate::install::plan_install(c, &[w])).unwrap();
        let n = Value::Null;
        let t = |s: &str| Value::from(s);
        let want = vec![
            vec![n.clone(), n.clone()],
            vec![n.clone(), 1.into()],
            vec![n.clone(), 2.into()],
            vec![t("a"), 9.into()],
            vec![t("m"), n.clone()],
            vec![t("m"), 3.into()],
            vec![t("z"), n.clone()],
        ];
        for limit in [1, 2, 3, 100] {
            assert_eq!(page(&conn, limit), want, "chunks of {limit}");
        }
        // Kept rows only, paged column by column past the NULLs: the key's alternatives
        // (`... OR ...`) and the kept rows' condition combine as an AND of the two.
        conn.execute_batch("UPDATE t SET v = 'y' WHERE b = 2 OR a = 'a'")
            .unwrap();
        let only = [ColumnIn {
            column: "V".into(),
            values: vec!["x".into()],
        }];
        let kept: Vec<Vec<Value>> = want
            .iter()
            .filter(|k| k[1] != Value::Int(2) && k[0] != t("a"))
            .cloned()
            .collect();
        assert_eq!(kept.len(), 5);
        for limit in [1, 2, 3, 100] {
            assert_eq!(page_only(&conn, limit, &only), kept, "chunks of {limit}");
        }
    }
}
