//! A backfill pages through float keys that JSON has no number for: `-inf`, `inf` and, on
//! PostgreSQL, `NaN` (SQLite stores NaN as NULL; MySQL/MariaDB store neither and refuse
//! FLOAT keys, see `mysql_backfill`). The key of a chunk's last row is kept in the
//! database as the backfill's progress and sent back to the backend as the next chunk's
//! start, so with one row per chunk every key crosses both ways. A daemon with
//! `start = "snapshot"` must hand the recorder every row exactly once and finish.

use std::time::Duration;

use epidemic_tests::db::{PgDb, SqlDb, SqliteDb};
use epidemic_tests::{epidemic, plugin_path, recorded, wait_until, Daemon};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

fn float_keys_page_end_to_end<D: SqlDb>(db: D, float: &str, rows: &[(&str, &str)]) {
    db.exec(&[format!(
        "CREATE TABLE readings (k {float} PRIMARY KEY, v {} NOT NULL)",
        db.types().0
    )]);
    let values: Vec<String> = rows.iter().map(|(k, v)| format!("({k}, '{v}')")).collect();
    db.exec(&[format!(
        "INSERT INTO readings (k, v) VALUES {}",
        values.join(", ")
    )]);
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("n1.toml");
    let rec = tmp.path().join("rec.jsonl");
    std::fs::write(
        &config,
        format!(
            "[database]\nurl = {:?}\n{}\n[daemon]\nname = \"n1\"\nbackfill_chunk = 1\n\n\
             [[handler]]\nname = \"rec\"\nplugin = {:?}\nstart = \"snapshot\"\n\
             [handler.config]\nfile = {:?}\ntable = \"readings\"\ncolumns = [\"v\"]\n",
            db.url(),
            db.options(),
            plugin_path("recorder").display().to_string(),
            rec.display().to_string(),
        ),
    )
    .unwrap();
    let mut daemon = Daemon::start(&config, &tmp.path().join("n1.log"), &[]);
    let done = || {
        let out = epidemic(&config, &["status", "--json"]);
        let status: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        status["backfills"]
            .as_array()
            .is_some_and(|b| b.len() == 1 && b[0]["state"] == "done")
    };
    assert!(
        wait_until(WAIT, done),
        "the backfill did not finish:\n{}",
        daemon.log_text()
    );
    let mut got: Vec<String> = recorded(&rec)
        .iter()
        .inspect(|l| assert_eq!(l["origin"], "snapshot", "{l}"))
        .map(|l| l["new"]["v"].as_str().unwrap_or_default().to_owned())
        .collect();
    got.sort();
    let mut want: Vec<String> = rows.iter().map(|(_, v)| (*v).to_owned()).collect();
    want.sort();
    assert_eq!(got, want, "every row once:\n{}", daemon.log_text());
    assert!(daemon.alive(), "{}", daemon.log_text());
    assert!(
        !daemon.log_text().contains("ERROR"),
        "{}",
        daemon.log_text()
    );
}

#[test]
fn sqlite_float_keys_page_end_to_end() {
    float_keys_page_end_to_end(
        SqliteDb::new(),
        "REAL",
        &[
            ("-9e999", "-inf"),
            ("-0.5", "neg"),
            ("0", "zero"),
            ("1.5", "pos"),
            ("9e999", "inf"),
        ],
    );
}

#[test]
fn postgres_float_keys_page_end_to_end() {
    float_keys_page_end_to_end(
        PgDb::new(),
        "double precision",
        &[
            ("'-Infinity'", "-inf"),
            ("-0.5", "neg"),
            ("0", "zero"),
            ("1.5", "pos"),
            ("'Infinity'", "inf"),
            ("'NaN'", "nan"),
        ],
    );
}
