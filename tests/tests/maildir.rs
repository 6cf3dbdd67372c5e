//! The original use case end to end: a SQLite `mail_users` table drives the real maildir
//! plugin through the real daemon, and the directories on disk end up matching the table.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use epidemic_tests::{plugin_path, sqlite, wait_until, Daemon};
use rusqlite::{params, OptionalExtension};

/// Small deterministic generator, so a failing stream can be replayed from its seed.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What the table says the disk should hold: maildir path → first line of maildirsize.
fn expected(db: &Path, base: &Path) -> BTreeMap<PathBuf, Option<String>> {
    let conn = sqlite::connect(db);
    let mut stmt = conn
        .prepare("SELECT username, quota_bytes FROM mail_users")
        .unwrap();
    stmt.query_map([], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, Option<i64>>(1)?))
    })
    .unwrap()
    .map(|r| {
        let (user, quota) = r.unwrap();
        let dir = match user.split_once('@') {
            Some((local, domain)) => base.join(domain).join(local),
            None => base.join(&user),
        };
        (dir, quota.map(|q| format!("{q}S")))
    })
    .collect()
}

/// What is on disk: every Maildir with its quota line (the harness's view).
fn actual(base: &Path) -> BTreeMap<PathBuf, Option<String>> {
    epidemic_tests::maildirs::on_disk(base)
}

#[test]
fn maildirs_match_the_table_after_a_mixed_stream() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let base = dir.join("vhosts");
    std::fs::create_dir(&base).unwrap();
    let db = sqlite::create_db(
        dir,
        "mail",
        "CREATE TABLE mail_users (id INTEGER PRIMARY KEY, username TEXT NOT NULL UNIQUE, quota_bytes INTEGER, last_login TEXT);",
    );
    let config = dir.join("epidemic.toml");
    std::fs::write(
        &config,
        format!(
            "[database]\nurl = {:?}\n[daemon]\nname = \"mx1\"\nbatch_size = 7\n\
             [[handler]]\nname = \"maildir\"\nplugin = {:?}\n[handler.config]\nbase_dir = {:?}\n",
            sqlite::url(&db),
            plugin_path("maildir").display().to_string(),
            base.display().to_string()
        ),
    )
    .unwrap();
    let log = dir.join("daemon.log");
    let mut daemon = Daemon::start(&config, &log, &[]);
    assert!(
        daemon.wait_for_log("epidemic started", Duration::from_secs(20)),
        "{}",
        daemon.log_text()
    );

    let conn = sqlite::connect(&db);
    let domains = ["example.org", "example.net", ""];
    let mut rng = XorShift(0x5eed_1234_abcd_0001);
    let mut next_user = 0;
    for step in 0..400 {
        let pick_existing = |rng: &mut XorShift| -> Option<(i64, String)> {
            conn.query_row(
                "SELECT id, username FROM mail_users ORDER BY id LIMIT 1 OFFSET ?1",
                [rng.below(20) as i64],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .unwrap()
        };
        let name = |n: i32, rng: &mut XorShift| {
            let d = domains[rng.below(domains.len() as u64) as usize];
            if d.is_empty() {
                format!("user{n}")
            } else {
                format!("user{n}@{d}")
            }
        };
        match rng.below(10) {
            0..=3 => {
                next_user += 1;
                let quota = if rng.below(3) == 0 {
                    None
                } else {
                    Some(rng.below(1 << 30) as i64)
                };
                let u = name(next_user, &mut rng);
                conn.execute(
                    "INSERT INTO mail_users (username, quota_bytes) VALUES (?1, ?2)",
                    params![u, quota],
                )
                .unwrap();
            }
            4 | 5 => {
                if let Some((id, _)) = pick_existing(&mut rng) {
                    let quota = if rng.below(4) == 0 {
                        None
                    } else {
                        Some(rng.below(1 << 30) as i64)
                    };
                    conn.execute(
                        "UPDATE mail_users SET quota_bytes = ?2 WHERE id = ?1",
                        params![id, quota],
                    )
                    .unwrap();
                }
            }
            6 => {
                if let Some((id, _)) = pick_existing(&mut rng) {
                    next_user += 1;
                    let u = name(next_user, &mut rng);
                    conn.execute(
                        "UPDATE mail_users SET username = ?2 WHERE id = ?1",
                        params![id, u],
                    )
                    .unwrap();
                }
            }
            7 => {
                // A column the plugin does not watch: must change nothing on disk.
                conn.execute("UPDATE mail_users SET last_login = ?1", [step])
                    .unwrap();
            }
            _ => {
                if let Some((id, _)) = pick_existing(&mut rng) {
                    conn.execute("DELETE FROM mail_users WHERE id = ?1", [id])
                        .unwrap();
                }
            }
        }
        // Halfway, kill the daemon and bring it back: the rest must still converge.
        if step == 200 {
            daemon.kill();
            daemon = Daemon::start(&config, &log, &[]);
        }
    }
    let converged = wait_until(Duration::from_secs(30), || {
        actual(&base) == expected(&db, &base)
    });
    assert!(
        converged,
        "disk does not match the table\nexpected: {:#?}\nactual: {:#?}\nlog:\n{}",
        expected(&db, &base),
        actual(&base),
        daemon.log_text()
    );
    assert!(
        !expected(&db, &base).is_empty(),
        "the stream left no users; the test proves little"
    );
    assert!(daemon.alive());
    assert!(
        !daemon.log_text().contains("giving up"),
        "{}",
        daemon.log_text()
    );
}
