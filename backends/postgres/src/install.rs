//! What `install` and `uninstall` run: [`PgInstaller`] reads the catalogs and Epidemic's
//! registry, validates every watched table and column, and produces the DDL.
//!
//! Everything Epidemic creates lives in one schema (default `epidemic`):
//!
//! - `change_id`: ONE sequence for every log table, so change ids order a batch across
//!   tables. It keeps the default `CACHE 1`: with a per-session cache a later change to a
//!   row could get a smaller id than an earlier one, breaking per-row order in a batch.
//! - `log_<table>` (or `log_<schema>.<table>` outside `public`): one log table per watched
//!   table with `id`, `op` (`I`/`U`/`D`), `txid` (the writer's `pg_current_xact_id()`,
//!   indexed: batches are found by transaction snapshot), `changed_at`, and typed
//!   `old_<column>`/`new_<column>` pairs.
//! - `capture_<table>()`: the PL/pgSQL trigger function, `SECURITY DEFINER` so that the
//!   people who write to the table need no rights on this schema, with a fixed
//!   `search_path` so that it cannot be hijacked by the writer's.
//! - `watched_table`, `watched_column`: the registry of what is captured and under which
//!   log names (for `uninstall`, for readers, for drift checks).
//! - `consumer`: one durable cursor per (daemon, handler); `evicted_at` is set when the
//!   consumer was unseen longer than the daemon's `consumer_ttl`.
//! - `dead_letter`: changes a handler gave up on.
//! - `daemon`: one row per daemon name: the lease of the live daemon using it.
//! - `sleeper`: UNLOGGED, one row per reading connection (`pid`), with `since` set while
//!   that reader waits for a wake-up (written again every few seconds) and NULL while it
//!   works. With `notify = "when-idle"` the capture functions send `NOTIFY` only while
//!   some row has a `since` of the last ten seconds (see [`crate::listener`]). Nothing in
//!   it matters after a crash, hence UNLOGGED: writing it costs no WAL, and readers never
//!   wait for a flush to register.
//!
//! On the user's table there are three row triggers, `<schema>_capture_insert`, `_update`
//! and `_delete`, each `AFTER ... FOR EACH ROW` with a `WHEN` clause that names every
//! watched column; `_trunc`, `BEFORE TRUNCATE ... FOR EACH STATEMENT`, which logs a delete
//! of every row the table still holds (so a `TRUNCATE`, also one that reaches the table
//! through `TRUNCATE ... CASCADE`, reaches handlers as the deletes it amounts to, at the
//! price of copying the rows into the log); and on a partitioned table `_mvrow`, `_mvbeg`
//! and `_mvend`, which deliver a row's move to another partition as one update (see
//! [`PgInstaller::move_prologue`]). Every capture trigger is `ENABLE ALWAYS`: it fires
//! under `session_replication_role = replica` too (logical replication's apply worker,
//! `pg_restore --disable-triggers` run as a replica), because those are changes to the
//! table all the same; a trigger found firing only as origin (`ENABLE TRIGGER ALL`
//! resets it) or disabled is reported by `status` and re-enabled by install. Each carries
//! the comment [`TRIGGER_LAYOUT`], so that install recreates triggers of an older layout.
//!
//! The update trigger's `WHEN` is the "did a watched column change" test, so an update of
//! other columns does not even call the function. It compares what a handler would see:
//! `OLD.c IS DISTINCT FROM NEW.c` for types whose equality is identity (integers, `bool`,
//! `bytea`, timestamps...), and the text forms byte by byte otherwise
//! (`(OLD.c::text COLLATE "C") IS DISTINCT FROM ...`), since `1.0 = 1.00` (`numeric`) and
//! `'alice' = 'Alice'` under a case-insensitive collation. The insert and delete triggers' `WHEN (true OR NEW.c IS NULL ...)` is
//! always true (the planner folds it away once per statement); it is there so that
//! PostgreSQL records that the trigger depends on each watched column. That is the point
//! of all three clauses: `ALTER TABLE ... DROP COLUMN` of a watched column is refused
//! ("other objects depend on it") instead of succeeding and leaving a capture function
//! that fails every later write to the table. `DROP COLUMN ... CASCADE` drops the three
//! row triggers with the column: writes keep working, nothing is captured, and `status` says
//! so. The price: PostgreSQL also refuses `ALTER COLUMN ... TYPE` of a column used in a
//! trigger's `WHEN`. To change a watched column's type without losing changes, recreate
//! the triggers in the same transaction:
//!
//! ```sql
//! BEGIN;
//! CREATE TEMP TABLE capture_triggers ON COMMIT DROP AS
//!     SELECT tgname, pg_get_triggerdef(oid) AS def, obj_description(oid, 'pg_trigger') AS note
//!     FROM pg_trigger
//!     WHERE tgrelid = 'mail_users'::regclass
//!       AND tgname ~ '^epidemic_capture_(insert|update|delete)$';
//! DROP TRIGGER epidemic_capture_insert ON mail_users;
//! DROP TRIGGER epidemic_capture_update ON mail_users;
//! DROP TRIGGER epidemic_capture_delete ON mail_users;
//! ALTER TABLE mail_users ALTER COLUMN username TYPE varchar(128);
//! DO $$ DECLARE t record; BEGIN
//!     FOR t IN SELECT * FROM capture_triggers LOOP
//!         EXECUTE t.def;
//!         EXECUTE format('ALTER TABLE mail_users ENABLE ALWAYS TRIGGER %I', t.tgname);
//!         EXECUTE format('COMMENT ON TRIGGER %I ON mail_users IS %L', t.tgname, t.note);
//!     END LOOP;
//! END $$;
//! COMMIT;
//! ```
//!
//! then run `epidemic install`, which brings the log columns' types up to date. Renaming
//! a watched column is not refused (a trigger refers to columns by number); the capture
//! function refers to them by name, so writes fail until the handlers' columns are
//! changed and `epidemic install` has run, and `status` names the column meanwhile.
//!
//! Install grows the captured column set (the union of what every daemon's handlers
//! asked for, so one daemon cannot take columns away from another). The one exception
//! is a column that no longer exists in the table and that this install does not ask
//! for: it is dropped from the capture, so that the table can be captured again. The
//! triggers are (re)created only when they are missing, not ours or out of date, because
//! `CREATE TRIGGER` takes a lock that blocks writers; the function is replaced in place,
//! which needs no such lock (and is how the `notify` option takes effect: the capture
//! functions notify always, only while a reader waits, or never).
//!
//! Not here: reading (see [`crate::reader`]); reporting drift (see [`crate::status`]).

use std::collections::{BTreeMap, HashMap, HashSet};

use epidemic_plugin_sdk::backend::Watch;
use postgres::GenericClient;

use crate::error::PgError;
use crate::ident::{quote_ident, quote_literal, Ident, TableName, MAX_IDENT_BYTES};
use crate::options::NotifyMode;

/// Longest `key` in `capture_<key>`, `log_<key>`, `txid_<key>`, `pkey_<key>`: the longest
/// prefix is `capture_` (8 bytes).
const MAX_KEY_BYTES: usize = MAX_IDENT_BYTES - "capture_".len();

/// Types whose equality is identity (two values are equal only if a handler would see
/// the same value) are compared with `IS DISTINCT FROM` directly; see
/// [`UserColumn::identity_eq`]. Their `=` operators live in `pg_catalog`, which is found
/// first whatever the installer's `search_path`.
const IDENTITY_EQ_SQL: &str = "a.atttypid = ANY (ARRAY['pg_catalog.bool', 'pg_catalog.int2', \
     'pg_catalog.int4', 'pg_catalog.int8', 'pg_catalog.oid', 'pg_catalog.bytea', 'pg_catalog.\"char\"', \
     'pg_catalog.date', 'pg_catalog.timestamp', 'pg_catalog.timestamptz', 'pg_catalog.uuid']::pg_catalog.regtype[])";

/// The comment on every capture trigger: the layout of the triggers it belongs to. A
/// capture trigger with another comment (an older layout: a `WHEN` that used the
/// type's equality, no `ENABLE ALWAYS`) is recreated by the next install.
pub(crate) const TRIGGER_LAYOUT: &str = "epidemic capture 2";

/// One column of a watched table, as the catalog describes it now.
#[derive(Debug, Clone)]
pub(crate) struct UserColumn {
    attnum: i16,
    /// The type for the log table's columns: `format_type` without the type modifier,
    /// so that widening the user's column (`varchar(64)` to `varchar(128)`) cannot make
    /// the trigger fail and with it the user's write.
    type_sql: String,
    /// Whether the type's equality is identity (integers, `bool`, `bytea`, timestamps,
    /// `uuid`...). For every other type the update trigger compares the text forms, byte
    /// for byte (`COLLATE "C"`), which is what a handler sees: `1.0` and `1.00`
    /// (`numeric`), or `alice` and `Alice` under a case-insensitive collation, are equal
    /// to `IS DISTINCT FROM` but not to a handler.
    identity_eq: bool,
}

/// A watched table as the catalog describes it now.
#[derive(Debug, Clone)]
pub(crate) struct UserTable {
    pub oid: u32,
    /// A partitioned table (`relkind = 'p'`): its rows are in its partitions.
    pub partitioned: bool,
    pub columns: HashMap<String, UserColumn>,
}

/// A watched column as the registry records it.
#[derive(Debug, Clone)]
pub(crate) struct RegisteredColumn {
    pub name: Ident,
    pub position: i32,
    pub column_type: String,
    pub old_column: Ident,
    pub new_column: Ident,
}

/// A watched table as the registry records it.
#[derive(Debug, Clone)]
pub(crate) struct RegisteredTable {
    pub log_table: Ident,
    pub capture_function: Ident,
    /// The base of the capture triggers' names; see [`Event::trigger_name`].
    pub trigger_name: Ident,
    /// In capture order.
    pub columns: Vec<RegisteredColumn>,
}

/// What Epidemic captures with one trigger each: the row events; `TRUNCATE` (a
/// statement-level trigger that logs a delete of every row the table still holds); and,
/// on a partitioned table, the three triggers that turn a row's move to another
/// partition back into the update it was (see [`PgInstaller::capture_function`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event {
    Insert,
    Update,
    Delete,
    Truncate,
    /// BEFORE INSERT OR UPDATE OR DELETE, for each row: recognises a move.
    MoveRow,
    /// BEFORE UPDATE, for each statement: where the statement's log rows start.
    MoveStart,
    /// AFTER UPDATE, for each statement: merges each move's delete and insert.
    MoveEnd,
}

impl Event {
    pub const ALL: [Event; 7] = [
        Event::Insert,
        Event::Update,
        Event::Delete,
        Event::Truncate,
        Event::MoveRow,
        Event::MoveStart,
        Event::MoveEnd,
    ];

    /// The triggers a table gets: the move triggers only on a partitioned one.
    pub fn for_table(partitioned: bool) -> &'static [Event] {
        if partitioned {
            &Event::ALL
        } else {
            &Event::ALL[..4]
        }
    }

    pub fn sql(self) -> &'static str {
        match self {
            Event::Insert => "INSERT",
            Event::Update | Event::MoveStart | Event::MoveEnd => "UPDATE",
            Event::Delete => "DELETE",
            Event::Truncate => "TRUNCATE",
            Event::MoveRow => "INSERT OR UPDATE OR DELETE",
        }
    }

    /// The trigger name's suffix: at most six bytes, like `update`, so that every name
    /// fits PostgreSQL's limit with the longest schema name we accept.
    fn suffix(self) -> &'static str {
        match self {
            Event::Insert => "insert",
            Event::Update => "update",
            Event::Delete => "delete",
            Event::Truncate => "trunc",
            Event::MoveRow => "mvrow",
            Event::MoveStart => "mvbeg",
            Event::MoveEnd => "mvend",
        }
    }

    /// `pg_trigger.tgtype` of our trigger: ROW (1), BEFORE (2), INSERT (4), DELETE (8),
    /// UPDATE (16), TRUNCATE (32); AFTER and statement-level have no bit.
    fn tgtype(self) -> i16 {
        match self {
            Event::Insert => 1 | 4,
            Event::Update => 1 | 16,
            Event::Delete => 1 | 8,
            Event::Truncate => 2 | 32,
            Event::MoveRow => 1 | 2 | 4 | 8 | 16,
            Event::MoveStart => 2 | 16,
            Event::MoveEnd => 16,
        }
    }

    /// Whether the trigger depends on the watched columns (a `WHEN` naming them).
    fn names_columns(self) -> bool {
        matches!(self, Event::Insert | Event::Update | Event::Delete)
    }

    /// `<base>_insert` etc., `base` being the registry's `trigger_name`.
    pub fn trigger_name(self, base: &Ident) -> Ident {
        Ident::internal(format!("{base}_{}", self.suffix()))
    }
}

/// A trigger on a watched table that has one of our names or fires our function.
#[derive(Debug, Clone)]
pub(crate) struct FoundTrigger {
    pub name: String,
    tgtype: i16,
    /// Fires our capture function.
    ours: bool,
    /// The columns it depends on (those in its `WHEN`), sorted.
    attnums: Vec<i16>,
    /// `pg_trigger.tgenabled`: `A` fires always, `O` not under
    /// `session_replication_role = replica`, `D` never.
    pub enabled: i8,
    /// Its comment: [`TRIGGER_LAYOUT`] when this version created it.
    layout: Option<String>,
    /// Its clones on the partitions of a partitioned table (none otherwise) all fire
    /// always: `ALTER TABLE partition ENABLE TRIGGER ALL` resets a clone alone.
    pub clones_always: bool,
}

impl FoundTrigger {
    /// Whether this is the working trigger for `event` (whatever columns it names).
    pub fn captures(&self, event: Event, base: &Ident) -> bool {
        self.ours && self.tgtype == event.tgtype() && self.name == event.trigger_name(base).as_str()
    }

    /// Whether this is the trigger install would create for `event` watching `attnums`:
    /// same columns, same layout, firing always.
    fn is_current(&self, event: Event, base: &Ident, attnums: &[i16]) -> bool {
        self.captures(event, base)
            && self.enabled == b'A' as i8
            && self.clones_always
            && self.layout.as_deref() == Some(TRIGGER_LAYOUT)
            && (!event.names_columns() || self.attnums == attnums)
    }
}

/// The triggers on `table_oid` that fire `schema.function()` or are named like one of
/// the capture triggers of `base`.
pub(crate) fn find_triggers(
    client: &mut impl GenericClient,
    table_oid: u32,
    schema: &Ident,
    function: &Ident,
    base: &Ident,
) -> Result<Vec<FoundTrigger>, PgError> {
    let names: Vec<String> = Event::ALL
        .iter()
        .map(|e| e.trigger_name(base).to_string())
        .collect();
    let rows = client
        .query(
            "SELECT t.tgname::text, t.tgtype, (n.nspname = $2 AND p.proname = $3), \
                    ARRAY(SELECT DISTINCT d.refobjsubid::int2 FROM pg_catalog.pg_depend d \
                          WHERE d.classid = 'pg_catalog.pg_trigger'::regclass AND d.objid = t.oid \
                            AND d.refclassid = 'pg_catalog.pg_class'::regclass \
                            AND d.refobjid = t.tgrelid AND d.refobjsubid > 0 \
                          ORDER BY 1), \
                    t.tgenabled, pg_catalog.obj_description(t.oid, 'pg_trigger'), \
                    NOT EXISTS (WITH RECURSIVE clone AS ( \
                                    SELECT k.oid, k.tgenabled FROM pg_catalog.pg_trigger k WHERE k.tgparentid = t.oid \
                                    UNION ALL \
                                    SELECT k.oid, k.tgenabled FROM pg_catalog.pg_trigger k \
                                    JOIN clone ON k.tgparentid = clone.oid) \
                                SELECT 1 FROM clone WHERE clone.tgenabled <> 'A') \
             FROM pg_catalog.pg_trigger t \
             JOIN pg_catalog.pg_proc p ON p.oid = t.tgfoid \
             JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace \
             WHERE t.tgrelid = $1 AND NOT t.tgisinternal \
               AND ((n.nspname = $2 AND p.proname = $3) OR t.tgname = ANY ($4)) \
             ORDER BY 1",
            &[&table_oid, &schema.as_str(), &function.as_str(), &names],
        )
        .map_err(PgError::sql("inspect triggers"))?;
    Ok(rows
        .iter()
        .map(|r| FoundTrigger {
            name: r.get(0),
            tgtype: r.get(1),
            ours: r.get(2),
            attnums: r.get(3),
            enabled: r.get(4),
            layout: r.get(5),
            clones_always: r.get(6),
        })
        .collect())
}

/// A leaf partition of a watched partitioned table, with the TRUNCATE trigger of ours it
/// carries, if any. Statement triggers are not cloned onto partitions, and a `TRUNCATE`
/// of one partition fires only that partition's, so each leaf gets its own.
#[derive(Debug, Clone)]
pub(crate) struct Leaf {
    /// `schema.table`, quoted.
    pub quoted: String,
    /// `schema.table`, for messages.
    pub name: String,
    /// `tgenabled` of its TRUNCATE trigger firing our function; `None` without one.
    pub enabled: Option<i8>,
    layout: Option<String>,
}

impl Leaf {
    /// Its TRUNCATE trigger is the one install would create.
    pub fn is_current(&self) -> bool {
        self.enabled == Some(b'A' as i8) && self.layout.as_deref() == Some(TRIGGER_LAYOUT)
    }
}

/// The leaf partitions of the partitioned table `root_oid` (at any depth), with their
/// TRUNCATE trigger named `trigger` firing `schema.function()`.
pub(crate) fn partition_leaves(
    client: &mut impl GenericClient,
    root_oid: u32,
    schema: &Ident,
    function: &Ident,
    trigger: &Ident,
) -> Result<Vec<Leaf>, PgError> {
    let rows = client
        .query(
            "SELECT pg_catalog.format('%I.%I', n.nspname, c.relname), n.nspname || '.' || c.relname, \
                    t.tgenabled, pg_catalog.obj_description(t.oid, 'pg_trigger') \
             FROM pg_catalog.pg_partition_tree($1::pg_catalog.oid::pg_catalog.regclass) pt \
             JOIN pg_catalog.pg_class c ON c.oid = pt.relid \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             LEFT JOIN (pg_catalog.pg_trigger t \
                        JOIN pg_catalog.pg_proc p ON p.oid = t.tgfoid \
                        JOIN pg_catalog.pg_namespace pn ON pn.oid = p.pronamespace) \
               ON t.tgrelid = c.oid AND t.tgname = $2 AND t.tgparentid = 0 \
                  AND pn.nspname = $3 AND p.proname = $4 \
             WHERE pt.isleaf AND pt.relid <> $1::pg_catalog.oid::pg_catalog.regclass \
             ORDER BY 2",
            &[
                &root_oid,
                &trigger.as_str(),
                &schema.as_str(),
                &function.as_str(),
            ],
        )
        .map_err(PgError::sql("inspect partitions"))?;
    Ok(rows
        .iter()
        .map(|r| Leaf {
            quoted: r.get(0),
            name: r.get(1),
            enabled: r.get(2),
            layout: r.get(3),
        })
        .collect())
}

/// Produces install and uninstall DDL for one Epidemic schema.
pub(crate) struct PgInstaller<'a> {
    pub schema: &'a Ident,
    pub notify: NotifyMode,
}

/// Whether the schema exists, and whether it is ours.
pub(crate) fn schema_state(
    client: &mut impl GenericClient,
    schema: &Ident,
) -> Result<SchemaState, PgError> {
    let row = client
        .query_opt(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_class c \
                 WHERE c.relnamespace = n.oid AND c.relname = 'watched_table' AND c.relkind = 'r') \
             FROM pg_catalog.pg_namespace n WHERE n.nspname = $1",
            &[&schema.as_str()],
        )
        .map_err(PgError::sql(format!("inspect schema {schema}")))?;
    Ok(match row {
        None => SchemaState::Missing,
        Some(r) if r.get::<_, bool>(0) => SchemaState::Ours,
        Some(_) => SchemaState::Foreign,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SchemaState {
    Missing,
    Ours,
    Foreign,
}

/// The advisory lock that orders consumer registrations against pruning (and against
/// the rebase after a restore into another cluster): a registration holds it shared from
/// before it takes its snapshot until it commits; `prune` holds it exclusively while it
/// reads the cursors. So `prune` never computes its horizon without a consumer that is
/// being registered, whose snapshot may miss rows the other consumers have passed.
pub(crate) fn cursor_lock_key(schema: &Ident) -> String {
    format!(
        "pg_catalog.hashtext({})",
        quote_literal(&format!("epidemic cursors {schema}"))
    )
}

/// Whether the cursors in the schema were written by this cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClusterCheck {
    /// The recorded system identifier is this cluster's.
    Same,
    /// Nothing recorded (an installation older than the record; install records it).
    Unrecorded,
    /// Recorded by another cluster: the schema came here by a dump and restore, and its
    /// cursors are snapshots of the other cluster's transaction ids.
    Foreign { recorded: i64, current: i64 },
}

/// Compare the system identifier recorded in the schema with this cluster's
/// (`pg_control_system()`, executable by everyone).
pub(crate) fn check_cluster(
    client: &mut impl GenericClient,
    schema: &Ident,
) -> Result<ClusterCheck, PgError> {
    let table = format!("{}.{}", schema.quoted(), quote_ident("cluster"));
    let exists: bool = client
        .query_one("SELECT pg_catalog.to_regclass($1) IS NOT NULL", &[&table])
        .map_err(PgError::sql("inspect the cluster record"))?
        .get(0);
    if !exists {
        return Ok(ClusterCheck::Unrecorded);
    }
    let row = client
        .query_one(
            &format!(
                "SELECT (SELECT system_identifier FROM {table} LIMIT 1), \
                        (SELECT system_identifier FROM pg_catalog.pg_control_system())"
            ),
            &[],
        )
        .map_err(PgError::sql("read the cluster record"))?;
    let recorded: Option<i64> = row.get(0);
    let current: i64 = row.get(1);
    Ok(match recorded {
        None => ClusterCheck::Unrecorded,
        Some(r) if r == current => ClusterCheck::Same,
        Some(recorded) => ClusterCheck::Foreign { recorded, current },
    })
}

/// Whether `schema.table` has a column `column`: for bookkeeping tables that gained a
/// column after a schema was first installed.
fn has_column(
    client: &mut impl GenericClient,
    schema: &Ident,
    table: &str,
    column: &str,
) -> Result<bool, PgError> {
    let row = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a \
                 JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
                 JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2 AND a.attname = $3 AND NOT a.attisdropped)",
            &[&schema.as_str(), &table, &column],
        )
        .map_err(PgError::sql(format!("inspect {schema}.{table}")))?;
    Ok(row.get(0))
}

/// The registry: every watched table and its columns. Call only when the schema is ours.
pub(crate) fn load_registry(
    client: &mut impl GenericClient,
    schema: &Ident,
) -> Result<BTreeMap<TableName, RegisteredTable>, PgError> {
    let s = schema.quoted();
    let rows = client
        .query(
            &format!(
                "SELECT t.table_schema, t.table_name, t.log_table, t.capture_function, t.trigger_name, \
                        c.column_name, c.position, c.column_type, c.old_column, c.new_column \
                 FROM {s}.watched_table t \
                 LEFT JOIN {s}.watched_column c \
                   ON c.table_schema = t.table_schema AND c.table_name = t.table_name \
                 ORDER BY t.table_schema, t.table_name, c.position, c.column_name"
            ),
            &[],
        )
        .map_err(PgError::sql("read the registry of watched tables"))?;
    let mut registry: BTreeMap<TableName, RegisteredTable> = BTreeMap::new();
    for r in rows {
        // Registry values were validated when they were written; keep them as they are.
        let name = TableName {
            schema: Ident::internal(r.get(0)),
            table: Ident::internal(r.get(1)),
        };
        let entry = registry.entry(name).or_insert_with(|| RegisteredTable {
            log_table: Ident::internal(r.get(2)),
            capture_function: Ident::internal(r.get(3)),
            trigger_name: Ident::internal(r.get(4)),
            columns: Vec::new(),
        });
        if let Some(column) = r.get::<_, Option<String>>(5) {
            entry.columns.push(RegisteredColumn {
                name: Ident::internal(column),
                position: r.get(6),
                column_type: r.get(7),
                old_column: Ident::internal(r.get(8)),
                new_column: Ident::internal(r.get(9)),
            });
        }
    }
    Ok(registry)
}

/// `requested` merged per table: columns in the order first asked for, without repeats.
fn merge_watches(watches: &[Watch]) -> Result<BTreeMap<TableName, Vec<Ident>>, PgError> {
    let mut merged: BTreeMap<TableName, Vec<Ident>> = BTreeMap::new();
    for w in watches {
        let table = TableName::parse(&w.table)?;
        let columns = merged.entry(table).or_default();
        for c in &w.columns {
            let c = Ident::parse("column", c)?;
            if !columns.contains(&c) {
                columns.push(c);
            }
        }
    }
    for (table, columns) in &merged {
        if columns.is_empty() {
            return Err(PgError::NoColumns(table.to_string()));
        }
    }
    Ok(merged)
}

/// The table as the catalog describes it now; [`PgError::MissingTable`] when it is gone.
pub(crate) fn inspect_table(
    client: &mut impl GenericClient,
    name: &TableName,
) -> Result<UserTable, PgError> {
    let row = client
        .query_opt(
            "SELECT c.oid, c.relkind::text FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2",
            &[&name.schema.as_str(), &name.table.as_str()],
        )
        .map_err(PgError::sql(format!("inspect table {name}")))?
        .ok_or_else(|| PgError::MissingTable(name.to_string()))?;
    let oid: u32 = row.get(0);
    let kind: String = row.get(1);
    let partitioned = kind == "p";
    // Ordinary and partitioned tables; row triggers on a partitioned table (PostgreSQL
    // 13+) are cloned onto every partition.
    if kind != "r" && kind != "p" {
        return Err(PgError::NotATable(name.to_string()));
    }
    let rows = client
        .query(
            &format!(
                "SELECT a.attname::text, a.attnum, \
                        CASE a.atttypid \
                            WHEN 'pg_catalog.bpchar'::regtype THEN 'pg_catalog.bpchar' \
                            WHEN 'pg_catalog.bit'::regtype THEN 'pg_catalog.varbit' \
                            ELSE pg_catalog.format_type(a.atttypid, NULL) END, \
                        {IDENTITY_EQ_SQL} \
                 FROM pg_catalog.pg_attribute a \
                 WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped"
            ),
            &[&oid],
        )
        .map_err(PgError::sql(format!("inspect columns of {name}")))?;
    // `character` and `bit` without a modifier mean length 1, so they are widened to
    // their unbounded forms above rather than copied from format_type.
    let columns = rows
        .into_iter()
        .map(|r| {
            (
                r.get::<_, String>(0),
                UserColumn {
                    attnum: r.get(1),
                    type_sql: r.get(2),
                    identity_eq: r.get(3),
                },
            )
        })
        .collect();
    Ok(UserTable {
        oid,
        partitioned,
        columns,
    })
}

/// `log_<key>` etc.: `table` in `public`, `schema.table` elsewhere (a dot cannot occur in
/// a validated name, so keys never collide), or `#<oid>` when that would be too long.
fn table_key(name: &TableName, oid: u32) -> String {
    let key = name.to_string();
    if key.len() <= MAX_KEY_BYTES {
        key
    } else {
        format!("#{oid}")
    }
}

/// `old_<column>`, or `old_#<attnum>` when too long (`#` cannot occur in a column name).
fn log_column(prefix: &str, column: &Ident, attnum: i16) -> Ident {
    let name = format!("{prefix}{column}");
    if name.len() <= MAX_IDENT_BYTES {
        Ident::internal(name)
    } else {
        Ident::internal(format!("{prefix}#{attnum}"))
    }
}

/// `a, b, c` from `pick` applied to each column.
fn list(columns: &[RegisteredColumn], pick: impl Fn(&RegisteredColumn) -> String) -> String {
    columns.iter().map(pick).collect::<Vec<_>>().join(", ")
}

impl PgInstaller<'_> {
    fn q(&self, name: &str) -> String {
        format!("{}.{}", self.schema.quoted(), quote_ident(name))
    }

    /// The statements that bring the installation up to date for `watches`. Validates
    /// everything first: an invalid watch yields an error and no statement at all.
    pub fn plan_install(
        &self,
        client: &mut impl GenericClient,
        watches: &[Watch],
    ) -> Result<Vec<String>, PgError> {
        let requested = merge_watches(watches)?;
        for name in requested.keys() {
            // A capture trigger on a log table would log its own log.
            if &name.schema == self.schema {
                return Err(PgError::OwnTable {
                    table: name.to_string(),
                    schema: self.schema.to_string(),
                });
            }
        }
        let state = schema_state(client, self.schema)?;
        if state == SchemaState::Foreign {
            return Err(PgError::ForeignSchema(self.schema.to_string()));
        }
        let registry = if state == SchemaState::Ours {
            load_registry(client, self.schema)?
        } else {
            BTreeMap::new()
        };

        // Validate every table and column before producing anything.
        let mut inspected = Vec::with_capacity(requested.len());
        for (name, columns) in &requested {
            let table = inspect_table(client, name)?;
            let registered = registry.get(name);
            for c in columns {
                if table.columns.contains_key(c.as_str()) {
                    continue;
                }
                let was_watched =
                    registered.is_some_and(|r| r.columns.iter().any(|rc| &rc.name == c));
                return Err(if was_watched {
                    PgError::WatchedColumnGone {
                        table: name.to_string(),
                        column: c.to_string(),
                    }
                } else {
                    PgError::MissingColumn {
                        table: name.to_string(),
                        column: c.to_string(),
                    }
                });
            }
            inspected.push((name, columns, table));
        }

        let mut plan = self.bookkeeping_ddl(client, state)?;
        if state == SchemaState::Ours {
            if let ClusterCheck::Foreign { .. } = check_cluster(client, self.schema)? {
                plan.extend(self.rebase_ddl(&registry));
            }
        }
        let mut taken_logs: HashSet<String> =
            registry.values().map(|r| r.log_table.to_string()).collect();
        for (name, columns, table) in inspected {
            let existing = registry.get(name);
            let (log_table, function, trigger_base) = match existing {
                Some(reg) => (
                    reg.log_table.clone(),
                    reg.capture_function.clone(),
                    reg.trigger_name.clone(),
                ),
                None => {
                    let mut key = table_key(name, table.oid);
                    if taken_logs.contains(&format!("log_{key}")) {
                        key = format!("#{}", table.oid);
                    }
                    taken_logs.insert(format!("log_{key}"));
                    (
                        Ident::internal(format!("log_{key}")),
                        Ident::internal(format!("capture_{key}")),
                        Ident::internal(format!("{}_capture", self.schema)),
                    )
                }
            };
            let key = &log_table.as_str()["log_".len()..];

            // The captured set: what is registered and still exists, then what is newly
            // asked for. A registered column that is gone and not asked for (checked
            // above) leaves the capture.
            let registered: Vec<RegisteredColumn> =
                existing.map(|r| r.columns.clone()).unwrap_or_default();
            let (mut all, gone): (Vec<RegisteredColumn>, Vec<RegisteredColumn>) = registered
                .into_iter()
                .partition(|c| table.columns.contains_key(c.name.as_str()));
            let mut added: Vec<RegisteredColumn> = Vec::new();
            let mut retyped: Vec<RegisteredColumn> = Vec::new();
            for reg in &mut all {
                let now = &table.columns[reg.name.as_str()];
                if now.type_sql != reg.column_type {
                    reg.column_type = now.type_sql.clone();
                    retyped.push(reg.clone());
                }
            }
            let mut next_position = existing
                .and_then(|r| r.columns.iter().map(|c| c.position).max())
                .map_or(0, |p| p + 1);
            for c in columns {
                if all.iter().any(|r| &r.name == c) {
                    continue;
                }
                let attnum = table.columns[c.as_str()].attnum;
                let column = RegisteredColumn {
                    name: c.clone(),
                    position: next_position,
                    column_type: table.columns[c.as_str()].type_sql.clone(),
                    old_column: log_column("old_", c, attnum),
                    new_column: log_column("new_", c, attnum),
                };
                next_position += 1;
                all.push(column.clone());
                added.push(column);
            }

            let log = self.q(log_table.as_str());
            let in_registry = |extra: String| {
                format!(
                    "table_schema = {} AND table_name = {}{extra}",
                    quote_literal(name.schema.as_str()),
                    quote_literal(name.table.as_str()),
                )
            };
            if existing.is_none() {
                let mut cols = String::new();
                for c in &all {
                    cols.push_str(&format!(
                        ",\n    {} {},\n    {} {}",
                        c.old_column.quoted(),
                        c.column_type,
                        c.new_column.quoted(),
                        c.column_type
                    ));
                }
                plan.push(format!(
                    "CREATE TABLE IF NOT EXISTS {log} (\n    \
                         id bigint NOT NULL DEFAULT nextval({seq}),\n    \
                         op \"char\" NOT NULL,\n    \
                         txid xid8 NOT NULL DEFAULT pg_current_xact_id(),\n    \
                         changed_at timestamptz NOT NULL DEFAULT clock_timestamp(){cols},\n    \
                         CONSTRAINT {pkey} PRIMARY KEY (id)\n)",
                    seq = quote_literal(&self.q("change_id")),
                    pkey = quote_ident(&format!("pkey_{key}")),
                ));
                plan.push(format!(
                    "CREATE INDEX IF NOT EXISTS {} ON {log} (txid)",
                    quote_ident(&format!("txid_{key}"))
                ));
                plan.push(format!(
                    "INSERT INTO {} (table_schema, table_name, log_table, capture_function, trigger_name) \
                     VALUES ({}, {}, {}, {}, {}) ON CONFLICT DO NOTHING",
                    self.q("watched_table"),
                    quote_literal(name.schema.as_str()),
                    quote_literal(name.table.as_str()),
                    quote_literal(log_table.as_str()),
                    quote_literal(function.as_str()),
                    quote_literal(trigger_base.as_str()),
                ));
            } else if !added.is_empty() {
                let adds: Vec<String> = added
                    .iter()
                    .flat_map(|c| {
                        [&c.old_column, &c.new_column].map(|col| {
                            format!(
                                "ADD COLUMN IF NOT EXISTS {} {}",
                                col.quoted(),
                                c.column_type
                            )
                        })
                    })
                    .collect();
                plan.push(format!("ALTER TABLE {log} {}", adds.join(", ")));
            }
            if !gone.is_empty() {
                let drops: Vec<String> = gone
                    .iter()
                    .flat_map(|c| {
                        [&c.old_column, &c.new_column]
                            .map(|col| format!("DROP COLUMN IF EXISTS {}", col.quoted()))
                    })
                    .collect();
                plan.push(format!("ALTER TABLE {log} {}", drops.join(", ")));
                plan.push(format!(
                    "DELETE FROM {} WHERE {}",
                    self.q("watched_column"),
                    in_registry(format!(
                        " AND column_name IN ({})",
                        list(&gone, |c| quote_literal(c.name.as_str()))
                    ))
                ));
            }
            if !retyped.is_empty() {
                let alters: Vec<String> = retyped
                    .iter()
                    .flat_map(|c| {
                        [&c.old_column, &c.new_column].map(|col| {
                            format!(
                                "ALTER COLUMN {col} TYPE {t} USING {col}::text::{t}",
                                col = col.quoted(),
                                t = c.column_type
                            )
                        })
                    })
                    .collect();
                plan.push(format!("ALTER TABLE {log} {}", alters.join(", ")));
                for c in &retyped {
                    plan.push(format!(
                        "UPDATE {} SET column_type = {} WHERE {}",
                        self.q("watched_column"),
                        quote_literal(&c.column_type),
                        in_registry(format!(
                            " AND column_name = {}",
                            quote_literal(c.name.as_str())
                        )),
                    ));
                }
            }
            if !added.is_empty() {
                let values: Vec<String> = added
                    .iter()
                    .map(|c| {
                        format!(
                            "({}, {}, {}, {}, {}, {}, {})",
                            quote_literal(name.schema.as_str()),
                            quote_literal(name.table.as_str()),
                            quote_literal(c.name.as_str()),
                            c.position,
                            quote_literal(&c.column_type),
                            quote_literal(c.old_column.as_str()),
                            quote_literal(c.new_column.as_str()),
                        )
                    })
                    .collect();
                plan.push(format!(
                    "INSERT INTO {} (table_schema, table_name, column_name, position, column_type, old_column, new_column) \
                     VALUES {} ON CONFLICT DO NOTHING",
                    self.q("watched_column"),
                    values.join(", ")
                ));
            }

            plan.push(self.capture_function(&function, &log, &all, name, &table, &trigger_base));
            let found = if existing.is_some() {
                find_triggers(client, table.oid, self.schema, &function, &trigger_base)?
            } else {
                // A new registration has no triggers of ours yet; one of our names may
                // be taken by a leftover, which DROP ... IF EXISTS handles.
                Vec::new()
            };
            let mut attnums: Vec<i16> = all
                .iter()
                .map(|c| table.columns[c.name.as_str()].attnum)
                .collect();
            attnums.sort_unstable();
            attnums.dedup();
            let expected: Vec<Ident> = Event::for_table(table.partitioned)
                .iter()
                .map(|e| e.trigger_name(&trigger_base))
                .collect();
            // Triggers firing our function under another name (an older layout).
            for t in &found {
                if t.ours && !expected.iter().any(|e| e.as_str() == t.name) {
                    plan.push(format!(
                        "DROP TRIGGER IF EXISTS {} ON {}",
                        quote_ident(&t.name),
                        name.quoted()
                    ));
                }
            }
            for &event in Event::for_table(table.partitioned) {
                let trigger = event.trigger_name(&trigger_base);
                let current = found
                    .iter()
                    .any(|t| t.is_current(event, &trigger_base, &attnums));
                if current {
                    continue;
                }
                if existing.is_none() || found.iter().any(|t| t.name == trigger.as_str()) {
                    plan.push(format!(
                        "DROP TRIGGER IF EXISTS {} ON {}",
                        trigger.quoted(),
                        name.quoted()
                    ));
                }
                plan.push(self.capture_trigger(event, &trigger, name, &function, &all, &table));
                // Fire under `session_replication_role = replica` too: changes applied by
                // logical replication, or restored with `pg_restore --disable-triggers`
                // as a replica, are changes the handlers must hear about. On a
                // partitioned table this reaches the partitions' clones, and partitions
                // created later inherit it.
                plan.push(format!(
                    "ALTER TABLE {} ENABLE ALWAYS TRIGGER {}",
                    name.quoted(),
                    trigger.quoted()
                ));
                plan.push(format!(
                    "COMMENT ON TRIGGER {} ON {} IS {}",
                    trigger.quoted(),
                    name.quoted(),
                    quote_literal(TRIGGER_LAYOUT)
                ));
            }
            if table.partitioned {
                let trigger = Event::Truncate.trigger_name(&trigger_base);
                let leaves = partition_leaves(client, table.oid, self.schema, &function, &trigger)?;
                for leaf in leaves.iter().filter(|l| !l.is_current()) {
                    plan.push(format!(
                        "DROP TRIGGER IF EXISTS {} ON {}",
                        trigger.quoted(),
                        leaf.quoted
                    ));
                    plan.push(format!(
                        "CREATE TRIGGER {} BEFORE TRUNCATE ON {} FOR EACH STATEMENT\nEXECUTE FUNCTION {}()",
                        trigger.quoted(),
                        leaf.quoted,
                        self.q(function.as_str())
                    ));
                    plan.push(format!(
                        "ALTER TABLE {} ENABLE ALWAYS TRIGGER {}",
                        leaf.quoted,
                        trigger.quoted()
                    ));
                    plan.push(format!(
                        "COMMENT ON TRIGGER {} ON {} IS {}",
                        trigger.quoted(),
                        leaf.quoted,
                        quote_literal(TRIGGER_LAYOUT)
                    ));
                }
            }
        }
        Ok(plan)
    }

    /// The schema, the shared sequence, the registry, the consumer and dead-letter
    /// tables. Idempotent and cheap (no lock on any user table), so always part of the
    /// plan; a column added to a bookkeeping table since a schema was first installed is
    /// added when it is missing.
    fn bookkeeping_ddl(
        &self,
        client: &mut impl GenericClient,
        state: SchemaState,
    ) -> Result<Vec<String>, PgError> {
        let mut ddl = vec![
            format!("CREATE SCHEMA IF NOT EXISTS {}", self.schema.quoted()),
            format!(
                "CREATE SEQUENCE IF NOT EXISTS {} AS bigint",
                self.q("change_id")
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {} (\n    \
                     table_schema text NOT NULL,\n    \
                     table_name text NOT NULL,\n    \
                     log_table text NOT NULL UNIQUE,\n    \
                     capture_function text NOT NULL,\n    \
                     trigger_name text NOT NULL,\n    \
                     installed_at timestamptz NOT NULL DEFAULT now(),\n    \
                     PRIMARY KEY (table_schema, table_name)\n)",
                self.q("watched_table")
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {} (\n    \
                     table_schema text NOT NULL,\n    \
                     table_name text NOT NULL,\n    \
                     column_name text NOT NULL,\n    \
                     position integer NOT NULL,\n    \
                     column_type text NOT NULL,\n    \
                     old_column text NOT NULL,\n    \
                     new_column text NOT NULL,\n    \
                     PRIMARY KEY (table_schema, table_name, column_name),\n    \
                     FOREIGN KEY (table_schema, table_name) REFERENCES {} ON DELETE CASCADE\n)",
                self.q("watched_column"),
                self.q("watched_table")
            ),
            // prev_snapshot: what the consumer has fully handled. batch_*: the batch in
            // progress (NULL when none), kept durable so that a partial ack followed by a
            // crash resumes exactly the same batch. evicted_at: set by evict_stale; an
            // evicted consumer holds back no pruning and must register again.
            format!(
                "CREATE TABLE IF NOT EXISTS {} (\n    \
                     daemon text NOT NULL,\n    \
                     handler text NOT NULL,\n    \
                     tables text[] NOT NULL,\n    \
                     prev_snapshot pg_snapshot NOT NULL,\n    \
                     batch_id bigint NOT NULL DEFAULT 0,\n    \
                     batch_snapshot pg_snapshot,\n    \
                     batch_done_upto bigint,\n    \
                     batch_last_id bigint,\n    \
                     registered_at timestamptz NOT NULL DEFAULT now(),\n    \
                     last_seen timestamptz NOT NULL DEFAULT now(),\n    \
                     evicted_at timestamptz,\n    \
                     PRIMARY KEY (daemon, handler)\n)",
                self.q("consumer")
            ),
        ];
        if state == SchemaState::Ours && !has_column(client, self.schema, "consumer", "evicted_at")?
        {
            ddl.push(format!(
                "ALTER TABLE {} ADD COLUMN IF NOT EXISTS evicted_at timestamptz",
                self.q("consumer")
            ));
        }
        // The lease that makes a daemon name exclusive to one live daemon.
        ddl.push(format!(
            "CREATE TABLE IF NOT EXISTS {} (\n    \
                 daemon text PRIMARY KEY,\n    \
                 instance text NOT NULL,\n    \
                 holder text NOT NULL,\n    \
                 expires_at timestamptz NOT NULL,\n    \
                 renewals bigint NOT NULL DEFAULT 0\n)",
            self.q("daemon")
        ));
        // The cluster whose transaction ids the cursors and log rows hold; see
        // `rebase_ddl` for what a restore into another cluster does.
        ddl.push(format!(
            "CREATE TABLE IF NOT EXISTS {} (system_identifier bigint NOT NULL)",
            self.q("cluster")
        ));
        ddl.push(format!(
            "INSERT INTO {c} (system_identifier) \
             SELECT system_identifier FROM pg_catalog.pg_control_system() \
             WHERE NOT EXISTS (SELECT 1 FROM {c})",
            c = self.q("cluster")
        ));
        // pid: the reading connection's backend; since: set while it waits for a wake-up.
        // Rows of connections that are gone are deleted by the next reader that registers.
        ddl.push(format!(
            "CREATE UNLOGGED TABLE IF NOT EXISTS {} (\n    \
                 pid integer PRIMARY KEY,\n    \
                 since timestamptz\n)",
            self.q("sleeper")
        ));
        // change: the change as delivered (JSON, opaque here). source_table: as the
        // consumer spelled it.
        ddl.push(format!(
            "CREATE TABLE IF NOT EXISTS {} (\n    \
                 id bigserial PRIMARY KEY,\n    \
                 daemon text NOT NULL,\n    \
                 handler text NOT NULL,\n    \
                 source_table text NOT NULL,\n    \
                 change_id bigint NOT NULL,\n    \
                 op text NOT NULL,\n    \
                 change text NOT NULL,\n    \
                 error text NOT NULL,\n    \
                 attempts integer NOT NULL,\n    \
                 failed_at timestamptz NOT NULL,\n    \
                 retry_requested boolean NOT NULL DEFAULT false\n)",
            self.q("dead_letter")
        ));
        ddl.push(format!(
            "CREATE INDEX IF NOT EXISTS dead_letter_consumer ON {} (daemon, handler)",
            self.q("dead_letter")
        ));
        Ok(ddl)
    }

    /// After a dump of the schema was restored into another cluster (a migration, an
    /// upgrade by dump), the cursors are snapshots of the old cluster's transaction ids,
    /// and so are the restored log rows' `txid`s, while rows written here since carry
    /// this cluster's: compared with each other they mean nothing (typically every new
    /// change looks handled, and is pruned). Rebasing makes them mean something again,
    /// without losing any change: every log row this statement sees (committed: the
    /// restored ones and those written here since) gets `txid` 1, which every snapshot
    /// sees as committed and none of the cursors below as handled; rows of transactions
    /// still running keep theirs, and are read by the snapshots as usual once they
    /// commit. Every consumer restarts from the snapshot that sees nothing, so it is
    /// delivered everything in the log, again for what it had handled before the move
    /// (at least once, never lost). Under the cursor lock, so that no prune runs on the
    /// old cursors meanwhile. `pg_upgrade` also gives the cluster a new system
    /// identifier (it keeps the transaction ids), so after it too the retained log is
    /// delivered again: redundant, never lossy.
    fn rebase_ddl(&self, registry: &BTreeMap<TableName, RegisteredTable>) -> Vec<String> {
        let mut ddl = vec![format!(
            "SELECT pg_catalog.pg_advisory_xact_lock({})",
            cursor_lock_key(self.schema)
        )];
        for reg in registry.values() {
            ddl.push(format!(
                "UPDATE {} SET txid = '1'::pg_catalog.xid8 WHERE txid <> '1'::pg_catalog.xid8",
                self.q(reg.log_table.as_str())
            ));
        }
        ddl.push(format!(
            "UPDATE {} SET prev_snapshot = '1:1:', batch_id = batch_id + 1, batch_snapshot = NULL, \
                 batch_done_upto = NULL, batch_last_id = NULL",
            self.q("consumer")
        ));
        ddl.push(format!(
            "UPDATE {} SET system_identifier = \
                 (SELECT system_identifier FROM pg_catalog.pg_control_system())",
            self.q("cluster")
        ));
        ddl
    }

    /// The trigger function: one log row per call. Which calls happen is decided by the
    /// triggers' `WHEN` clauses (an update that changes no watched column never gets here).
    fn capture_function(
        &self,
        function: &Ident,
        log: &str,
        columns: &[RegisteredColumn],
        name: &TableName,
        table: &UserTable,
        trigger_base: &Ident,
    ) -> String {
        let old_cols = list(columns, |c| c.old_column.quoted());
        let new_cols = list(columns, |c| c.new_column.quoted());
        let old_vals = list(columns, |c| format!("OLD.{}", c.name.quoted()));
        let new_vals = list(columns, |c| format!("NEW.{}", c.name.quoted()));
        let row_vals = list(columns, |c| format!("t.{}", c.name.quoted()));
        // TRUNCATE: the BEFORE trigger still sees every row, and logs each as deleted,
        // so handlers act on it as on deletes. A partitioned table's rows are all in its
        // partitions (a TRUNCATE of the parent truncates them all); an ordinary table's
        // inheritance children have no capture triggers of their own, so only its own
        // rows are logged.
        let truncate = if table.partitioned {
            // The partitions' own TRUNCATE triggers log their rows (each fires whether
            // the partition or the parent was named); the parent's logs the rows of
            // partitions that have no working trigger of their own (created since the
            // last install), so that truncating the parent captures them too.
            let trigger = quote_literal(Event::Truncate.trigger_name(trigger_base).as_str());
            let template =
                format!("INSERT INTO {log} (op, {old_cols}) SELECT 'D', {row_vals} FROM ONLY %s t")
                    .replace('%', "%%")
                    .replacen("%%s", "%s", 1);
            let replica = "current_setting('session_replication_role') = 'replica'";
            format!(
                "IF TG_RELID = {root}::regclass THEN\n            \
                     INSERT INTO {log} (op, {old_cols}) SELECT 'D', {row_vals} FROM {table_sql} t\n            \
                     WHERE t.tableoid <> ALL (ARRAY(SELECT tr.tgrelid FROM pg_trigger tr\n                \
                         WHERE tr.tgname = {trigger} AND tr.tgfoid = {func}::regprocedure AND tr.tgparentid = 0\n                  \
                           AND (tr.tgenabled = 'A' OR (tr.tgenabled = 'O' AND NOT {replica}) OR (tr.tgenabled = 'R' AND {replica}))));\n        \
                 ELSE\n            \
                     EXECUTE format({template}, TG_RELID::regclass);\n        \
                 END IF;",
                root = quote_literal(&name.quoted()),
                table_sql = name.quoted(),
                func = quote_literal(&format!("{}()", self.q(function.as_str()))),
                template = quote_literal(&template),
            )
        } else {
            format!(
                "INSERT INTO {log} (op, {old_cols}) SELECT 'D', {row_vals} FROM ONLY {} t;",
                name.quoted()
            )
        };
        // One notification per transaction: PostgreSQL folds identical notifications
        // (same channel, same payload) sent within one transaction. With `when-idle` the
        // test runs for every row, not once per transaction, so that a long transaction
        // still notifies a reader that started waiting after its first row.
        let channel = quote_literal(self.schema.as_str());
        //
        // A transaction that notified cannot `PREPARE TRANSACTION`. Where the server
        // allows prepared transactions at all (`max_prepared_transactions` > 0) the
        // capture functions therefore never notify: a write must never fail, and the
        // readers' fallback poll finds the changes instead (see [`crate::listener`]).
        let two_phase_off = "current_setting('max_prepared_transactions') = '0'";
        let notify = match self.notify {
            NotifyMode::Always => format!(
                "\n    IF {two_phase_off} THEN\n        \
                     PERFORM pg_notify({channel}, '');\n    \
                 END IF;"
            ),
            NotifyMode::WhenIdle => format!(
                "\n    IF {two_phase_off} AND EXISTS (SELECT 1 FROM {} WHERE since > now() - interval '{} seconds') THEN\n        \
                     PERFORM pg_notify({channel}, '');\n    \
                 END IF;",
                self.q("sleeper"),
                crate::listener::SLEEPER_TTL.as_secs()
            ),
            NotifyMode::Off => String::new(),
        };
        let prologue = if table.partitioned {
            self.move_prologue(log, columns, table.oid)
        } else {
            "\nBEGIN".to_owned()
        };
        let body = format!(
            "{prologue}\n    \
                 IF TG_OP = 'INSERT' THEN\n        \
                     INSERT INTO {log} (op, {new_cols}) VALUES ('I', {new_vals});\n    \
                 ELSIF TG_OP = 'UPDATE' THEN\n        \
                     INSERT INTO {log} (op, {old_cols}, {new_cols}) VALUES ('U', {old_vals}, {new_vals});\n    \
                 ELSIF TG_OP = 'TRUNCATE' THEN\n        \
                     {truncate}\n    \
                 ELSE\n        \
                     INSERT INTO {log} (op, {old_cols}) VALUES ('D', {old_vals});\n    \
                 END IF;{notify}\n    \
                 RETURN NULL;\n\
             END\n"
        );
        // Column names may contain `$`, so pick a dollar-quote tag the body does not hold.
        let mut tag = "$epidemic$".to_owned();
        let mut n = 0;
        while body.contains(&tag) {
            n += 1;
            tag = format!("$epidemic{n}$");
        }
        format!(
            "CREATE OR REPLACE FUNCTION {}() RETURNS trigger\n\
             LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp\n\
             AS {tag}{body}{tag}",
            self.q(function.as_str())
        )
    }

    /// For a partitioned table: the start of the capture function, up to its `BEGIN` and
    /// the branches of the move triggers.
    ///
    /// An UPDATE that moves a row to another partition is carried out as a DELETE from
    /// the old partition and an INSERT into the new one: PostgreSQL 15 fires the row
    /// triggers BEFORE UPDATE, BEFORE DELETE (old partition), BEFORE INSERT (new one),
    /// one row after the other, and then, at the end of the statement, AFTER DELETE and
    /// AFTER INSERT for each moved row, again one right after the other, and no AFTER
    /// UPDATE. So the log gets a delete and an insert, and a handler would remove a
    /// mailbox and create an empty one. The move triggers give it back the update:
    ///
    /// - the row trigger (BEFORE, every row event) recognises each move: BEFORE UPDATE
    ///   notes the old row, BEFORE DELETE of that same row right after it says "moving",
    ///   and the BEFORE INSERT that follows counts one move;
    /// - the statement trigger BEFORE UPDATE notes where the statement's log rows begin
    ///   (the shared sequence's last value) and zeroes the count;
    /// - the statement trigger AFTER UPDATE, which runs after every row trigger of the
    ///   statement, pairs each logged delete with the insert logged right after it and,
    ///   if there are exactly as many pairs as moves counted, merges each pair into one
    ///   update (at the delete's id, so per-row order holds), dropping it if no watched
    ///   column changed. Otherwise (a `MERGE` that deletes and inserts besides moving
    ///   rows, a row a user's BEFORE trigger skipped) it leaves the deletes and inserts
    ///   as they are: never an update that did not happen.
    ///
    /// The notes are transaction-local settings (`set_config(.., true)`, undone with a
    /// rolled-back subtransaction like the log rows they describe) named after the table
    /// and the trigger depth, so a statement run by a trigger inside another keeps its
    /// own. A sub-partitioned partition updated directly, or a direct UPDATE of a
    /// partition, fires no statement trigger of the watched table: moves there (only the
    /// former can move rows) stay a delete and an insert.
    fn move_prologue(&self, log: &str, columns: &[RegisteredColumn], oid: u32) -> String {
        let set_new = list(columns, |c| {
            format!("{col} = i.{col}", col = c.new_column.quoted())
        });
        let old_text = list(columns, |c| format!("{}::text", c.old_column.quoted()));
        let new_text = list(columns, |c| format!("{}::text", c.new_column.quoted()));
        let seq = self.q("change_id");
        format!(
            "\nDECLARE\n    \
                 depth text := pg_trigger_depth()::text;\n    \
                 k_state text := 'epidemic.mvs_{oid}_' || depth;\n    \
                 k_start text := 'epidemic.mvw_{oid}_' || depth;\n    \
                 k_count text := 'epidemic.mvn_{oid}_' || depth;\n    \
                 moves int;\n    \
                 d_ids bigint[];\n    \
                 i_ids bigint[];\n\
             BEGIN\n    \
                 IF TG_LEVEL = 'STATEMENT' AND TG_OP = 'UPDATE' THEN\n        \
                     IF TG_WHEN = 'BEFORE' THEN\n            \
                         PERFORM set_config(k_start, (SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END FROM {seq})::text, true),\n                    \
                                 set_config(k_count, '0', true), set_config(k_state, '', true);\n            \
                         RETURN NULL;\n        \
                     END IF;\n        \
                     moves := coalesce(nullif(current_setting(k_count, true), '')::int, 0);\n        \
                     IF moves > 0 THEN\n            \
                         SELECT coalesce(array_agg(r.id ORDER BY r.id), '{{}}'), coalesce(array_agg(r.next_id ORDER BY r.id), '{{}}')\n            \
                         INTO d_ids, i_ids\n            \
                         FROM (SELECT l.id, l.op, lead(l.id) OVER w AS next_id, lead(l.op) OVER w AS next_op\n                  \
                               FROM {log} l\n                  \
                               WHERE l.id > nullif(current_setting(k_start, true), '')::bigint\n                    \
                                 AND l.txid = pg_current_xact_id() AND l.op IN ('D', 'I')\n                  \
                               WINDOW w AS (ORDER BY l.id)) r\n            \
                         WHERE r.op = 'D' AND r.next_op = 'I';\n            \
                         IF cardinality(d_ids) = moves THEN\n                \
                             UPDATE {log} d SET op = 'U', {set_new}\n                \
                             FROM unnest(d_ids, i_ids) AS p(d_id, i_id), {log} i\n                \
                             WHERE d.id = p.d_id AND i.id = p.i_id;\n                \
                             DELETE FROM {log} WHERE id = ANY (i_ids);\n                \
                             DELETE FROM {log} WHERE id = ANY (d_ids)\n                  \
                               AND ROW({old_text}) IS NOT DISTINCT FROM ROW({new_text});\n            \
                         END IF;\n        \
                     END IF;\n        \
                     PERFORM set_config(k_count, '0', true);\n        \
                     RETURN NULL;\n    \
                 END IF;\n    \
                 IF TG_WHEN = 'BEFORE' AND TG_LEVEL = 'ROW' THEN\n        \
                     IF TG_OP = 'UPDATE' THEN\n            \
                         PERFORM set_config(k_state, 'u' || OLD::text, true);\n            \
                         RETURN NEW;\n        \
                     ELSIF TG_OP = 'DELETE' THEN\n            \
                         PERFORM set_config(k_state, CASE WHEN current_setting(k_state, true) = 'u' || OLD::text THEN 'd' ELSE '' END, true);\n            \
                         RETURN OLD;\n        \
                     END IF;\n        \
                     IF current_setting(k_state, true) = 'd' THEN\n            \
                         PERFORM set_config(k_count, (coalesce(nullif(current_setting(k_count, true), '')::int, 0) + 1)::text, true);\n        \
                     END IF;\n        \
                     PERFORM set_config(k_state, '', true);\n        \
                     RETURN NEW;\n    \
                 END IF;"
        )
    }

    /// `CREATE TRIGGER` for one event; see the module docs for what the `WHEN` is for.
    fn capture_trigger(
        &self,
        event: Event,
        trigger: &Ident,
        name: &TableName,
        function: &Ident,
        columns: &[RegisteredColumn],
        table: &UserTable,
    ) -> String {
        let when = match event {
            Event::Update => columns
                .iter()
                .map(|c| {
                    let col = c.name.quoted();
                    if table.columns[c.name.as_str()].identity_eq {
                        format!("OLD.{col} IS DISTINCT FROM NEW.{col}")
                    } else {
                        format!(
                            "(OLD.{col}::text COLLATE pg_catalog.\"C\") IS DISTINCT FROM (NEW.{col}::text COLLATE pg_catalog.\"C\")"
                        )
                    }
                })
                .collect::<Vec<_>>()
                .join("\n    OR "),
            Event::Insert | Event::Delete => {
                let row = if event == Event::Insert { "NEW" } else { "OLD" };
                std::iter::once("true".to_owned())
                    .chain(
                        columns
                            .iter()
                            .map(|c| format!("{row}.{} IS NULL", c.name.quoted())),
                    )
                    .collect::<Vec<_>>()
                    .join(" OR ")
            }
            Event::Truncate | Event::MoveRow | Event::MoveStart | Event::MoveEnd => {
                let (timing, level) = match event {
                    Event::MoveRow => ("BEFORE", "ROW"),
                    Event::MoveEnd => ("AFTER", "STATEMENT"),
                    _ => ("BEFORE", "STATEMENT"),
                };
                return format!(
                    "CREATE TRIGGER {} {timing} {} ON {} FOR EACH {level}\nEXECUTE FUNCTION {}()",
                    trigger.quoted(),
                    event.sql(),
                    name.quoted(),
                    self.q(function.as_str())
                );
            }
        };
        format!(
            "CREATE TRIGGER {} AFTER {} ON {} FOR EACH ROW\nWHEN ({when})\nEXECUTE FUNCTION {}()",
            trigger.quoted(),
            event.sql(),
            name.quoted(),
            self.q(function.as_str())
        )
    }

    /// The statements that remove every object Epidemic created: the triggers on each
    /// watched table that still exists, then the schema with everything in it.
    pub fn plan_uninstall(&self, client: &mut impl GenericClient) -> Result<Vec<String>, PgError> {
        match schema_state(client, self.schema)? {
            SchemaState::Missing => return Ok(Vec::new()),
            SchemaState::Foreign => return Err(PgError::ForeignSchema(self.schema.to_string())),
            SchemaState::Ours => {}
        }
        let mut plan = Vec::new();
        for (name, reg) in load_registry(client, self.schema)? {
            plan.extend(self.drop_triggers(client, &name, &reg)?);
        }
        plan.push(format!("DROP SCHEMA {} CASCADE", self.schema.quoted()));
        Ok(plan)
    }

    /// `DROP TRIGGER` for every capture trigger of a registered table (none when the table
    /// is gone: the triggers went with it).
    fn drop_triggers(
        &self,
        client: &mut impl GenericClient,
        name: &TableName,
        reg: &RegisteredTable,
    ) -> Result<Vec<String>, PgError> {
        let table = match inspect_table(client, name) {
            Ok(t) => t,
            Err(PgError::MissingTable(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut names: Vec<String> = Event::for_table(table.partitioned)
            .iter()
            .map(|e| e.trigger_name(&reg.trigger_name).to_string())
            .collect();
        for t in find_triggers(
            client,
            table.oid,
            self.schema,
            &reg.capture_function,
            &reg.trigger_name,
        )? {
            if t.ours && !names.contains(&t.name) {
                names.push(t.name);
            }
        }
        let mut plan: Vec<String> = names
            .iter()
            .map(|t| {
                format!(
                    "DROP TRIGGER IF EXISTS {} ON {}",
                    quote_ident(t),
                    name.quoted()
                )
            })
            .collect();
        if table.partitioned {
            let trigger = Event::Truncate.trigger_name(&reg.trigger_name);
            for leaf in partition_leaves(
                client,
                table.oid,
                self.schema,
                &reg.capture_function,
                &trigger,
            )? {
                if leaf.enabled.is_some() {
                    plan.push(format!(
                        "DROP TRIGGER IF EXISTS {} ON {}",
                        trigger.quoted(),
                        leaf.quoted
                    ));
                }
            }
        }
        Ok(plan)
    }

    /// The statements that remove everything Epidemic keeps for one table (triggers, log,
    /// function, registry entry, the table from consumers' lists and consumers left with
    /// no table, dead letters), leaving the rest of the installation alone. Empty when
    /// the table is not registered.
    pub fn plan_forget_table(
        &self,
        client: &mut impl GenericClient,
        name: &TableName,
    ) -> Result<Vec<String>, PgError> {
        if schema_state(client, self.schema)? != SchemaState::Ours {
            return Ok(Vec::new());
        }
        let registry = load_registry(client, self.schema)?;
        let Some(reg) = registry.get(name) else {
            return Ok(Vec::new());
        };
        let mut plan = self.drop_triggers(client, name, reg)?;
        plan.push(format!(
            "DROP TABLE IF EXISTS {}",
            self.q(reg.log_table.as_str())
        ));
        plan.push(format!(
            "DROP FUNCTION IF EXISTS {}()",
            self.q(reg.capture_function.as_str())
        ));
        plan.push(format!(
            "DELETE FROM {} WHERE table_schema = {} AND table_name = {}",
            self.q("watched_table"),
            quote_literal(name.schema.as_str()),
            quote_literal(name.table.as_str())
        ));
        // Consumers and dead letters name the table as configured: `t` or `public.t`.
        let mut spellings = vec![format!("{}.{}", name.schema, name.table)];
        if name.schema.as_str() == "public" {
            spellings.push(name.table.to_string());
        }
        let spellings_sql = spellings
            .iter()
            .map(|s| quote_literal(s))
            .collect::<Vec<_>>()
            .join(", ");
        plan.push(format!(
            "UPDATE {} SET tables = ARRAY(SELECT t FROM unnest(tables) AS t WHERE t NOT IN ({spellings_sql})) \
             WHERE tables && ARRAY[{spellings_sql}]",
            self.q("consumer")
        ));
        plan.push(format!(
            "DELETE FROM {} WHERE cardinality(tables) = 0",
            self.q("consumer")
        ));
        // A schema installed before dead letters existed has no such table yet.
        if has_column(client, self.schema, "dead_letter", "source_table")? {
            plan.push(format!(
                "DELETE FROM {} WHERE source_table IN ({spellings_sql})",
                self.q("dead_letter")
            ));
        }
        Ok(plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_trigger_name_fits_with_the_longest_schema() {
        // The schema option is limited so that `<schema>_capture_update` fits.
        let schema = "s".repeat(MAX_IDENT_BYTES - "_capture_update".len());
        let base = Ident::internal(format!("{schema}_capture"));
        for event in Event::ALL {
            let name = event.trigger_name(&base);
            assert!(name.as_str().len() <= MAX_IDENT_BYTES, "{name}");
        }
    }

    #[test]
    fn partitioned_tables_get_the_move_triggers_and_others_do_not() {
        assert_eq!(Event::for_table(false).len(), 4);
        assert!(!Event::for_table(false).contains(&Event::MoveRow));
        assert_eq!(Event::for_table(true), &Event::ALL[..]);
    }
}
