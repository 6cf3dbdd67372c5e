//! Throwaway PostgreSQL 15 servers for integration tests.
//!
//! [`PgServer::shared`] starts one server per test binary, in a temporary directory on a
//! free port, with `fsync=off`; each test creates its own database on it
//! ([`PgServer::create_database`]) so tests run in parallel. A test that stops and
//! restarts the server (an outage test) takes a private one with
//! [`PgServer::start_private`] so it does not pull the server from under the others.
//!
//! PostgreSQL refuses to run as root, so when the tests run as root every server command
//! goes through `runuser -u postgres --`, and the directory is handed to `postgres`.
//!
//! Servers are stopped when the test binary exits (an `atexit` handler: statics are never
//! dropped) and private ones also when dropped. A binary killed before it could clean up
//! leaves its server behind; the next run stops servers whose owning process is gone.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// Where Debian's PostgreSQL 15 server binaries are.
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

const DIR_PREFIX: &str = "epidemic-pg-";
/// Holds the pid of the test process that owns a server directory.
const OWNER_FILE: &str = "owner.pid";

/// How [`PgServer::stop`] shuts the server down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// Disconnect clients, checkpoint, exit (`pg_ctl -m fast`).
    Fast,
    /// Exit at once without a checkpoint, like a crash; recovery runs on the next start
    /// (`pg_ctl -m immediate`).
    Immediate,
}

/// A running (or deliberately stopped) throwaway server.
pub struct PgServer {
    dir: PathBuf,
    port: u16,
    running: AtomicBool,
    /// Private servers are stopped on drop; the shared one lives in a static.
    private: bool,
    /// Extra `-c name=value` server settings, kept for restarts.
    settings: Vec<(String, String)>,
    /// TCP connections must use TLS ([`PgServer::start_private_tls`]); the harness's own
    /// connections go through the Unix socket.
    tls: bool,
}

/// Directories of servers this process started and has not cleaned up yet.
static LIVE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
static CLEANUP: OnceLock<()> = OnceLock::new();
static SHARED: OnceLock<PgServer> = OnceLock::new();

extern "C" fn stop_all_at_exit() {
    // At exit nothing else runs any more; if the lock is poisoned or held, skip rather
    // than hang the process.
    let dirs = match LIVE.try_lock() {
        Ok(mut live) => std::mem::take(&mut *live),
        Err(_) => return,
    };
    for dir in dirs {
        let _ = pg_ctl(&dir, &["-m", "immediate", "-w", "stop"]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

fn as_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A command for a PostgreSQL binary, run as `postgres` when we are root.
fn pg_command(bin: &str, cwd: &Path) -> Command {
    let path = Path::new(PG_BIN).join(bin);
    let mut cmd = if as_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(path);
        c
    } else {
        Command::new(path)
    };
    // The server user must be able to enter the working directory.
    cmd.current_dir(cwd);
    cmd
}

fn pg_ctl(dir: &Path, args: &[&str]) -> std::io::Result<std::process::Output> {
    pg_command("pg_ctl", dir)
        .arg("-D")
        .arg(dir.join("data"))
        .args(args)
        .output()
}

fn chown_to_postgres(path: &Path) {
    if !as_root() {
        return;
    }
    let name = std::ffi::CString::new("postgres").expect("no NUL in a literal");
    // SAFETY: getpwnam with a valid C string; the result is read at once, before any
    // other call could overwrite the static buffer it points to.
    let (uid, gid) = unsafe {
        let pw = libc::getpwnam(name.as_ptr());
        assert!(
            !pw.is_null(),
            "there is no `postgres` user: install Debian's postgresql package"
        );
        ((*pw).pw_uid, (*pw).pw_gid)
    };
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .expect("chown the server directory to postgres");
}

fn process_alive(pid: i32) -> bool {
    // A killed process whose parent has not reaped it yet is a zombie: dead, although
    // signal 0 still reaches it.
    if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        let state = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next());
        if state == Some('Z') {
            return false;
        }
    }
    // SAFETY: signal 0 only checks that the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Stop and remove servers left behind by test processes that no longer exist.
fn clean_leftovers() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let is_ours = dir
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(DIR_PREFIX));
        if !is_ours {
            continue;
        }
        let owner = std::fs::read_to_string(dir.join(OWNER_FILE))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        match owner {
            Some(pid) if process_alive(pid) => {}
            // A directory without an owner file is still being set up by someone.
            None => {}
            Some(_) => {
                let _ = pg_ctl(&dir, &["-m", "immediate", "-w", "stop"]);
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
    }
}

impl PgServer {
    /// The server shared by every test of this binary, started on first use.
    pub fn shared() -> &'static PgServer {
        SHARED.get_or_init(|| PgServer::start_new(false, &[]))
    }

    /// A server of the caller's own, stopped and removed when dropped. For tests that stop
    /// and restart the server.
    pub fn start_private() -> PgServer {
        PgServer::start_new(true, &[])
    }

    /// A private server started with extra server settings (`-c name=value` each), for
    /// tests that need a setting only the server's start can change
    /// (`max_prepared_transactions`). Restarts keep them.
    pub fn start_private_with(settings: &[(&str, &str)]) -> PgServer {
        PgServer::start_new(true, settings)
    }

    /// A private server that accepts TCP connections only over TLS (`ssl = on`, every
    /// TCP line of `pg_hba.conf` a `hostssl`), with `pki`'s server certificate and its CA
    /// for client certificates. The role [`TestPki::CLIENT_NAME`](crate::certs::TestPki)
    /// must present its client certificate (`cert`); everyone else is trusted. The
    /// harness's own connections ([`PgServer::client`]) use the Unix socket.
    pub fn start_private_tls(pki: &crate::certs::TestPki) -> PgServer {
        PgServer::start_configured(true, &[], Some(pki))
    }

    fn start_new(private: bool, settings: &[(&str, &str)]) -> PgServer {
        PgServer::start_configured(private, settings, None)
    }

    fn start_configured(
        private: bool,
        settings: &[(&str, &str)],
        tls: Option<&crate::certs::TestPki>,
    ) -> PgServer {
        for (name, value) in settings {
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
                    && value
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)),
                "plain server settings only: {name}={value}"
            );
        }
        CLEANUP.get_or_init(|| {
            clean_leftovers();
            // SAFETY: registering a plain extern "C" fn with no arguments.
            let rc = unsafe { libc::atexit(stop_all_at_exit) };
            assert_eq!(rc, 0, "atexit");
        });
        let dir = tempfile::Builder::new()
            .prefix(DIR_PREFIX)
            .tempdir()
            .expect("create a temporary directory")
            .keep();
        std::fs::write(dir.join(OWNER_FILE), std::process::id().to_string())
            .expect("write owner file");
        chown_to_postgres(&dir);
        LIVE.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(dir.clone());

        let out = pg_command("initdb", &dir)
            .arg("-D")
            .arg(dir.join("data"))
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
            ])
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if let Some(pki) = tls {
            configure_tls(&dir, pki);
        }
        // A free port can be taken by someone else before the server binds it: retry.
        let mut last_error = String::new();
        for _ in 0..5 {
            let server = PgServer {
                dir: dir.clone(),
                port: crate::free_port(),
                running: AtomicBool::new(false),
                private,
                settings: settings
                    .iter()
                    .map(|(n, v)| (n.to_string(), v.to_string()))
                    .collect(),
                tls: tls.is_some(),
            };
            match server.try_start() {
                Ok(()) => return server,
                Err(e) => last_error = e,
            }
        }
        panic!("cannot start PostgreSQL: {last_error}");
    }

    fn try_start(&self) -> Result<(), String> {
        let mut options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            self.port,
            self.dir.display()
        );
        for (name, value) in &self.settings {
            options.push_str(&format!(" -c {name}={value}"));
        }
        let out = pg_ctl(
            &self.dir,
            &[
                "-l",
                &self.log_path().to_string_lossy(),
                "-w",
                "-t",
                "60",
                "-o",
                &options,
                "start",
            ],
        )
        .map_err(|e| format!("run pg_ctl: {e}"))?;
        if out.status.success() {
            self.running.store(true, Ordering::SeqCst);
            Ok(())
        } else {
            Err(format!(
                "pg_ctl start failed: {}{}; server log {}:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.log_path().display(),
                std::fs::read_to_string(self.log_path()).unwrap_or_default()
            ))
        }
    }

    /// Start the server again after [`PgServer::stop`], on the same port and data.
    pub fn start(&self) {
        if let Err(e) = self.try_start() {
            panic!("{e}");
        }
    }

    /// Stop the server; `Immediate` simulates a crash.
    pub fn stop(&self, mode: StopMode) {
        let mode = match mode {
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        };
        let out =
            pg_ctl(&self.dir, &["-m", mode, "-w", "-t", "60", "stop"]).expect("run pg_ctl stop");
        assert!(
            out.status.success(),
            "pg_ctl stop failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.running.store(false, Ordering::SeqCst);
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's log file, for debugging a failed test.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    /// `postgres://postgres@127.0.0.1:PORT/db`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// A new connection to `db` (through the Unix socket on a TLS-only server).
    pub fn client(&self, db: &str) -> postgres::Client {
        let url = if self.tls {
            format!(
                "host={} port={} user=postgres dbname={db}",
                self.dir.display(),
                self.port
            )
        } else {
            self.url(db)
        };
        postgres::Client::connect(&url, postgres::NoTls)
            .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
    }

    /// Create an empty database (dropping a leftover of the same name); returns its URL.
    pub fn create_database(&self, name: &str) -> String {
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "test database names are plain: {name:?}"
        );
        let mut admin = self.client("postgres");
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .expect("drop database");
        admin
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .expect("create database");
        self.url(name)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if !self.private {
            return;
        }
        if self.running.load(Ordering::SeqCst) {
            let _ = pg_ctl(&self.dir, &["-m", "immediate", "-w", "stop"]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Ok(mut live) = LIVE.lock() {
            live.retain(|d| d != &self.dir);
        }
    }
}

/// Give a freshly initialised data directory TLS: the certificate files (readable by
/// the server only), `ssl = on`, and a `pg_hba.conf` whose TCP lines all need TLS.
fn configure_tls(dir: &Path, pki: &crate::certs::TestPki) {
    use std::os::unix::fs::PermissionsExt;
    let data = dir.join("data");
    for (from, name) in [
        (&pki.server_cert, "server.crt"),
        (&pki.server_key, "server.key"),
        (&pki.ca, "root.crt"),
    ] {
        let to = data.join(name);
        std::fs::copy(from, &to).expect("copy a certificate file");
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600))
            .expect("chmod a certificate file");
        chown_to_postgres(&to);
    }
    let mut conf = std::fs::OpenOptions::new()
        .append(true)
        .open(data.join("postgresql.conf"))
        .expect("open postgresql.conf");
    std::io::Write::write_all(
        &mut conf,
        b"\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\nssl_ca_file = 'root.crt'\n",
    )
    .expect("write postgresql.conf");
    let hba = format!(
        "local all all trust\nhostssl all {} 127.0.0.1/32 cert\nhostssl all all 127.0.0.1/32 trust\n",
        crate::certs::TestPki::CLIENT_NAME
    );
    std::fs::write(data.join("pg_hba.conf"), hba).expect("write pg_hba.conf");
}

/// Poll interval for [`wait_for_server`].
const RETRY: Duration = Duration::from_millis(50);

/// Wait until the server accepts connections to `db` again, up to `timeout`.
pub fn wait_for_server(server: &PgServer, db: &str, timeout: Duration) -> bool {
    crate::wait_until(timeout, || {
        let ok = postgres::Client::connect(&server.url(db), postgres::NoTls).is_ok();
        if !ok {
            std::thread::sleep(RETRY);
        }
        ok
    })
}
