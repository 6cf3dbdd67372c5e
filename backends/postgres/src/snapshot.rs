//! A backfill's chunk ([`PgSnapshots::chunk`]): the next rows of a watched table by key,
//! read without a lock beyond the read's own, then a watermark in the table's log.
//!
//! # The read
//!
//! One `SELECT` on the user's table, on its own in autocommit (READ COMMITTED: one
//! statement, one snapshot, so the chunk is consistent), keyset-paginated on the key the
//! registry has (what `resolve` gave install): `WHERE (k1, k2) > ($1, $2) ORDER BY k1, k2
//! LIMIT n`, composite keys compared as a row value in key order, each column with its
//! type's default ordering and its own collation for both the comparison and the order,
//! so that `after` continues exactly where the last chunk stopped. On a primary key that
//! is one seek in the key's index. It takes only the `ACCESS SHARE` lock every `SELECT`
//! takes: writers are never blocked. A configured key (`key = [..]`) should have an index,
//! or each chunk scans the table; a nullable column in it is paged with PostgreSQL's
//! order (NULLs last), column by column, since a row comparison with a NULL is NULL. An
//! ordinary table is read `ONLY` (its inheritance children have no capture triggers of
//! their own); a partitioned one through its partitions.
//!
//! Every captured column is read as the log holds it: cast to the log column's type and
//! read with the same [`ValueKind`] as the fetch statement (`numeric`, timestamps and
//! every other type as their text in this session), so a snapshot row's key and values
//! are the `Value`s a live change of the same row carries. The `after` key is bound as
//! text and cast to the same types, so it compares as the values it was read from.
//!
//! # The watermark, and why it is after every change committed before the read
//!
//! After the read, in a statement and transaction of its own that commits before
//! [`PgSnapshots::chunk`] returns: `INSERT INTO log (op) VALUES ('W')`, a log row like any
//! other (an id from the shared sequence, its transaction's `txid`), every value NULL.
//! ARCHITECTURE.md ("Backfill rule" / PostgreSQL) has the argument; in short, for a change
//! `C` the read saw (its transaction committed before the read's snapshot was taken):
//!
//! - `id(C) < id(W)`: `C`'s id was drawn by `nextval` inside its transaction, before it
//!   committed, so before the read began; `W`'s is drawn after the read ended, and the
//!   sequence only grows (`CACHE 1`, one sequence for every log).
//! - Every snapshot in which `W`'s transaction is visible was taken after `W` committed,
//!   so after the read's snapshot, and sees `C` too (a committed transaction stays
//!   visible in every later snapshot). A consumer's batch is what its new snapshot sees
//!   and its previous one did not: `C` is in `W`'s batch or an earlier one.
//! - Within a batch, rows are delivered in id order (every piece reads `id > done_upto`
//!   in id order): `C` before `W`.
//!
//! Snapshot rows' stable ids are `<log identity>-w<watermark>.<i>`: the watermark's id is
//! never handed out again in that log, so no two snapshot rows share one, and none is the
//! stable id of a change (`<identity>-<id>`).

use epidemic_plugin_sdk::backend::{Chunk, ChunkRequest};
use epidemic_plugin_sdk::{Change, Op, Origin, Value};
use postgres::types::ToSql;
use postgres::Client;

use crate::capture::WATERMARK_OP;
use crate::error::PgError;
use crate::ident::{quote_literal, Ident, TableName};
use crate::reader::decode::ValueKind;
use crate::registry::{load_registry, schema_state, SchemaState};

/// Backfill reads of one Epidemic schema.
pub(crate) struct PgSnapshots<'a> {
    pub schema: &'a Ident,
}

/// A log column as the read needs it.
struct LogColumn {
    kind: ValueKind,
    /// `format_type` of the log column: what the table's column is cast to.
    type_sql: String,
}

/// The user's table as the read needs it.
struct Source {
    partitioned: bool,
    /// Per key column, in key order: it may hold NULL.
    nullable_key: Vec<bool>,
    /// `reltuples` (of its partitions, for a partitioned table); `None` when never
    /// analyzed.
    estimate: Option<u64>,
}

impl PgSnapshots<'_> {
    /// Read the next `limit` rows of the table after `after` by key, then write the
    /// watermark; see the module docs.
    pub fn chunk(&self, client: &mut Client, request: &ChunkRequest) -> Result<Chunk, PgError> {
        let table = &request.table;
        let name = TableName::parse(table)?;
        if schema_state(client, self.schema)? != SchemaState::Ours {
            return Err(PgError::NothingInstalled(self.schema.to_string()));
        }
        let registry = load_registry(client, self.schema)?;
        let reg = registry
            .get(&name)
            .ok_or_else(|| PgError::NotInstalled(table.clone()))?;
        let identity = reg
            .log_identity
            .clone()
            .ok_or_else(|| PgError::Outdated(table.clone()))?;
        if reg.key_columns.is_empty() {
            return Err(PgError::Outdated(table.clone()));
        }
        let columns: Vec<String> = reg.columns.iter().map(|c| c.name.to_string()).collect();
        let key_index = reg
            .key_columns
            .iter()
            .map(|k| columns.iter().position(|c| c == k.as_str()))
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| PgError::Outdated(table.clone()))?;
        if let Some(after) = &request.after {
            if after.len() != reg.key_columns.len() {
                return Err(PgError::KeyChanged {
                    table: name.to_string(),
                    key: reg.key_columns.iter().map(Ident::to_string).collect(),
                    paging: after.len(),
                });
            }
        }
        let log = reg.log(self.schema);
        let log_columns = self.log_columns(client, &log, reg)?;
        let source = source(client, &name, &reg.key_columns)?;

        // The read.
        let select: Vec<String> = reg
            .columns
            .iter()
            .zip(&log_columns)
            .map(|(c, l)| {
                l.kind
                    .wrap(&format!("t.{}::{}", c.name.quoted(), l.type_sql))
            })
            .collect();
        let key_sql: Vec<String> = reg
            .key_columns
            .iter()
            .map(|k| format!("t.{}", k.quoted()))
            .collect();
        let key_types: Vec<&str> = key_index
            .iter()
            .map(|&i| log_columns[i].type_sql.as_str())
            .collect();
        let mut binds: Vec<Option<String>> = Vec::new();
        let filter = match &request.after {
            None => String::new(),
            Some(after) => format!(
                "WHERE {}",
                after_filter(
                    &key_sql,
                    &key_types,
                    &source.nullable_key,
                    after,
                    &mut binds
                )
            ),
        };
        let limit = i64::from(request.limit.max(1));
        let sql = format!(
            "SELECT {} FROM {}{} t {filter} ORDER BY {} LIMIT ${}::pg_catalog.int8",
            select.join(", "),
            if source.partitioned { "" } else { "ONLY " },
            name.quoted(),
            key_sql.join(", "),
            binds.len() + 1
        );
        let mut params: Vec<&(dyn ToSql + Sync)> =
            binds.iter().map(|b| b as &(dyn ToSql + Sync)).collect();
        params.push(&limit);
        let rows = client.query(&sql, &params).map_err(PgError::sql(format!(
            "read table {name} for a backfill (see `epidemic status`)"
        )))?;
        let mut images = Vec::with_capacity(rows.len());
        for row in &rows {
            let image = log_columns
                .iter()
                .enumerate()
                .map(|(i, l)| l.kind.read(row, i))
                .collect::<Result<Vec<Value>, _>>()
                .map_err(PgError::sql(format!("decode table {name} for a backfill")))?;
            images.push(image);
        }
        drop(rows);

        // Then the watermark, committed before returning.
        let row = client
            .query_one(
                &format!(
                    "INSERT INTO {log} (op) VALUES ({}) \
                     RETURNING id, (extract(epoch FROM changed_at) * 1000000)::int8",
                    quote_literal(&char::from(WATERMARK_OP).to_string())
                ),
                &[],
            )
            .map_err(PgError::sql(format!(
                "write a backfill watermark into the log of {name}"
            )))?;
        let watermark: i64 = row.get(0);
        let changed_at_us: i64 = row.get(1);

        let last = (images.len() as i64) < limit;
        let columns: std::sync::Arc<[String]> = columns.into();
        let key_columns: std::sync::Arc<[String]> = reg
            .key_columns
            .iter()
            .map(Ident::to_string)
            .collect::<Vec<_>>()
            .into();
        let rows = images
            .into_iter()
            .enumerate()
            .map(|(i, new)| Change {
                id: 0,
                stable_id: format!("{identity}-w{watermark}.{i}"),
                schema: Some(name.schema.to_string()),
                table: table.clone(),
                op: Op::Insert,
                origin: Origin::Snapshot,
                key_columns: key_columns.clone(),
                key: key_index.iter().map(|&k| new[k].clone()).collect(),
                old_key: None,
                columns: columns.clone(),
                old: None,
                new: Some(new),
                changed_at_us,
                txid: None,
                commit_seq: None,
                attempt: 0,
            })
            .collect();
        Ok(Chunk {
            rows,
            watermark,
            last,
            rows_estimate: source.estimate,
        })
    }

    /// The kind and type of the log column that holds each registered column's new value,
    /// in registry order.
    fn log_columns(
        &self,
        client: &mut Client,
        log: &str,
        reg: &crate::registry::RegisteredTable,
    ) -> Result<Vec<LogColumn>, PgError> {
        let rows = client
            .query(
                "SELECT a.attname::text, a.atttypid, pg_catalog.format_type(a.atttypid, a.atttypmod) \
                 FROM pg_catalog.pg_attribute a \
                 WHERE a.attrelid = $1::text::pg_catalog.regclass AND a.attnum > 0 AND NOT a.attisdropped",
                &[&log],
            )
            .map_err(PgError::sql(format!("inspect the log table {log}")))?;
        reg.columns
            .iter()
            .map(|c| {
                rows.iter()
                    .find(|r| r.get::<_, String>(0) == c.new_column.as_str())
                    .map(|r| LogColumn {
                        kind: ValueKind::of(r.get(1)),
                        type_sql: r.get(2),
                    })
                    .ok_or_else(|| PgError::LogColumnGone {
                        log: log.to_owned(),
                        column: c.new_column.to_string(),
                    })
            })
            .collect()
    }
}

/// What the read needs to know of the user's table: partitioned or not, which key
/// columns may hold NULL, and its estimated size.
fn source(client: &mut Client, name: &TableName, key: &[Ident]) -> Result<Source, PgError> {
    let key: Vec<&str> = key.iter().map(Ident::as_str).collect();
    let row = client
        .query_opt(
            "SELECT c.relkind = 'p', \
                    ARRAY(SELECT NOT a.attnotnull FROM unnest($3::text[]) WITH ORDINALITY AS k(name, i) \
                          JOIN pg_catalog.pg_attribute a \
                            ON a.attrelid = c.oid AND a.attname = k.name AND NOT a.attisdropped \
                          ORDER BY k.i), \
                    CASE WHEN c.relkind = 'p' THEN \
                         (SELECT sum(p.reltuples)::float8 FROM pg_catalog.pg_partition_tree(c.oid) t \
                          JOIN pg_catalog.pg_class p ON p.oid = t.relid \
                          WHERE t.isleaf AND p.reltuples >= 0) \
                    WHEN c.reltuples >= 0 THEN c.reltuples::float8 END \
             FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            &[&name.schema.as_str(), &name.table.as_str(), &key],
        )
        .map_err(PgError::sql(format!("inspect table {name}")))?
        .ok_or_else(|| PgError::MissingTable(name.to_string()))?;
    let nullable_key: Vec<bool> = row.get(1);
    if nullable_key.len() != key.len() {
        return Err(PgError::KeyColumnGone(name.to_string()));
    }
    let estimate: Option<f64> = row.get(2);
    Ok(Source {
        partitioned: row.get(0),
        nullable_key,
        estimate: estimate.map(|e| e.max(0.0).round() as u64),
    })
}

/// The condition that keeps the rows whose key (`key`, SQL expressions of the key
/// columns, of types `types`) comes after `after` in `ORDER BY key` order, binding the
/// values as text (`binds`, numbered from `$1`). A row comparison when no key column can
/// be NULL (an index seek); otherwise column by column in PostgreSQL's ascending order,
/// where NULL comes last: `(k1 > a1 OR k1 IS NULL) OR (k1 = a1 AND ...)`, nothing being
/// after a NULL, and "equal" to a NULL being `IS NULL`.
fn after_filter(
    key: &[String],
    types: &[&str],
    nullable: &[bool],
    after: &[Value],
    binds: &mut Vec<Option<String>>,
) -> String {
    let bind = |v: &Value, ty: &str, binds: &mut Vec<Option<String>>| {
        binds.push(text_of(v));
        format!("${}::pg_catalog.text::{ty}", binds.len())
    };
    if !nullable.iter().any(|&n| n) && !after.iter().any(Value::is_null) {
        let values: Vec<String> = after
            .iter()
            .zip(types)
            .map(|(v, ty)| bind(v, ty, binds))
            .collect();
        return if key.len() == 1 {
            format!("{} > {}", key[0], values[0])
        } else {
            format!("({}) > ({})", key.join(", "), values.join(", "))
        };
    }
    let mut alternatives = Vec::new();
    for i in 0..key.len() {
        if after[i].is_null() {
            // Nothing comes after NULL in this column.
            continue;
        }
        let mut terms = Vec::with_capacity(i + 1);
        for ((k, a), ty) in key.iter().zip(after).zip(types).take(i) {
            if a.is_null() {
                terms.push(format!("{k} IS NULL"));
            } else {
                terms.push(format!("{k} = {}", bind(a, ty, binds)));
            }
        }
        let greater = format!("{} > {}", key[i], bind(&after[i], types[i], binds));
        terms.push(if nullable[i] {
            format!("({greater} OR {} IS NULL)", key[i])
        } else {
            greater
        });
        alternatives.push(format!("({})", terms.join(" AND ")));
    }
    if alternatives.is_empty() {
        "false".to_owned()
    } else {
        format!("({})", alternatives.join(" OR "))
    }
}

/// A key value as text PostgreSQL's input functions read back as the same value: the
/// text form of the value the log gave, `\x` hex for bytes, and floats in a form that
/// round-trips (Rust's shortest exact decimal; the names PostgreSQL uses for infinities).
fn text_of(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::Int(i) => Some(i.to_string()),
        Value::Float(f) if f.is_nan() => Some("NaN".into()),
        Value::Float(f) if f.is_infinite() => Some(if *f > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        }),
        Value::Float(f) => Some(f.to_string()),
        Value::Text(s) => Some(s.clone()),
        Value::Bytes(b) => {
            let mut s = String::with_capacity(2 + 2 * b.len());
            s.push_str("\\x");
            for byte in b {
                s.push_str(&format!("{byte:02x}"));
            }
            Some(s)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_without_nulls_pages_by_row_comparison() {
        let mut binds = Vec::new();
        let sql = after_filter(
            &["t.\"a\"".into(), "t.\"b\"".into()],
            &["integer", "text"],
            &[false, false],
            &[Value::Int(3), Value::from("x")],
            &mut binds,
        );
        assert_eq!(
            sql,
            "(t.\"a\", t.\"b\") > ($1::pg_catalog.text::integer, $2::pg_catalog.text::text)"
        );
        assert_eq!(binds, [Some("3".to_owned()), Some("x".to_owned())]);
    }

    #[test]
    fn a_nullable_key_pages_with_nulls_last() {
        let mut binds = Vec::new();
        let sql = after_filter(
            &["a".into(), "b".into()],
            &["integer", "integer"],
            &[true, true],
            &[Value::Null, Value::Int(2)],
            &mut binds,
        );
        assert_eq!(
            sql,
            "((a IS NULL AND (b > $1::pg_catalog.text::integer OR b IS NULL)))"
        );
        let mut binds = Vec::new();
        let sql = after_filter(
            &["a".into()],
            &["integer"],
            &[true],
            &[Value::Null],
            &mut binds,
        );
        assert_eq!(sql, "false");
        assert!(binds.is_empty());
    }

    #[test]
    fn key_values_are_bound_as_text_that_reads_back_the_same() {
        assert_eq!(
            text_of(&Value::Bytes(vec![0, 255, 16])),
            Some("\\x00ff10".into())
        );
        assert_eq!(text_of(&Value::Float(0.1)), Some("0.1".into()));
        assert_eq!(text_of(&Value::Float(1e300)).unwrap().len(), 301);
        assert_eq!(
            text_of(&Value::Float(f64::NEG_INFINITY)),
            Some("-Infinity".into())
        );
        assert_eq!(text_of(&Value::Null), None);
    }
}
