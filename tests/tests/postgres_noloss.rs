//! PostgreSQL: ordinary SQL and ordinary operations that must neither lose nor invent a
//! change (issue 10): `TRUNCATE` (with `CASCADE`), a dump restored into a new cluster,
//! serializable or read-only database defaults, rows moving between partitions, values
//! that are equal but look different, `session_replication_role = replica`, two-phase
//! commit, and pruning racing a registration. Each runs through the real daemon and
//! plugin libraries except the last, which drives the backend library as the host does.
//!
//! Build first: `cargo build -p epidemic-backend-postgres -p epidemic-recorder -p epidemic`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use epidemic_plugin_host::{self as host, HostBackend, Library};
use epidemic_plugin_sdk::backend::{Consumer, Registered, StartFrom, Watch};
use epidemic_tests::pg::{PgServer, PG_BIN};
use epidemic_tests::{backend_path, recorded, recorder_handler, wait_recorded, wait_until, Daemon};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(60);

/// A test's working directory with one daemon's config.
struct Setup {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let tmp = tempfile::tempdir().expect("tempdir");
        Setup {
            dir: tmp.path().to_owned(),
            _tmp: tmp,
        }
    }

    fn out(&self, handler: &str) -> PathBuf {
        self.dir.join(format!("{handler}.jsonl"))
    }

    /// Write the config for daemon `mx1` on `url`; `handlers`: (name, table, columns).
    fn config(&self, url: &str, handlers: &[(&str, &str, &[&str])]) -> PathBuf {
        self.config_with_key(url, handlers, None)
    }

    /// [`Setup::config`] with `[table.NAME] key = ["id"]` for `keyed`: a table without a
    /// primary key (a partitioned one without the partition column in a key).
    fn config_with_key(
        &self,
        url: &str,
        handlers: &[(&str, &str, &[&str])],
        keyed: Option<&str>,
    ) -> PathBuf {
        let mut text = format!(
            "[database]\nurl = {url:?}\n\n[daemon]\nname = \"mx1\"\nprune_interval_ms = 100\n\n"
        );
        if let Some(table) = keyed {
            text.push_str(&format!("[table.{table}]\nkey = [\"id\"]\n\n"));
        }
        for (name, table, columns) in handlers {
            text.push_str(&recorder_handler(name, &self.out(name), table, columns, ""));
        }
        let path = self.dir.join("mx1.toml");
        std::fs::write(&path, text).expect("write config");
        path
    }

    /// Start the daemon and wait until every consumer has its cursor.
    fn start(&self) -> Daemon {
        let log = self.dir.join("mx1.log");
        let before = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("epidemic started")
            .count();
        let d = Daemon::start(&self.dir.join("mx1.toml"), &log, &[]);
        assert!(
            wait_until(WAIT, || d.log_text().matches("epidemic started").count()
                > before),
            "the daemon did not start:\n{}",
            d.log_text()
        );
        d
    }
}

/// A fresh database on the shared server with `schema` applied; returns its URL.
fn database(name: &str, schema: &str) -> String {
    let server = PgServer::shared();
    let url = server.create_database(name);
    server
        .client(name)
        .batch_execute(schema)
        .expect("apply schema");
    url
}

/// (op, old, new) of each recorded change, in delivery order.
fn ops(lines: &[Value]) -> Vec<(String, Value, Value)> {
    lines
        .iter()
        .map(|l| {
            (
                l["op"].as_str().unwrap_or("").to_owned(),
                l["old"].clone(),
                l["new"].clone(),
            )
        })
        .collect()
}

fn wait_for(path: &Path, n: usize, d: &Daemon) -> Vec<Value> {
    let lines = wait_recorded(path, n, WAIT);
    assert!(
        lines.len() >= n,
        "expected {n} changes in {}, got {}: {lines:#?}\ndaemon log:\n{}",
        path.display(),
        lines.len(),
        d.log_text()
    );
    lines
}

// ---------------------------------------------------------------------------------------
// Item 2: TRUNCATE
// ---------------------------------------------------------------------------------------

#[test]
fn truncate_is_delivered_as_a_delete_of_every_row_including_cascades() {
    let url = database(
        "noloss_truncate",
        "CREATE TABLE domains (id int PRIMARY KEY, name text NOT NULL);
         CREATE TABLE users (id int PRIMARY KEY, domain_id int REFERENCES domains, username text NOT NULL);
         INSERT INTO domains VALUES (1, 'a.example'), (2, 'b.example');
         INSERT INTO users VALUES (10, 1, 'alice'), (11, 2, 'bob'), (12, 2, 'carol');",
    );
    let s = Setup::new();
    s.config(
        &url,
        &[
            ("dom", "domains", &["id", "name"]),
            ("usr", "users", &["id", "username"]),
        ],
    );
    let d = s.start();
    let mut c = PgServer::shared().client("noloss_truncate");
    c.batch_execute("TRUNCATE users").expect("truncate users");
    let lines = wait_for(&s.out("usr"), 3, &d);
    let mut deleted: Vec<String> = ops(&lines)
        .iter()
        .map(|(op, old, new)| {
            assert_eq!(op, "DELETE", "{lines:?}");
            assert!(new.is_null());
            old["username"].as_str().unwrap_or("").to_owned()
        })
        .collect();
    deleted.sort();
    assert_eq!(deleted, ["alice", "bob", "carol"]);

    // TRUNCATE ... CASCADE empties the referencing table too: its rows are deleted as well.
    c.batch_execute(
        "INSERT INTO users VALUES (20, 1, 'dave');
         TRUNCATE domains CASCADE;",
    )
    .expect("truncate cascade");
    let doms = wait_for(&s.out("dom"), 2, &d);
    let mut names: Vec<(String, String)> = ops(&doms)
        .iter()
        .map(|(op, old, _)| (op.clone(), old["name"].as_str().unwrap_or("").to_owned()))
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            ("DELETE".to_owned(), "a.example".to_owned()),
            ("DELETE".to_owned(), "b.example".to_owned())
        ]
    );
    let users = wait_for(&s.out("usr"), 5, &d);
    let tail: Vec<(String, Value)> = ops(&users[3..])
        .into_iter()
        .map(|(op, old, new)| (op, if old.is_null() { new } else { old }))
        .collect();
    assert_eq!(
        tail,
        [
            ("INSERT".to_owned(), json!({"id": 20, "username": "dave"})),
            ("DELETE".to_owned(), json!({"id": 20, "username": "dave"})),
        ]
    );
    // A rolled-back TRUNCATE delivers nothing.
    c.batch_execute(
        "BEGIN; TRUNCATE domains CASCADE; ROLLBACK; INSERT INTO domains VALUES (3, 'c.example');",
    )
    .expect("rolled back truncate");
    let doms = wait_for(&s.out("dom"), 3, &d);
    assert_eq!(doms.len(), 3, "{doms:?}");
    assert_eq!(doms[2]["op"], "INSERT");
}

#[test]
fn truncating_a_partitioned_table_or_one_partition_is_delivered_as_deletes() {
    let url = database(
        "noloss_truncate_parts",
        "CREATE TABLE mail_users (id int NOT NULL, server text NOT NULL, username text NOT NULL) PARTITION BY LIST (server);
         CREATE TABLE mail_users_mx1 PARTITION OF mail_users FOR VALUES IN ('mx1');
         CREATE TABLE mail_users_mx2 PARTITION OF mail_users FOR VALUES IN ('mx2');
         INSERT INTO mail_users VALUES (1, 'mx1', 'alice'), (2, 'mx2', 'bob');",
    );
    let s = Setup::new();
    s.config_with_key(
        &url,
        &[("rec", "mail_users", &["id", "username"])],
        Some("mail_users"),
    );
    let d = s.start();
    let mut c = PgServer::shared().client("noloss_truncate_parts");
    c.batch_execute("TRUNCATE mail_users_mx1")
        .expect("truncate a partition");
    // A partition created after install gets the row triggers (cloned) but no TRUNCATE
    // trigger until the next install: status says so, and a TRUNCATE of the parent
    // still captures its rows, once.
    c.batch_execute(
        "CREATE TABLE mail_users_mx3 PARTITION OF mail_users FOR VALUES IN ('mx3');
         INSERT INTO mail_users VALUES (3, 'mx3', 'carol');",
    )
    .expect("new partition");
    let lines = wait_for(&s.out("rec"), 2, &d);
    let status = epidemic_tests::epidemic(&s.dir.join("mx1.toml"), &["status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains(
            "partition public.mail_users_mx3 of mail_users has no working TRUNCATE trigger"
        ),
        "{text}"
    );
    c.batch_execute("TRUNCATE mail_users")
        .expect("truncate the parent");
    let lines = {
        let _ = lines;
        wait_for(&s.out("rec"), 4, &d)
    };
    let got: Vec<(String, Value)> = ops(&lines)
        .into_iter()
        .map(|(op, old, new)| (op, if old.is_null() { new } else { old }))
        .collect();
    assert_eq!(
        got[..2].to_vec(),
        [
            ("DELETE".to_owned(), json!({"id": 1, "username": "alice"})),
            ("INSERT".to_owned(), json!({"id": 3, "username": "carol"})),
        ]
    );
    let mut rest = got[2..].to_vec();
    rest.sort_by_key(|(_, row)| row["id"].as_i64());
    assert_eq!(
        rest,
        [
            ("DELETE".to_owned(), json!({"id": 2, "username": "bob"})),
            ("DELETE".to_owned(), json!({"id": 3, "username": "carol"})),
        ]
    );
    assert!(
        !wait_until(Duration::from_millis(500), || recorded(&s.out("rec")).len()
            > 4),
        "each truncated row once: {:#?}",
        recorded(&s.out("rec"))
    );
}

// ---------------------------------------------------------------------------------------
// Item 6: pg_dump / restore into a new cluster
// ---------------------------------------------------------------------------------------

/// `pg_dump` of `db` on `from` piped into `psql` on `to` (where `db` exists, empty).
fn dump_and_restore(from: &PgServer, to: &PgServer, db: &str) {
    let mut dump = Command::new(Path::new(PG_BIN).join("pg_dump"))
        .args(["-h", "127.0.0.1", "-U", "postgres", "-p"])
        .arg(from.port().to_string())
        .arg(db)
        .stdout(Stdio::piped())
        .spawn()
        .expect("run pg_dump");
    let out = Command::new(Path::new(PG_BIN).join("psql"))
        .args([
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-p",
        ])
        .arg(to.port().to_string())
        .arg(db)
        .stdin(dump.stdout.take().expect("pg_dump stdout"))
        .output()
        .expect("run psql");
    assert!(
        dump.wait().expect("wait for pg_dump").success(),
        "pg_dump failed"
    );
    assert!(
        out.status.success(),
        "restore failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn after_a_dump_restored_into_a_new_cluster_pending_and_new_changes_are_delivered() {
    let old = PgServer::start_private();
    let new = PgServer::start_private();
    let url_old = old.create_database("migrate");
    let url_new = new.create_database("migrate");
    let mut c_old = old.client("migrate");
    // The old cluster has lived longer than the new one: its transaction ids are ahead.
    c_old
        .batch_execute("CREATE TABLE mail_users (id int PRIMARY KEY, username text NOT NULL)")
        .expect("schema");
    c_old
        .batch_execute(
            "DO $$ BEGIN FOR i IN 1..3000 LOOP PERFORM pg_current_xact_id(); COMMIT; END LOOP; END $$",
        )
        .expect("use up transaction ids");
    let s = Setup::new();
    s.config(&url_old, &[("rec", "mail_users", &["id", "username"])]);
    let mut d = s.start();
    c_old
        .batch_execute("INSERT INTO mail_users VALUES (1, 'handled')")
        .expect("INSERT");
    wait_for(&s.out("rec"), 1, &d);
    d.signal_and_wait(libc::SIGTERM, WAIT)
        .expect("daemon exits");
    // Pending when the dump is taken.
    c_old
        .batch_execute("INSERT INTO mail_users VALUES (2, 'pending'), (3, 'pending')")
        .expect("INSERT");
    dump_and_restore(&old, &new, "migrate");
    drop(c_old);
    drop(old);
    // Written in the new cluster before any daemon runs there.
    new.client("migrate")
        .batch_execute("INSERT INTO mail_users VALUES (4, 'new')")
        .expect("INSERT");

    // Nothing is pruned, or read, by the old cluster's cursors.
    let mut b = open(&url_new);
    let e = b
        .prune()
        .expect_err("no prune by another cluster's cursors");
    assert!(e.to_string().contains("another PostgreSQL cluster"), "{e}");
    let e = b
        .fetch(&consumer("rec"), 10)
        .expect_err("no read by another cluster's cursors");
    assert!(e.to_string().contains("another PostgreSQL cluster"), "{e}");
    drop(b);

    s.config(&url_new, &[("rec", "mail_users", &["id", "username"])]);
    let d = s.start();
    new.client("migrate")
        .batch_execute("INSERT INTO mail_users VALUES (5, 'new')")
        .expect("INSERT");
    let mut ids = Vec::new();
    let ok = wait_until(WAIT, || {
        ids = recorded(&s.out("rec"))
            .iter()
            .filter_map(|l| l["new"]["id"].as_i64())
            .collect();
        [2, 3, 4, 5].iter().all(|i| ids.contains(i))
    });
    assert!(
        ok,
        "delivered ids {ids:?}, want 2, 3, 4 and 5 after the first\ndaemon log:\n{}",
        d.log_text()
    );
    assert!(
        d.log_text().contains("another PostgreSQL cluster"),
        "the daemon says loudly that it restarted the consumers:\n{}",
        d.log_text()
    );
}

// ---------------------------------------------------------------------------------------
// Item 9: database defaults that would change how Epidemic reads
// ---------------------------------------------------------------------------------------

#[test]
fn serializable_and_read_only_database_defaults_do_not_stop_capture_or_reading() {
    let url = database(
        "noloss_isolation",
        "CREATE TABLE mail_users (id int PRIMARY KEY, username text NOT NULL);
         ALTER DATABASE noloss_isolation SET default_transaction_isolation = 'serializable';
         ALTER DATABASE noloss_isolation SET default_transaction_read_only = on;",
    );
    let s = Setup::new();
    s.config(&url, &[("rec", "mail_users", &["id", "username"])]);
    let d = s.start();
    let mut c = PgServer::shared().client("noloss_isolation");
    for i in 0..20 {
        c.batch_execute(&format!(
            "BEGIN READ WRITE; INSERT INTO mail_users VALUES ({i}, 'u{i}'); COMMIT;"
        ))
        .expect("INSERT");
    }
    let lines = wait_for(&s.out("rec"), 20, &d);
    assert_eq!(lines.len(), 20);
}

// ---------------------------------------------------------------------------------------
// Item 12: a row moving to another partition
// ---------------------------------------------------------------------------------------

#[test]
fn a_row_moved_to_another_partition_arrives_as_one_update() {
    let url = database(
        "noloss_partitions",
        "CREATE TABLE mail_users (id int NOT NULL, server text NOT NULL, username text NOT NULL) PARTITION BY LIST (server);
         CREATE TABLE mail_users_mx1 PARTITION OF mail_users FOR VALUES IN ('mx1');
         CREATE TABLE mail_users_mx2 PARTITION OF mail_users FOR VALUES IN ('mx2');
         INSERT INTO mail_users VALUES (1, 'mx1', 'alice'), (2, 'mx1', 'bob'), (3, 'mx1', 'carol'), (4, 'mx2', 'dave');",
    );
    let s = Setup::new();
    s.config_with_key(
        &url,
        &[("rec", "mail_users", &["id", "server", "username"])],
        Some("mail_users"),
    );
    let d = s.start();
    let mut c = PgServer::shared().client("noloss_partitions");
    // Two rows move, one stays, in one statement; then a delete and an insert that only
    // look like a move, in one transaction; then a move of one row.
    c.batch_execute(
        "UPDATE mail_users SET server = CASE WHEN id = 3 THEN 'mx1' ELSE 'mx2' END, username = upper(username) WHERE id <= 3;
         BEGIN;
         DELETE FROM mail_users WHERE id = 4;
         INSERT INTO mail_users VALUES (5, 'mx1', 'erin');
         COMMIT;
         WITH gone AS (DELETE FROM mail_users WHERE id = 5 RETURNING *)
             INSERT INTO mail_users SELECT 6, 'mx2', username FROM gone;
         UPDATE mail_users SET server = 'mx1' WHERE id = 1;",
    )
    .expect("writes");
    let lines = wait_for(&s.out("rec"), 8, &d);
    let got: Vec<(String, Value, Value)> = ops(&lines);
    let row =
        |id: i64, server: &str, name: &str| json!({"id": id, "server": server, "username": name});
    let want = [
        (
            "UPDATE".to_owned(),
            row(1, "mx1", "alice"),
            row(1, "mx2", "ALICE"),
        ),
        (
            "UPDATE".to_owned(),
            row(2, "mx1", "bob"),
            row(2, "mx2", "BOB"),
        ),
        (
            "UPDATE".to_owned(),
            row(3, "mx1", "carol"),
            row(3, "mx1", "CAROL"),
        ),
        ("DELETE".to_owned(), row(4, "mx2", "dave"), Value::Null),
        ("INSERT".to_owned(), Value::Null, row(5, "mx1", "erin")),
        ("DELETE".to_owned(), row(5, "mx1", "erin"), Value::Null),
        ("INSERT".to_owned(), Value::Null, row(6, "mx2", "erin")),
        (
            "UPDATE".to_owned(),
            row(1, "mx2", "ALICE"),
            row(1, "mx1", "ALICE"),
        ),
    ];
    // The first UPDATE's rows may come in any order; everything else in commit order.
    let mut first: Vec<_> = got[..3].to_vec();
    first.sort_by_key(|(_, old, _)| old["id"].as_i64());
    assert_eq!(first, want[..3].to_vec(), "{got:#?}");
    assert_eq!(got[3..].to_vec(), want[3..].to_vec(), "{got:#?}");
}

#[test]
fn a_move_that_changes_no_watched_column_is_no_change() {
    let url = database(
        "noloss_partition_quiet",
        "CREATE TABLE boxes (id int NOT NULL, server text NOT NULL, username text NOT NULL) PARTITION BY LIST (server);
         CREATE TABLE boxes_mx1 PARTITION OF boxes FOR VALUES IN ('mx1');
         CREATE TABLE boxes_mx2 PARTITION OF boxes FOR VALUES IN ('mx2');
         INSERT INTO boxes VALUES (1, 'mx1', 'alice'), (2, 'mx1', 'bob');",
    );
    let s = Setup::new();
    s.config_with_key(
        &url,
        &[("rec", "boxes", &["id", "username"])],
        Some("boxes"),
    );
    let d = s.start();
    let mut c = PgServer::shared().client("noloss_partition_quiet");
    c.batch_execute(
        "UPDATE boxes SET server = 'mx2';
         UPDATE boxes SET username = 'carol' WHERE id = 2;",
    )
    .expect("writes");
    let lines = wait_for(&s.out("rec"), 1, &d);
    assert_eq!(
        ops(&lines[..1]),
        [(
            "UPDATE".to_owned(),
            json!({"id": 2, "username": "bob"}),
            json!({"id": 2, "username": "carol"})
        )]
    );
    assert!(
        !wait_until(Duration::from_millis(500), || recorded(&s.out("rec")).len()
            > 1),
        "{:#?}",
        recorded(&s.out("rec"))
    );
}

// ---------------------------------------------------------------------------------------
// Item 13: values equal under the type's equality but different to a handler
// ---------------------------------------------------------------------------------------

#[test]
fn updates_to_values_that_compare_equal_but_read_differently_are_captured() {
    let url = database(
        "noloss_equal",
        "CREATE COLLATION ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false);
         CREATE TABLE mail_users (id int PRIMARY KEY, username text COLLATE ci NOT NULL, quota numeric, other int);
         INSERT INTO mail_users VALUES (1, 'alice', 1.0, 0);",
    );
    let s = Setup::new();
    s.config(&url, &[("rec", "mail_users", &["username", "quota"])]);
    let d = s.start();
    let mut c = PgServer::shared().client("noloss_equal");
    c.batch_execute(
        "UPDATE mail_users SET username = 'Alice';
         UPDATE mail_users SET quota = 1.00;
         UPDATE mail_users SET other = 1;
         UPDATE mail_users SET username = 'bob';",
    )
    .expect("updates");
    let lines = wait_for(&s.out("rec"), 3, &d);
    let got: Vec<(Value, Value)> = ops(&lines)
        .into_iter()
        .map(|(op, old, new)| {
            assert_eq!(op, "UPDATE");
            (old, new)
        })
        .collect();
    assert_eq!(
        got,
        [
            (
                json!({"username": "alice", "quota": "1.0"}),
                json!({"username": "Alice", "quota": "1.0"})
            ),
            (
                json!({"username": "Alice", "quota": "1.0"}),
                json!({"username": "Alice", "quota": "1.00"})
            ),
            (
                json!({"username": "Alice", "quota": "1.00"}),
                json!({"username": "bob", "quota": "1.00"})
            ),
        ]
    );
    // The watched column still cannot be dropped from under the triggers.
    let e = c
        .batch_execute("ALTER TABLE mail_users DROP COLUMN quota")
        .expect_err("a watched column cannot be dropped");
    assert!(
        e.to_string().contains("depend") || format!("{e:?}").contains("depend"),
        "{e:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Item 14: session_replication_role = replica
// ---------------------------------------------------------------------------------------

#[test]
fn changes_applied_as_a_replica_are_delivered() {
    let url = database(
        "noloss_replica",
        "CREATE TABLE mail_users (id int PRIMARY KEY, username text NOT NULL);",
    );
    let s = Setup::new();
    s.config(&url, &[("rec", "mail_users", &["id", "username"])]);
    let d = s.start();
    let mut c = PgServer::shared().client("noloss_replica");
    c.batch_execute(
        "SET session_replication_role = replica;
         INSERT INTO mail_users VALUES (1, 'alice'), (2, 'bob');
         UPDATE mail_users SET username = 'carol' WHERE id = 2;
         DELETE FROM mail_users WHERE id = 1;
         TRUNCATE mail_users;",
    )
    .expect("writes as a replica");
    let lines = wait_for(&s.out("rec"), 5, &d);
    let got: Vec<String> = ops(&lines).into_iter().map(|(op, _, _)| op).collect();
    assert_eq!(got, ["INSERT", "INSERT", "UPDATE", "DELETE", "DELETE"]);

    // What `pg_restore --disable-triggers` leaves behind: triggers that fire only as
    // origin. Status says so, and install makes them fire always again.
    c.batch_execute(
        "SET session_replication_role = origin;
         ALTER TABLE mail_users DISABLE TRIGGER ALL;
         ALTER TABLE mail_users ENABLE TRIGGER ALL;",
    )
    .expect("reset the triggers");
    let config = s.dir.join("mx1.toml");
    let status = epidemic_tests::epidemic(&config, &["status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains("does not fire under session_replication_role = replica"),
        "{text}"
    );
    let out = epidemic_tests::epidemic(&config, &["install"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.batch_execute(
        "SET session_replication_role = replica;
         INSERT INTO mail_users VALUES (3, 'dave');",
    )
    .expect("write as a replica");
    let lines = wait_for(&s.out("rec"), 6, &d);
    assert_eq!(lines[5]["op"], "INSERT");
}

// ---------------------------------------------------------------------------------------
// Item 15: two-phase commit
// ---------------------------------------------------------------------------------------

#[test]
fn a_prepared_transaction_on_a_watched_table_prepares_commits_and_is_delivered() {
    let server = PgServer::start_private_with(&[("max_prepared_transactions", "5")]);
    let url = server.create_database("twophase");
    let mut c = server.client("twophase");
    c.batch_execute("CREATE TABLE mail_users (id int PRIMARY KEY, username text NOT NULL)")
        .expect("schema");
    let s = Setup::new();
    s.config(&url, &[("rec", "mail_users", &["id", "username"])]);
    let d = s.start();
    // The daemon is waiting: with the default `when-idle`, writers would notify now.
    assert!(wait_until(WAIT, || {
        c.query_one(
            "SELECT count(*) FROM epidemic.sleeper WHERE since > now() - interval '5 seconds'",
            &[],
        )
        .map(|r| r.get::<_, i64>(0) > 0)
        .unwrap_or(false)
    }));
    for i in 0..3 {
        c.batch_execute(&format!(
            "BEGIN; INSERT INTO mail_users VALUES ({i}, 'u{i}'); PREPARE TRANSACTION 'epidemic_2pc_{i}';"
        ))
        .unwrap_or_else(|e| panic!("PREPARE TRANSACTION on a watched table: {e:?}"));
        c.batch_execute(&format!("COMMIT PREPARED 'epidemic_2pc_{i}'"))
            .expect("commit prepared");
    }
    let lines = wait_for(&s.out("rec"), 3, &d);
    assert_eq!(lines.len(), 3);
    let status = epidemic_tests::epidemic(&s.dir.join("mx1.toml"), &["status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("max_prepared_transactions"), "{text}");
}

// ---------------------------------------------------------------------------------------
// Item 18: pruning racing a registration
// ---------------------------------------------------------------------------------------

fn library() -> &'static Library {
    static LIB: std::sync::OnceLock<Library> = std::sync::OnceLock::new();
    LIB.get_or_init(|| {
        let lib = host::load(&backend_path("postgres")).expect("load the postgres backend");
        lib.expect_backend().expect("a backend library");
        lib
    })
}

fn open(url: &str) -> HostBackend {
    library()
        .open_backend(url, &json!({}))
        .expect("open backend")
}

fn consumer(handler: &str) -> Consumer {
    Consumer {
        daemon: "mx1".into(),
        handler: handler.into(),
    }
}

fn drain(b: &mut HostBackend, c: &Consumer) -> Vec<i64> {
    let mut ids = Vec::new();
    loop {
        let batch = b.fetch(c, 500).expect("fetch");
        let Some(last) = batch.changes.last() else {
            return ids;
        };
        b.ack(c, &batch.token, last.id).expect("ack");
        ids.extend(
            batch
                .changes
                .iter()
                .filter_map(|ch| ch.value("id").and_then(|v| v.as_i64())),
        );
    }
}

#[test]
fn prune_never_deletes_what_a_consumer_being_registered_still_needs() {
    let db = "noloss_register_race";
    let url = database(db, "CREATE TABLE t (id int PRIMARY KEY);");
    let tables = vec!["t".to_owned()];
    let mut b1 = open(&url);
    b1.install(&[Watch {
        table: "t".into(),
        columns: vec!["id".into()],
        ..Default::default()
    }])
    .expect("install");
    let c1 = consumer("h1");
    b1.register(&c1, &tables, StartFrom::Oldest)
        .expect("register h1");
    let server = PgServer::shared();

    // W: a writer whose row the new consumer must get (it is running when the
    // registration takes its snapshot, and commits before the registration does).
    let mut w = server.client(db);
    w.batch_execute("BEGIN; INSERT INTO t VALUES (1)")
        .expect("writer");
    // X: holds the registration back after it took its snapshot (an uncommitted cursor
    // row with the same key makes its INSERT wait), and started after W.
    let mut x = server.client(db);
    x.batch_execute(
        "BEGIN; INSERT INTO epidemic.consumer (daemon, handler, tables, prev_snapshot) \
         VALUES ('mx1', 'h2', '{t}', '1:1:')",
    )
    .expect("blocker");
    let register = std::thread::spawn({
        let url = url.clone();
        let tables = tables.clone();
        move || {
            let mut b2 = open(&url);
            let r = b2.register(&consumer("h2"), &tables, StartFrom::Now);
            (b2, r)
        }
    });
    let mut watcher = server.client(db);
    assert!(
        wait_until(WAIT, || {
            watcher
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                     AND application_name = 'epidemic' AND wait_event_type = 'Lock'",
                    &[],
                )
                .map(|r| r.get::<_, i64>(0) > 0)
                .unwrap_or(false)
        }),
        "the registration waits"
    );
    w.batch_execute("COMMIT").expect("writer commits");
    assert_eq!(drain(&mut b1, &c1), [1], "h1 gets the row");
    // The prune may have to wait for the registration: run it aside.
    let prune = std::thread::spawn(move || {
        let r = b1.prune();
        (b1, r)
    });
    // Give a prune that does not wait the time to finish before the registration ends.
    wait_until(Duration::from_secs(2), || prune.is_finished());
    x.batch_execute("ROLLBACK")
        .expect("release the registration");
    let (mut b2, registered) = register.join().expect("register thread");
    assert_eq!(registered.expect("register h2"), Registered::New);
    let (_b1, pruned) = prune.join().expect("prune thread");
    pruned.expect("prune");
    assert_eq!(
        drain(&mut b2, &consumer("h2")),
        [1],
        "h2 registered before the row committed, so it must get it"
    );
}

// ---------------------------------------------------------------------------------------
// Issue 16: pruning the acknowledged part of a batch; acknowledgements a crash loses
// ---------------------------------------------------------------------------------------

fn log_rows(server: &PgServer, db: &str) -> Vec<i64> {
    server
        .client(db)
        .query("SELECT id FROM epidemic.log_t ORDER BY id", &[])
        .expect("read the log")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Rows of the table `t`'s changes in the log: their `id` column.
fn logged_values(server: &PgServer, db: &str) -> Vec<i32> {
    server
        .client(db)
        .query("SELECT new_id FROM epidemic.log_t ORDER BY id", &[])
        .expect("read the log")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[test]
fn prune_takes_the_acknowledged_part_of_a_batch_and_never_a_late_commit_below_it() {
    let db = "noloss_prune_in_batch";
    let url = database(db, "CREATE TABLE t (id int PRIMARY KEY);");
    let server = PgServer::shared();
    let mut b = open(&url);
    b.install(&[Watch {
        table: "t".into(),
        columns: vec!["id".into()],
        ..Default::default()
    }])
    .expect("install");
    let (h, other) = (consumer("h"), consumer("other"));
    for c in [&h, &other] {
        b.register(c, &["t".to_owned()], StartFrom::Oldest)
            .expect("register");
    }
    // A writer that draws the smallest id and commits last.
    let mut late = server.client(db);
    late.batch_execute("BEGIN; INSERT INTO t VALUES (0)")
        .expect("late writer");
    let mut w = server.client(db);
    for i in 1..=10 {
        w.execute("INSERT INTO t VALUES ($1)", &[&i])
            .expect("insert");
    }
    assert_eq!(drain(&mut b, &other), (1..=10).collect::<Vec<_>>());

    // h handles half of its batch; the late row commits, below what h acknowledged, and
    // other has it: only h's snapshot says h still needs it.
    let batch = b.fetch(&h, 5).expect("fetch");
    assert_eq!(batch.changes.len(), 5);
    b.ack(&h, &batch.token, batch.changes[4].id).expect("ack");
    late.batch_execute("COMMIT").expect("late commit");
    assert_eq!(drain(&mut b, &other), [0]);
    assert_eq!(
        b.prune().expect("prune"),
        5,
        "the rows both consumers handled go while h's batch is in progress"
    );
    assert_eq!(logged_values(server, db), [0, 6, 7, 8, 9, 10]);

    // The rest of h's batch, then the late row in the next one: nothing was skipped.
    assert_eq!(drain(&mut b, &h), [6, 7, 8, 9, 10, 0]);
    assert_eq!(b.prune().expect("prune"), 6);
    assert!(log_rows(server, db).is_empty());
}

#[test]
fn prune_finds_everything_handled_through_cursors_without_a_known_upper_id() {
    let db = "noloss_prune_unknown_bound";
    let url = database(db, "CREATE TABLE t (id int PRIMARY KEY);");
    let server = PgServer::shared();
    let mut b = open(&url);
    b.install(&[Watch {
        table: "t".into(),
        columns: vec!["id".into()],
        ..Default::default()
    }])
    .expect("install");
    let (h, other) = (consumer("h"), consumer("other"));
    for c in [&h, &other] {
        b.register(c, &["t".to_owned()], StartFrom::Now)
            .expect("register");
    }
    let mut w = server.client(db);
    for i in 1..=10 {
        w.execute("INSERT INTO t VALUES ($1)", &[&i])
            .expect("insert");
    }
    assert_eq!(drain(&mut b, &h), (1..=10).collect::<Vec<_>>());
    assert_eq!(drain(&mut b, &other), (1..=10).collect::<Vec<_>>());
    // A cursor written before the bound was kept (an older daemon's), and one whose
    // bound is below rows its snapshot shows: the first bounds nothing, the second
    // keeps rows longer, and neither loses one.
    w.execute(
        "UPDATE epidemic.consumer SET prev_upto = NULL WHERE handler = 'h'",
        &[],
    )
    .expect("forget h's bound");
    w.execute(
        "UPDATE epidemic.consumer SET prev_upto = 0 WHERE handler = 'other'",
        &[],
    )
    .expect("lower other's bound");
    assert_eq!(
        b.prune().expect("prune"),
        0,
        "other's bound says: nothing yet"
    );
    w.execute(
        "UPDATE epidemic.consumer SET prev_upto = NULL WHERE handler = 'other'",
        &[],
    )
    .expect("forget other's bound");
    assert_eq!(b.prune().expect("prune"), 10);
    for i in 11..=12 {
        w.execute("INSERT INTO t VALUES ($1)", &[&i])
            .expect("insert");
    }
    // Closing a batch makes the bound known again.
    assert_eq!(drain(&mut b, &h), [11, 12]);
    let known: bool = w
        .query_one(
            "SELECT prev_upto >= (SELECT max(id) FROM epidemic.log_t) FROM epidemic.consumer              WHERE handler = 'h'",
            &[],
        )
        .expect("read the bound")
        .get(0);
    assert!(known, "h's bound is past the rows its snapshot shows");
    assert_eq!(b.prune().expect("prune"), 0, "other has not had them");
    assert_eq!(drain(&mut b, &other), [11, 12]);
    assert_eq!(b.prune().expect("prune"), 2);
}

#[test]
fn an_acknowledgement_lost_in_a_crash_means_redelivery_never_loss() {
    // The WAL writer flushes asynchronous commits only every ten seconds here, so the
    // acknowledgement (which does not wait for its flush) is lost in the crash below
    // unless a later synchronous commit flushed it.
    let server = PgServer::start_private_with(&[("wal_writer_delay", "10000ms")]);
    let db = "noloss_lost_ack";
    let url = server.create_database(db);
    server
        .client(db)
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .expect("schema");
    let mut b = library()
        .open_backend(&url, &json!({}))
        .expect("open backend");
    b.install(&[Watch {
        table: "t".into(),
        columns: vec!["id".into()],
        ..Default::default()
    }])
    .expect("install");
    let c = consumer("h");
    b.register(&c, &["t".to_owned()], StartFrom::Now)
        .expect("register");
    let mut w = server.client(db);
    for i in 1..=10 {
        w.execute("INSERT INTO t VALUES ($1)", &[&i])
            .expect("insert");
    }
    let batch = b.fetch(&c, 500).expect("fetch");
    assert_eq!(batch.changes.len(), 10);
    b.ack(&c, &batch.token, batch.changes[9].id).expect("ack");
    drop(w);
    server.stop(epidemic_tests::pg::StopMode::Immediate);
    server.start();
    b.reconnect().expect("reconnect");
    // Either the ack survived and nothing comes again, or it was lost and the whole
    // batch comes again: never a part of it, never nothing while rows are missing.
    let again = drain(&mut b, &c);
    assert!(
        again.is_empty() || again == (1..=10).collect::<Vec<_>>(),
        "{again:?}"
    );
    eprintln!(
        "the acknowledgement {} the crash",
        if again.is_empty() {
            "survived"
        } else {
            "was lost in"
        }
    );
    let mut w = server.client(db);
    w.execute("INSERT INTO t VALUES (11)", &[]).expect("insert");
    assert_eq!(drain(&mut b, &c), [11]);

    // A prune that deleted by an acknowledgement is durable only with it: the prune's
    // commit is flushed, and the WAL before it with it.
    for i in 12..=20 {
        w.execute("INSERT INTO t VALUES ($1)", &[&i])
            .expect("insert");
    }
    assert_eq!(drain(&mut b, &c), (12..=20).collect::<Vec<_>>());
    let pruned = b.prune().expect("prune");
    assert!(pruned >= 9, "pruned {pruned}");
    drop(w);
    server.stop(epidemic_tests::pg::StopMode::Immediate);
    server.start();
    b.reconnect().expect("reconnect");
    assert!(
        drain(&mut b, &c).is_empty(),
        "the prune survived, so did the acknowledgement it pruned by"
    );
    assert!(log_rows(&server, db).is_empty());
}

// ---------------------------------------------------------------------------------------
// SDK 0.2: what a handler receives besides the values
// ---------------------------------------------------------------------------------------

#[test]
fn the_handler_receives_the_key_stable_id_transaction_commit_order_and_schema() {
    let url = database(
        "noloss_change_fields",
        "CREATE SCHEMA app;
         CREATE TABLE app.members (org int, member int, role text, PRIMARY KEY (member, org));",
    );
    let s = Setup::new();
    // The handler watches no key column: the key comes all the same.
    s.config(&url, &[("rec", "app.members", &["role"])]);
    let d = s.start();
    let mut c = PgServer::shared().client("noloss_change_fields");
    c.batch_execute(
        "BEGIN;
         INSERT INTO app.members VALUES (7, 1, 'admin');
         INSERT INTO app.members VALUES (7, 2, 'user');
         COMMIT;
         UPDATE app.members SET member = 3 WHERE member = 1;",
    )
    .expect("writes");
    let lines = wait_for(&s.out("rec"), 3, &d);
    let keys: Vec<(Value, Value)> = lines
        .iter()
        .map(|l| {
            (
                l["key"].clone(),
                l.get("old_key").cloned().unwrap_or(Value::Null),
            )
        })
        .collect();
    assert_eq!(
        keys,
        vec![
            (json!({"member": 1, "org": 7}), Value::Null),
            (json!({"member": 2, "org": 7}), Value::Null),
            (
                json!({"member": 3, "org": 7}),
                json!({"member": 1, "org": 7})
            ),
        ],
        "{lines:#?}"
    );
    for l in &lines {
        assert_eq!(l["schema"], "app", "{l}");
        assert_eq!(l["table"], "app.members", "{l}");
        let stable = l["stable_id"].as_str().expect("stable_id");
        assert!(stable.ends_with(&format!("-{}", l["id"])), "{l}");
        assert!(l["commit_seq"].is_i64() && l["txid"].is_i64(), "{l}");
    }
    assert_eq!(lines[0]["txid"], lines[1]["txid"]);
    assert_ne!(lines[1]["txid"], lines[2]["txid"]);
    assert!(lines[0]["commit_seq"].as_i64() <= lines[2]["commit_seq"].as_i64());
}
