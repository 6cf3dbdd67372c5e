//! What SDK 0.2 promises a handler, end to end through the real daemon, backend and
//! plugin library (SQLite): changes come in batches through `handle_batch`, each with the
//! host's attempt number and the context of the daemon and handler; a plugin's own log
//! lines reach the daemon's log, in JSON when the daemon logs JSON.

use std::path::{Path, PathBuf};
use std::time::Duration;

use epidemic_tests::{epidemic, recorder_handler, sqlite, wait_recorded, wait_until, Daemon};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

struct Setup {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    db: PathBuf,
    config: PathBuf,
    log: PathBuf,
}

fn setup(recorder_extra: &str) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let db = sqlite::create_db(
        &dir,
        "mail",
        "CREATE TABLE mail_users (id INTEGER PRIMARY KEY, username TEXT NOT NULL, quota_bytes INTEGER);",
    );
    let config = dir.join("epidemic.toml");
    let handler = recorder_handler(
        "rec",
        &dir.join("rec.jsonl"),
        "mail_users",
        &["username"],
        recorder_extra,
    );
    std::fs::write(
        &config,
        format!(
            "[database]\nurl = {:?}\n[daemon]\nname = \"mx7\"\n\n{handler}",
            sqlite::url(&db)
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

/// Install the triggers, so that rows written before the daemon starts are captured.
fn install(s: &Setup) {
    let out = epidemic(&s.config, &["install"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn insert_in_one_transaction(db: &Path, n: i64) {
    let mut conn = sqlite::connect(db);
    let tx = conn.transaction().unwrap();
    for i in 1..=n {
        tx.execute(
            "INSERT INTO mail_users (id, username) VALUES (?1, ?2)",
            rusqlite::params![i, format!("u{i}")],
        )
        .unwrap();
    }
    tx.commit().unwrap();
}

fn log_lines(log: &Path) -> Vec<Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[test]
fn changes_come_in_batches_with_the_context_and_the_first_attempt() {
    let s = setup("");
    // Written before the daemon starts: one backlog, read in one fetch.
    install(&s);
    insert_in_one_transaction(&s.db, 40);
    let _d = Daemon::start(&s.config, &s.log, &["--from-oldest"]);
    let lines = wait_recorded(&s.dir.join("rec.jsonl"), 40, WAIT);
    assert_eq!(
        lines.len(),
        40,
        "{}",
        std::fs::read_to_string(&s.log).unwrap()
    );
    for l in &lines {
        assert_eq!(l["daemon"], "mx7", "{l}");
        assert_eq!(l["handler"], "rec", "{l}");
        assert_eq!(l["host_attempt"], 1, "{l}");
    }
    let calls: std::collections::BTreeSet<u64> =
        lines.iter().map(|l| l["call"].as_u64().unwrap()).collect();
    assert!(
        calls.len() < 40 && lines.iter().any(|l| l["call_size"].as_u64() > Some(1)),
        "40 changes of one backlog should not take 40 handler calls: {calls:?}"
    );
}

#[test]
fn a_retry_carries_the_next_attempt_number() {
    let s = setup("fail_first = 1\n");
    install(&s);
    insert_in_one_transaction(&s.db, 5);
    let _d = Daemon::start(&s.config, &s.log, &["--from-oldest"]);
    let lines = wait_recorded(&s.dir.join("rec.jsonl"), 5, WAIT);
    assert_eq!(
        lines.len(),
        5,
        "{}",
        std::fs::read_to_string(&s.log).unwrap()
    );
    // Every change failed once in the batch, then succeeded on its own as attempt 2.
    for l in &lines {
        assert_eq!(l["host_attempt"], 2, "{l}");
        assert_eq!(l["call_size"], 1, "a retry is a call of its own: {l}");
    }
}

#[test]
fn a_plugins_log_lines_reach_the_daemons_json_log_with_the_plugin_named() {
    let s = setup("fail_first = 1\n");
    // The recorder says it is ready at debug level, so other tests' `install` output
    // stays one line: ask for the plugin's debug lines.
    let _d = Daemon::start_with_env(
        &s.config,
        &s.log,
        &["--log-format", "json"],
        &[("RUST_LOG", "info,plugin=debug")],
    );
    assert!(
        wait_until(WAIT, || log_lines(&s.log)
            .iter()
            .any(|l| l["fields"]["message"] == "epidemic started")),
        "{}",
        std::fs::read_to_string(&s.log).unwrap_or_default()
    );
    insert_in_one_transaction(&s.db, 1);
    assert_eq!(wait_recorded(&s.dir.join("rec.jsonl"), 1, WAIT).len(), 1);
    let lines = log_lines(&s.log);
    let ready = lines
        .iter()
        .find(|l| l["fields"]["message"] == "recorder ready")
        .unwrap_or_else(|| panic!("no 'recorder ready' line in {lines:?}"));
    assert_eq!(ready["level"], "DEBUG");
    assert_eq!(ready["fields"]["plugin"], "rec", "{ready}");
    assert!(
        ready["fields"]["fields"]
            .as_str()
            .is_some_and(|f| f.contains("daemon=mx7")),
        "the plugin's own fields travel too: {ready}"
    );
    let told = lines
        .iter()
        .find(|l| l["fields"]["message"] == "recorder told to fail")
        .unwrap_or_else(|| panic!("no warning from the plugin in {lines:?}"));
    assert_eq!(told["level"], "WARN");
    assert_eq!(told["fields"]["plugin"], "rec", "{told}");
    // Every line of the log is JSON: the plugin wrote nothing around the host's logger.
    let text = std::fs::read_to_string(&s.log).unwrap();
    for l in text.lines() {
        assert!(serde_json::from_str::<Value>(l).is_ok(), "not JSON: {l}");
    }
}
