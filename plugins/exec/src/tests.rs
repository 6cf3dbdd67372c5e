//! The handler driven through the SDK's test harness, running real commands.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use epidemic_plugin_sdk::testing::{delete, insert, keyed, update, Harness};
use epidemic_plugin_sdk::{Context, Handler, HandlerError, Logger, Op, Value};
use serde_json::json;

use crate::{inherited_epidemic_vars, ExecHandler};

fn handler(config: serde_json::Value) -> Harness<ExecHandler> {
    Harness::new(config).unwrap()
}

/// A handler running `script` with `sh -c`, with `$OUT` set to `out`.
fn shell(out: &Path, script: &str) -> Harness<ExecHandler> {
    handler(json!({
        "table": "users",
        "columns": ["name", "quota"],
        "command": script,
        "env": { "OUT": out },
    }))
}

fn user(name: &str, quota: i64) -> [(&'static str, Value); 2] {
    [("name", name.into()), ("quota", quota.into())]
}

/// The environment a command printed with `env`.
fn read_env(path: &Path) -> BTreeMap<String, String> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn retryable(result: Result<bool, HandlerError>) -> String {
    match result {
        Err(HandlerError::Retryable(msg)) => msg,
        other => panic!("expected a retryable error, got {other:?}"),
    }
}

fn permanent(result: Result<bool, HandlerError>) -> String {
    match result {
        Err(HandlerError::Permanent(msg)) => msg,
        other => panic!("expected a permanent error, got {other:?}"),
    }
}

#[test]
fn subscribes_as_configured() {
    let h = handler(json!({
        "table": "users", "columns": ["name"], "ops": ["insert", "DELETE"], "command": ["true"],
    }));
    let subs = h.subscriptions();
    assert_eq!(subs.len(), 1);
    assert_eq!(subs[0].table, "users");
    assert_eq!(subs[0].columns, ["name"]);
    assert!(subs[0].ops.contains(Op::Insert));
    assert!(!subs[0].ops.contains(Op::Update));
    assert!(subs[0].ops.contains(Op::Delete));
    assert_eq!(ExecHandler::NAME, "exec");
}

#[test]
fn change_arrives_as_json_on_stdin_and_in_the_environment() {
    let tmp = tempfile::tempdir().unwrap();
    let mut h = handler(json!({
        "table": "users",
        "columns": ["name", "quota"],
        "command": ["/bin/sh", "-c", "cat > \"$OUT/stdin.json\" && env > \"$OUT/env.txt\""],
        "env": { "OUT": tmp.path(), "REALM": "example.org" },
    }));
    let change = insert("users", &user("ann", 5));
    let id = change.id;
    assert!(h.send(change).unwrap());

    let text = fs::read_to_string(tmp.path().join("stdin.json")).unwrap();
    assert!(
        text.ends_with('\n') && text.lines().count() == 1,
        "{text:?}"
    );
    let stdin: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(stdin["id"], id);
    assert_eq!(stdin["table"], "users");
    assert_eq!(stdin["op"], "INSERT");
    assert_eq!(stdin["old"], serde_json::Value::Null);
    assert_eq!(stdin["new"], json!({ "name": "ann", "quota": 5 }));

    let env = read_env(&tmp.path().join("env.txt"));
    assert_eq!(env["EPIDEMIC_OP"], "INSERT");
    assert_eq!(env["EPIDEMIC_TABLE"], "users");
    assert_eq!(env["EPIDEMIC_CHANGE_ID"], id.to_string());
    assert_eq!(env["EPIDEMIC_NEW_NAME"], "ann");
    assert_eq!(env["EPIDEMIC_NEW_QUOTA"], "5");
    assert!(!env.contains_key("EPIDEMIC_OLD_NAME"));
    assert_eq!(env["REALM"], "example.org");
    // The daemon's own environment is inherited.
    assert!(env.contains_key("PATH"));
}

#[test]
fn string_command_runs_with_sh_and_sees_old_and_new_values() {
    let tmp = tempfile::tempdir().unwrap();
    let mut h = shell(
        tmp.path(),
        "printf '%s %s>%s' \"$EPIDEMIC_OP\" \"$EPIDEMIC_OLD_NAME\" \"$EPIDEMIC_NEW_NAME\" > \"$OUT/out\"",
    );
    assert!(h
        .send(update("users", &user("ann", 5), &user("anna", 5)))
        .unwrap());
    assert_eq!(
        fs::read_to_string(tmp.path().join("out")).unwrap(),
        "UPDATE ann>anna"
    );
    assert!(h.send(delete("users", &user("anna", 5))).unwrap());
    assert_eq!(
        fs::read_to_string(tmp.path().join("out")).unwrap(),
        "DELETE anna>"
    );
}

#[test]
fn the_command_learns_the_key_the_stable_id_the_attempt_and_who_runs_it() {
    let tmp = tempfile::tempdir().unwrap();
    let mut h = Harness::<ExecHandler>::with_context(
        json!({
            "table": "users", "columns": ["name"],
            "command": ["/bin/sh", "-c", "env > \"$OUT/env.txt\""], "env": { "OUT": tmp.path() },
        }),
        &Context::new("mx3", "provision", Logger::stderr()),
    )
    .unwrap();
    let change = keyed(
        insert("users", &[("id", 42.into()), ("name", "ann".into())]),
        &["id"],
    );
    let stable = change.stable_id.clone();
    assert!(h.send(change).unwrap());
    let env = read_env(&tmp.path().join("env.txt"));
    assert_eq!(env["EPIDEMIC_KEY_ID"], "42");
    assert_eq!(env["EPIDEMIC_STABLE_ID"], stable);
    assert_eq!(env["EPIDEMIC_ATTEMPT"], "1");
    assert_eq!(env["EPIDEMIC_DAEMON"], "mx3");
    assert_eq!(env["EPIDEMIC_HANDLER"], "provision");
}

#[test]
fn column_env_can_be_turned_off() {
    let tmp = tempfile::tempdir().unwrap();
    let mut h = handler(json!({
        "table": "users", "columns": ["name"], "column_env": false,
        "command": ["/bin/sh", "-c", "env > \"$OUT/env.txt\""], "env": { "OUT": tmp.path() },
    }));
    h.send(insert("users", &[("name", "ann".into())])).unwrap();
    let env = read_env(&tmp.path().join("env.txt"));
    assert!(!env.contains_key("EPIDEMIC_NEW_NAME"));
    assert_eq!(env["EPIDEMIC_OP"], "INSERT");
}

#[test]
fn plain_argv_command_like_cat_succeeds() {
    let mut h = handler(json!({ "table": "users", "columns": ["name"], "command": ["cat"] }));
    assert!(h.send(insert("users", &[("name", "ann".into())])).unwrap());
}

#[test]
fn large_values_stay_out_of_the_environment_and_unread_stdin_is_fine() {
    let tmp = tempfile::tempdir().unwrap();
    // The command does not read its 1 MiB of input.
    let mut h = shell(tmp.path(), "env > \"$OUT/env.txt\"");
    let big = "x".repeat(1 << 20);
    assert!(h
        .send(insert(
            "users",
            &[("name", big.into()), ("quota", 1.into())]
        ))
        .unwrap());
    let env = read_env(&tmp.path().join("env.txt"));
    assert!(!env.contains_key("EPIDEMIC_NEW_NAME"));
    assert_eq!(env["EPIDEMIC_NEW_QUOTA"], "1");
}

#[test]
fn non_zero_exit_is_retryable_with_status_and_stderr() {
    let tmp = tempfile::tempdir().unwrap();
    let mut h = shell(
        tmp.path(),
        "echo starting; echo first >&2; echo 'disk on fire' >&2; exit 3",
    );
    let msg = retryable(h.send(insert("users", &user("ann", 1))));
    assert!(msg.contains("exited with status 3"), "{msg}");
    assert!(msg.contains("first | disk on fire"), "{msg}");
    let stderr = msg.split_once("stderr: ").unwrap().1;
    assert_eq!(
        stderr, "first | disk on fire",
        "stdout leaked into the message"
    );
    assert!(msg.contains("/bin/sh -c"), "{msg}");
}

#[test]
fn permanent_exit_codes_are_permanent() {
    let mut h = handler(json!({
        "table": "users", "columns": ["name"], "command": "exit \"$EPIDEMIC_NEW_NAME\"",
        "permanent_exit_codes": [65],
    }));
    let msg = permanent(h.send(insert("users", &[("name", "65".into())])));
    assert!(msg.contains("status 65"), "{msg}");
    retryable(h.send(insert("users", &[("name", "75".into())])));
    retryable(h.send(insert("users", &[("name", "1".into())])));
}

#[test]
fn retry_exit_codes_make_every_other_status_permanent() {
    let mut h = handler(json!({
        "table": "users", "columns": ["name"], "command": "exit \"$EPIDEMIC_NEW_NAME\"",
        "retry_exit_codes": [75],
    }));
    retryable(h.send(insert("users", &[("name", "75".into())])));
    permanent(h.send(insert("users", &[("name", "3".into())])));
    assert!(h.send(insert("users", &[("name", "0".into())])).unwrap());
}

#[test]
fn timeout_kills_the_command() {
    let mut h = handler(json!({
        "table": "users", "columns": ["name"], "command": ["sleep", "5"], "timeout_secs": 1,
    }));
    let started = Instant::now();
    let msg = retryable(h.send(insert("users", &[("name", "ann".into())])));
    assert!(msg.contains("timed out after 1 s"), "{msg}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn death_by_signal_is_retryable() {
    let mut h = handler(json!({ "table": "users", "columns": ["name"], "command": "kill -9 $$" }));
    let msg = retryable(h.send(insert("users", &[("name", "ann".into())])));
    assert!(msg.contains("signal 9"), "{msg}");
}

#[test]
fn missing_program_is_an_error_naming_it() {
    let mut h = handler(json!({
        "table": "users", "columns": ["name"], "command": ["/nonexistent/provision", "--quiet"],
    }));
    let msg = retryable(h.send(insert("users", &[("name", "ann".into())])));
    assert!(
        msg.contains("cannot run `/nonexistent/provision --quiet`"),
        "{msg}"
    );
}

#[test]
fn missing_working_dir_is_named() {
    let mut h = handler(json!({
        "table": "users", "columns": ["name"], "command": ["true"],
        "working_dir": "/nonexistent/epidemic-dir",
    }));
    let msg = retryable(h.send(insert("users", &[("name", "ann".into())])));
    assert!(
        msg.contains("cannot run `true` in /nonexistent/epidemic-dir"),
        "{msg}"
    );
}

#[test]
fn only_subscribed_ops_and_column_changes_are_delivered() {
    let tmp = tempfile::tempdir().unwrap();
    let mut h = handler(json!({
        "table": "users", "columns": ["name"], "ops": ["update"],
        "command": "echo \"$EPIDEMIC_NEW_NAME\" >> \"$OUT/log\"", "env": { "OUT": tmp.path() },
    }));
    assert!(!h.send(insert("users", &user("ann", 1))).unwrap());
    assert!(!h
        .send(update("users", &user("ann", 1), &user("ann", 2)))
        .unwrap());
    assert!(h
        .send(update("users", &user("ann", 2), &user("bob", 2)))
        .unwrap());
    assert!(!h.send(delete("users", &user("bob", 2))).unwrap());
    assert_eq!(fs::read_to_string(tmp.path().join("log")).unwrap(), "bob\n");
}

#[test]
fn working_dir_is_used() {
    let tmp = tempfile::tempdir().unwrap();
    let mut h = handler(json!({
        "table": "users", "columns": ["name"], "command": "pwd > out", "working_dir": tmp.path(),
    }));
    h.send(insert("users", &[("name", "ann".into())])).unwrap();
    let pwd = fs::read_to_string(tmp.path().join("out")).unwrap();
    assert_eq!(
        Path::new(pwd.trim()).canonicalize().unwrap(),
        tmp.path().canonicalize().unwrap()
    );
}

#[test]
fn inherited_epidemic_variables_are_dropped() {
    let names = [
        "PATH",
        "EPIDEMIC_DATABASE__URL",
        "EPIDEMIC",
        "HOME",
        "EPIDEMIC_X",
    ]
    .map(OsString::from);
    let dropped = inherited_epidemic_vars(names.into_iter());
    assert_eq!(
        dropped,
        ["EPIDEMIC_DATABASE__URL", "EPIDEMIC_X"].map(OsString::from)
    );
}

#[test]
fn bad_configs_are_refused() {
    let ok = json!({ "table": "users", "columns": ["name"], "command": ["true"] });
    let with = |key: &str, value: serde_json::Value| {
        let mut c = ok.clone();
        c[key] = value;
        c
    };
    let without = |key: &str| {
        let mut c = ok.clone();
        c.as_object_mut().unwrap().remove(key);
        c
    };
    let cases = [
        (without("table"), "table"),
        (without("columns"), "columns"),
        (without("command"), "command"),
        (with("table", json!("")), "table"),
        (with("columns", json!([])), "columns"),
        (with("columns", json!(["a", "a"])), "twice"),
        (with("columns", json!(["a-b", "a_b"])), "column_env"),
        (with("command", json!([])), "program"),
        (with("command", json!([""])), "program"),
        (with("command", json!("  ")), "empty"),
        (with("command", json!(42)), "list of strings"),
        (with("ops", json!([])), "ops"),
        (with("ops", json!(["upsert"])), "upsert"),
        (with("timeout_secs", json!(0)), "timeout_secs"),
        (with("env", json!({ "EPIDEMIC_OP": "x" })), "EPIDEMIC_"),
        (with("env", json!({ "A=B": "x" })), "A=B"),
        (
            with("permanent_exit_codes", json!([0])),
            "between 1 and 255",
        ),
        (with("retry_exit_codes", json!([300])), "between 1 and 255"),
        (
            json!({
                "table": "users", "columns": ["name"], "command": ["true"],
                "retry_exit_codes": [75], "permanent_exit_codes": [75],
            }),
            "both",
        ),
        (with("bogus", json!(1)), "bogus"),
    ];
    for (config, expected) in cases {
        match Harness::<ExecHandler>::new(config.clone()) {
            Err(HandlerError::Permanent(msg)) => assert!(msg.contains(expected), "{config}: {msg}"),
            Err(e) => panic!("{config}: unexpected error {e:?}"),
            Ok(_) => panic!("{config} was accepted"),
        }
    }
}
