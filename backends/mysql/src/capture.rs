//! The capture of one watched table: its log table `epidemic_log_<table>` and its
//! `AFTER INSERT/UPDATE/DELETE` triggers `epidemic_<table>_insert|_update|_delete`, and
//! how Epidemic names and quotes the objects it creates.
//!
//! A log row holds an `AUTO_INCREMENT` id, the operation, the capture time in
//! microseconds and, in typed columns `old_<col>` / `new_<col>` (the source column's
//! own type and character set), the old and new values of every **captured** column:
//! the row's key columns and the watched ones. The key is always captured, so an UPDATE
//! that changes only the key is logged, and every change says which row it is about.
//! An UPDATE that changes no captured column writes nothing.
//!
//! Everything generated here runs on MySQL 5.0: no JSON functions, no `IF NOT EXISTS` on
//! triggers, no fractional-second types in the DDL (the time is a `BIGINT` filled by the
//! trigger, with microseconds where the server has `UTC_TIMESTAMP(6)`), one trigger per
//! table, event and timing. Names longer than MySQL's 64 characters are cut and given a
//! hash suffix. Foreign-key cascades, which fire no trigger on the child, are captured
//! by the parents' triggers in `cascade.rs`.

use crate::catalog::{CatalogTable, ExistingTrigger, SourceColumn};
use crate::conn::ServerInfo;

/// MySQL's limit for table, column and trigger names.
const MAX_NAME: usize = 64;

/// Backtick-quote an identifier (a backtick inside is doubled).
pub(crate) fn quote(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

/// A string literal. Only ever used with checked identifiers and comma-joined lists of
/// them; quotes and backslashes are escaped anyway.
pub(crate) fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

/// FNV-1a, for stable short name suffixes (not for security).
pub(crate) fn fnv1a32(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// `name` if it fits MySQL's 64 characters, else its first 55 characters, `_` and eight
/// hex digits of its hash. Names are ASCII (checked by `ident::check`).
pub(crate) fn fit(name: String) -> String {
    if name.len() <= MAX_NAME {
        return name;
    }
    format!("{}_{:08x}", &name[..MAX_NAME - 9], fnv1a32(&name))
}

pub(crate) fn log_table_name(source: &str) -> String {
    fit(format!("epidemic_log_{source}"))
}

/// Where a parent's BEFORE trigger puts the rows its cascade is about to touch in
/// `source` until the AFTER trigger moves them into the log (`cascade.rs`).
pub(crate) fn pend_table_name(source: &str) -> String {
    fit(format!("epidemic_pend_{source}"))
}

pub(crate) fn trigger_name(source: &str, event: &str) -> String {
    fit(format!("epidemic_{source}_{event}"))
}

pub(crate) fn log_column(prefix: &str, column: &str) -> String {
    fit(format!("{prefix}_{column}"))
}

/// The table's own triggers: (name suffix, event).
pub(crate) const EVENTS: [(&str, &str); 3] = [
    ("insert", "INSERT"),
    ("update", "UPDATE"),
    ("delete", "DELETE"),
];

/// The time a change was captured, in microseconds since the Unix epoch. Servers
/// without fractional seconds (before MySQL 5.6.4) give whole seconds.
pub(crate) fn now_expr(server: ServerInfo) -> &'static str {
    if server.fractional_seconds() {
        "TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6))"
    } else {
        "UNIX_TIMESTAMP() * 1000000"
    }
}

/// The type of a log column holding a source column's values: the same type, the same
/// character set, and always nullable (an INSERT has no old values). `NULL DEFAULT
/// NULL` also keeps MySQL 5.x from giving a `TIMESTAMP` column automatic
/// initialisation, which would replace a NULL with the current time.
pub(crate) fn log_type(c: &SourceColumn) -> String {
    match &c.charset {
        Some(cs) => format!("{} CHARACTER SET {cs} NULL DEFAULT NULL", c.column_type),
        None => format!("{} NULL DEFAULT NULL", c.column_type),
    }
}

/// The statement that creates the log table of `table` (when `existing` is `None`) or
/// brings it up to date with the captured columns: added columns, a source column's
/// changed type followed, a table converted to another engine by hand put back on
/// InnoDB (its rows would no longer roll back with the changes they record). `None`
/// when it is up to date. `existing` is the log table and its columns as they are.
pub(crate) fn plan_log_table(
    table: &str,
    columns: &[SourceColumn],
    existing: Option<(&CatalogTable, &[SourceColumn])>,
) -> Option<String> {
    let log_q = quote(&log_table_name(table));
    let wanted: Vec<(String, &SourceColumn)> = ["old", "new"]
        .iter()
        .flat_map(|p| columns.iter().map(move |c| (log_column(p, &c.name), c)))
        .collect();
    let Some((log, have)) = existing else {
        let cols: Vec<String> = wanted
            .iter()
            .map(|(name, col)| format!("    {} {},\n", quote(name), log_type(col)))
            .collect();
        return Some(format!(
            "CREATE TABLE {log_q} (\n    `id` BIGINT NOT NULL AUTO_INCREMENT,\n    `op` CHAR(1) CHARACTER SET ascii NOT NULL,\n    \
             `changed_at` BIGINT NOT NULL COMMENT 'microseconds since the Unix epoch',\n{}    PRIMARY KEY (`id`)\n) \
             ENGINE=InnoDB COMMENT={}",
            cols.concat(),
            literal(&format!("Epidemic: changes of {table}"))
        ));
    };
    let mut changes = Vec::new();
    if !log
        .engine
        .as_deref()
        .is_some_and(|e| e.eq_ignore_ascii_case("InnoDB"))
    {
        changes.push("ENGINE=InnoDB".to_owned());
    }
    for (name, col) in &wanted {
        match have.iter().find(|h| h.name.eq_ignore_ascii_case(name)) {
            None => changes.push(format!("ADD COLUMN {} {}", quote(name), log_type(col))),
            // The source column's type changed (a longer VARCHAR, say): follow it.
            Some(h) if !h.same_type(col) => {
                changes.push(format!("MODIFY COLUMN {} {}", quote(name), log_type(col)))
            }
            Some(_) => {}
        }
    }
    (!changes.is_empty()).then(|| format!("ALTER TABLE {log_q}\n    {}", changes.join(",\n    ")))
}

/// The bodies of the INSERT, UPDATE and DELETE triggers of `table` over its captured
/// `columns`, exactly as the server reports them back in
/// `information_schema.TRIGGERS.ACTION_STATEMENT`.
///
/// MariaDB fires AFTER UPDATE also for a row that `UPDATE IGNORE` skipped over a
/// duplicate key or a foreign-key error (the row keeps its old values). Where the table
/// has a key that identifies one row for certain (`unique_key`: the primary key or a NOT
/// NULL unique key, never a configured key, which may match several rows), the UPDATE
/// trigger therefore logs only when the row under the old key no longer holds the old
/// values: after a real update it holds the new ones (some captured column differs) or,
/// after a key change, the old key is empty (no other row can have moved there before
/// this row's trigger ran). One key lookup per logged update.
pub(crate) fn trigger_bodies(
    table: &str,
    unique_key: Option<&[String]>,
    columns: &[SourceColumn],
    server: ServerInfo,
) -> [String; 3] {
    let now = now_expr(server);
    let log_q = quote(&log_table_name(table));
    let list = |prefix: &str| -> String {
        columns
            .iter()
            .map(|c| quote(&log_column(prefix, &c.name)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let vals = |row: &str| -> String {
        columns
            .iter()
            .map(|c| format!("{row}.{}", quote(&c.name)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    // NULL-safe equality, on the bytes for character columns: under a
    // case-insensitive or PAD SPACE collation 'ann' = 'Ann ' holds, but a handler
    // that copies the value must still hear of the change.
    let same_as = |a: &str, b: &str| -> Vec<String> {
        columns
            .iter()
            .map(|c| {
                let q = quote(&c.name);
                if c.charset.is_some() {
                    format!("CAST({a}.{q} AS BINARY) <=> CAST({b}.{q} AS BINARY)")
                } else {
                    format!("{a}.{q} <=> {b}.{q}")
                }
            })
            .collect()
    };
    let same = same_as("OLD", "NEW");
    let mut changed = format!("NOT ({})", same.join(" AND "));
    if let Some(key) = unique_key {
        let at_old_key: Vec<String> = key
            .iter()
            .map(|k| format!("`epidemic_row`.{} = OLD.{}", quote(k), quote(k)))
            .chain(same_as("`epidemic_row`", "OLD"))
            .collect();
        changed.push_str(&format!(
            "\n        AND NOT EXISTS (SELECT 1 FROM {} AS `epidemic_row` WHERE {})",
            quote(table),
            at_old_key.join(" AND ")
        ));
    }
    [
        format!(
            "BEGIN\n    INSERT INTO {log_q} (`op`, `changed_at`, {}) VALUES ('I', {now}, {});\nEND",
            list("new"),
            vals("NEW")
        ),
        format!(
            "BEGIN\n    IF {changed} THEN\n        INSERT INTO {log_q} (`op`, `changed_at`, {}, {}) VALUES ('U', {now}, {}, {});\n    END IF;\nEND",
            list("old"),
            list("new"),
            vals("OLD"),
            vals("NEW")
        ),
        format!(
            "BEGIN\n    INSERT INTO {log_q} (`op`, `changed_at`, {}) VALUES ('D', {now}, {});\nEND",
            list("old"),
            vals("OLD")
        ),
    ]
}

/// The statements that replace the triggers of `table` with ones of these `bodies`, or
/// nothing when the ones there are current.
pub(crate) fn plan_triggers(
    table: &str,
    bodies: &[String; 3],
    triggers: &[ExistingTrigger],
) -> Vec<String> {
    let current = EVENTS.iter().zip(bodies).all(|((suffix, event), body)| {
        let name = trigger_name(table, suffix);
        triggers.iter().any(|t| {
            t.name == name
                && t.table == *table
                && t.event == *event
                && t.timing == "AFTER"
                && t.body == *body
        })
    });
    if current {
        return Vec::new();
    }
    // Between DROP TRIGGER and CREATE TRIGGER a write to the table would not be
    // captured. A WRITE lock on the table holds writers off for those few
    // milliseconds; DDL's implicit commits do not release table locks.
    let mut plan = vec![format!("LOCK TABLES {} WRITE", quote(table))];
    for (suffix, _) in EVENTS {
        plan.push(format!(
            "DROP TRIGGER IF EXISTS {}",
            quote(&trigger_name(table, suffix))
        ));
    }
    for ((suffix, event), body) in EVENTS.iter().zip(bodies) {
        plan.push(format!(
            "CREATE TRIGGER {} AFTER {event} ON {} FOR EACH ROW {body}",
            quote(&trigger_name(table, suffix)),
            quote(table)
        ));
    }
    plan.push("UNLOCK TABLES".to_owned());
    plan
}

/// The statements that drop the triggers of `table`.
pub(crate) fn drop_triggers(table: &str) -> Vec<String> {
    EVENTS
        .iter()
        .map(|(suffix, _)| {
            format!(
                "DROP TRIGGER IF EXISTS {}",
                quote(&trigger_name(table, suffix))
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_doubles_backticks() {
        assert_eq!(quote("order"), "`order`");
        assert_eq!(quote("a`b"), "`a``b`");
        assert_eq!(literal("it's"), "'it''s'");
    }

    #[test]
    fn long_names_fit_and_stay_distinct() {
        let a = "a".repeat(63);
        let b = format!("{}b", "a".repeat(62));
        let la = log_table_name(&a);
        let lb = log_table_name(&b);
        assert_eq!(la.len(), 64);
        assert!(la.starts_with("epidemic_log_aaa"));
        assert_ne!(la, lb);
        assert_eq!(la, log_table_name(&a), "stable");
        assert_eq!(log_table_name("users"), "epidemic_log_users");
        assert_eq!(trigger_name("users", "update"), "epidemic_users_update");
        assert!(trigger_name(&a, "delete").len() <= 64);
        assert!(log_column("old", &a).len() <= 64);
    }

    #[test]
    fn the_update_trigger_logs_a_change_of_any_captured_column() {
        let col = |n: &str| SourceColumn {
            name: n.into(),
            column_type: "int(11)".into(),
            charset: None,
        };
        let server = ServerInfo::parse("10.11.6-MariaDB");
        let [_, update, _] = trigger_bodies("t", None, &[col("id"), col("v")], server);
        assert!(
            update.contains("NOT (OLD.`id` <=> NEW.`id` AND OLD.`v` <=> NEW.`v`)"),
            "{update}"
        );
    }
}
