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
//! # Keeping only the host's rows
//!
//! The request's `only` conditions (the part of the handler's row filter a SELECT can
//! say) are added as `AND t.col = $n::text::<type>` (one value) or `AND t.col = ANY
//! ($n::text[]::<type>[])`, the values bound as text like the key: an integer column (`smallint`, `integer`, `bigint`) against `int8`,
//! whose cross-type `=` is in the integer operator family, so an index on the column
//! still serves it and a value out of the column's range matches nothing instead of
//! failing the cast; a character column (`text`, `varchar`, `char(n)`, `name`) against
//! its own type without modifier, under the column's collation. A text value holding NUL,
//! which no PostgreSQL text can, is left out. A condition on a column of any other type,
//! or with values of another kind, is ignored (a hint: the host filters every row
//! anyway); a column the table does not have is refused. `char(n)` ignores trailing
//! spaces and a nondeterministic collation may call different strings equal: both only
//! read rows the host then drops. Paging stays by key over the rows kept: an index on
//! `(col, key)` reads only the rows a chunk returns.
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
//! # Prepared once per table
//!
//! What a table's chunks need (the registry's columns and key, the log's column types,
//! the statements) is read and prepared on the first chunk of the table and kept with
//! the connection, so a chunk costs two round trips: the read and the watermark. It is
//! prepared again for a table's first chunk (a new backfill), after any error, and when
//! this connection installs, reconnects or registers a consumer ([`PgSnapshots::reset`]).
//!
//! Snapshot rows' stable ids are `<log identity>-w<watermark>.<i>`: the watermark's id is
//! never handed out again in that log, so no two snapshot rows share one, and none is the
//! stable id of a change (`<identity>-<id>`).

use std::collections::HashMap;
use std::sync::Arc;

use epidemic_plugin_sdk::backend::{Chunk, ChunkRequest, ColumnIn, ColumnType};
use epidemic_plugin_sdk::{Change, Op, Origin, Value};
use postgres::types::ToSql;
use postgres::{Client, Statement};

use crate::capture::WATERMARK_OP;
use crate::catalog::inspect_table;
use crate::error::PgError;
use crate::ident::{quote_literal, Ident, TableName};
use crate::reader::decode::ValueKind;
use crate::registry::{load_registry, schema_state, SchemaState};

/// One condition of `only` as the statement writes it: `t.<column> = $n::text::<cast>`
/// for one value, `t.<column> = ANY ($n::text[]::<cast>[])` for any other number.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct OnlyTerm {
    /// The column, quoted, as `t."col"`.
    column_sql: String,
    cast: String,
    /// One value: an equality, which lets an index on `(col, key)` return the rows in key
    /// order (PostgreSQL before 17 does not take `= ANY` on an index's leading column as
    /// ordered, and would sort every kept row after the last key for each chunk).
    one: bool,
}

/// What an [`OnlyTerm`] binds.
#[derive(Debug)]
enum OnlyBind {
    One(String),
    Many(Vec<String>),
}

impl OnlyBind {
    fn param(&self) -> &(dyn ToSql + Sync) {
        match self {
            OnlyBind::One(v) => v,
            OnlyBind::Many(v) => v,
        }
    }
}

/// Backfill reads of one Epidemic schema on one connection: a [`ChunkPlan`] per table.
pub(crate) struct PgSnapshots {
    schema: Ident,
    /// By the table as the request spells it.
    plans: HashMap<String, ChunkPlan>,
}

/// A chunk `SELECT`'s shape: which of the `after` key's values are NULL (`None`: no
/// `after`), and the kept rows' conditions.
type ChunkShape = (Option<Vec<bool>>, Vec<OnlyTerm>);

/// One table's chunks, prepared on this connection.
struct ChunkPlan {
    name: TableName,
    /// The log's identity: the first half of every snapshot row's stable id.
    identity: String,
    /// The captured columns, key columns included, in the log's order.
    columns: Arc<[String]>,
    key_columns: Arc<[String]>,
    /// Where each key column is in `columns`.
    key_index: Vec<usize>,
    /// How each column is read back, as the fetch statement reads the log.
    kinds: Vec<ValueKind>,
    /// The `SELECT` without a filter, for the first chunk; `$1` the limit.
    first: Statement,
    /// Every other `SELECT`, by its shape: which of the `after` key's values are NULL
    /// (`None`: no `after`) and the kept rows' conditions (their columns and casts); with
    /// the positions of the key values it binds, in order (see [`after_filter`]); then
    /// the values of each condition (a text, or a text array), then the limit.
    statements: HashMap<ChunkShape, (Statement, Vec<usize>)>,
    /// The user table's columns that `only` may name: their kind and the type a value is
    /// cast to (see the module docs); `None` for a column of another type.
    filterable: HashMap<String, Option<String>>,
    /// The parts of the `SELECT` after a key, to prepare it for another NULL pattern.
    select_sql: String,
    key_sql: Vec<String>,
    key_types: Vec<String>,
    nullable_key: Vec<bool>,
    /// `INSERT` of the watermark, returning its id and time.
    watermark: Statement,
}

impl PgSnapshots {
    pub fn new(schema: Ident) -> PgSnapshots {
        PgSnapshots {
            schema,
            plans: HashMap::new(),
        }
    }

    /// Forget every prepared plan (the connection was replaced, or the installation
    /// changed).
    pub fn reset(&mut self) {
        self.plans.clear();
    }

    /// Read the next `limit` rows of the table after `after` by key, then write the
    /// watermark; see the module docs.
    pub fn chunk(&mut self, client: &mut Client, request: &ChunkRequest) -> Result<Chunk, PgError> {
        // A table's first chunk (a new backfill) always starts from a fresh plan.
        if request.after.is_none() {
            self.plans.remove(&request.table);
        }
        if !self.plans.contains_key(&request.table) {
            let plan = ChunkPlan::prepare(client, &self.schema, &request.table)?;
            self.plans.insert(request.table.clone(), plan);
        }
        let Some(plan) = self.plans.get_mut(&request.table) else {
            return Err(PgError::NotInstalled(request.table.clone()));
        };
        let chunk = plan.read(client, request);
        if chunk.is_err() {
            self.plans.remove(&request.table);
        }
        chunk
    }
}

impl ChunkPlan {
    /// Read what the table's chunks need and prepare their statements.
    fn prepare(client: &mut Client, schema: &Ident, table: &str) -> Result<ChunkPlan, PgError> {
        let name = TableName::parse(table)?;
        if schema_state(client, schema)? != SchemaState::Ours {
            return Err(PgError::NothingInstalled(schema.to_string()));
        }
        let registry = load_registry(client, schema)?;
        let reg = registry
            .get(&name)
            .ok_or_else(|| PgError::NotInstalled(table.to_owned()))?;
        let identity = reg
            .log_identity
            .clone()
            .ok_or_else(|| PgError::Outdated(table.to_owned()))?;
        if reg.key_columns.is_empty() {
            return Err(PgError::Outdated(table.to_owned()));
        }
        let columns: Vec<String> = reg.columns.iter().map(|c| c.name.to_string()).collect();
        let key_index = reg
            .key_columns
            .iter()
            .map(|k| columns.iter().position(|c| c == k.as_str()))
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| PgError::Outdated(table.to_owned()))?;
        let log = reg.log(schema);

        // The log column holding each captured column's new value: its kind and type.
        let rows = client
            .query(
                "SELECT a.attname::text, a.atttypid, pg_catalog.format_type(a.atttypid, a.atttypmod) \
                 FROM pg_catalog.pg_attribute a \
                 WHERE a.attrelid = $1::text::pg_catalog.regclass AND a.attnum > 0 AND NOT a.attisdropped",
                &[&log],
            )
            .map_err(PgError::sql(format!("inspect the log table {log}")))?;
        let mut kinds = Vec::with_capacity(reg.columns.len());
        let mut types = Vec::with_capacity(reg.columns.len());
        for c in &reg.columns {
            let r = rows
                .iter()
                .find(|r| r.get::<_, String>(0) == c.new_column.as_str())
                .ok_or_else(|| PgError::LogColumnGone {
                    log: log.clone(),
                    column: c.new_column.to_string(),
                })?;
            kinds.push(ValueKind::of(r.get(1)));
            types.push(r.get::<_, String>(2));
        }

        // The user's table: partitioned or not, and which key columns may be NULL.
        let key: Vec<&str> = reg.key_columns.iter().map(Ident::as_str).collect();
        let row = client
            .query_opt(
                "SELECT c.relkind = 'p', \
                        ARRAY(SELECT NOT a.attnotnull FROM unnest($3::text[]) WITH ORDINALITY AS k(name, i) \
                              JOIN pg_catalog.pg_attribute a \
                                ON a.attrelid = c.oid AND a.attname = k.name AND NOT a.attisdropped \
                              ORDER BY k.i) \
                 FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
                &[&name.schema.as_str(), &name.table.as_str(), &key],
            )
            .map_err(PgError::sql(format!("inspect table {name}")))?
            .ok_or_else(|| PgError::MissingTable(name.to_string()))?;
        let partitioned: bool = row.get(0);
        let nullable_key: Vec<bool> = row.get(1);
        if nullable_key.len() != key.len() {
            return Err(PgError::KeyColumnGone(name.to_string()));
        }
        // The columns a kept rows' condition may name, and what its values are cast to.
        let filterable = inspect_table(client, &name)?
            .columns
            .into_iter()
            .map(|(column, c)| {
                let cast = match c.kind() {
                    ColumnType::Int => Some("pg_catalog.int8".to_owned()),
                    ColumnType::Text => Some(c.type_sql.clone()),
                    _ => None,
                };
                (column, cast)
            })
            .collect();

        // Each column cast to its log column's type and read as the fetch statement reads
        // it; an ordinary table `ONLY` (see the module docs).
        let select: Vec<String> = reg
            .columns
            .iter()
            .zip(kinds.iter().zip(&types))
            .map(|(c, (kind, ty))| kind.wrap(&format!("t.{}::{ty}", c.name.quoted())))
            .collect();
        let select_sql = format!(
            "SELECT {} FROM {}{} t",
            select.join(", "),
            if partitioned { "" } else { "ONLY " },
            name.quoted()
        );
        let key_sql: Vec<String> = reg
            .key_columns
            .iter()
            .map(|k| format!("t.{}", k.quoted()))
            .collect();
        let key_types: Vec<String> = key_index.iter().map(|&i| types[i].clone()).collect();
        let context =
            format!("prepare reading table {name} for a backfill (see `epidemic status`)");
        let first = client
            .prepare(&format!(
                "{select_sql} ORDER BY {} LIMIT $1::pg_catalog.int8",
                key_sql.join(", ")
            ))
            .map_err(PgError::sql(context))?;
        let watermark = client
            .prepare(&format!(
                "INSERT INTO {log} (op) VALUES ({}) \
                 RETURNING id, (extract(epoch FROM changed_at) * 1000000)::int8",
                quote_literal(&char::from(WATERMARK_OP).to_string())
            ))
            .map_err(PgError::sql(format!(
                "prepare writing backfill watermarks into the log of {name}"
            )))?;
        Ok(ChunkPlan {
            name,
            identity,
            columns: columns.into(),
            key_columns: reg
                .key_columns
                .iter()
                .map(Ident::to_string)
                .collect::<Vec<_>>()
                .into(),
            key_index,
            kinds,
            first,
            statements: HashMap::new(),
            filterable,
            select_sql,
            key_sql,
            key_types,
            nullable_key,
            watermark,
        })
    }

    /// The read, then the watermark.
    fn read(&mut self, client: &mut Client, request: &ChunkRequest) -> Result<Chunk, PgError> {
        let name = &self.name;
        let limit = i64::from(request.limit.max(1));
        let context = || format!("read table {name} for a backfill (see `epidemic status`)");
        if let Some(after) = &request.after {
            if after.len() != self.key_columns.len() {
                return Err(PgError::KeyChanged {
                    table: name.to_string(),
                    key: self.key_columns.to_vec(),
                    paging: after.len(),
                });
            }
        }
        let (terms, arrays) = self.only_terms(&request.only)?;
        let rows = match (&request.after, terms.is_empty()) {
            (None, true) => client
                .query(&self.first, &[&limit])
                .map_err(PgError::sql(context()))?,
            (after, _) => {
                let nulls: Option<Vec<bool>> = after
                    .as_ref()
                    .map(|a| a.iter().map(Value::is_null).collect());
                let shape = (nulls, terms);
                if !self.statements.contains_key(&shape) {
                    let statement = self.prepare_read(client, &shape.0, &shape.1)?;
                    self.statements.insert(shape.clone(), statement);
                }
                let Some((statement, bound)) = self.statements.get(&shape) else {
                    return Err(PgError::NotInstalled(request.table.clone()));
                };
                let binds: Vec<Option<String>> = match after {
                    Some(after) => bound.iter().map(|&i| text_of(&after[i])).collect(),
                    None => Vec::new(),
                };
                let mut params: Vec<&(dyn ToSql + Sync)> =
                    binds.iter().map(|b| b as &(dyn ToSql + Sync)).collect();
                params.extend(arrays.iter().map(OnlyBind::param));
                params.push(&limit);
                client
                    .query(statement, &params)
                    .map_err(PgError::sql(context()))?
            }
        };
        let mut images = Vec::with_capacity(rows.len());
        for row in &rows {
            let image = self
                .kinds
                .iter()
                .enumerate()
                .map(|(i, kind)| kind.read(row, i))
                .collect::<Result<Vec<Value>, _>>()
                .map_err(PgError::sql(format!("decode table {name} for a backfill")))?;
            images.push(image);
        }
        drop(rows);
        // Only with the first chunk: the host keeps the estimate it has.
        let rows_estimate = match request.after {
            None => estimate(client, name)?,
            Some(_) => None,
        };

        // Then the watermark, committed before returning.
        let row = client
            .query_one(&self.watermark, &[])
            .map_err(PgError::sql(format!(
                "write a backfill watermark into the log of {name}"
            )))?;
        let watermark: i64 = row.get(0);
        let changed_at_us: i64 = row.get(1);

        let last = (images.len() as i64) < limit;
        let rows = images
            .into_iter()
            .enumerate()
            .map(|(i, new)| Change {
                id: 0,
                stable_id: format!("{}-w{watermark}.{i}", self.identity),
                schema: Some(name.schema.to_string()),
                table: request.table.clone(),
                op: Op::Insert,
                origin: Origin::Snapshot,
                key_columns: self.key_columns.clone(),
                key: self.key_index.iter().map(|&k| new[k].clone()).collect(),
                old_key: None,
                columns: self.columns.clone(),
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
            rows_estimate,
        })
    }
}

impl ChunkPlan {
    /// The kept rows' conditions of `only` this table can apply, with the text array
    /// each binds (see the module docs).
    fn only_terms(&self, only: &[ColumnIn]) -> Result<(Vec<OnlyTerm>, Vec<OnlyBind>), PgError> {
        let mut terms = Vec::new();
        let mut arrays = Vec::new();
        for c in only {
            // The catalog's spelling; as SQL reads a name unquoted, failing that.
            let found = self
                .filterable
                .get_key_value(c.column.as_str())
                .or_else(|| {
                    self.filterable
                        .get_key_value(&c.column.to_ascii_lowercase())
                });
            let Some((column, cast)) = found else {
                return Err(PgError::MissingColumn {
                    table: self.name.to_string(),
                    column: c.column.clone(),
                });
            };
            let Some(cast) = cast else { continue };
            let int = cast == "pg_catalog.int8";
            let values: Option<Vec<String>> = c
                .values
                .iter()
                .map(|v| match v {
                    Value::Int(i) if int => Some(Some(i.to_string())),
                    // No PostgreSQL text holds a NUL: no row has this value.
                    Value::Text(s) if !int && s.contains('\0') => Some(None),
                    Value::Text(s) if !int => Some(Some(s.clone())),
                    _ => None,
                })
                .collect::<Option<Vec<Option<String>>>>()
                .map(|v| v.into_iter().flatten().collect());
            let Some(values) = values else { continue };
            let mut values = values;
            let one = values.len() == 1;
            terms.push(OnlyTerm {
                column_sql: format!("t.{}", Ident::internal(column.clone()).quoted()),
                cast: cast.clone(),
                one,
            });
            arrays.push(match values.pop() {
                Some(v) if one => OnlyBind::One(v),
                last => OnlyBind::Many(values.into_iter().chain(last).collect()),
            });
        }
        Ok((terms, arrays))
    }

    /// Prepare the `SELECT` of a shape: after a key with NULLs where `nulls` says (none:
    /// from the start), keeping the rows `terms` say.
    fn prepare_read(
        &self,
        client: &mut Client,
        nulls: &Option<Vec<bool>>,
        terms: &[OnlyTerm],
    ) -> Result<(Statement, Vec<usize>), PgError> {
        let mut conditions = Vec::new();
        let mut bound = Vec::new();
        if let Some(nulls) = nulls {
            let types: Vec<&str> = self.key_types.iter().map(String::as_str).collect();
            let (filter, b) = after_filter(&self.key_sql, &types, &self.nullable_key, nulls);
            conditions.push(filter);
            bound = b;
        }
        for (i, t) in terms.iter().enumerate() {
            let n = bound.len() + i + 1;
            conditions.push(if t.one {
                format!("{} = ${n}::pg_catalog.text::{}", t.column_sql, t.cast)
            } else {
                format!(
                    "{} = ANY (${n}::pg_catalog.text[]::{}[])",
                    t.column_sql, t.cast
                )
            });
        }
        let statement = client
            .prepare(&format!(
                "{} WHERE {} ORDER BY {} LIMIT ${}::pg_catalog.int8",
                self.select_sql,
                conditions.join(" AND "),
                self.key_sql.join(", "),
                bound.len() + terms.len() + 1
            ))
            .map_err(PgError::sql(format!(
                "read table {} for a backfill (see `epidemic status`)",
                self.name
            )))?;
        Ok((statement, bound))
    }
}

/// The table's estimated size: `reltuples` (summed over its partitions for a partitioned
/// table), `None` while it was never analyzed (-1).
fn estimate(client: &mut Client, name: &TableName) -> Result<Option<u64>, PgError> {
    let estimate: Option<f64> = client
        .query_one(
            "SELECT CASE WHEN c.relkind = 'p' THEN \
                         (SELECT sum(p.reltuples)::float8 FROM pg_catalog.pg_partition_tree(c.oid) t \
                          JOIN pg_catalog.pg_class p ON p.oid = t.relid \
                          WHERE t.isleaf AND p.reltuples >= 0) \
                    WHEN c.reltuples >= 0 THEN c.reltuples::float8 END \
             FROM pg_catalog.pg_class c WHERE c.oid = $1::text::pg_catalog.regclass",
            &[&name.quoted()],
        )
        .map_err(PgError::sql(format!("estimate the size of table {name}")))?
        .get(0);
    Ok(estimate.map(|e| e.max(0.0).round() as u64))
}

/// The condition that keeps the rows whose key (`key`, SQL expressions of the key
/// columns, of types `types`) comes after a key whose NULL values are `nulls`, in
/// `ORDER BY key` order, and the positions of the key values it binds as text, in the
/// order of its parameters (`$1`, `$2`, ...). A row comparison when no key column can be
/// NULL (an index seek); otherwise column by column in PostgreSQL's ascending order,
/// where NULL comes last: `(k1 > a1 OR k1 IS NULL) OR (k1 = a1 AND ...)`, nothing being
/// after a NULL, and "equal" to a NULL being `IS NULL`.
fn after_filter(
    key: &[String],
    types: &[&str],
    nullable: &[bool],
    nulls: &[bool],
) -> (String, Vec<usize>) {
    let mut bound = Vec::new();
    let mut bind = |i: usize| {
        bound.push(i);
        format!("${}::pg_catalog.text::{}", bound.len(), types[i])
    };
    if !nullable.iter().any(|&n| n) && !nulls.iter().any(|&n| n) {
        let values: Vec<String> = (0..key.len()).map(&mut bind).collect();
        let sql = if key.len() == 1 {
            format!("{} > {}", key[0], values[0])
        } else {
            format!("({}) > ({})", key.join(", "), values.join(", "))
        };
        return (sql, bound);
    }
    let mut alternatives = Vec::new();
    for i in 0..key.len() {
        if nulls[i] {
            // Nothing comes after NULL in this column.
            continue;
        }
        let mut terms = Vec::with_capacity(i + 1);
        for (j, (k, &null)) in key.iter().zip(nulls).enumerate().take(i) {
            if null {
                terms.push(format!("{k} IS NULL"));
            } else {
                terms.push(format!("{k} = {}", bind(j)));
            }
        }
        let greater = format!("{} > {}", key[i], bind(i));
        terms.push(if nullable[i] {
            format!("({greater} OR {} IS NULL)", key[i])
        } else {
            greater
        });
        alternatives.push(format!("({})", terms.join(" AND ")));
    }
    let sql = if alternatives.is_empty() {
        "false".to_owned()
    } else {
        format!("({})", alternatives.join(" OR "))
    };
    (sql, bound)
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
        let (sql, bound) = after_filter(
            &["t.\"a\"".into(), "t.\"b\"".into()],
            &["integer", "text"],
            &[false, false],
            &[false, false],
        );
        assert_eq!(
            sql,
            "(t.\"a\", t.\"b\") > ($1::pg_catalog.text::integer, $2::pg_catalog.text::text)"
        );
        assert_eq!(bound, [0, 1]);
    }

    #[test]
    fn a_nullable_key_pages_with_nulls_last() {
        let (sql, bound) = after_filter(
            &["a".into(), "b".into()],
            &["integer", "text"],
            &[true, true],
            &[true, false],
        );
        assert_eq!(
            sql,
            "((a IS NULL AND (b > $1::pg_catalog.text::text OR b IS NULL)))"
        );
        assert_eq!(bound, [1]);
        let (sql, bound) = after_filter(
            &["a".into(), "b".into()],
            &["integer", "text"],
            &[false, true],
            &[false, false],
        );
        assert_eq!(
            sql,
            "((a > $1::pg_catalog.text::integer) OR (a = $2::pg_catalog.text::integer AND (b > $3::pg_catalog.text::text OR b IS NULL)))"
        );
        assert_eq!(bound, [0, 0, 1]);
        let (sql, bound) = after_filter(&["a".into()], &["integer"], &[true], &[true]);
        assert_eq!(sql, "false");
        assert!(bound.is_empty());
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
