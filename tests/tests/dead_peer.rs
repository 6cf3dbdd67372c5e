//! Dead connections: the daemon reaches the database through a TCP proxy
//! ([`TcpProxy`]) that freezes every established connection — forwarding stops in both
//! directions and no socket closes, as when a NAT entry expires — while new connections
//! go through. Within `dead_peer_timeout_ms` (plus the heartbeat's third and some slack)
//! the daemon must log the lost connection, reconnect, say it is back, and deliver every
//! change committed meanwhile. On PostgreSQL (the default wake-ups, and `notify =
//! "always"` with a long fallback poll, where only the LISTEN heartbeat can notice) and
//! on MariaDB.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use epidemic_plugin_sdk::backend::{Consumer, StartFrom, Watch};
use epidemic_tests::mysql::MySqlServer;
use epidemic_tests::pg::PgServer;
use epidemic_tests::proxy::TcpProxy;
use epidemic_tests::{backend_path, recorded, recorder_handler, wait_until, Daemon};
use mysql::prelude::Queryable;

const WAIT: Duration = Duration::from_secs(60);
/// The `dead_peer_timeout_ms` under test.
const DEAD_PEER: Duration = Duration::from_secs(3);

/// How late the lost connection may be noticed after the freeze: the limit, a third of
/// it for a heartbeat that was not due yet, and slack for a loaded machine.
fn detection_bound() -> Duration {
    DEAD_PEER + DEAD_PEER / 3 + Duration::from_secs(4)
}

struct Run {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    out: PathBuf,
}

impl Run {
    fn new(url: &str, options: &str) -> (Run, PathBuf) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_owned();
        let out = dir.join("recorded.jsonl");
        let config = dir.join("epidemic.toml");
        std::fs::write(
            &config,
            format!(
                "[database]\nurl = {url:?}\ndead_peer_timeout_ms = {}\n{options}\n\n[daemon]\nname = \"mx1\"\n\n{}",
                DEAD_PEER.as_millis(),
                recorder_handler("rec", &out, "mail_users", &["username"], "")
            ),
        )
        .expect("write config");
        (
            Run {
                _tmp: tmp,
                dir,
                out,
            },
            config,
        )
    }

    fn ids(&self) -> BTreeSet<i64> {
        recorded(&self.out)
            .iter()
            .filter_map(|l| {
                l["new"]["username"]
                    .as_str()?
                    .strip_prefix("user")?
                    .parse()
                    .ok()
            })
            .collect()
    }

    fn wait_for_ids(&self, upto: i64) -> bool {
        let want: BTreeSet<i64> = (1..=upto).collect();
        wait_until(WAIT, || self.ids().is_superset(&want))
    }
}

/// The scenario, whatever the database: `insert(id)` commits a row directly (not
/// through the proxy).
fn frozen_path_is_noticed_and_nothing_is_lost(
    url: &str,
    options: &str,
    proxy: &TcpProxy,
    insert: &dyn Fn(i64),
) {
    let (run, config) = Run::new(url, options);
    let log = run.dir.join("daemon.log");
    let daemon = Daemon::start(&config, &log, &[]);
    assert!(
        daemon.wait_for_log("epidemic started", WAIT),
        "{}",
        daemon.log_text()
    );
    for id in 1..=3 {
        insert(id);
    }
    assert!(
        run.wait_for_ids(3),
        "{:?}\n{}",
        run.ids(),
        daemon.log_text()
    );

    let before = proxy.accepted();
    let frozen = proxy.freeze_established();
    let frozen_at = Instant::now();
    // The reader, the main connection, the heartbeat (and the LISTEN wait) are all on
    // frozen connections now.
    assert!(
        frozen >= 3,
        "only {frozen} connections went through the proxy"
    );
    // Committed while the daemon's connections are dead.
    for id in 4..=6 {
        insert(id);
    }

    assert!(
        daemon.wait_for_log("database connection lost; reconnecting", detection_bound()),
        "no lost connection logged within {:?} of the freeze:\n{}",
        detection_bound(),
        daemon.log_text()
    );
    let noticed = frozen_at.elapsed();
    eprintln!("lost connection noticed {noticed:?} after the freeze (dead_peer_timeout_ms = {DEAD_PEER:?})");
    assert!(
        daemon.wait_for_log("database reachable again", WAIT),
        "{}",
        daemon.log_text()
    );
    assert!(
        run.wait_for_ids(6),
        "changes committed while the path was dead: {:?}\n{}",
        run.ids(),
        daemon.log_text()
    );
    eprintln!("caught up {:?} after the freeze", frozen_at.elapsed());
    assert!(proxy.accepted() > before, "the daemon made new connections");

    // Every connection is alive again, not only the reader's: the daemon goes on.
    insert(7);
    assert!(
        run.wait_for_ids(7),
        "{:?}\n{}",
        run.ids(),
        daemon.log_text()
    );
    let text = daemon.log_text();
    assert!(!text.contains("stopped unexpectedly"), "{text}");
}

// ---------------------------------------------------------------- PostgreSQL

fn pg_setup(db: &str) -> (&'static PgServer, TcpProxy, String) {
    let server = PgServer::shared();
    server.create_database(db);
    server
        .client(db)
        .batch_execute("CREATE TABLE mail_users (id BIGINT PRIMARY KEY, username TEXT NOT NULL)")
        .expect("schema");
    let proxy = TcpProxy::start(server.port());
    let url = format!("postgres://postgres@127.0.0.1:{}/{db}", proxy.port());
    (server, proxy, url)
}

fn pg_insert(server: &'static PgServer, db: &str) -> impl Fn(i64) {
    let db = db.to_owned();
    move |id| {
        server
            .client(&db)
            .execute(
                "INSERT INTO mail_users VALUES ($1, $2)",
                &[&id, &format!("user{id}")],
            )
            .expect("insert");
    }
}

/// The PostgreSQL backend alone (no daemon) with `options`, installed on `mail_users` and
/// with a consumer registered from now.
fn pg_backend_reading_mail_users(
    url: &str,
    options: serde_json::Value,
) -> (epidemic_plugin_host::HostBackend, Consumer) {
    let lib = epidemic_plugin_host::load(&backend_path("postgres")).expect("load the backend");
    let mut backend = lib.open_backend(url, &options).expect("open");
    let watch = Watch {
        table: "mail_users".into(),
        columns: vec!["username".into()],
        ..Default::default()
    };
    let resolved = backend.resolve(&[watch]).expect("resolve");
    backend.install(&resolved).expect("install");
    let consumer = Consumer {
        daemon: "mx1".into(),
        handler: "rec".into(),
    };
    backend
        .register(&consumer, &["mail_users".into()], StartFrom::Now)
        .expect("register");
    (backend, consumer)
}

/// Read once, then wait until a wait blocks: the first waits start listening (and
/// register, where there is a `sleeper` table) and return at once.
fn settle_into_waiting(backend: &mut epidemic_plugin_host::HostBackend, consumer: &Consumer) {
    backend.fetch(consumer, 10).expect("fetch");
    assert!(
        wait_until(WAIT, || !backend
            .wait(Duration::from_millis(300))
            .expect("wait")),
        "the connection never settled into waiting"
    );
}

#[test]
fn postgres_a_frozen_path_is_noticed_and_nothing_is_lost() {
    let (server, proxy, url) = pg_setup("dead_peer_default");
    frozen_path_is_noticed_and_nothing_is_lost(
        &url,
        "",
        &proxy,
        &pg_insert(server, "dead_peer_default"),
    );
}

/// With `notify = "always"` and a fallback poll far longer than the test, the reader
/// sits in LISTEN with nothing owed: the statements it sends while waiting (its
/// registration as a waiting reader, its heartbeat) find the dead path.
#[test]
fn postgres_a_frozen_connection_waiting_in_listen_is_noticed() {
    let (server, proxy, url) = pg_setup("dead_peer_listen");
    frozen_path_is_noticed_and_nothing_is_lost(
        &url,
        "notify = \"always\"\nfallback_poll_ms = 600000",
        &proxy,
        &pg_insert(server, "dead_peer_listen"),
    );
}

/// A connection that only listens owes the server nothing, and without the `sleeper`
/// table (a schema installed by an older version) it sends no registration either: only
/// the heartbeat can find a dead path. On the backend alone, without the daemon (whose
/// periodic checks would find it too).
#[test]
fn postgres_a_connection_that_only_listens_is_tested_by_its_heartbeat() {
    let (server, proxy, url) = pg_setup("dead_peer_heartbeat");
    let (mut backend, consumer) = pg_backend_reading_mail_users(
        &url,
        serde_json::json!({
            "notify": "always",
            "fallback_poll_ms": 600_000,
            "dead_peer_timeout_ms": DEAD_PEER.as_millis() as u64,
        }),
    );
    server
        .client("dead_peer_heartbeat")
        .batch_execute("DROP TABLE epidemic.sleeper")
        .expect("drop the sleeper table");
    settle_into_waiting(&mut backend, &consumer);
    proxy.freeze_established();
    let frozen_at = Instant::now();
    let result = backend.wait(WAIT);
    let noticed = frozen_at.elapsed();
    eprintln!("the listening connection failed {noticed:?} after the freeze: {result:?}");
    assert!(
        matches!(&result, Err(e) if e.is_connection()),
        "a connection error, not {result:?}"
    );
    assert!(noticed < detection_bound(), "{noticed:?}");
}

/// A backend dropped while its connection waits registered (a daemon stopping) deletes
/// its registration first; on a path that died silently that statement must not hold up
/// the shutdown for the dead-peer limit (ten minutes here), nor for ever without one.
#[test]
fn postgres_a_backend_dropped_on_a_frozen_path_does_not_hold_up_shutdown() {
    let (_server, proxy, url) = pg_setup("dead_peer_drop");
    let (mut backend, consumer) = pg_backend_reading_mail_users(
        &url,
        serde_json::json!({
            "fallback_poll_ms": 600_000,
            "dead_peer_timeout_ms": 600_000,
        }),
    );
    settle_into_waiting(&mut backend, &consumer);
    proxy.freeze_established();
    let (done, dropped) = std::sync::mpsc::channel();
    let frozen_at = Instant::now();
    std::thread::spawn(move || {
        drop(backend);
        let _ = done.send(());
    });
    let result = dropped.recv_timeout(Duration::from_secs(60));
    eprintln!("dropped {:?} after the freeze", frozen_at.elapsed());
    assert!(
        result.is_ok(),
        "dropping the backend on a frozen path took over a minute"
    );
}

// ---------------------------------------------------------------- MariaDB

#[test]
fn mariadb_a_frozen_path_is_noticed_and_nothing_is_lost() {
    let server = MySqlServer::shared();
    let db = "dead_peer";
    server.create_database(db);
    server
        .conn(db)
        .query_drop(
            "CREATE TABLE mail_users (id BIGINT PRIMARY KEY, username VARCHAR(100) NOT NULL)",
        )
        .expect("schema");
    let proxy = TcpProxy::start(server.port());
    // `prefer_socket=false`: the driver would otherwise move to the server's Unix
    // socket, around the proxy.
    let url = format!(
        "mysql://root@127.0.0.1:{}/{db}?prefer_socket=false",
        proxy.port()
    );
    let insert = |id: i64| {
        server
            .conn(db)
            .exec_drop(
                "INSERT INTO mail_users VALUES (?, ?)",
                (id, format!("user{id}")),
            )
            .expect("insert");
    };
    frozen_path_is_noticed_and_nothing_is_lost(&url, "", &proxy, &insert);
}
