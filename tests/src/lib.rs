//! Test harness for Epidemic's integration tests: where the built binaries and plugin
//! libraries are, throwaway database servers, and a handle on a running daemon.
//!
//! Tests load the real `.so` files from the workspace's target directory, exactly as the
//! `epidemic` binary does. Run `cargo build --workspace` first (the README's test command
//! does).

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The cargo profile directory the test binary was built into (`target/debug`).
pub fn target_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("EPIDEMIC_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    // Test executables live in target/<profile>/deps/.
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("exe has a parent");
    deps.parent().expect("deps has a parent").to_owned()
}

/// Path of a built plugin library: `plugin_path("maildir")` is
/// `target/debug/libepidemic_maildir.so`.
pub fn plugin_path(name: &str) -> PathBuf {
    let p = target_dir().join(format!("libepidemic_{name}.so"));
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace` before the tests",
        p.display()
    );
    p
}

/// Path of a built backend library: `backend_path("sqlite")`.
pub fn backend_path(name: &str) -> PathBuf {
    plugin_path(&format!("backend_{name}"))
}

/// Poll `cond` every few milliseconds until it holds or `timeout` passes. Returns whether
/// it held. This is how tests wait for an event: never a bare sleep.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A free TCP port on 127.0.0.1 (bound and released; good enough for a throwaway server).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};

/// The `epidemic` binary under test.
pub fn epidemic_bin() -> PathBuf {
    let p = target_dir().join("epidemic");
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace` first",
        p.display()
    );
    p
}

/// Run `epidemic --config CONFIG ARGS...` to completion.
pub fn epidemic(config: &Path, args: &[&str]) -> Output {
    Command::new(epidemic_bin())
        .arg("--config")
        .arg(config)
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .output()
        .expect("run epidemic")
}

/// Run `epidemic ARGS...` (give `--config` yourself) with extra environment variables,
/// in `cwd` when given.
pub fn epidemic_with(cwd: Option<&Path>, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(epidemic_bin());
    cmd.args(args)
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .stdin(Stdio::null());
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    cmd.output().expect("run epidemic")
}

/// A running `epidemic run`, killed when dropped. Its stderr goes to a log file.
pub struct Daemon {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Daemon {
    /// Start `epidemic --config CONFIG run ARGS...`; `log` receives stderr (appended, so
    /// restarts keep one history).
    pub fn start(config: &Path, log: &Path, args: &[&str]) -> Daemon {
        Self::start_with_env(config, log, args, &[])
    }

    pub fn start_with_env(
        config: &Path,
        log: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Daemon {
        let err = File::options()
            .create(true)
            .append(true)
            .open(log)
            .expect("open daemon log");
        let child = Command::new(epidemic_bin())
            .arg("--config")
            .arg(config)
            .arg("run")
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("EPIDEMIC_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("spawn epidemic run");
        Daemon {
            child: Some(child),
            log: log.to_owned(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Send a signal (SIGTERM, SIGINT) and wait up to `timeout` for the exit.
    pub fn signal_and_wait(&mut self, sig: i32, timeout: Duration) -> Option<ExitStatus> {
        let mut c = self.child.take()?;
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        unsafe {
            libc::kill(c.id() as i32, sig);
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait until the log contains `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.log_text().contains(needle))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The lines a `recorder` handler wrote: one JSON object per delivered change. A last
/// line still being written (no newline yet) is left for the next read.
pub fn recorded(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    complete
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("bad line {l:?} in {}: {e}", path.display()))
        })
        .collect()
}

/// Wait until the recorder file has at least `n` lines; returns them either way.
pub fn wait_recorded(path: &Path, n: usize, timeout: Duration) -> Vec<serde_json::Value> {
    wait_until(timeout, || recorded(path).len() >= n);
    recorded(path)
}

/// A `[[handler]]` entry for the recorder test plugin.
pub fn recorder_handler(
    name: &str,
    file: &Path,
    table: &str,
    columns: &[&str],
    extra: &str,
) -> String {
    let cols: Vec<String> = columns.iter().map(|c| format!("{c:?}")).collect();
    format!(
        "[[handler]]\nname = {name:?}\nplugin = {:?}\n[handler.config]\nfile = {:?}\ntable = {table:?}\ncolumns = [{}]\n{extra}\n",
        plugin_path("recorder").display().to_string(),
        file.display().to_string(),
        cols.join(", ")
    )
}
pub mod db;
pub mod maildirs;
pub mod mysql;
pub mod oot;
pub mod pg;
pub mod reader;
pub mod rng;
pub mod sqlite;
