//! What an operator sees when something is wrong: one line naming the file (or the
//! variable) and the key, no Rust type names, and an exit status a service manager can
//! act on (78 configuration, 69 database unavailable, 64 usage, 65 no such input). Also
//! `epidemic check`, `plugin check` and `status --check`, which must fail when what they
//! report is broken. One test per message.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use epidemic_tests::{
    epidemic, epidemic_with, plugin_path, recorder_handler, sqlite, wait_recorded, wait_until,
    Daemon,
};

const WAIT: Duration = Duration::from_secs(30);
const EX_USAGE: i32 = 64;
const EX_DATAERR: i32 = 65;
const EX_UNAVAILABLE: i32 = 69;
const EX_CONFIG: i32 = 78;

struct Setup {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    db: PathBuf,
    config: PathBuf,
}

impl Setup {
    /// A SQLite `mail.db` and a config next to it; `body` follows `[database] url`.
    fn new(body: impl FnOnce(&Path) -> String) -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_owned();
        let db = sqlite::create_db(
            &dir,
            "mail",
            "CREATE TABLE mail_users (id INTEGER PRIMARY KEY, username TEXT NOT NULL, quota_bytes INTEGER);",
        );
        let config = dir.join("epidemic.toml");
        let text = format!("[database]\nurl = {:?}\n{}", sqlite::url(&db), body(&dir));
        std::fs::write(&config, text).unwrap();
        Setup {
            _tmp: tmp,
            dir,
            db,
            config,
        }
    }

    fn with_recorder() -> Setup {
        Setup::new(|dir| {
            format!(
                "[daemon]\nname = \"mx1\"\n\n{}",
                recorder_handler(
                    "rec",
                    &dir.join("rec.jsonl"),
                    "mail_users",
                    &["username"],
                    ""
                )
            )
        })
    }

    fn run(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut all = vec!["--config", self.config.to_str().unwrap()];
        all.extend_from_slice(args);
        epidemic_with(None, &all, env)
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The one error line of a refused command, after checking its exit status.
fn refusal(out: &Output, code: i32) -> String {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(code), "stderr:\n{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(lines.len(), 1, "want one error line, got:\n{err}");
    for rust in ["enum ", "variant", "struct ", "OnFailure", "Config"] {
        assert!(
            !lines[0].contains(rust),
            "Rust type name {rust:?} in: {}",
            lines[0]
        );
    }
    lines[0].to_owned()
}

#[test]
fn a_numeric_backend_option_from_the_environment_is_a_number() {
    let s = Setup::with_recorder();
    // The `config` crate hands environment values over as strings; SQLite's
    // busy_timeout_ms wants an integer. Before: "invalid type: string "100"".
    let out = s.run(&["sql"], &[("EPIDEMIC_DATABASE__BUSY_TIMEOUT_MS", "100")]);
    assert!(out.status.success(), "{}", stderr(&out));
    // A string key of the host's own stays a string, leading zero and all.
    let out = s.run(&["check"], &[("EPIDEMIC_DAEMON__NAME", "0123")]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("daemon:   0123\n"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn a_typo_in_a_variable_is_blamed_on_the_variable() {
    let s = Setup::with_recorder();
    let file = s.config.display().to_string();
    let line = refusal(
        &s.run(&["sql"], &[("EPIDEMIC_DAEMON__NMAE", "x")]),
        EX_CONFIG,
    );
    assert!(
        line.contains("EPIDEMIC_DAEMON__NMAE (environment): daemon.nmae: unknown field `nmae`"),
        "{line}"
    );
    assert!(!line.contains(&file), "blamed on the file: {line}");

    let line = refusal(
        &s.run(&["sql"], &[("EPIDEMIC_DAEMON__BATCH_SIZE", "many")]),
        EX_CONFIG,
    );
    assert!(
        line.contains("EPIDEMIC_DAEMON__BATCH_SIZE (environment): daemon.batch_size: invalid type"),
        "{line}"
    );

    // A backend option: the backend refuses it, the host says where it came from.
    let line = refusal(
        &s.run(&["sql"], &[("EPIDEMIC_DATABASE__BUSYTIMEOUT_MS", "100")]),
        EX_CONFIG,
    );
    assert!(
        line.contains("EPIDEMIC_DATABASE__BUSYTIMEOUT_MS (environment): ")
            && line.contains("unknown field `busytimeout_ms`"),
        "{line}"
    );
    assert!(!line.contains(&file), "blamed on the file: {line}");
}

#[test]
fn a_bad_on_failure_names_the_key_and_the_valid_values() {
    let s = Setup::with_recorder();
    let text = std::fs::read_to_string(&s.config).unwrap();
    std::fs::write(
        &s.config,
        text.replace(
            "[handler.config]",
            "on_failure = \"retry\"\n[handler.config]",
        ),
    )
    .unwrap();
    let line = refusal(&s.run(&["sql"], &[]), EX_CONFIG);
    assert!(
        line.contains(&format!(
            "{}: handler[0].on_failure: \"retry\" is not a valid value: use \"dead-letter\" or \"block\"",
            s.config.display()
        )),
        "{line}"
    );
}

#[test]
fn a_toml_syntax_error_is_one_line_with_its_location() {
    let s = Setup::with_recorder();
    std::fs::write(
        &s.config,
        "[database]\nurl = \"sqlite://x.db\"\n[daemon\nname = 1\n",
    )
    .unwrap();
    let line = refusal(&s.run(&["sql"], &[]), EX_CONFIG);
    assert!(
        line.contains(&format!("{}:3:8: ", s.config.display())),
        "want FILE:LINE:COLUMN: {line}"
    );
    assert!(line.contains("(line 3: \"[daemon\")"), "{line}");
}

#[test]
fn a_single_bracket_handler_asks_for_double_brackets() {
    let s = Setup::with_recorder();
    let text = std::fs::read_to_string(&s.config).unwrap();
    std::fs::write(&s.config, text.replace("[[handler]]", "[handler]")).unwrap();
    let line = refusal(&s.run(&["sql"], &[]), EX_CONFIG);
    assert!(
        line.contains(&format!(
            "{}: [handler] must be written [[handler]]",
            s.config.display()
        )),
        "{line}"
    );
}

#[test]
fn a_typo_in_handler_config_names_the_file_the_handler_and_the_key() {
    let s = Setup::with_recorder();
    let text = std::fs::read_to_string(&s.config).unwrap();
    std::fs::write(&s.config, text.replace("table =", "tabel = \"x\"\ntable =")).unwrap();
    let line = refusal(&s.run(&["sql"], &[]), EX_CONFIG);
    assert!(
        line.contains(&format!(
            "{}: [handler.config] of handler \"rec\" (recorder): ",
            s.config.display()
        )) && line.contains("tabel"),
        "{line}"
    );
}

#[test]
fn a_relative_sqlite_url_is_relative_to_the_config_file() {
    let s = Setup::new(|dir| {
        format!(
            "[daemon]\nname = \"mx1\"\n\n{}",
            recorder_handler(
                "rec",
                &dir.join("rec.jsonl"),
                "mail_users",
                &["username"],
                ""
            )
        )
    });
    let text = std::fs::read_to_string(&s.config).unwrap();
    std::fs::write(
        &s.config,
        text.replace(&sqlite::url(&s.db), "sqlite://mail.db"),
    )
    .unwrap();
    // From `/`, as under systemd: the file next to the config is used.
    let config = s.config.display().to_string();
    let out = epidemic_with(Some(Path::new("/")), &["--config", &config, "install"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        sqlite::objects(&s.db)
            .iter()
            .any(|(_, name, _)| name == "epidemic_log_mail_users"),
        "not installed into {}",
        s.db.display()
    );
    assert!(!Path::new("/mail.db").exists());
    // And the daemon delivers from it.
    let log = s.dir.join("daemon.log");
    let _d = Daemon::start_with_env(&s.config, &log, &[], &[]);
    assert!(wait_until(WAIT, || std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("epidemic started")));
    sqlite::connect(&s.db)
        .execute(
            "INSERT INTO mail_users (id, username) VALUES (1, 'ann')",
            [],
        )
        .unwrap();
    assert_eq!(wait_recorded(&s.dir.join("rec.jsonl"), 1, WAIT).len(), 1);
}

#[test]
fn exit_statuses_tell_configuration_from_unavailable_from_usage() {
    let s = Setup::with_recorder();
    // Configuration: a missing file, an unknown key.
    let missing = s.dir.join("nope.toml");
    let out = epidemic(&missing, &["run"]);
    assert!(refusal(&out, EX_CONFIG).contains("nope.toml not found"));
    // Usage: an unknown command.
    let out = epidemic_with(None, &["frobnicate"], &[]);
    assert_eq!(out.status.code(), Some(EX_USAGE), "{}", stderr(&out));
    // No such input: a dead letter that does not exist.
    assert!(s.run(&["install"], &[]).status.success());
    let out = s.run(&["dead-letters", "drop", "999"], &[]);
    assert!(refusal(&out, EX_DATAERR).contains("no dead letter with id 999"));
    // Unavailable: nothing listens on the database's port.
    let port = epidemic_tests::free_port();
    let out = s.run(
        &["check"],
        &[(
            "EPIDEMIC_DATABASE__URL",
            &format!("postgres://app@127.0.0.1:{port}/mail?connect_timeout=5"),
        )],
    );
    refusal(&out, EX_UNAVAILABLE);
}

#[test]
fn check_validates_everything_and_changes_nothing() {
    let s = Setup::with_recorder();
    let before = sqlite::objects(&s.db);
    let out = s.run(&["check"], &[]);
    let text = stdout(&out);
    assert!(out.status.success(), "{}{}", text, stderr(&out));
    assert!(text.contains("handler:  rec (recorder "), "{text}");
    assert!(text.contains("install:  needed for mail_users"), "{text}");
    assert!(text.ends_with("ok\n"), "{text}");
    assert_eq!(sqlite::objects(&s.db), before, "check changed the database");
    // After install there is nothing to apply.
    assert!(s.run(&["install"], &[]).status.success());
    assert!(stdout(&s.run(&["check"], &[])).contains("install:  up to date"));
    // A watched column that does not exist is a configuration error.
    let text = std::fs::read_to_string(&s.config).unwrap();
    std::fs::write(&s.config, text.replace("[\"username\"]", "[\"nope\"]")).unwrap();
    let line = refusal(&s.run(&["check"], &[]), EX_CONFIG);
    assert!(line.contains("nope"), "{line}");
}

#[test]
fn plugin_check_fails_when_the_plugin_refuses_the_config() {
    let s = Setup::with_recorder();
    let lib = plugin_path("recorder").display().to_string();
    // The matching [[handler]] in --config is good: exit 0 with subscriptions.
    let out = s.run(&["plugin", "check", &lib], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("mail_users (username)"),
        "{}",
        stdout(&out)
    );
    // The same file refused by the plugin: non-zero, naming the file and handler.
    let text = std::fs::read_to_string(&s.config).unwrap();
    std::fs::write(&s.config, text.replace("table =", "tabel = \"x\"\ntable =")).unwrap();
    let line = refusal(&s.run(&["plugin", "check", &lib], &[]), EX_CONFIG);
    assert!(
        line.contains(&format!(
            "{}: [handler.config] of handler \"rec\": plugin recorder refuses it",
            s.config.display()
        )) && line.contains("tabel"),
        "{line}"
    );
    // --handler-config the plugin refuses.
    let line = refusal(
        &epidemic_with(
            None,
            &[
                "plugin",
                "check",
                &lib,
                "--handler-config",
                r#"{"table": 1}"#,
            ],
            &[],
        ),
        EX_CONFIG,
    );
    assert!(
        line.contains("--handler-config: plugin recorder refuses it"),
        "{line}"
    );
}

/// `status --check`'s line and exit status.
fn status_check(s: &Setup, extra: &[&str]) -> (i32, String) {
    let mut args = vec!["status", "--check"];
    args.extend_from_slice(extra);
    let out = s.run(&args, &[]);
    (out.status.code().unwrap_or(-1), stdout(&out))
}

#[test]
fn status_check_is_critical_for_dead_letters_stalls_and_evictions() {
    let s = Setup::new(|dir| {
        format!(
            "[daemon]\nname = \"mx1\"\nprune_interval_ms = 100\n\n{}",
            recorder_handler(
                "rec",
                &dir.join("rec.jsonl"),
                "mail_users",
                &["username"],
                "permanent = true\nfail_first = 1"
            )
        )
    });
    let log = s.dir.join("daemon.log");
    let mut d = Daemon::start(&s.config, &log, &[]);
    assert!(d.wait_for_log("epidemic started", WAIT), "{}", d.log_text());
    let (code, line) = status_check(&s, &[]);
    assert_eq!(
        (code, line.as_str()),
        (0, "EPIDEMIC OK: 1 consumer(s), backlog 0\n")
    );

    // A change the handler refuses for good: a dead letter.
    sqlite::connect(&s.db)
        .execute(
            "INSERT INTO mail_users (id, username) VALUES (1, 'ann')",
            [],
        )
        .unwrap();
    assert!(wait_until(WAIT, || status_check(&s, &[]).0 == 2));
    let (_, line) = status_check(&s, &[]);
    assert!(
        line.starts_with("EPIDEMIC CRITICAL: mx1/rec has 1 dead letter(s)"),
        "{line}"
    );
    assert!(s.run(&["dead-letters", "drop", "1"], &[]).status.success());
    assert_eq!(status_check(&s, &[]).0, 0);

    // The daemon is gone and changes wait: stalled.
    d.kill();
    sqlite::connect(&s.db)
        .execute(
            "INSERT INTO mail_users (id, username) VALUES (2, 'bob')",
            [],
        )
        .unwrap();
    assert!(wait_until(WAIT, || status_check(
        &s,
        &["--stall-after", "1s"]
    )
    .0 == 2));
    let (_, line) = status_check(&s, &["--stall-after", "1s"]);
    assert!(line.contains("mx1/rec stalled"), "{line}");
    // Only the daemon asked about counts.
    assert_eq!(
        status_check(&s, &["--stall-after", "1s", "--daemon", "mx2"]).1,
        "EPIDEMIC CRITICAL: daemon mx2 has no consumers\n"
    );

    // Another daemon evicts the dead one's consumer.
    let mx2 = s.dir.join("mx2.toml");
    std::fs::write(
        &mx2,
        std::fs::read_to_string(&s.config)
            .unwrap()
            .replace("name = \"mx1\"", "name = \"mx2\"\nconsumer_ttl = \"1s\""),
    )
    .unwrap();
    let _d2 = Daemon::start(&mx2, &s.dir.join("mx2.log"), &[]);
    assert!(wait_until(WAIT, || status_check(&s, &[])
        .1
        .contains("mx1/rec evicted")));
    assert_eq!(status_check(&s, &[]).0, 2);
}

#[test]
fn status_check_is_unknown_when_it_cannot_read_the_status() {
    let s = Setup::with_recorder();
    let port = epidemic_tests::free_port();
    let out = s.run(
        &["status", "--check"],
        &[(
            "EPIDEMIC_DATABASE__URL",
            &format!("postgres://app@127.0.0.1:{port}/mail?connect_timeout=5"),
        )],
    );
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with("EPIDEMIC UNKNOWN: "),
        "{}",
        stdout(&out)
    );
}
