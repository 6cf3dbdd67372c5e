//! The MySQL backend's reading rule under server settings and workloads that used to
//! lose, invent or stall changes: a server whose default isolation is READ-UNCOMMITTED,
//! a user without the PROCESS privilege, an unrelated long transaction (what
//! `mysqldump --single-transaction` holds for hours), a long writer with many rollbacks,
//! and `auto_increment_increment > 1`. Each test has its own database; tests that need
//! server options of their own start a private server.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use epidemic_plugin_host::{load, HostBackend};
use epidemic_plugin_sdk::backend::{BackendError, Consumer, StartFrom, Watch};
use epidemic_plugin_sdk::{Change, Op};
use epidemic_tests::mysql::MySqlServer;
use epidemic_tests::reader::{text, BackendReader};
use epidemic_tests::rng::Rng;
use epidemic_tests::{backend_path, epidemic, recorded, recorder_handler, wait_until, Daemon};
use mysql::prelude::Queryable;
use serde_json::json;

/// The daemon's read loop on a connection of its own (see `epidemic_tests::reader`).
fn spawn_reader(url: &str, options: serde_json::Value, c: &Consumer) -> BackendReader {
    let url = url.to_owned();
    BackendReader::spawn(move || open(&url, options).expect("reader: open"), c)
}

const WAIT: Duration = Duration::from_secs(30);

const ITEMS: &str =
    "CREATE TABLE items (k VARCHAR(40) PRIMARY KEY, v VARCHAR(40), n INT) ENGINE=InnoDB";

fn open(url: &str, options: serde_json::Value) -> Result<HostBackend, BackendError> {
    let lib = load(&backend_path("mysql")).expect("load the mysql backend");
    lib.open_backend(url, &options)
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

/// A database on `server` with `schema` applied; returns (url, connection).
fn database(server: &MySqlServer, name: &str, schema: &str) -> (String, mysql::Conn) {
    let url = server.create_database(name);
    let mut conn = server.conn(name);
    for stmt in schema.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        conn.query_drop(stmt)
            .unwrap_or_else(|e| panic!("{stmt}: {e}"));
    }
    (url, conn)
}

/// Install and register from the oldest change.
fn install_and_register(url: &str, options: serde_json::Value, watches: &[Watch], c: &Consumer) {
    let mut b = open(url, options).expect("open backend");
    b.install(watches).expect("install");
    let tables: Vec<String> = watches.iter().map(|w| w.table.clone()).collect();
    b.register(c, &tables, StartFrom::Oldest).expect("register");
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

/// How many ranges a durable gap list holds (`3,5-9` is two).
fn gap_ranges(gaps: &str) -> usize {
    gaps.split(',').filter(|p| !p.trim().is_empty()).count()
}

/// One row change as the writer meant it and as the handler saw it: (op, key, value).
type Effect = (&'static str, String, String);

fn effect(c: &Change) -> Effect {
    (c.op.as_str(), text(c.value("k")), text(c.value("v")))
}

/// One writer: transactions of 1-3 statements on its own rows, one in `rollback_one_in`
/// rolled back. `session_sql` runs first on the writer's connection. Returns the
/// committed effects in commit order.
fn write_randomly(
    url: &str,
    w: usize,
    transactions: usize,
    rollback_one_in: u64,
    session_sql: &str,
) -> Vec<Effect> {
    let mut conn = mysql::Conn::new(mysql::Opts::from_url(url).unwrap()).unwrap();
    if !session_sql.is_empty() {
        conn.query_drop(session_sql).unwrap();
    }
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
                eprintln!("writer {w}: {e}; rolling back");
                failed = true;
                break;
            }
        }
        if failed || rng.below(rollback_one_in) == 0 {
            conn.query_drop("ROLLBACK").unwrap();
        } else {
            conn.query_drop("COMMIT").unwrap();
            committed.extend(effects);
            rows = after;
        }
    }
    committed
}

/// `writers` threads of [`write_randomly`]; all their committed effects.
fn write_concurrently(
    url: &str,
    writers: usize,
    transactions: usize,
    rollback_one_in: u64,
    session_sql: &'static str,
) -> Vec<Effect> {
    let handles: Vec<JoinHandle<Vec<Effect>>> = (0..writers)
        .map(|w| {
            let url = url.to_owned();
            std::thread::spawn(move || {
                write_randomly(&url, w, transactions, rollback_one_in, session_sql)
            })
        })
        .collect();
    handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect()
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
        .collect();
    assert!(
        out_of_order.is_empty(),
        "out of commit order: {out_of_order:?}"
    );
}

/// A daemon's files: its config (one recorder handler `rec` on `items`), the recorder's
/// output and the daemon's log.
struct DaemonFiles {
    _dir: tempfile::TempDir,
    config: PathBuf,
    out: PathBuf,
    log: PathBuf,
}

fn daemon_files(url: &str, database_extra: &str) -> DaemonFiles {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("rec.jsonl");
    let log = dir.path().join("daemon.log");
    let config = dir.path().join("epidemic.toml");
    let text = format!(
        "[database]\nurl = {url:?}\n{database_extra}\n[daemon]\nname = \"mx1\"\nprune_interval_ms = 100\n\n{}",
        recorder_handler("rec", &out, "items", &["k", "v"], "")
    );
    std::fs::write(&config, text).expect("write config");
    DaemonFiles {
        _dir: dir,
        config,
        out,
        log,
    }
}

/// Install, then start `epidemic run --from-oldest` and wait until it reads.
fn start_daemon(files: &DaemonFiles) -> Daemon {
    let out = epidemic(&files.config, &["install"]);
    assert!(
        out.status.success(),
        "install: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d = Daemon::start(&files.config, &files.log, &["--from-oldest"]);
    assert!(
        d.wait_for_log("new consumer", WAIT),
        "daemon did not start:\n{}",
        d.log_text()
    );
    d
}

fn recorded_keys(out: &Path) -> Vec<String> {
    recorded(out)
        .iter()
        .map(|l| {
            let image = if l["op"] == "DELETE" {
                &l["old"]
            } else {
                &l["new"]
            };
            image["k"].as_str().unwrap_or_default().to_owned()
        })
        .collect()
}

fn wait_key(out: &Path, key: &str) -> bool {
    wait_until(WAIT, || recorded_keys(out).iter().any(|k| k == key))
}

/// Item 9: a server whose default isolation is READ-UNCOMMITTED shows uncommitted log
/// rows to plain SELECTs; the backend sets its own session isolation, so a change that is
/// rolled back is never delivered while committed ones are.
#[test]
fn read_uncommitted_server_default_never_delivers_a_rolled_back_change() {
    let server = MySqlServer::start_new_with_args(&["--transaction-isolation=READ-UNCOMMITTED"]);
    let (url, mut conn) = database(&server, "dirty", ITEMS);
    let isolation: Option<String> = conn.query_first("SELECT @@GLOBAL.tx_isolation").unwrap();
    assert_eq!(isolation.as_deref(), Some("READ-UNCOMMITTED"));
    let files = daemon_files(&url, "");
    let mut daemon = start_daemon(&files);

    let mut ghost = server.conn("dirty");
    ghost.query_drop("START TRANSACTION").unwrap();
    ghost
        .query_drop("INSERT INTO items (k, v) VALUES ('ghost', 'g')")
        .unwrap();
    // A committed change after the open one's: once it is delivered the daemon has read
    // past the uncommitted row (a dirty read would have returned it in the same batch).
    conn.query_drop("INSERT INTO items (k, v) VALUES ('after', 'a')")
        .unwrap();
    assert!(wait_key(&files.out, "after"), "{}", daemon.log_text());
    ghost.query_drop("ROLLBACK").unwrap();
    conn.query_drop("INSERT INTO items (k, v) VALUES ('final', 'f')")
        .unwrap();
    assert!(wait_key(&files.out, "final"), "{}", daemon.log_text());
    daemon.kill();
    assert_eq!(
        recorded_keys(&files.out),
        vec!["after".to_owned(), "final".to_owned()],
        "a rolled-back change was delivered"
    );
}

/// A user with every privilege on its database but not PROCESS.
fn user_without_process(server: &MySqlServer, db: &str, user: &str) -> String {
    let mut root = server.conn("");
    root.query_drop(format!(
        "CREATE USER '{user}'@'%' IDENTIFIED BY 'pw-{user}'"
    ))
    .unwrap();
    root.query_drop(format!("GRANT ALL ON `{db}`.* TO '{user}'@'%'"))
        .unwrap();
    format!("mysql://{user}:pw-{user}@127.0.0.1:{}/{db}", server.port())
}

/// Item 7: without PROCESS, INNODB_TRX is unreadable; `status` and the daemon's log say
/// what that costs and the exact GRANT that fixes it.
#[test]
fn without_process_status_and_daemon_log_name_the_grant() {
    let server = MySqlServer::shared();
    let (_, _conn) = database(server, "noproc_warn", ITEMS);
    let url = user_without_process(server, "noproc_warn", "noproc_warn");
    let files = daemon_files(&url, "");
    let daemon = start_daemon(&files);
    let grant = "GRANT PROCESS ON *.* TO 'noproc_warn'@'%'";
    assert!(
        daemon.wait_for_log(grant, WAIT),
        "no warning in the daemon's log:\n{}",
        daemon.log_text()
    );
    let warn_line = daemon
        .log_text()
        .lines()
        .find(|l| l.contains(grant))
        .unwrap_or_default()
        .to_owned();
    assert!(warn_line.contains("WARN"), "{warn_line}");
    assert!(warn_line.contains("gap_timeout_ms"), "{warn_line}");
    assert!(!warn_line.contains("pw-noproc_warn"), "{warn_line}");
    let status = epidemic(&files.config, &["status"]);
    let stdout = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{stdout}");
    assert!(
        stdout.contains("warnings:") && stdout.contains(grant),
        "status:\n{stdout}"
    );

    // With PROCESS granted there is nothing to warn about.
    server
        .conn("")
        .query_drop("GRANT PROCESS ON *.* TO 'noproc_warn'@'%'")
        .unwrap();
    let status = epidemic(&files.config, &["status"]);
    let stdout = String::from_utf8_lossy(&status.stdout);
    assert!(!stdout.contains("GRANT PROCESS"), "status:\n{stdout}");
}

/// Item 7, lossless fallback: without PROCESS a gap past `gap_timeout_ms` is dropped only
/// when a READ UNCOMMITTED read does not find its row either, so a transaction that wrote
/// its change and stays open much longer than the timeout is still delivered at commit,
/// while a rolled-back one is forgotten.
#[test]
fn without_process_a_transaction_open_past_the_gap_timeout_is_still_delivered() {
    let server = MySqlServer::shared();
    let (_, mut conn) = database(server, "noproc_long", ITEMS);
    let url = user_without_process(server, "noproc_long", "noproc_long");
    let files = daemon_files(&url, "gap_timeout_ms = 1000\ngap_check_ms = 100");
    let daemon = start_daemon(&files);
    let c = consumer("rec");

    let mut long = server.conn("noproc_long");
    long.query_drop("START TRANSACTION").unwrap();
    long.query_drop("INSERT INTO items (k, v) VALUES ('long', 'l')")
        .unwrap();
    let opened = Instant::now();
    conn.query_drop("INSERT INTO items (k, v) VALUES ('x1', 'x')")
        .unwrap();
    assert!(wait_key(&files.out, "x1"), "{}", daemon.log_text());
    let mut ghost = server.conn("noproc_long");
    ghost.query_drop("START TRANSACTION").unwrap();
    ghost
        .query_drop("INSERT INTO items (k, v) VALUES ('ghost', 'g')")
        .unwrap();
    conn.query_drop("INSERT INTO items (k, v) VALUES ('x2', 'x')")
        .unwrap();
    assert!(wait_key(&files.out, "x2"), "{}", daemon.log_text());
    assert!(
        wait_until(WAIT, || gap_ranges(&cursor(&mut conn, &c, "items").1) == 2),
        "both open transactions' ids must be durable gaps: {:?}",
        cursor(&mut conn, &c, "items")
    );
    ghost.query_drop("ROLLBACK").unwrap();
    // The rolled-back id goes once the timeout passed; the open one stays.
    assert!(
        wait_until(WAIT, || gap_ranges(&cursor(&mut conn, &c, "items").1) == 1),
        "the rolled-back id was never forgotten: {:?}",
        cursor(&mut conn, &c, "items")
    );
    // Hold the transaction open for five gap timeouts in all.
    std::thread::sleep(Duration::from_secs(5).saturating_sub(opened.elapsed()));
    long.query_drop("COMMIT").unwrap();
    assert!(
        wait_key(&files.out, "long"),
        "a transaction open past gap_timeout_ms was lost:\n{}",
        daemon.log_text()
    );
    assert!(!recorded_keys(&files.out).contains(&"ghost".to_owned()));
    assert!(wait_until(WAIT, || cursor(&mut conn, &c, "items")
        .1
        .is_empty()));
}

/// Item 16: transactions that wrote nothing (a `START TRANSACTION WITH CONSISTENT
/// SNAPSHOT` as mysqldump --single-transaction holds, a long read-only SELECT
/// transaction) can fill no gap. While they stay open, 2000+ changes with rollbacks are
/// delivered promptly and the rollbacks' gaps are proven dead, even with a gap re-read
/// limit far below the number of rollbacks.
#[test]
fn an_unrelated_consistent_snapshot_neither_stalls_delivery_nor_keeps_gaps() {
    let server = MySqlServer::shared();
    let (url, mut conn) = database(server, "snapshot", ITEMS);
    let c = consumer("all");
    let options = json!({"max_gap_ranges": 20});
    install_and_register(&url, options.clone(), &[watch("items", &["k", "v"])], &c);
    let reader = spawn_reader(&url, options, &c);
    let mut dump = server.conn("snapshot");
    dump.query_drop("START TRANSACTION WITH CONSISTENT SNAPSHOT")
        .unwrap();
    let _: Vec<i64> = dump.query("SELECT COUNT(*) FROM items").unwrap();
    let mut report = server.conn("snapshot");
    report.query_drop("START TRANSACTION").unwrap();
    let _: Vec<i64> = report.query("SELECT COUNT(*) FROM items").unwrap();

    let committed = write_concurrently(&url, 6, 300, 8, "");
    assert!(committed.len() > 2000, "only {} changes", committed.len());
    conn.query_drop("INSERT INTO items (k, v) VALUES ('marker', 'm')")
        .unwrap();
    assert!(
        wait_until(WAIT, || reader.has("k", "marker")),
        "delivery stalled behind an unrelated snapshot: {} of {} delivered, cursor {:?}",
        reader.delivered().len(),
        committed.len(),
        cursor(&mut conn, &c, "items")
    );
    assert!(
        wait_until(WAIT, || cursor(&mut conn, &c, "items").1.is_empty()),
        "rolled-back ids kept alive by transactions that wrote nothing: {:?}",
        cursor(&mut conn, &c, "items")
    );
    // Both are still open: nothing above depended on their end.
    let open: Option<i64> = dump.query_first("SELECT COUNT(*) FROM items").unwrap();
    assert!(open.is_some());
    report.query_drop("COMMIT").unwrap();
    dump.query_drop("COMMIT").unwrap();
    let delivered: Vec<Effect> = reader
        .stop()
        .iter()
        .map(effect)
        .filter(|e| e.1 != "marker")
        .collect();
    assert_exactly_committed(&committed, &delivered);
}

/// Item 16: a long transaction that did write (to another table) may hold any gap, so
/// rolled-back ids pile up past `max_gap_ranges`; new changes are still delivered, status
/// says why gaps pile up, and once it ends everything is exact.
#[test]
fn past_the_gap_reread_limit_new_changes_still_flow_and_nothing_is_lost() {
    // A server of its own: the open writer would keep other tests' gaps alive too.
    let server = &MySqlServer::start_new();
    let (url, mut conn) = database(
        server,
        "gap_pileup",
        &format!("{ITEMS}; CREATE TABLE other (x INT) ENGINE=InnoDB"),
    );
    let c = consumer("all");
    let options = json!({"max_gap_ranges": 20});
    install_and_register(&url, options.clone(), &[watch("items", &["k", "v"])], &c);
    let reader = spawn_reader(&url, options.clone(), &c);
    let mut writer = server.conn("gap_pileup");
    writer.query_drop("START TRANSACTION").unwrap();
    writer.query_drop("INSERT INTO other VALUES (1)").unwrap();

    let committed = write_concurrently(&url, 6, 200, 8, "");
    conn.query_drop("INSERT INTO items (k, v) VALUES ('marker', 'm')")
        .unwrap();
    assert!(
        wait_until(WAIT, || reader.has("k", "marker")),
        "new changes must not wait for gaps: cursor {:?}",
        cursor(&mut conn, &c, "items")
    );
    let gaps = gap_ranges(&cursor(&mut conn, &c, "items").1);
    assert!(gaps > 20, "rolled-back ids did not pile up: {gaps} ranges");
    let status = open(&url, options).unwrap().status().unwrap();
    assert!(
        status
            .warnings
            .iter()
            .any(|w| w.contains("max_gap_ranges") && w.contains("mx1/all")),
        "{:?}",
        status.warnings
    );
    writer.query_drop("COMMIT").unwrap();
    assert!(
        wait_until(WAIT, || cursor(&mut conn, &c, "items").1.is_empty()),
        "gaps not proven dead after the writer ended: {:?}",
        cursor(&mut conn, &c, "items")
    );
    let delivered: Vec<Effect> = reader
        .stop()
        .iter()
        .map(effect)
        .filter(|e| e.1 != "marker")
        .collect();
    assert_exactly_committed(&committed, &delivered);
}

/// Item 16: with `auto_increment_increment = 3` (what Galera sets to the cluster size) the
/// ids a server never hands out are not gaps: even while a writer transaction is open
/// (which keeps real gaps alive) no gap is tracked.
#[test]
fn auto_increment_increment_leaves_no_gaps() {
    let server = MySqlServer::start_new_with_args(&[
        "--auto-increment-increment=3",
        "--auto-increment-offset=2",
    ]);
    let (url, mut conn) = database(
        &server,
        "increment",
        &format!("{ITEMS}; CREATE TABLE other (x INT) ENGINE=InnoDB"),
    );
    let c = consumer("all");
    install_and_register(&url, json!({}), &[watch("items", &["k", "v"])], &c);
    let reader = spawn_reader(&url, json!({}), &c);
    let mut writer = server.conn("increment");
    writer.query_drop("START TRANSACTION").unwrap();
    writer.query_drop("INSERT INTO other VALUES (1)").unwrap();

    let writers = {
        let url = url.clone();
        std::thread::spawn(move || write_concurrently(&url, 4, 150, u64::MAX, ""))
    };
    // The durable gaps while the writers run: only ids of transactions in flight (a few
    // per writer), never one per row.
    let mut most = 0;
    while !writers.is_finished() {
        most = most.max(gap_ranges(&cursor(&mut conn, &c, "items").1));
        std::thread::sleep(Duration::from_millis(20));
    }
    let committed = writers.join().unwrap();
    conn.query_drop("INSERT INTO items (k, v) VALUES ('marker', 'm')")
        .unwrap();
    assert!(wait_until(WAIT, || reader.has("k", "marker")));
    let ids: Vec<i64> = conn.query("SELECT id FROM epidemic_log_items").unwrap();
    assert!(ids.iter().all(|id| id % 3 == 2), "{:?}", &ids[..5]);
    assert!(
        most <= 16,
        "holes the server never fills were tracked as gaps: up to {most} ranges"
    );
    assert!(
        wait_until(WAIT, || cursor(&mut conn, &c, "items").1.is_empty()),
        "gaps left while a writer is open: {:?}",
        cursor(&mut conn, &c, "items")
    );
    writer.query_drop("COMMIT").unwrap();
    let delivered: Vec<Effect> = reader
        .stop()
        .iter()
        .map(effect)
        .filter(|e| e.1 != "marker")
        .collect();
    assert_exactly_committed(&committed, &delivered);
}

/// Item 16: writers that set `auto_increment_increment` for their session only leave
/// holes the backend cannot tell from rolled-back ids; they are tracked as gaps, proven
/// dead, and everything is delivered.
#[test]
fn session_auto_increment_increment_is_delivered_exactly() {
    let server = MySqlServer::shared();
    let (url, mut conn) = database(server, "session_increment", ITEMS);
    let c = consumer("all");
    install_and_register(&url, json!({}), &[watch("items", &["k", "v"])], &c);
    let reader = spawn_reader(&url, json!({}), &c);
    let committed =
        write_concurrently(&url, 4, 150, 10, "SET SESSION auto_increment_increment = 3");
    conn.query_drop("INSERT INTO items (k, v) VALUES ('marker', 'm')")
        .unwrap();
    assert!(wait_until(WAIT, || reader.has("k", "marker")));
    assert!(
        wait_until(WAIT, || cursor(&mut conn, &c, "items").1.is_empty()),
        "{:?}",
        cursor(&mut conn, &c, "items")
    );
    let delivered: Vec<Effect> = reader
        .stop()
        .iter()
        .map(effect)
        .filter(|e| e.1 != "marker")
        .collect();
    assert_exactly_committed(&committed, &delivered);
}

/// Item 19: a Galera node (here a real one-node cluster) judges gaps by its own
/// INNODB_TRX only, so the backend refuses it with one line unless `allow_galera = true`
/// accepts the risk, which `status` and the daemon's log then repeat.
#[test]
fn a_galera_node_is_refused_unless_the_risk_is_accepted() {
    let provider = Path::new("/usr/lib/galera/libgalera_smm.so");
    assert!(
        provider.exists(),
        "{} is missing: install galera-4 (a dependency of mariadb-server)",
        provider.display()
    );
    let (group, ist) = (epidemic_tests::free_port(), epidemic_tests::free_port());
    let server = MySqlServer::start_new_with_args(&[
        "--wsrep-on=ON",
        &format!("--wsrep-provider={}", provider.display()),
        "--wsrep-cluster-address=gcomm://",
        &format!("--wsrep-node-address=127.0.0.1:{group}"),
        &format!(
            "--wsrep-provider-options=gmcast.listen_addr=tcp://127.0.0.1:{group};ist.recv_addr=127.0.0.1:{ist}"
        ),
        "--binlog-format=ROW",
        "--innodb-autoinc-lock-mode=2",
    ]);
    let (url, mut conn) = database(&server, "galera", ITEMS);
    let on: Option<(String, String)> = conn
        .query_first("SHOW GLOBAL VARIABLES LIKE 'wsrep_on'")
        .unwrap();
    assert_eq!(on.map(|(_, v)| v).as_deref(), Some("ON"));

    let refused = open(&url, json!({}))
        .err()
        .expect("a Galera node must be refused");
    let msg = refused.to_string();
    assert!(
        msg.contains("Galera") && msg.contains("allow_galera = true") && !msg.contains('\n'),
        "{msg}"
    );
    let files = daemon_files(&url, "");
    let out = epidemic(&files.config, &["install"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("Galera"),
        "{stderr}"
    );
    let tables: Vec<String> = conn.query("SHOW TABLES").unwrap();
    assert_eq!(tables, vec!["items".to_owned()], "nothing may be installed");

    let files = daemon_files(&url, "allow_galera = true");
    let daemon = start_daemon(&files);
    assert!(
        daemon.wait_for_log("allow_galera = true on a Galera node", WAIT),
        "{}",
        daemon.log_text()
    );
    conn.query_drop("INSERT INTO items (k, v) VALUES ('one', '1')")
        .unwrap();
    assert!(wait_key(&files.out, "one"), "{}", daemon.log_text());
    let status = epidemic(&files.config, &["status"]);
    let stdout = String::from_utf8_lossy(&status.stdout);
    assert!(stdout.contains("allow_galera = true"), "{stdout}");
}
