//! The PostgreSQL backend against a real PostgreSQL 15, driven through the built `.so`
//! exactly as the host drives it (`host::load` + `HostBackend`). Each test has its own
//! database on the binary's shared server; the outage test has a server of its own.
//!
//! Build the library first: `cargo build -p epidemic-backend-postgres`.

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use epidemic_plugin_host::{self as host, HostBackend, Library};
use epidemic_plugin_sdk::backend::{
    BackendError, ChunkRequest, Consumer, ConsumerStatus, DeadLetter, DeadLetterQuery, Registered,
    Scratch, StartFrom, Status, TableStatus, Watch, SCRATCH_TABLE,
};
use epidemic_plugin_sdk::{Change, Op, Origin, Value};
use epidemic_tests::pg::{wait_for_server, PgServer, StopMode};
use epidemic_tests::{backend_path, epidemic, wait_until};
use serde_json::json;

fn library() -> &'static Library {
    static LIB: OnceLock<Library> = OnceLock::new();
    LIB.get_or_init(|| {
        let lib = host::load(&backend_path("postgres")).expect("load the postgres backend");
        lib.expect_backend().expect("a backend library");
        lib
    })
}

fn open(url: &str) -> HostBackend {
    open_with(url, json!({}))
}

fn open_with(url: &str, options: serde_json::Value) -> HostBackend {
    library().open_backend(url, &options).expect("open backend")
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

/// A fresh database with `schema` applied; returns its URL and name.
fn database(name: &str, schema: &str) -> (String, String) {
    let server = PgServer::shared();
    let url = server.create_database(name);
    server
        .client(name)
        .batch_execute(schema)
        .expect("apply schema");
    (url, name.to_owned())
}

/// Install `watches` and register consumer `handler` reading from the oldest change.
fn setup(url: &str, watches: &[Watch], handler: &str) -> (HostBackend, Consumer) {
    let mut b = open(url);
    b.install(watches).expect("install");
    let c = consumer(handler);
    let tables: Vec<String> = watches.iter().map(|w| w.table.clone()).collect();
    assert_eq!(
        b.register(&c, &tables, StartFrom::Oldest)
            .expect("register"),
        Registered::New
    );
    (b, c)
}

/// Fetch and fully ack until a fetch comes back empty.
fn drain(b: &mut HostBackend, c: &Consumer, max: u32) -> Vec<Change> {
    let mut all = Vec::new();
    loop {
        let batch = b.fetch(c, max).expect("fetch");
        let Some(last) = batch.changes.last() else {
            return all;
        };
        b.ack(c, &batch.token, last.id).expect("ack");
        all.extend(batch.changes);
    }
}

/// Keep draining until `n` changes have arrived or `timeout` passes.
fn drain_until(b: &mut HostBackend, c: &Consumer, n: usize, timeout: Duration) -> Vec<Change> {
    let mut all = Vec::new();
    wait_until(timeout, || {
        all.extend(drain(b, c, 500));
        all.len() >= n
    });
    all
}

fn int(v: Option<&Value>) -> i64 {
    match v {
        Some(Value::Int(i)) => *i,
        other => panic!("expected an integer, got {other:?}"),
    }
}

fn text(v: Option<&Value>) -> String {
    match v {
        Some(Value::Text(s)) => s.clone(),
        other => panic!("expected text, got {other:?}"),
    }
}

fn schema_exists(db: &str, schema: &str) -> bool {
    PgServer::shared()
        .client(db)
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
            &[&schema],
        )
        .expect("query")
        .get(0)
}

/// A small xorshift generator: the tests need cheap, different-per-thread randomness,
/// not quality.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        Rng((seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ t) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform-ish in `0..n`.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

// ---------------------------------------------------------------------------------------
// Reading: concurrency, long transactions, outages, crashes between ack and fetch
// ---------------------------------------------------------------------------------------

/// What a change says about the `items` table: (op, writer, seq, note).
type ItemKey = (Op, i64, i64, String);

fn item_key(c: &Change) -> ItemKey {
    (
        c.op,
        int(c.value("writer")),
        int(c.value("seq")),
        text(c.value("note")),
    )
}

#[test]
fn concurrent_writers_with_rollbacks_deliver_exactly_the_committed_changes() {
    const WRITERS: u64 = 16;
    const TXNS: u64 = 1500;
    let (url, db) = database(
        "concurrent_writers",
        "CREATE TABLE items (id bigserial PRIMARY KEY, writer int NOT NULL, seq int NOT NULL, note text NOT NULL);
         CREATE UNIQUE INDEX ON items (writer, seq);",
    );
    let (reader_backend, c) = setup(&url, &[watch("items", &["writer", "seq", "note"])], "h");

    let committed: Arc<Mutex<Vec<ItemKey>>> = Arc::default();
    let delivered: Arc<Mutex<Vec<ItemKey>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));

    // The reader acks a random prefix of each batch, so batches are continued across
    // fetches while writers keep committing.
    let reader = {
        let delivered = delivered.clone();
        let stop = stop.clone();
        let c = c.clone();
        let mut b = reader_backend;
        thread::spawn(move || {
            let mut rng = Rng::new(99);
            while !stop.load(Ordering::SeqCst) {
                let batch = b.fetch(&c, 500).expect("fetch");
                if batch.changes.is_empty() {
                    b.wait(Duration::from_millis(200)).expect("wait");
                    continue;
                }
                let k = 1 + rng.below(batch.changes.len() as u64) as usize;
                let handled = &batch.changes[..k];
                delivered
                    .lock()
                    .unwrap()
                    .extend(handled.iter().map(item_key));
                b.ack(&c, &batch.token, handled[k - 1].id).expect("ack");
            }
            b
        })
    };

    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let committed = committed.clone();
            let server = PgServer::shared();
            let db = db.clone();
            thread::spawn(move || {
                let mut client = server.client(&db);
                let mut rng = Rng::new(w);
                let w = w as i64;
                let mut last_committed: Option<i64> = None;
                for i in 0..TXNS as i64 {
                    let mut tx = client.transaction().expect("begin");
                    let mut changes = vec![(Op::Insert, w, i, "new".to_owned())];
                    tx.execute(
                        "INSERT INTO items (writer, seq, note) VALUES ($1, $2, 'new')",
                        &[&(w as i32), &(i as i32)],
                    )
                    .expect("insert");
                    // Sometimes also update this writer's previous row.
                    if let Some(prev) = last_committed.filter(|_| rng.below(3) == 0) {
                        let note = format!("updated by {i}");
                        tx.execute(
                            "UPDATE items SET note = $3 WHERE writer = $1 AND seq = $2",
                            &[&(w as i32), &(prev as i32), &note],
                        )
                        .expect("update");
                        changes.push((Op::Update, w, prev, note));
                    }
                    thread::sleep(Duration::from_micros(rng.below(4000)));
                    if rng.below(10) == 0 {
                        tx.rollback().expect("rollback");
                    } else {
                        tx.commit().expect("commit");
                        last_committed = Some(i);
                        committed.lock().unwrap().extend(changes);
                    }
                }
            })
        })
        .collect();
    for w in writers {
        w.join().expect("writer thread");
    }

    let expected: HashSet<_> = committed.lock().unwrap().iter().cloned().collect();
    assert!(
        expected.len() > 15_000,
        "{} committed changes",
        expected.len()
    );
    let all_arrived = wait_until(Duration::from_secs(60), || {
        delivered.lock().unwrap().len() >= expected.len()
    });
    stop.store(true, Ordering::SeqCst);
    let mut b = reader.join().expect("reader thread");
    assert!(
        all_arrived,
        "only {} of {} changes delivered",
        delivered.lock().unwrap().len(),
        expected.len()
    );
    // Nothing more is pending.
    assert!(drain(&mut b, &c, 500).is_empty());

    let delivered = delivered.lock().unwrap();
    let got: HashSet<_> = delivered.iter().cloned().collect();
    assert_eq!(
        got.len(),
        delivered.len(),
        "some changes were delivered twice"
    );
    let missing: Vec<_> = expected.difference(&got).take(5).collect();
    let extra: Vec<_> = got.difference(&expected).take(5).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {missing:?}, extra (rolled back?) {extra:?}"
    );
}

#[test]
fn a_long_open_transaction_does_not_hold_back_other_commits() {
    let (url, db) = database(
        "long_transaction",
        "CREATE TABLE t (id serial PRIMARY KEY, v text)",
    );
    let (mut b, c) = setup(&url, &[watch("t", &["v"])], "h");
    let server = PgServer::shared();

    // The long transaction holds an xid (it wrote a watched row) and stays open.
    let mut long = server.client(&db);
    long.batch_execute("BEGIN; INSERT INTO t (v) VALUES ('long')")
        .expect("open long transaction");

    let mut writer = server.client(&db);
    let mut delivered: Vec<String> = Vec::new();
    for round in 0..3 {
        for i in 0..5 {
            writer
                .execute("INSERT INTO t (v) VALUES ($1)", &[&format!("r{round}-{i}")])
                .expect("insert");
        }
        let got = drain_until(&mut b, &c, 5, Duration::from_secs(10));
        let values: Vec<String> = got.iter().map(|ch| text(ch.value("v"))).collect();
        assert_eq!(
            values,
            (0..5).map(|i| format!("r{round}-{i}")).collect::<Vec<_>>(),
            "round {round}: commits after the long transaction began must be delivered while it is open"
        );
        delivered.extend(values);
    }

    long.batch_execute("COMMIT")
        .expect("commit long transaction");
    let got = drain_until(&mut b, &c, 1, Duration::from_secs(10));
    let values: Vec<String> = got.iter().map(|ch| text(ch.value("v"))).collect();
    assert_eq!(
        values,
        vec!["long".to_owned()],
        "the long transaction's change comes once it commits"
    );
    assert!(drain(&mut b, &c, 500).is_empty());
}

#[test]
fn a_server_crash_mid_stream_loses_nothing() {
    let server = PgServer::start_private();
    let url = server.create_database("outage");
    server
        .client("outage")
        .batch_execute("CREATE TABLE t (id serial PRIMARY KEY, seq int NOT NULL)")
        .expect("schema");
    let (reader_backend, c) = setup(&url, &[watch("t", &["seq"])], "h");
    let server = Arc::new(server);

    let committed: Arc<Mutex<BTreeSet<i64>>> = Arc::default();
    // Commits whose outcome is unknown: the connection broke during COMMIT.
    let uncertain: Arc<Mutex<BTreeSet<i64>>> = Arc::default();
    let delivered: Arc<Mutex<Vec<i64>>> = Arc::default();
    let connection_errors = Arc::new(AtomicUsize::new(0));
    let stop_writer = Arc::new(AtomicBool::new(false));
    let stop_reader = Arc::new(AtomicBool::new(false));

    let writer = {
        let (server, committed, uncertain, stop) = (
            server.clone(),
            committed.clone(),
            uncertain.clone(),
            stop_writer.clone(),
        );
        thread::spawn(move || {
            let mut client: Option<postgres::Client> = None;
            let mut seq = 0i64;
            while !stop.load(Ordering::SeqCst) {
                let Some(conn) = client.as_mut() else {
                    match postgres::Client::connect(&server.url("outage"), postgres::NoTls) {
                        Ok(conn) => client = Some(conn),
                        // Back off while the server is down.
                        Err(_) => thread::sleep(Duration::from_millis(50)),
                    }
                    continue;
                };
                seq += 1;
                let result = conn
                    .transaction()
                    .and_then(|mut tx| {
                        tx.execute("INSERT INTO t (seq) VALUES ($1)", &[&(seq as i32)])?;
                        Ok(tx)
                    })
                    .map_err(|e| (e, false))
                    .and_then(|tx| tx.commit().map_err(|e| (e, true)));
                match result {
                    Ok(()) => {
                        committed.lock().unwrap().insert(seq);
                    }
                    Err((_, during_commit)) => {
                        if during_commit {
                            uncertain.lock().unwrap().insert(seq);
                        }
                        client = None;
                    }
                }
            }
        })
    };

    let reader = {
        let (delivered, errors, stop, c) = (
            delivered.clone(),
            connection_errors.clone(),
            stop_reader.clone(),
            c.clone(),
        );
        let mut b = reader_backend;
        thread::spawn(move || {
            let mut backoff = Duration::from_millis(20);
            let failure = |e: BackendError, b: &mut HostBackend, backoff: &mut Duration| {
                assert!(
                    e.is_connection(),
                    "only connection errors are expected, got {e:?}"
                );
                errors.fetch_add(1, Ordering::SeqCst);
                thread::sleep(*backoff);
                *backoff = (*backoff * 2).min(Duration::from_millis(500));
                let _ = b.reconnect();
            };
            while !stop.load(Ordering::SeqCst) {
                let batch = match b.fetch(&c, 200) {
                    Ok(batch) => batch,
                    Err(e) => {
                        failure(e, &mut b, &mut backoff);
                        continue;
                    }
                };
                backoff = Duration::from_millis(20);
                let Some(last) = batch.changes.last() else {
                    if let Err(e) = b.wait(Duration::from_millis(100)) {
                        failure(e, &mut b, &mut backoff);
                    }
                    continue;
                };
                let seqs: Vec<i64> = batch
                    .changes
                    .iter()
                    .map(|ch| int(ch.value("seq")))
                    .collect();
                delivered.lock().unwrap().extend(seqs);
                if let Err(e) = b.ack(&c, &batch.token, last.id) {
                    failure(e, &mut b, &mut backoff);
                }
            }
        })
    };

    assert!(wait_until(Duration::from_secs(30), || delivered
        .lock()
        .unwrap()
        .len()
        >= 300));
    server.stop(StopMode::Immediate);
    assert!(
        wait_until(Duration::from_secs(10), || connection_errors
            .load(Ordering::SeqCst)
            > 0),
        "the reader should see the connection go"
    );
    server.start();
    assert!(wait_for_server(&server, "outage", Duration::from_secs(30)));
    let after_restart = committed.lock().unwrap().len();
    assert!(
        wait_until(Duration::from_secs(30), || committed.lock().unwrap().len()
            >= after_restart + 300),
        "writes resume after the restart"
    );
    stop_writer.store(true, Ordering::SeqCst);
    writer.join().expect("writer thread");

    let committed = committed.lock().unwrap().clone();
    let uncertain = uncertain.lock().unwrap().clone();
    let caught_up = wait_until(Duration::from_secs(60), || {
        let got: BTreeSet<i64> = delivered.lock().unwrap().iter().copied().collect();
        committed.is_subset(&got)
    });
    stop_reader.store(true, Ordering::SeqCst);
    reader.join().expect("reader thread");

    let got: BTreeSet<i64> = delivered.lock().unwrap().iter().copied().collect();
    let missing: Vec<_> = committed.difference(&got).take(10).collect();
    assert!(
        caught_up && missing.is_empty(),
        "lost committed changes: {missing:?}"
    );
    let extra: Vec<_> = got
        .difference(&committed)
        .filter(|s| !uncertain.contains(s))
        .collect();
    assert!(
        extra.is_empty(),
        "delivered changes that never committed: {extra:?}"
    );
    assert!(connection_errors.load(Ordering::SeqCst) > 0);
}

#[test]
fn changes_across_tables_come_in_id_order_with_each_tables_name() {
    let (url, db) = database(
        "two_tables",
        "CREATE SCHEMA app;
         CREATE TABLE a (id int PRIMARY KEY);
         CREATE TABLE app.b (id int PRIMARY KEY, label text);",
    );
    let mut b = open(&url);
    b.install(&[watch("a", &["id"]), watch("app.b", &["id", "label"])])
        .expect("install");
    let c = consumer("h");
    b.register(&c, &["a".into(), "app.b".into()], StartFrom::Now)
        .expect("register");
    let mut w = PgServer::shared().client(&db);
    w.batch_execute(
        "BEGIN; INSERT INTO a VALUES (1); INSERT INTO app.b VALUES (1, 'x'); INSERT INTO a VALUES (2); COMMIT;
         INSERT INTO app.b VALUES (2, 'y');",
    )
    .expect("writes");
    let got = drain_until(&mut b, &c, 4, Duration::from_secs(10));
    let seen: Vec<(String, i64)> = got
        .iter()
        .map(|ch| (ch.table.clone(), int(ch.value("id"))))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("a".into(), 1),
            ("app.b".into(), 1),
            ("a".into(), 2),
            ("app.b".into(), 2)
        ]
    );
    assert!(got.windows(2).all(|p| p[0].id < p[1].id));
    assert_eq!(&*got[1].columns, &["id".to_owned(), "label".to_owned()]);
}

#[test]
fn start_now_skips_earlier_changes_and_oldest_reads_them() {
    let (url, db) = database("start_from", "CREATE TABLE t (id int PRIMARY KEY)");
    let mut b = open(&url);
    b.install(&[watch("t", &["id"])]).expect("install");
    let mut w = PgServer::shared().client(&db);
    w.execute("INSERT INTO t VALUES (1)", &[]).expect("insert");
    let (now, oldest) = (consumer("now"), consumer("oldest"));
    assert_eq!(
        b.register(&now, &["t".into()], StartFrom::Now).unwrap(),
        Registered::New
    );
    assert_eq!(
        b.register(&oldest, &["t".into()], StartFrom::Oldest)
            .unwrap(),
        Registered::New
    );
    // Registering again keeps the cursor.
    assert_eq!(
        b.register(&now, &["t".into()], StartFrom::Oldest).unwrap(),
        Registered::Existing
    );
    w.execute("INSERT INTO t VALUES (2)", &[]).expect("insert");
    let ids = |v: Vec<Change>| v.iter().map(|ch| int(ch.value("id"))).collect::<Vec<_>>();
    assert_eq!(ids(drain(&mut b, &now, 10)), vec![2]);
    assert_eq!(ids(drain(&mut b, &oldest, 10)), vec![1, 2]);
    let err = b.fetch(&consumer("nobody"), 10).expect_err("unregistered");
    assert!(
        matches!(err, BackendError::Evicted(ref m) if m.contains("nobody")),
        "{err:?}"
    );
    let err = b
        .register(&consumer("y"), &[], StartFrom::Now)
        .expect_err("no tables");
    assert!(matches!(err, BackendError::Invalid(_)), "{err:?}");
    let err = b
        .register(&consumer("x"), &["u".into()], StartFrom::Now)
        .expect_err("not installed");
    assert!(
        matches!(err, BackendError::Invalid(ref m) if m.contains('u')),
        "{err:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Waiting
// ---------------------------------------------------------------------------------------

#[test]
fn wait_wakes_on_a_commit_and_times_out_without_one() {
    let (url, db) = database("wait_notify", "CREATE TABLE t (id int PRIMARY KEY)");
    let (mut b, c) = setup(&url, &[watch("t", &["id"])], "h");
    assert!(drain(&mut b, &c, 10).is_empty());
    // The first wait starts listening and asks for a read at once.
    assert!(b.wait(Duration::from_secs(30)).expect("first wait"));
    assert!(drain(&mut b, &c, 10).is_empty());
    assert!(
        !b.wait(Duration::from_millis(200)).expect("idle wait"),
        "no commit, no wake-up"
    );

    let mut w = PgServer::shared().client(&db);
    w.execute("INSERT INTO t VALUES (1)", &[]).expect("insert");
    let started = Instant::now();
    assert!(b.wait(Duration::from_secs(30)).expect("wait"));
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "woken by the notification, not the timeout"
    );
    assert_eq!(drain(&mut b, &c, 10).len(), 1);

    // A writer in another thread while we block.
    let writer = thread::spawn({
        let db = db.clone();
        move || {
            let mut w = PgServer::shared().client(&db);
            w.execute("INSERT INTO t VALUES (2)", &[]).expect("insert");
        }
    });
    assert!(wait_until(Duration::from_secs(30), || b
        .wait(Duration::from_secs(1))
        .expect("wait")));
    writer.join().expect("writer");
    assert_eq!(drain(&mut b, &c, 10).len(), 1);
}

#[test]
fn without_notify_the_triggers_stay_quiet_and_wait_polls() {
    let (url, db) = database("no_notify", "CREATE TABLE t (id int PRIMARY KEY)");
    let options = json!({"notify": false, "fallback_poll_ms": 50, "schema": "epi_quiet"});
    let mut b = open_with(&url, options);
    let plan = b.install(&[watch("t", &["id"])]).expect("install");
    assert!(plan.iter().all(|s| !s.contains("pg_notify")), "{plan:#?}");
    assert!(schema_exists(&db, "epi_quiet"));
    let c = consumer("h");
    b.register(&c, &["t".into()], StartFrom::Now)
        .expect("register");
    PgServer::shared()
        .client(&db)
        .execute("INSERT INTO t VALUES (1)", &[])
        .expect("insert");
    assert!(b.wait(Duration::from_secs(5)).expect("wait polls"));
    assert_eq!(drain(&mut b, &c, 10).len(), 1);
}

/// Counts the capture triggers' notifications on a channel: everything committed before
/// [`NotifyCounter::count`] is called, since then.
struct NotifyCounter {
    client: postgres::Client,
    channel: String,
}

impl NotifyCounter {
    fn new(db: &str, channel: &str) -> NotifyCounter {
        let mut client = PgServer::shared().client(db);
        client
            .batch_execute(&format!("LISTEN \"{channel}\""))
            .expect("listen");
        NotifyCounter {
            client,
            channel: channel.to_owned(),
        }
    }

    /// Notifications with the triggers' empty payload that arrived before a fence this
    /// connection sends now: notifications come in commit order, so the fence comes after
    /// every transaction that committed before this call.
    fn count(&mut self) -> usize {
        use postgres::fallible_iterator::FallibleIterator;
        self.client
            .batch_execute(&format!("NOTIFY \"{}\", 'fence'", self.channel))
            .expect("notify the fence");
        let mut n = 0;
        let mut notifications = self.client.notifications();
        let mut arriving = notifications.timeout_iter(Duration::from_secs(30));
        loop {
            match arriving.next().expect("receive notifications") {
                Some(m) if m.payload() == "fence" => return n,
                Some(m) if m.payload().is_empty() => n += 1,
                Some(_) => {}
                None => panic!("the fence notification did not arrive"),
            }
        }
    }
}

/// The source of the capture function of table `t` in `public`.
fn capture_source_of_t(db: &str) -> String {
    PgServer::shared()
        .client(db)
        .query_one(
            "SELECT prosrc FROM pg_proc WHERE proname = 'capture_t'",
            &[],
        )
        .expect("capture function")
        .get(0)
}

/// A backend with `options`, installed on `t (id)`, and consumer `h` registered from now.
fn reader_of_t(url: &str, options: serde_json::Value) -> (HostBackend, Consumer) {
    let mut b = open_with(url, options);
    b.install(&[watch("t", &["id"])]).expect("install");
    let c = consumer("h");
    b.register(&c, &["t".into()], StartFrom::Now)
        .expect("register");
    (b, c)
}

/// Rows of `schema.sleeper` that say their reader waits.
fn waiting_readers(db: &str, schema: &str) -> i64 {
    PgServer::shared()
        .client(db)
        .query_one(
            &format!("SELECT count(*) FROM \"{schema}\".sleeper WHERE since IS NOT NULL"),
            &[],
        )
        .expect("count waiting readers")
        .get(0)
}

fn insert_ids(client: &mut postgres::Client, ids: std::ops::Range<i32>) {
    for id in ids {
        client
            .execute("INSERT INTO t VALUES ($1)", &[&id])
            .expect("insert");
    }
}

#[test]
fn when_idle_writers_notify_only_while_a_reader_waits() {
    let (url, db) = database("when_idle", "CREATE TABLE t (id int PRIMARY KEY)");
    // A fallback poll far beyond every wait below: a wait that returns true was woken by
    // a notification (or asks for the read that follows registering).
    let mut b = open_with(&url, json!({"fallback_poll_ms": 600_000}));
    b.install(&[watch("t", &["id"])]).expect("install");
    assert!(capture_source_of_t(&db).contains("sleeper"));
    let c = consumer("h");
    b.register(&c, &["t".into()], StartFrom::Now)
        .expect("register");
    let mut counter = NotifyCounter::new(&db, "epidemic");
    let mut w = PgServer::shared().client(&db);

    // Nobody waits: writers do not notify, and the changes are all there.
    insert_ids(&mut w, 0..10);
    assert_eq!(counter.count(), 0, "nobody waits, nobody is notified");
    assert_eq!(drain(&mut b, &c, 100).len(), 10);

    // The first wait listens and registers, and asks for one more read first. Within
    // DENSE_HOLD (10 ms) of the dense read above (10 changes) a wait may still return for
    // a quick poll instead of blocking: such reads find nothing, and then it blocks.
    assert!(b.wait(Duration::from_secs(30)).expect("first wait"));
    assert_eq!(waiting_readers(&db, "epidemic"), 1);
    assert!(drain(&mut b, &c, 100).is_empty());
    assert!(
        wait_until(Duration::from_secs(30), || {
            if b.wait(Duration::from_millis(100)).expect("idle wait") {
                assert!(drain(&mut b, &c, 100).is_empty(), "nothing was committed");
                return false;
            }
            true
        }),
        "registered, nothing committed: the wait never blocked"
    );

    // A commit while the reader waits notifies it.
    insert_ids(&mut w, 10..11);
    assert!(b.wait(Duration::from_secs(60)).expect("woken"));
    assert_eq!(counter.count(), 1);

    // Woken for one change, the reader stays registered: the next commit notifies too.
    assert_eq!(drain(&mut b, &c, 100).len(), 1);
    assert_eq!(waiting_readers(&db, "epidemic"), 1);
    insert_ids(&mut w, 11..13);
    assert!(b.wait(Duration::from_secs(60)).expect("woken again"));
    assert_eq!(counter.count(), 2);

    // A fetch that returns changes right after one that did (a stream) clears the
    // registration: a busy reader is not notified, and still gets everything.
    assert_eq!(drain(&mut b, &c, 1).len(), 2);
    assert_eq!(waiting_readers(&db, "epidemic"), 0);
    insert_ids(&mut w, 13..31);
    assert_eq!(counter.count(), 0, "the reader is busy: no notification");
    assert_eq!(drain(&mut b, &c, 100).len(), 18);

    // Waiting again registers again, read first; right after a dense read (18 changes)
    // the reader polls for a moment instead (see the backend's wake-ups), so wait until
    // a wait has registered.
    assert!(
        wait_until(Duration::from_secs(30), || {
            assert!(b.wait(Duration::from_secs(30)).expect("wait registers"));
            assert!(drain(&mut b, &c, 100).is_empty());
            waiting_readers(&db, "epidemic") == 1
        }),
        "the reader never registered again"
    );

    // A registration that has not been refreshed for a while (its reader died while
    // waiting) no longer counts.
    w.batch_execute("UPDATE epidemic.sleeper SET since = now() - interval '2 minutes'")
        .expect("age the registration");
    insert_ids(&mut w, 31..32);
    assert_eq!(counter.count(), 0, "a lapsed registration wakes nobody");
    assert_eq!(drain(&mut b, &c, 100).len(), 1);

    // A reader that starts listening deletes the rows of connections that are gone: a
    // reader whose connection died (here: killed by the server) cannot delete its own.
    let pid: i32 = w
        .query_one("SELECT pid FROM epidemic.sleeper", &[])
        .expect("the row of the first reader")
        .get(0);
    w.execute("SELECT pg_terminate_backend($1)", &[&pid])
        .expect("terminate the first reader's connection");
    drop(b);
    assert!(wait_until(Duration::from_secs(30), || {
        !w.query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)",
            &[&pid],
        )
        .expect("query")
        .get::<_, bool>(0)
    }));
    let mut b2 = open(&url);
    assert!(b2
        .wait(Duration::from_secs(30))
        .expect("listen and register"));
    let pids: Vec<i32> = w
        .query("SELECT pid FROM epidemic.sleeper", &[])
        .expect("sleepers")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(pids.len(), 1, "{pids:?}");
    assert_ne!(pids[0], pid);
}

#[test]
fn a_reader_that_goes_away_stops_writers_notifying_at_once() {
    let (url, db) = database("reader_goes_away", "CREATE TABLE t (id int PRIMARY KEY)");
    let (mut b, _consumer) = reader_of_t(&url, json!({"fallback_poll_ms": 600_000}));
    assert!(b
        .wait(Duration::from_secs(30))
        .expect("listen and register"));
    assert_eq!(waiting_readers(&db, "epidemic"), 1);
    let mut counter = NotifyCounter::new(&db, "epidemic");

    // The daemon stops: its backend is dropped, and deletes its registration first. Without
    // that, writers would notify nobody for the registration's ten seconds.
    drop(b);
    assert_eq!(
        waiting_readers(&db, "epidemic"),
        0,
        "the registration outlived its reader"
    );
    let mut w = PgServer::shared().client(&db);
    insert_ids(&mut w, 0..3);
    assert_eq!(counter.count(), 0, "writers notified a reader that is gone");
}

/// Counts every write of a `sleeper` row that says "waiting" (a registration).
fn count_registrations(db: &str) -> impl FnMut() -> i64 {
    let mut c = PgServer::shared().client(db);
    c.batch_execute(
        "CREATE TABLE public.registrations (at timestamptz DEFAULT clock_timestamp()); \
         CREATE FUNCTION public.count_registration() RETURNS trigger LANGUAGE plpgsql AS \
           $$ BEGIN INSERT INTO public.registrations DEFAULT VALUES; RETURN NULL; END $$; \
         CREATE TRIGGER count_registration AFTER INSERT OR UPDATE ON epidemic.sleeper \
           FOR EACH ROW WHEN (NEW.since IS NOT NULL) EXECUTE FUNCTION public.count_registration();",
    )
    .expect("count registrations");
    move || {
        c.query_one("SELECT count(*) FROM public.registrations", &[])
            .expect("count")
            .get(0)
    }
}

#[test]
fn a_reader_keeping_up_with_a_dense_stream_lets_commits_gather_and_does_not_register() {
    let (url, db) = database("dense_stream", "CREATE TABLE t (id int PRIMARY KEY)");
    // A long linger, so that lingering shows in the count of reads on any machine; the
    // fallback poll far away, so that only wake-ups and the dense poll bring changes.
    let linger = Duration::from_millis(100);
    let (mut b, c) = reader_of_t(
        &url,
        json!({"fallback_poll_ms": 600_000, "linger_ms": linger.as_millis() as u64}),
    );
    let mut registrations = count_registrations(&db);

    let received = Arc::new(Mutex::new(Vec::new()));
    let reads = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    // The daemon's loop: read; when there is nothing, wait.
    let reader = thread::spawn({
        let (received, reads, stop, c) = (received.clone(), reads.clone(), stop.clone(), c.clone());
        move || {
            while !stop.load(Ordering::SeqCst) {
                let batch = b.fetch(&c, 100_000).expect("fetch");
                match batch.changes.last() {
                    Some(last) => {
                        reads.fetch_add(1, Ordering::SeqCst);
                        b.ack(&c, &batch.token, last.id).expect("ack");
                        received
                            .lock()
                            .expect("received")
                            .extend(batch.changes.iter().map(|ch| ch.id));
                    }
                    None => {
                        b.wait(Duration::from_millis(200)).expect("wait");
                    }
                }
            }
        }
    });
    assert!(
        wait_until(Duration::from_secs(30), || waiting_readers(&db, "epidemic")
            == 1),
        "the idle reader never registered"
    );
    let registered_before = registrations();

    // Four writers, 10 rows per transaction and a pause of a millisecond after each, for
    // two seconds: thousands of changes a second (a dense stream), in commits the reader
    // could keep up with one by one.
    let writers_stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..4)
        .map(|k| {
            let (db, writers_stop) = (db.clone(), writers_stop.clone());
            thread::spawn(move || {
                let mut w = PgServer::shared().client(&db);
                let mut commits = 0i64;
                let mut next = k * 10_000_000;
                while !writers_stop.load(Ordering::SeqCst) {
                    w.execute(
                        "INSERT INTO t SELECT g FROM generate_series($1::int, $2::int) g",
                        &[&next, &(next + 9)],
                    )
                    .expect("insert");
                    next += 10;
                    commits += 1;
                    thread::sleep(Duration::from_millis(1));
                }
                commits
            })
        })
        .collect();
    let t0 = Instant::now();
    thread::sleep(Duration::from_secs(2));
    writers_stop.store(true, Ordering::SeqCst);
    let commits: i64 = writers.into_iter().map(|w| w.join().expect("writer")).sum();
    let streamed = t0.elapsed();
    let registered_during = registrations() - registered_before;
    let reads_during = reads.load(Ordering::SeqCst);
    let total = commits as usize * 10;
    eprintln!("dense stream: {commits} commits in {streamed:?}, {reads_during} reads, {registered_during} registrations");
    assert!(
        wait_until(Duration::from_secs(60), || received
            .lock()
            .expect("received")
            .len()
            >= total),
        "the reader did not get every change"
    );
    stop.store(true, Ordering::SeqCst);
    reader.join().expect("reader thread");

    // Nothing lost, nothing twice.
    let got = received.lock().expect("received").clone();
    let distinct: HashSet<i64> = got.iter().copied().collect();
    assert_eq!((got.len(), distinct.len()), (total, total));
    // Reads about once per linger while the stream lasted (twice that, plus ten, leaves
    // room for the first reads, before the stream counted as dense, and for a writer
    // stalled on a loaded machine); one per round trip would be hundreds.
    let most = 2 * (streamed.as_millis() / linger.as_millis()) as usize + 10;
    assert!(
        reads_during <= most,
        "{reads_during} reads of {commits} commits in {streamed:?}, at most {most} expected"
    );
    // A dense stream's reader polls instead of registering each time it catches up.
    assert!(
        registered_during <= 3,
        "the reader registered {registered_during} times during a dense stream of {commits} commits"
    );
}

#[test]
fn a_waiting_reader_is_woken_by_a_commit_in_another_thread() {
    let (url, db) = database("woken_thread", "CREATE TABLE t (id int PRIMARY KEY)");
    let (mut b, c) = reader_of_t(&url, json!({"fallback_poll_ms": 600_000}));
    let received = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    // The daemon's loop: read; when there is nothing, wait.
    let reader = thread::spawn({
        let (received, stop, c) = (received.clone(), stop.clone(), c.clone());
        move || {
            while !stop.load(Ordering::SeqCst) {
                let batch = b.fetch(&c, 100).expect("fetch");
                match batch.changes.last() {
                    Some(last) => {
                        b.ack(&c, &batch.token, last.id).expect("ack");
                        received.fetch_add(batch.changes.len(), Ordering::SeqCst);
                    }
                    None => {
                        b.wait(Duration::from_millis(200)).expect("wait");
                    }
                }
            }
        }
    });
    let mut w = PgServer::shared().client(&db);
    for round in 0..3 {
        // Once the reader is registered, every commit notifies it: with the fallback poll
        // ten minutes away, only the notification can deliver the row in time.
        assert!(wait_until(Duration::from_secs(30), || waiting_readers(
            &db, "epidemic"
        ) == 1));
        insert_ids(&mut w, round..round + 1);
        assert!(
            wait_until(Duration::from_secs(30), || received.load(Ordering::SeqCst)
                == round as usize + 1),
            "round {round}: the waiting reader was not woken"
        );
    }
    stop.store(true, Ordering::SeqCst);
    reader.join().expect("reader thread");
}

#[test]
fn a_commit_while_a_whole_batch_is_handled_wakes_the_reader_after_the_ack() {
    let (url, db) = database(
        "commit_while_handling",
        "CREATE TABLE t (id int PRIMARY KEY)",
    );
    // The fallback poll ten minutes away: only a notification can bring a row in time.
    let (mut b, c) = reader_of_t(&url, json!({"fallback_poll_ms": 600_000}));
    assert!(b
        .wait(Duration::from_secs(30))
        .expect("listen and register"));
    assert!(drain(&mut b, &c, 100).is_empty());
    let mut w = PgServer::shared().client(&db);
    insert_ids(&mut w, 0..1);
    assert!(b.wait(Duration::from_secs(60)).expect("woken"));

    // The host's loop: the whole batch, a commit while the handler has it, the ack. The
    // read right after the ack is left to the wake-ups, and the commit's is there.
    let batch = b.fetch(&c, 100).expect("fetch");
    assert_eq!(batch.changes.len(), 1);
    insert_ids(&mut w, 1..2);
    b.ack(&c, &batch.token, batch.changes[0].id).expect("ack");
    assert!(
        b.fetch(&c, 100).expect("fetch").changes.is_empty(),
        "the read after the ack of a whole batch is skipped"
    );
    assert!(b.wait(Duration::from_secs(60)).expect("wait"), "not woken");
    let batch = b.fetch(&c, 100).expect("fetch");
    assert_eq!(int(batch.changes[0].value("id")), 1);
    b.ack(&c, &batch.token, batch.changes[0].id).expect("ack");

    // A backfill's watermark, written on this connection after such an ack, notifies
    // nobody: the next fetch reads it.
    insert_ids(&mut w, 2..3);
    assert!(b.wait(Duration::from_secs(60)).expect("woken"));
    let batch = b.fetch(&c, 100).expect("fetch");
    b.ack(&c, &batch.token, batch.changes[0].id).expect("ack");
    b.snapshot_chunk(&ChunkRequest {
        table: "t".into(),
        after: None,
        limit: 10,
        only: Vec::new(),
    })
    .expect("chunk");
    let batch = b.fetch(&c, 100).expect("fetch");
    assert_eq!(
        batch.changes.iter().map(|ch| ch.origin).collect::<Vec<_>>(),
        [Origin::Watermark],
        "the watermark is read at once"
    );
}

#[test]
fn when_idle_loses_nothing_to_writers_racing_a_reader_that_goes_to_wait() {
    const WRITERS: i32 = 4;
    const ROWS: i32 = 300;
    let (url, db) = database("when_idle_race", "CREATE TABLE t (id int PRIMARY KEY)");
    // A short fallback poll, so that changes whose notification lost the race come soon.
    let mut b = open_with(&url, json!({"notify": "when-idle", "fallback_poll_ms": 20}));
    b.install(&[watch("t", &["id"])]).expect("install");
    let c = consumer("h");
    b.register(&c, &["t".into()], StartFrom::Now)
        .expect("register");
    let seen: Arc<Mutex<Vec<i64>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let reader = thread::spawn({
        let (seen, stop, c) = (seen.clone(), stop.clone(), c.clone());
        move || {
            while !stop.load(Ordering::SeqCst) {
                let batch = b.fetch(&c, 100).expect("fetch");
                match batch.changes.last() {
                    Some(last) => {
                        b.ack(&c, &batch.token, last.id).expect("ack");
                        seen.lock()
                            .unwrap()
                            .extend(batch.changes.iter().map(|ch| int(ch.value("id"))));
                    }
                    None => {
                        b.wait(Duration::from_millis(200)).expect("wait");
                    }
                }
            }
        }
    });
    // Writers with pauses of random length, so that the reader keeps going to wait and
    // being woken, and commits land in every step of that.
    let writers: Vec<_> = (0..WRITERS)
        .map(|k| {
            let db = db.clone();
            thread::spawn(move || {
                let mut w = PgServer::shared().client(&db);
                let mut rng = Rng::new(k as u64);
                for i in 0..ROWS {
                    let id = k * ROWS + i;
                    let mut tx = w.transaction().expect("begin");
                    tx.execute("INSERT INTO t VALUES ($1)", &[&id])
                        .expect("insert");
                    // Some transactions dawdle between their row and their commit: the
                    // race's window.
                    if rng.below(4) == 0 {
                        thread::sleep(Duration::from_micros(rng.below(3000)));
                    }
                    tx.commit().expect("commit");
                    thread::sleep(Duration::from_micros(rng.below(2000)));
                }
            })
        })
        .collect();
    for w in writers {
        w.join().expect("writer thread");
    }
    let total = (WRITERS * ROWS) as usize;
    let all = wait_until(Duration::from_secs(60), || {
        seen.lock().unwrap().len() >= total
    });
    stop.store(true, Ordering::SeqCst);
    reader.join().expect("reader thread");
    assert!(
        all,
        "only {} of {total} changes",
        seen.lock().unwrap().len()
    );
    let mut ids = seen.lock().unwrap().clone();
    ids.sort_unstable();
    assert_eq!(ids, (0..total as i64).collect::<Vec<_>>());
}

#[test]
fn notify_always_notifies_every_transaction_and_off_none() {
    let (url, db) = database("notify_modes", "CREATE TABLE t (id int PRIMARY KEY)");
    let mut counter = NotifyCounter::new(&db, "epidemic");
    let mut w = PgServer::shared().client(&db);
    let mut always = open_with(&url, json!({"notify": "always"}));
    always
        .install(&[watch("t", &["id"])])
        .expect("install always");
    assert!(!capture_source_of_t(&db).contains("sleeper"));
    insert_ids(&mut w, 0..5);
    assert_eq!(counter.count(), 5);

    // Booleans still work: false is off, true is when-idle.
    let mut off = open_with(&url, json!({"notify": false}));
    off.install(&[watch("t", &["id"])]).expect("install off");
    assert!(!capture_source_of_t(&db).contains("pg_notify"));
    insert_ids(&mut w, 5..10);
    assert_eq!(counter.count(), 0);
    let mut on = open_with(&url, json!({"notify": true}));
    on.install(&[watch("t", &["id"])])
        .expect("install when-idle");
    assert!(capture_source_of_t(&db).contains("sleeper"));
    insert_ids(&mut w, 10..15);
    assert_eq!(counter.count(), 0, "nobody waits");

    // A reader configured `always` registers as waiting all the same, so triggers
    // installed `when-idle` wake it.
    let c = consumer("h");
    always
        .register(&c, &["t".into()], StartFrom::Now)
        .expect("register");
    assert!(always.wait(Duration::from_secs(30)).expect("listen"));
    assert!(drain(&mut always, &c, 100).is_empty());
    insert_ids(&mut w, 15..16);
    assert!(wait_until(Duration::from_secs(30), || always
        .wait(Duration::from_secs(1))
        .expect("wait")));
    assert_eq!(counter.count(), 1);
    assert_eq!(drain(&mut always, &c, 100).len(), 1);

    assert!(library()
        .open_backend(&url, &json!({"notify": "sometimes"}))
        .is_err());
}

// ---------------------------------------------------------------------------------------
// Install, names, validation, uninstall
// ---------------------------------------------------------------------------------------

#[test]
fn mixed_case_and_reserved_word_names_work() {
    let (url, db) = database(
        "quoted_names",
        r#"CREATE TABLE "Order" ("Id" int PRIMARY KEY, "select" text, "from" int);
           CREATE SCHEMA "Sales";
           CREATE TABLE "Sales"."Order" ("Id" int PRIMARY KEY, "Where$" text);"#,
    );
    let (mut b, c) = setup(
        &url,
        &[
            watch("Order", &["Id", "select", "from"]),
            watch("Sales.Order", &["Id", "Where$"]),
        ],
        "h",
    );
    let mut w = PgServer::shared().client(&db);
    w.batch_execute(
        r#"INSERT INTO "Order" VALUES (1, 'a', 10);
           UPDATE "Order" SET "select" = 'b' WHERE "Id" = 1;
           DELETE FROM "Order" WHERE "Id" = 1;
           INSERT INTO "Sales"."Order" VALUES (7, 'w');"#,
    )
    .expect("writes");
    let got = drain_until(&mut b, &c, 4, Duration::from_secs(10));
    let ops: Vec<(String, Op)> = got.iter().map(|ch| (ch.table.clone(), ch.op)).collect();
    assert_eq!(
        ops,
        vec![
            ("Order".into(), Op::Insert),
            ("Order".into(), Op::Update),
            ("Order".into(), Op::Delete),
            ("Sales.Order".into(), Op::Insert)
        ]
    );
    assert_eq!(text(got[1].old_value("select")), "a");
    assert_eq!(text(got[1].new_value("select")), "b");
    assert_eq!(int(got[2].old_value("from")), 10);
    assert_eq!(text(got[3].new_value("Where$")), "w");
}

#[test]
fn names_at_the_length_limit_work() {
    let table = format!("t{}", "x".repeat(62));
    let column = format!("c{}", "y".repeat(62));
    let (url, db) = database(
        "long_names",
        &format!("CREATE TABLE {table} (id int PRIMARY KEY, {column} text)"),
    );
    let (mut b, c) = setup(&url, &[watch(&table, &["id", &column])], "h");
    let mut w = PgServer::shared().client(&db);
    w.execute(&format!("INSERT INTO {table} VALUES (1, 'long')"), &[])
        .expect("insert");
    let got = drain_until(&mut b, &c, 1, Duration::from_secs(10));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].table, table);
    assert_eq!(text(got[0].new_value(&column)), "long");
    // Installing again finds the same (shortened) log names.
    assert!(b
        .install(&[watch(&table, &["id", &column])])
        .expect("install again")
        .iter()
        .all(|s| !s.contains("TRIGGER")));
}

fn assert_invalid_naming(result: Result<Vec<String>, BackendError>, name: &str) {
    match result {
        Err(BackendError::Invalid(m)) => assert!(m.contains(name), "{m:?} should name {name:?}"),
        other => panic!("expected an Invalid error naming {name:?}, got {other:?}"),
    }
}

#[test]
fn injection_attempts_and_missing_objects_are_invalid_and_create_nothing() {
    let (url, db) = database(
        "validation",
        "CREATE TABLE users (id int PRIMARY KEY, name text); CREATE VIEW v AS SELECT 1 AS x;",
    );
    let mut b = open(&url);
    let evil = "users; DROP TABLE x";
    assert_invalid_naming(b.install(&[watch(evil, &["id"])]), evil);
    assert_invalid_naming(b.plan_install(&[watch(evil, &["id"])]), evil);
    assert_invalid_naming(b.install(&[watch("users", &["id", evil])]), evil);
    assert_invalid_naming(
        b.install(&[watch("public.users\"; --", &["id"])]),
        "public.users\"; --",
    );
    assert_invalid_naming(b.install(&[watch("nope", &["id"])]), "nope");
    assert_invalid_naming(
        b.install(&[watch("users", &["id", "nope_col"])]),
        "nope_col",
    );
    assert_invalid_naming(b.install(&[watch("v", &["x"])]), "v");
    assert_invalid_naming(b.install(&[watch("users", &[])]), "users");
    // A valid watch next to an invalid one: still nothing.
    assert_invalid_naming(
        b.install(&[watch("users", &["id"]), watch("missing", &["id"])]),
        "missing",
    );
    assert!(
        !schema_exists(&db, "epidemic"),
        "nothing may be created by a failed install"
    );
    let users: i64 = PgServer::shared()
        .client(&db)
        .query_one("SELECT count(*) FROM pg_class WHERE relname = 'users'", &[])
        .unwrap()
        .get(0);
    assert_eq!(users, 1);

    let err = library()
        .open_backend(&url, &json!({"schema": "x; DROP SCHEMA public"}))
        .err()
        .expect("bad schema option");
    assert!(
        matches!(err, BackendError::Invalid(ref m) if m.contains("x; DROP SCHEMA public")),
        "{err:?}"
    );
    let err = library()
        .open_backend(&url, &json!({"shema": "x"}))
        .err()
        .expect("unknown option");
    assert!(
        matches!(err, BackendError::Invalid(ref m) if m.contains("shema")),
        "{err:?}"
    );
}

#[test]
fn a_connection_failure_is_a_connection_error_without_the_password() {
    let port = epidemic_tests::free_port();
    let url = format!("postgres://mx:sekrit-pw@127.0.0.1:{port}/mail?connect_timeout=5");
    let err = library()
        .open_backend(&url, &json!({}))
        .err()
        .expect("nothing listens there");
    assert!(err.is_connection(), "{err:?}");
    let message = err.to_string();
    assert!(!message.contains("sekrit-pw"), "{message}");
    assert!(message.contains("127.0.0.1"), "{message}");
}

/// Everything in the database that is not PostgreSQL's own: relations, triggers,
/// functions, schemas.
fn catalog(db: &str) -> Vec<String> {
    let rows = PgServer::shared()
        .client(db)
        .query(
            "SELECT 'relation ' || n.nspname || '.' || c.relname || ' ' || c.relkind::text FROM pg_class c \
               JOIN pg_namespace n ON n.oid = c.relnamespace \
               WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%' \
             UNION ALL SELECT 'trigger ' || tgname || ' on ' || tgrelid::regclass::text FROM pg_trigger \
               WHERE NOT tgisinternal \
             UNION ALL SELECT 'function ' || p.oid::regprocedure::text FROM pg_proc p \
               JOIN pg_namespace n ON n.oid = p.pronamespace \
               WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') \
             UNION ALL SELECT 'schema ' || nspname FROM pg_namespace \
             UNION ALL SELECT 'column ' || attrelid::regclass::text || '.' || attname || ' ' || format_type(atttypid, atttypmod) \
               FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
               WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%' \
                 AND a.attnum > 0 AND NOT a.attisdropped \
             ORDER BY 1",
            &[],
        )
        .expect("catalog");
    rows.iter().map(|r| r.get(0)).collect()
}

#[test]
fn install_is_idempotent_and_uninstall_leaves_exactly_the_users_objects() {
    let (url, db) = database(
        "install_uninstall",
        "CREATE TABLE mail_users (id int PRIMARY KEY, username text, quota bigint);
         CREATE TABLE other (id int);
         CREATE FUNCTION keep_me() RETURNS int LANGUAGE sql AS 'SELECT 1';
         CREATE FUNCTION other_trg() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NEW; END';
         CREATE TRIGGER users_own BEFORE INSERT ON mail_users FOR EACH ROW EXECUTE FUNCTION other_trg();",
    );
    let before = catalog(&db);
    let mut b = open(&url);
    let watches = [watch("mail_users", &["username", "quota"])];
    assert!(b.plan_uninstall().expect("plan uninstall").is_empty());

    let plan = b.plan_install(&watches).expect("plan");
    let ran = b.install(&watches).expect("install");
    assert_eq!(plan, ran, "plan_install returns exactly what install runs");
    assert!(ran.iter().any(|s| s.starts_with("CREATE TRIGGER")));
    // The second install changes nothing and does not touch the trigger (which would
    // lock the user's table).
    let again = b.install(&watches).expect("install again");
    assert!(again.iter().all(|s| !s.contains("TRIGGER")), "{again:#?}");
    assert_eq!(b.plan_install(&watches).expect("plan"), again);

    // Captured once, not twice.
    let c = consumer("h");
    b.register(&c, &["mail_users".into()], StartFrom::Oldest)
        .expect("register");
    let mut w = PgServer::shared().client(&db);
    w.execute("INSERT INTO mail_users VALUES (1, 'ann', 10)", &[])
        .expect("insert");
    assert_eq!(drain_until(&mut b, &c, 1, Duration::from_secs(10)).len(), 1);
    assert!(drain(&mut b, &c, 10).is_empty());

    let plan = b.plan_uninstall().expect("plan uninstall");
    assert_eq!(
        plan,
        vec![
            "DROP TRIGGER IF EXISTS \"epidemic_capture_insert\" ON \"public\".\"mail_users\""
                .to_owned(),
            "DROP TRIGGER IF EXISTS \"epidemic_capture_update\" ON \"public\".\"mail_users\""
                .to_owned(),
            "DROP TRIGGER IF EXISTS \"epidemic_capture_delete\" ON \"public\".\"mail_users\""
                .to_owned(),
            "DROP TRIGGER IF EXISTS \"epidemic_capture_trunc\" ON \"public\".\"mail_users\""
                .to_owned(),
            "DROP SCHEMA \"epidemic\" CASCADE".to_owned()
        ]
    );
    assert_eq!(b.uninstall().expect("uninstall"), plan);
    assert_eq!(
        catalog(&db),
        before,
        "uninstall must leave the user's objects exactly as they were"
    );
    assert!(b.uninstall().expect("uninstall again").is_empty());
    // The user's data and trigger are untouched and writes work without Epidemic.
    w.execute("INSERT INTO mail_users VALUES (2, 'bob', 20)", &[])
        .expect("insert");
}

#[test]
fn a_schema_not_created_by_epidemic_is_never_used_or_dropped() {
    let (url, db) = database(
        "foreign_schema",
        "CREATE SCHEMA epidemic; CREATE TABLE epidemic.precious (id int); CREATE TABLE t (id int);",
    );
    let mut b = open(&url);
    let err = b
        .install(&[watch("t", &["id"])])
        .expect_err("foreign schema");
    assert!(
        matches!(err, BackendError::Invalid(ref m) if m.contains("epidemic")),
        "{err:?}"
    );
    let err = b.uninstall().expect_err("foreign schema");
    assert!(matches!(err, BackendError::Invalid(_)), "{err:?}");
    assert!(schema_exists(&db, "epidemic"));
}

#[test]
fn a_growing_column_set_adds_log_columns() {
    let (url, db) = database(
        "grow_columns",
        "CREATE TABLE t (id int PRIMARY KEY, a text, b text)",
    );
    let (mut b, c) = setup(&url, &[watch("t", &["id", "a"])], "h");
    let mut w = PgServer::shared().client(&db);
    w.execute("INSERT INTO t VALUES (1, 'a1', 'b1')", &[])
        .expect("insert");
    // Another daemon's handlers need `b` as well.
    let plan = b.install(&[watch("t", &["b"])]).expect("install more");
    assert!(
        plan.iter()
            .any(|s| s.starts_with("ALTER TABLE") && s.contains("ADD COLUMN")),
        "{plan:#?}"
    );
    w.execute("UPDATE t SET b = 'b2' WHERE id = 1", &[])
        .expect("update b");
    let got = drain_until(&mut b, &c, 2, Duration::from_secs(10));
    assert_eq!(got.len(), 2);
    assert_eq!(
        &*got[1].columns,
        &["id".to_owned(), "a".to_owned(), "b".to_owned()]
    );
    assert_eq!(
        got[0].new_value("b"),
        Some(&Value::Null),
        "captured before b was watched"
    );
    assert_eq!(text(got[1].old_value("b")), "b1");
    assert_eq!(text(got[1].new_value("b")), "b2");
    // An install asking for fewer columns does not take any away.
    let plan = b.install(&[watch("t", &["id"])]).expect("install fewer");
    assert!(
        plan.iter().all(|s| !s.starts_with("ALTER TABLE")),
        "{plan:#?}"
    );
    w.execute("UPDATE t SET a = 'a3' WHERE id = 1", &[])
        .expect("update a");
    let got = drain_until(&mut b, &c, 1, Duration::from_secs(10));
    assert_eq!(text(got[0].new_value("a")), "a3");
}

// ---------------------------------------------------------------------------------------
// Capture: values and unwatched columns
// ---------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------
// Pruning
// ---------------------------------------------------------------------------------------

fn log_rows(db: &str) -> i64 {
    PgServer::shared()
        .client(db)
        .query_one("SELECT count(*) FROM epidemic.log_t", &[])
        .expect("count")
        .get(0)
}

#[test]
fn prune_deletes_what_every_consumer_passed_and_keeps_the_rest() {
    let (url, db) = database("prune", "CREATE TABLE t (id int PRIMARY KEY)");
    let mut b = open(&url);
    b.install(&[watch("t", &["id"])]).expect("install");
    let mut w = PgServer::shared().client(&db);
    for i in 1..=10 {
        w.execute("INSERT INTO t VALUES ($1)", &[&i])
            .expect("insert");
    }
    assert_eq!(
        b.prune().expect("prune"),
        0,
        "no consumer yet: keep everything"
    );

    let (a, slow) = (consumer("a"), consumer("slow"));
    b.register(&a, &["t".into()], StartFrom::Oldest)
        .expect("register");
    b.register(&slow, &["t".into()], StartFrom::Oldest)
        .expect("register");
    assert_eq!(drain(&mut b, &a, 100).len(), 10);
    assert_eq!(
        b.prune().expect("prune"),
        0,
        "the slow consumer has not passed anything"
    );

    // The handled half of a batch goes while the rest is read.
    let batch = b.fetch(&slow, 5).expect("fetch");
    b.ack(&slow, &batch.token, batch.changes[4].id)
        .expect("ack");
    assert_eq!(b.prune().expect("prune"), 5);
    assert_eq!(log_rows(&db), 5);
    assert_eq!(drain(&mut b, &slow, 100).len(), 5);

    // The other five go once the cursors' snapshots show their transactions as
    // finished; other tests' transactions on this server can hold that back a little,
    // and idle fetches move the cursors on.
    let mut pruned = 5;
    let done = wait_until(Duration::from_secs(30), || {
        for c in [&a, &slow] {
            assert!(b.fetch(c, 100).expect("fetch").changes.is_empty());
        }
        pruned += b.prune().expect("prune");
        pruned >= 10
    });
    assert!(done, "pruned {pruned} of 10 rows");
    assert_eq!(pruned, 10);
    assert_eq!(log_rows(&db), 0);

    for i in 11..=13 {
        w.execute("INSERT INTO t VALUES ($1)", &[&i])
            .expect("insert");
    }
    assert_eq!(b.prune().expect("prune"), 0);
    assert_eq!(log_rows(&db), 3, "rows nobody has passed stay");
    for c in [&a, &slow] {
        let ids: Vec<i64> = drain(&mut b, c, 100)
            .iter()
            .map(|ch| int(ch.value("id")))
            .collect();
        assert_eq!(ids, vec![11, 12, 13]);
    }
}

// ---------------------------------------------------------------------------------------
// Consumers: liveness, eviction, table lists
// ---------------------------------------------------------------------------------------

fn consumer_status<'a>(s: &'a Status, handler: &str) -> &'a ConsumerStatus {
    s.consumers
        .iter()
        .find(|c| c.handler == handler)
        .unwrap_or_else(|| panic!("no consumer {handler} in {s:#?}"))
}

fn table_status<'a>(s: &'a Status, table: &str) -> &'a TableStatus {
    s.tables
        .iter()
        .find(|t| t.table == table)
        .unwrap_or_else(|| panic!("no table {table} in {s:#?}"))
}

fn log_count(db: &str, log: &str) -> i64 {
    PgServer::shared()
        .client(db)
        .query_one(&format!("SELECT count(*) FROM epidemic.{log}"), &[])
        .expect("count")
        .get(0)
}

/// The SDK's sentence for an evicted consumer, the same on every backend.
const EVICTED: &str =
    "consumer mx1/stale was evicted (unseen longer than consumer_ttl); it must register again";

#[test]
fn an_evicted_consumer_releases_pruning_and_must_register_again() {
    let (url, db) = database(
        "eviction",
        "CREATE TABLE t (id int PRIMARY KEY); CREATE TABLE u (id int PRIMARY KEY);
         CREATE TABLE v (id int PRIMARY KEY);",
    );
    let mut b = open(&url);
    b.install(&[
        watch("t", &["id"]),
        watch("u", &["id"]),
        watch("v", &["id"]),
    ])
    .expect("install");
    let (live, stale) = (consumer("live"), consumer("stale"));
    b.register(&live, &["t".into()], StartFrom::Oldest)
        .expect("register");
    b.register(&stale, &["t".into(), "u".into()], StartFrom::Oldest)
        .expect("register");
    let mut w = PgServer::shared().client(&db);
    for i in 1..=5 {
        for table in ["t", "u", "v"] {
            w.execute(&format!("INSERT INTO {table} VALUES ($1)"), &[&i])
                .expect("insert");
        }
    }
    assert_eq!(drain(&mut b, &live, 100).len(), 5);
    // The stale consumer takes a batch and is never heard of again.
    let held = b.fetch(&stale, 100).expect("fetch");
    assert_eq!(held.changes.len(), 10);
    assert!(b
        .evict_stale(Duration::from_secs(3600))
        .expect("evict")
        .is_empty());

    // `live` sends heartbeats; `stale` falls silent and goes after the TTL.
    let mut evicted = Vec::new();
    assert!(wait_until(Duration::from_secs(10), || {
        b.touch(&live).expect("touch");
        evicted.extend(b.evict_stale(Duration::from_millis(300)).expect("evict"));
        !evicted.is_empty()
    }));
    assert_eq!(evicted, vec![stale.clone()]);
    // A heartbeat does not bring an evicted consumer back, and is not a success either.
    assert_eq!(
        b.touch(&stale)
            .expect_err("heartbeat of an evicted consumer"),
        BackendError::Evicted(EVICTED.into())
    );
    let s = b.status().expect("status");
    assert!(consumer_status(&s, "stale").evicted);
    assert!(!consumer_status(&s, "live").evicted);

    // Its work is refused, and its cursor stays where it was.
    let position = consumer_status(&s, "stale").position.clone();
    for err in [
        b.ack(&stale, &held.token, held.changes[9].id)
            .expect_err("ack after eviction"),
        b.fetch(&stale, 100).expect_err("fetch after eviction"),
    ] {
        assert_eq!(err, BackendError::Evicted(EVICTED.into()));
    }
    let s = b.status().expect("status");
    assert_eq!(consumer_status(&s, "stale").position, position);

    // It holds back nothing: `u`, read only by it, is emptied; `t` goes as far as `live`
    // has read; `v`, which nobody reads, is kept for a consumer still to come.
    let mut pruned = 0;
    assert!(wait_until(Duration::from_secs(30), || {
        assert!(b.fetch(&live, 100).expect("fetch").changes.is_empty());
        pruned += b.prune().expect("prune");
        pruned >= 10
    }));
    assert_eq!(pruned, 10);
    assert_eq!((log_count(&db, "log_t"), log_count(&db, "log_u")), (0, 0));
    assert_eq!(log_count(&db, "log_v"), 5);

    // Registering again says what happened and starts over; the old batch is void.
    assert_eq!(
        b.register(&stale, &["t".into(), "u".into()], StartFrom::Oldest)
            .expect("register"),
        Registered::Evicted
    );
    let s = b.status().expect("status");
    assert!(!consumer_status(&s, "stale").evicted);
    let err = b
        .ack(&stale, &held.token, held.changes[9].id)
        .expect_err("the batch of before the eviction");
    assert!(!err.is_connection(), "{err:?}");
    w.execute("INSERT INTO u VALUES (6)", &[]).expect("insert");
    let got: Vec<(String, i64)> = drain(&mut b, &stale, 100)
        .iter()
        .map(|ch| (ch.table.clone(), int(ch.value("id"))))
        .collect();
    assert_eq!(got, vec![("u".to_owned(), 6)]);
    assert_eq!(
        b.register(&stale, &["t".into(), "u".into()], StartFrom::Oldest)
            .expect("register"),
        Registered::Existing
    );

    // Unregistering forgets the cursor, not the dead letters.
    w.execute("INSERT INTO t VALUES (7)", &[]).expect("insert");
    let batch = b.fetch(&stale, 100).expect("fetch");
    let letter = DeadLetter::new(&stale, &batch.changes[0], "boom", 3, 1);
    b.add_dead_letter(&letter).expect("dead letter");
    assert!(b.unregister(&stale).expect("unregister"));
    assert!(!b.unregister(&stale).expect("unregister again"));
    let err = b.fetch(&stale, 100).expect_err("unregistered");
    assert!(
        matches!(err, BackendError::Evicted(ref m) if m.contains("not registered")),
        "{err:?}"
    );
    assert_eq!(
        b.dead_letters(&DeadLetterQuery::Consumer(stale.clone()))
            .expect("dead letters")
            .len(),
        1
    );
}

#[test]
fn register_sets_the_table_list_and_a_table_added_mid_batch_loses_nothing() {
    let (url, db) = database(
        "table_lists",
        "CREATE TABLE t (id int PRIMARY KEY); CREATE TABLE u (id int PRIMARY KEY);",
    );
    let mut b = open(&url);
    b.install(&[watch("t", &["id"]), watch("u", &["id"])])
        .expect("install");
    let (a, c) = (consumer("a"), consumer("c"));
    b.register(&a, &["t".into(), "u".into()], StartFrom::Oldest)
        .expect("register");
    b.register(&c, &["t".into()], StartFrom::Oldest)
        .expect("register");
    let mut w = PgServer::shared().client(&db);
    w.batch_execute("INSERT INTO t VALUES (1), (2), (3)")
        .expect("insert");
    assert_eq!(drain(&mut b, &c, 100).len(), 3);
    assert_eq!(b.prune().expect("prune"), 0, "a has not read t");

    // The handler no longer reads t: its old cursor must not hold t back.
    assert_eq!(
        b.register(&a, &["u".into()], StartFrom::Oldest)
            .expect("register"),
        Registered::Existing
    );
    assert_eq!(
        consumer_status(&b.status().expect("status"), "a").tables,
        vec!["u"]
    );
    let mut pruned = 0;
    assert!(wait_until(Duration::from_secs(30), || {
        assert!(b.fetch(&c, 100).expect("fetch").changes.is_empty());
        pruned += b.prune().expect("prune");
        pruned >= 3
    }));
    assert!(drain(&mut b, &a, 100).is_empty());

    // A batch of u in progress, partly acknowledged, when t is added: t's changes in the
    // batch's range come too (the acknowledged part of u may come again).
    w.batch_execute("INSERT INTO u VALUES (1), (2), (3); INSERT INTO t VALUES (4), (5);")
        .expect("insert");
    let batch = b.fetch(&a, 100).expect("fetch");
    assert_eq!(batch.changes.len(), 3);
    b.ack(&a, &batch.token, batch.changes[0].id).expect("ack");
    b.register(&a, &["u".into(), "t".into()], StartFrom::Oldest)
        .expect("register");
    let got: BTreeSet<(String, i64)> = drain(&mut b, &a, 100)
        .iter()
        .map(|ch| (ch.table.clone(), int(ch.value("id"))))
        .collect();
    let want: BTreeSet<(String, i64)> = [("u", 2), ("u", 3), ("t", 4), ("t", 5)]
        .iter()
        .map(|(t, i)| (t.to_string(), *i))
        .collect();
    assert!(got.is_superset(&want), "{got:?}");
    assert!(got.iter().all(|(t, i)| t == "u" || *i >= 4), "{got:?}");
}

// ---------------------------------------------------------------------------------------
// Dead letters
// ---------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------
// Status and schema drift
// ---------------------------------------------------------------------------------------

const TRIGGERS: [&str; 4] = [
    "epidemic_capture_insert",
    "epidemic_capture_update",
    "epidemic_capture_delete",
    "epidemic_capture_trunc",
];

#[test]
fn status_counts_the_backlog_exactly_and_reports_a_dropped_trigger_until_install() {
    let (url, db) = database("status", "CREATE TABLE t (id int PRIMARY KEY, v text)");
    let mut b = open(&url);
    let s = b.status().expect("status before install");
    assert_eq!(s.backend, "postgres");
    assert!(s.consumers.is_empty() && s.tables.is_empty());

    let watches = [watch("t", &["id", "v"])];
    let (mut b, c) = setup(&url, &watches, "h");
    let server = PgServer::shared();
    let mut w = server.client(&db);
    for i in 1..=5 {
        w.execute("INSERT INTO t VALUES ($1, 'x')", &[&i])
            .expect("insert");
    }
    w.batch_execute("INSERT INTO t VALUES (6, 'y'), (7, 'y'), (8, 'y')")
        .expect("insert");
    // Not committed yet: not part of anybody's backlog.
    let mut open_tx = server.client(&db);
    open_tx
        .batch_execute("BEGIN; INSERT INTO t VALUES (9, 'late')")
        .expect("open transaction");

    let s = b.status().expect("status");
    let h = consumer_status(&s, "h");
    assert_eq!((h.backlog, h.dead_letters, h.evicted), (8, 0, false));
    assert_eq!(h.tables, vec!["t"]);
    assert!(h.oldest_pending_age_s.is_some_and(|a| a >= 0.0), "{h:?}");
    assert!(h.last_seen_us > 1_600_000_000_000_000);
    let t = table_status(&s, "t");
    assert_eq!(t.log_table, "epidemic.log_t");
    assert_eq!(t.columns, vec!["id", "v"]);
    assert_eq!(t.log_rows, 8);
    assert_eq!(
        t.triggers,
        TRIGGERS
            .iter()
            .map(|n| (n.to_string(), true))
            .collect::<Vec<_>>()
    );
    assert!(t.problems.is_empty(), "{:?}", t.problems);

    // Two of a batch handled; a third given up on.
    let batch = b.fetch(&c, 3).expect("fetch");
    b.ack(&c, &batch.token, batch.changes[1].id).expect("ack");
    b.add_dead_letter(&DeadLetter::new(&c, &batch.changes[2], "boom", 1, 1))
        .expect("dead letter");
    let s = b.status().expect("status");
    let h = consumer_status(&s, "h");
    assert_eq!((h.backlog, h.dead_letters), (6, 1));
    assert!(h.position.contains("batch"), "{}", h.position);
    open_tx.batch_execute("COMMIT").expect("commit");
    assert_eq!(
        consumer_status(&b.status().expect("status"), "h").backlog,
        7
    );
    assert_eq!(drain(&mut b, &c, 100).len(), 7);
    let s = b.status().expect("status");
    let h = consumer_status(&s, "h");
    assert_eq!((h.backlog, h.oldest_pending_age_s), (0, None));

    // A trigger dropped by hand: named, with what is lost.
    w.batch_execute("DROP TRIGGER epidemic_capture_update ON t")
        .expect("drop trigger");
    let s = b.status().expect("status");
    let t = table_status(&s, "t");
    assert_eq!(
        t.problems,
        vec!["trigger epidemic_capture_update on t is missing: UPDATE changes are not captured; run `epidemic install`"]
    );
    assert_eq!(t.triggers[1], ("epidemic_capture_update".to_owned(), false));
    w.execute("UPDATE t SET v = 'lost' WHERE id = 1", &[])
        .expect("update");
    assert!(drain(&mut b, &c, 100).is_empty());

    // Install puts back exactly that trigger.
    let plan = b.install(&watches).expect("install");
    // Created, enabled always and marked with its layout; no other trigger touched.
    let triggers: Vec<&String> = plan.iter().filter(|s| s.contains("TRIGGER")).collect();
    assert_eq!(triggers.len(), 3, "{plan:#?}");
    assert!(triggers[0].starts_with("CREATE TRIGGER \"epidemic_capture_update\" AFTER UPDATE"));
    assert!(
        triggers
            .iter()
            .all(|s| s.contains("\"epidemic_capture_update\"")),
        "{plan:#?}"
    );
    assert!(table_status(&b.status().expect("status"), "t")
        .problems
        .is_empty());
    w.execute("UPDATE t SET v = 'seen' WHERE id = 1", &[])
        .expect("update");
    let got = drain(&mut b, &c, 100);
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].op, text(got[0].new_value("v"))),
        (Op::Update, "seen".into())
    );
}

#[test]
fn a_watched_column_cannot_be_dropped_and_a_cascade_is_reported_then_repaired() {
    let (url, db) = database(
        "column_drift",
        "CREATE TABLE t (id int PRIMARY KEY, a varchar(10), b text, c text)",
    );
    let (mut b, h) = setup(&url, &[watch("t", &["id", "a", "c"])], "h");
    let mut admin = PgServer::shared().client(&db);
    let refused = |admin: &mut postgres::Client, sql: &str| -> String {
        let e = admin.batch_execute(sql).expect_err(sql);
        let db = e.as_db_error().expect("a server error");
        format!("{} {}", db.message(), db.detail().unwrap_or_default())
    };

    // Unwatched columns come and go freely; watched ones cannot be dropped or retyped.
    admin
        .batch_execute("ALTER TABLE t DROP COLUMN b")
        .expect("drop an unwatched column");
    let m = refused(&mut admin, "ALTER TABLE t DROP COLUMN a");
    assert!(
        m.contains("other objects depend on it") && m.contains("epidemic_capture_update"),
        "{m}"
    );
    let m = refused(&mut admin, "ALTER TABLE t ALTER COLUMN a TYPE varchar(20)");
    assert!(m.contains("used in a trigger definition"), "{m}");

    // The type change recipe of the install module's docs keeps capturing throughout.
    admin
        .batch_execute(
            r"BEGIN;
            CREATE TEMP TABLE capture_triggers ON COMMIT DROP AS
                SELECT tgname, pg_get_triggerdef(oid) AS def, obj_description(oid, 'pg_trigger') AS note
                FROM pg_trigger
                WHERE tgrelid = 't'::regclass AND tgname ~ '^epidemic_capture_(insert|update|delete)$';
            DROP TRIGGER epidemic_capture_insert ON t;
            DROP TRIGGER epidemic_capture_update ON t;
            DROP TRIGGER epidemic_capture_delete ON t;
            ALTER TABLE t ALTER COLUMN a TYPE varchar(20);
            DO $$ DECLARE t record; BEGIN
                FOR t IN SELECT * FROM capture_triggers LOOP
                    EXECUTE t.def;
                    EXECUTE format('ALTER TABLE t ENABLE ALWAYS TRIGGER %I', t.tgname);
                    EXECUTE format('COMMENT ON TRIGGER %I ON t IS %L', t.tgname, t.note);
                END LOOP;
            END $$;
            COMMIT;",
        )
        .expect("type change recipe");
    let plan = b
        .install(&[watch("t", &["id", "a", "c"])])
        .expect("install");
    assert!(plan.iter().all(|s| !s.contains("TRIGGER")), "{plan:#?}");
    admin
        .batch_execute(
            "INSERT INTO t VALUES (1, 'long enough!', 'c1'); UPDATE t SET a = 'x' WHERE id = 1",
        )
        .expect("writes");
    let got = drain_until(&mut b, &h, 2, Duration::from_secs(10));
    assert_eq!(
        got.iter().map(|c| c.op).collect::<Vec<_>>(),
        vec![Op::Insert, Op::Update]
    );

    // CASCADE takes the triggers along: writes go on, uncaptured, and status says so.
    admin
        .batch_execute("ALTER TABLE t DROP COLUMN a CASCADE; INSERT INTO t VALUES (2, 'c2')")
        .expect("drop cascade, then write");
    let s = b.status().expect("status");
    // The row triggers depend on the column; the TRUNCATE trigger names none.
    let mut want: Vec<String> = TRIGGERS[..3]
        .iter()
        .map(|n| {
            let op = n.rsplit('_').next().unwrap_or_default().to_uppercase();
            format!("trigger {n} on t is missing: {op} changes are not captured; run `epidemic install`")
        })
        .collect();
    want.push(
        "column a of table t no longer exists (dropped or renamed): handlers that need it cannot get it; \
         change their columns or restore the column, then run `epidemic install`"
            .into(),
    );
    assert_eq!(table_status(&s, "t").problems, want);

    // Install refuses while a handler still asks for the column, and repairs the
    // capture once none does.
    let err = b
        .install(&[watch("t", &["id", "a", "c"])])
        .expect_err("a is gone");
    assert!(
        matches!(err, BackendError::Invalid(ref m) if m.contains("column a of table t")),
        "{err:?}"
    );
    let plan = b.install(&[watch("t", &["id", "c"])]).expect("install");
    assert!(
        plan.iter()
            .any(|s| s.contains("DROP COLUMN IF EXISTS \"old_a\"")),
        "{plan:#?}"
    );
    let s = b.status().expect("status");
    assert!(table_status(&s, "t").problems.is_empty(), "{s:#?}");
    assert_eq!(table_status(&s, "t").columns, vec!["id", "c"]);
    admin
        .batch_execute("INSERT INTO t VALUES (3, 'c3')")
        .expect("insert");
    let got = drain_until(&mut b, &h, 1, Duration::from_secs(10));
    assert_eq!(
        got.len(),
        1,
        "the insert during the cascade was not captured"
    );
    assert_eq!(&*got[0].columns, &["id".to_owned(), "c".to_owned()]);
    assert_eq!(text(got[0].new_value("c")), "c3");

    // A rename is allowed (triggers name columns by number) but the capture function
    // names them: writes fail until install, and status names the column.
    admin
        .batch_execute("ALTER TABLE t RENAME COLUMN c TO c2")
        .expect("rename");
    let problems = table_status(&b.status().expect("status"), "t")
        .problems
        .clone();
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("column c of table t no longer exists (dropped or renamed)")),
        "{problems:?}"
    );
    let m = refused(&mut admin, "INSERT INTO t VALUES (4, 'c4')");
    assert!(m.contains("has no field \"c\""), "{m}");
    b.install(&[watch("t", &["id", "c2"])]).expect("install");
    admin
        .batch_execute("INSERT INTO t VALUES (4, 'c4')")
        .expect("insert");
    let got = drain_until(&mut b, &h, 1, Duration::from_secs(10));
    assert_eq!(text(got[0].new_value("c2")), "c4");
}

// ---------------------------------------------------------------------------------------
// The bench's scratch table
// ---------------------------------------------------------------------------------------

fn scratch_create() -> Scratch {
    Scratch::Create {
        table: SCRATCH_TABLE.into(),
    }
}

fn scratch_drop() -> Scratch {
    Scratch::Drop {
        table: SCRATCH_TABLE.into(),
    }
}

fn scratch_insert(first_id: i64, count: u64, per_tx: u64) -> Scratch {
    Scratch::Insert {
        table: SCRATCH_TABLE.into(),
        first_id,
        count,
        per_tx,
    }
}

fn capture_source(db: &str) -> String {
    PgServer::shared()
        .client(db)
        .query_one(
            "SELECT prosrc FROM pg_proc WHERE proname = 'capture_epidemic_bench_scratch'",
            &[],
        )
        .expect("capture function")
        .get(0)
}

#[test]
fn the_scratch_table_comes_and_goes_with_everything_epidemic_kept_for_it() {
    let (url, db) = database("scratch", "CREATE TABLE t (id int PRIMARY KEY)");
    let mut b = open(&url);
    // Without an installation.
    let before = catalog(&db);
    b.scratch(&scratch_create()).expect("create");
    assert!(catalog(&db).contains(&"relation public.epidemic_bench_scratch r".to_owned()));
    b.scratch(&scratch_drop()).expect("drop");
    assert_eq!(catalog(&db), before);
    // Only ever the scratch table.
    for op in [
        Scratch::Create { table: "t".into() },
        Scratch::Insert {
            table: "t".into(),
            first_id: 1,
            count: 1,
            per_tx: 1,
        },
        Scratch::Drop { table: "t".into() },
    ] {
        let err = b.scratch(&op).expect_err("not the scratch table");
        assert!(
            matches!(err, BackendError::Invalid(ref m) if m.contains(SCRATCH_TABLE)),
            "{err:?}"
        );
    }
    assert_eq!(catalog(&db), before);

    // Beside an installation for a user's table, with a consumer and a dead letter.
    let (mut b, h) = setup(&url, &[watch("t", &["id"])], "h");
    PgServer::shared()
        .client(&db)
        .execute("INSERT INTO t VALUES (1)", &[])
        .expect("insert");
    let change = drain_until(&mut b, &h, 1, Duration::from_secs(10)).remove(0);
    b.add_dead_letter(&DeadLetter::new(&h, &change, "boom", 1, 1))
        .expect("dead letter");
    let mixed = consumer("mixed");
    b.register(&mixed, &["t".into()], StartFrom::Now)
        .expect("register");
    let before = catalog(&db);
    let letters = b.dead_letters(&DeadLetterQuery::All).expect("letters");

    let scratch_watch = [watch(SCRATCH_TABLE, &["id", "payload"])];
    b.scratch(&scratch_create()).expect("create");
    b.install(&scratch_watch)
        .expect("the scratch table can be watched");
    // The bench measures writes without NOTIFY through a second connection, then
    // installs again with the configured options.
    let mut quiet = open_with(&url, json!({"notify": false}));
    let plan = quiet
        .install(&scratch_watch)
        .expect("install without notify");
    assert!(plan.iter().all(|s| !s.contains("TRIGGER")), "{plan:#?}");
    assert!(!capture_source(&db).contains("pg_notify"));
    b.install(&scratch_watch).expect("install with notify");
    assert!(capture_source(&db).contains("pg_notify"));

    let bench = Consumer {
        daemon: "epidemic-bench-1".into(),
        handler: "noop".into(),
    };
    b.register(&bench, &[SCRATCH_TABLE.into()], StartFrom::Now)
        .expect("register");
    b.register(&mixed, &["t".into(), SCRATCH_TABLE.into()], StartFrom::Now)
        .expect("register");
    b.scratch(&scratch_insert(1, 10, 1)).expect("insert");
    b.scratch(&scratch_insert(11, 25, 10)).expect("insert");
    let got = drain_until(&mut b, &bench, 35, Duration::from_secs(10));
    let ids: Vec<i64> = got.iter().map(|c| int(c.value("id"))).collect();
    assert_eq!(ids, (1..=35).collect::<Vec<_>>());
    assert_eq!(text(got[0].new_value("payload")), "bench");
    b.add_dead_letter(&DeadLetter::new(&bench, &got[0], "boom", 1, 1))
        .expect("dead letter");

    // A leftover of an interrupted run goes with its capture.
    b.scratch(&scratch_create())
        .expect("create over a leftover");
    let s = b.status().expect("status");
    assert_eq!(
        s.tables
            .iter()
            .map(|t| t.table.as_str())
            .collect::<Vec<_>>(),
        vec!["t"]
    );
    let consumers: Vec<(&str, &[String])> = s
        .consumers
        .iter()
        .map(|c| (c.handler.as_str(), c.tables.as_slice()))
        .collect();
    assert_eq!(
        consumers,
        vec![
            ("h", &["t".to_owned()][..]),
            ("mixed", &["t".to_owned()][..])
        ]
    );
    assert_eq!(
        b.dead_letters(&DeadLetterQuery::All).expect("letters"),
        letters
    );
    b.scratch(&scratch_insert(1, 3, 2))
        .expect("insert into the new table");

    b.install(&scratch_watch).expect("install");
    b.register(&bench, &[SCRATCH_TABLE.into()], StartFrom::Now)
        .expect("register");
    b.scratch(&scratch_drop()).expect("drop");
    assert_eq!(
        catalog(&db),
        before,
        "drop must leave the catalog as it was"
    );
    assert_eq!(
        b.dead_letters(&DeadLetterQuery::All).expect("letters"),
        letters
    );
    assert_eq!(b.status().expect("status").consumers.len(), 2);
}

#[test]
fn quick_bench_runs_and_cleans_up() {
    let (url, db) = database(
        "bench",
        "CREATE TABLE users (id int PRIMARY KEY, name text)",
    );
    let before = catalog(&db);
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("epidemic.toml");
    std::fs::write(&config, format!("[database]\nurl = {url:?}\n")).expect("config");
    let out = epidemic(&config, &["bench", "--quick", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("bench --json prints JSON");
    assert_eq!(r["backend"], "postgres");
    assert!(r["drain_per_s"].as_f64().is_some_and(|v| v > 0.0), "{r}");
    // The backend declares the variants; the core names no option.
    assert_eq!(r["write_variants"][0]["label"], "notify off", "{r}");
    assert_eq!(r["write_variants"][1]["label"], "linger 0", "{r}");
    for v in 0..2 {
        assert!(
            r["write_variants"][v]["write"]["rows"]
                .as_u64()
                .is_some_and(|n| n > 0),
            "the measurement of variant {v} ran: {r}"
        );
    }
    assert_eq!(catalog(&db), before, "bench left something behind");
}

// ---------------------------------------------------------------------------------------
// Passwords
// ---------------------------------------------------------------------------------------

#[test]
fn no_password_reaches_a_message_or_the_status() {
    const PASSWORD: &str = "s3cr3t-pw";
    let server = PgServer::start_private();
    server.create_database("secrets");
    server
        .client("postgres")
        .batch_execute(&format!(
            "CREATE ROLE app LOGIN PASSWORD '{PASSWORD}'; ALTER DATABASE secrets OWNER TO app;"
        ))
        .expect("role");
    let port = server.port();
    let url = |db: &str| format!("postgres://app:{PASSWORD}@127.0.0.1:{port}/{db}");
    let hidden = |what: &str, text: &str| {
        assert!(
            !text.contains(PASSWORD),
            "{what} shows the password: {text}"
        );
    };

    // The application's own role owns its table and Epidemic's schema.
    let mut app =
        postgres::Client::connect(&url("secrets"), postgres::NoTls).expect("connect as app");
    app.batch_execute("CREATE TABLE mail_users (id int PRIMARY KEY, name text)")
        .expect("table");
    let (mut b, c) = setup(
        &url("secrets"),
        &[watch("mail_users", &["id", "name"])],
        "h",
    );
    app.batch_execute("INSERT INTO mail_users VALUES (1, 'ann'), (2, 'bob')")
        .expect("insert");
    let batch = b.fetch(&c, 1).expect("fetch");
    b.add_dead_letter(&DeadLetter::new(&c, &batch.changes[0], "failed", 1, 1))
        .expect("dead letter");
    let status = b.status().expect("status");
    assert_eq!(consumer_status(&status, "h").backlog, 2);
    hidden("status", &serde_json::to_string(&status).expect("json"));
    hidden("status", &format!("{status:?}"));

    // A database that does not exist, with the password in each form libpq takes.
    for bad in [
        url("nope"),
        format!("postgres://app@127.0.0.1:{port}/nope?password={PASSWORD}&connect_timeout=5"),
        format!("host=127.0.0.1 port={port} user=app password={PASSWORD} dbname=nope"),
    ] {
        let err = library()
            .open_backend(&bad, &json!({}))
            .err()
            .expect("no such database");
        hidden("a wrong database name", &err.to_string());
        assert!(err.to_string().contains("\"nope\" does not exist"), "{err}");
    }

    // The server goes away under a working backend.
    server.stop(StopMode::Fast);
    let err = b.fetch(&c, 10).expect_err("server stopped");
    assert!(err.is_connection(), "{err:?}");
    hidden("a lost connection", &err.to_string());
    let err = b.reconnect().expect_err("server stopped");
    assert!(err.is_connection(), "{err:?}");
    hidden("a failed reconnect", &err.to_string());
    assert!(err.to_string().contains("app:***@127.0.0.1"), "{err}");
    let err = b.status().expect_err("server stopped");
    hidden("status without a server", &err.to_string());

    server.start();
    assert!(wait_for_server(&server, "secrets", Duration::from_secs(30)));
    b.reconnect().expect("reconnect");
    hidden(
        "status",
        &serde_json::to_string(&b.status().expect("status")).expect("json"),
    );
}

// ---------------------------------------------------------------------------------------
// SDK 0.2: keys, stable ids, transactions, commit order, schemas
// ---------------------------------------------------------------------------------------

fn keyed(table: &str, columns: &[&str], key: &[&str]) -> Watch {
    Watch {
        key: key.iter().map(|c| c.to_string()).collect(),
        ..watch(table, columns)
    }
}

#[test]
fn the_daemon_refuses_a_table_without_a_key_in_one_line_and_takes_the_configured_one() {
    let (url, db) = database(
        "nokey_cli",
        "CREATE TABLE boxes (owner text NOT NULL, path text NOT NULL, size int)",
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("rec.jsonl");
    let handler = epidemic_tests::recorder_handler("rec", &out, "boxes", &["owner", "size"], "");
    let config = dir.path().join("epidemic.toml");
    let write_config = |table_section: &str| {
        std::fs::write(
            &config,
            format!("[database]\nurl = {url:?}\n\n{table_section}{handler}"),
        )
        .expect("config");
    };

    write_config("");
    for command in ["install", "sql"] {
        let run = epidemic(&config, &[command]);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success(), "{command}: {stderr}");
        let reason: Vec<&str> = stderr
            .lines()
            .filter(|l| l.contains("no primary key"))
            .collect();
        assert_eq!(reason.len(), 1, "{command}: {stderr}");
        assert!(
            reason[0].contains("table boxes has no primary key")
                && reason[0].contains("[table.boxes] key = ["),
            "{command}: {stderr}"
        );
    }
    assert!(!schema_exists(&db, "epidemic"));

    write_config("[table.boxes]\nkey = [\"owner\", \"missing\"]\n\n");
    let run = epidemic(&config, &["install"]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "{stderr}");
    assert!(
        stderr.contains("table boxes has no column missing"),
        "{stderr}"
    );

    write_config("[table.boxes]\nkey = [\"owner\", \"path\"]\n\n");
    let run = epidemic(&config, &["install"]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let key: Vec<String> = PgServer::shared()
        .client(&db)
        .query_one(
            "SELECT key_columns FROM epidemic.watched_table WHERE table_name = 'boxes'",
            &[],
        )
        .expect("registry")
        .get(0);
    assert_eq!(key, ["owner", "path"]);
}

#[test]
fn a_changed_key_is_captured_from_then_on_loses_nothing_and_a_dropped_key_column_is_drift() {
    let (url, db) = database(
        "rekey",
        "CREATE TABLE users (id int PRIMARY KEY, email text NOT NULL UNIQUE, name text)",
    );
    let (mut b, c) = setup(&url, &[watch("users", &["name"])], "h");
    let mut w = PgServer::shared().client(&db);
    w.execute("INSERT INTO users VALUES (1, 'a@x', 'ann')", &[])
        .expect("insert");
    // The next install names another key: it is recorded and captured from then on.
    let plan = b
        .install(&[keyed("users", &["name"], &["email"])])
        .expect("install with another key");
    assert!(
        plan.iter()
            .any(|s| s.contains("SET key_columns = ARRAY['email']")),
        "{plan:#?}"
    );
    assert!(
        plan.iter()
            .any(|s| s.contains("ADD COLUMN IF NOT EXISTS \"old_email\"")),
        "{plan:#?}"
    );
    w.batch_execute(
        "INSERT INTO users VALUES (2, 'b@x', 'bob');
         UPDATE users SET email = 'bob@x' WHERE id = 2;",
    )
    .expect("write");
    let got = drain_until(&mut b, &c, 3, Duration::from_secs(10));
    assert_eq!(got.len(), 3, "nothing lost across the key change: {got:#?}");
    assert_eq!(&*got[2].key_columns, &["email".to_owned()]);
    // Logged before email was captured: the log has no value for it.
    assert_eq!(got[0].key, vec![Value::Null]);
    assert_eq!(got[1].key, vec![Value::from("b@x")]);
    assert_eq!(got[2].key, vec![Value::from("bob@x")]);
    assert_eq!(got[2].old_key, Some(vec![Value::from("b@x")]));
    // The same install again changes nothing about the key.
    let again = b
        .install(&[keyed("users", &["name"], &["email"])])
        .expect("install again");
    assert!(
        again.iter().all(|s| !s.contains("SET key_columns")),
        "{again:#?}"
    );

    // A key column dropped with CASCADE (which takes the triggers along) is drift.
    w.batch_execute("ALTER TABLE users DROP COLUMN email CASCADE")
        .expect("drop the key column");
    let problems = table_status(&b.status().expect("status"), "users")
        .problems
        .clone();
    assert!(
        problems
            .iter()
            .any(|p| p.contains("key column email of table users no longer exists")),
        "{problems:#?}"
    );
}

/// The stable ids of the changes, and the identity part (before the `-`).
fn stable_ids(changes: &[Change]) -> Vec<String> {
    changes.iter().map(|c| c.stable_id.clone()).collect()
}

fn identity(change: &Change) -> String {
    let (identity, id) = change
        .stable_id
        .rsplit_once('-')
        .unwrap_or_else(|| panic!("stable id {:?}", change.stable_id));
    assert_eq!(id, change.id.to_string(), "{}", change.stable_id);
    assert_eq!(identity.len(), 16, "{}", change.stable_id);
    identity.to_owned()
}

fn insert_users(db: &str, ids: std::ops::Range<i32>) {
    let mut w = PgServer::shared().client(db);
    for i in ids {
        w.execute("INSERT INTO users VALUES ($1, 'u')", &[&i])
            .expect("insert");
    }
}

#[test]
fn stable_ids_survive_redelivery_and_are_not_reused_after_uninstall_and_install() {
    let (url, db) = database(
        "stable_uninstall",
        "CREATE TABLE users (id int PRIMARY KEY, name text)",
    );
    let watches = [watch("users", &["name"])];
    let (mut b, c) = setup(&url, &watches, "h");
    insert_users(&db, 0..3);
    // A batch fetched again (not acknowledged: a crash) carries the same stable ids.
    let first = wait_fetch(&mut b, &c, 3);
    let mut other = open(&url);
    let again = other.fetch(&c, 10).expect("fetch again");
    assert_eq!(stable_ids(&again.changes), stable_ids(&first.changes));
    let before = drain(&mut b, &c, 10);
    assert_eq!(stable_ids(&before), stable_ids(&first.changes));

    b.uninstall().expect("uninstall");
    let (mut b, c) = setup(&url, &watches, "h");
    insert_users(&db, 3..6);
    let after = drain_until(&mut b, &c, 3, Duration::from_secs(10));
    // The sequence started over with the schema: the same ids, another log identity.
    assert_eq!(
        after.iter().map(|c| c.id).collect::<Vec<_>>(),
        before.iter().map(|c| c.id).collect::<Vec<_>>()
    );
    assert_ne!(identity(&after[0]), identity(&before[0]));
    let old: HashSet<String> = stable_ids(&before).into_iter().collect();
    assert!(stable_ids(&after).iter().all(|s| !old.contains(s)));
}

/// Fetch until a batch with `n` changes arrives (not acknowledged).
fn wait_fetch(b: &mut HostBackend, c: &Consumer, n: usize) -> epidemic_plugin_sdk::backend::Batch {
    let mut batch = Default::default();
    assert!(wait_until(Duration::from_secs(10), || {
        batch = b.fetch(c, 100).expect("fetch");
        batch.changes.len() >= n
    }));
    batch
}

#[test]
fn a_log_table_dropped_or_recreated_by_hand_gets_a_new_identity_at_the_next_install() {
    let (url, db) = database(
        "stable_droplog",
        "CREATE TABLE users (id int PRIMARY KEY, name text)",
    );
    let watches = [watch("users", &["name"])];
    let (mut b, c) = setup(&url, &watches, "h");
    insert_users(&db, 0..2);
    let first = drain_until(&mut b, &c, 2, Duration::from_secs(10));
    let mut seen: HashSet<String> = stable_ids(&first).into_iter().collect();
    let mut identities = vec![identity(&first[0])];
    let mut admin = PgServer::shared().client(&db);

    // Dropped: writes to the table fail and status says so until install creates it.
    admin
        .batch_execute("DROP TABLE epidemic.log_users")
        .expect("drop the log");
    assert!(admin
        .execute("INSERT INTO users VALUES (100, 'lost')", &[])
        .is_err());
    let problems = table_status(&b.status().expect("status"), "users")
        .problems
        .clone();
    assert!(
        problems
            .iter()
            .any(|p| p.contains("log table epidemic.log_users of users is missing")),
        "{problems:#?}"
    );
    let plan = b.install(&watches).expect("install");
    assert!(
        plan.iter()
            .any(|s| s.starts_with("CREATE TABLE IF NOT EXISTS \"epidemic\".\"log_users\"")),
        "{plan:#?}"
    );
    assert!(table_status(&b.status().expect("status"), "users")
        .problems
        .is_empty());
    insert_users(&db, 2..4);
    let second = drain_until(&mut b, &c, 2, Duration::from_secs(10));
    identities.push(identity(&second[0]));

    // Re-created by hand (as a restore would): another table under the log's name.
    admin
        .batch_execute(
            "CREATE TABLE epidemic.copy (LIKE epidemic.log_users INCLUDING ALL);
             DROP TABLE epidemic.log_users;
             ALTER TABLE epidemic.copy RENAME TO log_users;",
        )
        .expect("re-create the log by hand");
    let problems = table_status(&b.status().expect("status"), "users")
        .problems
        .clone();
    assert!(
        problems
            .iter()
            .any(|p| p.contains("is not the one Epidemic created")),
        "{problems:#?}"
    );
    b.install(&watches).expect("install");
    assert!(table_status(&b.status().expect("status"), "users")
        .problems
        .is_empty());
    insert_users(&db, 4..6);
    let third = drain_until(&mut b, &c, 2, Duration::from_secs(10));
    identities.push(identity(&third[0]));

    let distinct: HashSet<&String> = identities.iter().collect();
    assert_eq!(distinct.len(), 3, "{identities:?}");
    for s in stable_ids(&second).into_iter().chain(stable_ids(&third)) {
        assert!(seen.insert(s.clone()), "stable id {s} handed out twice");
    }
}

#[test]
fn a_sequence_set_back_is_reported_and_install_moves_it_past_every_id_used() {
    let (url, db) = database(
        "stable_sequence",
        "CREATE TABLE users (id int PRIMARY KEY, name text)",
    );
    let watches = [watch("users", &["name"])];
    let (mut b, c) = setup(&url, &watches, "h");
    insert_users(&db, 0..3);
    let before = drain_until(&mut b, &c, 3, Duration::from_secs(10));
    // Everything handled is pruned: the log is empty, only the record of what was
    // pruned remembers the ids. Idle fetches move the cursor past transactions that
    // other tests' keep open on this server.
    assert!(wait_until(Duration::from_secs(30), || {
        assert!(b.fetch(&c, 100).expect("fetch").changes.is_empty());
        b.prune().expect("prune");
        log_count(&db, "log_users") == 0
    }));
    PgServer::shared()
        .client(&db)
        .batch_execute("ALTER SEQUENCE epidemic.change_id RESTART")
        .expect("restart the sequence");
    let warnings = b.status().expect("status").warnings;
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("change id sequence epidemic.change_id is behind id")),
        "{warnings:#?}"
    );
    b.install(&watches).expect("install");
    assert!(b.status().expect("status").warnings.is_empty());
    insert_users(&db, 3..6);
    let after = drain_until(&mut b, &c, 3, Duration::from_secs(10));
    let top = before.iter().map(|c| c.id).max().unwrap_or(0);
    assert!(after.iter().all(|c| c.id > top), "{after:#?}");
    let old: HashSet<String> = stable_ids(&before).into_iter().collect();
    assert!(stable_ids(&after).iter().all(|s| !old.contains(s)));
}

#[test]
fn transactions_commit_order_and_schemas_come_with_every_change() {
    let (url, db) = database(
        "txids",
        "CREATE SCHEMA app;
         CREATE TABLE app.users (id int PRIMARY KEY, name text);
         CREATE TABLE boxes (id int PRIMARY KEY, size int);",
    );
    let (mut b, c) = setup(
        &url,
        &[watch("app.users", &["name"]), watch("boxes", &["size"])],
        "h",
    );
    let caps = b.capabilities();
    assert!(caps.transaction_ids && caps.commit_order && caps.schemas);

    let server = PgServer::shared();
    let mut w = server.client(&db);
    // A transaction over both tables, then one on its own.
    w.batch_execute(
        "BEGIN;
         INSERT INTO app.users VALUES (1, 'ann');
         INSERT INTO boxes VALUES (1, 10);
         UPDATE app.users SET name = 'anna' WHERE id = 1;
         COMMIT;
         INSERT INTO boxes VALUES (2, 20);",
    )
    .expect("write");
    let first = drain_until(&mut b, &c, 4, Duration::from_secs(10));
    assert_eq!(first.len(), 4);
    let schemas: Vec<(&str, Option<&str>)> = first
        .iter()
        .map(|ch| (ch.table.as_str(), ch.schema.as_deref()))
        .collect();
    assert_eq!(
        schemas,
        vec![
            ("app.users", Some("app")),
            ("boxes", Some("public")),
            ("app.users", Some("app")),
            ("boxes", Some("public")),
        ]
    );
    let txids: Vec<i64> = first.iter().map(|ch| ch.txid.expect("txid")).collect();
    assert!(txids[0] == txids[1] && txids[1] == txids[2], "{txids:?}");
    assert_ne!(txids[2], txids[3]);

    // T1 takes its transaction id first but commits after T2, with a fetch between:
    // commit order, not transaction id order, decides `commit_seq`.
    let mut t1 = server.client(&db);
    t1.batch_execute("BEGIN; INSERT INTO boxes VALUES (3, 30)")
        .expect("t1");
    w.execute("INSERT INTO boxes VALUES (4, 40)", &[])
        .expect("t2");
    let t2 = drain_until(&mut b, &c, 1, Duration::from_secs(10));
    assert_eq!(t2.len(), 1);
    t1.batch_execute("COMMIT").expect("commit t1");
    let t1 = drain_until(&mut b, &c, 1, Duration::from_secs(10));
    assert_eq!(t1.len(), 1);
    assert!(t1[0].txid < t2[0].txid);

    let delivered: Vec<&Change> = first.iter().chain(&t2).chain(&t1).collect();
    let seqs: Vec<i64> = delivered
        .iter()
        .map(|ch| ch.commit_seq.expect("commit_seq"))
        .collect();
    assert!(seqs.windows(2).all(|p| p[0] <= p[1]), "{seqs:?}");
    assert!(seqs[3] < seqs[4] && seqs[4] < seqs[5], "{seqs:?}");
}

#[test]
fn a_transaction_left_open_elsewhere_does_not_hold_back_pruning() {
    let (url, db) = database(
        "prune_open_tx",
        "CREATE TABLE users (id int PRIMARY KEY, name text);
         CREATE TABLE other (id int);",
    );
    let (mut b, c) = setup(&url, &[watch("users", &["name"])], "h");
    let late = consumer("late");
    b.register(&late, &["users".into()], StartFrom::Oldest)
        .expect("register");
    // An unrelated transaction with a transaction id, open before the changes and
    // until the end: every snapshot's xmin stays below it.
    let mut open_tx = PgServer::shared().client(&db);
    open_tx
        .batch_execute("BEGIN; INSERT INTO other VALUES (1)")
        .expect("open a transaction");
    insert_users(&db, 0..3);
    assert_eq!(drain_until(&mut b, &c, 3, Duration::from_secs(10)).len(), 3);
    assert_eq!(b.prune().expect("prune"), 0, "late has handled nothing");
    assert_eq!(
        drain_until(&mut b, &late, 3, Duration::from_secs(10)).len(),
        3
    );
    // Both consumers' snapshots show the three transactions as committed: they go,
    // although the open transaction is older.
    assert_eq!(b.prune().expect("prune"), 3);
    assert_eq!(log_count(&db, "log_users"), 0);
    open_tx.batch_execute("COMMIT").expect("commit");
}
