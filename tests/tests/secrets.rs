//! Database credentials from files: `database.password_file`, `database.url_file` and
//! systemd credentials (`cred:NAME` under `$CREDENTIALS_DIRECTORY`), against a real
//! PostgreSQL that demands the password (scram-sha-256 for the role); and the password
//! never shows up in any output: logs at debug level, errors, `status`, `check`, `sql`,
//! `dead-letters`, metrics.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use epidemic_tests::pg::PgServer;
use epidemic_tests::{epidemic_with, free_port, recorder_handler, wait_until, Daemon};

const WAIT: Duration = Duration::from_secs(30);
/// Characters a URL must percent-encode, so the test also shows the encoding is right.
const PASSWORD: &str = "Zq9s3cr3t/@:pw";
/// What a leak would contain, whether raw or percent-encoded.
const LEAK: &str = "Zq9s3cr3t";

/// A private server where role `app` must give its password over TCP.
fn server_demanding_a_password() -> PgServer {
    let server = PgServer::start_private();
    server.create_database("sec");
    let mut admin = server.client("sec");
    admin
        .batch_execute(&format!(
            "CREATE ROLE app LOGIN PASSWORD '{PASSWORD}';
             GRANT ALL ON SCHEMA public TO app;
             GRANT CREATE ON DATABASE sec TO app;
             CREATE TABLE mail_users (id BIGINT PRIMARY KEY, username TEXT NOT NULL);
             ALTER TABLE mail_users OWNER TO app;"
        ))
        .unwrap();
    let hba = server.log_path().parent().unwrap().join("data/pg_hba.conf");
    std::fs::write(
        &hba,
        "local all all trust\nhost all app 127.0.0.1/32 scram-sha-256\nhost all all 127.0.0.1/32 trust\n",
    )
    .unwrap();
    admin.batch_execute("SELECT pg_reload_conf()").unwrap();
    // The reload is asynchronous: wait until a password-less login is refused.
    let no_password = format!("postgres://app@127.0.0.1:{}/sec", server.port());
    assert!(
        wait_until(WAIT, || postgres::Client::connect(
            &no_password,
            postgres::NoTls
        )
        .is_err()),
        "pg_hba.conf reload did not take"
    );
    server
}

struct Outputs(Vec<String>);

impl Outputs {
    fn add(&mut self, what: &str, out: &Output) {
        self.0.push(format!(
            "== {what}\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }

    fn assert_no_leak(&self) {
        let all = self.0.join("\n");
        assert!(!all.contains(LEAK), "password leaked:\n{all}");
        assert!(
            !all.contains(&PASSWORD.replace('/', "%2F")),
            "password leaked:\n{all}"
        );
    }
}

fn run(config: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut all = vec!["--config", config.to_str().unwrap()];
    all.extend_from_slice(args);
    let mut env = env.to_vec();
    env.push(("RUST_LOG", "debug"));
    epidemic_with(None, &all, &env)
}

fn scrape(port: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to metrics");
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

#[test]
fn password_file_url_file_and_credentials_connect_and_never_leak() {
    let server = server_demanding_a_password();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let creds = dir.join("creds");
    std::fs::create_dir(&creds).unwrap();
    std::fs::write(dir.join("db-password"), format!("{PASSWORD}\n")).unwrap();
    std::fs::write(creds.join("db-password"), format!("{PASSWORD}\n")).unwrap();
    let full_url = url::Url::parse(&format!("postgres://app@127.0.0.1:{}/sec", server.port()))
        .map(|mut u| {
            u.set_password(Some(PASSWORD)).unwrap();
            u.to_string()
        })
        .unwrap();
    std::fs::write(dir.join("db-url"), &full_url).unwrap();
    let bare_url = format!("postgres://app@127.0.0.1:{}/sec", server.port());
    let metrics_port = free_port();
    let config = dir.join("epidemic.toml");
    let write_config = |database: &str| {
        std::fs::write(
            &config,
            format!(
                "[database]\n{database}\n[daemon]\nname = \"mx1\"\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\n{}",
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
    let mut outputs = Outputs(Vec::new());

    // Without the password the server refuses: the password file is what lets it in.
    write_config(&format!("url = {bare_url:?}"));
    let out = run(&config, &["check"], &[]);
    assert!(!out.status.success(), "connected without a password");
    outputs.add("check without password", &out);

    // password_file, relative to the config file's directory.
    write_config(&format!(
        "url = {bare_url:?}\npassword_file = \"db-password\""
    ));
    let out = run(&config, &["check"], &[]);
    outputs.add("check with password_file", &out);
    assert!(out.status.success(), "{}", outputs.0.join("\n"));
    for args in [
        &["sql"][..],
        &["install"],
        &["status"],
        &["status", "--json"],
    ] {
        let out = run(&config, args, &[]);
        assert!(out.status.success(), "{args:?}");
        outputs.add(&format!("{args:?}"), &out);
    }

    // The daemon with the password from a systemd credential; a change fails for good
    // so a dead letter (which records the change and the error) exists.
    write_config(&format!(
        "url = {bare_url:?}\npassword_file = \"cred:db-password\""
    ));
    let out = run(&config, &["check"], &[]);
    outputs.add("check cred: without CREDENTIALS_DIRECTORY", &out);
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs $CREDENTIALS_DIRECTORY"));
    let log = dir.join("daemon.log");
    let creds_dir = creds.display().to_string();
    let d = Daemon::start_with_env(
        &config,
        &log,
        &[],
        &[("CREDENTIALS_DIRECTORY", &creds_dir), ("RUST_LOG", "debug")],
    );
    assert!(d.wait_for_log("epidemic started", WAIT), "{}", d.log_text());
    server
        .client("sec")
        .batch_execute("INSERT INTO mail_users VALUES (1, 'ann')")
        .unwrap();
    let env = [("CREDENTIALS_DIRECTORY", creds_dir.as_str())];
    assert!(wait_until(WAIT, || String::from_utf8_lossy(
        &run(&config, &["dead-letters", "list"], &env).stdout
    )
    .contains("INSERT")));
    for args in [
        &["dead-letters", "list", "--json"][..],
        &["status", "--check"],
        &["status"],
    ] {
        outputs.add(&format!("{args:?}"), &run(&config, args, &env));
    }
    outputs.0.push(scrape(metrics_port));
    drop(d);
    outputs.0.push(std::fs::read_to_string(&log).unwrap());

    // url_file: the whole URL, password included, from a file.
    write_config("url_file = \"db-url\"");
    let out = run(&config, &["status"], &[]);
    outputs.add("status with url_file", &out);
    assert!(out.status.success(), "{}", outputs.0.join("\n"));

    // Errors that echo the URL: a wrong database, an unreachable port.
    std::fs::write(dir.join("db-url"), full_url.replace("/sec", "/nosuchdb")).unwrap();
    outputs.add("status, no such database", &run(&config, &["status"], &[]));
    std::fs::write(
        dir.join("db-url"),
        full_url.replace(
            &format!(":{}/", server.port()),
            &format!(":{}/", free_port()),
        ),
    )
    .unwrap();
    let out = run(&config, &["check"], &[]);
    assert_eq!(out.status.code(), Some(69));
    outputs.add("check, unreachable", &out);
    // Both url and url_file: refused, naming both keys.
    write_config(&format!("url = {bare_url:?}\nurl_file = \"db-url\""));
    let out = run(&config, &["check"], &[]);
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("database.url and database.url_file are both set"));
    outputs.add("url and url_file", &out);

    let all = outputs.0.join("\n");
    assert!(
        all.contains("app:***@127.0.0.1"),
        "URLs are shown redacted:\n{all}"
    );
    outputs.assert_no_leak();
}

#[test]
fn a_password_file_for_a_url_without_a_user_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("epidemic.toml");
    std::fs::write(tmp.path().join("pw"), "x\n").unwrap();
    std::fs::write(
        &config,
        "[database]\nurl = \"sqlite://mail.db\"\npassword_file = \"pw\"\n",
    )
    .unwrap();
    let out = run(&config, &["check"], &[]);
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("database.password_file: database.url sqlite://mail.db names no user@host"),
        "{err}"
    );
    // And a missing password file names the file.
    std::fs::remove_file(tmp.path().join("pw")).unwrap();
    let err = String::from_utf8_lossy(&run(&config, &["check"], &[]).stderr).into_owned();
    assert!(
        err.contains(&format!(
            "database.password_file: cannot read {}",
            tmp.path().join("pw").display()
        )),
        "{err}"
    );
}
