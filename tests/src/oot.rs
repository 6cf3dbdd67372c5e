//! Building plugin crates out of this workspace, as a third party would: a copy in
//! `target/<profile>/oot/<name>`, built with cargo against a copy or a path of the SDK.
//! All such builds share one target directory so dependencies compile once.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::target_dir;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_owned()
}

/// A fresh, empty work directory for an out-of-tree build called `name`.
pub fn work_dir(name: &str) -> PathBuf {
    let work = target_dir().join("oot").join(name);
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).expect("create oot dir");
    work
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir") {
        let e = e.expect("entry");
        let dest = to.join(e.file_name());
        if e.file_type().expect("file type").is_dir() {
            if e.file_name() != "target" {
                copy_dir(&e.path(), &dest);
            }
        } else {
            std::fs::copy(e.path(), dest).expect("copy");
        }
    }
}

/// `cargo build` in `dir` (a package or workspace root) with the workspace's lock file,
/// offline, into the shared out-of-tree target directory. Returns the directory the
/// built libraries are in. Panics with cargo's output on failure.
pub fn cargo_build(dir: &Path) -> PathBuf {
    std::fs::copy(repo_root().join("Cargo.lock"), dir.join("Cargo.lock")).expect("copy Cargo.lock");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let target = target_dir().join("oot/target");
    let out = Command::new(cargo)
        .args(["build", "--quiet", "--offline"])
        .current_dir(dir)
        .env("CARGO_TARGET_DIR", &target)
        .env_remove("RUSTFLAGS")
        .output()
        .expect("run cargo");
    assert!(
        out.status.success(),
        "building {} failed:\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    target.join("debug")
}
