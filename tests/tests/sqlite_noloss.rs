//! SQLite: the ways a change could be lost, invented or delivered again (issue 10), each
//! through the real `epidemic` binary, backend and recorder handler, with a writer
//! connection in this process standing in for the application.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use epidemic_tests::rng::Rng;
use epidemic_tests::{plugin_path, recorded, sqlite, wait_recorded, wait_until, Daemon};
use rusqlite::Connection;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(20);

struct Setup {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    db: PathBuf,
    config: PathBuf,
    log: PathBuf,
}

impl Setup {
    /// A database with `schema`, and a config with `database` extra lines and `handlers`.
    fn new(schema: &str, database: &str, handlers: impl FnOnce(&Path) -> String) -> Setup {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_owned();
        let db = sqlite::create_db(&dir, "mail", schema);
        let config = dir.join("epidemic.toml");
        let text = format!(
            "[database]\nurl = {:?}\n{database}\n\n[daemon]\nname = \"mx1\"\n\n{}",
            sqlite::url(&db),
            handlers(&dir)
        );
        std::fs::write(&config, text).expect("write config");
        Setup {
            log: dir.join("daemon.log"),
            _dir: tmp,
            dir,
            db,
            config,
        }
    }

    fn start(&self) -> Daemon {
        let before = std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .matches("epidemic started")
            .count();
        let d = Daemon::start(&self.config, &self.log, &[]);
        assert!(
            wait_until(WAIT, || d.log_text().matches("epidemic started").count()
                > before),
            "daemon did not start:\n{}",
            d.log_text()
        );
        d
    }
}

/// A recorder `[[handler]]`; `handler` are extra handler-level keys, `config` extra
/// keys of its `[handler.config]`.
fn recorder(
    name: &str,
    file: &Path,
    table: &str,
    columns: &[&str],
    handler: &str,
    config: &str,
) -> String {
    let cols: Vec<String> = columns.iter().map(|c| format!("{c:?}")).collect();
    format!(
        "[[handler]]\nname = {name:?}\nplugin = {:?}\n{handler}\n[handler.config]\nfile = {:?}\ntable = {table:?}\ncolumns = [{}]\n{config}\n\n",
        plugin_path("recorder").display().to_string(),
        file.display().to_string(),
        cols.join(", ")
    )
}

fn ops(lines: &[Value]) -> Vec<(String, Value, Value)> {
    lines
        .iter()
        .map(|l| {
            (
                l["op"].as_str().unwrap_or_default().to_owned(),
                l["old"].clone(),
                l["new"].clone(),
            )
        })
        .collect()
}

fn ins(new: Value) -> (String, Value, Value) {
    ("INSERT".into(), Value::Null, new)
}

fn upd(old: Value, new: Value) -> (String, Value, Value) {
    ("UPDATE".into(), old, new)
}

fn del(old: Value) -> (String, Value, Value) {
    ("DELETE".into(), old, Value::Null)
}

fn user(id: i64, email: &str, quota: i64) -> Value {
    json!({"id": id, "email": email, "quota": quota})
}

/// `sql` must fail (a constraint): the statement, and what its triggers logged, is undone.
fn fails(w: &Connection, sql: &str) {
    assert!(w.execute_batch(sql).is_err(), "expected {sql} to fail");
}

const USERS: &str = "CREATE TABLE users (
    id INTEGER PRIMARY KEY,
    email TEXT NOT NULL UNIQUE,
    quota INTEGER
);
CREATE TABLE aliases (
    addr TEXT PRIMARY KEY,
    target TEXT
) WITHOUT ROWID;";

/// Item 3: every SQLite form that removes a row through a conflict delivers that row's
/// DELETE (its old image) before the change that removed it, once, with or without
/// `recursive_triggers`; the forms that skip, fail or update deliver no phantom DELETE.
#[test]
fn replace_forms_deliver_the_replaced_rows_as_deletes() {
    let s = Setup::new(USERS, "", |dir| {
        recorder(
            "users",
            &dir.join("users.jsonl"),
            "users",
            &["id", "email", "quota"],
            "",
            "",
        ) + &recorder(
            "aliases",
            &dir.join("aliases.jsonl"),
            "aliases",
            &["addr", "target"],
            "",
            "",
        )
    });
    let _d = s.start();
    let w = sqlite::connect(&s.db);
    let mut want = Vec::new();

    w.execute_batch(
        "INSERT INTO users VALUES (1, 'a', 10), (2, 'b', 20), (3, 'c', 30), (-1, 'neg', 0)",
    )
    .unwrap();
    want.extend([
        ins(user(1, "a", 10)),
        ins(user(2, "b", 20)),
        ins(user(3, "c", 30)),
        ins(user(-1, "neg", 0)),
    ]);
    // Conflicts on the primary key (row 1) and on the unique email (row 2) at once.
    w.execute_batch("INSERT OR REPLACE INTO users VALUES (1, 'b', 11)")
        .unwrap();
    want.extend([
        del(user(1, "a", 10)),
        del(user(2, "b", 20)),
        ins(user(1, "b", 11)),
    ]);
    w.execute_batch("REPLACE INTO users VALUES (3, 'c', 31)")
        .unwrap();
    want.extend([del(user(3, "c", 30)), ins(user(3, "c", 31))]);
    // Skipped, failed or rolled back: nothing at all.
    w.execute_batch("INSERT OR IGNORE INTO users VALUES (3, 'zz', 0)")
        .unwrap();
    w.execute_batch("INSERT OR IGNORE INTO users VALUES (4, 'b', 0)")
        .unwrap();
    w.execute_batch("INSERT INTO users VALUES (1, 'x', 0) ON CONFLICT DO NOTHING")
        .unwrap();
    fails(&w, "INSERT INTO users VALUES (1, 'x', 0)");
    fails(&w, "INSERT OR ABORT INTO users VALUES (5, 'b', 0)");
    fails(&w, "INSERT OR FAIL INTO users VALUES (1, 'x', 0)");
    fails(&w, "UPDATE users SET email = 'b' WHERE id = 3");
    w.execute_batch("BEGIN; INSERT OR REPLACE INTO users VALUES (3, 'rolled back', 0); ROLLBACK;")
        .unwrap();
    // Upserts are updates, even one that moves the row to another id.
    w.execute_batch(
        "INSERT INTO users VALUES (3, 'c', 32) ON CONFLICT (id) DO UPDATE SET quota = excluded.quota",
    )
    .unwrap();
    want.push(upd(user(3, "c", 31), user(3, "c", 32)));
    w.execute_batch("INSERT INTO users VALUES (3, 'c', 0) ON CONFLICT (id) DO UPDATE SET id = 30")
        .unwrap();
    want.push(upd(user(3, "c", 32), user(30, "c", 32)));
    // No id given: the row with id -1 (what SQLite shows a BEFORE trigger) stays.
    w.execute_batch("INSERT INTO users (email, quota) VALUES ('auto', 5)")
        .unwrap();
    want.push(ins(user(31, "auto", 5)));
    // UPDATE OR REPLACE through the unique email, then through the primary key.
    w.execute_batch("UPDATE OR REPLACE users SET email = 'auto' WHERE id = 1")
        .unwrap();
    want.extend([
        del(user(31, "auto", 5)),
        upd(user(1, "b", 11), user(1, "auto", 11)),
    ]);
    w.execute_batch("UPDATE OR REPLACE users SET id = 30 WHERE id = 1")
        .unwrap();
    want.extend([
        del(user(30, "c", 32)),
        upd(user(1, "auto", 11), user(30, "auto", 11)),
    ]);
    // With recursive triggers SQLite fires the DELETE trigger itself: still one DELETE.
    w.execute_batch("PRAGMA recursive_triggers = ON").unwrap();
    w.execute_batch("INSERT OR REPLACE INTO users VALUES (30, 'r', 1)")
        .unwrap();
    want.extend([del(user(30, "auto", 11)), ins(user(30, "r", 1))]);
    w.execute_batch("UPDATE OR REPLACE users SET email = 'r' WHERE id = -1")
        .unwrap();
    want.extend([
        del(user(30, "r", 1)),
        upd(user(-1, "neg", 0), user(-1, "r", 0)),
    ]);
    w.execute_batch("PRAGMA recursive_triggers = OFF").unwrap();
    // Several rows in one statement, each replacing another.
    w.execute_batch("INSERT OR REPLACE INTO users VALUES (-1, 'm1', 1), (7, 'm1', 2)")
        .unwrap();
    want.extend([
        del(user(-1, "r", 0)),
        ins(user(-1, "m1", 1)),
        del(user(-1, "m1", 1)),
        ins(user(7, "m1", 2)),
    ]);
    w.execute_batch("INSERT INTO users VALUES (100, 'marker', 0)")
        .unwrap();
    want.push(ins(user(100, "marker", 0)));

    // A WITHOUT ROWID table: its primary key is the row's identity.
    w.execute_batch(
        "INSERT INTO aliases VALUES ('postmaster', 'ann');
         INSERT OR REPLACE INTO aliases VALUES ('postmaster', 'bob');
         INSERT OR IGNORE INTO aliases VALUES ('postmaster', 'eve');
         INSERT INTO aliases VALUES ('abuse', 'ann');",
    )
    .unwrap();
    let alias = |a: &str, t: &str| json!({"addr": a, "target": t});
    let want_aliases = vec![
        ins(alias("postmaster", "ann")),
        del(alias("postmaster", "ann")),
        ins(alias("postmaster", "bob")),
        ins(alias("abuse", "ann")),
    ];

    // The marker is the newest change: once it is in, everything before it is too.
    let users = s.dir.join("users.jsonl");
    assert!(
        wait_until(WAIT, || recorded(&users)
            .last()
            .is_some_and(|l| l["new"]["email"] == "marker")),
        "marker never arrived: {:#?}",
        ops(&recorded(&users))
    );
    let got = recorded(&users);
    assert_eq!(ops(&got), want);
    let aliases = wait_recorded(&s.dir.join("aliases.jsonl"), want_aliases.len(), WAIT);
    assert_eq!(ops(&aliases), want_aliases);
}

/// Item 11: the handler names the table and columns in another case than the catalog
/// (both ways round); every change arrives, in the catalog's spelling, and the cursor
/// moves (a restart delivers nothing again).
#[test]
fn names_in_another_case_are_delivered_in_the_catalogs_spelling() {
    let schema = "CREATE TABLE Mail_Users (id INTEGER PRIMARY KEY, Quota INTEGER, username TEXT);
                  CREATE TABLE domains (id INTEGER PRIMARY KEY, name TEXT);";
    let s = Setup::new(schema, "", |dir| {
        recorder(
            "users",
            &dir.join("users.jsonl"),
            "mail_users",
            &["quota", "USERNAME"],
            "",
            "",
        ) + &recorder(
            "domains",
            &dir.join("domains.jsonl"),
            "DOMAINS",
            &["Name"],
            "",
            "",
        )
    });
    let mut d = s.start();
    let w = sqlite::connect(&s.db);
    w.execute_batch(
        "INSERT INTO mail_users VALUES (1, 100, 'ann');
         UPDATE MAIL_USERS SET quota = 200 WHERE id = 1;
         DELETE FROM Mail_Users WHERE id = 1;
         INSERT INTO domains VALUES (1, 'example.org');",
    )
    .unwrap();
    let users = wait_recorded(&s.dir.join("users.jsonl"), 3, WAIT);
    let row = |q: i64| json!({"Quota": q, "username": "ann"});
    assert_eq!(
        ops(&users),
        vec![ins(row(100)), upd(row(100), row(200)), del(row(200))]
    );
    assert!(
        users.iter().all(|l| l["table"] == "Mail_Users"),
        "{users:?}"
    );
    let domains = wait_recorded(&s.dir.join("domains.jsonl"), 1, WAIT);
    assert_eq!(ops(&domains), vec![ins(json!({"name": "example.org"}))]);
    assert_eq!(domains[0]["table"], "domains");

    // The acks moved the cursors: after a clean restart only the new change arrives.
    assert!(d
        .signal_and_wait(libc::SIGTERM, WAIT)
        .is_some_and(|st| st.success()));
    let _d = s.start();
    w.execute_batch("INSERT INTO mail_users VALUES (2, 1, 'marker')")
        .unwrap();
    // A change delivered again would come before the newer marker.
    let file = s.dir.join("users.jsonl");
    assert!(wait_until(WAIT, || recorded(&file)
        .iter()
        .any(|l| l["new"]["username"] == "marker")));
    let users = recorded(&file);
    assert_eq!(users.len(), 4, "{:#?}", ops(&users));
    assert_eq!(users[3]["new"]["username"], "marker");
    let out = epidemic_tests::epidemic(&s.config, &["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("does not exist"), "{text}");
}

/// Item 17: an application holds the write lock for three busy timeouts right after the
/// handler handled a batch. The ack waits for the lock; the changes are not delivered
/// again, once per timeout.
#[test]
fn an_ack_refused_by_a_held_write_lock_is_retried_not_redelivered() {
    const BUSY_MS: u64 = 300;
    let s = Setup::new(USERS, &format!("busy_timeout_ms = {BUSY_MS}"), |dir| {
        recorder(
            "rec",
            &dir.join("rec.jsonl"),
            "users",
            &["id", "email"],
            "on_failure = \"block\"\nretry_initial_ms = 20\nretry_max_ms = 50",
            &format!(
                "fail_while_exists = {:?}",
                dir.join("broken").display().to_string()
            ),
        )
    });
    let broken = s.dir.join("broken");
    std::fs::write(&broken, "").unwrap();
    let d = s.start();
    let mut w = sqlite::connect(&s.db);
    w.execute_batch(
        "INSERT INTO users VALUES (1, 'a', 1), (2, 'b', 2), (3, 'c', 3), (4, 'd', 4), (5, 'e', 5)",
    )
    .unwrap();
    // The handler is failing on the first change; take the write lock, then let it
    // succeed: it handles all five while the application holds the lock.
    assert!(
        d.wait_for_log("broken exists", WAIT),
        "handler never tried:\n{}",
        d.log_text()
    );
    let lock = w
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .unwrap();
    std::fs::remove_file(&broken).unwrap();
    wait_recorded(&s.dir.join("rec.jsonl"), 5, WAIT);
    // The condition under test is the lock being held this long, not an event to wait for.
    std::thread::sleep(Duration::from_millis(3 * BUSY_MS));
    lock.commit().unwrap();

    w.execute_batch("INSERT INTO users VALUES (6, 'marker', 6)")
        .unwrap();
    assert!(
        wait_until(WAIT, || recorded(&s.dir.join("rec.jsonl"))
            .iter()
            .any(|l| l["new"]["email"] == "marker")),
        "marker never arrived:\n{}",
        d.log_text()
    );
    let mut per_id: BTreeMap<i64, usize> = BTreeMap::new();
    for l in recorded(&s.dir.join("rec.jsonl")) {
        *per_id.entry(l["new"]["id"].as_i64().unwrap()).or_default() += 1;
    }
    assert_eq!(
        per_id,
        (1..=6).map(|i| (i, 1)).collect::<BTreeMap<_, _>>(),
        "each change must be delivered exactly once:\n{}",
        d.log_text()
    );
    // The log says what is waiting, and that nothing is lost or repeated.
    assert!(
        d.log_text().contains("acknowledging users up to change 5"),
        "{}",
        d.log_text()
    );
}

/// Item 3's limit: a unique index on an expression cannot be matched by the REPLACE
/// triggers; `status` says so, naming the index and the remedy.
#[test]
fn a_unique_index_on_an_expression_is_a_status_warning() {
    let schema = format!("{USERS}\nCREATE UNIQUE INDEX users_email_lower ON users (lower(email));");
    let s = Setup::new(&schema, "", |dir| {
        recorder("rec", &dir.join("rec.jsonl"), "users", &["email"], "", "")
    });
    let out = epidemic_tests::epidemic(&s.config, &["install"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = epidemic_tests::epidemic(&s.config, &["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("warnings:") && text.contains("users_email_lower"),
        "{text}"
    );
}

/// The reading rule under what an application or DBA does to a live database:
/// VACUUM, checkpoints, leaving WAL for a rollback journal and coming back, an attached
/// database and a TEMP table with the watched table's name. Every change of the watched
/// table arrives once, in order; writes elsewhere do not.
#[test]
fn vacuum_checkpoints_journal_modes_and_attached_databases_lose_nothing() {
    let s = Setup::new(USERS, "", |dir| {
        recorder("rec", &dir.join("rec.jsonl"), "users", &["id"], "", "")
    });
    let mut d = s.start();
    let file = s.dir.join("rec.jsonl");
    let w = sqlite::connect(&s.db);
    let insert = |id: i64| {
        w.execute(
            "INSERT INTO main.users (id, email) VALUES (?1, ?2)",
            rusqlite::params![id, format!("u{id}")],
        )
        .unwrap();
    };
    let upto = |n: usize| {
        assert!(
            wait_until(WAIT, || recorded(&file).len() >= n),
            "stuck before {n}: {:?}",
            recorded(&file)
        );
    };
    for id in 1..=3 {
        insert(id);
    }
    upto(3);
    w.execute_batch("DELETE FROM users WHERE id = 2; VACUUM;")
        .unwrap();
    insert(4);
    w.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    insert(5);
    upto(5);
    // SQLite refuses to leave WAL while another connection (the daemon's) has the
    // database open: the switch fails and nothing changes.
    let left = w.query_row("PRAGMA journal_mode = DELETE", [], |r| {
        r.get::<_, String>(0)
    });
    assert!(
        matches!(&left, Err(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy)),
        "{left:?}"
    );
    // With the daemon stopped it can; changes meanwhile wait in the log.
    assert!(d
        .signal_and_wait(libc::SIGTERM, WAIT)
        .is_some_and(|st| st.success()));
    let mode: String = w
        .query_row("PRAGMA journal_mode = DELETE", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "delete");
    insert(6);
    let d = s.start();
    insert(7);
    w.execute_batch("VACUUM").unwrap();
    upto(7);
    // Back to WAL under the running daemon. The switch needs a moment with no reader on
    // the file, and the daemon's rollback-journal reads are short but frequent: retry
    // while it answers "database is locked", as a DBA would.
    let mut mode = String::new();
    assert!(
        wait_until(WAIT, || {
            match w.query_row("PRAGMA journal_mode = WAL", [], |r| r.get::<_, String>(0)) {
                Ok(m) => {
                    mode = m;
                    true
                }
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if e.code == rusqlite::ErrorCode::DatabaseBusy =>
                {
                    false
                }
                Err(e) => panic!("PRAGMA journal_mode = WAL: {e}"),
            }
        }),
        "the switch to WAL stayed locked out"
    );
    assert_eq!(mode, "wal");
    insert(8);
    // Same-named tables elsewhere are other tables: their rows are no changes of main.users.
    let other = s.dir.join("other.db");
    w.execute_batch(&format!(
        "ATTACH DATABASE {:?} AS other;
         CREATE TABLE other.users (id INTEGER PRIMARY KEY, email TEXT);
         INSERT INTO other.users VALUES (1000, 'other');
         CREATE TEMP TABLE users (id INTEGER PRIMARY KEY, email TEXT);
         INSERT INTO users VALUES (1001, 'temp');",
        other.display().to_string()
    ))
    .unwrap();
    insert(9);
    upto(8);
    let ids = || -> Vec<(String, i64)> {
        recorded(&file)
            .iter()
            .map(|l| {
                let op = l["op"].as_str().unwrap_or_default().to_owned();
                let row = if op == "DELETE" { &l["old"] } else { &l["new"] };
                (op, row["id"].as_i64().unwrap_or(-1))
            })
            .collect()
    };
    assert!(
        wait_until(WAIT, || ids().last() == Some(&("INSERT".to_owned(), 9))),
        "{:?}",
        ids()
    );
    let mut want: Vec<(String, i64)> = vec![
        ("INSERT".into(), 1),
        ("INSERT".into(), 2),
        ("INSERT".into(), 3),
        ("DELETE".into(), 2),
    ];
    want.extend((4..=9).map(|i| ("INSERT".to_owned(), i)));
    assert_eq!(ids(), want, "{}", d.log_text());
}

/// Item 3 and drift: a UNIQUE index added after install makes the triggers out of date;
/// `status` says so, and the next start (which installs) captures a REPLACE through it.
#[test]
fn a_unique_index_added_after_install_is_drift_until_the_next_install() {
    let schema = "CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT, quota INTEGER);";
    let s = Setup::new(schema, "", |dir| {
        recorder(
            "rec",
            &dir.join("rec.jsonl"),
            "users",
            &["id", "email", "quota"],
            "",
            "",
        )
    });
    let out = epidemic_tests::epidemic(&s.config, &["install"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = || {
        let out = epidemic_tests::epidemic(&s.config, &["status"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(!status().contains("out of date"), "{}", status());
    let w = sqlite::connect(&s.db);
    w.execute_batch("CREATE UNIQUE INDEX users_email ON users (email)")
        .unwrap();
    let text = status();
    assert!(
        text.contains("out of date") && text.contains("epidemic install"),
        "{text}"
    );
    let _d = s.start();
    assert!(!status().contains("out of date"), "{}", status());
    w.execute_batch(
        "INSERT INTO users VALUES (1, 'a', 1);
         INSERT OR REPLACE INTO users VALUES (2, 'a', 2);",
    )
    .unwrap();
    let got = wait_recorded(&s.dir.join("rec.jsonl"), 3, WAIT);
    assert_eq!(
        ops(&got),
        vec![
            ins(user(1, "a", 1)),
            del(user(1, "a", 1)),
            ins(user(2, "a", 2))
        ]
    );
}

/// Item 11, upgrading: a cursor written under the handler's spelling (by a daemon from
/// before names were resolved) keeps its position under the catalog's.
#[test]
fn a_cursor_under_another_spelling_keeps_its_position() {
    let schema = "CREATE TABLE Mail_Users (id INTEGER PRIMARY KEY, Quota INTEGER);";
    let s = Setup::new(schema, "", |dir| {
        recorder(
            "users",
            &dir.join("users.jsonl"),
            "mail_users",
            &["quota"],
            "",
            "",
        )
    });
    let out = epidemic_tests::epidemic(&s.config, &["install"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let w = sqlite::connect(&s.db);
    w.execute_batch(
        "INSERT INTO Mail_Users VALUES (1, 1), (2, 2);
         INSERT INTO epidemic_cursor (daemon, handler, source_table, last_id, registered_at, last_seen)
         VALUES ('mx1', 'users', 'mail_users', 1, 0, CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER));",
    )
    .unwrap();
    let _d = s.start();
    w.execute_batch("INSERT INTO Mail_Users VALUES (3, 3)")
        .unwrap();
    let file = s.dir.join("users.jsonl");
    assert!(wait_until(WAIT, || recorded(&file)
        .iter()
        .any(|l| l["new"]["Quota"] == 3)));
    let quotas: Vec<Value> = recorded(&file)
        .iter()
        .map(|l| l["new"]["Quota"].clone())
        .collect();
    assert_eq!(quotas, vec![json!(2), json!(3)]);
    let cursors: Vec<String> = w
        .prepare("SELECT source_table FROM epidemic_cursor")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(cursors, vec!["Mail_Users".to_owned()]);
}

/// Review of the reading rule: a log emptied and restored without `sqlite_sequence`
/// (a copy made table by table) hands out ids its consumers are past. `status` says so,
/// and the next start puts the sequence above every cursor, so new changes arrive.
#[test]
fn a_log_restored_without_its_sequence_does_not_skip_new_changes() {
    let s = Setup::new(USERS, "", |dir| {
        recorder("rec", &dir.join("rec.jsonl"), "users", &["id"], "", "")
    });
    let file = s.dir.join("rec.jsonl");
    let mut d = s.start();
    let w = sqlite::connect(&s.db);
    w.execute_batch("INSERT INTO users (id, email) VALUES (1, 'a'), (2, 'b'), (3, 'c')")
        .unwrap();
    wait_recorded(&file, 3, WAIT);
    assert!(d
        .signal_and_wait(libc::SIGTERM, WAIT)
        .is_some_and(|st| st.success()));
    w.execute_batch(
        "DELETE FROM epidemic_log_users;
         DELETE FROM sqlite_sequence WHERE name = 'epidemic_log_users';",
    )
    .unwrap();
    let out = epidemic_tests::epidemic(&s.config, &["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("sqlite_sequence"), "{text}");
    let d = s.start();
    w.execute_batch("INSERT INTO users (id, email) VALUES (4, 'd')")
        .unwrap();
    assert!(
        wait_until(WAIT, || recorded(&file).len() >= 4),
        "change after the restore was skipped:\n{}",
        d.log_text()
    );
    assert_eq!(recorded(&file)[3]["new"]["id"], 4);
    let out = epidemic_tests::epidemic(&s.config, &["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("sqlite_sequence"), "{text}");
}

/// Item 3 at random: seeded mixes of every insert, upsert, REPLACE and UPDATE OR REPLACE
/// form, deletes, savepoints rolled back and `recursive_triggers` switched on and off, in
/// a small key space so that conflicts are frequent, with the daemon SIGKILLed halfway.
/// Replaying what the handler received (each change id once) must rebuild the table row
/// for row, and every UPDATE's and DELETE's old image must be the row as it was.
///
/// A bigger run: `EPIDEMIC_SQLITE_MIX_SEEDS=20 EPIDEMIC_SQLITE_MIX_OPS=5000 cargo test -p
/// epidemic-tests --test sqlite_noloss -- random` (seeds 1..=N).
#[test]
fn random_replace_mixes_replay_to_the_table() {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let seeds: Vec<u64> = match env("EPIDEMIC_SQLITE_MIX_SEEDS") {
        Some(n) => (1..=n).collect(),
        None => vec![1, 7, 42],
    };
    let ops = env("EPIDEMIC_SQLITE_MIX_OPS").unwrap_or(400) as usize;
    for seed in seeds {
        random_mix(seed, ops);
    }
}

fn random_mix(seed: u64, ops: usize) {
    let s = Setup::new(USERS, "", |dir| {
        recorder(
            "rec",
            &dir.join("rec.jsonl"),
            "users",
            &["id", "email", "quota"],
            "",
            "",
        )
    });
    let file = s.dir.join("rec.jsonl");
    let mut d = s.start();
    let w = sqlite::connect(&s.db);
    let mut rng = Rng::from_state(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut script = Vec::new();
    for n in 0..ops {
        if n == ops / 2 {
            d.kill();
            d = s.start();
        }
        let id = |r: &mut Rng| r.below(12) as i64 + 1;
        let email = |r: &mut Rng| format!("e{}", r.below(12));
        let (a, b, e, q) = (id(&mut rng), id(&mut rng), email(&mut rng), n as i64);
        let sql = match rng.below(17) {
            0 => format!("INSERT INTO users VALUES ({a}, '{e}', {q})"),
            1 => format!("INSERT OR REPLACE INTO users VALUES ({a}, '{e}', {q})"),
            2 => format!("REPLACE INTO users VALUES ({a}, '{e}', {q}), ({b}, '{}', {q})", email(&mut rng)),
            3 => format!("INSERT OR IGNORE INTO users VALUES ({a}, '{e}', {q})"),
            4 => format!("INSERT INTO users VALUES ({a}, '{e}', {q}) ON CONFLICT (id) DO UPDATE SET email = excluded.email, quota = excluded.quota"),
            5 => format!("INSERT INTO users VALUES ({a}, '{e}', {q}) ON CONFLICT (email) DO UPDATE SET quota = excluded.quota, id = {b}"),
            6 => format!("INSERT INTO users VALUES ({a}, '{e}', {q}) ON CONFLICT DO NOTHING"),
            7 => format!("UPDATE users SET email = '{e}' WHERE id = {a}"),
            8 => format!("UPDATE OR REPLACE users SET email = '{e}' WHERE id = {a}"),
            9 => format!("UPDATE OR REPLACE users SET id = {b} WHERE id = {a}"),
            10 => format!("UPDATE OR IGNORE users SET id = {b}, email = '{e}' WHERE id = {a}"),
            11 => format!("DELETE FROM users WHERE id = {a}"),
            12 => format!("UPDATE OR REPLACE users SET quota = quota + 1, email = '{e}' WHERE id > {a}"),
            13 => format!(
                "SAVEPOINT s; INSERT OR REPLACE INTO users VALUES ({a}, '{e}', {q}); ROLLBACK TO s; RELEASE s; \
                 INSERT OR REPLACE INTO users VALUES ({b}, '{e}', {q})"
            ),
            14 => format!("INSERT OR FAIL INTO users VALUES ({a}, 'f{q}', {q}), ({b}, '{e}', {q})"),
            15 => format!("PRAGMA recursive_triggers = {}", rng.below(2)),
            _ => format!("INSERT OR REPLACE INTO users (email, quota) VALUES ('{e}', {q})"),
        };
        // Constraint failures are part of the mix: they must leave no trace.
        let _ = w.execute_batch(&sql);
        script.push(sql);
    }
    w.execute_batch("PRAGMA recursive_triggers = 0; DELETE FROM users WHERE id = 999; INSERT INTO users VALUES (999, 'marker', 0)")
        .unwrap();
    assert!(
        wait_until(WAIT, || recorded(&file)
            .iter()
            .any(|l| l["new"]["email"] == "marker")),
        "seed {seed}: marker never arrived:\n{}",
        d.log_text()
    );
    // At least once: a change the SIGKILL caught between handler and ack comes twice.
    let mut changes: BTreeMap<i64, Value> = BTreeMap::new();
    for l in recorded(&file) {
        changes.entry(l["id"].as_i64().unwrap()).or_insert(l);
    }
    let key = |row: &Value| row["id"].as_i64().unwrap();
    let mut replay: BTreeMap<i64, Value> = BTreeMap::new();
    for (cid, l) in &changes {
        let (old, new) = (&l["old"], &l["new"]);
        let context = || {
            format!(
                "seed {seed}, change {cid}: {l}\nscript:\n{}",
                script.join("\n")
            )
        };
        match l["op"].as_str().unwrap() {
            "INSERT" => {
                assert!(
                    replay.insert(key(new), new.clone()).is_none(),
                    "insert over a live row; {}",
                    context()
                );
            }
            "UPDATE" => {
                assert_eq!(
                    replay.remove(&key(old)).as_ref(),
                    Some(old),
                    "stale old image; {}",
                    context()
                );
                assert!(
                    replay.insert(key(new), new.clone()).is_none(),
                    "update onto a live row; {}",
                    context()
                );
            }
            "DELETE" => {
                assert_eq!(
                    replay.remove(&key(old)).as_ref(),
                    Some(old),
                    "stale old image; {}",
                    context()
                );
            }
            op => panic!("unknown op {op}"),
        }
    }
    let mut stmt = w
        .prepare("SELECT id, email, quota FROM users ORDER BY id")
        .unwrap();
    let table: BTreeMap<i64, Value> = stmt
        .query_map([], |r| {
            let id: i64 = r.get(0)?;
            Ok((id, user(id, &r.get::<_, String>(1)?, r.get(2)?)))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(replay, table, "seed {seed}\nscript:\n{}", script.join("\n"));
}
