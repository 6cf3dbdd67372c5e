//! Row filters: `[[handler]] filter = "mailhost == daemon.name"`, an expression in Google's
//! Common Expression Language over the row's columns, with the daemon's name as
//! `daemon.name`, so one config template serves every host.
//!
//! Why CEL, and the `cel` crate: CEL is made for exactly this (a safe, side-effect-free,
//! always-terminating predicate over a record that untrusted config may supply; Kubernetes
//! admission rules and Envoy use it), its syntax is what operators expect (`==`, `&&`,
//! `in`, `startsWith`), and `cel` (the maintained Rust implementation, formerly
//! `cel-interpreter`) parses with the spec's own ANTLR grammar. It has no static type
//! checker, so a filter is checked at start-up by evaluating it on rows of sample values
//! of each column's catalog type (see [`CelFilter::check_types`]); a type error only some
//! real rows show makes those changes dead letters of the handler, with the reason.
//!
//! A filter is judged on whole row images by the SDK's router (`RowFilter`): a row that
//! moves into the filter reaches the handler as an INSERT, one that moves out as a DELETE.
//! The columns a filter reads are captured like watched columns, so an UPDATE of them
//! alone is a change.

use std::collections::HashMap;
use std::sync::Arc;

use epidemic_plugin_sdk::backend::ColumnType;
use epidemic_plugin_sdk::routing::RowFilter;
use epidemic_plugin_sdk::Value;

/// A compiled `[[handler]] filter`.
pub struct CelFilter {
    source: String,
    program: cel::Program,
    /// The standard library, built once: a context per row only borrows it.
    env: Arc<cel::Env>,
    daemon: String,
    /// The row columns the expression reads, as written in it.
    columns: Vec<String>,
}

/// The variable that holds the daemon's own name (`daemon.name`).
const DAEMON: &str = "daemon";

impl CelFilter {
    /// Compile `source`; the error is one line saying where the syntax is wrong.
    pub fn compile(source: &str, daemon: &str) -> Result<CelFilter, String> {
        let env = Arc::new(cel::Env::stdlib());
        let program = env.compile(source).map_err(|e| {
            let first = e.errors.first();
            match first {
                Some(p) => format!(
                    "syntax error at column {}: {}",
                    p.pos.1.max(0) + 1,
                    one_line(&p.msg)
                ),
                None => format!("syntax error: {}", one_line(&e.to_string())),
            }
        })?;
        let mut columns: Vec<String> = program
            .references()
            .variables()
            .into_iter()
            .filter(|v| *v != DAEMON)
            .map(str::to_owned)
            .collect();
        columns.sort();
        columns.dedup();
        Ok(CelFilter {
            source: source.to_owned(),
            program,
            env,
            daemon: daemon.to_owned(),
            columns,
        })
    }

    /// The row columns the expression reads (they must be captured).
    pub fn columns(&self) -> &[String] {
        &self.columns
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Evaluate on a row: `names[i]` has `values[i]`. The result must be a bool.
    fn eval(&self, names: &[String], values: &[Value]) -> Result<bool, String> {
        let mut ctx = cel::Context::with_env(Arc::clone(&self.env));
        let mut daemon = HashMap::new();
        daemon.insert("name".to_owned(), cel::Value::from(self.daemon.as_str()));
        ctx.add_variable_from_value(DAEMON, daemon);
        let mut nulls_read = false;
        for col in &self.columns {
            // Names in the catalog's spelling may differ in case from the expression's.
            let v = names
                .iter()
                .position(|n| n == col)
                .or_else(|| names.iter().position(|n| n.eq_ignore_ascii_case(col)))
                .and_then(|i| values.get(i))
                .map_or(cel::Value::Null, to_cel);
            nulls_read |= v == cel::Value::Null;
            ctx.add_variable_from_value(col.as_str(), v);
        }
        match self.program.execute(&ctx) {
            Ok(cel::Value::Bool(b)) => Ok(b),
            Ok(other) => Err(format!(
                "the filter must give true or false, it gave {}",
                describe(&other)
            )),
            // As in SQL, a row whose NULL makes the expression undefined (`quota > 5`
            // with no quota) does not pass.
            Err(_) if nulls_read => Ok(false),
            Err(e) => Err(one_line(&e.to_string())),
        }
    }

    /// Check, at start-up, that the expression reads only the table's captured `columns`
    /// and gives true or false, without a type error, on sample rows of their `types`.
    /// `types` may be empty (the backend did not say): then only the names are checked.
    pub fn check_types(
        &self,
        table: &str,
        columns: &[String],
        types: &[ColumnType],
    ) -> Result<(), String> {
        for c in &self.columns {
            let at = columns.iter().position(|n| n.eq_ignore_ascii_case(c));
            let missing = at.is_none_or(|i| types.get(i) == Some(&ColumnType::Missing));
            if missing {
                return Err(format!("table {table} has no column {c}"));
            }
        }
        if types.len() != columns.len() {
            return Ok(());
        }
        // Three sample rows: zero-like values, ordinary values, and this daemon's name in
        // every text column (so `col == daemon.name` branches run too).
        for round in 0..3 {
            let values: Vec<Value> = types
                .iter()
                .map(|t| sample(*t, round, &self.daemon))
                .collect();
            self.eval(columns, &values)
                .map_err(|e| format!("on table {table}: {e}"))?;
        }
        Ok(())
    }
}

impl RowFilter for CelFilter {
    fn passes(&self, columns: &[String], values: &[Value]) -> Result<bool, String> {
        self.eval(columns, values)
    }
}

/// A value of a column's type for a start-up check.
fn sample(t: ColumnType, round: usize, daemon: &str) -> Value {
    match (t, round) {
        (ColumnType::Int, 0) => Value::Int(0),
        (ColumnType::Int, _) => Value::Int(1),
        (ColumnType::Float, 0) => Value::Float(0.0),
        (ColumnType::Float, _) => Value::Float(1.5),
        (ColumnType::Bytes, 0) => Value::Bytes(Vec::new()),
        (ColumnType::Bytes, _) => Value::Bytes(b"x".to_vec()),
        (ColumnType::Bool, r) => Value::Int((r % 2) as i64),
        (_, 0) => Value::Text(String::new()),
        (_, 1) => Value::Text("x".into()),
        (_, _) => Value::Text(daemon.to_owned()),
    }
}

fn to_cel(v: &Value) -> cel::Value {
    match v {
        Value::Null => cel::Value::Null,
        Value::Int(i) => cel::Value::Int(*i),
        Value::Float(f) => cel::Value::Float(*f),
        Value::Text(s) => cel::Value::String(Arc::new(s.clone())),
        Value::Bytes(b) => cel::Value::Bytes(Arc::new(b.clone())),
    }
}

fn describe(v: &cel::Value) -> String {
    match v {
        cel::Value::Null => "null".into(),
        cel::Value::Int(i) => format!("the number {i}"),
        cel::Value::UInt(i) => format!("the number {i}"),
        cel::Value::Float(f) => format!("the number {f}"),
        cel::Value::String(s) => format!("the text {s:?}"),
        other => format!("{other:?}"),
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cols(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn the_daemon_name_picks_the_rows_of_this_host() {
        let f = CelFilter::compile("mailhost == daemon.name", "mx2").unwrap();
        assert_eq!(f.columns(), ["mailhost"]);
        let names = cols(&["id", "mailhost"]);
        assert!(f.passes(&names, &[1.into(), "mx2".into()]).unwrap());
        assert!(!f.passes(&names, &[1.into(), "mx1".into()]).unwrap());
        assert!(!f.passes(&names, &[1.into(), Value::Null]).unwrap());
        // A NULL that makes a comparison undefined does not pass, as in SQL.
        let g = CelFilter::compile("quota > 5", "mx2").unwrap();
        assert!(!g.passes(&cols(&["quota"]), &[Value::Null]).unwrap());
        assert!(g.passes(&cols(&["quota"]), &[Value::Int(6)]).unwrap());
        // A real type error is one, for the dispatcher to refuse the row.
        assert!(g.passes(&cols(&["quota"]), &["six".into()]).is_err());
    }

    #[test]
    fn syntax_errors_say_where() {
        let e = CelFilter::compile("mailhost == ", "mx1").err().unwrap();
        assert!(e.starts_with("syntax error at column"), "{e}");
        assert!(!e.contains('\n'));
    }

    #[test]
    fn unknown_columns_and_type_errors_are_found_at_start() {
        let f = CelFilter::compile("quota > 5 && mailhost == daemon.name", "mx1").unwrap();
        let names = cols(&["quota", "mailhost"]);
        assert!(f
            .check_types("users", &names, &[ColumnType::Int, ColumnType::Text])
            .is_ok());
        let e = f
            .check_types("users", &names, &[ColumnType::Text, ColumnType::Text])
            .unwrap_err();
        assert!(e.contains("users"), "{e}");
        let e = f
            .check_types("users", &cols(&["mailhost"]), &[ColumnType::Text])
            .unwrap_err();
        assert_eq!(e, "table users has no column quota");
        let not_bool = CelFilter::compile("quota + 1", "mx1").unwrap();
        let e = not_bool
            .check_types("users", &cols(&["quota"]), &[ColumnType::Int])
            .unwrap_err();
        assert!(e.contains("true or false"), "{e}");
    }
}
