//! Backfills on PostgreSQL: `snapshot_chunk` and `backfills` of the built backend `.so`
//! against a real PostgreSQL 15, driven as the host drives them (`host::load` +
//! `HostBackend`), and one backfill end to end through the `epidemic` daemon. Each test
//! has its own database on the binary's shared server.
//!
//! Build first: `cargo build --workspace`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use epidemic_plugin_host::{self as host, HostBackend, Library};
use epidemic_plugin_sdk::backend::{
    BackendError, BackfillProgress, BackfillReply, BackfillRequest, BackfillState, Chunk,
    ChunkRequest, Consumer, Registered, StartFrom, Watch,
};
use epidemic_plugin_sdk::{Change, Op, Origin, Value};
use epidemic_tests::pg::PgServer;
use epidemic_tests::rng::Rng;
use epidemic_tests::{backend_path, epidemic, recorded, recorder_handler, wait_until, Daemon};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

fn library() -> &'static Library {
    static LIB: OnceLock<Library> = OnceLock::new();
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

fn watch(table: &str, columns: &[&str], key: &[&str]) -> Watch {
    Watch {
        table: table.into(),
        columns: columns.iter().map(|c| c.to_string()).collect(),
        key: key.iter().map(|c| c.to_string()).collect(),
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

fn sql(db: &str, statements: &str) {
    PgServer::shared()
        .client(db)
        .batch_execute(statements)
        .unwrap_or_else(|e| panic!("{statements}: {e}"));
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
fn drain(b: &mut HostBackend, c: &Consumer) -> Vec<Change> {
    let mut all = Vec::new();
    loop {
        let batch = b.fetch(c, 500).expect("fetch");
        let Some(last) = batch.changes.last() else {
            return all;
        };
        b.ack(c, &batch.token, last.id).expect("ack");
        all.extend(batch.changes);
    }
}

fn chunk(b: &mut HostBackend, table: &str, after: Option<Vec<Value>>, limit: u32) -> Chunk {
    b.snapshot_chunk(&ChunkRequest {
        table: table.into(),
        after,
        limit,
        only: Vec::new(),
    })
    .unwrap_or_else(|e| panic!("snapshot_chunk of {table}: {e}"))
}

/// Every chunk of a table from the start, by `limit` rows, checking `last` on the way.
fn all_chunks(b: &mut HostBackend, table: &str, limit: u32) -> Vec<Chunk> {
    let mut chunks: Vec<Chunk> = Vec::new();
    let mut after = None;
    loop {
        let c = chunk(b, table, after.clone(), limit);
        assert!(c.rows.len() <= limit as usize);
        assert_eq!(
            c.last,
            c.rows.len() < limit as usize,
            "last: fewer rows than asked"
        );
        after = c.rows.last().map(|r| r.key.clone()).or(after);
        let last = c.last;
        chunks.push(c);
        if last {
            return chunks;
        }
        assert!(chunks.len() < 10_000, "paging does not end");
    }
}

fn chunk_keys(chunks: &[Chunk]) -> Vec<Vec<Value>> {
    chunks
        .iter()
        .flat_map(|c| c.rows.iter().map(|r| r.key.clone()))
        .collect()
}

fn ints(values: &[i64]) -> Vec<Value> {
    values.iter().map(|&i| Value::Int(i)).collect()
}

fn one_line(e: &BackendError) -> String {
    let s = e.to_string();
    assert!(!s.contains('\n'), "not one line: {s}");
    s
}

// ---------------------------------------------------------------------------------------
// Chunks
// ---------------------------------------------------------------------------------------

/// Chunks come in key order: composite keys compared as a row in key order (not column
/// order), text keys by the column's collation (an ICU one here), a partitioned table
/// through its partitions, an ordinary table without its inheritance children (whose
/// changes are not captured either), a configured key with NULLs in PostgreSQL's order
/// (NULLs last). `after` pages to the end at every chunk size, `last` is set by the chunk
/// with fewer rows than asked (an empty one when the rows divide evenly). Snapshot rows
/// are INSERTs of origin Snapshot with id 0, the schema, the captured columns in the
/// log's order, and stable ids of their own. The estimate is `reltuples`: none before the
/// table was ever analyzed.
#[test]
fn chunks_come_in_key_order_by_composite_text_and_nullable_keys() {
    let (url, db) = database(
        "bf_chunks",
        "CREATE TABLE grants (host text, uid int, level int, PRIMARY KEY (uid, host))
             WITH (autovacuum_enabled = false);
         CREATE TABLE names (name text COLLATE \"en-x-icu\" PRIMARY KEY, v int);
         CREATE TABLE parts (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);
         CREATE TABLE parts_lo PARTITION OF parts FOR VALUES FROM (MINVALUE) TO (10);
         CREATE TABLE parts_hi PARTITION OF parts FOR VALUES FROM (10) TO (MAXVALUE);
         CREATE TABLE base (id int PRIMARY KEY, v text);
         CREATE TABLE child () INHERITS (base);
         CREATE TABLE loose (a int, b text, v int, UNIQUE NULLS NOT DISTINCT (a, b));",
    );
    let mut b = open(&url);
    b.install(&[
        watch("grants", &["level"], &[]),
        watch("names", &["v"], &[]),
        watch("parts", &["v"], &[]),
        watch("base", &["v"], &[]),
        watch("loose", &["v"], &["a", "b"]),
    ])
    .expect("install");
    let mut script = String::new();
    for uid in [3, 1, 5, 2, 4] {
        for host in ["b", "B", "c", "a"] {
            script.push_str(&format!(
                "INSERT INTO grants VALUES ('{host}', {uid}, {});\n",
                uid * 10
            ));
        }
    }
    for (i, n) in [
        "delta", "Alpha", "charlie", "épée", "bravo", "Echo", "9", "10",
    ]
    .iter()
    .enumerate()
    {
        script.push_str(&format!("INSERT INTO names VALUES ('{n}', {i});\n"));
    }
    for id in [15, 3, 19, 0, 7, 12, 9, 10, -4, 11] {
        script.push_str(&format!("INSERT INTO parts VALUES ({id}, 'p{id}');\n"));
    }
    script.push_str(
        "INSERT INTO base VALUES (5, 'b'), (1, 'b');
         INSERT INTO child VALUES (3, 'c'), (100, 'c');
         INSERT INTO loose VALUES (2, 'a', 1), (NULL, NULL, 2), (1, NULL, 3), (NULL, 'y', 4),
                                  (1, 'x', 5), (NULL, 'a', 6), (2, NULL, 7);",
    );
    sql(&db, &script);

    // Never analyzed: no estimate (reltuples is -1).
    assert_eq!(chunk(&mut b, "grants", None, 5).rows_estimate, None);
    sql(&db, "ANALYZE grants; ANALYZE parts;");

    let mut want = Vec::new();
    for uid in 1..=5 {
        // The database's collation (C.UTF-8): upper case first.
        for host in ["B", "a", "b", "c"] {
            want.push(vec![Value::Int(uid), Value::from(host)]);
        }
    }
    for limit in [1, 3, 4, 7, 20, 100] {
        let chunks = all_chunks(&mut b, "grants", limit);
        assert_eq!(chunk_keys(&chunks), want, "chunks of {limit}");
        assert_eq!(chunks[0].rows_estimate, Some(20), "estimate after ANALYZE");
        if 20 % limit == 0 {
            assert!(chunks.last().unwrap().rows.is_empty(), "chunks of {limit}");
        }
        let mut ids = HashSet::new();
        let mut watermarks = Vec::new();
        for c in &chunks {
            watermarks.push(c.watermark);
            for r in &c.rows {
                assert_eq!((r.op, r.origin, r.id), (Op::Insert, Origin::Snapshot, 0));
                assert_eq!(r.table, "grants");
                assert_eq!(r.schema.as_deref(), Some("public"));
                assert_eq!(&*r.key_columns, ["uid", "host"]);
                assert_eq!(&*r.columns, ["uid", "host", "level"]);
                assert_eq!((&r.old, &r.old_key, r.txid), (&None, &None, None));
                assert_eq!(
                    r.new_value("level"),
                    Some(&Value::Int(r.key[0].as_i64().unwrap() * 10))
                );
                assert!(r.changed_at_us > 0);
                assert!(ids.insert(r.stable_id.clone()), "{}", r.stable_id);
                assert!(
                    r.stable_id.ends_with(&format!(
                        "-w{}.{}",
                        c.watermark,
                        c.rows.iter().position(|x| x.key == r.key).unwrap()
                    )),
                    "{}",
                    r.stable_id
                );
            }
        }
        assert!(
            watermarks.windows(2).all(|w| w[0] < w[1]),
            "each chunk writes a new watermark: {watermarks:?}"
        );
    }
    // The table as a consumer may spell it: the rows carry that spelling.
    let spelled = chunk(&mut b, "public.grants", None, 2);
    assert_eq!(spelled.rows[0].table, "public.grants");
    assert_eq!(spelled.rows[0].key, [Value::Int(1), Value::from("B")]);

    // ICU: case and accents fold for the order (and for `after`); '9' > '10' as text.
    let want: Vec<Vec<Value>> = [
        "10", "9", "Alpha", "bravo", "charlie", "delta", "Echo", "épée",
    ]
    .iter()
    .map(|n| vec![Value::from(*n)])
    .collect();
    for limit in [1, 2, 3, 8, 9] {
        assert_eq!(
            chunk_keys(&all_chunks(&mut b, "names", limit)),
            want,
            "chunks of {limit}"
        );
    }
    // A partitioned table: every partition, in key order across them.
    let want: Vec<Vec<Value>> = [-4, 0, 3, 7, 9, 10, 11, 12, 15, 19]
        .iter()
        .map(|&i| ints(&[i]))
        .collect();
    for limit in [1, 3, 10] {
        let chunks = all_chunks(&mut b, "parts", limit);
        assert_eq!(chunk_keys(&chunks), want, "chunks of {limit}");
        assert_eq!(chunks[0].rows_estimate, Some(10));
    }
    // The inheritance child's rows are not the table's own (no trigger captures them).
    assert_eq!(
        chunk_keys(&all_chunks(&mut b, "base", 10)),
        vec![ints(&[1]), ints(&[5])]
    );
    // A configured key with NULLs: NULLs last, column by column.
    let n = Value::Null;
    let want = vec![
        vec![Value::Int(1), Value::from("x")],
        vec![Value::Int(1), n.clone()],
        vec![Value::Int(2), Value::from("a")],
        vec![Value::Int(2), n.clone()],
        vec![n.clone(), Value::from("a")],
        vec![n.clone(), Value::from("y")],
        vec![n.clone(), n.clone()],
    ];
    for limit in [1, 2, 3, 7, 8] {
        assert_eq!(
            chunk_keys(&all_chunks(&mut b, "loose", limit)),
            want,
            "chunks of {limit}"
        );
    }

    // Bad requests: one line each, nothing read.
    let err = b
        .snapshot_chunk(&ChunkRequest {
            table: "nope".into(),
            after: None,
            limit: 10,
            only: Vec::new(),
        })
        .unwrap_err();
    assert!(matches!(err, BackendError::Invalid(_)), "{err:?}");
    assert!(
        one_line(&err).contains("table nope is not installed"),
        "{err}"
    );
    let err = b
        .snapshot_chunk(&ChunkRequest {
            table: "grants".into(),
            after: Some(vec![Value::Int(1)]),
            limit: 10,
            only: Vec::new(),
        })
        .unwrap_err();
    assert!(matches!(err, BackendError::Invalid(_)), "{err:?}");
    assert!(
        one_line(&err).contains("key changed during the backfill"),
        "{err}"
    );
}

/// The watermark is a change of origin Watermark in every consumer's stream, with the id
/// `snapshot_chunk` returned: after every change committed before the read, before every
/// change that began after it. A change whose id was drawn before the read but that
/// committed after it may land on either side (by when the consumer's snapshot was
/// taken): before it, the host drops the chunk's row for its key; after it, it is newer
/// than the chunk's row. The watermark carries no key and no values, is not a DELETE,
/// and prune removes it like any change.
#[test]
fn the_watermark_reaches_every_consumer_after_every_change_committed_before_the_read() {
    let (url, db) = database(
        "bf_watermark",
        "CREATE TABLE users (id int PRIMARY KEY, name text)",
    );
    let (mut b, c1) = setup(&url, &[watch("users", &["name"], &[])], "h1");
    let c2 = consumer("h2");
    b.register(&c2, &["users".into()], StartFrom::Oldest)
        .expect("register h2");
    sql(&db, "INSERT INTO users VALUES (1, 'a'), (2, 'b');");
    // Draws its id now and commits after the read.
    let mut late = PgServer::shared().client(&db);
    let mut tx = late.transaction().expect("begin");
    tx.batch_execute("UPDATE users SET name = 'late' WHERE id = 1")
        .expect("update");

    let ch = chunk(&mut b, "users", None, 10);
    assert!(ch.last);
    let names: Vec<Option<&Value>> = ch.rows.iter().map(|r| r.new_value("name")).collect();
    assert_eq!(
        names,
        [Some(&Value::from("a")), Some(&Value::from("b"))],
        "the read saw what had committed"
    );
    // h1 reads now, h2 only once the late change and a newer one committed.
    let first = drain(&mut b, &c1);
    tx.commit().expect("commit");
    sql(&db, "DELETE FROM users WHERE id = 2;");
    let rest = drain(&mut b, &c1);
    let h2 = drain(&mut b, &c2);

    let what = |changes: &[Change]| -> Vec<(Origin, Op, Vec<Value>)> {
        changes
            .iter()
            .map(|c| (c.origin, c.op, c.key.clone()))
            .collect()
    };
    let h1: Vec<Change> = first.iter().chain(&rest).cloned().collect();
    assert_eq!(
        what(&h1),
        vec![
            (Origin::Live, Op::Insert, ints(&[1])),
            (Origin::Live, Op::Insert, ints(&[2])),
            (Origin::Watermark, Op::Insert, vec![]),
            (Origin::Live, Op::Update, ints(&[1])),
            (Origin::Live, Op::Delete, ints(&[2])),
        ],
        "h1"
    );
    // h2's batch holds both the late update and the watermark: id order, the update
    // first (its id is smaller), so the host drops key 1 from the chunk.
    assert_eq!(
        what(&h2),
        vec![
            (Origin::Live, Op::Insert, ints(&[1])),
            (Origin::Live, Op::Insert, ints(&[2])),
            (Origin::Live, Op::Update, ints(&[1])),
            (Origin::Watermark, Op::Insert, vec![]),
            (Origin::Live, Op::Delete, ints(&[2])),
        ],
        "h2"
    );
    for (consumer, got) in [("h1", &h1), ("h2", &h2)] {
        let w = got
            .iter()
            .find(|c| c.origin == Origin::Watermark)
            .expect("a watermark");
        assert_eq!(w.id, ch.watermark, "{consumer}");
        assert_eq!(w.table, "users");
        assert_eq!(w.schema.as_deref(), Some("public"));
        assert!(w.key_columns.is_empty() && w.columns.is_empty() && w.key.is_empty());
        assert_eq!((&w.old, &w.new, &w.old_key), (&None, &None, &None));
        assert!(w.changed_at_us > 0);
        // Its stable id is the log's, like its neighbours'.
        let identity = got[0].stable_id.rsplit_once('-').unwrap().0;
        assert_eq!(w.stable_id, format!("{identity}-{}", w.id));
        let update = got.iter().find(|c| c.op == Op::Update).unwrap();
        assert!(
            update.id < w.id,
            "the late change drew its id before the read"
        );
    }
    let mut admin = PgServer::shared().client(&db);
    let count = |admin: &mut postgres::Client, filter: &str| -> i64 {
        admin
            .query_one(
                &format!("SELECT count(*) FROM epidemic.log_users {filter}"),
                &[],
            )
            .unwrap()
            .get(0)
    };
    assert_eq!(count(&mut admin, "WHERE op = 'W'"), 1);
    assert_eq!(b.prune().expect("prune"), 5);
    assert_eq!(count(&mut admin, ""), 0, "the watermark is pruned too");
}

/// A snapshot row's key, columns and values are what a live change of the same row
/// carries, whatever the column types (integers, floats, `numeric`, character types,
/// `bytea`, `bool`, timestamps, `jsonb`, arrays, enums, domains, NULLs), so the host can
/// match them; and keys of those types page (`after` is bound back as the same value).
#[test]
fn snapshot_rows_carry_the_keys_and_values_live_changes_carry() {
    let (url, db) = database(
        "bf_values",
        "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
         CREATE DOMAIN posint AS int CHECK (VALUE > 0);
         CREATE TABLE t (
             k1 uuid, k2 numeric(10,2),
             i2 smallint, i8 bigint, f4 real, f8 double precision, n numeric, s text,
             vc varchar(10), c char(5), b bytea, flag boolean, ts timestamptz, d date,
             j jsonb, arr int[], m mood, p posint,
             PRIMARY KEY (k1, k2));
         CREATE TABLE kt (t timestamptz, by bytea, f float8, c char(3), r real, v text,
                          PRIMARY KEY (t, by, f, c, r));",
    );
    let columns = [
        "i2", "i8", "f4", "f8", "n", "s", "vc", "c", "b", "flag", "ts", "d", "j", "arr", "m", "p",
    ];
    let watches = [watch("t", &columns, &[]), watch("kt", &["v"], &[])];
    let (mut b, c) = setup(&url, &watches, "h");
    sql(
        &db,
        "INSERT INTO t VALUES
           ('00000000-0000-0000-0000-000000000002', 1.50, -3, 9007199254740993, 0.1, 0.1, 1.000,
            'héllo', 'vc', 'ab', '\\x00ff', true, '2024-02-29 23:59:59.123456+02', '2024-02-29',
            '{\"b\": [1, 2], \"a\": null}', '{1,NULL,3}', 'happy', 7),
           ('00000000-0000-0000-0000-000000000001', 2.00, NULL, NULL, 'NaN', '-Infinity', NULL,
            NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
           ('00000000-0000-0000-0000-000000000001', -0.25, 0, 0, -0.0, 1e300, 12345678901234567890.000001,
            '', '', '', '', false, 'infinity', '-infinity', '[]', '{}', 'sad', 1),
           ('ffffffff-0000-0000-0000-000000000000', 0.00, 1, 1, 1, 1, 0, 'z', 'z', 'z', '\\x', false,
            '1999-12-31 00:00:00+00', '1999-12-31', '{}', '{2}', 'ok', 2);
         INSERT INTO kt VALUES
           ('2024-01-01 00:00:00.000001+00', '\\x0100', 2.5, 'a', 0.1, 'p'),
           ('2024-01-01 00:00:00.000001+00', '\\x01', 0.1, 'a', 0.1, 'q'),
           ('2024-01-01 00:00:00.000001+00', '\\x01', 0.1, 'b', 0.1, 'r'),
           ('2024-01-01 00:00:00.000001+00', '\\x01', 0.1, 'b', 0.2, 's'),
           ('2023-06-30 12:00:00+05', '\\xff', -1e-300, 'zz', 1e30, 't'),
           ('2024-01-01 00:00:00+00', '', 1e300, '', -0.5, 'u');",
    );
    let live = drain(&mut b, &c);
    assert_eq!(live.len(), 10);
    for (table, n) in [("t", 4), ("kt", 6)] {
        for limit in [1, 2, 3, 100] {
            let chunks = all_chunks(&mut b, table, limit);
            let rows: Vec<&Change> = chunks.iter().flat_map(|c| &c.rows).collect();
            assert_eq!(rows.len(), n, "{table} by {limit}");
            for r in rows {
                let l = live
                    .iter()
                    .find(|l| l.table == table && l.key == r.key)
                    .unwrap_or_else(|| panic!("no live change with the key {:?}", r.key));
                assert_eq!(r.key_columns, l.key_columns);
                assert_eq!(r.columns, l.columns);
                assert_eq!(r.schema, l.schema);
                // NaN is not equal to itself: compare the debug forms.
                assert_eq!(
                    format!("{:?}", r.new),
                    format!("{:?}", l.new),
                    "values of {:?}",
                    r.key
                );
            }
        }
    }
    // The order is the key's: uuid, then numeric.
    let keys: Vec<String> = chunk_keys(&all_chunks(&mut b, "t", 1))
        .iter()
        .map(|k| format!("{}/{}", k[0], k[1]))
        .collect();
    assert_eq!(
        keys,
        [
            "00000000-0000-0000-0000-000000000001/-0.25",
            "00000000-0000-0000-0000-000000000001/2.00",
            "00000000-0000-0000-0000-000000000002/1.50",
            "ffffffff-0000-0000-0000-000000000000/0.00",
        ]
    );
    let kt: Vec<String> = chunk_keys(&all_chunks(&mut b, "kt", 1))
        .iter()
        .map(|k| {
            k.iter()
                .map(|v| format!("{v:?}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    let v: Vec<String> = all_chunks(&mut b, "kt", 2)
        .iter()
        .flat_map(|c| c.rows.iter().map(|r| r.new_value("v").unwrap().to_string()))
        .collect();
    assert_eq!(v, ["t", "u", "q", "r", "s", "p"], "{kt:#?}");
}

/// A watched column retyped by the procedure `capture.rs` documents (triggers recreated
/// in the same transaction), before `epidemic install` has brought the log column's type
/// up to date: snapshot rows still carry what the log gives (the log's type), before and
/// after that install.
#[test]
fn snapshot_rows_follow_the_log_when_a_column_was_retyped_before_install() {
    let (url, db) = database(
        "bf_retyped",
        "CREATE TABLE r (id int PRIMARY KEY, q int, s varchar(5))",
    );
    let watches = [watch("r", &["q", "s"], &[])];
    let (mut b, c) = setup(&url, &watches, "h");
    sql(
        &db,
        "BEGIN;
         CREATE TEMP TABLE capture_triggers ON COMMIT DROP AS
             SELECT tgname, pg_get_triggerdef(oid) AS def, obj_description(oid, 'pg_trigger') AS note
             FROM pg_trigger
             WHERE tgrelid = 'r'::regclass AND tgname ~ '^epidemic_capture_(insert|update|delete)$';
         DROP TRIGGER epidemic_capture_insert ON r;
         DROP TRIGGER epidemic_capture_update ON r;
         DROP TRIGGER epidemic_capture_delete ON r;
         ALTER TABLE r ALTER COLUMN q TYPE bigint, ALTER COLUMN s TYPE text;
         DO $$ DECLARE t record; BEGIN
             FOR t IN SELECT * FROM capture_triggers LOOP
                 EXECUTE t.def;
                 EXECUTE format('ALTER TABLE r ENABLE ALWAYS TRIGGER %I', t.tgname);
                 EXECUTE format('COMMENT ON TRIGGER %I ON r IS %L', t.tgname, t.note);
             END LOOP;
         END $$;
         COMMIT;
         INSERT INTO r VALUES (1, 10, 'one'), (2, NULL, 'two');",
    );
    for round in ["before install", "after install"] {
        // The last round's chunks wrote watermarks.
        let live: Vec<Change> = drain(&mut b, &c)
            .into_iter()
            .filter(|l| l.origin == Origin::Live)
            .collect();
        assert_eq!(live.len(), 2, "{round}");
        let rows: Vec<Change> = all_chunks(&mut b, "r", 1)
            .into_iter()
            .flat_map(|c| c.rows)
            .collect();
        assert_eq!(rows.len(), 2, "{round}");
        for r in &rows {
            let l = live.iter().find(|l| l.key == r.key).expect("a live change");
            assert_eq!((&r.columns, &r.new), (&l.columns, &l.new), "{round}");
        }
        b.install(&watches).expect("install");
        sql(&db, "UPDATE r SET q = q + 1, s = s || '!'");
    }
}

// ---------------------------------------------------------------------------------------
// Under concurrent writers
// ---------------------------------------------------------------------------------------

const ITEMS: &str =
    "CREATE TABLE items (grp text, n int, version int NOT NULL, name text, PRIMARY KEY (grp, n))";

/// A writer on its own connection until `stop`: small transactions of updates that bump
/// `version`, inserts of fresh keys, deletes, and moves of a row to a fresh key (version
/// bumped too); some transactions pause before they commit, so commits come out of id
/// order. A key is born once (fresh keys are never used twice, nor a key moved away
/// from), so for one key the versions only grow. Deadlocks and lost races roll back.
fn writer(db: &str, w: u64, existing: i64, stop: Arc<AtomicBool>) -> thread::JoinHandle<u64> {
    let mut client = PgServer::shared().client(db);
    thread::spawn(move || {
        client
            .batch_execute("SET synchronous_commit = off")
            .expect("set");
        let mut rng = Rng::new(w + 1);
        let mut fresh = (w as i64 + 1) * 1_000_000;
        let mut mine: Vec<i64> = Vec::new();
        let mut committed = 0;
        let mut i = 0;
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            let mut script = String::from("BEGIN;\n");
            for _ in 0..rng.range(1, 3) {
                let target = if !mine.is_empty() && rng.chance(30) {
                    mine[rng.below(mine.len() as u64) as usize]
                } else {
                    rng.range(1, existing)
                };
                let roll = rng.below(100);
                if roll < 60 {
                    script.push_str(&format!(
                        "UPDATE items SET version = version + 1, name = 'w{w}.{i}' WHERE n = {target};\n"
                    ));
                } else if roll < 70 {
                    fresh += 1;
                    mine.push(fresh);
                    script.push_str(&format!(
                        "INSERT INTO items VALUES ('g{}', {fresh}, 1, 'new{w}.{i}');\n",
                        fresh % 5
                    ));
                } else if roll < 80 {
                    script.push_str(&format!("DELETE FROM items WHERE n = {target};\n"));
                } else {
                    fresh += 1;
                    mine.push(fresh);
                    script.push_str(&format!(
                        "UPDATE items SET n = {fresh}, version = version + 1 WHERE n = {target};\n"
                    ));
                }
            }
            if rng.chance(10) {
                script.push_str("SELECT pg_sleep(0.003);\n");
            }
            script.push_str("COMMIT;");
            match client.batch_execute(&script) {
                Ok(()) => committed += 1,
                Err(_) => {
                    let _ = client.batch_execute("ROLLBACK");
                }
            }
        }
        committed
    })
}

fn key_text(key: &[Value]) -> String {
    format!("{key:?}")
}

fn image_int(image: &Option<Vec<Value>>, columns: &[String], column: &str) -> Option<i64> {
    let i = columns.iter().position(|c| c == column)?;
    image.as_ref()?.get(i)?.as_i64()
}

fn image_text(image: &Option<Vec<Value>>, columns: &[String], column: &str) -> String {
    let i = columns.iter().position(|c| c == column).unwrap();
    image.as_ref().unwrap()[i].to_string()
}

/// Under writers hammering the table (updates, inserts, deletes, key moves, commits out
/// of id order) while chunks are read again and again: every change fetched after a
/// chunk's watermark is newer than the chunk's row for its key (a change committed before
/// the read never comes after the watermark); some changes land between a read and its
/// watermark; and the stream with each chunk's rows put right after its watermark — minus
/// the rows a change fetched between the read and the watermark touched, the host's rule
/// — ends equal to the table.
#[test]
fn under_concurrent_writers_no_change_older_than_a_chunk_comes_after_its_watermark() {
    const EXISTING: i64 = 300;
    const WRITERS: u64 = 4;
    let (url, db) = database("bf_hammer", ITEMS);
    let initial: String = (1..=EXISTING)
        .map(|n| format!("INSERT INTO items VALUES ('g{}', {n}, 1, 'init');\n", n % 5))
        .collect();
    sql(&db, &initial);
    let (mut b, c) = setup(&url, &[watch("items", &["version", "name"], &[])], "h");
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| writer(&db, w, EXISTING, stop.clone()))
        .collect();

    // Everything fetched, in order; each chunk with how much was fetched when it was read.
    let mut stream: Vec<Change> = Vec::new();
    let mut chunks: Vec<(usize, Chunk)> = Vec::new();
    let fetch_more = |b: &mut HostBackend, stream: &mut Vec<Change>| {
        let batch = b.fetch(&c, 100).expect("fetch");
        if let Some(last) = batch.changes.last() {
            b.ack(&c, &batch.token, last.id).expect("ack");
        }
        stream.extend(batch.changes);
    };
    let started = Instant::now();
    let mut passes = 0;
    while passes < 3 || started.elapsed() < Duration::from_secs(4) {
        let mut after = None;
        loop {
            let read_at = stream.len();
            let ch = chunk(&mut b, "items", after, 25);
            let deadline = Instant::now() + WAIT;
            while !stream[read_at..]
                .iter()
                .any(|s| s.origin == Origin::Watermark && s.id == ch.watermark)
            {
                assert!(Instant::now() < deadline, "the watermark never came");
                fetch_more(&mut b, &mut stream);
            }
            after = ch.rows.last().map(|r| r.key.clone());
            let last = ch.last;
            chunks.push((read_at, ch));
            if last {
                break;
            }
        }
        passes += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let committed: u64 = writers.into_iter().map(|w| w.join().expect("writer")).sum();
    loop {
        let n = stream.len();
        fetch_more(&mut b, &mut stream);
        if stream.len() == n {
            break;
        }
    }
    let lives = stream.iter().filter(|s| s.origin == Origin::Live).count();
    assert!(
        lives > 1000,
        "the writers wrote too little: {lives} changes in {committed} transactions"
    );

    // 1. Nothing after a chunk's watermark is as old as the chunk's row for its key.
    let position: HashMap<i64, usize> = stream
        .iter()
        .enumerate()
        .filter(|(_, s)| s.origin == Origin::Watermark)
        .map(|(i, s)| (s.id, i))
        .collect();
    let mut overlapped = 0;
    let mut checked = 0;
    for (read_at, ch) in &chunks {
        let at = position[&ch.watermark];
        let rows: HashMap<String, i64> = ch
            .rows
            .iter()
            .map(|r| {
                (
                    key_text(&r.key),
                    image_int(&r.new, &r.columns, "version").unwrap(),
                )
            })
            .collect();
        for s in stream[at + 1..].iter().filter(|s| s.origin == Origin::Live) {
            for key in std::iter::once(&s.key).chain(s.old_key.as_ref()) {
                let Some(&v) = rows.get(&key_text(key)) else {
                    continue;
                };
                checked += 1;
                if let Some(old) = image_int(&s.old, &s.columns, "version") {
                    assert!(
                        old >= v,
                        "change {} (old version {old}) of {:?} came after the watermark of a chunk that read version {v}",
                        s.id,
                        key
                    );
                }
                if let Some(new) = image_int(&s.new, &s.columns, "version") {
                    assert!(
                        new > v,
                        "change {} (version {new}) of {:?} came after the watermark of a chunk that read version {v}",
                        s.id,
                        key
                    );
                }
            }
        }
        overlapped += stream[*read_at..at]
            .iter()
            .filter(|s| s.origin == Origin::Live)
            .count();
    }
    assert!(checked > 100, "too few changes after watermarks: {checked}");
    assert!(
        overlapped > 0,
        "no change landed between a read and its watermark"
    );

    // 2. The host's rule converges on the table.
    let mut state: BTreeMap<String, (i64, String)> = BTreeMap::new();
    let by_watermark: HashMap<i64, &(usize, Chunk)> =
        chunks.iter().map(|c| (c.1.watermark, c)).collect();
    for (i, s) in stream.iter().enumerate() {
        match s.origin {
            Origin::Watermark => {
                let Some((read_at, ch)) = by_watermark.get(&s.id) else {
                    continue;
                };
                let mut touched = HashSet::new();
                for l in &stream[*read_at..i] {
                    touched.insert(key_text(&l.key));
                    if let Some(old) = &l.old_key {
                        touched.insert(key_text(old));
                    }
                }
                for r in &ch.rows {
                    if !touched.contains(&key_text(&r.key)) {
                        state.insert(
                            key_text(&r.key),
                            (
                                image_int(&r.new, &r.columns, "version").unwrap(),
                                image_text(&r.new, &r.columns, "name"),
                            ),
                        );
                    }
                }
            }
            _ => {
                if let Some(old) = &s.old_key {
                    state.remove(&key_text(old));
                }
                if s.op == Op::Delete {
                    state.remove(&key_text(&s.key));
                } else {
                    state.insert(
                        key_text(&s.key),
                        (
                            image_int(&s.new, &s.columns, "version").unwrap(),
                            image_text(&s.new, &s.columns, "name"),
                        ),
                    );
                }
            }
        }
    }
    let table: BTreeMap<String, (i64, String)> = PgServer::shared()
        .client(&db)
        .query("SELECT grp, n, version, name FROM items", &[])
        .expect("read items")
        .iter()
        .map(|r| {
            (
                key_text(&[
                    Value::from(r.get::<_, String>(0)),
                    Value::Int(r.get::<_, i32>(1).into()),
                ]),
                (r.get::<_, i32>(2).into(), r.get::<_, String>(3)),
            )
        })
        .collect();
    assert_eq!(state.len(), table.len());
    assert!(
        state == table,
        "the stream with its chunks does not end equal to the table"
    );
    let ids: HashSet<&str> = stream
        .iter()
        .map(|s| s.stable_id.as_str())
        .chain(
            chunks
                .iter()
                .flat_map(|c| c.1.rows.iter().map(|r| r.stable_id.as_str())),
        )
        .collect();
    assert_eq!(
        ids.len(),
        stream.len() + chunks.iter().map(|c| c.1.rows.len()).sum::<usize>(),
        "stable ids repeat"
    );
}

// ---------------------------------------------------------------------------------------
// Requests and progress
// ---------------------------------------------------------------------------------------

fn request(consumer: &Consumer, tables: &[&str]) -> BackfillRequest {
    BackfillRequest::Request {
        consumer: consumer.clone(),
        tables: tables.iter().map(|t| t.to_string()).collect(),
        requested_by: "epidemic backfill".into(),
    }
}

fn progress_of(reply: BackfillReply) -> Vec<(String, String, BackfillState)> {
    reply
        .backfills
        .into_iter()
        .map(|p| (p.handler, p.table, p.state))
        .collect()
}

fn list(b: &mut HostBackend) -> Vec<(String, String, BackfillState)> {
    progress_of(b.backfills(&BackfillRequest::List).expect("list"))
}

fn pending(b: &mut HostBackend, c: &Consumer) -> Vec<BackfillProgress> {
    b.backfills(&BackfillRequest::Pending {
        consumer: c.clone(),
    })
    .expect("pending")
    .backfills
}

/// The progress store: a request stores one row per table (as the consumer spells it,
/// one row for `users` and `public.users`) in state requested; a second request of the
/// same consumer while one is requested or running is refused in one line naming the
/// consumer and the table, storing nothing; pending gives the consumer's unfinished rows,
/// save updates only the row of the same request, list gives every row, cancel drops the
/// unfinished ones, a done row is replaced by a new request, unregister forgets the
/// consumer's rows, an installation without the table is told to install, and uninstall
/// removes it.
#[test]
fn backfill_requests_and_progress_are_kept_in_the_database() {
    let (url, db) = database(
        "bf_store",
        "CREATE TABLE users (id int PRIMARY KEY, name text);
         CREATE TABLE groups (id int PRIMARY KEY, name text);",
    );
    let watches = [
        watch("users", &["name"], &[]),
        watch("groups", &["name"], &[]),
    ];
    let mut b = open(&url);
    // Before install: nothing to read, and a request says what to do.
    assert!(list(&mut b).is_empty());
    let h = consumer("h");
    let err = b.backfills(&request(&h, &["users"])).unwrap_err();
    assert!(matches!(err, BackendError::Invalid(_)), "{err:?}");
    assert!(one_line(&err).contains("run `epidemic install`"), "{err}");
    let plan = b.plan_install(&watches).expect("plan");
    assert!(
        plan.iter()
            .any(|s| s.starts_with("CREATE TABLE IF NOT EXISTS \"epidemic\".\"backfill\"")),
        "{plan:#?}"
    );
    let (mut b, h) = setup(&url, &watches, "h");
    let other = consumer("other");
    let err = b.backfills(&request(&h, &["nope"])).unwrap_err();
    assert!(matches!(err, BackendError::Invalid(_)), "{err:?}");
    assert!(
        one_line(&err).contains("table nope is not installed"),
        "{err}"
    );
    let err = b.backfills(&request(&h, &[])).unwrap_err();
    assert!(matches!(err, BackendError::Invalid(_)), "{err:?}");
    assert!(list(&mut b).is_empty(), "a refused request stores nothing");

    let stored = b
        .backfills(&request(&h, &["users", "groups", "public.users"]))
        .expect("request");
    assert_eq!(
        progress_of(stored.clone()),
        vec![
            ("h".into(), "users".into(), BackfillState::Requested),
            ("h".into(), "groups".into(), BackfillState::Requested),
        ]
    );
    assert_eq!(stored.backfills[0].requested_by, "epidemic backfill");
    assert!(stored.backfills[0].requested_at_us > 0);
    assert_eq!(
        stored.backfills[0].requested_at_us,
        stored.backfills[1].requested_at_us
    );
    b.backfills(&request(&other, &["public.users"]))
        .expect("another consumer's request");

    // A second request while one is requested: refused, nothing stored.
    let err = b.backfills(&request(&h, &["groups"])).unwrap_err();
    assert!(matches!(err, BackendError::Invalid(_)), "{err:?}");
    let msg = one_line(&err);
    assert!(
        msg.contains(
            "a backfill of consumer mx1/h is already requested (table users: 0 rows done)"
        ),
        "{msg}"
    );
    let waiting = pending(&mut b, &h);
    assert_eq!(waiting, stored.backfills);

    // Progress saved and read back; refused while running, with the progress in the message.
    let mut p = waiting[0].clone();
    p.state = BackfillState::Running;
    p.rows_done = 1200;
    p.rows_estimate = Some(50_000);
    p.last_key = Some(vec![Value::Int(1200)]);
    p.started_at_us = 5;
    let saved = b
        .backfills(&BackfillRequest::Save(p.clone()))
        .expect("save")
        .backfills;
    assert_eq!(saved.len(), 1);
    assert!(saved[0].updated_at_us >= saved[0].requested_at_us);
    let waiting = pending(&mut b, &h);
    assert_eq!(waiting[0].last_key, p.last_key);
    assert_eq!(
        (
            waiting[0].rows_done,
            waiting[0].rows_estimate,
            waiting[0].started_at_us
        ),
        (1200, Some(50_000), 5)
    );
    assert_eq!(waiting[0].state, BackfillState::Running);
    let err = b.backfills(&request(&h, &["users"])).unwrap_err();
    assert!(
        one_line(&err).contains(
            "a backfill of consumer mx1/h is already running (table users: 1200 of ~50000 rows); wait for it to finish, or cancel it"
        ),
        "{err}"
    );

    // Done rows are not pending, and a new request replaces them, whatever the spelling.
    for mut q in waiting {
        q.state = BackfillState::Done;
        assert_eq!(
            b.backfills(&BackfillRequest::Save(q))
                .expect("save")
                .backfills
                .len(),
            1
        );
    }
    assert!(pending(&mut b, &h).is_empty());
    assert_eq!(
        list(&mut b),
        vec![
            ("h".into(), "users".into(), BackfillState::Done),
            ("h".into(), "groups".into(), BackfillState::Done),
            (
                "other".into(),
                "public.users".into(),
                BackfillState::Requested
            ),
        ]
    );
    let again = b
        .backfills(&request(&h, &["public.users"]))
        .expect("request again")
        .backfills;
    assert_eq!(again[0].rows_done, 0);
    assert_eq!(
        list(&mut b),
        vec![
            ("h".into(), "groups".into(), BackfillState::Done),
            ("h".into(), "public.users".into(), BackfillState::Requested),
            (
                "other".into(),
                "public.users".into(),
                BackfillState::Requested
            ),
        ]
    );
    // A save of the replaced request (a daemon still on the old one) changes nothing.
    assert!(b
        .backfills(&BackfillRequest::Save(p.clone()))
        .expect("save")
        .backfills
        .is_empty());

    // Cancel drops the unfinished rows of that consumer only; a save after it is told so.
    let cancelled = b
        .backfills(&BackfillRequest::Cancel {
            consumer: h.clone(),
        })
        .expect("cancel");
    assert_eq!(
        progress_of(cancelled),
        vec![("h".into(), "public.users".into(), BackfillState::Requested)]
    );
    let mut late = again[0].clone();
    late.state = BackfillState::Running;
    assert!(b
        .backfills(&BackfillRequest::Save(late))
        .expect("save")
        .backfills
        .is_empty());
    assert_eq!(
        list(&mut b),
        vec![
            ("h".into(), "groups".into(), BackfillState::Done),
            (
                "other".into(),
                "public.users".into(),
                BackfillState::Requested
            ),
        ]
    );
    // Unregister forgets the consumer's rows.
    b.register(&other, &["users".into()], StartFrom::Now)
        .expect("register");
    assert!(b.unregister(&other).expect("unregister"));
    assert_eq!(
        list(&mut b),
        vec![("h".into(), "groups".into(), BackfillState::Done)]
    );
    // An installation from before backfills: nothing to read, a request says to install,
    // and install brings the table.
    sql(&db, "DROP TABLE epidemic.backfill");
    assert!(list(&mut b).is_empty());
    assert!(pending(&mut b, &h).is_empty());
    let err = b.backfills(&request(&h, &["users"])).unwrap_err();
    assert!(
        one_line(&err).contains("has no backfill table")
            && err.to_string().contains("epidemic install"),
        "{err}"
    );
    b.install(&watches).expect("install");
    b.backfills(&request(&h, &["users"])).expect("request");
    // Uninstall removes it with everything else.
    b.uninstall().expect("uninstall");
    let gone: bool = PgServer::shared()
        .client(&db)
        .query_one("SELECT to_regclass('epidemic.backfill') IS NULL", &[])
        .unwrap()
        .get(0);
    assert!(gone);
    assert!(list(&mut b).is_empty());
}

/// Two requests for one consumer at the same time, from two connections: exactly one is
/// stored, the other is refused as already requested (never both, never a SQL error).
#[test]
fn of_two_racing_backfill_requests_one_wins() {
    let (url, _db) = database(
        "bf_race",
        "CREATE TABLE users (id int PRIMARY KEY, name text);
         CREATE TABLE groups (id int PRIMARY KEY, name text);",
    );
    let (mut admin, h) = setup(
        &url,
        &[
            watch("users", &["name"], &[]),
            watch("groups", &["name"], &[]),
        ],
        "h",
    );
    let mut racers: Vec<HostBackend> = (0..2).map(|_| open(&url)).collect();
    for round in 0..30 {
        let barrier = Arc::new(Barrier::new(2));
        let handles: Vec<_> = racers
            .drain(..)
            .zip(["users", "groups"])
            .map(|(mut b, table)| {
                let (barrier, h) = (barrier.clone(), h.clone());
                thread::spawn(move || {
                    barrier.wait();
                    let r = b.backfills(&request(&h, &[table]));
                    (b, r)
                })
            })
            .collect();
        let mut results = Vec::new();
        for handle in handles {
            let (b, r) = handle.join().expect("racer");
            racers.push(b);
            results.push(r);
        }
        let won = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(won, 1, "round {round}: {results:?}");
        let lost = results.iter().find_map(|r| r.as_ref().err()).unwrap();
        assert!(
            matches!(lost, BackendError::Invalid(_)),
            "round {round}: {lost:?}"
        );
        assert!(one_line(lost).contains("is already requested"), "{lost}");
        assert_eq!(pending(&mut admin, &h).len(), 1, "round {round}");
        admin
            .backfills(&BackfillRequest::Cancel {
                consumer: h.clone(),
            })
            .expect("cancel");
    }
}

// ---------------------------------------------------------------------------------------
// End to end, through the daemon
// ---------------------------------------------------------------------------------------

/// Writers on `mail_users` until `stop`: quota updates (bumping `version`), renames,
/// inserts, deletes and moves to a fresh id, with ids never reused.
fn mail_writer(db: &str, w: u64, existing: i64, stop: Arc<AtomicBool>) -> thread::JoinHandle<()> {
    let mut client = PgServer::shared().client(db);
    thread::spawn(move || {
        let mut rng = Rng::new(100 + w);
        let mut fresh = (w as i64 + 1) * 10_000_000;
        let mut i = 0;
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            let target = rng.range(1, existing);
            let s = match rng.below(100) {
                0..=49 => format!(
                    "UPDATE mail_users SET quota_bytes = quota_bytes + 1, version = version + 1 WHERE id = {target}"
                ),
                50..=64 => format!(
                    "UPDATE mail_users SET username = 'w{w}.{i}', version = version + 1 WHERE id = {target}"
                ),
                65..=79 => {
                    fresh += 1;
                    format!("INSERT INTO mail_users VALUES ({fresh}, 'new{w}.{i}', 0, 1)")
                }
                80..=89 => format!("DELETE FROM mail_users WHERE id = {target}"),
                _ => {
                    fresh += 1;
                    format!(
                        "UPDATE mail_users SET id = {fresh}, version = version + 1 WHERE id = {target}"
                    )
                }
            };
            let _ = client.batch_execute(&s);
            thread::sleep(Duration::from_millis(1));
        }
    })
}

type Row = (String, i64, i64);

fn row_of(image: &serde_json::Value) -> Row {
    (
        image["username"].as_str().expect("username").to_owned(),
        image["quota_bytes"].as_i64().expect("quota"),
        image["version"].as_i64().expect("version"),
    )
}

/// Replay a recorder file: the state it ends with per id, checking on the way that no
/// snapshot row is older than a live change of its key the handler already had (or
/// comes after its key was deleted or moved away). Returns the state and how many
/// snapshot rows came.
fn replay(path: &Path) -> (BTreeMap<i64, Row>, usize) {
    let mut state: BTreeMap<i64, Row> = BTreeMap::new();
    let mut newest_live: HashMap<i64, i64> = HashMap::new();
    let mut gone: HashSet<i64> = HashSet::new();
    let mut snapshots = 0;
    for l in recorded(path) {
        let id = l["key"]["id"].as_i64().expect("key");
        match l["origin"].as_str().expect("origin") {
            "snapshot" => {
                snapshots += 1;
                let row = row_of(&l["new"]);
                assert!(
                    !gone.contains(&id),
                    "a snapshot row of {id} after it was gone"
                );
                if let Some(&v) = newest_live.get(&id) {
                    assert!(
                        row.2 >= v,
                        "a snapshot row of {id} (version {}) after a live change of version {v}",
                        row.2
                    );
                }
                state.insert(id, row);
            }
            "live" => {
                if let Some(old) = l["old_key"]["id"].as_i64() {
                    gone.insert(old);
                    state.remove(&old);
                }
                if l["op"] == "DELETE" {
                    gone.insert(id);
                    state.remove(&id);
                } else {
                    let row = row_of(&l["new"]);
                    let v = newest_live.entry(id).or_insert(row.2);
                    *v = (*v).max(row.2);
                    state.insert(id, row);
                }
            }
            other => panic!("a change of origin {other} reached the handler"),
        }
    }
    (state, snapshots)
}

fn table_rows(db: &str) -> BTreeMap<i64, Row> {
    PgServer::shared()
        .client(db)
        .query(
            "SELECT id, username, quota_bytes, version FROM mail_users",
            &[],
        )
        .expect("read mail_users")
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2), r.get::<_, i32>(3).into())))
        .collect()
}

fn backfill_states(b: &mut HostBackend) -> Vec<BackfillState> {
    b.backfills(&BackfillRequest::List)
        .expect("list")
        .backfills
        .into_iter()
        .map(|p| p.state)
        .collect()
}

/// The daemon with `start = "snapshot"` on a table of 20,000 rows while writers update,
/// rename, insert, delete and move rows, SIGKILLed twice mid-backfill: it resumes from
/// the saved progress (not from the start), no snapshot row reaches the handler after a
/// newer live change of its key, and the handler's view ends equal to the table. Then
/// `epidemic backfill` asks for another one (a second request is refused while it is
/// pending), which converges again.
#[test]
fn through_the_daemon_a_backfill_under_writers_and_sigkills_converges_on_the_table() {
    const ROWS: i64 = 20_000;
    let (url, db) = database(
        "bf_daemon",
        "CREATE TABLE mail_users (id bigint PRIMARY KEY, username varchar(200) NOT NULL,
                                  quota_bytes bigint NOT NULL, version int NOT NULL)",
    );
    sql(
        &db,
        &format!(
            "INSERT INTO mail_users SELECT i, 'user' || i, i, 1 FROM generate_series(1, {ROWS}) i"
        ),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("rec.jsonl");
    let config = dir.path().join("epidemic.toml");
    std::fs::write(
        &config,
        format!(
            "[database]\nurl = {url:?}\n\n[daemon]\nname = \"mx1\"\nbatch_size = 100\n\
             backfill_chunk = 200\nprune_interval_ms = 200\n\n{}",
            recorder_handler(
                "rec",
                &out,
                "mail_users",
                &["username", "quota_bytes", "version"],
                ""
            )
            .replace("[handler.config]", "start = \"snapshot\"\n[handler.config]")
        ),
    )
    .expect("write config");
    let log = dir.path().join("daemon.log");
    let start = || Daemon::start(&config, &log, &[]);
    let snapshot_rows = || {
        std::fs::read_to_string(&out)
            .unwrap_or_default()
            .matches("\"origin\":\"snapshot\"")
            .count()
    };
    let mut b = open(&url);

    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..4)
        .map(|w| mail_writer(&db, w, ROWS, stop.clone()))
        .collect();
    let mut daemon = start();
    for kill in 0..2 {
        let seen = snapshot_rows();
        assert!(
            wait_until(WAIT, || snapshot_rows() > seen + 500),
            "no snapshot rows came:\n{}",
            daemon.log_text()
        );
        daemon.kill();
        assert!(
            backfill_states(&mut b) != [BackfillState::Done],
            "the backfill was done before kill {kill}: make the table bigger"
        );
        daemon = start();
    }
    assert!(
        wait_until(WAIT, || backfill_states(&mut b) == [BackfillState::Done]),
        "the backfill did not finish: {:?}\n{}",
        backfill_states(&mut b),
        daemon.log_text()
    );
    assert_eq!(
        daemon.log_text().matches("resumed=true").count(),
        2,
        "each restart resumes the backfill:\n{}",
        daemon.log_text()
    );
    let converge = |sentinel: i64| {
        // Delivery is in order: once the sentinel's insert arrived, so did everything before.
        sql(
            &db,
            &format!("INSERT INTO mail_users VALUES ({sentinel}, 'sentinel{sentinel}', 0, 1)"),
        );
        let needle = format!("sentinel{sentinel}");
        assert!(
            wait_until(WAIT, || std::fs::read_to_string(&out)
                .unwrap_or_default()
                .contains(&needle)),
            "the sentinel never came"
        );
        let (state, snapshots) = replay(&out);
        let table = table_rows(&db);
        let differ: Vec<_> = table
            .iter()
            .filter(|(id, row)| state.get(id) != Some(row))
            .take(5)
            .collect();
        assert!(
            state == table,
            "the handler's view differs from the table: {} vs {} rows; first differences {differ:?}",
            state.len(),
            table.len()
        );
        snapshots
    };
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().expect("writer");
    }
    let snapshots = converge(-1);
    assert!(
        snapshots < 2 * ROWS as usize,
        "the restarts began the backfill again from the start: {snapshots} snapshot rows"
    );

    // Another one from the command line, while writers run again.
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..2)
        .map(|w| mail_writer(&db, 10 + w, ROWS, stop.clone()))
        .collect();
    let first = epidemic(&config, &["backfill", "--handler", "rec", "--detach"]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let second = epidemic(&config, &["backfill", "--handler", "rec", "--detach"]);
    assert!(!second.status.success(), "a second request was accepted");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains("a backfill of consumer mx1/rec is already"),
        "{stderr}"
    );
    assert!(
        wait_until(WAIT, || backfill_states(&mut b) == [BackfillState::Done]),
        "the second backfill did not finish: {:?}",
        backfill_states(&mut b)
    );
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().expect("writer");
    }
    let total = converge(-2);
    assert!(
        total >= snapshots + ROWS as usize / 2,
        "{total} after {snapshots}"
    );
    assert!(daemon.alive(), "{}", daemon.log_text());
}
