//! The Debian package, as a sysadmin gets it: `scripts/package.sh` builds it (cargo-deb)
//! from the binaries this suite already built, `dpkg -i` installs it on this machine, the
//! SQLite quickstart runs from the installed files alone (`plugin = "maildir"` found in
//! /usr/lib/epidemic, a relative `sqlite://mail.db` run from `/` as under systemd), and
//! `dpkg -r` / `dpkg -P` take it away again.
//!
//! Installing a package needs root on a Debian system: elsewhere the test says so and
//! passes without doing anything (CI runs as root on Debian 12).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use epidemic_tests::{oot, sqlite, target_dir, wait_until};

const WAIT: Duration = Duration::from_secs(30);
const BIN: &str = "/usr/bin/epidemic";

fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

/// Removes the package (and its conffiles) however the test ends.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["-P", "epidemic"]).output();
    }
}

/// `epidemic run` from the installed binary, killed when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn build_package() -> PathBuf {
    // The suite's binaries are in target/debug: package those (no second build).
    let target = target_dir();
    let cargo_target = target.parent().expect("target dir has a parent");
    sh(Command::new(oot::repo_root().join("scripts/package.sh"))
        .args(["--profile", "dev", "--no-build"])
        .env("CARGO_TARGET_DIR", cargo_target));
    let debs: Vec<PathBuf> = std::fs::read_dir(cargo_target.join("debian"))
        .expect("target/debian")
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("epidemic_") && n.ends_with(".deb"))
        })
        .collect();
    assert_eq!(debs.len(), 1, "{debs:?}");
    debs[0].clone()
}

#[test]
fn the_debian_package_installs_runs_the_quickstart_and_is_removed() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root || !Path::new("/etc/debian_version").exists() {
        eprintln!("SKIPPED: installing the Debian package needs root on Debian (dpkg -i)");
        return;
    }
    let deb = build_package();
    let _ = Command::new("dpkg").args(["-P", "epidemic"]).output();
    sh(Command::new("dpkg").arg("-i").arg(&deb));
    let _installed = Installed;

    // The files a sysadmin expects, where Debian puts them.
    for f in [
        BIN,
        "/usr/lib/epidemic/libepidemic_backend_sqlite.so",
        "/usr/lib/epidemic/libepidemic_backend_postgres.so",
        "/usr/lib/epidemic/libepidemic_backend_mysql.so",
        "/usr/lib/epidemic/libepidemic_maildir.so",
        "/usr/lib/epidemic/libepidemic_exec.so",
        "/usr/lib/epidemic/libepidemic_webhook.so",
        "/usr/lib/epidemic/libepidemic_nats.so",
        "/lib/systemd/system/epidemic.service",
        "/etc/epidemic/epidemic.toml",
        "/usr/share/man/man1/epidemic.1.gz",
        "/usr/share/man/man1/epidemic-run.1.gz",
        "/usr/share/bash-completion/completions/epidemic",
        "/usr/share/zsh/vendor-completions/_epidemic",
        "/usr/share/fish/vendor_completions.d/epidemic.fish",
        "/usr/share/doc/epidemic/configuration.md",
    ] {
        assert!(Path::new(f).exists(), "{f} not installed");
    }
    let conffiles = sh(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "epidemic"]));
    assert!(
        conffiles.contains("/etc/epidemic/epidemic.toml"),
        "{conffiles}"
    );
    for f in [BIN, "/usr/lib/epidemic/libepidemic_maildir.so"] {
        let sections = sh(Command::new("readelf").args(["-S", "-W", f]));
        assert!(!sections.contains(".debug_info"), "{f} is not stripped");
    }
    sh(Command::new("getent").args(["passwd", "epidemic"]));
    let unit = std::fs::read_to_string("/lib/systemd/system/epidemic.service").unwrap();
    assert!(
        unit.contains("Type=notify") && unit.contains("WatchdogSec="),
        "{unit}"
    );
    assert!(sh(Command::new(BIN).arg("--version")).starts_with("epidemic "));

    // The quickstart, from the installed files only.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let db = sqlite::create_db(
        dir,
        "mail",
        "CREATE TABLE mail_users (id INTEGER PRIMARY KEY, username TEXT NOT NULL UNIQUE, quota_bytes INTEGER, last_login TEXT);",
    );
    std::fs::create_dir(dir.join("maildirs")).unwrap();
    let config = dir.join("epidemic.toml");
    std::fs::write(
        &config,
        format!(
            "[database]\nurl = \"sqlite://mail.db\"\n\n[daemon]\nname = \"mx1\"\n\n[[handler]]\nname = \"maildir\"\nplugin = \"maildir\"\n[handler.config]\ntable = \"mail_users\"\nbase_dir = {:?}\n",
            dir.join("maildirs").display().to_string()
        ),
    )
    .unwrap();
    let check = sh(Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .arg("check")
        .current_dir("/"));
    assert!(
        check.contains("/usr/lib/epidemic/libepidemic_backend_sqlite.so"),
        "{check}"
    );
    let log = dir.join("daemon.log");
    let mut daemon = Running(
        Command::new(BIN)
            .arg("--config")
            .arg(&config)
            .arg("run")
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        wait_until(WAIT, || log_text().contains("epidemic started")),
        "{}",
        log_text()
    );
    sqlite::connect(&db)
        .execute(
            "INSERT INTO mail_users (username, quota_bytes) VALUES ('ann@example.org', 1000000000)",
            [],
        )
        .unwrap();
    let maildir = dir.join("maildirs/example.org/ann");
    assert!(
        // The quota file is written (atomically) after the directories.
        wait_until(WAIT, || maildir.join("cur").is_dir()
            && maildir.join("maildirsize").exists()),
        "no Maildir appeared:\n{}",
        log_text()
    );
    assert_eq!(
        std::fs::read_to_string(maildir.join("maildirsize"))
            .unwrap()
            .lines()
            .next(),
        Some("1000000000S")
    );
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(daemon.0.id() as i32, libc::SIGTERM);
    }
    let mut status = None;
    assert!(wait_until(WAIT, || {
        status = daemon.0.try_wait().ok().flatten();
        status.is_some()
    }));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", log_text());

    // Removed: the program goes, the edited-or-not conffile stays until purge.
    sh(Command::new("dpkg").args(["-r", "epidemic"]));
    assert!(!Path::new(BIN).exists());
    assert!(!Path::new("/usr/lib/epidemic/libepidemic_maildir.so").exists());
    assert!(Path::new("/etc/epidemic/epidemic.toml").exists());
    sh(Command::new("dpkg").args(["-P", "epidemic"]));
    assert!(!Path::new("/etc/epidemic/epidemic.toml").exists());
}
