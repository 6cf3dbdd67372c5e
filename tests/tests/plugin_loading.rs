//! Loading plugin libraries: what the host says about a file that is missing, not a
//! plugin, or built against an incompatible SDK. The incompatible plugins are built in
//! the test, out of tree, from a copy of the SDK with a changed version or interface.

use std::path::{Path, PathBuf};
use std::process::Command;

use epidemic_tests::{epidemic_bin, oot, plugin_path};

fn plugin_check(file: &Path) -> (bool, String, String) {
    let out = Command::new(epidemic_bin())
        .args(["plugin", "check"])
        .arg(file)
        .current_dir(
            file.parent()
                .filter(|p| p.is_dir())
                .unwrap_or(Path::new("/")),
        )
        .output()
        .expect("run epidemic");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// One line on stderr, naming the file; non-zero exit.
fn assert_one_line_error(file: &Path, needles: &[&str]) -> String {
    let (ok, _, err) = plugin_check(file);
    assert!(!ok, "{} was accepted", file.display());
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "want one line, got:\n{err}"
    );
    assert!(err.contains(&file.display().to_string()), "{err}");
    for n in needles {
        assert!(err.contains(n), "{n:?} not in {err}");
    }
    err
}

#[test]
fn missing_file() {
    assert_one_line_error(
        Path::new("/nonexistent/libepidemic_x.so"),
        &["file not found"],
    );
}

#[test]
fn a_file_that_is_not_a_library() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("libepidemic_fake.so");
    std::fs::write(&f, "not an ELF file\n").unwrap();
    assert_one_line_error(&f, &["cannot load library"]);
}

#[test]
fn a_library_that_is_not_a_plugin() {
    // Any real shared library without Epidemic's root module: take the C library the
    // test binary itself links.
    let libc = [
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/usr/lib/x86_64-linux-gnu/libc.so.6",
        "/lib64/libc.so.6",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .expect("libc.so.6");
    assert_one_line_error(&libc, &["not an Epidemic plugin"]);
}

#[test]
fn plugin_check_describes_a_handler_and_a_backend() {
    let (ok, out, err) = plugin_check(&plugin_path("recorder"));
    assert!(ok, "{err}");
    assert!(out.contains("kind:    handler"), "{out}");
    assert!(out.contains("name:    recorder"), "{out}");
    assert!(
        out.contains(&format!("sdk:     {}", epidemic_plugin_sdk::SDK_VERSION)),
        "{out}"
    );
    // Without its config the recorder cannot say what it subscribes to; it says why.
    assert!(
        out.contains("subscriptions: unknown without a valid config"),
        "{out}"
    );

    let out = Command::new(epidemic_bin())
        .args(["plugin", "check"])
        .arg(plugin_path("recorder"))
        .args([
            "--handler-config",
            r#"{"file": "/dev/null", "table": "users", "columns": ["name", "mail"]}"#,
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("users (name, mail) ops: INSERT,UPDATE,DELETE"),
        "{text}"
    );

    let (ok, out, _) = plugin_check(&epidemic_tests::backend_path("sqlite"));
    assert!(ok);
    assert!(
        out.contains("kind:    backend") && out.contains("schemes: sqlite"),
        "{out}"
    );
}

/// Build a handler plugin against a modified copy of the SDK, out of this workspace.
/// `edit` changes the copy's source; `version` is the copy's version.
fn build_against_modified_sdk(name: &str, version: &str, edit: impl FnOnce(&Path)) -> PathBuf {
    let root = oot::repo_root();
    let work = oot::work_dir(name);
    let sdk = work.join("sdk");
    oot::copy_dir(&root.join("plugin-sdk/src"), &sdk.join("src"));
    std::fs::write(
        sdk.join("Cargo.toml"),
        format!(
            "[package]\nname = \"epidemic-plugin-sdk\"\nversion = \"{version}\"\nedition = \"2021\"\n\n\
             [lib]\nname = \"epidemic_plugin_sdk\"\n\n[dependencies]\n{}",
            workspace_deps(&root, &["abi_stable", "serde", "serde_json", "thiserror"])
        ),
    )
    .unwrap();
    edit(&sdk);
    let plugin = work.join("plugin");
    std::fs::create_dir_all(plugin.join("src")).unwrap();
    std::fs::write(
        plugin.join("Cargo.toml"),
        format!(
            "[package]\nname = \"epidemic-{name}\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n\
             [lib]\ncrate-type = [\"cdylib\"]\n\n[dependencies]\nepidemic-plugin-sdk = {{ path = \"../sdk\" }}\n"
        ),
    )
    .unwrap();
    std::fs::write(
        plugin.join("src/lib.rs"),
        "use epidemic_plugin_sdk::{Handler, HandlerConfig, HandlerError, Subscription};\n\
         pub struct Stale;\n\
         impl Handler for Stale {\n\
             const NAME: &'static str = \"stale\";\n\
             fn new(_: &HandlerConfig) -> Result<Self, HandlerError> { Ok(Stale) }\n\
             fn subscriptions(&self) -> Vec<Subscription> { vec![Subscription::new(\"t\", [\"a\"])] }\n\
         }\n\
         epidemic_plugin_sdk::export_handler!(Stale);\n",
    )
    .unwrap();
    std::fs::write(
        work.join("Cargo.toml"),
        "[workspace]\nresolver = \"2\"\nmembers = [\"sdk\", \"plugin\"]\n",
    )
    .unwrap();
    oot::cargo_build(&work).join(format!("libepidemic_{}.so", name.replace('-', "_")))
}

/// `name = "version"` lines for dependencies, copied from the workspace's
/// `[workspace.dependencies]` so the copy builds with the same crates.
fn workspace_deps(root: &Path, names: &[&str]) -> String {
    let text = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    names
        .iter()
        .map(|n| {
            text.lines()
                .find(|l| l.starts_with(&format!("{n} =")))
                .unwrap_or_else(|| panic!("{n} not in workspace dependencies"))
                .to_owned()
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

#[test]
fn a_plugin_built_against_a_newer_sdk_version_is_refused() {
    let lib = build_against_modified_sdk("sdk-next", "0.2.0", |_| {});
    let err = assert_one_line_error(
        &lib,
        &[
            "0.2.0",
            epidemic_plugin_sdk::SDK_VERSION,
            "rebuild the plugin",
        ],
    );
    assert!(!err.contains("Layout"), "layout dump leaked: {err}");
}

#[test]
fn a_plugin_built_against_a_changed_interface_is_refused() {
    // Same version number, but the change type grew a field: abi_stable's layout check
    // must catch it, and the host must summarise its long report in one line.
    let lib = build_against_modified_sdk("sdk-changed", epidemic_plugin_sdk::SDK_VERSION, |sdk| {
        let ffi = sdk.join("src/ffi.rs");
        let text = std::fs::read_to_string(&ffi).unwrap();
        let changed = text.replacen(
            "pub struct RChange {\n    pub id: i64,",
            "pub struct RChange {\n    pub id: i64,\n    pub shard: i64,",
            1,
        );
        assert_ne!(changed, text, "RChange no longer looks as the test expects");
        let changed = changed.replacen(
            "RChange {\n            id: c.id,",
            "RChange {\n            id: c.id,\n            shard: 0,",
            1,
        );
        std::fs::write(&ffi, changed).unwrap();
        let host = sdk.join("src/host.rs");
        let text = std::fs::read_to_string(&host).unwrap();
        std::fs::write(
            &host,
            text.replacen(
                "let rc = RChange {\n            id: change.id,",
                "let rc = RChange {\n            id: change.id,\n            shard: 0,",
                1,
            ),
        )
        .unwrap();
    });
    let err = assert_one_line_error(&lib, &["SDK interface differs", "rebuild the plugin"]);
    assert!(err.len() < 400, "error too long: {err}");
    // The full report is there for those who ask.
    let out = Command::new(epidemic_bin())
        .args(["--verbose", "plugin", "check"])
        .arg(&lib)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).lines().count() > 5);
}
