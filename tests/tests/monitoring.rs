//! What a service manager and a monitoring system see of a running daemon: systemd's
//! notify protocol (READY only once every consumer is registered, STOPPING on SIGTERM,
//! WATCHDOG pings), the Prometheus metrics (every series from the first scrape, only
//! this daemon's consumers, query strings, long buckets, process and build metrics),
//! `/healthz` and `/readyz`, and the alert rules and dashboard in docs/ checked against
//! the real metric names and with `promtool`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use epidemic_tests::{free_port, oot, plugin_path, recorder_handler, sqlite, wait_until, Daemon};

const WAIT: Duration = Duration::from_secs(30);

struct Setup {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    db: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_owned();
        let db = sqlite::create_db(
            &dir,
            "mail",
            "CREATE TABLE mail_users (id INTEGER PRIMARY KEY, username TEXT NOT NULL);",
        );
        Setup { _tmp: tmp, dir, db }
    }

    /// A config for daemon `name` with one recorder handler `rec` and `extra` lines.
    fn config(&self, name: &str, extra: &str) -> PathBuf {
        let path = self.dir.join(format!("{name}.toml"));
        std::fs::write(
            &path,
            format!(
                "[database]\nurl = {:?}\n[daemon]\nname = {name:?}\nprune_interval_ms = 100\n{extra}\n\n{}",
                sqlite::url(&self.db),
                recorder_handler(
                    "rec",
                    &self.dir.join(format!("{name}.jsonl")),
                    "mail_users",
                    &["username"],
                    ""
                )
            ),
        )
        .unwrap();
        path
    }

    fn insert(&self, id: i64) {
        sqlite::connect(&self.db)
            .execute(
                "INSERT INTO mail_users (id, username) VALUES (?1, 'u')",
                [id],
            )
            .unwrap();
    }

    /// Hold SQLite's write lock until the returned connection is dropped: the daemon can
    /// read but not install or register.
    fn lock(&self) -> rusqlite::Connection {
        let conn = sqlite::connect(&self.db);
        conn.execute_batch("BEGIN EXCLUSIVE").unwrap();
        conn
    }
}

/// `GET path` on the metrics listener: (status code, body), or None while nothing
/// listens yet.
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let code = text.split(' ').nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((code, body))
}

fn metric(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A unix datagram socket standing in for systemd's `$NOTIFY_SOCKET`.
struct NotifySocket {
    path: PathBuf,
    socket: UnixDatagram,
}

impl NotifySocket {
    fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        NotifySocket { path, socket }
    }

    /// The next message, waiting at most `timeout`.
    fn recv(&self, timeout: Duration) -> Option<String> {
        self.socket.set_read_timeout(Some(timeout)).unwrap();
        let mut buf = [0u8; 4096];
        let n = self.socket.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// Messages until one has a line equal to `line`, within `timeout`; all of them.
    fn until(&self, line: &str, timeout: Duration) -> Option<Vec<String>> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let msg = self.recv(left)?;
            let done = msg.lines().any(|l| l == line);
            seen.push(msg);
            if done {
                return Some(seen);
            }
        }
        None
    }
}

fn cursors(db: &Path) -> i64 {
    sqlite::connect(db)
        .query_row("SELECT count(*) FROM epidemic_cursor", [], |r| r.get(0))
        .unwrap_or(0)
}

#[test]
fn systemd_hears_ready_only_after_registration_then_watchdog_and_stopping() {
    let s = Setup::new();
    let config = s.config("mx1", "");
    let notify = NotifySocket::bind(&s.dir);
    let socket = notify.path.display().to_string();
    // The daemon cannot register while the application holds the write lock.
    let lock = s.lock();
    let mut d = Daemon::start_with_env(
        &config,
        &s.dir.join("daemon.log"),
        &[],
        &[
            ("NOTIFY_SOCKET", &socket),
            ("WATCHDOG_USEC", "200000"),
            ("EPIDEMIC_DATABASE__BUSY_TIMEOUT_MS", "50"),
        ],
    );
    assert!(
        d.wait_for_log("database unavailable; retrying", WAIT),
        "{}",
        d.log_text()
    );
    // Told what it waits for, but not READY.
    let early = notify.until("STATUS=connecting to the database", WAIT);
    assert!(early.is_some(), "no STATUS while starting");
    assert_eq!(
        notify.until("READY=1", Duration::from_secs(2)),
        None,
        "READY before registration"
    );
    assert_eq!(cursors(&s.db), 0);
    drop(lock);
    let msgs = notify.until("READY=1", WAIT).expect("no READY=1");
    // Registered by the time systemd hears READY.
    assert_eq!(cursors(&s.db), 1, "{msgs:?}");
    let ready = msgs.last().unwrap();
    assert!(ready.contains("STATUS=running: 1 handler(s)"), "{ready}");
    // WATCHDOG_USEC=200ms: pings at half that.
    for _ in 0..3 {
        assert!(notify.until("WATCHDOG=1", Duration::from_secs(5)).is_some());
    }
    // SAFETY: kill(2) on the daemon's pid.
    unsafe { libc::kill(d.pid() as i32, libc::SIGTERM) };
    assert!(notify.until("STOPPING=1", WAIT).is_some(), "no STOPPING=1");
    assert_eq!(
        d.signal_and_wait(0, WAIT).and_then(|st| st.code()),
        Some(0),
        "{}",
        d.log_text()
    );
}

#[test]
fn no_watchdog_pings_unless_systemd_asks_for_them() {
    let s = Setup::new();
    let config = s.config("mx1", "");
    let notify = NotifySocket::bind(&s.dir);
    let socket = notify.path.display().to_string();
    let _d = Daemon::start_with_env(
        &config,
        &s.dir.join("daemon.log"),
        &[],
        &[("NOTIFY_SOCKET", &socket)],
    );
    assert!(notify.until("READY=1", WAIT).is_some());
    assert_eq!(notify.until("WATCHDOG=1", Duration::from_secs(1)), None);
}

#[test]
fn every_series_is_there_from_the_first_scrape_and_only_this_daemons() {
    let s = Setup::new();
    let port = free_port();
    let mx1 = s.config("mx1", &format!("[metrics]\nlisten = \"127.0.0.1:{port}\""));
    let mx2 = s.config("mx2", "");
    let d2 = Daemon::start(&mx2, &s.dir.join("mx2.log"), &[]);
    assert!(
        d2.wait_for_log("epidemic started", WAIT),
        "{}",
        d2.log_text()
    );
    // mx1 cannot register yet: its first scrape comes before it has read anything.
    let lock = s.lock();
    let d1 = Daemon::start_with_env(
        &mx1,
        &s.dir.join("mx1.log"),
        &[],
        &[("EPIDEMIC_DATABASE__BUSY_TIMEOUT_MS", "50")],
    );
    assert!(wait_until(WAIT, || get(port, "/metrics").is_some()));
    // A query string, as some scrapers send, is ignored.
    let (code, first) = get(port, "/metrics?collect%5B%5D=all").unwrap();
    assert_eq!(code, 200, "{first}");
    for series in [
        "epidemic_changes_delivered_total{handler=\"rec\"}",
        "epidemic_handler_failures_total{handler=\"rec\"}",
        "epidemic_changes_dead_lettered_total{handler=\"rec\"}",
        "epidemic_handler_duration_seconds_count{handler=\"rec\"}",
        "epidemic_consumer_backlog{daemon=\"mx1\",handler=\"rec\"}",
        "epidemic_consumer_oldest_change_age_seconds{daemon=\"mx1\",handler=\"rec\"}",
        "epidemic_dead_letters{daemon=\"mx1\",handler=\"rec\"}",
        "epidemic_consumer_evicted{daemon=\"mx1\",handler=\"rec\"}",
        "epidemic_reconnects_total",
        "epidemic_database_up",
        "epidemic_evicted_consumers",
    ] {
        assert!(
            metric(&first, series).is_some(),
            "{series} missing:\n{first}"
        );
    }
    assert!(first.contains("epidemic_build_info{version=\""), "{first}");
    assert!(first.contains("le=\"300\""), "buckets stop short:\n{first}");
    for process in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
    ] {
        assert!(metric(&first, process).is_some(), "{process} missing");
    }
    // Alive while it waits; not ready.
    assert_eq!(get(port, "/healthz").unwrap().0, 200);
    let (code, why) = get(port, "/readyz").unwrap();
    assert_eq!(code, 503);
    assert!(why.contains("not registered"), "{why}");
    drop(lock);
    assert!(
        d1.wait_for_log("epidemic started", WAIT),
        "{}",
        d1.log_text()
    );
    assert!(wait_until(WAIT, || get(port, "/readyz").map(|r| r.0) == Some(200)));
    s.insert(1);
    assert!(wait_until(WAIT, || metric(
        &get(port, "/metrics").unwrap().1,
        "epidemic_changes_delivered_total{handler=\"rec\"}"
    ) == Some(1.0)));
    // mx2's consumer is in the same database, but mx1 does not export it.
    let body = get(port, "/metrics").unwrap().1;
    assert_eq!(metric(&body, "epidemic_database_up"), Some(1.0), "{body}");
    assert!(!body.contains("daemon=\"mx2\""), "{body}");
}

/// Creates its file when dropped.
struct Release(PathBuf);

impl Drop for Release {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.0, "");
    }
}

#[test]
fn readyz_fails_while_a_handler_is_stuck_in_a_call() {
    let s = Setup::new();
    let port = free_port();
    // The handler's command runs until this file appears (created however the test ends,
    // so no command outlives it).
    let release = s.dir.join("release");
    let _release = Release(release.clone());
    let config = s.dir.join("epidemic.toml");
    std::fs::write(
        &config,
        format!(
            "[database]\nurl = {:?}\n[daemon]\nname = \"mx1\"\nprune_interval_ms = 100\n\
             [metrics]\nlisten = \"127.0.0.1:{port}\"\nhandler_stuck_after = \"1s\"\n\n\
             [[handler]]\nname = \"slow\"\nplugin = {:?}\n[handler.config]\ntable = \"mail_users\"\n\
             columns = [\"username\"]\ncommand = {:?}\ntimeout_secs = 900\n",
            sqlite::url(&s.db),
            plugin_path("exec").display().to_string(),
            format!("while [ ! -e {} ]; do sleep 0.05; done", release.display())
        ),
    )
    .unwrap();
    let d = Daemon::start(&config, &s.dir.join("daemon.log"), &[]);
    assert!(d.wait_for_log("epidemic started", WAIT), "{}", d.log_text());
    assert!(wait_until(WAIT, || get(port, "/readyz").map(|r| r.0) == Some(200)));
    s.insert(1);
    assert!(
        wait_until(WAIT, || get(port, "/readyz").map(|r| r.0) == Some(503)),
        "{}",
        d.log_text()
    );
    let (_, why) = get(port, "/readyz").unwrap();
    assert!(why.contains("handler slow stuck"), "{why}");
    // Stuck is not dead: the loop is alive.
    assert_eq!(get(port, "/healthz").unwrap().0, 200);
    // The call ends: ready again.
    std::fs::write(&release, "").unwrap();
    assert!(wait_until(WAIT, || get(port, "/readyz").map(|r| r.0) == Some(200)));
}

fn promtool() -> &'static str {
    assert!(
        Command::new("promtool").arg("--version").output().is_ok(),
        "promtool is missing: apt-get install prometheus (scripts/test.sh does)"
    );
    "promtool"
}

#[test]
fn the_alert_rules_pass_promtool_check_and_their_unit_tests() {
    let docs = oot::repo_root().join("docs");
    for args in [
        &["check", "rules", "epidemic-alerts.yml"][..],
        &["test", "rules", "epidemic-alerts.test.yml"],
    ] {
        let out = Command::new(promtool())
            .args(args)
            .current_dir(&docs)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_rules_and_the_dashboard_use_only_metrics_the_daemon_exports() {
    let s = Setup::new();
    let port = free_port();
    let config = s.config("mx1", &format!("[metrics]\nlisten = \"127.0.0.1:{port}\""));
    let _d = Daemon::start(&config, &s.dir.join("daemon.log"), &[]);
    assert!(wait_until(WAIT, || get(port, "/metrics").is_some()));
    let body = get(port, "/metrics").unwrap().1;
    let exported: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let docs = oot::repo_root().join("docs");
    for file in ["epidemic-alerts.yml", "grafana-dashboard.json"] {
        let text = std::fs::read_to_string(docs.join(file)).unwrap();
        let mut used = 0;
        for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if !(word.starts_with("epidemic_") || word.starts_with("process_")) {
                continue;
            }
            used += 1;
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| word.strip_suffix(s))
                .unwrap_or(word);
            assert!(
                exported.contains(&word) || exported.contains(&base),
                "{file} uses {word}, which the daemon does not export"
            );
        }
        assert!(used > 5, "{file} uses no metrics?");
    }
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(docs.join("grafana-dashboard.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    assert!(dashboard["panels"].as_array().is_some_and(|p| p.len() >= 6));
}
