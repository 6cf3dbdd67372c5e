//! Reading the log by transaction snapshots: [`PgReader`] registers consumers, fetches
//! batches, acknowledges them and prunes what every consumer has passed.
//!
//! # Why snapshots
//!
//! Sequence values are handed out at INSERT but become visible at COMMIT, so
//! transactions commit out of id order and a reader that keeps `id > last_seen` skips
//! rows. Instead every log row carries its writer's transaction id (`txid`), and a
//! consumer's cursor holds a snapshot (`prev_snapshot`, from `pg_current_snapshot()`)
//! of what it has fully handled. The next batch is taken against a new snapshot `cur`:
//! the rows whose transaction is visible in `cur` but was not in `prev`, i.e. exactly
//! the transactions that committed between the two (the technique of Skytools' PgQ).
//! Snapshots only grow, so batches partition the committed transactions: none twice,
//! none skipped, and a rolled-back transaction's rows are never visible at all.
//!
//! A transaction visible in `cur` and not in `prev` either started after `prev`
//! (`txid >= xmax(prev)`, and `< xmax(cur)`) or was running at `prev` (in
//! `xip(prev)`). The batch query scans exactly those two sets with the `txid` index,
//! so a long-running transaction (which keeps `xmin` low) does not make batches scan
//! everything committed since it started, and does not hold back anybody else's
//! commits either: it is simply in `xip` until it ends.
//!
//! # A batch's life
//!
//! One statement per fetch does steps 1 and 2, so a change costs one round trip to read
//! and one to acknowledge (round trips are most of the latency from a commit to the
//! handler). After a fetch that returned a full piece of a batch, the next piece is read
//! by a read-only variant that only does step 2.
//!
//! 1. It reads the consumer's cursor. No batch in progress: it takes `cur` and the first
//!    and last change id of the batch (over all of the consumer's log tables). An empty
//!    batch just moves `prev` to `cur` (at most once a second, see [`ADVANCE_EVERY`]).
//!    Otherwise it stores `cur`, the last id and `done_upto = first id - 1`: the batch is
//!    started.
//! 2. It reads the rows of the batch in progress (or just started) by primary key:
//!    `id > done_upto AND id <= last_id`, filtered by the two snapshots, ordered by id, at
//!    most `max`. A large batch is read in pieces by later fetches with the same
//!    snapshots, each piece costing O(max), not O(batch).
//! 3. `ack(upto)` is one UPDATE: `done_upto = upto`, or, when `upto` reaches the last id,
//!    `prev = cur` and the batch is closed. A crash after a partial ack resumes the same
//!    batch after `upto`.
//!
//! The fetch statement commits without waiting for its WAL to reach disk
//! (`synchronous_commit = off` for that transaction only), which takes a flush off the
//! path from a commit to the handler. What it writes may be lost in a server crash, and
//! that is safe: a lost batch start leaves the cursor at `prev`, and the next fetch
//! starts a batch from `prev` again that holds everything the lost one held (delivered
//! again: at least once); a lost advance of an empty batch leaves `prev` where it was,
//! which spans no change of the consumer's. Nothing durable can build on a lost one:
//! the WAL is flushed in order, so the flush an ack waits for also makes durable the
//! batch start before it, and `prune`, which deletes by the cursors it reads, flushes its
//! own commit, written after theirs. Acks still wait for the flush: a handled change is
//! acknowledged durably.
//!
//! When asked to (the connection is registered as waiting for a wake-up and busy, see
//! [`crate::listener`]), the fetch statement also clears the registration if it returns
//! changes.
//!
//! Within a batch, rows come in id order. Two changes to one row are in commit order:
//! the second writer waits for the first one's row lock, so it draws its id after the
//! first committed.
//!
//! # Liveness
//!
//! Every cursor write, and [`PgReader::touch`], sets the consumer's `last_seen`.
//! [`PgReader::evict_stale`] marks consumers unseen for longer than a TTL as evicted:
//! they no longer hold back pruning, and since changes they had not handled may be gone,
//! fetching or acknowledging for them is refused until they register again, which
//! restarts them like a new consumer and says so ([`Registered::Evicted`]).
//!
//! Not here: deciding which changes a handler wants, retries, dead letters (the host).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use epidemic_plugin_sdk::backend::{Batch, Consumer, Registered, StartFrom};
use epidemic_plugin_sdk::{Change, Op, Value};
use postgres::types::Type;
use postgres::{Client, Row, Statement};

use crate::error::{not_installed, PgError};
use crate::ident::{Ident, TableName};
use crate::install::{
    check_cluster, cursor_lock_key, load_registry, schema_state, ClusterCheck, RegisteredTable,
    SchemaState,
};

/// An empty batch moves the consumer's `prev_snapshot` forward (so pruning can proceed
/// and `last_seen` stays fresh), but at most this often: a consumer woken by changes to
/// tables it does not watch would otherwise write its cursor once per foreign commit.
/// Not advancing is always safe: the next batch simply starts from the older snapshot.
const ADVANCE_EVERY: Duration = Duration::from_secs(1);

/// Rows deleted per statement by [`PgReader::prune`], so no statement holds many locks
/// or runs long.
const PRUNE_CHUNK: i64 = 10_000;

/// How one captured column is read back.
#[derive(Debug, Clone, Copy)]
enum ValueKind {
    Int2,
    Int4,
    Int8,
    Float4,
    Float8,
    Bytes,
    Text,
    /// Any other type: cast to text in SQL. `numeric` is among them, so that no
    /// precision is lost to a float.
    CastToText,
}

impl ValueKind {
    fn of(type_oid: u32) -> ValueKind {
        match Type::from_oid(type_oid) {
            Some(Type::INT2) => ValueKind::Int2,
            Some(Type::INT4) => ValueKind::Int4,
            Some(Type::INT8) => ValueKind::Int8,
            Some(Type::FLOAT4) => ValueKind::Float4,
            Some(Type::FLOAT8) => ValueKind::Float8,
            Some(Type::BYTEA) => ValueKind::Bytes,
            Some(Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME) => ValueKind::Text,
            _ => ValueKind::CastToText,
        }
    }

    /// The SQL type of what [`ValueKind::select`] yields for a column of `type_oid`: the
    /// type of the NULL that stands for the column in rows of another log table.
    fn sql_type(self, type_oid: u32) -> &'static str {
        match self {
            ValueKind::Int2 => "pg_catalog.int2",
            ValueKind::Int4 => "pg_catalog.int4",
            ValueKind::Int8 => "pg_catalog.int8",
            ValueKind::Float4 => "pg_catalog.float4",
            ValueKind::Float8 => "pg_catalog.float8",
            ValueKind::Bytes => "pg_catalog.bytea",
            ValueKind::Text => match Type::from_oid(type_oid) {
                Some(Type::VARCHAR) => "pg_catalog.varchar",
                Some(Type::BPCHAR) => "pg_catalog.bpchar",
                Some(Type::NAME) => "pg_catalog.name",
                _ => "pg_catalog.text",
            },
            ValueKind::CastToText => "pg_catalog.text",
        }
    }

    fn select(self, column: &Ident) -> String {
        match self {
            ValueKind::CastToText => format!("l.{}::text", column.quoted()),
            _ => format!("l.{}", column.quoted()),
        }
    }

    fn read(self, row: &Row, i: usize) -> Result<Value, postgres::Error> {
        Ok(match self {
            ValueKind::Int2 => row.try_get::<_, Option<i16>>(i)?.map(i64::from).into(),
            ValueKind::Int4 => row.try_get::<_, Option<i32>>(i)?.map(i64::from).into(),
            ValueKind::Int8 => row.try_get::<_, Option<i64>>(i)?.into(),
            ValueKind::Float4 => row.try_get::<_, Option<f32>>(i)?.map(f64::from).into(),
            ValueKind::Float8 => row.try_get::<_, Option<f64>>(i)?.into(),
            ValueKind::Bytes => row.try_get::<_, Option<Vec<u8>>>(i)?.into(),
            ValueKind::Text | ValueKind::CastToText => row.try_get::<_, Option<String>>(i)?.into(),
        })
    }
}

/// How to decode the rows of one log table in the fetch statement's result.
struct PgLogTable {
    /// The table's name as the consumer spelled it: what [`Change::table`] carries, so it
    /// matches the handler's subscription.
    table: String,
    columns: Arc<[String]>,
    kinds: Vec<ValueKind>,
    /// Result column of this table's first old value; the new value follows it, then
    /// the next column's pair.
    first: usize,
}

/// The fetch statement's result columns. It returns one header row (the change columns
/// NULL), and one row per change (the header columns NULL): the header's columns cost
/// nothing on the many rows of a large batch.
mod col {
    /// The consumer has a cursor.
    pub const REGISTERED: usize = 0;
    pub const EVICTED: usize = 1;
    /// The cursor's tables are the ones the statement was built for.
    pub const SAME_TABLES: usize = 2;
    /// A batch was in progress when the statement started.
    pub const IN_PROGRESS: usize = 3;
    /// The batch read from: the one in progress or the one just started.
    pub const BATCH_ID: usize = 4;
    /// No batch was in progress and the new snapshot holds changes.
    pub const FOUND_NEW: usize = 5;
    pub const STARTED: usize = 6;
    pub const ADVANCED: usize = 7;
    // 8: what turning off synchronous commit returned, unused.
    pub const ID: usize = 9;
    pub const OP: usize = 10;
    pub const CHANGED_AT_US: usize = 11;
    /// Which of the plan's log tables the row comes from.
    pub const LOG: usize = 12;
    /// The first of the log tables' value columns.
    pub const VALUES: usize = 13;
}

impl PgLogTable {
    fn change(&self, row: &Row, id: i64) -> Result<Change, postgres::Error> {
        let op: i8 = row.try_get(col::OP)?;
        let changed_at_us: i64 = row.try_get(col::CHANGED_AT_US)?;
        let values = |first: usize| -> Result<Vec<Value>, postgres::Error> {
            self.kinds
                .iter()
                .enumerate()
                .map(|(i, k)| k.read(row, first + 2 * i))
                .collect()
        };
        let (op, old, new) = match op as u8 {
            b'I' => (Op::Insert, None, Some(values(self.first + 1)?)),
            b'U' => (
                Op::Update,
                Some(values(self.first)?),
                Some(values(self.first + 1)?),
            ),
            // The triggers write only I, U and D.
            _ => (Op::Delete, Some(values(self.first)?), None),
        };
        Ok(Change {
            id,
            table: self.table.clone(),
            op,
            columns: self.columns.clone(),
            old,
            new,
            changed_at_us,
            ..Change::default()
        })
    }
}

/// The prepared statements for one consumer on the current connection.
struct ConsumerPlan {
    /// The consumer's tables as stored with its cursor; the plan is rebuilt when they change.
    tables: Vec<String>,
    /// The fetch statement: `$1 daemon, $2 handler, $3 tables, $4 max, $5 may advance an
    /// empty batch, $6 clear the connection's waiting registration if it returns changes`;
    /// columns as in [`col`].
    next: Statement,
    /// The same for a batch in progress, read-only: `$1 daemon, $2 handler, $3 tables,
    /// $4 max`.
    more: Statement,
    /// The last fetch returned a full piece of a batch: the batch likely has more.
    continuing: bool,
    logs: Vec<PgLogTable>,
    last_advance: Option<Instant>,
}

/// The consumer's cursor row, as far as this module needs it outside the fetch statement.
struct Cursor {
    tables: Vec<String>,
    batch_id: i64,
    in_progress: bool,
    evicted: bool,
}

/// Statements shared by every consumer, prepared once per connection.
struct Shared {
    load: Statement,
    finish: Statement,
    ack: Statement,
}

/// Registers consumers, reads batches, acknowledges, prunes. Holds prepared statements:
/// call [`PgReader::reset`] whenever the connection is replaced.
pub(crate) struct PgReader {
    schema: Ident,
    shared: Option<Shared>,
    plans: HashMap<(String, String), ConsumerPlan>,
    /// This connection found the cursors written by this cluster (see
    /// [`PgReader::same_cluster`]).
    cluster_checked: bool,
}

fn key(c: &Consumer) -> (String, String) {
    (c.daemon.clone(), c.handler.clone())
}

impl PgReader {
    pub fn new(schema: Ident) -> PgReader {
        PgReader {
            schema,
            shared: None,
            plans: HashMap::new(),
            cluster_checked: false,
        }
    }

    /// Forget every prepared statement (they belong to the old connection).
    pub fn reset(&mut self) {
        self.shared = None;
        self.plans.clear();
        self.cluster_checked = false;
    }

    /// Refuse to read by cursors that another cluster wrote (a dump restored here: its
    /// snapshots are of the other cluster's transaction ids, see
    /// `PgInstaller::rebase_ddl`). Checked once per connection: a restore into another
    /// cluster comes with a new connection.
    fn same_cluster(&mut self, client: &mut Client) -> Result<(), PgError> {
        if self.cluster_checked {
            return Ok(());
        }
        match check_cluster(client, &self.schema)? {
            ClusterCheck::Foreign { recorded, current } => Err(PgError::ForeignCluster {
                schema: self.schema.to_string(),
                recorded,
                current,
            }),
            ClusterCheck::Same | ClusterCheck::Unrecorded => {
                self.cluster_checked = true;
                Ok(())
            }
        }
    }

    fn q(&self, name: &str) -> String {
        format!(
            "{}.{}",
            self.schema.quoted(),
            crate::ident::quote_ident(name)
        )
    }

    fn shared(&mut self, client: &mut Client) -> Result<&Shared, PgError> {
        if self.shared.is_none() {
            let consumer = self.q("consumer");
            let schema = self.schema.clone();
            let mut prepare = |sql: String| {
                client
                    .prepare(&sql)
                    .map_err(not_installed(&schema, "prepare cursor statements"))
            };
            let shared = Shared {
                load: prepare(format!(
                    "SELECT tables, batch_id, batch_snapshot IS NOT NULL, evicted_at IS NOT NULL \
                     FROM {consumer} WHERE daemon = $1 AND handler = $2"
                ))?,
                // Every cursor write checks `evicted_at IS NULL`: an eviction between
                // reading the cursor and writing it must not be overwritten.
                finish: prepare(format!(
                    "UPDATE {consumer} SET prev_snapshot = batch_snapshot, batch_snapshot = NULL, \
                         batch_done_upto = NULL, batch_last_id = NULL, last_seen = now() \
                     WHERE daemon = $1 AND handler = $2 AND batch_id = $3 AND batch_snapshot IS NOT NULL \
                       AND evicted_at IS NULL"
                ))?,
                // Everything on the right-hand side sees the row as it was, so the batch
                // closes (prev := cur) exactly when upto reaches its last id.
                ack: prepare(format!(
                    "UPDATE {consumer} SET \
                         prev_snapshot = CASE WHEN $4 >= batch_last_id THEN batch_snapshot ELSE prev_snapshot END, \
                         batch_snapshot = CASE WHEN $4 >= batch_last_id THEN NULL ELSE batch_snapshot END, \
                         batch_done_upto = CASE WHEN $4 >= batch_last_id THEN NULL \
                                                ELSE GREATEST(batch_done_upto, $4) END, \
                         batch_last_id = CASE WHEN $4 >= batch_last_id THEN NULL ELSE batch_last_id END, \
                         last_seen = now() \
                     WHERE daemon = $1 AND handler = $2 AND batch_id = $3 AND batch_snapshot IS NOT NULL \
                       AND evicted_at IS NULL"
                ))?,
            };
            self.shared = Some(shared);
        }
        // Just filled in above when it was missing.
        self.shared
            .as_ref()
            .ok_or_else(|| PgError::NothingInstalled(self.schema.to_string()))
    }

    /// Resolve `tables` (as a consumer spells them) to registered log tables.
    fn resolve<'r>(
        &self,
        registry: &'r std::collections::BTreeMap<TableName, RegisteredTable>,
        tables: &[String],
    ) -> Result<Vec<(String, &'r RegisteredTable)>, PgError> {
        if tables.is_empty() {
            return Err(PgError::NoTables);
        }
        let mut out: Vec<(String, &RegisteredTable)> = Vec::new();
        let mut seen = Vec::new();
        for t in tables {
            let name = TableName::parse(t)?;
            let reg = registry
                .get(&name)
                .ok_or_else(|| PgError::NotInstalled(t.clone()))?;
            // `users` and `public.users` are one table: read its log once.
            if !seen.contains(&name) {
                seen.push(name);
                out.push((t.clone(), reg));
            }
        }
        Ok(out)
    }

    /// Create the consumer's cursor, or bring an existing one up to date: its table list
    /// becomes exactly `tables` (a table it no longer reads stops holding back pruning),
    /// and an evicted consumer starts over as a new one would, at `start`.
    ///
    /// A batch in progress is kept when tables are only removed (their remaining rows in
    /// it are simply not read). When a table is added the batch is dropped and the next
    /// one starts from the last fully handled snapshot: the batch's bounds were taken over
    /// the old tables and would skip the new table's rows, so the part of it already
    /// handled is delivered again instead (at least once, never lost).
    pub fn register(
        &mut self,
        client: &mut Client,
        consumer: &Consumer,
        tables: &[String],
        start: StartFrom,
    ) -> Result<Registered, PgError> {
        if schema_state(client, &self.schema)? != SchemaState::Ours {
            return Err(PgError::NothingInstalled(self.schema.to_string()));
        }
        self.same_cluster(client)?;
        let registry = load_registry(client, &self.schema)?;
        self.resolve(&registry, tables)?;
        self.plans.remove(&key(consumer));
        let consumer_table = self.q("consumer");
        let context = || format!("register consumer {consumer}");
        let from_now = start == StartFrom::Now;
        let (d, h) = (&consumer.daemon, &consumer.handler);
        let mut tx = client.transaction().map_err(PgError::sql(context()))?;
        // Before the snapshot below is taken, until commit: a prune meanwhile would not
        // see this consumer, and could delete rows committed after its snapshot that
        // the other consumers have passed.
        tx.execute(
            &format!(
                "SELECT pg_catalog.pg_advisory_xact_lock_shared({})",
                cursor_lock_key(&self.schema)
            ),
            &[],
        )
        .map_err(PgError::sql(context()))?;
        // 1:1: sees no transaction at all, so the first batch is the whole log.
        let start_snapshot = "CASE WHEN $3 THEN pg_current_snapshot() ELSE '1:1:'::pg_snapshot END";
        let inserted = tx
            .query_opt(
                &format!(
                    "INSERT INTO {consumer_table} (daemon, handler, tables, prev_snapshot) \
                     VALUES ($1, $2, $4, {start_snapshot}) \
                     ON CONFLICT (daemon, handler) DO NOTHING RETURNING batch_id"
                ),
                &[d, h, &from_now, &tables],
            )
            .map_err(PgError::sql(context()))?;
        let registered = if inserted.is_some() {
            Registered::New
        } else {
            let row = tx
                .query_one(
                    &format!(
                        "SELECT evicted_at IS NOT NULL, batch_snapshot IS NOT NULL AND NOT tables @> $3 \
                         FROM {consumer_table} WHERE daemon = $1 AND handler = $2 FOR UPDATE"
                    ),
                    &[d, h, &tables],
                )
                .map_err(PgError::sql(context()))?;
            let (evicted, grown_mid_batch): (bool, bool) = (row.get(0), row.get(1));
            let restart_batch = "batch_id = batch_id + 1, batch_snapshot = NULL, \
                                 batch_done_upto = NULL, batch_last_id = NULL";
            if evicted {
                tx.execute(
                    &format!(
                        "UPDATE {consumer_table} SET tables = $4, prev_snapshot = {start_snapshot}, {restart_batch}, \
                             evicted_at = NULL, registered_at = now(), last_seen = now() \
                         WHERE daemon = $1 AND handler = $2"
                    ),
                    &[d, h, &from_now, &tables],
                )
            } else {
                let restart = if grown_mid_batch {
                    format!(", {restart_batch}")
                } else {
                    String::new()
                };
                tx.execute(
                    &format!(
                        "UPDATE {consumer_table} SET tables = $3{restart}, last_seen = now() \
                         WHERE daemon = $1 AND handler = $2"
                    ),
                    &[d, h, &tables],
                )
            }
            .map_err(PgError::sql(context()))?;
            if evicted {
                Registered::Evicted
            } else {
                Registered::Existing
            }
        };
        tx.commit().map_err(PgError::sql(context()))?;
        Ok(registered)
    }

    fn load(&mut self, client: &mut Client, consumer: &Consumer) -> Result<Cursor, PgError> {
        let load = self.shared(client)?.load.clone();
        let row = client
            .query_opt(&load, &[&consumer.daemon, &consumer.handler])
            .map_err(PgError::sql(format!("read the cursor of {consumer}")))?
            .ok_or_else(|| PgError::NotRegistered(consumer.to_string()))?;
        Ok(Cursor {
            tables: row.get(0),
            batch_id: row.get(1),
            in_progress: row.get(2),
            evicted: row.get(3),
        })
    }

    /// Prepare the fetch statement for a consumer reading `tables`.
    fn build_plan(
        &self,
        client: &mut Client,
        consumer: &Consumer,
        tables: &[String],
    ) -> Result<ConsumerPlan, PgError> {
        let registry = load_registry(client, &self.schema)?;
        let resolved = self.resolve(&registry, tables)?;
        // The log columns' actual types decide how each value is read; the same query
        // says whether the schema has a `sleeper` table (older installations do not).
        let types: HashMap<(String, String), u32> = client
            .query(
                "SELECT c.relname::text, a.attname::text, a.atttypid FROM pg_catalog.pg_attribute a \
                 JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
                 JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND a.attnum > 0 AND NOT a.attisdropped",
                &[&self.schema.as_str()],
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
        for (table, reg) in resolved {
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
            logs.push(PgLogTable {
                table,
                columns: reg.columns.iter().map(|c| c.name.to_string()).collect(),
                first,
                kinds,
            });
            first += 2 * columns.len();
            parts.push(Part {
                log: self.q(reg.log_table.as_str()),
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
        let mut no_change: Vec<String> =
            ["NULL::int8", "NULL::\"char\"", "NULL::int8", "NULL::int4"]
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
                self.q("sleeper")
            )
        } else {
            "SELECT 1 WHERE $6::bool AND false".to_owned()
        };
        let consumer_table = self.q("consumer");

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
        let cursor_header =
            "EXISTS (SELECT 1 FROM c), (SELECT evicted FROM c), (SELECT same_tables FROM c), \
                             (SELECT batch_snapshot IS NOT NULL FROM c), (SELECT batch_id FROM w)";
        let change_rows = "UNION ALL \
                           SELECT NULL::bool, NULL::bool, NULL::bool, NULL::bool, NULL::int8, NULL::bool, \
                                  NULL::int8, NULL::int8, NULL::text, rows.* \
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
        // transaction only (see the module docs for why that is safe).
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
        Ok(ConsumerPlan {
            tables: tables.to_vec(),
            next,
            more,
            continuing: false,
            logs,
            last_advance: None,
        })
    }

    /// The next changes for the consumer, at most `max`. `clear_waiting`: if it returns
    /// changes, clear this connection's registration as waiting for a wake-up.
    pub fn fetch(
        &mut self,
        client: &mut Client,
        consumer: &Consumer,
        max: u32,
        clear_waiting: bool,
    ) -> Result<Batch, PgError> {
        let max = i64::from(max.max(1));
        let k = key(consumer);
        let consumer_table = self.q("consumer");
        let (d, h) = (&consumer.daemon, &consumer.handler);
        let race = |client: &mut Client| lost_race(client, &consumer_table, consumer);
        self.same_cluster(client)?;

        // At most: find the plan stale and rebuild it, find a batch that was expected to
        // go on finished, find the batch in progress exhausted and close it, start a new
        // one and read it.
        for _ in 0..4 {
            if !self.plans.contains_key(&k) {
                let cursor = self.load(client, consumer)?;
                if cursor.evicted {
                    return Err(PgError::Evicted(consumer.to_string()));
                }
                let plan = self.build_plan(client, consumer, &cursor.tables)?;
                self.plans.insert(k.clone(), plan);
            }
            let finish = self.shared(client)?.finish.clone();
            let Some(plan) = self.plans.get_mut(&k) else {
                return Err(PgError::NotRegistered(consumer.to_string()));
            };
            let may_advance = plan
                .last_advance
                .is_none_or(|t| t.elapsed() >= ADVANCE_EVERY);
            // The statement that clears the registration is `next`.
            let continuing = std::mem::take(&mut plan.continuing) && !clear_waiting;
            let rows = if continuing {
                client.query(&plan.more, &[d, h, &plan.tables, &max])
            } else {
                client.query(
                    &plan.next,
                    &[d, h, &plan.tables, &max, &may_advance, &clear_waiting],
                )
            }
            .map_err(PgError::sql(format!("read the log for {consumer}")))?;
            // The statement returns exactly one header row: the one without a change.
            let Some(head) = rows
                .iter()
                .find(|r| r.get::<_, Option<i64>>(col::ID).is_none())
            else {
                return Err(PgError::NotRegistered(consumer.to_string()));
            };
            let get_flag = |i: usize| head.get::<_, Option<bool>>(i).unwrap_or(false);
            if !get_flag(col::REGISTERED) {
                self.plans.remove(&k);
                return Err(PgError::NotRegistered(consumer.to_string()));
            }
            if get_flag(col::EVICTED) {
                self.plans.remove(&k);
                return Err(PgError::Evicted(consumer.to_string()));
            }
            if !get_flag(col::SAME_TABLES) {
                // Registered again with other tables: prepare for those.
                self.plans.remove(&k);
                continue;
            }
            let in_progress = get_flag(col::IN_PROGRESS);
            let found_new = get_flag(col::FOUND_NEW);
            let batch_id: Option<i64> = head.get(col::BATCH_ID);
            let started: i64 = head.get(col::STARTED);
            let advanced: i64 = head.get(col::ADVANCED);
            if continuing && rows.len() < 2 {
                // The batch had nothing more, or is no longer in progress: `next` sorts
                // that out.
                continue;
            }
            if found_new && started != 1 {
                return Err(race(client));
            }
            if !continuing && !in_progress && !found_new && may_advance {
                if advanced != 1 {
                    return Err(race(client));
                }
                plan.last_advance = Some(Instant::now());
            }
            let mut changes = Vec::with_capacity(rows.len());
            for row in &rows {
                let Some(id) = row.get::<_, Option<i64>>(col::ID) else {
                    continue;
                };
                let log: i32 = row.get(col::LOG);
                let Some(log) = usize::try_from(log).ok().and_then(|i| plan.logs.get(i)) else {
                    self.plans.remove(&k);
                    return Err(PgError::UnknownLog(consumer.to_string()));
                };
                changes.push(
                    log.change(row, id)
                        .map_err(PgError::sql(format!("decode the log of {}", log.table)))?,
                );
            }
            if let (false, Some(batch_id)) = (changes.is_empty(), batch_id) {
                changes.sort_unstable_by_key(|c| c.id);
                plan.continuing = changes.len() as i64 == max;
                return Ok(Batch {
                    changes,
                    token: batch_id.to_string(),
                });
            }
            match (in_progress, batch_id) {
                (true, Some(batch_id)) => {
                    // Nothing left after done_upto although the batch was not acked to
                    // its end (its last rows were deleted by hand): close it.
                    let n = client
                        .execute(&finish, &[d, h, &batch_id])
                        .map_err(PgError::sql(format!("close the batch of {consumer}")))?;
                    if n != 1 {
                        return Err(race(client));
                    }
                }
                _ => return Ok(Batch::default()),
            }
        }
        Ok(Batch::default())
    }

    pub fn ack(
        &mut self,
        client: &mut Client,
        consumer: &Consumer,
        token: &str,
        upto_id: i64,
    ) -> Result<(), PgError> {
        let batch_id: i64 = token.parse().map_err(|_| PgError::BadToken {
            consumer: consumer.to_string(),
            token: token.to_owned(),
        })?;
        let ack = self.shared(client)?.ack.clone();
        let n = client
            .execute(
                &ack,
                &[&consumer.daemon, &consumer.handler, &batch_id, &upto_id],
            )
            .map_err(PgError::sql(format!("acknowledge for {consumer}")))?;
        if n == 1 {
            return Ok(());
        }
        // Acking a batch that is already closed is fine: the host may repeat an ack whose
        // reply was lost with the connection.
        let cursor = self.load(client, consumer)?;
        if cursor.evicted {
            self.plans.remove(&key(consumer));
            return Err(PgError::Evicted(consumer.to_string()));
        }
        if cursor.batch_id == batch_id && !cursor.in_progress {
            return Ok(());
        }
        Err(PgError::StaleToken {
            consumer: consumer.to_string(),
            token: token.to_owned(),
        })
    }

    /// Delete, per log table, the rows every live consumer of that table has passed:
    /// those whose transaction is older than the oldest `xmin` of the consumers' `prev`
    /// snapshots (visible in all of them, so handled by all). Tables nobody reads are
    /// left alone, so a consumer registered later can still start from the oldest;
    /// tables whose consumers are all evicted are emptied, since nobody live needs them.
    pub fn prune(&mut self, client: &mut Client) -> Result<u64, PgError> {
        if schema_state(client, &self.schema)? != SchemaState::Ours {
            return Ok(0);
        }
        // The cursors are read under the cursor lock, so no registration is in flight
        // (see `cursor_lock_key`), and only if this cluster wrote them: never prune on
        // the strength of another cluster's snapshots.
        let mut tx = client
            .transaction()
            .map_err(PgError::sql("read consumer cursors"))?;
        tx.execute(
            &format!(
                "SELECT pg_catalog.pg_advisory_xact_lock({})",
                cursor_lock_key(&self.schema)
            ),
            &[],
        )
        .map_err(PgError::sql("lock consumer cursors"))?;
        if let ClusterCheck::Foreign { recorded, current } = check_cluster(&mut tx, &self.schema)? {
            return Err(PgError::ForeignCluster {
                schema: self.schema.to_string(),
                recorded,
                current,
            });
        }
        let rows = tx
            .query(
                &format!(
                    "SELECT tables, pg_snapshot_xmin(prev_snapshot)::text, evicted_at IS NOT NULL FROM {}",
                    self.q("consumer")
                ),
                &[],
            )
            .map_err(PgError::sql("read consumer cursors"))?;
        tx.commit().map_err(PgError::sql("read consumer cursors"))?;
        if rows.is_empty() {
            return Ok(0);
        }
        // Per table: the oldest xmin of its live consumers; None while all are evicted.
        let mut horizon: HashMap<TableName, Option<u64>> = HashMap::new();
        for r in &rows {
            let tables: Vec<String> = r.get(0);
            let xmin: String = r.get(1);
            let evicted: bool = r.get(2);
            let xmin = match xmin.parse::<u64>() {
                Ok(x) if !evicted => Some(x),
                _ => None,
            };
            for t in tables {
                // Names were validated at registration.
                if let Ok(name) = TableName::parse(&t) {
                    let h = horizon.entry(name).or_insert(None);
                    *h = match (*h, xmin) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                }
            }
        }
        let registry = load_registry(client, &self.schema)?;
        let mut total = 0u64;
        for (name, reg) in &registry {
            let Some(xmin) = horizon.get(name) else {
                continue;
            };
            let log = self.q(reg.log_table.as_str());
            // Without a live consumer the horizon is "everything committed": rows of
            // transactions still running are invisible to the DELETE and stay.
            let xmin = xmin.map_or_else(|| u64::MAX.to_string(), |x| x.to_string());
            let sql = format!(
                "DELETE FROM {log} WHERE id IN (SELECT id FROM {log} WHERE txid < $1::text::xid8 LIMIT $2)"
            );
            loop {
                let n = client
                    .execute(&sql, &[&xmin, &PRUNE_CHUNK])
                    .map_err(PgError::sql(format!("prune the log of {name}")))?;
                total += n;
                if n < PRUNE_CHUNK as u64 {
                    break;
                }
            }
        }
        Ok(total)
    }

    /// The consumer is alive: `last_seen` becomes now. An error for an evicted consumer
    /// (it must register again) or an unknown one: a heartbeat that updates no row is
    /// never a success.
    pub fn touch(&mut self, client: &mut Client, consumer: &Consumer) -> Result<(), PgError> {
        let n = client
            .execute(
                &format!(
                    "UPDATE {} SET last_seen = now() WHERE daemon = $1 AND handler = $2 AND evicted_at IS NULL",
                    self.q("consumer")
                ),
                &[&consumer.daemon, &consumer.handler],
            )
            .map_err(not_installed(
                &self.schema,
                format!("record that {consumer} is alive"),
            ))?;
        if n == 0 {
            self.plans.remove(&key(consumer));
            return Err(if self.load(client, consumer)?.evicted {
                PgError::Evicted(consumer.to_string())
            } else {
                PgError::NotRegistered(consumer.to_string())
            });
        }
        Ok(())
    }

    /// Evict every live consumer unseen for longer than `ttl`; returns them.
    pub fn evict_stale(
        &mut self,
        client: &mut Client,
        ttl: Duration,
    ) -> Result<Vec<Consumer>, PgError> {
        if schema_state(client, &self.schema)? != SchemaState::Ours {
            return Ok(Vec::new());
        }
        // Some 3000 years: a longer TTL would take `now() - ttl` out of the range of
        // timestamps, and can evict nobody anyway.
        let ttl_s = ttl.as_secs_f64().min(1e11);
        let rows = client
            .query(
                &format!(
                    "UPDATE {} SET evicted_at = now() \
                     WHERE evicted_at IS NULL AND last_seen < now() - make_interval(secs => $1) \
                     RETURNING daemon, handler",
                    self.q("consumer")
                ),
                &[&ttl_s],
            )
            .map_err(PgError::sql("evict stale consumers"))?;
        let mut evicted: Vec<Consumer> = rows
            .iter()
            .map(|r| Consumer {
                daemon: r.get(0),
                handler: r.get(1),
            })
            .collect();
        evicted.sort_by(|a, b| (&a.daemon, &a.handler).cmp(&(&b.daemon, &b.handler)));
        for c in &evicted {
            self.plans.remove(&key(c));
        }
        Ok(evicted)
    }

    /// Forget the consumer's cursor; returns whether there was one.
    pub fn unregister(
        &mut self,
        client: &mut Client,
        consumer: &Consumer,
    ) -> Result<bool, PgError> {
        self.plans.remove(&key(consumer));
        if schema_state(client, &self.schema)? != SchemaState::Ours {
            return Ok(false);
        }
        let n = client
            .execute(
                &format!(
                    "DELETE FROM {} WHERE daemon = $1 AND handler = $2",
                    self.q("consumer")
                ),
                &[&consumer.daemon, &consumer.handler],
            )
            .map_err(PgError::sql(format!("unregister consumer {consumer}")))?;
        Ok(n > 0)
    }
}

/// A cursor write found the row changed since it was read: the consumer was evicted
/// meanwhile, or another daemon with the same name moved it.
fn lost_race(client: &mut Client, consumer_table: &str, consumer: &Consumer) -> PgError {
    let evicted = client
        .query_opt(
            &format!(
                "SELECT evicted_at IS NOT NULL FROM {consumer_table} WHERE daemon = $1 AND handler = $2"
            ),
            &[&consumer.daemon, &consumer.handler],
        )
        .ok()
        .flatten()
        .is_some_and(|r| r.get::<_, bool>(0));
    if evicted {
        PgError::Evicted(consumer.to_string())
    } else {
        PgError::CursorRace(consumer.to_string())
    }
}
