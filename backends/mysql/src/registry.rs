//! The registry of watched tables, `epidemic_watch`, as every role but install reads
//! it: per table its log table, the captured columns, which of them are the key, and
//! the log's identity (see `install.rs`, which writes it). A damaged row never becomes
//! SQL: names are checked as identifiers when read.

use std::sync::Arc;

use epidemic_plugin_sdk::backend::BackendError;
use epidemic_plugin_sdk::ident;
use mysql::prelude::Queryable;
use mysql::Conn;

use crate::catalog::MySqlCatalog;
use crate::error::{server_code, sql_err, ER_BAD_FIELD_ERROR};

/// A watched table's log, as the registry describes it.
#[derive(Debug, Clone)]
pub(crate) struct MySqlLogTable {
    pub source_table: String,
    pub log_table: String,
    /// The captured columns: the key columns and the watched ones.
    pub columns: Arc<[String]>,
    /// The key columns, shared by every change of the table. Empty only in a registry
    /// row of a version before keys, until the next install.
    pub key: Arc<[String]>,
    /// Where each key column is in `columns`.
    pub key_at: Vec<usize>,
    /// The log's identity (see the module docs); `None` until an install of this
    /// version gave the log one.
    pub identity: Option<String>,
}

impl MySqlLogTable {
    /// A registry row, checked: the row is ours, but a damaged one must not become SQL.
    pub fn from_row(
        source: String,
        log: String,
        columns: &str,
        key: Option<&str>,
        identity: Option<String>,
    ) -> Result<MySqlLogTable, BackendError> {
        let split = |s: &str| -> Vec<String> {
            s.split(',')
                .filter(|c| !c.is_empty())
                .map(str::to_owned)
                .collect()
        };
        let columns = split(columns);
        let key = key.map(split).unwrap_or_default();
        let damaged = |why: String| {
            BackendError::Other(format!(
                "epidemic_watch row for {source:?} is damaged: {why}"
            ))
        };
        ident::check("table", &source)
            .and_then(|()| columns.iter().try_for_each(|c| ident::check("column", c)))
            .map_err(|e| damaged(e.to_string()))?;
        if !log.starts_with("epidemic_log_") || log.contains('`') {
            return Err(damaged(format!("unexpected log table {log:?}")));
        }
        if identity
            .as_deref()
            .is_some_and(|i| !i.chars().all(|c| c.is_ascii_alphanumeric()))
        {
            return Err(damaged(format!("unexpected log identity {identity:?}")));
        }
        let key_at = key
            .iter()
            .map(|k| {
                columns
                    .iter()
                    .position(|c| c == k)
                    .ok_or_else(|| damaged(format!("key column {k} is not captured")))
            })
            .collect::<Result<Vec<usize>, _>>()?;
        Ok(MySqlLogTable {
            source_table: source,
            log_table: log,
            columns: columns.into(),
            key: key.into(),
            key_at,
            identity,
        })
    }
}

pub(crate) fn installed(conn: &mut Conn) -> Result<bool, BackendError> {
    MySqlCatalog::new(conn).table_exists("epidemic_watch")
}

/// source_table, log_table, columns, key_columns, log_identity.
type RegistryRow = (String, String, String, Option<String>, Option<String>);

/// Registry rows matching `filter` (a condition on `source_table`), as they are. A
/// registry made before keys and identities has neither column until the next install.
fn registry_rows(
    conn: &mut Conn,
    filter: &str,
    table: Option<&str>,
) -> Result<Vec<MySqlLogTable>, BackendError> {
    if !installed(conn)? {
        return Ok(Vec::new());
    }
    let select = |columns: &str| {
        format!("SELECT {columns} FROM epidemic_watch WHERE {filter} ORDER BY source_table")
    };
    let params: Vec<mysql::Value> = table.into_iter().map(Into::into).collect();
    let rows: Vec<RegistryRow> = match conn.exec(
        select("source_table, log_table, `columns`, key_columns, log_identity"),
        params.clone(),
    ) {
        Ok(rows) => rows,
        Err(e) if server_code(&e) == Some(ER_BAD_FIELD_ERROR) => conn
            .exec::<(String, String, String), _, _>(
                select("source_table, log_table, `columns`"),
                params,
            )
            .map_err(sql_err)?
            .into_iter()
            .map(|(s, l, c)| (s, l, c, None, None))
            .collect(),
        Err(e) => return Err(sql_err(e)),
    };
    rows.into_iter()
        .map(|(s, l, c, k, i)| MySqlLogTable::from_row(s, l, &c, k.as_deref(), i))
        .collect()
}

/// The registry entry for a source table, if it is watched.
pub(crate) fn watched(conn: &mut Conn, table: &str) -> Result<Option<MySqlLogTable>, BackendError> {
    Ok(registry_rows(conn, "source_table = ?", Some(table))?
        .into_iter()
        .next())
}

/// Every registry entry, by table name.
pub(crate) fn all_watched(conn: &mut Conn) -> Result<Vec<MySqlLogTable>, BackendError> {
    registry_rows(conn, "1 = 1", None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn damaged_registry_rows_are_refused() {
        let row = |cols: &str, key: Option<&str>, log: &str, ident: Option<&str>| {
            MySqlLogTable::from_row(
                "users".into(),
                log.into(),
                cols,
                key,
                ident.map(str::to_owned),
            )
        };
        let ok = row("id,a,b", Some("id"), "epidemic_log_users", Some("0f3a")).unwrap();
        assert_eq!(ok.key_at, vec![0]);
        assert_eq!(&ok.key[..], ["id".to_owned()]);
        // A registry of a version before keys.
        assert!(row("a,b", None, "epidemic_log_users", None)
            .unwrap()
            .key
            .is_empty());
        assert!(row("a,b`; DROP", None, "epidemic_log_users", None).is_err());
        assert!(row("a", None, "users", None).is_err());
        assert!(row("a,b", Some("c"), "epidemic_log_users", None).is_err());
        assert!(row("a", None, "epidemic_log_users", Some("x'; --")).is_err());
    }
}
