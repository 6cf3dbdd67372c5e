//! The sinks (issue 15) end to end: the real `epidemic` binary, the SQLite backend (and
//! PostgreSQL for the NATS scenario) and the real `libepidemic_webhook.so` / `libepidemic_nats.so`, against a real HTTP receiver
//! this test runs (tiny_http on a loopback port) and a real `nats-server` with JetStream
//! (the harness's `nats.rs`), with writers in this process standing in for the
//! application and SIGKILLs of the daemon.
//!
//! These tests rely on the backend contract that every change carries a non-empty
//! `stable_id` that never repeats (the idempotency key and the `Nats-Msg-Id`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use epidemic_tests::nats::{stream_detail, NatsServer};
use epidemic_tests::pg::PgServer;
use epidemic_tests::tls::TestCa;
use epidemic_tests::{epidemic, free_port, plugin_path, sqlite, wait_until, Daemon};
use hmac::{Hmac, Mac};
use rusqlite::params;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

/// One row per key; every change of a row raises `version`, so per-key order is visible
/// in what arrives.
const SCHEMA: &str = "CREATE TABLE items (id INTEGER PRIMARY KEY, version INTEGER NOT NULL);";

/// [`SCHEMA`] on PostgreSQL.
const PG_SCHEMA: &str = "CREATE TABLE items (id BIGINT PRIMARY KEY, version BIGINT NOT NULL);";

/// Commits `(id, version)` changes in one transaction.
type WriteFn = dyn FnMut(&[(i64, i64)]) + Send;

/// The database the application writes to.
#[derive(Debug, Clone)]
enum Db {
    Sqlite(PathBuf),
    /// A database of its own on the binary's shared throwaway PostgreSQL server.
    Postgres(String),
}

/// The backend a test runs on.
#[derive(Debug, Clone, Copy)]
enum Backend {
    Sqlite,
    Postgres,
}

impl Db {
    fn url(&self) -> String {
        match self {
            Db::Sqlite(path) => sqlite::url(path),
            Db::Postgres(url) => url.clone(),
        }
    }

    /// The SQLite file (for the tests that run on SQLite only).
    fn sqlite(&self) -> &Path {
        match self {
            Db::Sqlite(path) => path,
            Db::Postgres(_) => panic!("a SQLite test on PostgreSQL"),
        }
    }

    /// Run `(id, version)` changes in one transaction on a connection of the test's own:
    /// version 0 inserts the row, any other updates it.
    fn writer(&self) -> Box<WriteFn> {
        match self {
            Db::Sqlite(path) => {
                let mut conn = sqlite::connect(path);
                Box::new(move |changes| {
                    let tx = conn.transaction().expect("begin");
                    for (id, v) in changes {
                        if *v == 0 {
                            tx.execute(
                                "INSERT INTO items (id, version) VALUES (?1, 0)",
                                params![id],
                            )
                            .expect("insert");
                        } else {
                            tx.execute(
                                "UPDATE items SET version = ?2 WHERE id = ?1",
                                params![id, v],
                            )
                            .expect("update");
                        }
                    }
                    tx.commit().expect("commit");
                })
            }
            Db::Postgres(url) => {
                let mut client = postgres::Client::connect(url, postgres::NoTls).expect("connect");
                Box::new(move |changes| {
                    let mut tx = client.transaction().expect("begin");
                    for (id, v) in changes {
                        if *v == 0 {
                            tx.execute("INSERT INTO items (id, version) VALUES ($1, 0)", &[id])
                                .expect("insert");
                        } else {
                            tx.execute("UPDATE items SET version = $2 WHERE id = $1", &[id, v])
                                .expect("update");
                        }
                    }
                    tx.commit().expect("commit");
                })
            }
        }
    }
}

/// A database, a config, and the daemon's log.
struct Setup {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    db: Db,
    config: PathBuf,
    log: PathBuf,
}

/// Numbers the PostgreSQL databases of this binary's tests.
static NEXT_PG_DB: AtomicUsize = AtomicUsize::new(0);

impl Setup {
    /// A SQLite database with [`SCHEMA`] and a config with one `[[handler]]`: `handler`
    /// holds its handler-level lines (plugin, retry policy), `config` its
    /// `[handler.config]`.
    fn new(handler: &str, config: &str) -> Setup {
        Setup::on(Backend::Sqlite, handler, config)
    }

    /// The same on `backend`.
    fn on(backend: Backend, handler: &str, config: &str) -> Setup {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_owned();
        let db = match backend {
            Backend::Sqlite => Db::Sqlite(sqlite::create_db(&dir, "app", SCHEMA)),
            Backend::Postgres => {
                let server = PgServer::shared();
                let name = format!(
                    "sinks_{}_{}",
                    std::process::id(),
                    NEXT_PG_DB.fetch_add(1, Ordering::SeqCst)
                );
                let url = server.create_database(&name);
                server
                    .client(&name)
                    .batch_execute(PG_SCHEMA)
                    .expect("schema");
                Db::Postgres(url)
            }
        };
        let config_path = dir.join("epidemic.toml");
        let text = format!(
            "[database]\nurl = {:?}\n\n[daemon]\nname = \"mx1\"\nplugin_dir = {:?}\n\n\
             [[handler]]\nname = \"sink\"\n{handler}\n[handler.config]\ntable = \"items\"\n\
             columns = [\"id\", \"version\"]\n{config}\n",
            db.url(),
            plugin_path("webhook")
                .parent()
                .expect("target dir")
                .display()
                .to_string(),
        );
        std::fs::write(&config_path, text).expect("write config");
        Setup {
            log: dir.join("daemon.log"),
            _dir: tmp,
            dir,
            db,
            config: config_path,
        }
    }

    fn starts(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .matches("epidemic started")
            .count()
    }

    /// Start the daemon and wait until this start is ready.
    fn start(&self) -> Daemon {
        self.start_with(&[])
    }

    fn start_with(&self, args: &[&str]) -> Daemon {
        let before = self.starts();
        let d = Daemon::start(&self.config, &self.log, args);
        assert!(
            wait_until(WAIT, || self.starts() > before),
            "daemon did not start:\n{}",
            d.log_text()
        );
        d
    }

    /// Start the daemon expecting it to refuse: its exit status and its last log line.
    fn refused_start(&self) -> String {
        let mut d = Daemon::start(&self.config, &self.log, &[]);
        assert!(
            wait_until(WAIT, || !d.alive()),
            "the daemon started although its config is bad:\n{}",
            d.log_text()
        );
        assert_eq!(self.starts(), 0, "{}", d.log_text());
        let text = d.log_text();
        text.lines()
            .rev()
            .find(|l| l.contains("error"))
            .unwrap_or_default()
            .to_owned()
    }

    fn count(&self, needle: &str) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .matches(needle)
            .count()
    }
}

/// Writers standing in for the application: `writers` threads, each with its own
/// connection and its own `rows` rows, each row inserted (version 0) and then updated to
/// versions 1..`versions`, in transactions of `per_tx` statements, `pause` between
/// transactions (pacing the load so that it lasts through a scenario's events). Returns
/// the threads; the committed changes are every (id, version) of [`committed`].
fn write_concurrently(
    db: &Db,
    writers: i64,
    rows: i64,
    versions: i64,
    per_tx: usize,
    pause: Duration,
) -> Vec<JoinHandle<()>> {
    (0..writers)
        .map(|w| {
            let mut write = db.writer();
            std::thread::spawn(move || {
                let ids: Vec<i64> = (0..rows).map(|r| w * rows + r + 1).collect();
                let mut statements: Vec<(i64, i64)> = Vec::new();
                for v in 0..versions {
                    for id in &ids {
                        statements.push((*id, v));
                    }
                }
                for chunk in statements.chunks(per_tx) {
                    write(chunk);
                    std::thread::sleep(pause);
                }
            })
        })
        .collect()
}

/// Every (id, version) the writers commit.
fn committed(writers: i64, rows: i64, versions: i64) -> HashSet<(i64, i64)> {
    (1..=writers * rows)
        .flat_map(|id| (0..versions).map(move |v| (id, v)))
        .collect()
}

/// The (id, version) a change's JSON describes.
fn change_of(json: &Value) -> (i64, i64) {
    let new = &json["new"];
    (
        new["id"].as_i64().expect("new.id"),
        new["version"].as_i64().expect("new.version"),
    )
}

/// Checks per-key order over changes in arrival order, first arrivals only (a repeat of
/// an already seen stable id is a redelivery): each row's versions arrive 0, 1, 2, ...
fn assert_per_key_order(first_arrivals: &[(i64, i64)]) {
    let mut next: HashMap<i64, i64> = HashMap::new();
    for (id, v) in first_arrivals {
        let want = next.entry(*id).or_insert(0);
        assert_eq!(
            *v, *want,
            "row {id}: version {v} arrived where {want} was due (per-key order broken)"
        );
        *want += 1;
    }
}

// ---------------------------------------------------------------------------------------
// Webhook
// ---------------------------------------------------------------------------------------

const SECRET: &str = "webhook-test-secret";

/// One request the receiver accepted (answered 2xx, or would have: see `slow`).
#[derive(Debug, Clone)]
struct Arrival {
    key: String,
    body: Value,
}

/// How the receiver answers the n-th request it reads (counting every request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Ok,
    /// 500: the change is not taken.
    Fail,
    /// 429 with `Retry-After: 1`: not taken.
    TooMany,
    /// Taken, then answered only after the handler's read timeout: the handler sees a
    /// timeout and sends it again (a duplicate with the same key).
    Slow,
    /// 422 with a body: a permanent refusal.
    Refuse,
}

/// Decides the answer to the n-th request, given its body.
type AnswerFn = dyn Fn(usize, &Value) -> Answer + Send + Sync;

/// A real HTTP receiver on a fixed loopback port that can go down and come back.
struct Receiver {
    port: u16,
    arrivals: Arc<Mutex<Vec<Arrival>>>,
    requests: Arc<AtomicUsize>,
    bad_signatures: Arc<AtomicUsize>,
    answer: Arc<AnswerFn>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Receiver {
    fn start(answer: impl Fn(usize, &Value) -> Answer + Send + Sync + 'static) -> Receiver {
        let mut r = Receiver {
            port: free_port(),
            arrivals: Arc::default(),
            requests: Arc::default(),
            bad_signatures: Arc::default(),
            answer: Arc::new(answer),
            stop: Arc::default(),
            thread: None,
        };
        r.up();
        r
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    /// (Re)start listening on the same port.
    fn up(&mut self) {
        assert!(self.thread.is_none());
        let server = tiny_http::Server::http(("127.0.0.1", self.port)).expect("listen");
        self.stop.store(false, Ordering::SeqCst);
        let (arrivals, requests, bad, answer, stop) = (
            Arc::clone(&self.arrivals),
            Arc::clone(&self.requests),
            Arc::clone(&self.bad_signatures),
            Arc::clone(&self.answer),
            Arc::clone(&self.stop),
        );
        self.thread = Some(std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let Ok(Some(mut req)) = server.recv_timeout(Duration::from_millis(20)) else {
                    continue;
                };
                let mut body = Vec::new();
                if std::io::Read::read_to_end(req.as_reader(), &mut body).is_err() {
                    continue;
                }
                let header = |name: &'static str| {
                    req.headers()
                        .iter()
                        .find(|h| h.field.equiv(name))
                        .map(|h| h.value.to_string())
                };
                let key = header("Idempotency-Key").unwrap_or_default();
                let signed = header("Epidemic-Signature").is_some_and(|sig| {
                    let mut mac =
                        Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).expect("hmac key");
                    mac.update(&body);
                    sig == format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
                });
                if !signed {
                    bad.fetch_add(1, Ordering::SeqCst);
                }
                let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let n = requests.fetch_add(1, Ordering::SeqCst);
                let kind = answer(n, &json);
                if matches!(kind, Answer::Ok | Answer::Slow) {
                    arrivals
                        .lock()
                        .expect("arrivals")
                        .push(Arrival { key, body: json });
                }
                let response = match kind {
                    Answer::Ok => tiny_http::Response::from_string("ok"),
                    Answer::Slow => {
                        // The receiver being slow on purpose, past the handler's timeout.
                        std::thread::sleep(Duration::from_millis(700));
                        tiny_http::Response::from_string("ok")
                    }
                    Answer::Fail => {
                        tiny_http::Response::from_string("try later").with_status_code(500)
                    }
                    Answer::TooMany => tiny_http::Response::from_string("slow down")
                        .with_status_code(429)
                        .with_header(
                            tiny_http::Header::from_bytes("Retry-After", "1").expect("header"),
                        ),
                    Answer::Refuse => {
                        tiny_http::Response::from_string("row refused: version is odd")
                            .with_status_code(422)
                    }
                };
                let _ = req.respond(response);
            }
        }));
    }

    /// Stop listening: connections are refused until [`Receiver::up`].
    fn down(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().expect("receiver thread");
        }
        // The listener is closed when the server (moved into the thread) is dropped.
        assert!(
            wait_until(WAIT, || std::net::TcpStream::connect((
                "127.0.0.1",
                self.port
            ))
            .is_err()),
            "the receiver's port still accepts connections"
        );
    }

    fn arrivals(&self) -> Vec<Arrival> {
        self.arrivals.lock().expect("arrivals").clone()
    }

    fn arrived(&self) -> usize {
        self.arrivals.lock().expect("arrivals").len()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn webhook_setup(receiver: &Receiver, handler: &str, extra: &str) -> Setup {
    let s = Setup::new(
        &format!("plugin = \"webhook\"\n{handler}"),
        &format!(
            "url = {:?}\nsecret_file = \"SECRET\"\n{extra}",
            receiver.url()
        ),
    );
    let secret = s.dir.join("hook.secret");
    std::fs::write(&secret, format!("{SECRET}\n")).expect("secret");
    let text = std::fs::read_to_string(&s.config).expect("config");
    std::fs::write(
        &s.config,
        text.replace("\"SECRET\"", &format!("{:?}", secret.display().to_string())),
    )
    .expect("config");
    s
}

/// The receiver fails, is slow, answers 429 with Retry-After, goes down and comes back,
/// and the daemon is SIGKILLed twice, while 8 writers commit: every committed change
/// arrives; a change that arrives more than once always carries the same idempotency key
/// (and no key ever names two changes); each row's changes arrive in commit order; every
/// body is signed.
#[test]
fn webhook_delivers_every_change_through_failures_an_outage_and_sigkills() {
    const WRITERS: i64 = 8;
    const ROWS: i64 = 25;
    const VERSIONS: i64 = 5;
    let total = (WRITERS * ROWS * VERSIONS) as usize;
    let mut receiver = Receiver::start(|n, _| match n {
        _ if n % 17 == 3 => Answer::Fail,
        _ if n % 97 == 11 => Answer::Slow,
        150 | 600 => Answer::TooMany,
        _ => Answer::Ok,
    });
    let s = webhook_setup(
        &receiver,
        "on_failure = \"block\"\nretry_initial_ms = 20\nretry_max_ms = 300",
        "read_timeout_ms = 300",
    );
    let mut daemon = s.start();
    let writers = write_concurrently(&s.db, WRITERS, ROWS, VERSIONS, 5, Duration::ZERO);

    // First SIGKILL: mid-stream, restarted at once.
    assert!(
        wait_until(WAIT, || receiver.arrived() >= 200),
        "no progress"
    );
    daemon.kill();
    daemon = s.start();
    // The receiver goes down; the handler's requests are refused (and retried) until it
    // is back.
    assert!(
        wait_until(WAIT, || receiver.arrived() >= 450),
        "no progress"
    );
    let retries = s.count("will retry");
    receiver.down();
    assert!(
        wait_until(WAIT, || s.count("will retry") >= retries + 3),
        "the outage was not noticed"
    );
    assert!(
        s.log_text_has("POST http://127.0.0.1"),
        "the errors name the request"
    );
    receiver.up();
    // Second SIGKILL.
    assert!(
        wait_until(WAIT, || receiver.arrived() >= 700),
        "no progress"
    );
    daemon.kill();
    daemon = s.start();
    for w in writers {
        w.join().expect("writer");
    }

    let want = committed(WRITERS, ROWS, VERSIONS);
    let got = || -> HashSet<(i64, i64)> {
        receiver
            .arrivals()
            .iter()
            .map(|a| change_of(&a.body))
            .collect()
    };
    let complete = wait_until(Duration::from_secs(120), || got() == want);
    let arrivals = receiver.arrivals();
    assert!(
        complete,
        "{} of {total} changes arrived; missing {:?}",
        got().len(),
        want.difference(&got()).take(10).collect::<Vec<_>>()
    );
    drop(daemon);

    // Duplicates only with the same idempotency key, and one change per key.
    let mut by_key: BTreeMap<&str, HashSet<(i64, i64)>> = BTreeMap::new();
    let mut keys_of: HashMap<(i64, i64), HashSet<&str>> = HashMap::new();
    for a in &arrivals {
        assert!(!a.key.is_empty(), "a request without an idempotency key");
        assert_eq!(a.body["stable_id"], a.key.as_str(), "key = stable id");
        let c = change_of(&a.body);
        by_key.entry(&a.key).or_default().insert(c);
        keys_of.entry(c).or_default().insert(&a.key);
    }
    assert!(
        by_key.values().all(|cs| cs.len() == 1),
        "a key named two changes"
    );
    assert!(
        keys_of.values().all(|ks| ks.len() == 1),
        "a change arrived under two keys"
    );
    assert_eq!(by_key.len(), total);
    let duplicates = arrivals.len() - total;
    // The slow answers and the SIGKILLs made some; none is required by the contract, but
    // with timeouts forced every 97th request there must be some.
    assert!(
        duplicates > 0,
        "the scenario made no duplicate: it tests nothing"
    );

    let mut seen = HashSet::new();
    let first: Vec<(i64, i64)> = arrivals
        .iter()
        .filter(|a| seen.insert(a.key.clone()))
        .map(|a| change_of(&a.body))
        .collect();
    assert_per_key_order(&first);
    assert_eq!(
        receiver.bad_signatures.load(Ordering::SeqCst),
        0,
        "a request's signature did not verify"
    );
    assert!(s.count("will retry") > 0);
}

impl Setup {
    fn log_text_has(&self, needle: &str) -> bool {
        self.count(needle) > 0
    }
}

/// A 4xx other than 408/429 is permanent: the change goes to the dead letters at once,
/// its error holding the status and the start of the receiver's answer; the others go on.
#[test]
fn webhook_4xx_is_a_dead_letter_with_the_status_and_the_body() {
    let receiver = Receiver::start(|_, body| {
        if body["new"]["id"] == 3 {
            Answer::Refuse
        } else {
            Answer::Ok
        }
    });
    let s = webhook_setup(&receiver, "", "");
    let _daemon = s.start();
    let w = sqlite::connect(s.db.sqlite());
    for id in 1..=5 {
        w.execute(
            "INSERT INTO items (id, version) VALUES (?1, 0)",
            params![id],
        )
        .expect("insert");
    }
    assert!(wait_until(WAIT, || receiver.arrived() == 4));
    let letters = || -> Vec<Value> {
        let out = epidemic(&s.config, &["dead-letters", "list", "--json"]);
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    };
    assert!(wait_until(WAIT, || letters().len() == 1), "{:?}", letters());
    let letter = &letters()[0];
    let text = letter.to_string();
    assert!(
        text.contains("HTTP 422") && text.contains("row refused: version is odd"),
        "{text}"
    );
    // Attempted once: a permanent error is not retried.
    assert_eq!(receiver.requests.load(Ordering::SeqCst), 5, "{text}");
    let ids: HashSet<i64> = receiver
        .arrivals()
        .iter()
        .map(|a| change_of(&a.body).0)
        .collect();
    assert_eq!(ids, HashSet::from([1, 2, 4, 5]));
}

/// `batch_max` > 1: arrays of changes, keyed FIRST..LAST, every change once in order.
#[test]
fn webhook_batches_arrive_as_arrays_in_commit_order() {
    let receiver = Receiver::start(|n, _| if n == 2 { Answer::Fail } else { Answer::Ok });
    let s = webhook_setup(&receiver, "retry_initial_ms = 20", "batch_max = 50");
    // A backlog before the daemon starts, so batches are full.
    let out = epidemic(&s.config, &["install"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let w = sqlite::connect(s.db.sqlite());
    for id in 1..=200 {
        w.execute(
            "INSERT INTO items (id, version) VALUES (?1, 0)",
            params![id],
        )
        .expect("insert");
    }
    // A new consumer starts at the end of the log unless told otherwise.
    let _daemon = s.start_with(&["--from-oldest"]);
    let ids = || -> Vec<i64> {
        receiver
            .arrivals()
            .iter()
            .flat_map(|a| a.body.as_array().cloned().unwrap_or_default())
            .map(|c| change_of(&c).0)
            .collect()
    };
    assert!(wait_until(WAIT, || ids().len() >= 200), "{:?}", ids().len());
    let arrivals = receiver.arrivals();
    assert!(arrivals
        .iter()
        .any(|a| a.body.as_array().is_some_and(|b| b.len() == 50)));
    for a in &arrivals {
        let batch = a.body.as_array().expect("an array");
        let first = batch[0]["stable_id"].as_str().expect("stable id");
        let last = batch[batch.len() - 1]["stable_id"]
            .as_str()
            .expect("stable id");
        let want = if batch.len() == 1 {
            first.to_owned()
        } else {
            format!("{first}..{last}")
        };
        assert_eq!(a.key, want);
    }
    assert_eq!(ids(), (1..=200).collect::<Vec<_>>(), "each once, in order");
}

// ---------------------------------------------------------------------------------------
// NATS JetStream
// ---------------------------------------------------------------------------------------

fn nats_setup(nats: &NatsServer, extra: &str) -> Setup {
    nats_setup_on(Backend::Sqlite, nats, extra)
}

fn nats_setup_on(backend: Backend, nats: &NatsServer, extra: &str) -> Setup {
    Setup::on(
        backend,
        "plugin = \"nats\"\non_failure = \"block\"\nretry_initial_ms = 20\nretry_max_ms = 300",
        &format!("url = {:?}\ntimeout_ms = 2000\n{extra}", nats.url()),
    )
}

/// 20,000 changes from 8 writers, 3 SIGKILLs of the daemon and one restart of
/// nats-server, on SQLite: the stream holds exactly the committed changes, each once,
/// each row's in commit order, each with its stable id as `Nats-Msg-Id`.
#[test]
fn nats_stream_holds_every_change_once_in_per_key_order_through_sigkills_and_a_broker_restart() {
    nats_exactly_once(Backend::Sqlite, 250, 10);
}

/// The same on PostgreSQL (LISTEN/NOTIFY wake-ups, snapshot reading), 4,000 changes.
#[test]
fn nats_exactly_once_on_postgres() {
    nats_exactly_once(Backend::Postgres, 100, 5);
}

/// 8 writers, each with `rows` rows changed `versions` times; the daemon is SIGKILLed at
/// 15 %, 45 % and 75 % of the stream, and nats-server restarted at 60 %.
fn nats_exactly_once(backend: Backend, rows: i64, versions: i64) {
    const WRITERS: i64 = 8;
    let total = (WRITERS * rows * versions) as u64;
    let at = |percent: u64| total * percent / 100;
    let mut nats = NatsServer::start();
    let s = nats_setup_on(backend, &nats, "");
    let mut daemon = s.start();
    let started = Instant::now();
    // Writes spread over about 6 s, so that the daemon is publishing fresh changes when
    // the broker goes down (a drained daemon would not notice the outage).
    const PER_TX: i64 = 10;
    let pause = Duration::from_secs(6) / (rows * versions / PER_TX) as u32;
    let writers = write_concurrently(&s.db, WRITERS, rows, versions, PER_TX as usize, pause);
    let count = |nats: &NatsServer| nats.stream_count("EPIDEMIC");

    for (i, kill_at) in [at(15), at(45), at(75)].into_iter().enumerate() {
        assert!(
            wait_until(WAIT, || count(&nats) >= kill_at),
            "stuck at {} messages",
            count(&nats)
        );
        daemon.kill();
        daemon = s.start();
        if i == 1 {
            // The broker restarts while the daemon publishes.
            assert!(wait_until(WAIT, || count(&nats) >= at(60)), "stuck");
            nats.stop();
            let retries = s.count("will retry");
            assert!(
                wait_until(WAIT, || s.count("will retry") > retries),
                "the broker's outage was not noticed"
            );
            nats.start_again();
        }
    }
    for w in writers {
        w.join().expect("writer");
    }
    let reached = wait_until(Duration::from_secs(120), || count(&nats) >= total);
    assert!(reached, "{} of {total} messages", count(&nats));
    // Drained: the daemon has nothing left, so nothing more can arrive.
    assert!(wait_until(WAIT, || backlog(&s.config) == 0));
    drop(daemon);
    eprintln!("{total} changes published in {:?}", started.elapsed());

    let messages = nats.read_stream("EPIDEMIC");
    assert_eq!(
        messages.len() as u64,
        total,
        "exactly the committed changes"
    );
    let mut ids = HashSet::new();
    let mut changes = HashSet::new();
    for m in &messages {
        let msg_id = m.msg_id.as_deref().expect("Nats-Msg-Id");
        assert!(!msg_id.is_empty());
        assert_eq!(m.payload["stable_id"], msg_id);
        assert!(ids.insert(msg_id.to_owned()), "{msg_id} stored twice");
        let op = m.payload["op"].as_str().expect("op").to_ascii_lowercase();
        assert_eq!(m.subject, format!("epidemic.items.{op}"));
        assert!(
            changes.insert(change_of(&m.payload)),
            "{:?} twice",
            m.payload
        );
    }
    assert_eq!(changes, committed(WRITERS, rows, versions));
    let order: Vec<(i64, i64)> = messages.iter().map(|m| change_of(&m.payload)).collect();
    assert_per_key_order(&order);
    assert!(messages.windows(2).all(|w| w[0].seq < w[1].seq));
}

/// The consumers' backlog from `epidemic status --json`.
fn backlog(config: &Path) -> i64 {
    let out = epidemic(config, &["status", "--json"]);
    let status: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    status["consumers"]
        .as_array()
        .map(|cs| cs.iter().map(|c| c["backlog"].as_i64().unwrap_or(1)).sum())
        .unwrap_or(1)
}

/// A custom subject template and an existing stream that lacks the handler's subjects:
/// the handler adds them, keeps the stream's own, and publishes where the template says.
#[test]
fn nats_adds_its_subjects_to_an_existing_stream_and_follows_the_subject_template() {
    let nats = NatsServer::start();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let client = async_nats::connect(nats.url()).await.expect("connect");
        let js = async_nats::jetstream::new(client);
        js.create_stream(async_nats::jetstream::stream::Config {
            name: "SHARED".into(),
            subjects: vec!["other.>".into()],
            ..Default::default()
        })
        .await
        .expect("create stream");
    });
    let s = nats_setup(
        &nats,
        "stream = \"SHARED\"\nsubject = \"app.{daemon}.{table}.{op}\"\nops = [\"insert\", \"delete\"]",
    );
    let _daemon = s.start();
    let w = sqlite::connect(s.db.sqlite());
    w.execute("INSERT INTO items (id, version) VALUES (1, 0)", [])
        .expect("insert");
    w.execute("UPDATE items SET version = 1 WHERE id = 1", [])
        .expect("update");
    w.execute("DELETE FROM items WHERE id = 1", [])
        .expect("delete");
    assert!(wait_until(WAIT, || nats.stream_count("SHARED") == 2));
    let messages = nats.read_stream("SHARED");
    let subjects: Vec<&str> = messages.iter().map(|m| m.subject.as_str()).collect();
    assert_eq!(subjects, ["app.mx1.items.insert", "app.mx1.items.delete"]);
    let jsz = nats.jsz();
    let detail = stream_detail(&jsz, "SHARED").expect("stream in /jsz");
    let mut stream_subjects: Vec<String> = detail["config"]["subjects"]
        .as_array()
        .expect("subjects")
        .iter()
        .map(|s| s.as_str().unwrap_or_default().to_owned())
        .collect();
    stream_subjects.sort();
    assert_eq!(
        stream_subjects,
        ["app.mx1.items.delete", "app.mx1.items.insert", "other.>"]
    );
}

/// TLS to the broker: with the CA from `ca_file` the handler connects and publishes; a
/// server whose certificate no trusted CA signed is refused at start, naming `url`.
#[test]
fn nats_over_tls_verifies_the_server_against_ca_file() {
    let ca = TestCa::new();
    let nats = NatsServer::start_tls(&ca.server_cert(), &ca.server_key());
    let s = nats_setup(
        &nats,
        &format!("tls = true\nca_file = {:?}", ca.ca().display().to_string()),
    );
    let _daemon = s.start();
    let w = sqlite::connect(s.db.sqlite());
    w.execute("INSERT INTO items (id, version) VALUES (1, 0)", [])
        .expect("insert");
    assert!(wait_until(WAIT, || nats.stream_count("EPIDEMIC") == 1));

    let untrusted = nats_setup(&nats, "tls = true");
    let line = untrusted.refused_start();
    assert!(
        line.contains("handler \"sink\"") && line.contains("url: cannot connect"),
        "{line}"
    );
}

// ---------------------------------------------------------------------------------------
// Bad input
// ---------------------------------------------------------------------------------------

/// Each bad input stops the daemon at start with one line naming the handler and the key.
#[test]
fn bad_sink_config_refuses_to_start_naming_the_handler_and_the_key() {
    let nats = NatsServer::start();
    let closed = free_port();
    let cases: Vec<(String, String, &str)> = vec![
        (
            "plugin = \"webhook\"".into(),
            "url = \"htp//example\"".into(),
            "url:",
        ),
        (
            "plugin = \"webhook\"".into(),
            format!("url = \"http://127.0.0.1:{closed}/hook\""),
            "url: 127.0.0.1:",
        ),
        (
            "plugin = \"webhook\"".into(),
            format!(
                "url = \"http://127.0.0.1:{}/\"\nsecret_file = \"/nonexistent/secret\"",
                nats.monitor_port
            ),
            "secret_file: cannot read /nonexistent/secret",
        ),
        (
            "plugin = \"nats\"".into(),
            format!(
                "url = {:?}\nsubject = \"epidemic.{{tabel}}.{{op}}\"",
                nats.url()
            ),
            "subject: unknown placeholder {tabel}",
        ),
        (
            "plugin = \"nats\"".into(),
            format!("url = \"nats://127.0.0.1:{closed}\"\ntimeout_ms = 2000"),
            "url: cannot connect to nats://127.0.0.1:",
        ),
    ];
    for (handler, config, key) in cases {
        let s = Setup::new(&handler, &config);
        let line = s.refused_start();
        assert!(
            line.contains("handler \"sink\"") && line.contains(key),
            "{config}: wanted a line naming the handler and {key:?}, got {line:?}"
        );
    }
}
