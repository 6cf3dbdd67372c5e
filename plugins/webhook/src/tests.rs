//! The handler driven through the SDK's test harness against a real HTTP server
//! (tiny_http) on a loopback port.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use epidemic_plugin_sdk::testing::{insert, keyed, update, Harness};
use epidemic_plugin_sdk::{Handler, HandlerError, Op};
use serde_json::{json, Value};

use crate::{verify, WebhookHandler};

/// One request as the server saw it.
#[derive(Debug, Clone)]
struct Seen {
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    at: Instant,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// What the server answers: status, extra headers, body; and how long it waits first.
type Answer = (u16, Vec<(&'static str, String)>, String, Duration);

type Responder = Box<dyn Fn(usize) -> Answer + Send>;

/// A real HTTP server on 127.0.0.1 that records requests and answers as told.
struct Server {
    port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(respond: impl Fn(usize) -> Answer + Send + 'static) -> Server {
        let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
        let port = server.server_addr().to_ip().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let respond: Responder = Box::new(respond);
        let thread = {
            let (seen, stop) = (Arc::clone(&seen), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok(Some(mut req)) = server.recv_timeout(Duration::from_millis(20)) else {
                        continue;
                    };
                    let mut body = Vec::new();
                    std::io::Read::read_to_end(req.as_reader(), &mut body).unwrap();
                    let n = {
                        let mut seen = seen.lock().unwrap();
                        seen.push(Seen {
                            headers: req
                                .headers()
                                .iter()
                                .map(|h| (h.field.to_string(), h.value.to_string()))
                                .collect(),
                            body,
                            at: Instant::now(),
                        });
                        seen.len() - 1
                    };
                    let (status, headers, text, delay) = respond(n);
                    // The server being slow on purpose (a read timeout), not a wait.
                    std::thread::sleep(delay);
                    let mut response =
                        tiny_http::Response::from_string(text).with_status_code(status);
                    for (k, v) in headers {
                        response.add_header(tiny_http::Header::from_bytes(k, v).unwrap());
                    }
                    let _ = req.respond(response);
                }
            })
        };
        Server {
            port,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn ok() -> Server {
        Server::start(|_| (200, vec![], String::new(), Duration::ZERO))
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn config(url: &str, extra: Value) -> Value {
    let mut c = json!({ "table": "users", "columns": ["name"], "url": url });
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

fn handler(url: &str, extra: Value) -> Harness<WebhookHandler> {
    Harness::new(config(url, extra)).unwrap()
}

fn user(id: i64, name: &str) -> epidemic_plugin_sdk::Change {
    keyed(
        insert("users", &[("id", id.into()), ("name", name.into())]),
        &["id"],
    )
}

fn config_error(config: Value) -> String {
    match Harness::<WebhookHandler>::new(config) {
        Err(HandlerError::Permanent(msg)) => msg,
        Err(e) => panic!("expected a permanent error, got {e:?}"),
        Ok(_) => panic!("expected the config to be refused"),
    }
}

#[test]
fn each_change_is_posted_as_json_signed_with_its_stable_id_as_idempotency_key() {
    let server = Server::ok();
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "s3cret\n").unwrap();
    let mut h = handler(
        &server.url(),
        json!({ "secret_file": secret, "headers": { "Authorization": "Bearer t0k" } }),
    );
    let change = user(7, "ann");
    let stable = change.stable_id.clone();
    assert!(h.send(change).unwrap());
    let seen = server.seen();
    assert_eq!(seen.len(), 1);
    let req = &seen[0];
    assert_eq!(req.header("Idempotency-Key"), Some(stable.as_str()));
    assert_eq!(req.header("Content-Type"), Some("application/json"));
    assert_eq!(req.header("Authorization"), Some("Bearer t0k"));
    assert!(req
        .header("User-Agent")
        .unwrap()
        .starts_with("epidemic-webhook/"));
    let sig = req.header("Epidemic-Signature").unwrap();
    // The trailing newline of the secret file is not part of the secret.
    assert!(verify(b"s3cret", &req.body, sig), "{sig}");
    assert!(!verify(b"s3cret\n", &req.body, sig));
    let body = req.json();
    assert_eq!(body["stable_id"], stable.as_str());
    assert_eq!(body["op"], "INSERT");
    assert_eq!(body["key"], json!({ "id": 7 }));
    assert_eq!(body["new"], json!({ "name": "ann" }));
}

#[test]
fn without_a_secret_nothing_is_signed() {
    let server = Server::ok();
    let mut h = handler(&server.url(), json!({}));
    assert!(h.send(user(1, "a")).unwrap());
    assert_eq!(server.seen()[0].header("Epidemic-Signature"), None);
}

#[test]
fn server_errors_429_and_timeouts_are_retryable_other_4xx_permanent() {
    let server = Server::start(|n| match n {
        0 => (500, vec![], "boom".into(), Duration::ZERO),
        1 => (503, vec![], String::new(), Duration::ZERO),
        2 => (429, vec![], String::new(), Duration::ZERO),
        3 => (408, vec![], String::new(), Duration::ZERO),
        4 => (422, vec![], "name\nis not valid".into(), Duration::ZERO),
        5 => (404, vec![], "x".repeat(2000), Duration::ZERO),
        6 => (
            301,
            vec![("Location", "http://elsewhere/".into())],
            String::new(),
            Duration::ZERO,
        ),
        _ => (200, vec![], String::new(), Duration::from_millis(800)),
    });
    let mut h = handler(&server.url(), json!({ "read_timeout_ms": 200 }));
    for status in ["HTTP 500", "HTTP 503", "HTTP 429", "HTTP 408"] {
        match h.send(user(1, "a")) {
            Err(HandlerError::Retryable(msg)) => assert!(msg.contains(status), "{msg}"),
            other => panic!("{status}: {other:?}"),
        }
    }
    match h.send(user(1, "a")) {
        Err(HandlerError::Permanent(msg)) => {
            assert!(msg.contains("HTTP 422: name is not valid"), "{msg}");
            assert!(msg.contains(&server.url()), "{msg}");
        }
        other => panic!("{other:?}"),
    }
    match h.send(user(1, "a")) {
        Err(HandlerError::Permanent(msg)) => {
            assert!(msg.contains("HTTP 404: xxx"), "{msg}");
            assert!(msg.len() < 500, "the body is cut: {msg}");
        }
        other => panic!("{other:?}"),
    }
    assert!(
        matches!(h.send(user(1, "a")), Err(HandlerError::Permanent(m)) if m.contains("HTTP 301"))
    );
    // The server answers after the read timeout: no answer in time is retryable.
    match h.send(user(1, "a")) {
        Err(HandlerError::Retryable(msg)) => assert!(msg.contains("POST"), "{msg}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_refused_connection_is_retryable() {
    let port = {
        let server = Server::ok();
        let port = server.port;
        let mut h = handler(&server.url(), json!({}));
        assert!(h.send(user(1, "a")).unwrap());
        port
    };
    // The server is gone; check_reachable is off, or the handler would refuse to start.
    let mut h = handler(
        &format!("http://127.0.0.1:{port}/hook"),
        json!({ "check_reachable": false }),
    );
    match h.send(user(1, "a")) {
        Err(HandlerError::Retryable(msg)) => {
            assert!(msg.contains("POST http://127.0.0.1"), "{msg}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn retry_after_is_waited_out_up_to_the_configured_most() {
    let server = Server::start(|n| match n {
        0 => (
            429,
            vec![("Retry-After", "1".into())],
            String::new(),
            Duration::ZERO,
        ),
        1 => (
            503,
            vec![("Retry-After", "3600".into())],
            String::new(),
            Duration::ZERO,
        ),
        _ => (200, vec![], String::new(), Duration::ZERO),
    });
    let mut h = handler(&server.url(), json!({ "retry_after_max_ms": 1500 }));
    let started = Instant::now();
    let err = h.send(user(1, "a")).unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    assert!(err.to_string().contains("Retry-After 1 s"), "{err}");
    assert!(started.elapsed() >= Duration::from_secs(1));
    // An hour is cut to retry_after_max_ms.
    let started = Instant::now();
    assert!(h.send(user(1, "a")).unwrap_err().is_retryable());
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(10),
        "{waited:?}"
    );
    assert!(h.send(user(1, "a")).unwrap());
    let seen = server.seen();
    assert!(seen[1].at - seen[0].at >= Duration::from_secs(1));
}

#[test]
fn retry_after_dates_are_understood() {
    assert_eq!(
        crate::parse_retry_after(" 7 "),
        Some(Duration::from_secs(7))
    );
    assert_eq!(
        crate::parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
        Some(Duration::ZERO)
    );
    let later = std::time::SystemTime::now() + Duration::from_secs(120);
    let wait = crate::parse_retry_after(&httpdate::fmt_http_date(later)).unwrap();
    assert!(wait > Duration::from_secs(100) && wait <= Duration::from_secs(120));
    assert_eq!(crate::parse_retry_after("soon"), None);
}

#[test]
fn a_batch_is_posted_each_change_in_order_and_stops_at_the_failing_one() {
    let server = Server::start(|n| match n {
        2 => (500, vec![], String::new(), Duration::ZERO),
        _ => (200, vec![], String::new(), Duration::ZERO),
    });
    let mut h = handler(&server.url(), json!({}));
    let changes: Vec<_> = (1..=4).map(|i| user(i, "u")).collect();
    let err = h.send_batch(&changes).unwrap_err();
    assert_eq!(err.index, 2);
    let keys: Vec<String> = server
        .seen()
        .iter()
        .map(|s| s.header("Idempotency-Key").unwrap().to_owned())
        .collect();
    let want: Vec<String> = changes[..3].iter().map(|c| c.stable_id.clone()).collect();
    assert_eq!(keys, want);
}

#[test]
fn batch_max_posts_json_arrays_keyed_by_first_and_last_stable_id() {
    let server = Server::start(|n| match n {
        1 => (502, vec![], String::new(), Duration::ZERO),
        _ => (200, vec![], String::new(), Duration::ZERO),
    });
    let mut h = handler(&server.url(), json!({ "batch_max": 3 }));
    let changes: Vec<_> = (1..=7).map(|i| user(i, "u")).collect();
    // Requests: [0..3) ok, [3..6) fails: the batch error names its first change.
    let err = h.send_batch(&changes).unwrap_err();
    assert_eq!(err.index, 3);
    assert!(err.error.is_retryable());
    // The host retries change 3 alone, then sends the rest: an array of one, then [4..7).
    h.send_batch(&changes[3..4]).unwrap();
    h.send_batch(&changes[4..]).unwrap();
    let seen = server.seen();
    let ids = |s: &Seen| -> Vec<i64> {
        s.json()
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["key"]["id"].as_i64().unwrap())
            .collect()
    };
    assert_eq!(ids(&seen[0]), [1, 2, 3]);
    assert_eq!(ids(&seen[1]), [4, 5, 6]);
    assert_eq!(ids(&seen[2]), [4]);
    assert_eq!(ids(&seen[3]), [5, 6, 7]);
    assert_eq!(
        seen[0].header("Idempotency-Key").unwrap(),
        format!("{}..{}", changes[0].stable_id, changes[2].stable_id)
    );
    assert_eq!(
        seen[2].header("Idempotency-Key").unwrap(),
        changes[3].stable_id
    );
}

#[test]
fn subscribes_as_configured() {
    let server = Server::ok();
    let h = handler(
        &server.url(),
        json!({ "columns": ["name", "plan"], "ops": ["insert", "UPDATE"] }),
    );
    let subs = h.subscriptions();
    assert_eq!(subs.len(), 1);
    assert_eq!(subs[0].table, "users");
    assert_eq!(subs[0].columns, ["name", "plan"]);
    assert!(subs[0].ops.contains(Op::Insert) && subs[0].ops.contains(Op::Update));
    assert!(!subs[0].ops.contains(Op::Delete));
    assert_eq!(WebhookHandler::NAME, "webhook");
    let mut h = h;
    // An UPDATE of a column it does not watch never reaches it.
    let quiet = update(
        "users",
        &[
            ("name", "a".into()),
            ("plan", "x".into()),
            ("other", 1.into()),
        ],
        &[
            ("name", "a".into()),
            ("plan", "x".into()),
            ("other", 2.into()),
        ],
    );
    assert!(!h.send(quiet).unwrap());
    assert!(server.seen().is_empty());
}

#[test]
fn bad_config_is_one_line_naming_the_key() {
    let server = Server::ok();
    let url = server.url();
    let cases = [
        (
            json!({ "table": "t", "columns": ["a"], "url": "htp:/x" }),
            "url:",
        ),
        (
            json!({ "table": "t", "columns": ["a"], "url": "ftp://h/x" }),
            "url:",
        ),
        (
            json!({ "table": "t", "columns": ["a"], "url": "not a url" }),
            "url:",
        ),
        (
            json!({ "table": "t", "columns": ["a"], "url": url, "secret_file": "/nonexistent/secret" }),
            "secret_file: cannot read /nonexistent/secret",
        ),
        (
            json!({ "table": "t", "columns": ["a"], "url": url, "headers": { "Idempotency-Key": "x" } }),
            "headers: Idempotency-Key is set by the handler",
        ),
        (
            json!({ "table": "t", "columns": ["a"], "url": url, "ca_file": "/nonexistent/ca.pem" }),
            "ca_file: cannot read",
        ),
        (
            json!({ "table": "t", "columns": ["a"], "url": url, "batch_max": 0 }),
            "batch_max:",
        ),
        (
            json!({ "table": "t", "columns": [], "url": url }),
            "columns:",
        ),
        (
            json!({ "table": "t", "columns": ["a"], "url": url, "tiemout": 1 }),
            "unknown field `tiemout`",
        ),
        (
            json!({ "table": "t", "columns": ["a"] }),
            "missing field `url`",
        ),
    ];
    for (config, want) in cases {
        let msg = config_error(config.clone());
        assert!(msg.contains(want), "{config}: {msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "\n").unwrap();
    let msg =
        config_error(json!({ "table": "t", "columns": ["a"], "url": url, "secret_file": empty }));
    assert!(
        msg.contains("secret_file:") && msg.contains("is empty"),
        "{msg}"
    );
    let not_pem = dir.path().join("ca.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    let msg =
        config_error(json!({ "table": "t", "columns": ["a"], "url": url, "ca_file": not_pem }));
    assert!(msg.contains("ca_file:"), "{msg}");
}

#[test]
fn an_unreachable_host_is_refused_at_start() {
    // Port 1 (tcpmux): nothing listens there on a test machine. (A port freed by a
    // stopped test server was taken by another test's server running in parallel.)
    let port = 1;
    let msg = config_error(json!({
        "table": "t", "columns": ["a"], "url": format!("http://127.0.0.1:{port}/"),
    }));
    assert!(
        msg.starts_with("invalid webhook config: url: 127.0.0.1:") && msg.contains("unreachable"),
        "{msg}"
    );
    let msg = config_error(json!({
        "table": "t", "columns": ["a"], "url": "http://no-such-host.invalid/",
    }));
    assert!(
        msg.contains("url: cannot resolve no-such-host.invalid"),
        "{msg}"
    );
}

/// A CA and a server certificate for 127.0.0.1 signed by it, made with the openssl tool.
struct TestCa {
    dir: tempfile::TempDir,
}

impl TestCa {
    fn new() -> TestCa {
        let dir = tempfile::tempdir().unwrap();
        let run = |args: &[&str]| {
            let out = std::process::Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .output()
                .expect("the openssl tool");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=epidemic test CA",
        ]);
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ]);
        std::fs::write(
            dir.path().join("ext.cnf"),
            "subjectAltName = IP:127.0.0.1\nbasicConstraints = CA:FALSE\n",
        )
        .unwrap();
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ]);
        TestCa { dir }
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }
}

/// An HTTPS server on 127.0.0.1 answering 200 to each request, one connection at a time;
/// returns its port.
fn https_server(ca: &TestCa) -> u16 {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca.path("server.pem"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(ca.path("server.key")).unwrap();
    // rustls 0.23.48 deprecates the ring provider (no post-quantum key exchange); ring is
    // what ureq's client uses here, and a test server needs nothing more.
    #[allow(deprecated)]
    let provider = rustls::crypto::ring::default_provider();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let config = Arc::new(config);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for tcp in listener.incoming() {
            let Ok(tcp) = tcp else { continue };
            let conn = rustls::ServerConnection::new(Arc::clone(&config)).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, tcp);
            // Read the request head and body (the client sends Content-Length), then answer.
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let complete = loop {
                match std::io::Read::read(&mut tls, &mut chunk) {
                    Ok(0) | Err(_) => break false,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
                let text = String::from_utf8_lossy(&buf).to_string();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse().ok())?
                        })
                        .unwrap_or(0);
                    if body.len() >= len {
                        break true;
                    }
                }
            };
            if complete {
                let _ = std::io::Write::write_all(
                    &mut tls,
                    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
                tls.conn.send_close_notify();
                let _ = std::io::Write::flush(&mut tls);
            }
        }
    });
    port
}

#[test]
fn https_is_verified_against_the_configured_ca_only() {
    let ca = TestCa::new();
    let port = https_server(&ca);
    let url = format!("https://127.0.0.1:{port}/hook");
    // Trusting the test CA: delivered.
    let mut h = handler(&url, json!({ "ca_file": ca.path("ca.pem") }));
    assert!(h.send(user(1, "a")).unwrap());
    // The built-in roots do not know it: refused, as a retryable error naming the cause.
    let mut h = handler(&url, json!({}));
    match h.send(user(1, "a")) {
        Err(HandlerError::Retryable(msg)) => {
            assert!(msg.to_lowercase().contains("certificate"), "{msg}")
        }
        other => panic!("an untrusted certificate was accepted: {other:?}"),
    }
    // Another CA in ca_file replaces the built-in roots and is not this server's: refused.
    let other = TestCa::new();
    let mut h = handler(&url, json!({ "ca_file": other.path("ca.pem") }));
    assert!(h.send(user(1, "a")).unwrap_err().is_retryable());
}
