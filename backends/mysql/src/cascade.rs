//! Foreign-key cascades, which MySQL and MariaDB carry out inside InnoDB without firing a
//! single trigger on the child table: deleting a domain deletes its mail users, and the
//! users' AFTER DELETE trigger never runs.
//!
//! For every watched table that a cascade can reach, the parent table gets `BEFORE
//! DELETE` / `BEFORE UPDATE` triggers (`epidemic_<parent>_cascade_del|_upd`, one per
//! parent and event, holding the statements of every watched descendant) that copy the
//! child rows the cascade is about to delete, update or set to NULL. BEFORE, because by
//! AFTER time the cascaded rows are gone. Where the server allows several triggers per
//! table and event and `innodb_autoinc_lock_mode` is 0 or 1 ([`CascadeMode::Staged`]),
//! the copies go to a pending table `epidemic_pend_<child>` and `AFTER` triggers
//! (`..._after`) move them into the log only if the parent row really was deleted or
//! updated: `DELETE IGNORE` / `UPDATE IGNORE` skip a row that another foreign key blocks
//! or a duplicate key refuses, and its cascade did not happen (checked on MariaDB 10.11:
//! AFTER DELETE does not run for the skipped row, AFTER UPDATE does, so the update side
//! checks the row like the tables' own UPDATE triggers). Elsewhere
//! ([`CascadeMode::Direct`]) the BEFORE trigger writes the log, and `status` warns that a
//! skipped parent row leaves its cascade in the log. The parent tables' own triggers are
//! `AFTER` ones, so nothing has to be merged on servers with one trigger per table, event
//! and timing; a user's BEFORE trigger on a parent there is refused with one line.
//!
//! The copies carry every captured column of the child, its key columns included, so a
//! cascaded DELETE or UPDATE is a change with a key like any other (an `ON UPDATE
//! CASCADE` of a key column gives `old_key`).
//!
//! Captured: direct `ON DELETE CASCADE | SET NULL` and `ON UPDATE CASCADE | SET NULL`
//! keys, and chains of `ON DELETE CASCADE` through any number of tables (up to
//! [`MAX_DEPTH`]), watched or not, joined from the parent row down to the watched table.
//! Refused, with one line naming the constraint and the table: a cascade from a table
//! in another database, a cycle (a table that references itself, directly or through
//! others: its depth is unbounded), two cascade paths from one parent into one watched
//! table (a row would be logged twice), a chain of updates (a cascade that changes the
//! very parent columns a watched table's `ON UPDATE` action follows), and `SET DEFAULT`.
//!
//! Costs: a cascade's rows are written twice in staged mode (pending table, then log),
//! and the pending table's AUTO-INC lock is held for the parent's statement, so two
//! statements cascading into one table at once take turns. Rows of skipped parent rows
//! stay in the pending table as garbage until the next install remakes it.

use epidemic_plugin_sdk::backend::BackendError;
use epidemic_plugin_sdk::ident;
use mysql::prelude::Queryable;
use mysql::Conn;

use crate::capture::{fit, fnv1a32, log_column, now_expr, pend_table_name, quote};
use crate::catalog::{ExistingTrigger, MySqlCatalog};
use crate::conn::ServerInfo;

/// Longest chain of cascades followed from a watched table up to a parent.
pub(crate) const MAX_DEPTH: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FkRule {
    Cascade,
    SetNull,
    /// RESTRICT, NO ACTION: the statement fails instead; nothing to capture.
    Nothing,
    SetDefault,
}

impl FkRule {
    pub fn parse(rule: &str) -> FkRule {
        match rule.to_ascii_uppercase().as_str() {
            "CASCADE" => FkRule::Cascade,
            "SET NULL" => FkRule::SetNull,
            "SET DEFAULT" => FkRule::SetDefault,
            _ => FkRule::Nothing,
        }
    }

    fn acts(self) -> bool {
        self != FkRule::Nothing
    }
}

/// A foreign key of the current database, as information_schema describes it.
#[derive(Debug, Clone)]
pub(crate) struct ForeignKey {
    pub name: String,
    pub child: String,
    pub parent: String,
    /// The parent is in the current database.
    pub local: bool,
    /// (child column, parent column), in key order.
    pub columns: Vec<(String, String)>,
    pub on_delete: FkRule,
    pub on_update: FkRule,
}

impl ForeignKey {
    fn child_has(&self, column: &str) -> bool {
        self.columns
            .iter()
            .any(|(c, _)| c.eq_ignore_ascii_case(column))
    }

    fn what(&self) -> String {
        format!(
            "foreign key {} of table {} (references {})",
            self.name, self.child, self.parent
        )
    }
}

/// A watched table as the cascade planner needs it.
pub(crate) struct WatchedTable<'a> {
    pub table: &'a str,
    pub log_table: &'a str,
    pub columns: &'a [String],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ParentEvent {
    Delete,
    Update,
}

impl ParentEvent {
    pub fn sql(self) -> &'static str {
        match self {
            ParentEvent::Delete => "DELETE",
            ParentEvent::Update => "UPDATE",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Timing {
    Before,
    After,
}

impl Timing {
    pub fn sql(self) -> &'static str {
        match self {
            Timing::Before => "BEFORE",
            Timing::After => "AFTER",
        }
    }
}

/// Every (event, timing) a parent's cascade triggers can have.
pub(crate) const KINDS: [(ParentEvent, Timing); 4] = [
    (ParentEvent::Delete, Timing::Before),
    (ParentEvent::Delete, Timing::After),
    (ParentEvent::Update, Timing::Before),
    (ParentEvent::Update, Timing::After),
];

/// `epidemic_<parent>_cascade_del|_cascade_upd` (BEFORE) and `..._after` (AFTER). A
/// table's own triggers end in `_insert|_update|_delete`, so the names never meet.
pub(crate) fn trigger_name(parent: &str, event: ParentEvent, timing: Timing) -> String {
    let suffix = match (event, timing) {
        (ParentEvent::Delete, Timing::Before) => "cascade_del",
        (ParentEvent::Update, Timing::Before) => "cascade_upd",
        (ParentEvent::Delete, Timing::After) => "cascade_del_after",
        (ParentEvent::Update, Timing::After) => "cascade_upd_after",
    };
    fit(format!("epidemic_{parent}_{suffix}"))
}

/// How cascaded rows reach the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CascadeMode {
    /// The BEFORE trigger copies the child rows into the pending table
    /// `epidemic_pend_<child>` and the AFTER trigger moves them into the log once the
    /// parent row really was deleted or updated: a row that `DELETE IGNORE` or `UPDATE
    /// IGNORE` skips (another foreign key blocks it, a duplicate key) logs nothing.
    /// Needs several triggers per table and event, and the ids of one `INSERT ...
    /// SELECT` to be consecutive (`innodb_autoinc_lock_mode` 0 or 1).
    Staged,
    /// The BEFORE trigger writes the log directly: a parent row then skipped by an
    /// IGNORE statement leaves the cascade that did not happen in the log.
    Direct,
}

/// One cascade from a parent table into a watched table.
#[derive(Debug, Clone)]
pub(crate) struct CascadeCapture {
    pub parent: String,
    pub event: ParentEvent,
    /// For messages: the constraints from the watched table up.
    pub path: Vec<String>,
    pub watched: String,
    pub log_table: String,
    /// `` `op`, `changed_at`, `old_a`, ... `` of the log.
    columns: String,
    /// `SELECT 'D', <now>, ... FROM ... WHERE ...`: the rows the cascade touches.
    select: String,
    /// For an update: the condition under which the cascade happens at all (the
    /// referenced columns change).
    guard: Option<String>,
    /// For an update: the parent's referenced columns.
    parent_columns: Vec<String>,
}

impl CascadeCapture {
    fn var(&self, what: &str) -> String {
        let id = format!("{}/{}/{}", self.parent, self.event.sql(), self.watched);
        format!("@`epidemic_{:08x}_{what}`", fnv1a32(&id))
    }

    fn guarded(&self, inner: &str, otherwise: Option<&str>) -> String {
        match (&self.guard, otherwise) {
            (None, _) => inner.to_owned(),
            (Some(g), None) => format!("IF {g} THEN\n        {inner};\n    END IF"),
            (Some(g), Some(o)) => {
                format!("IF {g} THEN\n        {inner};\n    ELSE\n        {o};\n    END IF")
            }
        }
    }

    /// The parent's BEFORE statement.
    pub fn before(&self, mode: CascadeMode, pend: &str) -> String {
        match mode {
            CascadeMode::Direct => self.guarded(
                &format!(
                    "INSERT INTO {} ({}) {}",
                    quote(&self.log_table),
                    self.columns,
                    self.select
                ),
                None,
            ),
            CascadeMode::Staged => {
                let (n, lo) = (self.var("n"), self.var("lo"));
                // ROW_COUNT() and LAST_INSERT_ID() of the INSERT ... SELECT: how many rows
                // and the first of their consecutive ids.
                self.guarded(
                    &format!(
                        "INSERT INTO {} ({}) {};\n        SET {n} = ROW_COUNT(), {lo} = LAST_INSERT_ID()",
                        quote(pend),
                        self.columns,
                        self.select
                    ),
                    Some(&format!("SET {n} = 0")),
                )
            }
        }
    }

    /// The parent's AFTER statement (staged mode only). AFTER DELETE runs only for a row
    /// really deleted; AFTER UPDATE runs also for a row `UPDATE IGNORE` skipped, so it
    /// checks, as the tables' own UPDATE triggers do, that the parent row under the old
    /// key no longer holds the old referenced values.
    pub fn after(&self, pend: &str, parent_key: Option<&[String]>) -> String {
        let (n, lo) = (self.var("n"), self.var("lo"));
        let pend_q = quote(pend);
        let mv = format!(
            "INSERT INTO {} ({cols}) SELECT {cols} FROM {pend_q} WHERE `id` = `i`",
            quote(&self.log_table),
            cols = self.columns
        );
        let delete = format!("DELETE FROM {pend_q} WHERE `id` = `i`");
        let happened = match (self.event, parent_key) {
            (ParentEvent::Update, Some(key)) => {
                let at_old_key: Vec<String> = key
                    .iter()
                    .map(|k| format!("`epidemic_row`.{} = OLD.{}", quote(k), quote(k)))
                    .chain(self.parent_columns.iter().map(|p| {
                        format!(
                            "CAST(`epidemic_row`.{q} AS BINARY) <=> CAST(OLD.{q} AS BINARY)",
                            q = quote(p)
                        )
                    }))
                    .collect();
                Some(format!(
                    "NOT EXISTS (SELECT 1 FROM {} AS `epidemic_row` WHERE {})",
                    quote(&self.parent),
                    at_old_key.join(" AND ")
                ))
            }
            _ => None,
        };
        let body = match happened {
            None => format!("{mv};\n                {delete};"),
            Some(h) => format!(
                "IF {h} THEN\n                    {mv};\n                END IF;\n                {delete};"
            ),
        };
        format!(
            "IF {n} > 0 THEN\n        BEGIN\n            DECLARE `i` BIGINT DEFAULT {lo};\n            \
             WHILE `i` < {lo} + {n} DO\n                {body}\n                SET `i` = `i` + 1;\n            \
             END WHILE;\n            SET {n} = 0;\n        END;\n    END IF"
        )
    }
}

fn refuse(msg: String) -> BackendError {
    BackendError::Invalid(msg)
}

/// Every cascade that reaches `w`, as statements for its ancestors' BEFORE triggers, or
/// the reason one cannot be captured.
pub(crate) fn captures(
    w: &WatchedTable<'_>,
    fks: &[ForeignKey],
    now: &str,
) -> Result<Vec<CascadeCapture>, BackendError> {
    let mut out = Vec::new();
    for f in fks.iter().filter(|f| f.child == w.table) {
        check_edge(f, w.table)?;
        if f.on_update.acts() {
            // A cascade that rewrites the parent columns this key follows would update
            // the watched rows with no trigger on the parent's row either.
            if let Some(g) = fks.iter().find(|g| {
                g.child == f.parent
                    && (g.on_update.acts() || g.on_delete == FkRule::SetNull)
                    && f.columns
                        .iter()
                        .any(|(_, p)| g.columns.iter().any(|(c, _)| c.eq_ignore_ascii_case(p)))
            }) {
                return Err(refuse(format!(
                    "cannot capture the chained update of table {}: {} changes the columns that {} follows; \
                     Epidemic captures only direct ON UPDATE actions",
                    w.table,
                    g.what(),
                    f.what()
                )));
            }
            if let Some(c) = update_capture(w, f, now) {
                out.push(c);
            }
        }
        if f.on_delete.acts() {
            let mut path = vec![f];
            walk(w, fks, &mut path, now, &mut out)?;
        }
    }
    // Two paths from one parent into this table would log the same row twice.
    for (i, a) in out.iter().enumerate() {
        if let Some(b) = out[i + 1..]
            .iter()
            .find(|b| b.parent == a.parent && b.event == a.event)
        {
            return Err(refuse(format!(
                "cannot capture cascades into table {}: table {} reaches it through two paths ({} and {}), \
                 so one {} would be logged twice",
                w.table,
                a.parent,
                a.path.join(" <- "),
                b.path.join(" <- "),
                a.event.sql()
            )));
        }
    }
    Ok(out)
}

fn check_edge(f: &ForeignKey, watched: &str) -> Result<(), BackendError> {
    let acts = f.on_delete.acts() || f.on_update.acts();
    if !acts {
        return Ok(());
    }
    // These names become SQL in the parent's trigger.
    for t in [&f.child, &f.parent] {
        ident::check("table", t)?;
    }
    for (c, p) in &f.columns {
        ident::check("column", c)?;
        ident::check("column", p)?;
    }
    if f.on_delete == FkRule::SetDefault || f.on_update == FkRule::SetDefault {
        return Err(refuse(format!(
            "cannot capture {}: SET DEFAULT actions are not supported (watched table {watched})",
            f.what()
        )));
    }
    if !f.local {
        return Err(refuse(format!(
            "cannot capture {}: the parent table is in another database (watched table {watched})",
            f.what()
        )));
    }
    Ok(())
}

/// Follow `ON DELETE CASCADE` keys up from the top of `path`, recording a capture for the
/// parent of every step.
fn walk<'f>(
    w: &WatchedTable<'_>,
    fks: &'f [ForeignKey],
    path: &mut Vec<&'f ForeignKey>,
    now: &str,
    out: &mut Vec<CascadeCapture>,
) -> Result<(), BackendError> {
    let top = *path.last().expect("a path has a first step");
    // A table met again (itself included) is a cycle: its depth has no bound.
    let seen =
        |t: &str| t == w.table || path.iter().any(|p| p.parent == t && !std::ptr::eq(*p, top));
    if seen(&top.parent) {
        return Err(refuse(format!(
            "cannot capture cascades into table {}: {} closes a cycle, so a cascade can go to any depth",
            w.table,
            top.what()
        )));
    }
    if path.len() > MAX_DEPTH {
        return Err(refuse(format!(
            "cannot capture cascades into table {}: {} is more than {MAX_DEPTH} cascades away",
            w.table,
            top.what()
        )));
    }
    if let Some(c) = delete_capture(w, path, now) {
        out.push(c);
    }
    for g in fks
        .iter()
        .filter(|g| g.child == top.parent && g.on_delete == FkRule::Cascade)
    {
        check_edge(g, w.table)?;
        path.push(g);
        walk(w, fks, path, now, out)?;
        path.pop();
    }
    Ok(())
}

fn alias(i: usize) -> String {
    quote(&format!("epidemic_c{i}"))
}

fn column_list(w: &WatchedTable<'_>, prefix: &str) -> String {
    w.columns
        .iter()
        .map(|c| quote(&log_column(prefix, c)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What a cascade writes into a child column, from the parent column's name.
type SetColumn<'a> = &'a dyn Fn(&str) -> String;

/// The watched row's values, with the foreign key's own columns replaced by `set`.
fn values(w: &WatchedTable<'_>, replace: Option<(&ForeignKey, SetColumn<'_>)>) -> String {
    w.columns
        .iter()
        .map(|c| match replace {
            Some((f, set)) if f.child_has(c) => {
                let parent_col = f
                    .columns
                    .iter()
                    .find(|(ch, _)| ch.eq_ignore_ascii_case(c))
                    .map_or("", |(_, p)| p.as_str());
                set(parent_col)
            }
            _ => format!("{}.{}", alias(0), quote(c)),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `INSERT INTO log ... SELECT` of the rows of the watched table that deleting the parent
/// row (`OLD`) at the top of `path` deletes (or sets to NULL). `None` when the action
/// changes no watched column.
fn delete_capture(w: &WatchedTable<'_>, path: &[&ForeignKey], now: &str) -> Option<CascadeCapture> {
    let first = path[0];
    let (op, columns, vals) = match first.on_delete {
        FkRule::Cascade => ("D", column_list(w, "old"), values(w, None)),
        FkRule::SetNull => {
            if !w.columns.iter().any(|c| first.child_has(c)) {
                return None;
            }
            let null = |_: &str| "NULL".to_owned();
            (
                "U",
                format!("{}, {}", column_list(w, "old"), column_list(w, "new")),
                format!("{}, {}", values(w, None), values(w, Some((first, &null)))),
            )
        }
        FkRule::Nothing | FkRule::SetDefault => return None,
    };
    let mut from = format!("{} AS {}", quote(w.table), alias(0));
    for (i, f) in path[..path.len() - 1].iter().enumerate() {
        let on: Vec<String> = f
            .columns
            .iter()
            .map(|(c, p)| format!("{}.{} = {}.{}", alias(i), quote(c), alias(i + 1), quote(p)))
            .collect();
        from.push_str(&format!(
            " JOIN {} AS {} ON {}",
            quote(&f.parent),
            alias(i + 1),
            on.join(" AND ")
        ));
    }
    let last = path.len() - 1;
    let cond: Vec<String> = path[last]
        .columns
        .iter()
        .map(|(c, p)| format!("{}.{} = OLD.{}", alias(last), quote(c), quote(p)))
        .collect();
    Some(CascadeCapture {
        parent: path[last].parent.clone(),
        event: ParentEvent::Delete,
        path: path.iter().map(|p| p.name.clone()).collect(),
        watched: w.table.to_owned(),
        log_table: w.log_table.to_owned(),
        columns: format!("`op`, `changed_at`, {columns}"),
        select: format!(
            "SELECT '{op}', {now}, {vals} FROM {from} WHERE {}",
            cond.join(" AND ")
        ),
        guard: None,
        parent_columns: Vec::new(),
    })
}

/// The statement for a parent key update that `f` carries over (or sets to NULL) in the
/// watched table; `None` when the key's columns are not watched.
fn update_capture(w: &WatchedTable<'_>, f: &ForeignKey, now: &str) -> Option<CascadeCapture> {
    if !w.columns.iter().any(|c| f.child_has(c)) {
        return None;
    }
    let set: SetColumn<'_> = match f.on_update {
        FkRule::Cascade => &|p: &str| format!("NEW.{}", quote(p)),
        FkRule::SetNull => &|_: &str| "NULL".to_owned(),
        FkRule::Nothing | FkRule::SetDefault => return None,
    };
    // InnoDB carries the update over when the referenced bytes change.
    let unchanged: Vec<String> = f
        .columns
        .iter()
        .map(|(_, p)| {
            let q = quote(p);
            format!("CAST(OLD.{q} AS BINARY) <=> CAST(NEW.{q} AS BINARY)")
        })
        .collect();
    let cond: Vec<String> = f
        .columns
        .iter()
        .map(|(c, p)| format!("{}.{} = OLD.{}", alias(0), quote(c), quote(p)))
        .collect();
    Some(CascadeCapture {
        parent: f.parent.clone(),
        event: ParentEvent::Update,
        path: vec![f.name.clone()],
        watched: w.table.to_owned(),
        log_table: w.log_table.to_owned(),
        columns: format!(
            "`op`, `changed_at`, {}, {}",
            column_list(w, "old"),
            column_list(w, "new")
        ),
        select: format!(
            "SELECT 'U', {now}, {}, {} FROM {} AS {} WHERE {}",
            values(w, None),
            values(w, Some((f, set))),
            quote(w.table),
            alias(0),
            cond.join(" AND ")
        ),
        guard: Some(format!("NOT ({})", unchanged.join(" AND "))),
        parent_columns: f.columns.iter().map(|(_, p)| p.clone()).collect(),
    })
}

/// The body of one parent's cascade trigger.
pub(crate) fn body(statements: &[&str]) -> String {
    let mut s = String::from("BEGIN\n");
    for stmt in statements {
        s.push_str("    ");
        s.push_str(stmt);
        s.push_str(";\n");
    }
    s.push_str("END");
    s
}

/// A watched table's log, as the cascade planner needs it.
#[derive(Debug, Clone)]
pub(crate) struct WatchedLog {
    pub table: String,
    pub log_table: String,
    /// The captured columns (the key's included: a cascaded change has a key too).
    pub columns: Vec<String>,
}

impl WatchedLog {
    fn view(&self) -> WatchedTable<'_> {
        WatchedTable {
            table: &self.table,
            log_table: &self.log_table,
            columns: &self.columns,
        }
    }
}

/// Whether `t` is one of the parents' cascade triggers Epidemic creates.
pub(crate) fn is_cascade_trigger(t: &ExistingTrigger) -> bool {
    KINDS.iter().any(|(e, timing)| {
        t.name == trigger_name(&t.table, *e, *timing) && t.timing == timing.sql()
    })
}

/// How cascaded rows reach the log on this server (see [`CascadeMode`]).
pub(crate) fn mode(conn: &mut Conn, server: ServerInfo) -> CascadeMode {
    if !server.multiple_triggers() {
        return CascadeMode::Direct;
    }
    match conn.query_first::<Option<i64>, _>("SELECT @@innodb_autoinc_lock_mode") {
        Ok(Some(Some(0 | 1))) => CascadeMode::Staged,
        _ => CascadeMode::Direct,
    }
}

/// A parent's cascade trigger a watched table needs: (parent, trigger name, whether it is
/// there and current).
pub(crate) type CascadeTrigger = (String, String, bool);

/// For `status`: the parents' cascade triggers a watched table needs, each with
/// whether it is there and current (`Ok`), or why its cascades cannot be captured.
pub(crate) fn status_triggers(
    conn: &mut Conn,
    server: ServerInfo,
    log: &WatchedLog,
    fks: &[ForeignKey],
    mode: CascadeMode,
) -> Result<Result<Vec<CascadeTrigger>, String>, BackendError> {
    let captures = match captures(&log.view(), fks, now_expr(server)) {
        Ok(c) => c,
        Err(e) => return Ok(Err(e.to_string())),
    };
    let mut catalog = MySqlCatalog::new(conn);
    let triggers = catalog.triggers()?;
    let pend = pend_table_name(&log.table);
    let mut out = Vec::new();
    for c in &captures {
        let mut wanted = vec![(Timing::Before, c.before(mode, &pend))];
        if mode == CascadeMode::Staged {
            let key = catalog.unique_row_key(&c.parent)?;
            wanted.push((Timing::After, c.after(&pend, key.as_deref())));
        }
        for (timing, statement) in wanted {
            let name = trigger_name(&c.parent, c.event, timing);
            let here = triggers.iter().any(|t| {
                t.name == name
                    && t.table == c.parent
                    && t.timing == timing.sql()
                    && t.body.contains(&statement)
            });
            out.push((c.parent.clone(), name, here));
        }
    }
    Ok(Ok(out))
}

/// The statements that bring the parents' cascade triggers and the pending tables up
/// to date for every watched table in `tables` (this install's and those already
/// registered), including dropping ones no longer needed. `earlier` is the plan so far.
pub(crate) fn plan(
    conn: &mut Conn,
    server: ServerInfo,
    mut tables: Vec<WatchedLog>,
    triggers: &[ExistingTrigger],
    earlier: &[String],
) -> Result<Vec<String>, BackendError> {
    let mode = mode(conn, server);
    let mut catalog = MySqlCatalog::new(conn);
    let fks = catalog.foreign_keys()?;
    tables.sort_by(|a, b| a.table.cmp(&b.table));
    let now = now_expr(server);
    let mut all: Vec<CascadeCapture> = Vec::new();
    for t in &tables {
        all.extend(captures(&t.view(), &fks, now)?);
    }
    let mut plan = Vec::new();

    // Pending tables: the log table's exact shape (`CREATE TABLE ... LIKE`), made
    // again whenever the log table changes. Between statements they hold only rows
    // of parent rows an IGNORE statement skipped, which are garbage.
    for t in &tables {
        let pend = pend_table_name(&t.table);
        let needed = mode == CascadeMode::Staged && all.iter().any(|c| c.watched == t.table);
        let exists = catalog.table_exists(&pend)?;
        if !needed {
            if exists {
                plan.push(format!("DROP TABLE {}", quote(&pend)));
            }
            continue;
        }
        let log_q = quote(&t.log_table);
        let log_changes = earlier.iter().any(|s| {
            s.starts_with(&format!("ALTER TABLE {log_q}"))
                || s.starts_with(&format!("CREATE TABLE {log_q}"))
        });
        let same_shape = exists && !log_changes && {
            let a = catalog.columns_of(&pend)?;
            let b = catalog.columns_of(&t.log_table)?;
            a.len() == b.len()
                && a.iter()
                    .zip(&b)
                    .all(|(x, y)| x.name == y.name && x.same_type(y))
        };
        if !same_shape {
            if exists {
                plan.push(format!("DROP TABLE {}", quote(&pend)));
            }
            plan.push(format!("CREATE TABLE {} LIKE {log_q}", quote(&pend)));
        }
    }

    let mut parents: Vec<(String, ParentEvent)> =
        all.iter().map(|c| (c.parent.clone(), c.event)).collect();
    parents.sort_by(|a, b| (a.0.as_str(), a.1.sql()).cmp(&(b.0.as_str(), b.1.sql())));
    parents.dedup();
    let mut wanted_names: Vec<String> = Vec::new();
    for (parent, event) in &parents {
        let parent_table = catalog.catalog_table(parent)?;
        let mine: Vec<&CascadeCapture> = all
            .iter()
            .filter(|c| c.parent == *parent && c.event == *event)
            .collect();
        let mut bodies = vec![(
            Timing::Before,
            mine.iter()
                .map(|c| c.before(mode, &pend_table_name(&c.watched)))
                .collect::<Vec<_>>(),
        )];
        if mode == CascadeMode::Staged {
            let key = catalog.unique_row_key(&parent_table.name)?;
            bodies.push((
                Timing::After,
                mine.iter()
                    .map(|c| c.after(&pend_table_name(&c.watched), key.as_deref()))
                    .collect(),
            ));
        }
        for (timing, statements) in bodies {
            let name = trigger_name(parent, *event, timing);
            wanted_names.push(name.clone());
            if !server.multiple_triggers() {
                if let Some(t) = triggers.iter().find(|t| {
                    t.table == *parent
                        && t.event == event.sql()
                        && t.timing == timing.sql()
                        && t.name != name
                }) {
                    return Err(BackendError::Invalid(format!(
                        "table {parent} already has a {} {} trigger ({}) and this server allows only one \
                         per table and event, so the foreign-key cascades into watched tables cannot be captured; \
                         merge it by hand or upgrade to MySQL 5.7.2+/MariaDB 10.2.3+",
                        timing.sql(),
                        event.sql(),
                        t.name
                    )));
                }
            }
            let refs: Vec<&str> = statements.iter().map(String::as_str).collect();
            let body = body(&refs);
            let current = triggers.iter().any(|t| {
                t.name == name
                    && t.table == *parent
                    && t.event == event.sql()
                    && t.timing == timing.sql()
                    && t.body == body
            });
            if current {
                continue;
            }
            // As for the tables' own triggers: no write to the parent between the
            // DROP and the CREATE.
            plan.push(format!("LOCK TABLES {} WRITE", quote(&parent_table.name)));
            plan.push(format!("DROP TRIGGER IF EXISTS {}", quote(&name)));
            plan.push(format!(
                "CREATE TRIGGER {} {} {} ON {} FOR EACH ROW {body}",
                quote(&name),
                timing.sql(),
                event.sql(),
                quote(parent)
            ));
            plan.push("UNLOCK TABLES".to_owned());
        }
    }
    // Cascade triggers no watched table needs any more (a foreign key dropped, the
    // mode changed).
    for t in triggers {
        if is_cascade_trigger(t) && !wanted_names.contains(&t.name) {
            plan.push(format!("DROP TRIGGER IF EXISTS {}", quote(&t.name)));
        }
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fk(name: &str, child: &str, parent: &str, del: FkRule, upd: FkRule) -> ForeignKey {
        ForeignKey {
            name: name.into(),
            child: child.into(),
            parent: parent.into(),
            local: true,
            columns: vec![(format!("{parent}_id"), "id".into())],
            on_delete: del,
            on_update: upd,
        }
    }

    fn watched(cols: &[String]) -> WatchedTable<'_> {
        WatchedTable {
            table: "w",
            log_table: "epidemic_log_w",
            columns: cols,
        }
    }

    #[test]
    fn chains_cycles_and_diamonds() {
        use FkRule::*;
        let cols = vec!["p_id".to_owned(), "name".to_owned()];
        let w = watched(&cols);
        // w -> p (cascade) -> g (cascade): captures on p and on g.
        let fks = vec![
            fk("w_p", "w", "p", Cascade, Cascade),
            fk("p_g", "p", "g", Cascade, Nothing),
        ];
        let got = captures(&w, &fks, "0").unwrap();
        let parents: Vec<(&str, ParentEvent)> =
            got.iter().map(|c| (c.parent.as_str(), c.event)).collect();
        assert_eq!(
            parents,
            vec![
                ("p", ParentEvent::Update),
                ("p", ParentEvent::Delete),
                ("g", ParentEvent::Delete)
            ]
        );
        let before = got[2].before(CascadeMode::Direct, "epidemic_pend_w");
        assert!(before.contains("JOIN `p` AS `epidemic_c1`"), "{before}");
        let staged = got[2].before(CascadeMode::Staged, "epidemic_pend_w");
        assert!(
            staged.starts_with("INSERT INTO `epidemic_pend_w`"),
            "{staged}"
        );
        // A cycle is refused, naming the constraint.
        let fks = vec![
            fk("w_p", "w", "p", Cascade, Nothing),
            fk("p_w", "p", "w", Cascade, Nothing),
        ];
        let err = captures(&w, &fks, "0").unwrap_err().to_string();
        assert!(err.contains("p_w") && err.contains("cycle"), "{err}");
        // Two paths from g into w.
        let fks = vec![
            fk("w_p", "w", "p", Cascade, Nothing),
            fk("w_q", "w", "q", Cascade, Nothing),
            fk("p_g", "p", "g", Cascade, Nothing),
            fk("q_g", "q", "g", Cascade, Nothing),
        ];
        let err = captures(&w, &fks, "0").unwrap_err().to_string();
        assert!(err.contains("two paths"), "{err}");
        // An update cascade whose key columns are not watched logs nothing.
        let cols = vec!["name".to_owned()];
        let w = watched(&cols);
        let fks = vec![fk("w_p", "w", "p", SetNull, Cascade)];
        assert!(captures(&w, &fks, "0").unwrap().is_empty());
    }
}
