//! The MySQL backend against a real MariaDB: the built `.so` loaded through the SDK's
//! host side, driven the way the daemon drives it (fetch, handle, ack; wait when idle;
//! reconnect with backoff on connection errors). Each test has its own database; tests
//! that crash or restart the server have a server of their own.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use epidemic_plugin_host::{load, HostBackend};
use epidemic_plugin_sdk::backend::{
    BackendError, Consumer, DeadLetter, DeadLetterQuery, DeadLetterUpdate, Registered, StartFrom,
    Watch,
};
use epidemic_plugin_sdk::{Change, Op, Value};
use epidemic_tests::mysql::MySqlServer;
use epidemic_tests::reader::{read_backlog_beside_a_stream, text, BackendReader};
use epidemic_tests::rng::Rng;
use epidemic_tests::{backend_path, wait_until};
use mysql::prelude::Queryable;
use serde_json::json;

/// The daemon's read loop on a connection of its own (see `epidemic_tests::reader`).
fn spawn_reader(url: &str, options: serde_json::Value, c: &Consumer) -> BackendReader {
    let url = url.to_owned();
    BackendReader::spawn(move || open(&url, options).expect("reader: open"), c)
}

const WAIT: Duration = Duration::from_secs(30);

fn open(url: &str, options: serde_json::Value) -> Result<HostBackend, BackendError> {
    let lib = load(&backend_path("mysql")).expect("load the mysql backend");
    lib.open_backend(url, &options)
}

fn open_ok(url: &str) -> HostBackend {
    open(url, json!({})).expect("open backend")
}

fn watch(table: &str, columns: &[&str]) -> Watch {
    Watch {
        table: table.into(),
        columns: columns.iter().map(|c| c.to_string()).collect(),
        ..Default::default()
    }
}

fn consumer(handler: &str) -> Consumer {
    Consumer {
        daemon: "mx1".into(),
        handler: handler.into(),
    }
}

/// A database on the shared server with `schema` applied; returns (url, connection).
fn database(name: &str, schema: &str) -> (String, mysql::Conn) {
    let server = MySqlServer::shared();
    let url = server.create_database(name);
    let mut conn = server.conn(name);
    for stmt in schema.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        conn.query_drop(stmt)
            .unwrap_or_else(|e| panic!("{stmt}: {e}"));
    }
    (url, conn)
}

/// Install, register from the oldest change, and return the backend used for it.
fn install_and_register(url: &str, watches: &[Watch], c: &Consumer) -> HostBackend {
    let mut b = open_ok(url);
    b.install(watches).expect("install");
    let tables: Vec<String> = watches.iter().map(|w| w.table.clone()).collect();
    b.register(c, &tables, StartFrom::Oldest).expect("register");
    b
}

/// Fetch and ack until `n` changes arrived or `timeout` passed.
fn collect(b: &mut HostBackend, c: &Consumer, n: usize, timeout: Duration) -> Vec<Change> {
    let mut out = Vec::new();
    let deadline = Instant::now() + timeout;
    while out.len() < n && Instant::now() < deadline {
        let batch = b.fetch(c, 500).expect("fetch");
        match batch.changes.last() {
            None => {
                b.wait(Duration::from_millis(100)).expect("wait");
            }
            Some(last) => {
                b.ack(c, &batch.token, last.id).expect("ack");
                out.extend(batch.changes);
            }
        }
    }
    out
}

/// Whatever is there now (fetch until an empty batch).
fn drain(b: &mut HostBackend, c: &Consumer) -> Vec<Change> {
    let mut out = Vec::new();
    loop {
        let batch = b.fetch(c, 500).expect("fetch");
        let Some(last) = batch.changes.last() else {
            return out;
        };
        b.ack(c, &batch.token, last.id).expect("ack");
        out.extend(batch.changes);
    }
}

/// The consumer's durable cursor: (high_water, gaps).
fn cursor(conn: &mut mysql::Conn, c: &Consumer, table: &str) -> (i64, String) {
    conn.exec_first(
        "SELECT high_water, gaps FROM epidemic_cursor WHERE daemon = ? AND handler = ? AND source_table = ?",
        (&c.daemon, &c.handler, table),
    )
    .expect("read cursor")
    .expect("cursor row")
}

/// One row change as the writer meant it and as the handler saw it: (op, key, value).
type Effect = (&'static str, String, String);

fn effect(c: &Change) -> Effect {
    (c.op.as_str(), text(c.value("k")), text(c.value("v")))
}

const ITEMS: &str =
    "CREATE TABLE items (k VARCHAR(40) PRIMARY KEY, v VARCHAR(40), n INT) ENGINE=InnoDB";

/// One writer of test (a): transactions of 1-3 statements on its own rows, a few ms
/// between the writes and COMMIT, one in ten rolled back. Returns the committed
/// effects in commit order.
fn write_randomly(url: &str, w: usize, transactions: usize) -> Vec<Effect> {
    let mut conn = mysql::Conn::new(mysql::Opts::from_url(url).unwrap()).unwrap();
    let mut rng =
        Rng::from_state(0x9e37_79b9_7f4a_7c15 ^ (w as u64 + 1).wrapping_mul(0x2545_f491_4f6c_dd1d));
    let mut rows: Vec<(String, String)> = Vec::new();
    let mut committed = Vec::new();
    for t in 0..transactions {
        conn.query_drop("START TRANSACTION").unwrap();
        let mut after = rows.clone();
        let mut effects = Vec::new();
        let mut failed = false;
        for s in 0..=rng.below(3) {
            let v = format!("w{w}t{t}s{s}");
            let pick = rng.below(10);
            let result = if after.is_empty() || pick < 6 {
                let k = format!("w{w}-{t}-{s}");
                effects.push((Op::Insert.as_str(), k.clone(), v.clone()));
                after.push((k.clone(), v.clone()));
                conn.exec_drop("INSERT INTO items (k, v, n) VALUES (?, ?, ?)", (k, v, t))
            } else if pick < 9 {
                let i = rng.below(after.len() as u64) as usize;
                after[i].1 = v.clone();
                effects.push((Op::Update.as_str(), after[i].0.clone(), v.clone()));
                conn.exec_drop("UPDATE items SET v = ? WHERE k = ?", (v, &after[i].0))
            } else {
                let i = rng.below(after.len() as u64) as usize;
                let (k, old) = after.remove(i);
                effects.push((Op::Delete.as_str(), k.clone(), old));
                conn.exec_drop("DELETE FROM items WHERE k = ?", (k,))
            };
            if let Err(e) = result {
                // A deadlock or lock wait timeout rolls the transaction back: nothing of
                // it may be delivered.
                eprintln!("writer {w}: {e}; rolling back");
                failed = true;
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(rng.below(5)));
        if failed || rng.below(10) == 0 {
            conn.query_drop("ROLLBACK").unwrap();
        } else {
            conn.query_drop("COMMIT").unwrap();
            committed.extend(effects);
            rows = after;
        }
    }
    committed
}

/// Delivered is exactly committed: nothing missing, nothing rolled back, no change
/// twice, and the changes to each row in commit order.
fn assert_exactly_committed(committed: &[Effect], delivered: &[Effect]) {
    let want: BTreeSet<&Effect> = committed.iter().collect();
    let got: BTreeSet<&Effect> = delivered.iter().collect();
    assert_eq!(got.len(), delivered.len(), "a change was delivered twice");
    let missing: Vec<_> = want.difference(&got).take(5).collect();
    let extra: Vec<_> = got.difference(&want).take(5).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {missing:?}, not committed {extra:?}"
    );

    // Changes to one row arrive in commit order.
    let by_row = |effects: &[Effect]| {
        let mut m: HashMap<String, Vec<(&str, String)>> = HashMap::new();
        for (op, k, v) in effects {
            m.entry(k.clone()).or_default().push((*op, v.clone()));
        }
        m
    };
    let (got_rows, want_rows) = (by_row(delivered), by_row(committed));
    let out_of_order: Vec<_> = want_rows
        .iter()
        .filter(|(k, want)| got_rows.get(*k) != Some(want))
        .take(3)
        .map(|(k, want)| (k, want, got_rows.get(k)))
        .collect();
    assert!(
        out_of_order.is_empty(),
        "out of commit order (row, committed, delivered): {out_of_order:?}"
    );
}

#[test]
fn concurrent_writers_with_rollbacks_deliver_exactly_the_committed_changes() {
    let (url, mut conn) = database("concurrent", ITEMS);
    let c = consumer("all");
    let mut setup = install_and_register(&url, &[watch("items", &["k", "v"])], &c);
    let reader = spawn_reader(&url, json!({}), &c);

    let writers: Vec<JoinHandle<Vec<Effect>>> = (0..16)
        .map(|w| {
            let url = url.clone();
            std::thread::spawn(move || write_randomly(&url, w, 700))
        })
        .collect();
    let per_writer: Vec<Vec<Effect>> = writers.into_iter().map(|h| h.join().unwrap()).collect();
    let committed: Vec<Effect> = per_writer.iter().flatten().cloned().collect();
    assert!(
        committed.len() > 20_000,
        "only {} committed changes",
        committed.len()
    );

    // Every writer has finished, so everything committed is visible; the marker's
    // arrival means the reader has read past all of it.
    conn.query_drop("INSERT INTO items (k, v) VALUES ('marker', 'm')")
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(120), || reader.has("k", "marker")),
        "marker not delivered; {} of {} changes",
        reader.delivered().len(),
        committed.len()
    );
    // The rolled-back ids are proven dead once no transaction that could fill them is
    // open (the reader keeps checking while it has gaps).
    assert!(
        wait_until(WAIT, || cursor(&mut conn, &c, "items").1.is_empty()),
        "gaps never proven dead: {:?}",
        cursor(&mut conn, &c, "items")
    );
    let delivered: Vec<Effect> = reader
        .stop()
        .iter()
        .map(effect)
        .filter(|e| e.1 != "marker")
        .collect();

    assert_exactly_committed(&committed, &delivered);

    // With every consumer past everything, pruning empties the log but for its newest row.
    setup.prune().expect("prune");
    let left: Vec<i64> = conn.query("SELECT id FROM epidemic_log_items").unwrap();
    let max: Option<i64> = conn
        .query_first("SELECT MAX(id) FROM epidemic_log_items")
        .unwrap();
    assert_eq!(left, vec![max.unwrap()]);
}

#[test]
fn an_open_transaction_is_delivered_after_commit_without_holding_back_others() {
    let (url, mut conn) = database("long_trx", ITEMS);
    let c = consumer("all");
    let _setup = install_and_register(&url, &[watch("items", &["k", "v"])], &c);
    // A gap timeout far shorter than the transaction: with INNODB_TRX readable it must
    // not be used, or the long transaction's change would be lost.
    let reader = spawn_reader(&url, json!({"gap_timeout_ms": 500}), &c);
    let server = MySqlServer::shared();

    let mut long = server.conn("long_trx");
    long.query_drop("START TRANSACTION").unwrap();
    long.query_drop("INSERT INTO items (k, v) VALUES ('long', 'l')")
        .unwrap();
    let opened = Instant::now();
    for i in 0..20 {
        conn.exec_drop(
            "INSERT INTO items (k, v) VALUES (?, 'x')",
            (format!("a{i}"),),
        )
        .unwrap();
    }
    assert!(
        wait_until(WAIT, || reader.has("k", "a19")),
        "changes committed after the open transaction's write were held back"
    );
    assert!(!reader.has("k", "long"));
    // Hold the transaction open for five seconds in all, well past the gap timeout.
    std::thread::sleep(Duration::from_secs(5).saturating_sub(opened.elapsed()));
    assert!(!reader.has("k", "long"));
    long.query_drop("COMMIT").unwrap();
    assert!(
        wait_until(WAIT, || reader.has("k", "long")),
        "the long transaction's change was lost"
    );

    // Its id is below the others': this was a gap, filled after the fact.
    let ids: BTreeMap<String, i64> = reader
        .delivered()
        .iter()
        .map(|c| (text(c.value("k")), c.id))
        .collect();
    assert!(ids["long"] < ids["a0"], "{ids:?}");

    // A rolled-back one leaves a gap that is proven dead, and nothing is delivered.
    let mut ghost = server.conn("long_trx");
    ghost.query_drop("START TRANSACTION").unwrap();
    ghost
        .query_drop("INSERT INTO items (k, v) VALUES ('ghost', 'g')")
        .unwrap();
    conn.query_drop("INSERT INTO items (k, v) VALUES ('b1', 'x')")
        .unwrap();
    assert!(wait_until(WAIT, || reader.has("k", "b1")));
    assert!(
        wait_until(WAIT, || !cursor(&mut conn, &c, "items").1.is_empty()),
        "the open transaction's id must be a durable gap"
    );
    ghost.query_drop("ROLLBACK").unwrap();
    assert!(
        wait_until(WAIT, || cursor(&mut conn, &c, "items").1.is_empty()),
        "gap of the rolled-back transaction never proven dead"
    );
    let delivered = reader.stop();
    assert!(!delivered.iter().any(|c| text(c.value("k")) == "ghost"));
    assert_eq!(delivered.len(), 22);
}

#[test]
fn timeout_fallback_delivers_short_transactions_and_forgets_rolled_back_ids() {
    let (url, mut conn) = database("timeout_fallback", ITEMS);
    let c = consumer("all");
    let _setup = install_and_register(&url, &[watch("items", &["k", "v"])], &c);
    let reader = spawn_reader(
        &url,
        json!({"gap_detection": "timeout", "gap_timeout_ms": 3000}),
        &c,
    );
    let server = MySqlServer::shared();

    let mut slow = server.conn("timeout_fallback");
    slow.query_drop("START TRANSACTION").unwrap();
    slow.query_drop("INSERT INTO items (k, v) VALUES ('slow', 's')")
        .unwrap();
    conn.query_drop("INSERT INTO items (k, v) VALUES ('x1', 'x')")
        .unwrap();
    assert!(wait_until(WAIT, || reader.has("k", "x1")));
    slow.query_drop("COMMIT").unwrap();
    assert!(wait_until(WAIT, || reader.has("k", "slow")));

    let mut ghost = server.conn("timeout_fallback");
    ghost.query_drop("START TRANSACTION").unwrap();
    ghost
        .query_drop("INSERT INTO items (k, v) VALUES ('ghost', 'g')")
        .unwrap();
    conn.query_drop("INSERT INTO items (k, v) VALUES ('x2', 'x')")
        .unwrap();
    assert!(wait_until(WAIT, || reader.has("k", "x2")));
    ghost.query_drop("ROLLBACK").unwrap();
    assert!(
        wait_until(WAIT, || cursor(&mut conn, &c, "items").1.is_empty()),
        "gap never timed out"
    );
    let delivered = reader.stop();
    assert_eq!(delivered.len(), 3, "{delivered:?}");
}

#[test]
fn server_crash_mid_stream_loses_nothing() {
    let server = MySqlServer::start_new();
    let url = server.create_database("crash");
    server.conn("crash").query_drop(ITEMS).unwrap();
    let c = consumer("all");
    drop(install_and_register(
        &url,
        &[watch("items", &["k", "v"])],
        &c,
    ));
    let reader = spawn_reader(&url, json!({}), &c);

    // Writers insert until told to stop; a failed statement is retried on a new
    // connection (its outcome may be unknown: the table is the truth at the end).
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicUsize::new(0));
    let writers: Vec<JoinHandle<()>> = (0..4)
        .map(|w| {
            let (url, stop, written) = (url.clone(), stop.clone(), written.clone());
            std::thread::spawn(move || {
                let opts = mysql::Opts::from_url(&url).unwrap();
                let mut conn: Option<mysql::Conn> = None;
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let Some(cn) = conn.as_mut() else {
                        conn = mysql::Conn::new(opts.clone()).ok();
                        if conn.is_none() {
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        continue;
                    };
                    let ok = cn
                        .query_drop("START TRANSACTION")
                        .and_then(|()| {
                            cn.exec_drop(
                                "INSERT INTO items (k, v) VALUES (?, 'x')",
                                (format!("w{w}-{i}"),),
                            )
                        })
                        .and_then(|()| {
                            std::thread::sleep(Duration::from_millis(1));
                            cn.query_drop("COMMIT")
                        });
                    i += 1;
                    match ok {
                        Ok(()) => {
                            written.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => conn = None,
                    }
                }
            })
        })
        .collect();

    assert!(wait_until(WAIT, || written.load(Ordering::Relaxed) >= 1_000));
    server.kill();
    assert!(
        wait_until(WAIT, || reader.connection_errors.load(Ordering::Relaxed)
            > 0),
        "the reader never noticed the crash"
    );
    server.start();
    let after = written.load(Ordering::Relaxed);
    assert!(wait_until(WAIT, || written.load(Ordering::Relaxed) >= after + 1_000));
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }

    let mut conn = server.conn("crash");
    conn.query_drop("INSERT INTO items (k, v) VALUES ('marker', 'm')")
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || reader.has("k", "marker")),
        "reader did not catch up after the restart"
    );
    let errors = reader.connection_errors.load(Ordering::Relaxed);
    let delivered: BTreeSet<String> = reader.stop().iter().map(|c| text(c.value("k"))).collect();
    let committed: BTreeSet<String> = conn
        .query::<String, _>("SELECT k FROM items")
        .unwrap()
        .into_iter()
        .collect();
    let missing: Vec<_> = committed.difference(&delivered).take(5).collect();
    let extra: Vec<_> = delivered.difference(&committed).take(5).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {missing:?}, never committed {extra:?}"
    );
    assert!(errors > 0);
}

#[test]
fn prune_keeps_the_newest_row_so_ids_never_go_backwards() {
    let server = MySqlServer::start_new();
    let url = server.create_database("prune");
    let mut conn = server.conn("prune");
    conn.query_drop(ITEMS).unwrap();
    let c = consumer("all");
    let mut b = install_and_register(&url, &[watch("items", &["k", "v"])], &c);
    // A second consumer that has read nothing holds the log.
    b.register(&consumer("slow"), &["items".to_string()], StartFrom::Oldest)
        .unwrap();
    for i in 0..5 {
        conn.exec_drop(
            "INSERT INTO items (k, v) VALUES (?, 'x')",
            (format!("r{i}"),),
        )
        .unwrap();
    }
    let first = collect(&mut b, &c, 5, WAIT);
    assert_eq!(first.len(), 5);
    assert_eq!(
        b.prune().unwrap(),
        0,
        "the slow consumer still needs every row"
    );
    assert_eq!(collect(&mut b, &consumer("slow"), 5, WAIT).len(), 5);

    assert_eq!(b.prune().unwrap(), 4);
    let left: Vec<i64> = conn.query("SELECT id FROM epidemic_log_items").unwrap();
    assert_eq!(left, vec![first[4].id], "the newest row must stay");
    assert_eq!(b.prune().unwrap(), 0);

    // Before MySQL 8.0 / MariaDB 10.2.4 a restart resets the counter to MAX(id) + 1;
    // `AUTO_INCREMENT = 1` does the same on any version. Then restart for real.
    conn.query_drop("ALTER TABLE epidemic_log_items AUTO_INCREMENT = 1")
        .unwrap();
    drop(conn);
    drop(b);
    server.kill();
    server.start();
    let mut conn = server.conn("prune");
    conn.query_drop("INSERT INTO items (k, v) VALUES ('after', 'x')")
        .unwrap();
    let mut b = open_ok(&url);
    let again = collect(&mut b, &c, 1, WAIT);
    assert_eq!(
        again.iter().map(|c| text(c.value("k"))).collect::<Vec<_>>(),
        ["after"]
    );
    assert!(again[0].id > first[4].id);
    // So a restarted counter never names a change after one that was already delivered.
    let mut stable: Vec<&str> = first
        .iter()
        .chain(&again)
        .map(|c| c.stable_id.as_str())
        .collect();
    assert!(stable.iter().all(|s| !s.is_empty()), "{stable:?}");
    stable.sort();
    stable.dedup();
    assert_eq!(stable.len(), 6, "stable ids reused: {stable:?}");
}

#[test]
fn reserved_words_mixed_case_and_long_names_work() {
    let long = format!("t{}", "x".repeat(62));
    let (url, mut conn) = database(
        "identifiers",
        &format!(
            "CREATE TABLE `order` (`select` INT PRIMARY KEY, `Group` VARCHAR(20), `from` INT);
             CREATE TABLE `MailUsers` (`Id` INT PRIMARY KEY, `UserName` VARCHAR(40));
             CREATE TABLE `{long}` (id INT PRIMARY KEY, `a$b` INT)"
        ),
    );
    let c = consumer("all");
    let mut b = install_and_register(
        &url,
        &[
            watch("order", &["select", "group", "from"]),
            watch("MailUsers", &["username"]),
            watch(&long, &["a$b"]),
        ],
        &c,
    );
    conn.query_drop("INSERT INTO `order` VALUES (1, 'g', 2)")
        .unwrap();
    conn.query_drop("UPDATE `order` SET `from` = 3").unwrap();
    conn.query_drop("INSERT INTO `MailUsers` VALUES (1, 'Ann')")
        .unwrap();
    conn.query_drop(format!("INSERT INTO `{long}` VALUES (1, 7)"))
        .unwrap();
    conn.query_drop("DELETE FROM `order`").unwrap();

    let got = collect(&mut b, &c, 5, WAIT);
    let mut by_table: BTreeMap<String, Vec<&Change>> = BTreeMap::new();
    for ch in &got {
        by_table.entry(ch.table.clone()).or_default().push(ch);
    }
    let order = &by_table["order"];
    assert_eq!(
        order.iter().map(|c| c.op).collect::<Vec<_>>(),
        [Op::Insert, Op::Update, Op::Delete]
    );
    assert_eq!(
        &order[0].columns[..],
        ["select", "Group", "from"],
        "real column names"
    );
    assert_eq!(order[1].old_value("from"), Some(&Value::Int(2)));
    assert_eq!(order[1].new_value("from"), Some(&Value::Int(3)));
    assert_eq!(order[2].old_value("Group"), Some(&Value::Text("g".into())));
    let mail = &by_table["MailUsers"];
    assert_eq!(
        mail[0].new_value("UserName"),
        Some(&Value::Text("Ann".into()))
    );
    assert_eq!(by_table[&long][0].new_value("a$b"), Some(&Value::Int(7)));
    let logs: Vec<String> = conn
        .query("SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME LIKE 'epidemic_log_%'")
        .unwrap();
    assert!(logs.iter().all(|t| t.len() <= 64), "{logs:?}");
}

/// Every object in the database whose name starts with `epidemic`, tables and triggers.
fn epidemic_objects(conn: &mut mysql::Conn) -> Vec<String> {
    conn.query(
        "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME LIKE 'epidemic%' \
         UNION ALL SELECT TRIGGER_NAME FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = DATABASE()",
    )
    .unwrap()
}

#[test]
fn injection_and_missing_objects_are_refused_before_anything_is_created() {
    let (url, mut conn) = database(
        "refusals",
        "CREATE TABLE users (id INT PRIMARY KEY, name VARCHAR(20)); CREATE TABLE x (id INT); CREATE VIEW v AS SELECT id FROM users",
    );
    let mut b = open_ok(&url);
    let good = watch("users", &["name"]);
    let cases: Vec<(Vec<Watch>, &str)> = vec![
        (
            vec![watch("users; DROP TABLE x", &["name"])],
            "invalid table name",
        ),
        (
            vec![watch("users`; DROP TABLE x; --", &["name"])],
            "invalid table name",
        ),
        (
            vec![watch("users", &["name`) VALUES (1); DROP TABLE x; --"])],
            "invalid column name",
        ),
        (
            vec![good.clone(), watch("nope", &["id"])],
            "table nope does not exist",
        ),
        (
            vec![good.clone(), watch("users", &["nosuch"])],
            "column nosuch does not exist in table users",
        ),
        (vec![good.clone(), watch("v", &["id"])], "view"),
        (
            vec![good.clone(), watch("epidemic_watch", &["columns"])],
            "its own tables",
        ),
    ];
    for (watches, expected) in cases {
        for result in [b.plan_install(&watches), b.install(&watches)] {
            match result {
                Err(BackendError::Invalid(m)) => {
                    assert!(m.contains(expected), "{m:?} should say {expected:?}")
                }
                other => panic!("{watches:?}: expected Invalid({expected:?}), got {other:?}"),
            }
        }
    }
    assert_eq!(
        epidemic_objects(&mut conn),
        Vec::<String>::new(),
        "nothing may be created"
    );
    let tables: Vec<String> = conn.query("SHOW TABLES").unwrap();
    assert_eq!(tables, ["users", "v", "x"]);
}

#[test]
fn update_trigger_is_null_safe_and_skips_unwatched_columns() {
    let (url, mut conn) = database(
        "captures",
        "CREATE TABLE people (id INT PRIMARY KEY, name VARCHAR(50), quota BIGINT NULL, price DECIMAL(10,2),
             born DATETIME, seen TIMESTAMP NULL, avatar BLOB, ratio DOUBLE, note VARCHAR(20))",
    );
    let c = consumer("all");
    let cols = ["name", "quota", "price", "born", "seen", "avatar", "ratio"];
    let mut b = install_and_register(&url, &[watch("people", &cols)], &c);
    let log_rows = |conn: &mut mysql::Conn| -> i64 {
        conn.query_first("SELECT COUNT(*) FROM epidemic_log_people")
            .unwrap()
            .unwrap()
    };
    conn.query_drop(
        "INSERT INTO people VALUES (1, 'ann', NULL, 9.50, '2001-02-03 04:05:06', NULL, x'00ff', 0.5, 'n')",
    )
    .unwrap();
    assert_eq!(log_rows(&mut conn), 1);
    conn.query_drop("UPDATE people SET note = 'x'").unwrap();
    assert_eq!(
        log_rows(&mut conn),
        1,
        "an unwatched column changed: no log row"
    );
    conn.query_drop("UPDATE people SET quota = NULL, note = 'y'")
        .unwrap();
    assert_eq!(log_rows(&mut conn), 1, "NULL to NULL is no change");
    conn.query_drop("UPDATE people SET quota = 100").unwrap();
    conn.query_drop("UPDATE people SET quota = NULL").unwrap();
    conn.query_drop("UPDATE people SET name = 'Ann'").unwrap();
    conn.query_drop("UPDATE people SET name = 'Ann '").unwrap();
    conn.query_drop("UPDATE people SET seen = '2020-01-01 00:00:00'")
        .unwrap();
    conn.query_drop("DELETE FROM people").unwrap();
    assert_eq!(log_rows(&mut conn), 7);

    let got = collect(&mut b, &c, 7, WAIT);
    let ops: Vec<Op> = got.iter().map(|c| c.op).collect();
    use Op::*;
    assert_eq!(
        ops,
        [Insert, Update, Update, Update, Update, Update, Delete]
    );
    let ins = &got[0];
    assert!(ins.old.is_none());
    assert_eq!(
        ins.new.as_deref().unwrap(),
        [
            Value::Int(1),
            Value::Text("ann".into()),
            Value::Null,
            Value::Text("9.50".into()),
            Value::Text("2001-02-03 04:05:06".into()),
            Value::Null,
            Value::Bytes(vec![0, 255]),
            Value::Float(0.5),
        ]
    );
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64;
    assert!(
        (now_us - ins.changed_at_us).abs() < 60_000_000,
        "changed_at {}",
        ins.changed_at_us
    );
    assert_eq!(
        (got[1].old_value("quota"), got[1].new_value("quota")),
        (Some(&Value::Null), Some(&Value::Int(100)))
    );
    assert_eq!(
        (got[2].old_value("quota"), got[2].new_value("quota")),
        (Some(&Value::Int(100)), Some(&Value::Null))
    );
    assert_eq!(
        text(got[3].new_value("name")),
        "Ann",
        "a case-only change is a change"
    );
    assert_eq!(
        text(got[4].new_value("name")),
        "Ann ",
        "so is a trailing space"
    );
    assert_eq!(text(got[5].new_value("seen")), "2020-01-01 00:00:00");
    assert_eq!(got[5].old_value("seen"), Some(&Value::Null));
    let del = &got[6];
    assert!(del.new.is_none());
    assert_eq!(text(del.old_value("name")), "Ann ");
    assert_eq!(del.old_value("avatar"), Some(&Value::Bytes(vec![0, 255])));
}

#[test]
fn install_is_idempotent_merges_columns_and_uninstall_removes_everything() {
    let (url, mut conn) = database(
        "lifecycle",
        "CREATE TABLE users (id INT PRIMARY KEY, a INT, b INT)",
    );
    conn.query_drop("INSERT INTO users VALUES (1, 1, 1)")
        .unwrap();
    let mut b = open_ok(&url);
    let plan = b.plan_install(&[watch("users", &["a"])]).unwrap();
    assert_eq!(
        b.install(&[watch("users", &["a"])]).unwrap(),
        plan,
        "install runs exactly the plan"
    );
    assert!(plan
        .iter()
        .any(|s| s.starts_with("CREATE TRIGGER `epidemic_users_update` AFTER UPDATE")));
    assert_eq!(
        b.plan_install(&[watch("users", &["a"])]).unwrap(),
        Vec::<String>::new()
    );
    assert_eq!(
        b.install(&[watch("users", &["a"])]).unwrap(),
        Vec::<String>::new()
    );

    // Another daemon's handler watches `b`: the triggers then capture both, and a later
    // install of `a` alone does not take `b` away.
    let more = b.install(&[watch("users", &["b"])]).unwrap();
    assert!(
        more.iter().any(|s| s.contains("ADD COLUMN `old_b`")),
        "{more:?}"
    );
    assert_eq!(
        b.install(&[watch("users", &["a"])]).unwrap(),
        Vec::<String>::new()
    );
    let c = consumer("all");
    b.register(&c, &["users".to_string()], StartFrom::Oldest)
        .unwrap();
    assert_eq!(
        b.register(&c, &["users".to_string()], StartFrom::Now)
            .unwrap(),
        Registered::Existing
    );
    conn.query_drop("UPDATE users SET b = 2").unwrap();
    let got = collect(&mut b, &c, 1, WAIT);
    assert_eq!(
        &got[0].columns[..],
        ["id", "a", "b"],
        "the key is captured first"
    );
    assert_eq!(got[0].new_value("b"), Some(&Value::Int(2)));

    let plan = b.plan_uninstall().unwrap();
    assert_eq!(b.uninstall().unwrap(), plan);
    assert_eq!(epidemic_objects(&mut conn), Vec::<String>::new());
    let users: Vec<(i64, i64, i64)> = conn.query("SELECT id, a, b FROM users").unwrap();
    assert_eq!(
        users,
        [(1, 1, 2)],
        "the user's table and data are untouched"
    );
    assert_eq!(b.plan_uninstall().unwrap(), Vec::<String>::new());
}

#[test]
fn register_from_now_still_delivers_transactions_in_flight() {
    let (url, mut conn) = database("from_now", ITEMS);
    let mut b = open_ok(&url);
    b.install(&[watch("items", &["k", "v"])]).unwrap();
    conn.query_drop("INSERT INTO items (k, v) VALUES ('before', 'x')")
        .unwrap();
    let mut held = MySqlServer::shared().conn("from_now");
    held.query_drop("START TRANSACTION").unwrap();
    held.query_drop("INSERT INTO items (k, v) VALUES ('in-flight', 'x')")
        .unwrap();
    conn.query_drop("INSERT INTO items (k, v) VALUES ('also-before', 'x')")
        .unwrap();

    let c = consumer("late");
    assert_eq!(
        b.register(&c, &["items".to_string()], StartFrom::Now)
            .unwrap(),
        Registered::New
    );
    assert!(
        drain(&mut b, &c).is_empty(),
        "nothing committed before registration"
    );
    held.query_drop("COMMIT").unwrap();
    conn.query_drop("INSERT INTO items (k, v) VALUES ('after', 'x')")
        .unwrap();
    let got: Vec<String> = collect(&mut b, &c, 2, WAIT)
        .iter()
        .map(|c| text(c.value("k")))
        .collect();
    assert_eq!(got, ["in-flight", "after"]);
}

#[test]
fn reinstall_with_more_columns_while_writers_run_loses_nothing() {
    let (url, mut conn) = database("reinstall", ITEMS);
    let c = consumer("all");
    drop(install_and_register(&url, &[watch("items", &["k"])], &c));
    let reader = spawn_reader(&url, json!({}), &c);
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicUsize::new(0));
    let writers: Vec<JoinHandle<()>> = (0..4)
        .map(|w| {
            let (url, stop, written) = (url.clone(), stop.clone(), written.clone());
            std::thread::spawn(move || {
                let mut conn = mysql::Conn::new(mysql::Opts::from_url(&url).unwrap()).unwrap();
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    conn.exec_drop(
                        "INSERT INTO items (k, v, n) VALUES (?, 'x', ?)",
                        (format!("w{w}-{i}"), i),
                    )
                    .unwrap();
                    conn.exec_drop(
                        "UPDATE items SET n = n + 1 WHERE k = ?",
                        (format!("w{w}-{i}"),),
                    )
                    .unwrap();
                    i += 1;
                    written.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    assert!(wait_until(WAIT, || written.load(Ordering::Relaxed) >= 500));
    let mut b = open_ok(&url);
    let plan = b.install(&[watch("items", &["k", "n"])]).unwrap();
    assert!(
        plan.iter().any(|s| s.starts_with("LOCK TABLES")),
        "{plan:?}"
    );
    let at = written.load(Ordering::Relaxed);
    assert!(wait_until(WAIT, || written.load(Ordering::Relaxed) >= at + 500));
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    conn.query_drop("INSERT INTO items (k, v) VALUES ('marker', 'm')")
        .unwrap();
    assert!(wait_until(Duration::from_secs(60), || reader.has("k", "marker")));
    let delivered = reader.stop();
    let inserted: BTreeSet<String> = delivered
        .iter()
        .filter(|c| c.op == Op::Insert)
        .map(|c| text(c.value("k")))
        .collect();
    let rows: BTreeSet<String> = conn
        .query::<String, _>("SELECT k FROM items")
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(
        inserted, rows,
        "an insert went uncaptured while the triggers were replaced"
    );
    // Updates of `n` are captured from the reinstall on (and only from then on).
    let log_updates: i64 = conn
        .query_first("SELECT COUNT(*) FROM epidemic_log_items WHERE op = 'U'")
        .unwrap()
        .unwrap();
    assert!(log_updates > 0);
}

#[test]
fn eviction_dead_letters_and_status() {
    let (url, mut conn) = database("operations", "CREATE TABLE users (id INT PRIMARY KEY, name VARCHAR(20) CHARACTER SET utf8mb4); CREATE TABLE other (id INT PRIMARY KEY)");
    let (fast, slow) = (consumer("fast"), consumer("slow"));
    let mut b = install_and_register(
        &url,
        &[watch("users", &["name"]), watch("other", &["id"])],
        &fast,
    );
    b.register(&slow, &["users".to_string()], StartFrom::Oldest)
        .unwrap();
    for i in 0..3 {
        conn.exec_drop("INSERT INTO users VALUES (?, 'x')", (i,))
            .unwrap();
    }
    assert_eq!(collect(&mut b, &fast, 3, WAIT).len(), 3);

    let status = b.status().unwrap();
    assert_eq!(status.backend, "mysql");
    let users = status.tables.iter().find(|t| t.table == "users").unwrap();
    assert_eq!(users.log_rows, 3);
    assert!(
        users.triggers.iter().all(|(_, present)| *present) && users.problems.is_empty(),
        "{users:?}"
    );
    let s = status
        .consumers
        .iter()
        .find(|c| c.handler == "slow")
        .unwrap();
    assert_eq!((s.backlog, s.evicted), (3, false));
    assert!(s.oldest_pending_age_s.is_some());
    let f = status
        .consumers
        .iter()
        .find(|c| c.handler == "fast")
        .unwrap();
    assert_eq!(f.backlog, 0);
    assert_eq!(f.tables, ["other", "users"]);

    // Drift is reported: a dropped trigger.
    conn.query_drop("DROP TRIGGER epidemic_users_delete")
        .unwrap();
    let users = b
        .status()
        .unwrap()
        .tables
        .into_iter()
        .find(|t| t.table == "users")
        .unwrap();
    assert!(
        users
            .problems
            .iter()
            .any(|p| p.contains("epidemic_users_delete")),
        "{users:?}"
    );
    b.install(&[watch("users", &["name"])]).unwrap();

    // The slow consumer holds the log until it is evicted.
    b.prune().unwrap();
    assert_eq!(
        b.status()
            .unwrap()
            .tables
            .iter()
            .find(|t| t.table == "users")
            .unwrap()
            .log_rows,
        3
    );
    b.touch(&fast).unwrap();
    conn.query_drop("UPDATE epidemic_cursor SET last_seen = 0 WHERE handler = 'slow'")
        .unwrap();
    assert_eq!(
        b.evict_stale(Duration::from_secs(3600)).unwrap(),
        vec![slow.clone()]
    );
    assert!(b.evict_stale(Duration::from_secs(3600)).unwrap().is_empty());
    assert_eq!(b.prune().unwrap(), 2, "all but the newest row");
    let mut s2 = open_ok(&url);
    let batch = s2.fetch(&slow, 10).unwrap();
    match s2.ack(
        &slow,
        &batch.token,
        batch.changes.last().map_or(0, |c| c.id),
    ) {
        Err(BackendError::Evicted(m)) => assert!(m.contains("evicted"), "{m}"),
        other => panic!("an evicted consumer's ack must be refused: {other:?}"),
    }
    assert_eq!(
        b.register(&slow, &["users".to_string()], StartFrom::Now)
            .unwrap(),
        Registered::Evicted
    );
    assert!(!b.status().unwrap().consumers.iter().any(|c| c.evicted));

    // A handler that stops reading a table drops that table's cursor.
    b.register(&fast, &["users".to_string()], StartFrom::Oldest)
        .unwrap();
    let f = b
        .status()
        .unwrap()
        .consumers
        .into_iter()
        .find(|c| c.handler == "fast")
        .unwrap();
    assert_eq!(f.tables, ["users"]);

    // Dead letters, including text the server's 3-byte utf8 could not hold.
    conn.exec_drop("INSERT INTO users VALUES (9, ?)", ("🦀",))
        .unwrap();
    let got = collect(&mut b, &fast, 1, WAIT);
    let letter = DeadLetter::new(&fast, &got[0], "handler said 🦀 no", 3, 42);
    let id = b.add_dead_letter(&letter).unwrap();
    let mine = b
        .dead_letters(&DeadLetterQuery::Consumer(fast.clone()))
        .unwrap();
    assert_eq!(mine.len(), 1);
    assert_eq!(mine[0].id, id);
    assert_eq!(mine[0].error, "handler said 🦀 no");
    assert_eq!(mine[0].change().unwrap(), got[0]);
    assert!(b
        .dead_letters(&DeadLetterQuery::RetryRequested(fast.clone()))
        .unwrap()
        .is_empty());
    assert_eq!(
        b.update_dead_letters(&DeadLetterUpdate::RequestRetry(vec![id]))
            .unwrap(),
        1
    );
    assert_eq!(
        b.dead_letters(&DeadLetterQuery::RetryRequested(fast.clone()))
            .unwrap()
            .len(),
        1
    );
    let failed = DeadLetterUpdate::Failed {
        id,
        error: "again".into(),
        attempts: 4,
        failed_at_us: 43,
    };
    assert_eq!(b.update_dead_letters(&failed).unwrap(), 1);
    let again = b.dead_letters(&DeadLetterQuery::Ids(vec![id])).unwrap();
    assert_eq!(
        (
            again[0].attempts,
            again[0].retry_requested,
            again[0].error.as_str()
        ),
        (4, false, "again")
    );
    assert_eq!(
        b.status()
            .unwrap()
            .consumers
            .iter()
            .find(|c| c.handler == "fast")
            .unwrap()
            .dead_letters,
        1
    );
    assert_eq!(
        b.update_dead_letters(&DeadLetterUpdate::Delete(vec![id]))
            .unwrap(),
        1
    );
    assert!(b.dead_letters(&DeadLetterQuery::All).unwrap().is_empty());

    assert!(b.unregister(&slow).unwrap());
    assert!(!b.unregister(&slow).unwrap());
    b.uninstall().unwrap();
    assert_eq!(epidemic_objects(&mut conn), Vec::<String>::new());
    assert!(b.status().unwrap().consumers.is_empty());
}

#[test]
fn bad_urls_options_and_unreachable_servers_are_reported_without_the_password() {
    let port = epidemic_tests::free_port();
    match open(
        &format!("mysql://root:s3cret@127.0.0.1:{port}/x"),
        json!({}),
    ) {
        Err(BackendError::Connection(m)) => {
            assert!(
                !m.contains("s3cret") && m.contains("root:***@127.0.0.1"),
                "{m}"
            )
        }
        other => panic!("expected a connection error, got {:?}", other.err()),
    }
    let server = MySqlServer::shared();
    match open(&server.url("no_such_db"), json!({})) {
        Err(BackendError::Invalid(m)) => assert!(m.contains("no_such_db"), "{m}"),
        other => panic!("expected Invalid, got {:?}", other.err()),
    }
    let url = server.create_database("bad_options");
    match open(&url, json!({"poll_interval": 5})) {
        Err(BackendError::Invalid(m)) => assert!(m.contains("poll_interval"), "{m}"),
        other => panic!("expected Invalid, got {:?}", other.err()),
    }
    assert!(open(&url.replace("mysql://", "mariadb://"), json!({})).is_ok());
    let mut b = open_ok(&url);
    match b.fetch(&consumer("ghost"), 10) {
        Err(BackendError::Invalid(m)) => assert!(
            m.contains("not registered") || m.contains("doesn't exist"),
            "{m}"
        ),
        Err(e) => assert!(!e.is_connection(), "{e}"),
        Ok(_) => panic!("fetch for an unknown consumer succeeded"),
    }
}

/// Prints the drain rate of a backlog through fetch/ack (no assertion on it: timings
/// belong in `epidemic bench`). `EPIDEMIC_MYSQL_DRAIN_ROWS` sets the backlog size.
#[test]
fn drain_rate_of_a_backlog() {
    let rows: usize = std::env::var("EPIDEMIC_MYSQL_DRAIN_ROWS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    let (url, mut conn) = database("drain", ITEMS);
    let c = consumer("all");
    let mut b = install_and_register(&url, &[watch("items", &["k", "v", "n"])], &c);
    for chunk in (0..rows).collect::<Vec<_>>().chunks(1_000) {
        let values: Vec<String> = chunk
            .iter()
            .map(|i| format!("('k{i}', 'value {i}', {i})"))
            .collect();
        conn.query_drop(format!(
            "INSERT INTO items (k, v, n) VALUES {}",
            values.join(",")
        ))
        .unwrap();
    }
    let start = Instant::now();
    let mut n = 0;
    loop {
        let batch = b.fetch(&c, 500).unwrap();
        let Some(last) = batch.changes.last() else {
            break;
        };
        b.ack(&c, &batch.token, last.id).unwrap();
        n += batch.changes.len();
    }
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(n, rows);
    eprintln!(
        "mysql drain: {n} changes in {secs:.2} s = {:.0} changes/s (batch 500)",
        n as f64 / secs
    );
}

// Keys and stable ids (SDK 0.2).

/// Install records the key; a changed key is brought up to date like a growing column
/// set, while writers run, and nothing is lost across it.
#[test]
fn reinstall_with_another_key_loses_nothing_and_changes_carry_the_new_key() {
    let (url, mut conn) = database(
        "rekey",
        "CREATE TABLE accounts (id INT PRIMARY KEY, email VARCHAR(60) NOT NULL UNIQUE, quota INT)",
    );
    let c = consumer("all");
    let mut b = install_and_register(&url, &[watch("accounts", &["quota"])], &c);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (url, stop) = (url.clone(), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut conn = mysql::Conn::new(mysql::Opts::from_url(&url).unwrap()).unwrap();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) || n < 50 {
                n += 1;
                conn.exec_drop(
                    "INSERT INTO accounts VALUES (?, ?, ?)",
                    (n, format!("u{n}@example.org"), n),
                )
                .unwrap();
            }
            n
        })
    };
    wait_until(WAIT, || {
        conn.query_first::<i64, _>("SELECT COUNT(*) FROM accounts")
            .unwrap()
            .unwrap_or(0)
            >= 10
    });
    let rekeyed = Watch {
        key: vec!["email".into()],
        ..watch("accounts", &["quota"])
    };
    let plan = open_ok(&url)
        .install(std::slice::from_ref(&rekeyed))
        .unwrap();
    assert!(
        plan.iter().any(|s| s.contains("ADD COLUMN `old_email`")),
        "{plan:?}"
    );
    stop.store(true, Ordering::Relaxed);
    let written = writer.join().unwrap() as usize;
    let got = collect(&mut b, &c, written, WAIT);
    let mut ids: Vec<i64> = got
        .iter()
        .map(|c| c.value("id").and_then(Value::as_i64).unwrap())
        .collect();
    ids.sort();
    assert_eq!(
        ids,
        (1..=written as i64).collect::<Vec<_>>(),
        "every insert, once"
    );

    // A reader that reads the registry again (any reader after a restart) gets the new key.
    conn.query_drop("UPDATE accounts SET email = 'new@example.org' WHERE id = 1")
        .unwrap();
    let mut fresh = open_ok(&url);
    let got = collect(&mut fresh, &c, 1, WAIT);
    assert_eq!(&got[0].key_columns[..], ["email"]);
    assert_eq!(got[0].key, [Value::Text("new@example.org".into())]);
    assert_eq!(
        got[0].old_key,
        Some(vec![Value::Text("u1@example.org".into())])
    );
    assert_eq!(
        open_ok(&url).plan_install(&[rekeyed]).unwrap(),
        Vec::<String>::new(),
        "the key is recorded"
    );
}

/// A log table dropped by hand (and made again by the next install) under a running
/// reader: the new log's ids start again at 1, below the reader's cursor. The reader
/// must deliver them, under new stable ids, instead of skipping up to its old position.
#[test]
fn a_log_table_dropped_by_hand_and_made_again_loses_nothing_and_reuses_no_stable_id() {
    let (url, mut conn) = database("stable_dropped", ITEMS);
    let c = consumer("all");
    let w = [watch("items", &["v"])];
    let mut reader = install_and_register(&url, &w, &c);
    for i in 0..5 {
        conn.exec_drop(
            "INSERT INTO items (k, v) VALUES (?, 'x')",
            (format!("old{i}"),),
        )
        .unwrap();
    }
    let before = collect(&mut reader, &c, 5, WAIT);
    assert_eq!(before.len(), 5);
    assert_eq!(cursor(&mut conn, &c, "items").0, before[4].id);

    conn.query_drop("DROP TABLE epidemic_log_items").unwrap();
    // Another daemon's install (every daemon start runs one) makes it again.
    open_ok(&url).install(&w).unwrap();
    assert_eq!(
        cursor(&mut conn, &c, "items"),
        (0, String::new()),
        "the cursors start over in the new log"
    );
    conn.query_drop("INSERT INTO items (k, v) VALUES ('new0', 'y'), ('new1', 'y')")
        .unwrap();
    let after = collect(&mut reader, &c, 2, WAIT);
    assert_eq!(
        after.iter().map(|c| text(c.value("k"))).collect::<Vec<_>>(),
        ["new0", "new1"],
        "the reader with cursors of the old log must not skip the new one's first ids"
    );
    assert!(after[0].id <= before[4].id, "ids started again");
    for a in &after {
        assert!(before.iter().all(|b| b.stable_id != a.stable_id), "{a:?}");
    }
    assert_eq!(cursor(&mut conn, &c, "items").0, after[1].id);
}

/// A database installed by the version before keys and stable ids (a registry without
/// `key_columns`/`log_identity`, logs without the key's columns): `status` says so, the
/// next install brings it up to date in place, and the changes after it carry the key
/// and a stable id; the cursors keep their position.
#[test]
fn an_install_of_the_previous_version_is_brought_up_to_date() {
    let (url, mut conn) = database("upgrade", ITEMS);
    let c = consumer("all");
    let w = [watch("items", &["v"])];
    let mut reader = install_and_register(&url, &w, &c);
    conn.query_drop("INSERT INTO items (k, v) VALUES ('a', '1')")
        .unwrap();
    assert_eq!(collect(&mut reader, &c, 1, WAIT).len(), 1);
    for stmt in [
        "ALTER TABLE epidemic_watch DROP COLUMN key_columns, DROP COLUMN log_identity",
        "UPDATE epidemic_watch SET `columns` = 'v'",
        "ALTER TABLE epidemic_log_items DROP COLUMN old_k, DROP COLUMN new_k",
    ] {
        conn.query_drop(stmt).unwrap();
    }
    let status = open_ok(&url).status().unwrap();
    assert!(
        status.tables[0]
            .problems
            .iter()
            .any(|p| p.contains("installed by an older version")),
        "{:?}",
        status.tables[0].problems
    );
    let position = cursor(&mut conn, &c, "items");

    let plan = open_ok(&url).install(&w).unwrap();
    assert!(
        plan.iter()
            .any(|s| s.contains("ADD COLUMN `key_columns`") && s.contains("`log_identity`")),
        "{plan:?}"
    );
    assert_eq!(cursor(&mut conn, &c, "items"), position, "the log stays");
    conn.query_drop("INSERT INTO items (k, v) VALUES ('b', '2')")
        .unwrap();
    let got = collect(&mut reader, &c, 1, WAIT);
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0].key_columns[..], ["k"]);
    assert_eq!(got[0].key, [Value::Text("b".into())]);
    assert!(got[0].stable_id.ends_with(&format!("-{}", got[0].id)));
    assert!(open_ok(&url).status().unwrap().tables[0]
        .problems
        .is_empty());
}

/// A consumer of two tables: one with a stream of a hundred rows per read, one with a
/// backlog. MariaDB reads one table per fetch, in turn: a dense read of the stream that
/// was not full still leaves the backlog's table unread, so no read may linger
/// (`linger_ms`, a second here) before it. One wrong pause per round (its first step, a
/// quarter second, since the backlog's full reads end the streak) would make the drain
/// take 15 s or more (60 reads of 500).
#[test]
fn a_backlog_in_another_table_is_read_without_lingering() {
    let (url, mut conn) = database(
        "linger_backlog",
        "CREATE TABLE a (id INT PRIMARY KEY); CREATE TABLE b (id INT PRIMARY KEY)",
    );
    let c = consumer("h");
    install_and_register(&url, &[watch("a", &["id"]), watch("b", &["id"])], &c);
    let mut b = open(&url, json!({"linger_ms": 1000})).expect("open backend");
    conn.query_drop("SET SESSION max_recursive_iterations = 100000")
        .expect("allow a long series");
    conn.query_drop(
        "INSERT INTO b WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n \
         WHERE i < 30000) SELECT i FROM n",
    )
    .expect("the backlog");
    read_backlog_beside_a_stream(&mut b, &c, "b", 30_000, |next_a| {
        conn.query_drop(format!(
            "INSERT INTO a WITH RECURSIVE n(i) AS (SELECT {next_a} UNION ALL SELECT i + 1 \
             FROM n WHERE i < {}) SELECT i FROM n",
            next_a + 99
        ))
        .expect("the stream")
    });
}
