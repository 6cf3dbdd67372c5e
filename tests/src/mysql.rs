//! Throwaway MariaDB servers: one shared by all tests of a test binary
//! ([`MySqlServer::shared`]) and private ones for tests that kill and restart the server
//! ([`MySqlServer::start_new`]). Each lives in a temp dir on a free port and is killed
//! when the process exits (or, for a private one, when it is dropped), so no `mariadbd`
//! outlives `cargo test`.
//!
//! The servers trade durability against an OS crash for speed
//! (`innodb_flush_log_at_trx_commit = 2`); a SIGKILL of the server loses no committed
//! transaction, which is what outage tests need.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

use mysql::prelude::Queryable;

use crate::free_port;

/// Pids of running servers and temp dirs to remove, for the exit hook.
static LIVE: Mutex<Vec<u32>> = Mutex::new(Vec::new());
static DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

extern "C" fn kill_all_at_exit() {
    let pids = std::mem::take(&mut *LIVE.lock().unwrap_or_else(|e| e.into_inner()));
    for pid in pids {
        // SAFETY: signalling and reaping our own child processes.
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
            libc::waitpid(pid as i32, std::ptr::null_mut(), 0);
        }
    }
    for dir in std::mem::take(&mut *DIRS.lock().unwrap_or_else(|e| e.into_inner())) {
        let _ = std::fs::remove_dir_all(dir);
    }
}

fn install_exit_hook() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        // SAFETY: registering a plain extern "C" function with no preconditions.
        unsafe {
            libc::atexit(kill_all_at_exit);
        }
    });
}

/// A MariaDB binary: on `PATH`, or where Debian puts it.
fn binary(name: &str) -> PathBuf {
    for dir in std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/usr/bin"])
    {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} not found: install mariadb-server (scripts/test.sh does)");
}

fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub struct MySqlServer {
    dir: PathBuf,
    port: u16,
    child: Mutex<Option<Child>>,
    /// Extra `mariadbd` options, given on every (re)start.
    extra_args: Vec<String>,
    /// TCP connections must use TLS ([`MySqlServer::start_new_tls`]); the harness's own
    /// connections go through the Unix socket.
    tls: bool,
}

impl MySqlServer {
    /// The server every test of this binary shares. Tests must not stop it.
    pub fn shared() -> &'static MySqlServer {
        static SHARED: OnceLock<MySqlServer> = OnceLock::new();
        SHARED.get_or_init(MySqlServer::start_new)
    }

    /// A server of its own (for outage tests): initialised and started; killed and its
    /// files removed when dropped.
    pub fn start_new() -> MySqlServer {
        MySqlServer::start_new_with_args(&[])
    }

    /// Like [`MySqlServer::start_new`], with extra `mariadbd` options (for example
    /// `--transaction-isolation=READ-UNCOMMITTED`) given on every start.
    pub fn start_new_with_args(extra_args: &[&str]) -> MySqlServer {
        MySqlServer::start_configured(extra_args, false)
    }

    /// A server of its own that accepts TCP connections only over TLS
    /// (`require_secure_transport = ON`) with `pki`'s server certificate, and checks
    /// client certificates against its CA. The harness's own connections
    /// ([`MySqlServer::conn`]) use the Unix socket, which MariaDB counts as secure.
    pub fn start_new_tls(pki: &crate::certs::TestPki) -> MySqlServer {
        let args = [
            format!("--ssl-ca={}", pki.ca.display()),
            format!("--ssl-cert={}", pki.server_cert.display()),
            format!("--ssl-key={}", pki.server_key.display()),
            "--require-secure-transport=ON".to_owned(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        MySqlServer::start_configured(&args, true)
    }

    fn start_configured(extra_args: &[&str], tls: bool) -> MySqlServer {
        install_exit_hook();
        let dir = tempfile::Builder::new()
            .prefix("epidemic-mariadb-")
            .tempdir()
            .expect("temp dir")
            .keep();
        DIRS.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(dir.clone());
        std::fs::create_dir(dir.join("tmp")).expect("create tmp dir");
        let mut install = Command::new(binary("mariadb-install-db"));
        // A starting mariadbd deletes every `#sql*` file in its tmpdir; with a shared /tmp
        // one server's start breaks another's install (`Error on delete of
        // '/tmp/#sql-temptable-...'`). Each server gets a tmpdir of its own.
        install
            .env("TMPDIR", dir.join("tmp"))
            .arg("--no-defaults")
            .arg(format!("--datadir={}", dir.join("data").display()))
            .args(["--auth-root-authentication-method=normal", "--skip-test-db"]);
        if running_as_root() {
            install.arg("--user=root");
        }
        let out = install.output().expect("run mariadb-install-db");
        assert!(
            out.status.success(),
            "mariadb-install-db failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let server = MySqlServer {
            dir,
            port: free_port(),
            child: Mutex::new(None),
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            tls,
        };
        server.start();
        server
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's error log.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("err.log")
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// `mysql://root@127.0.0.1:PORT/DB`.
    pub fn url(&self, db: &str) -> String {
        format!("mysql://root@127.0.0.1:{}/{db}", self.port)
    }

    /// A connection as root to `db` (`""` for none); through the Unix socket on a
    /// TLS-only server.
    pub fn conn(&self, db: &str) -> mysql::Conn {
        mysql::Conn::new(self.admin_opts(db)).expect("connect to mariadb")
    }

    fn admin_opts(&self, db: &str) -> mysql::Opts {
        let opts = mysql::Opts::from_url(&self.url(db)).expect("url");
        if !self.tls {
            return opts;
        }
        mysql::OptsBuilder::from_opts(opts)
            .socket(Some(self.dir.join("sock").display().to_string()))
            .prefer_socket(true)
            .into()
    }

    /// Create an empty database and return its URL.
    pub fn create_database(&self, name: &str) -> String {
        self.conn("")
            .query_drop(format!("CREATE DATABASE `{name}`"))
            .expect("create database");
        self.url(name)
    }

    pub fn is_running(&self) -> bool {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        matches!(child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Start the server (again) on its data dir and port; returns when it accepts
    /// connections.
    pub fn start(&self) {
        assert!(!self.is_running(), "the server is already running");
        let mut cmd = Command::new(binary("mariadbd"));
        cmd.arg("--no-defaults")
            .arg(format!("--datadir={}", self.dir.join("data").display()))
            .arg(format!("--socket={}", self.dir.join("sock").display()))
            .arg(format!("--port={}", self.port))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--pid-file={}", self.dir.join("pid").display()))
            .arg(format!("--log-error={}", self.log_path().display()))
            .arg(format!("--tmpdir={}", self.dir.join("tmp").display()))
            .args([
                "--skip-name-resolve",
                "--innodb-buffer-pool-size=64M",
                "--innodb-log-file-size=64M",
                "--innodb-flush-log-at-trx-commit=2",
                "--innodb-doublewrite=0",
                "--max-connections=300",
            ])
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if running_as_root() {
            cmd.arg("--user=root");
        }
        let child = cmd.spawn().expect("spawn mariadbd");
        LIVE.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(child.id());
        *self.child.lock().unwrap_or_else(|e| e.into_inner()) = Some(child);
        let opts = self.admin_opts("");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if mysql::Conn::new(opts.clone()).is_ok() {
                return;
            }
            assert!(self.is_running(), "mariadbd exited:\n{}", self.log_text());
            assert!(
                Instant::now() < deadline,
                "mariadbd did not start:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL the server (a crash: no shutdown, recovery on the next start).
    pub fn kill(&self) {
        if let Some(mut c) = self.child.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let pid = c.id();
            let _ = c.kill();
            let _ = c.wait();
            LIVE.lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|p| *p != pid);
        }
    }
}

impl Drop for MySqlServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
        DIRS.lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|d| d != &self.dir);
    }
}
