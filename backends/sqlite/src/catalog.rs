//! Reading the user's tables from SQLite's catalog: which tables and columns exist, in
//! the catalog's own spelling, and each table's key; `resolve` for the host.
//!
//! SQLite compares table and column names without regard to ASCII case. The backend
//! resolves every name to the catalog's spelling once (`sqlite_master`,
//! `pragma_table_info`) and uses that spelling everywhere: registry, log columns,
//! cursors, changes.
//!
//! Keys: a table's primary key is its `pragma_table_info` columns with `pk > 0`, in `pk`
//! order (an `INTEGER PRIMARY KEY`, a declared `PRIMARY KEY (..)`, a WITHOUT ROWID
//! table's key). A rowid table with no declared primary key has none for Epidemic: its
//! implicit rowid is no identity a handler can rely on (`VACUUM` may renumber rowids that
//! no `INTEGER PRIMARY KEY` aliases), so such a table needs `[table.NAME] key = [..]`.

use epidemic_plugin_sdk::backend::{kit, BackendError, ColumnType, Watch};
use epidemic_plugin_sdk::ident;
use rusqlite::{Connection, OptionalExtension};

use crate::error::sql_err;

/// An identifier in double quotes, inner quotes doubled.
pub(crate) fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// A string literal in single quotes, inner quotes doubled.
pub(crate) fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The catalog's spelling of table `name`, if the main database has it.
pub(crate) fn table_exists(conn: &Connection, name: &str) -> Result<Option<String>, BackendError> {
    conn.query_row(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name = ?1 COLLATE NOCASE",
        [name],
        |r| r.get(0),
    )
    .optional()
    .map_err(sql_err)
}

/// The table's columns in declaration order.
pub(crate) fn table_columns(conn: &Connection, table: &str) -> Result<Vec<String>, BackendError> {
    let mut stmt = conn
        .prepare("SELECT name FROM pragma_table_info(?1) ORDER BY cid")
        .map_err(sql_err)?;
    let cols = stmt
        .query_map([table], |r| r.get(0))
        .map_err(sql_err)?
        .collect::<Result<Vec<String>, _>>()
        .map_err(sql_err)?;
    Ok(cols)
}

/// The declared types of a table's columns, by name, as SQLite's type affinity reads
/// them (the rules of "Determination Of Column Affinity": INT, then CHAR/CLOB/TEXT, then
/// BLOB or none, then REAL/FLOA/DOUB, else NUMERIC). A NUMERIC column may hold integers,
/// reals or text, so it is `Other`: no filter type check applies to it.
pub(crate) fn column_types(
    conn: &Connection,
    table: &str,
) -> Result<Vec<(String, ColumnType)>, BackendError> {
    let mut stmt = conn
        .prepare("SELECT name, upper(type) FROM pragma_table_info(?1) ORDER BY cid")
        .map_err(sql_err)?;
    let cols = stmt
        .query_map([table], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })
        .map_err(sql_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(sql_err)?;
    Ok(cols
        .into_iter()
        .map(|(name, t)| {
            let kind = if t.contains("INT") {
                ColumnType::Int
            } else if t.contains("CHAR") || t.contains("CLOB") || t.contains("TEXT") {
                ColumnType::Text
            } else if t.contains("BLOB") || t.is_empty() {
                ColumnType::Bytes
            } else if t.contains("REAL") || t.contains("FLOA") || t.contains("DOUB") {
                ColumnType::Float
            } else {
                ColumnType::Other
            };
            (name, kind)
        })
        .collect())
}

/// The table's primary key columns in key order; empty for a rowid table without a
/// declared primary key (see the module docs).
pub(crate) fn primary_key(conn: &Connection, table: &str) -> Result<Vec<String>, BackendError> {
    let mut stmt = conn
        .prepare("SELECT name FROM pragma_table_info(?1) WHERE pk > 0 ORDER BY pk")
        .map_err(sql_err)?;
    let pk = stmt
        .query_map([table], |r| r.get(0))
        .map_err(sql_err)?
        .collect::<Result<Vec<String>, _>>()
        .map_err(sql_err)?;
    Ok(pk)
}

/// Whether the table is a WITHOUT ROWID table.
pub(crate) fn without_rowid(conn: &Connection, table: &str) -> Result<bool, BackendError> {
    Ok(conn
        .query_row(
            "SELECT wr FROM pragma_table_list WHERE schema = 'main' AND name = ?1",
            [table],
            |r| r.get(0),
        )
        .optional()
        .map_err(sql_err)?
        .unwrap_or(false))
}

/// `name`'s spelling among `columns`, matched without regard to case.
pub(crate) fn spelled<'a>(columns: &'a [String], name: &str) -> Option<&'a String> {
    columns.iter().find(|c| c.eq_ignore_ascii_case(name))
}

/// The key of `table` (catalog spelling, with its `columns`): the columns the config
/// names (`asked`), each checked to exist, or else the table's primary key; a table with
/// neither is refused, naming the `key = [..]` fix.
pub(crate) fn key(
    conn: &Connection,
    table: &str,
    columns: &[String],
    asked: &[String],
) -> Result<Vec<String>, BackendError> {
    if asked.is_empty() {
        let pk = primary_key(conn, table)?;
        if pk.is_empty() {
            return Err(kit::no_key(table));
        }
        return Ok(pk);
    }
    let mut key: Vec<String> = Vec::with_capacity(asked.len());
    for c in asked {
        ident::check("column", c)?;
        let name = spelled(columns, c).ok_or_else(|| kit::no_such_key_column(table, c))?;
        if !key.contains(name) {
            key.push(name.clone());
        }
    }
    Ok(key)
}

/// The watch with the table's and columns' catalog spelling and its key filled in; a
/// table the catalog does not have is kept as given, for install to report.
pub(crate) fn resolve(conn: &Connection, w: &Watch) -> Result<Watch, BackendError> {
    let Some(table) = table_exists(conn, &w.table)? else {
        return Ok(w.clone());
    };
    let existing = table_columns(conn, &table)?;
    let columns: Vec<String> = w
        .columns
        .iter()
        .map(|c| spelled(&existing, c).unwrap_or(c).clone())
        .collect();
    let key = key(conn, &table, &existing, &w.key)?;
    let declared = column_types(conn, &table)?;
    let types = columns
        .iter()
        .map(|c: &String| {
            declared
                .iter()
                .find(|(n, _)| n == c)
                .map_or(ColumnType::Missing, |(_, t)| *t)
        })
        .collect();
    Ok(Watch {
        table,
        columns,
        key,
        types,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch(table: &str, key: &[&str]) -> Watch {
        Watch {
            table: table.into(),
            columns: vec!["V".into()],
            key: key.iter().map(|c| c.to_string()).collect(),
            ..Watch::default()
        }
    }

    #[test]
    fn keys_come_from_the_primary_key_or_the_config() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE one (Id INTEGER PRIMARY KEY, v TEXT);
             CREATE TABLE two (a TEXT, b INT, v TEXT, PRIMARY KEY (b, a));
             CREATE TABLE wr (k TEXT PRIMARY KEY, v TEXT) WITHOUT ROWID;
             CREATE TABLE heap (a TEXT, v TEXT);",
        )
        .unwrap();
        let key = |w: Watch| resolve(&conn, &w).map(|w| w.key);
        assert_eq!(key(watch("ONE", &[])).unwrap(), ["Id"]);
        assert_eq!(key(watch("two", &[])).unwrap(), ["b", "a"]);
        assert_eq!(key(watch("wr", &[])).unwrap(), ["k"]);
        let err = key(watch("heap", &[])).unwrap_err().to_string();
        assert!(err.contains("table heap has no primary key"), "{err}");
        assert!(err.contains("[table.heap] key = ["), "{err}");
        assert_eq!(key(watch("heap", &["A"])).unwrap(), ["a"]);
        let err = key(watch("heap", &["nope"])).unwrap_err().to_string();
        assert!(err.contains("has no column nope"), "{err}");
        // A table that does not exist is install's to report.
        assert_eq!(key(watch("missing", &[])).unwrap(), Vec::<String>::new());
        assert_eq!(resolve(&conn, &watch("one", &[])).unwrap().columns, ["v"]);
    }
}
