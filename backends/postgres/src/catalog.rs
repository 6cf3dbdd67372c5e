//! Reading the user's tables from `pg_catalog`: their kind, their columns with the types
//! the log copies them as, and their primary key; and [`resolve`], which fills in each
//! watch's key.
//!
//! A row's key travels with every change, so install needs one for every watched table:
//! the columns the config names (`[table.NAME] key = [..]`), checked to exist, or else the
//! table's primary key, in the key's own column order. A table with neither is refused
//! with one line naming the table and the config fix. PostgreSQL's names are
//! case-sensitive as the catalog spells them (Epidemic quotes every identifier), so a
//! table or watched column is the catalog's spelling or nothing; a configured key column
//! is also found as SQL would read it unquoted (`A` is the column `a`), and returned in
//! the catalog's spelling.
//!
//! Not here: Epidemic's own tables (see [`crate::registry`]).

use std::collections::HashMap;

use epidemic_plugin_sdk::backend::{kit, ColumnType, Watch};
use postgres::GenericClient;

use crate::error::PgError;
use crate::ident::{Ident, TableName};

/// Types whose equality is identity (two values are equal only if a handler would see
/// the same value) are compared with `IS DISTINCT FROM` directly; see
/// [`UserColumn::identity_eq`]. Their `=` operators live in `pg_catalog`, which is found
/// first whatever the installer's `search_path`.
const IDENTITY_EQ_SQL: &str = "a.atttypid = ANY (ARRAY['pg_catalog.bool', 'pg_catalog.int2', \
     'pg_catalog.int4', 'pg_catalog.int8', 'pg_catalog.oid', 'pg_catalog.bytea', 'pg_catalog.\"char\"', \
     'pg_catalog.date', 'pg_catalog.timestamp', 'pg_catalog.timestamptz', 'pg_catalog.uuid']::pg_catalog.regtype[])";

/// One column of a watched table, as the catalog describes it now.
#[derive(Debug, Clone)]
pub(crate) struct UserColumn {
    pub attnum: i16,
    /// The type for the log table's columns: `format_type` without the type modifier,
    /// so that widening the user's column (`varchar(64)` to `varchar(128)`) cannot make
    /// the trigger fail and with it the user's write.
    pub type_sql: String,
    /// Whether the type's equality is identity (integers, `bool`, `bytea`, timestamps,
    /// `uuid`...). For every other type the update trigger compares the text forms, byte
    /// for byte (`COLLATE "C"`), which is what a handler sees: `1.0` and `1.00`
    /// (`numeric`), or `alice` and `Alice` under a case-insensitive collation, are equal
    /// to `IS DISTINCT FROM` but not to a handler.
    pub identity_eq: bool,
    /// Its place in the primary key (1 for the first key column), if it is in it.
    key_position: Option<i32>,
}

impl UserColumn {
    /// What kind of value the reader delivers for this column (for the host's row-filter
    /// check; see `reader/decode.rs`): integers, floats, bytes and character types as
    /// such, `numeric` as exact text, everything else (`boolean` included) as text.
    pub fn kind(&self) -> ColumnType {
        match self.type_sql.trim_start_matches("pg_catalog.") {
            "smallint" | "integer" | "bigint" => ColumnType::Int,
            "real" | "double precision" => ColumnType::Float,
            "bytea" => ColumnType::Bytes,
            "text" | "character varying" | "bpchar" | "name" => ColumnType::Text,
            "numeric" => ColumnType::Decimal,
            _ => ColumnType::Other,
        }
    }
}

/// A watched table as the catalog describes it now.
#[derive(Debug, Clone)]
pub(crate) struct UserTable {
    pub oid: u32,
    /// A partitioned table (`relkind = 'p'`): its rows are in its partitions.
    pub partitioned: bool,
    pub columns: HashMap<String, UserColumn>,
}

impl UserTable {
    /// The primary key's columns in key order; empty when the table has none.
    pub fn primary_key(&self) -> Vec<Ident> {
        let mut key: Vec<(i32, &String)> = self
            .columns
            .iter()
            .filter_map(|(name, c)| c.key_position.map(|p| (p, name)))
            .collect();
        key.sort_unstable();
        // Catalog names need no validation to be quoted; they are kept as spelled.
        key.into_iter()
            .map(|(_, name)| Ident::internal(name.clone()))
            .collect()
    }

    /// The key of `table` (as the config spells it): `configured` checked against the
    /// table's columns, or the primary key when nothing is configured; the one-line
    /// refusal naming the table and the fix when there is neither.
    pub fn key(&self, table: &str, configured: &[String]) -> Result<Vec<Ident>, PgError> {
        if configured.is_empty() {
            let key = self.primary_key();
            if key.is_empty() {
                return Err(kit::no_key(table).into());
            }
            return Ok(key);
        }
        configured
            .iter()
            .map(|c| {
                let column = Ident::parse("column", c)?;
                if self.columns.contains_key(column.as_str()) {
                    return Ok(column);
                }
                // As SQL reads the name unquoted: `A` is the column `a`.
                let folded = column.as_str().to_ascii_lowercase();
                if self.columns.contains_key(&folded) {
                    return Ok(Ident::internal(folded));
                }
                Err(kit::no_such_key_column(table, c).into())
            })
            .collect()
    }
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
    // `character` and `bit` without a modifier mean length 1, so they are widened to
    // their unbounded forms rather than copied from format_type. A partitioned table's
    // primary key is in `pg_index` like any other.
    let rows = client
        .query(
            &format!(
                "SELECT a.attname::text, a.attnum, \
                        CASE a.atttypid \
                            WHEN 'pg_catalog.bpchar'::regtype THEN 'pg_catalog.bpchar' \
                            WHEN 'pg_catalog.bit'::regtype THEN 'pg_catalog.varbit' \
                            ELSE pg_catalog.format_type(a.atttypid, NULL) END, \
                        {IDENTITY_EQ_SQL}, \
                        (SELECT pg_catalog.array_position(i.indkey::int2[], a.attnum) \
                         FROM pg_catalog.pg_index i \
                         WHERE i.indrelid = a.attrelid AND i.indisprimary) \
                 FROM pg_catalog.pg_attribute a \
                 WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped"
            ),
            &[&oid],
        )
        .map_err(PgError::sql(format!("inspect columns of {name}")))?;
    let columns = rows
        .into_iter()
        .map(|r| {
            (
                r.get::<_, String>(0),
                UserColumn {
                    attnum: r.get(1),
                    type_sql: r.get(2),
                    identity_eq: r.get(3),
                    key_position: r.get(4),
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

/// The watches with their keys filled in (see the module docs): one per watch given, in
/// the same order, names as given. A table that does not exist is returned as given, for
/// install to report.
pub(crate) fn resolve(
    client: &mut impl GenericClient,
    watches: &[Watch],
) -> Result<Vec<Watch>, PgError> {
    watches
        .iter()
        .map(|w| {
            let name = TableName::parse(&w.table)?;
            let table = match inspect_table(client, &name) {
                Ok(t) => t,
                Err(PgError::MissingTable(_) | PgError::NotATable(_)) => return Ok(w.clone()),
                Err(e) => return Err(e),
            };
            let key = table.key(&w.table, &w.key)?;
            let types = w
                .columns
                .iter()
                .map(|c| {
                    table
                        .columns
                        .get(c)
                        .map_or(ColumnType::Missing, UserColumn::kind)
                })
                .collect();
            Ok(Watch {
                key: key.iter().map(Ident::to_string).collect(),
                types,
                ..w.clone()
            })
        })
        .collect()
}
