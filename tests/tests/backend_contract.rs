//! The backend contract suite: what every backend library promises the host
//! (`epidemic_plugin_sdk::backend::Backend`), checked the same way on all three against
//! real servers, through the built `.so` exactly as the host drives it. A new backend gets
//! the suite by implementing [`ContractDb`] and adding one line to `contract!` below.
//!
//! Each test has a database of its own (a new database on the binary's shared
//! PostgreSQL and MariaDB servers, a new file for SQLite). What only one backend does
//! (PostgreSQL's snapshots and NOTIFY, MySQL's gaps, SQLite's REPLACE capture) is tested
//! in that backend's own files.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use epidemic_plugin_host::{self as host, HostBackend, Library};
use epidemic_plugin_sdk::backend::{
    BackendError, Chunk, ChunkRequest, ColumnIn, Consumer, DeadLetter, DeadLetterQuery,
    DeadLetterUpdate, Registered, StartFrom, Watch,
};
use epidemic_plugin_sdk::{Change, Op, Origin, Value};
use epidemic_tests::{backend_path, wait_until};
use serde_json::json;

/// One backend and a database of the test's own, as the suite sees them.
trait ContractDb {
    /// The backend library's short name (`sqlite`, `postgres`, `mysql`).
    fn backend(&self) -> &'static str;
    /// `database.url` of this test's database.
    fn url(&self) -> String;
    /// Run statements in one transaction, on a connection of the test's own.
    fn exec(&self, statements: &[&str]);
    /// Column types in this dialect.
    fn types(&self) -> &'static Types;
    /// The URL with a wrong password, for a backend that has passwords.
    fn url_with_password(&self, _password: &str) -> Option<String> {
        None
    }
    /// Make the server crash (stop without a clean shutdown) and come back, where the
    /// backend has a server. Returns whether it did.
    fn crash_server(&self) -> bool {
        false
    }
}

/// Type names for the value round trip.
struct Types {
    int: &'static str,
    float: &'static str,
    text: &'static str,
    bytes: &'static str,
    /// An exact decimal type, where the backend has one (SQLite's NUMERIC is a float).
    numeric: Option<&'static str>,
    /// A literal of `bytes` for 00 ff 41.
    bytes_literal: &'static str,
    /// Appended to every CREATE TABLE (MariaDB's default character set is not UTF-8).
    table_options: &'static str,
}

/// Create a table in this dialect.
fn create<D: ContractDb>(db: &D, sql: &str) {
    db.exec(&[&format!("{sql}{}", db.types().table_options)]);
}

fn library(name: &str) -> &'static Library {
    static LIBS: OnceLock<std::sync::Mutex<Vec<&'static Library>>> = OnceLock::new();
    let libs = LIBS.get_or_init(Default::default);
    let mut libs = libs.lock().unwrap();
    if let Some(l) = libs.iter().find(|l| l.name == name) {
        return l;
    }
    let lib = host::load(&backend_path(name)).expect("load the backend library");
    lib.expect_backend().expect("a backend library");
    let lib: &'static Library = Box::leak(Box::new(lib));
    libs.push(lib);
    lib
}

fn open<D: ContractDb>(db: &D) -> HostBackend {
    library(db.backend())
        .open_backend(&db.url(), &json!({}))
        .expect("open backend")
}

fn watch(table: &str, columns: &[&str]) -> Watch {
    Watch::new(table, columns.iter().copied())
}

fn consumer(handler: &str) -> Consumer {
    Consumer {
        daemon: "mx1".into(),
        handler: handler.into(),
    }
}

/// Resolve, install and register `handler` from the oldest change.
fn setup<D: ContractDb>(db: &D, watches: &[Watch], handler: &str) -> (HostBackend, Consumer) {
    let mut b = open(db);
    let resolved = b.resolve(watches).expect("resolve");
    b.install(&resolved).expect("install");
    let c = consumer(handler);
    let tables: Vec<String> = resolved.iter().map(|w| w.table.clone()).collect();
    b.register(&c, &tables, StartFrom::Oldest)
        .expect("register");
    (b, c)
}

/// Fetch and ack until `n` changes arrived (or a minute passed).
fn collect(b: &mut HostBackend, c: &Consumer, n: usize) -> Vec<Change> {
    let mut all = Vec::new();
    wait_until(Duration::from_secs(60), || {
        loop {
            let batch = b.fetch(c, 100).expect("fetch");
            let Some(last) = batch.changes.last() else {
                break;
            };
            b.ack(c, &batch.token, last.id).expect("ack");
            all.extend(batch.changes);
        }
        all.len() >= n
    });
    assert_eq!(all.len(), n, "changes: {all:#?}");
    all
}

fn int(v: Option<&Value>) -> i64 {
    v.and_then(Value::as_i64)
        .unwrap_or_else(|| panic!("expected an integer, got {v:?}"))
}

fn text(v: Option<&Value>) -> String {
    match v {
        Some(Value::Text(s)) => s.clone(),
        other => panic!("expected text, got {other:?}"),
    }
}

fn value_round_trip<D: ContractDb>(db: D) {
    let t = db.types();
    let numeric_col = t.numeric.map(|n| format!(", n {n}")).unwrap_or_default();
    let create_sql = format!(
        "CREATE TABLE vals (id {int} PRIMARY KEY, i {int}, f {float}, s {text}, b {bytes}{numeric_col})",
        int = t.int,
        float = t.float,
        text = t.text,
        bytes = t.bytes,
    );
    create(&db, &create_sql);
    let mut cols = vec!["i", "f", "s", "b"];
    if t.numeric.is_some() {
        cols.push("n");
    }
    let (mut b, c) = setup(&db, &[watch("vals", &cols)], "h");
    let long = "é✓ ".repeat(30_000);
    let n_lit = if t.numeric.is_some() {
        ", 12345678901234567890.125"
    } else {
        ""
    };
    let n_null = if t.numeric.is_some() { ", NULL" } else { "" };
    db.exec(&[
        &format!(
            "INSERT INTO vals VALUES (1, {}, 1.5, 'unicode ✓ 𝄞 é', {}{n_lit})",
            i64::MAX,
            t.bytes_literal
        ),
        &format!(
            "INSERT INTO vals VALUES (2, {}, -0.25, '', NULL{n_null})",
            i64::MIN
        ),
        &format!("INSERT INTO vals VALUES (3, NULL, NULL, NULL, NULL{n_null})"),
        &format!("UPDATE vals SET s = '{long}' WHERE id = 3"),
        "DELETE FROM vals WHERE id = 2",
    ]);
    let got = collect(&mut b, &c, 5);
    let one = &got[0];
    assert_eq!(one.op, Op::Insert);
    assert_eq!(int(one.new_value("i")), i64::MAX);
    assert_eq!(one.new_value("f"), Some(&Value::Float(1.5)));
    assert_eq!(text(one.new_value("s")), "unicode ✓ 𝄞 é");
    assert_eq!(one.new_value("b"), Some(&Value::Bytes(vec![0, 255, 65])));
    if t.numeric.is_some() {
        // Exact, as text: never through a float.
        assert_eq!(
            one.new_value("n").map(|v| v.to_string()),
            Some("12345678901234567890.125".to_owned()),
            "{one:?}"
        );
    }
    assert_eq!(int(got[1].new_value("i")), i64::MIN);
    assert_eq!(got[1].new_value("f"), Some(&Value::Float(-0.25)));
    assert_eq!(text(got[1].new_value("s")), "");
    assert_eq!(got[1].new_value("b"), Some(&Value::Null));
    for col in &cols {
        assert_eq!(got[2].new_value(col), Some(&Value::Null), "{col}");
    }
    assert_eq!(got[3].op, Op::Update);
    assert_eq!(got[3].old_value("s"), Some(&Value::Null));
    assert_eq!(text(got[3].new_value("s")), long);
    assert_eq!(got[4].op, Op::Delete);
    assert_eq!(int(got[4].old_value("i")), i64::MIN);
    assert_eq!(got[4].new, None);
    for c in &got {
        assert_eq!(c.origin, Origin::Live);
    }
}

fn primary_keys_come_with_every_change<D: ContractDb>(db: D) {
    let t = db.types();
    create(&db, &format!(
        "CREATE TABLE members (grp {text} NOT NULL, num {int} NOT NULL, note {text}, PRIMARY KEY (grp, num))",
        text = if db.backend() == "mysql" { "VARCHAR(50)" } else { t.text },
        int = t.int,
    ));
    // The handler watches `note` only: the key comes anyway.
    let (mut b, c) = setup(&db, &[watch("members", &["note"])], "h");
    db.exec(&[
        "INSERT INTO members VALUES ('a', 1, 'x')",
        "UPDATE members SET note = 'y' WHERE grp = 'a' AND num = 1",
        // An update of the key alone: captured, with the key before and after.
        "UPDATE members SET num = 2 WHERE grp = 'a' AND num = 1",
        "DELETE FROM members WHERE grp = 'a' AND num = 2",
    ]);
    let got = collect(&mut b, &c, 4);
    let caps = b.capabilities();
    for ch in &got {
        assert_eq!(ch.key_columns.as_ref(), ["grp", "num"], "{ch:?}");
        // The key is captured first, whatever the handler watches.
        assert_eq!(&ch.columns[..2], ["grp", "num"], "{ch:?}");
        // What a change carries is what the backend says it fills.
        assert_eq!(ch.txid.is_some(), caps.transaction_ids, "{ch:?}");
        assert_eq!(ch.commit_seq.is_some(), caps.commit_order, "{ch:?}");
        assert_eq!(ch.schema.is_some(), caps.schemas, "{ch:?}");
    }
    assert_eq!(got[0].key, vec![Value::Text("a".into()), Value::Int(1)]);
    assert_eq!(got[0].old_key, None);
    assert_eq!(got[1].op, Op::Update);
    assert_eq!(got[1].old_key, None, "the key did not change");
    assert_eq!(got[2].op, Op::Update);
    assert_eq!(got[2].key, vec![Value::Text("a".into()), Value::Int(2)]);
    assert_eq!(
        got[2].old_key,
        Some(vec![Value::Text("a".into()), Value::Int(1)])
    );
    assert_eq!(got[3].op, Op::Delete);
    assert_eq!(got[3].key, vec![Value::Text("a".into()), Value::Int(2)]);
}

fn a_table_without_a_primary_key_needs_a_configured_key<D: ContractDb>(db: D) {
    let t = db.types();
    create(
        &db,
        &format!(
            "CREATE TABLE loose (a {int} NOT NULL, b {text})",
            int = t.int,
            text = t.text
        ),
    );
    let mut b = open(&db);
    let err = b.resolve(&[watch("loose", &["b"])]).unwrap_err();
    assert!(matches!(err, BackendError::Invalid(_)), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("loose") && msg.contains("key = ["),
        "one line naming the table and the fix: {msg}"
    );
    assert!(!msg.contains('\n'), "{msg}");
    // Nothing was created for it.
    assert!(b.status().map(|s| s.tables.is_empty()).unwrap_or(true));
    // Key columns that do not exist are refused too.
    let mut bad = watch("loose", &["b"]);
    bad.key = vec!["nope".into()];
    let msg = b.resolve(&[bad]).unwrap_err().to_string();
    assert!(msg.contains("nope") && msg.contains("loose"), "{msg}");
    // With a configured key it works, and the changes carry it.
    let mut keyed = watch("loose", &["b"]);
    keyed.key = vec!["A".into()];
    let (mut b, c) = setup(&db, &[keyed], "h");
    db.exec(&["INSERT INTO loose VALUES (7, 'x')"]);
    let got = collect(&mut b, &c, 1);
    assert_eq!(got[0].key_columns.as_ref(), ["a"], "catalog spelling");
    assert_eq!(got[0].key, vec![Value::Int(7)]);
}

fn stable_ids_are_never_reused<D: ContractDb>(db: D) {
    let t = db.types();
    create(
        &db,
        &format!(
            "CREATE TABLE items (id {int} PRIMARY KEY, v {text})",
            int = t.int,
            text = t.text
        ),
    );
    let mut seen: HashSet<String> = HashSet::new();
    let mut round = |db: &D, first: i64| {
        let (mut b, c) = setup(db, &[watch("items", &["v"])], "h");
        db.exec(&[
            &format!("INSERT INTO items VALUES ({first}, 'a')"),
            &format!("INSERT INTO items VALUES ({}, 'b')", first + 1),
        ]);
        for ch in collect(&mut b, &c, 2) {
            assert!(!ch.stable_id.is_empty(), "{ch:?}");
            assert!(
                seen.insert(ch.stable_id.clone()),
                "stable id {} came twice",
                ch.stable_id
            );
        }
        b
    };
    let mut b = round(&db, 1);
    // After uninstall + install, log ids may start again: stable ids may not.
    b.uninstall().expect("uninstall");
    let mut b = round(&db, 3);
    b.uninstall().expect("uninstall");
    round(&db, 5);
}

fn a_crash_between_fetch_and_ack_redelivers_and_a_partial_ack_resumes<D: ContractDb>(db: D) {
    let t = db.types();
    create(
        &db,
        &format!(
            "CREATE TABLE items (id {int} PRIMARY KEY, v {text})",
            int = t.int,
            text = t.text
        ),
    );
    let (mut b, c) = setup(&db, &[watch("items", &["v"])], "h");
    let inserts: Vec<String> = (1..=10)
        .map(|i| format!("INSERT INTO items VALUES ({i}, 'v{i}')"))
        .collect();
    db.exec(&inserts.iter().map(String::as_str).collect::<Vec<_>>());
    let batch = {
        let mut batch = b.fetch(&c, 100).expect("fetch");
        wait_until(Duration::from_secs(30), || {
            if batch.changes.len() < 10 {
                batch = b.fetch(&c, 100).expect("fetch");
            }
            batch.changes.len() == 10
        });
        batch
    };
    assert_eq!(batch.changes.len(), 10);
    // Handled four, acked them, then died: a new connection gets exactly the other six.
    b.ack(&c, &batch.token, batch.changes[3].id).expect("ack");
    drop(b);
    let mut b = open(&db);
    let rest = collect(&mut b, &c, 6);
    let keys: Vec<i64> = rest.iter().map(|ch| int(ch.key.first())).collect();
    assert_eq!(keys, (5..=10).collect::<Vec<_>>());
    // A server crash now loses nothing either. Acknowledgements that had not reached the
    // disk when it crashed (PostgreSQL's do not wait for their flush) may be lost: their
    // changes come again, in order, before the new one (at least once).
    if db.crash_server() {
        db.exec(&["INSERT INTO items VALUES (11, 'after')"]);
        let mut b = open(&db);
        let mut keys: Vec<i64> = Vec::new();
        wait_until(Duration::from_secs(60), || {
            loop {
                let batch = b.fetch(&c, 100).expect("fetch");
                let Some(last) = batch.changes.last() else {
                    break;
                };
                b.ack(&c, &batch.token, last.id).expect("ack");
                keys.extend(batch.changes.iter().map(|ch| int(ch.key.first())));
            }
            keys.contains(&11)
        });
        let again = keys.len().saturating_sub(1);
        assert!(
            keys.last() == Some(&11)
                && keys[..again] == (11 - again as i64..=10).collect::<Vec<_>>(),
            "after the crash: {keys:?}"
        );
    }
}

fn prune_keeps_what_any_consumer_still_needs<D: ContractDb>(db: D) {
    let t = db.types();
    create(
        &db,
        &format!(
            "CREATE TABLE items (id {int} PRIMARY KEY, v {text})",
            int = t.int,
            text = t.text
        ),
    );
    let (mut b, fast) = setup(&db, &[watch("items", &["v"])], "fast");
    let slow = consumer("slow");
    b.register(&slow, &["items".into()], StartFrom::Oldest)
        .expect("register");
    db.exec(&[
        "INSERT INTO items VALUES (1, 'a')",
        "INSERT INTO items VALUES (2, 'b')",
    ]);
    collect(&mut b, &fast, 2);
    b.prune().expect("prune");
    // The slow consumer still gets both.
    let got = collect(&mut b, &slow, 2);
    assert_eq!(int(got[1].key.first()), 2);
    // Once both passed them they may go (a backend may keep a log's newest row: MySQL
    // does, so that ids never go backwards), and a new consumer from the oldest change
    // sees none of them.
    db.exec(&["INSERT INTO items VALUES (3, 'c')"]);
    collect(&mut b, &fast, 1);
    collect(&mut b, &slow, 1);
    b.prune().expect("prune");
    let late = consumer("late");
    b.register(&late, &["items".into()], StartFrom::Oldest)
        .expect("register");
    db.exec(&["INSERT INTO items VALUES (4, 'd')"]);
    let first = b.fetch(&late, 10).expect("fetch");
    let keys: Vec<i64> = first.changes.iter().map(|c| int(c.key.first())).collect();
    assert!(
        !keys.is_empty() && keys.iter().all(|k| *k >= 3),
        "pruned rows stay pruned: {keys:?}"
    );
}

fn an_evicted_consumer_is_told_and_registers_again<D: ContractDb>(db: D) {
    let t = db.types();
    create(
        &db,
        &format!(
            "CREATE TABLE items (id {int} PRIMARY KEY, v {text})",
            int = t.int,
            text = t.text
        ),
    );
    let (mut b, gone) = setup(&db, &[watch("items", &["v"])], "gone");
    let live = consumer("live");
    b.register(&live, &["items".into()], StartFrom::Oldest)
        .expect("register");
    // `live` keeps beating; `gone` does not, and is evicted once unseen for 2 s (the
    // database's clock may count whole seconds).
    let mut evicted = Vec::new();
    assert!(wait_until(Duration::from_secs(30), || {
        b.touch(&live).expect("touch");
        evicted.extend(b.evict_stale(Duration::from_secs(2)).expect("evict"));
        !evicted.is_empty()
    }));
    assert_eq!(evicted, vec![gone.clone()]);
    // Its ack and heartbeat are refused with the typed error the host branches on.
    let err = b.touch(&gone).unwrap_err();
    assert!(err.is_evicted(), "{err:?}");
    assert_eq!(
        b.register(&gone, &["items".into()], StartFrom::Now)
            .expect("register"),
        Registered::Evicted
    );
    b.touch(&gone).expect("alive again");
}

fn dead_letters_round_trip<D: ContractDb>(db: D) {
    let t = db.types();
    create(
        &db,
        &format!(
            "CREATE TABLE items (id {int} PRIMARY KEY, v {text})",
            int = t.int,
            text = t.text
        ),
    );
    let (mut b, c) = setup(&db, &[watch("items", &["v"])], "h");
    db.exec(&["INSERT INTO items VALUES (1, 'a')"]);
    let change = collect(&mut b, &c, 1).remove(0);
    let letter = DeadLetter::new(&c, &change, "it broke: ✗", 3, 1_700_000_000_000_000);
    let id = b.add_dead_letter(&letter).expect("add");
    let other = b
        .add_dead_letter(&DeadLetter::new(&consumer("other"), &change, "x", 1, 1))
        .expect("add");
    let all = b.dead_letters(&DeadLetterQuery::All).expect("list");
    assert_eq!(all.len(), 2);
    let mine = b
        .dead_letters(&DeadLetterQuery::Consumer(c.clone()))
        .expect("list");
    assert_eq!(mine.len(), 1);
    let got = &mine[0];
    assert_eq!(got.id, id);
    assert_eq!(got.error, "it broke: ✗");
    assert_eq!(got.attempts, 3);
    assert_eq!(got.op, Op::Insert);
    assert_eq!(got.failed_at_us, 1_700_000_000_000_000);
    assert_eq!(
        got.change().expect("stored change"),
        change,
        "exactly as delivered"
    );
    b.update_dead_letters(&DeadLetterUpdate::RequestRetry(vec![id]))
        .expect("retry");
    let marked = b
        .dead_letters(&DeadLetterQuery::RetryRequested(c.clone()))
        .expect("list");
    assert_eq!(marked.iter().map(|l| l.id).collect::<Vec<_>>(), vec![id]);
    b.update_dead_letters(&DeadLetterUpdate::Failed {
        id,
        error: "again".into(),
        attempts: 4,
        failed_at_us: 5,
    })
    .expect("failed");
    let again = b
        .dead_letters(&DeadLetterQuery::Ids(vec![id]))
        .expect("list");
    assert_eq!((again[0].attempts, again[0].retry_requested), (4, false));
    assert_eq!(again[0].error, "again");
    b.update_dead_letters(&DeadLetterUpdate::Delete(vec![id, other]))
        .expect("delete");
    assert!(b
        .dead_letters(&DeadLetterQuery::All)
        .expect("list")
        .is_empty());
}

fn hostile_names_are_refused_and_create_nothing<D: ContractDb>(db: D) {
    let t = db.types();
    create(
        &db,
        &format!(
            "CREATE TABLE items (id {int} PRIMARY KEY, v {text})",
            int = t.int,
            text = t.text
        ),
    );
    let mut b = open(&db);
    for w in [
        watch("items; DROP TABLE items", &["v"]),
        watch("items", &["v\"; DROP TABLE items; --"]),
        watch("items", &["v`"]),
    ] {
        let err = b.install(std::slice::from_ref(&w)).unwrap_err();
        assert!(matches!(err, BackendError::Invalid(_)), "{w:?}: {err:?}");
    }
    let mut keyed = watch("items", &["v"]);
    keyed.key = vec!["id'); DROP TABLE items; --".into()];
    assert!(b.resolve(std::slice::from_ref(&keyed)).is_err());
    assert!(b.install(&[keyed]).is_err());
    // Nothing of Epidemic's exists, and the table is intact.
    assert!(b.status().map(|s| s.tables.is_empty()).unwrap_or(true));
    db.exec(&["INSERT INTO items VALUES (1, 'still here')"]);
}

fn install_is_idempotent_and_uninstall_removes_everything<D: ContractDb>(db: D) {
    let t = db.types();
    create(
        &db,
        &format!(
            "CREATE TABLE items (id {int} PRIMARY KEY, v {text}, w {text})",
            int = t.int,
            text = t.text
        ),
    );
    let (mut b, c) = setup(&db, &[watch("items", &["v"])], "h");
    let again = b.resolve(&[watch("items", &["v"])]).expect("resolve");
    b.install(&again).expect("install again");
    b.install(&again).expect("and again");
    db.exec(&["INSERT INTO items VALUES (1, 'a', 'a')"]);
    // One change, not one per install.
    let got = collect(&mut b, &c, 1);
    assert_eq!(got[0].op, Op::Insert);
    assert!(
        !wait_until(Duration::from_millis(300), || {
            !b.fetch(&c, 10).expect("fetch").changes.is_empty()
        }),
        "a second trigger fired"
    );
    let status = b.status().expect("status");
    assert_eq!(status.tables.len(), 1);
    assert!(status.tables[0]
        .triggers
        .iter()
        .all(|(_, present)| *present));
    assert!(status.tables[0].problems.is_empty(), "{status:?}");
    b.uninstall().expect("uninstall");
    assert!(
        b.plan_uninstall().expect("plan").is_empty(),
        "uninstall left something"
    );
    // The user's table is untouched.
    db.exec(&["INSERT INTO items VALUES (2, 'b', 'b')"]);
}

fn a_wrong_password_is_a_connection_error_that_does_not_show_it<D: ContractDb>(db: D) {
    let Some(url) = db.url_with_password("s3cret-Pw") else {
        return;
    };
    let err = library(db.backend())
        .open_backend(&url, &json!({}))
        .err()
        .expect("a wrong password is refused");
    let msg = err.to_string();
    assert!(!msg.contains("s3cret-Pw"), "{msg}");
    assert!(msg.contains("***") || !msg.contains("s3cret"), "{msg}");
}

/// Every chunk of `table` that `only` keeps, by `limit` rows: the chunks as read.
fn chunks(b: &mut HostBackend, table: &str, only: &[ColumnIn], limit: u32) -> Vec<Chunk> {
    let mut after = None;
    let mut all = Vec::new();
    loop {
        let chunk = b
            .snapshot_chunk(&ChunkRequest {
                table: table.into(),
                after: after.clone(),
                limit,
                only: only.to_vec(),
            })
            .unwrap_or_else(|e| panic!("chunk of {table} after {after:?}: {e}"));
        assert!(chunk.rows.len() <= limit as usize);
        assert!(chunk.watermark > 0, "every chunk writes its watermark");
        let last = chunk.last;
        if let Some(r) = chunk.rows.last() {
            after = Some(r.key.clone());
        }
        all.push(chunk);
        if last {
            return all;
        }
        assert!(all.len() < 100, "no end");
    }
}

/// The keys of the rows kept, in the order read.
fn kept(b: &mut HostBackend, only: &[ColumnIn], limit: u32) -> Vec<i64> {
    chunks(b, "hosts", only, limit)
        .iter()
        .flat_map(|c| &c.rows)
        .map(|r| int(r.key.first()))
        .collect()
}

fn only(column: &str, values: &[Value]) -> ColumnIn {
    ColumnIn {
        column: column.into(),
        values: values.to_vec(),
    }
}

/// A backfill's chunk request with `only` (the part of a handler's row filter a SELECT
/// can say) returns exactly the rows whose column equals one of the values, in key order,
/// paged by key across chunks; NULLs never; an integer column narrower than the values;
/// text with quotes, backslashes and accents in a column of another character set (on
/// MariaDB). Nothing kept: one empty last chunk. A column the table lacks: refused.
fn a_chunk_keeps_only_the_rows_asked_for<D: ContractDb>(db: D) {
    let t = db.types();
    let (host, small, backslash) = match db.backend() {
        "mysql" => (
            "VARCHAR(40) CHARACTER SET latin1 COLLATE latin1_bin",
            "SMALLINT",
            "'a\\\\b'",
        ),
        "postgres" => ("varchar(40)", "smallint", "'a\\b'"),
        _ => ("TEXT", "INTEGER", "'a\\b'"),
    };
    create(
        &db,
        &format!(
            "CREATE TABLE hosts (id {int} PRIMARY KEY, host {host}, n {small}, note {text})",
            int = t.int,
            text = t.text
        ),
    );
    let mut rows: Vec<String> = [
        "(1, 'mx1', 1)",
        "(2, 'o''brien', 2)",
        "(3, 'mx2', 3)",
        "(5, 'é-mx', 5)",
        "(6, NULL, 6)",
        "(7, 'mx1', NULL)",
        "(8, 'mx1', 8)",
        "(9, 'MX1', 9)",
        "(10, 'mx1', 10)",
    ]
    .iter()
    .map(|r| r.to_string())
    .collect();
    rows.push(format!("(4, {backslash}, 4)"));
    rows.extend((11..=20).map(|i| format!("({i}, 'mx9', {i})")));
    db.exec(&[&format!(
        "INSERT INTO hosts (id, host, n) VALUES {}",
        rows.join(", ")
    )]);
    let (mut b, _) = setup(&db, &[watch("hosts", &["host", "n", "note"])], "h");

    let mx1 = [only("host", &["mx1".into()])];
    for limit in [1, 2, 3, 100] {
        assert_eq!(
            kept(&mut b, &mx1, limit),
            [1, 7, 8, 10],
            "chunks of {limit}"
        );
    }
    // Paging: chunks of 2 are full until the one after the last kept row.
    let pages = chunks(&mut b, "hosts", &mx1, 2);
    let sizes: Vec<(usize, bool)> = pages.iter().map(|c| (c.rows.len(), c.last)).collect();
    assert_eq!(sizes, [(2, false), (2, false), (0, true)]);
    for r in pages.iter().flat_map(|c| &c.rows) {
        assert_eq!(text(r.new_value("host")), "mx1");
        assert_eq!(r.origin, Origin::Snapshot);
    }
    // Text that needs quoting, escaping and converting, in one list.
    let odd = [only(
        "host",
        &[
            "o'brien".into(),
            "a\\b".into(),
            "é-mx".into(),
            "nosuch".into(),
        ],
    )];
    assert_eq!(kept(&mut b, &odd, 2), [2, 4, 5]);
    let got: Vec<String> = chunks(&mut b, "hosts", &odd, 10)[0]
        .rows
        .iter()
        .map(|r| text(r.new_value("host")))
        .collect();
    assert_eq!(got, ["o'brien", "a\\b", "é-mx"]);
    // An integer column, with a value beyond its type's range, which matches nothing.
    assert_eq!(
        kept(
            &mut b,
            &[only("n", &[3.into(), 8.into(), 100_000.into()])],
            1
        ),
        [3, 8]
    );
    // Every condition at once; the catalog's spelling or not.
    assert_eq!(
        kept(
            &mut b,
            &[
                only("HOST", &["mx1".into()]),
                only("n", &[1.into(), 9.into(), 10.into(), 7.into()])
            ],
            1
        ),
        [1, 10]
    );
    // Nothing kept: one empty chunk, the last, with its watermark.
    let none = chunks(&mut b, "hosts", &[only("host", &["nobody".into()])], 5);
    assert_eq!(none.len(), 1);
    assert!(none[0].rows.is_empty() && none[0].last);
    // Without `only`, every row.
    assert_eq!(kept(&mut b, &[], 7), (1..=20).collect::<Vec<i64>>());
    // A column the table does not have: a bug or a dropped column, refused by name.
    let err = b
        .snapshot_chunk(&ChunkRequest {
            table: "hosts".into(),
            after: None,
            limit: 5,
            only: vec![only("hostx", &["mx1".into()])],
        })
        .unwrap_err();
    assert!(matches!(err, BackendError::Invalid(_)), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("hosts") && msg.contains("hostx"), "{msg}");
    assert_eq!(msg.lines().count(), 1, "{msg}");
}

mod sqlite_db {
    use super::*;

    pub struct SqliteDb {
        _dir: tempfile::TempDir,
        path: PathBuf,
    }

    impl SqliteDb {
        pub fn new() -> Self {
            let dir = tempfile::tempdir().expect("tempdir");
            let path =
                epidemic_tests::sqlite::create_db(dir.path(), "db", "PRAGMA user_version = 1;");
            SqliteDb { _dir: dir, path }
        }
    }

    static TYPES: Types = Types {
        int: "INTEGER",
        float: "REAL",
        text: "TEXT",
        bytes: "BLOB",
        numeric: None,
        bytes_literal: "X'00FF41'",
        table_options: "",
    };

    impl ContractDb for SqliteDb {
        fn backend(&self) -> &'static str {
            "sqlite"
        }
        fn url(&self) -> String {
            epidemic_tests::sqlite::url(&self.path)
        }
        /// In the `sqlite3` tool: the backend library is loaded in this process, and a
        /// second SQLite in it would break the library's locks (see
        /// `epidemic_tests::sqlite::sqlite3`).
        fn exec(&self, statements: &[&str]) {
            let mut sql = String::from("BEGIN;\n");
            for s in statements {
                sql.push_str(s);
                sql.push_str(";\n");
            }
            sql.push_str("COMMIT;\n");
            epidemic_tests::sqlite::sqlite3(&self.path, &sql);
        }
        fn types(&self) -> &'static Types {
            &TYPES
        }
    }
}

mod pg_db {
    use super::*;
    use epidemic_tests::pg::{wait_for_server, PgServer, StopMode};

    pub struct PgDb {
        /// A server of the test's own (for the crash), or the binary's shared one.
        private: Option<PgServer>,
        name: String,
        url: String,
    }

    impl PgDb {
        pub fn new() -> Self {
            Self::on(None)
        }

        /// On a server of its own, which the test may crash.
        pub fn private() -> Self {
            Self::on(Some(PgServer::start_private()))
        }

        fn on(private: Option<PgServer>) -> Self {
            static N: AtomicUsize = AtomicUsize::new(0);
            let name = format!(
                "contract_{}_{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            );
            let url = private
                .as_ref()
                .unwrap_or_else(|| PgServer::shared())
                .create_database(&name);
            PgDb { private, name, url }
        }

        fn server(&self) -> &PgServer {
            self.private.as_ref().unwrap_or_else(|| PgServer::shared())
        }
    }

    static TYPES: Types = Types {
        int: "bigint",
        float: "double precision",
        text: "text",
        bytes: "bytea",
        numeric: Some("numeric"),
        bytes_literal: "'\\x00ff41'::bytea",
        table_options: "",
    };

    impl ContractDb for PgDb {
        fn backend(&self) -> &'static str {
            "postgres"
        }
        fn url(&self) -> String {
            self.url.clone()
        }
        fn exec(&self, statements: &[&str]) {
            let mut client = self.server().client(&self.name);
            let mut tx = client.transaction().expect("begin");
            for s in statements {
                tx.batch_execute(s).unwrap_or_else(|e| panic!("{s}: {e}"));
            }
            tx.commit().expect("commit");
        }
        fn types(&self) -> &'static Types {
            &TYPES
        }
        fn url_with_password(&self, password: &str) -> Option<String> {
            Some(
                self.url
                    .replace("postgres@", &format!("nobody:{password}@")),
            )
        }
        fn crash_server(&self) -> bool {
            let Some(server) = &self.private else {
                return false;
            };
            server.stop(StopMode::Immediate);
            server.start();
            assert!(wait_for_server(server, &self.name, Duration::from_secs(60)));
            true
        }
    }
}

mod mysql_db {
    use super::*;
    use ::mysql::prelude::Queryable;
    use epidemic_tests::mysql::MySqlServer;

    pub struct MySqlDb {
        /// A server of the test's own (for the crash), or the binary's shared one.
        private: Option<MySqlServer>,
        name: String,
        url: String,
    }

    impl MySqlDb {
        pub fn new() -> Self {
            Self::on(None)
        }

        /// On a server of its own, which the test may crash.
        pub fn private() -> Self {
            Self::on(Some(MySqlServer::start_new()))
        }

        fn on(private: Option<MySqlServer>) -> Self {
            static N: AtomicUsize = AtomicUsize::new(0);
            let name = format!(
                "contract_{}_{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            );
            let url = private
                .as_ref()
                .unwrap_or_else(|| MySqlServer::shared())
                .create_database(&name);
            MySqlDb { private, name, url }
        }

        fn server(&self) -> &MySqlServer {
            self.private
                .as_ref()
                .unwrap_or_else(|| MySqlServer::shared())
        }
    }

    static TYPES: Types = Types {
        int: "BIGINT",
        float: "DOUBLE",
        text: "LONGTEXT",
        bytes: "LONGBLOB",
        numeric: Some("DECIMAL(30,3)"),
        bytes_literal: "X'00FF41'",
        table_options: " DEFAULT CHARSET=utf8mb4",
    };

    impl ContractDb for MySqlDb {
        fn backend(&self) -> &'static str {
            "mysql"
        }
        fn url(&self) -> String {
            self.url.clone()
        }
        fn exec(&self, statements: &[&str]) {
            let mut conn = self.server().conn(&self.name);
            let mut tx = conn
                .start_transaction(::mysql::TxOpts::default())
                .expect("begin");
            for s in statements {
                tx.query_drop(s).unwrap_or_else(|e| panic!("{s}: {e}"));
            }
            tx.commit().expect("commit");
        }
        fn types(&self) -> &'static Types {
            &TYPES
        }
        fn url_with_password(&self, password: &str) -> Option<String> {
            Some(self.url.replace("root@", &format!("nobody:{password}@")))
        }
        fn crash_server(&self) -> bool {
            let Some(server) = &self.private else {
                return false;
            };
            server.kill();
            server.start();
            true
        }
    }
}

macro_rules! contract {
    ($($backend:ident => $db:expr, crashable: $crashable:expr;)*) => {
        $(
            mod $backend {
                use super::*;

                #[test]
                fn value_round_trip() {
                    super::value_round_trip($db);
                }

                #[test]
                fn primary_keys_come_with_every_change() {
                    super::primary_keys_come_with_every_change($db);
                }

                #[test]
                fn a_table_without_a_primary_key_needs_a_configured_key() {
                    super::a_table_without_a_primary_key_needs_a_configured_key($db);
                }

                #[test]
                fn stable_ids_are_never_reused() {
                    super::stable_ids_are_never_reused($db);
                }

                #[test]
                fn a_crash_between_fetch_and_ack_redelivers_and_a_partial_ack_resumes() {
                    super::a_crash_between_fetch_and_ack_redelivers_and_a_partial_ack_resumes(
                        $crashable,
                    );
                }

                #[test]
                fn prune_keeps_what_any_consumer_still_needs() {
                    super::prune_keeps_what_any_consumer_still_needs($db);
                }

                #[test]
                fn an_evicted_consumer_is_told_and_registers_again() {
                    super::an_evicted_consumer_is_told_and_registers_again($db);
                }

                #[test]
                fn dead_letters_round_trip() {
                    super::dead_letters_round_trip($db);
                }

                #[test]
                fn hostile_names_are_refused_and_create_nothing() {
                    super::hostile_names_are_refused_and_create_nothing($db);
                }

                #[test]
                fn install_is_idempotent_and_uninstall_removes_everything() {
                    super::install_is_idempotent_and_uninstall_removes_everything($db);
                }

                #[test]
                fn a_chunk_keeps_only_the_rows_asked_for() {
                    super::a_chunk_keeps_only_the_rows_asked_for($db);
                }

                #[test]
                fn a_wrong_password_is_a_connection_error_that_does_not_show_it() {
                    super::a_wrong_password_is_a_connection_error_that_does_not_show_it($db);
                }
            }
        )*
    };
}

contract! {
    sqlite => sqlite_db::SqliteDb::new(), crashable: sqlite_db::SqliteDb::new();
    postgres => pg_db::PgDb::new(), crashable: pg_db::PgDb::private();
    mysql => mysql_db::MySqlDb::new(), crashable: mysql_db::MySqlDb::private();
}
