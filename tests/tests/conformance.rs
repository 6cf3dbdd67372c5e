//! The delivery conformance suite: the same scenarios, through the real daemon and the
//! real plugin libraries, on every backend. A new backend gets them by implementing
//! [`TestDb`] and adding one line to the `conformance!` list at the bottom.
//!
//! Every scenario writes rows with known ids and checks, from the recorder plugin's
//! output files, that each daemon's handler ended with every committed change.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use epidemic_tests::{epidemic, recorded, recorder_handler, wait_until, Daemon};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

/// A fresh database on one backend, as the suite sees it.
trait TestDb: Send + Sync + 'static {
    /// `database.url` for the daemon.
    fn url(&self) -> String;
    /// Extra `[database]` lines (backend options).
    fn options(&self) -> String {
        String::new()
    }
    /// Run statements in one transaction, from the test's own connection.
    fn transaction(&self, statements: &[String]);
    /// Make the database unavailable for a moment and bring it back: a server restart,
    /// or for SQLite an exclusive lock held by another process.
    fn outage(&self);
    /// Whether every outage cuts the daemon off. SQLite's exclusive lock blocks only
    /// writes (WAL readers go on), so a daemon with nothing to acknowledge during it
    /// may rightly never notice.
    fn outage_always_seen(&self) -> bool {
        true
    }
    /// Whether the database's clock is necessarily the daemon's own (SQLite: the file is
    /// on the daemon's host, and SQLite reads that host's clock), so clock skew between
    /// daemons cannot happen.
    fn clock_is_the_daemons(&self) -> bool {
        false
    }
    /// A statement deleting every consumer's cursor rows (a hostile DBA).
    fn delete_cursors_sql(&self) -> String {
        "DELETE FROM epidemic_cursor".into()
    }
    /// A statement dropping one of Epidemic's triggers on `mail_users`.
    fn drop_trigger_sql(&self, name: &str) -> String {
        format!("DROP TRIGGER {name}")
    }
}

const SCHEMA: &str = "CREATE TABLE mail_users (id BIGINT PRIMARY KEY, username VARCHAR(200) NOT NULL, quota_bytes BIGINT)";

fn insert(id: i64) -> String {
    format!("INSERT INTO mail_users (id, username, quota_bytes) VALUES ({id}, 'user{id}', {id})")
}

/// A test's working directory, config files and daemons.
struct Cluster<D: TestDb> {
    db: Arc<D>,
    _tmp: tempfile::TempDir,
    dir: PathBuf,
}

impl<D: TestDb> Cluster<D> {
    fn new(db: D) -> Self {
        db.transaction(&[SCHEMA.to_owned()]);
        let tmp = tempfile::tempdir().expect("tempdir");
        Cluster {
            db: Arc::new(db),
            dir: tmp.path().to_owned(),
            _tmp: tmp,
        }
    }

    fn out(&self, daemon: &str, handler: &str) -> PathBuf {
        self.dir.join(format!("{daemon}-{handler}.jsonl"))
    }

    /// Write `daemon`'s config: `handlers` are (name, extra [handler] lines, extra
    /// [handler.config] lines).
    fn config(&self, daemon: &str, daemon_extra: &str, handlers: &[(&str, &str, &str)]) -> PathBuf {
        let mut text = format!(
            "[database]\nurl = {:?}\n{}\n[daemon]\nname = {daemon:?}\nprune_interval_ms = 100\n{daemon_extra}\n\n",
            self.db.url(),
            self.db.options()
        );
        for (name, handler_extra, config_extra) in handlers {
            let h = recorder_handler(
                name,
                &self.out(daemon, name),
                "mail_users",
                &["username", "quota_bytes"],
                config_extra,
            );
            text.push_str(&h.replace(
                "[handler.config]",
                &format!("{handler_extra}\n[handler.config]"),
            ));
        }
        let path = self.dir.join(format!("{daemon}.toml"));
        std::fs::write(&path, text).expect("write config");
        path
    }

    fn log(&self, daemon: &str) -> PathBuf {
        self.dir.join(format!("{daemon}.log"))
    }

    /// Start a daemon and wait until this start is ready.
    fn start(&self, daemon: &str) -> Daemon {
        let log = self.log(daemon);
        let before = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("epidemic started")
            .count();
        let d = Daemon::start(&self.dir.join(format!("{daemon}.toml")), &log, &[]);
        assert!(
            wait_until(WAIT, || d.log_text().matches("epidemic started").count()
                > before),
            "{daemon} did not start:\n{}",
            d.log_text()
        );
        d
    }

    /// Rows in the log table(s), from `epidemic status --json`.
    fn log_rows(&self, daemon: &str) -> i64 {
        let out = epidemic(
            &self.dir.join(format!("{daemon}.toml")),
            &["status", "--json"],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let status: Value = serde_json::from_slice(&out.stdout).expect("status json");
        status["tables"]
            .as_array()
            .expect("tables")
            .iter()
            .map(|t| t["log_rows"].as_i64().unwrap_or(0))
            .sum()
    }
}

/// Ids (= quota values) of the INSERTs a recorder file holds.
fn inserted_ids(path: &Path) -> Vec<i64> {
    recorded(path)
        .iter()
        .filter(|l| l["op"] == "INSERT")
        .filter_map(|l| l["new"]["quota_bytes"].as_i64())
        .collect()
}

fn assert_all_delivered(path: &Path, want: &HashSet<i64>) {
    let ok = wait_until(WAIT, || {
        inserted_ids(path).into_iter().collect::<HashSet<_>>() == *want
    });
    let got: HashSet<i64> = inserted_ids(path).into_iter().collect();
    let mut missing: Vec<i64> = want.difference(&got).copied().collect();
    missing.sort_unstable();
    let extra: Vec<i64> = got.difference(want).copied().collect();
    assert!(
        ok,
        "{}: {} missing (first {:?}), {} unexpected ({:?})",
        path.display(),
        missing.len(),
        &missing[..missing.len().min(10)],
        extra.len(),
        extra
    );
}

/// Write rows `ids` in transactions of `per_tx` from a background thread.
fn writer<D: TestDb>(
    db: &Arc<D>,
    ids: std::ops::Range<i64>,
    per_tx: i64,
    pause: Duration,
) -> std::thread::JoinHandle<()> {
    let db = Arc::clone(db);
    std::thread::spawn(move || {
        let mut i = ids.start;
        while i < ids.end {
            let stmts: Vec<String> = (i..(i + per_tx).min(ids.end)).map(insert).collect();
            db.transaction(&stmts);
            i += per_tx;
            std::thread::sleep(pause);
        }
    })
}

/// Three daemons on one database; a stream of changes while daemons are SIGKILLed and
/// restarted at random. Every daemon ends with every change; the log ends pruned.
fn three_daemons_under_sigkill<D: TestDb>(db: D) {
    const N: i64 = 3_000;
    let c = Cluster::new(db);
    let names = ["mx1", "mx2", "mx3"];
    for n in names {
        c.config(n, "batch_size = 50", &[("rec", "", "")]);
    }
    let mut daemons: Vec<Daemon> = names.iter().map(|n| c.start(n)).collect();
    let w = writer(&c.db, 1..N + 1, 3, Duration::from_millis(1));
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut kills = 0;
    while !w.is_finished() || kills < 6 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let i = (rng % 3) as usize;
        // Let some changes through, then kill one daemon hard and bring it back.
        let out = c.out(names[i], "rec");
        let seen = recorded(&out).len();
        wait_until(Duration::from_secs(10), || {
            recorded(&out).len() > seen + 50 || w.is_finished()
        });
        daemons[i].kill();
        kills += 1;
        daemons[i] = c.start(names[i]);
    }
    w.join().expect("writer");
    let want: HashSet<i64> = (1..=N).collect();
    for n in names {
        assert_all_delivered(&c.out(n, "rec"), &want);
    }
    assert!(
        wait_until(WAIT, || c.log_rows("mx1") <= 1),
        "log not pruned: {} rows left",
        c.log_rows("mx1")
    );
    for d in daemons.iter_mut() {
        assert!(d.alive(), "{}", d.log_text());
    }
}

/// A daemon stopped for good stops holding back pruning after `consumer_ttl`, and is
/// told it missed changes when it comes back.
fn stopped_daemon_is_evicted<D: TestDb>(db: D) {
    let c = Cluster::new(db);
    c.config("mx1", "consumer_ttl = \"2s\"", &[("rec", "", "")]);
    c.config("mx2", "consumer_ttl = \"2s\"", &[("rec", "", "")]);
    let _mx1 = c.start("mx1");
    let mut mx2 = c.start("mx2");
    mx2.kill();
    c.db.transaction(&(1..=20).map(insert).collect::<Vec<_>>());
    assert_all_delivered(&c.out("mx1", "rec"), &(1..=20).collect());
    // mx2 has handled none of these, so until it is evicted they stay in the log.
    assert!(c.log_rows("mx1") >= 20);
    assert!(
        wait_until(WAIT, || c.log_rows("mx1") <= 1),
        "log still holds {} rows for the dead consumer",
        c.log_rows("mx1")
    );
    assert!(std::fs::read_to_string(c.log("mx1"))
        .unwrap()
        .contains("evicted a consumer"));
    let status = epidemic(&c.dir.join("mx1.toml"), &["status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("mx2/rec") && l.contains("EVICTED")),
        "{text}"
    );
    let mx2 = c.start("mx2");
    assert!(mx2.log_text().contains("MISSED"), "{}", mx2.log_text());
}

/// Retries, dead letters and `dead-letters retry`, with a healthy handler beside a
/// failing one in the same daemon.
fn failing_handlers<D: TestDb>(db: D) {
    let c = Cluster::new(db);
    let broken = c.dir.join("broken");
    std::fs::write(&broken, "").unwrap();
    let cfg = c.config(
        "mx1",
        "",
        &[
            (
                "flaky",
                "max_attempts = 5\nretry_initial_ms = 5",
                "fail_first = 2",
            ),
            (
                "broken",
                "max_attempts = 2\nretry_initial_ms = 5",
                &format!("fail_while_exists = {:?}", broken.display().to_string()),
            ),
            ("healthy", "", ""),
        ],
    );
    let _d = c.start("mx1");
    let mut stmts: Vec<String> = (1..=10).map(insert).collect();
    stmts.push("UPDATE mail_users SET quota_bytes = 100 WHERE id = 1".into());
    c.db.transaction(&stmts);
    c.db.transaction(&["UPDATE mail_users SET quota_bytes = 101 WHERE id = 1".into()]);
    let want: HashSet<i64> = (1..=10).collect();
    // The healthy handler is not held up by the broken one.
    assert_all_delivered(&c.out("mx1", "healthy"), &want);
    // The flaky one gets everything, after retries, and row 1's changes in commit order.
    assert_all_delivered(&c.out("mx1", "flaky"), &want);
    assert!(wait_until(WAIT, || recorded(&c.out("mx1", "flaky")).len() == 12));
    let flaky = recorded(&c.out("mx1", "flaky"));
    let row1: Vec<i64> = flaky
        .iter()
        .filter(|l| l["new"]["username"] == "user1")
        .map(|l| l["new"]["quota_bytes"].as_i64().unwrap())
        .collect();
    assert_eq!(row1, vec![1, 100, 101]);
    assert!(
        flaky.iter().all(|l| l["attempt"] == 3),
        "each change failed twice first"
    );
    // The broken one delivered nothing; all 12 changes are dead letters.
    let letters = || -> Vec<Value> {
        let out = epidemic(&cfg, &["dead-letters", "list", "--json"]);
        serde_json::from_slice(&out.stdout).unwrap()
    };
    assert!(
        wait_until(WAIT, || letters().len() == 12),
        "{:?}",
        letters()
    );
    assert!(recorded(&c.out("mx1", "broken")).is_empty());
    // Fix the handler, ask for a retry of all of them: they are redelivered and removed.
    std::fs::remove_file(&broken).unwrap();
    let ids: Vec<String> = letters().iter().map(|l| l["id"].to_string()).collect();
    let mut args = vec!["dead-letters", "retry"];
    args.extend(ids.iter().map(String::as_str));
    let out = epidemic(&cfg, &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_all_delivered(&c.out("mx1", "broken"), &want);
    assert!(wait_until(WAIT, || letters().is_empty()));
    // `drop` of an unknown id is refused, changing nothing.
    let out = epidemic(&cfg, &["dead-letters", "drop", "999999"]);
    assert!(!out.status.success());
}

/// The database goes away twice during a stream; the daemon reconnects by itself.
fn database_outages<D: TestDb>(db: D) {
    const N: i64 = 600;
    let c = Cluster::new(db);
    c.config("mx1", "", &[("rec", "", "")]);
    let mut d = c.start("mx1");
    let db = Arc::clone(&c.db);
    let out = c.out("mx1", "rec");
    for round in 0..2 {
        let seen = recorded(&out).len();
        let first = round * N / 2 + 1;
        let w = writer(&c.db, first..first + N / 2, 5, Duration::from_millis(2));
        wait_until(WAIT, || recorded(&out).len() > seen + 20);
        db.outage();
        w.join().expect("writer");
    }
    assert_all_delivered(&out, &(1..=N).collect());
    assert!(d.alive(), "daemon died:\n{}", d.log_text());
    // The outages were real: the daemon lost its connection, said so, and says when it is
    // back (it may sleep through a short outage between two reconnect attempts, so the
    // count of outages it saw can be lower than two).
    if db.outage_always_seen() {
        assert!(
            wait_until(WAIT, || d.log_text().contains("database reachable again")),
            "{}",
            d.log_text()
        );
        assert!(
            d.log_text().contains("database connection lost"),
            "{}",
            d.log_text()
        );
    }
    // Once per outage, not per attempt; an outage may show twice when a step succeeds in
    // its middle (SQLite in WAL mode still serves reads while another process holds the
    // write lock, so a read-only step can end an outage that the next ack starts again:
    // seen under a loaded full-suite run).
    let log = d.log_text();
    assert!(
        log.matches("database connection lost").count() <= 4,
        "an outage must be logged once, not per attempt:\n{log}"
    );
}

/// SIGTERM during a stream: exit 0 promptly; the restart redelivers at most one change.
fn sigterm_during_stream<D: TestDb>(db: D) {
    const N: i64 = 2_000;
    let c = Cluster::new(db);
    c.config("mx1", "batch_size = 200", &[("rec", "", "")]);
    let mut d = c.start("mx1");
    let out = c.out("mx1", "rec");
    let w = writer(&c.db, 1..N + 1, 2, Duration::ZERO);
    wait_until(WAIT, || recorded(&out).len() > 100);
    let status = d.signal_and_wait(libc::SIGTERM, Duration::from_secs(5));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", d.log_text());
    let before = inserted_ids(&out);
    w.join().expect("writer");
    let _d = c.start("mx1");
    assert_all_delivered(&out, &(1..=N).collect());
    let all = inserted_ids(&out);
    let dups = all.len() - all.iter().collect::<HashSet<_>>().len();
    assert!(
        dups <= 1,
        "{dups} changes delivered twice after SIGTERM (had {} before)",
        before.len()
    );
}

/// `epidemic status`, human and JSON, with a known backlog and known dead letters.
fn status_reports_backlog_and_dead_letters<D: TestDb>(db: D) {
    let c = Cluster::new(db);
    let cfg = c.config(
        "mx1",
        "",
        &[
            ("ok", "", ""),
            ("bad", "", "fail_first = 1000\npermanent = true"),
        ],
    );
    let mut d = c.start("mx1");
    c.db.transaction(&[insert(1), insert(2)]);
    let letters = || -> usize {
        let out = epidemic(&cfg, &["dead-letters", "list", "--json"]);
        serde_json::from_slice::<Vec<Value>>(&out.stdout)
            .map(|v| v.len())
            .unwrap_or(0)
    };
    assert!(wait_until(WAIT, || letters() == 2), "{}", d.log_text());
    assert_all_delivered(&c.out("mx1", "ok"), &(1..=2).collect());
    // With the daemon stopped, three more changes are a backlog of 3 for both handlers.
    d.kill();
    c.db.transaction(&[insert(3), insert(4), insert(5)]);

    let out = epidemic(&cfg, &["status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    let consumer = |h: &str| -> Value {
        status["consumers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["daemon"] == "mx1" && x["handler"] == h)
            .unwrap_or_else(|| panic!("no consumer mx1/{h} in {status}"))
            .clone()
    };
    for h in ["ok", "bad"] {
        let x = consumer(h);
        assert_eq!(x["backlog"], 3, "{x}");
        assert!(x["oldest_pending_age_s"].as_f64().is_some(), "{x}");
        assert_eq!(x["evicted"], false, "{x}");
        assert_eq!(x["tables"].as_array().map(Vec::len), Some(1), "{x}");
    }
    assert_eq!(consumer("ok")["dead_letters"], 0);
    assert_eq!(consumer("bad")["dead_letters"], 2);
    let table = &status["tables"][0];
    assert!(
        table["table"].as_str().unwrap().contains("mail_users"),
        "{table}"
    );
    assert!(
        table["triggers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t[1] == true),
        "{table}"
    );
    assert!(table["problems"].as_array().unwrap().is_empty(), "{table}");

    let out = epidemic(&cfg, &["status"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // Cells are read under their column headers (positions may contain spaces).
    let cell = |prefix: &str, column: &str| -> String {
        let header = text
            .lines()
            .find(|l| l.starts_with("CONSUMER"))
            .expect("header");
        let start = header.find(column).expect("column");
        let end = header[start..].find("  ").map(|w| {
            let next = header[start + w..].find(|c: char| c != ' ').unwrap_or(0);
            start + w + next
        });
        let row = text
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("{prefix} in\n{text}"));
        let end = end.unwrap_or(row.len()).min(row.len());
        row[start.min(row.len())..end].trim().to_owned()
    };
    assert_eq!(cell("mx1/bad", "BACKLOG"), "3", "{text}");
    assert_eq!(cell("mx1/bad", "DEAD"), "2", "{text}");
    assert_eq!(cell("mx1/bad", "STATE"), "live", "{text}");
    assert_eq!(cell("mx1/ok", "BACKLOG"), "3", "{text}");
    assert_eq!(cell("mx1/ok", "DEAD"), "0", "{text}");
}

mod sqlite_db {
    use super::*;
    use epidemic_tests::sqlite;

    pub struct SqliteDb {
        _tmp: tempfile::TempDir,
        path: PathBuf,
    }

    impl SqliteDb {
        pub fn new() -> Self {
            let tmp = tempfile::tempdir().expect("tempdir");
            let path = sqlite::create_db(tmp.path(), "mail", "");
            SqliteDb { _tmp: tmp, path }
        }
    }

    impl TestDb for SqliteDb {
        fn clock_is_the_daemons(&self) -> bool {
            true
        }

        fn url(&self) -> String {
            sqlite::url(&self.path)
        }

        fn options(&self) -> String {
            // Give up on a lock after 200 ms so the outage below is an outage (a lost
            // database), not just a slow statement.
            "busy_timeout_ms = 200".into()
        }

        fn transaction(&self, statements: &[String]) {
            let mut conn = sqlite::connect(&self.path);
            let tx = conn.transaction().expect("begin");
            for s in statements {
                tx.execute_batch(s).unwrap_or_else(|e| panic!("{s}: {e}"));
            }
            tx.commit().expect("commit");
        }

        fn outage_always_seen(&self) -> bool {
            false
        }

        fn outage(&self) {
            // SQLite has no server to restart: another process holding an exclusive
            // lock is what makes the database unavailable to the daemon.
            let conn = sqlite::connect(&self.path);
            conn.execute_batch("BEGIN EXCLUSIVE").expect("lock");
            std::thread::sleep(Duration::from_secs(3));
            conn.execute_batch("COMMIT").expect("unlock");
        }
    }
}

mod pg_db {
    use super::*;
    use epidemic_tests::pg::{PgServer, StopMode};
    use std::sync::Mutex;

    /// A private server per test: the outage scenario stops it, and tests of this
    /// binary run in parallel.
    pub struct PgDb {
        server: PgServer,
        url: String,
        pool: Mutex<Vec<::postgres::Client>>,
    }

    impl PgDb {
        pub fn new() -> Self {
            let server = PgServer::start_private();
            let url = server.create_database("conformance");
            PgDb {
                server,
                url,
                pool: Mutex::default(),
            }
        }

        fn try_transaction(&self, statements: &[String]) -> Result<(), ::postgres::Error> {
            let pooled = self.pool.lock().unwrap().pop();
            let mut client = match pooled {
                Some(c) if !c.is_closed() => c,
                _ => ::postgres::Client::connect(&self.url, ::postgres::NoTls)?,
            };
            let mut tx = client.transaction()?;
            for s in statements {
                tx.batch_execute(s)?;
            }
            tx.commit()?;
            self.pool.lock().unwrap().push(client);
            Ok(())
        }
    }

    impl TestDb for PgDb {
        fn delete_cursors_sql(&self) -> String {
            "DELETE FROM epidemic.consumer".into()
        }

        fn drop_trigger_sql(&self, name: &str) -> String {
            format!("DROP TRIGGER \"{name}\" ON mail_users")
        }

        fn url(&self) -> String {
            self.url.clone()
        }

        fn transaction(&self, statements: &[String]) {
            // The writer stands in for the application, which retries through an
            // outage; a retried insert that had in fact committed is a duplicate key.
            let deadline = std::time::Instant::now() + WAIT;
            loop {
                match self.try_transaction(statements) {
                    Ok(()) => return,
                    Err(e) if e.code() == Some(&::postgres::error::SqlState::UNIQUE_VIOLATION) => {
                        return
                    }
                    Err(e) if std::time::Instant::now() < deadline => {
                        let _ = e;
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    Err(e) => panic!("{statements:?}: {e}"),
                }
            }
        }

        fn outage(&self) {
            self.server.stop(StopMode::Immediate);
            // The outage itself: the database stays away for a while.
            std::thread::sleep(Duration::from_secs(2));
            self.server.start();
        }
    }
}

mod mysql_db {
    use super::*;
    use ::mysql::prelude::Queryable;
    use epidemic_tests::mysql::MySqlServer;
    use std::sync::Mutex;

    /// A private MariaDB per test, as for PostgreSQL.
    pub struct MySqlDb {
        server: MySqlServer,
        url: String,
        pool: Mutex<Vec<::mysql::Conn>>,
    }

    impl MySqlDb {
        pub fn new() -> Self {
            let server = MySqlServer::start_new();
            let url = server.create_database("conformance");
            MySqlDb {
                server,
                url,
                pool: Mutex::default(),
            }
        }

        fn try_transaction(&self, statements: &[String]) -> Result<(), ::mysql::Error> {
            let pooled = self.pool.lock().unwrap().pop();
            let mut conn = match pooled {
                Some(c) => c,
                None => ::mysql::Conn::new(::mysql::Opts::from_url(&self.url).expect("url"))?,
            };
            let mut tx = conn.start_transaction(::mysql::TxOpts::default())?;
            for s in statements {
                tx.query_drop(s)?;
            }
            tx.commit()?;
            self.pool.lock().unwrap().push(conn);
            Ok(())
        }
    }

    impl TestDb for MySqlDb {
        fn url(&self) -> String {
            self.url.clone()
        }

        fn transaction(&self, statements: &[String]) {
            // As for PostgreSQL: retry through an outage; a duplicate key means the
            // earlier try had committed.
            let deadline = std::time::Instant::now() + WAIT;
            loop {
                match self.try_transaction(statements) {
                    Ok(()) => return,
                    Err(::mysql::Error::MySqlError(e)) if e.code == 1062 => return,
                    Err(_) if std::time::Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    Err(e) => panic!("{statements:?}: {e}"),
                }
            }
        }

        fn outage(&self) {
            self.server.kill();
            // The outage itself: the database stays away for a while.
            std::thread::sleep(Duration::from_secs(2));
            self.server.start();
        }
    }
}

/// A second daemon started with the name of a live one (a copied config, two units on
/// one host) is refused with one line, and the first one's consumers are untouched.
fn same_name_twice_is_refused<D: TestDb>(db: D) {
    let c = Cluster::new(db);
    c.config("mx1", "lease_ttl = \"2s\"", &[("a", "", ""), ("b", "", "")]);
    let mut mx1 = c.start("mx1");
    // The same daemon name, another handler set: before the lease it forgot a and b.
    let twin = c.dir.join("twin.toml");
    let text = std::fs::read_to_string(c.dir.join("mx1.toml"))
        .unwrap()
        .split("[[handler]]")
        .next()
        .unwrap()
        .to_owned()
        + &recorder_handler(
            "c",
            &c.out("twin", "c"),
            "mail_users",
            &["username", "quota_bytes"],
            "",
        );
    std::fs::write(&twin, text).unwrap();
    let mut second = Daemon::start(&twin, &c.dir.join("twin.log"), &[]);
    let code = second.signal_and_wait(0, WAIT);
    let log = second.log_text();
    assert_eq!(code.and_then(|s| s.code()), Some(1), "{log}");
    assert!(
        log.contains("daemon name \"mx1\" is in use by a live daemon"),
        "{log}"
    );
    assert!(!log.contains("forgot its cursor"), "{log}");
    // The first daemon's consumers are intact and still deliver everything.
    c.db.transaction(&(1..=10).map(insert).collect::<Vec<_>>());
    assert_all_delivered(&c.out("mx1", "a"), &(1..=10).collect());
    assert_all_delivered(&c.out("mx1", "b"), &(1..=10).collect());
    assert!(recorded(&c.out("twin", "c")).is_empty());
    let out = epidemic(&c.dir.join("mx1.toml"), &["status", "--json"]);
    let status: Value = serde_json::from_slice(&out.stdout).expect("status json");
    let names: Vec<String> = status["consumers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            format!(
                "{}/{}",
                c["daemon"].as_str().unwrap(),
                c["handler"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(names, ["mx1/a", "mx1/b"]);
    // `status` names who holds the name; a clean stop releases it.
    let daemons = status["daemons"].as_array().expect("daemons").clone();
    assert_eq!(daemons.len(), 1, "{daemons:?}");
    assert_eq!(daemons[0]["daemon"], "mx1");
    let holder = daemons[0]["holder"].as_str().unwrap();
    assert!(
        holder.starts_with(&format!("pid {} on host ", mx1.pid())),
        "{holder}"
    );
    assert!(daemons[0]["expires_in_ms"].as_i64().unwrap() > 0);
    let text = String::from_utf8_lossy(&epidemic(&c.dir.join("mx1.toml"), &["status"]).stdout)
        .into_owned();
    assert!(
        text.contains("HELD BY") && text.contains("running (lease for"),
        "{text}"
    );
    let code = mx1.signal_and_wait(libc::SIGTERM, WAIT);
    assert_eq!(code.and_then(|s| s.code()), Some(0));
    let out = epidemic(&c.dir.join("mx1.toml"), &["status", "--json"]);
    let status: Value = serde_json::from_slice(&out.stdout).expect("status json");
    assert_eq!(
        status["daemons"].as_array().map(Vec::len),
        Some(0),
        "{status}"
    );
}

/// A DBA (or anything else) deletes a running consumer's cursor: the daemon's next ack or
/// heartbeat updates no row, which is an error it says out loud, never a silent success;
/// it registers again and goes on delivering.
fn cursor_deleted_under_a_running_daemon<D: TestDb>(db: D, delete: &str) {
    let c = Cluster::new(db);
    c.config("mx1", "lease_ttl = \"1s\"", &[("rec", "", "")]);
    let d = c.start("mx1");
    c.db.transaction(&(1..=5).map(insert).collect::<Vec<_>>());
    assert_all_delivered(&c.out("mx1", "rec"), &(1..=5).collect());
    c.db.transaction(&[delete.to_owned()]);
    assert!(
        wait_until(WAIT, || d.log_text().contains("has no cursor any more")
            || d.log_text().contains("is not registered")),
        "{}",
        d.log_text()
    );
    assert!(
        wait_until(WAIT, || d.log_text().contains("registered again from now")),
        "{}",
        d.log_text()
    );
    c.db.transaction(&(6..=10).map(insert).collect::<Vec<_>>());
    assert_all_delivered(&c.out("mx1", "rec"), &(1..=10).collect());
}

/// A handler that retries far longer than `consumer_ttl` (on_failure = "block") keeps its
/// consumer alive: heartbeats do not wait for the handler. A peer daemon's housekeeping,
/// which would evict it, never does.
fn blocked_handler_is_not_evicted<D: TestDb>(db: D) {
    let c = Cluster::new(db);
    let broken = c.dir.join("broken");
    std::fs::write(&broken, "").unwrap();
    c.config(
        "mx1",
        "consumer_ttl = \"1s\"",
        &[(
            "rec",
            "on_failure = \"block\"\nretry_initial_ms = 50\nretry_max_ms = 200",
            &format!("fail_while_exists = {:?}", broken.display().to_string()),
        )],
    );
    c.config("mx2", "consumer_ttl = \"1s\"", &[("rec", "", "")]);
    let mx1 = c.start("mx1");
    let mx2 = c.start("mx2");
    c.db.transaction(&(1..=3).map(insert).collect::<Vec<_>>());
    assert_all_delivered(&c.out("mx2", "rec"), &(1..=3).collect());
    assert!(wait_until(WAIT, || mx1.log_text().contains("will retry")));
    // Five TTLs of retrying: an eviction, if it came, would be logged by either daemon.
    let evicted = wait_until(Duration::from_secs(5), || {
        mx2.log_text().contains("evicted a consumer")
            || mx1.log_text().contains("evicted a consumer")
    });
    assert!(!evicted, "{}\n{}", mx1.log_text(), mx2.log_text());
    std::fs::remove_file(&broken).unwrap();
    assert_all_delivered(&c.out("mx1", "rec"), &(1..=3).collect());
    assert!(!mx1.log_text().contains("MISSED"), "{}", mx1.log_text());
}

/// A daemon whose clock runs a day ahead evicts nobody: `last_seen` and eviction use the
/// database's clock.
fn clock_skew_evicts_nobody<D: TestDb>(db: D) {
    if c_skip_clock(&db) {
        return;
    }
    // Debian's libfaketime, wherever the architecture puts it.
    let faketime = std::fs::read_dir("/usr/lib")
        .expect("/usr/lib")
        .flatten()
        .map(|e| e.path().join("faketime/libfaketime.so.1"))
        .chain([PathBuf::from("/usr/lib/faketime/libfaketime.so.1")])
        .find(|p| p.exists())
        .expect(
            "libfaketime.so.1 is missing: install Debian's faketime package (scripts/test.sh does)",
        );
    let faketime = faketime.to_str().expect("a UTF-8 path");
    let c = Cluster::new(db);
    c.config("mx1", "consumer_ttl = \"1h\"", &[("rec", "", "")]);
    c.config("mx2", "consumer_ttl = \"1h\"", &[("rec", "", "")]);
    let mx1 = c.start("mx1");
    let log = c.log("mx2");
    let mx2 = Daemon::start_with_env(
        &c.dir.join("mx2.toml"),
        &log,
        &[],
        &[
            ("LD_PRELOAD", faketime),
            ("FAKETIME", "+1d"),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ],
    );
    assert!(
        wait_until(WAIT, || mx2.log_text().contains("epidemic started")),
        "{}",
        mx2.log_text()
    );
    c.db.transaction(&(1..=5).map(insert).collect::<Vec<_>>());
    assert_all_delivered(&c.out("mx1", "rec"), &(1..=5).collect());
    assert_all_delivered(&c.out("mx2", "rec"), &(1..=5).collect());
    // mx2 prunes and evicts every 100 ms; give it many rounds to get it wrong.
    let evicted = wait_until(Duration::from_secs(3), || {
        mx2.log_text().contains("evicted a consumer")
            || mx1.log_text().contains("evicted a consumer")
    });
    assert!(!evicted, "{}", mx2.log_text());
    c.db.transaction(&(6..=10).map(insert).collect::<Vec<_>>());
    assert_all_delivered(&c.out("mx1", "rec"), &(1..=10).collect());
    assert!(!mx1.log_text().contains("MISSED"), "{}", mx1.log_text());
}

/// Drift that appears while a daemon runs (a trigger dropped by hand) is logged by the
/// running daemon, once, without waiting for a restart or an `epidemic status`.
fn drift_while_running_is_logged<D: TestDb>(db: D) {
    let c = Cluster::new(db);
    c.config(
        "mx1",
        "health_check_interval = \"200ms\"",
        &[("rec", "", "")],
    );
    let d = c.start("mx1");
    let out = epidemic(&c.dir.join("mx1.toml"), &["status", "--json"]);
    let status: Value = serde_json::from_slice(&out.stdout).expect("status json");
    let trigger = status["tables"][0]["triggers"]
        .as_array()
        .expect("triggers")
        .iter()
        .map(|t| t[0].as_str().unwrap().to_owned())
        .find(|t| t.contains("delete") || t.contains("del"))
        .expect("a delete trigger");
    assert!(!d.log_text().contains("schema drift"), "{}", d.log_text());
    c.db.transaction(&[c.db.drop_trigger_sql(&trigger)]);
    assert!(
        wait_until(WAIT, || d.log_text().contains("schema drift: trigger")),
        "{}",
        d.log_text()
    );
    // Once, not at every check.
    let once = d.log_text().matches("schema drift: trigger").count();
    assert!(!wait_until(Duration::from_secs(1), || {
        d.log_text().matches("schema drift: trigger").count() > once
    }));
}

fn c_skip_clock<D: TestDb>(db: &D) -> bool {
    db.clock_is_the_daemons()
}

macro_rules! conformance {
    ($($backend:ident => $db:expr;)*) => {
        $(
            mod $backend {
                use super::*;

                #[test]
                fn three_daemons_under_sigkill() {
                    super::three_daemons_under_sigkill($db);
                }

                #[test]
                fn stopped_daemon_is_evicted() {
                    super::stopped_daemon_is_evicted($db);
                }

                #[test]
                fn failing_handlers() {
                    super::failing_handlers($db);
                }

                #[test]
                fn database_outages() {
                    super::database_outages($db);
                }

                #[test]
                fn sigterm_during_stream() {
                    super::sigterm_during_stream($db);
                }

                #[test]
                fn status_reports_backlog_and_dead_letters() {
                    super::status_reports_backlog_and_dead_letters($db);
                }

                #[test]
                fn same_name_twice_is_refused() {
                    super::same_name_twice_is_refused($db);
                }

                #[test]
                fn cursor_deleted_under_a_running_daemon() {
                    let db = $db;
                    let delete = db.delete_cursors_sql();
                    super::cursor_deleted_under_a_running_daemon(db, &delete);
                }

                #[test]
                fn blocked_handler_is_not_evicted() {
                    super::blocked_handler_is_not_evicted($db);
                }

                #[test]
                fn drift_while_running_is_logged() {
                    super::drift_while_running_is_logged($db);
                }

                #[test]
                fn clock_skew_evicts_nobody() {
                    super::clock_skew_evicts_nobody($db);
                }
            }
        )*
    };
}

conformance! {
    sqlite => sqlite_db::SqliteDb::new();
    postgres => pg_db::PgDb::new();
    mysql => mysql_db::MySqlDb::new();
}
