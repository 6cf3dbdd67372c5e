//! The capture of one watched table: its log table, its trigger function and the triggers
//! that call it, as SQL ([`PgCapture`]), and which of the triggers a table has now
//! ([`find_triggers`]). What is PostgreSQL-specific about partitioned tables (moves between
//! partitions, TRUNCATE of one partition) is in [`crate::partition`].
//!
//! - `log_<table>` (or `log_<schema>.<table>` outside `public`): one log table per watched
//!   table with `id` (from the shared sequence `change_id`), `op` (`I`/`U`/`D`, or
//!   [`WATERMARK_OP`] for a backfill's watermark, which the backend writes itself), `txid`
//!   (the writer's `pg_current_xact_id()`, indexed: batches are found by transaction
//!   snapshot), `changed_at`, and typed `old_<column>`/`new_<column>` pairs for every
//!   captured column: the row's key columns always, and the union of what the handlers
//!   watch.
//! - `capture_<table>()`: the PL/pgSQL trigger function, `SECURITY DEFINER` so that the
//!   people who write to the table need no rights on Epidemic's schema, with a fixed
//!   `search_path` so that it cannot be hijacked by the writer's.
//!
//! On the user's table there are three row triggers, `<schema>_capture_insert`, `_update`
//! and `_delete`, each `AFTER ... FOR EACH ROW` with a `WHEN` clause that names every
//! watched column; `_trunc`, `BEFORE TRUNCATE ... FOR EACH STATEMENT`, which logs a delete
//! of every row the table still holds (so a `TRUNCATE`, also one that reaches the table
//! through `TRUNCATE ... CASCADE`, reaches handlers as the deletes it amounts to, at the
//! price of copying the rows into the log); and on a partitioned table `_mvrow`, `_mvbeg`
//! and `_mvend`, which deliver a row's move to another partition as one update (see
//! [`crate::partition`]). Every capture trigger is `ENABLE ALWAYS`: it fires
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

use postgres::GenericClient;

use crate::catalog::UserTable;
use crate::error::PgError;
use crate::ident::{quote_ident, quote_literal, Ident, TableName};
use crate::options::NotifyMode;
use crate::partition;
use crate::registry::RegisteredColumn;

/// The comment on every capture trigger: the layout of the triggers it belongs to. A
/// capture trigger with another comment (an older layout: a `WHEN` that used the
/// type's equality, no `ENABLE ALWAYS`) is recreated by the next install.
pub(crate) const TRIGGER_LAYOUT: &str = "epidemic capture 2";

/// The op of a backfill's watermark in a log table (see [`crate::snapshot`]): a row with
/// every value NULL, written by the backend, never by a trigger. The capture functions of
/// every Epidemic version write only `I`, `U` and `D` (a partition move's merge turns a
/// `D` into a `U`), so a reader never takes a watermark for a change, nor a change for a
/// watermark.
pub(crate) const WATERMARK_OP: u8 = b'W';

/// What Epidemic captures with one trigger each: the row events; `TRUNCATE` (a
/// statement-level trigger that logs a delete of every row the table still holds); and,
/// on a partitioned table, the three triggers that turn a row's move to another
/// partition back into the update it was (see [`PgCapture::function`]).
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
    pub ours: bool,
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

/// The capture SQL of one Epidemic schema.
pub(crate) struct PgCapture<'a> {
    pub schema: &'a Ident,
    pub notify: NotifyMode,
}

/// `a, b, c` from `pick` applied to each column.
pub(crate) fn list(
    columns: &[RegisteredColumn],
    pick: impl Fn(&RegisteredColumn) -> String,
) -> String {
    columns.iter().map(pick).collect::<Vec<_>>().join(", ")
}

impl PgCapture<'_> {
    fn q(&self, name: &str) -> String {
        format!("{}.{}", self.schema.quoted(), quote_ident(name))
    }

    /// The log table `log_table` for `columns`, and its `txid` index. `key` names the
    /// constraint and the index (`pkey_<key>`, `txid_<key>`).
    pub fn log_table(
        &self,
        log_table: &Ident,
        key: &str,
        columns: &[RegisteredColumn],
    ) -> Vec<String> {
        let log = self.q(log_table.as_str());
        let mut cols = String::new();
        for c in columns {
            cols.push_str(&format!(
                ",\n    {} {},\n    {} {}",
                c.old_column.quoted(),
                c.column_type,
                c.new_column.quoted(),
                c.column_type
            ));
        }
        vec![
            format!(
                "CREATE TABLE IF NOT EXISTS {log} (\n    \
                     id bigint NOT NULL DEFAULT nextval({seq}),\n    \
                     op \"char\" NOT NULL,\n    \
                     txid xid8 NOT NULL DEFAULT pg_current_xact_id(),\n    \
                     changed_at timestamptz NOT NULL DEFAULT clock_timestamp(){cols},\n    \
                     CONSTRAINT {pkey} PRIMARY KEY (id)\n)",
                seq = quote_literal(&self.q("change_id")),
                pkey = quote_ident(&format!("pkey_{key}")),
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS {} ON {log} (txid)",
                quote_ident(&format!("txid_{key}"))
            ),
        ]
    }

    /// The statements that give the table `name` the capture triggers install would
    /// create for `columns` (see the module docs), replacing those that are missing, not
    /// ours, out of date or not firing always; nothing when all are current. `existing`:
    /// the table was registered before (a new registration has no triggers of ours yet).
    #[allow(clippy::too_many_arguments)]
    pub fn plan_triggers(
        &self,
        client: &mut impl GenericClient,
        name: &TableName,
        table: &UserTable,
        function: &Ident,
        trigger_base: &Ident,
        columns: &[RegisteredColumn],
        existing: bool,
    ) -> Result<Vec<String>, PgError> {
        let mut plan = Vec::new();
        let found = if existing {
            find_triggers(client, table.oid, self.schema, function, trigger_base)?
        } else {
            // One of our names may be taken by a leftover, which DROP ... IF EXISTS handles.
            Vec::new()
        };
        let mut attnums: Vec<i16> = columns
            .iter()
            .map(|c| table.columns[c.name.as_str()].attnum)
            .collect();
        attnums.sort_unstable();
        attnums.dedup();
        let expected: Vec<Ident> = Event::for_table(table.partitioned)
            .iter()
            .map(|e| e.trigger_name(trigger_base))
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
            let trigger = event.trigger_name(trigger_base);
            if found
                .iter()
                .any(|t| t.is_current(event, trigger_base, &attnums))
            {
                continue;
            }
            if !existing || found.iter().any(|t| t.name == trigger.as_str()) {
                plan.push(format!(
                    "DROP TRIGGER IF EXISTS {} ON {}",
                    trigger.quoted(),
                    name.quoted()
                ));
            }
            plan.push(self.trigger(event, &trigger, name, function, columns, table));
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
            let trigger = Event::Truncate.trigger_name(trigger_base);
            plan.extend(partition::plan_leaf_triggers(
                client,
                table.oid,
                self.schema,
                function,
                &trigger,
            )?);
        }
        Ok(plan)
    }

    /// The trigger function: one log row per call. Which calls happen is decided by the
    /// triggers' `WHEN` clauses (an update that changes no watched column never gets here).
    pub fn function(
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
            partition::truncate_branch(
                log,
                &old_cols,
                &row_vals,
                name,
                &self.q(function.as_str()),
                &Event::Truncate.trigger_name(trigger_base),
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
        // readers' fallback poll finds the changes instead (see [`crate::wake`]).
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
                crate::wake::SLEEPER_TTL.as_secs()
            ),
            NotifyMode::Off => String::new(),
        };
        let prologue = if table.partitioned {
            partition::move_prologue(&self.q("change_id"), log, columns, table.oid)
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

    /// `CREATE TRIGGER` for one event; see the module docs for what the `WHEN` is for.
    pub fn trigger(
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ident::MAX_IDENT_BYTES;

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
