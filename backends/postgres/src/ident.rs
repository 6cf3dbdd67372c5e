//! Validated SQL identifiers and table names.
//!
//! Table and column names come from config files and plugins. They are checked by the
//! SDK's [`ident::check`] (letters, digits, `_` and `$`, at most 63 bytes, the PostgreSQL
//! limit) and then always double-quoted in generated SQL, so mixed case and reserved
//! words (`"Order"`, `"select"`) work, names are case-sensitive exactly as `pg_catalog`
//! spells them, and no name can ever carry SQL. What is PostgreSQL's own lives here:
//! `schema.table` names and quoting.

use std::fmt;

use epidemic_plugin_sdk::ident;

use crate::error::PgError;

/// PostgreSQL's `NAMEDATALEN - 1`: longer identifiers are silently truncated by the
/// server, which would make two different names collide. The SDK's limit is this one.
pub const MAX_IDENT_BYTES: usize = ident::MAX_LEN;

/// An identifier that passed validation. Displayed unquoted; use [`Ident::quoted`] in SQL.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ident(String);

impl Ident {
    /// Validate `name`; `what` says what it is for the error message ("table", "column").
    pub fn parse(what: &'static str, name: &str) -> Result<Ident, PgError> {
        ident::check(what, name).map_err(|e| PgError::InvalidIdentifier(e.to_string()))?;
        Ok(Ident(name.to_owned()))
    }

    /// An identifier built from parts that are already safe (our own prefixes plus a
    /// validated name). Still quoted wherever it is used.
    pub(crate) fn internal(name: String) -> Ident {
        Ident(name)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The identifier double-quoted for SQL.
    pub fn quoted(&self) -> String {
        quote_ident(&self.0)
    }
}

impl fmt::Display for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A table, `table` or `schema.table`; a name without a schema means `public`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TableName {
    pub schema: Ident,
    pub table: Ident,
}

impl TableName {
    pub fn parse(name: &str) -> Result<TableName, PgError> {
        match name.split_once('.') {
            Some((schema, table)) => Ok(TableName {
                schema: Ident::parse("schema", schema)?,
                // A second dot fails the identifier check and is reported with the full name.
                table: Ident::parse("table", table).map_err(|_| {
                    PgError::InvalidIdentifier(format!(
                        "invalid table name \"{}\": expected `table` or `schema.table` made of \
                         letters, digits, `_` and `$`",
                        printable(name)
                    ))
                })?,
            }),
            None => Ok(TableName {
                schema: Ident::internal("public".to_owned()),
                table: Ident::parse("table", name)?,
            }),
        }
    }

    /// `"schema"."table"`.
    pub fn quoted(&self) -> String {
        format!("{}.{}", self.schema.quoted(), self.table.quoted())
    }
}

impl fmt::Display for TableName {
    /// `table` for tables in `public`, `schema.table` otherwise.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.schema.as_str() == "public" {
            f.write_str(self.table.as_str())
        } else {
            write!(f, "{}.{}", self.schema, self.table)
        }
    }
}

/// `name` for an error message: control characters (a newline in a config value) would
/// break the one-line message, so they become `?`.
fn printable(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// Double-quote an identifier, doubling any quote inside (validated names have none,
/// but this function does not rely on that).
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Single-quote a string literal, doubling quotes inside. Relies on
/// `standard_conforming_strings`, which is on by default since PostgreSQL 9.1; the
/// values quoted here are identifiers and type names from `format_type`, which hold no
/// backslashes anyway.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_mixed_case_reserved_words_and_dollars() {
        for name in ["Order", "select", "_x", "a$b", "mail_users2"] {
            assert_eq!(Ident::parse("table", name).unwrap().as_str(), name);
        }
        assert_eq!(
            Ident::parse("column", "select").unwrap().quoted(),
            "\"select\""
        );
    }

    #[test]
    fn rejects_injection_and_odd_names() {
        for name in ["users; DROP TABLE x", "", "1abc", "a-b", "a\"b", "ä", "a b"] {
            let err = Ident::parse("table", name).unwrap_err();
            assert!(err.to_string().contains(&format!("{name:?}")), "{err}");
        }
        assert!(Ident::parse("table", &"a".repeat(63)).is_ok());
        assert!(Ident::parse("table", &"a".repeat(64)).is_err());
    }

    #[test]
    fn table_names_default_to_public() {
        let t = TableName::parse("mail_users").unwrap();
        assert_eq!(t.schema.as_str(), "public");
        assert_eq!(t.quoted(), "\"public\".\"mail_users\"");
        assert_eq!(t.to_string(), "mail_users");
        let t = TableName::parse("App.Users").unwrap();
        assert_eq!(t.quoted(), "\"App\".\"Users\"");
        assert_eq!(t.to_string(), "App.Users");
        assert!(TableName::parse("a.b.c").is_err());
        assert!(TableName::parse("users; DROP TABLE x").is_err());
        assert!(TableName::parse("public.users; DROP TABLE x").is_err());
    }

    #[test]
    fn literals_are_escaped() {
        assert_eq!(quote_literal("it's"), "'it''s'");
    }
}
