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
//!
//! # Pushed into a backfill's SELECT
//!
//! A backfill would read every row of the table only for the filter to drop most of them
//! (each of ten mail servers keeps a tenth). So [`CelFilter::pushdown`] derives from the
//! expression's syntax tree what a SELECT can say, and the dispatcher hands it to the
//! backend with every chunk request (`ChunkRequest::only`): the top-level `&&` conjuncts
//! of the forms `col == <literal>`, `<literal> == col`, `col == daemon.name`,
//! `daemon.name == col` and `col in [<literals>]`, where the literals are strings for a
//! text column or integers for an integer column (the catalog's type). Anything else
//! (`||`, `!`, `!=`, `<`, functions, a literal of another type) pushes nothing for that
//! conjunct, and other conjuncts still push theirs.
//!
//! **Invariant:** the pushed condition is implied by the filter: a row passes the filter
//! only if every top-level conjunct is true, and a pushed conjunct is true only if the
//! column equals one of the values exactly. So every row the filter passes is read. A
//! backend comparison that is looser than exact equality (MySQL's case-insensitive or
//! PAD SPACE collations, PostgreSQL's `char(n)`) reads rows the filter then drops here,
//! as it drops every row it does not pass: the filter still judges every snapshot row.

use std::collections::HashMap;
use std::sync::Arc;

use cel::common::ast::{CallExpr, Expr, IdedExpr, LiteralValue};
use epidemic_plugin_sdk::backend::{ColumnIn, ColumnType};
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

impl CelFilter {
    /// The conditions a backfill's SELECT can apply for this filter on a table whose
    /// columns (the catalog's spelling) have `types` (see the module docs): one per
    /// pushable top-level conjunct, the column in the catalog's spelling. Empty when
    /// nothing can be pushed or the types are unknown.
    pub fn pushdown(&self, columns: &[String], types: &[ColumnType]) -> Vec<ColumnIn> {
        if types.len() != columns.len() {
            return Vec::new();
        }
        let mut conjuncts = Vec::new();
        top_level_conjuncts(self.program.expression(), &mut conjuncts);
        conjuncts
            .into_iter()
            .filter_map(|e| self.pushable(e))
            .filter_map(|(name, values)| {
                // The column as the catalog spells it, matched as `eval` matches it.
                let i = columns
                    .iter()
                    .position(|c| *c == name)
                    .or_else(|| columns.iter().position(|c| c.eq_ignore_ascii_case(&name)))?;
                let fits = |v: &Value| {
                    matches!(
                        (types[i], v),
                        (ColumnType::Text, Value::Text(_)) | (ColumnType::Int, Value::Int(_))
                    )
                };
                (!values.is_empty() && values.iter().all(fits)).then(|| ColumnIn {
                    column: columns[i].clone(),
                    values,
                })
            })
            .collect()
    }

    /// `(column, values)` when `e` says "column equals one of values", with the values
    /// as literals of one type; `None` for any other expression.
    fn pushable(&self, e: &IdedExpr) -> Option<(String, Vec<Value>)> {
        let Expr::Call(CallExpr {
            func_name,
            target: None,
            args,
        }) = &e.expr
        else {
            return None;
        };
        let [left, right] = args.as_slice() else {
            return None;
        };
        match func_name.as_str() {
            cel::common::ast::operators::EQUALS => {
                let (column, value) = match (self.column(left), self.column(right)) {
                    (Some(c), None) => (c, self.constant(right)?),
                    (None, Some(c)) => (c, self.constant(left)?),
                    _ => return None,
                };
                Some((column, vec![value]))
            }
            cel::common::ast::operators::IN => {
                let column = self.column(left)?;
                let Expr::List(list) = &right.expr else {
                    return None;
                };
                if !list.optional_indices.is_empty() {
                    return None;
                }
                let values = list
                    .elements
                    .iter()
                    .map(|v| self.constant(v))
                    .collect::<Option<Vec<Value>>>()?;
                Some((column, values))
            }
            _ => None,
        }
    }

    /// The row column `e` names, if it is one.
    fn column(&self, e: &IdedExpr) -> Option<String> {
        match &e.expr {
            Expr::Ident(name) if name != DAEMON => Some(name.clone()),
            _ => None,
        }
    }

    /// The value of `e` when it is a string or integer literal, or `daemon.name`.
    fn constant(&self, e: &IdedExpr) -> Option<Value> {
        match &e.expr {
            Expr::Literal(LiteralValue::String(s)) => Some(Value::Text(s.inner().to_owned())),
            Expr::Literal(LiteralValue::Int(i)) => Some(Value::Int(*i.inner())),
            // `-5` may come as a negation of the literal 5.
            Expr::Call(CallExpr {
                func_name,
                target: None,
                args,
            }) if func_name == cel::common::ast::operators::NEGATE && args.len() == 1 => {
                match &args[0].expr {
                    Expr::Literal(LiteralValue::Int(i)) => i.inner().checked_neg().map(Value::Int),
                    _ => None,
                }
            }
            Expr::Select(select)
                if !select.test
                    && select.field == "name"
                    && matches!(&select.operand.expr, Expr::Ident(d) if d == DAEMON) =>
            {
                Some(Value::Text(self.daemon.clone()))
            }
            _ => None,
        }
    }
}

/// The operands of the `&&` at the top of `e`, flattened (`a && (b && c)` gives `a`, `b`,
/// `c`); `e` itself when it is no `&&`.
fn top_level_conjuncts<'e>(e: &'e IdedExpr, out: &mut Vec<&'e IdedExpr>) {
    match &e.expr {
        Expr::Call(CallExpr {
            func_name,
            target: None,
            args,
        }) if func_name == cel::common::ast::operators::LOGICAL_AND && args.len() == 2 => {
            for a in args {
                top_level_conjuncts(a, out);
            }
        }
        _ => out.push(e),
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

    fn pushed(filter: &str, columns: &[&str], types: &[ColumnType]) -> Vec<(String, Vec<Value>)> {
        CelFilter::compile(filter, "mx2")
            .unwrap()
            .pushdown(&cols(columns), types)
            .into_iter()
            .map(|c| (c.column, c.values))
            .collect()
    }

    const HOST_QUOTA: [ColumnType; 2] = [ColumnType::Text, ColumnType::Int];

    #[test]
    fn equalities_with_literals_and_the_daemon_name_are_pushed() {
        let cols = ["mailhost", "quota"];
        let host = |v: &str| vec![("mailhost".to_owned(), vec![Value::from(v)])];
        assert_eq!(
            pushed("mailhost == daemon.name", &cols, &HOST_QUOTA),
            host("mx2")
        );
        assert_eq!(
            pushed("daemon.name == mailhost", &cols, &HOST_QUOTA),
            host("mx2")
        );
        assert_eq!(pushed("mailhost == 'mx7'", &cols, &HOST_QUOTA), host("mx7"));
        // CEL's escapes are undone: the value is the string the filter compares with.
        assert_eq!(
            pushed(r#"'o\'b\\c é' == mailhost"#, &cols, &HOST_QUOTA),
            host("o'b\\c é")
        );
        assert_eq!(
            pushed("quota == -5", &cols, &HOST_QUOTA),
            vec![("quota".to_owned(), vec![Value::Int(-5)])]
        );
        assert_eq!(
            pushed("mailhost in ['mx1', daemon.name]", &cols, &HOST_QUOTA),
            vec![("mailhost".to_owned(), vec!["mx1".into(), "mx2".into()])]
        );
        // Every top-level conjunct that can be, however nested; the others stay with the
        // filter.
        assert_eq!(
            pushed(
                "quota > 5 && (mailhost == daemon.name && quota in [6, 7]) && size(mailhost) > 1",
                &cols,
                &HOST_QUOTA
            ),
            vec![
                ("mailhost".to_owned(), vec!["mx2".into()]),
                ("quota".to_owned(), vec![6.into(), 7.into()]),
            ]
        );
    }

    #[test]
    fn the_catalog_spelling_is_pushed() {
        assert_eq!(
            pushed(
                "mailhost == daemon.name",
                &["MailHost"],
                &[ColumnType::Text]
            ),
            vec![("MailHost".to_owned(), vec!["mx2".into()])]
        );
    }

    #[test]
    fn what_a_select_cannot_say_exactly_is_not_pushed() {
        let cols = ["mailhost", "quota"];
        for filter in [
            "mailhost == daemon.name || quota == 5",
            "!(mailhost == daemon.name)",
            "mailhost != daemon.name",
            "quota > 5",
            "quota >= 5 && quota <= 5",
            "mailhost.startsWith('mx')",
            "mailhost == mailhost",
            "daemon.name == 'mx2'",
            "mailhost in []",
            "mailhost in ['mx1', quota]",
            "quota + 0 == 5",
            "has(daemon.name) && mailhost == 'mx1' || false",
            "mailhost == null",
            "true",
        ] {
            assert_eq!(pushed(filter, &cols, &HOST_QUOTA), vec![], "{filter}");
        }
    }

    #[test]
    fn a_literal_of_another_type_than_the_column_is_not_pushed() {
        let cols = ["mailhost", "quota"];
        for filter in [
            "quota == daemon.name",
            "quota == '5'",
            "mailhost == 5",
            "quota == 5.0",
            "quota == 5u",
            "quota in [5, '6']",
            "nosuch == 'x'",
        ] {
            assert_eq!(pushed(filter, &cols, &HOST_QUOTA), vec![], "{filter}");
        }
        for t in [
            ColumnType::Other,
            ColumnType::Decimal,
            ColumnType::Bytes,
            ColumnType::Float,
            ColumnType::Bool,
            ColumnType::Missing,
        ] {
            assert_eq!(
                pushed("mailhost == 'mx1'", &["mailhost"], &[t]),
                vec![],
                "{t:?}"
            );
            assert_eq!(
                pushed("mailhost == 1", &["mailhost"], &[t]),
                vec![],
                "{t:?}"
            );
        }
        // Without the catalog's types, nothing.
        assert_eq!(pushed("mailhost == 'mx1'", &["mailhost"], &[]), vec![]);
    }

    #[test]
    fn a_pushed_condition_is_implied_by_the_filter() {
        // Any row the filter passes meets every pushed condition.
        let filter = "quota > 5 && mailhost == daemon.name && quota in [6, 7, 9]";
        let f = CelFilter::compile(filter, "mx2").unwrap();
        let names = cols(&["mailhost", "quota"]);
        let only = f.pushdown(&names, &HOST_QUOTA);
        assert_eq!(only.len(), 2);
        for host in ["mx1", "mx2", "MX2", "mx2 ", ""] {
            for quota in [
                Value::Null,
                0.into(),
                6.into(),
                7.into(),
                8.into(),
                9.into(),
            ] {
                let row = [Value::from(host), quota.clone()];
                if f.passes(&names, &row).unwrap() {
                    for c in &only {
                        let i = names.iter().position(|n| *n == c.column).unwrap();
                        assert!(c.values.contains(&row[i]), "{row:?} passes, {c:?}");
                    }
                }
            }
        }
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
