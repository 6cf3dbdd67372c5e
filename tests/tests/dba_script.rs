//! The DBA's path: `epidemic sql` prints a script that the database's own command-line
//! client runs as it is, and the result is what `epidemic install` would have created.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use epidemic_tests::mysql::MySqlServer;
use epidemic_tests::pg::{PgServer, PG_BIN};
use epidemic_tests::{epidemic, recorder_handler};
use mysql::prelude::Queryable;

fn config(dir: &Path, url: &str) -> std::path::PathBuf {
    let path = dir.join("epidemic.toml");
    std::fs::write(
        &path,
        format!(
            "[database]\nurl = {url:?}\n[daemon]\nname = \"mx1\"\n\n{}",
            recorder_handler(
                "rec",
                &dir.join("rec.jsonl"),
                "mail_users",
                &["username", "quota_bytes"],
                ""
            )
        ),
    )
    .unwrap();
    path
}

fn sql(config: &Path) -> String {
    let out = epidemic(config, &["sql"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn pipe(mut cmd: Command, input: &str) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn client");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the client refused the script:\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        input
    );
}

#[test]
fn postgres_script_runs_in_psql() {
    let server = PgServer::shared();
    let objects = |db: &str| -> Vec<String> {
        let mut c = server.client(db);
        c.query(
            "SELECT c.relkind::text || ' ' || n.nspname || '.' || c.relname FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname IN ('public', 'epidemic')
             UNION ALL SELECT 't ' || tgname || ' ' || pg_get_triggerdef(oid) FROM pg_trigger WHERE NOT tgisinternal
             UNION ALL SELECT 'f ' || proname || ' ' || md5(prosrc) FROM pg_proc p
               JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'epidemic'
             ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
    };
    let tmp = tempfile::tempdir().unwrap();
    let mut urls = Vec::new();
    for db in ["dba_by_hand", "dba_by_install"] {
        let url = server.create_database(db);
        server
            .client(db)
            .batch_execute("CREATE TABLE mail_users (id BIGINT PRIMARY KEY, username TEXT NOT NULL, quota_bytes BIGINT)")
            .unwrap();
        urls.push(url);
    }
    let by_hand = config(tmp.path(), &urls[0]);
    let script = sql(&by_hand);
    assert!(script.contains("CREATE SCHEMA"), "{script}");
    // One transaction, as install applies it.
    assert!(
        script.contains("\nBEGIN;\n") && script.trim_end().ends_with("COMMIT;"),
        "{script}"
    );
    let mut psql = Command::new(Path::new(PG_BIN).join("psql"));
    psql.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", &urls[0]]);
    pipe(psql, &script);
    let out = epidemic(&config(tmp.path(), &urls[1]), &["install"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (a, b) = (objects("dba_by_hand"), objects("dba_by_install"));
    assert!(a.iter().any(|o| o.contains("epidemic")), "{a:?}");
    assert_eq!(a, b);
}

#[test]
fn mysql_script_runs_in_the_mariadb_client() {
    let server = MySqlServer::shared();
    let objects = |db: &str| -> Vec<String> {
        let mut c = server.conn(db);
        let mut v: Vec<String> = c
            .exec(
                "SELECT CONCAT('table ', TABLE_NAME) FROM information_schema.TABLES WHERE TABLE_SCHEMA = ?
                 UNION ALL SELECT CONCAT('column ', TABLE_NAME, '.', COLUMN_NAME, ' ', COLUMN_TYPE)
                   FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = ?
                 UNION ALL SELECT CONCAT('trigger ', TRIGGER_NAME, ' ', EVENT_MANIPULATION, ' ', MD5(ACTION_STATEMENT))
                   FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = ?",
                (db, db, db),
            )
            .unwrap();
        v.sort();
        v
    };
    let tmp = tempfile::tempdir().unwrap();
    let mut urls = Vec::new();
    for db in ["dba_by_hand", "dba_by_install"] {
        let url = server.create_database(db);
        server
            .conn(db)
            .query_drop("CREATE TABLE mail_users (id BIGINT PRIMARY KEY, username VARCHAR(200) NOT NULL, quota_bytes BIGINT)")
            .unwrap();
        urls.push(url);
    }
    let script = sql(&config(tmp.path(), &urls[0]));
    assert!(script.contains("DELIMITER //"), "{script}");
    let client = ["mariadb", "mysql"]
        .iter()
        .find(|c| Command::new(c).arg("--version").output().is_ok())
        .expect("the mariadb client");
    let mut cmd = Command::new(client);
    cmd.args(["--no-defaults", "--protocol=tcp", "-h127.0.0.1", "-uroot"])
        .arg(format!("-P{}", server.port()))
        .arg("dba_by_hand");
    pipe(cmd, &script);
    let out = epidemic(&config(tmp.path(), &urls[1]), &["install"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (a, b) = (objects("dba_by_hand"), objects("dba_by_install"));
    assert!(a.iter().any(|o| o.starts_with("trigger ")), "{a:?}");
    assert_eq!(a, b);
}
