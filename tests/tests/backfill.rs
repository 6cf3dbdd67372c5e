//! Backfill end to end on every backend: a new mail server joins a table that already
//! holds its users (`start = "snapshot"`), while writers insert, change quotas, rename and
//! delete, and the daemon is SIGKILLed twice during the backfill. At the end its Maildir
//! tree (with quotas) equals the table exactly, and a recorder on the same daemon shows,
//! for every key, that its last value is the table's row and that no snapshot row ever
//! came after a live change newer than it.
//!
//! Also: a consumer evicted while its daemon was down resyncs (`on_evicted = "resync"`)
//! and archives the orphan Maildirs.
//!
//! Sizes: `EPIDEMIC_BACKFILL_ROWS` (default 6000) existing rows, `EPIDEMIC_BACKFILL_WRITERS`
//! (default 4) writers, each pausing `EPIDEMIC_BACKFILL_PAUSE_MS` (default 30) between
//! statements, chunks of `EPIDEMIC_BACKFILL_CHUNK` (default 200) rows. (A chunk's rows go
//! to the handler when the consumer reaches the chunk's watermark: a consumer that cannot
//! keep up with the writers makes its backfill wait, as it makes everything else wait.)

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use epidemic_tests::db::{MySqlDb, PgDb, SqlDb, SqliteDb};
use epidemic_tests::maildirs;
use epidemic_tests::rng::Rng;
use epidemic_tests::{epidemic, plugin_path, recorded, wait_until, Daemon};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(120);

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Usernames carry the id, so renames never collide.
fn username(id: i64, generation: i64) -> String {
    format!("u{id}v{generation}@example.org")
}

struct Scenario<D: SqlDb> {
    db: Arc<D>,
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    rows: i64,
    /// Every write sets `version` from here: a total order of the writes.
    version: Arc<AtomicI64>,
}

impl<D: SqlDb + 'static> Scenario<D> {
    fn new(db: D) -> Self {
        let (text, int) = db.types();
        let rows = env_or("EPIDEMIC_BACKFILL_ROWS", 6000) as i64;
        db.exec(&[format!(
            "CREATE TABLE mail_users (id {int} PRIMARY KEY, username {text} NOT NULL, \
             quota_bytes {int}, version {int} NOT NULL)"
        )]);
        // The users that exist before the new server joins: nothing captured them.
        let mut statements = Vec::new();
        for first in (1..=rows).step_by(500) {
            let values: Vec<String> = (first..(first + 500).min(rows + 1))
                .map(|id| format!("({id}, '{}', {}, 0)", username(id, 0), id * 10))
                .collect();
            statements.push(format!(
                "INSERT INTO mail_users (id, username, quota_bytes, version) VALUES {}",
                values.join(", ")
            ));
        }
        db.exec(&statements);
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_owned();
        std::fs::create_dir_all(dir.join("vhosts")).unwrap();
        std::fs::write(
            dir.join("mx9.toml"),
            format!(
                "[database]\nurl = {:?}\n{}\n[daemon]\nname = \"mx9\"\nbackfill_chunk = {}\n\n\
                 [[handler]]\nname = \"maildir\"\nplugin = {:?}\nstart = \"snapshot\"\n\
                 [handler.config]\nbase_dir = {:?}\n\n\
                 [[handler]]\nname = \"rec\"\nplugin = {:?}\nstart = \"snapshot\"\n\
                 [handler.config]\nfile = {:?}\ntable = \"mail_users\"\n\
                 columns = [\"username\", \"quota_bytes\", \"version\"]\n",
                db.url(),
                db.options(),
                env_or("EPIDEMIC_BACKFILL_CHUNK", 200),
                plugin_path("maildir").display().to_string(),
                dir.join("vhosts").display().to_string(),
                plugin_path("recorder").display().to_string(),
                dir.join("rec.jsonl").display().to_string(),
            ),
        )
        .unwrap();
        Scenario {
            db: Arc::new(db),
            _tmp: tmp,
            dir,
            rows,
            version: Arc::new(AtomicI64::new(1)),
        }
    }

    fn config(&self) -> PathBuf {
        self.dir.join("mx9.toml")
    }

    fn start(&self) -> Daemon {
        let log = self.dir.join("mx9.log");
        let before = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("epidemic started")
            .count();
        let d = Daemon::start(&self.config(), &log, &[]);
        assert!(
            wait_until(WAIT, || d.log_text().matches("epidemic started").count()
                > before),
            "did not start:\n{}",
            d.log_text()
        );
        d
    }

    /// Rows done by each handler's backfill, from `epidemic status --json`; `None` when
    /// both are done.
    fn progress(&self) -> Option<u64> {
        let out = epidemic(&self.config(), &["status", "--json"]);
        let status: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        let backfills = status["backfills"].as_array().cloned().unwrap_or_default();
        if backfills.len() == 2 && backfills.iter().all(|b| b["state"] == "done") {
            return None;
        }
        Some(
            backfills
                .iter()
                .map(|b| b["rows_done"].as_u64().unwrap_or(0))
                .min()
                .unwrap_or(0),
        )
    }

    /// One writer: random writes to ids in `1..=rows + 500` until `stop`.
    fn writer(&self, seed: u64, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
        let db = Arc::clone(&self.db);
        let version = Arc::clone(&self.version);
        let span = self.rows + 500;
        let pause = Duration::from_millis(env_or("EPIDEMIC_BACKFILL_PAUSE_MS", 30));
        std::thread::spawn(move || {
            let mut rng = Rng::new(seed);
            while !stop.load(Ordering::Relaxed) {
                let id = 1 + rng.below(span as u64) as i64;
                let v = version.fetch_add(1, Ordering::Relaxed);
                let stmt = match rng.below(10) {
                    0 | 1 => format!(
                        "INSERT INTO mail_users (id, username, quota_bytes, version) \
                         VALUES ({id}, '{}', {}, {v})",
                        username(id, v),
                        rng.below(1 << 20)
                    ),
                    2..=4 => format!(
                        "UPDATE mail_users SET quota_bytes = {}, version = {v} WHERE id = {id}",
                        rng.below(1 << 20)
                    ),
                    5 | 6 => format!(
                        "UPDATE mail_users SET username = '{}', version = {v} WHERE id = {id}",
                        username(id, v)
                    ),
                    7 => format!(
                        "UPDATE mail_users SET quota_bytes = NULL, version = {v} WHERE id = {id}"
                    ),
                    _ => format!("DELETE FROM mail_users WHERE id = {id}"),
                };
                // A duplicate key or a deadlock rolls back: the table stays the truth.
                let _ = db.try_exec(&[stmt]);
                std::thread::sleep(pause);
            }
        })
    }

    fn table(&self) -> HashMap<i64, (String, Option<i64>, i64)> {
        self.db
            .query("SELECT id, username, quota_bytes, version FROM mail_users")
            .into_iter()
            .map(|r| {
                let int = |v: &Option<String>| v.as_ref().map(|s| s.parse::<i64>().unwrap());
                (
                    int(&r[0]).unwrap(),
                    (r[1].clone().unwrap(), int(&r[2]), int(&r[3]).unwrap()),
                )
            })
            .collect()
    }
}

/// The recorder's stream, checked per key: no snapshot row older than a live change
/// already received; and the last value of every key is the table's.
fn check_recorder(lines: &[Value], table: &HashMap<i64, (String, Option<i64>, i64)>) {
    // Per key: the newest version a live change showed, and whether it was a delete.
    let mut newest_live: HashMap<i64, (i64, bool)> = HashMap::new();
    let mut last: HashMap<i64, Option<(String, Option<i64>, i64)>> = HashMap::new();
    let mut snapshot_rows = 0;
    for l in lines {
        let id = l["key"]["id"].as_i64().expect("every change has its key");
        let image = |side: &str| {
            let row = &l[side];
            (
                row["username"].as_str().unwrap_or_default().to_owned(),
                row["quota_bytes"].as_i64(),
                row["version"].as_i64().unwrap_or(0),
            )
        };
        match (l["origin"].as_str(), l["op"].as_str()) {
            (Some("snapshot"), _) => {
                snapshot_rows += 1;
                let row = image("new");
                if let Some((v, deleted)) = newest_live.get(&id) {
                    assert!(
                        row.2 > *v || (row.2 == *v && !deleted),
                        "key {id}: a snapshot row of version {} came after a live change of \
                         version {v} (a delete: {deleted}): {l}",
                        row.2
                    );
                }
                last.insert(id, Some(row));
            }
            (_, Some("DELETE")) => {
                let old = image("old");
                let seen = newest_live.entry(id).or_insert((old.2, true));
                if old.2 >= seen.0 {
                    *seen = (old.2, true);
                }
                last.insert(id, None);
            }
            _ => {
                let new = image("new");
                let seen = newest_live.entry(id).or_insert((new.2, false));
                if new.2 >= seen.0 {
                    *seen = (new.2, false);
                }
                last.insert(id, Some(new));
            }
        }
    }
    assert!(snapshot_rows > 0, "no snapshot rows at all");
    for (id, row) in table {
        assert_eq!(
            last.get(id).cloned().flatten().as_ref(),
            Some(row),
            "key {id}: the recorder's last value is not the table's"
        );
    }
    for (id, row) in &last {
        if row.is_some() {
            assert!(
                table.contains_key(id),
                "key {id}: deleted, but the recorder holds it"
            );
        }
    }
}

fn a_new_server_converges_to_the_table<D: SqlDb + 'static>(db: D) {
    let s = Scenario::new(db);
    let mut daemon = s.start();
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..env_or("EPIDEMIC_BACKFILL_WRITERS", 4))
        .map(|w| s.writer(0xbac0 + w, Arc::clone(&stop)))
        .collect();
    // Two SIGKILLs, each once the backfill has moved on since the last.
    let mut seen = 0;
    for kill in 0..2 {
        let moved = wait_until(WAIT, || match s.progress() {
            Some(done) => done > seen,
            None => true,
        });
        assert!(
            moved,
            "the backfill did not progress:\n{}",
            daemon.log_text()
        );
        match s.progress() {
            Some(done) => {
                seen = done;
                daemon.kill();
                daemon = s.start();
            }
            None => panic!(
                "the backfill finished before kill {} (use more rows or smaller chunks)",
                kill + 1
            ),
        }
    }
    assert!(
        wait_until(WAIT * 3, || s.progress().is_none()),
        "the backfill did not finish:\n{}",
        daemon.log_text()
    );
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().expect("writer");
    }
    // Every write is committed: the daemon catches up with the last ones.
    let table = s.table();
    let rows: Vec<(String, Option<i64>)> = table.values().map(|r| (r.0.clone(), r.1)).collect();
    let want = maildirs::expected(&rows, &s.dir.join("vhosts"));
    let converged = wait_until(WAIT, || maildirs::on_disk(&s.dir.join("vhosts")) == want);
    assert!(
        converged,
        "the Maildir tree is not the table:\n{}",
        maildirs::diff(&want, &maildirs::on_disk(&s.dir.join("vhosts")))
    );
    assert!(wait_until(WAIT, || {
        let lines = recorded(&s.dir.join("rec.jsonl"));
        let mut last: HashMap<i64, bool> = HashMap::new();
        for l in &lines {
            last.insert(l["key"]["id"].as_i64().unwrap_or(0), l["op"] != "DELETE");
        }
        table.keys().all(|k| last.get(k) == Some(&true))
    }));
    check_recorder(&recorded(&s.dir.join("rec.jsonl")), &table);
    assert!(daemon.alive(), "{}", daemon.log_text());
    assert!(
        !daemon.log_text().contains("giving up"),
        "{}",
        daemon.log_text()
    );
}

/// A consumer evicted while its daemon was down (`consumer_ttl`) and configured with
/// `on_evicted = "resync"` backfills when it comes back: its Maildir tree equals the table
/// again, and the Maildirs of users deleted or renamed while it was away (orphans, since
/// the changes that removed them were never delivered to it) are archived. With
/// `on_evicted = "continue"` it would go on from now and keep them: the test fails.
fn an_evicted_consumer_resyncs_and_archives_orphans<D: SqlDb>(db: D) {
    let (text, int) = db.types();
    db.exec(&[format!(
        "CREATE TABLE mail_users (id {int} PRIMARY KEY, username {text} NOT NULL, \
         quota_bytes {int}, version {int} NOT NULL)"
    )]);
    let values: Vec<String> = (1..=200)
        .map(|id| format!("({id}, '{}', {}, 0)", username(id, 0), id * 10))
        .collect();
    db.exec(&[format!(
        "INSERT INTO mail_users (id, username, quota_bytes, version) VALUES {}",
        values.join(", ")
    )]);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let vhosts = dir.join("vhosts");
    std::fs::create_dir_all(&vhosts).unwrap();
    let common = format!("[database]\nurl = {:?}\n{}\n", db.url(), db.options());
    // mx1: the mail server that goes away; mx2 stays, reads and prunes, and evicts it.
    let mx1 = dir.join("mx1.toml");
    std::fs::write(
        &mx1,
        format!(
            "{common}[daemon]\nname = \"mx1\"\nconsumer_ttl = \"2s\"\nbackfill_chunk = 50\n\n\
             [[handler]]\nname = \"maildir\"\nplugin = {:?}\nstart = \"snapshot\"\n\
             on_evicted = \"resync\"\n\
             [handler.config]\nbase_dir = {:?}\norphans = \"archive\"\n",
            plugin_path("maildir").display().to_string(),
            vhosts.display().to_string(),
        ),
    )
    .unwrap();
    let mx2 = dir.join("mx2.toml");
    std::fs::write(
        &mx2,
        format!(
            "{common}[daemon]\nname = \"mx2\"\nconsumer_ttl = \"2s\"\nprune_interval_ms = 200\n\n\
             [[handler]]\nname = \"rec\"\nplugin = {:?}\n\
             [handler.config]\nfile = {:?}\ntable = \"mail_users\"\ncolumns = [\"username\"]\n",
            plugin_path("recorder").display().to_string(),
            dir.join("rec.jsonl").display().to_string(),
        ),
    )
    .unwrap();
    let tree_is_table = |db: &D| {
        let rows: Vec<(String, Option<i64>)> = db
            .query("SELECT username, quota_bytes FROM mail_users")
            .into_iter()
            .map(|r| {
                (
                    r[0].clone().unwrap(),
                    r[1].as_ref().map(|q| q.parse().unwrap()),
                )
            })
            .collect();
        let want = maildirs::expected(&rows, &vhosts);
        let got = maildirs::on_disk(&vhosts);
        (want == got, maildirs::diff(&want, &got))
    };
    let status = |config: &PathBuf| -> Value {
        let out = epidemic(config, &["status", "--json"]);
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    };
    let backfill_done = |config: &PathBuf, requested_by: Option<&str>| {
        let s = status(config);
        s["backfills"].as_array().is_some_and(|b| {
            b.iter().any(|b| {
                b["daemon"] == "mx1"
                    && b["state"] == "done"
                    && requested_by.is_none_or(|r| b["requested_by"].as_str() == Some(r))
            })
        })
    };

    let mut d1 = Daemon::start(&mx1, &dir.join("mx1.log"), &[]);
    assert!(
        wait_until(WAIT, || backfill_done(&mx1, None) && tree_is_table(&db).0),
        "mx1's first backfill did not converge:\n{}\n{}",
        tree_is_table(&db).1,
        d1.log_text()
    );
    let before: Vec<String> = db
        .query("SELECT username FROM mail_users")
        .into_iter()
        .map(|r| r[0].clone().unwrap())
        .collect();
    d1.kill();

    // While mx1 is down: mx2 runs and evicts it; users are deleted, renamed, added and
    // their quotas changed.
    let mut d2 = Daemon::start(&mx2, &dir.join("mx2.log"), &[]);
    let mut writes = Vec::new();
    for id in 1..=20 {
        writes.push(format!("DELETE FROM mail_users WHERE id = {id}"));
    }
    for id in 21..=40 {
        writes.push(format!(
            "UPDATE mail_users SET username = '{}', version = 1 WHERE id = {id}",
            username(id, 1)
        ));
    }
    for id in 41..=60 {
        writes.push(format!(
            "UPDATE mail_users SET quota_bytes = {}, version = 1 WHERE id = {id}",
            id * 1000
        ));
    }
    for id in 201..=220 {
        writes.push(format!(
            "INSERT INTO mail_users (id, username, quota_bytes, version) VALUES ({id}, '{}', NULL, 1)",
            username(id, 0)
        ));
    }
    db.exec(&writes);
    let evicted = |s: &Value| {
        s["consumers"].as_array().is_some_and(|cs| {
            cs.iter()
                .any(|c| c["daemon"] == "mx1" && c["evicted"] == true)
        })
    };
    assert!(
        wait_until(WAIT, || evicted(&status(&mx2))),
        "mx1 was not evicted:\n{}\n{}",
        status(&mx2),
        d2.log_text()
    );
    let after: Vec<String> = db
        .query("SELECT username FROM mail_users")
        .into_iter()
        .map(|r| r[0].clone().unwrap())
        .collect();
    assert!(!tree_is_table(&db).0, "the writes changed nothing");

    // mx1 comes back: evicted, it resyncs.
    let mut d1 = Daemon::start(&mx1, &dir.join("mx1.log"), &[]);
    assert!(
        wait_until(WAIT, || backfill_done(
            &mx1,
            Some("on_evicted = \"resync\"")
        ) && tree_is_table(&db).0),
        "mx1 did not converge after its eviction:\n{}\n{}\n{}",
        tree_is_table(&db).1,
        status(&mx1),
        d1.log_text()
    );
    // The Maildirs no row backs any more were archived, as `<local>-orphan-<secs>`.
    let mut archived: Vec<String> = Vec::new();
    for domain in std::fs::read_dir(vhosts.join(".archive"))
        .into_iter()
        .flatten()
        .flatten()
    {
        for e in std::fs::read_dir(domain.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            let local = name.split("-orphan-").next().unwrap_or_default().to_owned();
            archived.push(format!("{local}@{}", domain.file_name().to_string_lossy()));
        }
    }
    archived.sort();
    let mut gone: Vec<String> = before.into_iter().filter(|u| !after.contains(u)).collect();
    gone.sort();
    assert_eq!(gone.len(), 40);
    assert_eq!(archived, gone, "{}", d1.log_text());
    assert!(d1.alive() && d2.alive());
}

macro_rules! scenarios {
    ($($backend:ident => $db:expr;)*) => {
        $(
            mod $backend {
                use super::*;

                #[test]
                fn a_new_server_converges_to_the_table() {
                    super::a_new_server_converges_to_the_table($db);
                }

                #[test]
                fn an_evicted_consumer_resyncs_and_archives_orphans() {
                    super::an_evicted_consumer_resyncs_and_archives_orphans($db);
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
