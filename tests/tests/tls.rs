//! TLS against real servers that accept TCP connections only over TLS (PostgreSQL with
//! `hostssl` lines only, MariaDB with `require_secure_transport = ON`), with a CA and
//! certificates made by the test: the real `epidemic` binary delivers through the
//! recorder plugin with full verification; a wrong CA, a certificate for another host, a
//! missing client certificate or no TLS at all is refused in one line that names the URL
//! without its password.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use epidemic_tests::certs::TestPki;
use epidemic_tests::mysql::MySqlServer;
use epidemic_tests::pg::PgServer;
use epidemic_tests::{epidemic_within, recorder_handler, wait_recorded, Daemon};
use mysql::prelude::Queryable;

const WAIT: Duration = Duration::from_secs(60);
const PASSWORD: &str = "hunter2";

fn pki() -> &'static TestPki {
    static PKI: OnceLock<TestPki> = OnceLock::new();
    PKI.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("epidemic-pki-")
            .tempdir()
            .expect("tempdir")
            .keep();
        TestPki::generate(&dir)
    })
}

fn pg() -> &'static PgServer {
    static SERVER: OnceLock<PgServer> = OnceLock::new();
    SERVER.get_or_init(|| PgServer::start_private_tls(pki()))
}

fn mariadb() -> &'static MySqlServer {
    static SERVER: OnceLock<MySqlServer> = OnceLock::new();
    SERVER.get_or_init(|| MySqlServer::start_new_tls(pki()))
}

/// A test's directory and the daemon config pointing at `url`.
struct Setup {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    config: PathBuf,
    out: PathBuf,
}

fn setup(url: &str) -> Setup {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().to_owned();
    let out = dir.join("recorded.jsonl");
    let config = dir.join("epidemic.toml");
    let text = format!(
        "[database]\nurl = {url:?}\n\n[daemon]\nname = \"tls\"\n\n{}",
        recorder_handler("rec", &out, "mail_users", &["username"], "")
    );
    std::fs::write(&config, text).expect("write config");
    Setup {
        _tmp: tmp,
        dir,
        config,
        out,
    }
}

/// Start the daemon, write two rows with `insert`, and wait for both to be delivered;
/// the daemon is still running.
fn delivers(s: &Setup, insert: impl FnOnce()) -> Daemon {
    let d = Daemon::start(&s.config, &s.dir.join("daemon.log"), &[]);
    assert!(
        d.wait_for_log("epidemic started", WAIT),
        "the daemon did not start:\n{}",
        d.log_text()
    );
    insert();
    let lines = wait_recorded(&s.out, 2, WAIT);
    assert_eq!(lines.len(), 2, "{lines:?}\n{}", d.log_text());
    assert!(!d.log_text().contains(PASSWORD), "{}", d.log_text());
    d
}

/// `epidemic run` must exit by itself with status 78, with one line naming the URL
/// (without its password) and saying `expect`; the line is returned.
fn refused(s: &Setup, url_shown: &str, expect: &[&str]) -> String {
    let out = epidemic_within(&s.config, &["run"], WAIT).expect("epidemic run exits by itself");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    // A refusal is configuration: retrying cannot cure it (EX_CONFIG).
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(!stderr.contains(PASSWORD), "the password leaked:\n{stderr}");
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("cannot connect to"))
        .collect();
    assert_eq!(lines.len(), 1, "one line names the URL:\n{stderr}");
    let line = lines[0];
    eprintln!("refused as: {line}");
    assert!(line.contains(url_shown), "{url_shown} in:\n{stderr}");
    for e in expect {
        assert!(line.contains(e), "{e:?} in:\n{stderr}");
    }
    line.to_owned()
}

// ---------------------------------------------------------------- PostgreSQL

const PG_SCHEMA: &str = "CREATE TABLE mail_users (id BIGINT PRIMARY KEY, username TEXT NOT NULL)";

/// A database on the TLS server with the table; its URL with `user`, the test password
/// (ignored: the server trusts), and `params`.
fn pg_database(name: &str, user: &str, params: &str) -> (String, String) {
    pg().create_database(name);
    pg().client(name).batch_execute(PG_SCHEMA).expect("schema");
    let port = pg().port();
    let url = format!("postgres://{user}:{PASSWORD}@127.0.0.1:{port}/{name}?{params}");
    let shown = format!("postgres://{user}:***@127.0.0.1:{port}/{name}");
    (url, shown)
}

fn pg_insert(db: &str) {
    pg().client(db)
        .batch_execute("INSERT INTO mail_users VALUES (1, 'alice'), (2, 'bob')")
        .expect("insert");
}

#[test]
fn postgres_verify_full_with_the_right_ca_delivers_over_tls() {
    let ca = pki().ca.display().to_string();
    let (url, _) = pg_database(
        "tls_full",
        "postgres",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    );
    let s = setup(&url);
    let _daemon = delivers(&s, || pg_insert("tls_full"));
    // Every session the daemon holds is a TLS one (the server would refuse any other).
    let row = pg()
        .client("tls_full")
        .query_one(
            "SELECT count(*), bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.application_name = 'epidemic' AND a.datname = 'tls_full'",
            &[],
        )
        .expect("pg_stat_ssl");
    let (sessions, all_tls): (i64, Option<bool>) = (row.get(0), row.get(1));
    assert!(
        sessions >= 2 && all_tls == Some(true),
        "{sessions} {all_tls:?}"
    );
}

#[test]
fn postgres_wrong_ca_is_refused_in_one_line() {
    let wrong = pki().wrong_ca.display().to_string();
    let (url, shown) = pg_database(
        "tls_wrong_ca",
        "postgres",
        &format!("sslmode=verify-full&sslrootcert={wrong}"),
    );
    let line = refused(
        &setup(&url),
        &shown,
        &["not signed by a CA in sslrootcert", "sslmode=verify-full"],
    );
    assert!(line.contains(&wrong), "{line}");
}

#[test]
fn postgres_verify_full_checks_the_host_name_and_verify_ca_does_not() {
    let ca = pki().ca.display().to_string();
    // The certificate is for localhost and 127.0.0.1: reach the server at 127.0.0.1
    // under another name.
    pg().create_database("tls_name");
    pg().client("tls_name")
        .batch_execute(PG_SCHEMA)
        .expect("schema");
    let port = pg().port();
    let url = |mode: &str| {
        format!(
            "postgres://postgres@db.example:{port}/tls_name?hostaddr=127.0.0.1&sslmode={mode}&sslrootcert={ca}"
        )
    };
    refused(
        &setup(&url("verify-full")),
        &format!("db.example:{port}"),
        &["not valid for the host name"],
    );
    let s = setup(&url("verify-ca"));
    let out = epidemic_within(&s.config, &["check"], WAIT).expect("check exits");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn postgres_without_tls_is_refused_by_the_server() {
    let (url, shown) = pg_database("tls_none", "postgres", "sslmode=disable");
    refused(
        &setup(&url),
        &shown,
        &["no pg_hba.conf entry", "no encryption"],
    );
}

#[test]
fn postgres_client_certificates_authenticate() {
    let name = TestPki::CLIENT_NAME;
    pg().client("postgres")
        .batch_execute(&format!(
            "DO $$ BEGIN CREATE ROLE {name} LOGIN SUPERUSER; EXCEPTION WHEN duplicate_object THEN NULL; END $$"
        ))
        .expect("role");
    let p = pki();
    let (url, _) = pg_database(
        "tls_client_cert",
        name,
        &format!(
            "sslmode=verify-full&sslrootcert={}&sslcert={}&sslkey={}",
            p.ca.display(),
            p.client_cert.display(),
            p.client_key.display()
        ),
    );
    delivers(&setup(&url), || pg_insert("tls_client_cert"));
    // Without the certificate, the `cert` line of pg_hba.conf refuses the role.
    let (url, shown) = pg_database(
        "tls_no_client_cert",
        name,
        &format!("sslmode=verify-full&sslrootcert={}", p.ca.display()),
    );
    refused(&setup(&url), &shown, &["certificate"]);
}

// ---------------------------------------------------------------- MariaDB

const MY_SCHEMA: &str =
    "CREATE TABLE mail_users (id BIGINT PRIMARY KEY, username VARCHAR(200) NOT NULL)";

/// A database on the TLS server with the table, and a user `tls` with the test password.
fn my_database(name: &str) {
    let mut admin = mariadb().conn("");
    admin
        .query_drop(format!("CREATE DATABASE `{name}`"))
        .expect("create database");
    admin
        .query_drop(format!(
            "CREATE USER IF NOT EXISTS 'tls'@'%' IDENTIFIED BY '{PASSWORD}'"
        ))
        .expect("user");
    admin
        .query_drop("GRANT ALL ON *.* TO 'tls'@'%'")
        .expect("grant");
    mariadb().conn(name).query_drop(MY_SCHEMA).expect("schema");
}

fn my_url(user: &str, name: &str, params: &str) -> (String, String) {
    let port = mariadb().port();
    let password = if user == "tls" {
        format!(":{PASSWORD}")
    } else {
        String::new()
    };
    let shown = if user == "tls" { ":***" } else { "" };
    (
        format!("mysql://{user}{password}@127.0.0.1:{port}/{name}?{params}"),
        format!("mysql://{user}{shown}@127.0.0.1:{port}/{name}"),
    )
}

fn my_insert(db: &str) {
    mariadb()
        .conn(db)
        .query_drop("INSERT INTO mail_users VALUES (1, 'alice'), (2, 'bob')")
        .expect("insert");
}

#[test]
fn mariadb_verify_identity_with_the_right_ca_delivers_over_tls() {
    my_database("tls_full");
    let (url, _) = my_url(
        "tls",
        "tls_full",
        &format!("ssl-mode=verify_identity&ssl-ca={}", pki().ca.display()),
    );
    delivers(&setup(&url), || my_insert("tls_full"));
}

#[test]
fn mariadb_wrong_ca_is_refused_in_one_line() {
    my_database("tls_wrong_ca");
    let (url, shown) = my_url(
        "tls",
        "tls_wrong_ca",
        &format!(
            "ssl-mode=verify_identity&ssl-ca={}",
            pki().wrong_ca.display()
        ),
    );
    refused(
        &setup(&url),
        &shown,
        &["not signed by a CA in ssl-ca", "ssl-mode=verify_identity"],
    );
}

#[test]
fn mariadb_without_tls_is_refused_by_the_server() {
    my_database("tls_none");
    let (url, shown) = my_url("tls", "tls_none", "ssl-mode=disabled");
    // MariaDB says only "Access denied" to a plain connection; the line says why.
    refused(
        &setup(&url),
        &shown,
        &["Access denied", "not encrypted (ssl-mode=disabled)"],
    );
}

#[test]
fn mariadb_client_certificates_authenticate() {
    my_database("tls_client_cert");
    let name = TestPki::CLIENT_NAME;
    let mut admin = mariadb().conn("");
    admin
        .query_drop(format!(
            "CREATE USER IF NOT EXISTS '{name}'@'%' REQUIRE SUBJECT '/CN={name}'"
        ))
        .expect("user");
    admin
        .query_drop(format!("GRANT ALL ON *.* TO '{name}'@'%'"))
        .expect("grant");
    let p = pki();
    let (url, _) = my_url(
        name,
        "tls_client_cert",
        &format!(
            "ssl-mode=verify_identity&ssl-ca={}&ssl-cert={}&ssl-key={}",
            p.ca.display(),
            p.client_cert.display(),
            p.client_key.display()
        ),
    );
    delivers(&setup(&url), || my_insert("tls_client_cert"));
    let (url, shown) = my_url(
        name,
        "tls_client_cert",
        &format!("ssl-mode=verify_identity&ssl-ca={}", p.ca.display()),
    );
    refused(&setup(&url), &shown, &["Access denied"]);
}
