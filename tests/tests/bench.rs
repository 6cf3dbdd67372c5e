//! `epidemic bench --quick` runs end to end and leaves the database as it found it.
//! Figures are never asserted: they come from full runs, recorded in docs/benchmarks.md.

use epidemic_tests::{epidemic, sqlite};
use serde_json::Value;

#[test]
fn quick_bench_runs_and_cleans_up_on_sqlite() {
    let tmp = tempfile::tempdir().unwrap();
    let db = sqlite::create_db(
        tmp.path(),
        "app",
        "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT);",
    );
    let config = tmp.path().join("epidemic.toml");
    std::fs::write(
        &config,
        format!("[database]\nurl = {:?}\n", sqlite::url(&db)),
    )
    .unwrap();
    let before = sqlite::objects(&db);

    let out = epidemic(
        &config,
        &[
            "bench",
            "--quick",
            "--json",
            "--compare-filter",
            "id % 10 == 0",
            "--compare-handler-batch",
            "1",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).expect("bench --json prints JSON");
    assert_eq!(r["backend"], "sqlite");
    assert_eq!(r["quick"], true);
    for key in [
        "latency_ms_p50",
        "latency_ms_p99",
        "drain_per_s",
        "write_ratio",
        "idle_cpu_percent",
    ] {
        assert!(
            r[key].as_f64().is_some_and(|v| v.is_finite() && v >= 0.0),
            "{key}: {r}"
        );
    }
    assert!(r["drain_per_s"].as_f64().unwrap() > 0.0);
    // The side-by-side drains ran: a tenth of the changes passed the filter.
    let drained = r["drain_changes"].as_u64().unwrap();
    assert_eq!(
        r["drain_filtered"]["handed"].as_u64(),
        Some(drained / 10),
        "{r}"
    );
    assert!(r["drain_filtered"]["drain_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(r["drain_capped"]["handler_batch"], 1);
    assert!(r["write_watched"]["rows"].as_u64().unwrap() > 0);
    // SQLite declares one option set worth comparing: no pacing of a dense stream's reads.
    assert_eq!(r["write_variants"][0]["label"], "linger 0", "{r}");
    assert!(
        r["write_variants"][0]["write"]["rows"]
            .as_u64()
            .is_some_and(|n| n > 0),
        "the linger-0 measurement ran: {r}"
    );
    assert_eq!(sqlite::objects(&db), before, "bench left something behind");

    // The human table names every measurement.
    let out = epidemic(&config, &["bench", "--quick"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "latency p50",
        "drain rate",
        "unwatched",
        "watched",
        "idle CPU",
        "peak RSS",
    ] {
        assert!(text.contains(needle), "{needle} missing:\n{text}");
    }
    assert_eq!(sqlite::objects(&db), before);
}
