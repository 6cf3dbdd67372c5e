//! The MySQL backend's side of backfills against a real MariaDB: chunks read by key
//! (composite, text and typed keys, paged with `after` to the end), the watermark each
//! chunk writes into the log and how it comes through every consumer's stream, the
//! ordering rule under concurrent writers (every change committed before a chunk's read
//! comes before its watermark, gaps included), the progress store, and one backfill
//! end to end through the daemon. Each test has its own database on the shared server.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use epidemic_plugin_host::{load, HostBackend};
use epidemic_plugin_sdk::backend::{
    BackendError, BackfillProgress, BackfillRequest, BackfillState, Chunk, ChunkRequest, Consumer,
    StartFrom, Watch,
};
use epidemic_plugin_sdk::{Change, Op, Origin, Value};
use epidemic_tests::mysql::MySqlServer;
use epidemic_tests::rng::Rng;
use epidemic_tests::{backend_path, epidemic, recorded, recorder_handler, wait_until, Daemon};
use mysql::prelude::Queryable;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

fn open_with(url: &str, options: serde_json::Value) -> HostBackend {
    let lib = load(&backend_path("mysql")).expect("load the mysql backend");
    lib.open_backend(url, &options).expect("open backend")
}

fn open(url: &str) -> HostBackend {
    open_with(url, json!({}))
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

fn connect(url: &str) -> mysql::Conn {
    mysql::Conn::new(mysql::Opts::from_url(url).unwrap()).unwrap()
}

fn chunk(b: &mut HostBackend, table: &str, after: Option<Vec<Value>>, limit: u32) -> Chunk {
    b.snapshot_chunk(&ChunkRequest {
        table: table.into(),
        after,
        limit,
        only: Vec::new(),
    })
    .expect("snapshot_chunk")
}

/// Every chunk of `table`, paging with the last row's key until `last`.
fn page_through(b: &mut HostBackend, table: &str, limit: u32) -> Vec<Chunk> {
    let mut chunks: Vec<Chunk> = Vec::new();
    let mut after = None;
    loop {
        let c = chunk(b, table, after.clone(), limit);
        assert!(
            c.rows.len() <= limit as usize,
            "a chunk holds at most `limit` rows"
        );
        let last = c.last;
        if let Some(r) = c.rows.last() {
            after = Some(r.key.clone());
        }
        chunks.push(c);
        if last {
            return chunks;
        }
        // A chunk that starts where the last one did never ends.
        assert!(
            chunks.len() < 1_000,
            "paging never ends; first keys of the chunks: {:?}",
            chunks
                .iter()
                .take(12)
                .map(|c| c.rows.first().map(|r| r.key.clone()))
                .collect::<Vec<_>>()
        );
    }
}

/// Fetch and ack until `done` holds for what arrived, or fail after WAIT.
fn fetch_until(
    b: &mut HostBackend,
    c: &Consumer,
    max: u32,
    mut done: impl FnMut(&[Change]) -> bool,
) -> Vec<Change> {
    let mut out = Vec::new();
    let deadline = Instant::now() + WAIT;
    while !done(&out) {
        assert!(
            Instant::now() < deadline,
            "{c}: still waiting after {WAIT:?}; got {:?}",
            out.iter()
                .map(|c: &Change| (c.id, c.origin))
                .collect::<Vec<_>>()
        );
        let batch = b.fetch(c, max).expect("fetch");
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

fn has_watermark(id: i64) -> impl FnMut(&[Change]) -> bool {
    move |seen: &[Change]| {
        seen.iter()
            .any(|c| c.origin == Origin::Watermark && c.id == id)
    }
}

fn position(stream: &[Change], pred: impl Fn(&Change) -> bool) -> usize {
    stream
        .iter()
        .position(pred)
        .unwrap_or_else(|| panic!("not in the stream"))
}

#[test]
fn chunks_page_through_composite_and_text_keys_in_key_order() {
    let (url, mut conn) = database(
        "bf_paging",
        "CREATE TABLE pairs (a INT NOT NULL, b VARCHAR(20) CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci NOT NULL, \
             v VARCHAR(20), PRIMARY KEY (a, b)) ENGINE=InnoDB;
         CREATE TABLE names (name VARCHAR(40) CHARACTER SET latin1 COLLATE latin1_swedish_ci NOT NULL PRIMARY KEY, \
             v INT) ENGINE=InnoDB",
    );
    // Case, accents, quotes, backslashes, a 4-byte character, the empty string: the
    // collation's order, not the bytes', and no quoting that could break.
    let words = ["a", "B", "c'q", "ö", "z\\", "Émile", "😀", "", " sp", "Zz"];
    let mut rng = Rng::from_state(7);
    let mut pairs: Vec<(i64, &str)> = (0..6)
        .flat_map(|a| words.iter().map(move |w| (a, *w)))
        .collect();
    for i in (1..pairs.len()).rev() {
        pairs.swap(i, rng.below(i as u64 + 1) as usize);
    }
    for (a, b) in &pairs {
        conn.exec_drop("INSERT INTO pairs (a, b, v) VALUES (?, ?, 'x')", (a, b))
            .unwrap();
    }
    let names = [
        "alice",
        "Bob",
        "Çelik",
        "dave",
        "O'Brien",
        "back\\slash",
        "zoé",
        "Zed",
        "émile",
        "Åsa",
    ];
    for n in names {
        conn.exec_drop("INSERT INTO names (name, v) VALUES (?, 1)", (n,))
            .unwrap();
    }
    let mut b = open(&url);
    b.install(&[watch("pairs", &["v"]), watch("names", &["v"])])
        .expect("install");

    // 60 rows by 7: eight full chunks, then a last one of four.
    let chunks = page_through(&mut b, "pairs", 7);
    assert_eq!(chunks.len(), 9);
    assert!(chunks[..8].iter().all(|c| c.rows.len() == 7 && !c.last));
    assert_eq!(chunks[8].rows.len(), 4);
    let got: Vec<Vec<Value>> = chunks
        .iter()
        .flat_map(|c| c.rows.iter().map(|r| r.key.clone()))
        .collect();
    let want: Vec<Vec<Value>> = conn
        .query_map(
            "SELECT a, b FROM pairs ORDER BY a, b",
            |(a, b): (i64, String)| vec![Value::Int(a), Value::Text(b)],
        )
        .unwrap();
    assert_eq!(got, want, "every row once, in the server's key order");
    let mut watermarks: Vec<i64> = chunks.iter().map(|c| c.watermark).collect();
    assert!(watermarks.windows(2).all(|w| w[0] < w[1]), "{watermarks:?}");
    assert!(chunks.iter().all(|c| c.rows_estimate.is_some()));

    // 10 rows by 5: two full chunks, then an empty one that says it is the last.
    let chunks = page_through(&mut b, "names", 5);
    assert_eq!(
        chunks
            .iter()
            .map(|c| (c.rows.len(), c.last))
            .collect::<Vec<_>>(),
        [(5, false), (5, false), (0, true)]
    );
    let got: Vec<Vec<Value>> = chunks
        .iter()
        .flat_map(|c| c.rows.iter().map(|r| r.key.clone()))
        .collect();
    let want: Vec<Vec<Value>> = conn
        .query_map("SELECT name FROM names ORDER BY name", |n: String| {
            vec![Value::Text(n)]
        })
        .unwrap();
    assert_eq!(got, want);
    // Every chunk wrote a watermark, the empty last one too.
    watermarks = chunks.iter().map(|c| c.watermark).collect();
    let in_log: Vec<i64> = conn
        .query("SELECT id FROM epidemic_log_names WHERE op = 'W' ORDER BY id")
        .unwrap();
    assert_eq!(in_log, watermarks);
}

#[test]
fn snapshot_rows_carry_the_same_key_and_values_as_live_changes() {
    let (url, mut conn) = database(
        "bf_typed",
        "CREATE TABLE typed (id BIGINT UNSIGNED NOT NULL, d DECIMAL(12,2) NOT NULL, t DATETIME(6) NOT NULL, \
             bin VARBINARY(8) NOT NULL, s VARCHAR(20) CHARACTER SET latin1 NOT NULL, \
             n INT, f DOUBLE, ts TIMESTAMP NULL DEFAULT NULL, e ENUM('x','y'), txt TEXT, \
             PRIMARY KEY (id, d, t, bin, s)) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
    );
    let mut b = open(&url);
    b.install(&[watch("typed", &["n", "f", "ts", "e", "txt"])])
        .expect("install");
    let c = consumer("typed");
    b.register(&c, &["typed".into()], StartFrom::Oldest)
        .expect("register");
    for stmt in [
        "INSERT INTO typed VALUES (18446744073709551615, 12.50, '2024-01-02 03:04:05.000006', x'00ff', 'Çé', 1, 1.5, '2024-05-06 07:08:09', 'y', 'long text')",
        "INSERT INTO typed VALUES (7, -0.01, '1999-12-31 23:59:59', x'', '', NULL, NULL, NULL, NULL, NULL)",
        "INSERT INTO typed VALUES (7, -0.01, '1999-12-31 23:59:59', x'00', 'a''b', 2, -3.25, NULL, 'x', '😀')",
        "INSERT INTO typed VALUES (7, 3.00, '1999-12-31 23:59:59', x'00', 'z', 3, 0, NULL, 'x', '')",
    ] {
        conn.query_drop(stmt).unwrap();
    }
    let live = fetch_until(&mut b, &c, 100, |s| s.len() >= 4);
    let whole = chunk(&mut b, "typed", None, 100);
    assert_eq!(whole.rows.len(), 4);
    assert!(whole.last);
    let mut stable_ids = BTreeSet::new();
    for (i, row) in whole.rows.iter().enumerate() {
        let twin = live
            .iter()
            .find(|l| l.key == row.key)
            .unwrap_or_else(|| panic!("no live change has the key {:?}", row.key));
        assert_eq!(row.key_columns, twin.key_columns);
        assert_eq!(row.columns, twin.columns);
        assert_eq!(row.new, twin.new, "values of {:?}", row.key);
        assert_eq!(row.table, "typed");
        assert_eq!(
            (row.op, row.origin, row.id),
            (Op::Insert, Origin::Snapshot, 0)
        );
        assert!(row.old.is_none() && row.old_key.is_none());
        assert!(
            row.stable_id
                .ends_with(&format!("-w{}.{i}", whole.watermark)),
            "{}",
            row.stable_id
        );
        assert!(stable_ids.insert(row.stable_id.clone()));
    }
    assert_eq!(
        whole.rows[3].key[0],
        Value::Text("18446744073709551615".into()),
        "an unsigned BIGINT beyond i64 comes as text, sorted last"
    );
    // Paging one row at a time goes through every kind of key literal.
    let one_by_one = page_through(&mut b, "typed", 1);
    let keys: Vec<Vec<Value>> = one_by_one
        .iter()
        .flat_map(|c| c.rows.iter().map(|r| r.key.clone()))
        .collect();
    let want: Vec<Vec<Value>> = whole.rows.iter().map(|r| r.key.clone()).collect();
    assert_eq!(keys, want);
    // Another chunk's rows never share a stable id.
    for c in &one_by_one {
        for r in &c.rows {
            assert!(stable_ids.insert(r.stable_id.clone()), "{}", r.stable_id);
        }
    }
}

#[test]
fn a_key_that_cannot_page_through_the_table_is_refused_and_nothing_is_stored() {
    let (url, _conn) = database(
        "bf_keys",
        "CREATE TABLE nokey (email VARCHAR(80) NULL, v INT, UNIQUE KEY (email)) ENGINE=InnoDB;
         CREATE TABLE dupes (grp INT NOT NULL, v INT) ENGINE=InnoDB;
         CREATE TABLE floaty (x DOUBLE NOT NULL PRIMARY KEY, v INT) ENGINE=InnoDB;
         CREATE TABLE enums (e ENUM('b','a') NOT NULL PRIMARY KEY, v INT) ENGINE=InnoDB;
         CREATE TABLE fine (id INT NOT NULL PRIMARY KEY, v INT) ENGINE=InnoDB;
         CREATE TABLE unwatched (id INT NOT NULL PRIMARY KEY) ENGINE=InnoDB",
    );
    let mut b = open(&url);
    let keyed = |table: &str, key: &str| Watch {
        key: vec![key.into()],
        ..watch(table, &["v"])
    };
    b.install(&[
        keyed("nokey", "email"),
        keyed("dupes", "grp"),
        watch("floaty", &["v"]),
        watch("enums", &["v"]),
        watch("fine", &["v"]),
    ])
    .expect("install");
    let c = consumer("keys");
    for (table, says) in [
        ("nokey", "email"),
        ("dupes", "not unique"),
        ("floaty", "x (double)"),
        ("enums", "e (enum('b','a'))"),
        ("unwatched", "not watched"),
    ] {
        let err = b
            .backfills(&BackfillRequest::Request {
                consumer: c.clone(),
                tables: vec!["fine".into(), table.into()],
                requested_by: "test".into(),
            })
            .expect_err(table);
        match &err {
            BackendError::Invalid(m) => assert!(m.contains(table) && m.contains(says), "{m}"),
            other => panic!("{table}: {other:?}"),
        }
        let err = b
            .snapshot_chunk(&ChunkRequest {
                table: table.into(),
                after: None,
                limit: 10,
                only: Vec::new(),
            })
            .expect_err(table);
        assert!(matches!(err, BackendError::Invalid(_)), "{err:?}");
    }
    let stored = b.backfills(&BackfillRequest::List).unwrap().backfills;
    assert!(stored.is_empty(), "nothing stored: {stored:?}");
}

#[test]
fn the_watermark_comes_after_what_committed_before_the_read_to_every_consumer_and_is_pruned() {
    let (url, mut conn) = database(
        "bf_watermark",
        "CREATE TABLE t (k INT PRIMARY KEY, v VARCHAR(20)) ENGINE=InnoDB",
    );
    let mut b = open(&url);
    b.install(&[watch("t", &["v"])]).expect("install");
    let (c1, c2) = (consumer("one"), consumer("two"));
    for c in [&c1, &c2] {
        b.register(c, &["t".into()], StartFrom::Oldest)
            .expect("register");
    }
    conn.query_drop("INSERT INTO t VALUES (1, 'before')")
        .unwrap();
    let ch = chunk(&mut b, "t", None, 10);
    assert_eq!(ch.rows.len(), 1);
    conn.query_drop("INSERT INTO t VALUES (2, 'after')")
        .unwrap();
    conn.query_drop("UPDATE t SET v = 'after' WHERE k = 1")
        .unwrap();
    for c in [&c1, &c2] {
        let mut reader = open(&url);
        let stream = fetch_until(&mut reader, c, 100, |s| s.len() >= 4);
        let w = position(&stream, |x| x.origin == Origin::Watermark);
        let wm = &stream[w];
        assert_eq!(wm.id, ch.watermark, "{c}");
        assert_eq!(wm.table, "t");
        assert!(
            wm.old.is_none() && wm.new.is_none() && wm.key.is_empty(),
            "{wm:?}"
        );
        assert!(!wm.stable_id.is_empty());
        let values: Vec<(Op, String)> = stream
            .iter()
            .filter(|x| x.origin == Origin::Live)
            .map(|x| {
                (
                    x.op,
                    x.value("v").map(|v| v.to_string()).unwrap_or_default(),
                )
            })
            .collect();
        assert_eq!(
            values,
            [
                (Op::Insert, "before".to_owned()),
                (Op::Insert, "after".to_owned()),
                (Op::Update, "after".to_owned())
            ]
        );
        assert_eq!(
            w, 1,
            "{c}: committed before the read, then the watermark, then the rest"
        );
    }
    // Pruned like any row once both consumers are past it (the newest row always stays).
    let count_w = |conn: &mut mysql::Conn| -> i64 {
        conn.query_first("SELECT COUNT(*) FROM epidemic_log_t WHERE op = 'W'")
            .unwrap()
            .unwrap()
    };
    assert_eq!(count_w(&mut conn), 1);
    b.prune().expect("prune");
    assert_eq!(count_w(&mut conn), 0);
    let written: i64 = conn
        .query_first("SELECT written FROM epidemic_watermark WHERE source_table = 't'")
        .unwrap()
        .unwrap();
    assert_eq!(written, 1);
}

/// A transaction that took its log id before a later one committed and was read, and
/// committed itself before the chunk was read: its change is a gap fill, and it comes
/// before the watermark, with gaps read in one statement and (more gap ranges than one
/// statement may carry) in several.
#[test]
fn a_gap_filled_before_the_read_comes_before_the_watermark() {
    for (db, options) in [
        ("bf_gap_one", json!({})),
        ("bf_gap_split", json!({"max_gap_ranges": 1})),
    ] {
        let (url, mut conn) = database(
            db,
            "CREATE TABLE t (k INT PRIMARY KEY, v VARCHAR(20)) ENGINE=InnoDB",
        );
        let mut b = open_with(&url, options.clone());
        b.install(&[watch("t", &["v"])]).expect("install");
        let c = consumer("gaps");
        b.register(&c, &["t".into()], StartFrom::Oldest)
            .expect("register");
        // Ids 1-3 held open, 4 committed, 5 held open, 6 committed.
        let mut t1 = connect(&url);
        t1.query_drop("START TRANSACTION").unwrap();
        for k in 1..=3 {
            t1.query_drop(format!("INSERT INTO t VALUES ({k}, 'held')"))
                .unwrap();
        }
        conn.query_drop("INSERT INTO t VALUES (4, 'free')").unwrap();
        let mut t2 = connect(&url);
        t2.query_drop("START TRANSACTION").unwrap();
        t2.query_drop("INSERT INTO t VALUES (5, 'held')").unwrap();
        conn.query_drop("INSERT INTO t VALUES (6, 'free')").unwrap();
        let first = fetch_until(&mut b, &c, 100, |s| s.len() >= 2);
        assert_eq!(first.iter().map(|x| x.id).collect::<Vec<_>>(), [4, 6]);
        t1.query_drop("COMMIT").unwrap();
        t2.query_drop("COMMIT").unwrap();
        let ch = chunk(&mut b, "t", None, 100);
        assert_eq!(ch.rows.len(), 6, "the read saw every commit");
        // Small batches: a full read of the gaps must not let the watermark through.
        let stream = fetch_until(&mut b, &c, 2, has_watermark(ch.watermark));
        let w = position(&stream, |x| x.id == ch.watermark);
        let before: BTreeSet<i64> = stream[..w].iter().map(|x| x.id).collect();
        assert_eq!(before, BTreeSet::from([1, 2, 3, 5]), "{db}: {stream:?}");
    }
}

/// Writers insert, update (each update bumps `ver`) and delete while chunks are read and
/// the stream is consumed like the daemon does it: a chunk between two fetches, its
/// watermark awaited in the stream. After a chunk's watermark, every live change of a key
/// the chunk holds must be newer than the chunk's row: had a change committed before the
/// read come after the watermark, it would carry a version the chunk already had.
#[test]
fn under_concurrent_writers_no_change_older_than_a_chunk_comes_after_its_watermark() {
    let (url, mut conn) = database(
        "bf_hammer",
        "CREATE TABLE items (k INT PRIMARY KEY, ver INT NOT NULL, v VARCHAR(40)) ENGINE=InnoDB",
    );
    for k in 0..300 {
        conn.query_drop(format!("INSERT INTO items VALUES ({k}, 1, 'start')"))
            .unwrap();
    }
    let mut b = open(&url);
    b.install(&[watch("items", &["ver", "v"])])
        .expect("install");
    let c = consumer("hammer");
    b.register(&c, &["items".into()], StartFrom::Now)
        .expect("register");

    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..4_u64)
        .map(|w| {
            let url = url.clone();
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut conn = connect(&url);
                let mut rng = Rng::from_state(1000 + w);
                let mut next_key = 10_000 * (w as i64 + 1);
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) && n < 3000 {
                    n += 1;
                    conn.query_drop("START TRANSACTION").unwrap();
                    for _ in 0..=rng.below(2) {
                        let k = rng.below(300) as i64;
                        let sql = match rng.below(10) {
                            0 => {
                                next_key += 1;
                                format!("INSERT INTO items VALUES ({next_key}, 1, 'w{w}')")
                            }
                            1 => format!("DELETE FROM items WHERE k = {k}"),
                            _ => format!(
                                "UPDATE items SET ver = ver + 1, v = 'w{w}n{n}' WHERE k = {k}"
                            ),
                        };
                        match conn.query_drop(&sql) {
                            Ok(()) => {}
                            // Deadlocks between writers roll their transaction back.
                            Err(mysql::Error::MySqlError(e)) if e.code == 1213 => break,
                            Err(e) => panic!("{sql}: {e}"),
                        }
                    }
                    let end = if rng.below(8) == 0 {
                        "ROLLBACK"
                    } else {
                        "COMMIT"
                    };
                    let _ = conn.query_drop(end);
                }
            })
        })
        .collect();

    // The daemon's loop: a chunk when none waits for its watermark, then a fetch.
    let mut stream: Vec<Change> = Vec::new();
    let mut chunks: Vec<Chunk> = Vec::new();
    let mut waiting: Option<usize> = None;
    let mut after: Option<Vec<Value>> = None;
    let mut passes = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let writing = writers.iter().any(|w| !w.is_finished());
        if waiting.is_none() {
            if !writing && passes >= 2 {
                break;
            }
            let ch = chunk(&mut b, "items", after.take(), 25);
            if ch.last {
                passes += 1;
            } else {
                after = ch.rows.last().map(|r| r.key.clone());
            }
            chunks.push(ch);
            waiting = Some(chunks.len() - 1);
        }
        assert!(Instant::now() < deadline, "the hammer did not finish");
        let batch = b.fetch(&c, 50).expect("fetch");
        let Some(last) = batch.changes.last() else {
            b.wait(Duration::from_millis(20)).expect("wait");
            continue;
        };
        b.ack(&c, &batch.token, last.id).expect("ack");
        if let Some(i) = waiting {
            if batch
                .changes
                .iter()
                .any(|x| x.origin == Origin::Watermark && x.id == chunks[i].watermark)
            {
                waiting = None;
            }
        }
        stream.extend(batch.changes);
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().expect("writer");
    }

    let ver = |vals: &Option<Vec<Value>>, columns: &[String]| -> i64 {
        let i = columns
            .iter()
            .position(|c| c == "ver")
            .expect("ver captured");
        vals.as_ref().expect("values")[i].as_i64().expect("ver")
    };
    let mut checked = 0;
    for ch in &chunks {
        let w = position(&stream, |x| {
            x.origin == Origin::Watermark && x.id == ch.watermark
        });
        let key = |x: &Change| x.key[0].as_i64().expect("an integer key");
        let snap: HashMap<i64, i64> = ch
            .rows
            .iter()
            .map(|r| (key(r), ver(&r.new, &r.columns)))
            .collect();
        for x in stream[w + 1..].iter().filter(|x| x.origin == Origin::Live) {
            let Some(&v_snap) = snap.get(&key(x)) else {
                continue;
            };
            checked += 1;
            match x.op {
                Op::Update => assert!(
                    ver(&x.new, &x.columns) > v_snap,
                    "an update of {:?} to version {} came after the watermark of a chunk that read version {v_snap}",
                    x.key,
                    ver(&x.new, &x.columns)
                ),
                Op::Delete => assert!(
                    ver(&x.old, &x.columns) >= v_snap,
                    "a delete of {:?} at version {} came after the watermark of a chunk that read version {v_snap}",
                    x.key,
                    ver(&x.old, &x.columns)
                ),
                Op::Insert => panic!("an insert of {:?} came after a chunk that had the row", x.key),
            }
        }
    }
    assert!(chunks.len() >= 20, "only {} chunks", chunks.len());
    assert!(
        checked >= 100,
        "only {checked} live changes followed a chunk holding their key"
    );
}

#[test]
fn backfill_requests_and_progress_are_stored_per_consumer_and_table() {
    let (url, mut conn) = database(
        "bf_store",
        "CREATE TABLE users (id INT PRIMARY KEY, name VARCHAR(40)) ENGINE=InnoDB;
         CREATE TABLE domains (id INT PRIMARY KEY, name VARCHAR(40)) ENGINE=InnoDB",
    );
    let mut b = open(&url);
    let plan = b
        .plan_install(&[watch("users", &["name"]), watch("domains", &["name"])])
        .expect("plan");
    assert!(
        plan.iter()
            .any(|s| s.contains("CREATE TABLE IF NOT EXISTS `epidemic_backfill`")),
        "`epidemic sql` shows the progress table"
    );
    b.install(&[watch("users", &["name"]), watch("domains", &["name"])])
        .expect("install");
    let (mx, other) = (consumer("maildir"), consumer("quota"));
    for c in [&mx, &other] {
        b.register(c, &["users".into(), "domains".into()], StartFrom::Now)
            .expect("register");
    }
    let request = |b: &mut HostBackend, c: &Consumer, tables: &[&str]| {
        b.backfills(&BackfillRequest::Request {
            consumer: c.clone(),
            tables: tables.iter().map(|t| t.to_string()).collect(),
            requested_by: "epidemic backfill".into(),
        })
    };
    let pending = |b: &mut HostBackend, c: &Consumer| -> Vec<BackfillProgress> {
        b.backfills(&BackfillRequest::Pending {
            consumer: c.clone(),
        })
        .unwrap()
        .backfills
    };
    let stored = request(&mut b, &mx, &["users", "domains", "users"])
        .unwrap()
        .backfills;
    assert_eq!(stored.len(), 2, "one row per table");
    let p = pending(&mut b, &mx);
    assert_eq!(
        p.iter()
            .map(|p| (p.table.as_str(), p.state))
            .collect::<Vec<_>>(),
        [
            ("domains", BackfillState::Requested),
            ("users", BackfillState::Requested)
        ]
    );
    assert_eq!(p[1].requested_by, "epidemic backfill");
    assert_eq!(p[1].consumer(), mx);
    assert!(p[1].requested_at_us > 0);
    assert!(pending(&mut b, &other).is_empty(), "per consumer");

    // A second request of the same consumer, for any table, is refused while one waits.
    let err = request(&mut b, &mx, &["domains"]).expect_err("second request");
    match err {
        BackendError::Invalid(m) => assert!(
            m.contains("mx1/maildir") && m.contains("already requested") && m.contains("domains"),
            "{m}"
        ),
        e => panic!("{e:?}"),
    }

    // Save: the state and the progress, as given, the JSON round trip included.
    let mut users = p[1].clone();
    users.state = BackfillState::Running;
    users.last_key = Some(vec![Value::Int(1200), Value::Text("Zoë 😀".into())]);
    users.rows_done = 1200;
    users.rows_estimate = Some(50_000);
    users.started_at_us = 5;
    users.updated_at_us = 6;
    let saved = b.backfills(&BackfillRequest::Save(users.clone())).unwrap();
    assert_eq!(saved.backfills, [users.clone()]);
    let p = pending(&mut b, &mx);
    assert_eq!(p[1], users);
    let err = request(&mut b, &other, &["users"]).map(|_| ());
    assert!(err.is_ok(), "another consumer is not held back: {err:?}");
    let err = request(&mut b, &mx, &["users"]).expect_err("running");
    match err {
        BackendError::Invalid(m) => assert!(
            m.contains("already running") && m.contains("1200 of ~50000 rows"),
            "{m}"
        ),
        e => panic!("{e:?}"),
    }
    let updated_at: i64 = conn
        .query_first("SELECT updated_at FROM epidemic_backfill WHERE handler = 'maildir' AND source_table = 'users'")
        .unwrap()
        .unwrap();
    assert!(updated_at > 0);

    // Done rows are not pending, are listed, and a new request replaces them.
    for mut p in pending(&mut b, &mx) {
        p.state = BackfillState::Done;
        b.backfills(&BackfillRequest::Save(p)).unwrap();
    }
    assert!(pending(&mut b, &mx).is_empty());
    let all = b.backfills(&BackfillRequest::List).unwrap().backfills;
    assert_eq!(all.len(), 3, "{all:?}");
    let again = request(&mut b, &mx, &["users"]).expect("done rows do not hold back");
    assert_eq!(again.backfills[0].rows_done, 0);
    let p = pending(&mut b, &mx);
    assert_eq!(p.len(), 1);
    assert_eq!(
        (p[0].table.as_str(), p[0].state, p[0].last_key.clone()),
        ("users", BackfillState::Requested, None)
    );

    // Cancel forgets what is not done; a later Save finds nothing and says so.
    let cancelled = b
        .backfills(&BackfillRequest::Cancel {
            consumer: mx.clone(),
        })
        .unwrap()
        .backfills;
    assert_eq!(cancelled.len(), 1);
    assert!(pending(&mut b, &mx).is_empty());
    let gone = b.backfills(&BackfillRequest::Save(p[0].clone())).unwrap();
    assert!(gone.backfills.is_empty(), "no row is made by a save");
    // Requested again: the old request's save does not touch the new one's row.
    request(&mut b, &mx, &["users"]).expect("requested again");
    let mut stale = p[0].clone();
    stale.state = BackfillState::Running;
    stale.rows_done = 77;
    let gone = b.backfills(&BackfillRequest::Save(stale)).unwrap();
    assert!(gone.backfills.is_empty(), "another request's row");
    let fresh = pending(&mut b, &mx);
    assert_eq!(
        (fresh[0].state, fresh[0].rows_done),
        (BackfillState::Requested, 0)
    );
    b.backfills(&BackfillRequest::Cancel {
        consumer: mx.clone(),
    })
    .unwrap();
    let left = b.backfills(&BackfillRequest::List).unwrap().backfills;
    assert_eq!(
        left.iter()
            .map(|p| (p.handler.as_str(), p.table.as_str(), p.state))
            .collect::<Vec<_>>(),
        [
            ("maildir", "domains", BackfillState::Done),
            ("quota", "users", BackfillState::Requested)
        ]
    );

    // Unregistering a consumer forgets its backfills; uninstall removes the tables.
    b.unregister(&other).unwrap();
    let left = b.backfills(&BackfillRequest::List).unwrap().backfills;
    assert!(left.iter().all(|p| p.handler != "quota"), "{left:?}");
    b.uninstall().expect("uninstall");
    let tables: Vec<String> = conn
        .query("SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME LIKE 'epidemic%'")
        .unwrap();
    assert!(tables.is_empty(), "{tables:?}");
    // Without the table, nothing is pending, and a request says to install.
    assert!(pending(&mut b, &mx).is_empty());
    assert!(matches!(
        request(&mut b, &mx, &["users"]),
        Err(BackendError::Invalid(_))
    ));
}

#[test]
fn of_two_racing_requests_for_one_consumer_exactly_one_is_stored() {
    let (url, _conn) = database(
        "bf_race",
        "CREATE TABLE a (id INT PRIMARY KEY, v INT) ENGINE=InnoDB;
         CREATE TABLE b (id INT PRIMARY KEY, v INT) ENGINE=InnoDB",
    );
    let mut admin = open(&url);
    admin
        .install(&[watch("a", &["v"]), watch("b", &["v"])])
        .expect("install");
    let c = consumer("racer");
    for round in 0..20 {
        let barrier = Arc::new(Barrier::new(2));
        let racers: Vec<_> = ["a", "b"]
            .into_iter()
            .map(|table| {
                let (url, c, barrier) = (url.clone(), c.clone(), Arc::clone(&barrier));
                std::thread::spawn(move || {
                    let mut b = open(&url);
                    barrier.wait();
                    b.backfills(&BackfillRequest::Request {
                        consumer: c,
                        tables: vec![table.into()],
                        requested_by: "race".into(),
                    })
                    .map(|_| ())
                })
            })
            .collect();
        let results: Vec<Result<(), BackendError>> =
            racers.into_iter().map(|r| r.join().unwrap()).collect();
        let won = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(won, 1, "round {round}: {results:?}");
        assert!(
            results.iter().any(
                |r| matches!(r, Err(BackendError::Invalid(m)) if m.contains("already requested"))
            ),
            "round {round}: {results:?}"
        );
        let stored = admin
            .backfills(&BackfillRequest::Pending {
                consumer: c.clone(),
            })
            .unwrap()
            .backfills;
        assert_eq!(stored.len(), 1, "round {round}: {stored:?}");
        // Half the rounds race against a done row, half against nothing.
        if round % 2 == 0 {
            admin
                .backfills(&BackfillRequest::Cancel {
                    consumer: c.clone(),
                })
                .unwrap();
        } else {
            let mut p = stored[0].clone();
            p.state = BackfillState::Done;
            admin.backfills(&BackfillRequest::Save(p)).unwrap();
        }
    }
}

/// `epidemic backfill` against a running daemon while writers change the table: the
/// handler ends with every row as the table has it, and no snapshot row came after a
/// newer live change of its key.
#[test]
fn a_backfill_through_the_daemon_converges_to_the_table_under_writers() {
    let (url, mut conn) = database(
        "bf_daemon",
        "CREATE TABLE mail_users (id BIGINT PRIMARY KEY, username VARCHAR(200) NOT NULL, ver INT NOT NULL) ENGINE=InnoDB",
    );
    for chunk in 0..10 {
        let values: Vec<String> = (chunk * 200..(chunk + 1) * 200)
            .map(|id| format!("({id}, 'user{id}', 1)"))
            .collect();
        conn.query_drop(format!(
            "INSERT INTO mail_users VALUES {}",
            values.join(",")
        ))
        .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("rec.jsonl");
    let config = dir.path().join("epidemic.toml");
    std::fs::write(
        &config,
        format!(
            "[database]\nurl = {url:?}\n\n[daemon]\nname = \"d1\"\nbackfill_chunk = 150\nprune_interval_ms = 100\n\n{}",
            recorder_handler("rec", &out, "mail_users", &["username", "ver"], "")
        ),
    )
    .unwrap();
    let log = dir.path().join("daemon.log");
    let daemon = Daemon::start(&config, &log, &[]);
    assert!(
        daemon.wait_for_log("epidemic started", WAIT),
        "{}",
        daemon.log_text()
    );

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (url, stop) = (url.clone(), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut conn = connect(&url);
            let mut rng = Rng::from_state(42);
            let mut next = 100_000;
            while !stop.load(Ordering::Relaxed) {
                let id = rng.below(2000);
                let sql = match rng.below(10) {
                    0 => {
                        next += 1;
                        format!("INSERT INTO mail_users VALUES ({next}, 'new{next}', 1)")
                    }
                    1 => format!("DELETE FROM mail_users WHERE id = {id}"),
                    2 => format!(
                        "UPDATE mail_users SET ver = ver + 1, username = CONCAT('renamed', ver) WHERE id = {id}"
                    ),
                    _ => format!("UPDATE mail_users SET ver = ver + 1 WHERE id = {id}"),
                };
                conn.query_drop(sql).unwrap();
            }
        })
    };
    let done = epidemic(&config, &["backfill", "--handler", "rec"]);
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert!(
        done.status.success(),
        "epidemic backfill: {}{}\n{}",
        String::from_utf8_lossy(&done.stdout),
        String::from_utf8_lossy(&done.stderr),
        daemon.log_text()
    );

    let table: HashMap<i64, (String, i64)> = conn
        .query_map("SELECT id, username, ver FROM mail_users", |(id, u, v)| {
            (id, (u, v))
        })
        .unwrap()
        .into_iter()
        .collect();
    // The handler's view of each key, line by line: the last state, and no snapshot row
    // older than a live change before it.
    let view = |lines: &[serde_json::Value]| {
        let mut last: HashMap<i64, Option<(String, i64)>> = HashMap::new();
        let mut newest_live: HashMap<i64, i64> = HashMap::new();
        let mut snapshots = 0;
        for l in lines {
            let id = l["key"]["id"].as_i64().expect("key");
            let row = |side: &str| {
                let r = &l[side];
                (
                    r["username"].as_str().unwrap().to_owned(),
                    r["ver"].as_i64().unwrap(),
                )
            };
            match (l["origin"].as_str().unwrap(), l["op"].as_str().unwrap()) {
                ("snapshot", _) => {
                    snapshots += 1;
                    let (u, v) = row("new");
                    if let Some(&live) = newest_live.get(&id) {
                        assert!(
                            v >= live,
                            "snapshot row of {id} at version {v} after a live change at {live}"
                        );
                    }
                    last.insert(id, Some((u, v)));
                }
                (_, "DELETE") => {
                    newest_live.insert(id, row("old").1);
                    last.insert(id, None);
                }
                _ => {
                    let (u, v) = row("new");
                    newest_live.insert(id, v);
                    last.insert(id, Some((u, v)));
                }
            }
        }
        (last, snapshots)
    };
    let converged = wait_until(WAIT, || {
        let (last, _) = view(&recorded(&out));
        table
            .iter()
            .all(|(id, row)| last.get(id) == Some(&Some(row.clone())))
            && last
                .iter()
                .all(|(id, v)| v.is_none() || table.contains_key(id))
    });
    let (last, snapshots) = view(&recorded(&out));
    assert!(
        converged,
        "{} keys differ from the table",
        table
            .iter()
            .filter(|(id, row)| last.get(id) != Some(&Some((*row).clone())))
            .count()
    );
    assert!(snapshots >= 1500, "only {snapshots} snapshot rows");
    drop(daemon);
}
