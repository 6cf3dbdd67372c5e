//! What is PostgreSQL's own in capturing a partitioned table: a row's move to another
//! partition, and a `TRUNCATE` of one partition. Row triggers on a partitioned table are
//! cloned onto every partition (PostgreSQL 13+); statement triggers are not.
//!
//! # TRUNCATE
//!
//! A `TRUNCATE` of one partition fires only that partition's statement triggers, so
//! every leaf partition gets a `BEFORE TRUNCATE` trigger of its own that logs its rows
//! as deletes ([`plan_leaf_triggers`]); the parent's logs the rows of partitions created
//! since the last install, which have none yet ([`truncate_branch`]), and `status` names
//! those partitions until install gives them one.
//!
//! # Moves between partitions
//!
//! An UPDATE that moves a row to another partition is carried out as a DELETE from
//! the old partition and an INSERT into the new one: PostgreSQL 15 fires the row
//! triggers BEFORE UPDATE, BEFORE DELETE (old partition), BEFORE INSERT (new one),
//! one row after the other, and then, at the end of the statement, AFTER DELETE and
//! AFTER INSERT for each moved row, again one right after the other, and no AFTER
//! UPDATE. So the log gets a delete and an insert, and a handler would remove a
//! mailbox and create an empty one. The move triggers give it back the update:
//!
//! - the row trigger (BEFORE, every row event) recognises each move: BEFORE UPDATE
//!   notes the old row, BEFORE DELETE of that same row right after it says "moving",
//!   and the BEFORE INSERT that follows counts one move;
//! - the statement trigger BEFORE UPDATE notes where the statement's log rows begin
//!   (the shared sequence's last value) and zeroes the count;
//! - the statement trigger AFTER UPDATE, which runs after every row trigger of the
//!   statement, pairs each logged delete with the insert logged right after it and,
//!   if there are exactly as many pairs as moves counted, merges each pair into one
//!   update (at the delete's id, so per-row order holds), dropping it if no captured
//!   column changed (a move changes the key only when the partition key is in it). Otherwise (a `MERGE` that deletes and inserts besides moving
//!   rows, a row a user's BEFORE trigger skipped) it leaves the deletes and inserts
//!   as they are: never an update that did not happen.
//!
//! The notes are transaction-local settings (`set_config(.., true)`, undone with a
//! rolled-back subtransaction like the log rows they describe) named after the table
//! and the trigger depth, so a statement run by a trigger inside another keeps its
//! own. A sub-partitioned partition updated directly, or a direct UPDATE of a
//! partition, fires no statement trigger of the watched table: moves there (only the
//! former can move rows) stay a delete and an insert.

use postgres::GenericClient;

use crate::capture::{list, TRIGGER_LAYOUT};
use crate::error::PgError;
use crate::ident::{quote_literal, Ident, TableName};
use crate::registry::RegisteredColumn;

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

/// The statements that give every leaf partition of `root_oid` the current TRUNCATE
/// trigger named `trigger` firing `schema.function()`; nothing for leaves that have it.
pub(crate) fn plan_leaf_triggers(
    client: &mut impl GenericClient,
    root_oid: u32,
    schema: &Ident,
    function: &Ident,
    trigger: &Ident,
) -> Result<Vec<String>, PgError> {
    let mut plan = Vec::new();
    let leaves = partition_leaves(client, root_oid, schema, function, trigger)?;
    for leaf in leaves.iter().filter(|l| !l.is_current()) {
        plan.push(format!(
            "DROP TRIGGER IF EXISTS {} ON {}",
            trigger.quoted(),
            leaf.quoted
        ));
        plan.push(format!(
            "CREATE TRIGGER {} BEFORE TRUNCATE ON {} FOR EACH STATEMENT\nEXECUTE FUNCTION {}.{}()",
            trigger.quoted(),
            leaf.quoted,
            schema.quoted(),
            function.quoted()
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
    Ok(plan)
}

/// The capture function's TRUNCATE branch for a partitioned table. The partitions' own
/// TRUNCATE triggers log their rows (each fires whether the partition or the parent was
/// named); the parent's logs the rows of partitions that have no working trigger of
/// their own (created since the last install), so that truncating the parent captures
/// them too. `function`: the capture function, qualified and quoted.
pub(crate) fn truncate_branch(
    log: &str,
    old_cols: &str,
    row_vals: &str,
    name: &TableName,
    function: &str,
    trigger: &Ident,
) -> String {
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
        trigger = quote_literal(trigger.as_str()),
        func = quote_literal(&format!("{function}()")),
        template = quote_literal(&template),
    )
}

/// The start of a partitioned table's capture function, up to its `BEGIN` and the
/// branches of the move triggers (see the module docs). `sequence`: the shared id
/// sequence, qualified and quoted.
pub(crate) fn move_prologue(
    sequence: &str,
    log: &str,
    columns: &[RegisteredColumn],
    oid: u32,
) -> String {
    let set_new = list(columns, |c| {
        format!("{col} = i.{col}", col = c.new_column.quoted())
    });
    let old_text = list(columns, |c| format!("{}::text", c.old_column.quoted()));
    let new_text = list(columns, |c| format!("{}::text", c.new_column.quoted()));
    let seq = sequence;
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
