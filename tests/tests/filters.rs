//! Row filters and the delivery barrier, end to end on every backend: three mail servers
//! mx1..mx3 each run the maildir plugin with `filter = "mailhost == daemon.name"`, while
//! writers create users, move them between hosts, rename them, change quotas and delete
//! them, and the daemons are killed. After `epidemic wait` returns, each host's tree is
//! exactly `SELECT … WHERE mailhost = host`, checked at once; with a host stopped, `wait`
//! times out and names it.
//!
//! A backfill through a filter reads only the host's rows: the part of the filter a SELECT
//! can say is pushed into the snapshot's SELECT, the rest still judged by the daemon.
//!
//! Sizes: `EPIDEMIC_FILTER_WRITERS` (default 4) writers of `EPIDEMIC_FILTER_OPS` (default
//! 150) statements each.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use epidemic_tests::db::{MySqlDb, PgDb, SqlDb, SqliteDb};
use epidemic_tests::maildirs::{self, Tree};
use epidemic_tests::rng::Rng;
use epidemic_tests::{epidemic, plugin_path, recorded, wait_until, Daemon};

const HOSTS: [&str; 3] = ["mx1", "mx2", "mx3"];
const WAIT: Duration = Duration::from_secs(60);

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Hosts<D: SqlDb> {
    db: Arc<D>,
    _tmp: tempfile::TempDir,
    dir: PathBuf,
}

impl<D: SqlDb + 'static> Hosts<D> {
    fn new(db: D) -> Self {
        let (text, int) = db.types();
        db.exec(&[format!(
            "CREATE TABLE mail_users (id {int} PRIMARY KEY, username {text} NOT NULL, \
             quota_bytes {int}, mailhost {text} NOT NULL)"
        )]);
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_owned();
        for h in HOSTS {
            std::fs::create_dir_all(dir.join(h)).unwrap();
            std::fs::write(
                dir.join(format!("{h}.toml")),
                format!(
                    "[database]\nurl = {:?}\n{}\n[daemon]\nname = {h:?}\n\n\
                     [[handler]]\nname = \"maildir\"\nplugin = {:?}\n\
                     filter = \"mailhost == daemon.name\"\nretry_initial_ms = 10\n\
                     [handler.config]\nbase_dir = {:?}\non_delete = \"archive\"\n",
                    db.url(),
                    db.options(),
                    plugin_path("maildir").display().to_string(),
                    dir.join(h).display().to_string(),
                ),
            )
            .unwrap();
        }
        Hosts {
            db: Arc::new(db),
            _tmp: tmp,
            dir,
        }
    }

    fn config(&self, host: &str) -> PathBuf {
        self.dir.join(format!("{host}.toml"))
    }

    fn start(&self, host: &str) -> Daemon {
        let log = self.dir.join(format!("{host}.log"));
        let before = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("epidemic started")
            .count();
        let d = Daemon::start(&self.config(host), &log, &[]);
        assert!(
            wait_until(WAIT, || d.log_text().matches("epidemic started").count()
                > before),
            "{host} did not start:\n{}",
            d.log_text()
        );
        d
    }

    /// What the table says `host`'s tree should be.
    fn expected(&self, host: &str) -> Tree {
        let rows: Vec<(String, Option<i64>)> = self
            .db
            .query(&format!(
                "SELECT username, quota_bytes FROM mail_users WHERE mailhost = '{host}'"
            ))
            .into_iter()
            .map(|r| {
                (
                    r[0].clone().expect("username"),
                    r[1].as_ref().map(|q| q.parse().expect("quota")),
                )
            })
            .collect();
        maildirs::expected(&rows, &self.dir.join(host))
    }

    fn wait(&self, extra: &[&str]) -> std::process::Output {
        let mut args = vec!["wait"];
        args.extend_from_slice(extra);
        epidemic(&self.config("mx1"), &args)
    }
}

/// One writer's random statements on users `first..first + span`.
fn write<D: SqlDb>(db: &D, seed: u64, first: i64, span: i64, ops: u64) {
    let mut rng = Rng::new(seed);
    let domains = ["example.org", "example.net"];
    let mut generation = 0;
    for _ in 0..ops {
        let id = first + rng.below(span as u64) as i64;
        let host = HOSTS[rng.below(3) as usize];
        generation += 1;
        let name = format!("u{id}g{generation}@{}", domains[rng.below(2) as usize]);
        let stmt = match rng.below(10) {
            0..=3 => format!(
                "INSERT INTO mail_users (id, username, quota_bytes, mailhost) \
                 VALUES ({id}, '{name}', {}, '{host}')",
                rng.below(1 << 20)
            ),
            // A move to another host (or the same one: nothing happens).
            4 | 5 => format!("UPDATE mail_users SET mailhost = '{host}' WHERE id = {id}"),
            6 => format!("UPDATE mail_users SET username = '{name}' WHERE id = {id}"),
            7 => format!(
                "UPDATE mail_users SET quota_bytes = {} WHERE id = {id}",
                rng.below(1 << 20)
            ),
            _ => format!("DELETE FROM mail_users WHERE id = {id}"),
        };
        // A duplicate key or a deadlock rolls back; the table stays the truth.
        let _ = db.try_exec(&[stmt]);
    }
}

fn hosts_converge_under_writers_and_kills<D: SqlDb + 'static>(db: D) {
    let h = Hosts::new(db);
    let mut daemons: Vec<Daemon> = HOSTS.iter().map(|host| h.start(host)).collect();
    let writers = env_or("EPIDEMIC_FILTER_WRITERS", 4);
    let ops = env_or("EPIDEMIC_FILTER_OPS", 150);
    let threads: Vec<_> = (0..writers)
        .map(|w| {
            let db = Arc::clone(&h.db);
            std::thread::spawn(move || write(&*db, 0xf117 + w, w as i64 * 1000, 40, ops))
        })
        .collect();
    // Kill a host and bring it back while the writers run.
    assert!(wait_until(WAIT, || h
        .db
        .query("SELECT count(*) FROM mail_users")
        .first()
        .and_then(|r| r[0].clone())
        .is_some_and(|n| n != "0")));
    daemons[1].kill();
    daemons[1] = h.start("mx2");
    for t in threads {
        t.join().expect("writer");
    }
    // The barrier: when it returns, every host has done everything, checked at once.
    let out = h.wait(&["--timeout", "60s"]);
    assert!(
        out.status.success(),
        "wait failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut total = 0;
    for host in HOSTS {
        let want = h.expected(host);
        let got = maildirs::on_disk(&h.dir.join(host));
        assert!(
            want == got,
            "{host}'s tree is not its rows right after `epidemic wait`:\n{}",
            maildirs::diff(&want, &got)
        );
        total += want.len();
    }
    assert!(
        total > 0,
        "the writers left no users; the test proves little"
    );
    for d in &mut daemons {
        assert!(d.alive(), "{}", d.log_text());
        assert!(!d.log_text().contains("giving up"), "{}", d.log_text());
    }

    // With mx3 stopped, a change for it keeps the barrier shut, and `wait` says who.
    daemons[2].kill();
    h.db.exec(&[
        "INSERT INTO mail_users (id, username, quota_bytes, mailhost) \
         VALUES (99999, 'late@example.org', 5, 'mx3')"
            .to_owned(),
    ]);
    let out = h.wait(&["--timeout", "2s"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "wait returned while mx3 was down");
    assert!(err.contains("mx3/maildir"), "{err}");
    assert!(
        !err.contains("mx1/maildir") && !err.contains("mx2/maildir"),
        "{err}"
    );
    // Only the others: they are done.
    let out = h.wait(&["--daemon", "mx1", "--daemon", "mx2", "--timeout", "30s"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A filter with a syntax error, one naming a column the table lacks, and one comparing
/// text with a number: each refused at start, in one line naming the handler and what.
fn bad_filters_are_refused_at_start<D: SqlDb + 'static>(db: D) {
    let h = Hosts::new(db);
    for (filter, needle) in [
        ("mailhost == ", "syntax error at column"),
        ("mailhst == daemon.name", "no column mailhst"),
        ("mailhost > 5", "mail_users"),
    ] {
        let config = h.config("mx1");
        let text = std::fs::read_to_string(&config).unwrap();
        let start = text.find("filter = ").unwrap();
        let end = start + text[start..].find('\n').unwrap();
        let changed = format!("{}filter = {filter:?}{}", &text[..start], &text[end..]);
        let bad = h.dir.join("bad.toml");
        std::fs::write(&bad, changed).unwrap();
        let out = epidemic(&bad, &["install"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{filter}: accepted");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(
            err.contains("handler \"maildir\"") && err.contains(needle),
            "{filter}: {err}"
        );
    }
}

/// Mail server mx1 joins (`start = "snapshot"`) a table where nine rows in ten belong to
/// other hosts, with `filter = "mailhost == daemon.name && quota_bytes > 5"` (the column
/// is spelled `MailHost` in the catalog of SQLite and MariaDB). Its backfill reads only
/// the rows the database itself calls `MailHost = 'mx1'` (`rows_done`; MariaDB's
/// case-insensitive, PAD SPACE collation also reads `MX1` and `mx1 `), and hands over
/// exactly the rows the whole filter passes: `quota_bytes > 5` and the exact host are
/// still judged by the daemon. A second handler with `snapshot_pushdown = false` reads
/// every row and receives the same rows.
fn a_backfill_reads_only_the_rows_its_filter_can_pass<D: SqlDb + 'static>(db: D) {
    let (text, int) = db.types();
    let mut statements = vec![format!(
        "CREATE TABLE pushdown_users (id {int} PRIMARY KEY, quota_bytes {int}, MailHost {text})"
    )];
    let mut rows = Vec::new();
    for id in 1..=600i64 {
        // mx1 owns every tenth row, mx2..mx10 the others.
        let host = format!("mx{}", id % 10 + 1);
        let quota = match id {
            _ if id % 70 == 0 => "NULL".to_owned(),
            _ if id % 30 == 0 => "3".to_owned(),
            _ => id.to_string(),
        };
        rows.push(format!("({id}, {quota}, '{host}')"));
    }
    // Rows only a loose comparison takes for mx1's, and one with no host.
    rows.extend(
        [
            "(601, 50, 'MX1')",
            "(602, 50, 'mx1 ')",
            "(603, 50, NULL)",
            "(604, 50, 'mx1')",
        ]
        .map(String::from),
    );
    statements.push(format!(
        "INSERT INTO pushdown_users (id, quota_bytes, MailHost) VALUES {}",
        rows.join(", ")
    ));
    db.exec(&statements);

    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let handler = |name: &str, pushdown: bool| {
        format!(
            "[[handler]]\nname = {name:?}\nplugin = {:?}\nstart = \"snapshot\"\n\
             filter = \"mailhost == daemon.name && quota_bytes > 5\"\nsnapshot_pushdown = {pushdown}\n\
             [handler.config]\nfile = {:?}\ntable = \"pushdown_users\"\ncolumns = [\"quota_bytes\"]\n\n",
            plugin_path("recorder").display().to_string(),
            dir.join(format!("{name}.jsonl")).display().to_string(),
        )
    };
    let config = dir.join("mx1.toml");
    std::fs::write(
        &config,
        format!(
            "[database]\nurl = {:?}\n{}\n[daemon]\nname = \"mx1\"\nbackfill_chunk = 7\n\n{}{}",
            db.url(),
            db.options(),
            handler("pushed", true),
            handler("unpushed", false),
        ),
    )
    .unwrap();
    let log = dir.join("mx1.log");
    let daemon = Daemon::start(&config, &log, &[]);
    // Both backfills done: (handler, rows_done) of each.
    let mut done = Vec::new();
    let finished = wait_until(WAIT, || {
        let out = epidemic(&config, &["status", "--json"]);
        let status: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        let backfills = status["backfills"].as_array().cloned().unwrap_or_default();
        done = backfills
            .iter()
            .filter(|b| b["state"] == "done")
            .map(|b| {
                (
                    b["handler"].as_str().unwrap_or_default().to_owned(),
                    b["rows_done"].as_u64().unwrap_or(0),
                )
            })
            .collect();
        done.sort();
        done.len() == 2
    });
    assert!(
        finished,
        "the backfills did not finish:\n{}",
        daemon.log_text()
    );

    let want: BTreeSet<i64> = (1..=600)
        .filter(|id| id % 10 == 0 && id % 70 != 0 && id % 30 != 0)
        .chain([604])
        .collect();
    for name in ["pushed", "unpushed"] {
        let lines = recorded(&dir.join(format!("{name}.jsonl")));
        let got: BTreeSet<i64> = lines
            .iter()
            .map(|l| l["key"]["id"].as_i64().expect("a key"))
            .collect();
        assert_eq!(got, want, "{name}: the rows the whole filter passes");
        assert_eq!(lines.len(), want.len(), "{name}: each once");
        assert!(lines.iter().all(|l| l["origin"] == "snapshot"), "{name}");
    }
    // What each backfill read: the rows the database calls mx1's, or all of them.
    let mx1: u64 = db.query("SELECT count(*) FROM pushdown_users WHERE MailHost = 'mx1'")[0][0]
        .as_deref()
        .expect("a count")
        .parse()
        .expect("a number");
    assert!((61..=63).contains(&mx1), "{mx1}");
    assert_eq!(
        done,
        [("pushed".to_owned(), mx1), ("unpushed".to_owned(), 604)],
        "rows read by each backfill"
    );
    assert!(
        !daemon.log_text().contains("ERROR"),
        "{}",
        daemon.log_text()
    );
}

macro_rules! scenarios {
    ($($backend:ident => $db:expr;)*) => {
        $(
            mod $backend {
                use super::*;

                #[test]
                fn hosts_converge_under_writers_and_kills() {
                    super::hosts_converge_under_writers_and_kills($db);
                }

                #[test]
                fn a_backfill_reads_only_the_rows_its_filter_can_pass() {
                    super::a_backfill_reads_only_the_rows_its_filter_can_pass($db);
                }

                #[test]
                fn bad_filters_are_refused_at_start() {
                    super::bad_filters_are_refused_at_start($db);
                }
            }
        )*
    };
}

scenarios! {
    sqlite => SqliteDb::new();
    postgres => PgDb::new();
    mysql => MySqlDb::new();
}
