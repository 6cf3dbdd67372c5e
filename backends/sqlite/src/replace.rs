//! REPLACE capture: the rows `INSERT OR REPLACE`, `REPLACE INTO` and `UPDATE OR REPLACE`
//! remove, delivered as DELETEs.
//!
//! Those statements delete the rows that hold the new row's primary or unique key
//! without firing DELETE triggers (unless `PRAGMA recursive_triggers` is on in the
//! writer's connection, which Epidemic does not control), and no trigger can tell which
//! conflict clause its statement has. So a BEFORE INSERT (and a BEFORE UPDATE that
//! changes a unique key) trigger copies every row that holds one of the new row's unique
//! keys into the scratch table `epidemic_replaced_<table>`, with the old values of every
//! captured column (the row's key columns first: they are the DELETE's key), and the
//! AFTER trigger of the same row logs a DELETE for each copied row that is gone by then
//! (or whose identity the new row took): a REPLACE removed it. With `OR IGNORE`,
//! `OR FAIL` and upserts nothing is gone, so nothing is logged; with `OR ABORT` /
//! `OR ROLLBACK` the copies are rolled back with the statement. The DELETE trigger
//! removes a row's copy, so a REPLACE under `recursive_triggers` logs its DELETE once. A
//! copy left over (an ignored row) is cleared by the next BEFORE trigger before it
//! matters.
//!
//! The unique keys come from the catalog: the rowid (or a WITHOUT ROWID table's primary
//! key), UNIQUE constraints and unique indexes, partial ones with their condition, each
//! column with the collation its index compares with. A unique index on an expression
//! cannot be matched; `status` warns about it.

use epidemic_plugin_sdk::backend::BackendError;
use rusqlite::Connection;

use crate::catalog::{primary_key, quote, table_columns, without_rowid};
use crate::error::sql_err;

/// The scratch table where a BEFORE trigger copies the rows a REPLACE may remove.
pub(crate) fn replaced_table(table: &str) -> String {
    format!("epidemic_replaced_{table}")
}

/// The alias of the user's table in the triggers' lookups.
const ROW: &str = "epidemic_row";

/// The WHERE clause of the statements that empty the scratch table. A DELETE without
/// one is SQLite's truncate optimization, which rewrites the table's root page even when
/// the table is empty: a page more in the WAL on every insert into a watched table (4
/// pages a commit instead of 3 for a one-row INSERT). With a WHERE clause an empty table is only read.
const CLEAR: &str = "WHERE 1";

/// How the REPLACE triggers find the rows a new row conflicts with.
#[derive(Debug)]
pub(crate) struct ReplaceKeys {
    /// SQL for the columns that identify a row: the rowid (bare: a quoted `"rowid"`
    /// that resolves to no column would be read as a string), or a WITHOUT ROWID
    /// table's primary key.
    identity: Vec<String>,
    /// Each unique key (rowid, primary key, UNIQUE constraints and unique indexes).
    keys: Vec<UniqueKey>,
    /// Unique indexes on expressions, which the triggers cannot match.
    pub unmatched: Vec<String>,
}

/// One unique key as the REPLACE triggers match it.
#[derive(Debug, PartialEq)]
struct UniqueKey {
    /// Each column's SQL and the collation the index compares it with. The collation is
    /// always spelled out: the column's own may differ, and then no index would serve
    /// the lookup.
    columns: Vec<(String, Option<String>)>,
    /// A partial index's WHERE clause, repeated in the lookup so that the index can
    /// serve it (a lookup that does not imply it scans the whole table).
    condition: Option<String>,
}

impl ReplaceKeys {
    /// The unique keys of `table`, from the catalog.
    pub fn read(conn: &Connection, table: &str) -> Result<ReplaceKeys, BackendError> {
        let without_rowid = without_rowid(conn, table)?;
        let columns = table_columns(conn, table)?;
        let mut keys = Vec::new();
        let identity: Vec<String> = if without_rowid {
            primary_key(conn, table)?.iter().map(|c| quote(c)).collect()
        } else {
            // A column may shadow `rowid`; SQLite keeps `_rowid_` and `oid` as spares.
            let alias = ["rowid", "_rowid_", "oid"]
                .into_iter()
                .find(|a| !columns.iter().any(|c| c.eq_ignore_ascii_case(a)))
                .ok_or_else(|| {
                    BackendError::Invalid(format!(
                        "table {table}: its columns rowid, _rowid_ and oid hide the rowid, which Epidemic needs to capture REPLACE; rename one of them"
                    ))
                })?;
            keys.push(UniqueKey {
                columns: vec![(alias.to_owned(), None)],
                condition: None,
            });
            vec![alias.to_owned()]
        };
        let mut unmatched = Vec::new();
        let indexes: Vec<(String, bool, Option<String>)> = {
            let mut stmt = conn
                .prepare(
                    "SELECT l.name, l.partial, m.sql FROM pragma_index_list(?1) AS l
                     LEFT JOIN sqlite_master AS m ON m.type = 'index' AND m.name = l.name
                     WHERE l.\"unique\" = 1 ORDER BY l.seq",
                )
                .map_err(sql_err)?;
            let rows = stmt
                .query_map([table], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, bool>(1)?,
                        r.get::<_, Option<String>>(2)?,
                    ))
                })
                .map_err(sql_err)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(sql_err)?;
            rows
        };
        for (index, partial, sql) in indexes {
            let mut stmt = conn
                .prepare("SELECT cid, name, coll FROM pragma_index_xinfo(?1) WHERE key = 1 ORDER BY seqno")
                .map_err(sql_err)?;
            let cols = stmt
                .query_map([&index], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, Option<String>>(1)?,
                        r.get::<_, Option<String>>(2)?,
                    ))
                })
                .map_err(sql_err)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(sql_err)?;
            let mut key = Vec::new();
            for (cid, name, coll) in cols {
                match (cid, name) {
                    (-1, _) if !without_rowid => key.push((identity[0].clone(), None)),
                    (c, Some(name)) if c >= 0 => key.push((quote(&name), coll)),
                    _ => {
                        unmatched.push(index.clone());
                        key.clear();
                        break;
                    }
                }
            }
            if key.is_empty() {
                continue;
            }
            // Without its condition a partial index is matched as if it were whole: a
            // row it does not cover is copied but, not being removed, never logged.
            let condition = match (partial, sql) {
                (true, Some(sql)) => {
                    partial_condition(&sql).filter(|c| condition_compiles(conn, table, c))
                }
                _ => None,
            };
            let key = UniqueKey {
                columns: key,
                condition,
            };
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
        Ok(ReplaceKeys {
            identity,
            keys,
            unmatched,
        })
    }

    /// Every column of any unique key, for "did this UPDATE change a unique key".
    fn key_columns(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for (c, _) in self.keys.iter().flat_map(|k| &k.columns) {
            if !out.contains(&c.as_str()) {
                out.push(c);
            }
        }
        out
    }

    /// The condition "this UPDATE changed a unique key", over `OLD` and `NEW`.
    pub fn unique_key_changed(&self) -> String {
        self.key_columns()
            .iter()
            .map(|c| format!("OLD.{c} IS NOT NEW.{c}"))
            .collect::<Vec<_>>()
            .join(" OR ")
    }

    /// For each unique key, the condition that `row` holds NEW's value of it. Each goes
    /// in a SELECT of its own: SQLite serves an OR of them from one index per term only
    /// when no term needs a collation other than its column's, and scans otherwise.
    fn conflicts(&self, row: &str) -> Vec<String> {
        self.keys
            .iter()
            .map(|k| {
                let mut parts: Vec<String> = k
                    .columns
                    .iter()
                    .map(|(c, coll)| match coll {
                        Some(coll) => format!("{row}.{c} = NEW.{c} COLLATE {}", quote(coll)),
                        None => format!("{row}.{c} = NEW.{c}"),
                    })
                    .collect();
                if let Some(cond) = &k.condition {
                    parts.push(format!("({cond})"));
                }
                parts.join(" AND ")
            })
            .collect()
    }

    /// The copy `copy` is of the row `image` (`OLD`, `NEW` or a table alias) names.
    fn same_row(&self, copy: &str, image: &str) -> String {
        self.identity
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{copy}.k_{i} = {image}.{c}"))
            .collect::<Vec<_>>()
            .join(" AND ")
    }

    /// Two images (table aliases, `OLD`, `NEW`) are of the same row.
    fn identity_eq(&self, a: &str, b: &str) -> String {
        self.identity
            .iter()
            .map(|c| format!("{a}.{c} = {b}.{c}"))
            .collect::<Vec<_>>()
            .join(" AND ")
    }

    fn copy_columns(&self) -> Vec<String> {
        (0..self.identity.len()).map(|i| format!("k_{i}")).collect()
    }
}

/// The REPLACE capture of one table: the SQL its scratch table and triggers are made of.
/// `capture` puts the AFTER-trigger parts into the log triggers it writes.
pub(crate) struct ReplaceCapture<'a> {
    keys: ReplaceKeys,
    /// The user's table, quoted.
    table: String,
    /// The captured columns (the row's key first), as the log stores them.
    columns: &'a [String],
    /// The log table, quoted.
    log: String,
    /// The scratch table, quoted.
    replaced: String,
}

impl<'a> ReplaceCapture<'a> {
    pub fn new(
        conn: &Connection,
        table: &str,
        columns: &'a [String],
        log: &str,
    ) -> Result<Self, BackendError> {
        Ok(ReplaceCapture {
            keys: ReplaceKeys::read(conn, table)?,
            table: quote(table),
            columns,
            log: quote(log),
            replaced: quote(&replaced_table(table)),
        })
    }

    /// The condition "this UPDATE changed a unique key".
    pub fn unique_key_changed(&self) -> String {
        self.keys.unique_key_changed()
    }

    fn olds(&self) -> Vec<String> {
        self.columns
            .iter()
            .map(|c| quote(&format!("o_{c}")))
            .collect()
    }

    /// The scratch table, made anew: it holds nothing between statements that matters.
    pub fn scratch_table(&self) -> [String; 2] {
        let replaced = &self.replaced;
        let columns: Vec<String> = self
            .keys
            .copy_columns()
            .into_iter()
            .chain(self.olds())
            .collect();
        [
            format!("DROP TABLE IF EXISTS {replaced}"),
            format!("CREATE TABLE {replaced} ({})", columns.join(", ")),
        ]
    }

    /// Copy the rows holding one of NEW's unique keys (`extra` narrows them), each once.
    fn copy_into(&self, extra: &str) -> String {
        let select = format!(
            "SELECT {}, {} FROM {} AS {ROW}",
            self.keys
                .identity
                .iter()
                .map(|c| format!("{ROW}.{c}"))
                .collect::<Vec<_>>()
                .join(", "),
            self.columns
                .iter()
                .map(|c| format!("{ROW}.{}", quote(c)))
                .collect::<Vec<_>>()
                .join(", "),
            self.table,
        );
        let selects: Vec<String> = self
            .keys
            .conflicts(ROW)
            .iter()
            .map(|cond| format!("{select} WHERE {extra}{cond}"))
            .collect();
        format!(
            "INSERT INTO {} ({}, {})\n    {};",
            self.replaced,
            self.keys.copy_columns().join(", "),
            self.olds().join(", "),
            selects.join("\n    UNION ")
        )
    }

    /// The BEFORE INSERT trigger `name` that copies the rows the new row conflicts with.
    pub fn before_insert(&self, name: &str) -> String {
        format!(
            "CREATE TRIGGER {name} BEFORE INSERT ON {} FOR EACH ROW BEGIN\n    DELETE FROM {} {CLEAR};\n    {}\nEND",
            self.table,
            self.replaced,
            self.copy_into(""),
        )
    }

    /// The BEFORE UPDATE trigger `name`: for an UPDATE that changes a unique key, copy the
    /// other rows the new image conflicts with.
    pub fn before_update(&self, name: &str) -> String {
        format!(
            "CREATE TRIGGER {name} BEFORE UPDATE ON {} FOR EACH ROW WHEN {} BEGIN\n    DELETE FROM {} {CLEAR};\n    {}\nEND",
            self.table,
            self.unique_key_changed(),
            self.replaced,
            self.copy_into(&format!("NOT ({}) AND ", self.keys.identity_eq(ROW, "OLD"))),
        )
    }

    /// For the AFTER INSERT trigger: log a DELETE for each copied row that is gone, or
    /// whose identity the new row took (the statement replaced it), then clear the copies.
    pub fn after_insert(&self) -> String {
        format!(
            "{}\n    DELETE FROM {} {CLEAR};",
            self.log_replaced(""),
            self.replaced
        )
    }

    /// For the AFTER UPDATE trigger: the same for an UPDATE that changed a unique key. An
    /// upsert's DO UPDATE keeps the row it copied (OLD), even if it moves it.
    pub fn after_update(&self) -> String {
        let changed = self.unique_key_changed();
        format!(
            "{}\n    DELETE FROM {} WHERE {changed};",
            self.log_replaced(&format!(
                "({changed}) AND NOT ({}) AND ",
                self.keys.same_row("epidemic_copy", "OLD")
            )),
            self.replaced,
        )
    }

    /// For the AFTER DELETE trigger: under `recursive_triggers` a REPLACE fires it for the
    /// row it removes; its copy goes, so the AFTER INSERT/UPDATE trigger does not log it
    /// again.
    pub fn after_delete(&self) -> String {
        format!(
            "DELETE FROM {} WHERE {};",
            self.replaced,
            self.keys
                .identity
                .iter()
                .enumerate()
                .map(|(i, c)| format!("k_{i} = OLD.{c}"))
                .collect::<Vec<_>>()
                .join(" AND ")
        )
    }

    fn log_replaced(&self, extra: &str) -> String {
        let olds = self.olds().join(", ");
        format!(
            "INSERT INTO {} (op, {olds}) SELECT 'D', {olds} FROM {} AS epidemic_copy\n    \
             WHERE {extra}({} OR NOT EXISTS (SELECT 1 FROM {} AS {ROW} WHERE {}))\n    ORDER BY epidemic_copy.rowid;",
            self.log,
            self.replaced,
            self.keys.same_row("epidemic_copy", "NEW"),
            self.table,
            self.keys.same_row("epidemic_copy", ROW),
        )
    }
}

/// A partial index's condition, as read from its SQL, is a valid filter on the table (so
/// a misread can only cost speed, never a failing install).
fn condition_compiles(conn: &Connection, table: &str, condition: &str) -> bool {
    conn.prepare(&format!(
        "SELECT 1 FROM {} AS {ROW} WHERE ({condition})",
        quote(table)
    ))
    .is_ok()
}

/// The WHERE clause of a `CREATE UNIQUE INDEX ... ON t (...) WHERE ...` statement: what
/// follows the column list (the first parenthesis outside quotes).
fn partial_condition(sql: &str) -> Option<String> {
    let mut depth = 0usize;
    let mut quote: Option<char> = None;
    let mut end = None;
    for (i, c) in sql.char_indices() {
        match quote {
            // A doubled quote closes and reopens: same result.
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None => match c {
                '\'' | '"' | '`' => quote = Some(c),
                '[' => quote = Some(']'),
                '(' => depth += 1,
                ')' if depth > 0 => {
                    depth -= 1;
                    if depth == 0 {
                        end = Some(i + 1);
                        break;
                    }
                }
                _ => {}
            },
        }
    }
    let rest = sql.get(end?..)?.trim_start();
    let head = rest.get(..5)?;
    let cond = rest.get(5..)?.trim();
    (head.eq_ignore_ascii_case("where") && !cond.is_empty()).then(|| cond.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use epidemic_plugin_sdk::backend::Watch;

    use crate::install::plan_install;

    #[test]
    fn partial_index_conditions() {
        assert_eq!(
            partial_condition("CREATE UNIQUE INDEX i ON t (a, b) WHERE b > 0").as_deref(),
            Some("b > 0")
        );
        assert_eq!(
            partial_condition(
                "CREATE UNIQUE INDEX \"i(\" ON \"t)\" (a, lower(b)) where (a IS NOT NULL)"
            )
            .as_deref(),
            Some("(a IS NOT NULL)")
        );
        assert_eq!(partial_condition("CREATE UNIQUE INDEX i ON t (a)"), None);
    }

    fn install(conn: &Connection, table: &str, columns: &[&str]) -> Vec<String> {
        let watch = Watch::new(table, columns.iter().copied());
        let plan = plan_install(conn, &[watch]).unwrap();
        for stmt in &plan {
            conn.execute_batch(stmt).unwrap();
        }
        plan
    }

    fn log(conn: &Connection) -> Vec<(String, Option<i64>, Option<i64>)> {
        let mut stmt = conn
            .prepare("SELECT op, \"o_id\", \"n_id\" FROM epidemic_log_t ORDER BY id")
            .unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// An INSERT that replaces nothing writes the pages of its row, of its log row and of
    /// the log's AUTOINCREMENT counter, and not the REPLACE capture's scratch table
    /// (emptying it with a bare DELETE rewrote its root page on every insert).
    #[test]
    fn an_insert_that_replaces_nothing_does_not_write_the_scratch_table() {
        let path = std::env::temp_dir().join(format!(
            "epidemic-sqlite-replace-{}-pages.db",
            std::process::id()
        ));
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        conn.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        conn.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT);")
            .unwrap();
        install(&conn, "t", &["v"]);
        conn.execute_batch("INSERT INTO t VALUES (1, 'a');")
            .unwrap();
        let frames = |conn: &Connection| -> i64 {
            conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get(1))
                .unwrap()
        };
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
        assert_eq!(frames(&conn), 0);
        conn.execute_batch("INSERT INTO t VALUES (2, 'b');")
            .unwrap();
        assert_eq!(frames(&conn), 3, "pages written by one INSERT");
        conn.execute_batch("INSERT OR REPLACE INTO t VALUES (2, 'c');")
            .unwrap();
        assert_eq!(
            log(&conn)[1..],
            [
                ("I".into(), None, Some(2)),
                ("D".into(), Some(2), None),
                ("I".into(), None, Some(2)),
            ]
        );
        drop(conn);
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
    }

    /// The REPLACE triggers in-process: a partial unique index and an index whose
    /// collation differs from its column's are matched, and use their indexes.
    #[test]
    fn replace_through_partial_and_collated_indexes() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE t (id INTEGER PRIMARY KEY, email TEXT COLLATE NOCASE, dom TEXT, q INTEGER);
             CREATE UNIQUE INDEX t_email ON t (email COLLATE BINARY);
             CREATE UNIQUE INDEX t_dom ON t (dom) WHERE q > 0;",
        )
        .unwrap();
        let plan = install(&conn, "t", &["id"]);
        let before = plan.iter().find(|s| s.contains("BEFORE INSERT")).unwrap();
        assert!(before.contains("(q > 0)"), "{before}");
        assert!(before.contains("COLLATE \"BINARY\""), "{before}");
        conn.execute_batch(
            "INSERT INTO t VALUES (1, 'a', 'x', 1), (2, 'A', 'y', 0), (3, 'c', 'y', 0);
             INSERT OR REPLACE INTO t VALUES (4, 'd', 'x', 1);  -- replaces 1 through t_dom
             INSERT OR REPLACE INTO t VALUES (5, 'a', 'y', 0);  -- replaces nothing: 'a' <> 'A' in BINARY, q = 0 is outside t_dom
             INSERT OR REPLACE INTO t VALUES (6, 'A', 'z', 0);  -- replaces 2 through t_email",
        )
        .unwrap();
        assert_eq!(
            log(&conn),
            vec![
                ("I".into(), None, Some(1)),
                ("I".into(), None, Some(2)),
                ("I".into(), None, Some(3)),
                ("D".into(), Some(1), None),
                ("I".into(), None, Some(4)),
                ("I".into(), None, Some(5)),
                ("D".into(), Some(2), None),
                ("I".into(), None, Some(6)),
            ]
        );
        // The lookup the BEFORE INSERT trigger makes, with NEW's values bound: no scan
        // (of a table big enough for the planner to care).
        conn.execute_batch(
            "WITH RECURSIVE n(i) AS (SELECT 100 UNION ALL SELECT i + 1 FROM n WHERE i < 300)
             INSERT INTO t SELECT i, 'e' || i, 'd' || i, i FROM n;",
        )
        .unwrap();
        let lookups: Vec<String> = before
            .split("FROM \"t\" AS epidemic_row")
            .skip(1)
            .map(|s| {
                s.split("\n")
                    .next()
                    .unwrap()
                    .trim_end_matches(';')
                    .replace("NEW.rowid", "?1")
                    .replace("NEW.\"email\"", "?1")
                    .replace("NEW.\"dom\"", "?1")
            })
            .collect();
        assert_eq!(lookups.len(), 3, "{before}");
        for lookup in lookups {
            let plan: Vec<String> = conn
                .prepare(&format!(
                    "EXPLAIN QUERY PLAN SELECT 1 FROM \"t\" AS epidemic_row {lookup}"
                ))
                .unwrap()
                .query_map([1], |r| r.get::<_, String>(3))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            assert!(
                plan.iter().all(|step| step.starts_with("SEARCH")),
                "{plan:?} for {lookup}"
            );
        }
    }

    /// A WITHOUT ROWID table: the primary key is the identity; UPDATE OR REPLACE through
    /// the primary key and through a unique column, with and without recursive triggers.
    /// The replaced rows' copies carry the key columns, which the DELETEs' keys come from.
    #[test]
    fn without_rowid_update_or_replace() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE t (a TEXT, b INTEGER, u TEXT UNIQUE, PRIMARY KEY (a, b)) WITHOUT ROWID;",
        )
        .unwrap();
        install(&conn, "t", &["u"]);
        conn.execute_batch(
            "INSERT INTO t VALUES ('x', 1, 'p'), ('x', 2, 'q'), ('y', 1, 'r');
             UPDATE OR REPLACE t SET b = 2 WHERE a = 'x' AND b = 1;  -- removes ('x', 2)
             UPDATE OR REPLACE t SET u = 'p' WHERE a = 'y';          -- removes ('x', 2, 'p')
             PRAGMA recursive_triggers = ON;
             INSERT OR REPLACE INTO t VALUES ('y', 1, 's');          -- removes ('y', 1) once",
        )
        .unwrap();
        let mut stmt = conn
            .prepare(
                "SELECT op, \"o_a\" || \"o_b\", \"o_u\", \"n_u\" FROM epidemic_log_t ORDER BY id",
            )
            .unwrap();
        type Row = (String, Option<String>, Option<String>, Option<String>);
        let got: Vec<Row> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let s = |v: Option<&str>| v.map(str::to_owned);
        let row = |op: &str, k: Option<&str>, o: Option<&str>, n: Option<&str>| {
            (op.to_owned(), s(k), s(o), s(n))
        };
        assert_eq!(
            got,
            vec![
                row("I", None, None, Some("p")),
                row("I", None, None, Some("q")),
                row("I", None, None, Some("r")),
                row("D", Some("x2"), Some("q"), None),
                row("U", Some("x1"), Some("p"), Some("p")),
                row("D", Some("x2"), Some("p"), None),
                row("U", Some("y1"), Some("r"), Some("p")),
                row("D", Some("y1"), Some("p"), None),
                row("I", None, None, Some("s")),
            ]
        );
    }
}
