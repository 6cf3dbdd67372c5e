//! The handler driven through the SDK's test harness against a temporary directory.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use epidemic_plugin_sdk::testing::{delete, insert, update, Harness};
use epidemic_plugin_sdk::{Change, Handler, HandlerError, Op, Value};
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
