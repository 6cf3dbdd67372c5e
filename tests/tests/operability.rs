//! What the sysadmin, the DBA and the plugin author see: metrics, logs, schema drift,
//! the plugin template, and that no password is ever printed. (`status` with a known
//! backlog and dead letters is a conformance scenario, run on every backend.)

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use epidemic_tests::{
    epidemic, epidemic_bin, free_port, oot, recorded, recorder_handler, sqlite, wait_recorded,
    wait_until, Daemon,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

struct Setup {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    db: PathBuf,
    config: PathBuf,
    log: PathBuf,
}

fn setup(extra: &str, handlers: impl FnOnce(&Path) -> String) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let db = sqlite::create_db(
        &dir,
        "mail",
        "CREATE TABLE mail_users (id INTEGER PRIMARY KEY, username TEXT NOT NULL, quota_bytes INTEGER);",
    );
    let config = dir.join("epidemic.toml");
    std::fs::write(
        &config,
        format!(
            "[database]\nurl = {:?}\n{extra}\n\n{}",
            sqlite::url(&db),
            handlers(&dir)
        ),
    )
    .unwrap();
    Setup {
        log: dir.join("daemon.log"),
        _tmp: tmp,
        dir,
        db,
        config,
    }
}

fn start(s: &Setup, args: &[&str]) -> Daemon {
    let before = std::fs::read_to_string(&s.log)
        .unwrap_or_default()
        .matches("epidemic started")
        .count();
    let d = Daemon::start(&s.config, &s.log, args);
    assert!(
        wait_until(WAIT, || d.log_text().matches("epidemic started").count()
            > before),
        "{}",
        d.log_text()
    );
    d
}

fn insert(db: &Path, ids: std::ops::RangeInclusive<i64>) {
    let conn = sqlite::connect(db);
    for i in ids {
        conn.execute(
            "INSERT INTO mail_users (id, username, quota_bytes) VALUES (?1, ?2, ?1)",
            rusqlite::params![i, format!("u{i}")],
        )
        .unwrap();
    }
}

fn scrape(port: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to metrics");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

fn metric(body: &str, name_and_labels: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn metrics_counters_move() {
    let port = free_port();
    let s = setup(
        &format!("[daemon]\nname = \"mx1\"\nprune_interval_ms = 100\n[metrics]\nlisten = \"127.0.0.1:{port}\""),
        |dir| recorder_handler("rec", &dir.join("rec.jsonl"), "mail_users", &["username"], ""),
    );
    let _d = start(&s, &[]);
    let body = scrape(port);
    assert!(body.contains("200 OK"), "{body}");
    assert_eq!(
        metric(&body, "epidemic_changes_delivered_total{handler=\"rec\"}"),
        Some(0.0),
        "{body}"
    );
    insert(&s.db, 1..=7);
    wait_recorded(&s.dir.join("rec.jsonl"), 7, WAIT);
    assert!(wait_until(WAIT, || metric(
        &scrape(port),
        "epidemic_changes_delivered_total{handler=\"rec\"}"
    ) == Some(7.0)));
    // One observation per handler call; a call takes a batch of changes (1 to 7 here).
    let body = scrape(port);
    let calls = metric(
        &body,
        "epidemic_handler_duration_seconds_count{handler=\"rec\"}",
    )
    .unwrap_or(0.0);
    assert!((1.0..=7.0).contains(&calls), "{body}");
    assert_eq!(
        metric(
            &body,
            "epidemic_handler_duration_seconds_bucket{handler=\"rec\",le=\"+Inf\"}"
        ),
        Some(calls)
    );
    assert!(wait_until(WAIT, || metric(
        &scrape(port),
        "epidemic_consumer_backlog{daemon=\"mx1\",handler=\"rec\"}"
    ) == Some(0.0)));
    assert_eq!(metric(&body, "epidemic_reconnects_total"), Some(0.0));
}

#[test]
fn json_logs_are_one_object_per_line() {
    let s = setup("[daemon]\nname = \"mx1\"", |dir| {
        recorder_handler(
            "rec",
            &dir.join("rec.jsonl"),
            "mail_users",
            &["username"],
            "",
        )
    });
    let mut d = start(&s, &["--log-format", "json"]);
    insert(&s.db, 1..=1);
    wait_recorded(&s.dir.join("rec.jsonl"), 1, WAIT);
    assert_eq!(
        d.signal_and_wait(libc::SIGTERM, WAIT)
            .and_then(|s| s.code()),
        Some(0)
    );
    let log = d.log_text();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["message"] == "epidemic started"),
        "{log}"
    );
    assert!(lines.iter().all(|l| l["level"].is_string()));
}

#[test]
fn schema_drift_is_reported_and_repaired() {
    let s = setup("[daemon]\nname = \"mx1\"", |dir| {
        recorder_handler(
            "rec",
            &dir.join("rec.jsonl"),
            "mail_users",
            &["username", "quota_bytes"],
            "",
        )
    });
    let out = epidemic(&s.config, &["install"]);
    assert!(out.status.success());
    // A trigger dropped by hand: status names it, run says so, install repairs it.
    sqlite::connect(&s.db)
        .execute_batch("DROP TRIGGER epidemic_mail_users_update")
        .unwrap();
    let out = epidemic(&s.config, &["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("MISSING epidemic_mail_users_update"),
        "{text}"
    );
    assert!(text.contains("trigger epidemic_mail_users_update on mail_users is missing: UPDATE changes are not captured"), "{text}");
    let mut d = start(&s, &[]);
    assert!(
        d.log_text()
            .contains("schema drift: trigger epidemic_mail_users_update"),
        "{}",
        d.log_text()
    );
    // run installs, which repaired it: updates are captured again.
    insert(&s.db, 1..=1);
    sqlite::connect(&s.db)
        .execute("UPDATE mail_users SET quota_bytes = 9 WHERE id = 1", [])
        .unwrap();
    let got = wait_recorded(&s.dir.join("rec.jsonl"), 2, WAIT);
    assert_eq!(got[1]["op"], "UPDATE");
    d.kill();
    let status: Value =
        serde_json::from_slice(&epidemic(&s.config, &["status", "--json"]).stdout).unwrap();
    assert!(
        status["tables"][0]["problems"]
            .as_array()
            .unwrap()
            .is_empty(),
        "{status}"
    );

    // A watched column renamed by hand: status and run name it; install cannot repair it.
    sqlite::connect(&s.db)
        .execute_batch("ALTER TABLE mail_users RENAME COLUMN quota_bytes TO quota")
        .unwrap();
    let out = epidemic(&s.config, &["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(
            "column quota_bytes of table mail_users no longer exists (dropped or renamed)"
        ),
        "{text}"
    );
    for cmd in ["install", "run"] {
        let out = epidemic(&s.config, &[cmd]);
        assert!(
            !out.status.success(),
            "{cmd} started despite the missing column"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("column quota_bytes does not exist in table mail_users"),
            "{cmd}: {err}"
        );
    }
    assert!(recorded(&s.dir.join("rec.jsonl")).len() == 2);
}

#[test]
fn the_template_plugin_builds_out_of_tree_and_runs() {
    let work = oot::work_dir("template");
    oot::copy_dir(&oot::repo_root().join("plugin-sdk/template"), &work);
    // A third party points the SDK dependency at wherever their copy of it is.
    let manifest = work.join("Cargo.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let sdk = oot::repo_root().join("plugin-sdk");
    let patched = text.replace(
        "path = \"../../plugin-sdk\"",
        &format!("path = {:?}", sdk.display().to_string()),
    );
    assert_ne!(
        patched, text,
        "template's SDK dependency line changed; update this test"
    );
    std::fs::write(&manifest, patched).unwrap();
    let lib = oot::cargo_build(&work).join("libepidemic_hello.so");

    let out = Command::new(epidemic_bin())
        .args(["plugin", "check"])
        .arg(&lib)
        .args([
            "--handler-config",
            r#"{"table": "mail_users", "columns": ["username"], "file": "/dev/null"}"#,
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("name:    hello"), "{text}");
    assert!(
        text.contains("mail_users (username) ops: INSERT,UPDATE,DELETE"),
        "{text}"
    );

    // And the daemon runs it like any plugin.
    let hello_out = work.join("hello.log");
    let s = setup("[daemon]\nname = \"mx1\"", |_| {
        format!(
            "[[handler]]\nname = \"hello\"\nplugin = {:?}\n[handler.config]\ntable = \"mail_users\"\ncolumns = [\"username\"]\nfile = {:?}\n",
            lib.display().to_string(),
            hello_out.display().to_string()
        )
    });
    let _d = start(&s, &[]);
    insert(&s.db, 1..=1);
    assert!(wait_until(WAIT, || std::fs::read_to_string(&hello_out)
        .unwrap_or_default()
        .contains("INSERT mail_users #1 username=u1")));
}

#[test]
fn no_password_in_any_output() {
    use epidemic_tests::pg::{PgServer, StopMode};
    const PASSWORD: &str = "s3cr3t-pw-Zq9";
    let server = PgServer::start_private();
    server.create_database("pwtest");
    let mut admin = server.client("pwtest");
    admin
        .batch_execute(&format!(
            "CREATE ROLE app LOGIN PASSWORD '{PASSWORD}';
             GRANT ALL ON SCHEMA public TO app;
             CREATE TABLE mail_users (id BIGINT PRIMARY KEY, username TEXT NOT NULL, quota_bytes BIGINT);
             ALTER TABLE mail_users OWNER TO app;
             GRANT CREATE ON DATABASE pwtest TO app;"
        ))
        .unwrap();
    let url = format!(
        "postgres://app:{PASSWORD}@127.0.0.1:{}/pwtest",
        server.port()
    );
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let config = dir.join("epidemic.toml");
    let write_config = |url: &str| {
        std::fs::write(
            &config,
            format!(
                "[database]\nurl = {url:?}\n[daemon]\nname = \"mx1\"\n\n{}",
                recorder_handler(
                    "rec",
                    &dir.join("rec.jsonl"),
                    "mail_users",
                    &["username"],
                    "permanent = true\nfail_first = 1"
                )
            ),
        )
        .unwrap();
    };
    write_config(&url);
    let log = dir.join("daemon.log");
    let mut outputs: Vec<String> = Vec::new();
    let mut record = |out: std::process::Output| {
        outputs.push(String::from_utf8_lossy(&out.stdout).into_owned());
        outputs.push(String::from_utf8_lossy(&out.stderr).into_owned());
    };
    record(epidemic(&config, &["sql"]));
    let mut d = Daemon::start(&config, &log, &[]);
    assert!(d.wait_for_log("epidemic started", WAIT), "{}", d.log_text());
    admin
        .batch_execute("INSERT INTO mail_users VALUES (1, 'ann', 5)")
        .unwrap();
    // The change fails permanently: a dead letter whose listing must not leak either.
    assert!(wait_until(WAIT, || String::from_utf8_lossy(
        &epidemic(&config, &["dead-letters", "list"]).stdout
    )
    .contains("INSERT")));
    record(epidemic(&config, &["status"]));
    record(epidemic(&config, &["status", "--json"]));
    record(epidemic(&config, &["dead-letters", "list", "--json"]));
    // An outage: the daemon logs the lost connection and the reconnect.
    server.stop(StopMode::Immediate);
    assert!(
        d.wait_for_log("database connection lost", WAIT),
        "{}",
        d.log_text()
    );
    record(epidemic(&config, &["status"]));
    server.start();
    assert!(
        d.wait_for_log("database reachable again", WAIT),
        "{}",
        d.log_text()
    );
    // Errors that echo the URL: a missing database, a refused connection.
    write_config(&url.replace("/pwtest", "/nosuchdb"));
    record(epidemic(&config, &["status"]));
    write_config(&url.replace(&format!(":{}/", server.port()), ":1/"));
    record(epidemic(&config, &["install"]));
    d.kill();
    outputs.push(d.log_text());
    let all = outputs.join("\n");
    assert!(
        all.contains("app:***@") || all.contains("nosuchdb"),
        "the errors above should name the database:\n{all}"
    );
    assert!(!all.contains(PASSWORD), "password leaked:\n{all}");
}
