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
