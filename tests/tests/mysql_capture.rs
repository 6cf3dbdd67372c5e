//! What MySQL/MariaDB triggers do not see, against a real MariaDB: foreign-key cascades,
//! TRUNCATE, `UPDATE IGNORE` rows skipped for a duplicate key, non-transactional tables
//! and names spelled in another case. Each is captured correctly or refused loudly.

use std::path::{Path, PathBuf};
use std::time::Duration;

use epidemic_plugin_host::{load, HostBackend};
use epidemic_plugin_sdk::backend::{Consumer, StartFrom, Watch};
use epidemic_plugin_sdk::{Change, Value};
use epidemic_tests::mysql::MySqlServer;
use epidemic_tests::{backend_path, epidemic, recorder_handler, wait_recorded, Daemon};
use mysql::prelude::Queryable;
use serde_json::{json, Value as Json};

const WAIT: Duration = Duration::from_secs(30);

/// A database on the shared server with `schema` applied; returns (url, connection).
fn database(name: &str, schema: &str) -> (String, mysql::Conn) {
    database_on(MySqlServer::shared(), name, schema)
}

fn database_on(server: &MySqlServer, name: &str, schema: &str) -> (String, mysql::Conn) {
    let url = server.create_database(name);
    let mut conn = server.conn(name);
    for stmt in schema.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        conn.query_drop(stmt)
            .unwrap_or_else(|e| panic!("{stmt}: {e}"));
    }
    (url, conn)
}

fn open(url: &str) -> HostBackend {
    let lib = load(&backend_path("mysql")).expect("load the mysql backend");
    lib.open_backend(url, &json!({})).expect("open backend")
}

fn watch(table: &str, columns: &[&str]) -> Watch {
    Watch {
        table: table.into(),
        columns: columns.iter().map(|c| c.to_string()).collect(),
        ..Default::default()
    }
}

fn consumer() -> Consumer {
    Consumer {
        daemon: "mx1".into(),
        handler: "rec".into(),
    }
}

/// Whatever is in the log now for the consumer (fetch and ack until an empty batch).
fn drain(b: &mut HostBackend, c: &Consumer) -> Vec<Change> {
    let mut out = Vec::new();
    loop {
        let batch = b.fetch(c, 500).expect("fetch");
        let Some(last) = batch.changes.last() else {
            return out;
        };
        b.ack(c, &batch.token, last.id).expect("ack");
        out.extend(batch.changes);
    }
}

/// A config with one recorder handler per (name, table, columns).
fn config(dir: &Path, url: &str, handlers: &[(&str, &str, &[&str])]) -> PathBuf {
    let path = dir.join("epidemic.toml");
    let mut text =
        format!("[database]\nurl = {url:?}\npoll_interval_ms = 20\n[daemon]\nname = \"mx1\"\n\n");
    for (name, table, columns) in handlers {
        text.push_str(&recorder_handler(
            name,
            &dir.join(format!("{name}.jsonl")),
            table,
            columns,
            "",
        ));
    }
    std::fs::write(&path, text).unwrap();
    path
}

fn start(config: &Path, dir: &Path) -> Daemon {
    let d = Daemon::start(config, &dir.join("daemon.log"), &[]);
    assert!(
        d.wait_for_log("epidemic started", WAIT),
        "the daemon did not start:\n{}",
        d.log_text()
    );
    d
}

fn run_ok(config: &Path, args: &[&str]) -> String {
    let out = epidemic(config, args);
    assert!(
        out.status.success(),
        "epidemic {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The recorded changes from line `from` on, as (op, old, new).
fn ops(lines: &[Json], from: usize) -> Vec<(String, Json, Json)> {
    lines[from..]
        .iter()
        .map(|l| {
            (
                l["op"].as_str().unwrap().to_owned(),
                l["old"].clone(),
                l["new"].clone(),
            )
        })
        .collect()
}

fn triggers(conn: &mut mysql::Conn) -> Vec<String> {
    conn.query(
        "SELECT CONCAT(EVENT_OBJECT_TABLE, ' ', ACTION_TIMING, ' ', EVENT_MANIPULATION, ' ', TRIGGER_NAME) \
         FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = DATABASE() ORDER BY 1",
    )
    .unwrap()
}

const DOMAINS: &str = "CREATE TABLE domains (id INT PRIMARY KEY, name VARCHAR(100) NOT NULL) ENGINE=InnoDB;
    CREATE TABLE mail_users (
        id INT PRIMARY KEY,
        domain_id INT NULL,
        username VARCHAR(100) NOT NULL,
        CONSTRAINT mail_users_domain FOREIGN KEY (domain_id) REFERENCES domains (id) ON DELETE CASCADE ON UPDATE CASCADE
    ) ENGINE=InnoDB";

#[test]
fn cascaded_deletes_and_key_updates_reach_the_handler() {
    let (url, mut conn) = database("cap_cascade", DOMAINS);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cfg = config(
        dir,
        &url,
        &[("rec", "mail_users", &["domain_id", "username"])],
    );
    // What install runs is what `epidemic sql` prints, cascade triggers included.
    let script = run_ok(&cfg, &["sql"]);
    assert!(script.contains("ON `domains`"), "{script}");
    let _d = start(&cfg, dir);
    let file = dir.join("rec.jsonl");
    conn.query_drop("INSERT INTO domains VALUES (1, 'a.example'), (2, 'b.example')")
        .unwrap();
    conn.query_drop(
        "INSERT INTO mail_users VALUES (10, 1, 'alice'), (11, 1, 'bob'), (20, 2, 'carol')",
    )
    .unwrap();
    assert_eq!(wait_recorded(&file, 3, WAIT).len(), 3);

    conn.query_drop("DELETE FROM domains WHERE id = 1").unwrap();
    let lines = wait_recorded(&file, 5, WAIT);
    let mut got = ops(&lines, 3);
    got.sort_by_key(|(_, old, _)| old["username"].as_str().unwrap_or("").to_owned());
    assert_eq!(
        got,
        vec![
            (
                "DELETE".into(),
                json!({"domain_id": 1, "username": "alice"}),
                Json::Null
            ),
            (
                "DELETE".into(),
                json!({"domain_id": 1, "username": "bob"}),
                Json::Null
            ),
        ],
        "{lines:?}"
    );

    // Cascaded deletes carry the child row's key, whatever the handler watches.
    let mut keys: Vec<Json> = lines[3..5].iter().map(|l| l["key"].clone()).collect();
    keys.sort_by_key(|k| k["id"].as_i64());
    assert_eq!(
        keys,
        vec![json!({"id": 10}), json!({"id": 11})],
        "{lines:?}"
    );

    conn.query_drop("UPDATE domains SET id = 7 WHERE id = 2")
        .unwrap();
    let lines = wait_recorded(&file, 6, WAIT);
    assert_eq!(lines[5]["key"], json!({"id": 20}), "{lines:?}");
    assert!(lines[5].get("old_key").is_none(), "{lines:?}");
    assert!(
        lines[5]["stable_id"]
            .as_str()
            .is_some_and(|s| s.ends_with(&format!("-{}", lines[5]["id"]))),
        "{lines:?}"
    );
    assert_eq!(
        ops(&lines, 5),
        vec![(
            "UPDATE".into(),
            json!({"domain_id": 2, "username": "carol"}),
            json!({"domain_id": 7, "username": "carol"})
        )],
        "{lines:?}"
    );
    // An update of the parent that leaves its key alone cascades nothing.
    conn.query_drop("UPDATE domains SET name = 'c.example' WHERE id = 7")
        .unwrap();
    conn.query_drop("INSERT INTO mail_users VALUES (30, 7, 'dave')")
        .unwrap();
    let lines = wait_recorded(&file, 7, WAIT);
    assert_eq!(lines.len(), 7, "{lines:?}");
    assert_eq!(lines[6]["op"], "INSERT", "{lines:?}");
    drop(_d);

    let status = run_ok(&cfg, &["status"]);
    assert!(!status.contains("problems:"), "{status}");
    // A cascade trigger dropped by hand is drift, said in status.
    conn.query_drop("DROP TRIGGER epidemic_domains_cascade_del")
        .unwrap();
    let status = run_ok(&cfg, &["status"]);
    assert!(
        status.contains("trigger epidemic_domains_cascade_del on table domains is missing"),
        "{status}"
    );
    run_ok(&cfg, &["uninstall"]);
    assert_eq!(triggers(&mut conn), Vec::<String>::new());
}

#[test]
fn set_null_cascades_reach_the_handler() {
    let (url, mut conn) = database(
        "cap_set_null",
        "CREATE TABLE domains (id INT PRIMARY KEY) ENGINE=InnoDB;
         CREATE TABLE mail_users (
            id INT PRIMARY KEY,
            domain_id INT NULL,
            username VARCHAR(100) NOT NULL,
            CONSTRAINT mail_users_domain FOREIGN KEY (domain_id) REFERENCES domains (id) ON DELETE SET NULL ON UPDATE SET NULL
         ) ENGINE=InnoDB;
         INSERT INTO domains VALUES (1), (2);
         INSERT INTO mail_users VALUES (10, 1, 'alice'), (20, 2, 'bob')",
    );
    let c = consumer();
    let mut b = open(&url);
    let w = [watch("mail_users", &["domain_id", "username"])];
    b.install(&w).expect("install");
    // Installed objects are recognised as current: a second install changes nothing.
    assert_eq!(b.plan_install(&w).expect("plan"), Vec::<String>::new());
    b.register(&c, &["mail_users".into()], StartFrom::Now)
        .unwrap();
    conn.query_drop("DELETE FROM domains WHERE id = 1").unwrap();
    conn.query_drop("UPDATE domains SET id = 5 WHERE id = 2")
        .unwrap();
    type Row = Option<Vec<Value>>;
    let changes = drain(&mut b, &c);
    // A cascaded change has a key like any other: the child row's primary key.
    let keys: Vec<(Vec<Value>, bool)> = changes
        .iter()
        .map(|ch| (ch.key.clone(), ch.key_changed()))
        .collect();
    assert_eq!(
        keys,
        vec![(vec![Value::Int(10)], false), (vec![Value::Int(20)], false)]
    );
    let got: Vec<(String, Row, Row)> = changes
        .into_iter()
        .map(|ch| (ch.op.as_str().to_owned(), ch.old, ch.new))
        .collect();
    let row = |id: i64, d: Option<i64>, u: &str| {
        Some(vec![
            Value::Int(id),
            d.map_or(Value::Null, Value::Int),
            Value::Text(u.into()),
        ])
    };
    assert_eq!(
        got,
        vec![
            (
                "UPDATE".into(),
                row(10, Some(1), "alice"),
                row(10, None, "alice")
            ),
            (
                "UPDATE".into(),
                row(20, Some(2), "bob"),
                row(20, None, "bob")
            ),
        ]
    );
}

#[test]
fn cascades_through_an_unwatched_table_reach_the_handler() {
    let (url, mut conn) = database(
        "cap_chain",
        "CREATE TABLE domains (id INT PRIMARY KEY) ENGINE=InnoDB;
         CREATE TABLE mail_users (id INT PRIMARY KEY, domain_id INT NOT NULL,
            CONSTRAINT users_domain FOREIGN KEY (domain_id) REFERENCES domains (id) ON DELETE CASCADE) ENGINE=InnoDB;
         CREATE TABLE aliases (id INT PRIMARY KEY, user_id INT NOT NULL, alias VARCHAR(100) NOT NULL,
            CONSTRAINT aliases_user FOREIGN KEY (user_id) REFERENCES mail_users (id) ON DELETE CASCADE) ENGINE=InnoDB;
         INSERT INTO domains VALUES (1), (2);
         INSERT INTO mail_users VALUES (10, 1), (11, 1), (20, 2);
         INSERT INTO aliases VALUES (100, 10, 'postmaster'), (101, 11, 'abuse'), (200, 20, 'info')",
    );
    let c = consumer();
    let mut b = open(&url);
    b.install(&[watch("aliases", &["alias"])]).expect("install");
    assert_eq!(
        b.plan_install(&[watch("aliases", &["alias"])])
            .expect("plan"),
        Vec::<String>::new()
    );
    b.register(&c, &["aliases".into()], StartFrom::Now).unwrap();
    conn.query_drop("DELETE FROM domains WHERE id = 1").unwrap();
    conn.query_drop("DELETE FROM mail_users WHERE id = 20")
        .unwrap();
    let mut got: Vec<String> = drain(&mut b, &c)
        .into_iter()
        .map(|ch| format!("{} {:?} {:?}", ch.op.as_str(), ch.key, ch.old))
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            "DELETE [Int(100)] Some([Int(100), Text(\"postmaster\")])",
            "DELETE [Int(101)] Some([Int(101), Text(\"abuse\")])",
            "DELETE [Int(200)] Some([Int(200), Text(\"info\")])",
        ]
    );
    b.uninstall().expect("uninstall");
    assert_eq!(triggers(&mut conn), Vec::<String>::new());
}

#[test]
fn a_self_referencing_cascade_is_refused() {
    let (url, mut conn) = database(
        "cap_self_ref",
        "CREATE TABLE folders (id INT PRIMARY KEY, parent_id INT NULL, name VARCHAR(50),
            CONSTRAINT folders_parent FOREIGN KEY (parent_id) REFERENCES folders (id) ON DELETE CASCADE) ENGINE=InnoDB",
    );
    let mut b = open(&url);
    let err = b
        .install(&[watch("folders", &["name"])])
        .expect_err("a cascade of unbounded depth cannot be captured")
        .to_string();
    assert!(
        err.contains("folders_parent") && err.contains("folders") && !err.contains('\n'),
        "{err}"
    );
    // Nothing half-done.
    let tables: Vec<String> = conn.query("SHOW TABLES").unwrap();
    assert_eq!(tables, vec!["folders".to_owned()]);
}

#[test]
fn truncate_is_reported_in_status_and_at_start() {
    let (url, mut conn) = database(
        "cap_truncate",
        "CREATE TABLE mail_users (id INT AUTO_INCREMENT PRIMARY KEY, username VARCHAR(100) NOT NULL) ENGINE=InnoDB;
         CREATE TABLE domains (name VARCHAR(100) PRIMARY KEY) ENGINE=InnoDB",
    );
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cfg = config(
        dir,
        &url,
        &[
            ("rec", "mail_users", &["username"]),
            ("dom", "domains", &["name"]),
        ],
    );
    run_ok(&cfg, &["install"]);
    conn.query_drop("INSERT INTO mail_users (username) VALUES ('alice'), ('bob')")
        .unwrap();
    conn.query_drop("INSERT INTO domains VALUES ('a.example')")
        .unwrap();
    // CREATE_TIME has whole seconds: a check in the second a table was (re)built cannot
    // tell a later TRUNCATE from a rebuild, so let the second pass before each check.
    let settled = |conn: &mut mysql::Conn| {
        assert!(epidemic_tests::wait_until(WAIT, || {
            let newer: Option<i64> = conn
                .query_first(
                    "SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() \
                     AND TABLE_NAME IN ('mail_users', 'domains') AND CREATE_TIME >= NOW()",
                )
                .unwrap();
            newer == Some(0)
        }));
    };
    settled(&mut conn);
    let status = run_ok(&cfg, &["status"]);
    assert!(!status.contains("truncated"), "{status}");
    // A rebuild is not a truncation.
    conn.query_drop("ALTER TABLE domains FORCE").unwrap();
    settled(&mut conn);
    let status = run_ok(&cfg, &["status"]);
    assert!(!status.contains("truncated"), "{status}");
    conn.query_drop("TRUNCATE TABLE mail_users").unwrap();
    conn.query_drop("TRUNCATE TABLE domains").unwrap();
    let status = run_ok(&cfg, &["status"]);
    for table in ["mail_users", "domains"] {
        assert!(
            status.contains(&format!("table {table} was truncated")),
            "{status}"
        );
    }
    // Writes after the truncation do not hide it.
    conn.query_drop("INSERT INTO mail_users (username) VALUES ('a'), ('b'), ('c'), ('d')")
        .unwrap();
    let d = start(&cfg, dir);
    assert!(
        d.wait_for_log("table mail_users was truncated", WAIT),
        "{}",
        d.log_text()
    );
}

#[test]
fn update_ignore_skipped_rows_are_not_changes() {
    let (url, mut conn) = database(
        "cap_update_ignore",
        "CREATE TABLE mail_users (id INT PRIMARY KEY, username VARCHAR(100) NOT NULL UNIQUE) ENGINE=InnoDB;
         INSERT INTO mail_users VALUES (1, 'alice'), (2, 'bob'), (3, 'carol')",
    );
    let c = consumer();
    let mut b = open(&url);
    b.install(&[watch("mail_users", &["id", "username"])])
        .expect("install");
    b.register(&c, &["mail_users".into()], StartFrom::Now)
        .unwrap();
    // alice → bob collides with bob and is skipped; carol → dave happens.
    conn.query_drop(
        "UPDATE IGNORE mail_users SET username = CASE id WHEN 1 THEN 'bob' WHEN 3 THEN 'dave' ELSE username END",
    )
    .unwrap();
    assert_eq!(conn.affected_rows(), 1);
    // A key update that collides is skipped too; one that does not, happens.
    conn.query_drop("UPDATE IGNORE mail_users SET id = id + 1 WHERE id IN (1, 3) ORDER BY id DESC")
        .unwrap();
    let got: Vec<String> = drain(&mut b, &c)
        .into_iter()
        .map(|ch| format!("{} {:?} -> {:?}", ch.op.as_str(), ch.old, ch.new))
        .collect();
    assert_eq!(
        got,
        vec![
            "UPDATE Some([Int(3), Text(\"carol\")]) -> Some([Int(3), Text(\"dave\")])",
            "UPDATE Some([Int(3), Text(\"dave\")]) -> Some([Int(4), Text(\"dave\")])",
        ]
    );
    let rows: Vec<(i64, String)> = conn
        .query("SELECT id, username FROM mail_users ORDER BY id")
        .unwrap();
    assert_eq!(
        rows,
        vec![(1, "alice".into()), (2, "bob".into()), (4, "dave".into())]
    );
}

#[test]
fn non_transactional_tables_are_refused() {
    let (url, mut conn) = database(
        "cap_myisam",
        "CREATE TABLE mail_users (id INT PRIMARY KEY, username VARCHAR(100)) ENGINE=MyISAM;
         CREATE TABLE sessions (id INT PRIMARY KEY, who VARCHAR(100)) ENGINE=MEMORY",
    );
    let mut b = open(&url);
    for (table, engine) in [("mail_users", "MyISAM"), ("sessions", "MEMORY")] {
        let err = b
            .install(&[watch(table, &["id"])])
            .expect_err("a non-transactional table cannot be captured")
            .to_string();
        assert!(
            err.contains(table)
                && err.contains(engine)
                && err.contains(&format!("ALTER TABLE `{table}` ENGINE=InnoDB"))
                && !err.contains('\n'),
            "{err}"
        );
    }
    let tables: Vec<String> = conn.query("SHOW TABLES").unwrap();
    assert_eq!(tables.len(), 2, "nothing half-done: {tables:?}");
    // A table converted after install is reported.
    conn.query_drop("CREATE TABLE domains (name VARCHAR(100) PRIMARY KEY) ENGINE=InnoDB")
        .unwrap();
    b.install(&[watch("domains", &["name"])]).expect("install");
    conn.query_drop("ALTER TABLE domains ENGINE=MyISAM")
        .unwrap();
    let status = b.status().expect("status");
    let problems = &status.tables[0].problems;
    assert!(
        problems.iter().any(|p| p.contains("MyISAM")),
        "{problems:?}"
    );
}

#[test]
fn log_tables_are_innodb_whatever_the_default_engine() {
    let server = MySqlServer::start_new();
    server
        .conn("")
        .query_drop("SET GLOBAL default_storage_engine = 'MyISAM'")
        .unwrap();
    // Made with the server's default engine: MyISAM, and refused.
    let (url, mut conn) = database_on(
        &server,
        "cap_default_engine",
        "CREATE TABLE mail_users (id INT PRIMARY KEY, username VARCHAR(100))",
    );
    let mut b = open(&url);
    let w = [watch("mail_users", &["username"])];
    let err = b.install(&w).expect_err("MyISAM").to_string();
    assert!(err.contains("MyISAM"), "{err}");
    conn.query_drop("ALTER TABLE mail_users ENGINE=InnoDB")
        .unwrap();
    b.install(&w).expect("install");
    // A log table converted by hand is converted back.
    conn.query_drop("ALTER TABLE epidemic_log_mail_users ENGINE=MyISAM")
        .unwrap();
    b.install(&w).expect("install again");
    let engines: Vec<(String, String)> = conn
        .query(
            "SELECT TABLE_NAME, ENGINE FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() ORDER BY 1",
        )
        .unwrap();
    assert!(engines.len() >= 4, "{engines:?}");
    for (table, engine) in &engines {
        assert_eq!(engine, "InnoDB", "{table}: {engines:?}");
    }
}

#[test]
fn names_in_another_case_reach_the_handler() {
    let (url, mut conn) = database(
        "cap_case",
        "CREATE TABLE Mail_Users (id INT PRIMARY KEY, Quota BIGINT NULL, username VARCHAR(100) NOT NULL) ENGINE=InnoDB;
         CREATE TABLE domains (id INT PRIMARY KEY, name VARCHAR(100) NOT NULL) ENGINE=InnoDB",
    );
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cfg = config(
        dir,
        &url,
        &[
            ("rec", "mail_users", &["quota", "USERNAME"]),
            ("dom", "DOMAINS", &["Name"]),
        ],
    );
    let _d = start(&cfg, dir);
    conn.query_drop("INSERT INTO Mail_Users VALUES (1, 100, 'alice')")
        .unwrap();
    conn.query_drop("UPDATE Mail_Users SET Quota = 200 WHERE id = 1")
        .unwrap();
    conn.query_drop("INSERT INTO domains VALUES (1, 'a.example')")
        .unwrap();
    let lines = wait_recorded(&dir.join("rec.jsonl"), 2, WAIT);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["table"], "Mail_Users");
    assert_eq!(lines[0]["new"], json!({"Quota": 100, "username": "alice"}));
    assert_eq!(lines[1]["old"], json!({"Quota": 100, "username": "alice"}));
    assert_eq!(lines[1]["new"], json!({"Quota": 200, "username": "alice"}));
    let lines = wait_recorded(&dir.join("dom.jsonl"), 1, WAIT);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["table"], "domains");
    assert_eq!(lines[0]["new"], json!({"name": "a.example"}));
    // The catalog's spelling everywhere: one log table, triggers on the real table.
    let tables: Vec<String> = conn.query("SHOW TABLES").unwrap();
    assert!(
        tables.contains(&"epidemic_log_Mail_Users".to_owned()),
        "{tables:?}"
    );
    let status = run_ok(&cfg, &["status"]);
    assert!(status.contains("Mail_Users"), "{status}");
    assert!(!status.contains("problems:"), "{status}");
}

#[test]
fn the_dba_script_creates_the_cascade_triggers_install_creates() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let server = MySqlServer::shared();
    let objects = |db: &str| -> Vec<String> {
        let mut c = server.conn(db);
        let mut v: Vec<String> = c
            .exec(
                "SELECT CONCAT('table ', TABLE_NAME, ' ', ENGINE) FROM information_schema.TABLES WHERE TABLE_SCHEMA = ?
                 UNION ALL SELECT CONCAT('column ', TABLE_NAME, '.', COLUMN_NAME, ' ', COLUMN_TYPE)
                   FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = ?
                 UNION ALL SELECT CONCAT('trigger ', TRIGGER_NAME, ' ', ACTION_TIMING, ' ', EVENT_MANIPULATION, ' ', MD5(ACTION_STATEMENT))
                   FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = ?",
                (db, db, db),
            )
            .unwrap();
        v.sort();
        v
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut configs = Vec::new();
    for db in ["cap_dba_by_hand", "cap_dba_by_install"] {
        let (url, _) = database(db, DOMAINS);
        let sub = dir.join(db);
        std::fs::create_dir(&sub).unwrap();
        configs.push(config(
            &sub,
            &url,
            &[("rec", "mail_users", &["domain_id", "username"])],
        ));
    }
    let script = run_ok(&configs[0], &["sql"]);
    assert!(script.contains("BEFORE DELETE ON `domains`"), "{script}");
    let mut child = Command::new("mariadb")
        .args(["--no-defaults", "--protocol=tcp", "-h127.0.0.1", "-uroot"])
        .arg(format!("-P{}", server.port()))
        .arg("cap_dba_by_hand")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the mariadb client");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}\n{script}",
        String::from_utf8_lossy(&out.stderr)
    );
    run_ok(&configs[1], &["install"]);
    let (a, b) = (objects("cap_dba_by_hand"), objects("cap_dba_by_install"));
    assert!(
        a.iter()
            .any(|o| o.starts_with("trigger epidemic_domains_cascade_del BEFORE DELETE")),
        "{a:?}"
    );
    assert_eq!(a, b);
}

#[test]
fn cascades_of_parent_rows_an_ignore_statement_skipped_are_not_changes() {
    let (url, mut conn) = database(
        "cap_cascade_ignore",
        "CREATE TABLE domains (id INT PRIMARY KEY) ENGINE=InnoDB;
         CREATE TABLE mail_users (id INT PRIMARY KEY, domain_id INT NOT NULL, username VARCHAR(100) NOT NULL,
            CONSTRAINT users_domain FOREIGN KEY (domain_id) REFERENCES domains (id) ON DELETE CASCADE ON UPDATE CASCADE
         ) ENGINE=InnoDB;
         CREATE TABLE invoices (id INT PRIMARY KEY, domain_id INT NOT NULL,
            CONSTRAINT invoices_domain FOREIGN KEY (domain_id) REFERENCES domains (id)) ENGINE=InnoDB;
         INSERT INTO domains VALUES (1), (2), (3);
         INSERT INTO mail_users VALUES (10, 1, 'alice'), (20, 2, 'bob'), (30, 3, 'carol');
         INSERT INTO invoices VALUES (100, 1)",
    );
    let c = consumer();
    let mut b = open(&url);
    b.install(&[watch("mail_users", &["domain_id", "username"])])
        .expect("install");
    b.register(&c, &["mail_users".into()], StartFrom::Now)
        .unwrap();
    // Domain 1 has an invoice: its delete is skipped, and so is the cascade to alice.
    conn.query_drop("DELETE IGNORE FROM domains WHERE id IN (1, 2)")
        .unwrap();
    assert_eq!(conn.affected_rows(), 1);
    // 1 -> 3 collides with domain 3 and is skipped; 3 -> 7 happens (rows in key order).
    conn.query_drop(
        "UPDATE IGNORE domains SET id = CASE id WHEN 1 THEN 3 ELSE 7 END WHERE id IN (1, 3) ORDER BY id",
    )
    .unwrap();
    assert_eq!(conn.affected_rows(), 1);
    let got: Vec<String> = drain(&mut b, &c)
        .into_iter()
        .map(|ch| format!("{} {:?} -> {:?}", ch.op.as_str(), ch.old, ch.new))
        .collect();
    assert_eq!(
        got,
        vec![
            "DELETE Some([Int(20), Int(2), Text(\"bob\")]) -> None",
            "UPDATE Some([Int(30), Int(3), Text(\"carol\")]) -> Some([Int(30), Int(7), Text(\"carol\")])",
        ]
    );
    let users: Vec<(i64, i64)> = conn
        .query("SELECT id, domain_id FROM mail_users ORDER BY id")
        .unwrap();
    assert_eq!(users, vec![(10, 1), (30, 7)]);
    // Uninstall removes the pending table with the rest.
    b.uninstall().expect("uninstall");
    let tables: Vec<String> = conn.query("SHOW TABLES").unwrap();
    assert_eq!(tables.len(), 3, "{tables:?}");
}

/// The `epidemic` binary end to end on a table without a primary key: `install`, `sql`
/// and `run` refuse it with one line naming the table and the `key = [..]` fix; a
/// configured key column that does not exist is refused by name; with `[table.NAME] key`
/// the daemon delivers its changes with that key.
#[test]
fn a_table_without_a_primary_key_is_refused_until_the_config_names_its_key() {
    let (url, mut conn) = database(
        "cap_no_key",
        "CREATE TABLE forwards (address VARCHAR(100) NOT NULL, target VARCHAR(100) NOT NULL) ENGINE=InnoDB",
    );
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cfg = config(dir, &url, &[("rec", "forwards", &["target"])]);
    let base = std::fs::read_to_string(&cfg).unwrap();
    for args in [&["install"][..], &["sql"], &["run"]] {
        let out = epidemic(&cfg, args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "epidemic {args:?} accepted it:\n{stderr}"
        );
        let line = stderr.trim();
        assert!(
            line.contains("table forwards has no primary key")
                && line.contains("[table.forwards] key = [")
                && !line.contains('\n'),
            "epidemic {args:?}:\n{stderr}"
        );
    }
    let tables: Vec<String> = conn.query("SHOW TABLES").unwrap();
    assert_eq!(tables, ["forwards"], "nothing may be created");

    std::fs::write(
        &cfg,
        format!("{base}\n[table.forwards]\nkey = [\"address\", \"nope\"]\n"),
    )
    .unwrap();
    let out = epidemic(&cfg, &["install"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("[table.forwards] key: table forwards has no column nope"),
        "{stderr}"
    );

    std::fs::write(
        &cfg,
        format!("{base}\n[table.forwards]\nkey = [\"Address\"]\n"),
    )
    .unwrap();
    let _d = start(&cfg, dir);
    let file = dir.join("rec.jsonl");
    conn.query_drop("INSERT INTO forwards VALUES ('ann@example.org', 'ann@elsewhere.org')")
        .unwrap();
    conn.query_drop("UPDATE forwards SET address = 'anna@example.org'")
        .unwrap();
    let lines = wait_recorded(&file, 2, WAIT);
    assert_eq!(
        lines[0]["key"],
        json!({"address": "ann@example.org"}),
        "{lines:?}"
    );
    assert_eq!(
        lines[0]["new"],
        json!({"target": "ann@elsewhere.org"}),
        "{lines:?}"
    );
    assert_eq!(
        lines[1]["op"], "UPDATE",
        "an update of the key alone: {lines:?}"
    );
    assert_eq!(
        lines[1]["key"],
        json!({"address": "anna@example.org"}),
        "{lines:?}"
    );
    assert_eq!(
        lines[1]["old_key"],
        json!({"address": "ann@example.org"}),
        "{lines:?}"
    );
}
