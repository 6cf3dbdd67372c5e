//! Reading the user's side of the database from `information_schema`: tables (their
//! catalog spelling, type and engine), columns, keys, triggers and foreign keys, and
//! [`MySqlCatalog::resolve`], which gives the host every name in the catalog's spelling
//! and every watch its key.
//!
//! Table and column names are case-insensitive in MySQL's catalog (or file names, with
//! `lower_case_table_names = 0`): names are resolved to the catalog's spelling once and
//! that spelling is used everywhere after, in the log, the registry and the triggers.
//!
//! A row's key is the table's primary key (`STATISTICS`, `INDEX_NAME = 'PRIMARY'`, in
//! `SEQ_IN_INDEX` order) unless the config names other columns. A table with neither is
//! refused: a change without a key cannot say which row it is about.

use epidemic_plugin_sdk::backend::{kit, BackendError, ColumnType, Watch};
use epidemic_plugin_sdk::ident;
use mysql::prelude::Queryable;
use mysql::Conn;

use crate::capture::quote;
use crate::cascade::{FkRule, ForeignKey};
use crate::error::sql_err;

/// A column of a user's table, as `information_schema.COLUMNS` describes it.
#[derive(Debug, Clone)]
pub(crate) struct SourceColumn {
    pub name: String,
    /// `varchar(255)`, `int(10) unsigned`, `enum('a','b')`.
    pub column_type: String,
    /// `utf8mb4` for character columns, `None` otherwise.
    pub charset: Option<String>,
}

impl SourceColumn {
    /// What kind of value the reader delivers for this column (for the host's row-filter
    /// check): integers (but a `bigint unsigned`, which may not fit), exact decimals
    /// (as text), floats, character data, binary data; dates, times, bits: other.
    pub fn kind(&self) -> ColumnType {
        let t = self.column_type.to_ascii_lowercase();
        if t.contains("int") {
            if t.starts_with("bigint") && t.contains("unsigned") {
                ColumnType::Other
            } else {
                ColumnType::Int
            }
        } else if t.starts_with("decimal") || t.starts_with("numeric") {
            ColumnType::Decimal
        } else if t.starts_with("float") || t.starts_with("double") || t.starts_with("real") {
            ColumnType::Float
        } else if self.charset.is_some() {
            ColumnType::Text
        } else if t.contains("binary") || t.contains("blob") {
            ColumnType::Bytes
        } else {
            ColumnType::Other
        }
    }

    pub fn same_type(&self, other: &SourceColumn) -> bool {
        self.column_type.eq_ignore_ascii_case(&other.column_type) && self.charset == other.charset
    }
}

/// A column as a backfill's key needs to know it (`snapshot.rs`).
#[derive(Debug, Clone)]
pub(crate) struct KeyColumn {
    pub name: String,
    /// `int`, `varchar`, `decimal`: `information_schema.COLUMNS.DATA_TYPE`.
    pub data_type: String,
    /// `int(10) unsigned`, for messages.
    pub column_type: String,
    pub nullable: bool,
    pub charset: Option<String>,
    pub collation: Option<String>,
}

/// A trigger of the current database.
#[derive(Debug, Clone)]
pub(crate) struct ExistingTrigger {
    pub name: String,
    pub timing: String,
    pub event: String,
    pub table: String,
    /// `ACTION_STATEMENT`: the body exactly as the server reports it back.
    pub body: String,
}

/// A table as `information_schema.TABLES` describes it.
#[derive(Debug, Clone)]
pub(crate) struct CatalogTable {
    pub name: String,
    /// `BASE TABLE`, `VIEW`, `SEQUENCE`.
    pub kind: String,
    pub engine: Option<String>,
    pub transactional: bool,
}

/// The catalog of the URL's database, read through one connection.
pub(crate) struct MySqlCatalog<'c> {
    conn: &'c mut Conn,
}

impl<'c> MySqlCatalog<'c> {
    pub fn new(conn: &'c mut Conn) -> Self {
        MySqlCatalog { conn }
    }

    /// Tables of the current database whose name equals `name` without regard to case,
    /// with their type and engine. The comparison goes through `LOWER()` on purpose: with
    /// `lower_case_table_names = 0` an equality on `TABLE_NAME` becomes a case-sensitive
    /// file lookup, which misses `Mail_Users` when asked for `mail_users`.
    pub fn tables_named(&mut self, name: &str) -> Result<Vec<CatalogTable>, BackendError> {
        const SELECT: &str =
            "SELECT TABLE_NAME, TABLE_TYPE, ENGINE FROM information_schema.TABLES \
             WHERE TABLE_SCHEMA = DATABASE() AND ";
        // The exact name first: cheap (one table opened), and the usual case.
        let exact = self.catalog_rows(&format!("{SELECT}TABLE_NAME = ?"), name)?;
        if exact.iter().any(|t| t.name == name) {
            return Ok(exact);
        }
        self.catalog_rows(&format!("{SELECT}LOWER(TABLE_NAME) = LOWER(?)"), name)
    }

    fn catalog_rows(&mut self, sql: &str, name: &str) -> Result<Vec<CatalogTable>, BackendError> {
        let rows: Vec<(String, String, Option<String>)> =
            self.conn.exec(sql, (name,)).map_err(sql_err)?;
        let mut out = Vec::with_capacity(rows.len());
        for (name, kind, engine) in rows {
            let transactional = match &engine {
                Some(e) => self.engine_transactional(e)?,
                None => false,
            };
            out.push(CatalogTable {
                name,
                kind,
                engine,
                transactional,
            });
        }
        Ok(out)
    }

    /// Whether the server has `engine` enabled and it is transactional. MySQL 5.0 has no
    /// `information_schema.ENGINES`; there the engines known to be transactional count.
    pub fn engine_transactional(&mut self, engine: &str) -> Result<bool, BackendError> {
        match self.conn.exec_first::<Option<String>, _, _>(
            "SELECT TRANSACTIONS FROM information_schema.ENGINES WHERE ENGINE = ?",
            (engine,),
        ) {
            Ok(row) => Ok(row.flatten().as_deref() == Some("YES")),
            Err(_) => Ok(["InnoDB", "TokuDB", "RocksDB", "ndbcluster"]
                .iter()
                .any(|e| e.eq_ignore_ascii_case(engine))),
        }
    }

    /// Whether a table of exactly this name exists (Epidemic's own tables, whose names
    /// it made from catalog spellings).
    pub fn table_exists(&mut self, name: &str) -> Result<bool, BackendError> {
        let found: Vec<String> = self
            .conn
            .exec(
                "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?",
                (name,),
            )
            .map_err(sql_err)?;
        Ok(found.iter().any(|t| t == name))
    }

    /// The catalog's entry for a user's table as the config names it: the exact name,
    /// else the one table whose name differs only in case. Table names are
    /// case-insensitive with `lower_case_table_names` 1 or 2 (the catalog then holds one
    /// spelling); with 0 they are file names, but a handler that wrote `mail_users` for
    /// the only table `Mail_Users` still means that table.
    pub fn catalog_table(&mut self, name: &str) -> Result<CatalogTable, BackendError> {
        let mut found = self.tables_named(name)?;
        let pick = match found.iter().position(|t| t.name == name) {
            Some(i) => found.swap_remove(i),
            None if found.len() == 1 => found.remove(0),
            None if found.is_empty() => {
                return Err(BackendError::Invalid(format!(
                    "table {name} does not exist"
                )))
            }
            None => {
                let names: Vec<&str> = found.iter().map(|t| t.name.as_str()).collect();
                return Err(BackendError::Invalid(format!(
                    "table {name} is ambiguous: {} differ only in case; name one exactly",
                    names.join(" and ")
                )));
            }
        };
        if pick.kind != "BASE TABLE" {
            return Err(BackendError::Invalid(format!(
                "table {} is a {}: only base tables can have triggers",
                pick.name,
                pick.kind.to_ascii_lowercase()
            )));
        }
        Ok(pick)
    }

    /// [`Self::catalog_table`], refusing a table whose engine is not transactional: a
    /// rolled-back write would keep its row change while its InnoDB log row goes, and
    /// concurrent writes could be logged out of order.
    pub fn resolve_table(&mut self, name: &str) -> Result<String, BackendError> {
        let t = self.catalog_table(name)?;
        if !t.transactional {
            let engine = t.engine.as_deref().unwrap_or("unknown");
            return Err(BackendError::Invalid(format!(
                "table {} uses the {engine} engine, which is not transactional (a rolled-back write would \
                 keep its change and lose its log row); convert it first: ALTER TABLE {} ENGINE=InnoDB",
                t.name,
                quote(&t.name)
            )));
        }
        Ok(t.name)
    }

    /// For `status`: why a watched table's engine cannot be captured correctly (it was
    /// converted after install), if it cannot.
    pub fn engine_problem(&mut self, table: &str) -> Result<Option<String>, BackendError> {
        match self.resolve_table(table) {
            Err(BackendError::Invalid(why)) if why.contains("not transactional") => Ok(Some(why)),
            Err(BackendError::Invalid(_)) | Ok(_) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The watches in the catalog's spelling, each with its key (see
    /// [`epidemic_plugin_sdk::backend::Backend::resolve`]). A table that does not resolve
    /// is returned as given; install reports it.
    pub fn resolve(&mut self, watches: &[Watch]) -> Result<Vec<Watch>, BackendError> {
        let mut out = Vec::with_capacity(watches.len());
        for w in watches {
            if ident::check("table", &w.table).is_err() {
                out.push(w.clone());
                continue;
            }
            let t = match self.catalog_table(&w.table) {
                Ok(t) => t,
                Err(BackendError::Invalid(_)) => {
                    out.push(w.clone());
                    continue;
                }
                Err(e) => return Err(e),
            };
            let have = self.columns_of(&t.name)?;
            let found: Vec<Option<&SourceColumn>> = w
                .columns
                .iter()
                .map(|c| have.iter().find(|h| h.name.eq_ignore_ascii_case(c)))
                .collect();
            let columns = w
                .columns
                .iter()
                .zip(&found)
                .map(|(c, h)| h.map_or_else(|| c.clone(), |h| h.name.clone()))
                .collect();
            let types = found
                .iter()
                .map(|h| h.map_or(ColumnType::Missing, SourceColumn::kind))
                .collect();
            let key = self.key_of(&t.name, &w.key)?;
            out.push(Watch {
                table: t.name,
                columns,
                key,
                types,
            });
        }
        Ok(out)
    }

    /// The key of `table` (its catalog spelling), in the catalog's spelling: the columns
    /// the config names, each checked to exist, or else the primary key. A table with
    /// neither is refused with the `key = [..]` fix.
    pub fn key_of(
        &mut self,
        table: &str,
        configured: &[String],
    ) -> Result<Vec<String>, BackendError> {
        if configured.is_empty() {
            let pk = self.primary_key(table)?;
            if pk.is_empty() {
                return Err(kit::no_key(table));
            }
            return Ok(pk);
        }
        let have = self.columns_of(table)?;
        let mut key: Vec<String> = Vec::with_capacity(configured.len());
        for k in configured {
            let name = have
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(k))
                .map(|h| h.name.clone())
                .ok_or_else(|| kit::no_such_key_column(table, k))?;
            if !key.contains(&name) {
                key.push(name);
            }
        }
        Ok(key)
    }

    /// The primary key's columns in key order; empty for a table without one.
    pub fn primary_key(&mut self, table: &str) -> Result<Vec<String>, BackendError> {
        let rows: Vec<(String, String)> = self
            .conn
            .exec(
                "SELECT TABLE_NAME, COLUMN_NAME FROM information_schema.STATISTICS \
                 WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? AND INDEX_NAME = 'PRIMARY' \
                 ORDER BY SEQ_IN_INDEX",
                (table,),
            )
            .map_err(sql_err)?;
        Ok(rows
            .into_iter()
            .filter(|(t, _)| t == table)
            .map(|(_, c)| c)
            .collect())
    }

    /// The columns that identify a row for certain: the primary key, else the first
    /// unique key whose columns are all NOT NULL; `None` for a table with neither. The
    /// UPDATE triggers' check against `UPDATE IGNORE` uses it; unlike a configured key,
    /// it never matches two rows.
    pub fn unique_row_key(&mut self, table: &str) -> Result<Option<Vec<String>>, BackendError> {
        let rows: Vec<(String, String, String, String, i64)> = self
            .conn
            .exec(
                "SELECT TABLE_NAME, INDEX_NAME, COLUMN_NAME, NULLABLE, NON_UNIQUE FROM information_schema.STATISTICS \
                 WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? \
                 ORDER BY INDEX_NAME <> 'PRIMARY', INDEX_NAME, SEQ_IN_INDEX",
                (table,),
            )
            .map_err(sql_err)?;
        let mut keys: Vec<(String, Vec<String>, bool)> = Vec::new();
        for (t, index, column, nullable, non_unique) in rows {
            if t != table || non_unique != 0 {
                continue;
            }
            match keys.last_mut() {
                Some((name, cols, nulls)) if *name == index => {
                    cols.push(column);
                    *nulls |= nullable == "YES";
                }
                _ => keys.push((index, vec![column], nullable == "YES")),
            }
        }
        Ok(keys
            .into_iter()
            .find(|(_, _, nulls)| !nulls)
            .map(|(_, cols, _)| cols))
    }

    /// Every column of `table` with what a backfill's key needs: type, nullability,
    /// character set and collation.
    pub fn key_columns(&mut self, table: &str) -> Result<Vec<KeyColumn>, BackendError> {
        type Row = (
            String,
            String,
            String,
            String,
            String,
            Option<String>,
            Option<String>,
        );
        let rows: Vec<Row> = self
            .conn
            .exec(
                "SELECT TABLE_NAME, COLUMN_NAME, DATA_TYPE, COLUMN_TYPE, IS_NULLABLE, CHARACTER_SET_NAME, COLLATION_NAME \
                 FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? \
                 ORDER BY ORDINAL_POSITION",
                (table,),
            )
            .map_err(sql_err)?;
        Ok(rows
            .into_iter()
            .filter(|(t, ..)| t == table)
            .map(
                |(_, name, data_type, column_type, nullable, charset, collation)| KeyColumn {
                    name,
                    data_type: data_type.to_ascii_lowercase(),
                    column_type,
                    nullable: nullable == "YES",
                    charset,
                    collation,
                },
            )
            .collect())
    }

    /// The columns of each unique index of `table` (the primary key included), each in
    /// index order; the primary key first.
    pub fn unique_indexes(&mut self, table: &str) -> Result<Vec<Vec<String>>, BackendError> {
        let rows: Vec<(String, String, String)> = self
            .conn
            .exec(
                "SELECT TABLE_NAME, INDEX_NAME, COLUMN_NAME FROM information_schema.STATISTICS \
                 WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? AND NON_UNIQUE = 0 \
                 ORDER BY INDEX_NAME <> 'PRIMARY', INDEX_NAME, SEQ_IN_INDEX",
                (table,),
            )
            .map_err(sql_err)?;
        let mut indexes: Vec<(String, Vec<String>)> = Vec::new();
        for (t, index, column) in rows {
            if t != table {
                continue;
            }
            match indexes.last_mut() {
                Some((name, cols)) if *name == index => cols.push(column),
                _ => indexes.push((index, vec![column])),
            }
        }
        Ok(indexes.into_iter().map(|(_, cols)| cols).collect())
    }

    pub fn column_names(&mut self, table: &str) -> Result<Vec<String>, BackendError> {
        Ok(self
            .columns_of(table)?
            .into_iter()
            .map(|c| c.name)
            .collect())
    }

    pub fn columns_of(&mut self, table: &str) -> Result<Vec<SourceColumn>, BackendError> {
        let rows: Vec<(String, String, String, Option<String>)> = self
            .conn
            .exec(
                "SELECT TABLE_NAME, COLUMN_NAME, COLUMN_TYPE, CHARACTER_SET_NAME FROM information_schema.COLUMNS \
                 WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION",
                (table,),
            )
            .map_err(sql_err)?;
        Ok(rows
            .into_iter()
            .filter(|(t, ..)| t == table)
            .map(|(_, name, column_type, charset)| SourceColumn {
                name,
                column_type,
                charset,
            })
            .collect())
    }

    /// Every trigger of the current database.
    pub fn triggers(&mut self) -> Result<Vec<ExistingTrigger>, BackendError> {
        let rows: Vec<(String, String, String, String, String)> = self
            .conn
            .query(
                "SELECT TRIGGER_NAME, ACTION_TIMING, EVENT_MANIPULATION, EVENT_OBJECT_TABLE, ACTION_STATEMENT \
                 FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = DATABASE()",
            )
            .map_err(sql_err)?;
        Ok(rows
            .into_iter()
            .map(|(name, timing, event, table, body)| ExistingTrigger {
                name,
                timing,
                event,
                table,
                body,
            })
            .collect())
    }

    /// The names of the triggers on `table`.
    pub fn trigger_names(&mut self, table: &str) -> Result<Vec<String>, BackendError> {
        Ok(self
            .triggers()?
            .into_iter()
            .filter(|t| t.table == table)
            .map(|t| t.name)
            .collect())
    }

    /// Every foreign key of the current database whose child is in it.
    pub fn foreign_keys(&mut self) -> Result<Vec<ForeignKey>, BackendError> {
        type Row = (
            String,
            String,
            String,
            String,
            String,
            String,
            String,
            String,
        );
        let rows: Vec<Row> = self
            .conn
            .query(
                "SELECT rc.CONSTRAINT_NAME, rc.TABLE_NAME, rc.REFERENCED_TABLE_NAME, k.REFERENCED_TABLE_SCHEMA, \
                 rc.UPDATE_RULE, rc.DELETE_RULE, k.COLUMN_NAME, k.REFERENCED_COLUMN_NAME \
                 FROM information_schema.REFERENTIAL_CONSTRAINTS rc \
                 JOIN information_schema.KEY_COLUMN_USAGE k ON k.CONSTRAINT_SCHEMA = rc.CONSTRAINT_SCHEMA \
                   AND k.TABLE_NAME = rc.TABLE_NAME AND k.CONSTRAINT_NAME = rc.CONSTRAINT_NAME \
                   AND k.REFERENCED_TABLE_NAME IS NOT NULL \
                 WHERE rc.CONSTRAINT_SCHEMA = DATABASE() \
                 ORDER BY rc.TABLE_NAME, rc.CONSTRAINT_NAME, k.ORDINAL_POSITION",
            )
            .map_err(sql_err)?;
        let db: Option<String> = self
            .conn
            .query_first("SELECT DATABASE()")
            .map_err(sql_err)?;
        let db = db.unwrap_or_default();
        let mut fks: Vec<ForeignKey> = Vec::new();
        for (name, child, parent, parent_db, upd, del, col, pcol) in rows {
            match fks.last_mut() {
                Some(f) if f.name == name && f.child == child => f.columns.push((col, pcol)),
                _ => fks.push(ForeignKey {
                    name,
                    child,
                    parent,
                    local: parent_db == db,
                    columns: vec![(col, pcol)],
                    on_delete: FkRule::parse(&del),
                    on_update: FkRule::parse(&upd),
                }),
            }
        }
        // Names are checked as identifiers where a capture uses them (`cascade.rs`), so an
        // unrelated table with an odd name does not stop an install.
        Ok(fks)
    }
}
