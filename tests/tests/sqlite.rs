//! End to end on SQLite: the real `epidemic` binary, the real backend and handler `.so`
//! files, and a writer connection in this (separate) process.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use epidemic_tests::{
    epidemic, recorded, recorder_handler, sqlite, wait_recorded, wait_until, Daemon,
};
use rusqlite::params;
use serde_json::{json, Value};

const SCHEMA: &str = "CREATE TABLE mail_users (
    id INTEGER PRIMARY KEY,
    username TEXT NOT NULL,
    quota_bytes INTEGER,
    avatar BLOB,
    last_login TEXT
);";

const WAIT: Duration = Duration::from_secs(20);

struct Setup {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    db: PathBuf,
    config: PathBuf,
    log: PathBuf,
}

impl Setup {
    fn new(daemon_section: &str, handlers: impl FnOnce(&Path) -> String) -> Setup {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_owned();
        let db = sqlite::create_db(&dir, "mail", SCHEMA);
        let config = dir.join("epidemic.toml");
        let text = format!(
            "[database]\nurl = {:?}\n\n[daemon]\nname = \"mx1\"\n{daemon_section}\n\n{}",
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

    /// Start the daemon and wait until it has started (this start, not an earlier one
    /// that logged to the same file).
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

#[test]
fn each_handler_gets_exactly_what_it_subscribed_to() {
    let s = Setup::new("", |dir| {
        recorder_handler(
            "all",
            &dir.join("all.jsonl"),
            "mail_users",
            &["username", "quota_bytes", "avatar"],
            "",
        ) + &recorder_handler(
            "quota",
            &dir.join("quota.jsonl"),
            "mail_users",
            &["quota_bytes"],
            "ops = [\"update\"]",
        )
    });
    let _d = s.start();
    let w = sqlite::connect(&s.db);
    w.execute(
        "INSERT INTO mail_users (id, username, quota_bytes, avatar) VALUES (1, 'ann@example.org', 1000, x'00ff')",
        [],
    )
    .unwrap();
    // Unwatched column only: nobody hears of it.
    w.execute(
        "UPDATE mail_users SET last_login = 'today' WHERE id = 1",
        [],
    )
    .unwrap();
    // Username only: "all" hears, "quota" does not.
    w.execute(
        "UPDATE mail_users SET username = 'ann@example.com' WHERE id = 1",
        [],
    )
    .unwrap();
    // Quota to NULL: both hear.
    w.execute("UPDATE mail_users SET quota_bytes = NULL WHERE id = 1", [])
        .unwrap();
    w.execute("DELETE FROM mail_users WHERE id = 1", [])
        .unwrap();

    let all = wait_recorded(&s.dir.join("all.jsonl"), 4, WAIT);
    let quota = wait_recorded(&s.dir.join("quota.jsonl"), 1, WAIT);
    let row = |u: &str, q: Value| json!({"username": u, "quota_bytes": q, "avatar": "00ff"});
    assert_eq!(
        ops(&all),
        vec![
            (
                "INSERT".into(),
                Value::Null,
                row("ann@example.org", json!(1000))
            ),
            (
                "UPDATE".into(),
                row("ann@example.org", json!(1000)),
                row("ann@example.com", json!(1000))
            ),
            (
                "UPDATE".into(),
                row("ann@example.com", json!(1000)),
                row("ann@example.com", Value::Null)
            ),
            (
                "DELETE".into(),
                row("ann@example.com", Value::Null),
                Value::Null
            ),
        ]
    );
    assert_eq!(
        ops(&quota),
        vec![(
            "UPDATE".into(),
            json!({"quota_bytes": 1000}),
            json!({"quota_bytes": null})
        )]
    );
    // Nothing more arrives: the last_login update never reaches anyone. Prove the
    // daemon is caught up by sending a marker through and checking only it arrives.
    w.execute(
        "INSERT INTO mail_users (id, username) VALUES (2, 'marker')",
        [],
    )
    .unwrap();
    let all = wait_recorded(&s.dir.join("all.jsonl"), 5, WAIT);
    assert_eq!(all.len(), 5);
    assert_eq!(all[4]["new"]["username"], "marker");
    assert_eq!(recorded(&s.dir.join("quota.jsonl")).len(), 1);
}

/// Insert `n` rows in small transactions with ids from `start`.
fn write_rows(db: &Path, start: i64, n: i64, per_tx: i64) {
    let mut w = sqlite::connect(db);
    let mut i = start;
    while i < start + n {
        let tx = w.transaction().unwrap();
        for j in i..(i + per_tx).min(start + n) {
            tx.execute(
                "INSERT INTO mail_users (id, username, quota_bytes) VALUES (?1, ?2, ?1)",
                params![j, format!("user{j}")],
            )
            .unwrap();
        }
        tx.commit().unwrap();
        i += per_tx;
    }
}

fn delivered_ids(path: &Path) -> Vec<i64> {
    recorded(path)
        .iter()
        .filter_map(|l| l["new"]["quota_bytes"].as_i64())
        .collect()
}

#[test]
fn sigkill_mid_stream_loses_nothing() {
    const N: i64 = 6_000;
    const BATCH: usize = 100;
    let s = Setup::new(&format!("batch_size = {BATCH}"), |dir| {
        recorder_handler(
            "rec",
            &dir.join("rec.jsonl"),
            "mail_users",
            &["username", "quota_bytes"],
            "",
        )
    });
    let out = s.dir.join("rec.jsonl");
    let mut d = s.start();
    let db = s.db.clone();
    let writer = std::thread::spawn(move || write_rows(&db, 1, N, 5));
    let mut kills = 0;
    for round in 1..=4 {
        // Kill once a few more changes have landed since the last restart.
        let seen = delivered_ids(&out).len();
        wait_until(WAIT, || {
            delivered_ids(&out).len() > seen + 200 || writer.is_finished()
        });
        d.kill();
        kills += 1;
        d = Daemon::start(&s.config, &s.log, &[]);
        assert!(
            wait_until(WAIT, || d.log_text().matches("resuming consumer").count()
                >= round),
            "restart {round} failed:\n{}",
            d.log_text()
        );
    }
    writer.join().unwrap();
    let want: HashSet<i64> = (1..=N).collect();
    wait_until(Duration::from_secs(60), || {
        delivered_ids(&out).into_iter().collect::<HashSet<_>>() == want
    });
    let got = delivered_ids(&out);
    let unique: HashSet<i64> = got.iter().copied().collect();
    let missing: Vec<i64> = want.difference(&unique).copied().take(10).collect();
    assert!(
        missing.is_empty(),
        "changes lost after SIGKILL, e.g. {missing:?}"
    );
    // Duplicates only for the batch in flight at each kill.
    let dups = got.len() - unique.len();
    assert!(
        dups <= kills * BATCH,
        "{dups} duplicates for {kills} kills of batch {BATCH}"
    );
    // Per row, in commit order: each id's INSERT arrives once at least, and ids of one
    // writer arrive in increasing order apart from redelivered batches.
    assert!(d.alive());
}

fn log_rows(db: &Path) -> i64 {
    sqlite::connect(db)
        .query_row("SELECT count(*) FROM epidemic_log_mail_users", [], |r| {
            r.get(0)
        })
        .unwrap()
}

#[test]
fn prune_then_write_more_skips_nothing() {
    let s = Setup::new("prune_interval_ms = 50", |dir| {
        recorder_handler(
            "rec",
            &dir.join("rec.jsonl"),
            "mail_users",
            &["quota_bytes"],
            "",
        )
    });
    let out = s.dir.join("rec.jsonl");
    let mut d = s.start();
    write_rows(&s.db, 1, 50, 10);
    assert_eq!(wait_recorded(&out, 50, WAIT).len(), 50);
    // Every consumer passed every row: the log empties, including its newest row.
    assert!(
        wait_until(WAIT, || log_rows(&s.db) == 0),
        "log not pruned: {} rows",
        log_rows(&s.db)
    );
    // With a plain rowid the next change would reuse id 1 and land below the cursor.
    d.kill();
    write_rows(&s.db, 51, 20, 1);
    let d = Daemon::start(&s.config, &s.log, &[]);
    assert_eq!(wait_recorded(&out, 70, WAIT).len(), 70, "{}", d.log_text());
    let ids: HashSet<i64> = delivered_ids(&out).into_iter().collect();
    assert_eq!(ids, (1..=70).collect());
}

#[test]
fn run_twice_then_uninstall_restores_the_schema() {
    let s = Setup::new("", |dir| {
        recorder_handler(
            "rec",
            &dir.join("rec.jsonl"),
            "mail_users",
            &["username"],
            "",
        )
    });
    // A user trigger and index that must survive uninstall untouched.
    sqlite::connect(&s.db)
        .execute_batch(
            "CREATE INDEX users_by_name ON mail_users(username);
             CREATE TABLE audit (msg TEXT);
             CREATE TRIGGER user_audit AFTER INSERT ON mail_users BEGIN INSERT INTO audit VALUES (NEW.username); END;",
        )
        .unwrap();
    let before = sqlite::objects(&s.db);
    for _ in 0..2 {
        let mut d = s.start();
        assert_eq!(
            d.signal_and_wait(libc::SIGTERM, WAIT).map(|s| s.code()),
            Some(Some(0)),
            "{}",
            d.log_text()
        );
    }
    let out = epidemic(&s.config, &["install"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ne!(sqlite::objects(&s.db), before, "install created nothing?");
    let out = epidemic(&s.config, &["uninstall"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(sqlite::objects(&s.db), before);
    // Uninstalling again is a no-op, not an error.
    let out = epidemic(&s.config, &["uninstall"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "nothing to uninstall"
    );
}

/// `epidemic sql | head -1`: the command ends when its reader goes away, quietly (killed by
/// SIGPIPE like other Unix tools), not with a broken-pipe panic and exit code 101.
#[test]
fn sql_into_a_closed_pipe_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Command, Stdio};
    let s = Setup::new("", |dir| {
        recorder_handler(
            "rec",
            &dir.join("rec.jsonl"),
            "mail_users",
            &["username"],
            "",
        )
    });
    let mut child = Command::new(epidemic_tests::epidemic_bin())
        .arg("--config")
        .arg(&s.config)
        .arg("sql")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The reader goes away before the command writes its first line (it is still loading
    // plugins), as `head` does once it has read enough.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_ne!(out.status.code(), Some(101), "{stderr}");
    assert!(
        out.status.success() || out.status.signal() == Some(libc::SIGPIPE),
        "{:?} {stderr}",
        out.status
    );
}

#[test]
fn sql_prints_the_ddl_and_applies_nothing() {
    let s = Setup::new("", |dir| {
        recorder_handler(
            "rec",
            &dir.join("rec.jsonl"),
            "mail_users",
            &["username", "quota_bytes"],
            "",
        )
    });
    let before = sqlite::objects(&s.db);
    let out = epidemic(&s.config, &["sql"]);
    assert!(out.status.success());
    let sql = String::from_utf8_lossy(&out.stdout);
    assert!(
        sql.contains("CREATE TABLE \"epidemic_log_mail_users\""),
        "{sql}"
    );
    assert!(sql.contains("AUTOINCREMENT"), "{sql}");
    assert!(
        sql.contains("CREATE TRIGGER \"epidemic_mail_users_update\""),
        "{sql}"
    );
    assert_eq!(sqlite::objects(&s.db), before);
    // The printed script is what install runs: applying it by hand gives the same schema.
    let by_hand = s.dir.join("by_hand.db");
    std::fs::copy(&s.db, &by_hand).unwrap();
    sqlite::connect(&by_hand).execute_batch(&sql).unwrap();
    let out = epidemic(&s.config, &["install"]);
    assert!(out.status.success());
    assert_eq!(sqlite::objects(&by_hand), sqlite::objects(&s.db));
}

#[test]
fn a_panicking_handler_is_a_failed_delivery_not_a_crash() {
    let s = Setup::new("", |dir| {
        recorder_handler(
            "rec",
            &dir.join("rec.jsonl"),
            "mail_users",
            &["username"],
            "panic_on = \"boom\"",
        )
        .replace(
            "[handler.config]",
            "max_attempts = 2\nretry_initial_ms = 10\n[handler.config]",
        )
    });
    let mut d = s.start();
    let w = sqlite::connect(&s.db);
    w.execute(
        "INSERT INTO mail_users (id, username) VALUES (1, 'boom')",
        [],
    )
    .unwrap();
    w.execute(
        "INSERT INTO mail_users (id, username) VALUES (2, 'fine')",
        [],
    )
    .unwrap();
    let got = wait_recorded(&s.dir.join("rec.jsonl"), 1, WAIT);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["new"]["username"], "fine");
    assert!(d.alive(), "daemon died:\n{}", d.log_text());
    let log = d.log_text();
    assert!(log.contains("recorder told to panic on boom"), "{log}");
    assert!(log.contains("giving up on this change"), "{log}");
}

#[test]
fn handler_filters_by_operation_and_projects_columns() {
    let s = Setup::new("", |dir| {
        recorder_handler(
            "del",
            &dir.join("del.jsonl"),
            "mail_users",
            &["username"],
            "ops = [\"delete\"]",
        )
    });
    let _d = s.start();
    let w = sqlite::connect(&s.db);
    w.execute(
        "INSERT INTO mail_users (id, username, quota_bytes) VALUES (1, 'a', 5)",
        [],
    )
    .unwrap();
    w.execute("UPDATE mail_users SET username = 'b' WHERE id = 1", [])
        .unwrap();
    w.execute("DELETE FROM mail_users WHERE id = 1", [])
        .unwrap();
    let got = wait_recorded(&s.dir.join("del.jsonl"), 1, WAIT);
    assert_eq!(
        ops(&got),
        vec![("DELETE".into(), json!({"username": "b"}), Value::Null)]
    );
}

/// Each bad input: exit non-zero, one line on stderr containing `needle`, nothing created.
fn assert_refused(s: &Setup, config_text: &str, needle: &str) {
    std::fs::write(&s.config, config_text).unwrap();
    let before = sqlite::objects(&s.db);
    for cmd in ["install", "run", "sql"] {
        let out = epidemic(&s.config, &[cmd]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{cmd} accepted:\n{config_text}");
        let lines: Vec<&str> = err.lines().filter(|l| l.contains("error")).collect();
        assert_eq!(lines.len(), 1, "{cmd}: want one error line, got:\n{err}");
        assert!(lines[0].contains(needle), "{cmd}: {needle:?} not in {err}");
        assert_eq!(sqlite::objects(&s.db), before, "{cmd} created something");
    }
}

#[test]
fn bad_config_is_a_clear_error_and_creates_nothing() {
    let s = Setup::new("", |_| String::new());
    let url = sqlite::url(&s.db);
    let rec = |table: &str, cols: &str| {
        format!(
            "[[handler]]\nname = \"rec\"\nplugin = {:?}\n[handler.config]\nfile = {:?}\ntable = {table:?}\ncolumns = {cols}\n",
            epidemic_tests::plugin_path("recorder").display().to_string(),
            s.dir.join("x.jsonl").display().to_string()
        )
    };
    let good_handler = rec("mail_users", "[\"username\"]");
    let file = s.config.display().to_string();
    assert_refused(&s, "[database\nurl = 1", &file);
    assert_refused(
        &s,
        &format!("[database]\nurl = {url:?}\ncolour = 1\n{good_handler}"),
        "colour",
    );
    assert_refused(
        &s,
        &format!("[database]\nurl = {url:?}\n[daemon]\nnmae = \"x\"\n{good_handler}"),
        "nmae",
    );
    assert_refused(
        &s,
        &format!("[database]\nurl = {url:?}\n[extra]\n{good_handler}"),
        "extra",
    );
    assert_refused(
        &s,
        &format!(
            "[database]\nurl = {url:?}\n{}",
            good_handler.replace("table =", "tabel = \"x\"\ntable =")
        ),
        "tabel",
    );
    assert_refused(
        &s,
        &format!(
            "[database]\nurl = {url:?}\n{}",
            rec("no_such_table", "[\"username\"]")
        ),
        "no_such_table",
    );
    assert_refused(
        &s,
        &format!(
            "[database]\nurl = {url:?}\n{}",
            rec("mail_users", "[\"nope\"]")
        ),
        "nope",
    );
    assert_refused(
        &s,
        &format!(
            "[database]\nurl = {url:?}\n{}",
            rec("users; DROP TABLE mail_users", "[\"username\"]")
        ),
        "users; DROP TABLE mail_users",
    );
    assert_refused(
        &s,
        &format!(
            "[database]\nurl = {url:?}\n{}",
            rec("mail_users", "[\"username\\\" text); DROP TABLE x; --\"]")
        ),
        "invalid column name",
    );
    assert_refused(
        &s,
        &format!("[database]\nurl = \"nosuch://x\"\n{good_handler}"),
        "no backend library for nosuch://",
    );
    assert_refused(
        &s,
        &format!("[database]\nurl = \"sqlite:///nonexistent/x.db\"\n{good_handler}"),
        "/nonexistent/x.db",
    );
    assert_refused(
        &s,
        &format!(
            "[database]\nurl = {url:?}\n{}",
            good_handler.replace("recorder.so", "nothere.so")
        ),
        "file not found",
    );
    // The user's table is still there after the injection attempts.
    assert_eq!(
        sqlite::connect(&s.db)
            .query_row("SELECT count(*) FROM mail_users", [], |r| r
                .get::<_, i64>(0))
            .unwrap(),
        0
    );
}

#[test]
fn env_overrides_the_config_file() {
    let s = Setup::new("", |dir| {
        recorder_handler(
            "rec",
            &dir.join("rec.jsonl"),
            "mail_users",
            &["username"],
            "",
        )
    });
    let other = sqlite::create_db(&s.dir, "other", SCHEMA);
    let _d = Daemon::start_with_env(
        &s.config,
        &s.log,
        &[],
        &[("EPIDEMIC_DATABASE__URL", &sqlite::url(&other))],
    );
    assert!(wait_until(WAIT, || std::fs::read_to_string(&s.log)
        .unwrap_or_default()
        .contains("epidemic started")));
    sqlite::connect(&other)
        .execute(
            "INSERT INTO mail_users (id, username) VALUES (1, 'via-env')",
            [],
        )
        .unwrap();
    let got = wait_recorded(&s.dir.join("rec.jsonl"), 1, WAIT);
    assert_eq!(got[0]["new"]["username"], "via-env");
    // The file's database was never touched.
    let objs: BTreeMap<String, String> = sqlite::objects(&s.db)
        .into_iter()
        .map(|(_, n, sql)| (n, sql))
        .collect();
    assert!(!objs.keys().any(|n| n.starts_with("epidemic")), "{objs:?}");
}

#[test]
fn a_removed_handler_stops_holding_back_its_table() {
    let s = Setup::new("prune_interval_ms = 50", |dir| {
        recorder_handler(
            "users",
            &dir.join("u.jsonl"),
            "mail_users",
            &["username"],
            "",
        ) + &recorder_handler("groups", &dir.join("g.jsonl"), "groups", &["name"], "")
    });
    sqlite::connect(&s.db)
        .execute_batch("CREATE TABLE groups (id INTEGER PRIMARY KEY, name TEXT)")
        .unwrap();
    let mut d = s.start();
    d.kill();
    // The "groups" handler is removed from the config; a second daemon still reads groups.
    let text = std::fs::read_to_string(&s.config).unwrap();
    let cut = text.find("[[handler]]\nname = \"groups\"").unwrap();
    std::fs::write(&s.config, &text[..cut]).unwrap();
    let other = s.dir.join("other.toml");
    std::fs::write(
        &other,
        text.replace("name = \"mx1\"", "name = \"mx2\"").replacen(
            &text[text.find("[[handler]]").unwrap()..cut],
            "",
            1,
        ),
    )
    .unwrap();
    let mx2 = Daemon::start(&other, &s.dir.join("other.log"), &[]);
    // mx2 starts from now: only changes after it is up count.
    assert!(
        mx2.wait_for_log("epidemic started", WAIT),
        "{}",
        mx2.log_text()
    );
    let _mx1 = s.start();
    let w = sqlite::connect(&s.db);
    for i in 0..10 {
        w.execute("INSERT INTO groups (name) VALUES (?1)", [format!("g{i}")])
            .unwrap();
    }
    // mx2 reads them; mx1/groups no longer exists, so nothing holds the log back.
    assert_eq!(wait_recorded(&s.dir.join("g.jsonl"), 10, WAIT).len(), 10);
    let rows = || -> i64 {
        sqlite::connect(&s.db)
            .query_row("SELECT count(*) FROM epidemic_log_groups", [], |r| r.get(0))
            .unwrap()
    };
    assert!(
        wait_until(WAIT, || rows() == 0),
        "groups log holds {} rows; status: {}",
        rows(),
        String::from_utf8_lossy(&epidemic(&s.config, &["status"]).stdout)
    );
    let out = epidemic(&s.config, &["status", "--json"]);
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mx1: Vec<&Value> = status["consumers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["daemon"] == "mx1")
        .collect();
    assert_eq!(mx1.len(), 1, "{status}");
    assert_eq!(mx1[0]["handler"], "users");
    assert!(std::fs::read_to_string(&s.log)
        .unwrap()
        .contains("handler no longer in the config"));
}

/// End to end: a watched table without a primary key is refused by `install`, `run` and
/// `sql` with one line naming the table and the `[table.NAME] key = [..]` fix, creating
/// nothing; with that key in the config the daemon delivers its changes with the key
/// (and the old key of an update that moved the row) and a stable id.
#[test]
fn a_table_without_a_primary_key_needs_a_key_in_the_config() {
    let s = Setup::new("", |_| String::new());
    sqlite::connect(&s.db)
        .execute_batch("CREATE TABLE events (kind TEXT, at INTEGER, payload TEXT);")
        .unwrap();
    let handler = recorder_handler("rec", &s.dir.join("rec.jsonl"), "events", &["payload"], "");
    let config = |table_section: &str| {
        format!(
            "[database]\nurl = {:?}\n\n[daemon]\nname = \"mx1\"\n{table_section}\n{handler}",
            sqlite::url(&s.db)
        )
    };
    assert_refused(
        &s,
        &config(""),
        "table events has no primary key: add one, or name the columns that identify a row in the config ([table.events] key = [\"column\", ...])",
    );
    assert_refused(
        &s,
        &config("[table.events]\nkey = [\"kind\", \"nope\"]\n"),
        "[table.events] key: table events has no column nope",
    );

    std::fs::write(
        &s.config,
        config("[table.events]\nkey = [\"kind\", \"at\"]\n"),
    )
    .unwrap();
    let _d = s.start();
    sqlite::connect(&s.db)
        .execute_batch(
            "INSERT INTO events VALUES ('login', 1, 'p');
             UPDATE events SET at = 2;
             DELETE FROM events;",
        )
        .unwrap();
    let got = wait_recorded(&s.dir.join("rec.jsonl"), 3, WAIT);
    let keys: Vec<(Value, Value, Value)> = got
        .iter()
        .map(|l| (l["op"].clone(), l["key"].clone(), l["old_key"].clone()))
        .collect();
    let key = |at: i64| json!({"kind": "login", "at": at});
    assert_eq!(
        keys,
        vec![
            (json!("INSERT"), key(1), Value::Null),
            (json!("UPDATE"), key(2), key(1)),
            (json!("DELETE"), key(2), Value::Null),
        ]
    );
    // The handler watches `payload` only: the key columns reach it as the key, not as
    // columns it did not ask for.
    assert_eq!(got[0]["new"], json!({"payload": "p"}));
    let ids: HashSet<&str> = got.iter().filter_map(|l| l["stable_id"].as_str()).collect();
    assert_eq!(ids.len(), 3, "{got:?}");
}
