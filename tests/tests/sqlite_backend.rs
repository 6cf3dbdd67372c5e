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
use epidemic_plugin_sdk::backend::{
    BackendError, BackfillReply, BackfillRequest, BackfillState, Chunk, ChunkRequest, Consumer,
    Registered, StartFrom, Watch,
};
use epidemic_plugin_sdk::{Change, Op, Origin, Value};
use epidemic_tests::reader::read_backlog_beside_a_stream;
use epidemic_tests::rng::Rng;
use epidemic_tests::{backend_path, recorded, sqlite, wait_until, Daemon};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);

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
        ..Watch::default()
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
    let mut want = watch("users", &["name"], &["ID"]);
    want.types = vec![epidemic_plugin_sdk::backend::ColumnType::Text];
    assert_eq!(resolved, vec![want]);
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

// ---------------------------------------------------------------------------------------
// Backfills: chunks by key, watermarks, the progress store
// ---------------------------------------------------------------------------------------

/// `snapshot_chunk`, retried on a lock held past the busy timeout (a connection error,
/// as the daemon retries it).
fn chunk(b: &mut HostBackend, table: &str, after: Option<Vec<Value>>, limit: u32) -> Chunk {
    loop {
        match b.snapshot_chunk(&ChunkRequest {
            table: table.into(),
            after: after.clone(),
            limit,
            only: Vec::new(),
        }) {
            Ok(c) => return c,
            Err(e) if e.is_connection() => continue,
            Err(e) => panic!("snapshot_chunk: {e}"),
        }
    }
}

/// Every chunk of a table from the start, by `limit` rows, checking `last` and the
/// estimate on the way.
fn all_chunks(b: &mut HostBackend, table: &str, limit: u32) -> Vec<Chunk> {
    let mut chunks: Vec<Chunk> = Vec::new();
    let mut after = None;
    loop {
        let c = chunk(b, table, after.clone(), limit);
        assert!(c.rows.len() <= limit as usize);
        assert_eq!(
            c.last,
            c.rows.len() < limit as usize,
            "last: fewer rows than asked"
        );
        assert_eq!(
            c.rows_estimate.is_some(),
            after.is_none(),
            "an estimate with the first chunk only"
        );
        after = c.rows.last().map(|r| r.key.clone()).or(after);
        let last = c.last;
        chunks.push(c);
        if last {
            return chunks;
        }
    }
}

fn chunk_keys(chunks: &[Chunk]) -> Vec<Vec<Value>> {
    chunks
        .iter()
        .flat_map(|c| c.rows.iter().map(|r| r.key.clone()))
        .collect()
}

/// Chunks come in key order, composite keys compared as a row (key order, not column
/// order) and text keys by the column's collation, `after` pages to the end, and `last`
/// is set by the chunk that has fewer rows than asked (an empty one when the rows divide
/// evenly). Snapshot rows are INSERTs of origin Snapshot with id 0, the captured columns
/// in the log's order and stable ids of their own.
#[test]
fn chunks_come_in_key_order_by_composite_and_text_keys() {
    let db = Db::new(
        "CREATE TABLE grants (host TEXT, uid INTEGER, level INTEGER, PRIMARY KEY (uid, host));
         CREATE TABLE names (name TEXT COLLATE NOCASE PRIMARY KEY, v INTEGER) WITHOUT ROWID;",
    );
    let mut b = db.open();
    b.install(&[
        watch("grants", &["level"], &[]),
        watch("names", &["v"], &[]),
    ])
    .unwrap();
    // Inserted out of order.
    let mut script = String::new();
    for uid in [3, 1, 5, 2, 4] {
        for host in ["b", "B", "c", "a"] {
            script.push_str(&format!(
                "INSERT INTO grants VALUES ('{host}', {uid}, {});\n",
                uid * 10
            ));
        }
    }
    for (i, n) in [
        "delta", "Alpha", "charlie", "épée", "bravo", "Echo", "9", "10",
    ]
    .iter()
    .enumerate()
    {
        script.push_str(&format!("INSERT INTO names VALUES ('{n}', {i});\n"));
    }
    db.write(&script);

    let mut want = Vec::new();
    for uid in 1..=5 {
        // BINARY: upper case first.
        for host in ["B", "a", "b", "c"] {
            want.push(vec![Value::Int(uid), Value::from(host)]);
        }
    }
    for limit in [1, 3, 4, 7, 20, 100] {
        let chunks = all_chunks(&mut b, "grants", limit);
        assert_eq!(chunk_keys(&chunks), want, "chunks of {limit}");
        assert_eq!(chunks[0].rows_estimate, Some(20));
        if 20 % limit == 0 {
            assert!(chunks.last().unwrap().rows.is_empty(), "chunks of {limit}");
        }
        let mut ids = HashSet::new();
        for c in &chunks {
            for r in &c.rows {
                assert_eq!((r.op, r.origin, r.id), (Op::Insert, Origin::Snapshot, 0));
                assert_eq!(r.table, "grants");
                assert_eq!(&*r.key_columns, ["uid", "host"]);
                assert_eq!(&*r.columns, ["uid", "host", "level"]);
                assert_eq!(r.old, None);
                assert_eq!(
                    r.new_value("level"),
                    Some(&Value::Int(r.key[0].as_i64().unwrap() * 10))
                );
                assert!(ids.insert(r.stable_id.clone()), "{}", r.stable_id);
                assert!(
                    r.stable_id.contains(&format!("-w{}.", c.watermark)),
                    "{}",
                    r.stable_id
                );
            }
        }
    }
    // NOCASE: case folded for the order and for `after`; '9' > '10' as text.
    let want: Vec<Vec<Value>> = [
        "10", "9", "Alpha", "bravo", "charlie", "delta", "Echo", "épée",
    ]
    .iter()
    .map(|n| vec![Value::from(*n)])
    .collect();
    for limit in [1, 2, 3, 8, 9] {
        assert_eq!(
            chunk_keys(&all_chunks(&mut b, "names", limit)),
            want,
            "chunks of {limit}"
        );
    }
    // Bad requests: one line each.
    let err = b
        .snapshot_chunk(&ChunkRequest {
            table: "nope".into(),
            after: None,
            limit: 10,
            only: Vec::new(),
        })
        .unwrap_err();
    assert!(matches!(err, BackendError::Invalid(_)), "{err:?}");
    assert!(
        one_line(&err).contains("table nope is not watched"),
        "{err}"
    );
    let err = b
        .snapshot_chunk(&ChunkRequest {
            table: "grants".into(),
            after: Some(vec![Value::Int(1)]),
            limit: 10,
            only: Vec::new(),
        })
        .unwrap_err();
    assert!(
        one_line(&err).contains("key changed during the backfill"),
        "{err}"
    );
}

/// The watermark is a change of origin Watermark in every consumer's stream, with the
/// id `snapshot_chunk` returned, after every change committed before the read and before
/// every change committed after it; it carries no key and no values, and prune removes
/// it like any change.
#[test]
fn the_watermark_reaches_every_consumer_between_older_and_newer_changes_and_is_pruned() {
    let db = Db::new(USERS);
    let (mut b, c1) = setup(&db, &[watch("users", &["name"], &[])], "h1");
    let c2 = consumer("h2");
    b.register(&c2, &["users".into()], StartFrom::Oldest)
        .unwrap();
    db.write("INSERT INTO users VALUES (1, 'a'); INSERT INTO users VALUES (2, 'b');");
    let ch = chunk(&mut b, "users", None, 10);
    assert!(ch.last);
    assert_eq!(
        chunk_keys(std::slice::from_ref(&ch)),
        vec![ints(&[1]), ints(&[2])]
    );
    db.write("UPDATE users SET name = 'a2' WHERE id = 1; DELETE FROM users WHERE id = 2;");
    for c in [&c1, &c2] {
        let got = drain(&mut b, c);
        let what: Vec<(Origin, Op, Vec<Value>)> = got
            .iter()
            .map(|c| (c.origin, c.op, c.key.clone()))
            .collect();
        assert_eq!(
            what,
            vec![
                (Origin::Live, Op::Insert, ints(&[1])),
                (Origin::Live, Op::Insert, ints(&[2])),
                (Origin::Watermark, Op::Insert, vec![]),
                (Origin::Live, Op::Update, ints(&[1])),
                (Origin::Live, Op::Delete, ints(&[2])),
            ],
            "{c}"
        );
        let w = &got[2];
        assert_eq!(w.id, ch.watermark);
        assert_eq!(w.table, "users");
        assert!(w.key_columns.is_empty() && w.columns.is_empty());
        assert_eq!((&w.old, &w.new, &w.old_key), (&None, &None, &None));
        assert!(w.changed_at_us > 0);
        // Its stable id is the log's, like its neighbours'.
        let identity = got[0].stable_id.rsplit_once('-').unwrap().0;
        assert_eq!(w.stable_id, format!("{identity}-{}", w.id));
    }
    assert_eq!(
        db.sql("SELECT count(*) FROM epidemic_log_users WHERE op = 'W';"),
        "1\n"
    );
    assert_eq!(b.prune().unwrap(), 5);
    assert_eq!(db.sql("SELECT count(*) FROM epidemic_log_users;"), "0\n");
}

/// A snapshot row's key, columns and values are what a live change of the same row
/// carries: same key columns, same `Value` types (integers, reals, text that looks like a
/// number, blobs, NULLs, a column without a type), so the host can match them. Keys of
/// reals and blobs page too.
#[test]
fn snapshot_rows_carry_the_keys_and_values_live_changes_carry() {
    let db = Db::new(
        "CREATE TABLE t (s TEXT, k TEXT, n INTEGER, r REAL, b BLOB, x, PRIMARY KEY (k, n));
         CREATE TABLE kb (b BLOB, r REAL, v TEXT, PRIMARY KEY (b, r)) WITHOUT ROWID;",
    );
    let watches = [
        watch("t", &["r", "b", "x", "s"], &[]),
        watch("kb", &["v"], &[]),
    ];
    let (mut b, c) = setup(&db, &watches, "h");
    db.write(
        "INSERT INTO t VALUES (NULL, 'a', 1, 1.5, X'00ff', '007');
         INSERT INTO t VALUES ('s', 'a', 2, 2, NULL, 7);
         INSERT INTO t VALUES ('', '07', 3, -0.25, X'', 7.5);
         INSERT INTO t VALUES ('z', 'b', -1, NULL, 'text in a blob', X'01');
         INSERT INTO kb VALUES (X'02', 0.5, 'p'), (X'01', 2.5, 'q'), (X'01', -1, 'r'), (X'0100', 0, 's');",
    );
    let live = drain(&mut b, &c);
    assert_eq!(live.len(), 8);
    for (table, n) in [("t", 4), ("kb", 4)] {
        for limit in [1, 3] {
            let chunks = all_chunks(&mut b, table, limit);
            let rows: Vec<&Change> = chunks.iter().flat_map(|c| &c.rows).collect();
            assert_eq!(rows.len(), n, "{table} by {limit}");
            for r in rows {
                let l = live
                    .iter()
                    .find(|l| l.table == table && l.key == r.key)
                    .unwrap_or_else(|| panic!("no live change with the key {:?}", r.key));
                assert_eq!(r.key_columns, l.key_columns);
                assert_eq!(r.columns, l.columns);
                assert_eq!(r.new, l.new, "values of {:?}", r.key);
            }
        }
    }
    let t: Vec<Vec<Value>> = chunk_keys(&all_chunks(&mut b, "t", 2));
    assert_eq!(
        t,
        vec![
            vec![Value::from("07"), Value::Int(3)],
            vec![Value::from("a"), Value::Int(1)],
            vec![Value::from("a"), Value::Int(2)],
            vec![Value::from("b"), Value::Int(-1)],
        ]
    );
    let kb: Vec<Vec<Value>> = chunk_keys(&all_chunks(&mut b, "kb", 1));
    assert_eq!(
        kb,
        vec![
            vec![Value::Bytes(vec![1]), Value::Float(-1.0)],
            vec![Value::Bytes(vec![1]), Value::Float(2.5)],
            vec![Value::Bytes(vec![1, 0]), Value::Float(0.0)],
            vec![Value::Bytes(vec![2]), Value::Float(0.5)],
        ]
    );
}

const ITEMS: &str =
    "CREATE TABLE items (grp TEXT, n INTEGER, version INTEGER NOT NULL, name TEXT, PRIMARY KEY (grp, n));";

/// A writer's script of small transactions on `items`: updates that bump `version`,
/// inserts of fresh keys, deletes, and moves of a row to a fresh key (version bumped too).
/// A key is born once (fresh keys are never used twice, nor a key moved away from), so
/// for one key the versions only grow.
fn writer_script(w: u64, transactions: usize, existing: i64) -> String {
    let mut rng = Rng::new(w + 1);
    let mut fresh = (w as i64 + 1) * 100_000;
    // Many small commits: no fsync for each (the test is about order, not durability).
    let mut script = String::from("PRAGMA synchronous = OFF;\n");
    let mut mine: Vec<i64> = Vec::new();
    for i in 0..transactions {
        script.push_str("BEGIN;\n");
        for _ in 0..rng.range(1, 3) {
            let target = if !mine.is_empty() && rng.chance(30) {
                mine[rng.below(mine.len() as u64) as usize]
            } else {
                rng.range(1, existing)
            };
            let roll = rng.below(100);
            if roll < 60 {
                script.push_str(&format!(
                    "UPDATE items SET version = version + 1, name = 'w{w}.{i}' WHERE n = {target};\n"
                ));
            } else if roll < 70 {
                fresh += 1;
                mine.push(fresh);
                script.push_str(&format!(
                    "INSERT INTO items VALUES ('g{}', {fresh}, 1, 'new{w}.{i}');\n",
                    fresh % 5
                ));
            } else if roll < 80 {
                script.push_str(&format!("DELETE FROM items WHERE n = {target};\n"));
            } else {
                fresh += 1;
                mine.push(fresh);
                script.push_str(&format!(
                    "UPDATE items SET n = {fresh}, version = version + 1 WHERE n = {target};\n"
                ));
            }
        }
        script.push_str("COMMIT;\n");
    }
    script
}

fn key_text(key: &[Value]) -> String {
    format!("{key:?}")
}

fn version(image: &Option<Vec<Value>>, columns: &[String]) -> Option<i64> {
    let i = columns.iter().position(|c| c == "version")?;
    image.as_ref()?.get(i)?.as_i64()
}

/// Under writers hammering the table (updates, inserts, deletes, key moves) while chunks
/// are read: every change fetched after a chunk's watermark is newer than the chunk's row
/// for its key (a change committed before the read never comes after the watermark), and
/// the stream with each chunk's rows put right after its watermark — minus the rows a
/// change fetched between the read and the watermark touched, the host's rule — ends
/// equal to the table.
#[test]
fn under_concurrent_writers_no_change_older_than_a_chunk_comes_after_its_watermark() {
    // A small table read in chunks of a tenth of it, again and again while the writers
    // run, so that many commits land near a read and touch the rows it read.
    const EXISTING: i64 = 200;
    const WRITERS: u64 = 4;
    let db = Db::new(ITEMS);
    let initial: String = (1..=EXISTING)
        .map(|n| format!("INSERT INTO items VALUES ('g{}', {n}, 1, 'init');\n", n % 5))
        .collect();
    db.write(&initial);
    let (mut b, c) = setup(&db, &[watch("items", &["version", "name"], &[])], "h");

    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let script = writer_script(w, 1500, EXISTING);
        let mut child = db.sqlite3().stdout(Stdio::null()).spawn().expect("sqlite3");
        let mut stdin = child.stdin.take().expect("stdin");
        let feed = std::thread::spawn(move || stdin.write_all(script.as_bytes()));
        writers.push((child, feed));
    }
    let running = |writers: &mut Vec<(
        std::process::Child,
        std::thread::JoinHandle<std::io::Result<()>>,
    )>| {
        writers
            .iter_mut()
            .any(|(c, _)| c.try_wait().expect("wait").is_none())
    };

    // Everything fetched, in order; each chunk with how much was fetched when it was read.
    let mut stream: Vec<Change> = Vec::new();
    let mut chunks: Vec<(usize, Chunk)> = Vec::new();
    let mut passes = 0;
    let fetch_more = |b: &mut HostBackend, stream: &mut Vec<Change>| match b.fetch(&c, 200) {
        Ok(batch) => {
            if let Some(last) = batch.changes.last() {
                match b.ack(&c, &batch.token, last.id) {
                    Ok(()) => {}
                    Err(e) if e.is_connection() => {}
                    Err(e) => panic!("ack: {e}"),
                }
            }
            stream.extend(batch.changes);
        }
        Err(e) if e.is_connection() => {}
        Err(e) => panic!("fetch: {e}"),
    };
    while passes < 2 || running(&mut writers) {
        let mut after = None;
        loop {
            let ch = chunk(&mut b, "items", after, 20);
            let read_at = stream.len();
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while !stream[read_at..]
                .iter()
                .any(|s| s.origin == Origin::Watermark && s.id == ch.watermark)
            {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the watermark never came"
                );
                fetch_more(&mut b, &mut stream);
            }
            after = ch.rows.last().map(|r| r.key.clone());
            let last = ch.last;
            chunks.push((read_at, ch));
            if last {
                break;
            }
        }
        passes += 1;
    }
    for (mut child, feed) in writers {
        feed.join().unwrap().expect("feed sqlite3");
        let out = child.wait().expect("sqlite3");
        assert!(out.success(), "a writer failed");
    }
    loop {
        let n = stream.len();
        fetch_more(&mut b, &mut stream);
        if stream.len() == n {
            break;
        }
    }
    let lives = stream.iter().filter(|s| s.origin == Origin::Live).count();
    assert!(lives > 1000, "the writers wrote too little: {lives}");

    // 1. Nothing after a chunk's watermark is as old as the chunk's row for its key.
    let mut position = std::collections::HashMap::new();
    for (i, s) in stream.iter().enumerate() {
        if s.origin == Origin::Watermark {
            position.insert(s.id, i);
        }
    }
    let mut overlapped = 0;
    for (read_at, ch) in &chunks {
        let at = position[&ch.watermark];
        let rows: std::collections::HashMap<String, i64> = ch
            .rows
            .iter()
            .map(|r| (key_text(&r.key), version(&r.new, &r.columns).unwrap()))
            .collect();
        for s in &stream[at + 1..] {
            if s.origin != Origin::Live {
                continue;
            }
            if let Some(v) = rows.get(&key_text(&s.key)) {
                match s.op {
                    Op::Delete => {
                        let old = version(&s.old, &s.columns).unwrap();
                        assert!(
                            old >= *v,
                            "a delete of version {old} after a chunk read version {v} of {:?}",
                            s.key
                        );
                    }
                    _ => {
                        let new = version(&s.new, &s.columns).unwrap();
                        assert!(new > *v, "change {} (version {new}) of {:?} came after the watermark of a chunk that read version {v}", s.id, s.key);
                    }
                }
            }
        }
        overlapped += stream[*read_at..at]
            .iter()
            .filter(|s| s.origin == Origin::Live)
            .count();
    }
    assert!(
        overlapped > 0,
        "no change landed between a read and its watermark"
    );

    // 2. The host's rule converges on the table.
    let mut state: std::collections::BTreeMap<String, (i64, String)> = Default::default();
    let by_watermark: std::collections::HashMap<i64, &(usize, Chunk)> =
        chunks.iter().map(|c| (c.1.watermark, c)).collect();
    let name_of = |image: &Option<Vec<Value>>, columns: &[String]| {
        let i = columns.iter().position(|c| c == "name").unwrap();
        image.as_ref().unwrap()[i].to_string()
    };
    for (i, s) in stream.iter().enumerate() {
        match s.origin {
            Origin::Watermark => {
                let Some((read_at, ch)) = by_watermark.get(&s.id) else {
                    continue;
                };
                let mut touched = HashSet::new();
                for l in &stream[*read_at..i] {
                    touched.insert(key_text(&l.key));
                    if let Some(old) = &l.old_key {
                        touched.insert(key_text(old));
                    }
                }
                for r in &ch.rows {
                    if !touched.contains(&key_text(&r.key)) {
                        state.insert(
                            key_text(&r.key),
                            (
                                version(&r.new, &r.columns).unwrap(),
                                name_of(&r.new, &r.columns),
                            ),
                        );
                    }
                }
            }
            _ => {
                if let Some(old) = &s.old_key {
                    state.remove(&key_text(old));
                }
                if s.op == Op::Delete {
                    state.remove(&key_text(&s.key));
                } else {
                    state.insert(
                        key_text(&s.key),
                        (
                            version(&s.new, &s.columns).unwrap(),
                            name_of(&s.new, &s.columns),
                        ),
                    );
                }
            }
        }
    }
    let table: std::collections::BTreeMap<String, (i64, String)> = db
        .sql("SELECT grp, n, version, name FROM items;")
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split('|').collect();
            (
                key_text(&[Value::from(f[0]), Value::Int(f[1].parse().unwrap())]),
                (f[2].parse().unwrap(), f[3].to_owned()),
            )
        })
        .collect();
    assert_eq!(state.len(), table.len());
    assert!(
        state == table,
        "the stream with its chunks does not end equal to the table"
    );
    let ids: HashSet<&str> = stream
        .iter()
        .map(|s| s.stable_id.as_str())
        .chain(
            chunks
                .iter()
                .flat_map(|c| c.1.rows.iter().map(|r| r.stable_id.as_str())),
        )
        .collect();
    assert_eq!(
        ids.len(),
        stream.len() + chunks.iter().map(|c| c.1.rows.len()).sum::<usize>(),
        "stable ids repeat"
    );
}

fn request(consumer: &Consumer, tables: &[&str]) -> BackfillRequest {
    BackfillRequest::Request {
        consumer: consumer.clone(),
        tables: tables.iter().map(|t| t.to_string()).collect(),
        requested_by: "epidemic backfill".into(),
    }
}

fn progress_of(reply: BackfillReply) -> Vec<(String, String, BackfillState)> {
    reply
        .backfills
        .into_iter()
        .map(|p| (p.handler, p.table, p.state))
        .collect()
}

/// The progress store: a request stores one row per table (the registry's spelling) in
/// state requested; a second request of the same consumer while one is requested or
/// running is refused in one line naming the consumer and the table, storing nothing;
/// pending gives the consumer's unfinished rows, save updates only the row of the same
/// request, list gives every row, cancel drops the unfinished ones, a done row is
/// replaced by a new request, unregister forgets the consumer's rows and uninstall the
/// table.
#[test]
fn backfill_requests_and_progress_are_kept_in_the_database() {
    let db = Db::new(
        "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT);
         CREATE TABLE groups (id INTEGER PRIMARY KEY, name TEXT);",
    );
    let before = db
        .sql("SELECT type, name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' ORDER BY name;");
    let mut b = db.open();
    let plan = b.plan_install(&[watch("users", &["name"], &[])]).unwrap();
    assert!(plan
        .iter()
        .any(|s| s.contains("CREATE TABLE IF NOT EXISTS epidemic_backfill")));
    // Before install: nothing to read, and a request says what to do.
    assert!(b
        .backfills(&BackfillRequest::List)
        .unwrap()
        .backfills
        .is_empty());
    let (mut b, h) = setup(
        &db,
        &[
            watch("users", &["name"], &[]),
            watch("groups", &["name"], &[]),
        ],
        "h",
    );
    let other = consumer("other");
    let err = b.backfills(&request(&h, &["nope"])).unwrap_err();
    assert!(
        one_line(&err).contains("table nope is not watched"),
        "{err}"
    );
    let err = b.backfills(&request(&h, &[])).unwrap_err();
    assert!(matches!(err, BackendError::Invalid(_)), "{err:?}");
    assert!(b
        .backfills(&BackfillRequest::List)
        .unwrap()
        .backfills
        .is_empty());

    let stored = b
        .backfills(&request(&h, &["USERS", "groups", "users"]))
        .unwrap();
    assert_eq!(
        progress_of(stored.clone()),
        vec![
            ("h".into(), "users".into(), BackfillState::Requested),
            ("h".into(), "groups".into(), BackfillState::Requested),
        ]
    );
    assert_eq!(stored.backfills[0].requested_by, "epidemic backfill");
    assert!(stored.backfills[0].requested_at_us > 0);
    b.backfills(&request(&other, &["users"])).unwrap();

    // A second request while one is requested: refused, nothing stored.
    let err = b.backfills(&request(&h, &["groups"])).unwrap_err();
    assert!(matches!(err, BackendError::Invalid(_)), "{err:?}");
    let msg = one_line(&err);
    assert!(
        msg.contains(
            "a backfill of consumer mx1/h is already requested (table users: 0 rows done)"
        ),
        "{msg}"
    );
    let pending = b
        .backfills(&BackfillRequest::Pending {
            consumer: h.clone(),
        })
        .unwrap();
    assert_eq!(pending.backfills, stored.backfills);

    // Progress saved, read back; refused while running, with the progress in the message.
    let mut p = pending.backfills[0].clone();
    p.state = BackfillState::Running;
    p.rows_done = 1200;
    p.rows_estimate = Some(50_000);
    p.last_key = Some(vec![Value::Int(1200)]);
    p.started_at_us = 5;
    let saved = b.backfills(&BackfillRequest::Save(p.clone())).unwrap();
    assert_eq!(saved.backfills.len(), 1);
    let pending = b
        .backfills(&BackfillRequest::Pending {
            consumer: h.clone(),
        })
        .unwrap()
        .backfills;
    assert_eq!(pending[0].last_key, p.last_key);
    assert_eq!(
        (pending[0].rows_done, pending[0].rows_estimate),
        (1200, Some(50_000))
    );
    assert_eq!(pending[0].state, BackfillState::Running);
    let err = b.backfills(&request(&h, &["users"])).unwrap_err();
    assert!(
        one_line(&err).contains(
            "a backfill of consumer mx1/h is already running (table users: 1200 of ~50000 rows); wait for it to finish, or cancel it"
        ),
        "{err}"
    );

    // Done rows are not pending, and a new request replaces them.
    for mut q in pending {
        q.state = BackfillState::Done;
        assert_eq!(
            b.backfills(&BackfillRequest::Save(q))
                .unwrap()
                .backfills
                .len(),
            1
        );
    }
    assert!(b
        .backfills(&BackfillRequest::Pending {
            consumer: h.clone()
        })
        .unwrap()
        .backfills
        .is_empty());
    assert_eq!(
        progress_of(b.backfills(&BackfillRequest::List).unwrap()),
        vec![
            ("h".into(), "users".into(), BackfillState::Done),
            ("h".into(), "groups".into(), BackfillState::Done),
            ("other".into(), "users".into(), BackfillState::Requested),
        ]
    );
    let again = b.backfills(&request(&h, &["users"])).unwrap().backfills;
    assert_eq!(again[0].rows_done, 0);
    assert_eq!(
        progress_of(b.backfills(&BackfillRequest::List).unwrap()),
        vec![
            ("h".into(), "groups".into(), BackfillState::Done),
            ("h".into(), "users".into(), BackfillState::Requested),
            ("other".into(), "users".into(), BackfillState::Requested),
        ]
    );
    // A save of the replaced request (a daemon still on the old one) changes nothing.
    assert!(b
        .backfills(&BackfillRequest::Save(p.clone()))
        .unwrap()
        .backfills
        .is_empty());

    // Cancel drops the unfinished rows of that consumer only; a save after it is told so.
    let cancelled = b
        .backfills(&BackfillRequest::Cancel {
            consumer: h.clone(),
        })
        .unwrap();
    assert_eq!(
        progress_of(cancelled),
        vec![("h".into(), "users".into(), BackfillState::Requested)]
    );
    let mut late = again[0].clone();
    late.state = BackfillState::Running;
    assert!(b
        .backfills(&BackfillRequest::Save(late))
        .unwrap()
        .backfills
        .is_empty());
    assert_eq!(
        progress_of(b.backfills(&BackfillRequest::List).unwrap()),
        vec![
            ("h".into(), "groups".into(), BackfillState::Done),
            ("other".into(), "users".into(), BackfillState::Requested),
        ]
    );
    // The progress table is Epidemic's: unregister forgets the consumer's rows, uninstall
    // drops it.
    b.register(&other, &["users".into()], StartFrom::Now)
        .unwrap();
    assert!(b.unregister(&other).unwrap());
    assert_eq!(
        progress_of(b.backfills(&BackfillRequest::List).unwrap()),
        vec![("h".into(), "groups".into(), BackfillState::Done)]
    );
    b.uninstall().unwrap();
    assert_eq!(
        db.sql(
            "SELECT type, name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' ORDER BY name;"
        ),
        before
    );
}

/// Two requests for one consumer at the same time, from two connections: exactly one is
/// stored, the other is refused as already requested (never a lock error, never both).
#[test]
fn of_two_racing_backfill_requests_one_wins() {
    let db = Db::new(
        "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT);
         CREATE TABLE groups (id INTEGER PRIMARY KEY, name TEXT);",
    );
    let (mut admin, h) = setup(
        &db,
        &[
            watch("users", &["name"], &[]),
            watch("groups", &["name"], &[]),
        ],
        "h",
    );
    for round in 0..20 {
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let racers: Vec<_> = ["users", "groups"]
            .into_iter()
            .map(|table| {
                let mut b = db.open();
                let (barrier, h) = (barrier.clone(), h.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    b.backfills(&request(&h, &[table]))
                })
            })
            .collect();
        let results: Vec<_> = racers.into_iter().map(|r| r.join().unwrap()).collect();
        let won: Vec<_> = results.iter().filter(|r| r.is_ok()).collect();
        assert_eq!(won.len(), 1, "round {round}: {results:?}");
        let lost = results.iter().find_map(|r| r.as_ref().err()).unwrap();
        assert!(
            matches!(lost, BackendError::Invalid(_)),
            "round {round}: {lost:?}"
        );
        assert!(one_line(lost).contains("is already requested"), "{lost}");
        let pending = admin
            .backfills(&BackfillRequest::Pending {
                consumer: h.clone(),
            })
            .unwrap()
            .backfills;
        assert_eq!(pending.len(), 1, "round {round}");
        admin
            .backfills(&BackfillRequest::Cancel {
                consumer: h.clone(),
            })
            .unwrap();
    }
}

// ---------------------------------------------------------------------------------------
// A backfill through the daemon
// ---------------------------------------------------------------------------------------

/// The whole path through the real daemon and the recorder plugin: a backfill requested
/// through the backend (as `epidemic backfill` will) for a running daemon's consumer,
/// while a writer updates, inserts and deletes rows; the daemon is SIGKILLed mid-backfill
/// and resumes after the last chunk it finished (not from the start). At the end the last
/// value the recorder received for each key equals the table's row, and no snapshot row
/// arrived after a live change of its key that was newer.
#[test]
fn a_backfill_through_the_daemon_converges_and_resumes_after_a_kill() {
    const ROWS: i64 = 4000;
    let db = Db::new(
        "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT, version INTEGER NOT NULL);",
    );
    let (dir, path) = (db._dir.path(), db.path.clone());
    let rows: String = (1..=ROWS)
        .map(|i| format!("INSERT INTO users VALUES ({i}, 'u{i}', 1);\n"))
        .collect();
    db.write(&format!("BEGIN;\n{rows}COMMIT;"));
    let out = dir.join("rec.jsonl");
    let config = dir.join("epidemic.toml");
    std::fs::write(
        &config,
        format!(
            "[database]\nurl = {:?}\n\n[daemon]\nname = \"mx1\"\nbackfill_chunk = 5\n\n{}",
            sqlite::url(&path),
            epidemic_tests::recorder_handler("rec", &out, "users", &["name", "version"], "")
        ),
    )
    .unwrap();
    let install = epidemic_tests::epidemic(&config, &["install"]);
    assert!(
        install.status.success(),
        "{}",
        String::from_utf8_lossy(&install.stderr)
    );
    let log = dir.join("daemon.log");
    let started = |d: &Daemon, n: usize| {
        assert!(
            wait_until(WAIT, || d.log_text().matches("epidemic started").count()
                >= n),
            "daemon did not start:\n{}",
            d.log_text()
        );
    };
    let mut daemon = Daemon::start(&config, &log, &[]);
    started(&daemon, 1);

    // A writer that keeps going across the kill: updates bump the version, inserts use
    // ids no row ever had, deletes.
    let mut rng = Rng::new(42);
    let mut script = String::from("PRAGMA synchronous = OFF;\n");
    let mut fresh = 1_000_000;
    for i in 0..6000 {
        let id = rng.range(1, ROWS);
        match rng.below(10) {
            0 => {
                fresh += 1;
                script.push_str(&format!("INSERT INTO users VALUES ({fresh}, 'n{i}', 1);\n"));
            }
            1 => script.push_str(&format!("DELETE FROM users WHERE id = {id};\n")),
            _ => script.push_str(&format!(
                "UPDATE users SET version = version + 1, name = 'w{i}' WHERE id = {id};\n"
            )),
        }
    }
    let mut writer = db.sqlite3().stdout(Stdio::null()).spawn().expect("sqlite3");
    let mut stdin = writer.stdin.take().expect("stdin");
    let feed = std::thread::spawn(move || stdin.write_all(script.as_bytes()));

    let rec = Consumer {
        daemon: "mx1".into(),
        handler: "rec".into(),
    };
    let mut b = db.open();
    b.backfills(&BackfillRequest::Request {
        consumer: rec.clone(),
        tables: vec!["users".into()],
        requested_by: "test".into(),
    })
    .unwrap();
    let snapshots =
        |lines: &[serde_json::Value]| lines.iter().filter(|l| l["origin"] == "snapshot").count();
    assert!(
        wait_until(WAIT, || snapshots(&recorded(&out)) >= 300),
        "no snapshot rows came:\n{}",
        daemon.log_text()
    );
    daemon.kill();
    let killed_at = recorded(&out).len();
    let saved = b.backfills(&BackfillRequest::List).unwrap().backfills;
    assert_eq!(saved.len(), 1);
    assert_eq!(
        saved[0].state,
        BackfillState::Running,
        "the backfill ended before the kill; make it longer"
    );
    assert!(saved[0].rows_done > 0);
    let resume_after = saved[0].last_key.clone().expect("a last key")[0]
        .as_i64()
        .unwrap();

    let daemon = Daemon::start(&config, &log, &[]);
    started(&daemon, 2);
    assert!(
        wait_until(Duration::from_secs(60), || {
            b.backfills(&BackfillRequest::List).unwrap().backfills[0].state == BackfillState::Done
        }),
        "the backfill did not finish:\n{}",
        daemon.log_text()
    );
    feed.join().unwrap().expect("feed sqlite3");
    assert!(writer.wait().expect("sqlite3").success());
    let table: std::collections::BTreeMap<i64, (String, i64)> = db
        .sql("SELECT id, name, version FROM users;")
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split('|').collect();
            (
                f[0].parse().unwrap(),
                (f[1].to_owned(), f[2].parse().unwrap()),
            )
        })
        .collect();
    // Replay what the recorder received, in order.
    let replay = |lines: &[serde_json::Value]| {
        let mut state = std::collections::BTreeMap::new();
        for l in lines {
            let id = l["key"]["id"].as_i64().unwrap();
            if l["op"] == "DELETE" {
                state.remove(&id);
            } else {
                let new = &l["new"];
                state.insert(
                    id,
                    (
                        new["name"].as_str().unwrap().to_owned(),
                        new["version"].as_i64().unwrap(),
                    ),
                );
            }
        }
        state
    };
    assert!(
        wait_until(WAIT, || replay(&recorded(&out)) == table),
        "the recorder's last values differ from the table:\n{}",
        daemon.log_text()
    );
    let lines = recorded(&out);
    // The restarted daemon went on after the last chunk it had finished.
    let resumed: Vec<i64> = lines[killed_at..]
        .iter()
        .filter(|l| l["origin"] == "snapshot")
        .map(|l| l["key"]["id"].as_i64().unwrap())
        .collect();
    assert!(!resumed.is_empty());
    assert!(
        resumed.iter().all(|id| *id > resume_after),
        "resumed from the start, not after {resume_after}"
    );
    assert!(daemon.log_text().contains("snapshot of a table done"));
    // No snapshot row older than a live change of its key received before it.
    let mut newest_live: std::collections::HashMap<i64, Option<i64>> = Default::default();
    for l in &lines {
        let id = l["key"]["id"].as_i64().unwrap();
        let version = l["new"]["version"].as_i64();
        if l["origin"] == "snapshot" {
            if let Some(live) = newest_live.get(&id) {
                let v = version.unwrap();
                match live {
                    None => panic!("a snapshot row of {id} came after its delete"),
                    Some(lv) => assert!(
                        v >= *lv,
                        "snapshot version {v} of {id} after live version {lv}"
                    ),
                }
            }
        } else {
            newest_live.insert(id, version);
        }
    }
    assert!(lines
        .iter()
        .any(|l| l["origin"] == "live" && l["op"] == "DELETE"));
    assert!(snapshots(&lines) >= (ROWS as usize) / 2);
}

// ---------------------------------------------------------------------------------------
// Acks while a writer holds the write lock
// ---------------------------------------------------------------------------------------

/// An application's `sqlite3` holding the write lock (an open `BEGIN IMMEDIATE`).
struct LockHolder {
    child: std::process::Child,
    out: std::io::BufReader<std::process::ChildStdout>,
}

impl LockHolder {
    fn take(db: &Db) -> LockHolder {
        let mut child = db
            .sqlite3()
            .stdout(Stdio::piped())
            .spawn()
            .expect("run sqlite3");
        let out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let mut holder = LockHolder { child, out };
        holder.say("BEGIN IMMEDIATE;", "locked");
        holder
    }

    /// Send `sql` and wait until it ran.
    fn say(&mut self, sql: &str, done: &str) {
        use std::io::BufRead;
        let stdin = self.child.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{sql}\n.print {done}").expect("write to sqlite3");
        stdin.flush().expect("flush");
        let mut line = String::new();
        self.out.read_line(&mut line).expect("read from sqlite3");
        assert_eq!(line.trim(), done);
    }

    fn release(mut self) {
        self.say("COMMIT;", "released");
        drop(self.child.stdin.take());
        self.child.wait().expect("sqlite3");
    }
}

fn cursor_in_db(db: &Db) -> i64 {
    db.sql("SELECT last_id FROM epidemic_cursor WHERE handler = 'h'")
        .trim()
        .parse()
        .expect("one cursor")
}

fn ids(changes: &[Change]) -> Vec<i64> {
    changes.iter().map(|c| c.id).collect()
}

/// While a writer holds the write lock, an ack is kept and reading goes on after it (a
/// WAL reader does not wait for the writer), but never more than one batch past the
/// cursor the database has: a crash then redelivers at most one batch, never skips one.
/// The kept ack is written once the lock is free, before the next read or before the
/// reader goes idle.
#[test]
fn an_ack_while_a_writer_holds_the_lock_is_kept_and_reading_goes_on_within_one_batch() {
    let db = Db::new("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT);");
    let mut b = library()
        .open_backend(&sqlite::url(&db.path), &json!({ "busy_timeout_ms": 300 }))
        .expect("open backend");
    b.install(&[watch("t", &["v"], &[])]).expect("install");
    let c = consumer("h");
    b.register(&c, &["t".into()], StartFrom::Oldest)
        .expect("register");
    db.write(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 10)
         INSERT INTO t SELECT i, 'v' || i FROM n;",
    );
    const MAX: u32 = 8;
    let first = b.fetch(&c, MAX).expect("fetch");
    assert_eq!(ids(&first.changes), (1..=8).collect::<Vec<_>>());

    let lock = LockHolder::take(&db);
    // A partial ack: kept, and the next read starts after it, within one batch of the
    // database's cursor (3 kept, so 5 more).
    b.ack(&c, &first.token, 3)
        .expect("an ack is kept, not refused");
    assert_eq!(cursor_in_db(&db), 0);
    let second = b.fetch(&c, MAX).expect("fetch");
    assert_eq!(ids(&second.changes), (4..=8).collect::<Vec<_>>());
    b.ack(&c, &second.token, 8).expect("kept");
    // A whole batch handled and not in the database: no further read until the ack is
    // written, and a lock held past the busy timeout says which ack waits.
    let err = b.fetch(&c, MAX).expect_err("the lock is still held");
    assert!(err.is_connection(), "{err}");
    assert!(
        one_line(&err).contains("acknowledging t up to change 8"),
        "{err}"
    );
    // A crash now (another daemon taking over from the database's cursor) redelivers
    // that one batch: nothing skipped, nothing more repeated.
    let mut after_crash = db.open();
    let again = after_crash.fetch(&c, MAX).expect("fetch");
    assert_eq!(ids(&again.changes), (1..=8).collect::<Vec<_>>());
    drop(after_crash);

    lock.release();
    // Going idle writes the kept ack; reading resumes after it.
    b.wait(Duration::from_millis(1)).expect("wait");
    assert_eq!(cursor_in_db(&db), 8);
    let third = b.fetch(&c, MAX).expect("fetch");
    assert_eq!(ids(&third.changes), vec![9, 10]);

    // Kept again, then written before the next read once the lock is free.
    let lock = LockHolder::take(&db);
    b.ack(&c, &third.token, 10).expect("kept");
    assert_eq!(cursor_in_db(&db), 8);
    lock.release();
    assert!(b.fetch(&c, MAX).expect("fetch").changes.is_empty());
    assert_eq!(cursor_in_db(&db), 10);
}

/// A consumer of two tables: one with a stream of a few rows per read, one with a backlog.
/// Reads of the stream are dense and not full, but the backlog's table is still to be read
/// in the same turn: no read may linger (`linger_ms`) while a backlog waits. With the
/// linger at a second, one wrong pause per round (its first step, a quarter second, since
/// the backlog's full reads end the streak) would make the drain take 15 s or more (60
/// reads of 500).
#[test]
fn a_backlog_in_another_table_is_read_without_lingering() {
    let db = Db::new(
        "CREATE TABLE a (id INTEGER PRIMARY KEY); CREATE TABLE b (id INTEGER PRIMARY KEY);",
    );
    let mut b = library()
        .open_backend(&sqlite::url(&db.path), &json!({"linger_ms": 1000}))
        .expect("open backend");
    b.install(&[watch("a", &["id"], &[]), watch("b", &["id"], &[])])
        .expect("install");
    let c = consumer("h");
    b.register(&c, &["a".into(), "b".into()], StartFrom::Oldest)
        .expect("register");
    db.write(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 30000) \
         INSERT INTO b SELECT i FROM n;",
    );
    // A hundred rows of the stream before every read: dense (the sqlite3 tool takes a few
    // milliseconds to start), and fewer than a read takes.
    read_backlog_beside_a_stream(&mut b, &c, "b", 30_000, |next_a| {
        db.write(&format!(
            "WITH RECURSIVE n(i) AS (SELECT {next_a} UNION ALL SELECT i + 1 FROM n \
             WHERE i < {}) INSERT INTO a SELECT i FROM n;",
            next_a + 99
        ))
    });
}
