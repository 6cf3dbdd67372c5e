//! The SQLite backend driven through the built `.so` exactly as the host drives it
//! (`epidemic_plugin_host::load` + `HostBackend`), on a database file of its own per test:
//! keys, stable ids, what a change carries, and install's refusals.
//!
//! The application's writes and the test's own reads go through the `sqlite3` tool, in a
//! process of its own, never through this test binary's SQLite: the backend library
//! links a second copy of SQLite, and two copies in one process break each other's file
//! locks (POSIX locks are per process; each copy tracks only its own), so one copy's
//! closing connection checkpoints and deletes the WAL under the other's open one, which
//! then reads a stale database (SQLite's "How To Corrupt", 2.2.1).
//!
//! Build the library first: `cargo build -p epidemic-backend-sqlite`.

use std::collections::HashSet;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use epidemic_plugin_host::{self as host, HostBackend, Library};
use epidemic_plugin_sdk::backend::{BackendError, Consumer, Registered, StartFrom, Watch};
use epidemic_plugin_sdk::{Change, Op, Origin, Value};
use epidemic_tests::{backend_path, sqlite};
use serde_json::json;

fn library() -> &'static Library {
    static LIB: OnceLock<Library> = OnceLock::new();
    LIB.get_or_init(|| {
        let lib = host::load(&backend_path("sqlite")).expect("load the sqlite backend");
        lib.expect_backend().expect("a backend library");
        lib
    })
}

/// A database file with `schema` applied, in a temporary directory kept with it.
struct Db {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Db {
    fn new(schema: &str) -> Db {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = sqlite::create_db(dir.path(), "db", schema);
        Db { _dir: dir, path }
    }

    fn open(&self) -> HostBackend {
        library()
            .open_backend(&sqlite::url(&self.path), &json!({}))
            .expect("open backend")
    }

    /// Run `sql` in the `sqlite3` tool (a process of its own); its output, `|`-separated.
    fn sql(&self, sql: &str) -> String {
        sqlite::sqlite3(&self.path, sql)
    }

    /// The application writes.
    fn write(&self, sql: &str) {
        self.sql(sql);
    }

    /// `sqlite3` on the database, waiting for locks, stopping at the first error, reading
    /// SQL from stdin.
    fn sqlite3(&self) -> Command {
        let mut cmd = Command::new("sqlite3");
        cmd.args(["-bail", "-batch", "-cmd", ".timeout 30000"])
            .arg(&self.path)
            .stdin(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }
}

fn watch(table: &str, columns: &[&str], key: &[&str]) -> Watch {
    Watch {
        table: table.into(),
        columns: columns.iter().map(|c| c.to_string()).collect(),
        key: key.iter().map(|c| c.to_string()).collect(),
    }
}

fn consumer(handler: &str) -> Consumer {
    Consumer {
        daemon: "mx1".into(),
        handler: handler.into(),
    }
}

/// Install `watches` and register consumer `handler` reading from the oldest change.
fn setup(db: &Db, watches: &[Watch], handler: &str) -> (HostBackend, Consumer) {
    let mut b = db.open();
    b.install(watches).expect("install");
    let c = consumer(handler);
    let tables: Vec<String> = watches.iter().map(|w| w.table.clone()).collect();
    b.register(&c, &tables, StartFrom::Oldest)
        .expect("register");
    (b, c)
}

/// Fetch and fully ack until a fetch comes back empty. A lock held past the busy timeout
/// (a writer that keeps writing) is a connection error: retried, as the daemon does (the
/// backend writes a refused ack before its next read).
fn drain(b: &mut HostBackend, c: &Consumer) -> Vec<Change> {
    let mut all = Vec::new();
    loop {
        let batch = match b.fetch(c, 100) {
            Ok(batch) => batch,
            Err(e) if e.is_connection() => continue,
            Err(e) => panic!("fetch: {e}"),
        };
        let Some(last) = batch.changes.last() else {
            return all;
        };
        match b.ack(c, &batch.token, last.id) {
            Ok(()) => {}
            Err(e) if e.is_connection() => {}
            Err(e) => panic!("ack: {e}"),
        }
        all.extend(batch.changes);
    }
}

fn ints(v: &[i64]) -> Vec<Value> {
    v.iter().map(|i| Value::Int(*i)).collect()
}

/// (op, key, old_key) of each change.
fn keys(changes: &[Change]) -> Vec<(Op, Vec<Value>, Option<Vec<Value>>)> {
    changes
        .iter()
        .map(|c| (c.op, c.key.clone(), c.old_key.clone()))
        .collect()
}

fn one_line(e: &BackendError) -> String {
    let s = e.to_string();
    assert!(!s.contains('\n'), "not one line: {s}");
    s
}

// ---------------------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------------------

/// A single-column key: every change carries it, an UPDATE that moves the row carries
/// the old key too, and an UPDATE of the key alone (no watched column changed) is a
/// change. The key columns come first among the captured columns, whatever is watched.
#[test]
fn a_single_column_primary_key_comes_with_every_change() {
    let db = Db::new("CREATE TABLE users (ID INTEGER PRIMARY KEY, name TEXT, note TEXT);");
    let mut b = db.open();
    let resolved = b.resolve(&[watch("Users", &["NAME"], &[])]).unwrap();
    assert_eq!(resolved, vec![watch("users", &["name"], &["ID"])]);
    let (mut b, c) = setup(&db, &resolved, "h");
    db.write(
        "INSERT INTO users VALUES (1, 'ann', 'x');
         UPDATE users SET note = 'y' WHERE ID = 1;       -- no captured column: no change
         UPDATE users SET name = 'anne' WHERE ID = 1;
         UPDATE users SET ID = 2 WHERE ID = 1;           -- the key alone
         UPDATE users SET ID = 3, name = 'bo' WHERE ID = 2;
         DELETE FROM users WHERE ID = 3;",
    );
    let got = drain(&mut b, &c);
    assert_eq!(
        keys(&got),
        vec![
            (Op::Insert, ints(&[1]), None),
            (Op::Update, ints(&[1]), None),
            (Op::Update, ints(&[2]), Some(ints(&[1]))),
            (Op::Update, ints(&[3]), Some(ints(&[2]))),
            (Op::Delete, ints(&[3]), None),
        ]
    );
    for ch in &got {
        assert_eq!(&*ch.key_columns, ["ID"]);
        assert_eq!(&*ch.columns, ["ID", "name"]);
        assert!(Arc::ptr_eq(&ch.key_columns, &got[0].key_columns));
    }
    assert_eq!(got[3].old_value("name"), Some(&Value::from("anne")));
    assert_eq!(got[3].new_value("name"), Some(&Value::from("bo")));
}

/// Composite keys, in key order (not column order), on a rowid table and a WITHOUT ROWID
/// table; the DELETE of a row a REPLACE removed carries that row's key.
#[test]
fn composite_primary_keys_come_in_key_order() {
    let db = Db::new(
        "CREATE TABLE grants (host TEXT, uid INTEGER, level INTEGER, PRIMARY KEY (uid, host));
         CREATE TABLE aliases (dom TEXT, local TEXT, target TEXT UNIQUE, PRIMARY KEY (local, dom)) WITHOUT ROWID;",
    );
    let watches = [
        watch("grants", &["level"], &[]),
        watch("aliases", &["target"], &[]),
    ];
    let (mut b, c) = setup(&db, &watches, "h");
    db.write(
        "INSERT INTO grants VALUES ('a', 1, 5);
         UPDATE grants SET host = 'b' WHERE uid = 1;
         INSERT INTO aliases VALUES ('x.org', 'ann', 't1'), ('x.org', 'bob', 't2');
         REPLACE INTO aliases VALUES ('y.org', 'cy', 't1');    -- removes (ann, x.org)
         DELETE FROM grants;",
    );
    let got = drain(&mut b, &c);
    let grants: Vec<&Change> = got.iter().filter(|c| c.table == "grants").collect();
    let aliases: Vec<&Change> = got.iter().filter(|c| c.table == "aliases").collect();
    let t = |a: i64, h: &str| vec![Value::Int(a), Value::from(h)];
    assert_eq!(&*grants[0].key_columns, ["uid", "host"]);
    assert_eq!(
        grants
            .iter()
            .map(|c| (c.op, c.key.clone(), c.old_key.clone()))
            .collect::<Vec<_>>(),
        vec![
            (Op::Insert, t(1, "a"), None),
            (Op::Update, t(1, "b"), Some(t(1, "a"))),
            (Op::Delete, t(1, "b"), None),
        ]
    );
    let s = |l: &str, d: &str| vec![Value::from(l), Value::from(d)];
    assert_eq!(&*aliases[0].key_columns, ["local", "dom"]);
    assert_eq!(
        aliases
            .iter()
            .map(|c| (c.op, c.key.clone()))
            .collect::<Vec<_>>(),
        vec![
            (Op::Insert, s("ann", "x.org")),
            (Op::Insert, s("bob", "x.org")),
            (Op::Delete, s("ann", "x.org")),
            (Op::Insert, s("cy", "y.org")),
        ]
    );
}

/// A rowid table without a declared primary key has no key (its rowid can be
/// renumbered): resolve and install refuse it with one line naming the table and the
/// fix; with a configured key it is accepted and that key comes with every change.
#[test]
fn a_table_without_a_primary_key_needs_a_configured_key() {
    let db = Db::new("CREATE TABLE events (Kind TEXT, at INTEGER, payload TEXT);");
    let mut b = db.open();
    for err in [
        b.resolve(&[watch("events", &["payload"], &[])])
            .expect_err("resolve must refuse"),
        b.install(&[watch("events", &["payload"], &[])])
            .expect_err("install must refuse"),
        b.plan_install(&[watch("events", &["payload"], &[])])
            .expect_err("sql must refuse"),
    ] {
        assert!(matches!(err, BackendError::Invalid(_)), "{err:?}");
        let msg = one_line(&err);
        assert!(msg.contains("table events has no primary key"), "{msg}");
        assert!(msg.contains("[table.events] key = [\"column\""), "{msg}");
    }
    assert_eq!(
        db.sql("SELECT name FROM sqlite_master WHERE name LIKE 'epidemic%';"),
        "",
        "a refused install created something"
    );
    let resolved = b
        .resolve(&[watch("events", &["payload"], &["kind", "AT"])])
        .unwrap();
    assert_eq!(resolved[0].key, ["Kind", "at"]);
    let (mut b, c) = setup(&db, &resolved, "h");
    db.write(
        "INSERT INTO events VALUES ('login', 1, 'p');
         UPDATE events SET at = 2;",
    );
    let got = drain(&mut b, &c);
    assert_eq!(&*got[0].key_columns, ["Kind", "at"]);
    assert_eq!(got[0].key, vec![Value::from("login"), Value::Int(1)]);
    assert_eq!(
        got[1].old_key,
        Some(vec![Value::from("login"), Value::Int(1)])
    );
    assert_eq!(got[1].key, vec![Value::from("login"), Value::Int(2)]);
}

#[test]
fn configured_key_columns_that_do_not_exist_are_refused() {
    let db = Db::new("CREATE TABLE events (kind TEXT, payload TEXT);");
    let mut b = db.open();
    let bad = [watch("events", &["payload"], &["kind", "nope"])];
    for err in [
        b.resolve(&bad).expect_err("resolve must refuse"),
        b.install(&bad).expect_err("install must refuse"),
    ] {
        assert!(matches!(err, BackendError::Invalid(_)), "{err:?}");
        let msg = one_line(&err);
        assert!(
            msg.contains("[table.events] key: table events has no column nope"),
            "{msg}"
        );
    }
    let err = b
        .install(&[watch(
            "events",
            &["payload"],
            &["kind\"; DROP TABLE events; --"],
        )])
        .expect_err("an identifier that is no name is refused");
    assert!(matches!(err, BackendError::Invalid(_)), "{err:?}");
}

/// Reinstalling with another key loses nothing, under a writer that keeps writing: every
/// row's change arrives once, in order, and each carries the key it was logged under.
#[test]
fn reinstalling_with_another_key_loses_nothing() {
    const ROWS: i64 = 3000;
    let db =
        Db::new("CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT NOT NULL, n INTEGER);");
    let (mut b, c) = setup(&db, &[watch("users", &["n"], &[])], "h");
    let script: String = (1..=ROWS)
        .map(|i| format!("INSERT INTO users VALUES ({i}, 'u{i}', {i});\n"))
        .collect();
    let mut writer = db
        .sqlite3()
        .stdout(Stdio::null())
        .spawn()
        .expect("run sqlite3");
    let mut stdin = writer.stdin.take().expect("stdin");
    let feed = std::thread::spawn(move || stdin.write_all(script.as_bytes()));
    let mut admin = db.open();
    let mut got = Vec::new();
    let mut installs = 0;
    while installs < 2 || writer.try_wait().expect("wait").is_none() {
        let key: &[&str] = if installs % 2 == 0 { &["email"] } else { &[] };
        match admin.install(&[watch("users", &["n"], key)]) {
            Ok(_) => installs += 1,
            Err(e) if e.is_connection() => continue,
            Err(e) => panic!("install: {e}"),
        }
        got.extend(drain(&mut b, &c));
    }
    feed.join().unwrap().expect("feed sqlite3");
    let status = writer.wait_with_output().expect("sqlite3");
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    // And once more each way, for certain, whatever the writer's timing was.
    for (n, key) in [(ROWS + 1, &["email"][..]), (ROWS + 2, &[][..])] {
        admin.install(&[watch("users", &["n"], key)]).unwrap();
        db.write(&format!("INSERT INTO users VALUES ({n}, 'u{n}', {n});"));
    }
    got.extend(drain(&mut b, &c));
    let ns: Vec<i64> = got
        .iter()
        .map(|c| c.value("n").and_then(Value::as_i64).unwrap())
        .collect();
    assert_eq!(ns, (1..=ROWS + 2).collect::<Vec<_>>(), "lost or repeated");
    let mut saw = HashSet::new();
    for ch in &got {
        let n = ch.value("n").and_then(Value::as_i64).unwrap();
        match &*ch.key_columns {
            [k] if k == "id" => assert_eq!(ch.key, ints(&[n])),
            [k] if k == "email" => assert_eq!(ch.key, vec![Value::Text(format!("u{n}"))]),
            other => panic!("key columns {other:?}"),
        }
        saw.insert(ch.key_columns.to_vec());
    }
    assert_eq!(saw.len(), 2);
    assert_eq!(&*got[ROWS as usize].key_columns, ["email"]);
    assert_eq!(&*got[ROWS as usize + 1].key_columns, ["id"]);
}

/// A key column renamed after install is drift in `status`: SQLite renames it inside the
/// triggers, so its values keep flowing under the old name until the next install.
#[test]
fn a_renamed_key_column_is_drift() {
    let db = Db::new("CREATE TABLE events (kind TEXT, payload TEXT);");
    let (mut b, _) = setup(&db, &[watch("events", &["payload"], &["kind"])], "h");
    assert!(b.status().unwrap().tables[0].problems.is_empty());
    db.write("ALTER TABLE events RENAME COLUMN kind TO sort;");
    let problems = b.status().unwrap().tables[0].problems.clone();
    assert!(
        problems
            .iter()
            .any(|p| p.contains("column kind of table events") && p.contains("part of the key")),
        "{problems:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Stable ids and what else a change carries
// ---------------------------------------------------------------------------------------

const USERS: &str = "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT);";

fn stable_ids(changes: &[Change]) -> Vec<String> {
    changes.iter().map(|c| c.stable_id.clone()).collect()
}

/// Write `n` rows from id `from` and return their changes' stable ids.
fn write_and_read(db: &Db, b: &mut HostBackend, c: &Consumer, from: i64, n: i64) -> Vec<String> {
    for i in from..from + n {
        db.write(&format!("INSERT INTO users VALUES ({i}, 'u{i}')"));
    }
    let got = drain(b, c);
    assert_eq!(got.len() as i64, n, "{got:?}");
    stable_ids(&got)
}

fn assert_all_new(seen: &mut HashSet<String>, ids: Vec<String>) {
    for id in ids {
        assert!(!id.is_empty());
        assert!(seen.insert(id.clone()), "stable id {id} was used before");
    }
}

/// What SQLite cannot give cheaply is absent, as `capabilities()` says; the rest is there.
#[test]
fn changes_say_what_the_capabilities_say() {
    let db = Db::new(USERS);
    let (mut b, c) = setup(&db, &[watch("users", &["name"], &[])], "h");
    let caps = b.capabilities();
    assert!(!caps.transaction_ids && !caps.commit_order && !caps.schemas);
    db.write(
        "BEGIN; INSERT INTO users VALUES (1, 'a'); INSERT INTO users VALUES (2, 'b'); COMMIT;",
    );
    let got = drain(&mut b, &c);
    assert_eq!(got.len(), 2);
    for ch in &got {
        assert_eq!((ch.txid, ch.commit_seq, &ch.schema), (None, None, &None));
        assert_eq!(ch.origin, Origin::Live);
        assert!(ch.changed_at_us > 0);
        assert!(
            ch.stable_id.ends_with(&format!("-{}", ch.id)),
            "{}",
            ch.stable_id
        );
    }
    assert_ne!(got[0].stable_id, got[1].stable_id);
}

#[test]
fn stable_ids_are_not_reused_after_uninstall_and_install() {
    let db = Db::new(USERS);
    let w = [watch("users", &["name"], &[])];
    let mut seen = HashSet::new();
    for round in 0..3 {
        let (mut b, c) = setup(&db, &w, "h");
        // Log ids start again at 1 after each uninstall; stable ids must not.
        let ids = write_and_read(&db, &mut b, &c, round * 10 + 1, 3);
        assert!(ids[0].ends_with("-1"), "{ids:?}");
        assert_all_new(&mut seen, ids);
        b.uninstall().unwrap();
    }
}

/// A log table dropped by hand is created again by install, with a new identity; and the
/// consumers' cursors, which point into the old log, do not make the new log's first
/// changes be skipped.
#[test]
fn stable_ids_are_not_reused_after_the_log_table_is_dropped_by_hand() {
    let db = Db::new(USERS);
    let w = [watch("users", &["name"], &[])];
    let (mut b, c) = setup(&db, &w, "h");
    let mut seen = HashSet::new();
    assert_all_new(&mut seen, write_and_read(&db, &mut b, &c, 1, 5));
    db.write("DROP TABLE epidemic_log_users;");
    b.install(&w).unwrap();
    assert_eq!(
        b.register(&c, &["users".into()], StartFrom::Oldest)
            .unwrap(),
        Registered::Existing
    );
    assert_all_new(&mut seen, write_and_read(&db, &mut b, &c, 100, 3));
}

/// The log's `sqlite_sequence` row lost after pruning (a restore from a copy without it)
/// and changes written before the next install: SQLite numbers them from 1 again. Install
/// makes a new identity, so a consumer that reads them (one that starts from the oldest
/// change) never sees a stable id another change had.
#[test]
fn stable_ids_are_not_reused_after_the_sequence_restarts() {
    let db = Db::new(USERS);
    let w = [watch("users", &["name"], &[])];
    let (mut b, c) = setup(&db, &w, "h");
    let mut seen = HashSet::new();
    assert_all_new(&mut seen, write_and_read(&db, &mut b, &c, 1, 5));
    assert_eq!(b.prune().unwrap(), 5);
    db.write(
        "DELETE FROM sqlite_sequence WHERE name = 'epidemic_log_users';
         INSERT INTO users VALUES (10, 'again'), (11, 'again');",
    );
    let problems = b.status().unwrap().tables[0].problems.clone();
    assert!(
        problems.iter().any(|p| p.contains("sqlite_sequence")),
        "{problems:?}"
    );
    b.install(&w).unwrap();
    assert!(b.status().unwrap().tables[0].problems.is_empty());
    let fresh = consumer("fresh");
    b.register(&fresh, &["users".into()], StartFrom::Oldest)
        .unwrap();
    for i in 20..23 {
        db.write(&format!("INSERT INTO users VALUES ({i}, 'u{i}')"));
    }
    let got = drain(&mut b, &fresh);
    assert_eq!(got.len(), 5, "{got:?}");
    assert_eq!(got[0].id, 1, "SQLite numbered from 1 again");
    assert_all_new(&mut seen, stable_ids(&got));
    // `h` is past the ids numbered again and gets what came after the install, under
    // the same stable ids as every other consumer.
    let got_h = drain(&mut b, &c);
    assert_eq!(stable_ids(&got_h), stable_ids(&got[2..]));
}

/// The same when no cursor remembers how far the log went: the only consumer read
/// without acknowledging and was evicted, and prune then deleted everything. What prune
/// deleted is recorded, so install still sees that the sequence went back.
#[test]
fn stable_ids_are_not_reused_after_the_sequence_restarts_behind_an_evicted_consumer() {
    let db = Db::new(USERS);
    let w = [watch("users", &["name"], &[])];
    let (mut b, c) = setup(&db, &w, "h");
    db.write("INSERT INTO users VALUES (1, 'a'), (2, 'b'), (3, 'c')");
    let batch = b.fetch(&c, 100).unwrap();
    assert_eq!(batch.changes.len(), 3);
    let mut seen = HashSet::new();
    assert_all_new(&mut seen, stable_ids(&batch.changes));
    db.write("UPDATE epidemic_cursor SET last_seen = 0;");
    assert_eq!(
        b.evict_stale(Duration::from_secs(1)).unwrap(),
        vec![c.clone()]
    );
    assert_eq!(b.prune().unwrap(), 3);
    db.write("DELETE FROM sqlite_sequence WHERE name = 'epidemic_log_users';");
    b.install(&w).unwrap();
    assert_eq!(
        b.register(&c, &["users".into()], StartFrom::Oldest)
            .unwrap(),
        Registered::Evicted
    );
    assert_all_new(&mut seen, write_and_read(&db, &mut b, &c, 10, 3));
}
