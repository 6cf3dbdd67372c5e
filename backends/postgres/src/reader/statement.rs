//! The fetch statement of one consumer, built for the log tables it reads and prepared on
//! the connection: what [`crate::reader`] runs for every fetch. One statement reads the
//! cursor, starts a batch when none is in progress, reads a piece of the batch from every
//! log table, and returns it with a header row; see the reader's docs for the steps.

use std::collections::HashMap;

use epidemic_plugin_sdk::backend::Consumer;
use postgres::{Client, Statement};

use crate::error::PgError;
use crate::ident::{quote_ident, Ident};
use crate::reader::decode::{PgLogTable, ValueKind};
use crate::registry::{load_registry, logs_of};

/// The fetch statement's result columns. It returns one header row (the change columns
/// NULL), and one row per change (the header columns NULL): the header's columns cost
/// nothing on the many rows of a large batch.
pub(crate) mod col {
    /// The consumer has a cursor.
    pub const REGISTERED: usize = 0;
    pub const EVICTED: usize = 1;
    /// The cursor's tables are the ones the statement was built for.
    pub const SAME_TABLES: usize = 2;
    /// A batch was in progress when the statement started.
    pub const IN_PROGRESS: usize = 3;
    /// The batch read from: the one in progress or the one just started.
    pub const BATCH_ID: usize = 4;
    /// The batch's commit-order token (see [`super::COMMIT_SEQ_SQL`]).
    pub const COMMIT_SEQ: usize = 5;
    /// No batch was in progress and the new snapshot holds changes.
    pub const FOUND_NEW: usize = 6;
    pub const STARTED: usize = 7;
    pub const ADVANCED: usize = 8;
    // 9: what turning off synchronous commit returned, unused.
    pub const ID: usize = 10;
    pub const OP: usize = 11;
    pub const CHANGED_AT_US: usize = 12;
    /// The writing transaction's id.
    pub const TXID: usize = 13;
    /// Which of the plan's log tables the row comes from.
    pub const LOG: usize = 14;
    /// The first of the log tables' value columns.
    pub const VALUES: usize = 15;
}

/// The commit-order token of the batch `w` reads: how many transaction ids had ended when
/// the batch's snapshot was taken, `xmax - |xip|` (every id below `xmax` has ended but
/// those in `xip`). It never decreases from one snapshot to a later one, and grows by at
/// least one when a transaction becomes visible: every change of a consumer's batch
/// committed before every change of its next batch (the snapshots partition the commits),
/// so the token of a later batch is larger. Changes of one batch share it.
const COMMIT_SEQ_SQL: &str = "(SELECT pg_snapshot_xmax(w.cur)::text::int8 \
     - (SELECT count(*) FROM pg_snapshot_xip(w.cur)) FROM w)";

/// The prepared statements for one consumer on the current connection.
pub(crate) struct FetchStatements {
    /// The fetch statement: `$1 daemon, $2 handler, $3 tables, $4 max, $5 may advance an
    /// empty batch, $6 clear the connection's waiting registration if it returns changes`;
    /// columns as in [`col`].
    pub next: Statement,
    /// The same for a batch in progress, read-only: `$1 daemon, $2 handler, $3 tables,
    /// $4 max`.
    pub more: Statement,
    /// How to decode each log table's rows, by the result's [`col::LOG`].
    pub logs: Vec<PgLogTable>,
}

/// Prepare the fetch statements for `consumer` reading `tables` from `schema`.
pub(crate) fn prepare(
    client: &mut Client,
    schema: &Ident,
    consumer: &Consumer,
    tables: &[String],
) -> Result<FetchStatements, PgError> {
    let q = |name: &str| format!("{}.{}", schema.quoted(), quote_ident(name));
    let registry = load_registry(client, schema)?;
    let resolved = logs_of(&registry, tables)?;
    // The log columns' actual types decide how each value is read; the same query
    // says whether the schema has a `sleeper` table (older installations do not).
    let types: HashMap<(String, String), u32> = client
        .query(
            "SELECT c.relname::text, a.attname::text, a.atttypid FROM pg_catalog.pg_attribute a \
             JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND a.attnum > 0 AND NOT a.attisdropped",
            &[&schema.as_str()],
        )
        .map_err(PgError::sql("inspect log tables"))?
        .into_iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect();
    let has_sleeper = types.contains_key(&("sleeper".to_owned(), "since".to_owned()));

    // Per log table: its value columns with their types, so that every table's rows
    // can share one result (a row fills its own table's columns, NULL the others').
    struct Part {
        log: String,
        columns: Vec<(ValueKind, u32, Ident, Ident)>,
    }
    let mut parts = Vec::new();
    let mut logs = Vec::new();
    let mut first = col::VALUES;
    for (table, name, reg) in resolved {
        let identity = reg
            .log_identity
            .clone()
            .ok_or_else(|| PgError::Outdated(table.clone()))?;
        let mut columns = Vec::new();
        let mut kinds = Vec::new();
        for c in &reg.columns {
            let oid = types
                .get(&(reg.log_table.to_string(), c.new_column.to_string()))
                .copied()
                .unwrap_or(0);
            let kind = ValueKind::of(oid);
            columns.push((kind, oid, c.old_column.clone(), c.new_column.clone()));
            kinds.push(kind);
        }
        let names: Vec<String> = reg.columns.iter().map(|c| c.name.to_string()).collect();
        // Install captures every key column; a registry that says otherwise is not ours.
        let key_index = reg
            .key_columns
            .iter()
            .map(|k| {
                names
                    .iter()
                    .position(|n| n == k.as_str())
                    .ok_or_else(|| PgError::Outdated(table.clone()))
            })
            .collect::<Result<Vec<usize>, PgError>>()?;
        logs.push(PgLogTable {
            table,
            schema: name.schema.to_string(),
            identity,
            columns: names.into(),
            key_columns: reg.key_columns.iter().map(Ident::to_string).collect(),
            key_index,
            first,
            kinds,
        });
        first += 2 * columns.len();
        parts.push(Part {
            log: reg.log(schema),
            columns,
        });
    }

    let mut bound_parts = Vec::new();
    let mut row_parts = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        let log = &part.log;
        // Two index scans on txid: transactions that started after `prev`, and those
        // that were running at `prev` and have finished by `cur`. Neither set can be
        // visible in `prev`, so only visibility in `cur` needs checking here.
        bound_parts.push(format!(
            "SELECT l.id FROM {log} l \
             WHERE l.txid >= (SELECT lo FROM r) AND l.txid < (SELECT hi FROM r) \
               AND pg_visible_in_snapshot(l.txid, (SELECT cur FROM s)) \
             UNION ALL \
             SELECT l.id FROM {log} l \
             WHERE l.txid = ANY ((SELECT late FROM r)::xid8[]) \
               AND pg_visible_in_snapshot(l.txid, (SELECT cur FROM s))"
        ));
        let mut select = vec![
            "l.id".to_owned(),
            "l.op".to_owned(),
            "(extract(epoch FROM l.changed_at) * 1000000)::int8".to_owned(),
            "l.txid::text::int8".to_owned(),
            format!("{i}"),
        ];
        for (j, other) in parts.iter().enumerate() {
            for (kind, oid, old, new) in &other.columns {
                if i == j {
                    select.push(kind.select(old));
                    select.push(kind.select(new));
                } else {
                    let null = format!("NULL::{}", kind.sql_type(*oid));
                    select.push(null.clone());
                    select.push(null);
                }
            }
        }
        // The bounds and snapshots are scalar subqueries (init plans): evaluated
        // once per statement, and the id range drives the primary key index.
        row_parts.push(format!(
            "(SELECT {select} FROM {log} l \
              WHERE l.id > (SELECT done_upto FROM w) AND l.id <= (SELECT last_id FROM w) \
                AND pg_visible_in_snapshot(l.txid, (SELECT cur FROM w)) \
                AND NOT pg_visible_in_snapshot(l.txid, (SELECT prev FROM w)) \
              ORDER BY l.id LIMIT $4)",
            select = select.join(", ")
        ));
    }
    // The header row's change columns: NULL, typed as in the change rows.
    let mut no_change: Vec<String> = [
        "NULL::int8",
        "NULL::\"char\"",
        "NULL::int8",
        "NULL::int8",
        "NULL::int4",
    ]
    .map(str::to_owned)
    .to_vec();
    for part in &parts {
        for (kind, oid, _, _) in &part.columns {
            no_change.push(format!("NULL::{}", kind.sql_type(*oid)));
            no_change.push(format!("NULL::{}", kind.sql_type(*oid)));
        }
    }
    let rows_sql = if row_parts.len() == 1 {
        row_parts.remove(0)
    } else {
        format!("{} ORDER BY 1 LIMIT $4", row_parts.join(" UNION ALL "))
    };
    let woke_sql = if has_sleeper {
        format!(
            "UPDATE {} SET since = NULL \
             WHERE $6 AND pid = pg_backend_pid() AND since IS NOT NULL AND EXISTS (SELECT 1 FROM rows) \
             RETURNING 1",
            q("sleeper")
        )
    } else {
        "SELECT 1 WHERE $6::bool AND false".to_owned()
    };
    let consumer_table = q("consumer");

    // `c`: the cursor. `in_progress`: the batch it has in progress, if any.
    let cursor_cte = format!(
        "c AS MATERIALIZED (\
             SELECT tables = $3::text[] AS same_tables, evicted_at IS NOT NULL AS evicted, \
                    prev_snapshot, batch_id, batch_snapshot, batch_done_upto, batch_last_id \
             FROM {consumer_table} WHERE daemon = $1 AND handler = $2)"
    );
    let in_progress = "SELECT batch_id, prev_snapshot AS prev, batch_snapshot AS cur, \
                              batch_done_upto AS done_upto, batch_last_id AS last_id \
                       FROM c WHERE batch_snapshot IS NOT NULL AND same_tables AND NOT evicted";
    let cursor_header = format!(
        "EXISTS (SELECT 1 FROM c), (SELECT evicted FROM c), (SELECT same_tables FROM c), \
         (SELECT batch_snapshot IS NOT NULL FROM c), (SELECT batch_id FROM w), {COMMIT_SEQ_SQL}"
    );
    let change_rows = "UNION ALL \
                       SELECT NULL::bool, NULL::bool, NULL::bool, NULL::bool, NULL::int8, NULL::int8, \
                              NULL::bool, NULL::int8, NULL::int8, NULL::text, rows.* \
                       FROM rows";
    let no_change = no_change.join(", ");

    // `s`: when no batch is in progress, the previous snapshot and a new one;
    // pg_current_snapshot() is this statement's own snapshot, so the bounds cover
    // exactly what `cur` shows, and every row they find is visible here. `r`: where to
    // look: txids from xmax(prev) to xmax(cur), plus the transactions in xip(prev)
    // that `cur` sees as finished (`late`). `found` is materialised so that the
    // planner cannot turn min/max into a walk along the primary key that filters
    // every row of the log. `started` or `advanced` writes the cursor; both re-check
    // that nobody moved it since `c` read it (`batch_id`), and an eviction meanwhile
    // stops them. `w`: the batch to read, in progress or just started. Data-modifying
    // CTEs run whether or not anything reads them (`woke`). The `set_config` in `b`
    // (one row, so called once) turns off the synchronous commit of this statement's
    // transaction only (see the reader's docs for why that is safe).
    let next_sql = format!(
        "WITH {cursor_cte}, \
         s AS MATERIALIZED (\
             SELECT prev_snapshot AS prev, pg_current_snapshot() AS cur FROM c \
             WHERE batch_snapshot IS NULL AND same_tables AND NOT evicted), \
         r AS MATERIALIZED (SELECT pg_snapshot_xmax(prev) AS lo, pg_snapshot_xmax(cur) AS hi, \
             ARRAY(SELECT x FROM pg_snapshot_xip(prev) AS x WHERE pg_visible_in_snapshot(x, cur)) AS late \
             FROM s), \
         found AS MATERIALIZED ({bounds}), \
         b AS MATERIALIZED (\
             SELECT min(id) AS first_id, max(id) AS last_id, \
                    set_config('synchronous_commit', 'off', true) AS async_commit \
             FROM found), \
         started AS (\
             UPDATE {consumer_table} u SET batch_id = u.batch_id + 1, batch_snapshot = s.cur, \
                 batch_done_upto = b.first_id - 1, batch_last_id = b.last_id, last_seen = now() \
             FROM c, s, b \
             WHERE u.daemon = $1 AND u.handler = $2 AND b.first_id IS NOT NULL \
               AND u.batch_id = c.batch_id AND u.batch_snapshot IS NULL AND u.evicted_at IS NULL \
             RETURNING u.batch_id), \
         advanced AS (\
             UPDATE {consumer_table} u SET prev_snapshot = s.cur, last_seen = now() \
             FROM c, s, b \
             WHERE $5 AND u.daemon = $1 AND u.handler = $2 AND b.first_id IS NULL \
               AND u.batch_id = c.batch_id AND u.batch_snapshot IS NULL AND u.evicted_at IS NULL \
             RETURNING u.batch_id), \
         w AS MATERIALIZED (\
             {in_progress} \
             UNION ALL \
             SELECT started.batch_id, s.prev, s.cur, b.first_id - 1, b.last_id FROM started, s, b), \
         rows AS NOT MATERIALIZED ({rows_sql}), \
         woke AS ({woke_sql}) \
         SELECT {cursor_header}, b.first_id IS NOT NULL, (SELECT count(*) FROM started), \
                (SELECT count(*) FROM advanced), b.async_commit, {no_change} \
         FROM b \
         {change_rows}",
        bounds = bound_parts.join(" UNION ALL "),
    );
    let next = client.prepare(&next_sql).map_err(PgError::sql(format!(
        "prepare reading the log for {consumer}"
    )))?;
    // The next piece of a batch in progress, when the last fetch returned a full piece
    // of it: read-only, so it skips setting up the writes that have nothing to do.
    let more_sql = format!(
        "WITH {cursor_cte}, \
         w AS MATERIALIZED ({in_progress}), \
         rows AS ({rows_sql}) \
         SELECT {cursor_header}, false, 0::int8, 0::int8, NULL::text, {no_change} \
         {change_rows}"
    );
    let more = client.prepare(&more_sql).map_err(PgError::sql(format!(
        "prepare reading the log for {consumer}"
    )))?;
    Ok(FetchStatements { next, more, logs })
}
