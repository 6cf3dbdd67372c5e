//! The handler driven through the SDK's test harness against a temporary directory.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use epidemic_plugin_sdk::abi::abi_stable::sabi_trait::TD_Opaque;
use epidemic_plugin_sdk::abi::abi_stable::std_types::{RArc, RStr, RString, RVec, Tuple2};
use epidemic_plugin_sdk::abi::{RLevel, RawLogger, RawLogger_TO};
use epidemic_plugin_sdk::testing::{delete, insert, keyed, update, Harness};
use epidemic_plugin_sdk::{
    Change, Context, Handler, HandlerError, Logger, Op, SnapshotEvent, Value,
};
use serde_json::json;
use tempfile::TempDir;

use crate::MaildirHandler;

const TABLE: &str = "mail_users";

/// A temporary root holding `mail/` (the base_dir) and nothing else, so a test can check
/// that nothing was created beside it.
struct Fixture {
    _tmp: TempDir,
    root: PathBuf,
    base: PathBuf,
    handler: Harness<MaildirHandler>,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture::with(json!({}))
    }

    fn with(extra: serde_json::Value) -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_owned();
        let base = root.join("mail");
        fs::create_dir(&base).unwrap();
        let mut config = json!({ "base_dir": base });
        for (k, v) in extra.as_object().unwrap() {
            config[k] = v.clone();
        }
        let handler = Harness::new(config).unwrap();
        Fixture {
            _tmp: tmp,
            root,
            base,
            handler,
        }
    }

    fn send(&mut self, change: Change) -> Result<(), HandlerError> {
        let delivered = self.handler.send(change)?;
        assert!(delivered, "the change was not delivered");
        Ok(())
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.base.join(rel)
    }

    fn maildirsize(&self, rel: &str) -> Option<String> {
        fs::read_to_string(self.path(rel).join("maildirsize")).ok()
    }

    /// Every path under the root, relative to it.
    fn everything(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        walk(&self.root, &self.root, &mut out);
        out
    }

    /// The Maildirs under base_dir (directories with a `cur`), outside the archive.
    fn maildirs(&self) -> BTreeSet<String> {
        self.everything()
            .into_iter()
            .filter_map(|p| p.strip_suffix("/cur").map(str::to_owned))
            .filter_map(|p| p.strip_prefix("mail/").map(str::to_owned))
            .filter(|p| !p.starts_with(".archive"))
            .collect()
    }
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        out.insert(
            path.strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned(),
        );
        if fs::symlink_metadata(&path).unwrap().is_dir() {
            walk(root, &path, out);
        }
    }
}

fn row(username: impl Into<Value>, quota: Option<i64>) -> [(&'static str, Value); 2] {
    [("username", username.into()), ("quota_bytes", quota.into())]
}

fn add(username: &str, quota: Option<i64>) -> Change {
    insert(TABLE, &row(username, quota))
}

fn change(old: (&str, Option<i64>), new: (&str, Option<i64>)) -> Change {
    update(TABLE, &row(old.0, old.1), &row(new.0, new.1))
}

fn remove(username: &str, quota: Option<i64>) -> Change {
    delete(TABLE, &row(username, quota))
}

fn assert_permanent(result: Result<(), HandlerError>) -> String {
    match result {
        Err(HandlerError::Permanent(msg)) => msg,
        other => panic!("expected a permanent error, got {other:?}"),
    }
}

fn assert_maildir(dir: &Path) {
    for sub in ["cur", "new", "tmp"] {
        assert!(dir.join(sub).is_dir(), "{} has no {sub}", dir.display());
    }
}

#[test]
fn subscribes_to_username_and_quota_with_every_op() {
    let f = Fixture::new();
    let subs = f.handler.subscriptions();
    assert_eq!(subs.len(), 1);
    assert_eq!(subs[0].table, "mail_users");
    assert_eq!(subs[0].columns, ["username", "quota_bytes"]);
    for op in [Op::Insert, Op::Update, Op::Delete] {
        assert!(subs[0].ops.contains(op));
    }
    assert_eq!(MaildirHandler::NAME, "maildir");
}

#[test]
fn insert_creates_maildir_with_quota() {
    let mut f = Fixture::new();
    f.send(add("ann@example.org", Some(1_000_000))).unwrap();
    let dir = f.path("example.org/ann");
    assert_maildir(&dir);
    assert_eq!(
        f.maildirsize("example.org/ann").as_deref(),
        Some("1000000S\n")
    );
    assert_eq!(
        fs::metadata(&dir).unwrap().permissions().mode() & 0o7777,
        0o700
    );
}

#[test]
fn insert_without_domain_uses_the_bare_username() {
    let mut f = Fixture::new();
    f.send(add("bob", Some(5))).unwrap();
    assert_maildir(&f.path("bob"));
    assert_eq!(f.maildirsize("bob").as_deref(), Some("5S\n"));
}

#[test]
fn insert_with_null_quota_writes_no_maildirsize() {
    let mut f = Fixture::new();
    f.send(add("ann@example.org", None)).unwrap();
    assert_maildir(&f.path("example.org/ann"));
    assert_eq!(f.maildirsize("example.org/ann"), None);
}

#[test]
fn quota_given_as_text_is_accepted() {
    let mut f = Fixture::new();
    let c = insert(
        TABLE,
        &[("username", "ann".into()), ("quota_bytes", "2048".into())],
    );
    f.send(c).unwrap();
    assert_eq!(f.maildirsize("ann").as_deref(), Some("2048S\n"));
}

#[test]
fn repeated_insert_is_idempotent_and_keeps_mail() {
    let mut f = Fixture::new();
    let c = add("ann@example.org", Some(1000));
    f.send(c.clone()).unwrap();
    let dir = f.path("example.org/ann");
    fs::write(dir.join("cur/1.mail"), "hello").unwrap();
    fs::write(dir.join("maildirsize"), "1000S\n5 1\n").unwrap();
    f.send(c).unwrap();
    assert_eq!(fs::read_to_string(dir.join("cur/1.mail")).unwrap(), "hello");
    assert_eq!(
        f.maildirsize("example.org/ann").as_deref(),
        Some("1000S\n5 1\n")
    );
}

#[test]
fn repeated_insert_completes_a_half_made_maildir() {
    let mut f = Fixture::new();
    fs::create_dir_all(f.path("example.org/ann/cur")).unwrap();
    f.send(add("ann@example.org", Some(7))).unwrap();
    assert_maildir(&f.path("example.org/ann"));
    assert_eq!(f.maildirsize("example.org/ann").as_deref(), Some("7S\n"));
}

#[test]
fn quota_update_rewrites_maildirsize_keeping_usage_lines() {
    let mut f = Fixture::new();
    f.send(add("ann@example.org", Some(1000))).unwrap();
    let dir = f.path("example.org/ann");
    fs::write(dir.join("maildirsize"), "1000S\n123 4\n-5 -1\n").unwrap();
    f.send(change(
        ("ann@example.org", Some(1000)),
        ("ann@example.org", Some(2000)),
    ))
    .unwrap();
    assert_eq!(
        f.maildirsize("example.org/ann").as_deref(),
        Some("2000S\n123 4\n-5 -1\n")
    );
    // The temporary file was renamed into place, not left behind.
    let names: BTreeSet<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        ["cur", "maildirsize", "new", "tmp"]
            .map(String::from)
            .into()
    );
}

#[test]
fn quota_update_to_and_from_null() {
    let mut f = Fixture::new();
    f.send(add("ann", Some(1000))).unwrap();
    f.send(change(("ann", Some(1000)), ("ann", None))).unwrap();
    assert_eq!(f.maildirsize("ann"), None);
    f.send(change(("ann", None), ("ann", Some(3)))).unwrap();
    assert_eq!(f.maildirsize("ann").as_deref(), Some("3S\n"));
}

#[test]
fn update_of_a_missing_maildir_creates_it() {
    let mut f = Fixture::new();
    f.send(change(
        ("ann@example.org", Some(1)),
        ("ann@example.org", Some(2)),
    ))
    .unwrap();
    assert_maildir(&f.path("example.org/ann"));
    assert_eq!(f.maildirsize("example.org/ann").as_deref(), Some("2S\n"));
}

#[test]
fn rename_moves_the_maildir_and_removes_the_emptied_domain() {
    let mut f = Fixture::new();
    f.send(add("ann@old.org", Some(10))).unwrap();
    f.send(add("bob@old.org", Some(10))).unwrap();
    fs::write(f.path("old.org/ann/cur/1.mail"), "hi").unwrap();

    f.send(change(
        ("ann@old.org", Some(10)),
        ("anna@new.org", Some(10)),
    ))
    .unwrap();
    assert!(!f.path("old.org/ann").exists());
    assert_eq!(
        fs::read_to_string(f.path("new.org/anna/cur/1.mail")).unwrap(),
        "hi"
    );
    assert_eq!(f.maildirsize("new.org/anna").as_deref(), Some("10S\n"));
    assert!(f.path("old.org").is_dir(), "bob still lives in old.org");

    f.send(change(("bob@old.org", Some(10)), ("bob", Some(10))))
        .unwrap();
    assert!(
        !f.path("old.org").exists(),
        "the empty domain directory was left"
    );
    assert_maildir(&f.path("bob"));
}

#[test]
fn rename_and_quota_change_in_one_update() {
    let mut f = Fixture::new();
    f.send(add("ann@example.org", Some(10))).unwrap();
    f.send(change(
        ("ann@example.org", Some(10)),
        ("ann@example.com", Some(20)),
    ))
    .unwrap();
    assert_eq!(f.maildirs(), ["example.com/ann".to_owned()].into());
    assert_eq!(f.maildirsize("example.com/ann").as_deref(), Some("20S\n"));
}

#[test]
fn repeated_rename_is_done() {
    let mut f = Fixture::new();
    f.send(add("ann@example.org", Some(10))).unwrap();
    let c = change(("ann@example.org", Some(10)), ("ann@example.com", Some(10)));
    f.send(c.clone()).unwrap();
    fs::write(f.path("example.com/ann/new/1.mail"), "hi").unwrap();
    f.send(c).unwrap();
    assert_eq!(f.maildirs(), ["example.com/ann".to_owned()].into());
    assert!(f.path("example.com/ann/new/1.mail").exists());
}

#[test]
fn rename_when_neither_maildir_exists_creates_the_new_one() {
    let mut f = Fixture::new();
    f.send(change(
        ("ann@example.org", None),
        ("ann@example.com", Some(9)),
    ))
    .unwrap();
    assert_eq!(f.maildirs(), ["example.com/ann".to_owned()].into());
    assert_eq!(f.maildirsize("example.com/ann").as_deref(), Some("9S\n"));
}

#[test]
fn rename_from_null_username_creates_the_new_one() {
    let mut f = Fixture::new();
    let c = update(
        TABLE,
        &[("username", Value::Null), ("quota_bytes", Value::Null)],
        &row("ann@example.org", None),
    );
    f.send(c).unwrap();
    assert_eq!(f.maildirs(), ["example.org/ann".to_owned()].into());
}

#[test]
fn rename_onto_an_existing_maildir_is_permanent_and_moves_nothing() {
    let mut f = Fixture::new();
    f.send(add("ann@example.org", None)).unwrap();
    f.send(add("bob@example.org", None)).unwrap();
    fs::write(f.path("example.org/ann/cur/a"), "a").unwrap();
    fs::write(f.path("example.org/bob/cur/b"), "b").unwrap();
    let msg =
        assert_permanent(f.send(change(("ann@example.org", None), ("bob@example.org", None))));
    assert!(msg.contains("already exists"), "{msg}");
    assert!(f.path("example.org/ann/cur/a").exists());
    assert!(f.path("example.org/bob/cur/b").exists());
}

#[test]
fn rename_into_itself_is_permanent() {
    let mut f = Fixture::new();
    f.send(add("bob", None)).unwrap();
    assert_permanent(f.send(change(("bob", None), ("ann@bob", None))));
    assert_eq!(f.maildirs(), ["bob".to_owned()].into());
}

#[test]
fn delete_removes_the_maildir_and_the_emptied_domain() {
    let mut f = Fixture::new();
    f.send(add("ann@example.org", Some(1))).unwrap();
    fs::write(f.path("example.org/ann/cur/1.mail"), "hi").unwrap();
    let c = remove("ann@example.org", Some(1));
    f.send(c.clone()).unwrap();
    assert!(!f.path("example.org").exists());
    // Delivered again (at-least-once): already done.
    f.send(c).unwrap();
    assert_eq!(f.everything(), ["mail".to_owned()].into());
}

#[test]
fn delete_of_a_bare_username_never_takes_a_domain() {
    let mut f = Fixture::new();
    f.send(add("ann@example.org", None)).unwrap();
    let msg = assert_permanent(f.send(remove("example.org", None)));
    assert!(
        msg.contains("not a Maildir") || msg.contains("nor a Maildir"),
        "{msg}"
    );
    assert_maildir(&f.path("example.org/ann"));
}

#[test]
fn archive_moves_the_maildir_under_a_unique_name() {
    let mut f = Fixture::with(json!({ "on_delete": "archive" }));
    f.send(add("ann@example.org", Some(1))).unwrap();
    fs::write(f.path("example.org/ann/cur/1.mail"), "first").unwrap();
    let c = remove("ann@example.org", Some(1));
    let id = c.id;
    f.send(c.clone()).unwrap();
    let first = f.path(&format!(".archive/example.org/ann-{id}"));
    assert_eq!(
        fs::read_to_string(first.join("cur/1.mail")).unwrap(),
        "first"
    );
    assert!(!f.path("example.org").exists());

    // The same change again finds nothing to archive.
    f.send(c.clone()).unwrap();
    assert!(!f.path(&format!(".archive/example.org/ann-{id}.2")).exists());

    // A new Maildir archived under a change id already used gets a suffix, never
    // overwriting the first archive.
    f.send(add("ann@example.org", Some(1))).unwrap();
    f.send(c).unwrap();
    assert!(f
        .path(&format!(".archive/example.org/ann-{id}.2/cur"))
        .is_dir());
    assert_eq!(
        fs::read_to_string(first.join("cur/1.mail")).unwrap(),
        "first"
    );

    // A bare username lands at the top of archive_dir.
    f.send(add("bob", None)).unwrap();
    let c = remove("bob", None);
    let id = c.id;
    f.send(c).unwrap();
    assert!(f.path(&format!(".archive/bob-{id}/cur")).is_dir());
    assert!(f.maildirs().is_empty());
}

#[test]
fn archive_dir_can_be_elsewhere_on_the_same_file_system() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("mail");
    let archive = tmp.path().join("attic/old-mail");
    fs::create_dir(&base).unwrap();
    let mut h = Harness::<MaildirHandler>::new(json!({
        "base_dir": base, "on_delete": "archive", "archive_dir": archive,
    }))
    .unwrap();
    h.send(add("ann", None)).unwrap();
    let c = remove("ann", None);
    let id = c.id;
    h.send(c).unwrap();
    assert!(archive.join(format!("ann-{id}/cur")).is_dir());
}

#[test]
fn refused_usernames_are_permanent_and_touch_nothing() {
    let mut f = Fixture::with(json!({ "on_delete": "archive" }));
    let bad = [
        "",
        ".",
        "..",
        "../escape",
        "../../escape@x",
        "a/../../escape",
        "/tmp/escape",
        "x@/tmp",
        "x@..",
        "x@a/b",
        "a\\b",
        "a\0b",
        ".archive",
        "ann@.archive",
        "a@b@c",
        "@example.org",
        "ann@",
    ];
    for name in bad {
        assert_permanent(f.send(add(name, Some(1))));
        assert_permanent(f.send(change((name, Some(1)), (name, Some(2)))));
        assert_permanent(f.send(change(("ok", Some(1)), (name, Some(1)))));
        assert_permanent(f.send(remove(name, Some(1))));
    }
    assert_eq!(f.everything(), ["mail".to_owned()].into());
}

#[test]
fn null_or_non_text_usernames_are_permanent() {
    let mut f = Fixture::new();
    for username in [Value::Null, Value::Int(7), Value::Bytes(b"ann".to_vec())] {
        let r = [("username", username.clone()), ("quota_bytes", Value::Null)];
        let msg = assert_permanent(f.send(insert(TABLE, &r)));
        assert!(msg.contains("username"), "{msg}");
        assert_permanent(f.send(delete(TABLE, &r)));
    }
    assert_eq!(f.everything(), ["mail".to_owned()].into());
}

#[test]
fn invalid_quotas_are_permanent_and_touch_nothing() {
    let mut f = Fixture::new();
    for quota in [
        Value::Int(-1),
        "lots".into(),
        Value::Float(1.5),
        Value::Bytes(vec![1]),
    ] {
        let r = [
            ("username", "ann@example.org".into()),
            ("quota_bytes", quota),
        ];
        let msg = assert_permanent(f.send(insert(TABLE, &r)));
        assert!(msg.contains("quota_bytes"), "{msg}");
    }
    assert_eq!(f.everything(), ["mail".to_owned()].into());
}

#[test]
fn symbolic_links_are_not_followed() {
    let mut f = Fixture::new();
    let outside = f.root.join("outside");
    fs::create_dir(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, f.path("evil.org")).unwrap();
    std::os::unix::fs::symlink(&outside, f.path("eve")).unwrap();
    assert_permanent(f.send(add("ann@evil.org", None)));
    assert_permanent(f.send(add("eve", None)));
    assert_permanent(f.send(remove("eve", None)));
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
    assert!(f.path("eve").is_symlink());
}

#[test]
fn missing_base_dir_is_retryable_and_not_recreated() {
    let mut f = Fixture::new();
    fs::remove_dir(&f.base).unwrap();
    match f.send(add("ann@example.org", None)) {
        Err(HandlerError::Retryable(msg)) => assert!(msg.contains("base_dir"), "{msg}"),
        other => panic!("expected a retryable error, got {other:?}"),
    }
    assert!(!f.base.exists());
}

#[test]
fn dir_mode_and_owner_are_applied() {
    let tmp = tempfile::tempdir().unwrap();
    let meta = fs::metadata(tmp.path()).unwrap();
    let mut h = Harness::<MaildirHandler>::new(json!({
        "base_dir": tmp.path(), "dir_mode": "0750", "uid": meta.uid(), "gid": meta.gid(),
    }))
    .unwrap();
    h.send(add("ann@example.org", Some(1))).unwrap();
    for rel in ["example.org", "example.org/ann", "example.org/ann/cur"] {
        let m = fs::metadata(tmp.path().join(rel)).unwrap();
        assert_eq!(m.permissions().mode() & 0o7777, 0o750, "{rel}");
        assert_eq!((m.uid(), m.gid()), (meta.uid(), meta.gid()));
    }
    let quota_file = fs::metadata(tmp.path().join("example.org/ann/maildirsize")).unwrap();
    assert_eq!(quota_file.permissions().mode() & 0o777, 0o600);
}

#[test]
fn bad_configs_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().to_str().unwrap().to_owned();
    let cases = [
        (json!({}), "base_dir"),
        (json!({ "base_dir": "relative/mail" }), "absolute"),
        (json!({ "base_dir": format!("{base}/missing") }), "missing"),
        (json!({ "base_dir": base, "bogus": 1 }), "bogus"),
        (json!({ "base_dir": base, "on_delete": "shred" }), "shred"),
        (
            json!({ "base_dir": base, "orphans": "delete" }),
            "expected one of `keep`, `archive`, `remove`",
        ),
        (
            json!({ "base_dir": base, "archive_dir": format!("{base}/archive") }),
            "dot",
        ),
        (
            json!({ "base_dir": base, "archive_dir": base }),
            "archive_dir",
        ),
        (json!({ "base_dir": format!("{base}/../x") }), ".."),
        (
            json!({ "base_dir": base, "quota_column": "username" }),
            "same column",
        ),
        (json!({ "base_dir": base, "dir_mode": "0644" }), "dir_mode"),
        (json!({ "base_dir": base, "dir_mode": "rwx" }), "dir_mode"),
    ];
    for (config, expected) in cases {
        match Harness::<MaildirHandler>::new(config.clone()) {
            Err(HandlerError::Permanent(msg)) => assert!(msg.contains(expected), "{config}: {msg}"),
            Err(e) => panic!("{config}: unexpected error {e:?}"),
            Ok(_) => panic!("{config} was accepted"),
        }
    }
}

#[test]
fn custom_table_and_columns() {
    let tmp = tempfile::tempdir().unwrap();
    let mut h = Harness::<MaildirHandler>::new(json!({
        "base_dir": tmp.path(), "table": "accounts", "username_column": "email",
        "quota_column": "quota",
    }))
    .unwrap();
    let c = insert(
        "accounts",
        &[("email", "ann@example.org".into()), ("quota", 5.into())],
    );
    assert!(h.send(c).unwrap());
    assert_eq!(
        fs::read_to_string(tmp.path().join("example.org/ann/maildirsize")).unwrap(),
        "5S\n"
    );
    assert!(
        !h.send(add("bob", None)).unwrap(),
        "another table was delivered"
    );
}

/// A realistic stream, with some changes delivered twice, ends with exactly the Maildirs
/// of the users left in the table.
#[test]
fn mixed_stream_ends_with_the_expected_tree() {
    let mut f = Fixture::new();
    let stream = vec![
        add("ann@example.org", Some(100)),
        add("bob@example.org", None),
        add("carl@example.com", Some(300)),
        add("dora", Some(400)),
        change(("bob@example.org", None), ("bob@example.org", Some(200))),
        change(
            ("ann@example.org", Some(100)),
            ("ann@example.net", Some(100)),
        ),
        remove("carl@example.com", Some(300)),
        add("erin@example.com", Some(500)),
        change(("dora", Some(400)), ("dora@example.com", Some(450))),
        add("fred@example.org", None),
        remove("fred@example.org", None),
        change(("erin@example.com", Some(500)), ("erin@example.com", None)),
    ];
    for (i, c) in stream.into_iter().enumerate() {
        f.send(c.clone()).unwrap();
        // Every third change is delivered twice, as after a crash before the ack.
        if i % 3 == 0 {
            f.send(c).unwrap();
        }
    }
    let expected: BTreeSet<String> = [
        "example.net/ann",
        "example.org/bob",
        "example.com/erin",
        "example.com/dora",
    ]
    .map(String::from)
    .into();
    assert_eq!(f.maildirs(), expected);
    assert_eq!(f.maildirsize("example.net/ann").as_deref(), Some("100S\n"));
    assert_eq!(f.maildirsize("example.org/bob").as_deref(), Some("200S\n"));
    assert_eq!(f.maildirsize("example.com/dora").as_deref(), Some("450S\n"));
    assert_eq!(f.maildirsize("example.com/erin"), None);
    let top: BTreeSet<String> = fs::read_dir(&f.base)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        top,
        ["example.com", "example.net", "example.org"]
            .map(String::from)
            .into()
    );
}

// Orphans: Maildirs no row backs at the end of a whole snapshot of the table.

/// The lines a handler logs, caught by a logger that stands in for the daemon's.
#[derive(Clone, Default)]
struct CapturedLog(Arc<Mutex<Vec<(RLevel, String)>>>);

impl RawLogger for CapturedLog {
    fn enabled(&self, _: RLevel) -> bool {
        true
    }

    fn log(
        &self,
        level: RLevel,
        _: RStr<'_>,
        message: RStr<'_>,
        fields: RVec<Tuple2<RString, RString>>,
    ) {
        let mut line = message.as_str().to_owned();
        for Tuple2(k, v) in fields.iter() {
            line.push_str(&format!(" {k}={v}"));
        }
        self.0.lock().unwrap().push((level, line));
    }
}

impl CapturedLog {
    fn logger(&self) -> Logger {
        Logger::from_host(RawLogger_TO::from_ptr(RArc::new(self.clone()), TD_Opaque))
    }

    fn warnings(&self) -> Vec<String> {
        let lines = self.0.lock().unwrap();
        lines
            .iter()
            .filter(|(level, _)| *level == RLevel::Warn)
            .map(|(_, line)| line.clone())
            .collect()
    }

    fn all(&self) -> Vec<String> {
        let lines = self.0.lock().unwrap();
        lines.iter().map(|(_, line)| line.clone()).collect()
    }

    /// The warnings about one Maildir: those naming its path as a field.
    fn about(&self, path: &Path) -> Vec<String> {
        let field = format!("path={}", path.display());
        self.warnings()
            .into_iter()
            .filter(|l| l.split(' ').any(|w| w == field))
            .collect()
    }

    /// The summary line of the orphan check.
    fn summary(&self) -> String {
        let found: Vec<String> = self
            .all()
            .into_iter()
            .filter(|l| l.starts_with("orphan check done"))
            .collect();
        assert_eq!(found.len(), 1, "expected one summary line: {found:#?}");
        found[0].clone()
    }
}

/// A fixture whose handler logs into a [`CapturedLog`], as `[[handler]]` `mx-maildir`.
fn logged(extra: serde_json::Value) -> (Fixture, CapturedLog) {
    let log = CapturedLog::default();
    let mut f = Fixture::with(extra.clone());
    let mut config = json!({ "base_dir": f.base });
    for (k, v) in extra.as_object().unwrap() {
        config[k] = v.clone();
    }
    let ctx = Context::new("test", "mx-maildir", log.logger());
    f.handler = Harness::with_context(config, &ctx).unwrap();
    (f, log)
}

fn keyed_row(id: i64, username: &str, quota: Option<i64>) -> [(&'static str, Value); 3] {
    [
        ("id", id.into()),
        ("username", username.into()),
        ("quota_bytes", quota.into()),
    ]
}

/// A row as a snapshot reads it.
fn snapshot_row(id: i64, username: &str, quota: Option<i64>) -> Change {
    keyed(insert(TABLE, &keyed_row(id, username, quota)), &["id"])
}

fn live_add(id: i64, username: &str, quota: Option<i64>) -> Change {
    keyed(insert(TABLE, &keyed_row(id, username, quota)), &["id"])
}

fn live_rename(id: i64, old: &str, new: &str) -> Change {
    keyed(
        update(TABLE, &keyed_row(id, old, None), &keyed_row(id, new, None)),
        &["id"],
    )
}

fn live_remove(id: i64, username: &str) -> Change {
    keyed(delete(TABLE, &keyed_row(id, username, None)), &["id"])
}

fn began(resumed: bool) -> SnapshotEvent {
    SnapshotEvent::Began {
        table: TABLE.to_owned(),
        resumed,
    }
}

fn ended(rows: u64, whole: bool) -> SnapshotEvent {
    SnapshotEvent::Ended {
        table: TABLE.to_owned(),
        rows,
        whole,
    }
}

impl Fixture {
    fn snapshot(&mut self, event: SnapshotEvent) {
        self.handler.snapshot(event).unwrap();
    }

    fn snapshot_row(&mut self, change: Change) {
        assert!(self.handler.send_snapshot_row(change).unwrap());
    }

    /// A Maildir made behind the handler's back (restored from a backup, left from a user
    /// deleted while this host was away), with one mail in it.
    fn leftover(&self, rel: &str) {
        let dir = self.path(rel);
        for sub in ["cur", "new", "tmp"] {
            fs::create_dir_all(dir.join(sub)).unwrap();
        }
        fs::write(dir.join("cur/1.mail"), rel).unwrap();
        age(&dir);
    }

    /// Everything under base_dir/archive whose name starts with `prefix`.
    fn archived(&self, domain: &str, prefix: &str) -> Vec<PathBuf> {
        let dir = self.path(".archive").join(domain);
        let Ok(entries) = fs::read_dir(&dir) else {
            return Vec::new();
        };
        entries
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix))
            .collect()
    }

    /// Make every Maildir look untouched since long before the snapshot, so that only
    /// which rows back it decides (not the rule that keeps what changed meanwhile).
    fn age_all(&self) {
        for rel in self.maildirs() {
            age(&self.path(&rel));
        }
    }
}

/// Set the modification time of a Maildir and of its cur, new and tmp (those that are
/// there) to an hour ago.
fn age(dir: &Path) {
    let past = SystemTime::now() - Duration::from_secs(3600);
    for path in [
        dir.to_owned(),
        dir.join("cur"),
        dir.join("new"),
        dir.join("tmp"),
    ] {
        if let Ok(file) = fs::File::open(&path) {
            file.set_modified(past).unwrap();
        }
    }
}

/// The table holds ann@example.org and bob; the disk also has three Maildirs no row
/// backs. No snapshot has begun.
fn orphans_on_disk(mode: &str) -> (Fixture, CapturedLog) {
    let (mut f, log) = logged(json!({ "orphans": mode }));
    f.send(add("ann@example.org", Some(1))).unwrap();
    f.send(add("bob", None)).unwrap();
    f.leftover("example.org/old");
    f.leftover("other.org/leftover");
    f.leftover("gone");
    f.age_all();
    (f, log)
}

/// [`orphans_on_disk`], and a snapshot that began and brought both rows.
fn with_orphans(mode: &str) -> (Fixture, CapturedLog) {
    let (mut f, log) = orphans_on_disk(mode);
    f.snapshot(began(false));
    f.snapshot_row(snapshot_row(1, "ann@example.org", Some(1)));
    f.snapshot_row(snapshot_row(2, "bob", None));
    f.age_all();
    (f, log)
}

const ORPHANS: [&str; 3] = ["example.org/old", "other.org/leftover", "gone"];

#[test]
fn orphans_are_kept_and_reported_by_default() {
    let (mut f, log) = with_orphans("keep");
    let before = f.everything();
    f.snapshot(ended(2, true));
    assert_eq!(f.everything(), before, "keep changed the disk");
    for rel in ORPHANS {
        let lines = log.about(&f.path(rel));
        assert_eq!(lines.len(), 1, "{rel}: {lines:#?}");
        assert!(lines[0].contains("kept"), "{}", lines[0]);
    }
    for rel in ["example.org/ann", "bob"] {
        assert!(log.about(&f.path(rel)).is_empty(), "{rel} was reported");
    }
    let summary = log.summary();
    assert!(summary.contains("orphans=3"), "{summary}");
    assert!(summary.contains("mode=keep"), "{summary}");
    assert!(summary.contains("kept=3"), "{summary}");
}

#[test]
fn orphans_keep_is_the_default() {
    let (mut f, log) = logged(json!({}));
    f.leftover("gone");
    f.snapshot(began(false));
    f.snapshot(ended(0, true));
    assert_maildir(&f.path("gone"));
    assert!(log.summary().contains("mode=keep"));
}

#[test]
fn orphans_are_archived_under_a_unique_name() {
    let (mut f, log) = with_orphans("archive");
    f.snapshot(ended(2, true));
    assert_eq!(
        f.maildirs(),
        ["example.org/ann", "bob"].map(String::from).into()
    );
    for (domain, local, rel) in [
        ("example.org", "old", "example.org/old"),
        ("other.org", "leftover", "other.org/leftover"),
        ("", "gone", "gone"),
    ] {
        let found = f.archived(domain, &format!("{local}-orphan-"));
        assert_eq!(found.len(), 1, "{rel}: {found:?}");
        assert_eq!(
            fs::read_to_string(found[0].join("cur/1.mail")).unwrap(),
            rel,
            "the mail moved with it"
        );
        let lines = log.about(&f.path(rel));
        assert_eq!(lines.len(), 1, "{rel}: {lines:#?}");
        assert!(lines[0].contains("archived"), "{}", lines[0]);
    }
    assert!(!f.path("other.org").exists(), "the emptied domain was left");
    assert!(log.summary().contains("archived=3"), "{}", log.summary());

    // The same orphan name again (a user re-created and orphaned again) never
    // overwrites the first archive.
    f.leftover("gone");
    f.snapshot(began(false));
    f.snapshot_row(snapshot_row(1, "ann@example.org", Some(1)));
    f.snapshot_row(snapshot_row(2, "bob", None));
    f.age_all();
    f.snapshot(ended(2, true));
    assert_eq!(f.archived("", "gone-orphan-").len(), 2);
}

#[test]
fn orphans_are_removed_like_a_delete() {
    let (mut f, log) = with_orphans("remove");
    fs::write(f.path("example.org/ann/cur/1.mail"), "ann's").unwrap();
    f.age_all();
    f.snapshot(ended(2, true));
    assert_eq!(
        f.maildirs(),
        ["example.org/ann", "bob"].map(String::from).into()
    );
    assert!(!f.path("other.org").exists(), "the emptied domain was left");
    assert!(!f.path(".archive").exists());
    assert_eq!(
        fs::read_to_string(f.path("example.org/ann/cur/1.mail")).unwrap(),
        "ann's"
    );
    for rel in ORPHANS {
        let lines = log.about(&f.path(rel));
        assert_eq!(lines.len(), 1, "{rel}: {lines:#?}");
        assert!(lines[0].contains("removed"), "{}", lines[0]);
    }
    assert!(log.summary().contains("removed=3"), "{}", log.summary());
}

#[test]
fn users_renamed_or_deleted_during_the_snapshot() {
    let (mut f, log) = logged(json!({ "orphans": "remove" }));
    for (id, user) in [(1, "ann@example.org"), (2, "bob@example.org"), (3, "carl")] {
        f.send(live_add(id, user, None)).unwrap();
    }
    f.snapshot(began(false));
    // Renamed after its snapshot row came: the new name is backed, not the old.
    f.snapshot_row(snapshot_row(1, "ann@example.org", None));
    f.send(live_rename(1, "ann@example.org", "anna@example.net"))
        .unwrap();
    // Renamed before its snapshot row would have come (the snapshot drops that row).
    f.send(live_rename(2, "bob@example.org", "bob")).unwrap();
    // Deleted after its snapshot row came.
    f.snapshot_row(snapshot_row(3, "carl", None));
    f.send(live_remove(3, "carl")).unwrap();
    // A row whose username was taken over by another row is backed again.
    f.send(live_add(4, "carl", None)).unwrap();
    f.age_all();
    f.snapshot(ended(2, true));
    assert_eq!(
        f.maildirs(),
        ["example.net/anna", "bob", "carl"].map(String::from).into()
    );
    assert!(log.summary().contains("orphans=0"), "{}", log.summary());
}

#[test]
fn a_user_deleted_during_the_snapshot_is_no_longer_backed() {
    // The deleted row's Maildir could not be removed by its DELETE and comes back into
    // view (a file system remounted): by the end no row backs it.
    let (mut f, log) = logged(json!({ "orphans": "archive" }));
    f.send(live_add(1, "ann@example.org", None)).unwrap();
    f.send(live_add(2, "bob@example.org", None)).unwrap();
    f.snapshot(began(false));
    f.snapshot_row(snapshot_row(1, "ann@example.org", None));
    f.snapshot_row(snapshot_row(2, "bob@example.org", None));
    f.send(live_remove(1, "ann@example.org")).unwrap();
    f.leftover("example.org/ann");
    f.age_all();
    f.snapshot(ended(2, true));
    assert_eq!(f.maildirs(), ["example.org/bob"].map(String::from).into());
    assert_eq!(f.archived("example.org", "ann-orphan-").len(), 1);
    assert_eq!(log.about(&f.path("example.org/ann")).len(), 1);
}

#[test]
fn a_user_inserted_during_the_snapshot_is_not_an_orphan() {
    let (mut f, log) = logged(json!({ "orphans": "remove" }));
    f.send(live_add(1, "ann@example.org", None)).unwrap();
    // erin's Maildir is on disk already (a restored backup): the INSERT keeps it as is.
    f.leftover("example.org/erin");
    f.snapshot(began(false));
    f.snapshot_row(snapshot_row(1, "ann@example.org", None));
    f.send(live_add(7, "erin@example.org", None)).unwrap();
    f.send(live_add(8, "fred", Some(5))).unwrap();
    f.age_all();
    f.snapshot(ended(1, true));
    assert_eq!(
        f.maildirs(),
        ["example.org/ann", "example.org/erin", "fred"]
            .map(String::from)
            .into()
    );
    assert!(f.path("example.org/erin/cur/1.mail").exists());
    assert!(log.summary().contains("orphans=0"), "{}", log.summary());
}

#[test]
fn a_snapshot_row_writes_the_quota_like_an_insert() {
    let (mut f, _log) = logged(json!({}));
    f.leftover("example.org/ann");
    fs::write(f.path("example.org/ann/maildirsize"), "100S\n5 1\n").unwrap();
    f.leftover("bob");
    fs::write(f.path("bob/maildirsize"), "100S\n").unwrap();
    f.snapshot(began(false));
    f.snapshot_row(snapshot_row(1, "ann@example.org", Some(200)));
    f.snapshot_row(snapshot_row(2, "bob", None));
    f.snapshot_row(snapshot_row(3, "carl", Some(300)));
    assert_eq!(
        f.maildirsize("example.org/ann").as_deref(),
        Some("200S\n5 1\n")
    );
    assert_eq!(f.maildirsize("bob"), None);
    assert_eq!(f.maildirsize("carl").as_deref(), Some("300S\n"));
}

#[test]
fn a_resumed_snapshot_checks_nothing() {
    for resumed in [true, false] {
        let (mut f, log) = orphans_on_disk("remove");
        // After a restart the snapshot begins again as resumed, in a new instance; the
        // end's `whole` alone also decides.
        f.snapshot(began(resumed));
        f.snapshot_row(snapshot_row(2, "bob", None));
        f.age_all();
        let before = f.everything();
        f.snapshot(ended(1, false));
        assert_eq!(f.everything(), before, "resumed: {resumed}");
        let all = log.all();
        assert!(
            all.iter().any(|l| l.contains("orphan check skipped")
                && l.contains("resumed after a restart")
                && l.contains("epidemic backfill --handler mx-maildir")),
            "{all:#?}"
        );
        assert!(!all.iter().any(|l| l.starts_with("orphan check done")));
    }
    // Resumed at its beginning is enough, whatever the end says.
    let (mut f, log) = orphans_on_disk("remove");
    f.snapshot(began(true));
    let before = f.everything();
    f.snapshot(ended(0, true));
    assert_eq!(f.everything(), before);
    assert!(!log.all().iter().any(|l| l.starts_with("orphan check done")));
}

#[test]
fn a_snapshot_that_never_ends_removes_nothing() {
    let (mut f, log) = with_orphans("remove");
    // The daemon stops: no Ended. Live changes go on meanwhile.
    f.send(live_add(9, "zed", None)).unwrap();
    f.send(live_remove(9, "zed")).unwrap();
    for rel in ORPHANS {
        assert_maildir(&f.path(rel));
    }
    // A new instance: no snapshot began in it, so an end it hears of checks nothing.
    let (mut g, log2) = logged(json!({ "orphans": "remove" }));
    g.leftover("gone");
    g.snapshot(ended(0, true));
    assert_maildir(&g.path("gone"));
    assert!(log2
        .all()
        .iter()
        .any(|l| l.contains("did not see the snapshot begin")));
    assert!(!log.all().iter().any(|l| l.starts_with("orphan check")));
}

#[test]
fn a_snapshot_of_another_table_is_ignored() {
    let (mut f, _log) = with_orphans("remove");
    f.snapshot(SnapshotEvent::Ended {
        table: "aliases".into(),
        rows: 0,
        whole: true,
    });
    for rel in ORPHANS {
        assert_maildir(&f.path(rel));
    }
    // The table's own end still checks.
    f.snapshot(ended(2, true));
    assert!(!f.path("gone").exists());
}

#[test]
fn what_is_not_a_plain_maildir_is_never_touched() {
    let (mut f, log) = logged(json!({ "orphans": "remove" }));
    let outside = f.root.join("outside");
    for sub in [
        "cur",
        "new",
        "tmp",
        "dom/ann/cur",
        "dom/ann/new",
        "dom/ann/tmp",
    ] {
        fs::create_dir_all(outside.join(sub)).unwrap();
    }
    // Dot directories: the archive, Maildir++ folders, anything hidden.
    f.leftover(".archive/old-1");
    f.leftover(".archive/example.org/ann-2");
    f.leftover(".hidden");
    f.leftover("example.org/.folder");
    // Directories that are not Maildirs: no new/tmp, or files only.
    fs::create_dir_all(f.path("half/cur")).unwrap();
    fs::create_dir_all(f.path("example.org/half/cur")).unwrap();
    fs::create_dir_all(f.path("notes")).unwrap();
    fs::write(f.path("notes/todo"), "x").unwrap();
    fs::write(f.path("file"), "x").unwrap();
    // Symbolic links: to a Maildir, to a domain of Maildirs, in place of cur.
    std::os::unix::fs::symlink(&outside, f.path("linked")).unwrap();
    std::os::unix::fs::symlink(outside.join("dom"), f.path("linked.org")).unwrap();
    fs::create_dir_all(f.path("example.org")).unwrap();
    std::os::unix::fs::symlink(&outside, f.path("example.org/linked")).unwrap();
    fs::create_dir_all(f.path("sneaky/new")).unwrap();
    fs::create_dir_all(f.path("sneaky/tmp")).unwrap();
    std::os::unix::fs::symlink(outside.join("cur"), f.path("sneaky/cur")).unwrap();
    // A bare user's Maildir holding the Maildir of a user of the domain with its name.
    f.leftover("shared");
    f.leftover("shared/bob");

    f.snapshot(began(false));
    f.snapshot_row(snapshot_row(1, "bob@shared", None));
    f.age_all();
    let before = f.everything();
    f.snapshot(ended(1, true));
    assert_eq!(f.everything(), before);
    let lines = log.about(&f.path("shared"));
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(lines[0].contains("could not be removed"), "{}", lines[0]);
    assert!(log.summary().contains("orphans=1"), "{}", log.summary());
}

#[test]
fn a_bare_users_folders_go_with_it() {
    let (mut f, _log) = logged(json!({ "orphans": "remove" }));
    f.leftover("zed");
    // A folder in LAYOUT=fs looks like the Maildir of a user of domain "zed".
    f.leftover("zed/Sent");
    f.snapshot(began(false));
    f.snapshot(ended(0, true));
    assert!(!f.path("zed").exists());
}

#[test]
fn a_maildir_that_changed_during_the_snapshot_is_kept() {
    // The mail server made it for a user whose INSERT had not reached this handler.
    let (mut f, log) = with_orphans("remove");
    let soon = SystemTime::now() + Duration::from_secs(60);
    fs::File::open(f.path("gone/new"))
        .unwrap()
        .set_modified(soon)
        .unwrap();
    f.snapshot(ended(2, true));
    assert_maildir(&f.path("gone"));
    assert!(!f.path("other.org").exists());
    let lines = log.about(&f.path("gone"));
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(
        lines[0].contains("changed during the snapshot"),
        "{}",
        lines[0]
    );
    assert!(
        log.summary().contains("changed_during_snapshot=1"),
        "{}",
        log.summary()
    );
}

#[test]
fn a_maildir_a_change_failed_on_is_kept() {
    let (mut f, _log) = logged(json!({ "orphans": "remove" }));
    f.send(live_add(1, "ann@example.org", None)).unwrap();
    f.send(live_add(2, "bob@example.org", None)).unwrap();
    f.snapshot(began(false));
    f.snapshot_row(snapshot_row(1, "ann@example.org", None));
    f.snapshot_row(snapshot_row(2, "bob@example.org", None));
    // bob's row takes ann's name while ann's row still has it: the rename fails (bob's
    // Maildir is in the way) and goes to the dead letters.
    assert_permanent(f.send(live_rename(2, "bob@example.org", "ann@example.org")));
    // Then ann's row is deleted: its Maildir is removed... and bob's stays, held by the
    // failed rename, though no row names it now.
    f.send(live_remove(1, "ann@example.org")).unwrap();
    f.age_all();
    f.snapshot(ended(2, true));
    assert_maildir(&f.path("example.org/bob"));
}
